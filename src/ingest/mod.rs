//! Sources: each module turns one kind of input into `Message`s and hands them to the store.

pub mod email;
pub mod imap;
pub mod imap_guard;
pub mod webhook;
