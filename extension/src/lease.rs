//! Leases: the `fence.lease` value, and renew, release, force-release,
//! status and current_token (guarantees G2, G4, G5). Acquiring is in
//! acquire.rs, the SQL wrappers in api.rs.
//!
//! State lives in `fence.leases`, one row per key, updated in place. A lease is
//! live while `released_at IS NULL AND expires_at > clock_timestamp()`: expiry
//! is judged by the server's clock alone (G5). Tokens come from one sequence
//! (G1), issued by `durability::issue_token`, which flushes (and has the
//! synchronous standbys confirm) the sequence WAL that covers a token
//! before it leaves, so a token that reached a client is never handed out
//! again, even if that transaction aborts, the caller runs with
//! `synchronous_commit = off`, or the server crashes or fails over.
//!

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgTupleDesc;

use crate::args::{exact_ttl, required};
use crate::durability::may_commit_asynchronously;
use crate::errors::{fail, Failure, FenceError};
use crate::key::check_key;
use crate::plans::{with_spi, Plans};
use crate::roles::{caller_role, is_fence_admin, not_owner, refuse_security_restricted};
use crate::{catalog, keylock, probe, shared, stats, wait};

/// A granted lease, as returned in a `fence.lease` value.
#[derive(Debug, Clone)]
pub struct Lease {
    pub lock_key: String,
    pub holder: String,
    pub token: i64,
    pub acquired_at: TimestampWithTimeZone,
    pub expires_at: TimestampWithTimeZone,
}

impl Lease {
    /// A `fence.lease` value. Formed in one step from a type found through the
    /// syscache and typcache: parsing the type name (`regtypein`) and setting
    /// the fields one by one cost more than the rest of a `lock_status` call.
    pub fn into_composite(self) -> Result<pgrx::composite_type!('static, "fence.lease"), Failure> {
        let internal = |what: &str| FenceError::internal(format!("building fence.lease: {what}"));
        let typoid = catalog::lease_type()?;
        let tupdesc = PgTupleDesc::for_composite_type_by_oid(typoid)
            .ok_or_else(|| internal("type fence.lease is missing"))?;
        if tupdesc.len() != 5 {
            return fail(internal("type fence.lease does not have 5 attributes"));
        }
        let mut values = [
            self.lock_key.into_datum(),
            self.holder.into_datum(),
            self.token.into_datum(),
            self.acquired_at.into_datum(),
            self.expires_at.into_datum(),
        ]
        .map(|datum| datum.unwrap_or(pg_sys::Datum::from(0)));
        let mut nulls = [false; 5];
        // SAFETY: the descriptor is fence.lease's (5 attributes, checked above) and
        // values/nulls have one entry per attribute; the tuple is palloc'd in the
        // current context and owned by the PgHeapTuple.
        unsafe {
            let tuple =
                pg_sys::heap_form_tuple(tupdesc.as_ptr(), values.as_mut_ptr(), nulls.as_mut_ptr());
            Ok(PgHeapTuple::from_heap_tuple(tupdesc, tuple).into_owned())
        }
    }
}

fn required_col<T>(value: Option<T>) -> Result<T, Failure> {
    match value {
        Some(value) => Ok(value),
        None => fail(FenceError::internal(
            "a NOT NULL lease column was NULL".into(),
        )),
    }
}

pub fn granted(
    key: &str,
    holder: &str,
    token: i64,
    acquired_at: Option<TimestampWithTimeZone>,
    expires_at: Option<TimestampWithTimeZone>,
) -> Result<Lease, Failure> {
    Ok(Lease {
        lock_key: key.to_owned(),
        holder: holder.to_owned(),
        token,
        acquired_at: required_col(acquired_at)?,
        expires_at: required_col(expires_at)?,
    })
}

