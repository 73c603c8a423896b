//! Write throughput and latency of the ways to make an HTTP update safe (or not), side
//! by side in one run on the same Postgres database, through two drivers (sqlx and
//! tokio-postgres, the latter with a deadpool pool):
//!
//! | variant | driver | what one `PUT` does |
//! | --- | --- | --- |
//! | `row_version` | sqlx, tokio-postgres | `RowVersionLayer`; one conditional `UPDATE` built from `PgRowSql` (the condition bound with `bind_condition` / `SqlCondition::params`); on zero rows one `SELECT` of the current version for the `412` |
//! | `hand_one_statement` | sqlx, tokio-postgres | by hand: `If-Match` parsed in the handler, `UPDATE ... SET version = version + 1 WHERE id = $1 AND version = $3 RETURNING version`; on zero rows one `SELECT` of the current version for the `412` |
//! | `hand_for_update` | sqlx, tokio-postgres | by hand: `BEGIN; SELECT version ... FOR UPDATE;` compare with `If-Match`; `UPDATE ...; COMMIT` |
//! | `no_control` | sqlx, tokio-postgres | the same update, autocommit, no concurrency control at all (lost updates allowed) |
//! | `transactional` | tokio-postgres | the transactional mode (`PgTransactionalLayer`): one transaction, one commit |
//! | `store` | tokio-postgres | the store mode (`PreconditionLayer` over `PostgresStore`): reserve, the handler's autocommit write, settle — three commits |
//!
//! Each variant runs with the same number of concurrent clients, first on spread keys
//! (each client cycles over keys of its own: no contention), then on one hot key (every
//! client writes the same row). A client sends `PUT` with `If-Match` set to the last
//! tag it saw (from its last success, or from the `412` that refused it), so under
//! contention a refused client re-sends with the current tag, as a real one would.
//! Requests go through the axum router in-process (no sockets), so the figures measure
//! the middleware, the driver and the database, not HTTP parsing. Both pools have the
//! same size, and neither checks a connection on checkout (deadpool's
//! `RecyclingMethod::Fast`, sqlx's `test_before_acquire(false)`). sqlx 0.8 still pings
//! every connection it takes back (a `Sync` round trip, in a task of its own, that
//! cannot be turned off), so each sqlx handler checks out one connection per request
//! and runs all its statements on it, as each tokio-postgres handler does.
//!
//! Every variant writes its own table (`tp_bench_items_*`, dropped and re-created at the
//! start); the row-version tables draw their versions from the sequence
//! `tp_bench_row_version`. Nothing else in the database is touched.
//!
//! Besides the table, the run prints one line per variant and scenario,
//! `variant=<name> driver=<sqlx|tokio-postgres> scenario=<spread|hot> writes_per_s=<n> p99_ms=<n>`,
//! a `counts` line with its `2xx`, `412` (and `412`s without an `ETag`), `409` and `5xx`,
//! and the ratios of `row_version` to the hand-written handlers of the same driver.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench --manifest-path benches/Cargo.toml --features postgres --bench postgres_modes
//! ```
//!
//! Environment:
//!
//! * `DATABASE_URL` (required; without it the bench is skipped);
//! * `BENCH_CLIENTS`: concurrent clients, and the size of each pool (default 16);
//! * `BENCH_SECS`: seconds measured per variant and round, after 1 s of warm-up
//!   (default 3);
//! * `BENCH_ROUNDS`: rounds (default 2); the variants alternate within each round,
//!   forward in even rounds and backward in odd ones;
//! * `BENCH_VARIANTS`: the variants to run, comma-separated, by name or as
//!   `name/driver` (e.g. `row_version,hand_for_update/sqlx`; default all);
//! * `BENCH_SCENARIOS`: `spread`, `hot`, or both comma-separated (default both);
//! * `BENCH_FILLER_ROWS`: rows no client writes, added to every table so that the
//!   planner finds a row by its primary key, as in a real table (default 10000; on the
//!   129 rows the clients write it scans the whole table instead);
//! * `BENCH_SQLX_TEST_BEFORE_ACQUIRE`: `1` makes sqlx ping every connection on checkout,
//!   its own default (one more round trip per statement); default `0`, like deadpool's
//!   `RecyclingMethod::Fast`.
//!
//! Besides the figures, each variant's CPU time per request is shown: this process's
//! (clients, router, layers, drivers) and the server's (every process named
//! `postgres`, read from `/proc`, so other databases' work on a shared server counts
//! too), and the server's WAL flushes per request (`pg_stat_wal.wal_sync`, the whole
//! server's too): a commit that wrote WAL waits for one, unless it shares another's.

use std::{
    collections::HashMap,
    env,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, HeaderMap, Request, StatusCode},
    response::{IntoResponse, Response},
    routing::put,
    Router,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use sqlx::{postgres::PgPoolOptions, PgPool};
use tokio_postgres::{types::ToSql, NoTls};
use tower::ServiceExt;
use tower_precondition::{
    row_version::{
        self,
        sqlx::{BindCondition, BindSpecialized},
        PgRowSql, PgSpecializedStatement, RowPrecondition, RowVersionLayer,
    },
    store::PostgresStore,
    PgTransaction, PgTransactionalLayer, PreconditionLayer,
};

