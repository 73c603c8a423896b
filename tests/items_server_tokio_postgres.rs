//! The `axum_tokio_postgres` example (row-version mode, through tokio-postgres and
//! deadpool-postgres), run as separate processes and driven over real HTTP against the
//! real Postgres in `DATABASE_URL`:
//! the `/items/{id}` contract and the races on three processes sharing the database,
//! each request to the next process, and the remaining contracts on one.

#[path = "common/items_contract.rs"]
mod items_contract;
mod postgres_support;

/// The processes of the multi-instance tests.
const INSTANCES: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_tokio_postgres_serves_the_items_contract_on_three_instances() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_items_contract_on_instances(
        "axum_tokio_postgres",
        &[("DATABASE_URL", &url)],
        INSTANCES,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_tokio_postgres_has_one_winner_per_same_if_match_race_on_three_instances() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_same_if_match_race_on_instances(
        "axum_tokio_postgres",
        &[("DATABASE_URL", &url)],
        INSTANCES,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_tokio_postgres_loses_no_increment_on_three_instances() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_counter_on_instances(
        "axum_tokio_postgres",
        &[("DATABASE_URL", &url)],
        INSTANCES,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_tokio_postgres_requires_preconditions_when_asked() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_require_preconditions_contract(
        "axum_tokio_postgres",
        &[("DATABASE_URL", &url)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_tokio_postgres_lets_a_valid_write_through_while_uploads_stall() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_stalled_upload_contract("axum_tokio_postgres", &[("DATABASE_URL", &url)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_tokio_postgres_keys_an_alias_path_to_the_same_item() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_alias_contract("axum_tokio_postgres", &[("DATABASE_URL", &url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_tokio_postgres_hides_a_private_item_from_preconditions() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_hidden_resource_contract("axum_tokio_postgres", &[("DATABASE_URL", &url)])
        .await;
}
