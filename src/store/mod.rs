//! The version store: one atomic compare-and-set of a whole [`Entry`].
//!
//! A backend implements [`AtomicVersionStore`]: [`load`](AtomicVersionStore::load) and
//! [`compare_and_set`](AtomicVersionStore::compare_and_set). The layer builds every step
//! of the write protocol (reserve, commit, release, lease takeover) on that one
//! primitive, so a backend needs no HTTP knowledge.
//!
//! # The contract
//!
//! `compare_and_set(key, expected, new)`:
//!
//! * replaces the stored entry by `new` (or removes it when `new` is `None`) if and only
//!   if the stored entry equals `expected` exactly (or is absent when `expected` is
//!   `None`), as one atomic step with respect to every other call on the same key;
//! * on a mismatch, answers [`CasOutcome::Mismatch`] with the entry it actually found, so
//!   the caller never needs a second round trip to learn why;
//! * is replay-safe: if the stored entry already equals `new`, it answers
//!   [`CasOutcome::Applied`] (a client library that re-sent a command that had already
//!   run must not turn a success into a conflict). Entries the layer writes carry
//!   unique tokens and tags, so "already equals `new`" can only mean "this write ran".
//!
//! The `testing` module (feature `testing`) runs this contract against any store.
//!
//! # Implementing a store
//!
//! ```
//! use std::{collections::HashMap, sync::Mutex};
//! use tower_precondition::store::{AtomicVersionStore, CasOutcome, Entry, StoreError};
//!
//! #[derive(Default)]
//! struct MyStore(Mutex<HashMap<String, Entry>>);
//!
//! #[async_trait::async_trait]
//! impl AtomicVersionStore for MyStore {
//!     async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
//!         let map = self.0.lock().map_err(|_| StoreError::unavailable("lock poisoned"))?;
//!         Ok(map.get(key).cloned())
//!     }
//!
//!     async fn compare_and_set(
//!         &self,
//!         key: &str,
//!         expected: Option<&Entry>,
//!         new: Option<&Entry>,
//!     ) -> Result<CasOutcome, StoreError> {
//!         let mut map = self.0.lock().map_err(|_| StoreError::unavailable("lock poisoned"))?;
//!         let current = map.get(key);
//!         if current == expected {
//!             match new {
//!                 Some(entry) => map.insert(key.to_owned(), entry.clone()),
//!                 None => map.remove(key),
//!             };
//!             return Ok(CasOutcome::Applied);
//!         }
//!         Ok(CasOutcome::mismatch_or_replay(current.cloned(), new))
//!     }
//!
//!     async fn clock_millis(&self) -> Result<u64, StoreError> {
//!         // One process: any monotonic clock will do.
//!         static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
//!         let origin = *ORIGIN.get_or_init(std::time::Instant::now);
//!         Ok(1 + origin.elapsed().as_millis() as u64)
//!     }
//! }
//! ```

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::etag::EntityTag;

mod fence;
pub use fence::{Fence, FenceError};

#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "memory")]
pub use memory::MemoryStore;

#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "postgres")]
pub use self::postgres::PostgresStore;

#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "sqlite")]
pub use self::sqlite::SqliteStore;

#[cfg(feature = "testing")]
pub mod testing;

/// A committed version of a resource: a strong entity tag and a last-modified time.
///
/// `last_modified` has one-second resolution, as HTTP dates do. When two versions are
/// committed within the same second (or a clock steps back), the second one is marked
/// [`last_modified_ambiguous`](Self::last_modified_ambiguous): its date cannot tell it
/// apart from its predecessor, so date-based preconditions (`If-Unmodified-Since`,
/// `If-Modified-Since`) that name that second are evaluated conservatively.
///
/// A version is [seeded](Self::is_seeded) when a read gave it to a resource that had
/// none: it names the representation that read served, but proves nothing about
/// whether the resource exists (a `200` fallback page is a `200` too), so
/// `If-None-Match: *` on a write is left to the handler's own conditional insert.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Version {
    etag: EntityTag,
    last_modified_secs: u64,
    last_modified_ambiguous: bool,
    seeded: bool,
}

