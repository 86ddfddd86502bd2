//! `normalize` (which skips decoding base64 attachments and the HTML half of an alternative with
//! a plain-text half) against `normalize_unoptimized` (which decodes every part): equal
//! `Message`s over the golden corpus and generated bench mail, as sent and in the variants that
//! break MIME in the ways a server or a sender does.

use std::path::Path;
use std::process::Command;

use chrono::{DateTime, Utc};
use frontdesk::ingest::email::{lean_skipped_bytes, normalize, normalize_unoptimized};
use frontdesk::message::{Origin, ParseStatus};

fn origin() -> Origin {
    Origin::Imap {
        folder: "INBOX".into(),
        uid_validity: 7,
        uid: 42,
    }
}

/// Panics with the input's name when the two paths disagree; returns the bytes skipped.
fn same_both_ways(name: &str, raw: &[u8]) -> usize {
    let at: DateTime<Utc> = "2025-07-20T00:00:00Z".parse().unwrap();
    let lean = normalize("s", origin(), raw.to_vec(), at);
    let full = normalize_unoptimized("s", origin(), raw.to_vec(), at);
    assert_eq!(lean, full, "{name}: the lean path changed the message");
    lean_skipped_bytes(raw)
}

fn crlf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 40);
    for (i, &b) in raw.iter().enumerate() {
        if b == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// The message and what goes wrong with mail in the wild: other line ends, cut short (a
/// truncated fetch, no closing boundary), a damaged byte in the second half (inside the
/// attachment when there is one), a stray `-` and `=` in the attachment's last line.
fn variants(raw: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        ("as is".to_string(), raw.to_vec()),
        ("crlf".into(), crlf(raw)),
    ];
    for cut in [
        raw.len() / 2,
        raw.len() * 9 / 10,
        raw.len().saturating_sub(8),
    ] {
        out.push((format!("cut at {cut}"), raw[..cut].to_vec()));
    }
    for (what, byte) in [("star", b'*'), ("dash", b'-'), ("equals", b'=')] {
        let mut bad = raw.to_vec();
        let at = raw.len() * 3 / 4;
        bad[at] = byte;
        out.push((format!("{what} at {at}"), bad));
    }
    if let Some(last) = raw.windows(3).rposition(|w| w == b"\n--") {
        for (what, insert) in [("dash", &b"A-A"[..]), ("padding", b"=A=")] {
            let mut bad = raw[..last].to_vec();
            bad.extend_from_slice(insert);
            bad.extend_from_slice(&raw[last..]);
            out.push((format!("{what} before the last delimiter"), bad));
        }
    }
    out
}

#[test]
fn golden_corpus_is_unchanged_by_the_lean_path() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/email");
    let mut skipped_any = false;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "eml") {
            continue;
        }
        let raw = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for (variant, bytes) in variants(&raw) {
            skipped_any |= same_both_ways(&format!("{name} ({variant})"), &bytes) > 0;
        }
    }
    assert!(skipped_any, "no fixture exercised the lean path");
}

#[test]
fn golden_attachments_are_skipped_and_a_broken_one_still_degrades() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/email");
    let nested = std::fs::read(dir.join("attachment_pdf_nested.eml")).unwrap();
    // the PDF and the PNG, not the text parts
    assert!(same_both_ways("nested", &nested) > 4000);
    let plain = std::fs::read(dir.join("attachment_pdf.eml")).unwrap();
    assert!(same_both_ways("plain", &plain) > 2000);

    let broken = std::fs::read(dir.join("broken_base64_attachment.eml")).unwrap();
    assert_eq!(
        same_both_ways("broken", &broken),
        0,
        "a bad body is decoded"
    );
    let m = normalize("s", origin(), broken, DateTime::UNIX_EPOCH);
    assert_eq!(
        m.parse,
        ParseStatus::Degraded("undecodable body part".into())
    );
    assert_eq!(m.text.as_deref(), Some("The signed contract is attached."));
}

#[test]
fn generated_bench_mail_is_unchanged_by_the_lean_path() {
    let dir = tempfile::tempdir().unwrap();
    let gen_mail = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/lib/gen_mail.py");
    let out = Command::new("python3")
        .arg(&gen_mail)
        .arg(dir.path())
        .args(["--count", "300", "--seed", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files: Vec<_> = std::fs::read_dir(dir.path().join("cur"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 300);
    let (mut skipped, mut attachments, mut alternatives) = (0, 0, 0);
    for path in &files {
        let raw = std::fs::read(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // gen_mail.py writes its text parts as 7bit or quoted-printable: base64 is an attachment
        let marker = b"Content-Transfer-Encoding: base64\n\n";
        let has_attachment = raw.windows(marker.len()).any(|w| w == marker);
        if has_attachment {
            attachments += 1;
            // every variant of the few messages that have one
            for (variant, bytes) in variants(&raw) {
                same_both_ways(&format!("{name} ({variant})"), &bytes);
            }
            assert!(
                same_both_ways(&name, &raw) > 200 * 1024,
                "{name} not skipped"
            );
            assert!(
                same_both_ways(&name, &crlf(&raw)) > 200 * 1024,
                "{name} not skipped"
            );
            skipped += 1;
        } else if raw.windows(21).any(|w| w == b"multipart/alternative") {
            // the HTML half follows a plain-text half in every alternative gen_mail.py writes
            alternatives += 1;
            for (variant, bytes) in variants(&raw) {
                same_both_ways(&format!("{name} ({variant})"), &bytes);
            }
            assert!(same_both_ways(&name, &raw) > 0, "{name}: HTML not skipped");
            assert!(
                same_both_ways(&name, &crlf(&raw)) > 0,
                "{name}: HTML not skipped"
            );
        } else {
            same_both_ways(&name, &raw);
            same_both_ways(&format!("{name} (crlf)"), &crlf(&raw));
        }
    }
    assert!(
        attachments >= 3,
        "only {attachments} attachments in the sample"
    );
    assert_eq!(skipped, attachments);
    assert!(
        alternatives >= 200,
        "only {alternatives} alternatives in the sample"
    );
}
