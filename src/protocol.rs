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
use tokio::time::Instant;

use crate::{
    clock::{far_future, millis, StoreNow},
    entry_cache::EntryCache,
    etag::{EntityTag, TagList},
    evaluate::{evaluate, Decision, Preconditions},
    fresh::fresh_etag,
    layer::Config,
    request_body::WatchFlag,
    response::Problem,
    store::{AtomicVersionStore, CasOutcome, Entry, Fence, Lease, LeaseToken, StoreError, Version},
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
    create: bool,
    deadline: Instant,
    token: LeaseToken,
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

    /// Whether this write creates the resource: the layer knows no version written for
    /// it, or the client asked for a create (`If-None-Match: *`) where only a read had
    /// seen the resource.
    ///
    /// The handler must make its own write conditional on that (an
    /// `INSERT ... ON CONFLICT DO NOTHING`, answering `412` when the row exists): the
    /// layer knows what writes and reads told it, not what is in the database.
    pub fn is_create(&self) -> bool {
        self.create
    }

    /// The instant by which the handler must be done: the layer cancels it then
    /// (`503`, and the resource gets a fresh version). It lies safely inside the lease,
    /// judged by the store's clock.
    pub fn deadline(&self) -> std::time::Instant {
        self.deadline.into_std()
    }

    /// The write's lease as the handler's own transaction checks it, where the data
    /// lives in the store's database ([`SqliteStore::check_fence`], and
    /// [`PostgresStore::check_fence`]): the data write then commits only while the
    /// lease is held, and a statement that outlives its handler (a dropped request, a
    /// missed deadline, a lease taken over) can never land over a newer write.
    ///
    /// [`SqliteStore::check_fence`]: crate::store::SqliteStore::check_fence
    /// [`PostgresStore::check_fence`]: crate::store::PostgresStore::check_fence
    pub fn fence(&self) -> Fence {
        Fence::new(self.key.clone(), self.token)
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
    /// 5xx, error, timeout, drop, a body that failed mid-read: the write may have
    /// happened. A resource that had a version gets a fresh one (every old tag fails);
    /// one that had none goes back to having none, which is where it was before.
    Unknown,
}

impl Settlement {
    fn name(&self) -> &'static str {
        match self {
            Settlement::Commit(_) => "commit",
            Settlement::Remove => "remove",
            Settlement::Release => "release",
            Settlement::Unknown => "unknown",
        }
    }
}

/// What a settle found.
#[derive(Debug)]
pub(crate) enum Settled {
    /// The settle applied; the version now committed, if any.
    Applied(Option<Version>),
    /// Another request took the lease over before we settled: the handler outlived its
    /// lease. The write must not be reported as a plain success.
    LeaseLost,
    /// The store did not answer; the lease will expire and be taken over.
    Unknown,
}

/// What a write does if it is dropped before it settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnDrop {
    /// Settled already: nothing.
    Nothing,
    /// The reserve was sent but not answered: undo our lease if it landed, and fence
    /// the entry it expected, so that a reserve landing late cannot apply.
    Unreserve,
    /// The handler may have run: an unknown outcome.
    Unknown,
}

/// A reserved write. Owns the lease until it is settled; dropped unsettled, it settles
/// itself (in a spawned task) so that no outcome goes unrecorded.
pub(crate) struct WriteGuard {
    /// The layer's settings: the store, the entry cache and the store timeout.
    config: Arc<Config>,
    key: Arc<str>,
    /// The entry the reserve expected to find.
    before: Option<Entry>,
    /// What the reserve put in place: the version it replaces, with our lease.
    reserved: Entry,
    create: bool,
    deadline: Instant,
    on_drop: OnDrop,
    /// Set when a streamed request body failed while the handler read it.
    body_failed: Option<WatchFlag>,
}

impl WriteGuard {
    /// The version this write replaces (`None`: a create).
    fn replacing(&self) -> Option<&Version> {
        self.reserved.version()
    }

    /// Watches a streamed request body: if it fails, the write's outcome is unknown.
    pub(crate) fn watch_body(&mut self, flag: Option<WatchFlag>) {
        self.body_failed = flag;
    }

    /// Whether a streamed request body failed mid-read.
    pub(crate) fn body_failed(&self) -> bool {
        self.body_failed.as_ref().is_some_and(WatchFlag::is_set)
    }

    pub(crate) fn reservation(&self) -> Reservation {
        Reservation {
            key: self.key.clone(),
            replacing: self.replacing().cloned(),
            create: self.create,
            deadline: self.deadline,
            token: self.token(),
        }
    }

    /// The instant by which the handler must be done.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// From now on the handler may have run: a drop means "unknown".
    pub(crate) fn handler_started(&mut self) {
        self.on_drop = OnDrop::Unknown;
    }

    fn token(&self) -> LeaseToken {
        self.reserved
            .lease()
            .map_or_else(LeaseToken::random, Lease::token)
    }

    fn new_entry(&self, settlement: Settlement) -> Option<Entry> {
        let now = SystemTime::now();
        let successor = |etag| Version::successor(self.replacing(), etag, now);
        match settlement {
            Settlement::Commit(etag) => {
                successor(etag.unwrap_or_else(fresh_etag)).map(Entry::committed)
            }
            // Keeps the seeded flag: an unknown outcome proves no more about existence
            // than the read that seeded the version did.
            Settlement::Unknown => unknown_outcome_base(self.replacing()).map(Entry::committed),
            Settlement::Remove => None,
            Settlement::Release => Entry::from_parts(self.replacing().cloned(), None),
        }
    }

    /// Settles the write: one compare-and-set that must still find our lease.
    pub(crate) async fn settle(self, settlement: Settlement) -> Settled {
        match self.settle_now(settlement) {
            Ok(settled) => settled,
            Err(pending) => pending.finish().await,
        }
    }

    /// [`settle`](Self::settle) without a future, when the store answers at once and
    /// the settle applies (the common case on a store in the process). Otherwise what
    /// is left to do, which the caller must finish with [`PendingSettle::finish`].
    // The large `Err` is moved once, into the future that finishes it: boxing it
    // would cost every write to a store across a connection an allocation.
    #[allow(clippy::result_large_err)]
    pub(crate) fn settle_now(mut self, settlement: Settlement) -> Result<Settled, PendingSettle> {
        let outcome_name = settlement.name();
        let new = self.new_entry(settlement);
        let answer =
            self.config
                .store
                .compare_and_set_now(&self.key, Some(&self.reserved), new.as_ref());
        match answer {
            Some(Ok(CasOutcome::Applied)) => Ok(self.applied(outcome_name, new)),
            first => Err(PendingSettle {
                guard: self,
                outcome_name,
                new,
                first,
            }),
        }
    }

