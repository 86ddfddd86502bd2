//! Digests and alerts over real SMTP into the rig's Dovecot, read back over IMAP and checked by
//! Python's email parser; SMTP faults (down, 550, 451, hang) from `tests/servers/smtp_fault.py`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use futures::TryStreamExt;

use frontdesk::config;
use frontdesk::digest::{ConversationRow, Digest, DigestInput, NewMessagesRow, TargetKind};
use frontdesk::message::{Address, Automation, Direction, Message, Origin, ParseStatus};
use frontdesk::notify::{OutboxKind, Sender};
use frontdesk::store::{NewOutboxItem, Store};

use crate::rig::Rig;
use crate::support::{self, Backend};

/// A scripted SMTP server (our own child process), stopped on drop.
struct FaultSmtp {
    child: Child,
    port: u16,
    spool: PathBuf,
}

impl FaultSmtp {
    fn start(mode: &str, port: u16, rig: &Rig, spool: &Path, tls: bool) -> FaultSmtp {
        Self::start_tls(
            mode,
            port,
            rig,
            spool,
            if tls { "implicit" } else { "none" },
        )
    }

    fn start_tls(mode: &str, port: u16, rig: &Rig, spool: &Path, tls: &str) -> FaultSmtp {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/smtp_fault.py");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(script)
            .args(["--port", &port.to_string(), "--mode", mode])
            .args(["--lmtp", &rig.lmtp_port.to_string()])
            .arg("--spool")
            .arg(spool)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if tls != "none" {
            let t = rig.dir.join("tls");
            cmd.args(["--tls", tls, "--cert"])
                .arg(t.join("server.pem"))
                .arg("--key")
                .arg(t.join("server.key"));
        }
        let child = cmd.spawn().unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "smtp_fault did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        FaultSmtp {
            child,
            port,
            spool: spool.to_path_buf(),
        }
    }

    /// Messages the server accepted (or was handed, for `hang`), as raw files.
    fn spooled(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.spool)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        v.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        v.sort();
        v
    }
}

