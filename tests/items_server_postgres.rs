//! The `axum_postgres` example (transactional mode), run as a separate process and
//! driven over real HTTP through the whole `/items/{id}` contract, against the real
//! Postgres in `DATABASE_URL`.

#[path = "common/items_contract.rs"]
mod items_contract;
mod postgres_support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_postgres_serves_the_items_contract() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_items_contract("axum_postgres", &[("DATABASE_URL", &url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_postgres_requires_preconditions_when_asked() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_require_preconditions_contract("axum_postgres", &[("DATABASE_URL", &url)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_postgres_lets_a_valid_write_through_while_uploads_stall() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_stalled_upload_contract("axum_postgres", &[("DATABASE_URL", &url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_postgres_keys_an_alias_path_to_the_same_item() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_alias_contract("axum_postgres", &[("DATABASE_URL", &url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn axum_postgres_hides_a_private_item_from_preconditions() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    items_contract::run_hidden_resource_contract("axum_postgres", &[("DATABASE_URL", &url)]).await;
}
