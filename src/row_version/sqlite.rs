//! [`SqliteRowSql`]: the SQL fragments that put a version into the application's own
//! SQLite statements (through sqlx), and [`BindCondition`](super::sqlx::BindCondition)
//! for SQLite queries.

use ::sqlx::sqlite::{Sqlite, SqliteArguments};

use super::SqlCondition;

/// The SQL fragments of a SQLite table whose rows carry their own version: build them
/// once at startup and `format!` them into the application's statements, as
/// [`PgRowSql`](super::PgRowSql) does for Postgres. Parameters are SQLite's numbered
/// `?NNN`, so the condition can follow the statement's own `?1`, `?2`, ....
///
/// The default columns are `version INTEGER NOT NULL` and `modified_us INTEGER NOT
/// NULL` (the modification time in microseconds since the Unix epoch: SQLite has no
/// timestamp type, and an integer compares exactly).
///
/// ```
/// use http::Request;
/// use sqlx::{sqlite::SqlitePoolOptions, SqlitePool};
/// use tower::{service_fn, ServiceExt};
/// use tower_layer::Layer;
/// use tower_precondition::row_version::{
///     sqlx::{row_version, BindCondition},
///     RowPrecondition, RowVersionLayer, SqliteRowSql,
/// };
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// let pool = SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// let v = SqliteRowSql::new("items");
/// sqlx::raw_sql(
///     "CREATE TABLE items (id TEXT PRIMARY KEY, body TEXT NOT NULL, \
///      version INTEGER NOT NULL, modified_us INTEGER NOT NULL)",
/// )
/// .execute(&pool)
/// .await?;
/// sqlx::raw_sql(&v.migration()).execute(&pool).await?;
///
/// let upsert = format!(
///     "INSERT INTO items (id, body, {columns}) VALUES (?1, ?2, {values}) \
///      ON CONFLICT (id) DO UPDATE SET body = excluded.body, {set} WHERE {condition} \
///      RETURNING {returning}",
///     columns = v.insert_columns(),
///     values = v.insert_values(),
///     set = v.assignments(),
///     condition = v.condition(3),
///     returning = v.returning(),
/// );
/// // A PUT handler: one statement; zero rows means the precondition failed.
/// let put = move |pool: SqlitePool, request: Request<String>| {
///     let upsert = upsert.clone();
///     async move {
///         let condition = request.extensions().get::<RowPrecondition>().unwrap().clone();
///         let row = sqlx::query(&upsert)
///             .bind("a")
///             .bind(request.body().as_str())
///             .bind_condition(&condition.sql())
///             .fetch_all(&pool) // not fetch_optional: see "Run writes to completion"
///             .await?
///             .pop();
///         let response = match row {
///             Some(row) => {
///                 let mut response = http::Response::new(String::from("saved"));
///                 row_version(&row)?.attach(&mut response);
///                 response
///             }
///             // (A full handler reads the current version here for the 412.)
///             None => condition.not_applied(None).unwrap().into_http_response(),
///         };
///         Ok::<_, sqlx::Error>(response)
///     }
/// };
/// let service = RowVersionLayer::new()
///     .layer(service_fn(move |request| put(pool.clone(), request)));
///
/// let first = Request::put("/items/a").body(String::from("{}")).unwrap();
/// let response = service.clone().oneshot(first).await?;
/// let tag = response.headers()["etag"].clone();
/// let stale = Request::put("/items/a").header("if-match", "\"0\"").body(String::new()).unwrap();
/// assert_eq!(service.clone().oneshot(stale).await?.status(), 412);
/// let fresh = Request::put("/items/a").header("if-match", tag.clone()).body(String::new()).unwrap();
/// let response = service.oneshot(fresh).await?;
/// assert_eq!(response.status(), 200);
/// assert_ne!(response.headers()["etag"], tag);
/// # Ok(()) }
/// ```
///
/// # Versions that never repeat, without sequences
///
/// SQLite has no sequences, and one statement writes one table. So versions come from
/// a counter row per table, in [`counter_table`](Self::counter_table) (default
/// `tower_precondition_row_version`): each write reads `last + 1` in its own
/// statement, and two triggers that [`migration`](Self::migration) creates on the
/// table (`AFTER INSERT`, `AFTER UPDATE OF version`) raise `last` to the version just
/// written, inside the same statement. SQLite runs one write transaction at a time
/// for the whole database, and a write statement takes that lock before it reads, so
/// the read, the write and the trigger are atomic: `last` is the highest version the
/// table ever held, deleted rows included, and every new version is above it. A
/// version can therefore never repeat for a key, across a delete and a re-create too.
/// This holds without any clock; a version written by hand (`version = version + 1`)
/// still raises the counter, so it cannot be handed out again later.
///
/// What it costs and needs: one small table and two triggers per versioned table
/// (created by [`migration`](Self::migration), after the table itself), and one more
/// row read and written in every write. It adds no contention: SQLite writers are
/// serialized anyway. Versions are per table; they are unique for a key, not across
/// keys (one `UPDATE` of many rows may give them all one new version).
///
/// # One writer at a time
///
/// SQLite lets one connection write at a time (per database file), and the others wait
/// for it:
///
/// * Open the database in WAL mode (`SqliteConnectOptions::journal_mode(Wal)`):
///   readers never block the writer nor it them, so the read after a refused write and
///   every `GET` go on while a write runs.
/// * Set `busy_timeout` (sqlx's default is 5 s): how long a write waits for the lock
///   before it fails with `SQLITE_BUSY` ("database is locked"). A server should answer
///   that with `503` and `Retry-After`, never with a guess.
/// * The one-statement writes ([`condition`](Self::condition) in an `UPDATE`,
///   `DELETE` or upsert) take the write lock when they start, so they wait for it.
/// * A read-then-write handler (a merge, a counter) must begin its transaction with
///   `BEGIN IMMEDIATE` (sqlx 0.8: `pool.begin_with("BEGIN IMMEDIATE")`), then read,
///   [`RowPrecondition::check`](super::RowPrecondition::check), and write. A plain
///   (deferred) `BEGIN` reads under a shared snapshot and asks for the write lock only
///   at its first write; if another writer committed meanwhile, that upgrade fails at
///   once with `SQLITE_BUSY` (the busy timeout cannot help, its snapshot is stale).
///   There is no `SELECT ... FOR UPDATE`: the `IMMEDIATE` transaction holds the whole
///   database's write lock, which is stronger.
///
/// # Run writes to completion: `fetch_all`, not `fetch_optional`
///
/// A write with `RETURNING` outside a transaction commits when SQLite's statement
/// finishes. sqlx 0.8's SQLite driver stops a `fetch_optional` or `fetch_one` at the
/// first row and resets the statement, which commits it, but it drops the error the
/// reset returns: a commit that failed (a deferred foreign key, a full disk, an I/O
/// error) comes back as the row, and the handler would answer `2xx` for a write that
/// was rolled back (`tests/row_version_sqlite.rs` shows it). Run
/// the one-row writes with `fetch_all` (or `execute`), which steps the statement to
/// its end and reports the commit's error. (Inside a transaction the commit is
/// `commit()`, which reports it.)
///
/// # What it needs from SQLite
///
/// SQLite 3.42 or newer: `RETURNING` (3.35), `unixepoch('subsec')` (3.42) and
/// `json_each` (built in since 3.38). The SQLite that sqlx bundles (0.8: 3.46) has
/// them all.
///
/// # The clock
///
/// `'now'` in SQLite has millisecond resolution, and is the same for a whole
/// statement; the modification column stores it as microseconds (whole milliseconds
/// times 1000), so a first write is never taken for the same-second marker (see
/// [`assignments`](Self::assignments)). Without a modification column
/// ([`without_modified_column`](Self::without_modified_column)) responses carry no
/// `Last-Modified`, `If-Unmodified-Since` on a write fails (`412`), and
/// `If-Modified-Since` never gives a `304`.
///
/// Names are inserted into the SQL as written: they are the application's constants,
/// never request input. The table name must be a plain name (no `schema.` prefix):
/// the triggers are named after it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct SqliteRowSql {
    table: String,
    version: String,
    modified: Option<String>,
    counter: String,
}

