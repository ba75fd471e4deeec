//! Row locks and compare-and-set over deadpool-postgres. The row locks
//! take a `deadpool_postgres::Transaction`, so a plain connection
//! (autocommit, where a row lock ends with its statement) does not compile;
//! compare-and-set is one atomic statement and takes any client (it runs
//! in a transaction of its own, so it is safe behind a transaction pooler).

use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{Cas, RowLock, Table};
use crate::backend::deadpool::error;
use crate::{sql, Error};

/// Lock the row whose key is `key`: `None` if there is none (or, with
/// [`RowLock::SkipLocked`], if another transaction holds it).
pub async fn lock_row(
    client: &Transaction<'_>,
    table: Table<'_>,
    key: &(dyn ToSql + Sync),
    mode: RowLock,
) -> Result<Option<Row>, Error> {
    let text = sql::lock_row(table.name, table.key_column, mode.suffix());
    client.query_opt(&text, &[key]).await.map_err(error)
}

/// Claim up to `limit` rows matching `filter` (your SQL, e.g.
/// `state = 'ready'`), lowest key first, skipping rows other workers hold:
/// each row goes to exactly one of several concurrent claimers.
pub async fn claim(
    client: &Transaction<'_>,
    table: Table<'_>,
    filter: &str,
    limit: i64,
) -> Result<Vec<Row>, Error> {
    let text = sql::claim(table.name, table.key_column, filter, limit);
    client.query(&text, &[]).await.map_err(error)
}

/// Set the row with `key` by `assignment` (your SQL using `$3` for `value`,
/// e.g. `state = $3`) if its `version_column` still equals `expected`, and
/// bump that version. Unlike the row locks it needs no transaction of
/// yours, so it takes any client: a pooled connection in autocommit, or a
/// `deadpool_postgres::Transaction` to make it part of one. It runs in a
/// transaction of its own (`BEGIN` … `COMMIT`; a savepoint inside a
/// `Transaction`), so its statements, prepared by tokio-postgres, stay on
/// one server connection behind a transaction pooler (PgBouncer in
/// transaction mode). A transaction you opened with `BEGIN` sent as SQL is
/// not one the driver knows of: its `COMMIT` would end yours, so use the
/// driver's `transaction()`. Cancel safety: a call dropped before its
/// `COMMIT` was sent rolls back (nothing set); one dropped while
/// committing may have set it, as any dropped `COMMIT` may.
pub async fn compare_and_set(
    client: &mut impl GenericClient,
    table: Table<'_>,
    key: &(dyn ToSql + Sync),
    version_column: &str,
    expected: i64,
    assignment: &str,
    value: &(dyn ToSql + Sync),
) -> Result<Cas, Error> {
    let update = sql::compare_and_set(table.name, table.key_column, version_column, assignment);
    let current = sql::current_version(table.name, table.key_column, version_column);
    let transaction = client.transaction().await.map_err(error)?;
    let outcome = match transaction
        .query_opt(&update, &[key, &expected, value])
        .await
        .map_err(error)?
    {
        Some(row) => Cas::Updated {
            version: row.try_get(0).map_err(error)?,
        },
        None => Cas::Conflict {
            current: match transaction
                .query_opt(&current, &[key])
                .await
                .map_err(error)?
            {
                Some(row) => Some(row.try_get(0).map_err(error)?),
                None => None,
            },
        },
    };
    transaction.commit().await.map_err(error)?;
    Ok(outcome)
}
