-- Usage per key, API and window start; written in batches by the proxies.
CREATE TABLE usage_counters (
    org_id       uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    api_key_id   uuid NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    api_id       uuid REFERENCES apis (id) ON DELETE SET NULL,
    window_start timestamptz NOT NULL,
    requests     bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    errors       bigint NOT NULL DEFAULT 0 CHECK (errors >= 0),
    bytes_out    bigint NOT NULL DEFAULT 0 CHECK (bytes_out >= 0)
);
CREATE UNIQUE INDEX usage_counters_window_idx
    ON usage_counters (api_key_id, window_start, COALESCE(api_id, '00000000-0000-0000-0000-000000000000'::uuid));
CREATE INDEX usage_counters_org_id_idx ON usage_counters (org_id, window_start);

-- Incidents raised by the detector: one per (gateway, route, signal) while open.
CREATE TYPE incident_severity AS ENUM ('warning', 'high', 'critical');

CREATE TABLE incidents (
    id              uuid PRIMARY KEY,
    gateway         text NOT NULL,
    route           text NOT NULL DEFAULT '',
    signal          text NOT NULL,
    severity        incident_severity NOT NULL,
    max_severity    incident_severity NOT NULL,
    ratio           double precision,
    baseline        double precision,
    p_value         double precision,
    opened_at       timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz,
    acknowledged_by text,
    acknowledged_at timestamptz,
    silenced_until  timestamptz,
    slack_channel   text,
    slack_ts        text
);
CREATE UNIQUE INDEX incidents_open_idx ON incidents (gateway, route, signal) WHERE resolved_at IS NULL;

-- Durable outbox of notifications: a failed Slack call is retried from here, never dropped.
CREATE TABLE notification_outbox (
    id              bigserial PRIMARY KEY,
    dedupe_key      text NOT NULL UNIQUE,
    incident_id     uuid REFERENCES incidents (id) ON DELETE SET NULL,
    channel         text NOT NULL,
    method          text NOT NULL CHECK (method IN ('chat.postMessage', 'chat.update')),
    payload         jsonb NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX notification_outbox_pending_idx
    ON notification_outbox (next_attempt_at) WHERE delivered_at IS NULL;
