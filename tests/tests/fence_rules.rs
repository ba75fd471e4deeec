//! G3's rules against a plain role and a careless owner, second round: the
//! fence registry (only the fence `protect()` installed counts, as it was
//! installed), the DDL event trigger over whole families, and which token a
//! statement presents (MERGE, `fence.token` across savepoints and function
//! SET clauses). Each failed against the first fixes of 0.2.

use pg_fence_tests::*;

/// A table owned by Alice, fenced by the superuser on `key`.
async fn alices_fenced_table(db: &Client, key: &str) -> String {
    ensure_test_roles(db).await;
    let table = unique_table("alices");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint, tok bigint, note text);
         ALTER TABLE {table} OWNER TO fence_test_alice;
         SELECT fence.protect('{table}', lock_key => '{key}', token_column => 'tok');"
    ))
    .await
    .unwrap();
    table
}

#[tokio::test]
async fn an_owner_cannot_add_or_swap_a_fence_under_another_key() {
    let db = connect().await;
    let key = unique_key("own");
    let table = alices_fenced_table(&db, &key).await;
    let victim = unique_key("victim");
    let victim_token = acquire(&db, &victim, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let own_token = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let alice = connect_as("fence_test_alice").await;
    // A second fence_guard on the fenced table, under the victim's key.
    alice
        .batch_execute(&format!(
            "CREATE TRIGGER aa_hold BEFORE INSERT ON {table} FOR EACH ROW
                 EXECUTE FUNCTION fence.fence_guard('key', '{victim}', '', 'id')"
        ))
        .await
        .unwrap();
    let (state, message) = expect_error(
        &alice,
        &format!("BEGIN; INSERT INTO {table} VALUES ({victim_token}, {own_token}, 'hold')"),
    )
    .await;
    alice.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(state, "42501", "{message}");
    assert!(release(&db, &victim, victim_token).await.unwrap());
    let again = acquire(&db, &victim, "1 minute", None, "0").await.unwrap();
    assert!(again.is_some(), "the victim's key must be free");
    // The fence itself dropped and re-created under another key.
    alice
        .batch_execute(&format!(
            "DROP TRIGGER aa_hold ON {table};
             DROP TRIGGER zz_fence_guard ON {table};
             CREATE TRIGGER zz_fence_guard BEFORE INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW
                 EXECUTE FUNCTION fence.fence_guard('key', '{victim}', '', 'tok');"
        ))
        .await
        .unwrap();
    let (state, _) = expect_error(
        &alice,
        &format!(
            "INSERT INTO {table} VALUES (1, {}, 'swapped')",
            again.unwrap()
        ),
    )
    .await;
    assert_eq!(state, "42501");
}

#[tokio::test]
async fn dropping_a_column_keeps_the_table_fenced_and_temp_tables_are_refused() {
    let db = connect().await;
    let key = unique_key("dropcol");
    let table = alices_fenced_table(&db, &key).await;
    let alice = connect_as("fence_test_alice").await;
    alice
        .batch_execute(&format!(
            "ALTER TABLE {table} ADD COLUMN legacy int; ALTER TABLE {table} DROP COLUMN legacy;"
        ))
        .await
        .unwrap();
    let token = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    // A new session (nothing cached) may still write with the live token.
    let fresh = connect_as("fence_test_alice").await;
    fresh
        .batch_execute(&format!("INSERT INTO {table} VALUES (1, {token}, 'ok')"))
        .await
        .unwrap();
    let (state, _) = expect_error(
        &db,
        "CREATE TEMP TABLE scratch (id int); SELECT fence.protect('scratch', lock_key => 'scratch')",
    )
    .await;
    assert_eq!(state, "0A000");
}

#[tokio::test]
async fn merge_rows_are_judged_by_their_own_statement() {
    let db = connect().await;
    let table = unique_table("mergesrf");
    let key = unique_key("mergesrf");
    let token = acquire(&db, &key, "5 minutes", None, "0")
        .await
        .unwrap()
        .unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, amount int, tok bigint);
         SELECT fence.protect('{table}', lock_key => '{key}', token_column => 'tok');
         INSERT INTO {table} VALUES (1, 0, {token});
         CREATE OR REPLACE FUNCTION fence_test_ids() RETURNS SETOF int LANGUAGE sql AS 'SELECT 1 UNION ALL SELECT 2';
         CREATE TABLE {table}_log (n int);
         CREATE OR REPLACE FUNCTION {table}_apply(n int) RETURNS int LANGUAGE plpgsql AS $$
         BEGIN
             MERGE INTO {table} AS p USING (SELECT 1 AS id, false AS hi) AS s ON p.id = s.id
               WHEN MATCHED AND s.hi THEN UPDATE SET tok = 0
               WHEN MATCHED THEN UPDATE SET amount = n;
             RETURN n;
         END $$;"
    ))
    .await
    .unwrap();
    // A function scan still open in the MERGE's source.
    let (state, message) = expect_error(
        &db,
        &format!(
            "MERGE INTO {table} AS p USING (SELECT fence_test_ids() AS id, false AS hi) AS s ON p.id = s.id
               WHEN MATCHED AND s.hi THEN UPDATE SET tok = 0
               WHEN MATCHED THEN UPDATE SET amount = 999"
        ),
    )
    .await;
    assert_eq!(state, "FN001", "{message}");
    // A MERGE nested in an INSERT, in a session whose library loads mid-statement.
    let fresh = connect().await;
    let (state, message) = expect_error(
        &fresh,
        &format!("INSERT INTO {table}_log SELECT {table}_apply(555)"),
    )
    .await;
    assert_eq!(state, "FN001", "{message}");
    let amount: i32 = db
        .query_one(&format!("SELECT amount FROM {table} WHERE id = 1"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(amount, 0);
}

#[tokio::test]
async fn a_session_fence_token_is_not_revived_by_savepoints_or_function_settings() {
    let db = connect().await;
    let table = unique_table("revived");
    let key = unique_key("revived");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int); SELECT fence.protect('{table}', lock_key => '{key}');
         CREATE OR REPLACE FUNCTION fence_test_noop() RETURNS void LANGUAGE sql SET fence.token = '' AS 'SELECT';"
    ))
    .await
    .unwrap();
    let token = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    db.batch_execute(&format!("SET fence.token = '{token}'"))
        .await
        .unwrap();
    for revive in [
        "SAVEPOINT s; SET LOCAL fence.token = '999'; ROLLBACK TO SAVEPOINT s;".to_owned(),
        "SELECT fence_test_noop();".to_owned(),
        "DO $$ BEGIN PERFORM set_config('fence.token', '7', true); RAISE EXCEPTION 'x';
              EXCEPTION WHEN OTHERS THEN NULL; END $$;"
            .to_owned(),
    ] {
        let (state, _) = expect_error(
            &db,
            &format!("BEGIN; {revive} INSERT INTO {table} VALUES (1)"),
        )
        .await;
        db.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(state, "FN001", "{revive}");
    }
    db.batch_execute("RESET fence.token").await.unwrap();
}

