//! Shared helpers for the Postgres tests: the DATABASE_URL gate, pools, a throwaway
//! Postgres cluster for fault tests, and a small `/items/{id}` app whose items live in
//! Postgres, in either mode.
#![allow(dead_code)] // each test file uses a different subset

use std::{
    net::TcpListener,
    path::{Path as FsPath, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::{header, HeaderMap, Request, Response, StatusCode},
    response::IntoResponse,
    routing::get,
    Extension, Router,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::Notify;
use tokio_postgres::NoTls;
use tower::ServiceExt;
use tower_precondition::{
    store::PostgresStore, PgTransaction, PgTransactionalLayer, PreconditionLayer, Reservation,
};

/// Whether the run is in CI, where a missing server is a failure, not a skip.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The shared database URL, or `None` (with the skip line) when the run has none.
pub fn database_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(!ci(), "CI=true but DATABASE_URL is not set");
            eprintln!("skipped: set DATABASE_URL to run");
            None
        }
    }
}

/// A pool of `size` connections to `url` that fails fast (for fault tests too).
pub fn pool_for(url: &str, size: usize) -> Pool {
    let mut pg: tokio_postgres::Config = url.parse().expect("valid DATABASE_URL");
    pg.connect_timeout(Duration::from_secs(2));
    pg.application_name("tower-precondition-tests");
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
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(2)))
        .recycle_timeout(Some(Duration::from_secs(2)))
        .build()
        .expect("pool")
}

/// A pool on the shared database, or `None` (skip) when DATABASE_URL is unset, or the
/// server is unreachable outside CI.
pub async fn shared_pool(size: usize) -> Option<Pool> {
    let url = database_url()?;
    let pool = pool_for(&url, size);
    match pool.get().await {
        Ok(_) => Some(pool),
        Err(error) => {
            assert!(
                !ci(),
                "CI=true but Postgres at {url} is unreachable: {error}"
            );
            eprintln!("skipped: Postgres at {url} is unreachable ({error})");
            None
        }
    }
}

/// A name no other run uses, so runs against one server never see each other's rows.
pub fn unique(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{what}-{}-{nanos:x}", std::process::id())
}

/// A migrated store on `table`, over `pool`.
pub async fn store(pool: &Pool, table: &str) -> PostgresStore {
    let store = PostgresStore::new(pool.clone())
        .table(table)
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    store
}

/// Creates the items table `name` (`id TEXT PRIMARY KEY, body TEXT`).
pub async fn items_table(pool: &Pool, name: &str) {
    let client = pool.get().await.expect("connection");
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {name} (id TEXT PRIMARY KEY, body TEXT NOT NULL)"
        ))
        .await
        .expect("create items table");
}

/// The body stored for `id`, read directly (not through the app).
pub async fn stored_body(pool: &Pool, items: &str, id: &str) -> Option<String> {
    let client = pool.get().await.expect("connection");
    client
        .query_opt(&format!("SELECT body FROM {items} WHERE id = $1"), &[&id])
        .await
        .expect("select")
        .map(|row| row.get(0))
}

/// How the app's writes are made safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `PgTransactionalLayer`: the handler writes in the layer's transaction.
    Transactional,
    /// `PreconditionLayer` over `PostgresStore`: the handler writes with its own
    /// connection (autocommit), between reserve and settle.
    Store,
}

/// Test-only behaviours a request can ask for with the `x-test` header.
#[derive(Clone)]
pub struct AppState {
    pool: Pool,
    items: Arc<str>,
    /// Notified by a handler that reached its pause point (`x-test: pause`).
    pub paused: Arc<Notify>,
    /// Releases the paused handler.
    pub resume: Arc<Notify>,
}

/// The `/items/{id}` app over `items`, in `mode`. `tweak` adjusts the layer.
pub fn app(mode: Mode, store: PostgresStore, items: &str) -> (Router, AppState) {
    app_with(mode, store, items, |l| l, |l| l)
}

pub fn app_with(
    mode: Mode,
    store: PostgresStore,
    items: &str,
    tx_layer: impl FnOnce(PgTransactionalLayer) -> PgTransactionalLayer,
    store_layer: impl FnOnce(PreconditionLayer) -> PreconditionLayer,
) -> (Router, AppState) {
    let state = AppState {
        pool: store.pool().clone(),
        items: items.into(),
        paused: Arc::new(Notify::new()),
        resume: Arc::new(Notify::new()),
    };
    let routes = match mode {
        Mode::Transactional => {
            Router::new().route("/items/{id}", get(get_item).put(put_tx).delete(delete_tx))
        }
        Mode::Store => Router::new().route(
            "/items/{id}",
            get(get_item).put(put_store).delete(delete_store),
        ),
    };
    let routes = routes.with_state(state.clone());
    let app = match mode {
        Mode::Transactional => routes.layer(tx_layer(PgTransactionalLayer::new(store))),
        Mode::Store => routes.layer(store_layer(PreconditionLayer::new(store))),
    };
    (app, state)
}

