//! Golden corpus: every `tests/fixtures/email/*.eml` normalizes to the JSON beside it.
//! On a mismatch the result is written to `*.actual`; `UPDATE_EXPECT=1` rewrites the `.json` files.

use std::path::Path;

use chrono::{DateTime, Utc};
use frontdesk::ingest::email::normalize;
use frontdesk::message::Origin;

/// The normalized fields that matter; raw bytes, source and origin are the caller's.
fn view(raw: Vec<u8>) -> serde_json::Value {
    let received_at: DateTime<Utc> = "2025-07-20T00:00:00Z".parse().unwrap();
    let origin = Origin::Imap {
        folder: "INBOX".into(),
        uid_validity: 1,
        uid: 1,
    };
    let len = raw.len();
    let m = normalize("golden", origin, raw, received_at);
    assert_eq!(m.raw.len(), len, "raw bytes are kept");
    let mut v = serde_json::to_value(&m).unwrap();
    let obj = v.as_object_mut().unwrap();
    for k in ["raw", "source", "origin", "direction", "thread_key"] {
        obj.remove(k);
    }
    v
}

#[test]
fn golden_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/email");
    let update = std::env::var_os("UPDATE_EXPECT").is_some_and(|v| v == "1");
    let mut emls: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    emls.sort();
    assert!(emls.len() >= 15, "corpus too small: {}", emls.len());
    let mut failed = Vec::new();
    for eml in &emls {
        let got = serde_json::to_string_pretty(&view(std::fs::read(eml).unwrap())).unwrap() + "\n";
        let json = eml.with_extension("json");
        let actual = eml.with_extension("actual");
        if update {
            std::fs::write(&json, &got).unwrap();
            let _ = std::fs::remove_file(&actual);
            continue;
        }
        let want = std::fs::read_to_string(&json).unwrap_or_default();
        if want == got {
            let _ = std::fs::remove_file(&actual);
        } else {
            std::fs::write(&actual, &got).unwrap();
            failed.push(eml.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(
        failed.is_empty(),
        "normalized output differs for {failed:?}; see the .actual files (UPDATE_EXPECT=1 accepts them)"
    );
}
