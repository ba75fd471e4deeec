//! pg_fence_client against the real cluster: every test body runs through
//! both backends (sqlx and deadpool-postgres).

use std::time::Duration;

use pg_fence_client::{run, Backend, Error, Lease, LeaseOptions, LossReason, RunOutcome};
use pg_fence_tests::*;
use tokio::time::Instant;

async fn db_expiry(key: &str) -> f64 {
    connect()
        .await
        .query_one(
            "SELECT extract(epoch FROM expires_at)::float8 FROM fence.lock_status($1)",
            &[&key],
        )
        .await
        .unwrap()
        .get(0)
}

through_both_backends!(try_acquire_busy_and_release);
async fn try_acquire_busy_and_release<B: Backend>(backend: B, _app: String) {
    let key = unique_key("client");
    let options = LeaseOptions::new(Duration::from_secs(30));
    let lease = Lease::try_acquire(&backend, &key, &options)
        .await
        .unwrap()
        .expect("free key");
    assert!(lease.token() > 0);
    assert!(lease.deadline().is_some() && lease.loss().is_none());
    // The server's expiry, about 30 s from now by its clock.
    let server_says = db_expiry(&key).await;
    let reported = lease
        .expires_at()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (reported - server_says).abs() < 0.001,
        "{reported} vs {server_says}"
    );
    let db = connect().await;
    assert_eq!(live_token(&db, &key).await, Some(lease.token()));
    assert!(
        Lease::try_acquire(&backend, &key, &options)
            .await
            .unwrap()
            .is_none(),
        "busy for another holder"
    );
    let token = lease.token();
    assert!(lease.release().await.unwrap());
    assert_eq!(live_token(&db, &key).await, None);
    let again = Lease::try_acquire(&backend, &key, &options)
        .await
        .unwrap()
        .expect("free again");
    assert!(again.token() > token);
    assert!(again.release().await.unwrap());
}

through_both_backends!(renewal_keeps_a_lease_alive_well_past_its_ttl);
async fn renewal_keeps_a_lease_alive_well_past_its_ttl<B: Backend>(backend: B, _app: String) {
    let key = unique_key("client-renew");
    // 2.5 ttls; the ttl leaves renewal some 0.6 s of slack, because 23 tests
    // share two cores here and a 0.25 s stall once cost a spurious loss.
    let options =
        LeaseOptions::new(Duration::from_millis(1200)).renew_every(Duration::from_millis(200));
    let lease = Lease::try_acquire(&backend, &key, &options)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lease.loss(), None);
    assert_eq!(
        live_token(&connect().await, &key).await,
        Some(lease.token()),
        "still live on the server"
    );
    assert!(lease.release().await.unwrap());
}

