//! Leader election on one key: campaign (a lease whose token is the term),
//! who leads now, and a stream of leadership changes built on
//! `fence.lock_watch`.

use std::collections::VecDeque;
use std::time::Duration;

use crate::backend::Backend;
use crate::{watch, Error, Lease, LeaseInfo, LeaseOptions, Term};

/// An election: candidates campaign for the lease on `key`; the leader is
/// whoever holds it, and its term is the lease's fencing token, which only
/// increases from one leader to the next (G1). Two leaders at once are
/// impossible (G2), a paused leader's writes under an old term are refused
/// by fenced tables (G3), and a leader learns that it lost leadership from
/// its guard ([`Lease::lost`]). Resigning is releasing the guard.
///
/// ```no_run
/// # async fn example(pool: deadpool_postgres::Pool) -> Result<(), pg_fence_client::Error> {
/// use pg_fence_client::{Election, LeaseOptions};
///
/// let election = Election::new("scheduler:leader");
/// let leader = election.campaign(&pool, &LeaseOptions::default().holder("node-a")).await?;
/// println!("leading in term {}", leader.token());
/// leader.release().await?; // resign
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Election {
    key: String,
}

impl Election {
    /// The election held on `key`.
    pub fn new(key: impl Into<String>) -> Election {
        Election { key: key.into() }
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Campaign until this candidate leads: waits inside the server (in
    /// arrival order among candidates, preload mode), as long as it takes,
    /// and returns the lease guard: renewed in the background, its token
    /// the term. A lease its holder id already has (this node before a
    /// restart, or another guard with the same id) is not taken over: the
    /// campaign waits for it to end, as for anyone else's. Cancel safety:
    /// as [`Lease::acquire`]; a lease granted to a dropped campaign expires
    /// after its ttl.
    pub async fn campaign<B: Backend>(
        &self,
        backend: &B,
        options: &LeaseOptions,
    ) -> Result<Lease<B>, Error> {
        // In rounds of a minute, so a pooled connection is not held for
        // ever by one statement.
        let round = Duration::from_secs(60);
        loop {
            match Lease::acquire(backend, &self.key, options, round).await {
                Ok(Some(lease)) => return Ok(lease),
                Ok(None) => {}
                Err(Error::HolderInUse { .. }) => {
                    if let Some(lease) = watch(backend, &self.key, None, Duration::ZERO).await? {
                        watch(backend, &self.key, Some(lease.token), round).await?;
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Who leads now, and in which term (`None`: nobody).
    pub async fn leader<B: Backend>(&self, backend: &B) -> Result<Option<LeaseInfo>, Error> {
        watch(backend, &self.key, None, Duration::ZERO).await
    }

    /// The leadership changes, in order: [`Observer::next`] first answers
    /// with the leadership as it is, then with each change, "no leader"
    /// included, however short the leadership in between: the observer
    /// keeps the key's term history (`fence.lock_keep_history`, for an
    /// hour; [`Observer::keep`] says otherwise) and reads it, so it misses
    /// nothing unless it falls further behind than that
    /// ([`Error::Lagged`]). Terms only increase.
    pub fn observe<B: Backend>(&self, backend: &B) -> Observer<B> {
        Observer {
            backend: backend.clone(),
            key: self.key.clone(),
            keep: Duration::from_secs(3600),
            state: State::Start,
            pending: VecDeque::new(),
            lag_reported: None,
        }
    }
}

/// Leadership changes of an [`Election`], one [`Observer::next`] at a time.
///
/// Each answer differs from the one before, and they alternate: a leader
/// (`Some`, a higher term each time), then `None` once it no longer leads
/// (released, forced, expired), then the next leader. Every term is
/// reported, in order, however short: the observer reads the key's term
/// history, which every grant of the key writes once the first call has
/// asked for it to be kept (so terms before that first call are not
/// reported). So a `None` or a leader may be reported after the fact (the
/// term's `acquired_at` says when it began); a caller that acts on
/// "who leads now" asks [`Election::leader`]. A term whose history was
/// dropped before the observer read it (it fell behind by more than
/// [`Observer::keep`]) is reported as [`Error::Lagged`], once, before the
/// oldest term still kept. Each call holds one pooled connection while it
/// waits; it needs the primary (keeping history writes).
pub struct Observer<B: Backend> {
    backend: B,
    key: String,
    keep: Duration,
    state: State,
    /// Terms read from the history and not yet reported, oldest first.
    pending: VecDeque<Term>,
    /// The term a gap before it was reported for.
    lag_reported: Option<i64>,
}

/// What the last answer was.
#[derive(Debug, Clone, Copy)]
enum State {
    /// No answer yet.
    Start,
    /// A leader, in this term.
    Leading(i64),
    /// Nobody, after this term (`None`: the key never had a lease).
    Idle(Option<i64>),
}

impl<B: Backend> Observer<B> {
    /// Keep the key's history this long (an hour unless set; from the
    /// first call on). An observer that looks less often than this may
    /// miss terms, and says so ([`Error::Lagged`]).
    pub fn keep(mut self, keep: Duration) -> Observer<B> {
        self.keep = keep.max(Duration::from_millis(1));
        self
    }

    /// The next leadership: at once on the first call, then as soon as it
    /// changes (or from the history, if it changed since). Cancel safe: a
    /// call dropped before its answer reports nothing, and the next call
    /// answers from the last answer given.
    pub async fn next(&mut self) -> Result<Option<Term>, Error> {
        let round = Duration::from_secs(60);
        match self.state {
            State::Start => {
                let latest = self.backend.keep_history(&self.key, self.keep).await?;
                let now = watch(&self.backend, &self.key, None, Duration::ZERO).await?;
                match now {
                    // The leader the history starts after.
                    Some(lease) if Some(lease.token) == latest => {
                        self.state = State::Leading(lease.token);
                        Ok(Some(Term {
                            key: lease.key,
                            holder: lease.holder,
                            token: lease.token,
                            previous_token: None,
                            acquired_at: lease.acquired_at,
                        }))
                    }
                    // Nobody; or a leader granted since the history began
                    // (read from it, with any term before it).
                    now => {
                        self.state = State::Idle(latest);
                        match now {
                            None => Ok(None),
                            Some(_) => Box::pin(self.next()).await,
                        }
                    }
                }
            }
            State::Leading(term) => {
                // A later term is known: this one has ended.
                if self.pending.is_empty() {
                    loop {
                        let now = watch(&self.backend, &self.key, Some(term), round).await?;
                        if now.map(|lease| lease.token) != Some(term) {
                            break;
                        }
                    }
                }
                self.state = State::Idle(Some(term));
                Ok(None)
            }
            State::Idle(after) => {
                while self.pending.is_empty() {
                    match self.backend.history(&self.key, after, round).await {
                        Ok(terms) => self.pending.extend(terms),
                        // Someone stopped keeping the history (55000): keep
                        // it again; a term granted meanwhile shows as a gap
                        // (Lagged) when the next kept term names it.
                        Err(error) if error.sqlstate() == Some("55000") => {
                            self.backend.keep_history(&self.key, self.keep).await?;
                        }
                        Err(error) => return Err(error),
                    }
                }
                let next = self.pending.front().expect("not empty");
                if next.previous_token != after && self.lag_reported != Some(next.token) {
                    self.lag_reported = Some(next.token);
                    return Err(Error::Lagged {
                        key: self.key.clone(),
                        after,
                        resumed: next.token,
                    });
                }
                let next = self.pending.pop_front().expect("not empty");
                self.state = State::Leading(next.token);
                Ok(Some(next))
            }
        }
    }
}
