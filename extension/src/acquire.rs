//! `lock_acquire`: the attempt loop and the grant (guarantees G1, G2, G6).
//!
//! Before granting, acquire try-locks the key exclusively (keylock.rs) until
//! its transaction ends: another grant in flight holds that lock, so two
//! acquires can never both grant (G2), and so does a fenced write in flight,
//! in share mode (G3), and a renew, release, force-release or holder's
//! re-acquire writing the row, also in share mode. A key whose row is free and untouched is then granted
//! with one update (the fast path). A row that another transaction has
//! locked or updated since (a release in flight), and every row under
//! REPEATABLE READ or SERIALIZABLE, is locked `FOR UPDATE SKIP LOCKED`
//! inside an internal subtransaction first: still locked counts as busy.
//!
//! A waiting acquire sleeps between attempts inside the server (wait.rs).

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};

use crate::args::{check_holder, exact_ttl, non_negative, required};
use crate::durability::issue_token;
use crate::errors::{fail, Failure, FenceError};
use crate::key::check_key;
use crate::lease::{granted, Lease};
use crate::plans::{with_spi, Plans};
use crate::roles::{caller_role, is_fence_admin, not_owner, refuse_security_restricted};
use crate::subxact::in_subtransaction;
use crate::{keylock, multi, probe, semaphore, shared, stats, wait, waiters};

