//! Lock statistics (preload mode; guarantee G8): what an operator of a lock
//! service watches, kept per key class in shared memory (shmem.rs) the way
//! pg_stat_statements keeps statements.
//!
//! A key's class is the key up to its first `:` (`invoice:42` counts under
//! `invoice`), or the whole key. One row per (database, class), at most
//! `fence.stats_max_classes` rows for all databases together; once they are
//! taken, a database's new classes count under the class `'*'` (rows for up
//! to [`shmem::OVERFLOW_ROWS`] databases are reserved for it; beyond that a
//! call is not counted, and `fence.lock_stats_info.dropped` says how many).
//!
//! Counting is exact (G8): every counter is an atomic in the class's row,
//! added to while the row is held under the statistics lock in share mode,
//! so no count is lost or counted twice, and a reset (exclusive mode) never
//! sees a half-counted call. A call counts when it returns, whatever its
//! transaction does afterwards (as pg_stat_statements counts statements);
//! a call that fails with an error counts nothing, except a fenced write
//! refused with FN001, which is what `stale_writes` counts. What counts
//! leases rather than calls (`expirations`, `hold_seconds_total`) counts
//! when the transaction that ended the lease commits (or prepares): a grant
//! or release that rolls back (to a savepoint, too) ended nothing.
//!
//! The rows live in memory only: a restart (or a crash, which restarts
//! every process) starts them from zero, as `fence.lock_stats_reset()` does
//! for one database. `fence.track_stats = off` stops counting.

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::errors::{fail, or_raise, Failure, FenceError};
use crate::key::MAX_KEY_BYTES;
use crate::roles::{caller_role, is_fence_admin, role_name};
use crate::shmem::{self, add, Lock, Segment};

/// `fence.track_stats`: count into the statistics (preload mode).
static TRACK: GucSetting<bool> = GucSetting::<bool>::new(true);

pub fn register() {
    GucRegistry::define_bool_guc(
        c"fence.track_stats",
        c"Count pg_fence's lock statistics (fence.lock_stats), in preload mode.",
        c"Off: no call is counted; the statistics kept so far stay.",
        &TRACK,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// The counters of a class's row, in `fence.lock_stats`' column order.
#[derive(Clone, Copy)]
enum Counter {
    Acquires,
    Grants,
    Regrants,
    Contended,
    Busy,
    Timeouts,
    WaitMicros,
    Renewals,
    RenewalsLost,
    Releases,
    ReleasesLost,
    Forced,
    Expirations,
    HoldMicros,
    StaleWrites,
}
const COUNTERS: usize = Counter::StaleWrites as usize + 1;

/// Upper bounds of the wait histogram's buckets, in microseconds; one more
/// bucket (`le = 'Infinity'`) counts the rest.
const BUCKETS: [u64; 16] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
];

/// One key class of one database (in shared memory, zeroed at start).
#[repr(C)]
pub struct ClassRow {
    database: u32,
    length: u32,
    name: [u8; MAX_KEY_BYTES],
    /// Since when this row counts (made, or its database's stats reset).
    since: AtomicI64,
    counters: [AtomicU64; COUNTERS],
    wait_max_micros: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len() + 1],
}

impl ClassRow {
    fn name(&self) -> &[u8] {
        &self.name[..self.length as usize]
    }

    fn is(&self, database: u32, class: &[u8]) -> bool {
        self.database == database && self.name() == class
    }

    fn add(&self, counter: Counter, amount: u64) {
        add(&self.counters[counter as usize], amount);
    }

    fn get(&self, counter: Counter) -> i64 {
        self.counters[counter as usize].load(Ordering::Relaxed) as i64
    }
}

/// Refused writes (FN001) on one table of one database.
#[repr(C)]
pub struct TableRow {
    database: u32,
    relation: u32,
    refused: AtomicU64,
}

/// The class of a key: up to its first `:`, or all of it; at most
/// [`MAX_KEY_BYTES`] (a fenced table's key, prefix and column value, can be
/// longer than a lease's), cut at a character boundary.
pub fn class_of(key: &str) -> &str {
    let class = key.split_once(':').map_or(key, |(class, _)| class);
    let mut end = class.len().min(MAX_KEY_BYTES);
    while !class.is_char_boundary(end) {
        end -= 1;
    }
    &class[..end]
}

