#!/usr/bin/env bash
# What bounds a hand-off on one hot key: the same hot-key run as hot_key.sh
# (8 clients, pg_fence_bench) with the server's WAL flush on and off, side by
# side in one run, against advisory locks; plus what each statement of the
# chain costs alone (pgbench -r, one client, its own key) and what one
# fdatasync costs here (pg_test_fsync on the cluster's disk).
#   pg_fence         lock_acquire(wait => 10 s) + lock_release, fsync = on
#   pg_fence-nosync  the same with fsync = off (the only change; a measurement
#                    of the flush's share, never a setting to run with)
#   advisory         pg_advisory_lock + pg_advisory_unlock
# Writes the handoff_floor section of BENCHMARKS.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${BENCH_CLIENTS:-8}
DURATION=${BENCH_HOT_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
. "$ROOT/bench/lib.sh"
fsync_set() {
    "${PSQL[@]}" -c "ALTER SYSTEM SET fsync = $1" -c "SELECT pg_reload_conf()" >/dev/null
    sleep 1
}
trap 'fsync_set on >/dev/null 2>&1 || true; "${PSQL[@]}" -c "ALTER SYSTEM RESET fsync" -c "SELECT pg_reload_conf()" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

echo "== handoff_floor: $CLIENTS clients on one key, ${DURATION}s x $ROUNDS rounds, WAL flush on and off"
VARIANTS=(pg_fence pg_fence-nosync advisory)
declare -A HANDOFFS WAIT99
for round in $(seq "$ROUNDS"); do
    shift_by=$(((round - 1) % 3))
    for variant in "${VARIANTS[@]:$shift_by}" "${VARIANTS[@]:0:$shift_by}"; do
        case $variant in
        pg_fence-nosync) fsync_set off; kind=pg_fence ;;
        pg_fence) fsync_set on; kind=pg_fence ;;
        *) fsync_set on; kind=advisory ;;
        esac
        line=$("$BENCH_BIN" hot-key "$kind" --clients "$CLIENTS" --seconds "$DURATION" \
            --samples "$WORK/$variant.$round")
        HANDOFFS[$variant]="${HANDOFFS[$variant]:-} $(echo "$line" | field handoffs_per_s)"
        WAIT99[$variant]="${WAIT99[$variant]:-} $(echo "$line" | field wait_p99_us)"
        printf '   round %s  %-16s %s handoffs/s\n' "$round" "$variant" "$(echo "$line" | field handoffs_per_s)"
    done
done
fsync_set on

declare -A P50 P99 SLOW COUNT H
for variant in "${VARIANTS[@]}"; do
    cat "$WORK/$variant".* | sort -n >"$WORK/$variant.sorted"
    n=$(wc -l <"$WORK/$variant.sorted")
    pct() { sed -n "$(awk -v n="$n" -v q="$1" 'BEGIN {r = int(q * n); if (r < q * n) r++; if (r < 1) r = 1; print r}')p" "$WORK/$variant.sorted"; }
    COUNT[$variant]=$n
    P50[$variant]=$(pct 0.50)
    P99[$variant]=$(pct 0.99)
    # Hand-offs that took 2 ms or more: what one sleep-and-recheck would cost.
    SLOW[$variant]=$(awk '$1 >= 2000 {s++} END {printf "%.2f", 100 * s / NR}' "$WORK/$variant.sorted")
    H[$variant]=$(echo "${HANDOFFS[$variant]}" | median)
done

