//! Figures for `/metrics`, read from the durable state at scrape time so they survive restarts.

use sqlx::Row;

use super::{Error, Store};

/// One labelled value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: &'static str,
    /// Label pairs.
    pub labels: Vec<(&'static str, String)>,
    /// Value.
    pub value: f64,
}

fn sample(name: &'static str, labels: Vec<(&'static str, String)>, value: i64) -> Sample {
    Sample {
        name,
        labels,
        value: value as f64,
    }
}

impl Store {
    /// Every figure the store can give, as Prometheus samples.
    pub async fn metrics_samples(&self) -> Result<Vec<Sample>, Error> {
        on_backend!(self, |db| {
            let mut out = Vec::new();
            let rows = sqlx::query(db.sql(
                "SELECT source, direction, parse, count(*) AS n FROM messages GROUP BY 1, 2, 3",
            ))
            .fetch_all(db.reader())
            .await?;
            for r in rows {
                out.push(sample(
                    "frontdesk_messages_total",
                    vec![
                        ("source", r.try_get("source")?),
                        ("direction", r.try_get("direction")?),
                        ("parse", r.try_get("parse")?),
                    ],
                    r.try_get("n")?,
                ));
            }
            out.push(sample(
                "frontdesk_messages_pending",
                vec![],
                self.pending_count().await?,
            ));
            let rows = sqlx::query(db.sql("SELECT source, name, value FROM webhook_counters"))
                .fetch_all(db.reader())
                .await?;
            for r in rows {
                let name: String = r.try_get("name")?;
                let (result, reason) = match name.split_once(':') {
                    Some((a, b)) => (a.to_string(), b.to_string()),
                    None => (name, String::new()),
                };
                out.push(sample(
                    "frontdesk_webhook_requests_total",
                    vec![
                        ("source", r.try_get("source")?),
                        ("result", result),
                        ("reason", reason),
                    ],
                    r.try_get("value")?,
                ));
            }
            let rows = sqlx::query(db.sql("SELECT source, healthy, failures FROM source_health"))
                .fetch_all(db.reader())
                .await?;
            for r in rows {
                let source: String = r.try_get("source")?;
                out.push(sample(
                    "frontdesk_source_healthy",
                    vec![("source", source.clone())],
                    r.try_get("healthy")?,
                ));
                out.push(sample(
                    "frontdesk_source_consecutive_failures",
                    vec![("source", source)],
                    r.try_get("failures")?,
                ));
            }
            let rows = sqlx::query(
            db.sql("SELECT source, folder, COALESCE(unaccounted, 0) AS unaccounted, backfill_skipped FROM imap_cursors"),
        )
        .fetch_all(db.reader())
        .await?;
            for r in rows {
                let labels = vec![
                    ("source", r.try_get::<String, _>("source")?),
                    ("folder", r.try_get::<String, _>("folder")?),
                ];
                out.push(sample(
                    "frontdesk_imap_unaccounted",
                    labels.clone(),
                    r.try_get("unaccounted")?,
                ));
                out.push(sample(
                    "frontdesk_imap_backfill_skipped",
                    labels,
                    r.try_get("backfill_skipped")?,
                ));
            }
            let rows = sqlx::query(
                db.sql("SELECT source, kind, count(*) AS n FROM imap_accounted GROUP BY 1, 2"),
            )
            .fetch_all(db.reader())
            .await?;
            for r in rows {
                out.push(sample(
                    "frontdesk_imap_accounted_total",
                    vec![
                        ("source", r.try_get("source")?),
                        ("kind", r.try_get("kind")?),
                    ],
                    r.try_get("n")?,
                ));
            }
            let rows =
                sqlx::query(db.sql("SELECT kind, state, count(*) AS n FROM outbox GROUP BY 1, 2"))
                    .fetch_all(db.reader())
                    .await?;
            for r in rows {
                out.push(sample(
                    "frontdesk_outbox_items",
                    vec![("kind", r.try_get("kind")?), ("state", r.try_get("state")?)],
                    r.try_get("n")?,
                ));
            }
            let rows =
                sqlx::query(db.sql("SELECT state, count(*) AS n FROM conversations GROUP BY 1"))
                    .fetch_all(db.reader())
                    .await?;
            for r in rows {
                out.push(sample(
                    "frontdesk_conversations",
                    vec![("state", r.try_get("state")?)],
                    r.try_get("n")?,
                ));
            }
            let rows = sqlx::query(
                db.sql("SELECT metric, state, count(*) AS n FROM sla_targets GROUP BY 1, 2"),
            )
            .fetch_all(db.reader())
            .await?;
            for r in rows {
                out.push(sample(
                    "frontdesk_sla_targets",
                    vec![
                        ("metric", r.try_get("metric")?),
                        ("state", r.try_get("state")?),
                    ],
                    r.try_get("n")?,
                ));
            }
            let rows =
                sqlx::query(db.sql("SELECT kind, count(*) AS n FROM alert_events GROUP BY 1"))
                    .fetch_all(db.reader())
                    .await?;
            for r in rows {
                out.push(sample(
                    "frontdesk_alert_events_total",
                    vec![("kind", r.try_get("kind")?)],
                    r.try_get("n")?,
                ));
            }
            Ok(out)
        })
    }
}

