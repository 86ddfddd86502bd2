//! IMAP ingestion: every message of every watched folder into the store exactly once, without
//! touching the mailbox.
//!
//! The contract (reliability.md §2.2): folders are opened with EXAMINE (read-only) and bodies
//! fetched with `BODY.PEEK[]`, so no flag changes; nothing is ever stored, expunged or moved.
//! Progress is a cursor per (source, folder) of UIDVALIDITY and the highest committed UID,
//! written in the same transaction as the messages. `UID FETCH n:*` always returns the last
//! message, so only `uid > last` is kept. A UIDVALIDITY change is reconciled by fingerprint
//! (Message-ID, else SHA-256 of the bytes), never wiped or skipped.
//!
//! async-imap has no timeouts of its own (stack.md §5.2): the socket is wrapped in a
//! `TimeoutStream` (every read and write), and connect and TLS in `tokio::time::timeout`. Above
//! TLS, `imap_guard` refuses literals over `max_message_size` before async-imap buffers them and
//! times out a server that drips data too slowly for the per-read timeout to notice.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_imap::types::{Fetch, UnsolicitedResponse};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use rand::Rng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};
use tokio_io_timeout::TimeoutStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Backfill, Config, Folder, FolderRole, ImapSource, Login, SourceKind, TlsMode};
use crate::ingest::email;
use crate::ingest::imap_guard::Guarded;
use crate::message::{Automation, Direction, Message, Origin};
use crate::store::lease::{Lease, LeaseName, Leases};
use crate::store::{self, AccountedKind, AccountedUid, FolderLedger, ImapCursor, Store};

/// A socket whose every read and write times out.
type Timed = Pin<Box<TimeoutStream<TcpStream>>>;
/// The timed socket read through a buffer of `SOCKET_READ_BUFFER` bytes, under TLS only.
type Buffered = BufReader<Timed>;
/// TLS over the buffered socket, or the timed socket itself (`tls: none`, before STARTTLS).
pub type Link = Either<TlsStream<Buffered>, Timed>;
/// The link with its reads guarded (literal size limit, minimum data rate).
pub type Conn = Guarded<Link>;
/// A logged-in IMAP session.
pub type Session = async_imap::Session<Conn>;

/// How much ciphertext one read of the socket may take. rustls asks for 4 KiB at a time, one
/// `recv` each: 40,000 system calls for a 166 MB mailbox. Through this buffer a read takes
/// whatever the socket holds, up to 64 KiB. It sits under TLS only, so what it holds is
/// ciphertext that TLS authenticates (nothing read before STARTTLS can be buffered in it).
const SOCKET_READ_BUFFER: usize = 64 * 1024;
/// Re-issue IDLE this often (RFC 2177: servers may drop idlers after 30 minutes).
const IDLE_REFRESH: Duration = Duration::from_secs(10 * 60);
/// End IDLE after this long without any server data (keepalives included) to check the link.
const IDLE_SILENCE: Duration = Duration::from_secs(5 * 60);
/// A batch is cut once its messages add up to this many bytes (bounds memory: stack.md §5.2).
/// Up to two batches are alive at once (one fetched while the previous one is committed), so
/// this bounds a sync's peak RSS (target 32 MB, of which about 15 MB are the mapped binary and
/// libc). bench/imap.sh, 10,000 messages: 2 MiB peaked at 32.4-33.2 MB, 1 MiB at 29.7-30.9 MB
/// with the same wall time on the fat-LTO build (an earlier build measured 1 MiB 30% slower
/// under load: one more fsync'd commit per MiB).
const MAX_BATCH_BYTES: u64 = 1024 * 1024;
/// One `UID FETCH` covers consecutive batches up to this many bytes (`stream_run`): Dovecot
/// then streams them without a round trip per batch. On the bench's 10,000 messages, alternating
/// syncs took a median 1.62 s with 8 MiB runs, 1.67 s with 4 MiB, 1.77 s with a command per
/// 1 MiB batch, peak RSS 31.1 MB against 30.5. Memory grows past two batches only while a batch
/// waits for a UID that has not arrived (at most this much).
const FETCH_RUN_BYTES: u64 = 8 * 1024 * 1024;
/// A UID that failed this many times on its own is quarantined.
const POISON_ATTEMPTS: u32 = 3;

/// How many times over its life a UID quarantined after failed fetches is fetched again.
const QUARANTINE_RETRIES: u32 = 3;

/// How long after its quarantine, and after each retry, such a UID is fetched again.
const QUARANTINE_RETRY_AFTER: chrono::TimeDelta = chrono::TimeDelta::hours(1);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
/// How often the running daemon reconciles the ledger against the server.
const RECONCILE_EVERY: Duration = Duration::from_secs(10 * 60);

/// Why an IMAP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// host:port
        addr: String,
        /// The OS error.
        reason: String,
    },
    /// The TLS handshake failed (untrusted certificate, wrong name, protocol).
    #[error("tls with {host} failed: {reason}")]
    Tls {
        /// The server name checked.
        host: String,
        /// rustls's reason.
        reason: String,
    },
    /// The CA file could not be used.
    #[error("cannot use ca_file {path}: {reason}")]
    Ca {
        /// The configured path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The server did not answer in time.
    #[error("{what} timed out after {secs}s")]
    Timeout {
        /// The operation.
        what: &'static str,
        /// The configured timeout.
        secs: u64,
    },
    /// Login refused.
    #[error("login as {user} refused: {reason}")]
    Auth {
        /// The configured username.
        user: String,
        /// The server's words.
        reason: String,
    },
    /// Plaintext IMAP to a host that is not loopback.
    #[error("refusing IMAP without TLS to {0}: only loopback hosts may use tls: none")]
    Plaintext(String),
    /// A PREAUTH greeting on a `tls: starttls` connection: STARTTLS is not allowed once
    /// authenticated, so accepting it would keep the session in plaintext (the STARTTLS
    /// downgrade, RFC 9051 §11.1; CVE-2020-12398, CVE-2020-15917).
    #[error(
        "refusing the PREAUTH greeting of {0} before STARTTLS: the session would stay unencrypted \
         (use tls: implicit, or make the server greet with OK)"
    )]
    PreauthBeforeTls(String),
    /// The server's capability list lacks IMAP4rev1, which async-imap's parser requires.
    #[error(
        "the server does not announce IMAP4rev1 (capabilities: {0}); frontdesk's IMAP library \
         cannot read such an answer (an IMAP4rev2 server should announce both, RFC 9051 appendix E)"
    )]
    NoImap4rev1(String),
    /// The server said NO or BAD, or sent something unparseable, or hung up.
    #[error("imap {what}: {reason}")]
    Protocol {
        /// The command.
        what: &'static str,
        /// The error.
        reason: String,
    },
    /// The store refused a write; nothing was committed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// No OAuth2 access token (revoked refresh token, never logged in, provider down).
    #[error(transparent)]
    OAuth(#[from] crate::oauth::OAuthError),
}

impl ImapError {
    /// Configuration-like problems that will not fix themselves: the source turns unhealthy at once.
    fn is_config_problem(&self) -> bool {
        matches!(
            self,
            ImapError::Auth { .. }
                | ImapError::Tls { .. }
                | ImapError::Ca { .. }
                | ImapError::Plaintext(_)
                | ImapError::PreauthBeforeTls(_)
                | ImapError::NoImap4rev1(_)
        ) || matches!(self, ImapError::OAuth(e) if e.is_permanent())
    }
}

/// Maps an async-imap error, naming timeouts as such.
fn protocol(
    what: &'static str,
    timeout: Duration,
) -> impl Fn(async_imap::error::Error) -> ImapError {
    move |e| match &e {
        async_imap::error::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            ImapError::Timeout {
                what,
                secs: timeout.as_secs(),
            }
        }
        _ => ImapError::Protocol {
            what,
            reason: e.to_string(),
        },
    }
}

