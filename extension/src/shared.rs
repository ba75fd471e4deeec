//! Shared (reader) leases: `fence.lock_acquire_shared` (0.2, issue 14).
//!
//! Any number of shared leases on a key at once, while it has no live
//! exclusive lease (G2: never an exclusive and a shared one at once). Each
//! is a row of `fence.shared_leases` with a token of its own from the one
//! global order (G1), its own expiry, and renew, release and force by
//! token with `lock_renew` / `lock_release` / `lock_force_release` on the
//! key (lease.rs falls back to this table when the token is not the
//! exclusive lease's). The exclusive lease stays in `fence.leases`, so the
//! fence check, `current_token`, `lock_status` and `lock_watch` never see a
//! shared one: fenced writes need the exclusive lease.
//!
//! Exclusion, by the key's lock (keylock.rs):
//! - a shared grant try-locks the key in row-exclusive mode until its
//!   transaction ends, then reads the exclusive lease as committed now; an
//!   exclusive grant holds the lock exclusively while it grants, so the
//!   shared grant either saw that lease or could not lock;
//! - an exclusive grant, holding the key exclusively, reads the key's
//!   shared leases as committed now (`holding`): a shared grant in flight
//!   holds the lock, so none is missed;
//! - renewing, releasing or re-acquiring a shared lease takes the key's
//!   lock in row-share mode (lease.rs, `Hold`), which conflicts with an
//!   exclusive grant only: an exclusive grant never judges a shared lease
//!   expired while its renewal is on the way, and a reader's grant in
//!   flight never holds up another reader's renewal;
//! - shared grants do not conflict with each other: readers are granted
//!   side by side.
//!
//! Writer preference (preload mode, G7): a shared request is held off by
//! an exclusive (or multi-key) waiter queued before it, so a writer is
//! granted under a continuous stream of readers; shared waiters queue in
//! the key's one queue with the exclusive ones, in arrival order. A queued
//! shared waiter that is granted wakes the next head once its grant has
//! committed: several readers behind a writer go in one after another. A
//! release of a shared lease wakes the head (an exclusive waiter looks, and
//! goes in once the last one has ended). Without preload there is no queue:
//! readers that keep overlapping can starve a writer.
//!
//! No upgrade or downgrade: the holder of a key's exclusive lease asking
//! for a shared one (or the other way round) is busy like anyone else.

use std::cell::OnceCell;
use std::sync::atomic::Ordering;

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiError};

use crate::acquire::{self, Attempt, Target};
use crate::args::required;
use crate::durability::issue_token;
use crate::errors::{fail, Failure, FenceError};
use crate::key::{check_key, MAX_KEY_BYTES};
use crate::lease::Lease;
use crate::roles::{is_fence_admin, not_owner};
use crate::{keylock, probe, shmem, stats, wait, waiters};

const LIVE: &str = "s.expires_at > pg_catalog.clock_timestamp()";

/// The statements on `fence.shared_leases`, prepared on first use: a
/// database still on the 0.1.0 schema has no such table, and its exclusive
/// leases must work all the same.
struct SharedPlans {
    grant: OwnedPreparedStatement,
    extend: OwnedPreparedStatement,
    prune: OwnedPreparedStatement,
    renew: OwnedPreparedStatement,
    release: OwnedPreparedStatement,
    force: OwnedPreparedStatement,
    live_owner: OwnedPreparedStatement,
}

