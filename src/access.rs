//! The application's access check: its per-resource authorization and existence
//! decision, made before any precondition is answered (RFC 9110 section 13.2.1).

use std::{future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use http::{request::Parts, Request, Response};

use crate::response::Early;

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

/// Starts the check for `request`, if the layer has one. (The user's check takes the
/// request head, which `http` only lends out of a request taken apart.)
pub(crate) fn start<B>(
    check: Option<&Arc<AccessFn>>,
    request: Request<B>,
) -> (Request<B>, Option<AccessFuture>) {
    let Some(check) = check else {
        return (request, None);
    };
    let (parts, body) = request.into_parts();
    let started = check(&parts);
    (Request::from_parts(parts, body), Some(started))
}

/// Waits for a started check: `Ok` to go on, or the application's refusal.
pub(crate) async fn passed(check: Option<AccessFuture>) -> Result<(), Early> {
    match check {
        Some(check) => check.await.map_err(Early::Refused),
        None => Ok(()),
    }
}
