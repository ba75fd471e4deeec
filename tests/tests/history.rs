//! `fence.lock_keep_history(lock_key, keep)` and `fence.lock_history(lock_key,
//! after_token, wait)`: once a key's history is kept, every exclusive grant
//! (single-key, multi-key) writes its term, chained to the term before it,
//! and nothing else does (a re-acquire, a renew, a rolled-back grant);
//! terms older than the keep go at the next grant, the newest stays; a
//! reader waits inside the server and is woken by a grant; racing grants
//! and a registration racing them leave a complete chain from the token the
//! registration returned; bad inputs get their SQLSTATEs.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pg_fence_tests::*;

/// The kept terms after `after`: (token, previous_token, holder).
async fn terms(client: &Client, key: &str, after: Option<i64>) -> Vec<(i64, Option<i64>, String)> {
    client
        .query(
            "SELECT token, previous_token, holder FROM fence.lock_history($1, $2)",
            &[&key, &after],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

async fn keep(client: &Client, key: &str, keep: &str) -> Option<i64> {
    client
        .query_one(
            "SELECT fence.lock_keep_history($1, $2::text::interval)",
            &[&key, &keep],
        )
        .await
        .unwrap()
        .get(0)
}

/// Each term names the one before it, starting from `from`.
fn assert_chained(terms: &[(i64, Option<i64>, String)], from: Option<i64>) {
    let mut previous = from;
    for (at, term) in terms.iter().enumerate() {
        assert_eq!(
            term.1,
            previous,
            "a gap in the chain at term {at} of {} (from {from:?}): {:?}",
            terms.len(),
            &terms[at.saturating_sub(2)..(at + 2).min(terms.len())]
        );
        previous = Some(term.0);
    }
}

#[tokio::test]
async fn every_grant_of_a_kept_key_is_a_term_chained_to_the_one_before() {
    let db = connect().await;
    let key = unique_key("history");
    let other = unique_key("history-other");
    // A term before the history is kept: not in it, but the first kept term
    // names it.
    let before = acquire(&db, &key, "1 minute", Some("a"), "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(&db, &key, before).await.unwrap());
    assert_eq!(keep(&db, &key, "1 hour").await, Some(before));
    assert!(terms(&db, &key, None).await.is_empty());

    let first = acquire(&db, &key, "1 minute", Some("b"), "0")
        .await
        .unwrap()
        .unwrap();
    // A re-acquire by the holder and a renewal are the same term.
    assert_eq!(
        acquire(&db, &key, "1 minute", Some("b"), "0")
            .await
            .unwrap(),
        Some(first)
    );
    assert!(renew(&db, &key, first).await.unwrap());
    // Forced out; then a multi-key grant takes it with another key.
    let forced: bool = db
        .query_one("SELECT fence.lock_force_release($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(forced);
    let multi: i64 = db
        .query_one(
            "SELECT min(token) FROM fence.lock_acquire_all(ARRAY[$1, $2], '1 minute', 'c')",
            &[&key, &other],
        )
        .await
        .unwrap()
        .get(0);
    db.execute(
        "SELECT fence.lock_release_all(ARRAY[$1, $2], $3)",
        &[&key, &other, &multi],
    )
    .await
    .unwrap();
    // A grant that rolls back leaves no term.
    db.batch_execute(&format!(
        "BEGIN; SELECT fence.lock_acquire('{key}', '1 minute', 'rolled-back'); ROLLBACK;"
    ))
    .await
    .unwrap();
    // One that ends by expiry is a term like any other.
    let short = acquire(&db, &key, "50 milliseconds", Some("d"), "0")
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last = acquire(&db, &key, "1 minute", Some("e"), "0")
        .await
        .unwrap()
        .unwrap();

    let kept = terms(&db, &key, None).await;
    assert_eq!(
        kept,
        vec![
            (first, Some(before), "b".to_owned()),
            (multi, Some(first), "c".to_owned()),
            (short, Some(multi), "d".to_owned()),
            (last, Some(short), "e".to_owned()),
        ]
    );
    assert_eq!(terms(&db, &key, Some(multi)).await, kept[2..].to_vec());
    assert!(terms(&db, &key, Some(last)).await.is_empty());
    // The other key's history is not kept.
    let (code, _) =
        expect_error(&db, &format!("SELECT * FROM fence.lock_history('{other}')")).await;
    assert_eq!(code, "55000");
    // Stopping drops the terms; the key is not kept any more.
    assert_eq!(keep(&db, &key, "0").await, Some(last));
    let (code, message) =
        expect_error(&db, &format!("SELECT * FROM fence.lock_history('{key}')")).await;
    assert_eq!(code, "55000", "{message}");
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM fence.terms WHERE lock_key = '{key}'")
        )
        .await,
        0
    );
}

#[tokio::test]
async fn a_first_grant_names_no_previous_term_and_old_terms_go_at_the_next_grant() {
    let db = connect().await;
    let key = unique_key("history-keep");
    assert_eq!(keep(&db, &key, "300 milliseconds").await, None);
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let token = acquire(&db, &key, "1 minute", Some("h"), "0")
            .await
            .unwrap()
            .unwrap();
        assert!(release(&db, &key, token).await.unwrap());
        tokens.push(token);
    }
    let kept = terms(&db, &key, None).await;
    assert_eq!(kept.iter().map(|t| t.0).collect::<Vec<_>>(), tokens);
    assert_chained(&kept, None);
    // Past the keep, nothing goes until a grant; then only the new term
    // stays, still naming the one before it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(terms(&db, &key, None).await.len(), 3);
    let newest = acquire(&db, &key, "1 minute", Some("h"), "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        terms(&db, &key, None).await,
        vec![(newest, Some(tokens[2]), "h".to_owned())]
    );
    // A later keep replaces the earlier one.
    keep(&db, &key, "1 hour").await;
    let keep_now: String = db
        .query_one(
            "SELECT keep::text FROM fence.history_keys WHERE lock_key = $1",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keep_now, "01:00:00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_reader_is_woken_by_a_grant_and_gets_nothing_when_the_wait_runs_out() {
    let db = connect().await;
    let key = unique_key("history-wait");
    let latest = keep(&db, &key, "1 hour").await;
    assert_eq!(latest, None);
    // Nothing within the wait: no terms, after the whole wait.
    let started = Instant::now();
    assert!(db
        .query(
            "SELECT * FROM fence.lock_history($1, NULL, '300 milliseconds')",
            &[&key]
        )
        .await
        .unwrap()
        .is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300));

    let reader = connect().await;
    let pid = backend_pid(&reader).await;
    let waiting = {
        let key = key.clone();
        tokio::spawn(async move {
            let rows = reader
                .query(
                    "SELECT token FROM fence.lock_history($1, NULL, '20 seconds')",
                    &[&key],
                )
                .await
                .unwrap();
            (
                rows.iter()
                    .map(|row| row.get::<_, i64>(0))
                    .collect::<Vec<_>>(),
                Instant::now(),
            )
        })
    };
    until_waiting(&db, pid).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let granted = Instant::now();
    let token = acquire(&db, &key, "1 minute", Some("w"), "0")
        .await
        .unwrap()
        .unwrap();
    let (tokens, returned) = waiting.await.unwrap();
    assert_eq!(tokens, vec![token]);
    // The safety-net recheck is a second: a quicker return is the wake-up.
    let after = returned.saturating_duration_since(granted);
    assert!(
        after < Duration::from_millis(500),
        "woken {after:?} after the grant"
    );
    // A term that already ended is still there to read.
    assert!(release(&db, &key, token).await.unwrap());
    let started = Instant::now();
    assert_eq!(terms(&db, &key, None).await.len(), 1);
    let rows = db
        .query(
            "SELECT token FROM fence.lock_history($1, NULL, '20 seconds')",
            &[&key],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered at once"
    );
}

/// Four sessions take the key in turns as fast as they can while a fifth
/// registers the history in the middle of it: from the token the
/// registration returned on, every grant is a term, chained, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_grants_and_a_racing_registration_leave_a_complete_chain() {
    let key = unique_key("history-race");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut racers = Vec::new();
    for racer in 0..4 {
        let (key, stop) = (key.clone(), stop.clone());
        racers.push(tokio::spawn(async move {
            let client = connect().await;
            let holder = format!("racer-{racer}");
            let mut granted = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(token) =
                    acquire(&client, &key, "1 minute", Some(&holder), "100 milliseconds")
                        .await
                        .unwrap()
                {
                    granted.push(token);
                    assert!(release(&client, &key, token).await.unwrap());
                }
            }
            granted
        }));
    }
    let db = connect().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from = keep(&db, &key, "1 hour").await.expect("granted before");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut granted = BTreeSet::new();
    for racer in racers {
        granted.extend(racer.await.unwrap());
    }
    let kept = terms(&db, &key, Some(from)).await;
    assert!(
        kept.len() > 20,
        "the race granted too little: {}",
        kept.len()
    );
    assert_chained(&kept, Some(from));
    let after: Vec<i64> = granted.range(from + 1..).copied().collect();
    assert_eq!(kept.iter().map(|t| t.0).collect::<Vec<_>>(), after);
    // The registration's token was one of the grants (or the key's last).
    assert!(granted.contains(&from));
}

