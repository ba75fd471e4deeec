//! Transfers between accounts under multi-key leases: each transfer holds
//! both accounts under one lease (one token for both keys), reads the
//! balances, and writes both rows carrying that token. Three workers move
//! money around a cycle (1 → 2, 2 → 3, 3 → 1) at once, the order in which
//! per-account locks taken one by one deadlock; here nothing waits while
//! holding, and not one update is lost. A write under a released lease is
//! refused by the database.
//!
//! `cargo run -p pg_fence_client --features deadpool-postgres --example account_transfer`

use std::time::Duration;

use pg_fence_client::backend::deadpool::{error, pool_error};
use pg_fence_client::{Error, Lease, LeaseOptions};

mod common;

const TRANSFERS_EACH: i64 = 50;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let pool = common::pool();
    let table = format!("example_accounts_{}", std::process::id());
    let client = pool.get().await.map_err(pool_error)?;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, token bigint, balance bigint NOT NULL);
             INSERT INTO {table} VALUES (1, 0, 1000), (2, 0, 1000), (3, 0, 1000);
             SELECT fence.protect('{table}', key_column => 'id', key_prefix => '{table}:', token_column => 'token');"
        ))
        .await
        .map_err(error)?;

    let mut workers = Vec::new();
    for (from, to, amount) in [(1, 2, 1), (2, 3, 2), (3, 1, 3)] {
        let (pool, table) = (pool.clone(), table.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..TRANSFERS_EACH {
                transfer(&pool, &table, from, to, amount).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for worker in workers {
        worker.await.expect("worker")?;
    }
    let balances: Vec<i64> = client
        .query(&format!("SELECT balance FROM {table} ORDER BY id"), &[])
        .await
        .map_err(error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    // Each account sent and received 50 transfers: 1 gains 3·50 − 1·50.
    assert_eq!(balances, [1100, 950, 950], "an update was lost");
    println!(
        "{} transfers by 3 workers around the cycle 1 → 2 → 3 → 1: no deadlock, no lost update",
        3 * TRANSFERS_EACH
    );
    println!(
        "balances: account 1 = {}, account 2 = {}, account 3 = {} (total {})",
        balances[0],
        balances[1],
        balances[2],
        balances.iter().sum::<i64>()
    );

    // A lease released, its token writes nothing under either key.
    let keys = [format!("{table}:1"), format!("{table}:2")];
    let lease = Lease::try_acquire_all(&pool, &keys, &LeaseOptions::default())
        .await?
        .expect("free");
    let token = lease.token();
    lease.release().await?;
    match write_both(&pool, &table, 1, 2, 1, token).await {
        Err(Error::StaleToken { .. }) => {
            println!("a transfer under the released lease: refused (StaleToken)")
        }
        other => panic!("a stale transfer must be refused, got {other:?}"),
    }
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .map_err(error)?;
    Ok(())
}

/// One transfer: both accounts under one lease, a read, two fenced writes.
async fn transfer(
    pool: &deadpool_postgres::Pool,
    table: &str,
    from: i32,
    to: i32,
    amount: i64,
) -> Result<(), Error> {
    let keys = [format!("{table}:{from}"), format!("{table}:{to}")];
    let lease = Lease::acquire_all(
        pool,
        &keys,
        &LeaseOptions::default(),
        Duration::from_secs(30),
    )
    .await?
    .expect("both accounts within 30 s");
    write_both(pool, table, from, to, amount, lease.token()).await?;
    lease.release().await?;
    Ok(())
}

/// Read both balances, then write both rows with `token`, in one
/// transaction: a read-modify-write that only the lease keeps exact.
async fn write_both(
    pool: &deadpool_postgres::Pool,
    table: &str,
    from: i32,
    to: i32,
    amount: i64,
    token: i64,
) -> Result<(), Error> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let transaction = client.transaction().await.map_err(error)?;
    let read = format!("SELECT balance FROM {table} WHERE id = $1");
    let from_balance: i64 = transaction
        .query_one(&read, &[&from])
        .await
        .map_err(error)?
        .get(0);
    let to_balance: i64 = transaction
        .query_one(&read, &[&to])
        .await
        .map_err(error)?
        .get(0);
    let write = format!("UPDATE {table} SET balance = $1, token = $2 WHERE id = $3");
    transaction
        .execute(&write, &[&(from_balance - amount), &token, &from])
        .await
        .map_err(error)?;
    transaction
        .execute(&write, &[&(to_balance + amount), &token, &to])
        .await
        .map_err(error)?;
    transaction.commit().await.map_err(error)
}
