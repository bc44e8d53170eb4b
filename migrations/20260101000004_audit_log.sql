-- The audit log is append-only and hash-chained.
--
-- Rows are numbered and chained inside the insert trigger under a transaction-scoped advisory
-- lock, so concurrent writers produce one gapless chain: row n stores hash(n-1) as prev_hash
-- and hash = sha256(prev_hash || canonical text of row n). UPDATE, DELETE and TRUNCATE are
-- refused by triggers; `apitree audit verify` recomputes the chain to catch edits made with
-- triggers disabled.
CREATE TABLE audit_log (
    id        bigint PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL CHECK (length(actor) > 0),
    action    text NOT NULL CHECK (length(action) > 0),
    target    text NOT NULL DEFAULT '',
    org_id    uuid REFERENCES orgs (id) ON DELETE RESTRICT,
    detail    jsonb NOT NULL DEFAULT '{}'::jsonb,
    prev_hash bytea NOT NULL,
    hash      bytea NOT NULL
);
CREATE INDEX audit_log_org_id_idx ON audit_log (org_id);

-- The exact text hashed for a row; the Rust verifier builds the same string.
CREATE FUNCTION audit_log_canonical(r audit_log) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT concat_ws(E'\x1f',
        r.id::text,
        to_char(r.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        r.actor,
        r.action,
        r.target,
        COALESCE(r.org_id::text, ''),
        r.detail::text)
$$;

-- SECURITY DEFINER: the chain must see every row, also when a tenant role (filtered by
-- row-level security) appends an entry.
CREATE FUNCTION audit_log_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    last_id   bigint;
    last_hash bytea;
BEGIN
    -- One chain writer at a time; released at commit or rollback.
    PERFORM pg_advisory_xact_lock(hashtext('apitree.audit_log'));
    SELECT id, hash INTO last_id, last_hash FROM audit_log ORDER BY id DESC LIMIT 1;
    NEW.id := COALESCE(last_id, 0) + 1;
    NEW.at := COALESCE(NEW.at, now());
    NEW.prev_hash := COALESCE(last_hash, '\x'::bytea);
    NEW.hash := sha256(NEW.prev_hash || convert_to(audit_log_canonical(NEW), 'UTF8'));
    RETURN NEW;
END
$$;

CREATE FUNCTION audit_log_reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'append a new audit entry that corrects the old one instead';
END
$$;

CREATE TRIGGER audit_log_chain BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_chain();
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_reject_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_reject_change();
