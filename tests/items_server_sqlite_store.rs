//! The `axum_sqlite_store` example, run as separate processes on one SQLite file and
//! driven over real HTTP: three processes serve the whole `/items/{id}` contract (each
//! request to the next process), lose no increment, and let exactly one of many writes
//! with the same `If-Match` win (in store mode a loser that arrives while the winner is
//! in flight gets `409`, the others `412` naming the winner); one process serves the
//! precondition policy, stalled-upload, alias and hidden-item contracts; an item and
//! its version survive a restart of the process.

#[path = "common/items_contract.rs"]
mod items_contract;

use std::path::PathBuf;

const INSTANCES: usize = 3;

/// A database file of its own for one test, removed (with its WAL files) when dropped.
struct DbFile(PathBuf);

impl DbFile {
    fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tp-items-sqlite-{}.db",
            items_contract::unique_id(label)
        ));
        Self(path)
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.0.display())
    }
}

impl Drop for DbFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            std::fs::remove_file(format!("{}{suffix}", self.0.display())).ok();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_file_serve_the_items_contract() {
    let db = DbFile::new("contract");
    let url = db.url();
    items_contract::run_items_contract_on_instances(
        "axum_sqlite_store",
        &[("DATABASE_URL", &url)],
        INSTANCES,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_file_let_one_same_if_match_write_win() {
    let db = DbFile::new("race");
    let url = db.url();
    items_contract::run_same_if_match_race_on_store_instances(
        "axum_sqlite_store",
        &[("DATABASE_URL", &url)],
        INSTANCES,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_file_lose_no_increment() {
    let db = DbFile::new("counter");
    let url = db.url();
    items_contract::run_counter_on_store_instances(
        "axum_sqlite_store",
        &[("DATABASE_URL", &url)],
        INSTANCES,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_store_requires_preconditions_when_asked() {
    let db = DbFile::new("require");
    let url = db.url();
    items_contract::run_require_preconditions_contract(
        "axum_sqlite_store",
        &[("DATABASE_URL", &url)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_store_lets_a_valid_write_through_while_uploads_stall() {
    let db = DbFile::new("stalled");
    let url = db.url();
    items_contract::run_stalled_upload_contract("axum_sqlite_store", &[("DATABASE_URL", &url)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_store_keys_an_alias_path_to_the_same_item() {
    let db = DbFile::new("alias");
    let url = db.url();
    items_contract::run_alias_contract("axum_sqlite_store", &[("DATABASE_URL", &url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_store_hides_a_private_item_from_preconditions() {
    let db = DbFile::new("hidden");
    let url = db.url();
    items_contract::run_hidden_resource_contract("axum_sqlite_store", &[("DATABASE_URL", &url)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_and_its_version_survive_a_restart() {
    use http::{header, StatusCode};
    use serde_json::json;

    let db = DbFile::new("restart");
    let url = db.url();
    let env = [("DATABASE_URL", url.as_str())];
    let path = format!("/items/{}", items_contract::unique_id("restart"));
    let tag = {
        let server = items_contract::ExampleServer::start("axum_sqlite_store", &env).await;
        let http = items_contract::HttpClient::for_server(&server);
        let created = http.put(&path, &[], &json!({"n": 1})).await;
        assert_eq!(created.status, StatusCode::CREATED);
        created.etag().expect("an ETag")
    };
    // The first process is gone; a new one on the same file knows the item's version.
    let server = items_contract::ExampleServer::start("axum_sqlite_store", &env).await;
    let http = items_contract::HttpClient::for_server(&server);
    let read = http.get(&path, &[]).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(
        read.etag().as_deref(),
        Some(tag.as_str()),
        "the same version"
    );
    let revalidated = http
        .get(&path, &[(header::IF_NONE_MATCH, tag.as_str())])
        .await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);
    let write = http
        .put(&path, &[(header::IF_MATCH, tag.as_str())], &json!({"n": 2}))
        .await;
    assert_eq!(write.status, StatusCode::OK);
    let stale = http
        .put(&path, &[(header::IF_MATCH, tag.as_str())], &json!({"n": 3}))
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
}