/// When an update matched nothing: was there a live lease with this token
/// (then the caller's role is not its owner), or not (then it is not live)?
fn live_owner(
    client: &SpiClient<'_>,
    plans: &Plans,
    key: &str,
    token: Option<i64>,
) -> Result<Option<(pg_sys::Oid, i64)>, Failure> {
    let rows = client.select(&plans.live_owner, Some(1), &[key.into(), token.into()])?;
    if rows.is_empty() {
        return Ok(None);
    }
    let row = rows.first();
    Ok(Some((
        required_col(row.get(1)?)?,
        required_col(row.get(2)?)?,
    )))
}

/// How a renew, release or force holds the key's lock while it writes.
///
/// The exclusive lease is changed under the share lock, which conflicts
/// with every grant: a reader granted while a writer's renewal is on its
/// way would overlap the writer. A shared lease is changed under the
/// row-share lock, which conflicts only with an exclusive grant, so a
/// reader's change never holds up another reader's grant, renewal or
/// release, and a reader's grant in flight (even in a long transaction)
/// never holds up a reader's change.
///
/// Which lease a token names is not known before the lock. The share lock
/// is tried without waiting; if it is had, the exclusive lease is tried
/// first and, if the token is not its, the hold becomes row-share at once
/// ([`Hold::to_row_share`]), before the shared lease is changed. If a grant
/// holds the key, the change waits in row-share mode (only an exclusive
/// grant in flight holds that off) and then reads the exclusive lease: no
/// exclusive grant is in flight any more, so what it finds is final, and
/// only a live exclusive lease with this token (for a force: any live
/// exclusive lease) takes the share lock.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    Share,
    RowShare,
}

impl Hold {
    fn take(key: &str, token: Option<i64>) -> Result<Hold, Failure> {
        if keylock::try_share(key) {
            return Ok(Hold::Share);
        }
        keylock::row_share(key);
        let row = probe::lease_row(key, probe::Snapshot::Latest, false)?;
        let exclusive = row.is_some_and(|row| row.live && token.is_none_or(|t| t == row.token));
        if exclusive {
            keylock::share(key);
            keylock::release_row_share(key);
            return Ok(Hold::Share);
        }
        Ok(Hold::RowShare)
    }

    /// The exclusive lease did not match: go on in row-share mode only,
    /// letting go of the share lock now rather than at the end of the
    /// transaction, so new readers are not held off meanwhile.
    fn to_row_share(self, key: &str) -> Hold {
        if self == Hold::Share {
            keylock::row_share(key);
            keylock::release_share(key);
        }
        Hold::RowShare
    }

    /// The statement matched nothing: let go at once, so a no-op on a
    /// lease that is no longer live does not hold off a grant until its
    /// transaction ends.
    fn give_back(self, key: &str) {
        match self {
            Hold::Share => keylock::release_share(key),
            Hold::RowShare => keylock::release_row_share(key),
        }
    }
}

/// [`live_owner`] for the key's exclusive lease, else for one of its
/// shared leases.
fn owner_of(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    key: &str,
    token: Option<i64>,
) -> Result<Option<(pg_sys::Oid, i64)>, Failure> {
    match live_owner(client, plans, key, token)? {
        Some(found) => Ok(Some(found)),
        None => shared::live_owner(client, key, token),
    }
}

/// How long the lease a release statement ended was held (its
/// `acquired_at` to its `released_at`).
fn held_micros(rows: pgrx::spi::SpiTupleTable<'_>) -> Result<u64, Failure> {
    let row = rows.first();
    let acquired: TimestampWithTimeZone = required_col(row.get(1)?)?;
    let released: TimestampWithTimeZone = required_col(row.get(2)?)?;
    Ok(stats::micros_between(acquired, released))
}

