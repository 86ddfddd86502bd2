//! Webhook ingestion: authenticate the raw request, map it to a `Message`, commit, then acknowledge.
//!
//! `POST /hooks/{source}` in this order (reliability.md §2.2):
//! 1. shutting down -> 503 with Retry-After; a `Content-Length` over the route's limit -> 413;
//!    no request slot or no share of the 32 MiB body budget free within 250 ms (overload) -> 503;
//! 2. size: more bytes than the limit read -> 413 (the body is never buffered beyond the limit);
//!    a body slower than the body timeout -> 408;
//! 3. authentication over the exact bytes ([`auth`]) -> 401 on any failure (never 403/406/410);
//! 4. mapping ([`preset`]): a missing required field -> 422 naming field and pointer; an unreadable
//!    body is stored as `degraded`; a Slack challenge is answered; pings are acknowledged unstored;
//! 5. durable group commit (`store::webhook`) -> 200 `{"id": N, "duplicate": bool}` only after the
//!    row is fsync'd; a repeated delivery id -> 200 with the same id and no new row;
//!    store trouble -> 503 with Retry-After, never a 2xx.

pub mod auth;
pub mod fields;
pub mod json_tree;
pub mod preset;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::Utc;
use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::config::{self, AuthScheme, SignatureEncoding, SourceKind, WebhookSource};
use crate::http::AppState;
use crate::store::webhook::{IngestError, WebhookDelivery, WebhookWriter};
use auth::{AuthConfigError, Encoding, Inbound, Scheme, Verifier};
use preset::{DirectionRule, Mapping, Outcome, Preset};

/// How long a request may take to send its body once the headers are in.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request waits for a free slot (and its share of the byte budget) before 503. Short,
/// so an overloaded server refuses within well under a second (reliability.md L1).
const SLOT_WAIT: Duration = Duration::from_millis(250);

/// Bytes of request bodies in flight at once, counted in [`BUDGET_UNIT`]s: requests, their
/// parsed copies and their wait for the commit are bounded by bytes, not only by count (512
/// requests of 256 KB held about 1 GB and queued for seconds behind the writer).
const BODY_BUDGET: usize = 32 << 20;

/// The budget's granularity; every request weighs at least one unit (headers, state).
const BUDGET_UNIT: usize = 16 << 10;

/// Seconds a provider is asked to wait after a 503.
const RETRY_AFTER_SECS: &str = "5";

/// One configured webhook route, ready to serve.
#[derive(Debug)]
pub struct Endpoint {
    /// The source name (`/hooks/{source}`).
    pub source: String,
    /// Who may call it.
    pub verifier: Verifier,
    /// How its bodies are mapped.
    pub preset: Preset,
    /// Body limit in bytes.
    pub max_body: usize,
}

impl Endpoint {
    /// Builds the endpoint of one configured webhook source.
    pub fn from_config(source: &str, hook: &WebhookSource) -> Result<Endpoint, AuthConfigError> {
        let a = &hook.auth;
        let scheme = match a.scheme {
            AuthScheme::StandardWebhooks => Scheme::StandardWebhooks,
            AuthScheme::Github => Scheme::Github,
            AuthScheme::Slack => Scheme::Slack,
            AuthScheme::Twilio => Scheme::Twilio {
                public_url: hook.public_url.clone().unwrap_or_default(),
            },
            AuthScheme::Stripe => Scheme::Stripe,
            AuthScheme::Mailgun => Scheme::Mailgun,
            AuthScheme::HmacSha256 => Scheme::HmacSha256 {
                header: a.header.clone().unwrap_or_default(),
                prefix: a.prefix.clone().unwrap_or_default(),
                encoding: match a.encoding {
                    SignatureEncoding::Hex => Encoding::Hex,
                    SignatureEncoding::Base64 => Encoding::Base64,
                },
            },
            AuthScheme::Bearer => Scheme::Bearer,
            AuthScheme::Basic => Scheme::Basic,
            AuthScheme::None => Scheme::None,
        };
        let secrets: Vec<String> = a
            .secrets
            .iter()
            .map(|s| match (&scheme, &a.username) {
                (Scheme::Basic, Some(user)) => format!("{user}:{}", s.expose()),
                _ => s.expose().to_string(),
            })
            .collect();
        let verifier = Verifier::new(scheme, &secrets, a.tolerance)?;
        let preset = match hook.preset {
            config::Preset::Form => Preset::Form,
            config::Preset::Json => Preset::Json(Box::new(
                hook.mapping
                    .as_ref()
                    .map(mapping_from_config)
                    .unwrap_or_default(),
            )),
            config::Preset::StandardWebhooks => Preset::StandardWebhooks,
            config::Preset::Github => Preset::Github,
            config::Preset::SlackEvents => Preset::SlackEvents,
            config::Preset::TwilioSms => Preset::TwilioSms,
            config::Preset::Stripe => Preset::Stripe,
            config::Preset::PostmarkInbound => Preset::PostmarkInbound,
            config::Preset::MailgunInbound => Preset::MailgunInbound,
        };
        Ok(Endpoint {
            source: source.to_string(),
            verifier,
            preset,
            max_body: usize::try_from(hook.max_body).unwrap_or(usize::MAX),
        })
    }
}

