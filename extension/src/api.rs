//! The SQL-callable lease functions, in one place so that what runs with the
//! extension owner's rights (`SECURITY DEFINER`, each with a pinned
//! `search_path`) can be audited at a glance. Each wrapper hands its
//! arguments to the logic (acquire.rs, lease.rs, semaphore.rs, multi.rs,
//! operations.rs) and raises
//! any error at the top (errors.rs). Triggers are in fence.rs.

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

use crate::errors::or_raise;
use crate::lease::Lease;
use crate::{acquire, lease, multi, operations, semaphore};

/// Grant a lease on `lock_key`, waiting up to `wait` for it to free. NULL if
/// not granted in time. The same `holder` re-acquiring its live lease gets the
/// same token back with `expires_at = now + ttl` (G6).
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn lock_acquire(
    lock_key: Option<&str>,
    ttl: default!(Option<Interval>, "'30 seconds'"),
    holder: default!(Option<&str>, "NULL"),
    wait: default!(Option<Interval>, "'0'"),
) -> Option<pgrx::composite_type!('static, "fence.lease")> {
    or_raise(
        acquire::acquire(lock_key, ttl, holder, wait)
            .and_then(|lease| lease.map(Lease::into_composite).transpose()),
    )
}

/// Extend the live lease with this token by `ttl` (default: the ttl it was
/// acquired with) from now. NULL when it is no longer live.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn lock_renew(
    lock_key: Option<&str>,
    token: Option<i64>,
    ttl: default!(Option<Interval>, "NULL"),
) -> Option<TimestampWithTimeZone> {
    or_raise(lease::renew(lock_key, token, ttl))
}

/// End the live lease with this token; false if it was not live.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn lock_release(lock_key: Option<&str>, token: Option<i64>) -> bool {
    or_raise(lease::release(lock_key, token))
}

/// End the live lease on the key, whoever holds it: members of fence_admin
/// (and the role that acquired it). False if none was live.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn lock_force_release(lock_key: Option<&str>) -> bool {
    or_raise(lease::force_release(lock_key))
}

/// The live lease on the key, or NULL.
#[pg_extern(volatile, parallel_unsafe)]
fn lock_status(lock_key: Option<&str>) -> Option<pgrx::composite_type!('static, "fence.lease")> {
    or_raise(lease::status(lock_key).and_then(|lease| lease.map(Lease::into_composite).transpose()))
}

/// The highest token ever issued for the key (live or not); NULL if the key
/// was never leased. Never decreases.
#[pg_extern(stable, parallel_unsafe)]
fn current_token(lock_key: Option<&str>) -> Option<i64> {
    or_raise(lease::token_of(lock_key))
}

/// One of `permits` permits of semaphore `name`: a lease on the permit's
/// own key (`lock_key`), renewed and released as any lease. NULL if none
/// was free within `wait`.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn semaphore_acquire(
    name: Option<&str>,
    permits: Option<i32>,
    ttl: default!(Option<Interval>, "'30 seconds'"),
    holder: default!(Option<&str>, "NULL"),
    wait: default!(Option<Interval>, "'0'"),
) -> Option<pgrx::composite_type!('static, "fence.lease")> {
    or_raise(
        semaphore::acquire(name, permits, ttl, holder, wait)
            .and_then(|lease| lease.map(Lease::into_composite).transpose()),
    )
}

/// The live permits of semaphore `name`.
#[pg_extern(volatile, parallel_unsafe)]
fn semaphore_status(
    name: Option<&str>,
) -> SetOfIterator<'static, pgrx::composite_type!('static, "fence.lease")> {
    let leases = or_raise(semaphore::status(name).and_then(|leases| {
        leases
            .into_iter()
            .map(Lease::into_composite)
            .collect::<Result<Vec<_>, _>>()
    }));
    SetOfIterator::new(leases)
}

/// Every one of `lock_keys` (distinct) or none: one grant, one token for
/// all of them, a lease per key. No rows if they could not all be granted
/// within `wait`.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn lock_acquire_all(
    lock_keys: Option<pgrx::datum::Array<'_, &str>>,
    ttl: default!(Option<Interval>, "'30 seconds'"),
    holder: default!(Option<&str>, "NULL"),
    wait: default!(Option<Interval>, "'0'"),
) -> SetOfIterator<'static, pgrx::composite_type!('static, "fence.lease")> {
    let keys = lock_keys.as_ref().map(|keys| keys.iter());
    let leases = or_raise(multi::acquire(keys, ttl, holder, wait).and_then(|leases| {
        leases
            .into_iter()
            .map(Lease::into_composite)
            .collect::<Result<Vec<_>, _>>()
    }));
    SetOfIterator::new(leases)
}

/// End the leases on `lock_keys` with this token; how many were live.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn lock_release_all(lock_keys: Option<pgrx::datum::Array<'_, &str>>, token: Option<i64>) -> i32 {
    or_raise(multi::release(
        lock_keys.as_ref().map(|keys| keys.iter()),
        token,
    ))
}

