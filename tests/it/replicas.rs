//! D8: several replicas on one PostgreSQL (reliability.md §2.2 "PostgreSQL mode").
//!
//! Real everything: a private PostgreSQL 15 cluster from `tests/servers/pg.sh`, the Dovecot rig,
//! three `frontdesk run` processes sharing the database, signed webhooks over real HTTP. The lease
//! log (`replica_leases`, database clock) proves that no IMAP folder was held by two replicas at
//! once: every holder checks its lease before each fetch batch, so its fetches happen before its
//! last heartbeat, and a later holder's tenure must start after that heartbeat.
//! Per commit: 1,000 deliveries and 10 SIGKILLs, one PostgreSQL crash; `FRONTDESK_RELIABILITY=long`
//! (scripts/reliability): 10,000 deliveries, 10 SIGKILLs and 10 crashes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use frontdesk::store::lease;
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPool;

use crate::reliability::client_mail;
use crate::rig::Rig;
use crate::support::{TestDaemon, figure, http_get, long_run};
use crate::webhook::{SW_SECRET, now_secs, reply_id, sw_headers, try_request, write_secret};

/// The IMAP poll interval of the replicas: a folder must move within twice this.
const POLL: Duration = Duration::from_secs(2);

/// A private PostgreSQL cluster (`tests/servers/pg.sh`), stopped and removed on drop.
struct Pg {
    dir: PathBuf,
    url: String,
}

fn pg_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/pg.sh")
}

