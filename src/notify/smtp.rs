//! The email channel: one outbox item becomes one multipart/alternative message, sent over SMTP
//! (implicit TLS by default, STARTTLS, or plaintext to loopback only) or written as an `.eml` file.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{GENERATED_HEADER, OutboxItem, SendError, id_safe};
use crate::config::OAuth2;
use crate::digest::header_value;

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// TLS from the first byte (port 465, the default; RFC 8314).
    Implicit,
    /// Plain connect, then STARTTLS (port 587); refused if the server does not offer it.
    StartTls,
    /// No TLS: allowed only to a loopback address.
    None,
}

/// Where and how to submit mail.
#[derive(Clone)]
pub struct SmtpSettings {
    /// Server host name (checked against the certificate).
    pub host: String,
    /// Port; `None` takes 465 for implicit TLS, 587 for STARTTLS, 25 for none.
    pub port: Option<u16>,
    /// Connection security.
    pub tls: SmtpTls,
    /// PEM file of extra trusted roots; when given, only these roots are trusted.
    pub ca_file: Option<PathBuf>,
    /// Login name, if the server wants authentication.
    pub username: Option<String>,
    /// Password (never logged; `Debug` prints it redacted).
    pub password: Option<String>,
    /// OAuth2 login (SASL XOAUTH2) instead of the password.
    pub oauth2: Option<Box<OAuth2>>,
    /// Connect timeout handed to lettre.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field(
                "oauth2",
                &self.oauth2.as_ref().map(|o| o.target.to_string()),
            )
            .finish()
    }
}

/// The transport an email channel uses.
#[derive(Debug, Clone)]
pub enum EmailTransport {
    /// Submit over SMTP.
    Smtp(SmtpSettings),
    /// Write `outbox-<id>.eml` files into this directory (for trying frontdesk out).
    File(PathBuf),
}

/// Everything the email channel needs, taken from the configuration.
#[derive(Debug, Clone)]
pub struct EmailSettings {
    /// The channel name.
    pub name: String,
    /// SMTP or file.
    pub transport: EmailTransport,
    /// `From:`, e.g. `frontdesk <frontdesk@example.com>`.
    pub from: String,
    /// Default recipients (used when an item names none).
    pub to: Vec<String>,
    /// Optional `Reply-To:`.
    pub reply_to: Option<String>,
    /// Overall limit for one send, connect to the reply after the final dot.
    pub send_timeout: Duration,
}

/// A ready email channel.
pub struct EmailChannel {
    /// The channel name.
    pub name: String,
    /// Overall limit for one send.
    pub send_timeout: Duration,
    from: Mailbox,
    to: Vec<Mailbox>,
    reply_to: Option<Mailbox>,
    sink: Sink,
}

enum Sink {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    /// OAuth2: the transport is built for each send with the access token of the moment.
    SmtpOAuth2(SmtpSettings, Box<OAuth2>),
    File(PathBuf),
}

impl std::fmt::Debug for EmailChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailChannel")
            .field("name", &self.name)
            .field("from", &self.from)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

/// The channel could not be set up from its settings.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// An address did not parse.
    #[error("invalid address {address:?}: {reason}")]
    Address {
        /// The address as configured.
        address: String,
        /// What the parser said.
        reason: String,
    },
    /// Plaintext SMTP to a host that is not loopback.
    #[error("smtp tls none is allowed only to a loopback address, not {0}")]
    PlaintextNotLoopback(String),
    /// The CA file could not be read or parsed.
    #[error("cannot use ca_file {path}: {reason}")]
    CaFile {
        /// The configured path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// lettre refused the settings.
    #[error("smtp setup failed: {0}")]
    Smtp(String),
}

