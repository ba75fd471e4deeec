//! Reading one lease row without SPI or the executor: a single probe of
//! `fence.leases_pkey`, for the two reads that run most often. The fence
//! check runs it for every protected row (with the latest snapshot), and
//! `lock_acquire` looks at the key with it before deciding how to grant (with
//! the transaction's snapshot, as a statement would). Planning is not the
//! cost here; executor start-up and shutdown for a one-row index scan are,
//! and they were a fifth of an acquire's CPU.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog;
use crate::errors::{fail, Failure, FenceError};

/// Which snapshot the probe reads with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshot {
    /// Committed as of now, whatever the isolation level (what foreign-key
    /// checks use): a fenced write must see a lease granted after its
    /// transaction's snapshot.
    Latest,
    /// What a statement run now would see: a fresh snapshot under READ
    /// COMMITTED, the transaction's under REPEATABLE READ and SERIALIZABLE.
    Statement,
}

/// The visible version of a key's lease row.
#[derive(Debug, Clone)]
pub struct LeaseRow {
    pub token: i64,
    /// `released_at IS NULL AND expires_at > clock_timestamp()`.
    pub live: bool,
    pub expires_at: pg_sys::TimestampTz,
    pub owner_role: pg_sys::Oid,
    /// When the lease was granted. Read only `for_grant` (0 otherwise).
    pub acquired_at: pg_sys::TimestampTz,
    /// Read only `for_grant`.
    pub holder: Option<String>,
    /// No transaction has locked or updated this version (its xmax is unset
    /// or known invalid). Read only `for_grant`; false otherwise.
    pub untouched: bool,
    /// A lease that ended by expiry (not released, not live): how long it
    /// was held, grant to expiry. Read only `for_grant`.
    pub expired_after_micros: Option<u64>,
}

/// The key's lease row, if it has one. `for_grant` also reads the holder and
/// whether the row is untouched, which the fence check does not need.
pub fn lease_row(
    key: &str,
    snapshot: Snapshot,
    for_grant: bool,
) -> Result<Option<LeaseRow>, Failure> {
    let internal = |what: &str| FenceError::internal(format!("reading fence.leases: {what}"));
    let key_datum = key.into_datum().ok_or_else(|| internal("NULL key"))?;
    let (table_oid, index_oid) = catalog::leases()?;
    // SAFETY: the relations are opened and closed here under AccessShareLock (kept
    // until the transaction ends, as the executor keeps them); the snapshot is
    // registered and unregistered here; the slot and scan are created and dropped here;
    // attribute numbers were checked against the descriptor; xmax and hint bits are
    // read under the buffer lock (untouched()).
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let table = pg_sys::table_open(table_oid, lock);
        let index = pg_sys::index_open(index_oid, lock);
        let descriptor = (*table).rd_att;
        let column = |name: &CStr| pg_sys::SPI_fnumber(descriptor, name.as_ptr());
        let attributes = [
            column(c"token"),
            column(c"expires_at"),
            column(c"released_at"),
            column(c"owner_role"),
            column(c"holder"),
            column(c"acquired_at"),
        ];
        if attributes.iter().any(|&attnum| attnum <= 0) {
            pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
            pg_sys::table_close(table, pg_sys::NoLock as pg_sys::LOCKMODE);
            return fail(internal(
                "a column (token, expires_at, released_at, owner_role, holder, acquired_at) is missing",
            ));
        }
        let [token_at, expires_at, released_at, owner_at, holder_at, acquired_at] = attributes;

        let snapshot = pg_sys::RegisterSnapshot(match snapshot {
            Snapshot::Latest => pg_sys::GetLatestSnapshot(),
            Snapshot::Statement => pg_sys::GetTransactionSnapshot(),
        });
        let mut scan_key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut scan_key,
            1,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(pg_sys::F_TEXTEQ),
            key_datum,
        );
        let scan = pg_sys::index_beginscan(table, index, snapshot, 1, 0);
        pg_sys::index_rescan(scan, &mut scan_key, 1, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(table, std::ptr::null_mut());

        let mut row = None;
        if pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            let last = *attributes.iter().max().unwrap_or(&1);
            pg_sys::slot_getsomeattrs_int(slot, last);
            let value = |attnum: i32| {
                let i = (attnum - 1) as usize;
                (!*(*slot).tts_isnull.add(i)).then(|| *(*slot).tts_values.add(i))
            };
            let expires = value(expires_at).map_or(i64::MIN, |at| at.value() as i64);
            let released = value(released_at).is_some();
            let live = !released && expires > pg_sys::GetCurrentTimestamp();
            let expired_after_micros = match (for_grant && !live && !released, value(acquired_at)) {
                (true, Some(acquired)) => Some(
                    u64::try_from(expires.saturating_sub(acquired.value() as i64)).unwrap_or(0),
                ),
                _ => None,
            };
            // xmax and the hint bits live in the shared page: read them under
            // the buffer's content lock, as heapam does.
            let untouched = for_grant && untouched(slot);
            let holder = match (for_grant, value(holder_at)) {
                (true, Some(datum)) => String::from_datum(datum, false),
                _ => None,
            };
            row = Some(LeaseRow {
                token: value(token_at).map_or(0, |datum| datum.value() as i64),
                live,
                expires_at: expires,
                owner_role: value(owner_at).map_or(pg_sys::InvalidOid, |datum| {
                    pg_sys::Oid::from(datum.value() as u32)
                }),
                acquired_at: match (for_grant, value(acquired_at)) {
                    (true, Some(at)) => at.value() as i64,
                    _ => 0,
                },
                holder,
                untouched,
                expired_after_micros,
            });
        }

        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        // Keep the AccessShareLocks until the transaction ends, as the executor does.
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(table, pg_sys::NoLock as pg_sys::LOCKMODE);
        Ok(row)
    }
}