pub fn renew(
    lock_key: Option<&str>,
    token: Option<i64>,
    ttl: Option<Interval>,
) -> Result<Option<TimestampWithTimeZone>, Failure> {
    const F: &str = "lock_renew";
    refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    let token = required(F, "token", token)?;
    let ttl = ttl.map(|ttl| exact_ttl(F, &ttl)).transpose()?;
    let role = caller_role();
    let admin = is_fence_admin(role);
    let hold = Hold::take(key, Some(token))?;
    with_spi(|client, plans| {
        if hold == Hold::Share {
            let rows = may_commit_asynchronously(|| {
                client.update(
                    &plans.renew,
                    Some(1),
                    &[
                        key.into(),
                        token.into(),
                        ttl.into(),
                        role.into(),
                        admin.into(),
                    ],
                )
            })?;
            if !rows.is_empty() {
                stats::renewal(key, true);
                return Ok(rows.first().get(1)?);
            }
        }
        // Not the exclusive lease's token: a shared lease's, perhaps
        // (renewed durably: nothing fences a reader).
        let hold = hold.to_row_share(key);
        if let Some(expires_at) = shared::renew(client, key, token, ttl, role, admin)? {
            stats::renewal(key, true);
            return Ok(Some(expires_at));
        }
        hold.give_back(key);
        match owner_of(client, plans, key, Some(token))? {
            Some((owner, _)) => fail(not_owner("renew", key, token, owner, role)),
            None => {
                stats::renewal(key, false);
                Ok(None)
            }
        }
    })
}

pub fn release(lock_key: Option<&str>, token: Option<i64>) -> Result<bool, Failure> {
    const F: &str = "lock_release";
    refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    let token = required(F, "token", token)?;
    release_key(key, token)
}

/// End the live lease on `key` with `token` (`lock_release`, and each key
/// of `lock_release_all`): false if it was not live; 42501 if it is live
/// and belongs to another role.
pub fn release_key(key: &str, token: i64) -> Result<bool, Failure> {
    let role = caller_role();
    let admin = is_fence_admin(role);
    let hold = Hold::take(key, Some(token))?;
    with_spi(|client, plans| {
        if hold == Hold::Share {
            let rows = may_commit_asynchronously(|| {
                client.update(
                    &plans.release,
                    Some(1),
                    &[key.into(), token.into(), role.into(), admin.into()],
                )
            })?;
            if !rows.is_empty() {
                wait::wake_after_commit(key);
                stats::release(key, Some(held_micros(rows)?));
                return Ok(true);
            }
        }
        let hold = hold.to_row_share(key);
        let released =
            may_commit_asynchronously(|| shared::release(client, key, token, role, admin))?;
        if let Some(held) = released {
            stats::release(key, Some(held));
            return Ok(true);
        }
        hold.give_back(key);
        match owner_of(client, plans, key, Some(token))? {
            Some((owner, _)) => fail(not_owner("release", key, token, owner, role)),
            None => {
                stats::release(key, None);
                Ok(false)
            }
        }
    })
}

pub fn force_release(lock_key: Option<&str>) -> Result<bool, Failure> {
    const F: &str = "lock_force_release";
    refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    let role = caller_role();
    let admin = is_fence_admin(role);
    let hold = Hold::take(key, None)?;
    with_spi(|client, plans| {
        // Under either hold: ending a lease never makes two overlap, and
        // with the row-share hold a grant cannot run meanwhile either.
        let rows = client.update(
            &plans.force_release,
            Some(1),
            &[key.into(), role.into(), admin.into()],
        )?;
        if !rows.is_empty() {
            wait::wake_after_commit(key);
            stats::forced(key, held_micros(rows)?);
            return Ok(true);
        }
        // No exclusive lease: the key's shared leases, if any.
        let hold = hold.to_row_share(key);
        let forced = shared::force(client, key, role, admin)?;
        if !forced.is_empty() {
            for held in forced {
                stats::forced(key, held);
            }
            return Ok(true);
        }
        hold.give_back(key);
        match owner_of(client, plans, key, None)? {
            Some((owner, token)) => fail(not_owner("force-release", key, token, owner, role)),
            None => Ok(false),
        }
    })
}

