//! `frontdesk check`: valid configs pass, and every mistake is named with its file, line and fix.

use crate::support::{frontdesk, write_file};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn quickstart_config_is_valid() {
    let (code, out, _) = frontdesk(&["check", &format!("{ROOT}/config/frontdesk.yaml")], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(": ok ("), "{out}");
    // The quickstart's unauthenticated loopback form is allowed, but check says so.
    assert!(
        out.contains("warning:") && out.contains("unauthenticated"),
        "{out}"
    );
}

#[test]
fn example_config_is_valid_when_its_secrets_exist() {
    let creds = tempfile::tempdir().unwrap();
    for name in ["imap-support", "form-secret", "twilio-token", "smtp"] {
        write_file(creds.path(), name, "s3cret-value\n", 0o400);
    }
    let dir = creds.path().to_str().unwrap();
    let (code, out, err) = frontdesk(
        &["check", &format!("{ROOT}/config/frontdesk.example.yaml")],
        &[
            ("CREDENTIALS_DIRECTORY", dir),
            ("APP_HOOK_SECRET", "whsec_test"),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("s3cret-value") && !err.contains("s3cret-value"));
}

#[test]
fn example_config_without_secrets_names_each_missing_one() {
    let (code, out, _) = frontdesk(
        &["check", &format!("{ROOT}/config/frontdesk.example.yaml")],
        &[("CREDENTIALS_DIRECTORY", "/nonexistent-creds")],
    );
    assert_eq!(code, 78);
    assert!(out.contains("imap-support"), "{out}");
    assert!(out.contains("APP_HOOK_SECRET"), "{out}");
}

fn check_text(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frontdesk.yaml");
    std::fs::write(&path, yaml.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
    let (code, out, err) = frontdesk(&["check", path.to_str().unwrap()], &[]);
    (code, format!("{out}{err}"))
}

const CHANNEL: &str =
    "    email: { file: /tmp/frontdesk-outbox, from: \"fd@example.com\", to: [a@example.com] }\n";

#[test]
fn three_channels_are_refused_naming_all_three() {
    let yaml = format!(
        "channels:\n  - name: ops-mail\n{CHANNEL}  - name: slack\n{CHANNEL}  - name: sms\n{CHANNEL}"
    );
    let (code, out) = check_text(&yaml);
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("at most two channels"), "{out}");
    assert!(out.contains("(ops-mail, slack, sms)"), "{out}");
}

#[test]
fn zero_channels_are_refused() {
    let (code, out) = check_text("timezone: UTC\n");
    assert_eq!(code, 78);
    assert!(out.contains("channels: no channel is configured"), "{out}");
}

#[test]
fn misspelt_key_gets_a_suggestion_and_a_line() {
    let yaml = format!("timezone: UTC\nsourcs: []\nchannels:\n  - name: a\n{CHANNEL}");
    let (code, out) = check_text(&yaml);
    assert_eq!(code, 78);
    assert!(
        out.contains("frontdesk.yaml:2: sourcs: unknown key `sourcs` (did you mean `sources`?)"),
        "{out}"
    );
}

#[test]
fn string_port_names_field_and_line() {
    let yaml = format!(
        "sources:\n  - name: mail\n    imap:\n      host: imap.example.com\n      port: nine-nine-three\n      username: u\n      password_env: PATH\nchannels:\n  - name: a\n{CHANNEL}"
    );
    let (code, out) = check_text(&yaml);
    assert_eq!(code, 78);
    assert!(
        out.contains("frontdesk.yaml:5: sources[0].imap.port:"),
        "{out}"
    );
    assert!(out.contains("nine-nine-three"), "{out}");
}

#[test]
fn group_readable_secret_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_file(dir.path(), "pw", "hunter2\n", 0o644);
    let yaml = format!(
        "sources:\n  - name: mail\n    imap:\n      host: imap.example.com\n      username: u\n      password_file: {}\nchannels:\n  - name: a\n{CHANNEL}",
        secret.display()
    );
    let (code, out) = check_text(&yaml);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("readable by group or others (mode 0644)"),
        "{out}"
    );
    assert!(
        out.contains(&format!("chmod 600 {}", secret.display())),
        "{out}"
    );
    assert!(!out.contains("hunter2"));
    // The same file with mode 0600 is accepted.
    write_file(dir.path(), "pw", "hunter2\n", 0o600);
    let (code, out) = check_text(&yaml);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn four_mistakes_are_all_reported_in_one_run() {
    let yaml = format!(
        "timezone: Mars/Olympus\nserver:\n  listen: not-an-address\nsources:\n  - name: mail\n    imap:\n      host: imap.example.com\n      prot: 993\n      username: u\n      password_env: PATH\nchannels:\n  - name: a\n{CHANNEL}digests:\n  - name: d\n    channel: nope\n"
    );
    let (code, out) = check_text(&yaml);
    assert_eq!(code, 78);
    assert!(out.contains("4 problems"), "{out}");
    assert!(
        out.contains(":1: timezone: unknown time zone `Mars/Olympus`"),
        "{out}"
    );
    assert!(out.contains(":3: server.listen:"), "{out}");
    assert!(
        out.contains(":8: sources[0].imap.prot: unknown key `prot` (did you mean `port`?)"),
        "{out}"
    );
    assert!(
        out.contains(":16: digests[0].channel: unknown channel `nope`"),
        "{out}"
    );
}

#[test]
fn yaml_syntax_error_has_a_line() {
    let (code, out) = check_text("timezone: UTC\nchannels: [\n  - broken\n");
    assert_eq!(code, 78);
    assert!(out.contains("not valid YAML"), "{out}");
    assert!(out.contains("frontdesk.yaml:"), "{out}");
}

