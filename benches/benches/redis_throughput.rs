//! The Redis backend, measured: round trips per request (counted by a counting
//! connection, with the commands Redis ran from `INFO commandstats`), and throughput
//! through the layer against `redis-benchmark` running the store's own script at the
//! same concurrency on the same machine.
//!
//! ```text
//! cargo bench --manifest-path benches/Cargo.toml --features redis --bench redis_throughput
//! BENCH_SECONDS=3 BENCH_CONCURRENCY=50 BENCH_EVALS=150000 BENCH_ROUNDS=5 \
//!     cargo bench --manifest-path benches/Cargo.toml --features redis --bench redis_throughput
//! ```
//!
//! It starts its own `redis-server` (no persistence) on a free port, so the counts are
//! exact and no other user of a shared Redis is disturbed; it needs `redis-server`,
//! `redis-cli` and `redis-benchmark` on PATH and skips (with a line) otherwise.
//!
//! The app is an axum router with trivial handlers behind the layer, driven in process
//! (no HTTP), so what is measured is the layer plus its Redis round trips.
//!
//! Two figures do not depend on how much CPU the shared machine leaves this run: the
//! client process's heap allocations per request (a counting allocator, on only while
//! the round trips are counted, one request at a time, the bench's own request
//! building included) and its CPU time per request during the throughput runs (user
//! plus system, all threads, from `/proc/self/stat`).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    http::{header, Request, StatusCode},
    routing::get,
    Router,
};
use redis::{
    aio::{ConnectionLike, ConnectionManager},
    Cmd, Pipeline, RedisFuture, Value,
};
use tower::ServiceExt;
use tower_precondition::{
    store::{AtomicVersionStore, Entry, RedisStore},
    EntityTag, PreconditionLayer, Version,
};

/// Counts heap allocations while `COUNT_ALLOCS` is on (a relaxed load otherwise).
struct CountingAlloc;

static COUNT_ALLOCS: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is
// added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNT_ALLOCS.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNT_ALLOCS.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// This process's CPU time so far, user plus system over all its threads, in seconds
/// (`/proc/self/stat`, in ticks of `USER_HZ`, 100 on Linux); `None` where there is no
/// such file.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the command name (in parentheses, which may hold spaces): field 3 onwards;
    // utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// A connection that counts the round trips (commands sent by the client) through it.
#[derive(Clone)]
struct Counting {
    inner: ConnectionManager,
    round_trips: Arc<AtomicU64>,
}

