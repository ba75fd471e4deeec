-- Statistics and waiters (preload mode): views over the shared memory that
-- stats.rs and waiters.rs keep. Without shared_preload_libraries = 'pg_fence'
-- reading them fails with SQLSTATE 55000 and a hint; nothing else does.

-- One row per key class of this database (the key up to its first ':', or
-- the whole key). Counts since stats_reset; see the README, "Statistics".
CREATE OR REPLACE VIEW fence.lock_stats AS
SELECT * FROM fence._lock_stats();

-- Cumulative counts of acquire calls per class that answered within le
-- seconds (le = 'Infinity' counts them all), for Prometheus-style histograms.
CREATE OR REPLACE VIEW fence.lock_wait_histogram AS
SELECT * FROM fence._lock_wait_histogram();

-- The statistics' own tables, for all databases: how many key classes and
-- fenced tables they keep (fence.stats_max_classes, fence.stats_max_tables),
-- how many are in use, and how many counts had no row to go to.
CREATE OR REPLACE VIEW fence.lock_stats_info AS
SELECT * FROM fence._lock_stats_info();

-- Sessions of this database waiting inside lock_acquire, and their place in
-- each key's queue (position 1 is next).
CREATE OR REPLACE VIEW fence.waiters AS
SELECT w.pid,
       w.role::pg_catalog.regrole AS role,
       w.lock_key,
       w.mode,
       w.waiting_since,
       w.wait_until,
       w.position
  FROM fence._waiters() AS w;

GRANT SELECT ON fence.lock_stats, fence.lock_wait_histogram, fence.lock_stats_info, fence.waiters TO PUBLIC;