const OVERFLOW: &[u8] = b"*";

fn database() -> u32 {
    // SAFETY: a backend-local global, set at connection.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

fn now() -> i64 {
    // SAFETY: a plain read of the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Whether calls are counted now: preload mode and `fence.track_stats`.
pub fn counting() -> bool {
    TRACK.get() && shmem::segment().is_some()
}

/// Count into the row of `key`'s class, if statistics are kept: find it
/// under the shared lock, or add it (or the `'*'` row) under the exclusive
/// one. `count` runs with the row held.
fn count(key: &str, count: impl Fn(&ClassRow)) {
    if !TRACK.get() {
        return;
    }
    let Some(segment) = shmem::segment() else {
        return;
    };
    let database = database();
    let class = class_of(key).as_bytes();
    let hash = segment.hash(database, class);
    let overflow_hash = || segment.hash(database, OVERFLOW);
    {
        let _held = segment.lock(Lock::Stats, false);
        let classes = segment.classes();
        if let Some(row) = classes.find(hash, |row| row.is(database, class)) {
            return count(row);
        }
        // A full table: the '*' row, if there is one, needs no exclusive
        // lock (ever-new classes would otherwise each take it).
        if classes.used() >= segment.header().max_classes {
            if let Some(row) = classes.find(overflow_hash(), |row| row.is(database, OVERFLOW)) {
                return count(row);
            }
        }
    }
    let _held = segment.lock(Lock::Stats, true);
    let classes = segment.classes();
    if let Some(row) = classes.find(hash, |row| row.is(database, class)) {
        return count(row);
    }
    let max = segment.header().max_classes;
    let row = if classes.used() < max || class == OVERFLOW {
        classes.insert(hash, |row| make_row(row, database, class))
    } else {
        classes
            .find(overflow_hash(), |row| row.is(database, OVERFLOW))
            .or_else(|| classes.insert(overflow_hash(), |row| make_row(row, database, OVERFLOW)))
    };
    match row {
        Some(row) => count(row),
        None => add(&segment.header().dropped, 1),
    }
}

fn make_row(row: &mut ClassRow, database: u32, class: &[u8]) {
    row.database = database;
    row.length = class.len() as u32;
    row.name[..class.len()].copy_from_slice(class);
    row.since.store(now(), Ordering::Relaxed);
}

/// How an acquire call ended, for [`acquire`].
pub enum Outcome {
    /// A new lease (a new token).
    Granted,
    /// The holder's own live lease, extended (G6).
    Regranted,
    /// NULL: not granted within `wait`.
    Busy,
}

/// What one `lock_acquire` call did.
pub struct Acquired {
    pub outcome: Outcome,
    /// It found the key held (by another holder, or its lock taken).
    pub contended: bool,
    /// It was called with `wait > 0`.
    pub waited: bool,
    /// From the call's start to its answer.
    pub micros: u64,
    /// The lease this grant replaced had ended by expiry, after being held
    /// this long (from its grant to its expiry).
    pub expired_after_micros: Option<u64>,
}

pub fn acquire(key: &str, call: &Acquired) {
    count(key, |row| {
        row.add(Counter::Acquires, 1);
        match call.outcome {
            Outcome::Granted => row.add(Counter::Grants, 1),
            Outcome::Regranted => row.add(Counter::Regrants, 1),
            Outcome::Busy => {
                row.add(Counter::Busy, 1);
                if call.waited {
                    row.add(Counter::Timeouts, 1);
                }
            }
        }
        if call.contended {
            row.add(Counter::Contended, 1);
        }
        row.add(Counter::WaitMicros, call.micros);
        row.wait_max_micros
            .fetch_max(call.micros, Ordering::Relaxed);
        let bucket = BUCKETS
            .iter()
            .position(|&bound| call.micros <= bound)
            .unwrap_or(BUCKETS.len());
        add(&row.buckets[bucket], 1);
    });
    if let Some(held) = call.expired_after_micros {
        at_commit(key, 1, held);
    }
}

/// A `lock_renew` that extended the lease (`true`) or found it not live.
pub fn renewal(key: &str, renewed: bool) {
    count(key, |row| {
        row.add(
            if renewed {
                Counter::Renewals
            } else {
                Counter::RenewalsLost
            },
            1,
        )
    });
}

/// A `lock_release` that ended the lease after `held` (`Some`), or found
/// it not live (`None`).
pub fn release(key: &str, held_micros: Option<u64>) {
    count(key, |row| {
        row.add(
            if held_micros.is_some() {
                Counter::Releases
            } else {
                Counter::ReleasesLost
            },
            1,
        )
    });
    if let Some(held) = held_micros {
        at_commit(key, 0, held);
    }
}

/// A lease that had ended by expiry after being held this long, deleted
/// by `fence.sweep` before any grant replaced it (which would have counted
/// it): counted once the sweep commits.
pub fn expired(key: &str, held_micros: u64) {
    at_commit(key, 1, held_micros);
}

/// A `lock_force_release` that ended a lease held this long.
pub fn forced(key: &str, held_micros: u64) {
    count(key, |row| row.add(Counter::Forced, 1));
    at_commit(key, 0, held_micros);
}

/// Counts of leases that ended, waiting for the end of the transaction (or
/// subtransaction) that ended them.
struct Ended {
    key: String,
    /// The (sub)transaction nesting level that counted it.
    level: i32,
    expirations: u64,
    hold_micros: u64,
}

thread_local! {
    static ENDED: RefCell<Vec<Ended>> = const { RefCell::new(Vec::new()) };
}

fn nest_level() -> i32 {
    // SAFETY: a backend-local read, inside a transaction.
    unsafe { pg_sys::GetCurrentTransactionNestLevel() }
}

/// Count a lease's end (an expiry seen by the grant that replaced it, and
/// how long it was held) once this transaction commits.
fn at_commit(key: &str, expirations: u64, hold_micros: u64) {
    if !counting() {
        return;
    }
    let level = nest_level();
    ENDED.with(|ended| {
        ended.borrow_mut().push(Ended {
            key: key.to_owned(),
            level,
            expirations,
            hold_micros,
        })
    });
}

/// Called by the extension's transaction callback (lib.rs): count at
/// commit (and at PREPARE, whose outcome is another session's), forget at
/// abort.
pub fn on_xact_event(event: pg_sys::XactEvent::Type) {
    use pg_sys::XactEvent::*;
    let commit = match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PREPARE => true,
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => false,
        _ => return,
    };
    let ended = ENDED.with(|ended| std::mem::take(&mut *ended.borrow_mut()));
    if commit {
        for lease in ended {
            count(&lease.key, |row| {
                row.add(Counter::Expirations, lease.expirations);
                row.add(Counter::HoldMicros, lease.hold_micros);
            });
        }
    }
}

/// Called by the extension's subtransaction callback (lib.rs): a
/// subtransaction's counts go with it at its abort, and to its parent at
/// its commit.
pub fn on_subxact_event(event: pg_sys::SubXactEvent::Type) {
    let level = nest_level();
    ENDED.with(|ended| {
        let mut ended = ended.borrow_mut();
        match event {
            pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
                ended.retain(|lease| lease.level < level)
            }
            pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => {
                for lease in ended.iter_mut().filter(|lease| lease.level >= level) {
                    lease.level = level - 1;
                }
            }
            _ => {}
        }
    });
}

