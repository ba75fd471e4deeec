//! Run-once over deadpool-postgres.

use deadpool_postgres::{Pool, Transaction};

use super::Once;
use crate::backend::deadpool::error;
use crate::{sql, Error};

pub use super::Work;

/// Run `work` once per `op_key` (per database role): in one transaction with
/// its run-once record. If the work fails, nothing is committed and a later
/// call runs it again.
///
/// Cancel safety: dropping the future before the commit rolls everything
/// back (the connection's transaction is dropped); dropped during the
/// commit, the work may or may not have been committed, and a retry tells.
pub async fn run_once<T, F>(pool: &Pool, op_key: &str, work: F) -> Result<Once<T>, Error>
where
    F: for<'t> FnOnce(&'t Transaction<'t>) -> Work<'t, T>,
{
    let mut client = pool
        .get()
        .await
        .map_err(crate::backend::deadpool::pool_error)?;
    let transaction = client.transaction().await.map_err(error)?;
    let claimed: bool = transaction
        .query_one(sql::CLAIM_OPERATION, &[&op_key])
        .await
        .map_err(error)?
        .get(0);
    if !claimed {
        transaction.rollback().await.map_err(error)?;
        return Ok(Once::AlreadyDone);
    }
    let value = work(&transaction).await?;
    transaction.commit().await.map_err(error)?;
    Ok(Once::Ran(value))
}
