#!/usr/bin/env bash
# Acquire + release cycles, side by side in one run, 8 clients on random keys
# over 1M, every key's row present (released) from the start in both tables,
# as in a lock service that has been running a while:
#
# pgbench (-M prepared), the SQL-level comparison:
#   pg_fence  fence.lock_acquire + fence.lock_release (acquire durable,
#             release asynchronous, as DESIGN.md's performance shape says)
#   recipe    the hand-written SQL recipe: INSERT ... ON CONFLICT ... WHERE
#             expired with a token sequence, then an UPDATE to release; both
#             durable
#   recipe_async_release  the same recipe, released by a PL/pgSQL function
#             that sets synchronous_commit = off for its transaction (what
#             pg_fence does), to show what is left once the commits match
#   advisory  pg_advisory_lock + pg_advisory_unlock (no lease, no token, no
#             durability: the floor)
# pg_fence_bench (Rust, tokio-postgres and a RESP client on one runtime):
#   pg_fence      the client's own SQL (pg_fence_client::sql) over tokio-postgres
#   redis         SET NX PX + Lua compare-and-delete, no persistence
#   redis-aof     the same with appendonly yes, appendfsync always (durable)
# Then a sweep over client counts, pg_fence vs the recipe, one round each.
# Checkpoints: one after seeding, then none until the script ends (see
# quiet_checkpoints in lib.sh); a 20 s warm-up per variant first writes most
# pages once. Medians of the rounds; writes the lease_cycle section of
# BENCHMARKS.md. Run through `make bench`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${BENCH_CLIENTS:-8}
DURATION=${BENCH_SECONDS:-15}
ROUNDS=${BENCH_ROUNDS:-3}
KEYS=${BENCH_KEYS:-1000000}
WARMUP=${BENCH_WARMUP_SECONDS:-20}
SWEEP=${BENCH_SWEEP:-1 2 4 8}
REDIS_PORT=${BENCH_REDIS_PORT:-28818}
REDIS_AOF_PORT=$((REDIS_PORT + 1))
. "$ROOT/bench/lib.sh"
trap 'redis_stop $REDIS_PORT; redis_stop $REDIS_AOF_PORT; restore_checkpoints; rm -rf "$WORK"' EXIT
quiet_checkpoints

echo "== lease_cycle: keys over $KEYS, $CLIENTS clients, ${DURATION}s x $ROUNDS rounds per variant"
echo "   seeding $KEYS released keys in fence.leases and in the recipe's table"
"${PSQL[@]}" -v keys="$KEYS" <<'SQL'
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
-- The recipe's release with pg_fence's commit policy: SET LOCAL in a function
-- without a SET clause lasts until the transaction commits.
CREATE OR REPLACE FUNCTION bench_recipe_release_async(k text, t bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    SET LOCAL synchronous_commit = off;
    UPDATE bench_recipe_locks SET expires_at = clock_timestamp() WHERE lock_key = k AND token = t;
END $$;
INSERT INTO bench_recipe_locks
SELECT 'cycle:' || g, 'seed', nextval('bench_recipe_token_seq'), now() - interval '1 hour'
  FROM generate_series(1, :keys) AS g;
VACUUM ANALYZE bench_recipe_locks;
SQL
seed_keys cycle 1 "$KEYS"
"${PSQL[@]}" -c CHECKPOINT

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
sed -e 's/^UPDATE bench_recipe_locks .*/SELECT bench_recipe_release_async('"'"'cycle:'"'"' || :id, :token);/' \
    "$WORK/recipe.sql" >"$WORK/recipe_async_release.sql"
cat >"$WORK/advisory.sql" <<'PGB'
\set id random(1, :keys)
SELECT pg_advisory_lock(:id);
SELECT pg_advisory_unlock(:id);
PGB

redis_start "$REDIS_PORT" --appendonly no
redis_start "$REDIS_AOF_PORT" --appendonly yes --appendfsync always

# variant [clients] -> cycles per second
run() {
    local clients=${2:-$CLIENTS}
    case $1 in
    pg_fence | recipe | recipe_async_release | advisory)
        pgbench_tps -c "$clients" -T "$DURATION" -D keys="$KEYS" -f "$WORK/$1.sql"
        ;;
    rust_pg_fence)
        "$BENCH_BIN" cycle tokio-postgres --clients "$clients" --seconds "$DURATION" --keys "$KEYS" | field cycles_per_s
        ;;
    redis)
        "$BENCH_BIN" cycle redis --clients "$clients" --seconds "$DURATION" --keys "$KEYS" --redis-port "$REDIS_PORT" | field cycles_per_s
        ;;
    redis_aof)
        "$BENCH_BIN" cycle redis --clients "$clients" --seconds "$DURATION" --keys "$KEYS" --redis-port "$REDIS_AOF_PORT" | field cycles_per_s
        ;;
    esac
}