impl Version {
    /// A version with the given strong tag, last modified at `last_modified`
    /// (truncated to whole seconds).
    ///
    /// Returns `None` if `etag` is weak: a stored version must support strong comparison.
    pub fn new(etag: EntityTag, last_modified: SystemTime) -> Option<Self> {
        Self::from_parts(etag, unix_secs(last_modified), false)
    }

    /// Rebuilds a version from its stored parts (for store implementations).
    ///
    /// Returns `None` if `etag` is weak.
    pub fn from_parts(etag: EntityTag, last_modified_secs: u64, ambiguous: bool) -> Option<Self> {
        if etag.is_weak() {
            return None;
        }
        Some(Self {
            etag,
            last_modified_secs,
            last_modified_ambiguous: ambiguous,
            seeded: false,
        })
    }

    /// This version, marked as [seeded](Self::is_seeded) (or not).
    #[must_use]
    pub fn with_seeded(mut self, seeded: bool) -> Self {
        self.seeded = seeded;
        self
    }

    /// Whether a read, not a write, gave this version: the layer knows the tag of what
    /// was served, not that the resource exists.
    pub fn is_seeded(&self) -> bool {
        self.seeded
    }

    /// The version that replaces `previous` at time `now`, with tag `etag`.
    ///
    /// The date never goes backwards, and a version committed in the same second as
    /// its predecessor is marked ambiguous, so that a stale `If-Unmodified-Since` can
    /// never pass (DESIGN.md: two writes within one second).
    pub fn successor(previous: Option<&Version>, etag: EntityTag, now: SystemTime) -> Option<Self> {
        let now = unix_secs(now);
        let (secs, ambiguous) = match previous {
            Some(prev) if prev.last_modified_secs >= now => (prev.last_modified_secs, true),
            _ => (now, false),
        };
        Self::from_parts(etag, secs, ambiguous)
    }

    /// The strong entity tag of this version.
    pub fn etag(&self) -> &EntityTag {
        &self.etag
    }

    /// The last-modified time, whole seconds.
    ///
    /// Saturates at 9999-12-31T23:59:59Z, the last second an HTTP-date can name: a store
    /// may hand back any number, and rendering `Last-Modified` must not panic. Comparisons
    /// use the exact [`last_modified_secs`](Self::last_modified_secs), so a client that
    /// echoes the saturated date gets `412` / `200`, never a wrong pass.
    pub fn last_modified(&self) -> SystemTime {
        // Found by the `evaluate` fuzz target: httpdate panics past year 9999, and
        // `SystemTime` addition panics past its own range.
        const MAX_HTTP_DATE_SECS: u64 = 253_402_300_799;
        UNIX_EPOCH + Duration::from_secs(self.last_modified_secs.min(MAX_HTTP_DATE_SECS))
    }

    /// The last-modified time as seconds since the Unix epoch.
    pub fn last_modified_secs(&self) -> u64 {
        self.last_modified_secs
    }

    /// Whether another version was committed within the same last-modified second.
    pub fn last_modified_ambiguous(&self) -> bool {
        self.last_modified_ambiguous
    }
}

/// A random 128-bit token that identifies one write's reservation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(u128);

impl LeaseToken {
    /// A fresh random token.
    pub fn random() -> Self {
        Self(crate::fresh::random_u128())
    }

    /// The token as a number (for store implementations).
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Rebuilds a token from its number (for store implementations).
    pub fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// Parses the 32-digit lowercase hex form written by `Display`.
    pub fn parse_hex(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Self)
    }

    /// The token's 32 lowercase hex digits, as `Display` writes them, built on the
    /// stack: a store sends it with every reserve and settle.
    pub(crate) fn to_hex(self) -> [u8; 32] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0; 32];
        for (i, digit) in hex.iter_mut().enumerate() {
            *digit = DIGITS[((self.0 >> (4 * (31 - i))) & 0xf) as usize];
        }
        hex
    }
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hex digits are ASCII, so this never falls back to the empty string.
        f.write_str(std::str::from_utf8(&self.to_hex()).unwrap_or_default())
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({self})")
    }
}

