//! Leader election with `Election`: three candidates campaign for one key;
//! the leader works for a term while racing the work against loss of its
//! lease, then resigns, and another takes over. An observer follows the
//! changes. At most one leads at any time, and terms only increase.
//!
//! `cargo run -p pg_fence_client --features deadpool-postgres --example leader_election`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pg_fence_client::{Election, LeaseOptions};

mod common;

#[tokio::main]
async fn main() -> Result<(), pg_fence_client::Error> {
    let pool = common::pool();
    let election = Election::new(format!("example:leader:{}", std::process::id()));
    let leading = Arc::new(AtomicUsize::new(0));

    // The observer: every leadership change, "no leader" included, in
    // order, however short the term (it reads the key's term history).
    // The first answer is the leadership as it is (nobody yet); then a
    // leader and "no leader" in turn.
    let mut observer = election.observe(&pool);
    assert!(observer.next().await?.is_none(), "nobody leads yet");
    let watching = tokio::spawn(async move {
        let mut terms = Vec::new();
        while terms.len() < 6 {
            let leader = observer.next().await?.expect("a leader after no leader");
            println!("observer: term {} led by {}", leader.token, leader.holder);
            terms.push(leader.token);
            assert!(observer.next().await?.is_none(), "then no leader");
        }
        Ok::<_, pg_fence_client::Error>(terms)
    });

    let mut candidates = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let (pool, election, leading) = (pool.clone(), election.clone(), leading.clone());
        candidates.push(tokio::spawn(async move {
            let options = LeaseOptions::new(Duration::from_secs(2))
                .holder(format!("{name}-{}", std::process::id()));
            for _ in 0..2 {
                let leader = election.campaign(&pool, &options).await?;
                assert_eq!(
                    leading.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two leaders at once"
                );
                let work = tokio::time::sleep(Duration::from_millis(300)); // one term of leading
                tokio::select! {
                    _ = work => {}
                    reason = leader.lost() => println!("{name} lost the lease: {reason:?}"),
                }
                leading.fetch_sub(1, Ordering::SeqCst);
                leader.release().await?; // resign
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, pg_fence_client::Error>(())
        }));
    }
    for candidate in candidates {
        candidate.await.expect("candidate task")?;
    }
    let terms = watching.await.expect("observer task")?;
    assert!(
        terms.windows(2).all(|pair| pair[0] < pair[1]),
        "terms only increase: {terms:?}"
    );
    println!("6 terms, never two leaders at once; the observer saw all 6, in order");
    Ok(())
}