#[tokio::test]
async fn bad_inputs_get_their_sqlstates() {
    let db = connect().await;
    let key = unique_key("history-bad");
    keep(&db, &key, "1 hour").await;
    for (sql, code) in [
        ("SELECT fence.lock_keep_history(NULL)".to_owned(), "22004"),
        ("SELECT fence.lock_keep_history('')".to_owned(), "22023"),
        (
            format!("SELECT fence.lock_keep_history('{key}', '-1 second')"),
            "22023",
        ),
        ("SELECT * FROM fence.lock_history(NULL)".to_owned(), "22004"),
        (
            format!("SELECT * FROM fence.lock_history('{key}', NULL, NULL)"),
            "22004",
        ),
        (
            format!("SELECT * FROM fence.lock_history('{key}', NULL, '-1 second')"),
            "22023",
        ),
        (
            format!("SELECT * FROM fence.lock_history('{}')", "k".repeat(1025)),
            "22023",
        ),
    ] {
        let (got, message) = expect_error(&db, &sql).await;
        assert_eq!(got, code, "{sql}: {message}");
    }
    // Waiting needs a fresh snapshot; answering without waiting does not.
    db.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let (got, _) = expect_error(
        &db,
        &format!("SELECT * FROM fence.lock_history('{key}', NULL, '1 second')"),
    )
    .await;
    assert_eq!(got, "25000");
    db.batch_execute("ROLLBACK; BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    assert!(terms(&db, &key, None).await.is_empty());
    db.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn only_the_registering_role_or_fence_admin_stops_a_history_and_keep_only_grows() {
    let db = connect().await;
    ensure_test_roles(&db).await;
    let key = unique_key("history-owner");
    let alice = connect_as("fence_test_alice").await;
    let bob = connect_as("fence_test_bob").await;
    let admin = connect_as("fence_test_admin").await;
    let keep_of = |key: String| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT keep::text FROM fence.history_keys WHERE lock_key = $1",
                &[&key],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
        }
    };
    keep(&alice, &key, "1 hour").await;
    // A shorter keep leaves it; a longer one lengthens it.
    keep(&bob, &key, "1 minute").await;
    assert_eq!(keep_of(key.clone()).await, "01:00:00");
    keep(&bob, &key, "2 hours").await;
    assert_eq!(keep_of(key.clone()).await, "02:00:00");
    // Bob did not start it: he may not stop it; fence_admin may.
    let (code, message) = expect_error(
        &bob,
        &format!("SELECT fence.lock_keep_history('{key}', NULL)"),
    )
    .await;
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("fence_test_alice"), "{message}");
    keep(&admin, &key, "0").await;
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM fence.history_keys WHERE lock_key = '{key}'")
        )
        .await,
        0
    );
    // Alice may stop her own.
    keep(&alice, &key, "1 hour").await;
    keep(&alice, &key, "0").await;
}

