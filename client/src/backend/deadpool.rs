//! The deadpool-postgres backend: [`Backend`] for [`deadpool_postgres::Pool`].

use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use tokio_postgres::types::{ToSql, Type};

use super::{grant, millis, terms, unix_seconds, watched, Backend, Grant};
use crate::{sql, Error};

impl Backend for Pool {
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
        let row = query_waiting(
            self,
            sql::SEMAPHORE_ACQUIRE,
            &[
                (&name, Type::TEXT),
                (&permits, Type::INT4),
                (&millis(ttl), Type::FLOAT8),
                (&holder, Type::TEXT),
                (&millis(wait), Type::FLOAT8),
                (&adopt, Type::BOOL),
            ],
        )
        .await?;
        let key: Option<String> = get(&row, 0)?;
        Ok(key.zip(grant(get(&row, 1)?, get(&row, 2)?, get(&row, 3)?)))
    }

    async fn acquire_all(
        &self,
        keys: &[String],
        ttl: Duration,
        holder: &str,
        wait: Duration,
        adopt: bool,
    ) -> Result<Option<(Vec<String>, Grant)>, Error> {
        let row = query_waiting(
            self,
            sql::ACQUIRE_ALL,
            &[
                (&keys, Type::TEXT_ARRAY),
                (&millis(ttl), Type::FLOAT8),
                (&holder, Type::TEXT),
                (&millis(wait), Type::FLOAT8),
                (&adopt, Type::BOOL),
            ],
        )
        .await?;
        let keys: Option<Vec<String>> = get(&row, 0)?;
        Ok(keys.zip(grant(get(&row, 1)?, get(&row, 2)?, get(&row, 3)?)))
    }

    async fn renew_all(
        &self,
        keys: &[String],
        token: i64,
        ttl: Duration,
    ) -> Result<Option<SystemTime>, Error> {
        let row = query(
            self,
            sql::RENEW_ALL,
            &[
                (&keys, Type::TEXT_ARRAY),
                (&token, Type::INT8),
                (&millis(ttl), Type::FLOAT8),
            ],
        )
        .await?;
        Ok(get::<Option<f64>>(&row, 0)?.map(unix_seconds))
    }

    async fn release_all(&self, keys: &[String], token: i64) -> Result<bool, Error> {
        let row = query(
            self,
            sql::RELEASE_ALL,
            &[(&keys, Type::TEXT_ARRAY), (&token, Type::INT8)],
        )
        .await?;
        get(&row, 0)
    }

    async fn watch(
        &self,
        key: &str,
        known: Option<i64>,
        wait: Duration,
    ) -> Result<Option<crate::LeaseInfo>, Error> {
        let row = query_waiting(
            self,
            sql::WATCH,
            &[
                (&key, Type::TEXT),
                (&known, Type::INT8),
                (&millis(wait), Type::FLOAT8),
            ],
        )
        .await?;
        Ok(watched(
            key,
            get(&row, 0)?,
            get(&row, 1)?,
            get(&row, 2)?,
            get(&row, 3)?,
        ))
    }

    async fn keep_history(&self, key: &str, keep: Duration) -> Result<Option<i64>, Error> {
        let row = query(
            self,
            sql::KEEP_HISTORY,
            &[(&key, Type::TEXT), (&millis(keep), Type::FLOAT8)],
        )
        .await?;
        get(&row, 0)
    }

    async fn history(
        &self,
        key: &str,
        after: Option<i64>,
        wait: Duration,
    ) -> Result<Vec<crate::Term>, Error> {
        let row = query_waiting(
            self,
            sql::HISTORY,
            &[
                (&key, Type::TEXT),
                (&after, Type::INT8),
                (&millis(wait), Type::FLOAT8),
            ],
        )
        .await?;
        terms(
            key,
            get(&row, 0)?,
            get(&row, 1)?,
            get(&row, 2)?,
            get(&row, 3)?,
        )
    }

    async fn renew(
        &self,
        key: &str,
        token: i64,
        ttl: Duration,
    ) -> Result<Option<SystemTime>, Error> {
        let row = query(
            self,
            sql::RENEW,
            &[
                (&key, Type::TEXT),
                (&token, Type::INT8),
                (&millis(ttl), Type::FLOAT8),
            ],
        )
        .await?;
        Ok(get::<Option<f64>>(&row, 0)?.map(unix_seconds))
    }

    async fn release(&self, key: &str, token: i64) -> Result<bool, Error> {
        let row = query(
            self,
            sql::RELEASE,
            &[(&key, Type::TEXT), (&token, Type::INT8)],
        )
        .await?;
        get(&row, 0)
    }
}

