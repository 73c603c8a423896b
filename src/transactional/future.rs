//! The response future of the transactional mode.
//!
//! ```text
//! write:  Collecting (the body, within limit and timeout; skipped when streaming)
//!           ──> Beginning (permit + BEGIN + lock + evaluate) ──> Running (handler,
//!           with deadline) ──> Finishing (write version + COMMIT, or ROLLBACK)
//!           ──> response
//! read:   Read (the store-mode read future)
//! either: Ready (a response the layer wrote) | Passthrough (not ours)
//! ```
//!
//! The body is read before the transaction begins, so a client that stalls mid-upload
//! holds no permit, no connection and no row lock (finding 8.1), and a body that fails
//! or is cut off is refused (`400`) before anything is begun (finding 7.4).
//!
//! The transaction is owned by a `TxOwner`, held by this future from `Running` on (and
//! by the `Beginning` step's future before): if the future is dropped (a client that
//! disconnects), the owner rolls the transaction back, so the pool never gets back a
//! connection with a transaction open.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::SystemTime,
};

use http::{request::Parts, Method, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::{
    layer::TxConfig,
    tx::{Committed, Final, Started, TxOwner},
};
use crate::{
    body::ResponseBody,
    fresh::fresh_etag,
    future::{strong_etag, take_pair},
    request_body::{BufferableBody, CollectBody},
    response::{remove_validators, set_new_validators, Early, Problem},
    store::Version,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Output<B, E> = Result<Response<ResponseBody<B>>, E>;

pin_project! {
    /// Response future of [`PgTransactionalService`](super::PgTransactionalService).
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ReqBody: BufferableBody,
    {
        // Declared first so it is dropped first: a dropped handler future releases
        // the transaction before the owner rolls it back.
        #[pin]
        state: State<S, ReqBody, ResBody>,
        write: Option<Box<WriteCtx>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ReqBody: BufferableBody,
    {
        Ready { response: Option<Response<ResponseBody<ResBody>>> },
        Passthrough { #[pin] future: S::Future },
        Read { #[pin] future: crate::ResponseFuture<S, ReqBody, ResBody> },
        Collecting {
            #[pin]
            collect: CollectBody<ReqBody>,
            next: Option<Box<Collected<S>>>,
        },
        Beginning {
            begin: BoxFuture<Result<Started, Early>>,
            inner: Option<S>,
            request: Option<Request<ReqBody>>,
        },
        Running { #[pin] future: S::Future, #[pin] deadline: Sleep },
        Finishing { finish: BoxFuture<Output<ResBody, S::Error>> },
    }
}

/// What a buffered write needs once its body is in hand.
struct Collected<S> {
    begin: BoxFuture<Result<Started, Early>>,
    inner: S,
    parts: Parts,
}

/// What a write carries from its start to its end.
pub(crate) struct WriteCtx {
    config: Arc<TxConfig>,
    key: Arc<str>,
    method: Method,
    /// The transaction; taken when it is committed or rolled back.
    owner: Option<TxOwner>,
    /// The version the write replaces.
    base: Option<Version>,
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: BufferableBody,
{
    fn with_state(state: State<S, ReqBody, ResBody>, write: Option<WriteCtx>) -> Self {
        Self {
            state,
            write: write.map(Box::new),
        }
    }

    pub(crate) fn passthrough(future: S::Future) -> Self {
        Self::with_state(State::Passthrough { future }, None)
    }

    pub(crate) fn read(future: crate::ResponseFuture<S, ReqBody, ResBody>) -> Self {
        Self::with_state(State::Read { future }, None)
    }

    pub(crate) fn problem(problem: Problem) -> Self {
        Self::with_state(
            State::Ready {
                response: Some(problem.into_response()),
            },
            None,
        )
    }

    /// A write whose body is streamed: the transaction begins at once, and the handler
    /// reads the body inside it.
    pub(crate) fn write(
        begin: BoxFuture<Result<Started, Early>>,
        inner: S,
        request: Request<ReqBody>,
        ctx: WriteCtx,
    ) -> Self {
        let state = State::Beginning {
            begin,
            inner: Some(inner),
            request: Some(request),
        };
        Self::with_state(state, Some(ctx))
    }

    /// A write whose body is collected first; the transaction begins once it is in hand.
    pub(crate) fn buffered(
        collect: CollectBody<ReqBody>,
        begin: BoxFuture<Result<Started, Early>>,
        inner: S,
        parts: Parts,
        ctx: WriteCtx,
    ) -> Self {
        let state = State::Collecting {
            collect,
            next: Some(Box::new(Collected {
                begin,
                inner,
                parts,
            })),
        };
        Self::with_state(state, Some(ctx))
    }
}

impl WriteCtx {
    pub(crate) fn new(config: Arc<TxConfig>, key: Arc<str>, method: Method) -> Self {
        Self {
            config,
            key,
            method,
            owner: None,
            base: None,
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: BufferableBody,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Output = Output<ResBody, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Ready { response } => {
                    let response = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(response));
                }
                StateProj::Passthrough { future } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                StateProj::Read { future } => return future.poll(cx),
                StateProj::Finishing { finish } => return finish.as_mut().poll(cx),

                StateProj::Collecting { collect, next } => {
                    let collected = ready!(collect.poll(cx));
                    let Collected {
                        begin,
                        inner,
                        parts,
                    } = *next.take().expect("ResponseFuture polled after completion");
                    match collected {
                        Ok(bytes) => State::Beginning {
                            begin,
                            inner: Some(inner),
                            request: Some(Request::from_parts(parts, ReqBody::from_bytes(bytes))),
                        },
                        Err(refusal) => {
                            // Nothing was begun: `begin` is dropped unpolled.
                            let key = this.write.as_deref().map_or("", |ctx| &*ctx.key);
                            tracing::info!(key, %refusal, "request body refused before the transaction");
                            State::Ready {
                                response: Some(refusal.into_response()),
                            }
                        }
                    }
                }

                StateProj::Beginning {
                    begin,
                    inner,
                    request,
                } => {
                    let started = ready!(begin.as_mut().poll(cx));
                    let (mut inner, mut request) = take_pair(inner, request);
                    match started {
                        Ok(started) => {
                            let ctx = this.write.as_deref_mut().expect("write context");
                            request.extensions_mut().insert(started.transaction);
                            ctx.owner = Some(started.owner);
                            ctx.base = started.base;
                            State::Running {
                                future: inner.call(request),
                                deadline: tokio::time::sleep(ctx.config.handler_timeout),
                            }
                        }
                        Err(problem) => State::Ready {
                            response: Some(problem.into_response()),
                        },
                    }
                }
                StateProj::Running { future, deadline } => match future.poll(cx) {
                    Poll::Ready(result) => {
                        let ctx = this.write.take().expect("write context");
                        State::Finishing {
                            finish: Box::pin(finish_write(*ctx, result)),
                        }
                    }
                    Poll::Pending => {
                        ready!(deadline.poll(cx));
                        let ctx = this.write.take().expect("write context");
                        // Leaving this state drops the handler's future (cancelling
                        // it, and releasing the connection) before we roll back.
                        tracing::warn!(
                            key = &*ctx.key,
                            "handler missed its deadline; rolling back (503)"
                        );
                        State::Finishing {
                            finish: Box::pin(timed_out(*ctx)),
                        }
                    }
                },
            };
            this.state.set(next);
        }
    }
}

async fn finish_write<B, E>(mut ctx: WriteCtx, result: Result<Response<B>, E>) -> Output<B, E> {
    let owner = ctx.owner.take().expect("transaction owner");
    let key = &*ctx.key;
    let mut response = match result {
        Ok(response) => response,
        Err(error) => {
            tracing::info!(key, "handler failed; rolling back");
            owner.rollback().await;
            return Err(error);
        }
    };
    let status = response.status();
    if !status.is_success() {
        tracing::debug!(key, %status, "handler did not succeed; rolling back");
        owner.rollback().await;
        if !status.is_client_error() {
            // Whatever validators a failed handler set name nothing that exists.
            remove_validators(response.headers_mut());
        }
        return Ok(response.map(ResponseBody::inner));
    }

    let fin = if ctx.method == Method::DELETE {
        Final::Delete
    } else {
        let etag = strong_etag(response.headers(), key).unwrap_or_else(fresh_etag);
        match Version::successor(ctx.base.as_ref(), etag, SystemTime::now()) {
            Some(version) => Final::Write(version),
            None => {
                // Unreachable: `strong_etag` and `fresh_etag` give strong tags.
                owner.rollback().await;
                return Ok(Problem::rolled_back(ctx.config.retry_after).into_response());
            }
        }
    };
    match owner.commit(&ctx.config, key, &fin).await {
        Committed::Yes => {
            match &fin {
                Final::Write(version) => set_new_validators(response.headers_mut(), version),
                Final::Delete => remove_validators(response.headers_mut()),
            }
            tracing::debug!(key, "write committed");
            Ok(response.map(ResponseBody::inner))
        }
        Committed::RolledBack => Ok(Problem::rolled_back(ctx.config.retry_after).into_response()),
        Committed::Unknown => Ok(Problem::commit_unknown(ctx.config.retry_after).into_response()),
    }
}

async fn timed_out<B, E>(mut ctx: WriteCtx) -> Output<B, E> {
    if let Some(owner) = ctx.owner.take() {
        owner.rollback().await;
    }
    Ok(Problem::rolled_back(ctx.config.retry_after).into_response())
}
