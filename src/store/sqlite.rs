//! The SQLite backend: versions kept in a file, shared by every process on one host,
//! with no server.
//!
//! [`SqliteStore`] keeps each resource's [`Entry`] in one row of a versions table in an
//! SQLite database file. The versions survive a restart, and several processes that
//! open the same file share them: one compare-and-set in one process is atomic with
//! respect to every other call in every process.
//!
//! ```
//! use tower_precondition::{store::SqliteStore, PreconditionLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("tp-sqlite-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("module.db");
//! let store = SqliteStore::open(&path).await?; // created if missing, in WAL mode
//! store.migrate().await?;
//! let layer = PreconditionLayer::new(store);
//! # let _ = layer;
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```
//!
//! # Connections and locking
//!
//! [`open`](SqliteStore::open) and [`connect`](SqliteStore::connect) open the file
//! (creating it if it is missing) in [WAL mode](https://www.sqlite.org/wal.html), so that
//! readers never wait for the writer, with `synchronous = FULL` (a committed version
//! survives a power cut as well as a crash: a version that came back older after one
//! would let a stale `If-Match` pass again), and a pool of connections. WAL needs every
//! process that opens the file to run on the same host (it shares memory through the
//! `-shm` file): do not put the file on a network file system.
//!
//! SQLite has one writer at a time per file. A connection that wants to write while
//! another holds the write lock waits for it, up to the connection's `busy_timeout`
//! ([`DEFAULT_BUSY_TIMEOUT`], 1.5 s, unless
//! [`connect_with`](SqliteStore::connect_with) is given another), then fails with
//! `SQLITE_BUSY`: the store answers a [timeout](super::StoreErrorKind::Timeout), and the
//! layer answers `503` with `Retry-After`. The default is below the layer's own store
//! timeout (2 s), so the store usually gives up first (a call the layer abandons anyway
//! is rolled back, see below). SQLite's busy handler is not fair (it polls with growing
//! sleeps, and one waiter can lose every time), so the writes of one store first queue
//! in order within the process, up to `busy_timeout` too: only one connection per
//! process contends for the file's lock. Any other failure (I/O, a full disk, a file
//! that is not a database, a missing table) is an
//! [unavailable](super::StoreErrorKind::Unavailable) store: `503` too.
//!
//! # Why each step is atomic
//!
//! Every compare-and-set that writes is one transaction opened with `BEGIN IMMEDIATE`,
//! which takes the file's write lock up front (waiting up to `busy_timeout` for it). In
//! it runs **one conditional statement** that compares the whole stored entry with
//! `expected` (every column, with SQLite's null-safe `IS` for the nullable ones) and
//! writes `new` only if it matches:
//!
//! * **create** (`expected` absent):
//!   `INSERT INTO t VALUES ($key, <new>) ON CONFLICT (resource_key) DO NOTHING RETURNING 1`;
//! * **replace**: `UPDATE t SET <new> WHERE resource_key = $key AND <row = expected> RETURNING 1`;
//! * **remove** (`new` absent): `DELETE FROM t WHERE resource_key = $key AND <row = expected> RETURNING 1`.
//!
//! A row back means the write applied. No row back means the stored entry was not
//! `expected`; the entry is then read with a `SELECT` in the same transaction: the write
//! lock is still held, so no other connection or process can have changed it since the
//! comparison, and the entry reported on a mismatch is exactly the one that made it
//! fail. Every answer goes through [`CasOutcome::mismatch_or_replay`], so a
//! compare-and-set that finds the entry already equal to `new` (a replay) is applied.
//!
//! A call whose caller gives up (the layer's store timeout, a dropped request) before
//! the transaction commits is rolled back on its connection, so it never lands later.
//! Removing an absent entry (`expected` and `new` both absent) writes nothing: a plain
//! `SELECT`, atomic on its own.
//!
//! # The clock
//!
//! Leases are stamped and judged by [`clock_millis`](AtomicVersionStore::clock_millis),
//! and every process on the file must read the same clock, which must never go back.
//! There is no server whose clock the processes could share, so the store uses the
//! host's wall clock (the same for every process on the host, and WAL already requires
//! them to be on one host), corrected by an offset and held by a high-water mark, both
//! **persisted in the file**. Each reading is one statement under the write lock:
//!
//! ```sql
//! INSERT INTO tower_precondition_clock (id, millis, offset_ms) VALUES (0, $wall_ms, 0)
//! ON CONFLICT (id) DO UPDATE SET
//!     offset_ms = offset_ms + max(0, millis - ($wall_ms + offset_ms)),
//!     millis    = max(millis, $wall_ms + offset_ms)
//! RETURNING millis
//! ```
//!
//! (the right-hand sides read the row as it was before the update). A reading is
//! `wall + offset`, never less than the reading before it, by any process, across
//! processes and restarts. When the wall clock has stepped back, the first reading
//! after the step finds `wall + offset` below the mark: it answers the mark and raises
//! the offset by the difference, so the readings after it advance again at the wall
//! clock's rate from there, instead of standing still until the wall clock has caught
//! up. That matters because the layer extrapolates the store's clock between readings
//! at the rate of the process's own monotonic clock (and keeps an older sample whose
//! extrapolation is ahead of a new reading): a clock that stood still would let a
//! process that sampled it before the step run ahead of one that sampled it after, by
//! up to the size of the step. With the offset, the store's clock falls behind real
//! time only by the time between the last reading before the step and the first one
//! after (the layer reads about once a second per process). Leases then last longer
//! for a process that sampled after the step, and up to that gap shorter for one whose
//! sample predates it.
//!
//! A wall clock that jumps *forward* makes live leases look older, as it would for the
//! Postgres or Redis stores (whose clocks are their servers' wall clocks): a jump cannot
//! be told apart from a time with no readings. Keep the host's time synchronised by
//! slewing, not stepping.
//!
//! The local monotonic clock would be immune to steps, but it is not sound here: the
//! standard library's `Instant` is opaque and has no origin that another process can
//! read, and the monotonic clock restarts at every boot while the leases it stamped stay
//! in the file: after a reboot they would be judged by a clock that went back by the
//! previous uptime.
//!
//! The layer reads the clock about once a second per process, so its writes are few.
//!
//! # Fencing the handler's write
//!
//! sqlx runs SQLite statements on a worker thread: a statement a handler has sent runs
//! to its end even when the handler is dropped (a client gone, the deadline passed),
//! and so can commit after the layer settled the write, over a newer write. When the
//! items live in the same file, write them in a `BEGIN IMMEDIATE` transaction that
//! first calls [`check_fence`](SqliteStore::check_fence): that write then commits only
//! while its lease is held, whatever the clocks of the processes on the file say.
//!
//! # The tables
//!
//! [`migrate`](SqliteStore::migrate) creates them if they do not exist (idempotent, and
//! safe when several processes start at once: it runs under `BEGIN IMMEDIATE`, so
//! concurrent migrations take turns). To manage them with your own migrations instead,
//! use [`migration_sql`](SqliteStore::migration_sql):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS tower_precondition_versions (
//!     resource_key            TEXT PRIMARY KEY NOT NULL,
//!     -- the committed version; all three NULL while the first write is in flight
//!     etag                    TEXT,     -- the opaque tag, without quotes
//!     last_modified           INTEGER,  -- seconds since the Unix epoch
//!     last_modified_ambiguous INTEGER,  -- 1: another version was committed in that second
//!     -- the lease of a write in flight
//!     lease_token             TEXT,     -- 32 lowercase hex digits
//!     lease_expires_at_ms     INTEGER,  -- ms on the store's clock; 0: released
//!     -- 1: a read, not a write, gave the version
//!     seeded                  INTEGER NOT NULL DEFAULT 0 CHECK (seeded IN (0, 1)),
//!     CHECK ((etag IS NULL) = (last_modified IS NULL)
//!            AND (etag IS NULL) = (last_modified_ambiguous IS NULL)),
//!     CHECK ((lease_token IS NULL) = (lease_expires_at_ms IS NULL)),
//!     CHECK (etag IS NOT NULL OR lease_token IS NOT NULL)
//! ) STRICT;
//! CREATE TABLE IF NOT EXISTS tower_precondition_clock (
//!     id        INTEGER PRIMARY KEY,
//!     millis    INTEGER NOT NULL,           -- the latest reading (the high-water mark)
//!     offset_ms INTEGER NOT NULL DEFAULT 0  -- added to the wall clock
//! ) STRICT;
//! ```
//!
//! The `u64` times are stored in `INTEGER` by their two's-complement bits, so every value
//! round-trips. Keys are compared byte for byte (SQLite's `BINARY` collation).

