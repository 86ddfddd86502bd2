//! The durable queue: the only module with SQL.
//!
//! SQLite in WAL mode with `synchronous=FULL`, so a committed transaction has been fsync'd before
//! any caller acknowledges it (a webhook 2xx, an IMAP cursor). One writer connection serializes
//! writes inside the process; `BEGIN IMMEDIATE` serializes them against other processes (the CLI).
//! Readers use their own pool and never block the writer.

pub mod core;
mod digest;
mod imap;
pub mod lease;
mod messages;
pub mod metrics;
mod outbox;
pub mod webhook;

pub use digest::SourceRef;
pub use imap::{AccountedKind, AccountedUid, BatchOutcome, FolderLedger, ImapCursor, SourceHealth};
pub use messages::{Ingested, MessageFilter, StoredMessage};
pub use outbox::{NewOutboxItem, OutboxRow, insert_alert_event};

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};
use tokio_util::sync::CancellationToken;

/// Why a store operation failed; callers map `Unavailable` to "retry later" (503, backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database file or its directory cannot be created, opened or migrated.
    #[error("cannot open store {path}: {reason}")]
    Open {
        /// The database path.
        path: PathBuf,
        /// What went wrong, in words.
        reason: String,
    },
    /// The database refused a read or write (disk full, locked, I/O error); nothing was committed.
    #[error("store unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    /// A stored value could not be decoded (a bug or a hand-edited database).
    #[error("corrupt row in {table}: {reason}")]
    Corrupt {
        /// The table holding the row.
        table: &'static str,
        /// What could not be decoded.
        reason: String,
    },
    /// Another writer changed what a step read (a second daemon on the same database); nothing
    /// was committed and the step is retried on fresh data.
    #[error("concurrent change: {0}")]
    Conflict(String),
}

/// A handle to the durable queue; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    writer: SqlitePool,
    reader: SqlitePool,
    path: PathBuf,
    options: SqliteConnectOptions,
}

/// WAL frames (4 KiB pages) past which the daemon's checkpointer resets the WAL: 64 MiB.
pub const WAL_RESTART_FRAMES: i64 = 16_384;

