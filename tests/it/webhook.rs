//! Webhook ingestion over real HTTP against a running `frontdesk run`.
//!
//! Each test starts the daemon binary with its own state directory and port. The binary is
//! `$FRONTDESK_BIN` if set, else cargo's `CARGO_BIN_EXE_frontdesk`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Backend, LazyFs};

// ---------- the daemon under test ----------

struct Daemon {
    dir: tempfile::TempDir,
    state: PathBuf,
    port: u16,
    child: Option<Child>,
    /// The PostgreSQL database when the daemon runs on one.
    pg_url: Option<String>,
}

fn binary() -> PathBuf {
    std::env::var_os("FRONTDESK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_frontdesk")))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn write_secret(dir: &Path, name: &str, value: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, value).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

impl Daemon {
    /// `sources` is YAML for the list under `sources:`; `{dir}` is replaced by the temp dir.
    /// `state` overrides where the database lives (for the tmpfs test).
    fn start(sources: &str, state: Option<PathBuf>, server_extra: &str) -> Daemon {
        Daemon::start_on(Backend::Sqlite, sources, state, server_extra)
    }

    /// Like `start`, on the given backend (PostgreSQL: a fresh database in the test cluster).
    fn start_on(
        backend: Backend,
        sources: &str,
        state: Option<PathBuf>,
        server_extra: &str,
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let state = state.unwrap_or_else(|| dir.path().join("state"));
        let storage = backend.storage_yaml(&state.join("fd.db"));
        Daemon::start_in(dir, state, storage, sources, server_extra)
    }

    /// Starts in `dir` with the given `storage:` block.
    fn start_in(
        dir: tempfile::TempDir,
        state: PathBuf,
        storage: String,
        sources: &str,
        server_extra: &str,
    ) -> Daemon {
        let port = free_port();
        let sources = sources.replace("{dir}", &dir.path().display().to_string());
        let pg_url = storage
            .strip_prefix("storage:\n  postgres: ")
            .map(|u| u.trim().to_string());
        let yaml = format!(
            "timezone: UTC\n{storage}server:\n  listen: 127.0.0.1:{port}\n{server_extra}\nsources:\n{sources}\nchannels:\n  - name: out\n    email: {{ file: {out}, from: \"fd <fd@example.test>\", to: [owner@example.test] }}\n",
            out = dir.path().join("outbox").display(),
        );
        std::fs::write(dir.path().join("fd.yaml"), yaml).unwrap();
        let mut d = Daemon {
            dir,
            state,
            port,
            child: None,
            pg_url,
        };
        d.spawn();
        d
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("fd.yaml")
    }

    fn spawn(&mut self) {
        self.spawn_wrapped(&[]);
    }

    /// Starts the daemon, optionally under a wrapper command (`strace ... --`).
    fn spawn_wrapped(&mut self, wrapper: &[String]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(self.config())
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start frontdesk");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("daemon exited early: {status}; log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon not listening; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_free_sigterm(c.id());
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn db(&self) -> PathBuf {
        self.state.join("fd.db")
    }

    /// `PRAGMA integrity_check` (`ok` on PostgreSQL, which checks its own pages) and
    /// `(id, origin_key, raw)` of every row of `source`.
    async fn stored_rows(&self, source: &str) -> (String, Vec<(i64, String, Vec<u8>)>) {
        const SQL: &str = "SELECT id, origin_key, raw FROM messages WHERE source = $1";
        if let Some(url) = &self.pg_url {
            let pool = frontdesk::store::pool_options::<sqlx::Postgres>()
                .connect(url)
                .await
                .unwrap();
            let rows = sqlx::query_as(SQL)
                .bind(source)
                .fetch_all(&pool)
                .await
                .unwrap();
            pool.close().await;
            return ("ok".into(), rows);
        }
        let pool = frontdesk::store::pool_options::<sqlx::Sqlite>()
            .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(self.db()))
            .await
            .unwrap();
        let (integrity,): (String,) = sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(&pool)
            .await
            .unwrap();
        let rows = sqlx::query_as(SQL)
            .bind(source)
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        (integrity, rows)
    }

    /// Rows stored for `source`, read from whichever backend the daemon uses.
    async fn row_count(&self, source: &str) -> i64 {
        let Some(url) = &self.pg_url else {
            return row_count(&self.db(), source).await;
        };
        let pool = frontdesk::store::pool_options::<sqlx::Postgres>()
            .max_connections(1)
            .connect(url)
            .await
            .unwrap();
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM messages WHERE source = $1")
            .bind(source)
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n
    }
}

/// SIGTERM through the `kill` command (no libc dependency in the tests).
fn unsafe_free_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------- a tiny HTTP/1.1 client (full control over bytes and timing) ----------

#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    headers: String,
    body: String,
}

async fn request(port: u16, path: &str, headers: &[(&str, String)], body: &[u8]) -> Reply {
    try_request(port, path, headers, body)
        .await
        .expect("request failed")
}

pub(crate) async fn try_request(
    port: u16,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    read_reply(&mut s).await
}

async fn read_reply(s: &mut TcpStream) -> std::io::Result<Reply> {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("reply timeout"))??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no reply head: {text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    Ok(Reply {
        status,
        headers: head.to_string(),
        body: body.to_string(),
    })
}

pub(crate) fn reply_id(r: &Reply) -> i64 {
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json reply");
    v["id"].as_i64().expect("id in reply")
}

async fn row_count(db: &Path, source: &str) -> i64 {
    let pool = crate::support::open_sqlite(db, true).await.unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM messages WHERE source = ?")
        .bind(source)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

// ---------- signing, as the providers' SDKs do (vectors in reliability.md §3.2) ----------

fn hmac256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

pub(crate) fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn sw_sign(secret: &str, id: &str, ts: i64, body: &[u8]) -> String {
    let key = B64.decode(secret.trim_start_matches("whsec_")).unwrap();
    let sig = hmac256(&key, &[format!("{id}.{ts}.").as_bytes(), body]);
    format!("v1,{}", B64.encode(sig))
}

pub(crate) fn sw_headers(
    secret: &str,
    id: &str,
    ts: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/json".into()),
        ("webhook-id", id.into()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sw_sign(secret, id, ts, body)),
    ]
}

fn flip(body: &[u8], i: usize) -> Vec<u8> {
    let mut b = body.to_vec();
    let n = b.len();
    b[i % n] ^= 1;
    b
}

pub(crate) const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_OTHER: &str = "whsec_dGVzdC1zZWNyZXQtdGhhdC1pcy1sb25nLWVub3VnaA==";
const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const SLACK_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
const TW_BODY: &str = "CallSid=CA1234567890ABCDE&Caller=%2B12349013030&Digits=1234&From=%2B12349013030&To=%2B18005551212";

