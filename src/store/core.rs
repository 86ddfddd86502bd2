//! The core loop's SQL: pending messages, conversations, SLA targets and alert rows.
//!
//! Everything the core does for one batch happens inside one [`CoreTx`], so a crash leaves either
//! the whole step or none of it; alert rows carry a unique `slot_key`, so a replayed step never
//! writes a second alert for the same target event.

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::Row;

use super::{Error, PgDb, Qb, SqliteDb, Store, Tx, from_ms, to_ms};
use crate::message::{Address, Automation, Direction};
use crate::sla::clock::{ClockState, Metric, Target, TargetState};

/// A stored message the core has not handled yet (the fields the core needs).
#[derive(Debug, Clone, PartialEq)]
pub struct PendingMessage {
    /// Row id; messages are handled in id order.
    pub id: i64,
    /// Source name.
    pub source: String,
    /// Direction as the source saw it.
    pub direction: Direction,
    /// Whether a machine wrote it.
    pub automation: Automation,
    /// Trusted receipt time.
    pub received_at: DateTime<Utc>,
    /// Sender address as stored.
    pub from: Option<Address>,
    /// Recipients.
    pub to: Vec<Address>,
    /// Subject.
    pub subject: Option<String>,
    /// Text body.
    pub text: Option<String>,
    /// Email Message-ID.
    pub message_id: Option<String>,
    /// Email In-Reply-To ids.
    pub in_reply_to: Vec<String>,
    /// Email References ids.
    pub references: Vec<String>,
    /// Provider thread key.
    pub thread_key: Option<String>,
}

/// A conversation as the core reads and writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationRow {
    /// Row id.
    pub id: i64,
    /// Source of the first message.
    pub source: String,
    /// Client identity key.
    pub client_key: String,
    /// Client address.
    pub client_address: String,
    /// Configured client name.
    pub client_name: Option<String>,
    /// Client tags.
    pub client_tags: Vec<String>,
    /// Subject of the first message.
    pub subject: Option<String>,
    /// Base subject used by the subject fallback.
    pub base_subject: String,
    /// Owner (team member name).
    pub owner: Option<String>,
    /// SLA policy name.
    pub policy: Option<String>,
    /// Receipt time of the first message.
    pub created_at: DateTime<Utc>,
    /// Receipt time of the latest message.
    pub last_message_at: DateTime<Utc>,
    /// The SLA clock.
    pub clock: ClockState,
    /// Index of the client rule that matched, when created.
    pub client_rule: Option<i64>,
    /// Index of the responsibilities rule that named the owner.
    pub owner_rule: Option<i64>,
    /// Index of the policy that was chosen.
    pub policy_rule: Option<i64>,
}

/// A conversation as `frontdesk conversations --json` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConversationListing {
    /// Conversation id.
    pub id: i64,
    /// Client name, else address.
    pub client: String,
    /// Owner.
    pub owner: Option<String>,
    /// Subject of the first message.
    pub subject: Option<String>,
    /// `idle`, `waiting`, `at_risk` or `breached`.
    pub state: String,
    /// Receipt time of the oldest unanswered client message.
    pub waiting_since: Option<DateTime<Utc>>,
    /// Due time of the open target.
    pub due_at: Option<DateTime<Utc>>,
    /// SLA policy.
    pub policy: Option<String>,
    /// Receipt time of the latest message.
    pub last_message_at: DateTime<Utc>,
}

/// Which conversations to list.
#[derive(Debug, Clone, Default)]
pub struct ConversationFilter {
    /// Only this state (`idle`, `waiting`, `at_risk`, `breached`); `None` or `all` for every one.
    pub state: Option<String>,
    /// Only this owner.
    pub owner: Option<String>,
}

/// The PostgreSQL advisory lock (in [`super::PG_LOCK_NAMESPACE`]) held by every core write
/// transaction.
const CORE_WRITE_LOCK: i32 = 1;

/// One transaction of the core loop.
pub struct CoreTx {
    inner: CoreInner,
}

/// The transaction and the handle of its backend (the handle picks the SQL dialect).
// One per core step, never in a collection: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum CoreInner {
    Sqlite(SqliteDb, Tx<SqliteDb>),
    Postgres(PgDb, Tx<PgDb>),
}

/// Expands `$body` once per backend with the handle and the transaction bound.
macro_rules! on_core_tx {
    ($core:expr, |$db:ident, $tx:ident| $body:expr) => {
        match &mut $core.inner {
            CoreInner::Sqlite($db, $tx) => $body,
            CoreInner::Postgres($db, $tx) => $body,
        }
    };
}

