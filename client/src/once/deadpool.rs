//! Run-once over deadpool-postgres.

use deadpool_postgres::{Pool, Transaction};
use tokio_postgres::types::Type;

use super::Once;
use crate::backend::deadpool::error;
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
/// back (the connection's transaction is dropped); dropped during the
/// commit, the work may or may not have been committed, and a retry tells.
pub async fn run_once<T, E, F>(pool: &Pool, op_key: &str, work: F) -> Result<Once<T>, E>
where
    E: From<Error>,
    F: for<'t> FnOnce(&'t Transaction<'t>) -> Work<'t, T, E>,
{
    let mut client = pool
        .get()
        .await
        .map_err(crate::backend::deadpool::pool_error)?;
    let transaction = client.transaction().await.map_err(error)?;
    // query_typed: one unnamed statement, nothing prepared that could
    // outlive the transaction on a pooler's server connection.
    let claim = transaction
        .query_typed(sql::CLAIM_OPERATION_IN, &[(&op_key, Type::TEXT)])
        .await
        .map_err(error)?
        .pop()
        .ok_or_else(|| Error::Decode("claim_operation returned no row".into()))?;
    let claimed: bool = claim.try_get(0).map_err(error)?;
    let xid: Option<String> = claim.try_get(1).map_err(error)?;
    if !claimed {
        transaction.rollback().await.map_err(error)?;
        return Ok(Once::AlreadyDone);
    }
    let value = work(&transaction).await?;
    // In an aborted transaction every statement fails (25P02), and COMMIT
    // would roll back without an error.
    match transaction.query_typed(sql::STILL_OPEN, &[]).await {
        Ok(rows) => {
            let now = match rows.first() {
                Some(row) => row.try_get::<_, Option<String>>(0).map_err(error)?,
                None => None,
            };
            if now != xid {
                return Err(Error::WorkEndedTransaction.into());
            }
        }
        Err(failed) => {
            return Err(match failed.as_db_error() {
                Some(db) if db.code().code() == "25P02" => Error::WorkRolledBack {
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
