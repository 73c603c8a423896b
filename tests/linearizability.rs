//! Histories checked for linearizability: concurrent clients do `GET` (plain and
//! conditional), conditional `PUT` / `PATCH` / `DELETE` and creates against every
//! backend's example server, run as separate processes (several on one backend where it
//! is shared), and every history is checked against a compare-and-set register per item
//! (see `common/linearizability.rs`). The fault runs do the same while the store is
//! killed and restarted, the network to it stalls and drops, server processes are
//! killed mid-write (`SIGKILL`) and restarted, and clients give up mid-request and
//! mid-upload.
//!
//! Sizes are small enough for CI; `LIN_OPS` (operations per client) and `LIN_CLIENTS`
//! make a run longer by hand.

#[path = "common/items_contract.rs"]
mod items_contract;
#[path = "common/linearizability.rs"]
mod linearizability;
mod postgres_support;
mod redis_support;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use items_contract::{unique_id, ExampleServer};
use linearizability::{run_clients, Addrs, Proxy, Recorder, Summary, Workload};
use redis_support::OwnRedis;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The variable's value; `None` (the test then says it was skipped) when unset, which
/// under `CI=true` is a failure.
fn server_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(!ci(), "CI=true but {var} is not set");
            eprintln!("skipped: set {var} to run");
            None
        }
    }
}

/// A fresh SQLite file for one run, and its URL.
fn sqlite_url(label: &str) -> String {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}.db", unique_id(&format!("lin-{label}"))));
    format!("sqlite://{}?mode=rwc", path.display())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A fault run's workload: twice as long, so that several faults land while it runs,
/// over more items, so that each item's history (with its indeterminate writes, each of
/// which the checker must place) stays small enough to search.
fn fault_workload(seed: u64) -> Workload {
    Workload {
        ops_per_client: env_usize("LIN_OPS", 60) * 2,
        items: 8,
        abandon_percent: 10,
        request_limit: Duration::from_secs(5),
        ..workload(seed)
    }
}

fn workload(seed: u64) -> Workload {
    Workload {
        clients: env_usize("LIN_CLIENTS", 6),
        ops_per_client: env_usize("LIN_OPS", 60),
        seed,
        ..Workload::default()
    }
}

fn report_path(label: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("linearizability-{label}.txt"))
}

/// Processes of one example on one backend; a fault may kill and restart any of them.
struct Servers {
    example: String,
    /// Each process's environment (the shared one, and its own additions).
    envs: Vec<Vec<(String, String)>>,
    running: Mutex<Vec<Option<ExampleServer>>>,
    addrs: Addrs,
}

impl Servers {
    async fn start(example: &str, env: &[(&str, &str)], count: usize) -> Arc<Self> {
        Self::start_each(example, env, count, |_| Vec::new()).await
    }

