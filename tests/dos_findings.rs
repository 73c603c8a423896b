//! The denial-of-service and disclosure findings of the hostile review of 0.1.0 that
//! the core layer answers (issue "No client can lock, grow or probe the stores"), one
//! test each, named for the finding. Each failed on 0.1.0. Through a real axum
//! `Router` over the memory store.

#[path = "common/oneshot.rs"]
mod oneshot;

use std::{sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::Request,
    http::{header, Method, Response as HttpResponse, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use oneshot::{send, Reply};
use tower_precondition::{MemoryStore, PreconditionLayer};

/// Items visible to their owner only: anyone else gets 404, as if they did not exist.
async fn owned_read(request: Request) -> Response {
    if request
        .headers()
        .get("x-user")
        .is_some_and(|u| u == "owner")
    {
        (StatusCode::OK, "secret").into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn owned_write(request: Request) -> Response {
    let status = request
        .headers()
        .get("x-status")
        .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(StatusCode::OK);
    if let Some(ms) = request
        .headers()
        .get("x-sleep-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    status.into_response()
}

fn app(layer: PreconditionLayer) -> Router {
    Router::new()
        .route("/items/{id}", get(owned_read).put(owned_write))
        .route_layer(layer)
}

/// The per-resource decision the examples make: only the owner may see or change items.
fn owner_only(layer: PreconditionLayer) -> PreconditionLayer {
    layer.authorize(|parts| {
        let owner = parts.headers.get("x-user").is_some_and(|u| u == "owner");
        async move {
            if owner {
                Ok(())
            } else {
                let mut refusal = HttpResponse::new(Bytes::from_static(b"no such item"));
                *refusal.status_mut() = StatusCode::NOT_FOUND;
                Err(refusal)
            }
        }
    })
}

async fn owner_etag(app: &Router) -> String {
    let r = send(app, Method::GET, "/items/1", &[("x-user", "owner")]).await;
    assert_eq!(r.status, StatusCode::OK);
    r.headers[header::ETAG].to_str().unwrap().to_owned()
}

fn assert_no_validators(r: &Reply) {
    assert!(r.headers.get(header::ETAG).is_none(), "{:?}", r.headers);
    assert!(
        r.headers.get(header::LAST_MODIFIED).is_none(),
        "{:?}",
        r.headers
    );
    assert!(!String::from_utf8_lossy(&r.body).contains("current_etag"));
}

// ---------------------------------------------------------------------------------
// 2. Preconditions are answered before the application decides
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn finding_8_2_an_anonymous_read_of_a_hidden_resource_gets_no_304_by_default() {
    let app = app(PreconditionLayer::new(MemoryStore::new()));
    let etag = owner_etag(&app).await;
    for (name, value) in [("if-none-match", "*"), ("if-none-match", etag.as_str())] {
        let r = send(&app, Method::GET, "/items/1", &[(name, value)]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{name}: {value}");
        assert_no_validators(&r);
    }
    let r = send(&app, Method::GET, "/items/1", &[("if-match", "\"guess\"")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "no 412 oracle on reads");
    // The owner still gets the 304.
    let r = send(
        &app,
        Method::GET,
        "/items/1",
        &[("x-user", "owner"), ("if-none-match", &etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
}

#[tokio::test]
async fn finding_8_2_the_access_check_runs_before_any_precondition() {
    let app = app(owner_only(
        PreconditionLayer::new(MemoryStore::new()).short_circuit_reads(true),
    ));
    let etag = owner_etag(&app).await;
    // Reads: no 304 and no validators for anyone the application would refuse.
    let r = send(&app, Method::GET, "/items/1", &[("if-none-match", "*")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(&r.body[..], b"no such item");
    assert_no_validators(&r);
    // Writes: no 412 carrying the current ETag to a stranger.
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", "\"stale\"")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_no_validators(&r);
    // The owner is evaluated as before.
    let r = send(
        &app,
        Method::PUT,
        "/items/1",
        &[("x-user", "owner"), ("if-match", "\"stale\"")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = send(
        &app,
        Method::PUT,
        "/items/1",
        &[("x-user", "owner"), ("if-match", &etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn finding_8_2_a_412_can_leave_the_current_validators_off() {
    let app = app(PreconditionLayer::new(MemoryStore::new()).validators_on_412(false));
    owner_etag(&app).await;
    let r = send(
        &app,
        Method::PUT,
        "/items/1",
        &[("x-user", "owner"), ("if-match", "\"stale\"")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_no_validators(&r);
}

// ---------------------------------------------------------------------------------
// 3. Stores grow without bound
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn finding_8_3_reads_of_random_paths_cannot_grow_the_memory_store_past_its_bound() {
    let store = Arc::new(MemoryStore::with_capacity(64));
    let app = Router::new()
        .route("/items/{id}", get(|| async { "every id answers 200" }))
        .layer(PreconditionLayer::from_arc(store.clone()));
    for i in 0..2_000 {
        let r = send(&app, Method::GET, &format!("/items/{i}"), &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(store.len() <= store.capacity(), "{} entries", store.len());
    }
    assert!(store.capacity() <= 64);
    // An evicted version never matches again: its key has no entry, so its old tag fails.
    let r = send(&app, Method::GET, "/items/0", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn finding_8_3_reads_the_app_answers_404_leave_no_entries() {
    let store = Arc::new(MemoryStore::new());
    let app = app(PreconditionLayer::from_arc(store.clone()));
    for i in 0..500 {
        let r = send(&app, Method::GET, &format!("/items/{i}"), &[]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(store.len(), 0);
}

#[tokio::test]
async fn finding_8_3_timed_out_writes_to_missing_ids_leave_no_entries() {
    let store = Arc::new(MemoryStore::new());
    let app =
        app(PreconditionLayer::from_arc(store.clone()).handler_timeout(Duration::from_millis(20)));
    for i in 0..50 {
        let uri = format!("/items/missing-{i}");
        let r = send(&app, Method::PUT, &uri, &[("x-sleep-ms", "200")]).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        let r = send(&app, Method::PUT, &uri, &[("x-status", "500")]).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(
        store.len(),
        0,
        "a write of unknown outcome to a resource with no version leaves it with none"
    );
}
