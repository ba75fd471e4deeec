-- Fenced writes (G3), one session: what is refused, and why.
\set SHOW_CONTEXT never
CREATE TABLE golden_pay (id int PRIMARY KEY, acct int NOT NULL, note text, tok bigint);
SELECT fence.protect('golden_pay', key_column => 'acct', key_prefix => 'acct:', token_column => 'tok');
SELECT tbl, lock_key, key_column, key_prefix, token_column, enforced FROM fence.protected_tables;
SELECT token AS t FROM fence.lock_acquire('acct:1', '5 minutes', 'w') \gset
INSERT INTO golden_pay VALUES (1, 1, 'first', :t);
INSERT INTO golden_pay VALUES (2, 2, 'no lease', :t);
\echo :LAST_ERROR_SQLSTATE
INSERT INTO golden_pay VALUES (3, 1, 'no token', NULL);
\echo :LAST_ERROR_SQLSTATE
-- An UPDATE that does not assign the token column presents none.
UPDATE golden_pay SET note = 'partial' WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
UPDATE golden_pay SET note = 'assigned', tok = :t WHERE id = 1;
BEGIN;
SET LOCAL fence.token = :'t';
UPDATE golden_pay SET note = 'fence.token' WHERE id = 1;
COMMIT;
BEGIN;
SET LOCAL fence.token = 'not a number';
DELETE FROM golden_pay WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
UPDATE golden_pay SET note = 'lowered', tok = :t - 1 WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
UPDATE golden_pay SET acct = NULL, tok = :t WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
DELETE FROM golden_pay WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
TRUNCATE golden_pay;
SELECT id, acct, note, tok = :t AS live_token FROM golden_pay;
-- Partitions and children carry the fence.
CREATE TABLE golden_parted (id int, v text) PARTITION BY RANGE (id);
CREATE TABLE golden_parted_1 PARTITION OF golden_parted FOR VALUES FROM (0) TO (10);
SELECT fence.protect('golden_parted', lock_key => 'parted');
CREATE TABLE golden_parted_2 PARTITION OF golden_parted FOR VALUES FROM (10) TO (20);
SELECT c.relname, t.tgname, t.tgparentid <> 0 AS clone, t.tgenabled
  FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
 WHERE c.relname LIKE 'golden_parted%' ORDER BY 1, 2;
INSERT INTO golden_parted VALUES (15, 'stale');
\echo :LAST_ERROR_SQLSTATE
SELECT fence.unprotect('golden_parted_2');
\echo :LAST_ERROR_SQLSTATE
ALTER TABLE golden_pay ALTER COLUMN acct TYPE timestamptz USING now();
\echo :LAST_ERROR_SQLSTATE
SELECT fence.unprotect('golden_parted');
SELECT fence.unprotect('golden_pay');
SELECT count(*) AS fenced_tables FROM fence.protected_tables;
DROP TABLE golden_pay, golden_parted;
