//! [`PgRowSql`]: the SQL fragments that put a version into the application's own
//! Postgres statements.

/// The SQL fragments of a table whose rows carry their own version, for Postgres
/// (sqlx or tokio-postgres alike): build them once at startup and `format!` them into
/// the application's statements.
///
/// The default columns are `version BIGINT NOT NULL` and
/// `modified_at TIMESTAMPTZ NOT NULL`, with versions drawn from the sequence
/// `tower_precondition_row_version` ([`create_sequence`](Self::create_sequence)).
/// A sequence shared by every table never hands out a value twice, so a version never
/// repeats for a key, across a delete and a re-create too: the `ETag` of a deleted
/// resource can never match its successor. (A per-row counter that restarts at 1
/// would let it.)
///
/// Names are inserted into the SQL as written: they are the application's constants,
/// never request input.
///
/// ```
/// use tower_precondition::row_version::PgRowSql;
///
/// let sql = PgRowSql::new("items");
/// let update = format!(
///     "UPDATE items SET body = $2, {set} WHERE id = $1 AND {condition} RETURNING {returning}",
///     set = sql.assignments(),
///     condition = sql.condition(3),
///     returning = sql.returning(),
/// );
/// assert!(update.contains("items.version = ANY($3::int8[])"));
/// ```
///
/// # Other version columns, and what each costs
///
/// | column | how | cost |
/// | --- | --- | --- |
/// | `bigint` from the shared sequence (the default) | as above | one `nextval` per write: a brief exclusive lock on the sequence's one page, shared by every table that draws from it, and a WAL record every 32 values (a sequence per table, or `CACHE n`, spreads it; cached values are unique but not in order) |
/// | `bigint` counter (`version = version + 1`) | [`version_column`](Self::version_column) with your own `SET` | repeats after a delete and re-create: only safe where rows are never deleted, or deleted rows keep a tombstone |
/// | an existing `updated_at timestamptz` | [`modified_column`](Self::modified_column), beside a `bigint` version | the dates come from it; alone it cannot be the version: the same-second marker (see [`assignments`](Self::assignments)) gives two writes in one second one value, and so can a clock that steps back |
/// | `uuid` (`gen_random_uuid()`) | [`RowVersion::from_tag`](super::RowVersion::from_tag) and [`RowPrecondition::check`](super::RowPrecondition::check) after `SELECT ... FOR UPDATE` | never repeats, but the one-statement condition compares `bigint`s only: two statements in a transaction |
///
/// Without a modification column ([`without_modified_column`](Self::without_modified_column))
/// responses carry no `Last-Modified`, `If-Unmodified-Since` on a write fails
/// (`412`), and `If-Modified-Since` never gives a `304`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct PgRowSql {
    table: String,
    version: String,
    modified: Option<String>,
    sequence: String,
}

impl PgRowSql {
    /// The sequence versions are drawn from by default.
    pub const DEFAULT_SEQUENCE: &'static str = "tower_precondition_row_version";