    /// The settle applied: `new` is what the store holds now.
    fn applied(&mut self, outcome_name: &'static str, new: Option<Entry>) -> Settled {
        self.on_drop = OnDrop::Nothing;
        tracing::debug!(key = &*self.key, outcome = outcome_name, "write settled");
        self.config.entry_cache.remember(&self.key, new.as_ref());
        Settled::Applied(new.and_then(Entry::into_version))
    }

    fn attempt_settle<'a>(
        &'a self,
        new: Option<&'a Entry>,
    ) -> impl Future<Output = Result<CasOutcome, StoreError>> + 'a {
        swap_entry(
            &*self.config.store,
            self.config.store_timeout,
            &self.key,
            Some(&self.reserved),
            new,
        )
    }

    /// What the settle's first answer leads to.
    async fn settled(
        mut self,
        outcome_name: &'static str,
        new: Option<Entry>,
        mut outcome: Result<CasOutcome, StoreError>,
    ) -> Settled {
        if let Err(error) = &outcome {
            // Safe to resend: were the first attempt applied and only its answer lost,
            // the store finds `new` already in place and reports it applied (replay).
            tracing::debug!(key = &*self.key, %error, "settle failed; retrying once");
            outcome = self.attempt_settle(new.as_ref()).await;
        }
        // Settled, taken over, or left to expire and be taken over: in every case
        // there is nothing left for the drop handler to do.
        self.on_drop = OnDrop::Nothing;
        let key = &*self.key;
        match outcome {
            Ok(CasOutcome::Applied) => self.applied(outcome_name, new),
            Ok(CasOutcome::Mismatch { current }) => {
                self.config.entry_cache.forget(&self.key);
                tracing::error!(
                    key,
                    outcome = outcome_name,
                    current = ?current,
                    "lease lost before settling: the handler outlived its lease"
                );
                self.invalidate_after_lost_lease(current).await;
                Settled::LeaseLost
            }
            Err(error) => {
                self.config.entry_cache.forget(&self.key);
                tracing::error!(key, outcome = outcome_name, %error,
                    "could not settle the write; the lease will expire and be taken over");
                Settled::Unknown
            }
        }
    }

    /// Our handler wrote after its lease was taken over. If nobody holds the resource
    /// now, give it a fresh version, so that no tag handed out before our write keeps
    /// matching; a writer that holds it will commit a new version itself.
    async fn invalidate_after_lost_lease(&self, current: Option<Entry>) {
        let Some(found) = current else { return };
        if found.version().is_none() || found.write_lease().is_some() {
            return;
        }
        let fresh = unknown_outcome_base(found.version()).map(Entry::committed);
        let result = swap_entry(
            &*self.config.store,
            self.config.store_timeout,
            &self.key,
            Some(&found),
            fresh.as_ref(),
        )
        .await;
        if let Ok(CasOutcome::Applied) = result {
            tracing::warn!(key = &*self.key, "fresh version after a lost lease");
        }
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let on_drop = std::mem::replace(&mut self.on_drop, OnDrop::Nothing);
        let settlement = match on_drop {
            OnDrop::Nothing => return,
            OnDrop::Unreserve => Settlement::Release,
            OnDrop::Unknown => Settlement::Unknown,
        };
        let outcome_name = settlement.name();
        self.config.entry_cache.forget(&self.key);
        // An unanswered reserve is undone into a *fence*: the old version with a release
        // marker, an entry no earlier call can expect. A plain release would equal the
        // entry before the reserve, so a release landing first would pass for a replay
        // and a reserve landing after it would leave a lease nobody owns.
        let fence = (on_drop == OnDrop::Unreserve).then(|| {
            Entry::from_parts(
                self.replacing().cloned(),
                Some(Lease::released(self.token())),
            )
        });
        let new = match &fence {
            Some(fence) => fence.clone(),
            None => self.new_entry(settlement),
        };
        let fence = fence.flatten();
        let config = self.config.clone();
        let key = self.key.clone();
        let reserved = self.reserved.clone();
        let before = self.before.clone();
        let timeout = self.config.store_timeout;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                key = &*key,
                "write abandoned outside a Tokio runtime; its lease will expire and be taken over"
            );
            return;
        };
        tracing::info!(
            key = &*key,
            outcome = outcome_name,
            "write abandoned; settling in the background"
        );
        runtime.spawn(async move {
            let cas = |expected: Option<Entry>, new: Option<Entry>| {
                let config = config.clone();
                let key = key.clone();
                async move {
                    swap_entry(
                        &*config.store,
                        timeout,
                        &key,
                        expected.as_ref(),
                        new.as_ref(),
                    )
                    .await
                }
            };
            let result = match cas(Some(reserved), new).await {
                // The reserve never landed: fence the entry it expected.
                Ok(CasOutcome::Mismatch { current }) if fence.is_some() && current == before => {
                    cas(before, fence).await
                }
                other => other,
            };
            if let Err(error) = result {
                tracing::error!(key = &*key, %error,
                    "could not settle an abandoned write; its lease will expire and be taken over");
            }
        });
    }
}

/// A settle that [`WriteGuard::settle_now`] could not finish at once.
pub(crate) struct PendingSettle {
    guard: WriteGuard,
    outcome_name: &'static str,
    new: Option<Entry>,
    /// The store's immediate answer, if it gave one (a mismatch or an error).
    first: Option<Result<CasOutcome, StoreError>>,
}

impl PendingSettle {
    /// Finishes the settle: the first attempt if the store gave no immediate answer,
    /// then whatever its answer calls for.
    pub(crate) async fn finish(self) -> Settled {
        let Self {
            guard,
            outcome_name,
            new,
            first,
        } = self;
        let outcome = match first {
            Some(outcome) => outcome,
            None => guard.attempt_settle(new.as_ref()).await,
        };
        guard.settled(outcome_name, new, outcome).await
    }
}

/// A future bounded by `timeout`.
#[cfg(feature = "postgres")]
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

/// `store.load(key)`, bounded by `timeout`; answered without a boxed future by a store
/// that can answer at once ([`AtomicVersionStore::load_now`]).
pub(crate) async fn load_entry(
    store: &dyn AtomicVersionStore,
    timeout: Duration,
    key: &str,
) -> Result<Option<Entry>, StoreError> {
    match store.load_now(key) {
        Some(answer) => answer,
        None => store_call(timeout, store.load(key)).await,
    }
}

