-- Failed fetch attempts per IMAP UID, kept across restarts and one-shot `frontdesk sync` runs, so
-- a message that fails on every run is quarantined after a few runs instead of failing forever.
-- Rows at or below a folder's committed cursor are deleted in the batch transaction that passes them.
CREATE TABLE imap_poison (
    source       TEXT   NOT NULL,
    folder       TEXT   NOT NULL,
    uid_validity BIGINT NOT NULL,
    uid          BIGINT NOT NULL,
    attempts     BIGINT NOT NULL,
    last_error   TEXT   NOT NULL,
    at           BIGINT NOT NULL,
    PRIMARY KEY (source, folder, uid_validity, uid)
);
