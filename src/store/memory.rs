//! The in-process store: a sharded map, the default backend.

use std::{
    cell::RefCell,
    hash::BuildHasher,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use hashbrown::HashTable;

use super::{AtomicVersionStore, CasOutcome, Entry, StoreError};
use crate::sync::{shard_index, Mutex, MutexGuard, RandomState};

/// A shard's keys and entries. A table keyed by a hash the store computes once, where
/// a `HashMap` would hash the key a second time with its own keys: one SipHash per
/// call instead of two.
type Table = HashTable<(Box<str>, Entry)>;
type Shard = Mutex<Table>;

/// An in-memory [`AtomicVersionStore`]: versions live as long as the process.
///
/// The map is split into shards, each behind its own `std::sync::Mutex`; a lock is held
/// only for the few instructions of one lookup or swap, never across an `.await`, so
/// the store is correct and fast under many threads. Use it for a single-process app,
/// tests and demos; several processes sharing versions need Redis or Postgres.
///
/// # A bounded store
///
/// The store holds at most [`capacity`](Self::with_capacity) entries (default
/// [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY)), whatever clients send. A new key that finds its shard full
/// evicts another entry of that shard that has no live lease. The bound is per shard
/// and keys do not spread evenly, so eviction starts a little before the store holds
/// `capacity` keys (a million keys in a store of a million kept 998 147 to 998 973).
/// Eviction never lets an old `ETag` match: a key with no entry matches no `If-Match`
/// tag and no `If-Unmodified-Since` on a write, and its next read gets a new random version. What
/// an evicted key loses is the layer's knowledge that the resource exists, so a later
/// `If-None-Match: *` create is decided by the handler's own conditional insert, as for
/// any resource the layer has no version of. A live lease is never evicted (that would
/// let a second writer in): when a shard holds nothing but live leases, a new key is
/// refused with a store error, so the write gets `503`.
///
/// Leases are judged by the store's own monotonic clock
/// ([`clock_millis`](AtomicVersionStore::clock_millis)), which wall-clock steps do not
/// move.
///
/// ```
/// use tower_precondition::{PreconditionLayer, MemoryStore};
///
/// let layer = PreconditionLayer::new(MemoryStore::new());
/// # let _ = layer;
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// Tells this store's hashes apart from another's in [`LAST_HASH`].
    id: u64,
    per_shard: usize,
    origin: Instant,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// The default bound: one million entries.
    ///
    /// Measured full (`benches/benches/memory_keys.rs`, 16 shards): about 240 MiB of
    /// heap (260 MiB resident) with short keys and the layer's 22-character tags, and
    /// at most about 470 MiB (490 MiB resident) with keys of 256 bytes, the longest a
    /// layer stores as they are. The hash tables take about 237 bytes per entry; each
    /// entry adds its key, and a tag longer than 22 bytes (a handler's own) its length
    /// plus 16.
    pub const DEFAULT_CAPACITY: usize = 1_000_000;

    /// A store of [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) entries with a shard count suited to this
    /// machine (4 per core, at least 16).
    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// A store of at most `capacity` entries (at least one per shard), with the default
    /// shard count.
    pub fn with_capacity(capacity: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self::with_shards_and_capacity(cores.saturating_mul(4).max(16), capacity)
    }

    /// A store with `shards` shards (at least one) and the default capacity.
    pub fn with_shards(shards: usize) -> Self {
        Self::with_shards_and_capacity(shards, Self::DEFAULT_CAPACITY)
    }

    /// A store with `shards` shards (at least one) of `capacity / shards` entries each
    /// (at least one). The bound is per shard so that a full store never takes more
    /// than one lock.
    pub fn with_shards_and_capacity(shards: usize, capacity: usize) -> Self {
        let shards = shards.clamp(1, capacity.max(1));
        Self {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            hasher: RandomState::default(),
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            per_shard: (capacity / shards).max(1),
            origin: Instant::now(),
        }
    }

    /// The most entries the store holds.
    pub fn capacity(&self) -> usize {
        self.per_shard.saturating_mul(self.shards.len())
    }

    fn now_millis(&self) -> u64 {
        // Starts at 1: a lease expiry of 0 is a release marker.
        1 + u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// How many keys have an entry.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no key has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key's hash and its shard, locked.
    fn shard(&self, key: &str) -> (u64, MutexGuard<'_, Table>) {
        let hash = self.hash_key(key);
        let index = shard_index(hash, self.shards.len());
        (hash, lock(&self.shards[index]))
    }

    /// The hash of `key`, from [`LAST_HASH`] when this thread hashed the same key for
    /// this store last: a write looks its key up three times in a row (load, reserve,
    /// settle), and SipHash is about half of a lookup. The key is compared in full, so
    /// the hash is always the one `hash_one` gives.
    fn hash_key(&self, key: &str) -> u64 {
        if key.len() > REMEMBERED_KEY_MAX {
            return self.hasher.hash_one(key);
        }
        let remembered = LAST_HASH.try_with(|last| {
            let mut last = last.borrow_mut();
            let (store, last_key, hash) = &mut *last;
            if *store != self.id || last_key != key {
                *hash = self.hasher.hash_one(key);
                *store = self.id;
                last_key.clear();
                last_key.push_str(key);
            }
            *hash
        });
        // No thread-local (the thread is exiting): hash it.
        remembered.unwrap_or_else(|_| self.hasher.hash_one(key))
    }

    fn rehash(&self) -> impl Fn(&(Box<str>, Entry)) -> u64 + '_ {
        |(key, _)| self.hasher.hash_one(&**key)
    }
}

