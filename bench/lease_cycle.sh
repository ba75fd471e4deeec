#!/usr/bin/env bash
# Acquire + release cycles, side by side in one run (pgbench), 8 clients on
# random keys over 1M:
#   pg_fence  fence.lock_acquire + fence.lock_release (acquire durable,
#             release asynchronous, as DESIGN.md's performance shape says)
#   recipe    the hand-written SQL recipe: INSERT ... ON CONFLICT ... WHERE
#             expired with a token sequence, then an UPDATE to release; both
#             durable
#   advisory  pg_advisory_lock + pg_advisory_unlock (no lease, no token, no
#             durability: the floor)
# Median of the rounds after a warm-up; writes the lease_cycle section of
# BENCHMARKS.md. Run through `make bench`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${BENCH_CLIENTS:-8}
DURATION=${BENCH_SECONDS:-15}
ROUNDS=${BENCH_ROUNDS:-3}
KEYS=${BENCH_KEYS:-1000000}
. "$ROOT/bench/lib.sh"

echo "== lease_cycle: keys over $KEYS, $CLIENTS clients, ${DURATION}s x $ROUNDS rounds per variant"
"${PSQL[@]}" <<'SQL'
SET client_min_messages = warning;
DROP TABLE IF EXISTS bench_recipe_locks;
DROP SEQUENCE IF EXISTS bench_recipe_token_seq;
CREATE SEQUENCE bench_recipe_token_seq;
CREATE TABLE bench_recipe_locks (
    lock_key   text PRIMARY KEY,
    holder     text NOT NULL,
    token      bigint NOT NULL,
    expires_at timestamptz NOT NULL
) WITH (fillfactor = 50);
SQL

cat >"$WORK/pg_fence.sql" <<'PGB'
\set id random(1, :keys)
SELECT coalesce((fence.lock_acquire('cycle:' || :id, '30 seconds')).token, 0) AS token \gset
SELECT fence.lock_release('cycle:' || :id, :token);
PGB
cat >"$WORK/recipe.sql" <<'PGB'
\set id random(1, :keys)
WITH granted AS (
    INSERT INTO bench_recipe_locks AS l (lock_key, holder, token, expires_at)
    VALUES ('cycle:' || :id, 'client-' || :client_id, nextval('bench_recipe_token_seq'), clock_timestamp() + interval '30 seconds')
    ON CONFLICT (lock_key) DO UPDATE
       SET holder = EXCLUDED.holder, token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
     WHERE l.expires_at <= clock_timestamp()
    RETURNING l.token)
SELECT coalesce((SELECT token FROM granted), 0) AS token \gset
UPDATE bench_recipe_locks SET expires_at = clock_timestamp() WHERE lock_key = 'cycle:' || :id AND token = :token;
PGB
cat >"$WORK/advisory.sql" <<'PGB'
\set id random(1, :keys)
SELECT pg_advisory_lock(:id);
SELECT pg_advisory_unlock(:id);
PGB

run() {  # variant -> cycles per second
    pgbench -n -M prepared -c "$CLIENTS" -j 2 -T "$DURATION" -D keys="$KEYS" \
        -f "$WORK/$1.sql" "${CONN[@]}" pg_fence 2>&1 |
        sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p'
}

echo "   warm-up (discarded)"
for variant in pg_fence recipe advisory; do DURATION=5 run "$variant" >/dev/null; done

declare -A TPS
orders=("pg_fence recipe advisory" "recipe advisory pg_fence" "advisory pg_fence recipe")
for round in $(seq "$ROUNDS"); do
    for variant in ${orders[$(( (round - 1) % 3 ))]}; do
        "${PSQL[@]}" -c CHECKPOINT
        tps=$(run "$variant")
        [ -n "$tps" ] || { echo "pgbench failed for $variant" >&2; exit 1; }
        TPS[$variant]="${TPS[$variant]:-} $tps"
        printf '   round %s  %-9s %10.0f cycles/s\n' "$round" "$variant" "$tps"
    done
done

fence=$(echo "${TPS[pg_fence]}" | median)
recipe=$(echo "${TPS[recipe]}" | median)
advisory=$(echo "${TPS[advisory]}" | median)

PG_VERSION=$("${PSQL[@]}" -At -c "SHOW server_version")
SECTION=$(cat <<MD
<!-- lease_cycle:begin (written by bench/lease_cycle.sh) -->
## Acquire + release cycle

$(machine "$PG_VERSION"), pg_fence release build.
pgbench \`-M prepared\`, $CLIENTS clients, random keys over $KEYS, ${DURATION} s per run, median of
$ROUNDS rounds after a warm-up, variants in rotating order, each run from a CHECKPOINT.
One cycle = acquire (two round trips in all) and release.

| variant | cycles/s | vs the SQL recipe |
|---|---|---|
| pg_fence: lock_acquire (durable) + lock_release (async commit) | $(printf '%.0f' "$fence") | **$(ratio "$fence" "$recipe")** |
| hand-written recipe: INSERT ... ON CONFLICT ... WHERE expired + UPDATE, both durable | $(printf '%.0f' "$recipe") | 1.00 |
| pg_advisory_lock + pg_advisory_unlock (no lease, no token, nothing durable) | $(printf '%.0f' "$advisory") | $(ratio "$advisory" "$recipe") |

Aim (issue 5): pg_fence ≥ 1.25x the recipe. pg_fence commits one durable transaction
per cycle where the recipe commits two: that, not query speed, is where the ratio comes
from. Advisory locks are the floor of what PostgreSQL can do, but they are not leases:
they die with the session and carry no token.
<!-- lease_cycle:end -->
MD
)
write_section lease_cycle "$SECTION"
echo "$SECTION"
