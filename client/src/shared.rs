//! Shared (reader) leases as guards (`fence.lock_acquire_shared`): any
//! number of readers on a key at once, never alongside its exclusive lease.

use std::time::Duration;

use crate::backend::Backend;
use crate::lease::Target;
use crate::{Error, Lease, LeaseOptions};

impl<B: Backend> Lease<B> {
    /// A shared (reader) lease on `key`: try once, `None` if the key's
    /// exclusive lease is live (or, in preload mode, a writer is queued
    /// for it: readers do not starve writers).
    ///
    /// The guard is a lease like any other, with a token of its own: it
    /// renews in the background, reports its loss, and releases on
    /// [`Lease::release`] or drop. Its token does not fence writes: fenced
    /// tables take only the exclusive lease's. Cancel safety: as
    /// [`Lease::try_acquire`].
    pub async fn try_acquire_shared(
        backend: &B,
        key: &str,
        options: &LeaseOptions,
    ) -> Result<Option<Lease<B>>, Error> {
        Lease::acquire_shared(backend, key, options, Duration::ZERO).await
    }

    /// Wait up to `wait` (inside the server; in preload mode queued with
    /// the key's writers, in arrival order) for a shared lease on `key`:
    /// `None` if none was granted in time. Cancel safety: as
    /// [`Lease::try_acquire`].
    #[tracing::instrument(
        name = "pg_fence.acquire_shared",
        skip(backend, options),
        fields(token)
    )]
    pub async fn acquire_shared(
        backend: &B,
        key: &str,
        options: &LeaseOptions,
        wait: Duration,
    ) -> Result<Option<Lease<B>>, Error> {
        Lease::acquire_target(backend, Target::Shared(key), options, wait).await
    }
}
