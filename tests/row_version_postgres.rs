//! The row-version SQL against the real Postgres in `DATABASE_URL`, through both
//! drivers: every form of precondition in one statement, the same-second rule, versions
//! that never repeat across a delete and a re-create, and the same-`If-Match` race.
//!
//! Conditions are made the way a handler gets them: a request through
//! `RowVersionLayer`, and the `RowPrecondition` it hands on.

use std::sync::Arc;

use http::Method;
use tokio_postgres::types::ToSql;
use tower_precondition::row_version::{sqlx::BindCondition, PgRowSql, RowPrecondition, RowVersion};

mod postgres_support;
#[path = "common/row_condition.rs"]
mod row_condition;
use row_condition::condition;

const TABLE: &str = "tp_row_version_test";

/// The statements of the test table.
struct Sql {
    upsert: String,
    update: String,
    delete: String,
    read: String,
}

impl Sql {
    fn new() -> Self {
        let v = PgRowSql::new(TABLE);
        Self {
            upsert: format!(
                "INSERT INTO {TABLE} (id, body, {}) VALUES ($1, $2, {}) ON CONFLICT (id) DO UPDATE \
                 SET body = EXCLUDED.body, {} WHERE {} RETURNING {}",
                v.insert_columns(),
                v.insert_values(),
                v.assignments(),
                v.condition(3),
                v.returning()
            ),
            update: format!(
                "UPDATE {TABLE} SET body = $2, {} WHERE id = $1 AND {} RETURNING {}",
                v.assignments(),
                v.condition(3),
                v.returning()
            ),
            delete: format!(
                "DELETE FROM {TABLE} WHERE id = $1 AND {} RETURNING {}",
                v.condition(2),
                v.returning()
            ),
            read: format!("SELECT {} FROM {TABLE} WHERE id = $1", v.returning()),
        }
    }
}

/// One of the two drivers, with the same three operations.
#[derive(Clone)]
enum Db {
    Sqlx(sqlx::PgPool),
    TokioPostgres(deadpool_postgres::Pool),
}

impl Db {
    async fn both() -> Option<Vec<(&'static str, Db)>> {
        let pool = postgres_support::shared_pool(16).await?;
        let url = postgres_support::database_url()?;
        let sqlx = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await
            .expect("sqlx connects");
        let client = pool.get().await.unwrap();
        client
            .batch_execute(&format!(
                // One implicit transaction: the lock must last until it commits (a
                // session lock released before the commit let a second test create the
                // same table beside the first's uncommitted one).
                "SET client_min_messages = warning; \
                 SELECT pg_advisory_xact_lock(hashtext('{TABLE}')); {}; \
                 CREATE TABLE IF NOT EXISTS {TABLE} (id TEXT PRIMARY KEY, body TEXT NOT NULL, \
                 version BIGINT NOT NULL, modified_at TIMESTAMPTZ NOT NULL)",
                PgRowSql::new(TABLE).create_sequence()
            ))
            .await
            .expect("migrate");
        Some(vec![
            ("sqlx", Db::Sqlx(sqlx)),
            ("tokio-postgres", Db::TokioPostgres(pool)),
        ])
    }

    /// A write: the upsert when the condition may create, the update otherwise.
    async fn put(
        &self,
        sql: &Sql,
        id: &str,
        body: &str,
        c: &RowPrecondition,
    ) -> Option<RowVersion> {
        let statement = if c.may_create() {
            &sql.upsert
        } else {
            &sql.update
        };
        let values = c.sql();
        match self {
            Db::Sqlx(pool) => sqlx::query(statement)
                .bind(id)
                .bind(body)
                .bind_condition(&values)
                .fetch_optional(pool)
                .await
                .expect("write")
                .map(|row| tower_precondition::row_version::sqlx::row_version(&row).unwrap()),
            Db::TokioPostgres(pool) => {
                let client = pool.get().await.unwrap();
                let statement = client.prepare_cached(statement).await.unwrap();
                let [a, b, cc, d] = values.params();
                let params: [&(dyn ToSql + Sync); 6] = [&id, &body, a, b, cc, d];
                client
                    .query_opt(&statement, &params)
                    .await
                    .expect("write")
                    .map(|row| {
                        tower_precondition::row_version::tokio_postgres::row_version(&row).unwrap()
                    })
            }
        }
    }

    async fn delete(&self, sql: &Sql, id: &str, c: &RowPrecondition) -> Option<RowVersion> {
        let values = c.sql();
        match self {
            Db::Sqlx(pool) => sqlx::query_as::<_, RowVersion>(&sql.delete)
                .bind(id)
                .bind_condition(&values)
                .fetch_optional(pool)
                .await
                .expect("delete"),
            Db::TokioPostgres(pool) => {
                let client = pool.get().await.unwrap();
                let [a, b, cc, d] = values.params();
                let params: [&(dyn ToSql + Sync); 5] = [&id, a, b, cc, d];
                client
                    .query_opt(&sql.delete, &params)
                    .await
                    .expect("delete")
                    .map(|row| {
                        tower_precondition::row_version::tokio_postgres::row_version(&row).unwrap()
                    })
            }
        }
    }

