//! `fence.lock_watch`: wait inside the server until a key's live lease is
//! not the one the caller knows (issue 14). It is the watch any language
//! can call: granted to another, released, forced or expired, the caller
//! hears of it within moments, and learns the lease as it is then.
//!
//! A watcher advertises its own wait event for the key (`wait::
//! watch_event_for`, never the one acquire waiters advertise, so waking
//! every watcher wakes no acquirer). Every transaction that grants,
//! releases or forces a lease on the key wakes all of them once it has
//! committed and let go of its locks (wait.rs); the expiry of the lease it
//! knows it sleeps until by itself. Renewals change nothing a watcher
//! cares about (the same token stays live) and wake nobody. A missed
//! wake-up (its advertisement briefly overwritten while it reads, a hash
//! collision) costs at most [`WATCH_RECHECK_MS`]. No shared memory is
//! needed, so it works without preload too; on a hot standby, where no
//! transaction of the primary wakes it, it learns of changes only at that
//! recheck (and of an expiry on time).

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;

use crate::args::{interval_micros, required};
use crate::errors::{fail, Failure, FenceError};
use crate::key::check_key;
use crate::lease::Lease;
use crate::probe::{self, LeaseRow};
use crate::wait;

/// Longest sleep of a watcher between two looks: only a safety net for a
/// missed wake-up.
pub const WATCH_RECHECK_MS: i64 = 1000;

fn now_micros() -> i64 {
    // SAFETY: a plain read of the backend's clock, no preconditions.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// `fence.lock_watch(lock_key, known_token, wait)`: the live lease on the
/// key as soon as it is not the one with `known_token` (NULL: none is
/// live), or when `wait` runs out.
pub fn watch(
    lock_key: Option<&str>,
    known_token: Option<i64>,
    wait: Option<Interval>,
) -> Result<Option<Lease>, Failure> {
    const F: &str = "lock_watch";
    let key = check_key(F, lock_key)?;
    let wait = required(F, "wait", wait)?;
    let wait_micros = interval_micros(&wait);
    if wait_micros < 0 {
        return fail(FenceError::InvalidArgument {
            function: F,
            argument: "wait",
            problem: "must not be negative".into(),
        });
    }
    let deadline = now_micros().saturating_add(i64::try_from(wait_micros).unwrap_or(i64::MAX));
    let event = wait::watch_event_for(key);
    let outcome = loop {
        if wait_micros > 0 {
            // Before the look: a change that commits after it sets our
            // latch, and the sleep below returns at once.
            wait::reset_latch();
            wait::advertise(event);
        }
        // The latest committed state, whatever the isolation level (and
        // this transaction's own changes).
        // SAFETY: inside a transaction (every pg_extern is), outside any scan.
        unsafe { pg_sys::CommandCounterIncrement() };
        let live = probe::lease_row(key, probe::Snapshot::Latest, true)?.filter(|row| row.live);
        let now = now_micros();
        if live.as_ref().map(|row| row.token) != known_token || now >= deadline {
            break live;
        }
        // The known lease is live: until it expires, the wait runs out, or
        // the safety net, whichever comes first (or a wake-up).
        let until = live
            .as_ref()
            .map_or(deadline, |row| row.expires_at.saturating_add(1))
            .min(deadline)
            .min(now.saturating_add(WATCH_RECHECK_MS * 1000));
        wait::sleep(event, (until.saturating_sub(now) + 999) / 1000);
    };
    if wait_micros > 0 {
        wait::stop_advertising();
    }
    outcome.map(|row| as_lease(key, row)).transpose()
}

fn as_lease(key: &str, row: LeaseRow) -> Result<Lease, Failure> {
    let at = |micros: i64| {
        TimestampWithTimeZone::try_from(micros)
            .map_err(|_| FenceError::internal("a lease timestamp out of range".into()).here())
    };
    Ok(Lease {
        lock_key: key.to_owned(),
        holder: row.holder.unwrap_or_default(),
        token: row.token,
        acquired_at: at(row.acquired_at)?,
        expires_at: at(row.expires_at)?,
    })
}
