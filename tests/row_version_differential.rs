//! The one-statement condition, run by the real Postgres in `DATABASE_URL`, agrees with
//! the crate's RFC 9110 evaluator on every generated case: a row state (absent, or a
//! version and a modification time, possibly marked as the second write in its
//! second) and a write's preconditions (`If-Match`, `If-None-Match`,
//! `If-Unmodified-Since`, each absent, `*`, lists with strong, weak, encoded and
//! foreign tags, dates around the row's second). Through both drivers.
//!
//! Applied by the database if and only if `evaluate` says `Proceed`: so the SQL is
//! exactly as strict as the RFC rules the other two modes use, no more and no less.
//! Both the generic condition (`PgRowSql::condition`) and the text specialized for the
//! condition's form (`PgRowSql::specialized`).

use http::Method;
use proptest::prelude::*;
use tokio_postgres::types::ToSql;
use tower_precondition::{
    evaluate::{evaluate, Decision},
    row_version::{
        sqlx::{BindCondition, BindSpecialized},
        PgRowSql, PgSpecializedStatement, RowPrecondition, RowVersion,
    },
};

mod postgres_support;
#[path = "common/row_condition.rs"]
mod row_condition;
#[path = "common/row_differential.rs"]
mod row_differential;
use row_differential::{date_field, row_state, tag_field, version_of, BASE};

const TABLE: &str = "tp_row_version_differential";

struct Harness {
    runtime: tokio::runtime::Runtime,
    pg: deadpool_postgres::Pool,
    sqlx: sqlx::PgPool,
    upsert: String,
    update: String,
    specialized_upsert: PgSpecializedStatement,
    specialized_update: PgSpecializedStatement,
}

fn harness() -> Option<Harness> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (pg, sqlx) = runtime.block_on(async {
        let pg = postgres_support::shared_pool(2).await?;
        let url = postgres_support::database_url()?;
        let sqlx = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .expect("sqlx connects");
        pg.get()
            .await
            .unwrap()
            .batch_execute(&format!(
                "SET client_min_messages = warning; {}; \
                 CREATE TABLE IF NOT EXISTS {TABLE} (id TEXT PRIMARY KEY, body TEXT NOT NULL, \
                 version BIGINT NOT NULL, modified_at TIMESTAMPTZ NOT NULL)",
                PgRowSql::new(TABLE).create_sequence()
            ))
            .await
            .expect("migrate");
        Some((pg, sqlx))
    })?;
    let v = PgRowSql::new(TABLE);
    let upsert = |condition: &str| {
        format!(
            "INSERT INTO {TABLE} (id, body, {}) VALUES ($1, $2, {}) ON CONFLICT (id) DO UPDATE \
             SET body = EXCLUDED.body, {} WHERE {condition} RETURNING {}",
            v.insert_columns(),
            v.insert_values(),
            v.assignments(),
            v.returning()
        )
    };
    let update = |condition: &str| {
        format!(
            "UPDATE {TABLE} SET body = $2, {} WHERE id = $1 AND {condition} RETURNING {}",
            v.assignments(),
            v.returning()
        )
    };
    Some(Harness {
        specialized_upsert: v.specialized(3, upsert),
        specialized_update: v.specialized(3, update),
        runtime,
        pg,
        sqlx,
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
    })
}

impl Harness {
    /// Puts row `id` into `state`, runs the conditional write through `driver`, and
    /// says whether it applied.
    async fn applied(
        &self,
        id: &str,
        state: Option<(i64, i64)>,
        c: &RowPrecondition,
        sqlx: bool,
        specialized: bool,
    ) -> bool {
        let client = self.pg.get().await.unwrap();
        client
            .execute(&format!("DELETE FROM {TABLE} WHERE id = $1"), &[&id])
            .await
            .unwrap();
        if let Some((version, micros)) = state {
            let at = BASE * 1_000_000 + micros;
            client
                .execute(
                    &format!(
                        "INSERT INTO {TABLE} (id, body, version, modified_at) \
                         VALUES ($1, 'old', $2, to_timestamp($3::int8 / 1000000.0))"
                    ),
                    &[&id, &version, &at],
                )
                .await
                .unwrap();
            // to_timestamp goes through a double: check the exact microsecond stored.
            let stored: i64 = client
                .query_one(
                    &format!("SELECT (extract(epoch from modified_at) * 1000000)::int8 FROM {TABLE} WHERE id = $1"),
                    &[&id],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(stored, at);
        }
        let values = c.sql();
        let generic = if c.may_create() {
            &self.upsert
        } else {
            &self.update
        };
        let text = match (specialized, c.may_create()) {
            (false, _) => generic.as_str(),
            (true, true) => self.specialized_upsert.text(&values),
            (true, false) => self.specialized_update.text(&values),
        };
        match (sqlx, specialized) {
            (true, false) => sqlx::query(text)
                .bind(id)
                .bind("new")
                .bind_condition(&values)
                .fetch_optional(&self.sqlx)
                .await
                .expect("write")
                .is_some(),
            (true, true) => sqlx::query(text)
                .bind(id)
                .bind("new")
                .bind_specialized(&values)
                .fetch_optional(&self.sqlx)
                .await
                .expect("write")
                .is_some(),
            (false, false) => {
                let [a, b, cc, d] = values.params();
                let params: [&(dyn ToSql + Sync); 6] = [&id, &"new", a, b, cc, d];
                client
                    .query_opt(text, &params)
                    .await
                    .expect("write")
                    .is_some()
            }
            (false, true) => {
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&id, &"new"];
                params.extend_from_slice(&values.specialized_params());
                client
                    .query_opt(text, &params)
                    .await
                    .expect("write")
                    .is_some()
            }
        }
    }
}

#[test]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
fn the_sql_condition_applies_exactly_when_the_rfc_evaluator_proceeds() {
    let Some(harness) = harness() else { return };
    let id = postgres_support::unique("differential");
    let config = ProptestConfig {
        cases: 800,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        state in row_state(),
        if_match in tag_field(),
        if_none_match in tag_field(),
        since in date_field(),
        sqlx in any::<bool>(),
        specialized in any::<bool>(),
    )| {
        let mut headers = Vec::new();
        if let Some(value) = if_match { headers.push(("if-match", value)); }
        if let Some(value) = if_none_match { headers.push(("if-none-match", value)); }
        if let Some(value) = since { headers.push(("if-unmodified-since", value)); }
        let (applied, expected) = harness.runtime.block_on(async {
            let c = row_condition::condition(Method::PUT, &headers).await;
            let current = state.map(|(version, micros)| {
                RowVersion::from_columns(version, Some(BASE * 1_000_000 + micros))
            });
            let evaluated = current.as_ref().map(version_of);
            let expected =
                evaluate(&Method::PUT, c.preconditions(), evaluated.as_ref()) == Decision::Proceed;
            // The locked-row path must agree as well.
            prop_assert_eq!(c.check(current.as_ref()).is_ok(), expected);
            Ok((harness.applied(&id, state, &c, sqlx, specialized).await, expected))
        })?;
        prop_assert_eq!(
            applied,
            expected,
            "state {:?}, headers {:?}, specialized {}",
            state,
            headers,
            specialized
        );
    });
}
