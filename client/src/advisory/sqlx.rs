//! Advisory locks over sqlx.

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

use super::{AdvisoryKey, Wait};
use crate::backend::sqlx::error;
use crate::{sql, Error};

/// A session advisory lock, holding its pooled connection until
/// [`SessionLock::unlock`]. Dropped without unlocking, it closes the
/// connection (never returned to the pool with the lock held), which
/// releases the lock. As with any sqlx pooled connection, drop it inside a
/// Tokio runtime (sqlx panics otherwise).
pub struct SessionLock {
    connection: Option<PoolConnection<Postgres>>,
    key: AdvisoryKey,
}

impl SessionLock {
    /// The locked key.
    pub fn key(&self) -> AdvisoryKey {
        self.key
    }

    /// The connection the lock is on, to run statements in its session.
    /// With `Wait::Up`, its `lock_timeout` stays at the wait until
    /// `unlock()`. Advisory locks taken through it are let go of by
    /// `unlock()`, so nothing goes back to the pool locked.
    pub fn connection(&mut self) -> &mut sqlx::PgConnection {
        self.connection.as_mut().expect("held until unlock")
    }

    /// Whether the session still holds the lock: false if it was let go of
    /// (`pg_advisory_unlock_all`, `DISCARD ALL`, a pooler that reset the
    /// session), an error if the session is gone (terminated, timed out by
    /// `idle_session_timeout`, a failover: the server released the lock).
    pub async fn is_held(&mut self) -> Result<bool, Error> {
        let key = self.key.0;
        scalar_bool(self.connection(), sql::ADVISORY_HELD, key)
            .await
            .map_err(error)
    }

    /// Unlock and give the connection back to the pool: true if the lock
    /// was still held, false if the session had lost it already (then
    /// whatever ran under it since was not protected). Cancel safety: if
    /// dropped mid-way, the connection is closed instead, which unlocks.
    pub async fn unlock(mut self) -> Result<bool, Error> {
        let connection: &mut sqlx::PgConnection =
            self.connection.as_mut().expect("held until unlock");
        let held = scalar_bool(connection, sql::ADVISORY_UNLOCK, self.key.0)
            .await
            .map_err(error)?;
        execute_raw(connection, sql::ADVISORY_UNLOCK_ALL)
            .await
            .map_err(error)?;
        execute_raw(connection, sql::ADVISORY_RESET_WAIT)
            .await
            .map_err(error)?;
        // Unlocked, settings reset: this connection may go back to the pool.
        drop(self.connection.take());
        Ok(held)
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        if let Some(mut connection) = self.connection.take() {
            connection.close_on_drop();
        }
    }
}

/// Take a session advisory lock on a connection of its own: `None` if not
/// granted within `wait`.
///
/// Cancel safety: dropping this future closes the connection it was using;
/// the server then abandons the wait (within 100 ms) and no lock is left.
pub async fn lock_session(
    pool: &PgPool,
    key: AdvisoryKey,
    wait: Wait,
) -> Result<Option<SessionLock>, Error> {
    let connection = pool.acquire().await.map_err(error)?;
    // Until we know the outcome, a drop must close this connection.
    let mut pending = SessionLock {
        connection: Some(connection),
        key,
    };
    let granted = lock_on(pending.connection.as_mut().expect("just set"), key, wait).await?;
    if granted {
        return Ok(Some(pending));
    }
    // Holding nothing: the wait settings were reset, and the connection may
    // go back to the pool.
    drop(pending.connection.take());
    Ok(None)
}

/// The statements of [`lock_session`], on its connection.
async fn lock_on(
    connection: &mut sqlx::PgConnection,
    key: AdvisoryKey,
    wait: Wait,
) -> Result<bool, Error> {
    if wait == Wait::No {
        return scalar_bool(connection, sql::ADVISORY_TRY_LOCK, key.0)
            .await
            .map_err(error);
    }
    execute_with(connection, sql::ADVISORY_PREPARE_WAIT, wait.lock_timeout())
        .await
        .map_err(error)?;
    match execute_with(connection, sql::ADVISORY_LOCK, key.0)
        .await
        .map_err(error)
    {
        Ok(()) => Ok(true),
        Err(Error::LockNotAvailable { .. }) => {
            execute_raw(connection, sql::ADVISORY_RESET_WAIT)
                .await
                .map_err(error)?;
            Ok(false)
        }
        Err(other) => Err(other),
    }
}

/// Take a transaction advisory lock inside the caller's open transaction,
/// released at its COMMIT or ROLLBACK. `Wait::Up` is not supported here (a
/// lock timeout would abort the caller's transaction); poll with `Wait::No`.
///
/// Cancel safety: if dropped mid-wait, the server may still take the lock
/// for the caller's transaction; roll the transaction back.
pub async fn lock_xact(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    key: AdvisoryKey,
    wait: Wait,
) -> Result<bool, Error> {
    match wait {
        Wait::No => scalar_bool(transaction, sql::ADVISORY_XACT_TRY_LOCK, key.0)
            .await
            .map_err(error),
        Wait::Forever => {
            execute_with(transaction, sql::ADVISORY_XACT_LOCK, key.0)
                .await
                .map_err(error)?;
            Ok(true)
        }
        Wait::Up(_) => Err(super::xact_wait_up_unsupported()),
    }
}

// Not persistent: `lock_xact` runs in the caller's transaction, where an
// unnamed statement works through a transaction pooler too.
// One helper per statement shape, each taking the connection with a named
// lifetime and using only `query(..).execute/fetch_one`: with query_scalar or
// raw_sql, rustc cannot prove the enclosing future Send (sqlx's separate
// 'c and 'e lifetimes on Executor).
async fn scalar_bool(
    connection: &mut sqlx::PgConnection,
    sql: &'static str,
    value: i64,
) -> Result<bool, sqlx::Error> {
    use sqlx::Row;
    sqlx::query(sql)
        .bind(value)
        .persistent(false)
        .fetch_one(connection)
        .await?
        .try_get(0)
}

async fn execute_with<V>(
    connection: &mut sqlx::PgConnection,
    sql: &'static str,
    value: V,
) -> Result<(), sqlx::Error>
where
    V: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
{
    sqlx::query(sql)
        .bind(value)
        .persistent(false)
        .execute(connection)
        .await
        .map(|_| ())
}

async fn execute_raw(
    connection: &mut sqlx::PgConnection,
    sql: &'static str,
) -> Result<(), sqlx::Error> {
    for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        sqlx::query(statement).execute(&mut *connection).await?;
    }
    Ok(())
}