impl SharedPlans {
    fn prepare(client: &SpiClient<'_>) -> Result<SharedPlans, SpiError> {
        use pg_sys::{BOOLOID, INT8OID, INTERVALOID, OIDOID, TEXTOID};
        let prep = |sql: String, args: &[pg_sys::Oid]| crate::plans::keep(client, &sql, args);
        Ok(SharedPlans {
            // The arguments of the exclusive grant statements (plans.rs).
            grant: prep(
                "INSERT INTO fence.shared_leases AS s \
                        (lock_key, token, holder, ttl, acquired_at, expires_at, owner_role, application_name) \
                 VALUES ($1, $3, $2, $4, $6, $6 + $4, $5, $7) \
                 RETURNING s.expires_at"
                    .into(),
                &crate::plans::GRANT_ARGUMENTS,
            )?,
            extend: prep(
                format!(
                    "UPDATE fence.shared_leases AS s \
                        SET ttl = $2, expires_at = pg_catalog.clock_timestamp() + $2 \
                      WHERE s.lock_key = $1 AND s.holder = $3 AND s.token = $4 AND {LIVE} \
                     RETURNING s.acquired_at, s.expires_at"
                ),
                &[TEXTOID, INTERVALOID, TEXTOID, INT8OID],
            )?,
            // Expired rows of the key, skipping any another shared grant is
            // deleting right now (never a wait, so never a deadlock).
            prune: prep(
                "DELETE FROM fence.shared_leases AS s WHERE s.ctid = ANY (ARRAY( \
                     SELECT e.ctid FROM fence.shared_leases AS e \
                      WHERE e.lock_key = $1 AND e.expires_at <= pg_catalog.clock_timestamp() \
                        FOR UPDATE SKIP LOCKED))"
                    .into(),
                &[TEXTOID],
            )?,
            renew: prep(
                format!(
                    "UPDATE fence.shared_leases AS s \
                        SET expires_at = pg_catalog.clock_timestamp() + COALESCE($3, s.ttl) \
                      WHERE s.lock_key = $1 AND s.token = $2 AND {LIVE} AND (s.owner_role = $4 OR $5) \
                     RETURNING s.expires_at"
                ),
                &[TEXTOID, INT8OID, INTERVALOID, OIDOID, BOOLOID],
            )?,
            release: prep(
                format!(
                    "DELETE FROM fence.shared_leases AS s \
                      WHERE s.lock_key = $1 AND s.token = $2 AND {LIVE} AND (s.owner_role = $3 OR $4) \
                     RETURNING s.acquired_at, pg_catalog.clock_timestamp()"
                ),
                &[TEXTOID, INT8OID, OIDOID, BOOLOID],
            )?,
            force: prep(
                format!(
                    "DELETE FROM fence.shared_leases AS s \
                      WHERE s.lock_key = $1 AND {LIVE} AND (s.owner_role = $2 OR $3) \
                     RETURNING s.acquired_at, pg_catalog.clock_timestamp()"
                ),
                &[TEXTOID, OIDOID, BOOLOID],
            )?,
            live_owner: prep(
                format!(
                    "SELECT s.owner_role::oid, s.token FROM fence.shared_leases AS s \
                      WHERE s.lock_key = $1 AND ($2::bigint IS NULL OR s.token = $2) AND {LIVE} \
                      ORDER BY s.token LIMIT 1"
                ),
                &[TEXTOID, INT8OID],
            )?,
        })
    }
}

thread_local! {
    static PLANS: OnceCell<SharedPlans> = const { OnceCell::new() };
}

fn with_plans<'c, R>(
    client: &mut SpiClient<'c>,
    work: impl FnOnce(&mut SpiClient<'c>, &SharedPlans) -> Result<R, Failure>,
) -> Result<R, Failure> {
    PLANS.with(|cell| {
        let plans = match cell.get() {
            Some(plans) => plans,
            None => {
                let plans = SharedPlans::prepare(client)?;
                cell.get_or_init(|| plans)
            }
        };
        work(client, plans)
    })
}

/// Whether the key has shared leases at all to fall back to: not in a
/// database still on the 0.1.0 schema.
fn exists() -> bool {
    crate::catalog::shared_leases_table().is_some()
}

/// `fence.lock_acquire_shared`.
pub fn acquire(
    lock_key: Option<&str>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
) -> Result<Option<Lease>, Failure> {
    const F: &str = "lock_acquire_shared";
    crate::roles::refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    Ok(acquire::run(F, Target::Shared(key), ttl, holder, wait, true)?.pop())
}

/// `fence._lock_acquire_shared`: with `adopt` as for `fence._lock_acquire`.
pub fn acquire_adopting(
    lock_key: Option<&str>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
    adopt: Option<bool>,
) -> Result<Option<Lease>, Failure> {
    const F: &str = "lock_acquire_shared";
    crate::roles::refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    let adopt = required(F, "adopt", adopt)?;
    Ok(acquire::run(F, Target::Shared(key), ttl, holder, wait, adopt)?.pop())
}

/// What a shared attempt asks for.
pub struct Request<'a> {
    pub key: &'a str,
    pub holder: &'a str,
    pub holder_given: bool,
    pub ttl: Interval,
    pub role: pg_sys::Oid,
    pub adopt: bool,
}

