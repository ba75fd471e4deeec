//! Multi-key leases: `fence.lock_acquire_all` grants every one of a set of
//! keys or none, in one grant with one token, and `fence.lock_release_all`
//! ends them (issue 13).
//!
//! Each key gets an ordinary lease row, all with the same token, so renew,
//! release, `fence.locks` and fencing work per key as for any lease, and the
//! one token fences writes under every key: a table keyed by any of them
//! refuses a write under the token once that key's lease has ended.
//!
//! All or nothing. An attempt looks at every key first and grants only if
//! all are free; it then try-locks every key's lock (keylock.rs) in "C"
//! order, issues one token, and writes each key's row, all inside one
//! internal subtransaction kept only if every key was granted. A key whose
//! lock is taken (a grant in flight, a fenced write) makes the whole attempt
//! busy, and the subtransaction's rollback gives back the locks it took.
//! Because nobody ever waits for a key's lock while holding another (they
//! are only try-locked), multi-key and single-key callers cannot deadlock;
//! a waiting caller sleeps between attempts, holding nothing.
//!
//! Waiting (preload mode, G7): the caller is one waiter, with its arrival,
//! with a place in the exclusive queue of each of its keys: a newcomer for
//! any of them queues behind it, and a release of one wakes it, so single-
//! key traffic neither barges past it nor starves it. The earliest waiter
//! is ahead in every queue it is in, so waiters never wait for each other
//! in a circle. A caller that holds one of its keys and asks for another
//! could still wait for it while it waits for that caller (a lease is not
//! tied to a session, so nothing can see the cycle): as PostgreSQL's lock
//! manager waits `deadlock_timeout` before it looks for a deadlock, a
//! waiter that one of its keys has kept out for [`RESERVE_MS`] gives up its
//! places on its free keys for [`YIELD_MS`], waking whoever waits for them,
//! then takes them back. Such a cycle so costs about a second, not a
//! `wait`. A transaction that holds a key's lock already is never queued
//! behind anyone for that key (acquire.rs). Without preload it sleeps on
//! the wait event of the key in its way.
//!
//! G6: the holder retrying the same request (all its keys live under its
//! holder id with one token) gets the leases back, extended. A holder that
//! holds only some of the keys, or holds them under several tokens, is busy
//! like anyone else: one grant is one token.

use pgrx::datum::Interval;
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use crate::acquire::{self, Attempt, Target};
use crate::args::required;
use crate::durability::issue_token;
use crate::errors::{fail, Failure, FenceError};
use crate::key::MAX_KEY_BYTES;
use crate::lease::{self, Lease};
use crate::plans::Plans;
use crate::probe::{self, LeaseRow};
use crate::subxact::in_subtransaction;
use crate::{keylock, wait, waiters};

/// The most keys one multi-key lease may have. Each key's lock stays held
/// until the granting transaction ends (one slot of the shared lock table,
/// sized by `max_locks_per_transaction`, each), and every attempt reads
/// every key's row.
pub const MAX_KEYS: usize = 64;

/// The keys of a call: not NULL (22004), 1 to [`MAX_KEYS`] elements
/// (22023; an array is refused by its length before any element is read),
/// each a valid key; returned distinct, in "C" (byte) order, the order
/// their locks are taken in. A multidimensional array is read as its
/// elements in storage order, as `unnest` reads it.
pub fn check_keys<'a>(
    function: &'static str,
    lock_keys: Option<impl ExactSizeIterator<Item = Option<&'a str>>>,
) -> Result<Vec<String>, Failure> {
    let lock_keys = required(function, "lock_keys", lock_keys)?;
    let invalid = |problem: String| FenceError::InvalidArgument {
        function,
        argument: "lock_keys",
        problem,
    };
    if lock_keys.len() == 0 {
        return fail(invalid("must name at least one key".into()));
    }
    if lock_keys.len() > MAX_KEYS {
        return fail(invalid(format!(
            "has {} elements, the limit is {MAX_KEYS}",
            lock_keys.len()
        )));
    }
    let mut keys = Vec::with_capacity(lock_keys.len());
    for (i, key) in lock_keys.enumerate() {
        let element = i + 1;
        let Some(key) = key else {
            return fail(FenceError::NullElement {
                function,
                argument: "lock_keys",
                element,
            });
        };
        if key.is_empty() {
            return fail(invalid(format!("element {element} is empty")));
        }
        if key.len() > MAX_KEY_BYTES {
            return fail(invalid(format!(
                "element {element} is {} bytes long, the limit is {MAX_KEY_BYTES}",
                key.len()
            )));
        }
        keys.push(key.to_owned());
    }
    keys.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    keys.dedup();
    Ok(keys)
}

