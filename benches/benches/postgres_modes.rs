//! Write throughput and latency of four ways to make an HTTP update safe (or not), side
//! by side in one run on the same Postgres database:
//!
//! * (a) the transactional mode (`PgTransactionalLayer`): one transaction, one commit;
//! * (b) the store mode (`PreconditionLayer` over `PostgresStore`): reserve, the
//!   handler's autocommit write, settle — three commits;
//! * (c) a hand-written handler: `BEGIN; SELECT version ... FOR UPDATE;` compare with
//!   `If-Match`; `UPDATE ...; COMMIT` — one commit;
//! * (d) the same update with no concurrency control at all (lost updates allowed).
//!
//! Each variant runs with the same number of concurrent clients, first on spread keys
//! (each client cycles over keys of its own: no contention), then on one hot key (every
//! client writes the same row). A client sends `PUT` with `If-Match` set to the last
//! tag it saw (from its last success, or from the `412` that refused it), so under
//! contention a refused client re-sends with the current tag, as a real one would.
//! Requests go through the axum router in-process (no sockets), so the figures measure
//! the middleware and the database, not HTTP parsing.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench --manifest-path benches/Cargo.toml --features postgres --bench postgres_modes
//! ```
//!
//! Environment: `BENCH_CLIENTS` (default 16), `BENCH_SECS` per run (default 3),
//! `BENCH_ROUNDS` (default 2; the variants alternate within each round).

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
use tokio_postgres::NoTls;
use tower::ServiceExt;
use tower_precondition::{
    store::PostgresStore, PgTransaction, PgTransactionalLayer, PreconditionLayer,
};

const VERSIONS: &str = "tp_bench_versions";
/// Keys each client cycles over in the spread scenario.
const KEYS_PER_CLIENT: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Transactional,
    Store,
    HandWritten,
    NoControl,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Transactional,
        Variant::Store,
        Variant::HandWritten,
        Variant::NoControl,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::Transactional => "(a) transactional mode",
            Variant::Store => "(b) store mode",
            Variant::HandWritten => "(c) hand-written FOR UPDATE",
            Variant::NoControl => "(d) no concurrency control",
        }
    }

    fn items(self) -> &'static str {
        match self {
            Variant::Transactional => "tp_bench_items_a",
            Variant::Store => "tp_bench_items_b",
            Variant::HandWritten => "tp_bench_items_c",
            Variant::NoControl => "tp_bench_items_d",
        }
    }
}

#[derive(Clone)]
struct AppState {
    pool: Pool,
    update: Arc<str>,
    select_version: Arc<str>,
    update_versioned: Arc<str>,
}

fn state(pool: &Pool, items: &str) -> AppState {
    AppState {
        pool: pool.clone(),
        update: format!("UPDATE {items} SET body = $2 WHERE id = $1").into(),
        select_version: format!("SELECT version FROM {items} WHERE id = $1 FOR UPDATE").into(),
        update_versioned: format!("UPDATE {items} SET body = $2, version = $3 WHERE id = $1")
            .into(),
    }
}

fn server_error(error: impl std::fmt::Display) -> Response {
    eprintln!("handler error: {error}");
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

/// (a): the update, in the layer's transaction.
async fn put_transactional(
    Path(id): Path<String>,
    State(state): State<AppState>,
    tx: PgTransaction,
    body: String,
) -> Response {
    match tx.execute(&state.update, &[&id, &body]).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => server_error(error),
    }
}

/// (b) and (d): the update, autocommit, on a connection of its own.
async fn put_autocommit(
    Path(id): Path<String>,
    State(state): State<AppState>,
    body: String,
) -> Response {
    let client = match state.pool.get().await {
        Ok(client) => client,
        Err(error) => return server_error(error),
    };
    let statement = match client.prepare_cached(&state.update).await {
        Ok(statement) => statement,
        Err(error) => return server_error(error),
    };
    match client.execute(&statement, &[&id, &body]).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => server_error(error),
    }
}

static TAGS: AtomicU64 = AtomicU64::new(0);

/// (c): what one writes by hand for the same guarantee as (a).
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
        let select = tx.prepare_cached(&state.select_version).await?;
        let current: String = tx.query_one(&select, &[&id]).await?.get(0);
        let current_tag = format!("\"{current}\"");
        if let Some(if_match) = headers.get(header::IF_MATCH) {
            if if_match.as_bytes() != current_tag.as_bytes() {
                tx.rollback().await?;
                return Ok((
                    StatusCode::PRECONDITION_FAILED,
                    [(header::ETAG, current_tag)],
                )
                    .into_response());
            }
        }
        let next = format!(
            "{:x}-{}",
            TAGS.fetch_add(1, Ordering::Relaxed),
            std::process::id()
        );
        let update = tx.prepare_cached(&state.update_versioned).await?;
        tx.execute(&update, &[&id, &body, &next]).await?;
        tx.commit().await?;
        Ok((
            StatusCode::NO_CONTENT,
            [(header::ETAG, format!("\"{next}\""))],
        )
            .into_response())
    }
    .await;
    result.unwrap_or_else(server_error)
}