# Each statement alone: one client, its own key, nothing to wait for.
cat >"$WORK/chain.sql" <<'PGB'
SELECT 1;
SELECT pg_advisory_lock(:client_id);
SELECT pg_advisory_unlock(:client_id);
SELECT (fence.lock_acquire('floor:' || :client_id, '30 seconds')).token AS t \gset
SELECT fence.lock_release('floor:' || :client_id, :t);
PGB
latencies() {  # -> "select1 lock unlock acquire release" in µs
    pgbench -n -r -M prepared -c 1 -T "$DURATION" -f "$WORK/chain.sql" "${CONN[@]}" pg_fence 2>&1 |
        awk '/statement latencies/ {on = 1; next} on && NF >= 3 {printf "%.0f ", $1 * 1000}'
}
fsync_set on
read -r s1 al au fa fr <<<"$(latencies)"
fsync_set off
read -r _ _ _ fa_nosync fr_nosync <<<"$(latencies)"
fsync_set on
DATA_DIR=$("${PSQL[@]}" -At -c "SHOW data_directory")
FSYNC_US=$(runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_test_fsync -s 2 -f "$DATA_DIR/pg_test_fsync.tmp" 2>/dev/null |
    awk '/fdatasync/ && /usecs\/op/ {for (i = 1; i <= NF; i++) if ($i == "usecs/op") {print $(i - 1); exit}}')
rm -f "$DATA_DIR/pg_test_fsync.tmp"

us() { printf '%.0f µs' "$1"; }
PG_VERSION=$("${PSQL[@]}" -At -c "SHOW server_version")
SECTION=$(cat <<MD
<!-- handoff_floor:begin (written by bench/handoff_floor.sh) -->
## One hot key: what bounds a hand-off

$(machine "$PG_VERSION"), pg_fence release build, preloaded (fair queue on).
The hot-key run of the section above ($CLIENTS clients, ${DURATION} s, $ROUNDS rounds
in rotating order, medians; latencies pooled), once as it is and once with the
server's \`fsync = off\`, the one change, to measure what the grant's WAL flush costs
(never a setting to run with: a grant must be durable, G1 and G2).

| variant | hand-offs/s | vs advisory | wake-up p50 | p99 | hand-offs of 2 ms or more | acquire wait p99 | hand-offs measured |
|---|---|---|---|---|---|---|---|
| pg_fence | $(printf '%.0f' "${H[pg_fence]}") | **$(ratio "${H[pg_fence]}" "${H[advisory]}")** | $(us "${P50[pg_fence]}") | $(us "${P99[pg_fence]}") | ${SLOW[pg_fence]}% | $(us "$(echo "${WAIT99[pg_fence]}" | median)") | ${COUNT[pg_fence]} |
| pg_fence, \`fsync = off\` | $(printf '%.0f' "${H[pg_fence-nosync]}") | $(ratio "${H[pg_fence-nosync]}" "${H[advisory]}") | $(us "${P50[pg_fence-nosync]}") | $(us "${P99[pg_fence-nosync]}") | ${SLOW[pg_fence-nosync]}% | $(us "$(echo "${WAIT99[pg_fence-nosync]}" | median)") | ${COUNT[pg_fence-nosync]} |
| advisory | $(printf '%.0f' "${H[advisory]}") | 1.00 | $(us "${P50[advisory]}") | $(us "${P99[advisory]}") | ${SLOW[advisory]}% | $(us "$(echo "${WAIT99[advisory]}" | median)") | ${COUNT[advisory]} |

Each statement of the chain alone (pgbench \`-r -M prepared\`, one client on its
own key, ${DURATION} s; a round trip on loopback included), and one \`fdatasync\` of
this disk (\`pg_test_fsync\`, 8 kB writes):

| statement | latency | with \`fsync = off\` |
|---|---|---|
| \`SELECT 1\` (the round trip) | $(us "$s1") | |
| \`pg_advisory_lock\` / \`pg_advisory_unlock\` | $(us "$al") / $(us "$au") | |
| \`fence.lock_acquire\` (granted, durable commit) | $(us "$fa") | $(us "$fa_nosync") |
| \`fence.lock_release\` (asynchronous commit) | $(us "$fr") | $(us "$fr_nosync") |
| one \`fdatasync\` (\`pg_test_fsync\`) | $(us "$FSYNC_US") | |
<!-- handoff_floor:end -->
MD
)
write_section handoff_floor "$SECTION"
echo "$SECTION"
