//! frontdesk: every client message in one durable queue, SLA clocks, digests through one channel.
//!
//! Modules in reading order; `ARCHITECTURE.md` has the map and the invariants.

pub mod cli_text;
pub mod config;
pub mod core;
pub mod daemon;
pub mod digest;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod http;
pub mod ingest;
pub mod message;
pub mod notify;
pub mod oauth;
pub mod rules;
pub mod sla;
pub mod store;
pub mod thread;

// mimalloc 3.3's option numbers (`mi_option_t` in libmimalloc-sys 0.1.49's v3/include/mimalloc.h,
// both crates pinned): `mimalloc_options` below is the only user.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
const MI_OPTION_ALLOW_THP: std::ffi::c_int = 43;

// Resolved by the mimalloc of the binary that calls `mimalloc_options` (its allocator); in the
// others the unused function is dropped with its reference (`--gc-sections`). Not linked here on
// purpose: `use libmimalloc_sys` put all of mimalloc, its constructor included, into binaries
// that never call it (`tests/it`, `digest_bench`).
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// mimalloc's options for `frontdesk`, in one place so the benches measure with the daemon's own.
#[doc(hidden)]
pub extern "C" fn mimalloc_options() {
    // Run from each binary's own `.init_array` entry, before `main` and any allocation. With
    // transparent huge pages on `madvise` (as on Debian) mimalloc's defaults took `frontdesk
    // sync`'s peak RSS from 33 to 60 MB against the IMAP issue's 32 MB budget: no huge pages,
    // and freed memory goes back to the OS at once.
    // SAFETY: plain stores into mimalloc's option table, done while the process is still
    // single-threaded (ELF initializers run before `main`).
    unsafe {
        mi_option_set(MI_OPTION_ALLOW_THP, 0);
        mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}