const VERSIONS: &str = "tp_bench_versions";
/// The sequence the row-version tables draw their versions from.
const SEQUENCE: &str = "tp_bench_row_version";
/// Keys each client cycles over in the spread scenario.
const KEYS_PER_CLIENT: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Driver {
    Sqlx,
    TokioPostgres,
}

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Sqlx => "sqlx",
            Driver::TokioPostgres => "tokio-postgres",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    RowVersion,
    RowVersionGeneric,
    HandOneStatement,
    HandForUpdate,
    NoControl,
    Transactional,
    Store,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::RowVersion => "row_version",
            Kind::RowVersionGeneric => "row_version_generic",
            Kind::HandOneStatement => "hand_one_statement",
            Kind::HandForUpdate => "hand_for_update",
            Kind::NoControl => "no_control",
            Kind::Transactional => "transactional",
            Kind::Store => "store",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Variant {
    kind: Kind,
    driver: Driver,
    /// Its own items table.
    items: &'static str,
}

const fn variant(kind: Kind, driver: Driver, items: &'static str) -> Variant {
    Variant {
        kind,
        driver,
        items,
    }
}

/// The run order within a round: the variants compared with each other run next to
/// each other.
const VARIANTS: [Variant; 12] = [
    variant(Kind::RowVersion, Driver::Sqlx, "tp_bench_items_rv_sqlx"),
    variant(
        Kind::RowVersionGeneric,
        Driver::Sqlx,
        "tp_bench_items_rvg_sqlx",
    ),
    variant(Kind::HandForUpdate, Driver::Sqlx, "tp_bench_items_fu_sqlx"),
    variant(
        Kind::HandOneStatement,
        Driver::Sqlx,
        "tp_bench_items_os_sqlx",
    ),
    variant(Kind::NoControl, Driver::Sqlx, "tp_bench_items_nc_sqlx"),
    variant(
        Kind::RowVersion,
        Driver::TokioPostgres,
        "tp_bench_items_rv_tp",
    ),
    variant(
        Kind::RowVersionGeneric,
        Driver::TokioPostgres,
        "tp_bench_items_rvg_tp",
    ),
    variant(
        Kind::HandForUpdate,
        Driver::TokioPostgres,
        "tp_bench_items_c",
    ),
    variant(
        Kind::HandOneStatement,
        Driver::TokioPostgres,
        "tp_bench_items_os_tp",
    ),
    variant(Kind::NoControl, Driver::TokioPostgres, "tp_bench_items_d"),
    variant(
        Kind::Transactional,
        Driver::TokioPostgres,
        "tp_bench_items_a",
    ),
    variant(Kind::Store, Driver::TokioPostgres, "tp_bench_items_b"),
];

fn row_sql(items: &str) -> PgRowSql {
    PgRowSql::new(items).sequence(SEQUENCE)
}

/// Every statement of one variant's table, built once per router: sqlx caches prepared
/// statements by their text, deadpool's `prepare_cached` too, so the text must not be
/// rebuilt per request.
struct Statements {
    update: String,
    select_for_update: String,
    update_versioned: String,
    one_statement: String,
    one_statement_unconditional: String,
    select_version: String,
    row_update: PgSpecializedStatement,
    row_update_generic: String,
    row_read: String,
}

impl Statements {
    fn new(items: &str) -> Self {
        let v = row_sql(items);
        let row_update = |condition: &str| {
            format!(
                "UPDATE {items} SET body = $2, {set} WHERE id = $1 AND {condition} \
                 RETURNING {returning}",
                set = v.assignments(),
                returning = v.returning(),
            )
        };
        Self {
            update: format!("UPDATE {items} SET body = $2 WHERE id = $1"),
            select_for_update: format!("SELECT version FROM {items} WHERE id = $1 FOR UPDATE"),
            update_versioned: format!("UPDATE {items} SET body = $2, version = $3 WHERE id = $1"),
            one_statement: format!(
                "UPDATE {items} SET body = $2, version = version + 1 \
                 WHERE id = $1 AND version = $3 RETURNING version"
            ),
            one_statement_unconditional: format!(
                "UPDATE {items} SET body = $2, version = version + 1 WHERE id = $1 \
                 RETURNING version"
            ),
            select_version: format!("SELECT version FROM {items} WHERE id = $1"),
            row_update: v.specialized(3, row_update),
            row_update_generic: row_update(&v.condition(3)),
            row_read: format!("SELECT {} FROM {items} WHERE id = $1", v.returning()),
        }
    }
}

#[derive(Clone)]
struct AppState {
    pool: Pool,
    sqlx: PgPool,
    sql: Arc<Statements>,
}

fn server_error(error: impl std::fmt::Display) -> Response {
    eprintln!("handler error: {error}");
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

fn with_tag(status: StatusCode, tag: String) -> Response {
    (status, [(header::ETAG, tag)]).into_response()
}

/// transactional: the update, in the layer's transaction.
async fn put_transactional(
    Path(id): Path<String>,
    State(state): State<AppState>,
    tx: PgTransaction,
    body: String,
) -> Response {
    match tx.execute(&state.sql.update, &[&id, &body]).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => server_error(error),
    }
}

/// store and no_control (tokio-postgres): the update, autocommit, on a connection of
/// its own.
async fn put_autocommit(
    Path(id): Path<String>,
    State(state): State<AppState>,
    body: String,
) -> Response {
    let client = match state.pool.get().await {
        Ok(client) => client,
        Err(error) => return server_error(error),
    };
    let statement = match client.prepare_cached(&state.sql.update).await {
        Ok(statement) => statement,
        Err(error) => return server_error(error),
    };
    match client.execute(&statement, &[&id, &body]).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => server_error(error),
    }
}