/// The keep of a key whose term history is kept (history.rs), read with
/// the latest snapshot through `fence.history_keys_pkey` (one index probe,
/// like [`lease_row`]): a grant asks it under the key's exclusive lock,
/// and a registration holds that lock in share mode until it commits, so
/// a grant never misses one that committed before it, whatever its
/// isolation level. None for a key not kept (and in a database still on
/// the 0.1.0 schema).
pub fn history_keep(key: &str) -> Result<Option<pgrx::datum::Interval>, Failure> {
    let internal = |what: &str| FenceError::internal(format!("reading fence.history_keys: {what}"));
    let Some((table_oid, index_oid)) = catalog::history_keys_and_index() else {
        return Ok(None);
    };
    let key_datum = key.into_datum().ok_or_else(|| internal("NULL key"))?;
    // SAFETY: as in lease_row: relations opened and closed here under
    // AccessShareLock (kept until the transaction ends), the snapshot
    // registered and unregistered here, the slot and scan created and
    // dropped here, the attribute number checked against the descriptor.
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let table = pg_sys::table_open(table_oid, lock);
        let index = pg_sys::index_open(index_oid, lock);
        let keep_at = pg_sys::SPI_fnumber((*table).rd_att, c"keep".as_ptr());
        if keep_at <= 0 {
            pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
            pg_sys::table_close(table, pg_sys::NoLock as pg_sys::LOCKMODE);
            return fail(internal("the keep column is missing"));
        }
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let mut scan_key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut scan_key,
            1,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(pg_sys::F_TEXTEQ),
            key_datum,
        );
        let scan = pg_sys::index_beginscan(table, index, snapshot, 1, 0);
        pg_sys::index_rescan(scan, &mut scan_key, 1, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(table, std::ptr::null_mut());
        let mut keep = None;
        if pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            pg_sys::slot_getsomeattrs_int(slot, keep_at);
            let i = (keep_at - 1) as usize;
            if !*(*slot).tts_isnull.add(i) {
                // Copied out of the slot before it is dropped.
                keep = pgrx::datum::Interval::from_datum(*(*slot).tts_values.add(i), false);
            }
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(table, pg_sys::NoLock as pg_sys::LOCKMODE);
        Ok(keep)
    }
}

