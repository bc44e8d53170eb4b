-- API keys are stored only as HMAC-SHA256 hashes under a server-side pepper; the prefix
-- (e.g. `at_live_3f9a`) identifies a key in logs and listings without revealing it.
CREATE TYPE key_scope AS ENUM ('live', 'test');
CREATE TYPE credential_kind AS ENUM ('byok', 'system');

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name         text NOT NULL DEFAULT '',
    prefix       text NOT NULL UNIQUE CHECK (prefix ~ '^at_(live|test)_[A-Za-z0-9]{4,16}$'),
    key_hash     bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    scope        key_scope NOT NULL,
    tier         text NOT NULL DEFAULT 'default',
    daily_quota  bigint CHECK (daily_quota IS NULL OR daily_quota > 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    -- Set when the key was rotated: the old key stays valid until then.
    grace_until  timestamptz,
    revoked_at   timestamptz,
    replaced_by  uuid REFERENCES api_keys (id),
    last_used_at timestamptz,
    CHECK (scope::text = substring(prefix FROM '^at_(live|test)_'))
);
CREATE INDEX api_keys_org_id_idx ON api_keys (org_id);

-- APIs registered by sellers; each is served as one gateway route.
CREATE TABLE apis (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (name ~ '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'),
    path_prefix  text NOT NULL UNIQUE CHECK (path_prefix LIKE '/%'),
    upstream_url text NOT NULL CHECK (upstream_url ~ '^https?://'),
    scopes       key_scope[] NOT NULL DEFAULT ARRAY['live', 'test']::key_scope[],
    pii_mode     text NOT NULL DEFAULT 'off' CHECK (pii_mode IN ('off', 'flag', 'mask')),
    timeout_ms   integer NOT NULL DEFAULT 30000 CHECK (timeout_ms > 0),
    log_bodies   boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);
CREATE INDEX apis_org_id_idx ON apis (org_id);

-- Upstream credentials, AES-256-GCM encrypted. The associated data binds each ciphertext to
-- (org_id, api_id, key_version), so a row copied to another org or API fails to decrypt.
CREATE TABLE upstream_credentials (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    api_id      uuid NOT NULL REFERENCES apis (id) ON DELETE CASCADE,
    name        text NOT NULL,
    kind        credential_kind NOT NULL,
    ciphertext  bytea NOT NULL,
    nonce       bytea NOT NULL CHECK (length(nonce) = 12),
    key_version integer NOT NULL CHECK (key_version > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    rotated_at  timestamptz,
    UNIQUE (org_id, api_id, name)
);
CREATE INDEX upstream_credentials_org_id_idx ON upstream_credentials (org_id);
CREATE INDEX upstream_credentials_key_version_idx ON upstream_credentials (key_version);
