//! Admission of a request, shared by the store-mode and the transactional layers so that
//! both classify requests identically: is it ours to version, which resource, which
//! preconditions, and is it refused before any store is asked (`400`, `428`)?

use std::sync::Arc;

use http::{request::Parts, Method, Request};

use crate::{
    evaluate::{is_read, Preconditions},
    response::Problem,
};

/// How a layer derives the resource key from a request; `None` passes it through.
pub(crate) type KeyFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// The default key: the request path.
pub(crate) fn path_key() -> Arc<KeyFn> {
    Arc::new(|parts: &Parts| Some(parts.uri.path().to_owned()))
}

/// The configured write methods, without `GET` and `HEAD` (always reads).
pub(crate) fn write_methods(methods: impl IntoIterator<Item = Method>) -> Vec<Method> {
    methods
        .into_iter()
        .filter(|m| m != Method::GET && m != Method::HEAD)
        .collect()
}

/// What a layer does with a request.
pub(crate) enum Admission<B> {
    /// Not ours (another method, or no key): through untouched.
    Pass(Request<B>),
    /// Refused before any store is asked.
    Refuse(Problem),
    /// A read or a write of resource `key`.
    Versioned {
        request: Request<B>,
        key: Arc<str>,
        pre: Preconditions,
        read: bool,
    },
}

/// Classifies `request` by method, derives its key and parses its preconditions.
pub(crate) fn admit<B>(
    request: Request<B>,
    key_fn: &KeyFn,
    write_methods: &[Method],
    require_precondition: bool,
) -> Admission<B> {
    let read = is_read(request.method());
    if !read && !write_methods.contains(request.method()) {
        return Admission::Pass(request);
    }
    let (parts, body) = request.into_parts();
    let key = key_fn(&parts);
    let request = Request::from_parts(parts, body);
    let Some(key) = key else {
        return Admission::Pass(request);
    };
    let key: Arc<str> = key.into();
    let method = request.method();

    let pre = match Preconditions::from_headers(request.headers()) {
        Ok(pre) => pre,
        Err(error) => {
            tracing::info!(key = &*key, %method, %error, "malformed precondition (400)");
            return Admission::Refuse(Problem::bad_request(error.to_string()));
        }
    };
    if !read && require_precondition && !pre.guards_write() {
        tracing::info!(key = &*key, %method, "unconditional write refused (428)");
        return Admission::Refuse(Problem::precondition_required(method));
    }
    Admission::Versioned {
        request,
        key,
        pre,
        read,
    }
}
