//! W1 (docs/reliability.md): the providers' own webhook code against the running daemon.
//!
//! The Python side (`tests/w1/w1.py`) signs generated bodies with the pinned official SDKs
//! (`tests/w1/requirements.txt`: standardwebhooks, slack-sdk, stripe, twilio, mailgun), posts
//! them over real HTTP to `frontdesk run` with one source per scheme, then posts one-bit mutants,
//! and checks the database. This test makes the venv (under the cargo target directory,
//! reinstalled when the requirements change), starts the daemon and runs the script.
//! Bodies per scheme: `W1_COUNT`, else 1,000 under `scripts/reliability`, else 100.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{TestDaemon, bin, figure, long_run, write_file};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A venv with exactly the pinned SDKs; `python3 -m venv` and PyPI must be reachable.
fn venv() -> PathBuf {
    // target/debug/frontdesk -> target/w1-venv
    let dir = bin()
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join("w1-venv");
    let requirements = repo().join("tests/w1/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).unwrap();
    let stamp = dir.join("w1-requirements.txt");
    let python = dir.join("bin/python");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return python;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .expect("python3 runs");
    assert!(
        made.success(),
        "python3 -m venv failed (Debian: apt-get install python3-venv)"
    );
    let pip = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements)
        .status()
        .unwrap();
    assert!(pip.success(), "pip install -r {}", requirements.display());
    std::fs::write(&stamp, wanted).unwrap();
    python
}

const TWILIO_URL: &str = "https://hooks.example.test/hooks/tw";

#[test]
fn official_sdks_signatures_accepted_and_one_bit_mutants_refused() {
    let python = venv();
    let count = std::env::var("W1_COUNT")
        .ok()
        .unwrap_or_else(|| if long_run() { "1000" } else { "100" }.to_string());
    let dir = tempfile::tempdir().unwrap();
    let secrets = serde_json::json!({
        "sw": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "slack": "8f742231b10e8888abcd99yyyzzz85a5",
        "stripe": "whsec_w1_stripe_secret",
        "tw": "w1-twilio-auth-token",
        "mg": "key-w1-mailgun",
        "twilio_public_url": TWILIO_URL,
    });
    for name in ["sw", "slack", "stripe", "tw", "mg"] {
        write_file(dir.path(), name, secrets[name].as_str().unwrap(), 0o600);
    }
    let yaml = format!(
        r#"storage:
  sqlite: {{dir}}/frontdesk.db
server:
  listen: 127.0.0.1:{{port}}
sources:
  - name: sw
    webhook:
      preset: standard-webhooks
      auth: {{ scheme: standard-webhooks, secret_file: {{dir}}/sw }}
  - name: slack
    webhook:
      preset: slack-events
      auth: {{ scheme: slack, secret_file: {{dir}}/slack }}
  - name: stripe
    webhook:
      preset: stripe
      auth: {{ scheme: stripe, secret_file: {{dir}}/stripe }}
  - name: tw
    webhook:
      preset: twilio-sms
      public_url: {TWILIO_URL}
      auth: {{ scheme: twilio, secret_file: {{dir}}/tw }}
  - name: mg
    webhook:
      preset: mailgun-inbound
      auth: {{ scheme: mailgun, secret_file: {{dir}}/mg }}
channels:
  - name: out
    email: {{ file: "{{dir}}/outbox", from: "fd@example.com", to: [a@example.com] }}
"#
    );
    let d = TestDaemon::start_with(&yaml, &[], dir);
    let out = Command::new(&python)
        .arg(repo().join("tests/w1/w1.py"))
        .arg(d.port.to_string())
        .arg(d.db())
        .arg(secrets.to_string())
        .env("W1_COUNT", &count)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut schemes = 0;
    for line in stdout.lines() {
        let mut cols = line.split('\t');
        if let (Some("W1"), Some(params), Some(result)) = (cols.next(), cols.next(), cols.next()) {
            figure("W1", params, result);
            schemes += 1;
        }
    }
    assert!(
        out.status.success(),
        "w1.py failed:\n{stdout}\n{stderr}\ndaemon log:\n{}",
        d.log.lock().unwrap()
    );
    assert_eq!(schemes, 5, "one figure per scheme expected:\n{stdout}");
}