/// A key's shared leases, as committed now.
#[derive(Debug, Clone, Default)]
pub struct SharedRows {
    /// How many are live (`expires_at > clock_timestamp()`).
    pub live: u32,
    /// The latest expiry among the live ones (0 if none).
    pub last_expiry: pg_sys::TimestampTz,
    /// Rows that have expired and are still there.
    pub expired: u32,
    /// The live one of the holder asked about: its token and owner.
    pub own: Option<(i64, pg_sys::Oid)>,
}

/// The shared leases of `key`, read with the latest snapshot through
/// `fence.shared_leases_pkey` (one index probe, like [`lease_row`]): what
/// an exclusive grant checks under the key's lock, which every shared grant
/// holds until it commits, so none is missed. Nothing in a database still
/// on the 0.1.0 schema. `holder`: also find that holder's live one.
pub fn shared_rows(key: &str, holder: Option<&str>) -> Result<SharedRows, Failure> {
    let mut rows = SharedRows::default();
    // SAFETY: a plain read of the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    scan_shared(Some(key), holder.is_some(), |row| {
        if row.expires_at <= now {
            rows.expired += 1;
            return;
        }
        rows.live += 1;
        rows.last_expiry = rows.last_expiry.max(row.expires_at);
        if rows.own.is_none() && holder.is_some() && row.holder.as_deref() == holder {
            rows.own = Some((row.token, row.owner_role));
        }
    })?;
    Ok(rows)
}

/// Every key that has a row in `fence.shared_leases`, once per row, read
/// with a dirty snapshot (rows of transactions still in progress, a
/// prepared one's included, count too): for the filter of keys that may
/// have readers (shared.rs), where one too many only costs a read.
pub fn shared_keys(mut visit: impl FnMut(&str)) -> Result<(), Failure> {
    scan_shared(None, false, |row| visit(&row.lock_key))
}

/// One row of `fence.shared_leases`, as [`scan_shared`] read it.
struct SharedRow {
    lock_key: String,
    token: i64,
    expires_at: pg_sys::TimestampTz,
    owner_role: pg_sys::Oid,
    holder: Option<String>,
}

