//! A JSON resource server with conditional requests, its items in Postgres, written in
//! the transactional mode: each write's data and its new version commit together.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example axum_postgres --features postgres,axum
//! ADDR=127.0.0.1:3001 REQUIRE_PRECONDITIONS=1 DATABASE_URL=... cargo run --example axum_postgres --features postgres,axum
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
//! Items and versions both live in the database, so several processes started side by
//! side (each on its own `ADDR`) serve one consistent set of items:
//!
//! ```text
//! curl -i -X PUT localhost:3001/items/1 -d '{"name":"lamp","stock":3}'
//! curl -i localhost:3002/items/1                                      # same ETag
//! curl -i -X PATCH localhost:3003/items/1 -H 'If-Match: "…"' -d '{"stock":4}'
//! curl -i -X PATCH localhost:3001/items/1 -H 'If-Match: "…"' -d '{"stock":5}'   # 412
//! ```
//!
//! Each write runs in one transaction opened by [`PgTransactionalLayer`]: the layer
//! locks the item's version row and checks the preconditions, the handler writes
//! through the [`PgTransaction`] it is given, and the layer commits (with the new
//! version) on `2xx` or rolls back otherwise.

use std::{env, error::Error, io::IsTerminal};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use deadpool_postgres::Pool;
use serde_json::{json, Map, Value};
use tower_precondition::{
    key::canonical_path, store::PostgresStore, PgTransaction, PgTransactionalLayer,
};
use tracing_subscriber::EnvFilter;

/// The items table. The versions table is the store's (`tower_precondition_versions`).
const ITEMS: &str = "axum_postgres_items";

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

/// A database error inside the handler: the layer rolls the write back.
fn database_error(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "database error");
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Database error",
        "the item could not be stored; nothing was changed",
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

/// Reads use a pooled connection of their own; the layer has already loaded the
/// committed version (a version is only ever committed together with its data).
/// A `200` read of an item, which caches must revalidate (`no-cache`) before reusing:
/// items change at any time, and a cache left to guess would derive a freshness
/// lifetime from `Last-Modified` (RFC 9111 section 4.2.2) and serve a stale item.
fn fresh_item(item: impl IntoResponse) -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], item).into_response()
}

async fn get_item(Path(id): Path<String>, State(pool): State<Pool>) -> Response {
    let client = match pool.get().await {
        Ok(client) => client,
        Err(error) => return database_error(error),
    };
    let sql = format!("SELECT body::text FROM {ITEMS} WHERE id = $1");
    match client.query_opt(&sql, &[&id]).await {
        Ok(Some(row)) => match serde_json::from_str::<Value>(row.get(0)) {
            Ok(value) => fresh_item(Json(value)),
            Err(error) => database_error(error),
        },
        Ok(None) => not_found(&id),
        Err(error) => database_error(error),
    }
}

