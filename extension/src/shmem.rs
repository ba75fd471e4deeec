//! pg_fence's shared memory: one segment, asked for at server start when
//! the library is in `shared_preload_libraries` (preload mode), sized from
//! settings that only a restart changes, and used by the statistics
//! (stats.rs) and the waiter registry (waiters.rs).
//!
//! The segment holds a header, a lock tranche of its own (`pg_fence`, one
//! LWLock per concern: [`Lock::Stats`], [`Lock::Waiters`]), and fixed
//! tables laid out one after the other: the key-class statistics, the
//! per-table refused writes, and one waiter slot per backend. Every table is
//! allocated in full at start; nothing grows, so a full table is a decision
//! of the module that owns it (stats.rs counts new classes under `'*'`), not
//! an allocation failure.
//!
//! Without preload nothing here exists: [`segment`] is `None`, and the SQL
//! functions that need it fail with SQLSTATE `55000` and a hint
//! ([`FenceError::NeedsPreload`]); everything else works as in 0.1.
//!
//! A crashed backend leaves nothing behind that outlives it: PostgreSQL
//! answers a backend's crash by restarting every process and building shared
//! memory anew (the statistics start again from zero then); a backend that
//! exits cleanly or with FATAL clears its waiter slot on the way out
//! (`before_shmem_exit`), and one whose transaction aborts, at the abort.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::errors::{fail, Failure, FenceError};

/// `fence.stats_max_classes`: key classes the statistics keep, all
/// databases together; past it, a database's new classes count under `'*'`.
static MAX_CLASSES: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// `fence.stats_max_tables`: fenced tables (and their partitions) whose
/// refused writes are counted one by one, all databases together.
static MAX_TABLES: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// Rows reserved for the `'*'` classes of databases whose classes overflow
/// (one per database); a database beyond these counts in `dropped`.
pub const OVERFLOW_ROWS: u32 = 64;

const TRANCHE: &std::ffi::CStr = c"pg_fence";

/// The segment's LWLocks, one per concern.
#[derive(Clone, Copy)]
pub enum Lock {
    /// The statistics tables: shared to find a row and count in it (the
    /// counters are atomics), exclusive to add a row or reset.
    Stats = 0,
    /// The waiter slots: exclusive to enter or leave, shared to read.
    Waiters = 1,
}
const LOCKS: i32 = 2;

/// Words of [`Header::shared_keys`]: 65,536 bits, 8 KiB.
pub const SHARED_KEY_WORDS: usize = 1024;
/// Entries of [`Header::shared_scanned`]: past them, a database's writers
/// read its shared leases on every grant (correct, only slower).
pub const SHARED_SCANNED_DATABASES: usize = 64;

/// The segment's header: sizes fixed at start, and the few counters that
/// belong to no row.
#[repr(C)]
pub struct Header {
    /// Seed of the table hashes (SipHash-2-4), drawn at start, so nobody can
    /// choose class names that collide.
    pub seed: [u8; 16],
    pub max_classes: u32,
    pub max_tables: u32,
    pub waiter_slots: u32,
    /// Calls and refusals not counted at all: a database's `'*'` row did
    /// not fit either (more than [`OVERFLOW_ROWS`] databases overflowing).
    pub dropped: AtomicU64,
    /// Arrival numbers for waiters (waiters.rs): the order of the queue.
    pub arrivals: AtomicU64,
    /// Filled waiter slots, all databases: 0 lets an acquire skip looking
    /// for a queue (waiters.rs).
    pub queued: AtomicU32,
    /// Sessions inside `fence.lock_watch`, all databases (watch.rs): 0 lets
    /// a commit skip looking for watchers to wake (wait.rs). Never lower
    /// than the truth (a watcher that dies uncounted leaves it higher,
    /// which costs only a look).
    pub watchers: AtomicU32,
    /// Keys that may have shared leases (shared.rs, the writers' filter):
    /// a bit per keyed hash of (database, key), set before a shared lease
    /// on such a key is written, never cleared.
    pub shared_keys: [AtomicU64; SHARED_KEY_WORDS],
    /// The databases whose `fence.shared_leases` rows from before the
    /// server started are in `shared_keys`: `database << 32 | table oid`
    /// (a re-created table is another entry), 0 for a free entry.
    pub shared_scanned: [AtomicU64; SHARED_SCANNED_DATABASES],
    /// Entries in use in each table (written under its exclusive lock).
    classes_used: AtomicU32,
    tables_used: AtomicU32,
}

