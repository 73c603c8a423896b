//! Fencing in store mode: a handler's own transaction checks that its write's lease is
//! still held ([`SqliteStore::check_fence`], [`PostgresStore::check_fence`]), so a
//! write that outlives its handler (the client went away, the deadline passed, the
//! lease was taken over) changes nothing instead of landing over a newer write.
//!
//! SQLite runs everywhere (a temporary file); Postgres needs `DATABASE_URL`.

#[path = "postgres_support/mod.rs"]
mod postgres_support;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Body,
    extract::State,
    http::{Request, StatusCode},
    routing::put,
    Extension, Router,
};
use tokio::sync::oneshot;
use tower::ServiceExt;
use tower_precondition::{
    store::{
        testing::committed, AtomicVersionStore, CasOutcome, Entry, Fence, FenceError, Lease,
        LeaseToken, PostgresStore, SqliteStore,
    },
    PreconditionLayer, Reservation, StoreError,
};

/// A SQLite file of its own for one test, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(label: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "tp-fencing-{label}-{}-{nanos:x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn path(&self) -> PathBuf {
        self.0.join("db.sqlite")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

async fn sqlite_store(dir: &TempFile) -> SqliteStore {
    let store = SqliteStore::open(dir.path()).await.expect("open");
    store.migrate().await.expect("migrate");
    sqlx::query("CREATE TABLE items (id TEXT PRIMARY KEY, body TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .expect("items table");
    store
}

/// Puts a live lease (token `token`, no version) on `key` and returns it.
async fn lease_on(store: &dyn AtomicVersionStore, key: &str, token: LeaseToken) -> Entry {
    let now = store.clock_millis().await.expect("clock");
    let leased = Entry::from_parts(None, Some(Lease::from_parts(token, now + 60_000)))
        .expect("a lease is an entry");
    let outcome = store
        .compare_and_set(key, None, Some(&leased))
        .await
        .expect("reserve");
    assert!(matches!(outcome, CasOutcome::Applied), "{outcome:?}");
    leased
}

async fn sqlite_fence(store: &SqliteStore, fence: &Fence) -> Result<(), FenceError> {
    let mut tx = store
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("begin");
    let checked = store.check_fence(&mut tx, fence).await;
    tx.rollback().await.expect("rollback");
    checked
}

#[tokio::test]
async fn sqlite_a_live_lease_passes_and_a_settled_released_or_foreign_one_does_not() {
    let dir = TempFile::new("states");
    let store = sqlite_store(&dir).await;
    let token = LeaseToken::random();
    let fence = Fence::new("/items/a", token);

    // No entry at all: nothing is held.
    assert!(sqlite_fence(&store, &fence)
        .await
        .unwrap_err()
        .is_lease_lost());

    let leased = lease_on(&store, "/items/a", token).await;
    sqlite_fence(&store, &fence).await.expect("a live lease");
    let foreign = Fence::new("/items/a", LeaseToken::random());
    assert!(sqlite_fence(&store, &foreign)
        .await
        .unwrap_err()
        .is_lease_lost());
    let other_key = Fence::new("/items/b", token);
    assert!(sqlite_fence(&store, &other_key)
        .await
        .unwrap_err()
        .is_lease_lost());

    // Released (the marker keeps the token): no longer held.
    let released = Entry::from_parts(None, Some(Lease::released(token))).expect("marker");
    let outcome = store
        .compare_and_set("/items/a", Some(&leased), Some(&released))
        .await
        .expect("release");
    assert!(matches!(outcome, CasOutcome::Applied), "{outcome:?}");
    assert!(sqlite_fence(&store, &fence)
        .await
        .unwrap_err()
        .is_lease_lost());

    // Settled to a version (no lease): not held either.
    let settled = committed("v1");
    let outcome = store
        .compare_and_set("/items/a", Some(&released), Some(&settled))
        .await
        .expect("settle");
    assert!(matches!(outcome, CasOutcome::Applied), "{outcome:?}");
    assert!(sqlite_fence(&store, &fence)
        .await
        .unwrap_err()
        .is_lease_lost());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_settle_waits_for_the_fenced_transaction_to_commit() {
    let dir = TempFile::new("waits");
    let store = sqlite_store(&dir).await;
    let token = LeaseToken::random();
    let leased = lease_on(&store, "/items/a", token).await;

    let mut tx = store
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("begin");
    store
        .check_fence(&mut tx, &Fence::new("/items/a", token))
        .await
        .expect("held");
    // The settle (what the layer does when the handler is cut off) must wait for the
    // fenced write: it lands after it, never between the check and the commit.
    let settle = tokio::spawn({
        let store = store.clone();
        async move {
            let settled = committed("v1");
            store
                .compare_and_set("/items/a", Some(&leased), Some(&settled))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !settle.is_finished(),
        "the settle came between check and commit"
    );
    sqlx::query("INSERT INTO items (id, body) VALUES ('a', 'fenced')")
        .execute(&mut *tx)
        .await
        .expect("write");
    tx.commit().await.expect("commit");
    let outcome = settle.await.expect("task").expect("settle");
    assert!(matches!(outcome, CasOutcome::Applied), "{outcome:?}");
}

/// The handler below and the test, talking about the write it leaves running.
struct Stalled {
    store: SqliteStore,
    /// The handler's write waits for this go-ahead.
    go: Mutex<Option<oneshot::Sender<()>>>,
    /// Where the write reports how it ended.
    done: Mutex<Option<oneshot::Sender<Result<(), FenceError>>>>,
}

fn database(error: sqlx::Error) -> FenceError {
    FenceError::Store(StoreError::unavailable("items table").with_source(error))
}

/// A handler that starts its write and then stops answering: the write waits for the
/// test's go-ahead, as a statement queued behind a slow database would. The layer
/// cuts the handler off at its deadline; the write runs on.
async fn stalled_put(
    State(stalled): State<Arc<Stalled>>,
    Extension(reservation): Extension<Reservation>,
) -> StatusCode {
    let (go_tx, go_rx) = oneshot::channel();
    *stalled.go.lock().unwrap() = Some(go_tx);
    let report = stalled.done.lock().unwrap().take();
    let store = stalled.store.clone();
    tokio::spawn(async move {
        let _ = go_rx.await;
        let written = async {
            let mut tx = store
                .pool()
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(database)?;
            store.check_fence(&mut tx, &reservation.fence()).await?;
            sqlx::query(
                "INSERT INTO items (id, body) VALUES ('a', 'late') \
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            )
            .execute(&mut *tx)
            .await
            .map_err(database)?;
            tx.commit().await.map_err(database)
        }
        .await;
        if let Some(report) = report {
            let _ = report.send(written);
        }
    });
    std::future::pending().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_write_that_outlives_its_deadline_changes_nothing() {
    let dir = TempFile::new("deadline");
    let store = sqlite_store(&dir).await;
    let (done_tx, done_rx) = oneshot::channel();
    let stalled = Arc::new(Stalled {
        store: store.clone(),
        go: Mutex::new(None),
        done: Mutex::new(Some(done_tx)),
    });
    let app = Router::new()
        .route("/items/a", put(stalled_put))
        .with_state(stalled.clone())
        .layer(PreconditionLayer::new(store.clone()).lease(Duration::from_millis(500)));

    let request = Request::put("/items/a")
        .header("if-none-match", "*")
        .body(Body::from("late"))
        .expect("request");
    let response = app.oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);

    // The layer has answered and settled the cut-off write; now let it run.
    let go = stalled
        .go
        .lock()
        .unwrap()
        .take()
        .expect("the handler started its write");
    go.send(()).expect("the write is waiting");
    let written = done_rx.await.expect("the write reports");
    assert!(
        written.as_ref().is_err_and(FenceError::is_lease_lost),
        "{written:?}"
    );
    let body: Option<String> = sqlx::query_scalar("SELECT body FROM items WHERE id = 'a'")
        .fetch_optional(store.pool())
        .await
        .expect("read");
    assert_eq!(body, None, "the cut-off write landed");
}

async fn postgres_fence(store: &PostgresStore, fence: &Fence) -> Result<(), FenceError> {
    let mut client = store.pool().get().await.expect("connection");
    let tx = client.transaction().await.expect("begin");
    let checked = store.check_fence(&tx, fence).await;
    tx.rollback().await.expect("rollback");
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn postgres_a_live_lease_passes_and_a_released_or_foreign_one_does_not() {
    let Some(pool) = postgres_support::shared_pool(4).await else {
        return;
    };
    let table = format!("tp_fence_{}", std::process::id());
    let store = postgres_support::store(&pool, &table).await;
    let key = postgres_support::unique("/items/fence");
    let token = LeaseToken::random();
    let fence = Fence::new(key.as_str(), token);

    assert!(postgres_fence(&store, &fence)
        .await
        .unwrap_err()
        .is_lease_lost());
    let leased = lease_on(&store, &key, token).await;
    postgres_fence(&store, &fence).await.expect("a live lease");
    let foreign = Fence::new(key.as_str(), LeaseToken::random());
    assert!(postgres_fence(&store, &foreign)
        .await
        .unwrap_err()
        .is_lease_lost());

    // A fenced transaction holds off the release until it ends.
    let mut client = pool.get().await.expect("connection");
    let tx = client.transaction().await.expect("begin");
    store.check_fence(&tx, &fence).await.expect("held");
    let released = Entry::from_parts(None, Some(Lease::released(token))).expect("marker");
    let release = tokio::spawn({
        let (store, key, leased, released) =
            (store.clone(), key.clone(), leased.clone(), released.clone());
        async move {
            store
                .compare_and_set(&key, Some(&leased), Some(&released))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !release.is_finished(),
        "the release came between check and commit"
    );
    tx.commit().await.expect("commit");
    let outcome = release.await.expect("task").expect("release");
    assert!(matches!(outcome, CasOutcome::Applied), "{outcome:?}");
    assert!(postgres_fence(&store, &fence)
        .await
        .unwrap_err()
        .is_lease_lost());

    drop(client);
    pool.get()
        .await
        .expect("connection")
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .expect("drop");
}
