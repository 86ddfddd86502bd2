//! The messages table: inserting normalized messages exactly once, and listing them.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use super::bodies::Placed;
use super::body_digest::{self, BodyDigest};
use super::{Driver, Error, Qb, Store, from_ms, to_ms};
use crate::message::{Automation, Message};

/// The outcome of storing one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ingested {
    /// The row id (the existing row's id for a duplicate).
    pub id: i64,
    /// True when the origin was already stored and nothing was written.
    pub duplicate: bool,
}

/// Which messages `Store::messages` lists.
#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    /// Only this source.
    pub source: Option<String>,
    /// At most this many (newest first).
    pub limit: Option<u32>,
}

/// A stored message as the CLI shows it (no raw bytes).
#[derive(Debug, Clone, Serialize)]
pub struct StoredMessage {
    /// Row id.
    pub id: i64,
    /// Configured source name.
    pub source: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// Trusted receipt time, UTC.
    pub received_at: DateTime<Utc>,
    /// Sender address.
    pub from: Option<String>,
    /// Subject.
    pub subject: Option<String>,
    /// Email Message-ID without angle brackets.
    pub message_id: Option<String>,
    /// The conversation the core assigned, once processed.
    pub conversation_id: Option<i64>,
    /// `ok` or `degraded`.
    pub parse: String,
    /// Why parsing was degraded.
    pub parse_reason: Option<String>,
}

/// The stored name of an `Automation`.
pub(crate) fn automation_str(a: Automation) -> &'static str {
    match a {
        Automation::Human => "human",
        Automation::Automatic => "automatic",
        Automation::Frontdesk => "frontdesk",
    }
}

/// What `insert_message_rows` reports.
enum Inserted {
    /// Per message, in order.
    Rows(Vec<Ingested>),
    /// Only the number of new rows.
    New(u64),
}

/// The raw bytes and text of one message on their way into a statement.
type Body<'m> = (Cow<'m, [u8]>, Option<Cow<'m, str>>);

/// `INSERT INTO messages (...) ` with every column, in the order [`MessageColumns`] binds them,
/// then any `, column` given; a macro so `concat!` can append the rest of each statement at
/// compile time.
macro_rules! insert_into_messages {
    ($($more:literal)?) => {
        concat!(
            "INSERT INTO messages (source, origin_key, origin, direction, received_at, sent_at, \
             from_addr, from_name, to_addrs, subject, body_text, message_id, in_reply_to, refs, \
             thread_key, automation, parse, parse_reason, raw, raw_digest, stored_at",
            $($more,)?
            ") "
        )
    };
}

/// [`insert_into_messages`] with the bodies file's columns (`store::bodies`) after `stored_at`.
macro_rules! insert_into_messages_placed {
    () => {
        insert_into_messages!(", body_at, body_len")
    };
}

/// One row insert with its id back, or nothing on a known origin (`insert_message`, the raw path).
const INSERT_ONE: &str = concat!(
    insert_into_messages!(),
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
     ON CONFLICT (source, origin_key) DO NOTHING RETURNING id"
);

/// One row insert with its body's place in the bodies file (an IMAP batch on the raw path);
/// nothing on a known origin.
const INSERT_ONE_PLACED: &str = concat!(
    insert_into_messages_placed!(),
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
     ON CONFLICT (source, origin_key) DO NOTHING RETURNING id"
);

/// The id of a stored origin (a duplicate's answer).
const LOOKUP_ID: &str = "SELECT id FROM messages WHERE source = ? AND origin_key = ?";

/// A row's values that are derived from the message rather than read off it; computed in one
/// place for the three insert paths (one row, multi-row, raw handle).
struct MessageColumns {
    key: String,
    origin_json: String,
    to_json: String,
    irt_json: String,
    refs_json: String,
    digest: String,
}

/// What was worked out for one message's body before its transaction (`Store::stage_imap_batch`):
/// its hash, and on SQLite where its bytes were appended to the bodies file (its `raw` is then
/// empty).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StagedBody {
    /// The digest of the raw bytes.
    pub digest: BodyDigest,
    /// Where the raw bytes are in the bodies file, if they were appended there.
    pub place: Option<Placed>,
}

