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

    // The observer: leadership changes, "no leader" included, as it sees
    // them. It can miss a term shorter than the time between two of its
    // looks (a watch sees the lease as it is when it looks), so it is
    // stopped once the candidates are done rather than waited for.
    let mut observer = election.observe(&pool);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let watching = {
        let seen = seen.clone();
        tokio::spawn(async move {
            // The first answer is the leadership as it is (nobody yet).
            observer.next().await?;
            loop {
                if let Some(leader) = observer.next().await? {
                    seen.lock().expect("not poisoned").push(leader.token);
                }
            }
            #[allow(unreachable_code)]
            Ok::<_, pg_fence_client::Error>(())
        })
    };

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
    // Past the watch's one-second recheck: the last change has been seen.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    watching.abort();
    let terms = seen.lock().expect("not poisoned").clone();
    assert!(!terms.is_empty(), "the observer saw no leader at all");
    assert!(
        terms.windows(2).all(|pair| pair[0] < pair[1]),
        "terms only increase: {terms:?}"
    );
    println!("6 terms, never two leaders at once; the terms the observer saw only increase");
    Ok(())
}
