//! `fence.sweep(idle_for)` (issue 15): a bounded lease table for workloads
//! with ever-new keys (`invoice:<id>`), which otherwise grow `fence.leases`
//! by a row per key for ever; and, in preload mode, a background worker
//! that runs it on an interval (`fence.sweep_interval`).
//!
//! What goes: the row of a key whose lease ended (released, forced or
//! expired) more than `idle_for` ago, and a shared lease that expired more
//! than `idle_for` ago (released ones are deleted at release). What stays:
//! anything live, a key whose term history is kept (history.rs: the next
//! term would name no predecessor), and a row some transaction has locked
//! (a grant in flight, a prepared transaction): skipped, not waited for.
//!
//! Why it is safe:
//! - G1: tokens come from `fence.token_seq`, never from the rows, so a
//!   swept key's next lease still gets a token above every earlier one.
//!   `current_token` of a swept key is NULL again (as DESIGN.md says).
//! - G2/G3: only rows that are not live go, and each is locked (`FOR
//!   UPDATE SKIP LOCKED`, which rechecks the condition on the newest
//!   version) before it is deleted. The one change a row that is not live
//!   can see is a new grant, which either holds the row (the sweep skips
//!   it) or updates it after the delete committed and matches nothing, and
//!   then inserts the key anew (the acquire loop's `Again`). A fenced write
//!   under a swept key finds no lease, as it found no live one before.

use pgrx::datum::Interval;
use pgrx::spi::Spi;

use crate::args::{non_negative, required};
use crate::errors::{fail, Failure, FenceError};
use crate::roles::{caller_role, is_fence_admin, refuse_security_restricted, role_name};

/// `fence.sweep(idle_for)`: how many rows went.
pub fn sweep(idle_for: Option<Interval>) -> Result<i64, Failure> {
    const F: &str = "sweep";
    refuse_security_restricted(F)?;
    let role = caller_role();
    if !is_fence_admin(role) {
        return fail(FenceError::NeedsFenceAdmin {
            function: F,
            role: role_name(role),
        });
    }
    let idle_for = required(F, "idle_for", idle_for)?;
    non_negative(F, "idle_for", &idle_for)?;
    // Its statements must see every registration that committed before
    // they run, which a transaction snapshot would not.
    if crate::acquire::uses_transaction_snapshot() {
        return fail(FenceError::NeedsReadCommitted { function: F });
    }
    // Until this transaction ends: no registration of a key's history runs
    // meanwhile (history.rs), so none can be missed by the check below.
    crate::keylock::sweep_lock(true, true);
    Spi::connect_mut(|client| {
        // A lease that ended by expiry is counted as one (statistics) when
        // the grant that replaces it sees it; a swept one, here.
        let gone = client.update(
            "WITH idle AS ( \
               SELECT l.ctid FROM fence.leases AS l \
                WHERE COALESCE(l.released_at, l.expires_at) \
                      < pg_catalog.clock_timestamp() - $1 \
                  AND NOT EXISTS (SELECT FROM fence.history_keys AS h \
                                   WHERE h.lock_key = l.lock_key) \
                  AND NOT EXISTS (SELECT FROM fence.shared_leases AS s \
                                   WHERE s.lock_key = l.lock_key \
                                     AND s.expires_at > pg_catalog.clock_timestamp()) \
                  FOR UPDATE OF l SKIP LOCKED) \
             DELETE FROM fence.leases AS l USING idle WHERE l.ctid = idle.ctid \
             RETURNING l.lock_key, CASE WHEN l.released_at IS NULL THEN \
                 (pg_catalog.date_part('epoch', l.expires_at - l.acquired_at) * 1000000)::bigint END",
            None,
            &[idle_for.into()],
        )?;
        let leases = gone.len() as i64;
        for row in gone {
            if let (Some(key), Some(held)) = (row.get::<String>(1)?, row.get::<i64>(2)?) {
                crate::stats::expired(&key, held.max(0) as u64);
            }
        }
        let shared = client
            .update(
                "WITH idle AS ( \
                   SELECT s.ctid FROM fence.shared_leases AS s \
                    WHERE s.expires_at < pg_catalog.clock_timestamp() - $1 \
                      FOR UPDATE OF s SKIP LOCKED), \
                 gone AS (DELETE FROM fence.shared_leases AS s USING idle \
                           WHERE s.ctid = idle.ctid RETURNING 1) \
                 SELECT pg_catalog.count(*) FROM gone",
                None,
                &[idle_for.into()],
            )?
            .first()
            .get::<i64>(1)?
            .unwrap_or(0);
        Ok(leases + shared)
    })
}

