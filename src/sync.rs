//! The locks and atomics that the memory store, the entry cache and the store clock
//! share between threads: std's in every real build, loom's under
//! `--cfg tower_precondition_loom`, so that the model check (the `loom_tests` modules)
//! explores the interleavings of the code that ships rather than of a copy.
//!
//! `RandomState` is here too: loom replays an execution by its schedule, so a shard
//! must be chosen the same way in every run; a fixed hasher does that. Only which
//! shard a key lands in changes, never what a shard does.

#[cfg(not(tower_precondition_loom))]
pub(crate) use std::{
    hash::RandomState,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, MutexGuard,
    },
};

#[cfg(tower_precondition_loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicBool, Ordering},
    Mutex, MutexGuard,
};

/// A hasher with fixed keys: the same shard for a key in every execution of a model.
#[cfg(tower_precondition_loom)]
pub(crate) type RandomState =
    std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// The shard, of `shards`, that a key of `hash` belongs to. A shard's `hashbrown`
/// table picks a bucket by the hash's low bits and tags it with its top 7: the shard
/// is chosen by bits in between, so that neither is narrowed within a shard (tables
/// stay far below 2^32 buckets).
pub(crate) fn shard_index(hash: u64, shards: usize) -> usize {
    (hash >> 32) as usize % shards
}

/// The model checker's driver, shared by the `loom_tests` modules.
#[cfg(all(test, tower_precondition_loom))]
pub(crate) mod model {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        time::Instant,
    };

    /// Runs `f` in every interleaving loom finds within `preemptions` preemptions
    /// (`None`: no bound; `LOOM_MAX_PREEMPTIONS` overrides either, and
    /// `TOWER_PRECONDITION_LOOM_UNBOUNDED` lifts it) and prints how many
    /// executions that was, so a model whose state space grows shows it.
    pub(crate) fn check<F>(name: &str, preemptions: Option<usize>, f: F)
    where
        F: Fn() + Send + Sync + 'static,
    {
        let mut builder = loom::model::Builder::new();
        if std::env::var_os("TOWER_PRECONDITION_LOOM_UNBOUNDED").is_some() {
            builder.preemption_bound = None;
        } else if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
            builder.preemption_bound = preemptions;
        }
        // Each lock is a branch; loom's default of 1000 per execution is ample, but
        // a retry loop that ran away should fail here, not hang.
        builder.max_branches = 10_000;
        // A plain std counter: loom runs every modelled thread on this one OS thread.
        let executions = Arc::new(AtomicUsize::new(0));
        let counter = executions.clone();
        let start = Instant::now();
        builder.check(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            f();
        });
        println!(
            "loom model {name}: {} executions, preemption bound {:?}, {:.1?}",
            executions.load(Ordering::Relaxed),
            builder.preemption_bound,
            start.elapsed()
        );
    }
}
