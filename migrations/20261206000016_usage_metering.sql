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
    -- Sums saturate at the largest bigint (a declared length can be anything); rows are taken in
    -- one order, so replicas flushing at once lock them in the same order.
    SELECT k.org_id, k.id, a.id, to_timestamp(d.day * 86400),
           least(sum(greatest(d.requests, 0)::numeric), 9223372036854775807)::bigint,
           least(sum(greatest(d.errors, 0)::numeric), 9223372036854775807)::bigint,
           least(sum(greatest(d.bytes, 0)::numeric), 9223372036854775807)::bigint
      FROM unnest(p_keys, p_apis, p_days, p_requests, p_errors, p_bytes)
               AS d(key_id, api, day, requests, errors, bytes)
      JOIN api_keys k ON k.id = d.key_id
      LEFT JOIN apis a ON a.name = d.api
     WHERE d.day BETWEEN 0 AND 2932896
     GROUP BY k.org_id, k.id, a.id, d.day
     ORDER BY k.id, d.day, a.id
    ON CONFLICT (api_key_id, window_start, (COALESCE(api_id, '00000000-0000-0000-0000-000000000000'::uuid)))
    DO UPDATE SET
        requests = least(usage_counters.requests::numeric + EXCLUDED.requests, 9223372036854775807)::bigint,
        errors = least(usage_counters.errors::numeric + EXCLUDED.errors, 9223372036854775807)::bigint,
        bytes_out = least(usage_counters.bytes_out::numeric + EXCLUDED.bytes_out, 9223372036854775807)::bigint;
    -- A batch is sent again only while its process runs and cannot reach the database: a week
    -- of records covers any outage it would survive.
    DELETE FROM usage_flushes WHERE at < now() - interval '7 days';
    RETURN true;
END
$$;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION usage_flush(uuid, bigint, uuid[], text[], bigint[], bigint[], bigint[], bigint[]) SET search_path = %I, pg_temp', current_schema());
END
$$;
REVOKE ALL ON FUNCTION usage_flush(uuid, bigint, uuid[], text[], bigint[], bigint[], bigint[], bigint[]) FROM PUBLIC;
