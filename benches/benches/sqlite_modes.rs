//! Write throughput and latency of four ways to make an HTTP update safe (or not) on
//! SQLite, side by side in one run on one database file (a temporary one):
//!
//! * `row_version`: the row-version mode (`RowVersionLayer` and `SqliteRowSql`): the
//!   precondition in the write statement itself, one statement;
//! * `hand_immediate`: a hand-written handler: `BEGIN IMMEDIATE; SELECT version;`
//!   compare with `If-Match`; `UPDATE ...; COMMIT`;
//! * `hand_one_statement`: a hand-written conditional `UPDATE ... WHERE id = ?1 AND
//!   version = ?3 RETURNING version` (a read for the `412`'s tag when it changes no
//!   row);
//! * `no_control`: the same update with no concurrency control at all (lost updates
//!   allowed).
//!
//! Each variant runs with the same number of concurrent clients, first on spread keys
//! (each client cycles over keys of its own), then on one hot key (every client writes
//! the same row). A client sends `PUT` with `If-Match` set to the last tag it saw (from
//! its last success, or from the `412` that refused it). Requests go through the axum
//! router in process (no sockets). SQLite runs one write at a time per file, whatever
//! the variant, so the spread scenario measures the cost per write, and the hot one
//! adds the refused writes.
//!
//! ```text
//! cargo bench --manifest-path benches/Cargo.toml --features sqlite --bench sqlite_modes
//! ```
//!
//! Environment: `BENCH_CLIENTS` (default 16), `BENCH_POOL` (connections, default 4),
//! `BENCH_SECS` per run (default 3), `BENCH_ROUNDS` (default 2; the variants alternate
//! within each round).

use std::{
    collections::HashMap,
    env,
    path::PathBuf,
    sync::Arc,
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
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions},
    SqlitePool,
};
use tower::ServiceExt;
use tower_precondition::row_version::{
    sqlx::{row_version, BindCondition},
    RowPrecondition, RowVersionLayer, SqliteRowSql,
};

/// Keys each client cycles over in the spread scenario.
const KEYS_PER_CLIENT: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    RowVersion,
    HandImmediate,
    HandOneStatement,
    NoControl,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::RowVersion,
        Variant::HandImmediate,
        Variant::HandOneStatement,
        Variant::NoControl,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::RowVersion => "row_version",
            Variant::HandImmediate => "hand_immediate",
            Variant::HandOneStatement => "hand_one_statement",
            Variant::NoControl => "no_control",
        }
    }

    fn items(self) -> String {
        format!("bench_items_{}", self.name())
    }
}

#[derive(Clone)]
struct AppState {
    pool: SqlitePool,
    sql: Arc<Statements>,
}

struct Statements {
    /// The row-version mode's statements.
    upsert: String,
    update: String,
    read: String,
    /// The hand-written ones.
    select_version: String,
    update_next: String,
    update_if: String,
    update_plain: String,
}

impl Statements {
    fn new(items: &str) -> Self {
        let v = SqliteRowSql::new(items);
        Self {
            upsert: format!(
                "INSERT INTO {items} (id, body, {}) VALUES (?1, ?2, {}) ON CONFLICT (id) DO UPDATE \
                 SET body = excluded.body, {} WHERE {} RETURNING {}",
                v.insert_columns(),
                v.insert_values(),
                v.assignments(),
                v.condition(3),
                v.returning()
            ),
            update: format!(
                "UPDATE {items} SET body = ?2, {} WHERE id = ?1 AND {} RETURNING {}",
                v.assignments(),
                v.condition(3),
                v.returning()
            ),
            read: format!("SELECT {} FROM {items} WHERE id = ?1", v.returning()),
            select_version: format!("SELECT version FROM {items} WHERE id = ?1"),
            update_next: format!(
                "UPDATE {items} SET body = ?2, version = version + 1 WHERE id = ?1 RETURNING version"
            ),
            update_if: format!(
                "UPDATE {items} SET body = ?2, version = version + 1 \
                 WHERE id = ?1 AND (?3 IS NULL OR version = ?3) RETURNING version"
            ),
            update_plain: format!("UPDATE {items} SET body = ?2 WHERE id = ?1"),
        }
    }
}