/// The history stopped and kept again between two terms: the grant in
/// between kept no term. A reader after the term before it is not woken
/// by that grant (an empty answer would make it look again at once, for
/// ever); the next kept term ends its wait and names the unkept one, so
/// the gap shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_that_kept_no_term_does_not_end_a_wait_and_shows_as_a_gap() {
    let db = connect().await;
    let key = unique_key("history-gap");
    keep(&db, &key, "1 hour").await;
    let t1 = acquire(&db, &key, "1 minute", Some("a"), "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(&db, &key, t1).await.unwrap());
    keep(&db, &key, "0").await;
    let t2 = acquire(&db, &key, "1 minute", Some("b"), "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(&db, &key, t2).await.unwrap());
    assert_eq!(keep(&db, &key, "1 hour").await, Some(t2));
    let started = Instant::now();
    let rows = db
        .query(
            "SELECT token FROM fence.lock_history($1, $2, '300 milliseconds')",
            &[&key, &t1],
        )
        .await
        .unwrap();
    assert!(rows.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "answered after {:?}: the unkept grant ended the wait",
        started.elapsed()
    );
    let t3 = acquire(&db, &key, "1 minute", Some("c"), "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        terms(&db, &key, Some(t1)).await,
        vec![(t3, Some(t2), "c".to_owned())],
        "the next kept term names the unkept one"
    );
    // A key whose history is not kept is refused at once, not after the wait.
    let started = Instant::now();
    let (code, _) = expect_error(
        &db,
        &format!(
            "SELECT * FROM fence.lock_history('{}', NULL, '5 seconds')",
            unique_key("unkept")
        ),
    )
    .await;
    assert_eq!(code, "55000");
    assert!(started.elapsed() < Duration::from_secs(2));
}
