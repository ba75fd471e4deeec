//! A real Patroni failover (the Patroni tier, `make test-patroni`, which
//! starts the cluster with `scripts/patroni.sh`): Debian's patroni with
//! etcd, two PostgreSQL nodes, `synchronous_mode` on. The client's pool
//! uses a multi-host connection string with `target_session_attrs =
//! read-write`; leases are granted, released and held while the leader is
//! killed with SIGKILL (Patroni and its postmaster: the
//! machine dying). After the failover, on the new leader: every
//! acknowledged grant is there with its token, no token was issued twice
//! and every token granted after the failover is above every one before,
//! held `Lease` guards were not reported lost and renewed on the new
//! primary, and the fenced table takes the live guard's token and refuses
//! the token of its holder before the failover (FN001).

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use pg_fence_client::{Lease, LeaseOptions};
use pg_fence_tests::*;

const HOSTS: &str = "host=127.0.0.1,127.0.0.1 port=28861,28862 user=postgres dbname=pg_fence \
                     target_session_attrs=read-write connect_timeout=2";

fn patroni(args: &[&str]) -> String {
    let output = Command::new(repository_root().join("scripts/patroni.sh"))
        .args(args)
        .output()
        .expect("run scripts/patroni.sh");
    assert!(
        output.status.success(),
        "patroni.sh {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn pool() -> Pool {
    let config: tokio_postgres::Config = HOSTS.parse().unwrap();
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager).max_size(12).build().unwrap()
}

