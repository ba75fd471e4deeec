//! The lease functions' prepared statements: planned once per backend, kept
//! for its lifetime, run through one SPI connection per call.

use std::cell::OnceCell;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiError};

use crate::errors::Failure;

// Prepared statements: planned once per backend, kept for its lifetime.
// Every name is schema-qualified; the functions also pin search_path.
// ---------------------------------------------------------------------------

pub const LIVE: &str = "l.released_at IS NULL AND l.expires_at > pg_catalog.clock_timestamp()";

pub struct Plans {
    pub lock_row: OwnedPreparedStatement,
    pub grant_update: OwnedPreparedStatement,
    pub grant_insert: OwnedPreparedStatement,
    pub extend: OwnedPreparedStatement,
    pub renew: OwnedPreparedStatement,
    pub release: OwnedPreparedStatement,
    pub force_release: OwnedPreparedStatement,
    pub live_owner: OwnedPreparedStatement,
    pub live_lease: OwnedPreparedStatement,
    pub live_between: OwnedPreparedStatement,
    pub token_of: OwnedPreparedStatement,
}

/// A statement planned once and kept for the backend's lifetime (these
/// plans, and shared.rs's). `prepare_mut`: every execution takes a fresh
/// snapshot, which the wait loop in READ COMMITTED depends on.
pub fn keep(
    client: &SpiClient<'_>,
    sql: &str,
    args: &[pg_sys::Oid],
) -> Result<OwnedPreparedStatement, SpiError> {
    let oids: Vec<_> = args.iter().map(|oid| pg_sys::PgOid::from(*oid)).collect();
    Ok(client.prepare_mut(sql, &oids)?.keep())
}

/// The arguments of a grant statement: key, holder, token, ttl, role, now,
/// application_name (an exclusive grant's, and a shared one's).
pub const GRANT_ARGUMENTS: [pg_sys::Oid; 7] = [
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::INT8OID,
    pg_sys::INTERVALOID,
    pg_sys::OIDOID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::TEXTOID,
];

impl Plans {
    fn prepare(client: &SpiClient<'_>) -> Result<Plans, SpiError> {
        use pg_sys::{BOOLOID, INT8OID, INTERVALOID, OIDOID, TEXTOID};
        // The update also names the token of the row version it replaces
        // (the one the caller read, so what it knows of it is exact).
        let mut grant_update_arguments = GRANT_ARGUMENTS.to_vec();
        grant_update_arguments.push(INT8OID);
        let prep = |sql: String, args: &[pg_sys::Oid]| keep(client, &sql, args);
        Ok(Plans {
            lock_row: prep(
                format!(
                    "SELECT l.holder, ({LIVE}) AS live, l.expires_at, l.token, \
                            CASE WHEN l.released_at IS NULL THEN l.acquired_at END AS unreleased_since \
                       FROM fence.leases AS l WHERE l.lock_key = $1 FOR UPDATE SKIP LOCKED"
                ),
                &[TEXTOID],
            )?,
            grant_update: prep(
                    "UPDATE fence.leases AS l \
                    SET holder = $2, token = $3, ttl = $4, acquired_at = $6, expires_at = $6 + $4, \
                        released_at = NULL, owner_role = $5, application_name = $7 \
                  WHERE l.lock_key = $1 AND NOT (l.released_at IS NULL AND l.expires_at > $6) \
                    AND l.token = $8 \
                 RETURNING l.expires_at"
                    .into(),
                &grant_update_arguments,
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
                     RETURNING l.acquired_at, l.released_at"
                ),
                &[TEXTOID, INT8OID, OIDOID, BOOLOID],
            )?,
            force_release: prep(
                format!(
                    "UPDATE fence.leases AS l SET released_at = pg_catalog.clock_timestamp() \
                      WHERE l.lock_key = $1 AND {LIVE} AND (l.owner_role = $2 OR $3) \
                     RETURNING l.acquired_at, l.released_at"
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
            live_between: prep(
                format!(
                    "SELECT l.lock_key, l.holder, l.token, l.acquired_at, l.expires_at FROM fence.leases AS l \
                      WHERE l.lock_key >= $1 COLLATE pg_catalog.\"C\" AND l.lock_key < $2 COLLATE pg_catalog.\"C\" \
                        AND {LIVE} ORDER BY l.lock_key"
                ),
                &[TEXTOID, TEXTOID],
            )?,
            token_of: prep("SELECT l.token FROM fence.leases AS l WHERE l.lock_key = $1".into(), &[TEXTOID])?,
        })
    }
}

thread_local! {
    static PLANS: OnceCell<Plans> = const { OnceCell::new() };
}

/// Run `work` inside one SPI connection with the backend's prepared statements.
pub fn with_spi<R>(
    work: impl FnOnce(&mut SpiClient<'_>, &Plans) -> Result<R, Failure>,
) -> Result<R, Failure> {
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
