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
