//! The entry cache: writes start their compare-and-set from the entry last seen, so a
//! write costs two store calls, and a stale guess never changes an answer.
//!
//! Several layers over one store stand for several processes: each has a cache of its
//! own, which another layer's writes make stale.

#[path = "common/oneshot.rs"]
mod oneshot;
#[cfg(feature = "postgres")]
mod postgres_support;
#[cfg(feature = "redis")]
mod redis_support;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    http::{Method, StatusCode},
    routing::get,
    Router,
};
use oneshot::{get_etag, send};
use tower_precondition::{
    store::{AtomicVersionStore, CasOutcome, Entry, Lease, LeaseToken, StoreError},
    MemoryStore, PreconditionLayer,
};

/// A store that counts the calls made to it. Over a memory store it says it is across
/// a connection (the trait's default), so the layer uses its cache as it would for
/// Redis or Postgres.
struct CountingStore<T> {
    inner: T,
    loads: AtomicU64,
    cas: AtomicU64,
}

impl<T> CountingStore<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            loads: AtomicU64::new(0),
            cas: AtomicU64::new(0),
        }
    }

    fn calls(&self) -> (u64, u64) {
        (
            self.loads.load(Ordering::SeqCst),
            self.cas.load(Ordering::SeqCst),
        )
    }

    fn reset(&self) {
        self.loads.store(0, Ordering::SeqCst);
        self.cas.store(0, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl<T: AtomicVersionStore> AtomicVersionStore for CountingStore<T> {
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load(key).await
    }

    async fn clock_millis(&self) -> Result<u64, StoreError> {
        self.inner.clock_millis().await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        self.cas.fetch_add(1, Ordering::SeqCst);
        self.inner.compare_and_set(key, expected, new).await
    }
}

fn app<T: AtomicVersionStore>(store: &Arc<CountingStore<T>>) -> Router {
    Router::new()
        .route(
            "/items/{id}",
            get(|| async { "item" })
                .put(|| async { StatusCode::NO_CONTENT })
                .delete(|| async { StatusCode::NO_CONTENT }),
        )
        .layer(PreconditionLayer::from_arc(store.clone()))
}

#[tokio::test]
async fn a_write_after_a_read_or_a_write_takes_two_store_calls() {
    two_store_calls_per_write(
        &Arc::new(CountingStore::new(MemoryStore::new())),
        "/items/1",
    )
    .await;
}

/// Every write below is one the layer can start from what it saw last: two calls each
/// (reserve and settle), and a refusal costs one load and nothing else.
async fn two_store_calls_per_write<T: AtomicVersionStore>(
    store: &Arc<CountingStore<T>>,
    uri: &str,
) {
    let app = app(store);

    // A create on a key nobody has seen: the guess is "no entry".
    store.reset();
    let created = send(&app, Method::PUT, uri, &[("if-none-match", "*")]).await;
    assert_eq!(created.status, StatusCode::NO_CONTENT);
    assert_eq!(store.calls(), (0, 2), "create: reserve and settle only");

    // A conditional write with the tag the last write returned.
    let tag = created.etag().expect("ETag").to_owned();
    store.reset();
    let replaced = send(&app, Method::PUT, uri, &[("if-match", &tag)]).await;
    assert_eq!(replaced.status, StatusCode::NO_CONTENT);
    assert_eq!(store.calls(), (0, 2), "replace: reserve and settle only");

    // After a read: the read loads (one call), the write needs no load of its own.
    let read_tag = get_etag(&app, uri).await;
    store.reset();
    let after_read = send(&app, Method::PUT, uri, &[("if-match", &read_tag)]).await;
    assert_eq!(after_read.status, StatusCode::NO_CONTENT);
    assert_eq!(store.calls(), (0, 2));

    // A refusal is never decided on the guess: the stale tag costs a load.
    store.reset();
    let stale = send(&app, Method::PUT, uri, &[("if-match", &tag)]).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(store.calls(), (1, 0));
    assert_eq!(
        stale.etag(),
        after_read.etag(),
        "the 412 carries the current tag"
    );
}

#[tokio::test]
async fn a_guess_made_stale_by_another_process_changes_no_answer() {
    let store = Arc::new(CountingStore::new(MemoryStore::new()));
    let (a, b) = (app(&store), app(&store));

    let first = get_etag(&a, "/items/2").await;
    // B writes: A's cache still says `first`.
    let second = send(&b, Method::PUT, "/items/2", &[("if-match", &first)]).await;
    assert_eq!(second.status, StatusCode::NO_CONTENT);
    let second = second.etag().unwrap().to_owned();

    // A believes `first` is current, so its guess would let the write through: the
    // compare-and-set mismatches, and the answer comes from what the store holds.
    store.reset();
    let lost = send(&a, Method::PUT, "/items/2", &[("if-match", &first)]).await;
    assert_eq!(lost.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(lost.etag(), Some(second.as_str()));
    assert_eq!(store.calls(), (0, 1), "one mismatch, no load");

    // B writes again. A's cache holds `second` (the mismatch's answer), by which the
    // client's newer tag would fail: A loads, and the write goes through.
    let third = send(&b, Method::PUT, "/items/2", &[("if-match", &second)]).await;
    let third = third.etag().unwrap().to_owned();
    store.reset();
    let won = send(&a, Method::PUT, "/items/2", &[("if-match", &third)]).await;
    assert_eq!(won.status, StatusCode::NO_CONTENT);
    let (loads, cas) = store.calls();
    assert_eq!(
        loads + cas,
        3,
        "a stale guess costs one call more, never more"
    );

    // B deletes; A's cache still holds the item.
    let current = won.etag().unwrap().to_owned();
    let deleted = send(&b, Method::DELETE, "/items/2", &[("if-match", &current)]).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let gone = send(&a, Method::PUT, "/items/2", &[("if-match", &current)]).await;
    assert_eq!(gone.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(gone.etag(), None, "no current version to report");
}

#[tokio::test]
async fn a_cached_version_never_hides_an_expired_lease() {
    let store = Arc::new(CountingStore::new(MemoryStore::new()));
    let a = app(&store);
    let tag = get_etag(&a, "/items/3").await;

    // Another process reserved the item and died: its lease expired with the outcome
    // unknown, so every old tag must fail from now on, whatever A remembers.
    let found = store.inner.load("/items/3").await.unwrap().unwrap();
    let now = store.inner.clock_millis().await.unwrap();
    let crashed = Entry::from_parts(
        found.version().cloned(),
        Some(Lease::from_parts(LeaseToken::random(), now + 1)),
    );
    let applied = store
        .inner
        .compare_and_set("/items/3", Some(&found), crashed.as_ref())
        .await
        .unwrap();
    assert_eq!(applied, CasOutcome::Applied);
    tokio::time::sleep(Duration::from_millis(20)).await;

    let put = send(&a, Method::PUT, "/items/3", &[("if-match", &tag)]).await;
    assert_eq!(put.status, StatusCode::PRECONDITION_FAILED);
    let fresh = put
        .etag()
        .expect("the 412 carries the fresh tag")
        .to_owned();
    assert_ne!(fresh, tag);
    let retried = send(&a, Method::PUT, "/items/3", &[("if-match", &fresh)]).await;
    assert_eq!(retried.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_live_lease_seen_through_a_guess_answers_409_from_the_store() {
    let store = Arc::new(CountingStore::new(MemoryStore::new()));
    let a = app(&store);
    let tag = get_etag(&a, "/items/4").await;
    let found = store.inner.load("/items/4").await.unwrap().unwrap();
    let now = store.inner.clock_millis().await.unwrap();
    let busy = Entry::from_parts(
        found.version().cloned(),
        Some(Lease::from_parts(LeaseToken::random(), now + 60_000)),
    );
    store
        .inner
        .compare_and_set("/items/4", Some(&found), busy.as_ref())
        .await
        .unwrap();
    let put = send(&a, Method::PUT, "/items/4", &[("if-match", &tag)]).await;
    assert_eq!(put.status, StatusCode::CONFLICT);
}

/// Eight processes, each with a warm cache, race the same `If-Match` in every round:
/// exactly one wins, and the losers are told the winner's tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_winner_per_round_across_caching_processes() {
    let store = Arc::new(CountingStore::new(MemoryStore::new()));
    let apps: Vec<Router> = (0..8).map(|_| app(&store)).collect();
    for round in 0..40 {
        let uri = "/items/race";
        // Every process reads, so every cache holds the same entry.
        let mut tag = String::new();
        for app in &apps {
            tag = get_etag(app, uri).await;
        }
        let racers: Vec<_> = apps
            .iter()
            .map(|app| {
                let app = app.clone();
                let tag = tag.clone();
                tokio::spawn(
                    async move { send(&app, Method::PUT, uri, &[("if-match", &tag)]).await },
                )
            })
            .collect();
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for racer in racers {
            let reply = racer.await.unwrap();
            match reply.status {
                StatusCode::NO_CONTENT => winners.push(reply.etag().unwrap().to_owned()),
                StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => {
                    losers.push((reply.status, reply.etag().map(str::to_owned)))
                }
                other => panic!("round {round}: unexpected {other}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?} {losers:?}");
        for (status, etag) in losers {
            if status == StatusCode::PRECONDITION_FAILED {
                assert_eq!(etag.as_deref(), Some(winners[0].as_str()), "round {round}");
            }
        }
    }
}

#[tokio::test]
async fn the_memory_store_keeps_no_cache_and_a_layer_can_turn_it_off() {
    assert!(MemoryStore::new().is_in_process());
    let store = Arc::new(CountingStore::new(MemoryStore::new()));
    let app = Router::new()
        .route(
            "/items/{id}",
            get(|| async { "item" }).put(|| async { StatusCode::NO_CONTENT }),
        )
        .layer(PreconditionLayer::from_arc(store.clone()).entry_cache(0));
    let tag = get_etag(&app, "/items/5").await;
    store.reset();
    let put = send(&app, Method::PUT, "/items/5", &[("if-match", &tag)]).await;
    assert_eq!(put.status, StatusCode::NO_CONTENT);
    assert_eq!(store.calls(), (1, 2), "load, reserve, settle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg(feature = "redis")]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn redis_store_writes_take_two_round_trips() {
    let Some((store, _cleanup)) = redis_support::shared_store().await else {
        return;
    };
    // Every call of the Redis store is one round trip (one EVALSHA, or HGETALL).
    two_store_calls_per_write(&Arc::new(CountingStore::new(store)), "/items/redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg(feature = "postgres")]
#[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
async fn postgres_store_writes_take_two_round_trips() {
    use tower_precondition::store::PostgresStore;
    let Some(pool) = postgres_support::shared_pool(2).await else {
        return;
    };
    let table = format!("tp_test_entry_cache_{}", std::process::id());
    let store = PostgresStore::new(pool.clone())
        .table(&table)
        .expect("name");
    store.migrate().await.expect("migrate");
    // Every call of the Postgres store is one round trip (its statements pipelined in
    // one transaction), so this counts the store mode's statements per write.
    two_store_calls_per_write(&Arc::new(CountingStore::new(store)), "/items/pg").await;
    let client = pool.get().await.expect("connection");
    client
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .expect("drop");
}
