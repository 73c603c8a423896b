//! A load tool for the `/items/{id}` servers, with a lost-update check at the end.
//!
//! ```text
//! cargo run --release --all-features --example load -- --example axum_redis \
//!     --env REDIS_PREFIX=load-1: --env LEASE_MS=2000 --kill-every-ms 1000 --abandon-percent 5
//! cargo run --release --all-features --example load -- --url http://127.0.0.1:3000
//! ```
//!
//! It starts `--instances` processes (default 3, or 1 for `axum_memory`, whose store
//! lives in its process) of the named server example, building it first as the tests
//! do (in release when this tool is built in release), or drives servers already running
//! at `--url` (comma-separated). It creates `--items` counters `{"n": 0}` with ids of
//! its own (`If-None-Match: *`), then runs `--clients` clients for `--duration-secs`,
//! each one incrementing a random counter again and again: `GET` (with `If-None-Match`
//! when it holds a copy), then `PUT {"n": n + 1}` with `If-Match`, each request to the
//! next process in turn. A `412` or `409` sends the client back to the read.
//!
//! Faults, while it runs: `--kill-every-ms M` SIGKILLs one server process in turn and
//! starts it again on the same address (only servers this tool started);
//! `--abandon-percent P` makes a client drop P % of its writes 0–3 ms after sending.
//!
//! The check, once the clients stopped and the leases of killed writes expired (it waits
//! `LEASE_MS` from `--env` plus a second, or `--settle-ms`): every counter is read, and
//! its value must lie between the `2xx` increments it got and those plus the writes
//! whose outcome is unknown (abandoned, `5xx`, a connection lost after sending). Below:
//! an acknowledged increment was lost. Above: a write that was refused or never sent
//! was applied (a phantom). `PASS` exits 0, `FAIL` exits 1, a setup error exits 2.
//!
//! One summary line ends the output; server logs stay under `--log-dir`.

