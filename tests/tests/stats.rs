//! Statistics and waiters (preload mode; G8): a known workload, raced by
//! many sessions, gives exactly its counts in `fence.lock_stats`, the wait
//! histogram and `fence.protected_tables.refused_writes`; `fence.waiters`
//! shows who waits in arrival order and forgets a waiter however its wait
//! ends. Each test works in a database of its own, so its counts are its own.

use std::time::Duration;

use pg_fence_tests::*;

/// A fresh database with pg_fence, and a superuser session on it.
async fn stats_database(name: &str) -> Client {
    let db = fresh_database(name).await;
    db.batch_execute("CREATE EXTENSION pg_fence").await.unwrap();
    ensure_test_roles(&db).await;
    db
}

/// One class's row of `fence.lock_stats`, by column name.
async fn stats(db: &Client, class: &str) -> tokio_postgres::Row {
    db.query_one(
        "SELECT * FROM fence.lock_stats WHERE key_class = $1",
        &[&class],
    )
    .await
    .unwrap_or_else(|e| panic!("no statistics for class {class}: {e}"))
}

fn counter(row: &tokio_postgres::Row, column: &str) -> i64 {
    row.get(column)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_are_exact_with_many_sessions_racing() {
    const DB: &str = "pg_fence_stats_exact";
    const SESSIONS: usize = 8;
    const ROUNDS: usize = 150;
    let db = stats_database(DB).await;
    // Eight sessions race for three keys of one class: acquire without
    // waiting; on a grant, renew, then release. Each tallies what it saw.
    let mut tasks = Vec::new();
    for session in 0..SESSIONS {
        tasks.push(tokio::spawn(async move {
            let client = connect_to_database(port(), "postgres", DB).await;
            let (mut grants, mut busy, mut renewals, mut releases) = (0i64, 0i64, 0i64, 0i64);
            for round in 0..ROUNDS {
                let key = format!("race:{}", (session + round) % 3);
                match acquire(&client, &key, "1 minute", None, "0").await.unwrap() {
                    Some(token) => {
                        grants += 1;
                        assert!(renew(&client, &key, token).await.unwrap());
                        renewals += 1;
                        assert!(release(&client, &key, token).await.unwrap());
                        releases += 1;
                    }
                    None => busy += 1,
                }
            }
            (grants, busy, renewals, releases)
        }));
    }
    let (mut grants, mut busy, mut renewals, mut releases) = (0, 0, 0, 0);
    for task in tasks {
        let (g, b, r, l) = task.await.unwrap();
        grants += g;
        busy += b;
        renewals += r;
        releases += l;
    }
    assert!(
        grants > 0 && busy > 0,
        "the sessions did race: {grants} grants, {busy} busy"
    );
    let row = stats(&db, "race").await;
    assert_eq!(counter(&row, "acquires"), (SESSIONS * ROUNDS) as i64);
    assert_eq!(counter(&row, "grants"), grants);
    assert_eq!(counter(&row, "busy"), busy);
    // Without waiting, every call that found the key held returned NULL.
    assert_eq!(counter(&row, "contended"), busy);
    assert_eq!(counter(&row, "timeouts"), 0);
    assert_eq!(counter(&row, "renewals"), renewals);
    assert_eq!(counter(&row, "releases"), releases);
    for column in [
        "regrants",
        "renewals_lost",
        "releases_lost",
        "forced",
        "expirations",
        "stale_writes",
    ] {
        assert_eq!(counter(&row, column), 0, "{column}");
    }
    let hold: f64 = row.get("hold_seconds_total");
    assert!(hold > 0.0);
    // The histogram counts every call once: cumulative, ending at acquires.
    let buckets = db
        .query(
            "SELECT le, count FROM fence.lock_wait_histogram WHERE key_class = 'race' ORDER BY le",
            &[],
        )
        .await
        .unwrap();
    let counts: Vec<i64> = buckets.iter().map(|row| row.get(1)).collect();
    assert!(
        counts.windows(2).all(|pair| pair[0] <= pair[1]),
        "{counts:?}"
    );
    let last: f64 = buckets.last().unwrap().get(0);
    assert!(last.is_infinite());
    assert_eq!(*counts.last().unwrap(), (SESSIONS * ROUNDS) as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waits_timeouts_regrants_expiries_and_losses_count_as_they_happened() {
    const DB: &str = "pg_fence_stats_kinds";
    let db = stats_database(DB).await;
    let holder = connect_to_database(port(), "postgres", DB).await;
    let other = connect_to_database(port(), "postgres", DB).await;
    // A lease of 300 ms; one waiter gives up after 50 ms, the next waits
    // for the expiry and gets the key.
    let first = acquire(&holder, "exp:a", "300 milliseconds", Some("h"), "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        acquire(&other, "exp:a", "1 minute", None, "50 milliseconds")
            .await
            .unwrap(),
        None
    );
    let second = acquire(&other, "exp:a", "1 minute", Some("o"), "5 seconds")
        .await
        .unwrap()
        .unwrap();
    assert!(second > first);
    // The expired lease's owner finds it gone.
    assert!(!renew(&holder, "exp:a", first).await.unwrap());
    assert!(!release(&holder, "exp:a", first).await.unwrap());
    // A retry by the same holder extends the live lease (G6): a regrant.
    let again = acquire(&other, "exp:a", "1 minute", Some("o"), "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, second);
    // Forced by an admin.
    let admin = connect_to_database(port(), "fence_test_admin", DB).await;
    let forced: bool = admin
        .query_one("SELECT fence.lock_force_release('exp:a')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(forced);

    let row = stats(&db, "exp").await;
    let expected = [
        ("acquires", 4),
        ("grants", 2),
        ("regrants", 1),
        ("contended", 2),
        ("busy", 1),
        ("timeouts", 1),
        ("renewals", 0),
        ("renewals_lost", 1),
        ("releases", 0),
        ("releases_lost", 1),
        ("forced", 1),
        ("expirations", 1),
    ];
    for (column, value) in expected {
        assert_eq!(counter(&row, column), value, "{column}");
    }
    // The waits: one of about 50 ms, one until the expiry (about 250 ms).
    let total: f64 = row.get("wait_seconds_total");
    let max: f64 = row.get("wait_seconds_max");
    assert!((0.2..5.0).contains(&max), "longest wait {max}");
    assert!(total >= max + 0.05, "total {total}, longest {max}");
    // Held: the expired lease exactly its ttl (grant to expiry), plus the
    // forced one from its grant to the force.
    let hold: f64 = row.get("hold_seconds_total");
    assert!(hold > 0.3 && hold < 10.0, "held {hold}");
    let le_10ms: i64 = db
        .query_one(
            "SELECT count FROM fence.lock_wait_histogram WHERE key_class = 'exp' AND le = 0.025",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        le_10ms, 2,
        "the first grant and the regrant answered at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_writes_count_under_their_class_and_their_table() {
    const DB: &str = "pg_fence_stats_refused";
    let db = stats_database(DB).await;
    db.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, fence_token bigint, balance int);
         SELECT fence.protect('accounts', key_column => 'id', key_prefix => 'acct:', token_column => 'fence_token');
         CREATE TABLE ledger (id int, fence_token bigint) PARTITION BY RANGE (id);
         CREATE TABLE ledger_low PARTITION OF ledger FOR VALUES FROM (0) TO (100);
         CREATE TABLE ledger_high PARTITION OF ledger FOR VALUES FROM (100) TO (200);
         SELECT fence.protect('ledger', lock_key => 'book:all', token_column => 'fence_token');",
    )
    .await
    .unwrap();
    let token = acquire(&db, "acct:1", "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    db.execute("INSERT INTO accounts VALUES (1, $1, 0)", &[&token])
        .await
        .unwrap();
    for stale in [token - 1, 0, token + 1] {
        let (state, _) =
            expect_error(&db, &format!("INSERT INTO accounts VALUES (2, {stale}, 0)")).await;
        assert_eq!(state, "FN001");
    }
    let (state, _) = expect_error(&db, "UPDATE accounts SET balance = 5 WHERE id = 1").await;
    assert_eq!(state, "FN001", "an UPDATE that presents no token");
    for row in [5, 150] {
        let (state, _) = expect_error(&db, &format!("INSERT INTO ledger VALUES ({row}, 1)")).await;
        assert_eq!(state, "FN001");
    }
    assert_eq!(counter(&stats(&db, "acct").await, "stale_writes"), 4);
    assert_eq!(counter(&stats(&db, "book").await, "stale_writes"), 2);
    let refused = |table: &'static str| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT refused_writes FROM fence.protected_tables WHERE tbl = $1::text::regclass",
                &[&table],
            )
            .await
            .unwrap()
            .get::<_, Option<i64>>(0)
        }
    };
    assert_eq!(refused("accounts").await, Some(4));
    // The partitions' refusals count for the table fence.protect() fenced.
    assert_eq!(refused("ledger").await, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_needs_fence_admin_and_zeroes_only_its_database() {
    let db = stats_database("pg_fence_stats_reset_a").await;
    let other = stats_database("pg_fence_stats_reset_b").await;
    for client in [&db, &other] {
        acquire(client, "reset:1", "1 minute", None, "0")
            .await
            .unwrap()
            .unwrap();
    }
    let alice = connect_to_database(port(), "fence_test_alice", "pg_fence_stats_reset_a").await;
    let (state, message) = expect_error(&alice, "SELECT fence.lock_stats_reset()").await;
    assert_eq!(state, "42501", "{message}");
    assert_eq!(counter(&stats(&db, "reset").await, "acquires"), 1);
    let admin = connect_to_database(port(), "fence_test_admin", "pg_fence_stats_reset_a").await;
    admin
        .batch_execute("SELECT fence.lock_stats_reset()")
        .await
        .unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM fence.lock_stats").await, 0);
    assert_eq!(counter(&stats(&other, "reset").await, "acquires"), 1);
    // Counting starts again, from the reset.
    acquire(&db, "reset:2", "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let row = stats(&db, "reset").await;
    assert_eq!(counter(&row, "acquires"), 1);
    let since: std::time::SystemTime = row.get("stats_reset");
    assert!(since.elapsed().unwrap() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn track_stats_off_counts_nothing() {
    let db = stats_database("pg_fence_stats_off").await;
    db.batch_execute("SET fence.track_stats = off")
        .await
        .unwrap();
    let token = acquire(&db, "quiet:1", "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(&db, "quiet:1", token).await.unwrap());
    assert_eq!(count(&db, "SELECT count(*) FROM fence.lock_stats").await, 0);
    let alice = connect_to_database(port(), "fence_test_alice", "pg_fence_stats_off").await;
    let (state, _) = expect_error(&alice, "SET fence.track_stats = off").await;
    assert_eq!(state, "42501", "only a superuser switches statistics off");
}

/// The waiters of `key`, in queue order: (pid, position).
async fn queue(db: &Client, key: &str) -> Vec<(i32, i64)> {
    db.query(
        "SELECT pid, position FROM fence.waiters WHERE lock_key = $1 ORDER BY position",
        &[&key],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_listed_in_arrival_order_and_leave_however_their_wait_ends() {
    const DB: &str = "pg_fence_stats_waiters";
    let db = stats_database(DB).await;
    let key = "queue:1";
    acquire(&db, key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    // Four waiters, each queued before the next starts: one will be
    // cancelled, one terminated, one time out, one granted.
    let mut pids = Vec::new();
    let mut calls = Vec::new();
    for (i, wait) in ["30 seconds", "30 seconds", "2 seconds", "30 seconds"]
        .into_iter()
        .enumerate()
    {
        let role = if i == 3 {
            "fence_test_alice"
        } else {
            "postgres"
        };
        let client = connect_to_database(port(), role, DB).await;
        let pid = backend_pid(&client).await;
        calls.push(tokio::spawn(async move {
            let outcome = acquire(&client, key, "1 minute", None, wait).await;
            (client, outcome)
        }));
        until_listed(&db, pid, true).await;
        pids.push(pid);
    }
    let expected: Vec<(i32, i64)> = pids.iter().copied().zip(1..).collect();
    assert_eq!(queue(&db, key).await, expected);
    let row = db
        .query_one(
            "SELECT role::text, mode, wait_until > waiting_since + interval '29 seconds' FROM fence.waiters WHERE pid = $1",
            &[&pids[3]],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "fence_test_alice");
    assert_eq!(row.get::<_, String>(1), "exclusive");
    assert!(row.get::<_, bool>(2), "wait_until is the end of its wait");

    // Cancelled: gone, and the ones behind move up.
    db.execute("SELECT pg_cancel_backend($1)", &[&pids[0]])
        .await
        .unwrap();
    until_listed(&db, pids[0], false).await;
    assert_eq!(
        queue(&db, key).await,
        vec![(pids[1], 1), (pids[2], 2), (pids[3], 3)]
    );
    // Terminated (FATAL): gone.
    db.execute("SELECT pg_terminate_backend($1)", &[&pids[1]])
        .await
        .unwrap();
    until_listed(&db, pids[1], false).await;
    // Timed out: gone.
    until_listed(&db, pids[2], false).await;
    assert_eq!(queue(&db, key).await, vec![(pids[3], 1)]);
    // Granted once the key is free: gone.
    db.batch_execute(&format!(
        "SELECT fence.lock_release('{key}', (SELECT token FROM fence.locks WHERE lock_key = '{key}'))"
    ))
    .await
    .unwrap();
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.unwrap().1);
    }
    assert_eq!(
        sqlstate(outcomes[0].as_ref().unwrap_err()).as_deref(),
        Some("57014")
    );
    assert!(outcomes[1].is_err(), "terminated");
    assert_eq!(outcomes[2].as_ref().unwrap(), &None);
    assert!(outcomes[3].as_ref().unwrap().is_some());
    assert!(queue(&db, key).await.is_empty());
    let row = stats(&db, "queue").await;
    // The cancelled and terminated calls failed: they count nothing.
    assert_eq!(counter(&row, "acquires"), 3);
    assert_eq!(counter(&row, "timeouts"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_write_with_a_key_longer_than_a_lease_key_is_fn001_and_counted() {
    const DB: &str = "pg_fence_stats_long_key";
    let db = stats_database(DB).await;
    db.batch_execute(
        "CREATE TABLE notes (id text PRIMARY KEY, v int);
         SELECT fence.protect('notes', key_column => 'id');",
    )
    .await
    .unwrap();
    // The key is the column's value: 2000 bytes, more than any lease's key,
    // so no lease can be live for it.
    let (state, message) =
        expect_error(&db, "INSERT INTO notes VALUES (repeat('y', 2000), 1)").await;
    assert_eq!(state, "FN001", "{message}");
    // Counted under its class, cut to the longest key.
    let class = "y".repeat(1024);
    assert_eq!(counter(&stats(&db, &class).await, "stale_writes"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiries_and_hold_times_count_only_when_the_ending_transaction_commits() {
    const DB: &str = "pg_fence_stats_rollback";
    let db = stats_database(DB).await;
    let expired = |row: &tokio_postgres::Row| -> (i64, f64) {
        (row.get("expirations"), row.get("hold_seconds_total"))
    };
    acquire(&db, "roll:1", "100 milliseconds", Some("a"), "0")
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Two grants that take over the expired lease roll back (one of them to
    // a savepoint): they ended nothing.
    db.batch_execute(
        "BEGIN; SELECT fence.lock_acquire('roll:1', '10 seconds', 'b'); ROLLBACK;
         BEGIN; SAVEPOINT s; SELECT fence.lock_acquire('roll:1', '10 seconds', 'c');
                ROLLBACK TO SAVEPOINT s; COMMIT;",
    )
    .await
    .unwrap();
    assert_eq!(expired(&stats(&db, "roll").await), (0, 0.0));
    // A grant that commits (inside a released savepoint) ended it: once,
    // after exactly its ttl.
    db.batch_execute(
        "BEGIN; SAVEPOINT s; SELECT fence.lock_acquire('roll:1', '10 seconds', 'd');
                RELEASE SAVEPOINT s; COMMIT;",
    )
    .await
    .unwrap();
    assert_eq!(expired(&stats(&db, "roll").await), (1, 0.1));
    // A release that rolls back ended nothing either; the one that commits
    // counts the hold time.
    let token = live_token(&db, "roll:1").await.unwrap();
    db.batch_execute(&format!(
        "BEGIN; SELECT fence.lock_release('roll:1', {token}); ROLLBACK;"
    ))
    .await
    .unwrap();
    assert_eq!(expired(&stats(&db, "roll").await), (1, 0.1));
    assert!(release(&db, "roll:1", token).await.unwrap());
    let (expirations, hold) = expired(&stats(&db, "roll").await);
    assert_eq!(expirations, 1);
    assert!(hold > 0.1, "the released lease's time counted: {hold}");
    // The calls themselves counted as they returned, committed or not.
    let row = stats(&db, "roll").await;
    assert_eq!((counter(&row, "grants"), counter(&row, "releases")), (4, 2));
}
