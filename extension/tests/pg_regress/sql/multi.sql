-- Multi-key leases: every key or none, one token for all of them.
-- The README's "Multi-key leases" excerpt is this file's expected output.
SELECT lock_key, holder, token = fence.current_token('account:1') AS one_token
  FROM fence.lock_acquire_all(ARRAY['account:2', 'account:1'], '30 seconds', 'transfer-7');
-- Someone wanting account:2 and a free account:3 gets neither.
SELECT count(*) AS granted FROM fence.lock_acquire_all(ARRAY['account:2', 'account:3']);
SELECT fence.lock_status('account:3') IS NULL AS account_3_untouched;
-- The transfer retrying (a lost reply, say) gets its leases back: same token.
SELECT token AS t_token FROM fence.lock_status('account:1') \gset
SELECT lock_key, token = :t_token AS same_token
  FROM fence.lock_acquire_all(ARRAY['account:1', 'account:2'], '30 seconds', 'transfer-7');
-- One token fences writes under every key.
CREATE TABLE balances (account text PRIMARY KEY, token bigint, cents bigint);
INSERT INTO balances VALUES ('1', 0, 10000), ('2', 0, 0);
SELECT fence.protect('balances', key_column => 'account', key_prefix => 'account:', token_column => 'token');
BEGIN;
UPDATE balances SET cents = cents - 2500, token = :t_token WHERE account = '1';
UPDATE balances SET cents = cents + 2500, token = :t_token WHERE account = '2';
COMMIT;
SELECT lock_key, holder FROM fence.locks WHERE lock_key LIKE 'account:%' ORDER BY lock_key;
-- Released together: how many were live under the token.
SELECT fence.lock_release_all(ARRAY['account:1', 'account:2'], :t_token) AS released;
-- The token no longer writes under either key.
\set VERBOSITY terse
UPDATE balances SET cents = cents + 1, token = :t_token WHERE account = '2';
SELECT * FROM fence.lock_acquire_all(ARRAY[]::text[]);
SELECT * FROM fence.lock_acquire_all(ARRAY['account:1', NULL]);
SELECT * FROM fence.lock_acquire_all((SELECT array_agg('k' || g) FROM generate_series(1, 65) AS g));
SELECT account, cents FROM balances ORDER BY account;
DROP TABLE balances;