impl Drop for FaultSmtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh rig user that Dovecot already knows. Users are appended to a passwd-file that Dovecot
/// re-reads when it changes; two tests adding users within the same second can leave Dovecot with
/// a stale copy, so wait (touching the file) until `doveadm user` finds the new one.
fn fresh_mailbox(rig: &Rig, prefix: &str) -> String {
    let name = rig.new_mailbox(prefix);
    let users = rig.dir.join("dovecot/users");
    let start = Instant::now();
    loop {
        let ok = Command::new("doveadm")
            .arg("-c")
            .arg(&rig.dovecot_conf)
            .args(["user", &name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return name;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "dovecot never saw user {name}"
        );
        std::thread::sleep(Duration::from_millis(1100));
        let text = std::fs::read(&users).unwrap();
        std::fs::write(&users, text).unwrap();
    }
}

fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A config for one test: SMTP to 127.0.0.1:`port`, per-owner digests for Maria at `user@rig.test`.
fn config_yaml(
    dir: &Path,
    port: u16,
    tls: &str,
    ca: Option<&Path>,
    user: &str,
    timeout: &str,
) -> String {
    let ca = ca
        .map(|p| format!("        ca_file: {}\n", p.display()))
        .unwrap_or_default();
    let host = if tls == "none" {
        "127.0.0.1"
    } else {
        "localhost"
    };
    format!(
        "timezone: Europe/Athens
storage:
  sqlite: {db}
server:
  listen: 127.0.0.1:0
team:
  - name: Maria
    email: [{user}@rig.test]
  - name: Nikos
    email: [nikos-{user}@rig.test]
sources:
  - name: support-mail
    webhook:
      preset: form
      auth: {{ scheme: none }}
channels:
  - name: office-mail
    email:
      smtp:
        host: {host}
        port: {port}
        tls: {tls}
{ca}        timeout: {timeout}
      from: \"frontdesk <frontdesk@example.com>\"
      to: [{user}@rig.test]
digests:
  - name: morning
    schedule: \"0 8 * * *\"
    channel: office-mail
    per_owner: true
alerts:
  channel: office-mail
  group_wait: 1m
",
        db = dir.join("frontdesk.db").display(),
    )
}

async fn sender_for(yaml: &str, dir: &Path) -> (Sender, Store, Arc<config::Config>) {
    install_crypto();
    let path = dir.join("frontdesk.yaml");
    std::fs::write(&path, yaml).unwrap();
    let loaded = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let config = Arc::new(loaded.config);
    let store = Store::open_storage(&config.storage).await.unwrap();
    let sender = Sender::new(store.clone(), config.clone()).unwrap();
    (sender, store, config)
}

/// Every message in `user`'s INBOX, raw.
async fn inbox(rig: &Rig, user: &str) -> Vec<Vec<u8>> {
    let mut s = rig.imap(user).await;
    let mailbox = s.select("INBOX").await.unwrap();
    if mailbox.exists == 0 {
        let _ = s.logout().await;
        return vec![];
    }
    let fetches: Vec<_> = s
        .fetch("1:*", "BODY.PEEK[]")
        .await
        .map(|st| st.try_collect::<Vec<_>>())
        .unwrap()
        .await
        .unwrap_or_default();
    let out = fetches
        .iter()
        .filter_map(|f| f.body().map(<[u8]>::to_vec))
        .collect();
    let _ = s.logout().await;
    out
}

async fn wait_inbox(rig: &Rig, user: &str, n: usize) -> Vec<Vec<u8>> {
    wait_inbox_for(rig, user, n, Duration::from_secs(10)).await
}

/// `wait_inbox` with its own limit.
async fn wait_inbox_for(rig: &Rig, user: &str, n: usize, limit: Duration) -> Vec<Vec<u8>> {
    let start = Instant::now();
    loop {
        let got = inbox(rig, user).await;
        if got.len() >= n || start.elapsed() > limit {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn check_with_python(raw: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/digest_check.py");
    let out = Command::new("/usr/bin/python3")
        .arg(script)
        .arg(raw)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "python check of {}: {stdout}{}",
        raw.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

const SECTIONS: &[&str] = &[
    "WAITING ON YOU",
    "NOT YET OWNED",
    "AT RISK AND BREACHED",
    "NEW SINCE",
    "ANSWERED",
    "THIS WEEK",
    "SOURCES",
];

fn section_args() -> Vec<String> {
    SECTIONS
        .iter()
        .flat_map(|s| ["--section".to_string(), s.to_string()])
        .collect()
}

fn client_message(i: u32, name: &str, subject: &str) -> Message {
    Message {
        source: "support-mail".into(),
        origin: Origin::Webhook {
            delivery_id: format!("d{i}"),
        },
        direction: Direction::Inbound,
        received_at: Utc::now() - TimeDelta::minutes(i64::from(i) + 1),
        sent_at: None,
        from: Some(Address {
            name: Some(name.into()),
            addr: format!("client{i}@client.example"),
        }),
        to: vec![],
        subject: Some(subject.into()),
        text: Some("hello".into()),
        message_id: None,
        in_reply_to: vec![],
        references: vec![],
        thread_key: None,
        automation: Automation::Human,
        parse: ParseStatus::Ok,
        raw: b"raw".to_vec(),
    }
}

/// Hostile client strings (reliability.md §6.2 E1-E3) that must appear only as text.
const HOSTILE_SHOWN: &[&str] = &[
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "</title><b>x</b>",
    "javascript:alert(1)",
    "=?utf-8?q?Hi=0D=0ABcc:_evil@x.test?=",
];

/// `frontdesk digest --send` through the real binary -> aiosmtpd -> Dovecot LMTP -> IMAP, parsed by
/// Python; with hostile client names in the store.
#[tokio::test(flavor = "multi_thread")]
async fn digest_send_is_read_back_over_imap_and_parsed_by_python() {
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "dg");
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(
        "relay",
        support::free_port(),
        rig,
        &dir.path().join("spool"),
        false,
    );
    let yaml = config_yaml(dir.path(), smtp.port, "none", None, &user, "10s");
    let (_, store, _) = sender_for(&yaml, dir.path()).await;
    let mut hostile: Vec<String> = HOSTILE_SHOWN.iter().map(|s| s.to_string()).collect();
    hostile.push("Eve\r\nBcc: evil@x.test".into());
    hostile.push("Mallory \u{202e}gpj.exe".into());
    hostile.push(".\n.\r\n.".into());
    hostile.push("N".repeat(10_000));
    for (i, name) in hostile.iter().enumerate() {
        store
            .ingest(&client_message(i as u32, name, name), Utc::now())
            .await
            .unwrap();
    }
    store.close().await;

    let cfg = dir.path().join("frontdesk.yaml");
    let (code, out, err) = support::frontdesk(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "digest",
            "--send",
            "--owner",
            "Maria",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 sent"), "{out}");

    let got = wait_inbox(rig, &user, 1).await;
    assert_eq!(got.len(), 1, "exactly one digest delivered");
    let read_back = dir.path().join("imap.eml");
    std::fs::write(&read_back, &got[0]).unwrap();
    let sent = smtp.spooled();
    assert_eq!(sent.len(), 1);
    let raw = String::from_utf8_lossy(&got[0]).to_string();
    let subject = raw
        .lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap()
        .trim()
        .to_string();
    assert!(
        subject.starts_with("frontdesk: 0 waiting, 0 breached - "),
        "{subject}"
    );
    let to = format!("{user}@rig.test");
    let mut args: Vec<String> = vec![
        "--subject".into(),
        subject.clone(),
        "--to".into(),
        to.clone(),
    ];
    args.extend(section_args());
    for p in HOSTILE_SHOWN {
        args.extend(["--payload".to_string(), p.to_string()]);
    }
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    // What Dovecot stored (after its own trace headers) parses with every section and payload.
    check_with_python(&read_back, &args_ref);
    // What we put on the wire has exactly the expected header set.
    let mut exact = args_ref.clone();
    exact.extend([
        "--headers",
        "from,to,subject,date,message-id,mime-version,content-type,auto-submitted,x-frontdesk-generated",
    ]);
    check_with_python(&sent[0], &exact);
    let rcpt = std::fs::read_to_string(sent[0].with_extension("rcpt")).unwrap();
    assert_eq!(
        rcpt.trim(),
        to,
        "envelope recipients exactly the configured one"
    );
    // E4, the loop guard: the IMAP normalizer recognises the digest as frontdesk's own mail.
    let normalized = frontdesk::ingest::email::normalize(
        "watched",
        Origin::Imap {
            folder: "INBOX".into(),
            uid_validity: 1,
            uid: 1,
        },
        got[0].clone(),
        Utc::now(),
    );
    assert_eq!(normalized.automation, Automation::Frontdesk);
}

/// Hostile open-conversation rows rendered, pushed through the outbox and delivered.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_conversations_arrive_as_text_only() {
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "dh");
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(
        "relay",
        support::free_port(),
        rig,
        &dir.path().join("spool"),
        false,
    );
    let yaml = config_yaml(dir.path(), smtp.port, "none", None, &user, "10s");
    let (sender, store, config) = sender_for(&yaml, dir.path()).await;
    let now = Utc::now();
    let mut input = DigestInput::default();
    let mut payloads: Vec<String> = HOSTILE_SHOWN.iter().map(|s| s.to_string()).collect();
    payloads.push("<svg onload=alert(1)>".into());
    for (i, p) in payloads.iter().enumerate() {
        input.open.push(ConversationRow {
            id: i as i64,
            client: p.clone(),
            medium: None,
            subject: format!("{p}\r\nBcc: evil@x.test\n.\n"),
            owner: if i % 2 == 0 {
                Some("Maria".into())
            } else {
                None
            },
            policy: Some("vip".into()),
            target: Some(TargetKind::First),
            target_secs: Some(3600),
            waiting_since: now - TimeDelta::hours(2),
            warn_at: Some(now - TimeDelta::minutes(30)),
            due: Some(now + TimeDelta::minutes(10 * i as i64 - 20)),
        });
        input.new_messages.push(NewMessagesRow {
            client: p.clone(),
            owner: None,
            messages: 1,
        });
    }
    let r = Digest::build(&input, now, config.timezone, Some("Maria"))
        .render()
        .unwrap();
    let id = store
        .outbox_push(
            &NewOutboxItem {
                kind: OutboxKind::Digest,
                channel: "office-mail".into(),
                recipient: format!("{user}@rig.test"),
                slot_key: "digest:hostile".into(),
                subject: r.subject.clone(),
                body_text: r.text,
                body_html: Some(r.html),
            },
            now,
        )
        .await
        .unwrap()
        .unwrap();
    let report = sender.send_due(now).await.unwrap();
    assert_eq!(report.sent, 1, "{report:?}");
    let sent = smtp.spooled();
    assert_eq!(sent.len(), 1);
    let mut args: Vec<String> = vec![
        "--subject".into(),
        r.subject.clone(),
        "--to".into(),
        format!("{user}@rig.test"),
        "--headers".into(),
        "from,to,subject,date,message-id,mime-version,content-type,auto-submitted,x-frontdesk-generated".into(),
    ];
    args.extend(section_args());
    for p in &payloads {
        args.extend(["--payload".to_string(), p.clone()]);
    }
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    check_with_python(&sent[0], &args_ref);
    let raw = std::fs::read_to_string(&sent[0]).unwrap();
    assert!(raw.contains(&format!(
        "Message-ID: <outbox-{id}.digest-hostile@example.com>"
    )));
    assert_eq!(wait_inbox(rig, &user, 1).await.len(), 1);
}

/// Implicit TLS (the default) verified against the rig CA through `ca_file`; a CA that did not
/// sign the server's certificate makes the send fail (temporary), never fall back to plaintext.
#[tokio::test(flavor = "multi_thread")]
async fn implicit_tls_is_verified() {
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "dt");
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(
        "relay",
        support::free_port(),
        rig,
        &dir.path().join("spool"),
        true,
    );
    for (ca, expect_sent) in [(&rig.other_ca, false), (&rig.ca, true)] {
        let sub = dir.path().join(if expect_sent { "good" } else { "bad" });
        std::fs::create_dir_all(&sub).unwrap();
        let yaml = config_yaml(&sub, smtp.port, "implicit", Some(ca), &user, "10s");
        let (sender, _store, _) = sender_for(&yaml, &sub).await;
        let ids = sender
            .enqueue_digest_now(None, Some("Maria"), Utc::now())
            .await
            .unwrap();
        assert_eq!(ids.len(), 1);
        let report = sender.send_due(Utc::now()).await.unwrap();
        if expect_sent {
            assert_eq!(report.sent, 1, "{report:?}");
        } else {
            assert_eq!((report.sent, report.retried), (0, 1), "{report:?}");
        }
    }
    assert_eq!(smtp.spooled().len(), 1);
    assert_eq!(wait_inbox(rig, &user, 1).await.len(), 1);
}

/// STARTTLS (587 style): upgraded and verified; a plaintext-only server is refused, never used.
#[tokio::test(flavor = "multi_thread")]
async fn starttls_is_required_and_verified() {
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "ds");
    let dir = tempfile::tempdir().unwrap();
    let tls = FaultSmtp::start_tls(
        "relay",
        support::free_port(),
        rig,
        &dir.path().join("spool"),
        "starttls",
    );
    let plain = FaultSmtp::start(
        "relay",
        support::free_port(),
        rig,
        &dir.path().join("plain"),
        false,
    );
    for (port, expect_sent) in [(plain.port, false), (tls.port, true)] {
        let sub = dir.path().join(port.to_string());
        std::fs::create_dir_all(&sub).unwrap();
        let yaml = config_yaml(&sub, port, "starttls", Some(&rig.ca), &user, "10s");
        let (sender, _store, _) = sender_for(&yaml, &sub).await;
        sender
            .enqueue_digest_now(None, Some("Maria"), Utc::now())
            .await
            .unwrap();
        let report = sender.send_due(Utc::now()).await.unwrap();
        let got = (report.sent, report.retried);
        assert_eq!(
            got,
            if expect_sent { (1, 0) } else { (0, 1) },
            "port {port}: {report:?}"
        );
    }
    assert_eq!(plain.spooled().len(), 0, "nothing sent without TLS");
    assert_eq!(tls.spooled().len(), 1);
    assert_eq!(wait_inbox(rig, &user, 1).await.len(), 1);
}

/// SMTP down -> retried with backoff; after it is back, delivered exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn smtp_down_is_retried_and_delivered_exactly_once() {
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "dd");
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let yaml = config_yaml(dir.path(), port, "none", None, &user, "5s");
    let (sender, store, _) = sender_for(&yaml, dir.path()).await;
    let t0 = Utc::now();
    let ids = sender
        .enqueue_digest_now(None, Some("Maria"), t0)
        .await
        .unwrap();
    let r = sender.send_due(t0).await.unwrap();
    assert_eq!((r.sent, r.retried), (0, 1), "{r:?}");
    // Not due again at once: backoff.
    let r = sender.send_due(t0 + TimeDelta::seconds(1)).await.unwrap();
    assert_eq!(r, Default::default());
    let row = &store.outbox_list(10).await.unwrap()[0];
    assert_eq!((row.state.as_str(), row.item.attempts), ("pending", 1));
    assert!(row.last_error.is_some());

    let smtp = FaultSmtp::start("relay", port, rig, &dir.path().join("spool"), false);
    let later = t0 + TimeDelta::hours(2);
    let r = sender.send_due(later).await.unwrap();
    assert_eq!(r.sent, 1, "{r:?}");
    for k in 1..4 {
        let r = sender.send_due(later + TimeDelta::hours(k)).await.unwrap();
        assert_eq!(r, Default::default());
    }
    assert_eq!(smtp.spooled().len(), 1);
    let got = wait_inbox(rig, &user, 1).await;
    assert_eq!(got.len(), 1);
    let raw = String::from_utf8_lossy(&got[0]).to_string();
    assert!(raw.contains(&format!("Message-ID: <outbox-{}.", ids[0])));
}