/// A write in flight: who holds the resource and until when, on the store's clock.
///
/// Expiry is in milliseconds of [`AtomicVersionStore::clock_millis`]: every instance of
/// the app judges a lease by the same clock, the store's, never by its own host's.
///
/// A lease whose expiry is `0` is a *release marker*: no write is in flight, but the
/// entry differs from every entry that was stored before it, so a compare-and-set that
/// was sent earlier and lands late (a reserve the layer gave up waiting for) cannot
/// apply over it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Lease {
    token: LeaseToken,
    expires_at_millis: u64,
}

impl Lease {
    /// A lease with `token` that expires at `expires_at_millis` on the store's clock.
    pub fn from_parts(token: LeaseToken, expires_at_millis: u64) -> Self {
        Self {
            token,
            expires_at_millis,
        }
    }

    /// A release marker with `token` (see the type's docs).
    pub fn released(token: LeaseToken) -> Self {
        Self::from_parts(token, 0)
    }

    /// Whether this is a release marker rather than a write in flight.
    pub fn is_released(&self) -> bool {
        self.expires_at_millis == 0
    }

    /// The token of the write that holds this lease.
    pub fn token(&self) -> LeaseToken {
        self.token
    }

    /// When the lease expires, in milliseconds on the store's clock.
    pub fn expires_at_millis(&self) -> u64 {
        self.expires_at_millis
    }

    /// Whether a write still holds the resource at `now_millis` on the store's clock.
    pub fn is_live_at(&self, now_millis: u64) -> bool {
        !self.is_released() && now_millis < self.expires_at_millis
    }
}

/// What a store keeps for one resource key: the committed version and, while a write
/// is in flight, its lease.
///
/// At least one of the two is present: an entry with neither is represented by the
/// absence of an entry.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Entry {
    version: Option<Version>,
    lease: Option<Lease>,
}

impl Entry {
    /// An entry with a committed version and no write in flight.
    pub fn committed(version: Version) -> Self {
        Self {
            version: Some(version),
            lease: None,
        }
    }

    /// Builds an entry from its parts; `None` if both are absent.
    pub fn from_parts(version: Option<Version>, lease: Option<Lease>) -> Option<Self> {
        if version.is_none() && lease.is_none() {
            return None;
        }
        Some(Self { version, lease })
    }

    /// The last committed version, if the resource has one (a lease on a resource that
    /// is being created has none).
    pub fn version(&self) -> Option<&Version> {
        self.version.as_ref()
    }

    /// The lease of the write in flight, if any (or a release marker).
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// The lease of a write, live or expired: any lease but a release marker.
    pub(crate) fn write_lease(&self) -> Option<&Lease> {
        self.lease.as_ref().filter(|l| !l.is_released())
    }

    /// The lease of a write that still holds the resource at `now_millis` (store clock).
    pub fn live_lease(&self, now_millis: u64) -> Option<&Lease> {
        self.lease.as_ref().filter(|l| l.is_live_at(now_millis))
    }

    /// A lease that is neither live nor a release marker: its writer died or stalled
    /// with the outcome unknown.
    pub fn expired_lease(&self, now_millis: u64) -> Option<&Lease> {
        self.write_lease().filter(|l| !l.is_live_at(now_millis))
    }

    /// The version, taken out of an entry that is no longer needed (saves a clone).
    pub(crate) fn into_version(self) -> Option<Version> {
        self.version
    }
}

/// The answer of [`AtomicVersionStore::compare_and_set`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum CasOutcome {
    /// The stored entry was `expected` and is now `new` (or already was `new`).
    Applied,
    /// The stored entry was not `expected`; this is what was found.
    Mismatch {
        /// The entry the store holds, `None` if the key has no entry.
        current: Option<Entry>,
    },
}

