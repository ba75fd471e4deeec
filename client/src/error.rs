//! Errors, and the one function that maps a server's SQLSTATE to a kind.

/// What went wrong in a pg_fence call. Busy keys and lost leases are not
/// errors (they are `None` / `false` / [`crate::LossReason`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `FN001`: a write to a protected table did not carry the key's live token.
    #[error("stale fencing token: {message}")]
    StaleToken {
        /// The server's message: table, key, tokens.
        message: String,
    },
    /// `42501`: this role does not own the lease (or may not do this).
    #[error("not the lease owner: {message}")]
    NotOwner {
        /// The server's message: key, token, both roles.
        message: String,
    },
    /// `22004` / `22023`: an argument the server refused.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// `22004` or `22023`.
        sqlstate: String,
        /// The server's message, naming the argument.
        message: String,
    },
    /// `40001` / `40P01`: retry the transaction.
    #[error("serialization failure, retry: {message}")]
    Serialization {
        /// `40001` or `40P01`.
        sqlstate: String,
        /// The server's message.
        message: String,
    },
    /// `55P03`: a lock that was not to be waited for (`NOWAIT`, `lock_timeout`)
    /// is held. The transaction is aborted: roll it back.
    #[error("lock not available: {message}")]
    LockNotAvailable {
        /// The server's message.
        message: String,
    },
    /// `FN002`: the key's live lease is already held by this holder id (by
    /// another guard, or another process), and this acquire was not a
    /// retry of the request that got it: a holder id names one guard. The
    /// lease was left as it was.
    #[error("holder in use: {message}")]
    HolderInUse {
        /// The server's message: key and holder.
        message: String,
    },
    /// `57014`: cancelled or `statement_timeout`.
    #[error("cancelled: {message}")]
    Cancelled {
        /// The server's message.
        message: String,
    },
    /// Any other SQLSTATE, kept as the server sent it.
    #[error("database error {sqlstate}: {message}")]
    Database {
        /// The SQLSTATE, as sent.
        sqlstate: String,
        /// The server's message.
        message: String,
    },
    /// `run_once`: the work left its transaction aborted (a SQL error it
    /// caught and did not pass on), so its `COMMIT` would have rolled back:
    /// neither the work nor its run-once record was committed, and a later
    /// call runs it again.
    #[error("the work's transaction was aborted, nothing was committed: {message}")]
    WorkRolledBack {
        /// The server's message for the aborted transaction.
        message: String,
    },
    /// `run_once`: the work ended the run-once transaction itself (a
    /// `COMMIT` or `ROLLBACK` of its own), so `run_once` cannot say whether
    /// the work and its record committed together.
    #[error("the work ended the run-once transaction itself")]
    WorkEndedTransaction,
    /// `run_once`: the reply to the `COMMIT` was lost. The work and its
    /// record may or may not be committed: call `run_once` again with the
    /// same key to find out (`AlreadyDone` if it was).
    #[error("the commit's outcome is unknown: {message}")]
    CommitAmbiguous {
        /// What the driver said.
        message: String,
    },
    /// An acquire whose replies were lost until its retry budget
    /// (`LeaseOptions::ambiguous_retry_for`) ran out: the server may have
    /// granted a lease to `holder` that nobody holds. The client goes on
    /// trying, in the background (within a Tokio runtime), to release it as
    /// that holder for up to a ttl. An acquire of the same key naming that
    /// holder in this process, while that goes on, is a retry of the lost
    /// request: it stops the cleanup and gets the lease back if there is
    /// one (G6). From elsewhere, `lock_acquire` as that holder returns it.
    #[error("the acquire's outcome is unknown (holder {holder}): {message}")]
    AcquireAmbiguous {
        /// The holder id the unacknowledged requests were sent with.
        holder: String,
        /// The last error.
        message: String,
    },
    /// A value from the server could not be decoded (or one sent encoded):
    /// a bug or a version mismatch, not a lost reply, so never retried.
    #[error("decode: {0}")]
    Decode(String),
    /// Refused by the client before anything was sent: options that cannot
    /// work (`LeaseOptions::validate`), a semaphore without permits,
    /// `Wait::Up` in `lock_xact`, a `Backend` without a call. No SQLSTATE:
    /// the server never saw it.
    #[error("refused by the client: {0}")]
    Usage(String),
    /// The pool had no connection to give (it timed out, was closed, or
    /// could not open one): nothing was sent, so the outcome is known (no
    /// effect), unlike [`Error::Connection`].
    #[error("no pooled connection: {0}")]
    Pool(String),
    /// An [`crate::Observer`] found that terms it never reported were not
    /// kept (it looked less often than the history's keep, or the history
    /// was stopped and kept again meanwhile): the terms after `after`, up
    /// to `resumed`, are unknown. The observer goes on from term `resumed`.
    #[error("observer of {key} missed terms after {after:?}; it goes on from term {resumed}")]
    Lagged {
        /// The election's key.
        key: String,
        /// The last term it knew of (`None`: none).
        after: Option<i64>,
        /// The oldest kept term after it, which it reports next.
        resumed: i64,
    },
    /// Not a server error: the connection failed mid-call (no answer, so
    /// the call may or may not have taken effect; a pool with no connection
    /// to give is [`Error::Pool`]). Ambiguous: a lease
    /// acquire retries it as the same holder.
    #[error("connection: {0}")]
    Connection(String),
}