fn json_vec<T: serde::de::DeserializeOwned>(s: Option<String>) -> Vec<T> {
    s.and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

fn corrupt(table: &'static str, reason: String) -> Error {
    Error::Corrupt { table, reason }
}

fn automation_from(s: &str) -> Automation {
    match s {
        "automatic" => Automation::Automatic,
        "frontdesk" => Automation::Frontdesk,
        _ => Automation::Human,
    }
}

fn target_kind(metric: &str) -> crate::digest::TargetKind {
    if metric == "first_reply" {
        crate::digest::TargetKind::First
    } else {
        crate::digest::TargetKind::Next
    }
}

fn ms(d: TimeDelta) -> i64 {
    d.num_milliseconds()
}

row_fn! { fn target_from_row(r) -> Target {
    let metric: String = r.try_get("metric")?;
    let state: String = r.try_get("state")?;
    Ok(Target {
        seq: u32::try_from(r.try_get::<i64, _>("seq")?)
            .map_err(|e| corrupt("sla_targets", e.to_string()))?,
        metric: Metric::from_stored(&metric)
            .ok_or_else(|| corrupt("sla_targets", format!("unknown metric {metric}")))?,
        policy: r.try_get("policy")?,
        allowed: TimeDelta::milliseconds(r.try_get("allowed_ms")?),
        started_at: from_ms(r.try_get("started_at")?),
        counting_from: from_ms(r.try_get("counting_from")?),
        warn_at: from_ms(r.try_get("warn_at")?),
        due_at: from_ms(r.try_get("due_at")?),
        state: TargetState::from_stored(&state)
            .ok_or_else(|| corrupt("sla_targets", format!("unknown state {state}")))?,
        warned: r.try_get::<i64, _>("warned")? != 0,
        breached: r.try_get::<i64, _>("breached")? != 0,
        fulfilled_at: r.try_get::<Option<i64>, _>("fulfilled_at")?.map(from_ms),
        business_duration: r
            .try_get::<Option<i64>, _>("business_ms")?
            .map(TimeDelta::milliseconds),
        calendar_duration: r
            .try_get::<Option<i64>, _>("calendar_ms")?
            .map(TimeDelta::milliseconds),
    })
}}

impl Store {
    /// Starts a core transaction (takes the write lock up front).
    pub async fn begin_core(&self) -> Result<CoreTx, Error> {
        Ok(CoreTx {
            inner: match &self.backend {
                super::Backend::Sqlite(db) => {
                    CoreInner::Sqlite(db.clone(), db.begin_write().await?)
                }
                super::Backend::Postgres(db) => {
                    let mut tx = db.begin_write().await?;
                    // Core steps serialize like SQLite's single writer: a second core (another
                    // replica during a leadership change) waits here, then sees the first one's
                    // commit, so its checks (conversation ids, dequeued messages) find the
                    // stale snapshot and the step is retried as a Conflict.
                    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
                        .bind(super::PG_LOCK_NAMESPACE)
                        .bind(CORE_WRITE_LOCK)
                        .execute(&mut *tx)
                        .await?;
                    CoreInner::Postgres(db.clone(), tx)
                }
            },
        })
    }

    /// Starts a read-only core transaction on a reader connection: one consistent snapshot for
    /// a step's lookups, taken without holding the single writer (only the core writes what it
    /// reads there, so nothing it read can change before its write transaction).
    pub async fn begin_core_read(&self) -> Result<CoreTx, Error> {
        Ok(CoreTx {
            inner: match &self.backend {
                super::Backend::Sqlite(db) => CoreInner::Sqlite(db.clone(), db.begin_read().await?),
                super::Backend::Postgres(db) => {
                    CoreInner::Postgres(db.clone(), db.begin_read().await?)
                }
            },
        })
    }

    /// Stores many messages in one transaction (bulk loads and benchmarks); duplicates are skipped.
    pub async fn ingest_many(
        &self,
        msgs: &[crate::message::Message],
        now: DateTime<Utc>,
    ) -> Result<usize, Error> {
        on_backend!(self, |db| {
            let mut tx = db.begin_write().await?;
            let mut n = 0;
            for m in msgs {
                if !db.insert_message(&mut tx, m, now).await?.duplicate {
                    n += 1;
                }
            }
            tx.commit().await?;
            Ok(n)
        })
    }

    /// The earliest pending SLA deadline (warning or due time) over all conversations.
    pub async fn next_core_deadline(&self) -> Result<Option<DateTime<Utc>>, Error> {
        on_backend!(self, |db| {
            let (t,): (Option<i64>,) = sqlx::query_as(db.sql(
                "SELECT min(next_deadline) FROM conversations WHERE next_deadline IS NOT NULL",
            ))
            .fetch_one(db.reader())
            .await?;
            Ok(t.map(from_ms))
        })
    }

    /// All SLA targets of a conversation, in order (for tests and `explain`).
    pub async fn targets_of(&self, conversation: i64) -> Result<Vec<Target>, Error> {
        on_backend!(self, |db| {
            let rows = sqlx::query(
                db.sql("SELECT * FROM sla_targets WHERE conversation_id = ? ORDER BY seq"),
            )
            .bind(conversation)
            .fetch_all(db.reader())
            .await?;
            rows.iter().map(target_from_row).collect()
        })
    }

    /// Conversations, most urgent first (earliest due time, then latest activity).
    pub async fn conversations(
        &self,
        f: &ConversationFilter,
    ) -> Result<Vec<ConversationListing>, Error> {
        on_backend!(self, |db| {
            let state = f.state.as_deref().filter(|s| *s != "all");
            let rows = sqlx::query(
            db.sql("SELECT id, coalesce(client_name, client_address) AS client, owner, subject, state, \
             waiting_since, due_at, policy, last_message_at FROM conversations \
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR owner = ?2) \
             ORDER BY due_at IS NULL, due_at, last_message_at DESC"),
        )
        .bind(state)
        .bind(f.owner.as_deref())
        .fetch_all(db.reader())
        .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(ConversationListing {
                    id: r.try_get("id")?,
                    client: r.try_get("client")?,
                    owner: r.try_get("owner")?,
                    subject: r.try_get("subject")?,
                    state: r.try_get("state")?,
                    waiting_since: r.try_get::<Option<i64>, _>("waiting_since")?.map(from_ms),
                    due_at: r.try_get::<Option<i64>, _>("due_at")?.map(from_ms),
                    policy: r.try_get("policy")?,
                    last_message_at: from_ms(r.try_get("last_message_at")?),
                });
            }
            Ok(out)
        })
    }

    /// Fulfilled targets with replies in `[since, until)`, for `frontdesk stats` and digests.
    pub async fn fulfilled_targets(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<crate::sla::stats::Fulfilled>, Error> {
        on_backend!(self, |db| {
            // One row holding a JSON array instead of a row per target: handing each row across
            // sqlx's worker thread cost more than the statistics themselves (50,000 targets).
            let (json,): (String,) = sqlx::query_as(db.pick(
                "SELECT json_group_array(json_array(t.metric, t.source, t.owner, \
             coalesce(c.client_name, c.client_address), coalesce(t.business_ms, 0), \
             coalesce(t.calendar_ms, 0), t.state = 'met', t.fulfilled_at)) \
             FROM sla_targets t JOIN conversations c ON c.id = t.conversation_id \
             WHERE t.fulfilled_at IS NOT NULL AND t.fulfilled_at >= ? AND t.fulfilled_at < ?",
                "SELECT coalesce(json_agg(json_build_array(t.metric, t.source, t.owner, \
             coalesce(c.client_name, c.client_address), coalesce(t.business_ms, 0), \
             coalesce(t.calendar_ms, 0), CASE WHEN t.state = 'met' THEN 1 ELSE 0 END, \
             t.fulfilled_at))::text, '[]') \
             FROM sla_targets t JOIN conversations c ON c.id = t.conversation_id \
             WHERE t.fulfilled_at IS NOT NULL AND t.fulfilled_at >= ? AND t.fulfilled_at < ?",
            ))
            .bind(to_ms(since))
            .bind(to_ms(until))
            .fetch_one(db.reader())
            .await?;
            type Row = (String, String, Option<String>, String, i64, i64, i64, i64);
            let rows: Vec<Row> =
                serde_json::from_str(&json).map_err(|e| corrupt("sla_targets", e.to_string()))?;
            rows.into_iter()
                .map(
                    |(metric, source, owner, client, business_ms, calendar_ms, met, at)| {
                        Ok(crate::sla::stats::Fulfilled {
                            metric: Metric::from_stored(&metric).ok_or_else(|| {
                                corrupt("sla_targets", format!("unknown metric {metric}"))
                            })?,
                            source,
                            owner,
                            client,
                            business_ms,
                            calendar_ms,
                            met: met != 0,
                            fulfilled_at: from_ms(at),
                        })
                    },
                )
                .collect()
        })
    }

    /// The conversation a message was threaded into, if processed.
    pub async fn conversation_of_message(&self, message: i64) -> Result<Option<i64>, Error> {
        on_backend!(self, |db| {
            let row: Option<(Option<i64>,)> = sqlx::query_as(
                db.sql("SELECT conversation_id FROM message_threads WHERE message_id = ?"),
            )
            .bind(message)
            .fetch_optional(db.reader())
            .await?;
            Ok(row.and_then(|r| r.0))
        })
    }

    /// Open conversations (a client waiting) for the digest, oldest wait first.
    pub async fn digest_open(&self) -> Result<Vec<crate::digest::ConversationRow>, Error> {
        on_backend!(self, |db| {
            let rows = sqlx::query(
                // Named as people say it: the client rule's name, else the sender's own display
                // name, else the address. Without a subject (SMS, chat, forms), the first words of
                // the latest client message stand in (digest.md).
                "SELECT c.id, coalesce(c.client_name, \
               (SELECT m.from_name FROM message_threads mt JOIN messages m ON m.id = mt.message_id \
                WHERE mt.conversation_id = c.id AND m.direction = 'inbound' AND m.from_name <> '' \
                ORDER BY m.id LIMIT 1), \
               c.client_address) AS client, \
             coalesce(nullif(c.subject, ''), \
               (SELECT substr(m.body_text, 1, 200) FROM message_threads mt \
                JOIN messages m ON m.id = mt.message_id WHERE mt.conversation_id = c.id \
                AND m.direction = 'inbound' ORDER BY m.id DESC LIMIT 1)) AS subject, c.owner, \
             t.policy, t.metric, t.allowed_ms, t.started_at, t.warn_at, t.due_at \
             FROM conversations c JOIN sla_targets t \
             ON t.conversation_id = c.id AND t.seq = c.targets_opened \
             WHERE c.state != 'idle' ORDER BY t.started_at",
            )
            .fetch_all(db.reader())
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let metric: String = r.try_get("metric")?;
                out.push(crate::digest::ConversationRow {
                    id: r.try_get("id")?,
                    client: r.try_get("client")?,
                    medium: None,
                    subject: r
                        .try_get::<Option<String>, _>("subject")?
                        .unwrap_or_default(),
                    owner: r.try_get("owner")?,
                    policy: r.try_get("policy")?,
                    target: Some(target_kind(&metric)),
                    target_secs: Some(r.try_get::<i64, _>("allowed_ms")? / 1000),
                    waiting_since: from_ms(r.try_get("started_at")?),
                    warn_at: Some(from_ms(r.try_get("warn_at")?)),
                    due: Some(from_ms(r.try_get("due_at")?)),
                });
            }
            Ok(out)
        })
    }

    /// Fulfilled targets with replies in `[since, until)` as the digest reads them.
    pub async fn digest_replies(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<crate::digest::ReplyRow>, Error> {
        on_backend!(self, |db| {
            let rows = sqlx::query(db.sql(
                "SELECT t.conversation_id, coalesce(c.client_name, c.client_address) AS client, \
             t.owner, t.metric, t.fulfilled_at, t.business_ms, t.state \
             FROM sla_targets t JOIN conversations c ON c.id = t.conversation_id \
             WHERE t.fulfilled_at IS NOT NULL AND t.fulfilled_at >= ? AND t.fulfilled_at < ? \
             ORDER BY t.fulfilled_at",
            ))
            .bind(to_ms(since))
            .bind(to_ms(until))
            .fetch_all(db.reader())
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let metric: String = r.try_get("metric")?;
                let state: String = r.try_get("state")?;
                out.push(crate::digest::ReplyRow {
                    conversation_id: r.try_get("conversation_id")?,
                    client: r.try_get("client")?,
                    owner: r.try_get("owner")?,
                    target: target_kind(&metric),
                    replied_at: from_ms(r.try_get("fulfilled_at")?),
                    response_secs: r.try_get::<Option<i64>, _>("business_ms")?.unwrap_or(0) / 1000,
                    met: Some(state == "met"),
                });
            }
            Ok(out)
        })
    }

    /// Dedupe keys of the SLA alert events, in insertion order.
    pub async fn sla_alert_keys(&self) -> Result<Vec<String>, Error> {
        on_backend!(self, |db| {
            let rows: Vec<(String,)> = sqlx::query_as(db.sql(
                "SELECT dedupe_key FROM alert_events WHERE kind IN ('sla_warning', 'sla_breach') \
             ORDER BY id",
            ))
            .fetch_all(db.reader())
            .await?;
            Ok(rows.into_iter().map(|r| r.0).collect())
        })
    }

    /// A conversation by id (for tests and `explain`).
    pub async fn conversation(&self, id: i64) -> Result<Option<ConversationRow>, Error> {
        let mut tx = self.begin_core().await?;
        let c = tx.conversation(id).await?;
        tx.rollback().await?;
        Ok(c)
    }
}

