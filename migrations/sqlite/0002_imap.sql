-- IMAP ingestion: backfill floor, reconciliation figures, UIDs accounted for without a row, source health.

-- The first run's backfill sets the floor: UIDs at or below it were skipped on purpose.
ALTER TABLE imap_cursors ADD COLUMN backfill_floor   INTEGER NOT NULL DEFAULT 0;
ALTER TABLE imap_cursors ADD COLUMN backfill_skipped INTEGER NOT NULL DEFAULT 0;
-- INTERNALDATE cutoff of the backfill (ms), reapplied after a UIDVALIDITY change; NULL: none.
ALTER TABLE imap_cursors ADD COLUMN backfill_cutoff  INTEGER;
-- The last reconciliation against the server (the "nothing lost" ledger).
ALTER TABLE imap_cursors ADD COLUMN server_messages  INTEGER;
ALTER TABLE imap_cursors ADD COLUMN unaccounted      INTEGER;
ALTER TABLE imap_cursors ADD COLUMN reconciled_at    INTEGER;

-- UIDs that have no row of their own under their UIDVALIDITY, and why:
--   quarantined: kept failing to fetch or parse (raw kept when it could be fetched);
--   own:         frontdesk's own digest or alert (the loop guard);
--   matched:     already stored under an earlier UIDVALIDITY (same fingerprint);
--   backfill:    older than the backfill cutoff, seen after a UIDVALIDITY change.
-- Written in the same transaction as the batch and the cursor.
CREATE TABLE imap_accounted (
    source       TEXT    NOT NULL,
    folder       TEXT    NOT NULL,
    uid_validity INTEGER NOT NULL,
    uid          INTEGER NOT NULL,
    kind         TEXT    NOT NULL CHECK (kind IN ('quarantined', 'own', 'matched', 'backfill')),
    detail       TEXT    NOT NULL DEFAULT '',
    raw          BLOB,
    at           INTEGER NOT NULL,
    PRIMARY KEY (source, folder, uid_validity, uid)
);

-- Health per source: a source that keeps failing is visible, never silently dead.
CREATE TABLE source_health (
    source        TEXT    PRIMARY KEY,
    healthy       INTEGER NOT NULL,
    last_success  INTEGER,
    last_error    TEXT,
    last_error_at INTEGER,
    failures      INTEGER NOT NULL DEFAULT 0,   -- consecutive failures since the last success
    updated_at    INTEGER NOT NULL
);
