//! Every failure pg_fence reports, each mapped to its fixed SQLSTATE.
//!
//! Errors are part of the SQL API contract (see DESIGN.md): clients branch on
//! the SQLSTATE, people read the message, so both are chosen here and only
//! here. pgrx's own `ereport!` only knows the SQLSTATEs PostgreSQL ships and
//! turns any other code into `XX000`, so [`FenceError::raise`] reports through
//! `errstart`/`errfinish` directly, the way pgrx itself does at its guard.

use std::ffi::{c_char, c_int, CString};
use std::panic::Location;

use pgrx::pg_sys;

/// Why a write was refused (SQLSTATE FN001).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// The key has a live lease, with another token.
    WrongToken { live: i64 },
    /// The key has no live lease (never leased, expired or released).
    NoLiveLease,
    /// The write carries no token at all.
    NoToken,
    /// An UPDATE would lower the row's token column.
    LowersToken { column: String, from: i64 },
    /// Per-row keys, and the row's key column is NULL.
    NullKey { column: String },
}

/// A failure of a pg_fence call. Busy keys and lost leases are not errors:
/// those are NULL / false results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceError {
    /// `22004`: a NULL where the API needs a value.
    NullArgument {
        function: &'static str,
        argument: &'static str,
    },
    /// `22004`: a NULL element of an array argument (1-based `element`).
    NullElement {
        function: &'static str,
        argument: &'static str,
        element: usize,
    },
    /// `22023`: a value outside what the argument accepts.
    InvalidArgument {
        function: &'static str,
        argument: &'static str,
        problem: String,
    },
    /// `42501`: the caller's role neither acquired the lease nor belongs to `fence_admin`.
    NotLeaseOwner {
        action: &'static str,
        lock_key: String,
        token: i64,
        owner: String,
        caller: String,
    },
    /// `25000`: waiting needs a fresh snapshot per attempt, which REPEATABLE READ
    /// and SERIALIZABLE transactions cannot take.
    WaitNeedsReadCommitted { lock_key: String },
    /// `25000`: `lock_history` asked to wait under a transaction snapshot,
    /// which never sees a later term.
    HistoryWaitNeedsReadCommitted { lock_key: String },
    /// `55000`: `lock_history` of a key whose terms are not kept.
    HistoryNotKept { lock_key: String },
    /// `42501`: stopping the term history of a key another role registered,
    /// outside fence_admin.
    NotHistoryOwner {
        lock_key: String,
        owner: String,
        caller: String,
    },
    /// `25000`: a call that must see what committed after its transaction
    /// began (`fence.sweep`) under REPEATABLE READ or SERIALIZABLE.
    NeedsReadCommitted { function: &'static str },
    /// `40001`: under REPEATABLE READ or SERIALIZABLE, the holder's own
    /// shared lease was granted after the transaction's snapshot, which
    /// cannot see it to extend it (G6).
    SharedLeaseNotInSnapshot { lock_key: String, holder: String },
    /// `FN001`: a write to a fenced table without the token of the key's live lease.
    StaleToken {
        table: String,
        lock_key: String,
        presented: Option<i64>,
        why: Stale,
    },
    /// `42501`: TRUNCATE of a fenced table by a role outside fence_admin.
    TruncateRefused { table: String, role: String },
    /// `42703`: a column named in fence.protect() no longer exists.
    ProtectedColumnMissing { table: String, column: String },
    /// `42804`: the token column is not bigint.
    TokenColumnType { table: String, column: String },
    /// `42804` (a key column of a type whose text form depends on session
    /// settings) or `0A000` (a STORED generated key or token column, computed
    /// after the check): a fence whose column the check cannot trust.
    UntrustedColumn {
        table: String,
        column: String,
        role: &'static str,
        generated: bool,
    },
    /// `22023`: `fence.token` is set to something that is not a bigint.
    InvalidFenceToken { value: String },
    /// `42501`: a lease function called inside a security-restricted operation.
    SecurityRestricted { function: &'static str },
    /// `39P01`: fence_guard attached other than FOR EACH ROW on INSERT/UPDATE/DELETE.
    TriggerMisuse { table: String },
    /// `42501`: a fence_guard trigger that fence.protect() did not install.
    FenceNotInstalled { table: String },
    /// `0A000`: a foreign table as a partition or child of a fenced table.
    ForeignTableInFence { table: String, fenced: String },
    /// `42501`: a table with rows joining a fenced table's family (ATTACH
    /// PARTITION, INHERIT) by a role outside fence_admin: the rows were
    /// written without the fence.
    UnfencedRowsJoin {
        table: String,
        fenced: String,
        role: String,
    },
    /// `57014`: the wait for the synchronous standby to have a new token's
    /// WAL was cancelled (cancel, `statement_timeout`), so the token is not
    /// handed out.
    TokenNotReplicated,
    /// `55000`: a call that needs pg_fence's shared memory, in a server that
    /// did not load pg_fence through `shared_preload_libraries`.
    NeedsPreload { function: &'static str },
    /// `42501`: a call reserved to members of fence_admin.
    NeedsFenceAdmin {
        function: &'static str,
        role: String,
    },
    /// `FN002`: an acquire that may not adopt the holder's own live lease
    /// (pg_fence_client's first attempt, `fence._lock_acquire` and kin)
    /// found the key leased to that holder id already: another guard, or
    /// another process, with the same id. Adopting it would give one lease
    /// two guards.
    HolderInUse { lock_key: String, holder: String },
    /// `XX000`: a broken invariant inside pg_fence (a bug, never bad input).
    Internal { context: String },
}

impl FenceError {
    pub fn internal(context: String) -> FenceError {
        FenceError::Internal { context }
    }
}

impl From<pgrx::spi::SpiError> for FenceError {
    fn from(error: pgrx::spi::SpiError) -> FenceError {
        FenceError::internal(format!("SPI: {error}"))
    }
}

/// `MAKE_SQLSTATE` from PostgreSQL's `elog.h`.
pub(crate) const fn make_sqlstate(code: &[u8; 5]) -> c_int {
    let mut value = 0;
    let mut i = 0;
    while i < 5 {
        value += ((code[i].wrapping_sub(b'0') & 0x3F) as c_int) << (6 * i);
        i += 1;
    }
    value
}

impl FenceError {
    /// The five-character SQLSTATE this error is reported with.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            FenceError::NullArgument { .. } => "22004",
            FenceError::NullElement { .. } => "22004",
            FenceError::InvalidArgument { .. } => "22023",
            FenceError::NotLeaseOwner { .. } => "42501",
            FenceError::WaitNeedsReadCommitted { .. } => "25000",
            FenceError::HistoryWaitNeedsReadCommitted { .. } => "25000",
            FenceError::HistoryNotKept { .. } => "55000",
            FenceError::NotHistoryOwner { .. } => "42501",
            FenceError::NeedsReadCommitted { .. } => "25000",
            FenceError::SharedLeaseNotInSnapshot { .. } => "40001",
            FenceError::StaleToken { .. } => "FN001",
            FenceError::TruncateRefused { .. } => "42501",
            FenceError::ProtectedColumnMissing { .. } => "42703",
            FenceError::TokenColumnType { .. } => "42804",
            FenceError::UntrustedColumn {
                generated: false, ..
            } => "42804",
            FenceError::UntrustedColumn {
                generated: true, ..
            } => "0A000",
            FenceError::InvalidFenceToken { .. } => "22023",
            FenceError::SecurityRestricted { .. } => "42501",
            FenceError::TriggerMisuse { .. } => "39P01",
            FenceError::FenceNotInstalled { .. } => "42501",
            FenceError::ForeignTableInFence { .. } => "0A000",
            FenceError::UnfencedRowsJoin { .. } => "42501",
            FenceError::TokenNotReplicated => "57014",
            FenceError::NeedsPreload { .. } => "55000",
            FenceError::NeedsFenceAdmin { .. } => "42501",
            FenceError::HolderInUse { .. } => "FN002",
            FenceError::Internal { .. } => "XX000",
        }
    }

    pub fn message(&self) -> String {
        match self {
            FenceError::NullArgument { function, argument } => {
                format!("{function}: argument \"{argument}\" must not be NULL")
            }
            FenceError::NullElement {
                function,
                argument,
                element,
            } => format!("{function}: element {element} of \"{argument}\" is NULL"),
            FenceError::InvalidArgument {
                function,
                argument,
                problem,
            } => {
                format!("{function}: invalid \"{argument}\": {problem}")
            }
            FenceError::NotLeaseOwner {
                action,
                lock_key,
                token,
                owner,
                caller,
            } => format!(
                "role \"{caller}\" may not {action} the lease on \"{lock_key}\" (token {token}): \
                 it belongs to role \"{owner}\""
            ),
            FenceError::SharedLeaseNotInSnapshot { lock_key, holder } => format!(
                "could not serialize access: the shared lease of holder \"{holder}\" on \"{lock_key}\" \
                 was granted after this transaction's snapshot"
            ),
            FenceError::HistoryWaitNeedsReadCommitted { lock_key } => format!(
                "lock_history of \"{lock_key}\" cannot wait inside a REPEATABLE READ or \
                 SERIALIZABLE transaction"
            ),
            FenceError::HistoryNotKept { lock_key } => {
                format!("the terms of \"{lock_key}\" are not kept")
            }
            FenceError::NotHistoryOwner {
                lock_key,
                owner,
                caller,
            } => format!(
                "role \"{caller}\" may not stop the term history of \"{lock_key}\": role \"{owner}\" keeps it"
            ),
            FenceError::NeedsReadCommitted { function } => format!(
                "{function} cannot run inside a REPEATABLE READ or SERIALIZABLE transaction"
            ),
            FenceError::WaitNeedsReadCommitted { lock_key } => format!(
                "lock_acquire on \"{lock_key}\" cannot wait inside a REPEATABLE READ or \
                 SERIALIZABLE transaction"
            ),
            FenceError::StaleToken {
                table,
                lock_key,
                presented,
                why,
            } => {
                let carries = match presented {
                    Some(token) => format!("the write carries token {token}"),
                    None => "the write carries no token".to_owned(),
                };
                match why {
                    Stale::WrongToken { live } => format!(
                        "stale fencing token for table \"{table}\": key \"{lock_key}\" is leased with token {live}, {carries}"
                    ),
                    Stale::NoLiveLease => format!(
                        "stale fencing token for table \"{table}\": key \"{lock_key}\" has no live lease, {carries}"
                    ),
                    Stale::NoToken => {
                        format!("no fencing token for table \"{table}\": the write to key \"{lock_key}\" carries none")
                    }
                    Stale::LowersToken { column, from } => format!(
                        "stale fencing token for table \"{table}\": the UPDATE would lower \"{column}\" from {from} to {} (key \"{lock_key}\")",
                        presented.unwrap_or_default()
                    ),
                    Stale::NullKey { column } => format!(
                        "no fencing key for table \"{table}\": key column \"{column}\" is NULL, so the row has no lease"
                    ),
                }
            }
            FenceError::TruncateRefused { table, role } => {
                format!("TRUNCATE of fenced table \"{table}\" is refused for role \"{role}\"")
            }
            FenceError::ProtectedColumnMissing { table, column } => {
                format!("fenced table \"{table}\" has no column \"{column}\"")
            }
            FenceError::TokenColumnType { table, column } => {
                format!(
                    "token column \"{column}\" of fenced table \"{table}\" must be of type bigint"
                )
            }
            FenceError::UntrustedColumn {
                table,
                column,
                role,
                generated: true,
            } => format!(
                "{role} column \"{column}\" of fenced table \"{table}\" is a generated column, \
                 computed after the fence's check: refusing the write"
            ),
            FenceError::UntrustedColumn {
                table,
                column,
                role,
                generated: false,
            } => format!(
                "{role} column \"{column}\" of fenced table \"{table}\" is of a type whose text \
                 form depends on session settings: refusing the write"
            ),
            FenceError::InvalidFenceToken { value } => {
                format!("fence.token must be a bigint, not \"{value}\"")
            }
            FenceError::SecurityRestricted { function } => {
                format!("{function} cannot be called inside a security-restricted operation")
            }
            FenceError::TriggerMisuse { table } => format!(
                "fence.fence_guard on table \"{table}\" must fire FOR EACH ROW on INSERT, UPDATE or DELETE: use fence.protect()"
            ),
            FenceError::FenceNotInstalled { table } => format!(
                "fence.fence_guard on table \"{table}\" was not installed by fence.protect(): refusing the write"
            ),
            FenceError::ForeignTableInFence { table, fenced } => format!(
                "foreign table \"{table}\" cannot be a partition or child of fenced table \"{fenced}\": \
                 its rows are not written here, and it cannot refuse TRUNCATE"
            ),
            FenceError::UnfencedRowsJoin { table, fenced, role } => format!(
                "role \"{role}\" may not make \"{table}\" part of fenced table \"{fenced}\": \
                 its rows were written without the fence"
            ),
            FenceError::TokenNotReplicated => "lock_acquire cancelled while waiting for the synchronous standby to confirm the new token: no lease was granted".to_owned(),
            FenceError::NeedsPreload { function } => format!(
                "{function} needs pg_fence's shared memory, and pg_fence was not loaded at server start"
            ),
            FenceError::NeedsFenceAdmin { function, role } => {
                format!("{function} is reserved to members of fence_admin; role \"{role}\" is not one")
            }
            FenceError::HolderInUse { lock_key, holder } => format!(
                "the lease on \"{lock_key}\" is already held by holder \"{holder}\", and this was not a retry of the request that got it"
            ),
            FenceError::Internal { context } => format!("pg_fence internal error: {context}"),
        }
    }

    pub fn hint(&self) -> Option<&'static str> {
        match self {
            FenceError::NotLeaseOwner { .. } => {
                Some("Only the role that acquired a lease, or a member of fence_admin, may renew, release or force it.")
            }
            FenceError::SharedLeaseNotInSnapshot { .. } => Some(
                "Retry the transaction, or re-acquire in a READ COMMITTED one.",
            ),
            FenceError::HistoryWaitNeedsReadCommitted { .. } => Some(
                "Call it with wait => '0', or wait in a READ COMMITTED transaction: a fixed \
                 snapshot never sees a later term.",
            ),
            FenceError::NotHistoryOwner { .. } => Some(
                "Only the role that started keeping a key's history, or a member of fence_admin, may stop it.",
            ),
            FenceError::NeedsReadCommitted { .. } => Some(
                "Run it in a READ COMMITTED transaction (the default), or on its own.",
            ),
            FenceError::HistoryNotKept { .. } => Some(
                "Keep them first: SELECT fence.lock_keep_history(lock_key, keep => '1 hour').",
            ),
            FenceError::WaitNeedsReadCommitted { .. } => Some(
                "Call it with wait => '0', or wait in a READ COMMITTED transaction: a fixed \
                 snapshot never sees the key being released.",
            ),
            FenceError::StaleToken { why: Stale::NoToken, .. } => Some(
                "Write the token in the table's token column (an UPDATE must assign it itself), or SET LOCAL fence.token = '<token>' in the writing transaction.",
            ),
            FenceError::StaleToken { .. } => {
                Some("A fenced write must present the token of the key's live lease at the moment of the write: take the lease again and retry with its token.")
            }
            FenceError::FenceNotInstalled { .. } => Some(
                "A member of fence_admin fences tables with fence.protect(); drop this trigger.",
            ),
            FenceError::UnfencedRowsJoin { .. } => Some(
                "A member of fence_admin may attach it (having checked its rows), or attach it empty and write its rows under the fence.",
            ),
            FenceError::TruncateRefused { .. } => {
                Some("Only members of fence_admin may truncate a fenced table; or call fence.unprotect() first.")
            }
            FenceError::HolderInUse { .. } => Some(
                "A holder id names one lease guard: give each guard its own, or leave it unset for a fresh one.",
            ),
            FenceError::NeedsPreload { .. } => Some(
                "Add pg_fence to shared_preload_libraries in postgresql.conf and restart the server.",
            ),
            FenceError::ProtectedColumnMissing { .. }
            | FenceError::TokenColumnType { .. }
            | FenceError::UntrustedColumn { .. } => Some(
                "Run fence.protect() again with columns it accepts: key columns of type text, \
                 varchar, char, name, smallint, integer, bigint or uuid, a bigint token column, \
                 neither of them generated.",
            ),
            _ => None,
        }
    }

    /// This error as having happened at the caller's line.
    #[track_caller]
    pub fn here(self) -> Failure {
        Failure {
            error: self,
            at: Location::caller(),
        }
    }
}