fn router(variant: Variant, pool: &Pool) -> Router {
    let state = state(pool, variant.items());
    let store = || {
        PostgresStore::new(pool.clone())
            .table(VERSIONS)
            .expect("valid table name")
    };
    match variant {
        Variant::Transactional => Router::new()
            .route("/items/{id}", put(put_transactional))
            .with_state(state)
            .layer(PgTransactionalLayer::new(store())),
        Variant::Store => Router::new()
            .route("/items/{id}", put(put_autocommit))
            .with_state(state)
            .layer(PreconditionLayer::new(store())),
        Variant::HandWritten => Router::new()
            .route("/items/{id}", put(put_hand_written))
            .with_state(state),
        Variant::NoControl => Router::new()
            .route("/items/{id}", put(put_autocommit))
            .with_state(state),
    }
}

fn pool(url: &str, size: usize) -> Pool {
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
    refused_409: u64,
    other: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.ok += other.ok;
        self.refused_412 += other.refused_412;
        self.refused_409 += other.refused_409;
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
            StatusCode::CONFLICT => {
                tally.refused_409 += 1;
                // Honour the spirit of Retry-After without sleeping a whole second:
                // a 409 answers at once, and spinning on it would measure the spin.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            _ => tally.other += 1,
        }
    }
    tally
}

async fn reset(pool: &Pool, keys: &[String]) {
    let client = pool.get().await.expect("connection");
    let mut sql = format!("SET client_min_messages = warning; DROP TABLE IF EXISTS {VERSIONS}; ");
    for variant in Variant::ALL {
        let items = variant.items();
        sql.push_str(&format!(
            "DROP TABLE IF EXISTS {items}; \
             CREATE TABLE {items} (id TEXT PRIMARY KEY, body TEXT NOT NULL, \
             version TEXT NOT NULL DEFAULT md5(random()::text)); "
        ));
    }
    client.batch_execute(&sql).await.expect("reset tables");
    PostgresStore::new(pool.clone())
        .table(VERSIONS)
        .expect("name")
        .migrate()
        .await
        .expect("migrate");
    for variant in Variant::ALL {
        let insert = format!(
            "INSERT INTO {} (id, body) SELECT unnest($1::text[]), '{{}}'",
            variant.items()
        );
        client.execute(&insert, &[&keys]).await.expect("seed items");
    }
    client
        .batch_execute("VACUUM ANALYZE")
        .await
        .expect("vacuum");
}

struct Row {
    label: &'static str,
    scenario: &'static str,
    secs: f64,
    tally: Tally,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() {
    let Ok(url) = env::var("DATABASE_URL") else {
        eprintln!("skipped: set DATABASE_URL to run");
        return;
    };
    let clients: usize = env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let secs: u64 = env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rounds: usize = env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(url, clients, secs, rounds));
}

async fn run(url: String, clients: usize, secs: u64, rounds: usize) {
    let pool = pool(&url, clients);
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
    let settings = pool
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
        settings.get::<_, String>(0),
        settings.get::<_, String>(1),
        settings.get::<_, String>(2)
    );
    println!(
        "{clients} clients, {secs} s per run (+1 s warm-up), {rounds} rounds, pool of {clients}\n"
    );

    let mut rows: Vec<Row> = Vec::new();
    for (scenario, keys) in [("spread keys", &spread), ("one hot key", &hot)] {
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
                    .find(|r| r.label == variant.label() && r.scenario == scenario)
                {
                    Some(row) => {
                        row.secs += elapsed;
                        row.tally.merge(tally);
                    }
                    None => rows.push(Row {
                        label: variant.label(),
                        scenario,
                        secs: elapsed,
                        tally,
                    }),
                }
            }
        }
    }

    println!(
        "| scenario | variant | successful writes/s | requests/s | p50 | p99 | 412 | 409 | other |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in &mut rows {
        row.tally.latencies.sort();
        let t = &row.tally;
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} ms | {:.1} ms | {} | {} | {} |",
            row.scenario,
            row.label,
            t.ok as f64 / row.secs,
            t.latencies.len() as f64 / row.secs,
            percentile(&t.latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&t.latencies, 0.99).as_secs_f64() * 1e3,
            t.refused_412,
            t.refused_409,
            t.other
        );
    }
    println!("\nratios of successful writes/s and p99 to (c), the hand-written handler:");
    for scenario in ["spread keys", "one hot key"] {
        let base = rows
            .iter()
            .find(|r| r.scenario == scenario && r.label == Variant::HandWritten.label())
            .expect("baseline");
        let base_ok = base.tally.ok as f64 / base.secs;
        let base_p99 = percentile(&base.tally.latencies, 0.99).as_secs_f64();
        for row in rows.iter().filter(|r| r.scenario == scenario) {
            let ok = row.tally.ok as f64 / row.secs;
            let p99 = percentile(&row.tally.latencies, 0.99).as_secs_f64();
            println!(
                "  {scenario:<12} {:<30} throughput x{:.2}  p99 x{:.2}",
                row.label,
                ok / base_ok,
                p99 / base_p99
            );
        }
    }
}
