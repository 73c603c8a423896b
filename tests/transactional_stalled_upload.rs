//! Findings 8.1 ("a stalled upload locks the resource") and 7.4 ("a body cut off
//! mid-upload keeps the old ETag valid") in transactional mode, over real sockets and
//! real Postgres: an axum server on 127.0.0.1:0 behind `PgTransactionalLayer`, and raw
//! TCP clients that send a PUT's headers and then stall, close early, or announce too
//! much.

mod postgres_support;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::{header, Request, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use deadpool_postgres::Pool;
use postgres_support::{items_table, send, shared_pool, store, stored_body, unique};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tower_precondition::{PgTransaction, PgTransactionalLayer, RequestBodyConfig};

const VERSIONS: &str = "tp_test_stall_versions";
const ITEMS: &str = "tp_test_stall_items";

/// One test at a time: each opens many sockets and a pool on the shared server.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone)]
struct AppState {
    pool: Pool,
    /// How many PUTs the layer passed to the inner service (the router).
    hits: Arc<AtomicUsize>,
}

async fn get_item(Path(id): Path<String>, State(state): State<AppState>) -> Response {
    let Ok(client) = state.pool.get().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let sql = format!("SELECT body FROM {ITEMS} WHERE id = $1");
    match client.query_opt(&sql, &[&id]).await {
        Ok(Some(row)) => row.get::<_, String>(0).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn put_item(Path(id): Path<String>, tx: PgTransaction, body: Bytes) -> Response {
    let body = String::from_utf8_lossy(&body).into_owned();
    let sql = format!(
        "INSERT INTO {ITEMS} (id, body) VALUES ($1, $2) \
         ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body"
    );
    match tx.execute(&sql, &[&id, &body]).await {
        Ok(_) if tx.is_create() => StatusCode::CREATED.into_response(),
        Ok(_) => StatusCode::OK.into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// A running server; aborted on drop.
struct Server {
    addr: SocketAddr,
    app: Router,
    state: AppState,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }
}

async fn serve(
    pool: &Pool,
    tweak: impl FnOnce(PgTransactionalLayer) -> PgTransactionalLayer,
) -> Server {
    let store = store(pool, VERSIONS).await;
    items_table(pool, ITEMS).await;
    let state = AppState {
        pool: pool.clone(),
        hits: Arc::new(AtomicUsize::new(0)),
    };
    let hits = state.hits.clone();
    // Counted between the layer and the router: "reached" means the layer let the
    // request through, whatever the handler's extractors then do with it.
    let count = tower::util::MapRequestLayer::new(move |request: Request<Body>| {
        if request.method() == axum::http::Method::PUT {
            hits.fetch_add(1, Ordering::SeqCst);
        }
        request
    });
    let app = Router::new()
        .route("/items/{id}", get(get_item).put(put_item))
        .with_state(state.clone())
        .layer(count)
        .layer(tweak(PgTransactionalLayer::new(store)));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = app.clone();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, served).await;
    });
    Server {
        addr,
        app,
        state,
        task,
    }
}

/// A response read off a raw socket.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// Reads one response (the server closes the connection after it) within `within`.
async fn read_response(stream: &mut TcpStream, within: Duration) -> Option<Raw> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut buf)).await;
    if read.is_err() && buf.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(Raw {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// Sends a whole request (`Connection: close`) and reads its response.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Raw {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut text = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(body);
    stream.write_all(text.as_bytes()).await.expect("send");
    read_response(&mut stream, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no response to {method} {path}"))
}

/// Sends a PUT's headers, announcing `length` bytes, and only `sent` of them.
async fn start_upload(
    addr: SocketAddr,
    path: &str,
    if_match: Option<&str>,
    length: usize,
    sent: &[u8],
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut text = format!("PUT {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {length}\r\n");
    if let Some(tag) = if_match {
        text.push_str(&format!("If-Match: {tag}\r\n"));
    }
    text.push_str("\r\n");
    stream
        .write_all(text.as_bytes())
        .await
        .expect("send headers");
    stream.write_all(sent).await.expect("send part of the body");
    stream.flush().await.expect("flush");
    stream
}

/// Creates `/items/{id}` with `body`, returning its ETag.
async fn create(server: &Server, id: &str, body: &str) -> String {
    let created = request(
        server.addr,
        "PUT",
        &format!("/items/{id}"),
        &[("If-None-Match", "*")],
        body,
    )
    .await;
    assert_eq!(created.status, 201, "{created:?}");
    created.header("etag").expect("a create carries an ETag")
}

fn code_of(body: &str) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    json.get("code")?.as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn finding_8_1_a_valid_write_goes_through_while_twenty_uploads_stall() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(8).await else {
        return;
    };
    let server = serve(&pool, |l| l).await;
    let id = unique("stalled");
    let e1 = create(&server, &id, "v1").await;
    let path = format!("/items/{id}");

    // Twenty clients send their headers and part of the body, then stall: five on
    // the resource itself (with its current ETag), fifteen on resources of their own.
    let mut stalled = Vec::new();
    for i in 0..20 {
        let (target, tag) = if i < 5 {
            (path.clone(), Some(e1.as_str()))
        } else {
            (format!("/items/{}", unique("other")), None)
        };
        stalled.push(start_upload(server.addr, &target, tag, 1000, b"{\"partial\":").await);
    }
    // Give the server time to take them all in (and, before the fix, to lock).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let written = request(server.addr, "PUT", &path, &[("If-Match", &e1)], "v2").await;
    let took = started.elapsed();
    assert_eq!(
        written.status, 200,
        "the valid write goes through: {written:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "promptly, not after a timeout: {took:?}"
    );
    let e2 = written.header("etag").expect("new ETag");
    assert_ne!(e1, e2);
    assert_eq!(stored_body(&pool, ITEMS, &id).await.as_deref(), Some("v2"));

    let read = request(server.addr, "GET", &path, &[], "").await;
    assert_eq!(read.status, 200);
    assert_eq!(read.header("etag").as_deref(), Some(e2.as_str()));
    assert_eq!(server.hits(), 2, "no stalled upload reached the handler");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn finding_8_1_a_stalled_upload_times_out_with_408_and_changes_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let server = serve(&pool, |l| {
        l.request_body(RequestBodyConfig::new().read_timeout(Duration::from_millis(800)))
    })
    .await;
    let id = unique("timeout");
    let e1 = create(&server, &id, "v1").await;
    let path = format!("/items/{id}");

    let mut upload = start_upload(server.addr, &path, Some(&e1), 100, b"v2-but-not-all").await;
    let refused = read_response(&mut upload, Duration::from_secs(5))
        .await
        .expect("the stalled upload gets an answer");
    assert_eq!(refused.status, 408, "{refused:?}");
    assert_eq!(
        refused.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(
        code_of(&refused.body).as_deref(),
        Some("request_body_timeout")
    );

    assert_eq!(server.hits(), 1, "the handler never ran");
    assert_eq!(stored_body(&pool, ITEMS, &id).await.as_deref(), Some("v1"));
    let read = request(server.addr, "GET", &path, &[], "").await;
    assert_eq!(
        read.header("etag").as_deref(),
        Some(e1.as_str()),
        "the version did not change"
    );
    let written = request(server.addr, "PUT", &path, &[("If-Match", &e1)], "v2").await;
    assert_eq!(written.status, 200, "the old ETag is still the current one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn finding_7_4_a_body_cut_off_mid_upload_reaches_no_handler_and_keeps_the_etag() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let server = serve(&pool, |l| l).await;
    let id = unique("cut-off");
    let e1 = create(&server, &id, "v1").await;
    let path = format!("/items/{id}");

    // Ten bytes of a hundred, then the connection closes.
    let upload = start_upload(server.addr, &path, Some(&e1), 100, b"0123456789").await;
    drop(upload);
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(server.hits(), 1, "half a body never reaches the handler");
    assert_eq!(stored_body(&pool, ITEMS, &id).await.as_deref(), Some("v1"));
    let read = request(server.addr, "GET", &path, &[], "").await;
    assert_eq!(read.header("etag").as_deref(), Some(e1.as_str()));
    let written = request(server.addr, "PUT", &path, &[("If-Match", &e1)], "v2").await;
    assert_eq!(written.status, 200, "the old ETag is still valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn finding_7_4_a_body_shorter_than_its_content_length_or_failing_gets_400() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let server = serve(&pool, |l| l).await;
    let id = unique("short");
    let e1 = create(&server, &id, "v1").await;
    let path = format!("/items/{id}");

    // In process, a body can end short of its Content-Length (hyper would call that
    // an error; other transports may not).
    let short = Request::put(&path)
        .header(header::IF_MATCH, &e1)
        .header(header::CONTENT_LENGTH, "100")
        .body(Body::from("v2"))
        .expect("request");
    let refused = send(&server.app, short).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let body = postgres_support::body_text(refused).await;
    assert_eq!(
        code_of(&body).as_deref(),
        Some("request_body_incomplete"),
        "{body}"
    );

    let chunks: Vec<Result<&'static str, std::io::Error>> =
        vec![Ok("v2 and"), Err(std::io::Error::other("connection reset"))];
    let failing = Request::put(&path)
        .header(header::IF_MATCH, &e1)
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("request");
    let refused = send(&server.app, failing).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let body = postgres_support::body_text(refused).await;
    assert_eq!(
        code_of(&body).as_deref(),
        Some("request_body_incomplete"),
        "{body}"
    );

    assert_eq!(server.hits(), 1);
    assert_eq!(stored_body(&pool, ITEMS, &id).await.as_deref(), Some("v1"));
    let written = request(server.addr, "PUT", &path, &[("If-Match", &e1)], "v2").await;
    assert_eq!(written.status, 200, "the old ETag is still valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn finding_8_1_an_over_limit_body_gets_413_without_being_read() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let server = serve(&pool, |l| l).await;
    let id = unique("large");
    let e1 = create(&server, &id, "v1").await;
    let path = format!("/items/{id}");

    // Announces 3 MiB (over the 2 MiB default) and sends none of it.
    let started = Instant::now();
    let mut upload = start_upload(server.addr, &path, Some(&e1), 3 << 20, b"").await;
    let refused = read_response(&mut upload, Duration::from_secs(5))
        .await
        .expect("refused up front");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(refused.status, 413, "{refused:?}");
    assert_eq!(
        code_of(&refused.body).as_deref(),
        Some("request_body_too_large")
    );

    // Without a Content-Length, the limit is found while reading.
    let server_small = serve(&pool, |l| l.request_body(RequestBodyConfig::new().limit(8))).await;
    let chunks: Vec<Result<&'static str, std::io::Error>> = vec![Ok("0123"), Ok("456789")];
    let chunked = Request::put(&path)
        .header(header::IF_MATCH, &e1)
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("request");
    let refused = send(&server_small.app, chunked).await;
    assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);

    assert_eq!(server.hits() + server_small.hits(), 1, "no handler ran");
    assert_eq!(stored_body(&pool, ITEMS, &id).await.as_deref(), Some("v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn finding_8_1_streaming_writes_are_capped_so_reads_and_refusals_stay_prompt() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(8).await else {
        return;
    };
    let server = serve(&pool, |l| {
        l.request_body(RequestBodyConfig::streaming())
            .max_open_writes(2)
            .write_queue_timeout(Duration::from_millis(300))
    })
    .await;
    let id = unique("capped");
    create(&server, &id, "v1").await;

    // Streaming, each stalled upload holds a transaction: four of them, for a cap of two.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let target = format!("/items/{}", unique("slow"));
        stalled.push(start_upload(server.addr, &target, None, 1000, b"{").await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let other = format!("/items/{}", unique("refused"));
    let refused = request(server.addr, "PUT", &other, &[], "x").await;
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("retry-after").as_deref(), Some("1"));
    assert_eq!(
        code_of(&refused.body).as_deref(),
        Some("too_many_writes_in_flight")
    );

    let started = Instant::now();
    let read = request(server.addr, "GET", &format!("/items/{id}"), &[], "").await;
    assert_eq!(read.status, 200, "reads keep a connection");
    assert!(read.header("etag").is_some());
    assert!(started.elapsed() < Duration::from_secs(1));

    // The stalled clients go away: their transactions roll back, their permits free.
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = request(server.addr, "PUT", &other, &[], "x").await;
    assert_eq!(written.status, 201, "{written:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn every_transactional_setting_saturates() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let server = serve(&pool, |l| {
        l.handler_timeout(Duration::MAX)
            .statement_timeout(Duration::MAX)
            .lock_timeout(Duration::MAX)
            .store_timeout(Duration::MAX)
            .retry_after(Duration::MAX)
            .write_queue_timeout(Duration::MAX)
            .max_open_writes(usize::MAX)
            .request_body(
                RequestBodyConfig::new()
                    .limit(usize::MAX)
                    .read_timeout(Duration::MAX),
            )
    })
    .await;
    let id = unique("saturate");
    let e1 = create(&server, &id, "v1").await;
    let written = request(
        server.addr,
        "PUT",
        &format!("/items/{id}"),
        &[("If-Match", &e1)],
        "v2",
    )
    .await;
    assert_eq!(written.status, 200, "{written:?}");
    // A refusal's Retry-After: Duration::MAX saturates to the longest setting (365 days).
    let full = serve(&pool, |l| {
        l.request_body(RequestBodyConfig::streaming())
            .max_open_writes(1)
            .write_queue_timeout(Duration::ZERO)
            .retry_after(Duration::MAX)
    })
    .await;
    let stalled = start_upload(
        full.addr,
        &format!("/items/{}", unique("hold")),
        None,
        10,
        b"",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = request(
        full.addr,
        "PUT",
        &format!("/items/{}", unique("full")),
        &[],
        "v",
    )
    .await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(
        refused.header("retry-after"),
        Some((365 * 24 * 3600).to_string())
    );
    drop(stalled);

    let zero = serve(&pool, |l| {
        l.max_open_writes(0).write_queue_timeout(Duration::ZERO)
    })
    .await;
    let written = request(
        zero.addr,
        "PUT",
        &format!("/items/{}", unique("zero")),
        &[],
        "v",
    )
    .await;
    assert_eq!(written.status, 201, "a cap of 0 counts as 1: {written:?}");
}