/// A fenced write refused with FN001: under its key's class, and on the
/// table the trigger fired for.
pub fn stale_write(key: &str, relation: pg_sys::Oid) {
    count(key, |row| row.add(Counter::StaleWrites, 1));
    if !TRACK.get() {
        return;
    }
    let Some(segment) = shmem::segment() else {
        return;
    };
    let (database, relation) = (database(), relation.to_u32());
    let hash = segment.hash(database, &relation.to_le_bytes());
    let is = |row: &TableRow| row.database == database && row.relation == relation;
    {
        let _held = segment.lock(Lock::Stats, false);
        if let Some(row) = segment.tables().find(hash, is) {
            return add(&row.refused, 1);
        }
    }
    let _held = segment.lock(Lock::Stats, true);
    let tables = segment.tables();
    let row = tables.find(hash, is).or_else(|| {
        tables.insert(hash, |row| {
            row.database = database;
            row.relation = relation;
        })
    });
    // A full table: the refusal still counted under its class above.
    if let Some(row) = row {
        add(&row.refused, 1);
    }
}

/// Microseconds between two timestamps, 0 if the clock went backwards.
pub fn micros_between(from: TimestampWithTimeZone, to: TimestampWithTimeZone) -> u64 {
    u64::try_from(to.into_inner().saturating_sub(from.into_inner())).unwrap_or(0)
}

