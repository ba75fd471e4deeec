-- pg_fence schema objects: the lease table, the token sequence, the lease
-- type and the fence.locks view. Included by the extension's install script
-- before any function is created (extension_sql_file!, bootstrap).

-- fence_admin may force-release any lease and renew or release leases of
-- other roles. Roles are cluster-wide, so a second database installing the
-- extension finds it already there.
DO $do$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'fence_admin') THEN
        CREATE ROLE fence_admin NOLOGIN;
    END IF;
END
$do$;

-- What lock_acquire and lock_status return.
CREATE TYPE fence.lease AS (
    lock_key    text,
    holder      text,
    token       bigint,
    acquired_at timestamptz,
    expires_at  timestamptz
);

-- One global order of fencing tokens (G1), like etcd's revision. CACHE 1 is
-- load-bearing: a per-backend cache would hand out tokens out of order.
CREATE SEQUENCE fence.token_seq AS bigint MINVALUE 1 START 1 CACHE 1 NO CYCLE;

-- One row per key, updated in place: released and expired leases keep their
-- row, so the last token of a key stays known (current_token). Only lock_key
-- is indexed, so every update of a lease is HOT-eligible; fillfactor leaves
-- room on the page for those new row versions.
CREATE TABLE fence.leases (
    lock_key         text COLLATE "C" NOT NULL,
    holder           text NOT NULL,
    token            bigint NOT NULL,
    ttl              interval NOT NULL,     -- the ttl the lease was acquired with
    acquired_at      timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    released_at      timestamptz,           -- NULL until released or forced
    -- The role that acquired it (G4). regrole, not oid: pg_dump writes it
    -- as the role's name and a restore reads it back as that role's OID in
    -- the new cluster, so restored leases keep their owners.
    owner_role       regrole NOT NULL,
    application_name text,
    -- No CHECK on the key's length: only the lease functions write here, and
    -- they refuse an empty key or one over 1024 bytes (22023) before any
    -- statement runs. A CHECK would be re-read from the catalog text on every
    -- grant (ExecConstraints), about a tenth of an acquire's CPU.
    CONSTRAINT leases_pkey PRIMARY KEY (lock_key)
) WITH (fillfactor = 50);

COMMENT ON TABLE fence.leases IS
    'pg_fence leases, one row per key. Live: released_at IS NULL AND expires_at > clock_timestamp(). Write only through the fence.lock_* functions.';

-- Leases and the token sequence are state, not schema: pg_dump keeps them so
-- a restored database continues the token order instead of restarting it.
SELECT pg_catalog.pg_extension_config_dump('fence.leases', '');
SELECT pg_catalog.pg_extension_config_dump('fence.token_seq', '');

-- Shared (reader) leases (0.2, shared.rs): any number per key at once,
-- while the key has no live exclusive lease, each with its own token. A
-- row per lease, deleted when it is released or forced; an expired one is
-- deleted by the next shared grant on its key. Live:
-- expires_at > clock_timestamp(). The key's exclusive lease stays in
-- fence.leases, so current_token and the fence check never see these.
CREATE TABLE fence.shared_leases (
    lock_key         text COLLATE "C" NOT NULL,
    token            bigint NOT NULL,
    holder           text NOT NULL,
    ttl              interval NOT NULL,
    acquired_at      timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    owner_role       regrole NOT NULL,      -- regrole for pg_dump, as in fence.leases
    application_name text,
    CONSTRAINT shared_leases_pkey PRIMARY KEY (lock_key, token)
);
COMMENT ON TABLE fence.shared_leases IS
    'pg_fence shared (reader) leases, one row per lease. Live: expires_at > clock_timestamp(). Write only through the fence.lock_* functions.';
SELECT pg_catalog.pg_extension_config_dump('fence.shared_leases', '');

-- Term history (0.2, history.rs), kept only for keys someone asked it for
-- (fence.lock_keep_history): every exclusive grant on such a key adds its
-- term here, in the grant's own statement, and drops the key's terms older
-- than the key's keep. previous_token is the term before it on the key
-- (NULL: the key had no row), so a reader of the history can tell that it
-- missed nothing. Other keys' grants look for their key in
-- fence.history_keys and write nothing.
CREATE TABLE fence.history_keys (
    lock_key text COLLATE "C" NOT NULL,
    keep     interval NOT NULL,
    since    timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    -- The role that started keeping it: it (or fence_admin) may stop it.
    owner_role regrole NOT NULL,
    CONSTRAINT history_keys_pkey PRIMARY KEY (lock_key)
);
COMMENT ON TABLE fence.history_keys IS
    'pg_fence keys whose terms are kept in fence.terms, and for how long. Write only through fence.lock_keep_history.';