/// `store.compare_and_set(key, expected, new)`, bounded by `timeout`; answered without a
/// boxed future by a store that can ([`AtomicVersionStore::compare_and_set_now`]).
pub(crate) async fn swap_entry(
    store: &dyn AtomicVersionStore,
    timeout: Duration,
    key: &str,
    expected: Option<&Entry>,
    new: Option<&Entry>,
) -> Result<CasOutcome, StoreError> {
    match store.compare_and_set_now(key, expected, new) {
        Some(answer) => answer,
        None => store_call(timeout, store.compare_and_set(key, expected, new)).await,
    }
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

/// The lease rule every write applies to the entry it found, at `now_millis` on the
/// store's clock: `None` while another write's lease is live (`409`); otherwise the
/// version to evaluate the preconditions against, and whether it takes over an expired
/// lease. The writer of an expired lease may have written before it died, so every old
/// tag must fail from then on: the base is then a fresh version, or no version at all
/// for a resource that had none (a crashed create proves nothing about existence).
pub(crate) fn write_base(
    entry: Option<&Entry>,
    now_millis: u64,
) -> Option<(Option<Version>, bool)> {
    let Some(entry) = entry else {
        return Some((None, false));
    };
    if entry.live_lease(now_millis).is_some() {
        return None;
    }
    if entry.expired_lease(now_millis).is_some() {
        return Some((unknown_outcome_base(entry.version()), true));
    }
    Some((entry.version().cloned(), false))
}

/// What a resource's version becomes after a write of unknown outcome based on `version`.
fn unknown_outcome_base(version: Option<&Version>) -> Option<Version> {
    let version = version?;
    Version::successor(Some(version), fresh_etag(), SystemTime::now())
        .map(|v| v.with_seeded(version.is_seeded()))
}

/// The reserve as a machine that asks for one store call at a time: the same decisions
/// whether the calls are answered at once ([`run_now`](Self::run_now), no future, for a
/// store in the process) or awaited ([`run`](Self::run)), and a reserve that began at
/// once can go on awaiting from the step where the store stopped answering at once.
pub(crate) struct Reserve {
    config: Arc<Config>,
    key: Arc<str>,
    method: Method,
    pre: Preconditions,
    /// The store's clock, read once per reserve.
    clock: Option<StoreNow>,
    current: Option<Entry>,
    /// Whether `current` came from the store (a load, or a mismatch's answer) rather
    /// than from the entry cache.
    confirmed: bool,
    attempts: u32,
    /// The lease being put in place, then in place: kept here rather than passed from
    /// step to step, as it is large.
    lease: Option<WriteGuard>,
}

/// What a [`Reserve`] waits for next.
pub(crate) enum ReserveStep {
    /// The store's clock.
    ReadClock,
    /// A fresh load of the entry.
    Load,
    /// Clear an expired lease (expecting `current`) before answering `412` with `base`.
    Clear {
        cleared: Option<Entry>,
        base: Option<Version>,
    },
    /// Put our lease on the entry (expecting `current`).
    Lease,
    /// Finished: reserved (the guard is handed out by [`Reserve::finish`]), or refused.
    Done(Result<(), Problem>),
}

impl Reserve {
    pub(crate) fn new(
        config: Arc<Config>,
        key: Arc<str>,
        method: Method,
        pre: Preconditions,
    ) -> Self {
        Self {
            config,
            key,
            method,
            pre,
            clock: None,
            current: None,
            confirmed: false,
            attempts: 0,
            lease: None,
        }
    }

    /// The guard of a reserve that finished with `Done(Ok(()))`.
    pub(crate) fn into_guard(mut self) -> WriteGuard {
        self.take_guard()
    }

    fn take_guard(&mut self) -> WriteGuard {
        self.lease
            .take()
            .expect("a finished reserve holds its lease")
    }

    /// The entry our lease step puts in place.
    fn reserved(&self) -> &Entry {
        &self
            .lease
            .as_ref()
            .expect("a lease step holds its lease")
            .reserved
    }

    /// What the reserve was made of, handed back once it finished with `result`, and
    /// its guard if it reserved: the response future keeps the settings, key and method
    /// for the rest of the write, so they are moved in and out rather than shared.
    pub(crate) fn finish(
        mut self,
        result: Result<(), Problem>,
    ) -> (Arc<Config>, Arc<str>, Method, Result<WriteGuard, Problem>) {
        let result = result.map(|()| self.take_guard());
        (self.config, self.key, self.method, result)
    }

    /// The settings, key and method, shared, for a reserve that goes on elsewhere.
    pub(crate) fn shared_parts(&self) -> (Arc<Config>, Arc<str>, Method) {
        (self.config.clone(), self.key.clone(), self.method.clone())
    }

    /// Takes the steps the store answers at once, and returns the first it does not
    /// (or [`ReserveStep::Done`]).
    pub(crate) fn run_now(&mut self, mut step: ReserveStep) -> ReserveStep {
        loop {
            let store: &dyn AtomicVersionStore = &*self.config.store;
            step = match step {
                ReserveStep::ReadClock => match self.config.clock.now_if_fresh() {
                    Some(clock) => self.clock_read(Ok(clock)),
                    None => return ReserveStep::ReadClock,
                },
                ReserveStep::Load => match store.load_now(&self.key) {
                    Some(loaded) => self.loaded(loaded),
                    None => return ReserveStep::Load,
                },
                ReserveStep::Clear { cleared, base } => {
                    match store.compare_and_set_now(
                        &self.key,
                        self.current.as_ref(),
                        cleared.as_ref(),
                    ) {
                        Some(outcome) => self.clear_answered(cleared, base, outcome),
                        None => return ReserveStep::Clear { cleared, base },
                    }
                }
                ReserveStep::Lease => {
                    let reserved = Some(self.reserved());
                    match store.compare_and_set_now(&self.key, self.current.as_ref(), reserved) {
                        Some(outcome) => self.lease_answered(outcome),
                        None => return ReserveStep::Lease,
                    }
                }
                done @ ReserveStep::Done(_) => return done,
            };
        }
    }

    /// Takes the steps from `step` on, awaiting the store, to the end.
    pub(crate) async fn run(mut self, mut step: ReserveStep) -> Result<WriteGuard, Problem> {
        loop {
            // `&dyn`, not `&Arc<dyn>`: `Arc`'s forwarding impl would box every call twice.
            let store: &dyn AtomicVersionStore = &*self.config.store;
            let timeout = self.config.store_timeout;
            step = match step {
                ReserveStep::ReadClock => {
                    let clock = self.config.clock.now(store, timeout).await;
                    self.clock_read(clock)
                }
                ReserveStep::Load => {
                    let loaded = load_entry(store, timeout, &self.key).await;
                    self.loaded(loaded)
                }
                ReserveStep::Clear { cleared, base } => {
                    let outcome = swap_entry(
                        store,
                        timeout,
                        &self.key,
                        self.current.as_ref(),
                        cleared.as_ref(),
                    )
                    .await;
                    self.clear_answered(cleared, base, outcome)
                }
                ReserveStep::Lease => {
                    let reserved = Some(self.reserved());
                    let outcome =
                        swap_entry(store, timeout, &self.key, self.current.as_ref(), reserved)
                            .await;
                    self.lease_answered(outcome)
                }
                ReserveStep::Done(result) => return result.map(|()| self.into_guard()),
            };
        }
    }

    fn store_failed(&self, error: StoreError) -> ReserveStep {
        tracing::warn!(key = &*self.key, %error, "version store failed; refusing the write (503)");
        ReserveStep::Done(Err(Problem::store_unavailable(self.config.retry_after)))
    }

    fn clock_read(&mut self, clock: Result<StoreNow, StoreError>) -> ReserveStep {
        match clock {
            Ok(clock) => self.clock = Some(clock),
            Err(error) => return self.store_failed(error),
        }
        // With a cache, the first compare-and-set expects the entry last seen (or none,
        // for a key not remembered): a right guess saves the load, a wrong one costs the
        // mismatch that the load would have cost.
        let cache = &self.config.entry_cache;
        if !cache.is_enabled() {
            return ReserveStep::Load;
        }
        self.current = cache.get(&self.key);
        self.decide()
    }

    fn loaded(&mut self, loaded: Result<Option<Entry>, StoreError>) -> ReserveStep {
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(error) => return self.store_failed(error),
        };
        self.config.entry_cache.remember(&self.key, loaded.as_ref());
        self.current = loaded;
        self.confirmed = true;
        self.decide()
    }

    fn clear_answered(
        &mut self,
        cleared: Option<Entry>,
        base: Option<Version>,
        outcome: Result<CasOutcome, StoreError>,
    ) -> ReserveStep {
        match outcome {
            Err(error) => self.store_failed(error),
            Ok(CasOutcome::Applied) => {
                self.config
                    .entry_cache
                    .remember(&self.key, cleared.as_ref());
                self.precondition_failed(base)
            }
            Ok(CasOutcome::Mismatch { current: found }) => self.mismatched(found),
        }
    }

    fn lease_answered(&mut self, outcome: Result<CasOutcome, StoreError>) -> ReserveStep {
        match outcome {
            Ok(CasOutcome::Applied) => {
                tracing::debug!(key = &*self.key, "write reserved");
                ReserveStep::Done(Ok(()))
            }
            Ok(CasOutcome::Mismatch { current: found }) => {
                if let Some(mut guard) = self.lease.take() {
                    guard.on_drop = OnDrop::Nothing;
                }
                self.mismatched(found)
            }
            Err(error) => {
                // The lease may or may not have landed, or land later; the guard's
                // drop undoes it, or fences the entry so that it cannot.
                drop(self.lease.take());
                self.store_failed(error)
            }
        }
    }

    fn mismatched(&mut self, found: Option<Entry>) -> ReserveStep {
        self.config.entry_cache.remember(&self.key, found.as_ref());
        self.current = found;
        self.confirmed = true;
        self.decide()
    }

    fn precondition_failed(&self, base: Option<Version>) -> ReserveStep {
        tracing::info!(key = &*self.key, current = ?base.as_ref().map(Version::etag), "precondition failed (412)");
        ReserveStep::Done(Err(Problem::precondition_failed(
            base,
            &self.pre,
            self.config.validators_on_412,
        )))
    }

    /// Judges `current`: the next store call, or the answer.
    fn decide(&mut self) -> ReserveStep {
        let config = &*self.config;
        if self.attempts >= config.max_reserve_attempts {
            tracing::info!(
                key = &*self.key,
                "write refused: too much contention on the resource (409)"
            );
            return ReserveStep::Done(Err(Problem::write_in_flight(config.retry_after)));
        }
        // A guess that misses is not an attempt: it only replaces the load.
        self.attempts += u32::from(self.confirmed);
        let clock = self
            .clock
            .expect("the clock is read before any entry is judged");
        let local_now = Instant::now();
        let now_millis = clock.millis_at(local_now);
        let verdict = write_base(self.current.as_ref(), now_millis);
        let proceeds = verdict.as_ref().is_some_and(|(base, _)| {
            evaluate(&self.method, &self.pre, base.as_ref()) == Decision::Proceed
        });
        if !proceeds && !self.confirmed {
            // Never refuse on a guess: ask the store, and decide against its answer.
            return ReserveStep::Load;
        }
        let Some((base, takeover)) = verdict else {
            tracing::info!(
                key = &*self.key,
                "write refused: another write is in flight (409)"
            );
            return ReserveStep::Done(Err(Problem::write_in_flight(config.retry_after)));
        };
        if !proceeds {
            if takeover {
                // Record the takeover even though this request fails, so the expired
                // lease is cleared and the 412 carries the real current tag.
                let cleared = base.clone().map(Entry::committed);
                return ReserveStep::Clear { cleared, base };
            }
            return self.precondition_failed(base);
        }

        let expires = now_millis.saturating_add(millis(config.lease));
        let lease = Lease::from_parts(LeaseToken::random(), expires);
        let create = base.is_none()
            || (matches!(self.pre.if_none_match, Some(TagList::Any))
                && base.as_ref().is_some_and(Version::is_seeded));
        let reserved =
            Entry::from_parts(base, Some(lease)).expect("an entry with a lease is never empty");
        // The handler must be done while the store's clock is surely short of the
        // expiry, with a fifth of the lease left over for the settle.
        let lease_end = clock.local_instant_before(expires);
        let settle_room = config.lease / 5;
        let deadline = local_now
            .checked_add(config.handler_timeout)
            .unwrap_or_else(far_future)
            .min(lease_end.checked_sub(settle_room).unwrap_or(lease_end));
        if takeover {
            tracing::debug!(key = &*self.key, "taking over an expired lease");
        }
        self.lease = Some(WriteGuard {
            config: self.config.clone(),
            key: self.key.clone(),
            before: self.current.clone(),
            reserved,
            create,
            deadline,
            // Dropped while the reserve is in flight: undo our lease if it landed.
            on_drop: OnDrop::Unreserve,
            body_failed: None,
        });
        ReserveStep::Lease
    }
}

