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
//! cares about (the same token stays live) and wake nobody (one that
//! shortens the lease is learned at the next recheck). A missed wake-up (a
//! hash collision; its advertisement overwritten while it reads is caught
//! by looking again) costs at most [`WATCH_RECHECK_MS`]. A lease that looks
//! expired while a renewal of it is still in flight is looked at again a
//! moment later, not reported ended. No shared memory is
//! needed, so it works without preload too; on a hot standby, where no
//! transaction of the primary wakes it, it learns of changes only at that
//! recheck (and of an expiry on time).

use pgrx::datum::{Interval, TimestampWithTimeZone};
use std::sync::atomic::Ordering;

use pgrx::pg_sys;

use crate::args::{non_negative, required};
use crate::errors::{Failure, FenceError};
use crate::key::check_key;
use crate::lease::Lease;
use crate::probe::{self, LeaseRow};
use crate::wait;

/// Longest sleep of a watcher between two looks: only a safety net for a
/// missed wake-up.
pub const WATCH_RECHECK_MS: i64 = 1000;

pub fn now_micros() -> i64 {
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
    let wait_micros = non_negative(F, "wait", &required(F, "wait", wait)?)?;
    let deadline = now_micros().saturating_add(i64::try_from(wait_micros).unwrap_or(i64::MAX));
    let event = wait::watch_event_for(key);
    // Counted (preload mode) before the first look, so a commit that finds
    // no watcher counted happened before that look, which then sees it.
    let _counted = (wait_micros > 0).then(Counted::enter);
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
        let row = probe::lease_row(key, probe::Snapshot::Latest, true)?;
        let now = now_micros();
        // A lease that looks ended while a transaction has its row locked or
        // updated (a renew that judged it live in time, not yet committed)
        // may be live again in a moment: look again shortly rather than
        // report an end that did not happen (an observer would see the
        // term end and come back).
        let in_flight = row.as_ref().is_some_and(|row| !row.live && !row.untouched);
        if in_flight && now < deadline {
            wait::sleep(event, wait::LOCKED_ROW_RETRY_MS);
            continue;
        }
        // The probe may have waited (for a buffer, a lock), which clears our
        // advertisement: a change committed since could have missed us, so
        // advertise again and look once more.
        if wait_micros > 0 && !wait::advertising(event) {
            continue;
        }
        let live = row.filter(|row| row.live);
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

/// This session counted among the watchers (preload mode) while it lives.
pub struct Counted(bool);

impl Counted {
    pub fn enter() -> Counted {
        Counted(crate::shmem::segment().is_some_and(|segment| {
            segment.header().watchers.fetch_add(1, Ordering::SeqCst);
            true
        }))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let (true, Some(segment)) = (self.0, crate::shmem::segment()) {
            segment.header().watchers.fetch_sub(1, Ordering::SeqCst);
        }
    }
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
