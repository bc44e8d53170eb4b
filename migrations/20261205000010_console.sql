-- The console: people who sign in, their sessions' database role, and the credits ledger.
--
-- Users gain a password (an Argon2id PHC string, never a password), a disabled flag and a
-- global email (people sign in with it). Staff (admin, super_admin) work across orgs and may
-- belong to none.
ALTER TABLE users
    ADD COLUMN password_hash text CHECK (password_hash IS NULL OR password_hash LIKE '$argon2id$%'),
    ADD COLUMN disabled_at   timestamptz,
    ADD COLUMN updated_at    timestamptz NOT NULL DEFAULT now(),
    -- An invited user has no password yet: the SHA-256 of their one-time invitation token.
    ADD COLUMN invite_hash       bytea UNIQUE CHECK (invite_hash IS NULL OR length(invite_hash) = 32),
    ADD COLUMN invite_expires_at timestamptz,
    ALTER COLUMN org_id DROP NOT NULL,
    ADD CONSTRAINT users_org_or_staff CHECK (org_id IS NOT NULL OR role IN ('admin', 'super_admin'));
CREATE UNIQUE INDEX users_email_idx ON users (lower(email));

-- Credits: an append-only ledger per org; the balance is the sum of its rows.
CREATE TABLE credit_ledger (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id  uuid NOT NULL REFERENCES orgs (id) ON DELETE RESTRICT,
    amount  bigint NOT NULL CHECK (amount <> 0),
    reason  text NOT NULL CHECK (length(btrim(reason)) BETWEEN 1 AND 500),
    actor   text NOT NULL CHECK (length(actor) > 0),
    at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_ledger_org_id_idx ON credit_ledger (org_id, id);

CREATE FUNCTION credit_ledger_reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit_ledger is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'append an adjustment that corrects the old one instead';
END
$$;
CREATE TRIGGER credit_ledger_no_update BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION credit_ledger_reject_change();
CREATE TRIGGER credit_ledger_no_truncate BEFORE TRUNCATE ON credit_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION credit_ledger_reject_change();

ALTER TABLE credit_ledger ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON credit_ledger
    USING (org_id = apitree_current_org()) WITH CHECK (org_id = apitree_current_org());

-- Staff sessions read across orgs: `apitree.staff` is set to 'on' per transaction only when the
-- verified session's user is admin or super_admin in the database at that moment.
CREATE FUNCTION apitree_staff() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('apitree.staff', true), '') = 'on'
$$;
CREATE POLICY staff_access ON orgs USING (apitree_staff()) WITH CHECK (apitree_staff());
CREATE POLICY staff_access ON users USING (apitree_staff()) WITH CHECK (apitree_staff());
CREATE POLICY staff_access ON audit_log USING (apitree_staff()) WITH CHECK (apitree_staff());
CREATE POLICY staff_access ON credit_ledger USING (apitree_staff()) WITH CHECK (apitree_staff());

-- The role every console transaction runs as (SET LOCAL ROLE): row-level security applies to
-- it, unlike the owner that runs migrations and the gateway. Roles are cluster-wide, so it may
-- exist already (another apitree database in the same cluster, or created by a DBA when the
-- migrating role lacks CREATEROLE: `CREATE ROLE apitree_console NOLOGIN; GRANT apitree_console
-- TO <owner>;`).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'apitree_console') THEN
        BEGIN
            CREATE ROLE apitree_console NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    IF NOT pg_has_role(current_user, 'apitree_console', 'MEMBER') THEN
        EXECUTE format('GRANT apitree_console TO %I', current_user);
    END IF;
END
$$;

GRANT SELECT ON orgs TO apitree_console;
GRANT SELECT, INSERT, UPDATE ON users TO apitree_console;
GRANT SELECT, INSERT, UPDATE ON api_keys TO apitree_console;
GRANT SELECT, INSERT, UPDATE ON apis TO apitree_console;
-- Credentials are write-only: the role cannot read a ciphertext back.
GRANT INSERT, UPDATE ON upstream_credentials TO apitree_console;
GRANT SELECT (id, org_id, api_id, name, kind, key_version, created_at, updated_at)
    ON upstream_credentials TO apitree_console;
GRANT SELECT ON usage_counters TO apitree_console;
GRANT SELECT, INSERT ON audit_log TO apitree_console;
GRANT SELECT, INSERT ON credit_ledger TO apitree_console;

-- Sign-in and per-request checks read one user by email or id before any org is known.
CREATE FUNCTION console_login(p_email text)
RETURNS TABLE (id uuid, org_id uuid, role user_role, password_hash text, disabled boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT u.id, u.org_id, u.role, u.password_hash, u.disabled_at IS NOT NULL
      FROM users u WHERE lower(u.email) = lower(p_email)
$$;
CREATE FUNCTION console_principal(p_id uuid)
RETURNS TABLE (email text, org_id uuid, role user_role, disabled boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT u.email, u.org_id, u.role, u.disabled_at IS NOT NULL FROM users u WHERE u.id = p_id
$$;
REVOKE ALL ON FUNCTION console_login(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION console_principal(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION console_login(text) TO apitree_console;
GRANT EXECUTE ON FUNCTION console_principal(uuid) TO apitree_console;

-- A buyer names the marketplace API a BYOK credential is for; APIs belong to sellers' orgs, so
-- the catalogue lookup (name to id, owner) runs as the owner.
CREATE FUNCTION console_api_by_name(p_name text)
RETURNS TABLE (id uuid, org_id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT a.id, a.org_id FROM apis a WHERE a.name = p_name
$$;
-- Accepting an invitation: the token's hash finds the user, who sets a password once.
CREATE FUNCTION console_accept_invite(p_hash bytea, p_password_hash text)
RETURNS TABLE (id uuid, org_id uuid)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    UPDATE users u
       SET password_hash = p_password_hash, invite_hash = NULL, invite_expires_at = NULL,
           updated_at = now()
     WHERE u.invite_hash = p_hash AND u.invite_expires_at > now() AND u.disabled_at IS NULL
    RETURNING u.id, u.org_id
$$;
REVOKE ALL ON FUNCTION console_api_by_name(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION console_accept_invite(bytea, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION console_api_by_name(text) TO apitree_console;
GRANT EXECUTE ON FUNCTION console_accept_invite(bytea, text) TO apitree_console;
