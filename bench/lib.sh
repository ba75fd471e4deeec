# Shared by the bench scripts (sourced after ROOT is set): the connection to
# the local cluster, a scratch directory, statistics and the report.

PORT=${PGFENCE_PORT:-28815}
CONN=(-h 127.0.0.1 -p "$PORT" -U postgres)
PSQL=(psql -X -q -v ON_ERROR_STOP=1 "${CONN[@]}" -d pg_fence)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Median of the numbers on standard input, one per word.
median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# a / b with `digits` decimals (default 2).
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN {printf "%.*f", d, a/b}'; }

# One line about the machine and versions, for the report.
machine() {
    local cpu
    cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
    echo "$(date -u +%Y-%m-%d), $(nproc) cores ($cpu), $(free -g | awk '/^Mem:/ {print $2}') GiB, PostgreSQL $1"
}

# Replace the section between `<!-- NAME:begin` and `<!-- NAME:end -->` in
# BENCHMARKS.md with $2 (which carries those markers), or add it.
write_section() {
    local report="$ROOT/BENCHMARKS.md"
    [ -f "$report" ] || printf '# pg_fence benchmarks\n\nWritten by `make bench`; each section says how it was measured.\n\n' >"$report"
    python3 - "$report" "$1" "$2" <<'PY'
import re, sys
path, name, section = sys.argv[1:4]
text = open(path).read()
pattern = re.compile(r"<!-- %s:begin.*?<!-- %s:end -->" % (name, name), re.S)
text = pattern.sub(lambda m: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
open(path, "w").write(text)
PY
}

# The Rust half of the bench (bench/src/main.rs), built by `make bench`.
BENCH_BIN="$ROOT/target/release/pg_fence_bench"
[ -x "$BENCH_BIN" ] || (cd "$ROOT" && cargo build -q --release -p pg_fence_bench)

# The value of `name=value` in a line of pg_fence_bench output.
field() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p"; }

# A Redis on loopback for one comparison: redis_start PORT [extra options].
# No RDB snapshots; the caller chooses the AOF policy.
redis_start() {
    local port=$1
    shift
    mkdir -p "$WORK/redis-$port"
    redis-server --port "$port" --bind 127.0.0.1 --save '' --daemonize yes \
        --dir "$WORK/redis-$port" --pidfile "$WORK/redis-$port/pid" \
        --logfile "$WORK/redis-$port/log" "$@" >/dev/null
    for _ in $(seq 50); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "redis-server on port $port did not start" >&2
    return 1
}
redis_stop() { redis-cli -p "$1" shutdown nosave >/dev/null 2>&1 || true; }

# Checkpoints only where a script asks for them: a 15 s run just after a
# CHECKPOINT logs a full-page image for nearly every page it first touches,
# which over a million keys is most of its writes and no steady state shows.
# quiet_checkpoints stretches the interval for the run (restore_checkpoints
# undoes it; scripts call it from their EXIT trap).
quiet_checkpoints() {
    "${PSQL[@]}" -c "ALTER SYSTEM SET checkpoint_timeout = '1h'" -c "ALTER SYSTEM SET max_wal_size = '32GB'" \
        -c "SELECT pg_reload_conf()" >/dev/null
}
restore_checkpoints() {
    "${PSQL[@]}" -c "ALTER SYSTEM RESET checkpoint_timeout" -c "ALTER SYSTEM RESET max_wal_size" \
        -c "SELECT pg_reload_conf()" >/dev/null 2>&1 || true
}

# rotate_rounds VARIANT...: run each variant $ROUNDS times through the
# script's run() (which prints one rate), rotating the order from round to
# round. Fills TPS[variant] with the rates and MED[variant] with their median.
rotate_rounds() {
    declare -gA TPS MED
    local variants=("$@") round shift_by variant tps
    for round in $(seq "$ROUNDS"); do
        shift_by=$(((round - 1) % ${#variants[@]}))
        for variant in "${variants[@]:$shift_by}" "${variants[@]:0:$shift_by}"; do
            tps=$(run "$variant")
            [ -n "$tps" ] || { echo "run failed for $variant" >&2; exit 1; }
            TPS[$variant]="${TPS[$variant]:-} $tps"
            printf '   round %s  %-22s %10.0f /s\n' "$round" "$variant" "$tps"
        done
    done
    for variant in "${variants[@]}"; do MED[$variant]=$(echo "${TPS[$variant]}" | median); done
}

# seed_keys PREFIX FIRST LAST: released leases for PREFIX:FIRST..PREFIX:LAST in
# fence.leases (keys already there are left alone), as a lock service that
# has run a while has them; then VACUUM ANALYZE.
seed_keys() {
    "${PSQL[@]}" -v prefix="$1:" -v first="$2" -v last="$3" <<'SQL'
INSERT INTO fence.leases (lock_key, holder, token, ttl, acquired_at, expires_at, released_at, owner_role, application_name)
SELECT :'prefix' || g, 'seed', nextval('fence.token_seq'), interval '30 seconds',
       now() - interval '1 hour', now() - interval '1 hour' + interval '30 seconds',
       now() - interval '1 hour', 'postgres'::regrole, 'bench seed'
  FROM generate_series(:first, :last) AS g
ON CONFLICT (lock_key) DO NOTHING;
VACUUM ANALYZE fence.leases;
SQL
}

# pgbench_tps [pgbench options]: one pgbench run on the bench database; prints
# its tps (without connection time).
pgbench_tps() {
    pgbench -n -M prepared -j 2 "$@" "${CONN[@]}" pg_fence 2>&1 |
        sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p'
}
