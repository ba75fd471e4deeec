//! Semaphores: `permits` permits of a named semaphore, each a lease on its
//! own key, `<name>:permit:<i>` for i in 1..=permits (issue 13).
//!
//! A permit is an ordinary lease, so everything a lease has, a permit has:
//! a token from the one global order (G1), exclusion per permit key (G2:
//! so at most `permits` live permits for callers that agree on `permits`),
//! its own expiry (a crashed holder's permit comes back after its ttl),
//! renew and release by token (G4) with `lock_renew` / `lock_release` on
//! the permit's key, G6 per permit, and fencing: a table keyed by permit
//! key is fenced like any other.
//!
//! Callers that disagree on `permits` each take only among their own first
//! `permits` keys: a caller asking with N never holds a permit above N, so
//! live permits never exceed the largest N in use, and a caller with a
//! smaller N is granted only when one of its first N permits is free.
//!
//! Waiting: one waiter queue per semaphore (preload mode, G7), under the
//! queue key `<name>:permit:*`, and the wait event of that key without
//! preload. A release, force-release or rolled-back grant of a permit key
//! wakes the semaphore's queue head as well as the key's own (wait.rs); so
//! does a queued waiter's grant once it has committed (another permit may
//! be free: the next head looks), which also wakes the key's own head and
//! watchers, who look and find it held.

use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::acquire::{self, Attempt, Target};
use crate::args::required;
use crate::errors::{fail, Failure, FenceError};
use crate::key::{check_text_key, MAX_KEY_BYTES};
use crate::lease::{self, Lease};
use crate::probe;

/// The most permits a semaphore may have: each attempt looks at every
/// permit's row, so a bigger one would make every acquire slow.
pub const MAX_PERMITS: i32 = 1024;
const PERMIT: &str = ":permit:";
/// The byte after `PERMIT`'s last: in "C" order, every permit key of a
/// name lies between `name || PERMIT` and `name || PERMIT_END`.
const PERMIT_END: &str = ":permit;";
/// The longest name: its longest permit key must fit a key.
pub const MAX_NAME_BYTES: usize = MAX_KEY_BYTES - PERMIT.len() - 4;

/// The key of permit `i` (1-based) of semaphore `name`.
pub fn permit_key(name: &str, i: i32) -> String {
    format!("{name}{PERMIT}{i}")
}

/// The key a semaphore's waiters queue under (never a permit's key).
pub fn queue_key(name: &str) -> String {
    format!("{name}{PERMIT}*")
}

/// The semaphore `key` is a permit of, if it is one: `<name>:permit:<i>`
/// with `i` in 1..=MAX_PERMITS, written without leading zeros.
pub fn semaphore_of(key: &str) -> Option<&str> {
    let (name, number) = key.rsplit_once(PERMIT)?;
    let canonical = !name.is_empty()
        && !number.is_empty()
        && !number.starts_with('0')
        && number.len() <= 4
        && number.bytes().all(|byte| byte.is_ascii_digit());
    (canonical && number.parse::<i32>().is_ok_and(|i| i <= MAX_PERMITS)).then_some(name)
}

fn check_name<'a>(function: &'static str, name: Option<&'a str>) -> Result<&'a str, Failure> {
    let name = check_text_key(function, "name", name)?;
    if name.len() > MAX_NAME_BYTES {
        return fail(FenceError::InvalidArgument {
            function,
            argument: "name",
            problem: format!(
                "is {} bytes long, the limit is {MAX_NAME_BYTES} (a permit's key, \
                 name || ':permit:' || number, must fit the {MAX_KEY_BYTES}-byte key limit)",
                name.len()
            ),
        });
    }
    Ok(name)
}

fn check_permits(function: &'static str, permits: Option<i32>) -> Result<i32, Failure> {
    let permits = required(function, "permits", permits)?;
    if !(1..=MAX_PERMITS).contains(&permits) {
        return fail(FenceError::InvalidArgument {
            function,
            argument: "permits",
            problem: format!("is {permits}; it must be 1 to {MAX_PERMITS}"),
        });
    }
    Ok(permits)
}

/// `fence.semaphore_acquire`: one of `permits` permits of `name`.
pub fn acquire(
    name: Option<&str>,
    permits: Option<i32>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
) -> Result<Option<Lease>, Failure> {
    const F: &str = "semaphore_acquire";
    crate::roles::refuse_security_restricted(F)?;
    let name = check_name(F, name)?;
    let permits = check_permits(F, permits)?;
    Ok(acquire::run(
        F,
        Target::Semaphore { name, permits },
        ttl,
        holder,
        wait,
        true,
    )?
    .pop())
}

/// `fence._semaphore_acquire`: `semaphore_acquire` with `adopt` as for
/// `fence._lock_acquire` (acquire.rs): without it, the holder's own live
/// permit is `FN002`, not given back.
pub fn acquire_adopting(
    name: Option<&str>,
    permits: Option<i32>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
    adopt: Option<bool>,
) -> Result<Option<Lease>, Failure> {
    const F: &str = "semaphore_acquire";
    crate::roles::refuse_security_restricted(F)?;
    let name = check_name(F, name)?;
    let permits = check_permits(F, permits)?;
    let adopt = required(F, "adopt", adopt)?;
    Ok(acquire::run(
        F,
        Target::Semaphore { name, permits },
        ttl,
        holder,
        wait,
        adopt,
    )?
    .pop())
}

