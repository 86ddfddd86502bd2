//! OAuth2 logins (issue 10) against the real Dovecot of the rig with an oauth2 passdb, which
//! checks every token at the test OAuth2 server's introspection endpoint
//! (`tests/servers/oauth2_server.py`), and the SMTP server of the rig demanding AUTH XOAUTH2.
//! `frontdesk auth login` runs as the real binary; the test plays the user (approves the device
//! code) and the browser (follows the authorize redirect to the loopback listener).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use frontdesk::config::{self, Config};
use frontdesk::digest::AlertEvent;
use frontdesk::ingest::imap::{self, PoisonTracker};
use frontdesk::store::Store;

use crate::rig::Rig;
use crate::support::{bin, frontdesk, http_request};

/// The client secret the test server expects (sent by frontdesk from a 0600 file).
pub const CLIENT_SECRET: &str = "test-client-secret";

/// The `auth: {oauth2: ...}` block pointing at the rig's OAuth2 server, at `indent`.
pub fn oauth_block(rig: &Rig, dir: &Path, indent: &str) -> String {
    let p = rig.oauth2_port.expect("an oauth2 rig");
    [
        "auth:".to_string(),
        "  oauth2:".into(),
        "    provider: custom".into(),
        "    client_id: frontdesk-test".into(),
        format!("    client_secret_file: {}/client-secret", dir.display()),
        format!("    token_url: http://127.0.0.1:{p}/token"),
        format!("    device_url: http://127.0.0.1:{p}/device"),
        format!("    auth_url: http://127.0.0.1:{p}/authorize"),
        "    scopes: [mail]".into(),
    ]
    .iter()
    .map(|l| format!("{indent}{l}\n"))
    .collect()
}

/// A config with IMAP source `mail` (user `user`) and SMTP channel `office` sending as `user`
/// to `to`, both with OAuth2; writes it and the client secret into `dir`.
pub fn write_config(rig: &Rig, dir: &Path, user: &str, to: &str) -> PathBuf {
    let secret = dir.join("client-secret");
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "storage:\n  sqlite: {d}/frontdesk.db\nserver:\n  listen: 127.0.0.1:0\n\
         team:\n  - name: Team\n    email: [team@shop.test]\n\
         sources:\n  - name: mail\n    imap:\n      host: localhost\n      port: {imaps}\n      tls: implicit\n\
         \x20     ca_file: {ca}\n      username: {user}\n      backfill: all\n      timeout: 5s\n{src_auth}\
         channels:\n  - name: office\n    email:\n      smtp:\n        host: 127.0.0.1\n        port: {smtp}\n\
         \x20       tls: none\n        username: {user}\n        timeout: 10s\n{smtp_auth}\
         \x20     from: \"fd@shop.test\"\n      to: [\"{to}\"]\n\
         digests:\n  - name: morning\n    schedule: \"0 8 * * *\"\n    channel: office\n",
        d = dir.display(),
        imaps = rig.imaps_port,
        ca = rig.ca.display(),
        smtp = rig.smtp_port,
        src_auth = oauth_block(rig, dir, "      "),
        smtp_auth = oauth_block(rig, dir, "        "),
    );
    let file = dir.join("frontdesk.yaml");
    std::fs::write(&file, text).unwrap();
    file
}

