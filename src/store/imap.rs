//! IMAP progress: cursors advanced in the same transaction as the messages, UIDs accounted for
//! without a row (quarantine, loop guard, UIDVALIDITY matches, backfill), source health and the
//! "nothing lost" ledger.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use super::backend::Driver;
use super::body_digest::BodyDigest;
use super::messages::{RawStagedInserter, StagedBody};
use super::sqlite_raw::{RawDb, Value};
use super::wal_sync::WalFile;
use super::{Backend, Error, Store, Tx, from_ms, to_ms};

twin_impl! {
/// The stored health of `source` inside `tx` (`None`: it never reported).
async fn health_of(
    &self,
    tx: &mut Tx<Self>,
    source: &str,
) -> Result<Option<bool>, Error> {
    let row: Option<(i64,)> = sqlx::query_as(self.sql("SELECT healthy FROM source_health WHERE source = ?"))
        .bind(source)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(row.map(|(h,)| h != 0))
}

/// The UIDs of `folder`'s message rows under `uid_validity`.
///
/// The database hands over the folder's keys as one string instead of one row per key: on a
/// 10,000-message folder the row-per-key read took 5-13 ms of a 70 ms incremental
/// `frontdesk sync` (every pass reconciles), the aggregate about 1-3 ms. Each key comes
/// length-prefixed (`{bytes}:{key}`), since a folder's name may hold any separator.
async fn folder_uids(
    &self,
    source: &str,
    folder: &str,
    uid_validity: u32,
) -> Result<Vec<u32>, Error> {
    // keys of one UIDVALIDITY share the prefix `imap:{v}:`; `;` sorts right after `:`
    let prefix = format!("imap:{uid_validity}:");
    let sql = self.pick(
        "SELECT group_concat(length(CAST(origin_key AS BLOB)) || ':' || origin_key, '') \
         FROM messages WHERE source = ? AND origin_key >= ? AND origin_key < ?",
        "SELECT string_agg(octet_length(origin_key) || ':' || origin_key, '') \
         FROM messages WHERE source = ? AND origin_key >= ? AND origin_key < ?",
    );
    let (keys,): (Option<String>,) = sqlx::query_as(sql)
        .bind(source)
        .bind(&prefix)
        .bind(format!("imap:{uid_validity};"))
        .fetch_one(self.reader())
        .await?;
    let mut uids = Vec::new();
    let mut rest = keys.as_deref().unwrap_or_default();
    while !rest.is_empty() {
        let key = rest
            .split_once(':')
            .and_then(|(len, tail)| Some((len.parse::<usize>().ok()?, tail)))
            .and_then(|(len, tail)| Some((tail.get(..len)?, tail.get(len..)?)));
        let Some((key, tail)) = key else {
            return Err(Error::Corrupt {
                table: "messages",
                reason: format!("the origin keys of source {source} did not read back whole"),
            });
        };
        // `imap:{uid_validity}:{uid}:{folder}`, see `Origin::key`
        if let Some((uid, f)) = key
            .strip_prefix(prefix.as_str())
            .and_then(|k| k.split_once(':'))
            && f == folder
            && let Ok(uid) = uid.parse()
        {
            uids.push(uid);
        }
        rest = tail;
    }
    Ok(uids)
}
}
use crate::message::Message;

/// Where ingestion of one folder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImapCursor {
    /// The folder's UIDVALIDITY the UIDs below belong to.
    pub uid_validity: u32,
    /// The highest UID committed (ingested or accounted for).
    pub last_uid: u32,
    /// UIDs at or below this were skipped by the first run's backfill.
    pub backfill_floor: u32,
    /// How many messages the backfill skipped.
    pub backfill_skipped: u64,
    /// The backfill's INTERNALDATE cutoff, reapplied after a UIDVALIDITY change.
    pub backfill_cutoff: Option<DateTime<Utc>>,
}

/// Why a UID has no message row of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountedKind {
    /// It kept failing to fetch or parse.
    Quarantined,
    /// frontdesk's own digest or alert (loop guard).
    Own,
    /// Already stored under an earlier UIDVALIDITY.
    Matched,
    /// Older than the backfill cutoff, found after a UIDVALIDITY change.
    Backfill,
}

impl AccountedKind {
    fn as_str(self) -> &'static str {
        match self {
            AccountedKind::Quarantined => "quarantined",
            AccountedKind::Own => "own",
            AccountedKind::Matched => "matched",
            AccountedKind::Backfill => "backfill",
        }
    }
}

/// A UID accounted for without a message row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountedUid {
    /// The UID (under the cursor's UIDVALIDITY).
    pub uid: u32,
    /// Why it has no row.
    pub kind: AccountedKind,
    /// A short reason (the error, the matched Message-ID).
    pub detail: String,
    /// The raw bytes when they could be fetched (quarantine keeps them).
    pub raw: Option<Vec<u8>>,
}