/// Where things are in the segment: the same arithmetic at start (for the
/// size) and after (for the pointers).
#[derive(Clone, Copy)]
struct Layout {
    classes: Shape,
    tables: Shape,
    waiters: usize,
    waiter_slots: u32,
    size: usize,
}

/// A fixed table's place: its index (u32 slots, a power of two, at most
/// half full) and its entries.
#[derive(Clone, Copy)]
struct Shape {
    index: usize,
    index_slots: u32,
    entries: usize,
    capacity: u32,
}

fn align(offset: usize) -> usize {
    offset.div_ceil(64) * 64
}

impl Layout {
    fn new(max_classes: u32, max_tables: u32, waiter_slots: u32) -> Layout {
        let mut offset = align(std::mem::size_of::<Header>());
        let mut shape = |capacity: u32, entry: usize| {
            // entry: the size of an Entry<E>, hash included.
            let index_slots = (capacity.max(1) * 2).next_power_of_two();
            let index = offset;
            offset = align(index + index_slots as usize * 4);
            let entries = offset;
            offset = align(entries + capacity as usize * entry);
            Shape {
                index,
                index_slots,
                entries,
                capacity,
            }
        };
        let classes = shape(
            max_classes + OVERFLOW_ROWS,
            std::mem::size_of::<Entry<crate::stats::ClassRow>>(),
        );
        let tables = shape(
            max_tables,
            std::mem::size_of::<Entry<crate::stats::TableRow>>(),
        );
        let waiters = offset;
        offset =
            align(waiters + waiter_slots as usize * std::mem::size_of::<crate::waiters::Slot>());
        Layout {
            classes,
            tables,
            waiters,
            waiter_slots,
            size: offset,
        }
    }

    fn from_settings() -> Layout {
        // SAFETY: MaxBackends is set before shmem_request_hook runs and
        // never changes after.
        let backends = unsafe { pg_sys::MaxBackends }.max(1) as u32;
        Layout::new(
            MAX_CLASSES.get().max(1) as u32,
            MAX_TABLES.get().max(1) as u32,
            backends,
        )
    }
}

/// The segment as this process sees it. Set in the postmaster at start
/// (and again after a crash restart); every backend inherits it by fork.
#[derive(Clone, Copy)]
pub struct Segment {
    base: *mut u8,
    layout: Layout,
    locks: *mut pg_sys::LWLockPadded,
}

static mut SEGMENT: Option<Segment> = None;
static mut PRELOADED: bool = false;
static mut PREVIOUS_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREVIOUS_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

/// Called from `_PG_init`: in preload mode, define the sizing settings and
/// ask for the segment; otherwise do nothing (the settings that size shared
/// memory can only be defined while preloading).
pub fn init() {
    // SAFETY: _PG_init runs in one thread, before any hook can fire.
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        PRELOADED = true;
    }
    GucRegistry::define_int_guc(
        c"fence.stats_max_classes",
        c"Key classes pg_fence's statistics keep, for all databases together.",
        c"Past it, a database's new key classes count under '*'. Needs a restart.",
        &MAX_CLASSES,
        16,
        1_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"fence.stats_max_tables",
        c"Fenced tables whose refused writes pg_fence counts one by one, for all databases together.",
        c"Past it, refused writes on further tables count only under their key class. Needs a restart.",
        &MAX_TABLES,
        16,
        1_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    // SAFETY: hooks are process globals set once here, chaining whatever
    // was there before; the functions live as long as the library.
    unsafe {
        PREVIOUS_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_shmem_request);
        PREVIOUS_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_shmem_startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_request() {
    // SAFETY: called by the postmaster while it collects shared memory
    // requests, the only time these calls are allowed.
    unsafe {
        if let Some(previous) = PREVIOUS_REQUEST_HOOK {
            previous();
        }
        pg_sys::RequestAddinShmemSpace(Layout::from_settings().size);
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), LOCKS);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_startup() {
    // SAFETY: called in the postmaster (and in a standalone backend) after
    // shared memory is created, as pg_stat_statements does: under
    // AddinShmemInitLock, ShmemInitStruct finds or makes our segment, and
    // the tranche we asked for exists.
    unsafe {
        if let Some(previous) = PREVIOUS_STARTUP_HOOK {
            previous();
        }
        let layout = Layout::from_settings();
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let base =
            pg_sys::ShmemInitStruct(c"pg_fence".as_ptr(), layout.size, &mut found) as *mut u8;
        let locks = pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr());
        if !found {
            std::ptr::write_bytes(base, 0, layout.size);
            let header = &mut *(base as *mut Header);
            if !pg_sys::pg_strong_random(header.seed.as_mut_ptr() as *mut c_void, 16) {
                // Not secret, only unpredictable: the clock will do.
                header.seed[..8].copy_from_slice(&pg_sys::GetCurrentTimestamp().to_le_bytes());
            }
            header.max_classes = MAX_CLASSES.get().max(1) as u32;
            header.max_tables = MAX_TABLES.get().max(1) as u32;
            header.waiter_slots = layout.waiter_slots;
        }
        pg_sys::LWLockRelease(init_lock);
        SEGMENT = Some(Segment {
            base,
            layout,
            locks,
        });
    }
}

