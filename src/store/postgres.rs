//! The Postgres backend: versions kept in a table, next to the app's own data.
//!
//! [`PostgresStore`] keeps each resource's [`Entry`] in one row of a versions table and
//! makes every compare-and-set **one prepared statement** under `READ COMMITTED` (the
//! default isolation level), in autocommit: one round trip, one commit.
//!
//! ```no_run
//! use tower_precondition::{store::PostgresStore, PreconditionLayer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/app").await?;
//! store.migrate().await?; // or put `PostgresStore::migration_sql` in your migrations
//! let layer = PreconditionLayer::new(store);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! When the app's data lives in the same database, the
//! [transactional mode](crate::transactional) does better than a separate store: the
//! version check and the handler's write share one transaction and one commit.
//!
//! # Connections
//!
//! [`PostgresStore::new`] takes the app's own [`deadpool_postgres::Pool`]; [`connect`]
//! builds one from a URL (without TLS). A connection the server dropped (a restart, a
//! network cut) fails the call in progress — the layer answers `503` with
//! `Retry-After`, fail closed — and is discarded by the pool, which opens a new one for
//! the next call: the app recovers without a restart. Statements are prepared once per
//! connection ([`prepare_cached`](deadpool_postgres::ClientWrapper::prepare_cached)).
//!
//! # Timeouts
//!
//! Every store call is bounded **on the server**: it runs as
//! `BEGIN; SELECT set_config('statement_timeout', ...), set_config('lock_timeout', ...)`
//! (both local to the call's transaction, so nothing leaks into the app's own use of a
//! shared pool), the prepared statement, `COMMIT`, pipelined in one round trip. The
//! bound is [`statement_timeout`](PostgresStore::statement_timeout) (default
//! [`DEFAULT_STATEMENT_TIMEOUT`], 1.5 s) minus the time the call already spent waiting
//! for a pooled connection, so a statement stuck behind a row lock is ended by the
//! server, answered as a [timeout](super::StoreErrorKind::Timeout) (`503`), before the layer's
//! own store timeout (2 s by default) gives up: a call answered `503` cannot land
//! later. Keep it below the layer's
//! [`store_timeout`](crate::PreconditionLayer::store_timeout).
//!
//! A call its caller abandons anyway (a shorter layer timeout, a dropped request)
//! never hands its connection back to the pool, where the next call would queue behind
//! a statement still running: the connection is closed, and the server is asked to
//! cancel the statement (a cancel request without TLS; if the server only accepts TLS
//! connections, the statement runs until its `statement_timeout`).
//!
//! # The clock
//!
//! Leases are stamped and judged by the database's clock
//! ([`clock_millis`](AtomicVersionStore::clock_millis):
//! `SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint`), the same for every
//! app host. The transactional mode reads it in its row-lock statement, after the lock.
//! It is the server's wall clock: if it steps back, leases last longer, never shorter.
//!
//! # The table
//!
//! [`migrate`](PostgresStore::migrate) creates it if it does not exist (idempotent, and
//! safe when several processes start at once: it takes an advisory lock). To manage it
//! with your own migrations instead, use this SQL (the default table name is
//! `tower_precondition_versions`; see [`PostgresStore::table`]):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS tower_precondition_versions (
//!     resource_key            TEXT PRIMARY KEY,
//!     -- the committed version; all three NULL while the first write is in flight
//!     etag                    TEXT,     -- the opaque tag, without quotes
//!     last_modified           BIGINT,   -- seconds since the Unix epoch
//!     last_modified_ambiguous BOOLEAN,  -- another version was committed in that second
//!     -- the lease of a write in flight (store mode only)
//!     lease_token             TEXT,     -- 32 lowercase hex digits
//!     lease_expires_at_ms     BIGINT,   -- ms on the database's clock; 0: released
//!     -- a read, not a write, gave the version
//!     seeded                  BOOLEAN NOT NULL DEFAULT false,
//!     CHECK ((etag IS NULL) = (last_modified IS NULL)
//!            AND (etag IS NULL) = (last_modified_ambiguous IS NULL)),
//!     CHECK ((lease_token IS NULL) = (lease_expires_at_ms IS NULL)),
//!     CHECK (etag IS NOT NULL OR lease_token IS NOT NULL)
//! );
//! ```
//!
//! A table made by an earlier version lacks `seeded`; `migrate` adds it (see
//! [`migration_sql`](PostgresStore::migration_sql), which does the same).
//!
//! A tag may hold the characters U+0080..U+00FF (HTTP's `obs-text`); they are stored
//! as the UTF-8 text of those characters and come back unchanged. The `u64` times are
//! stored in `BIGINT` by their two's-complement bits, so every value round-trips
//! (values past `i64::MAX`, which no real clock produces, read as negative in SQL).
//!
//! # Why each step is atomic
//!
//! Each compare-and-set is one statement, so it runs inside one implicit transaction,
//! and Postgres row locks do the rest:
//!
//! * **Replace** (`expected` and `new` both present) and **remove** (`new` absent) are
//!
//!   ```sql
//!   WITH cur AS MATERIALIZED (SELECT <entry> FROM t WHERE resource_key = $1 FOR UPDATE),
//!        upd AS (UPDATE t SET <new> WHERE resource_key = $1 AND <row = expected>
//!                AND EXISTS (SELECT 1 FROM cur) RETURNING 1)   -- or DELETE ... WHERE
//!   SELECT (SELECT count(*) FROM upd), cur.* FROM cur
//!   ```
//!
//!   `cur` runs first (the `UPDATE` depends on it) and takes the row lock. Under
//!   `READ COMMITTED`, a `FOR UPDATE` that finds the row locked by a concurrent writer
//!   waits for it to commit, then locks and returns **the newest version of the row**
//!   (not the one in the statement's snapshot): that is what we report as "found".
//!   The `UPDATE` then meets the same situation — its snapshot's row version may be
//!   outdated — and Postgres re-checks its `WHERE` clause against the newest version
//!   (the "EvalPlanQual" re-check) before writing it. We hold that row's lock from `cur`
//!   until the statement commits, so nobody can change it between the lock, the
//!   comparison and the write: the comparison of the whole entry (every column, with
//!   `IS NOT DISTINCT FROM` for the nullable ones) and the write are one step, and the
//!   entry we report on a mismatch is the one that actually made it fail.
//!
//! * **Create** (`expected` absent) is
//!
//!   ```sql
//!   INSERT INTO t AS t VALUES ($1, <new>)
//!   ON CONFLICT (resource_key) DO UPDATE SET resource_key = t.resource_key
//!   RETURNING <entry>
//!   ```
//!
//!   The unique index makes the insert and the conflict check one step (a concurrent
//!   insert of the same key is waited for, not raced). On a conflict, the no-op
//!   `DO UPDATE` locks the existing row — even one committed after our snapshot, which
//!   `DO NOTHING` plus a `SELECT` in the same statement could not see — and `RETURNING`
//!   hands it back: the create answers with the entry it found, in the same round trip.
//!   The returned row equals `new` exactly when our insert landed, or when the entry
//!   already was `new` (a replayed create, which the contract counts as applied).
//!
//! * **Removing an absent entry** (`expected` and `new` both absent) is a plain `SELECT`:
//!   it changes nothing, so the snapshot read is its own atomic step.
//!
//! Every answer goes through [`CasOutcome::mismatch_or_replay`], so a statement re-sent
//! after it already ran is recognised as applied.
//!
//! # Round trips
//!
//! | request (store mode) | statements |
//! | --- | --- |
//! | read of a versioned resource | 1 (`SELECT`) |
//! | read that gives a resource its first version | 2 (`SELECT`, `INSERT`) |
//! | write (reserve, then settle) of an entry this process saw last, or of a new key | 2 (`UPDATE` or `INSERT`, `UPDATE`), each its own commit |
//! | write of an entry another process changed since | one more: the reserve that mismatches, or a `SELECT` first |
//!
//! [`connect`]: PostgresStore::connect

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use tokio_postgres::{error::SqlState, types::ToSql, NoTls, Row};

