//! Waiting for a key inside the server, and waking the waiters when it frees.
//!
//! A waiter in `lock_acquire(..., wait => ...)` sleeps on its own process
//! latch. While it waits it advertises the key it wants in its PGPROC's
//! `wait_event_info` (class `Extension`, the low 24 bits a hash of the key),
//! which is what `pg_stat_activity` reads too. A transaction that released a
//! key sets the latch of one backend of the same database advertising that
//! hash, right after it commits and has let go of its locks, so a waiter
//! retries within about a millisecond of a release and finds the key free.
//! Only one: a release frees one grant, and waking every waiter had them all
//! race for it, which on a hot key cost more than the grant (the one woken
//! is drawn at random among the waiters not already woken). A waiter whose wait
//! runs out just after it was woken passes the wake-up on to another. An
//! expiry needs no signal: the waiter knows `expires_at` and sleeps until
//! then. A hash collision, a woken waiter that is cancelled, or a missed
//! signal (the advertisement is briefly overwritten while the waiter does
//! I/O) costs the other waiters at most [`RECHECK_INTERVAL_MS`].
//!
//! This needs no shared memory of its own, so the extension works without
//! `shared_preload_libraries`.

use std::cell::RefCell;

use pgrx::pg_sys;

use crate::key;
use crate::waiters::Mode;

/// Longest sleep between two attempts while the key looks held.
pub const RECHECK_INTERVAL_MS: i64 = 50;
/// Longest sleep of a queued waiter that is not the head of its key's
/// queue (preload mode): the queue wakes it when its turn comes, so this is
/// only a safety net, and waiting costs nothing meanwhile.
pub const QUEUED_RECHECK_INTERVAL_MS: i64 = 1000;
/// Sleep while the key's lock is held by another transaction (a grant in
/// flight, a fenced write, an uncommitted renew or release) or its row is
/// locked: nobody signals when those end.
pub const LOCKED_ROW_RETRY_MS: i64 = 2;

/// What a committed change of a key wakes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// A release or force: one acquire waiter (the queue's head), and every
    /// watcher.
    AcquirersAndWatchers,
    /// A grant: every watcher (`fence.lock_watch`) only.
    Watchers,
}