use std::{
    collections::hash_map::RandomState,
    fmt::Write as _,
    fs::OpenOptions,
    hash::{BuildHasher, Hasher},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde_json::{json, Value};
use tokio::{process::Child, sync::Mutex};

/// How long a started server may take to listen.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);
/// One exchange at most; a hung server then shows as transport errors, not a hung run.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);
/// How long the final reads may keep failing (a server still coming up) before FAIL.
const FINAL_READ_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Options {
    example: Option<String>,
    urls: Vec<String>,
    instances: Option<usize>,
    env: Vec<(String, String)>,
    clients: usize,
    duration: Duration,
    items: usize,
    kill_every: Option<Duration>,
    abandon_percent: f64,
    settle: Option<Duration>,
    log_dir: Option<PathBuf>,
    keep_items: bool,
}

const USAGE: &str =
    "usage: load (--example NAME [--instances N] [--env KEY=VALUE]... | --url URL[,URL...])
            [--clients C] [--duration-secs D] [--items K]
            [--kill-every-ms M] [--abandon-percent P] [--settle-ms MS]
            [--log-dir DIR] [--keep-items]";

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        example: None,
        urls: Vec::new(),
        instances: None,
        env: Vec::new(),
        clients: 32,
        duration: Duration::from_secs(10),
        items: 8,
        kill_every: None,
        abandon_percent: 0.0,
        settle: None,
        log_dir: None,
        keep_items: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        fn number<T: std::str::FromStr>(name: &str, text: String) -> Result<T, String> {
            text.parse()
                .map_err(|_| format!("{name}: not a number: {text}"))
        }
        match arg.as_str() {
            "--example" => options.example = Some(value(&arg)?),
            "--url" => options.urls.extend(
                value(&arg)?
                    .split(',')
                    .filter(|u| !u.is_empty())
                    .map(|u| u.trim_end_matches('/').to_owned()),
            ),
            "--instances" => options.instances = Some(number(&arg, value(&arg)?)?),
            "--env" => {
                let pair = value(&arg)?;
                let (key, val) = pair
                    .split_once('=')
                    .ok_or(format!("--env wants KEY=VALUE, got {pair}"))?;
                options.env.push((key.to_owned(), val.to_owned()));
            }
            "--clients" => options.clients = number(&arg, value(&arg)?)?,
            "--duration-secs" => {
                options.duration = Duration::from_secs_f64(number(&arg, value(&arg)?)?)
            }
            "--items" => options.items = number(&arg, value(&arg)?)?,
            "--kill-every-ms" => {
                options.kill_every = Some(Duration::from_millis(number(&arg, value(&arg)?)?))
            }
            "--abandon-percent" => options.abandon_percent = number(&arg, value(&arg)?)?,
            "--settle-ms" => {
                options.settle = Some(Duration::from_millis(number(&arg, value(&arg)?)?))
            }
            "--log-dir" => options.log_dir = Some(value(&arg)?.into()),
            "--keep-items" => options.keep_items = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    match (&options.example, options.urls.is_empty()) {
        (None, true) => return Err("give --example NAME or --url URL".into()),
        (Some(_), false) => return Err("--example and --url exclude each other".into()),
        (None, false) if options.kill_every.is_some() => {
            return Err("--kill-every-ms needs servers this tool started (--example)".into())
        }
        _ => {}
    }
    if options.example.as_deref() == Some("axum_memory") {
        // Its items and versions live in the process: several processes would not share
        // them, and a killed one forgets them, so there would be nothing to check.
        if options.instances.is_some_and(|n| n != 1) {
            return Err("axum_memory keeps its store in its process: --instances 1".into());
        }
        if options.kill_every.is_some() {
            return Err("axum_memory loses its store when killed: no --kill-every-ms".into());
        }
    }
    if options.clients == 0 || options.items == 0 || options.instances == Some(0) {
        return Err("--clients, --items and --instances must be at least 1".into());
    }
    if !(0.0..=100.0).contains(&options.abandon_percent) {
        return Err("--abandon-percent is between 0 and 100".into());
    }
    Ok(options)
}

// ---------------------------------------------------------------------------------------
// Randomness: a small xorshift generator (no new dependency), seeded per client
// ---------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn seeded(salt: u64) -> Self {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(salt);
        hasher.write_u128(now_nanos());
        Self(hasher.finish() | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 100.0 < percent
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

// ---------------------------------------------------------------------------------------
// Server processes
// ---------------------------------------------------------------------------------------

/// The example binary next to this tool, built (or found fresh) by cargo first, with
/// the same profile and target directory, as `tests/common/items_contract.rs` does.
fn example_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    // <target>/<profile>/examples/load
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("this tool does not live in <target>/<profile>/examples")?;
    let target_dir = profile_dir.parent().ok_or("no target directory")?;
    let expected = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut command = std::process::Command::new(cargo);
    command
        .args([
            "build",
            "--example",
            name,
            "--all-features",
            "--message-format=json",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        command.arg("--release");
    }
    let output = match command.output() {
        Ok(output) => output,
        Err(error) if expected.exists() => {
            eprintln!("cannot run cargo ({error}); using {}", expected.display());
            return Ok(expected);
        }
        Err(error) => return Err(format!("cannot run cargo to build {name}: {error}")),
    };
    if !output.status.success() {
        return Err(format!(
            "`cargo build --example {name}` failed ({})",
            output.status
        ));
    }
    // cargo reports each artifact as one JSON line; the example's carries its path.
    let reported = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == name)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from));
    let path = reported.unwrap_or(expected);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("{name} built, but {} is missing", path.display()))
    }
}

