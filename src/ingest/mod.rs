//! Sources: each turns what arrives (IMAP mail, webhook bodies) into `Message`s for the store.

pub mod email;
pub mod imap;
