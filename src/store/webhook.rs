//! Webhook group commit: many concurrent deliveries share one transaction and one fsync.
//!
//! One writer thread owns the write path. Each request sends its message over a bounded channel
//! with a oneshot for the answer. The writer takes whatever has queued up (no added wait: requests
//! that arrive during a commit form the next batch) and inserts them all in one `BEGIN IMMEDIATE`
//! transaction. On SQLite the transaction is stepped in place on the writer connection's raw
//! handle ([`super::sqlite_raw`] says why); the commit writes the WAL frames without fsyncing them
//! (`synchronous=NORMAL` for this transaction only). A syncer thread then fsyncs the WAL
//! ([`super::wal_sync`]) and only after that answers each waiter, while the writer already commits
//! the next batch. If anything in the batch fails, the transaction rolls back and every waiter
//! gets `Unavailable` (503): nobody is told "stored" unless their own row is on disk. A failed
//! fsync is fatal: the page cache can no longer be trusted, so the process exits for systemd to
//! restart it from what is on disk.
//!
//! Why threads rather than tasks: under load the writer commits a batch every millisecond or two,
//! and each commit used to pay for taking the single writer connection from the pool (sqlx pings
//! it on every release), locking its handle (a round trip through sqlx's worker thread), moving
//! off the tokio worker (`block_in_place`) and preparing its statements again. The writer thread
//! instead holds the connection, its lock and its prepared statements across consecutive batches
//! for up to [`HOLD`], giving the connection back as soon as the queue runs dry so the core and
//! the IMAP sources get their turn. The raw handle and statements can live across batches only on
//! a thread of their own: they are not `Send`, so no tokio task could keep them between awaits.
//!
//! On PostgreSQL the commit itself returns after the server flushed its WAL
//! (`synchronous_commit` is checked at start), so the syncer only answers.
//!
//! Counters live in the same transaction as the rows they count. Rejections (401) have no row:
//! they are tallied in memory and written with the next batch; the first rejection after a
//! commit asks the writer for one (see [`WebhookWriter::count`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use tokio::sync::oneshot;

use super::backend::{Driver, PgDb, SqliteDb};
use super::messages::RawMessageInserter;
use super::sqlite_raw::{RawDb, Stmt, Value};
use super::wal_sync::WalFile;
use super::{Error, Ingested, Store, from_ms, to_ms};
use crate::health::Health;
use crate::message::Message;

/// Deliveries waiting in the channel before new requests are refused with 503.
const QUEUE_DEPTH: usize = 4096;

/// The most deliveries one transaction takes.
const MAX_BATCH: usize = 512;

/// While an earlier batch is being fsync'd, the writer keeps gathering until it has this many
/// deliveries (or the fsync ends) before committing: a commit has a fixed cost in pages and
/// round trips that a handful of rows would not amortize.
const GATHER: usize = 32;

/// The longest the SQLite writer keeps the single writer connection across consecutive batches.
/// Everything else that writes (the core loop, IMAP sources, the outbox, the checkpointer) waits
/// at most this long plus one batch for its turn.
const HOLD: Duration = Duration::from_millis(10);

/// After a commit, with an fsync in flight but nothing queued, the SQLite writer waits this long
/// for the requests that the fsync's answers will bring before giving the connection back.
const LINGER: Duration = Duration::from_millis(2);

/// How long replay tokens are kept (longer than any configured tolerance window).
const TOKEN_RETENTION: chrono::Duration = chrono::Duration::days(2);

/// Why a delivery was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// The commit failed or the writer is gone; nothing of this batch was stored. Retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The writer's queue is full; retry later.
    #[error("ingest queue full")]
    Busy,
    /// A one-time token was already used by another delivery (a replay).
    #[error("token already used")]
    TokenReused,
}

/// One delivery to store.
#[derive(Debug)]
pub struct WebhookDelivery {
    /// The normalized message (its origin is the dedupe key).
    pub message: Message,
    /// A one-time token to record and refuse with another delivery (Mailgun).
    pub replay_token: Option<String>,
}

struct Job {
    delivery: WebhookDelivery,
    reply: oneshot::Sender<Result<Ingested, IngestError>>,
}

/// What the writer thread receives.
enum Msg {
    /// A delivery to store (boxed: the channel's slots stay small).
    Job(Box<Job>),
    /// Rejection counts are waiting to be written.
    Flush,
    /// The syncer finished an fsync: a gathering writer stops waiting for more deliveries.
    Synced,
    /// Every [`WebhookWriter`] is gone: finish what is queued, then stop.
    Stop,
    /// Fault injection for the test that a dead writer thread is reported; no server or input
    /// can make the writer panic on purpose.
    #[cfg(test)]
    Panic,
}

/// Rejections not yet written: (source, counter name) -> count.
type Pending = Arc<Mutex<HashMap<(String, String), i64>>>;

/// The sending side of the group-commit writer; cheap to clone.
#[derive(Clone)]
pub struct WebhookWriter {
    inner: Arc<WriterHandle>,
}

/// Shared by every clone of a [`WebhookWriter`]; the last one to go stops the writer thread.
struct WriterHandle {
    jobs: std_mpsc::SyncSender<Msg>,
    pending: Pending,
    /// Set when a [`Msg::Flush`] is queued and the writer has not yet taken the counts.
    flush_asked: Arc<AtomicBool>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        // Behind every queued delivery, so all of them are still answered.
        let _ = self.jobs.send(Msg::Stop);
    }
}

