-- frontdesk schema v1. All times are INTEGER milliseconds since the Unix epoch, UTC.

-- The durable queue: one row per message origin, raw bytes always kept.
CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
    source          TEXT    NOT NULL,
    origin_key      TEXT    NOT NULL,
    origin          TEXT    NOT NULL,            -- JSON of message::Origin
    direction       TEXT    NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    received_at     INTEGER NOT NULL,            -- trusted receipt time: starts SLA clocks
    sent_at         INTEGER,                     -- Date header / provider time: untrusted
    from_addr       TEXT,
    from_name       TEXT,
    to_addrs        TEXT    NOT NULL DEFAULT '[]', -- JSON array of message::Address
    subject         TEXT,
    body_text       TEXT,
    message_id      TEXT,                        -- without angle brackets
    in_reply_to     TEXT    NOT NULL DEFAULT '[]', -- JSON array of ids
    refs            TEXT    NOT NULL DEFAULT '[]', -- JSON array of ids
    thread_key      TEXT,
    automation      TEXT    NOT NULL DEFAULT 'human' CHECK (automation IN ('human', 'automatic', 'frontdesk')),
    parse           TEXT    NOT NULL CHECK (parse IN ('ok', 'degraded')),
    parse_reason    TEXT,
    raw             BLOB    NOT NULL,
    raw_sha256      TEXT    NOT NULL,
    stored_at       INTEGER NOT NULL,            -- when this row was committed
    processed_at    INTEGER,                     -- when the core loop handled it (NULL: pending)
    conversation_id INTEGER,
    UNIQUE (source, origin_key)
);
CREATE INDEX messages_pending ON messages (id) WHERE processed_at IS NULL;
CREATE INDEX messages_message_id ON messages (message_id);
CREATE INDEX messages_conversation ON messages (conversation_id);
CREATE INDEX messages_source_received ON messages (source, received_at);

-- IMAP progress per (source, folder): advanced in the same transaction as the messages.
CREATE TABLE imap_cursors (
    source       TEXT    NOT NULL,
    folder       TEXT    NOT NULL,
    uid_validity INTEGER NOT NULL,
    last_uid     INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (source, folder)
);

-- Notable things that happened to a source (UIDVALIDITY change, quarantine, health flips).
CREATE TABLE source_events (
    id      INTEGER PRIMARY KEY,
    source  TEXT    NOT NULL,
    folder  TEXT,
    kind    TEXT    NOT NULL,
    detail  TEXT    NOT NULL DEFAULT '',
    at      INTEGER NOT NULL
);
CREATE INDEX source_events_source ON source_events (source, at);

-- Everything frontdesk sends: alerts and digests. slot_key makes a digest per period unique.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    kind            TEXT    NOT NULL CHECK (kind IN ('alert', 'digest')),
    channel         TEXT    NOT NULL,
    recipient       TEXT    NOT NULL DEFAULT '',
    slot_key        TEXT    NOT NULL UNIQUE,
    subject         TEXT    NOT NULL DEFAULT '',
    body_text       TEXT    NOT NULL DEFAULT '',
    body_html       TEXT,
    payload         TEXT    NOT NULL DEFAULT '{}',
    state           TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';
