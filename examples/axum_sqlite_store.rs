//! A JSON resource server with conditional requests, on the SQLite version store: the
//! versions and the items in one SQLite file, shared by every process that opens it.
//!
//! ```text
//! cargo run --example axum_sqlite_store --features sqlite
//! DATABASE_URL=sqlite://items.db ADDR=127.0.0.1:8080 REQUIRE_PRECONDITIONS=1 \
//!     cargo run --example axum_sqlite_store --features sqlite
//! ```
//!
//! `DATABASE_URL` defaults to `sqlite://tower-precondition-items.db` (created if
//! missing); start several processes on one file (on one host) and they serve one set
//! of items. `LEASE_MS` sets how long a write holds its item (30 000 by default: what a
//! process killed mid-write leaves behind).
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
//! The versions live in a [`SqliteStore`] (store mode), the items in a plain `items`
//! table of the same file. The layer has checked the preconditions and holds the item
//! for the handler, across every process on the file; each write runs in a
//! transaction that first checks that hold
//! ([`check_fence`](SqliteStore::check_fence)), so a write that outlives its request
//! (the client went away, the deadline passed, a process whose clock runs ahead took
//! the item over) changes nothing instead of landing over a newer one.

use std::{env, error::Error, io::IsTerminal, time::Duration};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Extension, Json, Router,
};
use serde_json::{json, Map, Value};
use sqlx::{Sqlite, SqlitePool, Transaction};
use tower_precondition::{store::SqliteStore, PreconditionLayer, Reservation};
use tracing_subscriber::EnvFilter;

/// The items table, next to the store's tables.
const ITEMS_TABLE: &str = "CREATE TABLE IF NOT EXISTS items (\n    \
    id   TEXT PRIMARY KEY NOT NULL,\n    \
    body TEXT NOT NULL\n) STRICT";

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

/// A database failure in a handler: `500`, logged.
fn database_error(error: sqlx::Error) -> Response {
    tracing::error!(%error, "items table");
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal error",
        "the items table could not be read or written",
    )
}

/// The item `id`, if there is one.
async fn load_item(
    db: impl sqlx::SqliteExecutor<'_>,
    id: &str,
) -> Result<Option<Value>, sqlx::Error> {
    let body: Option<String> = sqlx::query_scalar("SELECT body FROM items WHERE id = ?1")
        .bind(id)
        .fetch_optional(db)
        .await?;
    Ok(body.map(|body| serde_json::from_str(&body).unwrap_or(Value::Null)))
}

async fn get_item(Path(id): Path<String>, State(store): State<SqliteStore>) -> Response {
    match load_item(store.pool(), &id).await {
        Ok(Some(item)) => fresh_item(Json(item)),
        Ok(None) => not_found(&id),
        Err(error) => database_error(error),
    }
}

/// Begins the write's transaction, fenced: it holds the file's write lock
/// (`BEGIN IMMEDIATE`) and has checked that the layer still holds the item for this
/// request. A write that outlives its request (the client went away, the deadline
/// passed, another process took the item over) then finds its lease gone and changes
/// nothing, instead of landing over a newer write.
async fn begin_fenced(
    store: &SqliteStore,
    reservation: &Reservation,
) -> Result<Transaction<'static, Sqlite>, Response> {
    let mut tx = store
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(database_error)?;
    match store.check_fence(&mut tx, &reservation.fence()).await {
        Ok(()) => Ok(tx),
        Err(error) => {
            tracing::warn!(%error, key = reservation.key(), "write not applied");
            Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Write not applied",
                "the write could not be completed in time; nothing was changed",
            ))
        }
    }
}

/// Commits a fenced write and answers `response`.
async fn commit(tx: Transaction<'static, Sqlite>, response: Response) -> Response {
    match tx.commit().await {
        Ok(()) => response,
        Err(error) => database_error(error),
    }
}

