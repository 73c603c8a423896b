//! [`RowVersionService`]: admits a request and starts its response future.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower_service::Service;

use super::{condition::RowPrecondition, future::RowVersionFuture, layer::RowConfig};
use crate::{
    admission::{admit, Admission},
    body::ResponseBody,
};

/// The middleware built by [`RowVersionLayer`](super::RowVersionLayer).
#[derive(Clone)]
pub struct RowVersionService<S> {
    inner: S,
    config: Arc<RowConfig>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for RowVersionService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowVersionService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> RowVersionService<S> {
    pub(crate) fn new(inner: S, config: Arc<RowConfig>) -> Self {
        Self { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware, returning the wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RowVersionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = RowVersionFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        match admit(request, &*config.key, &config.write_methods, config.policy) {
            Admission::Pass(request) => RowVersionFuture::passthrough(self.inner.call(request)),
            Admission::Refuse(problem) => RowVersionFuture::problem(problem),
            Admission::Versioned {
                mut request,
                key,
                pre,
                read,
            } => {
                let condition = RowPrecondition::new(request.method().clone(), pre);
                request.extensions_mut().insert(condition.clone());
                let future = self.inner.call(request);
                RowVersionFuture::versioned(future, condition, key, read, config.clone())
            }
        }
    }
}
