//! The row-version helpers for sqlx (Postgres): bind the condition in one call, and
//! read the version back from a row.
//!
//! ```no_run
//! use sqlx::PgPool;
//! use tower_precondition::row_version::{
//!     sqlx::{row_version, BindCondition},
//!     PgRowSql, RowPrecondition,
//! };
//!
//! # async fn put(pool: &PgPool, condition: RowPrecondition, id: &str, body: &str)
//! # -> Result<(), sqlx::Error> {
//! let sql = PgRowSql::new("items");
//! let update = format!(
//!     "UPDATE items SET body = $2, {} WHERE id = $1 AND {} RETURNING {}",
//!     sql.assignments(),
//!     sql.condition(3),
//!     sql.returning(),
//! );
//! let row = sqlx::query(&update)
//!     .bind(id)
//!     .bind(body)
//!     .bind_condition(&condition.sql())
//!     .fetch_optional(pool)
//!     .await?;
//! match row {
//!     Some(row) => { let _version = row_version(&row)?; /* 200, with the version */ }
//!     None => { /* read the current version; condition.not_applied(current) */ }
//! }
//! # Ok(()) }
//! ```

use ::sqlx::{
    postgres::{PgArguments, PgRow, Postgres},
    query::{Query, QueryAs, QueryScalar},
    FromRow, Row,
};

use super::{
    sql::{MODIFIED_COLUMN, VERSION_COLUMN},
    RowVersion, SqlCondition,
};

/// Binds the four parameters of [`PgRowSql::condition`](super::PgRowSql::condition),
/// in its order, onto a sqlx query.
pub trait BindCondition: Sized {
    /// This query with the condition's values bound next.
    #[must_use]
    fn bind_condition(self, condition: &SqlCondition) -> Self;
}

impl<'q> BindCondition for Query<'q, Postgres, PgArguments> {
    fn bind_condition(self, condition: &SqlCondition) -> Self {
        self.bind(condition.if_match.clone())
            .bind(condition.if_none_match.clone())
            .bind(condition.unmodified_since)
            .bind(condition.may_replace)
    }
}

impl<'q, O> BindCondition for QueryAs<'q, Postgres, O, PgArguments> {
    fn bind_condition(self, condition: &SqlCondition) -> Self {
        self.bind(condition.if_match.clone())
            .bind(condition.if_none_match.clone())
            .bind(condition.unmodified_since)
            .bind(condition.may_replace)
    }
}

impl<'q, O> BindCondition for QueryScalar<'q, Postgres, O, PgArguments> {
    fn bind_condition(self, condition: &SqlCondition) -> Self {
        self.bind(condition.if_match.clone())
            .bind(condition.if_none_match.clone())
            .bind(condition.unmodified_since)
            .bind(condition.may_replace)
    }
}

/// The version of `row`, from the columns [`PgRowSql::returning`](super::PgRowSql::returning)
/// names.
pub fn row_version(row: &PgRow) -> Result<RowVersion, ::sqlx::Error> {
    let version: i64 = row.try_get(VERSION_COLUMN)?;
    let modified: Option<i64> = row.try_get(MODIFIED_COLUMN)?;
    Ok(RowVersion::from_columns(version, modified))
}

/// `query_as::<_, RowVersion>` for statements that return only the version.
impl<'r> FromRow<'r, PgRow> for RowVersion {
    fn from_row(row: &'r PgRow) -> Result<Self, ::sqlx::Error> {
        row_version(row)
    }
}
