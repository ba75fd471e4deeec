//! pg_fence's configuration parameters (GUCs), all under the `fence.` prefix.

use std::ffi::{c_char, c_void, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::errors::{fail, Failure, FenceError};

/// `fence.max_ttl`: the longest ttl a lease may be acquired or renewed with.
/// Superuser-only, so a role cannot lift its own limit.
static MAX_TTL: GucSetting<i32> = GucSetting::<i32>::new(86_400);

/// `fence.token`: the fencing token protected writes carry when the table has
/// no token column (and always for DELETE). Meant for `SET LOCAL`.
static TOKEN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

thread_local! {
    /// The local transaction id (PGPROC's lxid) in which `fence.token` was
    /// last assigned a value.
    static TOKEN_SET_IN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// This backend's local transaction id: a new one for every transaction,
/// 0 outside of one.
fn local_transaction_id() -> u32 {
    // SAFETY: MyProc is this backend's own PGPROC (or NULL before it has
    // one); lxid is written only by this backend.
    unsafe {
        let proc_ = pg_sys::MyProc;
        if proc_.is_null() {
            0
        } else {
            (*proc_).lxid
        }
    }
}

/// Assign hook of `fence.token`: remember in which transaction it was set.
#[pg_guard]
unsafe extern "C-unwind" fn token_assigned(_value: *const c_char, _extra: *mut c_void) {
    TOKEN_SET_IN.set(local_transaction_id());
}

/// The token this transaction gave `fence.token` (`SET LOCAL`, or `SET`, or
/// `set_config`, within this transaction), if any. A value set in an
/// earlier transaction (a session-level `SET` that outlived its
/// transaction, `ALTER ROLE ... SET`, `PGOPTIONS`, a connection that a
/// pooler passed on) is no token: it would keep presenting a lease's token
/// long after the writer that knew it.
pub fn fence_token() -> Result<Option<i64>, Failure> {
    let Some(value) = TOKEN.get() else {
        return Ok(None);
    };
    let now = local_transaction_id();
    if now == 0 || TOKEN_SET_IN.get() != now {
        return Ok(None);
    }
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
    // SAFETY: the assign hook is a #[pg_guard] function of this library,
    // which is never unloaded.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"fence.token",
            c"Fencing token carried by writes to tables protected by fence.protect().",
            c"Set it with SET LOCAL in the writing transaction; used when the table has no token column, and always for DELETE. A value set in an earlier transaction is ignored.",
            &TOKEN,
            GucContext::Userset,
            GucFlags::default(),
            None,
            Some(token_assigned),
            None,
        );
    }
    // Defining the setting re-applies a value set before the library was
    // loaded, which calls the assign hook now: that value counts only if it
    // was set in this transaction, which its stack of saved values shows.
    if !token_set_in_this_transaction() {
        TOKEN_SET_IN.set(0);
    }
    // SAFETY: called from _PG_init with a static NUL-terminated prefix.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"fence".as_ptr()) };
}

/// Whether `fence.token`'s current value was set in the current transaction
/// (SET LOCAL, or SET before it commits): then PostgreSQL keeps the value
/// it replaced on the setting's stack until the transaction ends.
fn token_set_in_this_transaction() -> bool {
    // SAFETY: get_guc_variables' array has GetNumConfigOptions() entries,
    // each a valid config_generic with a NUL-terminated name; read only, in
    // this backend, with no GUC change in between.
    unsafe {
        let variables = pg_sys::get_guc_variables();
        let count = pg_sys::GetNumConfigOptions().max(0) as usize;
        (0..count)
            .map(|i| *variables.add(i))
            .find(|&variable| {
                !variable.is_null() && std::ffi::CStr::from_ptr((*variable).name) == c"fence.token"
            })
            .is_some_and(|variable| !(*variable).stack.is_null())
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn fence_token_setting_parses_bigints_only() {
        Spi::run("SET LOCAL fence.token = ' 42 '").unwrap();
        assert_eq!(
            super::fence_token().map_err(|failure| failure.error),
            Ok(Some(42))
        );
        Spi::run("SET LOCAL fence.token = ''").unwrap();
        assert_eq!(
            super::fence_token().map_err(|failure| failure.error),
            Ok(None)
        );
        Spi::run("SET LOCAL fence.token = 'forty-two'").unwrap();
        assert_eq!(
            super::fence_token()
                .map_err(|failure| failure.error)
                .unwrap_err()
                .sqlstate(),
            "22023"
        );
    }
}