fn server_error(error: sqlx::Error) -> Response {
    // Busy past the timeout and every other failure: nothing was written.
    eprintln!("handler error: {error}");
    StatusCode::SERVICE_UNAVAILABLE.into_response()
}

fn tag_of(version: i64) -> [(header::HeaderName, String); 1] {
    [(header::ETAG, format!("\"{version}\""))]
}

/// The version a hand-written handler's `If-Match` names (`Some(None)`: no
/// `If-Match`; `None`: one that names no version).
fn hand_if_match(headers: &HeaderMap) -> Option<Option<i64>> {
    match headers.get(header::IF_MATCH) {
        None => Some(None),
        Some(value) => {
            let value = value.to_str().ok()?;
            let inner = value.strip_prefix('"')?.strip_suffix('"')?;
            inner.parse().ok().map(Some)
        }
    }
}

/// `row_version`: one statement, the condition in it.
async fn put_row_version(
    Path(id): Path<String>,
    State(state): State<AppState>,
    condition: RowPrecondition,
    body: String,
) -> Response {
    let statement = if condition.may_create() {
        &state.sql.upsert
    } else {
        &state.sql.update
    };
    let written = sqlx::query(statement)
        .bind(&id)
        .bind(body)
        .bind_condition(&condition.sql())
        .fetch_all(&state.pool)
        .await
        .map(|rows| rows.into_iter().next());
    match written {
        Ok(Some(row)) => match row_version(&row) {
            Ok(version) => (StatusCode::NO_CONTENT, version, ()).into_response(),
            Err(error) => server_error(error),
        },
        Ok(None) => {
            let current = sqlx::query(&state.sql.read)
                .bind(&id)
                .fetch_optional(&state.pool)
                .await;
            match current {
                Ok(row) => match row.as_ref().map(row_version).transpose() {
                    Ok(current) => match condition.not_applied(current) {
                        Some(refused) => refused.into_response(),
                        None => StatusCode::NOT_FOUND.into_response(),
                    },
                    Err(error) => server_error(error),
                },
                Err(error) => server_error(error),
            }
        }
        Err(error) => server_error(error),
    }
}

/// `hand_immediate`: read, compare, write, in a `BEGIN IMMEDIATE` transaction.
async fn put_hand_immediate(
    Path(id): Path<String>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let Some(expected) = hand_if_match(&headers) else {
        return StatusCode::PRECONDITION_FAILED.into_response();
    };
    let result: Result<Response, sqlx::Error> = async {
        let mut tx = state.pool.begin_with("BEGIN IMMEDIATE").await?;
        let current: i64 = sqlx::query_scalar(&state.sql.select_version)
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
        if expected.is_some_and(|expected| expected != current) {
            return Ok((StatusCode::PRECONDITION_FAILED, tag_of(current)).into_response());
        }
        let next: i64 = sqlx::query_scalar(&state.sql.update_next)
            .bind(&id)
            .bind(body)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((StatusCode::NO_CONTENT, tag_of(next)).into_response())
    }
    .await;
    result.unwrap_or_else(server_error)
}

