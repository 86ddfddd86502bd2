//! Presets: how an authenticated body becomes a [`Message`].
//!
//! Rules shared by every preset:
//! - The raw body is always kept in `Message::raw`.
//! - A body that cannot be read at all (invalid UTF-8, not JSON, nested deeper than serde_json's
//!   recursion limit of 128, too many form fields) still becomes a `Message` with
//!   `ParseStatus::Degraded(reason)`: the request was authenticated, so it is stored and acknowledged.
//! - A body that reads fine but lacks a required field is a [`FieldError`] (answered 422), so the
//!   provider retries and nothing is stored under a wrong identity.
//! - Duplicate JSON keys: the last one wins (serde_json). Numbers beyond i64/u64 become f64 text.
//!
//! Dedupe key (reliability.md §2.2 item 3), first present wins: `webhook-id`, `X-GitHub-Delivery`,
//! the preset's own id in the body (Slack `event_id`, Twilio `MessageSid`, Stripe `id`, Postmark
//! `MessageID`, Mailgun `Message-Id`, the `json` mapping's `id`), an `Idempotency-Key` header, and
//! otherwise `sha256:<hex of the body>`. The hash makes a plain form at-least-once: a resent identical
//! body is one row, but a sender that changes a byte (a timestamp) makes a second one.

use axum::http::HeaderMap;
use chrono::{DateTime, TimeZone, Utc};
use std::borrow::Cow;
use std::collections::HashSet;

use sha2::{Digest, Sha256};

use super::fields;
use super::json_tree::Node;
use crate::message::{Address, Automation, Direction, Message, Origin, ParseStatus};

/// The most form fields a preset reads; beyond that the body is stored as degraded.
pub const MAX_FORM_FIELDS: usize = 1000;

/// Delivery ids longer than this are replaced by their hash so the unique key stays small.
const MAX_ID_LEN: usize = 200;

/// A JSON-pointer mapping for the `json` preset (config `mapping:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    /// The delivery id (dedupe key); required when mapped.
    pub id: Option<String>,
    /// The sender address (email, phone or handle); required when mapped.
    pub from: Option<String>,
    /// The sender's display name.
    pub name: Option<String>,
    /// The subject or title.
    pub subject: Option<String>,
    /// The message text.
    pub text: Option<String>,
    /// A provider conversation key.
    pub thread: Option<String>,
    /// Which values of which field mean the team wrote it.
    pub direction: Option<DirectionRule>,
    /// The sender's timestamp (RFC 3339 or unix seconds/milliseconds).
    pub occurred_at: Option<String>,
}

/// `direction: { pointer, outbound: [..] }`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectionRule {
    /// Pointer to the field naming the author kind.
    pub pointer: String,
    /// Values of that field that mean outbound (a team reply).
    pub outbound: Vec<String>,
}

/// The configured preset of a webhook source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preset {
    /// A contact form, JSON or urlencoded: name, email, phone, subject, message.
    Form,
    /// Any JSON body, mapped by pointers.
    Json(Box<Mapping>),
    /// Twilio Messaging (SMS): From, To, Body, MessageSid.
    TwilioSms,
    /// Slack Events API (and slash commands).
    SlackEvents,
    /// A Standard Webhooks envelope: type, timestamp, data.
    StandardWebhooks,
    /// GitHub events (issues, comments, discussions, others as a summary).
    Github,
    /// Stripe events.
    Stripe,
    /// Postmark inbound email (JSON).
    PostmarkInbound,
    /// Mailgun inbound routes (form, multipart or JSON).
    MailgunInbound,
}

impl Preset {
    /// The configuration name of the preset.
    pub fn as_str(&self) -> &'static str {
        match self {
            Preset::Form => "form",
            Preset::Json(_) => "json",
            Preset::TwilioSms => "twilio-sms",
            Preset::SlackEvents => "slack-events",
            Preset::StandardWebhooks => "standard-webhooks",
            Preset::Github => "github",
            Preset::Stripe => "stripe",
            Preset::PostmarkInbound => "postmark-inbound",
            Preset::MailgunInbound => "mailgun-inbound",
        }
    }
}

/// One authenticated delivery, as the preset sees it.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The configured source name.
    pub source: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The exact body bytes.
    pub body: &'a [u8],
    /// When the request was received (trusted; starts SLA clocks).
    pub received_at: DateTime<Utc>,
    /// The signed timestamp, if the scheme has one (untrusted sender time).
    pub signed_at: Option<DateTime<Utc>>,
}

/// What to do with a delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Store this message, then acknowledge.
    Store(Box<Message>),
    /// Answer with this text and store nothing (Slack `url_verification`).
    Challenge(String),
    /// Not a client message (a ping, a delivery-status callback); acknowledge without storing.
    Ignore(&'static str),
}

