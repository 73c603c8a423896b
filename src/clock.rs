//! The layer's reading of the store's clock, by which every lease is stamped and judged.
//!
//! Each process samples [`AtomicVersionStore::clock_millis`] now and then and
//! extrapolates with its own monotonic clock. A sample taken between the local instants
//! `sent` and `received` that answered `T` bounds the store's clock at a later local
//! instant `t`: it is at least `T + (t - received)` and at most `T + (t - sent)`.
//! Every decision uses the bound that errs on the safe side:
//!
//! * another write's lease counts as expired only once the *lower* bound has passed it
//!   (a late takeover, never an early one);
//! * our own lease is stamped from the lower bound (it is at most as long as asked), and
//!   our handler must finish while the *upper* bound is still short of its expiry.
//!
//! A host whose wall clock is off, or steps, therefore cannot take over a live lease:
//! only the store's clock and the local *monotonic* clock are read.

use std::time::Duration;

use tokio::time::Instant;

use crate::{
    protocol::store_call,
    store::{AtomicVersionStore, StoreError},
    sync::{AtomicBool, Mutex, Ordering},
};

/// How old a sample may grow before a request refreshes it. Between refreshes the
/// estimate only drifts by the rate difference of two clocks (parts per million).
const REFRESH_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
struct Sample {
    store_millis: u64,
    sent: Instant,
    received: Instant,
}

impl Sample {
    /// Whether the sample is old enough at `at` that a request should refresh it.
    fn is_stale_at(&self, at: Instant) -> bool {
        at.saturating_duration_since(self.received) >= REFRESH_AFTER
    }

    fn lower_bound_at(&self, at: Instant) -> u64 {
        let elapsed = at.saturating_duration_since(self.received);
        self.store_millis.saturating_add(millis(elapsed))
    }
}

/// One process's estimate of a store's clock.
#[derive(Debug, Default)]
pub(crate) struct StoreClock {
    sample: Mutex<Option<Sample>>,
    refreshing: AtomicBool,
}

impl StoreClock {
    fn current(&self) -> Option<Sample> {
        *self
            .sample
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`now`](Self::now) when it needs no call to the store: `None` when there is no
    /// sample yet, or when the sample is stale and no other request is refreshing it.
    pub(crate) fn now_if_fresh(&self) -> Option<StoreNow> {
        let sample = self.current()?;
        let stale = sample.is_stale_at(Instant::now());
        (!stale || self.refreshing.load(Ordering::Acquire)).then_some(StoreNow { sample })
    }

    /// A lower bound of the store's clock now, in its milliseconds. Asks the store when
    /// there is no sample yet, or when this request is the one that refreshes a stale
    /// sample (the others go on with the old one, which is still a valid lower bound).
    pub(crate) async fn now(
        &self,
        store: &dyn AtomicVersionStore,
        timeout: Duration,
    ) -> Result<StoreNow, StoreError> {
        let now = Instant::now();
        if let Some(sample) = self.current() {
            let stale = sample.is_stale_at(now);
            if !stale || self.refreshing.swap(true, Ordering::AcqRel) {
                return Ok(StoreNow { sample });
            }
            let refreshed = self.sample_store(store, timeout).await;
            self.refreshing.store(false, Ordering::Release);
            // A failed refresh keeps the old sample: it is still a valid lower bound.
            return Ok(StoreNow {
                sample: refreshed.unwrap_or(sample),
            });
        }
        self.sample_store(store, timeout)
            .await
            .map(|sample| StoreNow { sample })
    }

    async fn sample_store(
        &self,
        store: &dyn AtomicVersionStore,
        timeout: Duration,
    ) -> Result<Sample, StoreError> {
        let sent = Instant::now();
        let store_millis = store_call(timeout, store.clock_millis()).await?;
        let sample = Sample {
            store_millis,
            sent,
            received: Instant::now(),
        };
        let mut slot = self
            .sample
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Keep whichever sample says the store's clock is later: both are lower bounds.
        let keep = match *slot {
            Some(old) if old.lower_bound_at(sample.received) > sample.store_millis => old,
            _ => sample,
        };
        *slot = Some(keep);
        Ok(keep)
    }
}

/// The store's clock as one request sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StoreNow {
    sample: Sample,
}

impl StoreNow {
    /// A lower bound of the store's clock at this moment.
    pub(crate) fn millis(&self) -> u64 {
        self.millis_at(Instant::now())
    }

    /// A lower bound of the store's clock at the local instant `at`.
    pub(crate) fn millis_at(&self, at: Instant) -> u64 {
        self.sample.lower_bound_at(at)
    }

    /// The latest local instant at which the store's clock is surely still before
    /// `store_millis`.
    pub(crate) fn local_instant_before(&self, store_millis: u64) -> Instant {
        let ahead = Duration::from_millis(store_millis.saturating_sub(self.sample.store_millis));
        self.sample
            .sent
            .checked_add(ahead)
            .unwrap_or_else(far_future)
    }
}

/// An instant about thirty years ahead: a deadline that never fires but still fits
/// every platform's clock arithmetic (tokio does the same for `Sleep`).
pub(crate) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_err_on_the_safe_side() {
        let sent = Instant::now();
        let received = sent + Duration::from_millis(40);
        let sample = Sample {
            store_millis: 10_000,
            sent,
            received,
        };
        // Right after the answer the store's clock is at least what it said.
        assert_eq!(sample.lower_bound_at(received), 10_000);
        assert_eq!(
            sample.lower_bound_at(received + Duration::from_millis(5)),
            10_005
        );
        // Before the answer arrived, nothing more is known.
        assert_eq!(sample.lower_bound_at(sent), 10_000);
        let now = StoreNow { sample };
        // The store's clock may have read 10_000 as early as `sent`: a lease expiring
        // at 10_100 is surely live only until `sent + 100 ms`.
        assert_eq!(
            now.local_instant_before(10_100),
            sent + Duration::from_millis(100)
        );
        assert_eq!(now.local_instant_before(5), sent);
    }
}