use super::{
    AtomicVersionStore, CasOutcome, Entry, Fence, FenceError, Lease, LeaseToken, StoreError,
    Version,
};
use crate::etag::EntityTag;

/// The table name used unless [`PostgresStore::table`] sets another.
pub const DEFAULT_TABLE: &str = "tower_precondition_versions";

/// The most Postgres accepts for `statement_timeout` / `lock_timeout` (`i32::MAX` ms).
pub(crate) const MAX_PG_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// How long a store call may take on the server unless
/// [`PostgresStore::statement_timeout`] sets another: a margin below the layer's default
/// 2 s store timeout, so that the server has given up on a statement before the layer
/// answers `503`.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_millis(1500);

/// An [`AtomicVersionStore`] in a Postgres table, shared by every process of an app.
///
/// Cheap to clone (the pool and the statements are shared). See the
/// [module docs](self) for the table and why each step is atomic.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    sql: Arc<Sql>,
    statement_timeout: Duration,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.sql.table)
            .field("statement_timeout", &self.statement_timeout)
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresStore {
    /// A store that uses the app's pool and the default table
    /// (`tower_precondition_versions`).
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            sql: Arc::new(Sql::new(&TableName::default_name())),
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
        }
    }

    /// Bounds every store call on the server (default [`DEFAULT_STATEMENT_TIMEOUT`]);
    /// see [Timeouts](self#timeouts). Keep it below the layer's
    /// [`store_timeout`](crate::PreconditionLayer::store_timeout). Clamped to
    /// 1 ms ..= `i32::MAX` ms, the range Postgres accepts.
    #[must_use]
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout.clamp(Duration::from_millis(1), MAX_PG_TIMEOUT);
        self
    }

    /// Builds a pool from a connection URL (`postgres://user@host:port/db`, no TLS),
    /// checks that a connection can be opened, and returns a store on it.
    ///
    /// The pool holds up to 16 connections, and gives up on a connection attempt or a
    /// wait for a free connection after 5 s. For other settings, or TLS, build your own
    /// pool and use [`new`](Self::new).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::new(pool_from_url(url, 16)?);
        // Fail fast on a wrong URL or an unreachable server; the connection goes back
        // to the pool for the first call.
        drop(store.connection().await?);
        Ok(store)
    }

    /// Uses the table `name` (a plain or schema-qualified identifier,
    /// `[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes per part).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_precondition::store::PostgresStore;
    ///
    /// // The app's pool (connections are opened lazily, on first use).
    /// let mut config = deadpool_postgres::Config::new();
    /// config.url = Some("postgres://postgres@127.0.0.1:5432/app".into());
    /// let pool = config
    ///     .create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)
    ///     .unwrap();
    /// let store = PostgresStore::new(pool.clone()).table("app.versions").unwrap();
    /// assert_eq!(store.table_name(), "\"app\".\"versions\"");
    /// assert!(PostgresStore::new(pool).table("versions; DROP TABLE users").is_err());
    /// # }
    /// ```
    pub fn table(self, name: &str) -> Result<Self, InvalidTableName> {
        let table = TableName::parse(name)?;
        Ok(Self {
            pool: self.pool,
            sql: Arc::new(Sql::new(&table)),
            statement_timeout: self.statement_timeout,
        })
    }

    /// The quoted table name the statements use.
    pub fn table_name(&self) -> &str {
        &self.sql.table
    }

    /// The statements that create this store's table, or bring one made by an earlier
    /// version up to date (`CREATE TABLE IF NOT EXISTS`, then
    /// `ALTER TABLE ... ADD COLUMN IF NOT EXISTS`), for your own migrations. Idempotent.
    pub fn migration_sql(&self) -> &str {
        &self.sql.migration
    }

    /// Creates the table if it does not exist, and adds the columns that later versions
    /// of this crate added to a table an earlier one made ([`migration_sql`]).
    /// Idempotent, and safe to call from several processes at once.
    ///
    /// [`migration_sql`]: Self::migration_sql
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let client = self.connection().await?;
        // `CREATE TABLE IF NOT EXISTS` races with itself (two sessions can both decide
        // to create); the advisory lock makes concurrent migrations take turns.
        let sql = format!(
            "BEGIN; SET LOCAL client_min_messages = warning; \
             SELECT pg_advisory_xact_lock({MIGRATION_LOCK}); {}; COMMIT",
            self.sql.migration
        );
        let result = client.batch_execute(&sql).await;
        if result.is_err() {
            // A failed batch may leave the transaction open: never hand that
            // connection back to the pool.
            drop(Object::take(client));
        }
        result.map_err(|e| pg_error("creating the versions table", e))
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Checks, inside the handler's own transaction `tx` on this database, that the
    /// write `fence` names still holds its lease (see [`Fence`]): write
    /// the data in `tx` after this returns `Ok`, and commit. If the lease is gone (the
    /// write was abandoned or cut off at its deadline and settled meanwhile, or another
    /// process took it over), `Err(FenceError::LeaseLost)`: roll back and answer `503`.
    ///
    /// The check reads the versions row `FOR SHARE`: until `tx` ends, no settle or
    /// takeover can replace the lease, so the data write commits only while the lease
    /// is held. No clock is involved: a write that commits with its lease still in the
    /// row comes before any takeover, which treats its outcome as unknown and gives
    /// the resource a fresh version. (For a handler whose data is all in this database,
    /// the [transactional mode](crate::transactional) needs no lease at all.)
    ///
    /// ```no_run
    /// use tower_precondition::{store::PostgresStore, Reservation};
    ///
    /// async fn put_item(
    ///     store: &PostgresStore,
    ///     reservation: &Reservation,
    ///     body: &str,
    /// ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    ///     let mut client = store.pool().get().await?;
    ///     let tx = client.transaction().await?;
    ///     store.check_fence(&tx, &reservation.fence()).await?;
    ///     tx.execute(
    ///         "INSERT INTO items (id, body) VALUES ($1, $2) \
    ///          ON CONFLICT (id) DO UPDATE SET body = excluded.body",
    ///         &[&reservation.key(), &body],
    ///     )
    ///     .await?;
    ///     tx.commit().await?; // dropped before this line: rolled back
    ///     Ok(())
    /// }
    /// ```
    pub async fn check_fence(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        fence: &Fence,
    ) -> Result<(), FenceError> {
        let held = tx
            .query_opt(&self.sql.fence, &[&fence.key(), &fence.token().to_string()])
            .await
            .map_err(|e| pg_error("checking the lease", e))?;
        fence.judge(held.is_some())
    }

    pub(crate) fn sql(&self) -> &Arc<Sql> {
        &self.sql
    }

    async fn connection(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Runs one store statement, bounded on the server: `BEGIN` with this call's
    /// `statement_timeout` and `lock_timeout` (`SET LOCAL`, so nothing leaks into the
    /// app's use of a shared pool), the statement, `COMMIT`, pipelined in one round trip.
    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let started = Instant::now();
        let mut checkout = Checkout::new(self.connection().await?);
        let client = checkout.client()?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| pg_error("preparing a statement", e))?;
        // The budget counts from the start of the call (a wait for a pooled connection
        // uses it up too), so the server gives up before a caller's deadline would.
        let left = self.statement_timeout.saturating_sub(started.elapsed());
        if left < Duration::from_millis(1) {
            checkout.release();
            return Err(StoreError::timeout(
                "no time left for the statement after waiting for a connection",
            ));
        }
        let ms = left.as_millis().min(i32::MAX as u128);
        let begin = format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; \
             SELECT set_config('statement_timeout', '{ms}', true), \
             set_config('lock_timeout', '{ms}', true)"
        );
        // Polled in order, each sends its messages on its first poll: the statement
        // goes out behind BEGIN, and COMMIT behind the statement.
        let (begun, row, committed) = futures_util::future::join3(
            client.batch_execute(&begin),
            client.query_opt(&statement, params),
            client.batch_execute("COMMIT"),
        )
        .await;
        // A server's error answer leaves the connection idle (COMMIT ends an aborted
        // transaction too); any other failure (I/O, a closed connection) leaves it in
        // an unknown state, so it is closed, not reused.
        let clean = [
            begun.as_ref().err(),
            row.as_ref().err(),
            committed.as_ref().err(),
        ]
        .into_iter()
        .flatten()
        .all(|e| e.as_db_error().is_some());
        if clean {
            checkout.release();
        }
        begun.map_err(|e| pg_error("BEGIN", e))?;
        let row = row.map_err(|e| pg_error("running a statement", e))?;
        committed.map_err(|e| pg_error("COMMIT", e))?;
        Ok(row)
    }
}

