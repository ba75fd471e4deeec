//! Lock keys: what a valid key is (22004 / 22023), and the two hashes that
//! stand for a key: the keyed lock hash of the lock manager (keylock.rs),
//! and the plain one a waiter advertises in its wait event (wait.rs).

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
/// unlike `hashtext`. Waiters advertise it (wait.rs), where a collision
/// only costs a wake-up.
pub fn hash(lock_key: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in lock_key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The key's lock hash (keylock.rs): SipHash-2-4 of the key under this
/// database's secret (`fence.key_secret`, made at CREATE EXTENSION from the
/// server's strong random source, unchangeable while the extension exists),
/// as two 32-bit halves, both in the lock tag. Two keys with one lock hash
/// share a lock; a plain role that could find a key sharing a victim's (the
/// FNV-1a of 0.1 is easily inverted, and any 32-bit hash can be searched
/// through by brute force) could hold the victim's key with a lease of its
/// own. With 64 bits that is a 2^64 search. Without the secret table (the
/// 0.1.0 schema, before its upgrade), 0.1's tag: class 'FENC', FNV-1a.
pub fn lock_hash(lock_key: &str) -> (u32, u32) {
    match secret() {
        Some(secret) => {
            let hash = siphash24(&secret, lock_key.as_bytes());
            ((hash >> 32) as u32, hash as u32)
        }
        None => (0x4645_4E43, hash(lock_key)),
    }
}

thread_local! {
    /// The secret, with the OID of the table it was read from (a DROP and
    /// CREATE EXTENSION makes a new one).
    static SECRET: std::cell::Cell<Option<(pgrx::pg_sys::Oid, [u8; 16])>> =
        const { std::cell::Cell::new(None) };
}

fn secret() -> Option<[u8; 16]> {
    let table = crate::catalog::key_secret()?;
    if let Some((known, secret)) = SECRET.get() {
        if known == table {
            return Some(secret);
        }
    }
    let Some(secret) = read_secret(table) else {
        // The table exists but holds no secret: never fall back to a hash
        // that backends which did read one would not share.
        pgrx::error!("pg_fence: fence.key_secret holds no secret; re-create the extension");
    };
    SECRET.set(Some((table, secret)));
    Some(secret)
}

/// The first 16 bytes of the one row of `fence.key_secret`, read directly
/// (no privilege check: no plain role may read the table, but every backend
/// needs it), with the latest snapshot.
fn read_secret(table: pgrx::pg_sys::Oid) -> Option<[u8; 16]> {
    use pgrx::pg_sys;
    // SAFETY: the table is opened and closed here (AccessShareLock, kept
    // to the end of the transaction); the snapshot is registered for the
    // scan; the tuple's first attribute is read with heap_getattr's
    // contract (a bytea, detoasted into the current memory context).
    unsafe {
        let relation = pg_sys::table_open(table, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let flags = pg_sys::ScanOptions::SO_TYPE_SEQSCAN | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE;
        let scan = pg_sys::heap_beginscan(
            relation,
            snapshot,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            flags,
        );
        let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
        let mut secret = None;
        if !tuple.is_null() {
            let mut is_null = false;
            let datum = pg_sys::heap_getattr(tuple, 1, (*relation).rd_att, &mut is_null);
            if !is_null {
                let bytes = pgrx::varlena::varlena_to_byte_slice(pg_sys::pg_detoast_datum(
                    datum.cast_mut_ptr(),
                ));
                if bytes.len() >= 16 {
                    let mut key = [0u8; 16];
                    key.copy_from_slice(&bytes[..16]);
                    secret = Some(key);
                }
            }
        }
        pg_sys::heap_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        secret
    }
}

/// SipHash-2-4 (Aumasson and Bernstein), 64-bit output.
pub(crate) fn siphash24(key: &[u8; 16], data: &[u8]) -> u64 {
    let k0 = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
    let k1 = u64::from_le_bytes(key[8..].try_into().expect("8 bytes"));
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let m = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    }
    let mut last = [0u8; 8];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    last[7] = data.len() as u8;
    let m = u64::from_le_bytes(last);
    v[3] ^= m;
    round(&mut v);
    round(&mut v);
    v[0] ^= m;
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// A fresh secret for `fence.key_secret` (sql/fence.sql), from the server's
/// strong random source.
#[pgrx::pg_extern(volatile, parallel_unsafe)]
fn _new_key_secret() -> Vec<u8> {
    let mut bytes = [0u8; 16];
    // SAFETY: writes exactly bytes.len() bytes into the buffer it is given.
    let ok = unsafe { pgrx::pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
    if !ok {
        pgrx::error!("pg_fence: the server has no strong random source for the key secret");
    }
    bytes.to_vec()
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::{check_key, siphash24};
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

    #[pg_test]
    fn siphash_matches_the_reference_vectors() {
        // The paper's test key 00 01 .. 0f; messages 00, 00 01, ... (the
        // reference implementation's vectors 0, 1 and 15).
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        let message: Vec<u8> = (0u8..15).collect();
        assert_eq!(siphash24(&key, &[]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(&key, &message[..1]), 0x74f8_39c5_93dc_67fd);
        assert_eq!(siphash24(&key, &message[..15]), 0xa129_ca61_49be_45e5);
    }
}