/// The embedded schema migrations (`migrations/`), applied at every open.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Store, Error> {
        let open_err = |reason: String| Error::Open {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(format!("cannot create directory {}: {e}", dir.display())))?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| open_err(e.to_string()))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: the WAL is fsync'd at every commit. NORMAL may lose acknowledged commits on
            // power loss (reliability.md §2.1), which would break "nothing lost".
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .map_err(|e| open_err(describe_open_error(&e)))?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| open_err(format!("migration failed: {e}")))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(|e| open_err(describe_open_error(&e)))?;
        Ok(Store {
            writer,
            reader,
            path: path.to_path_buf(),
            options,
        })
    }

    /// The database file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a write transaction that takes the write lock up front (read-then-write safe).
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, Error> {
        match self.writer.begin_with("BEGIN IMMEDIATE").await {
            Err(sqlx::Error::InvalidSavePointStatement | sqlx::Error::BeginFailed) => {
                // A COMMIT that failed (disk full, I/O error) leaves sqlx's transaction depth at 1
                // while SQLite has already rolled back, so the drop-time ROLLBACK fails and the
                // connection can never begin again. Replace it with a fresh one.
                tracing::warn!("replacing the database writer connection after a failed commit");
                if let Ok(conn) = self.writer.acquire().await {
                    let _ = conn.close().await;
                }
                Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
            }
            other => Ok(other?),
        }
    }

    /// The pool for reads.
    pub(crate) fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    /// Runs `PRAGMA integrity_check` and returns its verdict (`ok` when healthy).
    pub async fn integrity_check(&self) -> Result<String, Error> {
        let rows: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check")
            .fetch_all(&self.writer)
            .await?;
        Ok(rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("; "))
    }

    /// Whether at least 1 MiB is free on the database's filesystem: a full disk is reported
    /// even while small commits still fit into WAL space already allocated.
    ///
    /// A `statvfs` call, not a trial write: `/readyz` and every watchdog ping ask, and writing
    /// and fsyncing a megabyte for each would be an I/O load anyone reaching `/readyz` could
    /// cause.
    pub(crate) async fn space_available(&self) -> bool {
        let dir = self
            .path()
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        free_bytes(dir).is_some_and(|n| n >= 1 << 20)
    }

    /// A small durable write that proves the database accepts commits, and room for 1 MiB more
    /// (for health and the watchdog).
    pub async fn write_probe(&self, now: DateTime<Utc>) -> Result<(), Error> {
        // The WAL is reused from its start after each checkpoint, so a small commit can succeed
        // on a full disk: the space check is what notices it.
        if !self.space_available().await {
            return Err(Error::Unavailable(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "less than 1 MiB free next to the database",
            ))));
        }
        sqlx::query("CREATE TABLE IF NOT EXISTS health_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL)")
            .execute(&self.writer)
            .await?;
        sqlx::query("INSERT INTO health_probe (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at")
            .bind(to_ms(now))
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Writes a consistent copy of the whole database to `to` while the daemon keeps running.
    ///
    /// `VACUUM INTO` reads one snapshot, so the copy is a committed state even mid-ingest; the
    /// target must not exist yet.
    pub async fn backup(&self, to: &Path) -> Result<(), Error> {
        if to.exists() {
            return Err(Error::Open {
                path: to.to_path_buf(),
                reason: "the backup target already exists".into(),
            });
        }
        let target = to.to_str().ok_or_else(|| Error::Open {
            path: to.to_path_buf(),
            reason: "the path is not valid UTF-8".into(),
        })?;
        sqlx::query("VACUUM INTO ?")
            .bind(target)
            .execute(&self.reader)
            .await?;
        Ok(())
    }

    /// Checkpoints the WAL from a connection of its own until `shutdown`, so commits no longer
    /// do it inline.
    ///
    /// SQLite's automatic checkpoint runs inside whichever COMMIT crosses 1,000 WAL pages: that
    /// commit then copies pages into the database file and fsyncs it, and every acknowledgement
    /// waiting on the single writer waits for it too. A PASSIVE checkpoint never blocks the writer;
    /// the WAL restarts from its beginning at the next write after a checkpoint caught up.
    ///
    /// `max_frames` bounds the WAL (see [`WAL_RESTART_FRAMES`], the daemon's choice).
    pub async fn run_checkpointer(
        &self,
        every: Duration,
        max_frames: i64,
        shutdown: CancellationToken,
    ) {
        use sqlx::{ConnectOptions, Connection};
        let mut conn = match self.options.clone().connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no checkpoint connection; commits checkpoint inline");
                return;
            }
        };
        // Per connection: a writer connection replaced after a failed commit checkpoints inline
        // again, which is only slower.
        if let Err(e) = sqlx::query("PRAGMA wal_autocheckpoint = 0")
            .execute(&self.writer)
            .await
        {
            tracing::warn!(error = %e, "cannot move checkpoints off the writer");
            return;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            let done: Result<(i64, i64, i64), _> = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut conn)
                .await;
            match done {
                // Under a steady stream of commits a passive checkpoint never catches the last
                // frame, so the WAL would never start over and would grow without bound (410 MiB
                // in a 10 s webhook flood). Past WAL_RESTART_FRAMES, one TRUNCATE checkpoint
                // waits for the writer, copies the few frames the passive ones left and resets
                // the file: a short stall, once per 64 MiB written.
                Ok((_, frames, _)) if frames > max_frames => {
                    // Through the writer pool: from another connection the reset would poll for
                    // the write lock between back-to-back commits and starve.
                    let reset: Result<(i64, i64, i64), _> =
                        sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                            .fetch_one(&self.writer)
                            .await;
                    if let Err(e) = reset {
                        tracing::debug!(error = %e, "WAL reset failed; retrying");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "WAL checkpoint failed; retrying"),
            }
        }
        let _ = sqlx::query("PRAGMA wal_autocheckpoint = 1000")
            .execute(&self.writer)
            .await;
        let _ = conn.close().await;
    }

    /// Closes both pools, checkpointing the WAL.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

/// Bytes available to this (unprivileged) user on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `st` is valid for statvfs to write a whole struct.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 or u64): widen both.
    #[allow(clippy::unnecessary_cast)]
    let (blocks, size) = (st.f_bavail as u64, st.f_frsize as u64);
    Some(blocks.saturating_mul(size))
}

/// Turns sqlx's open errors into a sentence that names the usual cause.
fn describe_open_error(e: &sqlx::Error) -> String {
    let text = e.to_string();
    if text.contains("unable to open database file") || text.contains("readonly") {
        format!("{text} (is the directory writable by this user?)")
    } else {
        text
    }
}

/// Milliseconds since the epoch: how every time is stored.
pub(crate) fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The inverse of `to_ms`; out-of-range values clamp to the epoch rather than fail a listing.
pub(crate) fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

#[cfg(test)]
mod tests;
