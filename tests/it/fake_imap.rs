//! D6 (reliability.md): IMAP protocol quirks and faults, through the real `frontdesk` binary.
//!
//! **Why a fake server:** these are faults no real server shows on demand: a message expunged
//! between the listing and the FETCH, a connection cut in the middle of a literal (once, or every
//! time for one message), `* BYE` the moment IDLE starts, a server that answers one byte per
//! second, and a 50 MB literal the listing did not announce. Dovecot (the rig) covers everything
//! a well-behaved server does; this scripted server (plain TCP on loopback, `tls: none`) speaks
//! just enough IMAP4rev1 for frontdesk and then misbehaves exactly as each scenario says.
//!
//! Pass (D6): no panic, no partial row (every stored raw is byte-identical to the message),
//! the cursor at the highest UID fully accounted for, memory bounded, every read timed out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{self, TestDaemon};

/// What the scripted server holds and how it misbehaves.
#[derive(Default)]
struct Script {
    uid_validity: u32,
    messages: BTreeMap<u32, Vec<u8>>,
    /// UIDs answered by the size listing but dropped (expunged) once their body is asked for.
    expunge_on_fetch: HashSet<u32>,
    /// UID -> how many more body FETCHes are cut in the middle of the literal (u32::MAX: all).
    cut_literal: HashMap<u32, u32>,
    /// UID -> size the listing announces instead of the real one.
    announced_size: HashMap<u32, u64>,
    /// UID -> literal length actually sent for the body (filled with `x`), whatever was listed.
    huge_literal: HashMap<u32, usize>,
    /// Send `* BYE` right after the IDLE continuation, this many more times.
    bye_in_idle: u32,
    /// After LOGIN, send everything one byte per second.
    drip: bool,
    /// Every command received, tag stripped.
    commands: Vec<String>,
}

/// A scripted IMAP server on its own thread and runtime, so the test may block freely.
struct FakeImap {
    port: u16,
    script: Arc<Mutex<Script>>,
}

impl FakeImap {
    fn start(script: Script) -> FakeImap {
        let script = Arc::new(Mutex::new(script));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = script.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((sock, _)) = listener.accept().await else {
                        return;
                    };
                    tokio::spawn(serve(sock, shared.clone()));
                }
            });
        });
        FakeImap { port, script }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Script) -> R) -> R {
        f(&mut self.script.lock().unwrap())
    }

    fn commands(&self) -> Vec<String> {
        self.with(|s| s.commands.clone())
    }
}

fn message(uid: u32) -> Vec<u8> {
    format!(
        "From: Client {uid} <c{uid}@client.test>\r\nTo: team@shop.test\r\nSubject: fake {uid}\r\n\
Message-ID: <fake-{uid}@client.test>\r\nDate: Tue, 1 Jul 2025 10:00:00 +0000\r\n\r\n\
body of {uid}: {}\r\n",
        "0123456789".repeat(uid as usize % 7 + 1)
    )
    .into_bytes()
}

fn mailbox(uids: &[u32]) -> BTreeMap<u32, Vec<u8>> {
    uids.iter().map(|&u| (u, message(u))).collect()
}

/// Parses a UID set (`1:5,7,9:*`) against the UIDs present; `n:*` with n above the highest UID
/// yields the highest message, as RFC 3501 says and as real servers do (the `n:*` quirk).
fn uid_set(set: &str, present: &BTreeMap<u32, Vec<u8>>) -> Vec<u32> {
    let max = present.keys().next_back().copied().unwrap_or(0);
    let num = |s: &str| {
        if s == "*" {
            max
        } else {
            s.parse().unwrap_or(0)
        }
    };
    let mut out = Vec::new();
    for part in set.split(',') {
        let (a, b) = match part.split_once(':') {
            Some((a, b)) => (num(a), num(b)),
            None => (num(part), num(part)),
        };
        let (lo, hi) = (a.min(b), a.max(b));
        out.extend(present.range(lo..=hi).map(|(u, _)| *u));
    }
    out.sort_unstable();
    out.dedup();
    out
}

struct Out {
    sock: tokio::net::tcp::OwnedWriteHalf,
    drip: bool,
}

