-- Webhook ingestion: per-source counters and Mailgun replay tokens.

-- One row per (source, counter): accepted, duplicates, ignored, rejected:<reason>.
-- Updated in the same transaction as the messages they count (accepted, duplicates).
CREATE TABLE webhook_counters (
    source  TEXT    NOT NULL,
    name    TEXT    NOT NULL,
    value   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, name)
) WITHOUT ROWID;

-- Last accepted delivery per source (accepted or duplicate), for `frontdesk sources`.
CREATE TABLE webhook_activity (
    source           TEXT    NOT NULL PRIMARY KEY,
    last_delivery_at INTEGER NOT NULL
) WITHOUT ROWID;

-- Tokens that sign exactly one delivery (Mailgun): a token seen again with another delivery is a
-- replay. Kept durably so a restart does not reopen the window; rows older than the tolerance
-- window are pruned, since the timestamp check already rejects those requests.
CREATE TABLE webhook_replay_tokens (
    source     TEXT    NOT NULL,
    token      TEXT    NOT NULL,
    origin_key TEXT    NOT NULL,
    seen_at    INTEGER NOT NULL,
    PRIMARY KEY (source, token)
) WITHOUT ROWID;
CREATE INDEX webhook_replay_tokens_seen ON webhook_replay_tokens (seen_at);
