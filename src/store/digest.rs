//! Reads for the digest: what arrived since the last digest, source health, failed sends.
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
        // Client messages (people, not auto-replies or our own mail) per sender.
        let rows = sqlx::query(
            "SELECT coalesce(nullif(from_name, ''), from_addr, 'unknown sender') AS client, count(*) AS n \
             FROM messages WHERE direction = 'inbound' AND automation = 'human' \
             AND received_at > ? AND received_at <= ? GROUP BY client",
        )
        .bind(to_ms(since))
        .bind(to_ms(now))
        .fetch_all(self.reader())
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

        let mut health = Vec::with_capacity(sources.len());
        for s in sources {
            let (last,): (Option<i64>,) =
                sqlx::query_as("SELECT max(received_at) FROM messages WHERE source = ?")
                    .bind(&s.name)
                    .fetch_one(self.reader())
                    .await?;
            // The newest health flip, if the source recorded any ('unhealthy' / 'healthy').
            let flip = sqlx::query(
                "SELECT kind, detail FROM source_events WHERE source = ? \
                 AND kind IN ('unhealthy', 'healthy') ORDER BY at DESC, id DESC LIMIT 1",
            )
            .bind(&s.name)
            .fetch_optional(self.reader())
            .await?;
            let (healthy, error) = match flip {
                Some(r) if r.try_get::<String, _>("kind")? == "unhealthy" => {
                    (false, Some(r.try_get::<String, _>("detail")?))
                }
                _ => (true, None),
            };
            health.push(SourceHealthRow {
                name: s.name.clone(),
                kind: s.kind,
                healthy,
                last_message_at: last.map(from_ms),
                unaccounted: 0,
                rejections: 0,
                error,
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
        })
    }
}