impl Out {
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        if !self.drip {
            return self.sock.write_all(data).await;
        }
        for b in data {
            self.sock.write_all(&[*b]).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(())
    }
}

async fn serve(sock: TcpStream, script: Arc<Mutex<Script>>) {
    let _ = session(sock, script).await;
}

async fn session(sock: TcpStream, script: Arc<Mutex<Script>>) -> std::io::Result<()> {
    let (rd, wr) = sock.into_split();
    let mut rd = BufReader::new(rd);
    let mut out = Out {
        sock: wr,
        drip: false,
    };
    out.send(b"* OK [CAPABILITY IMAP4rev1 IDLE] fake imap ready\r\n")
        .await?;
    let mut line = String::new();
    loop {
        line.clear();
        if rd.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let text = line.trim_end().to_string();
        let (tag, cmd) = text.split_once(' ').unwrap_or((text.as_str(), ""));
        let upper = cmd.to_ascii_uppercase();
        script.lock().unwrap().commands.push(cmd.to_string());
        if upper.starts_with("LOGIN") {
            out.send(format!("{tag} OK logged in\r\n").as_bytes())
                .await?;
            out.drip = script.lock().unwrap().drip;
        } else if upper.starts_with("CAPABILITY") {
            out.send(format!("* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK done\r\n").as_bytes())
                .await?;
        } else if upper.starts_with("EXAMINE") || upper.starts_with("SELECT") {
            let (n, next, v) = {
                let s = script.lock().unwrap();
                let max = s.messages.keys().next_back().copied().unwrap_or(0);
                (s.messages.len(), max + 1, s.uid_validity)
            };
            out.send(
                format!(
                    "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n\
* OK [PERMANENTFLAGS ()] read-only\r\n* {n} EXISTS\r\n* 0 RECENT\r\n\
* OK [UIDVALIDITY {v}] ok\r\n* OK [UIDNEXT {next}] ok\r\n{tag} OK [READ-ONLY] done\r\n"
                )
                .as_bytes(),
            )
            .await?;
        } else if upper.starts_with("UID SEARCH") {
            let uids: Vec<String> = {
                let s = script.lock().unwrap();
                s.messages.keys().map(|u| u.to_string()).collect()
            };
            out.send(format!("* SEARCH {}\r\n{tag} OK done\r\n", uids.join(" ")).as_bytes())
                .await?;
        } else if upper.starts_with("UID FETCH") {
            let mut parts = cmd.splitn(4, ' ');
            let set = parts.nth(2).unwrap_or("");
            let items = upper.clone();
            if !fetch(&mut out, tag, set, &items, &script).await? {
                return Ok(()); // cut: the connection is gone
            }
        } else if upper.starts_with("IDLE") {
            out.send(b"+ idling\r\n").await?;
            let bye = {
                let mut s = script.lock().unwrap();
                let bye = s.bye_in_idle > 0;
                s.bye_in_idle = s.bye_in_idle.saturating_sub(1);
                bye
            };
            if bye {
                out.send(b"* BYE idle is over\r\n").await?;
                return Ok(());
            }
            // report new mail while idling, until DONE
            let mut known = script.lock().unwrap().messages.len();
            let mut done = String::new();
            loop {
                tokio::select! {
                    r = rd.read_line(&mut done) => {
                        if r? == 0 { return Ok(()); }
                        script.lock().unwrap().commands.push(done.trim_end().to_string());
                        break;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        let n = script.lock().unwrap().messages.len();
                        if n != known {
                            known = n;
                            out.send(format!("* {n} EXISTS\r\n").as_bytes()).await?;
                        }
                    }
                }
            }
            out.send(format!("{tag} OK idle done\r\n").as_bytes())
                .await?;
        } else if upper.starts_with("NOOP") {
            out.send(format!("{tag} OK noop\r\n").as_bytes()).await?;
        } else if upper.starts_with("LOGOUT") {
            out.send(format!("* BYE bye\r\n{tag} OK logout\r\n").as_bytes())
                .await?;
            return Ok(());
        } else {
            out.send(format!("{tag} BAD not in this script\r\n").as_bytes())
                .await?;
        }
    }
}