use std::{
    fmt,
    path::Path,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sqlx::{
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
        SqliteSynchronous,
    },
    Row,
};

use super::{
    AtomicVersionStore, CasOutcome, Entry, Fence, FenceError, Lease, LeaseToken, StoreError,
    Version,
};
use crate::etag::EntityTag;

/// The versions table.
pub const VERSIONS_TABLE: &str = "tower_precondition_versions";

/// The table that keeps the clock's high-water mark.
pub const CLOCK_TABLE: &str = "tower_precondition_clock";

/// How long a connection waits for another one's write lock unless
/// [`connect_with`](SqliteStore::connect_with) is given another: a margin below
/// the layer's default 2 s store timeout, so that the store has given up (and answered
/// a timeout, `503`) before the layer would.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_millis(1500);

/// How many connections [`open`](SqliteStore::open) and
/// [`connect`](SqliteStore::connect) pool (writes take turns anyway; reads run in
/// parallel in WAL mode).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// The columns of an entry, in order.
const ENTRY_COLUMNS: &str =
    "etag, last_modified, last_modified_ambiguous, lease_token, lease_expires_at_ms, seeded";

/// The comparison of the stored row with `expected` (parameters `?2` to `?7`).
const MATCHES_EXPECTED: &str = "etag IS ?2 AND last_modified IS ?3 \
     AND last_modified_ambiguous IS ?4 AND lease_token IS ?5 \
     AND lease_expires_at_ms IS ?6 AND seeded = ?7";