impl Error {
    /// The one place a SQLSTATE becomes an error kind.
    pub fn from_sqlstate(sqlstate: &str, message: String) -> Error {
        match sqlstate {
            "FN001" => Error::StaleToken { message },
            "42501" => Error::NotOwner { message },
            "22004" | "22023" => Error::InvalidArgument {
                sqlstate: sqlstate.to_owned(),
                message,
            },
            "40001" | "40P01" => Error::Serialization {
                sqlstate: sqlstate.to_owned(),
                message,
            },
            "55P03" => Error::LockNotAvailable { message },
            "FN002" => Error::HolderInUse { message },
            "57014" => Error::Cancelled { message },
            _ => Error::Database {
                sqlstate: sqlstate.to_owned(),
                message,
            },
        }
    }

    /// The server's SQLSTATE, when the server answered.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::StaleToken { .. } => Some("FN001"),
            Error::NotOwner { .. } => Some("42501"),
            Error::Cancelled { .. } => Some("57014"),
            Error::LockNotAvailable { .. } => Some("55P03"),
            Error::HolderInUse { .. } => Some("FN002"),
            Error::InvalidArgument { sqlstate, .. }
            | Error::Serialization { sqlstate, .. }
            | Error::Database { sqlstate, .. } => Some(sqlstate),
            Error::WorkRolledBack { .. } => Some("25P02"),
            Error::Connection(_)
            | Error::CommitAmbiguous { .. }
            | Error::AcquireAmbiguous { .. }
            | Error::WorkEndedTransaction
            | Error::Usage(_)
            | Error::Pool(_)
            | Error::Lagged { .. }
            | Error::Decode(_) => None,
        }
    }

    /// True when the server never answered, so the outcome is unknown and a
    /// retry (with the same holder, for an acquire) is the way to learn it.
    pub fn is_ambiguous(&self) -> bool {
        match self {
            Error::Connection(_)
            | Error::CommitAmbiguous { .. }
            | Error::AcquireAmbiguous { .. } => true,
            // Connection exceptions, and a backend terminated (fast
            // shutdown, failover, pg_terminate_backend) perhaps after its
            // commit, e.g. while waiting for a synchronous standby.
            Error::Database { sqlstate, .. } => {
                sqlstate.starts_with("08")
                    || matches!(sqlstate.as_str(), "57P01" | "57P02" | "57P03")
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_kinds_and_back() {
        for code in [
            "FN001", "42501", "22004", "22023", "40001", "40P01", "57014", "FN002", "XX000",
            "53300",
        ] {
            let error = Error::from_sqlstate(code, "m".into());
            assert_eq!(error.sqlstate(), Some(code), "{error:?}");
            assert!(!error.is_ambiguous());
        }
        assert!(matches!(
            Error::from_sqlstate("FN001", "m".into()),
            Error::StaleToken { .. }
        ));
        assert!(matches!(
            Error::from_sqlstate("53300", "m".into()),
            Error::Database { .. }
        ));
        assert!(Error::Connection("reset".into()).is_ambiguous());
    }
}