/// One server process this tool started, and how to start it again in the same place.
struct Server {
    addr: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

struct Fleet {
    binary: PathBuf,
    env: Vec<(String, String)>,
    servers: Vec<Mutex<Server>>,
    restarts: AtomicUsize,
}

impl Fleet {
    async fn start(
        binary: PathBuf,
        env: Vec<(String, String)>,
        count: usize,
        log_dir: &Path,
        name: &str,
    ) -> Result<Self, String> {
        let mut servers: Vec<Server> = Vec::with_capacity(count);
        while servers.len() < count {
            let addr = free_local_addr()?;
            if servers.iter().any(|s| s.addr == addr) {
                continue;
            }
            let log = log_dir.join(format!("{name}-{}.log", addr.port()));
            servers.push(Server {
                addr,
                log,
                child: None,
            });
        }
        let fleet = Self {
            binary,
            env,
            servers: servers.into_iter().map(Mutex::new).collect(),
            restarts: AtomicUsize::new(0),
        };
        // One after the other: examples that create their tables at startup expect that.
        for server in &fleet.servers {
            let mut server = server.lock().await;
            fleet.spawn(&mut server, "started")?;
            wait_until_listening(&mut server).await?;
            println!(
                "started {name} on {} (log: {})",
                server.addr,
                server.log.display()
            );
        }
        Ok(fleet)
    }

    fn spawn(&self, server: &mut Server, why: &str) -> Result<(), String> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&server.log)
            .map_err(|e| format!("open {}: {e}", server.log.display()))?;
        let _ = writeln!(log, "=== load: {why} (ADDR={}) ===", server.addr);
        let err = log.try_clone().map_err(|e| format!("log handle: {e}"))?;
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .env("ADDR", server.addr.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true);
        // The tests' filter: the layer's debug lines are the evidence if a check fails.
        if std::env::var_os("RUST_LOG").is_none() && !self.env.iter().any(|(k, _)| k == "RUST_LOG")
        {
            command.env("RUST_LOG", "info,tower_precondition=debug");
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        server.child = Some(child);
        Ok(())
    }

    /// SIGKILLs server `index` and starts it again on its address.
    async fn kill_and_restart(&self, index: usize) -> Result<(), String> {
        let mut server = self.servers[index].lock().await;
        if let Some(mut child) = server.child.take() {
            let _ = child.start_kill(); // SIGKILL on Unix
            let _ = child.wait().await;
        }
        self.spawn(&mut server, "restarted after SIGKILL")?;
        wait_until_listening(&mut server).await?;
        self.restarts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = Vec::new();
        for server in &self.servers {
            addrs.push(server.lock().await.addr);
        }
        addrs
    }

    async fn logs(&self) -> Vec<PathBuf> {
        let mut logs = Vec::new();
        for server in &self.servers {
            logs.push(server.lock().await.log.clone());
        }
        logs
    }

    async fn stop(&self) {
        for server in &self.servers {
            if let Some(mut child) = server.lock().await.child.take() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}

fn free_local_addr() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))
}

