//! G3's holes in 0.1, each a way a write without the live token got into a
//! fenced table, and the one way an unprivileged role could hold a key
//! hostage. Every test here failed against 0.1.

use pg_fence_tests::*;

/// A table fenced per row on `<prefix>:<acct>` with token column `tok`, row
/// 1 written by the live holder of `<prefix>:1`. Returns (table, key, token).
async fn written_by_holder(db: &Client) -> (String, String, i64) {
    let table = unique_table("partial");
    let prefix = unique_key("acct");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, acct int NOT NULL, tok bigint, captured_by text);
         SELECT fence.protect('{table}', key_column => 'acct', key_prefix => '{prefix}:', token_column => 'tok');"
    ))
    .await
    .unwrap();
    let key = format!("{prefix}:1");
    let token = acquire(db, &key, "5 minutes", None, "0")
        .await
        .unwrap()
        .unwrap();
    db.execute(
        &format!("INSERT INTO {table} VALUES (7, 1, $1, NULL)"),
        &[&token],
    )
    .await
    .unwrap();
    (table, key, token)
}

async fn captured_by(db: &Client, table: &str) -> Option<String> {
    db.query_one(
        &format!("SELECT captured_by FROM {table} WHERE id = 7"),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn an_update_that_leaves_the_token_column_out_presents_no_token() {
    let db = connect().await;
    let (table, _key, token) = written_by_holder(&db).await;
    let zombie = connect().await;

    // The row holds the live token, but this statement does not present it.
    let (state, message) = expect_error(
        &zombie,
        &format!("UPDATE {table} SET captured_by = 'zombie' WHERE id = 7"),
    )
    .await;
    assert_eq!(state, "FN001", "{message}");
    // `SET tok = tok` is no better than leaving it out only if the row's
    // token is stale; here it is the live one, which the statement presents.
    assert_eq!(captured_by(&db, &table).await, None);

    // Presenting it: assigned in the statement, or through fence.token.
    db.execute(
        &format!("UPDATE {table} SET captured_by = 'assigned', tok = $1 WHERE id = 7"),
        &[&token],
    )
    .await
    .unwrap();
    db.batch_execute(&format!(
        "BEGIN; SET LOCAL fence.token = '{token}';
         UPDATE {table} SET captured_by = 'fence.token' WHERE id = 7; COMMIT;"
    ))
    .await
    .unwrap();
    assert_eq!(
        captured_by(&db, &table).await.as_deref(),
        Some("fence.token")
    );
    // A stale fence.token is refused even though the row holds the live one.
    let (state, _) = expect_error(
        &zombie,
        &format!(
            "BEGIN; SET LOCAL fence.token = '{}'; UPDATE {table} SET captured_by = 'zombie' WHERE id = 7",
            token - 1
        ),
    )
    .await;
    zombie.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(state, "FN001");
    assert_eq!(
        captured_by(&db, &table).await.as_deref(),
        Some("fence.token")
    );
}

#[tokio::test]
async fn merge_and_a_cascading_foreign_key_present_no_token() {
    let db = connect().await;
    let (table, _key, _token) = written_by_holder(&db).await;
    let (state, message) = expect_error(
        &db,
        &format!(
            "MERGE INTO {table} AS t USING (VALUES (7)) AS s(id) ON t.id = s.id \
             WHEN MATCHED THEN UPDATE SET captured_by = 'merge'"
        ),
    )
    .await;
    assert_eq!(state, "FN001", "{message}");

    // ON UPDATE CASCADE rewrites the fenced table's referencing column
    // without its token.
    let parent = unique_table("fkparent");
    db.batch_execute(&format!(
        "CREATE TABLE {parent} (code text PRIMARY KEY);
         INSERT INTO {parent} VALUES ('a');
         ALTER TABLE {table} ADD COLUMN code text REFERENCES {parent} ON UPDATE CASCADE;"
    ))
    .await
    .unwrap();
    // The holder links the row (presenting its token)...
    let token: i64 = db
        .query_one(&format!("SELECT tok FROM {table} WHERE id = 7"), &[])
        .await
        .unwrap()
        .get(0);
    db.execute(
        &format!("UPDATE {table} SET code = 'a', tok = $1 WHERE id = 7"),
        &[&token],
    )
    .await
    .unwrap();
    // ...and someone else's cascade is refused, and writes nothing.
    let (state, message) = expect_error(&db, &format!("UPDATE {parent} SET code = 'b'")).await;
    assert_eq!(state, "FN001", "{message}");
    let code: String = db
        .query_one(&format!("SELECT code FROM {table} WHERE id = 7"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(code, "a");
}

/// A parent fenced on one key, `children` its inheritance children.
async fn count_rows(db: &Client, table: &str) -> i64 {
    db.query_one(&format!("SELECT count(*) FROM ONLY {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn inheritance_children_are_fenced_including_ones_added_later() {
    let db = connect().await;
    let parent = unique_table("inhparent");
    let key = unique_key("inh");
    db.batch_execute(&format!(
        "CREATE TABLE {parent} (id int, acct int, v text);
         CREATE TABLE {parent}_before () INHERITS ({parent});
         INSERT INTO {parent}_before VALUES (1, 1, 'x');
         SELECT fence.protect('{parent}', lock_key => '{key}');
         CREATE TABLE {parent}_created () INHERITS ({parent});
         CREATE TABLE {parent}_attached (id int, acct int, v text);
         ALTER TABLE {parent}_attached INHERIT {parent};
         CREATE TABLE {parent}_grandchild () INHERITS ({parent}_created);"
    ))
    .await
    .unwrap();
    let token = acquire(&db, &key, "5 minutes", None, "0")
        .await
        .unwrap()
        .unwrap();
    for child in ["before", "created", "attached", "grandchild"] {
        let child = format!("{parent}_{child}");
        // A write straight to the child, and one through the parent.
        let (state, message) =
            expect_error(&db, &format!("INSERT INTO {child} VALUES (2, 1, 'stale')")).await;
        assert_eq!(state, "FN001", "{child}: {message}");
        db.batch_execute(&format!(
            "BEGIN; SET LOCAL fence.token = '{token}'; INSERT INTO {child} VALUES (2, 1, 'ok'); COMMIT;"
        ))
        .await
        .unwrap();
        assert_eq!(
            count_rows(&db, &child).await,
            if child.ends_with("before") { 2 } else { 1 }
        );
    }
    let (state, message) = expect_error(&db, &format!("UPDATE {parent} SET v = 'stale'")).await;
    assert_eq!(state, "FN001", "{message}");
    let (state, message) = expect_error(&db, &format!("DELETE FROM {parent}")).await;
    assert_eq!(state, "FN001", "{message}");

    // The children's fence is the parent's: not removable on its own...
    let (state, _) =
        expect_error(&db, &format!("SELECT fence.unprotect('{parent}_created')")).await;
    assert_eq!(state, "55000");
    let (state, _) = expect_error(
        &db,
        &format!("DROP TRIGGER zz_fence_guard ON {parent}_created"),
    )
    .await;
    assert_eq!(state, "2BP01");
    // ...a table fenced on its own cannot join the family...
    let own = format!("{parent}_own");
    db.batch_execute(&format!(
        "CREATE TABLE {own} (id int, acct int, v text);
         SELECT fence.protect('{own}', lock_key => 'other');"
    ))
    .await
    .unwrap();
    let (state, message) = expect_error(&db, &format!("ALTER TABLE {own} INHERIT {parent}")).await;
    assert_eq!(state, "55000", "{message}");
    // ...and unprotecting the parent unfences them all.
    db.batch_execute(&format!("SELECT fence.unprotect('{parent}')"))
        .await
        .unwrap();
    db.batch_execute(&format!("UPDATE {parent} SET v = 'free'"))
        .await
        .unwrap();
}

#[tokio::test]
async fn truncate_of_any_partition_is_refused_including_later_ones() {
    let db = connect().await;
    ensure_test_roles(&db).await;
    let table = unique_table("parted");
    let key = unique_key("parted");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int, v text) PARTITION BY RANGE (id);
         CREATE TABLE {table}_a PARTITION OF {table} FOR VALUES FROM (0) TO (10);
         SELECT fence.protect('{table}', lock_key => '{key}');
         CREATE TABLE {table}_b PARTITION OF {table} FOR VALUES FROM (10) TO (20) PARTITION BY RANGE (id);
         CREATE TABLE {table}_b1 PARTITION OF {table}_b FOR VALUES FROM (10) TO (15);
         CREATE TABLE {table}_c (id int, v text);
         ALTER TABLE {table} ATTACH PARTITION {table}_c FOR VALUES FROM (20) TO (30);
         GRANT ALL ON {table}, {table}_a, {table}_b, {table}_b1, {table}_c TO fence_test_alice;"
    ))
    .await
    .unwrap();
    let token = acquire(&db, &key, "5 minutes", None, "0")
        .await
        .unwrap()
        .unwrap();
    db.batch_execute(&format!(
        "BEGIN; SET LOCAL fence.token = '{token}'; INSERT INTO {table} VALUES (1, 'a'), (12, 'b1'), (25, 'c'); COMMIT;"
    ))
    .await
    .unwrap();
    let alice = connect_as("fence_test_alice").await;
    for partition in ["a", "b", "b1", "c"] {
        let (state, message) = expect_error(&alice, &format!("TRUNCATE {table}_{partition}")).await;
        assert_eq!(state, "42501", "{partition}: {message}");
    }
    let (state, _) = expect_error(&alice, &format!("TRUNCATE {table}")).await;
    assert_eq!(state, "42501");
    assert_eq!(count_rows(&db, &format!("{table}_b1")).await, 1);
    // A fence_admin member may.
    db.batch_execute(&format!("TRUNCATE {table}_c"))
        .await
        .unwrap();
    assert_eq!(count_rows(&db, &format!("{table}_c")).await, 0);
}

#[tokio::test]
async fn key_and_token_columns_the_check_cannot_trust_are_refused() {
    let db = connect().await;
    let table = unique_table("untrusted");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int, acct int, gen_key text GENERATED ALWAYS AS ('k' || acct) STORED,
                               tok bigint, gen_tok bigint GENERATED ALWAYS AS (tok + 1) STORED, at timestamptz)"
    ))
    .await
    .unwrap();
    for (arguments, expected) in [
        ("key_column => 'gen_key'", "0A000"),
        ("key_column => 'acct', token_column => 'gen_tok'", "0A000"),
        ("key_column => 'at'", "42804"),
    ] {
        let (state, message) = expect_error(
            &db,
            &format!("SELECT fence.protect('{table}', {arguments})"),
        )
        .await;
        assert_eq!(state, expected, "{arguments}: {message}");
    }

    // Re-typing, renaming or dropping a key column behind the fence is refused...
    let table = unique_table("retyped");
    let prefix = unique_key("retype");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int, acct int, tok bigint);
         SELECT fence.protect('{table}', key_column => 'acct', key_prefix => '{prefix}:', token_column => 'tok')"
    ))
    .await
    .unwrap();
    for ddl in [
        format!("ALTER TABLE {table} ALTER COLUMN acct TYPE timestamptz USING now()"),
        format!("ALTER TABLE {table} RENAME COLUMN acct TO account"),
        format!("ALTER TABLE {table} DROP COLUMN tok"),
        format!("ALTER TABLE {table} ALTER COLUMN tok TYPE numeric"),
    ] {
        let (state, message) = expect_error(&db, &ddl).await;
        assert!(
            ["42804", "42703"].contains(&state.as_str()),
            "{ddl}: {state} {message}"
        );
    }
    // ...and with the DDL check out of the way (event triggers off), the
    // check itself fails closed: a timestamptz key's text depends on TimeZone.
    db.batch_execute(&format!(
        "BEGIN;
         ALTER EVENT TRIGGER fence_ddl_command_end DISABLE;
         ALTER TABLE {table} ALTER COLUMN acct TYPE timestamptz USING now();
         ALTER EVENT TRIGGER fence_ddl_command_end ENABLE;
         COMMIT;"
    ))
    .await
    .unwrap();
    let key = format!("{prefix}:x");
    let token = acquire(&db, &key, "5 minutes", None, "0")
        .await
        .unwrap()
        .unwrap();
    let (state, message) = expect_error(
        &db,
        &format!("INSERT INTO {table} (id, acct, tok) VALUES (1, now(), {token})"),
    )
    .await;
    assert_eq!(state, "42804", "{message}");
}