    /// The fragments for `table` (as written in the statements: `items`,
    /// `app.items`), with the default columns and sequence.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            version: "version".to_owned(),
            modified: Some("modified_at".to_owned()),
            sequence: Self::DEFAULT_SEQUENCE.to_owned(),
        }
    }

    /// The `bigint` version column (default `version`).
    pub fn version_column(mut self, name: impl Into<String>) -> Self {
        self.version = name.into();
        self
    }

    /// The `timestamptz` modification column (default `modified_at`).
    pub fn modified_column(mut self, name: impl Into<String>) -> Self {
        self.modified = Some(name.into());
        self
    }

    /// The table keeps no modification time (see the type's docs for what that costs).
    pub fn without_modified_column(mut self) -> Self {
        self.modified = None;
        self
    }

    /// The sequence versions are drawn from (default
    /// [`DEFAULT_SEQUENCE`](Self::DEFAULT_SEQUENCE)).
    pub fn sequence(mut self, name: impl Into<String>) -> Self {
        self.sequence = name.into();
        self
    }

    /// Creates the sequence if it does not exist, for the application's migration.
    ///
    /// Safe when several processes (or several tables' migrations) run it at once:
    /// a bare `CREATE SEQUENCE IF NOT EXISTS` is not, and fails one of two concurrent
    /// creators with a unique violation.
    pub fn create_sequence(&self) -> String {
        format!(
            "DO $tp$ BEGIN CREATE SEQUENCE IF NOT EXISTS {}; \
             EXCEPTION WHEN duplicate_table OR unique_violation THEN NULL; END $tp$",
            self.sequence
        )
    }

    /// The version columns for an `INSERT`'s column list: `version, modified_at`.
    pub fn insert_columns(&self) -> String {
        match &self.modified {
            Some(modified) => format!("{}, {modified}", self.version),
            None => self.version.clone(),
        }
    }

    /// Their values for a new row: `nextval('...'), clock_timestamp()`.
    pub fn insert_values(&self) -> String {
        match &self.modified {
            Some(_) => format!("nextval('{}'), clock_timestamp()", self.sequence),
            None => format!("nextval('{}')", self.sequence),
        }
    }

    /// The `SET` assignments of a write to an existing row: a fresh version and the
    /// modification time.
    ///
    /// The date never goes backwards, and a write in the same second as the row's
    /// previous one (or after the clock stepped back) is stored at the last
    /// microsecond of the previous write's second: a marker that its date names two
    /// versions, so that an `If-Unmodified-Since` naming that second can never pass
    /// (DESIGN.md: two writes within one second). Responses still show the true second.
    pub fn assignments(&self) -> String {
        let (table, version, sequence) = (&self.table, &self.version, &self.sequence);
        match &self.modified {
            Some(m) => format!(
                "{version} = nextval('{sequence}'), \
                 {m} = CASE WHEN {table}.{m} >= date_trunc('second', clock_timestamp()) \
                 THEN date_trunc('second', {table}.{m}) + interval '999999 microseconds' \
                 ELSE clock_timestamp() END"
            ),
            None => format!("{version} = nextval('{sequence}')"),
        }
    }

    /// The condition on the existing row, to `AND` into the statement's `WHERE` (or an
    /// upsert's `ON CONFLICT ... DO UPDATE ... WHERE`), taking four parameters from
    /// `$first`: the values of [`SqlCondition`](super::SqlCondition), in its order.
    ///
    /// Bind them with the driver helpers (`bind_condition` for sqlx,
    /// `SqlCondition::params` for tokio-postgres).
    pub fn condition(&self, first: usize) -> String {
        let table = &self.table;
        let version = &self.version;
        let (m, n, s, r) = (first, first + 1, first + 2, first + 3);
        let since = match &self.modified {
            Some(modified) => format!(
                "(${s}::int8 IS NULL OR {table}.{modified} < \
                 to_timestamp(${s}::int8) + interval '999999 microseconds')"
            ),
            // Nothing to compare a date with: a write's `If-Unmodified-Since` fails.
            None => format!("${s}::int8 IS NULL"),
        };
        format!(
            "(${r}::bool \
             AND (${m}::int8[] IS NULL OR {table}.{version} = ANY(${m}::int8[])) \
             AND (${n}::int8[] IS NULL OR {table}.{version} <> ALL(${n}::int8[])) \
             AND {since})"
        )
    }

    /// The version columns for a `RETURNING` or `SELECT` list, named as the driver
    /// helpers read them (`row_version`, `row_modified_us`).
    pub fn returning(&self) -> String {
        let (table, version) = (&self.table, &self.version);
        match &self.modified {
            Some(m) => format!(
                "{table}.{version} AS row_version, \
                 (extract(epoch from {table}.{m}) * 1000000)::int8 AS row_modified_us"
            ),
            None => format!("{table}.{version} AS row_version, NULL::int8 AS row_modified_us"),
        }
    }
}

/// The column names [`PgRowSql::returning`] gives the version.
#[cfg(any(
    feature = "postgres",
    feature = "sqlx-postgres",
    feature = "sqlx-mysql",
    feature = "sqlx-sqlite"
))]
pub(crate) const VERSION_COLUMN: &str = "row_version";
#[cfg(any(
    feature = "postgres",
    feature = "sqlx-postgres",
    feature = "sqlx-mysql",
    feature = "sqlx-sqlite"
))]
pub(crate) const MODIFIED_COLUMN: &str = "row_modified_us";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_without_a_modified_column() {
        let sql = PgRowSql::new("t").without_modified_column().sequence("s");
        assert_eq!(sql.insert_columns(), "version");
        assert_eq!(sql.insert_values(), "nextval('s')");
        assert_eq!(sql.assignments(), "version = nextval('s')");
        assert!(sql.condition(1).contains("$3::int8 IS NULL)"));
        assert!(sql.returning().ends_with("NULL::int8 AS row_modified_us"));
    }

    #[test]
    fn parameters_are_numbered_from_first() {
        let text = PgRowSql::new("t").condition(5);
        for n in 5..=8 {
            assert!(text.contains(&format!("${n}::")), "{text}");
        }
        assert!(!text.contains("$9") && !text.contains("$4"));
    }
}
