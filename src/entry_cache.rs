//! A bounded cache of the entries this process last saw in the store, used only as the
//! *expected* value of a write's first compare-and-set.
//!
//! A store-mode write used to load the entry, then reserve it: two round trips before
//! the handler runs. Starting the reserve from a remembered entry saves the load. The
//! cache is never an authority:
//!
//! * a guess that is right is confirmed by the compare-and-set applying (the store held
//!   exactly that entry at that instant);
//! * a guess that is wrong costs one mismatch, which answers with the entry actually
//!   stored, and every later decision is made against that;
//! * a guess that would refuse the write (`412`, `409`) is never acted on: the layer
//!   loads the entry and decides against what the store says.
//!
//! Only entries with no lease are kept (a lease belongs to one write; a guess must not
//! resurrect it), and deleting or losing track of a key forgets it. Memory is bounded
//! by a count of entries: each shard keeps a young and an old generation, and when the
//! young one fills the old one is dropped whole (an approximate LRU with no per-hit
//! bookkeeping).

use std::{hash::BuildHasher, sync::Arc};

use hashbrown::HashTable;

use crate::{
    store::Entry,
    sync::{shard_index, Mutex, MutexGuard, RandomState},
};

const SHARDS: usize = 16;

/// An entry whose key and tag together are longer is not kept (handlers may set long
/// tags of their own): with the count, this bounds the cache's memory.
const MAX_ENTRY_BYTES: usize = 512;

/// See the module docs.
pub(crate) struct EntryCache {
    shards: Box<[Mutex<Shard>]>,
    /// Entries one generation of a shard holds before it ages.
    per_generation: usize,
    hasher: RandomState,
}

/// Both generations are keyed by the hash the cache computes once per call (a
/// `HashMap` would hash the key again for each of them).
#[derive(Default)]
struct Shard {
    young: Generation,
    old: Generation,
}

type Generation = HashTable<(Arc<str>, Entry)>;

fn is_key(key: &str) -> impl Fn(&(Arc<str>, Entry)) -> bool + '_ {
    move |(stored, _)| **stored == *key
}

/// Drops `key`'s entry from `generation`, if it holds one.
fn remove(generation: &mut Generation, hash: u64, key: &str) {
    if let Ok(found) = generation.find_entry(hash, is_key(key)) {
        drop(found.remove());
    }
}

impl EntryCache {
    /// A cache of at most about `capacity` entries; `0` keeps nothing.
    pub(crate) fn new(capacity: usize) -> Self {
        let shards = if capacity == 0 { 0 } else { SHARDS };
        Self {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            // Two generations per shard: together they hold at most `capacity`.
            per_generation: (capacity / (2 * SHARDS)).max(1),
            hasher: RandomState::default(),
        }
    }

    /// Whether the cache keeps anything.
    pub(crate) fn is_enabled(&self) -> bool {
        !self.shards.is_empty()
    }

    /// The entry last seen for `key`, `None` if none is remembered.
    pub(crate) fn get(&self, key: &str) -> Option<Entry> {
        let (hash, shard) = self.shard(key)?;
        shard
            .young
            .find(hash, is_key(key))
            .or_else(|| shard.old.find(hash, is_key(key)))
            .map(|(_, entry)| entry.clone())
    }

    /// Records what the store holds for `key` (as confirmed by a load or a
    /// compare-and-set): an entry with no lease is kept, anything else forgets the key.
    pub(crate) fn remember(&self, key: &Arc<str>, entry: Option<&Entry>) {
        let Some((hash, mut shard)) = self.shard(key) else {
            return;
        };
        let keep = |e: &&Entry| {
            e.lease().is_none()
                && e.version()
                    .is_some_and(|v| key.len() + v.etag().opaque().len() <= MAX_ENTRY_BYTES)
        };
        let Some(entry) = entry.filter(keep) else {
            remove(&mut shard.young, hash, key);
            remove(&mut shard.old, hash, key);
            return;
        };
        if let Some((_, slot)) = shard.young.find_mut(hash, is_key(key)) {
            slot.clone_from(entry);
            return;
        }
        remove(&mut shard.old, hash, key);
        if shard.young.len() >= self.per_generation {
            let young = std::mem::take(&mut shard.young);
            shard.old = young;
        }
        shard
            .young
            .insert_unique(hash, (key.clone(), entry.clone()), |(stored, _)| {
                self.hasher.hash_one(&**stored)
            });
    }

    /// Forgets `key` (its entry is no longer known).
    pub(crate) fn forget(&self, key: &Arc<str>) {
        self.remember(key, None);
    }

    /// The key's hash and its shard, locked.
    fn shard(&self, key: &str) -> Option<(u64, MutexGuard<'_, Shard>)> {
        if self.shards.is_empty() {
            return None;
        }
        let hash = self.hasher.hash_one(key);
        let index = shard_index(hash, self.shards.len());
        // Every mutation is one insert or remove: a poisoned lock is still consistent.
        let shard = self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Some((hash, shard))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap();
                s.young.len() + s.old.len()
            })
            .sum()
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

    fn committed(tag: &str) -> Entry {
        let tag = EntityTag::strong(tag).unwrap();
        Entry::committed(Version::new(tag, SystemTime::now()).unwrap())
    }

    #[test]
    fn remembers_committed_entries_and_forgets_leases() {
        let cache = EntryCache::new(64);
        let key: Arc<str> = Arc::from("/items/1");
        cache.remember(&key, Some(&committed("a")));
        assert_eq!(cache.get(&key), Some(committed("a")));

        let leased = Entry::from_parts(
            Some(committed("a").into_version().unwrap()),
            Some(Lease::from_parts(LeaseToken::random(), u64::MAX)),
        )
        .unwrap();
        cache.remember(&key, Some(&leased));
        assert_eq!(cache.get(&key), None, "a lease is never a guess");

        cache.remember(&key, Some(&committed("b")));
        cache.forget(&key);
        assert_eq!(cache.get(&key), None);

        cache.remember(&key, Some(&committed("c")));
        cache.remember(&key, Some(&committed(&"x".repeat(MAX_ENTRY_BYTES))));
        assert_eq!(
            cache.get(&key),
            None,
            "an entry too large to keep forgets the key"
        );
    }

    #[test]
    fn stays_within_its_capacity() {
        let cache = EntryCache::new(320);
        for i in 0..100_000 {
            let key: Arc<str> = Arc::from(format!("/items/{i}"));
            cache.remember(&key, Some(&committed("v")));
        }
        assert!(cache.len() <= 320, "{} entries", cache.len());
        assert!(cache.len() >= 160, "{} entries", cache.len());
        let last: Arc<str> = Arc::from("/items/99999");
        assert!(cache.get(&last).is_some(), "the newest entry is kept");
    }

    #[test]
    fn a_disabled_cache_keeps_nothing() {
        let cache = EntryCache::new(0);
        let key: Arc<str> = Arc::from("/k");
        cache.remember(&key, Some(&committed("a")));
        assert!(!cache.is_enabled());
        assert_eq!(cache.get(&key), None);
    }
}
