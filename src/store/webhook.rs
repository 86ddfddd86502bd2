//! Webhook group commit: many concurrent deliveries share one transaction and one fsync.
//!
//! One writer task owns the write path. Each request sends its message over an mpsc channel with a
//! oneshot for the answer. The task takes whatever has queued up (no added wait: requests that
//! arrive during a commit form the next batch) and inserts them all in one `BEGIN IMMEDIATE`
//! transaction (on SQLite stepped in one go on the writer connection's raw handle:
//! [`super::sqlite_raw`] says why). The commit writes the WAL frames without fsyncing them (`synchronous=NORMAL` for
//! this transaction only); a syncer task then fsyncs the WAL ([`super::wal_sync`]) and only after
//! that answers each waiter, while the writer already commits the next batch. If anything in the
//! batch fails, the transaction rolls back and every waiter gets `Unavailable` (503): nobody is
//! told "stored" unless their own row is on disk. A failed fsync is fatal: the page cache can no
//! longer be trusted, so the process exits for systemd to restart it from what is on disk.
//!
//! On PostgreSQL the commit itself returns after the server flushed its WAL
//! (`synchronous_commit` is checked at start), so the syncer only answers.
//!
//! Counters live in the same transaction as the rows they count. Rejections (401) have no row:
//! they are tallied in memory and written with the next batch, or by a 1 s tick when idle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use super::backend::{Driver, PgDb, SqliteDb};
use super::messages::RawMessageInserter;
use super::sqlite_raw::{RawDb, Value, run_blocking};
use super::wal_sync::WalFile;
use super::{Error, Ingested, Store, from_ms, to_ms};
use crate::message::Message;

/// Deliveries waiting in the channel before new requests are refused with 503.
const QUEUE_DEPTH: usize = 4096;

/// The most deliveries one transaction takes.
const MAX_BATCH: usize = 512;

/// While an earlier batch is being fsync'd, the writer keeps gathering until it has this many
/// deliveries (or the fsync ends) before committing: a commit has a fixed cost in pages and
/// round trips that a handful of rows would not amortize.
const GATHER: usize = 32;

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

/// Rejections not yet written: (source, counter name) -> count.
type Pending = Arc<Mutex<HashMap<(String, String), i64>>>;

/// The sending side of the group-commit writer; cheap to clone.
#[derive(Clone)]
pub struct WebhookWriter {
    jobs: mpsc::Sender<Job>,
    pending: Pending,
}

