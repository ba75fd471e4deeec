//! `fence.lock_watch(lock_key, known_token, wait)`: returns as soon as the
//! key's live lease is not the known one (granted, released, forced,
//! expired), woken by those events within moments (its own safety-net
//! recheck is a second, so a quick return is the wake-up's), every watcher
//! of the key at once; the unchanged lease when the wait runs out, renewals
//! going on meanwhile; cancel and statement_timeout end it; bad inputs get
//! their SQLSTATEs.

use std::time::{Duration, Instant};

use pg_fence_tests::*;

/// `lock_watch`: the live lease's (token, holder), or None; and how long
/// the call took.
async fn watch(
    client: &Client,
    key: &str,
    known: Option<i64>,
    wait: &str,
) -> Result<(Option<(i64, String)>, Duration), Error> {
    let started = Instant::now();
    let row = client
        .query_one(
            "SELECT (w).token, (w).holder FROM (SELECT fence.lock_watch($1, $2, $3::text::interval) AS w) AS s",
            &[&key, &known, &wait],
        )
        .await?;
    let token: Option<i64> = row.get(0);
    Ok((token.map(|token| (token, row.get(1))), started.elapsed()))
}

/// A watcher of `key` (knowing `known`) in a task, listed as waiting in
/// pg_stat_activity before this returns; it yields what lock_watch
/// returned and when.
async fn watching(
    observer: &Client,
    key: &str,
    known: Option<i64>,
) -> tokio::task::JoinHandle<(Option<(i64, String)>, Instant)> {
    let client = connect().await;
    let pid = backend_pid(&client).await;
    let key = key.to_owned();
    let task = tokio::spawn(async move {
        let (lease, _) = watch(&client, &key, known, "20 seconds").await.unwrap();
        (lease, Instant::now())
    });
    until_waiting(observer, pid).await;
    task
}