/// 550 -> failed after one attempt, never retried, and listed in the next digest.
#[tokio::test(flavor = "multi_thread")]
async fn permanent_rejection_fails_once_and_shows_in_the_next_digest() {
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "dp");
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(
        "550",
        support::free_port(),
        rig,
        &dir.path().join("spool"),
        false,
    );
    let yaml = config_yaml(dir.path(), smtp.port, "none", None, &user, "5s");
    let (sender, store, _) = sender_for(&yaml, dir.path()).await;
    let t0 = Utc::now();
    sender
        .enqueue_digest_now(None, Some("Maria"), t0)
        .await
        .unwrap();
    let r = sender.send_due(t0).await.unwrap();
    assert_eq!(r.failed, 1, "{r:?}");
    for k in 1..5 {
        let r = sender.send_due(t0 + TimeDelta::hours(k)).await.unwrap();
        assert_eq!(r, Default::default(), "no retry loop");
    }
    let row = &store.outbox_list(10).await.unwrap()[0];
    assert_eq!((row.state.as_str(), row.item.attempts), ("failed", 1));
    assert!(row.last_error.as_deref().unwrap().contains("550"));

    let input = sender
        .digest_input(t0 - TimeDelta::hours(1), Utc::now())
        .await
        .unwrap();
    assert_eq!(input.failed_sends.len(), 1);
    let next = Digest::build(&input, Utc::now(), chrono_tz::Europe::Athens, Some("Maria"))
        .render()
        .unwrap();
    assert!(next.text.contains("FAILED SENDS"), "{}", next.text);
    assert!(next.text.contains("1 failed send"), "{}", next.text);
}

