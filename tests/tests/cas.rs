//! Compare-and-set in autocommit, through both drivers' pools: six tasks
//! race to increment one row, five times each, re-reading on conflict; no
//! update is lost and none fails. In the pooler tier (make test-pgbouncer)
//! the pools go through PgBouncer in transaction mode, where a statement a
//! driver prepares in one round trip and runs in the next can land on
//! another server connection: compare_and_set runs in a transaction of its
//! own so that it cannot. The reads go straight to the database.

use pg_fence_client::rows::{Cas, Table};
use pg_fence_tests::*;

async fn counter(db: &Client) -> String {
    let name = unique_table("cas");
    db.batch_execute(&format!(
        "CREATE TABLE {name} (id int PRIMARY KEY, n int NOT NULL, version bigint NOT NULL);
         INSERT INTO {name} VALUES (1, 0, 0);"
    ))
    .await
    .unwrap();
    name
}

async fn read(db: &Client, name: &str) -> (i32, i64) {
    let row = db
        .query_one(&format!("SELECT n, version FROM {name} WHERE id = 1"), &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadpool_compare_and_set_races_in_autocommit() {
    use pg_fence_client::rows::deadpool::compare_and_set;
    let db = connect().await;
    let name = counter(&db).await;
    let pool = deadpool_pool(&unique_table("cas")).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (pool, name) = (pool.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let db = connect().await;
            let table = Table {
                name: &name,
                key_column: "id",
            };
            for _ in 0..5 {
                loop {
                    let (n, version) = read(&db, &name).await;
                    let mut client = pool.get().await.unwrap();
                    let outcome = compare_and_set(
                        &mut client,
                        table,
                        &1i32,
                        "version",
                        version,
                        "n = $3",
                        &(n + 1),
                    )
                    .await
                    .unwrap();
                    if matches!(outcome, Cas::Updated { .. }) {
                        break;
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(read(&db, &name).await, (30, 30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlx_compare_and_set_races_in_autocommit() {
    use pg_fence_client::rows::sqlx::compare_and_set;
    let db = connect().await;
    let name = counter(&db).await;
    let pool = sqlx_pool(&unique_table("cas")).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (pool, name) = (pool.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let db = connect().await;
            let table = Table {
                name: &name,
                key_column: "id",
            };
            for _ in 0..5 {
                loop {
                    let (n, version) = read(&db, &name).await;
                    let mut connection = pool.acquire().await.unwrap();
                    let outcome = compare_and_set(
                        &mut connection,
                        table,
                        1i32,
                        "version",
                        version,
                        "n = $3",
                        n + 1,
                    )
                    .await
                    .unwrap();
                    if matches!(outcome, Cas::Updated { .. }) {
                        break;
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(read(&db, &name).await, (30, 30));
}
