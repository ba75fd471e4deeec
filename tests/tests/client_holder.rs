//! Issue 16, 2: a holder id names one guard. A second acquire naming the
//! holder of a live lease is refused (`Error::HolderInUse`, 55006) and
//! leaves that lease as it was (not adopted, not shortened), for a key, a
//! semaphore's permit and a multi-key lease, through both backends. Only a
//! retry of a request whose reply was lost adopts (client.rs, client_multi.rs).

use std::time::Duration;

use pg_fence_client::{Backend, Error, Lease, LeaseOptions, Semaphore};
use pg_fence_tests::*;

/// The live lease on `key`: token and expiry (Unix seconds, server clock).
async fn lease_on(key: &str) -> Option<(i64, f64)> {
    let row = connect()
        .await
        .query_one(
            "SELECT token, extract(epoch FROM expires_at)::float8 FROM fence.lock_status($1)",
            &[&key],
        )
        .await
        .unwrap();
    row.get::<_, Option<i64>>(0)
        .map(|token| (token, row.get(1)))
}

fn holder_in_use(outcome: Result<Option<Lease<impl Backend>>, Error>) -> bool {
    matches!(outcome, Err(Error::HolderInUse { .. }))
}

through_both_backends!(a_second_guard_with_the_same_holder_is_refused);
async fn a_second_guard_with_the_same_holder_is_refused<B: Backend>(backend: B, _app: String) {
    let key = unique_key("holder-key");
    let holder = unique_key("worker-7");
    let first = Lease::try_acquire(&backend, &key, &LeaseOptions::default().holder(&holder))
        .await
        .unwrap()
        .expect("free");
    let before = lease_on(&key).await.expect("live");
    // A shorter ttl would have shortened the first guard's lease below its
    // local deadline, had it been adopted (G6 sets expires_at = now + ttl).
    let short = LeaseOptions::new(Duration::from_secs(3)).holder(&holder);
    let second = Lease::acquire(&backend, &key, &short, Duration::from_millis(200)).await;
    let refused = holder_in_use(second);
    assert!(refused, "a second guard for one lease");
    assert_eq!(lease_on(&key).await, Some(before), "the lease was changed");
    assert_eq!(first.loss(), None);
    // Once the first guard has let go, the holder id is free again.
    assert!(first.release().await.unwrap());
    let again = Lease::try_acquire(&backend, &key, &short)
        .await
        .unwrap()
        .expect("free again");
    assert!(again.token() > before.0);
    assert!(again.release().await.unwrap());
}

through_both_backends!(a_second_permit_guard_with_the_same_holder_is_refused);
async fn a_second_permit_guard_with_the_same_holder_is_refused<B: Backend>(
    backend: B,
    _app: String,
) {
    let semaphore = Semaphore::new(unique_key("holder-sem"), 3).unwrap();
    let options = LeaseOptions::default().holder(unique_key("encoder"));
    let permit = semaphore
        .try_acquire(&backend, &options)
        .await
        .unwrap()
        .expect("free");
    let before = lease_on(permit.key()).await.expect("live");
    let second = semaphore.try_acquire(&backend, &options).await;
    let refused = holder_in_use(second);
    assert!(refused, "a second guard for one permit");
    assert_eq!(lease_on(permit.key()).await, Some(before));
    assert!(permit.release().await.unwrap());
}

through_both_backends!(a_second_multi_key_guard_with_the_same_holder_is_refused);
async fn a_second_multi_key_guard_with_the_same_holder_is_refused<B: Backend>(
    backend: B,
    _app: String,
) {
    let base = unique_key("holder-all");
    let keys = [format!("{base}:a"), format!("{base}:b")];
    let options = LeaseOptions::default().holder(unique_key("transfer"));
    let lease = Lease::try_acquire_all(&backend, &keys, &options)
        .await
        .unwrap()
        .expect("free");
    let before = lease_on(&keys[0]).await.expect("live");
    let second = Lease::try_acquire_all(&backend, &keys, &options).await;
    let refused = holder_in_use(second);
    assert!(refused, "a second guard for one multi-key lease");
    assert_eq!(lease_on(&keys[0]).await, Some(before));
    assert!(lease.release().await.unwrap());
}
