//! The lease guard: acquire, renew in the background, tell the holder the
//! moment the lease is lost, release.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::ambiguous;
use crate::backend::{Backend, Grant};
use crate::multi::Keys;
use crate::{metrics, Error};

/// What a lease is on.
#[derive(Clone, Copy)]
pub(crate) enum Target<'a> {
    Key(&'a str),
    /// Any one permit of a semaphore (`fence.semaphore_acquire`).
    Permit {
        name: &'a str,
        permits: i32,
    },
    /// Every one of these keys, under one token (`fence.lock_acquire_all`).
    All(&'a [String]),
    /// A shared (reader) lease on the key (`fence.lock_acquire_shared`).
    Shared(&'a str),
}

/// A [`Target`] owned, for a cleanup that outlives the call.
#[derive(Clone, Debug)]
pub(crate) enum Wanted {
    Key(String),
    Permit { name: String, permits: i32 },
    All(Vec<String>),
    Shared(String),
}

impl Target<'_> {
    pub(crate) fn owned(self) -> Wanted {
        match self {
            Target::Key(key) => Wanted::Key(key.to_owned()),
            Target::Permit { name, permits } => Wanted::Permit {
                name: name.to_owned(),
                permits,
            },
            Target::All(keys) => Wanted::All(keys.to_vec()),
            Target::Shared(key) => Wanted::Shared(key.to_owned()),
        }
    }
}

/// How a lease is taken and kept: the one place its policy lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOptions {
    /// The lease's time to live on the server. Default 30 s.
    pub ttl: Duration,
    /// How often the background task renews. Default `ttl / 3`.
    pub renew_every: Duration,
    /// Subtracted from the local deadline (last acknowledged renewal's send
    /// time + ttl) to allow for clock rate differences. Default `ttl / 10`.
    pub safety_margin: Duration,
    /// The holder id. Default: a fresh UUID per lease; the client retries an
    /// ambiguous acquire with it, so a lost reply does not lock you out (G6).
    /// A holder id names one guard: an acquire (other than such a retry)
    /// that finds the key leased to its own holder id already fails with
    /// [`Error::HolderInUse`], leaving that lease as it was.
    pub holder: Option<String>,
    /// How long an acquire whose reply was lost is retried (as the same
    /// holder, with backoff from 25 ms to 1 s), from its first send: long
    /// enough to ride out a restart or a failover. Default: the ttl (past
    /// it, a lease the first request got would have expired anyway).
    pub ambiguous_retry_for: Duration,
}

impl LeaseOptions {
    /// Options for a lease of `ttl`, the rest derived from it.
    pub fn new(ttl: Duration) -> LeaseOptions {
        LeaseOptions {
            ttl,
            renew_every: ttl / 3,
            safety_margin: ttl / 10,
            holder: None,
            ambiguous_retry_for: ttl,
        }
    }

    /// Renew this often (keep it well inside the ttl).
    pub fn renew_every(mut self, every: Duration) -> LeaseOptions {
        self.renew_every = every;
        self
    }

    /// Give up this much of the ttl to clock-rate differences.
    pub fn safety_margin(mut self, margin: Duration) -> LeaseOptions {
        self.safety_margin = margin;
        self
    }

    /// Retry an acquire whose reply was lost for this long (see the field).
    pub fn ambiguous_retry_for(mut self, budget: Duration) -> LeaseOptions {
        self.ambiguous_retry_for = budget;
        self
    }

    /// Use this holder id (G6: the same holder re-acquiring gets its lease back).
    pub fn holder(mut self, holder: impl Into<String>) -> LeaseOptions {
        self.holder = Some(holder.into());
        self
    }
}

impl LeaseOptions {
    /// Renewal must fit well inside the ttl: `0 < renew_every` and
    /// `renew_every + safety_margin < ttl`. Checked by every acquire.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |message: String| Err(Error::Usage(message));