/// Everything one core step writes, applied together by [`CoreTx::write_step`].
#[derive(Debug, Default)]
pub struct StepWrites {
    /// Conversations created or changed, in their final state for this step.
    pub conversations: Vec<ConversationRow>,
    /// Target instances created or changed, keyed by their conversation.
    pub targets: Vec<(i64, Target)>,
    /// New provider thread keys: `(source, key, conversation)`.
    pub thread_keys: Vec<(String, String, i64)>,
    /// Messages handled, with their conversation (`None`: ignored).
    pub processed: Vec<(i64, Option<i64>)>,
    /// Warn and breach events: `(dedupe key, event, time)`.
    pub alerts: Vec<(String, crate::digest::AlertEvent, DateTime<Utc>)>,
    /// Conversations whose targets above a sequence number are gone (after a replay).
    pub truncated: Vec<(i64, u32)>,
}

impl StepWrites {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.conversations.is_empty()
            && self.targets.is_empty()
            && self.thread_keys.is_empty()
            && self.processed.is_empty()
            && self.alerts.is_empty()
            && self.truncated.is_empty()
    }
}

/// The listing columns derived from a clock: state, waiting since, due at.
fn listing_state(clock: &ClockState) -> (&'static str, Option<i64>, Option<i64>) {
    match &clock.open {
        None => ("idle", None, None),
        Some(t) => (
            match t.state {
                TargetState::AtRisk => "at_risk",
                TargetState::Breached => "breached",
                _ => "waiting",
            },
            Some(to_ms(t.started_at)),
            Some(to_ms(t.due_at)),
        ),
    }
}

