//! A black-box driver for the `/items/{id}` contract that every backend's server example
//! (`axum_memory`, `axum_redis`, `axum_postgres`, `axum_sqlx`, `axum_tokio_postgres`,
//! `axum_sqlite_store`) serves.
//!
//! It starts the compiled example as a separate process on a free port, waits until the
//! port answers, and drives it over real HTTP/1.1 connections. It assumes nothing
//! beyond the contract: item ids are unique per run (shared stores persist across
//! runs), and every item it creates is deleted again.
//!
//! An example whose items live in a shared database can also run as several processes
//! on one database ([`ExampleInstances`]); a client over them ([`HttpClient::round_robin`])
//! sends each request to the next instance, so consecutive requests of a contract are
//! served by different processes ([`run_items_contract_on_instances`], and the races
//! [`run_same_if_match_race_on_instances`] and [`run_counter_on_instances`]).
//!
//! Use it from a test file with
//!
//! ```ignore
//! #[path = "common/items_contract.rs"]
//! mod items_contract;
//!
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn serves_the_contract() {
//!     items_contract::run_items_contract("axum_memory", &[]).await;
//! }
//! ```
#![allow(dead_code)]

use std::{
    collections::hash_map::RandomState,
    fs::File,
    hash::{BuildHasher, Hasher},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde_json::{json, Value};

/// How long a child may take to start answering on its port.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);
/// An upper bound for one exchange, so a hung server fails the test instead of hanging it.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// How many writers race with the same `If-Match`.
const RACERS: usize = 16;

// ---------------------------------------------------------------------------------------
// Locating and building the example binary
// ---------------------------------------------------------------------------------------

/// Where cargo puts the example `name` for the profile this test was built with:
/// `<target>/<profile>/deps/<this test>` → `<target>/<profile>/examples/<name>`.
pub fn expected_example_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/deps");
    profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// The path of the built example `name`, building it first.
///
/// `cargo build --example <name> --all-features` runs once per example and process
/// (with the same `CARGO_TARGET_DIR` and environment as this test): it is a no-op when
/// the binary is fresh and rebuilds it when its source changed, so a test never drives
/// a stale server. The executable's path is taken from cargo's own report. If cargo
/// cannot be run at all, an already built binary at the expected path is used.
pub fn example_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(n, _)| n == name) {
        return path.clone();
    }
    let path = build_example(name);
    built.push((name.to_owned(), path.clone()));
    path
}

fn build_example(name: &str) -> PathBuf {
    let expected = expected_example_path(name);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut command = Command::new(cargo);
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
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let in_release = expected
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .is_some_and(|p| p == "release");
    if in_release {
        command.arg("--release");
    }
    let output = match command.output() {
        Ok(output) => output,
        Err(error) if expected.exists() => {
            eprintln!("cannot run cargo ({error}); using {}", expected.display());
            return expected;
        }
        Err(error) => panic!(
            "example {name} is not built at {} and cargo cannot be run: {error}",
            expected.display()
        ),
    };
    assert!(
        output.status.success(),
        "`cargo build --example {name} --all-features` failed ({})",
        output.status
    );
    // cargo reports each artifact as one JSON line; the example's carries its path.
    let reported = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == name)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from));
    let path = reported.unwrap_or(expected);
    assert!(
        path.exists(),
        "example {name} was built but {} does not exist",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------

/// A running example server; killed when dropped.
pub struct ExampleServer {
    child: Child,
    name: String,
    addr: SocketAddr,
    log: PathBuf,
}

impl ExampleServer {
    /// Builds (if needed) and starts example `name` with `ADDR=127.0.0.1:<free port>`
    /// and `extra_env`, and waits until its port accepts connections.
    pub async fn start(name: &str, extra_env: &[(&str, &str)]) -> Self {
        let binary = example_binary(name);
        let addr = free_local_addr();
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{name}-{}-{}.log",
            addr.port(),
            std::process::id()
        ));
        let out = File::create(&log).expect("create the server's log file");
        let err = out.try_clone().expect("clone the log file handle");

        let mut command = Command::new(&binary);
        command
            .env("ADDR", addr.to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let sets_log_filter = extra_env.iter().any(|(k, _)| *k == "RUST_LOG");
        if std::env::var_os("RUST_LOG").is_none() && !sets_log_filter {
            command.env("RUST_LOG", "info,tower_precondition=debug");
        }
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut server = Self {
            child,
            name: name.to_owned(),
            addr,
            log,
        };
        server.wait_until_listening().await;
        println!(
            "started example {name} on {addr} (log: {})",
            server.log.display()
        );
        server
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything the server printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_until_listening(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "example {} exited ({status}) before listening on {}; its output:\n{}",
                    self.name,
                    self.addr,
                    self.log_text()
                );
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            assert!(
                started.elapsed() < STARTUP_LIMIT,
                "example {} did not listen on {} within {STARTUP_LIMIT:?}; its output:\n{}",
                self.name,
                self.addr,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ExampleServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port that was free a moment ago.
fn free_local_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address")
}

/// Several processes of one example, each on its own port, sharing whatever backend
/// `extra_env` names (a database, a Redis prefix); all killed when dropped.
pub struct ExampleInstances {
    servers: Vec<ExampleServer>,
}

impl ExampleInstances {
    /// Starts `count` processes of example `name` with `extra_env`, on distinct ports.
    pub async fn start(name: &str, extra_env: &[(&str, &str)], count: usize) -> Self {
        assert!(count > 0, "at least one instance");
        let mut servers: Vec<ExampleServer> = Vec::with_capacity(count);
        while servers.len() < count {
            let server = ExampleServer::start(name, extra_env).await;
            // A port handed out twice would make two "instances" one process.
            if servers.iter().all(|s| s.addr() != server.addr()) {
                servers.push(server);
            }
        }
        Self { servers }
    }

    pub fn servers(&self) -> &[ExampleServer] {
        &self.servers
    }
}

/// What a failed assertion shows: the logs of the server(s) the test talks to.
pub trait ServerLogs {
    fn log_text(&self) -> String;
}

impl ServerLogs for ExampleServer {
    fn log_text(&self) -> String {
        ExampleServer::log_text(self)
    }
}

impl ServerLogs for ExampleInstances {
    fn log_text(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("=== {} on {} ===\n{}", s.name, s.addr, s.log_text()))
            .collect()
    }
}

/// An id no earlier run used: shared stores (Redis, Postgres) keep items across runs.
pub fn unique_id(label: &str) -> String {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    format!("{label}-{:016x}", hasher.finish())
}

// ---------------------------------------------------------------------------------------
// The HTTP client
// ---------------------------------------------------------------------------------------

/// What came back from one exchange.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The `ETag` header, if any.
    pub fn etag(&self) -> Option<String> {
        self.header(header::ETAG)
    }

    pub fn header(&self, name: HeaderName) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// The body as JSON; panics (failing the test) if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body, got {:?}: {e}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn is_problem_json(&self) -> bool {
        self.header(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.starts_with("application/problem+json"))
    }
}

