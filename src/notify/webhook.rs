//! The webhook channel: one outbox item becomes one HTTP POST to Slack, Teams, Discord or a
//! generic JSON endpoint (optionally signed as Standard Webhooks).
//!
//! The URL is a secret for Slack, Teams and Discord, so it never appears in errors or logs.

use std::time::Duration;

use base64::Engine;
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use super::{OutboxItem, SendError};
use crate::digest::header_value;

/// Which body shape the endpoint expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookKind {
    /// Slack incoming webhook: Block Kit sections of mrkdwn text.
    Slack,
    /// Microsoft Teams (Workflows): an Adaptive Card message.
    Teams,
    /// Discord webhook: `content`, mentions disabled.
    Discord,
    /// Generic JSON with subject, text, HTML and ids.
    Json,
}

/// Everything the webhook channel needs, taken from the configuration.
#[derive(Clone)]
pub struct WebhookSettings {
    /// The channel name.
    pub name: String,
    /// The body shape.
    pub kind: WebhookKind,
    /// Where to POST (a secret for chat services).
    pub url: String,
    /// Standard Webhooks signing secret (`whsec_…` base64, or raw bytes) for `json`.
    pub signing_secret: Option<String>,
    /// Overall limit for one send.
    pub send_timeout: Duration,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// A ready webhook channel.
pub struct WebhookChannel {
    /// The channel name.
    pub name: String,
    /// Overall limit for one send.
    pub send_timeout: Duration,
    kind: WebhookKind,
    url: reqwest::Url,
    signing_key: Option<Vec<u8>>,
    client: reqwest::Client,
}

impl std::fmt::Debug for WebhookChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookChannel")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// The webhook channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookSetupError {
    /// The URL did not parse or is not http(s).
    #[error("webhook url is not a valid http(s) url")]
    Url,
    /// Plain http to a host that is not loopback.
    #[error("webhook url must use https unless it points to loopback")]
    PlainHttp,
    /// The signing secret is not valid base64 after `whsec_`.
    #[error("webhook signing secret after whsec_ is not valid base64")]
    Secret,
    /// The HTTP client could not be built (no TLS provider installed?).
    #[error("http client setup failed: {0}")]
    Client(String),
}

impl WebhookChannel {
    /// Checks the settings and builds the client. A rustls crypto provider must be installed.
    pub fn new(s: &WebhookSettings) -> Result<WebhookChannel, WebhookSetupError> {
        let url = reqwest::Url::parse(&s.url).map_err(|_| WebhookSetupError::Url)?;
        match url.scheme() {
            "https" => {}
            "http" => {
                let host = url.host_str().unwrap_or("");
                let loopback = host.eq_ignore_ascii_case("localhost")
                    || host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    return Err(WebhookSetupError::PlainHttp);
                }
            }
            _ => return Err(WebhookSetupError::Url),
        }
        let signing_key = match &s.signing_secret {
            None => None,
            Some(secret) => Some(match secret.strip_prefix("whsec_") {
                Some(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| WebhookSetupError::Secret)?,
                None => secret.as_bytes().to_vec(),
            }),
        };
        let client = reqwest::Client::builder()
            .timeout(s.send_timeout)
            .connect_timeout(s.send_timeout.min(Duration::from_secs(10)))
            // A chat webhook never needs to redirect; following one could leak the body elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("frontdesk/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookSetupError::Client(e.without_url().to_string()))?;
        Ok(WebhookChannel {
            name: s.name.clone(),
            send_timeout: s.send_timeout,
            kind: s.kind,
            url,
            signing_key,
            client,
        })
    }

    /// Posts one item; `Ok` only on a 2xx reply.
    pub async fn send(&self, item: &OutboxItem) -> Result<(), SendError> {
        let body = serde_json::to_vec(&payload(self.kind, item))
            .map_err(|e| SendError::Permanent(format!("cannot encode body: {e}")))?;
        let mut req = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(key) = &self.signing_key {
            let id = format!("outbox-{}", item.id);
            let ts = chrono::Utc::now().timestamp();
            req = req
                .header("webhook-id", &id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", standard_signature(key, &id, ts, &body));
        }
        let resp = req.body(body).send().await.map_err(|e| {
            let e = e.without_url();
            if e.is_builder() {
                SendError::Permanent(format!("cannot build request: {e}"))
            } else {
                SendError::Temporary(format!("webhook request failed: {e}"))
            }
        })?;
        classify_status(resp.status())
    }
}