impl ConnectionLike for Counting {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.round_trips.fetch_add(1, Ordering::SeqCst);
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.round_trips.fetch_add(1, Ordering::SeqCst);
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A private `redis-server`, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn start_server() -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--logfile", ""])
        .arg("--dir")
        .arg(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server");
    let server = Server { child, port };
    for _ in 0..200 {
        if cli(&server, &["PING"]).trim() == "PONG" {
            return server;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("redis-server did not start");
}

fn cli(server: &Server, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &server.port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Calls per command since the last `CONFIG RESETSTAT`, without the bench's own.
fn command_calls(server: &Server) -> BTreeMap<String, u64> {
    let text = cli(server, &["INFO", "commandstats"]);
    let mut calls = BTreeMap::new();
    for line in text.lines() {
        // cmdstat_evalsha:calls=1000,usec=...
        let Some(rest) = line.trim().strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, stats)) = rest.split_once(':') else {
            continue;
        };
        if name == "info" || name.starts_with("config") {
            continue;
        }
        let n = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        calls.insert(name.to_owned(), n);
    }
    calls
}

fn app<C>(store: RedisStore<C>) -> Router
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    app_with(PreconditionLayer::new(store))
}

fn app_with(layer: PreconditionLayer) -> Router {
    Router::new()
        .route(
            "/items/{id}",
            get(|| async { "item" })
                .put(|| async { StatusCode::NO_CONTENT })
                .delete(|| async { StatusCode::NO_CONTENT }),
        )
        .layer(layer)
}

async fn send(app: &Router, method: &str, uri: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let etag = response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (response.status().as_u16(), etag)
}

/// Runs `n` requests of one kind and reports, per request, the client's round trips
/// and the commands the server ran (those inside the script included).
async fn count(
    server: &Server,
    app: &Router,
    round_trips: &AtomicU64,
    label: &str,
    n: usize,
    kind: Kind,
) {
    // Set-up that is not counted.
    let mut etags = Vec::with_capacity(n);
    for i in 0..n {
        let uri = format!("/items/{label}-{i}");
        match kind {
            Kind::ReadSeeds | Kind::Create => etags.push(String::new()),
            _ => etags.push(send(app, "PUT", &uri, &[]).await.1),
        }
    }
    cli(server, &["CONFIG", "RESETSTAT"]);
    round_trips.store(0, Ordering::SeqCst);
    let mut statuses = BTreeMap::new();
    let allocs_before = ALLOCS.load(Ordering::Relaxed);
    COUNT_ALLOCS.store(true, Ordering::Relaxed);
    for (i, etag) in etags.iter().enumerate() {
        let uri = format!("/items/{label}-{i}");
        let (status, _) = match kind {
            Kind::Read | Kind::ReadSeeds => send(app, "GET", &uri, &[]).await,
            Kind::Write => send(app, "PUT", &uri, &[("if-match", etag)]).await,
            Kind::Create => send(app, "PUT", &uri, &[("if-none-match", "*")]).await,
            Kind::Delete => send(app, "DELETE", &uri, &[("if-match", etag)]).await,
            Kind::Stale => send(app, "PUT", &uri, &[("if-match", "\"stale\"")]).await,
        };
        *statuses.entry(status).or_insert(0usize) += 1;
    }
    COUNT_ALLOCS.store(false, Ordering::Relaxed);
    let allocs = ALLOCS.load(Ordering::Relaxed) - allocs_before;
    let trips = round_trips.load(Ordering::SeqCst);
    let calls = command_calls(server);
    let total: u64 = calls.values().sum();
    let per: Vec<String> = calls
        .iter()
        .filter(|(_, &c)| c > 0)
        .map(|(name, c)| format!("{name} {:.2}", *c as f64 / n as f64))
        .collect();
    println!(
        "| {label} | {:.2} | {:.2} | {} | {statuses:?} | {:.1} |",
        trips as f64 / n as f64,
        total as f64 / n as f64,
        per.join(", "),
        allocs as f64 / n as f64
    );
}

#[derive(Clone, Copy)]
enum Kind {
    Read,
    ReadSeeds,
    Write,
    Create,
    Delete,
    Stale,
}

/// What a throughput run measured.
struct Run {
    per_second: f64,
    /// This process's CPU time per request, in microseconds (0 where unknown).
    cpu_us: f64,
}

/// `concurrency` tasks sending requests for `seconds`.
async fn throughput(app: &Router, concurrency: usize, seconds: f64, method: &'static str) -> Run {
    // Every task has its own key, so writes never conflict (no 409 to retry).
    for task in 0..concurrency {
        send(app, "PUT", &format!("/items/load-{task}"), &[]).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let cpu_start = process_cpu_seconds();
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let app = app.clone();
            let stop = stop.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let uri = format!("/items/load-{task}");
                while !stop.load(Ordering::Relaxed) {
                    let (status, _) = send(&app, method, &uri, &[]).await;
                    assert!(status < 300, "{method} answered {status}");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("load task");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let requests = done.load(Ordering::Relaxed) as f64;
    let cpu = cpu_start
        .zip(process_cpu_seconds())
        .map_or(0.0, |(start, end)| end - start);
    Run {
        per_second: requests / elapsed,
        cpu_us: cpu * 1e6 / requests.max(1.0),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `redis-benchmark` with `args`; answers its requests per second.
fn redis_benchmark(server: &Server, concurrency: usize, n: usize, args: &[&str]) -> f64 {
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
        .args(["-c", &concurrency.to_string(), "-n", &n.to_string()])
        .args(["-r", "1000", "--csv"])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("run redis-benchmark");
    let text = String::from_utf8_lossy(&output.stdout);
    // "test","rps",... then "<command>","51234.56",...
    text.lines()
        .last()
        .and_then(|line| line.split(',').nth(1))
        .and_then(|rps| rps.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("cannot read redis-benchmark output: {text}"))
}

fn main() {
    if !(have("redis-server") && have("redis-cli") && have("redis-benchmark")) {
        println!("skipped: redis-server, redis-cli and redis-benchmark must be on PATH");
        return;
    }
    let seconds: f64 = env_or("BENCH_SECONDS", 3.0);
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 50);
    let evals: usize = env_or("BENCH_EVALS", 150_000);
    let rounds: usize = env_or("BENCH_ROUNDS", 5);
    let server = start_server();
    let url = format!("redis://127.0.0.1:{}", server.port);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    runtime.block_on(async {
        let store = RedisStore::open(&url).await.expect("open").prefix("bench:");
        let round_trips = Arc::new(AtomicU64::new(0));
        let counting = RedisStore::from_connection(Counting {
            inner: store.connection().clone(),
            round_trips: round_trips.clone(),
        })
        .prefix("bench:");
        let counted_app = app(counting);

        println!("## Round trips per request (1000 requests each)\n");
        println!(
            "| request | round trips | commands Redis ran | by command | statuses \
             | client allocations |"
        );
        println!("| --- | --- | --- | --- | --- | --- |");
        for (label, kind) in [
            ("read", Kind::Read),
            ("read-seeds", Kind::ReadSeeds),
            ("put-if-match", Kind::Write),
            ("put-create", Kind::Create),
            ("delete-if-match", Kind::Delete),
            ("put-stale-412", Kind::Stale),
        ] {
            count(&server, &counted_app, &round_trips, label, 1000, kind).await;
        }

        let app = app(store.clone());
        // The same layer loading every entry before its reserve, as before the cache.
        let uncached = app_with(PreconditionLayer::new(store.clone()).entry_cache(0));

        // The same script, the same shape of call (compare a committed entry, write
        // it), on 1000 prepared keys, as redis-benchmark will send it.
        let version =
            Version::from_parts(EntityTag::strong("v").expect("tag"), 1_700_000_000, false)
                .expect("strong");
        let entry = Entry::committed(version);
        for i in 0..1000 {
            let key = format!("{i:012}");
            store
                .compare_and_set(&key, None, Some(&entry))
                .await
                .expect("prepare");
        }

        let sha = RedisStore::script_sha();
        let fields = ["etag", "v", "modified", "1700000000", "ambiguous", "0"];
        let mut script_args = vec!["EVALSHA", sha, "1", "bench:{__rand_int__}", "3"];
        script_args.extend(fields);
        script_args.push("3");
        script_args.extend(fields);
        script_args.push("0");
        let hgetall_args = ["HGETALL", "bench:{__rand_int__}"];

        // The machine is shared and noisy: alternate the four measurements, several
        // rounds, and compare medians.
        println!("\n## Throughput, {concurrency} concurrent clients, one machine\n");
        println!(
            "| round | PUT via layer | EVALSHA, redis-benchmark | ratio \
             | PUT, no entry cache | ratio | GET via layer | HGETALL, redis-benchmark | ratio \
             | client CPU per PUT | per GET |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let mut runs: [Vec<f64>; 4] = Default::default();
        let mut ratios: [Vec<f64>; 3] = Default::default();
        let mut uncached_runs = Vec::new();
        let mut cpu: [Vec<f64>; 2] = Default::default();
        for round in 1..=rounds {
            let put = throughput(&app, concurrency, seconds, "PUT").await;
            let writes = put.per_second;
            let uncached_writes = throughput(&uncached, concurrency, seconds, "PUT")
                .await
                .per_second;
            let evals_per_sec = redis_benchmark(&server, concurrency, evals, &script_args);
            let get = throughput(&app, concurrency, seconds, "GET").await;
            let reads = get.per_second;
            let hgetall = redis_benchmark(&server, concurrency, evals, &hgetall_args);
            println!(
                "| {round} | {writes:.0} | {evals_per_sec:.0} | {:.3} \
                 | {uncached_writes:.0} | {:.3} | {reads:.0} | {hgetall:.0} | {:.3} \
                 | {:.1} µs | {:.1} µs |",
                writes / evals_per_sec,
                uncached_writes / evals_per_sec,
                reads / hgetall,
                put.cpu_us,
                get.cpu_us
            );
            cpu[0].push(put.cpu_us);
            cpu[1].push(get.cpu_us);
            uncached_runs.push(uncached_writes);
            ratios[2].push(uncached_writes / evals_per_sec);
            for (run, value) in runs.iter_mut().zip([writes, evals_per_sec, reads, hgetall]) {
                run.push(value);
            }
            ratios[0].push(writes / evals_per_sec);
            ratios[1].push(reads / hgetall);
        }
        let [writes, evals_per_sec, reads, hgetall] = runs.map(median);
        let [write_ratio, read_ratio, uncached_ratio] = ratios.map(median);
        let uncached_writes = median(uncached_runs);
        let [put_cpu, get_cpu] = cpu.map(median);
        println!(
            "| median | {writes:.0} | {evals_per_sec:.0} | {write_ratio:.3} \
             | {uncached_writes:.0} | {uncached_ratio:.3} | {reads:.0} | {hgetall:.0} | {read_ratio:.3} \
             | {put_cpu:.1} µs | {get_cpu:.1} µs |"
        );
        println!(
            "\n(ratios: median of the per-round ratios) PUT through the layer / EVALSHA by \
             redis-benchmark = {write_ratio:.3}; the layer's Redis round trips (2 per PUT: \
             reserve and settle, the entry cache saving the load) / EVALSHA = {:.3}",
            2.0 * write_ratio
        );
    });
}
