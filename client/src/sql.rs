//! Every SQL text the client sends, in one place. Durations travel as
//! milliseconds and become intervals on the server (G5: the client never
//! sends a timestamp).

/// `$1` key, `$2` ttl ms, `$3` holder, `$4` wait ms, `$5` adopt. One row:
/// the token, the time from the statement's start to the lease's expiry (so
/// that adding it to the client's send time, which is earlier, errs on the
/// safe side even after a long wait) and the expiry (Unix seconds), both by
/// the server's clock; or NULLs if not granted.
///
/// `fence._lock_acquire` is `lock_acquire` with `adopt`: false (a first
/// attempt) refuses the holder's own live lease with `FN002` instead of
/// giving it back (G6), in the server's attempt itself; only a retry of
/// the request that got a lease may adopt it.
pub const ACQUIRE: &str = "SELECT l.token, \
        (extract(epoch FROM l.expires_at - statement_timestamp()) * 1000)::bigint AS remaining_ms, \
        extract(epoch FROM l.expires_at)::float8 AS expires_at \
   FROM fence._lock_acquire($1, make_interval(secs => $2::float8 / 1000), $3, \
                            make_interval(secs => $4::float8 / 1000), $5) AS l";

/// As [`ACQUIRE`], for a shared (reader) lease: `fence._lock_acquire_shared`.
pub const ACQUIRE_SHARED: &str = "SELECT l.token, \
        (extract(epoch FROM l.expires_at - statement_timestamp()) * 1000)::bigint AS remaining_ms, \
        extract(epoch FROM l.expires_at)::float8 AS expires_at \
   FROM fence._lock_acquire_shared($1, make_interval(secs => $2::float8 / 1000), $3, \
                                   make_interval(secs => $4::float8 / 1000), $5) AS l";

/// `$1` semaphore name, `$2` permits, `$3` ttl ms, `$4` holder, `$5` wait
/// ms, `$6` adopt: as [`ACQUIRE`], the permit's key first (NULLs if none
/// was granted).
pub const SEMAPHORE_ACQUIRE: &str = "SELECT l.lock_key, l.token, \
        (extract(epoch FROM l.expires_at - statement_timestamp()) * 1000)::bigint AS remaining_ms, \
        extract(epoch FROM l.expires_at)::float8 AS expires_at \
   FROM fence._semaphore_acquire($1, $2, make_interval(secs => $3::float8 / 1000), $4, \
                                 make_interval(secs => $5::float8 / 1000), $6) AS l";

/// `$1` keys, `$2` ttl ms, `$3` holder, `$4` wait ms, `$5` adopt. One
/// row: the keys granted (distinct, in byte order), their one token, and
/// as [`ACQUIRE`] the time left and the expiry, of the earliest-expiring
/// key; NULLs if not granted.
pub const ACQUIRE_ALL: &str = "SELECT pg_catalog.array_agg(l.lock_key ORDER BY l.lock_key COLLATE \"C\"), \
        pg_catalog.min(l.token), \
        (extract(epoch FROM pg_catalog.min(l.expires_at) - statement_timestamp()) * 1000)::bigint AS remaining_ms, \
        extract(epoch FROM pg_catalog.min(l.expires_at))::float8 AS expires_at \
   FROM fence._lock_acquire_all($1::text[], make_interval(secs => $2::float8 / 1000), $3, \
                                make_interval(secs => $4::float8 / 1000), $5) AS l";

/// `$1` keys, `$2` token, `$3` ttl ms: every key renewed in one statement;
/// the earliest new expiry (Unix seconds), NULL if any key was no longer
/// live.
pub const RENEW_ALL: &str = "SELECT CASE WHEN pg_catalog.bool_and(r.expires_at IS NOT NULL) \
             THEN extract(epoch FROM pg_catalog.min(r.expires_at))::float8 END \
   FROM (SELECT fence.lock_renew(k, $2, make_interval(secs => $3::float8 / 1000)) AS expires_at \
           FROM pg_catalog.unnest($1::text[]) AS k) AS r";

/// `$1` keys (distinct), `$2` token: true if every key's lease was live.
pub const RELEASE_ALL: &str =
    "SELECT fence.lock_release_all($1::text[], $2) = pg_catalog.cardinality($1::text[])";

/// `$1` key, `$2` known token (NULL: none), `$3` wait ms. One row: the
/// live lease's holder, token, `acquired_at` and `expires_at` (Unix
/// seconds) when the watch ended; NULLs when none was live.
pub const WATCH: &str = "SELECT w.holder, w.token, \
        extract(epoch FROM w.acquired_at)::float8, extract(epoch FROM w.expires_at)::float8 \
   FROM fence.lock_watch($1, $2, make_interval(secs => $3::float8 / 1000)) AS w";

