//! The row-version SQL for SQLite (`SqliteRowSql`, through sqlx), against a database
//! file of each test's own: every form of precondition in one statement, the
//! same-second rule, versions that never repeat across a delete and a re-create, the
//! same-`If-Match` race between connections, and a differential property test against
//! the crate's RFC 9110 evaluator.
//!
//! Conditions are made the way a handler gets them: a request through
//! `RowVersionLayer`, and the `RowPrecondition` it hands on.

use std::{path::PathBuf, sync::Arc, time::Duration};

use http::Method;
use proptest::prelude::*;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tower_precondition::{
    evaluate::{evaluate, Decision},
    row_version::{
        sqlx::{row_version, BindCondition},
        RowPrecondition, RowVersion, SqliteRowSql,
    },
};

#[path = "common/row_condition.rs"]
mod row_condition;
use row_condition::condition;
#[path = "common/row_differential.rs"]
mod row_differential;
use row_differential::{date_field, row_state, tag_field, version_of, BASE};

const TABLE: &str = "items";

/// A fresh database file for one test.
fn database_path(label: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "row_version_sqlite-{label}-{}.db",
        std::process::id()
    ));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    path
}

/// A pool on a fresh file (WAL, a busy timeout), with the test table migrated.
async fn pool(label: &str, connections: u32) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(database_path(label))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(connections)
        .connect_with(options)
        .await
        .expect("open the database");
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} (id TEXT PRIMARY KEY, body TEXT NOT NULL, \
         version INTEGER NOT NULL, modified_us INTEGER NOT NULL)"
    ))
    .execute(&pool)
    .await
    .expect("create the table");
    sqlx::raw_sql(&SqliteRowSql::new(TABLE).migration())
        .execute(&pool)
        .await
        .expect("migrate");
    pool
}

/// The statements of the test table.
struct Sql {
    upsert: String,
    update: String,
    delete: String,
    read: String,
}

impl Sql {
    fn new() -> Self {
        let v = SqliteRowSql::new(TABLE);
        Self {
            upsert: format!(
                "INSERT INTO {TABLE} (id, body, {}) VALUES (?1, ?2, {}) ON CONFLICT (id) DO UPDATE \
                 SET body = excluded.body, {} WHERE {} RETURNING {}",
                v.insert_columns(),
                v.insert_values(),
                v.assignments(),
                v.condition(3),
                v.returning()
            ),
            update: format!(
                "UPDATE {TABLE} SET body = ?2, {} WHERE id = ?1 AND {} RETURNING {}",
                v.assignments(),
                v.condition(3),
                v.returning()
            ),
            delete: format!(
                "DELETE FROM {TABLE} WHERE id = ?1 AND {} RETURNING {}",
                v.condition(2),
                v.returning()
            ),
            read: format!("SELECT {} FROM {TABLE} WHERE id = ?1", v.returning()),
        }
    }

    /// A write: the upsert when the condition may create, the update otherwise.
    async fn put(
        &self,
        pool: &SqlitePool,
        id: &str,
        body: &str,
        c: &RowPrecondition,
    ) -> Option<RowVersion> {
        let statement = if c.may_create() {
            &self.upsert
        } else {
            &self.update
        };
        sqlx::query(statement)
            .bind(id)
            .bind(body)
            .bind_condition(&c.sql())
            .fetch_all(pool)
            .await
            .map(|rows| rows.into_iter().next())
            .expect("write")
            .map(|row| row_version(&row).unwrap())
    }

    async fn delete(&self, pool: &SqlitePool, id: &str, c: &RowPrecondition) -> Option<RowVersion> {
        sqlx::query_as::<_, RowVersion>(&self.delete)
            .bind(id)
            .bind_condition(&c.sql())
            .fetch_all(pool)
            .await
            .map(|rows| rows.into_iter().next())
            .expect("delete")
    }

    async fn read(&self, pool: &SqlitePool, id: &str) -> Option<RowVersion> {
        sqlx::query_as::<_, RowVersion>(&self.read)
            .bind(id)
            .fetch_optional(pool)
            .await
            .expect("read")
    }
}

/// Sets the row's modification time (to put it in a known second).
async fn set_modified(pool: &SqlitePool, id: &str, micros: i64) {
    sqlx::query(&format!(
        "UPDATE {TABLE} SET modified_us = ?2 WHERE id = ?1"
    ))
    .bind(id)
    .bind(micros)
    .execute(pool)
    .await
    .unwrap();
}

