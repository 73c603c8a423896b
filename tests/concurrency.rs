//! The layer under concurrency, on a multi-thread runtime: no lost update, a correct
//! read-modify-write counter, and cancellation (a client that disconnects mid-write).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::{to_bytes, Body},
    extract::{Path, State},
    http::{header, HeaderMap, Method, Request, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_precondition::{
    store::{AtomicVersionStore, CasOutcome, Entry, StoreError},
    MemoryStore, PreconditionLayer,
};

const MT: tokio::runtime::RuntimeFlavor = tokio::runtime::RuntimeFlavor::MultiThread;

#[derive(Default)]
struct Shared {
    values: Mutex<HashMap<String, i64>>,
    writes: AtomicUsize,
    entered: Notify,
    release: Notify,
}

async fn read(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> String {
    let value = s.values.lock().unwrap().get(&id).copied().unwrap_or(0);
    value.to_string()
}

async fn write(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    s.writes.fetch_add(1, Ordering::SeqCst);
    // Give other tasks a chance to interleave while we hold the reservation.
    tokio::task::yield_now().await;
    if headers.contains_key("x-block") {
        s.entered.notify_one();
        s.release.notified().await;
    }
    if let Some(status) = headers.get("x-status") {
        let status = status.to_str().unwrap().parse::<u16>().unwrap();
        return StatusCode::from_u16(status).unwrap();
    }
    if let Ok(value) = body.trim().parse::<i64>() {
        s.values.lock().unwrap().insert(id, value);
    }
    StatusCode::NO_CONTENT
}

fn app_with(layer: PreconditionLayer) -> (Router, Arc<Shared>) {
    let shared = Arc::new(Shared::default());
    let router = Router::new()
        .route("/items/{id}", get(read).put(write))
        .with_state(shared.clone())
        .layer(layer);
    (router, shared)
}

fn app() -> (Router, Arc<Shared>) {
    app_with(PreconditionLayer::new(MemoryStore::new()))
}

fn request(method: Method, uri: &str, headers: &[(&str, &str)], body: String) -> Request<Body> {
    let mut r = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        r = r.header(*name, *value);
    }
    r.body(Body::from(body)).unwrap()
}

/// Sends a request: (status, ETag, body).
async fn send(
    app: &Router,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: String,
) -> (StatusCode, Option<String>, String) {
    let response = app
        .clone()
        .oneshot(request(method, uri, headers, body))
        .await
        .unwrap();
    let status = response.status();
    let etag = response
        .headers()
        .get(header::ETAG)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, etag, String::from_utf8(body.to_vec()).unwrap())
}

async fn get_etag(app: &Router, uri: &str) -> String {
    let (status, etag, _) = send(app, Method::GET, uri, &[], String::new()).await;
    assert_eq!(status, StatusCode::OK);
    etag.expect("a read is labelled")
}

