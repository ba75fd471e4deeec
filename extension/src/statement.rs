//! Which kind of statement a fenced row belongs to: the fence check needs to
//! know whether an UPDATE row comes from a MERGE.
//!
//! PostgreSQL tells a row trigger which columns the statement assigns
//! (`tg_updatedcols`), but for a MERGE it gives the columns of all its
//! `WHEN MATCHED ... UPDATE` actions together, not those of the action that
//! fired. So in a MERGE, "the token column is assigned" cannot be read from
//! the trigger data alone.
//!
//! The executor hooks keep a list of the statements this backend is
//! executing, each with its executor state and whether it is a MERGE:
//! ExecutorStart adds, ExecutorEnd removes that same entry (cursors may end
//! in any order). The statement a fenced row belongs to is the innermost
//! one whose result relations include the row's relation: not simply the
//! innermost one, which may be a function scan still open in the MERGE's
//! source. A statement that ends by an error never reaches ExecutorEnd;
//! its entries are dropped when its subtransaction or transaction aborts
//! (each records the transaction nesting level it began at). The library
//! may load in the middle of a statement (the first fenced write of a
//! session loads it, unless it is preloaded), before the hooks saw that
//! statement start: then no entry matches, and the answer is "not known"
//! (the fence check then treats the row as it treats a MERGE's).

use std::cell::RefCell;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// What the statement writing a row is, as far as the fence check is
/// concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Merge,
    NotMerge,
    Unknown,
}

/// A statement being executed.
struct Executing {
    estate: *mut pg_sys::EState,
    merge: bool,
    level: i32,
}

thread_local! {
    /// The statements this backend is executing, innermost last.
    static EXECUTING: RefCell<Vec<Executing>> = const { RefCell::new(Vec::new()) };
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
        let entry = Executing {
            estate: (*query).estate,
            merge,
            level: pg_sys::GetCurrentTransactionNestLevel(),
        };
        EXECUTING.with(|stack| stack.borrow_mut().push(entry));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    // SAFETY: the executor calls this hook with the QueryDesc it started.
    let estate = unsafe { (*query).estate };
    EXECUTING.with(|stack| {
        let mut stack = stack.borrow_mut();
        if let Some(at) = stack.iter().rposition(|entry| entry.estate == estate) {
            stack.remove(at);
        }
    });
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
        EXECUTING.with(|stack| stack.borrow_mut().retain(|entry| entry.level < level));
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

/// Whether the statement writing `relation` (a fenced row's table) is a
/// MERGE.
pub fn writing(relation: pg_sys::Oid) -> Kind {
    EXECUTING.with(|stack| {
        stack
            .borrow()
            .iter()
            .rev()
            // SAFETY: every listed estate belongs to a statement that has
            // not ended (its entry goes at ExecutorEnd or at abort), so it
            // and its result relation lists are valid.
            .find(|entry| unsafe { writes(entry.estate, relation) })
            .map_or(Kind::Unknown, |entry| {
                if entry.merge {
                    Kind::Merge
                } else {
                    Kind::NotMerge
                }
            })
    })
}

/// Whether `estate` has opened `relation` as a result relation (directly,
/// or for tuple routing into a partition).
///
/// # Safety
///
/// `estate` must be the live executor state of a running statement.
unsafe fn writes(estate: *mut pg_sys::EState, relation: pg_sys::Oid) -> bool {
    if estate.is_null() {
        return false;
    }
    // SAFETY: the caller's contract; the lists hold ResultRelInfo pointers.
    unsafe {
        [
            (*estate).es_opened_result_relations,
            (*estate).es_tuple_routing_result_relations,
        ]
        .into_iter()
        .any(|list| {
            pgrx::PgList::<pg_sys::ResultRelInfo>::from_pg(list)
                .iter_ptr()
                .any(|info| {
                    !info.is_null()
                        && !(*info).ri_RelationDesc.is_null()
                        && (*(*info).ri_RelationDesc).rd_id == relation
                })
        })
    }
}
