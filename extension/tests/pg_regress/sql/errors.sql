-- Every bad input: its message, and its SQLSTATE (the contract).
\set SHOW_CONTEXT never
SELECT fence.lock_acquire(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_acquire('');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_acquire(repeat('k', 1025));
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_acquire('k', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_acquire('k', '0');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_acquire('k', '-1 second');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_acquire('k', '1 day 1 second');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_acquire('k', '1 mon');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_acquire('k', '1000 months -29999 days');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_acquire('k', '1 second', 'h', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_acquire('k', '1 second', 'h', '-1 ms');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_acquire('k', '1 second', '');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_renew(NULL, 1);
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_renew('k', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_renew('k', 1, '0');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_release('k', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_force_release(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT fence.lock_status('');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.claim_operation('');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.forget_operations(NULL);
\echo :LAST_ERROR_SQLSTATE
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT fence.lock_acquire('k', '1 second', 'h', '1 second');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
-- protect() checks its arguments.
CREATE TABLE golden_accounts (id int, acct int, tok bigint, at timestamptz,
                              gen text GENERATED ALWAYS AS ('a' || acct) STORED);
SELECT fence.protect(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT fence.protect('golden_accounts');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.protect('golden_accounts', lock_key => 'x', key_column => 'acct');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.protect('golden_accounts', key_column => 'nope');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.protect('golden_accounts', key_column => 'at');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.protect('golden_accounts', key_column => 'gen');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.protect('golden_accounts', key_column => 'acct', token_column => 'at');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.protect('golden_accounts', lock_key => '');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.protect('fence.locks');
\echo :LAST_ERROR_SQLSTATE
DROP TABLE golden_accounts;