through_both_backends!(a_forced_release_is_reported_before_the_local_deadline);
async fn a_forced_release_is_reported_before_the_local_deadline<B: Backend>(
    backend: B,
    _app: String,
) {
    let key = unique_key("client-forced");
    let options = LeaseOptions::new(Duration::from_secs(3)).renew_every(Duration::from_millis(200));
    let lease = Lease::try_acquire(&backend, &key, &options)
        .await
        .unwrap()
        .unwrap();
    let deadline = lease.deadline().unwrap();
    let forced: bool = connect()
        .await
        .query_one("SELECT fence.lock_force_release($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(forced);
    let reason = tokio::time::timeout(Duration::from_secs(5), lease.lost())
        .await
        .expect("loss is reported");
    assert_eq!(reason, LossReason::NotLive);
    assert!(Instant::now() < deadline, "told before the local deadline");
    assert_eq!(lease.loss(), Some(LossReason::NotLive));
    assert!(!lease.release().await.unwrap(), "nothing live to release");
}

through_both_backends!(dropping_a_lease_releases_it);
async fn dropping_a_lease_releases_it<B: Backend>(backend: B, _app: String) {
    let key = unique_key("client-drop");
    let lease = Lease::try_acquire(&backend, &key, &LeaseOptions::default())
        .await
        .unwrap()
        .unwrap();
    drop(lease);
    let db = connect().await;
    let started = Instant::now();
    while live_token(&db, &key).await.is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "released in the background soon after drop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

through_both_backends!(lost_connections_are_retried_not_reported_as_loss);
async fn lost_connections_are_retried_not_reported_as_loss<B: Backend>(backend: B, app: String) {
    // It kills the pool's own server sessions, found by application_name:
    // through a pooler those are PgBouncer's, shared, and named only while
    // lent. The tier without a pooler runs it.
    if through_pooler() {
        return;
    }
    let key = unique_key("client-terminated");
    let options = LeaseOptions::new(Duration::from_secs(2)).renew_every(Duration::from_millis(100));
    let lease = Lease::try_acquire(&backend, &key, &options)
        .await
        .unwrap()
        .unwrap();
    let db = connect().await;
    // Kill the pool's connections again and again while it renews.
    let mut killed = 0;
    for _ in 0..10 {
        let terminate = "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1";
        let count: i64 = db.query_one(terminate, &[&app]).await.unwrap().get(0);
        killed += count;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        killed >= 2,
        "the pool's connections were really terminated ({killed})"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        lease.loss(),
        None,
        "transient errors are retried while the deadline holds"
    );
    assert_eq!(live_token(&db, &key).await, Some(lease.token()));
    assert!(lease.release().await.unwrap());
}

through_both_backends!(run_races_the_work_against_loss);
async fn run_races_the_work_against_loss<B: Backend>(backend: B, _app: String) {
    let key = unique_key("client-run");
    let options = LeaseOptions::new(Duration::from_secs(3)).renew_every(Duration::from_millis(200));
    let outcome = run(
        &backend,
        &key,
        &options,
        Duration::ZERO,
        |token| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            token * 2
        },
    )
    .await
    .unwrap();
    let RunOutcome::Completed(doubled) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(doubled > 0);
    assert_eq!(
        live_token(&connect().await, &key).await,
        None,
        "released after the work"
    );

    let forcer = {
        let key = key.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            connect()
                .await
                .query_one("SELECT fence.lock_force_release($1)", &[&key])
                .await
                .unwrap();
        })
    };
    let outcome = run(&backend, &key, &options, Duration::ZERO, |_| {
        tokio::time::sleep(Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(outcome, RunOutcome::Lost(LossReason::NotLive));
    forcer.await.unwrap();

    // The lost guard's best-effort release may still be in flight (a no-op
    // on a lease no longer live, but it share-locks the key for a moment).
    let holder = Lease::acquire(&backend, &key, &options, Duration::from_secs(2))
        .await
        .unwrap()
        .unwrap();
    let outcome = run(&backend, &key, &options, Duration::ZERO, |_| async {})
        .await
        .unwrap();
    assert_eq!(outcome, RunOutcome::Busy);
    holder.release().await.unwrap();
}

through_both_backends!(server_errors_keep_their_sqlstate);
async fn server_errors_keep_their_sqlstate<B: Backend>(backend: B, _app: String) {
    let options = LeaseOptions::new(Duration::from_secs(2 * 86_400));
    let error = Lease::try_acquire(&backend, &unique_key("too-long"), &options)
        .await
        .err()
        .expect("ttl over the maximum");
    assert!(
        matches!(&error, Error::InvalidArgument { sqlstate, .. } if sqlstate == "22023"),
        "{error:?}"
    );
    assert!(error.to_string().contains("fence.max_ttl"), "{error}");
}

/// A fenced write through each driver: the token attached with
/// `set_fence_token`, a stale one mapped to `Error::StaleToken`.
#[tokio::test]
async fn fenced_transactions_through_both_drivers() {
    let db = connect().await;
    let table = unique_table("client_fenced");
    let key = unique_key("client-fence");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO {table} VALUES (1);
         SELECT fence.protect('{table}', lock_key => '{key}');"
    ))
    .await
    .unwrap();
    let options = LeaseOptions::default();
    // The writes are this test's own (a user's), as they must be behind a
    // transaction pooler (the PgBouncer tier): nothing prepared that
    // outlives the transaction (sqlx: not persistent; tokio-postgres:
    // query_typed).

    let pool = deadpool_pool("client_fenced_deadpool").await;
    let lease = Lease::try_acquire(&pool, &key, &options)
        .await
        .unwrap()
        .unwrap();
    let mut client = pool.get().await.unwrap();
    let transaction = client.transaction().await.unwrap();
    pg_fence_client::backend::deadpool::set_fence_token(&transaction, lease.token())
        .await
        .unwrap();
    transaction
        .query_typed(&format!("UPDATE {table} SET n = n + 1"), &[])
        .await
        .unwrap();
    transaction.commit().await.unwrap();
    let stale = lease.token();
    assert!(lease.release().await.unwrap());
    let transaction = client.transaction().await.unwrap();
    pg_fence_client::backend::deadpool::set_fence_token(&transaction, stale)
        .await
        .unwrap();
    let error = transaction
        .query_typed(&format!("UPDATE {table} SET n = n + 1"), &[])
        .await
        .unwrap_err();
    let error = pg_fence_client::backend::deadpool::error(error);
    assert!(matches!(error, Error::StaleToken { .. }), "{error:?}");
    drop(transaction);

    let pool = sqlx_pool("client_fenced_sqlx").await;
    let lease = Lease::try_acquire(&pool, &key, &options)
        .await
        .unwrap()
        .unwrap();
    let mut transaction = pool.begin().await.unwrap();
    pg_fence_client::backend::sqlx::set_fence_token(&mut transaction, lease.token())
        .await
        .unwrap();
    sqlx::query(&format!("UPDATE {table} SET n = n + 1"))
        .persistent(false)
        .execute(&mut *transaction)
        .await
        .unwrap();
    transaction.commit().await.unwrap();
    assert!(lease.release().await.unwrap());
    let mut transaction = pool.begin().await.unwrap();
    pg_fence_client::backend::sqlx::set_fence_token(&mut transaction, stale)
        .await
        .unwrap();
    let error = sqlx::query(&format!("UPDATE {table} SET n = n + 1"))
        .persistent(false)
        .execute(&mut *transaction)
        .await
        .unwrap_err();
    let error = pg_fence_client::backend::sqlx::error(error);
    assert!(matches!(error, Error::StaleToken { .. }), "{error:?}");

    let n: i32 = db
        .query_one(&format!("SELECT n FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "exactly the two writes with live tokens landed");
}

through_both_backends!(a_lost_acquire_reply_is_retried_as_the_same_holder);
async fn a_lost_acquire_reply_is_retried_as_the_same_holder<B: Backend>(backend: B, _app: String) {
    let key = unique_key("client-lost-reply");
    let flaky = Faulty::new(backend).lose_first_reply();
    // Without G6 the retry would find the key busy (held by our own first,
    // unacknowledged request) and we would be locked out for the ttl.
    let lease = Lease::try_acquire(&flaky, &key, &LeaseOptions::default())
        .await
        .unwrap()
        .expect("G6: our own lease back");
    assert!(flaky.fired(), "the first reply was lost");
    assert_eq!(
        live_token(&connect().await, &key).await,
        Some(lease.token()),
        "one lease, the first request's"
    );
    assert!(lease.release().await.unwrap());
}

through_both_backends!(a_lost_permit_reply_is_retried_as_the_same_holder);
/// As for a key: a semaphore acquire whose reply was lost is retried as the
/// same holder and gets the permit its first request was granted (G6 per
/// permit), not a second one.
async fn a_lost_permit_reply_is_retried_as_the_same_holder<B: Backend>(backend: B, _app: String) {
    let semaphore = pg_fence_client::Semaphore::new(unique_key("client-lost-permit"), 3).unwrap();
    let flaky = Faulty::new(backend).lose_first_reply();
    let permit = semaphore
        .try_acquire(&flaky, &LeaseOptions::default())
        .await
        .unwrap()
        .expect("G6: our own permit back");
    assert!(flaky.fired());
    let live: i64 = connect()
        .await
        .query_one(
            "SELECT count(*) FROM fence.semaphore_status($1)",
            &[&semaphore.name()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(live, 1, "one permit, the first request's");
    assert!(permit.release().await.unwrap());
}

through_both_backends!(a_lease_won_after_a_long_wait_is_not_reported_lost);
async fn a_lease_won_after_a_long_wait_is_not_reported_lost<B: Backend>(backend: B, _app: String) {
    let key = unique_key("client-long-wait");
    let db = connect().await;
    let first = acquire(&db, &key, "30 seconds", Some("first"), "0")
        .await
        .unwrap()
        .unwrap();
    let releaser = {
        let key = key.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1600)).await;
            assert!(release(&connect().await, &key, first).await.unwrap());
        })
    };
    // Waits ~1.6 s, then holds a 2 s lease: the local deadline must count
    // from the grant, not from when the wait began.
    let options = LeaseOptions::new(Duration::from_secs(2))
        .renew_every(Duration::from_millis(500))
        .safety_margin(Duration::from_millis(200));
    let lease = Lease::acquire(&backend, &key, &options, Duration::from_secs(5))
        .await
        .unwrap()
        .expect("granted");
    releaser.await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        lease.loss(),
        None,
        "a lease is not lost just because it was waited for"
    );
    assert_eq!(live_token(&db, &key).await, Some(lease.token()));
    assert!(lease.release().await.unwrap());
}