/// 451 -> temporary; a server that takes the message and never answers -> timeout, temporary.
#[tokio::test(flavor = "multi_thread")]
async fn temporary_reply_and_silent_server_are_retried() {
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "dq");
    for mode in ["451", "hang", "silent"] {
        let dir = tempfile::tempdir().unwrap();
        let smtp = FaultSmtp::start(
            mode,
            support::free_port(),
            rig,
            &dir.path().join("spool"),
            false,
        );
        let yaml = config_yaml(dir.path(), smtp.port, "none", None, &user, "2s");
        let (sender, store, _) = sender_for(&yaml, dir.path()).await;
        let t0 = Utc::now();
        sender
            .enqueue_digest_now(None, Some("Maria"), t0)
            .await
            .unwrap();
        let started = Instant::now();
        let r = sender.send_due(t0).await.unwrap();
        assert_eq!((r.sent, r.retried, r.failed), (0, 1, 0), "{mode}: {r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{mode}: bounded by the timeout"
        );
        let row = &store.outbox_list(10).await.unwrap()[0];
        assert_eq!(row.state, "pending", "{mode}");
    }
}

/// `yaml` with its SQLite `storage:` block replaced by `backend`'s.
fn on_backend(yaml: String, dir: &Path, backend: Backend) -> String {
    let sqlite = format!(
        "storage:\n  sqlite: {}\n",
        dir.join("frontdesk.db").display()
    );
    assert!(
        yaml.contains(&sqlite),
        "config_yaml's storage block changed"
    );
    yaml.replace(&sqlite, &backend.storage_yaml(&dir.join("frontdesk.db")))
}

