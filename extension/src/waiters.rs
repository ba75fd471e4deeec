//! Who waits for which key, in which order (preload mode; G7): one slot per
//! backend in shared memory (shmem.rs), filled while a `lock_acquire` waits,
//! read by the view `fence.waiters`. A waiter's place in the key's queue
//! (`position`, 1 = next) is its arrival order among the waiters for the
//! same key: arrival numbers come from one counter in the segment.
//!
//! The queue is what makes waiting fair. Only its head may take a free key:
//! an acquire that finds a free key while someone queued for it arrived
//! earlier is busy ([`someone_ahead`]; a holder's re-acquire of its own
//! live lease, G6, is exempt, as it grants nothing new). A release wakes the
//! head ([`wake_head`]); a waiter that leaves without the key (timed out,
//! cancelled, an error, its backend exiting) wakes the new head, which may
//! take the key at once. The others, and a head whose predecessor took the
//! key, sleep until they are woken or the lease they saw expires (at most
//! `QUEUED_RECHECK_INTERVAL_MS`), and look again.
//!
//! A slot is filled under the waiters lock in exclusive mode and read under
//! it in share mode, so a reader never sees half a slot. It is emptied when
//! the wait ends: by the [`Waiting`] guard's drop (a grant, a timeout, an
//! error such as a cancel or `statement_timeout` unwinding through it), at
//! the abort of the transaction (if an error skipped the drop), and on the
//! way out of a backend that exits while waiting (FATAL, a terminated
//! backend: `before_shmem_exit`). A backend that crashes takes the whole
//! server's shared memory with it (PostgreSQL restarts every process).

use std::cell::{Cell, RefCell, UnsafeCell};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::{or_raise, Failure};
use crate::key::MAX_KEY_BYTES;
use crate::multi::MAX_KEYS;
use crate::shmem::{self, Lock};

/// How a waiter wants the key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `lock_acquire`: the key itself.
    Exclusive = 1,
    /// `semaphore_acquire`: any permit of a semaphore, queued under the
    /// semaphore's queue key; never the same queue as a key's, whatever the
    /// key is called.
    Semaphore = 2,
    /// `lock_acquire_all`: every one of its keys at once. Such a waiter has
    /// a place, at its arrival, in the exclusive queue of each of its keys
    /// (`places`), except for a moment now and then when a held key has
    /// kept it out long (multi.rs, `RESERVE_MS`).
    All = 3,
    /// `lock_acquire_shared`: a shared lease on the key, queued in the
    /// key's one queue with its exclusive waiters. Only an exclusive (or
    /// multi-key) waiter ahead holds it off: readers ahead of it are
    /// granted side by side with it.
    Shared = 4,
}

impl Mode {
    fn from_slot(value: u32) -> Option<Mode> {
        match value {
            1 => Some(Mode::Exclusive),
            2 => Some(Mode::Semaphore),
            3 => Some(Mode::All),
            4 => Some(Mode::Shared),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Exclusive => "exclusive",
            Mode::Semaphore => "semaphore",
            Mode::All => "all",
            Mode::Shared => "shared",
        }
    }

    /// Whether a waiter in this mode is in a key's own queue (exclusive
    /// and shared waiters are in one queue, in arrival order).
    fn in_key_queue(value: u32) -> bool {
        value == Mode::Exclusive as u32 || value == Mode::Shared as u32
    }
}

/// One backend's waiter slot (in shared memory, zeroed at start).
#[repr(C)]
pub struct Slot {
    /// 0: nobody waits here.
    pid: AtomicI32,
    database: AtomicU32,
    role: AtomicU32,
    mode: AtomicU32,
    length: AtomicU32,
    since: AtomicI64,
    until: AtomicI64,
    arrival: AtomicU64,
    /// The key's hash under the segment's seed, with the database: compared
    /// before the key itself.
    hash: AtomicU64,
    /// The key (for [`Mode::All`], the first of its keys in "C" order).
    key: UnsafeCell<[u8; MAX_KEY_BYTES]>,
    /// [`Mode::All`]: how many keys, and each one's hash (the first is
    /// `hash`). A multi-key waiter is matched to a key by hash alone: a
    /// collision of 64 keyed bits would only reorder a queue, never grant.
    keys: AtomicU32,
    hashes: [AtomicU64; MAX_KEYS],
    /// [`Mode::All`]: bit i set while the waiter has its place in the
    /// queue of key i.
    places: AtomicU64,
}

