//! The normalized record every source produces: `Message` and the small types it is made of.
//!
//! A `Message` is what a source hands to the store. The store keeps the raw bytes beside the
//! normalized fields, so a parser bug can always be repaired by re-normalizing from `raw`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a message came from; `(source, key)` is unique in the store and is the dedupe key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// A message fetched from an IMAP folder, identified by its UID under a UIDVALIDITY.
    Imap {
        /// Folder name as the server spells it.
        folder: String,
        /// The folder's UIDVALIDITY when the message was fetched.
        uid_validity: u32,
        /// The message UID.
        uid: u32,
    },
    /// A webhook delivery, identified by the provider's delivery id (or a content hash).
    Webhook {
        /// The provider's delivery or event id.
        delivery_id: String,
    },
}

impl Origin {
    /// The string stored in the unique `(source, origin_key)` column.
    pub fn key(&self) -> String {
        match self {
            Origin::Imap {
                folder,
                uid_validity,
                uid,
            } => format!("imap:{uid_validity}:{uid}:{folder}"),
            Origin::Webhook { delivery_id } => format!("hook:{delivery_id}"),
        }
    }
}

/// Who wrote the message: a client (inbound) or the team (outbound, a reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From a client to the business.
    Inbound,
    /// From the team to a client.
    Outbound,
}

impl Direction {
    /// The lowercase name used in the store, the CLI and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }

    /// Parses the stored name; anything unknown is treated as inbound (a client waits, never lost).
    pub fn from_stored(s: &str) -> Self {
        if s == "outbound" {
            Direction::Outbound
        } else {
            Direction::Inbound
        }
    }
}

/// Whether normalization understood the message; the raw bytes are kept either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum ParseStatus {
    /// Every field was extracted.
    Ok,
    /// Something could not be understood; the reason says what.
    Degraded(String),
}

impl ParseStatus {
    /// `ok` or `degraded`, as shown by the CLI.
    pub fn as_str(&self) -> &'static str {
        match self {
            ParseStatus::Ok => "ok",
            ParseStatus::Degraded(_) => "degraded",
        }
    }
}

/// One address as written by the sender: an email address, a phone number or a chat handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Address {
    /// Display name, if any.
    pub name: Option<String>,
    /// The address itself (email lowercased, phone in E.164 where known, or `kind:handle`).
    pub addr: String,
}

/// How an automated sender marked the message (RFC 3834 `Auto-Submitted`, `Precedence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Automation {
    /// Written by a person, as far as the headers say.
    #[default]
    Human,
    /// An auto-reply, bulk or list mail: never fulfils an SLA target.
    Automatic,
    /// frontdesk's own digest or alert: never ingested as a client message.
    Frontdesk,
}

/// The normalized message handed to the store by every source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The configured source name.
    pub source: String,
    /// The unique origin within the source.
    pub origin: Origin,
    /// Inbound (client) or outbound (team).
    pub direction: Direction,
    /// Trusted receipt time (IMAP INTERNALDATE, webhook receipt): starts SLA clocks.
    pub received_at: DateTime<Utc>,
    /// Sender-supplied time (Date header, provider timestamp): stored, never trusted for SLA.
    pub sent_at: Option<DateTime<Utc>>,
    /// The sender.
    pub from: Option<Address>,
    /// Recipients (To and Cc for email).
    pub to: Vec<Address>,
    /// Decoded subject, if any.
    pub subject: Option<String>,
    /// Readable text body.
    pub text: Option<String>,
    /// Email Message-ID without angle brackets (synthesized from the content hash if absent).
    pub message_id: Option<String>,
    /// Email In-Reply-To ids without angle brackets.
    pub in_reply_to: Vec<String>,
    /// Email References ids without angle brackets.
    pub references: Vec<String>,
    /// A provider's conversation key (SMS pair, chat thread, ticket id).
    pub thread_key: Option<String>,
    /// Whether a machine wrote it.
    pub automation: Automation,
    /// Whether normalization succeeded.
    pub parse: ParseStatus,
    /// The exact bytes received.
    pub raw: Vec<u8>,
}
