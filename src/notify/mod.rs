//! Output channels and the delivery of outbox items through them.
//!
//! A channel is data (`Channel::Email` or `Channel::Webhook`); `Channel::send` delivers one outbox
//! item and says whether a failure is worth retrying. Every send runs under an overall timeout,
//! because lettre's own timeout covers only the connect (stack.md §5.3).

pub mod sender;
pub mod smtp;
pub mod webhook;

pub use sender::{RoundReport, Sender};

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

/// The header frontdesk puts on everything it sends; the IMAP loop guard recognises this name.
pub const GENERATED_HEADER: &str = "X-Frontdesk-Generated";

/// What an outbox item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxKind {
    /// A scheduled digest.
    Digest,
    /// A group of alert events.
    Alert,
}

impl OutboxKind {
    /// `digest` or `alert`, as stored and as put into the generated-by header.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Digest => "digest",
            OutboxKind::Alert => "alert",
        }
    }

    /// Parses the stored name; anything but `alert` is a digest.
    pub fn from_stored(s: &str) -> Self {
        if s == "alert" {
            OutboxKind::Alert
        } else {
            OutboxKind::Digest
        }
    }
}

/// One rendered message waiting to be sent, as the outbox holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxItem {
    /// The outbox row id: the Message-ID and the webhook id are derived from it.
    pub id: i64,
    /// Digest or alert.
    pub kind: OutboxKind,
    /// The configured channel name.
    pub channel: String,
    /// The recipient address for per-owner digests; empty means the channel's configured `to`.
    pub recipient: String,
    /// The unique slot, e.g. `digest:morning:maria@example.com:2026-11-26T08:00`.
    pub slot_key: String,
    /// The subject (no client data).
    pub subject: String,
    /// The text part.
    pub body_text: String,
    /// The HTML part, if any.
    pub body_html: Option<String>,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// Why a send failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Try again later: SMTP 4xx, HTTP 5xx or 429, timeouts, connection errors.
    #[error("temporary failure: {0}")]
    Temporary(String),
    /// Trying again will not help: SMTP 5xx, HTTP 4xx, a message that cannot be built.
    #[error("permanent failure: {0}")]
    Permanent(String),
}

/// A configured output channel.
#[derive(Debug)]
pub enum Channel {
    /// Email through SMTP or into a directory of `.eml` files.
    Email(smtp::EmailChannel),
    /// A chat or JSON webhook.
    Webhook(webhook::WebhookChannel),
}

impl Channel {
    /// The configured channel name.
    pub fn name(&self) -> &str {
        match self {
            Channel::Email(c) => &c.name,
            Channel::Webhook(c) => &c.name,
        }
    }

    /// Builds a channel from its validated configuration (no network access yet).
    pub fn from_config(c: &crate::config::Channel) -> Result<Channel, String> {
        use crate::config::{
            ChannelKind, EmailTransport as CfgTransport, TlsMode, WebhookChannelKind,
        };
        match &c.kind {
            ChannelKind::Email(e) => {
                let (transport, send_timeout) = match &e.transport {
                    CfgTransport::File(dir) => (
                        smtp::EmailTransport::File(dir.clone()),
                        Duration::from_secs(30),
                    ),
                    CfgTransport::Smtp(s) => (
                        smtp::EmailTransport::Smtp(smtp::SmtpSettings {
                            host: s.host.clone(),
                            port: Some(s.port),
                            tls: match s.tls {
                                TlsMode::Implicit => smtp::SmtpTls::Implicit,
                                TlsMode::Starttls => smtp::SmtpTls::StartTls,
                                TlsMode::None => smtp::SmtpTls::None,
                            },
                            ca_file: s.ca_file.clone(),
                            username: s.username.clone(),
                            password: match &s.login {
                                Some(crate::config::Login::Password(p)) => {
                                    Some(p.expose().to_string())
                                }
                                _ => None,
                            },
                            oauth2: s
                                .login
                                .as_ref()
                                .and_then(|l| l.oauth2())
                                .cloned()
                                .map(Box::new),
                            connect_timeout: s.timeout.min(Duration::from_secs(30)),
                        }),
                        s.timeout,
                    ),
                };
                smtp::EmailChannel::new(&smtp::EmailSettings {
                    name: c.name.clone(),
                    transport,
                    from: e.from.clone(),
                    to: e.to.clone(),
                    reply_to: e.reply_to.clone(),
                    send_timeout,
                })
                .map(Channel::Email)
                .map_err(|e| e.to_string())
            }
            ChannelKind::Webhook(w) => webhook::WebhookChannel::new(&webhook::WebhookSettings {
                name: c.name.clone(),
                kind: match w.kind {
                    WebhookChannelKind::Slack => webhook::WebhookKind::Slack,
                    WebhookChannelKind::Teams => webhook::WebhookKind::Teams,
                    WebhookChannelKind::Discord => webhook::WebhookKind::Discord,
                    WebhookChannelKind::Json => webhook::WebhookKind::Json,
                },
                url: w.url.expose().to_string(),
                signing_secret: w.secret.as_ref().map(|s| s.expose().to_string()),
                send_timeout: w.timeout,
            })
            .map(Channel::Webhook)
            .map_err(|e| e.to_string()),
        }
    }

