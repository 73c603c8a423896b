//! Write throughput and latency on MariaDB of four ways to make an HTTP update safe
//! (or not), side by side in one run on the same database, through sqlx:
//!
//! * `row_version`: `RowVersionLayer` and `MySqlRowSql`: one conditional statement
//!   (plus the read of the new modification time on the same connection, and one read
//!   when refused);
//! * `hand_for_update`: `BEGIN; SELECT version ... FOR UPDATE;` compare with
//!   `If-Match`; `UPDATE ...; COMMIT`;
//! * `hand_one_statement`: `UPDATE ... SET version = LAST_INSERT_ID(version + 1) WHERE
//!   id = ? AND version = ?`, and a read when it matched nothing;
//! * `no_control`: the update with no concurrency control at all (lost updates allowed).
//!
//! Each variant runs with the same number of concurrent clients, first on spread keys
//! (each client cycles over keys of its own), then on one hot key. A client sends `PUT`
//! with `If-Match` set to the last tag it saw (from its last success, or from the `412`
//! that refused it). Requests go through the axum router in-process (no sockets).
//!
//! ```text
//! MYSQL_URL=mysql://root@127.0.0.1:3306/test \
//!     cargo bench --manifest-path benches/Cargo.toml --features mysql --bench mysql_modes
//! ```
//!
//! Environment: `BENCH_CLIENTS` (default 16), `BENCH_SECS` per run (default 3),
//! `BENCH_ROUNDS` (default 2; the variants alternate within each round).

use std::{
    collections::HashMap,
    env,
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
use sqlx::{mysql::MySqlPoolOptions, MySqlPool};
use tower::ServiceExt;
use tower_precondition::row_version::{
    sqlx::BindCondition, MySqlRowSql, RowPrecondition, RowVersion, RowVersionLayer,
};

const SEQUENCE: &str = "tp_bench_mysql_row_version";
/// Keys each client cycles over in the spread scenario.
const KEYS_PER_CLIENT: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    RowVersion,
    HandForUpdate,
    HandOneStatement,
    NoControl,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::RowVersion,
        Variant::HandForUpdate,
        Variant::HandOneStatement,
        Variant::NoControl,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::RowVersion => "row_version",
            Variant::HandForUpdate => "hand_for_update",
            Variant::HandOneStatement => "hand_one_statement",
            Variant::NoControl => "no_control",
        }
    }

    fn items(self) -> &'static str {
        match self {
            Variant::RowVersion => "tp_bench_mysql_items_rv",
            Variant::HandForUpdate => "tp_bench_mysql_items_fu",
            Variant::HandOneStatement => "tp_bench_mysql_items_os",
            Variant::NoControl => "tp_bench_mysql_items_nc",
        }
    }
}

fn row_sql(items: &str) -> MySqlRowSql {
    MySqlRowSql::new(items).sequence(SEQUENCE)
}

#[derive(Clone)]
struct AppState {
    pool: MySqlPool,
    v: Arc<MySqlRowSql>,
    upsert: Arc<str>,
    update: Arc<str>,
    read: Arc<str>,
    plain: Arc<str>,
    lock: Arc<str>,
    versioned: Arc<str>,
    one_statement: Arc<str>,
    read_version: Arc<str>,
}

fn state(pool: &MySqlPool, items: &str) -> AppState {
    let v = row_sql(items);
    AppState {
        pool: pool.clone(),
        upsert: format!(
            "INSERT INTO {items} (id, body, {}) VALUES (?, ?, {}) ON DUPLICATE KEY UPDATE {}, {}",
            v.insert_columns(),
            v.insert_values(),
            v.upsert_assignments(&v.condition()),
            v.upsert_column("body", "VALUES(body)")
        )
        .into(),
        update: format!(
            "UPDATE {items} SET body = ?, {} WHERE id = ? AND {}",
            v.assignments(),
            v.condition()
        )
        .into(),
        read: format!("SELECT {} FROM {items} WHERE id = ?", v.returning()).into(),
        plain: format!("UPDATE {items} SET body = ? WHERE id = ?").into(),
        lock: format!("SELECT version FROM {items} WHERE id = ? FOR UPDATE").into(),
        versioned: format!("UPDATE {items} SET body = ?, version = version + 1 WHERE id = ?")
            .into(),
        one_statement: format!(
            "UPDATE {items} SET body = ?, version = LAST_INSERT_ID(version + 1) \
             WHERE id = ? AND (? IS NULL OR version = ?)"
        )
        .into(),
        read_version: format!("SELECT version FROM {items} WHERE id = ?").into(),
        v: Arc::new(v),
    }
}

