//! The core loop end to end: messages through the real webhook path into conversations, owners
//! and due times shown by `frontdesk conversations --json`; a breach written exactly once across
//! SIGKILLs and restarts around the breach moment.

use std::time::{Duration, Instant};

use crate::support::{TestDaemon, frontdesk, http_request, send_signal};

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

fn rfc3339(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc)
}

#[test]
fn webhook_messages_become_conversations_with_owner_and_due_time() {
    let d = TestDaemon::start(&YAML.replace("FIRST", "1h"));
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
}

#[test]
fn breach_is_recorded_exactly_once_across_sigkill_and_restart() {
    let mut d = TestDaemon::start(&YAML.replace("FIRST", "3s"));
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
            let store = frontdesk::store::Store::open(&db).await.unwrap();
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
        let store = frontdesk::store::Store::open(&db).await.unwrap();
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
