//! E7, the secret-leak sweep: a sentinel in every credential slot, the daemon at trace level,
//! real IMAP, SMTP and webhook traffic; no sentinel may appear in logs, CLI output, the database
//! or the process's command line and environment.

use std::time::{Duration, Instant};

use crate::rig::Rig;
use crate::support::{TestDaemon, frontdesk, http_request, write_file};

const IMAP_PW: &str = "SENTINEL-imap-pw-4f1a93";
const SMTP_PW: &str = "SENTINEL-smtp-pw-9b2c71";
const BEARER: &str = "SENTINEL-bearer-77e0d2";
const BASIC_USER: &str = "sentinel-basic-user-31aa";
const BASIC_PW: &str = "SENTINEL-basic-pw-55c3";
const HMAC: &str = "SENTINEL-hmac-12f9b0";

fn hmac_hex(key: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    m.update(body);
    hex::encode(m.finalize().into_bytes())
}

/// (path, headers, expected status).
type HookCase = (&'static str, Vec<(&'static str, String)>, u16);

#[test]
fn no_secret_reaches_logs_output_or_the_database() {
    let rig = Rig::shared();
    let user = format!("sweep{}", std::process::id());
    rig.add_user_with_password(&user, IMAP_PW);
    rig.append(&user, "INBOX", b"From: Client <client@example.org>\r\nTo: support@example.com\r\nSubject: hello\r\nMessage-ID: <sweep-1@example.org>\r\n\r\nplease call me\r\n");

    let creds = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("imap", IMAP_PW),
        ("smtp", SMTP_PW),
        ("bearer", BEARER),
        ("basic", BASIC_PW),
        ("hmac", HMAC),
    ] {
        write_file(creds.path(), name, &format!("{value}\n"), 0o400);
    }
    let credentials = creds.path().to_str().unwrap().to_string();
    let lines = [
        "storage:".to_string(),
        "  sqlite: {dir}/frontdesk.db".into(),
        "server:".into(),
        "  listen: 127.0.0.1:{port}".into(),
        "team:".into(),
        "  - name: Ann".into(),
        "    email: [ann@example.com]".into(),
        "sources:".into(),
        "  - name: mail".into(),
        format!(
            "    imap: {{ host: 127.0.0.1, port: {}, ca_file: {}, username: {user}, password_credential: imap, backfill: all }}",
            rig.imaps_port,
            rig.ca.display()
        ),
        "  - name: bearer-hook".into(),
        "    webhook: { preset: form, auth: { scheme: bearer, secret_credential: bearer } }".into(),
        "  - name: basic-hook".into(),
        format!("    webhook: {{ preset: form, auth: {{ scheme: basic, username: {BASIC_USER}, secret_credential: basic }} }}"),
        "  - name: hmac-hook".into(),
        "    webhook: { preset: form, auth: { scheme: hmac-sha256, header: X-Signature, secret_credential: hmac } }".into(),
        "channels:".into(),
        "  - name: mail-out".into(),
        "    email:".into(),
        format!(
            "      smtp: {{ host: 127.0.0.1, port: {}, tls: none, username: frontdesk, password_credential: smtp, timeout: 5s }}",
            rig.smtp_port
        ),
        "      from: \"fd@example.com\"".into(),
        "      to: [ann@example.com]".into(),
    ];
    let yaml = lines.join("\n") + "\n";
    let env = [
        ("CREDENTIALS_DIRECTORY", credentials.as_str()),
        ("FRONTDESK_LOG", "trace"),
    ];
    let mut d = TestDaemon::start_with(&yaml, &env, tempfile::tempdir().unwrap());
    let cfg = d.config.to_str().unwrap().to_string();

    // The process's command line and environment hold no secret (they come from files).
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", d.pid())).unwrap();
    let environ = std::fs::read(format!("/proc/{}/environ", d.pid())).unwrap();

    // Webhooks: right and wrong credentials for each scheme.
    let body = b"name=Client&email=client@example.org&message=hi";
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let basic_ok = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{BASIC_USER}:{BASIC_PW}"))
    };
    let cases: Vec<HookCase> = vec![
        (
            "/hooks/bearer-hook",
            vec![("Authorization", format!("Bearer {BEARER}"))],
            200,
        ),
        (
            "/hooks/bearer-hook",
            vec![("Authorization", format!("Bearer {BEARER}x"))],
            401,
        ),
        (
            "/hooks/basic-hook",
            vec![("Authorization", format!("Basic {basic_ok}"))],
            200,
        ),
        (
            "/hooks/basic-hook",
            vec![("Authorization", "Basic d3Jvbmc6d3Jvbmc=".to_string())],
            401,
        ),
        (
            "/hooks/hmac-hook",
            vec![("X-Signature", hmac_hex(HMAC, body))],
            200,
        ),
        (
            "/hooks/hmac-hook",
            vec![("X-Signature", hmac_hex("wrong", body))],
            401,
        ),
    ];
    for (i, (path, headers, want)) in cases.iter().enumerate() {
        let key = format!("sweep-{i}");
        let mut h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        h.push(form);
        h.push(("Idempotency-Key", &key));
        let (code, text) = http_request(d.port, "POST", path, &h, body).unwrap();
        assert_eq!(code, *want, "{path}: {text}");
    }

    // IMAP: the message arrives (the login with the sentinel password worked).
    let start = Instant::now();
    loop {
        let (_, out, _) = frontdesk(
            &["messages", "--json", "--source", "mail", "--config", &cfg],
            &env,
        );
        if out.contains("sweep-1@example.org") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "imap never delivered:\n{}",
            d.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // SMTP: a send that authenticates (or tries to) with the sentinel password.
    let mut outputs = String::new();
    for args in [
        vec!["digest", "--send", "--config", &cfg],
        vec!["check", &cfg],
        vec!["sources", "--json", "--config", &cfg],
        vec!["messages", "--json", "--config", &cfg],
        vec!["digest", "--preview", "--config", &cfg],
    ] {
        let (_, out, err) = frontdesk(&args, &env);
        outputs.push_str(&out);
        outputs.push_str(&err);
    }
    std::thread::sleep(Duration::from_secs(2));
    let (status, _) = d.signal_and_wait(15, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));

    let log = d.log.lock().unwrap().clone();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the sweep must run at trace level"
    );
    let mut db = Vec::new();
    for entry in std::fs::read_dir(d.dir.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("frontdesk.db")
        {
            db.extend(std::fs::read(&p).unwrap());
        }
    }
    let haystacks: [(&str, &[u8]); 5] = [
        ("daemon log", log.as_bytes()),
        ("cli output", outputs.as_bytes()),
        ("database", &db),
        ("cmdline", &cmdline),
        ("environ", &environ),
    ];
    let mut hits = Vec::new();
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    // SMTP AUTH sends the password base64-encoded (LOGIN alone, PLAIN with the user name).
    let smtp_login = b64(SMTP_PW);
    let smtp_plain = b64(&format!("\0frontdesk\0{SMTP_PW}"));
    for secret in [
        IMAP_PW,
        SMTP_PW,
        BEARER,
        BASIC_PW,
        HMAC,
        &basic_ok,
        &smtp_login,
        &smtp_plain,
    ] {
        for (name, hay) in &haystacks {
            if hay.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                let text = String::from_utf8_lossy(hay);
                let line = text.lines().find(|l| l.contains(secret)).unwrap_or("");
                let shown: String = line.replace(secret, "<SECRET>").chars().take(300).collect();
                hits.push(format!("{secret} in {name}: {shown}"));
            }
        }
    }
    assert!(hits.is_empty(), "secrets leaked: {hits:?}");
}