/// A restart at digest time (a second sender over the same store, the first one's send cut off)
/// makes exactly one digest per slot and recipient.
#[tokio::test(flavor = "multi_thread")]
async fn restart_at_digest_time_sends_one_digest_per_slot() {
    restart_at_digest_time_on(Backend::Sqlite).await;
}

/// The same on PostgreSQL: the slot's unique key holds there too.
#[tokio::test(flavor = "multi_thread")]
async fn restart_at_digest_time_sends_one_digest_per_slot_on_postgres() {
    restart_at_digest_time_on(Backend::Postgres).await;
}

async fn restart_at_digest_time_on(backend: Backend) {
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "dr");
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let yaml = on_backend(
        config_yaml(dir.path(), port, "none", None, &user, "5s"),
        dir.path(),
        backend,
    );
    let (first, store, config) = sender_for(&yaml, dir.path()).await;
    // 08:00 Athens today (the schedule), and a moment after it.
    let slot = frontdesk::notify::sender::digest_slot("0 8 * * *", config.timezone, Utc::now())
        .unwrap_or_else(|| {
            frontdesk::notify::sender::next_occurrence("0 8 * * *", config.timezone, Utc::now())
                .unwrap()
        });
    let at = slot + TimeDelta::seconds(5);
    // SMTP is down during the first run: the digests are enqueued, the sends fail.
    let r = first.run_once(at).await.unwrap();
    assert_eq!((r.digests_enqueued, r.retried), (2, 2), "{r:?}");
    drop(first);
    let smtp = FaultSmtp::start("relay", port, rig, &dir.path().join("spool"), false);
    let second = Sender::new(store.clone(), config.clone()).unwrap();
    let r = second.run_once(at + TimeDelta::seconds(1)).await.unwrap();
    assert_eq!(
        r,
        Default::default(),
        "the slot exists and its retry is not due: {r:?}"
    );
    let r = second.run_once(at + TimeDelta::minutes(90)).await.unwrap();
    assert_eq!((r.digests_enqueued, r.sent), (0, 2), "{r:?}");
    let r = second.run_once(at + TimeDelta::hours(3)).await.unwrap();
    assert_eq!(r, Default::default());
    assert_eq!(smtp.spooled().len(), 2, "one per owner");
    assert_eq!(
        wait_inbox(rig, &user, 1).await.len(),
        1,
        "Maria got exactly one"
    );
}

/// The daemon itself: a slot in the catch-up window is sent once; SIGKILL and restart send no
/// second one.
#[tokio::test(flavor = "multi_thread")]
async fn daemon_sends_the_due_digest_once_across_a_kill() {
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "dk");
    let spool = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start("relay", support::free_port(), rig, spool.path(), false);
    // A schedule whose last slot is the previous hour, so the whole test is inside one slot.
    let hour = (Utc::now() - TimeDelta::hours(1)).format("%H").to_string();
    let yaml = config_yaml(Path::new("{dir}"), smtp.port, "none", None, &user, "5s")
        .replace("timezone: Europe/Athens", "timezone: UTC")
        .replace("\"0 8 * * *\"", &format!("\"0 {hour} * * *\""))
        .replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:{port}");
    let mut d = support::TestDaemon::start(&yaml);
    // a first attempt that fails for any transient reason is retried after ~15 s (the outbox's
    // backoff): the claim here is "once across a kill", not "within 10 s"
    let got = wait_inbox_for(rig, &user, 1, Duration::from_secs(40)).await;
    assert_eq!(got.len(), 1, "{}", d.log.lock().unwrap());
    d.signal_and_wait(9, Duration::from_secs(5));
    d.spawn();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        inbox(rig, &user).await.len(),
        1,
        "no second digest after the restart"
    );
    assert_eq!(smtp.spooled().len(), 2, "Maria and Nikos, once each");
}

/// Alert events within group_wait go out as one message, each event once.
#[tokio::test(flavor = "multi_thread")]
async fn alert_events_are_grouped_into_one_message_sent_once() {
    alert_events_grouped_on(Backend::Sqlite).await;
}

/// The same on PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn alert_events_are_grouped_into_one_message_sent_once_on_postgres() {
    alert_events_grouped_on(Backend::Postgres).await;
}