/// An [`AtomicVersionStore`] in an SQLite file, shared by every process that opens it.
///
/// Cheap to clone (the pool is shared). See the [module docs](self) for the tables, the
/// clock, and why each step is atomic.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    sql: Arc<Sql>,
    /// One write transaction at a time from this process (see [`Self::write_turn`]).
    write_gate: Arc<tokio::sync::Mutex<()>>,
    busy_timeout: Duration,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("connections", &self.pool.size())
            .field("idle", &self.pool.num_idle())
            .field("busy_timeout", &self.busy_timeout)
            .finish()
    }
}

impl SqliteStore {
    /// The connection options [`connect`](Self::connect) uses for `url`
    /// (`sqlite://path/to/file.db`, `sqlite:file.db`, `sqlite::memory:`): create the file
    /// if it is missing, WAL mode, `synchronous = FULL`. Change any of them and pass the
    /// result to [`connect_with`](Self::connect_with), with a `busy_timeout`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower_precondition::store::SqliteStore;
    ///
    /// let path = std::env::temp_dir().join(format!("tp-options-doc-{}.db", std::process::id()));
    /// let url = format!("sqlite://{}", path.display());
    /// let options = SqliteStore::connect_options(&url)?;
    /// assert_eq!(options.get_filename(), path.as_path());
    /// let store = SqliteStore::connect_with(options, Duration::from_millis(500)).await?;
    /// store.pool().close().await;
    /// # for suffix in ["", "-wal", "-shm"] {
    /// #     std::fs::remove_file(format!("{}{suffix}", path.display())).ok();
    /// # }
    /// # Ok(())
    /// # }
    /// ```
    pub fn connect_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::unavailable("invalid SQLite URL").with_source(e))?;
        Ok(with_defaults(options))
    }

    /// Opens (or creates) the database at `url` with the
    /// [default options](Self::connect_options) and a pool of up to
    /// [`DEFAULT_MAX_CONNECTIONS`] connections.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_precondition::store::SqliteStore;
    ///
    /// // One in-memory database shared by the pool's connections (gone at exit).
    /// let store = SqliteStore::connect("sqlite::memory:").await?;
    /// store.migrate().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(Self::connect_options(url)?, DEFAULT_BUSY_TIMEOUT).await
    }

    /// Opens (or creates) the database file at `path` with the
    /// [default options](Self::connect_options).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_precondition::store::{AtomicVersionStore, SqliteStore};
    ///
    /// let path = std::env::temp_dir().join(format!("tp-open-doc-{}.db", std::process::id()));
    /// let store = SqliteStore::open(&path).await?;
    /// store.migrate().await?;
    /// assert_eq!(store.load("/items/1").await?, None);
    /// store.pool().close().await;
    /// # for suffix in ["", "-wal", "-shm"] {
    /// #     std::fs::remove_file(format!("{}{suffix}", path.display())).ok();
    /// # }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let options = with_defaults(SqliteConnectOptions::new().filename(path));
        Self::connect_with(options, DEFAULT_BUSY_TIMEOUT).await
    }

    /// Opens the database with `options` (start from
    /// [`connect_options`](Self::connect_options) to keep the defaults) and
    /// `busy_timeout`: how long a connection waits for another one's write lock
    /// before the call fails as a [timeout](super::StoreErrorKind::Timeout) (keep it
    /// below the layer's [`store_timeout`](crate::PreconditionLayer::store_timeout);
    /// [`DEFAULT_BUSY_TIMEOUT`] is). The pool holds up to [`DEFAULT_MAX_CONNECTIONS`]
    /// connections and waits up to `busy_timeout` for a free one. Checks that a
    /// connection can be opened.
    pub async fn connect_with(
        options: SqliteConnectOptions,
        busy_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = options.busy_timeout(busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(DEFAULT_MAX_CONNECTIONS)
            .acquire_timeout(busy_timeout.max(Duration::from_millis(100)))
            // A local file does not drop connections the way a network does.
            .test_before_acquire(false)
            .connect_lazy_with(options);
        // Fail fast on a file that cannot be opened. Switching a new file to WAL needs
        // an exclusive lock that `busy_timeout` does not wait for: several processes
        // creating the file at once may see SQLITE_BUSY here, so retry a while.
        let deadline = Instant::now() + busy_timeout.max(Duration::from_secs(5));
        loop {
            match pool.acquire().await {
                Ok(connection) => {
                    drop(connection);
                    break;
                }
                Err(error) if is_busy(&error) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => return Err(sqlite_error("opening the database", error)),
            }
        }
        let mut store = Self::from_pool(pool);
        store.busy_timeout = busy_timeout;
        Ok(store)
    }

    /// A store on the app's own pool. Its connections should have a `busy_timeout`
    /// below the layer's store timeout (sqlx's default is 5 s; see
    /// [`DEFAULT_BUSY_TIMEOUT`]), and the file should be in WAL mode so that reads do
    /// not wait for writes. A write waits up to [`DEFAULT_BUSY_TIMEOUT`] for its turn
    /// among this store's writes (see [Connections and locking](self#connections-and-locking)).
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self {
            pool,
            sql: Arc::new(Sql::new()),
            write_gate: Arc::new(tokio::sync::Mutex::new(())),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
        }
    }

    /// Waits (up to `busy_timeout`) for this process's turn to write.
    ///
    /// SQLite's busy handler is not fair: a connection waiting for the write lock polls
    /// it with growing sleeps, and under contention one can lose every time until its
    /// `busy_timeout` runs out. This process's writes therefore queue in order (a fair
    /// async mutex), so that only one of its connections at a time contends for the
    /// file's lock with the other processes'.
    async fn write_turn(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, StoreError> {
        tokio::time::timeout(self.busy_timeout, self.write_gate.lock())
            .await
            .map_err(|_| StoreError::timeout("waiting for this process's turn to write"))
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The statements that create the store's tables (`CREATE TABLE IF NOT EXISTS`),
    /// for your own migrations. Idempotent.
    pub fn migration_sql(&self) -> &str {
        &self.sql.migration
    }

    /// Creates the tables if they do not exist ([`migration_sql`](Self::migration_sql)).
    /// Idempotent, and safe to call from several processes at once: it runs under
    /// `BEGIN IMMEDIATE`, so concurrent migrations take turns. When both tables exist
    /// already it only reads, and takes no write lock: a process that restarts while
    /// others keep the file busy with writes still starts.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let context = "creating the versions table";
        let existing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (?1, ?2)",
        )
        .bind(VERSIONS_TABLE)
        .bind(CLOCK_TABLE)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| sqlite_error(context, e))?;
        if existing == 2 {
            return Ok(());
        }
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| sqlite_error(context, e))?;
        sqlx::raw_sql(&self.sql.migration)
            .execute(&mut *tx)
            .await
            .map_err(|e| sqlite_error(context, e))?;
        tx.commit().await.map_err(|e| sqlite_error(context, e))
    }

    /// Checks, inside the handler's own transaction `tx`, that the write `fence`
    /// names still holds its lease (see [`Fence`]): write the data in
    /// `tx` after this returns `Ok`, and commit. If the lease is gone (the write was
    /// abandoned or cut off at its deadline and settled meanwhile, or another process
    /// took it over), `Err(FenceError::LeaseLost)`: roll back and answer `503`.
    ///
    /// Begin `tx` with `BEGIN IMMEDIATE` ([`SqlitePool::begin_with`]): it takes the
    /// file's write lock first, so nothing can replace the lease between this check and
    /// the commit. (In a deferred transaction the check is as safe, since SQLite then
    /// refuses the write of a transaction whose snapshot is no longer the newest, but
    /// it fails with `SQLITE_BUSY` instead of waiting.) The check needs no clock: a
    /// write that commits while its lease is still in the row comes before any
    /// takeover, which treats its outcome as unknown and gives the resource a fresh
    /// version.
    ///
    /// ```
    /// use axum::{extract::State, http::StatusCode, Extension};
    /// use tower_precondition::{store::SqliteStore, Reservation};
    ///
    /// async fn put_item(
    ///     State(store): State<SqliteStore>,
    ///     Extension(reservation): Extension<Reservation>,
    ///     body: String,
    /// ) -> StatusCode {
    ///     let written = async {
    ///         let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await?;
    ///         store.check_fence(&mut tx, &reservation.fence()).await?;
    ///         sqlx::query("INSERT INTO items (id, body) VALUES (?1, ?2) \
    ///                      ON CONFLICT (id) DO UPDATE SET body = excluded.body")
    ///             .bind(reservation.key())
    ///             .bind(&body)
    ///             .execute(&mut *tx)
    ///             .await?;
    ///         tx.commit().await?;
    ///         Ok::<_, Box<dyn std::error::Error>>(())
    ///     };
    ///     match written.await {
    ///         Ok(()) => StatusCode::NO_CONTENT,
    ///         Err(_) => StatusCode::SERVICE_UNAVAILABLE, // rolled back on drop
    ///     }
    /// }
    /// # let _ = put_item;
    /// ```
    pub async fn check_fence(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        fence: &Fence,
    ) -> Result<(), FenceError> {
        let held = sqlx::query(&self.sql.fence)
            .bind(fence.key())
            .bind(fence.token().to_string())
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| sqlite_error("checking the lease", e))?;
        fence.judge(held.is_some())
    }

    /// Runs `statement` (bound to `key`, then `expected`, then `new`) in a
    /// `BEGIN IMMEDIATE` transaction; if it returns no row, reads the entry it found
    /// under the same write lock.
    async fn conditional_write(
        &self,
        statement: &str,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        let context = "compare-and-set";
        let _turn = self.write_turn().await?;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| sqlite_error(context, e))?;
        let mut query = sqlx::query(statement).bind(key);
        if let Some(expected) = expected {
            query = Columns::of(Some(expected)).bind(query);
        }
        if let Some(new) = new {
            query = Columns::of(Some(new)).bind(query);
        }
        let applied = query
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| sqlite_error(context, e))?;
        let outcome = if applied.is_some() {
            CasOutcome::Applied
        } else {
            let row = sqlx::query(&self.sql.load)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| sqlite_error(context, e))?;
            let current = match row {
                Some(row) => entry_from_row(&row)?,
                None => None,
            };
            CasOutcome::mismatch_or_replay(current, new)
        };
        tx.commit().await.map_err(|e| sqlite_error(context, e))?;
        Ok(outcome)
    }
}

