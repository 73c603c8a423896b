//! Row-version mode: the version lives in the application's own row, and the
//! database checks the precondition in the write statement itself.
//!
//! ```sql
//! UPDATE items SET body = $2, version = nextval('...'), modified_at = ...
//!  WHERE id = $1 AND <the request's precondition>
//!  RETURNING version, modified_at   -- zero rows: the precondition failed
//! ```
//!
//! [`RowVersionLayer`] does the whole HTTP side, as the other two modes do: it parses
//! and validates `If-Match`, `If-None-Match`, `If-Unmodified-Since` and
//! `If-Modified-Since`, applies the `428` policy, and writes every `304`, `400`, `412`
//! and `428` with the same problem+json bodies. It keeps no version and takes no
//! lease. The handler gets a [`RowPrecondition`], binds it into its statement with the
//! [`PgRowSql`] fragments (a [`PgSpecializedStatement`] with `bind_specialized` for
//! sqlx or `SqlCondition::specialized_params` for tokio-postgres, or the generic
//! condition with `bind_condition` / `SqlCondition::params`; `MySqlRowSql` for
//! MariaDB, feature `sqlx-mysql`), and reports what
//! the database said: the new [`RowVersion`] with its `2xx`, or [`NotApplied`] with the
//! row's current version, which the layer turns into `412` with the current `ETag` and
//! `Last-Modified`. Reads return their row's
//! version with the body read in the same statement, so a read's `ETag` always
//! describes exactly the body it travels with.
//!
//! # Which of the three ways to choose
//!
//! | mode | choose it when | database round trips per write |
//! | --- | --- | --- |
//! | row version (this) | the data is in a SQL database and its rows can carry a version column | **one statement** (plus one read when a precondition fails, for the `412`'s validators) |
//! | [transactional](crate::transactional) | the data is in the same Postgres, but the handler must stay unconditional (or writes several tables) | one transaction: `BEGIN`, the version row lock, the handler's statements, the version update, `COMMIT` |
//! | [store](crate::PreconditionLayer) | the data is anywhere else (files, other services, a legacy handler) | reserve, the handler, settle: two store calls around it (three when the layer must load the entry first) |
//!
//! Row version is exact and the fastest: nothing can be lost between a check and a
//! write that are the same statement, a crash leaves the database's answer, and there
//! is no lease, clock or second table.
//!
//! Except on a row many clients write at once. A conditional `UPDATE` that finds the
//! row locked by a concurrent writer waits, then (under `READ COMMITTED`) locks the
//! row's newest version before it re-checks the condition; refused, it has written
//! nothing, but its autocommit still waits for a WAL flush while holding that lock, so
//! refused writers queue one flush after another. Measured on one hot key
//! (`BENCHMARKS.md`), that gives 0.6–0.8x the successful writes of a hand-written
//! `SELECT ... FOR UPDATE` handler, whose refusals roll back without a flush. For such
//! rows use the locked-row path below ([`RowPrecondition::check`] in a transaction that
//! rolls back when the check fails), or run the one statement in a transaction and roll
//! it back on zero rows.
//!
//! # Every form of precondition, in one statement
//!
//! | request | statement | zero rows means |
//! | --- | --- | --- |
//! | `If-Match: "7"` (or a list) | `UPDATE ... WHERE id = $1 AND <condition>` | changed since, or missing: `412` |
//! | `If-Match: *` | the same `UPDATE` | missing: `412` |
//! | `If-None-Match: *` | the upsert ([`RowPrecondition::may_replace`] is false, so the `DO UPDATE` never fires) | exists: `412` |
//! | `If-None-Match: "7"` on a write | the upsert | its version is listed: `412` |
//! | `If-Unmodified-Since` | the `UPDATE` | modified after the date, or within its second after another write: `412` |
//! | none | the upsert | never (for `PATCH` / `DELETE`: missing, the handler's `404`) |
//!
//! The upsert is `INSERT ... ON CONFLICT (id) DO UPDATE SET ... WHERE <condition>`;
//! choose it when [`RowPrecondition::may_create`] is true. After zero rows, read the
//! row's version and pass it to [`RowPrecondition::not_applied`]: it tells a failed
//! precondition (`412`) from a missing row the method may answer `404` for.
//!
//! # A text per form of precondition (Postgres)
//!
//! [`PgRowSql::condition`] is one generic fragment that takes all four values and
//! tests each for `NULL`. [`PgRowSql::specialized`] writes the statement once for
//! every form a condition can take (one `If-Match` tag, a list, `If-None-Match`, a
//! date, none, ...), each comparing only what its form has: a request with one
//! `If-Match` tag runs `... AND items.version = $3::int8`, exactly the statement one
//! would write by hand. [`PgSpecializedStatement::text`] picks the request's text, and
//! `bind_specialized` (sqlx) or `SqlCondition::specialized_params` (tokio-postgres)
//! binds its values. The examples use it; measured side by side (`BENCHMARKS.md`) it
//! makes 1.00–1.12x the writes of the generic text with the same driver.
//!
//! # Read before you write
//!
//! A handler that must read the row to compute the new one (a merge, a counter) locks
//! it in its own transaction, `SELECT ... FOR UPDATE`, calls
//! [`RowPrecondition::check`] with the locked row's version (exactly the RFC 9110
//! rules), and writes. Still one transaction, and no second table.
//!
//! # Versions
//!
//! A version must never repeat for a key, across a delete and a re-create too, and
//! the `ETag` is strong: [`PgRowSql`] draws versions from one shared sequence. Its
//! docs list the other columns (`bigint` counters, `updated_at`, `uuid`) and what each
//! costs.
//!
//! # SQLite
//!
//! With the feature `sqlx-sqlite`, `SqliteRowSql` gives the same fragments for SQLite
//! (numbered `?NNN` parameters, the version lists bound as JSON arrays, the
//! modification time as integer microseconds). SQLite has no sequences: versions come
//! from a counter row per table that two triggers keep at the highest version the
//! table ever held, inside each write statement. SQLite writes one transaction at a
//! time, so a read-then-write handler begins with `BEGIN IMMEDIATE` instead of
//! `SELECT ... FOR UPDATE`; its docs say why, and what a busy database answers.
//!
//! # MariaDB
//!
//! With the feature `sqlx-mysql`, `MySqlRowSql` gives the same mode on MariaDB: its docs
//! say how each difference from Postgres is handled (`?` placeholders bound once, no
//! `RETURNING` on `UPDATE`, `ON DUPLICATE KEY UPDATE`, sequences, time zones).

mod condition;
mod future;
mod layer;
#[cfg(feature = "sqlx-mysql")]
mod mysql;
mod service;
mod sql;
mod version;

#[cfg(feature = "postgres")]
pub mod tokio_postgres;

#[cfg(any(
    feature = "sqlx-postgres",
    feature = "sqlx-mysql",
    feature = "sqlx-sqlite"
))]
pub mod sqlx;

#[cfg(feature = "sqlx-sqlite")]
mod sqlite;

#[cfg(feature = "axum")]
pub use self::condition::MissingRowPrecondition;
#[cfg(feature = "sqlx-mysql")]
pub use self::mysql::{MySqlRowSql, MySqlWritten};
pub use self::{
    condition::{NotApplied, RowPrecondition, SqlCondition},
    future::RowVersionFuture,
    layer::RowVersionLayer,
    service::RowVersionService,
    sql::{PgRowSql, PgSpecializedStatement},
    version::RowVersion,
};

#[cfg(feature = "sqlx-sqlite")]
pub use self::sqlite::SqliteRowSql;
