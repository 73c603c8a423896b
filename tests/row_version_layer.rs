//! `RowVersionLayer` in process, over a handler that keeps its rows in a map and
//! checks each write against the row it holds (the locked-row path), so that every
//! answer the layer gives can be seen without a database. The one-statement path
//! against the real Postgres is in `row_version_postgres.rs`.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use axum::{
    extract::{Path, State},
    http::{Method, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use tower_precondition::{
    row_version::{RowPrecondition, RowVersion, RowVersionLayer},
    PreconditionPolicy,
};

#[path = "common/oneshot.rs"]
mod oneshot;
use oneshot::send;

/// 2026-12-02T04:22:55Z, in microseconds.
const T: i64 = 1_796_185_375_000_000;

/// A row: its version, its modification time (microseconds), its body.
type Row = (i64, Option<i64>, String);

#[derive(Clone, Default)]
struct Table {
    rows: Arc<Mutex<HashMap<String, Row>>>,
    next: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Table {
    fn insert(&self, id: &str, version: i64, modified: Option<i64>, body: &str) {
        let row = (version, modified, body.to_owned());
        self.rows.lock().unwrap().insert(id.to_owned(), row);
    }
}

async fn get_row(Path(id): Path<String>, State(table): State<Table>) -> Response {
    table.calls.fetch_add(1, Ordering::SeqCst);
    let row = table.rows.lock().unwrap().get(&id).cloned();
    match row {
        Some((version, modified, body)) => (
            RowVersion::from_columns(version, modified),
            [("content-type", "text/plain")],
            body,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn put_row(
    Path(id): Path<String>,
    State(table): State<Table>,
    condition: RowPrecondition,
    body: String,
) -> Response {
    table.calls.fetch_add(1, Ordering::SeqCst);
    let mut rows = table.rows.lock().unwrap();
    let current = rows
        .get(&id)
        .map(|(v, m, _)| RowVersion::from_columns(*v, *m));
    if let Err(refused) = condition.check(current.as_ref()) {
        return refused.into_response();
    }
    if body == "fail" {
        // A handler error after the check: no validators may go out with it.
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            RowVersion::from_columns(99, None),
            "failed",
        )
            .into_response();
    }
    let version = 100 + table.next.fetch_add(1, Ordering::SeqCst) as i64;
    rows.insert(id, (version, Some(T + 5_000_000), body));
    (
        RowVersion::from_columns(version, Some(T + 5_000_000)),
        "saved",
    )
        .into_response()
}

fn app(table: &Table, layer: RowVersionLayer) -> Router {
    Router::new()
        .route("/rows/{id}", get(get_row).put(put_row).post(put_row))
        .with_state(table.clone())
        .route_layer(layer)
}

async fn put(app: &Router, uri: &str, headers: &[(&str, &str)], body: &str) -> oneshot::Reply {
    use tower::ServiceExt;
    let mut request = axum::http::Request::put(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(
            request
                .body(axum::body::Body::from(body.to_owned()))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    oneshot::Reply {
        status: parts.status,
        headers: parts.headers,
        body: axum::body::to_bytes(body, usize::MAX).await.unwrap(),
    }
}

#[tokio::test]
async fn a_read_gets_the_rows_validators_and_a_304_when_they_match() {
    let table = Table::default();
    table.insert("1", 7, Some(T + 264_513), "seven");
    let app = app(&table, RowVersionLayer::new());

    let read = send(&app, Method::GET, "/rows/1", &[]).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.etag(), Some("\"7\""));
    let date = read.header("last-modified").expect("a date").to_owned();
    assert_eq!(date, "Wed, 02 Dec 2026 04:22:55 GMT");
    assert_eq!(&read.body[..], b"seven");

    for headers in [
        vec![("if-none-match", "\"7\"")],
        vec![("if-none-match", "W/\"6\", W/\"7\"")],
        vec![("if-modified-since", date.as_str())],
    ] {
        let revalidated = send(&app, Method::GET, "/rows/1", &headers).await;
        assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED, "{headers:?}");
        assert!(revalidated.body.is_empty());
        assert_eq!(revalidated.etag(), Some("\"7\""));
        assert_eq!(revalidated.header("content-type"), None);
    }
    let head = send(&app, Method::HEAD, "/rows/1", &[("if-none-match", "\"7\"")]).await;
    assert_eq!(head.status, StatusCode::NOT_MODIFIED);

    // Another version, or a malformed If-None-Match (ignored on reads): the full body.
    for headers in [
        [("if-none-match", "\"6\"")],
        [("if-none-match", "not a tag")],
    ] {
        let full = send(&app, Method::GET, "/rows/1", &headers).await;
        assert_eq!(full.status, StatusCode::OK, "{headers:?}");
        assert_eq!(&full.body[..], b"seven");
    }
    // If-Match on a read that names another version: 412 with the current one.
    let stale = send(&app, Method::GET, "/rows/1", &[("if-match", "\"6\"")]).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(stale.code(), "etag_mismatch");
    assert_eq!(stale.etag(), Some("\"7\""));
}

#[tokio::test]
async fn a_missing_row_is_the_handlers_404_whatever_the_preconditions() {
    let table = Table::default();
    let app = app(&table, RowVersionLayer::new());
    for headers in [
        vec![],
        vec![("if-none-match", "*")],
        vec![("if-modified-since", "Wed, 02 Dec 2026 04:22:55 GMT")],
    ] {
        let read = send(&app, Method::GET, "/rows/none", &headers).await;
        assert_eq!(read.status, StatusCode::NOT_FOUND, "{headers:?}");
        assert_eq!(read.etag(), None);
        assert_eq!(read.header("last-modified"), None);
    }
}

#[tokio::test]
async fn a_refused_write_is_a_412_with_the_current_validators() {
    let table = Table::default();
    table.insert("1", 7, Some(T), "seven");
    let app = app(&table, RowVersionLayer::new());

    let stale = put(&app, "/rows/1", &[("if-match", "\"6\"")], "new").await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    let problem = stale.problem();
    assert_eq!(problem["code"], "etag_mismatch");
    assert_eq!(problem["current_etag"], "\"7\"");
    assert_eq!(stale.etag(), Some("\"7\""));
    assert_eq!(
        stale.header("last-modified"),
        Some("Wed, 02 Dec 2026 04:22:55 GMT")
    );

    let exists = put(&app, "/rows/1", &[("if-none-match", "*")], "new").await;
    assert_eq!(exists.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(exists.code(), "resource_exists");

    let missing = put(&app, "/rows/2", &[("if-match", "*")], "new").await;
    assert_eq!(missing.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(missing.code(), "resource_missing");
    assert_eq!(missing.etag(), None);

    // Nothing changed, and the current tag still passes.
    let fresh = put(&app, "/rows/1", &[("if-match", "\"7\"")], "new").await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(fresh.etag(), Some("\"100\""));
    assert_eq!(
        fresh.header("last-modified"),
        Some("Wed, 02 Dec 2026 04:23:00 GMT")
    );
    let replay = put(&app, "/rows/1", &[("if-match", "\"7\"")], "again").await;
    assert_eq!(replay.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(replay.etag(), Some("\"100\""));
}

#[tokio::test]
async fn validators_can_be_left_off_a_412() {
    let table = Table::default();
    table.insert("1", 7, Some(T), "seven");
    let app = app(&table, RowVersionLayer::new().validators_on_412(false));
    let stale = put(&app, "/rows/1", &[("if-match", "\"6\"")], "new").await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(stale.etag(), None);
    assert_eq!(stale.header("last-modified"), None);
    assert!(stale.problem().get("current_etag").is_none());
}

#[tokio::test]
async fn bad_input_and_the_policy_are_answered_before_the_handler() {
    let table = Table::default();
    table.insert("1", 7, Some(T), "seven");
    let app = app(
        &table,
        RowVersionLayer::new().precondition_policy(PreconditionPolicy::Strict),
    );
    let malformed = put(&app, "/rows/1", &[("if-match", "\"unterminated")], "x").await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    malformed.problem();
    for headers in [
        vec![],
        vec![("if-match", "*")],
        vec![("if-none-match", "\"3\"")],
    ] {
        let refused = put(&app, "/rows/1", &headers, "x").await;
        assert_eq!(
            refused.status,
            StatusCode::PRECONDITION_REQUIRED,
            "{headers:?}"
        );
        refused.problem();
    }
    assert_eq!(table.calls.load(Ordering::SeqCst), 0, "no handler ran");
    // Reads are never refused for the policy.
    assert_eq!(
        send(&app, Method::GET, "/rows/1", &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_row_without_a_date_sends_none_and_fails_date_conditions_closed() {
    let table = Table::default();
    table.insert("1", 7, None, "seven");
    let app = app(&table, RowVersionLayer::new());
    let read = send(&app, Method::GET, "/rows/1", &[]).await;
    assert_eq!(read.etag(), Some("\"7\""));
    assert_eq!(read.header("last-modified"), None);
    let ims = [("if-modified-since", "Fri, 01 Jan 9999 00:00:00 GMT")];
    let read = send(&app, Method::GET, "/rows/1", &ims).await;
    assert_eq!(
        read.status,
        StatusCode::OK,
        "an unknown date is never a 304"
    );
    let since = [("if-unmodified-since", "Fri, 01 Jan 9999 00:00:00 GMT")];
    let write = put(&app, "/rows/1", &since, "x").await;
    assert_eq!(write.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(write.etag(), Some("\"7\""));
    assert_eq!(write.header("last-modified"), None);
}

#[tokio::test]
async fn two_writes_in_one_second_fail_a_date_from_before_them() {
    let table = Table::default();
    // Version 8 landed in the same second as version 7: the marker says so.
    table.insert("1", 8, Some(T + 999_999), "eight");
    let app = app(&table, RowVersionLayer::new());
    let read = send(&app, Method::GET, "/rows/1", &[]).await;
    let date = read.header("last-modified").unwrap().to_owned();
    assert_eq!(date, "Wed, 02 Dec 2026 04:22:55 GMT");
    let since = [("if-unmodified-since", date.as_str())];
    let write = put(&app, "/rows/1", &since, "x").await;
    assert_eq!(write.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(write.code(), "modified_since");
    let ims = [("if-modified-since", date.as_str())];
    assert_eq!(
        send(&app, Method::GET, "/rows/1", &ims).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_failed_write_carries_no_validators() {
    let table = Table::default();
    table.insert("1", 7, Some(T), "seven");
    let app = app(&table, RowVersionLayer::new());
    let failed = put(&app, "/rows/1", &[("if-match", "\"7\"")], "fail").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.etag(), None);
    assert_eq!(failed.header("last-modified"), None);
}

#[tokio::test]
async fn other_methods_pass_and_a_handler_outside_the_layer_is_a_500() {
    let table = Table::default();
    // POST is not a write method by default: no RowPrecondition, so the extractor
    // refuses (nothing is written unconditioned).
    let app = app(&table, RowVersionLayer::new());
    let reply = oneshot::send(&app, Method::POST, "/rows/1", &[]).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.code(), "missing_row_precondition");
    assert_eq!(table.calls.load(Ordering::SeqCst), 0);
    // Listed as a write method, it is conditioned like the others.
    let app = app_with_post(&table);
    let reply = oneshot::send(&app, Method::POST, "/rows/1", &[("if-match", "\"1\"")]).await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);
}

fn app_with_post(table: &Table) -> Router {
    app(
        table,
        RowVersionLayer::new().write_methods([Method::PUT, Method::POST]),
    )
}
