//! Shared helpers for the Redis tests: the REDIS_URL gate, a private `redis-server`
//! child process, and a small `/items/{id}` app whose bodies live in Redis.
#![allow(dead_code)] // each test file uses a different subset

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, Request, Response, StatusCode},
    routing::get,
    Json, Router,
};
use redis::aio::ConnectionManager;
use tower::ServiceExt;
use tower_precondition::{store::RedisStore, PreconditionLayer};

/// Whether the run is in CI, where a missing server is a failure, not a skip.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The shared Redis URL, or `None` (with the skip line) when the run has none.
pub fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(!ci(), "CI=true but REDIS_URL is not set");
            eprintln!("skipped: set REDIS_URL to run");
            None
        }
    }
}

/// A store on the shared Redis under a fresh prefix, with the guard that removes its
/// keys; `None` (skip) when REDIS_URL is unset or the server cannot be reached outside CI.
pub async fn shared_store() -> Option<(RedisStore, Cleanup)> {
    let url = redis_url()?;
    match RedisStore::open(&url).await {
        Ok(store) => {
            let store = store.prefix(unique_prefix("test"));
            let cleanup = Cleanup::of(&store, &url);
            Some((store, cleanup))
        }
        Err(error) => {
            assert!(!ci(), "CI=true but Redis at {url} is unreachable: {error}");
            eprintln!("skipped: Redis at {url} is unreachable ({error})");
            None
        }
    }
}

/// Removes every key under a store's prefix when dropped (even after a failed
/// assertion), so test runs leave nothing behind on the shared server.
pub struct Cleanup {
    url: String,
    pattern: String,
}

impl Cleanup {
    pub fn of<C>(store: &RedisStore<C>, url: &str) -> Self {
        // The escaped prefix is the entry key of "" without its empty hash tag.
        let entry = store.redis_key("");
        let prefix = entry.strip_suffix("{}").unwrap_or(&entry);
        let mut pattern = String::new();
        for c in prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        Self {
            url: url.to_owned(),
            pattern,
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(mut con) = redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection())
        else {
            return;
        };
        let keys: Vec<Vec<u8>> = match redis::Commands::scan_match(&mut con, &self.pattern) {
            Ok(iter) => iter.filter_map(Result::ok).collect(),
            Err(_) => return,
        };
        for chunk in keys.chunks(500) {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(chunk).query(&mut con);
        }
    }
}

/// A prefix no other run uses, so runs against one server never see each other's keys.
pub fn unique_prefix(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("tp-{what}-{}-{nanos:x}:", std::process::id())
}

/// A `redis-server` this test owns, on a free port, without persistence; killed on drop.
pub struct OwnRedis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// Whether every write is on disk before Redis answers it (`appendfsync always`),
    /// so a kill loses nothing that was acknowledged.
    durable: bool,
}

impl OwnRedis {
    /// Starts one, or returns `None` (with a skip line; a failure under CI) when
    /// `redis-server` is not on PATH.
    pub fn start() -> Option<Self> {
        Self::start_with(false)
    }

    /// [`start`](Self::start), but with an append-only file synced on every write: a
    /// kill and restart keeps every acknowledged write.
    pub fn start_durable() -> Option<Self> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert!(!ci(), "CI=true but redis-server is not on PATH");
            eprintln!("skipped: redis-server is not on PATH");
            return None;
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tp-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = Self {
            child: None,
            port,
            dir,
            durable,
        };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (no shutdown, no save): what a crash or a lost host looks like.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: no persistence, no scripts) and
    /// waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(if self.durable {
                ["--appendonly", "yes", "--appendfsync", "always"].as_slice()
            } else {
                ["--appendonly", "no"].as_slice()
            })
            .args(["--daemonize", "no", "--logfile", ""])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        for _ in 0..200 {
            if self.cli(&["PING"]).is_some_and(|out| out.trim() == "PONG") {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// Runs `redis-cli` against this server; `None` if it could not connect.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && !text.contains("Could not connect")).then_some(text)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// A raw connection to `url`, for checks behind the store's back.
pub async fn raw_connection(url: &str) -> ConnectionManager {
    let client = redis::Client::open(url).expect("url");
    ConnectionManager::new(client).await.expect("connect")
}

/// The state of [`items_app`]: the store (for its connection) and a count of the write
/// handler calls.
#[derive(Clone)]
pub struct Items {
    pub store: RedisStore,
    pub write_calls: Arc<AtomicUsize>,
}

/// The app under test: `/items/{id}` with JSON bodies kept in Redis next to their
/// versions (`<entry key>:body`), behind `layer`.
pub fn items_app(items: Items, layer: PreconditionLayer) -> Router {
    Router::new()
        .route(
            "/items/{id}",
            get(get_item).put(put_item).delete(delete_item),
        )
        .with_state(items)
        .layer(layer)
}

/// [`items_app`] with the default layer over `store`, and its write-call counter.
pub fn default_items_app(store: RedisStore) -> (Router, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let items = Items {
        store: store.clone(),
        write_calls: calls.clone(),
    };
    (items_app(items, PreconditionLayer::new(store)), calls)
}

fn body_key(store: &RedisStore, id: &str) -> String {
    format!("{}:body", store.redis_key(&format!("/items/{id}")))
}

async fn get_item(
    State(Items { store, .. }): State<Items>,
    Path(id): Path<String>,
) -> Result<Response<Body>, StatusCode> {
    let mut con = store.connection().clone();
    let body: Option<Vec<u8>> = redis::cmd("GET")
        .arg(body_key(&store, &id))
        .query_async(&mut con)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let body = body.ok_or(StatusCode::NOT_FOUND)?;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("response"))
}

async fn put_item(
    State(Items { store, write_calls }): State<Items>,
    Path(id): Path<String>,
    Json(value): Json<serde_json::Value>,
) -> Result<StatusCode, StatusCode> {
    write_calls.fetch_add(1, Ordering::SeqCst);
    let mut con = store.connection().clone();
    let old: Option<Vec<u8>> = redis::cmd("SET")
        .arg(body_key(&store, &id))
        .arg(value.to_string())
        .arg("GET")
        .query_async(&mut con)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    Ok(if old.is_some() {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

async fn delete_item(
    State(Items { store, write_calls }): State<Items>,
    Path(id): Path<String>,
) -> StatusCode {
    write_calls.fetch_add(1, Ordering::SeqCst);
    let mut con = store.connection().clone();
    match redis::cmd("DEL")
        .arg(body_key(&store, &id))
        .query_async::<i64>(&mut con)
        .await
    {
        Ok(1) => StatusCode::NO_CONTENT,
        Ok(_) => StatusCode::NOT_FOUND,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// One request through `app`: status, ETag (if any) and body.
pub async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (StatusCode, Option<String>, String) {
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = match body {
        Some(body) => request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_owned())),
        None => request.body(Body::empty()),
    }
    .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let etag = response
        .headers()
        .get(header::ETAG)
        .map(|v| v.to_str().expect("ascii etag").to_owned());
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, etag, String::from_utf8_lossy(&bytes).into_owned())
}
