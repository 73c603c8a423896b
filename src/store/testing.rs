//! The contract suite every [`AtomicVersionStore`] must pass, yours included.
//!
//! Call [`run_contract_suite`] from a test with a store and a namespace that keeps the
//! suite's keys apart from other data (and from other runs against the same server).
//! Each check panics with a message that names the broken rule.
//!
//! ```
//! # #[cfg(feature = "memory")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::Arc;
//! use tower_precondition::{store::testing::run_contract_suite, MemoryStore};
//!
//! run_contract_suite(Arc::new(MemoryStore::new()), "doctest").await;
//! # }
//! # #[cfg(not(feature = "memory"))]
//! # fn main() {}
//! ```

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{AtomicVersionStore, CasOutcome, Entry, Lease, LeaseToken, Version};
use crate::etag::EntityTag;

/// How many tasks the concurrency checks run at once.
pub const CONCURRENT_TASKS: usize = 32;

/// Runs every check of the contract against `store`, with keys under `namespace`.
pub async fn run_contract_suite(store: Arc<dyn AtomicVersionStore>, namespace: &str) {
    let ns = format!("{namespace}:{:x}", crate::fresh::random_u128() as u64);
    let store = &*store;
    missing_key_loads_none(store, &format!("{ns}:missing")).await;
    create_then_replace(store, &format!("{ns}:replace")).await;
    mismatch_reports_current(store, &format!("{ns}:mismatch")).await;
    replay_is_applied(store, &format!("{ns}:replay")).await;
    remove_and_replayed_remove(store, &format!("{ns}:remove")).await;
    entries_round_trip_exactly(store, &ns).await;
    keys_are_independent(store, &ns).await;
    concurrent_creates_have_one_winner(store, &format!("{ns}:race")).await;
    concurrent_increments_lose_nothing(store, &format!("{ns}:counter")).await;
    clock_never_goes_back(store).await;
}