/// What a read learned from the store before its handler runs.
#[derive(Debug)]
pub(crate) struct ReadStart {
    /// The entry to judge the read by.
    pub(crate) entry: Option<Entry>,
    /// Set when this read is giving the resource its first version (a seed), which it
    /// confirms on a `2xx` and withdraws otherwise. Boxed: first reads are rare, and
    /// every read's state would otherwise carry its size.
    pub(crate) seed: Option<Box<PendingSeed>>,
}

/// Loads `key`'s entry for a read.
///
/// * An expired lease means its writer died with the outcome unknown: the read takes it
///   over as a write would, so that no old tag keeps matching (invariant 3).
/// * A resource with no version (and no write in flight) is *seeded* now, before its
///   handler runs: a body the handler reads afterwards is described by that version
///   until a write replaces it. Seeding after the handler would let a `DELETE` that ran
///   in between leave its pre-delete body labelled with a version that still matches.
///   Until the handler answers, the seed is only a lease with no version, as a create
///   in flight is: a write meanwhile gets `409` and can neither match the seed's tag
///   nor be told it (the resource may not exist). A `2xx` confirms the seed as the
///   version; anything else, or the read being dropped, withdraws it.
pub(crate) async fn load_for_read(
    config: &Config,
    key: &Arc<str>,
) -> Result<ReadStart, StoreError> {
    let store: &dyn AtomicVersionStore = &*config.store;
    let cache = &config.entry_cache;
    let mut current = load_entry(store, config.store_timeout, key).await?;
    cache.remember(key, current.as_ref());
    let mut clock = None;
    for _ in 0..config.max_reserve_attempts {
        let has_lease = current.as_ref().and_then(Entry::write_lease).is_some();
        let now_millis = if has_lease {
            let now = match clock {
                Some(now) => now,
                None => *clock.insert(config.clock.now(store, config.store_timeout).await?),
            };
            now.millis()
        } else {
            0
        };
        let (next, seed) = match &current {
            Some(entry) if entry.expired_lease(now_millis).is_some() => (
                unknown_outcome_base(entry.version()).map(Entry::committed),
                None,
            ),
            Some(entry) if entry.live_lease(now_millis).is_some() || entry.version().is_some() => {
                return Ok(ReadStart {
                    entry: current,
                    seed: None,
                });
            }
            // No version and nobody writing: seed one, as a lease until confirmed.
            _ => {
                let now = match clock {
                    Some(now) => now,
                    None => *clock.insert(config.clock.now(store, config.store_timeout).await?),
                };
                let expires = now.millis().saturating_add(millis(config.lease));
                let pending =
                    Entry::from_parts(None, Some(Lease::from_parts(LeaseToken::random(), expires)));
                let version =
                    Version::new(fresh_etag(), SystemTime::now()).map(|v| v.with_seeded(true));
                (pending, version)
            }
        };
        let outcome = swap_entry(
            store,
            config.store_timeout,
            key,
            current.as_ref(),
            next.as_ref(),
        )
        .await?;
        match outcome {
            CasOutcome::Applied => match (seed, next) {
                (Some(version), Some(pending)) => {
                    tracing::debug!(key = &**key, "version seeded by a read (pending)");
                    cache.forget(key);
                    return Ok(ReadStart {
                        entry: Some(Entry::committed(version.clone())),
                        seed: Some(Box::new(PendingSeed {
                            store: config.store.clone(),
                            cache: cache.clone(),
                            key: key.clone(),
                            pending,
                            before: current,
                            version,
                            store_timeout: config.store_timeout,
                            armed: true,
                        })),
                    });
                }
                (_, next) => {
                    tracing::info!(key = &**key, "expired lease taken over by a read");
                    cache.remember(key, next.as_ref());
                    current = next;
                }
            },
            CasOutcome::Mismatch { current: found } => {
                cache.remember(key, found.as_ref());
                current = found;
            }
        }
    }
    // Still contended: serve the read without validators rather than guess.
    Err(StoreError::unavailable(
        "the entry kept changing while a read tried to settle it (contention)",
    ))
}

