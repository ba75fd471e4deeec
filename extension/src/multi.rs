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
//! Waiting (preload mode, G7): the caller is one waiter in the exclusive
//! queue of each of its keys, at its arrival. A single-key newcomer does not
//! barge past it on any of them, and the earliest waiter is ahead in every
//! queue it is in, so it waits only for holders, whose leases end. Without
//! preload it sleeps on the wait event of the key in its way.
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

/// The keys of a call: not NULL (22004), 1 to [`MAX_KEYS`] of them after
/// duplicates are dropped (22023), each a valid key; distinct, in "C" (byte)
/// order, the order their locks are taken in.
pub fn check_keys(
    function: &'static str,
    lock_keys: Option<Vec<Option<String>>>,
) -> Result<Vec<String>, Failure> {
    let lock_keys = required(function, "lock_keys", lock_keys)?;
    let invalid = |problem: String| FenceError::InvalidArgument {
        function,
        argument: "lock_keys",
        problem,
    };
    if lock_keys.is_empty() {
        return fail(invalid("must name at least one key".into()));
    }
    let mut keys = Vec::with_capacity(lock_keys.len());
    for (i, key) in lock_keys.into_iter().enumerate() {
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
        keys.push(key);
    }
    keys.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    keys.dedup();
    if keys.len() > MAX_KEYS {
        return fail(invalid(format!(
            "names {} distinct keys, the limit is {MAX_KEYS}",
            keys.len()
        )));
    }
    Ok(keys)
}

/// `fence.lock_acquire_all`: every key or none, one token for all.
pub fn acquire(
    lock_keys: Option<Vec<Option<String>>>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
) -> Result<Vec<Lease>, Failure> {
    const F: &str = "lock_acquire_all";
    crate::roles::refuse_security_restricted(F)?;
    let keys = check_keys(F, lock_keys)?;
    acquire::run(F, Target::All(&keys), ttl, holder, wait)
}

/// `fence.lock_release_all`: end those keys' leases with this token; how
/// many were live. Each key as `lock_release` would, in one statement: an
/// error on one (a lease of another role) leaves all of them as they were.
pub fn release(lock_keys: Option<Vec<Option<String>>>, token: Option<i64>) -> Result<i32, Failure> {
    const F: &str = "lock_release_all";
    crate::roles::refuse_security_restricted(F)?;
    let keys = check_keys(F, lock_keys)?;
    let token = required(F, "token", token)?;
    let mut released = 0;
    for key in &keys {
        if lease::release_key(key, token)? {
            released += 1;
        }
    }
    Ok(released)
}

/// What a multi-key attempt asks for.
pub struct Request<'a> {
    /// Distinct, in "C" order ([`check_keys`]).
    pub keys: &'a [String],
    pub holder: &'a str,
    pub holder_given: bool,
    pub ttl: Interval,
    pub role: pg_sys::Oid,
}

/// One attempt at every key. `blocked_on` is set to the index of a key in
/// the way, whose wait event the caller sleeps on without preload.
pub fn attempt(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    request: &Request<'_>,
    queued: Option<&waiters::Waiting>,
    blocked_on: &mut Option<usize>,
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
            return extend_all(client, plans, request, &rows, token);
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
        *blocked_on = Some(i);
        return Ok(Attempt::Queued {
            retry_in_ms: earliest_expiry
                .unwrap_or(wait::RECHECK_INTERVAL_MS)
                .min(wait::QUEUED_RECHECK_INTERVAL_MS),
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
            *blocked_on = Some(i);
            return Ok(Attempt::Busy {
                retry_in_ms: earliest_expiry.unwrap_or(wait::RECHECK_INTERVAL_MS),
            });
        }
    }
    in_subtransaction(
        || grant_all(client, plans, request, &rows, stale, blocked_on),
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
    blocked_on: &mut Option<usize>,
) -> Result<Attempt, Failure> {
    let keys = request.keys;
    // Try-locks only: never waiting for one while holding others is what
    // keeps any mix of callers from deadlocking.
    if let Some(i) = keys.iter().position(|key| !keylock::try_exclusive(key)) {
        *blocked_on = Some(i);
        return Ok(Attempt::Busy {
            retry_in_ms: wait::LOCKED_ROW_RETRY_MS,
        });
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
                    *blocked_on = Some(i);
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
        let statement = if replaced.is_some() {
            &plans.grant_update
        } else {
            &plans.grant_insert
        };
        match acquire::grant_as(
            client,
            statement,
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
    fn keys_are_distinct_and_in_byte_order() {
        let keys = check_keys(
            "t",
            Some(vec![
                Some("b".into()),
                Some("a".into()),
                Some("B".into()),
                Some("a".into()),
            ]),
        )
        .ok()
        .unwrap();
        assert_eq!(keys, ["B", "a", "b"]);
    }
}