/// A pooled connection lent to one store call. Unless the call [released](Self::release)
/// it, dropping it (the caller gave up: a timeout dropped the call's future; or the
/// connection failed) closes the connection instead of returning it to the pool, where
/// a statement still running on it would stall the next call, and asks the server to
/// cancel that statement.
struct Checkout {
    object: Option<Object>,
}

impl Checkout {
    fn new(object: Object) -> Self {
        Self {
            object: Some(object),
        }
    }

    fn client(&self) -> Result<&Object, StoreError> {
        self.object
            .as_ref()
            .ok_or_else(|| StoreError::unavailable("connection already released"))
    }

    /// The call is over and the connection idle: back to the pool.
    fn release(&mut self) {
        drop(self.object.take());
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        let cancel = object.cancel_token();
        // Out of the pool: the connection closes when the last handle goes.
        drop(Object::take(object));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // Best effort (without TLS): the server's statement_timeout ends the
                // statement anyway.
                if let Err(error) = cancel.cancel_query(NoTls).await {
                    tracing::debug!(%error, "could not cancel an abandoned statement");
                }
            });
        }
    }
}

#[async_trait::async_trait]
impl AtomicVersionStore for PostgresStore {
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let row = self.query_opt(&self.sql.load, &[&key]).await?;
        match row {
            Some(row) => entry_from_row(&row, 0),
            None => Ok(None),
        }
    }

    async fn clock_millis(&self) -> Result<u64, StoreError> {
        let row = self
            .query_opt(&self.sql.clock, &[])
            .await?
            .ok_or_else(|| StoreError::corrupt("the clock query returned no row"))?;
        let millis: i64 = row
            .try_get(0)
            .map_err(|e| StoreError::corrupt("bad clock column").with_source(e))?;
        u64::try_from(millis)
            .ok()
            .filter(|&m| m > 0)
            .ok_or_else(|| StoreError::corrupt("the database clock is before 1970"))
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
            (None, Some(new_entry)) => {
                let n = Columns::of(Some(new_entry));
                let params: [&(dyn ToSql + Sync); 7] = [
                    &key,
                    &n.etag,
                    &n.last_modified,
                    &n.ambiguous,
                    &n.lease_token,
                    &n.lease_expires_at,
                    &n.seeded,
                ];
                let row = self.query_opt(&self.sql.create, &params).await?;
                let Some(row) = row else {
                    return Err(StoreError::corrupt("INSERT ... RETURNING returned no row"));
                };
                let current = entry_from_row(&row, 0)?;
                Ok(CasOutcome::mismatch_or_replay(current, new))
            }
            (Some(expected_entry), new_entry) => {
                let e = Columns::of(Some(expected_entry));
                let n = Columns::of(new_entry);
                let row = match new_entry {
                    Some(_) => {
                        let params: [&(dyn ToSql + Sync); 13] = [
                            &key,
                            &e.etag,
                            &e.last_modified,
                            &e.ambiguous,
                            &e.lease_token,
                            &e.lease_expires_at,
                            &e.seeded,
                            &n.etag,
                            &n.last_modified,
                            &n.ambiguous,
                            &n.lease_token,
                            &n.lease_expires_at,
                            &n.seeded,
                        ];
                        self.query_opt(&self.sql.replace, &params).await?
                    }
                    None => {
                        let params: [&(dyn ToSql + Sync); 7] = [
                            &key,
                            &e.etag,
                            &e.last_modified,
                            &e.ambiguous,
                            &e.lease_token,
                            &e.lease_expires_at,
                            &e.seeded,
                        ];
                        self.query_opt(&self.sql.remove, &params).await?
                    }
                };
                // No row: the key had no entry (nothing was locked, nothing written).
                let Some(row) = row else {
                    return Ok(CasOutcome::mismatch_or_replay(None, new));
                };
                let applied: i64 = row
                    .try_get(0)
                    .map_err(|e| StoreError::corrupt("bad `applied` column").with_source(e))?;
                if applied == 1 {
                    return Ok(CasOutcome::Applied);
                }
                let current = entry_from_row(&row, 1)?;
                Ok(CasOutcome::mismatch_or_replay(current, new))
            }
        }
    }
}

