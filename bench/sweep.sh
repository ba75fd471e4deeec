#!/usr/bin/env bash
# The bounded lease table (issue 15; BENCHMARKS.md, "A bounded lease
# table"), about 13 minutes, not part of make bench: on the local cluster
# (scripts/cluster.sh, preloaded; install a release build first), 10
# minutes of ever-new keys with the background sweep on (every 10 s,
# idle_for 30 s), then 3 minutes with it off, sampled every 30 s: rows and
# size of fence.leases, and the cycle rate of each 30 s window.
set -euo pipefail
cd "$(dirname "$0")/.."
PSQL="psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 28815 -U postgres"
$PSQL -d postgres -c "ALTER SYSTEM SET fence.sweep_database = 'pg_fence'" -c "ALTER SYSTEM SET fence.sweep_interval = 0"
scripts/cluster.sh stop >/dev/null; scripts/cluster.sh start >/dev/null
$PSQL -d pg_fence -c "SET client_min_messages = warning" -c "DROP EXTENSION IF EXISTS pg_fence CASCADE" -c "CREATE EXTENSION pg_fence" -c "VACUUM FULL fence.leases"
cat > "${TMPDIR:-/tmp}/pg_fence_newkeys.sql" <<'PGB'
\set k random(1, 1000000000000)
SELECT coalesce((fence.lock_acquire('invoice:' || :k, '30 seconds')).token, 0) AS t \gset
SELECT fence.lock_release('invoice:' || :k, :t);
PGB
phase() {  # name, seconds
  local name=$1 seconds=$2 windows=$(( $2 / 30 ))
  for w in $(seq 1 $windows); do
    tps=$(pgbench -n -M prepared -j 2 -c 4 -T 30 -f "${TMPDIR:-/tmp}/pg_fence_newkeys.sql" -h 127.0.0.1 -p 28815 -U postgres pg_fence 2>&1 \
          | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p')
    read rows size <<<"$($PSQL -d pg_fence -F ' ' -c "SELECT count(*), pg_total_relation_size('fence.leases') FROM fence.leases")"
    echo "phase=$name t=$(( w * 30 ))s cycle_tps=$tps rows=$rows leases_bytes=$size"
  done
}
$PSQL -d postgres -c "ALTER SYSTEM SET fence.sweep_interval = 10" -c "ALTER SYSTEM SET fence.sweep_idle_for = 30" -c "SELECT pg_reload_conf()" >/dev/null
phase sweep_on 600
$PSQL -d postgres -c "ALTER SYSTEM SET fence.sweep_interval = 0" -c "SELECT pg_reload_conf()" >/dev/null
phase sweep_off 180
$PSQL -d postgres -c "ALTER SYSTEM RESET fence.sweep_interval" -c "ALTER SYSTEM RESET fence.sweep_idle_for" -c "ALTER SYSTEM RESET fence.sweep_database" >/dev/null
echo SWEEP_BENCH_DONE
# fence.sweep_database was reset above; it takes a restart.
scripts/cluster.sh stop >/dev/null; scripts/cluster.sh start >/dev/null
