//! Several app instances (each with its own pool and layer, as separate processes would
//! have) on one Postgres database, in both modes: read-modify-write loses nothing, and
//! of many writes carrying the same `If-Match`, exactly one wins.

mod postgres_support;

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use axum::{http::StatusCode, Router};
use postgres_support::{
    app, body_text, etag, get_req, items_table, put_req, send, shared_pool, store, stored_body,
    unique, Mode,
};

const VERSIONS: &str = "tp_test_concurrency_versions";
const ITEMS: &str = "tp_test_concurrency_items";

/// App instances per test; each has its own pool of [`POOL`] connections.
const INSTANCES: usize = 3;
const POOL: usize = 4;
/// Clients per instance, and successful increments each client makes.
const CLIENTS: usize = 4;
const INCREMENTS: usize = 5;
/// Writers in the same-`If-Match` race.
const RACERS: usize = 32;

/// One test at a time: each opens `INSTANCES * POOL` connections to the shared server.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn instances(mode: Mode) -> Option<(Vec<Router>, deadpool_postgres::Pool)> {
    let mut apps = Vec::new();
    let mut first_pool = None;
    for _ in 0..INSTANCES {
        let pool = shared_pool(POOL).await?;
        let store = store(&pool, VERSIONS).await;
        items_table(&pool, ITEMS).await;
        apps.push(app(mode, store, ITEMS).0);
        first_pool.get_or_insert(pool);
    }
    Some((apps, first_pool?))
}

/// Every client loops GET → PUT `If-Match` (value + 1) until it has made
/// [`INCREMENTS`] successful writes; the final value must equal the number of 2xx.
async fn read_modify_write(mode: Mode) {
    let _serial = SERIAL.lock().await;
    let Some((apps, pool)) = instances(mode).await else {
        return;
    };
    let id = unique("counter");
    let created = send(&apps[0], put_req(&id, "0", &[("if-none-match", "*")])).await;
    assert_eq!(created.status(), StatusCode::CREATED);

    let successes = Arc::new(AtomicUsize::new(0));
    let refusals = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for app in &apps {
        for _ in 0..CLIENTS {
            let (app, id) = (app.clone(), id.clone());
            let (successes, refusals) = (successes.clone(), refusals.clone());
            clients.push(tokio::spawn(async move {
                let mut mine = 0;
                while mine < INCREMENTS {
                    let read = send(&app, get_req(&id)).await;
                    assert_eq!(read.status(), StatusCode::OK);
                    let tag = etag(&read).expect("read ETag");
                    let n: usize = body_text(read).await.parse().expect("counter");
                    let write = send(
                        &app,
                        put_req(&id, &(n + 1).to_string(), &[("if-match", &tag)]),
                    )
                    .await;
                    match write.status() {
                        s if s.is_success() => {
                            mine += 1;
                            successes.fetch_add(1, Ordering::SeqCst);
                        }
                        StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => {
                            refusals.fetch_add(1, Ordering::SeqCst);
                            // Another client won this round; a short pause keeps the
                            // store mode's 409s from spinning.
                            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                        }
                        other => panic!("unexpected {other}"),
                    }
                }
            }));
        }
    }
    for client in clients {
        client.await.expect("client");
    }
    let successes = successes.load(Ordering::SeqCst);
    assert_eq!(successes, INSTANCES * CLIENTS * INCREMENTS);
    let final_value: usize = stored_body(&pool, ITEMS, &id)
        .await
        .expect("counter")
        .parse()
        .expect("number");
    assert_eq!(
        final_value,
        successes,
        "{mode:?}: every successful increment is counted once ({} refusals)",
        refusals.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn read_modify_write_loses_nothing_transactional() {
    read_modify_write(Mode::Transactional).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn read_modify_write_loses_nothing_store_mode() {
    read_modify_write(Mode::Store).await;
}

/// [`RACERS`] writes spread over the instances, all with the same `If-Match`:
/// exactly one 2xx; the stored body is the winner's.
async fn same_if_match_race(mode: Mode) {
    let _serial = SERIAL.lock().await;
    let Some((apps, pool)) = instances(mode).await else {
        return;
    };
    let id = unique("race");
    let created = send(&apps[0], put_req(&id, "start", &[])).await;
    let tag = etag(&created).expect("ETag");

    let racers = (0..RACERS).map(|i| {
        let app = apps[i % INSTANCES].clone();
        let (id, tag) = (id.clone(), tag.clone());
        tokio::spawn(async move {
            let body = format!("writer-{i}");
            let response = send(&app, put_req(&id, &body, &[("if-match", &tag)])).await;
            (body, response.status())
        })
    });
    let mut winners = Vec::new();
    for racer in racers {
        let (body, status) = racer.await.expect("racer");
        match status {
            s if s.is_success() => winners.push(body),
            StatusCode::PRECONDITION_FAILED => {}
            StatusCode::CONFLICT if mode == Mode::Store => {}
            other => panic!("{mode:?}: unexpected {other}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "{mode:?}: exactly one winner, got {winners:?}"
    );
    assert_eq!(
        stored_body(&pool, ITEMS, &id).await.as_deref(),
        Some(winners[0].as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn same_if_match_has_one_winner_transactional() {
    same_if_match_race(Mode::Transactional).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn same_if_match_has_one_winner_store_mode() {
    same_if_match_race(Mode::Store).await;
}

/// [`RACERS`] creates with `If-None-Match: *` of one new item: exactly one 201.
async fn create_race(mode: Mode) {
    let _serial = SERIAL.lock().await;
    let Some((apps, pool)) = instances(mode).await else {
        return;
    };
    let id = unique("create-race");
    let racers = (0..RACERS).map(|i| {
        let app = apps[i % INSTANCES].clone();
        let id = id.clone();
        tokio::spawn(async move {
            let body = format!("creator-{i}");
            let response = send(&app, put_req(&id, &body, &[("if-none-match", "*")])).await;
            (body, response.status())
        })
    });
    let mut winners = Vec::new();
    for racer in racers {
        let (body, status) = racer.await.expect("racer");
        match status {
            StatusCode::CREATED => winners.push(body),
            StatusCode::PRECONDITION_FAILED => {}
            StatusCode::CONFLICT if mode == Mode::Store => {}
            other => panic!("{mode:?}: unexpected {other}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "{mode:?}: exactly one creator, got {winners:?}"
    );
    assert_eq!(
        stored_body(&pool, ITEMS, &id).await.as_deref(),
        Some(winners[0].as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn concurrent_creates_have_one_winner_transactional() {
    create_race(Mode::Transactional).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn concurrent_creates_have_one_winner_store_mode() {
    create_race(Mode::Store).await;
}
