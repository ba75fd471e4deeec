//! Every SQL text the client sends, in one place. Durations travel as
//! milliseconds and become intervals on the server (G5: the client never
//! sends a timestamp).

/// `$1` key, `$2` ttl ms, `$3` holder, `$4` wait ms. One row: the token and
/// the lease's remaining time by the server's clock, or NULLs if not granted.
pub const ACQUIRE: &str = "SELECT l.token, \
        (extract(epoch FROM l.expires_at - clock_timestamp()) * 1000)::bigint AS remaining_ms \
   FROM fence.lock_acquire($1, make_interval(secs => $2::float8 / 1000), $3, \
                           make_interval(secs => $4::float8 / 1000)) AS l";

/// `$1` key, `$2` token, `$3` ttl ms: true while the lease was live.
pub const RENEW: &str =
    "SELECT fence.lock_renew($1, $2, make_interval(secs => $3::float8 / 1000)) IS NOT NULL";

/// `$1` key, `$2` token.
pub const RELEASE: &str = "SELECT fence.lock_release($1, $2)";

/// Attach a lease's token to the current transaction, for writes to tables
/// under `fence.protect()` without a token column. `$1` the token as text.
pub const SET_FENCE_TOKEN: &str = "SELECT set_config('fence.token', $1, true)";

/// Session advisory locks. `$1` the key (bigint).
pub const ADVISORY_LOCK: &str = "SELECT pg_advisory_lock($1)";
/// `$1` the key: true if taken.
pub const ADVISORY_TRY_LOCK: &str = "SELECT pg_try_advisory_lock($1)";
/// `$1` the key: true if it was held.
pub const ADVISORY_UNLOCK: &str = "SELECT pg_advisory_unlock($1)";
/// Transaction advisory locks, released at COMMIT or ROLLBACK. `$1` the key.
pub const ADVISORY_XACT_LOCK: &str = "SELECT pg_advisory_xact_lock($1)";
/// `$1` the key: true if taken.
pub const ADVISORY_XACT_TRY_LOCK: &str = "SELECT pg_try_advisory_xact_lock($1)";
/// Run on a connection before it waits for a session advisory lock: the
/// lock wait gives up (55P03) after `$1` ms (0: never), and the server
/// notices within 100 ms if the client went away mid-wait, so an abandoned
/// wait never turns into a lock held by nobody.
pub const ADVISORY_PREPARE_WAIT: &str = "SELECT set_config('lock_timeout', $1, false), \
        set_config('client_connection_check_interval', '100ms', false)";
/// Undo [`ADVISORY_PREPARE_WAIT`] before the connection goes back to the pool.
pub const ADVISORY_RESET_WAIT: &str = "RESET lock_timeout; RESET client_connection_check_interval";

/// Claim a run-once operation key in the current transaction. `$1` the key:
/// true if this transaction is the one to do the work.
pub const CLAIM_OPERATION: &str = "SELECT fence.claim_operation($1)";