/// A failure and where it happened: the line that produced it (where the
/// error was made, or where `?` passed it on from a PostgreSQL or SPI
/// error), which becomes the error's LOCATION. Every fallible function of
/// the extension returns it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub error: FenceError,
    pub at: &'static Location<'static>,
}

impl From<FenceError> for Failure {
    #[track_caller]
    fn from(error: FenceError) -> Failure {
        error.here()
    }
}

impl From<pgrx::spi::SpiError> for Failure {
    #[track_caller]
    fn from(error: pgrx::spi::SpiError) -> Failure {
        FenceError::from(error).here()
    }
}

/// `Err(error)` as having happened at the caller's line.
#[track_caller]
pub fn fail<T>(error: FenceError) -> Result<T, Failure> {
    Err(error.here())
}

impl Failure {
    /// Report this failure to PostgreSQL at level ERROR, with its SQLSTATE,
    /// message, hint and origin. Never returns: the transaction aborts and
    /// control goes back to the executor.
    ///
    /// Call it only at the top of a `#[pg_extern]`/`#[pg_trigger]` body, with
    /// no live Rust values above it that own heap memory: `errfinish`
    /// longjmps past those frames, exactly as at the end of pgrx's guard.
    pub fn raise(self) -> ! {
        let line = self.at.line() as c_int;
        let file = static_file_name(self.at.file());
        let error = self.error;
        let code = make_sqlstate(error.sqlstate().as_bytes().try_into().expect("5 bytes"));
        // Move every string into palloc'd memory (freed by the abort) and drop
        // the Rust owners before the longjmp.
        let message = palloc_cstr(&error.message());
        let hint = error.hint().map(palloc_cstr);
        drop(error);
        // SAFETY: errstart/errfinish as elog.h's ereport uses them, with palloc'd
        // strings and a file name that lives for the process; every Rust value
        // owning heap memory was dropped above, so the longjmp of
        // errfinish(ERROR) skips no destructor.
        unsafe {
            if errstart(pg_sys::PGERROR as c_int, std::ptr::null()) {
                errcode(code);
                errmsg(c"%s".as_ptr(), message);
                if let Some(hint) = hint {
                    errhint(c"%s".as_ptr(), hint);
                }
                errfinish(file, line, c"pg_fence".as_ptr());
            }
        }
        unreachable!("errfinish(ERROR) returned")
    }
}

