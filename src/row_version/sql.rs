//! [`PgRowSql`]: the SQL fragments that put a version into the application's own
//! Postgres statements.

use super::{
    condition::{ConditionForm, ListForm},
    SqlCondition,
};

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

    /// One statement, written once for every form a condition can take, each text
    /// comparing only what its form has: `statement` gets the condition fragment
    /// (for a request with one `If-Match` tag, `items.version = $3::int8`) and returns
    /// the whole statement, as for [`condition`](Self::condition). Build it once at
    /// startup; per request, [`PgSpecializedStatement::text`] picks the text, and
    /// `bind_specialized` (sqlx) or `SqlCondition::specialized_params`
    /// (tokio-postgres) binds the values that text takes, numbered from `first`.
    ///
    /// The database runs the fastest statement for each request: the generic
    /// [`condition`](Self::condition) tests all four values for `NULL` and binds the
    /// version lists as arrays, which costs it about a tenth of a simple write
    /// (`BENCHMARKS.md`). The texts are a fixed set (at most 19 per statement, a few in
    /// practice), so the drivers' statement caches prepare each once per connection.
    ///
    /// ```
    /// use tower_precondition::row_version::PgRowSql;
    ///
    /// let sql = PgRowSql::new("items");
    /// let update = sql.specialized(3, |condition| {
    ///     format!(
    ///         "UPDATE items SET body = $2, {} WHERE id = $1 AND {condition} RETURNING {}",
    ///         sql.assignments(),
    ///         sql.returning(),
    ///     )
    /// });
    /// // A request without preconditions writes unconditionally:
    /// assert!(update.texts().any(|text| text.contains("WHERE id = $1 AND TRUE RETURNING")));
    /// ```
    pub fn specialized(
        &self,
        first: usize,
        statement: impl Fn(&str) -> String,
    ) -> PgSpecializedStatement {
        let texts = ConditionForm::all()
            .map(|form| statement(&self.condition_of_form(form, first)))
            .collect();
        PgSpecializedStatement { texts }
    }

    /// The condition fragment of one form, its parameters numbered from `first`.
    fn condition_of_form(&self, form: ConditionForm, first: usize) -> String {
        let ConditionForm::Compare {
            if_match,
            if_none_match,
            unmodified_since,
        } = form
        else {
            return "FALSE".to_owned();
        };
        let column = format!("{}.{}", self.table, self.version);
        let mut parameter = first;
        let mut take = || {
            parameter += 1;
            parameter - 1
        };
        let mut parts = Vec::new();
        // `If-Match` passes a listed version, `If-None-Match` one not listed.
        for (list, scalar, array) in [(if_match, "=", "= ANY"), (if_none_match, "<>", "<> ALL")] {
            match list {
                ListForm::Absent => {}
                ListForm::One => parts.push(format!("{column} {scalar} ${}::int8", take())),
                ListForm::Many => parts.push(format!("{column} {array}(${}::int8[])", take())),
            }
        }
        if unmodified_since {
            let n = take();
            parts.push(match &self.modified {
                Some(modified) => format!(
                    "{}.{modified} < to_timestamp(${n}::int8) + interval '999999 microseconds'",
                    self.table
                ),
                // Nothing to compare a date with: the write fails (the value is bound,
                // never `NULL`, and named so that its type is known).
                None => format!("${n}::int8 IS NULL"),
            });
        }
        if parts.is_empty() {
            "TRUE".to_owned()
        } else {
            format!("({})", parts.join(" AND "))
        }
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

/// A statement in one text per form of condition, from
/// [`PgRowSql::specialized`]: [`text`](Self::text) is the one to run for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgSpecializedStatement {
    texts: Box<[String]>,
}

impl PgSpecializedStatement {
    /// The text for `condition`'s form; bind the values it takes with
    /// `bind_specialized` (sqlx) or `SqlCondition::specialized_params`
    /// (tokio-postgres).
    #[must_use]
    pub fn text(&self, condition: &SqlCondition) -> &str {
        let index = condition.form().index();
        debug_assert_eq!(self.texts.len(), ConditionForm::COUNT);
        self.texts.get(index).map_or("", String::as_str)
    }

