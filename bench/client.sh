#!/usr/bin/env bash
# Client overhead: the same acquire + release cycle (the client crate's own
# SQL text, pg_fence_client::sql::ACQUIRE and RELEASE) through
#   lease-sqlx       Lease::try_acquire + Lease::release on a sqlx PgPool
#   sqlx             the same two statements with sqlx::query_as on that pool
#   lease-deadpool   Lease::try_acquire + Lease::release on a deadpool-postgres pool
#   deadpool         the same two statements on that pool (prepare_cached)
#   tokio-postgres   the same two statements, prepared, one connection per client
# 8 clients on random keys over 1M (rows seeded by lease_cycle.sh), rounds in
# rotating order, checkpoints held off (lib.sh); writes the client section of
# BENCHMARKS.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${BENCH_CLIENTS:-8}
DURATION=${BENCH_SECONDS:-15}
ROUNDS=${BENCH_ROUNDS:-3}
KEYS=${BENCH_KEYS:-1000000}
. "$ROOT/bench/lib.sh"
trap 'restore_checkpoints; rm -rf "$WORK"' EXIT
quiet_checkpoints

echo "== client: $CLIENTS clients, keys over $KEYS, ${DURATION}s x $ROUNDS rounds per variant"
VARIANTS=(lease-sqlx sqlx lease-deadpool deadpool tokio-postgres)
run() { "$BENCH_BIN" client "$1" --clients "$CLIENTS" --seconds "$DURATION" --keys "$KEYS" | field cycles_per_s; }

echo "   warm-up (discarded)"
for variant in "${VARIANTS[@]}"; do DURATION=5 run "$variant" >/dev/null; done
rotate_rounds "${VARIANTS[@]}"

PG_VERSION=$("${PSQL[@]}" -At -c "SHOW server_version")
SECTION=$(cat <<MD
<!-- client:begin (written by bench/client.sh) -->
## Client overhead: pg_fence_client vs the same SQL on the bare drivers

$(machine "$PG_VERSION"), pg_fence release build, client built with \`--release\`.
$CLIENTS concurrent tasks on one Tokio runtime (2 worker threads) sharing the machine with
the server, random keys over $KEYS, ${DURATION} s per run, median of $ROUNDS rounds in
rotating order after a warm-up, no checkpoint during the runs. Every variant sends the same two statements (the client crate's
\`sql::ACQUIRE\` and \`sql::RELEASE\`) with a fresh UUID holder per cycle.

| variant | cycles/s | vs the bare driver |
|---|---|---|
| pg_fence_client over sqlx: \`Lease::try_acquire\` + \`release()\` | $(printf '%.0f' "${MED[lease-sqlx]}") | **$(ratio "${MED[lease-sqlx]}" "${MED[sqlx]}")** |
| sqlx \`query_as\` on the same pool | $(printf '%.0f' "${MED[sqlx]}") | 1.00 |
| pg_fence_client over deadpool-postgres | $(printf '%.0f' "${MED[lease-deadpool]}") | **$(ratio "${MED[lease-deadpool]}" "${MED[deadpool]}")** |
| deadpool-postgres: the same statements on the same pool (\`prepare_cached\`) | $(printf '%.0f' "${MED[deadpool]}") | 1.00 |
| tokio-postgres, prepared, a connection per task (no pool) | $(printf '%.0f' "${MED[tokio-postgres]}") | $(ratio "${MED[tokio-postgres]}" "${MED[deadpool]}") |

Aim (issue 5): the client ≥ 0.9x the bare driver. What the guard adds per cycle: option
validation, a renewal task spawned and stopped and a watch channel. The last row is what
a pool checkout per statement costs, client or not.
<!-- client:end -->
MD
)
write_section client "$SECTION"
echo "$SECTION"
