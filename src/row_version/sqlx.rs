//! The row-version helpers for sqlx: bind the condition in one call
//! ([`BindCondition`], for each database the features enable), and read the version back
//! from a row ([`row_version`], any database).
//!
//! For Postgres (for SQLite see `SqliteRowSql`, for MariaDB `MySqlRowSql`):
//!
#![cfg_attr(feature = "sqlx-postgres", doc = "```no_run")]
#![cfg_attr(not(feature = "sqlx-postgres"), doc = "```ignore")]
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
//!
//! For MariaDB (feature `sqlx-mysql`), `MySqlRowSql` has the fragments and runs the
//! write (`MySqlRowSql::write`): MariaDB has no `RETURNING` on `UPDATE`.

use ::sqlx::{ColumnIndex, Decode, FromRow, Row, Type};

use super::{
    sql::{MODIFIED_COLUMN, VERSION_COLUMN},
    RowVersion, SqlCondition,
};

/// Binds the four values of a [`SqlCondition`] onto a sqlx query, in the order the
/// database's fragments number them ([`PgRowSql::condition`](super::PgRowSql::condition)
/// for Postgres, `SqliteRowSql::condition` for SQLite, where each version list is bound
/// as one JSON array, `MySqlRowSql::condition` for MariaDB, whose lists are bound as one
/// comma-separated text value each).
pub trait BindCondition: Sized {
    /// This query with the condition's values bound next.
    #[must_use]
    fn bind_condition(self, condition: &SqlCondition) -> Self;
}

/// The version of `row`, from the columns the fragments' `returning()` names
/// (`row_version`, `row_modified_us`). Any database sqlx supports.
pub fn row_version<R>(row: &R) -> Result<RowVersion, ::sqlx::Error>
where
    R: Row,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r str: ColumnIndex<R>,
{
    let version: i64 = row.try_get(VERSION_COLUMN)?;
    let modified: Option<i64> = row.try_get(MODIFIED_COLUMN)?;
    Ok(RowVersion::from_columns(version, modified))
}

/// `query_as::<_, RowVersion>` for statements that return only the version.
impl<'a, R> FromRow<'a, R> for RowVersion
where
    R: Row,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r str: ColumnIndex<R>,
{
    fn from_row(row: &'a R) -> Result<Self, ::sqlx::Error> {
        row_version(row)
    }
}

/// Implements [`BindCondition`] for the three query kinds of one database (`Query`,
/// `QueryAs`, `QueryScalar`): `$values` maps a condition to the four values that
/// database binds, in the order its fragments number them.
macro_rules! impl_bind_condition {
    ($q:lifetime, $db:ty, $args:ty, $values:expr) => {
        impl<$q> $crate::row_version::sqlx::BindCondition for ::sqlx::query::Query<$q, $db, $args> {
            fn bind_condition(self, condition: &$crate::row_version::SqlCondition) -> Self {
                let (if_match, if_none_match, since, may_replace) = ($values)(condition);
                self.bind(if_match)
                    .bind(if_none_match)
                    .bind(since)
                    .bind(may_replace)
            }
        }

        impl<$q, O> $crate::row_version::sqlx::BindCondition
            for ::sqlx::query::QueryAs<$q, $db, O, $args>
        {
            fn bind_condition(self, condition: &$crate::row_version::SqlCondition) -> Self {
                let (if_match, if_none_match, since, may_replace) = ($values)(condition);
                self.bind(if_match)
                    .bind(if_none_match)
                    .bind(since)
                    .bind(may_replace)
            }
        }

        impl<$q, O> $crate::row_version::sqlx::BindCondition
            for ::sqlx::query::QueryScalar<$q, $db, O, $args>
        {
            fn bind_condition(self, condition: &$crate::row_version::SqlCondition) -> Self {
                let (if_match, if_none_match, since, may_replace) = ($values)(condition);
                self.bind(if_match)
                    .bind(if_none_match)
                    .bind(since)
                    .bind(may_replace)
            }
        }
    };
}
// The MariaDB and SQLite modules implement theirs with it too.
#[cfg(any(feature = "sqlx-mysql", feature = "sqlx-sqlite"))]
pub(super) use impl_bind_condition;

// Postgres binds the lists as `int8[]`.
#[cfg(feature = "sqlx-postgres")]
impl_bind_condition!('q, ::sqlx::postgres::Postgres, ::sqlx::postgres::PgArguments, |c: &SqlCondition| (
    c.if_match.clone(),
    c.if_none_match.clone(),
    c.unmodified_since,
    c.may_replace,
));
