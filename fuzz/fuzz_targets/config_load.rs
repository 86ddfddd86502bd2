//! Configuration loading: any text gives a config or located problems, never a panic (the invariants live in `frontdesk::fuzzing::config_load`, replayed by `cargo test`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| frontdesk::fuzzing::config_load(data));
