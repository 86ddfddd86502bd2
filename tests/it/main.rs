//! The one integration-test binary: each module is one area, run against real processes, real
//! HTTP and real mail servers on loopback.

mod config_check;
mod core;
mod daemon;
mod deploy;
mod digest;
mod email_golden;
mod email_lean;
mod fake_imap;
mod fault_proxy;
mod imap;
mod oauth;
mod reliability;
mod replicas;
mod rig;
mod rig_smoke;
mod secrets;
mod store_copy;
mod support;
mod systemd;
mod w1;
mod webhook;
