-- The detector resumes after a restart or a leader change instead of starting cold.
-- An open incident keeps the sequence number of its last notice (the outbox's idempotency keys
-- continue from it, so a change after a restart is never taken for one already queued) and
-- that notice (a Slack press after a restart updates the same message).
ALTER TABLE incidents
    ADD COLUMN notice_seq  integer NOT NULL DEFAULT 0,
    ADD COLUMN last_notice jsonb;

-- Every quiet window that entered a baseline, per (gateway, route, signal); rows older than
-- the longest baseline (five weeks) are deleted as new ones arrive. Metadata only: ratios and
-- request counts, never a request.
CREATE TABLE detector_history (
    gateway text NOT NULL,
    route   text NOT NULL,
    signal  text NOT NULL,
    at      bigint NOT NULL,
    value   double precision NOT NULL,
    weight  bigint NOT NULL,
    PRIMARY KEY (gateway, route, signal, at)
);

-- Which Slack app delivers a row: '' for the operator's own, a gateway's `namespace/name` for
-- the app its ApiGateway names (spec.escalation.slack). Each app's deliverer takes only its rows.
ALTER TABLE notification_outbox ADD COLUMN app text NOT NULL DEFAULT '';

-- Where each gateway's audit log was last read for credential changes, so changes made while
-- the operator was down are announced after it restarts.
CREATE TABLE audit_cursors (
    gateway text PRIMARY KEY,
    after   bigint NOT NULL
);
