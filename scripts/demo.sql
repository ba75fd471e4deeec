-- The pg_fence story, in SQL. Run by `make demo`; every result below is real,
-- and `make test` checks it (extension/tests/pg_regress/expected/demo.out).
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
       round(extract(epoch FROM clock_timestamp() - statement_timestamp())) AS waited_seconds
  FROM fence.lock_acquire('invoice:42', ttl => '30 seconds', holder => 'worker-b', wait => '10 seconds');

\echo '== A wakes up and tries to renew its old lease: NULL, it is no longer live.'
SELECT fence.lock_renew('invoice:42', :a_token) AS a_renewed_until;

\echo '== B finishes and releases with its token.'
SELECT fence.lock_release('invoice:42', (fence.lock_status('invoice:42')).token) AS released;

\echo '== The key is free; current_token still remembers the last token issued for it.'
SELECT fence.lock_status('invoice:42') IS NULL AS free, fence.current_token('invoice:42') AS current_token;

\echo
\echo '================================================================================'
\echo '== Fencing inside the database: the payment-capture story.'
\echo '== A DBA fences the payments table: row N may only be written by the holder of'
\echo '== the live lease on payment:N, carrying its token in fence_token.'
CREATE TABLE payments (
    id          int PRIMARY KEY,
    amount      numeric NOT NULL,
    captured_by text,
    fence_token bigint
);
INSERT INTO payments (id, amount) VALUES (7, 120.00);
SELECT fence.protect('payments', key_column => 'id', key_prefix => 'payment:', token_column => 'fence_token');

\echo '== Worker A takes the lease on payment:7 ...'
SELECT holder, token FROM fence.lock_acquire('payment:7', ttl => '1 second', holder => 'worker-a');
\set ECHO none
SELECT token AS a_token FROM fence.lock_status('payment:7') \gset
\set ECHO queries

\echo '== ... and stalls (a GC pause, a slow network) past its ttl. Worker B waits for'
\echo '== the key, takes over with a larger token, and captures the payment.'
SELECT holder, token FROM fence.lock_acquire('payment:7', ttl => '30 seconds', holder => 'worker-b', wait => '5 seconds');
\set ECHO none
SELECT token AS b_token FROM fence.lock_status('payment:7') \gset
\set ECHO queries
UPDATE payments SET captured_by = 'worker-b', fence_token = :b_token WHERE id = 7;

\echo '== Worker A wakes up, still believing it holds the lock, and captures too.'
\echo '== The database itself refuses the stale write:'
UPDATE payments SET captured_by = 'worker-a', fence_token = :a_token WHERE id = 7;
\echo SQLSTATE :LAST_ERROR_SQLSTATE

\echo '== Captured once, by the lease holder:'
SELECT id, amount, captured_by, fence_token FROM payments;
