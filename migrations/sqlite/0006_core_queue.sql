-- The core's per-message state moves out of the wide `messages` rows. SQLite rewrites a whole
-- row (raw bytes and their overflow pages included) when a column changes size, so marking a
-- 100 KB email processed used to rewrite 100 KB. Now `messages` is written once, at ingest.

-- Messages the core has not handled yet. Filled by the trigger below, so every insert path
-- (IMAP, webhooks, bulk loads) queues its messages in the same transaction that stores them.
CREATE TABLE core_queue (
    message_id INTEGER PRIMARY KEY REFERENCES messages (id)
);

-- Which conversation each handled message went to (NULL: ignored) and when it was handled.
CREATE TABLE message_threads (
    message_id      INTEGER PRIMARY KEY REFERENCES messages (id),
    conversation_id INTEGER REFERENCES conversations (id),
    processed_at    INTEGER NOT NULL
);
CREATE INDEX message_threads_conversation ON message_threads (conversation_id);

INSERT INTO core_queue (message_id) SELECT id FROM messages WHERE processed_at IS NULL;
INSERT INTO message_threads (message_id, conversation_id, processed_at)
    SELECT id, conversation_id, processed_at FROM messages WHERE processed_at IS NOT NULL;

CREATE TRIGGER messages_queue_for_core AFTER INSERT ON messages
BEGIN
    INSERT INTO core_queue (message_id) VALUES (new.id);
END;

DROP INDEX messages_pending;
DROP INDEX messages_conversation;
ALTER TABLE messages DROP COLUMN processed_at;
ALTER TABLE messages DROP COLUMN conversation_id;
