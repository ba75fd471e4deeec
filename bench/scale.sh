#!/usr/bin/env bash
# Scale: the acquire + release cycle (pgbench, 8 clients) with 10k lease rows
# present, then with 10M, and the size of fence.leases under 10 minutes of
# churn.
#   1. A fresh fence.leases with 10k released keys: cycles over those keys.
#   2. Churn: the same cycle for BENCH_CHURN_SECONDS (600) on those 10k keys,
#      sampling the table's size (heap + index) and the rate every minute:
#      every cycle updates a lease row twice, so without HOT pruning and
#      autovacuum keeping up the table would grow without end.
#   3. The table filled to 10M released keys: the same cycle over the same
#      10k keys (the hot keys of a big table), and over all 10M (a working set
#      larger than shared_buffers).
# Writes the scale section of BENCHMARKS.md. It drops and re-creates the
# extension in the bench database.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${BENCH_CLIENTS:-8}
DURATION=${BENCH_SECONDS:-15}
ROUNDS=${BENCH_ROUNDS:-3}
SMALL=${BENCH_SCALE_SMALL:-10000}
LARGE=${BENCH_SCALE_LARGE:-10000000}
CHURN=${BENCH_CHURN_SECONDS:-600}
. "$ROOT/bench/lib.sh"

echo "== scale: $SMALL vs $LARGE lease rows, $CLIENTS clients, ${DURATION}s x $ROUNDS rounds; churn ${CHURN}s"
seed() {  # first last: add released keys scale:first..scale:last, then a checkpoint
    seed_keys scale "$1" "$2"
    "${PSQL[@]}" -c CHECKPOINT
}
size_mb() { "${PSQL[@]}" -At -c "SELECT round(pg_total_relation_size('fence.leases') / 1048576.0, 1)"; }
rows() { "${PSQL[@]}" -At -c "SELECT count(*) FROM fence.leases"; }

cat >"$WORK/cycle.sql" <<'PGB'
\set id random(1, :keys)
SELECT coalesce((fence.lock_acquire('scale:' || :id, '30 seconds')).token, 0) AS token \gset
SELECT fence.lock_release('scale:' || :id, :token);
PGB
run() {  # keys [seconds] -> cycles per second
    pgbench_tps -c "$CLIENTS" -T "${2:-$DURATION}" -D keys="$1" -f "$WORK/cycle.sql"
}
rounds() {  # label keys -> median cycles/s over the rounds
    local all=""
    for round in $(seq "$ROUNDS"); do
        "${PSQL[@]}" -c CHECKPOINT
        local tps
        tps=$(run "$2")
        [ -n "$tps" ] || { echo "pgbench failed ($1)" >&2; exit 1; }
        printf '   round %s  %-26s %8.0f cycles/s\n' "$round" "$1" "$tps" >&2
        all="$all $tps"
    done
    echo "$all" | median
}

"${PSQL[@]}" -c 'SET client_min_messages = warning' -c 'DROP EXTENSION IF EXISTS pg_fence CASCADE' -c 'CREATE EXTENSION pg_fence'
echo "   seeding $SMALL keys"
seed 1 "$SMALL"
run "$SMALL" 10 >/dev/null # warm-up
small=$(rounds "$SMALL rows, $SMALL keys" "$SMALL")
small_rows=$(rows)

echo "   churn: ${CHURN}s on $SMALL keys"
start_mb=$(size_mb)
SIZES=()
pgbench -n -M prepared -c "$CLIENTS" -j 2 -T "$CHURN" -P 60 -D keys="$SMALL" \
    -f "$WORK/cycle.sql" "${CONN[@]}" pg_fence >"$WORK/churn.out" 2>"$WORK/churn.progress" &
churn_pid=$!
sleep 2
while kill -0 "$churn_pid" 2>/dev/null; do
    sleep 60 &
    wait $! || true
    kill -0 "$churn_pid" 2>/dev/null || break
    SIZES+=("$(size_mb)")
    printf '   minute %2d  %8s MB\n' "${#SIZES[@]}" "${SIZES[-1]}"
done
wait "$churn_pid"
mapfile -t RATES < <(sed -n 's/^progress: [0-9.]* s, \([0-9.]*\) tps.*/\1/p' "$WORK/churn.progress")
CHURN_ROWS="| 0 | $start_mb | |"$'\n'
for i in "${!SIZES[@]}"; do
    CHURN_ROWS+="| $((i + 1)) | ${SIZES[$i]} | $(printf '%.0f' "${RATES[$i]:-0}") |"$'\n'
done
end_mb=$(size_mb)
churn_cycles=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORK/churn.out")
STATS=$("${PSQL[@]}" -At -F ' ' -c "SELECT n_live_tup, n_dead_tup, n_tup_hot_upd, n_tup_upd, autovacuum_count FROM pg_stat_user_tables WHERE relid = 'fence.leases'::regclass")
read -r live dead hot upd autovacuums <<<"$STATS"

echo "   seeding up to $LARGE keys"
seed $((SMALL + 1)) "$LARGE"
large_rows=$(rows)
large_mb=$(size_mb)
run "$SMALL" 10 >/dev/null # warm-up
large_hot=$(rounds "$LARGE rows, $SMALL keys" "$SMALL")
large_all=$(rounds "$LARGE rows, $LARGE keys" "$LARGE")

PG_VERSION=$("${PSQL[@]}" -At -c "SHOW server_version")
SECTION=$(cat <<MD
<!-- scale:begin (written by bench/scale.sh) -->
## Scale: 10k vs 10M lease rows, and size under churn

$(machine "$PG_VERSION"), pg_fence release build, shared_buffers 256MB.
pgbench \`-M prepared\`, $CLIENTS clients, the acquire + release cycle on random keys;
${DURATION} s per run, median of $ROUNDS rounds, each from a CHECKPOINT. Rows are released
leases seeded before the runs (\`fence.leases\` holds one row per key ever leased).

| lease rows present | keys the cycle uses | cycles/s | vs $small_rows rows |
|---|---|---|---|
| $small_rows | $SMALL | $(printf '%.0f' "$small") | 1.00 |
| $large_rows ($large_mb MB) | the same $SMALL | $(printf '%.0f' "$large_hot") | **$(ratio "$large_hot" "$small")** |
| $large_rows | all $LARGE | $(printf '%.0f' "$large_all") | $(ratio "$large_all" "$small") |

Aim (issue 5): ≥ 0.9x at 10M. The second row is the same cycle with $((LARGE / SMALL))x as many
rows present; the third also spreads it over every row, a working set far beyond
shared_buffers.

**Churn**: the cycle for $CHURN s on the $SMALL keys ($churn_cycles cycles, so every lease row
was updated about $(awk -v c="$churn_cycles" -v k="$SMALL" 'BEGIN {printf "%.0f", 2 * c / k}') times).
Size of \`fence.leases\` with its index:

| minute | size (MB) | cycles/s in that minute |
|---|---|---|
$CHURN_ROWS
From $start_mb MB to $end_mb MB. At the end: $live live and $dead dead row versions,
$hot of $upd updates HOT, $autovacuums autovacuum runs on the table.
<!-- scale:end -->
MD
)
write_section scale "$SECTION"
echo "$SECTION"