/// Wait until the key's live lease is not the one with `known_token`
/// (NULL: no live lease), or until `wait` runs out; the live lease then
/// (NULL: none).
#[pg_extern(volatile, parallel_unsafe)]
fn lock_watch(
    lock_key: Option<&str>,
    known_token: Option<i64>,
    wait: Option<Interval>,
) -> Option<pgrx::composite_type!('static, "fence.lease")> {
    or_raise(
        crate::watch::watch(lock_key, known_token, wait)
            .and_then(|lease| lease.map(Lease::into_composite).transpose()),
    )
}

/// Keep the key's terms (every exclusive grant) for `keep` from now on;
/// NULL or zero stops. The key's latest token, from which the history is
/// complete.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn lock_keep_history(
    lock_key: Option<&str>,
    keep: default!(Option<Interval>, "'1 hour'"),
) -> Option<i64> {
    or_raise(crate::history::keep(lock_key, keep))
}

/// The key's kept terms after `after_token` (NULL: all), oldest first,
/// waiting up to `wait` for one if there are none yet.
#[pg_extern(volatile, parallel_unsafe)]
fn lock_history(
    lock_key: Option<&str>,
    after_token: default!(Option<i64>, "NULL"),
    wait: default!(Option<Interval>, "'0'"),
) -> TableIterator<
    'static,
    (
        name!(lock_key, String),
        name!(token, i64),
        name!(previous_token, Option<i64>),
        name!(holder, String),
        name!(acquired_at, TimestampWithTimeZone),
    ),
> {
    let key = lock_key.unwrap_or_default().to_owned();
    let terms = or_raise(crate::history::history(lock_key, after_token, wait));
    TableIterator::new(terms.into_iter().map(move |term| {
        (
            key.clone(),
            term.token,
            term.previous_token,
            term.holder,
            term.acquired_at,
        )
    }))
}

/// Delete the rows of keys whose lease ended more than `idle_for` ago
/// (fence_admin); how many went.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn sweep(idle_for: default!(Option<Interval>, "'7 days'")) -> i64 {
    or_raise(crate::sweep::sweep(idle_for))
}

/// A shared (reader) lease on `lock_key`: any number at once while the
/// key has no live exclusive lease; NULL if none was granted within `wait`.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn lock_acquire_shared(
    lock_key: Option<&str>,
    ttl: default!(Option<Interval>, "'30 seconds'"),
    holder: default!(Option<&str>, "NULL"),
    wait: default!(Option<Interval>, "'0'"),
) -> Option<pgrx::composite_type!('static, "fence.lease")> {
    or_raise(
        crate::shared::acquire(lock_key, ttl, holder, wait)
            .and_then(|lease| lease.map(Lease::into_composite).transpose()),
    )
}

/// `lock_acquire_shared` for pg_fence_client, with `adopt` as for
/// `_lock_acquire`.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _lock_acquire_shared(
    lock_key: Option<&str>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
    adopt: Option<bool>,
) -> Option<pgrx::composite_type!('static, "fence.lease")> {
    or_raise(
        crate::shared::acquire_adopting(lock_key, ttl, holder, wait, adopt)
            .and_then(|lease| lease.map(Lease::into_composite).transpose()),
    )
}

/// `lock_acquire` for pg_fence_client: `adopt` false refuses (`FN002`)
/// the holder's own live lease instead of giving it back (G6), which only
/// a retry of a request whose reply was lost may do.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _lock_acquire(
    lock_key: Option<&str>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
    adopt: Option<bool>,
) -> Option<pgrx::composite_type!('static, "fence.lease")> {
    or_raise(
        acquire::acquire_adopting(lock_key, ttl, holder, wait, adopt)
            .and_then(|lease| lease.map(Lease::into_composite).transpose()),
    )
}

/// `semaphore_acquire` for pg_fence_client, with `adopt` as for
/// `_lock_acquire`.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _semaphore_acquire(
    name: Option<&str>,
    permits: Option<i32>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
    adopt: Option<bool>,
) -> Option<pgrx::composite_type!('static, "fence.lease")> {
    or_raise(
        semaphore::acquire_adopting(name, permits, ttl, holder, wait, adopt)
            .and_then(|lease| lease.map(Lease::into_composite).transpose()),
    )
}

/// `lock_acquire_all` for pg_fence_client, with `adopt` as for
/// `_lock_acquire`.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _lock_acquire_all(
    lock_keys: Option<pgrx::datum::Array<'_, &str>>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
    adopt: Option<bool>,
) -> SetOfIterator<'static, pgrx::composite_type!('static, "fence.lease")> {
    let keys = lock_keys.as_ref().map(|keys| keys.iter());
    let leases = or_raise(
        multi::acquire_adopting(keys, ttl, holder, wait, adopt).and_then(|leases| {
            leases
                .into_iter()
                .map(Lease::into_composite)
                .collect::<Result<Vec<_>, _>>()
        }),
    );
    SetOfIterator::new(leases)
}

/// Claim `op_key` for the calling role in the current transaction: true if
/// this transaction is the one to do the operation, false if it was done.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn claim_operation(op_key: Option<&str>) -> bool {
    or_raise(operations::claim(op_key))
}

/// Forget the calling role's run-once records older than `older_than`
/// (members of fence_admin: every role's). Returns how many were deleted.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn forget_operations(older_than: Option<Interval>) -> i64 {
    or_raise(operations::forget(older_than))
}
