//! The one integration-test binary: real processes, real HTTP, real mail servers on loopback.

mod config_check;
mod daemon;
mod support;
