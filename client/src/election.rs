//! Leader election on one key: campaign (a lease whose token is the term),
//! who leads now, and a stream of leadership changes built on
//! `fence.lock_watch`.

use std::time::Duration;

use crate::backend::Backend;
use crate::{watch, Error, Lease, LeaseInfo, LeaseOptions};

/// An election: candidates campaign for the lease on `key`; the leader is
/// whoever holds it, and its term is the lease's fencing token, which only
/// increases from one leader to the next (G1). Two leaders at once are
/// impossible (G2), a paused leader's writes under an old term are refused
/// by fenced tables (G3), and a leader learns that it lost leadership from
/// its guard ([`Lease::lost`]). Resigning is releasing the guard.
///
/// ```no_run
/// # async fn example(pool: deadpool_postgres::Pool) -> Result<(), pg_fence_client::Error> {
/// use pg_fence_client::{Election, LeaseOptions};
///
/// let election = Election::new("scheduler:leader");
/// let leader = election.campaign(&pool, &LeaseOptions::default().holder("node-a")).await?;
/// println!("leading in term {}", leader.token());
/// leader.release().await?; // resign
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Election {
    key: String,
}

impl Election {
    /// The election held on `key`.
    pub fn new(key: impl Into<String>) -> Election {
        Election { key: key.into() }
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Campaign until this candidate leads: waits inside the server (in
    /// arrival order among candidates, preload mode), as long as it takes,
    /// and returns the lease guard: renewed in the background, its token
    /// the term. A lease its holder id already has (this node before a
    /// restart, or another guard with the same id) is not taken over: the
    /// campaign waits for it to end, as for anyone else's. Cancel safety:
    /// as [`Lease::acquire`]; a lease granted to a dropped campaign expires
    /// after its ttl.
    pub async fn campaign<B: Backend>(
        &self,
        backend: &B,
        options: &LeaseOptions,
    ) -> Result<Lease<B>, Error> {
        // In rounds of a minute, so a pooled connection is not held for
        // ever by one statement.
        let round = Duration::from_secs(60);
        loop {
            match Lease::acquire(backend, &self.key, options, round).await {
                Ok(Some(lease)) => return Ok(lease),
                Ok(None) => {}
                Err(Error::HolderInUse { .. }) => {
                    if let Some(lease) = watch(backend, &self.key, None, Duration::ZERO).await? {
                        watch(backend, &self.key, Some(lease.token), round).await?;
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Who leads now, and in which term (`None`: nobody).
    pub async fn leader<B: Backend>(&self, backend: &B) -> Result<Option<LeaseInfo>, Error> {
        watch(backend, &self.key, None, Duration::ZERO).await
    }

    /// The leadership changes, in order: [`Observer::next`] first answers
    /// with the leadership as it is, then waits for each change ("no
    /// leader" included). Terms only increase.
    pub fn observe<B: Backend>(&self, backend: &B) -> Observer<B> {
        Observer {
            backend: backend.clone(),
            key: self.key.clone(),
            seen: None,
        }
    }
}

/// Leadership changes of an [`Election`], one [`Observer::next`] at a time.
///
/// Each answer differs from the one before: another leader (a higher
/// term), or `None` when nobody leads (released, forced, expired). A
/// leadership that begins and ends between two calls (shorter than the
/// caller takes to call again, plus one round trip) is not seen; none is
/// ever reported out of order. Each call holds one pooled connection while
/// it waits.
pub struct Observer<B: Backend> {
    backend: B,
    key: String,
    /// What the last answer was (`Some(None)`: nobody led).
    seen: Option<Option<i64>>,
}

impl<B: Backend> Observer<B> {
    /// The next leadership: at once on the first call, then as soon as it
    /// changes. Cancel safe: a call dropped before its answer reports
    /// nothing, and the next call answers from the last answer given.
    pub async fn next(&mut self) -> Result<Option<LeaseInfo>, Error> {
        let Some(known) = self.seen else {
            let now = watch(&self.backend, &self.key, None, Duration::ZERO).await?;
            self.seen = Some(now.as_ref().map(|lease| lease.token));
            return Ok(now);
        };
        loop {
            let now = watch(&self.backend, &self.key, known, Duration::from_secs(60)).await?;
            let token = now.as_ref().map(|lease| lease.token);
            if token != known {
                self.seen = Some(token);
                return Ok(now);
            }
        }
    }
}
