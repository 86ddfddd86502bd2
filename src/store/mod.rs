//! The durable queue: the only module with SQL.
//!
//! Two backends behind one API: SQLite (embedded, the default) or PostgreSQL (several replicas on
//! one database), an enum inside [`Store`].
//!
//! SQLite runs in WAL mode with `synchronous=FULL`, so a committed transaction has been fsync'd
//! before any caller acknowledges it. Two writes commit with `NORMAL` and are synced otherwise:
//! a webhook batch (its syncer fdatasyncs the WAL before any 2xx) and an IMAP batch (atomic with
//! its cursor, so a power loss only means fetching it again; `make_durable` ends each pass that wrote).
//! An IMAP batch's raw bytes go to the bodies file beside the database (`bodies`), appended under
//! that file's own lock and synced when the batch is staged, before its transaction begins. One
//! writer connection serializes writes inside the process; `BEGIN IMMEDIATE` serializes them
//! against other processes (the CLI). Readers use their own pool and never block the writer.
//!
//! PostgreSQL gives the same promise only with `fsync=on` and `synchronous_commit` not `off`;
//! [`Store::open_storage`] refuses to start otherwise. Most SQL is shared: each method's body is
//! compiled once per backend (`on_backend!`), and `?` placeholders are rewritten to `$n` for
//! PostgreSQL by [`Driver::sql`]. Where the dialects differ, the method picks its SQL by backend.

#[macro_use]
mod backend;
mod bodies;
mod body_digest;
pub mod copy;
#[cfg(test)]
#[macro_use]
pub(crate) mod test_pg;
pub mod core;
mod digest;
mod imap;
pub mod lease;
mod messages;
pub mod metrics;
mod outbox;
mod sqlite_raw;
mod wal_sync;
pub mod webhook;

pub use digest::SourceRef;
pub use imap::{
    AccountedKind, AccountedUid, BatchOutcome, FolderLedger, ImapCursor, SourceHealth, StagedBatch,
};
pub use messages::{Ingested, MessageFilter, StoredMessage};
pub use outbox::{NewOutboxItem, OutboxRow};

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use tokio_util::sync::CancellationToken;

pub(crate) use backend::{Driver, PgDb, Qb, SqliteDb, Tx};

use crate::config::Storage;

/// Pool options for every pool frontdesk opens: sqlx's defaults without its maintenance task.
///
/// sqlx (up to 0.9.0 at least) can wedge that task in a loop that never yields: `release`
/// makes a connection acquirable before it counts it idle, a concurrent pop can take the count
/// below zero, and the task's sweep `for _ in 0..num_idle()` then runs ~2^64 synchronous
/// iterations (transact-rs/sqlx#3645, fix in #4289). That pins a tokio worker at 100% CPU and,
/// with a task stranded in the worker's LIFO slot, hangs whatever waits on it: it hung a test of
/// ours for 16 minutes. With neither an idle timeout nor a maximum lifetime (and no minimum
/// connection count) sqlx spawns no such task. Nothing is lost by it: SQLite connections are
/// local files, and a PostgreSQL connection the server dropped is caught by
/// `test_before_acquire`.
pub fn pool_options<DB: sqlx::Database>() -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new()
        .idle_timeout(None)
        .max_lifetime(None)
        .min_connections(0)
}

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
    backend: Backend,
}

/// The database behind a [`Store`].
#[derive(Clone, Debug)]
pub(crate) enum Backend {
    /// The embedded SQLite file.
    Sqlite(SqliteDb),
    /// A PostgreSQL server shared by replicas.
    Postgres(PgDb),
}

/// The first key of frontdesk's two-key PostgreSQL advisory locks (`pg_advisory_xact_lock(ns,
/// n)`): the ASCII bytes "fd", so they stay apart from other applications' locks. Two-key and
/// one-key (`bigint`) advisory locks never collide with each other in PostgreSQL.
pub const PG_LOCK_NAMESPACE: i32 = 0x6664;

