//! [`PgTransactionalService`]: classifies a request and starts its response future.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::{
    future::{ResponseFuture, WriteCtx},
    layer::TxConfig,
    tx,
};
use crate::{
    access,
    admission::{admit, Admission},
    body::ResponseBody,
    evaluate::is_read,
    request_body::BufferableBody,
    response::Early,
    PreconditionLayer,
};

/// The middleware built by [`PgTransactionalLayer`](super::PgTransactionalLayer).
#[derive(Clone)]
pub struct PgTransactionalService<S> {
    inner: S,
    config: Arc<TxConfig>,
    reads: PreconditionLayer,
}

impl<S: std::fmt::Debug> std::fmt::Debug for PgTransactionalService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTransactionalService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> PgTransactionalService<S> {
    pub(crate) fn new(inner: S, config: Arc<TxConfig>, reads: PreconditionLayer) -> Self {
        Self {
            inner,
            config,
            reads,
        }
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for PgTransactionalService<S>
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
        // The inner service we were driven ready goes with this request; a clone
        // takes its place (tower's readiness contract).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);

        let method = request.method().clone();
        if is_read(&method) {
            // Reads are the store-mode read path over the same table.
            let mut reads = self.reads.layer(inner);
            return ResponseFuture::read(reads.call(request));
        }
        let mut inner = inner;
        let config = &self.config;
        let admission = admit(
            request,
            &*config.key,
            &config.write_methods,
            config.require_precondition,
        );
        let (request, key, pre) = match admission {
            Admission::Pass(request) => return ResponseFuture::passthrough(inner.call(request)),
            Admission::Refuse(problem) => return ResponseFuture::problem(problem),
            Admission::Versioned {
                request, key, pre, ..
            } => (request, key, pre),
        };

        // The application decides access first (RFC 9110 section 13.2.1): nothing is
        // begun for a request it refuses.
        let (request, check) = access::start(self.config.access.as_ref(), request);
        let begin = {
            let config = self.config.clone();
            let (key, method) = (key.clone(), method.clone());
            Box::pin(async move {
                access::passed(check).await?;
                tx::begin(config, key, method, pre)
                    .await
                    .map_err(Early::from)
            })
        };
        let ctx = WriteCtx::new(self.config.clone(), key, method);
        if self.config.body.is_streaming() {
            return ResponseFuture::write(begin, inner, request, ctx);
        }
        // The body first: nothing is begun (no permit, no connection, no row lock)
        // until it is in hand.
        let (parts, body) = request.into_parts();
        let collect = self.config.body.collect(&parts.headers, body);
        ResponseFuture::buffered(collect, begin, inner, parts, ctx)
    }
}
