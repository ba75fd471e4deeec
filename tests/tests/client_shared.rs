//! Shared (reader) leases in pg_fence_client (`Lease::acquire_shared`),
//! through both backends: guards that share a key, renew past their ttl
//! and release (or drop) like any lease; a writer's guard waits for them;
//! a lost reply is retried as the same holder (G6) and nothing is left
//! held by nobody.

use std::time::Duration;

use pg_fence_client::{Backend, Lease, LeaseOptions, LossReason};
use pg_fence_tests::*;

async fn shared_tokens(db: &Client, key: &str) -> Vec<i64> {
    db.query(
        "SELECT token FROM fence.locks WHERE lock_key = $1 AND mode = 'shared' ORDER BY token",
        &[&key],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| row.get(0))
    .collect()
}

through_both_backends!(readers_share_renew_and_release);
async fn readers_share_renew_and_release<B: Backend>(backend: B, _app: String) {
    let db = connect().await;
    let key = unique_key("cs-share");
    let options = LeaseOptions::new(Duration::from_millis(1200));
    let a = Lease::try_acquire_shared(&backend, &key, &options)
        .await
        .unwrap()
        .expect("free");
    let b = Lease::try_acquire_shared(&backend, &key, &options)
        .await
        .unwrap()
        .expect("readers share");
    assert!(a.is_shared() && b.is_shared());
    assert_ne!(a.token(), b.token());
    assert!(Lease::try_acquire(&backend, &key, &options)
        .await
        .unwrap()
        .is_none());
    // Held well past the ttl: renewed in the background.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!((a.loss(), b.loss()), (None, None));
    assert_eq!(shared_tokens(&db, &key).await, [a.token(), b.token()]);
    // A writer waiting for the key gets it once both readers are gone: one
    // released, one dropped.
    let writer = {
        let backend = backend.clone();
        let key = key.clone();
        tokio::spawn(async move {
            Lease::acquire(
                &backend,
                &key,
                &LeaseOptions::default(),
                Duration::from_secs(10),
            )
            .await
            .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!writer.is_finished());
    assert!(a.release().await.unwrap());
    drop(b);
    let writer = writer
        .await
        .unwrap()
        .expect("granted once the readers left");
    assert!(!writer.is_shared());
    assert!(shared_tokens(&db, &key).await.is_empty());
    assert!(Lease::try_acquire_shared(&backend, &key, &options)
        .await
        .unwrap()
        .is_none());
    assert!(writer.release().await.unwrap());
}

through_both_backends!(a_forced_reader_is_lost);
async fn a_forced_reader_is_lost<B: Backend>(backend: B, _app: String) {
    let db = connect().await;
    let key = unique_key("cs-lost");
    let lease = Lease::try_acquire_shared(
        &backend,
        &key,
        &LeaseOptions::new(Duration::from_millis(900)),
    )
    .await
    .unwrap()
    .expect("free");
    let lost = lease.lost();
    let forced: bool = db
        .query_one("SELECT fence.lock_force_release($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(forced);
    let reason = tokio::time::timeout(Duration::from_millis(800), lost)
        .await
        .expect("the loss was reported within a renewal period");
    assert_eq!(reason, LossReason::NotLive);
    assert!(!lease.release().await.unwrap());
}

through_both_backends!(a_lost_reply_is_retried_as_the_same_holder);
async fn a_lost_reply_is_retried_as_the_same_holder<B: Backend>(backend: B, _app: String) {
    let db = connect().await;
    let key = unique_key("cs-retry");
    let flaky = Faulty::new(backend)
        .only(&[Acquire::Shared])
        .lose_first_reply();
    let lease = Lease::try_acquire_shared(&flaky, &key, &LeaseOptions::default())
        .await
        .unwrap()
        .expect("G6: our own shared lease back");
    assert!(flaky.fired(), "the first reply was lost");
    assert_eq!(
        shared_tokens(&db, &key).await,
        [lease.token()],
        "one lease, not two"
    );
    assert!(lease.release().await.unwrap());
}

through_both_backends!(a_lost_reply_given_up_on_is_cleaned_up);
async fn a_lost_reply_given_up_on_is_cleaned_up<B: Backend>(backend: B, _app: String) {
    let db = connect().await;
    let key = unique_key("cs-cleanup");
    let flaky = Faulty::new(backend)
        .only(&[Acquire::Shared])
        .lose_replies_until(std::time::Instant::now() + Duration::from_millis(800));
    let options =
        LeaseOptions::new(Duration::from_secs(30)).ambiguous_retry_for(Duration::from_millis(200));
    let outcome = Lease::try_acquire_shared(&flaky, &key, &options).await;
    assert!(outcome.is_err(), "every reply lost: the call gives up");
    // The server granted it; once replies get through again, the
    // background cleanup finds it (G6) and releases it, long before its
    // 30 s ttl.
    let mut left = shared_tokens(&db, &key).await;
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = shared_tokens(&db, &key).await;
    }
    assert!(left.is_empty(), "still held by nobody: {left:?}");
}
