//! A JSON resource server with conditional requests, its items in a SQLite file
//! through sqlx, written in the row-version mode: each item's row carries its version,
//! and the database checks the precondition in the write statement itself.
//!
//! ```text
//! cargo run --example axum_sqlite --features sqlx-sqlite
//! ADDR=127.0.0.1:3001 REQUIRE_PRECONDITIONS=1 DATABASE_URL=sqlite://items.db cargo run --example axum_sqlite --features sqlx-sqlite
//! ```
//!
//! Nothing to install: without `DATABASE_URL` the items live in `axum_sqlite.db` in
//! the current directory, created if missing. `BUSY_TIMEOUT_MS` (default 5000) is how
//! long a write waits for another process's write lock.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /items/{id}` | `200` with the JSON item, its `ETag` and `Cache-Control: no-cache`, `404` when missing, `304` when `If-None-Match` matches |
//! | `PUT /items/{id}` | `201` (created, with `Location`) or `200` (replaced), with the new `ETag` |
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
//! the item to merge into it, so it reads, checks the precondition and writes in one
//! `BEGIN IMMEDIATE` transaction (which holds SQLite's write lock from its start).
//! Several processes on one file serve one consistent set of items.
//!
//! SQLite lets one connection write at a time. A write that cannot get the lock within
//! the busy timeout (another process holds it), or a database that cannot be opened,
//! gets `503` with `Retry-After: 1`: the write did not happen, and may be retried.

use std::{env, error::Error, str::FromStr, sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::{json, Map, Value};
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow},
    Row, SqlitePool,
};
use tower_precondition::row_version::{
    sqlx::{row_version, BindCondition},
    RowPrecondition, RowVersionLayer, SqliteRowSql,
};

/// The items table: the JSON body, and the version columns `SqliteRowSql` writes.
const ITEMS: &str = "axum_sqlite_items";

/// Every statement, built once (sqlx caches prepared statements by their text).
struct Statements {
    read: String,
    upsert: String,
    update: String,
    delete: String,
    write: String,
}

impl Statements {
    fn new() -> Self {
        let v = SqliteRowSql::new(ITEMS);
        let (set, returning) = (v.assignments(), v.returning());
        let owner = format!("CAST(json_extract({ITEMS}.body, '$.owner') AS TEXT)");
        // Private items are their owner's alone: a stranger's write matches no row.
        let visible = format!("({owner} IS NULL OR {owner} = ?3)");
        Self {
            read: format!("SELECT body, {owner} AS owner, {returning} FROM {ITEMS} WHERE id = ?1"),
            // `created_version` is set once, on insert: equal to the version only for
            // the statement that created the row (versions only grow).
            upsert: format!(
                "INSERT INTO {ITEMS} (id, body, {columns}, created_version) \
                 VALUES (?1, ?2, {values}, {next}) \
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body, {set} \
                 WHERE {visible} AND {condition} \
                 RETURNING (created_version = version) AS created, {returning}",
                columns = v.insert_columns(),
                values = v.insert_values(),
                next = v.clone().without_modified_column().insert_values(),
                condition = v.condition(4),
            ),
            update: format!(
                "UPDATE {ITEMS} SET body = ?2, {set} WHERE id = ?1 AND {visible} AND {} \
                 RETURNING false AS created, {returning}",
                v.condition(4)
            ),
            delete: format!(
                "DELETE FROM {ITEMS} WHERE id = ?1 AND ({owner} IS NULL OR {owner} = ?2) \
                 AND {} RETURNING {returning}",
                v.condition(3)
            ),
            write: format!(
                "UPDATE {ITEMS} SET body = ?2, {set} WHERE id = ?1 RETURNING {returning}"
            ),
        }
    }
}

