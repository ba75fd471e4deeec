//! Semaphores: `permits` permits of a named semaphore, each a [`Lease`] on
//! the permit's own key (`fence.semaphore_acquire`).

use std::time::Duration;

use crate::backend::Backend;
use crate::lease::Target;
use crate::{Error, Lease, LeaseOptions};

/// A semaphore of `permits` permits on the server. A permit is a [`Lease`]
/// guard like any other: it renews itself, tells you when it is lost
/// ([`Lease::lost`]), carries its own fencing token, and is released by
/// [`Lease::release`] or, best-effort, on drop; a holder that crashes gives
/// its permit back when the permit's ttl runs out. [`Lease::key`] is the
/// permit's key (`name:permit:<i>`), which a fenced table can be keyed by.
///
/// Every caller of one semaphore should give the same `permits`: each takes
/// only among its own first `permits` permits (see the README).
///
/// ```no_run
/// # async fn example(pool: deadpool_postgres::Pool) -> Result<(), pg_fence_client::Error> {
/// use std::time::Duration;
/// use pg_fence_client::{LeaseOptions, Semaphore};
///
/// let encoders = Semaphore::new("video-encoders", 4)?;
/// if let Some(permit) = encoders
///     .acquire(&pool, &LeaseOptions::default(), Duration::from_secs(10))
///     .await?
/// {
///     println!("encoding under {} (token {})", permit.key(), permit.token());
///     permit.release().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Semaphore {
    name: String,
    permits: i32,
}

impl Semaphore {
    /// The most permits a semaphore may have (the server's limit).
    pub const MAX_PERMITS: u32 = 1024;

    /// Semaphore `name` with `permits` permits: 1 to [`Semaphore::MAX_PERMITS`],
    /// else [`Error::Usage`] (nothing is sent).
    pub fn new(name: impl Into<String>, permits: u32) -> Result<Semaphore, Error> {
        if !(1..=Semaphore::MAX_PERMITS).contains(&permits) {
            return Err(Error::Usage(format!(
                "a semaphore has 1 to {} permits, not {permits}",
                Semaphore::MAX_PERMITS
            )));
        }
        Ok(Semaphore {
            name: name.into(),
            permits: permits as i32,
        })
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many permits it has.
    pub fn permits(&self) -> u32 {
        self.permits as u32
    }

    /// Try once: `None` if every permit is taken (or, in preload mode,
    /// others are queued for one). Cancel safety: as
    /// [`Lease::try_acquire`]; a permit granted to a dropped request
    /// expires after its ttl.
    pub async fn try_acquire<B: Backend>(
        &self,
        backend: &B,
        options: &LeaseOptions,
    ) -> Result<Option<Lease<B>>, Error> {
        self.acquire(backend, options, Duration::ZERO).await
    }

    /// Wait up to `wait` (inside the server, in arrival order in preload
    /// mode) for a permit: `None` if none came free. Cancel safety: as
    /// [`Semaphore::try_acquire`].
    #[tracing::instrument(name = "pg_fence.semaphore_acquire", skip(backend, options), fields(name = %self.name, permits = self.permits, token))]
    pub async fn acquire<B: Backend>(
        &self,
        backend: &B,
        options: &LeaseOptions,
        wait: Duration,
    ) -> Result<Option<Lease<B>>, Error> {
        let target = Target::Permit {
            name: &self.name,
            permits: self.permits,
        };
        Lease::acquire_target(backend, target, options, wait).await
    }
}