impl WebhookWriter {
    /// Stores one delivery; returns only after its transaction is durably committed.
    pub async fn ingest(&self, delivery: WebhookDelivery) -> Result<Ingested, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .jobs
            .try_send(Msg::Job(Box::new(Job { delivery, reply })))
            .map_err(|e| match e {
                std_mpsc::TrySendError::Full(_) => IngestError::Busy,
                std_mpsc::TrySendError::Disconnected(_) => {
                    IngestError::Unavailable("writer stopped".into())
                }
            })?;
        answer
            .await
            .unwrap_or_else(|_| Err(IngestError::Unavailable("writer stopped".into())))
    }

    /// Counts a request that was not stored (`rejected:<reason>`, `ignored`, `invalid`).
    pub fn count(&self, source: &str, counter: &str) {
        if let Ok(mut p) = self.inner.pending.lock() {
            *p.entry((source.to_string(), counter.to_string()))
                .or_insert(0) += 1;
        }
        // One flush request in the queue at a time, however many 401s arrive: a flood of bad
        // signatures must not fill the queue that real deliveries need. If the queue is full the
        // counts go with the next batch, which is then close.
        if !self.inner.flush_asked.swap(true, Ordering::SeqCst)
            && self.inner.jobs.try_send(Msg::Flush).is_err()
        {
            self.inner.flush_asked.store(false, Ordering::SeqCst);
        }
    }
}

/// Per-source webhook counters as `frontdesk sources` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WebhookCounters {
    /// The source name.
    pub source: String,
    /// Deliveries stored as new rows.
    pub accepted: i64,
    /// Deliveries whose id was already stored (answered with the same id).
    pub duplicates: i64,
    /// Everything else by counter name (`rejected:bad_signature`, `ignored`, `invalid`).
    pub other: Vec<(String, i64)>,
    /// The last accepted or duplicate delivery.
    pub last_delivery_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Starts the group-commit writer and syncer threads; they stop when every `WebhookWriter`
    /// is dropped. Must be called within a tokio runtime (the writer uses it for the store's
    /// async calls). A thread that dies reports to `health` (see [`ThreadWatch`]).
    pub fn spawn_webhook_writer(
        &self,
        wake_core: Arc<tokio::sync::Notify>,
        health: Arc<Health>,
    ) -> WebhookWriter {
        let (jobs, rx) = std_mpsc::sync_channel(QUEUE_DEPTH);
        let pending: Pending = Arc::default();
        let flush_asked = Arc::new(AtomicBool::new(false));
        let (synced_tx, synced_rx) = std_mpsc::channel();
        // PostgreSQL's commit already waited for its WAL flush: nothing for the syncer to sync.
        let wal = self.path().map(|db| Arc::new(WalFile::beside(db)));
        let syncing = Arc::new(Syncing::default());
        let writer = Writer {
            store: self.clone(),
            rt: tokio::runtime::Handle::current(),
            rx,
            pending: pending.clone(),
            flush_asked: flush_asked.clone(),
            synced: synced_tx,
            syncing: syncing.clone(),
            disk_full: None,
            stop: false,
        };
        let nudge = jobs.clone();
        let syncer_watch = ThreadWatch::start(health.clone(), SYNCER_TASK);
        let writer_watch = ThreadWatch::start(health.clone(), WRITER_TASK);
        let spawned = std::thread::Builder::new()
            .name(SYNCER_TASK.into())
            .spawn(move || {
                let _watch = syncer_watch;
                run_syncer(wal, synced_rx, syncing, wake_core, nudge)
            })
            .and_then(|_| {
                std::thread::Builder::new()
                    .name(WRITER_TASK.into())
                    .spawn(move || {
                        let _watch = writer_watch;
                        writer.run()
                    })
            });
        if let Err(e) = spawned {
            // Without the threads every delivery is answered 503 ("writer stopped"): the channel's
            // receiver is gone with the closure that failed to start.
            tracing::error!(error = %e, "could not start the webhook writer threads");
            health.failed(WRITER_TASK, &format!("thread not started: {e}"), Utc::now());
            health.busy_until(WRITER_TASK, std::time::Instant::now());
        }
        WebhookWriter {
            inner: Arc::new(WriterHandle {
                jobs,
                pending,
                flush_asked,
            }),
        }
    }

    /// Webhook counters for every source that has any.
    pub async fn webhook_counters(&self) -> Result<Vec<WebhookCounters>, Error> {
        on_backend!(self, |db| {
            let mut by_source: HashMap<String, WebhookCounters> = HashMap::new();
            let rows = sqlx::query(db.sql("SELECT source, name, value FROM webhook_counters"))
                .fetch_all(db.reader())
                .await?;
            for r in rows {
                let source: String = r.try_get("source")?;
                let name: String = r.try_get("name")?;
                let value: i64 = r.try_get("value")?;
                let c = by_source
                    .entry(source.clone())
                    .or_insert_with(|| WebhookCounters {
                        source,
                        ..WebhookCounters::default()
                    });
                match name.as_str() {
                    "accepted" => c.accepted = value,
                    "duplicates" => c.duplicates = value,
                    _ => c.other.push((name, value)),
                }
            }
            let rows = sqlx::query(db.sql("SELECT source, last_delivery_at FROM webhook_activity"))
                .fetch_all(db.reader())
                .await?;
            for r in rows {
                let source: String = r.try_get("source")?;
                let at: i64 = r.try_get("last_delivery_at")?;
                by_source
                    .entry(source.clone())
                    .or_insert_with(|| WebhookCounters {
                        source,
                        ..WebhookCounters::default()
                    })
                    .last_delivery_at = Some(from_ms(at));
            }
            let mut out: Vec<_> = by_source.into_values().collect();
            out.sort_by(|a, b| a.source.cmp(&b.source));
            for c in &mut out {
                c.other.sort();
            }
            Ok(out)
        })
    }
}

