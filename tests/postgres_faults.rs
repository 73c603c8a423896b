//! Faults against real Postgres: handler failures, missed deadlines and dropped
//! requests in the transactional mode (neither the data nor the version changes, and no
//! transaction leaks into the pool), and a Postgres server stopped and restarted under
//! a running app, in both modes (503 while down, recovery without an app restart, and
//! never a stale tag that still matches).

mod postgres_support;

use std::time::Duration;

use axum::{
    body::Body,
    http::{header, Request, Response, StatusCode},
    Router,
};
use postgres_support::{
    app, app_with, body_text, etag, get_req, items_table, pool_for, put_req, send, shared_pool,
    store, stored_body, unique, Mode, TempCluster,
};
use tower::{service_fn, Layer, ServiceExt};
use tower_precondition::{store::AtomicVersionStore, PgTransaction, PgTransactionalLayer};

const VERSIONS: &str = "tp_test_faults_versions";
const ITEMS: &str = "tp_test_faults_items";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn problem_code(response: Response<Body>) -> String {
    let body = body_text(response).await;
    let json: serde_json::Value = serde_json::from_str(&body).expect("problem+json");
    json["code"].as_str().expect("code").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn a_failing_handler_changes_neither_data_nor_version() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let (app, _) = app(Mode::Transactional, store.clone(), ITEMS);

    let id = unique("fail");
    let key = format!("/items/{id}");
    let e1 = etag(&send(&app, put_req(&id, "1", &[])).await).expect("etag");
    let before = store.load(&key).await.expect("load");

    // The handler writes "2" in the transaction, then answers 500.
    let failed = send(
        &app,
        put_req(&id, "2", &[("if-match", &e1), ("x-test", "fail")]),
    )
    .await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        etag(&failed).is_none(),
        "a failed write carries no validators"
    );
    assert_eq!(stored_body(&pool, ITEMS, &id).await.as_deref(), Some("1"));
    assert_eq!(
        store.load(&key).await.expect("load"),
        before,
        "version unchanged"
    );
    // So the old tag still works: nothing happened.
    let ok = send(&app, put_req(&id, "3", &[("if-match", &e1)])).await;
    assert_eq!(ok.status(), StatusCode::OK);

    // A failed create leaves neither an item nor a version row.
    let new_id = unique("fail-create");
    let failed = send(&app, put_req(&new_id, "1", &[("x-test", "fail")])).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(stored_body(&pool, ITEMS, &new_id).await, None);
    assert_eq!(
        store.load(&format!("/items/{new_id}")).await.expect("load"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn a_service_error_rolls_back() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let id = unique("error");
    let service = service_fn(|request: Request<Body>| async move {
        let tx = request
            .extensions()
            .get::<PgTransaction>()
            .cloned()
            .expect("transaction");
        let id = request
            .uri()
            .path()
            .trim_start_matches("/items/")
            .to_owned();
        tx.execute(
            &format!("INSERT INTO {ITEMS} (id, body) VALUES ($1, 'written')"),
            &[&id],
        )
        .await
        .expect("insert");
        Err::<Response<Body>, std::io::Error>(std::io::Error::other("handler blew up"))
    });
    let service = PgTransactionalLayer::new(store.clone()).layer(service);
    let result = service.oneshot(put_req(&id, "x", &[])).await;
    assert!(result.is_err(), "the service's error is passed on");
    assert_eq!(stored_body(&pool, ITEMS, &id).await, None);
    assert_eq!(
        store.load(&format!("/items/{id}")).await.expect("load"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn a_handler_past_its_deadline_is_rolled_back() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let (app, _) = app_with(
        Mode::Transactional,
        store.clone(),
        ITEMS,
        |l| l.handler_timeout(Duration::from_millis(200)),
        |l| l,
    );
    let id = unique("deadline");
    let e1 = etag(&send(&app, put_req(&id, "1", &[])).await).expect("etag");
    let hung = send(
        &app,
        put_req(&id, "2", &[("if-match", &e1), ("x-test", "hang")]),
    )
    .await;
    assert_eq!(hung.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(hung.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(problem_code(hung).await, "write_rolled_back");
    assert_eq!(stored_body(&pool, ITEMS, &id).await.as_deref(), Some("1"));
    let ok = send(&app, put_req(&id, "3", &[("if-match", &e1)])).await;
    assert_eq!(
        ok.status(),
        StatusCode::OK,
        "the old version is still current"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn a_dropped_request_rolls_back_and_leaks_no_transaction() {
    let _serial = SERIAL.lock().await;
    let Some(check) = shared_pool(2).await else {
        return;
    };
    // The app has ONE connection: if the abandoned write's connection went back to
    // the pool with its transaction open, the next write would run (and commit) in it.
    let url = postgres_support::database_url().expect("url");
    let pool = pool_for(&url, 1);
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let (app, state) = app(Mode::Transactional, store.clone(), ITEMS);

    let abandoned = unique("abandoned");
    let task = tokio::spawn({
        let app = app.clone();
        let id = abandoned.clone();
        async move { send(&app, put_req(&id, "lost", &[("x-test", "pause")])).await }
    });
    state.paused.notified().await; // written, not committed
    task.abort(); // the client went away
    assert!(task.await.expect_err("aborted").is_cancelled());

    let next = unique("next");
    let created = send(&app, put_req(&next, "kept", &[])).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(
        stored_body(&check, ITEMS, &next).await.as_deref(),
        Some("kept")
    );
    assert_eq!(
        stored_body(&check, ITEMS, &abandoned).await,
        None,
        "the abandoned write was rolled back, not committed by the next one"
    );
    assert_eq!(
        store
            .load(&format!("/items/{abandoned}"))
            .await
            .expect("load"),
        None
    );
}

/// Retries `request` until it is answered with something other than 503 (the pool
/// reconnecting after the restart), and returns that answer.
async fn after_recovery(app: &Router, request: impl Fn() -> Request<Body>) -> Response<Body> {
    for _ in 0..100 {
        let response = send(app, request()).await;
        if response.status() != StatusCode::SERVICE_UNAVAILABLE {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the app did not recover after Postgres came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_transactional() {
    let Some(cluster) = TempCluster::start() else {
        return;
    };
    let pool = pool_for(&cluster.url(), 4);
    let store = store(&pool, "versions").await;
    items_table(&pool, "items").await;
    let (app, state) = app(Mode::Transactional, store.clone(), "items");
    let id = "restart";
    let e1 = etag(&send(&app, put_req(id, "1", &[])).await).expect("etag");

    // A write holds its transaction (data written, not committed) when the server stops.
    let in_flight = tokio::spawn({
        let (app, e1) = (app.clone(), e1.clone());
        async move {
            send(
                &app,
                put_req(id, "2", &[("if-match", &e1), ("x-test", "pause")]),
            )
            .await
        }
    });
    state.paused.notified().await;
    cluster.stop_server();
    state.resume.notify_one();
    let response = in_flight.await.expect("in-flight write");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let code = problem_code(response).await;
    assert!(
        code == "write_rolled_back" || code == "commit_outcome_unknown",
        "{code}"
    );

    // While it is down, writes fail closed.
    let down = send(&app, put_req(id, "3", &[("if-match", &e1)])).await;
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(down.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(problem_code(down).await, "version_store_unavailable");

    cluster.start_server();
    // The same app (same pool) recovers, and the server rolled the in-flight write
    // back with its version: the old tag is still the current one.
    let recovered = after_recovery(&app, || put_req(id, "4", &[("if-match", &e1)])).await;
    assert_eq!(recovered.status(), StatusCode::OK);
    assert_eq!(stored_body(&pool, "items", id).await.as_deref(), Some("4"));
    let read = send(&app, get_req(id)).await;
    assert_eq!(etag(&read), etag(&recovered));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_store_mode() {
    let Some(cluster) = TempCluster::start() else {
        return;
    };
    let pool = pool_for(&cluster.url(), 4);
    let store = store(&pool, "versions").await;
    items_table(&pool, "items").await;
    let (app, state) = app_with(
        Mode::Store,
        store.clone(),
        "items",
        |l| l,
        |l| l.lease(Duration::from_secs(3)),
    );
    let id = "restart";
    let e1 = etag(&send(&app, put_req(id, "1", &[])).await).expect("etag");

    // A write is reserved and has written its data (autocommit) when the server stops:
    // its settle cannot reach the store, so its lease stays behind.
    let in_flight = tokio::spawn({
        let (app, e1) = (app.clone(), e1.clone());
        async move {
            send(
                &app,
                put_req(id, "2", &[("if-match", &e1), ("x-test", "pause")]),
            )
            .await
        }
    });
    state.paused.notified().await;
    cluster.stop_server();
    state.resume.notify_one();
    let response = in_flight.await.expect("in-flight write");
    assert!(
        response.status() == StatusCode::OK || response.status() == StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        response.status()
    );
    assert!(
        etag(&response).is_none(),
        "an unsettled write vouches for no version"
    );

    let down = send(&app, put_req(id, "3", &[("if-match", &e1)])).await;
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(down.headers().contains_key(header::RETRY_AFTER));

    cluster.start_server();
    // The old tag must never match again (the data did change): 409 while the stranded
    // lease lives, then 412 once it is taken over with a fresh version.
    let mut saw_412 = None;
    for _ in 0..100 {
        let response = send(&app, put_req(id, "5", &[("if-match", &e1)])).await;
        match response.status() {
            StatusCode::PRECONDITION_FAILED => {
                saw_412 = etag(&response);
                break;
            }
            StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("a stale tag must not pass after the outage: {other}"),
        }
    }
    let fresh = saw_412.expect("the lease was taken over within the retries");
    assert_ne!(fresh, e1);
    assert_eq!(stored_body(&pool, "items", id).await.as_deref(), Some("2"));
    let ok = send(&app, put_req(id, "6", &[("if-match", &fresh)])).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(
        store
            .load("/items/restart")
            .await
            .expect("load")
            .and_then(|e| e.version().map(|v| v.etag().to_string())),
        etag(&ok)
    );
}
