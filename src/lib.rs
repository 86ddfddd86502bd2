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
