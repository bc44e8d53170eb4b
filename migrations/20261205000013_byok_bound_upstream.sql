-- A BYOK credential is a buyer's own account at the service an API fronts. It is sent only to
-- the upstream it was written for: a seller who repoints their API at another host must not
-- receive their buyers' secrets on the next call. Each BYOK row records the API's upstream URL
-- as it was when the secret was written; a database-mode gateway compares its origin (scheme,
-- host, port) with the API's current one and, when they differ, answers that buyer's calls
-- with 503 until the buyer writes the credential again.
ALTER TABLE upstream_credentials ADD COLUMN bound_upstream text;

-- An upstream URL's fragment was never sent (the URI parser drops it); it is now refused, and
-- rewritten first to what was dialled, so such an API keeps serving (and its BYOK credentials
-- are bound to that).
UPDATE apis SET upstream_url = split_part(upstream_url, '#', 1) WHERE upstream_url LIKE '%#%';

-- Rows written before this rule were written for the upstream the API has now.
UPDATE upstream_credentials c SET bound_upstream = a.upstream_url
  FROM apis a WHERE a.id = c.api_id AND c.kind = 'byok';

ALTER TABLE upstream_credentials ADD CONSTRAINT upstream_credentials_byok_bound
    CHECK ((kind = 'byok') = (bound_upstream IS NOT NULL));

-- The binding is the database's, not the writer's: a new BYOK row, a row that becomes BYOK or
-- moves to another API, and a rewrite that clears the binding (what "write it again" does)
-- take the API's upstream as it is now. Any other update keeps it, so a master-key rotation,
-- which rewrites only the ciphertext, cannot rebind a secret to a moved upstream. It reads
-- the API as the owner: the API belongs to another org than the buyer who writes.
CREATE FUNCTION upstream_credentials_bind() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF NEW.kind <> 'byok' THEN
        NEW.bound_upstream := NULL;
    ELSIF TG_OP = 'INSERT' OR NEW.bound_upstream IS NULL OR OLD.kind <> 'byok'
          OR NEW.api_id <> OLD.api_id THEN
        NEW.bound_upstream := (SELECT a.upstream_url FROM apis a WHERE a.id = NEW.api_id);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER upstream_credentials_bind
    BEFORE INSERT OR UPDATE ON upstream_credentials
    FOR EACH ROW EXECUTE FUNCTION upstream_credentials_bind();

-- A buyer hands their secret to the API's server, so the console shows them which server
-- (its origin, never the path) before and after they write, and which of their BYOK
-- credentials wait to be written again. The API belongs to its seller's org, so these read
-- it as the owner: the bindings for the org the transaction was opened for only, and one
-- API's upstream by id.
CREATE FUNCTION console_byok_bindings(p_org uuid)
RETURNS TABLE (id uuid, api text, bound_upstream text, upstream_url text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT c.id, a.name, c.bound_upstream, a.upstream_url
      FROM upstream_credentials c JOIN apis a ON a.id = c.api_id
     WHERE c.kind = 'byok' AND c.org_id = p_org AND p_org = apitree_current_org()
$$;
CREATE FUNCTION console_api_upstream(p_api uuid) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT a.upstream_url FROM apis a WHERE a.id = p_api
$$;
-- The console reads back what a write was bound to, and refuses it when that is not the
-- server the buyer expected (the binding is the database's: no check before it can race it).
GRANT SELECT (bound_upstream) ON upstream_credentials TO apitree_console;
REVOKE ALL ON FUNCTION console_byok_bindings(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION console_api_upstream(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION console_byok_bindings(uuid) TO apitree_console;
GRANT EXECUTE ON FUNCTION console_api_upstream(uuid) TO apitree_console;
