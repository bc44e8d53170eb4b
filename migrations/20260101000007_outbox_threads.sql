-- Each incident is one Slack message kept up to date, with its history as thread replies.
-- The outbox records which part of that conversation a row is and, once the main message is
-- posted, its Slack timestamp (what chat.update and thread replies refer to).
ALTER TABLE notification_outbox
    ADD COLUMN kind     text NOT NULL DEFAULT 'main' CHECK (kind IN ('main', 'update', 'reply')),
    ADD COLUMN slack_ts text;
ALTER TABLE notification_outbox DROP CONSTRAINT notification_outbox_incident_id_fkey;
CREATE INDEX notification_outbox_incident_idx ON notification_outbox (incident_id, id);
