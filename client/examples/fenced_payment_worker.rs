//! A fenced payment worker: capture a payment under a lease, carrying the
//! lease's token into the write; a worker whose lease was taken over is
//! refused by the database itself (StaleToken), whatever it believes.
//!
//! `cargo run -p pg_fence_client --features deadpool-postgres --example fenced_payment_worker`

use std::time::Duration;

use pg_fence_client::backend::deadpool::{error, set_fence_token};
use pg_fence_client::{Backend, Error, Lease, LeaseOptions};

mod common;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let pool = common::pool();
    let table = format!("example_payments_{}", std::process::id());
    let client = pool
        .get()
        .await
        .map_err(|e| Error::Connection(e.to_string()))?;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, amount numeric NOT NULL, captured_by text);
             INSERT INTO {table} VALUES (7, 120.00, NULL);
             SELECT fence.protect('{table}', key_column => 'id', key_prefix => '{table}:');"
        ))
        .await
        .map_err(error)?;
    let key = format!("{table}:7");

    // Worker A takes a lease (a bare grant: nothing renews it), then stalls
    // past its ttl, as in a long GC pause.
    let a = pool
        .acquire_lease(
            &key,
            Duration::from_millis(500),
            "worker-a",
            Duration::ZERO,
            false,
        )
        .await?
        .expect("free");
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Worker B takes over and captures.
    let b = Lease::acquire(
        &pool,
        &key,
        &LeaseOptions::default(),
        Duration::from_secs(5),
    )
    .await?
    .expect("taken over");
    capture(&pool, &table, "worker-b", b.token()).await?;
    println!("worker B captured with token {}", b.token());

    // Worker A wakes up and tries too: refused by the database.
    match capture(&pool, &table, "worker-a", a.token).await {
        Err(Error::StaleToken { message }) => println!("worker A refused: {message}"),
        other => panic!("a stale write must be refused, got {other:?}"),
    }
    b.release().await?;

    let captured_by: String = client
        .query_one(
            &format!("SELECT captured_by FROM {table} WHERE id = 7"),
            &[],
        )
        .await
        .map_err(error)?
        .get(0);
    assert_eq!(captured_by, "worker-b");
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .map_err(error)?;
    Ok(())
}

async fn capture(
    pool: &deadpool_postgres::Pool,
    table: &str,
    worker: &str,
    token: i64,
) -> Result<(), Error> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| Error::Connection(e.to_string()))?;
    let transaction = client.transaction().await.map_err(error)?;
    set_fence_token(&transaction, token).await?;
    transaction
        .execute(
            &format!("UPDATE {table} SET captured_by = $1 WHERE id = 7"),
            &[&worker],
        )
        .await
        .map_err(error)?;
    transaction.commit().await.map_err(error)
}