impl From<Pool> for PostgresStore {
    /// [`PostgresStore::new`]: the pool, with the default table.
    fn from(pool: Pool) -> Self {
        Self::new(pool)
    }
}

/// A table name that is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTableName {
    name: String,
}

impl fmt::Display for InvalidTableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid table name {:?}: expected `name` or `schema.name`, each part \
             [A-Za-z_][A-Za-z0-9_]* and at most 63 bytes",
            self.name
        )
    }
}

impl std::error::Error for InvalidTableName {}

/// A validated, quoted table name.
#[derive(Debug, Clone)]
pub(crate) struct TableName(String);

impl TableName {
    fn default_name() -> Self {
        Self(format!("\"{DEFAULT_TABLE}\""))
    }

    pub(crate) fn parse(name: &str) -> Result<Self, InvalidTableName> {
        let invalid = || InvalidTableName {
            name: name.to_owned(),
        };
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() > 2 {
            return Err(invalid());
        }
        let valid_part = |part: &str| {
            let mut bytes = part.bytes();
            let first_ok = bytes
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
            first_ok && part.len() <= 63 && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !parts.iter().all(|p| valid_part(p)) {
            return Err(invalid());
        }
        // Quoted, so that the name is taken exactly as given (case included) and can
        // never be read as SQL.
        let quoted: Vec<String> = parts.iter().map(|p| format!("\"{p}\"")).collect();
        Ok(Self(quoted.join(".")))
    }
}

/// A number for `pg_advisory_xact_lock` that serialises concurrent migrations
/// ("tprecond" in ASCII).
const MIGRATION_LOCK: i64 = 0x7470_7265_636f_6e64;

/// The columns of an entry, in order.
const ENTRY_COLUMNS: &str =
    "etag, last_modified, last_modified_ambiguous, lease_token, lease_expires_at_ms, seeded";

/// The database's clock in milliseconds since the Unix epoch, as SQL.
const CLOCK_MILLIS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// The statements for one table, built once.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) table: String,
    /// `CREATE TABLE IF NOT EXISTS`, then the columns later versions added, for
    /// tables made earlier.
    migration: String,
    load: String,
    clock: String,
    create: String,
    replace: String,
    remove: String,
    /// Fencing: the lease is still held (a release marker, expiry 0, holds nothing).
    fence: String,
    /// Transactional mode: lock the row, or insert a provisional one for a create.
    pub(crate) tx_lock: String,
    /// Transactional mode: write the final version (no lease).
    pub(crate) tx_write: String,
    /// Transactional mode: remove the entry (a `DELETE` that succeeded).
    pub(crate) tx_delete: String,
}

