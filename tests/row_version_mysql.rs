//! The row-version SQL of `MySqlRowSql` against the real MariaDB in `MYSQL_URL`: every
//! form of precondition in one statement (the upsert and the plain `UPDATE`), the
//! same-second rule, versions that never repeat across a delete and a re-create, the
//! same-`If-Match` race, and a differential property test: the condition applies
//! exactly when the crate's RFC 9110 evaluator says `Proceed`.
//!
//! Conditions are made the way a handler gets them: a request through
//! `RowVersionLayer`, and the `RowPrecondition` it hands on.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use http::Method;
use proptest::prelude::*;
use sqlx::{mysql::MySqlPoolOptions, MySqlPool};
use tower_precondition::{
    evaluate::{evaluate, Decision},
    row_version::{sqlx::BindCondition, MySqlRowSql, RowPrecondition, RowVersion},
};

#[path = "common/row_condition.rs"]
mod row_condition;
use row_condition::condition;
#[path = "common/row_differential.rs"]
mod row_differential;
use row_differential::{date_field, row_state, tag_field, version_of, BASE};

const TABLE: &str = "tp_row_version_mysql";

/// The shared MariaDB URL, or `None` (with the skip line) when the run has none (and a
/// failure under `CI=true`).
fn mysql_url() -> Option<String> {
    match std::env::var("MYSQL_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "CI=true but MYSQL_URL is not set");
            eprintln!("skipped: set MYSQL_URL to run");
            None
        }
    }
}

/// A key no other run or test uses.
fn unique(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{what}-{}-{nanos}-{n}", std::process::id())
}

/// The statements of the test table.
struct Sql {
    v: MySqlRowSql,
    upsert: String,
    update: String,
    delete: String,
    read: String,
}

impl Sql {
    fn new() -> Self {
        let v = MySqlRowSql::new(TABLE);
        Self {
            upsert: format!(
                "INSERT INTO {TABLE} (id, body, {}) VALUES (?, ?, {}) ON DUPLICATE KEY UPDATE {}, {}",
                v.insert_columns(),
                v.insert_values(),
                v.upsert_assignments(&v.condition()),
                v.upsert_column("body", "VALUES(body)"),
            ),
            update: format!(
                "UPDATE {TABLE} SET body = ?, {} WHERE id = ? AND {}",
                v.assignments(),
                v.condition()
            ),
            delete: format!("DELETE FROM {TABLE} WHERE id = ? AND {}", v.condition()),
            read: format!("SELECT {} FROM {TABLE} WHERE id = ?", v.returning()),
            v,
        }
    }
}

async fn pool() -> Option<MySqlPool> {
    let url = mysql_url()?;
    let pool = MySqlPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .expect("MariaDB connects");
    let v = MySqlRowSql::new(TABLE);
    sqlx::query(&v.create_sequence())
        .execute(&pool)
        .await
        .expect("sequence");
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} (id VARCHAR(255) PRIMARY KEY, body TEXT NOT NULL, {}) \
         ENGINE = InnoDB",
        v.columns()
    ))
    .execute(&pool)
    .await
    .expect("table");
    Some(pool)
}

/// A write: the upsert when the condition may create, the update otherwise. Returns the
/// new version and whether the upsert inserted.
async fn put_created(
    pool: &MySqlPool,
    sql: &Sql,
    id: &str,
    body: &str,
    c: &RowPrecondition,
) -> Option<(RowVersion, bool)> {
    let upsert = c.may_create();
    let query = if upsert {
        sqlx::query(&sql.upsert).bind(id).bind(body)
    } else {
        sqlx::query(&sql.update).bind(body).bind(id)
    };
    let query = query.bind_condition(&c.sql());
    let mut connection = pool.acquire().await.unwrap();
    sql.v
        .write(&mut connection, query)
        .await
        .expect("write")
        .map(|w| (w.version().clone(), upsert && w.inserted()))
}

async fn put(
    pool: &MySqlPool,
    sql: &Sql,
    id: &str,
    body: &str,
    c: &RowPrecondition,
) -> Option<RowVersion> {
    put_created(pool, sql, id, body, c).await.map(|(v, _)| v)
}