    /// Every text, one per form (to prepare them at startup, or to log them).
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.texts.iter().map(String::as_str)
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

    /// A condition of `form`, with versions 10, 11, ... and a date.
    fn condition_of(form: ConditionForm) -> SqlCondition {
        let list = |list: ListForm, from: i64| match list {
            ListForm::Absent => None,
            ListForm::One => Some(vec![from]),
            ListForm::Many => Some(vec![from, from + 1, from + 2]),
        };
        match form {
            ConditionForm::Never => SqlCondition {
                if_match: None,
                if_none_match: None,
                unmodified_since: None,
                may_replace: false,
            },
            ConditionForm::Compare {
                if_match,
                if_none_match,
                unmodified_since,
            } => SqlCondition {
                if_match: list(if_match, 10),
                if_none_match: list(if_none_match, 20),
                unmodified_since: unmodified_since.then_some(1_700_000_000),
                may_replace: true,
            },
        }
    }

    #[test]
    fn every_form_has_its_own_text_taking_exactly_the_values_it_binds() {
        let sql = PgRowSql::new("t");
        let statement = sql.specialized(3, |condition| format!("WHERE id = $1 AND {condition}"));
        assert_eq!(statement.texts().count(), ConditionForm::COUNT);
        let mut seen = std::collections::HashSet::new();
        for (index, form) in ConditionForm::all().enumerate() {
            assert_eq!(form.index(), index);
            let condition = condition_of(form);
            assert_eq!(condition.form(), form);
            let text = statement.text(&condition);
            assert!(seen.insert(text.to_owned()), "{text}");
            let values = condition.specialized_values().count();
            for n in 3..3 + values {
                assert!(text.contains(&format!("${n}::")), "{text}");
            }
            assert!(!text.contains(&format!("${}", 3 + values)), "{text}");
        }
        let unconditional = condition_of(ConditionForm::Compare {
            if_match: ListForm::Absent,
            if_none_match: ListForm::Absent,
            unmodified_since: false,
        });
        assert_eq!(statement.text(&unconditional), "WHERE id = $1 AND TRUE");
        let one_tag = condition_of(ConditionForm::Compare {
            if_match: ListForm::One,
            if_none_match: ListForm::Absent,
            unmodified_since: false,
        });
        assert_eq!(
            statement.text(&one_tag),
            "WHERE id = $1 AND (t.version = $3::int8)"
        );
    }

    #[test]
    fn a_list_of_only_foreign_tags_takes_the_form_it_compares_as() {
        // `If-Match` naming no version of ours passes nothing; `If-None-Match` naming
        // none excludes nothing.
        let never = SqlCondition {
            if_match: Some(Vec::new()),
            if_none_match: None,
            unmodified_since: None,
            may_replace: true,
        };
        assert_eq!(never.form(), ConditionForm::Never);
        assert_eq!(never.specialized_values().count(), 0);
        let nothing_excluded = SqlCondition {
            if_match: None,
            if_none_match: Some(Vec::new()),
            unmodified_since: None,
            may_replace: true,
        };
        assert_eq!(nothing_excluded.specialized_values().count(), 0);
        let text = PgRowSql::new("t").specialized(1, str::to_owned);
        assert_eq!(text.text(&never), "FALSE");
        assert_eq!(text.text(&nothing_excluded), "TRUE");
    }

    #[test]
    fn without_a_modified_column_a_date_fails_the_write() {
        let statement = PgRowSql::new("t")
            .without_modified_column()
            .specialized(1, str::to_owned);
        let since = condition_of(ConditionForm::Compare {
            if_match: ListForm::Absent,
            if_none_match: ListForm::Absent,
            unmodified_since: true,
        });
        assert_eq!(statement.text(&since), "($1::int8 IS NULL)");
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