VARIANTS=(pg_fence recipe recipe_async_release advisory rust_pg_fence redis redis_aof)
echo "   warm-up, ${WARMUP}s per variant (discarded)"
for variant in "${VARIANTS[@]}"; do DURATION=$WARMUP run "$variant" >/dev/null; done
rotate_rounds "${VARIANTS[@]}"

echo "   client sweep: pg_fence vs recipe, one ${DURATION}s run each"
SWEEP_ROWS=""
for clients in $SWEEP; do
    f=$(run pg_fence "$clients")
    r=$(run recipe "$clients")
    printf '   %s clients: pg_fence %.0f, recipe %.0f cycles/s\n' "$clients" "$f" "$r"
    SWEEP_ROWS+="| $clients | $(printf '%.0f' "$f") | $(printf '%.0f' "$r") | **$(ratio "$f" "$r")** |"$'\n'
done

PG_VERSION=$("${PSQL[@]}" -At -c "SHOW server_version")
REDIS_VERSION=$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')
f=${MED[pg_fence]} r=${MED[recipe]} a=${MED[advisory]} ra_rel=${MED[recipe_async_release]}
rf=${MED[rust_pg_fence]} rd=${MED[redis]} ra=${MED[redis_aof]}
SECTION=$(cat <<MD
<!-- lease_cycle:begin (written by bench/lease_cycle.sh) -->
## Acquire + release cycle

$(machine "$PG_VERSION"), Redis $REDIS_VERSION, pg_fence release build.
$CLIENTS clients, random keys over $KEYS, each key's row present (released) in both
PostgreSQL tables from the start; ${DURATION} s per run, median of $ROUNDS rounds, variants in
rotating order, after a ${WARMUP} s warm-up of each. Checkpoints: one after seeding, none
during the runs (\`checkpoint_timeout\` stretched for the script), so the runs show the
steady state rather than the burst of full-page images right after a checkpoint. One cycle
= acquire and release, two round trips.

**SQL-level** (pgbench \`-M prepared\`):

| variant | cycles/s | vs the SQL recipe |
|---|---|---|
| pg_fence: lock_acquire (durable) + lock_release (async commit) | $(printf '%.0f' "$f") | **$(ratio "$f" "$r")** |
| hand-written recipe: INSERT ... ON CONFLICT ... WHERE expired + UPDATE, both durable | $(printf '%.0f' "$r") | 1.00 |
| the recipe with its release committed asynchronously (a PL/pgSQL function, SET LOCAL) | $(printf '%.0f' "$ra_rel") | $(ratio "$ra_rel" "$r") |
| pg_advisory_lock + pg_advisory_unlock (no lease, no token, nothing durable) | $(printf '%.0f' "$a") | $(ratio "$a" "$r") |

**Against Redis** (one Rust harness, \`bench/src/main.rs\`: tokio-postgres with the client
crate's SQL text, and a RESP client; the same runtime, tasks and key choice for both):

| variant | cycles/s | vs pg_fence |
|---|---|---|
| pg_fence over tokio-postgres | $(printf '%.0f' "$rf") | 1.00 |
| Redis: SET NX PX + Lua compare-and-delete, no persistence | $(printf '%.0f' "$rd") | $(ratio "$rd" "$rf") |
| Redis, appendonly yes + appendfsync always (each write fsynced) | $(printf '%.0f' "$ra") | $(ratio "$ra" "$rf") |

**Clients** (pgbench, one ${DURATION} s run per cell, so noisier than the medians above):

| clients | pg_fence cycles/s | recipe cycles/s | pg_fence / recipe |
|---|---|---|---|
$SWEEP_ROWS
Aim (issue 5): pg_fence ≥ 1.25x the recipe at 8 clients. Redis without persistence
forgets every lock in a crash and has no token; with \`appendfsync always\` it fsyncs
each SET and each delete, as the recipe commits twice.
<!-- lease_cycle:end -->
MD
)
write_section lease_cycle "$SECTION"
echo "$SECTION"