through_both_backends!(lease_options_must_renew_inside_the_ttl);
async fn lease_options_must_renew_inside_the_ttl<B: Backend>(backend: B, _app: String) {
    let key = unique_key("client-bad-options");
    for options in [
        LeaseOptions::new(Duration::from_secs(1)).renew_every(Duration::from_secs(2)),
        LeaseOptions::new(Duration::from_secs(1)).renew_every(Duration::ZERO),
        LeaseOptions::new(Duration::from_secs(1)).safety_margin(Duration::from_secs(1)),
    ] {
        let error = Lease::try_acquire(&backend, &key, &options)
            .await
            .err()
            .expect("refused");
        assert!(matches!(error, Error::Usage(_)), "{error:?}");
        assert_eq!(
            error.sqlstate(),
            None,
            "a client-side refusal has no SQLSTATE"
        );
    }
    assert_eq!(
        live_token(&connect().await, &key).await,
        None,
        "nothing was sent"
    );
}

through_both_backends!(a_loss_future_outliving_its_guard_reports_abandoned);
async fn a_loss_future_outliving_its_guard_reports_abandoned<B: Backend>(backend: B, _app: String) {
    let key = unique_key("client-abandoned");
    let lease = Lease::try_acquire(&backend, &key, &LeaseOptions::default())
        .await
        .unwrap()
        .unwrap();
    let lost = lease.lost();
    drop(lease);
    let reason = tokio::time::timeout(Duration::from_secs(2), lost)
        .await
        .expect("resolves");
    assert_eq!(reason, LossReason::Abandoned);
}

