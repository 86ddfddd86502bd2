//! The YAML configuration: `RawConfig` (serde, the file's exact shape) -> `Config` (validated, typed).
//!
//! Loading never stops at the first mistake: every problem is collected and reported as
//! `FILE:LINE: field.path: problem (fix)`. The `config` crate layers the file with
//! `FRONTDESK__SECTION__KEY` environment overrides; a YAML event parser supplies line numbers,
//! which the `config` crate's errors lack.

mod lines;
mod oauth2;
mod raw;
mod secret;
mod units;
mod unknown;

pub use oauth2::{LoginTarget, OAuth2, OAuth2Provider, token_file};
pub use raw::RawConfig;
pub use secret::Secret;
pub use units::{parse_duration, parse_size};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveDate;
use chrono_tz::Tz;

use raw::*;

/// The default config path when neither `--config` nor `$FRONTDESK_CONFIG` is given.
pub const DEFAULT_PATH: &str = "/etc/frontdesk/frontdesk.yaml";

/// The most channels a config may have: more places to check means something gets missed.
pub const MAX_CHANNELS: usize = 2;

/// One thing wrong with the configuration, located as precisely as possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line of the offending key, when it can be found.
    pub line: Option<usize>,
    /// Dotted field path, e.g. `sources[0].imap.port`.
    pub path: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.problem)?;
        } else {
            write!(f, ": {}: {}", self.path, self.problem)?;
        }
        if let Some(fix) = &self.fix {
            write!(f, " ({fix})")?;
        }
        Ok(())
    }
}

/// Every problem found in a configuration; loading failed.
#[derive(Debug, Clone)]
pub struct ConfigError {
    /// All problems, in file order where known.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "invalid configuration: {n} problem{}",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A loaded, valid configuration plus the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The validated configuration.
    pub config: Config,
    /// Things that work but deserve attention (inline secrets, `auth: none`).
    pub warnings: Vec<Problem>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was loaded from.
    pub file: PathBuf,
    /// The business's time zone: digests and the default calendar zone.
    pub timezone: Tz,
    /// Where the queue lives.
    pub storage: Storage,
    /// The HTTP server.
    pub server: Server,
    /// The people who answer.
    pub team: Vec<TeamMember>,
    /// Where messages come from.
    pub sources: Vec<Source>,
    /// Client naming and tagging rules.
    pub clients: Vec<ClientRule>,
    /// Ordered ownership rules; the first match names the owner.
    pub responsibilities: Vec<OwnerRule>,
    /// Calendars and policies.
    pub sla: Sla,
    /// One or two output channels.
    pub channels: Vec<Channel>,
    /// Scheduled digests.
    pub digests: Vec<DigestSchedule>,
    /// Alert routing.
    pub alerts: Alerts,
}

/// Where the durable queue lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// Embedded SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by replicas.
    Postgres(PgStorage),
}

/// How to reach the PostgreSQL database.
#[derive(Clone, PartialEq, Eq)]
pub struct PgStorage {
    /// `postgres://user@host:port/db?sslmode=...`; a password in it is allowed but better given
    /// through `password_file`, `password_env` or `password_credential`.
    pub url: String,
    /// The password from a secret source, when not in the URL.
    pub password: Option<Secret>,
}

impl fmt::Debug for PgStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStorage")
            .field("url", &crate::store::redact_url(&self.url))
            .field("password", &self.password)
            .finish()
    }
}

/// The HTTP listener settings.
#[derive(Debug, Clone)]
pub struct Server {
    /// Socket address for webhooks, `/healthz`, `/readyz`, `/metrics`.
    pub listen: SocketAddr,
    /// Default request body limit in bytes.
    pub max_body: u64,
    /// Time allowed for a client to send the request headers.
    pub header_timeout: Duration,
    /// Requests handled at once; more wait, then get 503.
    pub max_concurrency: usize,
    /// How long shutdown waits for in-flight work.
    pub drain_timeout: Duration,
    /// This replica's name where several share one PostgreSQL database (`server.replica`,
    /// default HOST-PID).
    pub replica: String,
}

/// A person on the team.
#[derive(Debug, Clone)]
pub struct TeamMember {
    /// Name used in rules and digests.
    pub name: String,
    /// Email addresses, lowercased.
    pub email: Vec<String>,
    /// Phone numbers as written.
    pub phone: Vec<String>,
    /// Chat handles by provider (`slack: U024BE7LH`).
    pub handles: BTreeMap<String, String>,
}

/// One configured source.
#[derive(Debug, Clone)]
pub struct Source {
    /// Unique source name (used in `/hooks/{name}` and the store).
    pub name: String,
    /// What kind of source it is.
    pub kind: SourceKind,
}

/// The kinds of source.
#[derive(Debug, Clone)]
pub enum SourceKind {
    /// An IMAP account.
    Imap(ImapSource),
    /// An HTTP webhook endpoint.
    Webhook(WebhookSource),
}

/// TLS mode for IMAP and SMTP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS from the first byte.
    Implicit,
    /// Plain connection upgraded with STARTTLS.
    Starttls,
    /// No TLS: only allowed to loopback hosts.
    None,
}

/// What a watched IMAP folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderRole {
    /// Client mail.
    Inbound,
    /// The team's sent replies.
    Sent,
}

/// A watched IMAP folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    /// Folder name as the server spells it.
    pub name: String,
    /// What it holds.
    pub role: FolderRole,
}

/// Where a source's cursor starts on its first run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backfill {
    /// Everything in the folder.
    All,
    /// Only mail arriving from now on.
    None,
    /// Mail whose INTERNALDATE is within this long before the first run.
    Within(Duration),
}

/// An IMAP account.
#[derive(Debug, Clone, PartialEq)]
pub struct ImapSource {
    /// Server host name.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// TLS mode.
    pub tls: TlsMode,
    /// Extra CA bundle (PEM) instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Login name.
    pub username: String,
    /// Password or OAuth2.
    pub login: Login,
    /// Watched folders.
    pub folders: Vec<Folder>,
    /// Use IDLE when the server offers it.
    pub idle: bool,
    /// Poll interval when not idling.
    pub poll_interval: Duration,
    /// First-run cursor position.
    pub backfill: Backfill,
    /// Timeout for connect, TLS and every read and write.
    pub timeout: Duration,
    /// Messages fetched (and committed) per batch.
    pub batch_size: u32,
    /// Messages larger than this (announced size or literal) are quarantined without their body.
    pub max_message_size: u64,
}

/// How an IMAP source or SMTP channel proves who it is.
#[derive(Debug, Clone, PartialEq)]
pub enum Login {
    /// A password (LOGIN / AUTH PLAIN).
    Password(Secret),
    /// An OAuth2 access token (SASL XOAUTH2 or OAUTHBEARER), renewed with a stored refresh token.
    OAuth2(Box<OAuth2>),
}

impl Login {
    /// The OAuth2 settings, when this login uses OAuth2.
    pub fn oauth2(&self) -> Option<&OAuth2> {
        match self {
            Login::OAuth2(o) => Some(o),
            Login::Password(_) => None,
        }
    }
}

/// Webhook payload presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// A contact form (JSON or urlencoded).
    Form,
    /// Any JSON with a pointer mapping.
    Json,
    /// A Standard Webhooks JSON event.
    StandardWebhooks,
    /// A GitHub webhook.
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

/// Webhook authentication schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthScheme {
    /// standardwebhooks.com signatures.
    StandardWebhooks,
    /// X-Hub-Signature-256.
    Github,
    /// Slack v0 signatures.
    Slack,
    /// X-Twilio-Signature.
    Twilio,
    /// Stripe-Signature.
    Stripe,
    /// Mailgun timestamp + token signature.
    Mailgun,
    /// Generic HMAC-SHA256 in a header.
    HmacSha256,
    /// `Authorization: Bearer`.
    Bearer,
    /// `Authorization: Basic`.
    Basic,
    /// No authentication (explicit only; `check` warns).
    None,
}

/// Signature encoding for the generic HMAC scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureEncoding {
    /// Lowercase or uppercase hex.
    Hex,
    /// Standard base64.
    Base64,
}

