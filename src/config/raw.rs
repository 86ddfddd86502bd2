//! `RawConfig`: the file's exact shape (serde + JSON Schema), and section-by-section decoding
//! so that one mistake does not hide the next.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{Ctx, suggest};

/// One value or a list of values (`email: a@x` or `email: [a@x, b@x]`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl Default for OneOrMany {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

impl OneOrMany {
    /// The values as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// IANA time zone for digests and the default calendar zone (default UTC).
    pub timezone: Option<String>,
    /// Where the queue lives (default: SQLite at $STATE_DIRECTORY/frontdesk.db).
    pub storage: Option<RawStorage>,
    /// The HTTP server for webhooks, /healthz, /readyz and /metrics.
    pub server: Option<RawServer>,
    /// The people who answer; their messages are replies.
    #[serde(default)]
    pub team: Vec<RawTeamMember>,
    /// IMAP accounts and webhook endpoints.
    #[serde(default)]
    pub sources: Vec<RawSource>,
    /// Rules that name and tag known clients.
    #[serde(default)]
    pub clients: Vec<RawClientRule>,
    /// Ordered ownership rules; the first match names the owner.
    #[serde(default)]
    pub responsibilities: Vec<RawOwnerRule>,
    /// SLA calendars and policies.
    pub sla: Option<RawSla>,
    /// One or two output channels.
    #[serde(default)]
    pub channels: Vec<RawChannel>,
    /// Scheduled digests.
    #[serde(default)]
    pub digests: Vec<RawDigest>,
    /// Alert routing.
    pub alerts: Option<RawAlerts>,
}

/// The top-level keys, for did-you-mean suggestions.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "timezone",
    "storage",
    "server",
    "team",
    "sources",
    "clients",
    "responsibilities",
    "sla",
    "channels",
    "digests",
    "alerts",
];

/// Storage backend.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// SQLite database file.
    pub sqlite: Option<PathBuf>,
    /// PostgreSQL URL, e.g. postgres://frontdesk@db.internal/frontdesk?sslmode=verify-full.
    pub postgres: Option<String>,
    /// File holding the PostgreSQL password (mode 0600).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the PostgreSQL password.
    pub password_env: Option<String>,
    /// systemd credential holding the PostgreSQL password.
    pub password_credential: Option<String>,
}

/// HTTP server settings.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// IP:PORT to listen on (default 127.0.0.1:8025).
    pub listen: Option<String>,
    /// Default body limit (default 1MiB).
    pub max_body: Option<String>,
    /// Time allowed to send request headers (default 10s).
    pub header_timeout: Option<String>,
    /// Requests handled at once (default 512).
    pub max_concurrency: Option<usize>,
    /// How long shutdown waits for in-flight work (default 20s).
    pub drain_timeout: Option<String>,
    /// This replica's name in leases, `frontdesk sources` and `/metrics` (default HOST-PID).
    pub replica: Option<String>,
}

/// A team member.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTeamMember {
    /// Name used in rules and digests.
    pub name: String,
    /// Email addresses.
    #[serde(default)]
    pub email: OneOrMany,
    /// Phone numbers.
    #[serde(default)]
    pub phone: OneOrMany,
    /// Chat handles by provider.
    #[serde(default)]
    pub handles: BTreeMap<String, String>,
}

/// A source: exactly one of `imap` or `webhook`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// Unique name.
    pub name: String,
    /// An IMAP account.
    pub imap: Option<RawImap>,
    /// A webhook endpoint at /hooks/{name}.
    pub webhook: Option<RawWebhook>,
}

/// TLS mode.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RawTls {
    /// TLS from the first byte.
    Implicit,
    /// STARTTLS upgrade.
    Starttls,
    /// Clear text (loopback only).
    None,
}

/// Folder role.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RawFolderRole {
    /// Client mail.
    Inbound,
    /// The team's sent replies.
    Sent,
}

/// A folder: a name, or a name and role.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawFolder {
    /// Just the name (role inbound).
    Name(String),
    /// Name and role.
    Full {
        /// Folder name.
        name: String,
        /// inbound (default) or sent.
        role: Option<RawFolderRole>,
    },
}