/// Polls until `check` holds, for at most ~5 s (the background settle of a dropped
/// write is a spawned task); returns whether it held. Not a timing assertion: the
/// bound only keeps a broken build from hanging.
async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_32_writes_with_one_if_match_exactly_one_wins() {
    assert_eq!(tokio::runtime::Handle::current().runtime_flavor(), MT);
    let (app, shared) = app();
    for round in 0..50 {
        let uri = format!("/items/{}", round % 5);
        let etag = get_etag(&app, &uri).await;
        let writes_before = shared.writes.load(Ordering::SeqCst);
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (app, uri, etag) = (app.clone(), uri.clone(), etag.clone());
                tokio::spawn(async move {
                    send(
                        &app,
                        Method::PUT,
                        &uri,
                        &[("if-match", &etag)],
                        i.to_string(),
                    )
                    .await
                })
            })
            .collect();
        let mut won = Vec::new();
        for task in tasks {
            let (status, etag, _) = task.await.unwrap();
            match status {
                StatusCode::NO_CONTENT => won.push(etag.expect("a winner gets the new ETag")),
                StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => {}
                other => panic!("round {round}: unexpected {other}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: {} writes won", won.len());
        assert_eq!(
            shared.writes.load(Ordering::SeqCst),
            writes_before + 1,
            "round {round}: a loser reached the handler"
        );
        assert_eq!(get_etag(&app, &uri).await, won[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_modify_write_counter_loses_no_increment() {
    let (app, shared) = app();
    const CLIENTS: usize = 8;
    const INCREMENTS: usize = 12;
    let succeeded = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (app, succeeded, retries) = (app.clone(), succeeded.clone(), retries.clone());
            tokio::spawn(async move {
                for _ in 0..INCREMENTS {
                    loop {
                        let (status, etag, body) =
                            send(&app, Method::GET, "/items/counter", &[], String::new()).await;
                        assert_eq!(status, StatusCode::OK);
                        // A read racing the first versioning may come back unlabelled.
                        let Some(etag) = etag else {
                            retries.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        let next = body.parse::<i64>().unwrap() + 1;
                        let (status, _, _) = send(
                            &app,
                            Method::PUT,
                            "/items/counter",
                            &[("if-match", &etag)],
                            next.to_string(),
                        )
                        .await;
                        match status {
                            StatusCode::NO_CONTENT => {
                                succeeded.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => {
                                retries.fetch_add(1, Ordering::Relaxed);
                                tokio::task::yield_now().await;
                            }
                            other => panic!("unexpected {other}"),
                        }
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let done = succeeded.load(Ordering::SeqCst);
    assert_eq!(done, CLIENTS * INCREMENTS);
    let value = shared.values.lock().unwrap()["counter"];
    assert_eq!(value, done as i64, "lost updates");
    assert_eq!(shared.writes.load(Ordering::SeqCst), done);
    let (_, _, body) = send(&app, Method::GET, "/items/counter", &[], String::new()).await;
    assert_eq!(body, done.to_string());
}

/// Whether a GET with `If-None-Match: old` now gets the representation (the old tag
/// no longer matches).
async fn old_tag_is_dead(app: &Router, uri: &str, old: &str) -> bool {
    let (status, _, _) = send(
        app,
        Method::GET,
        uri,
        &[("if-none-match", old)],
        String::new(),
    )
    .await;
    status == StatusCode::OK
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_dropped_mid_handler_gives_a_fresh_version() {
    let (app, shared) = app();
    let old = get_etag(&app, "/items/1").await;

    // Drop the response future while the handler waits (a client that disconnected).
    // Boxed, so that `drop` really drops the future (a pinned stack future would live
    // to the end of the scope).
    let mut put = Box::pin(app.clone().oneshot(request(
        Method::PUT,
        "/items/1",
        &[("if-match", &old), ("x-block", "1")],
        "5".into(),
    )));
    tokio::select! {
        _ = &mut put => panic!("the handler is blocked; the write cannot finish"),
        () = shared.entered.notified() => {}
    }
    drop(put);

    assert!(
        eventually(|| old_tag_is_dead(&app, "/items/1", &old)).await,
        "the old ETag still matches after a dropped write"
    );
    let (status, current, _) = send(
        &app,
        Method::PUT,
        "/items/1",
        &[("if-match", &old)],
        "6".into(),
    )
    .await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    let current = current.unwrap();
    assert_ne!(current, old);
    // A subsequent write based on the fresh version works.
    let (status, _, _) = send(
        &app,
        Method::PUT,
        "/items/1",
        &[("if-match", &current)],
        "7".into(),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_write_task_gives_a_fresh_version() {
    let (app, shared) = app();
    let old = get_etag(&app, "/items/2").await;
    let task = tokio::spawn({
        let (app, old) = (app.clone(), old.clone());
        async move {
            send(
                &app,
                Method::PUT,
                "/items/2",
                &[("if-match", &old), ("x-block", "1")],
                "1".into(),
            )
            .await
        }
    });
    shared.entered.notified().await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());

    assert!(eventually(|| old_tag_is_dead(&app, "/items/2", &old)).await);
    let current = get_etag(&app, "/items/2").await;
    assert_ne!(current, old);
    let (status, _, _) = send(
        &app,
        Method::PUT,
        "/items/2",
        &[("if-match", &current)],
        "2".into(),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_write_with_a_timeout_gives_a_fresh_version() {
    let (app, shared) = app();
    let old = get_etag(&app, "/items/3").await;
    let headers = [("if-match", old.as_str()), ("x-block", "1")];
    let mut put = Box::pin(send(&app, Method::PUT, "/items/3", &headers, "1".into()));
    // Time the write out until its handler has started (however slow the machine),
    // then drop it: a client that gave up mid-handler.
    loop {
        let timed_out = tokio::time::timeout(Duration::from_millis(50), &mut put).await;
        assert!(
            timed_out.is_err(),
            "the handler is blocked; the write cannot finish"
        );
        if shared.writes.load(Ordering::SeqCst) == 1 {
            break;
        }
    }
    drop(put);
    assert!(eventually(|| old_tag_is_dead(&app, "/items/3", &old)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_writes_keep_the_old_version_under_contention() {
    let (app, shared) = app();
    let old = get_etag(&app, "/items/4").await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (app, old) = (app.clone(), old.clone());
            tokio::spawn(async move {
                send(
                    &app,
                    Method::PUT,
                    "/items/4",
                    &[("if-match", &old), ("x-status", "422")],
                    String::new(),
                )
                .await
            })
        })
        .collect();
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap().0 {
            StatusCode::UNPROCESSABLE_ENTITY => refused += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(refused >= 1);
    assert_eq!(shared.writes.load(Ordering::SeqCst), refused);
    // Nothing changed: the old ETag is still current and still works.
    assert_eq!(get_etag(&app, "/items/4").await, old);
    let (status, _, _) = send(
        &app,
        Method::PUT,
        "/items/4",
        &[("if-match", &old)],
        "9".into(),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// A memory store whose reserve (the compare-and-set that puts a lease) applies, then
/// answers late: a caller that gives up meanwhile leaves a lease it never learned of.
struct LateReserveStore {
    inner: MemoryStore,
}

#[async_trait::async_trait]
impl AtomicVersionStore for LateReserveStore {
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
        let outcome = self.inner.compare_and_set(key, expected, new).await;
        if new.is_some_and(|e| e.lease().is_some()) {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        outcome
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_dropped_during_its_reserve_releases_the_lease() {
    let store = Arc::new(LateReserveStore {
        inner: MemoryStore::new(),
    });
    let (app, shared) = app_with(PreconditionLayer::from_arc(store.clone()));
    let old = get_etag(&app, "/items/5").await;
    let headers = [("if-match", old.as_str())];
    let put = send(&app, Method::PUT, "/items/5", &headers, "1".into());
    assert!(tokio::time::timeout(Duration::from_millis(50), put)
        .await
        .is_err());
    // The handler never ran, so nothing changed: once the lease is released, the old
    // ETag is current again and a write with it succeeds.
    assert!(
        eventually(|| async {
            store
                .inner
                .load("/items/5")
                .await
                .unwrap()
                .is_some_and(|e| e.lease().is_none_or(|l| l.is_released()))
        })
        .await,
        "the lease of a dropped reserve was not released"
    );
    assert_eq!(shared.writes.load(Ordering::SeqCst), 0);
    assert_eq!(get_etag(&app, "/items/5").await, old);
    let (status, _, _) = send(&app, Method::PUT, "/items/5", &headers, "2".into()).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}