/// Rows per multi-row statement. A step's rows go in full chunks of this size, then the rest in
/// power-of-two chunks, so each table has at most eight statement shapes and all stay in sqlx's
/// statement cache (a statement per row would cost a trip through its worker thread each).
const CHUNK: usize = 64;

fn chunk_len(remaining: usize) -> usize {
    if remaining >= CHUNK {
        CHUNK
    } else {
        1 << remaining.ilog2()
    }
}

twin_impl! {
/// `head VALUES (...), (...) tail` over `rows`, in chunks.
async fn insert_rows<'a, T>(
    &self,
    tx: &mut Tx<Self>,
    head: &str,
    tail: &str,
    rows: &'a [T],
    mut bind: impl FnMut(&mut sqlx::query_builder::Separated<'_, <Self as super::Driver>::Db, &'static str>, &'a T),
) -> Result<(), Error> {
    let mut rest = rows;
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(chunk_len(rest.len()));
        rest = after;
        let mut qb = Qb::<Self>::new(head);
        qb.push_values(chunk, |mut b, row| bind(&mut b, row));
        qb.push(tail);
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Removes handled messages from the core's queue, in chunks; returns how many were queued.
async fn delete_queued(&self, tx: &mut Tx<Self>, ids: &[i64]) -> Result<u64, Error> {
    let mut removed = 0;
    let mut rest = ids;
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(chunk_len(rest.len()));
        rest = after;
        let mut qb =
            Qb::<Self>::new("DELETE FROM core_queue WHERE message_id IN (");
        let mut list = qb.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        qb.push(")");
        removed += qb.build().execute(&mut **tx).await?.rows_affected();
    }
    Ok(removed)
}
}

