//! Multi-key leases: one guard, one token, every key
//! (`fence.lock_acquire_all`), and what a guard renews and releases.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::backend::Backend;
use crate::lease::Target;
use crate::{Error, Lease, LeaseOptions};

/// The keys a guard holds under its token: one, or every key of a
/// multi-key lease (distinct, in byte order, as the server granted them).
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    keys: Arc<[String]>,
    all: bool,
    /// A shared (reader) lease on its one key.
    pub(crate) shared: bool,
}

impl Keys {
    pub(crate) fn one(key: String) -> Keys {
        Keys {
            keys: Arc::from(vec![key]),
            all: false,
            shared: false,
        }
    }

    pub(crate) fn shared(key: String) -> Keys {
        Keys {
            shared: true,
            ..Keys::one(key)
        }
    }

    pub(crate) fn all(keys: Vec<String>) -> Keys {
        Keys {
            keys: Arc::from(keys),
            all: true,
            shared: false,
        }
    }

    /// The first key: the lease's key in logs and metrics.
    pub(crate) fn first(&self) -> &str {
        self.keys.first().map_or("", String::as_str)
    }

    pub(crate) fn as_slice(&self) -> &[String] {
        &self.keys
    }

    /// Renew every key: the earliest new expiry, `None` if any of them was
    /// no longer live (the lease is lost then, even if others renewed).
    pub(crate) async fn renew<B: Backend>(
        &self,
        backend: &B,
        token: i64,
        ttl: Duration,
    ) -> Result<Option<SystemTime>, Error> {
        if self.all {
            backend.renew_all(&self.keys, token, ttl).await
        } else {
            backend.renew(self.first(), token, ttl).await
        }
    }

    /// Release every key: true if all of them were live.
    pub(crate) async fn release<B: Backend>(&self, backend: &B, token: i64) -> Result<bool, Error> {
        if self.all {
            backend.release_all(&self.keys, token).await
        } else {
            backend.release(self.first(), token).await
        }
    }
}

impl<B: Backend> Lease<B> {
    /// Every one of `keys` or none, in one grant with one token (a
    /// multi-key lease): try once, `None` if any key is held (or, in
    /// preload mode, has waiters queued). Duplicates count once; the server
    /// checks the list (22004 for a NULL, 22023 for none, an empty or
    /// over-long key, or more than 64 distinct keys).
    ///
    /// The guard is one lease: it renews every key together, is lost when
    /// any key is lost, and releases them all. Cancel safety: as
    /// [`Lease::try_acquire`].
    pub async fn try_acquire_all(
        backend: &B,
        keys: &[impl AsRef<str>],
        options: &LeaseOptions,
    ) -> Result<Option<Lease<B>>, Error> {
        Lease::acquire_all(backend, keys, options, Duration::ZERO).await
    }

    /// Wait up to `wait` (inside the server; in preload mode queued for
    /// every key at once, in arrival order) for all of `keys`: `None` if
    /// they were not all free together in time. Never deadlocks against
    /// other single- or multi-key callers. Cancel safety: as
    /// [`Lease::try_acquire`].
    #[tracing::instrument(name = "pg_fence.acquire_all", skip(backend, keys, options), fields(keys = keys.len(), token))]
    pub async fn acquire_all(
        backend: &B,
        keys: &[impl AsRef<str>],
        options: &LeaseOptions,
        wait: Duration,
    ) -> Result<Option<Lease<B>>, Error> {
        let keys: Vec<String> = keys.iter().map(|key| key.as_ref().to_owned()).collect();
        Lease::acquire_target(backend, Target::All(&keys), options, wait).await
    }
}