impl Pg {
    /// Starts a cluster with extra server settings (`NAME=VALUE`).
    fn start(settings: &[&str]) -> Pg {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(pg_sh())
            .args(["start", "--owner", &std::process::id().to_string()]);
        for s in settings {
            cmd.args(["--set", s]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "pg.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Pg {
            dir: PathBuf::from(&env["PG_DIR"]),
            url: env["PG_URL"].clone(),
        }
    }

    fn run(&self, what: &str) {
        let status = std::process::Command::new("bash")
            .arg(pg_sh())
            .arg(what)
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(status.success(), "pg.sh {what} failed");
    }

    /// `pg_ctl stop -m immediate`: no checkpoint, WAL replay at the next start.
    fn crash(&self) {
        self.run("crash");
    }

    /// Starts the crashed cluster again on the same port.
    fn restart(&self) {
        self.run("restart");
    }

    async fn pool(&self) -> PgPool {
        frontdesk::store::pool_options::<sqlx::Postgres>()
            .max_connections(2)
            .connect(&self.url)
            .await
            .unwrap()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(pg_sh())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// The config of replica `n`: one IMAP source `mail` (polled every [`POLL`]), one signed webhook
/// source `sw`, a file channel and a digest every minute in `shared` (one directory for all).
fn replica_yaml(pg: &Pg, shared: &Path, rig: &Rig, user: &str, n: usize) -> String {
    format!(
        "timezone: UTC
storage:
  postgres: {url}
server:
  listen: 127.0.0.1:{{port}}
  replica: r{n}
team:
  - name: Team
    email: [team@shop.test]
sources:
  - name: mail
    imap:
      host: localhost
      port: {imaps}
      tls: implicit
      ca_file: {ca}
      username: {user}
      password: secret
      timeout: 5s
      backfill: all
      idle: false
      poll_interval: {poll}s
      folders: [INBOX, Archive]
  - name: sw
    webhook:
      preset: standard-webhooks
      max_body: 1MiB
      auth: {{ scheme: standard-webhooks, secret_file: {shared}/sw }}
channels:
  - name: out
    email: {{ file: \"{shared}/outbox\", from: \"fd@shop.test\", to: [team@shop.test] }}
digests:
  - name: minutely
    schedule: \"* * * * *\"
    channel: out
",
        url = pg.url,
        imaps = rig.imaps_port,
        ca = rig.ca.display(),
        poll = POLL.as_secs(),
        shared = shared.display(),
    )
}

/// Three replicas (r0, r1, r2) on `pg`, reading `user`'s mailbox.
fn start_replicas(pg: &Pg, shared: &Path, rig: &Rig, user: &str) -> Vec<TestDaemon> {
    write_secret(shared, "sw", SW_SECRET);
    (0..3)
        .map(|n| TestDaemon::start(&replica_yaml(pg, shared, rig, user, n)))
        .collect()
}

/// Message-ID -> rows for the IMAP source.
async fn mail_ids(pool: &PgPool) -> HashMap<String, usize> {
    let rows: Vec<(Option<String>,)> =
        sqlx::query_as("SELECT message_id FROM messages WHERE source = 'mail'")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut ids = HashMap::new();
    for (id,) in rows {
        *ids.entry(id.unwrap_or_default()).or_default() += 1;
    }
    ids
}

/// Waits until `want` distinct Message-IDs of the IMAP source are stored.
async fn wait_mail(pool: &PgPool, want: usize, limit: Duration) -> HashMap<String, usize> {
    let deadline = Instant::now() + limit;
    loop {
        let ids = mail_ids(pool).await;
        if ids.len() >= want || Instant::now() > deadline {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn db_now_ms(pool: &PgPool) -> i64 {
    let (ms,): (i64,) =
        sqlx::query_as("SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint")
            .fetch_one(pool)
            .await
            .unwrap();
    ms
}

/// The replica holding `folder` of the IMAP source now, waiting up to `limit` for one.
async fn folder_holder(pool: &PgPool, folder: &str, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    loop {
        let holders = lease::holders(pool).await.unwrap();
        if let Some(h) = holders.iter().find(|h| h.folder.as_deref() == Some(folder)) {
            return Some(h.holder.clone());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lease tenures of different holders of one lease that overlap in time.
async fn lease_overlaps(pool: &PgPool) -> (usize, usize) {
    let tenures = lease::tenures(pool).await.unwrap();
    let bad = lease::overlaps(&tenures);
    for (a, b) in &bad {
        eprintln!("overlapping tenures: {a:?} and {b:?}");
    }
    (tenures.len(), bad.len())
}

/// Message-IDs of every email the file channel wrote, with how often each was written.
fn sent_message_ids(outbox: &Path) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(outbox) else {
        return ids;
    };
    for entry in dir.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let id = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("Message-ID:")
                    .or_else(|| l.strip_prefix("Message-Id:"))
            })
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        *ids.entry(id).or_default() += 1;
    }
    ids
}

fn replica_index(name: &str) -> usize {
    name.trim_start_matches('r').parse().unwrap()
}

/// D8 (IMAP): the replica holding the inbox is SIGKILLed; another polls it within twice the poll
/// interval, and every Message-ID is stored exactly once. `frontdesk sources` and `/metrics`
/// name the holder and the one leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_folder_moves_when_its_holder_dies() {
    let rig = Rig::shared();
    let user = rig.new_mailbox("repl");
    rig.create_folder(&user, "Archive");
    let pg = Pg::start(&[]);
    let shared = tempfile::tempdir().unwrap();
    let mut replicas = start_replicas(&pg, shared.path(), rig, &user);
    let pool = pg.pool().await;
    rig.append_many(&user, "INBOX", (0..20).map(|i| client_mail(i, "repl")));
    let ids = wait_mail(&pool, 20, Duration::from_secs(30)).await;
    assert_eq!(ids.len(), 20, "first 20 not ingested: {ids:?}");

    let holder = folder_holder(&pool, "INBOX", Duration::from_secs(5))
        .await
        .expect("nobody holds INBOX");
    let k = replica_index(&holder);
    let survivor = (k + 1) % 3;
    // Visibility: the CLI and /metrics of another replica name the holder.
    let (code, out, err) = crate::support::frontdesk(
        &[
            "sources",
            "--json",
            "--config",
            replicas[survivor].config.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let lines: serde_json::Value = serde_json::from_str(&out).unwrap();
    let inbox = lines
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["folder"] == "INBOX")
        .expect("INBOX line");
    assert_eq!(inbox["holder"], holder.as_str(), "{out}");
    // A one-off `frontdesk sync` leaves folders a running replica holds alone.
    let (code, out, err) = crate::support::frontdesk(
        &[
            "sync",
            "--config",
            replicas[survivor].config.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("mail/INBOX: skipped, a running replica syncs it"),
        "{out}"
    );
    let (status, metrics) = http_get(replicas[survivor].port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!(
            "frontdesk_lease_holder{{kind=\"folder\",source=\"mail\",folder=\"INBOX\",replica=\"{holder}\"}} 1"
        )),
        "{metrics}"
    );
    let mut leaders = 0;
    for d in &replicas {
        let (_, m) = http_get(d.port, "/metrics").unwrap();
        leaders += m
            .lines()
            .filter(|l| {
                l.starts_with("frontdesk_replica_leader{role=\"core\"") && l.ends_with(" 1")
            })
            .count();
    }
    assert_eq!(leaders, 1, "exactly one core leader");

    let killed_at = db_now_ms(&pool).await;
    replicas[k].signal_and_wait(9, Duration::from_secs(5));
    rig.append_many(&user, "INBOX", (20..40).map(|i| client_mail(i, "repl")));
    let deadline = Instant::now() + Duration::from_secs(20);
    let taken_at = loop {
        let tenures = lease::tenures(&pool).await.unwrap();
        if let Some(t) = tenures.iter().find(|t| {
            t.folder.as_deref() == Some("INBOX") && t.acquired_ms > killed_at && t.holder != holder
        }) {
            break t.acquired_ms;
        }
        assert!(Instant::now() < deadline, "INBOX never taken over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let takeover = Duration::from_millis((taken_at - killed_at) as u64);
    let ids = wait_mail(&pool, 40, Duration::from_secs(30)).await;
    let dups = ids.values().filter(|n| **n > 1).count();
    let (tenures, overlaps) = lease_overlaps(&pool).await;
    figure(
        "D8-imap",
        "3 replicas, holder of INBOX SIGKILLed, poll 2 s",
        &format!(
            "takeover {:.2} s, {} of 40 stored, {dups} dup, {tenures} tenures, {overlaps} overlapping",
            takeover.as_secs_f64(),
            ids.len()
        ),
    );
    assert!(takeover <= 2 * POLL, "takeover took {takeover:?}");
    assert_eq!(ids.len(), 40);
    assert_eq!(dups, 0);
    assert_eq!(overlaps, 0);
}

/// What the flood clients saw.
#[derive(Default)]
struct Flood {
    /// Delivery index -> id from the 200 reply.
    acked: std::sync::Mutex<BTreeMap<usize, i64>>,
    retries: AtomicUsize,
    /// 503 answers (storage unavailable) seen.
    unavailable: AtomicUsize,
    /// Other answers than 200 and 503, and failed connections.
    other: AtomicUsize,
    /// The slowest answer of any kind, in milliseconds.
    slowest_ms: AtomicUsize,
}

/// Signed Standard-Webhooks deliveries from 4 clients retrying like a provider, each attempt
/// to a random replica (the load balancer).
fn flood(
    ports: Vec<u16>,
    bodies: Arc<Vec<Vec<u8>>>,
    seen: Arc<Flood>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let next = Arc::new(AtomicUsize::new(0));
    (0..4)
        .map(|_| {
            let (ports, bodies, seen, next) =
                (ports.clone(), bodies.clone(), seen.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= bodies.len() {
                        return;
                    }
                    let id = format!("msg_{i}");
                    let body = &bodies[i];
                    let mut ok = false;
                    for attempt in 0..400 {
                        if attempt > 0 {
                            seen.retries.fetch_add(1, Ordering::Relaxed);
                        }
                        let port = ports[rand::rng().random_range(0..ports.len())];
                        let h = sw_headers(SW_SECRET, &id, now_secs(), body);
                        let asked = Instant::now();
                        let reply = try_request(port, "/hooks/sw", &h, body).await;
                        seen.slowest_ms
                            .fetch_max(asked.elapsed().as_millis() as usize, Ordering::Relaxed);
                        match reply {
                            Ok(r) if r.status == 200 => {
                                seen.acked.lock().unwrap().insert(i, reply_id(&r));
                                ok = true;
                                break;
                            }
                            Ok(r) if r.status == 503 => {
                                seen.unavailable.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                seen.other.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        let backoff = rand::rng().random_range(50..500);
                        tokio::time::sleep(Duration::from_millis(backoff)).await;
                    }
                    assert!(ok, "delivery {i} never acknowledged");
                }
            })
        })
        .collect()
}

fn bodies(total: usize, pad: std::ops::Range<usize>) -> Arc<Vec<Vec<u8>>> {
    let mut rng = rand::rng();
    Arc::new(
        (0..total)
            .map(|i| {
                let pad: String = (0..rng.random_range(pad.clone()))
                    .map(|_| char::from(rng.random_range(b'a'..=b'z')))
                    .collect();
                format!(r#"{{"type":"t","data":{{"n":{i},"pad":"{pad}"}}}}"#).into_bytes()
            })
            .collect(),
    )
}

/// (lost, duplicated, differing, stored) for the acknowledged deliveries.
async fn check_webhooks(
    pool: &PgPool,
    acked: &BTreeMap<usize, i64>,
    bodies: &[Vec<u8>],
) -> (usize, usize, usize, usize) {
    let rows: Vec<(i64, String, Vec<u8>)> =
        sqlx::query_as("SELECT id, origin_key, raw FROM messages WHERE source = 'sw'")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut by_key: HashMap<String, Vec<(i64, Vec<u8>)>> = HashMap::new();
    for (id, key, raw) in rows {
        by_key.entry(key).or_default().push((id, raw));
    }
    let (mut lost, mut dups, mut differ) = (0, 0, 0);
    for (i, id) in acked {
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
    (lost, dups, differ, by_key.len())
}

/// D8 (replicas): a signed webhook flood spread over three replicas while mail arrives, one
/// random replica SIGKILLed and restarted 10 times -> 0 acknowledged lost, 0 duplicates, bodies
/// identical, no folder held by two replicas at once, one outbox item per digest slot and at
/// most one extra copy of an email (the documented at-least-once case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sigkilled_during_flood_lose_and_duplicate_nothing() {
    let (total, kills, pad) = if long_run() {
        (10_000, 10, 100..50_000)
    } else {
        (1_000, 10, 50..3_000)
    };
    let rig = Rig::shared();
    let user = rig.new_mailbox("replflood");
    rig.create_folder(&user, "Archive");
    let pg = Pg::start(&[]);
    let shared = tempfile::tempdir().unwrap();
    let replicas = start_replicas(&pg, shared.path(), rig, &user);
    let ports: Vec<u16> = replicas.iter().map(|d| d.port).collect();
    let replicas = Arc::new(tokio::sync::Mutex::new(replicas));
    let pool = pg.pool().await;
    let bodies = bodies(total, pad);
    let seen = Arc::new(Flood::default());
    let started = Instant::now();
    let workers = flood(ports, bodies.clone(), seen.clone());
    let done = Arc::new(AtomicBool::new(false));
    let mail = {
        let (user, done) = (user.clone(), done.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !done.load(Ordering::SeqCst) && n < 100 {
                let (user, raw) = (user.clone(), client_mail(n, "replflood"));
                tokio::task::spawn_blocking(move || rig.append(&user, "INBOX", &raw))
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        })
    };
    // Kill k lands at a random point of the k-th slice of the acknowledgements, so every kill
    // hits the flood whatever the rate on this machine.
    let killer = {
        let (replicas, done, seen) = (replicas.clone(), done.clone(), seen.clone());
        tokio::spawn(async move {
            let mut during = 0;
            let slice = total / kills;
            for k in 0..kills {
                let at = k * slice + rand::rng().random_range(0..slice);
                while seen.acked.lock().unwrap().len() < at && !done.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if !done.load(Ordering::SeqCst) {
                    during += 1;
                }
                let k = rand::rng().random_range(0..3);
                let mut r = replicas.lock().await;
                r[k].signal_and_wait(9, Duration::from_secs(5));
                r[k].spawn();
            }
            during
        })
    };
    for w in workers {
        w.await.unwrap();
    }
    let flood_took = started.elapsed();
    done.store(true, Ordering::SeqCst);
    let during = killer.await.unwrap();
    let mails = mail.await.unwrap();
    let ids = wait_mail(&pool, mails, Duration::from_secs(30)).await;
    let mail_dups = ids.values().filter(|n| **n > 1).count();
    let acked = seen.acked.lock().unwrap().clone();
    let (lost, dups, differ, stored) = check_webhooks(&pool, &acked, &bodies).await;
    let (tenures, overlaps) = lease_overlaps(&pool).await;
    let sent = sent_message_ids(&shared.path().join("outbox"));
    let twice = sent.values().filter(|n| **n > 1).count();
    let (digests,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM outbox WHERE kind = 'digest' AND state = 'sent'")
            .fetch_one(&pool)
            .await
            .unwrap();
    figure(
        "D8",
        &format!(
            "3 replicas on PG, {total} msgs, {kills} SIGKILLs ({during} during the flood), 4 clients"
        ),
        &format!(
            "{} acked, {lost} lost, {dups} dup, {differ} differ, {stored} stored, {} retries, \
             mail {}/{mails} with {mail_dups} dup, {tenures} tenures, {overlaps} overlapping, \
             {digests} digests sent, {twice} emails sent twice, flood {:.0} s",
            acked.len(),
            seen.retries.load(Ordering::Relaxed),
            ids.len(),
            flood_took.as_secs_f64(),
        ),
    );
    assert_eq!(acked.len(), total);
    assert_eq!(
        (lost, dups, differ),
        (0, 0, 0),
        "lost, duplicated, differing"
    );
    assert_eq!(stored, total);
    assert_eq!(
        (ids.len(), mail_dups),
        (mails, 0),
        "mail stored, duplicated"
    );
    assert_eq!(overlaps, 0, "a folder or role held by two replicas at once");
    // Delivery is at-least-once (D9): a leader killed between the SMTP 250 and recording it
    // as sent leaves one more copy, with the same Message-ID, for the next leader to send.
    assert!(
        sent.values().all(|n| *n <= 2),
        "an email sent more than twice: {sent:?}"
    );
}

/// D8 (database crash): `pg_ctl stop -m immediate` mid-flood -> 503 while it is down, nothing
/// acknowledged lost, and every replica accepts again after the restart without being restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_gives_503_and_replicas_recover() {
    let (total, crashes) = if long_run() { (10_000, 10) } else { (600, 1) };
    let rig = Rig::shared();
    let user = rig.new_mailbox("replcrash");
    rig.create_folder(&user, "Archive");
    let pg = Pg::start(&[]);
    let shared = tempfile::tempdir().unwrap();
    let replicas = start_replicas(&pg, shared.path(), rig, &user);
    let ports: Vec<u16> = replicas.iter().map(|d| d.port).collect();
    let bodies = bodies(total, 50..3_000);
    let seen = Arc::new(Flood::default());
    let started = Instant::now();
    let workers = flood(ports.clone(), bodies.clone(), seen.clone());
    let (mut outage_503, mut outage_other) = (0, 0);
    for c in 0..crashes {
        let at = (c + 1) * total / (crashes + 1);
        while seen.acked.lock().unwrap().len() < at {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let before = seen.unavailable.load(Ordering::Relaxed);
        let other_before = seen.other.load(Ordering::Relaxed);
        pg.crash();
        tokio::time::sleep(Duration::from_secs(3)).await;
        outage_503 += seen.unavailable.load(Ordering::Relaxed) - before;
        outage_other += seen.other.load(Ordering::Relaxed) - other_before;
        pg.restart();
    }
    for w in workers {
        w.await.unwrap();
    }
    let flood_took = started.elapsed();
    // Every replica takes a new delivery again, without a restart.
    let mut recovered = Vec::new();
    for (n, port) in ports.iter().enumerate() {
        let t = Instant::now();
        let id = format!("after_{n}");
        let body = format!(r#"{{"type":"t","data":{{"after":{n}}}}}"#).into_bytes();
        loop {
            let h = sw_headers(SW_SECRET, &id, now_secs(), &body);
            if let Ok(r) = try_request(*port, "/hooks/sw", &h, &body).await
                && r.status == 200
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "replica r{n} did not recover"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        recovered.push(t.elapsed());
    }
    let pool = pg.pool().await;
    let acked = seen.acked.lock().unwrap().clone();
    let (lost, dups, differ, stored) = check_webhooks(&pool, &acked, &bodies).await;
    let (_, overlaps) = lease_overlaps(&pool).await;
    figure(
        "D8-pg-crash",
        &format!("3 replicas, {total} msgs, {crashes} x pg_ctl stop -m immediate (3 s down)"),
        &format!(
            "{} acked, {lost} lost, {dups} dup, {differ} differ, {stored} stored, during outages {outage_503} x 503 and {outage_other} other answers or connection errors, slowest answer {:.1} s, {overlaps} overlapping tenures, replicas accepting again {:.1} s after the flood, flood {:.0} s",
            acked.len(),
            seen.slowest_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            recovered
                .iter()
                .max()
                .copied()
                .unwrap_or_default()
                .as_secs_f64(),
            flood_took.as_secs_f64()
        ),
    );
    drop(replicas);
    assert_eq!(acked.len(), total);
    assert_eq!(
        (lost, dups, differ),
        (0, 0, 0),
        "lost, duplicated, differing"
    );
    assert!(outage_503 > 0, "no 503 seen while PostgreSQL was down");
    assert_eq!(overlaps, 0);
}

/// D8 negative: PostgreSQL with `synchronous_commit=off` could lose acknowledged commits, so
/// `frontdesk run` refuses to start and names the setting.
#[test]
fn refuses_to_start_without_synchronous_commit() {
    let pg = Pg::start(&["synchronous_commit=off"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("frontdesk.yaml");
    std::fs::write(
        &config,
        format!(
            "timezone: UTC\nstorage:\n  postgres: {}\nserver:\n  listen: 127.0.0.1:{}\n\
             channels:\n  - name: out\n    email: {{ file: \"{}/outbox\", from: \"fd@shop.test\", to: [team@shop.test] }}\n",
            pg.url,
            crate::support::free_port(),
            dir.path().display()
        ),
    )
    .unwrap();
    let (code, _out, err) =
        crate::support::frontdesk(&["run", "--config", config.to_str().unwrap()], &[]);
    assert_ne!(code, 0, "started on a database that may lose commits");
    assert!(err.contains("synchronous_commit"), "{err}");
    figure(
        "D8-negative",
        "PostgreSQL with synchronous_commit=off",
        &format!(
            "frontdesk run refused, exit {code}: {}",
            err.lines().last().unwrap_or("").trim()
        ),
    );
}