/// An HTTP/1.1 client for one server, or for several instances of one, taken in turn:
/// each request goes to the next address (round robin). Clones share the rotation.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    addrs: Arc<[SocketAddr]>,
    /// The servers' logs, shown when an exchange fails.
    logs: Arc<[PathBuf]>,
    /// How many requests were sent: the next one goes to `addrs[next % addrs.len()]`.
    next: Arc<AtomicUsize>,
}

impl HttpClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            addrs: Arc::new([addr]),
            logs: Arc::new([]),
            next: Arc::default(),
        }
    }

    /// A client for `server`, whose log is shown when an exchange fails.
    pub fn for_server(server: &ExampleServer) -> Self {
        Self {
            logs: Arc::new([server.log.clone()]),
            ..Self::new(server.addr())
        }
    }

    /// A client that sends each request to the next of `instances`, in turn.
    pub fn round_robin(instances: &ExampleInstances) -> Self {
        Self {
            addrs: instances.servers.iter().map(ExampleServer::addr).collect(),
            logs: instances.servers.iter().map(|s| s.log.clone()).collect(),
            ..Self::new(instances.servers[0].addr())
        }
    }

    /// A client over the same addresses (and connections) with a rotation of its own,
    /// whose next request goes to address `start`: a task that alternates reads and
    /// writes with it sends every read and the write after it to different instances.
    pub fn own_rotation(&self, start: usize) -> Self {
        Self {
            next: Arc::new(AtomicUsize::new(start)),
            ..self.clone()
        }
    }

    /// How many addresses the client takes in turn.
    pub fn instances(&self) -> usize {
        self.addrs.len()
    }

    fn server_log(&self) -> String {
        self.logs
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                if self.logs.len() > 1 {
                    format!("=== {} ===\n{text}", p.display())
                } else {
                    text
                }
            })
            .collect()
    }

    /// Sends `method path` with `headers` and an optional body (sent as JSON).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(HeaderName, &str)],
        body: Option<&str>,
    ) -> Reply {
        let addr = self.addrs[self.next.fetch_add(1, Ordering::Relaxed) % self.addrs.len()];
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("http://{addr}{path}"));
        for (name, value) in headers {
            request = request.header(name, *value);
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let body = Full::new(Bytes::from(body.unwrap_or_default().to_owned()));
        let request = request.body(body).expect("a valid request");
        let exchange = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(REQUEST_LIMIT, exchange).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => panic!(
                "{method} {path} (to {addr}) failed: {error:?}\n--- server log ---\n{}",
                self.server_log()
            ),
            Err(_) => panic!(
                "{method} {path} (to {addr}) got no answer within {REQUEST_LIMIT:?}\n--- server log ---\n{}",
                self.server_log()
            ),
        }
    }

    pub async fn get(&self, path: &str, headers: &[(HeaderName, &str)]) -> Reply {
        self.send(Method::GET, path, headers, None).await
    }

    pub async fn put(&self, path: &str, headers: &[(HeaderName, &str)], body: &Value) -> Reply {
        self.send(Method::PUT, path, headers, Some(&body.to_string()))
            .await
    }

    pub async fn patch(&self, path: &str, headers: &[(HeaderName, &str)], body: &str) -> Reply {
        self.send(Method::PATCH, path, headers, Some(body)).await
    }

    pub async fn delete(&self, path: &str, headers: &[(HeaderName, &str)]) -> Reply {
        self.send(Method::DELETE, path, headers, None).await
    }
}