/// What one committed batch changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// New message rows.
    pub inserted: u64,
    /// Messages whose origin was already stored.
    pub duplicates: u64,
}

/// One folder's line of the ledger (`frontdesk sources`).
#[derive(Debug, Clone, Serialize)]
pub struct FolderLedger {
    /// Source name.
    pub source: String,
    /// Folder name.
    pub folder: String,
    /// The folder's UIDVALIDITY.
    pub uid_validity: u32,
    /// Highest committed UID.
    pub last_uid: u32,
    /// Messages on the server at the last reconciliation.
    pub server_messages: Option<u64>,
    /// Rows stored under the current UIDVALIDITY.
    pub ingested: u64,
    /// Already stored under an earlier UIDVALIDITY.
    pub matched: u64,
    /// Skipped by the backfill setting.
    pub skipped_backfill: u64,
    /// Quarantined UIDs.
    pub quarantined: u64,
    /// frontdesk's own mail, not ingested.
    pub own: u64,
    /// Server UIDs above the backfill floor that are neither stored nor accounted for: must be 0.
    pub unaccounted: Option<u64>,
    /// When the ledger was last reconciled against the server.
    pub reconciled_at: Option<DateTime<Utc>>,
}

/// A source's health as recorded by its ingestion task.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SourceHealth {
    /// Source name.
    pub source: String,
    /// False once it has failed repeatedly since its last success.
    pub healthy: bool,
    /// The last successful pass.
    pub last_success: Option<DateTime<Utc>>,
    /// The last error, in words.
    pub last_error: Option<String>,
    /// When the last error happened.
    pub last_error_at: Option<DateTime<Utc>>,
    /// Consecutive failures since the last success.
    pub failures: u32,
}

impl Store {
    /// The folder's cursor, if it has ever been synced.
    pub async fn imap_cursor(
        &self,
        source: &str,
        folder: &str,
    ) -> Result<Option<ImapCursor>, Error> {
        on_backend!(self, |db| {
            let row = sqlx::query(db.sql(
                "SELECT uid_validity, last_uid, backfill_floor, backfill_skipped, backfill_cutoff \
             FROM imap_cursors WHERE source = ? AND folder = ?",
            ))
            .bind(source)
            .bind(folder)
            .fetch_optional(db.reader())
            .await?;
            let Some(r) = row else { return Ok(None) };
            let cutoff: Option<i64> = r.try_get("backfill_cutoff")?;
            Ok(Some(ImapCursor {
                uid_validity: u32::try_from(r.try_get::<i64, _>("uid_validity")?).unwrap_or(0),
                last_uid: u32::try_from(r.try_get::<i64, _>("last_uid")?).unwrap_or(0),
                backfill_floor: u32::try_from(r.try_get::<i64, _>("backfill_floor")?).unwrap_or(0),
                backfill_skipped: u64::try_from(r.try_get::<i64, _>("backfill_skipped")?)
                    .unwrap_or(0),
                backfill_cutoff: cutoff.map(from_ms),
            }))
        })
    }

    /// Stores a batch, the UIDs accounted for without a row and the new cursor in ONE transaction:
    /// [`Store::stage_imap_batch`] then [`Store::commit_staged_imap_batch`].
    pub async fn commit_imap_batch(
        &self,
        source: &str,
        folder: &str,
        messages: Vec<Message>,
        accounted: &[AccountedUid],
        cursor: &ImapCursor,
        now: DateTime<Utc>,
    ) -> Result<BatchOutcome, Error> {
        let staged = self.stage_imap_batch(messages).await?;
        self.commit_staged_imap_batch(source, folder, staged, accounted, cursor, now)
            .await
    }

