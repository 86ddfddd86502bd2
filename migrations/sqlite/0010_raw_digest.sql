-- The body's integrity digest is no longer always a SHA-256: rows written from now on carry
-- `xxh3-128:<hex>`, older rows keep their bare SHA-256 hex (src/store/body_digest.rs says why).
ALTER TABLE messages RENAME COLUMN raw_sha256 TO raw_digest;
