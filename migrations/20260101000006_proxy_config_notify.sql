-- Upstream credentials say which header carries them and what precedes the secret there.
ALTER TABLE upstream_credentials
    ADD COLUMN header       text NOT NULL DEFAULT 'authorization',
    ADD COLUMN value_prefix text NOT NULL DEFAULT 'Bearer ';

-- Proxies in database mode LISTEN on `apitree_config` and reload when any table they serve
-- from changes. One notification per statement; the payload names the table.
CREATE FUNCTION apitree_notify_config() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('apitree_config', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER orgs_notify AFTER INSERT OR UPDATE OR DELETE ON orgs
    FOR EACH STATEMENT EXECUTE FUNCTION apitree_notify_config();
CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION apitree_notify_config();
CREATE TRIGGER apis_notify AFTER INSERT OR UPDATE OR DELETE ON apis
    FOR EACH STATEMENT EXECUTE FUNCTION apitree_notify_config();
CREATE TRIGGER upstream_credentials_notify AFTER INSERT OR UPDATE OR DELETE ON upstream_credentials
    FOR EACH STATEMENT EXECUTE FUNCTION apitree_notify_config();