fn if_match(tag: &str) -> [(HeaderName, &str); 1] {
    [(header::IF_MATCH, tag)]
}

/// Asserts `reply` has `status`, showing the body and the server's log otherwise.
#[track_caller]
fn expect_status(server: &impl ServerLogs, what: &str, reply: &Reply, status: StatusCode) {
    assert!(
        reply.status == status,
        "{what}: expected {status}, got {} with body {:?}\n--- server log ---\n{}",
        reply.status,
        String::from_utf8_lossy(&reply.body),
        server.log_text()
    );
}

#[track_caller]
fn expect_success(server: &impl ServerLogs, what: &str, reply: &Reply) {
    assert!(
        reply.status.is_success(),
        "{what}: expected 2xx, got {} with body {:?}\n--- server log ---\n{}",
        reply.status,
        String::from_utf8_lossy(&reply.body),
        server.log_text()
    );
}

#[track_caller]
fn etag_of(what: &str, reply: &Reply) -> String {
    let tag = reply
        .etag()
        .unwrap_or_else(|| panic!("{what}: expected an ETag, headers {:?}", reply.headers));
    assert!(
        tag.starts_with('"') && tag.ends_with('"') && tag.len() >= 2,
        "{what}: ETag {tag:?} is not a strong entity tag"
    );
    tag
}

#[track_caller]
fn expect_problem(what: &str, reply: &Reply, status: StatusCode) {
    assert!(
        reply.is_problem_json(),
        "{what}: expected application/problem+json, got {:?}",
        reply.header(header::CONTENT_TYPE)
    );
    assert_eq!(
        reply.json()["status"],
        json!(status.as_u16()),
        "{what}: the problem document names its status"
    );
}

// ---------------------------------------------------------------------------------------
// The contract
// ---------------------------------------------------------------------------------------

/// Starts example `example` (with `extra_env`) and drives it through every case of the
/// `/items/{id}` contract with the precondition policy off.
pub async fn run_items_contract(example: &str, extra_env: &[(&str, &str)]) {
    let server = ExampleServer::start(example, extra_env).await;
    items_contract(&server, &HttpClient::for_server(&server)).await;
}

/// Starts `instances` processes of example `example` on one backend (`extra_env` names
/// it) and drives them through the whole `/items/{id}` contract, each request to the
/// next process: an item written through one is read, revalidated and refused through
/// the others.
pub async fn run_items_contract_on_instances(
    example: &str,
    extra_env: &[(&str, &str)],
    instances: usize,
) {
    let servers = ExampleInstances::start(example, extra_env, instances).await;
    items_contract(&servers, &HttpClient::round_robin(&servers)).await;
}

