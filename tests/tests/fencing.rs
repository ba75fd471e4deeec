//! G3, fenced writes: a write to a protected table is accepted only with the
//! token of the key's live lease, and from that check until the writing
//! transaction ends no newer lease on the key can be granted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use pg_fence_tests::*;

/// A table with rows 1..=3 (account_id = id), fenced by one key for the
/// whole table, or per row on `account:<account_id>` with a token column.
async fn fenced_table(db: &Client, per_row: bool) -> (String, String) {
    let table = unique_table("fenced");
    let key = unique_key("tablekey");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, account_id int, amount numeric NOT NULL DEFAULT 0, fence_token bigint);
         INSERT INTO {table} (id, account_id) VALUES (1, 1), (2, 2), (3, 3);"
    ))
    .await
    .unwrap();
    let protect = if per_row {
        format!("SELECT fence.protect('{table}', key_column => 'account_id', key_prefix => '{key}:', token_column => 'fence_token')")
    } else {
        format!("SELECT fence.protect('{table}', lock_key => '{key}')")
    };
    db.batch_execute(&protect).await.unwrap();
    (table, key)
}

async fn amount(db: &Client, table: &str, id: i32) -> String {
    db.query_one(
        &format!("SELECT amount::text FROM {table} WHERE id = $1"),
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

/// Sleep on the server's clock until the lease on `key` has expired.
async fn outlive_lease(db: &Client, key: &str) {
    db.execute(
        "SELECT pg_sleep(GREATEST(0, extract(epoch FROM (SELECT expires_at FROM fence.leases WHERE lock_key = $1) - clock_timestamp())) + 0.05)",
        &[&key],
    )
    .await
    .unwrap();
}

/// Run `sql` in a transaction with `SET LOCAL fence.token`.
async fn fenced_write(db: &Client, token: i64, sql: &str) -> Result<u64, Error> {
    db.batch_execute(&format!("BEGIN; SET LOCAL fence.token = '{token}'"))
        .await?;
    match db.execute(sql, &[]).await {
        Ok(rows) => {
            db.batch_execute("COMMIT").await?;
            Ok(rows)
        }
        Err(error) => {
            db.batch_execute("ROLLBACK").await?;
            Err(error)
        }
    }
}

/// Open a transaction on `writer` carrying `token` and update row 1: the
/// check has passed and its key lock is held until COMMIT or ROLLBACK.
async fn open_fenced_write(writer: &Client, table: &str, token: i64) {
    writer
        .batch_execute(&format!("BEGIN; SET LOCAL fence.token = '{token}'"))
        .await
        .unwrap();
    writer
        .execute(&format!("UPDATE {table} SET amount = 7 WHERE id = 1"), &[])
        .await
        .unwrap();
}

fn assert_fn001(error: &Error) -> String {
    assert_eq!(sqlstate(error).as_deref(), Some("FN001"), "{error}");
    error.as_db_error().unwrap().message().to_owned()
}

#[tokio::test]
async fn a_writer_that_passed_its_check_holds_off_a_new_acquire_until_it_ends() {
    let setup = connect().await;
    for finish in ["COMMIT", "ROLLBACK"] {
        let (table, key) = fenced_table(&setup, false).await;
        let holder = connect().await;
        let writer = connect().await;
        let other = connect().await;
        let token = acquire(&holder, &key, "400 milliseconds", Some("a"), "0")
            .await
            .unwrap()
            .unwrap();

        open_fenced_write(&writer, &table, token).await;

        // The lease expires while the writing transaction is open...
        outlive_lease(&setup, &key).await;
        assert_eq!(live_token(&setup, &key).await, None, "expired");
        // ...but no new lease is granted until the writer ends.
        assert_eq!(
            acquire(&other, &key, "30 seconds", Some("b"), "0")
                .await
                .unwrap(),
            None,
            "{finish}"
        );
        let k = key.clone();
        let other_pid = backend_pid(&other).await;
        let waiting = tokio::spawn(async move {
            acquire(&other, &k, "30 seconds", Some("b"), "10 seconds").await
        });
        until_waiting(&setup, other_pid).await;
        assert!(
            !waiting.is_finished(),
            "{finish}: acquire must wait for the writer"
        );

        writer.batch_execute(finish).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("granted once the writer ended");
        assert!(next.unwrap().unwrap().unwrap() > token);
        let expected = if finish == "COMMIT" { "7" } else { "0" };
        assert_eq!(amount(&setup, &table, 1).await, expected);
    }
}

#[tokio::test]
async fn renew_and_release_do_not_wait_for_a_fenced_writer() {
    let setup = connect().await;
    let (table, key) = fenced_table(&setup, false).await;
    let holder = connect().await;
    let writer = connect().await;
    let token = acquire(&holder, &key, "30 seconds", Some("a"), "0")
        .await
        .unwrap()
        .unwrap();
    open_fenced_write(&writer, &table, token).await;
    let quick = Duration::from_secs(5);
    assert!(tokio::time::timeout(quick, renew(&holder, &key, token))
        .await
        .expect("renew does not block")
        .unwrap());
    assert!(tokio::time::timeout(quick, release(&holder, &key, token))
        .await
        .expect("release does not block")
        .unwrap());
    // Released, but the writer's check still holds off a new grant.
    assert_eq!(
        acquire(&holder, &key, "30 seconds", Some("b"), "0")
            .await
            .unwrap(),
        None
    );
    writer.batch_execute("COMMIT").await.unwrap();
    assert!(acquire(&holder, &key, "30 seconds", Some("b"), "0")
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn the_holders_retry_is_not_turned_away_by_its_own_write_in_flight() {
    let setup = connect().await;
    let (table, key) = fenced_table(&setup, false).await;
    let holder = connect().await;
    let writer = connect().await;
    let token = acquire(&holder, &key, "30 seconds", Some("worker-1"), "0")
        .await
        .unwrap()
        .unwrap();
    open_fenced_write(&writer, &table, token).await;
    // G6 while the holder's own write holds the lease row's share lock.
    let again = tokio::time::timeout(
        Duration::from_secs(5),
        acquire(&holder, &key, "30 seconds", Some("worker-1"), "0"),
    )
    .await
    .expect("does not wait for the writer")
    .unwrap();
    assert_eq!(again, Some(token));
    writer.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn after_a_takeover_the_old_token_is_refused_and_nothing_is_written() {
    let setup = connect().await;
    let (table, key_prefix) = fenced_table(&setup, true).await;
    let key = format!("{key_prefix}:1");
    let worker_a = connect().await;
    let worker_b = connect().await;
    let old = acquire(&worker_a, &key, "300 milliseconds", Some("a"), "0")
        .await
        .unwrap()
        .unwrap();
    outlive_lease(&setup, &key).await;
    let new = acquire(&worker_b, &key, "30 seconds", Some("b"), "0")
        .await
        .unwrap()
        .unwrap();

    let error = worker_a
        .execute(
            &format!("UPDATE {table} SET amount = 100, fence_token = $1 WHERE id = 1"),
            &[&old],
        )
        .await
        .unwrap_err();
    let message = assert_fn001(&error);
    for part in [
        table.as_str(),
        key.as_str(),
        &old.to_string(),
        &new.to_string(),
    ] {
        assert!(message.contains(part), "message names {part}: {message}");
    }
    assert_eq!(amount(&setup, &table, 1).await, "0", "nothing written");

    worker_b
        .execute(
            &format!("UPDATE {table} SET amount = 42, fence_token = $1 WHERE id = 1"),
            &[&new],
        )
        .await
        .unwrap();
    assert_eq!(amount(&setup, &table, 1).await, "42");
    // A live token may not lower the row's token column either: here the row
    // carries a larger token written while the fence was off.
    setup
        .batch_execute(&format!(
            "ALTER TABLE {table} DISABLE TRIGGER zz_fence_guard;
             UPDATE {table} SET fence_token = {} WHERE id = 1;
             ALTER TABLE {table} ENABLE ALWAYS TRIGGER zz_fence_guard;",
            new + 1000
        ))
        .await
        .unwrap();
    let error = worker_b
        .execute(
            &format!("UPDATE {table} SET amount = 43, fence_token = $1 WHERE id = 1"),
            &[&new],
        )
        .await
        .unwrap_err();
    assert!(assert_fn001(&error).contains("lower"));
    assert_eq!(amount(&setup, &table, 1).await, "42");
}

#[tokio::test]
async fn expired_and_released_leases_are_refused() {
    let setup = connect().await;
    let (table, key) = fenced_table(&setup, false).await;
    let db = connect().await;
    let token = acquire(&db, &key, "300 milliseconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    outlive_lease(&setup, &key).await;
    let error = fenced_write(&db, token, &format!("UPDATE {table} SET amount = 1"))
        .await
        .unwrap_err();
    assert!(assert_fn001(&error).contains("no live lease"));

    let token = acquire(&db, &key, "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        fenced_write(&db, token, &format!("UPDATE {table} SET amount = 2"))
            .await
            .unwrap(),
        3
    );
    assert!(release(&db, &key, token).await.unwrap());
    let error = fenced_write(&db, token, &format!("UPDATE {table} SET amount = 3"))
        .await
        .unwrap_err();
    assert!(assert_fn001(&error).contains("no live lease"));
    assert_eq!(amount(&setup, &table, 2).await, "2");

    // No token at all.
    let error = db
        .execute(&format!("UPDATE {table} SET amount = 4"), &[])
        .await
        .unwrap_err();
    assert!(assert_fn001(&error).contains("carries none"));
    // A token that is not a number is a clear error too.
    let error = fenced_write(
        &db,
        0,
        &format!("SET LOCAL fence.token = 'x'; UPDATE {table} SET amount = 5"),
    )
    .await;
    assert!(error.is_err());
}

#[tokio::test]
async fn per_row_keys_the_holder_of_one_account_cannot_write_another() {
    let setup = connect().await;
    let (table, prefix) = fenced_table(&setup, true).await;
    let db = connect().await;
    let token = acquire(&db, &format!("{prefix}:1"), "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    db.execute(
        &format!("UPDATE {table} SET amount = 1, fence_token = $1 WHERE id = 1"),
        &[&token],
    )
    .await
    .unwrap();
    let error = db
        .execute(
            &format!("UPDATE {table} SET amount = 1, fence_token = $1 WHERE id = 2"),
            &[&token],
        )
        .await
        .unwrap_err();
    assert!(assert_fn001(&error).contains(&format!("{prefix}:2")));
    // Moving row 1 to account 2 would need both leases.
    let error = db
        .execute(
            &format!("UPDATE {table} SET account_id = 2, fence_token = $1 WHERE id = 1"),
            &[&token],
        )
        .await
        .unwrap_err();
    assert_fn001(&error);
    // A NULL key has no lease.
    let error = db
        .execute(
            &format!("INSERT INTO {table} (id, account_id, fence_token) VALUES (9, NULL, $1)"),
            &[&token],
        )
        .await
        .unwrap_err();
    assert!(assert_fn001(&error).contains("NULL"));
    assert_eq!(amount(&setup, &table, 2).await, "0");
}

#[tokio::test]
async fn delete_uses_set_local_fence_token() {
    let setup = connect().await;
    for per_row in [false, true] {
        let (table, key) = fenced_table(&setup, per_row).await;
        let key = if per_row { format!("{key}:1") } else { key };
        let db = connect().await;
        let token = acquire(&db, &key, "30 seconds", None, "0")
            .await
            .unwrap()
            .unwrap();
        let error = db
            .execute(&format!("DELETE FROM {table} WHERE id = 1"), &[])
            .await
            .unwrap_err();
        assert_fn001(&error);
        assert_eq!(
            fenced_write(&db, token, &format!("DELETE FROM {table} WHERE id = 1"))
                .await
                .unwrap(),
            1
        );
        let left: i64 = setup
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 2);
    }
}

#[tokio::test]
async fn a_multi_row_update_with_one_unheld_key_writes_nothing() {
    let setup = connect().await;
    let (table, prefix) = fenced_table(&setup, true).await;
    let db = connect().await;
    let t1 = acquire(&db, &format!("{prefix}:1"), "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    let t2 = acquire(&db, &format!("{prefix}:2"), "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    let update = format!(
        "UPDATE {table} SET amount = amount + 1, fence_token = CASE account_id WHEN 1 THEN $1::bigint WHEN 2 THEN $2::bigint ELSE $2::bigint END"
    );
    let error = db.execute(&update, &[&t1, &t2]).await.unwrap_err();
    assert!(assert_fn001(&error).contains(&format!("{prefix}:3")));
    for id in 1..=3 {
        assert_eq!(amount(&setup, &table, id).await, "0", "row {id} untouched");
    }
    let t3 = acquire(&db, &format!("{prefix}:3"), "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    let update = format!(
        "UPDATE {table} SET amount = amount + 1, fence_token = CASE account_id WHEN 1 THEN $1::bigint WHEN 2 THEN $2::bigint ELSE $3::bigint END"
    );
    assert_eq!(db.execute(&update, &[&t1, &t2, &t3]).await.unwrap(), 3);
}

#[tokio::test]
async fn insert_on_conflict_do_update_is_checked_on_both_paths() {
    let setup = connect().await;
    let (table, prefix) = fenced_table(&setup, true).await;
    let db = connect().await;
    let t1 = acquire(&db, &format!("{prefix}:1"), "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    let t4 = acquire(&db, &format!("{prefix}:4"), "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    let upsert = format!(
        "INSERT INTO {table} (id, account_id, amount, fence_token) VALUES ($1, $2, 5, $3)
         ON CONFLICT (id) DO UPDATE SET amount = {table}.amount + EXCLUDED.amount, fence_token = EXCLUDED.fence_token"
    );
    // Insert path: a new row for account 4.
    db.execute(&upsert, &[&4i32, &4i32, &t4]).await.unwrap();
    // Update path, with the right token.
    db.execute(&upsert, &[&1i32, &1i32, &t1]).await.unwrap();
    assert_eq!(amount(&setup, &table, 1).await, "5");
    // Update path with a token for another key: refused, nothing written.
    let error = db.execute(&upsert, &[&1i32, &1i32, &t4]).await.unwrap_err();
    assert_fn001(&error);
    // Insert path for an account nobody holds: refused.
    let error = db.execute(&upsert, &[&5i32, &5i32, &t4]).await.unwrap_err();
    assert_fn001(&error);
    assert_eq!(amount(&setup, &table, 1).await, "5");
}

#[tokio::test]
async fn copy_from_goes_through_the_check() {
    let setup = connect().await;
    let (table, prefix) = fenced_table(&setup, true).await;
    let db = connect().await;
    let t7 = acquire(&db, &format!("{prefix}:7"), "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();

    let copy = |rows: String| {
        let db = &db;
        let table = table.clone();
        async move {
            let sink = db
                .copy_in(&format!(
                    "COPY {table} (id, account_id, amount, fence_token) FROM STDIN"
                ))
                .await?;
            futures_util::pin_mut!(sink);
            sink.send(Bytes::from(rows)).await?;
            sink.finish().await
        }
    };
    assert_eq!(
        copy(format!("10\t7\t1\t{t7}\n11\t7\t2\t{t7}\n"))
            .await
            .unwrap(),
        2
    );
    // One row for an account nobody holds: the whole COPY is refused.
    let error = copy(format!("12\t7\t1\t{t7}\n13\t8\t1\t{t7}\n"))
        .await
        .unwrap_err();
    assert_fn001(&error);
    let copied: i64 = setup
        .query_one(&format!("SELECT count(*) FROM {table} WHERE id >= 10"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(copied, 2);
}

#[tokio::test]
async fn session_replication_role_replica_does_not_bypass_the_fence() {
    let setup = connect().await;
    let (table, _key) = fenced_table(&setup, false).await;
    let db = connect().await;
    db.batch_execute("SET session_replication_role = replica")
        .await
        .unwrap();
    let error = db
        .execute(&format!("UPDATE {table} SET amount = 1"), &[])
        .await
        .unwrap_err();
    assert_fn001(&error);
    let enforced: bool = setup
        .query_one(
            "SELECT enforced FROM fence.protected_tables WHERE tbl = $1::text::regclass",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert!(enforced);
}

#[tokio::test]
async fn truncate_is_refused_unless_fence_admin() {
    let setup = connect().await;
    ensure_test_roles(&setup).await;
    let (table, _key) = fenced_table(&setup, false).await;
    setup
        .batch_execute(&format!(
            "GRANT TRUNCATE ON {table} TO fence_test_bob, fence_test_admin"
        ))
        .await
        .unwrap();
    let bob = connect_as("fence_test_bob").await;
    let (state, message) = expect_error(&bob, &format!("TRUNCATE {table}")).await;
    assert_eq!(state, "42501", "{message}");
    assert!(message.contains(&table), "{message}");
    let count: i64 = setup
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 3);
    let admin = connect_as("fence_test_admin").await;
    admin
        .batch_execute(&format!("TRUNCATE {table}"))
        .await
        .unwrap();
    let count: i64 = setup
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0);
}

#[tokio::test]
async fn fenced_writes_under_each_isolation_level() {
    let setup = connect().await;
    for level in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"] {
        let (table, key) = fenced_table(&setup, false).await;
        let db = connect().await;
        let token = acquire(&db, &key, "30 seconds", None, "0")
            .await
            .unwrap()
            .unwrap();
        // The live token: accepted.
        db.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL {level}; SET LOCAL fence.token = '{token}'"
        ))
        .await
        .unwrap();
        db.execute(&format!("UPDATE {table} SET amount = 1 WHERE id = 1"), &[])
            .await
            .unwrap();
        db.batch_execute("COMMIT").await.unwrap();
        assert_eq!(amount(&setup, &table, 1).await, "1", "{level}");
        // A wrong token: refused.
        db.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL {level}; SET LOCAL fence.token = '{}'",
            token + 1000
        ))
        .await
        .unwrap();
        assert_fn001(
            &db.execute(&format!("UPDATE {table} SET amount = 2 WHERE id = 1"), &[])
                .await
                .unwrap_err(),
        );
        db.batch_execute("ROLLBACK").await.unwrap();
        // Taken over after this transaction's snapshot: still refused, by
        // FN001 or, where the snapshot cannot tell, a serialization failure.
        db.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL {level}; SET LOCAL fence.token = '{token}'"
        ))
        .await
        .unwrap();
        db.batch_execute("SELECT 1").await.unwrap();
        let forced: bool = setup
            .query_one("SELECT fence.lock_force_release($1)", &[&key])
            .await
            .unwrap()
            .get(0);
        assert!(forced);
        assert!(acquire(&setup, &key, "30 seconds", None, "0")
            .await
            .unwrap()
            .is_some());
        let error = db
            .execute(&format!("UPDATE {table} SET amount = 3 WHERE id = 1"), &[])
            .await
            .unwrap_err();
        let state = sqlstate(&error).unwrap();
        assert!(state == "FN001" || state == "40001", "{level}: {error}");
        db.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(amount(&setup, &table, 1).await, "1", "{level}");
    }
}

/// Workers take turns on one key and increment a counter; a zombie keeps
/// writing with a token it once held. Every honest write lands, no zombie
/// write does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_workers_and_a_zombie() {
    let setup = connect().await;
    let (table, key) = fenced_table(&setup, false).await;
    let zombie = connect().await;
    let stale = acquire(&zombie, &key, "30 seconds", Some("zombie"), "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(&zombie, &key, stale).await.unwrap());

    let zombie_wins = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicUsize::new(0));
    let zombie_task = {
        let (table, zombie_wins, stop) = (table.clone(), zombie_wins.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tries = 0;
            while stop.load(Ordering::SeqCst) == 0 {
                tries += 1;
                if fenced_write(
                    &zombie,
                    stale,
                    &format!("UPDATE {table} SET amount = amount + 1000 WHERE id = 1"),
                )
                .await
                .is_ok()
                {
                    zombie_wins.fetch_add(1, Ordering::SeqCst);
                }
            }
            tries
        })
    };
    let mut workers = Vec::new();
    for w in 0..6 {
        let (table, key) = (table.clone(), key.clone());
        workers.push(tokio::spawn(async move {
            let db = connect().await;
            for _ in 0..10 {
                let token = acquire(
                    &db,
                    &key,
                    "30 seconds",
                    Some(&format!("w{w}")),
                    "20 seconds",
                )
                .await
                .unwrap()
                .unwrap();
                fenced_write(
                    &db,
                    token,
                    &format!("UPDATE {table} SET amount = amount + 1 WHERE id = 1"),
                )
                .await
                .unwrap();
                assert!(release(&db, &key, token).await.unwrap());
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    stop.store(1, Ordering::SeqCst);
    let tries = zombie_task.await.unwrap();
    assert!(tries > 0);
    assert_eq!(zombie_wins.load(Ordering::SeqCst), 0);
    assert_eq!(amount(&setup, &table, 1).await, "60");
}

#[tokio::test]
async fn protect_checks_its_arguments_and_the_caller() {
    let setup = connect().await;
    ensure_test_roles(&setup).await;
    let table = unique_table("protect");
    setup
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text, fence_token bigint, small_token int);
             CREATE VIEW {table}_v AS SELECT * FROM {table};
             GRANT ALL ON {table} TO fence_test_bob;"
        ))
        .await
        .unwrap();
    let cases = [
        ("SELECT fence.protect(NULL, lock_key => 'k')".to_owned(), "22004"),
        (format!("SELECT fence.protect('{table}')"), "22023"),
        (format!("SELECT fence.protect('{table}', lock_key => 'k', key_column => 'id')"), "22023"),
        (format!("SELECT fence.protect('{table}', lock_key => '')"), "22023"),
        (format!("SELECT fence.protect('{table}', key_column => 'nope')"), "42703"),
        (format!("SELECT fence.protect('{table}', key_column => 'id', token_column => 'nope')"), "42703"),
        (format!("SELECT fence.protect('{table}', key_column => 'id', token_column => 'small_token')"), "42804"),
        (format!("SELECT fence.protect('{table}_v', lock_key => 'k')"), "42809"),
        (format!("SELECT fence.protect('{table}', key_column => 'id', key_prefix => NULL)"), "22004"),
    ];
    for (sql, state) in &cases {
        let (got, message) = expect_error(&setup, sql).await;
        assert_eq!(&got, state, "{sql}: {message}");
    }
    // Only the owner: bob may write the table but not fence it.
    let bob = connect_as("fence_test_bob").await;
    let (state, _) = expect_error(
        &bob,
        &format!("SELECT fence.protect('{table}', lock_key => 'k')"),
    )
    .await;
    assert_eq!(state, "42501");

    setup
        .batch_execute(&format!("SELECT fence.protect('{table}', lock_key => 'k')"))
        .await
        .unwrap();
    let (state, _) = expect_error(&bob, &format!("SELECT fence.unprotect('{table}')")).await;
    assert_eq!(state, "42501");
    assert_fn001(
        &bob.execute(&format!("INSERT INTO {table} (id) VALUES (1)"), &[])
            .await
            .unwrap_err(),
    );
    // Protecting again replaces the configuration.
    setup
        .batch_execute(&format!(
            "SELECT fence.protect('{table}', key_column => 'id', key_prefix => 'row:')"
        ))
        .await
        .unwrap();
    let row = setup
        .query_one("SELECT lock_key, key_column::text, key_prefix FROM fence.protected_tables WHERE tbl = $1::text::regclass", &[&table])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("id"));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("row:"));
    // Unprotected: writes are no longer checked.
    setup
        .batch_execute(&format!("SELECT fence.unprotect('{table}')"))
        .await
        .unwrap();
    bob.execute(&format!("INSERT INTO {table} (id) VALUES (1)"), &[])
        .await
        .unwrap();
    let listed: i64 = setup
        .query_one(
            "SELECT count(*) FROM fence.protected_tables WHERE tbl = $1::text::regclass",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(listed, 0);
}

#[tokio::test]
async fn fence_guard_attached_by_hand_as_a_statement_trigger_is_an_error_not_a_crash() {
    let db = connect().await;
    let table = unique_table("misuse");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (a int);
         CREATE TRIGGER misuse BEFORE INSERT ON {table} FOR EACH STATEMENT
             EXECUTE FUNCTION fence.fence_guard('column', 'a', '', '');"
    ))
    .await
    .unwrap();
    let (state, message) = expect_error(&db, &format!("INSERT INTO {table} VALUES (1)")).await;
    assert_eq!(state, "39P01", "{message}");
    let one: i32 = db.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1, "the backend survived");
}

#[tokio::test]
async fn key_columns_must_have_a_settings_independent_text_form() {
    let db = connect().await;
    let table = unique_table("keytype");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int, at timestamptz, ratio float8, code uuid)"
    ))
    .await
    .unwrap();
    for column in ["at", "ratio"] {
        let (state, _) = expect_error(
            &db,
            &format!("SELECT fence.protect('{table}', key_column => '{column}')"),
        )
        .await;
        assert_eq!(state, "42804", "{column}");
    }
    db.batch_execute(&format!(
        "SELECT fence.protect('{table}', key_column => 'code')"
    ))
    .await
    .unwrap();
}
