-- Statistics and waiters (preload mode): a known workload in a fresh
-- database, then exactly its counts. The README's "Statistics" excerpt is
-- this file's expected output.
SELECT fence.lock_stats_reset();
SELECT token > 0 AS granted FROM fence.lock_acquire('invoice:1', '30 seconds', 'worker-a');
SELECT fence.lock_acquire('invoice:1', '30 seconds', 'worker-b') IS NULL AS busy;
SELECT token > 0 AS regranted FROM fence.lock_acquire('invoice:1', '30 seconds', 'worker-a');
SELECT fence.lock_renew('invoice:1', fence.current_token('invoice:1')) IS NOT NULL AS renewed;
SELECT fence.lock_release('invoice:1', fence.current_token('invoice:1')) AS released;
SELECT fence.lock_release('invoice:1', fence.current_token('invoice:1')) AS released_again;
SELECT token > 0 AS granted FROM fence.lock_acquire('nightly-report', '1 minute');
SELECT key_class, acquires, grants, regrants, contended, busy, renewals, releases, releases_lost
  FROM fence.lock_stats ORDER BY key_class;
SELECT le, count FROM fence.lock_wait_histogram
 WHERE key_class = 'invoice' AND le IN (5, 'Infinity') ORDER BY le;
SELECT * FROM fence.waiters;
-- Resetting is for fence_admin.
CREATE ROLE fence_regress_stats_user;
SET ROLE fence_regress_stats_user;
SELECT fence.lock_stats_reset();
RESET ROLE;
DROP ROLE fence_regress_stats_user;
SELECT fence.lock_stats_reset();
SELECT count(*) FROM fence.lock_stats;