        if self.ttl.is_zero() || self.renew_every.is_zero() {
            return invalid(format!(
                "ttl ({:?}) and renew_every ({:?}) must be positive",
                self.ttl, self.renew_every
            ));
        }
        // The server's remaining time comes rounded to the millisecond.
        if self.safety_margin < Duration::from_millis(1) {
            return invalid(format!(
                "safety_margin ({:?}) must be at least 1 ms: the server's time left is rounded to the millisecond",
                self.safety_margin
            ));
        }
        if self.renew_every.saturating_add(self.safety_margin) >= self.ttl {
            return invalid(format!(
                "renew_every ({:?}) + safety_margin ({:?}) must be less than ttl ({:?}), or the lease is lost before its first renewal",
                self.renew_every, self.safety_margin, self.ttl
            ));
        }
        Ok(())
    }
}

impl Default for LeaseOptions {
    fn default() -> LeaseOptions {
        LeaseOptions::new(Duration::from_secs(30))
    }
}

/// Why a lease was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// The server says it is no longer live: it expired, or was forced.
    NotLive,
    /// Renewals failed until the local deadline passed: the server may
    /// already have given the key to someone else.
    DeadlinePassed,
    /// The server refused to renew it (for example 42501): the message.
    Refused(String),
    /// Nobody renews it any more: the guard was dropped, or its renewal task
    /// ended (the runtime shut down) while the lease was held.
    Abandoned,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Held {
        deadline: Instant,
        expires_at: SystemTime,
    },
    Lost(LossReason),
    Released,
}

/// A granted lease. It renews itself in the background until released,
/// dropped or lost.
///
/// Dropping it stops renewal and releases it best-effort in the background
/// (if a Tokio runtime is running); that release is not immediate and may
/// not happen at all (the process may exit first), in which case the lease
/// simply expires. Call [`Lease::release`] to know.
pub struct Lease<B: Backend> {
    backend: B,
    keys: Keys,
    holder: String,
    token: i64,
    state: watch::Receiver<State>,
    /// The renewal task's sender of the state, which only the task owns:
    /// once the task is gone (aborted, panicked, its runtime shut down), so
    /// is the sender, and `lost()` reports `Abandoned` unless the state
    /// says `Released`. `release()` settles it through this (see [`settle`]).
    report: std::sync::Weak<watch::Sender<State>>,
    renewal: Option<JoinHandle<()>>,
    /// Released (or being released) by `release`: Drop has nothing to do.
    settled: bool,
    /// For the metrics: held since, and whether that has ended.
    holding: Arc<metrics::Holding>,
}

impl<B: Backend> Lease<B> {
    /// Try once: `None` if the key is held. (A request whose reply is lost is
    /// still retried, for up to `ambiguous_retry_for`.)
    ///
    /// Cancel safety: if this future is dropped after the request was sent,
    /// its connection is closed (not handed back to the pool with the
    /// statement still running), and a wait in the server ends when the
    /// server sees the client gone. A lease granted before then is held by
    /// nobody and expires after its ttl; an acquire naming the same holder
    /// is refused (`HolderInUse`) until then.
    pub async fn try_acquire(
        backend: &B,
        key: &str,
        options: &LeaseOptions,
    ) -> Result<Option<Lease<B>>, Error> {
        Lease::acquire(backend, key, options, Duration::ZERO).await
    }

    /// Wait up to `wait` (inside the server) for the key: `None` if it
    /// stayed busy. Cancel safety: as [`Lease::try_acquire`].
    #[tracing::instrument(name = "pg_fence.acquire", skip(backend, options), fields(token))]
    pub async fn acquire(
        backend: &B,
        key: &str,
        options: &LeaseOptions,
        wait: Duration,
    ) -> Result<Option<Lease<B>>, Error> {
        Lease::acquire_target(backend, Target::Key(key), options, wait).await
    }

    /// A lease on `target` (a key, or a semaphore's permit), with the
    /// metrics of an acquire.
    pub(crate) async fn acquire_target(
        backend: &B,
        target: Target<'_>,
        options: &LeaseOptions,
        wait: Duration,
    ) -> Result<Option<Lease<B>>, Error> {
        options.validate()?;
        let started = Instant::now();
        let outcome = Lease::acquire_as(backend, target, options, wait).await;
        let kind = match &outcome {
            Ok(Some(_)) => metrics::Acquired::Granted,
            Ok(None) => metrics::Acquired::Busy,
            Err(_) => metrics::Acquired::Error,
        };
        metrics::acquire(kind, started.elapsed());
        outcome
    }

