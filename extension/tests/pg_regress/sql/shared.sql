-- Shared (reader) leases: any number of readers, or one writer.
-- The README's "Shared (reader) leases" excerpt is this file's expected output.
SELECT token AS r1 FROM fence.lock_acquire_shared('catalog', '30 seconds', 'reader-1') \gset
SELECT token AS r2 FROM fence.lock_acquire_shared('catalog', '30 seconds', 'reader-2') \gset
SELECT :r2 > :r1 AS own_tokens;
SELECT lock_key, holder, mode FROM fence.locks WHERE lock_key = 'catalog' ORDER BY token;
-- A writer is busy while any reader is in.
SELECT fence.lock_acquire('catalog', '30 seconds', 'writer') IS NULL AS writer_busy;
-- Readers renew and release by token, as any lease.
SELECT fence.lock_renew('catalog', :r1) > now() AS renewed;
SELECT fence.lock_release('catalog', :r1) AS released_1, fence.lock_release('catalog', :r2) AS released_2;
-- The last one gone, the writer gets it; now readers are busy.
SELECT token AS w FROM fence.lock_acquire('catalog', '30 seconds', 'writer') \gset
SELECT :w > :r2 AS newer_token;
SELECT fence.lock_acquire_shared('catalog', '30 seconds', 'reader-3') IS NULL AS reader_busy;
-- Fenced writes take the writer's token only.
CREATE TABLE catalog_items (id int PRIMARY KEY, token bigint, title text);
SELECT fence.protect('catalog_items', lock_key => 'catalog', token_column => 'token');
INSERT INTO catalog_items VALUES (1, :w, 'first edition');
SELECT fence.lock_release('catalog', :w) AS released;
SELECT token AS r3 FROM fence.lock_acquire_shared('catalog', '30 seconds', 'reader-3') \gset
\set VERBOSITY terse
UPDATE catalog_items SET title = 'second edition', token = :r3 WHERE id = 1;
SELECT fence.lock_release('catalog', :r3) AS released;
SELECT * FROM fence.lock_acquire_shared(NULL);
SELECT * FROM fence.lock_acquire_shared('catalog', '-1 second');
SELECT id, title FROM catalog_items;
DROP TABLE catalog_items;
