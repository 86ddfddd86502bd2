-- A UID quarantined after failed fetches is fetched again, alone, an hour after its quarantine
-- and after each retry, at most a few times: a link that died three times with the same message
-- in flight, or a server that could not read its file for a while, does not make it poison.
-- `retries` bounds how often a message that really does kill the connection is tried again;
-- `retried_at` (ms, NULL before the first retry) spaces the retries.
ALTER TABLE imap_accounted ADD COLUMN retries BIGINT NOT NULL DEFAULT 0;
ALTER TABLE imap_accounted ADD COLUMN retried_at BIGINT;