/// A read's seed, held as a lease until the read's handler answers: confirmed as the
/// resource's version on a `2xx`, withdrawn otherwise. Dropped unresolved (the read
/// was abandoned), it withdraws itself in a spawned task, so that writes are not kept
/// waiting for the lease to expire.
pub(crate) struct PendingSeed {
    store: Arc<dyn AtomicVersionStore>,
    cache: Arc<EntryCache>,
    key: Arc<str>,
    /// What the store holds while the handler runs: a lease, no version.
    pending: Entry,
    /// What the seed replaced (nothing, or an entry a takeover cleared).
    before: Option<Entry>,
    /// The version a `2xx` confirms.
    version: Version,
    store_timeout: Duration,
    armed: bool,
}

impl PendingSeed {
    /// Confirms the seed after a `2xx` read, as the handler's own strong `ETag` if it set
    /// one: the version that now describes the response, or `None` when the entry
    /// changed meanwhile (the response then goes out without validators).
    pub(crate) async fn confirm(mut self, handler_tag: Option<EntityTag>) -> Option<Version> {
        self.armed = false;
        let version = match handler_tag {
            Some(tag) => Version::new(tag, SystemTime::now())?.with_seeded(true),
            None => self.version.clone(),
        };
        let confirmed = Entry::committed(version.clone());
        let key_name = &*self.key;
        match self.swap(Some(&confirmed)).await {
            Ok(CasOutcome::Applied) => {
                self.cache.remember(&self.key, Some(&confirmed));
                tracing::debug!(key = key_name, "version seeded by a read");
                Some(version)
            }
            Ok(CasOutcome::Mismatch { current }) => {
                self.cache.remember(&self.key, current.as_ref());
                tracing::info!(
                    key = key_name,
                    "a seed was taken over before its read ended"
                );
                None
            }
            Err(error) => {
                self.cache.forget(&self.key);
                tracing::warn!(key = key_name, %error, "could not confirm a seed");
                None
            }
        }
    }

    /// Withdraws the seed after a read whose handler did not answer `2xx`: a version no
    /// one was given must not stay behind for a resource that may not exist.
    pub(crate) async fn withdraw(mut self) {
        self.armed = false;
        let before = self.before.clone();
        let key_name = &*self.key;
        match self.swap(before.as_ref()).await {
            Ok(CasOutcome::Applied) => {
                self.cache.remember(&self.key, before.as_ref());
                tracing::debug!(key = key_name, "seed withdrawn: the read was not 2xx");
            }
            Ok(CasOutcome::Mismatch { current }) => {
                self.cache.remember(&self.key, current.as_ref());
            }
            Err(error) => {
                self.cache.forget(&self.key);
                tracing::warn!(key = key_name, %error, "could not withdraw a seed; its lease will expire");
            }
        }
    }

    async fn swap(&self, new: Option<&Entry>) -> Result<CasOutcome, StoreError> {
        swap_entry(
            self.store.as_ref(),
            self.store_timeout,
            &self.key,
            Some(&self.pending),
            new,
        )
        .await
    }
}

impl std::fmt::Debug for PendingSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSeed")
            .field("key", &self.key)
            .field("pending", &self.pending)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Drop for PendingSeed {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                key = &*self.key,
                "read abandoned outside a Tokio runtime; its seed's lease will expire"
            );
            return;
        };
        let seed = PendingSeed {
            store: self.store.clone(),
            cache: self.cache.clone(),
            key: self.key.clone(),
            pending: self.pending.clone(),
            before: self.before.take(),
            version: self.version.clone(),
            store_timeout: self.store_timeout,
            armed: false,
        };
        runtime.spawn(seed.withdraw());
    }
}