fn mapping_from_config(m: &config::Mapping) -> Mapping {
    Mapping {
        id: m.id.clone(),
        from: m.from.clone(),
        name: m.name.clone(),
        subject: m.subject.clone(),
        text: m.text.clone(),
        thread: m.thread.clone(),
        direction: m.direction.as_ref().map(|d| DirectionRule {
            pointer: d.pointer.clone(),
            outbound: d.outbound.clone(),
        }),
        occurred_at: m.occurred_at.clone(),
    }
}

/// A route that could not be built: it answers 503 so the provider keeps retrying until fixed.
type Configured = Result<Endpoint, String>;

#[derive(Clone)]
struct Hooks {
    config: tokio::sync::watch::Receiver<Arc<config::Config>>,
    built: Arc<std::sync::Mutex<Built>>,
    writer: WebhookWriter,
    slots: Arc<Semaphore>,
    /// The body budget, in `BUDGET_UNIT`s.
    bytes: Arc<Semaphore>,
    accepting: Arc<AtomicBool>,
}

/// The endpoints built from one configuration; rebuilt when a reload replaces it.
struct Built {
    from: Arc<config::Config>,
    endpoints: Arc<HashMap<String, Configured>>,
}

fn build_endpoints(config: &config::Config) -> HashMap<String, Configured> {
    let mut endpoints = HashMap::new();
    for s in &config.sources {
        if let SourceKind::Webhook(hook) = &s.kind {
            let built = Endpoint::from_config(&s.name, hook).map_err(|e| {
                tracing::error!(source = %s.name, error = %e, "webhook route disabled (answers 503)");
                e.to_string()
            });
            endpoints.insert(s.name.clone(), built);
        }
    }
    endpoints
}

impl Hooks {
    /// The endpoints of the configuration in force (a SIGHUP reload takes effect here).
    fn endpoints(&self) -> Arc<HashMap<String, Configured>> {
        let current = self.config.borrow().clone();
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&built.from, &current) {
            *built = Built {
                endpoints: Arc::new(build_endpoints(&current)),
                from: current,
            };
        }
        built.endpoints.clone()
    }
}

/// The webhook routes for every configured webhook source; starts the group-commit writer.
pub fn routes(state: &AppState) -> Router {
    let current = state.config.borrow().clone();
    let hooks = Hooks {
        config: state.config.clone(),
        built: Arc::new(std::sync::Mutex::new(Built {
            endpoints: Arc::new(build_endpoints(&current)),
            from: current.clone(),
        })),
        writer: state
            .store
            .spawn_webhook_writer(state.wake_core.clone(), state.health.clone()),
        slots: Arc::new(Semaphore::new(current.server.max_concurrency)),
        bytes: Arc::new(Semaphore::new(BODY_BUDGET / BUDGET_UNIT)),
        accepting: state.accepting.clone(),
    };
    Router::new()
        .route("/hooks/{source}", post(receive))
        // Limits are per route and enforced while reading (below), so axum's default is off.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(hooks)
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (status, axum::Json(value)).into_response()
}

fn unavailable(reason: &str) -> Response {
    let mut r = json(
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({ "error": reason }),
    );
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    r
}

fn error(status: StatusCode, text: &str) -> Response {
    json(status, serde_json::json!({ "error": text }))
}

/// Why reading the body stopped.
enum BodyError {
    TooLarge,
    Broken,
}