impl MessageColumns {
    /// The derived columns of `msg`; `digest`, when given, is its raw bytes' digest taken earlier.
    fn of(msg: &Message, digest: Option<BodyDigest>) -> Result<MessageColumns, Error> {
        let corrupt = |e: serde_json::Error| Error::Corrupt {
            table: "messages",
            reason: e.to_string(),
        };
        Ok(MessageColumns {
            key: msg.origin.key(),
            origin_json: serde_json::to_string(&msg.origin).map_err(corrupt)?,
            to_json: serde_json::to_string(&msg.to).map_err(corrupt)?,
            irt_json: serde_json::to_string(&msg.in_reply_to).map_err(corrupt)?,
            refs_json: serde_json::to_string(&msg.references).map_err(corrupt)?,
            digest: digest
                .unwrap_or_else(|| BodyDigest::of(&msg.raw))
                .to_column(),
        })
    }
}

/// Why a message was stored degraded, if it was.
fn parse_reason(msg: &Message) -> Option<&str> {
    match &msg.parse {
        crate::message::ParseStatus::Ok => None,
        crate::message::ParseStatus::Degraded(r) => Some(r.as_str()),
    }
}

twin_impl! {
/// Inserts one message inside `tx` unless its origin exists; returns the row id either way.
pub(crate) async fn insert_message(
    &self,
    tx: &mut sqlx::Transaction<'_, <Self as Driver>::Db>,
    msg: &Message,
    now: DateTime<Utc>,
) -> Result<Ingested, Error> {
    let c = MessageColumns::of(msg, None)?;
    let inserted: Option<(i64,)> = sqlx::query_as(self.sql(INSERT_ONE))
    .bind(&msg.source)
    .bind(&c.key)
    .bind(&c.origin_json)
    .bind(msg.direction.as_str())
    .bind(to_ms(msg.received_at))
    .bind(msg.sent_at.map(to_ms))
    .bind(msg.from.as_ref().map(|a| a.addr.as_str()))
    .bind(msg.from.as_ref().and_then(|a| a.name.as_deref()))
    .bind(&c.to_json)
    .bind(msg.subject.as_deref())
    .bind(msg.text.as_deref())
    .bind(msg.message_id.as_deref())
    .bind(&c.irt_json)
    .bind(&c.refs_json)
    .bind(msg.thread_key.as_deref())
    .bind(automation_str(msg.automation))
    .bind(msg.parse.as_str())
    .bind(parse_reason(msg))
    .bind(&msg.raw)
    .bind(&c.digest)
    .bind(to_ms(now))
    .fetch_optional(&mut **tx)
    .await?;
    if let Some((id,)) = inserted {
        return Ok(Ingested {
            id,
            duplicate: false,
        });
    }
    let (id,): (i64,) =
        sqlx::query_as(self.sql(LOOKUP_ID))
            .bind(&msg.source)
            .bind(&c.key)
            .fetch_one(&mut **tx)
            .await?;
    Ok(Ingested {
        id,
        duplicate: true,
    })
}

}

impl super::backend::PgDb {
    /// `insert_messages` for messages the caller gives up, when only the number of new rows matters:
    /// their raw bytes and text are moved into the statement instead of copied (an IMAP sync on
    /// PostgreSQL writes every byte of the mailbox through here), and no row ids come back (sqlx hands each returned
    /// row to the caller's task on its own, a thread wake-up per message). Each message comes with
    /// its staged body (`Store::stage_imap_batch`). Returns how many rows were new; the rest were
    /// duplicates.
    pub(crate) async fn insert_owned_messages(
        &self,
        tx: &mut sqlx::Transaction<'_, <Self as Driver>::Db>,
        msgs: Vec<(Message, StagedBody)>,
        now: DateTime<Utc>,
    ) -> Result<u64, Error> {
        let (msgs, staged): (Vec<_>, Vec<_>) =
            msgs.into_iter().map(|(m, s)| (Cow::Owned(m), s)).unzip();
        match self
            .insert_message_rows(tx, msgs, Some(&staged), now, false)
            .await?
        {
            Inserted::Rows(rows) => Ok(rows.iter().filter(|r| !r.duplicate).count() as u64),
            Inserted::New(n) => Ok(n),
        }
    }

