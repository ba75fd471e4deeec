//! A client backend with faults, for the tests of the client's retries and
//! cleanups: it forwards every call to a real backend, and can lose the
//! replies of acquires that reached the server (the first one, or all of
//! them until a moment), refuse the first acquire without sending it (no
//! pooled connection), or delay releases.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pg_fence_client::{Backend, Error, Grant, LeaseInfo};

/// Which acquire call a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// `Backend::acquire_lease`, one key.
    Key,
    /// `Backend::acquire_permit`, a semaphore's permit.
    Permit,
    /// `Backend::acquire_all`, a multi-key lease.
    All,
    /// `Backend::acquire_shared`, a shared (reader) lease.
    Shared,
}

#[derive(Clone, Copy)]
enum Fault {
    None,
    /// Lose the reply of the first affected acquire.
    LoseFirstReply,
    /// Lose every affected acquire's reply until then.
    LoseRepliesUntil(Instant),
    /// The first affected acquire gets no pooled connection: nothing sent.
    NoConnectionFirst,
}

/// A backend forwarding to `inner`, with one fault (see the constructors).
#[derive(Clone)]
pub struct Faulty<B> {
    inner: B,
    fault: Fault,
    kinds: &'static [Acquire],
    release_delay: Duration,
    fired: Arc<AtomicBool>,
}

impl<B: Backend> Faulty<B> {
    /// No fault yet: every acquire kind affected by the one chosen next.
    pub fn new(inner: B) -> Faulty<B> {
        Faulty {
            inner,
            fault: Fault::None,
            kinds: &[Acquire::Key, Acquire::Permit, Acquire::All],
            release_delay: Duration::ZERO,
            fired: Arc::default(),
        }
    }

    /// Only these acquire calls are affected.
    pub fn only(mut self, kinds: &'static [Acquire]) -> Faulty<B> {
        self.kinds = kinds;
        self
    }

    /// The first affected acquire reaches the server, and its reply is
    /// lost (a connection error instead).
    pub fn lose_first_reply(mut self) -> Faulty<B> {
        self.fault = Fault::LoseFirstReply;
        self
    }

    /// Every affected acquire reaches the server, and its reply is lost,
    /// until `until` (a restart or a failover, seen from the client).
    pub fn lose_replies_until(mut self, until: Instant) -> Faulty<B> {
        self.fault = Fault::LoseRepliesUntil(until);
        self
    }

    /// The first affected acquire gets no pooled connection
    /// (`Error::Pool`): nothing is sent.
    pub fn no_connection_first(mut self) -> Faulty<B> {
        self.fault = Fault::NoConnectionFirst;
        self
    }

    /// Releases reach the server after `delay`.
    pub fn slow_release(mut self, delay: Duration) -> Faulty<B> {
        self.release_delay = delay;
        self
    }

    /// Whether the fault has happened at least once.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    fn affects(&self, kind: Acquire) -> bool {
        self.kinds.contains(&kind)
    }

    /// Before sending: `Some` to answer instead, without sending.
    fn before(&self, kind: Acquire) -> Option<Error> {
        match self.fault {
            Fault::NoConnectionFirst
                if self.affects(kind) && !self.fired.swap(true, Ordering::SeqCst) =>
            {
                Some(Error::Pool("timed out waiting for a connection".into()))
            }
            _ => None,
        }
    }

    /// After the server answered `outcome`: a lost reply instead, or it.
    fn after<T>(&self, kind: Acquire, outcome: Result<T, Error>) -> Result<T, Error> {
        let outcome = outcome?;
        let lost = self.affects(kind)
            && match self.fault {
                Fault::LoseFirstReply => !self.fired.swap(true, Ordering::SeqCst),
                Fault::LoseRepliesUntil(until) if Instant::now() < until => {
                    self.fired.store(true, Ordering::SeqCst);
                    true
                }
                _ => false,
            };
        if lost {
            return Err(Error::Connection(
                "connection reset before the reply".into(),
            ));
        }
        Ok(outcome)
    }
}

impl<B: Backend> Backend for Faulty<B> {
    async fn acquire_lease(
        &self,
        key: &str,
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<Grant>, Error> {
        if let Some(error) = self.before(Acquire::Key) {
            return Err(error);
        }
        let outcome = self
            .inner
            .acquire_lease(key, ttl, holder, wait, adopt)
            .await;
        self.after(Acquire::Key, outcome)
    }

    async fn acquire_shared(
        &self,
        key: &str,
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<Grant>, Error> {
        if let Some(error) = self.before(Acquire::Shared) {
            return Err(error);
        }
        let outcome = self
            .inner
            .acquire_shared(key, ttl, holder, wait, adopt)
            .await;
        self.after(Acquire::Shared, outcome)
    }

    async fn acquire_permit(
        &self,
        name: &str,
        permits: i32,
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<(String, Grant)>, Error> {
        if let Some(error) = self.before(Acquire::Permit) {
            return Err(error);
        }
        let outcome = self
            .inner
            .acquire_permit(name, permits, ttl, holder, wait, adopt)
            .await;
        self.after(Acquire::Permit, outcome)
    }

    async fn acquire_all(
        &self,
        keys: &[String],
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<(Vec<String>, Grant)>, Error> {
        if let Some(error) = self.before(Acquire::All) {
            return Err(error);
        }
        let outcome = self.inner.acquire_all(keys, ttl, holder, wait, adopt).await;
        self.after(Acquire::All, outcome)
    }

    async fn renew_all(
        &self,
        keys: &[String],
        token: i64,
        ttl: Duration,
    ) -> Result<Option<SystemTime>, Error> {
        self.inner.renew_all(keys, token, ttl).await
    }

    async fn release_all(&self, keys: &[String], token: i64) -> Result<bool, Error> {
        tokio::time::sleep(self.release_delay).await;
        self.inner.release_all(keys, token).await
    }

    async fn watch(
        &self,
        key: &str,
        known: Option<i64>,
        wait: Duration,
    ) -> Result<Option<LeaseInfo>, Error> {
        self.inner.watch(key, known, wait).await
    }

    async fn renew(
        &self,
        key: &str,
        token: i64,
        ttl: Duration,
    ) -> Result<Option<SystemTime>, Error> {
        self.inner.renew(key, token, ttl).await
    }

    async fn release(&self, key: &str, token: i64) -> Result<bool, Error> {
        tokio::time::sleep(self.release_delay).await;
        self.inner.release(key, token).await
    }
}
