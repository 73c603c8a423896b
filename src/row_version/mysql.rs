//! [`MySqlRowSql`]: the SQL fragments that put a version into the application's own
//! MariaDB (or MySQL) statements, through sqlx.

use ::sqlx::{
    mysql::{MySql, MySqlArguments, MySqlConnection},
    query::Query,
};

use super::{RowVersion, SqlCondition};

/// The session variable the assignments leave the new modification time in.
const MODIFIED_VARIABLE: &str = "@tp_row_modified_us";
/// The session variable an upsert's first assignment leaves the condition in.
const APPLIES_VARIABLE: &str = "@tp_row_applies";

/// The SQL fragments of a table whose rows carry their own version, for MariaDB
/// (10.3 and later) through sqlx: build them once at startup and `format!` them into
/// the application's statements, then run each write with [`write`](Self::write).
///
/// The default columns are `version BIGINT NOT NULL` and `modified_us BIGINT NOT
/// NULL` ([`columns`](Self::columns)), the modification time as microseconds since the
/// Unix epoch: an integer, so time-zone free and exact to the microsecond. Versions
/// are drawn from the MariaDB sequence `tower_precondition_row_version`
/// ([`create_sequence`](Self::create_sequence)) with `NEXTVAL`.
///
/// ```
/// use tower_precondition::row_version::MySqlRowSql;
///
/// let sql = MySqlRowSql::new("items");
/// let update = format!(
///     "UPDATE items SET body = ?, {set} WHERE id = ? AND {condition}",
///     set = sql.assignments(),
///     condition = sql.condition(),
/// );
/// assert!(update.contains("version = LAST_INSERT_ID(NEXTVAL(tower_precondition_row_version))"));
/// assert_eq!(update.matches('?').count(), 6);
/// ```
///
/// # What differs from Postgres, and how each is handled
///
/// * **Placeholders are `?`, each bound once, in order.** The condition
///   ([`condition`](Self::condition)) uses each of its four values exactly once, in the
///   order [`BindCondition`](super::sqlx::BindCondition) binds them: `If-Match` and `If-None-Match` as one text
///   value each, the versions joined by commas (`FIND_IN_SET(version, ?)`; `NULL` is
///   no list, so `COALESCE` passes it), `If-Unmodified-Since` in seconds
///   (`COALESCE(modified_us < ? * 1000000 + 999999, TRUE)`), and whether an existing
///   row may be written.
/// * **No `RETURNING` on `UPDATE`** (MariaDB has it on `INSERT` and `DELETE` only,
///   MySQL on none). The new version is assigned as `version =
///   LAST_INSERT_ID(NEXTVAL(...))`, so the statement's own OK packet carries it
///   (`MySqlQueryResult::last_insert_id`), and the new modification time is assigned
///   through the session variable `@tp_row_modified_us`, which [`write`](Self::write)
///   reads on the same connection right after (one more small round trip, no lock
///   held, nothing another session can change). A write that did not apply leaves
///   `last_insert_id` at 0 (a sequence never hands out 0).
/// * **Rows affected.** sqlx always connects with `CLIENT_FOUND_ROWS`, so an `UPDATE`
///   reports the rows its `WHERE` matched, not the rows it changed. Here they are the
///   same: a write that matched always stores a fresh version. For the upsert
///   (`INSERT ... ON DUPLICATE KEY UPDATE`) the count is 1 for an insert and 2 for an
///   update, but with `CLIENT_FOUND_ROWS` a refused update (every column kept) also
///   counts 1, like an insert. That is why a refused upsert sets `LAST_INSERT_ID(0)`,
///   and `write` tells the three apart by `last_insert_id` first, the count second.
///   Without `CLIENT_FOUND_ROWS` (another driver) a refused upsert counts 0, which
///   `write` reads the same way.
/// * **`ON DUPLICATE KEY UPDATE` has no `WHERE`**: each column is written
///   `IF(<condition>, <new>, <old>)`. MariaDB evaluates the assignments left to
///   right, and a later one sees the earlier ones' new values, so the condition
///   (which reads `version` and `modified_us`) is evaluated once, in the first
///   assignment, into `@tp_row_applies`, and the others read that
///   ([`upsert_assignments`](Self::upsert_assignments), then
///   [`upsert_column`](Self::upsert_column) for the application's columns).
/// * **Versions never repeat without Postgres' sequences.** MariaDB's `CREATE
///   SEQUENCE` never hands out a value twice (not rolled back; a restart skips the
///   unused rest of its cache of 1000), so a version never repeats for a key, across
///   a delete and a re-create too. It costs one `NEXTVAL` per write (no lock held).
///   MySQL 8 has no sequences: there, [`next_version`](Self::next_version) can name
///   another expression, such as `UUID_SHORT()`, which is unique while the server's
///   clock never steps back across a restart, below 16 million values a second on
///   average, and fits a signed `BIGINT` only while `server_id` is below 128. A
///   per-row counter (`version + 1`) repeats after a delete and re-create, as in
///   Postgres. MySQL 8 also deprecates (and still runs, with a warning) the two other
///   forms these fragments use: assigning a session variable in an expression
///   (`@v := ...`) and `VALUES(column)` in `ON DUPLICATE KEY UPDATE`; the tests run on
///   MariaDB only.
/// * **Time.** The current time is `UNIX_TIMESTAMP(NOW(6))`, which converts through
///   the session's time zone: exact with `+00:00`, which sqlx sets on every
///   connection by default (`MySqlConnectOptions::timezone`); a zone with daylight
///   saving time would be wrong for an hour a year. `NOW(6)` is the statement's start,
///   the same everywhere in it.
///
/// The same-second rule holds as in [`PgRowSql`](super::PgRowSql): a write in the same
/// second as the row's previous one (or after the clock stepped back) is stored at
/// `<that second>.999999`, and an `If-Unmodified-Since` naming that second fails.
///
/// Names are inserted into the SQL as written: they are the application's constants,
/// never request input.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct MySqlRowSql {
    table: String,
    version: String,
    modified: Option<String>,
    sequence: String,
    next: Option<String>,
}