/// The longest key [`LAST_HASH`] keeps: the longest a layer stores as it is.
const REMEMBERED_KEY_MAX: usize = crate::key::MAX_KEY_LEN;

/// Store ids start at 1: 0 is the id [`LAST_HASH`] starts with, which no store has.
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The last key this thread hashed, for which store, and its hash. The key's buffer
    /// is reused, and holds at most [`REMEMBERED_KEY_MAX`] bytes.
    static LAST_HASH: RefCell<(u64, String, u64)> = const { RefCell::new((0, String::new(), 0)) };
}

/// Locks a shard. A panic while holding the lock cannot leave a half-written entry
/// (every mutation is one `insert` or `remove`), so a poisoned lock is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let (hash, shard) = self.shard(key);
        Ok(shard
            .find(hash, |(stored, _)| **stored == *key)
            .map(|(_, entry)| entry.clone()))
    }

    fn swap(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        let (hash, mut shard) = self.shard(key);
        match shard.find_entry(hash, |(stored, _)| **stored == *key) {
            Ok(mut slot) => {
                if Some(&slot.get().1) != expected {
                    return Ok(CasOutcome::mismatch_or_replay(
                        Some(slot.get().1.clone()),
                        new,
                    ));
                }
                match new {
                    // Replace in place: the key stays as it is.
                    Some(entry) => slot.get_mut().1 = entry.clone(),
                    None => drop(slot.remove()),
                }
            }
            Err(_) => {
                if expected.is_some() {
                    return Ok(CasOutcome::mismatch_or_replay(None, new));
                }
                let Some(entry) = new else {
                    return Ok(CasOutcome::Applied);
                };
                if shard.len() >= self.per_shard {
                    self.evict_one(&mut shard)?;
                }
                shard.insert_unique(hash, (key.into(), entry.clone()), self.rehash());
            }
        }
        Ok(CasOutcome::Applied)
    }

    /// Makes room in a full shard: drops an entry that holds no live lease.
    fn evict_one(&self, shard: &mut Table) -> Result<(), StoreError> {
        let now = self.now_millis();
        let evictable = |(_, entry): &(Box<str>, Entry)| entry.live_lease(now).is_none();
        let Some(hash) = shard
            .iter()
            .find(|stored| evictable(stored))
            .map(|(key, _)| self.hasher.hash_one(&**key))
        else {
            return Err(StoreError::unavailable(
                "memory store full: every entry of the shard is a live lease",
            ));
        };
        // Any evictable entry under that hash will do: no key is copied to find it.
        if let Ok(victim) = shard.find_entry(hash, evictable) {
            drop(victim.remove());
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl AtomicVersionStore for MemoryStore {
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.get(key)
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        self.swap(key, expected, new)
    }

    async fn clock_millis(&self) -> Result<u64, StoreError> {
        Ok(self.now_millis())
    }

    fn is_in_process(&self) -> bool {
        true
    }

    fn load_now(&self, key: &str) -> Option<Result<Option<Entry>, StoreError>> {
        Some(self.get(key))
    }

    fn compare_and_set_now(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Option<Result<CasOutcome, StoreError>> {
        Some(self.swap(key, expected, new))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{
        etag::EntityTag,
        store::{Lease, LeaseToken, Version},
    };

    fn entry(tag: &str) -> Entry {
        Entry::committed(Version::new(EntityTag::strong(tag).unwrap(), SystemTime::now()).unwrap())
    }

    #[test]
    fn a_remembered_hash_is_never_another_keys_or_another_stores() {
        // Two stores (each its own hasher) and keys that interleave, repeat, differ in
        // one byte or only in length, and run past what is remembered: every load must
        // find exactly what this store last stored under that key.
        let stores = [
            MemoryStore::with_shards_and_capacity(8, 1024),
            MemoryStore::with_shards_and_capacity(8, 1024),
        ];
        let long = "/x".repeat(REMEMBERED_KEY_MAX);
        let keys = [
            "/a",
            "/a",
            "/b",
            "/a/",
            "/a",
            "",
            long.as_str(),
            "/b",
            long.as_str(),
        ];
        let mut model = std::collections::HashMap::new();
        for round in 0..3 {
            for (i, key) in keys.iter().enumerate() {
                let which = (i + round) % 2;
                let store = &stores[which];
                let expected = model.get(&(which, *key)).cloned();
                assert_eq!(
                    store.get(key).unwrap(),
                    expected,
                    "store {which}, key {key:?}"
                );
                let new = entry(&format!("r{round}i{i}"));
                let outcome = store.swap(key, expected.as_ref(), Some(&new)).unwrap();
                assert!(
                    matches!(outcome, CasOutcome::Applied),
                    "store {which}, key {key:?}"
                );
                model.insert((which, *key), new);
            }
        }
        for ((which, key), entry) in &model {
            assert_eq!(stores[*which].get(key).unwrap().as_ref(), Some(entry));
        }
    }

    #[tokio::test]
    async fn stays_within_capacity_and_never_evicts_a_live_lease() {
        let store = MemoryStore::with_shards_and_capacity(1, 4);
        let now = store.clock_millis().await.unwrap();
        let live = Entry::from_parts(
            None,
            Some(Lease::from_parts(LeaseToken::random(), now + 60_000)),
        )
        .unwrap();
        store
            .compare_and_set("leased", None, Some(&live))
            .await
            .unwrap();
        for i in 0..1000 {
            store
                .compare_and_set(&format!("k{i}"), None, Some(&entry("v")))
                .await
                .unwrap();
            assert!(store.len() <= 4);
        }
        assert_eq!(store.load("leased").await.unwrap(), Some(live.clone()));
        // Full of live leases: a new key is refused, not squeezed in.
        let store = MemoryStore::with_shards_and_capacity(1, 1);
        store
            .compare_and_set("leased", None, Some(&live))
            .await
            .unwrap();
        assert!(store
            .compare_and_set("other", None, Some(&entry("v")))
            .await
            .is_err());
        assert_eq!(store.load("leased").await.unwrap(), Some(live));
    }

    #[tokio::test]
    async fn clock_is_monotonic_and_never_zero() {
        let store = MemoryStore::new();
        let a = store.clock_millis().await.unwrap();
        let b = store.clock_millis().await.unwrap();
        assert!(a >= 1 && b >= a);
    }
}

/// The model check of the store itself (`--cfg tower_precondition_loom`, see
/// `src/sync.rs`): every interleaving of the shard locks, through the same
/// `compare_and_set_now` / `load_now` the layer calls.
#[cfg(all(test, tower_precondition_loom))]
mod loom_tests {
    use std::{sync::Arc, time::SystemTime};

    use loom::thread;

    use super::*;
    use crate::{
        etag::EntityTag,
        store::{Lease, LeaseToken, Version},
        sync::model,
    };

    fn committed(tag: &str) -> Entry {
        let tag = EntityTag::strong(tag).unwrap();
        Entry::committed(Version::new(tag, SystemTime::now()).unwrap())
    }

    fn cas(
        store: &MemoryStore,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> CasOutcome {
        store
            .compare_and_set_now(key, expected, new)
            .expect("the memory store answers at once")
            .expect("the memory store does not fail here")
    }

    fn load(store: &MemoryStore, key: &str) -> Option<Entry> {
        store.load_now(key).unwrap().unwrap()
    }

    /// `writers` threads swap the same expected entry for their own: exactly one
    /// applies, and every other is told the winner's entry.
    fn same_expected(name: &str, writers: usize, reader: bool, preemptions: Option<usize>) {
        model::check(name, preemptions, move || {
            let store = Arc::new(MemoryStore::with_shards_and_capacity(1, 8));
            let v0 = committed("v0");
            assert_eq!(cas(&store, "k", None, Some(&v0)), CasOutcome::Applied);
            let handles: Vec<_> = (0..writers)
                .map(|i| {
                    let (store, v0) = (store.clone(), v0.clone());
                    thread::spawn(move || {
                        let mine = committed(&format!("w{i}"));
                        let outcome = cas(&store, "k", Some(&v0), Some(&mine));
                        (mine, outcome)
                    })
                })
                .collect();
            let read = reader.then(|| {
                let store = store.clone();
                thread::spawn(move || [load(&store, "k"), load(&store, "k")])
            });
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let winners: Vec<_> = results
                .iter()
                .filter(|(_, outcome)| *outcome == CasOutcome::Applied)
                .map(|(mine, _)| mine.clone())
                .collect();
            assert_eq!(winners.len(), 1, "exactly one write applies: {results:?}");
            let winner = &winners[0];
            for (mine, outcome) in &results {
                if mine != winner {
                    assert_eq!(
                        outcome,
                        &CasOutcome::Mismatch {
                            current: Some(winner.clone())
                        },
                        "a loser is told the winner's entry"
                    );
                }
            }
            if let Some(read) = read {
                let [first, second] = read.join().unwrap();
                // Never nothing, never a third entry, and never back to the old one.
                for seen in [&first, &second] {
                    let seen = seen.as_ref().expect("a read never finds the entry gone");
                    assert!(seen == &v0 || seen == winner, "read {seen:?}");
                }
                if first.as_ref() == Some(winner) {
                    assert_eq!(second.as_ref(), Some(winner), "a read went back in time");
                }
            }
            assert_eq!(load(&store, "k").as_ref(), Some(winner));
            assert_eq!(store.len(), 1);
        });
    }

    #[test]
    fn two_writers_same_expected() {
        same_expected("store: 2 writers", 2, false, None);
    }

    #[test]
    fn three_writers_same_expected() {
        same_expected("store: 3 writers", 3, false, None);
    }

    #[test]
    fn three_writers_and_a_reader() {
        same_expected("store: 3 writers + reader", 3, true, None);
    }

    /// Load, then compare-and-set from what was loaded, retrying on a mismatch: the
    /// read-modify-write every layer step is. No increment may be lost. Each entry is
    /// unique (the count and the writer), as the layer's are: two equal entries would
    /// be a replay by the trait's contract, and a replay counts as applied.
    #[test]
    fn read_modify_write_loses_no_update() {
        model::check("store: 3 read-modify-writes", None, || {
            let store = Arc::new(MemoryStore::with_shards_and_capacity(1, 8));
            assert_eq!(
                cas(&store, "n", None, Some(&committed("0"))),
                CasOutcome::Applied
            );
            let handles: Vec<_> = (0..3)
                .map(|writer| {
                    let store = store.clone();
                    thread::spawn(move || {
                        let mut current = load(&store, "n");
                        loop {
                            let version = current.as_ref().unwrap().version().unwrap();
                            let count = version.etag().opaque().split('.').next().unwrap();
                            let n: u32 = count.parse().unwrap();
                            let next = committed(&format!("{}.{writer}", n + 1));
                            match cas(&store, "n", current.as_ref(), Some(&next)) {
                                CasOutcome::Applied => return,
                                CasOutcome::Mismatch { current: found } => current = found,
                            }
                        }
                    })
                })
                .collect();
            for handle in handles {
                handle.join().unwrap();
            }
            let n = load(&store, "n").unwrap();
            let tag = n.version().unwrap().etag().opaque().to_owned();
            assert!(tag.starts_with("3."), "an update was lost: {tag}");
        });
    }

    /// A full shard evicts only entries without a live lease, whatever the order of a
    /// lease and a plain entry racing for the last slot.
    #[test]
    fn a_full_shard_never_evicts_a_live_lease() {
        model::check("store: full shard, lease vs entry", None, || {
            let store = Arc::new(MemoryStore::with_shards_and_capacity(1, 1));
            let far = store.now_millis() + 3_600_000;
            let leased =
                Entry::from_parts(None, Some(Lease::from_parts(LeaseToken::random(), far)))
                    .unwrap();
            let lease = {
                let (store, leased) = (store.clone(), leased.clone());
                thread::spawn(move || cas(&store, "a", None, Some(&leased)))
            };
            let plain = {
                let store = store.clone();
                thread::spawn(move || {
                    store
                        .compare_and_set_now("b", None, Some(&committed("b")))
                        .unwrap()
                })
            };
            let reader = {
                let store = store.clone();
                thread::spawn(move || load(&store, "a"))
            };
            // The plain entry has no lease, so the lease can always evict it.
            assert_eq!(lease.join().unwrap(), CasOutcome::Applied);
            let plain = plain.join().unwrap();
            let seen = reader.join().unwrap();
            assert!(seen.is_none() || seen.as_ref() == Some(&leased));
            assert_eq!(
                load(&store, "a").as_ref(),
                Some(&leased),
                "the live lease is kept"
            );
            assert_eq!(store.len(), 1);
            // The plain entry got in only before the lease, and was evicted by it.
            if plain.is_ok() {
                assert_eq!(load(&store, "b"), None);
            }
        });
    }
}