fn with_defaults(options: SqliteConnectOptions) -> SqliteConnectOptions {
    options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
}

#[async_trait::async_trait]
impl AtomicVersionStore for SqliteStore {
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let row = sqlx::query(&self.sql.load)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| sqlite_error("loading an entry", e))?;
        match row {
            Some(row) => entry_from_row(&row),
            None => Ok(None),
        }
    }

    async fn clock_millis(&self) -> Result<u64, StoreError> {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .clamp(1, i64::MAX as u64);
        let _turn = self.write_turn().await?;
        let millis: i64 = sqlx::query_scalar(&self.sql.clock)
            .bind(u64_to_integer(wall))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| sqlite_error("reading the clock", e))?;
        u64::try_from(millis)
            .ok()
            .filter(|&m| m > 0)
            .ok_or_else(|| StoreError::corrupt("the stored clock is not a positive time"))
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        match (expected, new) {
            (None, None) => {
                let current = self.load(key).await?;
                Ok(CasOutcome::mismatch_or_replay(current, None))
            }
            (None, Some(_)) => {
                self.conditional_write(&self.sql.create, key, None, new)
                    .await
            }
            (Some(_), Some(_)) => {
                self.conditional_write(&self.sql.replace, key, expected, new)
                    .await
            }
            (Some(_), None) => {
                self.conditional_write(&self.sql.remove, key, expected, None)
                    .await
            }
        }
    }
}