thread_local! {
    /// Keys (and their wait events) to wake waiters of when the current
    /// transaction commits.
    static PENDING_WAKEUPS: RefCell<Vec<(u32, String, Wake)>> = const { RefCell::new(Vec::new()) };
    /// Keys granted in the current transaction (preload mode): if it, or
    /// the subtransaction of a grant, aborts, the key is free again and its
    /// queue's head must hear of it.
    static GRANTED: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// The wait event that stands for `lock_key`: its hash (key.rs), folded to
/// 24 bits.
pub fn wait_event_for(lock_key: &str) -> u32 {
    let hash = key::hash(lock_key);
    pg_sys::PG_WAIT_EXTENSION | ((hash ^ (hash >> 24)) & 0x00FF_FFFF)
}

/// Advertise the key this backend is about to wait for. Called before each
/// attempt, so a release that commits between the attempt and the sleep
/// still finds us (it sets the latch; the sleep then returns at once).
pub fn advertise(event: u32) {
    // SAFETY: my_wait_event_info points at this backend's own PGPROC field (or a local
    // dummy before it has one).
    unsafe { *pg_sys::my_wait_event_info = event };
}

/// Whether this backend still advertises `event`: a wait inside a read
/// (for a buffer, a lock) resets the advertisement when it ends.
pub fn advertising(event: u32) -> bool {
    // SAFETY: as for advertise().
    unsafe { *pg_sys::my_wait_event_info == event }
}

/// Stop advertising. An error path needs no call: AbortTransaction clears it.
pub fn stop_advertising() {
    // SAFETY: as for advertise().
    unsafe { *pg_sys::my_wait_event_info = 0 };
}

/// Clear this backend's latch before an attempt, so a wake-up that arrives
/// during the attempt is not lost.
pub fn reset_latch() {
    // SAFETY: MyLatch is this backend's own latch.
    unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
}

unsafe extern "C-unwind" {
    /// libpq/pqcomm.c (PostgreSQL 14 and later): false once the client's
    /// socket has been closed (what `client_connection_check_interval`
    /// checks). Called through `pg_guard_ffi_boundary`: an ERROR inside it
    /// unwinds as a Rust panic rather than jumping over our frames.
    fn pq_check_connection() -> bool;
}

/// Sleep up to `timeout_ms`, or until a releaser sets our latch. Honours query
/// cancel, `statement_timeout` and postmaster death, and ends the session
/// (FATAL, "connection to client lost", as `client_connection_check_interval`
/// does) once the client has gone away: a wait nobody will read the answer
/// of must not grant a lease that nobody holds.
pub fn sleep(event: u32, timeout_ms: i64) {
    let timeout = timeout_ms.clamp(1, i64::from(i32::MAX));
    // SAFETY: waits on this backend's own latch; WaitLatch is interruptible and returns
    // on postmaster death (WL_EXIT_ON_PM_DEATH exits instead).
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout as _,
            event,
        );
        // WaitLatch cleared our advertisement; the next attempt sets it again.
        // A session with a client (not a background worker's) whose client
        // is gone: have ProcessInterrupts end it.
        if !pg_sys::MyProcPort.is_null()
            && !pg_sys::ffi::pg_guard_ffi_boundary(|| pq_check_connection())
        {
            pg_sys::ClientConnectionLost = 1;
            pg_sys::InterruptPending = 1;
        }
    }
    pg_sys::check_for_interrupts!();
}

/// Wake the waiters of `lock_key` once the current transaction commits (a
/// waiter woken earlier would not yet see the key free), and its watchers.
pub fn wake_after_commit(lock_key: &str) {
    pend(lock_key, Wake::AcquirersAndWatchers);
}

/// Wake the watchers of `lock_key` once the current transaction commits:
/// it was granted anew.
pub fn wake_watchers_after_commit(lock_key: &str) {
    pend(lock_key, Wake::Watchers);
}

fn pend(lock_key: &str, wake: Wake) {
    PENDING_WAKEUPS.with(|pending| {
        let mut pending = pending.borrow_mut();
        match pending.iter_mut().find(|(_, key, _)| key == lock_key) {
            Some(entry) => {
                if wake == Wake::AcquirersAndWatchers {
                    entry.2 = wake;
                }
            }
            None => pending.push((wait_event_for(lock_key), lock_key.to_owned(), wake)),
        }
    });
}

/// The wait event a watcher of `lock_key` advertises: the key's hash as
/// for [`wait_event_for`], with its low 24 bits flipped, so never the event
/// an acquire waiter of the same key advertises.
pub fn watch_event_for(lock_key: &str) -> u32 {
    wait_event_for(lock_key) ^ 0x00FF_FFFF
}

/// Remember a key this transaction was granted, to wake its queue's head
/// if the grant is rolled back (preload mode; no queue otherwise).
///
/// Only while someone is queued (a grant in every other case costs no
/// allocation): a waiter that queues later, while this grant is still
/// uncommitted, finds the key's lock taken and, as the head, retries every
/// `LOCKED_ROW_RETRY_MS` without needing a wake-up.
pub fn wake_if_rolled_back(lock_key: &str) {
    let queued = crate::shmem::segment().is_some_and(|segment| {
        segment
            .header()
            .queued
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    });
    if !queued {
        return;
    }
    GRANTED.with(|granted| {
        let mut granted = granted.borrow_mut();
        if !granted.iter().any(|key| key == lock_key) {
            granted.push(lock_key.to_owned());
        }
    });
}

