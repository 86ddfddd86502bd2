-- The columns of SQLite's bodies file (migrations/sqlite/0008_bodies.sql), for one schema on both
-- sides (`store copy` inlines the bodies): always NULL here, where `raw` holds every body.
ALTER TABLE messages ADD COLUMN body_at BIGINT;
ALTER TABLE messages ADD COLUMN body_len BIGINT;
