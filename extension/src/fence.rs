//! Fenced writes (G3): the trigger that refuses stale writes inside the
//! database, and the one that refuses TRUNCATE.
//!
//! `fence.protect()` (sql/fence.sql) installs `fence_guard` as a BEFORE ROW
//! trigger for INSERT, UPDATE and DELETE, enabled ALWAYS so it also fires
//! under `session_replication_role = replica`. For each row it works out the
//! key (one key for the table, or `key_prefix || key_column`) and the token
//! the write carries (the row's `token_column`, else `SET LOCAL fence.token`),
//! and accepts the row only if that token is the token of the key's live
//! lease. The check share-locks the key in the lock manager first
//! (keylock.rs), and `lock_acquire` needs that lock exclusively to grant, so
//! no newer lease on the key can be granted until the writing transaction
//! ends: once anyone holds token T+1, no write carrying T can commit. Renew
//! and release do not conflict with the check.
//!
//! Cost per row: a lock-manager lookup (a backend-local hit after the first
//! row of a key in a transaction) and one probe of the lease table's primary
//! key (probe.rs), without SPI or the executor. No WAL, no page written: the
//! lease row is only read.

use std::ffi::{c_char, CStr};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::{fail, Failure, FenceError, Stale};
use crate::{catalog, keylock, probe, roles, settings, statement, stats};

#[pg_trigger]
fn fence_guard<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    let operation = trigger.trigger_data().tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
    if let Err(error) = check_row(trigger) {
        if let FenceError::StaleToken { lock_key, .. } = &error.error {
            // SAFETY: tg_relation is open for the whole trigger call.
            let relation = unsafe { (*trigger.trigger_data().tg_relation).rd_id };
            stats::stale_write(lock_key, relation);
        }
        error.raise();
    }
    Ok(if operation == pg_sys::TRIGGER_EVENT_DELETE {
        trigger.old()
    } else {
        trigger.new()
    })
}

#[pg_trigger]
fn fence_no_truncate<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    // SAFETY: a backend-local read, no preconditions.
    let role = unsafe { pg_sys::GetUserId() };
    if !roles::is_fence_admin(role) {
        let table = table_name(trigger.trigger_data());
        FenceError::TruncateRefused {
            table,
            role: roles::role_name(role),
        }
        .here()
        .raise();
    }
    Ok(None)
}

/// The trigger's arguments, as `fence.protect` wrote them.
struct Config<'t> {
    /// `Some(key)`: one key for the whole table.
    table_key: Option<&'t str>,
    /// Per-row keys: `prefix || key_column`.
    key_column: &'t str,
    key_prefix: &'t str,
    /// The column carrying the token on INSERT and UPDATE, if any.
    token_column: Option<&'t str>,
}

fn config<'t>(trigger: &'t pg_sys::Trigger) -> Result<Config<'t>, Failure> {
    // SAFETY: PostgreSQL gives a trigger tgnargs NUL-terminated argument strings that
    // live as long as the trigger call (the relcache entry).
    // An argument that is not UTF-8 (a SQL_ASCII database) fails closed
    // rather than reading as "".
    let args: Vec<&str> = unsafe {
        (0..trigger.tgnargs as usize)
            .map(|i| CStr::from_ptr(*trigger.tgargs.add(i)).to_str())
            .collect::<Result<_, _>>()
            .or_else(|_| {
                fail(FenceError::internal(
                    "fence_guard's arguments are not UTF-8; fenced tables need a UTF-8 database"
                        .into(),
                ))
            })?
    };
    match args.as_slice() {
        ["key", key, _, token] => Ok(Config {
            table_key: Some(key),
            key_column: "",
            key_prefix: "",
            token_column: (!token.is_empty()).then_some(*token),
        }),
        ["column", column, prefix, token] => Ok(Config {
            table_key: None,
            key_column: column,
            key_prefix: prefix,
            token_column: (!token.is_empty()).then_some(*token),
        }),
        _ => fail(FenceError::internal(format!(
            "trigger fence_guard has unexpected arguments {args:?}; re-run fence.protect()"
        ))),
    }
}

