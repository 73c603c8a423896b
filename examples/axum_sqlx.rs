//! A JSON resource server with conditional requests, its items in Postgres through
//! sqlx, written in the row-version mode: each item's row carries its version, and the
//! database checks the precondition in the write statement itself.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example axum_sqlx --features sqlx-postgres
//! ADDR=127.0.0.1:3001 REQUIRE_PRECONDITIONS=1 DATABASE_URL=... cargo run --example axum_sqlx --features sqlx-postgres
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
//! or changes it; anyone else gets `404`, for reads and writes alike (no `304`, no
//! `412`, no `ETag` to give it away). The owner check is part of each statement.
//!
//! `PUT` and `DELETE` are one statement each: the condition is in its `WHERE`, and a
//! refused one costs one more read, for the `412`'s current `ETag`. `PATCH` must read
//! the item to merge into it, so it locks the row (`SELECT ... FOR UPDATE`), checks the
//! precondition against it, and writes, in one transaction. Several processes on one
//! database serve one consistent set of items.

use std::{env, error::Error, sync::Arc};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::{json, Map, Value};
use sqlx::{postgres::PgPoolOptions, PgConnection, PgPool, Row};
use tower_precondition::row_version::{
    sqlx::{row_version, BindSpecialized},
    PgRowSql, PgSpecializedStatement, RowPrecondition, RowVersionLayer,
};

/// The items table: the JSON body, and the version columns `PgRowSql` writes.
const ITEMS: &str = "axum_sqlx_items";

/// Every statement, built once (sqlx caches prepared statements by their text). The
/// conditional ones have a text per form of precondition, each comparing only what
/// the request sent.
struct Statements {
    read: String,
    upsert: PgSpecializedStatement,
    update: PgSpecializedStatement,
    delete: PgSpecializedStatement,
    lock: String,
    write: String,
}

impl Statements {
    fn new() -> Self {
        let v = PgRowSql::new(ITEMS);
        let (set, returning) = (v.assignments(), v.returning());
        // Private items are their owner's alone: a stranger's write matches no row.
        let visible = format!("({ITEMS}.body->>'owner' IS NULL OR {ITEMS}.body->>'owner' = $3)");
        Self {
            read: format!("SELECT body::text AS body, body->>'owner' AS owner, {returning} FROM {ITEMS} WHERE id = $1"),
            upsert: v.specialized(4, |condition| {
                format!(
                    "INSERT INTO {ITEMS} (id, body, {columns}) VALUES ($1, $2::jsonb, {values}) \
                     ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, {set} \
                     WHERE {visible} AND {condition} RETURNING (xmax = 0) AS created, {returning}",
                    columns = v.insert_columns(),
                    values = v.insert_values(),
                )
            }),
            update: v.specialized(4, |condition| {
                format!(
                    "UPDATE {ITEMS} SET body = $2::jsonb, {set} WHERE id = $1 AND {visible} \
                     AND {condition} RETURNING false AS created, {returning}"
                )
            }),
            delete: v.specialized(3, |condition| {
                format!(
                    "DELETE FROM {ITEMS} WHERE id = $1 AND ({ITEMS}.body->>'owner' IS NULL OR \
                     {ITEMS}.body->>'owner' = $2) AND {condition} RETURNING {returning}"
                )
            }),
            lock: format!("SELECT body::text AS body, body->>'owner' AS owner, {returning} FROM {ITEMS} WHERE id = $1 FOR UPDATE"),
            write: format!("UPDATE {ITEMS} SET body = $2::jsonb, {set} WHERE id = $1 RETURNING {returning}"),
        }
    }
}

#[derive(Clone)]
struct App {
    pool: PgPool,
    sql: Arc<Statements>,
}