fn seconds(micros: i64) -> f64 {
    micros as f64 / 1e6
}

fn timestamp(micros: i64) -> Option<TimestampWithTimeZone> {
    TimestampWithTimeZone::try_from(micros).ok()
}

/// This database's rows, copied out under the shared lock.
fn rows<T>(segment: &Segment, copy: impl Fn(&ClassRow) -> T) -> Vec<T> {
    let database = database();
    let _held = segment.lock(Lock::Stats, false);
    segment
        .classes()
        .iter()
        .filter(|row| row.database == database)
        .map(copy)
        .collect()
}

type StatsRow = (
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    f64,
    f64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    f64,
    i64,
    Option<TimestampWithTimeZone>,
);

fn stats_rows() -> Result<Vec<StatsRow>, Failure> {
    let segment = shmem::required("fence.lock_stats")?;
    Ok(rows(&segment, |row| {
        use Counter::*;
        (
            String::from_utf8_lossy(row.name()).into_owned(),
            row.get(Acquires),
            row.get(Grants),
            row.get(Regrants),
            row.get(Contended),
            row.get(Busy),
            row.get(Timeouts),
            seconds(row.get(WaitMicros)),
            seconds(row.wait_max_micros.load(Ordering::Relaxed) as i64),
            row.get(Renewals),
            row.get(RenewalsLost),
            row.get(Releases),
            row.get(ReleasesLost),
            row.get(Forced),
            row.get(Expirations),
            seconds(row.get(HoldMicros)),
            row.get(StaleWrites),
            timestamp(row.since.load(Ordering::Relaxed)),
        )
    }))
}

/// The rows of `fence.lock_stats` (this database's key classes).
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity)]
fn _lock_stats() -> TableIterator<
    'static,
    (
        name!(key_class, String),
        name!(acquires, i64),
        name!(grants, i64),
        name!(regrants, i64),
        name!(contended, i64),
        name!(busy, i64),
        name!(timeouts, i64),
        name!(wait_seconds_total, f64),
        name!(wait_seconds_max, f64),
        name!(renewals, i64),
        name!(renewals_lost, i64),
        name!(releases, i64),
        name!(releases_lost, i64),
        name!(forced, i64),
        name!(expirations, i64),
        name!(hold_seconds_total, f64),
        name!(stale_writes, i64),
        name!(stats_reset, Option<TimestampWithTimeZone>),
    ),
> {
    TableIterator::new(or_raise(stats_rows()))
}

fn histogram_rows() -> Result<Vec<(String, f64, i64)>, Failure> {
    let segment = shmem::required("fence.lock_wait_histogram")?;
    let per_class = rows(&segment, |row| {
        let counts: Vec<u64> = row
            .buckets
            .iter()
            .map(|bucket| bucket.load(Ordering::Relaxed))
            .collect();
        (String::from_utf8_lossy(row.name()).into_owned(), counts)
    });
    let mut out = Vec::with_capacity(per_class.len() * (BUCKETS.len() + 1));
    for (class, counts) in per_class {
        let mut cumulative = 0u64;
        for (i, count) in counts.iter().enumerate() {
            cumulative += count;
            let le = BUCKETS
                .get(i)
                .map_or(f64::INFINITY, |&micros| micros as f64 / 1e6);
            out.push((class.clone(), le, cumulative as i64));
        }
    }
    Ok(out)
}

/// The rows of `fence.lock_wait_histogram`: per class, cumulative counts of
/// acquire calls that answered within `le` seconds.
#[pg_extern(volatile, parallel_restricted)]
fn _lock_wait_histogram(
) -> TableIterator<'static, (name!(key_class, String), name!(le, f64), name!(count, i64))> {
    TableIterator::new(or_raise(histogram_rows()))
}

