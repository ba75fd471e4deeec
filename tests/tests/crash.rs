//! G1 through a crash: sessions with `synchronous_commit = off` take tokens
//! (some in transactions they roll back) while the server is stopped with
//! `pg_ctl stop -m immediate`. After restart every committed grant is still
//! there, and every new token is larger than every token a client ever saw.
//!
//! Runs on its own cluster (scripts/cluster.sh with another base and port),
//! so crashing it disturbs no other test.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pg_fence_tests::*;

const PORT: u16 = 28816;

fn cluster(action: &str) {
    side_cluster(action, "pg_fence_crash", PORT);
}

#[derive(Default)]
struct Seen {
    /// Every token a client received, committed or not.
    tokens: Vec<i64>,
    /// Grants whose transaction committed (the reply arrived) and that were never released.
    held: Vec<(String, i64)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_survive_an_immediate_shutdown_with_synchronous_commit_off() {
    let setup = fresh_side_cluster("pg_fence_crash", PORT).await;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let seen = seen.clone();
        workers.push(tokio::spawn(async move {
            let db = connect_to(PORT, "postgres").await;
            db.batch_execute("SET synchronous_commit = off")
                .await
                .unwrap();
            for i in 0u64.. {
                let key = format!("crash:{worker}:{i}");
                let result = if worker == 3 {
                    // Tokens handed out in transactions that then roll back.
                    async {
                        db.batch_execute("BEGIN").await?;
                        let token = acquire(&db, &key, "1 hour", None, "0").await?;
                        db.batch_execute("ROLLBACK").await?;
                        Ok::<_, Error>((token, false))
                    }
                    .await
                } else {
                    acquire(&db, &key, "1 hour", None, "0")
                        .await
                        .map(|token| (token, true))
                };
                match result {
                    Ok((Some(token), committed)) => {
                        let mut seen = seen.lock().unwrap();
                        seen.tokens.push(token);
                        if committed {
                            seen.held.push((key, token));
                        }
                    }
                    Ok((None, _)) => panic!("fresh key {key} was busy"),
                    Err(_) => return, // the server went away mid-flight
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::spawn_blocking(|| cluster("crash"))
        .await
        .unwrap();
    for worker in workers {
        worker.await.unwrap();
    }
    cluster("start");

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let max_seen = *seen
        .tokens
        .iter()
        .max()
        .expect("tokens were issued before the crash");
    assert!(
        seen.tokens.len() > 100,
        "enough traffic to cross sequence WAL records: {}",
        seen.tokens.len()
    );

    let db = connect_to(PORT, "postgres").await;
    db.batch_execute("SET synchronous_commit = off")
        .await
        .unwrap();
    for (key, token) in &seen.held {
        assert_eq!(
            live_token(&db, key).await,
            Some(*token),
            "grant of {key} (token {token}) was acknowledged, so it is durable"
        );
    }
    for i in 0..100 {
        let token = acquire(&db, &format!("after-crash:{i}"), "1 hour", None, "0")
            .await
            .unwrap()
            .unwrap();
        assert!(
            token > max_seen,
            "token {token} issued after the crash is not above {max_seen}, seen before it"
        );
    }
    drop(db);
    drop(setup);
    cluster("destroy");
}