/// An IMAP account.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawImap {
    /// Server host (default from `auth.oauth2.provider`: imap.gmail.com, outlook.office365.com).
    pub host: Option<String>,
    /// Port (default 993 for implicit TLS, 143 otherwise).
    pub port: Option<u16>,
    /// implicit (default) | starttls | none (loopback only). A server greeting PREAUTH is used
    /// without logging in, except with starttls, where it is refused (it would skip TLS).
    pub tls: Option<RawTls>,
    /// PEM CA bundle instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Login name.
    pub username: String,
    /// Inline password (discouraged: warns).
    pub password: Option<String>,
    /// File holding the password (mode 0600).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// systemd credential name (under $CREDENTIALS_DIRECTORY).
    pub password_credential: Option<String>,
    /// OAuth2 login instead of a password (`auth: {oauth2: {...}}`).
    pub auth: Option<RawLoginAuth>,
    /// Watched folders (default [INBOX]).
    pub folders: Option<Vec<RawFolder>>,
    /// Use IDLE when offered (default true).
    pub idle: Option<bool>,
    /// Poll interval without IDLE (default 60s).
    pub poll_interval: Option<String>,
    /// First-run start: all | none | a duration (default 30d).
    pub backfill: Option<String>,
    /// Timeout for connect, TLS, each read and write (default 30s).
    pub timeout: Option<String>,
    /// Messages per fetch batch and transaction (default 200).
    pub batch_size: Option<u32>,
    /// Larger messages are quarantined without their body (default 32MiB).
    pub max_message_size: Option<String>,
}

/// How an IMAP source or SMTP channel logs in when it does not use a password.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLoginAuth {
    /// OAuth2 (SASL XOAUTH2 / OAUTHBEARER) with a refresh token from `frontdesk auth login`.
    pub oauth2: Option<RawOAuth2>,
}

/// OAuth2 provider preset.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RawOAuth2Provider {
    /// Google Workspace / Gmail.
    Google,
    /// Microsoft 365 (Entra ID).
    Microsoft,
    /// Any other provider: give token_url and auth_url or device_url.
    Custom,
}

/// OAuth2 client settings.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth2 {
    /// google | microsoft | custom: fills in hosts, ports, endpoints and scopes.
    pub provider: RawOAuth2Provider,
    /// The application (client) id from the provider's app registration.
    pub client_id: String,
    /// Inline client secret (discouraged: warns).
    pub client_secret: Option<String>,
    /// File holding the client secret (mode 0600).
    pub client_secret_file: Option<PathBuf>,
    /// Environment variable holding the client secret.
    pub client_secret_env: Option<String>,
    /// systemd credential name holding the client secret.
    pub client_secret_credential: Option<String>,
    /// Microsoft tenant id or domain (default `organizations`).
    pub tenant: Option<String>,
    /// Token endpoint (preset for google and microsoft).
    pub token_url: Option<String>,
    /// Device authorization endpoint, RFC 8628 (preset for microsoft).
    pub device_url: Option<String>,
    /// Authorization endpoint for the browser flow (preset for google and microsoft).
    pub auth_url: Option<String>,
    /// Scopes to ask for (preset for google and microsoft).
    pub scopes: Option<Vec<String>>,
}

/// Webhook payload preset.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RawPreset {
    /// Contact form.
    Form,
    /// Any JSON with a mapping.
    Json,
    /// Standard Webhooks event.
    StandardWebhooks,
    /// GitHub webhook.
    Github,
    /// Slack Events API.
    SlackEvents,
    /// Twilio inbound SMS.
    TwilioSms,
    /// Stripe events.
    Stripe,
    /// Postmark inbound email.
    PostmarkInbound,
    /// Mailgun inbound route.
    MailgunInbound,
}

/// Webhook authentication scheme.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RawAuthScheme {
    /// standardwebhooks.com.
    StandardWebhooks,
    /// X-Hub-Signature-256.
    Github,
    /// Slack v0.
    Slack,
    /// X-Twilio-Signature.
    Twilio,
    /// Stripe-Signature.
    Stripe,
    /// Mailgun signature.
    Mailgun,
    /// Generic HMAC-SHA256 header.
    HmacSha256,
    /// Bearer token.
    Bearer,
    /// Basic auth.
    Basic,
    /// No authentication.
    None,
}

