//! Reads for the digest: what arrived since the last digest, source health (the sources' own
//! health rows, the IMAP ledger's unaccounted count, webhook rejections), failed sends.
//!
//! Open conversations and reply times come from the core's tables (`store/core.rs`).

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{Error, Store, from_ms, to_ms};
use crate::digest::{DigestInput, NewMessagesRow, SourceHealthRow, SourceKind};

/// A configured source as the digest needs it: its name and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRef {
    /// The configured source name.
    pub name: String,
    /// IMAP or webhook.
    pub kind: SourceKind,
}

impl Store {
    /// The digest's rows for the window `(since, now]` over the configured `sources`.
    pub async fn digest_input(
        &self,
        sources: &[SourceRef],
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<DigestInput, Error> {
        on_backend!(self, |db| {
            // Client messages (people, not auto-replies or our own mail) per sender.
            let rows = sqlx::query(
            db.sql("SELECT coalesce(nullif(from_name, ''), from_addr, 'unknown sender') AS client, count(*) AS n \
             FROM messages WHERE direction = 'inbound' AND automation = 'human' \
             AND received_at > ? AND received_at <= ? GROUP BY client"),
        )
        .bind(to_ms(since))
        .bind(to_ms(now))
        .fetch_all(db.reader())
        .await?;
            let mut new_messages = Vec::with_capacity(rows.len());
            for r in rows {
                let n: i64 = r.try_get("n")?;
                new_messages.push(NewMessagesRow {
                    client: r.try_get("client")?,
                    owner: None,
                    messages: u64::try_from(n).unwrap_or(0),
                });
            }

            // Health as the sources record it (consecutive failures), the IMAP ledger's unaccounted
            // count from the last reconciliation, and webhook rejections (cumulative counters).
            let health_rows = self.source_health().await?;
            let unaccounted: Vec<(String, i64)> = sqlx::query_as(db.sql(
                "SELECT source, CAST(coalesce(sum(unaccounted), 0) AS BIGINT) FROM imap_cursors GROUP BY source",
            ))
            .fetch_all(db.reader())
            .await?;
            let rejected: Vec<(String, i64)> = sqlx::query_as(db.sql(
                "SELECT source, CAST(coalesce(sum(value), 0) AS BIGINT) FROM webhook_counters \
             WHERE name LIKE 'rejected:%' GROUP BY source",
            ))
            .fetch_all(db.reader())
            .await?;
            let mut health = Vec::with_capacity(sources.len());
            for s in sources {
                let (last,): (Option<i64>,) = sqlx::query_as(
                    db.sql("SELECT max(received_at) FROM messages WHERE source = ?"),
                )
                .bind(&s.name)
                .fetch_one(db.reader())
                .await?;
                let h = health_rows.iter().find(|h| h.source == s.name);
                let count = |rows: &[(String, i64)]| {
                    rows.iter()
                        .find(|(n, _)| *n == s.name)
                        .map_or(0, |(_, v)| u64::try_from(*v).unwrap_or(0))
                };
                health.push(SourceHealthRow {
                    name: s.name.clone(),
                    kind: s.kind,
                    healthy: h.is_none_or(|h| h.healthy),
                    last_message_at: last.map(from_ms),
                    unaccounted: count(&unaccounted),
                    rejections: count(&rejected),
                    error: h.filter(|h| !h.healthy).and_then(|h| h.last_error.clone()),
                });
            }

            Ok(DigestInput {
                since: Some(since),
                open: self.digest_open().await?,
                new_messages,
                // Five weeks: the digest's period plus its trailing 4-week baseline.
                replies: self
                    .digest_replies(
                        now - chrono::TimeDelta::days(35),
                        now + chrono::TimeDelta::milliseconds(1),
                    )
                    .await?,
                sources: health,
                failed_sends: self.outbox_failed_since(since).await?,
                deferred_alerts: Vec::new(),
            })
        })
    }
}
