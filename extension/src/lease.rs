//! Leases: `lock_acquire`, `lock_renew`, `lock_release`, `lock_force_release`,
//! `lock_status` and `current_token` (guarantees G1, G2, G4, G5, G6).
//!
//! State lives in `fence.leases`, one row per key, updated in place. A lease is
//! live while `released_at IS NULL AND expires_at > clock_timestamp()`: expiry
//! is judged by the server's clock alone (G5). Tokens come from one sequence
//! (G1); `acquire` makes its transaction commit durably and flushes the
//! sequence's WAL itself whenever `nextval` logged it, so a token that reached
//! a client is never handed out again, even if that transaction aborts or the
//! caller runs with `synchronous_commit = off` and the server then crashes.
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

use std::cell::OnceCell;

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiError};
use pgrx::PgTupleDesc;

use crate::errors::{or_raise, FenceError};
use crate::{keylock, probe, settings, wait};

/// Longest accepted key, in bytes (DESIGN.md).
pub const MAX_KEY_BYTES: usize = 1024;
const USECS_PER_DAY: i128 = 86_400_000_000;

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
    fn into_composite(self) -> Result<pgrx::composite_type!('static, "fence.lease"), FenceError> {
        let internal = |what: &str| FenceError::internal(format!("building fence.lease: {what}"));
        let typoid = unsafe {
            let namespace = pg_sys::get_namespace_oid(c"fence".as_ptr(), false);
            pg_sys::GetSysCacheOid(
                pg_sys::SysCacheIdentifier::TYPENAMENSP as i32,
                pg_sys::Anum_pg_type_oid as pg_sys::AttrNumber,
                pg_sys::Datum::from(c"lease".as_ptr()),
                namespace.into_datum().unwrap_or(pg_sys::Datum::from(0)),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
            )
        };
        let tupdesc = PgTupleDesc::for_composite_type_by_oid(typoid)
            .ok_or_else(|| internal("type fence.lease is missing"))?;
        if tupdesc.len() != 5 {
            return Err(internal("type fence.lease does not have 5 attributes"));
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
        unsafe {
            let tuple =
                pg_sys::heap_form_tuple(tupdesc.as_ptr(), values.as_mut_ptr(), nulls.as_mut_ptr());
            Ok(PgHeapTuple::from_heap_tuple(tupdesc, tuple).into_owned())
        }
    }
}

// ---------------------------------------------------------------------------
// SQL-callable functions. Each validates, then does its work in a Rust
// function returning Result, and raises any error at the top (errors.rs).
// ---------------------------------------------------------------------------

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
        acquire(lock_key, ttl, holder, wait)
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
    or_raise(renew(lock_key, token, ttl))
}

/// End the live lease with this token; false if it was not live.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn lock_release(lock_key: Option<&str>, token: Option<i64>) -> bool {
    or_raise(release(lock_key, token))
}

/// End the live lease on the key, whoever holds it: members of fence_admin
/// (and the role that acquired it). False if none was live.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn lock_force_release(lock_key: Option<&str>) -> bool {
    or_raise(force_release(lock_key))
}

/// The live lease on the key, or NULL.
#[pg_extern(volatile, parallel_unsafe)]
fn lock_status(lock_key: Option<&str>) -> Option<pgrx::composite_type!('static, "fence.lease")> {
    or_raise(status(lock_key).and_then(|lease| lease.map(Lease::into_composite).transpose()))
}

/// The highest token ever issued for the key (live or not); NULL if the key
/// was never leased. Never decreases.
#[pg_extern(stable, parallel_unsafe)]
fn current_token(lock_key: Option<&str>) -> Option<i64> {
    or_raise(token_of(lock_key))
}

// ---------------------------------------------------------------------------
// Argument checks (22004 / 22023).
// ---------------------------------------------------------------------------

fn required<T>(
    function: &'static str,
    argument: &'static str,
    value: Option<T>,
) -> Result<T, FenceError> {
    value.ok_or(FenceError::NullArgument { function, argument })
}

pub fn check_key<'a>(
    function: &'static str,
    lock_key: Option<&'a str>,
) -> Result<&'a str, FenceError> {
    check_text_key(function, "lock_key", lock_key)
}

