//! D6 (reliability.md): IMAP protocol quirks and faults, through the real `frontdesk` binary.
//!
//! **Why a fake server:** these are faults no real server shows on demand: a message expunged
//! between the listing and the FETCH, a connection cut in the middle of a literal (once, or every
//! time for one message), `* BYE` the moment IDLE starts, a server that answers one byte per
//! second, a 50 MB literal the listing did not announce, a connection closed in the middle of a
//! SEARCH answer, UIDVALIDITY flapping back to an earlier value, untagged EXPUNGE/EXISTS between
//! FETCH responses, a `PREAUTH` greeting, and a capability list without IMAP4rev1 (or a refused
//! CAPABILITY). Dovecot (the rig) covers everything a well-behaved server does; this scripted
//! server (plain TCP on loopback, `tls: none`) speaks just enough IMAP4rev1 for frontdesk and
//! then misbehaves exactly as each scenario says. It offers neither UIDPLUS nor CONDSTORE, so
//! every scenario also runs against a server without them.
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
    /// The greeting line instead of `* OK [CAPABILITY ...] ...` (e.g. `* PREAUTH ...`).
    greeting: Option<String>,
    /// The CAPABILITY answer instead of `IMAP4rev1 IDLE`.
    capabilities: Option<String>,
    /// Answer CAPABILITY with BAD.
    capability_bad: bool,
    /// One entry per coming UID SEARCH: close the connection instead of the tagged OK, after a
    /// `* SEARCH` line holding the first two UIDs (true) or before any answer (false).
    cut_search: Vec<bool>,
    /// Between body FETCH responses: `* n EXISTS` and an unsolicited FLAGS FETCH after each, and
    /// `* n EXPUNGE` for the `expunge_on_fetch` UIDs.
    interleave: bool,
    /// UID of a message that arrives (with an untagged EXISTS) during the first body FETCH.
    arrive_during_fetch: Option<u32>,
    /// Close the connection, without any answer, on this many more `UID FETCH n (UID
    /// BODY.PEEK[])` (how a UIDVALIDITY change fingerprints a message without Message-ID).
    cut_hash_fetch: u32,
    /// Close the connection, without any answer, on this many more size listings
    /// (`UID FETCH set (UID RFC822.SIZE [INTERNALDATE])`).
    cut_list: u32,
    /// UID -> how many more body FETCHes leave it out while it stays in the mailbox, ending the
    /// FETCH with a tagged NO (Dovecot's answer when it cannot read a message file).
    withhold_body: HashMap<u32, u32>,
    /// Answer this many more UID SEARCHes with a tagged NO and no `* SEARCH` line.
    search_no: u32,
    /// UID -> how many more size listings leave it out, ending with a tagged NO.
    list_omit: HashMap<u32, u32>,
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
    let greeting = script
        .lock()
        .unwrap()
        .greeting
        .clone()
        .unwrap_or_else(|| "* OK [CAPABILITY IMAP4rev1 IDLE] fake imap ready".into());
    let preauth = greeting.starts_with("* PREAUTH");
    out.send(format!("{greeting}\r\n").as_bytes()).await?;
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
        if upper.starts_with("LOGIN") && preauth {
            // RFC 9051: LOGIN is only valid in the not-authenticated state
            out.send(format!("{tag} BAD already authenticated\r\n").as_bytes())
                .await?;
        } else if upper.starts_with("LOGIN") {
            out.send(format!("{tag} OK logged in\r\n").as_bytes())
                .await?;
            out.drip = script.lock().unwrap().drip;
        } else if upper.starts_with("CAPABILITY") {
            let (caps, bad) = {
                let s = script.lock().unwrap();
                let caps = s.capabilities.clone();
                (
                    caps.unwrap_or_else(|| "IMAP4rev1 IDLE".into()),
                    s.capability_bad,
                )
            };
            let answer = if bad {
                format!("{tag} BAD unknown command\r\n")
            } else {
                format!("* CAPABILITY {caps}\r\n{tag} OK done\r\n")
            };
            out.send(answer.as_bytes()).await?;
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
            let (uids, cut, no) = {
                let mut s = script.lock().unwrap();
                let uids: Vec<String> = s.messages.keys().map(|u| u.to_string()).collect();
                let cut = (!s.cut_search.is_empty()).then(|| s.cut_search.remove(0));
                let no = s.search_no > 0;
                s.search_no = s.search_no.saturating_sub(1);
                (uids, cut, no)
            };
            if no {
                out.send(format!("{tag} NO [SERVERBUG] search failed\r\n").as_bytes())
                    .await?;
                continue;
            }
            if let Some(partial) = cut {
                if partial {
                    let first: Vec<String> = uids.into_iter().take(2).collect();
                    out.send(format!("* SEARCH {}\r\n", first.join(" ")).as_bytes())
                        .await?;
                }
                out.sock.flush().await?;
                return Ok(()); // closed without the tagged OK
            }
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
    if items.contains("BODY.PEEK[HEADER]") {
        return headers(out, tag, set, script).await;
    }
    if !wants_body && items.contains(" (UID RFC822.SIZE") {
        let mut s = script.lock().unwrap();
        if s.cut_list > 0 {
            s.cut_list -= 1;
            return Ok(false);
        }
    }
    if items.ends_with("(UID BODY.PEEK[])") {
        let mut s = script.lock().unwrap();
        if s.cut_hash_fetch > 0 {
            s.cut_hash_fetch -= 1;
            return Ok(false);
        }
    }
    let uids = {
        let s = script.lock().unwrap();
        uid_set(set, &s.messages)
    };
    let mut withheld = false;
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
            let plan = if !wants_body && s.list_omit.get(&uid).is_some_and(|n| *n > 0) {
                if let Some(n) = s.list_omit.get_mut(&uid) {
                    *n -= 1;
                }
                withheld = true;
                Plan::Skip
            } else if !wants_body {
                Plan::Whole(body, announced)
            } else if s.expunge_on_fetch.remove(&uid) {
                s.messages.remove(&uid);
                Plan::Skip
            } else if let Some(n) = s.withhold_body.get_mut(&uid).filter(|n| **n > 0) {
                *n -= 1;
                withheld = true;
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
        let (interleave, arrived) = {
            let mut s = script.lock().unwrap();
            let arrived = if wants_body {
                s.arrive_during_fetch.take()
            } else {
                None
            };
            if let Some(uid) = arrived {
                s.messages.insert(uid, message(uid));
            }
            (
                s.interleave && wants_body,
                arrived.map(|_| s.messages.len()),
            )
        };
        if let Some(n) = arrived {
            out.send(format!("* {n} EXISTS\r\n").as_bytes()).await?;
        }
        match plan {
            Plan::Skip if interleave => {
                out.send(format!("* {seq} EXPUNGE\r\n").as_bytes()).await?;
            }
            Plan::Skip => {}
            Plan::Whole(body, announced) if !wants_body => {
                let _ = body;
                // the date only when asked for, as Dovecot does
                let dated = if items.contains("INTERNALDATE") {
                    format!(" INTERNALDATE \"{date}\"")
                } else {
                    String::new()
                };
                out.send(
                    format!("* {seq} FETCH (UID {uid} RFC822.SIZE {announced}{dated})\r\n")
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
                if interleave {
                    let n = script.lock().unwrap().messages.len();
                    out.send(
                        format!("* {n} EXISTS\r\n* {seq} FETCH (FLAGS (\\Seen))\r\n").as_bytes(),
                    )
                    .await?;
                }
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
    if withheld {
        out.send(format!("{tag} NO [SERVERBUG] some messages could not be read\r\n").as_bytes())
            .await?;
    } else {
        out.send(format!("{tag} OK fetch done\r\n").as_bytes())
            .await?;
    }
    Ok(true)
}

/// Answers a `UID FETCH set (UID BODY.PEEK[HEADER])`.
async fn headers(
    out: &mut Out,
    tag: &str,
    set: &str,
    script: &Mutex<Script>,
) -> std::io::Result<bool> {
    let found = {
        let s = script.lock().unwrap();
        let found: Vec<(usize, u32, Vec<u8>)> = uid_set(set, &s.messages)
            .into_iter()
            .map(|uid| {
                let seq = s.messages.keys().position(|u| *u == uid).unwrap_or(0) + 1;
                let raw = &s.messages[&uid];
                let end = raw
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map_or(raw.len(), |p| p + 4);
                (seq, uid, raw[..end].to_vec())
            })
            .collect();
        found
    };
    for (seq, uid, header) in found {
        let n = header.len();
        out.send(format!("* {seq} FETCH (UID {uid} BODY[HEADER] {{{n}}}\r\n").as_bytes())
            .await?;
        out.send(&header).await?;
        out.send(b")\r\n").await?;
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
    support::stored_messages(db)
        .await
        .into_iter()
        .map(|(origin, _, raw)| {
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
    star_quirk_case("").await;
}

/// The same with one message per batch: the pass fetches its batches with one `UID FETCH`
/// (`stream_run`), and the batch whose UID was expunged is settled after it, in order.
#[tokio::test]
async fn an_expunge_inside_one_fetch_of_many_batches_is_settled_in_order() {
    star_quirk_case("      batch_size: 1\n").await;
}

async fn star_quirk_case(extra: &str) {
    let fake = FakeImap::start(Script {
        uid_validity: 77,
        messages: mailbox(&[3, 7, 8, 20, 50]),
        expunge_on_fetch: [8].into(),
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let text = config(fake.port, extra)
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
    if !extra.is_empty() {
        // one command for the five one-message batches, not one each
        assert!(
            fake.commands()
                .iter()
                .any(|c| c.starts_with("UID FETCH 3,7:8,20,50 (")),
            "{:?}",
            fake.commands()
        );
    }
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
    cut_literal_case("").await;
}

/// The same with one message per batch, so the first attempt is one `UID FETCH` for all of
/// them (`stream_run`): the cut counts against the UIDs that had not arrived.
#[tokio::test]
async fn a_cut_literal_inside_one_fetch_of_many_batches_is_quarantined_alone() {
    cut_literal_case("      batch_size: 1\n").await;
}

async fn cut_literal_case(extra: &str) {
    let fake = FakeImap::start(Script {
        uid_validity: 5,
        messages: mailbox(&[1, 2, 3, 4]),
        cut_literal: [(2, 1), (3, u32::MAX)].into(),
        ..Script::default()
    });
    let d = TestDaemon::start(&config(fake.port, extra));
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

/// `frontdesk sync` until a run succeeds (at most 6 runs); how many failed before it.
fn sync_until_it_succeeds(cfg: &std::path::Path) -> usize {
    for failed in 0..6 {
        if run_sync(cfg).0 == 0 {
            return failed;
        }
    }
    panic!("6 failed sync runs");
}

/// Moves every quarantine and retry of the store at `db` two hours into the past, as if the
/// hour between retries had gone by.
async fn age_quarantine(db: &std::path::Path) {
    let pool = support::open_sqlite(db, false).await.unwrap();
    sqlx::query("UPDATE imap_accounted SET at = at - 7200000, retried_at = retried_at - 7200000")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

/// How many body FETCHes asked for UID `uid` of `present`.
fn body_fetches_of(fake: &FakeImap, present: &BTreeMap<u32, Vec<u8>>, uid: u32) -> usize {
    fake.commands()
        .iter()
        .filter(|c| c.contains("BODY.PEEK[]"))
        .filter_map(|c| c.strip_prefix("UID FETCH ")?.split_once(' '))
        .filter(|(set, _)| uid_set(set, present).contains(&uid))
        .count()
}

/// A message quarantined only because the link died with it in flight three times is fetched
/// again an hour later, stored, and leaves quarantine: nothing was wrong with it.
#[tokio::test]
async fn a_message_quarantined_by_a_flaky_link_is_stored_on_a_later_retry() {
    let fake = FakeImap::start(Script {
        uid_validity: 5,
        messages: mailbox(&[1, 2, 3, 4]),
        // exactly the POISON_ATTEMPTS cuts that quarantine it, then it is served
        cut_literal: [(3, 3)].into(),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let db = dir.path().join("frontdesk.db");
    let failed = sync_until_it_succeeds(&cfg);
    assert!((1..=3).contains(&failed), "{failed} failed runs");
    let uids = |rows: Vec<(u32, Vec<u8>)>| rows.iter().map(|r| r.0).collect::<Vec<u32>>();
    assert_eq!(uids(stored(&db).await), [1, 2, 4]);
    assert_eq!(ledger(&cfg)["quarantined"], 1);

    // within the hour a pass leaves it alone
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ledger(&cfg)["quarantined"], 1);

    age_quarantine(&db).await;
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("fetched on a retry"), "{err}");
    let rows = stored(&db).await;
    assert_no_partial_rows(&rows);
    // UID 3 went in last, on its retry
    assert_eq!(uids(rows), [1, 2, 4, 3]);
    let l = ledger(&cfg);
    assert_eq!(l["quarantined"], 0, "{l}");
    assert_eq!(l["ingested"], 4, "{l}");
    assert_eq!(l["unaccounted"], 0, "{l}");
}

/// A message that kills the connection every time is tried again a bounded number of times
/// (`QUARANTINE_RETRIES`, 3), each failing one pass, then left alone: later passes succeed.
#[tokio::test]
async fn a_message_that_always_cuts_the_link_is_retried_three_times_then_left_quarantined() {
    let present = mailbox(&[1, 2, 3, 4]);
    let fake = FakeImap::start(Script {
        uid_validity: 5,
        messages: present.clone(),
        cut_literal: [(3, u32::MAX)].into(),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let db = dir.path().join("frontdesk.db");
    sync_until_it_succeeds(&cfg);
    let attempts = body_fetches_of(&fake, &present, 3);
    for retry in 1..=3 {
        age_quarantine(&db).await;
        let (code, _, err) = run_sync(&cfg);
        assert_ne!(code, 0, "retry {retry} cut the link: {err}");
        assert_eq!(body_fetches_of(&fake, &present, 3), attempts + retry);
    }
    age_quarantine(&db).await;
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 0, "no fourth retry: {err}");
    assert_eq!(body_fetches_of(&fake, &present, 3), attempts + 3);
    let l = ledger(&cfg);
    assert_eq!(l["quarantined"], 1, "{l}");
    assert_eq!(l["last_uid"], 4, "{l}");
    assert_eq!(l["unaccounted"], 0, "{l}");
    assert_eq!(stored(&db).await.len(), 3);
}

/// A connection cut in the middle of a message counts against that message alone (the one in
/// flight), and a batch holding it is then fetched AND committed one UID at a time: what comes
/// before the culprit is kept even when every connection dies before the whole batch is in (a
/// seeded N1 run made no progress in 8 flaky connections when all of it had to arrive at once).
#[tokio::test]
async fn a_cut_connection_blames_the_message_in_flight_and_the_retry_commits_each_message() {
    let fake = FakeImap::start(Script {
        uid_validity: 4,
        messages: mailbox(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
        cut_literal: [(4, 2)].into(),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "      batch_size: 2\n");
    let db = dir.path().join("frontdesk.db");
    let mut seen = 0;
    let mut body_fetches = || -> Vec<String> {
        let commands = fake.commands();
        let new = commands[seen..]
            .iter()
            .filter(|c| c.starts_with("UID FETCH") && c.contains("BODY.PEEK[]"))
            .filter_map(|c| c.split(' ').nth(2).map(str::to_owned))
            .collect();
        seen = commands.len();
        new
    };
    let uids = async || -> Vec<u32> { stored(&db).await.iter().map(|r| r.0).collect() };

    // one FETCH for all five batches, cut inside UID 4: batch [1, 2] was already in
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 1, "a cut FETCH fails the pass: {err}");
    assert_eq!(body_fetches(), ["1:10"]);
    assert_eq!(uids().await, [1, 2]);

    // only [3, 4] went one by one: 3 committed on its own before 4 was cut again
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 1, "{err}");
    assert_eq!(body_fetches(), ["3", "4"]);
    assert_eq!(uids().await, [1, 2, 3]);

    // 4 arrives alone; the batches after it were never suspect and go in one FETCH
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("7 new"), "{out}");
    assert_eq!(body_fetches(), ["4", "5:10"]);
    let rows = stored(&db).await;
    assert_no_partial_rows(&rows);
    assert_eq!(uids().await, (1..=10).collect::<Vec<u32>>());
    let l = ledger(&cfg);
    assert_eq!(
        (l["quarantined"].as_u64(), l["unaccounted"].as_u64()),
        (Some(0), Some(0)),
        "{l}"
    );
}

/// A connection that committed something before it failed does not grow the reconnect
/// backoff: on a link that drops every few seconds the daemon keeps reconnecting within
/// `BACKOFF_MIN` (1 s) while it makes progress, instead of doubling up to 5 minutes.
#[tokio::test]
async fn a_connection_that_made_progress_before_failing_reconnects_without_growing_backoff() {
    let fake = FakeImap::start(Script {
        uid_validity: 3,
        messages: mailbox(&[1, 2, 3, 4, 5, 6]),
        // each connection gets one message in, then is cut inside the next
        cut_literal: [(2, 1), (3, 1), (4, 1), (5, 1), (6, 1)].into(),
        ..Script::default()
    });
    let d = TestDaemon::start(&config(fake.port, "      batch_size: 1\n"));
    wait_for("all six", Duration::from_secs(60), async || {
        stored(&d.db()).await.len() == 6
    })
    .await;
    assert_no_partial_rows(&stored(&d.db()).await);
    let log = d.log.lock().unwrap().clone();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("imap source failed; reconnecting"))
        .collect();
    assert_eq!(failures.len(), 5, "{log}");
    for line in failures {
        assert!(line.contains("progressed=true"), "{line}");
        let retry_ms: u64 = line
            .split("retry_in_ms=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX);
        assert!(retry_ms <= 1000, "the backoff grew: {line}");
    }
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

/// A `frontdesk sync` setup on the fake server: (state dir, config path).
fn sync_setup(fake_port: u16, extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = config(fake_port, extra)
        .replace("{dir}", dir.path().to_str().unwrap())
        .replace("{port}", "0");
    let cfg = dir.path().join("frontdesk.yaml");
    std::fs::write(&cfg, text).unwrap();
    (dir, cfg)
}

/// `frontdesk sync` to completion: (exit code, stdout, stderr).
fn run_sync(cfg: &std::path::Path) -> (i32, String, String) {
    support::frontdesk(&["--config", cfg.to_str().unwrap(), "sync"], &[])
}

/// The rows of one query of integers, read-only.
async fn ints(db: &std::path::Path, sql: &'static str) -> Vec<Option<i64>> {
    let pool = frontdesk::store::pool_options::<sqlx::Sqlite>()
        .connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let rows: Vec<(Option<i64>,)> = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
    pool.close().await;
    rows.into_iter().map(|r| r.0).collect()
}

/// A `sync` pass reconciles the folder it still has selected without opening it again (Dovecot
/// writes a folder's index before selecting it anew after new mail: ~15 ms of a ~100 ms pass).
#[tokio::test]
async fn a_sync_pass_reconciles_its_open_folder_without_examining_it_again() {
    let fake = FakeImap::start(Script {
        uid_validity: 4,
        messages: mailbox(&[1, 2, 3]),
        ..Script::default()
    });
    let (_dir, cfg) = sync_setup(fake.port, "");
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 new"), "{out}");
    let commands = fake.commands();
    let examines = commands
        .iter()
        .filter(|c| c.to_ascii_uppercase().starts_with("EXAMINE"))
        .count();
    assert_eq!(examines, 1, "{commands:?}");
    // the reconcile's SEARCH came after the pass's fetch, on the same selection
    let fetch = commands
        .iter()
        .position(|c| c.starts_with("UID FETCH") && c.contains("BODY.PEEK"));
    let search = commands
        .iter()
        .rposition(|c| c.starts_with("UID SEARCH ALL"));
    assert!(
        matches!((fetch, search), (Some(f), Some(s)) if s > f),
        "{commands:?}"
    );
    let l = ledger(&cfg);
    assert_eq!(
        (l["server_messages"].as_u64(), l["unaccounted"].as_u64()),
        (Some(3), Some(0)),
        "{l}"
    );
}

/// A first sync lists the folder once: the backfill floor and the pass share one listing (a
/// second one cost ~35 ms of a 10,000-message first sync). With `backfill: all` it lists no
/// dates (half of Dovecot's listing time) and each message is dated by the INTERNALDATE its
/// fetch answers. A later pass lists only what is above its cursor, with dates.
#[tokio::test]
async fn a_first_sync_lists_the_folder_once_and_dates_messages_by_it() {
    let fake = FakeImap::start(Script {
        uid_validity: 4,
        messages: mailbox(&[1, 2, 3]),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let db = dir.path().join("frontdesk.db");
    let listings = |fake: &FakeImap| -> Vec<String> {
        fake.commands()
            .into_iter()
            .filter(|c| c.starts_with("UID FETCH") && c.contains(" (UID RFC822.SIZE"))
            .collect()
    };
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 new"), "{out}");
    assert_eq!(listings(&fake), ["UID FETCH 1:* (UID RFC822.SIZE)"]);
    // the fake lists and fetches every message at 01-Jul-2025 10:00:00 +0000
    assert_eq!(
        ints(&db, "SELECT received_at FROM messages ORDER BY id").await,
        [Some(1_751_364_000_000); 3]
    );

    fake.with(|s| {
        s.messages.insert(4, message(4));
        s.messages.insert(5, message(5));
    });
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 new"), "{out}");
    assert_eq!(
        listings(&fake),
        [
            "UID FETCH 1:* (UID RFC822.SIZE)",
            "UID FETCH 4:* (UID RFC822.SIZE INTERNALDATE)"
        ]
    );
    assert_eq!(stored(&db).await.len(), 5);
}

#[tokio::test]
async fn a_search_cut_by_a_closed_connection_records_no_figures() {
    let fake = FakeImap::start(Script {
        uid_validity: 4,
        messages: mailbox(&[1, 2, 3, 4, 5]),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let db = dir.path().join("frontdesk.db");
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("5 new"), "{out}");
    let l = ledger(&cfg);
    assert_eq!(
        (l["server_messages"].as_u64(), l["unaccounted"].as_u64()),
        (Some(5), Some(0)),
        "{l}"
    );
    assert!(l["reconcile_error"].is_null(), "{l}");
    let figures = "SELECT server_messages FROM imap_cursors";
    let reconciled = "SELECT reconciled_at FROM imap_cursors";
    let at = ints(&db, reconciled).await;

    // a new message, then the connection closes after a `* SEARCH 1 2` line: the pass fails
    // loudly instead of recording a folder of 2
    fake.with(|s| {
        s.messages.insert(6, message(6));
        s.cut_search = vec![true];
    });
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 1, "a cut SEARCH must fail the pass: {err}");
    // the SEARCH itself now requires its tagged answer (`checked_uid_search`), so the loss of
    // the connection shows there rather than at the confirming NOOP
    assert!(err.contains("uid search: connection lost"), "{err}");
    assert_eq!(
        ints(&db, figures).await,
        [Some(5)],
        "figures taken from a cut answer"
    );
    assert_eq!(ints(&db, reconciled).await, at);
    let rows = stored(&db).await;
    assert_eq!(
        rows.len(),
        6,
        "nothing lost: the new message was ingested before"
    );
    assert_no_partial_rows(&rows);

    // `sources` on a connection that closes before any SEARCH answer: an error, old figures
    fake.with(|s| s.cut_search = vec![false]);
    let l = ledger(&cfg);
    let error = l["reconcile_error"].as_str().unwrap_or_default();
    assert!(error.contains("uid search"), "{l}");
    assert_eq!(l["server_messages"], 5, "{l}");
    assert!(
        l["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("uid search"),
        "{l}"
    );
    assert_eq!(ints(&db, reconciled).await, at);

    // a live session again: the true figures
    let l = ledger(&cfg);
    assert!(l["reconcile_error"].is_null(), "{l}");
    assert_eq!(
        (l["server_messages"].as_u64(), l["unaccounted"].as_u64()),
        (Some(6), Some(0)),
        "{l}"
    );
    assert_eq!(l["last_uid"], 6, "{l}");
}

/// A message with a given Message-ID (None: no Message-ID header at all).
fn message_with_id(id: Option<&str>, n: u32) -> Vec<u8> {
    let id = id.map_or(String::new(), |id| format!("Message-ID: <{id}>\r\n"));
    format!(
        "From: Client {n} <c{n}@client.test>\r\nTo: team@shop.test\r\nSubject: flap {n}\r\n\
{id}Date: Tue, 1 Jul 2025 10:00:00 +0000\r\n\r\nbody {n}\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn uid_validity_flapping_a_b_a_stores_every_message_once() {
    // D5, third variant: synced under A, renumbered under B (plus new mail), then A again
    let m = |n: u32| {
        message_with_id(
            (n != 5).then(|| format!("flap-{n}@client.test")).as_deref(),
            n,
        )
    };
    let under_a: BTreeMap<u32, Vec<u8>> = (1..=5).map(|n| (n, m(n))).collect();
    let fake = FakeImap::start(Script {
        uid_validity: 100,
        messages: under_a.clone(),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let db = dir.path().join("frontdesk.db");
    let sync = || {
        let (code, out, err) = run_sync(&cfg);
        assert_eq!(code, 0, "{err}");
        (out, err)
    };
    let (out, _) = sync();
    assert!(out.contains("5 new"), "{out}");

    // B: the same five renumbered 11..15 (5 has no Message-ID: matched by content hash), 6 and 7 new
    fake.with(|s| {
        s.uid_validity = 200;
        s.messages = (1..=7).map(|n| (n + 10, m(n))).collect();
    });
    let (out, err) = sync();
    assert!(out.contains("2 new"), "{out}\n{err}");

    // A again: the first numbering back, 6 and 7 as 6 and 7, and 8 arriving meanwhile
    fake.with(|s| {
        s.uid_validity = 100;
        s.messages = (1..=8).map(|n| (n, m(n))).collect();
    });
    let seen = fake.commands().len();
    let (out, err) = sync();
    assert!(out.contains("1 new"), "{out}\n{err}");
    // what is stored under A already is not fetched again: only 8's body is
    let fetched: Vec<String> = fake.commands()[seen..]
        .iter()
        .filter(|c| c.starts_with("UID FETCH") && c.contains("RFC822.SIZE BODY.PEEK[]"))
        .cloned()
        .collect();
    assert_eq!(
        fetched,
        ["UID FETCH 8 (UID INTERNALDATE RFC822.SIZE BODY.PEEK[])"]
    );
    let (out, _) = sync();
    assert!(out.contains("0 new"), "{out}");

    let ids: Vec<(Option<String>, Vec<u8>)> = support::stored_messages(&db)
        .await
        .into_iter()
        .map(|(_, id, raw)| (id, raw))
        .collect();
    let raws: HashSet<Vec<u8>> = ids.iter().map(|r| r.1.clone()).collect();
    let distinct: HashSet<Option<String>> = ids.iter().map(|r| r.0.clone()).collect();
    assert_eq!(ids.len(), 8, "{ids:?}");
    assert_eq!((distinct.len(), raws.len()), (8, 8), "duplicates: {ids:?}");
    assert!(raws.iter().all(|r| (1..=8).any(|n| *r == m(n))));
    let events = ints(
        &db,
        "SELECT count(*) FROM source_events WHERE kind = 'uid_validity_changed'",
    )
    .await;
    assert_eq!(events, [Some(2)], "one event per change");
    let l = ledger(&cfg);
    assert_eq!(
        (l["uid_validity"].as_u64(), l["last_uid"].as_u64()),
        (Some(100), Some(8)),
        "{l}"
    );
    assert_eq!(
        (l["server_messages"].as_u64(), l["unaccounted"].as_u64()),
        (Some(8), Some(0)),
        "{l}"
    );
    let stored_or_matched = l["ingested"].as_u64().unwrap() + l["matched"].as_u64().unwrap();
    assert_eq!(
        stored_or_matched, 8,
        "each server message counted once: {l}"
    );
}

#[tokio::test]
async fn a_preauth_greeting_is_used_without_login_over_plain_loopback() {
    let fake = FakeImap::start(Script {
        uid_validity: 8,
        messages: mailbox(&[1, 2]),
        greeting: Some("* PREAUTH [CAPABILITY IMAP4rev1 IDLE] welcome back, alice".into()),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 new"), "{out}");
    assert!(err.contains("PREAUTH"), "{err}");
    let commands = fake.commands();
    assert!(
        !commands
            .iter()
            .any(|c| c.to_ascii_uppercase().starts_with("LOGIN") || c.contains("secret")),
        "credentials sent to a preauthenticated server: {commands:?}"
    );
    let rows = stored(&dir.path().join("frontdesk.db")).await;
    assert_eq!(rows.len(), 2);
    assert_no_partial_rows(&rows);
    assert_eq!(ledger(&cfg)["unaccounted"], 0);
}

#[tokio::test]
async fn a_preauth_greeting_before_starttls_is_refused() {
    let fake = FakeImap::start(Script {
        uid_validity: 8,
        messages: mailbox(&[1]),
        greeting: Some("* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] welcome back".into()),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("tls: none", "tls: starttls");
    std::fs::write(&cfg, text).unwrap();
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("refusing the PREAUTH greeting of 127.0.0.1 before STARTTLS"),
        "{err}"
    );
    assert!(fake.commands().is_empty(), "{:?}", fake.commands());
    assert!(stored(&dir.path().join("frontdesk.db")).await.is_empty());
}

#[tokio::test]
async fn a_capability_list_without_imap4rev1_is_refused_and_a_refused_capability_is_not() {
    // async-imap cannot parse CAPABILITY data without IMAP4rev1 (and is stuck on the line)
    let fake = FakeImap::start(Script {
        uid_validity: 6,
        messages: mailbox(&[1, 2, 3]),
        capabilities: Some("IMAP4rev2 IDLE".into()),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let db = dir.path().join("frontdesk.db");
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "source fake: the server does not announce IMAP4rev1 (capabilities: IMAP4rev2 IDLE)"
        ),
        "{err}"
    );
    assert!(stored(&db).await.is_empty());
    assert!(
        !fake.commands().iter().any(|c| c.starts_with("EXAMINE")),
        "{:?}",
        fake.commands()
    );

    // a server that answers CAPABILITY with BAD: used without IDLE, with a warning
    fake.with(|s| {
        s.capabilities = None;
        s.capability_bad = true;
    });
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 new"), "{out}");
    assert_eq!(err.matches("refused CAPABILITY").count(), 1, "{err}");
    let rows = stored(&db).await;
    assert_eq!(rows.len(), 3);
    assert_no_partial_rows(&rows);
    let l = ledger(&cfg);
    assert_eq!(
        (l["server_messages"].as_u64(), l["unaccounted"].as_u64()),
        (Some(3), Some(0)),
        "{l}"
    );
}

#[tokio::test]
async fn untagged_expunge_and_exists_between_fetch_responses() {
    let fake = FakeImap::start(Script {
        uid_validity: 12,
        messages: mailbox(&[1, 2, 3, 4, 5, 6]),
        expunge_on_fetch: [3].into(),
        interleave: true,
        arrive_during_fetch: Some(7),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let db = dir.path().join("frontdesk.db");
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("5 new"), "{out}");
    let uids: Vec<u32> = stored(&db).await.iter().map(|r| r.0).collect();
    assert_eq!(
        uids,
        [1, 2, 4, 5, 6],
        "3 expunged, 7 arrived after the listing"
    );
    // the message that arrived during the FETCH comes with the next pass
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 new"), "{out}");
    let rows = stored(&db).await;
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 2, 4, 5, 6, 7]
    );
    assert_no_partial_rows(&rows);
    let l = ledger(&cfg);
    assert_eq!(
        (l["last_uid"].as_u64(), l["unaccounted"].as_u64()),
        (Some(7), Some(0)),
        "{l}"
    );
}

#[tokio::test]
async fn a_uid_validity_enumeration_cut_by_a_closed_connection_is_not_committed() {
    // 3 has no Message-ID: after a UIDVALIDITY change it is fingerprinted by its content, and
    // that FETCH is the one the server hangs up on (last, so nothing else sees the dead link)
    let m = |n: u32| {
        message_with_id(
            (n != 3).then(|| format!("enum-{n}@client.test")).as_deref(),
            n,
        )
    };
    let fake = FakeImap::start(Script {
        uid_validity: 30,
        messages: (1..=3).map(|n| (n, m(n))).collect(),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let db = dir.path().join("frontdesk.db");
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 new"), "{out}");

    fake.with(|s| {
        s.uid_validity = 31;
        s.messages = (1..=3).map(|n| (n + 20, m(n))).collect();
        s.cut_hash_fetch = 1;
    });
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 1, "a cut enumeration must fail the pass: {err}");
    let events = "SELECT count(*) FROM source_events WHERE kind = 'uid_validity_changed'";
    assert_eq!(
        ints(&db, events).await,
        [Some(0)],
        "nothing committed from it"
    );
    assert_eq!(
        ints(&db, "SELECT uid_validity FROM imap_cursors").await,
        [Some(30)]
    );

    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 new"), "3 taken for new mail: {out}");
    assert_eq!(ints(&db, "SELECT count(*) FROM messages").await, [Some(3)]);
    assert_eq!(ints(&db, events).await, [Some(1)]);
    let l = ledger(&cfg);
    assert_eq!(
        (
            l["uid_validity"].as_u64(),
            l["matched"].as_u64(),
            l["unaccounted"].as_u64()
        ),
        (Some(31), Some(3), Some(0)),
        "{l}"
    );
}

#[tokio::test]
async fn a_first_listing_cut_by_a_closed_connection_does_not_set_the_backfill_floor() {
    // `backfill: none` puts the cursor at the highest UID listed; an empty listing from a dead
    // connection would put it at 0, and the whole mailbox would be ingested after all
    let fake = FakeImap::start(Script {
        uid_validity: 40,
        messages: mailbox(&[1, 2, 3]),
        cut_list: 1,
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("backfill: all", "backfill: none");
    std::fs::write(&cfg, text).unwrap();
    let db = dir.path().join("frontdesk.db");
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 1, "a cut listing must fail the pass: {err}");
    assert!(
        ints(&db, "SELECT last_uid FROM imap_cursors")
            .await
            .is_empty(),
        "a cursor committed from an empty listing"
    );
    // the listing requires its own tagged answer now, so the cut shows there
    assert!(err.contains("uid fetch (list): connection lost"), "{err}");

    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 new"), "{out}");
    assert!(stored(&db).await.is_empty());
    let l = ledger(&cfg);
    assert_eq!(
        (
            l["last_uid"].as_u64(),
            l["skipped_backfill"].as_u64(),
            l["unaccounted"].as_u64()
        ),
        (Some(3), Some(3), Some(0)),
        "{l}"
    );
}

/// A SEARCH answered with a tagged NO is an error, not an empty folder: async-imap's own
/// `uid_search` reads it as "no UIDs", which made a message whose body the server could not read
/// (FETCH ending in NO) look expunged, so the cursor moved past it for good.
#[tokio::test]
async fn a_search_answered_no_is_not_taken_for_an_empty_folder() {
    let fake = FakeImap::start(Script {
        uid_validity: 9,
        messages: mailbox(&[1, 2, 3, 4, 5]),
        withhold_body: [(3, 1)].into(),
        search_no: 1,
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let db = dir.path().join("frontdesk.db");
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 1, "uid 3 must not be taken for expunged: {err}");
    assert!(err.contains("uid 3"), "{err}");
    assert!(err.to_lowercase().contains("search failed"), "{err}");
    // the failed batch is fetched again one UID at a time: nothing lost, nothing twice
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("5 new"), "{out}");
    let rows = stored(&db).await;
    let uids: Vec<u32> = rows.iter().map(|r| r.0).collect();
    assert_eq!(
        uids.iter().copied().collect::<HashSet<_>>().len(),
        5,
        "{uids:?}"
    );
    assert_eq!(uids.len(), 5, "{uids:?}");
    assert_no_partial_rows(&rows);
    // the ledger's SEARCH answered NO: an error, not a folder of 0 with 5 unaccounted
    fake.with(|s| s.search_no = 1);
    let l = ledger(&cfg);
    assert!(
        l["reconcile_error"]
            .as_str()
            .unwrap_or_default()
            .contains("uid search"),
        "{l}"
    );
    assert_ne!(l["server_messages"], 0, "{l}");
    let l = ledger(&cfg);
    assert_eq!(
        (l["server_messages"].as_u64(), l["unaccounted"].as_u64()),
        (Some(5), Some(0)),
        "{l}"
    );
}

/// A size listing that leaves a message out of the middle and ends in NO fails the pass: the
/// cursor would otherwise move past the message (async-imap's `uid_fetch` drops the NO).
#[tokio::test]
async fn a_listing_ending_in_no_does_not_move_the_cursor_past_a_message() {
    let fake = FakeImap::start(Script {
        uid_validity: 11,
        messages: mailbox(&[1, 2, 3, 4, 5]),
        list_omit: [(3, 2)].into(),
        ..Script::default()
    });
    let (dir, cfg) = sync_setup(fake.port, "");
    let db = dir.path().join("frontdesk.db");
    // the first listing (backfill floor) and the second (new UIDs) each leave uid 3 out
    let (code, _, err) = run_sync(&cfg);
    assert_eq!(code, 1, "a listing ending in NO must fail the pass: {err}");
    assert!(err.contains("uid fetch (list)"), "{err}");
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 1, "{out} {err}");
    let (code, out, err) = run_sync(&cfg);
    assert_eq!(code, 0, "{err}");
    let rows = stored(&db).await;
    let uids: Vec<u32> = rows.iter().map(|r| r.0).collect();
    assert_eq!(
        uids.len(),
        5,
        "uid 3 skipped or stored twice: {uids:?} {out}"
    );
    assert_eq!(
        uids.iter().copied().collect::<HashSet<_>>().len(),
        5,
        "{uids:?}"
    );
    assert_no_partial_rows(&rows);
    let l = ledger(&cfg);
    assert_eq!(l["unaccounted"].as_u64(), Some(0), "{l}");
}