    /// The insert behind `insert_messages` and `insert_owned_messages`.
    async fn insert_message_rows<'m>(
        &self,
        tx: &mut sqlx::Transaction<'_, <Self as Driver>::Db>,
        mut msgs: Vec<Cow<'m, Message>>,
        staged: Option<&[StagedBody]>,
        now: DateTime<Utc>,
        with_ids: bool,
    ) -> Result<Inserted, Error> {
        /// Rows per statement: 21 binds each stays far below PostgreSQL's 65,535-parameter limit.
        const CHUNK: usize = 400;
        struct Prepared<'m> {
            msg: &'m Message,
            body: usize,
            cols: MessageColumns,
        }
        // each message's hash must be its own
        if staged.is_some_and(|s| s.len() != msgs.len()) {
            return Err(Error::Corrupt {
                table: "messages",
                reason: "bodies staged for a different number of messages".into(),
            });
        }
        let staged_of = |i: usize| staged.and_then(|all| all.get(i)).copied();
        // the columns (the hash among them, unless staged) are taken before an owned body is moved
        // out of its message
        let cols = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| MessageColumns::of(m, staged_of(i).map(|s| s.digest)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut bodies: Vec<Option<Body<'m>>> = msgs
            .iter_mut()
            .map(|m| {
                // `*m`: a borrowed message's reference is copied out with its full lifetime
                let (raw, text) = match *m {
                    Cow::Borrowed(b) => (
                        Cow::Borrowed(b.raw.as_slice()),
                        b.text.as_deref().map(Cow::Borrowed),
                    ),
                    Cow::Owned(ref mut o) => (
                        Cow::Owned(std::mem::take(&mut o.raw)),
                        o.text.take().map(Cow::Owned),
                    ),
                };
                Some((raw, text))
            })
            .collect();
        let mut first_of: std::collections::HashMap<(&str, String), usize> =
            std::collections::HashMap::new();
        let mut slot = Vec::with_capacity(msgs.len());
        let mut unique: Vec<Prepared<'_>> = Vec::new();
        for (i, (msg, c)) in msgs.iter().zip(cols).enumerate() {
            let msg: &Message = msg;
            match first_of.get(&(msg.source.as_str(), c.key.clone())) {
                Some(&u) => slot.push((u, true)),
                None => {
                    first_of.insert((msg.source.as_str(), c.key.clone()), unique.len());
                    slot.push((unique.len(), false));
                    unique.push(Prepared {
                        msg,
                        body: i,
                        cols: c,
                    });
                }
            }
        }
        let mut ids: std::collections::HashMap<(String, String), i64> =
            std::collections::HashMap::new();
        let stored_at = to_ms(now);
        let mut new_rows = 0u64;
        // Two replicas inserting overlapping keys in different orders would deadlock on
        // PostgreSQL's unique index; one global order (source, key) cannot.
        let mut order: Vec<&Prepared<'_>> = unique.iter().collect();
        order.sort_by(|a, b| {
            (a.msg.source.as_str(), a.cols.key.as_str())
                .cmp(&(b.msg.source.as_str(), b.cols.key.as_str()))
        });
        for chunk in order.chunks(CHUNK) {
            let mut qb = Qb::<Self>::new(insert_into_messages!());
            let rows = chunk
                .iter()
                .map(|p| (*p, bodies[p.body].take().unwrap_or_default()));
            qb.push_values(rows, |mut b, (p, (raw, text))| {
                let (m, c) = (p.msg, &p.cols);
                b.push_bind(m.source.as_str())
                    .push_bind(c.key.as_str())
                    .push_bind(c.origin_json.as_str())
                    .push_bind(m.direction.as_str())
                    .push_bind(to_ms(m.received_at))
                    .push_bind(m.sent_at.map(to_ms))
                    .push_bind(m.from.as_ref().map(|a| a.addr.as_str()))
                    .push_bind(m.from.as_ref().and_then(|a| a.name.as_deref()))
                    .push_bind(c.to_json.as_str())
                    .push_bind(m.subject.as_deref())
                    .push_bind(text)
                    .push_bind(m.message_id.as_deref())
                    .push_bind(c.irt_json.as_str())
                    .push_bind(c.refs_json.as_str())
                    .push_bind(m.thread_key.as_deref())
                    .push_bind(automation_str(m.automation))
                    .push_bind(m.parse.as_str())
                    .push_bind(parse_reason(m))
                    .push_bind(raw)
                    .push_bind(c.digest.as_str())
                    .push_bind(stored_at);
            });
            if !with_ids {
                qb.push(" ON CONFLICT (source, origin_key) DO NOTHING");
                // Not kept in the connection's statement cache: each row count is its own statement,
                // and up to 100 prepared 40-64-row inserts held ~5 MB of an IMAP sync's 32 MB budget
                // (bench/README.md, session 8); preparing one costs far less than its rows' writes.
                new_rows += qb
                    .build()
                    .persistent(false)
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
                continue;
            }
            // RETURNING order is unspecified in SQLite, so rows are matched by their key.
            qb.push(
                " ON CONFLICT (source, origin_key) DO NOTHING RETURNING id, source, origin_key",
            );
            let rows: Vec<(i64, String, String)> = qb.build_query_as().fetch_all(&mut **tx).await?;
            for (id, source, key) in rows {
                ids.insert((source, key), id);
            }
        }
        if !with_ids {
            return Ok(Inserted::New(new_rows));
        }
        let mut by_unique = Vec::with_capacity(unique.len());
        for p in &unique {
            match ids.get(&(p.msg.source.clone(), p.cols.key.clone())) {
                Some(&id) => by_unique.push(Ingested {
                    id,
                    duplicate: false,
                }),
                None => {
                    let (id,): (i64,) = sqlx::query_as(self.sql(LOOKUP_ID))
                        .bind(&p.msg.source)
                        .bind(&p.cols.key)
                        .fetch_one(&mut **tx)
                        .await?;
                    by_unique.push(Ingested {
                        id,
                        duplicate: true,
                    });
                }
            }
        }
        Ok(Inserted::Rows(
            slot.into_iter()
                .map(|(u, repeated)| Ingested {
                    id: by_unique[u].id,
                    duplicate: repeated || by_unique[u].duplicate,
                })
                .collect(),
        ))
    }
}