/// Create or replace, inside the layer's transaction.
async fn put_item(
    Path(id): Path<String>,
    tx: PgTransaction,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => return invalid_json(error),
    };
    let text = value.to_string();
    let insert = format!(
        "INSERT INTO {ITEMS} (id, body) VALUES ($1, $2::text::jsonb) ON CONFLICT (id) DO NOTHING"
    );
    let update = format!("UPDATE {ITEMS} SET body = $2::text::jsonb WHERE id = $1");
    if tx.is_create() {
        // Insert-if-absent: the item may exist without a version (written before this
        // layer was added). A client that asked for "create only" must then not
        // overwrite it.
        match tx.execute(&insert, &[&id, &text]).await {
            Ok(1) => return created(&id, value),
            Ok(_) if headers.contains_key(header::IF_NONE_MATCH) => {
                return problem(
                    StatusCode::PRECONDITION_FAILED,
                    "Precondition failed",
                    format!("item {id:?} already exists"),
                );
            }
            Ok(_) => {}
            Err(error) => return database_error(error),
        }
    }
    match tx.execute(&update, &[&id, &text]).await {
        Ok(0) => match tx.execute(&insert, &[&id, &text]).await {
            Ok(_) => created(&id, value),
            Err(error) => database_error(error),
        },
        Ok(_) => Json(value).into_response(),
        Err(error) => database_error(error),
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
async fn patch_item(Path(id): Path<String>, tx: PgTransaction, body: Bytes) -> Response {
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
    // The layer holds the item's version row, so no other write through the layer can
    // interleave; FOR UPDATE also keeps out writers that bypass it.
    let select = format!("SELECT body::text FROM {ITEMS} WHERE id = $1 FOR UPDATE");
    let mut item: Value = match tx.query_opt(&select, &[&id]).await {
        Ok(Some(row)) => match serde_json::from_str(row.get(0)) {
            Ok(item) => item,
            Err(error) => return database_error(error),
        },
        Ok(None) => return not_found(&id),
        Err(error) => return database_error(error),
    };
    let Value::Object(fields) = &mut item else {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not an object",
            format!("item {id:?} is not a JSON object, so it cannot be merged into"),
        );
    };
    merge(fields, patch);
    let update = format!("UPDATE {ITEMS} SET body = $2::text::jsonb WHERE id = $1");
    match tx.execute(&update, &[&id, &item.to_string()]).await {
        Ok(_) => Json(item).into_response(),
        Err(error) => database_error(error),
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

async fn delete_item(Path(id): Path<String>, tx: PgTransaction) -> Response {
    let sql = format!("DELETE FROM {ITEMS} WHERE id = $1");
    match tx.execute(&sql, &[&id]).await {
        Ok(0) => not_found(&id),
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => database_error(error),
    }
}

/// Who is asking: `Authorization: Bearer <name>`, or nobody.
fn caller(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::to_owned)
}

/// The item id a request names, as the `Path` extractor will see it. Ids are plain
/// (unreserved) characters here; a path that still holds a percent-encoding after
/// canonicalisation names no item we could check, so it is refused.
fn item_id(path: &str) -> Option<String> {
    let path = canonical_path(path);
    let id = path.strip_prefix("/items/")?;
    (!id.contains('%') && !id.contains('/')).then(|| id.to_owned())
}

/// Whether `caller` may see item `id`: an item with an `"owner"` field is its owner's
/// alone; anyone else is told it does not exist.
async fn visible(pool: &Pool, id: &str, caller: Option<&str>) -> Result<bool, Response> {
    let client = pool.get().await.map_err(database_error)?;
    let sql = format!("SELECT body->>'owner' FROM {ITEMS} WHERE id = $1");
    let owner: Option<Option<String>> = client
        .query_opt(&sql, &[&id])
        .await
        .map_err(database_error)?
        .map(|row| row.get(0));
    Ok(match owner.flatten() {
        Some(owner) => caller == Some(owner.as_str()),
        None => true,
    })
}

/// An axum response with its body collected, as the access check hands it back.
async fn refusal(response: Response) -> axum::http::Response<Bytes> {
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    axum::http::Response::from_parts(parts, bytes)
}

/// The application: the routes, wrapped in the transactional layer.
fn app(store: PostgresStore, require_preconditions: bool) -> Router {
    let pool = store.pool().clone();
    let layer = PgTransactionalLayer::new(store)
        .require_precondition(require_preconditions)
        // The application decides who may see an item before any precondition is
        // answered (and before a transaction is begun): a stranger gets the 404 of a
        // missing item, never a 304 or a 412 that would tell them it exists.
        .authorize({
            let pool = pool.clone();
            move |parts| {
                let pool = pool.clone();
                let id = item_id(parts.uri.path());
                let caller = caller(&parts.headers);
                async move {
                    let Some(id) = id else {
                        return Err(refusal(not_found("(not a plain id)")).await);
                    };
                    match visible(&pool, &id, caller.as_deref()).await {
                        Ok(true) => Ok(()),
                        Ok(false) => Err(refusal(not_found(&id)).await),
                        Err(response) => Err(refusal(response).await),
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
        .with_state(pool)
        // `route_layer`: only matched routes are versioned, so an unknown path is a
        // plain 404 and never gets a version.
        .route_layer(layer)
}

/// Creates the tables if needed. Safe when several processes start at once: the
/// store's migration takes an advisory lock, and so does ours.
async fn migrate(store: &PostgresStore) -> Result<(), Box<dyn Error>> {
    store.migrate().await?;
    let client = store.pool().get().await?;
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL client_min_messages = warning; \
             SELECT pg_advisory_xact_lock(hashtext('{ITEMS}')); \
             CREATE TABLE IF NOT EXISTS {ITEMS} (id TEXT PRIMARY KEY, body JSONB NOT NULL); \
             COMMIT"
        ))
        .await?;
    Ok(())
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
    let url = env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL, e.g. postgres://postgres@127.0.0.1:5432/test")?;

    let store = PostgresStore::connect(&url).await?;
    migrate(&store).await?;

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    tracing::info!(
        require_preconditions = require,
        "serving /items/{{id}} from Postgres"
    );
    axum::serve(listener, app(store, require))
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
