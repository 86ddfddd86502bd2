//! `frontdesk run`: starts on a minimal config, answers /healthz, stops cleanly on SIGTERM.

use std::time::Duration;

use crate::support::{TestDaemon, frontdesk, http_get};

/// A minimal config: SQLite in the temp dir, file channel, nothing else.
pub const MINIMAL: &str = "storage:\n  sqlite: {dir}/frontdesk.db\nserver:\n  listen: 127.0.0.1:{port}\nchannels:\n  - name: out\n    email: { file: \"{dir}/outbox\", from: \"fd@example.com\", to: [a@example.com] }\n";

#[test]
fn run_answers_healthz_and_stops_on_sigterm_within_two_seconds() {
    let mut d = TestDaemon::start(MINIMAL);
    assert_eq!(
        http_get(d.port, "/healthz").unwrap(),
        (200, "ok\n".to_string())
    );
    assert_eq!(http_get(d.port, "/readyz").unwrap().0, 200);
    assert!(d.db().exists());
    let (status, took) = d.signal_and_wait(15, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", d.log.lock().unwrap());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let log = d.log.lock().unwrap().clone();
    assert!(log.contains("frontdesk started"), "{log}");
    assert!(log.contains("signal=\"SIGTERM\""), "{log}");
}

#[test]
fn sigint_also_stops_cleanly() {
    let mut d = TestDaemon::start(MINIMAL);
    let (status, _) = d.signal_and_wait(2, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn unwritable_state_path_is_a_one_line_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("f.yaml");
    // A regular file where the state directory should be: not creatable even as root.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, "").unwrap();
    let yaml = MINIMAL
        .replace(
            "{dir}/frontdesk.db",
            &format!("{}/sub/frontdesk.db", blocker.display()),
        )
        .replace("{dir}", dir.path().to_str().unwrap())
        .replace("{port}", "0");
    std::fs::write(&cfg, yaml).unwrap();
    let (code, _, err) = frontdesk(&["run", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    let last = err.lines().last().unwrap_or("");
    assert!(last.starts_with("frontdesk: cannot open store"), "{err}");
    assert!(last.contains(&blocker.display().to_string()), "{err}");
}

#[test]
fn messages_on_an_empty_store_is_an_empty_json_array() {
    let d = TestDaemon::start(MINIMAL);
    let (code, out, err) = frontdesk(
        &["messages", "--json", "--config", d.config.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!([])
    );
}

#[test]
fn metrics_count_messages_duplicates_and_rejections() {
    let form = "sources:\n  - name: form\n    webhook:\n      preset: form\n      max_body: 1KiB\n      auth: { scheme: none }\nsla:\n  policies:\n    - name: std\n      first_reply: 4h\n      next_reply: 8h\n";
    let d = TestDaemon::start(&format!("{MINIMAL}{form}"));
    let post = |key: &str, body: &[u8]| {
        crate::support::http_request(
            d.port,
            "POST",
            "/hooks/form",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Idempotency-Key", key),
            ],
            body,
        )
        .unwrap()
        .0
    };
    assert_eq!(post("a", b"email=a@example.org&message=one"), 200);
    assert_eq!(post("b", b"email=b@example.org&message=two"), 200);
    assert_eq!(post("b", b"email=b@example.org&message=two"), 200);
    assert_eq!(post("c", &vec![b'x'; 4096]), 413);
    // Rejection counters are written by the group-commit writer shortly after.
    let start = std::time::Instant::now();
    loop {
        let (code, text) = http_get(d.port, "/metrics").unwrap();
        assert_eq!(code, 200);
        let ok = text.contains("frontdesk_messages_total{source=\"form\",direction=\"inbound\",parse=\"ok\"} 2")
            && text.contains("frontdesk_webhook_requests_total{source=\"form\",result=\"duplicates\",reason=\"\"} 1")
            && text.contains("frontdesk_webhook_requests_total{source=\"form\",result=\"rejected\",reason=\"too_large\"} 1")
            && text.contains("# TYPE frontdesk_ingest_latency_seconds")
            && text.contains("frontdesk_conversations{state=\"waiting\"} 2")
            && text.contains("frontdesk_sla_targets{metric=\"first_reply\",state=\"active\"} 2");
        if ok {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn backup_while_running_is_a_consistent_copy() {
    let form = "sources:\n  - name: form\n    webhook:\n      preset: form\n      auth: { scheme: none }\n";
    let d = TestDaemon::start(&format!("{MINIMAL}{form}"));
    for i in 0..20 {
        let key = format!("k{i}");
        let (code, _) = crate::support::http_request(
            d.port,
            "POST",
            "/hooks/form",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Idempotency-Key", &key),
            ],
            format!("email=a{i}@example.org&message=hello").as_bytes(),
        )
        .unwrap();
        assert_eq!(code, 200);
    }
    let copy = d.dir.path().join("backup.db");
    let cfg = d.config.to_str().unwrap();
    let (code, out, err) = frontdesk(&["backup", copy.to_str().unwrap(), "--config", cfg], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("20 messages, integrity ok"), "{out}");
    // A second backup to the same path is refused rather than overwriting it.
    let (code, _, err) = frontdesk(&["backup", copy.to_str().unwrap(), "--config", cfg], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
}

/// Regression: a subject-less form message showed as `ann@example.org - ""` in the digest.
#[test]
fn digest_names_form_clients_and_quotes_their_words_when_there_is_no_subject() {
    let form = "team:\n  - name: Bo\n    email: [bo@example.com]\nresponsibilities:\n  - owner: Bo\nsources:\n  - name: form\n    webhook:\n      preset: form\n      auth: { scheme: none }\nsla:\n  policies:\n    - name: std\n      first_reply: 4h\n      next_reply: 8h\ndigests:\n  - name: morning\n";
    let d = TestDaemon::start(&format!("{MINIMAL}{form}"));
    let (code, _) = crate::support::http_request(
        d.port,
        "POST",
        "/hooks/form",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"name=Ann+Client&email=ann@example.org&message=can+you+call+me+back",
    )
    .unwrap();
    assert_eq!(code, 200);
    let cfg = d.config.to_str().unwrap();
    let start = std::time::Instant::now();
    loop {
        let (code, out, err) = frontdesk(&["digest", "--preview", "--config", cfg], &[]);
        assert_eq!(code, 0, "{err}");
        if out.contains("Ann Client - \"can you call me back\"") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