async fn alert_events_grouped_on(backend: Backend) {
    use frontdesk::digest::AlertEvent;
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "da");
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(
        "relay",
        support::free_port(),
        rig,
        &dir.path().join("spool"),
        false,
    );
    let yaml = on_backend(
        config_yaml(dir.path(), smtp.port, "none", None, &user, "5s")
            .replace("\"0 8 * * *\"", "\"0 0 1 1 *\""),
        dir.path(),
        backend,
    );
    let (sender, store, _) = sender_for(&yaml, dir.path()).await;
    let t0 = Utc::now();
    let conv = |id: i64, client: &str| ConversationRow {
        id,
        client: client.into(),
        medium: None,
        subject: "<b>urgent</b>\r\nBcc: evil@x.test".into(),
        owner: Some("Maria".into()),
        policy: Some("vip".into()),
        target: Some(TargetKind::First),
        target_secs: Some(3600),
        waiting_since: t0 - TimeDelta::hours(1),
        warn_at: Some(t0 - TimeDelta::minutes(15)),
        due: Some(t0),
    };
    let events = [
        (
            "breach:1",
            AlertEvent::SlaBreach {
                conversation: conv(1, "ACME Ltd"),
            },
            t0,
        ),
        (
            "warn:2",
            AlertEvent::SlaWarn {
                conversation: conv(2, "<script>x</script>"),
            },
            t0 + TimeDelta::seconds(20),
        ),
        (
            "down:mail",
            AlertEvent::SourceUnhealthy {
                source: "support-mail".into(),
                error: "connection refused".into(),
            },
            t0 + TimeDelta::seconds(40),
        ),
    ];
    for (key, e, at) in &events {
        assert!(store.alert_event_push(key, e, *at).await.unwrap());
        assert!(
            !store.alert_event_push(key, e, *at).await.unwrap(),
            "once per event"
        );
    }
    let r = sender.run_once(t0 + TimeDelta::seconds(50)).await.unwrap();
    assert_eq!(r, Default::default(), "still inside group_wait");
    let r = sender.run_once(t0 + TimeDelta::seconds(61)).await.unwrap();
    assert_eq!((r.alerts_enqueued, r.sent), (1, 1), "{r:?}");
    let r = sender.run_once(t0 + TimeDelta::hours(1)).await.unwrap();
    assert_eq!(r, Default::default());
    let sent = smtp.spooled();
    assert_eq!(sent.len(), 1);
    let raw = std::fs::read_to_string(&sent[0]).unwrap();
    assert!(raw.contains("X-Frontdesk-Generated: alert\r\n"));
    assert!(raw.contains("Subject: frontdesk alert: 1 breached, 1 at risk, 1 source unhealthy - "));
    assert!(!raw.contains("\r\nBcc:"));
    assert_eq!(wait_inbox(rig, &user, 1).await.len(), 1);
}

/// `frontdesk digest --preview` prints the text (subject first) or the HTML, per owner.
#[test]
fn digest_preview_prints_text_and_html() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_yaml(dir.path(), 25, "none", None, "maria", "5s");
    let cfg = dir.path().join("frontdesk.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let c = cfg.to_str().unwrap();
    let (code, out, err) = support::frontdesk(
        &["--config", c, "digest", "--preview", "--owner", "Maria"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("Subject: frontdesk: 0 waiting, 0 breached - "),
        "{out}"
    );
    assert!(out.contains("Maria. Nothing is waiting."), "{out}");
    for s in SECTIONS {
        assert!(out.contains(s), "{s} missing: {out}");
    }
    let (code, out, err) = support::frontdesk(
        &["--config", c, "digest", "--preview", "--format", "html"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("<!DOCTYPE html>") && out.contains("Nothing is waiting."),
        "{out}"
    );
    let (code, _, err) = support::frontdesk(&["--config", c, "digest"], &[]);
    assert_ne!(code, 0, "needs --preview or --send: {err}");
    let (code, _, err) = support::frontdesk(
        &["--config", c, "digest", "--preview", "--name", "evening"],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("no digest named"), "{err}");
}

/// Renders `page` in headless Chromium to `png` (360 px wide) and returns every URL it requested,
/// from Chromium's net log, minus Chromium's own background hosts.
fn chromium_render(page: &Path, png: &Path, work: &Path) -> Vec<String> {
    let netlog = work.join("net.json");
    let status = Command::new("/usr/bin/chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=360,2400",
        ])
        .arg(format!(
            "--user-data-dir={}",
            work.join("profile").display()
        ))
        .arg(format!("--log-net-log={}", netlog.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "chromium failed: {status}");
    let log: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&netlog).unwrap()).unwrap();
    let own = ["google.com", "googleapis.com", "gvt1.com", "gstatic.com"];
    let mut urls: Vec<String> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["params"]["url"].as_str().map(str::to_string))
        .filter(|u| {
            let host = u
                .split("://")
                .nth(1)
                .unwrap_or("")
                .split(['/', ':', '?'])
                .next()
                .unwrap_or("");
            !own.iter()
                .any(|o| host == *o || host.ends_with(&format!(".{o}")))
        })
        .collect();
    urls.sort();
    urls.dedup();
    urls
}

