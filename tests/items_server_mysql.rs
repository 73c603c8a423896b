//! The `axum_mysql` example (row-version mode, MariaDB through sqlx), run as separate
//! processes and driven over real HTTP against the real MariaDB in `MYSQL_URL` (passed
//! to the example as its `DATABASE_URL`):
//! the `/items/{id}` contract and the races on three processes sharing the database,
//! each request to the next process, and the remaining contracts on one.

#[path = "common/items_contract.rs"]
mod items_contract;

/// The processes of the multi-instance tests.
const INSTANCES: usize = 3;

/// The shared MariaDB URL, or `None` (with the skip line) when the run has none
/// (and a failure under `CI=true`).
fn database_url() -> Option<String> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn axum_mysql_serves_the_items_contract_on_three_instances() {
    let Some(url) = database_url() else {
        return;
    };
    items_contract::run_items_contract_on_instances(
        "axum_mysql",
        &[("DATABASE_URL", &url)],
        INSTANCES,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn axum_mysql_has_one_winner_per_same_if_match_race_on_three_instances() {
    let Some(url) = database_url() else {
        return;
    };
    items_contract::run_same_if_match_race_on_instances(
        "axum_mysql",
        &[("DATABASE_URL", &url)],
        INSTANCES,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn axum_mysql_loses_no_increment_on_three_instances() {
    let Some(url) = database_url() else {
        return;
    };
    items_contract::run_counter_on_instances("axum_mysql", &[("DATABASE_URL", &url)], INSTANCES)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn axum_mysql_requires_preconditions_when_asked() {
    let Some(url) = database_url() else {
        return;
    };
    items_contract::run_require_preconditions_contract("axum_mysql", &[("DATABASE_URL", &url)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn axum_mysql_lets_a_valid_write_through_while_uploads_stall() {
    let Some(url) = database_url() else {
        return;
    };
    items_contract::run_stalled_upload_contract("axum_mysql", &[("DATABASE_URL", &url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn axum_mysql_keys_an_alias_path_to_the_same_item() {
    let Some(url) = database_url() else {
        return;
    };
    items_contract::run_alias_contract("axum_mysql", &[("DATABASE_URL", &url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn axum_mysql_hides_a_private_item_from_preconditions() {
    let Some(url) = database_url() else {
        return;
    };
    items_contract::run_hidden_resource_contract("axum_mysql", &[("DATABASE_URL", &url)]).await;
}
