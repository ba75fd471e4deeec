//! `fence.sweep(idle_for)` and the background sweeper: the rows of keys
//! whose lease ended more than `idle_for` ago go (released, forced,
//! expired; and expired shared leases), nothing live or recent, no key
//! whose term history is kept, no row a transaction holds; G1 and G2 hold
//! with sweeps racing grants; a swept expiry still counts as an expiry;
//! only fence_admin may sweep; the worker (preload mode) sweeps on its
//! interval and a reload turns it on and off. The sweeps run in databases
//! of their own, so they never delete another test's rows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_fence_tests::*;

async fn sweep(db: &Client, idle_for: &str) -> i64 {
    db.query_one("SELECT fence.sweep($1::text::interval)", &[&idle_for])
        .await
        .unwrap()
        .get(0)
}

async fn rows_of(db: &Client, key: &str) -> i64 {
    db.query_one(
        "SELECT (SELECT count(*) FROM fence.leases WHERE lock_key = $1) \
              + (SELECT count(*) FROM fence.shared_leases WHERE lock_key = $1)",
        &[&key],
    )
    .await
    .unwrap()
    .get(0)
}

/// A lease on `key` granted and released: the key's row, idle from now.
async fn idle(db: &Client, key: &str) {
    let token = acquire(db, key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(db, key, token).await.unwrap());
}

