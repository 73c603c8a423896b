//! [`PreconditionService`]: classifies a request and starts its response future.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower_service::Service;

use crate::{
    access,
    admission::{admit, Admission},
    body::ResponseBody,
    future::{Ctx, ResponseFuture},
    layer::Config,
    protocol,
    request_body::BufferableBody,
};

/// The middleware built by [`PreconditionLayer`](crate::PreconditionLayer).
#[derive(Clone)]
pub struct PreconditionService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for PreconditionService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreconditionService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> PreconditionService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for PreconditionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Send + 'static,
    ReqBody: BufferableBody,
    ResBody: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        let admission = admit(
            request,
            &*config.key,
            &config.write_methods,
            config.require_precondition,
        );
        let (request, key, pre, read) = match admission {
            Admission::Pass(request) => {
                return ResponseFuture::passthrough(self.inner.call(request))
            }
            Admission::Refuse(problem) => return ResponseFuture::problem(problem),
            Admission::Versioned {
                request,
                key,
                pre,
                read,
            } => (request, key, pre, read),
        };
        let method = request.method().clone();
        // The application decides access and existence first (RFC 9110 section 13.2.1).
        let (request, check) = access::start(self.config.access.as_ref(), request);

        // The inner service we were driven ready: keep it for after the store step,
        // leave a clone in its place (tower's readiness contract).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        if read {
            match protocol::read_start_now(&config, &key, &check) {
                Some(loaded) => {
                    let ctx = Ctx::new(config, key, method, pre);
                    ResponseFuture::read_loaded(loaded, inner, request, ctx)
                }
                None => {
                    let load = {
                        let config = config.clone();
                        let key = key.clone();
                        Box::pin(async move {
                            access::passed(check).await?;
                            Ok(protocol::load_for_read(&config, &key).await)
                        })
                    };
                    let ctx = Ctx::new(config, key, method, pre);
                    ResponseFuture::read(load, inner, request, ctx)
                }
            }
        } else {
            let ctx = Ctx::new(config, key, method, pre);
            ResponseFuture::write(request, check, inner, Some(ctx))
        }
    }
}