impl RawAuthScheme {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            RawAuthScheme::StandardWebhooks => "standard-webhooks",
            RawAuthScheme::Github => "github",
            RawAuthScheme::Slack => "slack",
            RawAuthScheme::Twilio => "twilio",
            RawAuthScheme::Stripe => "stripe",
            RawAuthScheme::Mailgun => "mailgun",
            RawAuthScheme::HmacSha256 => "hmac-sha256",
            RawAuthScheme::Bearer => "bearer",
            RawAuthScheme::Basic => "basic",
            RawAuthScheme::None => "none",
        }
    }
}

/// Signature encoding.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RawEncoding {
    /// Hex.
    Hex,
    /// Base64.
    Base64,
}

/// Webhook authentication.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWebhookAuth {
    /// The scheme.
    pub scheme: RawAuthScheme,
    /// Inline secret (discouraged: warns).
    pub secret: Option<String>,
    /// File holding the secret (mode 0600).
    pub secret_file: Option<PathBuf>,
    /// Environment variable holding the secret.
    pub secret_env: Option<String>,
    /// systemd credential name.
    pub secret_credential: Option<String>,
    /// Several inline secrets (rotation).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Several secret files (rotation).
    #[serde(default)]
    pub secrets_file: Vec<PathBuf>,
    /// Several environment variables (rotation).
    #[serde(default)]
    pub secrets_env: Vec<String>,
    /// Several systemd credentials (rotation).
    #[serde(default)]
    pub secrets_credential: Vec<String>,
    /// Allowed clock skew for timestamped schemes (default 5m).
    pub tolerance: Option<String>,
    /// Signature header (hmac-sha256).
    pub header: Option<String>,
    /// Signature prefix (hmac-sha256), e.g. "sha256=".
    pub prefix: Option<String>,
    /// hex (default) | base64 (hmac-sha256).
    pub encoding: Option<RawEncoding>,
    /// User name (basic).
    pub username: Option<String>,
}

/// Direction mapping for the json preset.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDirectionMapping {
    /// JSON pointer to the author type.
    pub pointer: String,
    /// Values meaning "the team wrote it".
    #[serde(default)]
    pub outbound: Vec<String>,
}

/// JSON pointer mapping.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMapping {
    /// Delivery id (dedupe key).
    pub id: Option<String>,
    /// Sender address.
    pub from: Option<String>,
    /// Sender name.
    pub name: Option<String>,
    /// Subject.
    pub subject: Option<String>,
    /// Text body.
    pub text: Option<String>,
    /// Thread key.
    pub thread: Option<String>,
    /// Direction.
    pub direction: Option<RawDirectionMapping>,
    /// Provider timestamp.
    pub occurred_at: Option<String>,
}

/// A webhook endpoint.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    /// Payload preset.
    pub preset: RawPreset,
    /// Caller authentication.
    pub auth: RawWebhookAuth,
    /// The URL the provider calls (required for Twilio).
    pub public_url: Option<String>,
    /// Body limit (default server.max_body; 25MiB for inbound-email presets).
    pub max_body: Option<String>,
    /// JSON pointer mapping (json preset).
    pub mapping: Option<RawMapping>,
}

/// What a client rule matches.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawClientMatch {
    /// Exact email addresses.
    #[serde(default)]
    pub email: OneOrMany,
    /// Email domains.
    #[serde(default)]
    pub email_domain: OneOrMany,
    /// Phone numbers.
    #[serde(default)]
    pub phone: OneOrMany,
    /// Chat handles.
    #[serde(default)]
    pub handle: OneOrMany,
    /// Source names.
    #[serde(default)]
    pub source: OneOrMany,
}

