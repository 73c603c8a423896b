//! The transactional mode (Postgres): the version check, the handler's write and the
//! new version in **one database transaction**.
//!
//! With a separate version store, a write costs three commits: reserve, the handler's
//! own write, settle. A hand-written handler that runs
//! `BEGIN; SELECT ... FOR UPDATE; UPDATE ...; COMMIT` costs one. When the app's data is
//! in the same Postgres database as the versions, [`PgTransactionalLayer`] closes that
//! gap. For each write it
//!
//! 1. reads the request body (within a size limit and a read timeout; see
//!    [`request_body`](PgTransactionalLayer::request_body)) — before anything else, so
//!    a client that stalls mid-upload holds no connection, transaction or lock, and a
//!    body that is cut off never reaches the handler;
//! 2. takes one of the layer's permits for an open write transaction
//!    ([`max_open_writes`](PgTransactionalLayer::max_open_writes)), so writes can never
//!    hold every pooled connection;
//! 3. checks a connection out of the pool and opens a `READ COMMITTED` transaction;
//! 4. locks the resource's version row (`SELECT ... FOR UPDATE`, or inserts it for a
//!    resource that has none: a concurrent create of the same key waits on the unique
//!    index, then finds our row) — `BEGIN` and this statement share one round trip;
//! 5. evaluates the preconditions against the locked version (`412` → `ROLLBACK`);
//! 6. hands the open transaction to the handler as a [`PgTransaction`] (a request
//!    extension, and an axum extractor with the `axum` feature);
//! 7. on a `2xx`, writes the new version (the handler's strong `ETag` if it set one, or
//!    a fresh one) and commits — the write and `COMMIT` share one round trip; on
//!    anything else (a `4xx`, a `5xx`, an error, a missed deadline, a dropped request)
//!    it rolls back.
//!
//! The data change and the version change land together or not at all. A concurrent
//! writer of the same resource waits on the row lock, then evaluates its preconditions
//! against the version we committed: it fails them cleanly (`412`) instead of getting a
//! `409` to retry. There is no lease and no conservative "fresh version" after a
//! failure: a crash rolls the transaction back, so the old version is still exact.
//!
//! ```no_run
//! use axum::{extract::Path, http::StatusCode, routing::put, Router};
//! use tower_precondition::{PgTransaction, PgTransactionalLayer, store::PostgresStore};
//!
//! async fn put_item(Path(id): Path<String>, tx: PgTransaction, body: String) -> StatusCode {
//!     // Runs inside the layer's transaction: committed with the new version, or not at all.
//!     let written = tx
//!         .execute(
//!             "INSERT INTO items (id, body) VALUES ($1, $2)
//!              ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
//!             &[&id, &body],
//!         )
//!         .await;
//!     match written {
//!         Ok(_) if tx.is_create() => StatusCode::CREATED,
//!         Ok(_) => StatusCode::NO_CONTENT,
//!         Err(_) => StatusCode::INTERNAL_SERVER_ERROR, // rolled back
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/app").await?;
//! store.migrate().await?;
//! let app: Router = Router::new()
//!     .route("/items/{id}", put(put_item))
//!     .layer(PgTransactionalLayer::new(store).require_precondition(true));
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! # Reads
//!
//! `GET` / `HEAD` are served exactly as [`PreconditionLayer`](crate::PreconditionLayer)
//! over the same [`PostgresStore`] serves them (one `SELECT` of the committed version,
//! `304` when it matches); the handler gets no transaction and reads with its own
//! connection. A read sees only committed versions, and since a version is committed
//! with its data, a read's `ETag` is never newer than its body. Reads take no lock, with
//! two rare exceptions that wait for a write of the same resource to finish: a read
//! that gives a resource its first version, and the same read taking that version back
//! when its handler does not answer `2xx`. No read removes a version a write committed.
//!
//! # Round trips and commits per write
//!
//! | | round trips | commits |
//! | --- | --- | --- |
//! | transactional mode | 2 + the handler's statements | 1 |
//! | store mode ([`PreconditionLayer`](crate::PreconditionLayer) over [`PostgresStore`]) | 3 + the handler's | 3 + the handler's |
//! | hand-written `BEGIN; SELECT ... FOR UPDATE; ...; COMMIT` | 3 + the handler's | 1 |
//!
//! # What the handler must do
//!
//! * Run its writes through the [`PgTransaction`], not through another pool connection
//!   (those would commit on their own, and could wait on our lock forever).
//! * Not commit or roll back itself (the layer does; [`PgTransactionClient`] derefs to
//!   the connection without `&mut`, so `transaction()` is not reachable).
//! * Answer a status that says what happened: `2xx` commits, anything else rolls back.
//!
//! # Store-mode writers on the same table
//!
//! A row with a live lease (a [`PreconditionLayer`](crate::PreconditionLayer) write in
//! flight on the same table) gets `409`. A lease whose writer died is taken over as the
//! store-mode layer does: the resource gets a fresh version, so every old tag fails.
//!
//! # Slow clients
//!
//! A write holds a pooled connection, an open transaction and its row's lock from
//! `BEGIN` to `COMMIT`. Reading the body first keeps a slow or stalled upload out of
//! that window: it gets `408` after the read timeout, and meanwhile a valid write of
//! the same resource goes through. A body over the limit gets `413` (without being
//! read, when its `Content-Length` says so), and one that fails or ends short of its
//! `Content-Length` gets `400`: nothing is begun for any of them.
//!
//! [Streaming the body](crate::RequestBodyConfig::streaming) into the handler instead
//! brings the window back: each stalled upload holds its connection and row lock (other
//! writers of the resource get `409` after `lock_timeout`) until the handler's
//! deadline. The cap on open write transactions
//! ([`max_open_writes`](PgTransactionalLayer::max_open_writes), by default three
//! quarters of the pool) then bounds the damage: slow clients can take every permit,
//! so further writes get `503` with `Retry-After` after
//! [`write_queue_timeout`](PgTransactionalLayer::write_queue_timeout), but reads and
//! the app's other queries keep the rest of the pool.
//!
//! # Timeouts
//!
//! Each transaction sets, for itself only (`set_config(..., true)`, sent with `BEGIN`),
//! `statement_timeout`, `lock_timeout` (a writer that waits longer than this for the
//! row lock gets `409`) and `idle_in_transaction_session_timeout` (a process that hangs
//! with an open transaction cannot hold the row forever); the handler has a deadline
//! too. See [`PgTransactionalLayer`].