/// What an acquire is for: one key, any one permit of a semaphore, or
/// every one of several keys (distinct, in "C" order) under one token.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    Key(&'a str),
    Semaphore {
        name: &'a str,
        permits: i32,
    },
    All(&'a [String]),
    /// A shared (reader) lease on one key (shared.rs).
    Shared(&'a str),
}

pub enum Attempt {
    Granted {
        lease: Lease,
        /// The holder's own live lease, extended (G6).
        regrant: bool,
        /// The lease this grant replaced had ended by expiry after being
        /// held this long (for the statistics).
        expired_after_micros: Option<u64>,
    },
    /// Every key of a multi-key acquire, under one token: each lease with
    /// what it replaced had ended by expiry after (statistics).
    GrantedAll {
        leases: Vec<(Lease, Option<u64>)>,
        regrant: bool,
    },
    /// Held by someone else; try again in at most this many milliseconds.
    Busy { retry_in_ms: i64 },
    /// Lost a race to create the key's row; retry at once.
    Again,
    /// Someone queued for the key arrived first (preload mode, G7): sleep
    /// until woken (the queue wakes its head), or at most this long (until
    /// the lease seen expires, capped), to learn whether it is our turn.
    Queued { retry_in_ms: i64 },
}

fn now_micros() -> i64 {
    // SAFETY: a plain read of the backend's clock, no preconditions.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Milliseconds until `at` (rounded up, so we wake after it), capped.
pub fn millis_until(at: TimestampWithTimeZone, cap: i64) -> i64 {
    let micros: i64 = at.into_inner().saturating_sub(now_micros());
    (micros.saturating_add(999) / 1000).clamp(1, cap)
}

pub fn uses_transaction_snapshot() -> bool {
    // SAFETY: reads a backend-local global set by the transaction machinery.
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

pub fn acquire(
    lock_key: Option<&str>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
) -> Result<Option<Lease>, Failure> {
    const F: &str = "lock_acquire";
    refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    Ok(run(F, Target::Key(key), ttl, holder, wait, true)?.pop())
}

/// `fence._lock_acquire`: `lock_acquire` for pg_fence_client, which says
/// whether the holder's own live lease may come back (`adopt`, G6): only
/// for a retry of a request whose reply was lost. Without it, finding the
/// key leased to the holder already (another guard with the same holder
/// id) is `FN002`, and nothing changes.
pub fn acquire_adopting(
    lock_key: Option<&str>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
    adopt: Option<bool>,
) -> Result<Option<Lease>, Failure> {
    const F: &str = "lock_acquire";
    refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    let adopt = required(F, "adopt", adopt)?;
    Ok(run(F, Target::Key(key), ttl, holder, wait, adopt)?.pop())
}

/// The acquire loop of `lock_acquire`, `semaphore_acquire` and
/// `lock_acquire_all` (`function`, which has refused a security-restricted
/// caller and checked the target): attempt, and while busy and `wait`
/// lasts, queue (preload mode) and sleep until woken or the lease seen
/// ends. The leases granted: none, one, or (`Target::All`) one per key.
pub fn run(
    function: &'static str,
    target: Target<'_>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
    adopt: bool,
) -> Result<Vec<Lease>, Failure> {
    // A key's waiters queue under the key; a semaphore's under its queue key.
    let (queue_key, mode, counted_as) = match target {
        Target::Key(key) => (
            std::borrow::Cow::Borrowed(key),
            waiters::Mode::Exclusive,
            key,
        ),
        Target::Semaphore { name, .. } => (
            semaphore::queue_key(name).into(),
            waiters::Mode::Semaphore,
            name,
        ),
        // In the key's one queue, with its exclusive waiters.
        Target::Shared(key) => (std::borrow::Cow::Borrowed(key), waiters::Mode::Shared, key),
        // Queued under every key; asleep on the wait event of the key in
        // the way (without preload), the first one to begin with.
        Target::All(keys) => (
            std::borrow::Cow::Borrowed(keys[0].as_str()),
            waiters::Mode::All,
            keys[0].as_str(),
        ),
    };
    let ttl = exact_ttl(function, &required(function, "ttl", ttl)?)?;
    let wait_micros = non_negative(function, "wait", &required(function, "wait", wait)?)?;
    if wait_micros > 0 && uses_transaction_snapshot() {
        return fail(FenceError::WaitNeedsReadCommitted {
            lock_key: counted_as.to_owned(),
        });
    }
    let holder_given = holder.is_some();
    let holder = check_holder(function, holder)?;
    let role = caller_role();
    let started = now_micros();
    let deadline = started.saturating_add(i64::try_from(wait_micros).unwrap_or(i64::MAX));
    let mut event = wait::wait_event_for(&queue_key);
    let mut contended = false;
    // A multi-key waiter's places in its keys' queues (multi.rs).
    let mut reservation = multi::Reservation::default();
    let mut places = 0;
    // In fence.waiters while it sleeps; leaves on drop, whatever the exit.
    let mut waiting: Option<waiters::Waiting> = None;

    let (granted, regrant) = loop {
        if wait_micros > 0 {
            wait::reset_latch();
            wait::advertise(event);
        }
        let queued = waiting.as_ref();
        let mut blocked = multi::Blocked::default();
        let outcome = with_spi(|client, plans| match target {
            Target::Key(key) => attempt(client, plans, key, &holder, ttl, role, queued, adopt),
            Target::Semaphore { name, permits } => semaphore::attempt(
                client,
                plans,
                name,
                permits,
                &holder,
                holder_given,
                ttl,
                role,
                queued,
                adopt,
            ),
            Target::Shared(key) => shared::attempt(
                client,
                &shared::Request {
                    key,
                    holder: &holder,
                    holder_given,
                    ttl,
                    role,
                    adopt,
                },
                queued,
            ),
            Target::All(keys) => multi::attempt(
                client,
                plans,
                &multi::Request {
                    keys,
                    holder: &holder,
                    holder_given,
                    ttl,
                    role,
                    adopt,
                },
                queued,
                &mut blocked,
            ),
        })?;
        if let Target::All(keys) = target {
            if let Some(i) = blocked.on {
                event = wait::wait_event_for(&keys[i]);
                if wait_micros > 0 {
                    // A release of that key from now on must find us.
                    wait::advertise(event);
                }
            }
            places = reservation.places(blocked.held, keys.len(), now_micros());
            if waiting.is_some() && !matches!(outcome, Attempt::GrantedAll { .. }) {
                waiters::hold_places(places);
            }
        }
        match outcome {
            Attempt::Granted {
                lease,
                regrant,
                expired_after_micros,
            } => break (vec![(lease, expired_after_micros)], regrant),
            Attempt::GrantedAll { leases, regrant } => break (leases, regrant),
            Attempt::Again => continue,
            Attempt::Busy { retry_in_ms } | Attempt::Queued { retry_in_ms } => {
                contended = true;
                let left_ms = (deadline.saturating_sub(now_micros()) + 999) / 1000;
                if left_ms <= 0 {
                    // In the queue, leaving it wakes the next waiter (the
                    // guard's drop); without one, pass on a wake-up we got.
                    if wait_micros > 0 && waiting.is_none() {
                        wait::pass_on_wakeup(event);
                    }
                    break (Vec::new(), false);
                }
                if waiting.is_none() {
                    waiting = match target {
                        Target::All(keys) => waiters::enter_all(keys, role, deadline, places),
                        _ => waiters::enter(&queue_key, mode, role, deadline),
                    };
                }
                wait::sleep(event, retry_in_ms.min(left_ms));
            }
        }
    };
    // A waiter granted the key leaves the queue without waking the next:
    // the key is held now, and its release wakes the next head. A
    // semaphore's waiter wakes the next once its grant has committed (and
    // let go of the permit's lock): another permit may be free.
    if let (Some(waiting), Some((lease, _))) = (waiting.as_mut(), granted.first()) {
        waiting.granted();
        if let Target::Semaphore { .. } = target {
            wait::wake_after_commit(&lease.lock_key);
        }
    }
    // A reader that had to wait wakes the next waiter once its grant has
    // committed: readers behind it may go in too (and without preload,
    // where nothing queues, they are not left to their next look).
    if let (Target::Shared(key), false, true, false) =
        (target, granted.is_empty(), contended, regrant)
    {
        wait::wake_after_commit(key);
    }
    // If this grant is rolled back, the keys are free again: wake the
    // queues. If it commits, whoever watches the keys hears of it (a
    // watch follows the exclusive lease: a reader's grant is not news).
    if !regrant {
        for (lease, _) in &granted {
            wait::wake_if_rolled_back(&lease.lock_key);
            if !matches!(target, Target::Shared(_)) {
                wait::wake_watchers_after_commit(&lease.lock_key);
            }
        }
    }
    drop(waiting);
    if wait_micros > 0 {
        wait::stop_advertising();
    }
    if stats::counting() {
        let micros = u64::try_from(now_micros().saturating_sub(started)).unwrap_or(0);
        let call = |expired_after_micros| stats::Acquired {
            outcome: match (granted.is_empty(), regrant) {
                (true, _) => stats::Outcome::Busy,
                (false, false) => stats::Outcome::Granted,
                (false, true) => stats::Outcome::Regranted,
            },
            contended,
            waited: wait_micros > 0,
            micros,
            expired_after_micros,
        };
        match target {
            // A multi-key acquire counts as an acquire of each key: each
            // got (or did not get) a lease of its own.
            Target::All(keys) if granted.is_empty() => {
                for key in keys {
                    stats::acquire(key, &call(None));
                }
            }
            Target::All(_) => {
                for (lease, expired_after_micros) in &granted {
                    stats::acquire(&lease.lock_key, &call(*expired_after_micros));
                }
            }
            _ => stats::acquire(
                counted_as,
                &call(granted.first().and_then(|(_, expired)| *expired)),
            ),
        }
    }
    Ok(granted.into_iter().map(|(lease, _)| lease).collect())
}

#[allow(clippy::too_many_arguments)]
pub fn attempt(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    key: &str,
    holder: &str,
    ttl: Interval,
    role: pg_sys::Oid,
    queued: Option<&waiters::Waiting>,
    adopt: bool,
) -> Result<Attempt, Failure> {
    // Look first, without locking: a key someone else holds costs no lock.
    // (A statement would first make this transaction's earlier changes
    // visible; so does the probe.)
    // SAFETY: inside a transaction (every pg_extern is), outside any scan.
    unsafe { pg_sys::CommandCounterIncrement() };
    let row = probe::lease_row(key, probe::Snapshot::Statement, true)?;
    let own_live_lease = row
        .as_ref()
        .is_some_and(|row| row.live && row.holder.as_deref() == Some(holder));
    // G7: whoever queued for the key first takes it first; only the holder
    // extending its own lease (G6) grants nothing new and passes. So does a
    // transaction that already holds the key's lock (it released the lease,
    // or wrote under it, earlier): nobody ahead can be granted the key
    // before it ends, so queueing it behind them would only stall both.
    let ahead = if own_live_lease {
        None
    } else {
        waiters::ahead(key, waiters::Mode::Exclusive, queued)
    };
    if let Some(only_multi_key) = ahead.filter(|_| !keylock::held_by_me(key)) {
        // Asleep until woken, or until the lease it sees ends. Seeing none,
        // the head is about to take the key: look again soon, to learn of
        // the new lease (and so of its expiry) rather than a second late.
        // Not so a multi-key head, which may wait long for its other keys:
        // it wakes this queue when it leaves, and its release does too.
        let retry_in_ms = match row.as_ref().filter(|row| row.live) {
            Some(row) => TimestampWithTimeZone::try_from(row.expires_at)
                .map_or(wait::QUEUED_RECHECK_INTERVAL_MS, |at| {
                    millis_until(at, wait::QUEUED_RECHECK_INTERVAL_MS)
                }),
            None if only_multi_key => wait::QUEUED_RECHECK_INTERVAL_MS,
            None => wait::RECHECK_INTERVAL_MS,
        };
        return Ok(Attempt::Queued { retry_in_ms });
    }
    let Some(row) = row else {
        // No row yet: create it. The key lock also keeps out another first
        // acquire inserting it right now; an insert that conflicts anyway
        // found it created (and committed) by someone else since we looked.
        return grant_under_key_lock(client, plans, key, holder, ttl, role, None);
    };
    let live = row.live;
    if live && row.holder.as_deref() == Some(holder) {
        if !adopt {
            return fail(FenceError::HolderInUse {
                lock_key: key.to_owned(),
                holder: holder.to_owned(),
            });
        }
        return extend_own_lease(
            client,
            plans,
            key,
            holder,
            row.token,
            row.owner_role,
            ttl,
            role,
        );
    }
    // Under REPEATABLE READ / SERIALIZABLE the peek saw the transaction's
    // snapshot, perhaps stale: lock instead, which fails with 40001 if the
    // key changed since, rather than answer "busy" for a key now free.
    if uses_transaction_snapshot() {
        return in_subtransaction(
            || take_locked_row(client, plans, key, holder, ttl, role),
            granted_a_lease,
        );
    }
    if live {
        return Ok(busy_until(
            TimestampWithTimeZone::try_from(row.expires_at).ok(),
        ));
    }
    if row.untouched {
        let replaced = Replaced {
            token: row.token,
            expired_after_micros: row.expired_after_micros,
        };
        return grant_under_key_lock(client, plans, key, holder, ttl, role, Some(replaced));
    }
    // Free, but some transaction has locked or updated the row version we
    // saw (a release in flight, an aborted grant): lock it, skipping it if
    // it is still locked, and decide again on what we locked.
    in_subtransaction(
        || take_locked_row(client, plans, key, holder, ttl, role),
        granted_a_lease,
    )
}
/// Whether an attempt's subtransaction is kept: only a grant is.
fn granted_a_lease(attempt: &Attempt) -> bool {
    matches!(attempt, Attempt::Granted { .. })
}

/// How long to sleep for a lease that expires at `expires_at`: until then,
/// at most [`wait::RECHECK_INTERVAL_MS`].
pub fn retry_until(expires_at: pg_sys::TimestampTz) -> i64 {
    match TimestampWithTimeZone::try_from(expires_at) {
        Ok(at) => millis_until(at, wait::RECHECK_INTERVAL_MS),
        Err(_) => wait::RECHECK_INTERVAL_MS,
    }
}

fn busy_until(expires_at: Option<TimestampWithTimeZone>) -> Attempt {
    let retry_in_ms =
        expires_at.map_or(wait::RECHECK_INTERVAL_MS, |at| retry_until(at.into_inner()));
    Attempt::Busy { retry_in_ms }
}

/// Lock the key exclusively for this (sub)transaction, the right to grant a
/// new lease on it; `Some(Busy)` if a fenced write or another grant holds it.
/// Shared leases live on the key hold it off too (G2): busy until the
/// last one's expiry (capped), or until a release wakes us.
fn claim_key(key: &str) -> Result<Option<Attempt>, Failure> {
    if !keylock::try_exclusive(key) {
        return Ok(Some(Attempt::Busy {
            retry_in_ms: wait::LOCKED_ROW_RETRY_MS,
        }));
    }
    if let Some(retry_in_ms) = shared::holding(key)? {
        keylock::release_exclusive(key);
        return Ok(Some(Attempt::Busy { retry_in_ms }));
    }
    Ok(None)
}

fn take_locked_row(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    key: &str,
    holder: &str,
    ttl: Interval,
    role: pg_sys::Oid,
) -> Result<Attempt, Failure> {
    // G3: a fenced write that checked the old lease still holds the key in
    // share mode; no new lease until its transaction ends. Tried first, so a
    // busy key costs no row lock and no transaction id.
    if let Some(busy) = claim_key(key)? {
        return Ok(busy);
    }
    match lock_free_row(client, plans, key, holder)? {
        Ok(replaced) => grant(client, plans, key, holder, ttl, role, Some(replaced)),
        Err(not_free) => Ok(not_free),
    }
}

/// Lock the key's row (which exists) `FOR UPDATE SKIP LOCKED`, with the
/// key's lock already held: the version a grant's update will replace, or
/// why there is none to grant (still locked: busy; live: busy, or `Again`
/// for the holder's own lease, which the next attempt extends).
pub fn lock_free_row(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    key: &str,
    holder: &str,
) -> Result<Result<Replaced, Attempt>, Failure> {
    let rows = client.update(&plans.lock_row, Some(1), &[key.into()])?;
    if rows.is_empty() {
        // Another transaction has the row locked. It holds no key lock (we
        // have it), so it is an aborted grant's leftover being cleaned up or
        // someone locking the table by hand. Nobody signals when a row lock
        // ends, so retry soon.
        return Ok(Err(Attempt::Busy {
            retry_in_ms: wait::LOCKED_ROW_RETRY_MS,
        }));
    }
    let row = rows.first();
    let current_holder: Option<String> = row.get(1)?;
    let live: bool = row.get(2)?.unwrap_or(false);
    let expires_at: Option<TimestampWithTimeZone> = row.get(3)?;
    let token: Option<i64> = row.get(4)?;
    let unreleased_since: Option<TimestampWithTimeZone> = row.get(5)?;
    if live {
        // Taken since we looked; if by this holder, the next attempt extends it.
        return Ok(Err(if current_holder.as_deref() == Some(holder) {
            Attempt::Again
        } else {
            busy_until(expires_at)
        }));
    }
    // We hold the row lock, so the update matches, and the version it
    // replaces is the one read here.
    Ok(Ok(Replaced {
        token: token.unwrap_or_default(),
        expired_after_micros: unreleased_since
            .zip(expires_at)
            .map(|(from, to)| stats::micros_between(from, to)),
    }))
}

/// G6: the holder retrying (say after a lost reply) gets its live lease back,
/// same token, `expires_at = now + ttl`. A plain update, like renew: it must
/// not wait for, or be turned away by, fenced writes: both share-lock the key.
#[allow(clippy::too_many_arguments)]
pub fn extend_own_lease(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    key: &str,
    holder: &str,
    token: i64,
    owner: pg_sys::Oid,
    ttl: Interval,
    role: pg_sys::Oid,
) -> Result<Attempt, Failure> {
    if owner != role && !is_fence_admin(role) {
        return fail(not_owner("re-acquire", key, token, owner, role));
    }
    keylock::share(key);
    let rows = client.update(
        &plans.extend,
        Some(1),
        &[key.into(), ttl.into(), holder.into(), token.into()],
    )?;
    // None matched: it expired or was released since we looked.
    if rows.is_empty() {
        keylock::release_share(key);
    }
    grant_outcome(rows, key, holder, token)
}

/// The grant of the paths without a subtransaction, for a key with no row
/// yet (`grant_insert`) or a row that is not live and that no transaction has
/// locked or updated since it was written (`grant_update`, the fast path):
/// take the key lock (busy if a grant or a fenced write holds it), then
/// grant; if the statement matched nothing, give the key lock back at once.
///
/// No row lock is needed. Every path that can make a lease row live again (a
/// grant) takes the key lock exclusively first, and everything else that
/// writes the row (renew, release, force, a holder's re-acquire) takes it in
/// share mode before its update and matches only a live lease. So holding the
/// key lock, nobody else can change this row: a renew that judged the lease
/// live just before it expired has either committed (and the grant's update,
/// which matches only a row that is not live, sees the renewal and matches
/// nothing) or still holds its share lock (and we never got ours). The update
/// therefore neither waits for a row lock, nor keeps one, nor races another
/// grant. A grant that matches nothing has spent a token and its transaction
/// commits durably, which only a race with a grant or renewal costs.
fn grant_under_key_lock(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    key: &str,
    holder: &str,
    ttl: Interval,
    role: pg_sys::Oid,
    replaced: Option<Replaced>,
) -> Result<Attempt, Failure> {
    if let Some(busy) = claim_key(key)? {
        return Ok(busy);
    }
    let outcome = grant(client, plans, key, holder, ttl, role, replaced)?;
    if !matches!(outcome, Attempt::Granted { .. }) {
        keylock::release_exclusive(key);
    }
    Ok(outcome)
}

/// The row version a grant's update replaces, as the caller read it.
pub struct Replaced {
    /// Its token: the update matches only that version (`$8`), so what the
    /// caller knows of it is what the update overwrites. A lease that is not
    /// live changes only by a new grant, which brings a new token.
    pub token: i64,
    /// It had ended by expiry after being held this long (statistics).
    pub expired_after_micros: Option<u64>,
}

/// Issue a token and run a grant statement (`$1` key, `$2` holder, `$3`
/// token, `$4` ttl, `$5` role, `$6` now, `$7` application_name, and for the
/// update `$8` the replaced version's token; returning `expires_at`). `now`
/// is `clock_timestamp()`, taken after the token.
#[allow(clippy::too_many_arguments)]
fn grant(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    key: &str,
    holder: &str,
    ttl: Interval,
    role: pg_sys::Oid,
    replaced: Option<Replaced>,
) -> Result<Attempt, Failure> {
    let token = issue_token()?;
    let now = clock_after_token()?;
    grant_as(client, plans, key, holder, token, now, ttl, role, replaced)
}

/// `clock_timestamp()`, read after a token was issued: the grant's
/// `acquired_at`, so no lease under a token starts before it was issued.
pub fn clock_after_token() -> Result<TimestampWithTimeZone, Failure> {
    TimestampWithTimeZone::try_from(now_micros())
        .map_err(|_| FenceError::internal("clock_timestamp() out of range".into()).here())
}

/// Run an exclusive grant with a token already issued, taken at `now`:
/// [`grant`]'s, and each key's of a multi-key grant. The statement is the
/// update of the row version `replaced` names, or the key's insert; for a
/// key whose term history is kept (history.rs) the same one that also
/// writes the term, in the grant's own statement (any other key's grant
/// writes nothing more).
#[allow(clippy::too_many_arguments)]
pub fn grant_as(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    key: &str,
    holder: &str,
    token: i64,
    now: TimestampWithTimeZone,
    ttl: Interval,
    role: pg_sys::Oid,
    replaced: Option<Replaced>,
) -> Result<Attempt, Failure> {
    let kept = match (
        &replaced,
        &plans.grant_update_kept,
        &plans.grant_insert_kept,
    ) {
        (Some(_), Some(update), _) => Some(update),
        (None, _, Some(insert)) => Some(insert),
        _ => None,
    };
    let keep = match kept {
        Some(_) => crate::probe::history_keep(key)?,
        None => None,
    };
    let statement = match (kept, &keep) {
        (Some(statement), Some(_)) => statement,
        _ if replaced.is_some() => &plans.grant_update,
        _ => &plans.grant_insert,
    };
    grant_with(
        client, statement, keep, key, holder, token, now, ttl, role, replaced,
    )
}

/// Run a grant statement (`$1` key, `$2` holder, `$3` token, `$4` ttl,
/// `$5` role, `$6` now, `$7` application_name, then the replaced version's
/// token if `replaced`, then `keep` if given; returning `expires_at`):
/// [`grant_as`]'s, and a shared grant's.
#[allow(clippy::too_many_arguments)]
pub fn grant_with(
    client: &mut SpiClient<'_>,
    statement: &OwnedPreparedStatement,
    keep: Option<Interval>,
    key: &str,
    holder: &str,
    token: i64,
    now: TimestampWithTimeZone,
    ttl: Interval,
    role: pg_sys::Oid,
    replaced: Option<Replaced>,
) -> Result<Attempt, Failure> {
    let mut arguments = vec![
        key.into(),
        holder.into(),
        token.into(),
        ttl.into(),
        role.into(),
        now.into(),
        application_name().into(),
    ];
    if let Some(replaced) = &replaced {
        arguments.push(replaced.token.into());
    }
    if let Some(keep) = keep {
        arguments.push(keep.into());
    }
    let rows = client.update(statement, Some(1), &arguments)?;
    if rows.is_empty() {
        return Ok(Attempt::Again);
    }
    Ok(Attempt::Granted {
        lease: granted(key, holder, token, Some(now), rows.first().get(1)?)?,
        regrant: false,
        expired_after_micros: replaced.and_then(|replaced| replaced.expired_after_micros),
    })
}

/// This session's `application_name`, recorded with a grant.
fn application_name() -> Option<String> {
    // SAFETY: application_name is a backend-local GUC variable: NULL or a
    // NUL-terminated string that lives as long as the setting; copied before anything
    // can change it.
    unsafe {
        let name = pg_sys::application_name;
        (!name.is_null()).then(|| {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        })
    }
}

/// The outcome of a statement that grants (returning `acquired_at`,
/// `expires_at`): `Again` if it matched no row, else the lease.
pub fn grant_outcome(
    rows: pgrx::spi::SpiTupleTable<'_>,
    key: &str,
    holder: &str,
    token: i64,
) -> Result<Attempt, Failure> {
    if rows.is_empty() {
        return Ok(Attempt::Again);
    }
    let row = rows.first();
    Ok(Attempt::Granted {
        lease: granted(key, holder, token, row.get(1)?, row.get(2)?)?,
        regrant: true,
        expired_after_micros: None,
    })
}