impl Sql {
    fn new(table: &TableName) -> Self {
        let t = &table.0;
        let matches_expected = "t.etag IS NOT DISTINCT FROM $2::text \
             AND t.last_modified IS NOT DISTINCT FROM $3::bigint \
             AND t.last_modified_ambiguous IS NOT DISTINCT FROM $4::boolean \
             AND t.lease_token IS NOT DISTINCT FROM $5::text \
             AND t.lease_expires_at_ms IS NOT DISTINCT FROM $6::bigint \
             AND t.seeded = $7::boolean";
        let lock_current = format!(
            "WITH cur AS MATERIALIZED (SELECT {ENTRY_COLUMNS} FROM {t} \
             WHERE resource_key = $1::text FOR UPDATE)"
        );
        let create_table = format!(
            "CREATE TABLE IF NOT EXISTS {t} (\n    \
                 resource_key TEXT PRIMARY KEY,\n    \
                 etag TEXT,\n    \
                 last_modified BIGINT,\n    \
                 last_modified_ambiguous BOOLEAN,\n    \
                 lease_token TEXT,\n    \
                 lease_expires_at_ms BIGINT,\n    \
                 seeded BOOLEAN NOT NULL DEFAULT false,\n    \
                 CHECK ((etag IS NULL) = (last_modified IS NULL) \
                 AND (etag IS NULL) = (last_modified_ambiguous IS NULL)),\n    \
                 CHECK ((lease_token IS NULL) = (lease_expires_at_ms IS NULL)),\n    \
                 CHECK (etag IS NOT NULL OR lease_token IS NOT NULL)\n)"
        );
        Self {
            table: t.clone(),
            // ALTER TABLE takes the table's strongest lock even when the column is
            // there, and would queue every store call behind the longest open
            // transaction: so only when the column is missing.
            migration: format!(
                "{create_table};\n\
                 DO $migrate$ BEGIN\n    \
                 IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{t}'::regclass \
                 AND attname = 'seeded' AND NOT attisdropped) THEN\n        \
                 ALTER TABLE {t} ADD COLUMN seeded BOOLEAN NOT NULL DEFAULT false;\n    \
                 END IF;\n\
                 END $migrate$"
            ),
            clock: format!("SELECT {CLOCK_MILLIS}"),
            load: format!("SELECT {ENTRY_COLUMNS} FROM {t} WHERE resource_key = $1::text"),
            create: format!(
                "INSERT INTO {t} AS t (resource_key, {ENTRY_COLUMNS}) \
                 VALUES ($1::text, $2::text, $3::bigint, $4::boolean, $5::text, $6::bigint, \
                 $7::boolean) \
                 ON CONFLICT (resource_key) DO UPDATE SET resource_key = t.resource_key \
                 RETURNING t.etag, t.last_modified, t.last_modified_ambiguous, \
                 t.lease_token, t.lease_expires_at_ms, t.seeded"
            ),
            replace: format!(
                "{lock_current}, upd AS (UPDATE {t} AS t SET etag = $8::text, \
                 last_modified = $9::bigint, last_modified_ambiguous = $10::boolean, \
                 lease_token = $11::text, lease_expires_at_ms = $12::bigint, \
                 seeded = $13::boolean \
                 WHERE t.resource_key = $1::text AND {matches_expected} \
                 AND EXISTS (SELECT 1 FROM cur) RETURNING 1) \
                 SELECT (SELECT count(*) FROM upd) AS applied, {ENTRY_COLUMNS} FROM cur"
            ),
            remove: format!(
                "{lock_current}, del AS (DELETE FROM {t} AS t \
                 WHERE t.resource_key = $1::text AND {matches_expected} \
                 AND EXISTS (SELECT 1 FROM cur) RETURNING 1) \
                 SELECT (SELECT count(*) FROM del) AS applied, {ENTRY_COLUMNS} FROM cur"
            ),
            fence: format!(
                "SELECT 1 FROM {t} WHERE resource_key = $1::text AND lease_token = $2::text \
                 AND lease_expires_at_ms <> 0 FOR SHARE"
            ),
            tx_lock: format!(
                "{lock_current}, ins AS (INSERT INTO {t} \
                 (resource_key, etag, last_modified, last_modified_ambiguous) \
                 SELECT $1::text, $2::text, $3::bigint, false \
                 WHERE NOT EXISTS (SELECT 1 FROM cur) \
                 ON CONFLICT (resource_key) DO NOTHING RETURNING 1) \
                 SELECT false AS created, {ENTRY_COLUMNS}, {CLOCK_MILLIS} AS now_ms FROM cur \
                 UNION ALL \
                 SELECT true, NULL::text, NULL::bigint, NULL::boolean, NULL::text, NULL::bigint, \
                 false, {CLOCK_MILLIS} FROM ins"
            ),
            tx_write: format!(
                "UPDATE {t} SET etag = $2::text, last_modified = $3::bigint, \
                 last_modified_ambiguous = $4::boolean, lease_token = NULL, \
                 lease_expires_at_ms = NULL, seeded = false WHERE resource_key = $1::text"
            ),
            tx_delete: format!("DELETE FROM {t} WHERE resource_key = $1::text"),
        }
    }
}