/// The HTML digest with hostile client text renders in headless Chromium at 360 px with no network
/// request; a control page with a real external image shows the check would catch one.
#[test]
fn html_digest_renders_in_chromium_without_network_requests() {
    if !Path::new("/usr/bin/chromium").exists() {
        eprintln!("skipped: /usr/bin/chromium is not installed (apt-get install -y chromium)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let now = Utc::now();
    let mut input = DigestInput::default();
    let mut names: Vec<String> = HOSTILE_SHOWN.iter().map(|s| s.to_string()).collect();
    names.push("<img src=\"http://198.51.100.7/hostile.png\">".into());
    names.push("<link rel=stylesheet href=http://198.51.100.7/x.css>".into());
    for (i, n) in names.iter().enumerate() {
        input.open.push(ConversationRow {
            id: i as i64,
            client: n.clone(),
            medium: None,
            subject: n.clone(),
            owner: Some("Maria".into()),
            policy: Some("vip".into()),
            target: Some(TargetKind::First),
            target_secs: Some(3600),
            waiting_since: now - TimeDelta::hours(2),
            warn_at: Some(now - TimeDelta::minutes(30)),
            due: Some(now + TimeDelta::minutes(20 * i as i64 - 40)),
        });
    }
    let r = Digest::build(&input, now, chrono_tz::Europe::Athens, Some("Maria"))
        .render()
        .unwrap();
    let page = work.path().join("digest.html");
    std::fs::write(&page, &r.html).unwrap();
    let png = Path::new(env!("CARGO_TARGET_TMPDIR")).join("digest-360.png");
    let urls = chromium_render(&page, &png, &work.path().join("digest"));
    assert!(
        urls.is_empty(),
        "the digest made network requests: {urls:?}"
    );
    assert!(
        std::fs::metadata(&png).unwrap().len() > 10_000,
        "an empty screenshot"
    );
    eprintln!("digest rendered to {}", png.display());

    let control = work.path().join("control.html");
    std::fs::write(
        &control,
        "<!DOCTYPE html><html><body><img src=\"http://198.51.100.7/control.png\"></body></html>",
    )
    .unwrap();
    let urls = chromium_render(
        &control,
        &work.path().join("control.png"),
        &work.path().join("control"),
    );
    assert!(
        urls.iter().any(|u| u.contains("198.51.100.7/control.png")),
        "the net-log check would not see a request: {urls:?}"
    );
}

/// Quiet hours: alert events are held back and appear in the next digest, marked deferred; they
/// never go out as an alert afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn quiet_hours_defer_alerts_into_the_next_digest() {
    use frontdesk::digest::AlertEvent;
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "dz");
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(
        "relay",
        support::free_port(),
        rig,
        &dir.path().join("spool"),
        false,
    );
    let yaml = config_yaml(dir.path(), smtp.port, "none", None, &user, "5s");
    let (open_sender, store, config) = sender_for(&yaml, dir.path()).await;
    let quiet = Sender::new(store.clone(), config.clone())
        .unwrap()
        .quiet_hours(Arc::new(|_| true));
    let slot = frontdesk::notify::sender::digest_slot("0 8 * * *", config.timezone, Utc::now())
        .unwrap_or_else(|| {
            frontdesk::notify::sender::next_occurrence("0 8 * * *", config.timezone, Utc::now())
                .unwrap()
        });
    let before = slot - TimeDelta::hours(1);
    let event = AlertEvent::SourceUnhealthy {
        source: "support-mail".into(),
        error: "connection refused at night".into(),
    };
    assert!(
        store
            .alert_event_push("night:1", &event, before)
            .await
            .unwrap()
    );
    let r = quiet
        .run_once(before + TimeDelta::minutes(5))
        .await
        .unwrap();
    assert_eq!(r, Default::default(), "held back in quiet hours");
    let r = quiet.run_once(slot + TimeDelta::seconds(5)).await.unwrap();
    assert_eq!(
        (r.digests_enqueued, r.alerts_enqueued, r.sent),
        (2, 0, 2),
        "{r:?}"
    );
    let r = open_sender
        .run_once(slot + TimeDelta::hours(2))
        .await
        .unwrap();
    assert_eq!(
        r,
        Default::default(),
        "the deferred event is not sent again as an alert"
    );
    let spooled = smtp.spooled();
    assert_eq!(spooled.len(), 2);
    for p in spooled {
        let raw = std::fs::read_to_string(p).unwrap();
        assert!(raw.contains("DEFERRED ALERTS (quiet hours)"), "{raw}");
        assert!(raw.contains("X-Frontdesk-Generated: digest"));
    }
}

/// The Message-ID header of a spooled or fetched message, if any.
fn message_id_of(raw: &[u8]) -> Option<String> {
    String::from_utf8_lossy(raw)
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            l.strip_prefix("Message-ID:")
                .or_else(|| l.strip_prefix("Message-Id:"))
                .map(|v| v.trim().to_string())
        })
}