/// `fence.lock_acquire_all`: every key or none, one token for all.
pub fn acquire<'a>(
    lock_keys: Option<impl ExactSizeIterator<Item = Option<&'a str>>>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
) -> Result<Vec<Lease>, Failure> {
    const F: &str = "lock_acquire_all";
    crate::roles::refuse_security_restricted(F)?;
    let keys = check_keys(F, lock_keys)?;
    acquire::run(F, Target::All(&keys), ttl, holder, wait, true)
}

/// `fence._lock_acquire_all`: `lock_acquire_all` with `adopt` as for
/// `fence._lock_acquire` (acquire.rs): without it, the holder's own live
/// leases on every key are `FN002`, not given back.
pub fn acquire_adopting<'a>(
    lock_keys: Option<impl ExactSizeIterator<Item = Option<&'a str>>>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
    adopt: Option<bool>,
) -> Result<Vec<Lease>, Failure> {
    const F: &str = "lock_acquire_all";
    crate::roles::refuse_security_restricted(F)?;
    let keys = check_keys(F, lock_keys)?;
    let adopt = required(F, "adopt", adopt)?;
    acquire::run(F, Target::All(&keys), ttl, holder, wait, adopt)
}

/// `fence.lock_release_all`: end those keys' leases with this token; how
/// many were live. Each key as `lock_release` would, in one statement: an
/// error on one (a lease of another role) leaves all of them as they were.
pub fn release<'a>(
    lock_keys: Option<impl ExactSizeIterator<Item = Option<&'a str>>>,
    token: Option<i64>,
) -> Result<i32, Failure> {
    const F: &str = "lock_release_all";
    crate::roles::refuse_security_restricted(F)?;
    let keys = check_keys(F, lock_keys)?;
    let token = required(F, "token", token)?;
    // As one release: if nothing else in the transaction needs durability,
    // it may commit asynchronously (the wrapper around the whole loop has
    // the last word over each key's own).
    crate::durability::may_commit_asynchronously(|| {
        let mut released = 0;
        for key in &keys {
            if lease::release_key(key, token)? {
                released += 1;
            }
        }
        Ok(released)
    })
}

/// What a multi-key attempt asks for.
pub struct Request<'a> {
    /// Distinct, in "C" order ([`check_keys`]).
    pub keys: &'a [String],
    pub holder: &'a str,
    pub holder_given: bool,
    pub ttl: Interval,
    pub role: pg_sys::Oid,
    /// Whether the holder's own live leases may come back (G6): false for
    /// pg_fence_client's first attempt (`fence._lock_acquire_all`).
    pub adopt: bool,
}

/// How long a multi-key waiter keeps its places on its free keys while a
/// key it needs stays held, before it first gives them up for [`YIELD_MS`]:
/// the holder may be waiting for one of them (PostgreSQL's
/// `deadlock_timeout` is 1 s too).
pub const RESERVE_MS: i64 = 1000;
/// How long it then leaves its free keys to others. Yields happen in
/// windows of one global phase (the first `YIELD_MS` of every
/// `RESERVE_MS + YIELD_MS` of the clock), so every waiter that yields does
/// so at the same time: a caller queued behind several of them on a free
/// key gets through.
pub const YIELD_MS: i64 = 100;
/// After its k-th yield a waiter yields only in every 2^k-th window (k at
/// most this), so steady traffic on its keys cannot keep it yielding.
const MAX_YIELD_DOUBLINGS: u32 = 3;

/// What held an attempt up, for the wait that follows.
#[derive(Default)]
pub struct Blocked {
    /// A key in the way (its index), whose wait event the caller sleeps on
    /// without preload.
    pub on: Option<usize>,
    /// Bit i: key i was held (leased, or its lock taken by a transaction).
    pub held: u64,
}

/// A multi-key waiter's places across its attempts ([`RESERVE_MS`]).
#[derive(Default)]
pub struct Reservation {
    held_since: Option<i64>,
    yields: u32,
    yielding_in: Option<i64>,
}

impl Reservation {
    /// The keys (bits) whose queues to keep a place in after an attempt
    /// that found `held` of `keys` keys held, at `now` (microseconds).
    pub fn places(&mut self, held: u64, keys: usize, now: i64) -> u64 {
        let all = if keys >= 64 {
            u64::MAX
        } else {
            (1u64 << keys) - 1
        };
        if held == 0 {
            self.held_since = None;
            self.yielding_in = None;
            self.yields = 0;
            return all;
        }
        let since = *self.held_since.get_or_insert(now);
        let period = (RESERVE_MS + YIELD_MS) * 1000;
        let window = now.div_euclid(period);
        let in_window = now.rem_euclid(period) < YIELD_MS * 1000;
        // Still inside the window it is yielding in.
        if self.yielding_in == Some(window) && in_window {
            return held;
        }
        let every = 1i64 << self.yields.min(MAX_YIELD_DOUBLINGS);
        if now.saturating_sub(since) >= RESERVE_MS * 1000 && in_window && window % every == 0 {
            self.yielding_in = Some(window);
            self.yields += 1;
            return held;
        }
        all
    }
}