/// One attempt at a shared lease: the holder's own live one back (G6),
/// else busy while the exclusive lease is live or an exclusive waiter
/// queued first (G7, writer preference), else a new one.
pub fn attempt(
    client: &mut SpiClient<'_>,
    request: &Request<'_>,
    queued: Option<&waiters::Waiting>,
) -> Result<Attempt, Failure> {
    let key = request.key;
    // G6 for a named holder: one request of it at a time looks for its own
    // lease and writes one, so a retry racing its own request (both
    // waiting in the server) never gets a second lease. Held until the
    // transaction ends if this attempt grants, given back otherwise:
    // nothing is held across a sleep.
    let named = request.holder_given;
    if named && !keylock::try_holder(key, request.holder) {
        return Ok(Attempt::Busy {
            retry_in_ms: wait::LOCKED_ROW_RETRY_MS,
        });
    }
    let outcome = attempt_as_holder(client, request, queued);
    if named && !matches!(outcome, Ok(Attempt::Granted { .. })) {
        keylock::release_holder(key, request.holder);
    }
    outcome
}

fn attempt_as_holder(
    client: &mut SpiClient<'_>,
    request: &Request<'_>,
    queued: Option<&waiters::Waiting>,
) -> Result<Attempt, Failure> {
    let key = request.key;
    // SAFETY: inside a transaction, outside any scan.
    unsafe { pg_sys::CommandCounterIncrement() };
    let shared = probe::shared_rows(key, request.holder_given.then_some(request.holder))?;
    if let Some((token, owner)) = shared.own {
        if !request.adopt {
            return fail(FenceError::HolderInUse {
                lock_key: key.to_owned(),
                holder: request.holder.to_owned(),
            });
        }
        return with_plans(client, |client, plans| {
            extend(client, plans, request, token, owner)
        });
    }
    // Read as committed now, under any isolation level: an exclusive lease
    // granted after this transaction's snapshot must hold us off.
    let exclusive = probe::lease_row(key, probe::Snapshot::Latest, false)?
        .filter(|row| row.live)
        .map(|row| row.expires_at);
    let ahead = waiters::ahead(key, waiters::Mode::Shared, queued);
    if let Some(only_multi_key) = ahead.filter(|_| !keylock::held_by_me(key)) {
        let retry_in_ms = match exclusive {
            Some(expires_at) => TimestampWithTimeZone::try_from(expires_at)
                .map_or(wait::QUEUED_RECHECK_INTERVAL_MS, |at| {
                    acquire::millis_until(at, wait::QUEUED_RECHECK_INTERVAL_MS)
                }),
            None if only_multi_key => wait::QUEUED_RECHECK_INTERVAL_MS,
            None => wait::RECHECK_INTERVAL_MS,
        };
        return Ok(Attempt::Queued { retry_in_ms });
    }
    if let Some(expires_at) = exclusive {
        return Ok(Attempt::Busy {
            retry_in_ms: acquire::retry_until(expires_at),
        });
    }
    // G3, and exclusion from an exclusive grant in flight.
    if !keylock::try_shared_grant(key) {
        return Ok(Attempt::Busy {
            retry_in_ms: wait::LOCKED_ROW_RETRY_MS,
        });
    }
    // An exclusive grant may have committed between the look and the lock.
    if let Some(row) = probe::lease_row(key, probe::Snapshot::Latest, false)?.filter(|row| row.live)
    {
        keylock::release_shared_grant(key);
        return Ok(Attempt::Busy {
            retry_in_ms: acquire::retry_until(row.expires_at),
        });
    }
    mark(key);
    with_plans(client, |client, plans| {
        // Not under a transaction snapshot: locking a row another reader
        // changed since it was taken would fail with 40001.
        if shared.expired > 0 && !acquire::uses_transaction_snapshot() {
            client.update(&plans.prune, None, &[key.into()])?;
        }
        let token = issue_token()?;
        let now = acquire::clock_after_token()?;
        let outcome = acquire::grant_with(
            client,
            &plans.grant,
            None,
            key,
            request.holder,
            token,
            now,
            request.ttl,
            request.role,
            None,
        )?;
        if !matches!(outcome, Attempt::Granted { .. }) {
            keylock::release_shared_grant(key);
        }
        Ok(outcome)
    })
}