/// A read's store step answered at once, when it can be: no access check to wait for,
/// a store that answers without waiting, and an entry with nothing to settle (a
/// version, no write in flight), which is what [`load_for_read`] would answer. `None`:
/// take the async path (which loads again; for a store in the process that is cheap).
pub(crate) fn read_start_now<C>(
    config: &Config,
    key: &Arc<str>,
    access_check: &Option<C>,
) -> Option<Result<ReadStart, StoreError>> {
    if access_check.is_some() {
        return None;
    }
    let entry = match config.store.load_now(key)? {
        Ok(entry) => entry,
        Err(error) => return Some(Err(error)),
    };
    let settled = entry
        .as_ref()
        .is_some_and(|e| e.version().is_some() && e.write_lease().is_none());
    if !settled {
        return None;
    }
    config.entry_cache.remember(key, entry.as_ref());
    Some(Ok(ReadStart { entry, seed: None }))
}

/// Moves a resource to the handler's own strong tag, when a read handler answers with a
/// tag other than the stored one: the data changed by a path the layer did not see,
/// and the stored tag no longer describes it. Returns the version that now describes
/// the response, `None` when the entry changed meanwhile (the response then goes out
/// without validators).
pub(crate) async fn adopt_handler_tag(
    config: &Config,
    key: &Arc<str>,
    entry: &Entry,
    etag: EntityTag,
) -> Option<Version> {
    let old = entry.version()?;
    let adopted =
        Version::successor(Some(old), etag, SystemTime::now())?.with_seeded(old.is_seeded());
    let new = Entry::committed(adopted.clone());
    let result = swap_entry(
        config.store.as_ref(),
        config.store_timeout,
        key,
        Some(entry),
        Some(&new),
    )
    .await;
    let cache = &config.entry_cache;
    match result {
        Ok(CasOutcome::Applied) => {
            cache.remember(key, Some(&new));
            tracing::info!(
                key = &**key,
                "the handler's own ETag replaced the stored version"
            );
            Some(adopted)
        }
        Ok(CasOutcome::Mismatch { current }) => {
            cache.remember(key, current.as_ref());
            None
        }
        Err(error) => {
            cache.forget(key);
            tracing::warn!(key = &**key, %error, "could not adopt the handler's ETag");
            None
        }
    }
}

/// Whether an `If-Match` asks for specific tags (not `*`).
pub(crate) fn if_match_names_tags(pre: &Preconditions) -> bool {
    matches!(pre.if_match, Some(TagList::Tags(_)))
}

/// The reserve's two drivers on a store that answers some calls at once and not others:
/// the at-once driver must stop before the first call it cannot make, having written
/// nothing, and the awaiting driver must finish from there.
#[cfg(all(test, not(tower_precondition_loom)))]
mod reserve_handoff_tests {
    use std::sync::Arc;

    use http::StatusCode;

    use super::*;
    use crate::{layer::PreconditionLayer, store::MemoryStore};

    const KEY: &str = "/items/1";

    /// A memory store whose loads (`loads_now`) or compare-and-sets (otherwise) are
    /// only answered through their futures.
    struct PartlyAtOnce {
        inner: MemoryStore,
        loads_now: bool,
    }

    #[async_trait::async_trait]
    impl AtomicVersionStore for PartlyAtOnce {
        async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
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
            self.inner.compare_and_set(key, expected, new).await
        }

        fn load_now(&self, key: &str) -> Option<Result<Option<Entry>, StoreError>> {
            self.loads_now.then(|| self.inner.load_now(key)).flatten()
        }

        fn compare_and_set_now(
            &self,
            key: &str,
            expected: Option<&Entry>,
            new: Option<&Entry>,
        ) -> Option<Result<CasOutcome, StoreError>> {
            (!self.loads_now)
                .then(|| self.inner.compare_and_set_now(key, expected, new))
                .flatten()
        }
    }

    fn committed(s: &str) -> Entry {
        Entry::committed(Version::new(EntityTag::strong(s).unwrap(), SystemTime::now()).unwrap())
    }

    fn if_match(s: &str) -> Preconditions {
        Preconditions {
            if_match: Some(TagList::Tags(EntityTag::strong(s).unwrap().into())),
            ..Preconditions::default()
        }
    }

    async fn setup(loads_now: bool) -> (Arc<Config>, Entry) {
        let inner = MemoryStore::new();
        let seeded = committed("v0");
        let outcome = inner.compare_and_set(KEY, None, Some(&seeded)).await;
        assert!(matches!(outcome, Ok(CasOutcome::Applied)));
        let config = PreconditionLayer::new(PartlyAtOnce { inner, loads_now }).into_config();
        // A fresh clock sample, so that the at-once driver gets past the clock.
        config
            .clock
            .now(&*config.store, config.store_timeout)
            .await
            .unwrap();
        (Arc::new(config), seeded)
    }

    fn start(config: &Arc<Config>, pre: Preconditions) -> (Reserve, ReserveStep) {
        let mut reserve = Reserve::new(config.clone(), Arc::from(KEY), Method::PUT, pre);
        let step = reserve.run_now(ReserveStep::ReadClock);
        (reserve, step)
    }

    #[tokio::test]
    async fn a_lease_the_store_cannot_take_at_once_is_awaited_from_where_it_stopped() {
        let (config, seeded) = setup(true).await;
        let (reserve, step) = start(&config, if_match("v0"));
        assert!(matches!(step, ReserveStep::Lease), "stopped at the lease");
        // Nothing written yet.
        let stored = config.store.load(KEY).await.unwrap();
        assert_eq!(stored.as_ref(), Some(&seeded));
        let Ok(guard) = reserve.run(step).await else {
            panic!("reserved");
        };
        let stored = config.store.load(KEY).await.unwrap().unwrap();
        assert!(stored.write_lease().is_some(), "our lease is in place");
        assert_eq!(stored.version(), seeded.version());
        assert_eq!(guard.replacing(), seeded.version());
        let settled = guard.settle(Settlement::Release).await;
        assert!(matches!(settled, Settled::Applied(Some(_))));
        assert_eq!(config.store.load(KEY).await.unwrap(), Some(seeded));
    }

    #[tokio::test]
    async fn a_refusal_needs_no_future_when_the_load_is_answered_at_once() {
        let (config, seeded) = setup(true).await;
        let (_, step) = start(&config, if_match("other"));
        let ReserveStep::Done(Err(problem)) = step else {
            panic!("refused at once");
        };
        let response = problem.into_response::<http_body_util::Empty<bytes::Bytes>>();
        assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
        assert_eq!(config.store.load(KEY).await.unwrap(), Some(seeded));
    }

    #[tokio::test]
    async fn a_load_the_store_cannot_answer_at_once_is_awaited_then_leased_at_once() {
        let (config, seeded) = setup(false).await;
        let (reserve, step) = start(&config, if_match("v0"));
        assert!(matches!(step, ReserveStep::Load), "stopped at the load");
        let Ok(guard) = reserve.run(step).await else {
            panic!("reserved");
        };
        let stored = config.store.load(KEY).await.unwrap().unwrap();
        assert!(stored.write_lease().is_some());
        let settled = guard.settle(Settlement::Commit(None)).await;
        let Settled::Applied(Some(version)) = settled else {
            panic!("committed: {settled:?}");
        };
        assert_ne!(Some(&version), seeded.version());
    }
}

