//! The application's access check: its per-resource authorization and existence
//! decision, made before any precondition is answered (RFC 9110 section 13.2.1).

use std::{future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use http::{request::Parts, Response};

/// The boxed future of an access check.
pub(crate) type AccessFuture = Pin<Box<dyn Future<Output = Result<(), Response<Bytes>>> + Send>>;

/// An access check as a layer stores it.
pub(crate) type AccessFn = dyn Fn(&Parts) -> AccessFuture + Send + Sync;

/// Boxes a user's check.
pub(crate) fn access_fn<F, Fut>(check: F) -> Arc<AccessFn>
where
    F: Fn(&Parts) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Response<Bytes>>> + Send + 'static,
{
    Arc::new(move |parts: &Parts| Box::pin(check(parts)) as AccessFuture)
}

/// Starts the check for `parts`, if the layer has one.
pub(crate) fn start(check: Option<&Arc<AccessFn>>, parts: &Parts) -> Option<AccessFuture> {
    check.map(|check| check(parts))
}
