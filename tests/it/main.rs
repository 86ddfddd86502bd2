//! The single integration-test binary: each module starts real servers and the real daemon.

mod webhook;
