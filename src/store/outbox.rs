//! The outbox (everything frontdesk sends) and the alert events waiting to be grouped into it.
//!
//! A digest's `slot_key` is unique: pushing the same (digest, recipient, period) twice is a no-op,
//! so a restart at digest time never makes a second one. An item is marked sent only by the sender
//! after the server accepted it.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{Error, Store, Tx, from_ms, to_ms};
use crate::digest::{AlertEvent, FailedSendRow};
use crate::notify::{OutboxItem, OutboxKind, Outcome};

/// A new outbox item, before it has an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOutboxItem {
    /// Digest or alert.
    pub kind: OutboxKind,
    /// Channel name.
    pub channel: String,
    /// Recipient address, or empty for the channel's configured recipients.
    pub recipient: String,
    /// Unique slot (see the module comment).
    pub slot_key: String,
    /// Subject.
    pub subject: String,
    /// Text part.
    pub body_text: String,
    /// HTML part.
    pub body_html: Option<String>,
}

/// One outbox row as the CLI and tests see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutboxRow {
    /// The item.
    pub item: OutboxItem,
    /// `pending`, `sent` or `failed`.
    pub state: String,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// When it was accepted by the server.
    pub sent_at: Option<DateTime<Utc>>,
}

/// The stored name of an alert event kind.
fn event_kind(e: &AlertEvent) -> &'static str {
    match e {
        AlertEvent::SlaWarn { .. } => "sla_warning",
        AlertEvent::SlaBreach { .. } => "sla_breach",
        AlertEvent::SourceUnhealthy { .. } => "source_unhealthy",
        AlertEvent::SourceHealthy { .. } => "source_healthy",
    }
}

row_fn! { fn item_from_row(r) -> OutboxItem {
    let kind: String = r.try_get("kind")?;
    let attempts: i64 = r.try_get("attempts")?;
    Ok(OutboxItem {
        id: r.try_get("id")?,
        kind: OutboxKind::from_stored(&kind),
        channel: r.try_get("channel")?,
        recipient: r.try_get("recipient")?,
        slot_key: r.try_get("slot_key")?,
        subject: r.try_get("subject")?,
        body_text: r.try_get("body_text")?,
        body_html: r.try_get("body_html")?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
    })
}}

twin_impl! {
/// Inserts an item unless its slot exists, inside `tx`; returns the new id, or `None` for a duplicate.
pub(crate) async fn insert_outbox(
    &self,
    tx: &mut Tx<Self>,
    item: &NewOutboxItem,
    now: DateTime<Utc>,
) -> Result<Option<i64>, Error> {
    let id: Option<(i64,)> = sqlx::query_as(
        self.sql("INSERT INTO outbox (kind, channel, recipient, slot_key, subject, body_text, body_html, \
         state, attempts, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?) \
         ON CONFLICT (slot_key) DO NOTHING RETURNING id"),
    )
    .bind(item.kind.as_str())
    .bind(&item.channel)
    .bind(&item.recipient)
    .bind(&item.slot_key)
    .bind(&item.subject)
    .bind(&item.body_text)
    .bind(item.body_html.as_deref())
    .bind(to_ms(now))
    .bind(to_ms(now))
    .fetch_optional(&mut **tx)
    .await?;
    Ok(id.map(|(id,)| id))
}
}

impl Store {
    /// Whether an item with this slot exists already (whatever its state).
    pub async fn outbox_slot_exists(&self, slot_key: &str) -> Result<bool, Error> {
        on_backend!(self, |db| {
            let row: Option<(i64,)> =
                sqlx::query_as(db.sql("SELECT id FROM outbox WHERE slot_key = ?"))
                    .bind(slot_key)
                    .fetch_optional(db.reader())
                    .await?;
            Ok(row.is_some())
        })
    }

