//! The write protocol (reserve, run, settle) and the read-side store steps, built on
//! the one compare-and-set primitive of [`AtomicVersionStore`].
//!
//! Everything here is independent of HTTP bodies and of the inner service, so the
//! response future only sequences these steps.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use http::Method;
use pin_project_lite::pin_project;

use crate::{
    etag::{EntityTag, TagList},
    evaluate::{evaluate, Decision, Preconditions},
    fresh::fresh_etag,
    layer::Config,
    response::Problem,
    store::{AtomicVersionStore, CasOutcome, Entry, Lease, LeaseToken, StoreError, Version},
};

/// What a handler sees in the request extensions of a write the layer reserved.
///
/// ```
/// use axum::{Extension, http::StatusCode};
/// use tower_precondition::Reservation;
///
/// async fn put_item(Extension(reservation): Extension<Reservation>) -> StatusCode {
///     if reservation.is_create() {
///         // INSERT ... ON CONFLICT DO NOTHING: the resource must not exist yet.
///         StatusCode::CREATED
///     } else {
///         StatusCode::NO_CONTENT
///     }
/// }
/// # let _ = put_item;
/// ```
#[derive(Clone, Debug)]
pub struct Reservation {
    key: Arc<str>,
    replacing: Option<Version>,
    lease_expires_at: SystemTime,
}

impl Reservation {
    /// The resource key the layer derived for this request.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The version this write replaces, `None` if the resource has no known version.
    pub fn replacing(&self) -> Option<&Version> {
        self.replacing.as_ref()
    }

    /// Whether the layer knows no version of this resource, so the write creates it.
    ///
    /// A handler should still make its own write conditional on that (an
    /// `INSERT ... ON CONFLICT DO NOTHING`), because a store may have forgotten versions.
    pub fn is_create(&self) -> bool {
        self.replacing.is_none()
    }

    /// When the reservation's lease expires; the handler must be done well before.
    pub fn lease_expires_at(&self) -> SystemTime {
        self.lease_expires_at
    }
}

/// How a reserved write ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// 2xx: commit a new version, with the handler's strong tag if it gave one.
    Commit(Option<EntityTag>),
    /// 2xx DELETE: remove the entry.
    Remove,
    /// 4xx: the handler refused; keep the old version.
    Release,
    /// 5xx, error, timeout, drop: the write may have happened; give a fresh version.
    Fresh,
}

impl Settlement {
    fn name(&self) -> &'static str {
        match self {
            Settlement::Commit(_) => "commit",
            Settlement::Remove => "remove",
            Settlement::Release => "release",
            Settlement::Fresh => "fresh",
        }
    }
}

/// A reserved write. Owns the lease until it is settled; dropped unsettled, it settles
/// itself (in a spawned task) so that no outcome goes unrecorded.
pub(crate) struct WriteGuard {
    store: Arc<dyn AtomicVersionStore>,
    key: Arc<str>,
    reserved: Entry,
    replacing: Option<Version>,
    store_timeout: Duration,
    /// What to do if dropped unsettled; `None` once settled.
    on_drop: Option<Settlement>,
}

impl WriteGuard {
    pub(crate) fn reservation(&self) -> Reservation {
        Reservation {
            key: self.key.clone(),
            replacing: self.replacing.clone(),
            lease_expires_at: self
                .reserved
                .lease()
                .map_or_else(SystemTime::now, Lease::expires_at),
        }
    }

    /// From now on the handler may have run: a drop means "unknown", a fresh version.
    pub(crate) fn handler_started(&mut self) {
        self.on_drop = Some(Settlement::Fresh);
    }

    fn new_entry(&self, settlement: Settlement) -> Option<Entry> {
        let now = SystemTime::now();
        let successor = |etag| Version::successor(self.replacing.as_ref(), etag, now);
        match settlement {
            Settlement::Commit(etag) => {
                successor(etag.unwrap_or_else(fresh_etag)).map(Entry::committed)
            }
            Settlement::Fresh => successor(fresh_etag()).map(Entry::committed),
            Settlement::Remove => None,
            Settlement::Release => Entry::from_parts(self.replacing.clone(), None),
        }
    }

