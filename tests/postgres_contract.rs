//! The store contract suite against real Postgres, plus the table management and the
//! error mapping of `PostgresStore`.

mod postgres_support;

use std::sync::Arc;

use postgres_support::{shared_pool, store, unique};
use tower_precondition::{
    store::{
        testing::run_contract_suite, AtomicVersionStore, CasOutcome, Entry, PostgresStore,
        StoreErrorKind,
    },
    EntityTag, StoreError, Version,
};

const TABLE: &str = "tp_test_contract_versions";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn postgres_store_passes_the_contract() {
    let Some(pool) = shared_pool(16).await else {
        return;
    };
    let store = store(&pool, TABLE).await;
    run_contract_suite(Arc::new(store), &unique("contract")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn contract_holds_with_a_single_connection() {
    // Every call queues for the one connection: no statement may depend on another
    // connection's progress.
    let Some(pool) = shared_pool(1).await else {
        return;
    };
    let store = store(&pool, TABLE).await;
    run_contract_suite(Arc::new(store), &unique("contract-1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    let Some(pool) = shared_pool(8).await else {
        return;
    };
    let table = format!("tp_test_migrate_{}", std::process::id());
    let store = PostgresStore::new(pool.clone())
        .table(&table)
        .expect("name");
    let runs = (0..6).map(|_| store.migrate());
    for result in futures_util::future::join_all(runs).await {
        result.expect("concurrent migrate");
    }
    store.migrate().await.expect("migrate again");
    assert!(store
        .migration_sql()
        .starts_with(&format!("CREATE TABLE IF NOT EXISTS \"{table}\"")));
    let client = pool.get().await.expect("connection");
    client
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn migrate_adds_the_seeded_column_to_a_table_of_an_earlier_version() {
    let Some(pool) = shared_pool(2).await else {
        return;
    };
    let table = format!("tp_test_old_table_{}", std::process::id());
    let client = pool.get().await.expect("connection");
    // The table as versions before the seeded flag made it, with one row.
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS \"{table}\"; \
             CREATE TABLE \"{table}\" (resource_key TEXT PRIMARY KEY, etag TEXT, \
             last_modified BIGINT, last_modified_ambiguous BOOLEAN, lease_token TEXT, \
             lease_expires_at_ms BIGINT); \
             INSERT INTO \"{table}\" VALUES ('/old', 'v', 1700000000, false, NULL, NULL)"
        ))
        .await
        .expect("old table");
    let store = PostgresStore::new(pool.clone())
        .table(&table)
        .expect("name");
    assert!(store.load("/old").await.is_err(), "no seeded column yet");
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("migrate again");
    let old = store.load("/old").await.expect("load").expect("entry");
    assert!(
        !old.version().expect("version").is_seeded(),
        "old rows are not seeded"
    );
    let seeded = Entry::committed(
        Version::from_parts(EntityTag::strong("s").expect("tag"), 1_700_000_001, false)
            .expect("strong")
            .with_seeded(true),
    );
    assert_eq!(
        store
            .compare_and_set("/old", Some(&old), Some(&seeded))
            .await
            .expect("cas"),
        CasOutcome::Applied
    );
    assert_eq!(store.load("/old").await.expect("load"), Some(seeded));
    client
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn a_missing_table_is_an_unavailable_store_that_names_migrate() {
    let Some(pool) = shared_pool(2).await else {
        return;
    };
    let store = PostgresStore::new(pool)
        .table("tp_test_never_created")
        .expect("name");
    let error = store.load("k").await.expect_err("no table");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    assert!(error.to_string().contains("migrate"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn a_row_that_is_not_an_entry_is_reported_corrupt() {
    let Some(pool) = shared_pool(2).await else {
        return;
    };
    let store = store(&pool, TABLE).await;
    let client = pool.get().await.expect("connection");
    let cases = [
        // A space is not an etagc.
        ("bad tag", "'a b', 1, false, NULL, NULL, false"),
        ("bad token", "NULL, NULL, NULL, 'not-hex', 5, false"),
        (
            "seeded without a version",
            "NULL, NULL, NULL, repeat('a', 32), 5, true",
        ),
    ];
    for (what, values) in cases {
        let key = unique(what);
        client
            .execute(
                &format!(
                    "INSERT INTO \"{TABLE}\" (resource_key, etag, last_modified, \
                     last_modified_ambiguous, lease_token, lease_expires_at_ms, seeded) \
                     VALUES ($1, {values})"
                ),
                &[&key],
            )
            .await
            .expect("insert");
        let error: StoreError = store.load(&key).await.expect_err(what);
        assert_eq!(error.kind(), StoreErrorKind::Corrupt, "{what}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn connect_checks_the_server() {
    let Some(url) = postgres_support::database_url() else {
        return;
    };
    let store = PostgresStore::connect(&url).await.expect("connect");
    assert_eq!(store.table_name(), "\"tower_precondition_versions\"");
    // A closed port: refused at once, as an unavailable store.
    let error = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test")
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    let error = PostgresStore::connect("not a url")
        .await
        .expect_err("invalid url");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
}
