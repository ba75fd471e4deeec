-- The lease API's results, one session.
SELECT coalesce(max(token), 0) AS before FROM fence.leases \gset
SELECT lock_key, holder, token - :before AS token_after_the_last, expires_at - acquired_at AS ttl
  FROM fence.lock_acquire('golden:a', '30 seconds', 'h1');
SELECT token AS t FROM fence.lock_status('golden:a') \gset
-- Busy: NULL, not an error.
SELECT fence.lock_acquire('golden:a', '30 seconds', 'h2') IS NULL AS busy;
-- The same holder again (G6): the same token, the expiry moved.
SELECT token = :t AS same_token, expires_at - clock_timestamp() BETWEEN interval '59 seconds' AND interval '60 seconds' AS expiry_moved FROM fence.lock_acquire('golden:a', '1 minute', 'h1');
SELECT lock_key, holder, token = :t AS live_token, owner_role FROM fence.locks WHERE lock_key LIKE 'golden:%';
SELECT fence.lock_renew('golden:a', :t) - clock_timestamp() BETWEEN interval '59 seconds' AND interval '60 seconds' AS renewed_by_its_own_ttl;
SELECT fence.lock_renew('golden:a', :t, '1 day') - clock_timestamp() > interval '23 hours 59 minutes' AS renewed_by_a_day;
SELECT fence.lock_renew('golden:a', :t + 1000) AS wrong_token_renews_nothing;
SELECT fence.lock_release('golden:a', :t + 1000) AS wrong_token_releases_nothing;
SELECT fence.lock_release('golden:a', :t) AS released;
SELECT fence.lock_release('golden:a', :t) AS released_twice;
SELECT fence.lock_renew('golden:a', :t) AS renew_after_release;
SELECT fence.lock_status('golden:a') IS NULL AS free, fence.current_token('golden:a') = :t AS current_token_kept;
-- Tokens only grow, across keys.
SELECT token - :t AS next FROM fence.lock_acquire('golden:b', '30 seconds', 'h1');
SELECT token - :t AS next FROM fence.lock_acquire('golden:a', '30 seconds', 'h2');
SELECT fence.current_token('golden:never') AS never_leased;
SELECT fence.lock_force_release('golden:b') AS forced;
SELECT fence.lock_force_release('golden:b') AS forced_again;
-- A day is 24 hours, whatever the TimeZone (G5); ttls are kept as seconds.
SET TimeZone = 'America/New_York';
SELECT extract(epoch FROM expires_at - acquired_at) AS seconds
  FROM fence.lock_acquire('golden:day', '1 day', 'h1');
SELECT ttl FROM fence.leases WHERE lock_key = 'golden:day';
RESET TimeZone;
-- Run-once records.
BEGIN;
SELECT fence.claim_operation('golden:op') AS first_claim;
COMMIT;
SELECT fence.claim_operation('golden:op') AS claimed_again;
BEGIN;
SELECT fence.claim_operation('golden:rolled-back') AS claim;
ROLLBACK;
SELECT fence.claim_operation('golden:rolled-back') AS claim_after_rollback;