/// A key-like argument: not NULL (22004), 1 to [`MAX_KEY_BYTES`] bytes (22023).
pub fn check_text_key<'a>(
    function: &'static str,
    argument: &'static str,
    value: Option<&'a str>,
) -> Result<&'a str, FenceError> {
    let key = required(function, argument, value)?;
    let invalid = |problem: String| FenceError::InvalidArgument {
        function,
        argument,
        problem,
    };
    if key.is_empty() {
        return Err(invalid("must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(invalid(format!(
            "is {} bytes long, the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(key)
}

/// An interval in microseconds, ordered as PostgreSQL orders intervals (a
/// month counts 30 days, a day 24 hours).
pub fn interval_micros(interval: &Interval) -> i128 {
    i128::from(interval.months()) * 30 * USECS_PER_DAY
        + i128::from(interval.days()) * USECS_PER_DAY
        + i128::from(interval.micros())
}

/// A ttl as the exact duration it is used as (G5): a number of
/// microseconds, with a day counted as 24 hours and no months part, so that
/// `expires_at = now + ttl` is the same instant whatever the session's
/// TimeZone and across a DST change. An interval with a months part is
/// refused: a month has no fixed length, and counting it as 30 days (as the
/// max check would) while the expiry used the calendar let
/// `'1000 months -29999 days'` pass as one day and last 437.
fn exact_ttl(function: &'static str, ttl: &Interval) -> Result<Interval, FenceError> {
    let max_seconds = settings::max_ttl_seconds();
    let invalid = |problem: String| FenceError::InvalidArgument {
        function,
        argument: "ttl",
        problem,
    };
    if ttl.months() != 0 {
        return Err(invalid(
            "has a months part, and a month has no fixed length: give it in days, hours, minutes or seconds".into(),
        ));
    }
    let micros = interval_micros(ttl);
    if micros <= 0 {
        return Err(invalid("must be greater than zero".into()));
    }
    if micros > i128::from(max_seconds) * 1_000_000 {
        return Err(invalid(format!(
            "is over the maximum of {max_seconds} seconds (fence.max_ttl)"
        )));
    }
    // At most i32::MAX seconds, so it fits.
    Interval::new(0, 0, micros as i64).map_err(|_| invalid("is out of range".into()))
}

fn check_holder(holder: Option<&str>) -> Result<String, FenceError> {
    match holder {
        None => Ok(random_holder()),
        Some("") => Err(FenceError::InvalidArgument {
            function: "lock_acquire",
            argument: "holder",
            problem: "must not be empty (pass NULL for a fresh random holder)".into(),
        }),
        Some(h) if h.len() > MAX_KEY_BYTES => Err(FenceError::InvalidArgument {
            function: "lock_acquire",
            argument: "holder",
            problem: format!("is {} bytes long, the limit is {MAX_KEY_BYTES}", h.len()),
        }),
        Some(h) => Ok(h.to_owned()),
    }
}

/// A fresh holder id: a random (version 4) UUID from the server's strong RNG.
fn random_holder() -> String {
    let mut bytes = [0u8; 16];
    let ok = unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
    if !ok {
        // pg_strong_random only fails if the OS has no entropy source at all.
        let fallback = unsafe { pg_sys::GetCurrentTimestamp() } as u128
            ^ (u128::from(unsafe { pg_sys::MyProcPid } as u32) << 64);
        bytes = fallback.to_le_bytes();
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

// ---------------------------------------------------------------------------
// Prepared statements: planned once per backend, kept for its lifetime.
// Every name is schema-qualified; the functions also pin search_path.
// ---------------------------------------------------------------------------

const LIVE: &str = "l.released_at IS NULL AND l.expires_at > pg_catalog.clock_timestamp()";

struct Plans {
    lock_row: OwnedPreparedStatement,
    grant_update: OwnedPreparedStatement,
    grant_insert: OwnedPreparedStatement,
    extend: OwnedPreparedStatement,
    renew: OwnedPreparedStatement,
    release: OwnedPreparedStatement,
    force_release: OwnedPreparedStatement,
    live_owner: OwnedPreparedStatement,
    live_lease: OwnedPreparedStatement,
    token_of: OwnedPreparedStatement,
}

impl Plans {
    fn prepare(client: &SpiClient<'_>) -> Result<Plans, SpiError> {
        use pg_sys::{BOOLOID, INT8OID, INTERVALOID, OIDOID, TEXTOID, TIMESTAMPTZOID};
        // The grant statements: key, holder, token, ttl, role, now, application_name.
        const GRANT_ARGUMENTS: [pg_sys::Oid; 7] = [
            TEXTOID,
            TEXTOID,
            INT8OID,
            INTERVALOID,
            OIDOID,
            TIMESTAMPTZOID,
            TEXTOID,
        ];
        let prep =
            |sql: String, args: &[pg_sys::Oid]| -> Result<OwnedPreparedStatement, SpiError> {
                let oids: Vec<_> = args.iter().map(|oid| pg_sys::PgOid::from(*oid)).collect();
                // prepare_mut: every execution takes a fresh snapshot, which the
                // wait loop in READ COMMITTED depends on.
                Ok(client.prepare_mut(sql.as_str(), &oids)?.keep())
            };
        Ok(Plans {
            lock_row: prep(
                format!(
                    "SELECT l.holder, ({LIVE}) AS live, l.expires_at \
                       FROM fence.leases AS l WHERE l.lock_key = $1 FOR UPDATE SKIP LOCKED"
                ),
                &[TEXTOID],
            )?,
            grant_update: prep(
                    "UPDATE fence.leases AS l \
                    SET holder = $2, token = $3, ttl = $4, acquired_at = $6, expires_at = $6 + $4, \
                        released_at = NULL, owner_role = $5, application_name = $7 \
                  WHERE l.lock_key = $1 AND NOT (l.released_at IS NULL AND l.expires_at > $6) \
                 RETURNING l.expires_at"
                    .into(),
                &GRANT_ARGUMENTS,
            )?,
            grant_insert: prep(
                "INSERT INTO fence.leases AS l \
                        (lock_key, holder, token, ttl, acquired_at, expires_at, owner_role, application_name) \
                 VALUES ($1, $2, $3, $4, $6, $6 + $4, $5, $7) \
                 ON CONFLICT (lock_key) DO NOTHING \
                 RETURNING l.expires_at"
                    .into(),
                &GRANT_ARGUMENTS,
            )?,
            extend: prep(
                format!(
                    "UPDATE fence.leases AS l SET ttl = $2, expires_at = pg_catalog.clock_timestamp() + $2 \
                      WHERE l.lock_key = $1 AND l.holder = $3 AND l.token = $4 AND {LIVE} \
                     RETURNING l.acquired_at, l.expires_at"
                ),
                &[TEXTOID, INTERVALOID, TEXTOID, INT8OID],
            )?,
            renew: prep(
                format!(
                    "UPDATE fence.leases AS l \
                        SET expires_at = pg_catalog.clock_timestamp() + COALESCE($3, l.ttl) \
                      WHERE l.lock_key = $1 AND l.token = $2 AND {LIVE} AND (l.owner_role = $4 OR $5) \
                     RETURNING l.expires_at"
                ),
                &[TEXTOID, INT8OID, INTERVALOID, OIDOID, BOOLOID],
            )?,
            release: prep(
                format!(
                    "UPDATE fence.leases AS l SET released_at = pg_catalog.clock_timestamp() \
                      WHERE l.lock_key = $1 AND l.token = $2 AND {LIVE} AND (l.owner_role = $3 OR $4) \
                     RETURNING l.token"
                ),
                &[TEXTOID, INT8OID, OIDOID, BOOLOID],
            )?,
            force_release: prep(
                format!(
                    "UPDATE fence.leases AS l SET released_at = pg_catalog.clock_timestamp() \
                      WHERE l.lock_key = $1 AND {LIVE} AND (l.owner_role = $2 OR $3) \
                     RETURNING l.token"
                ),
                &[TEXTOID, OIDOID, BOOLOID],
            )?,
            live_owner: prep(
                format!(
                    "SELECT l.owner_role::oid, l.token FROM fence.leases AS l \
                      WHERE l.lock_key = $1 AND ($2::bigint IS NULL OR l.token = $2) AND {LIVE}"
                ),
                &[TEXTOID, INT8OID],
            )?,
            live_lease: prep(
                format!(
                    "SELECT l.holder, l.token, l.acquired_at, l.expires_at FROM fence.leases AS l \
                      WHERE l.lock_key = $1 AND {LIVE}"
                ),
                &[TEXTOID],
            )?,
            token_of: prep("SELECT l.token FROM fence.leases AS l WHERE l.lock_key = $1".into(), &[TEXTOID])?,
        })
    }
}

thread_local! {
    static PLANS: OnceCell<Plans> = const { OnceCell::new() };
}

/// Run `work` inside one SPI connection with the backend's prepared statements.
fn with_spi<R>(
    work: impl FnOnce(&mut SpiClient<'_>, &Plans) -> Result<R, FenceError>,
) -> Result<R, FenceError> {
    Spi::connect_mut(|client| {
        PLANS.with(|cell| {
            let plans = match cell.get() {
                Some(plans) => plans,
                None => {
                    let plans = Plans::prepare(client)?;
                    cell.get_or_init(|| plans)
                }
            };
            work(client, plans)
        })
    })
}

// ---------------------------------------------------------------------------
// Roles (G4).
// ---------------------------------------------------------------------------

/// The caller's role: the current user outside any SECURITY DEFINER function,
/// so our own definer rights do not hide who is calling.
pub fn caller_role() -> pg_sys::Oid {
    unsafe { pg_sys::GetOuterUserId() }
}

/// Refuse to act for a role inside a security-restricted operation (an
/// index expression run by ANALYZE or autovacuum, REFRESH MATERIALIZED VIEW,
/// ...): there the outer role is whoever started the operation, not the
/// code that called us, so G4's role check would be meaningless.
pub fn refuse_security_restricted(function: &'static str) -> Result<(), FenceError> {
    if unsafe { pg_sys::InSecurityRestrictedOperation() } {
        return Err(FenceError::SecurityRestricted { function });
    }
    Ok(())
}

pub fn is_fence_admin(role: pg_sys::Oid) -> bool {
    unsafe {
        let admin = pg_sys::get_role_oid(c"fence_admin".as_ptr(), true);
        admin != pg_sys::InvalidOid && pg_sys::has_privs_of_role(role, admin)
    }
}

pub fn role_name(role: pg_sys::Oid) -> String {
    unsafe {
        let name = pg_sys::GetUserNameFromId(role, true);
        if name.is_null() {
            format!("oid {}", role.to_u32())
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    }
}

fn not_owner(
    action: &'static str,
    lock_key: &str,
    token: i64,
    owner: pg_sys::Oid,
    caller: pg_sys::Oid,
) -> FenceError {
    FenceError::NotLeaseOwner {
        action,
        lock_key: lock_key.to_owned(),
        token,
        owner: role_name(owner),
        caller: role_name(caller),
    }
}

// ---------------------------------------------------------------------------
// Durability.
// ---------------------------------------------------------------------------

/// Issue the next fencing token (G1).
///
/// `nextval` WAL-logs the sequence only every 32 values (the record says
/// "up to 32 ahead are used") and leaves flushing to the commit; if the
/// transaction then aborts, or commits asynchronously, a crash or the
/// promotion of a standby that lacks the record could rewind the sequence
/// and hand a token out twice. So before a token leaves this function, the
/// record that covers it, the sequence page's LSN, must be flushed here and
/// on the synchronous standbys. That is not only the record this call may
/// have written: a call that wrote one and then failed (a cancelled wait)
/// leaves 31 values covered by a record nobody waited for. Both checks
/// return at once when the record is already there, which is all but once
/// per 32 tokens. The granting transaction is made to commit durably too.
fn issue_token() -> Result<i64, FenceError> {
    // SAFETY: a plain function call into the sequence code, then a pin and
    // share lock of the sequence's one page to read its LSN, released
    // before anything can raise an error; the relation is opened and
    // closed here, its lock kept until the transaction ends (as nextval does).
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"fence".as_ptr(), false);
        let sequence = pg_sys::get_relname_relid(c"token_seq".as_ptr(), namespace);
        if sequence == pg_sys::InvalidOid {
            return Err(FenceError::internal(
                "sequence fence.token_seq is missing".into(),
            ));
        }
        let token =
            pgrx::direct_function_call::<i64>(pg_sys::nextval_oid, &[sequence.into_datum()])
                .ok_or_else(|| FenceError::internal("nextval returned NULL".into()))?;
        commit_durably();
        let relation = pg_sys::relation_open(sequence, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let buffer = pg_sys::ReadBuffer(relation, 0);
        pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_SHARE as i32);
        let header = pg_sys::BufferGetPage(buffer).cast::<pg_sys::PageHeaderData>();
        let covering =
            (u64::from((*header).pd_lsn.xlogid) << 32) | u64::from((*header).pd_lsn.xrecoff);
        pg_sys::UnlockReleaseBuffer(buffer);
        pg_sys::relation_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::XLogFlush(covering);
        wait_for_synchronous_standby(covering)?;
        Ok(token)
    }
}

/// Wait until the synchronous standbys have flushed WAL up to `lsn`, as a
/// commit does (nothing to wait for without `synchronous_standby_names`).
/// A wait cut short by a cancel or `statement_timeout` returns with a
/// WARNING in PostgreSQL; here it is an error instead, so that the token
/// never reaches a client that a promoted standby would not know of.
fn wait_for_synchronous_standby(lsn: pg_sys::XLogRecPtr) -> Result<(), FenceError> {
    // SAFETY: reads of this backend's settings and of WalSndCtl, which the
    // postmaster sets up before any backend runs; lsn[] is read without
    // SyncRepLock (an 8-byte aligned read: at worst an older value, which
    // errs towards refusing).
    unsafe {
        let names = pg_sys::SyncRepStandbyNames;
        if names.is_null() || *names == 0 || pg_sys::WalSndCtl.is_null() {
            return Ok(());
        }
        let flushed = || {
            std::ptr::read_volatile(std::ptr::addr_of!(
                (*pg_sys::WalSndCtl).lsn[pg_sys::SYNC_REP_WAIT_FLUSH as usize]
            ))
        };
        if flushed() >= lsn {
            return Ok(());
        }
        pg_sys::SyncRepWaitForLSN(lsn, false);
        if flushed() < lsn {
            return Err(FenceError::TokenNotReplicated);
        }
    }
    Ok(())
}

/// Make the current transaction's commit durable whatever the caller's
/// `synchronous_commit`: flushed locally (ForceSyncCommit), and at least
/// `synchronous_commit = on` so a synchronous standby has it too.
fn commit_durably() {
    unsafe {
        pg_sys::ForceSyncCommit();
        if pg_sys::synchronous_commit
            < pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_REMOTE_FLUSH as i32
        {
            set_local("synchronous_commit", "on");
        }
    }
}

thread_local! {
    /// Set by release/renew when they were the transaction's first write:
    /// the WAL position right after their update.
    static ASYNC_COMMIT_IF_UNCHANGED: std::cell::Cell<Option<pg_sys::XLogRecPtr>> =
        const { std::cell::Cell::new(None) };
}

/// Release and renew may commit asynchronously: losing one in a crash only
/// changes when a lease ends, and fenced writes keep that safe. But only if
/// nothing else in the transaction needs durability, which is known only at
/// commit: `write` runs the update, and if nothing was written before it and
/// no WAL is written after it, the pre-commit callback makes this commit
/// asynchronous.
fn may_commit_asynchronously<R>(write: impl FnOnce() -> R) -> R {
    let first_write = unsafe { pg_sys::GetTopTransactionIdIfAny() } == pg_sys::InvalidTransactionId;
    let result = write();
    let after = unsafe { pg_sys::XactLastRecEnd };
    ASYNC_COMMIT_IF_UNCHANGED.set(if first_write && after != 0 {
        Some(after)
    } else {
        None
    });
    result
}

/// Called by the extension's transaction callback (lib.rs).
pub fn on_xact_event(event: pg_sys::XactEvent::Type) {
    let candidate = ASYNC_COMMIT_IF_UNCHANGED.take();
    // RecordTransactionCommit reads synchronous_commit after this event.
    if event == pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT
        && candidate == Some(unsafe { pg_sys::XactLastRecEnd })
    {
        set_local("synchronous_commit", "off");
    }
}

fn set_local(name: &str, value: &str) {
    let name = std::ffi::CString::new(name).expect("no NUL");
    let value = std::ffi::CString::new(value).expect("no NUL");
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

// ---------------------------------------------------------------------------
// The operations.
// ---------------------------------------------------------------------------

enum Attempt {
    Granted(Lease),
    /// Held by someone else; try again in at most this many milliseconds.
    Busy {
        retry_in_ms: i64,
    },
    /// Lost a race to create the key's row; retry at once.
    Again,
}

fn now_micros() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Milliseconds until `at` (rounded up, so we wake after it), capped.
fn millis_until(at: TimestampWithTimeZone, cap: i64) -> i64 {
    let micros: i64 = at.into_inner().saturating_sub(now_micros());
    (micros.saturating_add(999) / 1000).clamp(1, cap)
}

fn uses_transaction_snapshot() -> bool {
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

pub fn acquire(
    lock_key: Option<&str>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    wait: Option<Interval>,
) -> Result<Option<Lease>, FenceError> {
    const F: &str = "lock_acquire";
    refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    let ttl = exact_ttl(F, &required(F, "ttl", ttl)?)?;
    let wait = required(F, "wait", wait)?;
    let wait_micros = interval_micros(&wait);
    if wait_micros < 0 {
        return Err(FenceError::InvalidArgument {
            function: F,
            argument: "wait",
            problem: "must not be negative".into(),
        });
    }
    if wait_micros > 0 && uses_transaction_snapshot() {
        return Err(FenceError::WaitNeedsReadCommitted {
            lock_key: key.to_owned(),
        });
    }
    let holder = check_holder(holder)?;
    let role = caller_role();
    let deadline = now_micros().saturating_add(i64::try_from(wait_micros).unwrap_or(i64::MAX));
    let event = wait::wait_event_for(key);

    let outcome = loop {
        if wait_micros > 0 {
            wait::reset_latch();
            wait::advertise(event);
        }
        match with_spi(|client, plans| attempt(client, plans, key, &holder, ttl, role))? {
            Attempt::Granted(lease) => break Some(lease),
            Attempt::Again => continue,
            Attempt::Busy { retry_in_ms } => {
                let left_ms = (deadline.saturating_sub(now_micros()) + 999) / 1000;
                if left_ms <= 0 {
                    if wait_micros > 0 {
                        wait::pass_on_wakeup(event);
                    }
                    break None;
                }
                wait::sleep(event, retry_in_ms.min(left_ms));
            }
        }
    };
    if wait_micros > 0 {
        wait::stop_advertising();
    }
    Ok(outcome)
}

fn attempt(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    key: &str,
    holder: &str,
    ttl: Interval,
    role: pg_sys::Oid,
) -> Result<Attempt, FenceError> {
    // Look first, without locking: a key someone else holds costs no lock.
    // (A statement would first make this transaction's earlier changes
    // visible; so does the probe.)
    unsafe { pg_sys::CommandCounterIncrement() };
    let Some(row) = probe::lease_row(key, probe::Snapshot::Statement, true)? else {
        // No row yet: create it. The key lock also keeps out another first
        // acquire inserting it right now; an insert that conflicts anyway
        // found it created (and committed) by someone else since we looked.
        return grant_under_key_lock(client, &plans.grant_insert, key, holder, ttl, role);
    };
    let live = row.live;
    if live && row.holder.as_deref() == Some(holder) {
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
        return in_subtransaction(|| take_locked_row(client, plans, key, holder, ttl, role));
    }
    if live {
        return Ok(busy_until(
            TimestampWithTimeZone::try_from(row.expires_at).ok(),
        ));
    }
    if row.untouched {
        return grant_under_key_lock(client, &plans.grant_update, key, holder, ttl, role);
    }
    // Free, but some transaction has locked or updated the row version we
    // saw (a release in flight, an aborted grant): lock it, skipping it if
    // it is still locked, and decide again on what we locked.
    in_subtransaction(|| take_locked_row(client, plans, key, holder, ttl, role))
}

/// Run one grant attempt in an internal subtransaction, committed only if it
/// grants. Rolled back otherwise, and on any error (which then propagates),
/// so an attempt that does not grant leaves no row lock, key lock or
/// transaction id behind: a waiter, or an explicit transaction that got NULL,
/// would otherwise block the owner's release or its fenced writes.
fn in_subtransaction(
    work: impl FnOnce() -> Result<Attempt, FenceError>,
) -> Result<Attempt, FenceError> {
    let subxact = SubTransaction::begin();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(outcome) => {
            match &outcome {
                Ok(Attempt::Granted(_)) => subxact.commit(),
                _ => subxact.roll_back(),
            }
            outcome
        }
        Err(error) => {
            // pgrx has already copied and flushed PostgreSQL's error state.
            subxact.roll_back();
            std::panic::resume_unwind(error)
        }
    }
}

fn busy_until(expires_at: Option<TimestampWithTimeZone>) -> Attempt {
    let retry_in_ms = expires_at.map_or(wait::RECHECK_INTERVAL_MS, |at| {
        millis_until(at, wait::RECHECK_INTERVAL_MS)
    });
    Attempt::Busy { retry_in_ms }
}

/// Lock the key exclusively for this (sub)transaction, the right to grant a
/// new lease on it; `Some(Busy)` if a fenced write or another grant holds it.
fn claim_key(key: &str) -> Option<Attempt> {
    (!keylock::try_exclusive(key)).then_some(Attempt::Busy {
        retry_in_ms: wait::LOCKED_ROW_RETRY_MS,
    })
}

fn take_locked_row(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    key: &str,
    holder: &str,
    ttl: Interval,
    role: pg_sys::Oid,
) -> Result<Attempt, FenceError> {
    // G3: a fenced write that checked the old lease still holds the key in
    // share mode; no new lease until its transaction ends. Tried first, so a
    // busy key costs no row lock and no transaction id.
    if let Some(busy) = claim_key(key) {
        return Ok(busy);
    }
    let rows = client.update(&plans.lock_row, Some(1), &[key.into()])?;
    if rows.is_empty() {
        // Another transaction has the row locked. It holds no key lock (we
        // have it), so it is an aborted grant's leftover being cleaned up or
        // someone locking the table by hand. Nobody signals when a row lock
        // ends, so retry soon.
        return Ok(Attempt::Busy {
            retry_in_ms: wait::LOCKED_ROW_RETRY_MS,
        });
    }
    let row = rows.first();
    let current_holder: Option<String> = row.get(1)?;
    let live: bool = row.get(2)?.unwrap_or(false);
    let expires_at: Option<TimestampWithTimeZone> = row.get(3)?;
    if live {
        // Taken since we looked; if by this holder, the next attempt extends it.
        return Ok(if current_holder.as_deref() == Some(holder) {
            Attempt::Again
        } else {
            busy_until(expires_at)
        });
    }
    // We hold the row lock, so the update matches.
    grant(client, &plans.grant_update, key, holder, ttl, role)
}

/// G6: the holder retrying (say after a lost reply) gets its live lease back,
/// same token, `expires_at = now + ttl`. A plain update, like renew: it must
/// not wait for, or be turned away by, fenced writes: both share-lock the key.
#[allow(clippy::too_many_arguments)]
fn extend_own_lease(
    client: &mut SpiClient<'_>,
    plans: &Plans,
    key: &str,
    holder: &str,
    token: i64,
    owner: pg_sys::Oid,
    ttl: Interval,
    role: pg_sys::Oid,
) -> Result<Attempt, FenceError> {
    if owner != role && !is_fence_admin(role) {
        return Err(not_owner("re-acquire", key, token, owner, role));
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
    statement: &OwnedPreparedStatement,
    key: &str,
    holder: &str,
    ttl: Interval,
    role: pg_sys::Oid,
) -> Result<Attempt, FenceError> {
    if let Some(busy) = claim_key(key) {
        return Ok(busy);
    }
    let outcome = grant(client, statement, key, holder, ttl, role)?;
    if !matches!(outcome, Attempt::Granted(_)) {
        keylock::release_exclusive(key);
    }
    Ok(outcome)
}

/// Issue a token and run a grant statement (`$1` key, `$2` holder, `$3`
/// token, `$4` ttl, `$5` role, `$6` now, `$7` application_name; returning
/// `expires_at`). `now` is `clock_timestamp()`, taken after the token.
fn grant(
    client: &mut SpiClient<'_>,
    statement: &OwnedPreparedStatement,
    key: &str,
    holder: &str,
    ttl: Interval,
    role: pg_sys::Oid,
) -> Result<Attempt, FenceError> {
    let token = issue_token()?;
    let now = TimestampWithTimeZone::try_from(now_micros())
        .map_err(|_| FenceError::internal("clock_timestamp() out of range".into()))?;
    let rows = client.update(
        statement,
        Some(1),
        &[
            key.into(),
            holder.into(),
            token.into(),
            ttl.into(),
            role.into(),
            now.into(),
            application_name().into(),
        ],
    )?;
    if rows.is_empty() {
        return Ok(Attempt::Again);
    }
    Ok(Attempt::Granted(granted(
        key,
        holder,
        token,
        Some(now),
        rows.first().get(1)?,
    )?))
}

/// This session's `application_name`, recorded with a grant.
fn application_name() -> Option<String> {
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
fn grant_outcome(
    rows: pgrx::spi::SpiTupleTable<'_>,
    key: &str,
    holder: &str,
    token: i64,
) -> Result<Attempt, FenceError> {
    if rows.is_empty() {
        return Ok(Attempt::Again);
    }
    let row = rows.first();
    Ok(Attempt::Granted(granted(
        key,
        holder,
        token,
        row.get(1)?,
        row.get(2)?,
    )?))
}

/// An internal subtransaction, as PL/pgSQL opens one for an EXCEPTION block.
/// Ending it restores the memory context and resource owner of its caller.
struct SubTransaction {
    memory_context: pg_sys::MemoryContext,
    resource_owner: pg_sys::ResourceOwner,
}

impl SubTransaction {
    fn begin() -> SubTransaction {
        unsafe {
            let memory_context = pg_sys::CurrentMemoryContext;
            let resource_owner = pg_sys::CurrentResourceOwner;
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            pg_sys::MemoryContextSwitchTo(memory_context);
            SubTransaction {
                memory_context,
                resource_owner,
            }
        }
    }

    fn commit(&self) {
        unsafe {
            pg_sys::ReleaseCurrentSubTransaction();
            self.restore();
        }
    }

    fn roll_back(&self) {
        unsafe {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            self.restore();
        }
    }

    unsafe fn restore(&self) {
        unsafe {
            pg_sys::MemoryContextSwitchTo(self.memory_context);
            pg_sys::CurrentResourceOwner = self.resource_owner;
        }
    }
}

fn required_col<T>(value: Option<T>) -> Result<T, FenceError> {
    value.ok_or_else(|| FenceError::internal("a NOT NULL lease column was NULL".into()))
}

fn granted(
    key: &str,
    holder: &str,
    token: i64,
    acquired_at: Option<TimestampWithTimeZone>,
    expires_at: Option<TimestampWithTimeZone>,
) -> Result<Lease, FenceError> {
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
) -> Result<Option<(pg_sys::Oid, i64)>, FenceError> {
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

pub fn renew(
    lock_key: Option<&str>,
    token: Option<i64>,
    ttl: Option<Interval>,
) -> Result<Option<TimestampWithTimeZone>, FenceError> {
    const F: &str = "lock_renew";
    refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    let token = required(F, "token", token)?;
    let ttl = ttl.map(|ttl| exact_ttl(F, &ttl)).transpose()?;
    let role = caller_role();
    let admin = is_fence_admin(role);
    keylock::share(key);
    with_spi(|client, plans| {
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
            return Ok(rows.first().get(1)?);
        }
        keylock::release_share(key);
        match live_owner(client, plans, key, Some(token))? {
            Some((owner, _)) => Err(not_owner("renew", key, token, owner, role)),
            None => Ok(None),
        }
    })
}

pub fn release(lock_key: Option<&str>, token: Option<i64>) -> Result<bool, FenceError> {
    const F: &str = "lock_release";
    refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    let token = required(F, "token", token)?;
    let role = caller_role();
    let admin = is_fence_admin(role);
    keylock::share(key);
    with_spi(|client, plans| {
        let rows = may_commit_asynchronously(|| {
            client.update(
                &plans.release,
                Some(1),
                &[key.into(), token.into(), role.into(), admin.into()],
            )
        })?;
        if !rows.is_empty() {
            wait::wake_after_commit(key);
            return Ok(true);
        }
        keylock::release_share(key);
        match live_owner(client, plans, key, Some(token))? {
            Some((owner, _)) => Err(not_owner("release", key, token, owner, role)),
            None => Ok(false),
        }
    })
}

pub fn force_release(lock_key: Option<&str>) -> Result<bool, FenceError> {
    const F: &str = "lock_force_release";
    refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    let role = caller_role();
    let admin = is_fence_admin(role);
    keylock::share(key);
    with_spi(|client, plans| {
        let rows = client.update(
            &plans.force_release,
            Some(1),
            &[key.into(), role.into(), admin.into()],
        )?;
        if !rows.is_empty() {
            wait::wake_after_commit(key);
            return Ok(true);
        }
        keylock::release_share(key);
        match live_owner(client, plans, key, None)? {
            Some((owner, token)) => Err(not_owner("force-release", key, token, owner, role)),
            None => Ok(false),
        }
    })
}

pub fn status(lock_key: Option<&str>) -> Result<Option<Lease>, FenceError> {
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

pub fn token_of(lock_key: Option<&str>) -> Result<Option<i64>, FenceError> {
    let key = check_key("current_token", lock_key)?;
    with_spi(|client, plans| {
        let rows = client.select(&plans.token_of, Some(1), &[key.into()])?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(rows.first().get(1)?)
    })
}
