//! Releases that outlive the call that asked for them, and what must wait
//! for them. Once the client has given up on an acquire whose replies were
//! lost, a background cleanup acquires as the same holder (the server
//! returns that holder's lease, G6) and releases it, so no lease is left
//! held by nobody; and a `Lease::release` that timed out, or was dropped,
//! goes on in a task. An acquire naming that holder again first stops and
//! waits for both, so neither ever releases a lease that call has just got
//! back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::backend::Backend;
use crate::lease::Wanted;
use crate::multi::Keys;

/// A running cleanup: told to stop by the flag (which also cuts its
/// backoff short), waited for through `done`.
pub(crate) struct Cleanup {
    stop: AtomicBool,
    stopped: Notify,
    done: watch::Sender<bool>,
    /// Releasing what an acquire whose replies were lost may have got (not
    /// a guard's release going on in the background).
    after_acquire: bool,
    /// Its registry keys, distinct and sorted: what it releases.
    keys: Vec<String>,
    /// It releases a shared (reader) lease: an exclusive acquire of the
    /// same key is not a retry of it, nor the other way round.
    shared: bool,
    /// For the cleanup of an unanswered acquire: until when the lost
    /// request could still grant, and until when such a lease lives.
    bounds: Option<(Instant, Instant)>,
}

/// Held by a cleanup's task: dropped when the task ends, however it ends
/// (done, aborted, its runtime shut down), it tells the waiters and takes
/// the cleanup's entries out of the registry. Entries leave the registry
/// only then, so an acquire that stops waiting for a cleanup (cancelled)
/// never makes it invisible to the next one.
pub(crate) struct Finish(Arc<Cleanup>);

impl Drop for Finish {
    fn drop(&mut self) {
        cleanups().retain(|_, entries| {
            entries.retain(|entry| !Arc::ptr_eq(entry, &self.0));
            !entries.is_empty()
        });
        self.0.done.send_replace(true);
    }
}

/// Running cleanups by (key, holder): one entry per key it may release (a
/// multi-key one under each of its keys, a semaphore acquire's under the
/// semaphore's `name:permit:*`), so an acquire finds every cleanup whose
/// keys overlap its own.
type Registry = HashMap<(String, String), Vec<Arc<Cleanup>>>;

fn cleanups() -> std::sync::MutexGuard<'static, Registry> {
    static CLEANUPS: OnceLock<Mutex<Registry>> = OnceLock::new();
    CLEANUPS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The registry keys of what `wanted` names, distinct and sorted.