/// One attempt at every key; `blocked` says what was in the way.
pub fn attempt(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    request: &Request<'_>,
    queued: Option<&waiters::Waiting>,
    blocked: &mut Blocked,
) -> Result<Attempt, Failure> {
    let keys = request.keys;
    // SAFETY: inside a transaction (every pg_extern is), outside any scan.
    unsafe { pg_sys::CommandCounterIncrement() };
    let mut rows = Vec::with_capacity(keys.len());
    for key in keys {
        rows.push(probe::lease_row(key, probe::Snapshot::Statement, true)?);
    }
    if request.holder_given {
        if let Some(token) = own_token(&rows, request.holder) {
            if !request.adopt {
                return fail(FenceError::HolderInUse {
                    lock_key: keys[0].clone(),
                    holder: request.holder.to_owned(),
                });
            }
            return extend_all(client, plans, request, &rows, token);
        }
    }
    // The keys held now (by someone else: the holder's own full set was
    // extended above).
    for (i, row) in rows.iter().enumerate() {
        if row.as_ref().is_some_and(|row| row.live) {
            blocked.held |= 1 << i;
        }
    }
    // G7: a key with someone queued ahead is theirs first, unless this
    // transaction holds its lock already (nobody else can take it before
    // this transaction ends).
    let ahead = keys.iter().position(|key| {
        waiters::someone_ahead(key, waiters::Mode::Exclusive, queued) && !keylock::held_by_me(key)
    });
    let earliest_expiry = rows
        .iter()
        .flatten()
        .filter(|row| row.live)
        .map(|row| acquire::retry_until(row.expires_at))
        .min();
    if let Some(i) = ahead {
        blocked.on = Some(i);
        // Kept out by a held key too: look again within 50 ms, so as not to
        // miss a yield window (RESERVE_MS).
        let cap = if blocked.held != 0 {
            wait::RECHECK_INTERVAL_MS
        } else {
            wait::QUEUED_RECHECK_INTERVAL_MS
        };
        return Ok(Attempt::Queued {
            retry_in_ms: earliest_expiry.unwrap_or(cap).min(cap),
        });
    }
    // Under REPEATABLE READ / SERIALIZABLE the look saw the transaction's
    // snapshot, perhaps stale: every key is locked and read again instead
    // (which fails with 40001 if it changed since).
    let stale = acquire::uses_transaction_snapshot();
    if !stale {
        if let Some(i) = rows
            .iter()
            .position(|row| row.as_ref().is_some_and(|row| row.live))
        {
            blocked.on = Some(i);
            return Ok(Attempt::Busy {
                retry_in_ms: earliest_expiry.unwrap_or(wait::RECHECK_INTERVAL_MS),
            });
        }
    }
    in_subtransaction(
        || grant_all(client, plans, request, &rows, stale, blocked),
        |attempt| matches!(attempt, Attempt::GrantedAll { .. }),
    )
}

/// The token under which every key is live and held by `holder`, if there
/// is one token for all (a retry of a request that was granted).
fn own_token(rows: &[Option<LeaseRow>], holder: &str) -> Option<i64> {
    let mut token = None;
    for row in rows {
        let row = row.as_ref().filter(|row| row.live)?;
        if row.holder.as_deref() != Some(holder) || token.is_some_and(|token| token != row.token) {
            return None;
        }
        token = Some(row.token);
    }
    token
}

/// G6 for every key: extend each lease, or (one has ended since we
/// looked) none: `Again`, and the next attempt decides afresh.
fn extend_all(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    request: &Request<'_>,
    rows: &[Option<LeaseRow>],
    token: i64,
) -> Result<Attempt, Failure> {
    in_subtransaction(
        || {
            let mut leases = Vec::with_capacity(rows.len());
            for (key, row) in request.keys.iter().zip(rows) {
                let owner = row.as_ref().map_or(request.role, |row| row.owner_role);
                match acquire::extend_own_lease(
                    client,
                    plans,
                    key,
                    request.holder,
                    token,
                    owner,
                    request.ttl,
                    request.role,
                )? {
                    Attempt::Granted { lease, .. } => leases.push((lease, None)),
                    other => return Ok(other),
                }
            }
            Ok(Attempt::GrantedAll {
                leases,
                regrant: true,
            })
        },
        |attempt| matches!(attempt, Attempt::GrantedAll { .. }),
    )
}

