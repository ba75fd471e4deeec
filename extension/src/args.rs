//! Checks of the lease functions' other arguments (22004 / 22023): required
//! values, exact ttls (G5), waits and holders.

use pgrx::datum::Interval;
use pgrx::pg_sys;

use crate::errors::{fail, Failure, FenceError};
use crate::{key, settings};

const USECS_PER_DAY: i128 = 86_400_000_000;

#[track_caller]
pub fn required<T>(
    function: &'static str,
    argument: &'static str,
    value: Option<T>,
) -> Result<T, Failure> {
    match value {
        Some(value) => Ok(value),
        None => fail(FenceError::NullArgument { function, argument }),
    }
}

/// An interval in microseconds, ordered as PostgreSQL orders intervals (a
/// month counts 30 days, a day 24 hours).
pub fn interval_micros(interval: &Interval) -> i128 {
    i128::from(interval.months()) * 30 * USECS_PER_DAY
        + i128::from(interval.days()) * USECS_PER_DAY
        + i128::from(interval.micros())
}

/// A duration argument that may be zero but not negative (a `wait`, a
/// `keep`, an `idle_for`), in microseconds; `22023` otherwise.
pub fn non_negative(
    function: &'static str,
    argument: &'static str,
    interval: &Interval,
) -> Result<i128, Failure> {
    let micros = interval_micros(interval);
    if micros < 0 {
        return fail(FenceError::InvalidArgument {
            function,
            argument,
            problem: "must not be negative".into(),
        });
    }
    Ok(micros)
}

/// A ttl as the exact duration it is used as (G5): a number of
/// microseconds, with a day counted as 24 hours and no months part, so that
/// `expires_at = now + ttl` is the same instant whatever the session's
/// TimeZone and across a DST change. An interval with a months part is
/// refused: a month has no fixed length, and counting it as 30 days (as the
/// max check would) while the expiry used the calendar let
/// `'1000 months -29999 days'` pass as one day and last 437.
pub fn exact_ttl(function: &'static str, ttl: &Interval) -> Result<Interval, Failure> {
    let max_seconds = settings::max_ttl_seconds();
    let invalid = |problem: String| FenceError::InvalidArgument {
        function,
        argument: "ttl",
        problem,
    };
    if ttl.months() != 0 {
        return fail(invalid(
            "has a months part, and a month has no fixed length: give it in days, hours, minutes or seconds".into(),
        ));
    }
    let micros = interval_micros(ttl);
    if micros <= 0 {
        return fail(invalid("must be greater than zero".into()));
    }
    if micros > i128::from(max_seconds) * 1_000_000 {
        return fail(invalid(format!(
            "is over the maximum of {max_seconds} seconds (fence.max_ttl)"
        )));
    }
    // At most i32::MAX seconds, so it fits.
    Interval::new(0, 0, micros as i64).or_else(|_| fail(invalid("is out of range".into())))
}

pub fn check_holder(function: &'static str, holder: Option<&str>) -> Result<String, Failure> {
    match holder {
        None => Ok(random_holder()),
        Some("") => fail(FenceError::InvalidArgument {
            function,
            argument: "holder",
            problem: "must not be empty (pass NULL for a fresh random holder)".into(),
        }),
        Some(h) if h.len() > key::MAX_KEY_BYTES => fail(FenceError::InvalidArgument {
            function,
            argument: "holder",
            problem: format!(
                "is {} bytes long, the limit is {}",
                h.len(),
                key::MAX_KEY_BYTES
            ),
        }),
        Some(h) => Ok(h.to_owned()),
    }
}

/// A fresh holder id: a random (version 4) UUID from the server's strong RNG.
fn random_holder() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: writes exactly bytes.len() bytes into the buffer it is given.
    let ok = unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
    if !ok {
        // pg_strong_random only fails if the OS has no entropy source at all.
        // SAFETY: reads of the backend's clock and of its own pid, no preconditions.
        let fallback = unsafe { pg_sys::GetCurrentTimestamp() } as u128
            ^ (u128::from(unsafe { pg_sys::MyProcPid } as u32) << 64);
        bytes = fallback.to_le_bytes();
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::interval_micros;
    use pgrx::prelude::*;

    #[pg_test]
    fn intervals_order_like_postgres() {
        let micros = |text: &str| {
            let interval: pgrx::datum::Interval =
                Spi::get_one(&format!("SELECT '{text}'::interval"))
                    .unwrap()
                    .unwrap();
            interval_micros(&interval)
        };
        assert_eq!(micros("30 seconds"), 30_000_000);
        assert_eq!(micros("1 day -1 hour"), 23 * 3_600_000_000);
        assert_eq!(micros("1 mon"), 30 * 86_400_000_000);
        assert_eq!(micros("-5 ms"), -5_000);
        assert_eq!(micros("0"), 0);
    }

    #[pg_test(error = "lock_acquire: invalid \"ttl\": must be greater than zero")]
    fn zero_ttl_is_rejected() {
        Spi::run("SELECT fence.lock_acquire('t:z', '0 seconds')").unwrap();
    }
}