async fn delete(pool: &MySqlPool, sql: &Sql, id: &str, c: &RowPrecondition) -> bool {
    let done = sqlx::query(&sql.delete)
        .bind(id)
        .bind_condition(&c.sql())
        .execute(pool)
        .await
        .expect("delete");
    done.rows_affected() == 1
}

async fn read(pool: &MySqlPool, sql: &Sql, id: &str) -> Option<RowVersion> {
    sqlx::query_as::<_, RowVersion>(&sql.read)
        .bind(id)
        .fetch_optional(pool)
        .await
        .expect("read")
}

async fn body(pool: &MySqlPool, id: &str) -> Option<String> {
    sqlx::query_scalar(&format!("SELECT body FROM {TABLE} WHERE id = ?"))
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// Sets the row's modification time, in epoch microseconds.
async fn set_modified(pool: &MySqlPool, id: &str, micros: i64) {
    sqlx::query(&format!("UPDATE {TABLE} SET modified_us = ? WHERE id = ?"))
        .bind(micros)
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}

fn tag(version: &RowVersion) -> String {
    version.etag().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn every_form_of_precondition_in_one_statement() {
    let Some(pool) = pool().await else { return };
    let sql = Sql::new();
    let id = unique("forms");
    let put = |headers: Vec<(&'static str, String)>, body: &'static str| {
        let (pool, sql, id) = (pool.clone(), &sql, id.clone());
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let c = condition(Method::PUT, &headers).await;
            let written = put_created(&pool, sql, &id, body, &c).await;
            let refused = match &written {
                Some(_) => None,
                None => Some(c.not_applied(read(&pool, sql, &id).await)),
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

    // If-None-Match: * creates once (an insert), then is refused with the current version
    // and leaves the row as it was.
    let (v1, _) = put(vec![("if-none-match", "*".into())], "a").await;
    let (v1, inserted) = v1.expect("create only, on a missing row");
    assert!(inserted, "the upsert reports an insert");
    let (again, refused) = put(vec![("if-none-match", "*".into())], "b").await;
    assert!(again.is_none());
    assert_eq!(refused.unwrap().unwrap().current(), Some(&v1));
    assert_eq!(body(&pool, &id).await.as_deref(), Some("a"));

    // If-Match with the current tag, in a list, in its gzip form; a weak or stale one
    // is refused.
    let (v2, _) = put(vec![("if-match", tag(&v1))], "b").await;
    let (v2, _) = v2.expect("If-Match with the current tag");
    assert_ne!(v1, v2);
    let (stale, refused) = put(vec![("if-match", tag(&v1))], "c").await;
    assert!(stale.is_none(), "a stale If-Match");
    assert_eq!(refused.unwrap().unwrap().current(), Some(&v2));
    let list = format!("\"0\", {}", tag(&v2));
    let (v3, _) = put(vec![("if-match", list)], "c").await;
    let (v3, _) = v3.expect("If-Match with a list");
    let gzip = format!("\"{}-gzip\"", v3.counter().unwrap());
    let (v4, _) = put(vec![("if-match", gzip)], "d").await;
    let (v4, _) = v4.expect("If-Match with an encoded representation's tag");
    let weak = format!("W/{}", tag(&v4));
    assert!(
        put(vec![("if-match", weak)], "e").await.0.is_none(),
        "weak If-Match"
    );
    let foreign = put(vec![("if-match", "\"x\"".into())], "e").await;
    assert!(foreign.0.is_none(), "a foreign If-Match (an empty list)");
    let (v5, _) = put(vec![("if-match", "*".into())], "e").await;
    let (v5, _) = v5.expect("If-Match: * on an existing row");

    // If-None-Match with tags on a write: refused when the current one is listed; an
    // update (2 rows affected) otherwise.
    let (listed, refused) = put(
        vec![("if-none-match", format!("\"0\", W/{}", tag(&v5)))],
        "f",
    )
    .await;
    assert!(listed.is_none() && refused.unwrap().is_some());
    assert_eq!(body(&pool, &id).await.as_deref(), Some("e"));
    let (v6, _) = put(vec![("if-none-match", tag(&v1))], "f").await;
    let (v6, inserted) = v6.expect("If-None-Match naming another version");
    assert!(!inserted, "the upsert reports an update");

    // If-Unmodified-Since: a date in the row's second passes once the row is alone in
    // it; an earlier date fails. 2020-01-01T00:00:00.5Z:
    set_modified(&pool, &id, 1_577_836_800_500_000).await;
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
    let (v7, _) = v7.expect("unmodified since the row's own second");
    assert!(!v7.last_modified_ambiguous());
    assert!(v7.counter() > v6.counter());
    // The version and date the write reports are the row's.
    assert_eq!(read(&pool, &sql, &id).await, Some(v7.clone()));

    // No precondition: always applies.
    let (v8, _) = put(vec![], "h").await;
    assert!(v8.expect("unconditional").0.counter() > v7.counter());
    assert_eq!(body(&pool, &id).await.as_deref(), Some("h"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn a_date_from_before_two_writes_in_one_second_never_passes() {
    let Some(pool) = pool().await else { return };
    let sql = Sql::new();
    let plain = condition::<&str>(Method::PUT, &[]).await;
    let id = unique("second");
    let mut checked = false;
    for _ in 0..20 {
        let first = put(&pool, &sql, &id, "a", &plain).await.unwrap();
        let second = put(&pool, &sql, &id, "b", &plain).await.unwrap();
        if !second.last_modified_ambiguous() {
            continue;
        }
        assert_eq!(first.last_modified(), second.last_modified());
        assert_eq!(read(&pool, &sql, &id).await, Some(second.clone()));
        let date = httpdate::fmt_http_date(first.last_modified().unwrap());
        let c = condition(Method::PUT, &[("if-unmodified-since", &date)]).await;
        assert!(
            put(&pool, &sql, &id, "stale", &c).await.is_none(),
            "a date from before the second write passed"
        );
        let refused = c.not_applied(read(&pool, &sql, &id).await).unwrap();
        assert_eq!(refused.current(), Some(&second));
        checked = true;
        break;
    }
    assert!(checked, "no two writes landed in one second in 20 tries");

    // A clock that stepped back: the row's date is in the future; the write keeps that
    // second, marked, and never goes backwards.
    let future = 4_102_444_800_250_000; // 2100-01-01T00:00:00.25Z
    set_modified(&pool, &id, future).await;
    let next = put(&pool, &sql, &id, "c", &plain).await.unwrap();
    assert!(next.last_modified_ambiguous());
    let stored: i64 = sqlx::query_scalar(&format!("SELECT modified_us FROM {TABLE} WHERE id = ?"))
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 4_102_444_800_999_999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn versions_never_repeat_across_a_delete_and_a_re_create() {
    let Some(pool) = pool().await else { return };
    let sql = Sql::new();
    let plain = condition::<&str>(Method::PUT, &[]).await;
    let plain_delete = condition::<&str>(Method::DELETE, &[]).await;
    let id = unique("recreate");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..5 {
        let old = put(&pool, &sql, &id, "a", &plain).await.unwrap();
        assert!(seen.insert(old.counter()), "a version repeated");
        let stale = condition(Method::DELETE, &[("if-match", "\"0\"")]).await;
        assert!(!delete(&pool, &sql, &id, &stale).await);
        assert!(stale.not_applied(read(&pool, &sql, &id).await).is_some());
        let current = condition(Method::DELETE, &[("if-match", &tag(&old))]).await;
        assert!(delete(&pool, &sql, &id, &current).await);
        // Deleting a missing row unconditionally: no row, and the handler's 404.
        assert!(!delete(&pool, &sql, &id, &plain_delete).await);
        assert!(plain_delete
            .not_applied(read(&pool, &sql, &id).await)
            .is_none());
        // Re-created: a new version, which the old tag does not match.
        let new = put(&pool, &sql, &id, "b", &plain).await.unwrap();
        assert_ne!(
            new.etag(),
            old.etag(),
            "a version repeated after a re-create"
        );
        assert!(seen.insert(new.counter()));
        let old_tag = condition(Method::PUT, &[("if-match", &tag(&old))]).await;
        assert!(put(&pool, &sql, &id, "c", &old_tag).await.is_none());
        let plain_delete_now = condition::<&str>(Method::DELETE, &[]).await;
        assert!(delete(&pool, &sql, &id, &plain_delete_now).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn of_writes_with_the_same_if_match_exactly_one_wins() {
    const RACERS: usize = 12;
    const ROUNDS: usize = 10;
    let Some(pool) = pool().await else { return };
    let sql = Arc::new(Sql::new());
    let plain = condition::<&str>(Method::PUT, &[]).await;
    let id = unique("race");
    let mut current = put(&pool, &sql, &id, "start", &plain).await.unwrap();
    for round in 0..ROUNDS {
        let c = condition(Method::PUT, &[("if-match", &tag(&current))]).await;
        let racers: Vec<_> = (0..RACERS)
            .map(|i| {
                let (pool, sql, id, c) = (pool.clone(), sql.clone(), id.clone(), c.clone());
                tokio::spawn(async move {
                    let body = format!("racer {i}");
                    put(&pool, &sql, &id, &body, &c).await.map(|v| (v, body))
                })
            })
            .collect();
        let mut winners = Vec::new();
        for racer in racers {
            if let Some(won) = racer.await.unwrap() {
                winners.push(won);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let row = read(&pool, &sql, &id).await.unwrap();
        assert_eq!(row, winners[0].0, "the winner's version is the row's");
        assert_eq!(body(&pool, &id).await, Some(winners[0].1.clone()));
        current = row;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn of_upserts_with_the_same_if_none_match_exactly_one_wins() {
    const RACERS: usize = 12;
    let Some(pool) = pool().await else { return };
    let sql = Arc::new(Sql::new());
    for round in 0..5 {
        let id = unique("create-race");
        let c = condition(Method::PUT, &[("if-none-match", "*")]).await;
        let racers: Vec<_> = (0..RACERS)
            .map(|i| {
                let (pool, sql, id, c) = (pool.clone(), sql.clone(), id.clone(), c.clone());
                tokio::spawn(async move {
                    put_created(&pool, &sql, &id, &format!("racer {i}"), &c).await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for racer in racers {
            if let Some(won) = racer.await.unwrap() {
                winners.push(won);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        assert!(winners[0].1, "the one winner inserted");
        assert_eq!(read(&pool, &sql, &id).await, Some(winners[0].0.clone()));
    }
}

// ---- The differential property test ----

/// Puts row `id` into `state`, runs the conditional write, and says whether it applied
/// (and checks that a refused write left the row as it was).
async fn applied(
    pool: &MySqlPool,
    sql: &Sql,
    id: &str,
    state: Option<(i64, i64)>,
    c: &RowPrecondition,
) -> bool {
    sqlx::query(&format!("DELETE FROM {TABLE} WHERE id = ?"))
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    if let Some((version, micros)) = state {
        sqlx::query(&format!(
            "INSERT INTO {TABLE} (id, body, version, modified_us) VALUES (?, 'old', ?, ?)"
        ))
        .bind(id)
        .bind(version)
        .bind(BASE * 1_000_000 + micros)
        .execute(pool)
        .await
        .unwrap();
    }
    let before = read(pool, sql, id).await;
    let written = put(pool, sql, id, "new", c).await;
    if written.is_none() {
        assert_eq!(
            read(pool, sql, id).await,
            before,
            "a refused write changed the row"
        );
    }
    written.is_some()
}

#[test]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
fn the_sql_condition_applies_exactly_when_the_rfc_evaluator_proceeds() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Some(pool) = runtime.block_on(pool()) else {
        return;
    };
    let sql = Sql::new();
    let id = unique("differential");
    let config = ProptestConfig {
        cases: 400,
        failure_persistence: None,
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
            let c = condition(Method::PUT, &headers).await;
            let current = state.map(|(version, micros)| {
                RowVersion::from_columns(version, Some(BASE * 1_000_000 + micros))
            });
            let evaluated = current.as_ref().map(version_of);
            let expected =
                evaluate(&Method::PUT, c.preconditions(), evaluated.as_ref()) == Decision::Proceed;
            prop_assert_eq!(c.check(current.as_ref()).is_ok(), expected);
            Ok((applied(&pool, &sql, &id, state, &c).await, expected))
        })?;
        prop_assert_eq!(applied, expected, "state {:?}, headers {:?}", state, headers);
    });
}
