//! Every webhook preset's payload mapping, with fuzzed headers and json pointers (the invariants live in `frontdesk::fuzzing::webhook_mapping`, replayed by `cargo test`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| frontdesk::fuzzing::webhook_mapping(data));
