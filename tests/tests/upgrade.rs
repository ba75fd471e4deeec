//! `ALTER EXTENSION pg_fence UPDATE` from 0.1.0 (the version 0.1 shipped
//! as) with live leases, run-once records and fenced tables in place: the
//! state survives, the 0.2 rules hold for it, and the upgraded schema is the
//! one a fresh install creates.

use pg_fence_tests::*;

/// Every object of the extension, with what defines it: functions by their
/// definition, views by their query, tables by their columns, so that an
/// upgrade script that drifts from the install script shows as a difference.
const SCHEMA_SIGNATURE: &str = "
    SELECT pg_describe_object(d.classid, d.objid, d.objsubid) || ' ' || COALESCE(
             CASE d.classid
               WHEN 'pg_proc'::regclass THEN
                 (SELECT pg_get_function_identity_arguments(p.oid) || ' -> ' || pg_get_function_result(p.oid)
                         || ' ' || p.provolatile::text || p.prosecdef::text || p.proisstrict::text
                         || ' ' || COALESCE(array_to_string(p.proconfig, ','), '') || ' ' || md5(p.prosrc) || ' ' || COALESCE(p.proacl::text, '')
                    FROM pg_proc AS p WHERE p.oid = d.objid)
               WHEN 'pg_class'::regclass THEN
                 (SELECT c.relkind::text || ' ' || COALESCE(pg_get_viewdef(c.oid), '') || ' ' ||
                         COALESCE((SELECT string_agg(a.attname || ':' || format_type(a.atttypid, a.atttypmod)
                                                     || ':' || a.attnotnull, ',' ORDER BY a.attnum)
                                     FROM pg_attribute AS a
                                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '')
                         || ' ' || COALESCE(array_to_string(c.reloptions, ','), '') || ' ' || COALESCE(c.relacl::text, '')
                    FROM pg_class AS c WHERE c.oid = d.objid)
               WHEN 'pg_event_trigger'::regclass THEN
                 (SELECT e.evtevent::text || ' ' || e.evtfoid::regproc::text || ' ' || array_to_string(e.evttags, ',')
                    FROM pg_event_trigger AS e WHERE e.oid = d.objid)
             END, '')
      FROM pg_depend AS d
     WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
       AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_fence')
     ORDER BY 1";

async fn signature(db: &Client) -> Vec<String> {
    db.query(SCHEMA_SIGNATURE, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn an_upgrade_from_0_1_keeps_leases_records_and_fences_and_matches_a_fresh_install() {
    let db = fresh_database("pg_fence_upgrade").await;
    ensure_test_roles(&db).await;
    db.batch_execute(
        "CREATE EXTENSION pg_fence VERSION '0.1.0';
         GRANT USAGE, CREATE ON SCHEMA public TO PUBLIC;
         CREATE TABLE payments (id int PRIMARY KEY, account_id int NOT NULL, captured_by text, fence_token bigint);
         SELECT fence.protect('payments', key_column => 'account_id', key_prefix => 'account:', token_column => 'fence_token');
         CREATE TABLE events (id int, v text) PARTITION BY RANGE (id);
         CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (100);
         SELECT fence.protect('events', lock_key => 'events');
         CREATE TABLE ledger (id int, v text);
         CREATE TABLE ledger_2026 () INHERITS (ledger);
         SELECT fence.protect('ledger', lock_key => 'ledger');
         INSERT INTO ledger_2026 VALUES (1, 'unfenced in 0.1');
         GRANT ALL ON payments, events, events_1, ledger, ledger_2026 TO PUBLIC;",
    )
    .await
    .unwrap();
    assert_eq!(
        db.query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_fence'",
            &[]
        )
        .await
        .unwrap()
        .get::<_, String>(0),
        "0.1.0"
    );
    let alice = connect_to_database(port(), "fence_test_alice", "pg_fence_upgrade").await;
    let bob = connect_to_database(port(), "fence_test_bob", "pg_fence_upgrade").await;
    let token: i64 = alice
        .query_one(
            "SELECT (fence.lock_acquire('account:1', '1 day', 'alice-1')).token",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    alice
        .batch_execute(&format!(
            "INSERT INTO payments VALUES (1, 1, NULL, {token});
             BEGIN; SELECT fence.claim_operation('payment:1:capture'); COMMIT;"
        ))
        .await
        .unwrap();

    db.batch_execute("ALTER EXTENSION pg_fence UPDATE")
        .await
        .unwrap();
    assert_eq!(
        db.query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_fence'",
            &[]
        )
        .await
        .unwrap()
        .get::<_, String>(0),
        "0.2.0"
    );

    // The live lease is still Alice's, with its token and its exact ttl.
    let row = db
        .query_one(
            "SELECT token, owner_role::text, holder, ttl::text FROM fence.leases WHERE lock_key = 'account:1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), token);
    assert_eq!(row.get::<_, String>(1), "fence_test_alice");
    assert_eq!(row.get::<_, String>(2), "alice-1");
    assert_eq!(row.get::<_, String>(3), "24:00:00");
    assert_eq!(live_token(&db, "account:1").await, Some(token));
    // G6 still recognises the holder; G4 still refuses Bob.
    let again: i64 = alice
        .query_one(
            "SELECT (fence.lock_acquire('account:1', '1 day', 'alice-1')).token",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, token);
    let (state, _) = expect_error(
        &bob,
        &format!("SELECT fence.lock_renew('account:1', {token})"),
    )
    .await;
    assert_eq!(state, "42501");
    // The run-once record is still Alice's.
    let claimed: bool = alice
        .query_one("SELECT fence.claim_operation('payment:1:capture')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!claimed);
    // Alice's session planned its grants under 0.1.0's schema, which keeps
    // no term history; once the upgrade brings the history, her grants
    // keep it.
    db.batch_execute("SELECT fence.lock_keep_history('history:1')")
        .await
        .unwrap();
    let term: i64 = alice
        .query_one(
            "SELECT (fence.lock_acquire('history:1', '1 minute', 'alice-2')).token",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let kept: Vec<i64> = alice
        .query("SELECT token FROM fence.lock_history('history:1')", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(kept, vec![term], "a grant planned before the upgrade");

    // The fences hold, by 0.2's rules.
    let (state, _) =
        expect_error(&bob, "UPDATE payments SET captured_by = 'bob' WHERE id = 1").await;
    assert_eq!(state, "FN001", "an update without the token column");
    alice
        .execute(
            "UPDATE payments SET captured_by = 'alice', fence_token = $1 WHERE id = 1",
            &[&token],
        )
        .await
        .unwrap();
    let (state, _) = expect_error(&bob, "TRUNCATE events_1").await;
    assert_eq!(state, "42501", "TRUNCATE of a partition");
    let (state, _) = expect_error(&bob, "INSERT INTO ledger_2026 VALUES (1, 'x')").await;
    assert_eq!(state, "FN001", "an inheritance child");
    let (state, _) = expect_error(&bob, "UPDATE ledger SET v = 'y'").await;
    assert_eq!(state, "FN001", "through the parent");

    // The same schema as a fresh install.
    let upgraded = signature(&db).await;
    let fresh = fresh_database("pg_fence_upgrade_fresh").await;
    fresh
        .batch_execute("CREATE EXTENSION pg_fence")
        .await
        .unwrap();
    let installed = signature(&fresh).await;
    let only_upgraded: Vec<_> = upgraded.iter().filter(|o| !installed.contains(o)).collect();
    let only_installed: Vec<_> = installed.iter().filter(|o| !upgraded.contains(o)).collect();
    assert!(
        only_upgraded.is_empty() && only_installed.is_empty(),
        "upgraded and fresh schemas differ:\n  only after the upgrade: {only_upgraded:#?}\n  only in a fresh install: {only_installed:#?}"
    );

    drop((db, fresh, alice, bob));
    let admin = connect().await;
    for database in ["pg_fence_upgrade", "pg_fence_upgrade_fresh"] {
        admin
            .simple_query(&format!("DROP DATABASE {database} WITH (FORCE)"))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn an_upgrade_blocked_by_a_view_on_fence_locks_says_which() {
    let db = fresh_database("pg_fence_upgrade_view").await;
    db.batch_execute(
        "CREATE EXTENSION pg_fence VERSION '0.1.0';
         CREATE VIEW my_monitor AS SELECT lock_key, owner_role FROM fence.locks;",
    )
    .await
    .unwrap();
    let (state, message) = expect_error(&db, "ALTER EXTENSION pg_fence UPDATE").await;
    assert_eq!(state, "2BP01", "{message}");
    assert!(message.contains("my_monitor"), "{message}");
    db.batch_execute("DROP VIEW my_monitor; ALTER EXTENSION pg_fence UPDATE")
        .await
        .unwrap();
    drop(db);
    connect()
        .await
        .simple_query("DROP DATABASE pg_fence_upgrade_view WITH (FORCE)")
        .await
        .unwrap();
}
