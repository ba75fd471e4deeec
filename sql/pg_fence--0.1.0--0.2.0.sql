-- pg_fence 0.1.0 -> 0.2.0 (SQL API 0.2). Run by ALTER EXTENSION pg_fence UPDATE,
-- with live leases, run-once records and fenced tables in place.
\echo Use "ALTER EXTENSION pg_fence UPDATE TO '0.2.0'" to load this file. \quit

-- Roles by name in dumps (G4). owner_role was an oid: a pg_dump restored
-- into another cluster (roles re-created by name, with other OIDs) orphaned
-- run-once records, so the work ran twice, and handed restored leases to
-- whichever role got the OID. As regrole it is dumped as the role's name and
-- read back as that role's OID. oid -> regrole is binary-coercible: no
-- rewrite. The view reads the column, so it goes and comes back.
-- A view of the caller's own over fence.locks would block the DROP: say
-- which, rather than fail half-way.
DO $do$
DECLARE
    dependents text;
BEGIN
    SELECT string_agg(DISTINCT r.ev_class::pg_catalog.regclass::text, ', ') INTO dependents
      FROM pg_catalog.pg_depend AS d JOIN pg_catalog.pg_rewrite AS r ON r.oid = d.objid
     WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
       AND d.refobjid = 'fence.locks'::pg_catalog.regclass
       AND r.ev_class <> 'fence.locks'::pg_catalog.regclass;
    IF dependents IS NOT NULL THEN
        RAISE EXCEPTION 'pg_fence 0.2.0 re-creates view fence.locks (owner_role becomes regrole, shared leases and a mode column join it), and views depend on it: %', dependents
            USING ERRCODE = '2BP01',
                  HINT = 'Drop them, run ALTER EXTENSION pg_fence UPDATE, then create them again.';
    END IF;
END
$do$;
DROP VIEW fence.locks;
ALTER TABLE fence.leases ALTER COLUMN owner_role TYPE regrole;
ALTER TABLE fence.operations ALTER COLUMN owner_role TYPE regrole;
-- Shared (reader) leases (schema.sql): any number per key at once,
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

REVOKE ALL ON fence.shared_leases FROM PUBLIC;
GRANT SELECT ON fence.shared_leases TO PUBLIC;
-- Term history (schema.sql, history.rs), kept only for keys someone asked it for
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

-- fence.locks lists them too, with a mode column.
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
GRANT SELECT ON fence.locks TO PUBLIC;

-- A ttl is an exact duration (G5): 0.2 stores it as microseconds only, so
-- that renew's `clock_timestamp() + ttl` is calendar-free. Leases granted by
-- 0.1 may hold days (or months): the same length, counted as 0.1's max check
-- counted it.
UPDATE fence.leases
   SET ttl = pg_catalog.make_interval(secs => pg_catalog.date_part('epoch', ttl))
 WHERE pg_catalog.date_part('day', ttl) <> 0 OR pg_catalog.date_part('month', ttl) <> 0
    OR pg_catalog.date_part('year', ttl) <> 0;

