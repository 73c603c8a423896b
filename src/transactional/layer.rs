//! [`PgTransactionalLayer`] and its builder.

use std::{fmt, sync::Arc, time::Duration};

use http::{request::Parts, Method};
use tower_layer::Layer;

use super::service::PgTransactionalService;
use crate::{
    admission::{self, KeyFn, PreconditionPolicy},
    layer::MAX_DURATION,
    store::PostgresStore,
    PreconditionLayer,
};

/// The most Postgres accepts for `statement_timeout` / `lock_timeout` (`i32::MAX` ms).
const MAX_PG_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

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
    pub fn new(store: impl Into<PostgresStore>) -> Self {
        Self {
            config: TxConfig {
                store: store.into(),
                key: admission::path_key(),
                write_methods: vec![Method::PUT, Method::PATCH, Method::DELETE],
                require_precondition: PreconditionPolicy::Optional,
                handler_timeout: Duration::from_secs(25),
                statement_timeout: Duration::from_secs(10),
                lock_timeout: Duration::from_secs(5),
                store_timeout: Duration::from_secs(2),
                short_circuit_reads: false,
                retry_after: Duration::from_secs(1),
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
        self.config.key = Arc::new(key);
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

    /// The read side: the store-mode layer over the same store, with our key and
    /// read settings. It never sees a write.
    fn reads(&self) -> PreconditionLayer {
        let key = self.config.key.clone();
        PreconditionLayer::new(self.config.store.clone())
            .key_fn(move |parts| key(parts))
            .write_methods([])
            .store_timeout(self.config.store_timeout)
            .short_circuit_reads(self.config.short_circuit_reads)
            .retry_after(self.config.retry_after)
    }
}

impl<S> Layer<S> for PgTransactionalLayer {
    type Service = PgTransactionalService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let mut config = self.config.clone();
        config.begin_sql = config.begin_sql();
        PgTransactionalService::new(inner, Arc::new(config), self.reads())
    }
}