async fn wait_until_listening(server: &mut Server) -> Result<(), String> {
    let started = Instant::now();
    loop {
        if let Some(child) = server.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "server on {} exited ({status}) before listening; see {}",
                    server.addr,
                    server.log.display()
                ));
            }
        }
        if tokio::net::TcpStream::connect(server.addr).await.is_ok() {
            return Ok(());
        }
        if started.elapsed() > STARTUP_LIMIT {
            return Err(format!(
                "server on {} did not listen within {STARTUP_LIMIT:?}; see {}",
                server.addr,
                server.log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What one exchange came to.
enum Outcome {
    Reply {
        status: StatusCode,
        etag: Option<String>,
        body: Bytes,
    },
    /// The connection could not be made: the request was never sent.
    NotSent,
    /// Sent, and then the connection failed or the time ran out: its effect is unknown.
    Lost,
}

async fn exchange(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(header::HeaderName, &str)],
    body: Option<String>,
) -> Outcome {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(name, *value);
    }
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("a valid request");
    let sent = async {
        let response = match client.request(request).await {
            Ok(response) => response,
            Err(error) if error.is_connect() => return Outcome::NotSent,
            Err(_) => return Outcome::Lost,
        };
        let status = response.status();
        let etag = response
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match response.into_body().collect().await {
            Ok(body) => Outcome::Reply {
                status,
                etag,
                body: body.to_bytes(),
            },
            // The status line arrived, so the server answered; a write's status stands.
            Err(_) => Outcome::Reply {
                status,
                etag,
                body: Bytes::new(),
            },
        }
    };
    tokio::time::timeout(REQUEST_LIMIT, sent)
        .await
        .unwrap_or(Outcome::Lost)
}

fn counter_of(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(body).ok()?["n"].as_u64()
}

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Stats {
    /// Latencies of answered exchanges, in microseconds.
    get_us: Vec<u32>,
    put_us: Vec<u32>,
    requests: u64,
    s2xx: u64,
    s304: u64,
    s409: u64,
    s412: u64,
    s5xx: u64,
    other: u64,
    /// Sent, then the connection failed (or timed out).
    transport: u64,
    /// Never sent: the connection was refused (a killed server).
    refused: u64,
    abandoned: u64,
}

impl Stats {
    fn count(&mut self, status: StatusCode) {
        match status.as_u16() {
            200..=299 => self.s2xx += 1,
            304 => self.s304 += 1,
            409 => self.s409 += 1,
            412 => self.s412 += 1,
            500..=599 => self.s5xx += 1,
            _ => self.other += 1,
        }
    }

    fn merge(&mut self, other: Stats) {
        self.get_us.extend(other.get_us);
        self.put_us.extend(other.put_us);
        self.requests += other.requests;
        self.s2xx += other.s2xx;
        self.s304 += other.s304;
        self.s409 += other.s409;
        self.s412 += other.s412;
        self.s5xx += other.s5xx;
        self.other += other.other;
        self.transport += other.transport;
        self.refused += other.refused;
        self.abandoned += other.abandoned;
    }
}

/// The `q` quantile of `samples` (sorted here), in milliseconds.
fn quantile_ms(samples: &mut [u32], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let index = ((samples.len() - 1) as f64 * q).round() as usize;
    f64::from(samples[index]) / 1000.0
}

fn micros(since: Instant) -> u32 {
    since.elapsed().as_micros().min(u128::from(u32::MAX)) as u32
}

/// What the clients know about each counter's writes.
struct Ledger {
    /// Increments whose `PUT` answered `2xx`.
    applied: Vec<AtomicU64>,
    /// Writes whose outcome is unknown: abandoned, `5xx`, lost after sending.
    unknown: Vec<AtomicU64>,
}

// ---------------------------------------------------------------------------------------
// A client
// ---------------------------------------------------------------------------------------

struct Run {
    http: HttpClient,
    bases: Vec<String>,
    paths: Vec<String>,
    ledger: Ledger,
    abandon_percent: f64,
    stop: AtomicBool,
}

async fn client_loop(run: Arc<Run>, index: usize) -> Stats {
    let mut stats = Stats::default();
    let mut rng = Rng::seeded(index as u64);
    // Each client its own rotation, starting at its index, so a read and the write after
    // it go to different processes.
    let mut turn = index;
    let mut next_base = || {
        turn += 1;
        run.bases[turn % run.bases.len()].as_str()
    };
    // The last (ETag, n) this client saw per counter: its reads are then conditional.
    let mut copies: Vec<Option<(String, u64)>> = vec![None; run.paths.len()];

    while !run.stop.load(Ordering::Relaxed) {
        let item = rng.below(run.paths.len() as u64) as usize;
        let path = &run.paths[item];

        // Read.
        let url = format!("{}{path}", next_base());
        let started = Instant::now();
        stats.requests += 1;
        let copy = copies[item].clone();
        let conditional = copy
            .as_ref()
            .map(|(tag, _)| [(header::IF_NONE_MATCH, tag.as_str())]);
        let read = exchange(
            &run.http,
            Method::GET,
            &url,
            conditional.as_ref().map_or(&[][..], |h| &h[..]),
            None,
        )
        .await;
        let (tag, n) = match read {
            Outcome::Reply { status, etag, body } => {
                stats.get_us.push(micros(started));
                stats.count(status);
                match (status, etag, copy) {
                    (StatusCode::OK, Some(tag), _) => match counter_of(&body) {
                        Some(n) => (tag, n),
                        None => {
                            stats.other += 1;
                            continue;
                        }
                    },
                    (StatusCode::NOT_MODIFIED, _, Some(copy)) => copy,
                    _ => {
                        copies[item] = None;
                        backoff(&mut rng).await;
                        continue;
                    }
                }
            }
            Outcome::NotSent => {
                stats.refused += 1;
                backoff(&mut rng).await;
                continue;
            }
            Outcome::Lost => {
                stats.transport += 1;
                backoff(&mut rng).await;
                continue;
            }
        };
        copies[item] = Some((tag.clone(), n));

        // Write.
        let url = format!("{}{path}", next_base());
        let body = json!({ "n": n + 1 }).to_string();
        let started = Instant::now();
        stats.requests += 1;
        let precondition = [(header::IF_MATCH, tag.as_str())];
        let write = exchange(&run.http, Method::PUT, &url, &precondition, Some(body));
        let write = if rng.chance(run.abandon_percent) {
            let patience = Duration::from_micros(rng.below(3_001));
            match tokio::time::timeout(patience, write).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    stats.abandoned += 1;
                    run.ledger.unknown[item].fetch_add(1, Ordering::Relaxed);
                    copies[item] = None;
                    continue;
                }
            }
        } else {
            write.await
        };
        match write {
            Outcome::Reply { status, etag, .. } => {
                stats.put_us.push(micros(started));
                stats.count(status);
                if status.is_success() {
                    run.ledger.applied[item].fetch_add(1, Ordering::Relaxed);
                    copies[item] = etag.map(|tag| (tag, n + 1));
                } else {
                    copies[item] = None;
                    if status.is_server_error() {
                        run.ledger.unknown[item].fetch_add(1, Ordering::Relaxed);
                        backoff(&mut rng).await;
                    } else if status == StatusCode::CONFLICT {
                        // Another write holds the item (or a killed one's lease does).
                        backoff(&mut rng).await;
                    }
                }
            }
            Outcome::NotSent => {
                stats.refused += 1;
                backoff(&mut rng).await;
            }
            Outcome::Lost => {
                stats.transport += 1;
                run.ledger.unknown[item].fetch_add(1, Ordering::Relaxed);
                copies[item] = None;
                backoff(&mut rng).await;
            }
        }
    }
    stats
}

