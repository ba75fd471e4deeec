//! pg_fence's configuration parameters (GUCs), all under the `fence.` prefix.

use std::ffi::CString;

use pgrx::pg_sys;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::errors::{fail, Failure, FenceError};

/// `fence.max_ttl`: the longest ttl a lease may be acquired or renewed with.
/// Superuser-only, so a role cannot lift its own limit.
static MAX_TTL: GucSetting<i32> = GucSetting::<i32>::new(86_400);

/// `fence.token`: the fencing token protected writes carry when the table has
/// no token column (and always for DELETE). Meant for `SET LOCAL`.
static TOKEN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The token this transaction gave `fence.token` (`SET LOCAL`, or `SET`,
/// or `set_config`, within this transaction), if any. A value set in an
/// earlier transaction (a session-level `SET` that outlived its
/// transaction, `ALTER ROLE ... SET`, `PGOPTIONS`, a connection a pooler
/// passed on, or one PostgreSQL restored on leaving a savepoint or a
/// function's SET clause) is no token: it would keep presenting a lease's
/// token long after the writer that knew it.
pub fn fence_token() -> Result<Option<i64>, Failure> {
    if !token_set_in_this_transaction() {
        return Ok(None);
    }
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

/// `fence.sweep_interval`: seconds between two runs of the background
/// sweep (preload mode; 0, the default, runs none).
static SWEEP_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `fence.sweep_idle_for`: the background sweep's `idle_for`.
static SWEEP_IDLE_FOR: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);

/// `fence.sweep_database`: the database the background sweep works in.
static SWEEP_DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));

pub fn sweep_interval_seconds() -> i32 {
    SWEEP_INTERVAL.get()
}

pub fn sweep_idle_for_seconds() -> i32 {
    SWEEP_IDLE_FOR.get()
}

pub fn sweep_database() -> String {
    SWEEP_DATABASE
        .get()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "postgres".to_owned())
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
        c"Set it with SET LOCAL in the writing transaction; used when the table has no token column, and always for DELETE. A value set in an earlier transaction is ignored.",
        &TOKEN,
        GucContext::Userset,
        GucFlags::default(),
    );
}

/// The background sweep's settings (sweep.rs): preload mode only, where
/// the worker runs (`fence.sweep_database` can only be set at server
/// start, so it can only be defined while preloading).
pub fn register_sweep() {
    GucRegistry::define_int_guc(
        c"fence.sweep_interval",
        c"Seconds between two runs of pg_fence's background sweep (0: none).",
        c"Preload mode only: a background worker runs fence.sweep(fence.sweep_idle_for) in fence.sweep_database on this interval.",
        &SWEEP_INTERVAL,
        0,
        i32::MAX / 1000,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"fence.sweep_idle_for",
        c"How long a key's lease must have ended before the background sweep deletes its row.",
        c"The idle_for the background worker passes to fence.sweep().",
        &SWEEP_IDLE_FOR,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"fence.sweep_database",
        c"The database pg_fence's background sweep works in.",
        c"One database per server, as pg_cron's cron.database_name; sweep others with fence.sweep() from a scheduler.",
        &SWEEP_DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

/// After every `fence.` setting is defined (here, stats.rs, shmem.rs):
/// reserve the prefix, so a misspelt `fence.` setting is an error. Last,
/// because reserving drops the values of settings not yet defined.
pub fn reserve_prefix() {
    // SAFETY: called from _PG_init with a static NUL-terminated prefix.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"fence".as_ptr()) };
}

thread_local! {
    /// `fence.token`'s entry in PostgreSQL's table of settings, once found
    /// (the entry of a defined setting does not move).
    static TOKEN_ENTRY: std::cell::Cell<*mut pg_sys::config_generic> =
        const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// Whether `fence.token`'s current value was set in the current
/// transaction: then PostgreSQL keeps the value it replaced on the
/// setting's stack of saved values until the (sub)transaction or the
/// function that set it ends, and only then; and set by SET, SET LOCAL,
/// set_config or a function's SET clause (source "session"), not brought
/// back from ALTER ROLE, ALTER DATABASE, PGOPTIONS or the configuration
/// file by a RESET or SET ... TO DEFAULT.
fn token_set_in_this_transaction() -> bool {
    let mut entry = TOKEN_ENTRY.get();
    if entry.is_null() {
        // SAFETY: get_guc_variables' array has GetNumConfigOptions()
        // entries, each a valid config_generic with a NUL-terminated name;
        // read only, in this backend.
        entry = unsafe {
            let variables = pg_sys::get_guc_variables();
            let count = pg_sys::GetNumConfigOptions().max(0) as usize;
            (0..count)
                .map(|i| *variables.add(i))
                .find(|&variable| {
                    !variable.is_null()
                        && std::ffi::CStr::from_ptr((*variable).name) == c"fence.token"
                })
                .unwrap_or(std::ptr::null_mut())
        };
        TOKEN_ENTRY.set(entry);
    }
    // SAFETY: a valid, defined setting's entry (see above); its stack is
    // NULL or this backend's list of saved values.
    !entry.is_null()
        && unsafe {
            !(*entry).stack.is_null() && (*entry).source == pg_sys::GucSource::PGC_S_SESSION
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
