//! pg_fence's configuration parameters (GUCs), all under the `fence.` prefix.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// `fence.max_ttl`: the longest ttl a lease may be acquired or renewed with.
/// Superuser-only, so a role cannot lift its own limit.
static MAX_TTL: GucSetting<i32> = GucSetting::<i32>::new(86_400);

pub fn max_ttl_seconds() -> i32 {
    MAX_TTL.get()
}

pub fn register() {
    GucRegistry::define_int_guc(
        c"fence.max_ttl",
        c"Longest ttl a pg_fence lease may be acquired or renewed with.",
        c"lock_acquire and lock_renew reject a longer ttl with SQLSTATE 22023.",
        &MAX_TTL,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"fence".as_ptr()) };
}
