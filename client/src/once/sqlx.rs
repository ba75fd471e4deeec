//! Run-once over sqlx.

use sqlx::{PgConnection, PgPool, Row};

use super::Once;
use crate::backend::sqlx::error;
use crate::{sql, Error};

pub use super::Work;

/// Run `work` once per `op_key` (per database role): in one transaction with
/// its run-once record. If the work fails, nothing is committed and a later
/// call runs it again.
///
/// Cancel safety: dropping the future before the commit rolls everything
/// back (sqlx rolls back a dropped transaction); dropped during the commit,
/// the work may or may not have been committed, and a retry tells.
pub async fn run_once<T, F>(pool: &PgPool, op_key: &str, work: F) -> Result<Once<T>, Error>
where
    F: for<'t> FnOnce(&'t mut PgConnection) -> Work<'t, T>,
{
    let mut transaction = pool.begin().await.map_err(error)?;
    let claimed: bool = claim(&mut transaction, op_key).await.map_err(error)?;
    if !claimed {
        transaction.rollback().await.map_err(error)?;
        return Ok(Once::AlreadyDone);
    }
    let value = work(&mut transaction).await?;
    transaction.commit().await.map_err(error)?;
    Ok(Once::Ran(value))
}

// A plain query(..) helper: query_scalar would make the future non-Send.
async fn claim(connection: &mut PgConnection, op_key: &str) -> Result<bool, sqlx::Error> {
    sqlx::query(sql::CLAIM_OPERATION)
        .bind(op_key)
        .fetch_one(connection)
        .await?
        .try_get(0)
}
