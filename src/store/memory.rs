//! The in-process store: a sharded map, the default backend.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Mutex, MutexGuard},
};

use super::{AtomicVersionStore, CasOutcome, Entry, StoreError};

type Shard = Mutex<HashMap<Box<str>, Entry>>;

/// An in-memory [`AtomicVersionStore`]: versions live as long as the process.
///
/// The map is split into shards, each behind its own `std::sync::Mutex`; a lock is held
/// only for the few instructions of one lookup or swap, never across an `.await`, so
/// the store is correct and fast under many threads. Use it for a single-process app,
/// tests and demos; several processes sharing versions need Redis or Postgres.
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
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with a shard count suited to this machine (4 per core, at least 16).
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self::with_shards((cores * 4).max(16))
    }

    /// A store with `shards` shards (at least one).
    pub fn with_shards(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    /// How many keys have an entry.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no key has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<Box<str>, Entry>> {
        let index = self.hasher.hash_one(key) as usize % self.shards.len();
        lock(&self.shards[index])
    }
}

/// Locks a shard. A panic while holding the lock cannot leave a half-written entry
/// (every mutation is one `insert` or `remove`), so a poisoned lock is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait::async_trait]
impl AtomicVersionStore for MemoryStore {
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.shard(key).get(key).cloned())
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        let mut shard = self.shard(key);
        let current = shard.get_mut(key);
        if current.as_deref() != expected {
            return Ok(CasOutcome::mismatch_or_replay(current.cloned(), new));
        }
        match (current, new) {
            // Replace in place: `insert` would allocate a new key only to drop it.
            (Some(slot), Some(entry)) => *slot = entry.clone(),
            (None, Some(entry)) => {
                shard.insert(key.into(), entry.clone());
            }
            (Some(_), None) => {
                shard.remove(key);
            }
            (None, None) => {}
        }
        Ok(CasOutcome::Applied)
    }
}