/// Whether the library was preloaded (then [`segment`] is `Some`).
pub fn preloaded() -> bool {
    // SAFETY: written once in _PG_init, read-only after.
    unsafe { PRELOADED }
}

/// The segment, in preload mode.
pub fn segment() -> Option<Segment> {
    // SAFETY: written in the postmaster before any backend exists (and
    // again only when all backends are gone, at a crash restart).
    unsafe { SEGMENT }
}

/// The segment, or the `55000` error for `function`, which needs it.
pub fn required(function: &'static str) -> Result<Segment, Failure> {
    match segment() {
        Some(segment) => Ok(segment),
        None => fail(FenceError::NeedsPreload { function }),
    }
}

impl Segment {
    pub fn header(&self) -> &Header {
        // SAFETY: the segment starts with a Header, initialised at start;
        // its plain fields are never written after, the rest are atomics.
        unsafe { &*(self.base as *const Header) }
    }

    /// Take one of the segment's locks until the guard drops (an error
    /// that skips the drop is covered by the abort's LWLockReleaseAll).
    pub fn lock(&self, which: Lock, exclusive: bool) -> Held {
        let mode = if exclusive {
            pg_sys::LWLockMode::LW_EXCLUSIVE
        } else {
            pg_sys::LWLockMode::LW_SHARED
        };
        // SAFETY: the tranche has LOCKS locks, in shared memory.
        let lock = unsafe { &raw mut (*self.locks.add(which as usize)).lock };
        // SAFETY: a valid LWLock; released by Held's drop.
        unsafe { pg_sys::LWLockAcquire(lock, mode) };
        Held { lock }
    }

    /// The key-class statistics rows (stats.rs).
    pub fn classes(&self) -> Table<'_, crate::stats::ClassRow> {
        Table::at(self, self.layout.classes, &self.header().classes_used)
    }

    /// The per-table refused-write rows (stats.rs).
    pub fn tables(&self) -> Table<'_, crate::stats::TableRow> {
        Table::at(self, self.layout.tables, &self.header().tables_used)
    }

    /// The waiter slots, one per backend (waiters.rs).
    pub fn waiter_slots(&self) -> &[crate::waiters::Slot] {
        // SAFETY: waiter_slots Slots at this offset, zeroed at start; every
        // field of a Slot is an atomic, so shared references are sound.
        unsafe {
            std::slice::from_raw_parts(
                self.base.add(self.layout.waiters) as *const crate::waiters::Slot,
                self.layout.waiter_slots as usize,
            )
        }
    }

    /// SipHash-2-4 of a database and a name (a class, a table's OID) under
    /// the segment's seed.
    pub fn hash(&self, database: u32, name: &[u8]) -> u64 {
        let mut bytes = [0u8; 4 + crate::key::MAX_KEY_BYTES];
        let name = &name[..name.len().min(crate::key::MAX_KEY_BYTES)];
        bytes[..4].copy_from_slice(&database.to_le_bytes());
        bytes[4..4 + name.len()].copy_from_slice(name);
        crate::key::siphash24(&self.header().seed, &bytes[..4 + name.len()])
    }
}

/// One of the segment's LWLocks, held.
pub struct Held {
    lock: *mut pg_sys::LWLock,
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: acquired in Segment::lock and not yet released.
        unsafe { pg_sys::LWLockRelease(self.lock) };
    }
}

/// A fixed table in the segment: `capacity` entries of `E` (each with its
/// hash) and an open-addressing index of entry numbers (0: empty slot),
/// linear probing. Entries are only added (under the exclusive lock) and
/// removed all at once by [`Table::retain`] (a reset), which rebuilds the
/// index. Find under the shared lock, add or retain under the exclusive one.
pub struct Table<'s, E> {
    index: *mut u32,
    mask: u32,
    entries: *mut Entry<E>,
    capacity: u32,
    used: &'s AtomicU32,
    _entries: PhantomData<E>,
}

