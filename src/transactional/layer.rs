//! [`PgTransactionalLayer`] and its builder.

use std::{fmt, sync::Arc, time::Duration};

use http::{request::Parts, Method};
use tokio::sync::Semaphore;
use tower_layer::Layer;

use super::service::PgTransactionalService;
use crate::{
    access::{access_fn, AccessFn},
    admission::{self, KeyFn, PreconditionPolicy},
    layer::MAX_DURATION,
    store::{postgres::MAX_PG_TIMEOUT, PostgresStore},
    PreconditionLayer, RequestBodyConfig,
};

/// The configuration shared by every service a layer builds.
#[derive(Clone)]
pub(crate) struct TxConfig {
    pub(crate) store: PostgresStore,
    pub(crate) key: Arc<KeyFn>,
    pub(crate) write_methods: Vec<Method>,
    /// Named for the old `bool`; the service passes it to `admit` as it is.
    pub(crate) require_precondition: PreconditionPolicy,
    pub(crate) handler_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    pub(crate) lock_timeout: Duration,
    pub(crate) store_timeout: Duration,
    pub(crate) short_circuit_reads: bool,
    pub(crate) retry_after: Duration,
    pub(crate) body: RequestBodyConfig,
    pub(crate) access: Option<Arc<AccessFn>>,
    pub(crate) validators_on_412: bool,
    /// Permits for the write transactions open at once; shared by every service the
    /// layer builds (axum's `Router::layer` builds one per route).
    pub(crate) open_writes: Arc<Semaphore>,
    pub(crate) max_open_writes: usize,
    pub(crate) write_queue_timeout: Duration,
    /// `BEGIN` and the `SET LOCAL`s, built from the timeouts by [`Layer::layer`].
    pub(crate) begin_sql: String,
}

impl TxConfig {
    fn begin_sql(&self) -> String {
        let ms = |d: Duration| d.as_millis().clamp(1, i32::MAX as u128);
        // The idle timeout covers a process that hangs with the transaction open:
        // the server ends the session (rolling back) once the handler is surely dead.
        // Saturating: the settings are bounded, but this must not panic if they grow.
        let idle = self
            .handler_timeout
            .saturating_add(self.store_timeout)
            .saturating_add(Duration::from_secs(5));
        // One `set_config` statement, not three `SET LOCAL`s: each utility statement
        // costs a round of parsing and GUC work on every write (about 20% of the
        // server's time per write in our measurements).
        format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; \
             SELECT set_config('statement_timeout', '{}', true), \
             set_config('lock_timeout', '{}', true), \
             set_config('idle_in_transaction_session_timeout', '{}', true)",
            ms(self.statement_timeout),
            ms(self.lock_timeout),
            ms(idle)
        )
    }
}

/// A [`Layer`] for the [transactional mode](super): each write runs in one Postgres
/// transaction that holds the resource's version row, is handed to the handler as a
/// [`PgTransaction`](super::PgTransaction), and commits the data and the new version
/// together.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use tower_precondition::{store::PostgresStore, PgTransactionalLayer};
///
/// // The app's pool (connections are opened lazily, on first use).
/// let mut config = deadpool_postgres::Config::new();
/// config.url = Some("postgres://postgres@127.0.0.1:5432/app".into());
/// let pool = config
///     .create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)
///     .unwrap();
/// let layer = PgTransactionalLayer::new(PostgresStore::new(pool).table("app.versions").unwrap())
///     .require_precondition(true)
///     .lock_timeout(Duration::from_secs(2));
/// # let _ = layer;
/// # }
/// ```
#[derive(Clone)]
#[must_use]
pub struct PgTransactionalLayer {
    config: TxConfig,
}

impl fmt::Debug for PgTransactionalLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTransactionalLayer")
            .field("store", &self.config.store)
            .field("write_methods", &self.config.write_methods)
            .field("precondition_policy", &self.config.require_precondition)
            .field("handler_timeout", &self.config.handler_timeout)
            .field("statement_timeout", &self.config.statement_timeout)
            .field("lock_timeout", &self.config.lock_timeout)
            .field("store_timeout", &self.config.store_timeout)
            .field("short_circuit_reads", &self.config.short_circuit_reads)
            .field("retry_after", &self.config.retry_after)
            .field("request_body", &self.config.body)
            .field("max_open_writes", &self.config.max_open_writes)
            .field("write_queue_timeout", &self.config.write_queue_timeout)
            .finish_non_exhaustive()
    }
}