/// One attempt at a permit: the holder's own live permit back (G6), else
/// nothing if queued waiters come first (G7), else the first free permit.
#[allow(clippy::too_many_arguments)]
pub fn attempt(
    client: &mut pgrx::spi::SpiClient<'_>,
    plans: &crate::plans::Plans,
    name: &str,
    permits: i32,
    holder: &str,
    holder_given: bool,
    ttl: Interval,
    role: pg_sys::Oid,
    queued: Option<&crate::waiters::Waiting>,
    adopt: bool,
) -> Result<Attempt, Failure> {
    let keys: Vec<String> = (1..=permits).map(|i| permit_key(name, i)).collect();
    // Every attempt reads each permit's row once, as committed now (under
    // REPEATABLE READ too: a permit granted after the snapshot counts).
    // G6 per permit: a holder that has a live permit among these gets that
    // one back, never a second, on every attempt: a retry of a request that
    // is still queued (a lost reply) may find the first one granted since.
    // SAFETY: inside a transaction, outside any scan.
    unsafe { pg_sys::CommandCounterIncrement() };
    let mut live = Vec::with_capacity(keys.len());
    for key in &keys {
        let row = probe::lease_row(key, probe::Snapshot::Latest, holder_given)?;
        let row_live = row.as_ref().is_some_and(|row| row.live);
        if row_live
            && holder_given
            && row.as_ref().and_then(|row| row.holder.as_deref()) == Some(holder)
        {
            return acquire::attempt(client, plans, key, holder, ttl, role, None, adopt);
        }
        live.push(row.filter(|row| row.live).map(|row| row.expires_at));
    }
    // G7 for the semaphore: its queue's earlier arrivals first. Past them
    // goes only a permit whose lock this transaction holds (it released it,
    // or wrote under it, earlier): nobody can take that one before this
    // transaction ends anyway. The ones behind the head sleep until woken:
    // a waiter leaving the queue wakes the next, once its grant commits.
    let behind_others =
        crate::waiters::someone_ahead(&queue_key(name), crate::waiters::Mode::Semaphore, queued);
    let may_try = |key: &String| !behind_others || crate::keylock::held_by_me(key);
    if behind_others && !keys.iter().any(may_try) {
        return Ok(Attempt::Queued {
            retry_in_ms: crate::wait::QUEUED_RECHECK_INTERVAL_MS,
        });
    }
    // Busy until the earliest expiry seen, looked at again within 50 ms.
    let mut retry_in_ms = live
        .iter()
        .flatten()
        .map(|expires_at| acquire::retry_until(*expires_at))
        .min()
        .unwrap_or(crate::wait::RECHECK_INTERVAL_MS);
    let mut again = false;
    for (key, expires_at) in keys.iter().zip(&live) {
        if expires_at.is_some() || !may_try(key) {
            continue;
        }
        match acquire::attempt(client, plans, key, holder, ttl, role, None, adopt)? {
            granted @ (Attempt::Granted { .. } | Attempt::GrantedAll { .. }) => return Ok(granted),
            Attempt::Again => again = true,
            Attempt::Busy { retry_in_ms: at } | Attempt::Queued { retry_in_ms: at } => {
                retry_in_ms = retry_in_ms.min(at);
            }
        }
    }
    Ok(if again {
        Attempt::Again
    } else {
        Attempt::Busy { retry_in_ms }
    })
}

/// `fence.semaphore_status`: the semaphore's live permits, by permit key.
pub fn status(name: Option<&str>) -> Result<Vec<Lease>, Failure> {
    const F: &str = "semaphore_status";
    let name = check_name(F, name)?;
    // lock_key is COLLATE "C": the permit keys are the keys from
    // `<name>:permit:` up to, not including, `<name>:permit;`.
    let from = format!("{name}{PERMIT}");
    let to = format!("{name}{PERMIT_END}");
    let leases = lease::live_between(&from, &to)?;
    Ok(leases
        .into_iter()
        .filter(|lease| semaphore_of(&lease.lock_key) == Some(name))
        .collect())
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn permit_keys_name_their_semaphore() {
        assert_eq!(permit_key("jobs", 3), "jobs:permit:3");
        assert_eq!(semaphore_of("jobs:permit:3"), Some("jobs"));
        assert_eq!(semaphore_of("a:permit:b:permit:1024"), Some("a:permit:b"));
        for not_a_permit in [
            "jobs",
            "jobs:permit:",
            "jobs:permit:0",
            "jobs:permit:01",
            "jobs:permit:1025",
            "jobs:permit:*",
            ":permit:1",
            "jobs:permit:1x",
        ] {
            assert_eq!(semaphore_of(not_a_permit), None, "{not_a_permit}");
        }
        assert_eq!(semaphore_of(&queue_key("jobs")), None);
    }
}
