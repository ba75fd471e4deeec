//! Row locks and compare-and-set over sqlx. The row locks take a
//! `sqlx::Transaction`, so a plain connection (autocommit, where a row lock
//! ends with its statement) does not compile; compare-and-set is one atomic
//! statement and takes any connection (it runs in a transaction of its
//! own, so it is safe behind a transaction pooler).

use sqlx::postgres::PgRow;
use sqlx::{Encode, PgConnection, Postgres, Row, Transaction, Type};

use super::{Cas, RowLock, Table};
use crate::backend::sqlx::error;
use crate::{sql, Error};

/// A value sqlx can bind.
pub trait Bind: for<'q> Encode<'q, Postgres> + Type<Postgres> + Send + Sync {}
impl<T: for<'q> Encode<'q, Postgres> + Type<Postgres> + Send + Sync> Bind for T {}

/// Lock the row whose key is `key`: `None` if there is none (or, with
/// [`RowLock::SkipLocked`], if another transaction holds it).
pub async fn lock_row<K: Bind>(
    transaction: &mut Transaction<'_, Postgres>,
    table: Table<'_>,
    key: K,
    mode: RowLock,
) -> Result<Option<PgRow>, Error> {
    let text = sql::lock_row(table.name, table.key_column, mode.suffix());
    sqlx::query(&text)
        .bind(key)
        .persistent(false)
        .fetch_optional(&mut **transaction)
        .await
        .map_err(error)
}

/// Claim up to `limit` rows matching `filter` (your SQL, e.g.
/// `state = 'ready'`), lowest key first, skipping rows other workers hold:
/// each row goes to exactly one of several concurrent claimers.
pub async fn claim(
    transaction: &mut Transaction<'_, Postgres>,
    table: Table<'_>,
    filter: &str,
    limit: i64,
) -> Result<Vec<PgRow>, Error> {
    let text = sql::claim(table.name, table.key_column, filter, limit);
    sqlx::query(&text)
        .persistent(false)
        .fetch_all(&mut **transaction)
        .await
        .map_err(error)
}

/// Set the row with `key` by `assignment` (your SQL using `$3` for `value`,
/// e.g. `state = $3`) if its `version_column` still equals `expected`, and
/// bump that version. Unlike the row locks it needs no transaction of
/// yours, so it takes any connection: a pooled one in autocommit, or
/// `&mut *transaction` (a `sqlx::Transaction`) to make it part of one. It
/// runs in a transaction of its own (`BEGIN` … `COMMIT`; a savepoint inside
/// a `sqlx::Transaction`), so its statements stay on one server connection
/// behind a transaction pooler (PgBouncer in transaction mode). A
/// transaction you opened with `BEGIN` sent as SQL is not one sqlx knows
/// of: its `COMMIT` would end yours, so use `begin()`. Cancel safety: a
/// call dropped before its `COMMIT` was sent rolls back (nothing set); one
/// dropped while committing may have set it, as any dropped `COMMIT` may.
pub async fn compare_and_set<K: Bind + Clone, V: Bind>(
    connection: &mut PgConnection,
    table: Table<'_>,
    key: K,
    version_column: &str,
    expected: i64,
    assignment: &str,
    value: V,
) -> Result<Cas, Error> {
    use sqlx::Connection;
    let update = sql::compare_and_set(table.name, table.key_column, version_column, assignment);
    let current = sql::current_version(table.name, table.key_column, version_column);
    let mut transaction = connection.begin().await.map_err(error)?;
    let updated = sqlx::query(&update)
        .bind(key.clone())
        .bind(expected)
        .bind(value)
        .persistent(false)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(error)?;
    let outcome = match updated {
        Some(row) => Cas::Updated {
            version: row.try_get(0).map_err(error)?,
        },
        None => Cas::Conflict {
            current: sqlx::query(&current)
                .bind(key)
                .persistent(false)
                .fetch_optional(&mut *transaction)
                .await
                .map_err(error)?
                .map(|row| row.try_get(0))
                .transpose()
                .map_err(error)?,
        },
    };
    transaction.commit().await.map_err(error)?;
    Ok(outcome)
}
