//! Preload mode and its absence, on a cluster of this test's own (port
//! 28822): without `shared_preload_libraries` every 0.1 call works and the
//! calls that need shared memory fail with 55000 and a hint; with it, a
//! full class table counts the rest under '*', and a backend that crashes
//! while waiting leaves nothing behind once the server has restarted.

use std::time::Duration;

use pg_fence_tests::*;

const BASE: &str = "pg_fence_preload";
const PORT: u16 = 28822;

async fn reconnect() -> Client {
    for _ in 0..300 {
        let config = format!("host=127.0.0.1 port={PORT} user=postgres dbname=pg_fence");
        if let Ok((client, connection)) = tokio_postgres::connect(&config, NoTls).await {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            if client.simple_query("SELECT 1").await.is_ok() {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the side cluster did not come back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_preload_the_shared_memory_calls_fail_with_55000_and_the_rest_works() {
    side_cluster("destroy", BASE, PORT);
    side_cluster_preloading("start", BASE, PORT, false);
    let db = connect_to(PORT, "postgres").await;
    db.batch_execute(
        "CREATE EXTENSION pg_fence;
         CREATE TABLE t (id int PRIMARY KEY, fence_token bigint);
         SELECT fence.protect('t', key_column => 'id', key_prefix => 't:', token_column => 'fence_token');",
    )
    .await
    .unwrap();
    for sql in [
        "SELECT * FROM fence.lock_stats",
        "SELECT * FROM fence.lock_wait_histogram",
        "SELECT * FROM fence.lock_stats_info",
        "SELECT * FROM fence.waiters",
        "SELECT fence.lock_stats_reset()",
    ] {
        match db.simple_query(sql).await {
            Ok(_) => panic!("{sql} worked without preload"),
            Err(error) => {
                let db_error = error.as_db_error().expect("a database error");
                assert_eq!(db_error.code().code(), "55000", "{sql}");
                assert!(
                    db_error
                        .hint()
                        .unwrap_or_default()
                        .contains("shared_preload_libraries"),
                    "{sql}: {:?}",
                    db_error.hint()
                );
            }
        }
    }
    // Leases, waiting and fencing work as in 0.1.
    let token = acquire(&db, "t:1", "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let other = connect_to(PORT, "postgres").await;
    let waiter =
        tokio::spawn(async move { acquire(&other, "t:1", "1 minute", None, "10 seconds").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    db.execute("INSERT INTO t VALUES (1, $1)", &[&token])
        .await
        .unwrap();
    let (state, _) = expect_error(&db, "INSERT INTO t VALUES (2, 0)").await;
    assert_eq!(state, "FN001");
    assert!(release(&db, "t:1", token).await.unwrap());
    assert!(waiter.await.unwrap().unwrap().unwrap() > token);
    // Shared leases work without a queue: readers share, a writer waits
    // for the last of them, and readers waiting for the writer's release
    // all get in together.
    let share =
        "SELECT (fence.lock_acquire_shared('r:1', '1 minute', NULL, $1::text::interval)).token";
    let reader: i64 = db.query_one(share, &[&"0"]).await.unwrap().get(0);
    let writer_session = connect_to(PORT, "postgres").await;
    let writer = tokio::spawn(async move {
        acquire(&writer_session, "r:1", "1 minute", None, "10 seconds").await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!writer.is_finished());
    assert!(release(&db, "r:1", reader).await.unwrap());
    let written = writer.await.unwrap().unwrap().unwrap();
    let mut readers = Vec::new();
    for _ in 0..3 {
        let session = connect_to(PORT, "postgres").await;
        readers.push(tokio::spawn(async move {
            let row = session.query_one(share, &[&"10 seconds"]).await.unwrap();
            (row.get::<_, Option<i64>>(0), std::time::Instant::now())
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released = std::time::Instant::now();
    assert!(release(&db, "r:1", written).await.unwrap());
    for reader in readers {
        let (token, at) = reader.await.unwrap();
        assert!(token.unwrap() > written);
        assert!(at.saturating_duration_since(released) < Duration::from_millis(500));
    }
    let refused: Option<i64> = db
        .query_one("SELECT refused_writes FROM fence.protected_tables", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(refused, None, "no counts without preload");

    // Now with preload, and room for 16 classes only.
    side_cluster("stop", BASE, PORT);
    side_cluster_preloading("start", BASE, PORT, true);
    let db = reconnect().await;
    db.batch_execute("ALTER SYSTEM SET max_prepared_transactions = 4")
        .await
        .unwrap();
    db.batch_execute("ALTER SYSTEM SET fence.stats_max_classes = 16")
        .await
        .unwrap();
    side_cluster("stop", BASE, PORT);
    side_cluster_preloading("start", BASE, PORT, true);
    let db = reconnect().await;
    for class in 0..20 {
        for _ in 0..=class {
            acquire(&db, &format!("c{class}:x"), "1 minute", Some("me"), "0")
                .await
                .unwrap()
                .unwrap();
        }
    }
    let rows = db
        .query(
            "SELECT key_class, acquires FROM fence.lock_stats ORDER BY acquires",
            &[],
        )
        .await
        .unwrap();
    let classes: Vec<(String, i64)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(classes.len(), 17, "16 classes and '*': {classes:?}");
    for (i, (class, acquires)) in classes.iter().take(16).enumerate() {
        assert_eq!(
            (class.as_str(), *acquires),
            (format!("c{i}").as_str(), i as i64 + 1)
        );
    }
    // The last four classes' calls: 17 + 18 + 19 + 20.
    assert_eq!(classes[16], ("*".to_owned(), 74));
    let info = db
        .query_one(
            "SELECT classes_max, classes_used, dropped FROM fence.lock_stats_info",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            info.get::<_, i32>(0),
            info.get::<_, i32>(1),
            info.get::<_, i64>(2)
        ),
        (16, 17, 0)
    );

    // A backend that dies while waiting (SIGKILL): the server restarts
    // every process and builds shared memory anew; nothing is left of the
    // waiter, and the statistics start from zero.
    acquire(&db, "crash:1", "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    // A reader's lease survives the restart too, and must still hold a
    // writer off afterwards, though the writers' filter in shared memory
    // starts empty (the first writer reads the table into it).
    let reader: Option<i64> = db
        .query_one(
            "SELECT (fence.lock_acquire_shared('crash:r', '1 minute')).token",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reader.is_some());
    // And a reader's grant in a prepared transaction: after the restart it
    // is still in progress, then committed; the filter must know its key.
    db.batch_execute(
        "BEGIN; SELECT fence.lock_acquire_shared('crash:p', '1 minute'); PREPARE TRANSACTION 'reader';",
    )
    .await
    .unwrap();
    let victim = connect_to(PORT, "postgres").await;
    let pid = backend_pid(&victim).await;
    let waiting =
        tokio::spawn(
            async move { acquire(&victim, "crash:1", "1 minute", None, "30 seconds").await },
        );
    for _ in 0..500 {
        if count(&db, "SELECT count(*) FROM fence.waiters").await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM fence.waiters WHERE pid = {pid}")
        )
        .await,
        1
    );
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(waiting.await.unwrap().is_err());
    let db = reconnect().await;
    assert_eq!(count(&db, "SELECT count(*) FROM fence.waiters").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM fence.lock_stats").await, 0);
    // The lease survived the restart (it is a table row): still held.
    assert_eq!(
        acquire(&db, "crash:1", "1 minute", None, "0")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        acquire(&db, "crash:r", "1 minute", None, "0")
            .await
            .unwrap(),
        None,
        "the reader from before the restart holds the writer off"
    );
    assert!(release(&db, "crash:r", reader.unwrap()).await.unwrap());
    db.batch_execute("COMMIT PREPARED 'reader'").await.unwrap();
    assert_eq!(
        acquire(&db, "crash:p", "1 minute", None, "0")
            .await
            .unwrap(),
        None,
        "the prepared reader, committed after the restart, holds the writer off"
    );
    assert!(acquire(&db, "crash:r", "1 minute", None, "0")
        .await
        .unwrap()
        .is_some());
    side_cluster("stop", BASE, PORT);
}