fn mailbox(s: &str) -> Result<Mailbox, SetupError> {
    s.parse::<Mailbox>().map_err(|e| SetupError::Address {
        address: s.to_string(),
        reason: e.to_string(),
    })
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl EmailChannel {
    /// Checks the settings and builds the transport (no network access yet).
    pub fn new(settings: &EmailSettings) -> Result<EmailChannel, SetupError> {
        let from = mailbox(&settings.from)?;
        let to = settings
            .to
            .iter()
            .map(|a| mailbox(a))
            .collect::<Result<Vec<_>, _>>()?;
        let reply_to = settings.reply_to.as_deref().map(mailbox).transpose()?;
        let sink = match &settings.transport {
            EmailTransport::File(dir) => Sink::File(dir.clone()),
            EmailTransport::Smtp(s) => match &s.oauth2 {
                Some(oauth) => {
                    // built once here so a bad setting shows at startup, not at the first send
                    smtp_transport(s, None)?;
                    Sink::SmtpOAuth2(s.clone(), oauth.clone())
                }
                None => Sink::Smtp(smtp_transport(s, password_credentials(s))?),
            },
        };
        Ok(EmailChannel {
            name: settings.name.clone(),
            send_timeout: settings.send_timeout,
            from,
            to,
            reply_to,
            sink,
        })
    }

    /// Builds the message for `item`: multipart/alternative, the fixed header set, CRLF.
    pub fn message(&self, item: &OutboxItem) -> Result<Message, SendError> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(header_value(&item.subject))
            .message_id(Some(message_id(item, &self.from)))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("Auto-Submitted"),
                "auto-generated".to_string(),
            ))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str(GENERATED_HEADER),
                item.kind.as_str().to_string(),
            ));
        if let Some(r) = &self.reply_to {
            builder = builder.reply_to(r.clone());
        }
        let recipients = self.recipients(item)?;
        for r in recipients {
            builder = builder.to(r);
        }
        let text = item.body_text.clone();
        let result = match &item.body_html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(text, html.clone())),
            None => builder
                .multipart(MultiPart::mixed().singlepart(lettre::message::SinglePart::plain(text))),
        };
        result.map_err(|e| SendError::Permanent(format!("cannot build message: {e}")))
    }

    fn recipients(&self, item: &OutboxItem) -> Result<Vec<Mailbox>, SendError> {
        if item.recipient.is_empty() {
            if self.to.is_empty() {
                return Err(SendError::Permanent("no recipient configured".into()));
            }
            return Ok(self.to.clone());
        }
        item.recipient
            .parse::<Mailbox>()
            .map(|m| vec![m])
            .map_err(|e| SendError::Permanent(format!("invalid recipient: {e}")))
    }

    /// Sends one item; returns after the server's reply to the final dot (or the file is written).
    pub async fn send(&self, item: &OutboxItem) -> Result<(), SendError> {
        let message = self.message(item)?;
        match &self.sink {
            Sink::Smtp(transport) => transport
                .send(message)
                .await
                .map(|_| ())
                .map_err(classify_smtp),
            Sink::SmtpOAuth2(s, oauth) => send_oauth2(s, oauth, message).await,
            Sink::File(dir) => write_eml(dir, item.id, &message.formatted()).await,
        }
    }
}

/// Sends with SASL XOAUTH2; when the server refuses the token (535), refreshes it once.
async fn send_oauth2(s: &SmtpSettings, oauth: &OAuth2, message: Message) -> Result<(), SendError> {
    let mut renew = false;
    loop {
        let token = crate::oauth::access_token(oauth, renew)
            .await
            .map_err(|e| {
                if e.is_permanent() {
                    SendError::Permanent(e.to_string())
                } else {
                    SendError::Temporary(e.to_string())
                }
            })?;
        let credentials = Credentials::new(oauth.username.clone(), token.expose().to_string());
        let transport = smtp_transport(s, Some((credentials, Mechanism::Xoauth2)))
            .map_err(|e| SendError::Permanent(e.to_string()))?;
        match transport.send(message.clone()).await {
            Ok(_) => return Ok(()),
            // Microsoft answers a refused token with 535; Gmail sends a 334 error challenge first,
            // which lettre's XOAUTH2 reports as a client error about an unexpected challenge
            Err(e)
                if !renew
                    && (e.status().is_some_and(|c| c.to_string() == "535")
                        || e.to_string().contains("does not expect a challenge")) =>
            {
                tracing::info!(login = %oauth.target, "smtp server refused the access token; refreshing it");
                renew = true;
            }
            Err(e) => return Err(classify_smtp(e)),
        }
    }
}

