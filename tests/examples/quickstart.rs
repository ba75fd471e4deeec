//! The README's Rust quick start, run by `make test`: any language can use
//! pg_fence through plain SQL; here with tokio-postgres.

use tokio_postgres::NoTls;

#[tokio::main]
async fn main() -> Result<(), tokio_postgres::Error> {
    let port = std::env::var("PGFENCE_PORT").unwrap_or_else(|_| "28815".into());
    let (db, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=pg_fence"),
        NoTls,
    )
    .await?;
    tokio::spawn(connection);

    // Try for the lease, waiting up to 5 seconds inside the server.
    let row = db
        .query_one(
            "SELECT token FROM fence.lock_acquire('report:daily', ttl => '30 seconds', wait => '5 seconds')",
            &[],
        )
        .await?;
    let Some(token) = row.get::<_, Option<i64>>(0) else {
        println!("someone else is running the daily report");
        return Ok(());
    };
    println!("running the daily report with fencing token {token}");

    // ... long work: renew well inside the ttl ...
    let renewed = db
        .query_one(
            "SELECT fence.lock_renew('report:daily', $1) IS NOT NULL",
            &[&token],
        )
        .await?;
    assert!(renewed.get::<_, bool>(0), "lease lost: stop working");

    let released: bool = db
        .query_one("SELECT fence.lock_release('report:daily', $1)", &[&token])
        .await?
        .get(0);
    println!("released: {released}");
    Ok(())
}