impl super::backend::PgDb {
    /// Inserts several messages inside `tx` with one multi-row statement per chunk, so a batch costs
    /// a few round trips to PostgreSQL instead of one per message (SQLite's webhook writer steps
    /// [`RawMessageInserter`] instead). Same semantics as `insert_message` for
    /// each message in order: an origin already stored, or repeated earlier in `msgs`, is a duplicate
    /// carrying the first row's id.
    pub(crate) async fn insert_messages(
        &self,
        tx: &mut sqlx::Transaction<'_, <Self as Driver>::Db>,
        msgs: &[&Message],
        now: DateTime<Utc>,
    ) -> Result<Vec<Ingested>, Error> {
        match self
            .insert_message_rows(
                tx,
                msgs.iter().map(|m| Cow::Borrowed(*m)).collect(),
                None,
                now,
                true,
            )
            .await?
        {
            Inserted::Rows(rows) => Ok(rows),
            Inserted::New(_) => Err(Error::Corrupt {
                table: "messages",
                reason: "insert returned no ids".into(),
            }),
        }
    }
}

impl Store {
    /// Stores one message durably (committed and fsync'd on return) unless its origin exists.
    pub async fn ingest(&self, msg: &Message, now: DateTime<Utc>) -> Result<Ingested, Error> {
        on_backend!(self, |db| {
            let mut tx = db.begin_write().await?;
            let out = db.insert_message(&mut tx, msg, now).await?;
            tx.commit().await?;
            Ok(out)
        })
    }