/// `$1` key, `$2` keep ms (0: stop keeping): the key's latest token.
pub const KEEP_HISTORY: &str =
    "SELECT fence.lock_keep_history($1, make_interval(secs => $2::float8 / 1000))";

/// `$1` key, `$2` after token (NULL: all), `$3` wait ms. One row of four
/// arrays in token order (NULLs: no term): tokens, previous tokens,
/// holders, `acquired_at` (Unix seconds). One row, so both drivers read it
/// as they read a watch.
pub const HISTORY: &str = "SELECT array_agg(h.token ORDER BY h.token), \
        array_agg(h.previous_token ORDER BY h.token), array_agg(h.holder ORDER BY h.token), \
        array_agg(extract(epoch FROM h.acquired_at)::float8 ORDER BY h.token) \
   FROM fence.lock_history($1, $2, make_interval(secs => $3::float8 / 1000)) AS h";

/// `$1` key, `$2` token, `$3` ttl ms: the new expiry (Unix seconds, server
/// clock), NULL when the lease was no longer live.
pub const RENEW: &str =
    "SELECT extract(epoch FROM fence.lock_renew($1, $2, make_interval(secs => $3::float8 / 1000)))::float8";

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
/// Let go of every session advisory lock before a connection goes back to
/// the pool (a lock taken twice on it, or another one taken through it).
pub const ADVISORY_UNLOCK_ALL: &str = "SELECT pg_catalog.pg_advisory_unlock_all()";
/// `$1` the key: true if this session holds its session advisory lock now
/// (a `bigint` key is `classid` = the high half, `objid` = the low half,
/// `objsubid` = 1 in `pg_locks`).
pub const ADVISORY_HELD: &str = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks \
     WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND granted \
       AND mode = 'ExclusiveLock' AND objsubid = 1 \
       AND classid::bigint = ($1::bigint >> 32) & 4294967295 AND objid::bigint = $1::bigint & 4294967295)";
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
/// [`CLAIM_OPERATION`] for `run_once`, with the transaction's id (as text).
pub const CLAIM_OPERATION_IN: &str =
    "SELECT fence.claim_operation($1), pg_catalog.pg_current_xact_id()::text";
/// The current transaction's id, if it has one (as text): run before the
/// `COMMIT` of `run_once`. It fails (25P02) in an aborted transaction, whose
/// `COMMIT` would roll back without an error, and answers another id or
/// NULL once the work has ended the transaction itself.
pub const STILL_OPEN: &str = "SELECT pg_catalog.pg_current_xact_id_if_assigned()::text";

/// A possibly schema-qualified SQL name, quoted part by part (so it is taken
/// exactly as written, case included, and cannot inject SQL).
pub fn ident(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// Lock one row: `$1` its key.
pub fn lock_row(table: &str, key_column: &str, suffix: &str) -> String {
    format!(
        "SELECT * FROM {} WHERE {} = $1 FOR UPDATE{suffix}",
        ident(table),
        ident(key_column)
    )
}

/// Claim up to `limit` rows matching `filter` (trusted SQL), in key order,
/// skipping rows other transactions hold.
pub fn claim(table: &str, key_column: &str, filter: &str, limit: i64) -> String {
    format!(
        "SELECT * FROM {} WHERE {filter} ORDER BY {} LIMIT {limit} FOR UPDATE SKIP LOCKED",
        ident(table),
        ident(key_column)
    )
}

/// Compare-and-set: `$1` key, `$2` expected version, `$3` the value the
/// assignment (trusted SQL, e.g. `state = $3`) uses. Returns the new version.
pub fn compare_and_set(
    table: &str,
    key_column: &str,
    version_column: &str,
    assignment: &str,
) -> String {
    let version = ident(version_column);
    format!(
        "UPDATE {} SET {assignment}, {version} = {version} + 1 WHERE {} = $1 AND {version} = $2 RETURNING {version}",
        ident(table),
        ident(key_column)
    )
}

/// The current version of a row: `$1` key.
pub fn current_version(table: &str, key_column: &str, version_column: &str) -> String {
    format!(
        "SELECT {} FROM {} WHERE {} = $1",
        ident(version_column),
        ident(table),
        ident(key_column)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn identifiers_are_quoted_part_by_part() {
        assert_eq!(super::ident("jobs"), "\"jobs\"");
        assert_eq!(super::ident("app.Jobs"), "\"app\".\"Jobs\"");
        assert_eq!(
            super::ident("x\"; DROP TABLE t; --"),
            "\"x\"\"; DROP TABLE t; --\""
        );
    }
}
