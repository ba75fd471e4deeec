//! pg_fence's configuration parameters (GUCs), all under the `fence.` prefix.

use std::ffi::CString;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::errors::{fail, Failure, FenceError};

/// `fence.max_ttl`: the longest ttl a lease may be acquired or renewed with.
/// Superuser-only, so a role cannot lift its own limit.
static MAX_TTL: GucSetting<i32> = GucSetting::<i32>::new(86_400);

/// `fence.token`: the fencing token protected writes carry when the table has
/// no token column (and always for DELETE). Meant for `SET LOCAL`.
static TOKEN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The token `SET LOCAL fence.token` gave this transaction, if any.
pub fn fence_token() -> Result<Option<i64>, Failure> {
    let Some(value) = TOKEN.get() else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match text.parse::<i64>() {
        Ok(token) => Ok(Some(token)),
        Err(_) => fail(FenceError::InvalidFenceToken {
            value: text.to_owned(),
        }),
    }
}

pub fn max_ttl_seconds() -> i32 {
    MAX_TTL.get()
}

pub fn register() {
    GucRegistry::define_int_guc(
        c"fence.max_ttl",
        c"Longest ttl a pg_fence lease may be acquired or renewed with.",
        c"lock_acquire and lock_renew reject a longer ttl with SQLSTATE 22023.",
        &MAX_TTL,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"fence.token",
        c"Fencing token carried by writes to tables protected by fence.protect().",
        c"Set it with SET LOCAL in the writing transaction; used when the table has no token column, and always for DELETE.",
        &TOKEN,
        GucContext::Userset,
        GucFlags::default(),
    );
    // SAFETY: called from _PG_init with a static NUL-terminated prefix.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"fence".as_ptr()) };
}