impl PgTransactionalLayer {
    /// A layer over a [`PostgresStore`] (its pool and its table), or over a
    /// [`deadpool_postgres::Pool`] with the default table, with the defaults:
    ///
    /// | setting | default |
    /// | --- | --- |
    /// | resource key | the request path |
    /// | write methods | `PUT`, `PATCH`, `DELETE` |
    /// | precondition policy on writes | [`PreconditionPolicy::Optional`] |
    /// | handler deadline | 25 s |
    /// | `statement_timeout` in the transaction | 10 s |
    /// | `lock_timeout` (waiting for a concurrent write of the same resource) | 5 s |
    /// | store timeout (getting a connection; one read's statement) | 2 s |
    /// | matching reads answered `304` without running the handler | yes |
    /// | `Retry-After` on `409` / `503` | 1 s |
    /// | request body | buffered before `BEGIN`: 2 MiB, read within 10 s ([`request_body`](Self::request_body)) |
    /// | write transactions open at once | 3/4 of the pool's size ([`max_open_writes`](Self::max_open_writes)) |
    /// | wait for one of those | 1 s, then `503` ([`write_queue_timeout`](Self::write_queue_timeout)) |
    pub fn new(store: impl Into<PostgresStore>) -> Self {
        let store = store.into();
        let max_open_writes = default_open_writes(store.pool().status().max_size);
        Self {
            config: TxConfig {
                store,
                key: admission::path_key(),
                write_methods: vec![Method::PUT, Method::PATCH, Method::DELETE],
                require_precondition: PreconditionPolicy::Optional,
                handler_timeout: Duration::from_secs(25),
                statement_timeout: Duration::from_secs(10),
                lock_timeout: Duration::from_secs(5),
                store_timeout: Duration::from_secs(2),
                short_circuit_reads: false,
                retry_after: Duration::from_secs(1),
                body: RequestBodyConfig::new(),
                access: None,
                validators_on_412: true,
                open_writes: Arc::new(Semaphore::new(max_open_writes)),
                max_open_writes,
                write_queue_timeout: Duration::from_secs(1),
                begin_sql: String::new(),
            },
        }
    }

    /// How the resource key is derived from a request; `None` lets the request through
    /// untouched. The default is the [canonical](crate::key::canonical_path) request
    /// path. **One resource must map to exactly one key**; see
    /// [`PreconditionLayer::key_fn`] and the [`key`](crate::key) module.
    pub fn key_fn<F>(mut self, key: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config.key = admission::custom_key(key);
        self
    }