/// An entry as column values (all `None` for an absent entry or part).
pub(crate) struct Columns {
    pub(crate) etag: Option<String>,
    pub(crate) last_modified: Option<i64>,
    pub(crate) ambiguous: Option<bool>,
    pub(crate) lease_token: Option<String>,
    pub(crate) lease_expires_at: Option<i64>,
    pub(crate) seeded: bool,
}

impl Columns {
    pub(crate) fn of(entry: Option<&Entry>) -> Self {
        let version = entry.and_then(Entry::version);
        let lease = entry.and_then(Entry::lease);
        Self {
            etag: version.map(|v| v.etag().opaque().to_owned()),
            last_modified: version.map(|v| u64_to_bigint(v.last_modified_secs())),
            ambiguous: version.map(Version::last_modified_ambiguous),
            lease_token: lease.map(|l| l.token().to_string()),
            lease_expires_at: lease.map(|l| u64_to_bigint(l.expires_at_millis())),
            seeded: version.is_some_and(Version::is_seeded),
        }
    }
}

/// Stores a `u64` in a `BIGINT` by its bits, so that every value round-trips.
#[allow(clippy::cast_possible_wrap)]
pub(crate) fn u64_to_bigint(value: u64) -> i64 {
    value as i64
}

#[allow(clippy::cast_sign_loss)]
fn bigint_to_u64(value: i64) -> u64 {
    value as u64
}

