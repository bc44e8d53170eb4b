-- Rows a database-mode gateway and the console can read as written. The gateway skips (and
-- names) a row it cannot serve; these rules refuse such a row when it is written, so whoever
-- writes it hears why.

-- Times are real times a date type holds (finite, before year 10000). A row written before
-- this rule is rewritten to what the gateway already read it as: an end at 'infinity' is no
-- end (NULL), one at '-infinity' has passed (the epoch), a later one is the last of 9999.
UPDATE api_keys SET expires_at = NULL WHERE expires_at = 'infinity';
UPDATE api_keys SET grace_until = NULL WHERE grace_until = 'infinity';
UPDATE api_keys SET expires_at = 'epoch' WHERE expires_at = '-infinity';
UPDATE api_keys SET grace_until = 'epoch' WHERE grace_until = '-infinity';
UPDATE api_keys SET expires_at = '9999-12-31 23:59:59+00' WHERE expires_at >= '10000-01-01 00:00:00+00';
UPDATE api_keys SET grace_until = '9999-12-31 23:59:59+00' WHERE grace_until >= '10000-01-01 00:00:00+00';
UPDATE api_keys SET revoked_at = now()
 WHERE NOT isfinite(revoked_at) OR revoked_at >= '10000-01-01 00:00:00+00';
UPDATE api_keys SET last_used_at = NULL
 WHERE NOT isfinite(last_used_at) OR last_used_at >= '10000-01-01 00:00:00+00';
UPDATE api_keys SET created_at = now()
 WHERE NOT isfinite(created_at) OR created_at >= '10000-01-01 00:00:00+00';
UPDATE apis SET created_at = now()
 WHERE NOT isfinite(created_at) OR created_at >= '10000-01-01 00:00:00+00';
UPDATE apis SET updated_at = now()
 WHERE NOT isfinite(updated_at) OR updated_at >= '10000-01-01 00:00:00+00';
UPDATE upstream_credentials SET created_at = now()
 WHERE NOT isfinite(created_at) OR created_at >= '10000-01-01 00:00:00+00';
UPDATE upstream_credentials SET updated_at = now()
 WHERE NOT isfinite(updated_at) OR updated_at >= '10000-01-01 00:00:00+00';
UPDATE upstream_credentials SET rotated_at = now()
 WHERE NOT isfinite(rotated_at) OR rotated_at >= '10000-01-01 00:00:00+00';

ALTER TABLE api_keys ADD CONSTRAINT api_keys_times_readable CHECK (
    (isfinite(created_at) AND created_at < '10000-01-01 00:00:00+00')
    AND (expires_at IS NULL OR (isfinite(expires_at) AND expires_at < '10000-01-01 00:00:00+00'))
    AND (grace_until IS NULL OR (isfinite(grace_until) AND grace_until < '10000-01-01 00:00:00+00'))
    AND (revoked_at IS NULL OR (isfinite(revoked_at) AND revoked_at < '10000-01-01 00:00:00+00'))
    AND (last_used_at IS NULL OR (isfinite(last_used_at) AND last_used_at < '10000-01-01 00:00:00+00')));
ALTER TABLE apis ADD CONSTRAINT apis_times_readable CHECK (
    isfinite(created_at) AND created_at < '10000-01-01 00:00:00+00'
    AND isfinite(updated_at) AND updated_at < '10000-01-01 00:00:00+00');
ALTER TABLE upstream_credentials ADD CONSTRAINT upstream_credentials_times_readable CHECK (
    isfinite(created_at) AND created_at < '10000-01-01 00:00:00+00'
    AND isfinite(updated_at) AND updated_at < '10000-01-01 00:00:00+00'
    AND (rotated_at IS NULL OR (isfinite(rotated_at) AND rotated_at < '10000-01-01 00:00:00+00')));

-- An API's scopes are a plain list of scopes: one dimension, from 1, no NULL (the
-- gateway reads them as such). The console writes nothing else. (CASE: array_position
-- refuses a many-dimensional array, so it is asked only about a plain one.)
CREATE FUNCTION apitree_plain_scopes(s key_scope[]) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN cardinality(s) = 0 THEN true
        WHEN array_ndims(s) <> 1 OR array_lower(s, 1) <> 1 THEN false
        ELSE array_position(s, NULL) IS NULL
    END
$$;
UPDATE apis SET scopes = ARRAY(SELECT DISTINCT x FROM unnest(scopes) x WHERE x IS NOT NULL ORDER BY x)
 WHERE NOT apitree_plain_scopes(scopes);
ALTER TABLE apis ADD CONSTRAINT apis_scopes_plain CHECK (apitree_plain_scopes(scopes));

-- A base URL has no query: the caller's query is forwarded, and the gateway always dropped a
-- stored one. Rewritten to what was dialled, so such an API keeps serving.
UPDATE apis SET upstream_url = split_part(upstream_url, '?', 1) WHERE upstream_url LIKE '%?%';

-- A credential's header and the text before its secret go into a request head as written:
-- visible ASCII, and the value cannot start with a space or tab (a parser would drop it).
-- Checked when they are written, not when a key rotation rewrites only the ciphertext, so
-- an old row the gateway skips cannot stop a master-key rotation.
CREATE FUNCTION upstream_credentials_header_text() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.header !~ '^[A-Za-z0-9-]+$' OR NEW.value_prefix !~ '^[\x20-\x7E\t]*$'
       OR NEW.value_prefix ~ '^[ \t]' THEN
        RAISE EXCEPTION 'a credential''s header and value_prefix go into a request head: visible ASCII, not starting with a space'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'upstream_credentials_header_text';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER upstream_credentials_header_text
    BEFORE INSERT OR UPDATE OF header, value_prefix ON upstream_credentials
    FOR EACH ROW EXECUTE FUNCTION upstream_credentials_header_text();