/// A short random pause, so clients refused together do not come back together.
async fn backoff(rng: &mut Rng) {
    tokio::time::sleep(Duration::from_micros(1_000 + rng.below(9_000))).await;
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

fn unique_tag() -> String {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(now_nanos());
    hasher.write_u32(std::process::id());
    format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("load: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(options).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("load: {message}");
            ExitCode::from(2)
        }
    }
}

/// `Ok(true)` on PASS, `Ok(false)` on FAIL.
async fn run(options: Options) -> Result<bool, String> {
    let tag = unique_tag();
    let fleet = match &options.example {
        Some(name) => {
            let binary = example_binary(name)?;
            let count = options
                .instances
                .unwrap_or(if name == "axum_memory" { 1 } else { 3 });
            let log_dir = options
                .log_dir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join(format!("load-{name}-{tag}")));
            std::fs::create_dir_all(&log_dir)
                .map_err(|e| format!("create {}: {e}", log_dir.display()))?;
            Some(Arc::new(
                Fleet::start(binary, options.env.clone(), count, &log_dir, name).await?,
            ))
        }
        None => None,
    };
    let result = drive(&options, fleet.clone(), &tag).await;
    if let Some(fleet) = &fleet {
        fleet.stop().await;
        if !matches!(result, Ok(true)) {
            for log in fleet.logs().await {
                eprintln!("server log kept: {}", log.display());
            }
        }
    }
    result
}

