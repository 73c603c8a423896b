//! Finding 8.5, settings that panic: every duration setting saturates, so a request
//! goes through each layer built with extreme settings (`Duration::MAX`, zero) without
//! a panic, on the paths where each setting is used (reserve, deadlines, `Retry-After`,
//! the transaction's timeouts, Redis expiry).

#[cfg(all(feature = "postgres", feature = "axum"))]
mod postgres_support;
#[cfg(feature = "redis")]
mod redis_support;

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{header, Request, Response, StatusCode},
    routing::get,
    Router,
};
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_precondition::{MemoryStore, PreconditionLayer};

fn put(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::put(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::from("body")).expect("request")
}

async fn send(app: &Router, request: Request<Body>) -> Response<Body> {
    app.clone().oneshot(request).await.expect("infallible")
}

fn etag(response: &Response<Body>) -> String {
    response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .expect("an ETag")
        .to_owned()
}

/// `/items/{id}`: GET answers, PUT answers `204`, or, with `x-block`, waits for
/// `release` after signalling `entered` (to hold a lease while another write arrives).
fn app(layer: PreconditionLayer, entered: Arc<Notify>, release: Arc<Notify>) -> Router {
    Router::new()
        .route(
            "/items/{id}",
            get(|| async { "item" }).put(move |headers: axum::http::HeaderMap| {
                let (entered, release) = (entered.clone(), release.clone());
                async move {
                    if headers.contains_key("x-block") {
                        entered.notify_one();
                        release.notified().await;
                    }
                    StatusCode::NO_CONTENT
                }
            }),
        )
        .layer(layer)
}

/// Read, write, write with the ETag, and a write that meets a write in flight (`409`
/// with `Retry-After`): every status the settings feed.
async fn exercise(layer: PreconditionLayer) -> Option<String> {
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let app = app(layer, entered.clone(), release.clone());
    let read = send(
        &app,
        Request::get("/items/1").body(Body::empty()).expect("req"),
    )
    .await;
    assert_eq!(read.status(), StatusCode::OK);
    let written = send(&app, put("/items/1", &[])).await;
    assert_eq!(written.status(), StatusCode::NO_CONTENT);
    let again = send(&app, put("/items/1", &[("if-match", &etag(&written))])).await;
    assert_eq!(again.status(), StatusCode::NO_CONTENT);

    let holder = tokio::spawn({
        let app = app.clone();
        async move { send(&app, put("/items/2", &[("x-block", "1")])).await }
    });
    entered.notified().await;
    let conflict = send(&app, put("/items/2", &[])).await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    let retry_after = conflict
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    release.notify_one();
    let held = holder.await.expect("holder");
    assert_eq!(held.status(), StatusCode::NO_CONTENT);
    retry_after
}

#[tokio::test]
async fn settings_extremes_store_layer_max_durations() {
    let layer = PreconditionLayer::new(MemoryStore::new())
        .lease(Duration::MAX)
        .handler_timeout(Duration::MAX)
        .store_timeout(Duration::MAX)
        .retry_after(Duration::MAX);
    let retry_after = exercise(layer).await.expect("Retry-After on 409");
    // Saturated at 365 days.
    assert_eq!(retry_after, (365 * 24 * 3600).to_string());
}

#[tokio::test]
async fn settings_extremes_store_layer_each_max_alone() {
    let layers = [
        PreconditionLayer::new(MemoryStore::new()).lease(Duration::MAX),
        PreconditionLayer::new(MemoryStore::new()).handler_timeout(Duration::MAX),
        PreconditionLayer::new(MemoryStore::new()).store_timeout(Duration::MAX),
        PreconditionLayer::new(MemoryStore::new()).retry_after(Duration::MAX),
    ];
    for layer in layers {
        exercise(layer).await;
    }
}

#[tokio::test]
async fn settings_extremes_store_layer_zero_durations() {
    // Zero is clamped where it would make every write fail (the lease), and otherwise
    // allowed: it must answer, not panic.
    let layer = PreconditionLayer::new(MemoryStore::new())
        .lease(Duration::ZERO)
        .retry_after(Duration::ZERO);
    let retry_after = exercise(layer).await.expect("Retry-After on 409");
    assert_eq!(retry_after, "1");

    let app = app(
        PreconditionLayer::new(MemoryStore::new())
            .handler_timeout(Duration::ZERO)
            .store_timeout(Duration::ZERO),
        Arc::default(),
        Arc::default(),
    );
    let response = send(&app, put("/items/1", &[])).await;
    assert!(
        response.status() == StatusCode::NO_CONTENT
            || response.status() == StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        response.status()
    );
}

#[cfg(all(feature = "postgres", feature = "axum"))]
mod postgres {
    use std::time::{Duration, SystemTime};

    use axum::{http::StatusCode, routing::get, Router};
    use tower_precondition::{
        store::{AtomicVersionStore, CasOutcome, Entry, Lease, LeaseToken, PostgresStore, Version},
        PgTransaction, PgTransactionalLayer, PreconditionLayer,
    };