fn tag(version: &RowVersion) -> String {
    version.etag().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_form_of_precondition_in_one_statement() {
    let pool = pool("forms", 4).await;
    let sql = Sql::new();
    let id = "forms";
    let put = |headers: Vec<(&'static str, String)>, body: &'static str| {
        let (pool, sql) = (pool.clone(), &sql);
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let c = condition(Method::PUT, &headers).await;
            let written = sql.put(&pool, id, body, &c).await;
            let refused = match &written {
                Some(_) => None,
                None => Some(c.not_applied(sql.read(&pool, id).await)),
            };
            (written, refused)
        }
    };

    // If-Match on a missing row: refused, and a 412 (not a 404).
    let (written, refused) = put(vec![("if-match", "\"1\"".into())], "a").await;
    assert!(written.is_none());
    assert_eq!(refused.unwrap().unwrap().current(), None);
    let (written, refused) = put(vec![("if-match", "*".into())], "a").await;
    assert!(written.is_none() && refused.unwrap().is_some());

    // If-None-Match: * creates once, then is refused with the current version.
    let (v1, _) = put(vec![("if-none-match", "*".into())], "a").await;
    let v1 = v1.expect("create only, on a missing row");
    let (again, refused) = put(vec![("if-none-match", "*".into())], "b").await;
    assert!(again.is_none());
    assert_eq!(refused.unwrap().unwrap().current(), Some(&v1));

    // If-Match with the current tag, in a list, in its gzip form; a weak or stale one
    // is refused.
    let (v2, _) = put(vec![("if-match", tag(&v1))], "b").await;
    let v2 = v2.expect("If-Match with the current tag");
    assert_ne!(v1, v2);
    let (stale, refused) = put(vec![("if-match", tag(&v1))], "c").await;
    assert!(stale.is_none(), "a stale If-Match");
    assert_eq!(refused.unwrap().unwrap().current(), Some(&v2));
    let list = format!("\"0\", {}", tag(&v2));
    let (v3, _) = put(vec![("if-match", list)], "c").await;
    let v3 = v3.expect("If-Match with a list");
    let gzip = format!("\"{}-gzip\"", v3.counter().unwrap());
    let (v4, _) = put(vec![("if-match", gzip)], "d").await;
    let v4 = v4.expect("If-Match with an encoded representation's tag");
    let weak = format!("W/{}", tag(&v4));
    assert!(
        put(vec![("if-match", weak)], "e").await.0.is_none(),
        "weak If-Match"
    );
    let (only_foreign, _) = put(vec![("if-match", "\"x\"".into())], "e").await;
    assert!(only_foreign.is_none(), "If-Match naming no version at all");
    let (v5, _) = put(vec![("if-match", "*".into())], "e").await;
    let v5 = v5.expect("If-Match: * on an existing row");

    // If-None-Match with tags on a write: refused when the current one is listed.
    let (listed, refused) = put(
        vec![("if-none-match", format!("\"0\", W/{}", tag(&v5)))],
        "f",
    )
    .await;
    assert!(listed.is_none() && refused.unwrap().is_some());
    let (v6, _) = put(vec![("if-none-match", tag(&v1))], "f").await;
    let v6 = v6.expect("If-None-Match naming another version");

    // If-Unmodified-Since: a date in the row's second passes once the row is alone in
    // it; an earlier date fails.
    set_modified(&pool, id, 1_577_836_800_500_000).await; // 2020-01-01 00:00:00.5
    let date = "Wed, 01 Jan 2020 00:00:00 GMT";
    let (before, _) = put(
        vec![(
            "if-unmodified-since",
            "Tue, 31 Dec 2019 23:59:59 GMT".into(),
        )],
        "g",
    )
    .await;
    assert!(before.is_none(), "modified after the date");
    let (v7, _) = put(vec![("if-unmodified-since", date.into())], "g").await;
    let v7 = v7.expect("unmodified since the row's own second");
    assert!(!v7.last_modified_ambiguous());
    assert!(v7.counter() > v6.counter());

    // No precondition: always applies.
    let (v8, _) = put(vec![], "h").await;
    assert!(v8.expect("unconditional").counter() > v7.counter());

    // Delete: If-None-Match: * never deletes; a stale If-Match neither.
    let star = condition(Method::DELETE, &[("if-none-match", "*")]).await;
    assert!(sql.delete(&pool, id, &star).await.is_none());
    let stale = condition(Method::DELETE, &[("if-match", &tag(&v1))]).await;
    assert!(sql.delete(&pool, id, &stale).await.is_none());
    assert!(stale.not_applied(sql.read(&pool, id).await).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_date_from_before_two_writes_in_one_second_never_passes() {
    let pool = pool("second", 2).await;
    let sql = Sql::new();
    let plain = condition::<&str>(Method::PUT, &[]).await;
    let id = "second";
    let mut checked = false;
    // Two writes straddle a second boundary now and then: try until a pair shares one.
    for _ in 0..20 {
        let first = sql.put(&pool, id, "a", &plain).await.unwrap();
        let second = sql.put(&pool, id, "b", &plain).await.unwrap();
        if !second.last_modified_ambiguous() {
            continue;
        }
        assert!(!first.last_modified_ambiguous() || checked);
        assert_eq!(first.last_modified(), second.last_modified());
        let date = httpdate::fmt_http_date(first.last_modified().unwrap());
        let c = condition(Method::PUT, &[("if-unmodified-since", &date)]).await;
        assert!(
            sql.put(&pool, id, "stale", &c).await.is_none(),
            "a date from before the second write passed"
        );
        let refused = c.not_applied(sql.read(&pool, id).await).unwrap();
        assert_eq!(refused.current(), Some(&second));
        checked = true;
        break;
    }
    assert!(checked, "no two writes landed in one second in 20 tries");

    // A clock that stepped back (the stored date is in the future): the date does not
    // go backwards, and the write is marked.
    let future = 4_102_444_800_250_000; // 2100-01-01 00:00:00.25
    set_modified(&pool, id, future).await;
    let after = sql.put(&pool, id, "c", &plain).await.unwrap();
    assert!(after.last_modified_ambiguous());
    let stored: i64 = sqlx::query_scalar("SELECT modified_us FROM items WHERE id = ?1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 4_102_444_800_999_999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_never_repeat_across_a_delete_and_a_re_create() {
    let pool = pool("recreate", 2).await;
    let sql = Sql::new();
    let plain = condition::<&str>(Method::PUT, &[]).await;
    let plain_delete = condition::<&str>(Method::DELETE, &[]).await;
    let id = "recreate";
    let mut seen = Vec::new();
    for _ in 0..5 {
        let old = sql.put(&pool, id, "a", &plain).await.unwrap();
        // Another key's writes do not matter; this key's last version is the highest.
        sql.put(&pool, "other", "x", &plain).await.unwrap();
        let stale = condition(Method::DELETE, &[("if-match", "\"0\"")]).await;
        assert!(sql.delete(&pool, id, &stale).await.is_none());
        assert!(stale.not_applied(sql.read(&pool, id).await).is_some());
        let current = condition(Method::DELETE, &[("if-match", &tag(&old))]).await;
        assert_eq!(sql.delete(&pool, id, &current).await, Some(old.clone()));
        // Deleting a missing row unconditionally: no row, and the handler's 404.
        assert!(sql.delete(&pool, id, &plain_delete).await.is_none());
        assert!(plain_delete
            .not_applied(sql.read(&pool, id).await)
            .is_none());
        // Also delete the other key, so that the table is empty: the highest version
        // lives only in the counter now.
        sqlx::query("DELETE FROM items")
            .execute(&pool)
            .await
            .unwrap();
        let new = sql.put(&pool, id, "b", &plain).await.unwrap();
        assert!(new.counter() > old.counter(), "{new:?} after {old:?}");
        let old_tag = condition(Method::PUT, &[("if-match", &tag(&old))]).await;
        assert!(sql.put(&pool, id, "c", &old_tag).await.is_none());
        seen.push(old.counter().unwrap());
        seen.push(new.counter().unwrap());
    }
    let mut unique = seen.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a version repeated: {seen:?}");

    // A version written by hand still raises the counter: the next one is above it.
    sqlx::query("UPDATE items SET version = 1000 WHERE id = ?1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM items")
        .execute(&pool)
        .await
        .unwrap();
    let next = sql.put(&pool, id, "d", &plain).await.unwrap();
    assert_eq!(next.counter(), Some(1001));

    // The migration runs again without harm, and keeps the counter.
    sqlx::raw_sql(&SqliteRowSql::new(TABLE).migration())
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM items")
        .execute(&pool)
        .await
        .unwrap();
    let after = sql.put(&pool, id, "e", &plain).await.unwrap();
    assert_eq!(after.counter(), Some(1002));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_writes_with_the_same_if_match_exactly_one_wins() {
    const RACERS: usize = 12;
    const ROUNDS: usize = 10;
    let pool = pool("race", RACERS as u32).await;
    let sql = Arc::new(Sql::new());
    let plain = condition::<&str>(Method::PUT, &[]).await;
    let id = "race";
    let mut current = sql.put(&pool, id, "start", &plain).await.unwrap();
    for round in 0..ROUNDS {
        let c = condition(Method::PUT, &[("if-match", &tag(&current))]).await;
        let start = Arc::new(tokio::sync::Barrier::new(RACERS));
        let racers: Vec<_> = (0..RACERS)
            .map(|i| {
                let (pool, sql, c, start) = (pool.clone(), sql.clone(), c.clone(), start.clone());
                tokio::spawn(async move {
                    let body = format!("racer {i}");
                    start.wait().await;
                    sql.put(&pool, id, &body, &c).await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for racer in racers {
            if let Some(version) = racer.await.unwrap() {
                winners.push(version);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let read = sql.read(&pool, id).await.unwrap();
        assert_eq!(read, winners[0], "the winner's version is the row's");
        current = read;
    }
}

// ---------------------------------------------------------------------------------------
// The differential property test
// ---------------------------------------------------------------------------------------

#[test]
fn the_sql_condition_applies_exactly_when_the_rfc_evaluator_proceeds() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pool = runtime.block_on(pool("differential", 2));
    let sql = Sql::new();
    let config = ProptestConfig {
        cases: 400,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        state in row_state(),
        if_match in tag_field(),
        if_none_match in tag_field(),
        since in date_field(),
    )| {
        let mut headers = Vec::new();
        if let Some(value) = if_match { headers.push(("if-match", value)); }
        if let Some(value) = if_none_match { headers.push(("if-none-match", value)); }
        if let Some(value) = since { headers.push(("if-unmodified-since", value)); }
        let (applied, expected) = runtime.block_on(async {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let c = condition(Method::PUT, &headers).await;
            let current = state.map(|(version, micros)| {
                RowVersion::from_columns(version, Some(BASE * 1_000_000 + micros))
            });
            let evaluated = current.as_ref().map(version_of);
            let expected =
                evaluate(&Method::PUT, c.preconditions(), evaluated.as_ref()) == Decision::Proceed;
            // The locked-row path must agree as well.
            prop_assert_eq!(c.check(current.as_ref()).is_ok(), expected);
            sqlx::query("DELETE FROM items WHERE id = 'd'").execute(&pool).await.unwrap();
            if let Some((version, micros)) = state {
                sqlx::query(
                    "INSERT INTO items (id, body, version, modified_us) VALUES ('d', 'old', ?1, ?2)",
                )
                .bind(version)
                .bind(BASE * 1_000_000 + micros)
                .execute(&pool)
                .await
                .unwrap();
            }
            Ok((sql.put(&pool, "d", "new", &c).await.is_some(), expected))
        })?;
        prop_assert_eq!(applied, expected, "state {:?}, headers {:?}", state, headers);
    });
}

/// Why the writes run with `fetch_all`: a commit that fails (here a deferred foreign
/// key, checked when the autocommit statement finishes) is an error through
/// `fetch_all`, while sqlx 0.8's `fetch_optional` stops at the first row and drops the
/// error of the reset that commits (or, here, rolls back) the statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_is_an_error_through_fetch_all() {
    let pool = pool("commit", 1).await;
    sqlx::raw_sql(
        "PRAGMA foreign_keys = ON; \
         CREATE TABLE parents (id INTEGER PRIMARY KEY); \
         CREATE TABLE children (id INTEGER PRIMARY KEY, parent INTEGER \
         REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let insert = "INSERT INTO children (id, parent) VALUES (?1, 99) RETURNING id";
    let stored = |id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM children WHERE id = ?1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    let all = sqlx::query_scalar::<_, i64>(insert)
        .bind(1)
        .fetch_all(&pool)
        .await;
    assert!(all.is_err(), "fetch_all reports the failed commit: {all:?}");
    assert_eq!(stored(1).await, 0);

    match sqlx::query_scalar::<_, i64>(insert)
        .bind(2)
        .fetch_optional(&pool)
        .await
    {
        Ok(row) => {
            assert_eq!(stored(2).await, 0, "the write was rolled back");
            println!("fetch_optional returned {row:?} for a write that was rolled back");
        }
        Err(error) => println!("fetch_optional reported the failed commit too: {error}"),
    }
}
