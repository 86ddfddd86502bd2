//! Normalization never panics and always keeps the raw bytes (`frontdesk::fuzzing::email_normalize`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // mail-parser has internal debug assertions that fire on crafted input (a `debug_assert!`
    // in its multipart parser); production contains them with catch_unwind, so the fuzzer must
    // not abort on a panic that normalize catches. A panic escaping normalize still aborts:
    // libfuzzer-sys turns an unwinding target into a crash.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    frontdesk::fuzzing::email_normalize(data);
});