fn entries(wanted: &Wanted) -> Vec<String> {
    let mut keys = match wanted {
        Wanted::Key(key) => vec![key.clone()],
        Wanted::Permit { name, .. } => vec![format!("{name}:permit:*")],
        Wanted::All(keys) => keys.clone(),
        Wanted::Shared(key) => vec![key.clone()],
    };
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Wait for what runs in the background for `holder` on any key `wanted`
/// names (a key, any permit of a semaphore, or a set of keys): a release
/// in flight lands before we go on. The cleanup of an unanswered acquire of
/// the very same target is stopped first, and this returns true: the
/// caller's acquire is a retry of that request, and may take back the
/// lease it may have got (G6). One of another target that shares keys
/// (a single key of this set, say) is left to finish: this acquire could
/// not take its lease back (a multi-key G6 needs every key), so the
/// cleanup releases it, and this acquire then finds the key free.
///
/// Returns the stopped cleanup's bounds, if it stopped one: the caller must
/// start it again ([`clean_up_after`]) unless its own acquire ends with the
/// lease ([`Rearm`]).
pub(crate) async fn wait_for_cleanup(wanted: &Wanted, holder: &str) -> Resumed {
    let wanted_keys = entries(wanted);
    let shared = matches!(wanted, Wanted::Shared(_));
    let permits = match wanted {
        Wanted::Permit { name, .. } => Some(format!("{name}:permit:")),
        _ => None,
    };
    let mut resumed = Resumed {
        bounds: None,
        resuming: None,
    };
    let running: Vec<Arc<Cleanup>> = {
        let mut registry = cleanups();
        let mut distinct: Vec<Arc<Cleanup>> = Vec::new();
        for ((key, id), cleanups) in registry.iter() {
            let overlaps = id == holder
                && (wanted_keys.contains(key)
                    || permits.as_ref().is_some_and(|p| key.starts_with(p)));
            for cleanup in cleanups.iter().filter(|_| overlaps) {
                if !distinct.iter().any(|c| Arc::ptr_eq(c, cleanup)) {
                    distinct.push(cleanup.clone());
                }
            }
        }
        // Only one acquire resumes a lost request: the one that stops its
        // cleanup. It is itself waited for, until it ends, by any other
        // acquire naming that holder, which could otherwise have its own
        // fresh lease adopted by the resumer, or adopt the lost one too.
        for cleanup in &distinct {
            if cleanup.after_acquire
                && cleanup.keys == wanted_keys
                && cleanup.shared == shared
                && !cleanup.stop.swap(true, Ordering::SeqCst)
            {
                if let Some((granting, until)) = cleanup.bounds {
                    resumed.bounds = Some(match resumed.bounds {
                        Some((g, u)) => (g.max(granting), u.max(until)),
                        None => (granting, until),
                    });
                }
            }
        }
        if resumed.bounds.is_some() {
            resumed.resuming = Some(register_in(
                &mut registry,
                wanted_keys.clone(),
                holder,
                None,
                shared,
            ));
        }
        distinct
    };
    for cleanup in running {
        if cleanup.stop.load(Ordering::SeqCst) {
            cleanup.stopped.notify_one();
        }
        let mut done = cleanup.done.subscribe();
        let _ = done.wait_for(|done| *done).await;
    }
    resumed
}

/// What [`wait_for_cleanup`] found: the bounds of the lost request this
/// acquire resumes, if it does (it must start the cleanup again unless it
/// gets the lease: [`Rearm`]), and the entry other acquires wait on while
/// it does (held until the acquire ends).
pub(crate) struct Resumed {
    pub(crate) bounds: Option<(Instant, Instant)>,
    pub(crate) resuming: Option<Finish>,
}

/// A new cleanup of `keys` for `holder`, registered under each key; its
/// task must hold the returned [`Finish`] until it ends.
fn register(
    keys: Vec<String>,
    holder: &str,
    bounds: Option<(Instant, Instant)>,
    shared: bool,
) -> Finish {
    register_in(&mut cleanups(), keys, holder, bounds, shared)
}

/// [`register`] with the registry already locked.
fn register_in(
    registry: &mut Registry,
    keys: Vec<String>,
    holder: &str,
    bounds: Option<(Instant, Instant)>,
    shared: bool,
) -> Finish {
    let cleanup = Arc::new(Cleanup {
        stop: AtomicBool::new(false),
        stopped: Notify::new(),
        done: watch::channel(false).0,
        after_acquire: bounds.is_some(),
        keys,
        shared,
        bounds,
    });
    for key in &cleanup.keys {
        registry
            .entry((key.clone(), holder.to_owned()))
            .or_default()
            .push(cleanup.clone());
    }
    Finish(cleanup)
}

/// Held by an acquire that stopped the cleanup of its holder's unanswered
/// acquire to retry it: unless the acquire ends with the lease
/// ([`Rearm::disarm`]), dropping it (an error, "busy", a cancel) starts the
/// cleanup again, so the lost request's lease is never left to nobody.
pub(crate) struct Rearm<B: Backend> {
    pub(crate) backend: B,
    pub(crate) wanted: Wanted,
    pub(crate) ttl: Duration,
    pub(crate) holder: String,
    pub(crate) bounds: Option<(Instant, Instant)>,
    /// The entry other acquires of this holder wait on meanwhile; dropped
    /// after `drop` has started the cleanup again, if it does.
    pub(crate) _resuming: Option<Finish>,
}

impl<B: Backend> Rearm<B> {
    /// The acquire got the lease (or started a cleanup of its own, with
    /// these bounds folded in): nothing to start again.
    pub(crate) fn disarm(&mut self) -> Option<(Instant, Instant)> {
        self.bounds.take()
    }
}

impl<B: Backend> Drop for Rearm<B> {
    fn drop(&mut self) {
        if let Some(bounds) = self.bounds.take() {
            clean_up_after(
                &self.backend,
                self.wanted.clone(),
                self.ttl,
                &self.holder,
                bounds,
            );
        }
    }
}

/// Register a release about to run in the background for `holder` on
/// `keys` (a guard's keys), so an acquire naming that holder on any of them
/// waits for it ([`wait_for_cleanup`]). Move the [`Finish`] into the task.
pub(crate) fn track(keys: &[String], holder: &str) -> Finish {
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    keys.dedup();
    register(keys, holder, None, false)
}

/// Release, in the background (if a Tokio runtime is running), whatever
/// lease `holder` may hold on what `wanted` names (a key, a semaphore's
/// permit, a set of keys), trying with backoff until `until`, when any such
/// lease has expired anyway; finding none is final only once the lost
/// request can no longer grant (`granting_until`, the end of its wait). Its acquire is a newcomer's: it takes nothing
/// from queued waiters; on a free key it takes a fresh lease and releases
/// it.
pub(crate) fn clean_up_after<B: Backend>(
    backend: &B,
    wanted: Wanted,
    ttl: Duration,
    holder: &str,
    (granting_until, until): (Instant, Instant),
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let shared = matches!(wanted, Wanted::Shared(_));
    let finish = register(
        entries(&wanted),
        holder,
        Some((granting_until, until)),
        shared,
    );
    let (backend, holder) = (backend.clone(), holder.to_owned());
    runtime.spawn(async move {
        release_as(
            &backend,
            &wanted,
            ttl,
            &holder,
            (granting_until, until),
            &finish.0,
        )
        .await;
        drop(finish);
    });
}

async fn release_as<B: Backend>(
    backend: &B,
    wanted: &Wanted,
    ttl: Duration,
    holder: &str,
    (granting_until, until): (Instant, Instant),
    cleanup: &Arc<Cleanup>,
) {
    let mut pause = Duration::from_millis(100);
    let backoff = |pause: &mut Duration| {
        let now = *pause;
        *pause = (*pause * 2).min(Duration::from_secs(2));
        now
    };
    while Instant::now() < until && !cleanup.stop.load(Ordering::SeqCst) {
        let request = async {
            match wanted {
                Wanted::Key(key) => backend
                    .acquire_lease(key, ttl, holder, Duration::ZERO, true)
                    .await
                    .map(|grant| grant.map(|grant| (Keys::one(key.clone()), grant))),
                Wanted::Permit { name, permits } => backend
                    .acquire_permit(name, *permits, ttl, holder, Duration::ZERO, true)
                    .await
                    .map(|grant| grant.map(|(key, grant)| (Keys::one(key), grant))),
                Wanted::All(keys) => backend
                    .acquire_all(keys, ttl, holder, Duration::ZERO, true)
                    .await
                    .map(|grant| grant.map(|(keys, grant)| (Keys::all(keys), grant))),
                Wanted::Shared(key) => backend
                    .acquire_shared(key, ttl, holder, Duration::ZERO, true)
                    .await
                    .map(|grant| grant.map(|grant| (Keys::shared(key.clone()), grant))),
            }
        };
        // No request outlives the lease it looks for, and a stop ends it.
        let left = until.saturating_duration_since(Instant::now());
        let found = tokio::select! {
            found = tokio::time::timeout(left, request) => match found {
                Ok(found) => found,
                Err(_) => break,
            },
            _ = cleanup.stopped.notified() => break,
        };
        let pause_now = match found {
            Ok(Some((keys, grant))) => {
                if let Err(error) = keys.release(backend, grant.token).await {
                    let key = keys.first();
                    tracing::warn!(%error, key, holder, "releasing an unacknowledged lease failed; it will expire");
                    break;
                }
                // Released; but the lost request may still be waiting in the
                // server and grant later (until its wait runs out, or the
                // server notices its client is gone): look again until then.
                if Instant::now() >= granting_until {
                    break;
                }
                backoff(&mut pause)
            }
            // Held by someone else (or queued for): nothing of ours is, as
            // far as the server can tell now; look again while the lost
            // request could still grant.
            Ok(None) if Instant::now() < granting_until => backoff(&mut pause),
            Ok(None) => break,
            Err(error) if error.is_ambiguous() || matches!(error, crate::Error::Pool(_)) => {
                backoff(&mut pause)
            }
            Err(error) => {
                tracing::warn!(%error, holder, "cannot release an unacknowledged lease; it will expire");
                break;
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause_now) => {}
            _ = cleanup.stopped.notified() => break,
        }
    }
}
