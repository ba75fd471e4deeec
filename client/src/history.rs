//! A key's term history: `fence.lock_keep_history` and
//! `fence.lock_history`, as async calls. [`crate::Observer`] is built on
//! them.

use std::time::{Duration, SystemTime};

use crate::backend::Backend;
use crate::Error;

/// One term of a key: an exclusive lease granted on it, as the history
/// keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// The key.
    pub key: String,
    /// The holder id it was granted to.
    pub holder: String,
    /// Its fencing token: the term.
    pub token: i64,
    /// The term before it on the key (`None`: the key had none, or it is
    /// an [`crate::Observer`]'s first answer, read from the live lease). A
    /// reader that knows term `t` missed nothing when the next term it
    /// reads names `t` here.
    pub previous_token: Option<i64>,
    /// When it was granted (server clock).
    pub acquired_at: SystemTime,
}

/// Keep the terms of `key` for at least `keep` from now on (a shorter
/// `keep` than the key has leaves it; `Duration::ZERO`: stop keeping them
/// and drop the kept ones, for the role that started keeping them or a
/// member of fence_admin); the key's latest token (`None`: it never had a
/// lease), from which the history is complete. Every exclusive grant of a
/// kept key writes its term in the grant's own statement, and drops the
/// key's terms older than `keep` (the newest always stays). Needs the
/// primary (it writes).
pub async fn keep_history<B: Backend>(
    backend: &B,
    key: &str,
    keep: Duration,
) -> Result<Option<i64>, Error> {
    backend.keep_history(key, keep).await
}

/// The kept terms of `key` after term `after` (`None`: all of them),
/// oldest first; if there are none yet, waits inside the server for the
/// next grant, for at most `wait` (then: none). Each term names the one
/// before it ([`Term::previous_token`]), so a gap is visible. A key whose
/// history is not kept: [`Error::Database`] with SQLSTATE `55000`.
///
/// Cancel safety: as [`crate::watch`]: a dropped call's connection is
/// closed, not handed back to the pool with the wait running on it.
pub async fn history<B: Backend>(
    backend: &B,
    key: &str,
    after: Option<i64>,
    wait: Duration,
) -> Result<Vec<Term>, Error> {
    backend.history(key, after, wait).await
}
