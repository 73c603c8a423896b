//! The layer through a real axum `Router`, request by request (`tower::ServiceExt::oneshot`).
//!
//! The test app has one route, `/items/{id}`, whose handlers are steered by request
//! headers (`x-status`, `x-etag`, `x-sleep-ms`, `x-block`) and count their calls, so a
//! test can tell whether the layer let a request reach the handler.

#[path = "common/oneshot.rs"]
mod oneshot;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use oneshot::{get_etag, send};
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_precondition::{
    store::{AtomicVersionStore, CasOutcome, Entry, Lease, LeaseToken, StoreError},
    MemoryStore, PreconditionLayer, Reservation,
};

// ---------------------------------------------------------------------------------
// The test app
// ---------------------------------------------------------------------------------

#[derive(Default)]
struct Shared {
    reads: AtomicUsize,
    writes: AtomicUsize,
    /// Signalled by a write handler that was asked to block, once it is running.
    entered: Notify,
    /// Awaited by a write handler that was asked to block.
    release: Notify,
}

fn status_from(headers: &HeaderMap, default: StatusCode) -> StatusCode {
    headers
        .get("x-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(default)
}

async fn read(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.reads.fetch_add(1, Ordering::SeqCst);
    let status = status_from(request.headers(), StatusCode::OK);
    (
        status,
        [(header::CACHE_CONTROL, "max-age=60")],
        "the representation",
    )
        .into_response()
}

async fn write(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.writes.fetch_add(1, Ordering::SeqCst);
    let headers = request.headers().clone();
    if let Some(ms) = headers
        .get("x-sleep-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if headers.contains_key("x-block") {
        shared.entered.notify_one();
        shared.release.notified().await;
    }
    let mut response = status_from(&headers, StatusCode::OK).into_response();
    let out = response.headers_mut();
    if let Some(etag) = headers.get("x-etag") {
        out.insert(header::ETAG, etag.clone());
    }
    // Report what the handler saw of the reservation.
    if let Some(r) = request.extensions().get::<Reservation>() {
        out.insert("x-key", HeaderValue::from_str(r.key()).unwrap());
        let replacing = r
            .replacing()
            .map_or_else(|| "none".to_owned(), |v| v.etag().to_string());
        out.insert("x-replacing", HeaderValue::from_str(&replacing).unwrap());
        out.insert("x-create", HeaderValue::from(u16::from(r.is_create())));
        let left = r.deadline() > std::time::Instant::now();
        out.insert("x-lease-live", HeaderValue::from(u16::from(left)));
    }
    response
}

async fn options() -> impl IntoResponse {
    (StatusCode::NO_CONTENT, [(header::ALLOW, "GET, PUT")])
}

fn app_with(layer: PreconditionLayer) -> (Router, Arc<Shared>) {
    let shared = Arc::new(Shared::default());
    let router = Router::new()
        .route(
            "/items/{id}",
            get(read)
                .put(write)
                .patch(write)
                .delete(write)
                .post(write)
                .options(options),
        )
        .route("/other/{id}", get(read).put(write))
        .with_state(shared.clone())
        .layer(layer);
    (router, shared)
}

fn app() -> (Router, Arc<Shared>) {
    app_with(PreconditionLayer::new(MemoryStore::new()))
}

// ---------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn get_gets_etag_and_last_modified() {
    let (app, _) = app();
    let r = send(&app, Method::GET, "/items/1", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"the representation");
    let etag: tower_precondition::EntityTag = r.etag().unwrap().parse().unwrap();
    assert!(!etag.is_weak());
    let lm = r.header("last-modified").expect("Last-Modified");
    assert!(httpdate::parse_http_date(lm).is_ok(), "{lm}");
    // The version is stable across reads.
    assert_eq!(get_etag(&app, "/items/1").await, r.etag().unwrap());
    // HEAD too.
    let h = send(&app, Method::HEAD, "/items/1", &[]).await;
    assert_eq!(h.etag(), r.etag());
}

