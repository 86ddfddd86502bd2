//! The messages table: inserting normalized messages exactly once, and listing them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{Row, Sqlite, Transaction};

use super::{Error, Store, from_ms, to_ms};
use crate::message::{Automation, Message};

/// The outcome of storing one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ingested {
    /// The row id (the existing row's id for a duplicate).
    pub id: i64,
    /// True when the origin was already stored and nothing was written.
    pub duplicate: bool,
}

/// Which messages `Store::messages` lists.
#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    /// Only this source.
    pub source: Option<String>,
    /// At most this many (newest first).
    pub limit: Option<u32>,
}

/// A stored message as the CLI shows it (no raw bytes).
#[derive(Debug, Clone, Serialize)]
pub struct StoredMessage {
    /// Row id.
    pub id: i64,
    /// Configured source name.
    pub source: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// Trusted receipt time, UTC.
    pub received_at: DateTime<Utc>,
    /// Sender address.
    pub from: Option<String>,
    /// Subject.
    pub subject: Option<String>,
    /// Email Message-ID without angle brackets.
    pub message_id: Option<String>,
    /// The conversation the core assigned, once processed.
    pub conversation_id: Option<i64>,
    /// `ok` or `degraded`.
    pub parse: String,
    /// Why parsing was degraded.
    pub parse_reason: Option<String>,
}

/// The stored name of an `Automation`.
pub(crate) fn automation_str(a: Automation) -> &'static str {
    match a {
        Automation::Human => "human",
        Automation::Automatic => "automatic",
        Automation::Frontdesk => "frontdesk",
    }
}

/// Inserts one message inside `tx` unless its origin exists; returns the row id either way.
pub(crate) async fn insert_message(
    tx: &mut Transaction<'static, Sqlite>,
    msg: &Message,
    now: DateTime<Utc>,
) -> Result<Ingested, Error> {
    let origin_key = msg.origin.key();
    let origin_json = serde_json::to_string(&msg.origin).map_err(|e| Error::Corrupt {
        table: "messages",
        reason: e.to_string(),
    })?;
    let to_json = serde_json::to_string(&msg.to).unwrap_or_else(|_| "[]".into());
    let irt_json = serde_json::to_string(&msg.in_reply_to).unwrap_or_else(|_| "[]".into());
    let refs_json = serde_json::to_string(&msg.references).unwrap_or_else(|_| "[]".into());
    let parse_reason = match &msg.parse {
        crate::message::ParseStatus::Ok => None,
        crate::message::ParseStatus::Degraded(r) => Some(r.as_str()),
    };
    let sha = hex::encode(Sha256::digest(&msg.raw));
    let inserted: Option<(i64,)> = sqlx::query_as(
        "INSERT INTO messages (source, origin_key, origin, direction, received_at, sent_at, \
         from_addr, from_name, to_addrs, subject, body_text, message_id, in_reply_to, refs, \
         thread_key, automation, parse, parse_reason, raw, raw_sha256, stored_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (source, origin_key) DO NOTHING RETURNING id",
    )
    .bind(&msg.source)
    .bind(&origin_key)
    .bind(&origin_json)
    .bind(msg.direction.as_str())
    .bind(to_ms(msg.received_at))
    .bind(msg.sent_at.map(to_ms))
    .bind(msg.from.as_ref().map(|a| a.addr.as_str()))
    .bind(msg.from.as_ref().and_then(|a| a.name.as_deref()))
    .bind(&to_json)
    .bind(msg.subject.as_deref())
    .bind(msg.text.as_deref())
    .bind(msg.message_id.as_deref())
    .bind(&irt_json)
    .bind(&refs_json)
    .bind(msg.thread_key.as_deref())
    .bind(automation_str(msg.automation))
    .bind(msg.parse.as_str())
    .bind(parse_reason)
    .bind(&msg.raw)
    .bind(&sha)
    .bind(to_ms(now))
    .fetch_optional(&mut **tx)
    .await?;
    if let Some((id,)) = inserted {
        return Ok(Ingested {
            id,
            duplicate: false,
        });
    }
    let (id,): (i64,) =
        sqlx::query_as("SELECT id FROM messages WHERE source = ? AND origin_key = ?")
            .bind(&msg.source)
            .bind(&origin_key)
            .fetch_one(&mut **tx)
            .await?;
    Ok(Ingested {
        id,
        duplicate: true,
    })
}

impl Store {
    /// Stores one message durably (committed and fsync'd on return) unless its origin exists.
    pub async fn ingest(&self, msg: &Message, now: DateTime<Utc>) -> Result<Ingested, Error> {
        let mut tx = self.begin_write().await?;
        let out = insert_message(&mut tx, msg, now).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Stored messages, newest first.
    pub async fn messages(&self, filter: &MessageFilter) -> Result<Vec<StoredMessage>, Error> {
        let limit = i64::from(filter.limit.unwrap_or(50));
        let rows = sqlx::query(
            "SELECT id, source, direction, received_at, from_addr, subject, message_id, \
             conversation_id, parse, parse_reason FROM messages \
             WHERE (?1 IS NULL OR source = ?1) ORDER BY received_at DESC, id DESC LIMIT ?2",
        )
        .bind(filter.source.as_deref())
        .bind(limit)
        .fetch_all(self.reader())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(StoredMessage {
                id: r.try_get("id")?,
                source: r.try_get("source")?,
                direction: r.try_get("direction")?,
                received_at: from_ms(r.try_get("received_at")?),
                from: r.try_get("from_addr")?,
                subject: r.try_get("subject")?,
                message_id: r.try_get("message_id")?,
                conversation_id: r.try_get("conversation_id")?,
                parse: r.try_get("parse")?,
                parse_reason: r.try_get("parse_reason")?,
            });
        }
        Ok(out)
    }

    /// How many messages wait for the core loop.
    pub async fn pending_count(&self) -> Result<i64, Error> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM messages WHERE processed_at IS NULL")
                .fetch_one(self.reader())
                .await?;
        Ok(n)
    }

    /// How many messages are stored (all sources).
    pub async fn message_count(&self) -> Result<i64, Error> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM messages")
            .fetch_one(self.reader())
            .await?;
        Ok(n)
    }
}
