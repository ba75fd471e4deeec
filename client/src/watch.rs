//! Watching a key: `fence.lock_watch`, as an async call.

use std::time::{Duration, SystemTime};

use crate::backend::Backend;
use crate::Error;

/// A live lease as a watch saw it: who holds it, under which token (its
/// term), since and until when (server clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The key.
    pub key: String,
    /// The holder id it was granted to.
    pub holder: String,
    /// Its fencing token.
    pub token: i64,
    /// When it was granted.
    pub acquired_at: SystemTime,
    /// When it expires unless renewed.
    pub expires_at: SystemTime,
}

/// Wait, inside the server, until the live lease on `key` is not the one
/// with token `known` (`None`: until one is granted), for at most `wait`;
/// the live lease at that moment (`None`: none). A grant, release or force
/// wakes the watch within moments, and the known lease's expiry ends it on
/// time; when `wait` runs out it answers with the lease as it is then
/// (perhaps still the known one). It holds one pooled connection while it
/// waits.
///
/// Cancel safety: dropping the future abandons the wait: its connection is
/// closed, not handed back to the pool with the watch still running on it,
/// and the server ends the watch when it sees the client gone.
pub async fn watch<B: Backend>(
    backend: &B,
    key: &str,
    known: Option<i64>,
    wait: Duration,
) -> Result<Option<LeaseInfo>, Error> {
    backend.watch(key, known, wait).await
}
