//! The row-version helpers for tokio-postgres (and deadpool-postgres): the condition's
//! parameters, and the version read back from a row.
//!
//! ```no_run
//! use tokio_postgres::types::ToSql;
//! use tower_precondition::row_version::{
//!     tokio_postgres::row_version, PgRowSql, RowPrecondition,
//! };
//!
//! # async fn put(client: &tokio_postgres::Client, condition: RowPrecondition, id: &str, body: &str)
//! # -> Result<(), tokio_postgres::Error> {
//! let sql = PgRowSql::new("items");
//! let update = format!(
//!     "UPDATE items SET body = $2, {} WHERE id = $1 AND {} RETURNING {}",
//!     sql.assignments(),
//!     sql.condition(3),
//!     sql.returning(),
//! );
//! let values = condition.sql();
//! let [a, b, c, d] = values.params();
//! let params: [&(dyn ToSql + Sync); 6] = [&id, &body, a, b, c, d];
//! match client.query_opt(&update, &params).await? {
//!     Some(row) => { let _version = row_version(&row)?; /* 200, with the version */ }
//!     None => { /* read the current version; condition.not_applied(current) */ }
//! }
//! # Ok(()) }
//! ```

use tokio_postgres::{types::ToSql, Row};

use super::{
    sql::{MODIFIED_COLUMN, VERSION_COLUMN},
    RowVersion, SqlCondition,
};

impl SqlCondition {
    /// The four parameters of [`PgRowSql::condition`](super::PgRowSql::condition), in
    /// its order, for a tokio-postgres statement.
    pub fn params(&self) -> [&(dyn ToSql + Sync); 4] {
        [
            &self.if_match,
            &self.if_none_match,
            &self.unmodified_since,
            &self.may_replace,
        ]
    }
}

/// The version of `row`, from the columns [`PgRowSql::returning`](super::PgRowSql::returning)
/// names.
pub fn row_version(row: &Row) -> Result<RowVersion, tokio_postgres::Error> {
    let version: i64 = row.try_get(VERSION_COLUMN)?;
    let modified: Option<i64> = row.try_get(MODIFIED_COLUMN)?;
    Ok(RowVersion::from_columns(version, modified))
}