/// The writer thread's name in `Health` (and the thread's own name).
const WRITER_TASK: &str = "webhook-writer";
/// The syncer thread's name in `Health`.
const SYNCER_TASK: &str = "webhook-syncer";

/// Owned by a writer or syncer thread, so its end is reported whichever way the thread ends.
///
/// Without it a panicking writer would leave every delivery answered 503 ("writer stopped")
/// while `/readyz` and the systemd watchdog saw nothing wrong. A panic marks the task failed and
/// past its deadline: `/readyz` answers 503 and the watchdog stops being fed, so systemd restarts
/// the daemon. A requested stop (every `WebhookWriter` dropped) just unregisters it.
struct ThreadWatch {
    health: Arc<Health>,
    task: &'static str,
}

impl ThreadWatch {
    fn start(health: Arc<Health>, task: &'static str) -> ThreadWatch {
        health.ok(task, Utc::now());
        ThreadWatch { health, task }
    }
}

impl Drop for ThreadWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                task = self.task,
                "webhook thread panicked; deliveries are answered 503 until a restart"
            );
            self.health
                .failed(self.task, "thread panicked; restart needed", Utc::now());
            self.health.busy_until(self.task, std::time::Instant::now());
        } else {
            self.health.remove(self.task);
        }
    }
}

/// Batches handed to the syncer and not yet answered, and whether the writer waits for an fsync.
#[derive(Default)]
struct Syncing {
    outstanding: AtomicUsize,
    /// Set by a gathering writer; the syncer then sends [`Msg::Synced`] at the end of its fsync.
    writer_waits: AtomicBool,
}

/// A batch committed but not yet fsync'd: whom to answer, and with what, once it is on disk.
struct Committed {
    replies: Vec<Reply>,
}

/// One waiter of a committed batch.
struct Reply {
    to: oneshot::Sender<Result<Ingested, IngestError>>,
    result: Result<Ingested, IngestError>,
    source: String,
    received_at: DateTime<Utc>,
}

/// Fsyncs the WAL for every batch committed since the last fsync, then answers their waiters.
fn run_syncer(
    wal: Option<Arc<WalFile>>,
    rx: std_mpsc::Receiver<Committed>,
    syncing: Arc<Syncing>,
    wake_core: Arc<tokio::sync::Notify>,
    nudge: std_mpsc::SyncSender<Msg>,
) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let batches = group.len();
        let failure = wal.as_ref().and_then(|file| file.sync().err());
        let now = Utc::now();
        let mut stored = false;
        for reply in group.into_iter().flat_map(|c| c.replies) {
            if failure.is_some() {
                let _ = reply
                    .to
                    .send(Err(IngestError::Unavailable("fsync failed".into())));
                continue;
            }
            let latency = (now - reply.received_at).num_microseconds().unwrap_or(0);
            metrics::histogram!("frontdesk_ingest_latency_seconds", "source" => reply.source)
                .record(latency as f64 / 1e6);
            stored |= reply.result.is_ok();
            let _ = reply.to.send(reply.result);
        }
        syncing.outstanding.fetch_sub(batches, Ordering::SeqCst);
        if syncing.writer_waits.swap(false, Ordering::SeqCst) {
            // A full queue already wakes the writer.
            let _ = nudge.try_send(Msg::Synced);
        }
        if let Some(e) = failure {
            // After a failed fsync the kernel may have dropped the dirty pages and a later fsync
            // can succeed without them (PostgreSQL's "fsyncgate"): never retry and claim success.
            // Exit so systemd restarts the daemon from what is on disk; the waiters above got 503
            // and their providers retry.
            tracing::error!(error = %e, "fsync of the database WAL failed; exiting to recover from disk");
            std::process::exit(1);
        }
        if stored {
            wake_core.notify_one();
        }
    }
}

/// A batch to commit: the deliveries and the rejection counts taken with them.
struct Batch {
    jobs: Vec<Job>,
    counts: HashMap<(String, String), i64>,
}

/// The writer thread's state.
struct Writer {
    store: Store,
    /// For the store's async calls (taking the connection, PostgreSQL commits).
    rt: tokio::runtime::Handle,
    rx: std_mpsc::Receiver<Msg>,
    pending: Pending,
    flush_asked: Arc<AtomicBool>,
    synced: std_mpsc::Sender<Committed>,
    syncing: Arc<Syncing>,
    /// Set when a commit failed because the disk is full. Until a space probe succeeds, nothing
    /// is attempted: a small write squeezing into freed pages would otherwise flip answers
    /// between 2xx and 503 while the disk stays full (reliability.md D7: no 2xx after a failed
    /// commit).
    disk_full: Option<std::time::Instant>,
    /// A [`Msg::Stop`] was received: finish the batch in hand, then exit.
    stop: bool,
}

