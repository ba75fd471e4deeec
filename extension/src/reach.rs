//! The tables a fenced write can reach (G3): a fence on a table must hold
//! for every row a write reaches through it.
//!
//! PostgreSQL clones a table's row triggers to its partitions (at creation,
//! on ATTACH PARTITION), but not its statement triggers, so TRUNCATE of a
//! partition would pass the fence's TRUNCATE check; and it clones nothing to
//! inheritance children, whose rows `UPDATE parent` writes. So
//! `fence._fence_descendants()` (sql/fence.sql), from `protect()` and from
//! the DDL event trigger, clones each fence trigger PostgreSQL does not
//! clone itself, with [`_clone_fence_trigger`], exactly as PostgreSQL clones
//! a partition's row trigger: same name, function and arguments, the
//! parent's firing state, `tgparentid` set and partition dependencies on the
//! parent trigger. So the clone goes when the parent's trigger goes
//! (`unprotect()`), cannot be dropped on its own, and pg_dump leaves it out
//! and re-creates it through the event trigger when it re-creates the
//! parent's trigger.

use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::{fail, or_raise, Failure, FenceError};

/// Clone fence trigger `parent_trigger` onto table `child`, a partition or
/// inheritance descendant of the trigger's table. Internal: called by
/// `fence._fence_descendants()`, which checks that `child` has no trigger of
/// that name yet. The caller needs the TRIGGER privilege on `child`, as for
/// CREATE TRIGGER.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _clone_fence_trigger(parent_trigger: pg_sys::Oid, child: pg_sys::Oid) {
    or_raise(clone_trigger(parent_trigger, child))
}

/// The parts of a pg_trigger row a clone copies.
struct TriggerDef {
    name: String,
    function: pg_sys::Oid,
    kind: i16,
    enabled: i8,
    args: Vec<String>,
}

fn trigger_def(trigger: pg_sys::Oid) -> Result<TriggerDef, Failure> {
    let row = Spi::connect(|client| {
        let rows = client.select(
            "SELECT t.tgname::text, t.tgfoid, t.tgtype, t.tgenabled::text, \
                    t.tgargs, t.tgnargs::int4 \
               FROM pg_catalog.pg_trigger AS t \
              WHERE t.oid = $1 \
                AND t.tgfoid IN ('fence.fence_guard()'::pg_catalog.regprocedure, \
                                 'fence.fence_no_truncate()'::pg_catalog.regprocedure)",
            Some(1),
            &[trigger.into()],
        )?;
        if rows.is_empty() {
            return Ok::<_, FenceError>(None);
        }
        let row = rows.first();
        Ok(Some((
            row.get::<String>(1)?,
            row.get::<pg_sys::Oid>(2)?,
            row.get::<i16>(3)?,
            row.get::<String>(4)?,
            row.get::<Vec<u8>>(5)?,
            row.get::<i32>(6)?,
        )))
    })?;
    let Some((Some(name), Some(function), Some(kind), Some(enabled), args, Some(nargs))) = row
    else {
        return fail(FenceError::internal(format!(
            "trigger {} is not a pg_fence trigger",
            trigger.to_u32()
        )));
    };
    Ok(TriggerDef {
        name,
        function,
        kind,
        enabled: enabled.bytes().next().unwrap_or(b'A') as i8,
        // tgargs holds each argument followed by a NUL.
        args: args
            .unwrap_or_default()
            .split(|&byte| byte == 0)
            .take(nargs.max(0) as usize)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect(),
    })
}

fn clone_trigger(parent_trigger: pg_sys::Oid, child: pg_sys::Oid) -> Result<(), Failure> {
    let def = trigger_def(parent_trigger)?;
    let cstring = |text: &str| {
        CString::new(text).map_err(|_| FenceError::internal("NUL in a trigger definition".into()))
    };
    let name = cstring(&def.name)?;
    let args = def
        .args
        .iter()
        .map(|arg| cstring(arg))
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: the statement node and its argument list are palloc'd in the
    // current memory context, as CloneRowTriggersToPartition builds them;
    // CreateTriggerFiringOn copies what it keeps into the catalog. Errors
    // it raises unwind through pgrx's guard like any other.
    unsafe {
        let mut arg_list: *mut pg_sys::List = std::ptr::null_mut();
        for arg in &args {
            let value = pg_sys::makeString(pg_sys::pstrdup(arg.as_ptr()));
            arg_list = pg_sys::lappend(arg_list, value.cast());
        }
        let stmt = pg_sys::palloc0(std::mem::size_of::<pg_sys::CreateTrigStmt>())
            .cast::<pg_sys::CreateTrigStmt>();
        (*stmt).type_ = pg_sys::NodeTag::T_CreateTrigStmt;
        (*stmt).trigname = pg_sys::pstrdup(name.as_ptr());
        (*stmt).args = arg_list;
        (*stmt).row = def.kind & pg_sys::TRIGGER_TYPE_ROW as i16 != 0;
        (*stmt).timing = def.kind & pg_sys::TRIGGER_TYPE_TIMING_MASK as i16;
        (*stmt).events = def.kind & pg_sys::TRIGGER_TYPE_EVENT_MASK as i16;
        pg_sys::CreateTriggerFiringOn(
            stmt,
            std::ptr::null(),
            child,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            def.function,
            parent_trigger,
            std::ptr::null_mut(),
            false,
            true,
            def.enabled as std::ffi::c_char,
        );
        pg_sys::CommandCounterIncrement();
    }
    Ok(())
}
