//! The core loop end to end: messages through the real webhook path into conversations, owners
//! and due times shown by `frontdesk conversations --json`; a breach written exactly once across
//! SIGKILLs and restarts around the breach moment.

use std::time::{Duration, Instant};

use crate::support::{Backend, TestDaemon, frontdesk, http_get, http_request, send_signal};

/// `YAML` with its storage on `backend`; the PostgreSQL URL when there.
fn yaml_on(backend: Backend, first: &str) -> (String, Option<String>) {
    let yaml = YAML.replace("FIRST", first);
    match backend {
        Backend::Sqlite => (yaml, None),
        Backend::Postgres => {
            let url = crate::support::pg_cluster().fresh_database();
            let yaml = yaml.replace(
                "storage:\n  sqlite: {dir}/frontdesk.db\n",
                &format!("storage:\n  postgres: {url}\n"),
            );
            (yaml, Some(url))
        }
    }
}

/// The daemon's store, opened from outside (SQLite file or PostgreSQL URL).
async fn open_store(db: &std::path::Path, pg_url: Option<&str>) -> frontdesk::store::Store {
    match pg_url {
        Some(url) => frontdesk::store::Store::open_postgres(url, None)
            .await
            .unwrap(),
        None => frontdesk::store::Store::open(db).await.unwrap(),
    }
}

const YAML: &str = r#"storage:
  sqlite: {dir}/frontdesk.db
server:
  listen: 127.0.0.1:{port}
team:
  - name: Maria
    email: [maria@example.com]
  - name: Nikos
    email: [nikos@example.com]
sources:
  - name: form
    webhook:
      preset: form
      auth: { scheme: none }
clients:
  - name: ACME Ltd
    match: { email_domain: acme.example }
    tags: [vip]
responsibilities:
  - match: { client_tag: vip }
    owner: Nikos
  - owner: Maria
sla:
  policies:
    - name: vip
      match: { client_tag: vip }
      first_reply: FIRST
      next_reply: 4h
      calendar: always
      warn_before: 50%
    - name: standard
      first_reply: 4h
      next_reply: 8h
      calendar: always
      warn_before: 30m
channels:
  - name: out
    email: { file: "{dir}/outbox", from: "fd@example.com", to: [a@example.com] }
alerts:
  channel: out
  on: [sla_warning, sla_breach]
"#;

fn post(d: &TestDaemon, key: &str, body: &str) {
    let (code, text) = http_request(
        d.port,
        "POST",
        "/hooks/form",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Idempotency-Key", key),
        ],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 200, "{text}");
}

