//! The transaction of one write: open it and lock the version row, then commit or
//! roll back. Owns the connection so that it can never go back to the pool with a
//! transaction still open.

use std::{
    future::{poll_fn, Future},
    pin::pin,
    sync::Arc,
    task::Poll,
    time::{Duration, SystemTime},
};

use deadpool_postgres::Object;
use http::Method;
use tokio::sync::{Mutex, OwnedSemaphorePermit, TryAcquireError};
use tokio_postgres::{error::SqlState, types::ToSql};

use super::{layer::TxConfig, PgTransaction};
use crate::{
    evaluate::{evaluate, Decision, Preconditions},
    fresh::fresh_etag,
    protocol::{with_timeout, write_base},
    response::Problem,
    store::{
        postgres::{entry_from_row, pg_error, pool_error, u64_to_bigint, Columns},
        unix_secs, StoreError, Version,
    },
};

/// How many times the lock statement is re-run when a concurrent create of the same
/// key committed between our snapshot and our insert (each re-run sees it).
const LOCK_ATTEMPTS: usize = 4;

/// A pooled connection with a transaction that may be open.
///
/// It goes back to the pool only through [`TxConn::release`], which is called after a
/// `COMMIT` or `ROLLBACK` the server answered. Dropped any other way, it takes the
/// connection out of the pool and closes it, and the server rolls the transaction back.
pub(crate) struct TxConn {
    object: Option<Object>,
}

impl TxConn {
    pub(crate) fn object(&self) -> Option<&Object> {
        self.object.as_ref()
    }

    pub(crate) fn object_mut(&mut self) -> Option<&mut Object> {
        self.object.as_mut()
    }

    /// The transaction is over: the connection is clean and may be reused.
    fn release(mut self) {
        drop(self.object.take());
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        if let Some(object) = self.object.take() {
            tracing::debug!("closing a connection whose transaction state is unknown");
            drop(Object::take(object));
        }
    }
}

/// The connection of one write, shared by the layer and the handler's
/// [`PgTransaction`]; `None` once the layer has committed or rolled back.
pub(crate) type SharedConn = Arc<Mutex<Option<TxConn>>>;

/// The layer's side of a write's transaction. Dropped before it commits or rolls back
/// (the response future dropped by a client disconnect, a panic), it rolls back in a
/// spawned task.
pub(crate) struct TxOwner {
    conn: SharedConn,
    finished: bool,
    timeout: Duration,
    /// One of the layer's open-write permits, given back once the transaction is over
    /// (after the `ROLLBACK` of an abandoned write, too).
    permit: Option<OwnedSemaphorePermit>,
}

/// How a commit ended.
pub(crate) enum Committed {
    /// The data and the version are committed.
    Yes,
    /// The server refused (or the final write failed): everything was rolled back.
    RolledBack,
    /// The connection failed during `COMMIT`: all or nothing was applied.
    Unknown,
}

/// The final change to the version row, sent with `COMMIT`.
pub(crate) enum Final {
    Write(Version),
    Delete,
}

impl TxOwner {
    fn new(object: Object, timeout: Duration, permit: OwnedSemaphorePermit) -> Self {
        Self {
            conn: Arc::new(Mutex::new(Some(TxConn {
                object: Some(object),
            }))),
            finished: false,
            timeout,
            permit: Some(permit),
        }
    }

    pub(crate) fn conn(&self) -> &SharedConn {
        &self.conn
    }

    /// Rolls back and returns the connection to the pool (or closes it if the
    /// `ROLLBACK` failed).
    pub(crate) async fn rollback(mut self) {
        self.finished = true;
        let taken = self.conn.lock().await.take();
        if let Some(conn) = taken {
            rollback_conn(conn, self.timeout).await;
        }
    }