fn to_json<T: serde::Serialize>(table: &'static str, value: &T) -> Result<String, Error> {
    serde_json::to_string(value).map_err(|e| corrupt(table, e.to_string()))
}

row_fn! { fn pending_from_row(r) -> PendingMessage {
    let from_addr: Option<String> = r.try_get("from_addr")?;
    let direction: String = r.try_get("direction")?;
    let automation: String = r.try_get("automation")?;
    Ok(PendingMessage {
        id: r.try_get("id")?,
        source: r.try_get("source")?,
        direction: Direction::from_stored(&direction),
        automation: automation_from(&automation),
        received_at: from_ms(r.try_get("received_at")?),
        from: from_addr.map(|addr| Address {
            name: r.try_get("from_name").ok().flatten(),
            addr,
        }),
        to: json_vec(r.try_get("to_addrs")?),
        subject: r.try_get("subject")?,
        text: r.try_get("body_text")?,
        message_id: r.try_get("message_id")?,
        in_reply_to: json_vec(r.try_get("in_reply_to")?),
        references: json_vec(r.try_get("refs")?),
        thread_key: r.try_get("thread_key")?,
    })
}}

row_fn! { fn conversation_from_row(r) -> ConversationRow {
    let targets_opened = u32::try_from(r.try_get::<i64, _>("targets_opened")?)
        .map_err(|e| corrupt("conversations", e.to_string()))?;
    // The open target came along through the LEFT JOIN (NULL seq: none open).
    let open = match r.try_get::<Option<i64>, _>("seq")? {
        Some(_) => Some(target_from_row(r)?),
        None => None,
    };
    let last_at = r.try_get::<Option<i64>, _>("clock_last_at")?.map(from_ms);
    Ok(ConversationRow {
        id: r.try_get("id")?,
        source: r.try_get("source")?,
        client_key: r.try_get("client_key")?,
        client_address: r.try_get("client_address")?,
        client_name: r.try_get("client_name")?,
        client_tags: json_vec(r.try_get("client_tags")?),
        subject: r.try_get("subject")?,
        base_subject: r.try_get("base_subject")?,
        owner: r.try_get("owner")?,
        policy: r.try_get("c_policy")?,
        created_at: from_ms(r.try_get("created_at")?),
        last_message_at: from_ms(r.try_get("last_message_at")?),
        clock: ClockState {
            // The clock records the receipt time of every message it applied.
            started: last_at.is_some(),
            started_by_team: r.try_get::<i64, _>("started_by_team")? != 0,
            replied: r.try_get::<i64, _>("replied")? != 0,
            targets_opened,
            open,
            last_at,
        },
        client_rule: r.try_get("client_rule")?,
        owner_rule: r.try_get("owner_rule")?,
        policy_rule: r.try_get("policy_rule")?,
    })
}}