/// The change happens 300 ms into the watch, then the watcher must have
/// returned within 500 ms of it: the 1 s safety-net recheck would come
/// some 700 ms after the change, so only the wake-up explains it.
async fn returns_promptly(
    task: tokio::task::JoinHandle<(Option<(i64, String)>, Instant)>,
    changed: Instant,
) -> Option<(i64, String)> {
    let (lease, returned) = task.await.unwrap();
    let after = returned.saturating_duration_since(changed);
    assert!(
        after < Duration::from_millis(500),
        "the watcher returned {after:?} after the change"
    );
    lease
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_wakes_a_watcher_of_a_free_key() {
    let db = connect().await;
    let key = unique_key("watch-grant");
    let watcher = watching(&db, &key, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let changed = Instant::now();
    let token = acquire(&db, &key, "1 minute", Some("leader-1"), "0")
        .await
        .unwrap()
        .unwrap();
    let lease = returns_promptly(watcher, changed).await;
    assert_eq!(lease, Some((token, "leader-1".to_owned())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_and_a_force_wake_every_watcher() {
    let db = connect().await;
    for forced in [false, true] {
        let key = unique_key("watch-release");
        let token = acquire(&db, &key, "1 minute", None, "0")
            .await
            .unwrap()
            .unwrap();
        let mut watchers = Vec::new();
        for _ in 0..3 {
            watchers.push(watching(&db, &key, Some(token)).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let changed = Instant::now();
        if forced {
            let done: bool = db
                .query_one("SELECT fence.lock_force_release($1)", &[&key])
                .await
                .unwrap()
                .get(0);
            assert!(done);
        } else {
            assert!(release(&db, &key, token).await.unwrap());
        }
        for watcher in watchers {
            assert_eq!(
                returns_promptly(watcher, changed).await,
                None,
                "forced: {forced}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expiry_ends_the_watch_at_expires_at() {
    let db = connect().await;
    let key = unique_key("watch-expiry");
    let token = acquire(&db, &key, "600 milliseconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    let expires_in: f64 = db
        .query_one(
            "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 FROM fence.lock_status($1)",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    let expires = Instant::now() + Duration::from_secs_f64(expires_in.max(0.0));
    let (lease, _) = watch(&db, &key, Some(token), "20 seconds").await.unwrap();
    assert_eq!(lease, None);
    let late = Instant::now().saturating_duration_since(expires);
    assert!(
        late < Duration::from_millis(500),
        "returned {late:?} after the lease's expiry"
    );
}

/// A watcher of a lease that expires while someone waits for the key sees
/// the change: no lease (between the expiry and the grant), then the new
/// one; terms only increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_is_seen_in_order() {
    let db = connect().await;
    let key = unique_key("watch-takeover");
    let old = acquire(&db, &key, "500 milliseconds", Some("old"), "0")
        .await
        .unwrap()
        .unwrap();
    let taker = tokio::spawn({
        let key = key.clone();
        async move {
            let client = connect().await;
            acquire(&client, &key, "1 minute", Some("new"), "5 seconds")
                .await
                .unwrap()
                .unwrap()
        }
    });
    let (seen, _) = watch(&db, &key, Some(old), "5 seconds").await.unwrap();
    let new = taker.await.unwrap();
    assert!(new > old);
    let seen = match seen {
        // Between the expiry and the grant: watching from "none" sees it.
        None => watch(&db, &key, None, "5 seconds").await.unwrap().0,
        some => some,
    };
    assert_eq!(seen, Some((new, "new".to_owned())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_unchanged_lease_comes_back_when_the_wait_runs_out_while_renewals_go_on() {
    let db = connect().await;
    let key = unique_key("watch-unchanged");
    let token = acquire(&db, &key, "1 minute", Some("steady"), "0")
        .await
        .unwrap()
        .unwrap();
    let renewer = tokio::spawn({
        let key = key.clone();
        async move {
            let client = connect().await;
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(renew(&client, &key, token).await.unwrap());
            }
        }
    });
    let (lease, took) = watch(&db, &key, Some(token), "800 milliseconds")
        .await
        .unwrap();
    renewer.await.unwrap();
    assert_eq!(lease, Some((token, "steady".to_owned())));
    assert!(
        took >= Duration::from_millis(780) && took < Duration::from_millis(1500),
        "took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_other_than_the_known_one_returns_at_once() {
    let db = connect().await;
    let key = unique_key("watch-now");
    // Free, and the caller thought it held: at once, NULL.
    let (lease, took) = watch(&db, &key, Some(1), "10 seconds").await.unwrap();
    assert_eq!(lease, None);
    assert!(took < Duration::from_millis(500), "took {took:?}");
    // Held, and the caller thought it free: at once, the lease.
    let token = acquire(&db, &key, "1 minute", Some("h"), "0")
        .await
        .unwrap()
        .unwrap();
    let (lease, took) = watch(&db, &key, None, "10 seconds").await.unwrap();
    assert_eq!(lease, Some((token, "h".to_owned())));
    assert!(took < Duration::from_millis(500), "took {took:?}");
    // A wait of zero answers at once whatever it finds.
    let (lease, _) = watch(&db, &key, Some(token), "0").await.unwrap();
    assert_eq!(lease.map(|(t, _)| t), Some(token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_and_statement_timeout_end_a_watch() {
    let db = connect().await;
    let key = unique_key("watch-cancel");
    let watcher = connect().await;
    watcher
        .batch_execute("SET statement_timeout = '300ms'")
        .await
        .unwrap();
    let error = watch(&watcher, &key, None, "20 seconds").await.unwrap_err();
    assert_eq!(sqlstate(&error).as_deref(), Some("57014"));
    watcher
        .batch_execute("RESET statement_timeout")
        .await
        .unwrap();
    let pid = backend_pid(&watcher).await;
    let task = tokio::spawn({
        let key = key.clone();
        async move { watch(&watcher, &key, None, "20 seconds").await }
    });
    until_waiting(&db, pid).await;
    db.execute("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap();
    let error = task.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&error).as_deref(), Some("57014"));
}

#[tokio::test]
async fn bad_inputs_get_their_sqlstates() {
    let db = connect().await;
    for (sql, state) in [
        ("SELECT fence.lock_watch(NULL, 1, '1 second')", "22004"),
        ("SELECT fence.lock_watch('', 1, '1 second')", "22023"),
        ("SELECT fence.lock_watch('k', 1, NULL)", "22004"),
        ("SELECT fence.lock_watch('k', 1, '-1 second')", "22023"),
    ] {
        let (got, message) = expect_error(&db, sql).await;
        assert_eq!(got, state, "{sql}: {message}");
    }
}

/// A renewal that judged the lease live in time but commits after its old
/// expiry: the watcher does not report the lease ended in between (an
/// observer would see the term end and come back), it sees it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewal_in_flight_at_the_expiry_is_not_reported_as_an_end() {
    let db = connect().await;
    let key = unique_key("watch-renew-flight");
    let token = acquire(&db, &key, "600 milliseconds", Some("h"), "0")
        .await
        .unwrap()
        .unwrap();
    let renewing = connect().await;
    renewing.batch_execute("BEGIN").await.unwrap();
    let renewed: bool = renewing
        .query_one(
            "SELECT fence.lock_renew($1, $2, '1 minute') IS NOT NULL",
            &[&key, &token],
        )
        .await
        .unwrap()
        .get(0);
    assert!(renewed, "renewed while live");
    let committer = tokio::spawn(async move {
        // Past the old expiry, then commit.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        renewing.batch_execute("COMMIT").await.unwrap();
    });
    let (lease, took) = watch(&db, &key, Some(token), "1500 milliseconds")
        .await
        .unwrap();
    committer.await.unwrap();
    assert_eq!(
        lease,
        Some((token, "h".to_owned())),
        "the watch ended after {took:?} although the renewal was in flight"
    );
}
