//! Findings 8.1 and 7.4 in store mode over the real Postgres store, over real sockets:
//! while clients stall their uploads of a resource, a valid conditional write of it goes
//! through (the lease is taken once the body is in hand), and a body cut off mid-upload
//! changes nothing. (Memory and Redis store mode run the same case against the
//! `axum_memory` / `axum_redis` example servers; the transactional mode has
//! `transactional_stalled_upload.rs`.)

#[path = "common/items_contract.rs"]
mod items_contract;
mod postgres_support;

use std::time::{Duration, Instant};

use http::header;
use items_contract::{partial_put, HttpClient};
use postgres_support::{app, items_table, shared_pool, store, unique, Mode};
use serde_json::json;

const VERSIONS: &str = "tp_test_store_stall_versions";
const ITEMS: &str = "tp_test_store_stall_items";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn finding_8_1_store_mode_over_postgres_lets_a_valid_write_through_while_uploads_stall() {
    let Some(pool) = shared_pool(16).await else {
        return;
    };
    let store = store(&pool, VERSIONS).await;
    items_table(&pool, ITEMS).await;
    let (app, _) = app(Mode::Store, store, ITEMS);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let client = HttpClient::new(addr);
    let path = format!("/items/{}", unique("stall"));

    let created = client.put(&path, &[], &json!({"name": "lamp"})).await;
    assert!(created.status.is_success(), "{created:?}");
    let tag = client.get(&path, &[]).await.etag().expect("ETag");

    // Ten clients send the head of a conditional PUT and part of its body, then stall.
    let head = format!("if-match: {tag}\r\n");
    let mut stalled = Vec::new();
    for _ in 0..10 {
        stalled.push(partial_put(addr, &path, &head, 200, 20).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let write = client
        .put(
            &path,
            &[(header::IF_MATCH, tag.as_str())],
            &json!({"name": "desk"}),
        )
        .await;
    assert!(
        write.status.is_success(),
        "a valid write while uploads stall: {write:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the valid write waited {:?} behind stalled uploads",
        started.elapsed()
    );
    let tag = write.etag().expect("ETag");
    drop(stalled);

    // A body cut off mid-upload: nothing changes, and the current ETag stays valid.
    let head = format!("if-match: {tag}\r\n");
    drop(partial_put(addr, &path, &head, 200, 30).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = client.get(&path, &[]).await;
    assert_eq!(
        read.json()["name"],
        json!("desk"),
        "a cut-off body was written"
    );
    assert_eq!(read.etag().as_deref(), Some(tag.as_str()));
    let write = client
        .put(
            &path,
            &[(header::IF_MATCH, tag.as_str())],
            &json!({"name": "chair"}),
        )
        .await;
    assert!(write.status.is_success(), "{write:?}");
    server.abort();
}