    async fn read(&self, sql: &Sql, id: &str) -> Option<RowVersion> {
        match self {
            Db::Sqlx(pool) => sqlx::query_as::<_, RowVersion>(&sql.read)
                .bind(id)
                .fetch_optional(pool)
                .await
                .expect("read"),
            Db::TokioPostgres(pool) => {
                let client = pool.get().await.unwrap();
                client
                    .query_opt(&sql.read, &[&id])
                    .await
                    .expect("read")
                    .map(|row| {
                        tower_precondition::row_version::tokio_postgres::row_version(&row).unwrap()
                    })
            }
        }
    }

    /// Sets the row's modification time (to put it in a known second).
    async fn set_modified(&self, id: &str, at: &str) {
        let sql = format!("UPDATE {TABLE} SET modified_at = $2::text::timestamptz WHERE id = $1");
        match self {
            Db::Sqlx(pool) => {
                sqlx::query(&sql)
                    .bind(id)
                    .bind(at)
                    .execute(pool)
                    .await
                    .unwrap();
            }
            Db::TokioPostgres(pool) => {
                pool.get()
                    .await
                    .unwrap()
                    .execute(&sql, &[&id, &at])
                    .await
                    .unwrap();
            }
        }
    }
}

fn tag(version: &RowVersion) -> String {
    version.etag().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn every_form_of_precondition_in_one_statement() {
    let Some(drivers) = Db::both().await else {
        return;
    };
    let sql = Sql::new();
    for (driver, db) in drivers {
        let id = postgres_support::unique(&format!("forms-{driver}"));
        let put = |headers: Vec<(&'static str, String)>, body: &'static str| {
            let (db, sql, id) = (db.clone(), &sql, id.clone());
            async move {
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                let c = condition(Method::PUT, &headers).await;
                let written = db.put(sql, &id, body, &c).await;
                let refused = match &written {
                    Some(_) => None,
                    None => Some(c.not_applied(db.read(sql, &id).await)),
                };
                (written, refused)
            }
        };

        // If-Match on a missing row: refused, and a 412 (not a 404).
        let (written, refused) = put(vec![("if-match", "\"1\"".into())], "a").await;
        assert!(written.is_none(), "{driver}");
        assert_eq!(refused.unwrap().unwrap().current(), None, "{driver}");
        let (written, refused) = put(vec![("if-match", "*".into())], "a").await;
        assert!(
            written.is_none() && refused.unwrap().is_some(),
            "{driver}: If-Match: * on a missing row"
        );

        // If-None-Match: * creates once, then is refused with the current version.
        let (v1, _) = put(vec![("if-none-match", "*".into())], "a").await;
        let v1 = v1.expect("create only, on a missing row");
        let (again, refused) = put(vec![("if-none-match", "*".into())], "b").await;
        assert!(again.is_none(), "{driver}");
        assert_eq!(refused.unwrap().unwrap().current(), Some(&v1), "{driver}");

        // If-Match with the current tag, in a list, in its gzip form; a weak or stale
        // one is refused.
        let (v2, _) = put(vec![("if-match", tag(&v1))], "b").await;
        let v2 = v2.expect("If-Match with the current tag");
        assert_ne!(v1, v2);
        let (stale, refused) = put(vec![("if-match", tag(&v1))], "c").await;
        assert!(stale.is_none(), "{driver}: a stale If-Match");
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
            "{driver}: weak If-Match"
        );
        let (v5, _) = put(vec![("if-match", "*".into())], "e").await;
        let v5 = v5.expect("If-Match: * on an existing row");

        // If-None-Match with tags on a write: refused when the current one is listed.
        let (listed, refused) = put(
            vec![("if-none-match", format!("\"0\", W/{}", tag(&v5)))],
            "f",
        )
        .await;
        assert!(listed.is_none() && refused.unwrap().is_some(), "{driver}");
        let (v6, _) = put(vec![("if-none-match", tag(&v1))], "f").await;
        let v6 = v6.expect("If-None-Match naming another version");

        // If-Unmodified-Since: a date in the row's second passes once the row is
        // alone in it; an earlier date fails.
        db.set_modified(&id, "2020-01-01 00:00:00.5+00").await;
        let date = "Wed, 01 Jan 2020 00:00:00 GMT";
        let (before, _) = put(
            vec![(
                "if-unmodified-since",
                "Tue, 31 Dec 2019 23:59:59 GMT".into(),
            )],
            "g",
        )
        .await;
        assert!(before.is_none(), "{driver}: modified after the date");
        let (v7, _) = put(vec![("if-unmodified-since", date.into())], "g").await;
        let v7 = v7.expect("unmodified since the row's own second");
        assert!(!v7.last_modified_ambiguous());
        assert!(v7.counter() > v6.counter());

        // No precondition: always applies.
        let (v8, _) = put(vec![], "h").await;
        assert!(v8.expect("unconditional").counter() > v7.counter());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn a_date_from_before_two_writes_in_one_second_never_passes() {
    let Some(drivers) = Db::both().await else {
        return;
    };
    let sql = Sql::new();
    let plain = condition::<&str>(Method::PUT, &[]).await;
    for (driver, db) in drivers {
        let id = postgres_support::unique(&format!("second-{driver}"));
        let mut checked = false;
        // Two writes straddle a second boundary now and then: try until a pair shares one.
        for _ in 0..20 {
            let first = db.put(&sql, &id, "a", &plain).await.unwrap();
            let second = db.put(&sql, &id, "b", &plain).await.unwrap();
            if !second.last_modified_ambiguous() {
                continue;
            }
            assert_eq!(first.last_modified(), second.last_modified(), "{driver}");
            let date = httpdate::fmt_http_date(first.last_modified().unwrap());
            let c = condition(Method::PUT, &[("if-unmodified-since", &date)]).await;
            assert!(
                db.put(&sql, &id, "stale", &c).await.is_none(),
                "{driver}: a date from before the second write passed"
            );
            let refused = c.not_applied(db.read(&sql, &id).await).unwrap();
            assert_eq!(refused.current(), Some(&second));
            checked = true;
            break;
        }
        assert!(
            checked,
            "{driver}: no two writes landed in one second in 20 tries"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn versions_never_repeat_across_a_delete_and_a_re_create() {
    let Some(drivers) = Db::both().await else {
        return;
    };
    let sql = Sql::new();
    let plain = condition::<&str>(Method::PUT, &[]).await;
    let plain_delete = condition::<&str>(Method::DELETE, &[]).await;
    for (driver, db) in drivers {
        let id = postgres_support::unique(&format!("recreate-{driver}"));
        let old = db.put(&sql, &id, "a", &plain).await.unwrap();
        // A stale conditional delete is refused; the current one deletes.
        let stale = condition(Method::DELETE, &[("if-match", "\"0\"")]).await;
        assert!(db.delete(&sql, &id, &stale).await.is_none(), "{driver}");
        assert!(stale.not_applied(db.read(&sql, &id).await).is_some());
        let current = condition(Method::DELETE, &[("if-match", &tag(&old))]).await;
        assert_eq!(db.delete(&sql, &id, &current).await, Some(old.clone()));
        // Deleting a missing row unconditionally: no row, and the handler's 404.
        assert!(db.delete(&sql, &id, &plain_delete).await.is_none());
        assert!(
            plain_delete.not_applied(db.read(&sql, &id).await).is_none(),
            "{driver}: 404"
        );
        // Re-created: a new version, which the old tag does not match.
        let new = db.put(&sql, &id, "b", &plain).await.unwrap();
        assert_ne!(
            new.etag(),
            old.etag(),
            "{driver}: a version repeated after a re-create"
        );
        let old_tag = condition(Method::PUT, &[("if-match", &tag(&old))]).await;
        assert!(db.put(&sql, &id, "c", &old_tag).await.is_none(), "{driver}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn of_writes_with_the_same_if_match_exactly_one_wins() {
    const RACERS: usize = 12;
    const ROUNDS: usize = 10;
    let Some(drivers) = Db::both().await else {
        return;
    };
    let sql = Arc::new(Sql::new());
    let plain = condition::<&str>(Method::PUT, &[]).await;
    for (driver, db) in drivers {
        let id = postgres_support::unique(&format!("race-{driver}"));
        let mut current = db.put(&sql, &id, "start", &plain).await.unwrap();
        for round in 0..ROUNDS {
            let c = condition(Method::PUT, &[("if-match", &tag(&current))]).await;
            let racers: Vec<_> = (0..RACERS)
                .map(|i| {
                    let (db, sql, id, c) = (db.clone(), sql.clone(), id.clone(), c.clone());
                    tokio::spawn(async move {
                        let body = format!("racer {i}");
                        db.put(&sql, &id, &body, &c).await
                    })
                })
                .collect();
            let mut winners = Vec::new();
            for racer in racers {
                if let Some(version) = racer.await.unwrap() {
                    winners.push(version);
                }
            }
            assert_eq!(winners.len(), 1, "{driver}, round {round}: {winners:?}");
            let read = db.read(&sql, &id).await.unwrap();
            assert_eq!(
                read, winners[0],
                "{driver}: the winner's version is the row's"
            );
            current = read;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn the_sequence_can_be_created_by_many_processes_at_once() {
    let Some(pool) = postgres_support::shared_pool(8).await else {
        return;
    };
    // A sequence of this test's own, so that it is new (and can be dropped after).
    let name = format!("tp_seq_{}", postgres_support::unique("s").replace('-', "_"));
    let create = PgRowSql::new(TABLE).sequence(&name).create_sequence();
    let creators: Vec<_> = (0..8)
        .map(|_| {
            let (pool, create) = (pool.clone(), create.clone());
            tokio::spawn(async move { pool.get().await.unwrap().batch_execute(&create).await })
        })
        .collect();
    for creator in creators {
        creator
            .await
            .unwrap()
            .expect("a concurrent create succeeds");
    }
    let client = pool.get().await.unwrap();
    client
        .batch_execute(&format!("DROP SEQUENCE {name}"))
        .await
        .unwrap();
}
