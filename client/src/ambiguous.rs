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

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::Backend;
use crate::lease::Wanted;
use crate::multi::{self, Keys};

/// A running cleanup: told to stop by the flag, awaited through its task.
struct Cleanup {
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
    /// Releasing what an acquire whose replies were lost may have got (not
    /// a guard's release going on in the background).
    after_acquire: bool,
}

/// Running cleanups by (key or semaphore name, holder).
fn cleanups() -> &'static Mutex<HashMap<(String, String), Cleanup>> {
    static CLEANUPS: OnceLock<Mutex<HashMap<(String, String), Cleanup>>> = OnceLock::new();
    CLEANUPS.get_or_init(Default::default)
}

/// Stop what runs in the background for `holder` on what `wanted` names (a
/// key, any permit of a semaphore, or a set of keys), and wait until it
/// has finished what it was doing: a release in flight lands before we go
/// on. True if it stopped the cleanup of an acquire whose replies were
/// lost: the caller's acquire is then a retry of that request, and may
/// take back the lease it may have got (G6).
pub(crate) async fn wait_for_cleanup(wanted: &Wanted, holder: &str) -> bool {
    let (name, permits) = match wanted {
        Wanted::Key(key) => (key.clone(), None),
        Wanted::Permit { name, .. } => (name.clone(), Some(format!("{name}:permit:"))),
        Wanted::All(keys) => (multi::label(keys), None),
    };
    let running: Vec<Cleanup> = {
        let mut registry = cleanups()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let matching: Vec<(String, String)> = registry
            .keys()
            .filter(|(key, id)| {
                id == holder
                    && (*key == name || permits.as_ref().is_some_and(|p| key.starts_with(p)))
            })
            .cloned()
            .collect();
        matching
            .into_iter()
            .filter_map(|entry| registry.remove(&entry))
            .collect()
    };
    let mut resumed = false;
    for cleanup in running {
        cleanup.stop.store(true, Ordering::SeqCst);
        resumed |= cleanup.after_acquire;
        let _ = cleanup.task.await;
    }
    resumed
}

/// Track a release running in `task` for `holder` on `key`, so an acquire
/// naming that holder waits for it ([`wait_for_cleanup`]).
pub(crate) fn track(key: &str, holder: &str, task: JoinHandle<()>) {
    let entry = (key.to_owned(), holder.to_owned());
    let mut registry = cleanups()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Finished ones are dropped as they are found: the registry stays small.
    registry.retain(|_, cleanup| !cleanup.task.is_finished());
    registry.insert(
        entry,
        Cleanup {
            stop: Arc::new(AtomicBool::new(false)),
            task,
            after_acquire: false,
        },
    );
}

/// Release, in the background (if a Tokio runtime is running), whatever
/// lease `holder` may hold on what `wanted` names (a key, a semaphore's
/// permit, a set of keys), trying with backoff until `until`, when any such
/// lease has expired anyway. Its acquire is a newcomer's: it takes nothing
/// from queued waiters; on a free key it takes a fresh lease and releases
/// it.
pub(crate) fn clean_up_after<B: Backend>(
    backend: &B,
    wanted: Wanted,
    ttl: Duration,
    holder: &str,
    until: Instant,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (backend, holder_id) = (backend.clone(), holder.to_owned());
    let name = match &wanted {
        Wanted::Key(key) => key.clone(),
        Wanted::Permit { name, .. } => name.clone(),
        Wanted::All(keys) => multi::label(keys),
    };
    let (task_name, task_stop) = (name.clone(), stop.clone());
    let mut registry = cleanups()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let task = runtime.spawn(async move {
        release_as(
            &backend, &task_name, &wanted, ttl, &holder_id, until, &task_stop,
        )
        .await;
    });
    registry.insert(
        (name, holder.to_owned()),
        Cleanup {
            stop,
            task,
            after_acquire: true,
        },
    );
}

async fn release_as<B: Backend>(
    backend: &B,
    name: &str,
    wanted: &Wanted,
    ttl: Duration,
    holder: &str,
    until: Instant,
    stop: &AtomicBool,
) {
    let mut pause = Duration::from_millis(100);
    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
        let found = match wanted {
            Wanted::Key(key) => backend
                .acquire(key, ttl, holder, Duration::ZERO, true)
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
        };
        match found {
            Ok(Some((keys, grant))) => {
                if let Err(error) = keys.release(backend, grant.token).await {
                    let key = keys.first();
                    tracing::warn!(%error, key, holder, "releasing an unacknowledged lease failed; it will expire");
                }
                break;
            }
            // Held by someone else (or queued for): nothing of ours is.
            Ok(None) => break,
            Err(error) if error.is_ambiguous() => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(error) => {
                tracing::warn!(%error, holder, "cannot release an unacknowledged lease; it will expire");
                break;
            }
        }
    }
    // Done: forget this cleanup, unless a newer one replaced it.
    let mut registry = cleanups()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let key = (name.to_owned(), holder.to_owned());
    if registry
        .get(&key)
        .is_some_and(|cleanup| std::ptr::eq(&*cleanup.stop, stop))
    {
        registry.remove(&key);
    }
}