through_both_backends!(a_release_that_cuts_a_renewal_short_ends_the_lease);
/// `release()` aborts the renewal task rather than waiting for it: released
/// while renewals are in flight, the lease must still end (a renewal that
/// reaches the server after the release finds nothing live to extend), be
/// reported released (never lost), and leave the pool's connections usable.
async fn a_release_that_cuts_a_renewal_short_ends_the_lease<B: Backend>(backend: B, _app: String) {
    let key = unique_key("client-release-mid-renewal");
    // Renewing every millisecond: nearly every release lands on one in flight.
    let options = LeaseOptions::new(Duration::from_secs(5)).renew_every(Duration::from_millis(1));
    let observer = connect().await;
    for round in 0..40u64 {
        let lease = Lease::try_acquire(&backend, &key, &options)
            .await
            .unwrap()
            .expect("free");
        let lost = lease.lost();
        tokio::time::sleep(Duration::from_micros(300 * (round % 7))).await;
        assert!(lease.release().await.unwrap(), "round {round}: was live");
        assert_eq!(live_token(&observer, &key).await, None, "round {round}");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), lost)
                .await
                .is_err(),
            "round {round}: a released lease is never reported lost"
        );
    }
    // No renewal cut off in flight comes back to life later either.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(live_token(&observer, &key).await, None);
}

