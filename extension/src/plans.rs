//! The lease functions' prepared statements: planned once per backend, kept
//! for its lifetime, run through one SPI connection per call.

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiError};

use crate::catalog;
use crate::errors::Failure;

// Prepared statements: planned once per backend, kept for its lifetime.
// Every name is schema-qualified; the functions also pin search_path.
// ---------------------------------------------------------------------------

pub const LIVE: &str = "l.released_at IS NULL AND l.expires_at > pg_catalog.clock_timestamp()";

pub struct Plans {
    pub lock_row: OwnedPreparedStatement,
    pub grant_update: OwnedPreparedStatement,
    pub grant_insert: OwnedPreparedStatement,
    /// `grant_update` and `grant_insert` that keep the term history, with
    /// the key's keep as their last argument; None in a database still on
    /// the 0.1.0 schema.
    pub grant_update_kept: Option<OwnedPreparedStatement>,
    pub grant_insert_kept: Option<OwnedPreparedStatement>,
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

/// A grant's update of a key's row that is not live (`$8`: the token of
/// the version it replaces), returning `expires_at`.
const GRANT_UPDATE: &str = "UPDATE fence.leases AS l \
        SET holder = $2, token = $3, ttl = $4, acquired_at = $6, expires_at = $6 + $4, \
            released_at = NULL, owner_role = $5, application_name = $7 \
      WHERE l.lock_key = $1 AND NOT (l.released_at IS NULL AND l.expires_at > $6) \
        AND l.token = $8 \
     RETURNING l.expires_at";

/// A key's first grant (or its first after a sweep), returning `expires_at`.
const GRANT_INSERT: &str = "INSERT INTO fence.leases AS l \
            (lock_key, holder, token, ttl, acquired_at, expires_at, owner_role, application_name) \
     VALUES ($1, $2, $3, $4, $6, $6 + $4, $5, $7) \
     ON CONFLICT (lock_key) DO NOTHING \
     RETURNING l.expires_at";

/// A grant statement that also keeps the key's term history (history.rs),
/// for a key `fence.history_keys` lists (the caller looked, `probe::
/// history_keep`, and passes the key's keep as `keep`): if the grant wrote
/// its row, its term goes into `fence.terms` (`previous`: the token it
/// replaced) and the key's terms older than the keep go out. One
/// statement, so the term is written exactly when the grant is, and
/// commits or rolls back with it.
fn keeping_history(grant: &str, previous: &str, keep: &str) -> String {
    format!(
        "WITH g AS ({grant}), \
              t AS (INSERT INTO fence.terms (lock_key, token, previous_token, holder, acquired_at) \
                    SELECT $1, $3, {previous}, $2, $6 FROM g), \
              p AS (DELETE FROM fence.terms AS d \
                     WHERE d.lock_key = $1 AND d.acquired_at < $6 - {keep} AND EXISTS (SELECT FROM g)) \
         SELECT g.expires_at FROM g"
    )
}

impl Plans {
    fn prepare(client: &SpiClient<'_>) -> Result<Plans, SpiError> {
        use pg_sys::{BOOLOID, INT8OID, INTERVALOID, OIDOID, TEXTOID};
        // The update also names the token of the row version it replaces
        // (the one the caller read, so what it knows of it is exact).
        let mut grant_update_arguments = GRANT_ARGUMENTS.to_vec();
        grant_update_arguments.push(INT8OID);
        let prep = |sql: String, args: &[pg_sys::Oid]| keep(client, &sql, args);
        let history = catalog::history_keys().is_some();
        Ok(Plans {
            lock_row: prep(
                format!(
                    "SELECT l.holder, ({LIVE}) AS live, l.expires_at, l.token, \
                            CASE WHEN l.released_at IS NULL THEN l.acquired_at END AS unreleased_since \
                       FROM fence.leases AS l WHERE l.lock_key = $1 FOR UPDATE SKIP LOCKED"
                ),
                &[TEXTOID],
            )?,
            grant_update: prep(GRANT_UPDATE.into(), &grant_update_arguments)?,
            grant_insert: prep(GRANT_INSERT.into(), &GRANT_ARGUMENTS)?,
            grant_update_kept: history
                .then(|| {
                    let mut arguments = grant_update_arguments.clone();
                    arguments.push(INTERVALOID);
                    prep(keeping_history(GRANT_UPDATE, "$8", "$9"), &arguments)
                })
                .transpose()?,
            grant_insert_kept: history
                .then(|| {
                    let mut arguments = GRANT_ARGUMENTS.to_vec();
                    arguments.push(INTERVALOID);
                    prep(keeping_history(GRANT_INSERT, "NULL::bigint", "$8"), &arguments)
                })
                .transpose()?,
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
    static PLANS: RefCell<Option<Rc<Plans>>> = const { RefCell::new(None) };
}

/// Run `work` inside one SPI connection with the backend's prepared statements.
/// Planned in a database still on the 0.1.0 schema (the library upgraded,
/// `ALTER EXTENSION pg_fence UPDATE` not yet run), the grants keep no term
/// history, which that schema has no table for; they are planned again once
/// the table is there, so no grant after the upgrade goes unrecorded.
pub fn with_spi<R>(
    work: impl FnOnce(&mut SpiClient<'_>, &Plans) -> Result<R, Failure>,
) -> Result<R, Failure> {
    Spi::connect_mut(|client| {
        let kept = PLANS.with(|cell| {
            cell.borrow()
                .as_ref()
                .filter(|plans| {
                    plans.grant_update_kept.is_some() || catalog::history_keys().is_none()
                })
                .cloned()
        });
        let plans = match kept {
            Some(plans) => plans,
            None => {
                let plans = Rc::new(Plans::prepare(client)?);
                PLANS.with(|cell| *cell.borrow_mut() = Some(plans.clone()));
                plans
            }
        };
        work(client, &plans)
    })
}