    /// Writes the final version row and commits, in one round trip (pipelined).
    pub(crate) async fn commit(mut self, config: &TxConfig, key: &str, fin: &Final) -> Committed {
        self.finished = true;
        let taken = self.conn.lock().await.take();
        let Some(conn) = taken else {
            // Cannot happen: only the owner takes the connection out.
            tracing::error!(key, "transaction already finished before commit");
            return Committed::RolledBack;
        };
        let timeout = self.timeout.saturating_add(config.statement_timeout);
        match tokio::time::timeout(timeout, commit_conn(&conn, config, key, fin)).await {
            Ok(Ok(())) => {
                conn.release();
                Committed::Yes
            }
            Ok(Err(CommitError::RolledBack(error))) => {
                tracing::warn!(key, %error, "commit refused; the write was rolled back");
                // Before `COMMIT` was sent, or refused by the server: either way the
                // transaction is over or still open; roll back to be sure.
                rollback_conn(conn, self.timeout).await;
                Committed::RolledBack
            }
            Ok(Err(CommitError::Unknown(error))) => {
                tracing::error!(key, %error, "connection lost during COMMIT; outcome unknown");
                drop(conn);
                Committed::Unknown
            }
            Err(_) => {
                tracing::error!(key, "COMMIT timed out; outcome unknown");
                drop(conn);
                Committed::Unknown
            }
        }
    }
}

impl Drop for TxOwner {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let conn = self.conn.clone();
        let timeout = self.timeout;
        let permit = self.permit.take();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::info!("write abandoned; rolling its transaction back");
                runtime.spawn(async move {
                    // Waits for a handler task that still holds the connection.
                    let taken = conn.lock().await.take();
                    if let Some(conn) = taken {
                        rollback_conn(conn, timeout).await;
                    }
                    // The connection is back (or closed): another write may begin.
                    drop(permit);
                });
            }
            Err(_) => {
                // No runtime to roll back on: close the connection (the server then
                // rolls back). If a handler still holds it, the last handle to go
                // does the same (see `TxConn`).
                if let Ok(mut guard) = conn.try_lock() {
                    drop(guard.take());
                }
            }
        }
    }
}

async fn rollback_conn(conn: TxConn, timeout: Duration) {
    let result = match conn.object() {
        Some(client) => tokio::time::timeout(timeout, client.batch_execute("ROLLBACK")).await,
        None => return,
    };
    match result {
        Ok(Ok(())) => conn.release(),
        Ok(Err(error)) => {
            tracing::warn!(%error, "ROLLBACK failed; closing the connection");
            drop(conn);
        }
        Err(_) => {
            tracing::warn!("ROLLBACK timed out; closing the connection");
            drop(conn);
        }
    }
}

enum CommitError {
    RolledBack(tokio_postgres::Error),
    Unknown(tokio_postgres::Error),
}

async fn commit_conn(
    conn: &TxConn,
    config: &TxConfig,
    key: &str,
    fin: &Final,
) -> Result<(), CommitError> {
    let Some(client) = conn.object() else {
        return Ok(());
    };
    let sql = config.store.sql();
    let (statement_sql, columns) = match fin {
        Final::Write(version) => (
            &sql.tx_write,
            Some(Columns::of(Some(&crate::store::Entry::committed(
                version.clone(),
            )))),
        ),
        Final::Delete => (&sql.tx_delete, None),
    };
    let statement = client
        .prepare_cached(statement_sql)
        .await
        .map_err(CommitError::RolledBack)?;
    let params: Vec<&(dyn ToSql + Sync)> = match &columns {
        Some(c) => vec![&key, &c.etag, &c.last_modified, &c.ambiguous],
        None => vec![&key],
    };
    // Pipelined: the server runs the final write, then COMMIT; if the write failed,
    // the aborted transaction's COMMIT answers ROLLBACK. A write that fails before it
    // is sent (a parameter that does not encode) never lets COMMIT go out.
    let outcome = pipelined(client.execute(&statement, &params), || {
        client.batch_execute("COMMIT")
    })
    .await;
    let (written, committed) = match outcome {
        Pipelined::FirstFailed(error) => return Err(CommitError::RolledBack(error)),
        Pipelined::Both(written, committed) => (written, committed),
    };
    match (written, committed) {
        (Ok(rows), Ok(())) => {
            if rows != 1 {
                // We hold the row's lock (or inserted it), so this cannot happen.
                tracing::error!(
                    key,
                    rows,
                    "final version write touched an unexpected row count"
                );
            }
            Ok(())
        }
        (_, Err(error)) if error.as_db_error().is_none() => Err(CommitError::Unknown(error)),
        (_, Err(error)) | (Err(error), Ok(())) => Err(CommitError::RolledBack(error)),
    }
}

