//! What the lease machinery needs from a driver: three calls, each one round
//! trip on a pooled connection. Each backend is a thin file behind a feature.

use std::future::Future;
use std::time::{Duration, SystemTime};

use crate::Error;

#[cfg(feature = "deadpool-postgres")]
pub mod deadpool;
#[cfg(feature = "sqlx")]
pub mod sqlx;

/// A grant as the server reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The fencing token.
    pub token: i64,
    /// Time left on the lease by the server's clock when it answered.
    pub remaining: Duration,
    /// When the lease expires, by the server's clock.
    pub expires_at: SystemTime,
}

/// A database driver that can run pg_fence's lease functions.
///
/// Implemented for `sqlx::PgPool` (feature `sqlx`) and
/// `deadpool_postgres::Pool` (feature `deadpool-postgres`). Every call takes a
/// connection from the pool for one statement and gives it back: leases are
/// not tied to a session, so this works behind PgBouncer in transaction mode,
/// any version: both backends send statements that nothing prepared
/// outlives (deadpool: `query_typed`; sqlx: the simple protocol).
///
/// `adopt` says whether the holder's own live lease may come back (G6):
/// true only for a retry of a request whose reply was lost. With `adopt`
/// false (a first attempt) a key already leased to `holder` is refused
/// by the server with `FN002` ([`Error::HolderInUse`]) and left as it was:
/// a holder id names one guard.
pub trait Backend: Clone + Send + Sync + 'static {
    /// `fence.lock_acquire`: `None` when the key stayed busy for `wait`.
    /// (Not `acquire`: `sqlx::PgPool::acquire`, which hands out a
    /// connection, would shadow it, and `pool.acquire(key, ...)` would not
    /// compile.)
    fn acquire_lease(
        &self,
        key: &str,
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> impl Future<Output = Result<Option<Grant>, Error>> + Send;
    /// `fence.lock_acquire_shared`: a shared (reader) lease, `None` when
    /// the key stayed held exclusively (or, in preload mode, a writer was
    /// queued first) for `wait`. Both backends implement it; another
    /// implementation that does not gets [`Error::Usage`].
    fn acquire_shared(
        &self,
        key: &str,
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> impl Future<Output = Result<Option<Grant>, Error>> + Send {
        let _ = (key, ttl, holder, wait, adopt);
        std::future::ready(Err(unsupported("acquire_shared")))
    }
    /// `fence.semaphore_acquire`: the permit's key and grant, `None` when no
    /// permit was free for `wait`. Both backends implement it; another
    /// implementation that does not gets [`Error::Usage`] from [`crate::Semaphore`].
    fn acquire_permit(
        &self,
        name: &str,
        permits: i32,
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> impl Future<Output = Result<Option<(String, Grant)>, Error>> + Send {
        let _ = (name, permits, ttl, holder, wait, adopt);
        std::future::ready(Err(unsupported("acquire_permit")))
    }
    /// `fence.lock_acquire_all`: the keys granted (distinct, in byte order)
    /// and their one grant (the earliest expiry), `None` when they were not
    /// all free within `wait`. Both backends implement the multi-key calls;
    /// another implementation that does not gets [`Error::Usage`].
    fn acquire_all(
        &self,
        keys: &[String],
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> impl Future<Output = Result<Option<(Vec<String>, Grant)>, Error>> + Send {
        let _ = (keys, ttl, holder, wait, adopt);
        std::future::ready(Err(unsupported("acquire_all")))
    }
    /// `fence.lock_renew` of every key, in one statement: the earliest new
    /// expiry, `None` when any of them is no longer live.
    fn renew_all(
        &self,
        keys: &[String],
        token: i64,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<SystemTime>, Error>> + Send {
        let _ = (keys, token, ttl);
        std::future::ready(Err(unsupported("renew_all")))
    }
    /// `fence.lock_release_all`: true when every key's lease was live.
    fn release_all(
        &self,
        keys: &[String],
        token: i64,
    ) -> impl Future<Output = Result<bool, Error>> + Send {
        let _ = (keys, token);
        std::future::ready(Err(unsupported("release_all")))
    }
    /// `fence.lock_watch`: the live lease once it is not the one with
    /// token `known` (`None`: none), or when `wait` runs out. Both backends
    /// implement it; another implementation that does not gets
    /// [`Error::Usage`].
    fn watch(
        &self,
        key: &str,
        known: Option<i64>,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<crate::LeaseInfo>, Error>> + Send {
        let _ = (key, known, wait);
        std::future::ready(Err(unsupported("watch")))
    }
    /// `fence.lock_keep_history`: keep the key's terms for `keep` (zero:
    /// stop); the key's latest token, from which the history is complete.
    fn keep_history(
        &self,
        key: &str,
        keep: Duration,
    ) -> impl Future<Output = Result<Option<i64>, Error>> + Send {
        let _ = (key, keep);
        std::future::ready(Err(unsupported("keep_history")))
    }
    /// `fence.lock_history`: the key's kept terms after token `after`
    /// (`None`: all), oldest first, waiting up to `wait` for one.
    fn history(
        &self,
        key: &str,
        after: Option<i64>,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<crate::Term>, Error>> + Send {
        let _ = (key, after, wait);
        std::future::ready(Err(unsupported("history")))
    }
    /// `fence.lock_renew`: the new expiry (server clock), `None` when the
    /// lease is no longer live.
    fn renew(
        &self,
        key: &str,
        token: i64,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<SystemTime>, Error>> + Send;
    /// `fence.lock_release`: false when the lease was not live.
    fn release(&self, key: &str, token: i64) -> impl Future<Output = Result<bool, Error>> + Send;
}

fn unsupported(call: &str) -> Error {
    Error::Usage(format!("this Backend does not implement {call}"))
}

/// A watch's row (holder, token, acquired_at and expires_at as Unix
/// seconds) as a [`crate::LeaseInfo`]; `None` when no lease was live.
pub(crate) fn watched(
    key: &str,
    holder: Option<String>,
    token: Option<i64>,
    acquired_at: Option<f64>,
    expires_at: Option<f64>,
) -> Option<crate::LeaseInfo> {
    Some(crate::LeaseInfo {
        key: key.to_owned(),
        holder: holder?,
        token: token?,
        acquired_at: unix_seconds(acquired_at?),
        expires_at: unix_seconds(expires_at?),
    })
}

/// A history's row (four arrays in token order, NULLs when empty) as
/// terms.
pub(crate) fn terms(
    key: &str,
    tokens: Option<Vec<i64>>,
    previous: Option<Vec<Option<i64>>>,
    holders: Option<Vec<String>>,
    acquired_at: Option<Vec<f64>>,
) -> Result<Vec<crate::Term>, Error> {
    let tokens = tokens.unwrap_or_default();
    let (previous, holders, acquired_at) = (
        previous.unwrap_or_default(),
        holders.unwrap_or_default(),
        acquired_at.unwrap_or_default(),
    );
    if [previous.len(), holders.len(), acquired_at.len()] != [tokens.len(); 3] {
        return Err(Error::Decode(
            "a history row with arrays of different lengths".into(),
        ));
    }
    Ok(tokens
        .into_iter()
        .zip(previous)
        .zip(holders.into_iter().zip(acquired_at))
        .map(
            |((token, previous_token), (holder, acquired_at))| crate::Term {
                key: key.to_owned(),
                holder,
                token,
                previous_token,
                acquired_at: unix_seconds(acquired_at),
            },
        )
        .collect())
}

pub(crate) fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub(crate) fn grant(
    token: Option<i64>,
    remaining_ms: Option<i64>,
    expires_at: Option<f64>,
) -> Option<Grant> {
    Some(Grant {
        token: token?,
        remaining: Duration::from_millis(remaining_ms?.max(0) as u64),
        expires_at: unix_seconds(expires_at?),
    })
}

/// A server timestamp sent as Unix seconds.
pub(crate) fn unix_seconds(seconds: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs_f64(seconds.max(0.0))
}
