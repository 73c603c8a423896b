//! The `/items/{id}` JSON server of `axum_memory`, with the versions *and* the items in
//! Redis: start several processes, on one machine or many, and they serve one
//! consistent set of items, with no lost update between them.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --features redis --example axum_redis
//! ADDR=127.0.0.1:3001 REQUIRE_PRECONDITIONS=1 RUST_LOG=debug cargo run --features redis --example axum_redis
//! ```
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /items/{id}` | `200` with the JSON item, its `ETag` and `Cache-Control: no-cache`, `404` when missing, `304` when `If-None-Match` matches |
//! | `PUT /items/{id}` | `201` (created) or `200` (replaced), with the new `ETag` |
//! | `PATCH /items/{id}` | a shallow merge into a JSON object (`null` removes a field): `200`, `404` when missing, `400` on invalid JSON, `422` when not an object |
//! | `DELETE /items/{id}` | `204`, `404` when missing |
//!
//! Every write may carry `If-Match: <etag>` (only if unchanged) or `If-None-Match: *`
//! (only if it does not exist yet); a stale one gets `412` with the current `ETag`.
//! With `REQUIRE_PRECONDITIONS=1`, a write without a precondition gets `428`.
//!
//! The server starts even when Redis is down ([`RedisStore::open_lazy`]) and
//! reconnects by itself: while Redis is unreachable, writes get `503` with
//! `Retry-After` and never reach a handler, and reads of items get the handler's
//! `503` (the items live in Redis too).
//!
//! An item with an `"owner"` field is private: only `Authorization: Bearer <owner>` sees
//! or changes it; anyone else gets `404`, for reads and writes alike, before any
//! precondition is looked at (no `304`, no `412`, no `ETag` to give it away).
//!
//! ```text
//! ADDR=127.0.0.1:3001 cargo run --features redis --example axum_redis &
//! ADDR=127.0.0.1:3002 cargo run --features redis --example axum_redis &
//! curl -i -X PUT localhost:3001/items/1 -d '{"name":"lamp","stock":3}'
//! curl -i localhost:3002/items/1                                             # ETag: "…"
//! curl -i -X PATCH localhost:3001/items/1 -H 'If-Match: "…"' -d '{"stock":4}'
//! curl -i -X PATCH localhost:3002/items/1 -H 'If-Match: "…"' -d '{"stock":5}'  # 412
//! ```
//!
//! An item is the JSON text at `<its version's Redis key>:item`, e.g.
//! `axum_redis:{/items/1}:item` next to the version hash `axum_redis:{/items/1}`: the
//! same hash tag, so a Redis Cluster keeps both in one slot. Writes to one item are
//! serialized by the layer's lease, so a handler's read-modify-write (`PATCH`) needs no
//! transaction of its own. Set `REDIS_PREFIX` to run several apps on one Redis, and
//! `LEASE_MS` for how long a write holds its item (30 000 by default: what a process
//! killed mid-write leaves behind).

use std::{env, error::Error, io::IsTerminal, time::Duration};

use axum::{
    body::Bytes,
    extract::State,
    http::{header, HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Extension, Json, Router,
};
use redis::{aio::ConnectionManager, AsyncCommands, ExistenceCheck, SetOptions};
use serde_json::{json, Map, Value};
use tower_precondition::{key::canonical_path, store::RedisStore, PreconditionLayer, Reservation};
use tracing_subscriber::EnvFilter;

/// Where the items live: the store's connection, and its key layout.
#[derive(Clone)]
struct Items {
    store: RedisStore,
}

impl Items {
    /// The Redis key of the item at `uri`. The layer keys versions by the canonical
    /// request path (its default), and so do we: `/items/%31` is `/items/1`, one item
    /// next to its one version, in the same slot.
    fn key(&self, uri: &Uri) -> String {
        self.key_of_path(uri.path())
    }

    fn key_of_path(&self, path: &str) -> String {
        format!("{}:item", self.store.redis_key(&canonical_path(path)))
    }

    /// Whether `caller` may see the item at `path`: an item with an `"owner"` field is
    /// its owner's alone. `Err` when Redis fails (the layer's own store will too).
    async fn visible(&self, path: &str, caller: Option<&str>) -> Result<bool, redis::RedisError> {
        let stored: Option<String> = self.connection().get(self.key_of_path(path)).await?;
        let owner = stored
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|item| item.get("owner").cloned());
        Ok(match owner {
            Some(owner) => caller.is_some_and(|caller| owner.as_str() == Some(caller)),
            None => true,
        })
    }

    fn connection(&self) -> ConnectionManager {
        self.store.connection().clone()
    }
}

