//! frontdesk: every client message in one durable queue, SLA clocks, digests through one channel.
//!
//! Modules in reading order; `ARCHITECTURE.md` has the map and the invariants.

pub mod cli_text;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod health;
pub mod http;
pub mod ingest;
pub mod message;
pub mod notify;
pub mod store;