impl Writer {
    /// Commits batches until every [`WebhookWriter`] is gone.
    fn run(mut self) {
        // Dropping a pooled connection spawns the task that returns it to the pool.
        let rt = self.rt.clone();
        let _entered = rt.enter();
        while !self.stop {
            let first = match self.rx.recv() {
                Ok(msg) => first_job(msg, &mut self.stop),
                Err(_) => {
                    self.stop = true;
                    None
                }
            };
            let Some(batch) = self.gather(first) else {
                continue;
            };
            let Some(batch) = self.unless_disk_full(batch) else {
                continue;
            };
            match self.store.backend.clone() {
                super::Backend::Sqlite(db) => self.sqlite_session(&db, batch),
                super::Backend::Postgres(db) => {
                    let started = std::time::Instant::now();
                    let outcome =
                        self.rt
                            .block_on(db.commit_batch(&batch.jobs, &batch.counts, Utc::now()));
                    self.finish(batch, outcome, started);
                }
            }
        }
    }

    /// Takes `first` and whatever else has queued up, waiting for more while an fsync is in
    /// flight (up to [`GATHER`]); `None` when there is nothing to write.
    fn gather(&mut self, first: Option<Job>) -> Option<Batch> {
        let mut jobs: Vec<Job> = first.into_iter().collect();
        while jobs.len() < MAX_BATCH && !self.stop {
            match self.rx.try_recv() {
                Ok(msg) => {
                    take(msg, &mut jobs, &mut self.stop);
                }
                Err(_) => break,
            }
        }
        // Nobody waits on this commit while the syncer is still busy with an earlier batch:
        // gather more first. The flag is raised before the check, so the end of a sync that
        // happens in between still sends its nudge.
        while !jobs.is_empty() && jobs.len() < GATHER && !self.stop {
            self.syncing.writer_waits.store(true, Ordering::SeqCst);
            if self.syncing.outstanding.load(Ordering::SeqCst) == 0 {
                break;
            }
            match self.rx.recv() {
                Ok(msg) => {
                    if !take(msg, &mut jobs, &mut self.stop) {
                        break;
                    }
                }
                Err(_) => {
                    self.stop = true;
                    break;
                }
            }
        }
        self.syncing.writer_waits.store(false, Ordering::SeqCst);
        // Cleared before the counts are taken: a rejection counted after this asks again.
        self.flush_asked.store(false, Ordering::SeqCst);
        let counts = take_pending(&self.pending);
        if jobs.is_empty() && counts.is_empty() {
            return None;
        }
        Some(Batch { jobs, counts })
    }

    /// While the disk is full, answers `batch` with 503 without trying it, until a space probe
    /// (at most every 500 ms) finds room again; otherwise gives the batch back.
    fn unless_disk_full(&mut self, batch: Batch) -> Option<Batch> {
        let Some(checked) = self.disk_full else {
            return Some(batch);
        };
        if checked.elapsed() >= Duration::from_millis(500) {
            if self.rt.block_on(self.store.space_available()) {
                tracing::info!("disk space is back; webhook commits resume");
                self.disk_full = None;
                return Some(batch);
            }
            self.disk_full = Some(std::time::Instant::now());
        }
        restore_pending(&self.pending, batch.counts);
        for job in batch.jobs {
            let _ = job
                .reply
                .send(Err(IngestError::Unavailable("disk full".into())));
        }
        None
    }

    /// Commits `batch` on the single SQLite writer connection, then keeps the connection, its
    /// lock and the prepared statements for the batches queued right behind it, up to [`HOLD`].
    fn sqlite_session(&mut self, db: &SqliteDb, batch: Batch) {
        let started = std::time::Instant::now();
        let mut conn = match self.rt.block_on(db.writer.acquire()) {
            Ok(c) => c,
            Err(e) => return self.finish(batch, Err(e.into()), started),
        };
        let mut failed = false;
        {
            let mut handle = match self.rt.block_on(conn.lock_handle()) {
                Ok(h) => h,
                Err(e) => return self.finish(batch, Err(e.into()), started),
            };
            // SAFETY: `handle` locks the connection until the end of this block: sqlx's worker
            // makes no call on it meanwhile, and the statements below are dropped first.
            let raw = unsafe { RawDb::new(handle.as_raw_handle()) };
            let mut stmts = None;
            let mut next = Some(batch);
            while let Some(batch) = next.take() {
                let began = std::time::Instant::now();
                let outcome = match &mut stmts {
                    Some(s) => commit_raw(&raw, s, &batch.jobs, &batch.counts, Utc::now()),
                    None => match BatchStatements::prepare(&raw) {
                        Ok(s) => commit_raw(
                            &raw,
                            stmts.insert(s),
                            &batch.jobs,
                            &batch.counts,
                            Utc::now(),
                        ),
                        Err(e) => Err(e.into()),
                    },
                };
                failed = outcome.is_err();
                self.finish(batch, outcome, began);
                if failed || self.stop || started.elapsed() >= HOLD {
                    break;
                }
                next = self.next_in_session();
            }
        }
        if failed {
            // Its synchronous setting or transaction state is unknown: the pool opens a fresh
            // connection with the options' FULL rather than hand this one to another writer.
            conn.close_on_drop();
        }
    }

