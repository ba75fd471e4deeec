-- Term history: every grant of a kept key, however short, in order.
-- The README's "Term history" excerpt is this file's expected output.
SELECT fence.lock_keep_history('scheduler', keep => '1 hour') IS NULL AS never_leased;
-- Three leaders in a row, each gone before anyone looked.
SELECT token AS t1 FROM fence.lock_acquire('scheduler', '30 seconds', 'node-a') \gset
SELECT fence.lock_release('scheduler', :t1) AS resigned;
SELECT token AS t2 FROM fence.lock_acquire('scheduler', '30 seconds', 'node-b') \gset
SELECT fence.lock_force_release('scheduler') AS forced;
SELECT token AS t3 FROM fence.lock_acquire('scheduler', '50 milliseconds', 'node-c') \gset
SELECT pg_sleep(0.1);
-- Each term names the one before it: nothing in between was missed.
SELECT holder,
       CASE token WHEN :t1 THEN 't1' WHEN :t2 THEN 't2' WHEN :t3 THEN 't3' END AS term,
       CASE previous_token WHEN :t1 THEN 't1' WHEN :t2 THEN 't2' END AS previous
  FROM fence.lock_history('scheduler');
-- Only what came after a known term; with a wait, the next grant wakes it.
SELECT holder FROM fence.lock_history('scheduler', after_token => :t2);
SELECT count(*) AS nothing_new FROM fence.lock_history('scheduler', after_token => :t3, wait => '100 milliseconds');
-- A renewal or a holder's re-acquire is the same term.
SELECT token AS t4 FROM fence.lock_acquire('scheduler', '30 seconds', 'node-a') \gset
SELECT fence.lock_acquire('scheduler', '30 seconds', 'node-a') IS NOT NULL AS reacquired;
SELECT fence.lock_renew('scheduler', :t4) IS NOT NULL AS renewed;
SELECT count(*) AS terms FROM fence.lock_history('scheduler', after_token => :t3);
SELECT fence.lock_release('scheduler', :t4) AS released;
\set VERBOSITY terse
SELECT * FROM fence.lock_history('unkept');
SELECT * FROM fence.lock_history('scheduler', NULL, '-1 second');
-- Stop keeping it: the kept terms go.
SELECT fence.lock_keep_history('scheduler', keep => NULL) = :t4 AS stopped;
SELECT * FROM fence.lock_history('scheduler');