    /// [`start`](Self::start), adding `own(i)` to process `i`'s environment.
    async fn start_each(
        example: &str,
        env: &[(&str, &str)],
        count: usize,
        own: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Arc<Self> {
        let shared: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let envs: Vec<Vec<(String, String)>> = (0..count)
            .map(|i| shared.iter().cloned().chain(own(i)).collect())
            .collect();
        let mut running = Vec::new();
        let mut addrs = Vec::new();
        for env in &envs {
            let server = start_with(example, env).await;
            addrs.push(server.addr());
            running.push(Some(server));
        }
        Arc::new(Self {
            example: example.to_owned(),
            envs,
            running: Mutex::new(running),
            addrs: Arc::new(RwLock::new(addrs)),
        })
    }

    /// `SIGKILL`s process `index` (whatever it is doing), then starts a new one in its
    /// place, on a new port.
    async fn kill_and_restart(&self, index: usize) {
        let killed = self.running.lock().unwrap()[index].take();
        drop(killed);
        // A process may fail to start while the others keep the store busy (SQLite's
        // write lock during its migration): try again, a few times.
        let mut attempt = 0;
        let server = loop {
            let (example, env) = (self.example.clone(), self.envs[index].clone());
            match tokio::spawn(async move { start_with(&example, &env).await }).await {
                Ok(server) => break server,
                Err(error) if attempt < 20 => {
                    attempt += 1;
                    eprintln!("restarting process {index} failed ({error}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("process {index} would not restart: {error}"),
            }
        };
        self.addrs.write().unwrap()[index] = server.addr();
        self.running.lock().unwrap()[index] = Some(server);
    }

    fn count(&self) -> usize {
        self.addrs.read().unwrap().len()
    }
}

/// A fault task that `SIGKILL`s and restarts the processes one after another, every
/// `period`.
fn kill_in_turn(
    servers: Arc<Servers>,
    period: Duration,
) -> impl FnOnce(Arc<AtomicUsize>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
{
    move |injected| {
        Box::pin(async move {
            for round in 0.. {
                tokio::time::sleep(period).await;
                injected.fetch_add(1, Ordering::SeqCst);
                servers.kill_and_restart(round % servers.count()).await;
            }
        })
    }
}

async fn start_with(example: &str, env: &[(String, String)]) -> ExampleServer {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ExampleServer::start(example, &env).await
}

/// Runs `workload` against `servers` with `faults` running beside it, checks the
/// history, and prints the summary.
async fn run_and_check<F, Fut>(
    label: &str,
    servers: &Arc<Servers>,
    workload: Workload,
    faults: F,
) -> Summary
where
    F: FnOnce(Arc<AtomicUsize>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let recorder = Recorder::new();
    let prefix = unique_id(label);
    let injected = Arc::new(AtomicUsize::new(0));
    let fault_task = tokio::spawn(faults(injected.clone()));
    run_clients(servers.addrs.clone(), &prefix, &workload, &recorder).await;
    fault_task.abort();
    let _ = fault_task.await;
    let faults = injected.load(Ordering::SeqCst);
    // Whatever a fault left unsettled must not hide from the check: let leases expire
    // and read every item once more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    linearizability::read_all(servers.addrs.clone(), &prefix, &workload, &recorder).await;
    let summary = recorder.check(&report_path(label));
    println!(
        "{label}: {} processes of {}, {} clients: {summary}; {faults} faults injected",
        servers.count(),
        servers.example,
        workload.clients
    );
    summary
}

async fn no_faults(_: Arc<AtomicUsize>) {}

// ---------------------------------------------------------------------------------------
// Without faults, every backend
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_histories_are_linearizable() {
    // The memory store lives in its process: one process, many clients.
    let servers = Servers::start("axum_memory", &[], 1).await;
    let summary = run_and_check("memory", &servers, workload(1), no_faults).await;
    assert!(summary.applied > 0 && summary.refused > 0, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_histories_stay_linearizable_when_clients_give_up() {
    let servers = Servers::start("axum_memory", &[], 1).await;
    let workload = Workload {
        abandon_percent: 20,
        ..workload(2)
    };
    let summary = run_and_check("memory-abandon", &servers, workload, no_faults).await;
    assert!(summary.unknown > 0, "no write was abandoned: {summary}");
}

/// Clients against `count` processes of `example`, no faults.
async fn plain_run(label: &str, example: &str, env: &[(&str, &str)], count: usize, seed: u64) {
    let servers = Servers::start(example, env, count).await;
    let summary = run_and_check(label, &servers, workload(seed), no_faults).await;
    assert!(summary.applied > 0 && summary.refused > 0, "{summary}");
}

/// REDIS_URL and a fresh prefix (with the guard that removes its keys), or `None`.
async fn redis_env() -> Option<(String, String, redis_support::Cleanup)> {
    let url = server_url("REDIS_URL")?;
    let prefix = redis_support::unique_prefix("lin");
    let store = tower_precondition::store::RedisStore::open(&url)
        .await
        .expect("Redis answers")
        .prefix(&prefix);
    let cleanup = redis_support::Cleanup::of(&store, &url);
    Some((url, prefix, cleanup))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn redis_store_histories_on_three_processes_are_linearizable() {
    let Some((url, prefix, _cleanup)) = redis_env().await else {
        return;
    };
    let env = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_PREFIX", prefix.as_str()),
    ];
    plain_run("redis", "axum_redis", &env, 3, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_histories_on_three_processes_are_linearizable() {
    let url = sqlite_url("store");
    plain_run(
        "sqlite-store",
        "axum_sqlite_store",
        &[("DATABASE_URL", &url)],
        3,
        4,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_row_version_histories_on_three_processes_are_linearizable() {
    let url = sqlite_url("row");
    plain_run("sqlite-row", "axum_sqlite", &[("DATABASE_URL", &url)], 3, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn postgres_transactional_histories_on_three_processes_are_linearizable() {
    let Some(url) = server_url("DATABASE_URL") else {
        return;
    };
    plain_run("pg-tx", "axum_postgres", &[("DATABASE_URL", &url)], 3, 6).await;
}

/// Store mode on Postgres (`PreconditionLayer` over `PostgresStore`, the items in a
/// table of their own, written by the handler between reserve and settle). No example
/// server runs this mode, so three instances of the test app run here, each with its
/// own layer, entry cache and connection pool, on one version table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn postgres_store_histories_on_three_instances_are_linearizable() {
    let Some(url) = server_url("DATABASE_URL") else {
        return;
    };
    let versions = postgres_support::unique("lin_versions").replace('-', "_");
    let items = postgres_support::unique("lin_items").replace('-', "_");
    let mut addrs = Vec::new();
    for i in 0..3 {
        let pool = postgres_support::pool_for(&url, 4);
        if i == 0 {
            postgres_support::items_table(&pool, &items).await;
        }
        let store = postgres_support::store(&pool, &versions).await;
        let (app, _) = postgres_support::app(postgres_support::Mode::Store, store, &items);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    let recorder = Recorder::new();
    let workload = Workload {
        patch: false,
        ..workload(16)
    };
    let prefix = unique_id("pg-store");
    let addrs: Addrs = Arc::new(RwLock::new(addrs));
    run_clients(addrs.clone(), &prefix, &workload, &recorder).await;
    linearizability::read_all(addrs, &prefix, &workload, &recorder).await;
    let summary = recorder.check(&report_path("pg-store"));
    println!(
        "pg-store: 3 instances of the Postgres store-mode app, {} clients: {summary}",
        workload.clients
    );
    assert!(summary.applied > 0 && summary.refused > 0, "{summary}");
    let pool = postgres_support::pool_for(&url, 1);
    if let Ok(client) = pool.get().await {
        let _ = client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {items}; DROP TABLE IF EXISTS {versions}"
            ))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn sqlx_row_version_histories_on_three_processes_are_linearizable() {
    let Some(url) = server_url("DATABASE_URL") else {
        return;
    };
    plain_run("pg-sqlx", "axum_sqlx", &[("DATABASE_URL", &url)], 3, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn tokio_postgres_row_version_histories_on_three_processes_are_linearizable() {
    let Some(url) = server_url("DATABASE_URL") else {
        return;
    };
    plain_run(
        "pg-tokio",
        "axum_tokio_postgres",
        &[("DATABASE_URL", &url)],
        3,
        8,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn mysql_row_version_histories_on_three_processes_are_linearizable() {
    let Some(url) = server_url("MYSQL_URL") else {
        return;
    };
    plain_run("mysql", "axum_mysql", &[("DATABASE_URL", &url)], 3, 9).await;
}

// ---------------------------------------------------------------------------------------
// Under faults
// ---------------------------------------------------------------------------------------

/// A lease short enough that a write cut off by a kill is taken over within the run,
/// and long enough that the handler's deadline (a fifth short of it) outlasts every
/// stall and every wait for SQLite's write lock: see
/// [`sqlite_store_write_landing_after_its_handler_deadline`].
const FAULT_LEASE_MS: &str = "2500";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_histories_survive_kills_stalls_and_cuts() {
    redis_fault_run("redis-faults", FAULT_LEASE_MS, Duration::from_millis(700)).await;
}

async fn redis_fault_run(label: &str, lease_ms: &str, stall: Duration) {
    // A private, durable Redis behind a proxy: killed and restarted, its network
    // stalled and cut, while server processes are killed mid-write and clients give up.
    let Some(redis) = OwnRedis::start_durable() else {
        return;
    };
    let target: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let proxy = Arc::new(Proxy::start(target).await);
    let url = format!("redis://{}", proxy.addr);
    let env = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_PREFIX", "lin:"),
        ("LEASE_MS", lease_ms),
    ];
    let servers = Servers::start("axum_redis", &env, 3).await;
    let redis = Arc::new(Mutex::new(redis));
    let faults = {
        let (servers, proxy, redis) = (servers.clone(), proxy.clone(), redis.clone());
        move |injected: Arc<AtomicUsize>| async move {
            for round in 0.. {
                tokio::time::sleep(Duration::from_millis(250)).await;
                injected.fetch_add(1, Ordering::SeqCst);
                match round % 4 {
                    0 => servers.kill_and_restart(round % servers.count()).await,
                    1 => proxy.stall(stall).await,
                    2 => proxy.cut(),
                    _ => {
                        let redis = redis.clone();
                        tokio::task::spawn_blocking(move || redis.lock().unwrap().restart())
                            .await
                            .expect("restart Redis");
                    }
                }
            }
        }
    };
    let workload = fault_workload(10);
    let summary = run_and_check(label, &servers, workload, faults).await;
    assert!(summary.applied > 0, "{summary}");
}

/// Three processes on one SQLite file (store mode), killed and restarted in turn while
/// clients give up mid-request and mid-upload. Once a finding: the handlers' writes
/// then ran outside any check of their lease, so a write abandoned mid-statement could
/// commit after the layer had settled it; they are now fenced
/// (`SqliteStore::check_fence`, see `tests/fencing.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_histories_survive_processes_killed_mid_write() {
    sqlite_store_kill_run("sqlite-store-kill", FAULT_LEASE_MS).await;
}

/// The same with a lease so short that handlers waiting for SQLite's write lock miss
/// their deadline. Once a finding: the layer answered `503` and gave the item a fresh
/// version, but the statement the handler had already handed to SQLite committed
/// later, over a write that won in between (a read served a later write's tag with the
/// cut-off write's body). The fenced write now finds its lease gone and changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_write_landing_after_its_handler_deadline() {
    sqlite_store_kill_run("sqlite-store-zombie", "400").await;
}

async fn sqlite_store_kill_run(label: &str, lease_ms: &str) {
    let url = sqlite_url(label);
    let env = [("DATABASE_URL", url.as_str()), ("LEASE_MS", lease_ms)];
    let servers = Servers::start("axum_sqlite_store", &env, 3).await;
    let faults = kill_in_turn(servers.clone(), Duration::from_millis(300));
    let workload = fault_workload(11);
    let summary = run_and_check(label, &servers, workload, faults).await;
    assert!(summary.applied > 0, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_row_version_histories_survive_postgres_restarts_and_kills() {
    // A private Postgres cluster, stopped and started under the servers, which are
    // themselves killed mid-write; clients give up mid-request and mid-upload.
    let Some(cluster) = postgres_support::TempCluster::start() else {
        return;
    };
    let url = cluster.url();
    let servers = Servers::start("axum_sqlx", &[("DATABASE_URL", &url)], 3).await;
    let cluster = Arc::new(Mutex::new(cluster));
    let faults = {
        let (servers, cluster) = (servers.clone(), cluster.clone());
        move |injected: Arc<AtomicUsize>| async move {
            for round in 0.. {
                tokio::time::sleep(Duration::from_millis(300)).await;
                injected.fetch_add(1, Ordering::SeqCst);
                if round % 3 == 2 {
                    let cluster = cluster.clone();
                    tokio::task::spawn_blocking(move || {
                        let cluster = cluster.lock().unwrap();
                        cluster.stop_server();
                        cluster.start_server();
                    })
                    .await
                    .expect("restart Postgres");
                } else {
                    servers.kill_and_restart(round % servers.count()).await;
                }
            }
        }
    };
    let workload = fault_workload(12);
    let summary = run_and_check("pg-sqlx-faults", &servers, workload, faults).await;
    assert!(summary.applied > 0, "{summary}");
}

/// libfaketime, which shifts a process's clock (`FAKETIME`) when preloaded.
fn faketime_library() -> Option<PathBuf> {
    let found = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if found.is_none() {
        assert!(
            !ci(),
            "CI=true but libfaketime is not installed (package faketime)"
        );
        eprintln!("skipped: install libfaketime (package faketime) to run");
    }
    found
}

/// Three processes on one SQLite file, one a second ahead and one a second behind
/// (libfaketime), while processes are killed mid-write and clients give up.
///
/// The SQLite store's clock is the hosts' wall clock (kept monotonic in the file), so
/// processes whose clocks differ shorten each other's live leases by the difference
/// and take over writes still running. Once a finding (both writes landed); the
/// handler's write is now fenced, so the one whose lease was taken over changes
/// nothing, and the takeover's fresh version refuses every tag handed out before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_histories_survive_hosts_a_second_apart() {
    let url = sqlite_url("store-skew");
    let env = [("DATABASE_URL", url.as_str()), ("LEASE_MS", FAULT_LEASE_MS)];
    skewed_run("sqlite-store-skew", "axum_sqlite_store", &env, 14).await;
}

/// The same with Redis, where the lease clock is the Redis server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn redis_store_histories_survive_hosts_a_second_apart() {
    let Some((url, prefix, _cleanup)) = redis_env().await else {
        return;
    };
    let env = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_PREFIX", prefix.as_str()),
        ("LEASE_MS", FAULT_LEASE_MS),
    ];
    skewed_run("redis-skew", "axum_redis", &env, 15).await;
}

/// Three processes of `example`, the second a second ahead and the third a second
/// behind, one killed and restarted every 400 ms, clients giving up now and then.
async fn skewed_run(label: &str, example: &str, env: &[(&str, &str)], seed: u64) {
    let Some(faketime) = faketime_library() else {
        return;
    };
    let preload = faketime.display().to_string();
    let servers = Servers::start_each(example, env, 3, |i| match i {
        0 => Vec::new(),
        i => vec![
            ("LD_PRELOAD".to_owned(), preload.clone()),
            (
                "FAKETIME".to_owned(),
                if i == 1 { "+1s" } else { "-1s" }.to_owned(),
            ),
        ],
    })
    .await;
    let faults = kill_in_turn(servers.clone(), Duration::from_millis(400));
    let summary = run_and_check(label, &servers, fault_workload(seed), faults).await;
    assert!(summary.applied > 0, "{summary}");
}

// ---------------------------------------------------------------------------------------
// The check has teeth: a server that compares, then writes, fails it
// ---------------------------------------------------------------------------------------

/// Items behind the two-step check this crate exists to replace: compare the
/// `If-Match`, then (a moment later) write.
#[derive(Default)]
struct Naive {
    items: Mutex<HashMap<String, (u64, Bytes)>>,
    next: std::sync::atomic::AtomicU64,
}

async fn naive_item(
    State(naive): State<Arc<Naive>>,
    Path(id): Path<String>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let current = naive.items.lock().unwrap().get(&id).cloned();
    let tag_of = |version: u64| format!("\"v{version}\"");
    let header_text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if method == axum::http::Method::GET {
        return match current {
            None => StatusCode::NOT_FOUND.into_response(),
            Some((v, _)) if header_text(header::IF_NONE_MATCH) == Some(&tag_of(v)) => {
                (StatusCode::NOT_MODIFIED, [(header::ETAG, tag_of(v))]).into_response()
            }
            Some((v, body)) => ([(header::ETAG, tag_of(v))], body).into_response(),
        };
    }
    let holds = match (&current, header_text(header::IF_MATCH)) {
        (Some((v, _)), Some(tag)) => tag == tag_of(*v),
        (None, None) => header_text(header::IF_NONE_MATCH) == Some("*"),
        _ => false,
    };
    if !holds {
        return match current {
            Some((v, _)) => {
                (StatusCode::PRECONDITION_FAILED, [(header::ETAG, tag_of(v))]).into_response()
            }
            None => StatusCode::PRECONDITION_FAILED.into_response(),
        };
    }
    // The gap between the compare and the write, where a second writer slips in.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let version = naive.next.fetch_add(1, Ordering::SeqCst) + 1;
    let mut items = naive.items.lock().unwrap();
    if method == axum::http::Method::DELETE {
        items.remove(&id);
        return StatusCode::NO_CONTENT.into_response();
    }
    items.insert(id, (version, body));
    let status = if current.is_none() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, [(header::ETAG, tag_of(version))]).into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_compares_then_writes_fails_the_check() {
    let app = Router::new()
        .route(
            "/items/{id}",
            get(naive_item)
                .put(naive_item)
                .patch(naive_item)
                .delete(naive_item),
        )
        .with_state(Arc::new(Naive::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let recorder = Recorder::new();
    let workload = Workload {
        clients: 8,
        items: 2,
        ..workload(13)
    };
    let addrs: Addrs = Arc::new(RwLock::new(vec![addr]));
    run_clients(addrs, "naive", &workload, &recorder).await;
    let error = recorder
        .verify()
        .expect_err("a compare-then-write server loses updates, and the check must see it");
    assert!(
        error.contains("replaced the same tag") || error.contains("not linearizable"),
        "{error}"
    );
    println!(
        "the naive server's history fails the check: {}",
        error.lines().next().unwrap_or_default()
    );
}
