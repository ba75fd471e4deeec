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
use crate::roles;

/// Clone fence trigger `parent_trigger` onto table `child`, a partition or
/// inheritance descendant of the trigger's table. Internal, and not
/// executable by PUBLIC: called by `fence._fence_descendants()` (which runs
/// as the extension's owner and checks that `child` has no trigger of that
/// name yet). Refuses a `child` that is not a descendant, a foreign table,
/// and a table that already has rows, unless the role acting (after SET
/// ROLE, whatever SECURITY DEFINER functions are in between) is in
/// fence_admin: those rows were written without the fence.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _clone_fence_trigger(parent_trigger: pg_sys::Oid, child: pg_sys::Oid) {
    or_raise(clone_trigger(parent_trigger, child))
}

/// Unlink a fence clone from its parent's trigger (tgparentid and the
/// partition dependencies go), so that `DROP TRIGGER` may drop it: for a
/// table that no longer inherits from the clone's parent. Internal, not
/// executable by PUBLIC: called by `fence._drop_orphan_fence_clones()`.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _unlink_fence_clone(trigger: pg_sys::Oid) {
    or_raise(unlink_clone(trigger))
}

fn unlink_clone(trigger: pg_sys::Oid) -> Result<(), Failure> {
    let table = Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT t.tgrelid FROM pg_catalog.pg_trigger AS t \
          WHERE t.oid = $1 AND t.tgparentid <> 0 \
            AND t.tgfoid IN ('fence.fence_guard()'::pg_catalog.regprocedure, \
                             'fence.fence_no_truncate()'::pg_catalog.regprocedure)",
        &[trigger.into()],
    )?;
    let Some(table) = table else {
        return fail(FenceError::internal(format!(
            "trigger {} is not a pg_fence trigger clone",
            trigger.to_u32()
        )));
    };
    // SAFETY: pg_trigger is opened and closed here with RowExclusiveLock,
    // as TriggerSetParentTrigger's callers in tablecmds.c hold it; the
    // trigger and its table exist (checked above, in this transaction).
    unsafe {
        let relation = pg_sys::table_open(
            pg_sys::TriggerRelationId,
            pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
        );
        pg_sys::TriggerSetParentTrigger(relation, trigger, pg_sys::InvalidOid, table);
        pg_sys::table_close(relation, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        pg_sys::CommandCounterIncrement();
    }
    Ok(())
}

/// Whether `child` may take the fence of `parent_table`: a descendant of it
/// (any depth), a table (not a foreign one), and empty or attached by a
/// member of fence_admin.
fn check_child(parent_table: pg_sys::Oid, child: pg_sys::Oid) -> Result<(), Failure> {
    let row = Spi::connect(|client| {
        let rows = client.select(
            "SELECT $2 <> $1 AND $2 IN (SELECT fence._family($1)), c.relkind::text, $2::pg_catalog.regclass::text, \
                    $1::pg_catalog.regclass::text \
               FROM pg_catalog.pg_class AS c WHERE c.oid = $2",
            Some(1),
            &[parent_table.into(), child.into()],
        )?;
        if rows.is_empty() {
            return Ok::<_, Failure>(None);
        }
        let row = rows.first();
        Ok(Some((
            row.get::<bool>(1)?.unwrap_or(false),
            row.get::<String>(2)?.unwrap_or_default(),
            row.get::<String>(3)?.unwrap_or_default(),
            row.get::<String>(4)?.unwrap_or_default(),
        )))
    })?;
    let Some((descends, kind, child_name, parent_name)) = row else {
        return fail(FenceError::internal(format!(
            "no table with oid {}",
            child.to_u32()
        )));
    };
    if !descends {
        return fail(FenceError::internal(format!(
            "\"{child_name}\" does not inherit from \"{parent_name}\""
        )));
    }
    if kind == "f" {
        return fail(FenceError::ForeignTableInFence {
            table: child_name,
            fenced: parent_name,
        });
    }
    // A partitioned table has no rows of its own: its partitions are
    // descendants too, and each is checked as it gets its clone.
    if kind != "p" && has_rows(child) && !roles::is_fence_admin(roles::caller_role()) {
        return fail(FenceError::UnfencedRowsJoin {
            table: child_name,
            fenced: parent_name,
            role: roles::role_name(roles::caller_role()),
        });
    }
    Ok(())
}

/// The parts of a pg_trigger row a clone copies.
struct TriggerDef {
    table: pg_sys::Oid,
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
                    t.tgargs, t.tgnargs::int4, t.tgrelid \
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
            row.get::<pg_sys::Oid>(7)?,
        )))
    })?;
    let Some((
        Some(name),
        Some(function),
        Some(kind),
        Some(enabled),
        args,
        Some(nargs),
        Some(table),
    )) = row
    else {
        return fail(FenceError::internal(format!(
            "trigger {} is not a pg_fence trigger",
            trigger.to_u32()
        )));
    };
    Ok(TriggerDef {
        table,
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
    check_child(def.table, child)?;
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

/// Whether `table` (a plain table) holds any row, committed as of now: with
/// the latest snapshot, not the transaction's, so a REPEATABLE READ
/// transaction cannot attach a table whose rows it does not see. The DDL
/// that makes a table a child holds a lock on it that keeps writers out,
/// so this is exact.
fn has_rows(table: pg_sys::Oid) -> bool {
    // SAFETY: the table is opened and closed here (AccessShareLock, kept
    // until the transaction ends); the snapshot is registered for the scan
    // and unregistered after it; the scan is begun and ended here.
    unsafe {
        let relation = pg_sys::table_open(table, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if (*relation).rd_tableam != pg_sys::GetHeapamTableAmRoutine() {
            // Another table access method: do not guess, count it as full.
            pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
            return true;
        }
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let flags = pg_sys::ScanOptions::SO_TYPE_SEQSCAN | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE;
        let scan = pg_sys::heap_beginscan(
            relation,
            snapshot,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            flags,
        );
        let found =
            !pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection).is_null();
        pg_sys::heap_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        found
    }
}

/// A trigger's arguments (`pg_trigger.tgargs`: each followed by a NUL) as
/// text, byte for byte: for `fence.protected_tables` and the DDL checks,
/// which `encode(..., 'escape')` would garble (non-ASCII bytes, backslashes).
#[pg_extern(immutable, strict, parallel_safe)]
fn _trigger_args(args: &[u8], count: i32) -> Vec<String> {
    args.split(|&byte| byte == 0)
        .take(count.max(0) as usize)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}