    /// The batch queued right behind the one just committed, if any arrives soon enough to be
    /// worth keeping the writer connection for.
    fn next_in_session(&mut self) -> Option<Batch> {
        let msg = match self.rx.try_recv() {
            Ok(msg) => msg,
            Err(std_mpsc::TryRecvError::Disconnected) => return None,
            Err(std_mpsc::TryRecvError::Empty) => {
                if self.syncing.outstanding.load(Ordering::SeqCst) == 0 {
                    return None;
                }
                self.rx.recv_timeout(LINGER).ok()?
            }
        };
        let first = first_job(msg, &mut self.stop);
        // A batch taken here is committed even if it is empty (only rejection counts): the
        // session is open anyway. The disk is known to have room: a failure ended the session.
        self.gather(first)
    }

    /// Hands a committed batch to the syncer, or answers every delivery of a failed one with 503.
    fn finish(
        &mut self,
        batch: Batch,
        outcome: Result<Vec<Result<Ingested, IngestError>>, Error>,
        started: std::time::Instant,
    ) {
        // Batch size and commit time tell an operator whether acknowledgements wait on the disk
        // (long commits) or on the HTTP side (small batches).
        metrics::histogram!("frontdesk_webhook_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("frontdesk_webhook_batch_deliveries").record(batch.jobs.len() as f64);
        match outcome {
            Ok(results) => {
                let replies = batch
                    .jobs
                    .into_iter()
                    .zip(results)
                    .map(|(job, result)| Reply {
                        to: job.reply,
                        result,
                        source: job.delivery.message.source,
                        received_at: job.delivery.message.received_at,
                    })
                    .collect();
                self.syncing.outstanding.fetch_add(1, Ordering::SeqCst);
                if let Err(std_mpsc::SendError(c)) = self.synced.send(Committed { replies }) {
                    self.syncing.outstanding.fetch_sub(1, Ordering::SeqCst);
                    for reply in c.replies {
                        let _ = reply
                            .to
                            .send(Err(IngestError::Unavailable("syncer stopped".into())));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, deliveries = batch.jobs.len(), "webhook batch not stored");
                // SQLITE_FULL, or an I/O error (ENOSPC surfaces as either) with no room left.
                if is_disk_full(&e) || !self.rt.block_on(self.store.space_available()) {
                    self.disk_full = Some(std::time::Instant::now());
                }
                restore_pending(&self.pending, batch.counts);
                let text = e.to_string();
                for job in batch.jobs {
                    let _ = job.reply.send(Err(IngestError::Unavailable(text.clone())));
                }
            }
        }
    }
}

/// Adds a queued message to a gathering batch; false when gathering should stop (an fsync ended,
/// or the writer is told to stop).
fn take(msg: Msg, jobs: &mut Vec<Job>, stop: &mut bool) -> bool {
    let ends_gathering = matches!(msg, Msg::Synced | Msg::Stop);
    if let Some(job) = first_job(msg, stop) {
        jobs.push(job);
    }
    !ends_gathering
}

/// The delivery a message carries, if any; a [`Msg::Stop`] sets `stop`.
fn first_job(msg: Msg, stop: &mut bool) -> Option<Job> {
    match msg {
        Msg::Job(job) => Some(*job),
        Msg::Flush | Msg::Synced => None,
        Msg::Stop => {
            *stop = true;
            None
        }
        #[cfg(test)]
        Msg::Panic => panic!("fault injected by a test: the webhook writer thread dies"),
    }
}

/// SQLITE_FULL (13): the database or disk is full.
fn is_disk_full(e: &Error) -> bool {
    match e {
        Error::Unavailable(sqlx::Error::Database(db)) => db.code().as_deref() == Some("13"),
        _ => false,
    }
}

fn take_pending(pending: &Pending) -> HashMap<(String, String), i64> {
    pending
        .lock()
        .map(|mut p| std::mem::take(&mut *p))
        .unwrap_or_default()
}

fn restore_pending(pending: &Pending, counts: HashMap<(String, String), i64>) {
    if let Ok(mut p) = pending.lock() {
        for (k, v) in counts {
            *p.entry(k).or_insert(0) += v;
        }
    }
}

// The batch's statements, shared by the SQLite (raw handle) and PostgreSQL (sqlx) paths so the
// two cannot drift apart; `?` placeholders are rewritten for PostgreSQL by `sql()`.
/// The origin a one-time token was first used with.
const TOKEN_SEEN: &str =
    "SELECT origin_key FROM webhook_replay_tokens WHERE source = ? AND token = ?";
/// Records a one-time token's first use.
const TOKEN_REMEMBER: &str = "INSERT INTO webhook_replay_tokens (source, token, origin_key, seen_at) \
     VALUES (?, ?, ?, ?)";
/// Adds to a per-source counter.
const COUNTER_ADD: &str = "INSERT INTO webhook_counters (source, name, value) VALUES (?, ?, ?) \
     ON CONFLICT (source, name) DO UPDATE SET value = webhook_counters.value + excluded.value";
/// Sets a source's last delivery time.
const ACTIVITY_SET: &str = "INSERT INTO webhook_activity (source, last_delivery_at) VALUES (?, ?) \
     ON CONFLICT (source) DO UPDATE SET last_delivery_at = excluded.last_delivery_at";
/// Forgets one-time tokens past their retention.
const PRUNE_TOKENS: &str = "DELETE FROM webhook_replay_tokens WHERE seen_at < ?";

/// The statements of a webhook batch, prepared once per writer session.
struct BatchStatements<'c, 'h> {
    messages: RawMessageInserter<'c, 'h>,
    token_seen: Stmt<'c, 'h>,
    token_remember: Stmt<'c, 'h>,
    counter: Stmt<'c, 'h>,
    activity: Stmt<'c, 'h>,
    prune_tokens: Stmt<'c, 'h>,
}

impl<'c, 'h> BatchStatements<'c, 'h> {
    /// Prepares every statement on `db`.
    fn prepare(db: &'c RawDb<'h>) -> Result<Self, super::sqlite_raw::RawError> {
        Ok(BatchStatements {
            messages: RawMessageInserter::new(db)?,
            token_seen: db.prepare(TOKEN_SEEN)?,
            token_remember: db.prepare(TOKEN_REMEMBER)?,
            counter: db.prepare(COUNTER_ADD)?,
            activity: db.prepare(ACTIVITY_SET)?,
            prune_tokens: db.prepare(PRUNE_TOKENS)?,
        })
    }
}

/// The webhook transaction on a raw handle, unsynced (`RawDb::unsynced_transaction`): the syncer
/// fsyncs the WAL before anyone is answered. On any error the caller drops the connection.
fn commit_raw(
    db: &RawDb<'_>,
    stmts: &mut BatchStatements<'_, '_>,
    batch: &[Job],
    counts: &HashMap<(String, String), i64>,
    now: DateTime<Utc>,
) -> Result<Vec<Result<Ingested, IngestError>>, Error> {
    db.unsynced_transaction(|| insert_batch_raw(stmts, batch, counts, now))
}

/// `insert_batch` statement for statement, stepped on a raw handle inside its transaction.
fn insert_batch_raw(
    stmts: &mut BatchStatements<'_, '_>,
    batch: &[Job],
    counts: &HashMap<(String, String), i64>,
    now: DateTime<Utc>,
) -> Result<Vec<Result<Ingested, IngestError>>, Error> {
    let mut results = Vec::with_capacity(batch.len());
    let mut tally: HashMap<(String, String), i64> = counts.clone();
    let mut touched: HashMap<String, ()> = HashMap::new();
    let has_tokens = batch.iter().any(|j| j.delivery.replay_token.is_some());
    for job in batch {
        let msg = &job.delivery.message;
        if let Some(token) = &job.delivery.replay_token {
            let key = msg.origin.key();
            let seen = &mut stmts.token_seen;
            seen.bind_all(&[Value::Text(&msg.source), Value::Text(token)])?;
            let earlier = if seen.step()? {
                Some(seen.text(0))
            } else {
                None
            };
            while seen.step()? {}
            match earlier {
                Some(k) if k != key => {
                    *tally
                        .entry((msg.source.clone(), "rejected:token_reused".into()))
                        .or_insert(0) += 1;
                    results.push(Err(IngestError::TokenReused));
                    continue;
                }
                Some(_) => {}
                None => {
                    let remember = &mut stmts.token_remember;
                    remember.bind_all(&[
                        Value::Text(&msg.source),
                        Value::Text(token),
                        Value::Text(&key),
                        Value::Int(to_ms(now)),
                    ])?;
                    while remember.step()? {}
                }
            }
        }
        let out = stmts.messages.insert(msg, now)?;
        record(&mut tally, &mut touched, msg, out);
        results.push(Ok(out));
    }
    for ((source, name), n) in &tally {
        let counter = &mut stmts.counter;
        counter.bind_all(&[Value::Text(source), Value::Text(name), Value::Int(*n)])?;
        while counter.step()? {}
    }
    for source in touched.keys() {
        let activity = &mut stmts.activity;
        activity.bind_all(&[Value::Text(source), Value::Int(to_ms(now))])?;
        while activity.step()? {}
    }
    if has_tokens {
        let prune = &mut stmts.prune_tokens;
        prune.bind_all(&[Value::Int(to_ms(now - TOKEN_RETENTION))])?;
        while prune.step()? {}
    }
    Ok(results)
}

impl PgDb {
    /// Inserts a batch in one transaction; the commit returns after PostgreSQL flushed its WAL
    /// (`synchronous_commit` is checked at start), so the syncer has nothing left to do.
    async fn commit_batch(
        &self,
        batch: &[Job],
        counts: &HashMap<(String, String), i64>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Ingested, IngestError>>, Error> {
        let mut tx = self.begin_write().await?;
        let results = self.insert_batch(&mut tx, batch, counts, now).await?;
        tx.commit().await?;
        Ok(results)
    }
}

impl PgDb {
    /// The batch's statements inside `tx`: one-time tokens, the multi-row insert, counters and
    /// activity; the per-delivery results are valid only once `tx` commits.
    async fn insert_batch(
        &self,
        tx: &mut sqlx::Transaction<'_, <Self as Driver>::Db>,
        batch: &[Job],
        counts: &HashMap<(String, String), i64>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Ingested, IngestError>>, Error> {
        let mut results = Vec::with_capacity(batch.len());
        let mut tally: HashMap<(String, String), i64> = counts.clone();
        let mut touched: HashMap<String, ()> = HashMap::new();
        // Deliveries with a one-time token are checked and stored one by one (rare: Mailgun);
        // the rest go in one multi-row insert.
        let mut plain: Vec<usize> = Vec::with_capacity(batch.len());
        results.resize(batch.len(), Err(IngestError::Busy));
        for (i, job) in batch.iter().enumerate() {
            let msg = &job.delivery.message;
            let Some(token) = &job.delivery.replay_token else {
                plain.push(i);
                continue;
            };
            let key = msg.origin.key();
            let seen: Option<(String,)> = sqlx::query_as(self.sql(TOKEN_SEEN))
                .bind(&msg.source)
                .bind(token)
                .fetch_optional(&mut **tx)
                .await?;
            match seen {
                Some((k,)) if k != key => {
                    *tally
                        .entry((msg.source.clone(), "rejected:token_reused".into()))
                        .or_insert(0) += 1;
                    results[i] = Err(IngestError::TokenReused);
                    continue;
                }
                Some(_) => {}
                None => {
                    sqlx::query(self.sql(TOKEN_REMEMBER))
                        .bind(&msg.source)
                        .bind(token)
                        .bind(&key)
                        .bind(to_ms(now))
                        .execute(&mut **tx)
                        .await?;
                }
            }
            let out = self.insert_message(tx, msg, now).await?;
            record(&mut tally, &mut touched, msg, out);
            results[i] = Ok(out);
        }
        let msgs: Vec<&Message> = plain.iter().map(|&i| &batch[i].delivery.message).collect();
        let outs = self.insert_messages(tx, &msgs, now).await?;
        for (&i, out) in plain.iter().zip(outs) {
            record(&mut tally, &mut touched, &batch[i].delivery.message, out);
            results[i] = Ok(out);
        }
        for ((source, name), n) in &tally {
            sqlx::query(self.sql(COUNTER_ADD))
                .bind(source)
                .bind(name)
                .bind(n)
                .execute(&mut **tx)
                .await?;
        }
        for source in touched.keys() {
            let source = source.as_str();
            sqlx::query(self.sql(ACTIVITY_SET))
                .bind(source)
                .bind(to_ms(now))
                .execute(&mut **tx)
                .await?;
        }
        if batch.iter().any(|j| j.delivery.replay_token.is_some()) {
            sqlx::query(self.sql(PRUNE_TOKENS))
                .bind(to_ms(now - TOKEN_RETENTION))
                .execute(&mut **tx)
                .await?;
        }
        Ok(results)
    }
}

/// Counts one stored delivery as accepted or duplicate and marks its source as active.
fn record(
    tally: &mut HashMap<(String, String), i64>,
    touched: &mut HashMap<String, ()>,
    msg: &Message,
    out: Ingested,
) {
    let counter = if out.duplicate {
        "duplicates"
    } else {
        "accepted"
    };
    *tally
        .entry((msg.source.clone(), counter.into()))
        .or_insert(0) += 1;
    touched.insert(msg.source.clone(), ());
}

#[cfg(test)]
mod tests {
    use super::tests_support::message;
    use super::*;

    store_tests! {
    async fn a_writer_thread_that_dies_is_reported_stuck_and_deliveries_get_503(store: Store) {
        let health = Arc::new(Health::new());
        let writer = store.spawn_webhook_writer(Default::default(), health.clone());
        assert_eq!(health.count("webhook-"), (2, 2), "both threads register as healthy");
        writer.inner.jobs.send(Msg::Panic).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while health.stuck(std::time::Instant::now()).is_empty() {
            assert!(std::time::Instant::now() < deadline, "the dead writer was never reported");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            health.stuck(std::time::Instant::now()),
            vec![WRITER_TASK.to_string()]
        );
        let got = writer
            .ingest(WebhookDelivery {
                message: message("hook", "after-the-panic"),
                replay_token: None,
            })
            .await;
        assert!(matches!(got, Err(IngestError::Unavailable(_))), "{got:?}");
        assert_eq!(store.message_count().await.unwrap(), 0);
    }

    async fn a_requested_stop_unregisters_the_threads(store: Store) {
        let health = Arc::new(Health::new());
        let writer = store.spawn_webhook_writer(Default::default(), health.clone());
        writer
            .ingest(WebhookDelivery {
                message: message("hook", "one"),
                replay_token: None,
            })
            .await
            .unwrap();
        drop(writer);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while health.count("webhook-").1 != 0 {
            assert!(std::time::Instant::now() < deadline, "threads still registered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(health.stuck(std::time::Instant::now()).is_empty());
    }

    async fn concurrent_same_id_is_one_row_and_counters_add_up(store: Store) {
        let writer = store.spawn_webhook_writer(Default::default(), Default::default());
        let mut tasks = Vec::new();
        for i in 0..50 {
            let w = writer.clone();
            let id = if i % 2 == 0 { "same" } else { "other" };
            tasks.push(tokio::spawn(async move {
                w.ingest(WebhookDelivery {
                    message: message("hook", id),
                    replay_token: None,
                })
                .await
            }));
        }
        let mut ids = std::collections::BTreeSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap().unwrap().id);
        }
        assert_eq!(ids.len(), 2);
        assert_eq!(store.message_count().await.unwrap(), 2);
        writer.count("hook", "rejected:bad_signature");
        // A stored delivery flushes pending rejection counts in its transaction.
        writer
            .ingest(WebhookDelivery {
                message: message("hook", "third"),
                replay_token: None,
            })
            .await
            .unwrap();
        let c = store.webhook_counters().await.unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].accepted, c[0].duplicates), (3, 48));
        assert_eq!(c[0].other, vec![("rejected:bad_signature".into(), 1)]);
        assert!(c[0].last_delivery_at.is_some());
    }
    }

    store_tests! {
    async fn replay_token_with_another_delivery_is_refused(store: Store) {
        let writer = store.spawn_webhook_writer(Default::default(), Default::default());
        let first = writer
            .ingest(WebhookDelivery {
                message: message("mg", "a"),
                replay_token: Some("tok".into()),
            })
            .await
            .unwrap();
        // The same delivery again (a provider retry) is a duplicate, not a replay.
        let again = writer
            .ingest(WebhookDelivery {
                message: message("mg", "a"),
                replay_token: Some("tok".into()),
            })
            .await
            .unwrap();
        assert_eq!((again.id, again.duplicate), (first.id, true));
        let replay = writer
            .ingest(WebhookDelivery {
                message: message("mg", "b"),
                replay_token: Some("tok".into()),
            })
            .await;
        assert_eq!(replay, Err(IngestError::TokenReused));
        assert_eq!(store.message_count().await.unwrap(), 1);
    }
    }
}

#[cfg(test)]
mod batch_tests {
    use super::tests_support::message;
    use crate::message::Message;
    use crate::store::Backend;
    use crate::store::messages::RawMessageInserter;
    use crate::store::sqlite_raw::RawDb;
    use crate::store::{Ingested, Store};
    use chrono::Utc;