/// The model check of the write protocol over the memory store
/// (`--cfg tower_precondition_loom`, see `src/sync.rs`): `reserve`, `settle`,
/// `load_for_read`, `read_start_now` and a seed's withdrawal as the service calls them, in every
/// interleaving of the store's, the entry cache's and the store clock's locks.
///
/// The memory store answers every call at once, so no future here ever waits and
/// `loom::future::block_on` drives them with no Tokio runtime (and so no timer: a
/// `store_call` that answered on its first poll never arms one). Not covered: the
/// background settle of a guard dropped unsettled (it needs a Tokio runtime to spawn
/// on; without one it leaves the lease to expire, which the takeover models cover),
/// and store errors or timeouts (the memory store has none to race).
#[cfg(all(test, tower_precondition_loom))]
mod loom_tests {
    use std::sync::Arc;

    use http::StatusCode;
    use loom::{future::block_on, thread};

    use super::*;
    use crate::{layer::PreconditionLayer, store::MemoryStore, sync::model};

    const KEY: &str = "/items/1";

    /// A reserve as the response future runs one: at once while the store answers at
    /// once, then awaited from the step where it stops (`future::reserve_write`).
    async fn reserve(
        config: Arc<Config>,
        key: Arc<str>,
        method: Method,
        pre: Preconditions,
    ) -> Result<WriteGuard, Problem> {
        let mut reserve = Reserve::new(config, key, method, pre);
        match reserve.run_now(ReserveStep::ReadClock) {
            ReserveStep::Done(result) => result.map(|()| reserve.into_guard()),
            step => reserve.run(step).await,
        }
    }

    fn tag(s: &str) -> EntityTag {
        EntityTag::strong(s).unwrap()
    }

    fn committed(s: &str) -> Entry {
        Entry::committed(Version::new(tag(s), SystemTime::now()).unwrap())
    }

    /// A layer's configuration over a fresh one-shard memory store. `lease` is set
    /// directly, past the builder's 10 ms floor: a zero lease has expired by the time
    /// anyone looks at it, which is how a stalled writer is modelled without a clock
    /// the test can move.
    fn config(lease: Duration, entry_cache: usize) -> Config {
        let store = MemoryStore::with_shards_and_capacity(1, 64);
        let mut config = PreconditionLayer::new(store)
            .entry_cache(entry_cache)
            .into_config();
        config.lease = lease;
        config
    }

    fn seed(config: &Config, s: &str) -> Entry {
        let entry = committed(s);
        let outcome = config.store.compare_and_set_now(KEY, None, Some(&entry));
        assert!(matches!(outcome, Some(Ok(CasOutcome::Applied))));
        entry
    }

    fn stored(config: &Config) -> Option<Entry> {
        config.store.load_now(KEY).unwrap().unwrap()
    }

    fn key() -> Arc<str> {
        Arc::from(KEY)
    }

    fn if_match(s: &str) -> Preconditions {
        Preconditions {
            if_match: Some(TagList::Tags(tag(s).into())),
            ..Preconditions::default()
        }
    }

    fn etag_of(version: Option<&Version>) -> Option<&str> {
        version.map(|v| v.etag().opaque())
    }

    /// How one write ended.
    #[derive(Debug)]
    enum Write {
        /// Reserved (replacing this version) and settled.
        Ran(Option<Version>, Settled),
        /// Refused before the handler: the status, and the version a 412 carried.
        Refused(StatusCode, Option<Version>),
    }

    /// A whole write: reserve, then (the handler answered 2xx) commit `commit_tag`.
    fn write(config: &Arc<Config>, pre: Preconditions, commit_tag: &str) -> Write {
        let commit = Settlement::Commit(Some(tag(commit_tag)));
        block_on(async {
            match reserve(config.clone(), key(), Method::PUT, pre).await {
                Ok(mut guard) => {
                    guard.handler_started();
                    let replacing = guard.reservation().replacing().cloned();
                    Write::Ran(replacing, guard.settle(commit).await)
                }
                Err(problem) => Write::Refused(problem.status(), problem.current().cloned()),
            }
        })
    }

    /// `writers` writes with `If-Match: "v0"` on a resource at `"v0"`, and with
    /// `reader` a read beside them. Exactly one write runs, and it settles (a live
    /// lease is never taken over); each other one gets `409` (the winner's lease was
    /// there) or `412` naming the winner's version; the read sees `"v0"` (with or
    /// without the winner's lease) or the winner's version, and changes nothing.
    fn if_match_race(
        name: &str,
        writers: usize,
        reader: bool,
        entry_cache: usize,
        preemptions: Option<usize>,
    ) {
        model::check(name, preemptions, move || {
            let config = Arc::new(config(Duration::from_secs(30), entry_cache));
            let v0 = seed(&config, "v0");
            // A cache that remembers `"v0"`: each reserve starts from that guess.
            config.entry_cache.remember(&key(), Some(&v0));
            let handles: Vec<_> = (0..writers)
                .map(|i| {
                    let config = config.clone();
                    thread::spawn(move || write(&config, if_match("v0"), &format!("w{i}")))
                })
                .collect();
            let read = reader.then(|| {
                let config = config.clone();
                thread::spawn(move || {
                    let fast = read_start_now::<()>(&config, &key(), &None)
                        .map(|start| start.unwrap().entry);
                    let start = block_on(load_for_read(&config, &key())).unwrap();
                    (fast, start)
                })
            });
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let winners: Vec<_> = results
                .iter()
                .enumerate()
                .filter_map(|(i, result)| match result {
                    Write::Ran(replacing, settled) => Some((i, replacing, settled)),
                    Write::Refused(..) => None,
                })
                .collect();
            assert_eq!(winners.len(), 1, "exactly one write runs: {results:?}");
            let (winner, replacing, settled) = winners[0];
            let winner_tag = format!("w{winner}");
            assert_eq!(replacing.as_ref(), v0.version());
            let Settled::Applied(Some(committed)) = settled else {
                panic!("the winner's settle must apply: {settled:?}");
            };
            assert_eq!(committed.etag().opaque(), winner_tag);
            for result in &results {
                if let Write::Refused(status, current) = result {
                    match *status {
                        StatusCode::CONFLICT => {}
                        StatusCode::PRECONDITION_FAILED => {
                            assert_eq!(etag_of(current.as_ref()), Some(&*winner_tag));
                        }
                        other => panic!("a loser got {other}"),
                    }
                }
            }
            if let Some(read) = read {
                let (fast, start) = read.join().unwrap();
                assert!(start.seed.is_none(), "a versioned resource is never seeded");
                let seen = [fast, Some(start.entry)];
                for entry in seen.iter().flatten() {
                    let entry = entry.as_ref().expect("a read never finds the entry gone");
                    let version = etag_of(entry.version());
                    match entry.lease() {
                        // The winner's lease, on the version it replaces.
                        Some(lease) => {
                            assert!(!lease.is_released() && version == Some("v0"), "{entry:?}");
                        }
                        None => assert!(
                            version == Some("v0") || version == Some(&*winner_tag),
                            "{entry:?}"
                        ),
                    }
                }
            }
            let last = stored(&config).expect("the resource keeps a version");
            assert_eq!(last.lease(), None, "no lease outlives its write");
            assert_eq!(
                etag_of(last.version()),
                Some(&*winner_tag),
                "the read changed it"
            );
        });
    }