    /// Stored messages, newest first.
    pub async fn messages(&self, filter: &MessageFilter) -> Result<Vec<StoredMessage>, Error> {
        on_backend!(self, |db| {
            let limit = i64::from(filter.limit.unwrap_or(50));
            let rows = sqlx::query(db.sql(
                "SELECT m.id, m.source, m.direction, m.received_at, m.from_addr, m.subject, \
             m.message_id, t.conversation_id, m.parse, m.parse_reason FROM messages m \
             LEFT JOIN message_threads t ON t.message_id = m.id \
             WHERE (?1 IS NULL OR m.source = ?1) ORDER BY m.received_at DESC, m.id DESC LIMIT ?2",
            ))
            .bind(filter.source.as_deref())
            .bind(limit)
            .fetch_all(db.reader())
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(StoredMessage {
                    id: r.try_get("id")?,
                    source: r.try_get("source")?,
                    direction: r.try_get("direction")?,
                    received_at: from_ms(r.try_get("received_at")?),
                    from: r.try_get("from_addr")?,
                    subject: r.try_get("subject")?,
                    message_id: r.try_get("message_id")?,
                    conversation_id: r.try_get("conversation_id")?,
                    parse: r.try_get("parse")?,
                    parse_reason: r.try_get("parse_reason")?,
                });
            }
            Ok(out)
        })
    }

    /// The raw bytes of message `id` as they were received, checked against their stored
    /// digest; `None` when there is no such message.
    pub async fn message_raw(&self, id: i64) -> Result<Option<Vec<u8>>, Error> {
        // raw, raw_digest, body_at, body_len
        type BodyRow = (Vec<u8>, String, Option<i64>, Option<i64>);
        let row: Option<BodyRow> = on_backend!(self, |db| {
            sqlx::query_as(
                db.sql("SELECT raw, raw_digest, body_at, body_len FROM messages WHERE id = ?"),
            )
            .bind(id)
            .fetch_optional(db.reader())
            .await?
        });
        let Some((raw, digest, at, len)) = row else {
            return Ok(None);
        };
        let raw = match (at, len) {
            (None, None) => raw,
            (Some(at), Some(len)) => {
                let Some(db) = self.sqlite() else {
                    return Err(Error::Corrupt {
                        table: "messages",
                        reason: format!(
                            "message {id} points into a bodies file PostgreSQL has not"
                        ),
                    });
                };
                db.read_body(id, at, len).await?
            }
            _ => {
                return Err(Error::Corrupt {
                    table: "messages",
                    reason: format!("message {id} has only one of body_at and body_len"),
                });
            }
        };
        check_body(id, &raw, &digest)?;
        Ok(Some(raw))
    }

    /// How many messages wait for the core loop.
    pub async fn pending_count(&self) -> Result<i64, Error> {
        on_backend!(self, |db| {
            let (n,): (i64,) = sqlx::query_as(db.sql("SELECT count(*) FROM core_queue"))
                .fetch_one(db.reader())
                .await?;
            Ok(n)
        })
    }

    /// How many messages are stored (all sources).
    pub async fn message_count(&self) -> Result<i64, Error> {
        on_backend!(self, |db| {
            let (n,): (i64,) = sqlx::query_as(db.sql("SELECT count(*) FROM messages"))
                .fetch_one(db.reader())
                .await?;
            Ok(n)
        })
    }
}

/// The values of `insert_into_messages!`'s columns for `msg`, in order, for a raw-handle insert.
fn raw_row_values<'a>(
    msg: &'a Message,
    c: &'a MessageColumns,
    raw: &'a [u8],
    stored_at: DateTime<Utc>,
) -> [super::sqlite_raw::Value<'a>; 21] {
    use super::sqlite_raw::Value;
    [
        Value::Text(&msg.source),
        Value::Text(&c.key),
        Value::Text(&c.origin_json),
        Value::Text(msg.direction.as_str()),
        Value::Int(to_ms(msg.received_at)),
        msg.sent_at.map(to_ms).into(),
        msg.from.as_ref().map(|a| a.addr.as_str()).into(),
        msg.from.as_ref().and_then(|a| a.name.as_deref()).into(),
        Value::Text(&c.to_json),
        msg.subject.as_deref().into(),
        msg.text.as_deref().into(),
        msg.message_id.as_deref().into(),
        Value::Text(&c.irt_json),
        Value::Text(&c.refs_json),
        msg.thread_key.as_deref().into(),
        Value::Text(automation_str(msg.automation)),
        Value::Text(msg.parse.as_str()),
        parse_reason(msg).into(),
        Value::Blob(raw),
        Value::Text(&c.digest),
        Value::Int(to_ms(stored_at)),
    ]
}

/// Inserts messages one statement step at a time on a raw SQLite handle (the webhook writer's
/// path, [`super::sqlite_raw`]), with `insert_message`'s semantics: an origin already stored,
/// or inserted earlier through this inserter, is a duplicate carrying the first row's id.
pub(crate) struct RawMessageInserter<'c, 'h> {
    insert: super::sqlite_raw::Stmt<'c, 'h>,
    lookup: super::sqlite_raw::Stmt<'c, 'h>,
}

impl<'c, 'h> RawMessageInserter<'c, 'h> {
    /// Prepares the statements on `db`.
    pub(crate) fn new(
        db: &'c super::sqlite_raw::RawDb<'h>,
    ) -> Result<Self, super::sqlite_raw::RawError> {
        Ok(RawMessageInserter {
            insert: db.prepare(INSERT_ONE)?,
            lookup: db.prepare(LOOKUP_ID)?,
        })
    }

