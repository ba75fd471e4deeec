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