/// Read `fence.shared_leases` through its primary key: the rows of `key`
/// with the latest snapshot, or (None) every row with a dirty one.
/// `lock_key` is read only for a full scan, `holder` only if asked for.
fn scan_shared(
    key: Option<&str>,
    with_holder: bool,
    mut visit: impl FnMut(SharedRow),
) -> Result<(), Failure> {
    let internal =
        |what: &str| FenceError::internal(format!("reading fence.shared_leases: {what}"));
    let Some((table_oid, index_oid)) = catalog::shared_leases() else {
        return Ok(());
    };
    let key_datum = match key {
        Some(key) => Some(key.into_datum().ok_or_else(|| internal("NULL key"))?),
        None => None,
    };
    // SAFETY: as in lease_row: relations opened and closed here under
    // AccessShareLock, the snapshot registered and unregistered here, the
    // slot and scan created and dropped here, attribute numbers checked.
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let table = pg_sys::table_open(table_oid, lock);
        let index = pg_sys::index_open(index_oid, lock);
        let descriptor = (*table).rd_att;
        let column = |name: &CStr| pg_sys::SPI_fnumber(descriptor, name.as_ptr());
        let attributes = [
            column(c"token"),
            column(c"expires_at"),
            column(c"owner_role"),
            column(c"holder"),
            column(c"lock_key"),
        ];
        if attributes.iter().any(|&attnum| attnum <= 0) {
            pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
            pg_sys::table_close(table, pg_sys::NoLock as pg_sys::LOCKMODE);
            return fail(internal(
                "a column (token, expires_at, owner_role, holder, lock_key) is missing",
            ));
        }
        let [token_at, expires_at, owner_at, holder_at, key_at] = attributes;
        let last = *attributes.iter().max().unwrap_or(&1);
        let mut dirty: pg_sys::SnapshotData = std::mem::zeroed();
        dirty.snapshot_type = pg_sys::SnapshotType::SNAPSHOT_DIRTY;
        let snapshot = match key_datum {
            Some(_) => pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot()),
            None => &raw mut dirty,
        };
        let mut scan_key: pg_sys::ScanKeyData = std::mem::zeroed();
        let keys = match key_datum {
            Some(datum) => {
                pg_sys::ScanKeyInit(
                    &mut scan_key,
                    1,
                    pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                    pg_sys::Oid::from(pg_sys::F_TEXTEQ),
                    datum,
                );
                1
            }
            None => 0,
        };
        let scan = pg_sys::index_beginscan(table, index, snapshot, keys, 0);
        let scan_keys = if keys == 1 {
            &mut scan_key as *mut pg_sys::ScanKeyData
        } else {
            std::ptr::null_mut()
        };
        pg_sys::index_rescan(scan, scan_keys, keys, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(table, std::ptr::null_mut());
        while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            pg_sys::slot_getsomeattrs_int(slot, last);
            let value = |attnum: i32| {
                let i = (attnum - 1) as usize;
                (!*(*slot).tts_isnull.add(i)).then(|| *(*slot).tts_values.add(i))
            };
            let text =
                |attnum: i32| value(attnum).and_then(|datum| String::from_datum(datum, false));
            visit(SharedRow {
                lock_key: if key.is_none() {
                    text(key_at).unwrap_or_default()
                } else {
                    String::new()
                },
                token: value(token_at).map_or(0, |datum| datum.value() as i64),
                expires_at: value(expires_at).map_or(i64::MIN, |at| at.value() as i64),
                owner_role: value(owner_at).map_or(pg_sys::InvalidOid, |datum| {
                    pg_sys::Oid::from(datum.value() as u32)
                }),
                holder: if with_holder { text(holder_at) } else { None },
            });
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        if key.is_some() {
            pg_sys::UnregisterSnapshot(snapshot);
        }
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(table, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    Ok(())
}

/// Whether no transaction has locked or updated the row version in `slot`
/// (a buffer heap slot from the probe): xmax unset, or known invalid. xmax and
/// the hint bits live in the shared page, so they are read under the buffer's
/// content lock, as heapam does.
///
/// # Safety
///
/// `slot` must be the probe's buffer heap slot, holding the tuple it fetched.
unsafe fn untouched(slot: *mut pg_sys::TupleTableSlot) -> bool {
    // SAFETY: the caller passes the probe's buffer heap slot holding a fetched tuple;
    // its buffer stays pinned while the slot holds it, and the header is read under the
    // share lock.
    unsafe {
        let mut should_free = false;
        let tuple = pg_sys::ExecFetchSlotHeapTuple(slot, false, &mut should_free);
        let buffer = (*(slot as *mut pg_sys::BufferHeapTupleTableSlot)).buffer;
        let locked = !should_free && buffer != pg_sys::InvalidBuffer as pg_sys::Buffer;
        if locked {
            pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_SHARE as i32);
        }
        let header = (*tuple).t_data;
        let untouched = (*header).t_choice.t_heap.t_xmax == pg_sys::InvalidTransactionId
            || (*header).t_infomask & pg_sys::HEAP_XMAX_INVALID as u16 != 0;
        if locked {
            pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_UNLOCK as i32);
        }
        if should_free {
            pg_sys::heap_freetuple(tuple);
        }
        untouched
    }
}