/// Reads at most `max` bytes; one byte more is `TooLarge`, and nothing beyond it is buffered.
/// `expected` (the declared length, already checked against `max`) sizes the buffer up front.
async fn read_limited(body: Body, max: usize, expected: usize) -> Result<Vec<u8>, BodyError> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::with_capacity(expected.min(max));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| BodyError::Broken)?;
        if out.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn receive(
    State(h): State<Hooks>,
    Path(source): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received_at = Utc::now();
    if !h.accepting.load(Ordering::Relaxed) {
        return unavailable("shutting down");
    }
    let endpoints = h.endpoints();
    let Some(configured) = endpoints.get(&source) else {
        return error(StatusCode::NOT_FOUND, "no such webhook source");
    };
    let ep = match configured {
        Ok(ep) => ep,
        Err(_) => return unavailable("webhook source misconfigured"),
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > ep.max_body as u64) {
        h.writer.count(&source, "rejected:too_large");
        return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    // A body of unknown length may grow to the route's limit: it is weighed at that.
    let weight = declared
        .map_or(ep.max_body, |n| usize::try_from(n).unwrap_or(usize::MAX))
        .div_ceil(BUDGET_UNIT)
        .clamp(1, BODY_BUDGET / BUDGET_UNIT);
    let admitted = tokio::time::timeout(SLOT_WAIT, async {
        let slot = h.slots.clone().acquire_owned().await?;
        let share = h
            .bytes
            .clone()
            .acquire_many_owned(u32::try_from(weight).unwrap_or(u32::MAX))
            .await?;
        Ok::<_, tokio::sync::AcquireError>((slot, share))
    })
    .await;
    let Ok(Ok(_admitted)) = admitted else {
        return unavailable("too many requests in flight");
    };
    let bytes = match tokio::time::timeout(
        BODY_TIMEOUT,
        read_limited(
            body,
            ep.max_body,
            declared.and_then(|n| usize::try_from(n).ok()).unwrap_or(0),
        ),
    )
    .await
    {
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "body not received in time"),
        Ok(Err(BodyError::TooLarge)) => {
            h.writer.count(&source, "rejected:too_large");
            return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        }
        Ok(Err(BodyError::Broken)) => return error(StatusCode::BAD_REQUEST, "body unreadable"),
        Ok(Ok(b)) => b,
    };
    let inbound = Inbound {
        headers: &headers,
        query: uri.query(),
        body: &bytes,
    };
    let verified = match ep.verifier.verify(&inbound, received_at) {
        Ok(v) => v,
        Err(r) => {
            tracing::debug!(source = %source, reason = r.as_str(), "webhook rejected");
            h.writer.count(&source, &format!("rejected:{}", r.as_str()));
            return error(StatusCode::UNAUTHORIZED, "unauthorized");
        }
    };
    let delivery = preset::Delivery {
        source: &source,
        headers: &headers,
        body: &bytes,
        received_at,
        signed_at: verified.signed_at,
    };
    let message = match preset::normalize(&ep.preset, &delivery) {
        Err(e) => {
            h.writer.count(&source, "invalid");
            return error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string());
        }
        Ok(Outcome::Challenge(c)) => {
            return json(StatusCode::OK, serde_json::json!({ "challenge": c }));
        }
        Ok(Outcome::Ignore(reason)) => {
            h.writer.count(&source, "ignored");
            return json(StatusCode::OK, serde_json::json!({ "ignored": reason }));
        }
        Ok(Outcome::Store(m)) => *m,
    };
    let result = h
        .writer
        .ingest(WebhookDelivery {
            message,
            replay_token: verified.replay_token,
        })
        .await;
    match result {
        Ok(stored) => json(
            StatusCode::OK,
            serde_json::json!({ "id": stored.id, "duplicate": stored.duplicate }),
        ),
        Err(IngestError::TokenReused) => {
            tracing::debug!(source = %source, "webhook token reused");
            error(StatusCode::UNAUTHORIZED, "unauthorized")
        }
        Err(e @ (IngestError::Unavailable(_) | IngestError::Busy)) => {
            tracing::warn!(source = %source, error = %e, "webhook not stored");
            unavailable("store unavailable")
        }
    }
}

