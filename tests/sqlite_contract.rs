//! The store contract suite against `SqliteStore` on a temporary file, plus what is
//! particular to SQLite: several pools (as several processes would) on one file,
//! versions and the clock surviving a reopen, concurrent migrations, and a file locked
//! by another connection answered as a store timeout (`503` through the layer, never a
//! `2xx`), with recovery once the lock is released.

#[path = "common/oneshot.rs"]
mod oneshot;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{http::Method, http::StatusCode, routing::get, Router};
use sqlx::{Connection, Executor};
use tower_precondition::{
    store::{
        testing::{committed, run_contract_suite},
        AtomicVersionStore, CasOutcome, Entry, SqliteStore, StoreErrorKind,
    },
    PreconditionLayer, StoreError,
};

/// A directory of its own for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tp-sqlite-{label}-{}-{:x}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

async fn migrated(path: &Path) -> SqliteStore {
    let store = SqliteStore::open(path).await.expect("open");
    store.migrate().await.expect("migrate");
    store
}

/// Each call goes to the next of several stores on one file, as requests of one app
/// spread over several processes would.
struct RoundRobin {
    stores: Vec<SqliteStore>,
    next: AtomicUsize,
}

impl RoundRobin {
    fn pick(&self) -> &SqliteStore {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.stores[i % self.stores.len()]
    }
}