/// How a webhook source authenticates its caller.
#[derive(Debug, Clone)]
pub struct WebhookAuth {
    /// The scheme.
    pub scheme: AuthScheme,
    /// Accepted secrets (several during rotation).
    pub secrets: Vec<Secret>,
    /// Allowed clock skew for timestamped schemes.
    pub tolerance: Duration,
    /// Header carrying the signature (generic HMAC).
    pub header: Option<String>,
    /// Prefix before the signature (generic HMAC), e.g. `sha256=`.
    pub prefix: Option<String>,
    /// Signature encoding (generic HMAC).
    pub encoding: SignatureEncoding,
    /// User name for basic auth.
    pub username: Option<String>,
}

/// Direction mapping for the `json` preset.
#[derive(Debug, Clone)]
pub struct DirectionMapping {
    /// JSON pointer to the author type.
    pub pointer: String,
    /// Values that mean the team wrote it.
    pub outbound: Vec<String>,
}

/// JSON pointer mapping for the `json` preset.
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    /// Delivery id (dedupe key).
    pub id: Option<String>,
    /// Sender address.
    pub from: Option<String>,
    /// Sender display name.
    pub name: Option<String>,
    /// Subject.
    pub subject: Option<String>,
    /// Text body.
    pub text: Option<String>,
    /// Thread key.
    pub thread: Option<String>,
    /// Direction.
    pub direction: Option<DirectionMapping>,
    /// Provider timestamp.
    pub occurred_at: Option<String>,
}

/// An HTTP webhook endpoint at `/hooks/{name}`.
#[derive(Debug, Clone)]
pub struct WebhookSource {
    /// Payload preset.
    pub preset: Preset,
    /// Caller authentication.
    pub auth: WebhookAuth,
    /// The public URL the provider calls (Twilio signs it).
    pub public_url: Option<String>,
    /// Body limit for this route in bytes.
    pub max_body: u64,
    /// JSON pointer mapping (`json` preset).
    pub mapping: Option<Mapping>,
}

/// A client naming/tagging rule.
#[derive(Debug, Clone, Default)]
pub struct ClientRule {
    /// Client name.
    pub name: Option<String>,
    /// Exact email addresses, lowercased.
    pub email: Vec<String>,
    /// Email domains, lowercased.
    pub email_domain: Vec<String>,
    /// Phone numbers as written.
    pub phone: Vec<String>,
    /// Chat handles.
    pub handle: Vec<String>,
    /// Source names.
    pub source: Vec<String>,
    /// Tags given to matching clients.
    pub tags: Vec<String>,
}

/// What an ownership or policy rule matches on; empty fields match anything.
#[derive(Debug, Clone, Default)]
pub struct RuleMatch {
    /// Client names.
    pub client: Vec<String>,
    /// Client tags.
    pub client_tag: Vec<String>,
    /// Client email addresses.
    pub email: Vec<String>,
    /// Client email domains.
    pub email_domain: Vec<String>,
    /// Source names.
    pub source: Vec<String>,
    /// Keywords in subject or text (case-insensitive).
    pub keyword: Vec<String>,
}

/// An ownership rule.
#[derive(Debug, Clone)]
pub struct OwnerRule {
    /// Conditions; `None` is the default rule.
    pub matches: Option<RuleMatch>,
    /// Team member name.
    pub owner: String,
}

/// How `warn_before` is expressed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WarnBefore {
    /// A fixed time before the due time.
    Duration(Duration),
    /// A share of the target (0-100).
    Percent(f64),
}

/// A business calendar as configured (the SLA module turns it into `sla::Calendar`).
#[derive(Debug, Clone)]
pub struct CalendarConfig {
    /// Calendar time zone.
    pub timezone: Tz,
    /// Open intervals by day spec (`mon-fri` -> `["09:00-13:00"]`).
    pub hours: BTreeMap<String, Vec<String>>,
    /// Closed dates.
    pub holidays: BTreeSet<NaiveDate>,
    /// Optional iCalendar file of all-day closed days.
    pub holidays_file: Option<PathBuf>,
}

/// An SLA policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Policy name.
    pub name: String,
    /// Conditions; `None` is the default policy.
    pub matches: Option<RuleMatch>,
    /// First-reply target.
    pub first_reply: Duration,
    /// Next-reply target.
    pub next_reply: Duration,
    /// Calendar name, or `always` for 24/7.
    pub calendar: String,
    /// When to warn.
    pub warn_before: WarnBefore,
}

/// SLA calendars and policies.
#[derive(Debug, Clone, Default)]
pub struct Sla {
    /// Named calendars.
    pub calendars: BTreeMap<String, CalendarConfig>,
    /// Ordered policies; the first match wins.
    pub policies: Vec<Policy>,
}

/// An output channel.
#[derive(Debug, Clone)]
pub struct Channel {
    /// Channel name referenced by digests and alerts.
    pub name: String,
    /// What kind of channel.
    pub kind: ChannelKind,
}

/// The kinds of channel.
#[derive(Debug, Clone)]
pub enum ChannelKind {
    /// Email via SMTP or `.eml` files.
    Email(EmailChannel),
    /// A chat or JSON webhook.
    Webhook(WebhookChannel),
}

/// How email leaves.
#[derive(Debug, Clone)]
pub enum EmailTransport {
    /// An SMTP relay.
    Smtp(SmtpSettings),
    /// `.eml` files written into a directory.
    File(PathBuf),
}

/// SMTP relay settings.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// Relay host.
    pub host: String,
    /// Relay port.
    pub port: u16,
    /// TLS mode.
    pub tls: TlsMode,
    /// Extra CA bundle (PEM).
    pub ca_file: Option<PathBuf>,
    /// Login name, if the relay needs one.
    pub username: Option<String>,
    /// Password or OAuth2, if the relay needs a login.
    pub login: Option<Login>,
    /// Overall timeout for one send.
    pub timeout: Duration,
}

/// An email channel.
#[derive(Debug, Clone)]
pub struct EmailChannel {
    /// Transport.
    pub transport: EmailTransport,
    /// From header.
    pub from: String,
    /// Recipients of all-team digests and alerts.
    pub to: Vec<String>,
    /// Optional Reply-To.
    pub reply_to: Option<String>,
}

/// Webhook channel flavours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookChannelKind {
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
#[derive(Debug, Clone)]
pub struct WebhookChannel {
    /// Flavour.
    pub kind: WebhookChannelKind,
    /// Target URL (a secret: it often embeds a token).
    pub url: Secret,
    /// Standard Webhooks signing secret (`json` only).
    pub secret: Option<Secret>,
    /// Overall timeout for one send.
    pub timeout: Duration,
}

/// A scheduled digest.
#[derive(Debug, Clone)]
pub struct DigestSchedule {
    /// Digest name.
    pub name: String,
    /// Cron expression in the top-level time zone.
    pub schedule: String,
    /// Channel name.
    pub channel: String,
    /// One digest per owner at their team email.
    pub per_owner: bool,
}

/// Alert kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AlertKind {
    /// A target entered its warning window.
    SlaWarning,
    /// A target passed its due time.
    SlaBreach,
    /// A source became unhealthy (or healthy again).
    SourceUnhealthy,
}

/// Alert routing.
#[derive(Debug, Clone)]
pub struct Alerts {
    /// Channel name.
    pub channel: String,
    /// Which events alert.
    pub on: BTreeSet<AlertKind>,
    /// Events within this window go out as one message.
    pub group_wait: Duration,
    /// Defer alerts outside this calendar into the next digest.
    pub quiet_calendar: Option<String>,
}

/// Resolves the config path: `--config`, else `$FRONTDESK_CONFIG`, else the default.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("FRONTDESK_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

/// Reads, layers (file + `FRONTDESK__` environment), parses and validates a configuration.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let file = path.to_path_buf();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return Err(ConfigError {
                problems: vec![Problem {
                    file,
                    line: None,
                    path: String::new(),
                    problem: format!("cannot read the config file: {e}"),
                    fix: Some(format!(
                        "pass --config PATH or set FRONTDESK_CONFIG; the default is {DEFAULT_PATH}"
                    )),
                }],
            });
        }
    };
    load_str(&file, &text)
}

