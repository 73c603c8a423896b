//! The `axum_postgres` example (transactional mode), run as a separate process and
//! driven over real HTTP through the whole `/items/{id}` contract, against the real
//! Postgres in `DATABASE_URL`.

#[path = "common/items_contract.rs"]
mod items_contract;
mod postgres_support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_postgres_serves_the_items_contract() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_items_contract("axum_postgres", &[("DATABASE_URL", &url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_postgres_requires_preconditions_when_asked() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_require_preconditions_contract("axum_postgres", &[("DATABASE_URL", &url)])
        .await;
}
