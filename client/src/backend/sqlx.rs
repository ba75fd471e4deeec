//! The sqlx backend: [`Backend`] for [`sqlx::PgPool`].

use std::time::{Duration, SystemTime};

use sqlx::postgres::PgRow;
use sqlx::{Executor, PgConnection, PgPool, Row};

use super::{grant, millis, terms, unix_seconds, watched, Backend, Grant};
use crate::literal::{inline, Literal::*};
use crate::{sql, Error};

impl Backend for PgPool {
    async fn acquire_lease(
        &self,
        key: &str,
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<Grant>, Error> {
        acquire_one(self, sql::ACQUIRE, key, ttl, holder, wait, adopt).await
    }

    async fn acquire_shared(
        &self,
        key: &str,
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<Grant>, Error> {
        acquire_one(self, sql::ACQUIRE_SHARED, key, ttl, holder, wait, adopt).await
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
        let text = inline(
            sql::SEMAPHORE_ACQUIRE,
            &[
                Text(name),
                Int4(permits),
                Float8(millis(ttl)),
                Text(holder),
                Float8(millis(wait)),
                Bool(adopt),
            ],
        )?;
        let row = fetch_waiting(self, text).await?;
        let key: Option<String> = column(&row, 0)?;
        Ok(key.zip(grant(column(&row, 1)?, column(&row, 2)?, column(&row, 3)?)))
    }

    async fn acquire_all(
        &self,
        keys: &[String],
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<(Vec<String>, Grant)>, Error> {
        let text = inline(
            sql::ACQUIRE_ALL,
            &[
                TextArray(keys),
                Float8(millis(ttl)),
                Text(holder),
                Float8(millis(wait)),
                Bool(adopt),
            ],
        )?;
        let row = fetch_waiting(self, text).await?;
        // Granted or not, by the first column's NULL; the keys are the
        // request's, distinct, in byte order ("C", as the server sorts
        // them). Not decoded from the text form of the array: sqlx reads an
        // element spelled NULL there as a NULL, and a key may be "NULL".
        let granted: Option<String> = row.try_get_unchecked(0).map_err(error)?;
        let mut granted_keys = keys.to_vec();
        granted_keys.sort_unstable();
        granted_keys.dedup();
        let keys = granted.map(|_| granted_keys);
        Ok(keys.zip(grant(column(&row, 1)?, column(&row, 2)?, column(&row, 3)?)))
    }

    async fn renew_all(
        &self,
        keys: &[String],
        token: i64,
        ttl: Duration,
    ) -> Result<Option<SystemTime>, Error> {
        let text = inline(
            sql::RENEW_ALL,
            &[TextArray(keys), Int8(token), Float8(millis(ttl))],
        )?;
        let expires_at: Option<f64> = column(&fetch(self, text).await?, 0)?;
        Ok(expires_at.map(unix_seconds))
    }

    async fn release_all(&self, keys: &[String], token: i64) -> Result<bool, Error> {
        let text = inline(sql::RELEASE_ALL, &[TextArray(keys), Int8(token)])?;
        column(&fetch(self, text).await?, 0)
    }

    async fn watch(
        &self,
        key: &str,
        known: Option<i64>,
        wait: Duration,
    ) -> Result<Option<crate::LeaseInfo>, Error> {
        let text = inline(
            sql::WATCH,
            &[Text(key), OptionalInt8(known), Float8(millis(wait))],
        )?;
        let row = fetch_waiting(self, text).await?;
        Ok(watched(
            key,
            column(&row, 0)?,
            column(&row, 1)?,
            column(&row, 2)?,
            column(&row, 3)?,
        ))
    }

    async fn keep_history(&self, key: &str, keep: Duration) -> Result<Option<i64>, Error> {
        let text = inline(sql::KEEP_HISTORY, &[Text(key), Float8(millis(keep))])?;
        column(&fetch(self, text).await?, 0)
    }

    async fn history(
        &self,
        key: &str,
        after: Option<i64>,
        wait: Duration,
    ) -> Result<Vec<crate::Term>, Error> {
        let text = inline(
            sql::HISTORY,
            &[Text(key), OptionalInt8(after), Float8(millis(wait))],
        )?;
        let row = fetch_waiting(self, text).await?;
        terms(
            key,
            column(&row, 0)?,
            column(&row, 1)?,
            column(&row, 2)?,
            column(&row, 3)?,
        )
    }

    async fn renew(
        &self,
        key: &str,
        token: i64,
        ttl: Duration,
    ) -> Result<Option<SystemTime>, Error> {
        let text = inline(sql::RENEW, &[Text(key), Int8(token), Float8(millis(ttl))])?;
        let expires_at: Option<f64> = column(&fetch(self, text).await?, 0)?;
        Ok(expires_at.map(unix_seconds))
    }

    async fn release(&self, key: &str, token: i64) -> Result<bool, Error> {
        let text = inline(sql::RELEASE, &[Text(key), Int8(token)])?;
        column(&fetch(self, text).await?, 0)
    }
}

/// One key's acquire, exclusive ([`sql::ACQUIRE`]) or shared
/// ([`sql::ACQUIRE_SHARED`]): the same arguments, the same row.
async fn acquire_one(
    pool: &PgPool,
    template: &str,
    key: &str,
    ttl: Duration,
    holder: &str,
    wait: Duration,
    adopt: bool,
) -> Result<Option<Grant>, Error> {
    let text = inline(
        template,
        &[
            Text(key),
            Float8(millis(ttl)),
            Text(holder),
            Float8(millis(wait)),
            Bool(adopt),
        ],
    )?;
    let row = fetch_waiting(pool, text).await?;
    Ok(grant(column(&row, 0)?, column(&row, 1)?, column(&row, 2)?))
}

/// A statement with its values written in (literal.rs), for the simple
/// query protocol: no statement is prepared, so it works through a
/// transaction pooler.
pub(crate) struct Simple(pub(crate) String);

impl<'q> sqlx::Execute<'q, sqlx::Postgres> for &'q Simple {
    fn sql(&self) -> &'q str {
        &self.0
    }
    fn statement(&self) -> Option<&sqlx::postgres::PgStatement<'q>> {
        None
    }
    fn take_arguments(
        &mut self,
    ) -> Result<Option<sqlx::postgres::PgArguments>, sqlx::error::BoxDynError> {
        Ok(None)
    }
    fn persistent(&self) -> bool {
        false
    }
}

