//! Three instances of one app (three routers, each with its own `RedisStore` and
//! connection) over one Redis, with the item bodies in Redis too: many clients doing
//! read-modify-write with retries across all three lose no increment, and of many
//! concurrent writes with the same `If-Match`, exactly one wins.

mod redis_support;

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use axum::{http::StatusCode, Router};
use redis_support::{call, default_items_app, redis_url, unique_prefix, Cleanup};
use tower_precondition::store::RedisStore;

const INSTANCES: usize = 3;

/// Three app instances sharing one prefix (their write-call counters, and the guard
/// that removes their keys), or `None` when the run has no Redis.
async fn instances() -> Option<(Vec<Router>, Vec<Arc<AtomicUsize>>, Cleanup)> {
    let url = redis_url()?;
    let prefix = unique_prefix("multi");
    let mut routers = Vec::new();
    let mut calls = Vec::new();
    let mut cleanup = None;
    for _ in 0..INSTANCES {
        let store = match RedisStore::open(&url).await {
            Ok(store) => store.prefix(&prefix),
            Err(error) => {
                assert!(!redis_support::ci(), "Redis unreachable: {error}");
                eprintln!("skipped: Redis at {url} is unreachable ({error})");
                return None;
            }
        };
        cleanup.get_or_insert_with(|| Cleanup::of(&store, &url));
        let (router, counter) = default_items_app(store);
        routers.push(router);
        calls.push(counter);
    }
    Some((routers, calls, cleanup?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn read_modify_write_across_instances_loses_no_increment() {
    const CLIENTS: usize = 24;
    const INCREMENTS: usize = 8;
    let Some((apps, _, _cleanup)) = instances().await else {
        return;
    };
    let uri = "/items/counter";
    let (status, _, _) = call(&apps[0], "PUT", uri, &[], Some(r#"{"n":0}"#)).await;
    assert_eq!(status, StatusCode::CREATED);

    let successes = Arc::new(AtomicUsize::new(0));
    let conflicts = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let apps = apps.clone();
        let successes = successes.clone();
        let conflicts = conflicts.clone();
        tasks.push(tokio::spawn(async move {
            let mut attempt = client;
            for _ in 0..INCREMENTS {
                loop {
                    attempt += 1;
                    // Read on one instance, write on another.
                    let reader = &apps[attempt % INSTANCES];
                    let writer = &apps[(attempt + 1) % INSTANCES];
                    let (status, etag, body) = call(reader, "GET", uri, &[], None).await;
                    assert_eq!(status, StatusCode::OK);
                    let Some(etag) = etag else {
                        // A write is between its data write and its commit; retry.
                        tokio::task::yield_now().await;
                        continue;
                    };
                    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
                    let n = value["n"].as_u64().expect("counter");
                    let next = format!(r#"{{"n":{}}}"#, n + 1);
                    let (status, _, _) =
                        call(writer, "PUT", uri, &[("if-match", &etag)], Some(&next)).await;
                    match status {
                        StatusCode::NO_CONTENT => {
                            successes.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => {
                            conflicts.fetch_add(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                        }
                        other => panic!("unexpected status {other}"),
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }

    let (status, _, body) = call(&apps[2], "GET", uri, &[], None).await;
    assert_eq!(status, StatusCode::OK);
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    let successes = successes.load(Ordering::SeqCst);
    assert_eq!(successes, CLIENTS * INCREMENTS);
    assert_eq!(
        value["n"].as_u64(),
        Some(successes as u64),
        "the counter equals the successful increments"
    );
    eprintln!(
        "{successes} increments over {INSTANCES} instances, {} refused attempts retried",
        conflicts.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn concurrent_writes_with_one_if_match_have_exactly_one_winner() {
    const WRITERS: usize = 30;
    const ROUNDS: usize = 5;
    let Some((apps, calls, _cleanup)) = instances().await else {
        return;
    };
    let uri = "/items/race";
    let (status, _, _) = call(&apps[0], "PUT", uri, &[], Some(r#"{"writer":null}"#)).await;
    assert_eq!(status, StatusCode::CREATED);

    for round in 0..ROUNDS {
        let (_, etag, _) = call(&apps[round % INSTANCES], "GET", uri, &[], None).await;
        let etag = etag.expect("etag");
        let calls_before: usize = calls.iter().map(|c| c.load(Ordering::SeqCst)).sum();
        let tasks: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let app = apps[writer % INSTANCES].clone();
                let etag = etag.clone();
                tokio::spawn(async move {
                    let body = format!(r#"{{"writer":{writer}}}"#);
                    let (status, _, _) =
                        call(&app, "PUT", uri, &[("if-match", &etag)], Some(&body)).await;
                    (writer, status)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            let (writer, status) = task.await.expect("writer task");
            match status {
                StatusCode::NO_CONTENT => winners.push(writer),
                StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => {}
                other => panic!("unexpected status {other}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one winner");
        let calls_after: usize = calls.iter().map(|c| c.load(Ordering::SeqCst)).sum();
        assert_eq!(
            calls_after - calls_before,
            1,
            "round {round}: only the winner's handler ran"
        );
        let (_, _, body) = call(&apps[(round + 1) % INSTANCES], "GET", uri, &[], None).await;
        let value: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(value["writer"].as_u64(), Some(winners[0] as u64));
    }
}