    /// The overall limit of one send on this channel.
    pub fn send_timeout(&self) -> Duration {
        match self {
            Channel::Email(c) => c.send_timeout,
            Channel::Webhook(c) => c.send_timeout,
        }
    }

    /// Delivers one item; `Ok` only after the SMTP 250 or HTTP 2xx (or the file was written).
    pub async fn send(&self, item: &OutboxItem) -> Result<(), SendError> {
        let (limit, fut): (
            Duration,
            std::pin::Pin<Box<dyn Future<Output = _> + Send + '_>>,
        ) = match self {
            Channel::Email(c) => (c.send_timeout, Box::pin(c.send(item))),
            Channel::Webhook(c) => (c.send_timeout, Box::pin(c.send(item))),
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Temporary(format!(
                "send timed out after {}s",
                limit.as_secs()
            ))),
        }
    }
}

/// What to do with an item after one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered: mark sent.
    Sent,
    /// Try again at the given time.
    Retry {
        /// When the next attempt is due.
        at: DateTime<Utc>,
        /// What went wrong this time.
        error: String,
    },
    /// Give up: mark failed, log at error, list in the next digest.
    Failed {
        /// Why.
        error: String,
    },
}

/// Failed attempts after which a temporary failure is given up (about a day with the backoff cap).
pub const MAX_ATTEMPTS: u32 = 30;
/// The first retry delay.
const BACKOFF_BASE: TimeDelta = TimeDelta::seconds(30);
/// The longest retry delay.
const BACKOFF_CAP: TimeDelta = TimeDelta::hours(1);

/// The delay before attempt `attempts + 1`: exponential from 30 s, capped at 1 h, with "equal
/// jitter" (`jitter` in [0, 1) picks a point in the upper half), so many items do not retry in step.
pub fn retry_delay(attempts: u32, jitter: f64) -> TimeDelta {
    let exp = BACKOFF_BASE
        .checked_mul(
            1i32.checked_shl(attempts.saturating_sub(1).min(20))
                .unwrap_or(i32::MAX),
        )
        .unwrap_or(BACKOFF_CAP)
        .min(BACKOFF_CAP);
    let ms = exp.num_milliseconds() as f64;
    TimeDelta::milliseconds((ms / 2.0 + ms / 2.0 * jitter.clamp(0.0, 1.0)) as i64)
}

/// Maps one attempt's result to what the outbox records; `attempts` counts this attempt.
pub fn outcome(
    result: Result<(), SendError>,
    attempts: u32,
    now: DateTime<Utc>,
    jitter: f64,
) -> Outcome {
    match result {
        Ok(()) => Outcome::Sent,
        Err(SendError::Permanent(e)) => Outcome::Failed { error: e },
        Err(SendError::Temporary(e)) if attempts >= MAX_ATTEMPTS => Outcome::Failed {
            error: format!("gave up after {attempts} attempts: {e}"),
        },
        Err(SendError::Temporary(e)) => Outcome::Retry {
            at: now + retry_delay(attempts, jitter),
            error: e,
        },
    }
}

/// Keeps `[A-Za-z0-9.-]` and turns everything else into `-`, for ids built from slot keys.
pub fn id_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(retry_delay(1, 1.0), TimeDelta::seconds(30));
        assert_eq!(retry_delay(1, 0.0), TimeDelta::seconds(15));
        assert_eq!(retry_delay(2, 1.0), TimeDelta::seconds(60));
        assert_eq!(retry_delay(3, 1.0), TimeDelta::seconds(120));
        assert_eq!(retry_delay(100, 1.0), TimeDelta::hours(1));
        assert_eq!(retry_delay(100, 0.0), TimeDelta::minutes(30));
    }

    #[test]
    fn outcome_classifies() {
        let now = Utc::now();
        assert_eq!(outcome(Ok(()), 1, now, 0.5), Outcome::Sent);
        assert!(matches!(
            outcome(Err(SendError::Permanent("550".into())), 1, now, 0.5),
            Outcome::Failed { .. }
        ));
        match outcome(Err(SendError::Temporary("451".into())), 1, now, 1.0) {
            Outcome::Retry { at, .. } => assert_eq!(at, now + TimeDelta::seconds(30)),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            outcome(
                Err(SendError::Temporary("451".into())),
                MAX_ATTEMPTS,
                now,
                0.5
            ),
            Outcome::Failed { .. }
        ));
    }

    proptest::proptest! {
        #[test]
        fn backoff_is_monotonic_in_attempts_and_bounded(a in 1u32..200, j in 0.0f64..1.0) {
            let d = retry_delay(a, j);
            proptest::prop_assert!(d >= TimeDelta::seconds(15) && d <= TimeDelta::hours(1));
            proptest::prop_assert!(retry_delay(a + 1, 1.0) >= retry_delay(a, 1.0));
        }
    }
}