/// A small RFC 9457 problem document, like the ones the layer writes.
fn problem(status: StatusCode, title: &str, detail: impl Into<String>) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn not_found(uri: &Uri) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "Not found",
        format!("no item at {}", uri.path()),
    )
}

/// Redis failed under the handler: a `503` (on a write, the layer then gives the item
/// a fresh version, since the write may or may not have happened).
fn redis_failed(error: redis::RedisError) -> Response {
    tracing::warn!(%error, "item storage failed");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Storage unavailable",
        "the item storage did not answer; retry later",
    )
}

/// The `400` for a body that is not JSON. (Bodies are parsed whatever their
/// `Content-Type`, so that `curl -d` works as is.)
fn invalid_json(error: serde_json::Error) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "Invalid JSON",
        format!("the request body is not valid JSON: {error}"),
    )
}

/// Stored text that is not JSON: a server fault, not the client's.
fn corrupt_item() -> Response {
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Corrupt item",
        "the stored item is not JSON",
    )
}

/// A `200` read of an item, which caches must revalidate (`no-cache`) before reusing:
/// items change at any time, and a cache left to guess would derive a freshness
/// lifetime from `Last-Modified` (RFC 9111 section 4.2.2) and serve a stale item.
fn fresh_item(item: impl IntoResponse) -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], item).into_response()
}

async fn get_item(uri: Uri, State(items): State<Items>) -> Response {
    let stored: Option<String> = match items.connection().get(items.key(&uri)).await {
        Ok(stored) => stored,
        Err(error) => return redis_failed(error),
    };
    match stored.map(|text| serde_json::from_str::<Value>(&text)) {
        Some(Ok(item)) => fresh_item(Json(item)),
        Some(Err(_)) => corrupt_item(),
        None => not_found(&uri),
    }
}

/// Create or replace. The layer has already checked the preconditions and holds the
/// item for us; the [`Reservation`] says whether it knew a version of it.
async fn put_item(
    uri: Uri,
    State(items): State<Items>,
    Extension(reservation): Extension<Reservation>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => return invalid_json(error),
    };
    let key = items.key(&uri);
    let mut con = items.connection();
    if reservation.is_create() && headers.contains_key(header::IF_NONE_MATCH) {
        // Insert-if-absent: Redis may have forgotten the version of an item that
        // exists (a restart without persistence). "Create only" must then not
        // overwrite it.
        let options = SetOptions::default().conditional_set(ExistenceCheck::NX);
        let set: Option<String> = match con.set_options(&key, value.to_string(), options).await {
            Ok(set) => set,
            Err(error) => return redis_failed(error),
        };
        return match set {
            Some(_) => created(&uri, value),
            None => problem(
                StatusCode::PRECONDITION_FAILED,
                "Precondition failed",
                format!("an item at {} already exists", uri.path()),
            ),
        };
    }
    // SET ... GET: one round trip that also says whether the item existed.
    let options = SetOptions::default().get(true);
    let previous: Option<String> = match con.set_options(&key, value.to_string(), options).await {
        Ok(previous) => previous,
        Err(error) => return redis_failed(error),
    };
    match previous {
        Some(_) => Json(value).into_response(),
        None => created(&uri, value),
    }
}

fn created(uri: &Uri, value: Value) -> Response {
    (
        StatusCode::CREATED,
        [(header::LOCATION, uri.path().to_owned())],
        Json(value),
    )
        .into_response()
}

