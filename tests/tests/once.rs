//! Run-once (idempotency) through both drivers: concurrent duplicates run
//! the work exactly once; failed work leaves no record.

use std::sync::Arc;

use pg_fence_client::Once;
use pg_fence_tests::*;
use tokio::sync::Barrier;

async fn counter_table(db: &Client) -> String {
    let table = unique_table("once");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (n int NOT NULL); INSERT INTO {table} VALUES (0);"
    ))
    .await
    .unwrap();
    table
}

async fn count(db: &Client, table: &str) -> i32 {
    db.query_one(&format!("SELECT n FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadpool_duplicates_run_once() {
    use pg_fence_client::backend::deadpool::error;
    use pg_fence_client::once::deadpool::run_once;
    let db = connect().await;
    let table = counter_table(&db).await;
    let pool = deadpool_pool(&unique_table("once")).await;
    let key = unique_key("webhook");
    let barrier = Arc::new(Barrier::new(4));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (pool, key, barrier, update) = (
            pool.clone(),
            key.clone(),
            barrier.clone(),
            format!("UPDATE {table} SET n = n + 1"),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            run_once(&pool, &key, move |tx| {
                Box::pin(async move {
                    tx.execute(&update, &[]).await.map_err(error)?;
                    // Hold the transaction open a moment, so duplicates overlap.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    Ok(7)
                })
            })
            .await
            .unwrap()
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    assert_eq!(
        outcomes.iter().filter(|o| **o == Once::Ran(7)).count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| **o == Once::AlreadyDone).count(),
        3
    );
    assert_eq!(count(&db, &table).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlx_duplicates_run_once_and_failures_leave_no_record() {
    use pg_fence_client::once::sqlx::run_once;
    let db = connect().await;
    let table = counter_table(&db).await;
    let pool = sqlx_pool(&unique_table("once")).await;
    let key = unique_key("job");

    // Failed work: nothing committed, not even the record.
    let update = format!("UPDATE {table} SET n = n + 1");
    let failed = run_once(&pool, &key, |connection| {
        let update = update.clone();
        Box::pin(async move {
            ::sqlx::query(&update)
                .execute(&mut *connection)
                .await
                .map_err(pg_fence_client::backend::sqlx::error)?;
            Err::<(), _>(pg_fence_client::Error::Connection("the work failed".into()))
        })
    })
    .await;
    assert!(failed.is_err());
    assert_eq!(count(&db, &table).await, 0, "rolled back");

    let barrier = Arc::new(Barrier::new(4));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (pool, key, barrier, update) =
            (pool.clone(), key.clone(), barrier.clone(), update.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            run_once(&pool, &key, move |connection| {
                Box::pin(async move {
                    ::sqlx::query(&update)
                        .execute(&mut *connection)
                        .await
                        .map_err(pg_fence_client::backend::sqlx::error)?;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    Ok(())
                })
            })
            .await
            .unwrap()
        }));
    }
    let mut ran = 0;
    for task in tasks {
        if task.await.unwrap() == Once::Ran(()) {
            ran += 1;
        }
    }
    assert_eq!(ran, 1);
    assert_eq!(count(&db, &table).await, 1);
}

#[tokio::test]
async fn claim_operation_checks_its_argument_and_keys_are_per_role() {
    let db = connect().await;
    let (state, message) = expect_error(&db, "SELECT fence.claim_operation(NULL)").await;
    assert_eq!(state, "22004");
    assert!(message.contains("\"op_key\""), "{message}");
    let (state, _) = expect_error(&db, "SELECT fence.claim_operation('')").await;
    assert_eq!(state, "22023");

    ensure_test_roles(&db).await;
    let key = unique_key("per-role");
    let alice = connect_as("fence_test_alice").await;
    let bob = connect_as("fence_test_bob").await;
    let claim = "SELECT fence.claim_operation($1)";
    assert!(alice
        .query_one(claim, &[&key])
        .await
        .unwrap()
        .get::<_, bool>(0));
    assert!(
        !alice
            .query_one(claim, &[&key])
            .await
            .unwrap()
            .get::<_, bool>(0),
        "done for alice"
    );
    assert!(
        bob.query_one(claim, &[&key])
            .await
            .unwrap()
            .get::<_, bool>(0),
        "bob's key space is his own"
    );
    let (state, _) = expect_error(&bob, "SELECT * FROM fence.operations").await;
    assert_eq!(state, "42501", "the records are not readable by everyone");
}
