//! Fair waiting (G7, preload mode): waiters are granted in arrival order, a
//! newcomer does not barge past the queue (a holder's own re-acquire, G6,
//! excepted), and a waiter that is cancelled, times out or disconnects
//! leaves the queue without stalling the ones behind it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_fence_tests::*;

/// A session that queues for `key` (waiting up to `wait`), listed in
/// fence.waiters before this returns; its task yields the token it got
/// (releasing it at once) and when.
async fn queue_up(
    db: &Client,
    key: &str,
    wait: &str,
) -> (
    i32,
    tokio::task::JoinHandle<(Result<Option<i64>, Error>, Instant)>,
) {
    let client = connect().await;
    let pid = backend_pid(&client).await;
    let (key, wait) = (key.to_owned(), wait.to_owned());
    let task = tokio::spawn(async move {
        let outcome = acquire(&client, &key, "1 minute", None, &wait).await;
        let at = Instant::now();
        if let Ok(Some(token)) = outcome {
            release(&client, &key, token).await.unwrap();
        }
        (outcome, at)
    });
    until_listed(db, pid, true).await;
    (pid, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_granted_in_arrival_order() {
    let db = connect().await;
    let key = unique_key("fifo");
    let first = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let mut queued = Vec::new();
    for _ in 0..6 {
        queued.push(queue_up(&db, &key, "30 seconds").await);
    }
    assert!(release(&db, &key, first).await.unwrap());
    let mut tokens = Vec::new();
    for (_, task) in queued {
        tokens.push(task.await.unwrap().0.unwrap().expect("granted"));
    }
    // Tokens follow the order of the grants: each waiter's is larger than
    // the one queued before it.
    assert!(
        tokens.windows(2).all(|pair| pair[0] < pair[1]),
        "grants out of arrival order: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_releaser_does_not_barge_past_a_queued_waiter() {
    let db = connect().await;
    let holder = connect().await;
    let key = unique_key("barge");
    for round in 0..20 {
        let token = acquire(&holder, &key, "1 minute", Some("holder"), "0")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("round {round}: the key was not free"));
        let (_, waiter) = queue_up(&db, &key, "30 seconds").await;
        // Release and at once try again: the key is the waiter's, whose
        // wake-up is still on its way. (The waiter releases as soon as it
        // has the key, so the releaser may get it back legitimately after
        // the waiter's turn: then its token is the larger.)
        assert!(release(&holder, &key, token).await.unwrap());
        let again = acquire(&holder, &key, "1 minute", Some("holder"), "0")
            .await
            .unwrap();
        if let Some(again) = again {
            assert!(release(&holder, &key, again).await.unwrap());
        }
        let waiters_token = waiter.await.unwrap().0.unwrap().expect("the waiter's turn");
        if let Some(again) = again {
            assert!(
                again > waiters_token,
                "round {round}: the releaser barged past the queue ({again} before {waiters_token})"
            );
        }
    }
    // A holder re-acquiring its own live lease (G6) is not barging.
    let token = acquire(&holder, &key, "1 minute", Some("holder"), "0")
        .await
        .unwrap()
        .unwrap();
    let (_, waiter) = queue_up(&db, &key, "30 seconds").await;
    assert_eq!(
        acquire(&holder, &key, "1 minute", Some("holder"), "0")
            .await
            .unwrap(),
        Some(token)
    );
    assert!(release(&holder, &key, token).await.unwrap());
    assert!(waiter.await.unwrap().0.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_head_that_is_cancelled_times_out_or_disconnects_does_not_stall_the_queue() {
    let db = connect().await;
    let key = unique_key("stall");
    let first = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let (cancelled, cancelled_task) = queue_up(&db, &key, "30 seconds").await;
    let (terminated, terminated_task) = queue_up(&db, &key, "30 seconds").await;
    let (_, timing_out_task) = queue_up(&db, &key, "1 second").await;
    let (_, next_task) = queue_up(&db, &key, "30 seconds").await;
    let (_, last_task) = queue_up(&db, &key, "30 seconds").await;
    db.execute("SELECT pg_cancel_backend($1)", &[&cancelled])
        .await
        .unwrap();
    db.execute("SELECT pg_terminate_backend($1)", &[&terminated])
        .await
        .unwrap();
    assert_eq!(
        sqlstate(cancelled_task.await.unwrap().0.as_ref().unwrap_err()).as_deref(),
        Some("57014")
    );
    assert!(terminated_task.await.unwrap().0.is_err());
    let (timed_out, _) = timing_out_task.await.unwrap();
    assert_eq!(timed_out.unwrap(), None);
    // Three waiters ahead of it are gone; the release goes to the next one
    // at once, not after some recheck.
    let released = Instant::now();
    assert!(release(&db, &key, first).await.unwrap());
    let (granted, at) = next_task.await.unwrap();
    assert!(granted.unwrap().is_some());
    let took = at.duration_since(released);
    assert!(
        took < Duration::from_millis(500),
        "the queue stalled for {took:?}"
    );
    assert!(last_task.await.unwrap().0.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_clients_get_equal_turns() {
    const CLIENTS: usize = 6;
    let key = unique_key("turns");
    let stop = Instant::now() + Duration::from_secs(3);
    let grants = Arc::new(Mutex::new(vec![0u32; CLIENTS]));
    let mut tasks = Vec::new();
    for client_number in 0..CLIENTS {
        let (key, grants) = (key.clone(), grants.clone());
        tasks.push(tokio::spawn(async move {
            let client = connect().await;
            while Instant::now() < stop {
                if let Some(token) = acquire(&client, &key, "1 minute", None, "10 seconds")
                    .await
                    .unwrap()
                {
                    grants.lock().unwrap()[client_number] += 1;
                    release(&client, &key, token).await.unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let grants = grants.lock().unwrap().clone();
    let (fewest, most) = (*grants.iter().min().unwrap(), *grants.iter().max().unwrap());
    assert!(fewest > 10, "{grants:?}");
    // Each client queues again behind the others after its turn, so turns
    // go round; only when nobody else is queued at that instant (all between
    // their turn and queueing again) may a client take the key twice.
    let ratio = f64::from(fewest) / f64::from(most);
    assert!(
        ratio >= 0.95,
        "unequal turns: {grants:?} (fewest / most {ratio:.3})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_that_holds_the_keys_lock_is_not_queued_behind_a_waiter() {
    let db = connect().await;
    let holder = connect().await;
    let key = unique_key("own_lock");
    let token = acquire(&holder, &key, "1 minute", Some("h1"), "0")
        .await
        .unwrap()
        .unwrap();
    let (_, waiter) = queue_up(&db, &key, "20 seconds").await;
    // Release and take the key again in one transaction: the release holds
    // the key's lock until it commits, so the waiter cannot be granted
    // before then; queued behind it, this transaction would wait for a
    // waiter that waits for it.
    holder.batch_execute("BEGIN").await.unwrap();
    assert!(release(&holder, &key, token).await.unwrap());
    let started = Instant::now();
    let again = acquire(&holder, &key, "1 minute", Some("h2"), "3 seconds")
        .await
        .unwrap();
    let took = started.elapsed();
    holder.batch_execute("COMMIT").await.unwrap();
    let again = again.expect("granted at once, not after its wait");
    assert!(took < Duration::from_secs(1), "waited {took:?}");
    assert!(release(&holder, &key, again).await.unwrap());
    assert!(waiter.await.unwrap().0.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_that_rolls_back_hands_the_key_to_the_next_waiter() {
    let db = connect().await;
    let key = unique_key("rolled_back");
    let first = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    // The head is granted inside a transaction that then rolls back.
    let head = connect().await;
    let head_pid = backend_pid(&head).await;
    let head_key = key.clone();
    let head_task = tokio::spawn(async move {
        head.batch_execute("BEGIN").await.unwrap();
        let granted = acquire(&head, &head_key, "1 minute", None, "20 seconds")
            .await
            .unwrap();
        assert!(granted.is_some());
        head.batch_execute("ROLLBACK").await.unwrap();
        Instant::now()
    });
    until_listed(&db, head_pid, true).await;
    let (_, next) = queue_up(&db, &key, "20 seconds").await;
    assert!(release(&db, &key, first).await.unwrap());
    let rolled_back = head_task.await.unwrap();
    let (granted, at) = next.await.unwrap();
    assert!(granted.unwrap().is_some());
    let took = at.saturating_duration_since(rolled_back);
    assert!(
        took < Duration::from_millis(300),
        "the key sat free for {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_expiry_hands_the_key_to_the_next_waiter_at_once() {
    let db = connect().await;
    let key = unique_key("expiries");
    // Leases of 300 ms that nobody releases: each waiter in turn gets the
    // key when the one before expires.
    acquire(&db, &key, "300 milliseconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    let mut queued = Vec::new();
    for _ in 0..4 {
        let client = connect().await;
        let pid = backend_pid(&client).await;
        let key = key.clone();
        queued.push(tokio::spawn(async move {
            let granted = acquire(&client, &key, "300 milliseconds", None, "20 seconds")
                .await
                .unwrap();
            assert!(granted.is_some());
            Instant::now()
        }));
        until_listed(&db, pid, true).await;
    }
    let mut grants = Vec::new();
    for task in queued {
        grants.push(task.await.unwrap());
    }
    for pair in grants.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap < Duration::from_millis(600),
            "a 300 ms lease handed on after {gap:?}"
        );
    }
}