fn password_credentials(s: &SmtpSettings) -> Option<(Credentials, Mechanism)> {
    match (&s.username, &s.password) {
        (Some(user), Some(pass)) => Some((
            Credentials::new(user.clone(), pass.clone()),
            Mechanism::Plain,
        )),
        _ => None,
    }
}

/// `<outbox-N.slot@domain-of-from>`: stable per outbox item, so a duplicate after an ambiguous
/// send is recognisable, and the loop guard can recognise our own mail by its domain.
pub fn message_id(item: &OutboxItem, from: &Mailbox) -> String {
    let domain = id_safe(from.email.domain());
    let slot: String = id_safe(&item.slot_key).chars().take(120).collect();
    format!("<outbox-{}.{}@{}>", item.id, slot, domain)
}

fn smtp_transport(
    s: &SmtpSettings,
    login: Option<(Credentials, Mechanism)>,
) -> Result<AsyncSmtpTransport<Tokio1Executor>, SetupError> {
    let smtp_err = |e: lettre::transport::smtp::Error| SetupError::Smtp(e.to_string());
    let tls_params = || -> Result<TlsParameters, SetupError> {
        let mut b = TlsParameters::builder(s.host.clone());
        if let Some(path) = &s.ca_file {
            let pem = std::fs::read(path).map_err(|e| SetupError::CaFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let cert = Certificate::from_pem(&pem).map_err(|e| SetupError::CaFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            b = b
                .certificate_store(CertificateStore::None)
                .add_root_certificate(cert);
        }
        b.build_rustls().map_err(smtp_err)
    };
    let builder = match s.tls {
        SmtpTls::Implicit => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host)
            .port(s.port.unwrap_or(465))
            .tls(Tls::Wrapper(tls_params()?)),
        SmtpTls::StartTls => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host)
            .port(s.port.unwrap_or(587))
            .tls(Tls::Required(tls_params()?)),
        SmtpTls::None => {
            if !is_loopback(&s.host) {
                return Err(SetupError::PlaintextNotLoopback(s.host.clone()));
            }
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host)
                .port(s.port.unwrap_or(25))
                .tls(Tls::None)
        }
    };
    let mut builder = builder.timeout(Some(s.connect_timeout));
    match login {
        Some((credentials, Mechanism::Xoauth2)) => {
            builder = builder
                .credentials(credentials)
                .authentication(vec![Mechanism::Xoauth2]);
        }
        // lettre's default order (PLAIN, then LOGIN) for passwords, as before
        Some((credentials, _)) => builder = builder.credentials(credentials),
        None => {}
    }
    Ok(builder.build())
}

/// SMTP 5xx is permanent; 4xx, timeouts, connection and TLS trouble are temporary.
fn classify_smtp(e: lettre::transport::smtp::Error) -> SendError {
    let text = header_value(&e.to_string());
    if e.is_permanent() {
        SendError::Permanent(text)
    } else {
        SendError::Temporary(text)
    }
}