async fn current_token(db: &Client, key: &str) -> Option<i64> {
    db.query_one("SELECT fence.current_token($1)", &[&key])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn idle_rows_go_and_live_recent_kept_and_locked_ones_stay() {
    let db = fresh_database("pg_fence_sweep_rows").await;
    db.batch_execute("CREATE EXTENSION pg_fence").await.unwrap();
    let token = |key: &'static str, ttl: &'static str| {
        let db = &db;
        async move {
            acquire(db, key, ttl, Some("h"), "0")
                .await
                .unwrap()
                .unwrap()
        }
    };
    let released = token("released", "1 minute").await;
    assert!(release(&db, "released", released).await.unwrap());
    let forced = token("forced", "1 minute").await;
    db.execute("SELECT fence.lock_force_release('forced')", &[])
        .await
        .unwrap();
    token("expired", "50 milliseconds").await;
    let live = token("live", "1 minute").await;
    let kept = token("kept", "1 minute").await;
    db.batch_execute("SELECT fence.lock_keep_history('kept')")
        .await
        .unwrap();
    assert!(release(&db, "kept", kept).await.unwrap());
    db.batch_execute(
        "SELECT fence.lock_acquire_shared('read', '50 milliseconds', 'r');
         SELECT fence.lock_acquire_shared('read-live', '1 minute', 'r')",
    )
    .await
    .unwrap();
    let held = token("held", "50 milliseconds").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A transaction holds the expired "held" row (a grant in flight would):
    // the sweep skips it rather than wait.
    let other = connect_to_database(port(), "postgres", "pg_fence_sweep_rows").await;
    other
        .batch_execute("BEGIN; SELECT FROM fence.leases WHERE lock_key = 'held' FOR UPDATE")
        .await
        .unwrap();

    // Nothing has been idle for a minute.
    assert_eq!(sweep(&db, "1 minute").await, 0);
    let started = Instant::now();
    assert_eq!(
        sweep(&db, "0").await,
        4,
        "released, forced, expired, and a reader"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it did not wait"
    );
    for key in ["released", "forced", "expired", "read"] {
        assert_eq!(rows_of(&db, key).await, 0, "{key} swept");
    }
    for key in ["live", "kept", "read-live", "held"] {
        assert_eq!(rows_of(&db, key).await, 1, "{key} stays");
    }
    assert_eq!(current_token(&db, "released").await, None);
    assert_eq!(current_token(&db, "live").await, Some(live));
    other.batch_execute("COMMIT").await.unwrap();
    assert_eq!(sweep(&db, "0").await, 1, "the held row, once let go");
    let _ = (forced, held);

    // G1: a swept key's next lease gets a token above every earlier one.
    let again = token("released", "1 minute").await;
    assert!(again > live && again > released);
    assert_eq!(current_token(&db, "released").await, Some(again));
    // The kept key's history still chains.
    let next = token("kept", "1 minute").await;
    let previous: Option<i64> = db
        .query_one(
            "SELECT previous_token FROM fence.lock_history('kept', $1)",
            &[&kept],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!((previous, next > kept), (Some(kept), true));
}

#[tokio::test]
async fn a_swept_expiry_counts_as_an_expiry() {
    let db = fresh_database("pg_fence_sweep_stats").await;
    db.batch_execute("CREATE EXTENSION pg_fence").await.unwrap();
    for key in ["sweepstat:1", "sweepstat:2"] {
        acquire(&db, key, "50 milliseconds", Some("h"), "0")
            .await
            .unwrap()
            .unwrap();
    }
    let released = acquire(&db, "sweepstat:3", "1 minute", Some("h"), "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(&db, "sweepstat:3", released).await.unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(sweep(&db, "0").await, 3);
    let (expirations, releases): (i64, i64) = {
        let row = db
            .query_one(
                "SELECT expirations, releases FROM fence.lock_stats WHERE key_class = 'sweepstat'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((expirations, releases), (2, 1));
}

#[tokio::test]
async fn only_fence_admin_may_sweep_and_bad_inputs_get_their_sqlstates() {
    let db = fresh_database("pg_fence_sweep_roles").await;
    db.batch_execute("CREATE EXTENSION pg_fence").await.unwrap();
    ensure_test_roles(&db).await;
    let alice = connect_to_database(port(), "fence_test_alice", "pg_fence_sweep_roles").await;
    let (code, message) = expect_error(&alice, "SELECT fence.sweep()").await;
    assert_eq!(code, "42501", "{message}");
    let admin = connect_to_database(port(), "fence_test_admin", "pg_fence_sweep_roles").await;
    admin.execute("SELECT fence.sweep()", &[]).await.unwrap();
    for (sql, code) in [
        ("SELECT fence.sweep(NULL)", "22004"),
        ("SELECT fence.sweep('-1 second')", "22023"),
    ] {
        assert_eq!(expect_error(&db, sql).await.0, code, "{sql}");
    }
}

/// Six sessions take four keys in turns with short leases while a seventh
/// sweeps with `idle_for => 0` as fast as it can: no key is ever held by
/// two at once (G2), no token is issued twice (G1), a held lease is never
/// swept from under its holder, and rows do go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sweeps_racing_grants_keep_g1_and_g2() {
    const DB: &str = "pg_fence_sweep_race";
    let setup = fresh_database(DB).await;
    setup
        .batch_execute("CREATE EXTENSION pg_fence")
        .await
        .unwrap();
    let keys = ["race:0", "race:1", "race:2", "race:3"];
    let holding: Arc<HashMap<&str, AtomicUsize>> =
        Arc::new(keys.iter().map(|key| (*key, AtomicUsize::new(0))).collect());
    let tokens: Arc<Mutex<HashMap<&str, Vec<i64>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut racers = Vec::new();
    for racer in 0..6 {
        let (holding, tokens, stop) = (holding.clone(), tokens.clone(), stop.clone());
        racers.push(tokio::spawn(async move {
            let client = connect_to_database(port(), "postgres", DB).await;
            let mut granted = 0;
            let mut turn = racer;
            while !stop.load(Ordering::SeqCst) {
                turn += 1;
                let key = keys[turn % keys.len()];
                let ttl = if turn % 3 == 0 {
                    "20 milliseconds"
                } else {
                    "1 minute"
                };
                let Some(token) = acquire(&client, key, ttl, None, "50 milliseconds")
                    .await
                    .unwrap()
                else {
                    continue;
                };
                granted += 1;
                tokens.lock().unwrap().entry(key).or_default().push(token);
                // A short lease is left to expire (and be swept); a long one
                // is held, counted, and released.
                if turn % 3 != 0 {
                    assert_eq!(
                        holding[key].fetch_add(1, Ordering::SeqCst),
                        0,
                        "{key} held twice"
                    );
                    assert!(
                        renew(&client, key, token).await.unwrap(),
                        "{key} lost while held"
                    );
                    holding[key].fetch_sub(1, Ordering::SeqCst);
                    assert!(release(&client, key, token).await.unwrap());
                }
            }
            granted
        }));
    }
    let sweeper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = connect_to_database(port(), "postgres", DB).await;
            let mut swept = 0;
            while !stop.load(Ordering::SeqCst) {
                swept += sweep(&client, "0").await;
            }
            swept
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let mut granted = 0;
    for racer in racers {
        granted += racer.await.unwrap();
    }
    let swept = sweeper.await.unwrap();
    assert!(granted > 100, "the race granted too little: {granted}");
    assert!(swept > 10, "the sweeps deleted too little: {swept}");
    for (key, tokens) in tokens.lock().unwrap().iter() {
        let mut sorted = tokens.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), tokens.len(), "{key}: a token issued twice");
    }
}

/// Granted in one session, so the per-key order the racers saw is the
/// order of grants: every key's tokens increase across sweeps.
#[tokio::test]
async fn a_key_swept_between_grants_still_gets_increasing_tokens() {
    let db = fresh_database("pg_fence_sweep_order").await;
    db.batch_execute("CREATE EXTENSION pg_fence").await.unwrap();
    let mut last = 0;
    for _ in 0..20 {
        let token = acquire(&db, "order", "1 minute", None, "0")
            .await
            .unwrap()
            .unwrap();
        assert!(token > last);
        last = token;
        assert!(release(&db, "order", token).await.unwrap());
        assert_eq!(sweep(&db, "0").await, 1);
        assert_eq!(current_token(&db, "order").await, None);
    }
}

/// ALTER SYSTEM, each statement on its own (it refuses a transaction
/// block), then a reload.
async fn system(db: &Client, statements: &[&str]) {
    for statement in statements.iter().chain(&["SELECT pg_reload_conf()"]) {
        db.simple_query(statement).await.unwrap();
    }
}

/// A sweep and a registration of a key's history never interleave (the
/// database's sweep lock): a registration waits for a sweep in flight and
/// then finds the key swept (so its history starts from no token), and a
/// sweep waits for a registration in flight and then leaves the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registration_and_a_sweep_never_interleave() {
    const DB: &str = "pg_fence_sweep_registration";
    let db = fresh_database(DB).await;
    db.batch_execute("CREATE EXTENSION pg_fence").await.unwrap();
    idle(&db, "swept-first").await;
    // A sweep in flight; the registration waits for it.
    let sweeper = connect_to_database(port(), "postgres", DB).await;
    sweeper
        .batch_execute("BEGIN; SELECT fence.sweep('0')")
        .await
        .unwrap();
    let registrar = connect_to_database(port(), "postgres", DB).await;
    let pid = backend_pid(&registrar).await;
    let registering = tokio::spawn(async move {
        let latest: Option<i64> = registrar
            .query_one("SELECT fence.lock_keep_history('swept-first')", &[])
            .await
            .unwrap()
            .get(0);
        (latest, registrar)
    });
    until_waiting(&db, pid).await;
    sweeper.batch_execute("COMMIT").await.unwrap();
    let (latest, registrar) = registering.await.unwrap();
    assert_eq!(
        latest, None,
        "the key was swept: its history starts from none"
    );
    let next = acquire(&db, "swept-first", "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let previous: Option<i64> = db
        .query_one(
            "SELECT previous_token FROM fence.lock_history('swept-first') WHERE token = $1",
            &[&next],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(previous, latest, "and the chain from it holds");

    // A registration in flight; the sweep waits for it, and leaves the key.
    idle(&db, "kept-first").await;
    registrar
        .batch_execute("BEGIN; SELECT fence.lock_keep_history('kept-first')")
        .await
        .unwrap();
    let pid = backend_pid(&sweeper).await;
    let sweeping = tokio::spawn(async move { sweep(&sweeper, "0").await });
    until_waiting(&db, pid).await;
    registrar.batch_execute("COMMIT").await.unwrap();
    sweeping.await.unwrap();
    assert_eq!(
        rows_of(&db, "kept-first").await,
        1,
        "a kept key is not swept"
    );
}

#[tokio::test]
async fn a_key_with_live_readers_keeps_its_row_and_a_fixed_snapshot_is_refused() {
    let db = fresh_database("pg_fence_sweep_readers").await;
    db.batch_execute("CREATE EXTENSION pg_fence").await.unwrap();
    let token = acquire(&db, "read", "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(&db, "read", token).await.unwrap());
    db.batch_execute("SELECT fence.lock_acquire_shared('read', '1 minute', 'reader')")
        .await
        .unwrap();
    assert_eq!(sweep(&db, "0").await, 0, "a live reader is a live lease");
    assert_eq!(current_token(&db, "read").await, Some(token));
    db.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let (code, message) = expect_error(&db, "SELECT fence.sweep('0')").await;
    assert_eq!(code, "25000", "{message}");
    db.batch_execute("ROLLBACK").await.unwrap();
}

const WORKER_PORT: u16 = 28825;
const WORKER_BASE: &str = "pg_fence_sweeper";

#[tokio::test]
async fn the_background_sweeper_runs_on_its_interval_and_a_reload_turns_it_off() {
    let db = fresh_side_cluster(WORKER_BASE, WORKER_PORT).await;
    db.batch_execute("ALTER SYSTEM SET fence.sweep_database = 'pg_fence'")
        .await
        .unwrap();
    drop(db);
    side_cluster("stop", WORKER_BASE, WORKER_PORT);
    side_cluster("start", WORKER_BASE, WORKER_PORT);
    let db = connect_to(WORKER_PORT, "postgres").await;
    let sweepers = |database: &'static str| {
        let db = &db;
        async move {
            count(
                db,
                &format!(
                    "SELECT count(*) FROM pg_stat_activity \
                      WHERE backend_type = 'pg_fence sweeper' AND datname IS NOT DISTINCT FROM {database}"
                ),
            )
            .await
        }
    };
    // While off it holds no connection (so it is not in pg_stat_activity).
    assert_eq!(sweepers("NULL").await + sweepers("'pg_fence'").await, 0);
    idle(&db, "idle:1").await;
    acquire(&db, "live:1", "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    // Off by default: nothing goes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rows_of(&db, "idle:1").await, 1);
    // On, by a reload: every second, anything that ended a second ago.
    system(
        &db,
        &[
            "ALTER SYSTEM SET fence.sweep_interval = 1",
            "ALTER SYSTEM SET fence.sweep_idle_for = 1",
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows_of(&db, "idle:1").await > 0 {
        assert!(
            Instant::now() < deadline,
            "the sweeper did not sweep idle:1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows_of(&db, "live:1").await, 1, "a live lease stays");
    assert_eq!(sweepers("'pg_fence'").await, 1, "connected once on");
    // A registration left open: the sweeper skips its rounds rather than
    // wait (which would queue every later registration behind it), and
    // sweeps again once it commits.
    let registrar = connect_to(WORKER_PORT, "postgres").await;
    registrar
        .batch_execute("BEGIN; SELECT fence.lock_keep_history('kept:1')")
        .await
        .unwrap();
    idle(&db, "idle:open").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        rows_of(&db, "idle:open").await,
        1,
        "skipped while it is open"
    );
    let started = Instant::now();
    db.batch_execute("SELECT fence.lock_keep_history('kept:2')")
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "another registration waited behind the sweeper"
    );
    registrar.batch_execute("COMMIT").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows_of(&db, "idle:open").await > 0 {
        assert!(Instant::now() < deadline, "not swept after the commit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Terminated, it comes back (10 s later) and sweeps again.
    let terminated: bool = db
        .query_one(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
              WHERE backend_type = 'pg_fence sweeper'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    idle(&db, "idle:3").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows_of(&db, "idle:3").await > 0 {
        assert!(
            Instant::now() < deadline,
            "the terminated sweeper did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Off again: a new idle key stays.
    system(&db, &["ALTER SYSTEM SET fence.sweep_interval = 0"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    idle(&db, "idle:2").await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(rows_of(&db, "idle:2").await, 1, "off after the reload");
    drop(db);
    side_cluster("destroy", WORKER_BASE, WORKER_PORT);
}
