//! Lease semantics seen from outside: tokens (G1), expiry by the server clock
//! (G2, G5), retry by the same holder (G6), bad input, and leases inside the
//! caller's own transactions.

use std::time::Duration;

use pg_fence_tests::*;

#[tokio::test]
async fn tokens_strictly_increase_across_keys_and_reacquire() {
    let db = connect().await;
    let keys: Vec<String> = (0..5).map(|_| unique_key("order")).collect();
    let mut last = 0i64;
    for round in 0..4 {
        for key in &keys {
            let token = acquire(&db, key, "30 seconds", None, "0")
                .await
                .unwrap()
                .expect("free key is granted");
            assert!(token > last, "round {round}: token {token} after {last}");
            last = token;
            let current: Option<i64> = db
                .query_one("SELECT fence.current_token($1)", &[key])
                .await
                .unwrap()
                .get(0);
            assert_eq!(current, Some(token));
            assert!(release(&db, key, token).await.unwrap());
            // current_token never decreases: released keys keep their last token.
            let current: Option<i64> = db
                .query_one("SELECT fence.current_token($1)", &[key])
                .await
                .unwrap()
                .get(0);
            assert_eq!(current, Some(token));
        }
    }
}

#[tokio::test]
async fn lease_expires_by_the_server_clock() {
    let db = connect().await;
    let other = connect().await;
    let key = unique_key("expiry");
    let first = acquire(&db, &key, "400 milliseconds", Some("a"), "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        acquire(&other, &key, "10 seconds", Some("b"), "0")
            .await
            .unwrap(),
        None,
        "held"
    );
    assert_eq!(live_token(&db, &key).await, Some(first));

    // Wait on the server's clock, not ours (G5): until it says expires_at passed.
    db.execute(
        "SELECT pg_sleep(GREATEST(0, extract(epoch FROM (SELECT expires_at FROM fence.leases WHERE lock_key = $1) - clock_timestamp())) + 0.05)",
        &[&key],
    )
    .await
    .unwrap();

    assert_eq!(
        live_token(&db, &key).await,
        None,
        "expired lease is not live"
    );
    let listed: i64 = db
        .query_one(
            "SELECT count(*) FROM fence.locks WHERE lock_key = $1",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(listed, 0, "fence.locks shows only live leases");
    assert!(
        !renew(&db, &key, first).await.unwrap(),
        "renew after expiry gives NULL"
    );
    assert!(
        !release(&db, &key, first).await.unwrap(),
        "release after expiry gives false"
    );

    let second = acquire(&other, &key, "10 seconds", Some("b"), "0")
        .await
        .unwrap()
        .expect("expired key is free");
    assert!(second > first);
}

#[tokio::test]
async fn renew_keeps_a_lease_alive_past_its_ttl() {
    let db = connect().await;
    let key = unique_key("renew");
    let token = acquire(&db, &key, "300 milliseconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(renew(&db, &key, token).await.unwrap());
    }
    assert_eq!(
        live_token(&db, &key).await,
        Some(token),
        "alive well past the 300 ms ttl"
    );
    // An explicit ttl applies from now.
    let long: bool = db
        .query_one(
            "SELECT fence.lock_renew($1, $2, '1 hour') > clock_timestamp() + interval '59 minutes'",
            &[&key, &token],
        )
        .await
        .unwrap()
        .get(0);
    assert!(long);
}

#[tokio::test]
async fn release_and_renew_with_a_wrong_token_do_nothing() {
    let db = connect().await;
    let key = unique_key("wrong-token");
    let token = acquire(&db, &key, "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert!(!release(&db, &key, token + 1).await.unwrap());
    assert!(!release(&db, &key, token - 1).await.unwrap());
    assert!(!renew(&db, &key, token + 1).await.unwrap());
    assert_eq!(live_token(&db, &key).await, Some(token), "still held");
    assert!(release(&db, &key, token).await.unwrap());
    assert!(
        !release(&db, &key, token).await.unwrap(),
        "a second release finds nothing live"
    );
}

#[tokio::test]
async fn same_holder_retry_gets_the_same_lease_back() {
    let first_session = connect().await;
    let key = unique_key("retry");
    let row = first_session
        .query_one(
            "SELECT token, expires_at::text FROM fence.lock_acquire($1, '2 seconds', 'worker-7')",
            &[&key],
        )
        .await
        .unwrap();
    let (token, expires): (i64, String) = (row.get(0), row.get(1));

    // The reply was "lost": the worker retries from a new connection (G6).
    let retry_session = connect().await;
    let row = retry_session
        .query_one(
            "SELECT token, expires_at > $2::text::timestamptz + interval '50 seconds' FROM fence.lock_acquire($1, '60 seconds', 'worker-7')",
            &[&key, &expires],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), token, "same token");
    assert!(
        row.get::<_, bool>(1),
        "expiry extended to now + the new ttl"
    );
    // Anyone else is still refused.
    assert_eq!(
        acquire(&retry_session, &key, "1 second", Some("worker-8"), "0")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        acquire(&retry_session, &key, "1 second", None, "0")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn null_holder_means_a_fresh_random_holder() {
    let db = connect().await;
    let key = unique_key("random-holder");
    let holder: String = db
        .query_one("SELECT holder FROM fence.lock_acquire($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert_eq!(holder.len(), 36, "a UUID: {holder}");
    assert_eq!(&holder[14..15], "4", "version 4: {holder}");
    // Without a holder, a second call is a different caller: busy.
    let again: Option<i64> = db
        .query_one("SELECT (fence.lock_acquire($1)).token", &[&key])
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, None);
}

#[tokio::test]
async fn every_bad_input_has_its_sqlstate_and_names_the_argument() {
    let db = connect().await;
    let long_key = "x".repeat(1025);
    let long_multibyte = "é".repeat(513); // 1026 bytes, 513 characters
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "SELECT fence.lock_acquire(NULL)".into(),
            "22004",
            "lock_key",
        ),
        ("SELECT fence.lock_acquire('')".into(), "22023", "lock_key"),
        (
            format!("SELECT fence.lock_acquire('{long_key}')"),
            "22023",
            "lock_key",
        ),
        (
            format!("SELECT fence.lock_acquire('{long_multibyte}')"),
            "22023",
            "lock_key",
        ),
        (
            "SELECT fence.lock_acquire('k', NULL)".into(),
            "22004",
            "ttl",
        ),
        (
            "SELECT fence.lock_acquire('k', '0 seconds')".into(),
            "22023",
            "ttl",
        ),
        (
            "SELECT fence.lock_acquire('k', '-1 second')".into(),
            "22023",
            "ttl",
        ),
        (
            "SELECT fence.lock_acquire('k', '1 day 1 second')".into(),
            "22023",
            "ttl",
        ),
        (
            "SELECT fence.lock_acquire('k', '1 mon')".into(),
            "22023",
            "ttl",
        ),
        (
            "SELECT fence.lock_acquire('k', '1 second', 'h', NULL)".into(),
            "22004",
            "wait",
        ),
        (
            "SELECT fence.lock_acquire('k', '1 second', 'h', '-1 ms')".into(),
            "22023",
            "wait",
        ),
        (
            "SELECT fence.lock_acquire('k', '1 second', '')".into(),
            "22023",
            "holder",
        ),
        (
            "SELECT fence.lock_renew(NULL, 1)".into(),
            "22004",
            "lock_key",
        ),
        (
            "SELECT fence.lock_renew('k', NULL)".into(),
            "22004",
            "token",
        ),
        ("SELECT fence.lock_renew('', 1)".into(), "22023", "lock_key"),
        (
            "SELECT fence.lock_renew('k', 1, '0 seconds')".into(),
            "22023",
            "ttl",
        ),
        (
            "SELECT fence.lock_renew('k', 1, '2 days')".into(),
            "22023",
            "ttl",
        ),
        (
            "SELECT fence.lock_release(NULL, 1)".into(),
            "22004",
            "lock_key",
        ),
        (
            "SELECT fence.lock_release('k', NULL)".into(),
            "22004",
            "token",
        ),
        (
            format!("SELECT fence.lock_release('{long_key}', 1)"),
            "22023",
            "lock_key",
        ),
        (
            "SELECT fence.lock_force_release(NULL)".into(),
            "22004",
            "lock_key",
        ),
        (
            "SELECT fence.lock_force_release('')".into(),
            "22023",
            "lock_key",
        ),
        ("SELECT fence.lock_status(NULL)".into(), "22004", "lock_key"),
        (
            "SELECT fence.current_token(NULL)".into(),
            "22004",
            "lock_key",
        ),
    ];
    for (sql, state, argument) in &cases {
        let (got, message) = expect_error(&db, sql).await;
        assert_eq!(&got, state, "{sql}: {message}");
        assert!(
            message.contains(&format!("\"{argument}\"")),
            "{sql}: message should name {argument}: {message}"
        );
    }
    // The limits themselves are accepted: a 1024-byte key and a ttl of exactly fence.max_ttl.
    let max_key = "é".repeat(512);
    assert!(
        acquire(&db, &max_key, "1 day", None, "0")
            .await
            .unwrap()
            .is_some()
            || live_token(&db, &max_key).await.is_some()
    );
    let (state, message) =
        expect_error(&db, "SELECT fence.lock_acquire('k', '1 day 1 second')").await;
    assert!(message.contains("fence.max_ttl"), "{state}: {message}");
    // Nothing crashed: the same session still answers.
    let one: i32 = db.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn max_ttl_is_a_superuser_setting() {
    let db = connect().await;
    let key = unique_key("max-ttl");
    db.batch_execute("SET fence.max_ttl = '10s'").await.unwrap();
    let (state, _) = expect_error(
        &db,
        &format!("SELECT fence.lock_acquire('{key}', '11 seconds')"),
    )
    .await;
    assert_eq!(state, "22023");
    assert!(acquire(&db, &key, "10 seconds", None, "0")
        .await
        .unwrap()
        .is_some());
    db.batch_execute("RESET fence.max_ttl").await.unwrap();
    let context: String = db
        .query_one(
            "SELECT context FROM pg_settings WHERE name = 'fence.max_ttl'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(context, "superuser");
}

#[tokio::test]
async fn a_lease_taken_in_a_rolled_back_transaction_never_existed_and_its_token_is_spent() {
    let db = connect().await;
    let key = unique_key("rollback");
    db.batch_execute("BEGIN").await.unwrap();
    let spent = acquire(&db, &key, "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    db.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(live_token(&db, &key).await, None);
    let current: Option<i64> = db
        .query_one("SELECT fence.current_token($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, None, "the key was never leased");
    let next = acquire(&db, &key, "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert!(
        next > spent,
        "token {spent} reached a client, so it is never issued again (got {next})"
    );
}

#[tokio::test]
async fn a_lease_taken_in_an_open_transaction_is_busy_for_others_without_blocking_them() {
    let db = connect().await;
    let other = connect().await;
    for existing_row in [false, true] {
        let key = unique_key("open-txn");
        if existing_row {
            let t = acquire(&db, &key, "30 seconds", None, "0")
                .await
                .unwrap()
                .unwrap();
            assert!(release(&db, &key, t).await.unwrap());
        }
        db.batch_execute("BEGIN").await.unwrap();
        let token = acquire(&db, &key, "30 seconds", Some("mine"), "0")
            .await
            .unwrap()
            .unwrap();
        // Not committed yet: others neither see it nor block on it.
        let busy = tokio::time::timeout(
            Duration::from_secs(5),
            acquire(&other, &key, "30 seconds", Some("theirs"), "0"),
        )
        .await
        .expect("a try-acquire must not block behind an open transaction")
        .unwrap();
        assert_eq!(busy, None, "existing row: {existing_row}");
        db.batch_execute("COMMIT").await.unwrap();
        assert_eq!(live_token(&other, &key).await, Some(token));
    }
}

#[tokio::test]
async fn repeatable_read_and_serializable_acquire_or_fail_clearly() {
    let db = connect().await;
    let other = connect().await;
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        // A free key: granted inside the transaction.
        let key = unique_key("iso");
        db.batch_execute(&format!("BEGIN ISOLATION LEVEL {level}"))
            .await
            .unwrap();
        let token = acquire(&db, &key, "30 seconds", None, "0").await.unwrap();
        assert!(token.is_some(), "{level}");
        db.batch_execute("COMMIT").await.unwrap();

        // Waiting needs fresh snapshots: a clear 25000 error, not a silent hang.
        db.batch_execute(&format!("BEGIN ISOLATION LEVEL {level}"))
            .await
            .unwrap();
        let error = acquire(&db, &key, "30 seconds", None, "1 second")
            .await
            .unwrap_err();
        assert_eq!(
            sqlstate(&error).as_deref(),
            Some("25000"),
            "{level}: {error}"
        );
        db.batch_execute("ROLLBACK").await.unwrap();

        // The key changed after this transaction's snapshot: a serialization
        // failure (40001), which the caller retries as any other.
        let key = unique_key("iso-race");
        let t = acquire(&other, &key, "30 seconds", None, "0")
            .await
            .unwrap()
            .unwrap();
        db.batch_execute(&format!("BEGIN ISOLATION LEVEL {level}"))
            .await
            .unwrap();
        db.batch_execute("SELECT 1").await.unwrap(); // take the snapshot
        assert!(release(&other, &key, t).await.unwrap());
        let error = acquire(&db, &key, "30 seconds", None, "0")
            .await
            .unwrap_err();
        assert_eq!(
            sqlstate(&error).as_deref(),
            Some("40001"),
            "{level}: {error}"
        );
        db.batch_execute("ROLLBACK").await.unwrap();
    }
}

#[tokio::test]
async fn lease_rows_record_role_and_application() {
    let db = connect().await;
    let key = unique_key("view");
    let token = acquire(&db, &key, "30 seconds", Some("reporter"), "0")
        .await
        .unwrap()
        .unwrap();
    let row = db
        .query_one("SELECT holder, token, owner_role::text, application_name FROM fence.locks WHERE lock_key = $1", &[&key])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "reporter");
    assert_eq!(row.get::<_, i64>(1), token);
    assert_eq!(row.get::<_, String>(2), "postgres");
    assert_eq!(row.get::<_, String>(3), "pg_fence_tests");
}

#[tokio::test]
async fn an_error_inside_acquire_leaves_the_session_usable() {
    let db = connect().await;
    let key = unique_key("read-only");
    // The key's row exists and is free, so acquire reaches its row lock.
    let t = acquire(&db, &key, "30 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(&db, &key, t).await.unwrap());

    db.batch_execute("BEGIN READ ONLY").await.unwrap();
    let error = acquire(&db, &key, "30 seconds", None, "0")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error).as_deref(), Some("25006"), "{error}");
    db.batch_execute("ROLLBACK").await.unwrap();

    db.batch_execute("SET default_transaction_read_only = on")
        .await
        .unwrap();
    let error = acquire(&db, &key, "30 seconds", None, "0")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error).as_deref(), Some("25006"), "{error}");
    db.batch_execute("RESET default_transaction_read_only")
        .await
        .unwrap();
    // Not left inside a half-open (sub)transaction: autocommit still commits.
    let token = acquire(&db, &key, "30 seconds", None, "0")
        .await
        .unwrap()
        .expect("free");
    let other = connect().await;
    assert_eq!(
        live_token(&other, &key).await,
        Some(token),
        "committed and visible to others"
    );
    db.batch_execute("ROLLBACK").await.unwrap(); // a stray ROLLBACK only warns
    let one: i32 = db.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn lease_functions_refuse_to_run_in_security_restricted_operations() {
    let db = connect().await;
    let table = unique_table("sro");
    let error = db
        .batch_execute(&format!(
            "CREATE FUNCTION {table}_f(x int) RETURNS int LANGUAGE sql IMMUTABLE
                 AS $$ SELECT x + 0 * coalesce((fence.lock_acquire('{table}')).token, 0)::int $$;
             CREATE TABLE {table} (x int);
             INSERT INTO {table} VALUES (1);
             CREATE INDEX ON {table} ({table}_f(x));"
        ))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error).as_deref(), Some("42501"), "{error}");
}