#[tokio::test]
async fn matching_if_none_match_is_304_without_running_the_handler() {
    let (app, shared) =
        app_with(PreconditionLayer::new(MemoryStore::new()).short_circuit_reads(true));
    let etag = get_etag(&app, "/items/1").await;
    let before = shared.reads.load(Ordering::SeqCst);
    let r = send(&app, Method::GET, "/items/1", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert_eq!(r.etag(), Some(etag.as_str()));
    assert!(r.body.is_empty());
    assert_eq!(shared.reads.load(Ordering::SeqCst), before, "handler ran");
    // A weak form of the tag matches too (weak comparison), and so does a list.
    let weak = format!("W/{etag}");
    let list = format!("\"nope\", {weak}");
    let r = send(&app, Method::GET, "/items/1", &[("if-none-match", &list)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    // A different tag gets the full answer.
    let r = send(&app, Method::GET, "/items/1", &[("if-none-match", "\"x\"")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"the representation");
}

#[tokio::test]
async fn without_short_circuit_the_handler_runs_and_its_cache_control_survives() {
    let (app, shared) =
        app_with(PreconditionLayer::new(MemoryStore::new()).short_circuit_reads(false));
    let etag = get_etag(&app, "/items/1").await;
    let before = shared.reads.load(Ordering::SeqCst);
    let r = send(&app, Method::GET, "/items/1", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert_eq!(shared.reads.load(Ordering::SeqCst), before + 1);
    assert_eq!(r.header("cache-control"), Some("max-age=60"));
    assert_eq!(r.etag(), Some(etag.as_str()));
    assert!(r.body.is_empty());
    assert!(r.header("content-type").is_none());
}

#[tokio::test]
async fn if_modified_since_is_304() {
    let (app, shared) =
        app_with(PreconditionLayer::new(MemoryStore::new()).short_circuit_reads(true));
    let first = send(&app, Method::GET, "/items/1", &[]).await;
    let lm = first.header("last-modified").unwrap().to_owned();
    let before = shared.reads.load(Ordering::SeqCst);
    let r = send(&app, Method::GET, "/items/1", &[("if-modified-since", &lm)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert_eq!(r.etag(), first.etag());
    assert_eq!(shared.reads.load(Ordering::SeqCst), before);
    // An earlier date gets the representation.
    let r = send(
        &app,
        Method::GET,
        "/items/1",
        &[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn put_with_current_if_match_succeeds_and_the_old_tag_then_fails() {
    let (app, shared) = app();
    let old = get_etag(&app, "/items/1").await;
    let ok = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(ok.status, StatusCode::OK);
    let new = ok.etag().expect("new ETag").to_owned();
    assert_ne!(new, old);
    assert!(ok.header("last-modified").is_some());
    assert_eq!(get_etag(&app, "/items/1").await, new);

    let writes = shared.writes.load(Ordering::SeqCst);
    let stale = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(stale.etag(), Some(new.as_str()));
    assert_eq!(
        stale.header("last-modified"),
        ok.header("last-modified"),
        "412 carries the current Last-Modified"
    );
    let doc = stale.problem();
    assert_eq!(doc["code"], "etag_mismatch");
    assert_eq!(doc["current_etag"], new.as_str());
    assert_eq!(shared.writes.load(Ordering::SeqCst), writes, "handler ran");
}

#[tokio::test]
async fn if_none_match_star_creates_once() {
    let (app, shared) = app();
    let create = [("if-none-match", "*"), ("x-status", "201")];
    let first = send(&app, Method::PUT, "/items/new", &create).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.header("x-create"), Some("1"));
    let etag = first.etag().unwrap().to_owned();
    let second = send(&app, Method::PUT, "/items/new", &create).await;
    assert_eq!(second.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(second.etag(), Some(etag.as_str()));
    second.problem();
    assert_eq!(shared.writes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn malformed_if_match_is_400_and_the_handler_does_not_run() {
    let (app, shared) = app();
    for bad in ["not-a-tag", "\"unterminated", "*, \"a\"", "W/ \"x\""] {
        let r = send(&app, Method::PUT, "/items/1", &[("if-match", bad)]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        let doc = r.problem();
        assert_eq!(doc["code"], "malformed_precondition");
        assert!(
            doc["detail"].as_str().unwrap().contains("if-match"),
            "{doc}"
        );
    }
    // A malformed If-None-Match is refused on a write (a read ignores it: see
    // tests/http_fidelity.rs).
    let r = send(&app, Method::PUT, "/items/1", &[("if-none-match", "abc")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(shared.writes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn require_precondition_answers_428_with_instructions() {
    let (app, shared) =
        app_with(PreconditionLayer::new(MemoryStore::new()).require_precondition(true));
    for method in [Method::PUT, Method::PATCH, Method::DELETE] {
        let r = send(&app, method.clone(), "/items/1", &[]).await;
        assert_eq!(r.status, StatusCode::PRECONDITION_REQUIRED, "{method}");
        let doc = r.problem();
        assert_eq!(doc["code"], "precondition_required");
        let detail = doc["detail"].as_str().unwrap();
        assert!(detail.contains("If-Match"), "{detail}");
        // Only a PUT can create, so only its 428 offers `If-None-Match: *`.
        assert_eq!(
            detail.contains("If-None-Match: *"),
            method == Method::PUT,
            "{detail}"
        );
    }
    // An invalid If-Unmodified-Since is ignored, so it does not count as a precondition.
    let r = send(
        &app,
        Method::PUT,
        "/items/1",
        &[("if-unmodified-since", "yesterday")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_REQUIRED);
    assert_eq!(shared.writes.load(Ordering::SeqCst), 0);
    // Reads are not affected, and a conditional write goes through.
    let etag = get_etag(&app, "/items/1").await;
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(shared.writes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_handlers_strong_etag_becomes_the_committed_version() {
    let (app, _) = app();
    let old = get_etag(&app, "/items/1").await;
    let r = send(
        &app,
        Method::PUT,
        "/items/1",
        &[("if-match", &old), ("x-etag", "\"mine-1\"")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.etag(), Some("\"mine-1\""));
    assert_eq!(get_etag(&app, "/items/1").await, "\"mine-1\"");
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", "\"mine-1\"")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_ne!(r.etag(), Some("\"mine-1\""));
}

#[tokio::test]
async fn a_weak_or_malformed_handler_etag_is_replaced() {
    let (app, _) = app();
    for handler_tag in ["W/\"weak\"", "no-quotes"] {
        let old = get_etag(&app, "/items/1").await;
        let r = send(
            &app,
            Method::PUT,
            "/items/1",
            &[("if-match", &old), ("x-etag", handler_tag)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let got = r.etag().unwrap();
        assert_ne!(got, handler_tag);
        assert_ne!(got, old);
        let tag: tower_precondition::EntityTag = got.parse().unwrap();
        assert!(!tag.is_weak());
        assert_eq!(get_etag(&app, "/items/1").await, got);
    }
}

#[tokio::test]
async fn a_4xx_from_the_handler_keeps_the_old_version() {
    let (app, _) = app();
    let old = get_etag(&app, "/items/1").await;
    let r = send(
        &app,
        Method::PUT,
        "/items/1",
        &[("if-match", &old), ("x-status", "422")],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(get_etag(&app, "/items/1").await, old);
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn a_5xx_from_the_handler_gives_a_fresh_version() {
    let (app, _) = app();
    let old = get_etag(&app, "/items/1").await;
    let r = send(
        &app,
        Method::PUT,
        "/items/1",
        &[("if-match", &old), ("x-status", "500")],
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let fresh = r.etag().unwrap().to_owned();
    assert_ne!(fresh, old);
    assert_eq!(get_etag(&app, "/items/1").await, fresh);
    let r = send(&app, Method::GET, "/items/1", &[("if-none-match", &old)]).await;
    assert_eq!(r.status, StatusCode::OK, "a stale tag must not 304");
}

#[tokio::test]
async fn a_handler_error_gives_a_fresh_version() {
    // axum handlers cannot fail, so this one is a plain tower service.
    let fail = Arc::new(AtomicBool::new(false));
    let inner = {
        let fail = fail.clone();
        tower::service_fn(move |_request: axum::http::Request<Body>| {
            let fail = fail.load(Ordering::SeqCst);
            async move {
                if fail {
                    Err(std::io::Error::other("handler failed"))
                } else {
                    Ok(axum::http::Response::new(Body::from("ok")))
                }
            }
        })
    };
    let service = tower::ServiceBuilder::new()
        .layer(PreconditionLayer::new(MemoryStore::new()))
        .service(inner);
    let call = |method: Method, headers: Vec<(&'static str, String)>| {
        let service = service.clone();
        async move {
            let mut request = axum::http::Request::builder().method(method).uri("/x");
            for (name, value) in headers {
                request = request.header(name, value);
            }
            service.oneshot(request.body(Body::empty()).unwrap()).await
        }
    };
    let read = call(Method::GET, vec![]).await.unwrap();
    let old = read.headers()[header::ETAG].to_str().unwrap().to_owned();
    fail.store(true, Ordering::SeqCst);
    let err = call(Method::PUT, vec![("if-match", old.clone())]).await;
    assert_eq!(err.unwrap_err().to_string(), "handler failed");
    fail.store(false, Ordering::SeqCst);
    let r = call(Method::PUT, vec![("if-match", old.clone())])
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_ne!(r.headers()[header::ETAG], old.as_str());
}

#[tokio::test]
async fn delete_removes_the_version() {
    let (app, _) = app();
    let old = get_etag(&app, "/items/1").await;
    let r = send(
        &app,
        Method::DELETE,
        "/items/1",
        &[("if-match", &old), ("x-status", "204")],
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.etag().is_none(), "a deleted resource has no ETag");
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = send(
        &app,
        Method::PUT,
        "/items/1",
        &[("if-none-match", "*"), ("x-status", "201")],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.header("x-create"), Some("1"));
    assert_ne!(r.etag(), Some(old.as_str()));
}

#[tokio::test]
async fn a_handler_past_its_deadline_is_503_and_the_old_tag_fails() {
    let (app, _) = app_with(
        PreconditionLayer::new(MemoryStore::new()).handler_timeout(Duration::from_millis(50)),
    );
    let old = get_etag(&app, "/items/1").await;
    let r = send(
        &app,
        Method::PUT,
        "/items/1",
        &[("if-match", &old), ("x-sleep-ms", "10000")],
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.problem()["code"], "write_timed_out");
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_ne!(r.etag(), Some(old.as_str()));
}

#[tokio::test]
async fn a_write_during_another_write_is_409_and_reads_see_the_last_commit() {
    let (app, shared) = app();
    let old = get_etag(&app, "/items/1").await;
    let blocked = tokio::spawn({
        let app = app.clone();
        let old = old.clone();
        async move {
            send(
                &app,
                Method::PUT,
                "/items/1",
                &[("if-match", &old), ("x-block", "1")],
            )
            .await
        }
    });
    shared.entered.notified().await;

    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.problem()["code"], "conditional_request_conflict");
    // Even an unconditional write waits its turn.
    let r = send(&app, Method::PATCH, "/items/1", &[]).await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    // Reads are served, with the last committed version.
    assert_eq!(get_etag(&app, "/items/1").await, old);
    let r = send(&app, Method::GET, "/items/1", &[("if-none-match", &old)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);

    shared.release.notify_one();
    let done = blocked.await.unwrap();
    assert_eq!(done.status, StatusCode::OK);
    let new = done.etag().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(get_etag(&app, "/items/1").await, new);
}

#[tokio::test]
async fn the_handler_sees_its_reservation() {
    let (app, _) = app();
    let r = send(&app, Method::PUT, "/items/r", &[("if-none-match", "*")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-key"), Some("/items/r"));
    assert_eq!(r.header("x-replacing"), Some("none"));
    assert_eq!(r.header("x-create"), Some("1"));
    assert_eq!(r.header("x-lease-live"), Some("1"));
    let etag = r.etag().unwrap().to_owned();
    let r = send(&app, Method::PATCH, "/items/r", &[("if-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-replacing"), Some(etag.as_str()));
    assert_eq!(r.header("x-create"), Some("0"));
}

// ---------------------------------------------------------------------------------
// Store failures
// ---------------------------------------------------------------------------------

/// A memory store that can be switched to fail, or to hang, on every call.
#[derive(Default)]
struct SwitchableStore {
    inner: MemoryStore,
    fail: AtomicBool,
    hang: AtomicBool,
}

impl SwitchableStore {
    async fn gate(&self) -> Result<(), StoreError> {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("switched off"));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl AtomicVersionStore for SwitchableStore {
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.gate().await?;
        self.inner.load(key).await
    }

    async fn clock_millis(&self) -> Result<u64, StoreError> {
        self.inner.clock_millis().await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        self.gate().await?;
        self.inner.compare_and_set(key, expected, new).await
    }
}

#[tokio::test]
async fn a_failing_store_fails_writes_closed_and_serves_reads_without_validators() {
    let store = Arc::new(SwitchableStore::default());
    let (app, shared) = app_with(PreconditionLayer::from_arc(store.clone()));
    let etag = get_etag(&app, "/items/1").await;
    store.fail.store(true, Ordering::SeqCst);

    for headers in [vec![("if-match", etag.as_str())], vec![]] {
        let r = send(&app, Method::PUT, "/items/1", &headers).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.header("retry-after").is_some());
        assert_eq!(r.problem()["code"], "version_store_unavailable");
    }
    assert_eq!(shared.writes.load(Ordering::SeqCst), 0, "handler ran");

    let r = send(&app, Method::GET, "/items/1", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.etag().is_none() && r.header("last-modified").is_none());
    let r = send(&app, Method::GET, "/items/1", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::OK, "never 304 on a guess");
    assert!(r.etag().is_none());
    let lm = "Fri, 31 Dec 9999 23:59:59 GMT";
    let r = send(&app, Method::GET, "/items/1", &[("if-modified-since", lm)]).await;
    assert_eq!(r.status, StatusCode::OK);
    // An If-Match the layer cannot confirm does not pass as if it held.
    let r = send(&app, Method::GET, "/items/1", &[("if-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);

    store.fail.store(false, Ordering::SeqCst);
    assert_eq!(get_etag(&app, "/items/1").await, etag);
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn a_hanging_store_times_out_to_503() {
    let store = Arc::new(SwitchableStore::default());
    let (app, shared) = app_with(
        PreconditionLayer::from_arc(store.clone()).store_timeout(Duration::from_millis(100)),
    );
    let etag = get_etag(&app, "/items/1").await;
    store.hang.store(true, Ordering::SeqCst);
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.header("retry-after").is_some());
    assert_eq!(shared.writes.load(Ordering::SeqCst), 0);
    let r = send(&app, Method::GET, "/items/1", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.etag().is_none());
}

// ---------------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_stale_if_unmodified_since_fails_after_two_writes_in_one_second() {
    let (app, _) = app();
    let first = send(&app, Method::PUT, "/items/d", &[("if-none-match", "*")]).await;
    assert_eq!(first.status, StatusCode::OK);
    let first_lm = first.header("last-modified").unwrap().to_owned();
    // The second write lands in the same second (most likely) or a later one: either
    // way a client holding the first version's date must be refused.
    let second = send(
        &app,
        Method::PUT,
        "/items/d",
        &[("if-match", first.etag().unwrap())],
    )
    .await;
    assert_eq!(second.status, StatusCode::OK);
    let r = send(
        &app,
        Method::PUT,
        "/items/d",
        &[("if-unmodified-since", &first_lm)],
    )
    .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(r.etag(), second.etag());
    // And a conditional GET with that date must not 304 on the second version.
    let r = send(
        &app,
        Method::GET,
        "/items/d",
        &[("if-modified-since", &first_lm)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------
// What the layer leaves alone
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn key_fn_none_passes_through_untouched() {
    let layer = PreconditionLayer::new(MemoryStore::new()).key_fn(|parts| {
        let path = parts.uri.path();
        path.starts_with("/items/").then(|| path.to_owned())
    });
    let (app, shared) = app_with(layer);
    let r = send(&app, Method::GET, "/other/1", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.etag().is_none() && r.header("last-modified").is_none());
    // Not evaluated: a malformed If-Match reaches the handler.
    let r = send(&app, Method::PUT, "/other/1", &[("if-match", "garbage")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("x-key").is_none(), "no reservation");
    assert_eq!(shared.writes.load(Ordering::SeqCst), 1);
    // /items/ is still versioned.
    assert!(send(&app, Method::GET, "/items/1", &[])
        .await
        .etag()
        .is_some());
}

#[tokio::test]
async fn post_and_options_pass_through_by_default() {
    let (app, shared) = app();
    let etag = get_etag(&app, "/items/1").await;
    let r = send(&app, Method::POST, "/items/1", &[("if-match", "\"stale\"")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.etag().is_none() && r.header("x-key").is_none());
    let r = send(
        &app,
        Method::OPTIONS,
        "/items/1",
        &[("if-match", "garbage")],
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.header("allow"), Some("GET, PUT"));
    assert_eq!(shared.writes.load(Ordering::SeqCst), 1);
    // The version did not move.
    assert_eq!(get_etag(&app, "/items/1").await, etag);
}

#[tokio::test]
async fn post_is_a_write_when_opted_in() {
    let (app, shared) = app_with(
        PreconditionLayer::new(MemoryStore::new()).write_methods([Method::PUT, Method::POST]),
    );
    let etag = get_etag(&app, "/items/1").await;
    let r = send(&app, Method::POST, "/items/1", &[("if-match", "\"stale\"")]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(shared.writes.load(Ordering::SeqCst), 0);
    let r = send(&app, Method::POST, "/items/1", &[("if-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-replacing"), Some(etag.as_str()));
    assert_ne!(r.etag(), Some(etag.as_str()));
    // DELETE is no longer a write in this configuration: it passes through.
    let r = send(
        &app,
        Method::DELETE,
        "/items/1",
        &[("if-match", "\"stale\"")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("x-key").is_none());
}

// ---------------------------------------------------------------------------------
// Lease takeover and stale entries
// ---------------------------------------------------------------------------------

/// Leaves `key` as a crashed writer would: its committed version plus a lease that
/// expired (or, with `live`, one that is still running).
async fn abandon_lease(store: &MemoryStore, key: &str, live: bool) -> Entry {
    let current = store.load(key).await.unwrap();
    // Leases are judged by the store's clock.
    let now = store.clock_millis().await.unwrap();
    let expires = if live {
        now + 60_000
    } else {
        now.saturating_sub(1_000).max(1)
    };
    let lease = Lease::from_parts(LeaseToken::random(), expires);
    let abandoned = Entry::from_parts(
        current.as_ref().and_then(|e| e.version().cloned()),
        Some(lease),
    )
    .unwrap();
    let outcome = store
        .compare_and_set(key, current.as_ref(), Some(&abandoned))
        .await
        .unwrap();
    assert_eq!(outcome, CasOutcome::Applied);
    abandoned
}

/// An app over a store the test can also reach directly. The lease is short, but not
/// so short that an ordinary write on a loaded machine could outlive it: the leases
/// under test are planted by `abandon_lease`.
fn shared_store_app(store: &Arc<MemoryStore>) -> (Router, Arc<Shared>) {
    app_with(PreconditionLayer::from_arc(store.clone()).lease(Duration::from_secs(2)))
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_by_the_next_write() {
    let store = Arc::new(MemoryStore::new());
    let (app, shared) = shared_store_app(&store);
    let old = get_etag(&app, "/items/1").await;

    // A live lease: the write is refused with 409.
    let live = abandon_lease(&store, "/items/1", true).await;
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // (Clear it again, as its owner would have.)
    let committed = Entry::from_parts(live.version().cloned(), None);
    store
        .compare_and_set("/items/1", Some(&live), committed.as_ref())
        .await
        .unwrap();

    // An expired lease: the writer may have written, so the old tag must fail.
    abandon_lease(&store, "/items/1", false).await;
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let fresh = r.etag().unwrap().to_owned();
    assert_ne!(fresh, old);
    assert_eq!(shared.writes.load(Ordering::SeqCst), 0);
    assert_eq!(get_etag(&app, "/items/1").await, fresh);
    let entry = store.load("/items/1").await.unwrap().unwrap();
    assert!(entry.lease().is_none(), "the takeover cleared the lease");
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &fresh)]).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn an_expired_lease_never_lets_a_read_304_on_the_old_tag() {
    // Invariant 3: a crashed writer's outcome is unknown, so its old ETag must fail
    // everywhere, reads included, even before any write comes along.
    let store = Arc::new(MemoryStore::new());
    let (app, shared) = shared_store_app(&store);
    let old = get_etag(&app, "/items/1").await;
    let lm = send(&app, Method::GET, "/items/1", &[]).await;
    let lm = lm.header("last-modified").unwrap().to_owned();
    abandon_lease(&store, "/items/1", false).await;

    let r = send(&app, Method::GET, "/items/1", &[("if-none-match", &old)]).await;
    assert_eq!(r.status, StatusCode::OK, "stale ETag matched after a crash");
    let fresh = r.etag().expect("the read is labelled").to_owned();
    assert_ne!(fresh, old);
    let r = send(&app, Method::GET, "/items/1", &[("if-modified-since", &lm)]).await;
    assert_eq!(r.status, StatusCode::OK, "stale date matched after a crash");
    assert_eq!(get_etag(&app, "/items/1").await, fresh);
    assert_eq!(shared.reads.load(Ordering::SeqCst), 5);
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(r.etag(), Some(fresh.as_str()));
}

#[tokio::test]
async fn a_crashed_create_does_not_block_the_next_create_forever() {
    let store = Arc::new(MemoryStore::new());
    let (app, _) = shared_store_app(&store);
    // A create whose process died: a lease and no version.
    abandon_lease(&store, "/items/c", false).await;
    // The resource does not exist (the handler says 404): the read clears the entry.
    let r = send(&app, Method::GET, "/items/c", &[("x-status", "404")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = send(
        &app,
        Method::PUT,
        "/items/c",
        &[("if-none-match", "*"), ("x-status", "201")],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

/// A memory store whose reserve (the compare-and-set that puts a lease) is slow.
struct SlowReserveStore {
    inner: MemoryStore,
    delay: Duration,
}

#[async_trait::async_trait]
impl AtomicVersionStore for SlowReserveStore {
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.inner.load(key).await
    }

    async fn clock_millis(&self) -> Result<u64, StoreError> {
        self.inner.clock_millis().await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        if new.is_some_and(|e| e.lease().is_some()) {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.compare_and_set(key, expected, new).await
    }
}

#[tokio::test]
async fn a_slow_reserve_does_not_push_the_handler_past_its_lease() {
    // The lease starts before the reserve's compare-and-set, which here takes 80% of
    // the lease. The handler's deadline must count from the lease's start: a handler
    // still running once its lease expired could write after another request took
    // the lease over (and labelled the old data with a "fresh" version).
    let store = Arc::new(SlowReserveStore {
        inner: MemoryStore::new(),
        delay: Duration::from_millis(400),
    });
    let ran_past_lease = Arc::new(AtomicBool::new(false));
    let handler = {
        let ran_past_lease = ran_past_lease.clone();
        let store = store.clone();
        move |axum::Extension(r): axum::Extension<Reservation>| {
            let ran_past_lease = ran_past_lease.clone();
            let store = store.clone();
            async move {
                for _ in 0..100 {
                    // Judged as the store judges it: by its clock, on the stored lease.
                    let now = store.inner.clock_millis().await.unwrap();
                    let entry = store.inner.load(r.key()).await.unwrap();
                    if entry.is_some_and(|e| e.live_lease(now).is_none()) {
                        ran_past_lease.store(true, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                StatusCode::NO_CONTENT
            }
        }
    };
    let app = Router::new()
        .route("/items/{id}", get(|| async { "x" }).put(handler))
        .layer(PreconditionLayer::from_arc(store.clone()).lease(Duration::from_millis(500)));
    let old = get_etag(&app, "/items/1").await;
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        !ran_past_lease.load(Ordering::SeqCst),
        "the handler ran after its lease expired"
    );
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
}

/// A memory store that applies the first settle (a compare-and-set from a leased entry
/// to a committed one) but reports a failure, as when the answer is lost on the wire.
#[derive(Default)]
struct LostAnswerStore {
    inner: MemoryStore,
    lose_next_settle_answer: AtomicBool,
    settle_calls: AtomicUsize,
}

#[async_trait::async_trait]
impl AtomicVersionStore for LostAnswerStore {
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.inner.load(key).await
    }

    async fn clock_millis(&self) -> Result<u64, StoreError> {
        self.inner.clock_millis().await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        let settling = expected.is_some_and(|e| e.lease().is_some());
        let outcome = self.inner.compare_and_set(key, expected, new).await;
        if settling {
            self.settle_calls.fetch_add(1, Ordering::SeqCst);
            if self.lose_next_settle_answer.swap(false, Ordering::SeqCst) {
                return Err(StoreError::timeout("answer lost after the write applied"));
            }
        }
        outcome
    }
}

#[tokio::test]
async fn a_settle_whose_answer_was_lost_is_retried_and_recognised_as_applied() {
    let store = Arc::new(LostAnswerStore::default());
    let (app, _shared) = app_with(PreconditionLayer::from_arc(store.clone()));
    let old = get_etag(&app, "/items/1").await;
    // The read's seed is confirmed from a lease too; only the write's settles count.
    store.settle_calls.store(0, Ordering::SeqCst);
    store.lose_next_settle_answer.store(true, Ordering::SeqCst);

    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        store.settle_calls.load(Ordering::SeqCst),
        2,
        "settle retried once"
    );
    let committed = r
        .etag()
        .expect("the replayed settle counts as committed")
        .to_owned();
    assert_ne!(committed, old);

    // The entry holds no lease: the next write is not refused with 409.
    let entry = store.inner.load("/items/1").await.unwrap().unwrap();
    assert!(entry.lease().is_none());
    assert_eq!(get_etag(&app, "/items/1").await, committed);
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &committed)]).await;
    assert_eq!(r.status, StatusCode::OK);
}