impl Slot {
    /// Whether this slot is a live backend waiting in this key's queue for
    /// `mode` (waiters lock held): for the key's own queue (exclusive or
    /// shared mode) its exclusive and shared waiters, and the multi-key
    /// waiters whose keys include it.
    fn waits_for(&self, number: usize, database: u32, hash: u64, key: &[u8], mode: Mode) -> bool {
        let pid = self.pid.load(Ordering::Relaxed);
        if pid == 0 {
            return false;
        }
        let slot_mode = self.mode.load(Ordering::Relaxed);
        let key_queue = Mode::in_key_queue(mode as u32);
        if key_queue && slot_mode == Mode::All as u32 {
            let count = (self.keys.load(Ordering::Relaxed) as usize).min(MAX_KEYS);
            let places = self.places.load(Ordering::Relaxed);
            return self.database.load(Ordering::Relaxed) == database
                && self.hashes[..count]
                    .iter()
                    .enumerate()
                    .any(|(i, h)| places & (1 << i) != 0 && h.load(Ordering::Relaxed) == hash)
                && backend_pid(number) == Some(pid);
        }
        self.hash.load(Ordering::Relaxed) == hash
            && (slot_mode == mode as u32 || (key_queue && Mode::in_key_queue(slot_mode)))
            && self.database.load(Ordering::Relaxed) == database
            && self.length.load(Ordering::Relaxed) as usize == key.len()
            // SAFETY: the waiters lock is held, so the slot's backend is
            // not writing its key.
            && unsafe { &(&*self.key.get())[..key.len()] } == key
            && backend_pid(number) == Some(pid)
    }
}

// SAFETY: `key` is written only under the waiters lock in exclusive mode by
// the slot's own backend, and read only under it in share mode.
unsafe impl Sync for Slot {}

