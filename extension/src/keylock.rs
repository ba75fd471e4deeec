//! The lock that makes fenced writes and new grants conflict (G3), held in
//! PostgreSQL's lock manager rather than on the lease row.
//!
//! A fenced write takes the key's lock in share mode before it reads the
//! lease, and so do renew, release, force-release and a holder's re-acquire
//! before they update the lease row; `lock_acquire` try-takes it exclusively
//! before it grants a new lease, and `lock_acquire_shared` in row-exclusive
//! mode (which conflicts with both, but not with itself); a change to a
//! shared lease holds it in row-share mode, which only an exclusive grant
//! conflicts with (lease.rs, `Hold`). The locks last until the transaction ends
//! (a grant attempt inside an internal subtransaction, until that ends),
//! except that a grant or renew/release whose statement matched nothing gives
//! its hold back at once. So once a write has passed its check no newer lease
//! on that key can be granted until the writing transaction ends, and a write that comes after a grant waits for the granting
//! transaction to commit and then sees the new lease. Unlike a `FOR KEY
//! SHARE` row lock this writes no WAL and dirties no page, which is what a
//! check that runs on every protected row must not do.
//!
//! The lock is an advisory lock on a keyed 64-bit hash of the key (key.rs,
//! `lock_hash`): visible in `pg_locks` as `locktype = 'advisory'`, `classid`
//! and `objid` the hash's two halves, `objsubid = 3`, a tag the SQL advisory
//! lock functions cannot produce. Two keys with the same hash would share a
//! lock; with 64 bits under a secret nobody can find a key that shares a
//! given key's lock. Each distinct key a transaction writes under takes one slot of
//! the shared lock table (`max_locks_per_transaction`).

use pgrx::pg_sys;

use crate::key;

/// The key's lock as `pg_locks` shows it, `classid << 32 | objid`: for the
/// `fence.blockers` view (sql/fence.sql), which finds who holds a key up.
#[pgrx::pg_extern(immutable, strict, parallel_safe)]
fn _key_lock_id(lock_key: &str) -> i64 {
    let (high, low) = key::lock_hash(lock_key);
    ((u64::from(high) << 32) | u64::from(low)) as i64
}

fn tag(lock_key: &str) -> pg_sys::LOCKTAG {
    let (high, low) = key::lock_hash(lock_key);
    // SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, high, low, 3): 64 bits of
    // the key's keyed hash. The SQL advisory lock functions only ever use 1
    // or 2 in the last field, so no role can take (and hold hostage) a
    // key's lock with pg_advisory_lock.
    pg_sys::LOCKTAG {
        // SAFETY: MyDatabaseId is set once a backend has connected, before any SQL
        // runs.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: high,
        locktag_field3: low,
        locktag_field4: 3,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

/// The lock of one holder id on one key (`objsubid = 4`, apart from the
/// key locks): taken by a shared grant of a named holder, so two requests
/// of one holder (a lost reply's retry racing the request itself) never
/// both write a shared lease (G6).
fn holder_tag(lock_key: &str, holder: &str) -> pg_sys::LOCKTAG {
    let mut tag = tag(&format!("{lock_key}\u{0}{holder}"));
    tag.locktag_field4 = 4;
    tag
}

/// The database's sweep lock (`objsubid = 5`, no key): `fence.sweep`
/// holds it exclusively and `lock_keep_history` in share mode, each until
/// its transaction ends, so a registration never interleaves with a sweep
/// (which could delete the row of a key that was just registered, from a
/// snapshot that did not see the registration). With `wait`, waits
/// (cancellably); without, false at once if it is not free.
pub fn sweep_lock(exclusive: bool, wait: bool) -> bool {
    let tag = pg_sys::LOCKTAG {
        // SAFETY: as in tag().
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: 0,
        locktag_field3: 0,
        locktag_field4: 5,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    };
    let mode = if exclusive {
        pg_sys::ExclusiveLock
    } else {
        pg_sys::ShareLock
    };
    // SAFETY: as for share().
    let result = unsafe { pg_sys::LockAcquire(&tag, mode as i32, false, !wait) };
    result != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Try to take [`holder_tag`]'s lock until the end of the transaction:
/// false if another request of the same holder holds it.
pub fn try_holder(lock_key: &str, holder: &str) -> bool {
    let tag = holder_tag(lock_key, holder);
    // SAFETY: as for share(), without waiting (dontWait).
    let result = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, false, true) };
    result != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Release one hold taken by [`try_holder`] in this same function call.
pub fn release_holder(lock_key: &str, holder: &str) {
    let tag = holder_tag(lock_key, holder);
    // SAFETY: releases one hold this resource owner took in try_holder (the
    // caller's contract).
    unsafe { pg_sys::LockRelease(&tag, pg_sys::ExclusiveLock as i32, false) };
}

/// Share-lock the key until the end of the transaction, waiting (cancellably,
/// with deadlock detection) for a granting acquire to finish.
pub fn share(lock_key: &str) {
    let tag = tag(lock_key);
    // SAFETY: a valid tag of the user lock method; the lock belongs to the current
    // resource owner and a wait is cancellable (deadlock detection, interrupts).
    unsafe { pg_sys::LockAcquire(&tag, pg_sys::ShareLock as i32, false, false) };
}

/// Try [`share`] without waiting: false if a grant holds the key.
pub fn try_share(lock_key: &str) -> bool {
    let tag = tag(lock_key);
    // SAFETY: as for share(), without waiting (dontWait).
    let result = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ShareLock as i32, false, true) };
    result != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Lock the key in row-share mode until the end of the transaction, for a
/// change to a shared lease (its renewal, release, force or re-acquire):
/// it conflicts with an exclusive grant only, so a reader's grant in
/// flight (even in a long transaction) never holds it up. Waits, as
/// [`share`] does.
pub fn row_share(lock_key: &str) {
    let tag = tag(lock_key);
    // SAFETY: as for share().
    unsafe { pg_sys::LockAcquire(&tag, pg_sys::RowShareLock as i32, false, false) };
}

/// Release one hold taken by [`row_share`] in this same function call.
pub fn release_row_share(lock_key: &str) {
    let tag = tag(lock_key);
    // SAFETY: releases one hold this resource owner took in row_share (the
    // caller's contract).
    unsafe { pg_sys::LockRelease(&tag, pg_sys::RowShareLock as i32, false) };
}

/// Try to lock the key exclusively until the end of the (sub)transaction:
/// false if a fenced write (or another grant) holds it.
pub fn try_exclusive(lock_key: &str) -> bool {
    let tag = tag(lock_key);
    // SAFETY: as for share(), without waiting (dontWait).
    let result = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, false, true) };
    result != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Try to lock the key for a shared grant until the end of the
