//! The single integration-test binary: each module is one area, run against real servers.

mod email_golden;
mod rig;
mod rig_smoke;