thread_local! {
    /// Whether this backend's slot is filled, and whether the exit callback
    /// that empties it is registered.
    static FILLED: Cell<bool> = const { Cell::new(false) };
    static EXIT_CALLBACK: Cell<bool> = const { Cell::new(false) };
    /// A multi-key waiter's keys, to wake each one's queue when it leaves.
    static ALL_KEYS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// This backend's slot number: its PGPROC's number, below MaxBackends for
/// every backend that runs SQL.
fn my_slot() -> Option<usize> {
    // SAFETY: MyProc is this backend's PGPROC, set before any SQL runs.
    let number = unsafe { (*pg_sys::MyProc).pgprocno };
    usize::try_from(number).ok()
}

/// The pid of the backend whose PGPROC has this number now. A slot whose
/// pid is not that backend's was left by one that is gone (every way out
/// empties it, but the view does not take that on trust).
fn backend_pid(number: usize) -> Option<i32> {
    // SAFETY: ProcGlobal's allProcs has more PGPROCs than MaxBackends, the
    // number of slots, so `number` is inside it; a pid is read atomically.
    unsafe {
        let procs = (*pg_sys::ProcGlobal).allProcs;
        (!procs.is_null()).then(|| std::ptr::read_volatile(&(*procs.add(number)).pid))
    }
}

/// A filled waiter slot; emptied on drop.
pub struct Waiting {
    arrival: u64,
    granted: bool,
}

impl Waiting {
    /// This waiter got the key: leaving, it wakes nobody (the key is held,
    /// and its release wakes the next head).
    pub fn granted(&mut self) {
        self.granted = true;
    }
}

/// Enter `key`'s queue, waiting until `until` (a timestamp); None without
/// preload (or for a backend without a slot).
pub fn enter(key: &str, mode: Mode, role: pg_sys::Oid, until: i64) -> Option<Waiting> {
    fill(&[key], mode, role, until, 0)
}

/// Enter the queues of `keys` (distinct, in "C" order) as one multi-key
/// waiter (`lock_acquire_all`), with a place in the queue of each key
/// whose bit `places` sets ([`hold_places`]).
pub fn enter_all(keys: &[String], role: pg_sys::Oid, until: i64, places: u64) -> Option<Waiting> {
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let waiting = fill(&keys, Mode::All, role, until, places)?;
    ALL_KEYS.with(|all| {
        let mut all = all.borrow_mut();
        all.clear();
        all.extend(keys.iter().map(|key| (*key).to_owned()));
    });
    Some(waiting)
}

fn fill(keys: &[&str], mode: Mode, role: pg_sys::Oid, until: i64, places: u64) -> Option<Waiting> {
    let segment = shmem::segment()?;
    let slot = segment.waiter_slots().get(my_slot()?)?;
    let first = keys.first()?;
    if !EXIT_CALLBACK.get() {
        // SAFETY: registering a callback of this library, which stays loaded.
        unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
        EXIT_CALLBACK.set(true);
    }
    let bytes = &first.as_bytes()[..first.len().min(MAX_KEY_BYTES)];
    let hash = segment.hash(database_id(), bytes);
    let hashes: Vec<u64> = keys
        .iter()
        .take(MAX_KEYS)
        .map(|key| {
            segment.hash(
                database_id(),
                &key.as_bytes()[..key.len().min(MAX_KEY_BYTES)],
            )
        })
        .collect();
    let _held = segment.lock(Lock::Waiters, true);
    // SAFETY: the waiters lock is held exclusively, so nobody reads the key.
    unsafe { (&mut *slot.key.get())[..bytes.len()].copy_from_slice(bytes) };
    slot.length.store(bytes.len() as u32, Ordering::Relaxed);
    for (to, from) in slot.hashes.iter().zip(&hashes) {
        to.store(*from, Ordering::Relaxed);
    }
    slot.keys.store(hashes.len() as u32, Ordering::Relaxed);
    slot.places.store(places, Ordering::Relaxed);
    // SAFETY: backend-local globals.
    let (pid, database) = unsafe { (pg_sys::MyProcPid, pg_sys::MyDatabaseId) };
    slot.database.store(database.to_u32(), Ordering::Relaxed);
    slot.role.store(role.to_u32(), Ordering::Relaxed);
    slot.mode.store(mode as u32, Ordering::Relaxed);
    // SAFETY: a plain read of the clock.
    slot.since
        .store(unsafe { pg_sys::GetCurrentTimestamp() }, Ordering::Relaxed);
    slot.until.store(until, Ordering::Relaxed);
    slot.hash.store(hash, Ordering::Relaxed);
    let arrival = segment.header().arrivals.fetch_add(1, Ordering::Relaxed) + 1;
    slot.arrival.store(arrival, Ordering::Relaxed);
    slot.pid.store(pid, Ordering::Relaxed);
    segment.header().queued.fetch_add(1, Ordering::Relaxed);
    FILLED.set(true);
    Some(Waiting {
        arrival,
        granted: false,
    })
}

/// A queued multi-key waiter's places after its latest look: bit i set
/// keeps its place in the queue of key i. A place it gives up is passed
/// on: every waiter of that key is woken to look again.
pub fn hold_places(places: u64) {
    if !FILLED.get() {
        return;
    }
    let Some(segment) = shmem::segment() else {
        return;
    };
    let Some(slot) = my_slot().and_then(|number| segment.waiter_slots().get(number)) else {
        return;
    };
    let _held = segment.lock(Lock::Waiters, true);
    if slot.mode.load(Ordering::Relaxed) != Mode::All as u32 {
        return;
    }
    let given_up = slot.places.load(Ordering::Relaxed) & !places;
    slot.places.store(places, Ordering::Relaxed);
    if given_up != 0 {
        ALL_KEYS.with(|all| {
            for (i, key) in all.borrow().iter().enumerate() {
                if given_up & (1 << i) != 0 {
                    wake_all_locked(&segment, key);
                }
            }
        });
    }
}

/// Wake every waiter queued for `key` (exclusive), not only its head: a
/// place given up may unblock a waiter further back, behind other multi-key
/// waiters that give theirs up in the same window. Waiters lock held.
fn wake_all_locked(segment: &shmem::Segment, key: &str) {
    let bytes = &key.as_bytes()[..key.len().min(MAX_KEY_BYTES)];
    let (database, hash) = (database_id(), segment.hash(database_id(), bytes));
    let mine = my_slot();
    for (number, slot) in segment.waiter_slots().iter().enumerate() {
        if Some(number) != mine && slot.waits_for(number, database, hash, bytes, Mode::Exclusive) {
            // SAFETY: as in wake_head_locked.
            unsafe {
                let procs = (*pg_sys::ProcGlobal).allProcs;
                pg_sys::SetLatch(&raw mut (*procs.add(number)).procLatch);
            }
        }
    }
    if let Some(name) = crate::semaphore::semaphore_of(key) {
        wake_head_locked(segment, &crate::semaphore::queue_key(name), Mode::Semaphore);
    }
}

/// Wake the head of `key`'s exclusive queue and, for a semaphore's permit,
/// of its semaphore's queue (a waiter there may have been turned away by
/// someone queued for the permit key itself). Waiters lock held.
fn wake_key_locked(segment: &shmem::Segment, key: &str) {
    wake_head_locked(segment, key, Mode::Exclusive);
    if let Some(name) = crate::semaphore::semaphore_of(key) {
        wake_head_locked(segment, &crate::semaphore::queue_key(name), Mode::Semaphore);
    }
}

fn database_id() -> u32 {
    // SAFETY: a backend-local global, set at connection.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Whether someone queued for `key` in `mode` arrived before `me` (or, for
/// a caller not queued, at all): then the key is theirs to take first.
pub fn someone_ahead(key: &str, mode: Mode, me: Option<&Waiting>) -> bool {
    ahead(key, mode, me).is_some()
}

/// Who is queued for `key` in `mode` before `me`: None if nobody;
/// `Some(true)` if only multi-key waiters are (they take a free key only
/// once all their keys are free, perhaps much later, and wake the queue
/// when they leave or release it), `Some(false)` otherwise. For a shared
/// request, shared waiters ahead do not count: they go in together.
pub fn ahead(key: &str, mode: Mode, me: Option<&Waiting>) -> Option<bool> {
    let segment = shmem::segment()?;
    if segment.header().queued.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let bytes = &key.as_bytes()[..key.len().min(MAX_KEY_BYTES)];
    let (database, hash) = (database_id(), segment.hash(database_id(), bytes));
    let mine = me.map_or(u64::MAX, |me| me.arrival);
    let _held = segment.lock(Lock::Waiters, false);
    let mut only_multi = None;
    for (number, slot) in segment.waiter_slots().iter().enumerate() {
        if slot.arrival.load(Ordering::Relaxed) < mine
            && slot.waits_for(number, database, hash, bytes, mode)
            && !(mode == Mode::Shared && slot.mode.load(Ordering::Relaxed) == Mode::Shared as u32)
        {
            let multi = slot.mode.load(Ordering::Relaxed) == Mode::All as u32;
            if !multi {
                return Some(false);
            }
            only_multi = Some(true);
        }
    }
    only_multi
}

/// Wake the head of `key`'s queue in `mode` (set its latch), other than
/// this backend; false if nobody else is queued for it.
pub fn wake_head(key: &str, mode: Mode) -> bool {
    let Some(segment) = shmem::segment() else {
        return false;
    };
    if segment.header().queued.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let _held = segment.lock(Lock::Waiters, false);
    wake_head_locked(&segment, key, mode)
}

/// [`wake_head`] with the waiters lock held (either mode).
fn wake_head_locked(segment: &shmem::Segment, key: &str, mode: Mode) -> bool {
    let bytes = &key.as_bytes()[..key.len().min(MAX_KEY_BYTES)];
    let (database, hash) = (database_id(), segment.hash(database_id(), bytes));
    let mine = my_slot();
    let head = segment
        .waiter_slots()
        .iter()
        .enumerate()
        .filter(|(number, slot)| {
            Some(*number) != mine && slot.waits_for(*number, database, hash, bytes, mode)
        })
        .min_by_key(|(_, slot)| slot.arrival.load(Ordering::Relaxed));
    let Some((number, _)) = head else {
        return false;
    };
    // SAFETY: slot numbers are PGPROC numbers below MaxBackends, inside
    // allProcs; setting another backend's latch is safe in any state it is
    // in (condition variables do it), and SetLatch raises no error.
    unsafe {
        let procs = (*pg_sys::ProcGlobal).allProcs;
        pg_sys::SetLatch(&raw mut (*procs.add(number)).procLatch);
    }
    true
}

impl Drop for Waiting {
    fn drop(&mut self) {
        leave(!self.granted);
    }
}

/// Empty this backend's slot, if it is filled, and (`wake`: it leaves
/// without the key) wake whoever is now the head of its key's queue: if
/// this backend was the head, the next waiter may take the key now. Waking
/// when it was not the head costs that head one look; it never loses a
/// wake-up. A waiter that got the key wakes nobody: the new head learns of
/// its lease at its next look (within `QUEUED_RECHECK_INTERVAL_MS`), and
/// its release wakes it.
fn leave(wake: bool) {
    if !FILLED.get() {
        return;
    }
    let Some(segment) = shmem::segment() else {
        return;
    };
    if let Some(slot) = my_slot().and_then(|number| segment.waiter_slots().get(number)) {
        let _held = segment.lock(Lock::Waiters, true);
        slot.pid.store(0, Ordering::Relaxed);
        segment.header().queued.fetch_sub(1, Ordering::Relaxed);
        let length = slot.length.load(Ordering::Relaxed) as usize;
        let mode = Mode::from_slot(slot.mode.load(Ordering::Relaxed));
        // SAFETY: our own slot, under the exclusive lock.
        let key = unsafe { &(&*slot.key.get())[..length] };
        match (wake, std::str::from_utf8(key), mode) {
            (true, _, Some(Mode::All)) => ALL_KEYS.with(|all| {
                for key in all.borrow().iter() {
                    wake_key_locked(&segment, key);
                }
            }),
            (true, Ok(key), Some(mode)) => {
                wake_head_locked(&segment, key, mode);
            }
            _ => {}
        }
    }
    ALL_KEYS.with(|all| all.borrow_mut().clear());
    FILLED.set(false);
}

/// At a transaction's abort: an error that skipped the guard's drop.
pub fn on_abort() {
    leave(true);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, _arg: pg_sys::Datum) {
    leave(true);
}

type WaiterRow = (
    i32,
    pg_sys::Oid,
    String,
    &'static str,
    Option<TimestampWithTimeZone>,
    Option<TimestampWithTimeZone>,
    i64,
);

fn rows() -> Result<Vec<WaiterRow>, Failure> {
    let segment = shmem::required("fence.waiters")?;
    // SAFETY: a backend-local global.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let mut waiting: Vec<(u64, WaiterRow)> = {
        let _held = segment.lock(Lock::Waiters, false);
        segment
            .waiter_slots()
            .iter()
            .enumerate()
            .filter(|(number, slot)| {
                let pid = slot.pid.load(Ordering::Relaxed);
                pid != 0
                    && slot.database.load(Ordering::Relaxed) == database
                    && backend_pid(*number) == Some(pid)
            })
            .map(|(_, slot)| slot)
            .map(|slot| {
                let length = slot.length.load(Ordering::Relaxed) as usize;
                // SAFETY: the waiters lock is held in share mode, so the
                // slot's backend is not writing its key.
                let key = unsafe { &(&*slot.key.get())[..length] };
                let at =
                    |t: &AtomicI64| TimestampWithTimeZone::try_from(t.load(Ordering::Relaxed)).ok();
                (
                    slot.arrival.load(Ordering::Relaxed),
                    (
                        slot.pid.load(Ordering::Relaxed),
                        pg_sys::Oid::from(slot.role.load(Ordering::Relaxed)),
                        String::from_utf8_lossy(key).into_owned(),
                        Mode::from_slot(slot.mode.load(Ordering::Relaxed))
                            .map_or("unknown", Mode::name),
                        at(&slot.since),
                        at(&slot.until),
                        0,
                    ),
                )
            })
            .collect()
    };
    // One queue per key and mode, in arrival order; a multi-key waiter
    // (shown under its first key) is in its keys' exclusive queues.
    fn queue(row: &WaiterRow) -> (&str, bool) {
        (&row.2, row.3 == Mode::Semaphore.name())
    }
    waiting.sort_by(|a, b| (queue(&a.1), a.0).cmp(&(queue(&b.1), b.0)));
    let mut rows: Vec<WaiterRow> = Vec::with_capacity(waiting.len());
    let mut position = 0;
    for (_, mut row) in waiting {
        position = match rows.last() {
            Some(previous) if queue(previous) == queue(&row) => position + 1,
            _ => 1,
        };
        row.6 = position;
        rows.push(row);
    }
    Ok(rows)
}

/// The rows of `fence.waiters`: sessions of this database waiting inside
/// `lock_acquire`, in queue order per key.
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity)]
fn _waiters() -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(role, pg_sys::Oid),
        name!(lock_key, String),
        name!(mode, &'static str),
        name!(waiting_since, Option<TimestampWithTimeZone>),
        name!(wait_until, Option<TimestampWithTimeZone>),
        name!(position, i64),
    ),
> {
    TableIterator::new(or_raise(rows()))
}