/// What [`MySqlRowSql::write`] reports of a write that applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MySqlWritten {
    version: RowVersion,
    rows_affected: u64,
}

impl MySqlWritten {
    /// The row's new version.
    pub fn version(&self) -> &RowVersion {
        &self.version
    }

    /// The new version, taken.
    pub fn into_version(self) -> RowVersion {
        self.version
    }

    /// For an upsert: whether it inserted the row (1 row affected) rather than updated
    /// it (2). Meaningless for a plain `UPDATE`, which always reports 1.
    pub fn inserted(&self) -> bool {
        self.rows_affected == 1
    }
}

impl MySqlRowSql {
    /// The sequence versions are drawn from by default.
    pub const DEFAULT_SEQUENCE: &'static str = "tower_precondition_row_version";

    /// The fragments for `table` (as written in the statements), with the default
    /// columns and sequence.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            version: "version".to_owned(),
            modified: Some("modified_us".to_owned()),
            sequence: Self::DEFAULT_SEQUENCE.to_owned(),
            next: None,
        }
    }

    /// The `BIGINT` version column (default `version`).
    pub fn version_column(mut self, name: impl Into<String>) -> Self {
        self.version = name.into();
        self
    }

    /// The `BIGINT` modification column, epoch microseconds (default `modified_us`).
    pub fn modified_column(mut self, name: impl Into<String>) -> Self {
        self.modified = Some(name.into());
        self
    }

    /// The table keeps no modification time: responses carry no `Last-Modified`, a
    /// write's `If-Unmodified-Since` fails (`412`), and [`write`](Self::write) needs
    /// no second round trip.
    pub fn without_modified_column(mut self) -> Self {
        self.modified = None;
        self
    }

    /// The MariaDB sequence versions are drawn from (default
    /// [`DEFAULT_SEQUENCE`](Self::DEFAULT_SEQUENCE)).
    pub fn sequence(mut self, name: impl Into<String>) -> Self {
        self.sequence = name.into();
        self
    }

    /// Another expression for a fresh version instead of `NEXTVAL(<sequence>)` (on
    /// MySQL 8, which has no sequences: see the type's docs for what `UUID_SHORT()`
    /// needs). It must never give the same value twice, nor 0.
    pub fn next_version(mut self, expression: impl Into<String>) -> Self {
        self.next = Some(expression.into());
        self
    }

    fn next(&self) -> String {
        self.next
            .clone()
            .unwrap_or_else(|| format!("NEXTVAL({})", self.sequence))
    }

    /// `CREATE SEQUENCE IF NOT EXISTS ...`, for the application's migration (MariaDB;
    /// several processes may run it at once).
    pub fn create_sequence(&self) -> String {
        format!("CREATE SEQUENCE IF NOT EXISTS {}", self.sequence)
    }

    /// The version columns for a `CREATE TABLE`:
    /// `version BIGINT NOT NULL, modified_us BIGINT NOT NULL`.
    pub fn columns(&self) -> String {
        match &self.modified {
            Some(m) => format!("{} BIGINT NOT NULL, {m} BIGINT NOT NULL", self.version),
            None => format!("{} BIGINT NOT NULL", self.version),
        }
    }

    fn now_us() -> &'static str {
        "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)"
    }

    /// The new modification time of an existing row, with the same-second marker.
    fn modified_value(&self, m: &str) -> String {
        let (table, now) = (&self.table, Self::now_us());
        format!(
            "({MODIFIED_VARIABLE} := IF({table}.{m} >= {now} DIV 1000000 * 1000000, \
             {table}.{m} DIV 1000000 * 1000000 + 999999, {now}))"
        )
    }

    /// The version columns for an `INSERT`'s column list: `version, modified_us`.
    pub fn insert_columns(&self) -> String {
        match &self.modified {
            Some(modified) => format!("{}, {modified}", self.version),
            None => self.version.clone(),
        }
    }

    /// Their values for a new row: a fresh version (into `LAST_INSERT_ID`) and the
    /// current time (into the session variable [`write`](Self::write) reads).
    pub fn insert_values(&self) -> String {
        let version = format!("LAST_INSERT_ID({})", self.next());
        match &self.modified {
            Some(_) => format!("{version}, ({MODIFIED_VARIABLE} := {})", Self::now_us()),
            None => version,
        }
    }

    /// The `SET` assignments of an `UPDATE` of an existing row: a fresh version and the
    /// modification time (the date never goes backwards; a write within the previous
    /// write's second is stored at its last microsecond, the marker).
    pub fn assignments(&self) -> String {
        let version = format!("{} = LAST_INSERT_ID({})", self.version, self.next());
        match &self.modified {
            Some(m) => format!("{version}, {m} = {}", self.modified_value(m)),
            None => version,
        }
    }

    /// The first assignments of an upsert's `ON DUPLICATE KEY UPDATE`: `condition`
    /// (the text of [`condition`](Self::condition), `AND`ed with the application's
    /// own guards) is evaluated once, before any column changes, and decides the
    /// version and modification time. A refused upsert keeps the row and sets
    /// `LAST_INSERT_ID(0)`.
    ///
    /// Write the application's columns after these, each with
    /// [`upsert_column`](Self::upsert_column).
    ///
    /// ```
    /// use tower_precondition::row_version::MySqlRowSql;
    ///
    /// let sql = MySqlRowSql::new("items");
    /// let upsert = format!(
    ///     "INSERT INTO items (id, body, {}) VALUES (?, ?, {}) ON DUPLICATE KEY UPDATE {}, {}",
    ///     sql.insert_columns(),
    ///     sql.insert_values(),
    ///     sql.upsert_assignments(&sql.condition()),
    ///     sql.upsert_column("body", "VALUES(body)"),
    /// );
    /// assert_eq!(upsert.matches('?').count(), 6);
    /// ```
    pub fn upsert_assignments(&self, condition: &str) -> String {
        let (table, version) = (&self.table, &self.version);
        let version = format!(
            "{version} = IF(({APPLIES_VARIABLE} := ({condition})), LAST_INSERT_ID({}), \
             {table}.{version} + 0 * LAST_INSERT_ID(0))",
            self.next()
        );
        match &self.modified {
            Some(m) => format!(
                "{version}, {m} = IF({APPLIES_VARIABLE}, {}, {table}.{m})",
                self.modified_value(m)
            ),
            None => version,
        }
    }

    /// One of the application's columns in an upsert's `ON DUPLICATE KEY UPDATE`,
    /// after [`upsert_assignments`](Self::upsert_assignments): `value` when the
    /// condition held, the old value otherwise.
    pub fn upsert_column(&self, column: &str, value: &str) -> String {
        format!(
            "{column} = IF({APPLIES_VARIABLE}, {value}, {}.{column})",
            self.table
        )
    }

    /// The condition on the existing row, to `AND` into a `WHERE` (or to pass to
    /// [`upsert_assignments`](Self::upsert_assignments)), with four `?` placeholders,
    /// each used once, bound by [`BindCondition::bind_condition`](super::sqlx::BindCondition::bind_condition) in its order.
    pub fn condition(&self) -> String {
        let (table, version) = (&self.table, &self.version);
        let since = match &self.modified {
            Some(m) => format!("COALESCE({table}.{m} < ? * 1000000 + 999999, TRUE)"),
            // Nothing to compare a date with: a write's `If-Unmodified-Since` fails.
            None => "? IS NULL".to_owned(),
        };
        format!(
            "(COALESCE(FIND_IN_SET({table}.{version}, ?), 1) > 0 \
             AND COALESCE(FIND_IN_SET({table}.{version}, ?), 0) = 0 \
             AND {since} AND ? IS TRUE)"
        )
    }

    /// The version columns for a `SELECT` list (or MariaDB's `DELETE ... RETURNING`),
    /// named as [`row_version`](super::sqlx::row_version) reads them.
    pub fn returning(&self) -> String {
        let (table, version) = (&self.table, &self.version);
        match &self.modified {
            Some(m) => {
                format!("{table}.{version} AS row_version, {table}.{m} AS row_modified_us")
            }
            None => {
                format!("{table}.{version} AS row_version, CAST(NULL AS SIGNED) AS row_modified_us")
            }
        }
    }

    /// Runs a write built with [`assignments`](Self::assignments) or
    /// [`upsert_assignments`](Self::upsert_assignments) on `connection` (a pooled
    /// connection or a transaction), and reports the new version, or `None` when the
    /// condition refused it (or an `UPDATE` found no row). With a modification column
    /// it reads `@tp_row_modified_us` on the same connection right after.
    ///
    /// ```no_run
    /// use sqlx::MySqlPool;
    /// use tower_precondition::row_version::{sqlx::BindCondition, MySqlRowSql, RowPrecondition};
    ///
    /// # async fn put(pool: &MySqlPool, condition: RowPrecondition) -> Result<(), sqlx::Error> {
    /// let sql = MySqlRowSql::new("items");
    /// let update = format!(
    ///     "UPDATE items SET body = ?, {} WHERE id = ? AND {}",
    ///     sql.assignments(),
    ///     sql.condition()
    /// );
    /// let mut connection = pool.acquire().await?;
    /// let query = sqlx::query(&update).bind("{}").bind("1").bind_condition(&condition.sql());
    /// match sql.write(&mut connection, query).await? {
    ///     Some(written) => { let _etag = written.version().etag(); /* 200 */ }
    ///     None => { /* read the current version; condition.not_applied(current) */ }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn write<'q>(
        &self,
        connection: &mut MySqlConnection,
        query: Query<'q, MySql, MySqlArguments>,
    ) -> Result<Option<MySqlWritten>, ::sqlx::Error> {
        let done = query.execute(&mut *connection).await?;
        let (id, rows_affected) = (done.last_insert_id(), done.rows_affected());
        if id == 0 || rows_affected == 0 {
            return Ok(None);
        }
        let version = i64::try_from(id).map_err(|e| ::sqlx::Error::Decode(e.into()))?;
        let modified = match self.modified {
            Some(_) => Some(
                ::sqlx::query_scalar::<_, i64>(&format!(
                    "SELECT CAST({MODIFIED_VARIABLE} AS SIGNED)"
                ))
                .fetch_one(&mut *connection)
                .await?,
            ),
            None => None,
        };
        Ok(Some(MySqlWritten {
            version: RowVersion::from_columns(version, modified),
            rows_affected,
        }))
    }
}

/// A version list as one text value for `FIND_IN_SET`: `3,4`, or `NULL`.
fn list(versions: &Option<Vec<i64>>) -> Option<String> {
    versions.as_ref().map(|versions| {
        versions
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    })
}

super::sqlx::impl_bind_condition!('q, MySql, MySqlArguments, |c: &SqlCondition| (
    list(&c.if_match),
    list(&c.if_none_match),
    c.unmodified_since,
    c.may_replace,
));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_placeholder_once() {
        let sql = MySqlRowSql::new("t");
        assert_eq!(sql.condition().matches('?').count(), 4);
        assert!(!sql.assignments().contains('?'));
        assert!(!sql.insert_values().contains('?'));
        let undated = MySqlRowSql::new("t").without_modified_column();
        assert_eq!(undated.condition().matches('?').count(), 4);
        assert_eq!(undated.insert_columns(), "version");
        assert!(undated.returning().ends_with("AS row_modified_us"));
    }

    #[test]
    fn lists_are_one_text_value() {
        assert_eq!(list(&Some(vec![3, -4])).as_deref(), Some("3,-4"));
        assert_eq!(list(&Some(vec![])).as_deref(), Some(""));
        assert_eq!(list(&None), None);
    }
}
