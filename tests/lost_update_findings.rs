//! The findings of the hostile review of 0.1.0 that lost updates or handed out wrong
//! validators, one test each, named for the finding (issue "Close every way the layer
//! can lose an update"). Each failed on 0.1.0. Through a real axum `Router`, over the
//! memory store (the mechanism under test is the shared protocol; the Redis and
//! Postgres stores run the same protocol and their own contract suites).

#[path = "common/oneshot.rs"]
mod oneshot;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use bytes::Bytes;
use oneshot::{get_etag, send};
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_precondition::{
    store::{AtomicVersionStore, CasOutcome, Entry, Lease, LeaseToken, StoreError},
    MemoryStore, PreconditionLayer, Reservation,
};

#[derive(Default)]
struct Shared {
    writes: AtomicUsize,
    /// A read asked to (`x-hold`) signals this once it has read, then waits.
    read_entered: Notify,
    read_release: Notify,
}

fn status_from(headers: &HeaderMap, default: StatusCode) -> StatusCode {
    headers
        .get("x-status")
        .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(default)
}

async fn read(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let headers = request.headers().clone();
    if headers.contains_key("x-hold") {
        shared.read_entered.notify_one();
        shared.read_release.notified().await;
    }
    let mut response = (status_from(&headers, StatusCode::OK), "body").into_response();
    if let Some(etag) = headers.get("x-etag") {
        response.headers_mut().insert(header::ETAG, etag.clone());
    }
    response
}

async fn write(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.writes.fetch_add(1, Ordering::SeqCst);
    let headers = request.headers().clone();
    if let Some(ms) = headers
        .get("x-block-thread-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        // A blocking call: the layer's deadline timer cannot cancel it.
        std::thread::sleep(Duration::from_millis(ms));
    }
    let mut response = status_from(&headers, StatusCode::OK).into_response();
    if let Some(r) = request.extensions().get::<Reservation>() {
        let create = u16::from(r.is_create());
        response.headers_mut().insert("x-create", create.into());
    }
    response
}

fn app_with(layer: PreconditionLayer) -> (Router, Arc<Shared>) {
    let shared = Arc::new(Shared::default());
    let router = Router::new()
        .route("/items/{id}", get(read).put(write).delete(write))
        .with_state(shared.clone())
        .layer(layer);
    (router, shared)
}