/// The grant, inside the attempt's subtransaction: every key's lock, then
/// one token, then every key's row. Anything short of all of them is rolled
/// back by the caller, locks included.
fn grant_all(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    request: &Request<'_>,
    rows: &[Option<LeaseRow>],
    stale: bool,
    blocked: &mut Blocked,
) -> Result<Attempt, Failure> {
    let keys = request.keys;
    // Try-locks only: never waiting for one while holding others is what
    // keeps any mix of callers from deadlocking.
    if let Some(i) = keys.iter().position(|key| !keylock::try_exclusive(key)) {
        blocked.on = Some(i);
        blocked.held |= 1 << i;
        return Ok(Attempt::Busy {
            retry_in_ms: wait::LOCKED_ROW_RETRY_MS,
        });
    }
    // Readers on a key hold it off as a writer does (G2, shared.rs).
    for (i, key) in keys.iter().enumerate() {
        if let Some(retry_in_ms) = crate::shared::holding(key)? {
            blocked.on = Some(i);
            blocked.held |= 1 << i;
            return Ok(Attempt::Busy { retry_in_ms });
        }
    }
    // Every row that needs locking is locked before the token is spent.
    let mut replaced = Vec::with_capacity(keys.len());
    for (i, (key, row)) in keys.iter().zip(rows).enumerate() {
        replaced.push(match row {
            None => None,
            Some(row) if !stale && row.untouched => Some(acquire::Replaced {
                token: row.token,
                expired_after_micros: row.expired_after_micros,
            }),
            Some(_) => match acquire::lock_free_row(client, plans, key, request.holder)? {
                Ok(replaced) => Some(replaced),
                Err(not_free) => {
                    blocked.on = Some(i);
                    blocked.held |= 1 << i;
                    // The holder's own lease, taken since: another attempt
                    // finds it (and is busy unless it holds them all).
                    return Ok(match not_free {
                        Attempt::Again => Attempt::Busy {
                            retry_in_ms: wait::LOCKED_ROW_RETRY_MS,
                        },
                        other => other,
                    });
                }
            },
        });
    }
    let token = issue_token()?;
    let now = acquire::clock_after_token()?;
    let mut leases = Vec::with_capacity(keys.len());
    for (key, replaced) in keys.iter().zip(replaced) {
        match acquire::grant_as(
            client,
            plans,
            key,
            request.holder,
            token,
            now,
            request.ttl,
            request.role,
            replaced,
        )? {
            Attempt::Granted {
                lease,
                expired_after_micros,
                ..
            } => leases.push((lease, expired_after_micros)),
            // Granted or created by someone else since we looked (before
            // we held its lock): look again.
            other => return Ok(other),
        }
    }
    Ok(Attempt::GrantedAll {
        leases,
        regrant: false,
    })
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

    #[pgrx::pg_test]
    fn a_waiter_held_up_long_yields_its_free_keys_in_the_global_windows() {
        let ms = 1000;
        let period = (RESERVE_MS + YIELD_MS) * ms;
        let mut r = Reservation::default();
        // Nothing held: a place on every key.
        assert_eq!(r.places(0, 3, 0), 0b111);
        // Key 1 held from 50 ms on: every key until it has been held
        // RESERVE_MS and a window comes (the next, at 1100 ms).
        let start = 50 * ms;
        assert_eq!(r.places(0b010, 3, start), 0b111);
        assert_eq!(r.places(0b010, 3, period - ms), 0b111);
        // The next window (number 1: 1 % 2^0 == 0): only the held key, for
        // the window's length.
        assert_eq!(r.places(0b010, 3, period), 0b010);
        assert_eq!(r.places(0b010, 3, period + (YIELD_MS - 1) * ms), 0b010);
        assert_eq!(r.places(0b010, 3, period + YIELD_MS * ms), 0b111);
        // Having yielded once, only in even windows: not 3, but 4.
        assert_eq!(r.places(0b010, 3, 3 * period + ms), 0b111);
        assert_eq!(r.places(0b010, 3, 4 * period + ms), 0b010);
        // Nothing held any more: every key, and the count starts again.
        assert_eq!(r.places(0, 3, 5 * period), 0b111);
        assert_eq!(r.places(0, 64, 0), u64::MAX);
    }

    #[pgrx::pg_test]
    fn keys_are_distinct_and_in_byte_order() {
        let keys = check_keys(
            "t",
            Some([Some("b"), Some("a"), Some("B"), Some("a")].into_iter()),
        )
        .ok()
        .unwrap();
        assert_eq!(keys, ["B", "a", "b"]);
    }
}
