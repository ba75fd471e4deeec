//! Issue 16, 2: a holder id names one guard. A second acquire naming the
//! holder of a live lease is refused (`Error::HolderInUse`, FN002) and
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

through_both_backends!(a_second_guard_waiting_in_the_server_is_refused_when_the_first_gets_it);
/// Both guards wait in the server for a key someone else holds; when it
/// frees, the first is granted, and the second's next look finds the key
/// leased to its own holder id: refused there and then, not adopted (a
/// check of the lease's age against the statement's start could not see
/// this: the lease is newer than the statement).
async fn a_second_guard_waiting_in_the_server_is_refused_when_the_first_gets_it<B: Backend>(
    backend: B,
    _app: String,
) {
    let db = connect().await;
    let key = unique_key("holder-wait");
    let other = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let options = LeaseOptions::default().holder(unique_key("worker-7"));
    let first = tokio::spawn({
        let (backend, key, options) = (backend.clone(), key.clone(), options.clone());
        async move { Lease::acquire(&backend, &key, &options, Duration::from_secs(10)).await }
    });
    until_queued(&db, &key, 1).await;
    let second = tokio::spawn({
        let (backend, key, options) = (backend.clone(), key.clone(), options.clone());
        async move {
            let short = LeaseOptions::new(Duration::from_secs(3)).holder(options.holder.unwrap());
            Lease::acquire(&backend, &key, &short, Duration::from_secs(10)).await
        }
    });
    until_queued(&db, &key, 2).await;
    assert!(release(&db, &key, other).await.unwrap());
    let first = first
        .await
        .unwrap()
        .unwrap()
        .expect("the first guard's turn");
    let before = lease_on(&key).await.expect("live");
    let refused = holder_in_use(second.await.unwrap());
    assert!(
        refused,
        "a second guard for one lease, got in the server's wait"
    );
    assert_eq!(lease_on(&key).await, Some(before), "the lease was changed");
    assert!(first.release().await.unwrap());
}

through_both_backends!(a_retry_after_no_connection_is_no_retry_of_a_sent_request);
/// An acquire whose first try got no pooled connection sent nothing, so
/// its next try is a first attempt, not a retry that may adopt: with
/// another guard holding the key under the same holder id, it is refused.
async fn a_retry_after_no_connection_is_no_retry_of_a_sent_request<B: Backend>(
    backend: B,
    _app: String,
) {
    let key = unique_key("holder-pool");
    let options = LeaseOptions::default().holder(unique_key("worker-8"));
    let first = Lease::try_acquire(&backend, &key, &options)
        .await
        .unwrap()
        .expect("free");
    let flaky = Faulty::new(backend.clone())
        .only(&[Acquire::Key])
        .no_connection_first();
    let second = Lease::try_acquire(&flaky, &key, &options).await;
    assert!(flaky.fired());
    let refused = holder_in_use(second);
    assert!(
        refused,
        "a try after a pool error adopted another guard's lease"
    );
    assert!(first.release().await.unwrap());
}

/// Wait, up to 10 s, until `n` sessions are queued for `key` (preload
/// mode's fence.waiters): the order the test then relies on is real.
async fn until_queued(db: &Client, key: &str, n: i64) {
    for _ in 0..1000 {
        let queued: i64 = db
            .query_one(
                "SELECT count(*) FROM fence.waiters WHERE lock_key = $1",
                &[&key],
            )
            .await
            .unwrap()
            .get(0);
        if queued == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never {n} queued for {key}");
}

/// The internal acquire functions the client calls: `adopt => false`
/// refuses the holder's own live lease with FN002, straight from the
/// server, and leaves it; `adopt => true` is G6; NULL `adopt` is 22004.
#[tokio::test]
async fn the_internal_acquires_refuse_or_adopt_as_told() {
    let db = connect().await;
    let key = unique_key("holder-sql");
    let take = |adopt: &str| {
        format!("SELECT (fence._lock_acquire('{key}', '1 minute', 'h', '0', {adopt})).token")
    };
    let token: i64 = db.query_one(&take("false"), &[]).await.unwrap().get(0);
    let (state, message) = expect_error(&db, &take("false")).await;
    assert_eq!(state, "FN002", "{message}");
    assert_eq!(live_token(&db, &key).await, Some(token));
    let again: i64 = db.query_one(&take("true"), &[]).await.unwrap().get(0);
    assert_eq!(again, token, "G6 when adopting");
    let (state, _) = expect_error(&db, &take("NULL")).await;
    assert_eq!(state, "22004");
    for sql in [
        "SELECT fence._semaphore_acquire('s', 2, '1 minute', 'h', '0', NULL)",
        "SELECT * FROM fence._lock_acquire_all(ARRAY['a'], '1 minute', 'h', '0', NULL)",
    ] {
        let (state, message) = expect_error(&db, sql).await;
        assert_eq!(state, "22004", "{sql}: {message}");
    }
    assert!(release(&db, &key, token).await.unwrap());
}

through_both_backends!(two_acquires_resuming_one_lost_request_do_not_both_adopt_it);
/// After an acquire whose replies were all lost (its cleanup running), two
/// acquires naming that holder at once: only one is the retry of the lost
/// request and gets its lease back; the other finds the lease the first
/// took and is refused (one lease, one guard).
async fn two_acquires_resuming_one_lost_request_do_not_both_adopt_it<B: Backend>(
    backend: B,
    _app: String,
) {
    let key = unique_key("holder-resume");
    let flaky = Faulty::new(backend.clone())
        .only(&[Acquire::Key])
        .lose_replies_until(std::time::Instant::now() + Duration::from_millis(800));
    let options = LeaseOptions::new(Duration::from_secs(30))
        .holder(unique_key("worker-9"))
        .ambiguous_retry_for(Duration::from_millis(300));
    let error = Lease::try_acquire(&flaky, &key, &options)
        .await
        .err()
        .expect("every reply lost");
    assert!(matches!(error, Error::AcquireAmbiguous { .. }), "{error:?}");
    let (first, second) = tokio::join!(
        Lease::try_acquire(&backend, &key, &options),
        Lease::try_acquire(&backend, &key, &options),
    );
    let got: Vec<_> = [first, second]
        .into_iter()
        .map(|outcome| match outcome {
            Ok(Some(lease)) => Some(lease),
            Err(Error::HolderInUse { .. }) => None,
            other => panic!("{:?}", other.map(|lease| lease.map(|l| l.token()))),
        })
        .collect();
    let guards = got.iter().flatten().count();
    assert_eq!(guards, 1, "two guards for the lost request's lease");
    for lease in got.into_iter().flatten() {
        assert!(lease.release().await.unwrap());
    }
}