/// One raw HTTP/1.1 request to 127.0.0.1:`port`; the whole response as text.
fn http_raw(port: u16, method: &str, target: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The test server's counters and issued tokens.
pub fn server_state(rig: &Rig) -> serde_json::Value {
    let (code, body) =
        http_request(rig.oauth2_port.unwrap(), "GET", "/admin/state", &[], b"").unwrap();
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

/// POSTs an admin control (`/admin/expire`, `/admin/revoke`, `/admin/config?...`).
pub fn admin(rig: &Rig, path: &str) {
    let (code, body) = http_request(rig.oauth2_port.unwrap(), "POST", path, &[], b"").unwrap();
    assert_eq!(code, 200, "{path}: {body}");
}

fn count(rig: &Rig, what: &str) -> u64 {
    server_state(rig)["counts"][what].as_u64().unwrap()
}

/// `frontdesk auth login ARGS --device`; the test approves the printed code as `user`.
/// Returns everything the command printed.
pub fn login_device(rig: &Rig, config: &Path, target: &[&str], user: &str) -> String {
    let mut child = Command::new(bin())
        .args(["--config", config.to_str().unwrap(), "auth", "login"])
        .args(target)
        .arg("--device")
        .env("FRONTDESK_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    let code = loop {
        let line = lines
            .next()
            .expect("auth login ended before printing a code")
            .unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if let Some(rest) = line.split("enter the code ").nth(1) {
            break rest.trim().to_string();
        }
    };
    assert!(
        printed.contains(&format!(
            "http://127.0.0.1:{}/device/verify",
            rig.oauth2_port.unwrap()
        )),
        "{printed}"
    );
    let (status, _) = http_request(
        rig.oauth2_port.unwrap(),
        "GET",
        &format!("/device/approve?user_code={code}&user={user}"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(status, 200);
    for line in lines {
        printed.push_str(&line.unwrap());
        printed.push('\n');
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "auth login failed: {printed}{err}");
    printed + &err
}

/// `frontdesk auth login ARGS --browser`; the test is the browser: it opens the printed URL
/// (the test server approves as the login_hint and redirects) and follows the redirect to the
/// loopback listener with a plain GET.
fn login_browser(config: &Path, target: &[&str]) -> String {
    let mut child = Command::new(bin())
        .args(["--config", config.to_str().unwrap(), "auth", "login"])
        .args(target)
        .arg("--browser")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    let url = loop {
        let line = lines
            .next()
            .expect("auth login ended before printing a URL")
            .unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.trim_start().starts_with("http://") {
            break line.trim().to_string();
        }
    };
    let url = reqwest::Url::parse(&url).unwrap();
    let target_path = format!("{}?{}", url.path(), url.query().unwrap());
    let authorize = http_raw(url.port().unwrap(), "GET", &target_path);
    assert!(
        authorize.starts_with("HTTP/1.0 302") || authorize.starts_with("HTTP/1.1 302"),
        "{authorize}"
    );
    let location = authorize
        .lines()
        .find_map(|l| l.strip_prefix("Location: "))
        .expect("a Location header")
        .trim()
        .to_string();
    let back = reqwest::Url::parse(&location).unwrap();
    assert_eq!(back.host_str(), Some("127.0.0.1"));
    let page = http_raw(
        back.port().unwrap(),
        "GET",
        &format!("{}?{}", back.path(), back.query().unwrap()),
    );
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("signed in"), "{page}");
    for line in lines {
        printed.push_str(&line.unwrap());
        printed.push('\n');
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "auth login failed: {printed}{err}");
    printed + &err
}

fn message(n: u32) -> Vec<u8> {
    format!(
        "From: Client <client{n}@example.org>\r\nTo: support@example.com\r\nSubject: oauth {n}\r\n\
         Message-ID: <oauth-{n}@example.org>\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\nhello {n}\r\n"
    )
    .into_bytes()
}

fn load(config: &Path) -> Config {
    config::load(config)
        .unwrap_or_else(|e| panic!("{e}"))
        .config
}

fn stored_refresh_token(file: &Path) -> String {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    v["refresh_token"].as_str().unwrap().to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn device_login_then_xoauth2_sync_refresh_rotation_and_revocation() {
    let rig = Rig::start_oauth2("xoauth2");
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = write_config(&rig, dir.path(), "alice", "bob@rig.test");

    // before any login, check names the login still needed
    let (code, out, err) = frontdesk(&["check", cfg_path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(
            "login needed: --source mail: not logged in: run `frontdesk auth login --source mail`"
        ),
        "{out}"
    );
    assert!(out.contains("login needed: --channel office"), "{out}");

    let printed = login_device(&rig, &cfg_path, &["--source", "mail"], "alice");
    let token_file = dir.path().join("oauth2/source-mail.json");
    assert!(printed.contains("refresh token stored in"), "{printed}");
    assert_eq!(mode(&token_file), 0o600);
    assert_eq!(mode(token_file.parent().unwrap()), 0o700);
    let after_login = stored_refresh_token(&token_file);
    assert!(
        !printed.contains(&after_login),
        "the refresh token was printed"
    );
    assert_eq!(count(&rig, "device_code"), 1);

    let (_, out, _) = frontdesk(&["check", cfg_path.to_str().unwrap()], &[]);
    assert!(
        out.contains("oauth2 --source mail: logged in as alice"),
        "{out}"
    );
    assert!(out.contains("login needed: --channel office"), "{out}");

    // a sync over XOAUTH2: the refresh token gives an access token Dovecot accepts
    rig.append("alice", "INBOX", &message(1));
    let config = load(&cfg_path);
    let store = Store::open(&dir.path().join("frontdesk.db")).await.unwrap();
    let ctx = imap::sources(&config, &store, None).remove(0);
    let sync = || async { imap::sync_once(&ctx, &mut PoisonTracker::default(), &mut |_| {}).await };
    let reports = sync().await.unwrap();
    assert_eq!(reports.iter().map(|r| r.inserted).sum::<u64>(), 1);
    assert_eq!(count(&rig, "refresh_token"), 1);
    let dovecot_log = std::fs::read_to_string(rig.dir.join("dovecot/dovecot.log")).unwrap();
    assert!(
        dovecot_log.contains("user=<alice>, method=XOAUTH2"),
        "{dovecot_log}"
    );

    // the provider rotated the refresh token: the new one is stored, the old one is dead
    let rotated = stored_refresh_token(&token_file);
    assert_ne!(rotated, after_login);
    let valid = server_state(&rig)["refresh_valid"].clone();
    assert_eq!(valid, serde_json::json!([rotated]));
    assert_eq!(mode(&token_file), 0o600);

    // the cached access token is used while it lives: no new refresh
    sync().await.unwrap();
    assert_eq!(count(&rig, "refresh_token"), 1);

    // the server expires it early: the refused login refreshes once, transparently
    admin(&rig, "/admin/expire");
    rig.append("alice", "INBOX", &message(2));
    let reports = sync().await.unwrap();
    assert_eq!(reports.iter().map(|r| r.inserted).sum::<u64>(), 1);
    assert_eq!(count(&rig, "refresh_token"), 2);
    let rotated_again = stored_refresh_token(&token_file);
    assert_ne!(
        rotated_again, rotated,
        "the second rotation was persisted too"
    );

    // short-lived tokens are renewed before they expire, without a refused login
    admin(&rig, "/admin/config?access_lifetime=2");
    admin(&rig, "/admin/expire");
    sync().await.unwrap(); // refused once, refreshed: now holds a 2 s token
    let refreshes = count(&rig, "refresh_token");
    let refused = count(&rig, "introspect") - count(&rig, "introspect_active");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sync().await.unwrap();
    assert_eq!(
        count(&rig, "refresh_token"),
        refreshes + 1,
        "renewed ahead of expiry"
    );
    assert_eq!(
        count(&rig, "introspect") - count(&rig, "introspect_active"),
        refused,
        "no refused login on the way"
    );
    let health = store.source_health().await.unwrap();
    assert!(health[0].healthy, "{health:?}");

    // the refresh token is revoked: one refresh attempt, then unhealthy with the fix, and an alert
    admin(&rig, "/admin/revoke");
    let err = sync().await.unwrap_err();
    let want = "refresh token revoked or expired: run `frontdesk auth login --source mail`";
    assert_eq!(err.to_string(), want);
    let health = store.source_health().await.unwrap();
    assert!(!health[0].healthy, "{health:?}");
    assert_eq!(health[0].last_error.as_deref(), Some(want));
    let alerts = store.alert_events_pending().await.unwrap();
    assert!(
        alerts.iter().any(|(_, e)| matches!(e, AlertEvent::SourceUnhealthy { source, error } if source == "mail" && error == want)),
        "{alerts:?}"
    );
    // the CLI says the same
    let (code, _, err) = frontdesk(&["--config", cfg_path.to_str().unwrap(), "sync"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains(want), "{err}");

    // logging in again heals it
    login_device(&rig, &cfg_path, &["--source", "mail"], "alice");
    rig.append("alice", "INBOX", &message(3));
    let reports = sync().await.unwrap();
    assert_eq!(reports.iter().map(|r| r.inserted).sum::<u64>(), 1);
    assert!(store.source_health().await.unwrap()[0].healthy);
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_login_then_oauthbearer_sync() {
    let rig = Rig::start_oauth2("xoauth2 oauthbearer");
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = write_config(&rig, dir.path(), "carol", "bob@rig.test");
    let printed = login_browser(&cfg_path, &["--source", "mail"]);
    assert!(printed.contains("ssh -L"), "{printed}");
    assert_eq!(count(&rig, "authorization_code"), 1);
    let token_file = dir.path().join("oauth2/source-mail.json");
    assert_eq!(mode(&token_file), 0o600);

    rig.append("carol", "INBOX", &message(1));
    let (code, out, err) = frontdesk(&["--config", cfg_path.to_str().unwrap(), "sync"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, out, _) = frontdesk(
        &["--config", cfg_path.to_str().unwrap(), "messages", "--json"],
        &[],
    );
    assert!(out.contains("oauth-1@example.org"), "{out}");
    // Dovecot offered OAUTHBEARER, so frontdesk used it (RFC 7628)
    let dovecot_log = std::fs::read_to_string(rig.dir.join("dovecot/dovecot.log")).unwrap();
    assert!(
        dovecot_log.contains("user=<carol>, method=OAUTHBEARER"),
        "{dovecot_log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn digest_goes_out_over_smtp_with_xoauth2() {
    let rig = Rig::start_oauth2("xoauth2");
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = write_config(&rig, dir.path(), "alice", "bob@rig.test");
    let cfg = cfg_path.to_str().unwrap();

    // not logged in yet: the send fails permanently with the fix
    let (code, out, err) = frontdesk(&["--config", cfg, "digest", "--send"], &[]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        (out.clone() + &err).contains("not logged in: run `frontdesk auth login --channel office`"),
        "{out}{err}"
    );

    login_device(&rig, &cfg_path, &["--channel", "office"], "alice");
    assert_eq!(mode(&dir.path().join("oauth2/channel-office.json")), 0o600);
    let before = rig.status("bob", "INBOX").messages;
    let (code, out, err) = frontdesk(&["--config", cfg, "digest", "--send"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 sent"), "{out}");
    assert_eq!(rig.status("bob", "INBOX").messages, before + 1);
    let smtp_log = std::fs::read_to_string(rig.dir.join("smtp.log")).unwrap();
    assert!(smtp_log.contains("xoauth2 ok for alice"), "{smtp_log}");

    // a token the SMTP server refuses is refreshed once within the send
    admin(&rig, "/admin/expire");
    let refreshes = count(&rig, "refresh_token");
    let (code, out, err) = frontdesk(&["--config", cfg, "digest", "--send"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(count(&rig, "refresh_token"), refreshes + 1);
}

/// Config mistakes in auth.oauth2 are reported in the usual FILE:LINE: path: problem (fix) form.
#[test]
fn oauth2_config_mistakes_are_located() {
    let dir = tempfile::tempdir().unwrap();
    let text = "sources:\n  - name: gmail\n    imap:\n      username: me@example.com\n      password: x\n      auth:\n        oauth2:\n          provider: google\n          client_id: abc\n          tenant: example.com\n  - name: corp\n    imap:\n      username: me@corp.example\n      auth:\n        oauth2:\n          provider: custom\n          client_id: abc\n          token_url: http://idp.example.com/token\n          auth_url: https://idp.example.com/authorize\n          scopes: [mail]\nchannels:\n  - name: out\n    email: { file: ./outbox, from: fd@example.com, to: [a@example.com] }\n";
    let file = dir.path().join("frontdesk.yaml");
    std::fs::write(&file, text).unwrap();
    let (code, out, _) = frontdesk(&["check", file.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{out}");
    let f = file.display();
    assert!(
        out.contains(&format!(
            "{f}:6: sources[0].imap.auth: both a password and auth.oauth2 are set"
        )),
        "{out}"
    );
    assert!(out.contains(&format!("{f}:18: sources[1].imap.auth.oauth2.token_url: `http://idp.example.com/token` is not an https URL")), "{out}");
    assert!(out.contains("sources[1].imap.host: no host given (set host, or use auth.oauth2.provider google or microsoft)"), "{out}");

    // a misspelt provider or key gets a did-you-mean
    let typo = "sources:\n  - name: g\n    imap:\n      username: me@example.com\n      auth:\n        oauth2:\n          provider: gogle\n          clientid: abc\nchannels:\n  - name: out\n    email: { file: ./outbox, from: fd@example.com, to: [a@example.com] }\n";
    std::fs::write(&file, typo).unwrap();
    let (code, out, _) = frontdesk(&["check", file.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{out}");
    assert!(out.contains(&format!("{f}:7: sources[0].imap.auth.oauth2.provider: unknown value `gogle` (did you mean `google`?)")), "{out}");
    assert!(out.contains(&format!("{f}:8: sources[0].imap.auth.oauth2.clientid: unknown key `clientid` (did you mean `client_id`?)")), "{out}");

    // presets fill host, port and TLS
    let text = "sources:\n  - name: m365\n    imap:\n      username: me@corp.example\n      auth: {oauth2: {provider: microsoft, client_id: abc, tenant: corp.example}}\nchannels:\n  - name: out\n    email:\n      smtp:\n        username: me@corp.example\n        auth: {oauth2: {provider: microsoft, client_id: abc}}\n      from: me@corp.example\n      to: [a@example.com]\n";
    let c = config::load_str(&file, text)
        .unwrap_or_else(|e| panic!("{e}"))
        .config;
    let config::SourceKind::Imap(i) = &c.sources[0].kind else {
        panic!()
    };
    assert_eq!(
        (i.host.as_str(), i.port, i.tls),
        ("outlook.office365.com", 993, config::TlsMode::Implicit)
    );
    let o = i.login.oauth2().unwrap();
    assert_eq!(
        o.token_url,
        "https://login.microsoftonline.com/corp.example/oauth2/v2.0/token"
    );
    assert_eq!(
        o.scopes,
        [
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "offline_access"
        ]
    );
    let config::ChannelKind::Email(e) = &c.channels[0].kind else {
        panic!()
    };
    let config::EmailTransport::Smtp(s) = &e.transport else {
        panic!()
    };
    assert_eq!(
        (s.host.as_str(), s.port, s.tls),
        ("smtp.office365.com", 587, config::TlsMode::Starttls)
    );
    let o = s.login.as_ref().unwrap().oauth2().unwrap();
    assert_eq!(
        o.scopes,
        ["https://outlook.office.com/SMTP.Send", "offline_access"]
    );
    assert!(o.token_url.contains("/organizations/"));

    // auth login names what it cannot log in
    std::fs::write(&file, text).unwrap();
    let cfg = file.to_str().unwrap();
    let (code, _, err) = frontdesk(&["--config", cfg, "auth", "login", "--source", "nope"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("`nope` is not an IMAP source with auth.oauth2"),
        "{err}"
    );
    let (code, _, err) = frontdesk(&["--config", cfg, "auth", "login"], &[]);
    assert_eq!(code, 2, "clap wants --source or --channel: {err}");
    // check lists both logins as still needed
    let (code, out, _) = frontdesk(&["check", cfg], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("login needed: --source m365: not logged in"),
        "{out}"
    );
    assert!(
        out.contains("login needed: --channel out: not logged in"),
        "{out}"
    );
}

/// The running daemon: syncs over XOAUTH2 with IDLE; after the provider revokes the login and
/// the server drops the session, the source turns unhealthy with the fix (visible in
/// `frontdesk sources`); a new `auth login` heals it without a restart.
#[test]
fn daemon_reports_a_revoked_login_and_recovers_after_auth_login() {
    use crate::support::TestDaemon;
    let rig = Rig::start_oauth2("xoauth2");
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = write_config(&rig, dir.path(), "alice", "bob@rig.test");
    login_device(&rig, &cfg_path, &["--source", "mail"], "alice");
    let yaml = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:{port}");
    rig.append("alice", "INBOX", &message(1));
    let d = TestDaemon::start_with(&yaml, &[], dir);
    let cfg = d.config.to_str().unwrap().to_string();
    let wait_for = |what: &dyn Fn() -> bool, why: &str| {
        let start = std::time::Instant::now();
        while !what() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{why}:\n{}",
                d.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let has = |id: &str| {
        let (_, out, _) = frontdesk(&["messages", "--json", "--config", &cfg], &[]);
        out.contains(id)
    };
    let source = || {
        let (_, out, _) = frontdesk(&["sources", "--json", "--config", &cfg], &[]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array().unwrap()[0].clone()
    };
    wait_for(
        &|| has("oauth-1@example.org"),
        "first message never arrived",
    );

    admin(&rig, "/admin/revoke");
    rig.doveadm(&["kick", "alice"]);
    let want = "refresh token revoked or expired: run `frontdesk auth login --source mail`";
    wait_for(
        &|| source()["healthy"] == false,
        "the source never turned unhealthy",
    );
    assert_eq!(source()["last_error"], want);

    login_device(&rig, &d.config, &["--source", "mail"], "alice");
    rig.append("alice", "INBOX", &message(2));
    wait_for(
        &|| has("oauth-2@example.org"),
        "no sync after the new login",
    );
    wait_for(
        &|| source()["healthy"] == true,
        "the source stayed unhealthy",
    );
}