/// A source file's base name as a C string that lives as long as the
/// process: errfinish keeps the pointer (a re-thrown error prints it later).
/// One small allocation per source file, made once.
fn static_file_name(path: &'static str) -> *const c_char {
    thread_local! {
        static NAMES: std::cell::RefCell<Vec<(&'static str, &'static std::ffi::CStr)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    NAMES.with(|names| {
        let mut names = names.borrow_mut();
        if let Some((_, name)) = names.iter().find(|(known, _)| *known == path) {
            return name.as_ptr();
        }
        let base = path.rsplit('/').next().unwrap_or(path);
        let name: &'static std::ffi::CStr = Box::leak(
            CString::new(base)
                .unwrap_or_else(|_| c"pg_fence".into())
                .into_boxed_c_str(),
        );
        names.push((path, name));
        name.as_ptr()
    })
}

fn palloc_cstr(text: &str) -> *mut c_char {
    // Our messages never contain NUL; replace defensively rather than panic.
    let owned = CString::new(text.replace('\0', "\\0")).expect("NULs were replaced");
    // SAFETY: owned is NUL-terminated; pstrdup copies it into the current memory
    // context.
    unsafe { pg_sys::pstrdup(owned.as_ptr()) }
}

/// Unwrap a result at the top of an SQL-callable function: the value, or the
/// failure reported with its SQLSTATE and origin.
pub fn or_raise<T>(result: Result<T, Failure>) -> T {
    match result {
        Ok(value) => value,
        Err(failure) => failure.raise(),
    }
}