mod future;
mod layer;
mod service;
mod tx;

use std::{fmt, ops::Deref, sync::Arc};

use deadpool_postgres::ClientWrapper;
use tokio::sync::MappedMutexGuard;
use tokio_postgres::{types::ToSql, Row};

use crate::store::Version;

pub use self::{
    future::ResponseFuture, layer::PgTransactionalLayer, service::PgTransactionalService,
};

#[allow(unused_imports)] // for the intra-doc links above
use crate::store::PostgresStore;

/// The open transaction of a write in [transactional mode](self), handed to the handler
/// in the request extensions (and as an axum extractor with the `axum` feature).
///
/// The version row of the resource is locked in this transaction and its preconditions
/// hold. Everything run through it commits with the new version when the handler
/// answers `2xx`, and is rolled back otherwise. Clones share the one transaction; after
/// the layer has committed or rolled back, every call fails with
/// [`PgTransactionError::is_finished`].
#[derive(Clone)]
pub struct PgTransaction {
    shared: Arc<Shared>,
}

struct Shared {
    conn: tx::SharedConn,
    key: Arc<str>,
    replacing: Option<Version>,
}

impl fmt::Debug for PgTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTransaction")
            .field("key", &self.shared.key)
            .field("replacing", &self.shared.replacing)
            .finish_non_exhaustive()
    }
}

impl PgTransaction {
    fn new(conn: tx::SharedConn, key: Arc<str>, replacing: Option<Version>) -> Self {
        Self {
            shared: Arc::new(Shared {
                conn,
                key,
                replacing,
            }),
        }
    }

    /// The resource key the layer derived for this request.
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// The committed version this write replaces, `None` if the resource has none.
    pub fn replacing(&self) -> Option<&Version> {
        self.shared.replacing.as_ref()
    }

    /// Whether the resource has no committed version, so this write creates it.
    pub fn is_create(&self) -> bool {
        self.shared.replacing.is_none()
    }