/// A client rule.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawClientRule {
    /// Client name.
    pub name: Option<String>,
    /// What the rule matches.
    #[serde(rename = "match")]
    pub matches: Option<RawClientMatch>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// What an ownership or policy rule matches.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRuleMatch {
    /// Client names.
    #[serde(default)]
    pub client: OneOrMany,
    /// Client tags.
    #[serde(default)]
    pub client_tag: OneOrMany,
    /// Client email addresses.
    #[serde(default)]
    pub email: OneOrMany,
    /// Client email domains.
    #[serde(default)]
    pub email_domain: OneOrMany,
    /// Source names.
    #[serde(default)]
    pub source: OneOrMany,
    /// Keywords in subject or text.
    #[serde(default)]
    pub keyword: OneOrMany,
}

/// An ownership rule.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOwnerRule {
    /// Conditions (none: the default rule).
    #[serde(rename = "match")]
    pub matches: Option<RawRuleMatch>,
    /// Team member name.
    pub owner: String,
}

/// A business calendar.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCalendar {
    /// IANA time zone (default: the top-level timezone).
    pub timezone: Option<String>,
    /// Open intervals by day: `mon-fri: ["09:00-13:00", "14:00-17:30"]`.
    #[serde(default)]
    pub hours: BTreeMap<String, Vec<String>>,
    /// Closed dates, YYYY-MM-DD.
    #[serde(default)]
    pub holidays: Vec<String>,
    /// iCalendar file of all-day closed days.
    pub holidays_file: Option<PathBuf>,
}

/// An SLA policy.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Policy name.
    pub name: String,
    /// Conditions (none: the default policy).
    #[serde(rename = "match")]
    pub matches: Option<RawRuleMatch>,
    /// First-reply target, e.g. 4h.
    pub first_reply: String,
    /// Next-reply target, e.g. 8h.
    pub next_reply: String,
    /// Calendar name or `always` (default always).
    pub calendar: Option<String>,
    /// Warn this long before the due time: a duration (30m) or a share (25%).
    pub warn_before: Option<String>,
}

/// SLA settings.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSla {
    /// Named calendars.
    #[serde(default)]
    pub calendars: BTreeMap<String, RawCalendar>,
    /// Ordered policies.
    #[serde(default)]
    pub policies: Vec<RawPolicy>,
}

/// SMTP relay.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    /// Relay host (default from `auth.oauth2.provider`: smtp.gmail.com, smtp.office365.com).
    pub host: Option<String>,
    /// Port (default 465 implicit, 587 starttls, 25 none).
    pub port: Option<u16>,
    /// implicit (default) | starttls | none (loopback only).
    pub tls: Option<RawTls>,
    /// PEM CA bundle.
    pub ca_file: Option<PathBuf>,
    /// Login name.
    pub username: Option<String>,
    /// Inline password (discouraged).
    pub password: Option<String>,
    /// Password file (mode 0600).
    pub password_file: Option<PathBuf>,
    /// Password environment variable.
    pub password_env: Option<String>,
    /// systemd credential name.
    pub password_credential: Option<String>,
    /// OAuth2 login instead of a password (`auth: {oauth2: {...}}`).
    pub auth: Option<RawLoginAuth>,
    /// Overall timeout per send (default 60s).
    pub timeout: Option<String>,
}

/// An email channel.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEmailChannel {
    /// SMTP relay.
    pub smtp: Option<RawSmtp>,
    /// Directory for .eml files instead of SMTP.
    pub file: Option<PathBuf>,
    /// From header.
    pub from: String,
    /// Recipients.
    #[serde(default)]
    pub to: OneOrMany,
    /// Reply-To header.
    pub reply_to: Option<String>,
}

/// Webhook channel flavour.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RawWebhookChannelKind {
    /// Slack incoming webhook.
    Slack,
    /// Microsoft Teams.
    Teams,
    /// Discord.
    Discord,
    /// Generic JSON.
    Json,
}