-- The registry of fences (schema.sql): every table fenced under 0.1.
CREATE TABLE fence.fences (
    tbl  regclass PRIMARY KEY,
    args bytea NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('fence.fences', '');
REVOKE ALL ON fence.fences FROM PUBLIC;
GRANT SELECT ON fence.fences TO PUBLIC;
GRANT INSERT, UPDATE, DELETE ON fence.fences TO fence_admin;
INSERT INTO fence.fences (tbl, args)
SELECT t.tgrelid, t.tgargs FROM pg_catalog.pg_trigger AS t
 WHERE t.tgname = 'zz_fence_guard' AND t.tgparentid = 0
   AND t.tgfoid = 'fence.fence_guard()'::pg_catalog.regprocedure;

-- New C functions (reach.rs, keylock.rs, stats.rs, waiters.rs), as the 0.2.0 install script declares them.
CREATE FUNCTION fence."_clone_fence_trigger"(
	"parent_trigger" oid,
	"child" oid
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_clone_fence_trigger_wrapper';

CREATE FUNCTION fence."_key_lock_id"(
	"lock_key" TEXT
) RETURNS bigint
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_key_lock_id_wrapper';

CREATE FUNCTION fence."_lock_acquire"(
	"lock_key" TEXT,
	"ttl" interval,
	"holder" TEXT,
	"wait" interval,
	"adopt" bool
) RETURNS fence.lease /* Option < :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox ::
AllocatedByRust > > */
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', '_lock_acquire_wrapper';

CREATE FUNCTION fence."_lock_acquire_all"(
	"lock_keys" TEXT[],
	"ttl" interval,
	"holder" TEXT,
	"wait" interval,
	"adopt" bool
) RETURNS SETOF fence.lease /* :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox :: AllocatedByRust
> */
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', '_lock_acquire_all_wrapper';

CREATE FUNCTION fence."_lock_acquire_shared"(
	"lock_key" TEXT,
	"ttl" interval,
	"holder" TEXT,
	"wait" interval,
	"adopt" bool
) RETURNS fence.lease /* Option < :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox ::
AllocatedByRust > > */
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', '_lock_acquire_shared_wrapper';

CREATE FUNCTION fence."_lock_stats"() RETURNS TABLE (
	"key_class" TEXT,
	"acquires" bigint,
	"grants" bigint,
	"regrants" bigint,
	"contended" bigint,
	"busy" bigint,
	"timeouts" bigint,
	"wait_seconds_total" double precision,
	"wait_seconds_max" double precision,
	"renewals" bigint,
	"renewals_lost" bigint,
	"releases" bigint,
	"releases_lost" bigint,
	"forced" bigint,
	"expirations" bigint,
	"hold_seconds_total" double precision,
	"stale_writes" bigint,
	"stats_reset" timestamp with time zone
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', '_lock_stats_wrapper';

CREATE FUNCTION fence."_lock_stats_info"() RETURNS TABLE (
	"classes_max" INT,
	"classes_used" INT,
	"tables_max" INT,
	"tables_used" INT,
	"dropped" bigint
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', '_lock_stats_info_wrapper';

CREATE FUNCTION fence."_lock_wait_histogram"() RETURNS TABLE (
	"key_class" TEXT,
	"le" double precision,
	"count" bigint
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', '_lock_wait_histogram_wrapper';

CREATE FUNCTION fence."_new_key_secret"() RETURNS bytea
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_new_key_secret_wrapper';

CREATE FUNCTION fence."_refused_writes"(
	"relation" oid
) RETURNS bigint
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', '_refused_writes_wrapper';

CREATE FUNCTION fence."_semaphore_acquire"(
	"name" TEXT,
	"permits" INT,
	"ttl" interval,
	"holder" TEXT,
	"wait" interval,
	"adopt" bool
) RETURNS fence.lease /* Option < :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox ::
AllocatedByRust > > */
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', '_semaphore_acquire_wrapper';

CREATE FUNCTION fence."_trigger_args"(
	"args" bytea,
	"count" INT
) RETURNS TEXT[]
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_trigger_args_wrapper';

CREATE FUNCTION fence."_unlink_fence_clone"(
	"trigger" oid
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_unlink_fence_clone_wrapper';

CREATE FUNCTION fence."_waiters"() RETURNS TABLE (
	"pid" INT,
	"role" oid,
	"lock_key" TEXT,
	"mode" TEXT,
	"waiting_since" timestamp with time zone,
	"wait_until" timestamp with time zone,
	"position" bigint
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', '_waiters_wrapper';

CREATE FUNCTION fence."lock_acquire_all"(
	"lock_keys" TEXT[],
	"ttl" interval DEFAULT '30 seconds',
	"holder" TEXT DEFAULT NULL,
	"wait" interval DEFAULT '0'
) RETURNS SETOF fence.lease /* :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox :: AllocatedByRust
> */
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'lock_acquire_all_wrapper';

CREATE FUNCTION fence."lock_acquire_shared"(
	"lock_key" TEXT,
	"ttl" interval DEFAULT '30 seconds',
	"holder" TEXT DEFAULT NULL,
	"wait" interval DEFAULT '0'
) RETURNS fence.lease /* Option < :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox ::
AllocatedByRust > > */
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'lock_acquire_shared_wrapper';

CREATE FUNCTION fence."lock_history"(
	"lock_key" TEXT,
	"after_token" bigint DEFAULT NULL,
	"wait" interval DEFAULT '0'
) RETURNS TABLE (
	"lock_key" TEXT,
	"token" bigint,
	"previous_token" bigint,
	"holder" TEXT,
	"acquired_at" timestamp with time zone
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'lock_history_wrapper';

CREATE FUNCTION fence."lock_keep_history"(
	"lock_key" TEXT,
	"keep" interval DEFAULT '1 hour'
) RETURNS bigint
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'lock_keep_history_wrapper';

CREATE FUNCTION fence."lock_release_all"(
	"lock_keys" TEXT[],
	"token" bigint
) RETURNS INT
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'lock_release_all_wrapper';

CREATE FUNCTION fence."lock_stats_reset"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'lock_stats_reset_wrapper';

CREATE FUNCTION fence."lock_watch"(
	"lock_key" TEXT,
	"known_token" bigint,
	"wait" interval
) RETURNS fence.lease /* Option < :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox ::
AllocatedByRust > > */
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'lock_watch_wrapper';

CREATE FUNCTION fence."semaphore_acquire"(
	"name" TEXT,
	"permits" INT,
	"ttl" interval DEFAULT '30 seconds',
	"holder" TEXT DEFAULT NULL,
	"wait" interval DEFAULT '0'
) RETURNS fence.lease /* Option < :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox ::
AllocatedByRust > > */
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'semaphore_acquire_wrapper';

CREATE FUNCTION fence."semaphore_status"(
	"name" TEXT
) RETURNS SETOF fence.lease /* :: pgrx :: heap_tuple :: PgHeapTuple < '_, :: pgrx :: pgbox :: AllocatedByRust
> */
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'semaphore_status_wrapper';

CREATE FUNCTION fence."sweep"(
	"idle_for" interval DEFAULT '7 days'
) RETURNS bigint
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'sweep_wrapper';

-- sql/fence.sql as of 0.2.0: protect() needs fence_admin and trusted
-- columns, fences reach partitions and inheritance children, the DDL event
-- triggers, fence.blockers, refused writes in fence.protected_tables.
-- Fencing (G3): fence.protect() installs the Rust trigger functions
-- fence.fence_guard (BEFORE INSERT OR UPDATE OR DELETE, FOR EACH ROW) and
-- fence.fence_no_truncate (BEFORE TRUNCATE) on a table; fence.unprotect()
-- removes them. The configuration lives in the triggers' arguments, which
-- the row check reads without any catalog lookup.
--
-- Both are SECURITY INVOKER: only a table's owner (or a member of the owning
-- role) may protect or unprotect it, which is checked first so the error is
-- ours (42501), not the one CREATE TRIGGER would give half-way.
--
-- The trigger is named zz_fence_guard so that it fires after other BEFORE
-- ROW triggers (they fire in name order) and checks the row as it will be
-- written. Both triggers are ENABLE ALWAYS: they fire under
-- session_replication_role = replica too.

-- The secret of the key lock's 64-bit hash (key.rs): sixteen bytes from
-- the server's strong random source, made once per database, one row,
-- unchangeable while the extension exists, readable by no plain role (the
-- extension reads it directly; superusers and pg_read_all_data can). Two
-- keys with one hash share one lock; with a guessable or short hash a
-- plain role could find a key that shares the victim's and hold the
-- victim's key with a lease of its own. Not dumped: a restored database
-- makes its own.
CREATE TABLE IF NOT EXISTS fence.key_secret (
    secret bytea NOT NULL CHECK (pg_catalog.octet_length(secret) = 16)
);
CREATE UNIQUE INDEX IF NOT EXISTS key_secret_one_row ON fence.key_secret ((true));
INSERT INTO fence.key_secret (secret)
SELECT fence._new_key_secret() WHERE NOT EXISTS (SELECT FROM fence.key_secret);
REVOKE ALL ON fence.key_secret FROM PUBLIC;
-- Backends read the secret once: changing it would make them disagree on
-- a key's lock, and a fenced write and a grant would stop conflicting.
CREATE OR REPLACE FUNCTION fence._key_secret_is_fixed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RAISE EXCEPTION 'fence.key_secret cannot change while pg_fence is installed'
        USING ERRCODE = '55000',
              HINT = 'Backends have read it; DROP EXTENSION and CREATE EXTENSION make a new one.';
END
$fn$;
DROP TRIGGER IF EXISTS key_secret_is_fixed ON fence.key_secret;
CREATE TRIGGER key_secret_is_fixed BEFORE UPDATE OR DELETE ON fence.key_secret
    FOR EACH ROW EXECUTE FUNCTION fence._key_secret_is_fixed();
DROP TRIGGER IF EXISTS key_secret_is_not_truncated ON fence.key_secret;
CREATE TRIGGER key_secret_is_not_truncated BEFORE TRUNCATE ON fence.key_secret
    FOR EACH STATEMENT EXECUTE FUNCTION fence._key_secret_is_fixed();
ALTER TABLE fence.key_secret ENABLE ALWAYS TRIGGER key_secret_is_fixed,
    ENABLE ALWAYS TRIGGER key_secret_is_not_truncated;
REVOKE EXECUTE ON FUNCTION fence._new_key_secret() FROM PUBLIC;

-- A table and every table below it (partitions and inheritance children,
-- at any depth), and a table and every table above it: the family walks
-- the functions below share.
CREATE OR REPLACE FUNCTION fence._family(tbl regclass) RETURNS SETOF oid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH RECURSIVE tree(relid) AS (
        SELECT tbl::oid
        UNION
        SELECT i.inhrelid FROM pg_inherits AS i JOIN tree ON i.inhparent = tree.relid
    )
    SELECT relid FROM tree
$fn$;

CREATE OR REPLACE FUNCTION fence._lineage(tbl regclass) RETURNS SETOF oid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH RECURSIVE up(relid) AS (
        SELECT tbl::oid
        UNION
        SELECT i.inhparent FROM pg_inherits AS i JOIN up ON i.inhrelid = up.relid
    )
    SELECT relid FROM up
$fn$;

-- Drop whichever of the two fence triggers a table has (quietly).
CREATE OR REPLACE FUNCTION fence._drop_fence_triggers(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    trigger_name name;
BEGIN
    FOR trigger_name IN
        SELECT t.tgname FROM pg_trigger AS t
         WHERE t.tgrelid = tbl AND t.tgname IN ('zz_fence_guard', 'zz_fence_no_truncate')
           AND t.tgparentid = 0
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, tbl);
    END LOOP;
END
$fn$;

-- The checks protect() and unprotect() share: a table (22004, 42809), owned
-- by the caller or a role the caller belongs to, and a caller in fence_admin
-- (42501). Choosing the key a table is fenced under is choosing whose lease
-- its writes hold up: a plain role that owns a table must not fence it under
-- somebody else's key, read the live token from fence.locks, and then hold
-- the key's share lock in a transaction it keeps open, so that nobody can
-- acquire the key once the victim's lease ends.
CREATE OR REPLACE FUNCTION fence._require_table_owner(function_name text, tbl regclass) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    rel record;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION '%: argument "tbl" must not be NULL', function_name USING ERRCODE = '22004';
    END IF;
    SELECT c.relkind, c.relowner INTO rel FROM pg_class AS c WHERE c.oid = tbl;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '%: "%" is not a table', function_name, tbl USING ERRCODE = '42809';
    END IF;
    IF NOT pg_has_role(current_user, rel.relowner, 'USAGE') THEN
        RAISE EXCEPTION '%: role "%" must own table "%"', function_name, current_user, tbl
            USING ERRCODE = '42501';
    END IF;
    IF NOT pg_has_role(current_user, 'fence_admin', 'USAGE') THEN
        RAISE EXCEPTION '%: role "%" must be a member of fence_admin to fence or unfence a table',
            function_name, current_user
            USING ERRCODE = '42501',
                  HINT = 'The key a table is fenced under decides whose leases hold up its writes; a member of fence_admin chooses it.';
    END IF;
END
$fn$;

-- A column the fence check can trust (G3: keys computed from the row as
-- written, in a form no session setting changes): present (42703), of an
-- accepted type (42804), and not a generated column (0A000): a STORED
-- generated column is computed after BEFORE triggers, so the check would
-- see the old value. protect() checks its arguments with it, and the DDL
-- event trigger re-checks fenced tables after every ALTER TABLE, so a key
-- column cannot be re-typed, renamed, dropped or generated behind the fence.
CREATE OR REPLACE FUNCTION fence._require_trusted_column(function_name text, tbl regclass, col name, role text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    att record;
BEGIN
    SELECT a.atttypid::regtype AS typ, a.attgenerated INTO att FROM pg_attribute AS a
     WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%: table "%" has no column "%" (%_column)', function_name, tbl, col, role
            USING ERRCODE = '42703';
    END IF;
    IF att.attgenerated <> '' THEN
        RAISE EXCEPTION '%: % column "%" of table "%" is a generated column', function_name, role, col, tbl
            USING ERRCODE = '0A000',
                  DETAIL = 'Generated columns are computed after BEFORE triggers, so the fence would check the old value.';
    END IF;
    IF role = 'token' AND att.typ <> 'bigint'::regtype THEN
        RAISE EXCEPTION '%: token column "%" of table "%" must be of type bigint, not %',
            function_name, col, tbl, att.typ USING ERRCODE = '42804';
    END IF;
    -- The row's key is key_prefix || the column's text form, which must
    -- not depend on session settings (DateStyle, TimeZone, extra_float_digits...):
    -- two sessions would otherwise fence the same row under different keys.
    IF role = 'key' AND att.typ NOT IN ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype, 'name'::regtype,
                                        'int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'uuid'::regtype) THEN
        RAISE EXCEPTION '%: key column "%" of table "%" is of type %', function_name, col, tbl, att.typ
            USING ERRCODE = '42804',
                  HINT = 'Key columns must be text, varchar, char, name, smallint, integer, bigint or uuid.';
    END IF;
END
$fn$;

-- The fence of a table, as its zz_fence_guard trigger's arguments hold it:
-- (kind 'key' or 'column', lock key or key column, key prefix, token column).
CREATE OR REPLACE FUNCTION fence._fence_config(tbl regclass) RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT fence._trigger_args(t.tgargs, t.tgnargs)
      FROM pg_trigger AS t
     WHERE t.tgrelid = tbl AND t.tgname = 'zz_fence_guard' AND t.tgparentid = 0
       AND t.tgfoid = 'fence.fence_guard()'::regprocedure
$fn$;

-- Check that a fenced table's columns can still be trusted (see above).
CREATE OR REPLACE FUNCTION fence._check_fence_columns(function_name text, tbl regclass) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    config text[] := fence._fence_config(tbl);
BEGIN
    IF config[1] = 'column' THEN
        PERFORM fence._require_trusted_column(function_name, tbl, config[2]::name, 'key');
    END IF;
    IF config[4] <> '' THEN
        PERFORM fence._require_trusted_column(function_name, tbl, config[4]::name, 'token');
    END IF;
END
$fn$;

-- Every table a write can reach through a fenced table carries its fence.
-- PostgreSQL clones row triggers to partitions itself, but not statement
-- triggers (TRUNCATE of a partition), and no trigger at all to inheritance
-- children (UPDATE parent writes their rows). So each fence trigger of
-- `tbl` that PostgreSQL does not clone is cloned here, to every descendant
-- at any depth, as PostgreSQL clones a partition's row triggers
-- (fence._clone_fence_trigger, in reach.rs): linked to the parent's trigger,
-- dropped with it, not droppable on its own, and not written by pg_dump,
-- which re-creates the parent's trigger and so, through the DDL event
-- trigger below, the clones. A descendant that has a fence of its own is
-- refused: its writes through the parent would be checked under the wrong
-- fence. So is a foreign table (it cannot have a TRUNCATE trigger, and its
-- rows live elsewhere), and a table that joins with rows already in it,
-- unless a member of fence_admin attaches it (reach.rs checks both).
--
-- SECURITY DEFINER: a plain owner's CREATE TABLE ... PARTITION OF a fenced
-- table must get the clones, and the clone primitives
-- (_clone_fence_trigger, _unlink_fence_clone) are not executable by PUBLIC
-- (a plain role must not attach a fence to a table of its own). It only copies a fence that a table
-- already has onto that table's own descendants.
CREATE OR REPLACE FUNCTION fence._fence_descendants(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    parent_trigger record;
    child record;
BEGIN
    FOR parent_trigger IN
        SELECT t.oid, t.tgname, (t.tgtype & 1) <> 0 AS row_level, t.tgenabled
          FROM pg_trigger AS t
         WHERE t.tgrelid = tbl AND t.tgparentid = 0
           AND t.tgname IN ('zz_fence_guard', 'zz_fence_no_truncate')
           AND t.tgfoid IN ('fence.fence_guard()'::regprocedure, 'fence.fence_no_truncate()'::regprocedure)
    LOOP
        FOR child IN
            SELECT b.relid::regclass AS relid, c.relispartition,
                   t.tgparentid AS existing_parent, t.tgenabled AS existing_enabled
              FROM fence._family(tbl) AS b(relid) JOIN pg_class AS c ON c.oid = b.relid
              LEFT JOIN pg_trigger AS t ON t.tgrelid = b.relid AND t.tgname = parent_trigger.tgname
             WHERE b.relid <> tbl::oid
        LOOP
            -- A clone, ours or (on a partition, for a row trigger)
            -- PostgreSQL's own, whose parent may be an intermediate
            -- partition's clone: it follows the fenced table's state (made
            -- while the parent was still in its CREATE TRIGGER state, or
            -- switched off by the owner of one partition or child).
            IF (parent_trigger.row_level AND child.relispartition)
               OR child.existing_parent = parent_trigger.oid THEN
                IF child.existing_enabled IS DISTINCT FROM parent_trigger.tgenabled THEN
                    EXECUTE format('ALTER TABLE %s %s TRIGGER %I', child.relid,
                                   CASE parent_trigger.tgenabled WHEN 'A' THEN 'ENABLE ALWAYS'
                                                                 WHEN 'R' THEN 'ENABLE REPLICA'
                                                                 WHEN 'D' THEN 'DISABLE'
                                                                 ELSE 'ENABLE' END,
                                   parent_trigger.tgname);
                END IF;
                CONTINUE;
            END IF;
            IF child.existing_parent IS NOT NULL THEN
                RAISE EXCEPTION 'table "%" is fenced on its own and cannot be reached through fenced table "%"',
                    child.relid, tbl
                    USING ERRCODE = '55000',
                          HINT = format('Call fence.unprotect(%L) first: it is then fenced as part of %s.', child.relid::text, tbl);
            END IF;
            PERFORM fence._clone_fence_trigger(parent_trigger.oid, child.relid);
        END LOOP;
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION fence.protect(
    tbl          regclass,
    lock_key     text DEFAULT NULL,
    key_column   name DEFAULT NULL,
    key_prefix   text DEFAULT '',
    token_column name DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM fence._require_table_owner('protect', tbl);
    IF key_prefix IS NULL THEN
        RAISE EXCEPTION 'protect: argument "key_prefix" must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF pg_catalog.getdatabaseencoding() <> 'UTF8' THEN
        RAISE EXCEPTION 'protect: database "%" is not UTF-8 (it is %)', pg_catalog.current_database(),
            pg_catalog.getdatabaseencoding()
            USING ERRCODE = '0A000',
                  DETAIL = 'Row keys are compared as text; in another encoding two different keys could read as one.';
    END IF;
    IF (SELECT c.relpersistence FROM pg_class AS c WHERE c.oid = tbl) = 't' THEN
        RAISE EXCEPTION 'protect: "%" is a temporary table', tbl
            USING ERRCODE = '0A000',
                  DETAIL = 'A temporary table goes at the end of its session without the DROP a fence registry would see.';
    END IF;
    IF (lock_key IS NULL) = (key_column IS NULL) THEN
        RAISE EXCEPTION 'protect: give exactly one of "lock_key" (one key for the whole table) or "key_column" (one key per row)'
            USING ERRCODE = '22023';
    END IF;
    IF lock_key IS NOT NULL AND (lock_key = '' OR octet_length(lock_key) > 1024) THEN
        RAISE EXCEPTION 'protect: invalid "lock_key": must be 1 to 1024 bytes' USING ERRCODE = '22023';
    END IF;
    IF key_column IS NOT NULL THEN
        PERFORM fence._require_trusted_column('protect', tbl, key_column, 'key');
    END IF;
    IF token_column IS NOT NULL THEN
        PERFORM fence._require_trusted_column('protect', tbl, token_column, 'token');
    END IF;
    IF EXISTS (SELECT FROM pg_trigger AS t
                WHERE t.tgrelid = tbl AND t.tgname = 'zz_fence_guard' AND t.tgparentid <> 0) THEN
        RAISE EXCEPTION 'protect: table "%" is fenced as part of the table it inherits from', tbl
            USING ERRCODE = '55000',
                  HINT = 'Its writes are checked under its parent''s fence; change that one with fence.protect() on the parent.';
    END IF;

    PERFORM fence._drop_fence_triggers(tbl);
    EXECUTE format(
        'CREATE TRIGGER zz_fence_guard BEFORE INSERT OR UPDATE OR DELETE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION fence.fence_guard(%L, %L, %L, %L)',
        tbl,
        CASE WHEN lock_key IS NOT NULL THEN 'key' ELSE 'column' END,
        coalesce(lock_key, key_column::text),
        key_prefix,
        coalesce(token_column::text, ''));
    EXECUTE format(
        'CREATE TRIGGER zz_fence_no_truncate BEFORE TRUNCATE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION fence.fence_no_truncate()', tbl);
    EXECUTE format(
        'ALTER TABLE %s ENABLE ALWAYS TRIGGER zz_fence_guard, ENABLE ALWAYS TRIGGER zz_fence_no_truncate', tbl);
    INSERT INTO fence.fences AS f (tbl, args)
    SELECT protect.tbl, t.tgargs FROM pg_trigger AS t
     WHERE t.tgrelid = protect.tbl AND t.tgname = 'zz_fence_guard'
    ON CONFLICT ON CONSTRAINT fences_pkey DO UPDATE SET args = EXCLUDED.args;
    PERFORM fence._check_trigger_order(tbl);
    PERFORM fence._fence_descendants(tbl);
END
$fn$;

COMMENT ON FUNCTION fence.protect(regclass, text, name, text, name) IS
    'Fence a table: writes must carry the token of the live lease on lock_key, or on key_prefix || key_column per row (SQLSTATE FN001 otherwise).';

CREATE OR REPLACE FUNCTION fence.unprotect(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM fence._require_table_owner('unprotect', tbl);
    IF EXISTS (SELECT FROM pg_trigger AS t
                WHERE t.tgrelid = tbl AND t.tgname = 'zz_fence_guard' AND t.tgparentid <> 0) THEN
        RAISE EXCEPTION 'unprotect: table "%" is fenced as part of the table it inherits from', tbl
            USING ERRCODE = '55000',
                  HINT = 'Call fence.unprotect() on that table, or detach this one from it.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_trigger AS t WHERE t.tgrelid = tbl AND t.tgname = 'zz_fence_guard') THEN
        RAISE NOTICE 'table "%" is not protected', tbl;
    END IF;
    PERFORM fence._drop_fence_triggers(tbl);
    DELETE FROM fence.fences AS f WHERE f.tbl = unprotect.tbl;
END
$fn$;

-- Whether a fenced table's fence fires, always (ENABLE ALWAYS), on the
-- table and on every clone of it below: an owner of one partition can
-- disable the clone on it.
CREATE OR REPLACE FUNCTION fence._fence_enforced(tbl regclass) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT bool_and(t.tgenabled = 'A')
      FROM fence._family(tbl) AS tree(relid) JOIN pg_trigger AS t ON t.tgrelid = tree.relid
     WHERE t.tgname IN ('zz_fence_guard', 'zz_fence_no_truncate')
       AND t.tgfoid IN ('fence.fence_guard()'::regprocedure, 'fence.fence_no_truncate()'::regprocedure)
$fn$;

-- Fenced tables and how, read from the triggers themselves: the tables
-- fence.protect() was called on (their partitions and inheritance children
-- carry clones of the fence, not listed). "enforced" is false if someone
-- disabled the trigger (a table owner can); "refused_writes" counts FN001
-- refusals (preload mode).
CREATE OR REPLACE VIEW fence.protected_tables AS
SELECT t.tgrelid::pg_catalog.regclass                        AS tbl,
       CASE args.a[1] WHEN 'key' THEN args.a[2] END           AS lock_key,
       CASE args.a[1] WHEN 'column' THEN args.a[2]::name END  AS key_column,
       CASE args.a[1] WHEN 'column' THEN args.a[3] END        AS key_prefix,
       NULLIF(args.a[4], '')::name                            AS token_column,
       fence._fence_enforced(t.tgrelid)                       AS enforced,
       -- Writes refused with FN001 on the table and its partitions and
       -- children since the statistics were reset (NULL without preload).
       (SELECT pg_catalog.sum(fence._refused_writes(tree.relid))::bigint
          FROM fence._family(t.tgrelid) AS tree(relid))       AS refused_writes
  FROM pg_catalog.pg_trigger AS t
 CROSS JOIN LATERAL (SELECT fence._trigger_args(t.tgargs, t.tgnargs) AS a) AS args
 WHERE t.tgname = 'zz_fence_guard'
   AND t.tgparentid = 0
   AND t.tgfoid = 'fence.fence_guard()'::pg_catalog.regprocedure;

GRANT SELECT ON fence.protected_tables TO PUBLIC;

-- Fence clones whose table no longer inherits from the clone's parent
-- (ALTER TABLE ... NO INHERIT, DETACH PARTITION): unlinked from the parent's
-- trigger and dropped, as PostgreSQL drops a detached partition's row
-- trigger clones. Left in place they would keep the table half-fenced under
-- a fence nobody can see, change or dump.
CREATE OR REPLACE FUNCTION fence._drop_orphan_fence_clones(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    member regclass;
    orphan record;
BEGIN
    -- The table and everything below it: after "b NO INHERIT a", b's own
    -- children still carry a's clones too.
    FOR member IN
        SELECT relid::regclass FROM fence._family(tbl) AS tree(relid)
    LOOP
        FOR orphan IN
            SELECT t.oid, t.tgname
              FROM pg_trigger AS t JOIN pg_trigger AS parent ON parent.oid = t.tgparentid
             WHERE t.tgrelid = member
               AND t.tgfoid IN ('fence.fence_guard()'::regprocedure, 'fence.fence_no_truncate()'::regprocedure)
               AND parent.tgrelid NOT IN (SELECT relid FROM fence._lineage(member) AS above(relid)
                                           WHERE relid <> member::oid)
        LOOP
            PERFORM fence._unlink_fence_clone(orphan.oid);
            EXECUTE format('DROP TRIGGER %I ON %s', orphan.tgname, member);
        END LOOP;
    END LOOP;
END
$fn$;

-- The fence check must see the row as it will be written: no BEFORE ROW
-- trigger of a fenced table, or of any table its fence reaches, may fire
-- after it (triggers fire in name order, by byte), or it could change the
-- key or the token after the check.
CREATE OR REPLACE FUNCTION fence._check_trigger_order(tbl regclass) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    late record;
BEGIN
    SELECT t.tgrelid::regclass AS relid, t.tgname INTO late
      FROM pg_trigger AS t
     WHERE t.tgrelid IN (SELECT fence._family(tbl))
       AND (t.tgtype & 3) = 3                                  -- ROW and BEFORE
       AND t.tgname::text COLLATE "C" > 'zz_fence_guard'
       AND t.tgfoid <> 'fence.fence_guard()'::regprocedure
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'trigger "%" on "%" would fire after the fence check of "%" and could change the row after it',
            late.tgname, late.relid, tbl
            USING ERRCODE = '55000',
                  HINT = 'BEFORE ROW triggers of fenced tables must have names that sort before "zz_fence_guard".';
    END IF;
END
$fn$;

-- After every DDL command: for each fenced table the command touched (a
-- table, or a trigger on one), or that a touched table inherits from,
-- check that its key and token columns can still be trusted and that no
-- BEFORE ROW trigger fires after the check (the DDL is refused otherwise),
-- give new partitions and inheritance children its fence, and drop the
-- clones of tables that left it. No WHEN TAG filter: partitions and
-- children also come from CREATE SCHEMA's sub-commands and from
-- CREATE FOREIGN TABLE. Event triggers do not fire in single-user mode;
-- the fence check re-checks the columns on every write, so a table changed
-- there fails closed.
-- SECURITY DEFINER, to call the clone functions PUBLIC may not.
CREATE OR REPLACE FUNCTION fence._on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    touched_table regclass;
    fenced regclass;
BEGIN
    FOR touched_table IN
        SELECT DISTINCT r.relid::regclass FROM (
            SELECT c.objid AS relid FROM pg_event_trigger_ddl_commands() AS c
             WHERE c.classid = 'pg_class'::regclass
            UNION
            -- ALTER TYPE ... CASCADE changes the tables of a composite type.
            SELECT typed.oid FROM pg_event_trigger_ddl_commands() AS c
              JOIN pg_class AS composite ON c.classid = 'pg_class'::regclass AND composite.oid = c.objid
              JOIN pg_class AS typed ON typed.reloftype = composite.reltype
             WHERE composite.relkind = 'c'
            UNION
            SELECT typed.oid FROM pg_event_trigger_ddl_commands() AS c
              JOIN pg_class AS typed ON c.classid = 'pg_type'::regclass AND typed.reloftype = c.objid
            UNION
            SELECT t.tgrelid FROM pg_event_trigger_ddl_commands() AS c
              JOIN pg_trigger AS t ON t.oid = c.objid
             WHERE c.classid = 'pg_trigger'::regclass
        ) AS r JOIN pg_class AS k ON k.oid = r.relid
         WHERE k.relkind IN ('r', 'p', 'f')
    LOOP
        PERFORM fence._drop_orphan_fence_clones(touched_table);
        FOR fenced IN
            SELECT t.tgrelid::regclass
              FROM fence._lineage(touched_table) AS up(relid) JOIN pg_trigger AS t ON t.tgrelid = up.relid
             WHERE t.tgname = 'zz_fence_guard' AND t.tgparentid = 0
               AND t.tgfoid = 'fence.fence_guard()'::regprocedure
        LOOP
            PERFORM fence._check_fence_columns('ALTER TABLE of fenced table', fenced);
            PERFORM fence._check_trigger_order(fenced);
            PERFORM fence._fence_descendants(fenced);
        END LOOP;
    END LOOP;
END
$fn$;

CREATE EVENT TRIGGER fence_ddl_command_end ON ddl_command_end
    EXECUTE FUNCTION fence._on_ddl_command_end();

-- Whether fence_guard trigger `trigger_oid` is one protect() installed:
-- the root of its clone chain is the zz_fence_guard of a table in
-- fence.fences, with the arguments recorded there. The fence check calls
-- it (once per trigger per backend, until the next relcache invalidation)
-- as whoever writes: the pinned search_path and the qualified operators
-- keep a writer's own operators out of it.
CREATE OR REPLACE FUNCTION fence._fence_installed(trigger_oid oid) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH RECURSIVE chain(trigger, parent) AS (
        SELECT t.oid, t.tgparentid FROM pg_catalog.pg_trigger AS t
         WHERE t.oid OPERATOR(pg_catalog.=) trigger_oid
        UNION ALL
        SELECT t.oid, t.tgparentid FROM pg_catalog.pg_trigger AS t
          JOIN chain AS c ON t.oid OPERATOR(pg_catalog.=) c.parent
    )
    SELECT EXISTS (
        SELECT FROM chain AS c
          JOIN pg_catalog.pg_trigger AS root ON root.oid OPERATOR(pg_catalog.=) c.trigger
          JOIN fence.fences AS f ON f.tbl::pg_catalog.oid OPERATOR(pg_catalog.=) root.tgrelid
         WHERE c.parent OPERATOR(pg_catalog.=) 0::pg_catalog.oid
           AND root.tgname OPERATOR(pg_catalog.=) 'zz_fence_guard'::pg_catalog.name
           AND root.tgargs OPERATOR(pg_catalog.=) f.args)
$fn$;

-- A dropped table leaves fence.fences with it, so that its OID, reused by
-- a later table (or by a restore), is not taken for a fenced one.
CREATE OR REPLACE FUNCTION fence._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    DELETE FROM fence.fences AS f
     WHERE f.tbl::oid IN (SELECT d.objid FROM pg_event_trigger_dropped_objects() AS d
                           WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0);
END
$fn$;

CREATE EVENT TRIGGER fence_sql_drop ON sql_drop
    EXECUTE FUNCTION fence._on_sql_drop();

-- The clone primitives are not for PUBLIC: with them a plain role could
-- attach a fence to a table of its own. protect() needs fence_admin; the
-- DDL event trigger goes through _fence_descendants, which runs as the
-- extension's owner. The trigger functions stay executable by PUBLIC
-- (PostgreSQL clones a partitioned table's row triggers as the role that
-- creates a partition); a fence_guard that protect() did not install is
-- refused by the check itself (fence.fences).
REVOKE EXECUTE ON FUNCTION fence._clone_fence_trigger(oid, oid), fence._unlink_fence_clone(oid),
    fence._fence_descendants(regclass), fence._drop_orphan_fence_clones(regclass) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fence._fence_descendants(regclass), fence._drop_orphan_fence_clones(regclass)
    TO fence_admin;

-- Who holds a key's lock right now (keylock.rs), so that an admin can see,
-- and end, the session that keeps a key from being acquired: a grant in
-- flight holds it exclusively ('grant'); a fenced write, a renew or a
-- release holds it in share mode until its transaction ends ('write'); a
-- reader's grant in row-exclusive mode ('shared grant'); a reader's renew,
-- release or re-acquire in row-share mode ('shared write'). A
-- prepared transaction holds it until COMMIT/ROLLBACK PREPARED: pid is NULL
-- and state names its gid. End a session with pg_terminate_backend(pid).
-- Keys are named through their lease rows, exclusive or shared; lock_key is
-- NULL for a key whose first grant has not committed yet (its row is not
-- visible).
CREATE OR REPLACE VIEW fence.blockers AS
SELECT lk.pid,
       COALESCE(a.usename, p.owner)                                     AS role,
       l.lock_key,
       CASE lk.mode WHEN 'ExclusiveLock' THEN 'grant'
                    WHEN 'RowExclusiveLock' THEN 'shared grant'
                    WHEN 'RowShareLock' THEN 'shared write'
                    ELSE 'write' END                                    AS what,
       COALESCE(a.xact_start, p.prepared)                               AS xact_start,
       CASE WHEN lk.pid IS NULL THEN 'prepared ' || p.gid ELSE a.state END AS state
  FROM pg_catalog.pg_locks AS lk
  LEFT JOIN (SELECT e.lock_key FROM fence.leases AS e
              UNION
             SELECT s.lock_key FROM fence.shared_leases AS s) AS l
    ON fence._key_lock_id(l.lock_key) = (lk.classid::pg_catalog.int8 << 32 | lk.objid::pg_catalog.int8)
  LEFT JOIN pg_catalog.pg_stat_activity AS a ON a.pid = lk.pid
  LEFT JOIN pg_catalog.pg_prepared_xacts AS p
         ON lk.pid IS NULL AND lk.virtualtransaction = '-1/' || p.transaction::text
 WHERE lk.locktype = 'advisory'
   AND lk.granted
   AND lk.database = (SELECT d.oid FROM pg_catalog.pg_database AS d WHERE d.datname = pg_catalog.current_database())
   AND lk.objsubid = 3;

GRANT SELECT ON fence.blockers TO PUBLIC;

-- sql/stats.sql as of 0.2.0: the statistics and waiters views.
-- Statistics and waiters (preload mode): views over the shared memory that
-- stats.rs and waiters.rs keep. Without shared_preload_libraries = 'pg_fence'
-- reading them fails with SQLSTATE 55000 and a hint; nothing else does.

-- One row per key class of this database (the key up to its first ':', or
-- the whole key). Counts since stats_reset; see the README, "Statistics".
CREATE OR REPLACE VIEW fence.lock_stats AS
SELECT * FROM fence._lock_stats();

-- Cumulative counts of acquire calls per class that answered within le
-- seconds (le = 'Infinity' counts them all), for Prometheus-style histograms.
CREATE OR REPLACE VIEW fence.lock_wait_histogram AS
SELECT * FROM fence._lock_wait_histogram();

-- The statistics' own tables, for all databases: how many key classes and
-- fenced tables they keep (fence.stats_max_classes, fence.stats_max_tables),
-- how many are in use, and how many counts had no row to go to.
CREATE OR REPLACE VIEW fence.lock_stats_info AS
SELECT * FROM fence._lock_stats_info();

-- Sessions of this database waiting inside lock_acquire, and their place in
-- each key's queue (position 1 is next).
CREATE OR REPLACE VIEW fence.waiters AS
SELECT w.pid,
       w.role::pg_catalog.regrole AS role,
       w.lock_key,
       w.mode,
       w.waiting_since,
       w.wait_until,
       w.position
  FROM fence._waiters() AS w;

GRANT SELECT ON fence.lock_stats, fence.lock_wait_histogram, fence.lock_stats_info, fence.waiters TO PUBLIC;

-- Tables fenced under 0.1 get their partitions' TRUNCATE check and their
-- inheritance children's fence now. A child fenced on its own is left as it
-- is, with a warning, rather than failing the upgrade.
DO $do$
DECLARE
    fenced regclass;
BEGIN
    FOR fenced IN
        SELECT t.tgrelid::regclass FROM pg_catalog.pg_trigger AS t
         WHERE t.tgname = 'zz_fence_guard' AND t.tgparentid = 0
           AND t.tgfoid = 'fence.fence_guard()'::pg_catalog.regprocedure
    LOOP
        BEGIN
            PERFORM fence._fence_descendants(fenced);
        EXCEPTION WHEN object_not_in_prerequisite_state OR feature_not_supported THEN
            RAISE WARNING 'pg_fence upgrade: %', SQLERRM USING HINT = 'Fix it by hand: see the README, "Upgrading".';
        END;
    END LOOP;
END
$do$;
