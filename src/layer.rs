//! [`PreconditionLayer`] and its builder.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{request::Parts, Method};
use tower_layer::Layer;

use crate::{
    admission::{self, KeyFn, PreconditionPolicy},
    service::PreconditionService,
    store::AtomicVersionStore,
};

/// The longest any duration setting of either layer may be: larger values saturate to
/// it, so that `now + lease`, deadlines and `Retry-After` can never overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The configuration shared by every service a layer builds.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) store: Arc<dyn AtomicVersionStore>,
    pub(crate) key: Arc<KeyFn>,
    pub(crate) write_methods: Vec<Method>,
    /// Named for the old `bool`; the services pass it to `admit` as it is.
    pub(crate) require_precondition: PreconditionPolicy,
    pub(crate) lease: Duration,
    pub(crate) handler_timeout: Duration,
    pub(crate) store_timeout: Duration,
    pub(crate) short_circuit_reads: bool,
    pub(crate) retry_after: Duration,
    pub(crate) max_reserve_attempts: u32,
}

impl Config {
    /// The handler's deadline: the configured one, but always well inside the lease, so
    /// that a lease can never expire while its handler still runs.
    pub(crate) fn handler_deadline(&self) -> Duration {
        self.handler_timeout.min(self.lease.mul_f64(0.8))
    }

    /// The deadline of a handler starting now under a lease that expires at
    /// `lease_expires_at`: [`handler_deadline`](Self::handler_deadline), but never past
    /// 80% of the lease counted from its start, so the time the reserve itself took
    /// (up to a store timeout) cannot push the handler past the lease.
    pub(crate) fn handler_deadline_within(&self, lease_expires_at: SystemTime) -> Duration {
        let margin = self.lease.saturating_sub(self.lease.mul_f64(0.8));
        let left = lease_expires_at
            .checked_sub(margin)
            .and_then(|end| end.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::ZERO);
        self.handler_deadline().min(left)
    }
}

/// A [`Layer`] that evaluates HTTP preconditions (RFC 9110 section 13) and makes the
/// precondition check and the write one atomic compare-and-set in a version store.
///
/// * Reads (`GET`, `HEAD`) get `ETag` and `Last-Modified`, and `304 Not Modified` when
///   `If-None-Match` / `If-Modified-Since` match.
/// * Writes (`PUT`, `PATCH`, `DELETE` by default) are evaluated and reserved in one
///   compare-and-set, run, then settled: `412` when a precondition fails, `409` while
///   another write to the same resource is in flight, `503` when the store is down.
///
/// ```
/// use axum::{routing::get, Router};
/// use tower_precondition::{MemoryStore, PreconditionLayer};
///
/// let app: Router = Router::new()
///     .route("/items/{id}", get(|| async { "item" }).put(|| async { "saved" }))
///     .layer(
///         PreconditionLayer::new(MemoryStore::new())
///             .require_precondition(true)
///             .lease(std::time::Duration::from_secs(10)),
///     );
/// # let _ = app;
/// ```
#[derive(Clone)]
#[must_use]
pub struct PreconditionLayer {
    config: Config,
}

impl fmt::Debug for PreconditionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreconditionLayer")
            .field("write_methods", &self.config.write_methods)
            .field("precondition_policy", &self.config.require_precondition)
            .field("lease", &self.config.lease)
            .field("handler_timeout", &self.config.handler_timeout)
            .field("store_timeout", &self.config.store_timeout)
            .field("short_circuit_reads", &self.config.short_circuit_reads)
            .field("retry_after", &self.config.retry_after)
            .finish_non_exhaustive()
    }
}

impl PreconditionLayer {
    /// A layer over `store` with the defaults:
    ///
    /// | setting | default |
    /// | --- | --- |
    /// | resource key | the request path |
    /// | write methods | `PUT`, `PATCH`, `DELETE` |
    /// | precondition policy on writes | [`PreconditionPolicy::Optional`] |
    /// | lease | 30 s |
    /// | handler deadline | 25 s (always at most 80% of the lease) |
    /// | store timeout | 2 s |
    /// | matching reads answered `304` without running the handler | yes |
    /// | `Retry-After` on `409` / `503` | 1 s |
    pub fn new<S: AtomicVersionStore>(store: S) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A layer over a shared store (several layers, or the app itself, may hold it).
    pub fn from_arc(store: Arc<dyn AtomicVersionStore>) -> Self {
        Self {
            config: Config {
                store,
                key: admission::path_key(),
                write_methods: vec![Method::PUT, Method::PATCH, Method::DELETE],
                require_precondition: PreconditionPolicy::Optional,
                lease: Duration::from_secs(30),
                handler_timeout: Duration::from_secs(25),
                store_timeout: Duration::from_secs(2),
                short_circuit_reads: true,
                retry_after: Duration::from_secs(1),
                max_reserve_attempts: 4,
            },
        }
    }

