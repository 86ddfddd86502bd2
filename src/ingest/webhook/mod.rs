//! Webhook ingestion: authenticate the raw request, map it to a `Message`, commit, then acknowledge.
//!
//! `auth` decides who sent it (401 otherwise), `preset` maps the body (422 for a missing required
//! field, `degraded` for an unreadable one), `fields` reads form bodies with bounds.

pub mod auth;
pub mod fields;
pub mod preset;