fn conversations(d: &TestDaemon) -> Vec<serde_json::Value> {
    let (code, out, err) = frontdesk(
        &[
            "conversations",
            "--json",
            "--config",
            d.config.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `f` every 100 ms until it holds (true) or `limit` passes (false).
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

fn rfc3339(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc)
}

#[test]
fn webhook_messages_become_conversations_with_owner_and_due_time_sqlite() {
    webhook_messages_become_conversations_with_owner_and_due_time(Backend::Sqlite);
}

#[test]
fn webhook_messages_become_conversations_with_owner_and_due_time_postgres() {
    webhook_messages_become_conversations_with_owner_and_due_time(Backend::Postgres);
}

fn webhook_messages_become_conversations_with_owner_and_due_time(backend: Backend) {
    let (yaml, _) = yaml_on(backend, "1h");
    let d = TestDaemon::start(&yaml);
    post(
        &d,
        "a",
        "name=Bob&email=bob@acme.example&message=Invoice+please",
    );
    post(&d, "b", "name=Ann&email=ann@mail.example&message=Hello");
    let rows = wait_for(Duration::from_secs(10), || {
        let rows = conversations(&d);
        (rows.len() == 2).then_some(rows)
    });
    let by_client = |c: &str| rows.iter().find(|r| r["client"] == c).unwrap().clone();
    let acme = by_client("ACME Ltd");
    assert_eq!(acme["owner"], "Nikos");
    assert_eq!(acme["policy"], "vip");
    assert_eq!(acme["state"], "waiting");
    assert_eq!(
        rfc3339(&acme["due_at"]) - rfc3339(&acme["waiting_since"]),
        chrono::TimeDelta::hours(1)
    );
    let ann = by_client("ann@mail.example");
    assert_eq!(
        (ann["owner"].as_str(), ann["policy"].as_str()),
        (Some("Maria"), Some("standard"))
    );
    assert_eq!(
        rfc3339(&ann["due_at"]) - rfc3339(&ann["waiting_since"]),
        chrono::TimeDelta::hours(4)
    );
    // Most urgent first.
    assert_eq!(rows[0]["client"], "ACME Ltd");
    // The read side works on this backend too: sources and metrics.
    let (code, out, err) = frontdesk(
        &["sources", "--json", "--config", d.config.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"form\""), "{out}");
    let (code, metrics) = http_get(d.port, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains(
            "frontdesk_messages_total{source=\"form\",direction=\"inbound\",parse=\"ok\"} 2"
        ),
        "{metrics}"
    );
}

#[test]
fn breach_is_recorded_exactly_once_across_sigkill_and_restart_sqlite() {
    breach_is_recorded_exactly_once_across_sigkill_and_restart(Backend::Sqlite);
}

#[test]
fn breach_is_recorded_exactly_once_across_sigkill_and_restart_postgres() {
    breach_is_recorded_exactly_once_across_sigkill_and_restart(Backend::Postgres);
}

fn breach_is_recorded_exactly_once_across_sigkill_and_restart(backend: Backend) {
    let (yaml, pg_url) = yaml_on(backend, "3s");
    let mut d = TestDaemon::start(&yaml);
    post(&d, "k", "name=Bob&email=bob@acme.example&message=Down");
    let since = Instant::now();
    // Kill the daemon hard around the warning (1.5 s) and the breach (3 s), restarting each time.
    for at in [1400u64, 2900, 3050] {
        let wait = Duration::from_millis(at).saturating_sub(since.elapsed());
        std::thread::sleep(wait);
        send_signal(d.pid() as i32, 9);
        std::thread::sleep(Duration::from_millis(100));
        d.spawn();
    }
    let db = d.db();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = wait_for(Duration::from_secs(15), || {
        let keys = rt.block_on(async {
            let store = open_store(&db, pg_url.as_deref()).await;
            let k = store.sla_alert_keys().await.unwrap();
            store.close().await;
            k
        });
        keys.iter()
            .any(|k| k.starts_with("breach:"))
            .then_some(keys)
    });
    // Give a restarted core time to (wrongly) write a second one.
    std::thread::sleep(Duration::from_millis(1500));
    let keys_after = rt.block_on(async {
        let store = open_store(&db, pg_url.as_deref()).await;
        store.sla_alert_keys().await.unwrap()
    });
    assert_eq!(keys, keys_after);
    assert_eq!(
        keys.iter().filter(|k| k.starts_with("breach:")).count(),
        1,
        "{keys:?}"
    );
    assert!(
        keys.iter().filter(|k| k.starts_with("warn:")).count() <= 1,
        "{keys:?}"
    );
    let rows = conversations(&d);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["state"], "breached");
}

/// A Friday at 16:30 in Athens, at least two weeks ago: every deadline below is in the past.
fn past_friday_1630_athens() -> chrono::DateTime<chrono::Utc> {
    use chrono::{Datelike, TimeZone};
    let mut day = chrono::Utc::now().date_naive() - chrono::Days::new(14);
    while day.weekday() != chrono::Weekday::Fri {
        day = day - chrono::Days::new(1);
    }
    chrono_tz::Europe::Athens
        .from_local_datetime(&day.and_hms_opt(16, 30, 0).unwrap())
        .single()
        .unwrap()
        .with_timezone(&chrono::Utc)
}

fn mail(from: &str, to: &str, subject: &str, id: &str, irt: Option<&str>) -> Vec<u8> {
    let irt = irt.map_or(String::new(), |p| format!("In-Reply-To: <{p}>\r\n"));
    // The Date header lies (a year earlier): clocks start at the receipt time, INTERNALDATE.
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\n{irt}\
         Date: Mon, 1 Jan 2024 08:00:00 +0000\r\n\r\nbody of {id}\r\n"
    )
    .into_bytes()
}

