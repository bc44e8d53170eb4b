-- Boundaries between the marketplace's orgs that the database holds, whoever writes.

-- The gateway routes and seals credentials by API name: one name, one API, across all orgs.
CREATE UNIQUE INDEX apis_name_key ON apis (name);

-- Which credential a call carries is decided per API and per calling org, never by name:
-- one system credential per API (its seller's), one BYOK credential per org and API.
CREATE UNIQUE INDEX upstream_credentials_one_system_idx
    ON upstream_credentials (api_id) WHERE kind = 'system';
CREATE UNIQUE INDEX upstream_credentials_one_byok_idx
    ON upstream_credentials (org_id, api_id) WHERE kind = 'byok';

-- A system credential belongs to the org that owns the API.
CREATE FUNCTION upstream_credentials_system_owner() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.kind = 'system'
       AND NOT EXISTS (SELECT 1 FROM apis a WHERE a.id = NEW.api_id AND a.org_id = NEW.org_id) THEN
        RAISE EXCEPTION 'a system credential must belong to the org that owns the API'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'system_credential_owner';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER upstream_credentials_system_owner
    BEFORE INSERT OR UPDATE ON upstream_credentials
    FOR EACH ROW EXECUTE FUNCTION upstream_credentials_system_owner();

-- Path prefixes: the gateway sends a call to the longest prefix that matches it (whole path
-- segments, or a prefix that ends in '/'). Two prefixes overlap when one path can match both;
-- an overlap across orgs would let one seller take another's traffic. This lists the APIs,
-- other than p_api, whose prefix overlaps p_prefix, with their org, under a lock that
-- serialises registrations (held to the end of the caller's transaction).
CREATE FUNCTION console_prefix_overlaps(p_prefix text, p_api uuid)
RETURNS TABLE (name text, org_id uuid, path_prefix text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('apitree.apis.path_prefix'));
    RETURN QUERY
    SELECT a.name, a.org_id, a.path_prefix FROM apis a
     WHERE a.id <> p_api
       AND ((starts_with(p_prefix, a.path_prefix)
             AND (right(a.path_prefix, 1) = '/' OR p_prefix = a.path_prefix
                  OR substr(p_prefix, length(a.path_prefix) + 1, 1) = '/'))
         OR (starts_with(a.path_prefix, p_prefix)
             AND (right(p_prefix, 1) = '/' OR a.path_prefix = p_prefix
                  OR substr(a.path_prefix, length(p_prefix) + 1, 1) = '/')))
     ORDER BY a.name;
END
$$;
REVOKE ALL ON FUNCTION console_prefix_overlaps(text, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION console_prefix_overlaps(text, uuid) TO apitree_console;