/// Every case of the `/items/{id}` contract, through `http`; `s` shows the logs.
async fn items_contract(s: &impl ServerLogs, http: &HttpClient) {
    let id = unique_id("contract");
    let path = format!("/items/{id}");
    let path = path.as_str();

    // A missing item.
    let missing = http.get(path, &[]).await;
    expect_status(s, "GET a missing item", &missing, StatusCode::NOT_FOUND);

    // Create.
    let item = json!({"name": "lamp", "stock": 3, "tags": ["desk"]});
    let created = http.put(path, &[], &item).await;
    expect_status(s, "PUT creates", &created, StatusCode::CREATED);
    let v1 = etag_of("PUT creates", &created);

    // Read, and a conditional read.
    let read = http.get(path, &[]).await;
    expect_status(s, "GET an item", &read, StatusCode::OK);
    assert!(
        read.header(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.starts_with("application/json")),
        "GET answers JSON, got {:?}",
        read.header(header::CONTENT_TYPE)
    );
    assert_eq!(read.json(), item, "GET returns what PUT stored");
    assert_eq!(
        etag_of("GET", &read),
        v1,
        "GET carries the ETag of the create"
    );

    let cached = http.get(path, &[(header::IF_NONE_MATCH, &v1)]).await;
    expect_status(
        s,
        "GET with a matching If-None-Match",
        &cached,
        StatusCode::NOT_MODIFIED,
    );
    assert_eq!(
        cached.etag().as_deref(),
        Some(&*v1),
        "the 304 carries the ETag"
    );
    assert!(cached.body.is_empty(), "a 304 has no body");

    // Replace with the current tag.
    let item2 = json!({"name": "lamp", "stock": 4});
    let replaced = http.put(path, &if_match(&v1), &item2).await;
    assert!(
        replaced.status == StatusCode::OK || replaced.status == StatusCode::NO_CONTENT,
        "PUT with the current If-Match replaces (200 or 204), got {}",
        replaced.status
    );
    let v2 = etag_of("PUT replaces", &replaced);
    assert_ne!(v2, v1, "a replace gets a new ETag");
    assert_eq!(
        http.get(path, &[]).await.json(),
        item2,
        "GET sees the replacement"
    );

    // A stale tag: refused, with the current tag and a problem document.
    let stale = http
        .put(path, &if_match(&v1), &json!({"name": "stale"}))
        .await;
    expect_status(
        s,
        "PUT with a stale If-Match",
        &stale,
        StatusCode::PRECONDITION_FAILED,
    );
    assert_eq!(
        stale.etag().as_deref(),
        Some(&*v2),
        "the 412 carries the current ETag"
    );
    expect_problem(
        "PUT with a stale If-Match",
        &stale,
        StatusCode::PRECONDITION_FAILED,
    );
    assert_eq!(
        http.get(path, &[]).await.json(),
        item2,
        "a 412 changes nothing"
    );

    // PATCH: a shallow merge.
    let patched = http
        .patch(path, &if_match(&v2), r#"{"stock": 5, "color": "red"}"#)
        .await;
    expect_success(s, "PATCH with the current If-Match", &patched);
    let v3 = etag_of("PATCH", &patched);
    assert_ne!(v3, v2, "a PATCH gets a new ETag");
    let merged = http.get(path, &[]).await;
    assert_eq!(
        merged.json(),
        json!({"name": "lamp", "stock": 5, "color": "red"}),
        "GET sees the merged item"
    );
    assert_eq!(
        merged.etag().as_deref(),
        Some(&*v3),
        "GET carries the PATCH's ETag"
    );

    // An invalid PATCH is a client error and changes nothing: the tag still works.
    let invalid = http.patch(path, &if_match(&v3), r#"{"stock": "#).await;
    assert!(
        invalid.status.is_client_error(),
        "PATCH with invalid JSON gets a 4xx, got {}",
        invalid.status
    );
    let after_invalid = http.get(path, &[]).await;
    assert_eq!(
        after_invalid.etag().as_deref(),
        Some(&*v3),
        "a 4xx keeps the version"
    );
    assert_eq!(
        after_invalid.json()["stock"],
        json!(5),
        "a 4xx keeps the data"
    );
    let patched_again = http.patch(path, &if_match(&v3), r#"{"stock": 6}"#).await;
    expect_success(s, "PATCH with the tag a 4xx left in place", &patched_again);
    let v4 = etag_of("PATCH after a 4xx", &patched_again);

    // PATCH on a missing item.
    let missing_path = format!("/items/{}", unique_id("contract-missing"));
    let patch_missing = http.patch(&missing_path, &[], r#"{"stock": 1}"#).await;
    expect_status(
        s,
        "PATCH a missing item",
        &patch_missing,
        StatusCode::NOT_FOUND,
    );

    // A malformed If-Match is a 400 problem, and changes nothing.
    let malformed = http
        .put(path, &[(header::IF_MATCH, "not-a-quoted-tag")], &json!({}))
        .await;
    expect_status(
        s,
        "PUT with a malformed If-Match",
        &malformed,
        StatusCode::BAD_REQUEST,
    );
    expect_problem(
        "PUT with a malformed If-Match",
        &malformed,
        StatusCode::BAD_REQUEST,
    );

    // Create-only: `If-None-Match: *` on an existing item fails, on a new one creates.
    let exists = http
        .put(
            path,
            &[(header::IF_NONE_MATCH, "*")],
            &json!({"name": "again"}),
        )
        .await;
    expect_status(
        s,
        "If-None-Match: * on an existing item",
        &exists,
        StatusCode::PRECONDITION_FAILED,
    );
    let current = http.get(path, &[]).await;
    assert_eq!(
        current.etag().as_deref(),
        Some(&*v4),
        "refused writes keep the version"
    );
    assert_eq!(
        current.json()["stock"],
        json!(6),
        "refused writes keep the data"
    );

    let fresh_path = format!("/items/{}", unique_id("contract-create-only"));
    let create_only = http
        .put(
            &fresh_path,
            &[(header::IF_NONE_MATCH, "*")],
            &json!({"n": 1}),
        )
        .await;
    expect_status(
        s,
        "If-None-Match: * on a new item",
        &create_only,
        StatusCode::CREATED,
    );
    let fresh_tag = etag_of("create-only PUT", &create_only);

    // A race: many writers with the same If-Match, exactly one wins.
    let racers = (0..RACERS).map(|i| {
        let http = http.clone();
        let (path, tag) = (path.to_owned(), v4.clone());
        tokio::spawn(async move {
            let body = json!({"name": "lamp", "stock": 100 + i});
            (i, http.put(&path, &if_match(&tag), &body).await)
        })
    });
    let mut winners = Vec::new();
    let mut tally = std::collections::BTreeMap::<u16, usize>::new();
    for racer in racers.collect::<Vec<_>>() {
        let (i, reply) = racer.await.expect("a racer panicked");
        *tally.entry(reply.status.as_u16()).or_default() += 1;
        if reply.status.is_success() {
            winners.push((i, reply));
        } else {
            assert!(
                reply.status == StatusCode::CONFLICT
                    || reply.status == StatusCode::PRECONDITION_FAILED,
                "a losing racer gets 409 or 412, got {} ({:?})",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
    }
    println!("{RACERS} racing PUTs with one If-Match: {tally:?}");
    assert_eq!(
        winners.len(),
        1,
        "exactly one of {RACERS} writers with the same If-Match may succeed: {tally:?}"
    );
    let (winner, won) = &winners[0];
    let v5 = etag_of("the winning PUT", won);
    let after_race = http.get(path, &[]).await;
    assert_eq!(
        after_race.etag().as_deref(),
        Some(&*v5),
        "the winner's ETag is current"
    );
    assert_eq!(
        after_race.json()["stock"],
        json!(100 + winner),
        "the winner's data is stored"
    );

    // DELETE: with the current tag, then again (missing).
    let stale_delete = http.delete(path, &if_match(&v4)).await;
    expect_status(
        s,
        "DELETE with a stale If-Match",
        &stale_delete,
        StatusCode::PRECONDITION_FAILED,
    );
    let deleted = http.delete(path, &if_match(&v5)).await;
    expect_status(
        s,
        "DELETE with the current If-Match",
        &deleted,
        StatusCode::NO_CONTENT,
    );
    let gone = http.get(path, &[]).await;
    expect_status(s, "GET a deleted item", &gone, StatusCode::NOT_FOUND);
    let delete_again = http.delete(path, &[]).await;
    expect_status(
        s,
        "DELETE a deleted item",
        &delete_again,
        StatusCode::NOT_FOUND,
    );
    let never = http.delete(&missing_path, &[]).await;
    expect_status(s, "DELETE a missing item", &never, StatusCode::NOT_FOUND);

    // Clean up (shared stores keep data across runs).
    let cleanup = http.delete(&fresh_path, &if_match(&fresh_tag)).await;
    expect_status(
        s,
        "DELETE the create-only item",
        &cleanup,
        StatusCode::NO_CONTENT,
    );
}

/// Starts example `example` with `REQUIRE_PRECONDITIONS=1` (and `extra_env`): writes
/// without a precondition get `428`, conditional ones work, reads are unaffected.
pub async fn run_require_preconditions_contract(example: &str, extra_env: &[(&str, &str)]) {
    let mut env = vec![("REQUIRE_PRECONDITIONS", "1")];
    env.extend_from_slice(extra_env);
    let server = ExampleServer::start(example, &env).await;
    let http = HttpClient::for_server(&server);
    let s = &server;
    let path = format!("/items/{}", unique_id("contract-428"));
    let path = path.as_str();

    let blind_create = http.put(path, &[], &json!({"name": "blind"})).await;
    expect_status(
        s,
        "an unconditional PUT",
        &blind_create,
        StatusCode::PRECONDITION_REQUIRED,
    );
    expect_problem(
        "an unconditional PUT",
        &blind_create,
        StatusCode::PRECONDITION_REQUIRED,
    );
    let missing = http.get(path, &[]).await;
    expect_status(s, "GET after a 428", &missing, StatusCode::NOT_FOUND);

    let created = http
        .put(
            path,
            &[(header::IF_NONE_MATCH, "*")],
            &json!({"name": "lamp"}),
        )
        .await;
    expect_status(
        s,
        "PUT with If-None-Match: *",
        &created,
        StatusCode::CREATED,
    );
    let v1 = etag_of("create-only PUT", &created);

    let read = http.get(path, &[]).await;
    expect_status(s, "an unconditional GET", &read, StatusCode::OK);
    assert_eq!(read.etag().as_deref(), Some(&*v1));

    for (method, body) in [
        (Method::PUT, Some(r#"{"name": "blind"}"#)),
        (Method::PATCH, Some(r#"{"name": "blind"}"#)),
        (Method::DELETE, None),
    ] {
        let what = format!("an unconditional {method}");
        let reply = http.send(method, path, &[], body).await;
        expect_status(s, &what, &reply, StatusCode::PRECONDITION_REQUIRED);
        expect_problem(&what, &reply, StatusCode::PRECONDITION_REQUIRED);
    }
    assert_eq!(
        http.get(path, &[]).await.json(),
        json!({"name": "lamp"}),
        "428s change nothing"
    );

    let replaced = http
        .put(path, &if_match(&v1), &json!({"name": "lamp", "stock": 1}))
        .await;
    expect_success(s, "PUT with If-Match", &replaced);
    let v2 = etag_of("PUT with If-Match", &replaced);
    let deleted = http.delete(path, &if_match(&v2)).await;
    expect_status(s, "DELETE with If-Match", &deleted, StatusCode::NO_CONTENT);
}

// ---------------------------------------------------------------------------------------
// The review's findings, against the example servers over real sockets
// ---------------------------------------------------------------------------------------

/// Opens a raw connection and sends the head of a `PUT path` announcing `announced`
/// body bytes, then `sent` of them: a client that stalls (keep the stream) or is cut
/// off (drop it).
pub async fn partial_put(
    addr: SocketAddr,
    path: &str,
    extra: &str,
    announced: usize,
    sent: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PUT {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n{extra}content-length: {announced}\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    stream
        .write_all(&b"{\"name\":\"stalled\"".repeat(announced)[..sent])
        .await
        .expect("send part of the body");
    stream.flush().await.expect("flush");
    stream
}

/// Findings 8.1 and 7.4: while clients stall their uploads to an item, a valid
/// conditional write of that item goes through; a body cut off mid-upload changes
/// nothing and leaves the ETag valid.
pub async fn run_stalled_upload_contract(example: &str, extra_env: &[(&str, &str)]) {
    let server = ExampleServer::start(example, extra_env).await;
    let client = HttpClient::for_server(&server);
    let path = format!("/items/{}", unique_id("stall"));
    let created = client.put(&path, &[], &json!({"name": "lamp"})).await;
    expect_success(&server, "create", &created);
    let tag = etag_of("create", &client.get(&path, &[]).await);

    // Ten clients send the head of a conditional PUT and part of its body, then stall.
    let header = format!("if-match: {tag}\r\n");
    let mut stalled = Vec::new();
    for _ in 0..10 {
        stalled.push(partial_put(server.addr(), &path, &header, 200, 20).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let write = client
        .put(&path, &if_match(&tag), &json!({"name": "desk"}))
        .await;
    expect_success(&server, "a valid write while uploads stall", &write);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the valid write waited {:?} behind stalled uploads",
        started.elapsed()
    );
    let tag = etag_of("the write", &write);
    drop(stalled);

    // A body cut off mid-upload: nothing changes, and the current ETag stays valid.
    let header = format!("if-match: {tag}\r\n");
    drop(partial_put(server.addr(), &path, &header, 200, 30).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = client.get(&path, &[]).await;
    assert_eq!(
        read.json()["name"],
        json!("desk"),
        "a cut-off body was written"
    );
    assert_eq!(
        read.etag().as_deref(),
        Some(tag.as_str()),
        "a cut-off body changed the version"
    );
    let write = client
        .put(&path, &if_match(&tag), &json!({"name": "chair"}))
        .await;
    expect_success(
        &server,
        "a write with the ETag from before the cut-off body",
        &write,
    );
    expect_success(&server, "cleanup", &client.delete(&path, &[]).await);
}

/// Finding 7.1 against the example: `/items/<id>` and a percent-encoded alias of it are
/// one item with one version.
pub async fn run_alias_contract(example: &str, extra_env: &[(&str, &str)]) {
    let server = ExampleServer::start(example, extra_env).await;
    let client = HttpClient::for_server(&server);
    let id = unique_id("alias");
    let path = format!("/items/{id}");
    // Percent-encode every character of the id: unreserved, so the same resource.
    let alias: String = id.bytes().map(|b| format!("%{b:02x}")).collect();
    let alias = format!("/items/{alias}");
    expect_success(
        &server,
        "create",
        &client.put(&path, &[], &json!({"n": 0})).await,
    );
    let tag = etag_of("read", &client.get(&path, &[]).await);
    let alias_tag = etag_of("read via the alias", &client.get(&alias, &[]).await);
    assert_eq!(tag, alias_tag, "one item, two versions");
    let first = client.put(&alias, &if_match(&tag), &json!({"n": 1})).await;
    expect_success(&server, "write via the alias", &first);
    let second = client.put(&path, &if_match(&tag), &json!({"n": 2})).await;
    expect_status(
        &server,
        "the same ETag via the plain path",
        &second,
        StatusCode::PRECONDITION_FAILED,
    );
    expect_success(&server, "cleanup", &client.delete(&path, &[]).await);
}

/// Finding 8.2 against the example: an item with an `"owner"` is its owner's alone, and
/// a stranger's conditional read or write learns nothing from a precondition.
pub async fn run_hidden_resource_contract(example: &str, extra_env: &[(&str, &str)]) {
    let server = ExampleServer::start(example, extra_env).await;
    let client = HttpClient::for_server(&server);
    let path = format!("/items/{}", unique_id("hidden"));
    let alice = [(header::AUTHORIZATION, "Bearer alice")];
    expect_success(
        &server,
        "alice creates her item",
        &client
            .put(&path, &alice, &json!({"owner": "alice", "note": "secret"}))
            .await,
    );
    let tag = etag_of("alice reads", &client.get(&path, &alice).await);
    let no_validators = |what: &str, reply: &Reply| {
        expect_status(&server, what, reply, StatusCode::NOT_FOUND);
        assert!(reply.etag().is_none(), "{what}: an ETag was disclosed");
        assert!(
            reply.header(header::LAST_MODIFIED).is_none(),
            "{what}: a date was disclosed"
        );
    };
    let star = [(header::IF_NONE_MATCH, "*")];
    no_validators(
        "a stranger's If-None-Match: * read",
        &client.get(&path, &star).await,
    );
    let current = [(header::IF_NONE_MATCH, tag.as_str())];
    no_validators(
        "a stranger's revalidation",
        &client.get(&path, &current).await,
    );
    let bob = [
        (header::AUTHORIZATION, "Bearer bob"),
        (header::IF_MATCH, "\"stale\""),
    ];
    no_validators(
        "a stranger's stale write",
        &client.put(&path, &bob, &json!({"owner": "bob"})).await,
    );
    let create = [
        (header::AUTHORIZATION, "Bearer bob"),
        (header::IF_NONE_MATCH, "*"),
    ];
    no_validators(
        "a stranger's create over it",
        &client.put(&path, &create, &json!({"owner": "bob"})).await,
    );
    // Alice's own revalidation still works.
    let revalidate = [
        (header::AUTHORIZATION, "Bearer alice"),
        (header::IF_NONE_MATCH, tag.as_str()),
    ];
    expect_status(
        &server,
        "alice revalidates",
        &client.get(&path, &revalidate).await,
        StatusCode::NOT_MODIFIED,
    );
    expect_success(&server, "cleanup", &client.delete(&path, &alice).await);
}

// ---------------------------------------------------------------------------------------
// Races across instances
// ---------------------------------------------------------------------------------------

/// Writers per round of [`run_same_if_match_race_on_instances`], and its rounds.
const ROUND_RACERS: usize = 8;
const ROUNDS: usize = 10;
/// Clients of [`run_counter_on_instances`], and the increments each must make.
const COUNTER_CLIENTS: usize = 6;
const INCREMENTS: usize = 10;

/// Starts `instances` processes of example `example` on one backend, and races
/// [`ROUND_RACERS`] writers carrying the same `If-Match`, spread over the processes and
/// released together, for [`ROUNDS`] rounds (`PUT` and `PATCH` in turn). In every
/// round exactly one wins; every loser gets `412` whose `ETag` is the winner's (the
/// version that beat it, not a version from before or a guess); and every instance
/// then serves the winner's body with the winner's tag.
pub async fn run_same_if_match_race_on_instances(
    example: &str,
    extra_env: &[(&str, &str)],
    instances: usize,
) {
    same_if_match_race(example, extra_env, instances, false).await;
}

/// [`run_same_if_match_race_on_instances`] for an example in store mode
/// ([`PreconditionLayer`](tower_precondition::PreconditionLayer)): there a loser that
/// arrives while the winner's write is still in flight gets `409` with `Retry-After`
/// (the winner's new version does not exist yet), instead of the `412` naming it that
/// every other loser gets. Exactly one writer still wins each round.
pub async fn run_same_if_match_race_on_store_instances(
    example: &str,
    extra_env: &[(&str, &str)],
    instances: usize,
) {
    same_if_match_race(example, extra_env, instances, true).await;
}

async fn same_if_match_race(
    example: &str,
    extra_env: &[(&str, &str)],
    instances: usize,
    in_flight_conflicts: bool,
) {
    let servers = ExampleInstances::start(example, extra_env, instances).await;
    let http = HttpClient::round_robin(&servers);
    let s = &servers;
    let path = format!("/items/{}", unique_id("race"));
    let created = http
        .put(
            &path,
            &[(header::IF_NONE_MATCH, "*")],
            &json!({"round": null, "writer": null}),
        )
        .await;
    expect_status(s, "create the raced item", &created, StatusCode::CREATED);
    let mut tag = etag_of("create the raced item", &created);

    for round in 0..ROUNDS {
        let method = if round % 2 == 0 {
            Method::PUT
        } else {
            Method::PATCH
        };
        let start = Arc::new(tokio::sync::Barrier::new(ROUND_RACERS));
        let racers: Vec<_> = (0..ROUND_RACERS)
            .map(|writer| {
                let (http, path, tag) = (http.clone(), path.clone(), tag.clone());
                let (method, start) = (method.clone(), start.clone());
                tokio::spawn(async move {
                    let body = json!({"round": round, "writer": writer}).to_string();
                    start.wait().await;
                    let reply = http.send(method, &path, &if_match(&tag), Some(&body)).await;
                    (writer, reply)
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for racer in racers {
            let (writer, reply) = racer.await.expect("a racer panicked");
            if reply.status.is_success() {
                winners.push((writer, reply));
            } else if in_flight_conflicts && reply.status == StatusCode::CONFLICT {
                let what = format!("round {round}: {method} of writer {writer} in flight");
                expect_problem(&what, &reply, StatusCode::CONFLICT);
                assert!(
                    reply.header(header::RETRY_AFTER).is_some(),
                    "{what}: a 409 without Retry-After"
                );
            } else {
                let what = format!("round {round}: losing {method} of writer {writer}");
                expect_status(s, &what, &reply, StatusCode::PRECONDITION_FAILED);
                expect_problem(&what, &reply, StatusCode::PRECONDITION_FAILED);
                losers.push((writer, etag_of(&what, &reply)));
            }
        }
        let who: Vec<_> = winners.iter().map(|(w, r)| (*w, r.status)).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round} ({method}): exactly one of {ROUND_RACERS} writers with the same \
             If-Match may succeed, these did: {who:?}"
        );
        let (winner, won) = &winners[0];
        let winner_tag = etag_of(&format!("round {round}: the winning {method}"), won);
        assert_ne!(winner_tag, tag, "round {round}: the winner got a new ETag");
        for (writer, current) in &losers {
            assert_eq!(
                current, &winner_tag,
                "round {round} ({method}): writer {writer}'s 412 names {current}, but the \
                 winner ({winner}) made {winner_tag} current"
            );
        }
        for _ in 0..http.instances() {
            let read = http.get(&path, &[]).await;
            expect_status(
                s,
                &format!("round {round}: read back"),
                &read,
                StatusCode::OK,
            );
            assert_eq!(
                read.etag().as_deref(),
                Some(winner_tag.as_str()),
                "round {round}: every instance serves the winner's ETag"
            );
            assert_eq!(
                read.json(),
                json!({"round": round, "writer": winner}),
                "round {round}: every instance serves the winner's body"
            );
        }
        tag = winner_tag;
    }
    println!(
        "{ROUNDS} rounds of {ROUND_RACERS} writers with one If-Match over {} instances: \
         one winner each",
        http.instances()
    );
    let deleted = http.delete(&path, &if_match(&tag)).await;
    expect_status(s, "delete the raced item", &deleted, StatusCode::NO_CONTENT);
}

/// Starts `instances` processes of example `example` on one backend, and has
/// [`COUNTER_CLIENTS`] clients each make [`INCREMENTS`] read-modify-write increments of
/// one counter: `GET`, then `PUT n + 1` with `If-Match` on the next instance, again
/// from the `GET` on a `412`. No increment may be lost: the final value equals the
/// number of `2xx` writes.
pub async fn run_counter_on_instances(example: &str, extra_env: &[(&str, &str)], instances: usize) {
    counter(example, extra_env, instances, false).await;
}

/// [`run_counter_on_instances`] for an example in store mode, where a write that
/// arrives while another is in flight gets `409` with `Retry-After`: the client then
/// retries from the `GET`, as after a `412`.
pub async fn run_counter_on_store_instances(
    example: &str,
    extra_env: &[(&str, &str)],
    instances: usize,
) {
    counter(example, extra_env, instances, true).await;
}

async fn counter(
    example: &str,
    extra_env: &[(&str, &str)],
    instances: usize,
    in_flight_conflicts: bool,
) {
    let servers = ExampleInstances::start(example, extra_env, instances).await;
    let http = HttpClient::round_robin(&servers);
    let s = &servers;
    let path = format!("/items/{}", unique_id("counter"));
    let created = http
        .put(&path, &[(header::IF_NONE_MATCH, "*")], &json!({"n": 0}))
        .await;
    expect_status(s, "create the counter", &created, StatusCode::CREATED);

    let successes = Arc::new(AtomicUsize::new(0));
    let refusals = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..COUNTER_CLIENTS)
        .map(|client| {
            let http = http.own_rotation(client);
            let (path, successes, refusals) = (path.clone(), successes.clone(), refusals.clone());
            tokio::spawn(async move {
                let mut mine = 0;
                while mine < INCREMENTS {
                    let read = http.get(&path, &[]).await;
                    assert_eq!(read.status, StatusCode::OK, "client {client}: read");
                    let tag = etag_of(&format!("client {client}: read"), &read);
                    let n = read.json()["n"].as_u64().expect("a counter");
                    let write = http.put(&path, &if_match(&tag), &json!({"n": n + 1})).await;
                    match write.status {
                        status if status.is_success() => {
                            mine += 1;
                            successes.fetch_add(1, Ordering::SeqCst);
                        }
                        StatusCode::PRECONDITION_FAILED => {
                            refusals.fetch_add(1, Ordering::SeqCst);
                        }
                        StatusCode::CONFLICT if in_flight_conflicts => {
                            refusals.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        other => panic!(
                            "client {client}: PUT n = {} got {other} with body {:?}",
                            n + 1,
                            String::from_utf8_lossy(&write.body)
                        ),
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.expect("a client panicked");
    }
    let successes = successes.load(Ordering::SeqCst);
    assert_eq!(successes, COUNTER_CLIENTS * INCREMENTS);
    let last = http.get(&path, &[]).await;
    expect_status(s, "read the counter", &last, StatusCode::OK);
    assert_eq!(
        last.json()["n"].as_u64(),
        Some(successes as u64),
        "every successful increment is counted once ({} refused attempts retried)",
        refusals.load(Ordering::SeqCst)
    );
    println!(
        "{successes} increments over {} instances, {} refused attempts retried",
        http.instances(),
        refusals.load(Ordering::SeqCst)
    );
    let tag = etag_of("read the counter", &last);
    let deleted = http.delete(&path, &if_match(&tag)).await;
    expect_status(s, "delete the counter", &deleted, StatusCode::NO_CONTENT);
}
