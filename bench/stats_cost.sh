#!/usr/bin/env bash
# What the statistics cost (issue 11's aim: at most 2%), side by side in one
# run on a preloaded cluster: each workload with fence.track_stats on and off
# (PGOPTIONS per pgbench connection), the order rotating from round to round.
#   cycle   fence.lock_acquire + fence.lock_release of a random key of 100k,
#           every key's row present (released); on: each call counted, and
#           the grant reads the replaced lease to count an expiry
#   fenced  an UPDATE of a random row of 10k under per-row keys, carrying the
#           live token (nothing to count unless a write is refused)
# pgbench -M prepared, 8 clients, 15 s per run, 5 rounds, medians. Writes the
# stats_cost section of BENCHMARKS.md. Run through `make bench`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${BENCH_CLIENTS:-8}
DURATION=${BENCH_SECONDS:-15}
ROUNDS=${BENCH_ROUNDS:-5}
KEYS=${BENCH_KEYS:-100000}
ROWS=${BENCH_ROWS:-10000}
. "$ROOT/bench/lib.sh"
trap 'restore_checkpoints; rm -rf "$WORK"' EXIT
quiet_checkpoints

[ "$("${PSQL[@]}" -At -c "SHOW shared_preload_libraries")" = pg_fence ] ||
    { echo "stats_cost: the cluster must preload pg_fence (scripts/cluster.sh does)" >&2; exit 1; }

echo "== stats_cost: $CLIENTS clients, ${DURATION}s x $ROUNDS rounds per variant"
seed_keys sc 1 "$KEYS"
"${PSQL[@]}" <<SQL
SET client_min_messages = warning;
DROP TABLE IF EXISTS bench_stats_fenced;
CREATE TABLE bench_stats_fenced (id int PRIMARY KEY, balance bigint NOT NULL DEFAULT 0, fence_token bigint) WITH (fillfactor = 80);
INSERT INTO bench_stats_fenced (id) SELECT generate_series(1, $ROWS);
SELECT count(fence.lock_force_release('scw:' || i)) FROM generate_series(1, $ROWS) AS i;
SELECT count(fence.lock_acquire('scw:' || i, '1 day', 'bench')) FROM generate_series(1, $ROWS) AS i;
SELECT fence.protect('bench_stats_fenced', key_column => 'id', key_prefix => 'scw:', token_column => 'fence_token');
VACUUM ANALYZE bench_stats_fenced, fence.leases;
SQL
BASE=$("${PSQL[@]}" -At -c "SELECT min(token) - 1 FROM fence.leases WHERE lock_key LIKE 'scw:%' AND holder = 'bench'")
cat >"$WORK/cycle.sql" <<PGB
\set k random(1, $KEYS)
SELECT coalesce((fence.lock_acquire('sc:' || :k, '30 seconds')).token, 0) AS tok \gset
SELECT fence.lock_release('sc:' || :k, :tok);
PGB
cat >"$WORK/fenced.sql" <<PGB
\set id random(1, $ROWS)
\set tok :base + :id
UPDATE bench_stats_fenced SET balance = balance + 1, fence_token = :tok WHERE id = :id;
PGB

run() {  # workload_on|off -> tps
    local workload=${1%_*} track=${1##*_}
    PGOPTIONS="-c fence.track_stats=$track" pgbench_tps -c "$CLIENTS" -T "$DURATION" -D base="$BASE" -f "$WORK/$workload.sql"
}

echo "   warm-up (discarded)"
for variant in cycle_on fenced_on; do DURATION=10 run "$variant" >/dev/null; done
rotate_rounds cycle_on cycle_off fenced_on fenced_off
rates() { for r in ${TPS[$1]}; do printf '%.0f ' "$r"; done | sed 's/ $//'; }

PG_VERSION=$("${PSQL[@]}" -At -c "SHOW server_version")
section="<!-- stats_cost:begin (written by bench/stats_cost.sh) -->
## Statistics: what counting costs (issue 11)

$(machine "$PG_VERSION"). Preloaded cluster, release build. pgbench
\`-M prepared\`, $CLIENTS clients, ${DURATION} s per run, $ROUNDS rounds with the
order rotating, medians (all runs in brackets). \`fence.track_stats\` set per
connection. Cycle: acquire + release of a random key of $KEYS, rows present;
fenced: an UPDATE of a random row of $ROWS under per-row keys carrying the live
token.

| workload | track_stats = on | track_stats = off | on / off |
|---|---|---|---|
| acquire + release cycles/s | $(printf '%.0f' "${MED[cycle_on]}") ($(rates cycle_on)) | $(printf '%.0f' "${MED[cycle_off]}") ($(rates cycle_off)) | **$(ratio "${MED[cycle_on]}" "${MED[cycle_off]}" 3)** |
| fenced UPDATEs/s | $(printf '%.0f' "${MED[fenced_on]}") ($(rates fenced_on)) | $(printf '%.0f' "${MED[fenced_off]}") ($(rates fenced_off)) | **$(ratio "${MED[fenced_on]}" "${MED[fenced_off]}" 3)** |
<!-- stats_cost:end -->"
write_section stats_cost "$section"
echo "$section"
