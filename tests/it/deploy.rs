//! The systemd unit: hardened (exposure at most 1.5) and valid (`systemd-analyze verify`).

use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn unit_exposure_is_at_most_1_5() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=15"])
        .arg(format!("{ROOT}/deploy/frontdesk.service"))
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for frontdesk.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(score <= 1.5, "exposure {score}: {text}");
}

#[test]
fn unit_verifies_with_the_built_binary() {
    let unit = std::fs::read_to_string(format!("{ROOT}/deploy/frontdesk.service")).unwrap();
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=",
        "RestartPreventExitStatus=78",
        "StateDirectory=",
        "ConfigurationDirectory=",
        "DynamicUser=yes",
    ] {
        assert!(unit.contains(key), "unit lacks {key}");
    }
    // verify needs ExecStart to exist and the man page to be installed: point at the build.
    let copy: String = unit
        .replace("/usr/bin/frontdesk", env!("CARGO_BIN_EXE_frontdesk"))
        .lines()
        .filter(|l| !l.starts_with("Documentation="))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frontdesk.service");
    std::fs::write(&path, copy).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
