#!/usr/bin/env bash
# Client overhead: the same acquire + release cycle (the client crate's own
# SQL text, pg_fence_client::sql::ACQUIRE and RELEASE) through
#   lease-sqlx       Lease::try_acquire + Lease::release on a sqlx PgPool
#   sqlx             the same two statements with sqlx::query_as on that pool
#   lease-deadpool   Lease::try_acquire + Lease::release on a deadpool-postgres pool
#   tokio-postgres   the same two statements, prepared, one connection per client
# 8 clients on random keys over 1M, rounds in rotating order; writes the
# client section of BENCHMARKS.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${BENCH_CLIENTS:-8}
DURATION=${BENCH_SECONDS:-15}
ROUNDS=${BENCH_ROUNDS:-3}
KEYS=${BENCH_KEYS:-1000000}
. "$ROOT/bench/lib.sh"

echo "== client: $CLIENTS clients, keys over $KEYS, ${DURATION}s x $ROUNDS rounds per variant"
VARIANTS=(lease-sqlx sqlx lease-deadpool tokio-postgres)
run() { "$BENCH_BIN" client "$1" --clients "$CLIENTS" --seconds "$DURATION" --keys "$KEYS" | field cycles_per_s; }

echo "   warm-up (discarded)"
for variant in "${VARIANTS[@]}"; do DURATION=3 run "$variant" >/dev/null; done
declare -A TPS
for round in $(seq "$ROUNDS"); do
    shift_by=$(( (round - 1) % ${#VARIANTS[@]} ))
    order=("${VARIANTS[@]:$shift_by}" "${VARIANTS[@]:0:$shift_by}")
    for variant in "${order[@]}"; do
        "${PSQL[@]}" -c CHECKPOINT
        tps=$(run "$variant")
        [ -n "$tps" ] || { echo "run failed for $variant" >&2; exit 1; }
        TPS[$variant]="${TPS[$variant]:-} $tps"
        printf '   round %s  %-15s %8.0f cycles/s\n' "$round" "$variant" "$tps"
    done
done
declare -A MED
for variant in "${VARIANTS[@]}"; do MED[$variant]=$(echo "${TPS[$variant]}" | median); done

PG_VERSION=$("${PSQL[@]}" -At -c "SHOW server_version")
SECTION=$(cat <<MD
<!-- client:begin (written by bench/client.sh) -->
## Client overhead: pg_fence_client vs the same SQL on the bare drivers

$(machine "$PG_VERSION"), pg_fence release build, client built with \`--release\`.
$CLIENTS concurrent tasks on one Tokio runtime (2 worker threads) sharing the machine with
the server, random keys over $KEYS, ${DURATION} s per run, median of $ROUNDS rounds in
rotating order. Every variant sends the same two statements (the client crate's
\`sql::ACQUIRE\` and \`sql::RELEASE\`) with a fresh UUID holder per cycle.

| variant | cycles/s | vs the bare driver |
|---|---|---|
| pg_fence_client over sqlx: \`Lease::try_acquire\` + \`release()\` | $(printf '%.0f' "${MED[lease-sqlx]}") | **$(ratio "${MED[lease-sqlx]}" "${MED[sqlx]}")** |
| sqlx \`query_as\` on the same pool | $(printf '%.0f' "${MED[sqlx]}") | 1.00 |
| pg_fence_client over deadpool-postgres | $(printf '%.0f' "${MED[lease-deadpool]}") | **$(ratio "${MED[lease-deadpool]}" "${MED[tokio-postgres]}")** |
| tokio-postgres, prepared statements, a connection per task | $(printf '%.0f' "${MED[tokio-postgres]}") | 1.00 |

Aim (issue 5): the client ≥ 0.9x the bare driver. What the guard adds per cycle: option
validation, a renewal task spawned and stopped, a watch channel, and for deadpool a pool
checkout per statement (where the bare tokio-postgres variant keeps one connection per
task).
<!-- client:end -->
MD
)
write_section client "$SECTION"
echo "$SECTION"