    /// Which methods are writes (run in a transaction). Default `PUT`, `PATCH`,
    /// `DELETE`. `GET` and `HEAD` are always reads and are ignored here; other methods
    /// not listed pass through untouched.
    pub fn write_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.write_methods = admission::write_methods(methods);
        self
    }

    /// Shorthand: `true` sets [`PreconditionPolicy::Required`], `false`
    /// [`PreconditionPolicy::Optional`] (the default); it replaces any policy set
    /// before. See [`PreconditionLayer::require_precondition`].
    pub fn require_precondition(self, require: bool) -> Self {
        self.precondition_policy(require.into())
    }

    /// Which preconditions a write must carry; see [`PreconditionPolicy`]. Default
    /// [`PreconditionPolicy::Optional`].
    pub fn precondition_policy(mut self, policy: PreconditionPolicy) -> Self {
        self.config.require_precondition = policy;
        self
    }

    /// The handler's deadline on a write. A handler cut off by it is dropped, its
    /// transaction rolled back, and the client gets `503` (nothing changed).
    /// Clamped to between 1 ms and 365 days.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.config.handler_timeout = timeout.clamp(Duration::from_millis(1), MAX_DURATION);
        self
    }

    /// `statement_timeout` for every statement of a write's transaction (the layer's
    /// and the handler's). A statement that runs longer fails, and the write rolls back.
    /// Clamped to between 1 ms and `i32::MAX` ms (about 24.8 days, the most Postgres
    /// accepts).
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.config.statement_timeout = timeout.clamp(Duration::from_millis(1), MAX_PG_TIMEOUT);
        self
    }

    /// How long a write waits for the version row while a concurrent write of the same
    /// resource holds it; past that it gets `409` with `Retry-After`. Clamped to
    /// between 1 ms and `i32::MAX` ms (about 24.8 days, the most Postgres accepts).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.config.lock_timeout = timeout.clamp(Duration::from_millis(1), MAX_PG_TIMEOUT);
        self
    }

    /// How long getting a pooled connection (and a read's version lookup) may take
    /// before it counts as a failure (`503` on writes). At most 365 days.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config.store_timeout = timeout.min(MAX_DURATION);
        self
    }

    /// Whether a read whose `If-None-Match` / `If-Modified-Since` matches is answered
    /// `304` without running the handler (the default). See
    /// [`PreconditionLayer::short_circuit_reads`].
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

    /// The application's own access decision, made before any precondition is
    /// answered (and, for a write, before the transaction begins). See
    /// [`PreconditionLayer::authorize`].
    pub fn authorize<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn(&Parts) -> Fut + Send + Sync + 'static,
        Fut:
            std::future::Future<Output = Result<(), http::Response<bytes::Bytes>>> + Send + 'static,
    {
        self.config.access = Some(access_fn(check));
        self
    }

    /// Whether a `412` carries the current `ETag` and `Last-Modified` (the default).
    /// See [`PreconditionLayer::validators_on_412`].
    pub fn validators_on_412(mut self, include: bool) -> Self {
        self.config.validators_on_412 = include;
        self
    }

    /// How a write's request body is read: buffered before the transaction begins
    /// (the default: 2 MiB limit, 10 s read timeout), or streamed into the handler.
    /// See [`request_body`](crate::request_body).
    ///
    /// Buffered, a client that stalls mid-upload holds nothing but its own socket:
    /// no connection, no transaction, no row lock. It gets `408` after the read
    /// timeout; a body over the limit gets `413` (up front when `Content-Length`
    /// says so); a body that fails or ends short of its `Content-Length` gets `400`.
    /// No transaction is begun for any of them, and the handler never runs.
    ///
    /// [Streaming](RequestBodyConfig::streaming), the transaction is begun (the row
    /// locked, a pooled connection taken) before the first byte, and the handler
    /// reads the body inside it: a client that stalls holds the row lock (every other
    /// writer of that resource waits `lock_timeout`, then gets `409`), a connection
    /// and one of the [`max_open_writes`](Self::max_open_writes) permits until the
    /// handler's deadline. Use it for bodies too large to buffer, behind a proxy that
    /// buffers uploads.
    pub fn request_body(mut self, config: RequestBodyConfig) -> Self {
        self.config.body = config;
        self
    }

    /// The most write transactions open at once (each holds a pooled connection
    /// until it commits or rolls back). A write that finds them all taken waits up
    /// to [`write_queue_timeout`](Self::write_queue_timeout) for one to finish,
    /// then gets `503` with `Retry-After`; it never waits forever.
    ///
    /// The default is three quarters of the pool's size, leaving a quarter (at least
    /// one connection when the pool has two or more) for reads, which look up the
    /// version on their own connection, and for the app's other queries: slow writes
    /// can then never starve them. `0` counts as `1`; values past what a Tokio
    /// semaphore holds saturate. The limit is shared by every service this layer
    /// builds (every route of an axum `Router`); set it before
    /// [`Layer::layer`](tower_layer::Layer::layer).
    pub fn max_open_writes(mut self, max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        self.config.max_open_writes = max;
        self.config.open_writes = Arc::new(Semaphore::new(max));
        self
    }

    /// How long a write waits for one of the
    /// [`max_open_writes`](Self::max_open_writes) permits before it gets `503`.
    /// Default 1 s.
    pub fn write_queue_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_queue_timeout = timeout;
        self
    }

    /// The read side: the store-mode layer over the same store, with our key and
    /// read settings. It never sees a write.
    fn reads(&self) -> PreconditionLayer {
        let key = self.config.key.clone();
        PreconditionLayer::new(self.config.store.clone())
            .with_key(key)
            .write_methods([])
            .store_timeout(self.config.store_timeout)
            .short_circuit_reads(self.config.short_circuit_reads)
            .retry_after(self.config.retry_after)
            .validators_on_412(self.config.validators_on_412)
            .with_access(self.config.access.clone())
    }
}

/// Three quarters of the pool, leaving at least one connection for reads when the pool
/// has two or more.
fn default_open_writes(pool_size: usize) -> usize {
    pool_size
        .saturating_sub((pool_size / 4).max(1))
        .clamp(1, Semaphore::MAX_PERMITS)
}

impl<S> Layer<S> for PgTransactionalLayer {
    type Service = PgTransactionalService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let mut config = self.config.clone();
        config.begin_sql = config.begin_sql();
        PgTransactionalService::new(inner, Arc::new(config), self.reads())
    }
}
