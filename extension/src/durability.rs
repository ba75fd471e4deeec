//! Durability (G1): tokens issued from one sequence whose covering WAL is
//! flushed, and confirmed by the synchronous standbys, before a token
//! leaves; grants that commit durably whatever the caller's
//! `synchronous_commit`; renews and releases that may commit asynchronously.

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog;
use crate::errors::{fail, Failure, FenceError};

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
pub fn issue_token() -> Result<i64, Failure> {
    // SAFETY: a plain function call into the sequence code, then a pin and
    // share lock of the sequence's one page to read its LSN, released
    // before anything can raise an error; the relation is opened and
    // closed here, its lock kept until the transaction ends (as nextval does).
    let sequence = catalog::token_sequence()?;
    unsafe {
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
/// commit does, and when a commit would: with synchronous replication
/// requested (`max_wal_senders > 0`, and `synchronous_commit` is at least
/// `on` here) and synchronous standbys defined (`synchronous_standby_names`,
/// as the checkpointer has published it). A wait cut short by a cancel or
/// `statement_timeout` returns with a WARNING in PostgreSQL; here it is an
/// error instead, so that the token never reaches a client that a promoted
/// standby would not know of.
fn wait_for_synchronous_standby(lsn: pg_sys::XLogRecPtr) -> Result<(), Failure> {
    // SAFETY: reads of this backend's settings and of WalSndCtl, which the
    // postmaster sets up before any backend runs; the fields are read
    // without SyncRepLock, as SyncRepWaitForLSN's own first check reads
    // them (an 8-byte aligned lsn: at worst an older value, which errs
    // towards waiting).
    unsafe {
        if pg_sys::max_wal_senders <= 0 || pg_sys::WalSndCtl.is_null() {
            return Ok(());
        }
        let control = pg_sys::WalSndCtl;
        let status = u32::from(std::ptr::read_volatile(std::ptr::addr_of!(
            (*control).sync_standbys_status
        )));
        let defined = if status & pg_sys::SYNC_STANDBY_INIT != 0 {
            status & pg_sys::SYNC_STANDBY_DEFINED != 0
        } else {
            // Not yet published by the checkpointer: the setting decides.
            let names = pg_sys::SyncRepStandbyNames;
            !names.is_null() && *names != 0
        };
        if !defined {
            return Ok(());
        }
        let flushed = || {
            std::ptr::read_volatile(std::ptr::addr_of!(
                (*control).lsn[pg_sys::SYNC_REP_WAIT_FLUSH as usize]
            ))
        };
        if flushed() >= lsn {
            return Ok(());
        }
        pg_sys::SyncRepWaitForLSN(lsn, false);
        if flushed() < lsn {
            return fail(FenceError::TokenNotReplicated);
        }
    }
    Ok(())
}

/// Make the current transaction's commit durable whatever the caller's
/// `synchronous_commit`: flushed locally (ForceSyncCommit), and at least
/// `synchronous_commit = on` so a synchronous standby has it too. For a
/// grant, and for a shared lease's renewal or re-acquire (shared.rs): no
/// fence keeps a reader safe if its extension is lost.
pub fn commit_durably() {
    GRANTED.set(true);
    // SAFETY: ForceSyncCommit only sets a flag of the current transaction;
    // synchronous_commit is a backend-local GUC variable.
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
pub fn may_commit_asynchronously<R>(write: impl FnOnce() -> R) -> R {
    // SAFETY: reads of the current transaction's state (its xid, its last WAL record),
    // no preconditions.
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

thread_local! {
    /// Set when this transaction issued a token: its commit must be durable.
    static GRANTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Called by the extension's transaction callback (lib.rs).
pub fn on_xact_event(event: pg_sys::XactEvent::Type) {
    let candidate = ASYNC_COMMIT_IF_UNCHANGED.take();
    let granted = GRANTED.take();
    if event != pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT {
        return;
    }
    // RecordTransactionCommit reads synchronous_commit after this event.
    // SAFETY: a backend-local read, as above.
    if !granted && candidate == Some(unsafe { pg_sys::XactLastRecEnd }) {
        set_local("synchronous_commit", "off");
    }
    // A grant's commit is durable even if something lowered
    // synchronous_commit after lock_acquire raised it (a calling function's
    // SET synchronous_commit = off clause is restored when it returns).
    // SAFETY: a backend-local read of a GUC variable.
    if granted
        && unsafe { pg_sys::synchronous_commit }
            < pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_REMOTE_FLUSH as i32
    {
        set_local("synchronous_commit", "on");
    }
}

fn set_local(name: &str, value: &str) {
    let name = std::ffi::CString::new(name).expect("no NUL");
    let value = std::ffi::CString::new(value).expect("no NUL");
    // SAFETY: both strings are NUL-terminated and outlive the call, which copies them;
    // a session-level USERSET setting of a built-in GUC cannot fail.
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