// Every batch statement below takes its rows as one JSON array bound to a single parameter and
// unpacked with json_each: one cached statement and one round trip per step, whatever its size
// (a statement per row costs a trip through sqlx's worker thread each).
impl CoreTx {
    /// Commits the step.
    pub async fn commit(self) -> Result<(), Error> {
        match self.inner {
            CoreInner::Sqlite(_, tx) => tx.commit().await?,
            CoreInner::Postgres(_, tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// Abandons the step.
    pub async fn rollback(self) -> Result<(), Error> {
        match self.inner {
            CoreInner::Sqlite(_, tx) => tx.rollback().await?,
            CoreInner::Postgres(_, tx) => tx.rollback().await?,
        }
        Ok(())
    }

    /// The handled messages of these conversations, as `(conversation, message)`, without their
    /// text (a replay of the SLA clock needs senders, directions and times only).
    pub async fn conversation_log(
        &mut self,
        conversations: &[i64],
    ) -> Result<Vec<(i64, PendingMessage)>, Error> {
        on_core_tx!(self, |db, tx| {
            let rows = sqlx::query(
            db.pick(
"SELECT t.conversation_id, m.id, m.source, m.direction, m.automation, m.received_at, \
             m.from_addr, m.from_name, m.to_addrs, m.subject, NULL AS body_text, m.message_id, \
             m.in_reply_to, m.refs, m.thread_key FROM json_each(?) j \
             JOIN message_threads t ON t.conversation_id = j.value \
             JOIN messages m ON m.id = t.message_id",
"SELECT t.conversation_id, m.id, m.source, m.direction, m.automation, m.received_at, \
             m.from_addr, m.from_name, m.to_addrs, m.subject, NULL AS body_text, m.message_id, \
             m.in_reply_to, m.refs, m.thread_key FROM jsonb_array_elements_text(?::jsonb) j(value) \
             JOIN message_threads t ON t.conversation_id = j.value::bigint \
             JOIN messages m ON m.id = t.message_id",
),
        )
        .bind(to_json("message_threads", &conversations)?)
        .fetch_all(&mut **tx)
        .await?;
            rows.iter()
                .map(|r| Ok((r.try_get("conversation_id")?, pending_from_row(r)?)))
                .collect()
        })
    }

    /// Up to `limit` unprocessed messages, oldest id first.
    pub async fn pending(&mut self, limit: u32) -> Result<Vec<PendingMessage>, Error> {
        on_core_tx!(self, |db, tx| {
            let rows = sqlx::query(db.sql(
                "SELECT m.id, m.source, m.direction, m.automation, m.received_at, m.from_addr, \
             m.from_name, m.to_addrs, m.subject, m.body_text, m.message_id, m.in_reply_to, m.refs, \
             m.thread_key FROM core_queue q JOIN messages m ON m.id = q.message_id \
             ORDER BY q.message_id LIMIT ?",
            ))
            .bind(i64::from(limit))
            .fetch_all(&mut **tx)
            .await?;
            rows.iter().map(pending_from_row).collect()
        })
    }

    /// The highest conversation id so far: the core, the only writer of conversations, numbers
    /// new ones itself so a whole step is written with one statement.
    pub async fn max_conversation_id(&mut self) -> Result<i64, Error> {
        on_core_tx!(self, |db, tx| {
            let (id,): (Option<i64>,) = sqlx::query_as(db.sql("SELECT max(id) FROM conversations"))
                .fetch_one(&mut **tx)
                .await?;
            Ok(id.unwrap_or(0))
        })
    }

    /// `(message_id, conversation)` of processed messages carrying any of these Message-IDs
    /// (the lowest message id first when several carry the same one).
    pub async fn conversations_by_message_ids(
        &mut self,
        ids: &[&str],
    ) -> Result<Vec<(String, i64)>, Error> {
        on_core_tx!(self, |db, tx| {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let rows: Vec<(String, i64)> = sqlx::query_as(db.pick(
"SELECT m.message_id, t.conversation_id FROM json_each(?) j \
             JOIN messages m ON m.message_id = j.value \
             JOIN message_threads t ON t.message_id = m.id \
             WHERE t.conversation_id IS NOT NULL ORDER BY m.id",
"SELECT m.message_id, t.conversation_id FROM jsonb_array_elements_text(?::jsonb) j(value) \
             JOIN messages m ON m.message_id = j.value \
             JOIN message_threads t ON t.message_id = m.id \
             WHERE t.conversation_id IS NOT NULL ORDER BY m.id",
            ))
            .bind(to_json("messages", &ids)?)
            .fetch_all(&mut **tx)
            .await?;
            Ok(rows)
        })
    }

    /// `((source, key), conversation)` for the provider thread keys that are known.
    pub async fn conversations_by_thread_keys(
        &mut self,
        keys: &[(&str, &str)],
    ) -> Result<Vec<((String, String), i64)>, Error> {
        on_core_tx!(self, |db, tx| {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let rows: Vec<(String, String, i64)> = sqlx::query_as(db.pick(
"SELECT k.source, k.thread_key, k.conversation_id FROM json_each(?) j \
             JOIN conversation_keys k ON k.source = j.value ->> 0 AND k.thread_key = j.value ->> 1",
"SELECT k.source, k.thread_key, k.conversation_id FROM jsonb_array_elements(?::jsonb) j(value) \
             JOIN conversation_keys k ON k.source = j.value ->> 0 AND k.thread_key = j.value ->> 1",
            ))
            .bind(to_json("conversation_keys", &keys)?)
            .fetch_all(&mut **tx)
            .await?;
            Ok(rows.into_iter().map(|(s, k, c)| ((s, k), c)).collect())
        })
    }

    /// Ids of conversations with one of these `(client key, base subject)` pairs whose last
    /// message is at or after `since`.
    pub async fn conversations_by_subjects(
        &mut self,
        pairs: &[(&str, &str)],
        since: DateTime<Utc>,
    ) -> Result<Vec<i64>, Error> {
        on_core_tx!(self, |db, tx| {
            if pairs.is_empty() {
                return Ok(Vec::new());
            }
            let rows: Vec<(i64,)> = sqlx::query_as(db.pick(
                "SELECT c.id FROM json_each(?) j JOIN conversations c \
             ON c.client_key = j.value ->> 0 AND c.base_subject = j.value ->> 1 \
             AND c.last_message_at >= ?",
                "SELECT c.id FROM jsonb_array_elements(?::jsonb) j(value) JOIN conversations c \
             ON c.client_key = j.value ->> 0 AND c.base_subject = j.value ->> 1 \
             AND c.last_message_at >= ?",
            ))
            .bind(to_json("conversations", &pairs)?)
            .bind(to_ms(since))
            .fetch_all(&mut **tx)
            .await?;
            Ok(rows.into_iter().map(|r| r.0).collect())
        })
    }

    /// Loads conversations with their clocks and open targets.
    pub async fn load_conversations(&mut self, ids: &[i64]) -> Result<Vec<ConversationRow>, Error> {
        on_core_tx!(self, |db, tx| {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let rows = sqlx::query(
            db.pick(
"SELECT c.id, c.source, c.client_key, c.client_address, c.client_name, c.client_tags, \
             c.subject, c.base_subject, c.owner, c.policy AS c_policy, c.created_at, \
             c.last_message_at, c.started_by_team, c.replied, c.targets_opened, c.clock_last_at, \
             c.client_rule, c.owner_rule, c.policy_rule, t.seq, t.metric, t.policy, \
             t.allowed_ms, t.started_at, t.counting_from, t.warn_at, t.due_at, t.state, t.warned, \
             t.breached, t.fulfilled_at, t.business_ms, t.calendar_ms \
             FROM json_each(?) j JOIN conversations c ON c.id = j.value \
             LEFT JOIN sla_targets t ON t.conversation_id = c.id AND t.seq = c.targets_opened \
             AND t.state NOT IN ('met', 'met_late')",
"SELECT c.id, c.source, c.client_key, c.client_address, c.client_name, c.client_tags, \
             c.subject, c.base_subject, c.owner, c.policy AS c_policy, c.created_at, \
             c.last_message_at, c.started_by_team, c.replied, c.targets_opened, c.clock_last_at, \
             c.client_rule, c.owner_rule, c.policy_rule, t.seq, t.metric, t.policy, \
             t.allowed_ms, t.started_at, t.counting_from, t.warn_at, t.due_at, t.state, t.warned, \
             t.breached, t.fulfilled_at, t.business_ms, t.calendar_ms \
             FROM jsonb_array_elements_text(?::jsonb) j(value) JOIN conversations c ON c.id = j.value::bigint \
             LEFT JOIN sla_targets t ON t.conversation_id = c.id AND t.seq = c.targets_opened \
             AND t.state NOT IN ('met', 'met_late')"),
        )
        .bind(to_json("conversations", &ids)?)
        .fetch_all(&mut **tx)
        .await?;
            rows.iter().map(conversation_from_row).collect()
        })
    }

    /// Loads one conversation with its clock and open target.
    pub async fn conversation(&mut self, id: i64) -> Result<Option<ConversationRow>, Error> {
        Ok(self.load_conversations(&[id]).await?.into_iter().next())
    }

    /// Writes a step: conversations (inserted or updated), thread keys, targets, the handled
    /// messages and alert events; returns how many alert events were new.
    pub async fn write_step(&mut self, w: &StepWrites, now: DateTime<Utc>) -> Result<usize, Error> {
        on_core_tx!(self, |db, tx| {
            let tags: Vec<String> = w
                .conversations
                .iter()
                .map(|c| serde_json::to_string(&c.client_tags).unwrap_or_else(|_| "[]".into()))
                .collect();
            let convs: Vec<(&ConversationRow, &str)> = w
                .conversations
                .iter()
                .zip(tags.iter().map(String::as_str))
                .collect();
            db.insert_rows(
                tx,
                "INSERT INTO conversations (id, source, client_key, client_address, client_name, \
             client_tags, client_rule, subject, base_subject, owner, owner_rule, policy, \
             policy_rule, created_at, last_message_at, started_by_team, replied, targets_opened, \
             clock_last_at, state, waiting_since, due_at, next_deadline) ",
                " ON CONFLICT (id) DO UPDATE SET last_message_at = excluded.last_message_at, \
             started_by_team = excluded.started_by_team, replied = excluded.replied, \
             targets_opened = excluded.targets_opened, clock_last_at = excluded.clock_last_at, \
             state = excluded.state, waiting_since = excluded.waiting_since, \
             due_at = excluded.due_at, next_deadline = excluded.next_deadline",
                &convs,
                |b, (c, tags)| {
                    let clock = &c.clock;
                    let (state, waiting_since, due_at) = listing_state(clock);
                    b.push_bind(c.id)
                        .push_bind(c.source.as_str())
                        .push_bind(c.client_key.as_str())
                        .push_bind(c.client_address.as_str())
                        .push_bind(c.client_name.as_deref())
                        .push_bind(*tags)
                        .push_bind(c.client_rule)
                        .push_bind(c.subject.as_deref())
                        .push_bind(c.base_subject.as_str())
                        .push_bind(c.owner.as_deref())
                        .push_bind(c.owner_rule)
                        .push_bind(c.policy.as_deref())
                        .push_bind(c.policy_rule)
                        .push_bind(to_ms(c.created_at))
                        .push_bind(to_ms(c.last_message_at))
                        .push_bind(i64::from(clock.started_by_team))
                        .push_bind(i64::from(clock.replied))
                        .push_bind(i64::from(clock.targets_opened))
                        .push_bind(clock.last_at.map(to_ms))
                        .push_bind(state)
                        .push_bind(waiting_since)
                        .push_bind(due_at)
                        .push_bind(crate::sla::clock::next_deadline(clock).map(to_ms));
                },
            )
            .await?;
            db.insert_rows(
                tx,
                "INSERT INTO conversation_keys (source, thread_key, conversation_id) ",
                " ON CONFLICT (source, thread_key) DO NOTHING",
                &w.thread_keys,
                |b, (source, key, conv)| {
                    b.push_bind(source.as_str())
                        .push_bind(key.as_str())
                        .push_bind(*conv);
                },
            )
            .await?;
            for (conversation, keep) in &w.truncated {
                sqlx::query(
                    db.sql("DELETE FROM sla_targets WHERE conversation_id = ? AND seq > ?"),
                )
                .bind(conversation)
                .bind(i64::from(*keep))
                .execute(&mut **tx)
                .await?;
            }
            // Owner, source and client are copied from the conversation so statistics group without
            // a join; every target of a step belongs to a conversation the step wrote.
            let by_id: std::collections::HashMap<i64, &ConversationRow> =
                w.conversations.iter().map(|c| (c.id, c)).collect();
            let mut targets = Vec::with_capacity(w.targets.len());
            for (conv, t) in &w.targets {
                let c = by_id.get(conv).ok_or_else(|| {
                    corrupt(
                        "sla_targets",
                        format!("target of conversation {conv} without its conversation"),
                    )
                })?;
                targets.push((*c, t));
            }
            db.insert_rows(
                tx,
                "INSERT INTO sla_targets (conversation_id, seq, metric, policy, allowed_ms, \
             started_at, counting_from, warn_at, due_at, state, warned, breached, fulfilled_at, \
             business_ms, calendar_ms, owner, source, client_key) ",
                " ON CONFLICT (conversation_id, seq) DO UPDATE SET policy = excluded.policy, \
             allowed_ms = excluded.allowed_ms, counting_from = excluded.counting_from, \
             warn_at = excluded.warn_at, due_at = excluded.due_at, state = excluded.state, \
             warned = excluded.warned, breached = excluded.breached, \
             fulfilled_at = excluded.fulfilled_at, business_ms = excluded.business_ms, \
             calendar_ms = excluded.calendar_ms, owner = excluded.owner",
                &targets,
                |b, (c, t)| {
                    b.push_bind(c.id)
                        .push_bind(i64::from(t.seq))
                        .push_bind(t.metric.as_str())
                        .push_bind(t.policy.as_str())
                        .push_bind(ms(t.allowed))
                        .push_bind(to_ms(t.started_at))
                        .push_bind(to_ms(t.counting_from))
                        .push_bind(to_ms(t.warn_at))
                        .push_bind(to_ms(t.due_at))
                        .push_bind(t.state.as_str())
                        .push_bind(i64::from(t.warned))
                        .push_bind(i64::from(t.breached))
                        .push_bind(t.fulfilled_at.map(to_ms))
                        .push_bind(t.business_duration.map(ms))
                        .push_bind(t.calendar_duration.map(ms))
                        .push_bind(c.owner.as_deref())
                        .push_bind(c.source.as_str())
                        .push_bind(c.client_key.as_str());
                },
            )
            .await?;
            let processed_at = to_ms(now);
            db.insert_rows(
            tx,
            "INSERT INTO message_threads (message_id, conversation_id, processed_at) ",
            " ON CONFLICT (message_id) DO UPDATE SET conversation_id = excluded.conversation_id, \
             processed_at = excluded.processed_at",
            &w.processed,
            |b, (message, conv)| {
                b.push_bind(*message)
                    .push_bind(*conv)
                    .push_bind(processed_at);
            },
        )
        .await?;
            let handled: Vec<i64> = w.processed.iter().map(|(m, _)| *m).collect();
            let dequeued = db.delete_queued(tx, &handled).await?;
            if dequeued != handled.len() as u64 {
                return Err(Error::Conflict(format!(
                    "{} of {} messages were handled meanwhile",
                    handled.len() as u64 - dequeued,
                    handled.len()
                )));
            }
            let mut new_alerts = 0;
            for (key, event, at) in &w.alerts {
                if db.insert_alert_event(tx, key, event, *at).await? {
                    new_alerts += 1;
                }
            }
            Ok(new_alerts)
        })
    }

    /// Ids of conversations whose next SLA deadline is at or before `now`.
    pub async fn due_conversations(
        &mut self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<i64>, Error> {
        on_core_tx!(self, |db, tx| {
            let rows: Vec<(i64,)> = sqlx::query_as(
            db.sql("SELECT id FROM conversations WHERE next_deadline IS NOT NULL AND next_deadline <= ? \
             ORDER BY next_deadline LIMIT ?"),
        )
        .bind(to_ms(now))
        .bind(i64::from(limit))
        .fetch_all(&mut **tx)
        .await?;
            Ok(rows.into_iter().map(|r| r.0).collect())
        })
    }

    /// Ids of conversations with an open target (for recomputing after a config change).
    pub async fn open_conversations(&mut self) -> Result<Vec<i64>, Error> {
        on_core_tx!(self, |db, tx| {
            let rows: Vec<(i64,)> = sqlx::query_as(
                db.sql("SELECT id FROM conversations WHERE state != 'idle' ORDER BY id"),
            )
            .fetch_all(&mut **tx)
            .await?;
            Ok(rows.into_iter().map(|r| r.0).collect())
        })
    }
}
