//! [`PreconditionLayer`] and its builder.

use std::{fmt, sync::Arc, time::Duration};

use http::{request::Parts, Method};
use tower_layer::Layer;

use crate::{
    access::{access_fn, AccessFn},
    admission::{self, KeyFn, PreconditionPolicy},
    clock::StoreClock,
    entry_cache::EntryCache,
    request_body::RequestBodyConfig,
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
    pub(crate) validators_on_412: bool,
    pub(crate) access: Option<Arc<AccessFn>>,
    pub(crate) request_body: RequestBodyConfig,
    /// This layer's reading of the store's clock (leases are judged by it).
    pub(crate) clock: Arc<StoreClock>,
    /// The entries this layer last saw, to start writes from (never to answer them).
    pub(crate) entry_cache: Arc<EntryCache>,
}

/// How many entries a layer over a store across a connection remembers by default.
pub(crate) const DEFAULT_ENTRY_CACHE: usize = 16_384;

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
    /// | handler deadline | 25 s (always inside the lease, judged by the store's clock) |
    /// | store timeout | 2 s |
    /// | matching reads answered `304` / `412` without running the handler | no: the handler decides first |
    /// | access check before preconditions ([`authorize`](Self::authorize)) | none |
    /// | current validators on a `412` | yes |
    /// | `Retry-After` on `409` / `503` | 1 s |
    /// | [entries remembered](Self::entry_cache) to start writes from | 16 384, none for the memory store |
    pub fn new<S: AtomicVersionStore>(store: S) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A layer over a shared store (several layers, or the app itself, may hold it).
    pub fn from_arc(store: Arc<dyn AtomicVersionStore>) -> Self {
        let cache = if store.is_in_process() {
            0
        } else {
            DEFAULT_ENTRY_CACHE
        };
        Self {
            config: Config {
                store,
                key: admission::path_key(),
                write_methods: vec![Method::PUT, Method::PATCH, Method::DELETE],
                require_precondition: PreconditionPolicy::Optional,
                lease: Duration::from_secs(30),
                handler_timeout: Duration::from_secs(25),
                store_timeout: Duration::from_secs(2),
                short_circuit_reads: false,
                retry_after: Duration::from_secs(1),
                max_reserve_attempts: 4,
                validators_on_412: true,
                access: None,
                request_body: RequestBodyConfig::new(),
                clock: Arc::default(),
                entry_cache: Arc::new(EntryCache::new(cache)),
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
        self.config.key = admission::custom_key(key);
        self
    }

    /// A key function already bounded (the transactional layer's, for its reads).
    #[cfg(feature = "postgres")]
    pub(crate) fn with_key(mut self, key: Arc<KeyFn>) -> Self {
        self.config.key = key;
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

    /// How long a write holds its resource, on the store's clock. A crashed process
    /// leaves a lease that expires after this; the next request then takes it over with
    /// a fresh version.
    /// Clamped to between 10 ms and 365 days.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease.clamp(Duration::from_millis(10), MAX_DURATION);
        self
    }

    /// The handler's deadline on a write. It is capped so that the handler ends while
    /// the store's clock is surely short of the lease's expiry, with a fifth of the
    /// lease left for the settle: a lease never expires while a handler that honours
    /// cancellation still runs. A handler cut off by the deadline has an unknown
    /// outcome: `503`, and the resource gets a fresh version (or, if it had none, none).
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

    /// Whether a read whose preconditions decide it (`304`, or `412` for an `If-Match`
    /// on a `GET`) is answered without running the handler. Off by default: the handler
    /// runs, and only its `2xx` becomes the `304` / `412`, so that
    ///
    /// * a request the application answers `401` / `403` / `404` learns nothing from a
    ///   precondition (RFC 9110 section 13.2.1), and
    /// * a `304` carries the headers the handler's `200` would (`Cache-Control`,
    ///   `Vary`, `Expires`, `Content-Location`: RFC 9110 section 15.4.5).
    ///
    /// Turn it on to save the handler's work on revalidations, when every versioned
    /// resource is public or an [`authorize`](Self::authorize) check decides access,
    /// and the handler sets none of those headers (a short-circuited `304` carries the
    /// validators only). A read that gives a resource its first version always runs the
    /// handler.
    pub fn short_circuit_reads(mut self, short_circuit: bool) -> Self {
        self.config.short_circuit_reads = short_circuit;
        self
    }

    /// Whether a `412` carries the resource's current `ETag` and `Last-Modified` (the
    /// default), so that a client can re-sync without another request. Turn it off when
    /// a version is not for anyone who asks: a `412` is answered before the handler, so
    /// whoever can send the request learns the current tag.
    pub fn validators_on_412(mut self, include: bool) -> Self {
        self.config.validators_on_412 = include;
        self
    }

    /// How a write's request body is read before the resource is reserved. By default
    /// it is buffered (up to [`RequestBodyConfig::DEFAULT_LIMIT`], within
    /// [`RequestBodyConfig::DEFAULT_READ_TIMEOUT`]): the lease is taken only once the
    /// body is in hand, so a client that stalls its upload holds nothing other writers
    /// wait for (it gets `408`), an oversized body gets `413`, and a body cut off
    /// mid-upload gets `400` with nothing changed.
    ///
    /// [`RequestBodyConfig::streaming`] hands the body to the handler unread, for
    /// uploads too large to buffer. The cost: the lease is held while the client sends,
    /// so a stalled upload makes other writers of that resource get `409` until the
    /// handler's deadline, which then gives the resource a fresh version. A streamed
    /// body that fails while the handler reads it (a client cut off mid-upload) makes
    /// the write's outcome unknown whatever the handler answers: the resource gets a
    /// fresh version ([`BufferableBody::watched`](crate::BufferableBody::watched)).
    pub fn request_body(mut self, config: RequestBodyConfig) -> Self {
        self.config.request_body = config;
        self
    }

    /// The application's own access decision, made **before** any precondition is
    /// answered, as RFC 9110 section 13.2.1 requires: a request the application would
    /// answer `401`, `403`, `404` or `405` must not learn from a `304` or a `412` that
    /// the resource exists, nor its current `ETag`.
    ///
    /// `check` gets the request head and answers `Ok(())` to go on, or the response to
    /// send instead (served as it is, without validators; the store is not touched). It
    /// runs for every read and write the layer versions. Authentication that applies to
    /// whole routes is better placed outside the layer (an auth middleware around it);
    /// this hook is for what depends on the resource: "is this item the caller's", "does
    /// this item exist".
    ///
    /// ```
    /// use axum::{body::Bytes, http::{Response, StatusCode}, routing::get, Router};
    /// use tower_precondition::{MemoryStore, PreconditionLayer};
    ///
    /// let layer = PreconditionLayer::new(MemoryStore::new()).authorize(|parts| {
    ///     // Decide from what the request names; clone what the future needs.
    ///     let allowed = parts.headers.get("x-user").is_some_and(|u| u == "alice");
    ///     async move {
    ///         if allowed {
    ///             Ok(())
    ///         } else {
    ///             let mut refusal = Response::new(Bytes::from_static(b"not found"));
    ///             *refusal.status_mut() = StatusCode::NOT_FOUND;
    ///             Err(refusal)
    ///         }
    ///     }
    /// });
    /// let app: Router = Router::new()
    ///     .route("/items/{id}", get(|| async { "item" }))
    ///     .route_layer(layer);
    /// # let _ = app;
    /// ```
    pub fn authorize<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn(&Parts) -> Fut + Send + Sync + 'static,
        Fut:
            std::future::Future<Output = Result<(), http::Response<bytes::Bytes>>> + Send + 'static,
    {
        self.config.access = Some(access_fn(check));
        self
    }

    /// The transactional layer's reads share its access check.
    #[cfg(feature = "postgres")]
    pub(crate) fn with_access(mut self, access: Option<Arc<AccessFn>>) -> Self {
        self.config.access = access;
        self
    }

    /// How many entries the layer remembers, to start a write's compare-and-set from
    /// the entry it last saw instead of loading it first (`0`: load every time).
    ///
    /// A write to a store across a connection then takes two round trips (reserve,
    /// settle) instead of three. The remembered entry is only ever a guess: a right
    /// guess is confirmed by the compare-and-set applying, a wrong one costs one
    /// mismatch, which answers with the entry actually stored, and a guess that would
    /// refuse the write is never acted on (the layer loads and decides against the
    /// store). No `412` or `409` is ever answered from memory, so the setting changes
    /// round trips, never an answer.
    ///
    /// Default 16 384 entries (entries over 512 bytes of key and tag are not kept, so
    /// at most about 11 MiB), none for a store that
    /// [runs in the process](crate::store::AtomicVersionStore::is_in_process).
    ///
    /// ```
    /// use tower_precondition::{MemoryStore, PreconditionLayer};
    ///
    /// let layer = PreconditionLayer::new(MemoryStore::new()).entry_cache(0);
    /// # let _ = layer;
    /// ```
    pub fn entry_cache(mut self, capacity: usize) -> Self {
        self.config.entry_cache = Arc::new(EntryCache::new(capacity));
        self
    }

    /// The `Retry-After` sent with `409` and `503`, in whole seconds rounded up (at
    /// least 1). At most 365 days.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.config.retry_after = delay.min(MAX_DURATION);
        self
    }
}

/// What the protocol's own tests (and its model check) drive it with.
#[cfg(test)]
impl PreconditionLayer {
    pub(crate) fn into_config(self) -> Config {
        self.config
    }
}

impl<S> Layer<S> for PreconditionLayer {
    type Service = PreconditionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PreconditionService::new(inner, Arc::new(self.config.clone()))
    }
}