/// A write whose transaction is open, its version row locked, its preconditions met.
pub(crate) struct Started {
    pub(crate) owner: TxOwner,
    pub(crate) base: Option<Version>,
    pub(crate) transaction: PgTransaction,
}

/// Opens the transaction, locks (or, for a resource with no row, inserts) the version
/// row, and evaluates the preconditions against it.
pub(crate) async fn begin(
    config: Arc<TxConfig>,
    key: Arc<str>,
    method: Method,
    pre: Preconditions,
) -> Result<Started, Problem> {
    let unavailable = |error: StoreError| {
        tracing::warn!(key = &*key, %error, "database unavailable; refusing the write (503)");
        Problem::store_unavailable(config.retry_after)
    };
    let permit = open_write_permit(&config).await.ok_or_else(|| {
        tracing::warn!(
            key = &*key,
            max_open_writes = config.max_open_writes,
            "every write transaction permit is taken; refusing the write (503)"
        );
        Problem::too_many_writes(config.retry_after)
    })?;
    let object = with_timeout(config.store_timeout, async {
        config.store.pool().get().await.map_err(pool_error)
    })
    .await
    .map_err(unavailable)?;
    // From here on, an early return (or this future dropped) rolls back.
    let owner = TxOwner::new(object, config.store_timeout, permit);

    let lock_deadline = config.store_timeout.saturating_add(config.lock_timeout);
    let locked = tokio::time::timeout(lock_deadline, lock_row(&owner, &config, &key)).await;
    let (created, entry, now_millis) = match locked {
        Ok(Ok(row)) => row,
        Ok(Err(LockError::Busy)) => {
            tracing::info!(
                key = &*key,
                "version row stayed locked past lock_timeout (409)"
            );
            owner.rollback().await;
            return Err(Problem::write_in_flight(config.retry_after));
        }
        Ok(Err(LockError::Store(error))) => {
            owner.rollback().await;
            return Err(unavailable(error));
        }
        Err(_) => {
            drop(owner);
            return Err(unavailable(StoreError::timeout("locking the version row")));
        }
    };

    // A store-mode writer on the same table is fenced by the same lease rule, judged
    // by the database's clock (read by the lock statement, after the lock).
    let found = if created { None } else { entry.as_ref() };
    let Some((base, takeover)) = write_base(found, now_millis) else {
        tracing::info!(key = &*key, "a store-mode write is in flight (409)");
        owner.rollback().await;
        return Err(Problem::write_in_flight(config.retry_after));
    };

    if evaluate(&method, &pre, base.as_ref()) != Decision::Proceed {
        match (takeover, &base) {
            (true, Some(version)) => {
                // Record the fresh version (clearing the dead lease), so the 412's
                // ETag is the real current one.
                let fin = Final::Write(version.clone());
                if let Committed::Unknown = owner.commit(&config, &key, &fin).await {
                    tracing::warn!(key = &*key, "could not record the takeover version");
                }
            }
            _ => owner.rollback().await,
        }
        tracing::info!(key = &*key, current = ?base.as_ref().map(Version::etag), "precondition failed (412)");
        return Err(Problem::precondition_failed(
            base,
            &pre,
            config.validators_on_412,
        ));
    }

    let transaction = PgTransaction::new(owner.conn().clone(), key.clone(), base.clone());
    tracing::debug!(
        key = &*key,
        create = base.is_none(),
        takeover,
        "transaction open, version row locked"
    );
    Ok(Started {
        owner,
        base,
        transaction,
    })
}

/// One of the layer's permits for an open write transaction, waiting at most
/// `write_queue_timeout` for one; `None` if none came free.
async fn open_write_permit(config: &TxConfig) -> Option<OwnedSemaphorePermit> {
    let permits = config.open_writes.clone();
    match permits.clone().try_acquire_owned() {
        Ok(permit) => Some(permit),
        // The layer never closes its semaphore.
        Err(TryAcquireError::Closed) => None,
        Err(TryAcquireError::NoPermits) => {
            tokio::time::timeout(config.write_queue_timeout, permits.acquire_owned())
                .await
                .ok()?
                .ok()
        }
    }
}

enum LockError {
    /// `lock_timeout` (or a deadlock): another transaction holds the row.
    Busy,
    Store(StoreError),
}