async fn get_item(Path(id): Path<String>, State(state): State<AppState>) -> Response<Body> {
    let Ok(client) = state.pool.get().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let sql = format!("SELECT body FROM {} WHERE id = $1", state.items);
    match client.query_opt(&sql, &[&id]).await {
        Ok(Some(row)) => (
            [(header::CONTENT_TYPE, "application/json")],
            row.get::<_, String>(0),
        )
            .into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// What the `x-test` header asks the handler to do after its write.
async fn after_write(state: &AppState, headers: &HeaderMap) -> Option<Response<Body>> {
    match headers.get("x-test").and_then(|v| v.to_str().ok()) {
        Some("fail") => Some(StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Some("refuse") => Some(StatusCode::UNPROCESSABLE_ENTITY.into_response()),
        Some("hang") => std::future::pending().await,
        Some("pause") => {
            state.paused.notify_one();
            state.resume.notified().await;
            None
        }
        _ => None,
    }
}

fn upsert_sql(items: &str) -> String {
    format!(
        "INSERT INTO {items} (id, body) VALUES ($1, $2) \
         ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body"
    )
}

async fn put_tx(
    Path(id): Path<String>,
    State(state): State<AppState>,
    tx: PgTransaction,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let Ok(body) = String::from_utf8(body.to_vec()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let existed = match tx
        .query_opt(
            &format!("SELECT 1 FROM {} WHERE id = $1", state.items),
            &[&id],
        )
        .await
    {
        Ok(row) => row.is_some(),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    if let Err(_error) = tx.execute(&upsert_sql(&state.items), &[&id, &body]).await {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    if let Some(response) = after_write(&state, &headers).await {
        return response;
    }
    let mut response = if existed {
        StatusCode::OK.into_response()
    } else {
        StatusCode::CREATED.into_response()
    };
    copy_handler_etag(&headers, &mut response);
    response
}

async fn delete_tx(
    Path(id): Path<String>,
    State(state): State<AppState>,
    tx: PgTransaction,
    headers: HeaderMap,
) -> Response<Body> {
    let sql = format!("DELETE FROM {} WHERE id = $1", state.items);
    match tx.execute(&sql, &[&id]).await {
        Ok(0) => StatusCode::NOT_FOUND.into_response(),
        Ok(_) => after_write(&state, &headers)
            .await
            .unwrap_or_else(|| StatusCode::NO_CONTENT.into_response()),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn put_store(
    Path(id): Path<String>,
    State(state): State<AppState>,
    Extension(reservation): Extension<Reservation>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let Ok(body) = String::from_utf8(body.to_vec()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Ok(client) = state.pool.get().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    if client
        .execute(&upsert_sql(&state.items), &[&id, &body])
        .await
        .is_err()
    {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    drop(client);
    if let Some(response) = after_write(&state, &headers).await {
        return response;
    }
    let mut response = if reservation.is_create() {
        StatusCode::CREATED.into_response()
    } else {
        StatusCode::OK.into_response()
    };
    copy_handler_etag(&headers, &mut response);
    response
}

async fn delete_store(Path(id): Path<String>, State(state): State<AppState>) -> Response<Body> {
    let Ok(client) = state.pool.get().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let sql = format!("DELETE FROM {} WHERE id = $1", state.items);
    match client.execute(&sql, &[&id]).await {
        Ok(0) => StatusCode::NOT_FOUND.into_response(),
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `x-etag: "tag"` makes the handler answer with that `ETag` (the layer then commits it).
fn copy_handler_etag(headers: &HeaderMap, response: &mut Response<Body>) {
    if let Some(tag) = headers.get("x-etag") {
        response.headers_mut().insert(header::ETAG, tag.clone());
    }
}

/// Sends one request to the app.
pub async fn send(app: &Router, request: Request<Body>) -> Response<Body> {
    app.clone().oneshot(request).await.expect("infallible")
}

/// `PUT /items/{id}` with `body` and optional extra headers.
pub fn put_req(id: &str, body: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::put(format!("/items/{id}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::from(body.to_owned())).expect("request")
}

/// `GET /items/{id}`.
pub fn get_req(id: &str) -> Request<Body> {
    Request::get(format!("/items/{id}"))
        .body(Body::empty())
        .expect("request")
}

/// `DELETE /items/{id}` with optional extra headers.
pub fn delete_req(id: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::delete(format!("/items/{id}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::empty()).expect("request")
}

/// The response's `ETag`, as a string.
pub fn etag(response: &Response<Body>) -> Option<String> {
    response
        .headers()
        .get(header::ETAG)
        .map(|v| v.to_str().expect("ascii etag").to_owned())
}

/// The response body as a string.
pub async fn body_text(response: Response<Body>) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    String::from_utf8(bytes.to_vec()).expect("utf-8 body")
}

/// A private Postgres cluster (initdb in a temp dir, own port), for tests that stop and
/// start the server. Stopped and removed on drop.
pub struct TempCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres_user: bool,
}

impl TempCluster {
    /// Creates and starts a cluster, or `None` (skip; a failure under CI) when the
    /// Postgres server binaries are not installed.
    pub fn start() -> Option<Self> {
        let Some(bin) = find_bin_dir() else {
            assert!(
                !ci(),
                "CI=true but no Postgres server binaries (initdb) found"
            );
            eprintln!("skipped: no Postgres server binaries (initdb) under /usr/lib/postgresql");
            return None;
        };
        let as_postgres_user = is_root();
        let dir = std::env::temp_dir().join(unique("tower-precondition-pg"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cluster = Self {
            bin,
            dir,
            port: free_port(),
            as_postgres_user,
        };
        if as_postgres_user {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(&cluster.dir));
        }
        let data = cluster.dir.join("data");
        run(cluster.command("initdb").arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]));
        cluster.start_server();
        Some(cluster)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (after [`stop_server`](Self::stop_server)); waits until it
    /// accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-o", &options, "-w", "-t", "30", "-l"])
            .arg(self.dir.join("server.log"))
            .arg("start"));
    }

    /// Stops the server (fast shutdown: open sessions are terminated).
    pub fn stop_server(&self) {
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "-t", "30", "stop"]));
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        command
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(command: &mut Command) {
    let output = command.output().expect("run command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn find_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        && FsPath::new("/usr/sbin/runuser").exists()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