/// #5 end to end: mail APPENDed to the real Dovecot with past INTERNALDATEs (INBOX and Sent) and
/// a signed webhook become conversations with the owners and business-hours due times the
/// calendar gives, read back through `frontdesk conversations --json`.
#[test]
fn imap_mail_with_past_receipt_times_and_a_signed_webhook_get_business_hour_due_times() {
    use hmac::{Hmac, KeyInit, Mac};
    let rig = crate::rig::Rig::shared();
    let user = rig.new_mailbox("corebiz");
    let friday = past_friday_1630_athens();
    let monday_1000 = friday + chrono::TimeDelta::days(3) - chrono::TimeDelta::minutes(390);
    let tuesday_1500 = friday + chrono::TimeDelta::days(4) - chrono::TimeDelta::minutes(90);
    let at = |t: chrono::DateTime<chrono::Utc>| Some(std::time::SystemTime::from(t));
    rig.append_many_dated(
        &user,
        "INBOX",
        [
            (
                mail(
                    "Bob <bob@acme.example>",
                    "support@shop.test",
                    "Invoice 42",
                    "a@acme",
                    None,
                ),
                at(friday),
            ),
            (
                mail(
                    "ann@mail.example",
                    "support@shop.test",
                    "Broken tap",
                    "c@mail",
                    None,
                ),
                at(tuesday_1500),
            ),
        ],
    );
    rig.append_many_dated(
        &user,
        "Sent",
        [(
            mail(
                "maria@example.com",
                "bob@acme.example",
                "Re: Invoice 42",
                "b@shop",
                Some("a@acme"),
            ),
            at(monday_1000),
        )],
    );
    let yaml = format!(
        r#"storage:
  sqlite: {{dir}}/frontdesk.db
server:
  listen: 127.0.0.1:{{port}}
team:
  - name: Maria
    email: [maria@example.com]
  - name: Nikos
    email: [nikos@example.com]
sources:
  - name: mail
    imap:
      host: localhost
      port: {port}
      tls: implicit
      ca_file: {ca}
      username: {user}
      password: secret
      backfill: all
      folders: [{{name: INBOX, role: inbound}}, {{name: Sent, role: sent}}]
  - name: events
    webhook:
      preset: json
      auth: {{ scheme: hmac-sha256, header: X-Signature, prefix: "sha256=", encoding: hex, secret_file: {{dir}}/hm }}
      mapping: {{ id: /id, from: /from, text: /text }}
clients:
  - name: ACME Ltd
    match: {{ email_domain: acme.example }}
    tags: [vip]
responsibilities:
  - match: {{ client_tag: vip }}
    owner: Nikos
  - owner: Maria
sla:
  calendars:
    office:
      timezone: Europe/Athens
      hours: {{ mon-fri: ["09:00-17:00"] }}
  policies:
    - {{ name: vip, match: {{ client_tag: vip }}, first_reply: 1h, next_reply: 4h, calendar: office }}
    - {{ name: standard, first_reply: 4h, next_reply: 8h, calendar: office }}
channels:
  - name: out
    email: {{ file: "{{dir}}/outbox", from: "fd@example.com", to: [a@example.com] }}
"#,
        port = rig.imaps_port,
        ca = rig.ca.display(),
    );
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hm");
    std::fs::write(&secret, "hook-secret").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let d = TestDaemon::start_with(&yaml, &[], dir);

    let body = br#"{"id":"evt-1","from":"carl@mail.example","text":"Do you deliver on Sundays?"}"#;
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"hook-secret").unwrap();
    mac.update(body);
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let sent_at = chrono::Utc::now();
    let (code, text) = http_request(
        d.port,
        "POST",
        "/hooks/events",
        &[("Content-Type", "application/json"), ("X-Signature", &sig)],
        body,
    )
    .unwrap();
    assert_eq!(code, 200, "{text}");

    // The core threads the messages in one transaction and ticks deadlines in the next, so wait
    // for the tick (Ann's overdue target breached), not only for the three conversations. And
    // for Bob's answer: the webhook can wake the core after INBOX is committed and before the
    // Sent folder is, and Bob is then breached until Maria's reply is processed (a CI run
    // caught that moment).
    let mut last = Vec::new();
    let settled = wait_until(Duration::from_secs(20), || {
        last = conversations(&d);
        let state = |client: &str| {
            last.iter()
                .find(|r| r["client"] == client)
                .map(|r| r["state"].clone())
        };
        last.len() == 3
            && state("ann@mail.example").is_some_and(|s| s == "breached")
            && state("ACME Ltd").is_some_and(|s| s == "idle")
    });
    assert!(settled, "not settled within 20 s: {last:#?}");
    let rows = last;
    let by_client = |c: &str| {
        rows.iter()
            .find(|r| r["client"] == c)
            .unwrap_or_else(|| panic!("no conversation for {c}: {rows:#?}"))
            .clone()
    };
    // Bob wrote Friday 16:30; 30 minutes of Friday's hours and 30 of Monday's: due Monday
    // 09:30. Maria's Sent reply at Monday 10:00 (threaded by In-Reply-To) answered it.
    let bob = by_client("ACME Ltd");
    assert_eq!(
        (bob["owner"].as_str(), bob["policy"].as_str()),
        (Some("Nikos"), Some("vip"))
    );
    assert_eq!(bob["state"], "idle", "the Sent reply answered Bob: {bob:#}");
    // Ann wrote Tuesday 15:00: two hours on Tuesday, two on Wednesday: due Wednesday 11:00.
    let ann = by_client("ann@mail.example");
    assert_eq!(ann["owner"], "Maria");
    assert_eq!(rfc3339(&ann["waiting_since"]), tuesday_1500);
    assert_eq!(
        rfc3339(&ann["due_at"]),
        tuesday_1500 + chrono::TimeDelta::hours(20)
    );
    assert_eq!(ann["state"], "breached", "{ann:#}");
    // Carl's webhook starts its clock at receipt, now: due 4 business hours later.
    let carl = by_client("carl@mail.example");
    let waiting = rfc3339(&carl["waiting_since"]);
    assert!(
        waiting >= sent_at - chrono::TimeDelta::seconds(1) && waiting <= chrono::Utc::now(),
        "{carl:#}"
    );
    let cal = frontdesk::sla::calendar::Calendar::new(
        chrono_tz::Europe::Athens,
        frontdesk::sla::calendar::parse_hours([("mon-fri", vec!["09:00-17:00".to_string()])])
            .unwrap(),
        Default::default(),
    )
    .unwrap();
    assert_eq!(
        rfc3339(&carl["due_at"]),
        cal.add_business(waiting, chrono::TimeDelta::hours(4)),
        "{carl:#}"
    );

    // Bob's first-reply target shows in the statistics as met late after 1h30 of business time.
    let (code, out, err) = frontdesk(
        &[
            "stats",
            "--json",
            "--by",
            "client",
            "--since",
            &(friday - chrono::TimeDelta::days(1)).to_rfc3339(),
            "--config",
            d.config.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let stats: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let acme = stats
        .iter()
        .find(|s| s["group"] == "ACME Ltd")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(acme["metric"], "first_reply");
    assert_eq!(acme["median_business_s"], 90 * 60, "{out}");
    assert_eq!(acme["share_met"], 0.0, "{out}");
}

/// Connecting a mailbox whose history was answered long ago must not alert: on the first pass
/// every client message is past due until the team's reply to it is in. The Sent folder is
/// therefore synced before the inbox, so no core step (woken here by a busy web form) can see a
/// client message without its reply. The one message nobody answered still alerts.
#[test]
fn a_first_sync_of_answered_history_alerts_only_for_the_unanswered_message() {
    const ANSWERED: usize = 40;
    let rig = crate::rig::Rig::shared();
    let user = rig.new_mailbox("corehist");
    let asked = chrono::Utc::now() - chrono::TimeDelta::days(10);
    let at = |t: chrono::DateTime<chrono::Utc>| Some(std::time::SystemTime::from(t));
    let client = |i: usize| format!("client{i}@mail.example");
    let mut inbox: Vec<_> = (0..ANSWERED)
        .map(|i| {
            let sent = asked + chrono::TimeDelta::minutes(i as i64);
            let raw = mail(
                &client(i),
                "support@shop.test",
                &format!("Order {i}"),
                &format!("q{i}@mail"),
                None,
            );
            (raw, at(sent))
        })
        .collect();
    inbox.push((
        mail(
            "lost@mail.example",
            "support@shop.test",
            "Anyone there?",
            "lost@mail",
            None,
        ),
        at(asked),
    ));
    rig.append_many_dated(&user, "INBOX", inbox);
    rig.append_many_dated(
        &user,
        "Sent",
        (0..ANSWERED).map(|i| {
            let raw = mail(
                "maria@example.com",
                &client(i),
                &format!("Re: Order {i}"),
                &format!("r{i}@shop"),
                Some(&format!("q{i}@mail")),
            );
            (raw, at(asked + chrono::TimeDelta::minutes(i as i64 + 30)))
        }),
    );
    let yaml = format!(
        r#"storage:
  sqlite: {{dir}}/frontdesk.db
server:
  listen: 127.0.0.1:{{port}}
team:
  - name: Maria
    email: [maria@example.com]
sources:
  - name: mail
    imap:
      host: localhost
      port: {port}
      tls: implicit
      ca_file: {ca}
      username: {user}
      password: secret
      backfill: all
      batch_size: 4
      folders: [{{name: INBOX, role: inbound}}, {{name: Sent, role: sent}}]
  - name: form
    webhook:
      preset: form
      auth: {{ scheme: none }}
responsibilities:
  - owner: Maria
sla:
  policies:
    - {{ name: standard, first_reply: 1h, next_reply: 4h, calendar: always, warn_before: 30m }}
channels:
  - name: out
    email: {{ file: "{{dir}}/outbox", from: "fd@example.com", to: [a@example.com] }}
alerts:
  channel: out
  on: [sla_warning, sla_breach]
"#,
        port = rig.imaps_port,
        ca = rig.ca.display(),
    );
    let d = TestDaemon::start_with(&yaml, &[], tempfile::tempdir().unwrap());

    // A busy web form wakes the core again and again while the mailbox is synced.
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let form = {
        let busy = busy.clone();
        let port = d.port;
        std::thread::spawn(move || {
            let mut n = 0;
            while busy.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let body = format!("name=Web&email=web@form.example&message=ping+{n}");
                let (code, text) = http_request(
                    port,
                    "POST",
                    "/hooks/form",
                    &[
                        ("Content-Type", "application/x-www-form-urlencoded"),
                        ("Idempotency-Key", &format!("ping-{n}")),
                    ],
                    body.as_bytes(),
                )
                .unwrap();
                assert_eq!(code, 200, "{text}");
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        })
    };
    let mut last = Vec::new();
    let settled = wait_until(Duration::from_secs(60), || {
        last = conversations(&d);
        let mail_rows = last.iter().filter(|r| r["client"] != "web@form.example");
        let (idle, other): (Vec<_>, Vec<_>) = mail_rows.partition(|r| r["state"] == "idle");
        idle.len() == ANSWERED
            && other.len() == 1
            && other[0]["client"] == "lost@mail.example"
            && other[0]["state"] == "breached"
    });
    busy.store(false, std::sync::atomic::Ordering::Relaxed);
    let pings = form.join().unwrap();
    assert!(settled, "not settled within 60 s: {last:#?}");
    assert!(pings > 1, "the form woke the core only {pings} time(s)");

    let lost = last
        .iter()
        .find(|r| r["client"] == "lost@mail.example")
        .and_then(|r| r["id"].as_i64())
        .unwrap_or_else(|| panic!("no id for lost@mail.example: {last:#?}"));
    let keys = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = open_store(&d.dir.path().join("frontdesk.db"), None).await;
        store.sla_alert_keys().await.unwrap()
    });
    let mut keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    keys.sort_unstable();
    // (no warning: the target was past due when first seen)
    assert_eq!(
        keys,
        [format!("breach:{lost}:1")],
        "only the unanswered message alerts (conversations: {last:#?})"
    );
}