impl From<SqlitePool> for SqliteStore {
    /// [`SqliteStore::from_pool`].
    fn from(pool: SqlitePool) -> Self {
        Self::from_pool(pool)
    }
}

/// The statements, built once.
#[derive(Debug)]
struct Sql {
    migration: String,
    load: String,
    clock: String,
    create: String,
    replace: String,
    remove: String,
    fence: String,
}

impl Sql {
    fn new() -> Self {
        let t = VERSIONS_TABLE;
        let c = CLOCK_TABLE;
        Self {
            migration: format!(
                "CREATE TABLE IF NOT EXISTS {t} (\n    \
                 resource_key TEXT PRIMARY KEY NOT NULL,\n    \
                 etag TEXT,\n    \
                 last_modified INTEGER,\n    \
                 last_modified_ambiguous INTEGER,\n    \
                 lease_token TEXT,\n    \
                 lease_expires_at_ms INTEGER,\n    \
                 seeded INTEGER NOT NULL DEFAULT 0 CHECK (seeded IN (0, 1)),\n    \
                 CHECK ((etag IS NULL) = (last_modified IS NULL) \
                 AND (etag IS NULL) = (last_modified_ambiguous IS NULL)),\n    \
                 CHECK ((lease_token IS NULL) = (lease_expires_at_ms IS NULL)),\n    \
                 CHECK (etag IS NOT NULL OR lease_token IS NOT NULL)\n\
                 ) STRICT;\n\
                 CREATE TABLE IF NOT EXISTS {c} (\n    \
                 id INTEGER PRIMARY KEY,\n    \
                 millis INTEGER NOT NULL,\n    \
                 offset_ms INTEGER NOT NULL DEFAULT 0\n\
                 ) STRICT;\n"
            ),
            load: format!("SELECT {ENTRY_COLUMNS} FROM {t} WHERE resource_key = ?1"),
            clock: format!(
                "INSERT INTO {c} (id, millis, offset_ms) VALUES (0, ?1, 0) \
                 ON CONFLICT (id) DO UPDATE SET \
                 offset_ms = offset_ms + max(0, millis - (?1 + offset_ms)), \
                 millis = max(millis, ?1 + offset_ms) \
                 RETURNING millis"
            ),
            create: format!(
                "INSERT INTO {t} (resource_key, {ENTRY_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (resource_key) DO NOTHING RETURNING 1"
            ),
            replace: format!(
                "UPDATE {t} SET etag = ?8, last_modified = ?9, last_modified_ambiguous = ?10, \
                 lease_token = ?11, lease_expires_at_ms = ?12, seeded = ?13 \
                 WHERE resource_key = ?1 AND {MATCHES_EXPECTED} RETURNING 1"
            ),
            remove: format!(
                "DELETE FROM {t} WHERE resource_key = ?1 AND {MATCHES_EXPECTED} RETURNING 1"
            ),
            // A release marker (expiry 0) keeps the token but holds nothing.
            fence: format!(
                "SELECT 1 FROM {t} WHERE resource_key = ?1 AND lease_token = ?2 \
                 AND lease_expires_at_ms <> 0"
            ),
        }
    }
}