/// G6: the holder's own live shared lease, extended (same token).
fn extend(
    client: &mut SpiClient<'_>,
    plans: &SharedPlans,
    request: &Request<'_>,
    token: i64,
    owner: pg_sys::Oid,
) -> Result<Attempt, Failure> {
    let key = request.key;
    if owner != request.role && !is_fence_admin(request.role) {
        return fail(not_owner("re-acquire", key, token, owner, request.role));
    }
    keylock::row_share(key);
    let rows = client.update(
        &plans.extend,
        Some(1),
        &[
            key.into(),
            request.ttl.into(),
            request.holder.into(),
            token.into(),
        ],
    )?;
    if rows.is_empty() {
        keylock::release_row_share(key);
        // Found with the latest snapshot, but this transaction's own
        // cannot see it: say so rather than try again forever.
        if acquire::uses_transaction_snapshot() {
            return fail(FenceError::SharedLeaseNotInSnapshot {
                lock_key: key.to_owned(),
                holder: request.holder.to_owned(),
            });
        }
    } else {
        // Nothing fences a reader: its extension must not be lost.
        crate::durability::commit_durably();
    }
    acquire::grant_outcome(rows, key, request.holder, token)
}

/// For an exclusive grant holding the key's lock exclusively: how long to
/// wait if shared leases are live on the key (until the last one's expiry,
/// capped), None if none is. In preload mode a key that never had a reader
/// costs a bit test, not a read of the table (`may_have_readers`).
pub fn holding(key: &str) -> Result<Option<i64>, Failure> {
    if !may_have_readers(key)? {
        return Ok(None);
    }
    let rows = probe::shared_rows(key, None)?;
    Ok((rows.live > 0).then(|| acquire::retry_until(rows.last_expiry)))
}

/// The writers' filter (preload mode, `Header::shared_keys`): the bit of
/// `key` in this database.
fn filter_bit(segment: &shmem::Segment, key: &str) -> (usize, u64) {
    let bytes = &key.as_bytes()[..key.len().min(MAX_KEY_BYTES)];
    // SAFETY: a backend-local global, set at connection.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let bits = (shmem::SHARED_KEY_WORDS * 64) as u64;
    let bit = (segment.hash(database, bytes) % bits) as usize;
    (bit / 64, 1u64 << (bit % 64))
}

/// Set `key`'s bit: before a shared lease on it is written, under the
/// key's lock, so an exclusive grant (which takes that lock after this
/// grant has ended) sees it.
fn mark(key: &str) {
    if let Some(segment) = shmem::segment() {
        let (word, bit) = filter_bit(&segment, key);
        segment.header().shared_keys[word].fetch_or(bit, Ordering::SeqCst);
    }
}

/// Whether an exclusive grant must read `key`'s shared leases: always
/// without preload; in preload mode, when the key's bit is set. Bits are
/// set by every shared grant since the server started (`mark`); the rows
/// from before it started are read into the filter once per database (and
/// per `fence.shared_leases`: a re-created table is read again), by the
/// first exclusive grant that asks, with a dirty snapshot, so the rows of
/// transactions still in progress (a prepared one's, across a restart)
/// are read too. A reader granted while that read goes on set its bit
/// before writing its row, so no row is missed. Only rows written past the
/// lease functions (a `COPY` into the table of a database whose writers
/// have run since the start, say a data-only restore into a database in
/// use) could be: restore into a fresh database.
fn may_have_readers(key: &str) -> Result<bool, Failure> {
    let Some(segment) = shmem::segment() else {
        return Ok(true);
    };
    // A standby replays readers' rows without setting their bits, and a
    // promotion keeps the segment: in recovery, neither trust the filter
    // nor record a read of the table.
    // SAFETY: a read of shared state, no preconditions.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Ok(true);
    }
    let Some(table) = crate::catalog::shared_leases_table() else {
        // The 0.1.0 schema: no shared leases at all.
        return Ok(false);
    };
    // SAFETY: a backend-local global, set at connection.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let tag = (u64::from(database) << 32) | u64::from(table.to_u32());
    let scanned = &segment.header().shared_scanned;
    if !scanned
        .iter()
        .any(|entry| entry.load(Ordering::SeqCst) == tag)
    {
        if !scanned
            .iter()
            .any(|entry| entry.load(Ordering::SeqCst) == 0)
        {
            // No room to say it was read: read the key's rows every time.
            return Ok(true);
        }
        probe::shared_keys(|key| {
            let (word, bit) = filter_bit(&segment, key);
            segment.header().shared_keys[word].fetch_or(bit, Ordering::SeqCst);
        })?;
        let registered = scanned.iter().any(|entry| {
            match entry.compare_exchange(0, tag, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => true,
                Err(found) => found == tag,
            }
        });
        if !registered {
            return Ok(true);
        }
    }
    let (word, bit) = filter_bit(&segment, key);
    Ok(segment.header().shared_keys[word].load(Ordering::SeqCst) & bit != 0)
}

