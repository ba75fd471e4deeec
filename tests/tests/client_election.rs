//! `Election` through both backends: candidates campaign, lead and resign,
//! a leader paused past its ttl is succeeded and a leader forced out is
//! told; there is never more than one leader at an instant, terms only
//! increase, and an observer sees the leadership changes in order, "no
//! leader" included.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pg_fence_client::{Backend, Election, Error, Lease, LeaseOptions, LossReason};
use pg_fence_tests::*;

/// Observe `election` until it has seen `terms` leaders and then nobody;
/// the changes, in order. The first answer (nobody leads yet) is taken
/// before this returns.
async fn observing<B: Backend>(
    backend: &B,
    election: &Election,
    terms: usize,
) -> tokio::task::JoinHandle<Vec<Option<(i64, String)>>> {
    let mut observer = election.observe(backend);
    let first = observer.next().await.unwrap();
    assert_eq!(first, None, "nobody leads yet");
    tokio::spawn(async move {
        let mut seen = vec![None];
        loop {
            let now = observer
                .next()
                .await
                .unwrap()
                .map(|lease| (lease.token, lease.holder));
            let leaders = seen.iter().filter(|s: &&Option<_>| s.is_some()).count()
                + usize::from(now.is_some());
            let done = now.is_none() && leaders >= terms;
            seen.push(now);
            if done {
                return seen;
            }
        }
    })
}

/// The leaders' terms must only increase, each seen once, and the answers
/// alternate: nobody, a leader, nobody, a leader, ... (every change,
/// "no leader" included).
fn terms_of(seen: &[Option<(i64, String)>]) -> Vec<i64> {
    for (at, answer) in seen.iter().enumerate() {
        assert_eq!(
            answer.is_some(),
            at % 2 == 1,
            "not alternating at {at}: {seen:?}"
        );
    }
    let terms: Vec<i64> = seen.iter().flatten().map(|(token, _)| *token).collect();
    assert!(
        terms.windows(2).all(|pair| pair[0] < pair[1]),
        "terms went down: {seen:?}"
    );
    terms
}