#[test]
fn plaintext_imap_to_a_remote_host_is_refused() {
    let yaml = format!(
        "sources:\n  - name: mail\n    imap:\n      host: imap.example.com\n      tls: none\n      username: u\n      password_env: PATH\nchannels:\n  - name: a\n{CHANNEL}"
    );
    let (code, out) = check_text(&yaml);
    assert_eq!(code, 78);
    assert!(out.contains("sources[0].imap.tls"), "{out}");
}

#[test]
fn postgres_url_is_accepted_and_a_bad_one_named() {
    let yaml = format!(
        "storage:\n  postgres: postgres://frontdesk@db/frontdesk?sslmode=verify-full\n  password_env: PATH\nchannels:\n  - name: a\n{CHANNEL}"
    );
    let (code, out) = check_text(&yaml);
    assert_eq!(code, 0, "{out}");
    let yaml =
        format!("storage:\n  postgres: mysql://db/frontdesk\nchannels:\n  - name: a\n{CHANNEL}");
    let (code, out) = check_text(&yaml);
    assert_eq!(code, 78);
    assert!(
        out.contains("storage.postgres: not a PostgreSQL URL"),
        "{out}"
    );
    let yaml = format!(
        "storage:\n  postgres: postgres://db/frontdesk\n  password_env: FRONTDESK_NO_SUCH_VAR\nchannels:\n  - name: a\n{CHANNEL}"
    );
    let (code, out) = check_text(&yaml);
    assert_eq!(code, 78);
    assert!(out.contains("storage.password_env"), "{out}");
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.yaml");
    std::fs::write(&path, format!("channels:\n  - name: a\n{CHANNEL}")).unwrap();
    let p = path.to_str().unwrap();
    let (code, out, _) = frontdesk(&["check", p], &[("FRONTDESK__SERVER__LISTEN", "nonsense")]);
    assert_eq!(code, 78);
    assert!(out.contains("`nonsense` is not a socket address"), "{out}");
    let (code, _, _) = frontdesk(
        &["check", p],
        &[("FRONTDESK__SERVER__LISTEN", "127.0.0.1:9999")],
    );
    assert_eq!(code, 0);
}

#[test]
fn missing_config_file_is_a_config_error() {
    let (code, _, err) = frontdesk(&["run", "--config", "/nonexistent/frontdesk.yaml"], &[]);
    assert_eq!(code, 78);
    assert!(err.contains("cannot read the config file"), "{err}");
}

#[test]
fn schema_is_json_describing_every_top_level_key() {
    let (code, out, _) = frontdesk(&["schema"], &[]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let props = v["properties"].as_object().unwrap();
    for key in [
        "timezone",
        "storage",
        "server",
        "team",
        "sources",
        "clients",
        "responsibilities",
        "sla",
        "channels",
        "digests",
        "alerts",
    ] {
        assert!(props.contains_key(key), "schema lacks {key}");
    }
}

/// Every key of the JSON Schema is documented in the example config, so the two cannot drift.
#[test]
fn example_config_documents_every_schema_key() {
    let (_, out, _) = frontdesk(&["schema"], &[]);
    let schema: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    fn walk(v: &serde_json::Value, keys: &mut std::collections::BTreeSet<String>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::Object(props)) = map.get("properties") {
                    keys.extend(props.keys().cloned());
                }
                map.values().for_each(|x| walk(x, keys));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|x| walk(x, keys)),
            _ => {}
        }
    }
    walk(&schema, &mut keys);
    assert!(keys.len() > 60, "schema walk found only {keys:?}");
    let example = std::fs::read_to_string(format!("{ROOT}/config/frontdesk.example.yaml")).unwrap();
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            let needle_block = format!("{k}:");
            !example.contains(&needle_block)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "keys missing from config/frontdesk.example.yaml: {missing:?}"
    );
}

#[test]
fn check_reports_sources_and_clients_that_reach_no_owner_or_policy() {
    let yaml = format!(
        "team:\n  - name: Ann\n    email: [ann@example.com]\nsources:\n  - name: form\n    webhook: {{ preset: form, auth: {{ scheme: none }} }}\n  - name: sms\n    webhook: {{ preset: form, auth: {{ scheme: none }} }}\nclients:\n  - name: ACME\n    match: {{ email_domain: acme.example }}\n    tags: [vip]\nresponsibilities:\n  - match: {{ source: form }}\n    owner: Ann\nsla:\n  policies:\n    - name: vip\n      match: {{ client_tag: vip }}\n      first_reply: 1h\n      next_reply: 4h\nchannels:\n  - name: a\n{CHANNEL}"
    );
    let (code, out) = check_text(&yaml);
    assert_eq!(code, 0, "warnings, not errors: {out}");
    assert!(out.contains("source `sms` reaches no owner rule"), "{out}");
    assert!(out.contains("source `form` reaches no SLA policy"), "{out}");
    assert!(
        !out.contains("source `form` reaches no owner rule"),
        "{out}"
    );
    assert!(
        out.contains("client `ACME` on source `sms` reaches no owner rule"),
        "{out}"
    );
    // ACME is vip, and the vip policy reaches it.
    assert!(
        !out.contains("client `ACME` on source `form` reaches no SLA policy"),
        "{out}"
    );
    // With defaults at the end, nothing is reported.
    let fixed = yaml
        .replace("    owner: Ann\nsla:", "    owner: Ann\n  - owner: Ann\nsla:")
        .replace("      next_reply: 4h\n", "      next_reply: 4h\n    - name: standard\n      first_reply: 4h\n      next_reply: 8h\n");
    let (code, out) = check_text(&fixed);
    assert_eq!(code, 0);
    assert!(!out.contains("reaches no"), "{out}");
}