    async fn acquire_as(
        backend: &B,
        target: Target<'_>,
        options: &LeaseOptions,
        wait: Duration,
    ) -> Result<Option<Lease<B>>, Error> {
        let holder = options
            .holder
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // A cleanup still releasing what an earlier, unanswered acquire as
        // this holder may have been granted must finish first, or it could
        // release the lease this call is about to get back (G6).
        let wanted = target.owned();
        // Stopping the cleanup of this holder's unanswered acquire makes
        // this call a retry of that request, which may take its lease back;
        // if it does not get it, the cleanup starts again (on drop).
        let resumed = ambiguous::wait_for_cleanup(&wanted, &holder).await;
        let mut rearm = ambiguous::Rearm {
            backend: backend.clone(),
            wanted: wanted.clone(),
            ttl: options.ttl,
            holder: holder.clone(),
            bounds: resumed.bounds,
            _resuming: resumed.resuming,
        };
        let resumed = rearm.bounds.is_some();
        let mut attempts = 0u32;
        let first_sent = Instant::now();
        // A request may wait in the server for `wait` before it grants.
        let budget = options.ambiguous_retry_for.saturating_add(wait);
        let mut pause = Duration::from_millis(25);
        let (sent, grant) = loop {
            let sent = Instant::now();
            // Only a retry of a request whose reply was lost may adopt the
            // holder's live lease (G6): on a first attempt that lease is
            // another guard's, refused by the server (FN002).
            let adopt = resumed || attempts > 0;
            let granted = match target {
                Target::Key(key) => backend
                    .acquire_lease(key, options.ttl, &holder, wait, adopt)
                    .await
                    .map(|grant| grant.map(|grant| (Keys::one(key.to_owned()), grant))),
                Target::Permit { name, permits } => backend
                    .acquire_permit(name, permits, options.ttl, &holder, wait, adopt)
                    .await
                    .map(|grant| grant.map(|(key, grant)| (Keys::one(key), grant))),
                Target::All(keys) => backend
                    .acquire_all(keys, options.ttl, &holder, wait, adopt)
                    .await
                    .map(|grant| grant.map(|(keys, grant)| (Keys::all(keys), grant))),
                Target::Shared(key) => backend
                    .acquire_shared(key, options.ttl, &holder, wait, adopt)
                    .await
                    .map(|grant| grant.map(|grant| (Keys::shared(key.to_owned()), grant))),
            };
            match granted {
                Ok(grant) => break (sent, grant),
                // The reply was lost: ask again as the same holder, which
                // returns the lease if the first request had granted it. No
                // pooled connection: nothing was sent this time (a restart,
                // a failover); try again within the budget too, but it does
                // not make the next try a retry that may adopt.
                Err(error) if error.is_ambiguous() || matches!(error, Error::Pool(_)) => {
                    if error.is_ambiguous() {
                        attempts += 1;
                    }
                    if first_sent.elapsed() + pause > budget && attempts == 0 {
                        // Nothing was ever sent: nothing to clean up.
                        return Err(error);
                    }
                    if first_sent.elapsed() + pause > budget {
                        tracing::warn!(%error, attempts, holder, "acquire replies lost; giving up, releasing in the background");
                        // A lease granted to the last request lives at most
                        // until its wait and then its ttl have run out.
                        let until = later((sent + wait, sent + wait + options.ttl), rearm.disarm());
                        ambiguous::clean_up_after(backend, wanted, options.ttl, &holder, until);
                        return Err(Error::AcquireAmbiguous {
                            holder,
                            message: error.to_string(),
                        });
                    }
                    tracing::warn!(%error, attempts, "acquire reply lost; retrying as the same holder");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                // The server answered and granted, but the reply did not
                // decode: nobody knows the lease, so release it as for a
                // lost reply.
                Err(error @ Error::Decode(_)) => {
                    let until = later((sent + wait, sent + wait + options.ttl), rearm.disarm());
                    ambiguous::clean_up_after(backend, wanted, options.ttl, &holder, until);
                    return Err(error);
                }
                Err(error) => return Err(error),
            }
        };
        let Some((
            keys,
            Grant {
                token,
                remaining,
                expires_at,
            },
        )) = grant
        else {
            // Busy: a stopped cleanup starts again as `rearm` drops.
            return Ok(None);
        };
        // The lease (the lost request's, or a fresh one): nothing to clean up.
        rearm.disarm();
        tracing::Span::current().record("token", token);
        // `remaining` runs from the statement's start (after `sent`), through
        // any wait, to the expiry: never later than the server's.
        let deadline = sent
            + remaining
                .min(options.ttl + wait)
                .saturating_sub(options.safety_margin);
        let (report, state) = watch::channel(State::Held {
            deadline,
            expires_at,
        });
        let report = Arc::new(report);
        let holding = Arc::new(metrics::Holding::start());
        let weak_report = Arc::downgrade(&report);
        let renewal = tokio::spawn(renew(
            backend.clone(),
            keys.clone(),
            token,
            options.clone(),
            deadline,
            report,
            holding.clone(),
        ));
        Ok(Some(Lease {
            backend: backend.clone(),
            keys,
            holder,
            token,
            state,
            report: weak_report,
            renewal: Some(renewal),
            settled: false,
            holding,
        }))
    }

    /// The fencing token: carry it into every write the lease protects. A
    /// shared (reader) lease's token fences nothing: fenced tables take
    /// only the exclusive lease's.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// The key the lease is on (of a multi-key lease, the first of its
    /// keys in byte order).
    pub fn key(&self) -> &str {
        self.keys.first()
    }

    /// Every key the lease is on: one, or a multi-key lease's keys
    /// (distinct, in byte order), all under [`Lease::token`].
    pub fn keys(&self) -> &[String] {
        self.keys.as_slice()
    }

    /// Whether it is a shared (reader) lease ([`Lease::acquire_shared`]).
    pub fn is_shared(&self) -> bool {
        self.keys.shared
    }

    /// The holder id it was acquired with.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The local deadline (monotonic clock) while held: after it, assume the
    /// lease may be gone even if no one said so.
    pub fn deadline(&self) -> Option<Instant> {
        match &*self.state.borrow() {
            State::Held { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    /// While held: when the lease expires by the server's clock, as the last
    /// acquire or renewal reported it. Only the server judges expiry (G5);
    /// this is for display and logs, [`Lease::deadline`] is for deciding.
    pub fn expires_at(&self) -> Option<SystemTime> {
        match &*self.state.borrow() {
            State::Held { expires_at, .. } => Some(*expires_at),
            _ => None,
        }
    }

    /// Why the lease was lost, if it was: the truth at the moment of the
    /// call. Past the local deadline the lease is lost (`DeadlinePassed`)
    /// whatever the renewal task has managed to report: on a starved
    /// runtime, after a pause or a freeze, it may not have run at all.
    pub fn loss(&self) -> Option<LossReason> {
        if let Some(report) = self.report.upgrade() {
            declare_deadline_passed(&report, &self.holding, self.keys.first(), self.token);
        }
        match &*self.state.borrow() {
            State::Lost(reason) => Some(reason.clone()),
            State::Held { deadline, .. } if Instant::now() >= *deadline => {
                Some(LossReason::DeadlinePassed)
            }
            _ => None,
        }
    }

    /// Resolves when the lease is lost (never, once released): when the
    /// renewal task reports a loss, and at the local deadline by itself
    /// (the task may be starved). Race your work against it with
    /// `tokio::select!`. Cancel safe.
    pub fn lost(&self) -> impl Future<Output = LossReason> + Send + 'static {
        let mut state = self.state.clone();
        let report = self.report.clone();
        let (holding, key, token) = (
            self.holding.clone(),
            self.keys.first().to_owned(),
            self.token,
        );
        async move {
            loop {
                let deadline = match &*state.borrow_and_update() {
                    State::Lost(reason) => return reason.clone(),
                    State::Held { deadline, .. } => Some(*deadline),
                    State::Released => None,
                };
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    let Some(report) = report.upgrade() else {
                        // Nobody can renew it any more: it is past its deadline.
                        return LossReason::DeadlinePassed;
                    };
                    declare_deadline_passed(&report, &holding, &key, token);
                    // Lost now, or renewed in time after all: look again.
                    continue;
                }
                let changed = tokio::select! {
                    biased;
                    changed = state.changed() => changed,
                    _ = sleep_until_or_never(deadline) => continue,
                };
                if changed.is_err() {
                    // The renewal task is gone. Released: nothing to report.
                    // Otherwise (the guard was dropped, the runtime shut
                    // down): nobody keeps the lease any more.
                    if *state.borrow() == State::Released {
                        return std::future::pending().await;
                    }
                    return LossReason::Abandoned;
                }
            }
        }
    }

    /// Stop renewing and release: true if the lease was still live.
    ///
    /// Renewal is stopped at once, aborted rather than awaited, so a release
    /// never waits behind a slow renewal. A renewal cut off in flight either
    /// extended the lease before the release ends it, or reaches the server
    /// after the release and finds nothing live to extend (the server counts
    /// it in `renewals_lost`). If the release itself never reaches the
    /// server, the lease expires after at most one ttl from its last renewal.
    /// It waits for an answer until the lease's local deadline (at least
    /// 250 ms), then gives up with a connection error; the release goes on
    /// in a background task, best-effort (it ends with the runtime), until
    /// the lease's expiry. An acquire naming the same holder waits for that
    /// task first. Outside a Tokio runtime it waits inline, unbounded.
    ///
    /// Cancel safety: dropped before it is first polled, the guard's drop
    /// releases best-effort in the background; dropped later, the release
    /// goes on in its own task (waiting for a pooled connection if need be).
    #[tracing::instrument(name = "pg_fence.release", skip(self), fields(key = %self.keys.first(), token = self.token))]
    pub async fn release(mut self) -> Result<bool, Error> {
        // Past the local deadline the lease is assumed gone and expires on
        // the server anyway: no release waits longer than that (a partition
        // would otherwise hold it for minutes), nor less than a moment.
        let bound = self
            .deadline()
            .map_or(Duration::ZERO, |deadline| {
                deadline.saturating_duration_since(Instant::now())
            })
            .max(RELEASE_AT_LEAST);
        // Sent late, the release is still worth it until the server's
        // expiry (as the lease last reported it), and not after.
        let server_end = self
            .expires_at()
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default()
            .max(bound);
        // Settled before the abort: an aborted task dropped on another
        // worker first would leave a released lease reported `Abandoned`.
        // Past its deadline it was lost before this release: say so.
        if let Some(report) = self.report.upgrade() {
            declare_deadline_passed(&report, &self.holding, self.keys.first(), self.token);
            settle(&report, State::Released);
        }
        self.holding.end();
        if let Some(task) = self.renewal.take() {
            task.abort();
        }
        self.settled = true;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No Tokio runtime to run a task on: release inline.
            return self.keys.release(&self.backend, self.token).await;
        };
        // In a task of its own: this future dropped, or timed out, the
        // release still goes on (until the server's expiry), and an acquire
        // naming this holder waits for it first (ambiguous.rs), so a late
        // release never ends a lease that acquire got back (G6).
        let (backend, keys, token) = (self.backend.clone(), self.keys.clone(), self.token);
        let (answer, answered) = tokio::sync::oneshot::channel();
        let tracked = ambiguous::track(self.keys.as_slice(), &self.holder);
        runtime.spawn(async move {
            let _tracked = tracked;
            // An inner task, so a panic in the driver is caught, and passed
            // on to the caller below.
            let release = tokio::spawn(async move {
                tokio::time::timeout(server_end, keys.release(&backend, token)).await
            });
            let outcome = release.await;
            match &outcome {
                Ok(Ok(Err(error))) => {
                    tracing::warn!(%error, token, "release failed; the lease will expire")
                }
                Ok(Err(_)) => tracing::warn!(token, "release got no answer by the lease's expiry"),
                _ => {}
            }
            let _ = answer.send(outcome);
        });
        let no_answer = || {
            Error::Connection(format!(
                "no answer to the release within {bound:?}; it goes on in the background \
                 until the lease's expiry"
            ))
        };
        match tokio::time::timeout(bound, answered).await {
            Ok(Ok(Ok(Ok(released)))) => released,
            Ok(Ok(Err(failed))) if failed.is_panic() => {
                std::panic::resume_unwind(failed.into_panic())
            }
            _ => Err(no_answer()),
        }
    }
}

/// The later of two cleanup bounds (`granting_until`, `until`).
fn later(bounds: (Instant, Instant), other: Option<(Instant, Instant)>) -> (Instant, Instant) {
    match other {
        Some((granting, until)) => (bounds.0.max(granting), bounds.1.max(until)),
        None => bounds,
    }
}

/// The least time a release is given, even at or past the deadline.
const RELEASE_AT_LEAST: Duration = Duration::from_millis(250);

impl<B: Backend> Drop for Lease<B> {
    fn drop(&mut self) {
        self.holding.end();
        // The state stays Held: a lost() future still running elsewhere
        // reports Abandoned once the renewal task is gone.
        if let Some(task) = self.renewal.take() {
            task.abort();
        }
        if self.settled {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (backend, keys, token) = (self.backend.clone(), self.keys.clone(), self.token);
            // Tracked, so an acquire naming this holder waits for it.
            let tracked = ambiguous::track(keys.as_slice(), &self.holder);
            runtime.spawn(async move {
                let _tracked = tracked;
                if let Err(error) = keys.release(&backend, token).await {
                    let key = keys.first();
                    tracing::warn!(%error, key, token, "release on drop failed; the lease will expire");
                }
            });
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// The renewal task: renews until the lease is lost, or until the guard
/// aborts it (release or drop).
async fn renew<B: Backend>(
    backend: B,
    keys: Keys,
    token: i64,
    options: LeaseOptions,
    mut deadline: Instant,
    state: Arc<watch::Sender<State>>,
    holding: Arc<metrics::Holding>,
) {
    let retry_pause = (options.renew_every / 4).max(Duration::from_millis(10));
    let mut next = Instant::now() + options.renew_every; // validated: well inside the ttl
    let key = keys.first();
    let lose = |reason: LossReason| {
        // Not a loss if a release settled the state first.
        if settle(&state, State::Lost(reason.clone())) {
            report_loss(&holding, key, token, &reason);
        }
    };
    loop {
        tokio::time::sleep_until(next.min(deadline)).await;
        // The guard may have found the deadline passed first, or released.
        if !matches!(*state.borrow(), State::Held { .. }) {
            return;
        }
        let sent = Instant::now();
        if sent >= deadline {
            return lose(LossReason::DeadlinePassed);
        }
        let renew = tracing::Instrument::instrument(
            keys.renew(&backend, token, options.ttl),
            tracing::debug_span!("pg_fence.renew", key = %key, token),
        );
        let renewed = tokio::time::timeout(deadline - sent, renew).await;
        match renewed {
            Ok(Ok(Some(expires_at))) => {
                metrics::renewal(metrics::Renewal::Renewed);
                deadline = sent + options.ttl.saturating_sub(options.safety_margin);
                next = sent + options.renew_every;
                // Not over a release that won the race with this renewal.
                state.send_if_modified(|now| {
                    let held = matches!(now, State::Held { .. });
                    if held {
                        *now = State::Held {
                            deadline,
                            expires_at,
                        };
                    }
                    held
                });
                tracing::trace!(key, token, "pg_fence.renewed");
            }
            Ok(Ok(None)) => {
                metrics::renewal(metrics::Renewal::NotLive);
                return lose(LossReason::NotLive);
            }
            Ok(Err(error @ (Error::NotOwner { .. } | Error::InvalidArgument { .. }))) => {
                metrics::renewal(metrics::Renewal::Refused);
                return lose(LossReason::Refused(error.to_string()));
            }
            // A transient failure: retry while the deadline holds.
            Ok(Err(error)) => {
                metrics::renewal(metrics::Renewal::Error);
                tracing::debug!(key, token, %error, "renew failed; retrying");
                next = Instant::now() + retry_pause;
            }
            Err(_timed_out) => {
                metrics::renewal(metrics::Renewal::Timeout);
                return lose(LossReason::DeadlinePassed);
            }
        }
    }
}

/// Tell the holder's logs and metrics that the lease is lost (once: by
/// whoever settled the state).
fn report_loss(holding: &metrics::Holding, key: &str, token: i64, reason: &LossReason) {
    tracing::warn_span!("pg_fence.lease_lost", key = %key, token, ?reason)
        .in_scope(|| tracing::warn!("lease lost: stop the work it protects"));
    holding.end();
    metrics::lost(reason);
}

/// If the lease is held and its local deadline has passed, it is lost
/// (`DeadlinePassed`): settle that, whoever notices first (the guard, a
/// `lost()` future or the renewal task). A renewal acknowledged in time has
/// moved the deadline already, so only a passed deadline ends it.
fn declare_deadline_passed(
    state: &watch::Sender<State>,
    holding: &metrics::Holding,
    key: &str,
    token: i64,
) -> bool {
    let now = Instant::now();
    let settled = state.send_if_modified(|current| match current {
        State::Held { deadline, .. } if now >= *deadline => {
            *current = State::Lost(LossReason::DeadlinePassed);
            true
        }
        _ => false,
    });
    if settled {
        report_loss(holding, key, token, &LossReason::DeadlinePassed);
    }
    settled
}

/// Sleep until `deadline`, or forever without one.
async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// End the lease's state, once: the first of a release (`Released`) and a
/// loss the renewal task saw (`Lost`) is what holders are told; a renewal
/// task still running when it was aborted cannot overwrite it. True if this
/// call settled it.
fn settle(state: &watch::Sender<State>, end: State) -> bool {
    state.send_if_modified(|now| {
        let held = matches!(now, State::Held { .. });
        if held {
            *now = end;
        }
        held
    })
}

/// How [`run`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RunOutcome<T> {
    /// The key stayed busy for the whole wait: the work did not run.
    Busy,
    /// The work finished before any loss of the lease was reported; the lease
    /// was then released (best-effort: a failed release is logged, and the
    /// lease expires).
    Completed(T),
    /// The lease was lost first, and the work was dropped (cancelled) at
    /// that point; or the work finished after the lease's local deadline, or
    /// the lease was found no longer live at its release. Then the output is
    /// dropped too: the work ran, at least in part, without the lease (a
    /// fenced write under its token was refused, anything else was not).
    Lost(LossReason),
}

/// Run `work` under a lease on `key`: acquire (waiting up to `wait`), run,
/// and race the work against loss of the lease. The work gets the token.
/// Cancel safety: dropping this future drops the work and the lease (which
/// then releases best-effort).
pub async fn run<B, F, Fut, T>(
    backend: &B,
    key: &str,
    options: &LeaseOptions,
    wait: Duration,
    work: F,
) -> Result<RunOutcome<T>, Error>
where
    B: Backend,
    F: FnOnce(i64) -> Fut,
    Fut: Future<Output = T>,
{
    let Some(lease) = Lease::acquire(backend, key, options, wait).await? else {
        return Ok(RunOutcome::Busy);
    };
    let lost = lease.lost();
    tokio::select! {
        // Loss first: when both are ready, the work did not finish in time.
        biased;
        reason = lost => Ok(RunOutcome::Lost(reason)),
        output = work(lease.token()) => {
            // Done, but in time? Past the deadline the lease may be gone
            // whatever the renewal task managed to say (a starved runtime).
            if let Some(reason) = lease.loss() {
                return Ok(RunOutcome::Lost(reason));
            }
            // Report it even if the release fails (the lease then expires);
            // but a release that finds the lease not live (forced, expired
            // on the server) says the work did not finish under it.
            match lease.release().await {
                Ok(true) => Ok(RunOutcome::Completed(output)),
                Ok(false) => {
                    tracing::warn!(key, "the lease was no longer live at release");
                    metrics::lost(&LossReason::NotLive);
                    Ok(RunOutcome::Lost(LossReason::NotLive))
                }
                Err(error) => {
                    tracing::warn!(key, %error, "release after the work failed; the lease will expire");
                    Ok(RunOutcome::Completed(output))
                }
            }
        }
    }
}
