//! The `axum_memory` example, run as a separate process and driven over real HTTP
//! through the whole `/items/{id}` contract.

#[path = "common/items_contract.rs"]
mod items_contract;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_memory_serves_the_items_contract() {
    items_contract::run_items_contract("axum_memory", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_memory_requires_preconditions_when_asked() {
    items_contract::run_require_preconditions_contract("axum_memory", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_memory_lets_a_valid_write_through_while_uploads_stall() {
    items_contract::run_stalled_upload_contract("axum_memory", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_memory_keys_an_alias_path_to_the_same_item() {
    items_contract::run_alias_contract("axum_memory", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_memory_hides_a_private_item_from_preconditions() {
    items_contract::run_hidden_resource_contract("axum_memory", &[]).await;
}
