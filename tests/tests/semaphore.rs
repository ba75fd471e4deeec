//! Semaphores (`fence.semaphore_acquire`, `fence.semaphore_status`): never
//! more than N live permits, all N used under load, an expired permit's
//! slot handed to a waiter, waiters served in arrival order (preload mode),
//! G6 per permit, callers that disagree on N, fencing by permit, and every
//! bad input's SQLSTATE.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_fence_tests::*;

/// A permit: its key and token, or None if none was granted in time.
async fn take(
    client: &Client,
    name: &str,
    permits: i32,
    ttl: &str,
    holder: Option<&str>,
    wait: &str,
) -> Result<Option<(String, i64)>, Error> {
    let row = client
        .query_one(
            "SELECT (l).lock_key, (l).token FROM (SELECT fence.semaphore_acquire($1, $2, $3::text::interval, $4, $5::text::interval) AS l) AS s",
            &[&name, &permits, &ttl, &holder, &wait],
        )
        .await?;
    let key: Option<String> = row.get(0);
    Ok(key.map(|key| (key, row.get(1))))
}

async fn live_permits(client: &Client, name: &str) -> Vec<(String, i64)> {
    client
        .query(
            "SELECT lock_key, token FROM fence.semaphore_status($1) ORDER BY lock_key",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// A session queued for a permit of `name` (listed in fence.waiters before
/// this returns); its task gives the permit back at once and yields its
/// token.
async fn queue_for_a_permit(db: &Client, name: &str, permits: i32) -> tokio::task::JoinHandle<i64> {
    let waiter = connect().await;
    let pid = backend_pid(&waiter).await;
    let name = name.to_owned();
    let queued = tokio::spawn(async move {
        let permit = take(&waiter, &name, permits, "1 minute", None, "30 seconds")
            .await
            .unwrap()
            .expect("the waiter's turn");
        release(&waiter, &permit.0, permit.1).await.unwrap();
        permit.1
    });
    until_listed(db, pid, true).await;
    queued
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn never_more_than_n_live_permits_and_all_n_used_under_load() {
    const PERMITS: i32 = 3;
    const SESSIONS: usize = 8;
    let name = unique_key("sem-load");
    let inside = Arc::new(AtomicUsize::new(0));
    let most_inside = Arc::new(AtomicUsize::new(0));
    let grants = Arc::new(AtomicI64::new(0));
    let stop = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..SESSIONS {
        let (name, inside, most_inside, grants) = (
            name.clone(),
            inside.clone(),
            most_inside.clone(),
            grants.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = connect().await;
            while Instant::now() < stop {
                let Some((key, token)) =
                    take(&client, &name, PERMITS, "1 minute", None, "10 seconds")
                        .await
                        .unwrap()
                else {
                    panic!("a 10 s wait ran out");
                };
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most_inside.fetch_max(now, Ordering::SeqCst);
                assert!(
                    now <= PERMITS as usize,
                    "{now} holders inside a {PERMITS}-permit semaphore"
                );
                grants.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                assert!(
                    release(&client, &key, token).await.unwrap(),
                    "{key} was live"
                );
            }
        }));
    }
    // Meanwhile the server never shows more than N live permits either.
    let observer = connect().await;
    let mut most_live = 0;
    while Instant::now() < stop {
        let live = live_permits(&observer, &name).await.len();
        assert!(live <= PERMITS as usize, "{live} live permits");
        most_live = most_live.max(live);
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        most_inside.load(Ordering::SeqCst),
        PERMITS as usize,
        "all permits used"
    );
    assert!(grants.load(Ordering::SeqCst) > 100, "{grants:?}");
    assert!(
        most_live >= 2,
        "the status saw {most_live} live permits at most"
    );
    assert!(live_permits(&observer, &name).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_permit_goes_to_a_waiter() {
    let db = connect().await;
    let name = unique_key("sem-expiry");
    // Two permits, both taken by holders that vanish without releasing.
    let first = take(&db, &name, 2, "400 milliseconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    let second = take(&db, &name, 2, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert_ne!(first.0, second.0);
    assert_eq!(
        take(&db, &name, 2, "1 minute", None, "0").await.unwrap(),
        None
    );
    let waiter = connect().await;
    let started = Instant::now();
    let (key, token) = take(&waiter, &name, 2, "1 minute", None, "10 seconds")
        .await
        .unwrap()
        .expect("the expired permit");
    assert_eq!(key, first.0, "the permit that expired");
    assert!(token > second.1);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_get_permits_in_arrival_order() {
    let db = connect().await;
    let name = unique_key("sem-fifo");
    let held = take(&db, &name, 1, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let mut queued = Vec::new();
    for _ in 0..4 {
        let client = connect().await;
        let pid = backend_pid(&client).await;
        let name = name.clone();
        queued.push(tokio::spawn(async move {
            let permit = take(&client, &name, 1, "1 minute", None, "30 seconds")
                .await
                .unwrap()
                .expect("granted");
            let at = Instant::now();
            release(&client, &permit.0, permit.1).await.unwrap();
            (permit.1, at)
        }));
        until_listed(&db, pid, true).await;
    }
    assert!(release(&db, &held.0, held.1).await.unwrap());
    let mut previous: Option<(i64, Instant)> = None;
    for task in queued {
        let (token, at) = task.await.unwrap();
        if let Some((before, then)) = previous {
            assert!(token > before && at >= then, "out of arrival order");
        }
        previous = Some((token, at));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_releaser_does_not_barge_past_a_queued_waiter() {
    let db = connect().await;
    let holder = connect().await;
    let name = unique_key("sem-barge");
    for round in 0..20 {
        let (key, token) = take(&holder, &name, 1, "1 minute", None, "0")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("round {round}: the permit was not free"));
        let queued = queue_for_a_permit(&db, &name, 1).await;
        // Release and at once ask again: the permit is the waiter's, whose
        // wake-up is still on its way (the waiter gives it back as soon as
        // it has it, so the releaser may get it after the waiter's turn).
        assert!(release(&holder, &key, token).await.unwrap());
        let again = take(&holder, &name, 1, "1 minute", None, "0")
            .await
            .unwrap();
        if let Some((key, again)) = &again {
            assert!(release(&holder, key, *again).await.unwrap());
        }
        let waiters_token = queued.await.unwrap();
        if let Some((_, again)) = again {
            assert!(
                again > waiters_token,
                "round {round}: the releaser barged past the queue ({again} before {waiters_token})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_retrying_gets_its_own_permit_back() {
    let db = connect().await;
    let name = unique_key("sem-g6");
    let mine = take(&db, &name, 3, "1 minute", Some("worker-1"), "0")
        .await
        .unwrap()
        .unwrap();
    let other = take(&db, &name, 3, "1 minute", Some("worker-2"), "0")
        .await
        .unwrap()
        .unwrap();
    assert_ne!(mine.0, other.0);
    // The same holder again: the same permit and token, not a second one.
    assert_eq!(
        take(&db, &name, 3, "1 minute", Some("worker-1"), "0")
            .await
            .unwrap(),
        Some(mine.clone())
    );
    assert_eq!(live_permits(&db, &name).await.len(), 2);
    // Renewed and released with the lease functions, on the permit's key.
    assert!(renew(&db, &mine.0, mine.1).await.unwrap());
    assert!(release(&db, &mine.0, mine.1).await.unwrap());
    assert!(release(&db, &other.0, other.1).await.unwrap());
    assert!(live_permits(&db, &name).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_that_disagree_on_n_each_stay_within_their_own() {
    let db = connect().await;
    let name = unique_key("sem-disagree");
    let mut four = Vec::new();
    for _ in 0..4 {
        four.push(
            take(&db, &name, 4, "1 minute", None, "0")
                .await
                .unwrap()
                .expect("one of 4"),
        );
    }
    assert_eq!(
        take(&db, &name, 4, "1 minute", None, "0").await.unwrap(),
        None
    );
    // A caller that thinks there are 2: both of its permits are taken.
    assert_eq!(
        take(&db, &name, 2, "1 minute", None, "0").await.unwrap(),
        None
    );
    // Free permit 4: still none for the caller with 2; one for a caller with 4.
    let fourth = four
        .iter()
        .find(|(key, _)| key.ends_with(":permit:4"))
        .unwrap()
        .clone();
    assert!(release(&db, &fourth.0, fourth.1).await.unwrap());
    assert_eq!(
        take(&db, &name, 2, "1 minute", None, "0").await.unwrap(),
        None
    );
    // Free permit 1: the caller with 2 gets it.
    let first = four
        .iter()
        .find(|(key, _)| key.ends_with(":permit:1"))
        .unwrap()
        .clone();
    assert!(release(&db, &first.0, first.1).await.unwrap());
    let (key, _) = take(&db, &name, 2, "1 minute", None, "0")
        .await
        .unwrap()
        .expect("permit 1");
    assert_eq!(key, first.0);
    assert_eq!(live_permits(&db, &name).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_fenced_by_permit_takes_only_the_permits_live_token() {
    let db = connect().await;
    let name = unique_key("sem-fence");
    let table = unique_table("sem_fenced");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (slot text PRIMARY KEY, token bigint, v int);
         INSERT INTO {table} VALUES ('1', 0, 0), ('2', 0, 0);
         SELECT fence.protect('{table}', key_column => 'slot', key_prefix => '{name}:permit:', token_column => 'token');"
    ))
    .await
    .unwrap();
    let (key, token) = take(&db, &name, 2, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let slot = key.rsplit(':').next().unwrap().to_owned();
    let write = format!("UPDATE {table} SET v = v + 1, token = $1 WHERE slot = $2");
    db.execute(&write, &[&token, &slot]).await.unwrap();
    let error = db
        .execute(&write, &[&(token - 1), &slot])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error).as_deref(), Some("FN001"));
    assert!(release(&db, &key, token).await.unwrap());
    let error = db.execute(&write, &[&token, &slot]).await.unwrap_err();
    assert_eq!(
        sqlstate(&error).as_deref(),
        Some("FN001"),
        "the permit was released"
    );
}

#[tokio::test]
async fn bad_inputs_get_their_sqlstates() {
    let db = connect().await;
    let long = "x".repeat(1013);
    for (sql, state) in [
        ("SELECT fence.semaphore_acquire(NULL, 3)", "22004"),
        ("SELECT fence.semaphore_acquire('', 3)", "22023"),
        (
            &format!("SELECT fence.semaphore_acquire('{long}', 3)") as &str,
            "22023",
        ),
        ("SELECT fence.semaphore_acquire('s', NULL)", "22004"),
        ("SELECT fence.semaphore_acquire('s', 0)", "22023"),
        ("SELECT fence.semaphore_acquire('s', -1)", "22023"),
        ("SELECT fence.semaphore_acquire('s', 1025)", "22023"),
        (
            "SELECT fence.semaphore_acquire('s', 3, '0 seconds')",
            "22023",
        ),
        ("SELECT fence.semaphore_acquire('s', 3, NULL)", "22004"),
        (
            "SELECT fence.semaphore_acquire('s', 3, '1 minute', NULL, '-1 second')",
            "22023",
        ),
        (
            "SELECT fence.semaphore_acquire('s', 3, '1 minute', NULL, NULL)",
            "22004",
        ),
        ("SELECT * FROM fence.semaphore_status(NULL)", "22004"),
        ("SELECT * FROM fence.semaphore_status('')", "22023"),
    ] {
        let (got, message) = expect_error(&db, sql).await;
        assert_eq!(got, state, "{sql}: {message}");
    }
    let (_, message) = expect_error(&db, "SELECT fence.semaphore_acquire('s', 1025)").await;
    assert!(message.contains("1024"), "{message}");
    // The longest name that fits is accepted, and its largest permit key fits a key.
    let longest = "y".repeat(1012);
    let (key, token) = take(&db, &longest, 1024, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(&db, &key, token).await.unwrap());
    // Its largest permit key, permit 1024, is a valid key.
    let last = format!("{longest}:permit:1024");
    assert_eq!(last.len(), 1024);
    let token = acquire(&db, &last, "1 minute", None, "0")
        .await
        .unwrap()
        .expect("a valid key");
    assert!(release(&db, &last, token).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_retry_by_the_same_holder_gets_the_permit_its_first_request_got() {
    // A lost reply behind a reset connection: the first request is still
    // queued when the client retries as the same holder. Whichever of the
    // two is granted first, the other gets that permit back (G6), never a
    // second one.
    let db = connect().await;
    let name = unique_key("sem-g6-queued");
    let one = take(&db, &name, 2, "1 minute", Some("x1"), "0")
        .await
        .unwrap()
        .unwrap();
    let two = take(&db, &name, 2, "1 minute", Some("x2"), "0")
        .await
        .unwrap()
        .unwrap();
    let mut requests = Vec::new();
    for _ in 0..2 {
        let client = connect().await;
        let pid = backend_pid(&client).await;
        let name = name.clone();
        requests.push(tokio::spawn(async move {
            take(&client, &name, 2, "1 minute", Some("h"), "30 seconds")
                .await
                .unwrap()
                .expect("granted")
        }));
        until_listed(&db, pid, true).await;
    }
    assert!(release(&db, &two.0, two.1).await.unwrap());
    let first = requests.remove(0).await.unwrap();
    assert!(release(&db, &one.0, one.1).await.unwrap());
    let retry = requests.remove(0).await.unwrap();
    assert_eq!(retry, first, "the retry got a second permit");
    let live = live_permits(&db, &name).await;
    assert_eq!(live, vec![first.clone()], "one permit for holder h");
    assert!(release(&db, &first.0, first.1).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_named_like_a_semaphores_queue_is_just_a_key() {
    let db = connect().await;
    let name = unique_key("sem-queue-name");
    let held = take(&db, &name, 1, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let waiter = connect().await;
    let pid = backend_pid(&waiter).await;
    let name_ = name.clone();
    let queued = tokio::spawn(async move {
        take(&waiter, &name_, 1, "1 minute", None, "30 seconds")
            .await
            .unwrap()
    });
    until_listed(&db, pid, true).await;
    // Nobody holds this key; the semaphore's waiters are another queue.
    let key = format!("{name}:permit:*");
    let token = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .expect("a free key, whatever its name");
    let mode: String = db
        .query_one("SELECT mode FROM fence.waiters WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode, "semaphore");
    assert!(release(&db, &key, token).await.unwrap());
    assert!(release(&db, &held.0, held.1).await.unwrap());
    let permit = queued.await.unwrap().expect("the waiter's turn");
    assert!(release(&db, &permit.0, permit.1).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holding_one_permits_lock_does_not_let_a_transaction_past_the_queue_for_another() {
    let db = connect().await;
    let a = connect().await;
    let b = connect().await;
    let name = unique_key("sem-own-lock");
    let mine = take(&a, &name, 2, "1 minute", Some("a"), "0")
        .await
        .unwrap()
        .unwrap();
    for round in 0..20 {
        let other = take(&b, &name, 2, "1 minute", None, "0")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("round {round}: the second permit was not free"));
        let queued = queue_for_a_permit(&db, &name, 2).await;
        // a's transaction holds its own permit's lock (a renewal), then
        // asks for another just as b frees one: that one is the waiter's.
        a.batch_execute("BEGIN").await.unwrap();
        assert!(renew(&a, &mine.0, mine.1).await.unwrap());
        assert!(release(&b, &other.0, other.1).await.unwrap());
        let again = take(&a, &name, 2, "1 minute", None, "0").await.unwrap();
        a.batch_execute("COMMIT").await.unwrap();
        if let Some((key, token)) = &again {
            assert!(release(&a, key, *token).await.unwrap());
        }
        let waiters_token = queued.await.unwrap();
        if let Some((_, token)) = again {
            assert!(
                token > waiters_token,
                "round {round}: a transaction holding another permit barged ({token} before {waiters_token})"
            );
        }
    }
}
