//! A JSON resource server with conditional requests, its items in Postgres through
//! tokio-postgres and deadpool-postgres, written in the row-version mode: each item's
//! row carries its version, and the database checks the precondition in the write
//! statement itself. (`axum_sqlx` is the same server through sqlx.)
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example axum_tokio_postgres --features postgres,axum
//! ADDR=127.0.0.1:3001 REQUIRE_PRECONDITIONS=1 DATABASE_URL=... cargo run --example axum_tokio_postgres --features postgres,axum
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

use std::{env, error::Error, fmt::Display, sync::Arc};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use deadpool_postgres::{Client, Manager, ManagerConfig, Pool, RecyclingMethod};
use serde_json::{json, Map, Value};
use tokio_postgres::{types::ToSql, NoTls, Row};
use tower_precondition::row_version::{
    tokio_postgres::row_version, PgRowSql, PgSpecializedStatement, RowPrecondition, RowVersionLayer,
};

/// The items table: the JSON body, and the version columns `PgRowSql` writes.
const ITEMS: &str = "axum_tokio_postgres_items";

/// Every statement, built once; each connection prepares it once (`prepare_cached`).
/// Bodies travel as text (`$2::text::jsonb`), so no JSON feature of the driver is needed.
struct Statements {
    read: String,
    // A text per form of precondition, each comparing only what the request sent.
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
        let item = format!("body::text AS body, body->>'owner' AS owner, {returning}");
        // Private items are their owner's alone: a stranger's write matches no row.
        let visible = |caller: usize| {
            format!("({ITEMS}.body->>'owner' IS NULL OR {ITEMS}.body->>'owner' = ${caller})")
        };
        Self {
            read: format!("SELECT {item} FROM {ITEMS} WHERE id = $1"),
            upsert: v.specialized(4, |condition| {
                format!(
                    "INSERT INTO {ITEMS} (id, body, {columns}) VALUES ($1, $2::text::jsonb, {values}) \
                     ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, {set} \
                     WHERE {visible} AND {condition} RETURNING (xmax = 0) AS created, {returning}",
                    columns = v.insert_columns(),
                    values = v.insert_values(),
                    visible = visible(3),
                )
            }),
            update: v.specialized(4, |condition| {
                format!(
                    "UPDATE {ITEMS} SET body = $2::text::jsonb, {set} WHERE id = $1 AND {} \
                     AND {condition} RETURNING false AS created, {returning}",
                    visible(3),
                )
            }),
            delete: v.specialized(3, |condition| {
                format!(
                    "DELETE FROM {ITEMS} WHERE id = $1 AND {} AND {condition} RETURNING {returning}",
                    visible(2),
                )
            }),
            lock: format!("SELECT {item} FROM {ITEMS} WHERE id = $1 FOR UPDATE"),
            write: format!(
                "UPDATE {ITEMS} SET body = $2::text::jsonb, {set} WHERE id = $1 RETURNING {returning}"
            ),
        }
    }
}

#[derive(Clone)]
struct App {
    pool: Pool,
    sql: Arc<Statements>,
}

/// A failure of the database (or of the pool): logged, and answered with a `500`.
/// Any error converts into it, so handlers use `?`.
struct DatabaseError(String);

impl<E: Display> From<E> for DatabaseError {
    fn from(error: E) -> Self {
        Self(error.to_string())
    }
}

impl IntoResponse for DatabaseError {
    fn into_response(self) -> Response {
        tracing::error!(error = %self.0, "database error");
        let detail = "the item could not be read or stored; nothing was changed";
        problem(StatusCode::INTERNAL_SERVER_ERROR, "Database error", detail)
    }
}

type Answer = Result<Response, DatabaseError>;

/// A small RFC 9457 problem document, like the ones the layer writes.
fn problem(status: StatusCode, title: &str, detail: impl Into<String>) -> Response {
    let body = json!({"type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail.into()});
    let content_type = [(header::CONTENT_TYPE, "application/problem+json")];
    (status, content_type, body.to_string()).into_response()
}

fn not_found(id: &str) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "Not found",
        format!("no item {id:?}"),
    )
}

fn invalid_json(error: serde_json::Error) -> Response {
    let detail = format!("the request body is not valid JSON: {error}");
    problem(StatusCode::BAD_REQUEST, "Invalid JSON", detail)
}

fn not_an_object(detail: impl Into<String>) -> Response {
    problem(StatusCode::UNPROCESSABLE_ENTITY, "Not an object", detail)
}

/// Who is asking: `Authorization: Bearer <name>`, or nobody.
fn caller(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::to_owned)
}

/// Whether `caller` may see the item read into `row` (its `owner` column).
fn visible(row: &Row, caller: Option<&str>) -> bool {
    match row.try_get::<_, Option<&str>>("owner") {
        Ok(Some(owner)) => caller == Some(owner),
        Ok(None) => true,
        Err(_) => false,
    }
}

/// The body and version come from one row read, so the `ETag` names this body.
/// `no-cache`: items change at any time, so caches must revalidate before reuse.
async fn get_item(Path(id): Path<String>, State(app): State<App>, headers: HeaderMap) -> Answer {
    let client = app.pool.get().await?;
    let read = client.prepare_cached(&app.sql.read).await?;
    match client.query_opt(&read, &[&id]).await? {
        Some(row) if visible(&row, caller(&headers).as_deref()) => {
            let body: String = row.try_get("body")?;
            let headers = [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-cache"),
            ];
            Ok((row_version(&row)?, headers, body).into_response())
        }
        _ => Ok(not_found(&id)),
    }
}