/// `hand_one_statement`: the conditional `UPDATE`, and a read when it is refused.
async fn put_hand_one_statement(
    Path(id): Path<String>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let Some(expected) = hand_if_match(&headers) else {
        return StatusCode::PRECONDITION_FAILED.into_response();
    };
    let written: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(&state.sql.update_if)
        .bind(&id)
        .bind(body)
        .bind(expected)
        .fetch_all(&state.pool)
        .await
        .map(|rows| rows.into_iter().next());
    match written {
        Ok(Some(next)) => (StatusCode::NO_CONTENT, tag_of(next)).into_response(),
        Ok(None) => {
            let current: Result<i64, _> = sqlx::query_scalar(&state.sql.select_version)
                .bind(&id)
                .fetch_one(&state.pool)
                .await;
            match current {
                Ok(current) => (StatusCode::PRECONDITION_FAILED, tag_of(current)).into_response(),
                Err(error) => server_error(error),
            }
        }
        Err(error) => server_error(error),
    }
}

/// `no_control`: the update, whatever the client saw.
async fn put_no_control(
    Path(id): Path<String>,
    State(state): State<AppState>,
    body: String,
) -> Response {
    match sqlx::query(&state.sql.update_plain)
        .bind(&id)
        .bind(body)
        .execute(&state.pool)
        .await
    {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => server_error(error),
    }
}

fn router(variant: Variant, pool: &SqlitePool) -> Router {
    let state = AppState {
        pool: pool.clone(),
        sql: Arc::new(Statements::new(&variant.items())),
    };
    match variant {
        Variant::RowVersion => Router::new()
            .route("/items/{id}", put(put_row_version))
            .with_state(state)
            .layer(RowVersionLayer::new()),
        Variant::HandImmediate => Router::new()
            .route("/items/{id}", put(put_hand_immediate))
            .with_state(state),
        Variant::HandOneStatement => Router::new()
            .route("/items/{id}", put(put_hand_one_statement))
            .with_state(state),
        Variant::NoControl => Router::new()
            .route("/items/{id}", put(put_no_control))
            .with_state(state),
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    ok: u64,
    refused_412: u64,
    errors_5xx: u64,
    other: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.ok += other.ok;
        self.refused_412 += other.refused_412;
        self.errors_5xx += other.errors_5xx;
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
        if let Some(tag) = response.headers().get(header::ETAG) {
            tags.insert(key.clone(), tag.to_str().expect("ascii tag").to_owned());
        }
        if started < measure_from {
            continue; // warm-up: seeds tags and prepared statements
        }
        tally.latencies.push(elapsed);
        match status {
            s if s.is_success() => tally.ok += 1,
            StatusCode::PRECONDITION_FAILED => tally.refused_412 += 1,
            s if s.is_server_error() => tally.errors_5xx += 1,
            _ => tally.other += 1,
        }
    }
    tally
}

async fn reset(pool: &SqlitePool, keys: &[String]) {
    for variant in Variant::ALL {
        let items = variant.items();
        sqlx::raw_sql(&format!(
            "DROP TABLE IF EXISTS {items}; \
             CREATE TABLE {items} (id TEXT PRIMARY KEY, body TEXT NOT NULL, \
             version INTEGER NOT NULL, modified_us INTEGER NOT NULL);"
        ))
        .execute(pool)
        .await
        .expect("reset tables");
        sqlx::raw_sql(&SqliteRowSql::new(&items).migration())
            .execute(pool)
            .await
            .expect("migrate");
        let mut tx = pool.begin().await.expect("begin");
        let v = SqliteRowSql::new(&items);
        let insert = format!(
            "INSERT INTO {items} (id, body, {}) VALUES (?1, '{{}}', {})",
            v.insert_columns(),
            v.insert_values()
        );
        for key in keys {
            sqlx::query(&insert)
                .bind(key)
                .execute(&mut *tx)
                .await
                .expect("seed items");
        }
        tx.commit().await.expect("commit");
    }
}

struct Line {
    variant: Variant,
    scenario: &'static str,
    secs: f64,
    tally: Tally,
}

impl Line {
    fn writes_per_s(&self) -> f64 {
        self.tally.ok as f64 / self.secs
    }

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

fn setting(name: &str, default: u64) -> u64 {
    env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let clients = setting("BENCH_CLIENTS", 16) as usize;
    let pool_size = setting("BENCH_POOL", 4) as u32;
    let secs = setting("BENCH_SECS", 3);
    let rounds = setting("BENCH_ROUNDS", 2) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(clients, pool_size, secs, rounds));
}