/// Parses and validates configuration text as if read from `file`.
pub fn load_str(file: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let mut ctx = Ctx {
        file: file.to_path_buf(),
        lines: lines::LineMap::default(),
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    match lines::LineMap::build(text) {
        Ok(map) => ctx.lines = map,
        Err((line, msg)) => {
            ctx.problems.push(Problem {
                file: ctx.file.clone(),
                line: Some(line),
                path: String::new(),
                problem: format!("not valid YAML: {msg}"),
                fix: Some("check indentation and quoting around this line".into()),
            });
            return Err(ConfigError {
                problems: ctx.problems,
            });
        }
    }
    let layered = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Yaml))
        .add_source(
            config::Environment::with_prefix("FRONTDESK")
                .prefix_separator("__")
                .separator("__"),
        )
        .build()
        .and_then(|c| c.try_deserialize::<config::Map<String, config::Value>>());
    let top = match layered {
        Ok(t) => t,
        Err(e) => {
            ctx.problem("", format!("cannot load: {e}"), None);
            return Err(ConfigError {
                problems: ctx.problems,
            });
        }
    };
    let schema = json_schema();
    let mut top = top;
    for (key, value) in top.iter_mut() {
        if let Some(section) = schema.get("properties").and_then(|p| p.get(key)) {
            unknown::strip_unknown(value, section, &schema, key, &mut ctx);
        }
    }
    let raw = raw::deserialize_sections(top, &mut ctx);
    let config = validate(raw, &mut ctx);
    ctx.problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    if ctx.problems.is_empty() {
        Ok(Loaded {
            config,
            warnings: ctx.warnings,
        })
    } else {
        Err(ConfigError {
            problems: ctx.problems,
        })
    }
}

/// The JSON Schema of the configuration file, derived from `RawConfig`.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(RawConfig)).unwrap_or(serde_json::Value::Null)
}

/// Collects problems while loading.
pub(crate) struct Ctx {
    file: PathBuf,
    lines: lines::LineMap,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Ctx {
    fn locate(&self, path: &str, problem: String, fix: Option<String>) -> Problem {
        Problem {
            file: self.file.clone(),
            line: self.lines.line_of(path),
            path: path.to_string(),
            problem,
            fix,
        }
    }

    /// Records a problem at `path`.
    pub(crate) fn problem(&mut self, path: &str, problem: String, fix: Option<String>) {
        let p = self.locate(path, problem, fix);
        self.problems.push(p);
    }

    /// Records a warning at `path`.
    pub(crate) fn warn(&mut self, path: &str, problem: String, fix: Option<String>) {
        let p = self.locate(path, problem, fix);
        self.warnings.push(p);
    }
}

fn default_sqlite_path() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several colon-separated directories; the first is ours.
        Some(dirs) if !dirs.is_empty() => {
            let first = dirs
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            PathBuf::from(first).join("frontdesk.db")
        }
        _ => PathBuf::from("/var/lib/frontdesk/frontdesk.db"),
    }
}

fn validate_storage(s: raw::RawStorage, ctx: &mut Ctx) -> Storage {
    let secret_fields = secret::SecretFields {
        inline: None,
        file: s.password_file,
        env: s.password_env,
        credential: s.password_credential,
    };
    if let Some(url) = s.postgres {
        if s.sqlite.is_some() {
            ctx.problem(
                "storage",
                "both sqlite and postgres are set".into(),
                Some("keep one: sqlite for one machine, postgres for several replicas".into()),
            );
        }
        let parsed = url.parse::<sqlx::postgres::PgConnectOptions>();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) || parsed.is_err()
        {
            ctx.problem(
                "storage.postgres",
                "not a PostgreSQL URL".into(),
                Some(
                    "write postgres://USER@HOST:PORT/DATABASE (add ?sslmode=verify-full for TLS)"
                        .into(),
                ),
            );
        }
        let password = if secret_fields.any() {
            secret::resolve(&secret_fields, "storage.password", ctx)
        } else {
            None
        };
        return Storage::Postgres(PgStorage { url, password });
    }
    if secret_fields.any() {
        ctx.problem(
            "storage",
            "a password is set but storage is not postgres".into(),
            Some("remove password_file/password_env/password_credential".into()),
        );
    }
    match s.sqlite {
        Some(p) if p.as_os_str().is_empty() => {
            ctx.problem(
                "storage.sqlite",
                "empty path".into(),
                Some("give a database file path".into()),
            );
            Storage::Sqlite(default_sqlite_path())
        }
        Some(p) => Storage::Sqlite(p),
        None => Storage::Sqlite(default_sqlite_path()),
    }
}

fn validate(raw: RawConfig, ctx: &mut Ctx) -> Config {
    let timezone = match raw.timezone.as_deref() {
        None => Tz::UTC,
        Some(name) => parse_tz(name, "timezone", ctx),
    };

    let storage = match raw.storage {
        None => Storage::Sqlite(default_sqlite_path()),
        Some(s) => validate_storage(s, ctx),
    };

    let server = validate_server(raw.server.unwrap_or_default(), ctx);
    let team = validate_team(raw.team, ctx);
    let team_names: BTreeSet<String> = team.iter().map(|m| m.name.clone()).collect();
    // With PostgreSQL, files the daemon keeps (OAuth tokens, mail-file channels) stay in the
    // state directory the SQLite file would have used.
    let sqlite_path = match &storage {
        Storage::Sqlite(db) => db.clone(),
        Storage::Postgres(_) => default_sqlite_path(),
    };
    let state_dir = match sqlite_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let sources = validate_sources(raw.sources, server.max_body, &state_dir, ctx);
    let source_names: BTreeSet<String> = sources.iter().map(|s| s.name.clone()).collect();
    let clients: Vec<ClientRule> = raw
        .clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| validate_client(c, &format!("clients[{i}]"), &source_names, ctx))
        .collect();
    let responsibilities =
        validate_responsibilities(raw.responsibilities, &team_names, &source_names, ctx);
    let sla = validate_sla(raw.sla.unwrap_or_default(), timezone, &source_names, ctx);
    let channels = validate_channels(raw.channels, &state_dir, ctx);
    let channel_names: BTreeSet<String> = channels.iter().map(|c| c.name.clone()).collect();
    let digests = validate_digests(raw.digests, &channel_names, &team, ctx);
    let alerts = validate_alerts(raw.alerts, &channels, &sla, ctx);
    report_unrouted(&sources, &clients, &responsibilities, &sla, ctx);

    Config {
        file: ctx.file.clone(),
        timezone,
        storage,
        server,
        team,
        sources,
        clients,
        responsibilities,
        sla,
        channels,
        digests,
        alerts,
    }
}

fn parse_tz(name: &str, path: &str, ctx: &mut Ctx) -> Tz {
    match name.parse::<Tz>() {
        Ok(tz) => tz,
        Err(_) => {
            ctx.problem(
                path,
                format!("unknown time zone `{name}`"),
                Some("use an IANA name such as Europe/Athens or America/New_York".into()),
            );
            Tz::UTC
        }
    }
}

fn duration_field(value: Option<&str>, default: Duration, path: &str, ctx: &mut Ctx) -> Duration {
    match value {
        None => default,
        Some(s) => match parse_duration(s) {
            Ok(d) => d,
            Err(e) => {
                ctx.problem(path, e, Some("write it like 90s, 30m, 4h or 2d".into()));
                default
            }
        },
    }
}

fn size_field(value: Option<&str>, default: u64, path: &str, ctx: &mut Ctx) -> u64 {
    match value {
        None => default,
        Some(s) => match parse_size(s) {
            Ok(n) => n,
            Err(e) => {
                ctx.problem(path, e, Some("write it like 512KiB or 1MiB".into()));
                default
            }
        },
    }
}

fn validate_server(raw: RawServer, ctx: &mut Ctx) -> Server {
    let listen = match raw.listen.as_deref() {
        None => SocketAddr::from(([127, 0, 0, 1], 8025)),
        Some(s) => match s.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                ctx.problem(
                    "server.listen",
                    format!("`{s}` is not a socket address"),
                    Some("write IP:PORT, e.g. 127.0.0.1:8025 or [::1]:8025".into()),
                );
                SocketAddr::from(([127, 0, 0, 1], 8025))
            }
        },
    };
    let max_concurrency = raw.max_concurrency.unwrap_or(512);
    if max_concurrency == 0 {
        ctx.problem("server.max_concurrency", "must be at least 1".into(), None);
    }
    Server {
        listen,
        max_body: size_field(raw.max_body.as_deref(), 1 << 20, "server.max_body", ctx),
        header_timeout: duration_field(
            raw.header_timeout.as_deref(),
            Duration::from_secs(10),
            "server.header_timeout",
            ctx,
        ),
        max_concurrency: max_concurrency.max(1),
        drain_timeout: duration_field(
            raw.drain_timeout.as_deref(),
            Duration::from_secs(20),
            "server.drain_timeout",
            ctx,
        ),
        replica: replica_name(raw.replica, ctx),
    }
}

