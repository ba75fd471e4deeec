//! Waking: a release wakes a waiter of the same key in the same database,
//! not one of the same key name in another database (one database per
//! tenant is common), and only once the releaser's locks are gone.

use std::time::Duration;

use pg_fence_tests::*;

/// Wait until `count` sessions named `application_name` sleep in lock_acquire.
async fn until_waiting(db: &Client, application_name: &str, count: i64) {
    for _ in 0..200 {
        let waiting: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Extension'",
                &[&application_name],
            )
            .await
            .unwrap()
            .get(0);
        if waiting >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{count} sessions {application_name} never waited");
}

async fn named(port: u16, database: &str, application_name: &str) -> Client {
    let client = connect_to_database(port, "postgres", database).await;
    client
        .batch_execute(&format!("SET application_name = '{application_name}'"))
        .await
        .unwrap();
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_wakes_its_own_databases_waiter_not_anothers() {
    let other = fresh_database("pg_fence_tenant_b").await;
    other
        .batch_execute("CREATE EXTENSION pg_fence")
        .await
        .unwrap();
    let key = unique_key("tenant");
    let other_name = unique_table("tenant_b_waiter");
    // Five waiters for the same key name in the other database, held there
    // for the whole test.
    acquire(&other, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let mut decoys = Vec::new();
    for _ in 0..5 {
        let client = named(port(), "pg_fence_tenant_b", &other_name).await;
        let key = key.clone();
        decoys.push(tokio::spawn(async move {
            acquire(&client, &key, "1 minute", None, "30 seconds").await
        }));
    }
    until_waiting(&other, &other_name, 5).await;

    // Hand-offs in this database: how long from the release's commit to the
    // grant, by the server's clock. Woken by the release, well under the
    // 50 ms a waiter sleeps between rechecks; a wake-up that went to the
    // other database costs up to that.
    let holder = connect().await;
    let waiter_name = unique_table("tenant_a_waiter");
    let mut prompt = 0;
    let rounds = 8;
    let mut gaps = Vec::new();
    for _ in 0..rounds {
        let token = acquire(&holder, &key, "1 minute", None, "0")
            .await
            .unwrap()
            .unwrap();
        let waiter = named(port(), "pg_fence", &waiter_name).await;
        let k = key.clone();
        let waiting = tokio::spawn(async move {
            let row = waiter
                .query_one(
                    "SELECT l.token, extract(epoch FROM l.acquired_at)::float8
                       FROM fence.lock_acquire($1, '1 minute', NULL, '10 seconds') AS l",
                    &[&k],
                )
                .await
                .unwrap();
            (waiter, row.get::<_, i64>(0), row.get::<_, f64>(1))
        });
        until_waiting(&holder, &waiter_name, 1).await;
        // Past the waiter's first recheck, so only a wake-up brings it back soon.
        tokio::time::sleep(Duration::from_millis(60)).await;
        holder.batch_execute("BEGIN").await.unwrap();
        assert!(release(&holder, &key, token).await.unwrap());
        let released: f64 = holder
            .query_one(
                "SELECT extract(epoch FROM released_at)::float8 FROM fence.leases WHERE lock_key = $1",
                &[&key],
            )
            .await
            .unwrap()
            .get(0);
        holder.batch_execute("COMMIT").await.unwrap();
        let (waiter, granted, acquired) = waiting.await.unwrap();
        let gap_ms = (acquired - released) * 1000.0;
        gaps.push(gap_ms);
        if gap_ms < 15.0 {
            prompt += 1;
        }
        assert!(release(&waiter, &key, granted).await.unwrap());
    }
    // A wake-up sent to the other database's waiters (five of the six that
    // advertise the key's hash) leaves this one to its 50 ms recheck.
    assert!(
        prompt >= rounds - 2,
        "hand-offs (ms from release to grant): {gaps:?}"
    );
    for decoy in decoys {
        decoy.abort();
    }
}

/// A waiting acquire whose client goes away (its connection closed) ends
/// in the server within moments, rather than waiting on and granting a
/// lease nobody will ever hear of once the key frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_whose_client_is_gone_ends_and_grants_nothing() {
    let db = connect().await;
    let key = unique_key("wait-gone");
    let token = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=pg_fence",
            port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let pid = backend_pid(&client).await;
    let waiting = tokio::spawn({
        let key = key.clone();
        async move { acquire(&client, &key, "1 minute", Some("gone"), "30 seconds").await }
    });
    pg_fence_tests::until_waiting(&db, pid).await;
    // The client vanishes: its task and its socket.
    waiting.abort();
    connection.abort();
    let started = std::time::Instant::now();
    loop {
        let alive = count(
            &db,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
        )
        .await;
        if alive == 0 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "the backend of a vanished client kept waiting"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(release(&db, &key, token).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        live_token(&db, &key).await,
        None,
        "a lease was granted to nobody"
    );
}
