//! Fencing: a handler's own database write checks that its write's lease is still
//! held (see [`Fence`]).

use std::{fmt, sync::Arc};

use super::{LeaseToken, StoreError};

/// The lease a reserved write holds, as its own database write checks it: the resource
/// key and the lease's token. From [`Reservation::fence`](crate::Reservation::fence).
///
/// The store mode's lease keeps a second writer out only while the first one's handler
/// runs. A statement the handler already sent can outlive the handler (a request the
/// client dropped, a handler cancelled at its deadline, a lease taken over by a process
/// whose clock runs ahead) and land after the layer settled the write, over a newer
/// writer's data. Where the data and the versions live in one database, the handler
/// closes that gap: it checks its fence inside the transaction that writes its data
/// ([`SqliteStore::check_fence`](super::SqliteStore::check_fence),
/// [`PostgresStore::check_fence`](super::PostgresStore::check_fence)). The check reads
/// the versions row in that transaction and keeps it from changing until the
/// transaction ends, so the data write commits only while the lease is still there,
/// and nothing that replaces the lease (a settle, the fresh version of an abandoned
/// write, another writer's takeover) can come between the check and the commit.
///
/// Where the data lives elsewhere (Redis keys, another database, a file), there is no
/// transaction to check the fence in: keep handlers that honour cancellation, or use the
/// [row-version](crate::row_version) or [transactional](crate::transactional) mode.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Fence {
    key: Arc<str>,
    token: LeaseToken,
}

impl Fence {
    /// A fence for the lease `token` on `key` (for store implementations and tests; a
    /// handler gets its fence from its [`Reservation`](crate::Reservation)).
    pub fn new(key: impl Into<Arc<str>>, token: LeaseToken) -> Self {
        Self {
            key: key.into(),
            token,
        }
    }

    /// The resource key, as the store keeps it.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease's token.
    pub fn token(&self) -> LeaseToken {
        self.token
    }
}

/// Why a fenced write must not go ahead.
#[derive(Debug)]
#[non_exhaustive]
pub enum FenceError {
    /// The lease is no longer held: the write was settled, abandoned or taken over
    /// while its handler still ran. Roll back and answer `503`; the layer has given
    /// (or gives) the resource a fresh version.
    LeaseLost,
    /// The check itself failed (a database error): roll back, `503`.
    Store(StoreError),
}

impl Fence {
    /// The verdict of a fence check that found the lease (`held`) or did not.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn judge(&self, held: bool) -> Result<(), FenceError> {
        if held {
            Ok(())
        } else {
            tracing::warn!(key = self.key(), "lease lost before the handler's write");
            Err(FenceError::LeaseLost)
        }
    }
}

impl FenceError {
    /// Whether the lease was lost (rather than the check failing).
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Self::LeaseLost)
    }
}

impl fmt::Display for FenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LeaseLost => f.write_str("the write's lease is no longer held"),
            Self::Store(error) => write!(f, "checking the write's lease: {error}"),
        }
    }
}

impl std::error::Error for FenceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::LeaseLost => None,
            Self::Store(error) => Some(error),
        }
    }
}

impl From<StoreError> for FenceError {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}