#[async_trait::async_trait]
impl AtomicVersionStore for RoundRobin {
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.pick().load(key).await
    }

    async fn clock_millis(&self) -> Result<u64, StoreError> {
        self.pick().clock_millis().await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        self.pick().compare_and_set(key, expected, new).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_passes_the_contract() {
    let dir = TempDir::new("contract");
    let store = migrated(&dir.file("versions.db")).await;
    run_contract_suite(Arc::new(store), "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_contract_holds_across_three_pools_on_one_file() {
    let dir = TempDir::new("pools");
    let path = dir.file("versions.db");
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(migrated(&path).await);
    }
    let store = RoundRobin {
        stores,
        next: AtomicUsize::new(0),
    };
    run_contract_suite(Arc::new(store), "sqlite-pools").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_database_passes_the_contract() {
    let store = SqliteStore::connect("sqlite::memory:")
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    run_contract_suite(Arc::new(store), "sqlite-memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_and_the_clock_survive_a_reopen() {
    let dir = TempDir::new("reopen");
    let path = dir.file("versions.db");
    let entry = committed("kept");
    let before = {
        let store = migrated(&path).await;
        assert_eq!(
            store
                .compare_and_set("/items/kept", None, Some(&entry))
                .await
                .expect("cas"),
            CasOutcome::Applied
        );
        let clock = store.clock_millis().await.expect("clock");
        store.pool().close().await;
        clock
    };
    let store = SqliteStore::open(&path).await.expect("reopen");
    store.migrate().await.expect("migrate again");
    assert_eq!(
        store.load("/items/kept").await.expect("load"),
        Some(entry),
        "a committed version must survive a restart"
    );
    assert!(store.clock_millis().await.expect("clock") >= before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_wall_clock_steps_back_the_clock_neither_goes_back_nor_stands_still() {
    let dir = TempDir::new("clock");
    let path = dir.file("versions.db");
    let store = migrated(&path).await;
    let now = store.clock_millis().await.expect("clock");
    // The clock read an hour later than the wall clock reads now: as if the wall clock
    // had just stepped back an hour.
    let ahead = now + 3_600_000;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    conn.execute(format!("UPDATE tower_precondition_clock SET millis = {ahead}").as_str())
        .await
        .expect("raise the mark");
    let first = store.clock_millis().await.expect("clock");
    assert!(
        (ahead..ahead + 1000).contains(&first),
        "the clock must not go back: {first} after {ahead}"
    );
    let mut last = first;
    for _ in 0..5 {
        let reading = store.clock_millis().await.expect("clock");
        assert!(reading >= last, "{reading} after {last}");
        last = reading;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let later = store.clock_millis().await.expect("clock");
    assert!(
        later >= first + 90,
        "the clock must go on at the wall clock's rate, not stand still: {first} then \
         {later} after 100 ms"
    );
    // The correction is kept in the file: another process, or a restart, reads on.
    store.pool().close().await;
    let reopened = SqliteStore::open(&path).await.expect("reopen");
    assert!(reopened.clock_millis().await.expect("clock") >= later);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    let dir = TempDir::new("migrate");
    let path = dir.file("versions.db");
    // Six "processes" open a file that does not exist yet, and migrate at once.
    let opened = futures_util::future::join_all((0..6).map(|_| SqliteStore::open(&path))).await;
    let stores: Vec<SqliteStore> = opened
        .into_iter()
        .map(|s| s.expect("concurrent open"))
        .collect();
    let runs = stores.iter().map(SqliteStore::migrate);
    for result in futures_util::future::join_all(runs).await {
        result.expect("concurrent migrate");
    }
    stores[0].migrate().await.expect("migrate again");
    assert!(stores[0]
        .migration_sql()
        .starts_with("CREATE TABLE IF NOT EXISTS tower_precondition_versions"));
    assert_eq!(stores[1].load("/x").await.expect("load"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_an_unavailable_store_that_names_migrate() {
    let dir = TempDir::new("missing");
    let store = SqliteStore::open(dir.file("empty.db")).await.expect("open");
    let error = store.load("/x").await.expect_err("no table");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    assert!(error.to_string().contains("migrate"), "{error}");
    let error = store
        .compare_and_set("/x", None, Some(&committed("a")))
        .await
        .expect_err("no table");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_database_is_an_unavailable_store() {
    let dir = TempDir::new("garbage");
    let path = dir.file("garbage.db");
    std::fs::write(&path, vec![0x5a; 8192]).expect("write");
    let error = SqliteStore::open(&path).await.expect_err("not a database");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable, "{error}");
}

/// Holds the file's write lock from another connection (`BEGIN EXCLUSIVE`), as another
/// process in a long transaction would.
async fn lock_file(path: &Path) -> sqlx::SqliteConnection {
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    conn.execute("BEGIN EXCLUSIVE").await.expect("lock");
    conn.execute("UPDATE tower_precondition_clock SET millis = millis")
        .await
        .expect("write under the lock");
    conn
}

const BUSY: Duration = Duration::from_millis(300);

async fn store_with_short_busy_timeout(path: &Path) -> SqliteStore {
    let url = format!("sqlite://{}", path.display());
    let options = SqliteStore::connect_options(&url).expect("options");
    let store = SqliteStore::connect_with(options, BUSY)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_file_is_a_store_timeout_after_busy_timeout_then_recovers() {
    let dir = TempDir::new("locked");
    let path = dir.file("versions.db");
    let store = store_with_short_busy_timeout(&path).await;
    let a = committed("a");
    let b = committed("b");
    store
        .compare_and_set("/items/1", None, Some(&a))
        .await
        .expect("cas");

    let mut lock = lock_file(&path).await;
    let started = Instant::now();
    let error = store
        .compare_and_set("/items/1", Some(&a), Some(&b))
        .await
        .expect_err("the file is locked");
    let waited = started.elapsed();
    assert_eq!(error.kind(), StoreErrorKind::Timeout, "{error}");
    assert!(waited >= BUSY - Duration::from_millis(50), "{waited:?}");
    assert!(waited < BUSY + Duration::from_secs(1), "{waited:?}");
    let error = store
        .clock_millis()
        .await
        .expect_err("the clock writes too");
    assert_eq!(error.kind(), StoreErrorKind::Timeout, "{error}");
    // Readers never wait in WAL mode.
    assert_eq!(store.load("/items/1").await.expect("load"), Some(a.clone()));

    lock.execute("ROLLBACK").await.expect("release");
    assert_eq!(
        store
            .compare_and_set("/items/1", Some(&a), Some(&b))
            .await
            .expect("cas after the release"),
        CasOutcome::Applied,
        "the failed call must not have landed, and the store must recover"
    );
    assert_eq!(store.load("/items/1").await.expect("load"), Some(b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_its_caller_abandoned_on_a_locked_file_never_lands() {
    let dir = TempDir::new("abandoned");
    let path = dir.file("versions.db");
    let store = store_with_short_busy_timeout(&path).await;
    let a = committed("a");
    let b = committed("b");
    let c = committed("c");
    store
        .compare_and_set("/items/1", None, Some(&a))
        .await
        .expect("cas");
    let mut lock = lock_file(&path).await;
    // The caller gives up (as the layer's store timeout does) while the call waits for
    // the write lock.
    let abandoned = tokio::time::timeout(
        BUSY / 3,
        store.compare_and_set("/items/1", Some(&a), Some(&b)),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the call was still waiting: {abandoned:?}"
    );
    lock.execute("ROLLBACK").await.expect("release");
    tokio::time::sleep(BUSY).await;
    assert_eq!(
        store.load("/items/1").await.expect("load"),
        Some(a.clone()),
        "an abandoned compare-and-set must not land once the lock is free"
    );
    assert_eq!(
        store
            .compare_and_set("/items/1", Some(&a), Some(&c))
            .await
            .expect("cas"),
        CasOutcome::Applied,
        "the connection it used is clean again"
    );
    for i in 0..(2 * 8) {
        // Every pooled connection is usable (none left inside a transaction).
        let key = format!("/items/other-{i}");
        assert_eq!(
            store
                .compare_and_set(&key, None, Some(&committed("x")))
                .await
                .expect("cas"),
            CasOutcome::Applied
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_layer_a_locked_file_is_503_never_2xx_then_recovers() {
    let dir = TempDir::new("layer");
    let path = dir.file("versions.db");
    let store = store_with_short_busy_timeout(&path).await;
    let writes = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/items/{id}",
            get(|| async { "v1" }).put({
                let writes = writes.clone();
                move || async move {
                    writes.fetch_add(1, Ordering::SeqCst);
                    StatusCode::NO_CONTENT
                }
            }),
        )
        .layer(PreconditionLayer::new(store));

    // A read gives the item a version (and the layer a clock sample).
    let etag = oneshot::get_etag(&app, "/items/1").await;

    let mut lock = lock_file(&path).await;
    for headers in [vec![("if-match", etag.as_str())], vec![]] {
        let started = Instant::now();
        let reply = oneshot::send(&app, Method::PUT, "/items/1", &headers).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "a write on a locked file must fail closed ({headers:?})"
        );
        assert!(reply.header("retry-after").is_some());
        assert!(started.elapsed() < Duration::from_secs(2) + BUSY);
    }
    assert_eq!(
        writes.load(Ordering::SeqCst),
        0,
        "no handler may run while the store cannot reserve"
    );

    lock.execute("ROLLBACK").await.expect("release");
    let reply = oneshot::send(&app, Method::PUT, "/items/1", &[("if-match", &etag)]).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "recovered");
    assert_eq!(writes.load(Ordering::SeqCst), 1);
    let stale = oneshot::send(&app, Method::PUT, "/items/1", &[("if-match", &etag)]).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
}