    /// Readies a fetched batch for its commit without taking the database's write lock, so that
    /// it can overlap the previous batch's commit: every body is digested and, on SQLite, appended
    /// to the bodies file and made durable (`store::bodies`), its raw bytes then freed.
    pub async fn stage_imap_batch(&self, messages: Vec<Message>) -> Result<StagedBatch, Error> {
        // a cursor-only commit: no thread hand-off, and no bodies file created before it is needed
        if messages.is_empty() {
            return Ok(StagedBatch { items: Vec::new() });
        }
        let items = match &self.backend {
            Backend::Sqlite(db) => db.place_bodies(messages).await?,
            Backend::Postgres(_) => tokio::task::spawn_blocking(move || {
                messages
                    .into_iter()
                    .map(|m| {
                        let digest = BodyDigest::of(&m.raw);
                        (
                            m,
                            StagedBody {
                                digest,
                                place: None,
                            },
                        )
                    })
                    .collect()
            })
            .await
            .map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))?,
        };
        Ok(StagedBatch { items })
    }

    /// Commits a staged batch, the UIDs accounted for without a row and the new cursor in ONE
    /// transaction: after a crash either all of it is there or none of it, so the cursor never
    /// runs ahead. Batches of one folder must commit in the order they were fetched.
    ///
    /// On SQLite the commit is atomic but not yet durable (`synchronous=NORMAL`, see
    /// `SqliteDb::commit_imap_batch_raw`): a batch's only
    /// acknowledgement is its own cursor, so a power loss can at worst make the folder's last
    /// batches be fetched again. [`Store::make_durable`] ends a pass, and the checkpointer syncs
    /// the WAL before it copies any of it. The fsync per batch (two per batch with the checkpoints,
    /// 0.65 s in all under strace for 10,000 messages) held up the sync's store stage, its
    /// bottleneck (bench/README.md). The bodies the rows point at were made durable when the batch
    /// was staged, before this transaction began.
    pub async fn commit_staged_imap_batch(
        &self,
        source: &str,
        folder: &str,
        staged: StagedBatch,
        accounted: &[AccountedUid],
        cursor: &ImapCursor,
        now: DateTime<Utc>,
    ) -> Result<BatchOutcome, Error> {
        let batch = BatchWrite {
            source,
            folder,
            messages: staged.items,
            accounted,
            cursor,
            now,
        };
        match &self.backend {
            Backend::Sqlite(db) => db.commit_imap_batch_raw(batch).await,
            Backend::Postgres(db) => {
                let mut tx = db.begin_write().await?;
                let out = db.write_imap_batch(&mut tx, batch).await?;
                tx.commit().await?;
                Ok(out)
            }
        }
    }

    /// Makes every commit so far durable: ends a pass of [`Store::commit_imap_batch`] calls.
    pub async fn make_durable(&self) -> Result<(), Error> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let wal = WalFile::beside(&db.path);
                let synced = tokio::task::spawn_blocking(move || wal.sync())
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                Ok(synced.map_err(sqlx::Error::Io)?)
            }
            // PostgreSQL commits are durable one by one (`synchronous_commit` is checked at open)
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Failed fetch attempts per UID of the folder under `uid_validity`: (uid, attempts, last
    /// error). They outlive the process, so one-shot `sync` runs count towards quarantine too.
    pub async fn imap_poison(
        &self,
        source: &str,
        folder: &str,
        uid_validity: u32,
    ) -> Result<Vec<(u32, u32, String)>, Error> {
        let rows: Vec<(i64, i64, String)> = on_backend!(self, |db| {
            sqlx::query_as(db.sql(
                "SELECT uid, attempts, last_error FROM imap_poison \
                 WHERE source = ? AND folder = ? AND uid_validity = ?",
            ))
            .bind(source)
            .bind(folder)
            .bind(i64::from(uid_validity))
            .fetch_all(db.reader())
            .await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(uid, attempts, error)| {
                Some((
                    u32::try_from(uid).ok()?,
                    u32::try_from(attempts).unwrap_or(u32::MAX),
                    error,
                ))
            })
            .collect())
    }

    /// Counts one more failed fetch of each of `uids` (durably, before the error is reported).
    pub async fn record_imap_poison(
        &self,
        source: &str,
        folder: &str,
        uid_validity: u32,
        uids: &[u32],
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        on_backend!(self, |db| {
            let mut tx = db.begin_write().await?;
            for uid in uids {
                sqlx::query(db.sql(
                    "INSERT INTO imap_poison (source, folder, uid_validity, uid, attempts, last_error, at) \
                     VALUES (?, ?, ?, ?, 1, ?, ?) ON CONFLICT (source, folder, uid_validity, uid) \
                     DO UPDATE SET attempts = imap_poison.attempts + 1, last_error = excluded.last_error, \
                     at = excluded.at",
                ))
                .bind(source)
                .bind(folder)
                .bind(i64::from(uid_validity))
                .bind(i64::from(*uid))
                .bind(error)
                .bind(to_ms(now))
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Every UID of the folder under `uid_validity` that has a row or is accounted for.
    pub async fn imap_known_uids(
        &self,
        source: &str,
        folder: &str,
        uid_validity: u32,
    ) -> Result<HashSet<u32>, Error> {
        on_backend!(self, |db| {
            let mut known: HashSet<u32> = db
                .folder_uids(source, folder, uid_validity)
                .await?
                .into_iter()
                .collect();
            let rows: Vec<(i64,)> = sqlx::query_as(
            db.sql("SELECT uid FROM imap_accounted WHERE source = ? AND folder = ? AND uid_validity = ?"),
        )
        .bind(source)
        .bind(folder)
        .bind(i64::from(uid_validity))
        .fetch_all(db.reader())
        .await?;
            known.extend(rows.into_iter().filter_map(|(u,)| u32::try_from(u).ok()));
            Ok(known)
        })
    }

    /// The folder's quarantined UIDs without raw bytes that are due to be fetched again, each with
    /// its quarantine detail; oldest UID first. Due: tried again fewer than `max_retries` times,
    /// and neither quarantined (after failed fetches) nor last retried after `quiet_since`. One
    /// refused for its size needs no wait before its first try (it was never fetched); the caller
    /// tries it only if it fits a raised `max_message_size` (its detail names its size).
    pub async fn imap_quarantine_due(
        &self,
        source: &str,
        folder: &str,
        uid_validity: u32,
        max_retries: u32,
        quiet_since: DateTime<Utc>,
    ) -> Result<Vec<(u32, String)>, Error> {
        on_backend!(self, |db| {
            let rows: Vec<(i64, String)> = sqlx::query_as(db.sql(
                "SELECT uid, detail FROM imap_accounted WHERE source = ? AND folder = ? \
                 AND uid_validity = ? AND kind = 'quarantined' AND raw IS NULL AND retries < ? \
                 AND coalesce(retried_at, CASE WHEN detail LIKE 'too large%' THEN 0 ELSE at END) <= ? \
                 ORDER BY uid",
            ))
            .bind(source)
            .bind(folder)
            .bind(i64::from(uid_validity))
            .bind(i64::from(max_retries))
            .bind(to_ms(quiet_since))
            .fetch_all(db.reader())
            .await?;
            Ok(rows
                .into_iter()
                .filter_map(|(u, d)| Some((u32::try_from(u).ok()?, d)))
                .collect())
        })
    }

    /// Counts one more retry of a quarantined UID, durably, before it is fetched: a retry that
    /// kills the connection (a message that really is poison) still counts.
    pub async fn imap_quarantine_retried(
        &self,
        source: &str,
        folder: &str,
        uid_validity: u32,
        uid: u32,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        on_backend!(self, |db| {
            sqlx::query(db.sql(
                "UPDATE imap_accounted SET retries = retries + 1, retried_at = ? WHERE source = ? \
                 AND folder = ? AND uid_validity = ? AND uid = ? AND kind = 'quarantined'",
            ))
            .bind(to_ms(now))
            .bind(source)
            .bind(folder)
            .bind(i64::from(uid_validity))
            .bind(i64::from(uid))
            .execute(db.writer())
            .await?;
        });
        Ok(())
    }

    /// Stores a quarantined UID's message, fetched on a retry, and ends its quarantine, in one
    /// transaction: the UID is accounted for by its row from then on, never by both. Returns
    /// whether the row is new (false: its origin was already stored).
    pub async fn imap_release_quarantined(
        &self,
        folder: &str,
        uid_validity: u32,
        uid: u32,
        msg: &Message,
        now: DateTime<Utc>,
    ) -> Result<bool, Error> {
        on_backend!(self, |db| {
            let mut tx = db.begin_write().await?;
            let ingested = db.insert_message(&mut tx, msg, now).await?;
            sqlx::query(db.sql(
                "DELETE FROM imap_accounted WHERE source = ? AND folder = ? AND uid_validity = ? \
                 AND uid = ? AND kind = 'quarantined'",
            ))
            .bind(&msg.source)
            .bind(folder)
            .bind(i64::from(uid_validity))
            .bind(i64::from(uid))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(!ingested.duplicate)
        })
    }

    /// UIDs above `last_uid` already accounted for without a row (matched after a UIDVALIDITY
    /// change): the incremental pass skips them. Message rows never lie above the cursor.
    pub async fn imap_accounted_above(
        &self,
        source: &str,
        folder: &str,
        uid_validity: u32,
        last_uid: u32,
    ) -> Result<HashSet<u32>, Error> {
        on_backend!(self, |db| {
            let rows: Vec<(i64,)> = sqlx::query_as(
            db.sql("SELECT uid FROM imap_accounted WHERE source = ? AND folder = ? AND uid_validity = ? AND uid > ?"),
        )
        .bind(source)
        .bind(folder)
        .bind(i64::from(uid_validity))
        .bind(i64::from(last_uid))
        .fetch_all(db.reader())
        .await?;
            Ok(rows
                .into_iter()
                .filter_map(|(u,)| u32::try_from(u).ok())
                .collect())
        })
    }

    /// How many rows of this folder (any UIDVALIDITY) carry each Message-ID: the fingerprints a
    /// UIDVALIDITY change is reconciled against.
    pub async fn imap_folder_fingerprints(
        &self,
        source: &str,
        folder: &str,
    ) -> Result<HashMap<String, u32>, Error> {
        on_backend!(self, |db| {
            let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            db.sql("SELECT origin_key, message_id FROM messages WHERE source = ? AND origin_key >= 'imap:' AND origin_key < 'imap;'"),
        )
        .bind(source)
        .fetch_all(db.reader())
        .await?;
            let mut counts = HashMap::new();
            for (key, id) in rows {
                let Some(id) = id else { continue };
                let same_folder = key
                    .strip_prefix("imap:")
                    .and_then(|r| r.splitn(3, ':').nth(2))
                    .is_some_and(|f| f == folder);
                if same_folder {
                    *counts.entry(id).or_insert(0) += 1;
                }
            }
            Ok(counts)
        })
    }

    /// Records a notable event for a source (UIDVALIDITY change, quarantine).
    pub async fn record_source_event(
        &self,
        source: &str,
        folder: Option<&str>,
        kind: &str,
        detail: &str,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        on_backend!(self, |db| {
            sqlx::query(
            db.sql("INSERT INTO source_events (source, folder, kind, detail, at) VALUES (?, ?, ?, ?, ?)"),
        )
        .bind(source)
        .bind(folder)
        .bind(kind)
        .bind(detail)
        .bind(to_ms(now))
        .execute(db.writer())
        .await?;
            Ok(())
        })
    }

    /// Events of one kind for a source, oldest first (kind, folder, detail).
    pub async fn source_events(
        &self,
        source: &str,
        kind: &str,
    ) -> Result<Vec<(Option<String>, String)>, Error> {
        on_backend!(self, |db| {
            Ok(sqlx::query_as(
            db.sql("SELECT folder, detail FROM source_events WHERE source = ? AND kind = ? ORDER BY id"),
        )
        .bind(source)
        .bind(kind)
        .fetch_all(db.reader())
        .await?)
        })
    }

    /// A pass succeeded: the source is healthy; a source that was unhealthy raises a "healthy
    /// again" alert event in the same transaction.
    pub async fn source_succeeded(&self, source: &str, now: DateTime<Utc>) -> Result<(), Error> {
        on_backend!(self, |db| {
            let mut tx = db.begin_write().await?;
            let before = db.health_of(&mut tx, source).await?;
            sqlx::query(db.sql(
                "INSERT INTO source_health (source, healthy, last_success, failures, updated_at) \
             VALUES (?, 1, ?, 0, ?) ON CONFLICT (source) DO UPDATE SET healthy = 1, \
             last_success = excluded.last_success, failures = 0, updated_at = excluded.updated_at",
            ))
            .bind(source)
            .bind(to_ms(now))
            .bind(to_ms(now))
            .execute(&mut *tx)
            .await?;
            if before == Some(false) {
                let event = crate::digest::AlertEvent::SourceHealthy {
                    source: source.to_string(),
                };
                let key = format!("source:{source}:healthy:{}", to_ms(now));
                db.insert_alert_event(&mut tx, &key, &event, now).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// A pass failed; after `unhealthy_after` consecutive failures the source is unhealthy, and
    /// the flip raises a "source unhealthy" alert event in the same transaction (once per flip).
    pub async fn source_failed(
        &self,
        source: &str,
        error: &str,
        unhealthy_after: u32,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        on_backend!(self, |db| {
            let mut tx = db.begin_write().await?;
            let before = db.health_of(&mut tx, source).await?.unwrap_or(true);
            sqlx::query(
            db.sql("INSERT INTO source_health (source, healthy, last_error, last_error_at, failures, updated_at) \
             VALUES (?1, CASE WHEN ?2 > 1 THEN 1 ELSE 0 END, ?3, ?4, 1, ?4) ON CONFLICT (source) DO UPDATE SET \
             failures = source_health.failures + 1, \
             healthy = CASE WHEN source_health.failures + 1 < ?2 THEN 1 ELSE 0 END, last_error = ?3, \
             last_error_at = ?4, updated_at = ?4"),
        )
        .bind(source)
        .bind(i64::from(unhealthy_after))
        .bind(error)
        .bind(to_ms(now))
        .execute(&mut *tx)
        .await?;
            let after = db.health_of(&mut tx, source).await?.unwrap_or(true);
            if before && !after {
                let event = crate::digest::AlertEvent::SourceUnhealthy {
                    source: source.to_string(),
                    error: error.to_string(),
                };
                let key = format!("source:{source}:unhealthy:{}", to_ms(now));
                db.insert_alert_event(&mut tx, &key, &event, now).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Health of every source that has reported.
    pub async fn source_health(&self) -> Result<Vec<SourceHealth>, Error> {
        on_backend!(self, |db| {
            let rows = sqlx::query(db.sql(
                "SELECT source, healthy, last_success, last_error, last_error_at, failures \
             FROM source_health ORDER BY source",
            ))
            .fetch_all(db.reader())
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(SourceHealth {
                    source: r.try_get("source")?,
                    healthy: r.try_get::<i64, _>("healthy")? != 0,
                    last_success: r.try_get::<Option<i64>, _>("last_success")?.map(from_ms),
                    last_error: r.try_get("last_error")?,
                    last_error_at: r.try_get::<Option<i64>, _>("last_error_at")?.map(from_ms),
                    failures: u32::try_from(r.try_get::<i64, _>("failures")?).unwrap_or(u32::MAX),
                });
            }
            Ok(out)
        })
    }

    /// Saves the outcome of reconciling a folder against the server.
    pub async fn save_imap_reconciliation(
        &self,
        source: &str,
        folder: &str,
        server_messages: u64,
        unaccounted: u64,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        on_backend!(self, |db| {
            sqlx::query(db.sql(
                "UPDATE imap_cursors SET server_messages = ?, unaccounted = ?, reconciled_at = ? \
             WHERE source = ? AND folder = ?",
            ))
            .bind(i64::try_from(server_messages).unwrap_or(i64::MAX))
            .bind(i64::try_from(unaccounted).unwrap_or(i64::MAX))
            .bind(to_ms(now))
            .bind(source)
            .bind(folder)
            .execute(db.writer())
            .await?;
            Ok(())
        })
    }

    /// The ledger: one line per synced (source, folder).
    pub async fn imap_ledger(&self) -> Result<Vec<FolderLedger>, Error> {
        on_backend!(self, |db| {
            let rows = sqlx::query(db.sql(
                "SELECT source, folder, uid_validity, last_uid, backfill_skipped, server_messages, \
             unaccounted, reconciled_at FROM imap_cursors ORDER BY source, folder",
            ))
            .fetch_all(db.reader())
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let source: String = r.try_get("source")?;
                let folder: String = r.try_get("folder")?;
                let uid_validity = u32::try_from(r.try_get::<i64, _>("uid_validity")?).unwrap_or(0);
                let counts: Vec<(String, i64)> = sqlx::query_as(db.sql(
                    "SELECT kind, count(*) FROM imap_accounted WHERE source = ? AND folder = ? \
                 AND uid_validity = ? GROUP BY kind",
                ))
                .bind(&source)
                .bind(&folder)
                .bind(i64::from(uid_validity))
                .fetch_all(db.reader())
                .await?;
                let count = |k: AccountedKind| {
                    counts
                        .iter()
                        .find(|(kind, _)| kind == k.as_str())
                        .map_or(0, |(_, n)| u64::try_from(*n).unwrap_or(0))
                };
                let ingested = db.folder_uids(&source, &folder, uid_validity).await?.len() as u64;
                let skipped: i64 = r.try_get("backfill_skipped")?;
                out.push(FolderLedger {
                    uid_validity,
                    last_uid: u32::try_from(r.try_get::<i64, _>("last_uid")?).unwrap_or(0),
                    server_messages: r
                        .try_get::<Option<i64>, _>("server_messages")?
                        .and_then(|n| u64::try_from(n).ok()),
                    ingested,
                    matched: count(AccountedKind::Matched),
                    skipped_backfill: u64::try_from(skipped).unwrap_or(0)
                        + count(AccountedKind::Backfill),
                    quarantined: count(AccountedKind::Quarantined),
                    own: count(AccountedKind::Own),
                    unaccounted: r
                        .try_get::<Option<i64>, _>("unaccounted")?
                        .and_then(|n| u64::try_from(n).ok()),
                    reconciled_at: r.try_get::<Option<i64>, _>("reconciled_at")?.map(from_ms),
                    source,
                    folder,
                });
            }
            Ok(out)
        })
    }
}

impl super::backend::SqliteDb {
    /// Hashes a batch's bodies, appends them to the bodies file and makes them durable
    /// (`store::bodies`); gives each message back, its raw bytes freed, with its hash and where its
    /// body went.
    async fn place_bodies(
        &self,
        messages: Vec<Message>,
    ) -> Result<Vec<(Message, StagedBody)>, Error> {
        let bodies = self.bodies.clone();
        let joined = tokio::task::spawn_blocking(move || {
            // digested before the append, outside the bodies file's lock
            let digests: Vec<BodyDigest> =
                messages.iter().map(|m| BodyDigest::of(&m.raw)).collect();
            let placed = bodies.append(messages.iter().map(|m| m.raw.as_slice()));
            (messages, digests, placed)
        })
        .await
        .map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))?;
        let (messages, digests, placed) = joined;
        let placed = placed.map_err(sqlx::Error::Io)?;
        // checked before any raw bytes are let go: each message must keep its place
        if placed.len() != messages.len() {
            return Err(Error::Corrupt {
                table: "messages",
                reason: "bodies placed for a different number of messages".into(),
            });
        }
        Ok(messages
            .into_iter()
            .zip(digests)
            .zip(placed)
            .map(|((mut m, digest), place)| {
                // the bytes are durable in the bodies file: the batch holds only its rows now
                m.raw = Vec::new();
                (
                    m,
                    StagedBody {
                        digest,
                        place: Some(place),
                    },
                )
            })
            .collect())
    }
}

impl super::backend::SqliteDb {
    /// [`Store::commit_staged_imap_batch`] on SQLite: the whole transaction stepped on the writer
    /// connection's raw handle on a blocking thread ([`super::sqlite_raw`] says why). It cost
    /// sqlx's worker about a fifth of an initial sync's CPU in statement round trips, argument
    /// copies and thread wake-ups (bench/README.md, session 12).
    ///
    /// `synchronous=NORMAL` for this transaction only: its commit writes the WAL frames without
    /// waiting for an fsync and stays atomic (a power loss rolls the WAL back to an earlier
    /// commit, never into the middle of one). A batch's only acknowledgement is its own cursor,
    /// committed with it, so losing the last batches to a power loss means fetching them again,
    /// nothing more. FULL is set again before the connection goes back to the pool; on any error
    /// the transaction is rolled back and the connection closed rather than reused, so no other
    /// writer can ever commit on it without the fsync it relies on. A caller cancelled meanwhile (shutdown) leaves the commit to
    /// finish or fail as a whole on its thread.
    async fn commit_imap_batch_raw(&self, batch: BatchWrite<'_>) -> Result<BatchOutcome, Error> {
        let mut conn = self.writer.acquire().await?;
        let owned = OwnedBatchWrite {
            source: batch.source.to_string(),
            folder: batch.folder.to_string(),
            messages: batch.messages,
            accounted: batch.accounted.to_vec(),
            cursor: *batch.cursor,
            now: batch.now,
        };
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let done = match rt.block_on(conn.lock_handle()) {
                Ok(mut handle) => {
                    // SAFETY: `handle` locks the connection until the end of this arm: sqlx's
                    // worker makes no call on it meanwhile, and `db` (with every statement
                    // prepared on it) is dropped first.
                    let db = unsafe { RawDb::new(handle.as_raw_handle()) };
                    db.unsynced_transaction(|| write_imap_batch_raw(&db, &owned))
                }
                Err(e) => Err(e.into()),
            };
            if done.is_err() {
                conn.close_on_drop();
            }
            done
        })
        .await
        .map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))?
    }
}

/// A [`BatchWrite`] owned, for the blocking thread that commits it.
struct OwnedBatchWrite {
    source: String,
    folder: String,
    messages: Vec<(Message, StagedBody)>,
    accounted: Vec<AccountedUid>,
    cursor: ImapCursor,
    now: DateTime<Utc>,
}

/// The writes of `write_imap_batch`, statement for statement, on a raw handle inside its
/// transaction.
fn write_imap_batch_raw(db: &RawDb<'_>, batch: &OwnedBatchWrite) -> Result<BatchOutcome, Error> {
    let OwnedBatchWrite {
        source,
        folder,
        messages,
        accounted,
        cursor,
        now,
    } = batch;
    let mut out = BatchOutcome::default();
    let mut insert = RawStagedInserter::new(db)?;
    for (m, staged) in messages {
        if insert.insert(m, *staged, *now)? {
            out.inserted += 1;
        } else {
            out.duplicates += 1;
        }
    }
    drop(insert);
    let validity = Value::Int(i64::from(cursor.uid_validity));
    if !accounted.is_empty() {
        let mut stmt = db.prepare(INSERT_ACCOUNTED)?;
        for a in accounted {
            stmt.bind_all(&[
                Value::Text(source),
                Value::Text(folder),
                validity,
                Value::Int(i64::from(a.uid)),
                Value::Text(a.kind.as_str()),
                Value::Text(&a.detail),
                a.raw.as_deref().map_or(Value::Null, Value::Blob),
                Value::Int(to_ms(*now)),
            ])?;
            while stmt.step()? {}
        }
    }
    let mut stmt = db.prepare(CLEAR_POISON)?;
    stmt.bind_all(&[
        Value::Text(source),
        Value::Text(folder),
        validity,
        Value::Int(i64::from(cursor.last_uid)),
    ])?;
    while stmt.step()? {}
    let mut stmt = db.prepare(UPSERT_CURSOR)?;
    stmt.bind_all(&[
        Value::Text(source),
        Value::Text(folder),
        validity,
        Value::Int(i64::from(cursor.last_uid)),
        Value::Int(to_ms(*now)),
        Value::Int(i64::from(cursor.backfill_floor)),
        Value::Int(i64::try_from(cursor.backfill_skipped).unwrap_or(i64::MAX)),
        cursor.backfill_cutoff.map(to_ms).into(),
    ])?;
    while stmt.step()? {}
    Ok(out)
}

/// Records a UID accounted for without a row (one per `AccountedUid`).
const INSERT_ACCOUNTED: &str = "INSERT INTO imap_accounted (source, folder, uid_validity, uid, \
     kind, detail, raw, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING";

/// Forgets the failure counts of UIDs a commit passes, or of an older UIDVALIDITY.
const CLEAR_POISON: &str = "DELETE FROM imap_poison WHERE source = ? AND folder = ? \
     AND (uid_validity != ? OR uid <= ?)";

/// Sets a folder's cursor.
const UPSERT_CURSOR: &str = "INSERT INTO imap_cursors (source, folder, uid_validity, last_uid, \
     updated_at, backfill_floor, backfill_skipped, backfill_cutoff) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
     ON CONFLICT (source, folder) DO UPDATE SET uid_validity = excluded.uid_validity, \
     last_uid = excluded.last_uid, updated_at = excluded.updated_at, \
     backfill_floor = excluded.backfill_floor, backfill_skipped = excluded.backfill_skipped, \
     backfill_cutoff = excluded.backfill_cutoff";

/// A fetched batch made ready for its commit (`Store::stage_imap_batch`).
#[derive(Debug)]
pub struct StagedBatch {
    items: Vec<(Message, StagedBody)>,
}

/// What one [`Store::commit_staged_imap_batch`] writes, handed to whichever backend's transaction.
struct BatchWrite<'a> {
    source: &'a str,
    folder: &'a str,
    /// Each message with its staged body.
    messages: Vec<(Message, StagedBody)>,
    accounted: &'a [AccountedUid],
    cursor: &'a ImapCursor,
    now: DateTime<Utc>,
}

impl super::backend::PgDb {
    /// The writes of [`Store::commit_imap_batch`] inside the caller's transaction (PostgreSQL;
    /// SQLite's are `write_imap_batch_raw`).
    async fn write_imap_batch(
        &self,
        tx: &mut sqlx::Transaction<'_, <Self as Driver>::Db>,
        batch: BatchWrite<'_>,
    ) -> Result<BatchOutcome, Error> {
        let BatchWrite {
            source,
            folder,
            messages,
            accounted,
            cursor,
            now,
        } = batch;
        // A few multi-row INSERTs per batch instead of one per message (each statement is a round
        // trip to sqlx's SQLite thread), each cut at ROWS or BYTES of raw mail still in the rows
        // (PostgreSQL's; SQLite's went to the bodies file when staged): a statement's arguments
        // are copied, so its size is memory held twice. Each chunk is dropped once
        // inserted: the batch's memory is given back while the commit runs and the next batch is
        // being fetched.
        const ROWS: usize = 64;
        const BYTES: usize = 256 * 1024;
        let mut out = BatchOutcome::default();
        let mut rest = messages.into_iter().peekable();
        while rest.peek().is_some() {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            while let Some(m) = rest.next_if(|(m, _)| {
                chunk.is_empty() || (chunk.len() < ROWS && bytes + m.raw.len() <= BYTES)
            }) {
                bytes += m.0.raw.len();
                chunk.push(m);
            }
            // moved, not copied: the raw bytes go into the statement's arguments as they are
            let rows = chunk.len() as u64;
            let new = self.insert_owned_messages(tx, chunk, now).await?;
            out.inserted += new;
            out.duplicates += rows.saturating_sub(new);
        }
        for a in accounted {
            sqlx::query(self.sql(INSERT_ACCOUNTED))
                .bind(source)
                .bind(folder)
                .bind(i64::from(cursor.uid_validity))
                .bind(i64::from(a.uid))
                .bind(a.kind.as_str())
                .bind(&a.detail)
                .bind(a.raw.as_deref())
                .bind(to_ms(now))
                .execute(&mut **tx)
                .await?;
        }
        // failure counts of UIDs this commit passes (or of an older UIDVALIDITY) are done with
        sqlx::query(self.sql(CLEAR_POISON))
            .bind(source)
            .bind(folder)
            .bind(i64::from(cursor.uid_validity))
            .bind(i64::from(cursor.last_uid))
            .execute(&mut **tx)
            .await?;
        sqlx::query(self.sql(UPSERT_CURSOR))
            .bind(source)
            .bind(folder)
            .bind(i64::from(cursor.uid_validity))
            .bind(i64::from(cursor.last_uid))
            .bind(to_ms(now))
            .bind(i64::from(cursor.backfill_floor))
            .bind(i64::try_from(cursor.backfill_skipped).unwrap_or(i64::MAX))
            .bind(cursor.backfill_cutoff.map(to_ms))
            .execute(&mut **tx)
            .await?;
        Ok(out)
    }
}