/// The current time in microseconds since the epoch, in whole milliseconds (the
/// resolution of SQLite's `'now'`); exact, and the same for the whole statement.
const NOW_US: &str = "(CAST(round(unixepoch('subsec') * 1000) AS INTEGER) * 1000)";

impl SqliteRowSql {
    /// The table that holds each versioned table's highest version by default.
    pub const DEFAULT_COUNTER_TABLE: &'static str = "tower_precondition_row_version";

    /// The fragments for `table`, with the default columns and counter table.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            version: "version".to_owned(),
            modified: Some("modified_us".to_owned()),
            counter: Self::DEFAULT_COUNTER_TABLE.to_owned(),
        }
    }

    /// The `INTEGER` version column (default `version`).
    pub fn version_column(mut self, name: impl Into<String>) -> Self {
        self.version = name.into();
        self
    }

    /// The `INTEGER` modification column, microseconds since the Unix epoch (default
    /// `modified_us`).
    pub fn modified_column(mut self, name: impl Into<String>) -> Self {
        self.modified = Some(name.into());
        self
    }

    /// The table keeps no modification time (see the type's docs for what that costs).
    pub fn without_modified_column(mut self) -> Self {
        self.modified = None;
        self
    }

    /// The table of counter rows (default
    /// [`DEFAULT_COUNTER_TABLE`](Self::DEFAULT_COUNTER_TABLE)); several versioned
    /// tables may share it, each has its own row.
    pub fn counter_table(mut self, name: impl Into<String>) -> Self {
        self.counter = name.into();
        self
    }

    /// The migration to run once the versioned table exists (all statements are
    /// idempotent; run them with `sqlx::raw_sql`, in a `BEGIN IMMEDIATE` transaction
    /// when several processes may start at once): the counter table, this table's
    /// counter row (starting at the table's highest version, so an existing table can
    /// adopt it), and the two triggers that keep the counter at the highest version
    /// ever written.
    pub fn migration(&self) -> String {
        let (table, version, counter) = (&self.table, &self.version, &self.counter);
        let trigger: String = table
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let bump =
            format!("UPDATE {counter} SET last = max(last, NEW.{version}) WHERE name = '{table}'");
        format!(
            "CREATE TABLE IF NOT EXISTS {counter} (name TEXT PRIMARY KEY, last INTEGER NOT NULL);\n\
             INSERT INTO {counter} (name, last) SELECT '{table}', coalesce(max({version}), 0) \
             FROM {table} WHERE true ON CONFLICT (name) DO UPDATE SET last = max(last, excluded.last);\n\
             CREATE TRIGGER IF NOT EXISTS {trigger}_row_version_insert AFTER INSERT ON {table} \
             BEGIN {bump}; END;\n\
             CREATE TRIGGER IF NOT EXISTS {trigger}_row_version_update AFTER UPDATE OF {version} \
             ON {table} BEGIN {bump}; END;\n"
        )
    }

    /// The next version: one above the highest the table ever held.
    fn next_version(&self) -> String {
        format!(
            "(SELECT last + 1 FROM {} WHERE name = '{}')",
            self.counter, self.table
        )
    }

    /// The version columns for an `INSERT`'s column list: `version, modified_us`.
    pub fn insert_columns(&self) -> String {
        match &self.modified {
            Some(modified) => format!("{}, {modified}", self.version),
            None => self.version.clone(),
        }
    }

    /// Their values for a new row: the next version, and the current time.
    pub fn insert_values(&self) -> String {
        match &self.modified {
            Some(_) => format!("{}, {NOW_US}", self.next_version()),
            None => self.next_version(),
        }
    }

    /// The `SET` assignments of a write to an existing row: a fresh version and the
    /// modification time.
    ///
    /// The date never goes backwards, and a write in the same second as the row's
    /// previous one (or after the clock stepped back) is stored at the last
    /// microsecond of the previous write's second (`<second>.999999`): a marker that
    /// its date names two versions, so that an `If-Unmodified-Since` naming that
    /// second can never pass. Responses still show the true second.
    pub fn assignments(&self) -> String {
        let (table, version) = (&self.table, &self.version);
        let next = self.next_version();
        match &self.modified {
            Some(m) => format!(
                "{version} = {next}, \
                 {m} = CASE WHEN {table}.{m} >= ({NOW_US} / 1000000) * 1000000 \
                 THEN ({table}.{m} / 1000000) * 1000000 + 999999 ELSE {NOW_US} END"
            ),
            None => format!("{version} = {next}"),
        }
    }

    /// The condition on the existing row, to `AND` into the statement's `WHERE` (or an
    /// upsert's `ON CONFLICT ... DO UPDATE ... WHERE`), taking four parameters from
    /// `?first`: the values of [`SqlCondition`], in its order, the version lists
    /// bound as one JSON array each. Bind them with
    /// [`bind_condition`](super::sqlx::BindCondition::bind_condition).
    pub fn condition(&self, first: usize) -> String {
        let table = &self.table;
        let version = &self.version;
        let (m, n, s, r) = (first, first + 1, first + 2, first + 3);
        let since = match &self.modified {
            Some(modified) => {
                format!("(?{s} IS NULL OR {table}.{modified} < ?{s} * 1000000 + 999999)")
            }
            // Nothing to compare a date with: a write's `If-Unmodified-Since` fails.
            None => format!("?{s} IS NULL"),
        };
        format!(
            "(?{r} \
             AND (?{m} IS NULL OR {table}.{version} IN (SELECT value FROM json_each(?{m}))) \
             AND (?{n} IS NULL OR {table}.{version} NOT IN (SELECT value FROM json_each(?{n}))) \
             AND {since})"
        )
    }

    /// The version columns for a `RETURNING` or `SELECT` list, named as
    /// [`row_version`](super::sqlx::row_version) reads them (`row_version`,
    /// `row_modified_us`).
    pub fn returning(&self) -> String {
        let version = &self.version;
        match &self.modified {
            Some(m) => format!("{version} AS row_version, {m} AS row_modified_us"),
            None => format!("{version} AS row_version, NULL AS row_modified_us"),
        }
    }
}

