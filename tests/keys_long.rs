//! Finding 8.4, keys the store cannot hold: a 3,000-byte path must get a normal write
//! flow in every store (the layers store a fixed-size digest form of long keys), and
//! two long keys that share a long prefix must stay two resources.

mod postgres_support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, Request, Response, StatusCode},
    response::IntoResponse,
    routing::get,
    Extension, Router,
};
use postgres_support::{send, shared_pool, store};
use tower_precondition::{
    key::{bounded_key, MAX_KEY_LEN},
    store::{AtomicVersionStore, PostgresStore},
    MemoryStore, PgTransaction, PgTransactionalLayer, PreconditionLayer, Reservation,
};

type Data = Arc<Mutex<HashMap<String, String>>>;

async fn read_item(State(data): State<Data>, Path(id): Path<String>) -> Result<String, StatusCode> {
    let data = data.lock().map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    data.get(&id).cloned().ok_or(StatusCode::NOT_FOUND)
}

/// Store mode: writes the item and echoes the key the layer reserved.
async fn write_item(
    State(data): State<Data>,
    Path(id): Path<String>,
    Extension(reservation): Extension<Reservation>,
    body: String,
) -> Response<Body> {
    let Ok(mut data) = data.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let status = match data.insert(id, body) {
        Some(_) => StatusCode::OK,
        None => StatusCode::CREATED,
    };
    (status, [("x-key", reservation.key().to_owned())]).into_response()
}

/// Transactional mode: the data is beside the point here, only the version row.
async fn write_in_tx(_tx: PgTransaction) -> StatusCode {
    StatusCode::NO_CONTENT
}

fn store_app(layer: PreconditionLayer) -> Router {
    Router::new()
        .route("/items/{id}", get(read_item).put(write_item))
        .with_state(Data::default())
        .layer(layer)
}

fn tx_app(layer: PgTransactionalLayer) -> Router {
    Router::new()
        .route("/items/{id}", get(|| async { "item" }).put(write_in_tx))
        .layer(layer)
}

/// A path of `len` bytes that does not compress (Postgres compresses index rows, so a
/// repetitive path could still fit).
fn long_path(len: usize, seed: u64) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut path = String::from("/items/");
    while path.len() < len {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        path.push(char::from(
            ALPHABET[(state >> 33) as usize % ALPHABET.len()],
        ));
    }
    path
}

fn put(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::put(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::from("body")).expect("request")
}

fn get_req(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).expect("request")
}

fn etag(response: &Response<Body>) -> String {
    response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .expect("an ETag")
        .to_owned()
}

/// Create, read, replace with the current ETag, and a stale replace: the normal flow.
async fn write_flow(app: &Router, path: &str) {
    let created = send(app, put(path, &[("if-none-match", "*")])).await;
    assert!(
        created.status().is_success(),
        "create of a {}-byte path: {}",
        path.len(),
        created.status()
    );
    let first = etag(&created);
    let read = send(app, get_req(path)).await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(etag(&read), first);
    let replaced = send(app, put(path, &[("if-match", &first)])).await;
    assert!(replaced.status().is_success(), "{}", replaced.status());
    let stale = send(app, put(path, &[("if-match", &first)])).await;
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
}

/// Two long paths that differ only in their last byte: each writer, with its own
/// ETag, wins; neither write touches the other's version.
async fn shared_prefix_distinct(app: &Router, len: usize) {
    let base = long_path(len, 7);
    let (a, b) = (format!("{base}a"), format!("{base}b"));
    let ea = etag(&send(app, put(&a, &[("if-none-match", "*")])).await);
    let eb = etag(&send(app, put(&b, &[("if-none-match", "*")])).await);
    assert_ne!(ea, eb);
    let wa = send(app, put(&a, &[("if-match", &ea)])).await;
    assert!(wa.status().is_success(), "{}", wa.status());
    let wb = send(app, put(&b, &[("if-match", &eb)])).await;
    assert!(
        wb.status().is_success(),
        "b is its own resource: {}",
        wb.status()
    );
}

/// A table name no other run uses (a valid identifier).
fn unique_table(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("tp_{what}_{}_{nanos:x}", std::process::id())
}

async fn drop_table(store: &PostgresStore) {
    if let Ok(client) = store.pool().get().await {
        let _ = client
            .batch_execute(&format!("DROP TABLE IF EXISTS {}", store.table_name()))
            .await;
    }
}

#[tokio::test]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn long_key_postgres_store_gets_a_normal_write_flow() {
    let Some(pool) = shared_pool(2).await else {
        return;
    };
    let store = store(&pool, &unique_table("long_store")).await;
    let app = store_app(PreconditionLayer::new(store.clone()));
    write_flow(&app, &long_path(3000, 1)).await;
    shared_prefix_distinct(&app, 3000).await;
    drop_table(&store).await;
}

#[tokio::test]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn long_key_postgres_transactional_gets_a_normal_write_flow() {
    let Some(pool) = shared_pool(2).await else {
        return;
    };
    let store = store(&pool, &unique_table("long_tx")).await;
    let app = tx_app(PgTransactionalLayer::new(store.clone()));
    write_flow(&app, &long_path(3000, 2)).await;
    shared_prefix_distinct(&app, 3000).await;
    drop_table(&store).await;
}

#[tokio::test]
async fn long_key_is_stored_as_its_digest_form() {
    let store = Arc::new(MemoryStore::new());
    let app = store_app(PreconditionLayer::from_arc(store.clone()));
    let path = long_path(3000, 3);
    let created = send(&app, put(&path, &[])).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let stored = bounded_key(path.clone());
    assert!(stored.len() < MAX_KEY_LEN);
    // The handler's reservation names the stored key, and only it is in the store.
    assert_eq!(created.headers()["x-key"], stored.as_str());
    assert!(store.load(&stored).await.expect("load").is_some());
    assert!(store.load(&path).await.expect("load").is_none());
    shared_prefix_distinct(&app, 3000).await;
}

#[tokio::test]
async fn long_key_at_the_limit_is_stored_as_is() {
    let store = Arc::new(MemoryStore::new());
    let app = store_app(PreconditionLayer::from_arc(store.clone()));
    let path = long_path(MAX_KEY_LEN, 4);
    assert_eq!(path.len(), MAX_KEY_LEN);
    let created = send(&app, put(&path, &[])).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert!(store.load(&path).await.expect("load").is_some());
}