/// (sub)transaction: in `RowExclusiveLock`, which conflicts with an
/// exclusive grant's lock and a fenced write's, renew's or release's share
/// lock, but not with another shared grant's, so readers are granted side by
/// side. False if a fenced write, an exclusive grant or a renew or release
/// holds it.
pub fn try_shared_grant(lock_key: &str) -> bool {
    let tag = tag(lock_key);
    // SAFETY: as for share(), without waiting (dontWait).
    let result = unsafe { pg_sys::LockAcquire(&tag, pg_sys::RowExclusiveLock as i32, false, true) };
    result != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Release one hold taken by [`try_shared_grant`] in this same function
/// call, for a shared attempt that did not grant.
pub fn release_shared_grant(lock_key: &str) {
    let tag = tag(lock_key);
    // SAFETY: releases one hold this resource owner took in try_shared_grant
    // (the caller's contract).
    unsafe { pg_sys::LockRelease(&tag, pg_sys::RowExclusiveLock as i32, false) };
}

/// Release one hold of the key's exclusive lock taken by [`try_exclusive`]
/// in this same function call (same resource owner): for an attempt that
/// took the lock and then did not grant. An earlier hold by this
/// transaction (a lease it granted before) stays.
pub fn release_exclusive(lock_key: &str) {
    let tag = tag(lock_key);
    // SAFETY: releases one hold this resource owner took in try_exclusive (the caller's
    // contract).
    unsafe { pg_sys::LockRelease(&tag, pg_sys::ExclusiveLock as i32, false) };
}

/// Release one hold of the key's share lock taken by [`share`] in this same
/// function call: for a renew or release whose update matched nothing, so a
/// no-op on a lease that is no longer live does not hold off a new grant
/// until its transaction ends.
pub fn release_share(lock_key: &str) {
    let tag = tag(lock_key);
    // SAFETY: releases one hold this resource owner took in share (the caller's
    // contract).
    unsafe { pg_sys::LockRelease(&tag, pg_sys::ShareLock as i32, false) };
}

/// Whether this transaction holds the key's lock, in any mode (a grant,
/// a fenced write, a renew or release of it earlier in the transaction).
/// Nobody else can be granted the key before this transaction ends then,
/// so a fair queue must not make it wait behind them (waiters.rs).
pub fn held_by_me(lock_key: &str) -> bool {
    let tag = tag(lock_key);
    // SAFETY: a lookup in this backend's local lock table, no side effects.
    unsafe {
        pg_sys::LockHeldByMe(&tag, pg_sys::ShareLock as i32)
            || pg_sys::LockHeldByMe(&tag, pg_sys::ExclusiveLock as i32)
            || pg_sys::LockHeldByMe(&tag, pg_sys::RowExclusiveLock as i32)
            || pg_sys::LockHeldByMe(&tag, pg_sys::RowShareLock as i32)
    }
}