/// `server.replica`: printable and short, since it appears in tables, logs and metric labels.
fn replica_name(raw: Option<String>, ctx: &mut Ctx) -> String {
    let Some(name) = raw else {
        return crate::store::lease::default_replica_name();
    };
    let fine = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    if !fine {
        ctx.problem(
            "server.replica",
            format!("`{name}` is not a usable replica name"),
            Some("use 1 to 64 letters, digits, `-`, `_`, `.` or `:`, e.g. the host name".into()),
        );
        return crate::store::lease::default_replica_name();
    }
    name
}

fn check_name(name: &str, path: &str, ctx: &mut Ctx) {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        ctx.problem(
            path,
            format!("`{name}` is not a valid name"),
            Some("use letters, digits, `-`, `_` or `.`".into()),
        );
    }
}

fn validate_team(raw: Vec<RawTeamMember>, ctx: &mut Ctx) -> Vec<TeamMember> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, m) in raw.into_iter().enumerate() {
        let path = format!("team[{i}]");
        if m.name.trim().is_empty() {
            ctx.problem(&format!("{path}.name"), "empty name".into(), None);
        }
        if !seen.insert(m.name.clone()) {
            ctx.problem(
                &format!("{path}.name"),
                format!("team member `{}` appears twice", m.name),
                Some("give each person one entry with all their addresses".into()),
            );
        }
        let email: Vec<String> = m
            .email
            .into_vec()
            .into_iter()
            .map(|e| e.trim().to_lowercase())
            .collect();
        for (j, e) in email.iter().enumerate() {
            if !looks_like_email(e) {
                ctx.problem(
                    &format!("{path}.email[{j}]"),
                    format!("`{e}` is not an email address"),
                    None,
                );
            }
        }
        out.push(TeamMember {
            name: m.name,
            email,
            phone: m.phone.into_vec(),
            handles: m.handles,
        });
    }
    out
}

/// A deliberately loose check: one `@`, something on both sides, a dot in the domain or `localhost`.
pub fn looks_like_email(s: &str) -> bool {
    let addr = match (s.rfind('<'), s.rfind('>')) {
        (Some(a), Some(b)) if a < b => &s[a + 1..b],
        _ => s,
    };
    let mut parts = addr.trim().splitn(2, '@');
    match (parts.next(), parts.next()) {
        (Some(local), Some(domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !addr.chars().any(|c| c.is_whitespace() || c.is_control())
                && (domain.contains('.') || domain == "localhost")
        }
        _ => false,
    }
}

fn tls_mode(raw: Option<RawTls>) -> TlsMode {
    match raw.unwrap_or(RawTls::Implicit) {
        RawTls::Implicit => TlsMode::Implicit,
        RawTls::Starttls => TlsMode::Starttls,
        RawTls::None => TlsMode::None,
    }
}

/// True for `localhost` and loopback IP literals: the only hosts allowed without TLS.
pub fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

fn validate_sources(
    raw: Vec<RawSource>,
    default_body: u64,
    state_dir: &Path,
    ctx: &mut Ctx,
) -> Vec<Source> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, s) in raw.into_iter().enumerate() {
        let path = format!("sources[{i}]");
        check_name(&s.name, &format!("{path}.name"), ctx);
        if !seen.insert(s.name.clone()) {
            ctx.problem(
                &format!("{path}.name"),
                format!("source `{}` is defined twice", s.name),
                Some("source names must be unique".into()),
            );
        }
        let kind = match (s.imap, s.webhook) {
            (Some(imap), None) => {
                validate_imap(imap, &s.name, state_dir, &format!("{path}.imap"), ctx)
                    .map(SourceKind::Imap)
            }
            (None, Some(hook)) => {
                validate_webhook(hook, &format!("{path}.webhook"), default_body, ctx)
                    .map(SourceKind::Webhook)
            }
            (Some(_), Some(_)) => {
                ctx.problem(
                    &path,
                    format!("source `{}` has both `imap` and `webhook`", s.name),
                    Some("split it into two sources with different names".into()),
                );
                None
            }
            (None, None) => {
                ctx.problem(
                    &path,
                    format!("source `{}` has neither `imap` nor `webhook`", s.name),
                    Some("add an `imap: {...}` or a `webhook: {...}` block".into()),
                );
                None
            }
        };
        if let Some(kind) = kind {
            out.push(Source { name: s.name, kind });
        }
    }
    out
}

fn validate_imap(
    raw: RawImap,
    name: &str,
    state_dir: &Path,
    path: &str,
    ctx: &mut Ctx,
) -> Option<ImapSource> {
    let oauth = raw.auth.and_then(|a| a.oauth2);
    let preset = oauth
        .as_ref()
        .and_then(|o| oauth2::preset_server(o.provider, oauth2::Service::Imap));
    let tls = match (raw.tls, preset) {
        (None, Some((_, tls))) => tls,
        (t, _) => tls_mode(t),
    };
    let host = match (raw.host, preset) {
        (Some(h), _) => h,
        (None, Some((h, _))) => h.to_string(),
        (None, None) => {
            ctx.problem(
                &format!("{path}.host"),
                "no host given".into(),
                Some("set host, or use auth.oauth2.provider google or microsoft".into()),
            );
            String::new()
        }
    };
    if tls == TlsMode::None && !is_loopback_host(&host) {
        ctx.problem(
            &format!("{path}.tls"),
            format!("`tls: none` would send the password in clear text to {host}"),
            Some(
                "use `implicit` (port 993) or `starttls` (port 143); `none` is only for loopback"
                    .into(),
            ),
        );
    }
    let port = raw.port.unwrap_or(match tls {
        TlsMode::Implicit => 993,
        _ => 143,
    });
    let fields = secret::SecretFields {
        inline: raw.password,
        file: raw.password_file,
        env: raw.password_env,
        credential: raw.password_credential,
    };
    let login = match oauth {
        Some(_) if fields.any() => {
            ctx.problem(
                &format!("{path}.auth"),
                "both a password and auth.oauth2 are set".into(),
                Some("keep one: OAuth2 for Google and Microsoft 365, a password elsewhere".into()),
            );
            None
        }
        Some(o) => oauth2::validate(
            o,
            oauth2::Service::Imap,
            LoginTarget::Source(name.to_string()),
            &raw.username,
            state_dir,
            &format!("{path}.auth.oauth2"),
            ctx,
        )
        .map(|o| Login::OAuth2(Box::new(o))),
        None => secret::resolve(&fields, &format!("{path}.password"), ctx).map(Login::Password),
    };
    let mut folders = Vec::new();
    let mut seen = BTreeSet::new();
    for (j, f) in raw
        .folders
        .unwrap_or_else(|| vec![RawFolder::Name("INBOX".into())])
        .into_iter()
        .enumerate()
    {
        let (name, role) = match f {
            RawFolder::Name(n) => (n, FolderRole::Inbound),
            RawFolder::Full { name, role } => (
                name,
                match role.unwrap_or(RawFolderRole::Inbound) {
                    RawFolderRole::Inbound => FolderRole::Inbound,
                    RawFolderRole::Sent => FolderRole::Sent,
                },
            ),
        };
        if name.is_empty() {
            ctx.problem(
                &format!("{path}.folders[{j}].name"),
                "empty folder name".into(),
                None,
            );
        }
        if !seen.insert(name.clone()) {
            ctx.problem(
                &format!("{path}.folders[{j}].name"),
                format!("folder `{name}` is listed twice"),
                None,
            );
        }
        folders.push(Folder { name, role });
    }
    let backfill = match raw.backfill.as_deref() {
        None => Backfill::Within(Duration::from_secs(30 * 86400)),
        Some("all") => Backfill::All,
        Some("none") => Backfill::None,
        Some(s) => match parse_duration(s) {
            Ok(d) => Backfill::Within(d),
            Err(e) => {
                ctx.problem(
                    &format!("{path}.backfill"),
                    e,
                    Some("use `all`, `none` or a duration such as 30d".into()),
                );
                Backfill::None
            }
        },
    };
    let batch_size = raw.batch_size.unwrap_or(200);
    if batch_size == 0 {
        ctx.problem(
            &format!("{path}.batch_size"),
            "must be at least 1".into(),
            None,
        );
    }
    if host.trim().is_empty() {
        ctx.problem(&format!("{path}.host"), "empty host".into(), None);
    }
    let max_message_size = match raw.max_message_size.as_deref().map(parse_size) {
        None => 32 << 20,
        Some(Ok(n)) if n > 0 => n,
        Some(Ok(_)) => {
            ctx.problem(
                &format!("{path}.max_message_size"),
                "must be more than 0".into(),
                None,
            );
            32 << 20
        }
        Some(Err(e)) => {
            ctx.problem(
                &format!("{path}.max_message_size"),
                e,
                Some("use a size such as 32MiB".into()),
            );
            32 << 20
        }
    };
    let poll_interval = duration_field(
        raw.poll_interval.as_deref(),
        Duration::from_secs(60),
        &format!("{path}.poll_interval"),
        ctx,
    );
    let timeout = duration_field(
        raw.timeout.as_deref(),
        Duration::from_secs(30),
        &format!("{path}.timeout"),
        ctx,
    );
    Some(ImapSource {
        host,
        port,
        tls,
        ca_file: raw.ca_file,
        username: raw.username,
        login: login?,
        folders,
        idle: raw.idle.unwrap_or(true),
        poll_interval,
        backfill,
        timeout,
        batch_size: batch_size.max(1),
        max_message_size,
    })
}

