//! [`RowVersionFuture`]: runs the handler, then turns its report into the HTTP answer.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use http::{header, Method, Response};
use pin_project_lite::pin_project;

use super::{
    condition::{NotApplied, RowPrecondition},
    layer::RowConfig,
    version::RowVersion,
};
use crate::{
    body::ResponseBody,
    evaluate::{evaluate, Decision},
    response::{into_not_modified, set_validators, Problem},
};

pin_project! {
    /// Response future of [`RowVersionService`](super::RowVersionService).
    pub struct RowVersionFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Not a versioned method (or no key): the inner response as it is.
        Passthrough { #[pin] future: F },
        // Refused before the handler (`400`, `428`).
        Problem { problem: Option<Problem> },
        Versioned {
            #[pin]
            future: F,
            ctx: Option<Box<Ctx>>,
        },
    }
}

struct Ctx {
    condition: RowPrecondition,
    key: Arc<str>,
    read: bool,
    config: Arc<RowConfig>,
}

impl<F> RowVersionFuture<F> {
    pub(crate) fn passthrough(future: F) -> Self {
        Self {
            state: State::Passthrough { future },
        }
    }

    pub(crate) fn problem(problem: Problem) -> Self {
        Self {
            state: State::Problem {
                problem: Some(problem),
            },
        }
    }

    pub(crate) fn versioned(
        future: F,
        condition: RowPrecondition,
        key: Arc<str>,
        read: bool,
        config: Arc<RowConfig>,
    ) -> Self {
        Self {
            state: State::Versioned {
                future,
                ctx: Some(Box::new(Ctx {
                    condition,
                    key,
                    read,
                    config,
                })),
            },
        }
    }
}

impl<F, B, E> Future for RowVersionFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Passthrough { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            StateProj::Problem { problem } => {
                let problem = problem
                    .take()
                    .expect("RowVersionFuture polled after completion");
                Poll::Ready(Ok(problem.into_response()))
            }
            StateProj::Versioned { future, ctx } => {
                let response = ready!(future.poll(cx))?;
                let ctx = ctx
                    .take()
                    .expect("RowVersionFuture polled after completion");
                Poll::Ready(Ok(answer(&ctx, response)))
            }
        }
    }
}

/// The answer to a versioned request, from the handler's response and its report.
fn answer<B>(ctx: &Ctx, mut response: Response<B>) -> Response<ResponseBody<B>> {
    let key = &*ctx.key;
    let pre = ctx.condition.preconditions();
    if let Some(refused) = response.extensions_mut().remove::<NotApplied>() {
        tracing::info!(key, method = %ctx.condition.method(), "precondition failed in the write (412)");
        return precondition_failed(ctx, refused.into_current());
    }
    let version = response.extensions_mut().remove::<RowVersion>();
    if !response.status().is_success() {
        // Validators describe 2xx bodies only.
        return response.map(ResponseBody::inner);
    }
    if !ctx.read && !ctx.condition.is_unconditional() && !ctx.condition.was_consulted() {
        // The write succeeded without asking for its condition, so the database cannot
        // have checked it. Nothing can be undone here; say so loudly.
        tracing::error!(
            key,
            method = %ctx.condition.method(),
            "a conditional write succeeded, but its handler never used the RowPrecondition"
        );
    }
    let Some(version) = version else {
        return response.map(ResponseBody::inner);
    };
    if ctx.read {
        // The handler's row read gave the body and the version together.
        match evaluate(&Method::GET, pre, Some(version.as_version())) {
            Decision::Proceed => {}
            Decision::NotModified => {
                tracing::debug!(key, "not modified (304)");
                let mut response = into_not_modified(response, version.as_version(), pre);
                strip_undated(response.headers_mut(), &version);
                return response;
            }
            Decision::PreconditionFailed => {
                tracing::info!(key, "precondition failed on a read (412)");
                return precondition_failed(ctx, Some(version));
            }
        }
    }
    set_validators(response.headers_mut(), version.as_version());
    strip_undated(response.headers_mut(), &version);
    response.map(ResponseBody::inner)
}

fn precondition_failed<B>(ctx: &Ctx, current: Option<RowVersion>) -> Response<ResponseBody<B>> {
    let dated = current.as_ref().is_none_or(RowVersion::has_date);
    let mut response = Problem::precondition_failed(
        current.map(|c| c.as_version().clone()),
        ctx.condition.preconditions(),
        ctx.config.validators_on_412,
    )
    .into_response();
    if !dated {
        response.headers_mut().remove(header::LAST_MODIFIED);
    }
    response
}

/// A row without a modification time has no `Last-Modified` to send.
fn strip_undated(headers: &mut http::HeaderMap, version: &RowVersion) {
    if !version.has_date() {
        headers.remove(header::LAST_MODIFIED);
    }
}