/// D9: the server takes the message, then the connection drops before the reply to the final
/// `.` (RFC 1047) -> the send is retried, and the mailbox gets at most one duplicate, with the
/// same Message-ID; after the retry succeeds nothing more is sent.
#[tokio::test(flavor = "multi_thread")]
async fn connection_dropped_after_the_final_dot_duplicates_at_most_once() {
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "dd9");
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(
        "drop-once",
        support::free_port(),
        rig,
        &dir.path().join("spool"),
        false,
    );
    let yaml = config_yaml(dir.path(), smtp.port, "none", None, &user, "5s");
    let (sender, store, _) = sender_for(&yaml, dir.path()).await;
    let t0 = Utc::now();
    sender
        .enqueue_digest_now(None, Some("Maria"), t0)
        .await
        .unwrap();
    let r = sender.send_due(t0).await.unwrap();
    assert_eq!((r.sent, r.retried, r.failed), (0, 1, 0), "{r:?}");
    let r = sender.send_due(t0 + TimeDelta::hours(2)).await.unwrap();
    assert_eq!(r.sent, 1, "{r:?}");
    for k in 3..6 {
        let r = sender.send_due(t0 + TimeDelta::hours(k)).await.unwrap();
        assert_eq!(r, Default::default());
    }
    let row = &store.outbox_list(10).await.unwrap()[0];
    assert_eq!((row.state.as_str(), row.item.attempts), ("sent", 2));
    let spooled: Vec<Vec<u8>> = smtp
        .spooled()
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let got = wait_inbox(rig, &user, 2).await;
    let ids: Vec<_> = got.iter().map(|m| message_id_of(m)).collect();
    support::figure(
        "D9",
        "SMTP connection aborted after the final dot, then relayed",
        &format!(
            "{} attempts, {} copies accepted by the server, {} in the mailbox, same Message-ID: {}",
            row.item.attempts,
            spooled.len(),
            got.len(),
            ids.windows(2).all(|w| w[0] == w[1]),
        ),
    );
    assert_eq!(spooled.len(), 2, "the dropped copy and the retry");
    assert_eq!(got.len(), 2, "at most one duplicate");
    assert!(ids[0].is_some(), "{ids:?}");
    assert_eq!(ids[0], ids[1], "the duplicate carries the same Message-ID");
    assert!(
        ids[0]
            .as_deref()
            .unwrap()
            .starts_with(&format!("<outbox-{}.", row.item.id)),
        "{ids:?}"
    );
}

/// N2: digests sent through the seeded fault proxy (latency, 1-byte segments, cuts, blackholes,
/// resets) to a relaying SMTP server -> every item is eventually sent; a second copy exists only
/// for an item that needed a retry (D9's documented case), always with the same Message-ID.
#[tokio::test(flavor = "multi_thread")]
async fn smtp_through_network_faults_delivers_each_digest() {
    use crate::fault_proxy::{FaultProxy, Plan, seed};
    let items = if support::long_run() { 60 } else { 12 };
    let rig = Rig::shared();
    let user = fresh_mailbox(rig, "dn2");
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(
        "relay",
        support::free_port(),
        rig,
        &dir.path().join("spool"),
        false,
    );
    let seed = seed();
    println!("fault proxy seed {seed} (FRONTDESK_FAULT_SEED replays it)");
    let plan = Plan {
        weights: [2, 2, 1, 1, 2, 1, 1, 2],
        bytes: 20..6_000,
        millis: 50..1_500,
        life: 2_000..10_000,
    };
    let proxy = FaultProxy::start(smtp.port, plan, seed).await;
    let yaml = config_yaml(dir.path(), proxy.port, "none", None, &user, "2s");
    let (sender, store, _) = sender_for(&yaml, dir.path()).await;
    let t0 = Utc::now();
    for i in 0..items {
        sender
            .enqueue_digest_now(None, Some("Maria"), t0 + TimeDelta::milliseconds(i))
            .await
            .unwrap();
    }
    let mut now = t0;
    let mut rounds = 0;
    loop {
        let rows = store.outbox_list(1000).await.unwrap();
        if rows.iter().all(|r| r.state != "pending") || rounds >= 40 {
            break;
        }
        rounds += 1;
        now += TimeDelta::hours(6);
        sender.send_due(now).await.unwrap();
    }
    let rows = store.outbox_list(1000).await.unwrap();
    let mut copies: std::collections::HashMap<String, usize> = Default::default();
    for p in smtp.spooled() {
        let raw = std::fs::read(&p).unwrap();
        *copies.entry(message_id_of(&raw).unwrap()).or_default() += 1;
    }
    let (mut sent, mut dup_after_retry, mut bad) = (0, 0, vec![]);
    for r in &rows {
        let prefix = format!("<outbox-{}.", r.item.id);
        let n = copies
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, n)| *n)
            .sum::<usize>();
        if r.state == "sent" {
            sent += 1;
        }
        if n > 1 {
            dup_after_retry += 1;
        }
        // Sent -> at least one copy; more copies than attempts never; a copy without a retry
        // would be a duplicate D9 does not allow.
        if (r.state == "sent" && n == 0) || n > r.item.attempts as usize {
            bad.push((r.item.id, r.state.clone(), r.item.attempts, n));
        }
    }
    let connections = proxy.faults.lock().unwrap().len();
    support::figure(
        "N2",
        &format!("{items} digests via fault proxy to SMTP, seed {seed}, timeout 2 s"),
        &format!(
            "{sent} of {items} sent in {rounds} rounds, {dup_after_retry} with a second copy after a retry, {} bad, {connections} connections ({})",
            bad.len(),
            proxy.summary()
        ),
    );
    assert!(bad.is_empty(), "seed {seed}: {bad:?}");
    assert_eq!(sent, items as usize, "seed {seed}: {rows:?}");
    assert!(proxy.fatal_count() > 0, "seed {seed}: no fault fired");
}