fn validate_webhook(
    raw: RawWebhook,
    path: &str,
    default_body: u64,
    ctx: &mut Ctx,
) -> Option<WebhookSource> {
    let preset = match raw.preset {
        RawPreset::Form => Preset::Form,
        RawPreset::Json => Preset::Json,
        RawPreset::StandardWebhooks => Preset::StandardWebhooks,
        RawPreset::Github => Preset::Github,
        RawPreset::SlackEvents => Preset::SlackEvents,
        RawPreset::TwilioSms => Preset::TwilioSms,
        RawPreset::Stripe => Preset::Stripe,
        RawPreset::PostmarkInbound => Preset::PostmarkInbound,
        RawPreset::MailgunInbound => Preset::MailgunInbound,
    };
    let a = raw.auth;
    let apath = format!("{path}.auth");
    let scheme = match a.scheme {
        RawAuthScheme::StandardWebhooks => AuthScheme::StandardWebhooks,
        RawAuthScheme::Github => AuthScheme::Github,
        RawAuthScheme::Slack => AuthScheme::Slack,
        RawAuthScheme::Twilio => AuthScheme::Twilio,
        RawAuthScheme::Stripe => AuthScheme::Stripe,
        RawAuthScheme::Mailgun => AuthScheme::Mailgun,
        RawAuthScheme::HmacSha256 => AuthScheme::HmacSha256,
        RawAuthScheme::Bearer => AuthScheme::Bearer,
        RawAuthScheme::Basic => AuthScheme::Basic,
        RawAuthScheme::None => AuthScheme::None,
    };
    let mut secrets = Vec::new();
    let single = secret::SecretFields {
        inline: a.secret,
        file: a.secret_file,
        env: a.secret_env,
        credential: a.secret_credential,
    };
    let any_secret_named = single.any()
        || !a.secrets.is_empty()
        || !a.secrets_file.is_empty()
        || !a.secrets_env.is_empty()
        || !a.secrets_credential.is_empty();
    if single.any()
        && let Some(s) = secret::resolve(&single, &format!("{apath}.secret"), ctx)
    {
        secrets.push(s);
    }
    for (j, s) in a.secrets.into_iter().enumerate() {
        ctx.warn(
            &format!("{apath}.secrets[{j}]"),
            "secret written inline in the config file".into(),
            Some("move it to a file (secrets_file) or a systemd credential".into()),
        );
        secrets.push(Secret::new(s));
    }
    for (j, f) in a.secrets_file.into_iter().enumerate() {
        let fields = secret::SecretFields {
            file: Some(f),
            ..Default::default()
        };
        if let Some(s) = secret::resolve(&fields, &format!("{apath}.secrets_file[{j}]"), ctx) {
            secrets.push(s);
        }
    }
    for (j, e) in a.secrets_env.into_iter().enumerate() {
        let fields = secret::SecretFields {
            env: Some(e),
            ..Default::default()
        };
        if let Some(s) = secret::resolve(&fields, &format!("{apath}.secrets_env[{j}]"), ctx) {
            secrets.push(s);
        }
    }
    for (j, c) in a.secrets_credential.into_iter().enumerate() {
        let fields = secret::SecretFields {
            credential: Some(c),
            ..Default::default()
        };
        if let Some(s) = secret::resolve(&fields, &format!("{apath}.secrets_credential[{j}]"), ctx)
        {
            secrets.push(s);
        }
    }
    if scheme == AuthScheme::None {
        ctx.warn(
            &format!("{apath}.scheme"),
            "this webhook accepts unauthenticated requests: anyone who finds the URL can add messages".into(),
            Some("use a signature scheme, or bearer with a long random token".into()),
        );
    } else if !any_secret_named {
        ctx.problem(
            &apath,
            format!("scheme `{}` needs a secret", a.scheme.as_str()),
            Some("add secret_file, secret_env or secret_credential".into()),
        );
    }
    if scheme == AuthScheme::HmacSha256 && a.header.as_deref().unwrap_or("").is_empty() {
        ctx.problem(
            &format!("{apath}.header"),
            "the hmac-sha256 scheme needs the name of the header that carries the signature".into(),
            Some("e.g. `header: X-Signature`".into()),
        );
    }
    if scheme == AuthScheme::Basic && a.username.is_none() {
        ctx.problem(
            &format!("{apath}.username"),
            "basic auth needs a username".into(),
            None,
        );
    }
    if (scheme == AuthScheme::Twilio || preset == Preset::TwilioSms) && raw.public_url.is_none() {
        ctx.problem(
            &format!("{path}.public_url"),
            "Twilio signs the public URL it calls, so it must be configured".into(),
            Some("set public_url to the exact URL configured in the Twilio console".into()),
        );
    }
    if preset == Preset::Json && raw.mapping.is_none() {
        ctx.problem(
            &format!("{path}.mapping"),
            "the json preset needs a mapping of JSON pointers".into(),
            Some("add `mapping: {from: /sender/email, text: /body}` at least".into()),
        );
    }
    let mapping = raw.mapping.map(|m| {
        for (field, value) in [
            ("id", &m.id),
            ("from", &m.from),
            ("name", &m.name),
            ("subject", &m.subject),
            ("text", &m.text),
            ("thread", &m.thread),
            ("occurred_at", &m.occurred_at),
        ] {
            if let Some(p) = value
                && !(p.is_empty() || p.starts_with('/'))
            {
                ctx.problem(
                    &format!("{path}.mapping.{field}"),
                    format!("`{p}` is not a JSON pointer"),
                    Some(format!("JSON pointers start with `/`, e.g. `/{p}`")),
                );
            }
        }
        Mapping {
            id: m.id,
            from: m.from,
            name: m.name,
            subject: m.subject,
            text: m.text,
            thread: m.thread,
            direction: m.direction.map(|d| DirectionMapping {
                pointer: d.pointer,
                outbound: d.outbound,
            }),
            occurred_at: m.occurred_at,
        }
    });
    let inbound_email = matches!(preset, Preset::PostmarkInbound | Preset::MailgunInbound);
    let body_default = if inbound_email {
        default_body.max(25 << 20)
    } else {
        default_body
    };
    Some(WebhookSource {
        preset,
        auth: WebhookAuth {
            scheme,
            secrets,
            tolerance: duration_field(
                a.tolerance.as_deref(),
                Duration::from_secs(300),
                &format!("{apath}.tolerance"),
                ctx,
            ),
            header: a.header,
            prefix: a.prefix,
            encoding: match a.encoding.unwrap_or(RawEncoding::Hex) {
                RawEncoding::Hex => SignatureEncoding::Hex,
                RawEncoding::Base64 => SignatureEncoding::Base64,
            },
            username: a.username,
        },
        public_url: raw.public_url,
        max_body: size_field(
            raw.max_body.as_deref(),
            body_default,
            &format!("{path}.max_body"),
            ctx,
        ),
        mapping,
    })
}

