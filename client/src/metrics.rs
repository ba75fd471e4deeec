//! Client-side metrics through the [`metrics`](https://docs.rs/metrics)
//! crate (feature `metrics`), beside the `tracing` spans: whatever recorder
//! the application installs (say `metrics-exporter-prometheus`) receives
//! them. Without the feature every function here is a no-op.
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `pg_fence_client_acquire_seconds` | histogram | `outcome`: `granted`, `busy`, `error` | a [`Lease::acquire`](crate::Lease::acquire) call, retries and waiting included |
//! | `pg_fence_client_hold_seconds` | histogram | | from a grant until the guard let go: released, dropped or lost |
//! | `pg_fence_client_renewals_total` | counter | `outcome`: `renewed`, `not_live`, `refused`, `error`, `timeout` | each renewal attempt of the background task |
//! | `pg_fence_client_leases_lost_total` | counter | `reason`: `not_live`, `deadline_passed`, `refused` | leases found lost: by the renewal task, by `loss()` / `lost()` / `release()` past the local deadline, or by `run()` finding the lease not live at its release |
//! | `pg_fence_client_leases_held` | gauge | | guards holding a lease now (not yet released, dropped or lost) |

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::LossReason;

/// How an acquire call ended, as the `outcome` label says it.
#[derive(Clone, Copy)]
pub(crate) enum Acquired {
    Granted,
    Busy,
    Error,
}

/// How a renewal attempt ended.
#[derive(Clone, Copy)]
pub(crate) enum Renewal {
    Renewed,
    NotLive,
    Refused,
    Error,
    Timeout,
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn acquire(outcome: Acquired, elapsed: Duration) {
    #[cfg(feature = "metrics")]
    {
        let outcome = match outcome {
            Acquired::Granted => "granted",
            Acquired::Busy => "busy",
            Acquired::Error => "error",
        };
        ::metrics::histogram!("pg_fence_client_acquire_seconds", "outcome" => outcome)
            .record(elapsed.as_secs_f64());
    }
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn renewal(outcome: Renewal) {
    #[cfg(feature = "metrics")]
    {
        let outcome = match outcome {
            Renewal::Renewed => "renewed",
            Renewal::NotLive => "not_live",
            Renewal::Refused => "refused",
            Renewal::Error => "error",
            Renewal::Timeout => "timeout",
        };
        ::metrics::counter!("pg_fence_client_renewals_total", "outcome" => outcome).increment(1);
    }
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn lost(reason: &LossReason) {
    #[cfg(feature = "metrics")]
    {
        let reason = match reason {
            LossReason::NotLive => "not_live",
            LossReason::DeadlinePassed => "deadline_passed",
            LossReason::Refused(_) => "refused",
            LossReason::Abandoned => "abandoned",
        };
        ::metrics::counter!("pg_fence_client_leases_lost_total", "reason" => reason).increment(1);
    }
}

/// One held lease, for the gauge and the hold time: counted in when made,
/// out exactly once, by whichever comes first of release, drop and loss.
pub(crate) struct Holding {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    since: Instant,
    ended: AtomicBool,
}

impl Holding {
    pub(crate) fn start() -> Holding {
        #[cfg(feature = "metrics")]
        ::metrics::gauge!("pg_fence_client_leases_held").increment(1.0);
        Holding {
            since: Instant::now(),
            ended: AtomicBool::new(false),
        }
    }

    pub(crate) fn end(&self) {
        let first = !self.ended.swap(true, Ordering::AcqRel);
        #[cfg(feature = "metrics")]
        if first {
            ::metrics::gauge!("pg_fence_client_leases_held").decrement(1.0);
            ::metrics::histogram!("pg_fence_client_hold_seconds")
                .record(self.since.elapsed().as_secs_f64());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = first;
    }
}