pub fn status(lock_key: Option<&str>) -> Result<Option<Lease>, Failure> {
    let key = check_key("lock_status", lock_key)?;
    with_spi(|client, plans| {
        let rows = client.select(&plans.live_lease, Some(1), &[key.into()])?;
        if rows.is_empty() {
            return Ok(None);
        }
        let row = rows.first();
        Ok(Some(Lease {
            lock_key: key.to_owned(),
            holder: required_col(row.get(1)?)?,
            token: required_col(row.get(2)?)?,
            acquired_at: required_col(row.get(3)?)?,
            expires_at: required_col(row.get(4)?)?,
        }))
    })
}

/// The live leases on keys from `from` up to, not including, `to` (in the
/// keys' "C" order), by key.
pub fn live_between(from: &str, to: &str) -> Result<Vec<Lease>, Failure> {
    with_spi(|client, plans| {
        let rows = client.select(&plans.live_between, None, &[from.into(), to.into()])?;
        let mut leases = Vec::with_capacity(rows.len());
        for row in rows {
            leases.push(Lease {
                lock_key: required_col(row.get(1)?)?,
                holder: required_col(row.get(2)?)?,
                token: required_col(row.get(3)?)?,
                acquired_at: required_col(row.get(4)?)?,
                expires_at: required_col(row.get(5)?)?,
            });
        }
        Ok(leases)
    })
}

pub fn token_of(lock_key: Option<&str>) -> Result<Option<i64>, Failure> {
    let key = check_key("current_token", lock_key)?;
    with_spi(|client, plans| {
        let rows = client.select(&plans.token_of, Some(1), &[key.into()])?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(rows.first().get(1)?)
    })
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn acquire_release_and_tokens_in_one_session() {
        let token = |sql: &str| Spi::get_one::<i64>(sql).unwrap();
        let first =
            token("SELECT token FROM fence.lock_acquire('t:a', '10 seconds', 'me')").unwrap();
        // Busy for anyone else.
        assert_eq!(
            Spi::get_one::<bool>("SELECT fence.lock_acquire('t:a', '10 seconds', 'you') IS NULL")
                .unwrap(),
            Some(true)
        );
        // G6: the same holder gets the same token back.
        assert_eq!(
            token("SELECT token FROM fence.lock_acquire('t:a', '20 seconds', 'me')"),
            Some(first)
        );
        // Tokens are global: another key gets a larger one.
        let other = token("SELECT token FROM fence.lock_acquire('t:b')").unwrap();
        assert!(other > first);
        assert_eq!(
            Spi::get_one::<bool>(&format!(
                "SELECT fence.lock_release('t:a', {})",
                first + 1000
            ))
            .unwrap(),
            Some(false)
        );
        assert_eq!(
            Spi::get_one::<bool>(&format!("SELECT fence.lock_release('t:a', {first})")).unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one::<bool>(&format!("SELECT fence.lock_release('t:a', {first})")).unwrap(),
            Some(false)
        );
        assert_eq!(token("SELECT fence.current_token('t:a')"), Some(first));
        let again =
            token("SELECT token FROM fence.lock_acquire('t:a', '10 seconds', 'you')").unwrap();
        assert!(again > other);
        assert_eq!(token("SELECT fence.current_token('t:a')"), Some(again));
        assert_eq!(token("SELECT fence.current_token('never-used')"), None);
    }

    #[pg_test]
    fn renew_extends_and_status_reports_the_live_lease() {
        let token = Spi::get_one::<i64>("SELECT token FROM fence.lock_acquire('t:r', '1 second')")
            .unwrap()
            .unwrap();
        let extended = Spi::get_one::<bool>(&format!(
            "SELECT fence.lock_renew('t:r', {token}, '1 hour') > clock_timestamp() + interval '59 minutes'"
        ))
        .unwrap();
        assert_eq!(extended, Some(true));
        assert_eq!(
            Spi::get_one::<i64>("SELECT (fence.lock_status('t:r')).token").unwrap(),
            Some(token)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM fence.locks WHERE lock_key = 't:r'").unwrap(),
            Some(1)
        );
        let wrong_token = format!("SELECT fence.lock_renew('t:r', {}) IS NULL", token + 1);
        assert_eq!(Spi::get_one::<bool>(&wrong_token).unwrap(), Some(true));
    }
}
