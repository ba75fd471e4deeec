//! Leader election: three candidates compete for one lease; the leader works
//! in rounds while racing the work against loss of the lease, then steps
//! down; another takes over. At most one leads at any time.
//!
//! `cargo run -p pg_fence_client --features deadpool-postgres --example leader_election`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pg_fence_client::{Lease, LeaseOptions};

mod common;

#[tokio::main]
async fn main() -> Result<(), pg_fence_client::Error> {
    let pool = common::pool();
    let key = format!("example:leader:{}", std::process::id());
    let leading = Arc::new(AtomicUsize::new(0));
    let terms = Arc::new(AtomicUsize::new(0));
    let mut candidates = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let (pool, key, leading, terms) =
            (pool.clone(), key.clone(), leading.clone(), terms.clone());
        candidates.push(tokio::spawn(async move {
            let options = LeaseOptions::new(Duration::from_secs(2))
                .holder(format!("{name}-{}", std::process::id()));
            for _ in 0..2 {
                // Campaign: wait up to 5 s inside the server for the lease.
                let Some(lease) =
                    Lease::acquire(&pool, &key, &options, Duration::from_secs(5)).await?
                else {
                    continue;
                };
                assert_eq!(
                    leading.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two leaders at once"
                );
                println!("{name} leads with token {}", lease.token());
                let work = tokio::time::sleep(Duration::from_millis(300)); // one term of leading
                tokio::select! {
                    _ = work => {}
                    reason = lease.lost() => { println!("{name} lost the lease: {reason:?}"); }
                }
                leading.fetch_sub(1, Ordering::SeqCst);
                terms.fetch_add(1, Ordering::SeqCst);
                lease.release().await?; // step down
            }
            Ok::<_, pg_fence_client::Error>(())
        }));
    }
    for candidate in candidates {
        candidate.await.expect("candidate task")?;
    }
    assert_eq!(
        terms.load(Ordering::SeqCst),
        6,
        "every candidate led twice, one at a time"
    );
    println!("6 terms, never two leaders at once");
    Ok(())
}
