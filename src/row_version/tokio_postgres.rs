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
    condition::SpecializedValue,
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

    /// The parameters of this condition's text in a
    /// [`PgSpecializedStatement`](super::PgSpecializedStatement), in its order: only
    /// the values its form compares (none to three).
    ///
    /// ```no_run
    /// use tokio_postgres::types::ToSql;
    /// use tower_precondition::row_version::{PgRowSql, RowPrecondition};
    ///
    /// # async fn put(client: &tokio_postgres::Client, condition: RowPrecondition)
    /// # -> Result<(), tokio_postgres::Error> {
    /// let sql = PgRowSql::new("items");
    /// let update = sql.specialized(3, |condition| {
    ///     format!(
    ///         "UPDATE items SET body = $2, {} WHERE id = $1 AND {condition} RETURNING {}",
    ///         sql.assignments(),
    ///         sql.returning(),
    ///     )
    /// });
    /// let values = condition.sql();
    /// let (id, body) = ("item-1", "{}");
    /// let mut params: Vec<&(dyn ToSql + Sync)> = vec![&id, &body];
    /// params.extend_from_slice(&values.specialized_params());
    /// let _row = client.query_opt(update.text(&values), &params).await?;
    /// # Ok(()) }
    /// ```
    pub fn specialized_params(&self) -> SpecializedParams<'_> {
        let mut params = SpecializedParams {
            values: [&NO_VALUE; 3],
            len: 0,
        };
        for value in self.specialized_values() {
            let param: &(dyn ToSql + Sync) = match value {
                SpecializedValue::One(version) => version,
                SpecializedValue::Many(versions) => versions,
                SpecializedValue::Seconds(seconds) => seconds,
            };
            if let Some(slot) = params.values.get_mut(params.len) {
                *slot = param;
                params.len += 1;
            }
        }
        params
    }
}

/// A placeholder for the unused slots of [`SpecializedParams`].
static NO_VALUE: Option<i64> = None;

/// The parameters of [`SqlCondition::specialized_params`]: a slice of up to three.
#[derive(Clone, Copy)]
pub struct SpecializedParams<'a> {
    values: [&'a (dyn ToSql + Sync); 3],
    len: usize,
}

impl<'a> std::ops::Deref for SpecializedParams<'a> {
    type Target = [&'a (dyn ToSql + Sync)];

    fn deref(&self) -> &Self::Target {
        self.values.get(..self.len).unwrap_or_default()
    }
}

impl std::fmt::Debug for SpecializedParams<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpecializedParams")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// The version of `row`, from the columns [`PgRowSql::returning`](super::PgRowSql::returning)
/// names.
pub fn row_version(row: &Row) -> Result<RowVersion, tokio_postgres::Error> {
    let version: i64 = row.try_get(VERSION_COLUMN)?;
    let modified: Option<i64> = row.try_get(MODIFIED_COLUMN)?;
    Ok(RowVersion::from_columns(version, modified))
}