/// A small RFC 9457 problem document, like the ones the layer writes.
fn problem(status: StatusCode, title: &str, detail: impl Into<String>) -> Response {
    let body = json!({"type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail.into()});
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

fn database_error(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "database error");
    let detail = "the item could not be read or stored; nothing was changed";
    problem(StatusCode::INTERNAL_SERVER_ERROR, "Database error", detail)
}

fn invalid_json(error: serde_json::Error) -> Response {
    let detail = format!("the request body is not valid JSON: {error}");
    problem(StatusCode::BAD_REQUEST, "Invalid JSON", detail)
}

/// Who is asking: `Authorization: Bearer <name>`, or nobody.
fn caller(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::to_owned)
}

/// Whether `caller` may see the item read into `row` (its `owner` column).
fn visible(row: &sqlx::postgres::PgRow, caller: Option<&str>) -> bool {
    match row.try_get::<Option<String>, _>("owner") {
        Ok(Some(owner)) => caller == Some(owner.as_str()),
        Ok(None) => true,
        Err(_) => false,
    }
}

/// The body and version come from one row read, so the `ETag` names this body.
/// `no-cache`: items change at any time, so caches must revalidate before reuse.
async fn get_item(Path(id): Path<String>, State(app): State<App>, headers: HeaderMap) -> Response {
    let row = match sqlx::query(&app.sql.read)
        .bind(&id)
        .fetch_optional(&app.pool)
        .await
    {
        Ok(Some(row)) if visible(&row, caller(&headers).as_deref()) => row,
        Ok(_) => return not_found(&id),
        Err(error) => return database_error(error),
    };
    match (row_version(&row), row.try_get::<String, _>("body")) {
        (Ok(version), Ok(body)) => {
            let headers = [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-cache"),
            ];
            (version, headers, body).into_response()
        }
        (Err(error), _) | (_, Err(error)) => database_error(error),
    }
}

/// A conditional write changed no row: read the item once, on the write's connection,
/// to say why (`412` with its current version, or `404`). `upsert`: the statement
/// would have inserted a missing row.
async fn refused(
    app: &App,
    conn: &mut PgConnection,
    condition: &RowPrecondition,
    id: &str,
    caller: Option<&str>,
    upsert: bool,
) -> Response {
    let current = match sqlx::query(&app.sql.read)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
    {
        Ok(Some(row)) if !visible(&row, caller) => return not_found(id),
        Ok(Some(row)) => match row_version(&row) {
            Ok(version) => Some(version),
            Err(error) => return database_error(error),
        },
        Ok(None) => None,
        Err(error) => return database_error(error),
    };
    // A refused upsert found the row, even if it is gone now: a 412, never a 404.
    if upsert {
        return condition.upsert_not_applied(current).into_response();
    }
    match condition.not_applied(current) {
        Some(not_applied) => not_applied.into_response(),
        None => not_found(id),
    }
}

/// Create or replace, in one statement: the upsert when the precondition allows a
/// create, the plain update when it needs a current version (`If-Match`).
async fn put_item(
    Path(id): Path<String>,
    State(app): State<App>,
    condition: RowPrecondition,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => return invalid_json(error),
    };
    let caller = caller(&headers);
    let upsert = condition.may_create();
    let statement = if upsert {
        &app.sql.upsert
    } else {
        &app.sql.update
    };
    // One connection for the write and, if it is refused, the read: a checkout each
    // would cost sqlx a round trip more.
    let mut conn = match app.pool.acquire().await {
        Ok(conn) => conn,
        Err(error) => return database_error(error),
    };
    let values = condition.sql();
    let written = sqlx::query(statement.text(&values))
        .bind(&id)
        .bind(value.to_string())
        .bind(&caller)
        .bind_specialized(&values)
        .fetch_optional(&mut *conn)
        .await;
    let row = match written {
        Ok(Some(row)) => row,
        Ok(None) => {
            return refused(&app, &mut conn, &condition, &id, caller.as_deref(), upsert).await
        }
        Err(error) => return database_error(error),
    };
    let (version, created) = match (row_version(&row), row.try_get::<bool, _>("created")) {
        (Ok(version), Ok(created)) => (version, created),
        (Err(error), _) | (_, Err(error)) => return database_error(error),
    };
    if created {
        let location = [(header::LOCATION, format!("/items/{id}"))];
        return (StatusCode::CREATED, version, location, Json(value)).into_response();
    }
    (version, Json(value)).into_response()
}