/// WAL frames (4 KiB pages) past which the daemon's checkpointer resets the WAL: 16 MiB.
///
/// The WAL reset held the single writer for a time that grew with the WAL's size, not with the
/// frames copied (8-19 ms at 16 MiB, 23-42 ms at 64 MiB, more at 256 MiB, in bench/webhook.sh):
/// every webhook acknowledgement waited that long. At 64 MiB those stalls made the webhook p99
/// 27-31 ms; at 16 MiB 18-23 ms. Most of that cost was truncating the WAL file at each reset
/// (see `journal_size_limit` in the checkpointer), which now only happens past four times this.
pub const WAL_RESTART_FRAMES: i64 = 4_096;

/// The embedded SQLite schema migrations (`migrations/sqlite/`), applied at every open.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The embedded PostgreSQL schema migrations (`migrations/postgres/`), applied at every open.
static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Store {
    /// Opens the configured storage: the SQLite file or the PostgreSQL database.
    pub async fn open_storage(storage: &Storage) -> Result<Store, Error> {
        match storage {
            Storage::Sqlite(path) => Store::open(path).await,
            Storage::Postgres(pg) => {
                Store::open_postgres(&pg.url, pg.password.as_ref().map(|p| p.expose())).await
            }
        }
    }

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
            .foreign_keys(true)
            // 1 MiB of page cache per connection instead of SQLite's 2 MB: the writer's holds
            // mostly leaf pages rows were just appended to, and the readers' queries are served
            // from the OS's cache as well. `frontdesk sync` of the bench's 10,000 messages peaked
            // at 30.2 MB RSS instead of 31.4 (the IMAP target is < 32 MB), in the same time
            // (median 1.56 s against 1.62, alternating runs).
            .pragma("cache_size", "-1024");
        // No ping before each acquire: sqlx already pings a connection when it comes back to the
        // pool, and a local SQLite connection has no network to lose in between. On the single
        // writer the extra round trip through sqlx's worker was on every writer's path.
        let writer = pool_options::<sqlx::Sqlite>()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .map_err(|e| open_err(describe_open_error(&e)))?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| open_err(format!("migration failed: {e}")))?;
        let reader = pool_options::<sqlx::Sqlite>()
            .max_connections(4)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(|e| open_err(describe_open_error(&e)))?;
        Ok(Store {
            backend: Backend::Sqlite(SqliteDb {
                writer,
                reader,
                path: path.to_path_buf(),
                options: Box::new(options),
                bodies: std::sync::Arc::new(bodies::BodyFile::beside(path)),
            }),
        })
    }

    /// Connects to PostgreSQL at `url` (with `password` when given apart from the URL), checks
    /// that commits are durable there, and applies pending migrations.
    ///
    /// Refuses a server with `fsync=off` or `synchronous_commit=off`: a 2xx would then not mean
    /// "on disk" (reliability.md §2.2).
    pub async fn open_postgres(url: &str, password: Option<&str>) -> Result<Store, Error> {
        let shown = redact_url(url);
        let open_err = |reason: String| Error::Open {
            path: PathBuf::from(&shown),
            reason,
        };
        let mut options = PgConnectOptions::from_str(url).map_err(|e| open_err(e.to_string()))?;
        if let Some(p) = password {
            options = options.password(p);
        }
        let pool = pool_options::<sqlx::Postgres>()
            .max_connections(16)
            // While the server is down, acquiring retries the connection until this timeout: the
            // bound on how long a webhook waits for its 503 (reliability.md L1: never > 3 s).
            .acquire_timeout(Duration::from_secs(2))
            // A server restart leaves dead connections in the pool; test before handing out so
            // the first request after an outage does not fail on a stale socket.
            .test_before_acquire(true)
            .connect_with(options)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        check_durability(&pool).await.map_err(open_err)?;
        PG_MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| open_err(format!("migration failed: {e}")))?;
        Ok(Store {
            backend: Backend::Postgres(PgDb { pool }),
        })
    }

    /// `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The PostgreSQL pool (advisory-lock leases need their own sessions from it); `None` on
    /// SQLite.
    pub fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(pg) => Some(&pg.pool),
        }
    }

    /// The SQLite backend, for code and tests that only make sense there.
    pub(crate) fn sqlite(&self) -> Option<&SqliteDb> {
        match &self.backend {
            Backend::Sqlite(db) => Some(db),
            Backend::Postgres(_) => None,
        }
    }

    /// The database file path; `None` on PostgreSQL.
    pub fn path(&self) -> Option<&Path> {
        self.sqlite().map(|db| db.path.as_path())
    }

    /// Runs SQLite's `PRAGMA integrity_check` and returns its verdict (`ok` when healthy);
    /// PostgreSQL checks its own pages, so there it is a round trip that answers `ok`.
    pub async fn integrity_check(&self) -> Result<String, Error> {
        match &self.backend {
            Backend::Sqlite(db) => {
                let rows: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check")
                    .fetch_all(&db.writer)
                    .await?;
                Ok(rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("; "))
            }
            Backend::Postgres(db) => {
                let (ok,): (String,) = sqlx::query_as("SELECT 'ok'").fetch_one(&db.pool).await?;
                Ok(ok)
            }
        }
    }

    /// Whether at least 1 MiB is free on the database's filesystem: a full disk is reported
    /// even while small commits still fit into WAL space already allocated. Always true on
    /// PostgreSQL, whose server reports a full disk as a failed commit.
    ///
    /// A `statvfs` call, not a trial write: `/readyz` and every watchdog ping ask, and writing
    /// and fsyncing a megabyte for each would be an I/O load anyone reaching `/readyz` could
    /// cause.
    pub(crate) async fn space_available(&self) -> bool {
        let Some(path) = self.path() else {
            return true;
        };
        let dir = path
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
        match &self.backend {
            Backend::Sqlite(db) => {
                sqlx::query("CREATE TABLE IF NOT EXISTS health_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL)")
                    .execute(&db.writer)
                    .await?;
            }
            // Created by the PostgreSQL migration: a DDL statement per probe would take an
            // exclusive lock on the catalog every few seconds on every replica.
            Backend::Postgres(_) => {}
        }
        on_backend!(self, |db| {
            sqlx::query(db.sql("INSERT INTO health_probe (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at"))
                .bind(to_ms(now))
                .execute(db.writer())
                .await?;
        });
        Ok(())
    }

    /// Writes a consistent copy of the whole SQLite database to `to` while the daemon keeps
    /// running; on PostgreSQL, use the server's own tools (`pg_dump`).
    ///
    /// `VACUUM INTO` reads one snapshot, so the copy is a committed state even mid-ingest; the
    /// target must not exist yet. Bodies kept in the bodies file (`store::bodies`) are moved into
    /// the copy, which is then the whole store in one file.
    pub async fn backup(&self, to: &Path) -> Result<(), Error> {
        let Some(db) = self.sqlite() else {
            return Err(Error::Open {
                path: to.to_path_buf(),
                reason: "backup copies SQLite databases; use pg_dump for PostgreSQL".into(),
            });
        };
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
            .execute(&db.reader)
            .await?;
        db.inline_bodies(to).await
    }

    /// Checkpoints the SQLite WAL from a connection of its own until `shutdown`, so commits no
    /// longer do it inline. Returns at once on PostgreSQL, which checkpoints by itself.
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
        if let Some(db) = self.sqlite() {
            db.run_checkpointer(every, max_frames, shutdown).await;
        }
    }

    /// Closes the pools (on SQLite, checkpointing the WAL).
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(db) => {
                db.reader.close().await;
                db.writer.close().await;
            }
            Backend::Postgres(db) => db.pool.close().await,
        }
    }
}