#[repr(C)]
struct Entry<E> {
    hash: u64,
    value: E,
}

impl<'s, E> Table<'s, E> {
    fn at(segment: &Segment, shape: Shape, used: &'s AtomicU32) -> Table<'s, E> {
        // SAFETY: offsets inside the segment, computed by Layout for E.
        unsafe {
            Table {
                index: segment.base.add(shape.index) as *mut u32,
                mask: shape.index_slots - 1,
                entries: segment.base.add(shape.entries) as *mut Entry<E>,
                capacity: shape.capacity,
                used,
                _entries: PhantomData,
            }
        }
    }

    /// How many entries are in use. Entries fill from the front: entry
    /// numbers 0..used.
    pub fn used(&self) -> u32 {
        self.used.load(Ordering::Relaxed)
    }

    fn slot(&self, slot: u32) -> u32 {
        // SAFETY: slot <= mask, inside the index; read under the table's lock.
        unsafe { *self.index.add(slot as usize) }
    }

    fn entry(&self, number: u32) -> *mut Entry<E> {
        // SAFETY: number < capacity.
        unsafe { self.entries.add(number as usize) }
    }

    /// The entry with this hash for which `matches` holds (under the lock).
    pub fn find(&self, hash: u64, matches: impl Fn(&E) -> bool) -> Option<&E> {
        let mut slot = hash as u32 & self.mask;
        loop {
            let number = self.slot(slot);
            if number == 0 {
                return None;
            }
            // SAFETY: an index slot names an initialised entry (1-based).
            let entry = unsafe { &*self.entry(number - 1) };
            if entry.hash == hash && matches(&entry.value) {
                return Some(&entry.value);
            }
            slot = (slot + 1) & self.mask;
        }
    }

    /// Add an entry made by `make` (exclusive lock held; the caller has
    /// looked with [`Table::find`] first). None if the table is full.
    pub fn insert(&self, hash: u64, make: impl FnOnce(&mut E)) -> Option<&E> {
        let used = self.used();
        if used >= self.capacity {
            return None;
        }
        // SAFETY: entry `used` is free (entries fill from the front) and
        // zeroed; nobody reads it before the index names it, which happens
        // under the exclusive lock we hold.
        let entry = unsafe { &mut *self.entry(used) };
        entry.hash = hash;
        make(&mut entry.value);
        let mut slot = hash as u32 & self.mask;
        while self.slot(slot) != 0 {
            slot = (slot + 1) & self.mask;
        }
        // SAFETY: an empty slot of the index (it is at most half full).
        unsafe { *self.index.add(slot as usize) = used + 1 };
        self.used.store(used + 1, Ordering::Relaxed);
        Some(&entry.value)
    }

    /// Keep only the entries for which `keep` holds, compacted to the
    /// front, the rest zeroed; rebuild the index (exclusive lock held).
    pub fn retain(&self, keep: impl Fn(&E) -> bool) {
        let used = self.used();
        let mut kept = 0;
        for number in 0..used {
            // SAFETY: numbers below `used` are initialised entries; moving
            // one down over a removed one, under the exclusive lock.
            unsafe {
                if keep(&(*self.entry(number)).value) {
                    if kept != number {
                        std::ptr::copy_nonoverlapping(self.entry(number), self.entry(kept), 1);
                    }
                    kept += 1;
                }
            }
        }
        // SAFETY: zero what is no longer used and the whole index, then put
        // the kept entries back into it.
        unsafe {
            std::ptr::write_bytes(self.entry(kept), 0, (used - kept) as usize);
            std::ptr::write_bytes(self.index, 0, self.mask as usize + 1);
        }
        for number in 0..kept {
            // SAFETY: an initialised entry.
            let hash = unsafe { (*self.entry(number)).hash };
            let mut slot = hash as u32 & self.mask;
            while self.slot(slot) != 0 {
                slot = (slot + 1) & self.mask;
            }
            // SAFETY: an empty slot of the index.
            unsafe { *self.index.add(slot as usize) = number + 1 };
        }
        self.used.store(kept, Ordering::Relaxed);
    }

    /// Every entry in use (under the lock).
    pub fn iter(&self) -> impl Iterator<Item = &E> + '_ {
        let used = self.used();
        // SAFETY: entries below `used` are initialised.
        (0..used).map(move |number| unsafe { &(*self.entry(number)).value })
    }
}

/// Count into an atomic counter (relaxed: the counts need no order).
pub fn add(counter: &AtomicU64, amount: u64) {
    counter.fetch_add(amount, Ordering::Relaxed);
}
