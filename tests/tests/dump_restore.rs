//! G4 across a pg_dump and a restore into another cluster, where the roles
//! are re-created by name and get other OIDs: run-once records and leases
//! keep their roles, so restored work is not run again and restored leases
//! are not handed to whoever gets the old OID.

use std::process::Command;

use pg_fence_tests::*;

const SOURCE_PORT: u16 = 28818;
const TARGET_PORT: u16 = 28819;

fn pg_bin(tool: &str) -> String {
    format!("/usr/lib/postgresql/15/bin/{tool}")
}

async fn create_roles(db: &Client, roles: &[&str]) {
    for role in roles {
        db.batch_execute(&format!("CREATE ROLE {role} LOGIN"))
            .await
            .unwrap();
    }
    db.batch_execute("GRANT USAGE ON SCHEMA public TO PUBLIC")
        .await
        .unwrap();
}

async fn oid(db: &Client, role: &str) -> i64 {
    db.query_one(
        "SELECT oid::int8 FROM pg_roles WHERE rolname = $1",
        &[&role],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn run_once_records_and_leases_keep_their_roles_through_dump_and_restore() {
    let source = fresh_side_cluster("pg_fence_dump_source", SOURCE_PORT).await;
    create_roles(&source, &["dump_worker", "dump_other"]).await;
    let worker = connect_to(SOURCE_PORT, "dump_worker").await;
    worker
        .batch_execute("BEGIN; SELECT fence.claim_operation('invoice:1:email'); COMMIT;")
        .await
        .unwrap();
    let token: i64 = worker
        .query_one(
            "SELECT (fence.lock_acquire('invoice:1', '1 hour', 'w1')).token",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // A reader's lease, too.
    let reader: i64 = worker
        .query_one(
            "SELECT (fence.lock_acquire_shared('catalog:1', '1 hour', 'r1')).token",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let dump = std::env::temp_dir().join(format!("pg_fence_dump_{}.pgdump", std::process::id()));
    let status = Command::new(pg_bin("pg_dump"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &SOURCE_PORT.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-Fc", "-d", "pg_fence", "-f"])
        .arg(&dump)
        .status()
        .unwrap();
    assert!(status.success(), "pg_dump failed");

    // The target cluster's roles are made in another order, after others,
    // so their OIDs differ from the source's.
    let target = fresh_side_cluster("pg_fence_dump_target", TARGET_PORT).await;
    target
        .batch_execute(
            "DROP EXTENSION pg_fence; DROP SCHEMA fence; CREATE ROLE filler1; CREATE ROLE filler2;",
        )
        .await
        .unwrap();
    create_roles(&target, &["dump_other", "dump_worker"]).await;
    assert_ne!(
        oid(&source, "dump_worker").await,
        oid(&target, "dump_worker").await
    );
    let status = Command::new(pg_bin("pg_restore"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &TARGET_PORT.to_string(),
            "-U",
            "postgres",
        ])
        .args(["--exit-on-error", "-d", "pg_fence"])
        .arg(&dump)
        .status()
        .unwrap();
    let _ = std::fs::remove_file(&dump);
    assert!(status.success(), "pg_restore failed");

    let worker = connect_to(TARGET_PORT, "dump_worker").await;
    let other = connect_to(TARGET_PORT, "dump_other").await;
    // The work was done: claiming it again says so.
    let claimed: bool = worker
        .query_one("SELECT fence.claim_operation('invoice:1:email')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!claimed, "the restored run-once record was orphaned");
    // The lease is still the worker's, not the other role's.
    let owner: String = worker
        .query_one(
            "SELECT owner_role::text FROM fence.locks WHERE lock_key = 'invoice:1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "dump_worker");
    let (state, _) = expect_error(
        &other,
        &format!("SELECT fence.lock_release('invoice:1', {token})"),
    )
    .await;
    assert_eq!(state, "42501");
    assert!(release(&worker, "invoice:1", token).await.unwrap());
    // The restored reader is the worker's and still holds a writer off
    // (the writers' filter of the new server reads the restored rows).
    let mode: String = worker
        .query_one(
            "SELECT mode || ' ' || owner_role::text FROM fence.locks WHERE lock_key = 'catalog:1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode, "shared dump_worker");
    assert_eq!(
        acquire(&worker, "catalog:1", "1 minute", None, "0")
            .await
            .unwrap(),
        None
    );
    let (state, _) = expect_error(
        &other,
        &format!("SELECT fence.lock_release('catalog:1', {reader})"),
    )
    .await;
    assert_eq!(state, "42501");
    assert!(release(&worker, "catalog:1", reader).await.unwrap());
    // And the global order continues past the restored token (G1).
    let next = acquire(&worker, "invoice:2", "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert!(next > token);

    side_cluster("destroy", "pg_fence_dump_source", SOURCE_PORT);
    side_cluster("destroy", "pg_fence_dump_target", TARGET_PORT);
}
