//! Term history (issue 14): for the keys someone asked it for, every
//! exclusive grant is kept as a term, so an observer that looks now and
//! then still sees every leadership in order, however short, and can tell
//! when it missed one.
//!
//! `fence.lock_keep_history(lock_key, keep)` lists the key in
//! `fence.history_keys`. From then on each grant's own statement
//! (plans.rs, `keeping_history`) writes its term into `fence.terms`, with
//! the token of the term before it on the key (`previous_token`), and
//! drops the key's terms older than `keep`; the newest term always stays.
//! `fence.lock_history(lock_key, after_token, wait)` returns the kept terms
//! after a token in order, waiting inside the server, as `lock_watch` does,
//! until there is one. Terms chain: each names its predecessor, so a
//! reader that knows token `t` has missed nothing exactly when the first
//! term it reads names `t` as its previous one.
//!
//! The registration takes the key's lock in share mode until it commits:
//! a grant in flight finishes first (and is the token returned), and every
//! later grant runs its statement after the registration committed, so it
//! sees it and keeps its term. The chain is therefore complete from the
//! returned token on.

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::spi::Spi;

use crate::acquire::uses_transaction_snapshot;
use crate::args::{non_negative, required};
use crate::errors::{fail, Failure, FenceError};
use crate::key::check_key;
use crate::probe;
use crate::roles::{caller_role, is_fence_admin, refuse_security_restricted, role_name};
use crate::wait;
use crate::watch::{self, Counted, WATCH_RECHECK_MS};

/// One kept term: an exclusive lease granted on the key.
pub struct Term {
    pub token: i64,
    /// The token of the term before it on the key; `None` if the key had
    /// no lease row then (its first grant, or after a sweep).
    pub previous_token: Option<i64>,
    pub holder: String,
    pub acquired_at: TimestampWithTimeZone,
}

/// `fence.lock_keep_history(lock_key, keep)`: keep the key's terms for
/// `keep` from now on. Any role may start keeping a key's terms or lengthen
/// the keep (a call with a shorter one leaves it as it is, so one observer
/// never shortens another's history); NULL or a `keep` of zero stops
/// keeping them and drops the kept ones, which only the role that started
/// it or a member of fence_admin may do. Returns the key's latest token
/// (NULL: it has none), from which the history is complete.
pub fn keep(lock_key: Option<&str>, keep: Option<Interval>) -> Result<Option<i64>, Failure> {
    const F: &str = "lock_keep_history";
    refuse_security_restricted(F)?;
    let key = check_key(F, lock_key)?;
    let keep_micros = match &keep {
        Some(keep) => non_negative(F, "keep", keep)?,
        None => 0,
    };
    // Until this transaction ends: no sweep runs while the registration is
    // in flight (it could delete the key's row from a snapshot that does
    // not see the registration), and no grant of the key is in flight
    // (none can miss it; see the module's note).
    crate::keylock::sweep_lock(false, true);
    crate::keylock::share(key);
    let role = caller_role();
    Spi::connect_mut(|client| -> Result<(), Failure> {
        if keep_micros == 0 {
            let owner = client
                .update(
                    "SELECT owner_role::oid FROM fence.history_keys WHERE lock_key = $1",
                    Some(1),
                    &[key.into()],
                )?
                .first()
                .get::<pg_sys::Oid>(1)?;
            let Some(owner) = owner else {
                return Ok(());
            };
            if owner != role && !is_fence_admin(role) {
                return fail(FenceError::NotHistoryOwner {
                    lock_key: key.to_owned(),
                    owner: role_name(owner),
                    caller: role_name(role),
                });
            }
            client.update(
                "DELETE FROM fence.history_keys WHERE lock_key = $1",
                None,
                &[key.into()],
            )?;
            client.update(
                "DELETE FROM fence.terms WHERE lock_key = $1",
                None,
                &[key.into()],
            )?;
        } else {
            client.update(
                "INSERT INTO fence.history_keys AS h (lock_key, keep, owner_role) \
                 VALUES ($1, $2, $3::oid::regrole) \
                 ON CONFLICT (lock_key) DO UPDATE SET keep = GREATEST(h.keep, EXCLUDED.keep)",
                None,
                &[key.into(), keep.into(), role.into()],
            )?;
        }
        Ok(())
    })?;
    // The latest committed token, whatever the isolation level: the grants
    // before it are not kept, every one after it is.
    // SAFETY: inside a transaction (every pg_extern is), outside any scan.
    unsafe { pg_sys::CommandCounterIncrement() };
    Ok(probe::lease_row(key, probe::Snapshot::Latest, false)?.map(|row| row.token))
}