through_both_backends!(candidates_take_turns_and_an_observer_sees_each_term);
async fn candidates_take_turns_and_an_observer_sees_each_term<B: Backend>(
    backend: B,
    _app: String,
) {
    let election = Election::new(unique_key("election"));
    assert_eq!(election.leader(&backend).await.unwrap(), None);
    let observer = observing(&backend, &election, 6).await;
    let leading = Arc::new(AtomicUsize::new(0));
    let granted = Arc::new(Mutex::new(Vec::new()));
    let mut candidates = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let (backend, election, leading, granted) = (
            backend.clone(),
            election.clone(),
            leading.clone(),
            granted.clone(),
        );
        candidates.push(tokio::spawn(async move {
            let options = LeaseOptions::new(Duration::from_secs(3)).holder(unique_key(name));
            for _ in 0..2 {
                let leader = election.campaign(&backend, &options).await.unwrap();
                assert_eq!(leading.fetch_add(1, Ordering::SeqCst), 0, "two leaders");
                granted.lock().unwrap().push(leader.token());
                let now = election.leader(&backend).await.unwrap().expect("a leader");
                assert_eq!(now.token, leader.token(), "leader() names the leader");
                tokio::time::sleep(Duration::from_millis(150)).await;
                leading.fetch_sub(1, Ordering::SeqCst);
                assert!(leader.release().await.unwrap(), "resigned");
                // Step back a moment, so the others get turns.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    for candidate in candidates {
        candidate.await.unwrap();
    }
    let seen = tokio::time::timeout(Duration::from_secs(10), observer)
        .await
        .expect("the observer saw the end")
        .unwrap();
    let mut granted = granted.lock().unwrap().clone();
    granted.sort();
    assert_eq!(terms_of(&seen), granted, "every term, in order: {seen:?}");
    assert_eq!(seen.last(), Some(&None), "and then no leader");
}

through_both_backends!(a_paused_leader_is_succeeded_and_a_forced_one_is_told);
async fn a_paused_leader_is_succeeded_and_a_forced_one_is_told<B: Backend>(
    backend: B,
    _app: String,
) {
    let db = connect().await;
    let election = Election::new(unique_key("election-pause"));
    let observer = observing(&backend, &election, 3).await;
    // A leader that stops renewing (a paused process): a bare grant.
    let paused = acquire(&db, election.key(), "600 milliseconds", Some("paused"), "0")
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The next candidate takes over at its expiry.
    let options = LeaseOptions::new(Duration::from_secs(3)).holder(unique_key("next"));
    let next = election.campaign(&backend, &options).await.unwrap();
    assert!(next.token() > paused);
    let lost = next.lost();
    // It leads a while; then an admin forces it out: the leader is told,
    // and a third takes over.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let forced: bool = db
        .query_one("SELECT fence.lock_force_release($1)", &[&election.key()])
        .await
        .unwrap()
        .get(0);
    assert!(forced);
    let reason = tokio::time::timeout(Duration::from_secs(2), lost)
        .await
        .expect("the forced leader was told within a renewal period");
    assert_eq!(reason, LossReason::NotLive);
    let third = election
        .campaign(&backend, &LeaseOptions::new(Duration::from_secs(3)))
        .await
        .unwrap();
    let terms = vec![paused, next.token(), third.token()];
    drop(next);
    assert!(third.release().await.unwrap());
    let seen = tokio::time::timeout(Duration::from_secs(10), observer)
        .await
        .expect("the observer saw the end")
        .unwrap();
    // The three leaders, in order, each followed by nobody.
    assert_eq!(terms_of(&seen), terms, "{seen:?}");
    assert_eq!(seen.last(), Some(&None));
}

through_both_backends!(an_observer_slower_than_the_terms_still_sees_every_one);
async fn an_observer_slower_than_the_terms_still_sees_every_one<B: Backend>(
    backend: B,
    _app: String,
) {
    let election = Election::new(unique_key("election-slow-observer"));
    let mut observer = election.observe(&backend);
    assert_eq!(observer.next().await.unwrap(), None, "nobody leads yet");
    // Three candidates lead in turns with no pause at all: many terms begin
    // and end between two looks of an observer that takes 100 ms over each
    // answer.
    let mut candidates = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let (backend, election) = (backend.clone(), election.clone());
        candidates.push(tokio::spawn(async move {
            let options = LeaseOptions::new(Duration::from_secs(5)).holder(unique_key(name));
            let mut granted = Vec::new();
            for _ in 0..5 {
                let leader = election.campaign(&backend, &options).await.unwrap();
                granted.push(leader.token());
                assert!(leader.release().await.unwrap());
            }
            granted
        }));
    }
    let mut seen = vec![None];
    let mut leaders = 0;
    while leaders < 15 || seen.last() != Some(&None) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = tokio::time::timeout(Duration::from_secs(10), observer.next())
            .await
            .expect("an answer")
            .unwrap()
            .map(|term| (term.token, term.holder));
        leaders += usize::from(answer.is_some());
        seen.push(answer);
    }
    let mut granted = Vec::new();
    for candidate in candidates {
        granted.extend(candidate.await.unwrap());
    }
    granted.sort();
    assert_eq!(terms_of(&seen), granted, "every term, in order: {seen:?}");
}

through_both_backends!(an_observer_behind_the_kept_history_says_it_lagged);
async fn an_observer_behind_the_kept_history_says_it_lagged<B: Backend>(backend: B, _app: String) {
    let election = Election::new(unique_key("election-lag"));
    let mut observer = election.observe(&backend).keep(Duration::from_millis(50));
    assert_eq!(observer.next().await.unwrap(), None);
    let options = LeaseOptions::new(Duration::from_secs(5));
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let lease = Lease::acquire(&backend, election.key(), &options, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        tokens.push(lease.token());
        assert!(lease.release().await.unwrap());
        // Longer than the keep: each grant drops the terms before it.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match observer.next().await {
        Err(Error::Lagged { after, resumed, .. }) => {
            assert_eq!(after, None);
            assert_eq!(resumed, tokens[2]);
        }
        other => panic!("expected Lagged, got {other:?}"),
    }
    // Then it goes on from the oldest kept term.
    let term = observer.next().await.unwrap().expect("the kept term");
    assert_eq!(term.token, tokens[2]);
    assert_eq!(observer.next().await.unwrap(), None, "released");
}

through_both_backends!(
    an_observer_whose_history_was_stopped_keeps_it_again_and_says_what_it_missed
);
async fn an_observer_whose_history_was_stopped_keeps_it_again_and_says_what_it_missed<
    B: Backend,
>(
    backend: B,
    _app: String,
) {
    let db = connect().await;
    let election = Election::new(unique_key("election-stopped"));
    let mut observer = election.observe(&backend);
    assert_eq!(observer.next().await.unwrap(), None);
    // Someone stops the history; a term comes and goes unkept.
    db.execute(
        "SELECT fence.lock_keep_history($1, NULL)",
        &[&election.key()],
    )
    .await
    .unwrap();
    let unkept = acquire(&db, election.key(), "1 minute", Some("unkept"), "0")
        .await
        .unwrap()
        .unwrap();
    assert!(release(&db, election.key(), unkept).await.unwrap());
    let next = {
        let election = election.clone();
        let db = connect().await;
        tokio::spawn(async move {
            // Once the observer has kept the history again.
            for _ in 0..100 {
                let kept: i64 = db
                    .query_one(
                        "SELECT count(*) FROM fence.history_keys WHERE lock_key = $1",
                        &[&election.key()],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if kept == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acquire(&db, election.key(), "1 minute", Some("kept"), "0")
                .await
                .unwrap()
                .unwrap()
        })
    };
    match observer.next().await {
        Err(Error::Lagged { after, resumed, .. }) => {
            assert_eq!(after, None);
            assert_eq!(resumed, next.await.unwrap());
        }
        other => panic!("expected Lagged, got {other:?}"),
    }
    let term = observer.next().await.unwrap().expect("the kept term");
    assert_eq!(term.previous_token, Some(unkept));
}