    /// Settles the write: one compare-and-set that must still find our lease.
    ///
    /// Returns the version now committed, for the response's validators: `None` when
    /// the entry was removed or released to no version, or when the settle did not
    /// apply (the lease was lost, or the store failed; both are logged here, and the
    /// layer then cannot vouch for any version).
    pub(crate) async fn settle(mut self, settlement: Settlement) -> Option<Version> {
        let outcome_name = settlement.name();
        let new = self.new_entry(settlement);
        let attempt = || {
            store_call(
                self.store_timeout,
                self.store
                    .compare_and_set(&self.key, Some(&self.reserved), new.as_ref()),
            )
        };
        let mut outcome = attempt().await;
        if let Err(error) = &outcome {
            // Safe to resend: were the first attempt applied and only its answer lost,
            // the store finds `new` already in place and reports it applied (replay).
            tracing::debug!(key = &*self.key, %error, "settle failed; retrying once");
            outcome = attempt().await;
        }
        // Settled, taken over, or left to expire and be taken over with a fresh
        // version: in every case there is nothing left for the drop handler to do.
        self.on_drop = None;
        let key = &*self.key;
        match outcome {
            Ok(CasOutcome::Applied) => {
                tracing::debug!(key, outcome = outcome_name, "write settled");
                new.and_then(Entry::into_version)
            }
            Ok(CasOutcome::Mismatch { current }) => {
                tracing::warn!(
                    key,
                    outcome = outcome_name,
                    current = ?current,
                    "lease lost before settling: the handler outlived its lease"
                );
                None
            }
            Err(error) => {
                tracing::error!(key, outcome = outcome_name, %error,
                    "could not settle the write; the lease will expire and be taken over with a fresh version");
                None
            }
        }
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let Some(settlement) = self.on_drop.take() else {
            return;
        };
        let outcome_name = settlement.name();
        let new = self.new_entry(settlement);
        let store = self.store.clone();
        let key = self.key.clone();
        let reserved = self.reserved.clone();
        let timeout = self.store_timeout;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::info!(
                    key = &*key,
                    outcome = outcome_name,
                    "write abandoned; settling in the background"
                );
                runtime.spawn(async move {
                    let result = store_call(
                        timeout,
                        store.compare_and_set(&key, Some(&reserved), new.as_ref()),
                    )
                    .await;
                    if let Err(error) = result {
                        tracing::error!(key = &*key, %error,
                            "could not settle an abandoned write; its lease will expire and be taken over");
                    }
                });
            }
            Err(_) => tracing::warn!(
                key = &*key,
                "write abandoned outside a Tokio runtime; its lease will expire and be taken over"
            ),
        }
    }
}

/// A future bounded by `timeout`.
pub(crate) async fn with_timeout<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(timeout)),
    }
}

fn timed_out(timeout: Duration) -> StoreError {
    StoreError::timeout(format!("no answer within {} ms", timeout.as_millis()))
}

/// A store call bounded by `timeout`, with no timer armed if it answers at once.
pub(crate) fn store_call<F>(timeout: Duration, call: F) -> StoreCall<F>
where
    F: Future + Unpin,
{
    StoreCall {
        call: Some(call),
        timeout,
        timed: None,
    }
}

pin_project! {
    /// The future of [`store_call`].
    ///
    /// Many calls (every memory store call) answer on their first poll, and arming a
    /// timer costs a clock read and a runtime handle clone: the call is polled once
    /// alone, and only moved into a `tokio::time::timeout` if it is still pending (which
    /// then polls it again at once: a spurious poll, which any future must tolerate).
    /// `Unpin` (the store's boxed `async_trait` futures are) is what allows that move.
    /// Hand-written rather than an `async fn`, which stored the call twice.
    pub(crate) struct StoreCall<F: Future> {
        call: Option<F>,
        timeout: Duration,
        #[pin]
        timed: Option<tokio::time::Timeout<F>>,
    }
}

