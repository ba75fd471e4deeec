//! Advisory locks over deadpool-postgres.

use deadpool_postgres::{GenericClient, Object, Pool};

use super::{AdvisoryKey, Wait};
use crate::backend::deadpool::error;
use crate::{sql, Error};

/// A session advisory lock, holding its pooled connection until
/// [`SessionLock::unlock`]. Dropped without unlocking, it closes the
/// connection (never returned to the pool with the lock held), which
/// releases the lock.
pub struct SessionLock {
    connection: Option<Object>,
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
    pub fn client(&self) -> &Object {
        self.connection.as_ref().expect("held until unlock")
    }

    /// Whether the session still holds the lock: false if it was let go of
    /// (`pg_advisory_unlock_all`, `DISCARD ALL`, a pooler that reset the
    /// session), an error if the session is gone (terminated, timed out by
    /// `idle_session_timeout`, a failover: the server released the lock).
    pub async fn is_held(&self) -> Result<bool, Error> {
        Ok(self
            .client()
            .query_one(sql::ADVISORY_HELD, &[&self.key.0])
            .await
            .map_err(error)?
            .get(0))
    }

    /// Unlock and give the connection back to the pool: true if the lock
    /// was still held, false if the session had lost it already (then
    /// whatever ran under it since was not protected). Cancel safety: if
    /// dropped mid-way, the connection is closed instead, which unlocks.
    pub async fn unlock(mut self) -> Result<bool, Error> {
        let connection = self.connection.as_ref().expect("held until unlock");
        let held: bool = connection
            .query_one(sql::ADVISORY_UNLOCK, &[&self.key.0])
            .await
            .map_err(error)?
            .get(0);
        connection
            .execute(sql::ADVISORY_UNLOCK_ALL, &[])
            .await
            .map_err(error)?;
        connection
            .batch_execute(sql::ADVISORY_RESET_WAIT)
            .await
            .map_err(error)?;
        // Unlocked, settings reset: this connection may go back to the pool.
        drop(self.connection.take());
        Ok(held)
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            close(connection);
        }
    }
}

/// Close a pooled connection instead of returning it to the pool.
fn close(connection: Object) {
    drop(Object::take(connection));
}

/// Take a session advisory lock on a connection of its own: `None` if not
/// granted within `wait`.
///
/// Cancel safety: dropping this future closes the connection it was using;
/// the server then abandons the wait (within 100 ms) and no lock is left.
pub async fn lock_session(
    pool: &Pool,
    key: AdvisoryKey,
    wait: Wait,
) -> Result<Option<SessionLock>, Error> {
    let connection = pool
        .get()
        .await
        .map_err(crate::backend::deadpool::pool_error)?;
    // Until we know the outcome, a drop must close this connection.
    let mut pending = SessionLock {
        connection: Some(connection),
        key,
    };
    let client = pending.connection.as_ref().expect("just set");
    let granted = match wait {
        Wait::No => client
            .query_one(sql::ADVISORY_TRY_LOCK, &[&key.0])
            .await
            .map_err(error)?
            .get::<_, bool>(0),
        Wait::Forever | Wait::Up(_) => {
            client
                .query_one(sql::ADVISORY_PREPARE_WAIT, &[&wait.lock_timeout()])
                .await
                .map_err(error)?;
            match client
                .query_one(sql::ADVISORY_LOCK, &[&key.0])
                .await
                .map_err(error)
            {
                Ok(_) => true,
                Err(Error::LockNotAvailable { .. }) => {
                    // Holding nothing: reset the wait settings before the
                    // connection goes back to the pool.
                    client
                        .batch_execute(sql::ADVISORY_RESET_WAIT)
                        .await
                        .map_err(error)?;
                    false
                }
                Err(other) => return Err(other),
            }
        }
    };
    if granted {
        Ok(Some(pending))
    } else {
        drop(pending.connection.take());
        Ok(None)
    }
}

/// Take a transaction advisory lock inside the caller's open transaction,
/// released at its COMMIT or ROLLBACK. `Wait::Up` is not supported here (a
/// lock timeout would abort the caller's transaction); poll with `Wait::No`.
///
/// Cancel safety: if dropped mid-wait, the server may still take the lock
/// for the caller's transaction; roll the transaction back.
pub async fn lock_xact(
    transaction: &deadpool_postgres::Transaction<'_>,
    key: AdvisoryKey,
    wait: Wait,
) -> Result<bool, Error> {
    match wait {
        Wait::No => Ok(transaction
            .query_one(sql::ADVISORY_XACT_TRY_LOCK, &[&key.0])
            .await
            .map_err(error)?
            .get(0)),
        Wait::Forever => {
            transaction
                .query_one(sql::ADVISORY_XACT_LOCK, &[&key.0])
                .await
                .map_err(error)?;
            Ok(true)
        }
        Wait::Up(_) => Err(super::xact_wait_up_unsupported()),
    }
}