/// A pooled connection for one statement that may wait in the server (an
/// acquire, a watch). Dropped before the statement answered (the caller
/// gave up on the future), the connection is taken out of the pool and
/// closed rather than handed to the next user with the wait still running
/// on it, whose statements would queue behind it; the server sees the
/// client gone at its next wake-up and ends the wait.
struct Own(Option<deadpool_postgres::Object>, bool);

/// One key's acquire, exclusive ([`sql::ACQUIRE`]) or shared
/// ([`sql::ACQUIRE_SHARED`]): the same arguments, the same row.
async fn acquire_one(
    pool: &Pool,
    text: &str,
    key: &str,
    ttl: Duration,
    holder: &str,
    wait: Duration,
    adopt: bool,
) -> Result<Option<Grant>, Error> {
    let row = query_waiting(
        pool,
        text,
        &[
            (&key, Type::TEXT),
            (&millis(ttl), Type::FLOAT8),
            (&holder, Type::TEXT),
            (&millis(wait), Type::FLOAT8),
            (&adopt, Type::BOOL),
        ],
    )
    .await?;
    Ok(grant(get(&row, 0)?, get(&row, 1)?, get(&row, 2)?))
}

/// A statement's parameters, each with its type: sent with the statement
/// in one round trip (`query_typed`: an unnamed statement, parsed, bound
/// and run before one `Sync`), so nothing prepared outlives it and it
/// works through a transaction pooler (PgBouncer in transaction mode,
/// whatever its version), which may give the next statement to another
/// server connection.
type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

/// Run one statement on a pooled connection: its one row.
async fn query(pool: &Pool, text: &str, params: &Params<'_>) -> Result<tokio_postgres::Row, Error> {
    let client = pool.get().await.map_err(pool_error)?;
    one_row(&client, text, params).await
}

async fn one_row(
    client: &deadpool_postgres::Object,
    text: &str,
    params: &Params<'_>,
) -> Result<tokio_postgres::Row, Error> {
    let mut rows = client.query_typed(text, params).await.map_err(error)?;
    match (rows.pop(), rows.is_empty()) {
        (Some(row), true) => Ok(row),
        (_, _) => Err(Error::Decode(
            "query returned an unexpected number of rows".into(),
        )),
    }
}

/// Run one statement that may wait in the server (an acquire, a watch) on
/// a connection held through [`Own`].
async fn query_waiting(
    pool: &Pool,
    text: &str,
    params: &Params<'_>,
) -> Result<tokio_postgres::Row, Error> {
    let mut own = Own(Some(pool.get().await.map_err(pool_error)?), false);
    let client = own.0.as_ref().expect("held until dropped");
    let answer = one_row(client, text, params).await;
    // Answered (or failed): the connection may go back to the pool.
    own.1 = true;
    answer
}

impl Drop for Own {
    fn drop(&mut self) {
        if let (Some(object), false) = (self.0.take(), self.1) {
            drop(deadpool_postgres::Object::take(object));
        }
    }
}

/// Attach a lease's token to an open transaction (`SET LOCAL fence.token`),
/// so writes to tables under `fence.protect()` carry it. It takes a
/// transaction: outside one the setting would end with its own statement.
/// Cancel safety: if cancelled, the setting may or may not be in place.
pub async fn set_fence_token(
    transaction: &deadpool_postgres::Transaction<'_>,
    token: i64,
) -> Result<(), Error> {
    transaction
        .query_typed(sql::SET_FENCE_TOKEN, &[(&token.to_string(), Type::TEXT)])
        .await
        .map_err(error)?;
    Ok(())
}

/// Map a tokio-postgres error: the server's SQLSTATE through
/// [`Error::from_sqlstate`], anything else as [`Error::Connection`].
pub fn error(error: tokio_postgres::Error) -> Error {
    match error.as_db_error() {
        Some(db) => Error::from_sqlstate(db.code().code(), db.message().to_owned()),
        // tokio-postgres' encode, decode and row-count failures: the server
        // answered, so not a lost reply.
        None if [
            "error serializing",
            "error deserializing",
            "query returned an unexpected number of rows",
        ]
        .iter()
        .any(|prefix| error.to_string().starts_with(prefix)) =>
        {
            Error::Decode(error.to_string())
        }
        None => Error::Connection(error.to_string()),
    }
}

/// Column `index` of `row`: a value that does not decode is
/// [`Error::Decode`] (tokio-postgres' `Row::get` would panic).
fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
) -> Result<T, Error> {
    row.try_get(index)
        .map_err(|failed| Error::Decode(failed.to_string()))
}

/// Map a pool error: a server error (opening a connection) keeps its
/// SQLSTATE; anything else is [`Error::Pool`]: no statement was sent.
pub fn pool_error(error: deadpool_postgres::PoolError) -> Error {
    match error {
        deadpool_postgres::PoolError::Backend(error) if error.as_db_error().is_some() => {
            self::error(error)
        }
        other => Error::Pool(other.to_string()),
    }
}