fn server_error(error: impl std::fmt::Display) -> Response {
    eprintln!("handler error: {error}");
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

/// The `If-Match` version a hand-written handler compares (one strong tag).
fn if_match(headers: &HeaderMap) -> Option<i64> {
    let value = headers.get(header::IF_MATCH)?.to_str().ok()?;
    value.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

fn tagged(status: StatusCode, version: i64) -> Response {
    (status, [(header::ETAG, format!("\"{version}\""))]).into_response()
}

/// `row_version`: the one conditional statement, behind `RowVersionLayer`.
async fn put_row_version(
    Path(id): Path<String>,
    State(state): State<AppState>,
    condition: RowPrecondition,
    body: String,
) -> Response {
    let query = if condition.may_create() {
        sqlx::query(&state.upsert).bind(&id).bind(body)
    } else {
        sqlx::query(&state.update).bind(body).bind(&id)
    };
    let query = query.bind_condition(&condition.sql());
    let written = async {
        let mut connection = state.pool.acquire().await?;
        state.v.write(&mut connection, query).await
    }
    .await;
    match written {
        Ok(Some(written)) => (written.into_version(), StatusCode::NO_CONTENT).into_response(),
        Ok(None) => {
            let current = sqlx::query_as::<_, RowVersion>(&state.read)
                .bind(&id)
                .fetch_optional(&state.pool)
                .await;
            match current {
                Ok(current) => match condition.not_applied(current) {
                    Some(refused) => refused.into_response(),
                    None => StatusCode::NOT_FOUND.into_response(),
                },
                Err(error) => server_error(error),
            }
        }
        Err(error) => server_error(error),
    }
}

/// `hand_for_update`: lock, compare, write, commit.
async fn put_hand_for_update(
    Path(id): Path<String>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let result: Result<Response, sqlx::Error> = async {
        let mut tx = state.pool.begin().await?;
        let current: i64 = sqlx::query_scalar(&state.lock)
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
        if let Some(expected) = headers.get(header::IF_MATCH).map(|_| if_match(&headers)) {
            if expected != Some(current) {
                tx.rollback().await?;
                return Ok(tagged(StatusCode::PRECONDITION_FAILED, current));
            }
        }
        sqlx::query(&state.versioned)
            .bind(body)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(tagged(StatusCode::NO_CONTENT, current + 1))
    }
    .await;
    result.unwrap_or_else(server_error)
}

/// `hand_one_statement`: the compare in the `WHERE`, the new version from the OK packet.
async fn put_hand_one_statement(
    Path(id): Path<String>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let expected = if_match(&headers);
    // An unreadable If-Match matches nothing.
    let expected = match (headers.contains_key(header::IF_MATCH), expected) {
        (true, None) => Some(-1),
        (_, expected) => expected,
    };
    let done = sqlx::query(&state.one_statement)
        .bind(body)
        .bind(&id)
        .bind(expected)
        .bind(expected)
        .execute(&state.pool)
        .await;
    match done {
        Ok(done) if done.rows_affected() == 1 => {
            tagged(StatusCode::NO_CONTENT, done.last_insert_id() as i64)
        }
        Ok(_) => match sqlx::query_scalar::<_, i64>(&state.read_version)
            .bind(&id)
            .fetch_optional(&state.pool)
            .await
        {
            Ok(Some(current)) => tagged(StatusCode::PRECONDITION_FAILED, current),
            Ok(None) => StatusCode::NOT_FOUND.into_response(),
            Err(error) => server_error(error),
        },
        Err(error) => server_error(error),
    }
}

/// `no_control`: the update, autocommit.
async fn put_no_control(
    Path(id): Path<String>,
    State(state): State<AppState>,
    body: String,
) -> Response {
    match sqlx::query(&state.plain)
        .bind(body)
        .bind(&id)
        .execute(&state.pool)
        .await
    {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => server_error(error),
    }
}

fn router(variant: Variant, pool: &MySqlPool) -> Router {
    let state = state(pool, variant.items());
    match variant {
        Variant::RowVersion => Router::new()
            .route("/items/{id}", put(put_row_version))
            .with_state(state)
            .route_layer(RowVersionLayer::new()),
        Variant::HandForUpdate => Router::new()
            .route("/items/{id}", put(put_hand_for_update))
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

/// Drops and re-creates this bench's own tables (and only those), and seeds the keys.
async fn reset(pool: &MySqlPool, keys: &[String]) {
    let sequence = row_sql("unused").create_sequence();
    sqlx::query(&sequence)
        .execute(pool)
        .await
        .expect("sequence");
    for variant in Variant::ALL {
        let items = variant.items();
        sqlx::query(&format!("DROP TABLE IF EXISTS {items}"))
            .execute(pool)
            .await
            .expect("drop");
        sqlx::query(&format!(
            "CREATE TABLE {items} (id VARCHAR(64) PRIMARY KEY, body TEXT NOT NULL, {}) \
             ENGINE = InnoDB",
            row_sql(items).columns()
        ))
        .execute(pool)
        .await
        .expect("create");
        for key in keys {
            sqlx::query(&format!(
                "INSERT INTO {items} (id, body, version, modified_us) \
                 VALUES (?, '{{}}', NEXTVAL({SEQUENCE}), 0)"
            ))
            .bind(key)
            .execute(pool)
            .await
            .expect("seed");
        }
    }
}

struct Row {
    variant: Variant,
    scenario: &'static str,
    secs: f64,
    tally: Tally,
}

impl Row {
    fn writes_per_s(&self) -> f64 {
        self.tally.ok as f64 / self.secs
    }

    fn p99(&self) -> Duration {
        percentile(&self.tally.latencies, 0.99)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() {
    let url = match env::var("MYSQL_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            eprintln!("skipped: set MYSQL_URL to run");
            return;
        }
    };
    let setting = |name: &str, default: u64| {
        env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let clients = setting("BENCH_CLIENTS", 16) as usize;
    let secs = setting("BENCH_SECS", 3);
    let rounds = setting("BENCH_ROUNDS", 2) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(url, clients, secs, rounds));
}

async fn run(url: String, clients: usize, secs: u64, rounds: usize) {
    let pool = MySqlPoolOptions::new()
        .max_connections(clients as u32)
        .connect(&url)
        .await
        .expect("MariaDB connects");
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
    let (version, flush): (String, i64) = sqlx::query_as(
        "SELECT CAST(@@version AS CHAR), CAST(@@innodb_flush_log_at_trx_commit AS SIGNED)",
    )
    .fetch_one(&pool)
    .await
    .expect("settings");
    println!("MariaDB {version} | innodb_flush_log_at_trx_commit={flush}");
    println!(
        "{clients} clients, {secs} s per run (+1 s warm-up), {rounds} rounds, pool of {clients}\n"
    );

    let mut rows: Vec<Row> = Vec::new();
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
                match rows
                    .iter_mut()
                    .find(|r| r.variant == variant && r.scenario == scenario)
                {
                    Some(row) => {
                        row.secs += elapsed;
                        row.tally.merge(tally);
                    }
                    None => rows.push(Row {
                        variant,
                        scenario,
                        secs: elapsed,
                        tally,
                    }),
                }
            }
        }
    }

    for row in &mut rows {
        row.tally.latencies.sort();
    }
    for row in &rows {
        let t = &row.tally;
        println!(
            "variant={} driver=sqlx-mysql scenario={} writes_per_s={:.0} p99_ms={:.1} \
             2xx={} 412={} 5xx={} other={}",
            row.variant.name(),
            row.scenario,
            row.writes_per_s(),
            row.p99().as_secs_f64() * 1e3,
            t.ok,
            t.refused_412,
            t.errors_5xx,
            t.other
        );
    }
    for scenario in ["spread", "hot"] {
        let find = |variant| {
            rows.iter()
                .find(|r| r.scenario == scenario && r.variant == variant)
                .expect("row")
        };
        let rv = find(Variant::RowVersion);
        for base in [Variant::HandForUpdate, Variant::HandOneStatement] {
            let b = find(base);
            println!(
                "ratio scenario={scenario} row_version/{}: writes_per_s x{:.2} p99 x{:.2}",
                base.name(),
                rv.writes_per_s() / b.writes_per_s(),
                rv.p99().as_secs_f64() / b.p99().as_secs_f64()
            );
        }
    }
}