    use super::{etag, put, send};
    use crate::postgres_support::{shared_pool, store};

    fn unique_table(what: &str) -> String {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
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

    fn tx_app(layer: PgTransactionalLayer) -> Router {
        Router::new()
            .route(
                "/items/{id}",
                get(|| async { "item" }).put(|tx: PgTransaction| async move {
                    // A statement in the layer's transaction, under its timeouts.
                    match tx.execute("SELECT 1", &[]).await {
                        Ok(_) => StatusCode::NO_CONTENT,
                        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    }
                }),
            )
            .layer(layer)
    }

    async fn tx_exercise(store: &PostgresStore, layer: PgTransactionalLayer) -> Option<String> {
        let app = tx_app(layer);
        let written = send(&app, put("/items/1", &[])).await;
        assert_eq!(written.status(), StatusCode::NO_CONTENT);
        let again = send(&app, put("/items/1", &[("if-match", &etag(&written))])).await;
        assert_eq!(again.status(), StatusCode::NO_CONTENT);

        // A store-mode lease in flight: the transactional write answers 409.
        let v0 = Version::new("\"v0\"".parse().expect("tag"), SystemTime::now()).expect("v0");
        let live = Entry::from_parts(
            Some(v0),
            Some(Lease::from_parts(
                LeaseToken::random(),
                store.clock_millis().await.expect("clock") + 60_000,
            )),
        )
        .expect("entry");
        let cas = store
            .compare_and_set("/items/2", None, Some(&live))
            .await
            .expect("cas");
        assert_eq!(cas, CasOutcome::Applied);
        let conflict = send(&app, put("/items/2", &[("if-match", "\"v0\"")])).await;
        assert_eq!(conflict.status(), StatusCode::CONFLICT);
        conflict
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    #[tokio::test]
    #[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
    async fn settings_extremes_transactional_max_durations() {
        let Some(pool) = shared_pool(2).await else {
            return;
        };
        let store = store(&pool, &unique_table("extremes_tx")).await;
        let layer = PgTransactionalLayer::new(store.clone())
            .handler_timeout(Duration::MAX)
            .statement_timeout(Duration::MAX)
            .lock_timeout(Duration::MAX)
            .store_timeout(Duration::MAX)
            .retry_after(Duration::MAX);
        let retry_after = tx_exercise(&store, layer).await;
        drop_table(&store).await;
        assert_eq!(retry_after.as_deref(), Some("31536000"));
    }

    #[tokio::test]
    #[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
    async fn settings_extremes_transactional_zero_durations() {
        let Some(pool) = shared_pool(2).await else {
            return;
        };
        let store = store(&pool, &unique_table("extremes_tx0")).await;
        // Clamped to 1 ms where Postgres would read 0 as "no timeout"; a write may then
        // time out (503) but must answer.
        let app = tx_app(
            PgTransactionalLayer::new(store.clone())
                .handler_timeout(Duration::ZERO)
                .statement_timeout(Duration::ZERO)
                .lock_timeout(Duration::ZERO)
                .retry_after(Duration::ZERO),
        );
        let response = send(&app, put("/items/1", &[])).await;
        drop_table(&store).await;
        assert!(
            [StatusCode::NO_CONTENT, StatusCode::SERVICE_UNAVAILABLE].contains(&response.status()),
            "{}",
            response.status()
        );
    }

    #[tokio::test]
    #[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
    async fn settings_extremes_store_layer_over_postgres_max_lease() {
        let Some(pool) = shared_pool(2).await else {
            return;
        };
        let store = store(&pool, &unique_table("extremes_store")).await;
        let layer = PreconditionLayer::new(store.clone())
            .lease(Duration::MAX)
            .handler_timeout(Duration::MAX)
            .store_timeout(Duration::MAX)
            .retry_after(Duration::MAX);
        let retry_after = super::exercise(layer).await;
        drop_table(&store).await;
        assert_eq!(retry_after.as_deref(), Some("31536000"));
    }
}

#[cfg(feature = "redis")]
mod redis {
    use std::time::Duration;

    use tower_precondition::PreconditionLayer;

    use crate::redis_support::{raw_connection, redis_url, shared_store};

    /// The entry's time to live in Redis, in milliseconds (`-1`: none, `-2`: no key).
    async fn pttl(url: &str, key: &str) -> i64 {
        let mut con = raw_connection(url).await;
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut con)
            .await
            .expect("PTTL")
    }

    #[tokio::test]
    #[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
    async fn settings_extremes_redis_max_lease() {
        let Some((store, _cleanup)) = shared_store().await else {
            return;
        };
        let url = redis_url().expect("url");
        let key = store.redis_key("/items/1");
        let layer = PreconditionLayer::new(store.clone())
            .lease(Duration::MAX)
            .retry_after(Duration::MAX);
        // Reserve (a lease of the longest allowed length), commit, and a 409 while the
        // lease of `/items/2` is held: nothing overflows, and no entry gets a time to
        // live (Redis never drops an unknown outcome).
        super::exercise(layer).await;
        assert_eq!(pttl(&url, &key).await, -1);
    }
}
