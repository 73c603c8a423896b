//! The `axum_redis` example, run as separate processes and driven over real HTTP: the
//! whole `/items/{id}` contract against the real Redis in `REDIS_URL`, and three
//! processes side by side serving one consistent set of items.

#[path = "common/items_contract.rs"]
mod items_contract;
mod redis_support;

use http::{header, StatusCode};
use items_contract::{unique_id, ExampleServer, HttpClient};
use redis_support::{redis_url, unique_prefix, Cleanup};
use serde_json::json;
use tower_precondition::store::RedisStore;

/// REDIS_URL and a fresh prefix (with the guard that removes its keys), or `None`.
async fn redis_env() -> Option<(String, String, Cleanup)> {
    let url = redis_url()?;
    let prefix = unique_prefix("example");
    let store = match RedisStore::open(&url).await {
        Ok(store) => store.prefix(&prefix),
        Err(error) => {
            assert!(!redis_support::ci(), "Redis unreachable: {error}");
            eprintln!("skipped: Redis at {url} is unreachable ({error})");
            return None;
        }
    };
    let cleanup = Cleanup::of(&store, &url);
    Some((url, prefix, cleanup))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn axum_redis_serves_the_items_contract() {
    let Some((url, prefix, _cleanup)) = redis_env().await else {
        return;
    };
    items_contract::run_items_contract(
        "axum_redis",
        &[("REDIS_URL", &url), ("REDIS_PREFIX", &prefix)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn axum_redis_requires_preconditions_when_asked() {
    let Some((url, prefix, _cleanup)) = redis_env().await else {
        return;
    };
    items_contract::run_require_preconditions_contract(
        "axum_redis",
        &[("REDIS_URL", &url), ("REDIS_PREFIX", &prefix)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn axum_redis_lets_a_valid_write_through_while_uploads_stall() {
    let Some((url, prefix, _cleanup)) = redis_env().await else {
        return;
    };
    let env = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_PREFIX", prefix.as_str()),
    ];
    items_contract::run_stalled_upload_contract("axum_redis", &env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn axum_redis_keys_an_alias_path_to_the_same_item() {
    let Some((url, prefix, _cleanup)) = redis_env().await else {
        return;
    };
    let env = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_PREFIX", prefix.as_str()),
    ];
    items_contract::run_alias_contract("axum_redis", &env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn axum_redis_hides_a_private_item_from_preconditions() {
    let Some((url, prefix, _cleanup)) = redis_env().await else {
        return;
    };
    let env = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_PREFIX", prefix.as_str()),
    ];
    items_contract::run_hidden_resource_contract("axum_redis", &env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn three_processes_serve_one_consistent_set_of_items() {
    const RACERS: usize = 24;
    let Some((url, prefix, _cleanup)) = redis_env().await else {
        return;
    };
    let env = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_PREFIX", prefix.as_str()),
    ];
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(ExampleServer::start("axum_redis", &env).await);
    }
    let http: Vec<HttpClient> = servers.iter().map(HttpClient::for_server).collect();
    let path = format!("/items/{}", unique_id("shared"));
    let path = path.as_str();

    // Created on one process, read with the same body and ETag on the others.
    let created = http[0]
        .put(path, &[], &json!({"name": "lamp", "stock": 3}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let tag = created.etag().expect("etag");
    for client in &http[1..] {
        let read = client.get(path, &[]).await;
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.etag().as_deref(), Some(tag.as_str()));
        assert_eq!(read.json(), json!({"name": "lamp", "stock": 3}));
    }

    // A change on one process makes the old ETag stale on all of them.
    let patched = http[1]
        .patch(path, &[(header::IF_MATCH, &tag)], r#"{"stock":4}"#)
        .await;
    assert_eq!(patched.status, StatusCode::OK);
    let new_tag = patched.etag().expect("etag");
    for client in [&http[0], &http[2]] {
        let stale = client
            .patch(path, &[(header::IF_MATCH, &tag)], r#"{"stock":5}"#)
            .await;
        assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
        assert_eq!(stale.etag().as_deref(), Some(new_tag.as_str()));
        let not_modified = client.get(path, &[(header::IF_NONE_MATCH, &new_tag)]).await;
        assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    }

    // Many writers with the same If-Match, spread over the three processes: one wins.
    let racers: Vec<_> = (0..RACERS)
        .map(|i| {
            let client = http[i % 3].clone();
            let path = path.to_owned();
            let new_tag = new_tag.clone();
            tokio::spawn(async move {
                let body = format!(r#"{{"winner":{i}}}"#);
                let reply = client
                    .patch(&path, &[(header::IF_MATCH, &new_tag)], &body)
                    .await;
                (i, reply.status)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for racer in racers {
        let (i, status) = racer.await.expect("racer");
        match status {
            StatusCode::OK => winners.push(i),
            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => {}
            other => panic!("racer {i}: unexpected {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner: {winners:?}");
    for client in &http {
        let read = client.get(path, &[]).await;
        assert_eq!(read.json()["winner"], json!(winners[0]));
        assert_eq!(
            read.json()["stock"],
            json!(4),
            "the merge kept the other fields"
        );
    }

    // Deleted through one process, gone on all.
    let current = http[0].get(path, &[]).await.etag().expect("etag");
    let deleted = http[2].delete(path, &[(header::IF_MATCH, &current)]).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    for client in &http {
        assert_eq!(client.get(path, &[]).await.status, StatusCode::NOT_FOUND);
    }
}
