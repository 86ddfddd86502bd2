//! The loopback OAuth redirect parser: only a target with the expected state yields a code (the invariants live in `frontdesk::fuzzing::oauth_redirect`, replayed by `cargo test`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| frontdesk::fuzzing::oauth_redirect(data));
