//! Any body under any preset and content type, through authentication and mapping (the invariants live in `frontdesk::fuzzing::webhook_body`, replayed by `cargo test`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| frontdesk::fuzzing::webhook_body(data));