#[tokio::test]
async fn rows_hidden_by_a_repeatable_read_snapshot_still_count() {
    let db = connect().await;
    let key = unique_key("rrjoin");
    let table = alices_fenced_table(&db, &key).await;
    let alice = connect_as("fence_test_alice").await;
    alice
        .batch_execute(&format!(
            "CREATE TABLE {table}_side (id bigint, tok bigint, note text)"
        ))
        .await
        .unwrap();
    alice
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM {table}_side;"
        ))
        .await
        .unwrap();
    db.batch_execute(&format!(
        "INSERT INTO {table}_side VALUES (42, 0, 'unfenced')"
    ))
    .await
    .unwrap();
    let (state, message) =
        expect_error(&alice, &format!("ALTER TABLE {table}_side INHERIT {table}")).await;
    alice.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(state, "42501", "{message}");
}

#[tokio::test]
async fn a_late_trigger_on_a_grandchild_is_refused() {
    let db = connect().await;
    let key = unique_key("grandchild");
    let table = alices_fenced_table(&db, &key).await;
    db.batch_execute(&format!(
        "CREATE TABLE {table}_c () INHERITS ({table});
         CREATE TABLE {table}_g () INHERITS ({table}_c);
         CREATE OR REPLACE FUNCTION fence_test_rekey() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN NEW.id := 0; RETURN NEW; END $$;"
    ))
    .await
    .unwrap();
    let (state, _) = expect_error(
        &db,
        &format!("CREATE TRIGGER zzz_rekey BEFORE INSERT ON {table}_g FOR EACH ROW EXECUTE FUNCTION fence_test_rekey()"),
    )
    .await;
    assert_eq!(state, "55000");
    // And after "c NO INHERIT parent", the grandchild leaves the fence too.
    db.batch_execute(&format!("ALTER TABLE {table}_c NO INHERIT {table}"))
        .await
        .unwrap();
    let left = count(&db, &format!("SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('{table}_c'::regclass, '{table}_g'::regclass)")).await;
    assert_eq!(left, 0);
}

