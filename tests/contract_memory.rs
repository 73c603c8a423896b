//! The store contract suite against the memory store.

use std::sync::Arc;

use tower_precondition::{store::testing::run_contract_suite, MemoryStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_passes_the_contract() {
    run_contract_suite(Arc::new(MemoryStore::new()), "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_shard_memory_store_passes_the_contract() {
    run_contract_suite(Arc::new(MemoryStore::with_shards(1)), "memory-1").await;
}