/// 2xx is delivered; 408, 429 and 5xx are temporary; every other status is permanent.
pub fn classify_status(status: reqwest::StatusCode) -> Result<(), SendError> {
    let code = status.as_u16();
    match code {
        200..=299 => Ok(()),
        408 | 429 | 500..=599 => Err(SendError::Temporary(format!("webhook answered {code}"))),
        _ => Err(SendError::Permanent(format!("webhook answered {code}"))),
    }
}

/// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` (Standard Webhooks).
pub fn standard_signature(key: &[u8], id: &str, ts: i64, body: &[u8]) -> String {
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(key) else {
        // HMAC accepts keys of any length; this branch is unreachable in practice.
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// Slack mrkdwn needs `&`, `<` and `>` escaped; without `<` no mention or link can be formed.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Splits text at line boundaries into pieces of at most `max` characters.
fn chunks(text: &str, max: usize) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    for line in text.lines() {
        let line: String = line.chars().take(max - 1).collect();
        if cur.chars().count() + line.chars().count() + 1 > max {
            out.push(std::mem::take(&mut cur));
        }
        cur.push_str(&line);
        cur.push('\n');
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The JSON body for `kind`.
pub fn payload(kind: WebhookKind, item: &OutboxItem) -> Value {
    let subject = header_value(&item.subject);
    match kind {
        WebhookKind::Slack => {
            // Section text is limited to 3000 characters, a message to 50 blocks; a code block
            // keeps the text part's columns and is wrapped in ``` (6 characters).
            let mut blocks = vec![json!({
                "type": "header",
                "text": {"type": "plain_text", "text": subject.chars().take(150).collect::<String>()}
            })];
            for c in chunks(&slack_escape(&item.body_text), 2990)
                .into_iter()
                .take(49)
            {
                blocks.push(json!({
                    "type": "section",
                    "text": {"type": "mrkdwn", "text": format!("```{c}```")}
                }));
            }
            json!({"text": slack_escape(&subject), "blocks": blocks})
        }
        WebhookKind::Teams => json!({
            "type": "message",
            "attachments": [{
                "contentType": "application/vnd.microsoft.card.adaptive",
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": [
                        {"type": "TextBlock", "text": subject, "weight": "Bolder", "wrap": true},
                        {"type": "TextBlock", "text": item.body_text, "wrap": true, "fontType": "Monospace"}
                    ]
                }
            }]
        }),
        WebhookKind::Discord => {
            // Content is limited to 2000 characters; mentions are disabled so client text
            // containing @everyone pings nobody.
            let mut content = format!("**{subject}**\n```\n");
            let budget = 2000 - content.chars().count() - 8;
            let body: String = item
                .body_text
                .replace("```", "'''")
                .chars()
                .take(budget)
                .collect();
            content.push_str(&body);
            content.push_str("\n```");
            json!({"content": content, "allowed_mentions": {"parse": []}})
        }
        WebhookKind::Json => json!({
            "type": format!("frontdesk.{}", item.kind.as_str()),
            "id": format!("outbox-{}", item.id),
            "slot": item.slot_key,
            "subject": subject,
            "text": item.body_text,
            "html": item.body_html,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{Channel, OutboxKind};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn item() -> OutboxItem {
        OutboxItem {
            id: 7,
            kind: OutboxKind::Alert,
            channel: "chat".into(),
            recipient: String::new(),
            slot_key: "alert:1".into(),
            subject: "frontdesk alert: 1 breached".into(),
            body_text: "BREACHED: <!channel> @everyone & co ```x```\n".repeat(200),
            body_html: None,
            attempts: 0,
        }
    }

    #[test]
    fn slack_body_is_escaped_and_within_limits() {
        let v = payload(WebhookKind::Slack, &item());
        let blocks = v["blocks"].as_array().unwrap();
        assert!(blocks.len() <= 50);
        for b in &blocks[1..] {
            let t = b["text"]["text"].as_str().unwrap();
            assert!(t.chars().count() <= 3000);
            assert!(!t.contains("<!channel>"));
        }
    }

    #[test]
    fn discord_body_pings_nobody_and_fits() {
        let v = payload(WebhookKind::Discord, &item());
        assert!(v["content"].as_str().unwrap().chars().count() <= 2000);
        assert_eq!(v["allowed_mentions"]["parse"], json!([]));
    }

    #[test]
    fn statuses_are_classified() {
        use reqwest::StatusCode as S;
        assert!(classify_status(S::OK).is_ok());
        assert!(classify_status(S::NO_CONTENT).is_ok());
        for s in [
            S::TOO_MANY_REQUESTS,
            S::INTERNAL_SERVER_ERROR,
            S::BAD_GATEWAY,
            S::REQUEST_TIMEOUT,
        ] {
            assert!(
                matches!(classify_status(s), Err(SendError::Temporary(_))),
                "{s}"
            );
        }
        for s in [S::BAD_REQUEST, S::NOT_FOUND, S::GONE, S::FOUND] {
            assert!(
                matches!(classify_status(s), Err(SendError::Permanent(_))),
                "{s}"
            );
        }
    }

    #[test]
    fn plain_http_only_to_loopback() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let s = |url: &str| WebhookSettings {
            name: "chat".into(),
            kind: WebhookKind::Json,
            url: url.into(),
            signing_secret: None,
            send_timeout: Duration::from_secs(2),
        };
        assert!(matches!(
            WebhookChannel::new(&s("http://hooks.example.com/x")),
            Err(WebhookSetupError::PlainHttp)
        ));
        assert!(WebhookChannel::new(&s("http://127.0.0.1:9/x")).is_ok());
        assert!(WebhookChannel::new(&s("https://hooks.example.com/x")).is_ok());
        assert!(matches!(
            WebhookChannel::new(&s("ftp://x/")),
            Err(WebhookSetupError::Url)
        ));
    }

    /// A real HTTP server on loopback answering with `status` (or never, when `None`); returns
    /// its URL and a handle yielding the raw request it received.
    async fn one_shot_server(status: Option<u16>) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let handle = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            // Read headers and the body (Content-Length) before answering.
            loop {
                let n = sock.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if got.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            match status {
                Some(code) => {
                    let resp = format!(
                        "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    sock.write_all(resp.as_bytes()).await.unwrap();
                }
                None => tokio::time::sleep(Duration::from_secs(30)).await,
            }
            String::from_utf8_lossy(&got).to_string()
        });
        (url, handle)
    }

    fn channel(url: &str, secret: Option<&str>, timeout: Duration) -> Channel {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Channel::Webhook(
            WebhookChannel::new(&WebhookSettings {
                name: "chat".into(),
                kind: WebhookKind::Json,
                url: url.into(),
                signing_secret: secret.map(str::to_string),
                send_timeout: timeout,
            })
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn signed_json_is_posted_and_2xx_is_success() {
        let (url, server) = one_shot_server(Some(204)).await;
        let key = base64::engine::general_purpose::STANDARD.encode(b"test-key-123");
        let ch = channel(&url, Some(&format!("whsec_{key}")), Duration::from_secs(5));
        ch.send(&item()).await.unwrap();
        let req = server.await.unwrap();
        let (head, body) = req.split_once("\r\n\r\n").unwrap();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with(&format!("{name}:"))
                        .then(|| l[name.len() + 1..].trim().to_string())
                })
                .unwrap()
        };
        assert_eq!(header("webhook-id"), "outbox-7");
        let ts: i64 = header("webhook-timestamp").parse().unwrap();
        assert_eq!(
            header("webhook-signature"),
            standard_signature(b"test-key-123", "outbox-7", ts, body.as_bytes())
        );
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["type"], "frontdesk.alert");
    }

    #[tokio::test]
    async fn server_errors_are_temporary_client_errors_permanent() {
        let (url, _s) = one_shot_server(Some(503)).await;
        let r = channel(&url, None, Duration::from_secs(5))
            .send(&item())
            .await;
        assert!(matches!(r, Err(SendError::Temporary(_))), "{r:?}");
        let (url, _s) = one_shot_server(Some(404)).await;
        let r = channel(&url, None, Duration::from_secs(5))
            .send(&item())
            .await;
        assert!(matches!(r, Err(SendError::Permanent(_))), "{r:?}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_as_temporary_and_the_url_is_not_in_the_error() {
        let (url, _s) = one_shot_server(None).await;
        let r = channel(&url, None, Duration::from_millis(500))
            .send(&item())
            .await;
        match r {
            Err(SendError::Temporary(e)) => assert!(!e.contains("/hook"), "{e}"),
            r => panic!("{r:?}"),
        }
        let r = channel("http://127.0.0.1:1/hook", None, Duration::from_secs(2))
            .send(&item())
            .await;
        assert!(matches!(r, Err(SendError::Temporary(_))), "{r:?}");
    }
}