// ---------------------------------------------------------------------------
// Found by the third review.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_writers_own_operators_do_not_reach_the_fence_check() {
    let db = connect().await;
    ensure_test_roles(&db).await;
    let schema = unique_table("bobs");
    db.batch_execute(&format!(
        "CREATE SCHEMA {schema} AUTHORIZATION fence_test_bob"
    ))
    .await
    .unwrap();
    let victim = unique_key("opvictim");
    // A real fence under the victim's key: bob's copy has the same arguments.
    db.batch_execute(&format!(
        "CREATE TABLE {schema}_real (id int, tok bigint);
         SELECT fence.protect('{schema}_real', lock_key => '{victim}', token_column => 'tok');"
    ))
    .await
    .unwrap();
    let token = acquire(&db, &victim, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let bob = connect_as("fence_test_bob").await;
    bob.batch_execute(&format!(
        "SET search_path = {schema}, public;
         CREATE TABLE {schema}.mine (id int, tok bigint);
         CREATE TRIGGER zz_fence_guard BEFORE INSERT OR UPDATE OR DELETE ON {schema}.mine FOR EACH ROW
             EXECUTE FUNCTION fence.fence_guard('key', '{victim}', '', 'tok');
         CREATE FUNCTION {schema}.always(regclass, oid) RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT true';
         CREATE OPERATOR {schema}.= (LEFTARG = regclass, RIGHTARG = oid, FUNCTION = {schema}.always);
         CREATE FUNCTION {schema}.always_oid(oid, int4) RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT true';
         CREATE OPERATOR {schema}.= (LEFTARG = oid, RIGHTARG = int4, FUNCTION = {schema}.always_oid);"
    ))
    .await
    .unwrap();
    let (state, message) = expect_error(
        &bob,
        &format!("BEGIN; INSERT INTO {schema}.mine VALUES (1, {token})"),
    )
    .await;
    bob.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(state, "42501", "{message}");
}

#[tokio::test]
async fn a_key_whose_plain_hash_collides_with_the_victims_does_not_hold_it() {
    let db = connect().await;
    ensure_test_roles(&db).await;
    // These two keys share their FNV-1a hash (found by a meet-in-the-middle
    // search); the key lock's hash is keyed, so they do not share a lock.
    let (victim, collider) = ("victim2", "bob:yurmbff");
    for key in [victim, collider] {
        db.execute("SELECT fence.lock_force_release($1)", &[&key])
            .await
            .unwrap();
    }
    let bob = connect_as("fence_test_bob").await;
    let token = acquire(&bob, collider, "1 hour", Some("bob"), "0")
        .await
        .unwrap()
        .unwrap();
    bob.batch_execute(&format!(
        "BEGIN; SELECT fence.lock_renew('{collider}', {token});"
    ))
    .await
    .unwrap();
    let alice = connect_as("fence_test_alice").await;
    let granted = acquire(&alice, victim, "10 seconds", None, "0")
        .await
        .unwrap();
    bob.batch_execute("COMMIT").await.unwrap();
    assert!(
        granted.is_some(),
        "the victim's key was held by a colliding key"
    );
    assert!(release(&alice, victim, granted.unwrap()).await.unwrap());
    assert!(release(&bob, collider, token).await.unwrap());
}

