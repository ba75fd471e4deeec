//! Run an operation once per operation key ("locks reduce risk; idempotency
//! eliminates it").
//!
//! [`deadpool::run_once`] and [`sqlx::run_once`] open a transaction, claim the
//! key with `fence.claim_operation` (a row in `fence.operations`), run your
//! work inside the same transaction, and commit both together. A retried job
//! or a redelivered webhook finds the key claimed and does nothing. Two
//! concurrent runs of one key: the second waits for the first transaction,
//! then does nothing if it committed, or runs if it rolled back. Only work
//! done *in that transaction* is covered; effects outside the database
//! (emails, HTTP calls) need the receiver's own idempotency.

use std::future::Future;
use std::pin::Pin;

/// The work of a run-once call: a future borrowing the transaction. Its
/// error type is the caller's (`E`, which takes the client's own errors
/// through `From<crate::Error>`); `crate::Error` by default.
pub type Work<'t, T, E = crate::Error> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 't>>;

#[cfg(feature = "deadpool-postgres")]
pub mod deadpool;
#[cfg(feature = "sqlx")]
pub mod sqlx;

/// A failed `COMMIT`: refused by the server (a deferred constraint, say:
/// nothing committed), or with no answer or the session ended during it
/// (the work may have committed): [`crate::Error::CommitAmbiguous`].
pub(crate) fn commit_failed(error: crate::Error) -> crate::Error {
    if error.is_ambiguous() {
        crate::Error::CommitAmbiguous {
            message: error.to_string(),
        }
    } else {
        error
    }
}

/// How a run-once call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Once<T> {
    /// This call did the work, and committed it with its record.
    Ran(T),
    /// The operation was already done (committed by an earlier call).
    AlreadyDone,
}