/// Answers a `UID FETCH`; false when the script cut the connection.
async fn fetch(
    out: &mut Out,
    tag: &str,
    set: &str,
    items: &str,
    script: &Mutex<Script>,
) -> std::io::Result<bool> {
    let wants_body = items.contains("BODY.PEEK[]");
    let uids = {
        let s = script.lock().unwrap();
        uid_set(set, &s.messages)
    };
    for uid in uids {
        enum Plan {
            Skip,
            Cut(Vec<u8>),
            Huge(usize),
            Whole(Vec<u8>, u64),
        }
        let (seq, plan) = {
            let mut s = script.lock().unwrap();
            let Some(seq) = s.messages.keys().position(|u| *u == uid) else {
                continue;
            };
            let body = s.messages[&uid].clone();
            let announced = s
                .announced_size
                .get(&uid)
                .copied()
                .unwrap_or(body.len() as u64);
            let plan = if !wants_body {
                Plan::Whole(body, announced)
            } else if s.expunge_on_fetch.remove(&uid) {
                s.messages.remove(&uid);
                Plan::Skip
            } else if let Some(n) = s.cut_literal.get_mut(&uid).filter(|n| **n > 0) {
                if *n != u32::MAX {
                    *n -= 1;
                }
                Plan::Cut(body)
            } else if let Some(&len) = s.huge_literal.get(&uid) {
                Plan::Huge(len)
            } else {
                Plan::Whole(body, announced)
            };
            (seq + 1, plan)
        };
        let date = "01-Jul-2025 10:00:00 +0000";
        match plan {
            Plan::Skip => {}
            Plan::Whole(body, announced) if !wants_body => {
                let _ = body;
                out.send(
                    format!(
                        "* {seq} FETCH (UID {uid} RFC822.SIZE {announced} INTERNALDATE \"{date}\")\r\n"
                    )
                    .as_bytes(),
                )
                .await?;
            }
            Plan::Whole(body, _) => {
                let head = format!(
                    "* {seq} FETCH (UID {uid} INTERNALDATE \"{date}\" RFC822.SIZE {n} BODY[] {{{n}}}\r\n",
                    n = body.len()
                );
                out.send(head.as_bytes()).await?;
                out.send(&body).await?;
                out.send(b")\r\n").await?;
            }
            Plan::Cut(body) => {
                let head = format!(
                    "* {seq} FETCH (UID {uid} INTERNALDATE \"{date}\" RFC822.SIZE {n} BODY[] {{{n}}}\r\n",
                    n = body.len()
                );
                out.send(head.as_bytes()).await?;
                out.send(&body[..body.len() / 2]).await?;
                out.sock.flush().await?;
                let _ = out.sock.shutdown().await;
                return Ok(false);
            }
            Plan::Huge(len) => {
                let head = format!(
                    "* {seq} FETCH (UID {uid} INTERNALDATE \"{date}\" RFC822.SIZE {len} BODY[] {{{len}}}\r\n"
                );
                out.send(head.as_bytes()).await?;
                let chunk = vec![b'x'; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    // the client hangs up once it has seen the announcement: stop there
                    if out.send(&chunk[..n]).await.is_err() {
                        return Ok(false);
                    }
                    left -= n;
                }
                out.send(b")\r\n").await?;
            }
        }
    }
    out.send(format!("{tag} OK fetch done\r\n").as_bytes())
        .await?;
    Ok(true)
}

/// A daemon config with one IMAP source on the fake server (`tls: none` to loopback).
fn config(fake_port: u16, extra: &str) -> String {
    let lines = [
        "storage:".to_string(),
        "  sqlite: {dir}/frontdesk.db".into(),
        "server:".into(),
        "  listen: 127.0.0.1:{port}".into(),
        "sources:".into(),
        "  - name: fake".into(),
        "    imap:".into(),
        "      host: 127.0.0.1".into(),
        format!("      port: {fake_port}"),
        "      tls: none".into(),
        "      username: alice".into(),
        "      password: secret".into(),
        "      backfill: all".into(),
        "      timeout: 2s".into(),
    ];
    format!(
        "{}\n{extra}channels:\n  - name: out\n    email: {{ file: \"{{dir}}/outbox\", from: \"fd@shop.test\", to: [team@shop.test] }}\n",
        lines.join("\n")
    )
}

