//! Run-once over sqlx.

use sqlx::{Executor, PgConnection, PgPool, Row};

use super::Once;
use crate::backend::sqlx::error;
use crate::{sql, Error};

pub use super::Work;

/// Run `work` once per `op_key` (per database role): in one transaction with
/// its run-once record. If the work fails, nothing is committed and a later
/// call runs it again; the work's own error comes back as it is.
///
/// `Ran` means committed: work that left its transaction aborted (a SQL
/// error it swallowed) gets [`Error::WorkRolledBack`], and a commit whose
/// reply was lost [`Error::CommitAmbiguous`] (a retry tells).
///
/// Cancel safety: dropping the future before the commit rolls everything
/// back (sqlx rolls back a dropped transaction); dropped during the commit,
/// the work may or may not have been committed, and a retry tells.
pub async fn run_once<T, E, F>(pool: &PgPool, op_key: &str, work: F) -> Result<Once<T>, E>
where
    E: From<Error>,
    F: for<'t> FnOnce(&'t mut PgConnection) -> Work<'t, T, E>,
{
    let mut transaction = pool.begin().await.map_err(error)?;
    let (claimed, xid) = claim(&mut transaction, op_key).await.map_err(error)?;
    if !claimed {
        transaction.rollback().await.map_err(error)?;
        return Ok(Once::AlreadyDone);
    }
    let value = work(&mut transaction).await?;
    // In an aborted transaction every statement fails (25P02), and COMMIT
    // would roll back without an error.
    match still_open(&mut transaction).await {
        Ok(now) if now == xid => {}
        Ok(_) => return Err(Error::WorkEndedTransaction.into()),
        Err(failed) => {
            return Err(match failed.as_database_error() {
                Some(db) if db.code().as_deref() == Some("25P02") => Error::WorkRolledBack {
                    message: db.message().to_owned(),
                },
                _ => error(failed),
            }
            .into())
        }
    }
    match transaction.commit().await {
        Ok(()) => Ok(Once::Ran(value)),
        Err(failed) => Err(super::commit_failed(error(failed)).into()),
    }
}

async fn still_open(connection: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
    // The simple protocol: the work may have ended the transaction, and
    // outside one an unnamed statement's prepare and run may reach
    // different server connections of a transaction pooler.
    let statement = crate::backend::sqlx::Simple(sql::STILL_OPEN.to_owned());
    connection.fetch_one(&statement).await?.try_get_unchecked(0)
}

// A plain query(..) helper: query_scalar would make the future non-Send.
async fn claim(
    connection: &mut PgConnection,
    op_key: &str,
) -> Result<(bool, Option<String>), sqlx::Error> {
    let row = sqlx::query(sql::CLAIM_OPERATION_IN)
        .bind(op_key)
        .persistent(false)
        .fetch_one(connection)
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