/// A webhook channel.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWebhookChannel {
    /// Flavour.
    pub kind: RawWebhookChannelKind,
    /// Inline URL (discouraged: it often embeds a token).
    pub url: Option<String>,
    /// File holding the URL.
    pub url_file: Option<PathBuf>,
    /// Environment variable holding the URL.
    pub url_env: Option<String>,
    /// systemd credential name.
    pub url_credential: Option<String>,
    /// Inline signing secret (json).
    pub secret: Option<String>,
    /// Signing secret file.
    pub secret_file: Option<PathBuf>,
    /// Signing secret environment variable.
    pub secret_env: Option<String>,
    /// Signing secret credential.
    pub secret_credential: Option<String>,
    /// Overall timeout per send (default 30s).
    pub timeout: Option<String>,
}

/// A channel: exactly one of `email` or `webhook`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawChannel {
    /// Unique name.
    pub name: String,
    /// Email channel.
    pub email: Option<RawEmailChannel>,
    /// Webhook channel.
    pub webhook: Option<RawWebhookChannel>,
}

/// A scheduled digest.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDigest {
    /// Unique name.
    pub name: String,
    /// Cron expression (default "0 8 * * Mon-Fri").
    pub schedule: Option<String>,
    /// Channel name (default: the only channel).
    pub channel: Option<String>,
    /// One digest per owner (default false).
    pub per_owner: Option<bool>,
}

/// Alert kinds.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RawAlertKind {
    /// SLA warning.
    SlaWarning,
    /// SLA breach.
    SlaBreach,
    /// Source health change.
    SourceUnhealthy,
}

/// Quiet hours.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawQuietHours {
    /// Alerts outside this calendar's open hours are deferred into the next digest.
    pub calendar: String,
    /// What happens outside: defer.
    pub outside: Option<String>,
}

/// Alert routing.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// Channel name (default: the first channel).
    pub channel: Option<String>,
    /// Which events alert (default all).
    pub on: Option<Vec<RawAlertKind>>,
    /// Grouping window (default 1m).
    pub group_wait: Option<String>,
    /// Defer alerts outside business hours.
    pub quiet_hours: Option<RawQuietHours>,
}

/// Decodes one value, recording a located problem instead of failing.
fn decode<T: DeserializeOwned>(value: config::Value, base: &str, ctx: &mut Ctx) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let path = join_path(base, &inner);
            let (problem, fix) = explain_serde(&e.inner().to_string());
            // An unknown key's line is the key itself; other errors point at the value.
            let unknown_key = problem.starts_with("unknown key");
            let located = if unknown_key {
                unknown_key_path(&path, &problem)
            } else {
                path.clone()
            };
            let mut p = ctx.locate(&located, problem, fix);
            p.path = path;
            ctx.problems.push(p);
            None
        }
    }
}

fn unknown_key_path(parent: &str, problem: &str) -> String {
    let key = problem.split('`').nth(1).unwrap_or("");
    if parent.is_empty() {
        key.to_string()
    } else if parent.ends_with(key) {
        parent.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

fn join_path(base: &str, inner: &str) -> String {
    let inner = if inner == "." { "" } else { inner };
    match (base.is_empty(), inner.is_empty()) {
        (true, _) => inner.to_string(),
        (false, true) => base.to_string(),
        (false, false) if inner.starts_with('[') => format!("{base}{inner}"),
        (false, false) => format!("{base}.{inner}"),
    }
}

/// Rewrites serde's messages into frontdesk's words, with a did-you-mean where possible.
fn explain_serde(msg: &str) -> (String, Option<String>) {
    // serde: "unknown field `prot`, expected one of `host`, `port`" / "expected `a` or `b`"
    for (prefix, noun) in [("unknown field `", "key"), ("unknown variant `", "value")] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            let word = rest.split('`').next().unwrap_or("");
            let expected: Vec<&str> = rest
                .split('`')
                .skip(1)
                .enumerate()
                .filter(|(i, _)| i % 2 == 1)
                .map(|(_, s)| s)
                .collect();
            let fix = match suggest(word, expected.iter().copied()) {
                Some(m) => format!("did you mean `{m}`?"),
                None if expected.is_empty() => "remove it".to_string(),
                None => format!("expected one of: {}", expected.join(", ")),
            };
            return (format!("unknown {noun} `{word}`"), Some(fix));
        }
    }
    // the config crate's own wording for an unknown enum value names the Rust type, not the choices
    if let Some((name, word)) = msg
        .strip_prefix("enum ")
        .and_then(|rest| rest.split_once(" does not have variant constructor "))
    {
        let word = word.split(" for key `").next().unwrap_or(word).trim();
        let values = enum_values(name);
        let fix = match suggest(word, values.iter().map(String::as_str)) {
            Some(m) => format!("did you mean `{m}`?"),
            None if values.is_empty() => "check the spelling".to_string(),
            None => format!("expected one of: {}", values.join(", ")),
        };
        return (format!("unknown value `{word}`"), Some(fix));
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or("");
        return (
            format!("missing required key `{field}`"),
            Some(format!("add `{field}: ...`")),
        );
    }
    if msg.contains("did not match any variant of untagged enum OneOrMany") {
        return (
            "expected a string or a list of strings".into(),
            Some("write `key: value` or `key: [a, b]`".into()),
        );
    }
    // config's messages end in "for key `imap.port`", a path relative to some parent: drop it.
    let msg = match msg.find(" for key `") {
        Some(i) => &msg[..i],
        None => msg,
    };
    if msg.contains("expected an integer") || msg.contains("expected u16") {
        return (
            msg.to_string(),
            Some("write a whole number without quotes".into()),
        );
    }
    let cleaned = msg
        .replace("u16", "a port number (0-65535)")
        .replace("u32", "a whole number")
        .replace("usize", "a whole number");
    (cleaned, None)
}

