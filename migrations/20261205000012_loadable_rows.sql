-- Rows a gateway in database mode can load as written. The gateway already skips (and names)
-- a row it cannot serve; these checks refuse such a row when it is written, so whoever writes
-- it hears why. NOT VALID: an existing bad row does not stop the upgrade (the gateway skips it).

-- A key's times are real times: 'infinity' is what no expiry (NULL) already says.
ALTER TABLE api_keys
    ADD CONSTRAINT api_keys_times_finite
    CHECK (isfinite(created_at) AND (expires_at IS NULL OR isfinite(expires_at))
           AND (grace_until IS NULL OR isfinite(grace_until))
           AND (revoked_at IS NULL OR isfinite(revoked_at))) NOT VALID;

-- A credential's header and the text before its secret go into a request head as written:
-- visible ASCII, spaces and tabs only.
ALTER TABLE upstream_credentials
    ADD CONSTRAINT upstream_credentials_header_text
    CHECK (header ~ '^[A-Za-z0-9-]+$' AND value_prefix ~ '^[\x20-\x7E\t]*$') NOT VALID;