impl CasOutcome {
    /// The outcome for a store that found `current` instead of `expected`:
    /// [`Applied`](Self::Applied) if `current` is already `new` (a replay),
    /// otherwise [`Mismatch`](Self::Mismatch).
    pub fn mismatch_or_replay(current: Option<Entry>, new: Option<&Entry>) -> Self {
        if current.as_ref() == new {
            CasOutcome::Applied
        } else {
            CasOutcome::Mismatch { current }
        }
    }
}

/// What kind of failure a [`StoreError`] is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store could not be reached or refused the operation (connection, I/O, pool).
    Unavailable,
    /// The store did not answer in time.
    Timeout,
    /// The store answered with data that is not a valid entry.
    Corrupt,
}

/// An error from a version store. The layer answers `503` with `Retry-After` for any
/// of them on a write (fail closed).
pub struct StoreError {
    kind: StoreErrorKind,
    message: Box<str>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl StoreError {
    /// A store that could not be reached.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Unavailable, message)
    }

    /// A store that did not answer in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Timeout, message)
    }

    /// A store that answered garbage.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Corrupt, message)
    }

    /// An error of `kind` with a message.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into().into_boxed_str(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            StoreErrorKind::Unavailable => "version store unavailable",
            StoreErrorKind::Timeout => "version store timed out",
            StoreErrorKind::Corrupt => "version store returned an invalid entry",
        };
        write!(f, "{kind}: {}", self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A store of resource versions with one atomic compare-and-set.
///
/// See the [module docs](self) for the contract and an example implementation.
#[async_trait::async_trait]
pub trait AtomicVersionStore: Send + Sync + 'static {
    /// The entry of `key`, `None` if it has none.
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError>;

    /// The store's clock in milliseconds, from any fixed origin: it must never go
    /// backwards, and every process that shares the store must read the same clock
    /// (Redis `TIME`, Postgres `clock_timestamp()`, a monotonic clock for a store in one
    /// process). Leases are stamped and judged by it, so a host whose clock is off or
    /// steps cannot take over a live lease. The layer samples it now and then and
    /// extrapolates with its own monotonic clock, erring on the safe side.
    async fn clock_millis(&self) -> Result<u64, StoreError>;

    /// Atomically replaces `expected` by `new` (see the module docs for the contract).
    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError>;

    /// Whether a call never leaves the process (the memory store): `false`, the
    /// default, for any store reached over a connection.
    ///
    /// The layer uses it only to choose a default. For a store across a connection it
    /// remembers the entries it last saw (a bounded cache, see
    /// [`PreconditionLayer::entry_cache`](crate::PreconditionLayer::entry_cache)) and
    /// starts a write's compare-and-set from that guess instead of loading first: two
    /// round trips per write instead of three. For a store in the process a load costs
    /// less than the cache would.
    fn is_in_process(&self) -> bool {
        false
    }

    /// [`load`](Self::load) answered without waiting, for a store that can (one in the
    /// process): `None`, the default, means "await `load`". When it answers, it must
    /// answer exactly what `load` would. The layer asks it first and so saves the boxed
    /// future of the async call (an allocation per store call).
    fn load_now(&self, key: &str) -> Option<Result<Option<Entry>, StoreError>> {
        let _ = key;
        None
    }

    /// [`compare_and_set`](Self::compare_and_set) answered without waiting, for a
    /// store that can; `None`, the default, means "await `compare_and_set`". When it
    /// answers, it must have done exactly what `compare_and_set` would (one atomic
    /// step, the same contract).
    fn compare_and_set_now(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Option<Result<CasOutcome, StoreError>> {
        let _ = (key, expected, new);
        None
    }
}

#[async_trait::async_trait]
impl<T: AtomicVersionStore + ?Sized> AtomicVersionStore for Arc<T> {
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        (**self).load(key).await
    }

    async fn clock_millis(&self) -> Result<u64, StoreError> {
        (**self).clock_millis().await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        (**self).compare_and_set(key, expected, new).await
    }

    fn is_in_process(&self) -> bool {
        (**self).is_in_process()
    }

    fn load_now(&self, key: &str) -> Option<Result<Option<Entry>, StoreError>> {
        (**self).load_now(key)
    }

    fn compare_and_set_now(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Option<Result<CasOutcome, StoreError>> {
        (**self).compare_and_set_now(key, expected, new)
    }
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(s: &str) -> EntityTag {
        EntityTag::strong(s).unwrap()
    }

    #[test]
    fn weak_tags_cannot_be_versions() {
        assert!(Version::new(EntityTag::weak("w").unwrap(), SystemTime::now()).is_none());
    }

    #[test]
    fn successor_in_the_same_second_is_ambiguous() {
        let t0 = UNIX_EPOCH + Duration::from_millis(1_700_000_000_100);
        let v1 = Version::new(tag("1"), t0).unwrap();
        let v2 = Version::successor(Some(&v1), tag("2"), t0 + Duration::from_millis(500)).unwrap();
        assert_eq!(v2.last_modified_secs(), v1.last_modified_secs());
        assert!(v2.last_modified_ambiguous());
        let v3 = Version::successor(Some(&v2), tag("3"), t0 + Duration::from_secs(1)).unwrap();
        assert!(!v3.last_modified_ambiguous());
        assert_eq!(v3.last_modified_secs(), v1.last_modified_secs() + 1);
    }

    #[test]
    fn successor_never_goes_back_in_time() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_010);
        let v1 = Version::new(tag("1"), t0).unwrap();
        let v2 = Version::successor(Some(&v1), tag("2"), t0 - Duration::from_secs(5)).unwrap();
        assert_eq!(v2.last_modified_secs(), v1.last_modified_secs());
        assert!(v2.last_modified_ambiguous());
    }

    #[test]
    fn far_future_last_modified_renders_without_panic() {
        // Regression (fuzz/evaluate): a stored date past year 9999 made rendering
        // `Last-Modified` panic in httpdate, and one past i64 seconds panicked here.
        for secs in [253_402_300_800, 863_976_237_279, u64::MAX] {
            let v = Version::from_parts(tag("far"), secs, false).unwrap();
            let date = crate::evaluate::http_date(v.last_modified());
            assert_eq!(date, "Fri, 31 Dec 9999 23:59:59 GMT");
            assert_eq!(
                v.last_modified_secs(),
                secs,
                "comparisons keep the exact value"
            );
        }
        let v = Version::from_parts(tag("now"), 784_111_777, false).unwrap();
        assert_eq!(
            crate::evaluate::http_date(v.last_modified()),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
    }

    #[test]
    fn lease_token_hex_round_trip() {
        let t = LeaseToken::random();
        assert_eq!(LeaseToken::parse_hex(&t.to_string()), Some(t));
        assert_eq!(LeaseToken::parse_hex("xyz"), None);
        for token in [
            t,
            LeaseToken(0),
            LeaseToken(u128::MAX),
            LeaseToken(0xab << 120),
        ] {
            assert_eq!(token.to_hex(), format!("{:032x}", token.0).as_bytes());
            assert_eq!(token.to_string(), format!("{:032x}", token.0));
        }
    }

    #[test]
    fn replay_is_applied() {
        let e = Entry::committed(Version::new(tag("a"), SystemTime::now()).unwrap());
        assert_eq!(
            CasOutcome::mismatch_or_replay(Some(e.clone()), Some(&e)),
            CasOutcome::Applied
        );
        assert_eq!(
            CasOutcome::mismatch_or_replay(None, None),
            CasOutcome::Applied
        );
        assert_eq!(
            CasOutcome::mismatch_or_replay(Some(e.clone()), None),
            CasOutcome::Mismatch { current: Some(e) }
        );
    }

    #[test]
    fn store_error_display_and_source() {
        let io = std::io::Error::other("boom");
        let e = StoreError::unavailable("connect").with_source(io);
        assert_eq!(e.kind(), StoreErrorKind::Unavailable);
        assert_eq!(e.to_string(), "version store unavailable: connect: boom");
        assert!(std::error::Error::source(&e).is_some());
    }
}
