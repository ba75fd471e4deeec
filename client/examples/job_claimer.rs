//! A SKIP LOCKED job claimer: three workers drain one queue table, each
//! claiming up to five ready jobs at a time in its own transaction; no job is
//! processed twice and none is missed.
//!
//! `cargo run -p pg_fence_client --features deadpool-postgres --example job_claimer`

use pg_fence_client::backend::deadpool::error;
use pg_fence_client::rows::deadpool::claim;
use pg_fence_client::{Error, Table};

mod common;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let pool = common::pool();
    let name = format!("example_jobs_{}", std::process::id());
    let setup = pool
        .get()
        .await
        .map_err(|e| Error::Connection(e.to_string()))?;
    setup
        .batch_execute(&format!(
            "CREATE TABLE {name} (id int PRIMARY KEY, state text NOT NULL DEFAULT 'ready', worker int);
             INSERT INTO {name} (id) SELECT generate_series(1, 60);"
        ))
        .await
        .map_err(error)?;

    let mut workers = Vec::new();
    for worker in 0..3i32 {
        let (pool, name) = (pool.clone(), name.clone());
        workers.push(tokio::spawn(async move {
            let mut client = pool
                .get()
                .await
                .map_err(|e| Error::Connection(e.to_string()))?;
            let mut done = 0;
            loop {
                let transaction = client.transaction().await.map_err(error)?;
                let jobs = claim(
                    &transaction,
                    Table {
                        name: &name,
                        key_column: "id",
                    },
                    "state = 'ready'",
                    5,
                )
                .await?;
                if jobs.is_empty() {
                    break;
                }
                for job in &jobs {
                    let id: i32 = job.get("id");
                    // ... do the job ...
                    transaction
                        .execute(
                            &format!("UPDATE {name} SET state = 'done', worker = $2 WHERE id = $1"),
                            &[&id, &worker],
                        )
                        .await
                        .map_err(error)?;
                }
                transaction.commit().await.map_err(error)?;
                done += jobs.len();
            }
            Ok::<_, Error>(done)
        }));
    }
    let mut total = 0;
    for (worker, handle) in workers.into_iter().enumerate() {
        let done = handle.await.expect("worker task")?;
        println!("worker {worker} did {done} jobs");
        total += done;
    }
    let row = setup
        .query_one(
            &format!("SELECT count(*) FILTER (WHERE state = 'done'), count(*) FROM {name}"),
            &[],
        )
        .await
        .map_err(error)?;
    assert_eq!(
        (total, row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (60, 60, 60),
        "each job exactly once"
    );
    println!("60 jobs, each done exactly once");
    setup
        .batch_execute(&format!("DROP TABLE {name}"))
        .await
        .map_err(error)?;
    Ok(())
}
