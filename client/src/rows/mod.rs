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

/// The helpers that only mean something inside a transaction take the
/// drivers' transaction types, so calling them on a plain connection, in
/// autocommit (where a row lock, an advisory transaction lock or
/// `SET LOCAL fence.token` ends with its own statement), does not compile.
/// Each `compile_fail` below compiled before; its `no_run` twin, on a
/// transaction, compiles.
///
/// ```no_run
/// # async fn ok(pool: sqlx::PgPool, dp: deadpool_postgres::Pool) {
/// use pg_fence_client::{advisory, backend, rows, AdvisoryKey, RowLock, Table, Wait};
/// let table = Table { name: "jobs", key_column: "id" };
/// let mut tx = pool.begin().await.unwrap();
/// rows::sqlx::lock_row(&mut tx, table, 1i32, RowLock::Wait).await.unwrap();
/// rows::sqlx::claim(&mut tx, table, "true", 1).await.unwrap();
/// advisory::sqlx::lock_xact(&mut tx, AdvisoryKey::from_name("a"), Wait::No).await.unwrap();
/// backend::sqlx::set_fence_token(&mut tx, 7).await.unwrap();
/// let mut client = dp.get().await.unwrap();
/// let tx = client.transaction().await.unwrap();
/// rows::deadpool::lock_row(&tx, table, &1i32, RowLock::Wait).await.unwrap();
/// rows::deadpool::claim(&tx, table, "true", 1).await.unwrap();
/// advisory::deadpool::lock_xact(&tx, AdvisoryKey::from_name("a"), Wait::No).await.unwrap();
/// backend::deadpool::set_fence_token(&tx, 7).await.unwrap();
/// # }
/// ```
///
/// ```compile_fail
/// # async fn no(pool: sqlx::PgPool) {
/// use pg_fence_client::{rows, RowLock, Table};
/// let mut connection = pool.acquire().await.unwrap();
/// let table = Table { name: "jobs", key_column: "id" };
/// rows::sqlx::lock_row(&mut *connection, table, 1i32, RowLock::Wait).await.unwrap();
/// # }
/// ```
///
/// ```compile_fail
/// # async fn no(pool: sqlx::PgPool) {
/// use pg_fence_client::{rows, Table};
/// let mut connection = pool.acquire().await.unwrap();
/// let table = Table { name: "jobs", key_column: "id" };
/// rows::sqlx::claim(&mut *connection, table, "true", 1).await.unwrap();
/// # }
/// ```
///
/// ```compile_fail
/// # async fn no(pool: sqlx::PgPool) {
/// use pg_fence_client::{advisory, AdvisoryKey, Wait};
/// let mut connection = pool.acquire().await.unwrap();
/// advisory::sqlx::lock_xact(&mut *connection, AdvisoryKey::from_name("a"), Wait::No).await.unwrap();
/// # }
/// ```
///
/// ```compile_fail
/// # async fn no(pool: sqlx::PgPool) {
/// let mut connection = pool.acquire().await.unwrap();
/// pg_fence_client::backend::sqlx::set_fence_token(&mut *connection, 7).await.unwrap();
/// # }
/// ```
///
/// ```compile_fail
/// # async fn no(dp: deadpool_postgres::Pool) {
/// use pg_fence_client::{rows, RowLock, Table};
/// let client = dp.get().await.unwrap();
/// let table = Table { name: "jobs", key_column: "id" };
/// rows::deadpool::lock_row(&client, table, &1i32, RowLock::Wait).await.unwrap();
/// # }
/// ```
///
/// ```compile_fail
/// # async fn no(dp: deadpool_postgres::Pool) {
/// use pg_fence_client::{rows, Table};
/// let client = dp.get().await.unwrap();
/// let table = Table { name: "jobs", key_column: "id" };
/// rows::deadpool::claim(&client, table, "true", 1).await.unwrap();
/// # }
/// ```
///
/// ```compile_fail
/// # async fn no(dp: deadpool_postgres::Pool) {
/// use pg_fence_client::{advisory, AdvisoryKey, Wait};
/// let client = dp.get().await.unwrap();
/// advisory::deadpool::lock_xact(&client, AdvisoryKey::from_name("a"), Wait::No).await.unwrap();
/// # }
/// ```
///
/// ```compile_fail
/// # async fn no(dp: deadpool_postgres::Pool) {
/// let client = dp.get().await.unwrap();
/// pg_fence_client::backend::deadpool::set_fence_token(&client, 7).await.unwrap();
/// # }
/// ```
#[cfg(all(doctest, feature = "sqlx", feature = "deadpool-postgres"))]
pub struct TransactionsOnly;
