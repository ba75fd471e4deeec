//! Run-once (idempotency) through both drivers: concurrent duplicates run
//! the work exactly once; failed work leaves no record.

use std::sync::Arc;

use pg_fence_client::{Error as ClientError, Once};
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
                    Ok::<_, pg_fence_client::Error>(7)
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
                .persistent(false)
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
                        .persistent(false)
                        .execute(&mut *connection)
                        .await
                        .map_err(pg_fence_client::backend::sqlx::error)?;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    Ok::<_, pg_fence_client::Error>(())
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

/// Issue 16, 4: work that catches a SQL error and carries on leaves its
/// transaction aborted, and COMMIT then rolls back without an error:
/// run_once must not report `Ran`, and the work must run again next time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn work_that_swallows_a_sql_error_is_not_reported_as_ran() {
    let db = connect().await;
    let table = counter_table(&db).await;
    let update = format!("UPDATE {table} SET n = n + 1");
    {
        use pg_fence_client::once::deadpool::run_once;
        let pool = deadpool_pool(&unique_table("once-aborted")).await;
        let key = unique_key("once-aborted-dpool");
        let first = update.clone();
        let outcome = run_once(&pool, &key, move |tx| {
            Box::pin(async move {
                tx.execute(&first, &[])
                    .await
                    .map_err(pg_fence_client::backend::deadpool::error)?;
                // An error the work catches and does not pass on.
                let _ = tx.execute("SELECT 1 / 0", &[]).await;
                Ok::<_, ClientError>(7)
            })
        })
        .await;
        assert!(
            matches!(outcome, Err(ClientError::WorkRolledBack { .. })),
            "{outcome:?}"
        );
        assert_eq!(count(&db, &table).await, 0, "nothing committed");
        // The record went with it: the next call runs the work.
        let again = run_once(&pool, &key, move |tx| {
            let update = update.clone();
            Box::pin(async move {
                tx.execute(&update, &[])
                    .await
                    .map_err(pg_fence_client::backend::deadpool::error)?;
                Ok::<_, ClientError>(8)
            })
        })
        .await
        .unwrap();
        assert_eq!(again, Once::Ran(8));
    }
    {
        use pg_fence_client::once::sqlx::run_once;
        let pool = sqlx_pool(&unique_table("once-aborted")).await;
        let key = unique_key("once-aborted-sqlx");
        let update = format!("UPDATE {table} SET n = n + 1");
        let outcome = run_once(&pool, &key, |connection| {
            let update = update.clone();
            Box::pin(async move {
                // Not persistent: through a transaction pooler (the
                // PgBouncer tier) a named statement outlives the
                // transaction on a server connection others get next.
                ::sqlx::query(&update)
                    .persistent(false)
                    .execute(&mut *connection)
                    .await
                    .map_err(pg_fence_client::backend::sqlx::error)?;
                let _ = ::sqlx::query("SELECT 1 / 0")
                    .persistent(false)
                    .execute(&mut *connection)
                    .await;
                Ok::<_, ClientError>(7)
            })
        })
        .await;
        assert!(
            matches!(outcome, Err(ClientError::WorkRolledBack { .. })),
            "{outcome:?}"
        );
        assert_eq!(
            count(&db, &table).await,
            1,
            "only the deadpool run's second call"
        );
    }
}

/// Issue 16, 4: the work's own error type comes back as it is, not as an
/// "ambiguous" connection error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_works_own_error_comes_back_as_it_is() {
    use pg_fence_client::once::sqlx::run_once;
    #[derive(Debug, PartialEq)]
    enum Refund {
        AlreadyRefunded,
        Client(String),
    }
    impl From<ClientError> for Refund {
        fn from(error: ClientError) -> Refund {
            Refund::Client(error.to_string())
        }
    }
    let pool = sqlx_pool(&unique_table("once-own-error")).await;
    let key = unique_key("once-own-error");
    let outcome = run_once(&pool, &key, |_connection| {
        Box::pin(async move { Err::<(), _>(Refund::AlreadyRefunded) })
    })
    .await;
    assert_eq!(outcome, Err(Refund::AlreadyRefunded));
}

/// Issue 16, 4: a commit whose reply is lost is ambiguous, and says so; a
/// retry with the same key tells what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_without_a_reply_is_ambiguous() {
    use pg_fence_client::once::deadpool::run_once;
    let db = connect().await;
    // A deferred trigger that makes COMMIT take a second: long enough to
    // end the session while its commit is on its way.
    let table = unique_table("slow_commit");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (n int);
         CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {table}
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {table}_slow();"
    ))
    .await
    .unwrap();
    let pool = deadpool_pool(&unique_table("once-ambiguous")).await;
    let key = unique_key("once-ambiguous");
    let admin = connect().await;
    let insert = format!("INSERT INTO {table} VALUES (1)");
    let outcome = run_once(&pool, &key, move |tx| {
        Box::pin(async move {
            tx.execute(&insert, &[])
                .await
                .map_err(pg_fence_client::backend::deadpool::error)?;
            let pid: i32 = tx
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .map_err(pg_fence_client::backend::deadpool::error)?
                .get(0);
            // Ended halfway through the commit's deferred trigger.
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(400)).await;
                admin
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .unwrap();
            });
            Ok::<_, ClientError>(1)
        })
    })
    .await;
    assert!(
        matches!(&outcome, Err(ClientError::CommitAmbiguous { .. })),
        "{outcome:?}"
    );
    // It had not committed (the session ended inside COMMIT): a retry runs
    // (after the pool has let go of the dead connection).
    let mut retry = None;
    for _ in 0..5 {
        match run_once(&pool, &key, |_tx| {
            Box::pin(async move { Ok::<_, ClientError>(2) })
        })
        .await
        {
            Ok(outcome) => {
                retry = Some(outcome);
                break;
            }
            Err(error) if error.is_ambiguous() => continue,
            Err(error) => panic!("{error:?}"),
        }
    }
    assert_eq!(retry, Some(Once::Ran(2)));
}

/// Review of issue 16, 4: work that ends the run-once transaction itself
/// (a ROLLBACK or COMMIT of its own) is not reported as `Ran`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn work_that_ends_the_transaction_itself_is_not_reported_as_ran() {
    {
        use pg_fence_client::once::deadpool::run_once;
        let pool = deadpool_pool(&unique_table("once-ended")).await;
        let key = unique_key("once-ended-dpool");
        let outcome = run_once(&pool, &key, |tx| {
            Box::pin(async move {
                tx.batch_execute("ROLLBACK")
                    .await
                    .map_err(pg_fence_client::backend::deadpool::error)?;
                Ok::<_, ClientError>(1)
            })
        })
        .await;
        assert!(
            matches!(outcome, Err(ClientError::WorkEndedTransaction)),
            "{outcome:?}"
        );
    }
    {
        use pg_fence_client::once::sqlx::run_once;
        let pool = sqlx_pool(&unique_table("once-ended")).await;
        let key = unique_key("once-ended-sqlx");
        let outcome = run_once(&pool, &key, |connection| {
            Box::pin(async move {
                ::sqlx::query("ROLLBACK")
                    .persistent(false)
                    .execute(&mut *connection)
                    .await
                    .map_err(pg_fence_client::backend::sqlx::error)?;
                Ok::<_, ClientError>(1)
            })
        })
        .await;
        assert!(
            matches!(outcome, Err(ClientError::WorkEndedTransaction)),
            "{outcome:?}"
        );
    }
}
