-- Leases of work that runs on one replica at a time (an IMAP folder, the core, the sender).
-- The lock itself is a session-level advisory lock; this log says who took it, when, and when
-- its holder last proved its session alive. Times are the database's clock (UTC milliseconds),
-- one clock for every replica, so intervals of different holders can be compared.
CREATE TABLE replica_leases (
    id           BIGSERIAL PRIMARY KEY,
    lock_key     BIGINT  NOT NULL,
    kind         TEXT    NOT NULL,          -- 'folder', 'core' or 'sender'
    source       TEXT,                      -- folder leases only
    folder       TEXT,                      -- folder leases only
    holder       TEXT    NOT NULL,          -- the replica name
    backend_pid  INTEGER NOT NULL,          -- the session holding the advisory lock
    acquired_at  BIGINT  NOT NULL,
    heartbeat_at BIGINT  NOT NULL,
    released_at  BIGINT,                    -- NULL while held or when the holder died
    checks       BIGINT  NOT NULL DEFAULT 0 -- liveness checks passed (one before each batch or step)
);
CREATE INDEX replica_leases_by_key ON replica_leases (lock_key, id);