    /// The connection the transaction runs on, for anything the shortcuts below do
    /// not cover (`prepare_cached`, `query_raw`, `copy_in`, ...).
    ///
    /// Other calls on this transaction (from clones) wait while the returned guard is
    /// alive, and so does the layer's commit: drop it before the handler returns.
    pub async fn client(&self) -> Result<PgTransactionClient<'_>, PgTransactionError> {
        let guard = self.shared.conn.lock().await;
        let mapped = tokio::sync::MutexGuard::try_map(guard, |conn| {
            conn.as_mut().and_then(tx::TxConn::object_mut)
        })
        .map_err(|_| PgTransactionError::finished())?;
        Ok(PgTransactionClient { guard: mapped })
    }

    /// Runs a statement (prepared once per connection) and returns the rows it changed.
    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, PgTransactionError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.execute(&statement, params).await?)
    }

    /// Runs a query (prepared once per connection) and returns its rows.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, PgTransactionError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query(&statement, params).await?)
    }

    /// Runs a query that returns exactly one row.
    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, PgTransactionError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query_one(&statement, params).await?)
    }

    /// Runs a query that returns at most one row.
    pub async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, PgTransactionError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query_opt(&statement, params).await?)
    }
}

/// Shared access to the connection of a [`PgTransaction`]; derefs to
/// [`deadpool_postgres::ClientWrapper`] (and through it to [`tokio_postgres::Client`]).
///
/// Only `&` access is given, so the transaction cannot be ended or nested from here.
pub struct PgTransactionClient<'a> {
    guard: MappedMutexGuard<'a, deadpool_postgres::Object>,
}

impl fmt::Debug for PgTransactionClient<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTransactionClient")
            .finish_non_exhaustive()
    }
}

impl Deref for PgTransactionClient<'_> {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.guard
    }
}

/// An error from a [`PgTransaction`] call.
#[derive(Debug)]
pub struct PgTransactionError {
    source: Option<tokio_postgres::Error>,
}

impl PgTransactionError {
    fn finished() -> Self {
        Self { source: None }
    }

    /// Whether the layer had already committed or rolled back the transaction (the
    /// handler kept a clone past its response).
    pub fn is_finished(&self) -> bool {
        self.source.is_none()
    }

    /// The Postgres error, if the statement itself failed.
    pub fn as_postgres(&self) -> Option<&tokio_postgres::Error> {
        self.source.as_ref()
    }
}

impl From<tokio_postgres::Error> for PgTransactionError {
    fn from(error: tokio_postgres::Error) -> Self {
        Self {
            source: Some(error),
        }
    }
}

impl fmt::Display for PgTransactionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            None => f.write_str("the write's transaction is already committed or rolled back"),
            Some(error) => write!(f, "statement failed in the write's transaction: {error}"),
        }
    }
}

impl std::error::Error for PgTransactionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum_core::{
        extract::FromRequestParts,
        response::{IntoResponse, Response},
    };
    use http::{header, request::Parts, StatusCode};

    use super::PgTransaction;

    /// The rejection when a handler asks for a [`PgTransaction`] on a request that has
    /// none: the route is not behind [`PgTransactionalLayer`](super::PgTransactionalLayer),
    /// or the method is not one of its write methods. A server bug, so `500`.
    #[derive(Debug, Clone, Copy)]
    pub struct MissingPgTransaction;

    impl IntoResponse for MissingPgTransaction {
        fn into_response(self) -> Response {
            let body = "{\"type\":\"about:blank\",\"title\":\"Missing transaction\",\
                        \"status\":500,\"code\":\"missing_pg_transaction\",\"detail\":\
                        \"This handler needs the transaction of PgTransactionalLayer, \
                        which this request does not have.\"}";
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "application/problem+json")],
                body,
            )
                .into_response()
        }
    }

    impl<S> FromRequestParts<S> for PgTransaction {
        type Rejection = MissingPgTransaction;

        fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> impl std::future::Future<Output = Result<Self, Self::Rejection>> + Send {
            let found = parts.extensions.get::<PgTransaction>().cloned();
            if found.is_none() {
                tracing::error!("handler asked for a PgTransaction, but the request has none");
            }
            std::future::ready(found.ok_or(MissingPgTransaction))
        }
    }
}

#[cfg(feature = "axum")]
pub use self::extract::MissingPgTransaction;