/// A conditional write changed no row: read the item once to say why (`412` with
/// its current version, or `404`).
async fn refused(
    client: &Client,
    app: &App,
    condition: &RowPrecondition,
    id: &str,
    caller: Option<&str>,
    upsert: bool,
) -> Answer {
    let read = client.prepare_cached(&app.sql.read).await?;
    let current = match client.query_opt(&read, &[&id]).await? {
        Some(row) if !visible(&row, caller) => return Ok(not_found(id)),
        Some(row) => Some(row_version(&row)?),
        None => None,
    };
    // A refused upsert found the row, even if it is gone now: a 412, never a 404.
    if upsert {
        return Ok(condition.upsert_not_applied(current).into_response());
    }
    Ok(match condition.not_applied(current) {
        Some(not_applied) => not_applied.into_response(),
        None => not_found(id),
    })
}

/// Create or replace, in one statement: the upsert when the precondition allows a
/// create, the plain update when it needs a current version (`If-Match`).
async fn put_item(
    Path(id): Path<String>,
    State(app): State<App>,
    condition: RowPrecondition,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => return Ok(invalid_json(error)),
    };
    let caller = caller(&headers);
    let upsert = condition.may_create();
    let statement = if upsert {
        &app.sql.upsert
    } else {
        &app.sql.update
    };
    let client = app.pool.get().await?;
    let values = condition.sql();
    let statement = client.prepare_cached(statement.text(&values)).await?;
    let text = value.to_string();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&id, &text, &caller];
    params.extend_from_slice(&values.specialized_params());
    let written = client.query_opt(&statement, &params).await?;
    let Some(row) = written else {
        return refused(&client, &app, &condition, &id, caller.as_deref(), upsert).await;
    };
    let version = row_version(&row)?;
    if row.try_get("created")? {
        let location = [(header::LOCATION, format!("/items/{id}"))];
        return Ok((StatusCode::CREATED, version, location, Json(value)).into_response());
    }
    Ok((version, Json(value)).into_response())
}

/// A shallow merge (`null` removes a field): read, check, write, in one transaction
/// holding the row's lock.
async fn patch_item(
    Path(id): Path<String>,
    State(app): State<App>,
    condition: RowPrecondition,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let patch = match serde_json::from_slice(&body) {
        Ok(Value::Object(patch)) => patch,
        Ok(_) => return Ok(not_an_object("a PATCH body must be a JSON object")),
        Err(error) => return Ok(invalid_json(error)),
    };
    let mut client = app.pool.get().await?;
    let tx = client.transaction().await?; // dropped without commit: rolled back
    let lock = tx.prepare_cached(&app.sql.lock).await?;
    let row = match tx.query_opt(&lock, &[&id]).await? {
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
        return Ok(not_applied.into_response());
    }
    let mut item: Value = serde_json::from_str(row.try_get("body")?)?;
    let Value::Object(fields) = &mut item else {
        return Ok(not_an_object(format!(
            "item {id:?} is not a JSON object, so it cannot be merged into"
        )));
    };
    merge(fields, patch);
    let write = tx.prepare_cached(&app.sql.write).await?;
    let row = tx.query_one(&write, &[&id, &item.to_string()]).await?;
    let version = row_version(&row)?;
    tx.commit().await?;
    Ok((version, Json(item)).into_response())
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
) -> Answer {
    let caller = caller(&headers);
    let client = app.pool.get().await?;
    let values = condition.sql();
    let delete = client.prepare_cached(app.sql.delete.text(&values)).await?;
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&id, &caller];
    params.extend_from_slice(&values.specialized_params());
    match client.query_opt(&delete, &params).await? {
        Some(_) => Ok(StatusCode::NO_CONTENT.into_response()),
        None => refused(&client, &app, &condition, &id, caller.as_deref(), false).await,
    }
}

/// The application: the routes, behind the row-version layer.
fn app(pool: Pool, require_preconditions: bool) -> Router {
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
async fn migrate(pool: &Pool) -> Result<(), Box<dyn Error>> {
    let client = pool.get().await?;
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL client_min_messages = warning; \
             SELECT pg_advisory_xact_lock(hashtext('{ITEMS}')); {sequence}; \
             CREATE TABLE IF NOT EXISTS {ITEMS} (id TEXT PRIMARY KEY, body JSONB NOT NULL, \
             version BIGINT NOT NULL, modified_at TIMESTAMPTZ NOT NULL); \
             COMMIT",
            sequence = PgRowSql::new(ITEMS).create_sequence(),
        ))
        .await?;
    Ok(())
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

    let config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = Manager::from_config(url.parse()?, NoTls, config);
    let pool = Pool::builder(manager).max_size(16).build()?;
    migrate(&pool).await?;

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    tracing::info!(
        require_preconditions = require,
        "serving /items/{{id}} from Postgres (tokio-postgres)"
    );
    axum::serve(listener, app(pool, require))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