fn check_sources(list: &[String], path: &str, sources: &BTreeSet<String>, ctx: &mut Ctx) {
    for (j, s) in list.iter().enumerate() {
        if !sources.contains(s) {
            let fix = suggest(s, sources.iter().map(String::as_str))
                .map(|m| format!("did you mean `{m}`?"))
                .or_else(|| Some("name a source defined under `sources`".into()));
            ctx.problem(
                &format!("{path}.source[{j}]"),
                format!("unknown source `{s}`"),
                fix,
            );
        }
    }
}

fn validate_client(
    raw: RawClientRule,
    path: &str,
    sources: &BTreeSet<String>,
    ctx: &mut Ctx,
) -> ClientRule {
    let m = raw.matches.unwrap_or_default();
    let rule = ClientRule {
        name: raw.name,
        email: m
            .email
            .into_vec()
            .into_iter()
            .map(|e| e.trim().to_lowercase())
            .collect(),
        email_domain: m
            .email_domain
            .into_vec()
            .into_iter()
            .map(|d| d.trim().trim_start_matches('@').to_lowercase())
            .collect(),
        phone: m.phone.into_vec(),
        handle: m.handle.into_vec(),
        source: m.source.into_vec(),
        tags: raw.tags,
    };
    check_sources(&rule.source, &format!("{path}.match"), sources, ctx);
    if rule.email.is_empty()
        && rule.email_domain.is_empty()
        && rule.phone.is_empty()
        && rule.handle.is_empty()
        && rule.source.is_empty()
    {
        ctx.problem(
            &format!("{path}.match"),
            "a client rule must match on something".into(),
            Some("add email, email_domain, phone, handle or source".into()),
        );
    }
    rule
}

fn rule_match(raw: RawRuleMatch) -> RuleMatch {
    RuleMatch {
        client: raw.client.into_vec(),
        client_tag: raw.client_tag.into_vec(),
        email: raw
            .email
            .into_vec()
            .into_iter()
            .map(|e| e.to_lowercase())
            .collect(),
        email_domain: raw
            .email_domain
            .into_vec()
            .into_iter()
            .map(|e| e.to_lowercase())
            .collect(),
        source: raw.source.into_vec(),
        keyword: raw.keyword.into_vec(),
    }
}

fn validate_responsibilities(
    raw: Vec<RawOwnerRule>,
    team: &BTreeSet<String>,
    sources: &BTreeSet<String>,
    ctx: &mut Ctx,
) -> Vec<OwnerRule> {
    let mut out = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let path = format!("responsibilities[{i}]");
        if !team.contains(&r.owner) {
            let fix = suggest(&r.owner, team.iter().map(String::as_str))
                .map(|m| format!("did you mean `{m}`?"))
                .unwrap_or_else(|| "owners must be names listed under `team`".into());
            ctx.problem(
                &format!("{path}.owner"),
                format!("`{}` is not on the team", r.owner),
                Some(fix),
            );
        }
        let matches = r.matches.map(rule_match);
        if let Some(m) = &matches {
            check_sources(&m.source, &format!("{path}.match"), sources, ctx);
        }
        out.push(OwnerRule {
            matches,
            owner: r.owner,
        });
    }
    out
}

fn validate_sla(raw: RawSla, tz: Tz, sources: &BTreeSet<String>, ctx: &mut Ctx) -> Sla {
    let mut calendars = BTreeMap::new();
    for (name, c) in raw.calendars {
        let path = format!("sla.calendars.{name}");
        if name == "always" {
            ctx.problem(
                &path,
                "`always` is the built-in 24/7 calendar".into(),
                Some("give this calendar another name".into()),
            );
        }
        let timezone = match c.timezone.as_deref() {
            Some(t) => parse_tz(t, &format!("{path}.timezone"), ctx),
            None => tz,
        };
        for (day, intervals) in &c.hours {
            for (j, iv) in intervals.iter().enumerate() {
                if units::parse_interval(iv).is_err() {
                    ctx.problem(
                        &format!("{path}.hours.{day}[{j}]"),
                        format!("`{iv}` is not a time interval"),
                        Some("write it like \"09:00-17:30\"".into()),
                    );
                }
            }
            if units::parse_days(day).is_err() {
                ctx.problem(
                    &format!("{path}.hours.{day}"),
                    format!("`{day}` is not a day or day range"),
                    Some(
                        "use mon, tue, ..., sun, a range like mon-fri, or a list like mon,wed"
                            .into(),
                    ),
                );
            }
        }
        let mut holidays = BTreeSet::new();
        for (j, h) in c.holidays.iter().enumerate() {
            match NaiveDate::parse_from_str(h, "%Y-%m-%d") {
                Ok(d) => {
                    holidays.insert(d);
                }
                Err(_) => ctx.problem(
                    &format!("{path}.holidays[{j}]"),
                    format!("`{h}` is not a date"),
                    Some("write dates as YYYY-MM-DD".into()),
                ),
            }
        }
        if let Some(f) = &c.holidays_file
            && let Err(e) = std::fs::metadata(f)
        {
            ctx.problem(
                &format!("{path}.holidays_file"),
                format!("cannot read {}: {e}", f.display()),
                None,
            );
        }
        calendars.insert(
            name,
            CalendarConfig {
                timezone,
                hours: c.hours,
                holidays,
                holidays_file: c.holidays_file,
            },
        );
    }
    let mut policies = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, p) in raw.policies.into_iter().enumerate() {
        let path = format!("sla.policies[{i}]");
        if !seen.insert(p.name.clone()) {
            ctx.problem(
                &format!("{path}.name"),
                format!("policy `{}` appears twice", p.name),
                None,
            );
        }
        let calendar = p.calendar.unwrap_or_else(|| "always".into());
        if calendar != "always" && !calendars.contains_key(&calendar) {
            let fix = suggest(
                &calendar,
                calendars.keys().map(String::as_str).chain(["always"]),
            )
            .map(|m| format!("did you mean `{m}`?"))
            .unwrap_or_else(|| "define it under sla.calendars or use `always`".into());
            ctx.problem(
                &format!("{path}.calendar"),
                format!("unknown calendar `{calendar}`"),
                Some(fix),
            );
        }
        let first_reply = duration_field(
            Some(&p.first_reply),
            Duration::from_secs(4 * 3600),
            &format!("{path}.first_reply"),
            ctx,
        );
        let next_reply = duration_field(
            Some(&p.next_reply),
            Duration::from_secs(8 * 3600),
            &format!("{path}.next_reply"),
            ctx,
        );
        let warn_before = match p.warn_before.as_deref() {
            None => WarnBefore::Percent(25.0),
            Some(s) if s.trim_end().ends_with('%') => {
                match s.trim().trim_end_matches('%').trim().parse::<f64>() {
                    Ok(v) if (0.0..100.0).contains(&v) => WarnBefore::Percent(v),
                    _ => {
                        ctx.problem(
                            &format!("{path}.warn_before"),
                            format!("`{s}` is not a percentage below 100%"),
                            Some("e.g. 25%".into()),
                        );
                        WarnBefore::Percent(25.0)
                    }
                }
            }
            Some(s) => WarnBefore::Duration(duration_field(
                Some(s),
                Duration::from_secs(1800),
                &format!("{path}.warn_before"),
                ctx,
            )),
        };
        let matches = p.matches.map(rule_match);
        if let Some(m) = &matches {
            check_sources(&m.source, &format!("{path}.match"), sources, ctx);
        }
        policies.push(Policy {
            name: p.name,
            matches,
            first_reply,
            next_reply,
            calendar,
            warn_before,
        });
    }
    Sla {
        calendars,
        policies,
    }
}