/// `fence.lock_history(lock_key, after_token, wait)`: the key's kept terms
/// after `after_token` (NULL: all), oldest first; if there are none yet,
/// waits for the next grant of the key, for at most `wait`.
pub fn history(
    lock_key: Option<&str>,
    after_token: Option<i64>,
    wait: Option<Interval>,
) -> Result<Vec<Term>, Failure> {
    const F: &str = "lock_history";
    let key = check_key(F, lock_key)?;
    let wait_micros = non_negative(F, "wait", &required(F, "wait", wait)?)?;
    if wait_micros > 0 && uses_transaction_snapshot() {
        return fail(FenceError::HistoryWaitNeedsReadCommitted {
            lock_key: key.to_owned(),
        });
    }
    // Statements of their own (`update`: a fresh snapshot in READ
    // COMMITTED, which sees what committed while we waited).
    let kept = || {
        Spi::connect_mut(|client| -> Result<(), Failure> {
            let kept = client.update(
                "SELECT FROM fence.history_keys WHERE lock_key = $1",
                Some(1),
                &[key.into()],
            )?;
            if kept.is_empty() {
                return fail(FenceError::HistoryNotKept {
                    lock_key: key.to_owned(),
                });
            }
            Ok(())
        })
    };
    kept()?;
    if wait_micros > 0 {
        wait_for_term(key, after_token, wait_micros)?;
        kept()?;
    }
    Spi::connect_mut(|client| {
        let rows = client.update(
            "SELECT t.token, t.previous_token, t.holder, t.acquired_at FROM fence.terms AS t \
              WHERE t.lock_key = $1 AND ($2::bigint IS NULL OR t.token > $2) ORDER BY t.token",
            None,
            &[key.into(), after_token.into()],
        )?;
        let mut terms = Vec::with_capacity(rows.len());
        for row in rows {
            let missing = || FenceError::internal("a NULL in fence.terms".into()).here();
            terms.push(Term {
                token: row.get::<i64>(1)?.ok_or_else(missing)?,
                previous_token: row.get::<i64>(2)?,
                holder: row.get::<String>(3)?.ok_or_else(missing)?,
                acquired_at: row.get::<TimestampWithTimeZone>(4)?.ok_or_else(missing)?,
            });
        }
        Ok(terms)
    })
}

/// Sleep until a term after `after_token` is kept, or for `wait_micros`.
/// Woken as a watcher is, by every grant's commit (wait.rs); a missed
/// wake-up costs at most [`WATCH_RECHECK_MS`]. A grant that kept no term
/// (one before the history was kept again) does not end the wait: the
/// next kept term, naming it as its previous one, shows the gap.
fn wait_for_term(key: &str, after_token: Option<i64>, wait_micros: i128) -> Result<(), Failure> {
    let now = watch::now_micros;
    let deadline = now().saturating_add(i64::try_from(wait_micros).unwrap_or(i64::MAX));
    let event = wait::watch_event_for(key);
    let _counted = Counted::enter();
    loop {
        // Before the look: a grant that commits after it sets our latch.
        wait::reset_latch();
        wait::advertise(event);
        let kept_since = Spi::connect_mut(|client| -> Result<bool, Failure> {
            Ok(client
                .update(
                    "SELECT EXISTS (SELECT FROM fence.terms AS t \
                      WHERE t.lock_key = $1 AND ($2::bigint IS NULL OR t.token > $2))",
                    None,
                    &[key.into(), after_token.into()],
                )?
                .first()
                .get::<bool>(1)?
                .unwrap_or(false))
        })?;
        // The statement may have waited, which clears our advertisement.
        if !wait::advertising(event) {
            continue;
        }
        let at = now();
        if kept_since || at >= deadline {
            break;
        }
        let until = deadline.min(at.saturating_add(WATCH_RECHECK_MS * 1000));
        wait::sleep(event, (until.saturating_sub(at) + 999) / 1000);
    }
    wait::stop_advertising();
    Ok(())
}