/// A guard whose renewal task is gone while the guard lives on (its runtime
/// shut down; a panic in the task is the same) must tell the holder:
/// nobody renews the lease any more, so `lost()` resolves `Abandoned`
/// rather than never.
fn a_guard_that_outlives_its_renewal_task_reports_abandoned<B, F>(make: fn(String) -> F)
where
    B: Backend + 'static,
    F: std::future::Future<Output = B>,
{
    let key = unique_key("client-task-gone");
    let first = tokio::runtime::Runtime::new().unwrap();
    let (lease, lost) = first.block_on(async {
        let backend = make(unique_table("task-gone")).await;
        let lease = Lease::try_acquire(&backend, &key, &LeaseOptions::default())
            .await
            .unwrap()
            .expect("free");
        let lost = lease.lost();
        (lease, lost)
    });
    // Shutting the runtime down drops the renewal task; the guard lives on.
    first.shutdown_timeout(Duration::from_secs(2));
    let second = tokio::runtime::Runtime::new().unwrap();
    let reason =
        second.block_on(async { tokio::time::timeout(Duration::from_secs(2), lost).await });
    assert_eq!(reason, Ok(LossReason::Abandoned));
    // Its pool belonged to the runtime that is gone: nothing can release it
    // (the key is unique; it expires).
    std::mem::forget(lease);
}

#[test]
fn a_guard_that_outlives_its_renewal_task_reports_abandoned_sqlx() {
    a_guard_that_outlives_its_renewal_task_reports_abandoned(
        |app| async move { sqlx_pool(&app).await },
    );
}

#[test]
fn a_guard_that_outlives_its_renewal_task_reports_abandoned_deadpool() {
    a_guard_that_outlives_its_renewal_task_reports_abandoned(|app| async move {
        deadpool_pool(&app).await
    });
}