/// Called by the extension's transaction callback (lib.rs).
pub fn on_xact_event(event: pg_sys::XactEvent::Type) {
    if let pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE = event {
        // Nothing was released (or it is up to COMMIT PREPARED, which the
        // waiters' recheck interval covers). PrepareTransaction calls this
        // before it releases its resource owners, so nothing is woken.
        PENDING_WAKEUPS.with(|pending| pending.borrow_mut().clear());
    }
}

/// Called by the extension's resource-release callback (lib.rs) for every
/// resource owner released. The waiters are woken only once the top-level
/// transaction has committed *and* released its locks: woken at
/// XACT_EVENT_COMMIT, a waiter found the key lock the release took still
/// held and slept again.
pub fn on_resource_release(
    phase: pg_sys::ResourceReleasePhase::Type,
    is_commit: bool,
    is_top_level: bool,
) {
    if phase != pg_sys::ResourceReleasePhase::RESOURCE_RELEASE_AFTER_LOCKS {
        return;
    }
    // An abort, of the transaction or of a subtransaction, has let go of
    // its locks: a grant it rolled back left its key free. Waking the head
    // of every key granted in the transaction is at worst a look too many.
    if !is_commit {
        let granted = GRANTED.with(|granted| {
            if is_top_level {
                std::mem::take(&mut *granted.borrow_mut())
            } else {
                granted.borrow().clone()
            }
        });
        for key in granted {
            crate::waiters::wake_head(&key, Mode::Exclusive);
            if let Some(name) = crate::semaphore::semaphore_of(&key) {
                crate::waiters::wake_head(&crate::semaphore::queue_key(name), Mode::Semaphore);
            }
        }
    } else if is_top_level {
        GRANTED.with(|granted| granted.borrow_mut().clear());
    }
    if !is_top_level {
        return;
    }
    let events = PENDING_WAKEUPS.with(|pending| std::mem::take(&mut *pending.borrow_mut()));
    if is_commit {
        // In preload mode, nobody counted as watching (at this moment, after
        // the commit became visible) means nobody to wake: a watcher counts
        // itself before its first look, which then sees the change.
        let watched = crate::shmem::segment().is_none_or(|segment| {
            segment
                .header()
                .watchers
                .load(std::sync::atomic::Ordering::SeqCst)
                > 0
        });
        for (event, key, wake) in events {
            if watched {
                // SAFETY: at commit, in a backend attached to shared
                // memory, outside any critical section.
                unsafe { wake_all_waiting_on(watch_event_for(&key)) };
            }
            if wake == Wake::Watchers {
                continue;
            }
            wake_one_of(event, &key, Mode::Exclusive);
            // A semaphore's permit: its semaphore's waiters want it too.
            if let Some(name) = crate::semaphore::semaphore_of(&key) {
                let queue = crate::semaphore::queue_key(name);
                wake_one_of(wait_event_for(&queue), &queue, Mode::Semaphore);
            }
        }
    }
}

/// Wake one waiter of `key`: in preload mode the head of its queue (G7);
/// otherwise (or with nobody queued) one backend advertising its wait event.
fn wake_one_of(event: u32, key: &str, mode: Mode) {
    if !crate::waiters::wake_head(key, mode) {
        // SAFETY: called in a backend attached to shared memory, outside
        // any critical section, as the commit path is here.
        unsafe { wake_one_waiting_on(event) };
    }
}

/// A waiter leaving without the lease: if a release woke it since its last
/// attempt (its latch is set), wake another waiter of the key in its place.
pub fn pass_on_wakeup(event: u32) {
    // SAFETY: MyLatch is this backend's own latch; waking another is
    // wake_one_waiting_on's contract, met in any backend.
    unsafe {
        if (*pg_sys::MyLatch).is_set != 0 {
            wake_one_waiting_on(event);
        }
    }
}

