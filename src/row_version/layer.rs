//! [`RowVersionLayer`] and its builder.

use std::{fmt, sync::Arc};

use http::Method;
use tower_layer::Layer;

use super::service::RowVersionService;
use crate::admission::{self, KeyFn, PreconditionPolicy};

/// The configuration shared by every service a layer builds.
#[derive(Clone)]
pub(crate) struct RowConfig {
    /// Only for logs: no version is keyed by it.
    pub(crate) key: Arc<KeyFn>,
    pub(crate) write_methods: Vec<Method>,
    pub(crate) policy: PreconditionPolicy,
    pub(crate) validators_on_412: bool,
}

/// A [`Layer`] for handlers whose rows carry their own version: it does the HTTP side
/// of preconditions and leaves the compare-and-set to the handler's own write
/// statement, where the database performs it.
///
/// * Before the handler: parses the preconditions (`400` when malformed), applies the
///   [`PreconditionPolicy`] (`428`), and hands the handler a
///   [`RowPrecondition`](super::RowPrecondition) to put into its write.
/// * After it: a [`NotApplied`](super::NotApplied) becomes `412` with the current
///   `ETag` and `Last-Modified`; a `2xx` carrying a [`RowVersion`](super::RowVersion)
///   gets them as its validators, and a read whose `If-None-Match` /
///   `If-Modified-Since` match becomes `304`.
///
/// It keeps no versions, takes no lease and makes no round trip of its own, so it
/// adds no failure mode to the handler's: the database's answer is the answer.
///
/// ```
/// use axum::{routing::get, Router};
/// use tower_precondition::{row_version::RowVersionLayer, PreconditionPolicy};
///
/// let app: Router = Router::new()
///     .route("/items/{id}", get(|| async { "item" }))
///     .route_layer(RowVersionLayer::new().precondition_policy(PreconditionPolicy::Strict));
/// # let _ = app;
/// ```
#[derive(Clone)]
#[must_use]
pub struct RowVersionLayer {
    config: Arc<RowConfig>,
}

impl fmt::Debug for RowVersionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RowVersionLayer")
            .field("write_methods", &self.config.write_methods)
            .field("precondition_policy", &self.config.policy)
            .field("validators_on_412", &self.config.validators_on_412)
            .finish_non_exhaustive()
    }
}

impl Default for RowVersionLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RowVersionLayer {
    /// A layer with the defaults:
    ///
    /// | setting | default |
    /// | --- | --- |
    /// | write methods | `PUT`, `PATCH`, `DELETE` |
    /// | precondition policy on writes | [`PreconditionPolicy::Optional`] |
    /// | current validators on a `412` | yes |
    pub fn new() -> Self {
        Self {
            config: Arc::new(RowConfig {
                key: admission::path_key(),
                write_methods: vec![Method::PUT, Method::PATCH, Method::DELETE],
                policy: PreconditionPolicy::Optional,
                validators_on_412: true,
            }),
        }
    }

    fn config_mut(&mut self) -> &mut RowConfig {
        Arc::make_mut(&mut self.config)
    }

    /// Which methods are writes (get a [`RowPrecondition`](super::RowPrecondition) and
    /// the policy). Default `PUT`, `PATCH`, `DELETE`; `GET` and `HEAD` are always reads;
    /// other methods pass through untouched.
    pub fn write_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config_mut().write_methods = admission::write_methods(methods);
        self
    }

    /// Which preconditions a write must carry; see [`PreconditionPolicy`]. Default
    /// [`PreconditionPolicy::Optional`].
    pub fn precondition_policy(mut self, policy: PreconditionPolicy) -> Self {
        self.config_mut().policy = policy;
        self
    }

    /// Shorthand: `true` sets [`PreconditionPolicy::Required`], `false`
    /// [`PreconditionPolicy::Optional`].
    pub fn require_precondition(self, require: bool) -> Self {
        self.precondition_policy(require.into())
    }

    /// Whether a `412` carries the row's current `ETag` and `Last-Modified` (the
    /// default). The handler runs (and decides access) before any `412`, so this only
    /// matters where a caller may write a row but not learn its version.
    pub fn validators_on_412(mut self, include: bool) -> Self {
        self.config_mut().validators_on_412 = include;
        self
    }
}

impl<S> Layer<S> for RowVersionLayer {
    type Service = RowVersionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RowVersionService::new(inner, self.config.clone())
    }
}
