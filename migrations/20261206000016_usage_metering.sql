-- Usage metering: database-mode gateways add what they counted to usage_counters in batches.
--
-- Each batch carries the gateway process's id and a number; applying it records the pair in
-- the same transaction, so a batch sent again (its commit was not confirmed) is applied at most
-- once. Replicas add their own deltas, so their sums never overlap.
CREATE TABLE usage_flushes (
    replica uuid NOT NULL,
    seq     bigint NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replica, seq)
);
CREATE INDEX usage_flushes_at_idx ON usage_flushes (at);

-- Adds one batch: per key id, API name and UTC day (days since the epoch), requests, errors
-- and bytes. Keys that no longer exist are skipped; an API name that no longer exists counts
-- under no API. False when this batch was applied before.
CREATE FUNCTION usage_flush(
    p_replica uuid, p_seq bigint, p_keys uuid[], p_apis text[], p_days bigint[],
    p_requests bigint[], p_errors bigint[], p_bytes bigint[])
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
BEGIN
    INSERT INTO usage_flushes (replica, seq) VALUES (p_replica, p_seq) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO usage_counters (org_id, api_key_id, api_id, window_start, requests, errors, bytes_out)
    SELECT k.org_id, k.id, a.id, to_timestamp(d.day * 86400), sum(d.requests), sum(d.errors), sum(d.bytes)
      FROM unnest(p_keys, p_apis, p_days, p_requests, p_errors, p_bytes)
               AS d(key_id, api, day, requests, errors, bytes)
      JOIN api_keys k ON k.id = d.key_id
      LEFT JOIN apis a ON a.name = d.api
     GROUP BY k.org_id, k.id, a.id, d.day
    ON CONFLICT (api_key_id, window_start, (COALESCE(api_id, '00000000-0000-0000-0000-000000000000'::uuid)))
    DO UPDATE SET requests = usage_counters.requests + EXCLUDED.requests,
                  errors = usage_counters.errors + EXCLUDED.errors,
                  bytes_out = usage_counters.bytes_out + EXCLUDED.bytes_out;
    -- A batch is sent again only while its process runs: a day of records is plenty.
    DELETE FROM usage_flushes WHERE at < now() - interval '1 day';
    RETURN true;
END
$$;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION usage_flush(uuid, bigint, uuid[], text[], bigint[], bigint[], bigint[], bigint[]) SET search_path = %I, pg_temp', current_schema());
END
$$;
REVOKE ALL ON FUNCTION usage_flush(uuid, bigint, uuid[], text[], bigint[], bigint[], bigint[], bigint[]) FROM PUBLIC;