    /// Stores `msg` unless its origin exists.
    pub(crate) fn insert(&mut self, msg: &Message, now: DateTime<Utc>) -> Result<Ingested, Error> {
        use super::sqlite_raw::Value;
        let c = MessageColumns::of(msg, None)?;
        self.insert
            .bind_all(&raw_row_values(msg, &c, &msg.raw, now))?;
        if self.insert.step()? {
            let id = self.insert.int(0);
            // run to completion so the statement is reset for the next message
            while self.insert.step()? {}
            return Ok(Ingested {
                id,
                duplicate: false,
            });
        }
        self.lookup
            .bind_all(&[Value::Text(&msg.source), Value::Text(&c.key)])?;
        if !self.lookup.step()? {
            return Err(Error::Corrupt {
                table: "messages",
                reason: format!("origin {} neither inserted nor found", c.key),
            });
        }
        let id = self.lookup.int(0);
        while self.lookup.step()? {}
        Ok(Ingested {
            id,
            duplicate: true,
        })
    }
}

/// Inserts staged messages (`Store::stage_imap_batch`) one statement step at a time on a raw
/// SQLite handle: the IMAP commit's path, [`super::sqlite_raw`] says why.
pub(crate) struct RawStagedInserter<'c, 'h> {
    insert: super::sqlite_raw::Stmt<'c, 'h>,
}

impl<'c, 'h> RawStagedInserter<'c, 'h> {
    /// Prepares the statement on `db`.
    pub(crate) fn new(
        db: &'c super::sqlite_raw::RawDb<'h>,
    ) -> Result<Self, super::sqlite_raw::RawError> {
        Ok(RawStagedInserter {
            insert: db.prepare(INSERT_ONE_PLACED)?,
        })
    }

    /// Stores `msg` with its staged body unless its origin exists; true when a row was added.
    pub(crate) fn insert(
        &mut self,
        msg: &Message,
        staged: StagedBody,
        stored_at: DateTime<Utc>,
    ) -> Result<bool, Error> {
        let c = MessageColumns::of(msg, Some(staged.digest))?;
        // a body in the bodies file left `raw` empty; one still held is stored in the row
        let (at, len) = match staged.place {
            Some(p) => (
                Some(i64::try_from(p.at).unwrap_or(i64::MAX)),
                Some(i64::try_from(p.len).unwrap_or(i64::MAX)),
            ),
            None => (None, None),
        };
        let raw: &[u8] = if staged.place.is_some() {
            &[]
        } else {
            &msg.raw
        };
        let mut values = raw_row_values(msg, &c, raw, stored_at).to_vec();
        values.extend([super::sqlite_raw::Value::from(at), len.into()]);
        self.insert.bind_all(&values)?;
        let added = self.insert.step()?;
        // run to completion so the statement is reset for the next message
        while self.insert.step()? {}
        Ok(added)
    }
}

/// Refuses bytes that are not the ones stored for message `id` (a damaged or replaced file).
pub(crate) fn check_body(id: i64, raw: &[u8], digest: &str) -> Result<(), Error> {
    let reason = match body_digest::matches(raw, digest) {
        Ok(true) => return Ok(()),
        Ok(false) => format!("the raw bytes of message {id} do not match their digest"),
        Err(unreadable) => format!("message {id} has {unreadable} in raw_digest"),
    };
    Err(Error::Corrupt {
        table: "messages",
        reason,
    })
}

impl super::backend::SqliteDb {
    /// Reads a body from the bodies file (`store::bodies`) of message `id`.
    pub(crate) async fn read_body(&self, id: i64, at: i64, len: i64) -> Result<Vec<u8>, Error> {
        let (Ok(at), Ok(len)) = (u64::try_from(at), u64::try_from(len)) else {
            return Err(Error::Corrupt {
                table: "messages",
                reason: format!("message {id} has a negative body_at or body_len"),
            });
        };
        let bodies = self.bodies.clone();
        let read = tokio::task::spawn_blocking(move || bodies.read(Placed { at, len }))
            .await
            .map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))?;
        read.map_err(|e| Error::Corrupt {
            table: "messages",
            reason: format!("cannot read the body of message {id} from the bodies file: {e}"),
        })
    }
}
