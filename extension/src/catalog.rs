//! Where pg_fence's own catalog objects are: the one place their names are
//! written. Looked up through the syscache on each call (a hash probe), so
//! that a DROP and CREATE EXTENSION in the same backend, which gives them
//! new OIDs, needs no invalidation.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::{fail, Failure, FenceError};

fn namespace() -> pg_sys::Oid {
    // SAFETY: a syscache lookup by name; with missing_ok = false a missing
    // schema raises PostgreSQL's own error.
    unsafe { pg_sys::get_namespace_oid(c"fence".as_ptr(), false) }
}

fn relation(name: &CStr) -> Result<pg_sys::Oid, Failure> {
    // SAFETY: a syscache lookup by name and namespace.
    let oid = unsafe { pg_sys::get_relname_relid(name.as_ptr(), namespace()) };
    if oid == pg_sys::InvalidOid {
        return fail(FenceError::internal(format!(
            "relation fence.{} is missing",
            name.to_string_lossy()
        )));
    }
    Ok(oid)
}

/// `fence.leases`, and its primary key `fence.leases_pkey`.
pub fn leases() -> Result<(pg_sys::Oid, pg_sys::Oid), Failure> {
    Ok((relation(c"leases")?, relation(c"leases_pkey")?))
}

/// `fence.shared_leases` and its primary key: None in a database still on
/// the 0.1.0 schema, which has no shared leases.
pub fn shared_leases() -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    // SAFETY: syscache lookups by name and namespace.
    let (table, index) = unsafe {
        (
            pg_sys::get_relname_relid(c"shared_leases".as_ptr(), namespace()),
            pg_sys::get_relname_relid(c"shared_leases_pkey".as_ptr(), namespace()),
        )
    };
    (table != pg_sys::InvalidOid && index != pg_sys::InvalidOid).then_some((table, index))
}

/// `fence.shared_leases` alone (one lookup, for the writers' filter).
pub fn shared_leases_table() -> Option<pg_sys::Oid> {
    // SAFETY: a syscache lookup by name and namespace.
    let oid = unsafe { pg_sys::get_relname_relid(c"shared_leases".as_ptr(), namespace()) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// `fence.history_keys`: None in a database still on the 0.1.0 schema,
/// which keeps no term history.
pub fn history_keys() -> Option<pg_sys::Oid> {
    // SAFETY: a syscache lookup by name and namespace.
    let oid = unsafe { pg_sys::get_relname_relid(c"history_keys".as_ptr(), namespace()) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// `fence.history_keys` and its primary key, for [`crate::probe::history_keep`].
pub fn history_keys_and_index() -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    // SAFETY: syscache lookups by name and namespace.
    let (table, index) = unsafe {
        (
            pg_sys::get_relname_relid(c"history_keys".as_ptr(), namespace()),
            pg_sys::get_relname_relid(c"history_keys_pkey".as_ptr(), namespace()),
        )
    };
    (table != pg_sys::InvalidOid && index != pg_sys::InvalidOid).then_some((table, index))
}

/// `fence.token_seq`, the one global order of tokens (G1).
pub fn token_sequence() -> Result<pg_sys::Oid, Failure> {
    relation(c"token_seq")
}

/// The composite type `fence.lease`.
pub fn lease_type() -> Result<pg_sys::Oid, Failure> {
    // SAFETY: a syscache lookup by name and namespace; both datums are
    // valid for the call (a C string and an oid).
    let oid = unsafe {
        pg_sys::GetSysCacheOid(
            pg_sys::SysCacheIdentifier::TYPENAMENSP as i32,
            pg_sys::Anum_pg_type_oid as pg_sys::AttrNumber,
            pg_sys::Datum::from(c"lease".as_ptr()),
            namespace().into_datum().unwrap_or(pg_sys::Datum::from(0)),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        )
    };
    if oid == pg_sys::InvalidOid {
        return fail(FenceError::internal("type fence.lease is missing".into()));
    }
    Ok(oid)
}

/// `fence.fences`, the registry of fenced tables: None in a database still
/// on the 0.1.0 schema (this library runs with the old SQL objects until
/// `ALTER EXTENSION pg_fence UPDATE`).
pub fn fences() -> Option<pg_sys::Oid> {
    // SAFETY: a syscache lookup by name and namespace.
    let oid = unsafe { pg_sys::get_relname_relid(c"fences".as_ptr(), namespace()) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// `fence.key_secret`, the secret of the key lock's hash: None in a
/// database still on the 0.1.0 schema.
pub fn key_secret() -> Option<pg_sys::Oid> {
    // SAFETY: a syscache lookup by name and namespace.
    let oid = unsafe { pg_sys::get_relname_relid(c"key_secret".as_ptr(), namespace()) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}