/// One webhook source as `frontdesk sources` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WebhookSourceLine {
    /// Always `webhook` (IMAP lines in the same listing have a `folder` instead).
    pub kind: &'static str,
    /// The source name.
    pub source: String,
    /// The configured preset.
    pub preset: &'static str,
    /// Deliveries stored as new rows.
    pub accepted: i64,
    /// Repeated deliveries answered with the existing id.
    pub duplicates: i64,
    /// 401s and 413s by reason (`bad_signature`, `timestamp_outside_window`, `too_large`, ...).
    pub rejected: std::collections::BTreeMap<String, i64>,
    /// Acknowledged but not stored (pings, status callbacks).
    pub ignored: i64,
    /// Answered 422 (a required field missing).
    pub invalid: i64,
    /// The last accepted or duplicate delivery.
    pub last_delivery_at: Option<chrono::DateTime<Utc>>,
}

/// Every configured webhook source with its counters (zero when it never got a request).
pub async fn sources_report(
    config: &config::Config,
    store: &crate::store::Store,
) -> Result<Vec<WebhookSourceLine>, crate::store::Error> {
    let counters = store.webhook_counters().await?;
    let mut out = Vec::new();
    for s in &config.sources {
        let SourceKind::Webhook(hook) = &s.kind else {
            continue;
        };
        let mut line = WebhookSourceLine {
            kind: "webhook",
            source: s.name.clone(),
            preset: preset_name(hook.preset),
            accepted: 0,
            duplicates: 0,
            rejected: std::collections::BTreeMap::new(),
            ignored: 0,
            invalid: 0,
            last_delivery_at: None,
        };
        if let Some(c) = counters.iter().find(|c| c.source == s.name) {
            line.accepted = c.accepted;
            line.duplicates = c.duplicates;
            line.last_delivery_at = c.last_delivery_at;
            for (name, n) in &c.other {
                match name.strip_prefix("rejected:") {
                    Some(reason) => {
                        line.rejected.insert(reason.to_string(), *n);
                    }
                    None if name == "ignored" => line.ignored = *n,
                    None if name == "invalid" => line.invalid = *n,
                    None => {}
                }
            }
        }
        out.push(line);
    }
    Ok(out)
}

fn preset_name(p: config::Preset) -> &'static str {
    match p {
        config::Preset::Form => "form",
        config::Preset::Json => "json",
        config::Preset::StandardWebhooks => "standard-webhooks",
        config::Preset::Github => "github",
        config::Preset::SlackEvents => "slack-events",
        config::Preset::TwilioSms => "twilio-sms",
        config::Preset::Stripe => "stripe",
        config::Preset::PostmarkInbound => "postmark-inbound",
        config::Preset::MailgunInbound => "mailgun-inbound",
    }
}

/// The webhook part of `frontdesk sources` as aligned text.
pub fn sources_text(lines: &[WebhookSourceLine]) -> String {
    let mut out = format!(
        "{:<16} {:<18} {:>9} {:>10} {:>8} {:>7} {:>7}  {:<19}  REJECTED BY REASON\n",
        "WEBHOOK",
        "PRESET",
        "ACCEPTED",
        "DUPLICATES",
        "REJECTED",
        "IGNORED",
        "INVALID",
        "LAST DELIVERY (UTC)"
    );
    for l in lines {
        let rejected: i64 = l.rejected.values().sum();
        let last = l.last_delivery_at.map_or_else(
            || "-".to_string(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
        );
        let reasons: Vec<String> = l.rejected.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "{:<16} {:<18} {:>9} {:>10} {:>8} {:>7} {:>7}  {:<19}  {}\n",
            l.source,
            l.preset,
            l.accepted,
            l.duplicates,
            rejected,
            l.ignored,
            l.invalid,
            last,
            reasons.join(" ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_text_sums_rejections() {
        let text = sources_text(&[WebhookSourceLine {
            kind: "webhook",
            source: "sms".into(),
            preset: "twilio-sms",
            accepted: 5,
            duplicates: 2,
            rejected: [
                ("bad_signature".to_string(), 3),
                ("too_large".to_string(), 1),
            ]
            .into_iter()
            .collect(),
            ignored: 1,
            invalid: 0,
            last_delivery_at: None,
        }]);
        let line = text.lines().nth(1).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            &cols[..8],
            &["sms", "twilio-sms", "5", "2", "4", "1", "0", "-"]
        );
        assert!(line.contains("bad_signature=3 too_large=1"));
    }
}
