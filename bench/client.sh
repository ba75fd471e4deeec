#!/usr/bin/env bash
# Client overhead: the same acquire + release cycle (the client crate's own
# SQL text, pg_fence_client::sql::ACQUIRE and RELEASE) through
#   lease-sqlx       Lease::try_acquire + Lease::release on a sqlx PgPool
#   sqlx             the same two statements with sqlx::query_as on that pool
#   lease-deadpool   Lease::try_acquire + Lease::release on a deadpool-postgres pool
#   deadpool         the same two statements on that pool (prepare_cached)
#   tokio-postgres   the same two statements, prepared, one connection per client
# 8 clients on random keys over 1M (each key's row seeded first), rounds in
# rotating order, checkpoints held off (lib.sh); writes the client section of
# BENCHMARKS.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${BENCH_CLIENTS:-8}
DURATION=${BENCH_SECONDS:-15}
ROUNDS=${BENCH_CLIENT_ROUNDS:-5}
KEYS=${BENCH_KEYS:-1000000}
. "$ROOT/bench/lib.sh"
trap 'restore_checkpoints; rm -rf "$WORK"' EXIT
quiet_checkpoints

echo "== client: $CLIENTS clients, keys over $KEYS, ${DURATION}s x $ROUNDS rounds per variant"
seed_keys cycle 1 "$KEYS"
VARIANTS=(lease-sqlx sqlx lease-deadpool deadpool tokio-postgres)
# One run: prints cycles/s, and keeps the client's CPU per cycle in $WORK/cpu.VARIANT.
run() {
    local line
    line=$("$BENCH_BIN" client "$1" --clients "$CLIENTS" --seconds "$DURATION" --keys "$KEYS")
    echo "$line" | field client_cpu_us_per_cycle >>"$WORK/cpu.$1"
    echo "$line" | field cycles_per_s
}

echo "   warm-up (discarded)"
for variant in "${VARIANTS[@]}"; do DURATION=5 run "$variant" >/dev/null; done
rm -f "$WORK"/cpu.*
rotate_rounds "${VARIANTS[@]}"
declare -A CPU
for variant in "${VARIANTS[@]}"; do CPU[$variant]=$(tr '\n' ' ' <"$WORK/cpu.$variant" | median); done

PG_VERSION=$("${PSQL[@]}" -At -c "SHOW server_version")
SECTION=$(cat <<MD
<!-- client:begin (written by bench/client.sh) -->
## Client overhead: pg_fence_client vs the same SQL on the bare drivers

$(machine "$PG_VERSION"), pg_fence release build, client built with \`--release\`.
$CLIENTS concurrent tasks on one Tokio runtime (2 worker threads) sharing the machine with
the server, random keys over $KEYS, ${DURATION} s per run, median of $ROUNDS rounds in
rotating order after a warm-up, no checkpoint during the runs. Every variant sends the same two statements (the client crate's
\`sql::ACQUIRE\` and \`sql::RELEASE\`) with a fresh UUID holder per cycle.

| variant | cycles/s | vs the bare driver | client CPU per cycle |
|---|---|---|---|
| pg_fence_client over sqlx: \`Lease::try_acquire\` + \`release()\` | $(printf '%.0f' "${MED[lease-sqlx]}") | **$(ratio "${MED[lease-sqlx]}" "${MED[sqlx]}")** | ${CPU[lease-sqlx]} µs |
| sqlx \`query_as\` on the same pool | $(printf '%.0f' "${MED[sqlx]}") | 1.00 | ${CPU[sqlx]} µs |
| pg_fence_client over deadpool-postgres | $(printf '%.0f' "${MED[lease-deadpool]}") | **$(ratio "${MED[lease-deadpool]}" "${MED[deadpool]}")** | ${CPU[lease-deadpool]} µs |
| deadpool-postgres: the same statements on the same pool (\`prepare_cached\`) | $(printf '%.0f' "${MED[deadpool]}") | 1.00 | ${CPU[deadpool]} µs |
| tokio-postgres, prepared, a connection per task (no pool) | $(printf '%.0f' "${MED[tokio-postgres]}") | $(ratio "${MED[tokio-postgres]}" "${MED[deadpool]}") | ${CPU[tokio-postgres]} µs |

Client CPU per cycle is the benchmark process's own CPU time (user + system, from
\`/proc/self/stat\`) over the run, divided by the cycles: what the client side costs,
free of the server's run-to-run noise that moves the throughput columns.

Aim (issue 5): the client ≥ 0.9x the bare driver. What the guard adds per cycle: option
validation, a renewal task spawned and stopped and a watch channel. The last row is what
a pool checkout per statement costs, client or not.
<!-- client:end -->
MD
)
write_section client "$SECTION"
echo "$SECTION"