impl SqliteDb {
    /// Moves every body the copy at `to` keeps in the bodies file into its `raw` column, so a
    /// backup is one self-contained file. The bodies file is only ever appended to, so every
    /// place the copy's snapshot points at is there.
    async fn inline_bodies(&self, to: &Path) -> Result<(), Error> {
        use sqlx::{ConnectOptions, Connection};
        /// Rows per transaction: bounds the memory held (bodies up to the IMAP size limit).
        const ROWS: i64 = 200;
        let mut copy = SqliteConnectOptions::new()
            .filename(to)
            .synchronous(SqliteSynchronous::Full)
            .connect()
            .await?;
        loop {
            let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(
                "SELECT id, body_at, body_len, raw_digest FROM messages \
                 WHERE body_at IS NOT NULL ORDER BY id LIMIT ?",
            )
            .bind(ROWS)
            .fetch_all(&mut copy)
            .await?;
            if rows.is_empty() {
                break;
            }
            let mut tx = copy.begin().await?;
            for (id, at, len, sha) in rows {
                let raw = self.read_body(id, at, len).await?;
                messages::check_body(id, &raw, &sha)?;
                sqlx::query(
                    "UPDATE messages SET raw = ?, body_at = NULL, body_len = NULL WHERE id = ?",
                )
                .bind(raw)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        }
        copy.close().await?;
        Ok(())
    }

    async fn run_checkpointer(
        &self,
        every: Duration,
        max_frames: i64,
        shutdown: CancellationToken,
    ) {
        use sqlx::{ConnectOptions, Connection};
        let mut conn = match (*self.options).clone().connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no checkpoint connection; commits checkpoint inline");
                return;
            }
        };
        // Per connection: a writer connection replaced after a failed commit checkpoints inline
        // again, which is only slower.
        // journal_size_limit: when the WAL starts over, a file larger than four times the bound
        // is cut back. Not to the bound itself: the WAL grows a little past `max_frames` before
        // each reset, so a limit at the bound truncated the file at every reset, on the commit
        // that acknowledges webhooks, and freeing those blocks cost more than copying the frames
        // (bench/webhook.sh p99 18-23 ms with it, 15-16 ms without).
        let limit = format!(
            "PRAGMA journal_size_limit = {}",
            max_frames.saturating_mul(4 * 4096)
        );
        // an integer formatted in: nothing to inject
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(limit))
            .execute(&self.writer)
            .await
        {
            tracing::warn!(error = %e, "cannot bound the WAL file's size");
        }
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
                // in a 10 s webhook flood). Past `max_frames`, one more PASSIVE checkpoint runs
                // on the writer connection itself: nothing can append meanwhile, so it copies the
                // few frames the others left, and the next write starts the WAL over (trimmed to
                // `journal_size_limit`). It waits for no reader, unlike a TRUNCATE checkpoint,
                // whose busy-handler sleeps stalled every acknowledgement for ~50 ms per 64 MiB.
                Ok((_, frames, _)) if frames > max_frames => {
                    let caught_up: Result<(i64, i64, i64), _> =
                        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                            .fetch_one(&self.writer)
                            .await;
                    if let Err(e) = caught_up {
                        tracing::debug!(error = %e, "WAL catch-up checkpoint failed; retrying");
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

/// Refuses a PostgreSQL server that may lose acknowledged commits: `fsync` must be `on` and
/// `synchronous_commit` must not be `off` (`local`, `remote_write`, `on` and `remote_apply`
/// all flush the local WAL before COMMIT returns).
async fn check_durability(pool: &sqlx::PgPool) -> Result<(), String> {
    let (fsync,): (String,) = sqlx::query_as("SHOW fsync")
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
    if fsync != "on" {
        return Err(format!(
            "the server runs with fsync={fsync}, so a commit may be lost on a crash; \
             set fsync = on in postgresql.conf and reload"
        ));
    }
    let (sync,): (String,) = sqlx::query_as("SHOW synchronous_commit")
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
    if sync == "off" {
        return Err(
            "synchronous_commit is off for this connection, so a webhook could be acknowledged \
             before its commit is on disk; set synchronous_commit = on (server, database or role: \
             ALTER ROLE ... SET synchronous_commit = on)"
                .into(),
        );
    }
    Ok(())
}

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", q.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
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