/// `BEGIN` and the lock statement, pipelined in one round trip; re-run while a
/// concurrent create's row is not yet visible to us.
async fn lock_row(
    owner: &TxOwner,
    config: &TxConfig,
    key: &str,
) -> Result<(bool, Option<crate::store::Entry>, u64), LockError> {
    let map = |context: &str, error: tokio_postgres::Error| {
        let code = error.code();
        if code == Some(&SqlState::LOCK_NOT_AVAILABLE)
            || code == Some(&SqlState::T_R_DEADLOCK_DETECTED)
        {
            LockError::Busy
        } else {
            LockError::Store(pg_error(context, error))
        }
    };
    let guard = owner.conn().lock().await;
    let Some(client) = guard.as_ref().and_then(TxConn::object) else {
        return Err(LockError::Store(StoreError::unavailable("connection gone")));
    };
    let statement = client
        .prepare_cached(&config.store.sql().tx_lock)
        .await
        .map_err(|e| map("preparing the lock statement", e))?;
    // A provisional version for a create; replaced by the final one at commit.
    let provisional = fresh_etag();
    let provisional_tag = provisional.opaque();
    let now = u64_to_bigint(unix_secs(SystemTime::now()));
    let params: [&(dyn ToSql + Sync); 3] = [&key, &provisional_tag, &now];

    // Pipelined: BEGIN, then the lock statement, in one round trip. The lock statement
    // is only sent once BEGIN is on its way, so it can never run outside the
    // transaction.
    let outcome = pipelined(client.batch_execute(&config.begin_sql), || {
        client.query(&statement, &params)
    })
    .await;
    let mut rows = match outcome {
        Pipelined::FirstFailed(error) => return Err(map("BEGIN", error)),
        Pipelined::Both(begun, rows) => {
            begun.map_err(|e| map("BEGIN", e))?;
            rows
        }
    };
    for _ in 0..LOCK_ATTEMPTS {
        let found = rows.map_err(|e| map("locking the version row", e))?;
        if let Some(row) = found.first() {
            let created: bool = row.try_get(0).map_err(|e| {
                LockError::Store(StoreError::corrupt("bad `created` column").with_source(e))
            })?;
            let entry = if created {
                None
            } else {
                entry_from_row(row, 1).map_err(LockError::Store)?
            };
            let now_ms: i64 = row.try_get(7).map_err(|e| {
                LockError::Store(StoreError::corrupt("bad `now_ms` column").with_source(e))
            })?;
            // A clock before 1970 (garbage) judges every lease live: 409, the safe side.
            return Ok((created, entry, u64::try_from(now_ms).unwrap_or(0)));
        }
        // Neither found nor inserted: a concurrent create committed the row after
        // our statement's snapshot. The next statement's snapshot sees it.
        rows = client.query(&statement, &params).await;
    }
    Err(LockError::Busy)
}

/// Runs `first`, and `second` right behind it on the same connection, in one round
/// trip. `second` is created (and so sent) only after `first`'s request is queued on the
/// connection: if `first` fails before it is sent, `second` never runs (`None`).
async fn pipelined<A, B, TA, TB, E>(first: A, second: impl FnOnce() -> B) -> Pipelined<TA, TB, E>
where
    A: Future<Output = Result<TA, E>>,
    B: Future<Output = Result<TB, E>>,
{
    let mut first = pin!(first);
    // One poll sends `first`'s messages (tokio-postgres queues a request when its
    // future is first polled) or fails it before anything is sent.
    let early = poll_fn(|cx| Poll::Ready(first.as_mut().poll(cx))).await;
    match early {
        Poll::Ready(Err(error)) => Pipelined::FirstFailed(error),
        Poll::Ready(Ok(value)) => Pipelined::Both(Ok(value), second().await),
        Poll::Pending => {
            let (a, b) = futures_util::future::join(first, second()).await;
            Pipelined::Both(a, b)
        }
    }
}

/// The outcome of [`pipelined`].
enum Pipelined<TA, TB, E> {
    /// `first` failed before it was sent; `second` was never sent.
    FirstFailed(E),
    /// Both were sent; their results.
    Both(Result<TA, E>, Result<TB, E>),
}