impl WebhookWriter {
    /// Stores one delivery; returns only after its transaction is durably committed.
    pub async fn ingest(&self, delivery: WebhookDelivery) -> Result<Ingested, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job { delivery, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => IngestError::Busy,
                mpsc::error::TrySendError::Closed(_) => {
                    IngestError::Unavailable("writer stopped".into())
                }
            })?;
        answer
            .await
            .unwrap_or_else(|_| Err(IngestError::Unavailable("writer stopped".into())))
    }

    /// Counts a request that was not stored (`rejected:<reason>`, `ignored`, `invalid`).
    pub fn count(&self, source: &str, counter: &str) {
        if let Ok(mut p) = self.pending.lock() {
            *p.entry((source.to_string(), counter.to_string()))
                .or_insert(0) += 1;
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
    /// Starts the group-commit writer task; it stops when every `WebhookWriter` is dropped.
    pub fn spawn_webhook_writer(&self, wake_core: Arc<tokio::sync::Notify>) -> WebhookWriter {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let pending: Pending = Arc::default();
        let store = self.clone();
        let (synced_tx, synced_rx) = mpsc::unbounded_channel();
        // PostgreSQL's commit already waited for its WAL flush: nothing for the syncer to sync.
        let wal = self.path().map(|db| Arc::new(WalFile::beside(db)));
        let syncing = Arc::new(Syncing::default());
        let writer = run_writer(store, rx, pending.clone(), synced_tx, syncing.clone());
        let syncer = run_syncer(wal, synced_rx, syncing, wake_core);
        tokio::spawn(writer);
        tokio::spawn(syncer);
        WebhookWriter { jobs: tx, pending }
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

/// Batches handed to the syncer and not yet answered, and a signal at the end of each fsync.
#[derive(Default)]
struct Syncing {
    outstanding: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
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
async fn run_syncer(
    wal: Option<Arc<WalFile>>,
    mut rx: mpsc::UnboundedReceiver<Committed>,
    syncing: Arc<Syncing>,
    wake_core: Arc<tokio::sync::Notify>,
) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let batches = group.len();
        let failure = match wal.clone() {
            None => None,
            Some(file) => match tokio::task::spawn_blocking(move || file.sync()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            },
        };
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
        syncing
            .outstanding
            .fetch_sub(batches, std::sync::atomic::Ordering::SeqCst);
        syncing.done.notify_waiters();
        if let Some(e) = failure {
            // After a failed fsync the kernel may have dropped the dirty pages and a later fsync
            // can succeed without them (PostgreSQL's "fsyncgate"): never retry and claim success.
            // Exit so systemd restarts the daemon from what is really on disk; the waiters above
            // got 503 and their providers retry.
            tracing::error!(error = %e, "fsync of the database WAL failed; exiting to recover from disk");
            std::process::exit(1);
        }
        if stored {
            wake_core.notify_one();
        }
    }
}

async fn run_writer(
    store: Store,
    mut rx: mpsc::Receiver<Job>,
    pending: Pending,
    synced: mpsc::UnboundedSender<Committed>,
    syncing: Arc<Syncing>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set when a commit failed because the disk is full. Until a space probe succeeds, nothing
    // is attempted: a small write squeezing into freed pages would otherwise flip answers between
    // 2xx and 503 while the disk stays full (reliability.md D7: no 2xx after a failed commit).
    let mut disk_full: Option<std::time::Instant> = None;
    loop {
        let first = tokio::select! {
            job = rx.recv() => match job {
                Some(j) => Some(j),
                None => break,
            },
            _ = tick.tick() => None,
        };
        let mut batch: Vec<Job> = first.into_iter().collect();
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        // Nobody waits on this commit while the syncer is still busy with an earlier batch: gather
        // more first. Registered before the check, so the end of a sync is never missed.
        while !batch.is_empty() && batch.len() < GATHER {
            let done = syncing.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if syncing
                .outstanding
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                break;
            }
            tokio::select! {
                job = rx.recv() => match job {
                    Some(j) => batch.push(j),
                    None => break,
                },
                _ = &mut done => break,
            }
        }
        let counts = take_pending(&pending);
        if batch.is_empty() && counts.is_empty() {
            continue;
        }
        if let Some(checked) = disk_full {
            if checked.elapsed() >= Duration::from_millis(500) && store.space_available().await {
                tracing::info!("disk space is back; webhook commits resume");
                disk_full = None;
            } else {
                if checked.elapsed() >= Duration::from_millis(500) {
                    disk_full = Some(std::time::Instant::now());
                }
                restore_pending(&pending, counts);
                for job in batch {
                    let _ = job
                        .reply
                        .send(Err(IngestError::Unavailable("disk full".into())));
                }
                continue;
            }
        }
        let now = Utc::now();
        let started = std::time::Instant::now();
        let outcome = on_backend!(store, |db| db.commit_batch(&batch, &counts, now).await);
        // Batch size and commit time tell an operator whether acknowledgements wait on the disk
        // (long commits) or on the HTTP side (small batches).
        metrics::histogram!("frontdesk_webhook_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("frontdesk_webhook_batch_deliveries").record(batch.len() as f64);
        match outcome {
            Ok(results) => {
                let replies = batch
                    .into_iter()
                    .zip(results)
                    .map(|(job, result)| Reply {
                        to: job.reply,
                        result,
                        source: job.delivery.message.source,
                        received_at: job.delivery.message.received_at,
                    })
                    .collect();
                syncing
                    .outstanding
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if let Err(mpsc::error::SendError(c)) = synced.send(Committed { replies }) {
                    syncing
                        .outstanding
                        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    for reply in c.replies {
                        let _ = reply
                            .to
                            .send(Err(IngestError::Unavailable("syncer stopped".into())));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, deliveries = batch.len(), "webhook batch not stored");
                // SQLITE_FULL, or an I/O error (ENOSPC surfaces as either) with no room left.
                if is_disk_full(&e) || !store.space_available().await {
                    disk_full = Some(std::time::Instant::now());
                }
                restore_pending(&pending, counts);
                let text = e.to_string();
                for job in batch {
                    let _ = job.reply.send(Err(IngestError::Unavailable(text.clone())));
                }
            }
        }
    }
    // Flush the last rejection counts on the way out; losing them on error is acceptable.
    let counts = take_pending(&pending);
    if !counts.is_empty() {
        let _ = on_backend!(store, |db| db.commit_batch(&[], &counts, Utc::now()).await);
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

impl SqliteDb {
    /// Inserts a batch in one transaction, committed but not fsync'd (the syncer does that); the
    /// per-delivery results are valid only if this returns Ok.
    ///
    /// A connection whose transaction failed (disk full, I/O error) is closed rather than reused,
    /// so the store recovers by itself once space is back.
    async fn commit_batch(
        &self,
        batch: &[Job],
        counts: &HashMap<(String, String), i64>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Ingested, IngestError>>, Error> {
        let mut conn = self.writer.acquire().await?;
        let outcome = match conn.lock_handle().await {
            Ok(mut handle) => {
                let raw = handle.as_raw_handle();
                // the whole transaction in one go on this thread (src/store/sqlite_raw.rs says why)
                run_blocking(|| {
                    // SAFETY: `handle` locks the connection for the duration: sqlx's worker
                    // makes no call on it until the guard drops after this closure.
                    let db = unsafe { RawDb::new(raw) };
                    commit_raw(&db, batch, counts, now)
                })
            }
            Err(e) => Err(e.into()),
        };
        if outcome.is_err() {
            // Its synchronous setting or transaction state is unknown: the pool opens a fresh
            // connection with the options' FULL rather than hand this one to another writer.
            conn.close_on_drop();
        }
        outcome
    }
}

/// The webhook transaction on a raw handle: `synchronous=NORMAL` for this transaction only (the
/// syncer fsyncs the WAL before anyone is answered; SQLite refuses the change inside a
/// transaction), `BEGIN IMMEDIATE`, the batch, `COMMIT`, then FULL again for every other writer.
/// On any error the transaction is rolled back and the error returned; the caller then drops the
/// connection.
fn commit_raw(
    db: &RawDb<'_>,
    batch: &[Job],
    counts: &HashMap<(String, String), i64>,
    now: DateTime<Utc>,
) -> Result<Vec<Result<Ingested, IngestError>>, Error> {
    db.exec("PRAGMA synchronous = NORMAL")?;
    db.exec("BEGIN IMMEDIATE")?;
    let done = insert_batch_raw(db, batch, counts, now)
        .and_then(|results| db.exec("COMMIT").map_err(Error::from).map(|()| results));
    if done.is_err() {
        let _ = db.exec("ROLLBACK");
    }
    let results = done?;
    db.exec("PRAGMA synchronous = FULL")?;
    Ok(results)
}

/// `insert_batch` statement for statement, stepped on a raw handle inside its transaction.
fn insert_batch_raw(
    db: &RawDb<'_>,
    batch: &[Job],
    counts: &HashMap<(String, String), i64>,
    now: DateTime<Utc>,
) -> Result<Vec<Result<Ingested, IngestError>>, Error> {
    let mut results = Vec::with_capacity(batch.len());
    let mut tally: HashMap<(String, String), i64> = counts.clone();
    let mut touched: HashMap<String, ()> = HashMap::new();
    let mut messages = RawMessageInserter::new(db)?;
    let has_tokens = batch.iter().any(|j| j.delivery.replay_token.is_some());
    let mut tokens = if has_tokens {
        Some((
            db.prepare(
                "SELECT origin_key FROM webhook_replay_tokens WHERE source = ? AND token = ?",
            )?,
            db.prepare(
                "INSERT INTO webhook_replay_tokens (source, token, origin_key, seen_at) \
                 VALUES (?, ?, ?, ?)",
            )?,
        ))
    } else {
        None
    };
    for job in batch {
        let msg = &job.delivery.message;
        if let (Some(token), Some((seen, remember))) = (&job.delivery.replay_token, tokens.as_mut())
        {
            let key = msg.origin.key();
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
        let out = messages.insert(msg, now)?;
        record(&mut tally, &mut touched, msg, out);
        results.push(Ok(out));
    }
    let mut counter = db.prepare(
        "INSERT INTO webhook_counters (source, name, value) VALUES (?, ?, ?) \
         ON CONFLICT (source, name) DO UPDATE SET value = webhook_counters.value + excluded.value",
    )?;
    for ((source, name), n) in &tally {
        counter.bind_all(&[Value::Text(source), Value::Text(name), Value::Int(*n)])?;
        while counter.step()? {}
    }
    let mut activity = db.prepare(
        "INSERT INTO webhook_activity (source, last_delivery_at) VALUES (?, ?) \
         ON CONFLICT (source) DO UPDATE SET last_delivery_at = excluded.last_delivery_at",
    )?;
    for source in touched.keys() {
        activity.bind_all(&[Value::Text(source), Value::Int(to_ms(now))])?;
        while activity.step()? {}
    }
    if has_tokens {
        let mut prune = db.prepare("DELETE FROM webhook_replay_tokens WHERE seen_at < ?")?;
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
            let seen: Option<(String,)> = sqlx::query_as(self.sql(
                "SELECT origin_key FROM webhook_replay_tokens WHERE source = ? AND token = ?",
            ))
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
                    sqlx::query(self.sql(
                        "INSERT INTO webhook_replay_tokens (source, token, origin_key, seen_at) \
                     VALUES (?, ?, ?, ?)",
                    ))
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
            sqlx::query(
            self.sql("INSERT INTO webhook_counters (source, name, value) VALUES (?, ?, ?) \
             ON CONFLICT (source, name) DO UPDATE SET value = webhook_counters.value + excluded.value"),
        )
        .bind(source)
        .bind(name)
        .bind(n)
        .execute(&mut **tx)
        .await?;
        }
        for source in touched.keys() {
            let source = source.as_str();
            sqlx::query(self.sql(
                "INSERT INTO webhook_activity (source, last_delivery_at) VALUES (?, ?) \
             ON CONFLICT (source) DO UPDATE SET last_delivery_at = excluded.last_delivery_at",
            ))
            .bind(source)
            .bind(to_ms(now))
            .execute(&mut **tx)
            .await?;
        }
        if batch.iter().any(|j| j.delivery.replay_token.is_some()) {
            sqlx::query(self.sql("DELETE FROM webhook_replay_tokens WHERE seen_at < ?"))
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
    async fn concurrent_same_id_is_one_row_and_counters_add_up(store: Store) {
        let writer = store.spawn_webhook_writer(Default::default());
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
        let writer = store.spawn_webhook_writer(Default::default());
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
        // every stored row reads back with its raw bytes, hash and queue entry
        let (raw, sha, queued): (Vec<u8>, String, i64) = on_backend!(store, |db| {
            sqlx::query_as(db.sql(
                "SELECT raw, raw_sha256, (SELECT count(*) FROM core_queue) FROM messages \
                 WHERE source = ? AND origin_key = ?",
            ))
            .bind("m")
            .bind(many[999].origin.key())
            .fetch_one(db.reader())
            .await
            .unwrap()
        });
        assert_eq!(raw, many[999].raw);
        assert_eq!(sha, hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&raw)));
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