fn info() -> Result<(i32, i32, i32, i32, i64), Failure> {
    let segment = shmem::required("fence.lock_stats_info")?;
    let header = segment.header();
    let _held = segment.lock(Lock::Stats, false);
    Ok((
        header.max_classes as i32,
        segment.classes().used() as i32,
        header.max_tables as i32,
        segment.tables().used() as i32,
        header.dropped.load(Ordering::Relaxed) as i64,
    ))
}

/// The row of `fence.lock_stats_info`: the tables' sizes and use, for all
/// databases.
#[pg_extern(volatile, parallel_restricted)]
fn _lock_stats_info() -> TableIterator<
    'static,
    (
        name!(classes_max, i32),
        name!(classes_used, i32),
        name!(tables_max, i32),
        name!(tables_used, i32),
        name!(dropped, i64),
    ),
> {
    TableIterator::once(or_raise(info()))
}

fn reset() -> Result<(), Failure> {
    const F: &str = "lock_stats_reset";
    let segment = shmem::required(F)?;
    let role = caller_role();
    if !is_fence_admin(role) {
        return fail(FenceError::NeedsFenceAdmin {
            function: F,
            role: role_name(role),
        });
    }
    // Rows of databases dropped since go too: nothing else removes them.
    let databases: Vec<u32> = Spi::connect(|client| {
        client
            .select("SELECT oid FROM pg_catalog.pg_database", None, &[])?
            .map(|row| {
                row.get::<pg_sys::Oid>(1)
                    .map(|oid| oid.map_or(0, |oid| oid.to_u32()))
            })
            .collect::<Result<_, _>>()
    })?;
    let database = database();
    let keep = |row_database: u32| row_database != database && databases.contains(&row_database);
    let _held = segment.lock(Lock::Stats, true);
    segment.classes().retain(|row| keep(row.database));
    segment.tables().retain(|row| keep(row.database));
    Ok(())
}

/// Zero this database's statistics, and forget those of dropped databases
/// (members of fence_admin).
#[pg_extern(volatile, parallel_unsafe)]
fn lock_stats_reset() {
    or_raise(reset())
}

/// Writes refused with FN001 on this table since the statistics were last
/// reset; NULL without preload.
#[pg_extern(volatile, parallel_restricted)]
fn _refused_writes(relation: pg_sys::Oid) -> Option<i64> {
    let segment = shmem::segment()?;
    let (database, relation) = (database(), relation.to_u32());
    let hash = segment.hash(database, &relation.to_le_bytes());
    let _held = segment.lock(Lock::Stats, false);
    Some(
        segment
            .tables()
            .find(hash, |row| {
                row.database == database && row.relation == relation
            })
            .map_or(0, |row| row.refused.load(Ordering::Relaxed) as i64),
    )
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn a_key_class_is_the_key_up_to_its_first_colon() {
        assert_eq!(super::class_of("invoice:42:line:3"), "invoice");
        assert_eq!(super::class_of("nightly-report"), "nightly-report");
        assert_eq!(super::class_of(":x"), "");
    }

    #[pg_test]
    fn calls_count_in_their_class_in_one_backend() {
        // The pg_test cluster preloads pg_fence (lib.rs, pg_test).
        assert!(crate::shmem::preloaded());
        Spi::run("SELECT fence.lock_stats_reset()").unwrap();
        let token = Spi::get_one::<i64>("SELECT token FROM fence.lock_acquire('unit:1')")
            .unwrap()
            .unwrap();
        Spi::run(&format!("SELECT fence.lock_renew('unit:1', {token})")).unwrap();
        Spi::run(&format!("SELECT fence.lock_release('unit:1', {token})")).unwrap();
        Spi::run(&format!("SELECT fence.lock_release('unit:1', {token})")).unwrap();
        let counts = Spi::get_one::<String>(
            "SELECT format('%s %s %s %s %s', acquires, grants, renewals, releases, releases_lost)
               FROM fence.lock_stats WHERE key_class = 'unit'",
        )
        .unwrap()
        .unwrap();
        assert_eq!(counts, "1 1 1 1 1");
    }
}