SELECT pg_catalog.pg_extension_config_dump('fence.history_keys', '');
CREATE TABLE fence.terms (
    lock_key       text COLLATE "C" NOT NULL,
    token          bigint NOT NULL,
    previous_token bigint,
    holder         text NOT NULL,
    acquired_at    timestamptz NOT NULL,
    CONSTRAINT terms_pkey PRIMARY KEY (lock_key, token)
);
COMMENT ON TABLE fence.terms IS
    'pg_fence term history: one row per exclusive grant on a key in fence.history_keys. Read with fence.lock_history.';
SELECT pg_catalog.pg_extension_config_dump('fence.terms', '');
REVOKE ALL ON fence.history_keys, fence.terms FROM PUBLIC;
GRANT SELECT ON fence.history_keys, fence.terms TO PUBLIC;

-- Live leases, exclusive and shared, for people and monitoring.
CREATE VIEW fence.locks AS
SELECT l.lock_key,
       l.holder,
       l.token,
       l.acquired_at,
       l.expires_at,
       l.owner_role,
       l.application_name,
       'exclusive'::text AS mode
  FROM fence.leases AS l
 WHERE l.released_at IS NULL
   AND l.expires_at > pg_catalog.clock_timestamp()
UNION ALL
SELECT s.lock_key,
       s.holder,
       s.token,
       s.acquired_at,
       s.expires_at,
       s.owner_role,
       s.application_name,
       'shared'::text AS mode
  FROM fence.shared_leases AS s
 WHERE s.expires_at > pg_catalog.clock_timestamp();

-- Nobody writes the state directly: the lease functions are SECURITY
-- DEFINER and check the caller's role themselves (G4). Reading is harmless
-- and lets lock_status/current_token run as the caller.
REVOKE ALL ON fence.leases, fence.shared_leases, fence.token_seq FROM PUBLIC;
GRANT USAGE ON SCHEMA fence TO PUBLIC;
GRANT SELECT ON fence.leases, fence.shared_leases, fence.locks TO PUBLIC;

-- Run-once records (idempotency): one row per (role, operation key) whose
-- work committed. fence.claim_operation() inserts it inside the caller's
-- transaction, so the record and the work commit, or vanish, together.
CREATE TABLE fence.operations (
    owner_role  regrole NOT NULL,           -- regrole for pg_dump, as in fence.leases
    op_key      text COLLATE "C" NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    CONSTRAINT operations_pkey PRIMARY KEY (owner_role, op_key),
    CONSTRAINT operations_op_key_length CHECK (octet_length(op_key) BETWEEN 1 AND 1024)
);
SELECT pg_catalog.pg_extension_config_dump('fence.operations', '');
REVOKE ALL ON fence.operations FROM PUBLIC;

-- The tables fence.protect() fenced, and how (their partitions and
-- inheritance children carry clones of the fence). The fence check refuses
-- to run for a fence_guard trigger unless its clone chain's root is the
-- zz_fence_guard of a table here, with the arguments recorded here (so a
-- second fence_guard on a fenced table, or one re-created under another
-- key, is refused too): executing fence_guard cannot be revoked from PUBLIC (PostgreSQL
-- clones a partitioned table's row triggers as the role creating the
-- partition), so without this a plain role could attach fence_guard to a
-- table of its own under somebody else's key, and hold that key's lock.
-- regclass, so a dump carries the table's name; a dropped table's row goes
-- with it (the sql_drop event trigger in fence.sql).
CREATE TABLE fence.fences (
    tbl  regclass PRIMARY KEY,
    args bytea NOT NULL     -- the zz_fence_guard trigger's tgargs: its key, column, prefix, token column
);
SELECT pg_catalog.pg_extension_config_dump('fence.fences', '');
REVOKE ALL ON fence.fences FROM PUBLIC;
GRANT SELECT ON fence.fences TO PUBLIC;
GRANT INSERT, UPDATE, DELETE ON fence.fences TO fence_admin;