/// no_control (sqlx): the same update, autocommit.
async fn put_autocommit_sqlx(
    Path(id): Path<String>,
    State(state): State<AppState>,
    body: String,
) -> Response {
    match sqlx::query(&state.sql.update)
        .bind(&id)
        .bind(&body)
        .execute(&state.sqlx)
        .await
    {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => server_error(error),
    }
}

static TAGS: AtomicU64 = AtomicU64::new(0);

/// The next version of the `hand_for_update` tables (text, never repeated).
fn next_tag() -> String {
    format!(
        "{:x}-{}",
        TAGS.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    )
}

/// Whether `If-Match` (if any) names exactly `current_tag`, as `hand_for_update`
/// compares: the client sends back the one tag it was given.
fn if_match_passes(headers: &HeaderMap, current_tag: &str) -> bool {
    headers
        .get(header::IF_MATCH)
        .is_none_or(|if_match| if_match.as_bytes() == current_tag.as_bytes())
}

/// hand_for_update (tokio-postgres): what one writes by hand for the guarantee of the
/// transactional mode.
async fn put_hand_written(
    Path(id): Path<String>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut client = match state.pool.get().await {
        Ok(client) => client,
        Err(error) => return server_error(error),
    };
    let result: Result<Response, tokio_postgres::Error> = async {
        let tx = client.transaction().await?;
        let select = tx.prepare_cached(&state.sql.select_for_update).await?;
        let current: String = tx.query_one(&select, &[&id]).await?.get(0);
        let current_tag = format!("\"{current}\"");
        if !if_match_passes(&headers, &current_tag) {
            tx.rollback().await?;
            return Ok(with_tag(StatusCode::PRECONDITION_FAILED, current_tag));
        }
        let next = next_tag();
        let update = tx.prepare_cached(&state.sql.update_versioned).await?;
        tx.execute(&update, &[&id, &body, &next]).await?;
        tx.commit().await?;
        Ok(with_tag(StatusCode::NO_CONTENT, format!("\"{next}\"")))
    }
    .await;
    result.unwrap_or_else(server_error)
}

/// hand_for_update (sqlx): the same four statements.
async fn put_hand_written_sqlx(
    Path(id): Path<String>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let result: Result<Response, sqlx::Error> = async {
        let mut tx = state.sqlx.begin().await?;
        let current: String = sqlx::query_scalar(&state.sql.select_for_update)
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
        let current_tag = format!("\"{current}\"");
        if !if_match_passes(&headers, &current_tag) {
            tx.rollback().await?;
            return Ok(with_tag(StatusCode::PRECONDITION_FAILED, current_tag));
        }
        let next = next_tag();
        sqlx::query(&state.sql.update_versioned)
            .bind(&id)
            .bind(&body)
            .bind(&next)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(with_tag(StatusCode::NO_CONTENT, format!("\"{next}\"")))
    }
    .await;
    result.unwrap_or_else(server_error)
}

/// `If-Match` as `hand_one_statement` reads it.
enum IfMatch {
    /// Absent (or `*`, which the clients never send): the unconditional update.
    Absent,
    /// One strong tag naming a `bigint` version.
    Version(i64),
    /// Anything else (a list, a weak or foreign tag): nothing it names can match.
    Unmatchable,
}

fn parse_if_match(headers: &HeaderMap) -> IfMatch {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return IfMatch::Absent;
    };
    let value = value.as_bytes().trim_ascii();
    if value == b"*" {
        return IfMatch::Absent;
    }
    let number = value
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| digits.parse::<i64>().ok());
    number.map_or(IfMatch::Unmatchable, IfMatch::Version)
}

