-- Alerts and digests (issue 6). All times are INTEGER milliseconds since the Unix epoch, UTC.

-- SLA warnings/breaches and source health flips waiting to be grouped into one alert message.
-- The core inserts a row in the same transaction as the clock change; the sender groups rows whose
-- oldest member is at least alerts.group_wait old into one outbox item and sets outbox_id in the
-- same transaction, so each event is sent once.
CREATE TABLE alert_events (
    id          INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL CHECK (kind IN ('sla_warning', 'sla_breach', 'source_unhealthy', 'source_healthy')),
    dedupe_key  TEXT    NOT NULL UNIQUE,     -- e.g. 'breach:<conversation>:<target instance>': one event per instance
    payload     TEXT    NOT NULL,            -- JSON of digest::AlertEvent
    at          INTEGER NOT NULL,
    outbox_id   INTEGER REFERENCES outbox (id)
);
CREATE INDEX alert_events_pending ON alert_events (at) WHERE outbox_id IS NULL;

-- Permanently failed sends are listed in the next digest, by the time they were given up.
ALTER TABLE outbox ADD COLUMN failed_at INTEGER;
CREATE INDEX outbox_failed ON outbox (failed_at) WHERE state = 'failed';