/// A version list as one SQLite value: a JSON array of integers, or `NULL`.
fn json_list(list: Option<&[i64]>) -> Option<String> {
    list.map(|versions| {
        let items: Vec<String> = versions.iter().map(i64::to_string).collect();
        format!("[{}]", items.join(","))
    })
}

super::sqlx::impl_bind_condition!('q, Sqlite, SqliteArguments<'q>, |c: &SqlCondition| (
    json_list(c.if_match()),
    json_list(c.if_none_match()),
    c.unmodified_since,
    c.may_replace,
));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_numbered_from_first() {
        let text = SqliteRowSql::new("t").condition(5);
        for n in 5..=8 {
            assert!(text.contains(&format!("?{n}")), "{text}");
        }
        assert!(!text.contains("?9") && !text.contains("?4"));
    }

    #[test]
    fn lists_are_json_arrays() {
        assert_eq!(json_list(Some(&[3, -4])), Some("[3,-4]".to_owned()));
        assert_eq!(json_list(Some(&[])), Some("[]".to_owned()));
        assert_eq!(json_list(None), None);
    }

    #[test]
    fn fragments_without_a_modified_column() {
        let sql = SqliteRowSql::new("t").without_modified_column();
        assert_eq!(sql.insert_columns(), "version");
        assert!(sql.condition(1).contains("?3 IS NULL)"));
        assert!(sql.returning().ends_with("NULL AS row_modified_us"));
    }
}