    /// How the resource key is derived from a request. Returning `None` lets the request
    /// through untouched (no evaluation, no versioning).
    ///
    /// **One resource must map to exactly one key**: two keys for one resource give it
    /// two versions, and two writers, each with a valid `ETag`, both win. The default
    /// is the [canonical](crate::key::canonical_path) request path, which merges the
    /// spellings RFC 3986 equates (`/items/%31` and `/items/1`, `/items/./1`). Key by
    /// what the handler actually uses: under axum's `Router::nest` the layer inside the
    /// nested router sees the path with its prefix stripped, so two nested routers
    /// would share keys; see the [`key`](crate::key) module for keying by axum's
    /// `OriginalUri` and by the matched route and its decoded parameters.
    ///
    /// Whatever the function returns is stored as [`bounded_key`](crate::key::bounded_key)
    /// of it (keys over 256 bytes become a fixed-size SHA-256 digest form).
    ///
    /// ```
    /// use tower_precondition::{MemoryStore, PreconditionLayer};
    ///
    /// // Only version `/items/...`, keyed by tenant and path.
    /// let layer = PreconditionLayer::new(MemoryStore::new()).key_fn(|parts| {
    ///     let path = parts.uri.path();
    ///     let tenant = parts.headers.get("x-tenant")?.to_str().ok()?;
    ///     path.starts_with("/items/").then(|| format!("{tenant}:{path}"))
    /// });
    /// # let _ = layer;
    /// ```
    pub fn key_fn<F>(mut self, key: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config.key = Arc::new(key);
        self
    }

    /// Which methods are writes (reserved, run, settled). Default `PUT`, `PATCH`,
    /// `DELETE`; add `POST` for APIs where a POST modifies the resource at its own URL.
    /// `GET` and `HEAD` are always reads and are ignored here; other methods not listed
    /// pass through untouched.
    pub fn write_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.write_methods = admission::write_methods(methods);
        self
    }

    /// Shorthand: `true` sets [`PreconditionPolicy::Required`] (answer
    /// `428 Precondition Required` to a write with none of `If-Match`, `If-None-Match`
    /// or a valid `If-Unmodified-Since`, RFC 6585), `false` sets
    /// [`PreconditionPolicy::Optional`]. Off by default. It replaces any policy set
    /// before; prefer [`PreconditionPolicy::Strict`] for APIs whose clients must never
    /// overwrite a version they have not seen.
    pub fn require_precondition(self, require: bool) -> Self {
        self.precondition_policy(require.into())
    }

    /// Which preconditions a write must carry; see [`PreconditionPolicy`]. Default
    /// [`PreconditionPolicy::Optional`].
    pub fn precondition_policy(mut self, policy: PreconditionPolicy) -> Self {
        self.config.require_precondition = policy;
        self
    }

    /// How long a write holds its resource. A crashed process leaves a lease that
    /// expires after this; the next write then takes it over with a fresh version.
    /// Clamped to between 10 ms and 365 days.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease.clamp(Duration::from_millis(10), MAX_DURATION);
        self
    }

    /// The handler's deadline on a write. It is capped at 80% of the lease, so a lease
    /// never expires while its handler still runs. A handler cut off by the deadline is
    /// treated as a failed write: `503`, and the resource gets a fresh version.
    /// At most 365 days.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.config.handler_timeout = timeout.min(MAX_DURATION);
        self
    }

    /// How long one store call may take before it counts as a failure (`503` on writes).
    /// At most 365 days.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config.store_timeout = timeout.min(MAX_DURATION);
        self
    }

    /// Whether a read whose `If-None-Match` / `If-Modified-Since` matches is answered
    /// `304` without running the handler (the default). Turn it off when handlers set
    /// headers a `304` must repeat (`Cache-Control`, `Vary`, `Expires`,
    /// `Content-Location`): the handler then runs and its `2xx` becomes the `304`.
    pub fn short_circuit_reads(mut self, short_circuit: bool) -> Self {
        self.config.short_circuit_reads = short_circuit;
        self
    }

    /// The `Retry-After` sent with `409` and `503`, in whole seconds rounded up (at
    /// least 1). At most 365 days.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.config.retry_after = delay.min(MAX_DURATION);
        self
    }
}

impl<S> Layer<S> for PreconditionLayer {
    type Service = PreconditionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PreconditionService::new(inner, Arc::new(self.config.clone()))
    }
}