extern "C-unwind" {
    /// PostgreSQL's SIGTERM handler for backends and background workers
    /// (postgres.c), the C symbol itself: pgrx's `pg_sys::die` is a Rust
    /// wrapper, which a signal handler must not be.
    #[link_name = "die"]
    fn postgres_die(postgres_signal_arg: std::ffi::c_int);
}

/// Register the background sweeper (preload mode, from `_PG_init`). It
/// always runs, idle while `fence.sweep_interval` is 0, so a reload turns
/// the sweep on or off without a restart.
pub fn register_worker() {
    use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
    BackgroundWorkerBuilder::new("pg_fence sweeper")
        .set_type("pg_fence sweeper")
        .set_library("pg_fence")
        .set_function("pg_fence_sweeper_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(std::time::Duration::from_secs(10)))
        .load();
}

/// The sweeper: every `fence.sweep_interval` seconds, one transaction
/// running `fence.sweep(fence.sweep_idle_for)` in `fence.sweep_database`,
/// if pg_fence 0.2 is installed there. It connects to the database only
/// once the interval is first set (a server that never sweeps holds no
/// connection to it). An error ends the transaction and the worker
/// (logged), and so does SIGTERM (`pg_terminate_backend`, or a sweep
/// cancelled at shutdown: PostgreSQL's own handler, so a long sweep stops
/// at once); the postmaster starts it again 10 s later. A standby never
/// starts it (it starts when recovery has finished).
#[pgrx::pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_fence_sweeper_main(_argument: pgrx::pg_sys::Datum) {
    use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
    use pgrx::pg_sys;
    use std::time::{Duration, Instant};

    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SAFETY: installs PostgreSQL's own SIGTERM handler (die: sets
    // ProcDiePending and the latch), as its own background workers do;
    // CHECK_FOR_INTERRUPTS then exits with status 1, so the worker is
    // started again, and interrupts a sweep in progress.
    unsafe { pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(postgres_die)) };
    let mut connected = false;
    let mut last = Instant::now();
    loop {
        let interval = crate::settings::sweep_interval_seconds().max(0) as u64;
        let wait =
            (interval > 0).then(|| Duration::from_secs(interval).saturating_sub(last.elapsed()));
        if !BackgroundWorker::wait_latch(wait.map(|wait| wait.max(Duration::from_millis(1)))) {
            // The postmaster died.
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a background worker to reload
            // its configuration, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            continue;
        }
        if interval == 0 || last.elapsed() < Duration::from_secs(interval) {
            continue;
        }
        if !connected {
            BackgroundWorker::connect_worker_to_spi(Some(&crate::settings::sweep_database()), None);
            // A sweep refuses a transaction snapshot: whatever the server,
            // database or role says, this session's transactions are READ
            // COMMITTED.
            // SAFETY: sets a setting of this process by name, outside any
            // transaction, as SET would.
            unsafe {
                pg_sys::SetConfigOption(
                    c"default_transaction_isolation".as_ptr(),
                    c"read committed".as_ptr(),
                    pg_sys::GucContext::PGC_SUSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                )
            };
            connected = true;
        }
        last = Instant::now();
        let idle_for = i64::from(crate::settings::sweep_idle_for_seconds());
        let swept =
            BackgroundWorker::transaction(|| -> Result<Option<i64>, pgrx::spi::SpiError> {
                let installed: Option<bool> = Spi::get_one(
                    "SELECT EXISTS (SELECT FROM pg_catalog.pg_extension \
                 WHERE extname = 'pg_fence' AND extversion <> '0.1.0')",
                )?;
                if installed != Some(true) {
                    return Ok(None);
                }
                // A registration of a key's history in flight (perhaps in a
                // long transaction): skip this round rather than wait, which
                // would queue every later registration behind the sweep.
                // Taken here, fence.sweep takes it again at once.
                if !crate::keylock::sweep_lock(true, false) {
                    return Ok(None);
                }
                Spi::get_one_with_args(
                    "SELECT fence.sweep(pg_catalog.make_interval(secs => $1))",
                    &[(idle_for as f64).into()],
                )
            });
        match swept {
            Ok(Some(rows)) if rows > 0 => {
                pgrx::debug1!("pg_fence sweeper: {rows} idle lease rows swept")
            }
            Ok(_) => {}
            Err(error) => pgrx::warning!("pg_fence sweeper: {error}"),
        }
    }
    // SAFETY: ends this worker process; status 1 lets the postmaster
    // start it again (0 would unregister it for good).
    unsafe { pg_sys::proc_exit(1) };
}