through_both_backends!(a_semaphore_never_has_more_than_n_permit_guards_at_once);
/// `Semaphore`: permits are lease guards; racing tasks never hold more
/// than N at once and all N get used.
async fn a_semaphore_never_has_more_than_n_permit_guards_at_once<B: Backend>(
    backend: B,
    _app: String,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const PERMITS: usize = 2;
    let semaphore =
        pg_fence_client::Semaphore::new(unique_key("client-sem"), PERMITS as u32).unwrap();
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let stop = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    // Four tasks: a waiting acquire holds one of the pool's four connections
    // while it waits, and a release needs one too.
    for _ in 0..4 {
        let (backend, semaphore, inside, most) = (
            backend.clone(),
            semaphore.clone(),
            inside.clone(),
            most.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut grants = 0;
            while Instant::now() < stop {
                let permit = semaphore
                    .acquire(&backend, &LeaseOptions::default(), Duration::from_secs(10))
                    .await
                    .unwrap()
                    .expect("a permit within 10 s");
                assert!(
                    permit.key().starts_with(semaphore.name()),
                    "{}",
                    permit.key()
                );
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                assert!(now <= PERMITS, "{now} permits held");
                tokio::time::sleep(Duration::from_millis(5)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                assert!(permit.release().await.unwrap());
                grants += 1;
            }
            grants
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(most.load(Ordering::SeqCst), PERMITS);
    assert!(total > 20, "{total} grants");
}

through_both_backends!(a_permit_guard_renews_and_its_drop_gives_the_permit_back);
async fn a_permit_guard_renews_and_its_drop_gives_the_permit_back<B: Backend>(
    backend: B,
    _app: String,
) {
    let semaphore = pg_fence_client::Semaphore::new(unique_key("client-sem-one"), 1).unwrap();
    let options = LeaseOptions::new(Duration::from_millis(600));
    let permit = semaphore
        .try_acquire(&backend, &options)
        .await
        .unwrap()
        .expect("free");
    let lost = permit.lost();
    // Held well past its ttl: renewed in the background.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        live_token(&connect().await, permit.key()).await,
        Some(permit.token())
    );
    assert!(semaphore
        .try_acquire(&backend, &options)
        .await
        .unwrap()
        .is_none());
    // Dropped: nobody renews it any more (asked at once: past its local
    // deadline, some 540 ms on, the answer would be DeadlinePassed), it is
    // released in the background, and the permit is free again.
    drop(permit);
    assert_eq!(
        tokio::time::timeout(Duration::from_millis(100), lost).await,
        Ok(LossReason::Abandoned)
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    let again = loop {
        if let Some(permit) = semaphore.try_acquire(&backend, &options).await.unwrap() {
            break permit;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped permit never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(again.release().await.unwrap());
    let error = pg_fence_client::Semaphore::new("s", 0).unwrap_err();
    assert!(matches!(error, Error::Usage(_)), "{error:?}");
}

/// Issue 16, 1: the guard tells the truth at the moment it is asked. On a
/// current-thread runtime blocked past the lease's local deadline the
/// renewal task never ran; `loss()`, `lost()` and `run()` must still say
/// the lease is lost.
/// A test body run on the starved runtime.
type Body = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

fn starved<B, F>(make: fn(String) -> F, body: fn(B, String) -> Body)
where
    B: Backend + 'static,
    F: std::future::Future<Output = B>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let key = unique_key("client-starved");
        let backend = make(unique_table("starved")).await;
        body(backend, key).await;
    });
}

fn short_lease() -> LeaseOptions {
    // Local deadline 600 - 60 = 540 ms after the acquire was sent.
    LeaseOptions::new(Duration::from_millis(600))
}

fn loss_is_told_past_the_deadline_though_the_renewal_task_never_ran<B: Backend>(
    backend: B,
    key: String,
) -> Body {
    Box::pin(async move {
        let lease = Lease::try_acquire(&backend, &key, &short_lease())
            .await
            .unwrap()
            .expect("free");
        assert_eq!(lease.loss(), None);
        // Blocking code: nothing else on this runtime runs meanwhile.
        std::thread::sleep(Duration::from_millis(900));
        assert_eq!(lease.loss(), Some(LossReason::DeadlinePassed));
        let lost = tokio::time::timeout(Duration::from_millis(50), lease.lost()).await;
        assert_eq!(lost, Ok(LossReason::DeadlinePassed));
        drop(lease);
    })
}

fn run_reports_work_that_outlived_the_deadline_as_lost<B: Backend>(
    backend: B,
    key: String,
) -> Body {
    Box::pin(async move {
        let outcome = run(
            &backend,
            &key,
            &short_lease(),
            Duration::ZERO,
            |_token| async {
                std::thread::sleep(Duration::from_millis(900));
                7
            },
        )
        .await
        .unwrap();
        assert_eq!(outcome, RunOutcome::Lost(LossReason::DeadlinePassed));
    })
}

#[test]
fn loss_is_told_past_the_deadline_on_a_starved_runtime_sqlx() {
    starved(
        |app| async move { sqlx_pool(&app).await },
        loss_is_told_past_the_deadline_though_the_renewal_task_never_ran,
    );
}

#[test]
fn loss_is_told_past_the_deadline_on_a_starved_runtime_deadpool() {
    starved(
        |app| async move { deadpool_pool(&app).await },
        loss_is_told_past_the_deadline_though_the_renewal_task_never_ran,
    );
}

#[test]
fn run_reports_work_that_outlived_the_deadline_as_lost_sqlx() {
    starved(
        |app| async move { sqlx_pool(&app).await },
        run_reports_work_that_outlived_the_deadline_as_lost,
    );
}

#[test]
fn run_reports_work_that_outlived_the_deadline_as_lost_deadpool() {
    starved(
        |app| async move { deadpool_pool(&app).await },
        run_reports_work_that_outlived_the_deadline_as_lost,
    );
}

through_both_backends!(run_reports_a_lease_forced_away_during_the_work_as_lost);
/// Issue 16, 1: a release that finds the lease no longer live (forced, or
/// expired on the server, before the next renewal could notice) means the
/// work did not finish under it.
async fn run_reports_a_lease_forced_away_during_the_work_as_lost<B: Backend>(
    backend: B,
    _app: String,
) {
    let key = unique_key("client-forced-in-run");
    let admin = connect().await;
    let outcome = run(
        &backend,
        &key,
        &LeaseOptions::default(),
        Duration::ZERO,
        |_token| {
            let (admin, key) = (&admin, key.clone());
            async move {
                let forced: bool = admin
                    .query_one("SELECT fence.lock_force_release($1)", &[&key])
                    .await
                    .unwrap()
                    .get(0);
                assert!(forced);
                7
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(outcome, RunOutcome::Lost(LossReason::NotLive));
}

through_both_backends!(lost_replies_are_retried_with_backoff_until_the_server_answers);
/// Issue 16, 3: replies lost for longer than a few immediate retries last
/// (a restart, a failover) are retried with backoff, as the same holder,
/// and the lease the first request got comes back.
async fn lost_replies_are_retried_with_backoff_until_the_server_answers<B: Backend>(
    backend: B,
    _app: String,
) {
    let key = unique_key("client-lost-replies");
    let flaky = Faulty::new(backend)
        .lose_replies_until(std::time::Instant::now() + Duration::from_millis(1500));
    let lease = Lease::try_acquire(&flaky, &key, &LeaseOptions::default())
        .await
        .unwrap()
        .expect("our own lease back (G6)");
    assert_eq!(
        live_token(&connect().await, &key).await,
        Some(lease.token())
    );
    assert!(lease.release().await.unwrap());
}

through_both_backends!(an_acquire_that_gives_up_leaves_nothing_held);
/// Issue 16, 3: an acquire that runs out of its retry budget says its
/// outcome is unknown, names the holder, and the lease its requests got is
/// released once the server answers again, long before its ttl.
async fn an_acquire_that_gives_up_leaves_nothing_held<B: Backend>(backend: B, _app: String) {
    let key = unique_key("client-gave-up");
    let flaky = Faulty::new(backend)
        .lose_replies_until(std::time::Instant::now() + Duration::from_millis(1500));
    let options =
        LeaseOptions::new(Duration::from_secs(30)).ambiguous_retry_for(Duration::from_millis(300));
    let error = Lease::try_acquire(&flaky, &key, &options)
        .await
        .err()
        .expect("no answer within the budget");
    assert!(
        matches!(&error, Error::AcquireAmbiguous { holder, .. } if !holder.is_empty()),
        "{error:?}"
    );
    let db = connect().await;
    assert!(
        live_token(&db, &key).await.is_some(),
        "the first request did grant"
    );
    let started = Instant::now();
    while live_token(&db, &key).await.is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the unacknowledged lease was left held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

through_both_backends!(a_cleanup_never_releases_a_lease_its_holder_took_back);
/// Issue 16, 3: after `AcquireAmbiguous`, a caller that acquires again as
/// the same holder gets the lease back (G6), and the background cleanup
/// must not release it from under them.
async fn a_cleanup_never_releases_a_lease_its_holder_took_back<B: Backend>(
    backend: B,
    _app: String,
) {
    let key = unique_key("client-cleanup-adopted");
    let flaky = Faulty::new(backend.clone())
        .lose_replies_until(std::time::Instant::now() + Duration::from_millis(1500));
    let options = LeaseOptions::new(Duration::from_secs(30))
        .holder("worker-h")
        .ambiguous_retry_for(Duration::from_millis(300));
    let error = Lease::try_acquire(&flaky, &key, &options)
        .await
        .err()
        .unwrap();
    assert!(matches!(error, Error::AcquireAmbiguous { .. }), "{error:?}");
    // The caller tries again as that holder, and holds the lease.
    let lease = Lease::try_acquire(&backend, &key, &options)
        .await
        .unwrap()
        .expect("its own lease back, or a fresh one");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        live_token(&connect().await, &key).await,
        Some(lease.token()),
        "the cleanup released a lease in use"
    );
    assert!(lease.release().await.unwrap());
}

fn a_release_past_the_deadline_tells_the_loss<B: Backend>(backend: B, key: String) -> Body {
    Box::pin(async move {
        let lease = Lease::try_acquire(&backend, &key, &short_lease())
            .await
            .unwrap()
            .expect("free");
        let lost = lease.lost();
        std::thread::sleep(Duration::from_millis(900));
        // Nobody asked before releasing: the release itself says it.
        let _ = lease.release().await;
        let lost = tokio::time::timeout(Duration::from_millis(50), lost).await;
        assert_eq!(lost, Ok(LossReason::DeadlinePassed));
    })
}

#[test]
fn a_release_past_the_deadline_tells_the_loss_sqlx() {
    starved(
        |app| async move { sqlx_pool(&app).await },
        a_release_past_the_deadline_tells_the_loss,
    );
}

#[test]
fn a_release_past_the_deadline_tells_the_loss_deadpool() {
    starved(
        |app| async move { deadpool_pool(&app).await },
        a_release_past_the_deadline_tells_the_loss,
    );
}

through_both_backends!(a_release_waits_no_longer_than_the_leases_deadline);
/// Issue 16, 7: after a partition a release would wait for minutes; it
/// waits until the lease's local deadline (the lease is assumed gone then).
async fn a_release_waits_no_longer_than_the_leases_deadline<B: Backend>(backend: B, _app: String) {
    let slow = Faulty::new(backend).slow_release(Duration::from_secs(5));
    let key = unique_key("client-slow-release");
    let lease = Lease::try_acquire(&slow, &key, &LeaseOptions::new(Duration::from_millis(600)))
        .await
        .unwrap()
        .expect("free");
    let deadline = lease.deadline().expect("held");
    let released = tokio::time::timeout(Duration::from_secs(3), lease.release())
        .await
        .expect("bounded by the lease's deadline");
    assert!(
        matches!(released, Err(Error::Connection(_))),
        "{released:?}"
    );
    // Waited until the lease's local deadline, no less, and not much more.
    let now = Instant::now();
    assert!(
        now + Duration::from_millis(20) >= deadline,
        "gave up {:?} early",
        deadline - now
    );
    assert!(now < deadline + Duration::from_secs(1));
    // With the deadline far off, a slow answer is waited for.
    let slow = slow.slow_release(Duration::from_secs(1));
    let key = unique_key("client-slow-release-ok");
    let lease = Lease::try_acquire(&slow, &key, &LeaseOptions::default())
        .await
        .unwrap()
        .expect("free");
    assert!(lease.release().await.unwrap());
}

through_both_backends!(a_release_whose_future_is_dropped_still_releases);
/// Issue 16, 7: a `release()` dropped while its request waits (for a
/// connection, say) still releases.
async fn a_release_whose_future_is_dropped_still_releases<B: Backend>(backend: B, _app: String) {
    let slow = Faulty::new(backend).slow_release(Duration::from_millis(300));
    let key = unique_key("client-dropped-release");
    let lease = Lease::try_acquire(&slow, &key, &LeaseOptions::default())
        .await
        .unwrap()
        .expect("free");
    let token = lease.token();
    let db = connect().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(50), lease.release())
            .await
            .is_err()
    );
    assert_eq!(live_token(&db, &key).await, Some(token), "not yet sent");
    let started = Instant::now();
    while live_token(&db, &key).await.is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the dropped release never landed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

through_both_backends!(a_late_release_never_ends_the_lease_its_holder_took_back);
/// Review of issue 16, 7: a release still on its way in the background
/// must not end the lease that an acquire naming the same holder got back
/// meanwhile (G6 hands back the same token): that acquire waits for it.
async fn a_late_release_never_ends_the_lease_its_holder_took_back<B: Backend>(
    backend: B,
    _app: String,
) {
    let slow = Faulty::new(backend).slow_release(Duration::from_millis(800));
    let key = unique_key("client-late-release");
    let options = LeaseOptions::default().holder("worker-late");
    let lease = Lease::try_acquire(&slow, &key, &options)
        .await
        .unwrap()
        .expect("free");
    assert!(
        tokio::time::timeout(Duration::from_millis(50), lease.release())
            .await
            .is_err()
    );
    let again = Lease::try_acquire(&slow, &key, &options)
        .await
        .unwrap()
        .expect("free once the release landed, or ours");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        live_token(&connect().await, &key).await,
        Some(again.token()),
        "the late release ended the lease taken back"
    );
    drop(again);
}

#[tokio::test]
async fn a_zero_safety_margin_is_refused() {
    let options = LeaseOptions::new(Duration::from_secs(1)).safety_margin(Duration::ZERO);
    let error = options.validate().unwrap_err();
    assert!(matches!(error, Error::Usage(_)), "{error:?}");
}

/// The PgBouncer tier (`make test-pgbouncer`) must really go through a
/// PgBouncer in transaction mode: its admin console says so. (Without a
/// pooler, there is nothing to check.)
#[tokio::test]
async fn the_pooler_tier_goes_through_pgbouncer_in_transaction_mode() {
    if !through_pooler() {
        return;
    }
    let console = connect_to_database(pool_port(), "postgres", "pgbouncer").await;
    let rows = console.simple_query("SHOW CONFIG").await.unwrap();
    let pool_mode = rows.iter().find_map(|message| match message {
        tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("pool_mode") => {
            row.get(1).map(str::to_owned)
        }
        _ => None,
    });
    assert_eq!(pool_mode.as_deref(), Some("transaction"));
}
