//! Digest and alert rendering: escaping and header invariants on client-controlled text (the invariants live in `frontdesk::fuzzing::digest_render`, replayed by `cargo test`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| frontdesk::fuzzing::digest_render(data));