/// A shallow merge (`null` removes a field): read, check, write, in one transaction
/// holding the row's lock.
async fn patch_item(
    Path(id): Path<String>,
    State(app): State<App>,
    condition: RowPrecondition,
    headers: HeaderMap,
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
    // Run to the end in a task of its own, even if the client goes away: see
    // `uncancelled`.
    let result: Result<Response, sqlx::Error> = uncancelled(async move {
        let mut tx = app.pool.begin().await?;
        let row = sqlx::query(&app.sql.lock)
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
        let row = match row {
            Some(row) if visible(&row, caller(&headers).as_deref()) => row,
            Some(_) => return Ok(not_found(&id)),
            // `If-Match` on a missing item is a `412`; otherwise it is a `404`.
            None => {
                return Ok(condition
                    .check(None)
                    .map_or_else(IntoResponse::into_response, |()| not_found(&id)))
            }
        };
        if let Err(not_applied) = condition.check(Some(&row_version(&row)?)) {
            return Ok(not_applied.into_response()); // dropping `tx` rolls back
        }
        let mut item: Value = serde_json::from_str(row.try_get("body")?)
            .map_err(|e| sqlx::Error::Decode(e.into()))?;
        let Value::Object(fields) = &mut item else {
            let detail = format!("item {id:?} is not a JSON object, so it cannot be merged into");
            return Ok(problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Not an object",
                detail,
            ));
        };
        merge(fields, patch);
        let row = sqlx::query(&app.sql.write)
            .bind(&id)
            .bind(item.to_string())
            .fetch_one(&mut *tx)
            .await?;
        let version = row_version(&row)?;
        tx.commit().await?;
        Ok((version, Json(item)).into_response())
    })
    .await;
    result.unwrap_or_else(database_error)
}

/// Runs a transaction's work in a task of its own, so that a request dropped mid-way
/// (the client went away) cannot cancel it. A future dropped while sqlx's `begin()`
/// waits for the server's answer to `BEGIN` leaves the pooled connection inside a
/// transaction that nothing ends (sqlx issue 4393, in 0.8 and 0.9): the next request
/// on that connection then runs its one-statement write inside it, is answered `2xx`,
/// and the write is lost when the connection closes. Found by this crate's
/// linearizability tests, under server restarts and clients that give up.
async fn uncancelled<F>(work: F) -> Result<Response, sqlx::Error>
where
    F: std::future::Future<Output = Result<Response, sqlx::Error>> + Send + 'static,
{
    tokio::spawn(work).await.unwrap_or_else(|error| {
        Err(sqlx::Error::Protocol(format!(
            "the write task failed: {error}"
        )))
    })
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
    State(app): State<App>,
    condition: RowPrecondition,
    headers: HeaderMap,
) -> Response {
    let caller = caller(&headers);
    let mut conn = match app.pool.acquire().await {
        Ok(conn) => conn,
        Err(error) => return database_error(error),
    };
    let values = condition.sql();
    let deleted = sqlx::query(app.sql.delete.text(&values))
        .bind(&id)
        .bind(&caller)
        .bind_specialized(&values)
        .fetch_optional(&mut *conn)
        .await;
    match deleted {
        Ok(Some(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(None) => refused(&app, &mut conn, &condition, &id, caller.as_deref(), false).await,
        Err(error) => database_error(error),
    }
}

/// The application: the routes, behind the row-version layer.
fn app(pool: PgPool, require_preconditions: bool) -> Router {
    let state = App {
        pool,
        sql: Arc::new(Statements::new()),
    };
    Router::new()
        .route(
            "/items/{id}",
            get(get_item)
                .put(put_item)
                .patch(patch_item)
                .delete(delete_item),
        )
        .with_state(state)
        .route_layer(RowVersionLayer::new().require_precondition(require_preconditions))
}

/// Creates the sequence and the table if needed; safe when several processes start at
/// once (an advisory lock orders them).
async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "SELECT pg_advisory_xact_lock(hashtext('{ITEMS}'))"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&PgRowSql::new(ITEMS).create_sequence())
        .execute(&mut *tx)
        .await?;
    let table = format!(
        "CREATE TABLE IF NOT EXISTS {ITEMS} (id TEXT PRIMARY KEY, body JSONB NOT NULL, \
         version BIGINT NOT NULL, modified_at TIMESTAMPTZ NOT NULL)"
    );
    sqlx::query(&table).execute(&mut *tx).await?;
    tx.commit().await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,tower_precondition=debug".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .init();

    let addr = env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let require = env::var("REQUIRE_PRECONDITIONS").is_ok_and(|v| v == "1" || v == "true");
    let url = env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL, e.g. postgres://postgres@127.0.0.1:5432/test")?;

    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await?;
    migrate(&pool).await?;

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    tracing::info!(
        require_preconditions = require,
        "serving /items/{{id}} from Postgres (sqlx)"
    );
    axum::serve(listener, app(pool, require))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