/// Decodes the six entry columns starting at column `first`.
pub(crate) fn entry_from_row(row: &Row, first: usize) -> Result<Option<Entry>, StoreError> {
    fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
        row: &'a Row,
        index: usize,
    ) -> Result<T, StoreError> {
        row.try_get(index)
            .map_err(|e| StoreError::corrupt(format!("bad column {index}")).with_source(e))
    }
    let etag: Option<String> = col(row, first)?;
    let last_modified: Option<i64> = col(row, first + 1)?;
    let ambiguous: Option<bool> = col(row, first + 2)?;
    let token: Option<String> = col(row, first + 3)?;
    let expires: Option<i64> = col(row, first + 4)?;
    let seeded: bool = col(row, first + 5)?;

    let version = match (etag, last_modified, ambiguous) {
        (Some(etag), Some(secs), Some(ambiguous)) => {
            let tag = EntityTag::strong(&etag).map_err(|e| {
                StoreError::corrupt("stored etag is not a valid tag").with_source(e)
            })?;
            let version = Version::from_parts(tag, bigint_to_u64(secs), ambiguous)
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
            Some(Lease::from_parts(token, bigint_to_u64(expires)))
        }
        (None, None) => None,
        _ => return Err(StoreError::corrupt("partial lease columns")),
    };
    Ok(Entry::from_parts(version, lease))
}