/// `lock_renew` of a shared lease (the key's lock held, lease.rs `Hold`): its new
/// expiry, None if no live shared lease of the caller's has this token.
pub fn renew(
    client: &mut SpiClient<'_>,
    key: &str,
    token: i64,
    ttl: Option<Interval>,
    role: pg_sys::Oid,
    admin: bool,
) -> Result<Option<TimestampWithTimeZone>, Failure> {
    if !exists() {
        return Ok(None);
    }
    with_plans(client, |client, plans| {
        let rows = client.update(
            &plans.renew,
            Some(1),
            &[
                key.into(),
                token.into(),
                ttl.into(),
                role.into(),
                admin.into(),
            ],
        )?;
        if rows.is_empty() {
            return Ok(None);
        }
        // Nothing fences a reader: a renewal it was told of must not be
        // lost in a crash or a failover (a writer would be granted at the
        // old expiry while the reader reads on).
        crate::durability::commit_durably();
        Ok(rows.first().get(1)?)
    })
}

/// `lock_release` of a shared lease (the key's lock held): how long
/// it was held, None if no live shared lease of the caller's has this
/// token. Its waiters hear of it after the commit.
pub fn release(
    client: &mut SpiClient<'_>,
    key: &str,
    token: i64,
    role: pg_sys::Oid,
    admin: bool,
) -> Result<Option<u64>, Failure> {
    if !exists() {
        return Ok(None);
    }
    with_plans(client, |client, plans| {
        let rows = client.update(
            &plans.release,
            Some(1),
            &[key.into(), token.into(), role.into(), admin.into()],
        )?;
        if rows.is_empty() {
            return Ok(None);
        }
        wait::wake_after_commit(key);
        let row = rows.first();
        Ok(Some(held(row.get(1)?, row.get(2)?)?))
    })
}

/// `lock_force_release` of the key's shared leases (the key's lock held):
/// every live one the caller may force, each one's time held.
pub fn force(
    client: &mut SpiClient<'_>,
    key: &str,
    role: pg_sys::Oid,
    admin: bool,
) -> Result<Vec<u64>, Failure> {
    if !exists() {
        return Ok(Vec::new());
    }
    with_plans(client, |client, plans| {
        let rows = client.update(&plans.force, None, &[key.into(), role.into(), admin.into()])?;
        let mut held_for = Vec::with_capacity(rows.len());
        for row in rows {
            held_for.push(held(row.get(1)?, row.get(2)?)?);
        }
        if !held_for.is_empty() {
            wait::wake_after_commit(key);
        }
        Ok(held_for)
    })
}

/// How long a lease was held, from a release's `acquired_at` and end.
fn held(
    acquired: Option<TimestampWithTimeZone>,
    released: Option<TimestampWithTimeZone>,
) -> Result<u64, Failure> {
    match acquired.zip(released) {
        Some((from, to)) => Ok(stats::micros_between(from, to)),
        None => fail(FenceError::internal(
            "a NOT NULL shared lease column was NULL".into(),
        )),
    }
}

/// A live shared lease on `key` (with `token`, if given): its owner and
/// token, for the 42501 of a caller that is not its owner.
pub fn live_owner(
    client: &mut SpiClient<'_>,
    key: &str,
    token: Option<i64>,
) -> Result<Option<(pg_sys::Oid, i64)>, Failure> {
    if !exists() {
        return Ok(None);
    }
    with_plans(client, |client, plans| {
        let rows = client.select(&plans.live_owner, Some(1), &[key.into(), token.into()])?;
        if rows.is_empty() {
            return Ok(None);
        }
        let row = rows.first();
        match (row.get(1)?, row.get(2)?) {
            (Some(owner), Some(token)) => Ok(Some((owner, token))),
            _ => fail(FenceError::internal(
                "a NOT NULL shared lease column was NULL".into(),
            )),
        }
    })
}
