-- The pg_fence story, in SQL. Run by `make demo`; every result below is real.
\pset footer off
\set ECHO queries

\echo
\echo '== Two workers race for invoice:42. Worker A asks first: a lease and a fencing token.'
SELECT lock_key, holder, token, expires_at - acquired_at AS ttl
  FROM fence.lock_acquire('invoice:42', ttl => '2 seconds', holder => 'worker-a');

\set ECHO none
SELECT token AS a_token FROM fence.lock_status('invoice:42') \gset
\set ECHO queries

\echo '== Worker B asks too, without waiting: the key is busy, so NULL (not an error).'
SELECT fence.lock_acquire('invoice:42', ttl => '30 seconds', holder => 'worker-b') IS NULL AS busy;

\echo '== Who holds what, right now:'
SELECT lock_key, holder, token, owner_role FROM fence.locks;

\echo '== Worker A stalls and never renews. Worker B waits inside the server (no polling'
\echo '== from the client) for up to 10 seconds: it is granted the moment A''s lease'
\echo '== expires by the server''s clock, with a larger token.'
SELECT lock_key, holder, token,
       round(extract(epoch FROM clock_timestamp() - statement_timestamp())::numeric, 1) AS waited_seconds
  FROM fence.lock_acquire('invoice:42', ttl => '30 seconds', holder => 'worker-b', wait => '10 seconds');

\echo '== A wakes up and tries to renew its old lease: NULL, it is no longer live.'
SELECT fence.lock_renew('invoice:42', :a_token) AS a_renewed_until;

\echo '== B finishes and releases with its token.'
SELECT fence.lock_release('invoice:42', (fence.lock_status('invoice:42')).token) AS released;

\echo '== The key is free; current_token still remembers the last token issued for it.'
SELECT fence.lock_status('invoice:42') IS NULL AS free, fence.current_token('invoice:42') AS current_token;