#[tokio::test]
async fn a_fence_admin_who_is_not_superuser_can_protect_and_protect_again() {
    let db = connect().await;
    ensure_test_roles(&db).await;
    let admin = connect_as("fence_test_admin").await;
    let table = unique_table("adminowned");
    admin
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int, tok bigint);
             SELECT fence.protect('{table}', lock_key => '{table}', token_column => 'tok');
             SELECT fence.protect('{table}', lock_key => '{table}:v2', token_column => 'tok');"
        ))
        .await
        .unwrap();
    let key: String = db
        .query_one(
            &format!("SELECT lock_key FROM fence.protected_tables WHERE tbl = '{table}'::regclass"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, format!("{table}:v2"));
    let token = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    admin
        .batch_execute(&format!("INSERT INTO {table} VALUES (1, {token})"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_fence_disabled_on_the_table_shows_as_not_enforced_for_the_family() {
    let db = connect().await;
    let table = unique_table("disabledpart");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int, status text) PARTITION BY LIST (status);
         CREATE TABLE {table}_open PARTITION OF {table} FOR VALUES IN ('open');
         SELECT fence.protect('{table}', lock_key => '{table}');"
    ))
    .await
    .unwrap();
    let enforced =
        format!("SELECT enforced FROM fence.protected_tables WHERE tbl = '{table}'::regclass");
    assert!(db
        .query_one(&enforced, &[])
        .await
        .unwrap()
        .get::<_, bool>(0));
    // Disabled on a partition, the clone is switched back (see below);
    // disabled on the fenced table itself (its owner can), the family follows.
    db.batch_execute(&format!(
        "ALTER TABLE {table} DISABLE TRIGGER zz_fence_guard"
    ))
    .await
    .unwrap();
    assert!(!db
        .query_one(&enforced, &[])
        .await
        .unwrap()
        .get::<_, bool>(0));
}

#[tokio::test]
async fn typed_tables_and_non_ascii_column_names_are_checked_like_any_other() {
    let db = connect().await;
    let table = unique_table("typed");
    db.batch_execute(&format!(
        "CREATE TYPE {table}_t AS (id int, other int, tok bigint);
         CREATE TABLE {table} OF {table}_t;
         SELECT fence.protect('{table}', key_column => 'id', key_prefix => '{table}:', token_column => 'tok');"
    ))
    .await
    .unwrap();
    let (state, message) = expect_error(
        &db,
        &format!("ALTER TYPE {table}_t RENAME ATTRIBUTE id TO idx CASCADE"),
    )
    .await;
    assert_eq!(state, "42703", "{message}");

    let konto = unique_table("konto");
    db.batch_execute(&format!(
        "CREATE TABLE {konto} (\"clé\" int, \"cl\\303\\251\" int, tok bigint);
         SELECT fence.protect('{konto}', key_column => 'clé', key_prefix => 'compte:é:', token_column => 'tok');"
    ))
    .await
    .unwrap();
    let row = db
        .query_one(
            &format!("SELECT key_column::text, key_prefix FROM fence.protected_tables WHERE tbl = '{konto}'::regclass"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "clé");
    assert_eq!(row.get::<_, String>(1), "compte:é:");
    let (state, _) = expect_error(
        &db,
        &format!("ALTER TABLE {konto} RENAME COLUMN \"clé\" TO was_key"),
    )
    .await;
    assert_eq!(state, "42703");
}

#[tokio::test]
async fn reset_does_not_turn_a_role_setting_into_a_token() {
    let db = connect().await;
    ensure_test_roles(&db).await;
    let table = unique_table("resettoken");
    let key = unique_key("resettoken");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int); SELECT fence.protect('{table}', lock_key => '{key}');
         GRANT INSERT ON {table} TO fence_test_alice;"
    ))
    .await
    .unwrap();
    let token = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    db.batch_execute(&format!(
        "ALTER ROLE fence_test_alice SET fence.token = '{token}'"
    ))
    .await
    .unwrap();
    let alice = connect_as("fence_test_alice").await;
    for reset in ["RESET fence.token;", "SET LOCAL fence.token TO DEFAULT;"] {
        let (state, _) = expect_error(
            &alice,
            &format!("BEGIN; {reset} INSERT INTO {table} VALUES (1)"),
        )
        .await;
        alice.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(state, "FN001", "{reset}");
    }
    db.batch_execute("ALTER ROLE fence_test_alice RESET fence.token")
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// Found by the fourth review.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn no_two_of_many_keys_share_a_lock() {
    // A 32-bit lock hash (even keyed) gives colliding pairs among a few
    // hundred thousand keys, found in a second by anyone who can compute it
    // or read pg_locks; the lock tag carries 64 bits.
    let db = connect().await;
    let shared: i64 = db
        .query_one(
            "SELECT count(*) FROM (
                 SELECT fence._key_lock_id('job-' || g) AS id FROM generate_series(1, 300000) AS g
             ) AS ids GROUP BY id HAVING count(*) > 1",
            &[],
        )
        .await
        .map(|row| row.get(0))
        .unwrap_or(0);
    assert_eq!(shared, 0, "two keys share a lock");
}

