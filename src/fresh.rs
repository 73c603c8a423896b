//! Fresh, unique values: lease tokens and generated entity tags.
//!
//! A process-wide random seed (from the OS) plus an atomic counter, run through a
//! bijective mixer: values are unique within a process (a bijection of distinct counter
//! values) and unpredictable across processes, at a cost of a few nanoseconds and no
//! system call per request.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    OnceLock,
};

use crate::etag::EntityTag;

struct Seed {
    high: u64,
    low: u64,
}

static SEED: OnceLock<Seed> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn seed() -> &'static Seed {
    SEED.get_or_init(|| {
        let mut bytes = [0u8; 16];
        if getrandom::fill(&mut bytes).is_err() {
            // No OS randomness: fall back to the clock and the address space, which
            // still differ between processes; uniqueness within the process holds.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let addr = &COUNTER as *const AtomicU64 as usize as u128;
            bytes = (nanos ^ (addr << 64) ^ u128::from(std::process::id())).to_le_bytes();
        }
        let value = u128::from_le_bytes(bytes);
        Seed {
            high: (value >> 64) as u64,
            low: value as u64,
        }
    })
}

/// The splitmix64 finalizer: a bijection on `u64`.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A value never returned before by this process, and unpredictable across processes.
pub(crate) fn random_u128() -> u128 {
    let seed = seed();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let low = mix(n ^ seed.low);
    let high = mix(n.wrapping_add(seed.high) ^ 0x9e37_79b9_7f4a_7c15);
    (u128::from(high) << 64) | u128::from(low)
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A fresh strong entity tag: 22 URL-safe characters of a unique 128-bit value.
pub(crate) fn fresh_etag() -> EntityTag {
    let mut value = random_u128();
    let mut text = [0u8; 22];
    for byte in &mut text {
        *byte = ALPHABET[(value & 63) as usize];
        value >>= 6;
    }
    // Built on the stack, and held inline by the tag: nothing is allocated.
    EntityTag::strong_from_ascii(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn values_are_unique() {
        let values: HashSet<u128> = (0..100_000).map(|_| random_u128()).collect();
        assert_eq!(values.len(), 100_000);
    }

    #[test]
    fn etags_are_strong_and_distinct() {
        let a = fresh_etag();
        let b = fresh_etag();
        assert!(!a.is_weak());
        assert_eq!(a.opaque().len(), 22);
        assert_ne!(a, b);
    }
}
