//! The core loop's SQL: pending messages, conversations, SLA targets and alert rows.
//!
//! Everything the core does for one batch happens inside one [`CoreTx`], so a crash leaves either
//! the whole step or none of it; alert rows carry a unique `slot_key`, so a replayed step never
//! writes a second alert for the same target event.

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, Transaction};

use super::{Error, Store, from_ms, to_ms};
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

/// What a new conversation starts with.
#[derive(Debug, Clone)]
pub struct NewConversation<'a> {
    /// Source of the first message.
    pub source: &'a str,
    /// Client identity key.
    pub client_key: &'a str,
    /// Client address.
    pub client_address: &'a str,
    /// Configured client name.
    pub client_name: Option<&'a str>,
    /// Client tags.
    pub client_tags: &'a [String],
    /// Index of the client rule that matched.
    pub client_rule: Option<usize>,
    /// Subject of the first message.
    pub subject: Option<&'a str>,
    /// Its base subject.
    pub base_subject: &'a str,
    /// Owner and the index of the rule that named it.
    pub owner: Option<(usize, &'a str)>,
    /// Policy and the index of the rule that chose it.
    pub policy: Option<(usize, &'a str)>,
    /// Receipt time of the first message.
    pub created_at: DateTime<Utc>,
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

/// One transaction of the core loop.
pub struct CoreTx {
    tx: Transaction<'static, Sqlite>,
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

fn target_from_row(r: &SqliteRow) -> Result<Target, Error> {
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
}

impl Store {
    /// Starts a core transaction (takes the write lock up front).
    pub async fn begin_core(&self) -> Result<CoreTx, Error> {
        Ok(CoreTx {
            tx: self.begin_write().await?,
        })
    }

    /// Stores many messages in one transaction (bulk loads and benchmarks); duplicates are skipped.
    pub async fn ingest_many(
        &self,
        msgs: &[crate::message::Message],
        now: DateTime<Utc>,
    ) -> Result<usize, Error> {
        let mut tx = self.begin_write().await?;
        let mut n = 0;
        for m in msgs {
            if !super::messages::insert_message(&mut tx, m, now)
                .await?
                .duplicate
            {
                n += 1;
            }
        }
        tx.commit().await?;
        Ok(n)
    }

    /// The earliest pending SLA deadline (warning or due time) over all conversations.
    pub async fn next_core_deadline(&self) -> Result<Option<DateTime<Utc>>, Error> {
        let (t,): (Option<i64>,) = sqlx::query_as(
            "SELECT min(next_deadline) FROM conversations WHERE next_deadline IS NOT NULL",
        )
        .fetch_one(self.reader())
        .await?;
        Ok(t.map(from_ms))
    }

    /// All SLA targets of a conversation, in order (for tests and `explain`).
    pub async fn targets_of(&self, conversation: i64) -> Result<Vec<Target>, Error> {
        let rows = sqlx::query("SELECT * FROM sla_targets WHERE conversation_id = ? ORDER BY seq")
            .bind(conversation)
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(target_from_row).collect()
    }

    /// Conversations, most urgent first (earliest due time, then latest activity).
    pub async fn conversations(
        &self,
        f: &ConversationFilter,
    ) -> Result<Vec<ConversationListing>, Error> {
        let state = f.state.as_deref().filter(|s| *s != "all");
        let rows = sqlx::query(
            "SELECT id, coalesce(client_name, client_address) AS client, owner, subject, state, \
             waiting_since, due_at, policy, last_message_at FROM conversations \
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR owner = ?2) \
             ORDER BY due_at IS NULL, due_at, last_message_at DESC",
        )
        .bind(state)
        .bind(f.owner.as_deref())
        .fetch_all(self.reader())
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
    }

    /// Fulfilled targets with replies in `[since, until)`, for `frontdesk stats` and digests.
    pub async fn fulfilled_targets(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<crate::sla::stats::Fulfilled>, Error> {
        let rows = sqlx::query(
            "SELECT t.metric, t.source, t.owner, coalesce(c.client_name, c.client_address) AS client, \
             t.business_ms, t.calendar_ms, t.state, t.fulfilled_at \
             FROM sla_targets t JOIN conversations c ON c.id = t.conversation_id \
             WHERE t.fulfilled_at IS NOT NULL AND t.fulfilled_at >= ? AND t.fulfilled_at < ?",
        )
        .bind(to_ms(since))
        .bind(to_ms(until))
        .fetch_all(self.reader())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let metric: String = r.try_get("metric")?;
            let state: String = r.try_get("state")?;
            out.push(crate::sla::stats::Fulfilled {
                metric: Metric::from_stored(&metric)
                    .ok_or_else(|| corrupt("sla_targets", format!("unknown metric {metric}")))?,
                source: r.try_get("source")?,
                owner: r.try_get("owner")?,
                client: r.try_get("client")?,
                business_ms: r.try_get::<Option<i64>, _>("business_ms")?.unwrap_or(0),
                calendar_ms: r.try_get::<Option<i64>, _>("calendar_ms")?.unwrap_or(0),
                met: state == "met",
                fulfilled_at: from_ms(r.try_get("fulfilled_at")?),
            });
        }
        Ok(out)
    }

    /// The conversation a message was threaded into, if processed.
    pub async fn conversation_of_message(&self, message: i64) -> Result<Option<i64>, Error> {
        let row: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT conversation_id FROM messages WHERE id = ?")
                .bind(message)
                .fetch_optional(self.reader())
                .await?;
        Ok(row.and_then(|r| r.0))
    }

    /// Open conversations (a client waiting) for the digest, oldest wait first.
    pub async fn digest_open(&self) -> Result<Vec<crate::digest::ConversationRow>, Error> {
        let rows = sqlx::query(
            // Named as people say it: the client rule's name, else the sender's own display
            // name, else the address. Without a subject (SMS, chat, forms), the first words of
            // the latest client message stand in (digest.md).
            "SELECT c.id, coalesce(c.client_name, \
               (SELECT m.from_name FROM messages m WHERE m.conversation_id = c.id \
                AND m.direction = 'inbound' AND m.from_name <> '' ORDER BY m.id LIMIT 1), \
               c.client_address) AS client, \
             coalesce(nullif(c.subject, ''), \
               (SELECT substr(m.body_text, 1, 200) FROM messages m WHERE m.conversation_id = c.id \
                AND m.direction = 'inbound' ORDER BY m.id DESC LIMIT 1)) AS subject, c.owner, \
             t.policy, t.metric, t.allowed_ms, t.started_at, t.warn_at, t.due_at \
             FROM conversations c JOIN sla_targets t \
             ON t.conversation_id = c.id AND t.seq = c.targets_opened \
             WHERE c.state != 'idle' ORDER BY t.started_at",
        )
        .fetch_all(self.reader())
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
    }

    /// Fulfilled targets with replies in `[since, until)` as the digest reads them.
    pub async fn digest_replies(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<crate::digest::ReplyRow>, Error> {
        let rows = sqlx::query(
            "SELECT t.conversation_id, coalesce(c.client_name, c.client_address) AS client, \
             t.owner, t.metric, t.fulfilled_at, t.business_ms, t.state \
             FROM sla_targets t JOIN conversations c ON c.id = t.conversation_id \
             WHERE t.fulfilled_at IS NOT NULL AND t.fulfilled_at >= ? AND t.fulfilled_at < ? \
             ORDER BY t.fulfilled_at",
        )
        .bind(to_ms(since))
        .bind(to_ms(until))
        .fetch_all(self.reader())
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
    }

    /// Dedupe keys of the SLA alert events, in insertion order.
    pub async fn sla_alert_keys(&self) -> Result<Vec<String>, Error> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT dedupe_key FROM alert_events WHERE kind IN ('sla_warning', 'sla_breach') \
             ORDER BY id",
        )
        .fetch_all(self.reader())
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// A conversation by id (for tests and `explain`).
    pub async fn conversation(&self, id: i64) -> Result<Option<ConversationRow>, Error> {
        let mut tx = self.begin_core().await?;
        let c = tx.conversation(id).await?;
        tx.rollback().await?;
        Ok(c)
    }
}

impl CoreTx {
    /// Commits the step.
    pub async fn commit(self) -> Result<(), Error> {
        Ok(self.tx.commit().await?)
    }

    /// Abandons the step.
    pub async fn rollback(self) -> Result<(), Error> {
        Ok(self.tx.rollback().await?)
    }

    /// Up to `limit` unprocessed messages, oldest id first.
    pub async fn pending(&mut self, limit: u32) -> Result<Vec<PendingMessage>, Error> {
        let rows = sqlx::query(
            "SELECT id, source, direction, automation, received_at, from_addr, from_name, to_addrs, \
             subject, body_text, message_id, in_reply_to, refs, thread_key FROM messages \
             WHERE processed_at IS NULL ORDER BY id LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *self.tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let from_addr: Option<String> = r.try_get("from_addr")?;
            let direction: String = r.try_get("direction")?;
            let automation: String = r.try_get("automation")?;
            out.push(PendingMessage {
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
            });
        }
        Ok(out)
    }

    /// `(message_id, conversation)` for processed messages carrying any of these Message-IDs.
    pub async fn conversations_by_message_ids(
        &mut self,
        ids: &[String],
    ) -> Result<Vec<(String, i64)>, Error> {
        let mut out = Vec::new();
        // One lookup per id keeps the statement cacheable; threads carry few ids.
        for id in ids.iter().take(50) {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT message_id, conversation_id FROM messages \
                 WHERE message_id = ? AND conversation_id IS NOT NULL LIMIT 1",
            )
            .bind(id)
            .fetch_all(&mut *self.tx)
            .await?;
            out.extend(rows);
        }
        Ok(out)
    }

    /// The conversation holding a provider thread key of a source.
    pub async fn conversation_by_thread_key(
        &mut self,
        source: &str,
        key: &str,
    ) -> Result<Option<i64>, Error> {
        let row: Option<(i64,)> = sqlx::query_as(
            "SELECT conversation_id FROM conversation_keys WHERE source = ? AND thread_key = ?",
        )
        .bind(source)
        .bind(key)
        .fetch_optional(&mut *self.tx)
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// `(conversation, last_message_at)` of a client's conversations with this base subject
    /// whose last message is at or after `since`.
    pub async fn conversations_by_subject(
        &mut self,
        client_key: &str,
        base_subject: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<(i64, DateTime<Utc>)>, Error> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT id, last_message_at FROM conversations \
             WHERE client_key = ? AND base_subject = ? AND last_message_at >= ?",
        )
        .bind(client_key)
        .bind(base_subject)
        .bind(to_ms(since))
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows.into_iter().map(|(id, t)| (id, from_ms(t))).collect())
    }

    /// Loads a conversation with its clock (and open target).
    pub async fn conversation(&mut self, id: i64) -> Result<Option<ConversationRow>, Error> {
        let Some(r) = sqlx::query(
            "SELECT id, source, client_key, client_address, client_name, client_tags, subject, \
             base_subject, owner, policy, last_message_at, started_by_team, replied, \
             targets_opened, clock_last_at, client_rule, owner_rule, policy_rule \
             FROM conversations WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await?
        else {
            return Ok(None);
        };
        let targets_opened = u32::try_from(r.try_get::<i64, _>("targets_opened")?)
            .map_err(|e| corrupt("conversations", e.to_string()))?;
        let open = if targets_opened > 0 {
            let row = sqlx::query(
                "SELECT * FROM sla_targets WHERE conversation_id = ? AND seq = ? \
                 AND state NOT IN ('met', 'met_late')",
            )
            .bind(id)
            .bind(i64::from(targets_opened))
            .fetch_optional(&mut *self.tx)
            .await?;
            row.as_ref().map(target_from_row).transpose()?
        } else {
            None
        };
        let last_at = r.try_get::<Option<i64>, _>("clock_last_at")?.map(from_ms);
        Ok(Some(ConversationRow {
            id,
            source: r.try_get("source")?,
            client_key: r.try_get("client_key")?,
            client_address: r.try_get("client_address")?,
            client_name: r.try_get("client_name")?,
            client_tags: json_vec(r.try_get("client_tags")?),
            subject: r.try_get("subject")?,
            base_subject: r.try_get("base_subject")?,
            owner: r.try_get("owner")?,
            policy: r.try_get("policy")?,
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
        }))
    }

    /// Creates a conversation; returns its id.
    pub async fn create_conversation(&mut self, c: &NewConversation<'_>) -> Result<i64, Error> {
        let tags = serde_json::to_string(c.client_tags).unwrap_or_else(|_| "[]".into());
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO conversations (source, client_key, client_address, client_name, \
             client_tags, client_rule, subject, base_subject, owner, owner_rule, policy, \
             policy_rule, created_at, last_message_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(c.source)
        .bind(c.client_key)
        .bind(c.client_address)
        .bind(c.client_name)
        .bind(&tags)
        .bind(c.client_rule.map(|i| i as i64))
        .bind(c.subject)
        .bind(c.base_subject)
        .bind(c.owner.map(|o| o.1))
        .bind(c.owner.map(|o| o.0 as i64))
        .bind(c.policy.map(|p| p.1))
        .bind(c.policy.map(|p| p.0 as i64))
        .bind(to_ms(c.created_at))
        .bind(to_ms(c.created_at))
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(id)
    }

    /// Records a provider thread key for a conversation (first one wins).
    pub async fn add_thread_key(
        &mut self,
        source: &str,
        key: &str,
        conversation: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO conversation_keys (source, thread_key, conversation_id) VALUES (?, ?, ?) \
             ON CONFLICT (source, thread_key) DO NOTHING",
        )
        .bind(source)
        .bind(key)
        .bind(conversation)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Writes a target instance (insert or update by `(conversation, seq)`).
    pub async fn save_target(&mut self, c: &ConversationRow, t: &Target) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO sla_targets (conversation_id, seq, metric, policy, allowed_ms, started_at, \
             counting_from, warn_at, due_at, state, warned, breached, fulfilled_at, business_ms, \
             calendar_ms, owner, source, client_key) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (conversation_id, seq) DO UPDATE SET policy = excluded.policy, \
             allowed_ms = excluded.allowed_ms, counting_from = excluded.counting_from, \
             warn_at = excluded.warn_at, due_at = excluded.due_at, state = excluded.state, \
             warned = excluded.warned, breached = excluded.breached, \
             fulfilled_at = excluded.fulfilled_at, business_ms = excluded.business_ms, \
             calendar_ms = excluded.calendar_ms, owner = excluded.owner",
        )
        .bind(c.id)
        .bind(i64::from(t.seq))
        .bind(t.metric.as_str())
        .bind(&t.policy)
        .bind(ms(t.allowed))
        .bind(to_ms(t.started_at))
        .bind(to_ms(t.counting_from))
        .bind(to_ms(t.warn_at))
        .bind(to_ms(t.due_at))
        .bind(t.state.as_str())
        .bind(i64::from(t.warned))
        .bind(i64::from(t.breached))
        .bind(t.fulfilled_at.map(to_ms))
        .bind(t.business_duration.map(ms))
        .bind(t.calendar_duration.map(ms))
        .bind(c.owner.as_deref())
        .bind(&c.source)
        .bind(&c.client_key)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Writes the conversation's clock and its derived listing columns, and its open target when
    /// `target_changed` (skipping an unchanged target saves a statement per message).
    pub async fn save_conversation(
        &mut self,
        c: &ConversationRow,
        target_changed: bool,
    ) -> Result<(), Error> {
        let clock = &c.clock;
        let (state, waiting_since, due_at) = match &clock.open {
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
        };
        let next = crate::sla::clock::next_deadline(clock).map(to_ms);
        sqlx::query(
            "UPDATE conversations SET last_message_at = ?, started_by_team = ?, replied = ?, \
             targets_opened = ?, clock_last_at = ?, state = ?, waiting_since = ?, due_at = ?, \
             next_deadline = ? WHERE id = ?",
        )
        .bind(to_ms(c.last_message_at))
        .bind(i64::from(clock.started_by_team))
        .bind(i64::from(clock.replied))
        .bind(i64::from(clock.targets_opened))
        .bind(clock.last_at.map(to_ms))
        .bind(state)
        .bind(waiting_since)
        .bind(due_at)
        .bind(next)
        .bind(c.id)
        .execute(&mut *self.tx)
        .await?;
        if let Some(t) = clock.open.as_ref().filter(|_| target_changed) {
            self.save_target(c, t).await?;
        }
        Ok(())
    }

    /// Marks a message handled and records its conversation (`None`: ignored, e.g. no client).
    pub async fn mark_processed(
        &mut self,
        message: i64,
        conversation: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        sqlx::query("UPDATE messages SET processed_at = ?, conversation_id = ? WHERE id = ?")
            .bind(to_ms(now))
            .bind(conversation)
            .bind(message)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Ids of conversations whose next SLA deadline is at or before `now`.
    pub async fn due_conversations(
        &mut self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<i64>, Error> {
        let rows: Vec<(i64,)> = sqlx::query_as(
            "SELECT id FROM conversations WHERE next_deadline IS NOT NULL AND next_deadline <= ? \
             ORDER BY next_deadline LIMIT ?",
        )
        .bind(to_ms(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Ids of conversations with an open target (for recomputing after a config change).
    pub async fn open_conversations(&mut self) -> Result<Vec<i64>, Error> {
        let rows: Vec<(i64,)> =
            sqlx::query_as("SELECT id FROM conversations WHERE state != 'idle' ORDER BY id")
                .fetch_all(&mut *self.tx)
                .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Records a warn or breach event for the sender to group into an alert, once per
    /// `dedupe_key`, in this transaction; true if it was new.
    pub async fn push_alert_event(
        &mut self,
        dedupe_key: &str,
        event: &crate::digest::AlertEvent,
        at: DateTime<Utc>,
    ) -> Result<bool, Error> {
        super::outbox::insert_alert_event(&mut self.tx, dedupe_key, event, at).await
    }
}
