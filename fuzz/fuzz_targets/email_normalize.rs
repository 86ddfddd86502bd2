//! Normalization never panics and always keeps the raw bytes, whatever arrives.
#![no_main]

use frontdesk::ingest::email::{fingerprint, html_to_text, normalize};
use frontdesk::message::Origin;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // mail-parser has internal debug assertions that fire on crafted input (a `debug_assert!`
    // in its multipart parser); production contains them with catch_unwind, so the fuzzer must
    // not abort on a panic that normalize catches. A panic escaping normalize still aborts:
    // libfuzzer-sys turns an unwinding target into a crash.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let origin = Origin::Imap {
        folder: "INBOX".into(),
        uid_validity: 1,
        uid: 1,
    };
    let m = normalize("fuzz", origin, data.to_vec(), chrono::DateTime::UNIX_EPOCH);
    assert_eq!(m.raw, data);
    let id = m.message_id.expect("a message id is always set");
    assert!(!id.is_empty() && !id.contains(['<', '>', '\r', '\n', '\0']));
    if let Some(s) = &m.subject {
        assert!(!s.contains(['\r', '\n', '\0']));
    }
    // the fingerprint of an unchanged message is its stored Message-ID
    assert_eq!(fingerprint(data), id);
    let _ = html_to_text(&String::from_utf8_lossy(data));
});