    /// Puts an item into the outbox unless its slot exists; returns the new id, `None` if it existed.
    pub async fn outbox_push(
        &self,
        item: &NewOutboxItem,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>, Error> {
        on_backend!(self, |db| {
            let mut tx = db.begin_write().await?;
            let id = db.insert_outbox(&mut tx, item, now).await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    /// Pending items due at `now`, oldest first.
    pub async fn outbox_due(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, Error> {
        on_backend!(self, |db| {
            let rows = sqlx::query(
            db.sql("SELECT id, kind, channel, recipient, slot_key, subject, body_text, body_html, attempts \
             FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? \
             ORDER BY next_attempt_at, id LIMIT ?"),
        )
        .bind(to_ms(now))
        .bind(i64::from(limit))
        .fetch_all(db.writer())
        .await?;
            rows.iter().map(item_from_row).collect()
        })
    }

    /// Claims a due pending item for one attempt by moving its due time `lease` ahead; false if it
    /// is not due or another sender claimed it. A sender that dies mid-send leaves the item due
    /// again after the lease (at-least-once).
    pub async fn outbox_claim(
        &self,
        id: i64,
        now: DateTime<Utc>,
        lease: chrono::TimeDelta,
    ) -> Result<bool, Error> {
        on_backend!(self, |db| {
            let mut tx = db.begin_write().await?;
            let done = sqlx::query(
            db.sql("UPDATE outbox SET next_attempt_at = ? WHERE id = ? AND state = 'pending' AND next_attempt_at <= ?"),
        )
        .bind(to_ms(now + lease))
        .bind(id)
        .bind(to_ms(now))
        .execute(&mut *tx)
        .await?;
            tx.commit().await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// When the next pending item is due, if any (the sender sleeps until then).
    pub async fn outbox_next_due(&self) -> Result<Option<DateTime<Utc>>, Error> {
        on_backend!(self, |db| {
            let (at,): (Option<i64>,) = sqlx::query_as(
                db.sql("SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending'"),
            )
            .fetch_one(db.writer())
            .await?;
            Ok(at.map(from_ms))
        })
    }

    /// Records the result of one attempt; only a pending item changes (a sent item stays sent).
    pub async fn outbox_record(
        &self,
        id: i64,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        on_backend!(self, |db| {
            let q = match outcome {
            Outcome::Sent => sqlx::query(
                db.sql("UPDATE outbox SET state = 'sent', sent_at = ?, attempts = attempts + 1 \
                 WHERE id = ? AND state = 'pending'"),
            )
            .bind(to_ms(now))
            .bind(id),
            Outcome::Retry { at, error } => sqlx::query(
                db.sql("UPDATE outbox SET next_attempt_at = ?, last_error = ?, attempts = attempts + 1 \
                 WHERE id = ? AND state = 'pending'"),
            )
            .bind(to_ms(*at))
            .bind(error)
            .bind(id),
            Outcome::Failed { error } => sqlx::query(
                db.sql("UPDATE outbox SET state = 'failed', failed_at = ?, last_error = ?, attempts = attempts + 1 \
                 WHERE id = ? AND state = 'pending'"),
            )
            .bind(to_ms(now))
            .bind(error)
            .bind(id),
        };
            let mut tx = db.begin_write().await?;
            q.execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Items that failed permanently after `since`, for the next digest.
    pub async fn outbox_failed_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<FailedSendRow>, Error> {
        on_backend!(self, |db| {
            let rows = sqlx::query(db.sql(
                "SELECT id, kind, channel, recipient, last_error, failed_at FROM outbox \
             WHERE state = 'failed' AND failed_at > ? ORDER BY failed_at",
            ))
            .bind(to_ms(since))
            .fetch_all(db.reader())
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let recipient: String = r.try_get("recipient")?;
                out.push(FailedSendRow {
                    outbox_id: r.try_get("id")?,
                    kind: r.try_get("kind")?,
                    channel: r.try_get("channel")?,
                    recipient: if recipient.is_empty() {
                        "the configured recipients".to_string()
                    } else {
                        recipient
                    },
                    error: r
                        .try_get::<Option<String>, _>("last_error")?
                        .unwrap_or_default(),
                    failed_at: from_ms(r.try_get::<Option<i64>, _>("failed_at")?.unwrap_or(0)),
                });
            }
            Ok(out)
        })
    }

    /// Every outbox row, newest first (CLI and tests).
    pub async fn outbox_list(&self, limit: u32) -> Result<Vec<OutboxRow>, Error> {
        on_backend!(self, |db| {
            let rows = sqlx::query(
            db.sql("SELECT id, kind, channel, recipient, slot_key, subject, body_text, body_html, attempts, \
             state, last_error, sent_at FROM outbox ORDER BY id DESC LIMIT ?"),
        )
        .bind(i64::from(limit))
        .fetch_all(db.writer())
        .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push(OutboxRow {
                    item: item_from_row(r)?,
                    state: r.try_get("state")?,
                    last_error: r.try_get("last_error")?,
                    sent_at: r.try_get::<Option<i64>, _>("sent_at")?.map(from_ms),
                });
            }
            Ok(out)
        })
    }

    /// Records an alert event once per `dedupe_key` (e.g. `breach:<conversation>:<instance>`);
    /// returns false when it was recorded before. The core calls this when a clock warns or breaches.
    pub async fn alert_event_push(
        &self,
        dedupe_key: &str,
        event: &AlertEvent,
        at: DateTime<Utc>,
    ) -> Result<bool, Error> {
        on_backend!(self, |db| {
            let mut tx = db.begin_write().await?;
            let fresh = db
                .insert_alert_event(&mut tx, dedupe_key, event, at)
                .await?;
            tx.commit().await?;
            Ok(fresh)
        })
    }

    /// Groups pending alert events into one outbox item when the oldest is at least `group_wait`
    /// old (Alertmanager's group_wait): every pending event joins the group, and each is marked
    /// with the outbox id in the same transaction, so each event is sent once. `render` turns the
    /// events into the item. Returns the new outbox id, if a group was made.
    pub async fn alert_group(
        &self,
        now: DateTime<Utc>,
        group_wait: chrono::TimeDelta,
        render: impl FnOnce(Vec<AlertEvent>) -> Option<NewOutboxItem>,
    ) -> Result<Option<i64>, Error> {
        on_backend!(self, |db| {
            let mut tx = db.begin_write().await?;
            let (oldest,): (Option<i64>,) =
                sqlx::query_as(db.sql("SELECT min(at) FROM alert_events WHERE outbox_id IS NULL"))
                    .fetch_one(&mut *tx)
                    .await?;
            let Some(oldest) = oldest else {
                return Ok(None);
            };
            if from_ms(oldest) + group_wait > now {
                return Ok(None);
            }
            let rows = sqlx::query(db.sql(
                "SELECT id, payload FROM alert_events WHERE outbox_id IS NULL ORDER BY at, id",
            ))
            .fetch_all(&mut *tx)
            .await?;
            let mut ids = Vec::with_capacity(rows.len());
            let mut events = Vec::with_capacity(rows.len());
            for r in &rows {
                let payload: String = r.try_get("payload")?;
                ids.push(r.try_get::<i64, _>("id")?);
                events.push(serde_json::from_str::<AlertEvent>(&payload).map_err(|e| {
                    Error::Corrupt {
                        table: "alert_events",
                        reason: e.to_string(),
                    }
                })?);
            }
            let (first, last) = (ids[0], ids[ids.len() - 1]);
            let Some(mut item) = render(events) else {
                // Nothing in the group is configured to alert (alerts.on): drop the events.
                sqlx::query(db.sql(
                    "DELETE FROM alert_events WHERE outbox_id IS NULL AND id BETWEEN ? AND ?",
                ))
                .bind(first)
                .bind(last)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok(None);
            };
            item.slot_key = format!("alert:{first}-{last}");
            let Some(outbox_id) = db.insert_outbox(&mut tx, &item, now).await? else {
                return Ok(None);
            };
            sqlx::query(
            db.sql("UPDATE alert_events SET outbox_id = ? WHERE outbox_id IS NULL AND id BETWEEN ? AND ?"),
        )
        .bind(outbox_id)
        .bind(first)
        .bind(last)
        .execute(&mut *tx)
        .await?;
            tx.commit().await?;
            Ok(Some(outbox_id))
        })
    }

    /// When the oldest ungrouped alert event happened, if any (the sender wakes group_wait later).
    pub async fn alert_oldest_pending(&self) -> Result<Option<DateTime<Utc>>, Error> {
        on_backend!(self, |db| {
            let (at,): (Option<i64>,) =
                sqlx::query_as(db.sql("SELECT min(at) FROM alert_events WHERE outbox_id IS NULL"))
                    .fetch_one(db.writer())
                    .await?;
            Ok(at.map(from_ms))
        })
    }

    /// Ungrouped alert events with their ids, oldest first (deferred into a digest in quiet hours).
    pub async fn alert_events_pending(&self) -> Result<Vec<(i64, AlertEvent)>, Error> {
        on_backend!(self, |db| {
            let rows = sqlx::query(db.sql(
                "SELECT id, payload FROM alert_events WHERE outbox_id IS NULL ORDER BY at, id",
            ))
            .fetch_all(db.writer())
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let payload: String = r.try_get("payload")?;
                let event =
                    serde_json::from_str::<AlertEvent>(&payload).map_err(|e| Error::Corrupt {
                        table: "alert_events",
                        reason: e.to_string(),
                    })?;
                out.push((r.try_get("id")?, event));
            }
            Ok(out)
        })
    }

    /// Marks events as delivered inside the outbox item `outbox_id` (a digest that listed them as
    /// deferred), so no alert repeats them.
    pub async fn alert_events_attach(&self, ids: &[i64], outbox_id: i64) -> Result<(), Error> {
        on_backend!(self, |db| {
            let mut tx = db.begin_write().await?;
            for id in ids {
                sqlx::query(db.sql(
                    "UPDATE alert_events SET outbox_id = ? WHERE id = ? AND outbox_id IS NULL",
                ))
                .bind(outbox_id)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }
}

twin_impl! {
/// Inserts one alert event inside `tx` (for the core's clock transaction); false if known.
pub(crate) async fn insert_alert_event(
    &self,
    tx: &mut Tx<Self>,
    dedupe_key: &str,
    event: &AlertEvent,
    at: DateTime<Utc>,
) -> Result<bool, Error> {
    let payload = serde_json::to_string(event).map_err(|e| Error::Corrupt {
        table: "alert_events",
        reason: e.to_string(),
    })?;
    let done = sqlx::query(
        self.sql("INSERT INTO alert_events (kind, dedupe_key, payload, at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (dedupe_key) DO NOTHING"),
    )
    .bind(event_kind(event))
    .bind(dedupe_key)
    .bind(&payload)
    .bind(to_ms(at))
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn new_item(slot: &str) -> NewOutboxItem {
        NewOutboxItem {
            kind: OutboxKind::Digest,
            channel: "office-mail".into(),
            recipient: "maria@example.com".into(),
            slot_key: slot.into(),
            subject: "s".into(),
            body_text: "t".into(),
            body_html: Some("<p>h</p>".into()),
        }
    }

    store_tests! {
    async fn a_slot_is_pushed_once_and_marked_sent_once(store: Store) {
        let now = Utc::now();
        let id = store
            .outbox_push(&new_item("digest:a"), now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store.outbox_push(&new_item("digest:a"), now).await.unwrap(),
            None
        );
        assert_eq!(store.outbox_due(now, 10).await.unwrap().len(), 1);
        let later = now + TimeDelta::seconds(30);
        store
            .outbox_record(
                id,
                &Outcome::Retry {
                    at: later,
                    error: "451".into(),
                },
                now,
            )
            .await
            .unwrap();
        assert!(store.outbox_due(now, 10).await.unwrap().is_empty());
        let due = store.outbox_due(later, 10).await.unwrap();
        assert_eq!(due[0].attempts, 1);
        store
            .outbox_record(id, &Outcome::Sent, later)
            .await
            .unwrap();
        // A late failure report cannot turn a sent item into a failed one.
        store
            .outbox_record(id, &Outcome::Failed { error: "x".into() }, later)
            .await
            .unwrap();
        let rows = store.outbox_list(10).await.unwrap();
        assert_eq!(rows[0].state, "sent");
        assert!(store.outbox_due(later, 10).await.unwrap().is_empty());
    }
    }

    store_tests! {
    async fn failed_items_are_listed_for_the_next_digest(store: Store) {
        let now = Utc::now();
        let id = store
            .outbox_push(&new_item("digest:b"), now)
            .await
            .unwrap()
            .unwrap();
        store
            .outbox_record(
                id,
                &Outcome::Failed {
                    error: "550 no such user".into(),
                },
                now,
            )
            .await
            .unwrap();
        let failed = store
            .outbox_failed_since(now - TimeDelta::hours(1))
            .await
            .unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].error, "550 no such user");
        assert!(store.outbox_failed_since(now).await.unwrap().is_empty());
    }
    }

    store_tests! {
    async fn alert_events_are_grouped_once_after_group_wait(store: Store) {
        let t0 = Utc::now();
        let ev = |s: &str| AlertEvent::SourceHealthy { source: s.into() };
        assert!(store.alert_event_push("a", &ev("a"), t0).await.unwrap());
        assert!(
            !store.alert_event_push("a", &ev("a"), t0).await.unwrap(),
            "deduped"
        );
        assert!(
            store
                .alert_event_push("b", &ev("b"), t0 + TimeDelta::seconds(20))
                .await
                .unwrap()
        );
        let wait = TimeDelta::minutes(1);
        let render = |events: Vec<AlertEvent>| {
            Some(NewOutboxItem {
                kind: OutboxKind::Alert,
                body_text: format!("{} events", events.len()),
                ..new_item("")
            })
        };
        assert_eq!(
            store
                .alert_group(t0 + TimeDelta::seconds(30), wait, render)
                .await
                .unwrap(),
            None
        );
        let id = store
            .alert_group(t0 + wait, wait, render)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store
                .alert_group(t0 + wait * 10, wait, render)
                .await
                .unwrap(),
            None
        );
        let rows = store.outbox_list(10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].item.id, id);
        assert_eq!(rows[0].item.body_text, "2 events");
    }
    }
}