// pgrx keeps these out of its bindings (they longjmp); declared as pgrx's own
// panic handler declares them.
unsafe extern "C-unwind" {
    fn errstart(elevel: c_int, domain: *const c_char) -> bool;
    fn errfinish(filename: *const c_char, lineno: c_int, funcname: *const c_char);
    fn errcode(sqlerrcode: c_int) -> c_int;
    fn errmsg(fmt: *const c_char, ...) -> c_int;
    fn errhint(fmt: *const c_char, ...) -> c_int;
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::{make_sqlstate, FenceError};
    use pgrx::prelude::*;

    #[pg_test]
    fn sqlstates_encode_like_postgres() {
        assert_eq!(
            make_sqlstate(b"22023"),
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32
        );
        assert_eq!(
            make_sqlstate(b"22004"),
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED as i32
        );
        assert_eq!(
            make_sqlstate(b"42501"),
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32
        );
        assert_eq!(
            make_sqlstate(b"25000"),
            PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE as i32
        );
    }

    #[pg_test]
    fn stale_token_messages_name_table_key_and_tokens() {
        use super::Stale;
        let error = FenceError::StaleToken {
            table: "payments".into(),
            lock_key: "payment:7".into(),
            presented: Some(41),
            why: Stale::WrongToken { live: 42 },
        };
        assert_eq!(error.sqlstate(), "FN001");
        let message = error.message();
        for part in ["payments", "payment:7", "41", "42"] {
            assert!(message.contains(part), "{message}");
        }
        let none = FenceError::StaleToken {
            table: "t".into(),
            lock_key: "k".into(),
            presented: Some(5),
            why: Stale::NoLiveLease,
        };
        assert!(
            none.message().contains("no live lease"),
            "{}",
            none.message()
        );
        assert_eq!(make_sqlstate(b"FN001"), make_sqlstate(b"FN001"));
        assert_ne!(
            make_sqlstate(b"FN001"),
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR as i32
        );
    }
}
