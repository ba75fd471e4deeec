//! Run-once records: the server half of the client's idempotency helper
//! ("locks reduce risk; idempotency eliminates it").
//!
//! `fence.claim_operation(op_key)` records that the calling role is doing the
//! operation `op_key`, inside the caller's transaction. The first claim
//! returns true; once that transaction has committed, every later claim
//! returns false. A concurrent claim of the same key waits for the first
//! transaction: false if it commits, true (its turn) if it rolls back. So the
//! work done in the claiming transaction happens exactly once per key.
//! Keys are per role: two roles never collide.

use pgrx::prelude::*;

use crate::errors::{Failure, FenceError};
use crate::key::check_text_key;
use crate::roles::caller_role;

pub fn claim(op_key: Option<&str>) -> Result<bool, Failure> {
    crate::roles::refuse_security_restricted("claim_operation")?;
    let key = check_text_key("claim_operation", "op_key", op_key)?;
    let role = caller_role();
    Spi::connect_mut(|client| {
        let inserted = client.update(
            "INSERT INTO fence.operations (owner_role, op_key) VALUES ($1, $2) \
             ON CONFLICT (owner_role, op_key) DO NOTHING RETURNING true",
            Some(1),
            &[role.into(), key.into()],
        )?;
        Ok(!inserted.is_empty())
    })
}

pub fn forget(older_than: Option<pgrx::datum::Interval>) -> Result<i64, Failure> {
    crate::roles::refuse_security_restricted("forget_operations")?;
    let older_than = older_than.ok_or(FenceError::NullArgument {
        function: "forget_operations",
        argument: "older_than",
    })?;
    let role = caller_role();
    let admin = crate::roles::is_fence_admin(role);
    Spi::connect_mut(|client| {
        let deleted = client.update(
            "DELETE FROM fence.operations \
              WHERE claimed_at < pg_catalog.clock_timestamp() - $1 AND ($2 OR owner_role = $3)",
            None,
            &[older_than.into(), admin.into(), role.into()],
        )?;
        Ok(deleted.len() as i64)
    })
}