#[derive(Clone)]
struct App {
    pool: SqlitePool,
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

/// Whether `error` means the database is busy (another connection holds the write lock
/// past the busy timeout) or cannot be reached: the write did not happen, and a retry
/// may succeed.
fn unavailable(error: &sqlx::Error) -> bool {
    match error {
        // The primary result code is the low byte of the extended one:
        // SQLITE_BUSY (5), SQLITE_LOCKED (6), SQLITE_IOERR (10), SQLITE_CANTOPEN (14).
        sqlx::Error::Database(e) => e
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6 | 10 | 14)),
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

fn database_error(error: sqlx::Error) -> Response {
    if unavailable(&error) {
        tracing::warn!(%error, "database busy or unavailable");
        let mut response = problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Database busy",
            "the database is busy or unavailable; nothing was changed, try again",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    }
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
fn visible(row: &SqliteRow, caller: Option<&str>) -> bool {
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

/// A conditional write changed no row: read the item once to say why (`412` with
/// its current version, or `404`).
async fn refused(
    app: &App,
    condition: &RowPrecondition,
    id: &str,
    caller: Option<&str>,
    upsert: bool,
) -> Response {
    let current = match sqlx::query(&app.sql.read)
        .bind(id)
        .fetch_optional(&app.pool)
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
    // `fetch_all`, not `fetch_optional`: it runs the statement to its end, so a
    // failed commit is an error here, never a row (see `SqliteRowSql`'s docs).
    let written = sqlx::query(statement)
        .bind(&id)
        .bind(value.to_string())
        .bind(&caller)
        .bind_condition(&condition.sql())
        .fetch_all(&app.pool)
        .await
        .map(|rows| rows.into_iter().next());
    let row = match written {
        Ok(Some(row)) => row,
        Ok(None) => return refused(&app, &condition, &id, caller.as_deref(), upsert).await,
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

/// A shallow merge (`null` removes a field): read, check, write, in one
/// `BEGIN IMMEDIATE` transaction (the write lock is taken before the read).
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
    let result: Result<Response, sqlx::Error> = async {
        let mut tx = app.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(&app.sql.read)
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
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .next()
            .ok_or(sqlx::Error::RowNotFound)?;
        let version = row_version(&row)?;
        tx.commit().await?;
        Ok((version, Json(item)).into_response())
    }
    .await;
    result.unwrap_or_else(database_error)
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
    let deleted = sqlx::query(&app.sql.delete)
        .bind(&id)
        .bind(&caller)
        .bind_condition(&condition.sql())
        .fetch_all(&app.pool)
        .await
        .map(|rows| rows.into_iter().next());
    match deleted {
        Ok(Some(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(None) => refused(&app, &condition, &id, caller.as_deref(), false).await,
        Err(error) => database_error(error),
    }
}

/// The application: the routes, behind the row-version layer.
fn app(pool: SqlitePool, require_preconditions: bool) -> Router {
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

/// Creates the table, the version counter and its triggers if needed, in one
/// `BEGIN IMMEDIATE` transaction: safe when several processes start at once.
async fn migrate(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let table = format!(
        "CREATE TABLE IF NOT EXISTS {ITEMS} (id TEXT PRIMARY KEY, body TEXT NOT NULL, \
         version INTEGER NOT NULL, modified_us INTEGER NOT NULL, \
         created_version INTEGER NOT NULL)"
    );
    sqlx::raw_sql(&table).execute(&mut *tx).await?;
    sqlx::raw_sql(&SqliteRowSql::new(ITEMS).migration())
        .execute(&mut *tx)
        .await?;
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
    let url = env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://axum_sqlite.db".to_owned());
    let busy_timeout = match env::var("BUSY_TIMEOUT_MS") {
        Ok(ms) => Duration::from_millis(ms.parse()?),
        Err(_) => Duration::from_secs(5),
    };

    // WAL: reads never wait for the writer. The busy timeout: how long a write waits
    // for another connection's write lock before it answers 503.
    let options = SqliteConnectOptions::from_str(&url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(busy_timeout);
    // Processes that start at once on a new file can find it locked while another
    // one switches it to WAL (that lock is not waited for): try again a few times.
    let mut attempt = 0;
    let pool = loop {
        let opened = async {
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .acquire_timeout(busy_timeout + Duration::from_secs(5))
                .connect_with(options.clone())
                .await?;
            migrate(&pool).await?;
            Ok::<_, sqlx::Error>(pool)
        }
        .await;
        match opened {
            Ok(pool) => break pool,
            Err(error) if attempt < 20 && unavailable(&error) => {
                attempt += 1;
                tracing::warn!(%error, attempt, "database busy at startup, retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error.into()),
        }
    };

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    tracing::info!(
        require_preconditions = require,
        database = %url,
        "serving /items/{{id}} from SQLite (sqlx)"
    );
    axum::serve(listener, app(pool, require))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