async fn drive(options: &Options, fleet: Option<Arc<Fleet>>, tag: &str) -> Result<bool, String> {
    let bases: Vec<String> = match &fleet {
        Some(fleet) => fleet
            .addrs()
            .await
            .iter()
            .map(|a| format!("http://{a}"))
            .collect(),
        None => options.urls.clone(),
    };
    let name = options
        .example
        .clone()
        .unwrap_or_else(|| options.urls.join(","));
    let paths: Vec<String> = (0..options.items)
        .map(|k| format!("/items/load-{tag}-{k}"))
        .collect();
    let http: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(options.clients)
        .build_http();

    // The counters, created on the processes in turn.
    for (k, path) in paths.iter().enumerate() {
        let url = format!("{}{path}", bases[k % bases.len()]);
        let created = exchange(
            &http,
            Method::PUT,
            &url,
            &[(header::IF_NONE_MATCH, "*")],
            Some(json!({"n": 0}).to_string()),
        )
        .await;
        match created {
            Outcome::Reply {
                status: StatusCode::CREATED,
                ..
            } => {}
            Outcome::Reply { status, body, .. } => {
                return Err(format!(
                    "create {path}: {status} {}",
                    String::from_utf8_lossy(&body)
                ))
            }
            _ => return Err(format!("create {path}: no answer from {url}")),
        }
    }

    let run = Arc::new(Run {
        http: http.clone(),
        bases: bases.clone(),
        paths: paths.clone(),
        ledger: Ledger {
            applied: (0..paths.len()).map(|_| AtomicU64::new(0)).collect(),
            unknown: (0..paths.len()).map(|_| AtomicU64::new(0)).collect(),
        },
        abandon_percent: options.abandon_percent,
        stop: AtomicBool::new(false),
    });
    println!(
        "{name}: {} process(es), {} clients, {} counters, {:?}{}",
        bases.len(),
        options.clients,
        paths.len(),
        options.duration,
        faults_label(options)
    );

    let started = Instant::now();
    let clients: Vec<_> = (0..options.clients)
        .map(|i| tokio::spawn(client_loop(run.clone(), i)))
        .collect();
    let killer = match (&fleet, options.kill_every) {
        (Some(fleet), Some(every)) => {
            let (fleet, run) = (fleet.clone(), run.clone());
            Some(tokio::spawn(async move {
                let mut next = 0;
                loop {
                    tokio::time::sleep(every).await;
                    if run.stop.load(Ordering::Relaxed) {
                        return Ok::<(), String>(());
                    }
                    fleet.kill_and_restart(next).await?;
                    next = (next + 1) % fleet.servers.len();
                }
            }))
        }
        _ => None,
    };
    tokio::time::sleep(options.duration).await;
    run.stop.store(true, Ordering::Relaxed);
    let mut stats = Stats::default();
    for client in clients {
        stats.merge(
            client
                .await
                .map_err(|e| format!("a client panicked: {e}"))?,
        );
    }
    let elapsed = started.elapsed();
    if let Some(killer) = killer {
        killer
            .await
            .map_err(|e| format!("the fault injector panicked: {e}"))??;
    }

    // Let the leases of writes cut short by a kill run out before reading.
    let lease_ms = options
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "LEASE_MS")
        .and_then(|(_, v)| v.parse::<u64>().ok());
    let settle = options.settle.unwrap_or(match lease_ms {
        Some(ms) => Duration::from_millis(ms + 1_000),
        None => Duration::from_millis(500),
    });
    tokio::time::sleep(settle).await;

    // The check.
    let mut report = String::new();
    let mut pass = true;
    let (mut stored_sum, mut applied_sum, mut unknown_sum) = (0u64, 0u64, 0u64);
    let mut finals: Vec<Option<String>> = Vec::with_capacity(paths.len());
    for (k, path) in paths.iter().enumerate() {
        let applied = run.ledger.applied[k].load(Ordering::Relaxed);
        let unknown = run.ledger.unknown[k].load(Ordering::Relaxed);
        applied_sum += applied;
        unknown_sum += unknown;
        let (stored, etag) = match final_read(&http, &bases[0], path).await {
            Ok(read) => read,
            Err(message) => {
                pass = false;
                let _ = writeln!(report, "  {path}: {message}");
                finals.push(None);
                continue;
            }
        };
        stored_sum += stored;
        finals.push(Some(etag));
        let verdict = if stored < applied {
            pass = false;
            "LOST UPDATE"
        } else if stored > applied + unknown {
            pass = false;
            "PHANTOM WRITE"
        } else {
            "ok"
        };
        let _ = writeln!(
            report,
            "  {path}: stored {stored}, applied {applied}, unknown {unknown}: {verdict}"
        );
    }
    if stored_sum < applied_sum || stored_sum > applied_sum + unknown_sum {
        pass = false;
    }
    print!("{report}");
    println!(
        "check: stored sum {stored_sum}, 2xx increments {applied_sum}, unknown outcomes \
         {unknown_sum}: {}",
        if pass { "PASS" } else { "FAIL" }
    );

    if !options.keep_items && pass {
        for (path, etag) in paths.iter().zip(&finals) {
            if let Some(etag) = etag {
                let url = format!("{}{path}", bases[0]);
                let _ = exchange(
                    &http,
                    Method::DELETE,
                    &url,
                    &[(header::IF_MATCH, etag)],
                    None,
                )
                .await;
            }
        }
    }

    let secs = elapsed.as_secs_f64();
    let restarts = fleet
        .as_ref()
        .map_or(0, |f| f.restarts.load(Ordering::Relaxed));
    println!(
        "{:<20} {:>4} {:>4} {:>5} {:<22} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>7} {:>7} {:>6} result",
        "server", "proc", "cli", "secs", "faults", "req/s", "writes/s", "GETp50", "GETp99",
        "PUTp50", "PUTp99", "2xx", "304", "409", "412", "5xx", "trans", "refus", "aband",
        "kills", "applied", "stored", "unknwn"
    );
    println!(
        "{:<20} {:>4} {:>4} {:>5.1} {:<22} {:>8.0} {:>8.0} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7} {:>6} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>7} {:>7} {:>6} {}",
        name,
        bases.len(),
        options.clients,
        secs,
        faults_label(options).trim_start_matches(", "),
        stats.requests as f64 / secs,
        applied_sum as f64 / secs,
        quantile_ms(&mut stats.get_us, 0.50),
        quantile_ms(&mut stats.get_us, 0.99),
        quantile_ms(&mut stats.put_us, 0.50),
        quantile_ms(&mut stats.put_us, 0.99),
        stats.s2xx,
        stats.s304,
        stats.s409,
        stats.s412,
        stats.s5xx,
        stats.transport,
        stats.refused,
        stats.abandoned,
        restarts,
        applied_sum,
        stored_sum,
        unknown_sum,
        if pass { "PASS" } else { "FAIL" }
    );
    if stats.other > 0 {
        println!("note: {} answers with another status (4xx)", stats.other);
    }
    Ok(pass)
}

