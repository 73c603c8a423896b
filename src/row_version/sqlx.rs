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

#[cfg(feature = "sqlx-postgres")]
use super::condition::SpecializedValue;
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

/// Binds the values of a [`SqlCondition`] that its text in a
/// [`PgSpecializedStatement`](super::PgSpecializedStatement) takes (Postgres): only
/// those its form compares, one version as `int8`, several as `int8[]`.
///
#[cfg_attr(feature = "sqlx-postgres", doc = "```no_run")]
#[cfg_attr(not(feature = "sqlx-postgres"), doc = "```ignore")]
/// use tower_precondition::row_version::{sqlx::BindSpecialized, PgRowSql, RowPrecondition};
///
/// # async fn put(pool: &sqlx::PgPool, condition: RowPrecondition) -> Result<(), sqlx::Error> {
/// let sql = PgRowSql::new("items");
/// // Once, at startup:
/// let update = sql.specialized(3, |condition| {
///     format!(
///         "UPDATE items SET body = $2, {} WHERE id = $1 AND {condition} RETURNING {}",
///         sql.assignments(),
///         sql.returning(),
///     )
/// });
/// // Per request:
/// let values = condition.sql();
/// let row = sqlx::query(update.text(&values))
///     .bind("item-1")
///     .bind("{}")
///     .bind_specialized(&values)
///     .fetch_optional(pool)
///     .await?;
/// # Ok(()) }
/// ```
pub trait BindSpecialized: Sized {
    /// This query with the values of `condition`'s specialized text bound next.
    #[must_use]
    fn bind_specialized(self, condition: &SqlCondition) -> Self;
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

/// Implements [`BindSpecialized`] for one Postgres query kind.
#[cfg(feature = "sqlx-postgres")]
macro_rules! impl_bind_specialized {
    ($($query:tt)*) => {
        impl<$($query)* {
            fn bind_specialized(mut self, condition: &SqlCondition) -> Self {
                for value in condition.specialized_values() {
                    self = match value {
                        SpecializedValue::One(version) => self.bind(*version),
                        SpecializedValue::Many(versions) => self.bind(versions.clone()),
                        SpecializedValue::Seconds(seconds) => self.bind(*seconds),
                    };
                }
                self
            }
        }
    };
}
#[cfg(feature = "sqlx-postgres")]
impl_bind_specialized!('q> BindSpecialized for ::sqlx::query::Query<'q, ::sqlx::postgres::Postgres, ::sqlx::postgres::PgArguments>);
#[cfg(feature = "sqlx-postgres")]
impl_bind_specialized!('q, O> BindSpecialized for ::sqlx::query::QueryAs<'q, ::sqlx::postgres::Postgres, O, ::sqlx::postgres::PgArguments>);
#[cfg(feature = "sqlx-postgres")]
impl_bind_specialized!('q, O> BindSpecialized for ::sqlx::query::QueryScalar<'q, ::sqlx::postgres::Postgres, O, ::sqlx::postgres::PgArguments>);

// Postgres binds the lists as `int8[]`.
#[cfg(feature = "sqlx-postgres")]
impl_bind_condition!('q, ::sqlx::postgres::Postgres, ::sqlx::postgres::PgArguments, |c: &SqlCondition| (
    c.if_match.clone(),
    c.if_none_match.clone(),
    c.unmodified_since,
    c.may_replace,
));
