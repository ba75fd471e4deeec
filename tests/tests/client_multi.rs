//! Multi-key leases in pg_fence_client (`Lease::acquire_all`), through both
//! backends: one guard over every key under one token, renewed together,
//! lost when any key is lost, released (or dropped) as one; a lost reply
//! retried as the same holder (G6); racing guards over overlapping sets
//! never overlap and never deadlock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pg_fence_client::{Backend, Error, Lease, LeaseOptions, LossReason};
use pg_fence_tests::*;
use tokio::time::Instant;

fn keys(prefix: &str, n: usize) -> Vec<String> {
    let base = unique_key(prefix);
    (1..=n).map(|i| format!("{base}:{i}")).collect()
}

through_both_backends!(one_guard_holds_renews_and_releases_every_key);
async fn one_guard_holds_renews_and_releases_every_key<B: Backend>(backend: B, _app: String) {
    let db = connect().await;
    let k = keys("cm-all", 3);
    let options = LeaseOptions::new(Duration::from_millis(600));
    let asked = [&k[2], &k[0], &k[1], &k[2]];
    let lease = Lease::try_acquire_all(&backend, &asked, &options)
        .await
        .unwrap()
        .expect("all free");
    assert_eq!(lease.keys(), k.as_slice(), "distinct, in byte order");
    assert_eq!(lease.key(), k[0]);
    // Held well past its ttl: every key renewed in the background.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(lease.loss(), None);
    for key in &k {
        assert_eq!(live_token(&db, key).await, Some(lease.token()), "{key}");
    }
    let other = [&k[1]];
    assert!(Lease::try_acquire_all(&backend, &other, &options)
        .await
        .unwrap()
        .is_none());
    assert!(lease.release().await.unwrap(), "every key was live");
    for key in &k {
        assert_eq!(live_token(&db, key).await, None, "{key} released");
    }
}

through_both_backends!(losing_any_key_loses_the_lease);
async fn losing_any_key_loses_the_lease<B: Backend>(backend: B, _app: String) {
    let db = connect().await;
    let k = keys("cm-lost", 2);
    let options = LeaseOptions::new(Duration::from_millis(900));
    let lease = Lease::try_acquire_all(&backend, &k, &options)
        .await
        .unwrap()
        .expect("free");
    let lost = lease.lost();
    let forced: bool = db
        .query_one("SELECT fence.lock_force_release($1)", &[&k[1]])
        .await
        .unwrap()
        .get(0);
    assert!(forced);
    // Noticed at the next renewal (every ttl / 3), before the deadline.
    let reason = tokio::time::timeout(Duration::from_millis(800), lost)
        .await
        .expect("the loss was reported within a renewal period");
    assert_eq!(reason, LossReason::NotLive);
    // Releasing it says not every key was live, and lets go of the rest.
    assert!(!lease.release().await.unwrap());
    assert_eq!(live_token(&db, &k[0]).await, None);
}

