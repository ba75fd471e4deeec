//! G4: only the role that acquired a lease, or a member of fence_admin, may
//! renew, release or force it; nobody writes the lease table directly.

use pg_fence_tests::*;

#[tokio::test]
async fn only_the_owner_or_fence_admin_may_renew_release_or_force() {
    let superuser = connect().await;
    ensure_test_roles(&superuser).await;
    let alice = connect_as("fence_test_alice").await;
    let bob = connect_as("fence_test_bob").await;
    let admin = connect_as("fence_test_admin").await;

    let key = unique_key("owned");
    let token = acquire(&alice, &key, "60 seconds", Some("alice-worker"), "0")
        .await
        .unwrap()
        .unwrap();
    let owner: String = bob
        .query_one(
            "SELECT owner_role::text FROM fence.locks WHERE lock_key = $1",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "fence_test_alice");

    for sql in [
        format!("SELECT fence.lock_renew('{key}', {token})"),
        format!("SELECT fence.lock_release('{key}', {token})"),
        format!("SELECT fence.lock_force_release('{key}')"),
        // Knowing the holder id is not enough either (G6 is per role).
        format!("SELECT fence.lock_acquire('{key}', '1 second', 'alice-worker')"),
    ] {
        let (state, message) = expect_error(&bob, &sql).await;
        assert_eq!(state, "42501", "{sql}: {message}");
        assert!(
            message.contains(&key) && message.contains(&token.to_string()),
            "names key and token: {message}"
        );
        assert!(
            message.contains("fence_test_alice") && message.contains("fence_test_bob"),
            "{message}"
        );
    }
    // A wrong token is simply not live: NULL / false, not a privilege error.
    assert!(!renew(&bob, &key, token + 1).await.unwrap());
    assert!(!release(&bob, &key, token + 1).await.unwrap());
    assert_eq!(live_token(&bob, &key).await, Some(token), "still alice's");

    // The owner may renew and release its own lease.
    assert!(renew(&alice, &key, token).await.unwrap());

    // fence_admin may renew and force anyone's lease.
    assert!(renew(&admin, &key, token).await.unwrap());
    let forced: bool = admin
        .query_one("SELECT fence.lock_force_release($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(forced);
    assert!(
        !renew(&alice, &key, token).await.unwrap(),
        "a forced lease is lost"
    );
    let again: bool = admin
        .query_one("SELECT fence.lock_force_release($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(!again, "nothing live to force");

    // Bob can take the key now, and release it himself.
    let bobs = acquire(&bob, &key, "60 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert!(bobs > token);
    let (state, _) = expect_error(
        &alice,
        &format!("SELECT fence.lock_release('{key}', {bobs})"),
    )
    .await;
    assert_eq!(state, "42501");
    assert!(release(&bob, &key, bobs).await.unwrap());
}

#[tokio::test]
async fn set_role_is_the_role_that_counts() {
    let superuser = connect().await;
    ensure_test_roles(&superuser).await;
    let key = unique_key("set-role");
    superuser
        .batch_execute("SET ROLE fence_test_alice")
        .await
        .unwrap();
    let token = acquire(&superuser, &key, "60 seconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    superuser.batch_execute("RESET ROLE").await.unwrap();
    let owner: String = superuser
        .query_one(
            "SELECT owner_role::text FROM fence.locks WHERE lock_key = $1",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "fence_test_alice");
    superuser
        .batch_execute("SET ROLE fence_test_bob")
        .await
        .unwrap();
    let (state, _) = expect_error(
        &superuser,
        &format!("SELECT fence.lock_release('{key}', {token})"),
    )
    .await;
    assert_eq!(state, "42501");
    superuser.batch_execute("RESET ROLE").await.unwrap();
}

#[tokio::test]
async fn nobody_writes_the_lease_table_directly() {
    let superuser = connect().await;
    ensure_test_roles(&superuser).await;
    let bob = connect_as("fence_test_bob").await;
    for sql in [
        "INSERT INTO fence.leases VALUES ('forged', 'me', 999999999, '1 hour', now(), now() + '1 hour', NULL, 10, NULL)",
        "UPDATE fence.leases SET expires_at = now() + interval '1 year'",
        "DELETE FROM fence.leases",
        "SELECT nextval('fence.token_seq')",
    ] {
        let (state, _) = expect_error(&bob, sql).await;
        assert_eq!(state, "42501", "{sql}");
    }
    // Reading is allowed.
    bob.query("SELECT * FROM fence.locks", &[]).await.unwrap();
}