async fn write_eml(dir: &std::path::Path, id: i64, bytes: &[u8]) -> Result<(), SendError> {
    let io = |e: std::io::Error| SendError::Temporary(format!("cannot write eml file: {e}"));
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    // Write then rename, so a reader never sees half a file and a retry replaces, not duplicates.
    let tmp = dir.join(format!(".outbox-{id}.eml.tmp"));
    let path = dir.join(format!("outbox-{id}.eml"));
    let file = tokio::fs::File::create(&tmp).await.map_err(io)?;
    let mut file = tokio::io::BufWriter::new(file);
    tokio::io::AsyncWriteExt::write_all(&mut file, bytes)
        .await
        .map_err(io)?;
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(io)?;
    file.get_ref().sync_all().await.map_err(io)?;
    tokio::fs::rename(&tmp, &path).await.map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::OutboxKind;

    fn settings(dir: PathBuf) -> EmailSettings {
        EmailSettings {
            name: "office-mail".into(),
            transport: EmailTransport::File(dir),
            from: "frontdesk <frontdesk@example.com>".into(),
            to: vec!["owner@example.com".into()],
            reply_to: Some("support@example.com".into()),
            send_timeout: Duration::from_secs(5),
        }
    }

    fn item() -> OutboxItem {
        OutboxItem {
            id: 42,
            kind: OutboxKind::Digest,
            channel: "office-mail".into(),
            recipient: String::new(),
            slot_key: "digest:morning:2026-11-26T08:00 maria@example.com".into(),
            subject: "frontdesk: 1 waiting, 0 breached - Thu 26 Nov 08:00\r\nBcc: evil@x.test"
                .into(),
            body_text: format!("Hello\n.\n..\nbare\rCR {}\n", "x".repeat(3000)),
            body_html: Some(format!("<p>{}</p>", "y".repeat(3000))),
            attempts: 0,
        }
    }

    /// Header names of the top-level header block.
    fn header_names(raw: &str) -> Vec<String> {
        let head = raw.split("\r\n\r\n").next().unwrap();
        head.split("\r\n")
            .filter(|l| !l.starts_with([' ', '\t']))
            .map(|l| l.split(':').next().unwrap().to_ascii_lowercase())
            .collect()
    }

    #[tokio::test]
    async fn file_transport_writes_one_safe_eml_per_item() {
        let dir = tempfile::tempdir().unwrap();
        let ch = EmailChannel::new(&settings(dir.path().to_path_buf())).unwrap();
        ch.send(&item()).await.unwrap();
        ch.send(&item()).await.unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "a retry replaces the file");
        let raw = std::fs::read(dir.path().join("outbox-42.eml")).unwrap();
        for (i, w) in raw.windows(2).enumerate() {
            if w[1] == b'\n' {
                assert_eq!(w[0], b'\r', "bare LF at {i}");
            }
            if w[0] == b'\r' {
                assert_eq!(w[1], b'\n', "bare CR at {i}");
            }
        }
        let raw = String::from_utf8(raw).unwrap();
        assert!(raw.split("\r\n").all(|l| l.len() < 998));
        let mut names = header_names(&raw);
        names.sort();
        assert_eq!(
            names,
            [
                "auto-submitted",
                "content-type",
                "date",
                "from",
                "message-id",
                "mime-version",
                "reply-to",
                "subject",
                "to",
                "x-frontdesk-generated"
            ]
        );
        assert!(raw.contains(
            "Message-ID: <outbox-42.digest-morning-2026-11-26T08-00-maria-example.com@example.com>\r\n"
        ));
        assert!(raw.contains("Auto-Submitted: auto-generated\r\n"));
        assert!(raw.contains("X-Frontdesk-Generated: digest\r\n"));
        assert!(raw.contains("To: owner@example.com\r\n"));
        assert!(!raw.contains("\r\nBcc:"));
        assert!(raw.contains("multipart/alternative"));
    }

    #[test]
    fn plaintext_needs_loopback() {
        let mut s = settings(PathBuf::new());
        let smtp = |host: &str| SmtpSettings {
            host: host.into(),
            port: Some(2525),
            tls: SmtpTls::None,
            ca_file: None,
            username: None,
            password: Some("sentinel-password".into()),
            oauth2: None,
            connect_timeout: Duration::from_secs(1),
        };
        s.transport = EmailTransport::Smtp(smtp("smtp.example.com"));
        assert!(matches!(
            EmailChannel::new(&s),
            Err(SetupError::PlaintextNotLoopback(_))
        ));
        for host in ["127.0.0.1", "localhost", "::1"] {
            s.transport = EmailTransport::Smtp(smtp(host));
            assert!(EmailChannel::new(&s).is_ok(), "{host}");
        }
        assert!(!format!("{:?}", smtp("x")).contains("sentinel"));
    }

    #[test]
    fn per_owner_recipient_replaces_the_default() {
        let ch = EmailChannel::new(&settings(PathBuf::new())).unwrap();
        let mut it = item();
        it.recipient = "maria@example.com".into();
        let raw = String::from_utf8(ch.message(&it).unwrap().formatted()).unwrap();
        assert!(raw.contains("To: maria@example.com\r\n"));
        assert!(!raw.contains("owner@example.com"));
        it.recipient = "x@y\r\nBcc: evil@x.test".into();
        assert!(matches!(ch.message(&it), Err(SendError::Permanent(_))));
    }
}
