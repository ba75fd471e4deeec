//! An internal subtransaction, as PL/pgSQL opens one for an EXCEPTION block:
//! a grant attempt runs in one and keeps its effects only if it grants.

use pgrx::pg_sys;

use crate::errors::Failure;

/// Run `work` in an internal subtransaction, committed only if `keep` says
/// so of its outcome; rolled back otherwise, and on any error (which then
/// propagates). A grant attempt runs in one, kept only if it grants, so an
/// attempt that does not grant leaves no row lock, key lock or transaction
/// id behind: a waiter, or an explicit transaction that got NULL, would
/// otherwise block the owner's release or its fenced writes.
pub fn in_subtransaction<T>(
    work: impl FnOnce() -> Result<T, Failure>,
    keep: impl FnOnce(&T) -> bool,
) -> Result<T, Failure> {
    let subxact = SubTransaction::begin();
    // A PostgreSQL error inside `work` unwinds through here as a Rust panic
    // (pgrx has already copied and flushed the error state): dropping
    // `subxact` on the way rolls it back.
    let outcome = work();
    match &outcome {
        Ok(value) if keep(value) => subxact.commit(),
        _ => subxact.roll_back(),
    }
    outcome
}

/// An open internal subtransaction. Ending it, by [`commit`](Self::commit),
/// [`roll_back`](Self::roll_back) or dropping it (a rollback), restores the
/// memory context and resource owner of its caller; each ends it once.
struct SubTransaction {
    memory_context: pg_sys::MemoryContext,
    resource_owner: pg_sys::ResourceOwner,
    open: bool,
}

impl SubTransaction {
    fn begin() -> SubTransaction {
        // SAFETY: called inside a transaction (every pg_extern is), from the
        // memory context and resource owner the caller will want back.
        unsafe {
            let memory_context = pg_sys::CurrentMemoryContext;
            let resource_owner = pg_sys::CurrentResourceOwner;
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            pg_sys::MemoryContextSwitchTo(memory_context);
            SubTransaction {
                memory_context,
                resource_owner,
                open: true,
            }
        }
    }

    fn commit(mut self) {
        self.open = false;
        // SAFETY: the subtransaction begun in `begin` is the current one:
        // nothing in between begins or ends another without ending it.
        unsafe { pg_sys::ReleaseCurrentSubTransaction() };
        self.restore();
    }

    fn roll_back(mut self) {
        self.end_with_rollback();
    }

    fn end_with_rollback(&mut self) {
        if self.open {
            self.open = false;
            // SAFETY: as for commit.
            unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() };
            self.restore();
        }
    }

    fn restore(&self) {
        // SAFETY: both were current when the subtransaction began and
        // outlive it (they belong to the enclosing transaction).
        unsafe {
            pg_sys::MemoryContextSwitchTo(self.memory_context);
            pg_sys::CurrentResourceOwner = self.resource_owner;
        }
    }
}

impl Drop for SubTransaction {
    fn drop(&mut self) {
        self.end_with_rollback();
    }
}