/// A database file of this run's own, removed before and after.
struct TempDatabase(PathBuf);

impl TempDatabase {
    fn new() -> Self {
        let path = env::temp_dir().join(format!("sqlite_modes-{}.db", std::process::id()));
        let db = Self(path);
        db.remove();
        db
    }

    fn remove(&self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        self.remove();
    }
}

async fn run(clients: usize, pool_size: u32, secs: u64, rounds: usize) {
    let file = TempDatabase::new();
    let options = SqliteConnectOptions::new()
        .filename(&file.0)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new()
        .max_connections(pool_size)
        .connect_with(options)
        .await
        .expect("open the database");
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
    reset(&pool, &all_keys).await;
    let (version, synchronous): (String, i64) =
        sqlx::query_as("SELECT sqlite_version(), (SELECT synchronous FROM pragma_synchronous)")
            .fetch_one(&pool)
            .await
            .expect("settings");
    println!(
        "SQLite {version} | journal_mode=wal synchronous={synchronous} busy_timeout=5s | {}",
        file.0.display()
    );
    println!(
        "{clients} clients, {secs} s per run (+1 s warm-up), {rounds} rounds, pool of {pool_size}\n"
    );

    let mut lines: Vec<Line> = Vec::new();
    for (scenario, keys) in [("spread", &spread), ("hot", &hot)] {
        for _ in 0..rounds {
            for variant in Variant::ALL {
                let app = router(variant, &pool);
                let start = Instant::now();
                let measure_from = start + Duration::from_secs(1);
                let stop = measure_from + Duration::from_secs(secs);
                let tasks: Vec<_> = keys
                    .iter()
                    .map(|k| tokio::spawn(client(app.clone(), k.clone(), stop, measure_from)))
                    .collect();
                let mut tally = Tally::default();
                for task in tasks {
                    tally.merge(task.await.expect("client"));
                }
                let elapsed = stop.saturating_duration_since(measure_from).as_secs_f64();
                match lines
                    .iter_mut()
                    .find(|l| l.variant == variant && l.scenario == scenario)
                {
                    Some(line) => {
                        line.secs += elapsed;
                        line.tally.merge(tally);
                    }
                    None => lines.push(Line {
                        variant,
                        scenario,
                        secs: elapsed,
                        tally,
                    }),
                }
            }
        }
    }

    for line in &mut lines {
        line.tally.latencies.sort();
    }
    for line in &lines {
        let t = &line.tally;
        println!(
            "variant={} driver=sqlx-sqlite scenario={} writes_per_s={:.0} p99_ms={:.2} \
             count_2xx={} count_412={} count_5xx={} count_other={}",
            line.variant.name(),
            line.scenario,
            line.writes_per_s(),
            line.p99_ms(),
            t.ok,
            t.refused_412,
            t.errors_5xx,
            t.other
        );
    }
    println!();
    for scenario in ["spread", "hot"] {
        let find = |variant| {
            lines
                .iter()
                .find(|l| l.scenario == scenario && l.variant == variant)
                .expect("every variant ran")
        };
        let row = find(Variant::RowVersion);
        let immediate = find(Variant::HandImmediate);
        let one = find(Variant::HandOneStatement);
        println!(
            "ratio scenario={scenario} row_version/hand_immediate writes_per_s={:.2} p99={:.2} \
             row_version/hand_one_statement writes_per_s={:.2} p99={:.2}",
            row.writes_per_s() / immediate.writes_per_s(),
            row.p99_ms() / immediate.p99_ms(),
            row.writes_per_s() / one.writes_per_s(),
            row.p99_ms() / one.p99_ms(),
        );
    }
    pool.close().await;
}
