//! Advisory lock wrappers through both drivers: exclusion under racing,
//! timeouts, and cancel safety (no lock left behind, no connection returned
//! to the pool holding one).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pg_fence_client::{AdvisoryKey, Wait};
use pg_fence_tests::*;
use tokio::time::Instant;

/// Is any session holding the advisory lock `key`?
async fn held(db: &Client, key: AdvisoryKey) -> bool {
    let held: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted
               AND ((classid::bigint << 32) | objid::bigint) = $1",
            &[&key.0],
        )
        .await
        .unwrap()
        .get(0);
    held > 0
}

/// Is any session waiting for the advisory lock `key`?
async fn waiting(db: &Client, key: AdvisoryKey) -> bool {
    let waiting: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND NOT granted
               AND ((classid::bigint << 32) | objid::bigint) = $1",
            &[&key.0],
        )
        .await
        .unwrap()
        .get(0);
    waiting > 0
}

/// `lock_timeout` on every connection of a 4-connection pool.
async fn deadpool_lock_timeouts(pool: &deadpool_postgres::Pool) -> Vec<String> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(pool.get().await.unwrap());
    }
    let mut settings = Vec::new();
    for client in &clients {
        settings.push(
            client
                .query_one("SHOW lock_timeout", &[])
                .await
                .unwrap()
                .get(0),
        );
    }
    settings
}

async fn sqlx_lock_timeouts(pool: &::sqlx::PgPool) -> Vec<String> {
    let mut connections = Vec::new();
    for _ in 0..4 {
        connections.push(pool.acquire().await.unwrap());
    }
    let mut settings = Vec::new();
    for connection in &mut connections {
        settings.push(
            ::sqlx::query_scalar("SHOW lock_timeout")
                .fetch_one(&mut **connection)
                .await
                .unwrap(),
        );
    }
    settings
}

fn fresh_key() -> AdvisoryKey {
    AdvisoryKey::from_name(&unique_key("advisory"))
}