/// [`clock_millis`](AtomicVersionStore::clock_millis) answers a non-zero time that never
/// goes backwards, and advances with real time.
pub async fn clock_never_goes_back(store: &dyn AtomicVersionStore) {
    let first = store.clock_millis().await.expect("clock");
    assert!(
        first > 0,
        "the store's clock must not read 0 (a lease expiry of 0 is a release marker)"
    );
    let mut last = first;
    for _ in 0..20 {
        let now = store.clock_millis().await.expect("clock");
        assert!(
            now >= last,
            "the store's clock went back from {last} to {now}"
        );
        last = now;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let later = store.clock_millis().await.expect("clock");
    assert!(
        later >= first + 40,
        "the store's clock must advance with time: {first} then {later} after 50 ms"
    );
}

/// A committed entry with a strong tag `tag`.
pub fn committed(tag: &str) -> Entry {
    let version = Version::new(
        EntityTag::strong(tag).expect("valid test tag"),
        SystemTime::now(),
    )
    .expect("strong tag");
    Entry::committed(version)
}

/// `load` of a key that was never written answers `None`.
pub async fn missing_key_loads_none(store: &dyn AtomicVersionStore, key: &str) {
    let loaded = store.load(key).await.expect("load");
    assert_eq!(
        loaded, None,
        "a key that was never written must load as None"
    );
}

/// `None -> a`, then `a -> b`, each visible to the next `load`.
pub async fn create_then_replace(store: &dyn AtomicVersionStore, key: &str) {
    let a = committed("a");
    let b = committed("b");
    assert_eq!(
        store
            .compare_and_set(key, None, Some(&a))
            .await
            .expect("cas"),
        CasOutcome::Applied,
        "creating an absent key must apply"
    );
    assert_eq!(store.load(key).await.expect("load"), Some(a.clone()));
    assert_eq!(
        store
            .compare_and_set(key, Some(&a), Some(&b))
            .await
            .expect("cas"),
        CasOutcome::Applied,
        "replacing the exact current entry must apply"
    );
    assert_eq!(store.load(key).await.expect("load"), Some(b));
}

/// A compare-and-set whose `expected` is not the stored entry changes nothing and
/// answers with the entry it found.
pub async fn mismatch_reports_current(store: &dyn AtomicVersionStore, key: &str) {
    let a = committed("a");
    let b = committed("b");
    let c = committed("c");
    let outcome = store
        .compare_and_set(key, Some(&a), Some(&b))
        .await
        .expect("cas");
    assert_eq!(
        outcome,
        CasOutcome::Mismatch { current: None },
        "expecting an entry on an absent key must fail and report None"
    );
    store
        .compare_and_set(key, None, Some(&a))
        .await
        .expect("cas");
    let outcome = store
        .compare_and_set(key, None, Some(&b))
        .await
        .expect("cas");
    assert_eq!(
        outcome,
        CasOutcome::Mismatch {
            current: Some(a.clone())
        },
        "creating over an existing entry must fail and report it"
    );
    let outcome = store
        .compare_and_set(key, Some(&c), Some(&b))
        .await
        .expect("cas");
    assert_eq!(
        outcome,
        CasOutcome::Mismatch {
            current: Some(a.clone())
        },
        "a wrong expected entry must fail and report the current one"
    );
    // A lease that differs only in its token or expiry is a different entry.
    let version = a.version().cloned();
    let lease = Lease::from_parts(LeaseToken::from_u128(1), 1_000);
    let leased = Entry::from_parts(version.clone(), Some(lease)).expect("entry");
    store
        .compare_and_set(key, Some(&a), Some(&leased))
        .await
        .expect("cas");
    let other_token = Entry::from_parts(
        version.clone(),
        Some(Lease::from_parts(LeaseToken::from_u128(2), 1_000)),
    )
    .expect("entry");
    let other_expiry = Entry::from_parts(
        version,
        Some(Lease::from_parts(LeaseToken::from_u128(1), 1_001)),
    )
    .expect("entry");
    for wrong in [&other_token, &other_expiry, &a] {
        let outcome = store
            .compare_and_set(key, Some(wrong), None)
            .await
            .expect("cas");
        assert_eq!(
            outcome,
            CasOutcome::Mismatch {
                current: Some(leased.clone())
            },
            "a compare-and-set must compare the whole entry, lease included"
        );
    }
    assert_eq!(store.load(key).await.expect("load"), Some(leased));
}

/// A compare-and-set re-sent after it applied answers `Applied` (not a mismatch).
pub async fn replay_is_applied(store: &dyn AtomicVersionStore, key: &str) {
    let a = committed("a");
    let b = committed("b");
    store
        .compare_and_set(key, None, Some(&a))
        .await
        .expect("cas");
    store
        .compare_and_set(key, Some(&a), Some(&b))
        .await
        .expect("cas");
    assert_eq!(
        store
            .compare_and_set(key, Some(&a), Some(&b))
            .await
            .expect("cas"),
        CasOutcome::Applied,
        "a replayed compare-and-set must be recognised as applied"
    );
    assert_eq!(
        store
            .compare_and_set(key, None, Some(&b))
            .await
            .expect("cas"),
        CasOutcome::Applied,
        "a replayed create must be recognised as applied"
    );
    assert_eq!(store.load(key).await.expect("load"), Some(b));
}

/// `a -> None` removes the entry; a replayed removal is applied too.
pub async fn remove_and_replayed_remove(store: &dyn AtomicVersionStore, key: &str) {
    let a = committed("a");
    store
        .compare_and_set(key, None, Some(&a))
        .await
        .expect("cas");
    assert_eq!(
        store
            .compare_and_set(key, Some(&a), None)
            .await
            .expect("cas"),
        CasOutcome::Applied
    );
    assert_eq!(
        store.load(key).await.expect("load"),
        None,
        "removed entries load as None"
    );
    assert_eq!(
        store
            .compare_and_set(key, Some(&a), None)
            .await
            .expect("cas"),
        CasOutcome::Applied,
        "a replayed removal must be recognised as applied"
    );
    assert_eq!(
        store
            .compare_and_set(key, None, Some(&a))
            .await
            .expect("cas"),
        CasOutcome::Applied,
        "a removed key can be created again"
    );
}

/// Every field of an entry survives the store unchanged: the tag's exact characters
/// (including obs-text), the date, the ambiguity flag, the lease token and expiry, and
/// a lease without a version (a create in flight).
pub async fn entries_round_trip_exactly(store: &dyn AtomicVersionStore, namespace: &str) {
    let obs_text = EntityTag::parse_bytes(b"\"caf\xc3\xa9-\xff!#~\"").expect("valid tag");
    let cases = [
        Entry::committed(Version::from_parts(obs_text, 0, false).expect("strong")),
        Entry::committed(
            Version::from_parts(
                EntityTag::strong("").expect("empty tag"),
                253_402_300_799,
                true,
            )
            .expect("strong"),
        ),
        Entry::from_parts(
            None,
            Some(Lease::from_parts(
                LeaseToken::from_u128(u128::MAX),
                u64::from(u32::MAX) * 1000,
            )),
        )
        .expect("entry"),
        Entry::from_parts(
            Some(
                Version::new(
                    EntityTag::strong("v").expect("tag"),
                    UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                )
                .expect("strong"),
            ),
            Some(Lease::from_parts(LeaseToken::random(), 1_700_000_030_000)),
        )
        .expect("entry"),
        // A seeded version, and a release marker.
        Entry::from_parts(
            Some(
                Version::from_parts(
                    EntityTag::strong("seeded").expect("tag"),
                    1_700_000_000,
                    false,
                )
                .expect("strong")
                .with_seeded(true),
            ),
            Some(Lease::released(LeaseToken::random())),
        )
        .expect("entry"),
        Entry::from_parts(None, Some(Lease::released(LeaseToken::from_u128(7)))).expect("entry"),
    ];
    for (i, entry) in cases.iter().enumerate() {
        let key = format!("{namespace}:round-trip:{i}");
        store
            .compare_and_set(&key, None, Some(entry))
            .await
            .expect("cas");
        assert_eq!(
            store.load(&key).await.expect("load").as_ref(),
            Some(entry),
            "entry {i} must load back exactly as stored"
        );
        assert_eq!(
            store
                .compare_and_set(&key, Some(entry), None)
                .await
                .expect("cas"),
            CasOutcome::Applied,
            "entry {i} must compare equal to itself after a round trip"
        );
    }
}

/// Keys are compared exactly: similar keys, and keys with braces, spaces, non-ASCII
/// characters or a great length, do not share entries.
pub async fn keys_are_independent(store: &dyn AtomicVersionStore, namespace: &str) {
    let keys = [
        format!("{namespace}:/items/1"),
        format!("{namespace}:/items/1/"),
        format!("{namespace}:/items/10"),
        format!("{namespace}:{{hash}}tag"),
        format!("{namespace}:with space"),
        format!("{namespace}:ünïcödé ✓"),
        format!("{namespace}:{}", "x".repeat(1024)),
    ];
    let entries: Vec<Entry> = (0..keys.len())
        .map(|i| committed(&format!("k{i}")))
        .collect();
    for (key, entry) in keys.iter().zip(&entries) {
        assert_eq!(
            store
                .compare_and_set(key, None, Some(entry))
                .await
                .expect("cas"),
            CasOutcome::Applied,
            "key {key:?} must start empty"
        );
    }
    for (key, entry) in keys.iter().zip(&entries) {
        assert_eq!(
            store.load(key).await.expect("load").as_ref(),
            Some(entry),
            "key {key:?} must hold its own entry"
        );
    }
}

/// Of [`CONCURRENT_TASKS`] concurrent creates of one key, exactly one applies; the
/// others are told which entry won.
pub async fn concurrent_creates_have_one_winner(store: &dyn AtomicVersionStore, key: &str) {
    let wins = AtomicUsize::new(0);
    let attempts = (0..CONCURRENT_TASKS).map(|i| {
        let wins = &wins;
        async move {
            let mine = committed(&format!("writer-{i}"));
            match store
                .compare_and_set(key, None, Some(&mine))
                .await
                .expect("cas")
            {
                CasOutcome::Applied => {
                    wins.fetch_add(1, Ordering::SeqCst);
                }
                CasOutcome::Mismatch { current } => {
                    assert!(current.is_some(), "a losing create must report the winner");
                }
            }
        }
    });
    futures_util::future::join_all(attempts).await;
    assert_eq!(
        wins.load(Ordering::SeqCst),
        1,
        "exactly one concurrent create may win"
    );
}

/// [`CONCURRENT_TASKS`] tasks each increment a counter kept in the tag 10 times, with
/// load + compare-and-set retries: the final value equals the number of increments.
///
/// Each new entry is unique (the tag names its writer), as the layer's entries are:
/// two equal entries would make a losing compare-and-set look like a replay.
pub async fn concurrent_increments_lose_nothing(store: &dyn AtomicVersionStore, key: &str) {
    const PER_TASK: usize = 10;
    store
        .compare_and_set(key, None, Some(&committed("0")))
        .await
        .expect("cas");
    let tasks = (0..CONCURRENT_TASKS).map(|task| async move {
        for round in 0..PER_TASK {
            let mut current = store.load(key).await.expect("load");
            loop {
                let entry = current.clone().expect("counter exists");
                let n = counter_of(&entry);
                let next = committed(&format!("{}.{task}.{round}", n + 1));
                match store
                    .compare_and_set(key, Some(&entry), Some(&next))
                    .await
                    .expect("cas")
                {
                    CasOutcome::Applied => break,
                    CasOutcome::Mismatch { current: found } => current = found,
                }
            }
        }
    });
    futures_util::future::join_all(tasks).await;
    let last = store
        .load(key)
        .await
        .expect("load")
        .expect("counter exists");
    assert_eq!(
        counter_of(&last),
        CONCURRENT_TASKS * PER_TASK,
        "every increment must be counted exactly once"
    );
}

fn counter_of(entry: &Entry) -> usize {
    let tag = entry.version().expect("committed").etag().opaque();
    tag.split('.')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("counter tag")
}
