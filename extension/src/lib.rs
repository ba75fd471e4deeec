//! pg_fence: PostgreSQL as the lock service and the referee.
//!
//! Leases with fencing tokens live in ordinary tables (`sql/schema.sql`).
//! The SQL-callable functions are in [`api`]; granting in [`acquire`];
//! renew, release and status in [`lease`]; semaphores in [`semaphore`],
//! multi-key leases in [`multi`], watching a key in [`watch`]; the stale-write trigger in
//! [`fence`] and its reach to partitions and children in [`reach`]; the key
//! lock in [`keylock`], waiting in [`wait`], tokens and durability in
//! [`durability`], the error contract in [`errors`]. In preload mode,
//! shared memory is [`shmem`]'s, used by the statistics ([`stats`]) and
//! the waiter registry ([`waiters`]). `INTERNALS.md` beside
//! this crate's manifest says which locks are held by whom and for how long,
//! how a grant is decided, and what an abort leaves behind; the guarantees
//! G1–G8 are in the README.

#![deny(unsafe_op_in_unsafe_fn)]

use pgrx::prelude::*;

pub mod acquire;
pub mod api;
pub mod args;
pub mod catalog;
pub mod durability;
pub mod errors;
pub mod fence;
pub mod history;
pub mod key;
pub mod keylock;
pub mod lease;
pub mod multi;
pub mod operations;
pub mod plans;
pub mod probe;
pub mod reach;
pub mod roles;
pub mod semaphore;
pub mod settings;
pub mod shared;
pub mod shmem;
pub mod statement;
pub mod stats;
pub mod subxact;
pub mod sweep;
pub mod wait;
pub mod waiters;
pub mod watch;

::pgrx::pg_module_magic!(name, version);

// Tables, the token sequence, the lease type and the locks view come first:
// every function below refers to them.
pgrx::extension_sql_file!("../../sql/schema.sql", name = "schema", bootstrap);
// The statistics and waiters views read these functions' rows.
pgrx::extension_sql_file!(
    "../../sql/stats.sql",
    name = "stats",
    requires = [
        stats::_lock_stats,
        stats::_lock_wait_histogram,
        stats::_lock_stats_info,
        waiters::_waiters
    ]
);
// fence.protect()/unprotect() create triggers on the fence_guard and
// fence_no_truncate functions, so they come last.
pgrx::extension_sql_file!("../../sql/fence.sql", name = "fence", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::register();
    stats::register();
    shmem::init();
    // SAFETY: a read of a postmaster-set flag, in _PG_init.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        settings::register_sweep();
        sweep::register_worker();
    }
    settings::reserve_prefix();
    statement::install();
    // SAFETY: a function of this library, which is never unloaded.
    unsafe {
        pgrx::pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pgrx::pg_sys::Datum::from(0),
        )
    };
    // SAFETY: _PG_init runs once per backend as the library loads; the callbacks are
    // functions of this library, which is never unloaded.
    unsafe {
        pgrx::pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pgrx::pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
        pgrx::pg_sys::RegisterResourceReleaseCallback(
            Some(on_resource_release),
            std::ptr::null_mut(),
        );
    }
}

/// The one relcache invalidation callback: no catalog access here, only
/// forgetting what was cached.
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(
    _arg: pgrx::pg_sys::Datum,
    _relation: pgrx::pg_sys::Oid,
) {
    fence::forget_installed();
}

/// The one resource-release callback: waking waiters once a committing
/// transaction has released its locks.
#[pg_guard]
unsafe extern "C-unwind" fn on_resource_release(
    phase: pgrx::pg_sys::ResourceReleasePhase::Type,
    is_commit: bool,
    is_top_level: bool,
    _arg: *mut std::ffi::c_void,
) {
    wait::on_resource_release(phase, is_commit, is_top_level);
}

/// The one transaction callback: waking waiters after a release commits,
/// and deciding at pre-commit whether a release/renew may commit async.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pgrx::pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    durability::on_xact_event(event);
    statement::on_xact_event(event);
    wait::on_xact_event(event);
    stats::on_xact_event(event);
    if event == pgrx::pg_sys::XactEvent::XACT_EVENT_ABORT {
        waiters::on_abort();
    }
}

/// The one subtransaction callback: statistics that wait for commit.
#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pgrx::pg_sys::SubXactEvent::Type,
    _my_subid: pgrx::pg_sys::SubTransactionId,
    _parent_subid: pgrx::pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    stats::on_subxact_event(event);
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // The #[pg_test]s run in preload mode, as `make test`'s cluster does.
        vec!["shared_preload_libraries = 'pg_fence'"]
    }
}
