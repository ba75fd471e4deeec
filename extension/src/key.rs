//! Lock keys: what a valid key is (22004 / 22023), and the one hash that
//! stands for a key in the lock manager (keylock.rs) and in a waiter's
//! advertised wait event (wait.rs).

use crate::errors::{fail, Failure, FenceError};

/// Longest accepted key, in bytes (DESIGN.md).
pub const MAX_KEY_BYTES: usize = 1024;

pub fn check_key<'a>(
    function: &'static str,
    lock_key: Option<&'a str>,
) -> Result<&'a str, Failure> {
    check_text_key(function, "lock_key", lock_key)
}

/// A key-like argument: not NULL (22004), 1 to [`MAX_KEY_BYTES`] bytes (22023).
pub fn check_text_key<'a>(
    function: &'static str,
    argument: &'static str,
    value: Option<&'a str>,
) -> Result<&'a str, Failure> {
    let Some(key) = value else {
        return fail(FenceError::NullArgument { function, argument });
    };
    let invalid = |problem: String| FenceError::InvalidArgument {
        function,
        argument,
        problem,
    };
    if key.is_empty() {
        return fail(invalid("must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return fail(invalid(format!(
            "is {} bytes long, the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(key)
}

/// The key's 32-bit FNV-1a hash: stable across versions and platforms,
/// unlike `hashtext`. The key lock's tag and the wait event both use it.
pub fn hash(lock_key: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in lock_key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::check_key;
    use crate::errors::FenceError;
    use pgrx::prelude::*;

    #[pg_test]
    fn key_checks_name_the_argument() {
        let check_key = |value| check_key("f", value).map_err(|failure| failure.error);
        assert_eq!(check_key(Some("a")), Ok("a"));
        assert_eq!(
            check_key(None),
            Err(FenceError::NullArgument {
                function: "f",
                argument: "lock_key"
            })
        );
        let long = "k".repeat(1025);
        let error = check_key(Some(&long)).unwrap_err();
        assert_eq!(error.sqlstate(), "22023");
        assert!(
            error.message().contains("1025 bytes"),
            "{}",
            error.message()
        );
        assert_eq!(check_key(Some("")).unwrap_err().sqlstate(), "22023");
        let longest = "k".repeat(1024);
        assert_eq!(check_key(Some(&longest)), Ok(longest.as_str()));
    }

    #[pg_test(error = "lock_acquire: argument \"lock_key\" must not be NULL")]
    fn null_key_is_rejected() {
        Spi::run("SELECT fence.lock_acquire(NULL)").unwrap();
    }
}
