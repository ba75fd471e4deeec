//! Which kind of statement a fenced row belongs to: the fence check needs to
//! know whether an UPDATE row comes from a MERGE.
//!
//! PostgreSQL tells a row trigger which columns the statement assigns
//! (`tg_updatedcols`), but for a MERGE it gives the columns of all its
//! `WHEN MATCHED ... UPDATE` actions together, not those of the action that
//! fired. So in a MERGE, "the token column is assigned" cannot be read from
//! the trigger data alone.
//!
//! The executor hooks keep a stack of the statements this backend is
//! executing, innermost last, each marked MERGE or not: ExecutorStart
//! pushes, ExecutorEnd pops. A statement that ends by an error never reaches
//! ExecutorEnd; its entries are dropped when its subtransaction or
//! transaction aborts (each entry records the transaction nesting level it
//! was pushed at). The library may load in the middle of a statement (the
//! first fenced write of a session loads it), before the hooks saw that
//! statement start: then the stack is empty and the top-level portal's
//! command decides, and where that cannot tell (a statement nested in a
//! function), the answer is "not known".

use std::cell::RefCell;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// What the innermost executing statement is, as far as the fence check is
/// concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Merge,
    NotMerge,
    Unknown,
}

thread_local! {
    /// (is MERGE, transaction nesting level) per executing statement.
    static EXECUTING: RefCell<Vec<(bool, i32)>> = const { RefCell::new(Vec::new()) };
}

static mut PREVIOUS_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREVIOUS_END: pg_sys::ExecutorEnd_hook_type = None;

/// Install the executor hooks and the subtransaction callback. From
/// `_PG_init`, once per backend.
pub fn install() {
    // SAFETY: _PG_init runs once per backend, single-threaded, before any
    // of these hooks can be called; the previous hooks are kept and called.
    unsafe {
        PREVIOUS_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREVIOUS_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: i32) {
    // SAFETY: the executor calls this hook with a valid QueryDesc; the
    // previous hook (or the standard one) gets it unchanged.
    unsafe {
        match PREVIOUS_START {
            Some(previous) => previous(query, eflags),
            None => pg_sys::standard_ExecutorStart(query, eflags),
        }
        let merge = !(*query).plannedstmt.is_null()
            && (*(*query).plannedstmt).commandType == pg_sys::CmdType::CMD_MERGE;
        let level = pg_sys::GetCurrentTransactionNestLevel();
        EXECUTING.with(|stack| stack.borrow_mut().push((merge, level)));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    EXECUTING.with(|stack| stack.borrow_mut().pop());
    // SAFETY: as for executor_start.
    unsafe {
        match PREVIOUS_END {
            Some(previous) => previous(query),
            None => pg_sys::standard_ExecutorEnd(query),
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    _subxact: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        // SAFETY: a plain read of this backend's transaction state.
        let level = unsafe { pg_sys::GetCurrentTransactionNestLevel() };
        EXECUTING.with(|stack| stack.borrow_mut().retain(|&(_, at)| at < level));
    }
}

/// Called by the extension's transaction callback (lib.rs): no statement
/// outlives its transaction.
pub fn on_xact_event(event: pg_sys::XactEvent::Type) {
    if let pg_sys::XactEvent::XACT_EVENT_ABORT
    | pg_sys::XactEvent::XACT_EVENT_COMMIT
    | pg_sys::XactEvent::XACT_EVENT_PREPARE = event
    {
        EXECUTING.with(|stack| stack.borrow_mut().clear());
    }
}

/// Whether the statement whose row the fence is checking now is a MERGE.
pub fn current() -> Kind {
    if let Some(merge) = EXECUTING.with(|stack| stack.borrow().last().map(|&(merge, _)| merge)) {
        return if merge { Kind::Merge } else { Kind::NotMerge };
    }
    // The hooks did not see this statement start (the library loaded in the
    // middle of it): a top-level statement's portal says what it is.
    // SAFETY: ActivePortal is NULL or the portal this backend is running.
    let tag = unsafe {
        let portal = pg_sys::ActivePortal;
        if portal.is_null() {
            return Kind::Unknown;
        }
        (*portal).commandTag
    };
    match tag {
        pg_sys::CommandTag::CMDTAG_MERGE => Kind::Merge,
        pg_sys::CommandTag::CMDTAG_UPDATE
        | pg_sys::CommandTag::CMDTAG_INSERT
        | pg_sys::CommandTag::CMDTAG_DELETE => Kind::NotMerge,
        _ => Kind::Unknown,
    }
}