/// The values a config enum accepts, read from the derived JSON Schema (`oneOf` of `const`s).
fn enum_values(type_name: &str) -> Vec<String> {
    let schema = super::json_schema();
    schema
        .get("$defs")
        .and_then(|d| d.get(type_name))
        .and_then(|e| e.get("oneOf"))
        .and_then(|o| o.as_array())
        .map(|variants| {
            variants
                .iter()
                .filter_map(|v| v.get("const").and_then(|c| c.as_str()).map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Decodes each top-level section on its own, and each list element on its own.
pub(crate) fn deserialize_sections(
    top: config::Map<String, config::Value>,
    ctx: &mut Ctx,
) -> RawConfig {
    let mut raw = RawConfig::default();
    for (key, value) in top {
        match key.as_str() {
            "timezone" => raw.timezone = decode(value, "timezone", ctx),
            "storage" => raw.storage = decode(value, "storage", ctx),
            "server" => raw.server = decode(value, "server", ctx),
            "sla" => raw.sla = decode(value, "sla", ctx),
            "alerts" => raw.alerts = decode(value, "alerts", ctx),
            "team" => raw.team = decode_list(value, "team", ctx),
            "sources" => raw.sources = decode_list(value, "sources", ctx),
            "clients" => raw.clients = decode_list(value, "clients", ctx),
            "responsibilities" => {
                raw.responsibilities = decode_list(value, "responsibilities", ctx)
            }
            "channels" => raw.channels = decode_list(value, "channels", ctx),
            "digests" => raw.digests = decode_list(value, "digests", ctx),
            other => {
                let fix = match suggest(other, TOP_LEVEL_KEYS.iter().copied()) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => format!("top-level keys are: {}", TOP_LEVEL_KEYS.join(", ")),
                };
                ctx.problem(other, format!("unknown key `{other}`"), Some(fix));
            }
        }
    }
    raw
}

fn decode_list<T: DeserializeOwned>(value: config::Value, base: &str, ctx: &mut Ctx) -> Vec<T> {
    let items = match value.clone().into_array() {
        Ok(items) => items,
        Err(_) => {
            // An empty YAML value (`sources:` with nothing under it) is an empty list.
            if value
                .clone()
                .into_string()
                .map(|s| s.is_empty())
                .unwrap_or(false)
            {
                return Vec::new();
            }
            if matches!(value.kind, config::ValueKind::Nil) {
                return Vec::new();
            }
            ctx.problem(
                base,
                "expected a list".into(),
                Some("start each item with `- `".into()),
            );
            return Vec::new();
        }
    };
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, v)| decode(v, &format!("{base}[{i}]"), ctx))
        .collect()
}