/// The rustls client config: the CA file alone when given, else the platform's roots.
pub fn tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, ImapError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ImapError::Tls {
            host: String::new(),
            reason: e.to_string(),
        })?;
    let config = match ca_file {
        Some(path) => {
            let ca_err = |reason: String| ImapError::Ca {
                path: path.display().to_string(),
                reason,
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))? {
                roots
                    .add(cert.map_err(|e| ca_err(e.to_string()))?)
                    .map_err(|e| ca_err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ca_err("no certificate in the file".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            let verifier =
                rustls_platform_verifier::Verifier::new(provider).map_err(|e| ImapError::Tls {
                    host: String::new(),
                    reason: format!("platform verifier: {e}"),
                })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Sets the read timeout of the socket under the session, and with it the guard's rate check
/// (IDLE waits longer than a command, and quietly).
fn set_read_timeout(conn: &mut Conn, timeout: Option<Duration>) {
    conn.set_window(timeout);
    match conn.get_mut() {
        Either::Left(tls) => tls
            .get_mut()
            .0
            .get_mut()
            .as_mut()
            .set_read_timeout_pinned(timeout),
        Either::Right(plain) => plain.as_mut().set_read_timeout_pinned(timeout),
    }
}

/// How async-imap's error for a CAPABILITY line it cannot parse reads, up to the list.
const CAPABILITY_UNPARSED: &str = "during parsing of \"* CAPABILITY ";

/// Sources already warned about their capability list (warned once per process, not per
/// reconnect).
static CAPABILITY_WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Logs `message` for `source` the first time only.
fn warn_capabilities_once(source: &str, message: &str) {
    let mut warned = CAPABILITY_WARNED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !warned.iter().any(|s| s == source) {
        warned.push(source.to_string());
        warn!(source, "{message}");
    }
}

/// Connects, secures and logs in; returns the session and whether the server offers IDLE.
///
/// A `PREAUTH` greeting (already authenticated) is accepted over implicit TLS and on loopback
/// without TLS, without sending the credentials; over STARTTLS it is refused. A capability list
/// without IMAP4rev1 is refused with `NoImap4rev1` (async-imap cannot parse it); a server that
/// answers CAPABILITY with NO or BAD is used without IDLE, with a warning once per source.
pub async fn connect(source: &str, cfg: &ImapSource) -> Result<(Session, bool), ImapError> {
    let t = cfg.timeout;
    let secs = t.as_secs();
    let addr = format!("{}:{}", cfg.host, cfg.port);
    if cfg.tls == TlsMode::None && !is_loopback(&cfg.host) {
        return Err(ImapError::Plaintext(cfg.host.clone()));
    }
    let tcp = tokio::time::timeout(t, TcpStream::connect((cfg.host.as_str(), cfg.port)))
        .await
        .map_err(|_| ImapError::Timeout {
            what: "connect",
            secs,
        })?
        .map_err(|e| ImapError::Connect {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let mut timed = TimeoutStream::new(tcp);
    timed.set_read_timeout(Some(t));
    timed.set_write_timeout(Some(t));
    let timed: Timed = Box::pin(timed);

    let secure = |timed: Timed| async move {
        let config = tls_config(cfg.ca_file.as_deref())?;
        let name = ServerName::try_from(cfg.host.clone()).map_err(|e| ImapError::Tls {
            host: cfg.host.clone(),
            reason: e.to_string(),
        })?;
        tokio::time::timeout(
            t,
            tokio_rustls::TlsConnector::from(config)
                .connect(name, BufReader::with_capacity(SOCKET_READ_BUFFER, timed)),
        )
        .await
        .map_err(|_| ImapError::Timeout {
            what: "tls handshake",
            secs,
        })?
        .map_err(|e| {
            // the socket's read timeout surfaces as an io error inside the handshake
            if e.kind() == std::io::ErrorKind::TimedOut {
                ImapError::Timeout {
                    what: "tls handshake",
                    secs,
                }
            } else {
                ImapError::Tls {
                    host: cfg.host.clone(),
                    reason: e.to_string(),
                }
            }
        })
    };

    let guard = |link: Link| Guarded::new(link, cfg.max_message_size, t);
    let (mut client, preauth) = match cfg.tls {
        TlsMode::Implicit => {
            let mut c = async_imap::Client::new(guard(Either::Left(secure(timed).await?)));
            let preauth = read_greeting(&mut c, t).await?;
            (c, preauth)
        }
        TlsMode::None => {
            let mut c = async_imap::Client::new(guard(Either::Right(timed)));
            let preauth = read_greeting(&mut c, t).await?;
            (c, preauth)
        }
        TlsMode::Starttls => {
            let mut c = async_imap::Client::new(guard(Either::Right(timed)));
            if read_greeting(&mut c, t).await? {
                return Err(ImapError::PreauthBeforeTls(cfg.host.clone()));
            }
            c.run_command_and_check_ok("STARTTLS", None)
                .await
                .map_err(protocol("starttls", t))?;
            // into_inner drops whatever was buffered before the handshake (STARTTLS injection)
            let Either::Right(timed) = c.into_inner().into_inner() else {
                return Err(ImapError::Protocol {
                    what: "starttls",
                    reason: "unexpected stream state".into(),
                });
            };
            // no second greeting after STARTTLS
            let c = async_imap::Client::new(guard(Either::Left(secure(timed).await?)));
            (c, false)
        }
    };
    let refused = |reason| ImapError::Auth {
        user: cfg.username.clone(),
        reason,
    };
    let mut session = match &cfg.login {
        _ if preauth => {
            info!(source, host = %cfg.host, "server greeted with PREAUTH: already authenticated, not logging in");
            // async-imap makes a Session only out of a LOGIN: the stream answers this one itself
            client.get_mut().answer_login_locally();
            client
                .login("preauth", "preauth")
                .await
                .map_err(|(e, _)| protocol("preauth", t)(e))?
        }
        Login::Password(password) => client
            .login(&cfg.username, password.expose())
            .await
            .map_err(|(e, _)| match e {
                async_imap::error::Error::No(reason) | async_imap::error::Error::Bad(reason) => {
                    refused(reason)
                }
                other => protocol("login", t)(other),
            })?,
        Login::OAuth2(oauth) => {
            use crate::oauth::sasl::{ImapLoginError, imap_login};
            imap_login(client, oauth, &cfg.host, cfg.port)
                .await
                .map_err(|e| match e {
                    ImapLoginError::Token(e) => ImapError::OAuth(e),
                    ImapLoginError::Refused(reason) => refused(reason),
                    ImapLoginError::Imap(e) => protocol("authenticate", t)(e),
                })?
        }
    };
    // capabilities are read again after login (and after STARTTLS): the pre-TLS list is untrusted
    let caps = match session.capabilities().await {
        Ok(caps) => caps,
        // imap-proto refuses CAPABILITY data without IMAP4rev1, and the unparsed line then
        // blocks the connection for good: there is no using such a server
        Err(async_imap::error::Error::Io(e)) if e.to_string().contains(CAPABILITY_UNPARSED) => {
            let text = e.to_string();
            let list = text
                .split(CAPABILITY_UNPARSED)
                .nth(1)
                .and_then(|rest| rest.split("\\r\\n").next())
                .unwrap_or_default()
                .to_string();
            return Err(ImapError::NoImap4rev1(list));
        }
        Err(e) => return Err(protocol("capability", t)(e)),
    };
    if !caps.has_str("IMAP4rev1") {
        // parsed data always holds IMAP4rev1, so there was none: async-imap ends CAPABILITY
        // quietly with an empty list on a tagged NO or BAD, and on a closed connection
        confirm_alive(&mut session, "capability", t).await?;
        warn_capabilities_once(
            source,
            "the server refused CAPABILITY; polling without IDLE",
        );
        return Ok((session, false));
    }
    Ok((session, caps.has_str("IDLE")))
}

/// Reads the greeting; true when it is PREAUTH (already authenticated).
async fn read_greeting(c: &mut async_imap::Client<Conn>, t: Duration) -> Result<bool, ImapError> {
    use async_imap::imap_proto::{Response, Status};
    match c.read_response().await {
        Ok(Some(greeting)) => match greeting.parsed() {
            Response::Data {
                status: Status::PreAuth,
                ..
            } => Ok(true),
            Response::Data {
                status: Status::Bye,
                outcome,
            } => Err(ImapError::Protocol {
                what: "greeting",
                reason: format!(
                    "the server refused the connection: {}",
                    outcome.information.as_deref().unwrap_or("BYE")
                ),
            }),
            _ => Ok(false),
        },
        Ok(None) => Err(ImapError::Protocol {
            what: "greeting",
            reason: "connection closed before the greeting".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(ImapError::Timeout {
            what: "greeting",
            secs: t.as_secs(),
        }),
        Err(e) => Err(ImapError::Protocol {
            what: "greeting",
            reason: e.to_string(),
        }),
    }
}

/// A compact UID set (`1:5,7,9:10`) for a sorted list.
fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end.saturating_add(1) {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// A command's tagged status as a result (async-imap's readers drop it; see `checked_uid_search`).
fn tagged_ok(
    status: &async_imap::imap_proto::Status,
    outcome: &async_imap::imap_proto::Outcome<'_>,
) -> Result<(), async_imap::error::Error> {
    use async_imap::imap_proto::Status;
    let why = || {
        outcome
            .information
            .as_deref()
            .unwrap_or_default()
            .to_string()
    };
    match status {
        Status::Ok => Ok(()),
        Status::No => Err(async_imap::error::Error::No(why())),
        _ => Err(async_imap::error::Error::Bad(why())),
    }
}

/// `UID SEARCH query`, failing unless the server's tagged answer is OK.
///
/// async-imap's `uid_search` drops the tagged status: a `NO` (a server that could not search)
/// reads as "no UIDs", and a missing UID taken for expunged would be skipped for good. Untagged
/// responses other than `* SEARCH` (EXISTS, EXPUNGE, FLAGS) are dropped here: every sync pass
/// lists the folder again before waiting for new mail, so none of them is needed.
async fn checked_uid_search(
    session: &mut Session,
    query: &str,
) -> Result<HashSet<u32>, async_imap::error::Error> {
    use async_imap::imap_proto::{MailboxDatum, Response};
    let id = session.run_command(format!("UID SEARCH {query}")).await?;
    let mut found = HashSet::new();
    loop {
        let Some(resp) = session.read_response().await? else {
            return Err(async_imap::error::Error::ConnectionLost);
        };
        match resp.parsed() {
            Response::MailboxData(MailboxDatum::Search(uids)) => found.extend(uids.iter().copied()),
            Response::Done {
                tag,
                status,
                outcome,
                ..
            } if *tag == id => {
                return tagged_ok(status, outcome).map(|()| found);
            }
            _ => {}
        }
    }
}

/// Requires a tagged OK to a NOOP after a SEARCH or FETCH whose answer is about to be trusted.
///
/// async-imap ends a SEARCH or FETCH quietly, with what it got so far, when the connection
/// closes before the tagged answer: an empty or cut listing would then look like expunged
/// messages or a smaller folder. The NOOP's tagged OK (EOF there is `ConnectionLost`) proves the
/// session was still alive, so the answer before it was complete.
async fn confirm_alive(
    session: &mut Session,
    what: &'static str,
    t: Duration,
) -> Result<(), ImapError> {
    session
        .run_command_and_check_ok("NOOP")
        .await
        .map_err(|e| match protocol(what, t)(e) {
            ImapError::Protocol { what, reason } => ImapError::Protocol {
                what,
                reason: format!(
                    "the answer was not confirmed by a live session, so it is not used: {reason}"
                ),
            },
            other => other,
        })
}

/// One listed message: UID, size and INTERNALDATE (no body; no date when not asked for).
#[derive(Debug, Clone, Copy)]
struct Listed {
    uid: u32,
    size: u32,
    internal_date: Option<DateTime<Utc>>,
}

/// What a listing asks for besides UID and size.
#[derive(Debug, Clone, Copy)]
enum ListDates {
    /// INTERNALDATE too: a backfill cutoff or a fingerprint match compares it.
    With,
    /// No INTERNALDATE. Dovecot reads it from each message file's mtime: it made up half of a
    /// 10,000-message listing (~30 of 60 ms on the bench, while the sync waited), and a fetch
    /// answers it again with the body anyway (`fetched_body`).
    Without,
}

/// `UID FETCH set (UID RFC822.SIZE [INTERNALDATE])`, sorted by UID.
async fn list(
    session: &mut Session,
    set: &str,
    dates: ListDates,
    t: Duration,
) -> Result<Vec<Listed>, ImapError> {
    use async_imap::imap_proto::{AttributeValue, Response};
    // each response is turned into a small `Listed` and dropped at once: async-imap keeps a
    // buffer per response, so collecting 10,000 of them first would cost tens of megabytes.
    // Read by hand rather than through `uid_fetch`, which drops the tagged status: a listing that
    // ends in NO may have left a message out of the middle, and the cursor would pass it.
    let mut out = Vec::new();
    let listed = async {
        let id = session
            .run_command(format!(
                "UID FETCH {set} (UID RFC822.SIZE{})",
                match dates {
                    ListDates::With => " INTERNALDATE",
                    ListDates::Without => "",
                }
            ))
            .await?;
        loop {
            let Some(resp) = session.read_response().await? else {
                return Err(async_imap::error::Error::ConnectionLost);
            };
            match resp.parsed() {
                Response::Fetch(_, attrs) => {
                    let mut l = Listed {
                        uid: 0,
                        size: 0,
                        internal_date: None,
                    };
                    let mut sized = false;
                    for a in attrs {
                        match a {
                            AttributeValue::Uid(u) => l.uid = *u,
                            AttributeValue::Rfc822Size(n) => {
                                l.size = *n;
                                sized = true;
                            }
                            AttributeValue::InternalDate(d) => l.internal_date = internal_date(d),
                            _ => {}
                        }
                    }
                    // an unsolicited FETCH (flags changed elsewhere) lacks the size we asked for
                    if l.uid != 0 && sized {
                        out.push(l);
                    }
                }
                Response::Done {
                    tag,
                    status,
                    outcome,
                    ..
                } if *tag == id => {
                    return tagged_ok(status, outcome);
                }
                _ => {}
            }
        }
    }
    .await;
    listed.map_err(protocol("uid fetch (list)", t))?;
    out.sort_by_key(|l| l.uid);
    out.dedup_by_key(|l| l.uid);
    Ok(out)
}

/// An IMAP date-time (`date-day-fixed`: a single-digit day is space-padded, ` 1-Jul-2025 ...`).
fn internal_date(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim_start();
    // read by hand when it has the fixed shape: chrono's parser reads its format string anew
    // each call, and every listed and fetched UID has a date
    internal_date_fixed(text.as_bytes()).or_else(|| {
        DateTime::parse_from_str(text, "%d-%b-%Y %H:%M:%S %z")
            .ok()
            .map(|d| d.with_timezone(&Utc))
    })
}

/// `dd-Mon-yyyy hh:mm:ss +zzzz` (or `d-Mon-...`) with every field in range, else `None` (chrono
/// then decides).
fn internal_date_fixed(b: &[u8]) -> Option<DateTime<Utc>> {
    const MONTHS: [&[u8]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let num = |d: &[u8]| -> Option<u32> {
        d.iter().try_fold(0u32, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let (day, r) = match b.get(1) {
        Some(b'-') => b.split_at(1),
        _ => b.split_at_checked(2)?,
    };
    // r: `-Mon-yyyy hh:mm:ss +zzzz`
    if r.len() != 24 || [r[0], r[4], r[9], r[12], r[15], r[18]] != *b"-- :: " {
        return None;
    }
    let month = MONTHS.iter().position(|m| *m == &r[1..4])?;
    let date = chrono::NaiveDate::from_ymd_opt(
        i32::try_from(num(&r[5..9])?).ok()?,
        u32::try_from(month).ok()? + 1,
        num(day)?,
    )?;
    let time = date.and_hms_opt(num(&r[10..12])?, num(&r[13..15])?, num(&r[16..18])?)?;
    let (hours, minutes) = (num(&r[20..22])?, num(&r[22..24])?);
    if hours > 23 || minutes > 59 {
        return None;
    }
    let offset = i64::from(hours * 3600 + minutes * 60);
    let offset = match r[19] {
        b'+' => offset,
        b'-' => -offset,
        _ => return None,
    };
    Some(time.and_utc() - chrono::Duration::seconds(offset))
}

/// What a source task needs besides the connection.
#[derive(Debug, Clone)]
pub struct SourceCtx {
    /// The configured source name.
    pub name: String,
    /// Its settings.
    pub cfg: ImapSource,
    /// The team's email addresses, lowercased: mail from them is outbound.
    pub team: Arc<HashSet<String>>,
    /// The store.
    pub store: Store,
    /// This replica's leases: a folder is synced only while its lease is held.
    pub leases: Leases,
}

/// The leases of one source's folders, kept across reconnects: with several replicas on one
/// PostgreSQL database, each folder is synced by one replica at a time.
#[derive(Debug)]
pub struct FolderLeases {
    by_folder: Vec<(String, Lease)>,
}

impl FolderLeases {
    /// One lease per configured folder of `ctx`, none taken yet.
    pub fn new(ctx: &SourceCtx) -> FolderLeases {
        let by_folder = ctx
            .cfg
            .folders
            .iter()
            .map(|f| {
                let name = LeaseName::Folder {
                    source: ctx.name.clone(),
                    folder: f.name.clone(),
                };
                (f.name.clone(), ctx.leases.lease(name))
            })
            .collect();
        FolderLeases { by_folder }
    }

    /// Tries to take every folder not held yet; returns how many are held afterwards. A
    /// database that does not answer counts as "not taken" (logged, retried next time).
    pub async fn take_free(&mut self) -> usize {
        let mut held = 0;
        for (_, lease) in &mut self.by_folder {
            if lease.is_held() {
                held += 1;
                continue;
            }
            match lease.try_take().await {
                Ok(true) => held += 1,
                Ok(false) => {}
                Err(e) => debug!(lease = %lease.name(), error = %e, "folder lease not taken"),
            }
        }
        held
    }

    /// Whether this replica holds every folder (then nothing needs retrying between syncs).
    pub fn all_held(&self) -> bool {
        self.by_folder.iter().all(|(_, l)| l.is_held())
    }

    fn held_mut(&mut self, folder: &str) -> Option<&mut Lease> {
        self.by_folder
            .iter_mut()
            .find(|(f, l)| f == folder && l.is_held())
            .map(|(_, l)| l)
    }

    fn is_held(&self, folder: &str) -> bool {
        self.by_folder
            .iter()
            .any(|(f, l)| f == folder && l.is_held())
    }

    /// Gives every lease back (shutdown, end of a CLI sync).
    pub async fn release_all(&mut self) {
        for (_, lease) in &mut self.by_folder {
            lease.release().await;
        }
    }
}

/// Progress of a sync, for the CLI's progress bar.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The folder being synced.
    pub folder: String,
    /// Messages handled so far in this folder.
    pub done: u64,
    /// Messages to handle in this folder in this pass.
    pub total: u64,
}

/// What one pass over a folder did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FolderReport {
    /// The folder.
    pub folder: String,
    /// New message rows.
    pub inserted: u64,
    /// Messages already stored (a re-fetch after a crash).
    pub duplicates: u64,
    /// UIDs accounted for without a row (quarantine, loop guard, matches).
    pub accounted: u64,
    /// The UIDVALIDITY changed and was reconciled in this pass.
    pub uid_validity_changed: bool,
    /// The folder's lease was lost during the pass, which then stopped.
    pub lease_lost: bool,
    /// The folder's UIDVALIDITY as this pass's EXAMINE found it (`None`: the pass stopped
    /// before opening the folder).
    pub uid_validity: Option<u32>,
}

/// Failure counts per (folder, UID) across reconnects: how poison messages are found. The
/// store keeps them too (`imap_poison`), so separate `frontdesk sync` runs add up.
#[derive(Debug, Default)]
pub struct PoisonTracker {
    failures: BTreeMap<(String, u32), (u32, String)>,
}

impl PoisonTracker {
    fn record(&mut self, folder: &str, uid: u32, error: &str) {
        let e = self
            .failures
            .entry((folder.to_string(), uid))
            .or_insert((0, String::new()));
        e.0 += 1;
        e.1 = error.to_string();
    }

    fn attempts(&self, folder: &str, uid: u32) -> u32 {
        self.failures
            .get(&(folder.to_string(), uid))
            .map_or(0, |e| e.0)
    }

    fn last_error(&self, folder: &str, uid: u32) -> String {
        self.failures
            .get(&(folder.to_string(), uid))
            .map(|e| e.1.clone())
            .unwrap_or_default()
    }

    /// Takes in counts kept by the store (earlier runs); the higher count wins, so counts the
    /// tracker already holds from this process are not added twice.
    fn remember(&mut self, folder: &str, uid: u32, attempts: u32, error: String) {
        let e = self
            .failures
            .entry((folder.to_string(), uid))
            .or_insert((0, String::new()));
        if attempts > e.0 {
            *e = (attempts, error);
        }
    }

    fn clear(&mut self, folder: &str, uid: u32) {
        self.failures.remove(&(folder.to_string(), uid));
    }
}

impl SourceCtx {
    fn direction(&self, folder: &Folder, m: &Message) -> Direction {
        let from_team = m.from.as_ref().is_some_and(|a| self.team.contains(&a.addr));
        if folder.role == FolderRole::Sent || from_team {
            Direction::Outbound
        } else {
            Direction::Inbound
        }
    }

    /// One pass over every folder this replica holds the lease of, on an open session: the
    /// `sent` folders first, then the others in their configured order.
    ///
    /// The team's replies go in before the client messages they answer: otherwise a core step
    /// between the two (woken by any other source, or by a deadline) sees every answered client
    /// message of a first sync, or of a catch-up after downtime, as past due and alerts on it. A
    /// client message stored after its reply is replayed in receipt order (`core`), so its
    /// target is fulfilled by then and never alerted.
    pub async fn sync_folders(
        &self,
        session: &mut Session,
        leases: &mut FolderLeases,
        poison: &mut PoisonTracker,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Vec<FolderReport>, ImapError> {
        let mut reports = Vec::new();
        for folder in self.folders_in_sync_order() {
            let Some(lease) = leases.held_mut(&folder.name) else {
                continue;
            };
            reports.push(
                self.sync_folder(session, folder, lease, poison, progress)
                    .await?,
            );
        }
        Ok(reports)
    }

    /// The folders in the order a pass syncs them: `sent` first (see [`SourceCtx::sync_folders`]).
    pub fn folders_in_sync_order(&self) -> impl Iterator<Item = &Folder> {
        let folders = &self.cfg.folders;
        let sent = folders.iter().filter(|f| f.role == FolderRole::Sent);
        sent.chain(folders.iter().filter(|f| f.role != FolderRole::Sent))
    }

    /// Syncs one folder: first-run backfill, UIDVALIDITY reconciliation, then new UIDs in batches.
    ///
    /// The folder's lease is checked before the folder is opened and before each batch is fetched
    /// or, in a run fetched by one command, handed to the commit;
    /// once it is lost the pass stops (`lease_lost`), since another replica may now hold it (the
    /// batches already handed over, at most `CommitPipeline::DEPTH`, still commit).
    pub async fn sync_folder(
        &self,
        session: &mut Session,
        folder: &Folder,
        lease: &mut Lease,
        poison: &mut PoisonTracker,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<FolderReport, ImapError> {
        let t = self.cfg.timeout;
        let mut report = FolderReport {
            folder: folder.name.clone(),
            ..FolderReport::default()
        };
        if lease.check().await.is_err() {
            report.lease_lost = true;
            return Ok(report);
        }
        let mailbox = session
            .examine(&folder.name)
            .await
            .map_err(protocol("examine", t))?;
        let uid_validity = mailbox.uid_validity.ok_or(ImapError::Protocol {
            what: "examine",
            reason: format!("folder {} has no UIDVALIDITY", folder.name),
        })?;
        report.uid_validity = Some(uid_validity);
        let stored = self.store.imap_cursor(&self.name, &folder.name).await?;
        // a first run and a UIDVALIDITY change commit a cursor before any batch
        let mut wrote = stored.is_none_or(|c| c.uid_validity != uid_validity);
        // a first run lists the whole folder for its backfill floor: the pass takes its new UIDs
        // from that listing rather than listing them a second time
        let (mut cursor, first_listing) = match stored {
            None => {
                let (cursor, listed) = self.first_run(session, folder, uid_validity).await?;
                (cursor, Some(listed))
            }
            Some(c) if c.uid_validity != uid_validity => {
                report.uid_validity_changed = true;
                let cursor = self
                    .uid_validity_changed(session, folder, c, uid_validity, &mut report)
                    .await?;
                (cursor, None)
            }
            Some(c) => (c, None),
        };

        // failures of earlier runs count: `frontdesk sync` starts with an empty tracker each time
        for (uid, attempts, error) in self
            .store
            .imap_poison(&self.name, &folder.name, uid_validity)
            .await?
        {
            poison.remember(&folder.name, uid, attempts, error);
        }

        // new UIDs; `n:*` always includes the highest message, hence the filter
        let mut listed = match first_listing {
            Some(listed) => listed,
            None => {
                let from = cursor.last_uid.saturating_add(1);
                list(session, &format!("{from}:*"), ListDates::With, t).await?
            }
        };
        listed.retain(|l| l.uid > cursor.last_uid);
        // a first run's listing covers the whole folder, most of it below a backfill floor
        listed.shrink_to_fit();
        wrote |= !listed.is_empty();
        if !listed.is_empty() {
            // UIDs accounted for ahead of the cursor (UIDVALIDITY matches) are not fetched again;
            // right after a UIDVALIDITY change that flapped back, rows stored under it before
            // lie above the reset cursor too
            let known = if report.uid_validity_changed {
                self.store
                    .imap_known_uids(&self.name, &folder.name, uid_validity)
                    .await?
            } else {
                self.store
                    .imap_accounted_above(&self.name, &folder.name, uid_validity, cursor.last_uid)
                    .await?
            };
            let mut pipe = CommitPipeline::new(listed.len() as u64);
            pipe.report_progress(folder, progress);
            // a batch that failed before is fetched and committed one UID at a time: the culprit
            // is found, and what comes before it commits even when no connection lives long
            // enough to fetch the whole batch (a flaky link, a slow server)
            let all: Vec<&[Listed]> = batches(&listed, self.cfg.batch_size.max(1) as usize)
                .into_iter()
                .flat_map(|b| {
                    if b.iter().any(|l| poison.attempts(&folder.name, l.uid) > 0) {
                        b.chunks(1).collect()
                    } else {
                        vec![b]
                    }
                })
                .collect();
            let mut next = 0;
            while next < all.len() {
                if lease.check().await.is_err() {
                    report.lease_lost = true;
                    break;
                }
                let todo = |batch: &[Listed]| -> Vec<Listed> {
                    batch
                        .iter()
                        .filter(|l| !known.contains(&l.uid))
                        .copied()
                        .collect()
                };
                let run = fetch_run_len(&all[next..], &folder.name, poison);
                if run >= 2 {
                    let run_batches: Vec<(Vec<Listed>, u32, u64)> = all[next..next + run]
                        .iter()
                        .map(|b| (todo(b), b.last().map_or(0, |l| l.uid), b.len() as u64))
                        .collect();
                    next += run;
                    let streamed = self
                        .stream_run(
                            session,
                            lease,
                            folder,
                            uid_validity,
                            run_batches,
                            &mut cursor,
                            poison,
                            &mut pipe,
                            &mut report,
                            progress,
                        )
                        .await;
                    if let Err(e) = streamed {
                        pipe.settle(folder, &mut report, progress).await?;
                        return Err(e);
                    }
                    if report.lease_lost {
                        break;
                    }
                    continue;
                }
                let batch = all[next];
                next += 1;
                let todo = todo(batch);
                let last = batch.last().map_or(cursor.last_uid, |l| l.uid);
                pipe.started = std::time::Instant::now();
                let fetched = self
                    .fetch_batch(session, folder, uid_validity, &todo, &cursor, last, poison)
                    .await;
                let mut fetched = match fetched {
                    Ok(f) => f,
                    Err(e) => {
                        pipe.settle(folder, &mut report, progress).await?;
                        return Err(e);
                    }
                };
                fetched.messages_listed = batch.len() as u64;
                cursor = fetched.next;
                pipe.hand_over(self, folder, fetched, &mut report, progress)
                    .await?;
            }
            pipe.settle(folder, &mut report, progress).await?;
        }
        if !report.lease_lost {
            report.inserted += self
                .retry_quarantined(session, folder, uid_validity)
                .await?;
        }
        // the batches committed without an fsync each (`Store::commit_imap_batch`); a pass that
        // wrote nothing (the daemon's every poll and IDLE wake-up without new mail) syncs nothing
        if wrote {
            self.store.make_durable().await?;
        }
        Ok(report)
    }

    /// Fetches again, one at a time, the folder's UIDs quarantined because their fetch kept
    /// failing, each at most `QUARANTINE_RETRIES` times over its life and `QUARANTINE_RETRY_AFTER`
    /// after its quarantine or last retry; one that arrives is stored and leaves quarantine in
    /// one transaction. Returns how many rows it added.
    ///
    /// A failed fetch counts against the UID in flight, so a link that dies three times with the
    /// same message in flight quarantines a message nothing is wrong with, as does a server that
    /// cannot read a file for a while. Both are told from poison only by trying again later, at
    /// the end of a pass that went through. A retry is counted before it is sent, so a message
    /// that really kills the connection (Dovecot drops the session after failing to read a
    /// message file) fails a bounded number of passes, hours apart, not every one.
    ///
    /// A UID refused for its size is fetched as soon as `max_message_size` has been raised to fit
    /// it (its first try needs no wait: it was never fetched), under the same bound and spacing.
    async fn retry_quarantined(
        &self,
        session: &mut Session,
        folder: &Folder,
        uid_validity: u32,
    ) -> Result<u64, ImapError> {
        let t = self.cfg.timeout;
        let due = self
            .store
            .imap_quarantine_due(
                &self.name,
                &folder.name,
                uid_validity,
                QUARANTINE_RETRIES,
                Utc::now() - QUARANTINE_RETRY_AFTER,
            )
            .await?;
        let mut added = 0;
        for (uid, detail) in due {
            // one refused for its size only once the limit has been raised to fit it
            if too_large_size(&detail).is_some_and(|size| size > self.cfg.max_message_size) {
                continue;
            }
            self.store
                .imap_quarantine_retried(&self.name, &folder.name, uid_validity, uid, Utc::now())
                .await?;
            // still there, and small enough (the limit may have been lowered meanwhile)
            let listed = list(session, &uid.to_string(), ListDates::With, t).await?;
            let Some(l) = listed.iter().find(|l| l.uid == uid) else {
                continue;
            };
            if u64::from(l.size) > self.cfg.max_message_size {
                continue;
            }
            let mut raw = None;
            let fetched = async {
                let stream = session
                    .uid_fetch(
                        uid.to_string(),
                        "(UID INTERNALDATE RFC822.SIZE BODY.PEEK[])",
                    )
                    .await?;
                let mut stream = std::pin::pin!(stream);
                while let Some(f) = stream.try_next().await? {
                    if let Some(r) = take_fetch(&[uid], &f, &listed) {
                        raw = Some(r);
                    }
                }
                Ok::<(), async_imap::error::Error>(())
            }
            .await;
            fetched.map_err(protocol("uid fetch", t))?;
            let Some(raw) = raw else {
                continue;
            };
            // frontdesk's own mail stays accounted for as it is
            let mut own = Vec::new();
            let Some(m) = self.normalize(folder, uid_validity, raw, &mut own) else {
                continue;
            };
            let new = self
                .store
                .imap_release_quarantined(&folder.name, uid_validity, uid, &m, Utc::now())
                .await?;
            added += u64::from(new);
            info!(source = %self.name, folder = %folder.name, uid, "quarantined message fetched on a retry and stored");
        }
        Ok(added)
    }

    /// First run: the backfill setting decides where the cursor starts; what it skips is counted.
    /// Returns the cursor and the folder's listing it was decided on.
    async fn first_run(
        &self,
        session: &mut Session,
        folder: &Folder,
        uid_validity: u32,
    ) -> Result<(ImapCursor, Vec<Listed>), ImapError> {
        let now = Utc::now();
        let cutoff = match self.cfg.backfill {
            Backfill::All => None,
            Backfill::None => Some(now),
            Backfill::Within(d) => {
                Some(now - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX))
            }
        };
        // without a cutoff no date is compared: the fetch reads each one with its body
        let dates = match cutoff {
            Some(_) => ListDates::With,
            None => ListDates::Without,
        };
        let listed = list(session, "1:*", dates, self.cfg.timeout).await?;
        let floor = match cutoff {
            None => 0,
            Some(cutoff) => listed
                .iter()
                .find(|l| l.internal_date.is_some_and(|d| d >= cutoff))
                .map_or_else(|| listed.last().map_or(0, |l| l.uid), |l| l.uid - 1),
        };
        let skipped = listed.iter().filter(|l| l.uid <= floor).count() as u64;
        let cursor = ImapCursor {
            uid_validity,
            last_uid: floor,
            backfill_floor: floor,
            backfill_skipped: skipped,
            backfill_cutoff: cutoff,
        };
        self.store
            .commit_imap_batch(&self.name, &folder.name, Vec::new(), &[], &cursor, now)
            .await?;
        info!(
            source = %self.name,
            folder = %folder.name,
            uid_validity,
            backfill_floor = floor,
            skipped,
            "first sync of folder"
        );
        Ok((cursor, listed))
    }

    /// UIDVALIDITY changed: enumerate the folder, match every message against what is stored by
    /// fingerprint, record matches (and old messages below the backfill cutoff) in ONE transaction
    /// with the new cursor at 0; the normal pass then fetches only what is missing.
    async fn uid_validity_changed(
        &self,
        session: &mut Session,
        folder: &Folder,
        old: ImapCursor,
        uid_validity: u32,
        report: &mut FolderReport,
    ) -> Result<ImapCursor, ImapError> {
        let t = self.cfg.timeout;
        let now = Utc::now();
        // headers in chunks, so a large folder never sits in memory at once
        let listed = list(session, "1:*", ListDates::With, t).await?;
        let mut server: Vec<(u32, Option<String>, Option<DateTime<Utc>>)> =
            Vec::with_capacity(listed.len());
        for chunk in listed.chunks(500) {
            let uids: Vec<u32> = chunk.iter().map(|l| l.uid).collect();
            let fetches: Vec<Fetch> = session
                .uid_fetch(uid_set(&uids), "(UID BODY.PEEK[HEADER])")
                .await
                .map_err(protocol("uid fetch (fingerprint)", t))?
                .try_collect()
                .await
                .map_err(protocol("uid fetch (fingerprint)", t))?;
            for l in chunk {
                let id = fetches
                    .iter()
                    .find(|f| f.uid == Some(l.uid))
                    .and_then(|f| f.header())
                    .and_then(email::message_id_of);
                server.push((l.uid, id, l.internal_date));
            }
        }
        server.sort_by_key(|s| s.0);
        // messages without a Message-ID are fingerprinted by the hash of their bytes
        let hashed = server.iter().filter(|s| s.1.is_none()).count();
        for entry in server.iter_mut().filter(|s| s.1.is_none()) {
            let f: Vec<Fetch> = session
                .uid_fetch(entry.0.to_string(), "(UID BODY.PEEK[])")
                .await
                .map_err(protocol("uid fetch (fingerprint)", t))?
                .try_collect()
                .await
                .map_err(protocol("uid fetch (fingerprint)", t))?;
            entry.1 = f
                .iter()
                .find(|f| f.uid == Some(entry.0))
                .and_then(|f| f.body())
                .map(email::fingerprint);
        }
        // fingerprints missing from a cut answer would be fetched again as new messages
        confirm_alive(session, "uid fetch (fingerprint)", t).await?;
        let mut stored = self
            .store
            .imap_folder_fingerprints(&self.name, &folder.name)
            .await?;
        // UIDVALIDITY flapping back (A -> B -> A): what was stored or accounted for under this
        // very UIDVALIDITY before is still there under the same UIDs, so it is neither matched
        // again (it would count twice in the ledger) nor fetched again. Its rows' fingerprints
        // are used up first, so they cannot absorb a match meant for a renumbered copy.
        let earlier = self
            .store
            .imap_known_uids(&self.name, &folder.name, uid_validity)
            .await?;
        let before = server.len();
        server.retain(|(uid, id, _)| {
            if !earlier.contains(uid) {
                return true;
            }
            if let Some(n) = id.as_ref().and_then(|id| stored.get_mut(id)) {
                *n = n.saturating_sub(1);
            }
            false
        });
        let earlier_on_server = before - server.len();
        let mut accounted = Vec::new();
        let mut missing = 0u64;
        for (uid, id, date) in &server {
            let matched = id
                .as_ref()
                .and_then(|id| stored.get_mut(id))
                .filter(|n| **n > 0);
            if let Some(n) = matched {
                *n -= 1;
                accounted.push(AccountedUid {
                    uid: *uid,
                    kind: AccountedKind::Matched,
                    detail: id.clone().unwrap_or_default(),
                    raw: None,
                });
            } else if let (Some(cutoff), Some(date)) = (old.backfill_cutoff, date)
                && *date < cutoff
            {
                accounted.push(AccountedUid {
                    uid: *uid,
                    kind: AccountedKind::Backfill,
                    detail: String::new(),
                    raw: None,
                });
            } else {
                missing += 1;
            }
        }
        let cursor = ImapCursor {
            uid_validity,
            last_uid: 0,
            backfill_floor: 0,
            backfill_skipped: old.backfill_skipped,
            backfill_cutoff: old.backfill_cutoff,
        };
        self.store
            .commit_imap_batch(
                &self.name,
                &folder.name,
                Vec::new(),
                &accounted,
                &cursor,
                now,
            )
            .await?;
        let detail = format!(
            "uidvalidity {} -> {uid_validity}: {} on server ({hashed} without Message-ID, \
             fingerprinted by content hash), {} already stored, {missing} to fetch",
            old.uid_validity,
            server.len() + earlier_on_server,
            earlier_on_server
                + accounted
                    .iter()
                    .filter(|a| a.kind == AccountedKind::Matched)
                    .count()
        );
        warn!(source = %self.name, folder = %folder.name, "{detail}");
        self.store
            .record_source_event(
                &self.name,
                Some(&folder.name),
                "uid_validity_changed",
                &detail,
                now,
            )
            .await?;
        report.accounted += accounted.len() as u64;
        Ok(cursor)
    }

    /// Fetches `todo` (all UIDs of one batch not yet known) for a commit with the cursor at
    /// `last`. A UID failing on its own `POISON_ATTEMPTS` times is quarantined so it cannot
    /// stall the folder.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_batch(
        &self,
        session: &mut Session,
        folder: &Folder,
        uid_validity: u32,
        todo: &[Listed],
        cursor: &ImapCursor,
        last: u32,
        poison: &mut PoisonTracker,
    ) -> Result<Fetched, ImapError> {
        let t = self.cfg.timeout;
        let (wanted, mut accounted) = self.fetchable(folder, todo, poison);
        let mut messages = Vec::with_capacity(wanted.len());
        let mut answered = HashSet::new();
        // `sync_folder` hands a batch that failed before over one UID at a time
        if !wanted.is_empty() {
            // each response's body is copied out as it streams in and the response dropped:
            // async-imap keeps a buffer per response
            let fetched = async {
                let stream = session
                    .uid_fetch(
                        uid_set(&wanted),
                        "(UID INTERNALDATE RFC822.SIZE BODY.PEEK[])",
                    )
                    .await?;
                let mut stream = std::pin::pin!(stream);
                while let Some(f) = stream.try_next().await? {
                    // normalized as it arrives: the parsing overlaps waiting for the next bytes,
                    // and the commit stage is left with the store's work only
                    if let Some(raw) = take_fetch(&wanted, &f, todo) {
                        drop(f);
                        answered.insert(raw.uid);
                        if let Some(m) = self.normalize(folder, uid_validity, raw, &mut accounted) {
                            messages.push(m);
                        }
                    }
                }
                Ok::<(), async_imap::error::Error>(())
            }
            .await;
            if let Err(e) = fetched {
                let err = protocol("uid fetch", t)(e);
                self.fetch_failed(
                    poison,
                    folder,
                    uid_validity,
                    &blamed(&wanted, &answered),
                    &err,
                )
                .await;
                return Err(err);
            }
            let missing: Vec<u32> = wanted
                .iter()
                .copied()
                .filter(|u| !answered.contains(u))
                .collect();
            self.check_unanswered(session, folder, uid_validity, missing, poison)
                .await?;
        }
        // UIDs the server did not return were expunged meanwhile: nothing left to ingest
        for l in todo {
            poison.clear(&folder.name, l.uid);
        }
        let next = ImapCursor {
            last_uid: last.max(cursor.last_uid),
            uid_validity,
            ..*cursor
        };
        Ok(Fetched {
            messages,
            accounted,
            next,
            messages_listed: 0,
        })
    }

    /// Fetches several batches with ONE `UID FETCH` and hands each to the commit stage as soon as
    /// all of its messages have arrived, in order, each with its own cursor: Dovecot streams the
    /// whole run without waiting for a command per batch (a round trip and a fetch start-up each,
    /// during which both sides idled), while memory stays bounded by the batches.
    ///
    /// `run` holds per batch: the UIDs to fetch, the batch's last listed UID (its cursor) and how
    /// many listed UIDs it covers. A batch whose UIDs do not all arrive is settled after the
    /// FETCH ends, the way `fetch_batch` settles its batch (`check_unanswered`).
    ///
    /// The folder's lease is checked before each batch is handed over, as `sync_folder` checks
    /// it before each batch it fetches alone. Once it is lost nothing more is committed: the rest
    /// of the response is read and dropped (the session stays usable for the other folders) and
    /// `report.lease_lost` is set.
    #[allow(clippy::too_many_arguments)]
    async fn stream_run(
        &self,
        session: &mut Session,
        lease: &mut Lease,
        folder: &Folder,
        uid_validity: u32,
        run: Vec<(Vec<Listed>, u32, u64)>,
        cursor: &mut ImapCursor,
        poison: &mut PoisonTracker,
        pipe: &mut CommitPipeline,
        report: &mut FolderReport,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<(), ImapError> {
        let t = self.cfg.timeout;
        struct Pending {
            todo: Vec<Listed>,
            wanted: Vec<u32>,
            last: u32,
            listed: u64,
            outstanding: usize,
            fetched: Fetched,
        }
        let mut pending: Vec<Pending> = Vec::with_capacity(run.len());
        let mut batch_of: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
        let mut all_wanted = Vec::new();
        for (todo, last, listed) in run {
            let (wanted, accounted) = self.fetchable(folder, &todo, poison);
            batch_of.extend(wanted.iter().map(|u| (*u, pending.len())));
            all_wanted.extend_from_slice(&wanted);
            pending.push(Pending {
                outstanding: wanted.len(),
                fetched: Fetched {
                    messages: Vec::with_capacity(wanted.len()),
                    accounted,
                    next: *cursor,
                    messages_listed: listed,
                },
                todo,
                wanted,
                last,
                listed,
            });
        }
        let mut answered: HashSet<u32> = HashSet::new();
        let mut ready = 0;
        // hands over every batch at the front whose messages are all in, in order, while the
        // lease holds
        macro_rules! hand_off_ready {
            () => {
                while !report.lease_lost && ready < pending.len() && pending[ready].outstanding == 0
                {
                    if lease.check().await.is_err() {
                        report.lease_lost = true;
                        break;
                    }
                    let p = &mut pending[ready];
                    let mut fetched = std::mem::replace(
                        &mut p.fetched,
                        Fetched {
                            messages: Vec::new(),
                            accounted: Vec::new(),
                            next: *cursor,
                            messages_listed: 0,
                        },
                    );
                    for l in &p.todo {
                        poison.clear(&folder.name, l.uid);
                    }
                    let next = ImapCursor {
                        last_uid: p.last.max(cursor.last_uid),
                        uid_validity,
                        ..*cursor
                    };
                    fetched.next = next;
                    fetched.messages_listed = p.listed;
                    *cursor = next;
                    ready += 1;
                    pipe.hand_over(self, folder, fetched, report, progress)
                        .await?;
                }
            };
        }
        pipe.started = std::time::Instant::now();
        if !all_wanted.is_empty() {
            let streamed = async {
                let stream = session
                    .uid_fetch(
                        uid_set(&all_wanted),
                        "(UID INTERNALDATE RFC822.SIZE BODY.PEEK[])",
                    )
                    .await
                    .map_err(protocol("uid fetch", t))?;
                let mut stream = std::pin::pin!(stream);
                while let Some(f) = stream.try_next().await.map_err(protocol("uid fetch", t))? {
                    // an unsolicited FETCH (a flag change by another client) or one without a
                    // body is left out; the UID then counts as not answered
                    let Some(&i) = f.uid.and_then(|uid| batch_of.get(&uid)) else {
                        continue;
                    };
                    let Some(raw) = fetched_body(&f, &pending[i].todo) else {
                        continue;
                    };
                    drop(f);
                    if report.lease_lost {
                        continue; // read to the end, committed by the lease's next holder
                    }
                    if !answered.insert(raw.uid) {
                        continue;
                    }
                    let p = &mut pending[i];
                    if let Some(m) =
                        self.normalize(folder, uid_validity, raw, &mut p.fetched.accounted)
                    {
                        p.fetched.messages.push(m);
                    }
                    p.outstanding -= 1;
                    hand_off_ready!();
                }
                Ok::<(), ImapError>(())
            }
            .await;
            if let Err(err) = streamed {
                // the messages of the batches not handed over yet are fetched again; the one in
                // flight counts a failure (a store error is not its)
                let unsettled: Vec<u32> = pending[ready..]
                    .iter()
                    .flat_map(|p| p.wanted.iter().copied())
                    .collect();
                if !matches!(err, ImapError::Store(_)) {
                    let blamed = blamed(&unsettled, &answered);
                    self.fetch_failed(poison, folder, uid_validity, &blamed, &err)
                        .await;
                }
                return Err(err);
            }
        }
        // the FETCH is over: what did not arrive is settled batch by batch, in order
        while !report.lease_lost && ready < pending.len() {
            let missing: Vec<u32> = pending[ready]
                .wanted
                .iter()
                .copied()
                .filter(|u| !answered.contains(u))
                .collect();
            self.check_unanswered(session, folder, uid_validity, missing, poison)
                .await?;
            pending[ready].outstanding = 0;
            hand_off_ready!();
        }
        Ok(())
    }

    /// UIDs the server sent no body for: fine if it no longer lists them (expunged meanwhile),
    /// else an error, counted against those UIDs.
    ///
    /// A UID without its body is expunged only if the server says so: async-imap ends a FETCH
    /// quietly on a tagged NO and on a closed connection, and Dovecot answers NO and hangs up
    /// when it cannot read one message file, so taking silence for an expunge would skip the
    /// rest of the batch for good.
    async fn check_unanswered(
        &self,
        session: &mut Session,
        folder: &Folder,
        uid_validity: u32,
        missing: Vec<u32>,
        poison: &mut PoisonTracker,
    ) -> Result<(), ImapError> {
        if missing.is_empty() {
            return Ok(());
        }
        let t = self.cfg.timeout;
        // a search cut by a closed connection also ends quietly (with nothing found), and
        // so does `noop()`: a NOOP whose tagged OK is required (EOF is ConnectionLost)
        // after the search means its answer came from a live session
        let checked = async {
            let present =
                checked_uid_search(session, &format!("UID {}", uid_set(&missing))).await?;
            session.run_command_and_check_ok("NOOP").await?;
            Ok::<_, async_imap::error::Error>(present)
        }
        .await;
        let err = match checked {
            Ok(present) => {
                let kept: Vec<u32> = missing
                    .iter()
                    .copied()
                    .filter(|u| present.contains(u))
                    .collect();
                (!kept.is_empty()).then(|| {
                    (
                        kept.clone(),
                        ImapError::Protocol {
                            what: "uid fetch",
                            reason: format!(
                                "the server sent no body for uid {} and still lists it",
                                uid_set(&kept)
                            ),
                        },
                    )
                })
            }
            Err(e) => {
                let err = match protocol("uid search", t)(e) {
                    ImapError::Protocol { reason, .. } => ImapError::Protocol {
                        what: "uid fetch",
                        reason: format!(
                            "the server sent no body for uid {}, then failed when asked \
                                 whether it still exists: {reason}",
                            uid_set(&missing)
                        ),
                    },
                    other => other,
                };
                Some((missing.clone(), err))
            }
        };
        if let Some((uids, err)) = err {
            self.fetch_failed(poison, folder, uid_validity, &uids, &err)
                .await;
            return Err(err);
        }
        Ok(())
    }

    /// Splits `todo` into the UIDs to fetch and those quarantined without a fetch: too large, or
    /// failed `POISON_ATTEMPTS` times already.
    fn fetchable(
        &self,
        folder: &Folder,
        todo: &[Listed],
        poison: &PoisonTracker,
    ) -> (Vec<u32>, Vec<AccountedUid>) {
        let mut wanted = Vec::new();
        let mut accounted = Vec::new();
        for l in todo {
            let detail = if u64::from(l.size) > self.cfg.max_message_size {
                too_large_detail(l.size)
            } else if poison.attempts(&folder.name, l.uid) >= POISON_ATTEMPTS {
                poison.last_error(&folder.name, l.uid)
            } else {
                wanted.push(l.uid);
                continue;
            };
            accounted.push(AccountedUid {
                uid: l.uid,
                kind: AccountedKind::Quarantined,
                detail,
                raw: None,
            });
        }
        (wanted, accounted)
    }

    /// Counts a failed fetch of `uids`, in memory and in the store (so `sync` runs add up).
    async fn fetch_failed(
        &self,
        poison: &mut PoisonTracker,
        folder: &Folder,
        uid_validity: u32,
        uids: &[u32],
        err: &ImapError,
    ) {
        let reason = err.to_string();
        for uid in uids {
            poison.record(&folder.name, *uid, &reason);
        }
        if let Err(e) = self
            .store
            .record_imap_poison(
                &self.name,
                &folder.name,
                uid_validity,
                uids,
                &reason,
                Utc::now(),
            )
            .await
        {
            warn!(source = %self.name, folder = %folder.name, error = %e, "cannot record the failed fetch");
        }
    }

    /// Normalizes one fetched message; frontdesk's own mail is accounted for instead.
    fn normalize(
        &self,
        folder: &Folder,
        uid_validity: u32,
        raw: RawFetched,
        accounted: &mut Vec<AccountedUid>,
    ) -> Option<Message> {
        let origin = Origin::Imap {
            folder: folder.name.clone(),
            uid_validity,
            uid: raw.uid,
        };
        let mut m = email::normalize(&self.name, origin, raw.bytes, raw.received_at);
        if m.automation == Automation::Frontdesk {
            // the loop guard: our own digests and alerts are never client messages
            accounted.push(AccountedUid {
                uid: raw.uid,
                kind: AccountedKind::Own,
                detail: m.message_id.clone().unwrap_or_default(),
                raw: None,
            });
            return None;
        }
        m.direction = self.direction(folder, &m);
        Some(m)
    }

    /// Commits a fetched batch with its cursor in one transaction.
    async fn commit_fetched(
        &self,
        folder: &Folder,
        fetched: Fetched,
        after: Option<oneshot::Receiver<bool>>,
        committed: oneshot::Sender<bool>,
    ) -> Result<BatchCounts, ImapError> {
        let Fetched {
            messages,
            accounted,
            next,
            messages_listed: count,
        } = fetched;
        let started = std::time::Instant::now();
        let stored = messages.len();
        // overlaps the previous batch's commit
        let staged = self.store.stage_imap_batch(messages).await;
        let stage_ms = started.elapsed().as_millis() as u64;
        // a predecessor that failed (or whose task died) drops its sender: false
        if let Some(after) = after
            && !after.await.unwrap_or(false)
        {
            return Err(ImapError::Protocol {
                what: "commit",
                reason: "an earlier batch of the folder did not commit".into(),
            });
        }
        let started = std::time::Instant::now();
        let out = self
            .store
            .commit_staged_imap_batch(
                &self.name,
                &folder.name,
                staged?,
                &accounted,
                &next,
                Utc::now(),
            )
            .await?;
        // a receiver gone (its pass ended early) has nothing to wait for
        let _ = committed.send(true);
        debug!(
            folder = %folder.name,
            messages = stored,
            stage_ms,
            store_ms = started.elapsed().as_millis() as u64,
            "batch committed"
        );
        for a in accounted
            .iter()
            .filter(|a| a.kind == AccountedKind::Quarantined)
        {
            warn!(source = %self.name, folder = %folder.name, uid = a.uid, reason = %a.detail, "message quarantined");
            self.store
                .record_source_event(
                    &self.name,
                    Some(&folder.name),
                    "quarantined",
                    &format!("uid {}: {}", a.uid, a.detail),
                    Utc::now(),
                )
                .await?;
        }
        Ok(BatchCounts {
            inserted: out.inserted,
            duplicates: out.duplicates,
            accounted: accounted.len() as u64,
            messages: count,
        })
    }

    /// Compares the folder on the server with the store and saves the figures: UIDs above the
    /// backfill floor and up to the cursor that are neither stored nor accounted for are
    /// unaccounted (must be 0). UIDs above the cursor are pending, not lost.
    ///
    /// `selected`: the folder is the session's selected mailbox, opened by this session's pass
    /// with that UIDVALIDITY (which cannot change while it stays selected), so it is not
    /// examined again. Selecting it anew after a pass that fetched new mail made Dovecot write
    /// its index first: 14-18 ms of a ~100 ms incremental `frontdesk sync`.
    pub async fn reconcile(
        &self,
        session: &mut Session,
        folder: &Folder,
        selected: Option<u32>,
    ) -> Result<Option<u64>, ImapError> {
        let t = self.cfg.timeout;
        let uid_validity = match selected {
            Some(v) => v,
            None => {
                let mailbox = session
                    .examine(&folder.name)
                    .await
                    .map_err(protocol("examine", t))?;
                // async-imap ends EXAMINE quietly too when the connection closes: no
                // UIDVALIDITY then
                mailbox.uid_validity.ok_or(ImapError::Protocol {
                    what: "examine",
                    reason: format!("folder {} has no UIDVALIDITY", folder.name),
                })?
            }
        };
        let Some(cursor) = self.store.imap_cursor(&self.name, &folder.name).await? else {
            return Ok(None);
        };
        if uid_validity != cursor.uid_validity {
            return Ok(None); // the next pass reconciles the UIDVALIDITY change first
        }
        let server = checked_uid_search(session, "ALL")
            .await
            .map_err(protocol("uid search", t))?;
        confirm_alive(session, "uid search", t).await?;
        let known = self
            .store
            .imap_known_uids(&self.name, &folder.name, cursor.uid_validity)
            .await?;
        let unaccounted = server
            .iter()
            .filter(|u| **u > cursor.backfill_floor && **u <= cursor.last_uid && !known.contains(u))
            .count() as u64;
        self.store
            .save_imap_reconciliation(
                &self.name,
                &folder.name,
                server.len() as u64,
                unaccounted,
                Utc::now(),
            )
            .await?;
        if unaccounted > 0 {
            warn!(source = %self.name, folder = %folder.name, unaccounted, "messages on the server are missing from the queue");
        }
        Ok(Some(unaccounted))
    }
}

/// One fetched message before normalization.
#[derive(Debug)]
struct RawFetched {
    uid: u32,
    received_at: DateTime<Utc>,
    bytes: Vec<u8>,
}

/// A fetched and normalized batch on its way to the store.
#[derive(Debug)]
struct Fetched {
    messages: Vec<Message>,
    accounted: Vec<AccountedUid>,
    next: ImapCursor,
    /// How many listed UIDs the batch covers (progress).
    messages_listed: u64,
}

/// What one committed batch did.
#[derive(Debug, Clone, Copy)]
struct BatchCounts {
    inserted: u64,
    duplicates: u64,
    accounted: u64,
    messages: u64,
}

/// The commit stages of a folder's pass: while batch N's rows commit, batch N+1 stages its bodies
/// (`Store::stage_imap_batch`) and batch N+2 is fetched. At most two batches are in flight, and
/// their rows commit in order: each carries the cursor past it, so a batch whose predecessor did
/// not commit does not commit either.
struct CommitPipeline {
    /// The batches handed over and not yet counted, oldest first.
    inflight: VecDeque<tokio::task::JoinHandle<Result<BatchCounts, ImapError>>>,
    /// Told whether the newest batch handed over committed its rows (the next one waits for it).
    committed: Option<oneshot::Receiver<bool>>,
    /// Listed UIDs handled so far, and in all (progress).
    done: u64,
    total: u64,
    /// When fetching the next batch began (the stage timings of the debug log).
    started: std::time::Instant,
}

impl CommitPipeline {
    /// Batches in flight at most: one committing its rows, one staging its bodies.
    const DEPTH: usize = 2;

    /// An empty pipeline for `total` listed UIDs.
    fn new(total: u64) -> CommitPipeline {
        CommitPipeline {
            inflight: VecDeque::new(),
            committed: None,
            done: 0,
            total,
            started: std::time::Instant::now(),
        }
    }

    fn report_progress(&self, folder: &Folder, progress: &mut (dyn FnMut(Progress) + Send)) {
        progress(Progress {
            folder: folder.name.clone(),
            done: self.done,
            total: self.total,
        });
    }

    /// Waits for every batch in flight and counts the ones that committed; the first error wins
    /// (a later batch's is only that its predecessor failed).
    async fn settle(
        &mut self,
        folder: &Folder,
        report: &mut FolderReport,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<(), ImapError> {
        let mut first_err = None;
        while !self.inflight.is_empty() {
            if let Err(e) = self.settle_oldest(folder, report, progress).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Waits for the oldest batch in flight, if any, and counts it.
    async fn settle_oldest(
        &mut self,
        folder: &Folder,
        report: &mut FolderReport,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<(), ImapError> {
        let Some(h) = self.inflight.pop_front() else {
            return Ok(());
        };
        let c = join_commit(h).await?;
        report.inserted += c.inserted;
        report.duplicates += c.duplicates;
        report.accounted += c.accounted;
        self.done += c.messages;
        self.report_progress(folder, progress);
        Ok(())
    }

    /// Starts committing a fetched batch once there is room in the pipeline.
    async fn hand_over(
        &mut self,
        ctx: &SourceCtx,
        folder: &Folder,
        fetched: Fetched,
        report: &mut FolderReport,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<(), ImapError> {
        let fetch_ms = self.started.elapsed().as_millis() as u64;
        while self.inflight.len() >= Self::DEPTH {
            if let Err(e) = self.settle_oldest(folder, report, progress).await {
                // nothing after a failed batch commits: the rest is waited for, then the error
                let _ = self.settle(folder, report, progress).await;
                return Err(e);
            }
        }
        debug!(
            folder = %folder.name,
            messages = fetched.messages_listed,
            fetch_ms,
            commit_wait_ms = (self.started.elapsed().as_millis() as u64).saturating_sub(fetch_ms),
            "batch fetched"
        );
        let me = ctx.clone();
        let f = folder.clone();
        let after = self.committed.take();
        let (committed, next_waits) = oneshot::channel();
        self.committed = Some(next_waits);
        self.inflight.push_back(tokio::spawn(async move {
            me.commit_fetched(&f, fetched, after, committed).await
        }));
        self.started = std::time::Instant::now();
        Ok(())
    }
}

/// Awaits an in-flight commit; a panicked commit task becomes an error, never a lost batch
/// (its transaction did not commit, and the cursor did not move).
async fn join_commit(
    h: tokio::task::JoinHandle<Result<BatchCounts, ImapError>>,
) -> Result<BatchCounts, ImapError> {
    h.await.unwrap_or_else(|e| {
        Err(ImapError::Protocol {
            what: "commit",
            reason: e.to_string(),
        })
    })
}

/// Keeps the body of one FETCH response; a response without one is left out (the UID then
/// counts as not answered).
fn take_fetch(group: &[u32], f: &Fetch, listed: &[Listed]) -> Option<RawFetched> {
    // an unsolicited FETCH (flag change by another client) is not one of the group's
    fetched_body(f, listed).filter(|r| group.contains(&r.uid))
}

/// The quarantine detail of a message refused for its announced size; `too_large_size` reads
/// the size back when the limit may have been raised.
fn too_large_detail(size: u32) -> String {
    format!("too large: {size} bytes")
}

/// The size named by a `too_large_detail`.
fn too_large_size(detail: &str) -> Option<u64> {
    detail
        .strip_prefix("too large: ")?
        .strip_suffix(" bytes")?
        .parse()
        .ok()
}

/// The UID, receipt time and a copy of the body of one FETCH response, if it has them. The
/// receipt time is the INTERNALDATE the listing read for the UID (`listed`, sorted by UID; it
/// never changes for a UID), else the response's own.
fn fetched_body(f: &Fetch, listed: &[Listed]) -> Option<RawFetched> {
    let uid = f.uid?;
    let body = f.body()?;
    let listed_date = listed
        .binary_search_by_key(&uid, |l| l.uid)
        .ok()
        .and_then(|i| listed[i].internal_date);
    Some(RawFetched {
        uid,
        received_at: listed_date
            .or_else(|| f.internal_date().map(|d| d.with_timezone(&Utc)))
            .unwrap_or_else(Utc::now),
        bytes: body.to_vec(),
    })
}

/// How many of `batches` (at least one) the next `UID FETCH` covers: consecutive batches up to
/// `FETCH_RUN_BYTES`, stopping after a batch with a UID that failed before (`fetch_batch` then
/// fetches that batch alone, one UID at a time where needed).
fn fetch_run_len(batches: &[&[Listed]], folder: &str, poison: &PoisonTracker) -> usize {
    let mut bytes = 0u64;
    let mut n = 0;
    for b in batches {
        let size: u64 = b.iter().map(|l| u64::from(l.size)).sum();
        let clean = b.iter().all(|l| poison.attempts(folder, l.uid) == 0);
        if n > 0 && (!clean || bytes + size > FETCH_RUN_BYTES) {
            break;
        }
        n += 1;
        bytes += size;
        if !clean {
            break;
        }
    }
    n.max(1)
}

/// The UIDs a failed FETCH of `wanted` counts against: the first one that did not arrive, or all
/// of `wanted` when every one arrived and the command still failed.
///
/// Servers answer a UID FETCH in UID order, so the first missing UID was in flight when the
/// command failed: the message that broke it, or one a network fault happened to cut. Blaming
/// every UID not yet sent made one cut connection during a large sync send the whole rest of
/// the folder down the one-UID-at-a-time path (a round trip each).
fn blamed(wanted: &[u32], answered: &HashSet<u32>) -> Vec<u32> {
    match wanted.iter().find(|u| !answered.contains(u)) {
        Some(u) => vec![*u],
        None => wanted.to_vec(),
    }
}

/// Splits listed messages into batches of at most `max` messages and about `MAX_BATCH_BYTES`.
fn batches(listed: &[Listed], max: usize) -> Vec<&[Listed]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, l) in listed.iter().enumerate() {
        let n = i - start;
        if n > 0 && (n >= max || bytes + u64::from(l.size) > MAX_BATCH_BYTES) {
            out.push(&listed[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += u64::from(l.size);
    }
    if start < listed.len() {
        out.push(&listed[start..]);
    }
    out
}

/// One pass over a source: connect, sync every folder, reconcile, log out.
pub async fn sync_once(
    ctx: &SourceCtx,
    poison: &mut PoisonTracker,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Vec<FolderReport>, ImapError> {
    sync_once_over(ctx, None, poison, progress).await
}

/// [`sync_once`] over a connection begun earlier, when it is this source's (else it connects).
pub async fn sync_once_over(
    ctx: &SourceCtx,
    early: Option<EarlyConnection>,
    poison: &mut PoisonTracker,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Vec<FolderReport>, ImapError> {
    let early = early.filter(|e| e.source == ctx.name);
    let mut leases = FolderLeases::new(ctx);
    if leases.take_free().await == 0 {
        // Another replica holds every folder and syncs them; nothing to do here (an early
        // connection is dropped, which closes it).
        return Ok(Vec::new());
    }
    let result = async {
        let (mut session, _) = match early {
            Some(early) => early.finish().await?,
            None => connect(&ctx.name, &ctx.cfg).await?,
        };
        let reports = ctx
            .sync_folders(&mut session, &mut leases, poison, progress)
            .await?;
        // the folder the pass opened last is still selected: reconciled first, as it is
        let selected = reports
            .iter()
            .rev()
            .find_map(|r| Some((r.folder.as_str(), r.uid_validity?)));
        let held = ctx.cfg.folders.iter().filter(|f| leases.is_held(&f.name));
        let (open, others): (Vec<&Folder>, Vec<&Folder>) =
            held.partition(|f| selected.is_some_and(|(name, _)| name == f.name));
        for folder in open {
            ctx.reconcile(&mut session, folder, selected.map(|(_, v)| v))
                .await?;
        }
        for folder in others {
            ctx.reconcile(&mut session, folder, None).await?;
        }
        let _ = session.logout().await;
        Ok(reports)
    }
    .await;
    leases.release_all().await;
    record_health(ctx, result.as_ref().err()).await;
    result
}

/// Reconciles every folder of a source against the server (for `frontdesk sources`).
pub async fn reconcile_source(ctx: &SourceCtx) -> Result<(), ImapError> {
    let (mut session, _) = connect(&ctx.name, &ctx.cfg).await?;
    for folder in &ctx.cfg.folders {
        ctx.reconcile(&mut session, folder, None).await?;
    }
    let _ = session.logout().await;
    Ok(())
}

async fn record_health(ctx: &SourceCtx, error: Option<&ImapError>) {
    let now = Utc::now();
    let result = match error {
        None => ctx.store.source_succeeded(&ctx.name, now).await,
        Some(e) => {
            let after = if e.is_config_problem() { 1 } else { 3 };
            ctx.store
                .source_failed(&ctx.name, &e.to_string(), after, now)
                .await
        }
    };
    if let Err(e) = result {
        warn!(source = %ctx.name, error = %e, "cannot record source health");
    }
}

/// Exponential backoff with jitter between `BACKOFF_MIN` and `BACKOFF_MAX`.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The delay before the next attempt: uniformly random in [d/2, d], d doubling each time.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to the minimum after a success.
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Why an IDLE wait ended.
enum Wake {
    /// New data (or it is time to look again).
    Check,
    /// Shutdown was requested.
    Shutdown,
}

/// Drains unsolicited responses gathered during earlier commands; true if mail may have arrived.
/// The channel is bounded and drops on overflow (stack.md §5.2), so any EXISTS means "look".
fn drain_unsolicited(session: &mut Session) -> bool {
    let mut new_mail = false;
    while let Ok(r) = session.unsolicited_responses.try_recv() {
        if matches!(
            r,
            UnsolicitedResponse::Exists(_) | UnsolicitedResponse::Recent(_)
        ) {
            new_mail = true;
        }
    }
    new_mail
}

/// Waits for new mail in `folder` with IDLE, at most `segment`; the session comes back ready.
async fn idle_wait(
    mut session: Session,
    folder: &str,
    last_uid: u32,
    segment: Duration,
    t: Duration,
    shutdown: &CancellationToken,
) -> Result<(Session, Wake), ImapError> {
    session
        .examine(folder)
        .await
        .map_err(protocol("examine", t))?;
    if drain_unsolicited(&mut session) {
        return Ok((session, Wake::Check));
    }
    // mail that arrived after the last listing is in no EXISTS we will see: look once more
    let newer = list_uids_above(&mut session, last_uid, t).await?;
    if newer {
        return Ok((session, Wake::Check));
    }
    let unsolicited = session.unsolicited_responses.clone();
    let mut idle = session.idle();
    tokio::time::timeout(t, idle.init())
        .await
        .map_err(|_| ImapError::Timeout {
            what: "idle",
            secs: t.as_secs(),
        })?
        .map_err(protocol("idle", t))?;
    // an EXISTS sent while IDLE started goes to the unsolicited channel, not to the wait below
    let mut arrived = false;
    while let Ok(r) = unsolicited.try_recv() {
        arrived |= matches!(
            r,
            UnsolicitedResponse::Exists(_) | UnsolicitedResponse::Recent(_)
        );
    }
    // keepalives come every few minutes at most: silence is handled by IDLE_SILENCE instead
    set_read_timeout(idle.as_mut(), None);
    let wake = if arrived {
        Wake::Check
    } else {
        let (wait, _stop) = idle.wait_with_timeout(IDLE_SILENCE);
        tokio::select! {
            r = wait => { r.map_err(protocol("idle", t))?; Wake::Check }
            _ = tokio::time::sleep(segment) => Wake::Check,
            _ = shutdown.cancelled() => Wake::Shutdown,
        }
    };
    set_read_timeout(idle.as_mut(), Some(t));
    // DONE must be answered within the read timeout: this is what detects a dead link
    let session = idle.done().await.map_err(protocol("idle done", t))?;
    Ok((session, wake))
}

/// True when the selected folder has a UID above `last_uid` (`UID FETCH n:*`, filtered).
async fn list_uids_above(
    session: &mut Session,
    last_uid: u32,
    t: Duration,
) -> Result<bool, ImapError> {
    let fetches: Vec<Fetch> = session
        .uid_fetch(format!("{}:*", last_uid.saturating_add(1)), "(UID)")
        .await
        .map_err(protocol("uid fetch", t))?
        .try_collect()
        .await
        .map_err(protocol("uid fetch", t))?;
    // "nothing new" from a dead link would put the task into IDLE on it
    confirm_alive(session, "uid fetch", t).await?;
    Ok(fetches.iter().any(|f| f.uid.is_some_and(|u| u > last_uid)))
}

/// The source task of `frontdesk run`: sync, then IDLE (or poll), forever; reconnects with
/// backoff; records health; wakes the core after new rows; stops on `shutdown`.
///
/// With several replicas, only the folders whose lease this replica holds are synced; a replica
/// holding none does not connect and tries the leases again every poll interval, so it takes a
/// folder over within one interval of its holder's death.
pub async fn run(ctx: SourceCtx, core: Arc<Notify>, shutdown: CancellationToken) {
    let mut backoff = Backoff::default();
    let mut poison = PoisonTracker::default();
    let mut leases = FolderLeases::new(&ctx);
    loop {
        if leases.take_free().await == 0 {
            tokio::select! {
                _ = tokio::time::sleep(ctx.cfg.poll_interval) => continue,
                _ = shutdown.cancelled() => break,
            }
        }
        let before = committed_cursors(&ctx).await;
        let result = watch(
            &ctx,
            &mut leases,
            &core,
            &mut poison,
            &mut backoff,
            &shutdown,
        )
        .await;
        let e = match result {
            Ok(Exit::Shutdown) => break,
            Ok(Exit::NoLease) => continue,
            Err(e) => e,
        };
        // a connection that committed something before it failed was not a failed attempt: on
        // a link that drops every few seconds the sync still moves, and backing off further
        // each time would stretch it from minutes to hours
        let after = committed_cursors(&ctx).await;
        let progressed = matches!((&before, &after), (Some(b), Some(a)) if a != b);
        if progressed {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        warn!(
            source = %ctx.name,
            error = %e,
            progressed,
            retry_in_ms = delay.as_millis() as u64,
            "imap source failed; reconnecting"
        );
        record_health(&ctx, Some(&e)).await;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    leases.release_all().await;
}

/// Each folder's committed cursor (UIDVALIDITY, highest UID), to tell whether a connection made
/// progress; `None` when one cannot be read (the store is failing: no progress is claimed).
async fn committed_cursors(ctx: &SourceCtx) -> Option<Vec<Option<(u32, u32)>>> {
    let mut out = Vec::with_capacity(ctx.cfg.folders.len());
    for folder in &ctx.cfg.folders {
        let cursor = ctx.store.imap_cursor(&ctx.name, &folder.name).await.ok()?;
        out.push(cursor.map(|c| (c.uid_validity, c.last_uid)));
    }
    Some(out)
}

/// Why a connection's life ended without an error.
enum Exit {
    /// The daemon is stopping.
    Shutdown,
    /// Every folder lease was lost: wait for one without a connection.
    NoLease,
}

/// One connection's life: returns Ok on shutdown or when no lease is left, Err when the
/// connection failed.
async fn watch(
    ctx: &SourceCtx,
    leases: &mut FolderLeases,
    core: &Notify,
    poison: &mut PoisonTracker,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> Result<Exit, ImapError> {
    let t = ctx.cfg.timeout;
    let (mut session, has_idle) = tokio::select! {
        r = connect(&ctx.name, &ctx.cfg) => r?,
        _ = shutdown.cancelled() => return Ok(Exit::Shutdown),
    };
    info!(source = %ctx.name, idle = has_idle && ctx.cfg.idle, "imap connected");
    let idle_folder = ctx
        .cfg
        .folders
        .iter()
        .find(|f| f.role == FolderRole::Inbound)
        .or(ctx.cfg.folders.first())
        .map(|f| f.name.clone());
    let mut last_reconcile: Option<tokio::time::Instant> = None;
    let mut no_progress = |_: Progress| {};
    loop {
        if leases.take_free().await == 0 {
            let _ = tokio::time::timeout(t, session.logout()).await;
            return Ok(Exit::NoLease);
        }
        let reports = tokio::select! {
            r = ctx.sync_folders(&mut session, leases, poison, &mut no_progress) => r?,
            _ = shutdown.cancelled() => return Ok(Exit::Shutdown),
        };
        if reports.iter().any(|r| r.inserted > 0) {
            core.notify_one();
        }
        if last_reconcile.is_none_or(|at| at.elapsed() >= RECONCILE_EVERY) {
            for folder in &ctx.cfg.folders {
                if leases.is_held(&folder.name) {
                    ctx.reconcile(&mut session, folder, None).await?;
                }
            }
            last_reconcile = Some(tokio::time::Instant::now());
        }
        record_health(ctx, None).await;
        backoff.reset();

        // IDLE only on a folder this replica holds; with leases shared between replicas, wake
        // at least every poll interval to prove the leases alive and to try the free ones.
        let idle_folder = idle_folder.as_ref().filter(|f| leases.is_held(f));
        match (idle_folder, has_idle && ctx.cfg.idle) {
            (Some(folder), true) => {
                // with several folders, IDLE watches the inbound one; the others are polled
                let segment = if ctx.cfg.folders.len() > 1 || ctx.leases.shared() {
                    ctx.cfg.poll_interval.min(IDLE_REFRESH)
                } else {
                    IDLE_REFRESH
                };
                let last_uid = ctx
                    .store
                    .imap_cursor(&ctx.name, folder)
                    .await?
                    .map_or(0, |c| c.last_uid);
                let (s, wake) = idle_wait(session, folder, last_uid, segment, t, shutdown).await?;
                session = s;
                if let Wake::Shutdown = wake {
                    let _ = tokio::time::timeout(t, session.logout()).await;
                    return Ok(Exit::Shutdown);
                }
            }
            _ => {
                tokio::select! {
                    _ = tokio::time::sleep(ctx.cfg.poll_interval) => {}
                    _ = shutdown.cancelled() => {
                        let _ = tokio::time::timeout(t, session.logout()).await;
                        return Ok(Exit::Shutdown);
                    }
                }
                // a NOOP keeps the link honest between polls
                session.noop().await.map_err(protocol("noop", t))?;
            }
        }
    }
}

/// The IMAP sources of a config (only `only` when given), ready to sync.
pub fn sources(config: &Config, store: &Store, only: Option<&str>) -> Vec<SourceCtx> {
    let team: Arc<HashSet<String>> = Arc::new(
        config
            .team
            .iter()
            .flat_map(|m| m.email.iter().map(|e| e.to_lowercase()))
            .collect(),
    );
    source_configs(config, only)
        .map(|(name, cfg)| SourceCtx {
            name: name.to_owned(),
            cfg: cfg.clone(),
            team: team.clone(),
            store: store.clone(),
            leases: store.leases(&config.server.replica),
        })
        .collect()
}

/// The names and settings of a config's IMAP sources (only `only` when given), in config order.
pub fn source_configs<'c>(
    config: &'c Config,
    only: Option<&'c str>,
) -> impl Iterator<Item = (&'c str, &'c ImapSource)> {
    config
        .sources
        .iter()
        .filter(move |s| only.is_none_or(|n| n == s.name))
        .filter_map(|s| match &s.kind {
            SourceKind::Imap(cfg) => Some((s.name.as_str(), cfg)),
            SourceKind::Webhook(_) => None,
        })
}

/// A connection being made ahead of its pass ([`connect_early`]).
#[derive(Debug)]
pub struct EarlyConnection {
    /// The source it is for.
    source: String,
    task: tokio::task::JoinHandle<Result<(Session, bool), ImapError>>,
}

/// Starts connecting and logging in to a source at once, so that the work before its pass
/// (opening the store, with its migrations on a fresh database: ~20 ms, about as long as TLS and
/// the login) overlaps the round trips instead of preceding them.
pub fn connect_early(source: &str, cfg: &ImapSource) -> EarlyConnection {
    let (name, cfg) = (source.to_owned(), cfg.clone());
    EarlyConnection {
        source: source.to_owned(),
        task: tokio::spawn(async move { connect(&name, &cfg).await }),
    }
}

impl EarlyConnection {
    /// The session, or why there is none (a connect task that died is an error, not a hang).
    async fn finish(self) -> Result<(Session, bool), ImapError> {
        self.task.await.unwrap_or_else(|e| {
            Err(ImapError::Protocol {
                what: "connect",
                reason: e.to_string(),
            })
        })
    }
}

/// One line of `frontdesk sources`: a folder's ledger with its source's health.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerLine {
    /// The folder's figures (source and folder names included).
    #[serde(flatten)]
    pub folder: FolderLedger,
    /// The source is healthy (no repeated failures since its last success).
    pub healthy: bool,
    /// The source's last successful pass.
    pub last_success: Option<DateTime<Utc>>,
    /// The source's last error.
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_at: Option<DateTime<Utc>>,
    /// Why reconciling against the server failed just now, if it did.
    pub reconcile_error: Option<String>,
    /// The replica syncing the folder now (PostgreSQL); `None` on SQLite, where the daemon
    /// does, or when no replica holds it.
    pub holder: Option<String>,
}

/// Reconciles every IMAP source against its server (errors are reported, not fatal) and returns
/// the ledger with health: the data of `frontdesk sources`.
pub async fn ledger(config: &Config, store: &Store) -> Result<Vec<LedgerLine>, store::Error> {
    let mut errors = std::collections::HashMap::new();
    for ctx in sources(config, store, None) {
        if let Err(e) = reconcile_source(&ctx).await {
            errors.insert(ctx.name.clone(), e.to_string());
        }
    }
    let health = store.source_health().await?;
    let holders = store.lease_holders().await?.unwrap_or_default();
    let lines = store
        .imap_ledger()
        .await?
        .into_iter()
        .map(|folder| {
            let h = health.iter().find(|h| h.source == folder.source);
            LedgerLine {
                healthy: h.is_none_or(|h| h.healthy),
                last_success: h.and_then(|h| h.last_success),
                last_error: h.and_then(|h| h.last_error.clone()),
                last_error_at: h.and_then(|h| h.last_error_at),
                reconcile_error: errors.get(&folder.source).cloned(),
                holder: holders
                    .iter()
                    .find(|h| {
                        h.source.as_deref() == Some(folder.source.as_str())
                            && h.folder.as_deref() == Some(folder.folder.as_str())
                    })
                    .map(|h| h.holder.clone()),
                folder,
            }
        })
        .collect();
    Ok(lines)
}

/// The ledger as aligned text for a terminal.
pub fn ledger_text(lines: &[LedgerLine]) -> String {
    let mut out = format!(
        "{:<16} {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<7} {:<16} {}\n",
        "SOURCE",
        "FOLDER",
        "SERVER",
        "STORED",
        "BACKFILL",
        "QUARANT",
        "OWN",
        "UNACCT",
        "HEALTH",
        "HOLDER",
        "LAST ERROR"
    );
    let n = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for l in lines {
        let f = &l.folder;
        out.push_str(&format!(
            "{:<16} {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<7} {:<16} {}\n",
            f.source,
            f.folder,
            n(f.server_messages),
            f.ingested + f.matched,
            f.skipped_backfill,
            f.quarantined,
            f.own,
            n(f.unaccounted),
            if l.healthy { "ok" } else { "FAILING" },
            l.holder.as_deref().unwrap_or("-"),
            l.reconcile_error
                .as_deref()
                .or(l.last_error.as_deref())
                .unwrap_or("")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_dates_parse_with_either_day_padding() {
        let want = "2025-07-01T08:00:00Z";
        for text in [" 1-Jul-2025 10:00:00 +0200", "01-Jul-2025 10:00:00 +0200"] {
            let got =
                internal_date(text).map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            assert_eq!(got.as_deref(), Some(want), "{text:?}");
        }
        assert_eq!(internal_date("yesterday"), None);
    }

    #[test]
    fn a_too_large_detail_names_its_size_and_nothing_else_reads_as_one() {
        for size in [0, 1, 33_554_433, u32::MAX] {
            assert_eq!(
                too_large_size(&too_large_detail(size)),
                Some(u64::from(size))
            );
        }
        for other in [
            "uid fetch: connection lost",
            "too large: bytes",
            "too large: 12",
            "too large: -1 bytes",
            "literal over the limit",
        ] {
            assert_eq!(too_large_size(other), None, "{other:?}");
        }
    }

    proptest::proptest! {
        /// The hand-read date is chrono's, whenever it reads one; and it reads every valid one.
        #[test]
        fn internal_dates_read_by_hand_are_chronos(
            day in 0u32..40,
            pad in 0u8..3,
            month in proptest::sample::select(vec![
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                "Dec", "jul", "Foo",
            ]),
            year in 0u32..10000,
            hms in (0u32..26, 0u32..62, 0u32..62),
            sign in proptest::sample::select(vec!['+', '-', ' ']),
            zone in (0u32..30, 0u32..70),
        ) {
            let day = match pad {
                0 => format!("{day:02}"),
                1 => format!("{day:>2}"),
                _ => format!("{day}"),
            };
            let text = format!(
                "{day}-{month}-{year:04} {:02}:{:02}:{:02} {sign}{:02}{:02}",
                hms.0, hms.1, hms.2, zone.0, zone.1
            );
            let chrono = DateTime::parse_from_str(text.trim_start(), "%d-%b-%Y %H:%M:%S %z")
                .ok()
                .map(|d| d.with_timezone(&Utc));
            let by_hand = internal_date_fixed(text.trim_start().as_bytes());
            if by_hand.is_some() {
                proptest::prop_assert_eq!(by_hand, chrono, "{}", text);
            }
            // every date chrono reads with a named month, seconds below 60 and a sign is read by
            // hand too (chrono alone reads `jul` and leap seconds)
            if chrono.is_some() && month != "jul" && hms.2 < 60 {
                proptest::prop_assert!(by_hand.is_some(), "{}", text);
            }
            proptest::prop_assert_eq!(internal_date(&text), chrono, "{}", text);
        }
    }

    #[test]
    fn a_fetch_run_stops_at_its_byte_bound_and_at_a_batch_that_failed_before() {
        let l = |uid, size| Listed {
            uid,
            size,
            internal_date: None,
        };
        let mib = 1024 * 1024;
        let a = [l(1, mib), l(2, mib)];
        let b = [l(3, 3 * mib)];
        let c = [l(4, 4 * mib)];
        let d = [l(5, 10)];
        let all: Vec<&[Listed]> = vec![&a, &b, &c, &d];
        let clean = PoisonTracker::default();
        // 2 + 3 MiB fit in 8, the next 4 MiB would make 9
        assert_eq!(fetch_run_len(&all, "INBOX", &clean), 2);
        assert_eq!(fetch_run_len(&all[2..], "INBOX", &clean), 2);
        assert_eq!(fetch_run_len(&all[3..], "INBOX", &clean), 1);
        // a batch bigger than the bound still goes, alone
        let huge = [l(6, 20 * mib)];
        assert_eq!(fetch_run_len(&[&huge[..], &d[..]], "INBOX", &clean), 1);
        let mut failed = PoisonTracker::default();
        failed.record("INBOX", 3, "cut");
        assert_eq!(fetch_run_len(&all, "INBOX", &failed), 1, "stops before it");
        assert_eq!(fetch_run_len(&all[1..], "INBOX", &failed), 1, "alone");
        assert_eq!(fetch_run_len(&all, "Sent", &failed), 2, "per folder");
    }

    #[test]
    fn uid_sets_are_compact() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[42]), "42");
        assert_eq!(uid_set(&[]), "");
        assert_eq!(
            uid_set(&[u32::MAX - 1, u32::MAX]),
            format!("{}:{}", u32::MAX - 1, u32::MAX)
        );
    }

    #[test]
    fn batches_bound_count_and_bytes() {
        let listed: Vec<Listed> = (1..=10)
            .map(|uid| Listed {
                uid,
                size: if uid == 5 { 9 * 1024 * 1024 } else { 100 },
                internal_date: None,
            })
            .collect();
        let b = batches(&listed, 3);
        let uids: Vec<Vec<u32>> = b
            .iter()
            .map(|b| b.iter().map(|l| l.uid).collect())
            .collect();
        assert_eq!(
            uids,
            vec![vec![1, 2, 3], vec![4], vec![5], vec![6, 7, 8], vec![9, 10]]
        );
        assert!(batches(&[], 3).is_empty());
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        for _ in 0..20 {
            assert!(b.next_delay() <= BACKOFF_MAX);
        }
        let capped = b.next_delay();
        assert!(
            capped >= BACKOFF_MAX / 2 && capped <= BACKOFF_MAX,
            "{capped:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]"));
        assert!(!is_loopback("imap.example.com"));
        assert!(!is_loopback("10.0.0.1"));
    }
}
