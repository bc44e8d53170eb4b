-- Row-level security on every tenant table, keyed on the session setting `apitree.org_id`.
--
-- RLS is ENABLEd, not FORCEd: the table owner (the role that runs migrations and the gateway
-- itself, which serves every org) is not filtered; any other role sees only the rows of the org
-- set with `SET apitree.org_id = '<uuid>'`, and no row at all when it is unset.
CREATE FUNCTION apitree_current_org() RETURNS uuid
LANGUAGE sql STABLE AS $$
    SELECT NULLIF(current_setting('apitree.org_id', true), '')::uuid
$$;

ALTER TABLE orgs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON orgs
    USING (id = apitree_current_org()) WITH CHECK (id = apitree_current_org());

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON users
    USING (org_id = apitree_current_org()) WITH CHECK (org_id = apitree_current_org());

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_keys
    USING (org_id = apitree_current_org()) WITH CHECK (org_id = apitree_current_org());

ALTER TABLE apis ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON apis
    USING (org_id = apitree_current_org()) WITH CHECK (org_id = apitree_current_org());

ALTER TABLE upstream_credentials ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON upstream_credentials
    USING (org_id = apitree_current_org()) WITH CHECK (org_id = apitree_current_org());

ALTER TABLE usage_counters ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON usage_counters
    USING (org_id = apitree_current_org()) WITH CHECK (org_id = apitree_current_org());

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_log
    USING (org_id = apitree_current_org()) WITH CHECK (org_id = apitree_current_org());
