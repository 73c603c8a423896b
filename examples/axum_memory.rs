//! A JSON resource server with conditional requests, on the in-memory version store.
//!
//! ```text
//! cargo run --example axum_memory
//! ADDR=127.0.0.1:8080 REQUIRE_PRECONDITIONS=1 RUST_LOG=debug cargo run --example axum_memory
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
//! An item with an `"owner"` field is private: only `Authorization: Bearer <owner>` sees
//! or changes it; anyone else gets `404`, for reads and writes alike, before any
//! precondition is looked at (no `304`, no `412`, no `ETag` to give it away).
//!
//! ```text
//! curl -i -X PUT localhost:3000/items/1 -d '{"name":"lamp","stock":3}'
//! curl -i localhost:3000/items/1                                      # ETag: "…"
//! curl -i -X PATCH localhost:3000/items/1 -H 'If-Match: "…"' -d '{"stock":4}'
//! curl -i -X PATCH localhost:3000/items/1 -H 'If-Match: "…"' -d '{"stock":5}'   # 412, same tag twice
//! ```
//!
//! The items live in a `HashMap`; the versions in a [`MemoryStore`]. Both are lost when
//! the process exits. The `axum_redis` / `axum_postgres` examples serve the same API
//! from shared stores.

use std::{
    collections::{hash_map, HashMap},
    env,
    error::Error,
    io::IsTerminal,
    sync::{Arc, PoisonError, RwLock},
};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Extension, Json, Router,
};
use serde_json::{json, Map, Value};
use tower_precondition::{MemoryStore, PreconditionLayer, Reservation};
use tracing_subscriber::EnvFilter;

/// The items, by id. A `std` lock is fine: it is never held across an `.await`.
type Items = Arc<RwLock<HashMap<String, Value>>>;

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

fn not_found(id: &str) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "Not found",
        format!("no item {id:?}"),
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

/// A `200` read of an item, which caches must revalidate (`no-cache`) before reusing:
/// items change at any time, and a cache left to guess would derive a freshness
/// lifetime from `Last-Modified` (RFC 9111 section 4.2.2) and serve a stale item.
fn fresh_item(item: impl IntoResponse) -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], item).into_response()
}

async fn get_item(Path(id): Path<String>, State(items): State<Items>) -> Response {
    let items = items.read().unwrap_or_else(PoisonError::into_inner);
    match items.get(&id) {
        Some(item) => fresh_item(Json(item.clone())),
        None => not_found(&id),
    }
}

/// Create or replace. The layer has already checked the preconditions and holds the
/// item for us; the [`Reservation`] says whether it knew a version of it.
async fn put_item(
    Path(id): Path<String>,
    State(items): State<Items>,
    Extension(reservation): Extension<Reservation>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => return invalid_json(error),
    };
    let mut items = items.write().unwrap_or_else(PoisonError::into_inner);
    if reservation.is_create() {
        // Insert-if-absent: the version store may have forgotten an item that exists
        // (with a shared store that restarted, say). A client that asked for
        // "create only" must then not overwrite it.
        match items.entry(id.clone()) {
            hash_map::Entry::Vacant(slot) => {
                slot.insert(value.clone());
                return created(&id, value);
            }
            hash_map::Entry::Occupied(_) if headers.contains_key(header::IF_NONE_MATCH) => {
                return problem(
                    StatusCode::PRECONDITION_FAILED,
                    "Precondition failed",
                    format!("item {id:?} already exists"),
                );
            }
            hash_map::Entry::Occupied(mut slot) => {
                slot.insert(value.clone());
                return Json(value).into_response();
            }
        }
    }
    match items.insert(id.clone(), value.clone()) {
        Some(_) => Json(value).into_response(),
        None => created(&id, value),
    }
}

fn created(id: &str, value: Value) -> Response {
    let location = format!("/items/{id}");
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(value),
    )
        .into_response()
}

/// A shallow merge: each field of the patch replaces the item's, `null` removes it.
async fn patch_item(Path(id): Path<String>, State(items): State<Items>, body: Bytes) -> Response {
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
    let mut items = items.write().unwrap_or_else(PoisonError::into_inner);
    let Some(item) = items.get_mut(&id) else {
        return not_found(&id);
    };
    let Value::Object(fields) = item else {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not an object",
            format!("item {id:?} is not a JSON object, so it cannot be merged into"),
        );
    };
    merge(fields, patch);
    Json(item.clone()).into_response()
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

async fn delete_item(Path(id): Path<String>, State(items): State<Items>) -> Response {
    let mut items = items.write().unwrap_or_else(PoisonError::into_inner);
    match items.remove(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => not_found(&id),
    }
}

/// Who is asking: `Authorization: Bearer <name>`, or nobody.
fn caller(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Whether `caller` may see item `id`: an item with an `"owner"` field is its owner's
/// alone; anyone else is told it does not exist.
fn visible(items: &Items, id: &str, caller: Option<&str>) -> bool {
    let items = items.read().unwrap_or_else(PoisonError::into_inner);
    match items.get(id).and_then(|item| item.get("owner")) {
        Some(owner) => caller.is_some_and(|caller| owner.as_str() == Some(caller)),
        None => true,
    }
}

/// The application: the routes, wrapped in the precondition layer.
fn app(require_preconditions: bool) -> Router {
    let items = Items::default();
    let layer = PreconditionLayer::new(MemoryStore::new())
        .require_precondition(require_preconditions)
        // The application decides who may see an item before any precondition is
        // answered: a stranger gets the 404 of a missing item, never a 304 or a 412
        // that would tell them it exists (and its current ETag).
        .authorize({
            let items = items.clone();
            move |parts| {
                let id = parts.uri.path().strip_prefix("/items/").unwrap_or_default();
                let allowed = visible(&items, id, caller(&parts.headers));
                let refusal = (!allowed).then(|| not_found(id));
                async move {
                    match refusal {
                        None => Ok(()),
                        Some(response) => Err(into_bytes_response(response).await),
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
        // `route_layer`: only matched routes are versioned (an unknown path is a plain
        // 404, and never gets a version). The key is the canonical request path (the
        // default), so each item is versioned on its own.
        .route_layer(layer)
}

/// An axum response with its body collected, as the access check hands it back.
async fn into_bytes_response(response: Response) -> axum::http::Response<Bytes> {
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    axum::http::Response::from_parts(parts, bytes)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_precondition=debug")),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();

    let addr = env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let require = env::var("REQUIRE_PRECONDITIONS").is_ok_and(|v| v == "1" || v == "true");

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    tracing::info!(require_preconditions = require, "serving /items/{{id}}");
    axum::serve(listener, app(require))
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