#[tokio::test]
async fn the_key_secret_cannot_change_while_backends_use_it() {
    let db = connect().await;
    for change in [
        "UPDATE fence.key_secret SET secret = fence._new_key_secret()",
        "DELETE FROM fence.key_secret",
        "TRUNCATE fence.key_secret",
        "INSERT INTO fence.key_secret SELECT fence._new_key_secret()",
    ] {
        let (state, message) = expect_error(&db, change).await;
        assert!(
            ["55000", "23505"].contains(&state.as_str()),
            "{change}: {state} {message}"
        );
    }
}

// ---------------------------------------------------------------------------
// Found by the fifth review.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_owner_of_one_partition_cannot_switch_the_fence_off_on_it() {
    let db = connect().await;
    ensure_test_roles(&db).await;
    let table = unique_table("ownedpart");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (k text, v int, tok bigint) PARTITION BY LIST (k);
         SELECT fence.protect('{table}', key_column => 'k', key_prefix => '{table}:', token_column => 'tok');
         CREATE TABLE {table}_b PARTITION OF {table} FOR VALUES IN ('b');
         ALTER TABLE {table}_b OWNER TO fence_test_bob;
         GRANT INSERT ON {table} TO fence_test_bob;"
    ))
    .await
    .unwrap();
    let bob = connect_as("fence_test_bob").await;
    for disable in [
        "DISABLE TRIGGER zz_fence_guard",
        "DISABLE TRIGGER USER",
        "ENABLE REPLICA TRIGGER zz_fence_guard",
    ] {
        bob.batch_execute(&format!("ALTER TABLE {table}_b {disable}"))
            .await
            .unwrap();
        let state = trigger_state(&db, &format!("{table}_b"), "zz_fence_guard").await;
        assert_eq!(state, "A", "{disable}");
        let (code, _) =
            expect_error(&bob, &format!("INSERT INTO {table} VALUES ('b', 1, NULL)")).await;
        assert_eq!(code, "FN001", "{disable}");
    }
}

#[tokio::test]
async fn blockers_show_a_first_grant_that_has_not_committed() {
    let db = connect().await;
    let key = unique_key("firstgrant");
    let holder = connect().await;
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT fence.lock_acquire('{key}', '1 second');"
        ))
        .await
        .unwrap();
    let pid = backend_pid(&holder).await;
    let shown: i64 = db
        .query_one(
            "SELECT count(*) FROM fence.blockers WHERE pid = $1 AND what = 'grant'",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(shown, 1);
}

#[tokio::test]
async fn a_database_that_is_not_utf8_cannot_fence() {
    let db = connect().await;
    for statement in [
        "DROP DATABASE IF EXISTS pg_fence_sql_ascii WITH (FORCE)",
        "CREATE DATABASE pg_fence_sql_ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    ] {
        db.simple_query(statement).await.unwrap();
    }
    let ascii = connect_to_database(port(), "postgres", "pg_fence_sql_ascii").await;
    ascii
        .batch_execute("CREATE EXTENSION pg_fence; CREATE TABLE kt (k text, v text);")
        .await
        .unwrap();
    let (state, message) = expect_error(
        &ascii,
        "SELECT fence.protect('kt', key_column => 'k', key_prefix => 'r:')",
    )
    .await;
    assert_eq!(state, "0A000", "{message}");
    drop(ascii);
    db.simple_query("DROP DATABASE pg_fence_sql_ascii WITH (FORCE)")
        .await
        .unwrap();
}