/// Renders samples in the Prometheus text format, with HELP and TYPE lines.
pub fn render(samples: &[Sample]) -> String {
    let help = |name: &str| match name {
        "frontdesk_messages_total" => (
            "counter",
            "Messages stored, by source, direction and parse status.",
        ),
        "frontdesk_messages_pending" => ("gauge", "Messages not yet processed by the core loop."),
        "frontdesk_webhook_requests_total" => (
            "counter",
            "Webhook requests by source and result (accepted, duplicates, rejected with reason).",
        ),
        "frontdesk_source_healthy" => ("gauge", "1 when the source's last attempt succeeded."),
        "frontdesk_source_consecutive_failures" => {
            ("gauge", "Failures since the source's last success.")
        }
        "frontdesk_imap_unaccounted" => (
            "gauge",
            "UIDs on the server neither stored nor accounted for: must be 0.",
        ),
        "frontdesk_imap_backfill_skipped" => (
            "gauge",
            "Messages older than the backfill window, skipped on the first run.",
        ),
        "frontdesk_imap_accounted_total" => (
            "counter",
            "IMAP UIDs accounted for without a new row (quarantined, own mail, matched, backfill).",
        ),
        "frontdesk_outbox_items" => (
            "gauge",
            "Outbox items (digests and alerts) by state: pending, sent, failed.",
        ),
        "frontdesk_alert_events_total" => (
            "counter",
            "Alert events recorded, by kind (SLA warnings and breaches, source health).",
        ),
        "frontdesk_conversations" => (
            "gauge",
            "Conversations by state: idle, waiting, at_risk, breached.",
        ),
        "frontdesk_sla_targets" => (
            "gauge",
            "SLA target instances by metric and state (active, at_risk, met, breached, met_late).",
        ),
        "frontdesk_replica_leader" => (
            "gauge",
            "1 when this replica runs the role (core, sender); on SQLite always 1.",
        ),
        "frontdesk_lease_holder" => (
            "gauge",
            "Leases held now (PostgreSQL): IMAP folders and roles, by holding replica.",
        ),
        _ => ("gauge", ""),
    };
    let mut out = String::new();
    let mut last = "";
    for s in samples {
        if s.name != last {
            let (kind, text) = help(s.name);
            out.push_str(&format!(
                "# HELP {} {text}\n# TYPE {} {kind}\n",
                s.name, s.name
            ));
            last = s.name;
        }
        out.push_str(s.name);
        if !s.labels.is_empty() {
            let labels: Vec<String> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            out.push_str(&format!("{{{}}}", labels.join(",")));
        }
        out.push_str(&format!(" {}\n", s.value));
    }
    out
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
