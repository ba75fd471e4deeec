#!/usr/bin/env bash
# One hot key: 8 clients each block until they hold it, then release at once.
#   pg_fence  fence.lock_acquire(key, '30 seconds', holder, wait => '10 seconds')
#             + fence.lock_release
#   advisory  pg_advisory_lock + pg_advisory_unlock on one key
# Both through pg_fence_bench (tokio-postgres, one connection per client).
# A handoff is a grant to another client than the one that released last; its
# wake-up latency runs from the moment the releaser sent its release to the
# moment the next holder had its grant (so it includes the release's round
# trip and commit). Writes the hot_key section of BENCHMARKS.md and
# bench/hot_key_latency.png (CDF of the wake-up latencies, gnuplot).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${BENCH_CLIENTS:-8}
DURATION=${BENCH_HOT_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
. "$ROOT/bench/lib.sh"

echo "== hot_key: $CLIENTS clients on one key, ${DURATION}s x $ROUNDS rounds per variant"
VARIANTS=(pg_fence advisory)
declare -A GRANTS HANDOFFS WAIT50 WAIT99 TIMEOUTS FEWEST MOST
for round in $(seq "$ROUNDS"); do
    order=("${VARIANTS[@]}")
    [ $((round % 2)) -eq 0 ] && order=(advisory pg_fence)
    for variant in "${order[@]}"; do
        line=$("$BENCH_BIN" hot-key "$variant" --clients "$CLIENTS" --seconds "$DURATION" \
            --samples "$WORK/$variant.$round")
        GRANTS[$variant]="${GRANTS[$variant]:-} $(echo "$line" | field grants_per_s)"
        HANDOFFS[$variant]="${HANDOFFS[$variant]:-} $(echo "$line" | field handoffs_per_s)"
        WAIT50[$variant]="${WAIT50[$variant]:-} $(echo "$line" | field wait_p50_us)"
        WAIT99[$variant]="${WAIT99[$variant]:-} $(echo "$line" | field wait_p99_us)"
        TIMEOUTS[$variant]=$((${TIMEOUTS[$variant]:-0} + $(echo "$line" | field timeouts)))
        FEWEST[$variant]="${FEWEST[$variant]:-} $(echo "$line" | field fewest_grants)"
        MOST[$variant]="${MOST[$variant]:-} $(echo "$line" | field most_grants)"
        echo "$line" | sed 's/^/   round '"$round"'  /'
    done
done

# Pool every round's samples per variant; percentile q of the sorted samples.
declare -A P50 P90 P99 PMAX COUNT
for variant in "${VARIANTS[@]}"; do
    cat "$WORK/$variant".* | sort -n >"$WORK/$variant.sorted"
    n=$(wc -l <"$WORK/$variant.sorted")
    [ "$n" -gt 0 ] || { echo "no handoffs measured for $variant" >&2; exit 1; }
    pct() { sed -n "$(awk -v n="$n" -v q="$1" 'BEGIN {r = int(q * n); if (r < q * n) r++; if (r < 1) r = 1; print r}')p" "$WORK/$variant.sorted"; }
    COUNT[$variant]=$n
    P50[$variant]=$(pct 0.50)
    P90[$variant]=$(pct 0.90)
    P99[$variant]=$(pct 0.99)
    PMAX[$variant]=$(tail -1 "$WORK/$variant.sorted")
    awk -v n="$n" '{print $1 / 1000, NR / n}' "$WORK/$variant.sorted" >"$WORK/$variant.cdf"
done

PLOT="$ROOT/bench/hot_key_latency.png"
if command -v gnuplot >/dev/null; then
    gnuplot <<GP
set terminal png size 900,520
set termoption noenhanced
set output "$PLOT"
set title "One hot key, $CLIENTS clients: wake-up latency of each handoff (release sent -> next grant)"
set xlabel "latency (ms, log scale)"
set ylabel "fraction of handoffs at or below"
set logscale x
set grid
set key bottom right
plot "$WORK/pg_fence.cdf" using 1:2 with lines linewidth 2 title "pg_fence lock_acquire(wait)", \
     "$WORK/advisory.cdf" using 1:2 with lines linewidth 2 title "pg_advisory_lock"
GP
    echo "   wrote $PLOT"
else
    echo "   gnuplot not found: no plot (scripts/setup.sh --bench installs it)"
fi

ms() { awk -v us="$1" 'BEGIN {printf "%.2f", us / 1000}'; }
g_f=$(echo "${GRANTS[pg_fence]}" | median) g_a=$(echo "${GRANTS[advisory]}" | median)
h_f=$(echo "${HANDOFFS[pg_fence]}" | median) h_a=$(echo "${HANDOFFS[advisory]}" | median)
PG_VERSION=$("${PSQL[@]}" -At -c "SHOW server_version")
SECTION=$(cat <<MD
<!-- hot_key:begin (written by bench/hot_key.sh) -->
## One hot key: handoffs and wake-up latency

$(machine "$PG_VERSION"), pg_fence release build. $CLIENTS clients (tokio-postgres, one
connection each) all want one key: each blocks until it holds it, then releases at once.
${DURATION} s per run, $ROUNDS rounds per variant in alternating order; rates are medians,
latencies are pooled over the rounds. A handoff is a grant to another client than the last
releaser; its wake-up latency runs from the moment the releaser sent its release to the
moment the next holder had its grant.

| variant | grants/s | handoffs/s | handoffs vs advisory | wake-up p50 | p90 | p99 | max | handoffs measured |
|---|---|---|---|---|---|---|---|---|
| pg_fence: lock_acquire(wait => 10 s) + lock_release | $(printf '%.0f' "$g_f") | $(printf '%.0f' "$h_f") | **$(ratio "$h_f" "$h_a")** | $(ms "${P50[pg_fence]}") ms | $(ms "${P90[pg_fence]}") ms | $(ms "${P99[pg_fence]}") ms | $(ms "${PMAX[pg_fence]}") ms | ${COUNT[pg_fence]} |
| pg_advisory_lock + pg_advisory_unlock | $(printf '%.0f' "$g_a") | $(printf '%.0f' "$h_a") | 1.00 | $(ms "${P50[advisory]}") ms | $(ms "${P90[advisory]}") ms | $(ms "${P99[advisory]}") ms | $(ms "${PMAX[advisory]}") ms | ${COUNT[advisory]} |

How long a client waited in its acquire call (median over rounds of each round's
percentile), how many 10 s waits ran out, and how evenly the grants fell (per round, the
fewest and the most grants one client got; medians over rounds):

| variant | acquire wait p50 | acquire wait p99 | waits that ran out | grants per client, fewest / most |
|---|---|---|---|---|
| pg_fence | $(ms "$(echo "${WAIT50[pg_fence]}" | median)") ms | $(ms "$(echo "${WAIT99[pg_fence]}" | median)") ms | ${TIMEOUTS[pg_fence]} | $(echo "${FEWEST[pg_fence]}" | median) / $(echo "${MOST[pg_fence]}" | median) |
| advisory | $(ms "$(echo "${WAIT50[advisory]}" | median)") ms | $(ms "$(echo "${WAIT99[advisory]}" | median)") ms | ${TIMEOUTS[advisory]} | $(echo "${FEWEST[advisory]}" | median) / $(echo "${MOST[advisory]}" | median) |

![wake-up latency CDF](bench/hot_key_latency.png)

Aim (issue 5): handoffs/s ≥ 0.5x advisory locks. The lock manager queues advisory waiters
and grants the next one inside the releasing backend, in memory; a pg_fence handoff is a
committed release (asynchronous), a latch wake-up of one waiter, and a durable grant: one
WAL flush per handoff, which on one key nothing can share.
<!-- hot_key:end -->
MD
)
write_section hot_key "$SECTION"
echo "$SECTION"