#[tokio::test]
async fn protect_needs_fence_admin_and_blockers_show_who_holds_a_key() {
    let db = connect().await;
    ensure_test_roles(&db).await;
    let table = unique_table("hostage");
    let victim_key = unique_key("victim");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int, v text); ALTER TABLE {table} OWNER TO fence_test_bob;"
    ))
    .await
    .unwrap();
    // Bob owns the table, but may not choose to fence it under Alice's key.
    let bob = connect_as("fence_test_bob").await;
    let (state, message) = expect_error(
        &bob,
        &format!("SELECT fence.protect('{table}', lock_key => '{victim_key}')"),
    )
    .await;
    assert_eq!(state, "42501", "{message}");
    let (state, _) = expect_error(&bob, &format!("SELECT fence.unprotect('{table}')")).await;
    assert_eq!(state, "42501");

    // A writer holding a key up is visible, and can be ended.
    db.batch_execute(&format!(
        "SELECT fence.protect('{table}', lock_key => '{victim_key}');
         GRANT INSERT ON {table} TO fence_test_bob;"
    ))
    .await
    .unwrap();
    let alice = connect_as("fence_test_alice").await;
    let token = acquire(&alice, &victim_key, "1 second", None, "0")
        .await
        .unwrap()
        .unwrap();
    bob.batch_execute(&format!(
        "BEGIN; SET LOCAL fence.token = '{token}'; INSERT INTO {table} VALUES (1, 'held');"
    ))
    .await
    .unwrap();
    let bob_pid: i32 = bob
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let blockers = db
        .query(
            "SELECT pid, role::text, what, state FROM fence.blockers WHERE lock_key = $1",
            &[&victim_key],
        )
        .await
        .unwrap();
    assert_eq!(blockers.len(), 1);
    assert_eq!(blockers[0].get::<_, Option<i32>>(0), Some(bob_pid));
    assert_eq!(blockers[0].get::<_, String>(1), "fence_test_bob");
    assert_eq!(blockers[0].get::<_, String>(2), "write");
    assert_eq!(
        blockers[0].get::<_, Option<String>>(3).as_deref(),
        Some("idle in transaction")
    );
    // Alice's lease runs out; while Bob's transaction lives nobody gets the key.
    db.execute("SELECT pg_sleep(1.1)", &[]).await.unwrap();
    assert_eq!(
        acquire(&db, &victim_key, "5 seconds", None, "0")
            .await
            .unwrap(),
        None
    );
    db.execute("SELECT pg_terminate_backend($1)", &[&bob_pid])
        .await
        .unwrap();
    let granted = acquire(&db, &victim_key, "5 seconds", None, "5 seconds")
        .await
        .unwrap();
    assert!(granted.is_some());
}
