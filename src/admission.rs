//! Admission of a request, shared by the store-mode and the transactional layers so that
//! both classify requests identically: is it ours to version, which resource, which
//! preconditions, and is it refused before any store is asked (`400`, `428`)?

use std::sync::Arc;

use http::{request::Parts, Method, Request};

use crate::{
    evaluate::{is_read, Preconditions},
    key,
    response::Problem,
};

/// How a layer derives the stored resource key from a request (already bounded by
/// [`key::bounded_key`]); `None` passes the request through.
pub(crate) type KeyFn = dyn Fn(&Parts) -> Option<Arc<str>> + Send + Sync;

/// The default key: the canonical request path ([`key::canonical_path_key`]), built
/// with one allocation when the path is already canonical.
pub(crate) fn path_key() -> Arc<KeyFn> {
    Arc::new(|parts: &Parts| Some(key::bounded_path_key(parts.uri.path())))
}

/// The key of an application's key function, bounded once here for every layer.
pub(crate) fn custom_key<F>(key: F) -> Arc<KeyFn>
where
    F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
{
    Arc::new(move |parts: &Parts| key(parts).map(|k| Arc::from(key::bounded_key(k))))
}

/// Which writes a layer accepts without a precondition, and which preconditions count.
///
/// Set with `precondition_policy` on [`PreconditionLayer`](crate::PreconditionLayer)
/// and [`PgTransactionalLayer`](crate::PgTransactionalLayer);
/// `require_precondition(true)` is a shorthand for [`Required`](Self::Required).
/// A refused write gets `428 Precondition Required` (RFC 6585) with a problem body that
/// says what to send for its method.
///
/// A malformed `If-Match` gets `400`, and so does a malformed `If-None-Match` on a
/// write; on a read (`GET`, `HEAD`) a malformed `If-None-Match` is ignored and the read
/// served as if it were absent
/// ([`Preconditions::from_request`](crate::evaluate::Preconditions::from_request)).
///
/// An `If-Unmodified-Since` that is not a valid HTTP-date (or sent on more than one
/// field line) is ignored, as RFC 9110 section 13.1.4 requires, so it counts as absent
/// here: such a write is refused under [`Required`](Self::Required) unless another
/// precondition guards it.
///
/// ```
/// use tower_precondition::{MemoryStore, PreconditionLayer, PreconditionPolicy};
///
/// // Only `If-Match: "<etag>"` (update) or `If-None-Match: *` (create) let a write in.
/// let layer = PreconditionLayer::new(MemoryStore::new())
///     .precondition_policy(PreconditionPolicy::Strict);
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PreconditionPolicy {
    /// Unconditional writes are allowed (the default).
    #[default]
    Optional,
    /// A write needs `If-Match`, `If-None-Match` or a valid `If-Unmodified-Since`.
    ///
    /// Easy to satisfy: `If-None-Match: "x"` (any tag the resource does not have) or an
    /// `If-Unmodified-Since` in the future passes for any current version, so this
    /// catches forgetful clients, not careless ones. Use [`Strict`](Self::Strict) to
    /// make every accepted write name the version it replaces.
    Required,
    /// A write needs `If-Match` with one or more entity tags (an update of a version
    /// the client has seen) or `If-None-Match: *` (a create of a resource that must not
    /// exist yet). `If-Match: *`, `If-None-Match` with tags and `If-Unmodified-Since`
    /// alone are refused: each can pass without the client knowing the current version.
    Strict,
}

impl PreconditionPolicy {
    /// Whether a write with preconditions `pre` is let through.
    pub(crate) fn admits(self, pre: &Preconditions) -> bool {
        match self {
            Self::Optional => true,
            Self::Required => pre.guards_write(),
            Self::Strict => pre.guards_write_strictly(),
        }
    }
}

impl From<bool> for PreconditionPolicy {
    /// `true` is [`Required`](Self::Required), `false` [`Optional`](Self::Optional).
    fn from(require: bool) -> Self {
        if require {
            Self::Required
        } else {
            Self::Optional
        }
    }
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
    policy: PreconditionPolicy,
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
    let method = request.method();

    let pre = match Preconditions::from_request(method, request.headers()) {
        Ok(pre) => pre,
        Err(error) => {
            tracing::info!(key = &*key, %method, %error, "malformed precondition (400)");
            return Admission::Refuse(Problem::bad_request(error.to_string()));
        }
    };
    if !read && !policy.admits(&pre) {
        tracing::info!(key = &*key, %method, ?policy, "write without an accepted precondition refused (428)");
        return Admission::Refuse(Problem::precondition_required(
            method,
            policy == PreconditionPolicy::Strict,
        ));
    }
    Admission::Versioned {
        request,
        key,
        pre,
        read,
    }
}
