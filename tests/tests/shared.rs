//! Shared (reader) leases, `fence.lock_acquire_shared`: readers share a
//! key, a writer never overlaps a reader (G2), a queued writer holds off new
//! readers and is granted under a continuous stream of them (preload, G7),
//! each grant has its own token, fenced writes need the exclusive lease,
//! and renew, release and force work on shared leases by token (G4).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_fence_tests::*;

/// `lock_acquire_shared`: the token, or None when not granted.
async fn share(
    client: &Client,
    key: &str,
    ttl: &str,
    holder: Option<&str>,
    wait: &str,
) -> Result<Option<i64>, Error> {
    let row = client
        .query_one(
            "SELECT (fence.lock_acquire_shared($1, $2::text::interval, $3, $4::text::interval)).token",
            &[&key, &ttl, &holder, &wait],
        )
        .await?;
    Ok(row.get(0))
}

/// The key's live leases in `fence.locks`: (mode, holder), by token.
async fn listed(db: &Client, key: &str) -> Vec<(String, String)> {
    db.query(
        "SELECT mode, holder FROM fence.locks WHERE lock_key = $1 ORDER BY token",
        &[&key],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

/// A session waiting (in a task) for `key`, shared or exclusive, listed
/// as waiting before this returns; the task yields its token and when it
/// returned.
async fn waiting_for(
    observer: &Client,
    key: &str,
    shared: bool,
    wait: &str,
) -> tokio::task::JoinHandle<(Option<i64>, Instant)> {
    let client = connect().await;
    let pid = backend_pid(&client).await;
    let (key, wait) = (key.to_owned(), wait.to_owned());
    let task = tokio::spawn(async move {
        let token = if shared {
            share(&client, &key, "1 minute", None, &wait).await
        } else {
            acquire(&client, &key, "1 minute", None, &wait).await
        };
        (token.unwrap(), Instant::now())
    });
    until_waiting(observer, pid).await;
    task
}

#[tokio::test]
async fn readers_share_a_key_each_with_its_own_token() {
    let db = connect().await;
    let key = unique_key("shared-basic");
    let first = share(&db, &key, "1 minute", Some("reader-1"), "0")
        .await
        .unwrap()
        .unwrap();
    let second = share(&db, &key, "1 minute", Some("reader-2"), "0")
        .await
        .unwrap()
        .unwrap();
    assert!(second > first, "tokens come from the one global order");
    assert_eq!(
        listed(&db, &key).await,
        [
            ("shared".to_owned(), "reader-1".to_owned()),
            ("shared".to_owned(), "reader-2".to_owned())
        ]
    );
    // No exclusive lease while readers are in, and a reader's lease is
    // not what lock_status or current_token report (they follow the
    // exclusive lease, which fencing checks).
    assert_eq!(
        acquire(&db, &key, "1 minute", None, "0").await.unwrap(),
        None
    );
    assert_eq!(live_token(&db, &key).await, None);
    let current: Option<i64> = db
        .query_one("SELECT fence.current_token($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, None);
    // Readers release by token, as any lease; once both are gone the key
    // is free for a writer, whose token is newer than both.
    assert!(release(&db, &key, first).await.unwrap());
    assert!(!release(&db, &key, first).await.unwrap());
    assert_eq!(
        acquire(&db, &key, "1 minute", None, "0").await.unwrap(),
        None
    );
    assert!(release(&db, &key, second).await.unwrap());
    let writer = acquire(&db, &key, "1 minute", Some("writer"), "0")
        .await
        .unwrap()
        .unwrap();
    assert!(writer > second);
    assert_eq!(
        listed(&db, &key).await,
        [("exclusive".to_owned(), "writer".to_owned())]
    );
    // And while the writer holds it, no reader gets in.
    assert_eq!(share(&db, &key, "1 minute", None, "0").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_waits_for_the_last_reader_and_is_woken_by_its_release() {
    let db = connect().await;
    let key = unique_key("shared-last");
    let a = share(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let b = share(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let writer = waiting_for(&db, &key, false, "20 seconds").await;
    assert!(release(&db, &key, a).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!writer.is_finished(), "one reader is still in");
    let released = Instant::now();
    assert!(release(&db, &key, b).await.unwrap());
    let (token, at) = writer.await.unwrap();
    assert!(token.unwrap() > b);
    let after = at.saturating_duration_since(released);
    // Its looks are at most 50 ms apart; the release's wake-up is faster.
    assert!(
        after < Duration::from_millis(500),
        "granted {after:?} after the release"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writers_release_lets_every_waiting_reader_in_together() {
    let db = connect().await;
    let key = unique_key("shared-herd");
    let writer = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(waiting_for(&db, &key, true, "20 seconds").await);
    }
    let released = Instant::now();
    assert!(release(&db, &key, writer).await.unwrap());
    for reader in readers {
        let (token, at) = reader.await.unwrap();
        assert!(token.unwrap() > writer);
        let after = at.saturating_duration_since(released);
        assert!(
            after < Duration::from_millis(500),
            "granted {after:?} after the release"
        );
    }
    let modes: Vec<String> = listed(&db, &key)
        .await
        .into_iter()
        .map(|(mode, _)| mode)
        .collect();
    assert_eq!(modes, ["shared", "shared", "shared"], "all three at once");
}

/// Writer preference (preload mode): while a writer is queued, a new
/// reader is turned away (or queued behind it), even though the key is
/// held in shared mode only; the writer goes in when the readers before it
/// have left, and the reader behind it after the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_writer_holds_off_new_readers() {
    let db = connect().await;
    let key = unique_key("shared-prefer");
    let first = share(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let writer_session = connect().await;
    let writer_pid = backend_pid(&writer_session).await;
    let writer_key = key.clone();
    let writer = tokio::spawn(async move {
        acquire(&writer_session, &writer_key, "1 minute", None, "20 seconds")
            .await
            .unwrap()
    });
    until_listed(&db, writer_pid, true).await;
    assert_eq!(
        share(&db, &key, "1 minute", None, "0").await.unwrap(),
        None,
        "a reader may not pass a queued writer"
    );
    let reader_session = connect().await;
    let reader_pid = backend_pid(&reader_session).await;
    let reader_key = key.clone();
    let reader = tokio::spawn(async move {
        share(&reader_session, &reader_key, "1 minute", None, "20 seconds")
            .await
            .unwrap()
    });
    until_listed(&db, reader_pid, true).await;
    let queue: Vec<(i32, String, i64)> = db
        .query(
            "SELECT pid, mode, position FROM fence.waiters WHERE lock_key = $1 ORDER BY position",
            &[&key],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        queue,
        [
            (writer_pid, "exclusive".to_owned(), 1),
            (reader_pid, "shared".to_owned(), 2)
        ]
    );
    assert!(release(&db, &key, first).await.unwrap());
    let written = writer.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!reader.is_finished(), "the reader waits for the writer");
    assert!(release(&db, &key, written).await.unwrap());
    assert!(reader.await.unwrap().unwrap() > written);
}

/// Readers keep the key held in shared mode without a gap (four of them,
/// each re-acquiring as soon as it has released, holding 100 ms at a
/// time): a writer that asks must still be granted within its wait, and
/// no reader holds the key while it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_is_granted_under_a_continuous_stream_of_readers() {
    const READERS: usize = 4;
    let key = unique_key("shared-stream");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer_in = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let overlapped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut readers = Vec::new();
    for i in 0..READERS {
        let (key, stop, writer_in, overlapped) = (
            key.clone(),
            stop.clone(),
            writer_in.clone(),
            overlapped.clone(),
        );
        readers.push(tokio::spawn(async move {
            let client = connect().await;
            tokio::time::sleep(Duration::from_millis(25 * i as u64)).await;
            let mut grants = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let Some(token) = share(&client, &key, "10 seconds", None, "10 seconds")
                    .await
                    .unwrap()
                else {
                    continue;
                };
                assert!(
                    !writer_in.load(std::sync::atomic::Ordering::SeqCst),
                    "a reader was granted while the writer held the key"
                );
                grants += 1;
                let others = count(
                    &client,
                    &format!("SELECT count(*) FROM fence.locks WHERE lock_key = '{key}'"),
                )
                .await;
                if others > 1 {
                    overlapped.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(release(&client, &key, token).await.unwrap());
            }
            grants
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let writer = connect().await;
    let asked = Instant::now();
    let token = acquire(&writer, &key, "10 seconds", Some("writer"), "5 seconds")
        .await
        .unwrap();
    let waited = asked.elapsed();
    writer_in.store(true, std::sync::atomic::Ordering::SeqCst);
    let token = token.unwrap_or_else(|| panic!("the writer starved for {waited:?}"));
    let modes: Vec<String> = listed(&writer, &key)
        .await
        .into_iter()
        .map(|(mode, _)| mode)
        .collect();
    assert_eq!(modes, ["exclusive"], "no reader alongside the writer");
    tokio::time::sleep(Duration::from_millis(200)).await;
    writer_in.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(release(&writer, &key, token).await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut grants = 0;
    for reader in readers {
        grants += reader.await.unwrap();
    }
    // The readers did overlap (the stream had no gap to slip into), and
    // they went on after the writer.
    assert!(overlapped.load(std::sync::atomic::Ordering::SeqCst) > 10);
    assert!(grants > 20, "{grants} reader grants");
    eprintln!("writer granted after {waited:?} under {grants} reader grants");
}

/// Sessions racing for one key, each at random shared or exclusive, each
/// recording when its lease began and ended by the server's clock: no
/// exclusive lease overlaps any other lease, and readers did overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_readers_and_writers_never_overlap() {
    const SESSIONS: usize = 6;
    let key = unique_key("shared-race");
    let held: Arc<Mutex<Vec<(bool, f64, f64)>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut sessions = Vec::new();
    for i in 0..SESSIONS {
        let (key, held) = (key.clone(), held.clone());
        sessions.push(tokio::spawn(async move {
            let client = connect().await;
            let mut n = i;
            while Instant::now() < deadline {
                n = n.wrapping_mul(2654435761).wrapping_add(12345) % 1000;
                let exclusive = n % 3 == 0;
                let function = if exclusive {
                    "fence.lock_acquire"
                } else {
                    "fence.lock_acquire_shared"
                };
                let row = client
                    .query_one(
                        &format!(
                            "SELECT l.token, extract(epoch FROM l.acquired_at)::float8 \
                               FROM {function}($1, '10 seconds', NULL, '3 seconds') AS l"
                        ),
                        &[&key],
                    )
                    .await
                    .unwrap();
                let Some(token) = row.get::<_, Option<i64>>(0) else {
                    continue;
                };
                let began: f64 = row.get(1);
                tokio::time::sleep(Duration::from_millis((n % 20) as u64)).await;
                let row = client
                    .query_one(
                        "SELECT fence.lock_release($1, $2), extract(epoch FROM clock_timestamp())::float8",
                        &[&key, &token],
                    )
                    .await
                    .unwrap();
                assert!(row.get::<_, bool>(0), "the lease was live until released");
                held.lock().unwrap().push((exclusive, began, row.get(1)));
            }
        }));
    }
    for session in sessions {
        session.await.unwrap();
    }
    let held = held.lock().unwrap();
    let writers = held.iter().filter(|(exclusive, ..)| *exclusive).count();
    assert!(
        writers > 5 && held.len() - writers > 10,
        "{writers} of {}",
        held.len()
    );
    let mut readers_overlapped = 0;
    for (i, a) in held.iter().enumerate() {
        for b in &held[i + 1..] {
            let overlap = a.1 < b.2 && b.1 < a.2;
            if overlap && (a.0 || b.0) {
                panic!("a writer overlapped another lease: {a:?} and {b:?}");
            }
            if overlap {
                readers_overlapped += 1;
            }
        }
    }
    assert!(
        readers_overlapped > 0,
        "readers never held the key together"
    );
}

#[tokio::test]
async fn fenced_writes_need_the_exclusive_lease() {
    let db = connect().await;
    let table = unique_table("shared_fenced");
    let key = unique_key("shared-fence");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, token bigint, v int);
         INSERT INTO {table} VALUES (1, 0, 0);
         SELECT fence.protect('{table}', lock_key => '{key}', token_column => 'token');"
    ))
    .await
    .unwrap();
    let write = format!("UPDATE {table} SET v = v + 1, token = $1 WHERE id = 1");
    let reader = share(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let refused = db.execute(&write, &[&reader]).await.unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("FN001"));
    assert!(release(&db, &key, reader).await.unwrap());
    let writer = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    db.execute(&write, &[&writer]).await.unwrap();
    // A fenced write in flight (its transaction open) holds a reader off
    // as it holds off a new writer (G3): the writer's lease may expire, but
    // nobody is granted the key until the write has ended.
    assert!(release(&db, &key, writer).await.unwrap());
    let next = acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let writing = connect().await;
    writing.batch_execute("BEGIN").await.unwrap();
    writing.execute(&write, &[&next]).await.unwrap();
    db.execute("SELECT fence.lock_force_release($1)", &[&key])
        .await
        .unwrap();
    assert_eq!(share(&db, &key, "1 minute", None, "0").await.unwrap(), None);
    writing.batch_execute("COMMIT").await.unwrap();
    assert!(share(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .is_some());
    let v: i32 = db
        .query_one(&format!("SELECT v FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 2);
}

#[tokio::test]
async fn renew_release_and_force_of_shared_leases_follow_their_owner() {
    let superuser = connect().await;
    ensure_test_roles(&superuser).await;
    let alice = connect_as("fence_test_alice").await;
    let bob = connect_as("fence_test_bob").await;
    let admin = connect_as("fence_test_admin").await;
    let key = unique_key("shared-owned");
    let token = share(&alice, &key, "2 seconds", Some("alice"), "0")
        .await
        .unwrap()
        .unwrap();
    let mine = share(&bob, &key, "1 minute", Some("bob"), "0")
        .await
        .unwrap()
        .unwrap();
    for sql in [
        format!("SELECT fence.lock_renew('{key}', {token})"),
        format!("SELECT fence.lock_release('{key}', {token})"),
        format!("SELECT fence.lock_acquire_shared('{key}', '1 minute', 'alice')"),
    ] {
        let (state, message) = expect_error(&bob, &sql).await;
        assert_eq!(state, "42501", "{sql}: {message}");
    }
    // Renew extends a shared lease by its ttl, or the one given.
    let extended: bool = alice
        .query_one(
            "SELECT fence.lock_renew($1, $2, '1 hour') > now() + interval '59 minutes'",
            &[&key, &token],
        )
        .await
        .unwrap()
        .get(0);
    assert!(extended);
    // A plain role forces only its own; here it forces bob's, and alice's
    // is still live.
    let forced: bool = bob
        .query_one("SELECT fence.lock_force_release($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(forced);
    assert!(!renew(&bob, &key, mine).await.unwrap());
    assert_eq!(
        listed(&bob, &key).await,
        [("shared".to_owned(), "alice".to_owned())]
    );
    let (state, _) = expect_error(&bob, &format!("SELECT fence.lock_force_release('{key}')")).await;
    assert_eq!(state, "42501", "alice's shared lease is not bob's to force");
    // fence_admin forces any.
    let forced: bool = admin
        .query_one("SELECT fence.lock_force_release($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(forced);
    assert!(listed(&admin, &key).await.is_empty());
    assert!(!release(&alice, &key, token).await.unwrap());
}

#[tokio::test]
async fn the_same_holder_gets_its_shared_lease_back_unless_it_may_not_adopt() {
    let db = connect().await;
    let key = unique_key("shared-g6");
    let token = share(&db, &key, "1 minute", Some("r"), "0")
        .await
        .unwrap()
        .unwrap();
    let again = share(&db, &key, "2 minutes", Some("r"), "0").await.unwrap();
    assert_eq!(again, Some(token), "G6: the same lease, extended");
    assert_eq!(listed(&db, &key).await.len(), 1);
    let ttl_now: f64 = db
        .query_one(
            "SELECT extract(epoch FROM expires_at - now())::float8 FROM fence.locks WHERE lock_key = $1",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ttl_now > 100.0, "extended by the new ttl: {ttl_now}");
    let (state, _) = expect_error(
        &db,
        &format!("SELECT fence._lock_acquire_shared('{key}', '1 minute', 'r', '0', false)"),
    )
    .await;
    assert_eq!(state, "FN002");
    // A holder's shared lease is no exclusive one: asking for that is busy.
    assert_eq!(
        acquire(&db, &key, "1 minute", Some("r"), "0")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_readers_free_the_key_and_their_rows_are_pruned() {
    let db = connect().await;
    let key = unique_key("shared-expiry");
    for _ in 0..3 {
        share(&db, &key, "300 milliseconds", None, "0")
            .await
            .unwrap()
            .unwrap();
    }
    let asked = Instant::now();
    let writer = acquire(&db, &key, "1 second", None, "5 seconds")
        .await
        .unwrap()
        .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(2));
    assert!(release(&db, &key, writer).await.unwrap());
    let rows = format!("SELECT count(*) FROM fence.shared_leases WHERE lock_key = '{key}'");
    assert_eq!(
        count(&db, &rows).await,
        3,
        "expired rows stay until the next reader"
    );
    share(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        count(&db, &rows).await,
        1,
        "the next reader's grant prunes them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolled_back_shared_grant_frees_the_key_and_wakes_the_writer() {
    let db = connect().await;
    let key = unique_key("shared-rollback");
    let reader = connect().await;
    reader.batch_execute("BEGIN").await.unwrap();
    let token = share(&reader, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let writer = waiting_for(&db, &key, false, "20 seconds").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rolled_back = Instant::now();
    reader.batch_execute("ROLLBACK").await.unwrap();
    let (granted, at) = writer.await.unwrap();
    assert!(granted.unwrap() > token);
    assert!(at.saturating_duration_since(rolled_back) < Duration::from_millis(500));
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM fence.shared_leases WHERE lock_key = '{key}'"),
        )
        .await,
        0
    );
}

#[tokio::test]
async fn a_reader_holds_off_a_multi_key_writer_on_its_key() {
    let db = connect().await;
    let (a, b) = (unique_key("shared-multi-a"), unique_key("shared-multi-b"));
    let reader = share(&db, &b, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let granted = count(
        &db,
        &format!("SELECT count(*) FROM fence.lock_acquire_all(ARRAY['{a}', '{b}'])"),
    )
    .await;
    assert_eq!(granted, 0, "all or nothing: b is read");
    assert!(listed(&db, &a).await.is_empty(), "nothing half-granted");
    assert!(release(&db, &b, reader).await.unwrap());
    let granted = count(
        &db,
        &format!("SELECT count(*) FROM fence.lock_acquire_all(ARRAY['{a}', '{b}'])"),
    )
    .await;
    assert_eq!(granted, 2);
}

#[tokio::test]
async fn bad_input_gets_its_sqlstate() {
    let db = connect().await;
    for (sql, expected) in [
        ("SELECT fence.lock_acquire_shared(NULL)", "22004"),
        ("SELECT fence.lock_acquire_shared('')", "22023"),
        (
            "SELECT fence.lock_acquire_shared(repeat('k', 1025))",
            "22023",
        ),
        ("SELECT fence.lock_acquire_shared('k', NULL)", "22004"),
        ("SELECT fence.lock_acquire_shared('k', '0')", "22023"),
        (
            "SELECT fence.lock_acquire_shared('k', '1 minute', '')",
            "22023",
        ),
        (
            "SELECT fence.lock_acquire_shared('k', '1 minute', NULL, '-1 second')",
            "22023",
        ),
        (
            "SELECT fence._lock_acquire_shared('k', '1 minute', NULL, '0', NULL)",
            "22004",
        ),
    ] {
        let (state, message) = expect_error(&db, sql).await;
        assert_eq!(state, expected, "{sql}: {message}");
    }
}

/// A reader granted inside a transaction that stays open holds the key's
/// lock (row-exclusive) until it ends: other readers still renew, release
/// and re-acquire at once (their changes conflict with a writer's grant
/// only), and more readers are granted beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_in_an_open_transaction_holds_up_no_other_reader() {
    let db = connect().await;
    let key = unique_key("shared-open");
    let other = share(&db, &key, "1 minute", Some("other"), "0")
        .await
        .unwrap()
        .unwrap();
    let open = connect().await;
    let open_pid = backend_pid(&open).await;
    open.batch_execute("BEGIN").await.unwrap();
    share(&open, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    // fence.blockers names the key and what holds it.
    let what: String = db
        .query_one(
            "SELECT what FROM fence.blockers WHERE pid = $1 AND lock_key = $2",
            &[&open_pid, &key],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(what, "shared grant");
    // Blocked calls would end with 57014 after 2 s instead.
    db.batch_execute("SET statement_timeout = '2s'")
        .await
        .unwrap();
    let started = Instant::now();
    assert!(renew(&db, &key, other).await.unwrap());
    assert_eq!(
        share(&db, &key, "1 minute", Some("other"), "0")
            .await
            .unwrap(),
        Some(other),
        "G6 re-acquire"
    );
    let third = share(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(&db, &key, third).await.unwrap());
    assert!(release(&db, &key, other).await.unwrap());
    assert!(started.elapsed() < Duration::from_millis(500));
    // A writer cannot be granted while the open transaction's reader is
    // in, and gets the key once it commits and releases.
    assert_eq!(
        acquire(&db, &key, "1 minute", None, "0").await.unwrap(),
        None
    );
    open.batch_execute("COMMIT").await.unwrap();
    db.execute("SELECT fence.lock_force_release($1)", &[&key])
        .await
        .unwrap();
    assert!(acquire(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .is_some());
}

/// A reader's renewal inside a transaction that stays open (it holds the
/// key until the end) does not turn another reader away: a reader's change
/// holds the key in row-share mode, which no reader's grant conflicts with.
#[tokio::test]
async fn a_readers_renewal_in_an_open_transaction_turns_no_reader_away() {
    let db = connect().await;
    let key = unique_key("shared-renewing");
    let token = share(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let renewing = connect().await;
    renewing.batch_execute("BEGIN").await.unwrap();
    assert!(renew(&renewing, &key, token).await.unwrap());
    let released = connect().await;
    let other = share(&released, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .expect("a reader is not turned away by another's renewal");
    // A release in an open transaction: the same.
    released.batch_execute("BEGIN").await.unwrap();
    assert!(release(&released, &key, other).await.unwrap());
    assert!(share(&db, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .is_some());
    renewing.batch_execute("COMMIT").await.unwrap();
    released.batch_execute("COMMIT").await.unwrap();
}

/// Two requests of one named holder at once (a lost reply's retry racing
/// the request itself): the second is busy while the first is in flight,
/// then gets the first one's lease back (G6), never a second lease.
#[tokio::test]
async fn one_holders_racing_requests_never_get_two_shared_leases() {
    let db = connect().await;
    let key = unique_key("shared-one-holder");
    let first = connect().await;
    first.batch_execute("BEGIN").await.unwrap();
    let token = share(&first, &key, "1 minute", Some("h"), "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        share(&db, &key, "1 minute", Some("h"), "0").await.unwrap(),
        None,
        "busy while the holder's other request is in flight"
    );
    first.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        share(&db, &key, "1 minute", Some("h"), "0").await.unwrap(),
        Some(token)
    );
    assert_eq!(listed(&db, &key).await.len(), 1);
}

/// Under REPEATABLE READ, the holder's shared lease granted after the
/// transaction's snapshot cannot be extended from it: 40001 at once, not
/// a loop until statement_timeout.
#[tokio::test]
async fn a_holders_lease_newer_than_the_snapshot_is_a_serialization_failure() {
    let db = connect().await;
    let key = unique_key("shared-rr");
    let rr = connect().await;
    rr.batch_execute(
        "SET statement_timeout = '5s'; BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1",
    )
    .await
    .unwrap();
    share(&db, &key, "1 minute", Some("h"), "0")
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    let error = share(&rr, &key, "1 minute", Some("h"), "0")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error).as_deref(), Some("40001"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
    rr.batch_execute("ROLLBACK").await.unwrap();
    // A REPEATABLE READ transaction whose snapshot sees it extends it.
    rr.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    assert!(share(&rr, &key, "2 minutes", Some("h"), "0")
        .await
        .unwrap()
        .is_some());
    rr.batch_execute("COMMIT").await.unwrap();
}

/// A renew from another session of an exclusive lease whose grant is still
/// uncommitted waits for that grant, then renews it (not "not live").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renewing_an_exclusive_lease_whose_grant_is_in_flight_waits_and_renews() {
    let db = connect().await;
    let key = unique_key("shared-inflight");
    let granting = connect().await;
    granting.batch_execute("BEGIN").await.unwrap();
    let token = acquire(&granting, &key, "1 minute", None, "0")
        .await
        .unwrap()
        .unwrap();
    let renewing = connect().await;
    let pid = backend_pid(&renewing).await;
    let renew_key = key.clone();
    let renewal = tokio::spawn(async move { renew(&renewing, &renew_key, token).await.unwrap() });
    until_waiting(&db, pid).await;
    granting.batch_execute("COMMIT").await.unwrap();
    assert!(renewal.await.unwrap(), "renewed once the grant committed");
    assert!(release(&db, &key, token).await.unwrap());
}