fn all_schemes_sources(dir: &Path) -> String {
    write_secret(dir, "sw1", SW_OTHER);
    write_secret(dir, "sw2", SW_SECRET);
    write_secret(dir, "gh", "It's a Secret to Everybody");
    write_secret(dir, "slack", SLACK_SECRET);
    write_secret(dir, "tw", "12345");
    write_secret(dir, "stripe", "whsec_test_secret");
    write_secret(dir, "mg", "key-test");
    write_secret(dir, "hm", "s3cret");
    write_secret(dir, "bearer", "tok-123");
    write_secret(dir, "basicpw", "pass");
    // The §3.2 vectors carry fixed timestamps from the past: those sources get a wide window;
    // `sw-now` keeps the default 5 minutes for the window tests.
    r#"  - name: sw
    webhook:
      preset: standard-webhooks
      auth: { scheme: standard-webhooks, secrets_file: [{dir}/sw1, {dir}/sw2], tolerance: 5000d }
  - name: sw-now
    webhook:
      preset: standard-webhooks
      auth: { scheme: standard-webhooks, secret_file: {dir}/sw2 }
  - name: gh
    webhook:
      preset: github
      auth: { scheme: github, secret_file: {dir}/gh }
  - name: slack
    webhook:
      preset: slack-events
      auth: { scheme: slack, secret_file: {dir}/slack, tolerance: 5000d }
  - name: tw
    webhook:
      preset: twilio-sms
      public_url: https://mycompany.com/myapp.php
      auth: { scheme: twilio, secret_file: {dir}/tw }
  - name: stripe
    webhook:
      preset: stripe
      auth: { scheme: stripe, secret_file: {dir}/stripe, tolerance: 5000d }
  - name: mg
    webhook:
      preset: mailgun-inbound
      auth: { scheme: mailgun, secret_file: {dir}/mg, tolerance: 5000d }
  - name: hm
    webhook:
      preset: json
      auth: { scheme: hmac-sha256, header: X-Signature, prefix: "sha256=", encoding: hex, secret_file: {dir}/hm }
      mapping: { id: /id, from: /from, text: /text }
  - name: bearer
    webhook:
      preset: form
      auth: { scheme: bearer, secret_file: {dir}/bearer }
  - name: basic
    webhook:
      preset: form
      auth: { scheme: basic, username: user, secret_file: {dir}/basicpw }
  - name: open
    webhook:
      preset: form
      auth: { scheme: none }
"#
    .to_string()
}

struct Case {
    source: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Whether a one-bit body change must fail (false for schemes that do not sign the body).
    body_signed: bool,
}

fn vector_cases() -> Vec<Case> {
    let sw_body = br#"{"test": 2432232314}"#.to_vec();
    let mg_body = b"timestamp=1700000000&token=a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0&signature=ccd507e80e5052977315f18193ac71eb0601f1365aa5261f2ea13964881d8084&sender=client%40x.test&subject=hi&body-plain=hello&Message-Id=%3Cmg-vector%40x.test%3E".to_vec();
    let hm_body = br#"{"id":"h1","from":"c@x.test","text":"hi"}"#.to_vec();
    vec![
        Case {
            source: "sw",
            path: "/hooks/sw".into(),
            headers: vec![
                ("content-type", "application/json".into()),
                ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".into()),
                ("webhook-timestamp", "1614265330".into()),
                (
                    "webhook-signature",
                    "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".into(),
                ),
            ],
            body: sw_body,
            body_signed: true,
        },
        Case {
            source: "gh",
            path: "/hooks/gh".into(),
            headers: vec![
                ("x-github-event", "issues".into()),
                ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958".into()),
                (
                    "x-hub-signature-256",
                    "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
                        .into(),
                ),
            ],
            body: b"Hello, World!".to_vec(),
            body_signed: true,
        },
        Case {
            source: "slack",
            path: "/hooks/slack".into(),
            headers: vec![
                ("content-type", "application/x-www-form-urlencoded".into()),
                ("x-slack-request-timestamp", "1531420618".into()),
                (
                    "x-slack-signature",
                    "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503".into(),
                ),
            ],
            body: SLACK_BODY.as_bytes().to_vec(),
            body_signed: true,
        },
        Case {
            // Behind a proxy: plain HTTP on loopback, the signature covers the public URL.
            source: "tw",
            path: "/hooks/tw?foo=1&bar=2".into(),
            headers: vec![
                ("content-type", "application/x-www-form-urlencoded".into()),
                ("x-forwarded-proto", "https".into()),
                ("x-forwarded-host", "mycompany.com".into()),
                ("x-twilio-signature", "0/KCTR6DLpKmkAf8muzZqo1nDgQ=".into()),
            ],
            body: TW_BODY.as_bytes().to_vec(),
            body_signed: true,
        },
        Case {
            source: "stripe",
            path: "/hooks/stripe".into(),
            headers: vec![
                ("content-type", "application/json".into()),
                (
                    "stripe-signature",
                    "t=1700000000,v1=8042376f6ca064adbe037642a718227dfd59047137eb49497a54c49eb0cfb724"
                        .into(),
                ),
            ],
            body: br#"{"id":"evt_test","object":"event"}"#.to_vec(),
            body_signed: true,
        },
        Case {
            // Mailgun signs timestamp+token only; a body bit elsewhere is not covered.
            source: "mg",
            path: "/hooks/mg".into(),
            headers: vec![("content-type", "application/x-www-form-urlencoded".into())],
            body: mg_body,
            body_signed: false,
        },
        Case {
            source: "hm",
            path: "/hooks/hm".into(),
            headers: vec![
                ("content-type", "application/json".into()),
                (
                    "x-signature",
                    format!("sha256={}", hex::encode(hmac256(b"s3cret", &[&hm_body]))),
                ),
            ],
            body: hm_body,
            body_signed: true,
        },
        Case {
            source: "bearer",
            path: "/hooks/bearer".into(),
            headers: vec![
                ("authorization", "Bearer tok-123".into()),
                ("content-type", "application/json".into()),
            ],
            body: br#"{"email":"a@x.test","message":"hi"}"#.to_vec(),
            body_signed: false,
        },
        Case {
            source: "basic",
            path: "/hooks/basic".into(),
            headers: vec![
                ("authorization", format!("Basic {}", B64.encode("user:pass"))),
                ("content-type", "application/json".into()),
            ],
            body: br#"{"email":"b@x.test","message":"hi"}"#.to_vec(),
            body_signed: false,
        },
        Case {
            source: "open",
            path: "/hooks/open".into(),
            headers: vec![("content-type", "application/json".into())],
            body: br#"{"email":"c@x.test","message":"hi"}"#.to_vec(),
            body_signed: false,
        },
    ]
}