/// A required field is missing or unusable; answered 422 with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field} at {pointer}: {problem}")]
pub struct FieldError {
    /// The preset's or mapping's field name.
    pub field: &'static str,
    /// The JSON pointer or form field name looked at.
    pub pointer: String,
    /// `missing` or what is wrong with the value.
    pub problem: &'static str,
}

fn missing(field: &'static str, pointer: &str) -> FieldError {
    FieldError {
        field,
        pointer: pointer.to_string(),
        problem: "missing",
    }
}

/// Maps an authenticated delivery to what should be stored.
pub fn normalize(preset: &Preset, d: &Delivery<'_>) -> Result<Outcome, FieldError> {
    match preset {
        Preset::Form => form(d),
        Preset::Json(m) => json_mapped(m, d),
        Preset::TwilioSms => twilio_sms(d),
        Preset::SlackEvents => slack(d),
        Preset::StandardWebhooks => standard_webhooks(d),
        Preset::Github => github(d),
        Preset::Stripe => stripe(d),
        Preset::PostmarkInbound => postmark(d),
        Preset::MailgunInbound => mailgun(d),
    }
}

/// The dedupe key from headers, a body id, or the body hash (see the module comment for the order).
pub fn dedupe_key(headers: &HeaderMap, body_id: Option<&str>, body: &[u8]) -> String {
    let header_id = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let chosen = header_id("webhook-id")
        .or_else(|| header_id("x-github-delivery"))
        .or(body_id.map(str::trim).filter(|v| !v.is_empty()))
        .or_else(|| header_id("idempotency-key"));
    match chosen {
        Some(id) if id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control) => id.to_string(),
        Some(id) => format!("sha256:{}", hex::encode(Sha256::digest(id.as_bytes()))),
        None => format!("sha256:{}", hex::encode(Sha256::digest(body))),
    }
}

/// A message with only the delivery facts filled in.
fn base(d: &Delivery<'_>, body_id: Option<&str>) -> Message {
    Message {
        source: d.source.to_string(),
        origin: Origin::Webhook {
            delivery_id: dedupe_key(d.headers, body_id, d.body),
        },
        direction: Direction::Inbound,
        received_at: d.received_at,
        sent_at: d.signed_at,
        from: None,
        to: Vec::new(),
        subject: None,
        text: None,
        message_id: None,
        in_reply_to: Vec::new(),
        references: Vec::new(),
        thread_key: None,
        automation: Automation::Human,
        parse: ParseStatus::Ok,
        raw: d.body.to_vec(),
    }
}

/// The authenticated-but-unreadable case: stored raw, flagged.
fn degraded(d: &Delivery<'_>, reason: String) -> Outcome {
    let mut m = base(d, None);
    m.parse = ParseStatus::Degraded(reason);
    Outcome::Store(Box::new(m))
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Reads a JSON body; the error is the degraded reason.
fn read_json(body: &[u8]) -> Result<Node<'_>, String> {
    Node::parse(body).map_err(|e| {
        if std::str::from_utf8(body).is_err() {
            "body is not valid UTF-8".to_string()
        } else {
            format!("body is not readable JSON: {e}")
        }
    })
}

/// A form body as a JSON object of strings (repeated names: the first wins), so one lookup serves both.
fn read_form(headers: &HeaderMap, body: &[u8]) -> Result<Node<'static>, String> {
    let ct = content_type(headers);
    let pairs = match fields::multipart_boundary(&ct) {
        Some(_) => {
            // Re-read the boundary from the original header: boundaries are case-sensitive.
            let raw_ct = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let boundary = fields::multipart_boundary(raw_ct).unwrap_or_default();
            fields::parse_multipart(body, &boundary, MAX_FORM_FIELDS)
        }
        None => fields::parse_urlencoded(body, MAX_FORM_FIELDS),
    }
    .map_err(|e| e.to_string())?;
    let mut seen = HashSet::with_capacity(pairs.len());
    let mut members = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        if seen.insert(k.clone()) {
            members.push((Cow::Owned(k), Node::String(Cow::Owned(v))));
        }
    }
    Ok(Node::Object(members))
}

/// JSON when the content type says so or the body looks like an object; a form otherwise.
fn read_json_or_form<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<Node<'a>, String> {
    let ct = content_type(headers);
    let looks_json = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[');
    if ct.contains("json") || (!ct.contains("form") && looks_json) {
        read_json(body)
    } else {
        read_form(headers, body)
    }
}

/// A scalar at a pointer as text; null and absent are `None`, objects and arrays are an error.
fn scalar(v: &Node<'_>, pointer: &str, field: &'static str) -> Result<Option<String>, FieldError> {
    match v.pointer(pointer) {
        None | Some(Node::Null) => Ok(None),
        Some(Node::String(s)) => Ok(Some(s.to_string())),
        Some(Node::Number(n)) => Ok(Some(n.to_string())),
        Some(Node::Bool(b)) => Ok(Some(b.to_string())),
        Some(_) => Err(FieldError {
            field,
            pointer: pointer.to_string(),
            problem: "not a string or number",
        }),
    }
}

