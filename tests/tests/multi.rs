//! Multi-key leases (`fence.lock_acquire_all`, `fence.lock_release_all`):
//! all the keys or none, one token fencing writes under every key, never
//! overlapping a single-key holder, no deadlock between callers that want
//! overlapping sets in any order, no waiter stuck past its wait, queued
//! fairly against single-key traffic (preload mode), G6, and every bad
//! input's SQLSTATE.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_fence_tests::*;

/// `lock_acquire_all`: the token and the keys granted (in the order the
/// server returns them), or None when not granted.
async fn take_all(
    client: &Client,
    keys: &[&str],
    ttl: &str,
    holder: Option<&str>,
    wait: &str,
) -> Result<Option<(i64, Vec<String>)>, Error> {
    let keys: Vec<String> = keys.iter().map(|key| (*key).to_owned()).collect();
    let rows = client
        .query(
            "SELECT lock_key, token FROM fence.lock_acquire_all($1, $2::text::interval, $3, $4::text::interval)",
            &[&keys, &ttl, &holder, &wait],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let tokens: Vec<i64> = rows.iter().map(|row| row.get(1)).collect();
    assert!(
        tokens.iter().all(|token| *token == tokens[0]),
        "one token for all: {tokens:?}"
    );
    Ok(Some((
        tokens[0],
        rows.iter().map(|row| row.get(0)).collect(),
    )))
}

async fn release_all(client: &Client, keys: &[&str], token: i64) -> Result<i32, Error> {
    let keys: Vec<String> = keys.iter().map(|key| (*key).to_owned()).collect();
    Ok(client
        .query_one("SELECT fence.lock_release_all($1, $2)", &[&keys, &token])
        .await?
        .get(0))
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    let base = unique_key(prefix);
    (1..=n).map(|i| format!("{base}:{i}")).collect()
}

fn refs(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn all_keys_or_none_under_one_token() {
    let db = connect().await;
    let other = connect().await;
    let k = keys("all", 3);
    let (token, granted) = take_all(&db, &[&k[2], &k[0], &k[1], &k[0]], "1 minute", None, "0")
        .await
        .unwrap()
        .expect("all three free");
    assert_eq!(granted, k, "distinct keys, in byte order");
    for key in &k {
        assert_eq!(live_token(&db, key).await, Some(token));
    }
    // A second caller wanting one of them plus a free key gets neither.
    let free = unique_key("all-free");
    assert_eq!(
        take_all(&other, &[&free, &k[1]], "1 minute", None, "0")
            .await
            .unwrap(),
        None
    );
    assert_eq!(live_token(&db, &free).await, None, "nothing half-granted");
    let never: Option<i64> = db
        .query_one("SELECT fence.current_token($1)", &[&free])
        .await
        .unwrap()
        .get(0);
    assert_eq!(never, None, "no row was written for the free key");
    // Release of a subset counts only what was live under the token.
    assert_eq!(release_all(&db, &[&k[0], &free], token).await.unwrap(), 1);
    assert_eq!(release_all(&db, &refs(&k), token).await.unwrap(), 2);
    assert_eq!(release_all(&db, &refs(&k), token).await.unwrap(), 0);
    // Now the other caller gets both, under a newer token.
    let (newer, _) = take_all(&other, &[&free, &k[1]], "1 minute", None, "0")
        .await
        .unwrap()
        .expect("both free now");
    assert!(newer > token);
    assert_eq!(
        release_all(&other, &[&free, &k[1]], newer).await.unwrap(),
        2
    );
}

#[tokio::test]
async fn one_token_fences_writes_under_every_key() {
    let db = connect().await;
    let table = unique_table("multi_fenced");
    let base = unique_key("mfence");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (account text PRIMARY KEY, token bigint, balance int);
         INSERT INTO {table} VALUES ('a', 0, 100), ('b', 0, 100);
         SELECT fence.protect('{table}', key_column => 'account', key_prefix => '{base}:', token_column => 'token');"
    ))
    .await
    .unwrap();
    let (a, b) = (format!("{base}:a"), format!("{base}:b"));
    let (token, _) = take_all(&db, &[&a, &b], "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    // A transfer: both rows under the one token, in one transaction.
    db.batch_execute(&format!(
        "BEGIN;
         UPDATE {table} SET balance = balance - 10, token = {token} WHERE account = 'a';
         UPDATE {table} SET balance = balance + 10, token = {token} WHERE account = 'b';
         COMMIT;"
    ))
    .await
    .unwrap();
    // Once one key's lease has ended, writes under it are refused; the
    // other key's lease still fences for the token.
    assert!(release(&db, &a, token).await.unwrap());
    let write = format!("UPDATE {table} SET balance = balance + 1, token = $1 WHERE account = $2");
    let refused = db.execute(&write, &[&token, &"a"]).await.unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("FN001"));
    db.execute(&write, &[&token, &"b"]).await.unwrap();
    let balances: Vec<i32> = db
        .query(
            &format!("SELECT balance FROM {table} ORDER BY account"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(balances, [90, 111]);
}

/// Sessions racing for random sets of keys, some single-key, some
/// multi-key with overlapping sets in every order, each waiting: a key is
/// never held by two at once (tracked in the test), every caller finishes
/// within its wait (no deadlock), and the keys are all used.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_single_and_multi_key_callers_never_overlap_or_deadlock() {
    const SESSIONS: usize = 8;
    let pool = keys("race", 4);
    let holder_of: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let grants = Arc::new(AtomicI64::new(0));
    let multi_grants = Arc::new(AtomicI64::new(0));
    let worst_overrun = Arc::new(AtomicUsize::new(0));
    let stop = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for session in 0..SESSIONS {
        let (pool, holder_of, grants, multi_grants, worst_overrun) = (
            pool.clone(),
            holder_of.clone(),
            grants.clone(),
            multi_grants.clone(),
            worst_overrun.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = connect().await;
            let mut round = session;
            while Instant::now() < stop {
                round += 1;
                // Sessions 0 and 1 take one key; the others two or three
                // keys, listed in an order that differs per round.
                let wanted: Vec<&str> = match session {
                    0 | 1 => vec![pool[round % 4].as_str()],
                    _ => {
                        let n = 2 + round % 2;
                        (0..n)
                            .map(|i| pool[(round * 3 + i * (1 + session % 3)) % 4].as_str())
                            .collect()
                    }
                };
                let mut distinct = wanted.clone();
                distinct.sort();
                distinct.dedup();
                let asked = Instant::now();
                let got = take_all(&client, &wanted, "10 seconds", None, "300 milliseconds")
                    .await
                    .unwrap();
                let Some((token, granted)) = got else {
                    // Not granted: within its wait (plus scheduling slack).
                    let over = asked.elapsed().saturating_sub(Duration::from_millis(300));
                    worst_overrun.fetch_max(over.as_millis() as usize, Ordering::SeqCst);
                    continue;
                };
                assert_eq!(granted.len(), distinct.len());
                {
                    let mut held = holder_of.lock().unwrap();
                    for key in &granted {
                        if let Some(other) = held.insert(key.clone(), session) {
                            panic!("{key} held by session {other} and {session} at once");
                        }
                    }
                }
                grants.fetch_add(1, Ordering::SeqCst);
                if granted.len() > 1 {
                    multi_grants.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
                {
                    let mut held = holder_of.lock().unwrap();
                    for key in &granted {
                        held.remove(key);
                    }
                }
                let refs: Vec<&str> = granted.iter().map(String::as_str).collect();
                assert_eq!(
                    release_all(&client, &refs, token).await.unwrap() as usize,
                    granted.len()
                );
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let (grants, multi_grants) = (
        grants.load(Ordering::SeqCst),
        multi_grants.load(Ordering::SeqCst),
    );
    assert!(grants > 100, "only {grants} grants in 4 s");
    assert!(multi_grants > 30, "only {multi_grants} multi-key grants");
    let overrun = worst_overrun.load(Ordering::SeqCst);
    assert!(
        overrun < 1000,
        "a caller came back {overrun} ms after its wait"
    );
}

/// Two callers wanting the same two keys in opposite orders, each holding
/// one of them as a single-key lease first, cannot deadlock: each waits,
/// times out within its wait, and once one lets go the other gets both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opposite_orders_cannot_deadlock() {
    let (one, two) = (connect().await, connect().await);
    let k = keys("order", 2);
    let a = acquire(&one, &k[0], "1 minute", Some("one"), "0")
        .await
        .unwrap()
        .unwrap();
    let b = acquire(&two, &k[1], "1 minute", Some("two"), "0")
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    let (forward, backward) = ([k[0].as_str(), &k[1]], [k[1].as_str(), &k[0]]);
    let (first, second) = tokio::join!(
        take_all(&one, &forward, "1 minute", None, "400 milliseconds"),
        take_all(&two, &backward, "1 minute", None, "400 milliseconds"),
    );
    assert_eq!(first.unwrap(), None);
    assert_eq!(second.unwrap(), None);
    assert!(started.elapsed() < Duration::from_secs(3));
    // One lets go of its key: the other's wait for both succeeds.
    let waiting = tokio::spawn({
        let k = k.clone();
        async move {
            let two = connect().await;
            take_all(&two, &[&k[1], &k[0]], "1 minute", Some("two"), "10 seconds")
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(release(&one, &k[0], a).await.unwrap());
    assert!(release(&two, &k[1], b).await.unwrap());
    let (token, _) = waiting.await.unwrap().expect("both freed");
    assert!(token > a.max(b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_gets_all_keys_when_the_last_one_expires() {
    let db = connect().await;
    let k = keys("expire", 3);
    let short = acquire(&db, &k[1], "300 milliseconds", None, "0")
        .await
        .unwrap()
        .unwrap();
    let waiter = connect().await;
    let started = Instant::now();
    let (token, granted) = take_all(&waiter, &refs(&k), "1 minute", None, "5 seconds")
        .await
        .unwrap()
        .expect("granted at the expiry");
    let waited = started.elapsed();
    assert!(token > short);
    assert_eq!(granted.len(), 3);
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "waited {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_wakes_a_multi_key_waiter_at_once() {
    let db = connect().await;
    let k = keys("wake", 2);
    let token = acquire(&db, &k[0], "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let waiter = connect().await;
    let pid = backend_pid(&waiter).await;
    let wanted = k.clone();
    let waiting = tokio::spawn(async move {
        let got = take_all(&waiter, &refs(&wanted), "1 minute", None, "20 seconds")
            .await
            .unwrap();
        (got, Instant::now())
    });
    until_waiting(&db, pid).await;
    let released = Instant::now();
    assert!(release(&db, &k[0], token).await.unwrap());
    let (got, at) = waiting.await.unwrap();
    assert!(got.is_some());
    // Within moments of the release. (A busy waiter also rechecks every
    // 50 ms, so this cannot tell the wake-up from the recheck; the queue
    // tests above do.)
    let after = at.duration_since(released);
    assert!(
        after < Duration::from_millis(500),
        "granted {after:?} after the release"
    );
}

/// Preload mode (G7): a multi-key waiter is in the queue of each of its
/// keys, so a newcomer does not barge onto a free key it wants, and a later
/// waiter for any of its keys is served after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_multi_key_waiter_is_queued_on_every_key() {
    let db = connect().await;
    let k = keys("queue", 2);
    let token = acquire(&db, &k[0], "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let waiter = connect().await;
    let pid = backend_pid(&waiter).await;
    let wanted = k.clone();
    let waiting = tokio::spawn(async move {
        take_all(
            &waiter,
            &refs(&wanted),
            "1 minute",
            Some("multi"),
            "20 seconds",
        )
        .await
        .unwrap()
    });
    until_listed(&db, pid, true).await;
    let (key, mode, position): (String, String, i64) = {
        let row = db
            .query_one(
                "SELECT lock_key, mode, position FROM fence.waiters WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(
        (key.as_str(), mode.as_str(), position),
        (k[0].as_str(), "all", 1)
    );
    // k[1] is free, but the multi-key waiter is queued for it: no barging
    // (within its first RESERVE_MS, 1 s, of being held up).
    let newcomer = connect().await;
    assert_eq!(
        acquire(&newcomer, &k[1], "1 minute", None, "0")
            .await
            .unwrap(),
        None,
        "a newcomer took a key a multi-key waiter is queued for"
    );
    // A single-key waiter for k[1], arriving now, queues behind it.
    let later_pid = backend_pid(&newcomer).await;
    let later = tokio::spawn({
        let key = k[1].clone();
        async move {
            acquire(&newcomer, &key, "1 minute", None, "20 seconds")
                .await
                .unwrap()
        }
    });
    until_listed(&db, later_pid, true).await;
    assert!(release(&db, &k[0], token).await.unwrap());
    let (multi, _) = waiting.await.unwrap().expect("the multi-key waiter's turn");
    assert!(multi > token);
    // Its release hands k[1] to the single-key waiter behind it.
    assert_eq!(release_all(&db, &refs(&k), multi).await.unwrap(), 2);
    let single = later.await.unwrap().expect("the single-key waiter's turn");
    assert!(single > multi);
}

/// A multi-key waiter keeps its place on a key that came free while
/// another of its keys stays held: the next waiter for that key waits
/// behind it, until the waiter has been kept out RESERVE_MS (1 s) and
/// gives its free keys up for a moment (the holder of the other key might
/// be waiting for one of them); then the next waiter is woken and takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_place_on_a_freed_key_is_kept_then_yielded_after_reserve_ms() {
    let db = connect().await;
    let other = connect().await;
    let k = keys("yield", 2);
    let first = acquire(&db, &k[0], "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let second = acquire(&other, &k[1], "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let multi = connect().await;
    let multi_pid = backend_pid(&multi).await;
    let wanted = k.clone();
    let multi_started = Instant::now();
    let waiting = tokio::spawn(async move {
        take_all(&multi, &refs(&wanted), "1 minute", None, "20 seconds")
            .await
            .unwrap()
    });
    until_listed(&db, multi_pid, true).await;
    let single = connect().await;
    let single_pid = backend_pid(&single).await;
    let key = k[0].clone();
    let behind = tokio::spawn(async move {
        let got = acquire(&single, &key, "1 minute", None, "20 seconds")
            .await
            .unwrap();
        (got, Instant::now())
    });
    until_listed(&db, single_pid, true).await;
    let released = Instant::now();
    assert!(release(&db, &k[0], first).await.unwrap());
    let (got, granted) = behind.await.unwrap();
    let single_token = got.expect("k[0] for the single-key waiter");
    assert!(
        granted >= multi_started + Duration::from_millis(900),
        "the next waiter took the freed key {:?} after the multi-key waiter came: it barged",
        granted - multi_started
    );
    assert!(
        granted <= released + Duration::from_secs(3),
        "granted {:?} after the release: the place was never yielded",
        granted - released
    );
    // Both released: the multi-key waiter gets them.
    assert!(release(&db, &k[0], single_token).await.unwrap());
    assert!(release(&other, &k[1], second).await.unwrap());
    assert!(waiting.await.unwrap().is_some());
}

/// A busy multi-key attempt inside an open transaction leaves none of the
/// key locks it took: another session gets the free key at once.
#[tokio::test]
async fn a_busy_attempt_in_a_transaction_leaves_no_key_lock_behind() {
    let db = connect().await;
    let other = connect().await;
    let k = keys("nolock", 2);
    // Granted in a transaction still open: its key lock is taken, its
    // lease not yet visible, so the attempt gets as far as the key locks.
    let granting = connect().await;
    granting.batch_execute("BEGIN").await.unwrap();
    let held = acquire(&granting, &k[1], "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    db.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        take_all(&db, &refs(&k), "1 minute", None, "0")
            .await
            .unwrap(),
        None
    );
    // db's transaction stays open; k[0] must be free of its lock.
    let free = acquire(&other, &k[0], "1 minute", None, "0")
        .await
        .unwrap()
        .expect("k[0] free: the busy attempt kept its key lock");
    db.batch_execute("ROLLBACK").await.unwrap();
    granting.batch_execute("COMMIT").await.unwrap();
    assert!(release(&other, &k[0], free).await.unwrap());
    assert!(release(&granting, &k[1], held).await.unwrap());
}

#[tokio::test]
async fn the_same_holder_retrying_gets_its_leases_back() {
    let db = connect().await;
    let k = keys("g6", 2);
    let (token, _) = take_all(&db, &refs(&k), "10 seconds", Some("w"), "0")
        .await
        .unwrap()
        .unwrap();
    let (again, _) = take_all(&db, &[&k[1], &k[0]], "1 minute", Some("w"), "0")
        .await
        .unwrap()
        .expect("G6: the same request again");
    assert_eq!(again, token);
    let extended: bool = db
        .query_one(
            "SELECT bool_and(expires_at > now() + interval '30 seconds') FROM fence.locks WHERE lock_key = ANY($1)",
            &[&k],
        )
        .await
        .unwrap()
        .get(0);
    assert!(extended, "both leases extended to the new ttl");
    // The same holder holding only some of the keys is busy: one grant is
    // one token.
    let extra = unique_key("g6-extra");
    assert_eq!(
        take_all(&db, &[&k[0], &extra], "1 minute", Some("w"), "0")
            .await
            .unwrap(),
        None
    );
    assert_eq!(release_all(&db, &refs(&k), token).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_write_in_flight_holds_off_a_multi_key_grant() {
    // In flight under the first key, then under the second.
    for written in ["a", "b"] {
        let db = connect().await;
        let table = unique_table("multi_inflight");
        let base = unique_key("minflight");
        db.batch_execute(&format!(
            "CREATE TABLE {table} (k text PRIMARY KEY, token bigint);
             INSERT INTO {table} VALUES ('a', 0), ('b', 0);
             SELECT fence.protect('{table}', key_column => 'k', key_prefix => '{base}:', token_column => 'token');"
        ))
        .await
        .unwrap();
        let (a, b) = (format!("{base}:a"), format!("{base}:b"));
        let key = format!("{base}:{written}");
        let old = acquire(&db, &key, "300 milliseconds", None, "0")
            .await
            .unwrap()
            .unwrap();
        let writer = connect().await;
        writer
            .batch_execute(&format!(
                "BEGIN; UPDATE {table} SET token = {old} WHERE k = '{written}';"
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await; // the lease has expired
        let other = connect().await;
        assert_eq!(
            take_all(&other, &[&a, &b], "1 minute", None, "200 milliseconds")
                .await
                .unwrap(),
            None,
            "granted while a write under the old token of {written} was in flight (G3)"
        );
        writer.batch_execute("COMMIT").await.unwrap();
        let (token, _) = take_all(&other, &[&a, &b], "1 minute", None, "2 seconds")
            .await
            .unwrap()
            .expect("granted once the write committed");
        assert!(token > old);
    }
}

/// A multi-key grant rolled back frees every key, and a waiter gets one at
/// once. (The waiter finds the key's lock taken and rechecks every 2 ms,
/// so this does not tell the rollback's wake-up from that recheck.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolled_back_grant_leaves_every_key_free() {
    let db = connect().await;
    let k = keys("rollback", 2);
    db.batch_execute("BEGIN").await.unwrap();
    let (token, _) = take_all(&db, &refs(&k), "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let waiter = tokio::spawn({
        let key = k[1].clone();
        async move {
            let client = connect().await;
            let asked = Instant::now();
            let got = acquire(&client, &key, "1 minute", None, "10 seconds")
                .await
                .unwrap();
            (got, asked.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.batch_execute("ROLLBACK").await.unwrap();
    let (got, waited) = waiter.await.unwrap();
    assert!(got.is_some_and(|newer| newer > token));
    assert!(waited < Duration::from_secs(2), "waited {waited:?}");
    assert_eq!(
        live_token(&db, &k[0]).await,
        None,
        "the rollback took every key"
    );
}

#[tokio::test]
async fn release_all_by_another_role_releases_nothing() {
    let db = connect().await;
    ensure_test_roles(&db).await;
    let owner = connect_as("fence_test_alice").await;
    let intruder = connect_as("fence_test_bob").await;
    let k = keys("roles", 2);
    let (token, _) = take_all(&owner, &refs(&k), "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let error = release_all(&intruder, &refs(&k), token).await.unwrap_err();
    assert_eq!(sqlstate(&error).as_deref(), Some("42501"));
    for key in &k {
        assert_eq!(live_token(&db, key).await, Some(token), "{key} still held");
    }
    assert_eq!(release_all(&owner, &refs(&k), token).await.unwrap(), 2);
}

#[tokio::test]
async fn bad_inputs_get_their_sqlstates() {
    let db = connect().await;
    let long = "x".repeat(1025);
    let many = "(SELECT array_agg('k' || g) FROM generate_series(1, 65) AS g)";
    for (sql, state) in [
        ("SELECT * FROM fence.lock_acquire_all(NULL)", "22004"),
        (
            "SELECT * FROM fence.lock_acquire_all(ARRAY['a', NULL])",
            "22004",
        ),
        (
            "SELECT * FROM fence.lock_acquire_all(ARRAY[]::text[])",
            "22023",
        ),
        (
            "SELECT * FROM fence.lock_acquire_all(ARRAY['a', ''])",
            "22023",
        ),
        (
            &format!("SELECT * FROM fence.lock_acquire_all(ARRAY['a', '{long}'])") as &str,
            "22023",
        ),
        (
            &format!("SELECT * FROM fence.lock_acquire_all({many})"),
            "22023",
        ),
        (
            "SELECT * FROM fence.lock_acquire_all(ARRAY['a'], '0 seconds')",
            "22023",
        ),
        (
            "SELECT * FROM fence.lock_acquire_all(ARRAY['a'], NULL)",
            "22004",
        ),
        (
            "SELECT * FROM fence.lock_acquire_all(ARRAY['a'], '1 minute', '')",
            "22023",
        ),
        (
            "SELECT * FROM fence.lock_acquire_all(ARRAY['a'], '1 minute', NULL, '-1 second')",
            "22023",
        ),
        ("SELECT fence.lock_release_all(NULL, 1)", "22004"),
        ("SELECT fence.lock_release_all(ARRAY['a'], NULL)", "22004"),
        (
            "SELECT fence.lock_release_all(ARRAY[NULL]::text[], 1)",
            "22004",
        ),
        ("SELECT fence.lock_release_all(ARRAY[]::text[], 1)", "22023"),
    ] {
        let (got, message) = expect_error(&db, sql).await;
        assert_eq!(got, state, "{sql}: {message}");
    }
    let (_, message) = expect_error(
        &db,
        &format!("SELECT * FROM fence.lock_acquire_all({many})"),
    )
    .await;
    assert!(message.contains("64"), "{message}");
    let (_, message) = expect_error(
        &db,
        "SELECT * FROM fence.lock_acquire_all(ARRAY['a', NULL])",
    )
    .await;
    assert!(message.contains("element 2"), "{message}");
    // 64 elements are accepted, a key listed twice counting once; 65 are
    // refused by their number, duplicates or not.
    let base = unique_key("limit");
    let granted = count(
        &db,
        &format!(
            "SELECT count(*) FROM fence.lock_acquire_all((SELECT array_agg('{base}:' || (g % 60)) FROM generate_series(1, 64) AS g))"
        ),
    )
    .await;
    assert_eq!(granted, 60);
    let (state, message) = expect_error(
        &db,
        "SELECT * FROM fence.lock_acquire_all(array_fill('same'::text, ARRAY[65]))",
    )
    .await;
    assert_eq!(state, "22023");
    assert!(message.contains("65 elements"), "{message}");
    // By its length, before any element is read: a NULL among 65 elements
    // is not what is reported.
    let (state, message) = expect_error(
        &db,
        "SELECT * FROM fence.lock_acquire_all(array_append(array_fill('k'::text, ARRAY[64]), NULL))",
    )
    .await;
    assert_eq!(
        (state.as_str(), message.contains("65 elements")),
        ("22023", true),
        "{message}"
    );
}

/// G8: a multi-key acquire counts as an acquire of each key, in each key's
/// class; its release as a release of each.
#[tokio::test]
async fn statistics_count_each_key() {
    let db = connect().await;
    let class = format!("mstats{}", std::process::id());
    let (a, b, c) = (
        format!("{class}:a"),
        format!("{class}:b"),
        format!("{class}x:c"),
    );
    let (token, _) = take_all(&db, &[&a, &b, &c], "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        take_all(&db, &[&a, &c], "1 minute", None, "0")
            .await
            .unwrap(),
        None
    );
    assert_eq!(release_all(&db, &[&a, &b, &c], token).await.unwrap(), 3);
    let counted = |class: String| {
        let db = &db;
        async move {
            let row = db
                .query_one(
                    "SELECT acquires, grants, busy, releases FROM fence.lock_stats WHERE key_class = $1",
                    &[&class],
                )
                .await
                .unwrap();
            (
                row.get::<_, i64>(0),
                row.get::<_, i64>(1),
                row.get::<_, i64>(2),
                row.get::<_, i64>(3),
            )
        }
    };
    // a and b: 2 grants and a + 1 busy (a) of 3 acquires, 2 releases.
    assert_eq!(counted(class.clone()).await, (3, 2, 1, 2));
    // c: one grant, one busy, one release.
    assert_eq!(counted(format!("{class}x")).await, (2, 1, 1, 1));
}

/// A multi-key waiter ended by `statement_timeout` or a cancel (57014)
/// leaves the queues: the next release of a key it had a place for wakes
/// the waiter behind it at once. (A place left behind would take that
/// wake-up, and the waiter behind would sleep until its recheck, up to a
/// second.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ended_multi_key_waiter_leaves_every_queue() {
    let db = connect().await;
    for end_by_timeout in [true, false] {
        let k = keys("mended", 2);
        let token = acquire(&db, &k[0], "1 minute", None, "0")
            .await
            .unwrap()
            .unwrap();
        let multi = connect().await;
        let multi_pid = backend_pid(&multi).await;
        if end_by_timeout {
            multi
                .batch_execute("SET statement_timeout = '1500ms'")
                .await
                .unwrap();
        }
        let wanted = k.clone();
        let ended = tokio::spawn(async move {
            let error = take_all(&multi, &refs(&wanted), "1 minute", None, "30 seconds")
                .await
                .unwrap_err();
            // The session stays open (and its backend alive) meanwhile.
            (sqlstate(&error), multi)
        });
        until_listed(&db, multi_pid, true).await;
        let single = connect().await;
        let single_pid = backend_pid(&single).await;
        let key = k[0].clone();
        let behind = tokio::spawn(async move {
            let got = acquire(&single, &key, "1 minute", None, "30 seconds")
                .await
                .unwrap();
            (got, Instant::now())
        });
        until_listed(&db, single_pid, true).await;
        if !end_by_timeout {
            db.execute("SELECT pg_cancel_backend($1)", &[&multi_pid])
                .await
                .unwrap();
        }
        let (state, _still_open) = ended.await.unwrap();
        assert_eq!(state.as_deref(), Some("57014"));
        until_listed(&db, multi_pid, false).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let released = Instant::now();
        assert!(release(&db, &k[0], token).await.unwrap());
        let (got, granted) = behind.await.unwrap();
        let single_token = got.expect("the single-key waiter's turn");
        let after = granted.saturating_duration_since(released);
        assert!(
            after < Duration::from_millis(300),
            "granted {after:?} after the release (ended by timeout: {end_by_timeout})"
        );
        assert!(release(&db, &k[0], single_token).await.unwrap());
    }
}

/// A caller holding one of a multi-key waiter's keys (a lease, or the
/// key's lock in an open transaction) that then asks for another of them,
/// free, gets it within about RESERVE_MS (1 s), when the waiter gives its
/// free keys up for a moment: not at the end of its wait, as each would
/// wait for the other until then (nothing can see that cycle: a lease is
/// not tied to a session).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_of_one_key_is_not_held_up_by_a_multi_key_waiter_for_both() {
    for in_a_transaction in [false, true] {
        let k = keys("mcycle", 2);
        let holder = connect().await;
        if in_a_transaction {
            holder.batch_execute("BEGIN").await.unwrap();
        }
        let b = acquire(&holder, &k[1], "1 minute", None, "0")
            .await
            .unwrap()
            .unwrap();
        let multi = connect().await;
        let multi_pid = backend_pid(&multi).await;
        let wanted = k.clone();
        let waiting = tokio::spawn(async move {
            take_all(&multi, &refs(&wanted), "1 minute", None, "20 seconds")
                .await
                .unwrap()
        });
        until_listed(&connect().await, multi_pid, true).await;
        let asked = Instant::now();
        let a = acquire(&holder, &k[0], "1 minute", None, "10 seconds")
            .await
            .unwrap()
            .expect("the free key");
        let took = asked.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "the holder of {} waited {took:?} for the free {} (in a transaction: {in_a_transaction})",
            k[1],
            k[0]
        );
        if in_a_transaction {
            holder.batch_execute("COMMIT").await.unwrap();
        }
        assert!(release(&holder, &k[0], a).await.unwrap());
        assert!(release(&holder, &k[1], b).await.unwrap());
        assert!(waiting.await.unwrap().is_some(), "then the waiter got both");
    }
}
