-- The core loop's tables: conversations and SLA target instances. Times: INTEGER ms since the epoch, UTC.
-- Only the core loop writes these rows.

CREATE TABLE conversations (
    id              INTEGER PRIMARY KEY,
    source          TEXT    NOT NULL,             -- source of the first message
    client_key      TEXT    NOT NULL,             -- rules::Client::key
    client_address  TEXT    NOT NULL,
    client_name     TEXT,
    client_tags     TEXT    NOT NULL DEFAULT '[]', -- JSON array
    client_rule     INTEGER,                      -- index into clients:, for explain
    subject         TEXT,
    base_subject    TEXT    NOT NULL,             -- thread::base_subject, for the subject fallback
    owner           TEXT,
    owner_rule      INTEGER,
    policy          TEXT,
    policy_rule     INTEGER,
    created_at      INTEGER NOT NULL,
    last_message_at INTEGER NOT NULL,
    -- the SLA clock (sla::clock::ClockState without its open target, which is in sla_targets)
    started_by_team INTEGER NOT NULL DEFAULT 0,
    replied         INTEGER NOT NULL DEFAULT 0,
    targets_opened  INTEGER NOT NULL DEFAULT 0,
    clock_last_at   INTEGER,
    -- derived, for listing and for waking the core at the exact deadline
    state           TEXT    NOT NULL DEFAULT 'idle' CHECK (state IN ('idle', 'waiting', 'at_risk', 'breached')),
    waiting_since   INTEGER,
    due_at          INTEGER,
    next_deadline   INTEGER
);
CREATE INDEX conversations_deadline ON conversations (next_deadline) WHERE next_deadline IS NOT NULL;
CREATE INDEX conversations_client_subject ON conversations (client_key, base_subject, last_message_at);
CREATE INDEX conversations_state ON conversations (state);

-- Provider thread keys (webhook sources) per conversation.
CREATE TABLE conversation_keys (
    source          TEXT    NOT NULL,
    thread_key      TEXT    NOT NULL,
    conversation_id INTEGER NOT NULL REFERENCES conversations (id),
    PRIMARY KEY (source, thread_key)
);

-- One row per SLA target instance; (conversation_id, seq) is also the alerts' unique key.
CREATE TABLE sla_targets (
    conversation_id INTEGER NOT NULL REFERENCES conversations (id),
    seq             INTEGER NOT NULL,
    metric          TEXT    NOT NULL,             -- first_reply | next_reply
    policy          TEXT    NOT NULL,
    allowed_ms      INTEGER NOT NULL,
    started_at      INTEGER NOT NULL,
    counting_from   INTEGER NOT NULL,
    warn_at         INTEGER NOT NULL,
    due_at          INTEGER NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('active', 'at_risk', 'met', 'breached', 'met_late')),
    warned          INTEGER NOT NULL DEFAULT 0,
    breached        INTEGER NOT NULL DEFAULT 0,
    fulfilled_at    INTEGER,
    business_ms     INTEGER,
    calendar_ms     INTEGER,
    owner           TEXT,
    source          TEXT    NOT NULL,
    client_key      TEXT    NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
CREATE INDEX sla_targets_fulfilled ON sla_targets (fulfilled_at) WHERE fulfilled_at IS NOT NULL;
