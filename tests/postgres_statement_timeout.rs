//! Finding 7.8: a store call the layer timed out kept running in Postgres. Its
//! statement stayed active (waiting on a row lock) on a connection that went back to
//! the pool, so later calls on unrelated keys queued behind it, and the abandoned
//! compare-and-set could still land once the lock was released.

mod postgres_support;

use std::time::{Duration, Instant};

use postgres_support::{pool_for, shared_pool, store, unique};
use tower_precondition::store::{
    testing::committed, AtomicVersionStore, CasOutcome, Entry, StoreErrorKind,
};

const TABLE: &str = "tp_test_statement_timeout_versions";

/// The layer's default store timeout.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn finding_7_8_a_timed_out_store_call_neither_poisons_the_pool_nor_lands_later() {
    // One connection: a connection handed back with a statement still running on it
    // is surely the one the next call gets.
    let Some(pool) = shared_pool(1).await else {
        return;
    };
    let store = store(&pool, TABLE).await;
    let locked = unique("/items/locked");
    let a = committed("a");
    let b = committed("b");
    assert_eq!(
        store
            .compare_and_set(&locked, None, Some(&a))
            .await
            .expect("cas"),
        CasOutcome::Applied
    );

    // Another session holds the version row locked, longer than the store timeout.
    let url = postgres_support::database_url().expect("set");
    let blocker_pool = pool_for(&url, 1);
    let blocker = blocker_pool.get().await.expect("connection");
    blocker.batch_execute("BEGIN").await.expect("begin");
    blocker
        .query(
            &format!("SELECT 1 FROM \"{TABLE}\" WHERE resource_key = $1 FOR UPDATE"),
            &[&locked],
        )
        .await
        .expect("lock the row");

    // A store call on that key gives up within about the store timeout, as the layer
    // makes it (it drops the call's future at the deadline).
    let started = Instant::now();
    let blocked = tokio::time::timeout(
        STORE_TIMEOUT,
        store.compare_and_set(&locked, Some(&a), Some(&b)),
    )
    .await;
    // The server gave up first (statement_timeout below the store timeout), so the
    // caller gets the store's own timeout error, not its deadline.
    assert!(
        matches!(&blocked, Ok(Err(e)) if e.kind() == StoreErrorKind::Timeout),
        "the server must end the statement before the caller's deadline: {blocked:?}"
    );
    assert!(
        started.elapsed() < STORE_TIMEOUT + Duration::from_millis(500),
        "the call must fail within about the store timeout, took {:?}",
        started.elapsed()
    );

    // The pool is not poisoned: calls on other keys answer at once.
    for i in 0..3 {
        let other = unique(&format!("/items/other-{i}"));
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            Duration::from_secs(1),
            store.compare_and_set(&other, None, Some(&committed("c"))),
        )
        .await;
        assert!(
            matches!(outcome, Ok(Ok(CasOutcome::Applied))),
            "a call on another key must not wait behind the abandoned one: {outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    // Once the blocker commits, the abandoned compare-and-set does not land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocker.batch_execute("COMMIT").await.expect("commit");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        store.load(&locked).await.expect("load"),
        Some(a),
        "a compare-and-set answered as failed must never apply later"
    );
}

/// A call its caller abandons before the server's own timeout (a layer with a shorter
/// store timeout, a client that went away) is cancelled on the server, and its
/// connection is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn an_abandoned_store_call_is_cancelled_and_its_connection_discarded() {
    let Some(pool) = shared_pool(1).await else {
        return;
    };
    let store = store(&pool, TABLE).await;
    let locked = unique("/items/abandoned");
    let a = committed("a");
    store
        .compare_and_set(&locked, None, Some(&a))
        .await
        .expect("cas");
    let url = postgres_support::database_url().expect("set");
    let blocker_pool = pool_for(&url, 1);
    let blocker = blocker_pool.get().await.expect("connection");
    blocker.batch_execute("BEGIN").await.expect("begin");
    blocker
        .query(
            &format!("SELECT 1 FROM \"{TABLE}\" WHERE resource_key = $1 FOR UPDATE"),
            &[&locked],
        )
        .await
        .expect("lock the row");

    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        store.compare_and_set(&locked, Some(&a), Some(&committed("b"))),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the caller gave up first: {abandoned:?}"
    );
    let other = unique("/items/after-abandon");
    let outcome = tokio::time::timeout(
        Duration::from_millis(500),
        store.compare_and_set(&other, None, Some(&committed("c"))),
    )
    .await;
    assert!(
        matches!(outcome, Ok(Ok(CasOutcome::Applied))),
        "the next call gets a connection of its own: {outcome:?}"
    );

    // Released well within the server's own statement timeout: only the cancel keeps
    // the abandoned statement from landing now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    blocker.batch_execute("COMMIT").await.expect("commit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.load(&locked).await.expect("load"), Some::<Entry>(a));
}