/// A shallow merge: each field of the patch replaces the item's, `null` removes it.
/// Read, merge, write: safe because the layer's lease keeps every other write to this
/// item out until we are done.
async fn patch_item(uri: Uri, State(items): State<Items>, body: Bytes) -> Response {
    let patch = match serde_json::from_slice(&body) {
        Ok(Value::Object(patch)) => patch,
        Ok(_) => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Not an object",
                "a PATCH body must be a JSON object",
            )
        }
        Err(error) => return invalid_json(error),
    };
    let key = items.key(&uri);
    let mut con = items.connection();
    let stored: Option<String> = match con.get(&key).await {
        Ok(stored) => stored,
        Err(error) => return redis_failed(error),
    };
    let Some(stored) = stored else {
        return not_found(&uri);
    };
    let Ok(mut item) = serde_json::from_str::<Value>(&stored) else {
        return corrupt_item();
    };
    let Value::Object(fields) = &mut item else {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not an object",
            format!(
                "the item at {} is not a JSON object, so it cannot be merged into",
                uri.path()
            ),
        );
    };
    merge(fields, patch);
    let written: Result<(), _> = con.set(&key, item.to_string()).await;
    match written {
        Ok(()) => Json(item).into_response(),
        Err(error) => redis_failed(error),
    }
}

fn merge(fields: &mut Map<String, Value>, patch: Map<String, Value>) {
    for (name, value) in patch {
        if value.is_null() {
            fields.remove(&name);
        } else {
            fields.insert(name, value);
        }
    }
}

async fn delete_item(uri: Uri, State(items): State<Items>) -> Response {
    let deleted: Result<i64, _> = items.connection().del(items.key(&uri)).await;
    match deleted {
        Ok(0) => not_found(&uri),
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => redis_failed(error),
    }
}

/// Who is asking: `Authorization: Bearer <name>`, or nobody.
fn caller(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::to_owned)
}

/// An axum response with its body collected, as the access check hands it back.
async fn refusal(response: Response) -> axum::http::Response<Bytes> {
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    axum::http::Response::from_parts(parts, bytes)
}

/// The application: the routes, wrapped in the precondition layer over `store`.
fn app(store: RedisStore, require_preconditions: bool, lease: Duration) -> Router {
    let items = Items {
        store: store.clone(),
    };
    let layer = PreconditionLayer::new(store)
        .lease(lease)
        .require_precondition(require_preconditions)
        // The application decides who may see an item before any precondition is
        // answered: a stranger gets the 404 of a missing item, never a 304 or a 412
        // that would tell them it exists (and its current ETag).
        .authorize({
            let items = items.clone();
            move |parts| {
                let items = items.clone();
                let path = parts.uri.path().to_owned();
                let caller = caller(&parts.headers);
                async move {
                    match items.visible(&path, caller.as_deref()).await {
                        Ok(true) => Ok(()),
                        Ok(false) => {
                            Err(refusal(not_found(&path.parse().unwrap_or_default())).await)
                        }
                        Err(error) => Err(refusal(redis_failed(error)).await),
                    }
                }
            }
        });
    Router::new()
        .route(
            "/items/{id}",
            get(get_item)
                .put(put_item)
                .patch(patch_item)
                .delete(delete_item),
        )
        .with_state(items)
        // `route_layer`: only matched routes are versioned, so an unknown path is a
        // plain 404 and never gets a version.
        .route_layer(layer)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_precondition=debug")),
        )
        // No colour codes in logs redirected to a file.
        .with_ansi(std::io::stdout().is_terminal())
        .init();

    let addr = env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let require = env::var("REQUIRE_PRECONDITIONS").is_ok_and(|v| v == "1" || v == "true");
    let redis_url = env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = env::var("REDIS_PREFIX").unwrap_or_else(|_| "axum_redis:".to_owned());
    // How long a write holds its item; a process killed mid-write leaves its lease
    // behind for this long. The layer's default is 30 s.
    let lease = match env::var("LEASE_MS") {
        Ok(ms) => Duration::from_millis(ms.parse()?),
        Err(_) => Duration::from_secs(30),
    };

    // Connects on first use, so the server starts while Redis is down (writes get 503
    // until it is up); an unparsable URL still fails here. The connection manager
    // reconnects by itself whenever Redis comes back.
    let store = RedisStore::open_lazy(&redis_url)?.prefix(&prefix);

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    tracing::info!(require_preconditions = require, %prefix, "serving /items/{{id}} from Redis");
    axum::serve(listener, app(store, require, lease))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("shut down");
    Ok(())
}

/// Resolves on Ctrl-C (or SIGTERM on Unix): in-flight requests finish, then we exit.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