    /// Inserts `msgs` in one transaction the way each backend's webhook writer does: stepped on
    /// the raw handle on SQLite, one multi-row statement per chunk on PostgreSQL.
    async fn insert_all(store: &Store, msgs: &[&Message]) -> Vec<Ingested> {
        match &store.backend {
            Backend::Sqlite(db) => {
                let mut conn = db.writer.acquire().await.unwrap();
                let mut handle = conn.lock_handle().await.unwrap();
                let raw = handle.as_raw_handle();
                // SAFETY: the lock lives until the end of this block
                let db = unsafe { RawDb::new(raw) };
                db.exec("BEGIN IMMEDIATE").unwrap();
                let mut ins = RawMessageInserter::new(&db).unwrap();
                let got = msgs
                    .iter()
                    .map(|m| ins.insert(m, Utc::now()).unwrap())
                    .collect();
                drop(ins);
                db.exec("COMMIT").unwrap();
                got
            }
            Backend::Postgres(db) => {
                let mut tx = db.begin_write().await.unwrap();
                let got = db.insert_messages(&mut tx, msgs, Utc::now()).await.unwrap();
                tx.commit().await.unwrap();
                got
            }
        }
    }

    store_tests! {
    async fn batch_insert_matches_single_row_semantics(store: Store) {
        let a = message("s", "a");
        let b = message("s", "b");
        let other_source = message("t", "a");
        let first = insert_all(&store, &[&a]).await;
        let got = insert_all(&store, &[&b, &a, &b, &other_source]).await;
        assert!(!got[0].duplicate);
        assert_eq!((got[1].id, got[1].duplicate), (first[0].id, true));
        assert_eq!((got[2].id, got[2].duplicate), (got[0].id, true));
        assert!(!got[3].duplicate);
        assert_ne!(got[3].id, first[0].id);
        assert_eq!(store.message_count().await.unwrap(), 3);
        // A batch larger than one statement chunk.
        let many: Vec<_> = (0..1000).map(|i| message("m", &format!("k{i}"))).collect();
        let refs: Vec<_> = many.iter().collect();
        let got = insert_all(&store, &refs).await;
        assert!(got.iter().all(|g| !g.duplicate));
        assert_eq!(store.message_count().await.unwrap(), 1003);
        // every stored row reads back with its raw bytes, digest and queue entry
        let (raw, digest, queued): (Vec<u8>, String, i64) = on_backend!(store, |db| {
            sqlx::query_as(db.sql(
                "SELECT raw, raw_digest, (SELECT count(*) FROM core_queue) FROM messages \
                 WHERE source = ? AND origin_key = ?",
            ))
            .bind("m")
            .bind(many[999].origin.key())
            .fetch_one(db.reader())
            .await
            .unwrap()
        });
        assert_eq!(raw, many[999].raw);
        assert_eq!(
            digest,
            format!("xxh3-128:{:032x}", xxhash_rust::xxh3::xxh3_128(&raw))
        );
        assert_eq!(queued, 1003);
    }
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use crate::message::{Automation, Direction, Message, Origin, ParseStatus};
    use chrono::Utc;

    /// A minimal webhook message with the given source and delivery id.
    pub fn message(source: &str, id: &str) -> Message {
        Message {
            source: source.into(),
            origin: Origin::Webhook {
                delivery_id: id.into(),
            },
            direction: Direction::Inbound,
            received_at: Utc::now(),
            sent_at: None,
            from: None,
            to: vec![],
            subject: None,
            text: Some("hello".into()),
            message_id: None,
            in_reply_to: vec![],
            references: vec![],
            thread_key: None,
            automation: Automation::Human,
            parse: ParseStatus::Ok,
            raw: id.as_bytes().to_vec(),
        }
    }
}