/// Create or replace. The layer has already checked the preconditions and holds the
/// item for us; the [`Reservation`] says whether it knew a version of it.
async fn put_item(
    Path(id): Path<String>,
    State(store): State<SqliteStore>,
    Extension(reservation): Extension<Reservation>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => return invalid_json(error),
    };
    let mut tx = match begin_fenced(&store, &reservation).await {
        Ok(tx) => tx,
        Err(response) => return response,
    };
    let text = value.to_string();
    let inserted =
        sqlx::query("INSERT INTO items (id, body) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING")
            .bind(&id)
            .bind(&text)
            .execute(&mut *tx)
            .await;
    match inserted {
        Ok(done) if done.rows_affected() == 1 => return commit(tx, created(&id, value)).await,
        Ok(_) => {}
        Err(error) => return database_error(error),
    }
    // The item exists. Insert-if-absent: the version store may have forgotten an item
    // that exists (a store file replaced, say). A client that asked for "create only"
    // must then not overwrite it.
    if reservation.is_create() && headers.contains_key(header::IF_NONE_MATCH) {
        return problem(
            StatusCode::PRECONDITION_FAILED,
            "Precondition failed",
            format!("item {id:?} already exists"),
        );
    }
    let updated = sqlx::query("UPDATE items SET body = ?2 WHERE id = ?1")
        .bind(&id)
        .bind(&text)
        .execute(&mut *tx)
        .await;
    match updated {
        Ok(_) => commit(tx, Json(value).into_response()).await,
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
async fn patch_item(
    Path(id): Path<String>,
    State(store): State<SqliteStore>,
    Extension(reservation): Extension<Reservation>,
    body: Bytes,
) -> Response {
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
    let mut tx = match begin_fenced(&store, &reservation).await {
        Ok(tx) => tx,
        Err(response) => return response,
    };
    // Read and write in the one transaction: the item merged into is the item replaced.
    let mut item = match load_item(&mut *tx, &id).await {
        Ok(Some(item)) => item,
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
    let updated = sqlx::query("UPDATE items SET body = ?2 WHERE id = ?1")
        .bind(&id)
        .bind(item.to_string())
        .execute(&mut *tx)
        .await;
    match updated {
        Ok(_) => commit(tx, Json(item).into_response()).await,
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

async fn delete_item(
    Path(id): Path<String>,
    State(store): State<SqliteStore>,
    Extension(reservation): Extension<Reservation>,
) -> Response {
    let mut tx = match begin_fenced(&store, &reservation).await {
        Ok(tx) => tx,
        Err(response) => return response,
    };
    let deleted = sqlx::query("DELETE FROM items WHERE id = ?1")
        .bind(&id)
        .execute(&mut *tx)
        .await;
    match deleted {
        Ok(done) if done.rows_affected() > 0 => {
            commit(tx, StatusCode::NO_CONTENT.into_response()).await
        }
        Ok(_) => not_found(&id),
        Err(error) => database_error(error),
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
/// alone; anyone else is told it does not exist. A failed read refuses (fail closed).
async fn visible(db: &SqlitePool, id: &str, caller: Option<&str>) -> bool {
    match load_item(db, id).await {
        Ok(item) => match item.as_ref().and_then(|item| item.get("owner")) {
            Some(owner) => caller.is_some_and(|caller| owner.as_str() == Some(caller)),
            None => true,
        },
        Err(error) => {
            tracing::error!(%error, "access check");
            false
        }
    }
}

/// The application: the routes, wrapped in the precondition layer.
fn app(store: SqliteStore, require_preconditions: bool, lease: Duration) -> Router {
    let db = store.pool().clone();
    let layer = PreconditionLayer::new(store.clone())
        .lease(lease)
        .require_precondition(require_preconditions)
        // The application decides who may see an item before any precondition is
        // answered: a stranger gets the 404 of a missing item, never a 304 or a 412
        // that would tell them it exists (and its current ETag).
        .authorize({
            let db = db.clone();
            move |parts| {
                let db = db.clone();
                let id = parts
                    .uri
                    .path()
                    .strip_prefix("/items/")
                    .unwrap_or_default()
                    .to_owned();
                let caller = caller(&parts.headers).map(str::to_owned);
                async move {
                    // The layer keys the item by its canonical path; the handlers by
                    // the decoded id, as axum's `Path` gives it.
                    let id = percent_decode(&id);
                    if visible(&db, &id, caller.as_deref()).await {
                        Ok(())
                    } else {
                        Err(into_bytes_response(not_found(&id)).await)
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
        .with_state(store)
        // `route_layer`: only matched routes are versioned (an unknown path is a plain
        // 404, and never gets a version). The key is the canonical request path (the
        // default), so each item is versioned on its own.
        .route_layer(layer)
}

/// `%XX` escapes decoded (as axum's `Path` decodes the id); anything else as is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
    let url = env::var("DATABASE_URL")
        .unwrap_or_else(|_| "sqlite://tower-precondition-items.db".to_owned());
    // How long a write holds its item; a process killed mid-write leaves its lease
    // behind for this long. The layer's default is 30 s.
    let lease = match env::var("LEASE_MS") {
        Ok(ms) => Duration::from_millis(ms.parse()?),
        Err(_) => Duration::from_secs(30),
    };

    // One pool for the versions and the items: one file, WAL, a bounded busy wait.
    let store = SqliteStore::connect(&url).await?;
    store.migrate().await?;
    let db = store.pool().clone();
    // Like `migrate`: safe when several processes start at once, and only a read when
    // the table exists (a process restarting while others write still starts).
    let exists: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'items'",
    )
    .fetch_one(&db)
    .await?;
    if exists == 0 {
        let mut tx = db.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(ITEMS_TABLE).execute(&mut *tx).await?;
        tx.commit().await?;
    }

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    tracing::info!(require_preconditions = require, %url, "serving /items/{{id}}");
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
