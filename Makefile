# pg_fence: the two set-up commands are `make demo` and `make test`.
# Every target runs scripts/setup.sh first, which installs only what is missing.

PG_CONFIG    ?= /usr/lib/postgresql/15/bin/pg_config
PGFENCE_PORT ?= 28815
# Debian's Python, which has python3-psycopg (not a pyenv or venv one).
PYTHON       ?= /usr/bin/python3
export PGFENCE_PORT
PSQL         := psql -X -h 127.0.0.1 -p $(PGFENCE_PORT) -U postgres -d pg_fence
CLUSTER      := scripts/cluster.sh

.PHONY: setup install cluster demo stop psql test test-pgrx test-regress test-client test-integration test-pgbouncer test-patroni lint bench clean

setup:
	@scripts/setup.sh

## install: build the extension and install it into the system PostgreSQL 15,
## with the frozen install script of 0.1.0 (cargo-pgrx installs the current
## version's script and the upgrade scripts, sql/pg_fence--A--B.sql).
install: setup
	cargo pgrx install -p pg_fence --pg-config $(PG_CONFIG)
	install -m 644 sql/pg_fence--0.1.0.sql "$$($(PG_CONFIG) --sharedir)/extension/"

## cluster: start the throwaway cluster (target/pg_fence, port $(PGFENCE_PORT)).
cluster: install
	@$(CLUSTER) start

## demo: set up, start the cluster, and tell the story of two workers in SQL.
demo: cluster
	@$(PSQL) -q -c 'SET client_min_messages = warning' -c 'DROP EXTENSION IF EXISTS pg_fence CASCADE' -c 'DROP TABLE IF EXISTS payments' -c 'CREATE EXTENSION pg_fence'
	@$(PSQL) -f scripts/demo.sql
	@echo
	@echo "The cluster is still running. Connect with:"
	@echo "    $(PSQL)"
	@echo "Stop it with: make stop"

stop:
	@$(CLUSTER) stop

psql:
	@$(PSQL)

## test: set up, then every test tier (see README, "Tests").
test: test-pgrx test-regress test-client test-integration test-pgbouncer test-patroni lint
	@echo "make test: all tiers passed"

# Tier 1: #[pg_test] functions, inside a backend of a cluster cargo-pgrx manages.
# --runas: initdb/postgres refuse to run as root.
test-pgrx: setup
	@mkdir -p target/pgrx-test && if [ "$$(id -u)" -eq 0 ]; then chown postgres target/pgrx-test; fi
	cargo pgrx test pg15 -p pg_fence $(if $(filter 0,$(shell id -u)),--runas postgres --pgdata $(CURDIR)/target/pgrx-test/data)

# Tier 2: SQL goldens (pg_regress, as pgvector's installcheck): the API's
# results and errors and the README's story, in a fresh database of the
# throwaway cluster. Inputs in extension/tests/pg_regress/sql, outputs to
# compare in expected/; a difference fails with target/regress/regression.diffs.
PG_REGRESS := $(shell $(PG_CONFIG) --pkglibdir)/pgxs/src/test/regress/pg_regress
REGRESS    := setup demo leases errors fencing stats semaphore multi shared history
test-regress: cluster
	@psql -X -q -h 127.0.0.1 -p $(PGFENCE_PORT) -U postgres -d postgres \
		-c 'DROP DATABASE IF EXISTS pg_fence_regress WITH (FORCE)' -c 'CREATE DATABASE pg_fence_regress'
	@mkdir -p target/regress
	$(PG_REGRESS) --use-existing --host=127.0.0.1 --port=$(PGFENCE_PORT) --user=postgres \
		--dbname=pg_fence_regress --inputdir=extension/tests/pg_regress \
		--outputdir=target/regress $(REGRESS) \
		|| { cat target/regress/regression.diffs; exit 1; }

# Tier 3: the client crate's own unit tests and doctests (no database).
test-client: setup
	cargo test -p pg_fence_client --all-features

# Tier 4: the tests/ crate drives the throwaway cluster from outside, many sessions at once.
test-integration: cluster
	@$(PSQL) -q -c 'SET client_min_messages = warning' -c 'DROP EXTENSION IF EXISTS pg_fence CASCADE' -c 'CREATE EXTENSION pg_fence'
	cargo test -p pg_fence_tests -- --test-threads 4
	cargo run -q -p pg_fence_tests --example quickstart
	for example in leader_election fenced_payment_worker job_claimer account_transfer; do \
		cargo run -q -p pg_fence_client --features deadpool-postgres --example $$example || exit 1; \
	done
	cargo run -q -p pg_fence_client --features deadpool-postgres,metrics --example prometheus_metrics
	@mkdir -p target/python
	$(PYTHON) examples/python/leases.py "host=127.0.0.1 port=$(PGFENCE_PORT) user=postgres dbname=pg_fence" \
		> target/python/leases.out
	diff -u examples/python/leases.out target/python/leases.out

# Tier 5: the client's lease and run-once suites again, both drivers, with
# their pools going through a real PgBouncer (Debian's 1.18) in transaction
# mode (scripts/pgbouncer.sh); checks on the database still go straight to it.
PGFENCE_POOLER_PORT ?= 28830
POOLER_SUITES := --test client --test client_multi --test client_shared --test client_holder \
                 --test client_election --test once --test cas
test-pgbouncer: cluster
	@scripts/pgbouncer.sh start
	@PGFENCE_POOLER_PORT=$(PGFENCE_POOLER_PORT) cargo test -p pg_fence_tests $(POOLER_SUITES) -- --test-threads 4 \
		&& mkdir -p target/python \
		&& $(PYTHON) examples/python/leases.py "host=127.0.0.1 port=$(PGFENCE_POOLER_PORT) user=postgres dbname=pg_fence" \
			> target/python/leases-pgbouncer.out \
		&& diff -u examples/python/leases.out target/python/leases-pgbouncer.out; \
		status=$$?; scripts/pgbouncer.sh stop; exit $$status

# Tier 6: a real Patroni cluster (scripts/patroni.sh: Debian's patroni and
# etcd-server, two nodes, synchronous_mode): leases, guards and fenced
# writes through a multi-host connection string while the leader is killed
# with SIGKILL (tests/tests/patroni.rs, #[ignore]d in the other tiers).
test-patroni: cluster
	@scripts/patroni.sh start || { scripts/patroni.sh stop; exit 1; }
	@cargo test -p pg_fence_tests --test patroni -- --ignored --test-threads 1; \
		status=$$?; scripts/patroni.sh stop; exit $$status

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

## bench: release builds on the local cluster, plus Redis; writes BENCHMARKS.md and
## bench/hot_key_latency.png (about 40 minutes). Not part of make test.
bench:
	@scripts/setup.sh --bench
	cargo pgrx install --release -p pg_fence --pg-config $(PG_CONFIG)
	cargo build --release -p pg_fence_bench
	@$(CLUSTER) start
	@$(PSQL) -q -c 'SET client_min_messages = warning' -c 'DROP EXTENSION IF EXISTS pg_fence CASCADE' -c 'CREATE EXTENSION pg_fence'
	bench/lease_cycle.sh
	bench/fence_write.sh
	bench/hot_key.sh
	bench/handoff_floor.sh
	bench/client.sh
	bench/stats_cost.sh
	bench/scale.sh   # last: it drops and re-creates the extension

clean: stop
	$(CLUSTER) destroy
	cargo clean