/// A pool for `url` (no TLS) holding up to `max_size` connections.
pub(crate) fn pool_from_url(url: &str, max_size: usize) -> Result<Pool, StoreError> {
    let mut pg: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
        StoreError::unavailable("invalid Postgres URL").with_source(e)
    })?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| StoreError::unavailable("cannot build the connection pool").with_source(e))
}

/// Maps a Postgres error: a cancelled statement (`statement_timeout`, or
/// `lock_timeout`) is a timeout,
/// anything else makes the store unavailable (the layer fails closed either way).
pub(crate) fn pg_error(context: &str, error: tokio_postgres::Error) -> StoreError {
    let code = error.code();
    let message = if code == Some(&SqlState::UNDEFINED_TABLE) {
        format!("{context}: the versions table does not exist (call PostgresStore::migrate)")
    } else {
        context.to_owned()
    };
    let store_error =
        if code == Some(&SqlState::QUERY_CANCELED) || code == Some(&SqlState::LOCK_NOT_AVAILABLE) {
            StoreError::timeout(message)
        } else {
            StoreError::unavailable(message)
        };
    store_error.with_source(error)
}

/// Maps a pool error: a timeout waiting for a connection is a timeout, anything else
/// (the server refused or is down, the pool is closed) makes the store unavailable.
pub(crate) fn pool_error(error: PoolError) -> StoreError {
    let store_error = match &error {
        PoolError::Timeout(_) => StoreError::timeout("no Postgres connection available in time"),
        _ => StoreError::unavailable("cannot get a Postgres connection"),
    };
    store_error.with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated_and_quoted() {
        assert_eq!(TableName::parse("versions").unwrap().0, "\"versions\"");
        assert_eq!(
            TableName::parse("App_1.v_2").unwrap().0,
            "\"App_1\".\"v_2\""
        );
        for bad in [
            "",
            "1abc",
            "a.b.c",
            "a b",
            "a\"b",
            "a;drop",
            "é",
            ".a",
            "a.",
            &"x".repeat(64),
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(TableName::parse(&"x".repeat(63)).is_ok());
    }

    #[test]
    fn u64_round_trips_through_bigint() {
        for value in [0, 1, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            assert_eq!(bigint_to_u64(u64_to_bigint(value)), value);
        }
    }

    #[test]
    fn statements_use_the_quoted_table() {
        let sql = Sql::new(&TableName::parse("s.t").unwrap());
        assert!(sql.replace.contains("\"s\".\"t\""));
        assert!(sql
            .migration
            .starts_with("CREATE TABLE IF NOT EXISTS \"s\".\"t\""));
    }
}