/// The sweep for OAuth2 (issue 10): every access and refresh token the test provider issued, the
/// client secret and the XOAUTH2 strings built from them must not appear in the daemon's trace
/// log, any CLI output (auth login included), the database, the config, the process's command
/// line or environment, or any state file but the token store, which holds refresh tokens only,
/// in 0600 files in a 0700 directory.
#[test]
fn no_oauth2_token_reaches_logs_output_or_the_database() {
    use crate::oauth::{CLIENT_SECRET, admin, login_device, server_state, write_config};
    use std::os::unix::fs::PermissionsExt;

    let rig = Rig::start_oauth2("xoauth2");
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = write_config(&rig, dir.path(), "alice", "bob@rig.test");
    let yaml = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:{port}");
    let mut outputs = String::new();
    outputs += &login_device(&rig, &cfg_path, &["--source", "mail"], "alice");
    outputs += &login_device(&rig, &cfg_path, &["--channel", "office"], "alice");
    rig.append("alice", "INBOX", b"From: Client <client@example.org>\r\nTo: alice@rig.test\r\nSubject: hello\r\nMessage-ID: <oauth-sweep-1@example.org>\r\n\r\nplease call me\r\n");

    let env = [("FRONTDESK_LOG", "trace")];
    let mut d = TestDaemon::start_with(&yaml, &env, dir);
    let cfg = d.config.to_str().unwrap().to_string();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", d.pid())).unwrap();
    let environ = std::fs::read(format!("/proc/{}/environ", d.pid())).unwrap();
    let start = Instant::now();
    loop {
        let (_, out, _) = frontdesk(&["messages", "--json", "--config", &cfg], &env);
        if out.contains("oauth-sweep-1@example.org") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "imap never delivered:\n{}",
            d.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // refreshes after a refused token, and a revoked one, in separate processes at trace level
    admin(&rig, "/admin/expire");
    for args in [
        vec!["digest", "--send", "--config", &cfg],
        vec!["sync", "--config", &cfg],
        vec!["check", &cfg],
        vec!["sources", "--json", "--config", &cfg],
    ] {
        let (_, out, err) = frontdesk(&args, &env);
        outputs.push_str(&out);
        outputs.push_str(&err);
    }
    admin(&rig, "/admin/revoke");
    let (_, out, err) = frontdesk(&["sync", "--config", &cfg], &env);
    assert!(
        err.contains("refresh token revoked or expired"),
        "{out}{err}"
    );
    outputs.push_str(&out);
    outputs.push_str(&err);
    let (status, _) = d.signal_and_wait(15, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    let log = d.log.lock().unwrap().clone();
    assert!(log.contains("TRACE") || log.contains("DEBUG"));

    // the token store: 0600 files in a 0700 directory, refresh tokens only
    let store_dir = d.dir.path().join("oauth2");
    assert_eq!(
        std::fs::metadata(&store_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let mut store_text = String::new();
    for entry in std::fs::read_dir(&store_dir).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            p.display()
        );
        store_text += &std::fs::read_to_string(&p).unwrap();
    }
    // every other file of the state directory (database, WAL, config, outbox)
    let mut state = Vec::new();
    let mut stack = vec![d.dir.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        // the token store is checked above; client-secret is the configured secret file itself
        if p == store_dir || p.file_name().is_some_and(|n| n == "client-secret") {
            continue;
        }
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            state.extend(std::fs::read(&p).unwrap());
        }
    }

    let issued: Vec<String> = server_state(&rig)["issued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert!(issued.len() >= 8, "{issued:?}");
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let mut secrets: Vec<String> = vec![CLIENT_SECRET.to_string()];
    for t in &issued {
        secrets.push(t.clone());
        secrets.push(b64(&format!("user=alice\x01auth=Bearer {t}\x01\x01")));
        if t.starts_with("at-") {
            assert!(
                !store_text.contains(t.as_str()),
                "an access token was stored"
            );
        }
    }
    let haystacks: [(&str, &[u8]); 5] = [
        ("daemon log", log.as_bytes()),
        ("cli output", outputs.as_bytes()),
        ("state directory", &state),
        ("cmdline", &cmdline),
        ("environ", &environ),
    ];
    let mut hits = Vec::new();
    for secret in &secrets {
        for (name, hay) in &haystacks {
            if hay.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                let text = String::from_utf8_lossy(hay);
                let line = text
                    .lines()
                    .find(|l| l.contains(secret.as_str()))
                    .unwrap_or("");
                let shown: String = line
                    .replace(secret.as_str(), "<SECRET>")
                    .chars()
                    .take(300)
                    .collect();
                hits.push(format!("{secret} in {name}: {shown}"));
            }
        }
    }
    assert!(hits.is_empty(), "secrets leaked: {hits:?}");
}