/// Mutations of the credential itself (signature, timestamp or id), one per case.
fn credential_mutants(c: &Case) -> Vec<Vec<(&'static str, String)>> {
    let mut out = Vec::new();
    for (i, (k, v)) in c.headers.iter().enumerate() {
        let mutable = matches!(
            *k,
            "webhook-id"
                | "webhook-timestamp"
                | "webhook-signature"
                | "x-hub-signature-256"
                | "x-slack-request-timestamp"
                | "x-slack-signature"
                | "x-twilio-signature"
                | "stripe-signature"
                | "x-signature"
                | "authorization"
        );
        if !mutable {
            continue;
        }
        let mut bytes = v.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        let mut h = c.headers.clone();
        h[i] = (k, String::from_utf8(bytes).unwrap());
        out.push(h);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scheme_verifies_vectors_and_rejects_mutations_sqlite() {
    every_scheme_verifies_vectors_and_rejects_mutations_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scheme_verifies_vectors_and_rejects_mutations_postgres() {
    every_scheme_verifies_vectors_and_rejects_mutations_on(Backend::Postgres).await;
}

async fn every_scheme_verifies_vectors_and_rejects_mutations_on(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let sources =
        all_schemes_sources(tmp.path()).replace("{dir}", &tmp.path().display().to_string());
    let d = Daemon::start_on(backend, &sources, None, "");
    for c in vector_cases() {
        let r = request(d.port, &c.path, &c.headers, &c.body).await;
        assert_eq!(r.status, 200, "{} genuine: {r:?}", c.source);
        let id = reply_id(&r);
        let before = d.row_count(c.source).await;
        assert_eq!(before, 1, "{}", c.source);
        // The same delivery again: same id, no new row.
        let again = request(d.port, &c.path, &c.headers, &c.body).await;
        assert_eq!(
            (again.status, reply_id(&again)),
            (200, id),
            "{} repeat",
            c.source
        );
        if c.body_signed {
            for bit in [0, c.body.len() / 2, c.body.len() - 1] {
                let r = request(d.port, &c.path, &c.headers, &flip(&c.body, bit)).await;
                assert_eq!(r.status, 401, "{} body bit {bit}: {r:?}", c.source);
            }
        }
        for h in credential_mutants(&c) {
            let r = request(d.port, &c.path, &h, &c.body).await;
            assert_eq!(r.status, 401, "{} credential mutant {h:?}", c.source);
        }
        assert_eq!(d.row_count(c.source).await, 1, "{} rows", c.source);
    }
    // Mailgun: the same token with another delivery is a replay -> 401, no row.
    let replay = b"timestamp=1700000000&token=a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0&signature=ccd507e80e5052977315f18193ac71eb0601f1365aa5261f2ea13964881d8084&sender=other%40x.test&Message-Id=%3Canother%40x.test%3E";
    let r = request(
        d.port,
        "/hooks/mg",
        &[("content-type", "application/x-www-form-urlencoded".into())],
        replay,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(d.row_count("mg").await, 1);
    // Twilio: without the query the URL differs -> 401; reordered params -> still valid.
    let tw = &vector_cases()[3];
    let r = request(d.port, "/hooks/tw", &tw.headers, &tw.body).await;
    assert_eq!(r.status, 401);
    let reordered = b"To=%2B18005551212&Digits=1234&CallSid=CA1234567890ABCDE&From=%2B12349013030&Caller=%2B12349013030";
    let r = request(d.port, &tw.path, &tw.headers, reordered).await;
    assert_eq!(r.status, 200, "{r:?}");
    // `frontdesk sources` shows the counters (rejections were flushed with the last commit).
    let out = Command::new(binary())
        .args(["sources", "--json", "--config"])
        .arg(d.config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sw = list
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "webhook" && l["source"] == "sw")
        .expect("sw in frontdesk sources");
    assert_eq!(
        (sw["accepted"].as_i64(), sw["duplicates"].as_i64()),
        (Some(1), Some(1))
    );
    assert!(
        sw["rejected"]["bad_signature"].as_i64().unwrap_or(0) >= 3,
        "{sw}"
    );
    assert!(sw["last_delivery_at"].is_string());
    let open = list
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["source"] == "open")
        .expect("open in frontdesk sources");
    assert_eq!(open["preset"], "form");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_rotation_and_status_codes_sqlite() {
    window_rotation_and_status_codes_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_rotation_and_status_codes_postgres() {
    window_rotation_and_status_codes_on(Backend::Postgres).await;
}

async fn window_rotation_and_status_codes_on(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let sources =
        all_schemes_sources(tmp.path()).replace("{dir}", &tmp.path().display().to_string());
    let d = Daemon::start_on(backend, &sources, None, "");
    let body = br#"{"type":"contact.created","data":{"email":"w@x.test"}}"#;
    // The server checks the skew in whole seconds against its own clock: a request that
    // crosses into the next second sees a skew 1 s smaller (on a loaded CI box `w-future` at
    // +301 s was once accepted). Each case is judged only on a request that began and ended in
    // one second, so the server's clock read the same second as `ts` was derived from.
    for (id, offset, want) in [
        ("w-old", -301, 401),
        ("w-future", 301, 401),
        ("w-ok-old", -290, 200),
        ("w-ok-future", 290, 200),
    ] {
        let mut judged = false;
        for _attempt in 0..10 {
            let before = now_secs();
            let r = request(
                d.port,
                "/hooks/sw-now",
                &sw_headers(SW_SECRET, id, before + offset, body),
                body,
            )
            .await;
            if now_secs() != before {
                continue;
            }
            assert_eq!(r.status, want, "{id}: {r:?}");
            judged = true;
            break;
        }
        assert!(judged, "{id}: no request fitted in one second in 10 tries");
    }
    let now = now_secs();
    // Two secrets configured: both sign valid requests; a list with one bad signature passes.
    for (i, secret) in [SW_OTHER, SW_SECRET].iter().enumerate() {
        let id = format!("rot-{i}");
        let r = request(
            d.port,
            "/hooks/sw",
            &sw_headers(secret, &id, now, body),
            body,
        )
        .await;
        assert_eq!(r.status, 200, "secret {i}");
    }
    let mut h = sw_headers(SW_SECRET, "rot-list", now, body);
    h[3].1 = format!("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= {}", h[3].1);
    assert_eq!(request(d.port, "/hooks/sw", &h, body).await.status, 200);
    // Unknown key set on the sender side -> 401, never 403/406/410.
    let h = sw_headers(
        "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "rot-bad",
        now,
        body,
    );
    let r = request(d.port, "/hooks/sw", &h, body).await;
    assert_eq!(r.status, 401);
    // Missing required field -> 422 naming the field and pointer.
    let hm = br#"{"id":"h2","text":"no sender"}"#;
    let sig = format!("sha256={}", hex::encode(hmac256(b"s3cret", &[hm])));
    let r = request(d.port, "/hooks/hm", &[("x-signature", sig)], hm).await;
    assert_eq!(r.status, 422);
    assert!(
        r.body.contains("from") && r.body.contains("/from"),
        "{}",
        r.body
    );
    // Slack url_verification is answered, nothing stored.
    let ch = br#"{"type":"url_verification","challenge":"abc123"}"#;
    let ts = now.to_string();
    let sig = format!(
        "v0={}",
        hex::encode(hmac256(
            SLACK_SECRET.as_bytes(),
            &[format!("v0:{ts}:").as_bytes(), ch]
        ))
    );
    let r = request(
        d.port,
        "/hooks/slack",
        &[
            ("content-type", "application/json".into()),
            ("x-slack-request-timestamp", ts),
            ("x-slack-signature", sig),
        ],
        ch,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("abc123"));
    assert_eq!(d.row_count("slack").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_identical_deliveries_make_one_row_sqlite() {
    fifty_concurrent_identical_deliveries_make_one_row_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_identical_deliveries_make_one_row_postgres() {
    fifty_concurrent_identical_deliveries_make_one_row_on(Backend::Postgres).await;
}

async fn fifty_concurrent_identical_deliveries_make_one_row_on(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let sources =
        all_schemes_sources(tmp.path()).replace("{dir}", &tmp.path().display().to_string());
    let d = Daemon::start_on(backend, &sources, None, "");
    let body: &'static [u8] = br#"{"type":"t","data":{"email":"dup@x.test"}}"#;
    let h = Arc::new(sw_headers(SW_SECRET, "msg_dup", now_secs(), body));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let h = h.clone();
        let port = d.port;
        tasks.push(tokio::spawn(async move {
            request(port, "/hooks/sw", &h, body).await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        ids.insert(reply_id(&r));
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(d.row_count("sw").await, 1);
}

/// PostgreSQL crashes (`pg_ctl stop -m immediate`) while deliveries arrive: they are answered
/// 503 (never 2xx), and once the server is back the same daemon stores them without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_answers_503_then_recovers_without_restart() {
    let cluster = crate::support::start_pg_cluster(&[]);
    let url = cluster.fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let sources =
        all_schemes_sources(dir.path()).replace("{dir}", &dir.path().display().to_string());
    let state = dir.path().join("state");
    let d = Daemon::start_in(
        dir,
        state,
        format!("storage:\n  postgres: {url}\n"),
        &sources,
        "",
    );
    let body: &'static [u8] = br#"{"type":"t","data":{"email":"pg@x.test"}}"#;
    let send = |id: &'static str| {
        let h = sw_headers(SW_SECRET, id, now_secs(), body);
        let port = d.port;
        async move { try_request(port, "/hooks/sw", &h, body).await }
    };
    let first = send("msg_before").await.unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    cluster.control("crash");
    let asked = Instant::now();
    let during = send("msg_during").await;
    if let Ok(r) = &during {
        assert_eq!(r.status, 503, "a delivery during the outage: {r:?}");
    }
    // A provider must hear "retry later" quickly, not time out (reliability.md L1: never > 3 s).
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "the outage answer took {:?}",
        asked.elapsed()
    );
    cluster.control("restart");
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        match send("msg_during").await {
            Ok(r) if r.status == 200 => break r,
            Ok(r) => assert_eq!(r.status, 503, "{r:?}"),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after the restart; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(reply_id(&stored), reply_id(&first));
    let again = send("msg_before").await.unwrap();
    assert_eq!(
        reply_id(&again),
        reply_id(&first),
        "the duplicate keeps its id"
    );
    assert_eq!(d.row_count("sw").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_catalogue() {
    let tmp = tempfile::tempdir().unwrap();
    let sources =
        all_schemes_sources(tmp.path()).replace("{dir}", &tmp.path().display().to_string());
    let d = Daemon::start(&sources, None, "  header_timeout: 2s\n");
    let port = d.port;

    // Oversized by Content-Length: 413 before reading the body.
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"POST /hooks/open HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\nContent-Type: application/json\r\n\r\n{\"a\":")
        .await
        .unwrap();
    let r = read_reply(&mut s).await.unwrap();
    assert_eq!(r.status, 413);
    assert!(t.elapsed() < Duration::from_secs(1));

    // Endless chunked body: 413 after the limit, within a second.
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"POST /hooks/open HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 65536, "a".repeat(65536));
    let mut status = None;
    for _ in 0..64 {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        let mut peek = [0u8; 12];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), s.peek(&mut peek)).await
            && n >= 12
        {
            status = Some(String::from_utf8_lossy(&peek[9..12]).to_string());
            break;
        }
    }
    if status.is_none() {
        status = read_reply(&mut s).await.ok().map(|r| r.status.to_string());
    }
    assert_eq!(status.as_deref(), Some("413"));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // Slowloris: 1 byte per second of headers -> closed at the header timeout (2 s here);
    // meanwhile another client is served.
    let slow = tokio::spawn(async move {
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let head = b"POST /hooks/open HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa";
        for b in head {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return t.elapsed(),
                Ok(Ok(_)) => {
                    // A 408 before closing is also acceptable: the server gave up on us.
                    return t.elapsed();
                }
                Err(_) => {}
            }
        }
        t.elapsed() + Duration::from_secs(1000)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = request(
        port,
        "/hooks/open",
        &[("content-type", "application/json".into())],
        br#"{"email":"fast@x.test","message":"served"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let waited = slow.await.unwrap();
    assert!(
        waited <= Duration::from_secs(5),
        "slow client held for {waited:?}"
    );

    // Invalid UTF-8 in a JSON body with a valid signature: stored raw as degraded, 2xx.
    let bad = b"{\"id\":\"u1\",\"from\":\"\xff\xfe\",\"text\":\"x\"}";
    let sig = format!("sha256={}", hex::encode(hmac256(b"s3cret", &[bad])));
    let r = request(port, "/hooks/hm", &[("x-signature", sig)], bad).await;
    assert_eq!(r.status, 200, "{r:?}");
    // JSON nested 100,000 deep: degraded, fast, no stack overflow.
    let deep = "[".repeat(100_000);
    let sig = format!(
        "sha256={}",
        hex::encode(hmac256(b"s3cret", &[deep.as_bytes()]))
    );
    let t = Instant::now();
    let r = request(port, "/hooks/hm", &[("x-signature", sig)], deep.as_bytes()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
    // 100,000 form fields: limits enforced, stored raw as degraded.
    let many = "a=1&".repeat(100_000);
    let r = request(
        port,
        "/hooks/open",
        &[("content-type", "application/x-www-form-urlencoded".into())],
        many.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    // Duplicate keys, huge numbers and NaN: deterministic, no panic.
    for body in [
        &br#"{"email":"a@x.test","email":"b@x.test","message":"dup"}"#[..],
        br#"{"email":"n@x.test","message":1e999999}"#,
        br#"{"email":"n@x.test","message":NaN}"#,
    ] {
        let r = request(
            port,
            "/hooks/open",
            &[("content-type", "application/json".into())],
            body,
        )
        .await;
        assert!(matches!(r.status, 200 | 422), "{r:?}");
    }
    let pool = frontdesk::store::pool_options::<sqlx::Sqlite>()
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(d.db())
                .read_only(true),
        )
        .await
        .unwrap();
    let (degraded,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM messages WHERE parse = 'degraded'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(degraded >= 3, "degraded rows: {degraded}");
    // The daemon is still alive and serving.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let r = request(
        port,
        "/hooks/open",
        &[],
        br#"{"email":"z@x.test","message":"alive"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
}

/// D1: signed deliveries from a client that retries like a provider (same id and body, fresh
/// signature), SIGKILLs at random moments with restarts. Per commit: 2,000 deliveries, 10 kills;
/// `FRONTDESK_RELIABILITY=long` (scripts/reliability): 10,000 deliveries of 0.1-50 KB, 50 kills,
/// each restart listening again within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_flood_loses_and_duplicates_nothing() {
    sigkill_during_flood_on(Backend::Sqlite).await;
}

/// The same on PostgreSQL: the daemon dies, the server keeps what was committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_flood_loses_and_duplicates_nothing_postgres() {
    sigkill_during_flood_on(Backend::Postgres).await;
}

async fn sigkill_during_flood_on(backend: Backend) {
    use rand::Rng;
    let long = crate::support::long_run();
    let (total, kills, pad_range, ready_limit) = if long {
        (10_000, 50, 100..50_000, Duration::from_secs(2))
    } else {
        (2_000, 10, 50..3_000, Duration::from_secs(5))
    };
    let tmp = tempfile::tempdir().unwrap();
    write_secret(tmp.path(), "sw", SW_SECRET);
    let sources = format!(
        "  - name: sw\n    webhook:\n      preset: standard-webhooks\n      max_body: 1MiB\n      auth: {{ scheme: standard-webhooks, secret_file: {}/sw }}\n",
        tmp.path().display()
    );
    let daemon = Arc::new(tokio::sync::Mutex::new(Daemon::start_on(
        backend, &sources, None, "",
    )));
    let port = daemon.lock().await.port;
    let mut bodies = Vec::with_capacity(total);
    {
        let mut rng = rand::rng();
        for i in 0..total {
            let pad: String = (0..rng.random_range(pad_range.clone()))
                .map(|_| char::from(rng.random_range(b'a'..=b'z')))
                .collect();
            bodies.push(format!(r#"{{"type":"t","data":{{"n":{i},"pad":"{pad}"}}}}"#).into_bytes());
        }
    }
    let bodies = Arc::new(bodies);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acked = Arc::new(std::sync::Mutex::new(BTreeMap::<usize, i64>::new()));
    let retries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (bodies, next, acked, retries) =
            (bodies.clone(), next.clone(), acked.clone(), retries.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= bodies.len() {
                    return;
                }
                let id = format!("msg_{i}");
                let body = &bodies[i];
                let mut ok = false;
                for attempt in 0..200 {
                    if attempt > 0 {
                        retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // A provider re-signs each attempt with a fresh timestamp and the same id.
                    let h = sw_headers(SW_SECRET, &id, now_secs(), body);
                    if let Ok(r) = try_request(port, "/hooks/sw", &h, body).await
                        && r.status == 200
                    {
                        acked.lock().unwrap().insert(i, reply_id(&r));
                        ok = true;
                        break;
                    }
                    let backoff = rand::rng().random_range(50..500);
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                }
                assert!(ok, "delivery {i} never acknowledged");
            }
        }));
    }
    let killer = {
        let (daemon, done) = (daemon.clone(), done.clone());
        tokio::spawn(async move {
            let (mut ready, mut during_flood) = (Vec::new(), 0);
            for _ in 0..kills {
                let pause = rand::rng().random_range(50..500);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                if !done.load(std::sync::atomic::Ordering::SeqCst) {
                    during_flood += 1;
                }
                let mut d = daemon.lock().await;
                d.kill9();
                let t = Instant::now();
                d.spawn();
                ready.push(t.elapsed());
            }
            (ready, during_flood)
        })
    };
    for w in workers {
        w.await.unwrap();
    }
    let flood_took = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ready, during_flood) = killer.await.unwrap();
    let mut d = daemon.lock().await;
    d.stop();
    let acked = acked.lock().unwrap().clone();
    let (integrity, rows) = d.stored_rows("sw").await;
    let mut by_key: HashMap<String, Vec<(i64, Vec<u8>)>> = HashMap::new();
    for (id, key, raw) in rows {
        by_key.entry(key).or_default().push((id, raw));
    }
    let (mut lost, mut dups, mut differ) = (0, 0, 0);
    for (i, id) in &acked {
        match by_key.get(&format!("hook:msg_{i}")) {
            None => lost += 1,
            Some(stored) if stored.len() > 1 => dups += 1,
            Some(stored) => {
                if stored[0].0 != *id || Sha256::digest(&stored[0].1) != Sha256::digest(&bodies[*i])
                {
                    differ += 1;
                }
            }
        }
    }
    let max_ready = ready.iter().max().copied().unwrap_or_default();
    crate::support::figure(
        if backend == Backend::Postgres {
            "D1-pg"
        } else {
            "D1"
        },
        &format!("{total} msgs, {kills} SIGKILLs ({during_flood} during the flood), 4 clients"),
        &format!(
            "{} acked, {lost} lost, {dups} dup, {differ} differ, {} stored, integrity {integrity}, {} retries, max ready {:.2} s, flood {:.0} s",
            acked.len(),
            by_key.len(),
            retries.load(std::sync::atomic::Ordering::Relaxed),
            max_ready.as_secs_f64(),
            flood_took.as_secs_f64(),
        ),
    );
    assert_eq!(acked.len(), total);
    assert_eq!(integrity, "ok");
    assert_eq!(
        (lost, dups, differ),
        (0, 0, 0),
        "lost, duplicated, differing"
    );
    assert_eq!(by_key.len(), total);
    assert!(max_ready < ready_limit, "a restart took {max_ready:?}");
}

/// D7: disk full on a small tmpfs -> 503 (never 2xx) within 1 s; 2xx again within 5 s of freeing
/// space, without a restart. Needs root (mount); skipped with a message otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_answers_503_then_recovers_without_restart() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipping disk-full test: cannot mount tmpfs (not root?)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.path().to_path_buf());
    let tmp = tempfile::tempdir().unwrap();
    write_secret(tmp.path(), "sw", SW_SECRET);
    let sources = format!(
        "  - name: sw\n    webhook:\n      preset: standard-webhooks\n      auth: {{ scheme: standard-webhooks, secret_file: {}/sw }}\n",
        tmp.path().display()
    );
    let state = mnt.path().join("state");
    let d = Daemon::start(&sources, Some(state.clone()), "");
    // Ballast: fill the tmpfs except ~1 MiB, so the flood reaches ENOSPC quickly.
    let ballast = mnt.path().join("ballast");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=6"])
        .arg(format!("of={}", ballast.display()))
        .stderr(Stdio::null())
        .status();
    let pad = "x".repeat(20_000);
    let mut first_503 = None;
    let mut after_fail = Vec::new();
    for i in 0..2000 {
        let body = format!(r#"{{"type":"t","data":{{"n":{i},"pad":"{pad}"}}}}"#);
        let id = format!("df_{i}");
        let t = Instant::now();
        let r = request(
            d.port,
            "/hooks/sw",
            &sw_headers(SW_SECRET, &id, now_secs(), body.as_bytes()),
            body.as_bytes(),
        )
        .await;
        let took = t.elapsed();
        match (first_503, r.status) {
            (None, 200) => {}
            (None, 503) => {
                assert!(took < Duration::from_secs(1), "503 took {took:?}");
                assert!(r.headers.to_ascii_lowercase().contains("retry-after"));
                first_503 = Some(Instant::now());
            }
            (Some(_), s) => {
                assert!(took < Duration::from_secs(1), "answer took {took:?}");
                after_fail.push(s);
                if after_fail.len() >= 20 {
                    break;
                }
            }
            (None, s) => panic!("unexpected status {s}: {r:?}"),
        }
    }
    assert!(first_503.is_some(), "never hit disk full");
    assert!(
        after_fail.iter().all(|s| *s == 503),
        "2xx while disk full: {after_fail:?}"
    );
    std::fs::remove_file(&ballast).unwrap();
    let freed = Instant::now();
    let mut recovered = false;
    let mut n = 0;
    while freed.elapsed() < Duration::from_secs(5) {
        n += 1;
        let body = format!(r#"{{"type":"t","data":{{"after":{n}}}}}"#);
        let id = format!("after_{n}");
        let r = request(
            d.port,
            "/hooks/sw",
            &sw_headers(SW_SECRET, &id, now_secs(), body.as_bytes()),
            body.as_bytes(),
        )
        .await;
        if r.status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::support::figure(
        "D7",
        "8 MiB tmpfs with 6 MiB ballast, 20 KB deliveries until ENOSPC, then ballast removed",
        &format!(
            "{} answers after the first failed commit: {} 2xx, every one within 1 s; 2xx again {:.2} s after freeing space (no restart)",
            after_fail.len(),
            after_fail.iter().filter(|s| **s == 200).count(),
            freed.elapsed().as_secs_f64()
        ),
    );
    assert!(
        recovered,
        "no 2xx within 5 s of freeing space; log:\n{}",
        d.log()
    );
}

/// D2: every 2xx is preceded by an fsync of the database or its WAL since the previous 2xx
/// (Postfix's rule, checked on the syscalls). Skipped when strace is not installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ack_follows_an_fsync_since_the_previous_ack() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("skipping fsync audit: strace not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    write_secret(tmp.path(), "sw", SW_SECRET);
    let sources = format!(
        "  - name: sw\n    webhook:\n      preset: standard-webhooks\n      auth: {{ scheme: standard-webhooks, secret_file: {}/sw }}\n",
        tmp.path().display()
    );
    let mut d = Daemon::start(&sources, None, "");
    d.kill9();
    let trace = tmp.path().join("trace.txt");
    let wrapper: Vec<String> = [
        "strace",
        "-f",
        "-yy",
        "-s",
        "300",
        "-e",
        "trace=fdatasync,fsync,write,writev,sendto,sendmsg",
        "-o",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([trace.display().to_string(), "--".to_string()])
    .collect();
    d.spawn_wrapped(&wrapper);
    for i in 0..200 {
        let body = format!(r#"{{"type":"t","data":{{"n":{i}}}}}"#);
        let id = format!("d2_{i}");
        let r = request(
            d.port,
            "/hooks/sw",
            &sw_headers(SW_SECRET, &id, now_secs(), body.as_bytes()),
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    // SIGTERM goes to the daemon itself (strace would detach and leave it running); strace then
    // exits when its tracee does.
    let strace_pid = d.child.as_ref().map(|c| c.id()).unwrap_or_default();
    let out = Command::new("ps")
        .args(["-o", "pid=", "--ppid", &strace_pid.to_string()])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        unsafe_free_sigterm(pid.parse().unwrap());
    }
    if let Some(mut c) = d.child.take() {
        let _ = c.wait();
    }
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut synced = false;
    let (mut acks, mut unsynced) = (0, 0);
    for line in text.lines() {
        let is_sync = (line.contains("fdatasync(") || line.contains("fsync("))
            && (line.contains("-wal>") || line.contains(".db>"));
        if is_sync {
            synced = true;
        }
        let is_ack = (line.contains("write") || line.contains("send"))
            && line.contains("TCP:[")
            && line.contains("HTTP/1.1 200")
            && line.contains("duplicate");
        if is_ack {
            acks += 1;
            if !synced {
                unsynced += 1;
            }
            synced = false;
        }
    }
    crate::support::figure(
        "D2",
        "200 sequential signed deliveries under strace -f -yy",
        &format!(
            "{acks} 2xx in the trace, {unsynced} without an fsync of the DB/WAL since the previous one"
        ),
    );
    assert_eq!(acks, 200, "acks seen in the trace");
    assert_eq!(
        unsynced, 0,
        "2xx sent without an fsync since the previous one"
    );
}

/// D3: simulated power loss. The state directory lives on a FUSE filesystem that keeps writes
/// in memory until fsync (tests/servers/lazyfs.py); each cycle floods signed webhooks, SIGKILLs
/// the daemon mid-flood, drops every unsynced write, remounts and restarts -> every acknowledged
/// delivery is stored byte-identical and the database passes `integrity_check`. 30 cycles; needs
/// root, /dev/fuse and mfusepy (`scripts/reliability D3` installs it), so ignored by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs FUSE and mfusepy: run by scripts/reliability"]
async fn power_loss_keeps_every_acknowledged_webhook() {
    use rand::Rng;
    const CYCLES: usize = 30;
    let tmp = tempfile::tempdir().unwrap();
    let (backing, mnt) = (tmp.path().join("backing"), tmp.path().join("mnt"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let mut fs = LazyFs::mount(&backing, &mnt, &tmp.path().join("lazyfs.log"));

    // The filesystem must be able to lose data, or the suite proves nothing.
    std::fs::write(mnt.join("unsynced"), b"lost").unwrap();
    let mut f = std::fs::File::create(mnt.join("synced")).unwrap();
    std::io::Write::write_all(&mut f, b"kept").unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs.power_cut();
    fs.remount();
    assert_eq!(std::fs::read(mnt.join("synced")).unwrap(), b"kept");
    assert_eq!(std::fs::read(mnt.join("unsynced")).unwrap(), b"");

    write_secret(tmp.path(), "sw", SW_SECRET);
    let sources = format!(
        "  - name: sw\n    webhook:\n      preset: standard-webhooks\n      auth: {{ scheme: standard-webhooks, secret_file: {}/sw }}\n",
        tmp.path().display()
    );
    let mut d = Daemon::start(&sources, Some(mnt.join("state")), "");
    let acked = Arc::new(std::sync::Mutex::new(HashMap::<String, Vec<u8>>::new()));
    let (mut ready_max, mut in_flight_at_kill) = (Duration::ZERO, 0usize);
    for cycle in 0..CYCLES {
        let port = d.port;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let inflight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for w in 0..4 {
            let (acked, stop, inflight) = (acked.clone(), stop.clone(), inflight.clone());
            workers.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    n += 1;
                    let id = format!("pl_{cycle}_{w}_{n}");
                    let len = rand::rng().random_range(100..5_000);
                    let body = format!(
                        r#"{{"type":"t","data":{{"id":"{id}","pad":"{}"}}}}"#,
                        "p".repeat(len)
                    )
                    .into_bytes();
                    let h = sw_headers(SW_SECRET, &id, now_secs(), &body);
                    inflight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let r = try_request(port, "/hooks/sw", &h, &body).await;
                    inflight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    match r {
                        Ok(r) if r.status == 200 => {
                            acked.lock().unwrap().insert(id, body);
                        }
                        // The daemon is gone: this cycle is over for this client.
                        _ => return,
                    }
                }
            }));
        }
        let pause = rand::rng().random_range(200..1_200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        in_flight_at_kill += inflight.load(std::sync::atomic::Ordering::SeqCst);
        d.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for w in workers {
            w.await.unwrap();
        }
        fs.power_cut();
        fs.remount();
        let t = Instant::now();
        d.spawn();
        ready_max = ready_max.max(t.elapsed());
    }
    d.stop();
    fs.power_cut();
    // What a reboot finds: the backing files alone.
    let db = backing.join("state/fd.db");
    let pool = frontdesk::store::pool_options::<sqlx::Sqlite>()
        .max_connections(1)
        .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&db))
        .await
        .unwrap();
    let (integrity,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT origin_key, raw FROM messages WHERE source = 'sw'")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    let stored: HashMap<String, Vec<u8>> = rows.into_iter().collect();
    let acked = acked.lock().unwrap().clone();
    let lost = acked
        .keys()
        .filter(|id| !stored.contains_key(&format!("hook:{id}")))
        .count();
    let differ = acked
        .iter()
        .filter(|(id, body)| {
            stored
                .get(&format!("hook:{id}"))
                .is_some_and(|b| b != *body)
        })
        .count();
    let dropped = fs.dropped_writes();
    crate::support::figure(
        "D3",
        &format!(
            "{CYCLES} cycles of flood (4 clients), SIGKILL, drop unsynced writes, remount, restart"
        ),
        &format!(
            "{} acked, {lost} lost, {differ} differ, {} stored, integrity {integrity}, {dropped} unsynced writes dropped, {in_flight_at_kill} requests in flight at the kills, max ready {:.2} s",
            acked.len(),
            stored.len(),
            ready_max.as_secs_f64()
        ),
    );
    assert_eq!(integrity, "ok");
    assert_eq!(
        (lost, differ),
        (0, 0),
        "acknowledged deliveries lost or changed"
    );
    assert!(acked.len() > CYCLES, "the floods got acknowledgements");
}

/// One request of the soak: when it was scheduled (seconds since the start), how long its answer
/// took from that moment (so a stalled server cannot hide latency), and the status (0: no answer).
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: f64,
    latency: Duration,
    status: u16,
}

/// Offers `rate` signed requests per second for `secs`, open loop (a slow answer does not slow
/// the sender down), each on its own connection as providers do.
async fn open_loop(
    port: u16,
    rate: f64,
    secs: f64,
    pad: usize,
    tag: &str,
    origin: Instant,
    out: Arc<std::sync::Mutex<Vec<Sample>>>,
) {
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut next = tokio::time::Instant::now();
    let end = next + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    let mut n = 0u64;
    while next < end {
        tokio::time::sleep_until(next).await;
        let scheduled = next;
        let (out, id) = (out.clone(), format!("{tag}_{n}"));
        tasks.push(tokio::spawn(async move {
            let body = format!(
                r#"{{"type":"t","data":{{"id":"{id}","pad":"{}"}}}}"#,
                "s".repeat(pad)
            );
            let h = sw_headers(SW_SECRET, &id, now_secs(), body.as_bytes());
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                try_request(port, "/hooks/sw", &h, body.as_bytes()),
            )
            .await;
            let status = match r {
                Ok(Ok(r)) => r.status,
                _ => 0,
            };
            out.lock().unwrap().push(Sample {
                at: (scheduled.into_std() - origin).as_secs_f64(),
                latency: scheduled.elapsed(),
                status,
            });
        }));
        next += period;
        n += 1;
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Body size of the overload phase: large enough that a client on the same machine can offer
/// twice what the daemon can commit (with 1 KB bodies the client runs out of CPU first).
const HEAVY: usize = 256 * 1024;

/// `clients` clients each sending signed requests back to back for `secs`.
async fn closed_loop(
    port: u16,
    clients: usize,
    secs: f64,
    pad: usize,
    tag: &str,
    origin: Instant,
) -> Vec<Sample> {
    let out = Arc::new(std::sync::Mutex::new(Vec::new()));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (out, tag) = (out.clone(), tag.to_string());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < end {
                n += 1;
                let id = format!("{tag}_{c}_{n}");
                let body = format!(
                    r#"{{"type":"t","data":{{"id":"{id}","pad":"{}"}}}}"#,
                    "c".repeat(pad)
                );
                let h = sw_headers(SW_SECRET, &id, now_secs(), body.as_bytes());
                let t = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    try_request(port, "/hooks/sw", &h, body.as_bytes()),
                )
                .await;
                let status = match r {
                    Ok(Ok(r)) => r.status,
                    _ => 0,
                };
                out.lock().unwrap().push(Sample {
                    at: (t - origin).as_secs_f64(),
                    latency: t.elapsed(),
                    status,
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    out.lock().unwrap().clone()
}

fn percentile(samples: &[Sample], p: f64) -> Duration {
    let mut l: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    l.sort();
    l.get(((l.len() as f64 * p).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// L1 soak: 300 signed req/s for 60 s with IMAP mail arriving (5/s) -> p99 < 250 ms, 0 non-2xx,
/// RSS stable; then twice the measured capacity (256 KB bodies) for 10 s -> every answer within
/// 3 s, refusals are 503/429 answered within 1 s; then 300 req/s again -> p99 back under 250 ms
/// within 10 s.
/// Long only (about 2 min of both cores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load soak: run by scripts/reliability"]
async fn soak_at_300_per_second_then_twice_the_capacity() {
    let rig = crate::rig::Rig::shared();
    let user = rig.new_mailbox("l1soak");
    let tmp = tempfile::tempdir().unwrap();
    write_secret(tmp.path(), "sw", SW_SECRET);
    let sources = format!(
        "  - name: sw\n    webhook:\n      preset: standard-webhooks\n      auth: {{ scheme: standard-webhooks, secret_file: {}/sw }}\n  - name: mail\n    imap:\n      host: localhost\n      port: {}\n      tls: implicit\n      ca_file: {}\n      username: {user}\n      password: secret\n      backfill: all\n",
        tmp.path().display(),
        rig.imaps_port,
        rig.ca.display(),
    );
    let d = Daemon::start(&sources, None, "");
    let pid = d.child.as_ref().unwrap().id();
    let origin = Instant::now();
    let mail = {
        let user = user.clone();
        tokio::spawn(async move {
            let mut i = 0;
            while origin.elapsed() < Duration::from_secs(60) {
                let raw = crate::reliability::client_mail(i, "l1");
                let u = user.clone();
                tokio::task::spawn_blocking(move || rig.append(&u, "INBOX", &raw))
                    .await
                    .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            i
        })
    };
    let rss = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = {
        let rss = rss.clone();
        tokio::spawn(async move {
            loop {
                rss.lock().unwrap().push(rss_kib(pid));
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };
    // 1. steady: 300 req/s for 60 s.
    let steady = Arc::new(std::sync::Mutex::new(Vec::new()));
    open_loop(d.port, 300.0, 60.0, 1_000, "steady", origin, steady.clone()).await;
    let mails = mail.await.unwrap();
    let steady = steady.lock().unwrap().clone();
    let rss_steady = rss.lock().unwrap().clone();
    let p99 = percentile(&steady, 0.99);
    let non2xx = steady.iter().filter(|s| s.status != 200).count();

    // 2. capacity with 256 KB bodies: 64 clients back to back for 5 s.
    let capacity = closed_loop(d.port, 64, 5.0, HEAVY, "cap", origin).await;
    let capacity = capacity.iter().filter(|s| s.status == 200).count() as f64 / 5.0;

    // 3. overload: twice that rate, open loop, for 10 s.
    let over = Arc::new(std::sync::Mutex::new(Vec::new()));
    open_loop(
        d.port,
        2.0 * capacity,
        10.0,
        HEAVY,
        "over",
        origin,
        over.clone(),
    )
    .await;
    let over = over.lock().unwrap().clone();
    let slowest = over.iter().map(|s| s.latency).max().unwrap_or_default();
    let refused: Vec<&Sample> = over.iter().filter(|s| s.status != 200).collect();
    let refused_ok = refused
        .iter()
        .filter(|s| s.status == 503 || s.status == 429)
        .count();
    let slowest_refusal = refused.iter().map(|s| s.latency).max().unwrap_or_default();
    let over_rate = over.iter().filter(|s| s.status == 200).count() as f64 / 10.0;

    // 4. recovery: 300 req/s for 20 s; the p99 of what was sent 10 s after the burst.
    let after = Arc::new(std::sync::Mutex::new(Vec::new()));
    let burst_end = origin.elapsed().as_secs_f64();
    open_loop(d.port, 300.0, 20.0, 1_000, "after", origin, after.clone()).await;
    let after = after.lock().unwrap().clone();
    let settled: Vec<Sample> = after
        .iter()
        .filter(|s| s.at >= burst_end + 10.0)
        .copied()
        .collect();
    let p99_after = percentile(&settled, 0.99);
    sampler.abort();
    let rss_all = rss.lock().unwrap().clone();
    let rss_growth = match (rss_steady.get(1), rss_steady.last()) {
        (Some(a), Some(b)) if *a > 0 => *b as f64 / *a as f64,
        _ => 0.0,
    };
    crate::support::figure(
        "L1",
        &format!("300 signed req/s x 60 s (1 KB, new connection each) + {mails} IMAP deliveries"),
        &format!(
            "{} sent, p50 {:.1} ms, p99 {:.1} ms, {non2xx} non-2xx, RSS {} -> {} KiB (x{rss_growth:.2})",
            steady.len(),
            percentile(&steady, 0.5).as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            rss_steady.first().copied().unwrap_or(0),
            rss_steady.last().copied().unwrap_or(0),
        ),
    );
    crate::support::figure(
        "L1",
        &format!(
            "overload: 256 KB bodies at 2 x capacity = {:.0} req/s x 10 s, open loop (capacity {capacity:.0} req/s with 64 clients)",
            2.0 * capacity
        ),
        &format!(
            "{} sent, {over_rate:.0} acked/s, {} refused ({refused_ok} as 503/429, slowest refusal {:.2} s), slowest answer {:.2} s; after: p99 {:.1} ms 10 s later, peak RSS {} KiB",
            over.len(),
            refused.len(),
            slowest_refusal.as_secs_f64(),
            slowest.as_secs_f64(),
            p99_after.as_secs_f64() * 1e3,
            rss_all.iter().max().copied().unwrap_or(0),
        ),
    );
    assert!(p99 < Duration::from_millis(250), "steady p99 {p99:?}");
    assert_eq!(non2xx, 0, "non-2xx at 300 req/s");
    assert!(
        rss_growth < 1.5,
        "RSS grew x{rss_growth:.2} during the steady phase"
    );
    assert!(
        !refused.is_empty(),
        "the overload phase never overloaded the daemon"
    );
    assert_eq!(refused_ok, refused.len(), "refusals other than 503/429");
    assert!(
        slowest_refusal < Duration::from_secs(1),
        "refusal took {slowest_refusal:?}"
    );
    assert!(
        slowest < Duration::from_secs(3),
        "an answer took {slowest:?}"
    );
    assert!(
        p99_after < Duration::from_millis(250),
        "p99 after the burst {p99_after:?}"
    );
}
