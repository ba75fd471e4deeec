//! The sqlx backend: [`Backend`] for [`sqlx::PgPool`].

use std::time::{Duration, SystemTime};

use sqlx::PgPool;

use super::{grant, millis, unix_seconds, watched, Backend, Grant};
use crate::{sql, Error};

/// A grant's row: its token, time left (ms), expiry (Unix seconds).
type Row = (Option<i64>, Option<i64>, Option<f64>);
/// A permit's row: its key, then as a grant's.
type Permit = (Option<String>, Option<i64>, Option<i64>, Option<f64>);
/// A watch's row: holder, token, acquired_at, expires_at.
type Watched = (Option<String>, Option<i64>, Option<f64>, Option<f64>);
/// A multi-key grant's row: its keys, then as a grant's.
type Granted = (Option<Vec<String>>, Option<i64>, Option<i64>, Option<f64>);

impl Backend for PgPool {
    async fn acquire_lease(
        &self,
        key: &str,
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<Grant>, Error> {
        let row: Row = fetch_waiting(
            self,
            sqlx::query_as(sql::ACQUIRE)
                .bind(key)
                .bind(millis(ttl))
                .bind(holder)
                .bind(millis(wait))
                .bind(adopt),
        )
        .await?;
        let (token, remaining, expires_at) = row;
        Ok(grant(token, remaining, expires_at))
    }

    async fn acquire_shared(
        &self,
        key: &str,
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<Grant>, Error> {
        let row: Row = fetch_waiting(
            self,
            sqlx::query_as(sql::ACQUIRE_SHARED)
                .bind(key)
                .bind(millis(ttl))
                .bind(holder)
                .bind(millis(wait))
                .bind(adopt),
        )
        .await?;
        let (token, remaining, expires_at) = row;
        Ok(grant(token, remaining, expires_at))
    }

    async fn acquire_permit(
        &self,
        name: &str,
        permits: i32,
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<(String, Grant)>, Error> {
        let row: Permit = fetch_waiting(
            self,
            sqlx::query_as(sql::SEMAPHORE_ACQUIRE)
                .bind(name)
                .bind(permits)
                .bind(millis(ttl))
                .bind(holder)
                .bind(millis(wait))
                .bind(adopt),
        )
        .await?;
        let (key, token, remaining, expires_at) = row;
        Ok(key.zip(grant(token, remaining, expires_at)))
    }

    async fn acquire_all(
        &self,
        keys: &[String],
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<(Vec<String>, Grant)>, Error> {
        let row: Granted = fetch_waiting(
            self,
            sqlx::query_as(sql::ACQUIRE_ALL)
                .bind(keys)
                .bind(millis(ttl))
                .bind(holder)
                .bind(millis(wait))
                .bind(adopt),
        )
        .await?;
        let (keys, token, remaining, expires_at) = row;
        Ok(keys.zip(grant(token, remaining, expires_at)))
    }

    async fn renew_all(
        &self,
        keys: &[String],
        token: i64,
        ttl: Duration,
    ) -> Result<Option<SystemTime>, Error> {
        let expires_at: Option<f64> = sqlx::query_scalar(sql::RENEW_ALL)
            .bind(keys)
            .bind(token)
            .bind(millis(ttl))
            .fetch_one(self)
            .await
            .map_err(error)?;
        Ok(expires_at.map(unix_seconds))
    }

    async fn release_all(&self, keys: &[String], token: i64) -> Result<bool, Error> {
        sqlx::query_scalar(sql::RELEASE_ALL)
            .bind(keys)
            .bind(token)
            .fetch_one(self)
            .await
            .map_err(error)
    }

    async fn watch(
        &self,
        key: &str,
        known: Option<i64>,
        wait: Duration,
    ) -> Result<Option<crate::LeaseInfo>, Error> {
        let row: Watched = fetch_waiting(
            self,
            sqlx::query_as(sql::WATCH)
                .bind(key)
                .bind(known)
                .bind(millis(wait)),
        )
        .await?;
        let (holder, token, acquired_at, expires_at) = row;
        Ok(watched(key, holder, token, acquired_at, expires_at))
    }

    async fn renew(
        &self,
        key: &str,
        token: i64,
        ttl: Duration,
    ) -> Result<Option<SystemTime>, Error> {
        let expires_at: Option<f64> = sqlx::query_scalar(sql::RENEW)
            .bind(key)
            .bind(token)
            .bind(millis(ttl))
            .fetch_one(self)
            .await
            .map_err(error)?;
        Ok(expires_at.map(unix_seconds))
    }

    async fn release(&self, key: &str, token: i64) -> Result<bool, Error> {
        sqlx::query_scalar(sql::RELEASE)
            .bind(key)
            .bind(token)
            .fetch_one(self)
            .await
            .map_err(error)
    }
}

/// A pooled connection for one statement that may wait in the server (an
/// acquire, a watch). Dropped before the statement answered (the caller
/// gave up on the future), the connection is detached from the pool and
/// closed rather than handed to the next user with the wait still running
/// on it, whose statements would queue behind it; the server sees the
/// client gone at its next wake-up and ends the wait.
struct Own(Option<sqlx::pool::PoolConnection<sqlx::Postgres>>, bool);

/// Run one statement that may wait in the server (an acquire, a watch) on
/// a connection held through [`Own`].
async fn fetch_waiting<'q, T>(
    pool: &PgPool,
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, T, sqlx::postgres::PgArguments>,
) -> Result<T, Error>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let mut own = Own(Some(pool.acquire().await.map_err(error)?), false);
    let connection = own.0.as_mut().expect("held until dropped");
    let answer = query.fetch_one(&mut **connection).await.map_err(error);
    // Answered (or failed): the connection may go back to the pool.
    own.1 = true;
    answer
}

impl Drop for Own {
    fn drop(&mut self) {
        if let (Some(connection), false) = (self.0.take(), self.1) {
            drop(connection.detach());
        }
    }
}

/// Attach a lease's token to an open transaction, so writes to tables under
/// `fence.protect()` carry it (`SET LOCAL fence.token`). It takes a
/// transaction: outside one the setting would end with its own statement.
/// Cancel safety: if cancelled, the setting may or may not be in place; the
/// transaction is unaffected otherwise.
pub async fn set_fence_token(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    token: i64,
) -> Result<(), Error> {
    sqlx::query(sql::SET_FENCE_TOKEN)
        .bind(token.to_string())
        .execute(&mut **transaction)
        .await
        .map_err(error)?;
    Ok(())
}

/// Map a sqlx error: the server's SQLSTATE through [`Error::from_sqlstate`];
/// a value that does not decode or encode as [`Error::Decode`]; no pooled
/// connection (timed out, closed) as [`Error::Pool`]; anything else (I/O) as
/// [`Error::Connection`].
pub fn error(error: sqlx::Error) -> Error {
    match &error {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => Error::from_sqlstate(&code, db.message().to_owned()),
            None => Error::Connection(error.to_string()),
        },
        sqlx::Error::Decode(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Encode(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. } => Error::Decode(error.to_string()),
        // No connection to send the statement on: nothing was sent.
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => Error::Pool(error.to_string()),
        _ => Error::Connection(error.to_string()),
    }
}
