-- Raw IMAP bodies live in the append-only bodies file beside the database (`<db>-bodies`,
-- store/bodies.rs): a row with body_at set keeps an empty `raw` and its bytes at
-- [body_at, body_at + body_len) of that file, fdatasync'd before the row was committed.
-- NULL: the bytes are in `raw` (webhooks, rows stored before this migration, backups).
ALTER TABLE messages ADD COLUMN body_at INTEGER;
ALTER TABLE messages ADD COLUMN body_len INTEGER;
