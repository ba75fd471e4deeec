//! The server goes away under a held lease: the client reports the loss
//! (DeadlinePassed) at its local deadline, before the lease could have
//! expired on the server, through both backends. Runs on its own cluster
//! (scripts/cluster.sh with another base and port), which it stops.

use std::time::Duration;

use pg_fence_client::{Backend, Lease, LeaseOptions, LossReason};
use pg_fence_tests::*;
use tokio::time::Instant;

const PORT: u16 = 28817;

type LossFuture = std::pin::Pin<Box<dyn std::future::Future<Output = LossReason> + Send>>;

fn cluster(action: &str) {
    side_cluster(action, "pg_fence_outage", PORT);
}

async fn hold<B: Backend>(backend: &B, key: &str) -> (Lease<B>, Instant) {
    let options = LeaseOptions::new(Duration::from_secs(3))
        .renew_every(Duration::from_millis(300))
        .safety_margin(Duration::from_millis(300));
    let asked = Instant::now();
    let lease = Lease::try_acquire(backend, key, &options)
        .await
        .unwrap()
        .expect("free key");
    (lease, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_server_is_reported_at_the_local_deadline_before_the_server_expiry() {
    let setup = fresh_side_cluster("pg_fence_outage", PORT).await;

    let mut config = deadpool_postgres::Config::new();
    config.host = Some("127.0.0.1".into());
    config.port = Some(PORT);
    config.user = Some("postgres".into());
    config.dbname = Some("pg_fence".into());
    let deadpool = config
        .create_pool(Some(deadpool_postgres::Runtime::Tokio1), NoTls)
        .unwrap();
    let sqlx = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500))
        .connect(&format!("postgres://postgres@127.0.0.1:{PORT}/pg_fence"))
        .await
        .unwrap();

    let (deadpool_lease, deadpool_asked) = hold(&deadpool, "outage:deadpool").await;
    let (sqlx_lease, sqlx_asked) = hold(&sqlx, "outage:sqlx").await;
    drop(setup);
    tokio::task::spawn_blocking(|| cluster("stop"))
        .await
        .unwrap();

    for (name, lost, deadline, asked) in [
        (
            "deadpool",
            Box::pin(deadpool_lease.lost()) as LossFuture,
            deadpool_lease.deadline().unwrap(),
            deadpool_asked,
        ),
        (
            "sqlx",
            Box::pin(sqlx_lease.lost()) as LossFuture,
            sqlx_lease.deadline().unwrap(),
            sqlx_asked,
        ),
    ] {
        let reason = tokio::time::timeout(Duration::from_secs(10), lost)
            .await
            .expect("the loss is reported");
        assert_eq!(reason, LossReason::DeadlinePassed, "{name}");
        let now = Instant::now();
        // Not before the deadline: failures were retried, not reported early...
        assert!(
            now + Duration::from_millis(50) >= deadline,
            "{name}: reported {:?} early",
            deadline - now
        );
        // ...and before the server could have let the lease expire.
        assert!(
            now < asked + Duration::from_secs(3),
            "{name}: reported after the server expiry"
        );
    }
    drop((deadpool_lease, sqlx_lease));
    cluster("destroy");
}

/// A waiting acquire given up by its caller (its future dropped) must not
/// leave its statement running on a connection the pool hands to the next
/// user: through a pool of one connection, a renewal right after such a
/// cancel answers at once, not when the abandoned wait would have ended
/// (both drivers waited the whole 10 s before the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_wait_does_not_hold_up_the_next_user_of_its_connection() {
    let mut config = deadpool_postgres::Config::new();
    config.host = Some("127.0.0.1".into());
    config.port = Some(port());
    config.user = Some("postgres".into());
    config.dbname = Some("pg_fence".into());
    config.pool = Some(deadpool_postgres::PoolConfig::new(1));
    let deadpool = config
        .create_pool(Some(deadpool_postgres::Runtime::Tokio1), NoTls)
        .unwrap();
    cancelled_wait_through(deadpool).await;
    let options = sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port())
        .username("postgres")
        .database("pg_fence");
    let sqlx = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    cancelled_wait_through(sqlx).await;
}

async fn cancelled_wait_through<B: Backend>(pool: B) {
    let db = connect().await;
    let busy = unique_key("cancel-busy");
    let held = acquire(&db, &busy, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let other = unique_key("cancel-other");
    let lease = Lease::try_acquire(&pool, &other, &LeaseOptions::default())
        .await
        .unwrap()
        .expect("free");
    // A wait of 10 s on the busy key, given up after 200 ms.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        Backend::acquire_lease(
            &pool,
            &busy,
            Duration::from_secs(30),
            "w",
            Duration::from_secs(10),
            false,
        ),
    )
    .await;
    assert!(gave_up.is_err(), "the wait was cut short");
    let started = std::time::Instant::now();
    let renewed = pool
        .renew(&other, lease.token(), Duration::from_secs(30))
        .await
        .unwrap();
    assert!(renewed.is_some());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the renewal waited {:?} behind the abandoned wait",
        started.elapsed()
    );
    assert!(lease.release().await.unwrap());
    assert!(release(&db, &busy, held).await.unwrap());
}
