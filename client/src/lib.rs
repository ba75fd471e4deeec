//! # pg_fence_client
//!
//! Rust client for pg_fence: distributed leases with
//! fencing tokens, kept and enforced by PostgreSQL. A driver-neutral core
//! (this crate's [`Lease`], [`LeaseOptions`], [`Error`], the SQL in `sql`)
//! and two thin backends behind features: `sqlx` ([`sqlx::PgPool`]) and
//! `deadpool-postgres` ([`deadpool_postgres::Pool`]).
//!
//! ```no_run
//! # #[cfg(feature = "deadpool-postgres")]
//! # async fn example(pool: deadpool_postgres::Pool) -> Result<(), pg_fence_client::Error> {
//! use std::time::Duration;
//! use pg_fence_client::{Lease, LeaseOptions};
//!
//! let options = LeaseOptions::new(Duration::from_secs(30));
//! if let Some(lease) = Lease::acquire(&pool, "invoice:42", &options, Duration::from_secs(5)).await? {
//!     tokio::select! {
//!         _ = do_the_work(lease.token()) => { lease.release().await?; }
//!         reason = lease.lost() => eprintln!("lease lost ({reason:?}): stop, the work is no longer ours"),
//!     }
//! }
//! # Ok(()) }
//! # async fn do_the_work(_token: i64) {}
//! ```
//!
//! A [`Lease`] renews itself in the background (every `ttl / 3` by default)
//! and tells you the moment it is lost: the server says it is no longer live
//! (it expired or was forced), or renewals failed until the local deadline
//! (the send time of the last acknowledged renewal + ttl − a safety margin,
//! on the monotonic clock) passed. Transient errors are retried while the
//! deadline holds. Carry [`Lease::token`] into every write the lease
//! protects; tables under `fence.protect()` refuse stale tokens themselves.
//!
//! Leases are not tied to a connection: every call borrows a pooled
//! connection for one statement, so they work behind PgBouncer in
//! transaction mode, unlike session-level advisory locks ([`advisory`],
//! whose docs say why and what their cancel safety is). No call of this
//! crate leaves a named prepared statement on the server (deadpool-postgres:
//! unnamed statements, `query_typed`; sqlx: the simple protocol with values
//! written as literals), so a transaction pooler with default settings
//! (PgBouncer 1.18, as Debian 12 ships it) needs no `max_prepared_statements`.
#![warn(missing_docs)]

pub mod advisory;
mod ambiguous;
pub mod backend;
mod election;
mod error;
mod history;
mod lease;
#[cfg(feature = "sqlx")]
mod literal;
pub mod metrics;
mod multi;
pub mod once;
pub mod rows;
mod semaphore;
mod shared;
pub mod sql;
mod watch;

pub use advisory::{AdvisoryKey, Wait};
pub use backend::{Backend, Grant};
pub use election::{Election, Observer};
pub use error::Error;
pub use history::{history, keep_history, Term};
pub use lease::{run, Lease, LeaseOptions, LossReason, RunOutcome};
pub use once::Once;
pub use rows::{Cas, RowLock, Table};
pub use semaphore::Semaphore;
pub use watch::{watch, LeaseInfo};