fn faults_label(options: &Options) -> String {
    let mut label = String::new();
    if let Some(every) = options.kill_every {
        let _ = write!(label, ", kill/{}ms", every.as_millis());
    }
    if options.abandon_percent > 0.0 {
        let _ = write!(label, ", abandon {}%", options.abandon_percent);
    }
    if label.is_empty() {
        ", none".to_owned()
    } else {
        label
    }
}

/// The counter's value and `ETag`, retrying while the server is not answering `200`.
async fn final_read(http: &HttpClient, base: &str, path: &str) -> Result<(u64, String), String> {
    let url = format!("{base}{path}");
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < FINAL_READ_LIMIT {
        match exchange(http, Method::GET, &url, &[], None).await {
            Outcome::Reply {
                status: StatusCode::OK,
                etag,
                body,
            } => {
                return match counter_of(&body) {
                    Some(n) => Ok((n, etag.unwrap_or_default())),
                    None => Err(format!("not a counter: {}", String::from_utf8_lossy(&body))),
                }
            }
            // The item is gone: every increment it had is lost.
            Outcome::Reply {
                status: StatusCode::NOT_FOUND,
                ..
            } => return Err("the counter is gone (404)".into()),
            Outcome::Reply { status, body, .. } => {
                last = format!("{status} {}", String::from_utf8_lossy(&body));
            }
            Outcome::NotSent | Outcome::Lost => last = "no answer".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("no final read within {FINAL_READ_LIMIT:?}: {last}"))
}