async fn connect_multi_host() -> Client {
    let (client, connection) = tokio_postgres::connect(HOSTS, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the Patroni tier (make test-patroni) runs it, against scripts/patroni.sh's cluster"]
async fn a_patroni_failover_keeps_grants_tokens_guards_and_fences() {
    assert_eq!(patroni(&["leader"]), "node1", "node1 leads at the start");
    let setup = connect_multi_host().await;
    setup
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_fence;
             CREATE TABLE ledger (id int PRIMARY KEY, token bigint, amount bigint NOT NULL);
             SELECT fence.protect('ledger', lock_key => 'ledger', token_column => 'token');",
        )
        .await
        .unwrap();
    let pool = pool();

    // A holder of the ledger before the failover: its token, stale once
    // it released, must stay refused on the new leader.
    let before_holder = acquire(&setup, "ledger", "1 minute", Some("before"), "0")
        .await
        .unwrap()
        .unwrap();
    setup
        .execute("INSERT INTO ledger VALUES (1, $1, 0)", &[&before_holder])
        .await
        .unwrap();
    assert!(release(&setup, "ledger", before_holder).await.unwrap());
    // Guards held across the failover: ttl 60 s (renewed every 20 s), so
    // their local deadline is at least some 37 s after the kill: longer
    // than the takeover (about 10 s) and a reconnect, so none may be
    // reported lost.
    let options = LeaseOptions::new(Duration::from_secs(60));
    let ledger = Lease::acquire(&pool, "ledger", &options, Duration::ZERO)
        .await
        .unwrap()
        .expect("the ledger lease");
    let mut held = vec![];
    for i in 0..3 {
        held.push(
            Lease::acquire(&pool, &format!("held:{i}"), &options, Duration::ZERO)
                .await
                .unwrap()
                .expect("a held lease"),
        );
    }
    setup
        .execute(
            "UPDATE ledger SET amount = amount + 1, token = $1 WHERE id = 1",
            &[&ledger.token()],
        )
        .await
        .unwrap();

    // Load: ever-new keys granted (and every other one released) by four
    // workers; every acknowledged grant recorded with the time it came
    // back.
    let stop = Arc::new(AtomicBool::new(false));
    let granted: Arc<Mutex<Vec<(String, i64, Instant)>>> = Arc::default();
    let mut workers = Vec::new();
    for worker in 0..4 {
        let (stop, granted) = (stop.clone(), granted.clone());
        workers.push(tokio::spawn(async move {
            let mut client: Option<Client> = None;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                if client.as_ref().is_none_or(|client| client.is_closed()) {
                    client = match tokio_postgres::connect(HOSTS, NoTls).await {
                        Ok((client, connection)) => {
                            tokio::spawn(connection);
                            Some(client)
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                }
                let db = client.as_ref().expect("connected");
                n += 1;
                let key = format!("load:{worker}:{n}");
                let Ok(Some(token)) = acquire(db, &key, "1 hour", None, "0").await else {
                    continue;
                };
                granted
                    .lock()
                    .unwrap()
                    .push((key.clone(), token, Instant::now()));
                if n % 2 == 0 {
                    let _ = release(db, &key, token).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The leader dies.
    let killed = Instant::now();
    patroni(&["kill", "node1"]);
    tokio::task::spawn_blocking(|| patroni(&["wait-leader", "node2"]))
        .await
        .unwrap();
    let took_over = Instant::now();
    let took_over_at = SystemTime::now();
    eprintln!("node2 took over {:?} after the kill", took_over - killed);
    assert!(
        took_over - killed > Duration::from_secs(5),
        "a takeover faster than Patroni's ttl?"
    );
    // Load goes on on the new leader for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }

    let db = connect_multi_host().await;
    let in_recovery: bool = db
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !in_recovery,
        "the multi-host string reaches the new primary"
    );

    // Every acknowledged grant is there with its token. (An acknowledged
    // release may not be: releases commit asynchronously, and one lost in
    // the failover leaves its lease live until its ttl, which no guarantee
    // forbids.)
    let granted = granted.lock().unwrap().clone();
    let before: Vec<_> = granted.iter().filter(|g| g.2 < killed).collect();
    let after: Vec<_> = granted.iter().filter(|g| g.2 > took_over).collect();
    assert!(
        before.len() > 20,
        "too little load before the kill: {}",
        before.len()
    );
    assert!(!after.is_empty(), "no grant after the failover");
    for (key, token, _) in &granted {
        let current: Option<i64> = db
            .query_one("SELECT fence.current_token($1)", &[key])
            .await
            .unwrap()
            .get(0);
        assert_eq!(current, Some(*token), "{key}: an acknowledged grant lost");
    }
    // No token twice, and every token after the failover above every one
    // before it (G1).
    let tokens: BTreeSet<i64> = granted.iter().map(|g| g.1).collect();
    assert_eq!(tokens.len(), granted.len(), "a token issued twice");
    let highest_before = before.iter().map(|g| g.1).max().unwrap();
    assert!(after.iter().all(|g| g.1 > highest_before));

    // The guards were not reported lost, and renewed on the new primary:
    // within a renewal period (20 s) of the takeover, each one's expiry
    // there is later than any renewal before the kill (at most kill + 60 s,
    // and the takeover took more than 5 s) could have set.
    let renewed_by = took_over_at + Duration::from_secs(55);
    tokio::time::sleep(Duration::from_secs(21)).await;
    for lease in held.iter().chain([&ledger]) {
        assert_eq!(lease.loss(), None, "{} reported lost", lease.key());
        let expires: SystemTime = db
            .query_one("SELECT (fence.lock_status($1)).expires_at", &[&lease.key()])
            .await
            .unwrap()
            .get(0);
        assert!(
            expires > renewed_by,
            "{} not renewed since the failover",
            lease.key()
        );
    }

    // Fencing holds on the new primary: the live token writes, a stale one
    // is refused.
    db.execute(
        "UPDATE ledger SET amount = amount + 1, token = $1 WHERE id = 1",
        &[&ledger.token()],
    )
    .await
    .unwrap();
    let stale = db
        .execute(
            "UPDATE ledger SET amount = amount + 1, token = $1 WHERE id = 1",
            &[&before_holder],
        )
        .await
        .unwrap_err();
    assert_eq!(
        sqlstate(&stale).as_deref(),
        Some("FN001"),
        "the ledger's holder before the failover is refused"
    );
    for lease in held {
        assert!(lease.release().await.unwrap());
    }
    assert!(ledger.release().await.unwrap());
}