// ---------------------------------------------------------------------------------
// 2. Reads change what later writes see
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn finding_7_2_a_404_read_never_removes_a_version() {
    let (app, _) = app_with(PreconditionLayer::new(MemoryStore::new()));
    let create = [("if-none-match", "*"), ("x-status", "201")];
    let created = send(&app, Method::PUT, "/items/1", &create).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let owner_tag = created.etag().expect("201 has an ETag").to_owned();

    // An anonymous client, a handler that answers 404 to "not yours", a lagging replica.
    let r = send(&app, Method::GET, "/items/1", &[("x-status", "404")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.etag().is_none(), "a 404 carries no validators");

    // A second create still fails, and the owner's ETag still works.
    let again = send(&app, Method::PUT, "/items/1", &create).await;
    assert_eq!(again.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(again.code(), "resource_exists");
    let update = send(&app, Method::PUT, "/items/1", &[("if-match", &owner_tag)]).await;
    assert_eq!(update.status, StatusCode::OK);
}

#[tokio::test]
async fn finding_7_2_a_seed_cannot_make_a_create_fail_forever() {
    let (app, shared) = app_with(PreconditionLayer::new(MemoryStore::new()));
    // A fallback page answers 200 for an id that does not exist yet: the read seeds.
    let seeded = get_etag(&app, "/items/new").await;
    // A write of unknown outcome in between proves no more about existence.
    let r = send(&app, Method::PUT, "/items/new", &[("x-status", "500")]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    // The create is decided by the handler (its conditional insert), not refused.
    let create = [("if-none-match", "*"), ("x-status", "201")];
    let r = send(&app, Method::PUT, "/items/new", &create).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.headers["x-create"], "1", "the handler is told it creates");
    assert_eq!(shared.writes.load(Ordering::SeqCst), 2);
    // Once a write created it, the layer knows it exists.
    let r = send(&app, Method::PUT, "/items/new", &create).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    // And the read-seeded tag still works for an update (a read saw that body).
    let (app, _) = app_with(PreconditionLayer::new(MemoryStore::new()));
    let seeded_again = get_etag(&app, "/items/x").await;
    assert_ne!(seeded_again, seeded);
    let r = send(
        &app,
        Method::PUT,
        "/items/x",
        &[("if-match", &seeded_again)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn finding_7_2_a_404_read_leaves_nothing_in_the_store() {
    let store = Arc::new(MemoryStore::new());
    let (app, _) = app_with(PreconditionLayer::from_arc(store.clone()));
    for i in 0..200 {
        let r = send(
            &app,
            Method::GET,
            &format!("/items/r{i}"),
            &[("x-status", "404")],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(r.etag().is_none());
    }
    assert_eq!(
        store.len(),
        0,
        "a read the handler answered 404 must leave no entry"
    );
}

// ---------------------------------------------------------------------------------
// 3. A lost lease is only logged
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_7_3_a_write_that_outlived_its_lease_never_gets_a_plain_2xx() {
    let store = Arc::new(MemoryStore::new());
    let (app, _) = app_with(
        PreconditionLayer::from_arc(store.clone())
            .lease(Duration::from_millis(300))
            .handler_timeout(Duration::from_secs(5)),
    );
    let old = get_etag(&app, "/items/1").await;

    // Writer A blocks its thread past its lease; the deadline cannot cancel it.
    let slow = {
        let app = app.clone();
        let old = old.clone();
        tokio::spawn(async move {
            send(
                &app,
                Method::PUT,
                "/items/1",
                &[("if-match", &old), ("x-block-thread-ms", "900")],
            )
            .await
        })
    };
    // Writer B arrives once A's lease expired and takes it over.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taker = send(&app, Method::PUT, "/items/1", &[]).await;
    assert_eq!(
        taker.status,
        StatusCode::OK,
        "the expired lease is taken over"
    );
    let taker_tag = taker.etag().expect("2xx has an ETag").to_owned();

    let slow = slow.await.unwrap();
    assert_eq!(
        slow.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a write whose lease was taken over must not be reported as a success"
    );
    assert_eq!(slow.code(), "lease_lost");
    assert!(slow.etag().is_none());
    // A wrote after B committed: B's tag must not describe the data any more.
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &taker_tag)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
}

/// A store whose clock (the one leases are judged by) is nowhere near the host's wall
/// clock: as a shared store's is when a host's clock is off, or steps.
#[tokio::test]
async fn finding_7_3_leases_are_judged_by_the_stores_clock_not_the_hosts() {
    let store = Arc::new(MemoryStore::new());
    let (app, shared) = app_with(PreconditionLayer::from_arc(store.clone()));
    let old = get_etag(&app, "/items/1").await;
    // Another instance holds a lease that is live by the store's clock. Read as a
    // wall-clock time (what 0.1.0 compared it with), it expired decades ago.
    let now = store.clock_millis().await.unwrap();
    let current = store.load("/items/1").await.unwrap();
    let live = Entry::from_parts(
        current.as_ref().and_then(|e| e.version().cloned()),
        Some(Lease::from_parts(LeaseToken::random(), now + 60_000)),
    )
    .unwrap();
    assert_eq!(
        store
            .compare_and_set("/items/1", current.as_ref(), Some(&live))
            .await
            .unwrap(),
        CasOutcome::Applied
    );
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(
        r.status,
        StatusCode::CONFLICT,
        "a live lease is never taken over"
    );
    assert_eq!(shared.writes.load(Ordering::SeqCst), 0);
    // Reads are served from the committed version meanwhile.
    assert_eq!(get_etag(&app, "/items/1").await, old);
}

// ---------------------------------------------------------------------------------
// 5. A 5xx (or 3xx) carries the new fresh ETag
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn finding_7_5_validators_go_on_2xx_writes_only() {
    let (app, _) = app_with(PreconditionLayer::new(MemoryStore::new()));
    for status in ["500", "503", "302", "409", "422"] {
        let old = get_etag(&app, "/items/1").await;
        let r = send(
            &app,
            Method::PUT,
            "/items/1",
            &[("if-match", &old), ("x-status", status)],
        )
        .await;
        assert_eq!(r.status.as_str(), status);
        assert!(r.etag().is_none(), "a {status} must carry no ETag");
        assert!(!r.headers.contains_key(header::LAST_MODIFIED));
    }
    // A 5xx still invalidated the old tag (invariant 3).
    let old = get_etag(&app, "/items/2").await;
    send(
        &app,
        Method::PUT,
        "/items/2",
        &[("if-match", &old), ("x-status", "500")],
    )
    .await;
    let r = send(&app, Method::PUT, "/items/2", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
}

// ---------------------------------------------------------------------------------
// 7. A read overrides the handler's own strong ETag
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn finding_7_7_a_read_moves_the_store_to_the_handlers_own_etag() {
    let (app, _) = app_with(PreconditionLayer::new(MemoryStore::new()));
    let r = send(&app, Method::GET, "/items/1", &[("x-etag", "\"h1\"")]).await;
    assert_eq!(r.etag(), Some("\"h1\""));
    // The data changes by a path the layer does not see: the handler now says h2.
    let r = send(&app, Method::GET, "/items/1", &[("x-etag", "\"h2\"")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.etag(),
        Some("\"h2\""),
        "the ETag must describe the body it travels with"
    );
    // The old tag no longer matches, for reads or writes.
    let r = send(
        &app,
        Method::GET,
        "/items/1",
        &[("if-none-match", "\"h1\""), ("x-etag", "\"h2\"")],
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "no 304 for a tag that is not current"
    );
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", "\"h1\"")]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", "\"h2\"")]).await;
    assert_eq!(r.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------
// 8. A release that lands before a delayed reserve
// ---------------------------------------------------------------------------------

/// A store whose reserves (compare-and-sets that put a lease) land late: sent, then
/// applied after `delay` whether or not the caller still waits (as a statement queued
/// on a busy database would).
struct DelayedReserveStore {
    inner: Arc<MemoryStore>,
    delay: Duration,
}

#[async_trait::async_trait]
impl AtomicVersionStore for DelayedReserveStore {
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
        // A write's reserve: a lease over a version (a first read's pending seed is a
        // lease with no version, and is not what this store delays).
        let reserve = new
            .is_some_and(|e| e.version().is_some() && e.lease().is_some_and(|l| !l.is_released()));
        if !reserve {
            return self.inner.compare_and_set(key, expected, new).await;
        }
        let (inner, key, delay) = (self.inner.clone(), key.to_owned(), self.delay);
        let (expected, new) = (expected.cloned(), new.cloned());
        let landed = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            inner
                .compare_and_set(&key, expected.as_ref(), new.as_ref())
                .await
        });
        landed
            .await
            .map_err(|e| StoreError::unavailable(e.to_string()))?
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_7_8_a_reserve_that_lands_after_its_timeout_leaves_no_lease() {
    let memory = Arc::new(MemoryStore::new());
    let store = Arc::new(DelayedReserveStore {
        inner: memory.clone(),
        delay: Duration::from_millis(300),
    });
    let (app, shared) = app_with(
        PreconditionLayer::from_arc(store)
            .store_timeout(Duration::from_millis(100))
            .lease(Duration::from_secs(30)),
    );
    let old = get_etag(&app, "/items/1").await;
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    // Let the delayed reserve land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = memory.clock_millis().await.unwrap();
    let entry = memory.load("/items/1").await.unwrap().expect("entry");
    assert!(
        entry.live_lease(now).is_none(),
        "a reserve answered 503 landed later and left a lease nobody owns: {entry:?}"
    );
    assert_eq!(shared.writes.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------
// 9. Takeovers and seeds that invent or resurrect
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn finding_7_9_taking_over_a_crashed_create_invents_no_version() {
    let store = Arc::new(MemoryStore::new());
    let (app, shared) = app_with(PreconditionLayer::from_arc(store.clone()));
    // A create crashed mid-write: a lease with no version, expired.
    let crashed =
        Entry::from_parts(None, Some(Lease::from_parts(LeaseToken::random(), 1))).unwrap();
    store
        .compare_and_set("/items/c", None, Some(&crashed))
        .await
        .unwrap();
    // Whether the resource exists is unknown: If-Match: * must not pass.
    let r = send(&app, Method::PUT, "/items/c", &[("if-match", "*")]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(r.code(), "resource_missing");
    assert_eq!(shared.writes.load(Ordering::SeqCst), 0);
    // A create is a create.
    store
        .compare_and_set("/items/d", None, Some(&crashed))
        .await
        .unwrap();
    let r = send(
        &app,
        Method::PUT,
        "/items/d",
        &[("if-none-match", "*"), ("x-status", "201")],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.headers["x-create"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_7_9_a_read_racing_a_delete_cannot_bring_the_item_back() {
    let (app, shared) = app_with(PreconditionLayer::new(MemoryStore::new()));
    // A read of a resource the layer has no version of reads its body, then stalls.
    let read = {
        let app = app.clone();
        tokio::spawn(async move { send(&app, Method::GET, "/items/1", &[("x-hold", "1")]).await })
    };
    shared.read_entered.notified().await;
    // Meanwhile the item is deleted: while the read's seed is pending, the delete is
    // told a write is in flight, and deletes once the read is done.
    let deleted = send(&app, Method::DELETE, "/items/1", &[]).await;
    assert!(
        [StatusCode::OK, StatusCode::CONFLICT].contains(&deleted.status),
        "{}",
        deleted.status
    );
    shared.read_release.notify_one();
    let read = read.await.unwrap();
    assert_eq!(read.status, StatusCode::OK);
    if deleted.status == StatusCode::CONFLICT {
        let deleted = send(&app, Method::DELETE, "/items/1", &[]).await;
        assert_eq!(deleted.status, StatusCode::OK);
    }
    // The read's body predates the delete: its ETag (if any) must not let a write
    // bring the deleted item back.
    if let Some(tag) = read.etag() {
        let r = send(&app, Method::PUT, "/items/1", &[("if-match", tag)]).await;
        assert_eq!(
            r.status,
            StatusCode::PRECONDITION_FAILED,
            "the pre-delete ETag matched after the DELETE"
        );
    }
}

/// Found by the linearizability harness (`tests/linearizability.rs`), after 0.1.0: a read
/// of a resource with no version seeds one before its handler runs, and a write arriving
/// meanwhile took that seed for the current version: its `412` named the seed, and an
/// `If-Match` with the seed then passed, creating a resource that did not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_racing_the_first_read_finds_no_version_to_match() {
    let (app, shared) = app_with(PreconditionLayer::new(MemoryStore::new()));
    // The first read of a missing item: it will answer 404, but is still running.
    let read = {
        let app = app.clone();
        tokio::spawn(async move {
            let hold = [("x-hold", "1"), ("x-status", "404")];
            send(&app, Method::GET, "/items/1", &hold).await
        })
    };
    shared.read_entered.notified().await;
    let stale = send(&app, Method::PUT, "/items/1", &[("if-match", "\"old\"")]).await;
    match stale.status {
        // The read's pending seed is a write in flight for the writers.
        StatusCode::CONFLICT => assert!(stale.header("retry-after").is_some()),
        StatusCode::PRECONDITION_FAILED => assert_eq!(
            stale.etag(),
            None,
            "a 412 named the version a read is still deciding on"
        ),
        other => panic!("a stale If-Match got {other}"),
    }
    shared.read_release.notify_one();
    assert_eq!(read.await.unwrap().status, StatusCode::NOT_FOUND);
    // Nothing exists, so no If-Match can pass; nothing reached a write handler.
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", "*")]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(shared.writes.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_read_dropped_mid_handler_leaves_no_seed_behind() {
    let store = Arc::new(MemoryStore::new());
    let (app, shared) = app_with(PreconditionLayer::from_arc(store.clone()));
    let read = {
        let app = app.clone();
        tokio::spawn(async move { send(&app, Method::GET, "/items/1", &[("x-hold", "1")]).await })
    };
    shared.read_entered.notified().await;
    // The client goes away while the handler runs.
    read.abort();
    let _ = read.await;
    // The undo runs in the background; the entry it removes must go within moments,
    // not after a lease's 30 s.
    for _ in 0..200 {
        if store.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        store.is_empty(),
        "an abandoned first read left an entry behind"
    );
    let create = [("if-none-match", "*"), ("x-status", "201")];
    let r = send(&app, Method::PUT, "/items/1", &create).await;
    assert_eq!(r.status, StatusCode::CREATED);
}

// ---------------------------------------------------------------------------------
// 4. A body cut off mid-upload keeps the old ETag valid
// ---------------------------------------------------------------------------------

/// A body that sends one chunk, then fails, as a connection cut mid-upload does.
fn failing_body() -> Body {
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"half\":")),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "cut off",
        )),
    ];
    Body::from_stream(futures_util::stream::iter(chunks))
}

fn upload_app(layer: PreconditionLayer) -> (Router, Arc<AtomicUsize>) {
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let router = Router::new()
        .route(
            "/items/{id}",
            get(|| async { "body" }).put(move |body: Bytes| {
                let counter = counter.clone();
                async move {
                    // Reached only with the whole body: it would be written now.
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = body;
                    StatusCode::OK
                }
            }),
        )
        .layer(layer);
    (router, handled)
}

async fn put_body(app: &Router, tag: &str, body: Body) -> StatusCode {
    let request = axum::http::Request::put("/items/1")
        .header(header::IF_MATCH, tag)
        .body(body)
        .unwrap();
    app.clone().oneshot(request).await.unwrap().status()
}

#[tokio::test]
async fn finding_7_4_a_body_cut_off_mid_upload_changes_nothing_and_reaches_no_handler() {
    let (app, handled) = upload_app(PreconditionLayer::new(MemoryStore::new()));
    let old = get_etag(&app, "/items/1").await;
    assert_eq!(
        put_body(&app, &old, failing_body()).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        0,
        "the handler saw a cut-off body"
    );
    // Nothing changed: the old ETag is still current, for reads and writes.
    assert_eq!(get_etag(&app, "/items/1").await, old);
    assert_eq!(put_body(&app, &old, Body::from("{}")).await, StatusCode::OK);
}

#[tokio::test]
async fn finding_7_4_a_streamed_body_that_fails_mid_read_invalidates_the_old_etag() {
    let layer = PreconditionLayer::new(MemoryStore::new())
        .request_body(tower_precondition::RequestBodyConfig::streaming());
    let (app, _) = upload_app(layer);
    let old = get_etag(&app, "/items/1").await;
    // The handler's extractor fails on the broken body and answers 4xx; it could have
    // written part of it, so the old tag must stop matching.
    let status = put_body(&app, &old, failing_body()).await;
    assert!(status.is_client_error(), "{status}");
    assert_ne!(get_etag(&app, "/items/1").await, old);
    assert_eq!(
        put_body(&app, &old, Body::from("{}")).await,
        StatusCode::PRECONDITION_FAILED
    );
}