/// An entry as column values (all `None` for an absent part).
struct Columns {
    etag: Option<String>,
    last_modified: Option<i64>,
    ambiguous: Option<bool>,
    lease_token: Option<String>,
    lease_expires_at: Option<i64>,
    seeded: bool,
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

impl Columns {
    fn of(entry: Option<&Entry>) -> Self {
        let version = entry.and_then(Entry::version);
        let lease = entry.and_then(Entry::lease);
        Self {
            etag: version.map(|v| v.etag().opaque().to_owned()),
            last_modified: version.map(|v| u64_to_integer(v.last_modified_secs())),
            ambiguous: version.map(Version::last_modified_ambiguous),
            lease_token: lease.map(|l| l.token().to_string()),
            lease_expires_at: lease.map(|l| u64_to_integer(l.expires_at_millis())),
            seeded: version.is_some_and(Version::is_seeded),
        }
    }

    /// Binds the six columns, in order, as the next six parameters.
    fn bind<'q>(self, query: Query<'q>) -> Query<'q> {
        query
            .bind(self.etag)
            .bind(self.last_modified)
            .bind(self.ambiguous)
            .bind(self.lease_token)
            .bind(self.lease_expires_at)
            .bind(self.seeded)
    }
}

/// Stores a `u64` in an `INTEGER` by its bits, so that every value round-trips.
#[allow(clippy::cast_possible_wrap)]
fn u64_to_integer(value: u64) -> i64 {
    value as i64
}