fn validate_channels(raw: Vec<RawChannel>, state_dir: &Path, ctx: &mut Ctx) -> Vec<Channel> {
    if raw.is_empty() {
        ctx.problem(
            "channels",
            "no channel is configured, so digests and alerts would go nowhere".into(),
            Some(
                "add one channel, e.g. `email: {file: ./data/outbox, from: ..., to: [...]}`".into(),
            ),
        );
    }
    if raw.len() > MAX_CHANNELS {
        let names: Vec<&str> = raw.iter().map(|c| c.name.as_str()).collect();
        ctx.problem(
            "channels",
            format!(
                "frontdesk sends to at most two channels; {} are configured ({}): choose one or two and stick to them",
                raw.len(),
                names.join(", ")
            ),
            Some("too many places to check means something gets missed".into()),
        );
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, c) in raw.into_iter().enumerate() {
        let path = format!("channels[{i}]");
        check_name(&c.name, &format!("{path}.name"), ctx);
        if !seen.insert(c.name.clone()) {
            ctx.problem(
                &format!("{path}.name"),
                format!("channel `{}` is defined twice", c.name),
                None,
            );
        }
        let kind = match (c.email, c.webhook) {
            (Some(e), None) => {
                validate_email_channel(e, &c.name, state_dir, &format!("{path}.email"), ctx)
                    .map(ChannelKind::Email)
            }
            (None, Some(w)) => validate_webhook_channel(w, &format!("{path}.webhook"), ctx)
                .map(ChannelKind::Webhook),
            (Some(_), Some(_)) => {
                ctx.problem(
                    &path,
                    "a channel has either `email` or `webhook`, not both".into(),
                    None,
                );
                None
            }
            (None, None) => {
                ctx.problem(
                    &path,
                    format!("channel `{}` has neither `email` nor `webhook`", c.name),
                    Some("add an `email: {...}` or `webhook: {...}` block".into()),
                );
                None
            }
        };
        if let Some(kind) = kind {
            out.push(Channel { name: c.name, kind });
        }
    }
    out
}

fn validate_email_channel(
    raw: RawEmailChannel,
    name: &str,
    state_dir: &Path,
    path: &str,
    ctx: &mut Ctx,
) -> Option<EmailChannel> {
    let transport = match (raw.smtp, raw.file) {
        (Some(s), None) => {
            let spath = format!("{path}.smtp");
            let oauth = s.auth.and_then(|a| a.oauth2);
            let preset = oauth
                .as_ref()
                .and_then(|o| oauth2::preset_server(o.provider, oauth2::Service::Smtp));
            let oauth_set = oauth.is_some();
            let tls = match (s.tls, preset) {
                (None, Some((_, tls))) => tls,
                (t, _) => tls_mode(t),
            };
            let host = match (s.host, preset) {
                (Some(h), _) => h,
                (None, Some((h, _))) => h.to_string(),
                (None, None) => {
                    ctx.problem(
                        &format!("{spath}.host"),
                        "no host given".into(),
                        Some("set host, or use auth.oauth2.provider google or microsoft".into()),
                    );
                    String::new()
                }
            };
            if tls == TlsMode::None && !is_loopback_host(&host) {
                ctx.problem(
                    &format!("{spath}.tls"),
                    format!("`tls: none` would send mail in clear text to {host}"),
                    Some("use `implicit` (port 465) or `starttls` (port 587); `none` is only for loopback".into()),
                );
            }
            let fields = secret::SecretFields {
                inline: s.password,
                file: s.password_file,
                env: s.password_env,
                credential: s.password_credential,
            };
            let login = match oauth {
                Some(_) if fields.any() => {
                    ctx.problem(
                        &format!("{spath}.auth"),
                        "both a password and auth.oauth2 are set".into(),
                        Some("keep one".into()),
                    );
                    None
                }
                Some(o) => match &s.username {
                    Some(user) => oauth2::validate(
                        o,
                        oauth2::Service::Smtp,
                        LoginTarget::Channel(name.to_string()),
                        user,
                        state_dir,
                        &format!("{spath}.auth.oauth2"),
                        ctx,
                    )
                    .map(|o| Login::OAuth2(Box::new(o))),
                    None => {
                        ctx.problem(
                            &format!("{spath}.username"),
                            "auth.oauth2 needs the mailbox to send as".into(),
                            Some("set username to the account's address".into()),
                        );
                        None
                    }
                },
                None if fields.any() => {
                    secret::resolve(&fields, &format!("{spath}.password"), ctx).map(Login::Password)
                }
                None => None,
            };
            if s.username.is_some() && login.is_none() && !fields.any() && !oauth_set {
                ctx.problem(
                    &format!("{spath}.password"),
                    "a username is set but no password".into(),
                    Some(
                        "add password_file, password_env or password_credential, or auth.oauth2"
                            .into(),
                    ),
                );
            }
            EmailTransport::Smtp(SmtpSettings {
                port: s.port.unwrap_or(match tls {
                    TlsMode::Implicit => 465,
                    TlsMode::Starttls => 587,
                    TlsMode::None => 25,
                }),
                host,
                tls,
                ca_file: s.ca_file,
                username: s.username,
                login,
                timeout: duration_field(
                    s.timeout.as_deref(),
                    Duration::from_secs(60),
                    &format!("{spath}.timeout"),
                    ctx,
                ),
            })
        }
        (None, Some(dir)) => EmailTransport::File(dir),
        (Some(_), Some(_)) => {
            ctx.problem(path, "use either `smtp` or `file`, not both".into(), None);
            return None;
        }
        (None, None) => {
            ctx.problem(
                path,
                "an email channel needs `smtp: {...}` or `file: DIR`".into(),
                None,
            );
            return None;
        }
    };
    if !looks_like_email(&raw.from) {
        ctx.problem(
            &format!("{path}.from"),
            format!("`{}` is not an email address", raw.from),
            Some("e.g. \"frontdesk <frontdesk@example.com>\"".into()),
        );
    }
    let to = raw.to.into_vec();
    for (j, t) in to.iter().enumerate() {
        if !looks_like_email(t) {
            ctx.problem(
                &format!("{path}.to[{j}]"),
                format!("`{t}` is not an email address"),
                None,
            );
        }
    }
    if let Some(r) = &raw.reply_to
        && !looks_like_email(r)
    {
        ctx.problem(
            &format!("{path}.reply_to"),
            format!("`{r}` is not an email address"),
            None,
        );
    }
    Some(EmailChannel {
        transport,
        from: raw.from,
        to,
        reply_to: raw.reply_to,
    })
}

fn validate_webhook_channel(
    raw: RawWebhookChannel,
    path: &str,
    ctx: &mut Ctx,
) -> Option<WebhookChannel> {
    let url = secret::resolve(
        &secret::SecretFields {
            inline: raw.url,
            file: raw.url_file,
            env: raw.url_env,
            credential: raw.url_credential,
        },
        &format!("{path}.url"),
        ctx,
    );
    if let Some(u) = &url {
        let s = u.expose();
        if !(s.starts_with("https://") || (s.starts_with("http://") && url_host_is_loopback(s))) {
            ctx.problem(
                &format!("{path}.url"),
                "the webhook URL must use https (plain http only to loopback)".into(),
                None,
            );
        }
    }
    let fields = secret::SecretFields {
        inline: raw.secret,
        file: raw.secret_file,
        env: raw.secret_env,
        credential: raw.secret_credential,
    };
    let secret = if fields.any() {
        secret::resolve(&fields, &format!("{path}.secret"), ctx)
    } else {
        None
    };
    Some(WebhookChannel {
        kind: match raw.kind {
            RawWebhookChannelKind::Slack => WebhookChannelKind::Slack,
            RawWebhookChannelKind::Teams => WebhookChannelKind::Teams,
            RawWebhookChannelKind::Discord => WebhookChannelKind::Discord,
            RawWebhookChannelKind::Json => WebhookChannelKind::Json,
        },
        url: url?,
        secret,
        timeout: duration_field(
            raw.timeout.as_deref(),
            Duration::from_secs(30),
            &format!("{path}.timeout"),
            ctx,
        ),
    })
}