/// Run one simple-protocol statement on a pooled connection: its one row.
async fn fetch(pool: &PgPool, text: String) -> Result<PgRow, Error> {
    let statement = Simple(text);
    let mut connection = pool.acquire().await.map_err(error)?;
    one_row(&mut connection, &statement).await
}

async fn one_row(connection: &mut PgConnection, statement: &Simple) -> Result<PgRow, Error> {
    connection.fetch_one(statement).await.map_err(error)
}

/// Column `index` of a row (text format, as the simple protocol sends it).
fn column<T>(row: &PgRow, index: usize) -> Result<T, Error>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(index).map_err(error)
}

/// A pooled connection for one statement that may wait in the server (an
/// acquire, a watch). Dropped before the statement answered (the caller
/// gave up on the future), the connection is detached from the pool and
/// closed rather than handed to the next user with the wait still running
/// on it, whose statements would queue behind it; the server sees the
/// client gone at its next wake-up and ends the wait.
struct Own(Option<sqlx::pool::PoolConnection<sqlx::Postgres>>, bool);

/// Run one simple-protocol statement that may wait in the server (an
/// acquire, a watch) on a connection held through [`Own`].
async fn fetch_waiting(pool: &PgPool, text: String) -> Result<PgRow, Error> {
    let statement = Simple(text);
    let mut own = Own(Some(pool.acquire().await.map_err(error)?), false);
    let connection = own.0.as_mut().expect("held until dropped");
    let answer = one_row(connection, &statement).await;
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
        .persistent(false)
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
