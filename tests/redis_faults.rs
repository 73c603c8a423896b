//! Faults against a real server this test owns (a private `redis-server` child on a
//! free port, so the shared server is never disturbed): Redis killed mid-run, Redis
//! restarted empty (no versions, no scripts), and `SCRIPT FLUSH` under load.

mod redis_support;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{http::StatusCode, Router};
use redis_support::{call, items_app, redis_url, Items, OwnRedis};
use tower_precondition::{
    store::{testing::committed, AtomicVersionStore, CasOutcome, RedisStore},
    PreconditionLayer,
};

/// A private server and an app on it with short timeouts, or `None` (skip).
async fn setup() -> Option<(OwnRedis, Router, Arc<AtomicUsize>)> {
    redis_url()?;
    let server = OwnRedis::start()?;
    let store = RedisStore::open(&server.url())
        .await
        .expect("own server is up")
        .prefix("faults:");
    let calls = Arc::new(AtomicUsize::new(0));
    let items = Items {
        store: store.clone(),
        write_calls: calls.clone(),
    };
    let layer = PreconditionLayer::new(store)
        .store_timeout(Duration::from_millis(500))
        .lease(Duration::from_secs(5));
    Some((server, items_app(items, layer), calls))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn redis_down_fails_writes_closed_and_service_recovers_on_restart() {
    let Some((mut server, app, calls)) = setup().await else {
        return;
    };
    let uri = "/items/1";
    let (status, _, _) = call(&app, "PUT", uri, &[], Some(r#"{"v":1}"#)).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, old_etag, _) = call(&app, "GET", uri, &[], None).await;
    assert_eq!(status, StatusCode::OK);
    let old_etag = old_etag.expect("etag");

    server.kill();
    let calls_before = calls.load(Ordering::SeqCst);
    for (method, headers, body) in [
        ("PUT", vec![], Some(r#"{"v":2}"#)),
        (
            "PUT",
            vec![("if-match", old_etag.as_str())],
            Some(r#"{"v":2}"#),
        ),
        ("PUT", vec![("if-none-match", "*")], Some(r#"{"v":2}"#)),
        ("DELETE", vec![("if-match", old_etag.as_str())], None),
    ] {
        let (status, _, body) = call(&app, method, uri, &headers, body).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {headers:?} while Redis is down: {body}"
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        calls_before,
        "no write handler runs while Redis is down"
    );

    // Redis comes back empty: no versions, no scripts. The app recovers by itself.
    server.restart();
    let mut recovered = false;
    for _ in 0..100 {
        let (status, _, _) = call(&app, "PUT", "/items/2", &[], Some(r#"{"v":1}"#)).await;
        if status.is_success() {
            recovered = true;
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "writes succeed again once Redis is back");

    // The restart forgot every version: the old ETag must fail, never pass.
    let calls_before = calls.load(Ordering::SeqCst);
    let (status, _, _) = call(
        &app,
        "PUT",
        uri,
        &[("if-match", &old_etag)],
        Some(r#"{"v":3}"#),
    )
    .await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    let (status, _, _) = call(
        &app,
        "PUT",
        uri,
        &[("if-unmodified-since", "Sat, 06 Nov 2094 08:49:37 GMT")],
        Some(r#"{"v":3}"#),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::PRECONDITION_FAILED,
        "a date cannot be checked against a forgotten version"
    );
    assert_eq!(calls.load(Ordering::SeqCst), calls_before);
    let (status, _, _) = call(&app, "PUT", uri, &[], Some(r#"{"v":3}"#)).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the data went with the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn script_flush_mid_run_reaches_no_client() {
    let Some((server, app, _)) = setup().await else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flushes = Arc::new(AtomicUsize::new(0));
    let flusher = {
        let stop = stop.clone();
        let flushes = flushes.clone();
        let url = server.url();
        tokio::spawn(async move {
            let mut con = redis_support::raw_connection(&url).await;
            while !stop.load(Ordering::SeqCst) {
                let _: () = redis::cmd("SCRIPT")
                    .arg("FLUSH")
                    .query_async(&mut con)
                    .await
                    .expect("script flush");
                flushes.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let clients: Vec<_> = (0..8)
        .map(|client| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut statuses = BTreeMap::new();
                let uri = format!("/items/flush-{}", client % 4);
                for i in 0..40 {
                    let body = format!(r#"{{"i":{i}}}"#);
                    let (status, etag, _) = call(&app, "GET", &uri, &[], None).await;
                    let (status, _, _) = match etag {
                        Some(etag) if status == StatusCode::OK => {
                            call(&app, "PUT", &uri, &[("if-match", &etag)], Some(&body)).await
                        }
                        _ => call(&app, "PUT", &uri, &[], Some(&body)).await,
                    };
                    *statuses.entry(status.as_u16()).or_insert(0usize) += 1;
                }
                statuses
            })
        })
        .collect();
    let mut statuses = BTreeMap::new();
    for client in clients {
        for (status, n) in client.await.expect("client") {
            *statuses.entry(status).or_insert(0) += n;
        }
    }
    stop.store(true, Ordering::SeqCst);
    flusher.await.expect("flusher");

    assert!(flushes.load(Ordering::SeqCst) > 0);
    assert!(
        statuses
            .keys()
            .all(|s| [200, 201, 204, 409, 412].contains(s)),
        "no error from the flushed script cache reaches a client: {statuses:?}"
    );
    assert!(
        statuses.contains_key(&204),
        "writes went through: {statuses:?}"
    );
    eprintln!(
        "{} script flushes during the run; statuses {statuses:?}",
        flushes.load(Ordering::SeqCst)
    );
}

#[tokio::test]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn an_empty_script_cache_is_refilled_by_the_next_call() {
    if redis_url().is_none() {
        return;
    }
    let Some(server) = OwnRedis::start() else {
        return;
    };
    let store = RedisStore::open(&server.url())
        .await
        .expect("own server is up");
    let sha = RedisStore::script_sha();
    let cached = || {
        server
            .cli(&["SCRIPT", "EXISTS", sha])
            .expect("redis-cli")
            .trim()
            .to_owned()
    };
    let mut previous = None;
    for i in 0..3 {
        // Nobody else uses this server, so the call below is the one that meets NOSCRIPT.
        assert_eq!(
            server.cli(&["SCRIPT", "FLUSH"]).expect("redis-cli").trim(),
            "OK"
        );
        assert_eq!(cached(), "0", "the script cache is empty");
        let next = committed(&format!("v{i}"));
        assert_eq!(
            store
                .compare_and_set("k", previous.as_ref(), Some(&next))
                .await
                .expect("NOSCRIPT never reaches the caller"),
            CasOutcome::Applied
        );
        assert_eq!(cached(), "1", "the call put the script back");
        previous = Some(next);
    }
}
