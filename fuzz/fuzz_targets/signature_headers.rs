//! The signature header parsers of every webhook auth scheme (the invariants live in `frontdesk::fuzzing::signature_headers`, replayed by `cargo test`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| frontdesk::fuzzing::signature_headers(data));
