//! `frontdesk store copy`: a SQLite installation moved to PostgreSQL keeps every row and id.

use crate::support::{TestDaemon, frontdesk, http_request, pg_cluster};

const YAML: &str = r#"storage:
  STORAGE
server:
  listen: 127.0.0.1:{port}
team:
  - name: Maria
    email: [maria@example.com]
sources:
  - name: form
    webhook:
      preset: form
      auth: { scheme: none }
sla:
  policies:
    - name: standard
      first_reply: 4h
      next_reply: 8h
      calendar: always
channels:
  - name: out
    email: { file: "{dir}/outbox", from: "fd@example.com", to: [a@example.com] }
"#;

fn post(d: &TestDaemon, key: &str) -> (u16, i64) {
    let (code, text) = http_request(
        d.port,
        "POST",
        "/hooks/form",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Idempotency-Key", key),
        ],
        format!("name=N&email=n{key}@client.example&message=hi+{key}").as_bytes(),
    )
    .unwrap();
    let id = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["id"].as_i64())
        .unwrap_or(-1);
    (code, id)
}

#[test]
fn sqlite_installation_moves_to_postgres_with_its_ids() {
    let mut d = TestDaemon::start(&YAML.replace("STORAGE", "sqlite: {dir}/frontdesk.db"));
    let ids: Vec<i64> = (0..30)
        .map(|i| {
            let (code, id) = post(&d, &format!("k{i}"));
            assert_eq!(code, 200);
            id
        })
        .collect();
    d.signal_and_wait(15, std::time::Duration::from_secs(20));
    let db = d.db();
    let url = pg_cluster().fresh_database();
    let from = format!("sqlite:{}", db.display());
    let to = format!("postgres:{url}");

    let (code, out, err) = frontdesk(
        &["store", "copy", "--from", &from, "--to", &to, "--json"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let tables: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let rows = |t: &str| {
        tables
            .iter()
            .find(|v| v["table"] == t)
            .and_then(|v| v["rows"].as_u64())
            .unwrap()
    };
    assert_eq!(rows("messages"), 30);
    assert!(
        tables
            .iter()
            .all(|v| v["sha256"].as_str().unwrap().len() == 64)
    );

    // Into a database that has rows: refused, exit 1, nothing changed.
    let (code, _, err) = frontdesk(&["store", "copy", "--from", &from, "--to", &to], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("not empty"), "{err}");
    // Malformed arguments name the expected form.
    let (code, _, err) = frontdesk(&["store", "copy", "--from", "q.db", "--to", &to], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("sqlite:PATH"), "{err}");

    // The daemon on PostgreSQL knows every delivery: a retry gets its original id.
    let pg = TestDaemon::start(&YAML.replace("STORAGE", &format!("postgres: {url}")));
    for (i, id) in ids.iter().enumerate().step_by(7) {
        assert_eq!(post(&pg, &format!("k{i}")), (200, *id));
    }
    let (code, new) = post(&pg, "fresh");
    assert_eq!(code, 200);
    assert!(new > *ids.iter().max().unwrap(), "{new}");
}