impl<F, T> Future for StoreCall<F>
where
    F: Future<Output = Result<T, StoreError>> + Unpin,
{
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(mut call) = this.call.take() {
            if let Poll::Ready(result) = Pin::new(&mut call).poll(cx) {
                return Poll::Ready(result);
            }
            this.timed
                .set(Some(tokio::time::timeout(*this.timeout, call)));
        }
        let timed = this
            .timed
            .as_pin_mut()
            .expect("StoreCall polled after completion");
        match timed.poll(cx) {
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            Poll::Ready(Err(_)) => Poll::Ready(Err(timed_out(*this.timeout))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The lease rule every write applies to the entry it found: `None` while another
/// write's lease is live (`409`); otherwise the version to evaluate the preconditions
/// against, and whether it takes over an expired lease. The writer of an expired lease
/// may have written before it died, so every old tag must fail from then on: the base
/// is then a fresh version.
pub(crate) fn write_base(
    entry: Option<&Entry>,
    now: SystemTime,
) -> Option<(Option<Version>, bool)> {
    let Some(entry) = entry else {
        return Some((None, false));
    };
    match entry.lease() {
        Some(lease) if !lease.is_expired_at(now) => None,
        Some(_) => Some((Version::successor(entry.version(), fresh_etag(), now), true)),
        None => Some((entry.version().cloned(), false)),
    }
}

/// Reserve: evaluate the preconditions against the current entry and, in the same
/// compare-and-set, put our lease on it.
pub(crate) async fn reserve(
    config: Arc<Config>,
    key: Arc<str>,
    method: Method,
    pre: Preconditions,
) -> Result<WriteGuard, Problem> {
    let store_failed = |error: StoreError| {
        tracing::warn!(key = &*key, %error, "version store failed; refusing the write (503)");
        Problem::store_unavailable(config.retry_after)
    };
    let store = &config.store;
    let mut current = store_call(config.store_timeout, store.load(&key))
        .await
        .map_err(store_failed)?;

    for _ in 0..config.max_reserve_attempts {
        let now = SystemTime::now();
        let Some((base, takeover)) = write_base(current.as_ref(), now) else {
            tracing::info!(
                key = &*key,
                "write refused: another write is in flight (409)"
            );
            return Err(Problem::write_in_flight(config.retry_after));
        };

        if evaluate(&method, &pre, base.as_ref()) != Decision::Proceed {
            if takeover {
                // Record the fresh version even though this request fails, so the
                // expired lease is cleared and the 412 carries the real current tag.
                let cleared = base.clone().map(Entry::committed);
                match store_call(
                    config.store_timeout,
                    store.compare_and_set(&key, current.as_ref(), cleared.as_ref()),
                )
                .await
                .map_err(store_failed)?
                {
                    CasOutcome::Applied => {}
                    CasOutcome::Mismatch { current: found } => {
                        current = found;
                        continue;
                    }
                }
            }
            tracing::info!(key = &*key, current = ?base.as_ref().map(Version::etag), "precondition failed (412)");
            return Err(Problem::precondition_failed(base));
        }

        let lease = Lease::new(LeaseToken::random(), now + config.lease);
        let reserved = Entry::from_parts(base.clone(), Some(lease))
            .expect("an entry with a lease is never empty");
        let mut guard = WriteGuard {
            store: store.clone(),
            key: key.clone(),
            reserved,
            replacing: base,
            store_timeout: config.store_timeout,
            // Dropped while the reserve is in flight: undo our lease if it landed.
            on_drop: Some(Settlement::Release),
        };
        let outcome = store_call(
            config.store_timeout,
            store.compare_and_set(&key, current.as_ref(), Some(&guard.reserved)),
        )
        .await;
        match outcome {
            Ok(CasOutcome::Applied) => {
                tracing::debug!(
                    key = &*key,
                    takeover,
                    create = guard.replacing.is_none(),
                    "write reserved"
                );
                return Ok(guard);
            }
            Ok(CasOutcome::Mismatch { current: found }) => {
                guard.on_drop = None;
                current = found;
            }
            Err(error) => {
                // The lease may or may not have landed; the guard releases it if it did.
                return Err(store_failed(error));
            }
        }
    }
    tracing::info!(
        key = &*key,
        "write refused: too much contention on the resource (409)"
    );
    Err(Problem::write_in_flight(config.retry_after))
}

/// Loads `key`'s entry for a read. An expired lease means its writer died with the
/// outcome unknown: the read takes it over with a fresh version, as a write would, so
/// that no old tag keeps matching (invariant 3) until some write comes along.
pub(crate) async fn load_for_read(config: &Config, key: &str) -> Result<Option<Entry>, StoreError> {
    let store = &config.store;
    let mut current = store_call(config.store_timeout, store.load(key)).await?;
    for _ in 0..config.max_reserve_attempts {
        let now = SystemTime::now();
        let Some(entry) = &current else {
            return Ok(None);
        };
        if !entry.lease().is_some_and(|lease| lease.is_expired_at(now)) {
            return Ok(current);
        }
        let fresh = Version::successor(entry.version(), fresh_etag(), now).map(Entry::committed);
        let outcome = store_call(
            config.store_timeout,
            store.compare_and_set(key, Some(entry), fresh.as_ref()),
        )
        .await?;
        match outcome {
            CasOutcome::Applied => {
                tracing::info!(key, "expired lease taken over by a read: fresh version");
                return Ok(fresh);
            }
            CasOutcome::Mismatch { current: found } => current = found,
        }
    }
    // Still contended: serve the read without validators rather than guess.
    Err(StoreError::unavailable(
        "an expired lease could not be taken over (contention)",
    ))
}

/// The result of a read's store steps after the handler answered 2xx for a resource with
/// no known version.
pub(crate) enum Seeded {
    /// The resource now has this version.
    Version(Version),
    /// Another request versioned it first; our body may predate that version, so the
    /// response goes out without validators.
    Unknown,
}

/// Seeds a version for a resource that a 2xx read found unversioned.
pub(crate) async fn seed(
    config: &Config,
    key: &str,
    handler_etag: Option<EntityTag>,
) -> Result<Seeded, StoreError> {
    let etag = handler_etag.unwrap_or_else(fresh_etag);
    let entry = Version::new(etag, SystemTime::now()).map(Entry::committed);
    let Some(entry) = entry else {
        return Ok(Seeded::Unknown);
    };
    let outcome = store_call(
        config.store_timeout,
        config.store.compare_and_set(key, None, Some(&entry)),
    )
    .await?;
    Ok(match outcome {
        CasOutcome::Applied => {
            tracing::debug!(key, "version seeded by a read");
            Seeded::Version(entry.into_version().expect("committed entry has a version"))
        }
        CasOutcome::Mismatch { .. } => Seeded::Unknown,
    })
}

/// Clears the entry of a resource a read found gone (404 / 410), so that a create with
/// `If-None-Match: *` is not refused forever after a write whose outcome was unknown.
pub(crate) async fn clear_gone(config: &Config, key: &str, entry: &Entry) {
    let result = store_call(
        config.store_timeout,
        config.store.compare_and_set(key, Some(entry), None),
    )
    .await;
    match result {
        Ok(CasOutcome::Applied) => tracing::debug!(key, "entry of a gone resource cleared"),
        Ok(CasOutcome::Mismatch { .. }) => {}
        Err(error) => tracing::warn!(key, %error, "could not clear the entry of a gone resource"),
    }
}

/// Whether an `If-Match` asks for specific tags (not `*`).
pub(crate) fn if_match_names_tags(pre: &Preconditions) -> bool {
    matches!(pre.if_match, Some(TagList::Tags(_)))
}