/// (uid from the origin, raw bytes) of every stored row.
async fn stored(db: &std::path::Path) -> Vec<(u32, Vec<u8>)> {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT origin, raw FROM messages ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    rows.into_iter()
        .map(|(origin, raw)| {
            let v: serde_json::Value = serde_json::from_str(&origin).unwrap();
            (v["uid"].as_u64().unwrap() as u32, raw)
        })
        .collect()
}

/// The one ledger line of `frontdesk sources --json`.
fn ledger(config: &std::path::Path) -> serde_json::Value {
    let (code, out, err) = support::frontdesk(
        &["--config", config.to_str().unwrap(), "sources", "--json"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array().unwrap()[0].clone()
}

/// Every stored row is complete: byte-identical to the message the server holds for its UID.
fn assert_no_partial_rows(rows: &[(u32, Vec<u8>)]) {
    for (uid, raw) in rows {
        assert_eq!(
            raw,
            &message(*uid),
            "row for uid {uid} is not the whole message"
        );
    }
}

async fn wait_for(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn star_quirk_uid_gaps_and_an_expunge_between_listing_and_fetch() {
    let fake = FakeImap::start(Script {
        uid_validity: 77,
        messages: mailbox(&[3, 7, 8, 20, 50]),
        expunge_on_fetch: [8].into(),
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let text = config(fake.port, "")
        .replace("{dir}", dir.path().to_str().unwrap())
        .replace("{port}", "0");
    let cfg = dir.path().join("frontdesk.yaml");
    std::fs::write(&cfg, text).unwrap();
    let sync = || {
        let (code, out, err) =
            support::frontdesk(&["--config", cfg.to_str().unwrap(), "sync"], &[]);
        assert_eq!(code, 0, "{err}");
        out
    };

    let out = sync();
    assert!(out.contains("4 new"), "{out}");
    let rows = stored(&dir.path().join("frontdesk.db")).await;
    let uids: Vec<u32> = rows.iter().map(|r| r.0).collect();
    assert_eq!(uids, [3, 7, 20, 50], "8 was expunged before its FETCH");
    assert_no_partial_rows(&rows);
    let l = ledger(&cfg);
    assert_eq!(l["last_uid"], 50, "{l}");
    assert_eq!(l["unaccounted"], 0, "{l}");

    // the next pass asks for 51:*, the server answers with 50 (the quirk): nothing new, no loop
    let out = sync();
    assert!(out.contains("0 new"), "{out}");
    assert!(
        fake.commands()
            .iter()
            .any(|c| c.starts_with("UID FETCH 51:*")),
        "{:?}",
        fake.commands()
    );
    fake.with(|s| s.messages.insert(60, message(60)));
    let out = sync();
    assert!(out.contains("1 new"), "{out}");
    let rows = stored(&dir.path().join("frontdesk.db")).await;
    assert_eq!(rows.len(), 5);
    assert_no_partial_rows(&rows);
    assert_eq!(ledger(&cfg)["last_uid"], 60);

    // read-only throughout: EXAMINE, BODY.PEEK, never a command that changes the mailbox
    for c in fake.commands() {
        let u = c.to_ascii_uppercase();
        for bad in ["STORE", "EXPUNGE", "MOVE", "COPY", "SELECT", "DELETE"] {
            assert!(!u.contains(bad), "sent {c}");
        }
        if u.starts_with("UID FETCH") && u.contains("BODY") {
            assert!(u.contains("BODY.PEEK"), "{c}");
        }
    }
}

#[tokio::test]
async fn a_cut_literal_is_retried_and_a_message_that_keeps_failing_is_quarantined() {
    let fake = FakeImap::start(Script {
        uid_validity: 5,
        messages: mailbox(&[1, 2, 3, 4]),
        cut_literal: [(2, 1), (3, u32::MAX)].into(),
        ..Script::default()
    });
    let d = TestDaemon::start(&config(fake.port, ""));
    wait_for("quarantine", Duration::from_secs(30), async || {
        stored(&d.db()).await.len() == 3
    })
    .await;
    let rows = stored(&d.db()).await;
    let uids: Vec<u32> = rows.iter().map(|r| r.0).collect();
    assert_eq!(uids, [1, 2, 4], "{}", d.log.lock().unwrap());
    assert_no_partial_rows(&rows);
    let l = ledger(&d.config);
    assert_eq!(l["quarantined"], 1, "{l}");
    assert_eq!(l["last_uid"], 4, "the folder is not stalled: {l}");
    assert_eq!(l["unaccounted"], 0, "{l}");
    assert!(
        d.log.lock().unwrap().contains("message quarantined"),
        "{}",
        d.log.lock().unwrap()
    );
}

#[tokio::test]
async fn bye_during_idle_reconnects_and_new_mail_still_arrives() {
    let fake = FakeImap::start(Script {
        uid_validity: 9,
        messages: mailbox(&[1]),
        bye_in_idle: 1,
        ..Script::default()
    });
    let d = TestDaemon::start(&config(fake.port, ""));
    wait_for("first message", Duration::from_secs(20), async || {
        stored(&d.db()).await.len() == 1
    })
    .await;
    // the first IDLE got BYE; the daemon reconnects (backoff 0.5-1 s) and idles again
    wait_for("a second IDLE", Duration::from_secs(20), async || {
        fake.commands()
            .iter()
            .filter(|c| c.starts_with("IDLE"))
            .count()
            >= 2
    })
    .await;
    fake.with(|s| s.messages.insert(2, message(2)));
    wait_for("mail after the BYE", Duration::from_secs(5), async || {
        stored(&d.db()).await.len() == 2
    })
    .await;
    assert_no_partial_rows(&stored(&d.db()).await);
    assert!(
        d.log.lock().unwrap().contains("reconnecting"),
        "{}",
        d.log.lock().unwrap()
    );
}

#[tokio::test]
async fn one_byte_per_second_times_out_instead_of_hanging() {
    let fake = FakeImap::start(Script {
        uid_validity: 1,
        messages: mailbox(&[1]),
        drip: true,
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let text = config(fake.port, "")
        .replace("{dir}", dir.path().to_str().unwrap())
        .replace("{port}", "0");
    let cfg = dir.path().join("frontdesk.yaml");
    std::fs::write(&cfg, text).unwrap();
    let t0 = Instant::now();
    let mut child = std::process::Command::new(support::bin())
        .args(["--config", cfg.to_str().unwrap(), "sync"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // each byte comes within the 2 s read timeout: only the rate check can end this
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("sync still running after 20 s against a drip-feeding server");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = t0.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("timed out after 2s"), "{err}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(stored(&dir.path().join("frontdesk.db")).await.is_empty());
}

#[tokio::test]
async fn a_50_mb_literal_is_refused_with_memory_bounded() {
    const HUGE: usize = 50 * 1024 * 1024;
    let fake = FakeImap::start(Script {
        uid_validity: 3,
        messages: mailbox(&[1, 2, 3, 4]),
        // 2 is announced as 50 MB; 3 is announced small but its literal is 50 MB
        announced_size: [(2, HUGE as u64)].into(),
        huge_literal: [(2, HUGE), (3, HUGE)].into(),
        ..Script::default()
    });
    let d = TestDaemon::start(&config(fake.port, ""));
    let pid = d.pid();
    let peak_kb = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap()
    };
    wait_for("both refused", Duration::from_secs(30), async || {
        stored(&d.db()).await.len() == 2
    })
    .await;
    let rows = stored(&d.db()).await;
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 4]);
    assert_no_partial_rows(&rows);
    let l = ledger(&d.config);
    assert_eq!(l["quarantined"], 2, "{l}");
    assert_eq!(l["last_uid"], 4, "{l}");
    let peak = peak_kb();
    assert!(peak < 100 * 1024, "peak RSS {peak} kB");
    let log = d.log.lock().unwrap().clone();
    assert!(log.contains("too large"), "{log}");
    assert!(log.contains("over the limit"), "{log}");
}