/// Set the latch of one backend (not this one) of this database whose
/// advertised wait event is `event` and whose latch is not set already (that one will run anyway),
/// chosen uniformly among them in one pass (reservoir sampling), so the
/// empty process slots between backends do not favour any of them. Reading
/// another backend's `wait_event_info` and latch flag without a lock is what
/// `pg_stat_activity` does; setting another backend's latch is what
/// condition variables do.
///
/// # Safety
///
/// Call it in a backend attached to shared memory (`ProcGlobal` set up), not
/// inside a critical section: SetLatch may signal another process.
unsafe fn wake_one_waiting_on(event: u32) {
    // SAFETY: allProcs has allProcCount entries for the postmaster's
    // lifetime; the fields read are read as pg_stat_activity reads them
    // (volatile, unlocked: a stale value costs one wake-up), and SetLatch on
    // another backend's latch is safe whatever state that backend is in.
    unsafe {
        let header = pg_sys::ProcGlobal;
        if header.is_null() {
            return;
        }
        let procs = (*header).allProcs;
        let count = (*header).allProcCount as usize;
        let mut random =
            (pg_sys::GetCurrentTimestamp() as u64) ^ ((pg_sys::MyProcPid as u64) << 32) | 1;
        let mut chosen: Option<*mut pg_sys::PGPROC> = None;
        let mut matches = 0u64;
        for i in 0..count {
            let proc_ = procs.add(i);
            if proc_ == pg_sys::MyProc {
                continue;
            }
            let advertised = std::ptr::read_volatile(std::ptr::addr_of!((*proc_).wait_event_info));
            let latch_set = std::ptr::read_volatile(std::ptr::addr_of!((*proc_).procLatch.is_set));
            // Keys are per database: the same name in another database (one
            // per tenant) is another key.
            let database = std::ptr::read_volatile(std::ptr::addr_of!((*proc_).databaseId));
            if advertised != event || latch_set != 0 || database != pg_sys::MyDatabaseId {
                continue;
            }
            matches += 1;
            // xorshift64: the k-th match replaces the choice with probability 1/k.
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            if random.is_multiple_of(matches) {
                chosen = Some(proc_);
            }
        }
        if let Some(proc_) = chosen {
            pg_sys::SetLatch(std::ptr::addr_of_mut!((*proc_).procLatch));
        }
    }
}

/// Set the latch of every backend (not this one) of this database whose
/// advertised wait event is `event`: the watchers of a key. Read and set as
/// [`wake_one_waiting_on`] does.
///
/// # Safety
///
/// As for [`wake_one_waiting_on`].
unsafe fn wake_all_waiting_on(event: u32) {
    // SAFETY: as in wake_one_waiting_on.
    unsafe {
        let header = pg_sys::ProcGlobal;
        if header.is_null() {
            return;
        }
        let procs = (*header).allProcs;
        let count = (*header).allProcCount as usize;
        for i in 0..count {
            let proc_ = procs.add(i);
            if proc_ == pg_sys::MyProc {
                continue;
            }
            let advertised = std::ptr::read_volatile(std::ptr::addr_of!((*proc_).wait_event_info));
            let database = std::ptr::read_volatile(std::ptr::addr_of!((*proc_).databaseId));
            if advertised == event && database == pg_sys::MyDatabaseId {
                pg_sys::SetLatch(std::ptr::addr_of_mut!((*proc_).procLatch));
            }
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn wait_events_are_stable_and_in_the_extension_class() {
        let event = super::wait_event_for("invoice:42");
        assert_eq!(event, super::wait_event_for("invoice:42"));
        assert_eq!(event & 0xFF00_0000, pg_sys::PG_WAIT_EXTENSION);
        assert_ne!(event, super::wait_event_for("invoice:43"));
        let watch = super::watch_event_for("invoice:42");
        assert_ne!(watch, event, "a watcher is never woken as an acquirer");
        assert_eq!(watch & 0xFF00_0000, pg_sys::PG_WAIT_EXTENSION);
    }
}
