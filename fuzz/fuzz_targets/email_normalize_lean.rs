//! The lean path (undecoded attachments and HTML halves, text/plain decoded by frontdesk) changes
//! no normalized message (`frontdesk::fuzzing::email_normalize_lean`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // as in email_normalize: mail-parser's debug assertions are caught by normalize; only a panic
    // escaping it (here: the two paths disagreeing) is a crash
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    frontdesk::fuzzing::email_normalize_lean(data);
});