fn url_host_is_loopback(url: &str) -> bool {
    let rest = url.trim_start_matches("http://");
    let host_port = rest.split('/').next().unwrap_or("");
    let host = if host_port.starts_with('[') {
        host_port
            .split(']')
            .next()
            .unwrap_or("")
            .trim_start_matches('[')
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    is_loopback_host(host)
}

fn check_channel_ref(name: &str, path: &str, channels: &BTreeSet<String>, ctx: &mut Ctx) {
    if !channels.contains(name) {
        let fix = suggest(name, channels.iter().map(String::as_str))
            .map(|m| format!("did you mean `{m}`?"))
            .unwrap_or_else(|| "name a channel defined under `channels`".into());
        ctx.problem(path, format!("unknown channel `{name}`"), Some(fix));
    }
}

fn validate_digests(
    raw: Vec<RawDigest>,
    channels: &BTreeSet<String>,
    team: &[TeamMember],
    ctx: &mut Ctx,
) -> Vec<DigestSchedule> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, d) in raw.into_iter().enumerate() {
        let path = format!("digests[{i}]");
        check_name(&d.name, &format!("{path}.name"), ctx);
        if !seen.insert(d.name.clone()) {
            ctx.problem(
                &format!("{path}.name"),
                format!("digest `{}` appears twice", d.name),
                None,
            );
        }
        let schedule = d.schedule.unwrap_or_else(|| "0 8 * * Mon-Fri".into());
        if let Err(e) = schedule.parse::<croner::Cron>() {
            ctx.problem(
                &format!("{path}.schedule"),
                format!("`{schedule}` is not a cron expression: {e}"),
                Some("five fields: minute hour day-of-month month day-of-week, e.g. \"0 8 * * Mon-Fri\"".into()),
            );
        }
        let channel = match d.channel {
            Some(c) => c,
            None if channels.len() == 1 => channels.iter().next().cloned().unwrap_or_default(),
            None => {
                ctx.problem(
                    &format!("{path}.channel"),
                    "with two channels, each digest must name its channel".into(),
                    None,
                );
                String::new()
            }
        };
        if !channel.is_empty() {
            check_channel_ref(&channel, &format!("{path}.channel"), channels, ctx);
        }
        let per_owner = d.per_owner.unwrap_or(false);
        if per_owner {
            for m in team {
                if m.email.is_empty() {
                    ctx.warn(
                        &format!("{path}.per_owner"),
                        format!(
                            "team member `{}` has no email, so gets no personal digest",
                            m.name
                        ),
                        None,
                    );
                }
            }
        }
        out.push(DigestSchedule {
            name: d.name,
            schedule,
            channel,
            per_owner,
        });
    }
    out
}

fn validate_alerts(
    raw: Option<RawAlerts>,
    channels: &[Channel],
    sla: &Sla,
    ctx: &mut Ctx,
) -> Alerts {
    let names: BTreeSet<String> = channels.iter().map(|c| c.name.clone()).collect();
    let default_channel = channels.first().map(|c| c.name.clone()).unwrap_or_default();
    let all = [
        AlertKind::SlaWarning,
        AlertKind::SlaBreach,
        AlertKind::SourceUnhealthy,
    ]
    .into_iter()
    .collect();
    let Some(a) = raw else {
        return Alerts {
            channel: default_channel,
            on: all,
            group_wait: Duration::from_secs(60),
            quiet_calendar: None,
        };
    };
    let channel = a.channel.unwrap_or(default_channel);
    if !channel.is_empty() {
        check_channel_ref(&channel, "alerts.channel", &names, ctx);
    }
    let on = match a.on {
        None => all,
        Some(list) => list
            .into_iter()
            .map(|k| match k {
                RawAlertKind::SlaWarning => AlertKind::SlaWarning,
                RawAlertKind::SlaBreach => AlertKind::SlaBreach,
                RawAlertKind::SourceUnhealthy => AlertKind::SourceUnhealthy,
            })
            .collect(),
    };
    let quiet_calendar = a.quiet_hours.map(|q| {
        if q.calendar != "always" && !sla.calendars.contains_key(&q.calendar) {
            ctx.problem(
                "alerts.quiet_hours.calendar",
                format!("unknown calendar `{}`", q.calendar),
                Some("define it under sla.calendars".into()),
            );
        }
        q.calendar
    });
    Alerts {
        channel,
        on,
        group_wait: duration_field(
            a.group_wait.as_deref(),
            Duration::from_secs(60),
            "alerts.group_wait",
            ctx,
        ),
        quiet_calendar,
    }
}

/// Whether `m` surely matches every message from a client with `name` and `tags` on `source`.
///
/// Conditions that depend on the message (keywords) or on the address (email, domain) are not
/// known from the config alone, so a rule with them does not count as reaching anything.
fn surely_matches(
    m: &Option<RuleMatch>,
    source: &str,
    name: Option<&str>,
    tags: &[String],
) -> bool {
    let Some(m) = m else {
        return true;
    };
    m.keyword.is_empty()
        && m.email.is_empty()
        && m.email_domain.is_empty()
        && (m.source.is_empty() || m.source.iter().any(|s| s == source))
        && (m.client.is_empty() || name.is_some_and(|n| m.client.iter().any(|c| c == n)))
        && (m.client_tag.is_empty() || m.client_tag.iter().any(|t| tags.contains(t)))
}

/// Warns about each source, and each client rule on each source, that no ownership rule or no
/// SLA policy surely reaches: its conversations would have no owner or no target.
fn report_unrouted(
    sources: &[Source],
    clients: &[ClientRule],
    owners: &[OwnerRule],
    sla: &Sla,
    ctx: &mut Ctx,
) {
    let mut cases: Vec<(String, String, Option<&str>, &[String])> = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        cases.push((
            format!("sources[{i}]"),
            format!("source `{}`", s.name),
            None,
            &[],
        ));
    }
    for (i, c) in clients.iter().enumerate() {
        for s in sources
            .iter()
            .filter(|s| c.source.is_empty() || c.source.contains(&s.name))
        {
            let who = c.name.as_deref().unwrap_or("(unnamed)");
            cases.push((
                format!("clients[{i}]"),
                format!("client `{who}` on source `{}`", s.name),
                c.name.as_deref(),
                &c.tags,
            ));
        }
    }
    for (path, what, name, tags) in cases {
        let source = what.rsplit('`').nth(1).unwrap_or_default().to_string();
        if !owners
            .iter()
            .any(|r| surely_matches(&r.matches, &source, name, tags))
        {
            ctx.warn(
                &path,
                format!("{what} reaches no owner rule, so its conversations may have no owner"),
                Some("add a default rule without `match`, e.g. `- owner: NAME`, at the end of responsibilities".into()),
            );
        }
        if !sla
            .policies
            .iter()
            .any(|p| surely_matches(&p.matches, &source, name, tags))
        {
            ctx.warn(
                &path,
                format!("{what} reaches no SLA policy, so nobody is told when it waits too long"),
                Some("add a default policy without `match` at the end of sla.policies".into()),
            );
        }
    }
}

/// The closest candidate to `word` if it is close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(&word.to_lowercase(), &c.to_lowercase());
        let limit = (c.chars().count() / 3).clamp(1, 3);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Edit distance over chars, counting a swap of neighbours as one edit (`prot` -> `port`).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_only() {
        let keys = ["sources", "storage", "server", "sla"];
        assert_eq!(suggest("sourcs", keys), Some("sources"));
        assert_eq!(suggest("storag", keys), Some("storage"));
        assert_eq!(suggest("banana", keys), None);
        assert_eq!(suggest("prot", ["host", "port"]), Some("port"));
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("localhost"));
        assert!(is_loopback_host("::1"));
        assert!(is_loopback_host("[::1]"));
        assert!(!is_loopback_host("imap.example.com"));
        assert!(!is_loopback_host("10.0.0.1"));
    }

    #[test]
    fn replica_names_are_checked_and_default_to_host_pid() {
        let base = "storage: {sqlite: /tmp/fd.db}\nchannels:\n  - name: out\n    email: { file: /tmp/out, from: fd@example.com, to: [a@example.com] }\n";
        let file = Path::new("frontdesk.yaml");
        let default = load_str(file, base).unwrap().config.server.replica;
        assert!(
            default.ends_with(&format!("-{}", std::process::id())),
            "{default}"
        );
        let named = format!("{base}server:\n  replica: web-1\n");
        assert_eq!(
            load_str(file, &named).unwrap().config.server.replica,
            "web-1"
        );
        let bad = format!("{base}server:\n  replica: \"web 1\\n\"\n");
        let err = load_str(file, &bad).unwrap_err();
        assert!(
            err.problems
                .iter()
                .any(|p| p.to_string().contains("server.replica")),
            "{:?}",
            err.problems
        );
    }

    #[test]
    fn email_shapes() {
        assert!(looks_like_email("a@example.com"));
        assert!(looks_like_email("frontdesk <frontdesk@example.com>"));
        assert!(looks_like_email("x@localhost"));
        assert!(!looks_like_email("example.com"));
        assert!(!looks_like_email("a@b@c.com"));
        assert!(!looks_like_email("a b@c.com"));
    }
}