fn table_name(data: &pg_sys::TriggerData) -> String {
    // SAFETY: tg_relation is the open relation the trigger fires for; get_rel_name
    // returns NULL or a palloc'd copy.
    unsafe {
        let relation = data.tg_relation;
        let name = pg_sys::get_rel_name((*relation).rd_id);
        if name.is_null() {
            return format!("oid {}", (*relation).rd_id.to_u32());
        }
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

fn check_row(trigger: &PgTrigger<'_>) -> Result<(), Failure> {
    let data = trigger.trigger_data();
    let config = config(trigger.trigger())?;
    let operation = data.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
    // Anyone may attach fence_guard to a table of theirs by hand; anything
    // but a row trigger on INSERT/UPDATE/DELETE has no rows to check.
    let row_level = data.tg_event & pg_sys::TRIGGER_EVENT_ROW != 0;
    let rows_present = !data.tg_trigtuple.is_null()
        && (operation != pg_sys::TRIGGER_EVENT_UPDATE || !data.tg_newtuple.is_null());
    if !row_level || operation > pg_sys::TRIGGER_EVENT_UPDATE || !rows_present {
        return fail(FenceError::TriggerMisuse {
            table: table_name(data),
        });
    }
    installed_by_protect(trigger.trigger().tgoid, &|| table_name(data))?;
    // SAFETY: tg_relation is open for the whole trigger call.
    let (descriptor, relation) = unsafe { ((*data.tg_relation).rd_att, (*data.tg_relation).rd_id) };
    // INSERT: tg_trigtuple is the new row; UPDATE: old, and tg_newtuple the
    // new one; DELETE: the old row.
    let (old_row, new_row) = match operation {
        pg_sys::TRIGGER_EVENT_INSERT => (None, Some(data.tg_trigtuple)),
        pg_sys::TRIGGER_EVENT_UPDATE => (Some(data.tg_trigtuple), Some(data.tg_newtuple)),
        _ => (Some(data.tg_trigtuple), None),
    };
    let table = || table_name(data);
    let refuse = |key: String, presented: Option<i64>, why: Stale| FenceError::StaleToken {
        table: table(),
        lock_key: key,
        presented,
        why,
    };

    // The keys this write touches: the new row's, and the old row's when an
    // UPDATE moves the row to another key (that would need both leases).
    let mut keys: Vec<String> = Vec::with_capacity(2);
    match config.table_key {
        Some(key) => keys.push(key.to_owned()),
        None => {
            let number = key_attribute(descriptor, config.key_column, &table)?;
            for row in [new_row, old_row].into_iter().flatten() {
                let Some(value) = text_at(row, descriptor, number)? else {
                    let shown = format!("{}<NULL>", config.key_prefix);
                    return fail(refuse(
                        shown,
                        None,
                        Stale::NullKey {
                            column: config.key_column.to_owned(),
                        },
                    ));
                };
                let key = format!("{}{}", config.key_prefix, value);
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
    }

    // The token the statement itself presents (G3): the token column when
    // this INSERT writes it or this UPDATE assigns it, else SET LOCAL
    // fence.token. An UPDATE that leaves the column out (an ORM's partial
    // update, a foreign key's cascade, MERGE) presents none: the old row's
    // token is whatever the last writer carried, not proof of this one. A
    // MERGE's assigned columns are those of all its UPDATE actions together
    // (statement.rs), so there the column counts only if this row's action
    // changed it; likewise when the kind of statement is not known. For an
    // UPDATE that presents it, the old row's token too, which the new one
    // must not go below.
    let (token, previous) = match (config.token_column, new_row) {
        (Some(column), Some(new_row)) => {
            let number = token_attribute(descriptor, column, &table)?;
            let new_token = bigint_at(new_row, descriptor, number);
            let old_token = old_row.and_then(|old_row| bigint_at(old_row, descriptor, number));
            let presented = operation == pg_sys::TRIGGER_EVENT_INSERT
                || (updates_column(data, number)
                    && (new_token != old_token
                        || statement::writing(relation) == statement::Kind::NotMerge));
            if presented {
                (new_token, old_token.map(|from| (column, from)))
            } else {
                (settings::fence_token()?, None)
            }
        }
        _ => (settings::fence_token()?, None),
    };
    let Some(token) = token else {
        return fail(refuse(keys.swap_remove(0), None, Stale::NoToken));
    };
    // The live lease first: it is the reason that matters to the writer.
    for key in &keys {
        if let Some(why) = check_lease(key, token)? {
            return fail(refuse(key.clone(), Some(token), why));
        }
    }
    if let Some((column, from)) = previous.filter(|(_, from)| token < *from) {
        return fail(refuse(
            keys.swap_remove(0),
            Some(token),
            Stale::LowersToken {
                column: column.to_owned(),
                from,
            },
        ));
    }
    Ok(())
}

thread_local! {
    /// fence_guard triggers this backend has found installed by protect(),
    /// forgotten at any relcache invalidation (a trigger changed or went,
    /// fence.fences changed) by [`forget_installed`].
    static INSTALLED: std::cell::RefCell<Vec<pg_sys::Oid>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Relcache invalidation callback (registered in lib.rs): a change to any
/// table's triggers, or to fence.fences, invalidates that relation.
pub fn forget_installed() {
    INSTALLED.with(|known| known.borrow_mut().clear());
}

/// Refuse a fence_guard trigger that fence.protect() did not install: the
/// root of its clone chain must be the `zz_fence_guard` of a table in
/// fence.fences, with the arguments recorded there (a second fence_guard on
/// a fenced table, or one re-created under another key, is refused). Anyone may execute fence_guard (PostgreSQL clones a
/// partitioned table's row triggers as whoever creates the partition), so a
/// plain role could otherwise attach it to a table of its own under any
/// key, and hold that key's lock with a write it keeps open. Looked up once
/// per trigger per backend until the next relcache invalidation; the
/// refusal comes before the key lock.
fn installed_by_protect(trigger: pg_sys::Oid, table: &dyn Fn() -> String) -> Result<(), Failure> {
    if INSTALLED.with(|known| known.borrow().contains(&trigger)) {
        return Ok(());
    }
    if catalog::fences().is_none() {
        // The 0.1.0 schema, not yet upgraded: it had no registry.
        return Ok(());
    }
    // fence._fence_installed pins its search_path: this runs as the writer.
    let installed =
        Spi::get_one_with_args::<bool>("SELECT fence._fence_installed($1)", &[trigger.into()])?
            .unwrap_or(false);
    if !installed {
        return fail(FenceError::FenceNotInstalled { table: table() });
    }
    INSTALLED.with(|known| known.borrow_mut().push(trigger));
    Ok(())
}

fn attribute_number(
    descriptor: pg_sys::TupleDesc,
    column: &str,
    table: &dyn Fn() -> String,
) -> Result<i32, Failure> {
    let name = std::ffi::CString::new(column)
        .map_err(|_| FenceError::internal("NUL in a column name".into()))?;
    // SAFETY: a lookup in a valid descriptor with a NUL-terminated name.
    let number = unsafe { pg_sys::SPI_fnumber(descriptor, name.as_ptr()) };
    if number <= 0 {
        return fail(FenceError::ProtectedColumnMissing {
            table: table(),
            column: column.to_owned(),
        });
    }
    Ok(number)
}

/// The catalog entry of column `number` (1-based, as SPI_fnumber gives it).
fn attribute(descriptor: pg_sys::TupleDesc, number: i32) -> &'static pg_sys::FormData_pg_attribute {
    // SAFETY: SPI_fnumber returned `number` for this descriptor, so it is in
    // 1..=natts; the descriptor outlives the trigger call that reads it.
    unsafe { &(*descriptor).attrs.as_slice((*descriptor).natts as usize)[(number - 1) as usize] }
}

/// Key column types whose text form no session setting changes (DateStyle,
/// TimeZone, extra_float_digits, lc_monetary...): two sessions must compute
/// one key for one row. fence.protect() and the DDL check refuse others;
/// the trigger checks again, so a column re-typed behind their back (event
/// triggers off, single-user mode) fails closed.
pub const KEY_COLUMN_TYPES: [pg_sys::Oid; 8] = [
    pg_sys::TEXTOID,
    pg_sys::VARCHAROID,
    pg_sys::BPCHAROID,
    pg_sys::NAMEOID,
    pg_sys::INT2OID,
    pg_sys::INT4OID,
    pg_sys::INT8OID,
    pg_sys::UUIDOID,
];

/// The key column's number, after checking that the trigger can trust it: a
/// type with a settings-free text form, and not a STORED generated column
/// (computed after BEFORE triggers, so the check would see the old key).
fn key_attribute(
    descriptor: pg_sys::TupleDesc,
    column: &str,
    table: &dyn Fn() -> String,
) -> Result<i32, Failure> {
    let number = attribute_number(descriptor, column, table)?;
    let attribute = attribute(descriptor, number);
    if attribute.attgenerated != 0 || !KEY_COLUMN_TYPES.contains(&attribute.atttypid) {
        return fail(FenceError::UntrustedColumn {
            table: table(),
            column: column.to_owned(),
            role: "key",
            generated: attribute.attgenerated != 0,
        });
    }
    Ok(number)
}

/// The token column's number: bigint, and not generated.
fn token_attribute(
    descriptor: pg_sys::TupleDesc,
    column: &str,
    table: &dyn Fn() -> String,
) -> Result<i32, Failure> {
    let number = attribute_number(descriptor, column, table)?;
    let attribute = attribute(descriptor, number);
    if attribute.atttypid != pg_sys::INT8OID {
        return fail(FenceError::TokenColumnType {
            table: table(),
            column: column.to_owned(),
        });
    }
    if attribute.attgenerated != 0 {
        return fail(FenceError::UntrustedColumn {
            table: table(),
            column: column.to_owned(),
            role: "token",
            generated: true,
        });
    }
    Ok(number)
}

/// Whether this UPDATE statement assigns column `number` (PostgreSQL 13+
/// tells row triggers which columns the statement's SET list names; for a
/// partition or an inheritance child they are mapped to its own numbers).
fn updates_column(data: &pg_sys::TriggerData, number: i32) -> bool {
    // SAFETY: tg_updatedcols is NULL or a Bitmapset the executor keeps alive
    // for the duration of the trigger call; bms_is_member accepts NULL.
    unsafe {
        pg_sys::bms_is_member(
            number - pg_sys::FirstLowInvalidHeapAttributeNumber,
            data.tg_updatedcols,
        )
    }
}

/// A column's value as text (its type's output function), or None for NULL.
/// A value that is not UTF-8 (only possible in a database of another
/// encoding, which protect() refuses) fails closed: read lossily, two
/// different keys could read as one.
fn text_at(
    row: *mut pg_sys::HeapTupleData,
    descriptor: pg_sys::TupleDesc,
    number: i32,
) -> Result<Option<String>, Failure> {
    // SAFETY: `row` is the trigger's tuple for this descriptor and `number`
    // a valid attribute of it; SPI_getvalue pallocs the text, freed here.
    let value = unsafe {
        let text: *mut c_char = pg_sys::SPI_getvalue(row, descriptor, number);
        if text.is_null() {
            return Ok(None);
        }
        let value = CStr::from_ptr(text).to_str().map(str::to_owned);
        pg_sys::pfree(text.cast());
        value
    };
    match value {
        Ok(value) => Ok(Some(value)),
        Err(_) => fail(FenceError::internal(
            "a fenced row's key is not UTF-8; fenced tables need a UTF-8 database".into(),
        )),
    }
}

/// A bigint column's value (checked by [`token_attribute`]), or None for NULL.
fn bigint_at(
    row: *mut pg_sys::HeapTupleData,
    descriptor: pg_sys::TupleDesc,
    number: i32,
) -> Option<i64> {
    let mut is_null = false;
    // SAFETY: as for text_at; the column is bigint, passed by value.
    let datum = unsafe { pg_sys::SPI_getbinval(row, descriptor, number, &mut is_null) };
    (!is_null).then(|| datum.value() as i64)
}

/// Is `token` the token of the live lease on `key`? Share-locks the key until
/// this transaction ends (keylock.rs) first, then reads the lease as of now.
fn check_lease(key: &str, token: i64) -> Result<Option<Stale>, Failure> {
    keylock::share(key);
    Ok(match live_token_now(key)? {
        Some(live) if live == token => None,
        Some(live) => Some(Stale::WrongToken { live }),
        None => Some(Stale::NoLiveLease),
    })
}

/// The token of the key's live lease, read as of now: one probe of the lease
/// table's primary key with the latest snapshot (the snapshot foreign-key
/// checks use), so under REPEATABLE READ and SERIALIZABLE too the check sees
/// a lease granted after the transaction's own snapshot was taken. No SPI, no
/// executor: this runs for every protected row.
fn live_token_now(key: &str) -> Result<Option<i64>, Failure> {
    let row = probe::lease_row(key, probe::Snapshot::Latest, false)?;
    Ok(row.filter(|row| row.live).map(|row| row.token))
}
