//! PostgreSQL advisory locks, wrapped.
//!
//! Session locks ([`deadpool::lock_session`], [`sqlx::lock_session`]) belong
//! to a connection: the guard owns a pooled connection until unlocked. That
//! is why session advisory locks **break behind PgBouncer in transaction
//! mode**: the server connection that holds the lock is handed to other
//! clients between transactions, and the unlock may run on another one.
//! pg_fence leases do not have this problem (see [`crate::Lease`]).
//! Transaction locks (`lock_xact`) live inside the caller's transaction and
//! work behind any pooler.
//!
//! Waiting session locks set `lock_timeout` and
//! `client_connection_check_interval` on their connection and `RESET` them
//! before it goes back to the pool: a value your pool set with `SET` on
//! connect is reset to the server's default by that.
//!
//! Cancel safety: a session-lock acquire that is dropped mid-way never
//! returns its connection to the pool; the connection is closed, and the
//! server, which checks for a vanished client every 100 ms while waiting,
//! abandons the wait, so no lock is left behind. A guard dropped without
//! `unlock` closes its connection the same way, which releases the lock.

#[cfg(feature = "deadpool-postgres")]
pub mod deadpool;
#[cfg(feature = "sqlx")]
pub mod sqlx;

use std::time::Duration;

/// An advisory lock key: PostgreSQL's single-`bigint` key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdvisoryKey(pub i64);

impl AdvisoryKey {
    /// A key from a name, through a stable hash: 64-bit FNV-1a of the
    /// name's UTF-8 bytes, as `i64`. It will not change between versions,
    /// so other languages can compute the same key.
    pub fn from_name(name: &str) -> AdvisoryKey {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in name.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        AdvisoryKey(hash as i64)
    }
}

impl From<i64> for AdvisoryKey {
    fn from(key: i64) -> AdvisoryKey {
        AdvisoryKey(key)
    }
}

/// How long to wait for a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Try once.
    No,
    /// Until granted (or cancelled).
    Forever,
    /// Up to this long.
    Up(Duration),
}

impl Wait {
    /// `lock_timeout` for a waiting session lock, in milliseconds (0 = none).
    pub(crate) fn lock_timeout(self) -> String {
        match self {
            // lock_timeout is an int of milliseconds.
            Wait::Up(duration) => duration.as_millis().clamp(1, i32::MAX as u128).to_string(),
            _ => "0".to_owned(),
        }
    }
}

/// `lock_xact` with `Wait::Up`: refused before anything is sent, because a
/// lock timeout would abort the caller's transaction.
pub(crate) fn xact_wait_up_unsupported() -> crate::Error {
    crate::Error::Usage(
        "lock_xact does not support Wait::Up: a lock timeout would abort the transaction".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_keys_are_stable_fnv1a() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(AdvisoryKey::from_name("").0 as u64, 0xcbf2_9ce4_8422_2325);
        assert_eq!(AdvisoryKey::from_name("a").0 as u64, 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            AdvisoryKey::from_name("foobar").0 as u64,
            0x8594_4171_f739_67e8
        );
        assert_ne!(
            AdvisoryKey::from_name("job:1"),
            AdvisoryKey::from_name("job:2")
        );
    }
}
