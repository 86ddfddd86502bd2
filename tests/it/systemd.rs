//! The sd_notify protocol without systemd: a test-owned NOTIFY_SOCKET (reliability.md H2).

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::daemon::MINIMAL;
use crate::support::{TestDaemon, http_get, http_request, send_signal};

/// Receives notify datagrams until `until` returns true or `limit` passes.
fn collect(
    sock: &UnixDatagram,
    limit: Duration,
    mut until: impl FnMut(&str) -> bool,
) -> Vec<(Instant, String)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = until(&text);
            got.push((Instant::now(), text));
            if done {
                break;
            }
        }
    }
    got
}

fn mount_tmpfs(dir: &std::path::Path, size: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

struct Unmount(std::path::PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn ready_after_listening_watchdog_while_healthy_stopping_on_sigterm() {
    let sockdir = tempfile::tempdir().unwrap();
    let sock_path = sockdir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    // The state directory is a small tmpfs so the test can make the disk full.
    let state = tempfile::tempdir().unwrap();
    assert!(
        mount_tmpfs(state.path(), "4m"),
        "mounting a tmpfs needs root (the test suite runs as root, like CI)"
    );
    let _unmount = Unmount(state.path().to_path_buf());
    let mut d = TestDaemon::start_with(
        MINIMAL,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
        state,
    );

    // READY=1 came, and by then the port answered (start_with waits for /healthz; READY must
    // have been sent after bind, so it is already queued on our socket).
    let first = collect(&sock, Duration::from_secs(5), |t| t.contains("READY=1"));
    assert!(
        first.iter().any(|(_, t)| t.contains("READY=1")),
        "{first:?}"
    );
    assert_eq!(http_get(d.port, "/healthz").unwrap().0, 200);

    // At least 3 watchdog pings within 3 s (interval: half of WATCHDOG_USEC).
    let pings = collect(&sock, Duration::from_secs(3), |_| false);
    let n = pings
        .iter()
        .filter(|(_, t)| t.contains("WATCHDOG=1"))
        .count();
    assert!(n >= 3, "only {n} pings in 3 s: {pings:?}");
    assert!(
        pings.iter().any(|(_, t)| t.contains("STATUS=queue=")),
        "{pings:?}"
    );

    // Fill the disk: the store write probe fails, so the pings stop within 2 intervals.
    let ballast = d.dir.path().join("ballast");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", ballast.display()))
        .output();
    let after_full = Instant::now();
    let pings = collect(&sock, Duration::from_secs(4), |_| false);
    let late: Vec<_> = pings
        .iter()
        .filter(|(at, t)| {
            t.contains("WATCHDOG=1") && at.duration_since(after_full) > Duration::from_secs(1)
        })
        .collect();
    assert!(
        late.is_empty(),
        "watchdog kept pinging with a full disk: {pings:?}"
    );
    assert!(
        pings.iter().any(|(_, t)| t.contains("STATUS=unhealthy")),
        "{pings:?}\n{}",
        d.log.lock().unwrap()
    );

    // Space again: pings resume without a restart.
    std::fs::remove_file(&ballast).unwrap();
    let pings = collect(&sock, Duration::from_secs(4), |t| t.contains("WATCHDOG=1"));
    assert!(
        pings.iter().any(|(_, t)| t.contains("WATCHDOG=1")),
        "{pings:?}"
    );

    // SIGTERM: STOPPING=1 and exit 0.
    let (status, _) = d.signal_and_wait(15, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    let rest = collect(&sock, Duration::from_secs(1), |t| t.contains("STOPPING=1"));
    assert!(
        rest.iter().any(|(_, t)| t.contains("STOPPING=1")),
        "{rest:?}"
    );
}

#[test]
fn sighup_applies_a_valid_config_and_keeps_the_old_one_when_broken() {
    let mut d = TestDaemon::start(MINIMAL);
    let original = std::fs::read_to_string(&d.config).unwrap();
    let post = |port: u16| {
        http_request(
            port,
            "POST",
            "/hooks/late-form",
            &[
                ("Authorization", "Bearer reload-token"),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            b"name=Ann&email=ann@example.org&message=hello",
        )
        .unwrap()
        .0
    };
    assert_eq!(post(d.port), 404, "the source does not exist yet");

    std::fs::write(&d.config, format!("{original}bogus_key: 1\n")).unwrap();
    send_signal(d.pid() as i32, 1);
    wait_for_log(&d, "reload refused");
    assert!(d.log.lock().unwrap().contains("unknown key `bogus_key`"));
    assert_eq!(
        http_get(d.port, "/healthz").unwrap().0,
        200,
        "still serving"
    );

    let secret = crate::support::write_file(d.dir.path(), "late.secret", "reload-token\n", 0o600);
    let added = format!(
        "{original}sources:\n  - name: late-form\n    webhook:\n      preset: form\n      auth: {{ scheme: bearer, secret_file: {} }}\n",
        secret.display()
    );
    std::fs::write(&d.config, added).unwrap();
    send_signal(d.pid() as i32, 1);
    wait_for_log(&d, "configuration reloaded");
    assert_eq!(post(d.port), 200, "{}", d.log.lock().unwrap());
    let (status, _) = d.signal_and_wait(15, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
}

fn wait_for_log(d: &TestDaemon, needle: &str) {
    let start = Instant::now();
    while !d.log.lock().unwrap().contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no `{needle}` in:\n{}",
            d.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const FORM: &str =
    "sources:\n  - name: form\n    webhook:\n      preset: form\n      auth: { scheme: none }\n";

#[test]
fn sigterm_during_a_flood_loses_no_acknowledged_message() {
    let mut d = TestDaemon::start(&format!("{MINIMAL}{FORM}"));
    let port = d.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let stop = stop.clone();
        workers.push(std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("w{w}-{i}");
                i += 1;
                let body = format!("name=Ann&email=ann{w}@example.org&subject={key}&message=hello");
                match http_request(
                    port,
                    "POST",
                    "/hooks/form",
                    &[
                        ("Content-Type", "application/x-www-form-urlencoded"),
                        ("Idempotency-Key", &key),
                    ],
                    body.as_bytes(),
                ) {
                    Ok((200, _)) => acked.push(key),
                    Ok((503, _)) => {}
                    Ok((code, body)) => panic!("unexpected {code}: {body}"),
                    Err(_) => break, // the listener is gone: the daemon stopped
                }
            }
            acked
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (status, _) = d.signal_and_wait(15, Duration::from_secs(10));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(status.code(), Some(0), "{}", d.log.lock().unwrap());
    let acked: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(acked.len() > 10, "the flood barely ran: {}", acked.len());
    let (code, out, err) = crate::support::frontdesk(
        &[
            "messages",
            "--json",
            "--limit",
            "1000000",
            "--config",
            d.config.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let stored: std::collections::HashSet<&str> =
        rows.iter().filter_map(|r| r["subject"].as_str()).collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|k| !stored.contains(k.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged but not stored: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(rows.len(), stored.len(), "duplicate rows");
}
