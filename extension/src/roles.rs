//! Roles (G4): who is calling, who may act on a lease, and the 42501 error
//! that names both.

use pgrx::pg_sys;

use crate::errors::{fail, Failure, FenceError};

/// The caller's role: the current user outside any SECURITY DEFINER function,
/// so our own definer rights do not hide who is calling.
pub fn caller_role() -> pg_sys::Oid {
    // SAFETY: a backend-local read, no preconditions.
    unsafe { pg_sys::GetOuterUserId() }
}

/// Refuse to act for a role inside a security-restricted operation (an
/// index expression run by ANALYZE or autovacuum, REFRESH MATERIALIZED VIEW,
/// ...): there the outer role is whoever started the operation, not the
/// code that called us, so G4's role check would be meaningless.
pub fn refuse_security_restricted(function: &'static str) -> Result<(), Failure> {
    // SAFETY: a backend-local read, no preconditions.
    if unsafe { pg_sys::InSecurityRestrictedOperation() } {
        return fail(FenceError::SecurityRestricted { function });
    }
    Ok(())
}

pub fn is_fence_admin(role: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookups by name and by oid, inside a transaction; missing_ok
    // means a missing role is InvalidOid, not an error.
    unsafe {
        let admin = pg_sys::get_role_oid(c"fence_admin".as_ptr(), true);
        admin != pg_sys::InvalidOid && pg_sys::has_privs_of_role(role, admin)
    }
}

pub fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: GetUserNameFromId with noerr returns NULL or a palloc'd NUL-terminated
    // name.
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

pub fn not_owner(
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