#[allow(clippy::cast_sign_loss)]
fn integer_to_u64(value: i64) -> u64 {
    value as u64
}

/// Decodes the six entry columns of `row`.
fn entry_from_row(row: &SqliteRow) -> Result<Option<Entry>, StoreError> {
    fn col<'r, T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(
        row: &'r SqliteRow,
        index: usize,
    ) -> Result<T, StoreError> {
        row.try_get(index)
            .map_err(|e| StoreError::corrupt(format!("bad column {index}")).with_source(e))
    }
    let etag: Option<String> = col(row, 0)?;
    let last_modified: Option<i64> = col(row, 1)?;
    let ambiguous: Option<bool> = col(row, 2)?;
    let token: Option<String> = col(row, 3)?;
    let expires: Option<i64> = col(row, 4)?;
    let seeded: bool = col(row, 5)?;

    let version = match (etag, last_modified, ambiguous) {
        (Some(etag), Some(secs), Some(ambiguous)) => {
            let tag = EntityTag::strong(&etag).map_err(|e| {
                StoreError::corrupt("stored etag is not a valid tag").with_source(e)
            })?;
            let version = Version::from_parts(tag, integer_to_u64(secs), ambiguous)
                .ok_or_else(|| StoreError::corrupt("stored version is not strong"))?;
            Some(version.with_seeded(seeded))
        }
        (None, None, None) if seeded => {
            return Err(StoreError::corrupt("seeded flag without a version"))
        }
        (None, None, None) => None,
        _ => return Err(StoreError::corrupt("partial version columns")),
    };
    let lease = match (token, expires) {
        (Some(token), Some(expires)) => {
            let token = LeaseToken::parse_hex(&token)
                .ok_or_else(|| StoreError::corrupt("stored lease token is not 32 hex digits"))?;
            Some(Lease::from_parts(token, integer_to_u64(expires)))
        }
        (None, None) => None,
        _ => return Err(StoreError::corrupt("partial lease columns")),
    };
    Ok(Entry::from_parts(version, lease))
}

/// The primary SQLite result code of a database error (`SQLITE_BUSY` is 5, and its
/// extended codes, such as `SQLITE_BUSY_SNAPSHOT` 517, share it).
fn primary_code(error: &sqlx::Error) -> Option<i64> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    db.code()?.parse::<i64>().ok().map(|code| code & 0xff)
}

/// `SQLITE_BUSY` (another connection holds the lock past `busy_timeout`) or
/// `SQLITE_LOCKED` (a conflict within a shared cache).
fn is_busy(error: &sqlx::Error) -> bool {
    matches!(primary_code(error), Some(5 | 6))
}

/// Maps an SQLite error: a lock not granted within `busy_timeout`, or no pooled
/// connection in time, is a timeout; anything else (I/O, a missing table, a file that
/// is not a database) makes the store unavailable. The layer fails closed either way.
fn sqlite_error(context: &str, error: sqlx::Error) -> StoreError {
    if is_busy(&error) {
        return StoreError::timeout(format!("{context}: the database is locked (SQLITE_BUSY)"))
            .with_source(error);
    }
    if matches!(error, sqlx::Error::PoolTimedOut) {
        return StoreError::timeout(format!("{context}: no SQLite connection available in time"))
            .with_source(error);
    }
    let missing_table = matches!(&error, sqlx::Error::Database(db)
        if db.message().contains("no such table"));
    let message = if missing_table {
        format!("{context}: the versions table does not exist (call SqliteStore::migrate)")
    } else {
        context.to_owned()
    };
    StoreError::unavailable(message).with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_round_trips_through_integer() {
        for value in [0, 1, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            assert_eq!(integer_to_u64(u64_to_integer(value)), value);
        }
    }

    #[test]
    fn statements_name_the_tables() {
        let sql = Sql::new();
        assert!(sql
            .migration
            .starts_with(&format!("CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE}")));
        assert!(sql.migration.contains(CLOCK_TABLE));
        assert!(sql.replace.contains("RETURNING 1"));
    }
}
