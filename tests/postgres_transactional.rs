//! The transactional mode's HTTP behaviour against real Postgres: preconditions, the
//! version committed with the data, rollbacks, the row lock between writers, and the
//! interplay with store-mode leases on the same table.

mod postgres_support;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    body::Body,
    http::{header, Request, StatusCode},
    routing::put,
    Router,
};
use postgres_support::{
    app, app_with, body_text, etag, get_req, items_table, put_req, send, shared_pool, store,
    stored_body, unique, Mode,
};
use tower_precondition::{
    store::{AtomicVersionStore, CasOutcome, Entry, Lease, LeaseToken, Version},
    EntityTag, PgTransaction, PgTransactionalLayer,
};

const VERSIONS: &str = "tp_test_tx_versions";
const ITEMS: &str = "tp_test_tx_items";

/// Tests in this file share tables; running them one at a time keeps the number of
/// connections to the shared server small.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn create_read_replace_delete_cycle() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let (app, _) = app(Mode::Transactional, store.clone(), ITEMS);
    let id = unique("cycle");

    let created = send(&app, put_req(&id, r#"{"v":1}"#, &[("if-none-match", "*")])).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let e1 = etag(&created).expect("a create carries the new ETag");
    assert!(created.headers().contains_key(header::LAST_MODIFIED));

    let read = send(&app, get_req(&id)).await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(etag(&read).as_deref(), Some(e1.as_str()));
    assert_eq!(body_text(read).await, r#"{"v":1}"#);

    let not_modified = send(
        &app,
        Request::get(format!("/items/{id}"))
            .header(header::IF_NONE_MATCH, &e1)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);

    let replaced = send(&app, put_req(&id, r#"{"v":2}"#, &[("if-match", &e1)])).await;
    assert_eq!(replaced.status(), StatusCode::OK);
    let e2 = etag(&replaced).expect("new ETag");
    assert_ne!(e1, e2);

    let stale = send(&app, put_req(&id, r#"{"v":3}"#, &[("if-match", &e1)])).await;
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        etag(&stale).as_deref(),
        Some(e2.as_str()),
        "412 names the current tag"
    );
    assert_eq!(
        stored_body(&pool, ITEMS, &id).await.as_deref(),
        Some(r#"{"v":2}"#)
    );

    let again = send(&app, put_req(&id, r#"{"v":3}"#, &[("if-none-match", "*")])).await;
    assert_eq!(again.status(), StatusCode::PRECONDITION_FAILED);

    let deleted = send(
        &app,
        postgres_support::delete_req(&id, &[("if-match", &e2)]),
    )
    .await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert!(etag(&deleted).is_none());
    assert_eq!(stored_body(&pool, ITEMS, &id).await, None);
    assert_eq!(
        store.load(&format!("/items/{id}")).await.expect("load"),
        None,
        "a successful DELETE removes the version row in the same transaction"
    );
    assert_eq!(
        send(&app, get_req(&id)).await.status(),
        StatusCode::NOT_FOUND
    );

    let recreated = send(&app, put_req(&id, r#"{"v":4}"#, &[("if-none-match", "*")])).await;
    assert_eq!(recreated.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn the_handlers_strong_etag_becomes_the_version() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let (app, _) = app(Mode::Transactional, store.clone(), ITEMS);
    let id = unique("handler-etag");
    let tag = format!("\"{}\"", unique("mine"));

    let created = send(&app, put_req(&id, "1", &[("x-etag", &tag)])).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(etag(&created).as_deref(), Some(tag.as_str()));
    let entry = store
        .load(&format!("/items/{id}"))
        .await
        .expect("load")
        .expect("versioned");
    assert_eq!(entry.version().expect("version").etag().to_string(), tag);
    assert!(
        entry.lease().is_none(),
        "the transactional mode never leaves a lease"
    );

    let next = send(&app, put_req(&id, "2", &[("if-match", &tag)])).await;
    assert_eq!(next.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn unconditional_writes_get_428_when_required() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let (app, _) = app_with(
        Mode::Transactional,
        store,
        ITEMS,
        |l| l.require_precondition(true),
        |l| l,
    );
    let id = unique("required");
    let refused = send(&app, put_req(&id, "1", &[])).await;
    assert_eq!(refused.status(), StatusCode::PRECONDITION_REQUIRED);
    assert_eq!(
        refused.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    assert_eq!(stored_body(&pool, ITEMS, &id).await, None);
    let malformed = send(&app, put_req(&id, "1", &[("if-match", "not-a-tag")])).await;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let created = send(&app, put_req(&id, "1", &[("if-none-match", "*")])).await;
    assert_eq!(created.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn a_refusing_handler_changes_neither_data_nor_version() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let (app, _) = app(Mode::Transactional, store, ITEMS);
    let id = unique("refuse");
    let e1 = etag(&send(&app, put_req(&id, "1", &[])).await).expect("etag");

    // The handler writes, then answers 422: the write is rolled back.
    let refused = send(
        &app,
        put_req(&id, "2", &[("if-match", &e1), ("x-test", "refuse")]),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(stored_body(&pool, ITEMS, &id).await.as_deref(), Some("1"));
    let read = send(&app, get_req(&id)).await;
    assert_eq!(
        etag(&read).as_deref(),
        Some(e1.as_str()),
        "the version is unchanged"
    );

    // A create that the handler refuses leaves no version row behind either.
    let new_id = unique("refuse-create");
    let refused = send(&app, put_req(&new_id, "1", &[("x-test", "refuse")])).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let created = send(&app, put_req(&new_id, "1", &[("if-none-match", "*")])).await;
    assert_eq!(created.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn a_concurrent_writer_waits_for_the_row_then_fails_its_precondition() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(6).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let (app, state) = app(Mode::Transactional, store, ITEMS);
    let id = unique("wait");
    let e1 = etag(&send(&app, put_req(&id, "0", &[])).await).expect("etag");

    // A holds the row: its handler pauses after writing.
    let first = tokio::spawn({
        let app = app.clone();
        let (id, e1) = (id.clone(), e1.clone());
        async move {
            send(
                &app,
                put_req(&id, "A", &[("if-match", &e1), ("x-test", "pause")]),
            )
            .await
        }
    });
    state.paused.notified().await;
    // B sends the same If-Match: it queues on A's row lock.
    let second = tokio::spawn({
        let app = app.clone();
        let (id, e1) = (id.clone(), e1.clone());
        async move { send(&app, put_req(&id, "B", &[("if-match", &e1)])).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !second.is_finished(),
        "B cannot finish while A holds the row"
    );
    state.resume.notify_one();

    let first = first.await.expect("A");
    assert_eq!(first.status(), StatusCode::OK);
    let e2 = etag(&first).expect("A's tag");
    let second = second.await.expect("B");
    assert_eq!(
        second.status(),
        StatusCode::PRECONDITION_FAILED,
        "B is evaluated against A's committed version: a clean 412, not a 409"
    );
    assert_eq!(etag(&second).as_deref(), Some(e2.as_str()));
    assert_eq!(stored_body(&pool, ITEMS, &id).await.as_deref(), Some("A"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn a_writer_that_waits_past_lock_timeout_gets_409() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(6).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let (app, state) = app_with(
        Mode::Transactional,
        store,
        ITEMS,
        |l| l.lock_timeout(Duration::from_millis(200)),
        |l| l,
    );
    let id = unique("lock-timeout");
    let e1 = etag(&send(&app, put_req(&id, "0", &[])).await).expect("etag");
    let first = tokio::spawn({
        let app = app.clone();
        let (id, e1) = (id.clone(), e1.clone());
        async move {
            send(
                &app,
                put_req(&id, "A", &[("if-match", &e1), ("x-test", "pause")]),
            )
            .await
        }
    });
    state.paused.notified().await;
    let second = send(&app, put_req(&id, "B", &[("if-match", &e1)])).await;
    assert_eq!(second.status(), StatusCode::CONFLICT);
    assert!(second.headers().contains_key(header::RETRY_AFTER));
    state.resume.notify_one();
    assert_eq!(first.await.expect("A").status(), StatusCode::OK);
    assert_eq!(stored_body(&pool, ITEMS, &id).await.as_deref(), Some("A"));
}

fn tag(s: &str) -> EntityTag {
    EntityTag::strong(s).expect("tag")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn store_mode_leases_on_the_same_table_are_respected() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let (app, _) = app(Mode::Transactional, store.clone(), ITEMS);

    // A live lease: a store-mode write is in flight.
    let id = unique("live-lease");
    let key = format!("/items/{id}");
    let v0 = Version::new(tag("v0"), SystemTime::now()).expect("version");
    let live = Entry::from_parts(
        Some(v0.clone()),
        Some(Lease::from_parts(
            LeaseToken::random(),
            store.clock_millis().await.expect("clock") + 60_000,
        )),
    )
    .expect("entry");
    assert_eq!(
        store
            .compare_and_set(&key, None, Some(&live))
            .await
            .expect("cas"),
        CasOutcome::Applied
    );
    let refused = send(&app, put_req(&id, "1", &[("if-match", "\"v0\"")])).await;
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    assert_eq!(stored_body(&pool, ITEMS, &id).await, None);

    // An expired lease: its writer died, maybe after writing. The old tag must fail.
    let id = unique("dead-lease");
    let key = format!("/items/{id}");
    let dead = Entry::from_parts(
        Some(v0),
        Some(Lease::from_parts(LeaseToken::random(), 1_000)),
    )
    .expect("entry");
    store
        .compare_and_set(&key, None, Some(&dead))
        .await
        .expect("cas");
    let stale = send(&app, put_req(&id, "1", &[("if-match", "\"v0\"")])).await;
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    let fresh = etag(&stale).expect("412 carries the fresh tag");
    assert_ne!(fresh, "\"v0\"");
    let entry = store.load(&key).await.expect("load").expect("entry");
    assert!(entry.lease().is_none(), "the dead lease was cleared");
    assert_eq!(entry.version().expect("version").etag().to_string(), fresh);
    let ok = send(&app, put_req(&id, "1", &[("if-match", &fresh)])).await;
    assert_eq!(ok.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn the_transaction_is_closed_to_the_handler_after_the_response() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = shared_pool(4).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let kept: Arc<Mutex<Option<PgTransaction>>> = Arc::default();
    let app = Router::new()
        .route(
            "/keep/{id}",
            put({
                let kept = kept.clone();
                move |tx: PgTransaction| async move {
                    tx.query_one("SELECT 1", &[]).await.expect("usable inside");
                    *kept.lock().unwrap() = Some(tx);
                    StatusCode::NO_CONTENT
                }
            }),
        )
        .route(
            "/unlayered",
            put(|_tx: PgTransaction| async { StatusCode::OK }),
        )
        .layer(PgTransactionalLayer::new(store).key_fn(|parts| {
            parts
                .uri
                .path()
                .starts_with("/keep/")
                .then(|| parts.uri.path().to_owned())
        }));
    let id = unique("keep");
    let response = send(
        &app,
        Request::put(format!("/keep/{id}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let tx = kept.lock().unwrap().take().expect("kept a clone");
    let error = tx.query_one("SELECT 1", &[]).await.expect_err("finished");
    assert!(error.is_finished(), "{error}");

    // A handler that asks for a transaction on a route the layer does not version.
    let missing = send(
        &app,
        Request::put("/unlayered").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(missing.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        missing.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
}
