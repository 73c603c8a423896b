//! The `axum_sqlite` example (row-version mode, SQLite through sqlx), run as separate
//! processes on one SQLite file of each test's own and driven over real HTTP: the
//! `/items/{id}` contract and the races on three processes sharing the file, each
//! request to the next process; the remaining contracts on one; and a file whose write
//! lock another process holds, which makes writes answer `503` (never a wrong `2xx`)
//! until it is released.

use std::{path::PathBuf, time::Duration};

use http::{header, StatusCode};
use serde_json::json;
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode},
    Connection, SqliteConnection,
};

#[path = "common/items_contract.rs"]
mod items_contract;

use items_contract::{ExampleServer, HttpClient, Reply};

/// The processes of the multi-instance tests.
const INSTANCES: usize = 3;

/// A fresh database file for one test, and its `DATABASE_URL`.
fn database(label: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "items_server_sqlite-{label}-{}.db",
        std::process::id()
    ));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let url = format!("sqlite://{}", path.display());
    (path, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_serves_the_items_contract_on_three_instances() {
    let (_, url) = database("contract");
    items_contract::run_items_contract_on_instances(
        "axum_sqlite",
        &[("DATABASE_URL", &url)],
        INSTANCES,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_has_one_winner_per_same_if_match_race_on_three_instances() {
    let (_, url) = database("race");
    items_contract::run_same_if_match_race_on_instances(
        "axum_sqlite",
        &[("DATABASE_URL", &url)],
        INSTANCES,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_loses_no_increment_on_three_instances() {
    let (_, url) = database("counter");
    items_contract::run_counter_on_instances("axum_sqlite", &[("DATABASE_URL", &url)], INSTANCES)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_requires_preconditions_when_asked() {
    let (_, url) = database("require");
    items_contract::run_require_preconditions_contract("axum_sqlite", &[("DATABASE_URL", &url)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_lets_a_valid_write_through_while_uploads_stall() {
    let (_, url) = database("stalled");
    items_contract::run_stalled_upload_contract("axum_sqlite", &[("DATABASE_URL", &url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_keys_an_alias_path_to_the_same_item() {
    let (_, url) = database("alias");
    items_contract::run_alias_contract("axum_sqlite", &[("DATABASE_URL", &url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_hides_a_private_item_from_preconditions() {
    let (_, url) = database("hidden");
    items_contract::run_hidden_resource_contract("axum_sqlite", &[("DATABASE_URL", &url)]).await;
}

/// Asserts a refused write: `503`, `Retry-After: 1`, a problem document.
#[track_caller]
fn expect_busy(what: &str, reply: &Reply, server: &ExampleServer) {
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: expected 503 while the file is locked, got body {:?}\n--- server log ---\n{}",
        String::from_utf8_lossy(&reply.body),
        server.log_text()
    );
    assert_eq!(
        reply.header(header::RETRY_AFTER).as_deref(),
        Some("1"),
        "{what}"
    );
    assert!(reply.is_problem_json(), "{what}: a problem document");
    assert_eq!(reply.json()["status"], json!(503), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_answers_503_while_another_process_holds_the_write_lock() {
    let (path, url) = database("locked");
    let server = ExampleServer::start(
        "axum_sqlite",
        &[("DATABASE_URL", &url), ("BUSY_TIMEOUT_MS", "300")],
    )
    .await;
    let http = HttpClient::for_server(&server);
    let item = "/items/locked";
    let created = http.put(item, &[], &json!({"n": 1})).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let tag = created.etag().unwrap();
    let if_match = [(header::IF_MATCH, tag.as_str())];

    // This test is another process: it takes the file's write lock and holds it.
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .journal_mode(SqliteJournalMode::Wal);
    let mut other = SqliteConnection::connect_with(&options)
        .await
        .expect("open the file");
    let lock = other
        .begin_with("BEGIN EXCLUSIVE")
        .await
        .expect("take the write lock");

    for round in 0..2 {
        let started = std::time::Instant::now();
        let put = http.put(item, &if_match, &json!({"n": 2})).await;
        expect_busy(&format!("PUT with If-Match, round {round}"), &put, &server);
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "the write waited for the busy timeout first"
        );
        let blind = http.put(item, &[], &json!({"n": 3})).await;
        expect_busy("an unconditional PUT", &blind, &server);
        let create = http.put("/items/locked-new", &[], &json!({"n": 1})).await;
        expect_busy("a create", &create, &server);
        let patch = http.patch(item, &if_match, r#"{"n": 4}"#).await;
        expect_busy("PATCH with If-Match", &patch, &server);
        let delete = http.delete(item, &if_match).await;
        expect_busy("DELETE with If-Match", &delete, &server);
        // Reads go on (WAL), and see that nothing changed.
        let read = http.get(item, &[]).await;
        assert_eq!(
            read.status,
            StatusCode::OK,
            "a read while the file is locked"
        );
        assert_eq!(read.etag().as_deref(), Some(tag.as_str()));
        assert_eq!(read.json(), json!({"n": 1}));
    }

    lock.rollback().await.expect("release the lock");
    // Released: the same writes apply, once each, with the tag from before.
    let put = http.put(item, &if_match, &json!({"n": 2})).await;
    assert_eq!(
        put.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&put.body)
    );
    let v2 = put.etag().unwrap();
    assert_ne!(v2, tag);
    let stale = http.put(item, &if_match, &json!({"n": 5})).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    let patch = http
        .patch(item, &[(header::IF_MATCH, v2.as_str())], r#"{"m": 1}"#)
        .await;
    assert_eq!(patch.status, StatusCode::OK);
    let v3 = patch.etag().unwrap();
    assert_eq!(http.get(item, &[]).await.json(), json!({"n": 2, "m": 1}));
    let delete = http.delete(item, &[(header::IF_MATCH, v3.as_str())]).await;
    assert_eq!(delete.status, StatusCode::NO_CONTENT);
    let missing = http.get("/items/locked-new", &[]).await;
    assert_eq!(
        missing.status,
        StatusCode::NOT_FOUND,
        "a 503 create made nothing"
    );
    other.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_sqlite_processes_started_at_once_on_a_new_file_all_serve() {
    let (_, url) = database("startup");
    let env = [("DATABASE_URL", url.as_str())];
    // Built first, so that the three start together.
    items_contract::example_binary("axum_sqlite");
    let (a, b, c) = tokio::join!(
        ExampleServer::start("axum_sqlite", &env),
        ExampleServer::start("axum_sqlite", &env),
        ExampleServer::start("axum_sqlite", &env),
    );
    let item = "/items/startup";
    let created = HttpClient::for_server(&a)
        .put(item, &[(header::IF_NONE_MATCH, "*")], &json!({"n": 1}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    for server in [&b, &c] {
        let read = HttpClient::for_server(server).get(item, &[]).await;
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.etag(), created.etag());
    }
}