/// A string at a pointer, ignoring other types (for presets whose payloads we know).
fn text_at(v: &Node<'_>, pointer: &str) -> Option<String> {
    match v.pointer(pointer) {
        Some(Node::String(s)) if !s.is_empty() => Some(s.to_string()),
        Some(Node::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// An address from text: emails are lowercased, anything else is kept as written.
fn address(addr: &str, name: Option<String>) -> Address {
    let addr = addr.trim();
    let addr = if addr.contains('@') {
        addr.to_lowercase()
    } else {
        addr.to_string()
    };
    Address {
        name: name.filter(|n| !n.trim().is_empty()),
        addr,
    }
}

/// `"Name" <addr@x>` or a bare address.
fn parse_mailbox(text: &str) -> Address {
    match (text.rfind('<'), text.rfind('>')) {
        (Some(a), Some(b)) if a < b => {
            let name = text[..a].trim().trim_matches('"').trim().to_string();
            address(&text[a + 1..b], Some(name))
        }
        _ => address(text, None),
    }
}

/// Message ids from an In-Reply-To/References value, without angle brackets.
fn message_ids(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || c == ',')
        .map(|s| s.trim_matches(|c| c == '<' || c == '>'))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn strip_angles(text: &str) -> Option<String> {
    let s = text.trim().trim_matches(|c| c == '<' || c == '>').trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// A timestamp: RFC 3339, RFC 2822, or unix seconds (milliseconds when implausibly large).
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let t = text.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Some(dt.with_timezone(&Utc));
    }
    if let Ok(dt) = DateTime::parse_from_rfc2822(t) {
        return Some(dt.with_timezone(&Utc));
    }
    let secs: f64 = t.parse().ok()?;
    if !secs.is_finite() {
        return None;
    }
    let secs = if secs.abs() > 1e11 {
        secs / 1000.0
    } else {
        secs
    };
    Utc.timestamp_opt(secs.trunc() as i64, 0).single()
}

fn form(d: &Delivery<'_>) -> Result<Outcome, FieldError> {
    let v = match read_json_or_form(d.headers, d.body) {
        Ok(v @ Node::Object(_)) => v,
        Ok(_) => return Ok(degraded(d, "form body is not an object".into())),
        Err(reason) => return Ok(degraded(d, reason)),
    };
    let name = scalar(&v, "/name", "name")?;
    let email = scalar(&v, "/email", "email")?.filter(|s| !s.trim().is_empty());
    let phone = scalar(&v, "/phone", "phone")?.filter(|s| !s.trim().is_empty());
    let message =
        scalar(&v, "/message", "message")?.ok_or_else(|| missing("message", "/message"))?;
    let from = email
        .or(phone)
        .ok_or_else(|| missing("email", "/email (or /phone)"))?;
    let mut m = base(d, None);
    m.from = Some(address(&from, name));
    m.subject = scalar(&v, "/subject", "subject")?;
    m.text = Some(message);
    Ok(Outcome::Store(Box::new(m)))
}

fn json_mapped(map: &Mapping, d: &Delivery<'_>) -> Result<Outcome, FieldError> {
    let v = match read_json(d.body) {
        Ok(v) => v,
        Err(reason) => return Ok(degraded(d, reason)),
    };
    let get = |p: &Option<String>, field: &'static str| -> Result<Option<String>, FieldError> {
        match p {
            Some(p) => scalar(&v, p, field),
            None => Ok(None),
        }
    };
    let id = get(&map.id, "id")?;
    if let (Some(p), None) = (&map.id, &id) {
        return Err(missing("id", p));
    }
    let from = get(&map.from, "from")?;
    if let (Some(p), None) = (&map.from, &from) {
        return Err(missing("from", p));
    }
    let mut m = base(d, id.as_deref());
    m.from = from.map(|f| address(&f, get(&map.name, "name").ok().flatten()));
    m.subject = get(&map.subject, "subject")?;
    m.text = get(&map.text, "text")?;
    m.thread_key = get(&map.thread, "thread")?;
    if let Some(rule) = &map.direction
        && let Some(value) = scalar(&v, &rule.pointer, "direction")?
        && rule.outbound.contains(&value)
    {
        m.direction = Direction::Outbound;
    }
    if let Some(at) = get(&map.occurred_at, "occurred_at")?.and_then(|t| parse_time(&t)) {
        m.sent_at = Some(at);
    }
    Ok(Outcome::Store(Box::new(m)))
}

fn twilio_sms(d: &Delivery<'_>) -> Result<Outcome, FieldError> {
    let v = match read_form(d.headers, d.body) {
        Ok(v) => v,
        Err(reason) => return Ok(degraded(d, reason)),
    };
    let body = text_at(&v, "/Body");
    if body.is_none() && v.get("MessageStatus").is_some() {
        return Ok(Outcome::Ignore("delivery status callback"));
    }
    let from = text_at(&v, "/From").ok_or_else(|| missing("From", "From"))?;
    let to = text_at(&v, "/To");
    let sid = text_at(&v, "/MessageSid").or_else(|| text_at(&v, "/SmsSid"));
    let mut m = base(d, sid.as_deref());
    let mut pair = [from.trim().to_string(), to.clone().unwrap_or_default()];
    pair.sort();
    m.thread_key = Some(format!("sms:{}:{}", pair[0], pair[1]));
    m.from = Some(address(&from, None));
    m.to = to.iter().map(|t| address(t, None)).collect();
    m.text = body;
    if text_at(&v, "/Direction").is_some_and(|s| s.starts_with("outbound")) {
        m.direction = Direction::Outbound;
    }
    Ok(Outcome::Store(Box::new(m)))
}

fn slack(d: &Delivery<'_>) -> Result<Outcome, FieldError> {
    let v = match read_json_or_form(d.headers, d.body) {
        Ok(v) => v,
        Err(reason) => return Ok(degraded(d, reason)),
    };
    match v.get("type").and_then(Node::as_str) {
        Some("url_verification") => {
            let challenge =
                text_at(&v, "/challenge").ok_or_else(|| missing("challenge", "/challenge"))?;
            return Ok(Outcome::Challenge(challenge));
        }
        Some("event_callback") => {}
        Some(_) => return Ok(Outcome::Ignore("slack callback that is not an event")),
        None => {
            // A slash command (form): user_id, text, trigger_id.
            if let Some(user) = text_at(&v, "/user_id") {
                let trigger = text_at(&v, "/trigger_id");
                let mut m = base(d, trigger.as_deref());
                m.from = Some(address(&format!("slack:{user}"), text_at(&v, "/user_name")));
                m.subject = text_at(&v, "/command");
                m.text = text_at(&v, "/text");
                m.thread_key = text_at(&v, "/channel_id").map(|c| format!("slack:{c}"));
                return Ok(Outcome::Store(Box::new(m)));
            }
            return Ok(degraded(d, "slack body without type".into()));
        }
    }
    let event_id = text_at(&v, "/event_id").ok_or_else(|| missing("event_id", "/event_id"))?;
    let kind = text_at(&v, "/event/type").unwrap_or_default();
    if kind != "message" && kind != "app_mention" {
        return Ok(Outcome::Ignore("slack event that is not a message"));
    }
    let subtype = text_at(&v, "/event/subtype");
    let is_bot = v.pointer("/event/bot_id").is_some() || subtype.as_deref() == Some("bot_message");
    if let Some(st) = subtype.as_deref()
        && !matches!(
            st,
            "bot_message" | "thread_broadcast" | "file_share" | "me_message"
        )
    {
        // Edits, deletions, joins: changes to existing messages, not new client text.
        return Ok(Outcome::Ignore(
            "slack message subtype that is not new text",
        ));
    }
    let mut m = base(d, Some(&event_id));
    let user = text_at(&v, "/event/user").or_else(|| text_at(&v, "/event/bot_id"));
    m.from = user.map(|u| address(&format!("slack:{u}"), text_at(&v, "/event/username")));
    m.text = text_at(&v, "/event/text");
    let channel = text_at(&v, "/event/channel").unwrap_or_default();
    let root = text_at(&v, "/event/thread_ts").or_else(|| text_at(&v, "/event/ts"));
    m.thread_key = root.map(|ts| format!("slack:{channel}:{ts}"));
    if let Some(t) = text_at(&v, "/event_time").and_then(|t| parse_time(&t)) {
        m.sent_at = Some(t);
    }
    if is_bot {
        m.direction = Direction::Outbound;
        m.automation = Automation::Automatic;
    }
    Ok(Outcome::Store(Box::new(m)))
}

fn standard_webhooks(d: &Delivery<'_>) -> Result<Outcome, FieldError> {
    let v = match read_json(d.body) {
        Ok(v @ Node::Object(_)) => v,
        Ok(_) => return Ok(degraded(d, "envelope is not an object".into())),
        Err(reason) => return Ok(degraded(d, reason)),
    };
    let mut m = base(d, None);
    m.subject = text_at(&v, "/type");
    let from = ["/data/email", "/data/from", "/data/customer/email"]
        .iter()
        .find_map(|p| text_at(&v, p));
    m.from = from.map(|f| address(&f, text_at(&v, "/data/name")));
    m.text = v.get("data").map(Node::to_string);
    if let Some(t) = text_at(&v, "/timestamp").and_then(|t| parse_time(&t)) {
        m.sent_at = Some(t);
    }
    Ok(Outcome::Store(Box::new(m)))
}

fn github(d: &Delivery<'_>) -> Result<Outcome, FieldError> {
    let event = d
        .headers
        .get("x-github-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if event == "ping" {
        return Ok(Outcome::Ignore("github ping"));
    }
    let v = match read_json(d.body) {
        Ok(v @ Node::Object(_)) => v,
        Ok(_) => return Ok(degraded(d, "github body is not an object".into())),
        Err(reason) => return Ok(degraded(d, reason)),
    };
    let mut m = base(d, None);
    let item = ["issue", "pull_request", "discussion"]
        .iter()
        .find(|k| v.get(k).is_some_and(Node::is_object))
        .copied();
    let login = text_at(&v, "/sender/login");
    m.from = login.map(|l| address(&format!("github:{l}"), None));
    let action = text_at(&v, "/action");
    match item {
        Some(k) => {
            m.subject = text_at(&v, &format!("/{k}/title"));
            let author_assoc;
            if v.get("comment").is_some_and(Node::is_object) {
                m.text = text_at(&v, "/comment/body");
                author_assoc = text_at(&v, "/comment/author_association");
            } else {
                m.text = text_at(&v, &format!("/{k}/body"));
                author_assoc = text_at(&v, &format!("/{k}/author_association"));
            }
            if let (Some(repo), Some(n)) = (
                text_at(&v, "/repository/full_name"),
                text_at(&v, &format!("/{k}/number")),
            ) {
                m.thread_key = Some(format!("github:{repo}#{n}"));
            }
            if matches!(
                author_assoc.as_deref(),
                Some("OWNER" | "MEMBER" | "COLLABORATOR")
            ) {
                m.direction = Direction::Outbound;
            }
        }
        None => {
            m.subject = Some(match action {
                Some(a) => format!("{event} {a}"),
                None => event.clone(),
            });
        }
    }
    if text_at(&v, "/sender/type").as_deref() == Some("Bot") {
        m.direction = Direction::Outbound;
        m.automation = Automation::Automatic;
    }
    Ok(Outcome::Store(Box::new(m)))
}

fn stripe(d: &Delivery<'_>) -> Result<Outcome, FieldError> {
    let v = match read_json(d.body) {
        Ok(v @ Node::Object(_)) => v,
        Ok(_) => return Ok(degraded(d, "stripe body is not an object".into())),
        Err(reason) => return Ok(degraded(d, reason)),
    };
    let id = text_at(&v, "/id").ok_or_else(|| missing("id", "/id"))?;
    let mut m = base(d, Some(&id));
    m.subject = text_at(&v, "/type");
    let obj = "/data/object";
    let from = [
        "customer_email",
        "receipt_email",
        "email",
        "billing_details/email",
    ]
    .iter()
    .find_map(|k| text_at(&v, &format!("{obj}/{k}")));
    let name = ["customer_name", "name", "billing_details/name"]
        .iter()
        .find_map(|k| text_at(&v, &format!("{obj}/{k}")));
    m.from = from.map(|f| address(&f, name));
    m.text = text_at(&v, &format!("{obj}/description"));
    let customer = text_at(&v, &format!("{obj}/customer")).or_else(|| {
        (text_at(&v, &format!("{obj}/object")).as_deref() == Some("customer"))
            .then(|| text_at(&v, &format!("{obj}/id")))
            .flatten()
    });
    m.thread_key = customer.map(|c| format!("stripe:{c}"));
    if let Some(t) = text_at(&v, "/created").and_then(|t| parse_time(&t)) {
        m.sent_at = Some(t);
    }
    Ok(Outcome::Store(Box::new(m)))
}

fn postmark(d: &Delivery<'_>) -> Result<Outcome, FieldError> {
    let v = match read_json(d.body) {
        Ok(v @ Node::Object(_)) => v,
        Ok(_) => return Ok(degraded(d, "postmark body is not an object".into())),
        Err(reason) => return Ok(degraded(d, reason)),
    };
    let pm_id = text_at(&v, "/MessageID");
    let mut m = base(d, pm_id.as_deref());
    m.from = match text_at(&v, "/FromFull/Email") {
        Some(e) => Some(address(&e, text_at(&v, "/FromFull/Name"))),
        None => text_at(&v, "/From").map(|f| parse_mailbox(&f)),
    };
    if m.from.is_none() {
        return Err(missing("From", "/FromFull/Email (or /From)"));
    }
    if let Some(Node::Array(list)) = v.get("ToFull") {
        m.to = list
            .iter()
            .filter_map(|t| {
                let e = t.get("Email")?.as_str()?;
                Some(address(
                    e,
                    t.get("Name").and_then(Node::as_str).map(str::to_string),
                ))
            })
            .collect();
    }
    m.subject = text_at(&v, "/Subject");
    m.text = text_at(&v, "/TextBody").or_else(|| text_at(&v, "/StrippedTextReply"));
    if let Some(Node::Array(headers)) = v.get("Headers") {
        for h in headers {
            let (Some(name), Some(value)) = (
                h.get("Name").and_then(Node::as_str),
                h.get("Value").and_then(Node::as_str),
            ) else {
                continue;
            };
            match name.to_ascii_lowercase().as_str() {
                "message-id" => m.message_id = strip_angles(value),
                "in-reply-to" => m.in_reply_to = message_ids(value),
                "references" => m.references = message_ids(value),
                _ => {}
            }
        }
    }
    if let Some(t) = text_at(&v, "/Date").and_then(|t| parse_time(&t)) {
        m.sent_at = Some(t);
    }
    Ok(Outcome::Store(Box::new(m)))
}

fn mailgun(d: &Delivery<'_>) -> Result<Outcome, FieldError> {
    let v = match read_json_or_form(d.headers, d.body) {
        Ok(v @ Node::Object(_)) => v,
        Ok(_) => return Ok(degraded(d, "mailgun body is not an object".into())),
        Err(reason) => return Ok(degraded(d, reason)),
    };
    let msg_id = text_at(&v, "/Message-Id").and_then(|s| strip_angles(&s));
    let mut m = base(d, msg_id.as_deref());
    m.message_id = msg_id;
    m.from = text_at(&v, "/from")
        .or_else(|| text_at(&v, "/From"))
        .map(|f| parse_mailbox(&f))
        .or_else(|| text_at(&v, "/sender").map(|s| address(&s, None)));
    if m.from.is_none() {
        return Err(missing("from", "from (or sender)"));
    }
    m.to = text_at(&v, "/recipient")
        .map(|r| r.split(',').map(parse_mailbox).collect())
        .unwrap_or_default();
    m.subject = text_at(&v, "/subject").or_else(|| text_at(&v, "/Subject"));
    m.text = text_at(&v, "/body-plain").or_else(|| text_at(&v, "/stripped-text"));
    m.in_reply_to = text_at(&v, "/In-Reply-To")
        .map(|s| message_ids(&s))
        .unwrap_or_default();
    m.references = text_at(&v, "/References")
        .map(|s| message_ids(&s))
        .unwrap_or_default();
    if let Some(t) = text_at(&v, "/Date").and_then(|t| parse_time(&t)) {
        m.sent_at = Some(t);
    }
    Ok(Outcome::Store(Box::new(m)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn run(preset: &Preset, hdrs: &[(&str, &str)], body: &[u8]) -> Result<Outcome, FieldError> {
        let h = headers(hdrs);
        normalize(
            preset,
            &Delivery {
                source: "src",
                headers: &h,
                body,
                received_at: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
                signed_at: None,
            },
        )
    }

    fn stored(o: Result<Outcome, FieldError>) -> Message {
        match o {
            Ok(Outcome::Store(m)) => *m,
            other => panic!("expected a stored message, got {other:?}"),
        }
    }

    fn delivery_id(m: &Message) -> &str {
        match &m.origin {
            Origin::Webhook { delivery_id } => delivery_id,
            Origin::Imap { .. } => panic!("not a webhook origin"),
        }
    }

    const JSON: (&str, &str) = ("content-type", "application/json");
    const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

    #[test]
    fn form_json_and_urlencoded() {
        let body =
            br#"{"name":"Eleni","email":"Eleni@Mail.Example","subject":"Hi","message":"Call me"}"#;
        let m = stored(run(&Preset::Form, &[JSON], body));
        assert_eq!(m.from.as_ref().unwrap().addr, "eleni@mail.example");
        assert_eq!(m.from.as_ref().unwrap().name.as_deref(), Some("Eleni"));
        assert_eq!(m.text.as_deref(), Some("Call me"));
        assert_eq!(m.parse, ParseStatus::Ok);
        assert!(delivery_id(&m).starts_with("sha256:"));
        let m = stored(run(
            &Preset::Form,
            &[FORM, ("idempotency-key", "k-1")],
            b"phone=%2B306912345678&message=hello",
        ));
        assert_eq!(m.from.as_ref().unwrap().addr, "+306912345678");
        assert_eq!(delivery_id(&m), "k-1");
    }

    #[test]
    fn missing_required_fields_name_field_and_pointer() {
        type Row<'a> = (
            &'a Preset,
            &'a [(&'a str, &'a str)],
            &'a [u8],
            &'a str,
            &'a str,
        );
        let table: &[Row<'_>] = &[
            (
                &Preset::Form,
                &[JSON],
                br#"{"email":"a@b"}"#,
                "message",
                "/message",
            ),
            (
                &Preset::Form,
                &[JSON],
                br#"{"message":"x"}"#,
                "email",
                "/email (or /phone)",
            ),
            (
                &Preset::TwilioSms,
                &[FORM],
                b"Body=hi&MessageSid=SM1",
                "From",
                "From",
            ),
            (
                &Preset::SlackEvents,
                &[JSON],
                br#"{"type":"event_callback","event":{}}"#,
                "event_id",
                "/event_id",
            ),
            (&Preset::Stripe, &[JSON], br#"{"type":"x"}"#, "id", "/id"),
            (
                &Preset::PostmarkInbound,
                &[JSON],
                br#"{"Subject":"x"}"#,
                "From",
                "/FromFull/Email (or /From)",
            ),
        ];
        for (preset, h, body, field, pointer) in table {
            let err = run(preset, h, body).unwrap_err();
            assert_eq!(
                (err.field, err.pointer.as_str()),
                (*field, *pointer),
                "{preset:?}"
            );
        }
        let map = Mapping {
            id: Some("/event/id".into()),
            from: Some("/event/customer/email".into()),
            ..Mapping::default()
        };
        let err = run(
            &Preset::Json(Box::new(map.clone())),
            &[JSON],
            br#"{"event":{"customer":{"email":"a@b"}}}"#,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "field id at /event/id: missing");
        let err = run(
            &Preset::Json(Box::new(map)),
            &[JSON],
            br#"{"event":{"id":{"x":1},"customer":{"email":"a@b"}}}"#,
        )
        .unwrap_err();
        assert_eq!(err.problem, "not a string or number");
    }

    #[test]
    fn json_mapping_full() {
        let map = Mapping {
            id: Some("/event/id".into()),
            from: Some("/event/customer/email".into()),
            name: Some("/event/customer/name".into()),
            subject: Some("/event/title".into()),
            text: Some("/event/body".into()),
            thread: Some("/event/ticket_id".into()),
            direction: Some(DirectionRule {
                pointer: "/event/author_type".into(),
                outbound: vec!["agent".into(), "staff".into()],
            }),
            occurred_at: Some("/event/created_at".into()),
        };
        let body = br#"{"event":{"id":42,"customer":{"email":"c@x.test","name":"C"},"title":"T","body":"B","ticket_id":7,"author_type":"staff","created_at":"2026-11-26T10:00:00Z"}}"#;
        let m = stored(run(&Preset::Json(Box::new(map.clone())), &[JSON], body));
        assert_eq!(delivery_id(&m), "42");
        assert_eq!(m.direction, Direction::Outbound);
        assert_eq!(m.thread_key.as_deref(), Some("7"));
        assert_eq!(m.subject.as_deref(), Some("T"));
        assert_eq!(
            m.sent_at,
            Some(Utc.with_ymd_and_hms(2026, 11, 26, 10, 0, 0).unwrap())
        );
        let inbound = String::from_utf8_lossy(body).replace("staff", "customer");
        let m = stored(run(
            &Preset::Json(Box::new(map)),
            &[JSON],
            inbound.as_bytes(),
        ));
        assert_eq!(m.direction, Direction::Inbound);
    }

    #[test]
    fn unreadable_bodies_are_degraded_not_lost() {
        let deep = "[".repeat(100_000);
        let bad_utf8: &[u8] = b"{\"message\":\"\xff\xfe\"}";
        let many = "a=1&".repeat(100_000);
        let cases: Vec<(Preset, (&str, &str), &[u8])> = vec![
            (Preset::Json(Box::default()), JSON, deep.as_bytes()),
            (Preset::Form, JSON, bad_utf8),
            (Preset::Form, FORM, many.as_bytes()),
            (Preset::Stripe, JSON, b"NaN"),
            (Preset::Github, JSON, b"[1,2]"),
            (Preset::TwilioSms, FORM, many.as_bytes()),
        ];
        for (preset, h, body) in cases {
            let m = stored(run(&preset, &[h], body));
            assert!(matches!(m.parse, ParseStatus::Degraded(_)), "{preset:?}");
            assert_eq!(m.raw, body);
            assert!(delivery_id(&m).starts_with("sha256:"));
        }
    }

    #[test]
    fn twilio_sms_thread_is_the_phone_pair() {
        let body = b"MessageSid=SM123&From=%2B306912345678&To=%2B302101234567&Body=Hello";
        let m = stored(run(&Preset::TwilioSms, &[FORM], body));
        assert_eq!(delivery_id(&m), "SM123");
        assert_eq!(
            m.thread_key.as_deref(),
            Some("sms:+302101234567:+306912345678")
        );
        assert_eq!(m.text.as_deref(), Some("Hello"));
        assert_eq!(m.to[0].addr, "+302101234567");
        let status = b"MessageSid=SM123&MessageStatus=delivered&From=%2B1&To=%2B2";
        assert_eq!(
            run(&Preset::TwilioSms, &[FORM], status),
            Ok(Outcome::Ignore("delivery status callback"))
        );
    }

    #[test]
    fn slack_challenge_dedupe_and_bots() {
        let body = br#"{"type":"url_verification","challenge":"3eZbrw1aB"}"#;
        assert_eq!(
            run(&Preset::SlackEvents, &[JSON], body),
            Ok(Outcome::Challenge("3eZbrw1aB".into()))
        );
        let msg = br#"{"type":"event_callback","event_id":"Ev1","event_time":1700000000,"event":{"type":"message","user":"U1","text":"hi","channel":"C1","ts":"1.2"}}"#;
        let m = stored(run(&Preset::SlackEvents, &[JSON], msg));
        assert_eq!(delivery_id(&m), "Ev1");
        assert_eq!(m.from.as_ref().unwrap().addr, "slack:U1");
        assert_eq!(m.thread_key.as_deref(), Some("slack:C1:1.2"));
        assert_eq!(m.direction, Direction::Inbound);
        let bot = br#"{"type":"event_callback","event_id":"Ev2","event":{"type":"message","subtype":"bot_message","bot_id":"B1","text":"auto","channel":"C1","ts":"1.3","thread_ts":"1.2"}}"#;
        let m = stored(run(&Preset::SlackEvents, &[JSON], bot));
        assert_eq!(
            (m.direction, m.automation),
            (Direction::Outbound, Automation::Automatic)
        );
        assert_eq!(m.thread_key.as_deref(), Some("slack:C1:1.2"));
        let edit = br#"{"type":"event_callback","event_id":"Ev3","event":{"type":"message","subtype":"message_changed"}}"#;
        assert!(matches!(
            run(&Preset::SlackEvents, &[JSON], edit),
            Ok(Outcome::Ignore(_))
        ));
    }

    #[test]
    fn header_ids_win_over_body_ids() {
        let body = br#"{"id":"evt_1","type":"charge.succeeded","created":1700000000,"data":{"object":{"receipt_email":"R@x.test","customer":"cus_9","description":"d"}}}"#;
        let m = stored(run(&Preset::Stripe, &[JSON], body));
        assert_eq!(delivery_id(&m), "evt_1");
        assert_eq!(m.from.as_ref().unwrap().addr, "r@x.test");
        assert_eq!(m.thread_key.as_deref(), Some("stripe:cus_9"));
        let m = stored(run(
            &Preset::StandardWebhooks,
            &[JSON, ("webhook-id", "msg_1")],
            br#"{"type":"a.b","timestamp":"2026-01-01T00:00:00Z","data":{"email":"x@y"}}"#,
        ));
        assert_eq!(delivery_id(&m), "msg_1");
        assert_eq!(m.subject.as_deref(), Some("a.b"));
        let long = "x".repeat(500);
        let m = stored(run(
            &Preset::Form,
            &[JSON, ("idempotency-key", &long)],
            br#"{"email":"a@b","message":"m"}"#,
        ));
        assert!(delivery_id(&m).starts_with("sha256:"));
    }

    #[test]
    fn github_comment_from_member_is_outbound() {
        let body = br#"{"action":"created","issue":{"number":5,"title":"Bug","body":"b"},"comment":{"body":"fixed","author_association":"MEMBER"},"repository":{"full_name":"o/r"},"sender":{"login":"maria","type":"User"}}"#;
        let m = stored(run(
            &Preset::Github,
            &[
                JSON,
                ("x-github-event", "issue_comment"),
                ("x-github-delivery", "g-1"),
            ],
            body,
        ));
        assert_eq!(delivery_id(&m), "g-1");
        assert_eq!(m.direction, Direction::Outbound);
        assert_eq!(m.thread_key.as_deref(), Some("github:o/r#5"));
        assert_eq!(m.text.as_deref(), Some("fixed"));
        assert_eq!(
            run(&Preset::Github, &[("x-github-event", "ping")], b"{}"),
            Ok(Outcome::Ignore("github ping"))
        );
    }

    #[test]
    fn inbound_email_presets_keep_threading_hints() {
        let pm = br#"{"MessageID":"pm-1","FromFull":{"Email":"Client@X.test","Name":"Client"},"ToFull":[{"Email":"support@biz.test","Name":""}],"Subject":"Re: order","TextBody":"thanks","Date":"Thu, 26 Nov 2026 10:00:00 +0000","Headers":[{"Name":"Message-ID","Value":"<m2@x.test>"},{"Name":"In-Reply-To","Value":"<m1@biz.test>"},{"Name":"References","Value":"<m0@biz.test> <m1@biz.test>"}]}"#;
        let m = stored(run(&Preset::PostmarkInbound, &[JSON], pm));
        assert_eq!(delivery_id(&m), "pm-1");
        assert_eq!(m.from.as_ref().unwrap().addr, "client@x.test");
        assert_eq!(m.message_id.as_deref(), Some("m2@x.test"));
        assert_eq!(m.in_reply_to, vec!["m1@biz.test"]);
        assert_eq!(m.references, vec!["m0@biz.test", "m1@biz.test"]);
        let mg = b"sender=client%40x.test&from=%22Client%22+%3Cclient%40x.test%3E&recipient=support%40biz.test&subject=Hi&body-plain=text&Message-Id=%3Cmg1%40x.test%3E&In-Reply-To=%3Cm1%40biz.test%3E";
        let m = stored(run(&Preset::MailgunInbound, &[FORM], mg));
        assert_eq!(delivery_id(&m), "mg1@x.test");
        assert_eq!(m.from.as_ref().unwrap().name.as_deref(), Some("Client"));
        assert_eq!(m.in_reply_to, vec!["m1@biz.test"]);
        assert_eq!(m.to[0].addr, "support@biz.test");
    }
}
