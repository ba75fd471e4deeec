//! Row locks, SKIP LOCKED queue claims and compare-and-set, racing, through
//! both drivers.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use pg_fence_client::{Cas, Error, RowLock, Table};
use pg_fence_tests::*;

async fn jobs_table(db: &Client) -> String {
    let table = unique_table("jobs");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, state text NOT NULL DEFAULT 'ready',
                               n int NOT NULL DEFAULT 0, version bigint NOT NULL DEFAULT 0);
         INSERT INTO {table} (id) SELECT generate_series(1, 20);"
    ))
    .await
    .unwrap();
    table
}

/// Every job claimed exactly once by one of the racing workers.
async fn check(db: &Client, table: &str, claimed: &Mutex<Vec<i32>>) {
    let claimed = claimed.lock().unwrap().clone();
    assert_eq!(claimed.len(), 20, "{claimed:?}");
    assert_eq!(
        claimed.iter().collect::<HashSet<_>>().len(),
        20,
        "a job was claimed twice"
    );
    // Every job was claimed and finished once (row 1 then also took the CAS
    // increments, which the callers check).
    let counts = format!(
        "SELECT count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE id > 1 AND n = 1) FROM {table}"
    );
    let row = db.query_one(&counts, &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (20, 19));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadpool_row_tools() {
    use pg_fence_client::rows::deadpool::{claim, compare_and_set, lock_row};
    let db = connect().await;
    let name = jobs_table(&db).await;
    let pool = deadpool_pool(&unique_table("rows")).await;
    let table = Table {
        name: &name,
        key_column: "id",
    };

    // Lock modes, against a row another transaction holds.
    let mut a = pool.get().await.unwrap();
    let mut b = pool.get().await.unwrap();
    let tx_a = a.transaction().await.unwrap();
    assert!(lock_row(&tx_a, table, &1i32, RowLock::Wait)
        .await
        .unwrap()
        .is_some());
    let tx_b = b.transaction().await.unwrap();
    assert!(lock_row(&tx_b, table, &1i32, RowLock::SkipLocked)
        .await
        .unwrap()
        .is_none());
    assert!(lock_row(&tx_b, table, &2i32, RowLock::SkipLocked)
        .await
        .unwrap()
        .is_some());
    let error = lock_row(&tx_b, table, &1i32, RowLock::NoWait)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::LockNotAvailable { .. }), "{error:?}");
    tx_b.rollback().await.unwrap();
    tx_a.commit().await.unwrap();
    drop((a, b));

    // Four workers drain the queue.
    let claimed = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (pool, name, claimed) = (pool.clone(), name.clone(), claimed.clone());
        workers.push(tokio::spawn(async move {
            let table = Table {
                name: &name,
                key_column: "id",
            };
            let mut client = pool.get().await.unwrap();
            loop {
                let tx = client.transaction().await.unwrap();
                let rows = claim(&tx, table, "state = 'ready'", 3).await.unwrap();
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    let id: i32 = row.get("id");
                    tx.execute(
                        &format!("UPDATE {name} SET state = 'done', n = n + 1 WHERE id = $1"),
                        &[&id],
                    )
                    .await
                    .unwrap();
                    claimed.lock().unwrap().push(id);
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }

    // Six incrementers on row 1's n via compare-and-set on its version.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (pool, name) = (pool.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let table = Table {
                name: &name,
                key_column: "id",
            };
            let mut client = pool.get().await.unwrap();
            for _ in 0..5 {
                loop {
                    let row = client
                        .query_one(&format!("SELECT n, version FROM {name} WHERE id = 1"), &[])
                        .await
                        .unwrap();
                    let (n, version): (i32, i64) = (row.get(0), row.get(1));
                    match compare_and_set(
                        &mut client,
                        table,
                        &1i32,
                        "version",
                        version,
                        "n = $3",
                        &(n + 1),
                    )
                    .await
                    .unwrap()
                    {
                        Cas::Updated { version: new } => {
                            assert_eq!(new, version + 1);
                            break;
                        }
                        Cas::Conflict { current } => assert_ne!(current, Some(version)),
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    check(&db, &name, &claimed).await;
    let n: i32 = db
        .query_one(&format!("SELECT n FROM {name} WHERE id = 1"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1 + 30, "claimed once, then 30 increments, none lost");
    let missing = compare_and_set(
        &mut pool.get().await.unwrap(),
        table,
        &999i32,
        "version",
        0,
        "n = $3",
        &1i32,
    )
    .await
    .unwrap();
    assert_eq!(missing, Cas::Conflict { current: None });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlx_row_tools() {
    use pg_fence_client::rows::sqlx::{claim, compare_and_set, lock_row};
    use sqlx::Row;
    let db = connect().await;
    let name = jobs_table(&db).await;
    let pool = sqlx_pool(&unique_table("rows")).await;
    let table = Table {
        name: &name,
        key_column: "id",
    };

    let mut tx_a = pool.begin().await.unwrap();
    assert!(lock_row(&mut tx_a, table, 1i32, RowLock::Wait)
        .await
        .unwrap()
        .is_some());
    let mut tx_b = pool.begin().await.unwrap();
    assert!(lock_row(&mut tx_b, table, 1i32, RowLock::SkipLocked)
        .await
        .unwrap()
        .is_none());
    let error = lock_row(&mut tx_b, table, 1i32, RowLock::NoWait)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::LockNotAvailable { .. }), "{error:?}");
    tx_b.rollback().await.unwrap();
    tx_a.commit().await.unwrap();

    let claimed = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (pool, name, claimed) = (pool.clone(), name.clone(), claimed.clone());
        workers.push(tokio::spawn(async move {
            let table = Table {
                name: &name,
                key_column: "id",
            };
            loop {
                let mut tx = pool.begin().await.unwrap();
                let rows = claim(&mut tx, table, "state = 'ready'", 3).await.unwrap();
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    let id: i32 = row.get("id");
                    ::sqlx::query(&format!(
                        "UPDATE {name} SET state = 'done', n = n + 1 WHERE id = $1"
                    ))
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    claimed.lock().unwrap().push(id);
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }

    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (pool, name) = (pool.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let table = Table {
                name: &name,
                key_column: "id",
            };
            let mut connection = pool.acquire().await.unwrap();
            for _ in 0..5 {
                loop {
                    let row = ::sqlx::query(&format!("SELECT n, version FROM {name} WHERE id = 1"))
                        .fetch_one(&mut *connection)
                        .await
                        .unwrap();
                    let (n, version): (i32, i64) = (row.get(0), row.get(1));
                    if let Cas::Updated { .. } = compare_and_set(
                        &mut connection,
                        table,
                        1i32,
                        "version",
                        version,
                        "n = $3",
                        n + 1,
                    )
                    .await
                    .unwrap()
                    {
                        break;
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    check(&db, &name, &claimed).await;
    let n: i32 = db
        .query_one(&format!("SELECT n FROM {name} WHERE id = 1"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1 + 30);
}
