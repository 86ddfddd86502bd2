//! Real mail servers for integration tests: a private Dovecot (IMAP, STARTTLS, implicit TLS,
//! LMTP) and an SMTP server delivering into it, started by `tests/servers/rig.sh` on free
//! loopback ports and stopped on drop. Needs root (CI runs as root).
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The password of every rig user.
pub const PASSWORD: &str = "secret";

/// The mail uid/gid Dovecot runs mail processes as (nobody).
const MAIL_UID: u32 = 65534;

/// An IMAP session over implicit TLS, verified against the rig CA.
pub type TlsSession = async_imap::Session<TlsStream<TcpStream>>;

/// One running rig; dropping it stops the servers and removes its directory.
#[derive(Debug)]
pub struct Rig {
    /// The rig's temp dir.
    pub dir: PathBuf,
    /// Always 127.0.0.1.
    pub host: String,
    /// IMAP without TLS; STARTTLS is offered.
    pub imap_port: u16,
    /// IMAP with implicit TLS.
    pub imaps_port: u16,
    /// Dovecot LMTP.
    pub lmtp_port: u16,
    /// SMTP (aiosmtpd), delivering through LMTP.
    pub smtp_port: u16,
    /// The CA that signed the server certificate (PEM).
    pub ca: PathBuf,
    /// An unrelated CA (PEM): trusting only it must make TLS fail.
    pub other_ca: PathBuf,
    /// The Dovecot config, for doveadm.
    pub dovecot_conf: PathBuf,
    /// `<mail_dir>/<user>/Maildir` holds each user's mail.
    pub mail_dir: PathBuf,
    /// The test OAuth2 server's port (`start_oauth2` rigs only).
    pub oauth2_port: Option<u16>,
    shared: bool,
}

/// Counter that makes mailbox names unique within this process.
static NEXT_MAILBOX: AtomicU32 = AtomicU32::new(1);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/rig.sh")
}

