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

-- Drop whichever of the two fence triggers a table has (quietly).
CREATE FUNCTION fence._drop_fence_triggers(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    trigger_name name;
BEGIN
    FOR trigger_name IN
        SELECT t.tgname FROM pg_trigger AS t
         WHERE t.tgrelid = tbl AND t.tgname IN ('zz_fence_guard', 'zz_fence_no_truncate')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, tbl);
    END LOOP;
END
$fn$;

-- The checks protect() and unprotect() share: a table (22004, 42809), owned
-- by the caller or a role the caller belongs to (42501).
CREATE FUNCTION fence._require_table_owner(function_name text, tbl regclass) RETURNS void
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
END
$fn$;

CREATE FUNCTION fence.protect(
    tbl          regclass,
    lock_key     text DEFAULT NULL,
    key_column   name DEFAULT NULL,
    key_prefix   text DEFAULT '',
    token_column name DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    column_type oid;
BEGIN
    PERFORM fence._require_table_owner('protect', tbl);
    IF key_prefix IS NULL THEN
        RAISE EXCEPTION 'protect: argument "key_prefix" must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF (lock_key IS NULL) = (key_column IS NULL) THEN
        RAISE EXCEPTION 'protect: give exactly one of "lock_key" (one key for the whole table) or "key_column" (one key per row)'
            USING ERRCODE = '22023';
    END IF;
    IF lock_key IS NOT NULL AND (lock_key = '' OR octet_length(lock_key) > 1024) THEN
        RAISE EXCEPTION 'protect: invalid "lock_key": must be 1 to 1024 bytes' USING ERRCODE = '22023';
    END IF;
    IF key_column IS NOT NULL THEN
        SELECT a.atttypid INTO column_type FROM pg_attribute AS a
         WHERE a.attrelid = tbl AND a.attname = key_column AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'protect: table "%" has no column "%" (key_column)', tbl, key_column
                USING ERRCODE = '42703';
        END IF;
        -- The row's key is key_prefix || the column's text form, which must
        -- not depend on session settings (DateStyle, TimeZone, extra_float_digits...):
        -- two sessions would otherwise fence the same row under different keys.
        IF column_type NOT IN ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype, 'name'::regtype,
                               'int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'uuid'::regtype) THEN
            RAISE EXCEPTION 'protect: key column "%" of table "%" is of type %', key_column, tbl, column_type::regtype
                USING ERRCODE = '42804',
                      HINT = 'Key columns must be text, varchar, char, name, smallint, integer, bigint or uuid.';
        END IF;
    END IF;
    IF token_column IS NOT NULL THEN
        SELECT a.atttypid INTO column_type FROM pg_attribute AS a
         WHERE a.attrelid = tbl AND a.attname = token_column AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'protect: table "%" has no column "%" (token_column)', tbl, token_column
                USING ERRCODE = '42703';
        END IF;
        IF column_type <> 'bigint'::regtype THEN
            RAISE EXCEPTION 'protect: token column "%" of table "%" must be of type bigint, not %',
                token_column, tbl, column_type::regtype USING ERRCODE = '42804';
        END IF;
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
END
$fn$;

COMMENT ON FUNCTION fence.protect(regclass, text, name, text, name) IS
    'Fence a table: writes must carry the token of the live lease on lock_key, or on key_prefix || key_column per row (SQLSTATE FN001 otherwise).';

CREATE FUNCTION fence.unprotect(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM fence._require_table_owner('unprotect', tbl);
    IF NOT EXISTS (SELECT FROM pg_trigger AS t WHERE t.tgrelid = tbl AND t.tgname = 'zz_fence_guard') THEN
        RAISE NOTICE 'table "%" is not protected', tbl;
    END IF;
    PERFORM fence._drop_fence_triggers(tbl);
END
$fn$;

-- Fenced tables and how, read from the triggers themselves. "enforced" is
-- false if someone disabled the trigger (a table owner can).
CREATE VIEW fence.protected_tables AS
SELECT t.tgrelid::pg_catalog.regclass                        AS tbl,
       CASE args.a[1] WHEN 'key' THEN args.a[2] END           AS lock_key,
       CASE args.a[1] WHEN 'column' THEN args.a[2]::name END  AS key_column,
       CASE args.a[1] WHEN 'column' THEN args.a[3] END        AS key_prefix,
       NULLIF(args.a[4], '')::name                            AS token_column,
       t.tgenabled = 'A'                                      AS enforced
  FROM pg_catalog.pg_trigger AS t
 CROSS JOIN LATERAL (
        SELECT pg_catalog.string_to_array(pg_catalog.encode(t.tgargs, 'escape'), '\000') AS a
       ) AS args
 WHERE t.tgname = 'zz_fence_guard'
   AND t.tgfoid = 'fence.fence_guard()'::pg_catalog.regprocedure;

GRANT SELECT ON fence.protected_tables TO PUBLIC;