/// What `hand_one_statement` answers after its update found no row (`current` read
/// afterwards).
fn one_statement_refused(current: Option<i64>) -> Response {
    match current {
        Some(version) => with_tag(StatusCode::PRECONDITION_FAILED, format!("\"{version}\"")),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// hand_one_statement (tokio-postgres): the conditional update by hand, one statement.
async fn put_one_statement_tp(
    Path(id): Path<String>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let client = match state.pool.get().await {
        Ok(client) => client,
        Err(error) => return server_error(error),
    };
    let result: Result<Response, tokio_postgres::Error> = async {
        let row = match parse_if_match(&headers) {
            IfMatch::Absent => {
                let update = client
                    .prepare_cached(&state.sql.one_statement_unconditional)
                    .await?;
                client.query_opt(&update, &[&id, &body]).await?
            }
            IfMatch::Version(version) => {
                let update = client.prepare_cached(&state.sql.one_statement).await?;
                client.query_opt(&update, &[&id, &body, &version]).await?
            }
            IfMatch::Unmatchable => None,
        };
        if let Some(row) = row {
            let version: i64 = row.try_get(0)?;
            return Ok(with_tag(StatusCode::NO_CONTENT, format!("\"{version}\"")));
        }
        let select = client.prepare_cached(&state.sql.select_version).await?;
        let current = match client.query_opt(&select, &[&id]).await? {
            Some(row) => Some(row.try_get::<_, i64>(0)?),
            None => None,
        };
        Ok(one_statement_refused(current))
    }
    .await;
    result.unwrap_or_else(server_error)
}

/// hand_one_statement (sqlx): the same statements.
async fn put_one_statement_sqlx(
    Path(id): Path<String>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let result: Result<Response, sqlx::Error> = async {
        // One checkout for both statements: sqlx pings a connection each time it goes
        // back to the pool, so a checkout per statement would cost a round trip each.
        let mut conn = state.sqlx.acquire().await?;
        let written: Option<i64> = match parse_if_match(&headers) {
            IfMatch::Absent => {
                sqlx::query_scalar(&state.sql.one_statement_unconditional)
                    .bind(&id)
                    .bind(&body)
                    .fetch_optional(&mut *conn)
                    .await?
            }
            IfMatch::Version(version) => {
                sqlx::query_scalar(&state.sql.one_statement)
                    .bind(&id)
                    .bind(&body)
                    .bind(version)
                    .fetch_optional(&mut *conn)
                    .await?
            }
            IfMatch::Unmatchable => None,
        };
        if let Some(version) = written {
            return Ok(with_tag(StatusCode::NO_CONTENT, format!("\"{version}\"")));
        }
        let current: Option<i64> = sqlx::query_scalar(&state.sql.select_version)
            .bind(&id)
            .fetch_optional(&mut *conn)
            .await?;
        Ok(one_statement_refused(current))
    }
    .await;
    result.unwrap_or_else(server_error)
}

/// What `row_version` answers after its update found no row: `412` with the current
/// version (the layer writes it), or `404` when the row is missing.
fn row_refused(condition: &RowPrecondition, current: Option<row_version::RowVersion>) -> Response {
    match condition.not_applied(current) {
        Some(not_applied) => not_applied.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// row_version (tokio-postgres): one conditional statement; the condition's four
/// parameters from `SqlCondition::params`.
async fn put_row_version_tp<const SPECIALIZED: bool>(
    Path(id): Path<String>,
    State(state): State<AppState>,
    condition: RowPrecondition,
    body: String,
) -> Response {
    let client = match state.pool.get().await {
        Ok(client) => client,
        Err(error) => return server_error(error),
    };
    let result: Result<Response, tokio_postgres::Error> = async {
        let values = condition.sql();
        let written = if SPECIALIZED {
            let update = client
                .prepare_cached(state.sql.row_update.text(&values))
                .await?;
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&id, &body];
            params.extend_from_slice(&values.specialized_params());
            client.query_opt(&update, &params).await?
        } else {
            let update = client.prepare_cached(&state.sql.row_update_generic).await?;
            let [a, b, c, d] = values.params();
            let params: [&(dyn ToSql + Sync); 6] = [&id, &body, a, b, c, d];
            client.query_opt(&update, &params).await?
        };
        if let Some(row) = written {
            let version = row_version::tokio_postgres::row_version(&row)?;
            return Ok((version, StatusCode::NO_CONTENT).into_response());
        }
        let read = client.prepare_cached(&state.sql.row_read).await?;
        let current = match client.query_opt(&read, &[&id]).await? {
            Some(row) => Some(row_version::tokio_postgres::row_version(&row)?),
            None => None,
        };
        Ok(row_refused(&condition, current))
    }
    .await;
    result.unwrap_or_else(server_error)
}

/// row_version (sqlx): one conditional statement, the condition bound with
/// `bind_condition`.
async fn put_row_version_sqlx<const SPECIALIZED: bool>(
    Path(id): Path<String>,
    State(state): State<AppState>,
    condition: RowPrecondition,
    body: String,
) -> Response {
    let result: Result<Response, sqlx::Error> = async {
        // One checkout for the write and the read after a refusal (see
        // `put_one_statement_sqlx`).
        let mut conn = state.sqlx.acquire().await?;
        let values = condition.sql();
        let written = if SPECIALIZED {
            sqlx::query(state.sql.row_update.text(&values))
                .bind(&id)
                .bind(&body)
                .bind_specialized(&values)
                .fetch_optional(&mut *conn)
                .await?
        } else {
            sqlx::query(&state.sql.row_update_generic)
                .bind(&id)
                .bind(&body)
                .bind_condition(&values)
                .fetch_optional(&mut *conn)
                .await?
        };
        if let Some(row) = written {
            let version = row_version::sqlx::row_version(&row)?;
            return Ok((version, StatusCode::NO_CONTENT).into_response());
        }
        let current = sqlx::query(&state.sql.row_read)
            .bind(&id)
            .fetch_optional(&mut *conn)
            .await?
            .map(|row| row_version::sqlx::row_version(&row))
            .transpose()?;
        Ok(row_refused(&condition, current))
    }
    .await;
    result.unwrap_or_else(server_error)
}

#[derive(Clone)]
struct Pools {
    deadpool: Pool,
    sqlx: PgPool,
}

fn router(variant: Variant, pools: &Pools) -> Router {
    let state = AppState {
        pool: pools.deadpool.clone(),
        sqlx: pools.sqlx.clone(),
        sql: Arc::new(Statements::new(variant.items)),
    };
    let store = || {
        PostgresStore::new(pools.deadpool.clone())
            .table(VERSIONS)
            .expect("valid table name")
    };
    let route = |handler| Router::new().route("/items/{id}", handler);
    match (variant.kind, variant.driver) {
        (Kind::Transactional, Driver::TokioPostgres) => route(put(put_transactional))
            .with_state(state)
            .layer(PgTransactionalLayer::new(store())),
        (Kind::Store, Driver::TokioPostgres) => route(put(put_autocommit))
            .with_state(state)
            .layer(PreconditionLayer::new(store())),
        (Kind::Transactional | Kind::Store, Driver::Sqlx) => {
            unreachable!("the transactional and store modes run on tokio-postgres only")
        }
        (Kind::HandForUpdate, Driver::TokioPostgres) => {
            route(put(put_hand_written)).with_state(state)
        }
        (Kind::HandForUpdate, Driver::Sqlx) => route(put(put_hand_written_sqlx)).with_state(state),
        (Kind::HandOneStatement, Driver::TokioPostgres) => {
            route(put(put_one_statement_tp)).with_state(state)
        }
        (Kind::HandOneStatement, Driver::Sqlx) => {
            route(put(put_one_statement_sqlx)).with_state(state)
        }
        (Kind::RowVersion, Driver::TokioPostgres) => route(put(put_row_version_tp::<true>))
            .with_state(state)
            .route_layer(RowVersionLayer::new()),
        (Kind::RowVersion, Driver::Sqlx) => route(put(put_row_version_sqlx::<true>))
            .with_state(state)
            .route_layer(RowVersionLayer::new()),
        (Kind::RowVersionGeneric, Driver::TokioPostgres) => route(put(put_row_version_tp::<false>))
            .with_state(state)
            .route_layer(RowVersionLayer::new()),
        (Kind::RowVersionGeneric, Driver::Sqlx) => route(put(put_row_version_sqlx::<false>))
            .with_state(state)
            .route_layer(RowVersionLayer::new()),
        (Kind::NoControl, Driver::TokioPostgres) => route(put(put_autocommit)).with_state(state),
        (Kind::NoControl, Driver::Sqlx) => route(put(put_autocommit_sqlx)).with_state(state),
    }
}

fn deadpool(url: &str, size: usize) -> Pool {
    let pg: tokio_postgres::Config = url.parse().expect("valid DATABASE_URL");
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .expect("pool")
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    ok: u64,
    refused_412: u64,
    refused_412_without_etag: u64,
    refused_409: u64,
    server_error: u64,
    other: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.ok += other.ok;
        self.refused_412 += other.refused_412;
        self.refused_412_without_etag += other.refused_412_without_etag;
        self.refused_409 += other.refused_409;
        self.server_error += other.server_error;
        self.other += other.other;
    }
}

/// One client: writes its keys in turn until `stop`, keeping each key's last tag.
async fn client(app: Router, keys: Vec<String>, stop: Instant, measure_from: Instant) -> Tally {
    let mut tags: HashMap<String, String> = HashMap::new();
    let mut tally = Tally::default();
    let mut n: u64 = 0;
    while Instant::now() < stop {
        let key = &keys[(n as usize) % keys.len()];
        n += 1;
        let mut request = Request::put(format!("/items/{key}"));
        if let Some(tag) = tags.get(key) {
            request = request.header(header::IF_MATCH, tag);
        }
        let request = request
            .body(Body::from(format!("{{\"n\":{n}}}")))
            .expect("request");
        let started = Instant::now();
        let response = app.clone().oneshot(request).await.expect("infallible");
        let elapsed = started.elapsed();
        let status = response.status();
        let etag = response.headers().get(header::ETAG);
        let has_etag = etag.is_some();
        if let Some(tag) = etag {
            tags.insert(key.clone(), tag.to_str().expect("ascii tag").to_owned());
        }
        if started < measure_from {
            continue; // warm-up: seeds tags, connections and prepared statements
        }
        tally.latencies.push(elapsed);
        match status {
            s if s.is_success() => tally.ok += 1,
            StatusCode::PRECONDITION_FAILED => {
                tally.refused_412 += 1;
                if !has_etag {
                    tally.refused_412_without_etag += 1;
                }
            }
            StatusCode::CONFLICT => {
                tally.refused_409 += 1;
                // Honour the spirit of Retry-After without sleeping a whole second:
                // a 409 answers at once, and spinning on it would measure the spin.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            s if s.is_server_error() => tally.server_error += 1,
            _ => tally.other += 1,
        }
    }
    tally
}

/// Drops and re-creates the bench's own tables (and only those), seeds every key, and
/// analyzes them.
async fn reset(pool: &Pool, keys: &[String]) {
    let client = pool.get().await.expect("connection");
    let mut sql = format!("SET client_min_messages = warning; DROP TABLE IF EXISTS {VERSIONS}; ");
    for variant in VARIANTS {
        let items = variant.items;
        let version = match variant.kind {
            Kind::RowVersion | Kind::RowVersionGeneric => {
                // Shared by the row-version tables, and never dropped: a version never
                // repeats, across runs too.
                sql.push_str(&format!("{}; ", row_sql(items).create_sequence()));
                "version BIGINT NOT NULL, modified_at TIMESTAMPTZ NOT NULL"
            }
            Kind::HandOneStatement => "version BIGINT NOT NULL DEFAULT 1",
            Kind::HandForUpdate | Kind::NoControl | Kind::Transactional | Kind::Store => {
                "version TEXT NOT NULL DEFAULT md5(random()::text)"
            }
        };
        sql.push_str(&format!(
            "DROP TABLE IF EXISTS {items}; \
             CREATE TABLE {items} (id TEXT PRIMARY KEY, body TEXT NOT NULL, {version}); "
        ));
    }
    client.batch_execute(&sql).await.expect("reset tables");
    PostgresStore::new(pool.clone())
        .table(VERSIONS)
        .expect("name")
        .migrate()
        .await
        .expect("migrate");
    for variant in VARIANTS {
        let items = variant.items;
        let insert = match variant.kind {
            Kind::RowVersion | Kind::RowVersionGeneric => {
                let v = row_sql(items);
                format!(
                    "INSERT INTO {items} (id, body, {}) SELECT k, '{{}}', {} \
                     FROM unnest($1::text[]) AS k",
                    v.insert_columns(),
                    v.insert_values()
                )
            }
            _ => format!("INSERT INTO {items} (id, body) SELECT unnest($1::text[]), '{{}}'"),
        };
        client.execute(&insert, &[&keys]).await.expect("seed items");
    }
    let tables: Vec<&str> = VARIANTS.iter().map(|v| v.items).collect();
    client
        .batch_execute(&format!("VACUUM ANALYZE {VERSIONS}, {}", tables.join(", ")))
        .await
        .expect("vacuum");
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Spread,
    Hot,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Spread => "spread",
            Scenario::Hot => "hot",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Scenario::Spread => "spread keys",
            Scenario::Hot => "one hot key",
        }
    }
}

/// One variant's figures in one round.
struct RoundStat {
    writes_per_s: f64,
    p99_ms: f64,
}

struct Row {
    variant: Variant,
    scenario: Scenario,
    secs: f64,
    tally: Tally,
    rounds: Vec<RoundStat>,
    cpu: Cpu,
    /// WAL flushes (`pg_stat_wal.wal_sync`) while it ran; `None` if unknown.
    wal_flushes: Option<u64>,
}

impl Row {
    /// CPU microseconds per request: this process's, and the server's.
    /// WAL flushes per request: about one per commit that wrote WAL, fewer when
    /// commits share a flush.
    fn wal_flushes_per_request(&self) -> Option<f64> {
        let requests = self.tally.latencies.len().max(1) as f64;
        self.wal_flushes.map(|n| n as f64 / requests)
    }

    fn cpu_us_per_request(&self) -> (f64, f64) {
        let requests = self.tally.latencies.len().max(1) as f64;
        let us = |ticks: u64| ticks as f64 / TICKS_PER_SECOND * 1e6 / requests;
        (us(self.cpu.app), us(self.cpu.postgres))
    }

    fn writes_per_s(&self) -> f64 {
        self.tally.ok as f64 / self.secs
    }

    /// Of all requests, in milliseconds (latencies sorted).
    fn p99_ms(&self) -> f64 {
        percentile(&self.tally.latencies, 0.99).as_secs_f64() * 1e3
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Settings {
    url: String,
    clients: usize,
    secs: u64,
    rounds: usize,
    only: Option<Vec<String>>,
    scenarios: Vec<Scenario>,
    filler_rows: usize,
    sqlx_test_before_acquire: bool,
}

fn main() {
    let Ok(url) = env::var("DATABASE_URL") else {
        eprintln!("skipped: set DATABASE_URL to run");
        return;
    };
    let settings = Settings {
        url,
        clients: env_or("BENCH_CLIENTS", 16),
        secs: env_or("BENCH_SECS", 3),
        rounds: env_or("BENCH_ROUNDS", 2),
        only: env::var("BENCH_VARIANTS")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| v.split(',').map(|name| name.trim().to_owned()).collect()),
        scenarios: [Scenario::Spread, Scenario::Hot]
            .into_iter()
            .filter(|s| {
                env::var("BENCH_SCENARIOS")
                    .ok()
                    .filter(|v| !v.trim().is_empty())
                    .is_none_or(|v| v.split(',').any(|name| name.trim() == s.name()))
            })
            .collect(),
        filler_rows: env_or("BENCH_FILLER_ROWS", 10_000),
        sqlx_test_before_acquire: env_or::<u8>("BENCH_SQLX_TEST_BEFORE_ACQUIRE", 0) != 0,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(settings));
}

async fn run(settings: Settings) {
    let Settings {
        ref url,
        clients,
        secs,
        rounds,
        ..
    } = settings;
    let pools = Pools {
        deadpool: deadpool(url, clients),
        sqlx: PgPoolOptions::new()
            .max_connections(u32::try_from(clients).expect("BENCH_CLIENTS fits in u32"))
            .test_before_acquire(settings.sqlx_test_before_acquire)
            .connect(url)
            .await
            .expect("sqlx pool"),
    };
    // A connection of its own for the server's statistics, outside both pools.
    let (stats, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("statistics connection");
    tokio::spawn(connection);
    let variants: Vec<Variant> = VARIANTS
        .into_iter()
        .filter(|v| {
            settings.only.as_ref().is_none_or(|only| {
                only.iter().any(|name| {
                    *name == v.kind.name()
                        || *name == format!("{}/{}", v.kind.name(), v.driver.name())
                })
            })
        })
        .collect();
    let spread: Vec<Vec<String>> = (0..clients)
        .map(|c| {
            (0..KEYS_PER_CLIENT)
                .map(|k| format!("spread-{c}-{k}"))
                .collect()
        })
        .collect();
    let hot = vec![vec!["hot".to_owned()]; clients];
    let mut all_keys: Vec<String> = spread.iter().flatten().cloned().collect();
    all_keys.push("hot".to_owned());
    // Rows nobody writes, so that each table is the size of a real one and the planner
    // finds the row by its primary key (on 129 rows it scans the whole table).
    all_keys.extend((0..settings.filler_rows).map(|n| format!("filler-{n}")));
    reset(&pools.deadpool, &all_keys).await;
    let server = pools
        .deadpool
        .get()
        .await
        .expect("connection")
        .query_one(
            "SELECT version(), current_setting('synchronous_commit'), current_setting('fsync')",
            &[],
        )
        .await
        .expect("settings");
    println!(
        "{} | synchronous_commit={} fsync={}",
        server.get::<_, String>(0),
        server.get::<_, String>(1),
        server.get::<_, String>(2)
    );
    println!(
        "load average at the start: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "{clients} clients, {secs} s per run (+1 s warm-up), {rounds} rounds, \
         {} rows per table, pools of {clients} (deadpool RecyclingMethod::Fast; sqlx test_before_acquire={})\n",
        all_keys.len(),
        settings.sqlx_test_before_acquire
    );

    let mut rows: Vec<Row> = Vec::new();
    for &scenario in &settings.scenarios {
        let keys = match scenario {
            Scenario::Spread => &spread,
            Scenario::Hot => &hot,
        };
        for round in 0..rounds {
            // Forward, then backward (A B C, C B A, ...): a load that drifts during the
            // run weighs on every variant alike.
            let order: Vec<Variant> = if round.is_multiple_of(2) {
                variants.clone()
            } else {
                variants.iter().rev().copied().collect()
            };
            for variant in order {
                let app = router(variant, &pools);
                let start = Instant::now();
                let measure_from = start + Duration::from_secs(1);
                let stop = measure_from + Duration::from_secs(secs);
                let tasks: Vec<_> = keys
                    .iter()
                    .map(|k| tokio::spawn(client(app.clone(), k.clone(), stop, measure_from)))
                    .collect();
                tokio::time::sleep_until(measure_from.into()).await;
                let cpu_before = Cpu::now();
                let wal_before = wal_flushes(&stats).await;
                tokio::time::sleep_until(stop.into()).await;
                let cpu = Cpu::now().since(&cpu_before);
                let wal = wal_flushes(&stats)
                    .await
                    .zip(wal_before)
                    .map(|(after, before)| after.saturating_sub(before));
                let mut tally = Tally::default();
                for task in tasks {
                    tally.merge(task.await.expect("client"));
                }
                let elapsed = stop.saturating_duration_since(measure_from).as_secs_f64();
                let mut sorted = tally.latencies.clone();
                sorted.sort();
                let this_round = RoundStat {
                    writes_per_s: tally.ok as f64 / elapsed,
                    p99_ms: percentile(&sorted, 0.99).as_secs_f64() * 1e3,
                };
                let index = match rows
                    .iter()
                    .position(|r| r.variant == variant && r.scenario == scenario)
                {
                    Some(index) => index,
                    None => {
                        rows.push(Row {
                            variant,
                            scenario,
                            secs: 0.0,
                            tally: Tally::default(),
                            rounds: Vec::new(),
                            cpu: Cpu::default(),
                            wal_flushes: Some(0),
                        });
                        rows.len() - 1
                    }
                };
                let row = &mut rows[index];
                row.secs += elapsed;
                row.tally.merge(tally);
                row.rounds.push(this_round);
                row.cpu.add(&cpu);
                row.wal_flushes = row.wal_flushes.zip(wal).map(|(sum, n)| sum + n);
            }
        }
    }
    for row in &mut rows {
        row.tally.latencies.sort();
    }
    println!(
        "load average at the end: {}\n",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    report(&rows);
}

/// WAL flushes of the whole server so far (`pg_stat_wal`, Postgres 14 and later).
async fn wal_flushes(client: &tokio_postgres::Client) -> Option<u64> {
    let row = client
        .query_one("SELECT wal_sync FROM pg_stat_wal", &[])
        .await
        .ok()?;
    row.try_get::<_, i64>(0)
        .ok()
        .and_then(|n| u64::try_from(n).ok())
}

/// CPU time used so far, in clock ticks (`/proc/<pid>/stat` utime + stime): this
/// process (the clients, the router, the layers and the drivers), and every process
/// named `postgres` (the server; other databases' backends count too, so read it as
/// an upper bound on a busy machine). Linux only; elsewhere zero.
#[derive(Default, Clone, Copy)]
struct Cpu {
    app: u64,
    postgres: u64,
}

/// `USER_HZ`, the unit of `/proc/<pid>/stat` times, on every common Linux build.
const TICKS_PER_SECOND: f64 = 100.0;

fn stat_ticks(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

impl Cpu {
    fn now() -> Self {
        let app = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| stat_ticks(&stat))
            .map_or(0, |(_, ticks)| ticks);
        let mut postgres = 0;
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let name = entry.file_name();
                if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                    continue;
                };
                if let Some((comm, ticks)) = stat_ticks(&stat) {
                    if comm == "postgres" {
                        postgres += ticks;
                    }
                }
            }
        }
        Self { app, postgres }
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            app: self.app.saturating_sub(before.app),
            postgres: self.postgres.saturating_sub(before.postgres),
        }
    }

    fn add(&mut self, other: &Cpu) {
        self.app += other.app;
        self.postgres += other.postgres;
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// A ratio of `row` to `base`, two ways: of the figures over all rounds, and the
/// median of the ratios within each round (the two ran minutes apart at most, so the
/// per-round ratio is the one a change in the machine's load disturbs least).
struct Ratio {
    pooled: f64,
    per_round: f64,
}

fn ratio(row: &Row, base: &Row, figure: impl Fn(&RoundStat) -> f64, pooled: f64) -> Ratio {
    let per_round = row
        .rounds
        .iter()
        .zip(&base.rounds)
        .map(|(r, b)| figure(r) / figure(b))
        .collect();
    Ratio {
        pooled,
        per_round: median(per_round),
    }
}

fn report(rows: &[Row]) {
    println!(
        "| scenario | variant | driver | successful writes/s | requests/s | p50 | p99 \
         | 2xx | 412 | 412 without ETag | 409 | 5xx | other | app CPU/request | server CPU/request \
         | WAL flushes/request |"
    );
    println!(
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: \
         | ---: | ---: | ---: | ---: |"
    );
    for row in rows {
        let t = &row.tally;
        let (app_us, pg_us) = row.cpu_us_per_request();
        let wal = row
            .wal_flushes_per_request()
            .map_or_else(|| "-".to_owned(), |n| format!("{n:.2}"));
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.1} ms | {:.1} ms | {} | {} | {} | {} | {} | {} \
             | {app_us:.0} µs | {pg_us:.0} µs | {wal} |",
            row.scenario.label(),
            row.variant.kind.name(),
            row.variant.driver.name(),
            row.writes_per_s(),
            t.latencies.len() as f64 / row.secs,
            percentile(&t.latencies, 0.50).as_secs_f64() * 1e3,
            row.p99_ms(),
            t.ok,
            t.refused_412,
            t.refused_412_without_etag,
            t.refused_409,
            t.server_error,
            t.other
        );
    }
    println!();
    for row in rows {
        println!(
            "variant={} driver={} scenario={} writes_per_s={:.0} p99_ms={:.2}",
            row.variant.kind.name(),
            row.variant.driver.name(),
            row.scenario.name(),
            row.writes_per_s(),
            row.p99_ms()
        );
    }
    println!();
    for row in rows {
        let t = &row.tally;
        println!(
            "counts variant={} driver={} scenario={} 2xx={} 412={} 412_without_etag={} \
             409={} 5xx={} other={}",
            row.variant.kind.name(),
            row.variant.driver.name(),
            row.scenario.name(),
            t.ok,
            t.refused_412,
            t.refused_412_without_etag,
            t.refused_409,
            t.server_error,
            t.other
        );
    }

    let find = |kind: Kind, driver: Driver, scenario: Scenario| {
        rows.iter().find(|r| {
            r.variant.kind == kind && r.variant.driver == driver && r.scenario == scenario
        })
    };
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "\nratios of successful writes/s, same driver, spread keys (median of the per-round \
         ratios; over all rounds in brackets):"
    );
    for driver in [Driver::Sqlx, Driver::TokioPostgres] {
        let Some(rv) = find(Kind::RowVersion, driver, Scenario::Spread) else {
            continue;
        };
        // `None`: no target, the specialized text against the generic one.
        for (base, target) in [
            (Kind::HandForUpdate, Some(1.6)),
            (Kind::HandOneStatement, Some(0.9)),
            (Kind::NoControl, Some(0.9)),
            (Kind::RowVersionGeneric, None),
        ] {
            let Some(base_row) = find(base, driver, Scenario::Spread) else {
                continue;
            };
            let r = ratio(
                rv,
                base_row,
                |s| s.writes_per_s,
                rv.writes_per_s() / base_row.writes_per_s(),
            );
            let judged = match target {
                Some(target) => format!("(target >= {target}) {}", verdict(r.per_round >= target)),
                None => "(the text specialized per condition against the generic one)".to_owned(),
            };
            println!(
                "  ratio driver={} scenario=spread row_version/{}={:.2} [{:.2}] {judged}",
                driver.name(),
                base.name(),
                r.per_round,
                r.pooled,
            );
        }
    }
    println!("\nhot key (target):");
    let hot: Vec<&Row> = rows
        .iter()
        .filter(|r| r.scenario == Scenario::Hot)
        .collect();
    let server_errors: u64 = hot.iter().map(|r| r.tally.server_error).sum();
    let without_etag: u64 = hot.iter().map(|r| r.tally.refused_412_without_etag).sum();
    let refused: u64 = hot.iter().map(|r| r.tally.refused_412).sum();
    if !hot.is_empty() {
        println!(
            "  check scenario=hot 5xx_total={server_errors} (target 0) {}",
            verdict(server_errors == 0)
        );
        println!(
            "  check scenario=hot 412_without_etag_total={without_etag} of {refused} 412s \
             (target 0) {}",
            verdict(without_etag == 0)
        );
    }
    for driver in [Driver::Sqlx, Driver::TokioPostgres] {
        let (Some(rv), Some(fu)) = (
            find(Kind::RowVersion, driver, Scenario::Hot),
            find(Kind::HandForUpdate, driver, Scenario::Hot),
        ) else {
            continue;
        };
        let p99 = ratio(rv, fu, |s| s.p99_ms, rv.p99_ms() / fu.p99_ms());
        println!(
            "  ratio driver={} scenario=hot p99 row_version/hand_for_update={:.2} [{:.2}: \
             {:.2} ms / {:.2} ms] (target <= 1.00: no worse) {}",
            driver.name(),
            p99.per_round,
            p99.pooled,
            rv.p99_ms(),
            fu.p99_ms(),
            verdict(p99.per_round <= 1.0)
        );
        let writes = ratio(
            rv,
            fu,
            |s| s.writes_per_s,
            rv.writes_per_s() / fu.writes_per_s(),
        );
        println!(
            "  ratio driver={} scenario=hot writes_per_s row_version/hand_for_update={:.2} [{:.2}]",
            driver.name(),
            writes.per_round,
            writes.pooled
        );
    }

    println!(
        "\nratios of successful writes/s and p99 to hand_for_update of the same driver \
         (median of the per-round ratios):"
    );
    for scenario in [Scenario::Spread, Scenario::Hot] {
        for row in rows.iter().filter(|r| r.scenario == scenario) {
            let Some(base) = find(Kind::HandForUpdate, row.variant.driver, scenario) else {
                continue;
            };
            let writes = ratio(row, base, |s| s.writes_per_s, 0.0);
            let p99 = ratio(row, base, |s| s.p99_ms, 0.0);
            println!(
                "  {:<12} {:<19} {:<15} throughput x{:.2}  p99 x{:.2}",
                scenario.label(),
                row.variant.kind.name(),
                row.variant.driver.name(),
                writes.per_round,
                p99.per_round
            );
        }
    }
}
