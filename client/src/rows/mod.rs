//! PostgreSQL's row-level tools, wrapped: lock a row `FOR UPDATE` (waiting,
//! `NOWAIT` or `SKIP LOCKED`), claim a batch of queue rows with
//! `SKIP LOCKED`, and compare-and-set on a version column.
//!
//! All of them run inside the caller's transaction: row locks last until it
//! commits or rolls back. Table and column names are quoted identifiers (so
//! `Jobs` and `jobs` name different tables); a `filter` or `assignment` is SQL you write
//! (never build it from untrusted input; bind values as `$3`, see each
//! function).
//!
//! Cancel safety (all): a call dropped mid-flight may still have taken its
//! locks or made its update inside your transaction; roll the transaction
//! back if you abandon it.

#[cfg(feature = "deadpool-postgres")]
pub mod deadpool;
#[cfg(feature = "sqlx")]
pub mod sqlx;

/// How to lock a row that another transaction holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLock {
    /// Wait for it (`FOR UPDATE`).
    Wait,
    /// Fail at once with [`crate::Error::LockNotAvailable`], which aborts the
    /// transaction (`FOR UPDATE NOWAIT`).
    NoWait,
    /// Act as if the row were not there: `None` (`FOR UPDATE SKIP LOCKED`).
    SkipLocked,
}

impl RowLock {
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            RowLock::Wait => "",
            RowLock::NoWait => " NOWAIT",
            RowLock::SkipLocked => " SKIP LOCKED",
        }
    }
}

/// A table and the column that identifies its rows.
#[derive(Debug, Clone, Copy)]
pub struct Table<'a> {
    /// The table's name, possibly schema-qualified (`app.jobs`).
    pub name: &'a str,
    /// The key column.
    pub key_column: &'a str,
}

/// How a compare-and-set ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cas {
    /// The row had the expected version; it was updated to this one.
    Updated {
        /// The row's new version (the expected one + 1).
        version: i64,
    },
    /// The row had another version (`Some`), or no such row (`None`).
    Conflict {
        /// The version the row has now.
        current: Option<i64>,
    },
}
