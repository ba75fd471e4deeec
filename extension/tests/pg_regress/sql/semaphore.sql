-- Semaphores: three permits of 'thumbnails', each a lease on its own key.
-- The README's "Semaphores" excerpt is this file's expected output.
SELECT lock_key, holder FROM fence.semaphore_acquire('thumbnails', 3, '30 seconds', 'worker-a');
SELECT lock_key, holder FROM fence.semaphore_acquire('thumbnails', 3, '30 seconds', 'worker-b');
SELECT lock_key, holder FROM fence.semaphore_acquire('thumbnails', 3, '30 seconds', 'worker-c');
SELECT fence.semaphore_acquire('thumbnails', 3) IS NULL AS none_free;
-- worker-b retrying (a lost reply, say) gets its own permit back: same token.
SELECT token AS b_token FROM fence.lock_status('thumbnails:permit:2') \gset
SELECT lock_key, token = :b_token AS same_token
  FROM fence.semaphore_acquire('thumbnails', 3, '30 seconds', 'worker-b');
-- A permit is renewed and released like any lease, on its own key.
SELECT fence.lock_renew('thumbnails:permit:2', fence.current_token('thumbnails:permit:2')) IS NOT NULL AS renewed;
SELECT fence.lock_release('thumbnails:permit:2', fence.current_token('thumbnails:permit:2')) AS released;
SELECT lock_key, holder FROM fence.semaphore_acquire('thumbnails', 3, '30 seconds', 'worker-d');
SELECT lock_key, holder FROM fence.semaphore_status('thumbnails');
SELECT lock_key, holder FROM fence.locks WHERE lock_key LIKE 'thumbnails:%' ORDER BY lock_key;
SELECT key_class, acquires, grants, regrants, busy, renewals, releases
  FROM fence.lock_stats WHERE key_class = 'thumbnails';
SELECT fence.semaphore_acquire('thumbnails', 0);
SELECT fence.semaphore_acquire('thumbnails', 1025);
SELECT fence.semaphore_acquire(NULL, 3);