    #[test]
    fn two_writers_if_match() {
        if_match_race("protocol: 2 writers", 2, false, 0, None);
    }

    #[test]
    fn three_writers_if_match() {
        if_match_race("protocol: 3 writers", 3, false, 0, Some(4));
    }

    #[test]
    fn two_writers_and_a_reader() {
        if_match_race("protocol: 2 writers + reader", 2, true, 0, None);
    }

    #[test]
    fn three_writers_and_a_reader() {
        if_match_race("protocol: 3 writers + reader", 3, true, 0, Some(3));
    }

    /// As above, with the entry cache a store across a connection gets: each reserve's
    /// first compare-and-set expects the remembered entry instead of a load.
    #[test]
    fn two_writers_from_the_entry_cache() {
        if_match_race("protocol: 2 writers, entry cache", 2, false, 64, None);
    }

    /// Writer A's lease has expired (it stalled) when writer B reserves and a read
    /// comes by; A then settles. Whoever takes A's lease over first, A's late settle
    /// must not apply, and no old tag (`"v0"`, or A's own) may survive a takeover.
    fn takeover(name: &str, reader: bool, preemptions: Option<usize>) {
        model::check(name, preemptions, move || {
            let stalled = Arc::new(config(Duration::ZERO, 0));
            let mut live = (*stalled).clone();
            live.lease = Duration::from_secs(30);
            let live = Arc::new(live);
            seed(&stalled, "v0");
            let mut guard_a =
                block_on(reserve(stalled.clone(), key(), Method::PUT, if_match("v0")))
                    .unwrap_or_else(|_| panic!("nothing holds the resource yet"));
            guard_a.handler_started();
            let a_lease = *guard_a.reserved.lease().unwrap();
            let a =
                thread::spawn(move || block_on(guard_a.settle(Settlement::Commit(Some(tag("a"))))));
            let b = {
                let live = live.clone();
                thread::spawn(move || write(&live, Preconditions::default(), "b"))
            };
            let read = reader.then(|| {
                let live = live.clone();
                thread::spawn(move || block_on(load_for_read(&live, &key())).unwrap())
            });
            let a = a.join().unwrap();
            let Write::Ran(b_replacing, b_settled) = b.join().unwrap() else {
                panic!("an expired lease never refuses a write");
            };
            let Settled::Applied(Some(b_version)) = b_settled else {
                panic!("B's live lease was taken over: {b_settled:?}");
            };
            assert_eq!(b_version.etag().opaque(), "b");
            let b_replaced = etag_of(b_replacing.as_ref());
            assert_ne!(
                b_replaced,
                Some("v0"),
                "B started from a tag A may have outdated"
            );
            let a_applied = match &a {
                Settled::Applied(version) => {
                    assert_eq!(etag_of(version.as_ref()), Some("a"));
                    true
                }
                Settled::LeaseLost => false,
                Settled::Unknown => panic!("the memory store always answers"),
            };
            // A applied only if it settled before anyone took over, and then B
            // replaced A's version; otherwise B replaced a fresh one, not A's.
            assert_eq!(
                a_applied,
                b_replaced == Some("a"),
                "A: {a:?}, B replaced {b_replaced:?}"
            );
            if let Some(read) = read {
                let start = read.join().unwrap();
                let entry = start.entry.expect("a read never finds the entry gone");
                let seen = etag_of(entry.version());
                assert_ne!(
                    seen,
                    Some("v0"),
                    "a read served a tag a stalled write may have outdated"
                );
                assert_ne!(
                    entry.lease(),
                    Some(&a_lease),
                    "a read passed over an expired lease"
                );
                assert!(start.seed.is_none());
            }
            let last = stored(&live).expect("the resource keeps a version");
            assert_eq!(last.lease(), None);
            let last_tag = etag_of(last.version()).unwrap();
            // A's lost settle may give B's version a fresh successor (its handler wrote
            // after B's), never put A's own back.
            assert!(
                last_tag == "b" || (!a_applied && last_tag != "a" && last_tag != "v0"),
                "{last:?}"
            );
        });
    }

    #[test]
    fn takeover_of_an_expired_lease() {
        takeover("protocol: takeover", false, None);
    }

    #[test]
    fn takeover_with_a_reader() {
        takeover("protocol: takeover + reader", true, None);
    }

    /// A read seeds a version for a resource that had none while a create
    /// (`If-None-Match: *`) runs; the read's handler then fails, so it withdraws its
    /// pending seed. A seed or its withdrawal never removes the write's lease or its
    /// version (the create may meet the pending seed and get `409`).
    #[test]
    fn seeding_read_beside_a_create() {
        model::check("protocol: seed + create", None, || {
            let config = Arc::new(config(Duration::from_secs(30), 0));
            let create = Preconditions {
                if_none_match: Some(TagList::Any),
                ..Preconditions::default()
            };
            let writer = {
                let config = config.clone();
                thread::spawn(move || write(&config, create, "c"))
            };
            let reader = {
                let config = config.clone();
                thread::spawn(move || {
                    block_on(async {
                        let mut start = load_for_read(&config, &key()).await.unwrap();
                        let seeded = start.seed.is_some();
                        if let Some(seed) = start.seed.take() {
                            seed.withdraw().await;
                        }
                        (start, seeded)
                    })
                })
            };
            let written = writer.join().unwrap();
            let (start, seeded) = reader.join().unwrap();
            if let Some(entry) = &start.entry {
                if entry.lease().is_some() {
                    assert!(!seeded, "a seed over a lease: {entry:?}");
                }
            }
            let last = stored(&config);
            match written {
                Write::Ran(_, Settled::Applied(Some(version))) => {
                    assert_eq!(version.etag().opaque(), "c");
                    assert_eq!(
                        last,
                        Some(Entry::committed(version)),
                        "the read undid a write"
                    );
                }
                Write::Ran(_, settled) => panic!("the create's lease was lost: {settled:?}"),
                Write::Refused(status, _) => {
                    assert!(matches!(
                        status,
                        StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED
                    ));
                    assert_eq!(last, None, "a failed read left its seed behind");
                }
            }
        });
    }
}