through_both_backends!(dropping_a_multi_key_guard_releases_every_key);
async fn dropping_a_multi_key_guard_releases_every_key<B: Backend>(backend: B, _app: String) {
    let db = connect().await;
    let k = keys("cm-drop", 2);
    let lease = Lease::try_acquire_all(&backend, &k, &LeaseOptions::default())
        .await
        .unwrap()
        .expect("free");
    drop(lease);
    let deadline = Instant::now() + Duration::from_secs(2);
    while live_token(&db, &k[0]).await.is_some() || live_token(&db, &k[1]).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the dropped guard's keys stayed held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

through_both_backends!(a_lost_reply_is_retried_as_the_same_holder);
async fn a_lost_reply_is_retried_as_the_same_holder<B: Backend>(backend: B, _app: String) {
    let db = connect().await;
    let k = keys("cm-retry", 2);
    let flaky = Faulty::new(backend)
        .only(&[Acquire::All])
        .lose_first_reply();
    // Without G6 for the whole set the retry would find every key held by
    // its own first, unacknowledged request, and be locked out for the ttl.
    let lease = Lease::try_acquire_all(&flaky, &k, &LeaseOptions::default())
        .await
        .unwrap()
        .expect("G6: our own leases back");
    assert!(flaky.fired(), "the first reply was lost");
    for key in &k {
        assert_eq!(live_token(&db, key).await, Some(lease.token()));
    }
    assert!(lease.release().await.unwrap());
}

through_both_backends!(racing_guards_over_overlapping_sets_never_overlap);
async fn racing_guards_over_overlapping_sets_never_overlap<B: Backend>(backend: B, _app: String) {
    let k = keys("cm-race", 3);
    // Every pair of the three keys, each listed in both orders.
    let sets: Vec<Vec<String>> = [(0, 1), (1, 2), (2, 0), (1, 0)]
        .iter()
        .map(|&(a, b)| vec![k[a].clone(), k[b].clone()])
        .collect();
    let held: Arc<Mutex<Vec<String>>> = Arc::default();
    let grants = Arc::new(AtomicUsize::new(0));
    let stop = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for set in sets {
        let (backend, held, grants) = (backend.clone(), held.clone(), grants.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let lease = Lease::acquire_all(
                    &backend,
                    &set,
                    &LeaseOptions::default(),
                    Duration::from_secs(10),
                )
                .await
                .unwrap()
                .expect("granted within 10 s: no deadlock");
                {
                    let mut held = held.lock().unwrap();
                    for key in lease.keys() {
                        assert!(!held.contains(key), "{key} held twice");
                        held.push(key.clone());
                    }
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
                held.lock()
                    .unwrap()
                    .retain(|key| !lease.keys().contains(key));
                assert!(lease.release().await.unwrap());
                grants.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let grants = grants.load(Ordering::SeqCst);
    assert!(grants > 20, "{grants} grants in 2 s");
}

through_both_backends!(bad_key_lists_keep_the_servers_sqlstate);
async fn bad_key_lists_keep_the_servers_sqlstate<B: Backend>(backend: B, _app: String) {
    let none: [&str; 0] = [];
    let error = Lease::try_acquire_all(&backend, &none, &LeaseOptions::default())
        .await
        .err()
        .expect("an empty list is refused");
    assert!(
        matches!(&error, Error::InvalidArgument { sqlstate, .. } if sqlstate == "22023"),
        "{error:?}"
    );
    let many: Vec<String> = (0..65).map(|i| format!("k{i}")).collect();
    let error = Lease::try_acquire_all(&backend, &many, &LeaseOptions::default())
        .await
        .err()
        .expect("65 keys are refused");
    assert!(error.to_string().contains("64"), "{error}");
}

through_both_backends!(a_cleanup_of_one_key_never_releases_a_multi_key_lease_on_it);
/// The cleanup after an unanswered single-key acquire of `a` (which the
/// server had answered "busy") must not, once `a` comes free and the same
/// holder takes `[a, b]` as a multi-key lease, adopt and release that
/// lease's `a`: the multi-key acquire waits for the cleanup of its key
/// first.
async fn a_cleanup_of_one_key_never_releases_a_multi_key_lease_on_it<B: Backend>(
    backend: B,
    _app: String,
) {
    let db = connect().await;
    let k = keys("cm-overlap", 2);
    let other = acquire(&db, &k[0], "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let flaky = Faulty::new(backend.clone())
        .only(&[Acquire::Key])
        .lose_replies_until(std::time::Instant::now() + Duration::from_millis(1500));
    let options = LeaseOptions::new(Duration::from_secs(30))
        .holder(unique_key("w"))
        .ambiguous_retry_for(Duration::from_millis(300));
    let error = Lease::try_acquire(&flaky, &k[0], &options)
        .await
        .err()
        .expect("every reply lost");
    assert!(matches!(error, Error::AcquireAmbiguous { .. }), "{error:?}");
    assert!(release(&db, &k[0], other).await.unwrap());
    let lease = Lease::acquire_all(&backend, &k, &options, Duration::from_secs(10))
        .await
        .unwrap()
        .expect("both keys");
    // Past the cleanup's next tries: the multi-key lease is intact.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for key in &k {
        assert_eq!(
            live_token(&db, key).await,
            Some(lease.token()),
            "{key}: a cleanup released a lease in use"
        );
    }
    assert!(lease.release().await.unwrap());
}

through_both_backends!(a_key_spelled_null_is_a_key_like_any_other);
async fn a_key_spelled_null_is_a_key_like_any_other<B: Backend>(backend: B, _app: String) {
    // The sqlx backend reads results in text form, where an array element
    // NULL and a key "NULL" look alike: the guard must still hold it.
    let other = unique_key("cm-null");
    let db = connect().await;
    // Waiting: the other driver's run of this test wants "NULL" too.
    let lease = Lease::acquire_all(
        &backend,
        &["NULL", other.as_str()],
        &LeaseOptions::new(Duration::from_secs(5)),
        Duration::from_secs(20),
    )
    .await
    .unwrap()
    .expect("granted within the wait");
    let mut expected = vec!["NULL".to_owned(), other.clone()];
    expected.sort();
    assert_eq!(lease.keys(), expected.as_slice());
    assert_eq!(live_token(&db, "NULL").await, Some(lease.token()));
    assert!(lease.release().await.unwrap());
}