fn parse_env(out: &str) -> HashMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Rig {
    /// Starts a private rig for one test; it stops when dropped (or when this process exits).
    pub fn start() -> Rig {
        Self::start_inner(false, &[])
    }

    /// A private rig whose Dovecot also accepts OAuth2 tokens (oauth2 passdb, introspection at
    /// the test OAuth2 server) with the SASL mechanisms `mechs` (e.g. "xoauth2 oauthbearer"),
    /// and whose SMTP server accepts mail only after AUTH XOAUTH2 with an active token.
    pub fn start_oauth2(mechs: &str) -> Rig {
        Self::start_inner(false, &["--oauth2", "--oauth2-mechs", mechs])
    }

    /// The process-wide rig, shared by tests that each use their own mailbox (`new_mailbox`).
    /// It stops when the test process exits (the script watches our pid).
    pub fn shared() -> &'static Rig {
        static SHARED: OnceLock<Rig> = OnceLock::new();
        SHARED.get_or_init(|| Self::start_inner(true, &[]))
    }

    fn start_inner(shared: bool, extra: &[&str]) -> Rig {
        let out = Command::new(script())
            .arg("start")
            .arg("--owner")
            .arg(std::process::id().to_string())
            .args(extra)
            .output()
            .expect("run tests/servers/rig.sh");
        assert!(
            out.status.success(),
            "rig.sh start failed (the rig needs root and dovecot): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = parse_env(&String::from_utf8_lossy(&out.stdout));
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("rig env lacks {k}"))
        };
        let port = |k: &str| get(k).parse::<u16>().expect("port");
        Rig {
            dir: get("RIG_DIR").into(),
            host: get("RIG_HOST"),
            imap_port: port("RIG_IMAP_PORT"),
            imaps_port: port("RIG_IMAPS_PORT"),
            lmtp_port: port("RIG_LMTP_PORT"),
            smtp_port: port("RIG_SMTP_PORT"),
            ca: get("RIG_CA").into(),
            other_ca: get("RIG_OTHER_CA").into(),
            dovecot_conf: get("RIG_DOVECOT_CONF").into(),
            mail_dir: get("RIG_MAIL_DIR").into(),
            oauth2_port: env.get("RIG_OAUTH2_PORT").and_then(|p| p.parse().ok()),
            shared,
        }
    }

    fn rig_sh(&self, args: &[&str]) {
        let out = Command::new(script())
            .args(args)
            .output()
            .expect("run rig.sh");
        assert!(
            out.status.success(),
            "rig.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Adds a user (password `secret`); existing users are left alone.
    pub fn add_user(&self, name: &str) {
        self.rig_sh(&["add-user", &self.dir.to_string_lossy(), name]);
        // Dovecot notices a changed passwd-file by its timestamp, which can miss two changes in
        // one second: wait until a login works
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let ok = Command::new("doveadm")
                .arg("-c")
                .arg(&self.dovecot_conf)
                .args(["auth", "test", name, PASSWORD])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "user {name} never became valid"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Adds a user with its own password (for tests that must recognise the password anywhere).
    pub fn add_user_with_password(&self, name: &str, password: &str) {
        self.rig_sh(&["add-user", &self.dir.to_string_lossy(), name, password]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !Command::new("doveadm")
            .arg("-c")
            .arg(&self.dovecot_conf)
            .args(["auth", "test", name, password])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "user {name} never became valid"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// A fresh, empty mailbox user with a unique name starting with `prefix`.
    pub fn new_mailbox(&self, prefix: &str) -> String {
        let n = NEXT_MAILBOX.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}{n}");
        self.add_user(&name);
        name
    }

    /// Runs doveadm against this rig's Dovecot and returns its stdout; panics on failure.
    pub fn doveadm(&self, args: &[&str]) -> String {
        self.doveadm_stdin(args, None)
    }

    fn doveadm_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> String {
        use std::io::Write;
        let mut cmd = Command::new("doveadm");
        cmd.arg("-c").arg(&self.dovecot_conf).args(args);
        cmd.stdout(std::process::Stdio::piped());
        cmd.stderr(std::process::Stdio::piped());
        cmd.stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
        let mut child = cmd.spawn().expect("spawn doveadm");
        if let Some(data) = stdin {
            let mut w = child.stdin.take().expect("stdin");
            w.write_all(data).expect("write to doveadm");
        }
        let out = child.wait_with_output().expect("doveadm");
        assert!(
            out.status.success(),
            "doveadm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Saves one message into `folder` of `user` (server side, through Dovecot: UIDs assigned);
    /// creates the folder if needed.
    pub fn append(&self, user: &str, folder: &str, raw: &[u8]) {
        if !folder.eq_ignore_ascii_case("INBOX") {
            self.ensure_folder(user, folder);
        }
        self.doveadm_stdin(&["save", "-u", user, "-m", folder], Some(raw));
    }

    /// Saves many messages fast: writes them as Maildir files (as an MDA would), then lets Dovecot
    /// index them in one go so UIDs follow the given order. `folder` is `INBOX` or a subfolder name.
    pub fn append_many<I, B>(&self, user: &str, folder: &str, messages: I)
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        self.append_many_dated(user, folder, messages.into_iter().map(|m| (m, None)));
    }

    /// Like `append_many`, with an optional INTERNALDATE per message (Maildir: the file's mtime).
    pub fn append_many_dated<I, B>(&self, user: &str, folder: &str, messages: I)
    where
        I: IntoIterator<Item = (B, Option<std::time::SystemTime>)>,
        B: AsRef<[u8]>,
    {
        self.create_folder(user, folder);
        let maildir = self.maildir(user, folder);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let batch = NEXT_MAILBOX.fetch_add(1, Ordering::Relaxed);
        for (i, (raw, date)) in messages.into_iter().enumerate() {
            // Dovecot sorts new/ by file name when it assigns UIDs; zero padding keeps the order
            let name = format!("{stamp}.B{batch}I{i:08}.rig");
            let tmp = maildir.join("tmp").join(&name);
            std::fs::write(&tmp, raw.as_ref()).expect("write maildir file");
            if let Some(date) = date {
                let f = std::fs::File::options()
                    .write(true)
                    .open(&tmp)
                    .expect("open");
                f.set_modified(date).expect("set mtime");
            }
            chown(&tmp, Some(MAIL_UID), Some(MAIL_UID)).expect("chown");
            std::fs::rename(&tmp, maildir.join("new").join(&name)).expect("rename");
        }
        self.status(user, folder);
    }

    /// Creates `folder` (if missing) so its Maildir exists.
    pub fn create_folder(&self, user: &str, folder: &str) {
        if !folder.eq_ignore_ascii_case("INBOX") {
            self.ensure_folder(user, folder);
        }
        // INBOX is created lazily: a status call makes Dovecot create the directory
        self.status(user, folder);
    }

    fn ensure_folder(&self, user: &str, folder: &str) {
        // "already exists" is fine; any other failure shows up in the next doveadm call
        let _ = Command::new("doveadm")
            .arg("-c")
            .arg(&self.dovecot_conf)
            .args(["mailbox", "create", "-u", user, folder])
            .output();
    }

    fn maildir(&self, user: &str, folder: &str) -> PathBuf {
        let base = self.mail_dir.join(user).join("Maildir");
        if folder.eq_ignore_ascii_case("INBOX") {
            base
        } else {
            base.join(format!(".{folder}"))
        }
    }

    /// Mailbox status: messages, uidvalidity, uidnext, unseen.
    pub fn status(&self, user: &str, folder: &str) -> MailboxStatus {
        let out = self.doveadm(&[
            "-f",
            "flow",
            "mailbox",
            "status",
            "-u",
            user,
            "messages uidvalidity uidnext unseen",
            folder,
        ]);
        let mut s = MailboxStatus::default();
        for field in out.split_whitespace() {
            if let Some((k, v)) = field.split_once('=') {
                let v: u32 = v.parse().unwrap_or(0);
                match k {
                    "messages" => s.messages = v,
                    "uidvalidity" => s.uid_validity = v,
                    "uidnext" => s.uid_next = v,
                    "unseen" => s.unseen = v,
                    _ => {}
                }
            }
        }
        s
    }

    /// Every message's UID and flags in `folder`, for "nothing was touched" checks.
    pub fn flags(&self, user: &str, folder: &str) -> Vec<(u32, String)> {
        let out = self.doveadm(&[
            "-f",
            "flow",
            "fetch",
            "-u",
            user,
            "uid flags",
            "mailbox",
            folder,
        ]);
        out.lines()
            .filter_map(|l| {
                let uid = l.split_whitespace().find_map(|f| f.strip_prefix("uid="))?;
                let flags = l.split_once("flags=").map(|(_, f)| f.trim()).unwrap_or("");
                Some((uid.parse().ok()?, flags.to_string()))
            })
            .collect()
    }

    /// Changes the folder's UIDVALIDITY (as a server migration would).
    pub fn set_uid_validity(&self, user: &str, folder: &str, uid_validity: u32) {
        self.doveadm(&[
            "mailbox",
            "update",
            "-u",
            user,
            "--uid-validity",
            &uid_validity.to_string(),
            folder,
        ]);
    }

    /// Stops Dovecot only (the ports stay reserved for `start_dovecot`).
    pub fn stop_dovecot(&self) {
        self.rig_sh(&["dovecot-stop", &self.dir.to_string_lossy()]);
    }

    /// Starts Dovecot again on the same ports.
    pub fn start_dovecot(&self) {
        self.rig_sh(&["dovecot-start", &self.dir.to_string_lossy()]);
    }

    /// A rustls client config trusting only the rig CA (ring provider, no process default needed).
    pub fn tls_config(&self) -> Arc<rustls::ClientConfig> {
        tls_config_trusting(&self.ca)
    }

    /// Logs in over implicit TLS (verified against the rig CA) and returns the session.
    pub async fn imap(&self, user: &str) -> TlsSession {
        let tcp = TcpStream::connect((self.host.as_str(), self.imaps_port))
            .await
            .expect("connect imaps");
        let connector = tokio_rustls::TlsConnector::from(self.tls_config());
        let name = ServerName::try_from("localhost").expect("name");
        let tls = connector.connect(name, tcp).await.expect("tls handshake");
        let mut client = async_imap::Client::new(tls);
        client
            .read_response()
            .await
            .expect("greeting")
            .expect("greeting");
        client
            .login(user, PASSWORD)
            .await
            .map_err(|(e, _)| e)
            .expect("login")
    }

    /// Appends over IMAP (APPEND on an implicit-TLS session).
    pub async fn imap_append(&self, user: &str, folder: &str, raw: &[u8]) {
        let mut s = self.imap(user).await;
        s.append(folder, None, None, raw).await.expect("append");
        s.logout().await.expect("logout");
    }

    /// Sends a message through the rig's SMTP server (delivered to the rig users named in `to`).
    pub async fn send_smtp(&self, from: &str, to: &[&str], raw: &[u8]) {
        use lettre::AsyncTransport;
        let transport =
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(&self.host)
                .port(self.smtp_port)
                .build();
        let envelope = lettre::address::Envelope::new(
            Some(from.parse().expect("from address")),
            to.iter().map(|t| t.parse().expect("to address")).collect(),
        )
        .expect("envelope");
        transport.send_raw(&envelope, raw).await.expect("smtp send");
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.shared {
            return;
        }
        // Dovecot takes about 3 s to stop: stop in the background instead of holding up the test
        let _ = Command::new(script())
            .arg("stop")
            .arg(&self.dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

/// A rustls client config that trusts only the CA in `ca_pem`.
pub fn tls_config_trusting(ca_pem: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).expect("read CA") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// `doveadm mailbox status` figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MailboxStatus {
    /// Messages in the folder.
    pub messages: u32,
    /// The folder's UIDVALIDITY.
    pub uid_validity: u32,
    /// The next UID the server will assign.
    pub uid_next: u32,
    /// Messages without `\Seen`.
    pub unseen: u32,
}