macro_rules! advisory_tests {
    ($driver:ident, $pool:path, $lock_timeouts:path) => {
        mod $driver {
            use super::*;
            use pg_fence_client::advisory::$driver::lock_session;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn racing_sessions_one_winner() {
                let pool = $pool(&unique_table("adv")).await;
                let key = fresh_key();
                let barrier = Arc::new(tokio::sync::Barrier::new(4));
                let mut tasks = Vec::new();
                for _ in 0..4 {
                    let (pool, barrier) = (pool.clone(), barrier.clone());
                    tasks.push(tokio::spawn(async move {
                        barrier.wait().await;
                        lock_session(&pool, key, Wait::No).await.unwrap()
                    }));
                }
                let mut winners = Vec::new();
                for task in tasks {
                    winners.extend(task.await.unwrap());
                }
                assert_eq!(winners.len(), 1);
                assert!(held(&connect().await, key).await);
                for lock in winners {
                    assert!(lock.unlock().await.unwrap(), "it was held");
                }
                assert!(!held(&connect().await, key).await);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn waiting_sessions_take_turns() {
                let pool = $pool(&unique_table("adv")).await;
                let key = fresh_key();
                let inside = Arc::new(AtomicUsize::new(0));
                let mut tasks = Vec::new();
                for _ in 0..3 {
                    let (pool, inside) = (pool.clone(), inside.clone());
                    tasks.push(tokio::spawn(async move {
                        for _ in 0..5 {
                            let lock = lock_session(&pool, key, Wait::Forever)
                                .await
                                .unwrap()
                                .expect("granted");
                            assert_eq!(
                                inside.fetch_add(1, Ordering::SeqCst),
                                0,
                                "two holders at once"
                            );
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            inside.fetch_sub(1, Ordering::SeqCst);
                            assert!(lock.unlock().await.unwrap(), "it was held");
                        }
                    }));
                }
                for task in tasks {
                    task.await.unwrap();
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_bounded_wait_times_out_and_resets_the_connection() {
                let pool = $pool(&unique_table("adv")).await;
                let key = fresh_key();
                let holder = lock_session(&pool, key, Wait::No).await.unwrap().unwrap();
                let started = Instant::now();
                let none = lock_session(&pool, key, Wait::Up(Duration::from_millis(300)))
                    .await
                    .unwrap();
                assert!(none.is_none());
                assert!(started.elapsed() >= Duration::from_millis(300));
                assert!(holder.unlock().await.unwrap(), "it was held");
                // Every pooled connection is back to the default lock_timeout.
                for setting in $lock_timeouts(&pool).await {
                    assert_eq!(
                        setting, "0",
                        "a pooled connection kept the wait's lock_timeout"
                    );
                }
                let db = connect().await;
                assert!(!held(&db, key).await);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_cancelled_acquire_leaves_no_lock_behind() {
                let pool = $pool(&unique_table("adv")).await;
                let key = fresh_key();
                let holder = lock_session(&pool, key, Wait::No).await.unwrap().unwrap();
                // The waiter is dropped mid-wait.
                let cancelled = tokio::time::timeout(
                    Duration::from_millis(300),
                    lock_session(&pool, key, Wait::Forever),
                )
                .await;
                assert!(cancelled.is_err(), "still waiting when cancelled");
                // The server drops the abandoned wait by itself (its client is
                // gone) while the holder still holds the lock.
                let db = connect().await;
                let started = Instant::now();
                while waiting(&db, key).await {
                    assert!(
                        started.elapsed() < Duration::from_secs(3),
                        "the abandoned wait lingers"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert!(holder.unlock().await.unwrap(), "it was held");
                // The abandoned wait must not turn into a lock held by nobody.
                tokio::time::sleep(Duration::from_millis(600)).await;
                let db = connect().await;
                assert!(!held(&db, key).await, "a lock was left behind");
                let again = lock_session(&pool, key, Wait::No)
                    .await
                    .unwrap()
                    .expect("the key is free");
                assert!(again.unlock().await.unwrap(), "it was held");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dropping_the_guard_releases_the_lock() {
                let pool = $pool(&unique_table("adv")).await;
                let key = fresh_key();
                let lock = lock_session(&pool, key, Wait::No).await.unwrap().unwrap();
                assert_eq!(lock.key(), key);
                drop(lock);
                let db = connect().await;
                let started = Instant::now();
                while held(&db, key).await {
                    assert!(
                        started.elapsed() < Duration::from_secs(5),
                        "released once its connection closed"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
}

async fn xact_try(db: &Client, key: AdvisoryKey) -> bool {
    db.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&key.0])
        .await
        .unwrap()
        .get(0)
}

advisory_tests!(deadpool, deadpool_pool, deadpool_lock_timeouts);
advisory_tests!(sqlx, sqlx_pool, sqlx_lock_timeouts);

/// `lock_xact` through each driver's own transaction type.
#[tokio::test]
async fn lock_xact_through_each_driver() {
    let key = fresh_key();
    let pool = deadpool_pool(&unique_table("advx")).await;
    let mut client = pool.get().await.unwrap();
    let transaction = client.transaction().await.unwrap();
    assert!(
        pg_fence_client::advisory::deadpool::lock_xact(&transaction, key, Wait::No)
            .await
            .unwrap()
    );
    let other = connect().await;
    assert!(!xact_try(&other, key).await);
    transaction.commit().await.unwrap();
    assert!(!held(&other, key).await);

    let pool = sqlx_pool(&unique_table("advx")).await;
    let mut transaction = pool.begin().await.unwrap();
    assert!(
        pg_fence_client::advisory::sqlx::lock_xact(&mut transaction, key, Wait::Forever)
            .await
            .unwrap()
    );
    assert!(held(&other, key).await);
    transaction.rollback().await.unwrap();
    assert!(!held(&other, key).await);
}

/// Issue 16, 6: a session lock whose session let go of it (a pooler's
/// reset, `pg_advisory_unlock_all`) says so, in `is_held` and in `unlock`;
/// one whose session is gone errs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lock_its_session_lost_says_so_deadpool() {
    use pg_fence_client::advisory::deadpool::lock_session;
    let pool = deadpool_pool(&unique_table("adv-lost")).await;
    let key = fresh_key();
    let lock = lock_session(&pool, key, Wait::No).await.unwrap().unwrap();
    assert!(lock.is_held().await.unwrap());
    // What a transaction pooler's DISCARD ALL does to the session.
    lock.client()
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    assert!(!lock.is_held().await.unwrap());
    assert!(!held(&connect().await, key).await);
    assert!(!lock.unlock().await.unwrap(), "unlock says it was gone");
    // A terminated session: the server let go of the lock, and is_held errs.
    let lock = lock_session(&pool, key, Wait::No).await.unwrap().unwrap();
    let pid: i32 = lock
        .client()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let db = connect().await;
    db.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    while held(&db, key).await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(lock.is_held().await.is_err());
    drop(lock);
    // A lock taken again through the guard's connection goes with unlock():
    // the connection goes back to the pool holding nothing.
    let lock = lock_session(&pool, key, Wait::No).await.unwrap().unwrap();
    lock.client()
        .execute("SELECT pg_advisory_lock($1)", &[&key.0])
        .await
        .unwrap();
    assert!(lock.unlock().await.unwrap());
    assert!(!held(&db, key).await, "returned to the pool still locked");
    // is_held reads pg_locks' two halves of the key right, whatever its sign.
    let base = fresh_key().0 & 0x0000_7fff_ffff_fff0;
    for key in [-base - 1, base | 0x7fff_ffff, i64::MIN | base] {
        let lock = lock_session(&pool, AdvisoryKey(key), Wait::No)
            .await
            .unwrap()
            .unwrap();
        assert!(lock.is_held().await.unwrap(), "{key}");
        assert!(lock.unlock().await.unwrap(), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lock_its_session_lost_says_so_sqlx() {
    use pg_fence_client::advisory::sqlx::lock_session;
    let pool = sqlx_pool(&unique_table("adv-lost")).await;
    let key = fresh_key();
    let mut lock = lock_session(&pool, key, Wait::No).await.unwrap().unwrap();
    assert!(lock.is_held().await.unwrap());
    ::sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(lock.connection())
        .await
        .unwrap();
    assert!(!lock.is_held().await.unwrap());
    assert!(!held(&connect().await, key).await);
    assert!(!lock.unlock().await.unwrap(), "unlock says it was gone");
    let mut lock = lock_session(&pool, key, Wait::No).await.unwrap().unwrap();
    let pid: i32 = ::sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(lock.connection())
        .await
        .unwrap();
    let db = connect().await;
    db.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    while held(&db, key).await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(lock.is_held().await.is_err());
    drop(lock);
}
