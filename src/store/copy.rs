//! `frontdesk store copy`: moves an installation from its SQLite file to an empty PostgreSQL
//! database, then proves the copy by row counts and per-table checksums computed the same way
//! on both sides.
//!
//! Everything is written in one PostgreSQL transaction: a failure leaves the target empty, so
//! the command can simply be run again. The core's queue trigger is disabled inside that
//! transaction, because `core_queue` is copied as it is (a message already handled must not be
//! queued again).

use std::path::Path;

use futures::TryStreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::backend::SqliteDb;
use super::messages::check_body;
use super::{Backend, Error, Store};

/// Tables in an order that satisfies the foreign keys; `health_probe` is not data.
const TABLES: &[&str] = &[
    "messages",
    "conversations",
    "core_queue",
    "message_threads",
    "conversation_keys",
    "sla_targets",
    "imap_cursors",
    "imap_accounted",
    "imap_poison",
    "source_events",
    "source_health",
    "outbox",
    "alert_events",
    "webhook_counters",
    "webhook_activity",
    "webhook_replay_tokens",
];

/// Tables whose `id` is an identity column on PostgreSQL: its sequence continues after the copy.
const IDENTITY_TABLES: &[&str] = &["messages", "source_events", "outbox", "alert_events"];

/// Rows per INSERT statement (the widest table has 21 columns: far below 65,535 parameters).
const CHUNK: usize = 200;

/// What was copied for one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableCopy {
    /// Table name.
    pub table: String,
    /// Rows in the source and, verified, in the target.
    pub rows: u64,
    /// SHA-256 (hex) over the rows in primary-key order, equal on both sides.
    pub sha256: String,
}

/// The kind of a column as both schemas declare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Text,
    Blob,
}

/// One value read from either side.
#[derive(Debug, Clone)]
enum Value {
    Int(Option<i64>),
    Text(Option<String>),
    Blob(Option<Vec<u8>>),
}

impl Value {
    /// Feeds the value into a row checksum: a tag, then a length where needed, then the bytes.
    fn hash_into(&self, h: &mut Sha256) {
        match self {
            Value::Int(None) | Value::Text(None) | Value::Blob(None) => h.update(b"n"),
            Value::Int(Some(v)) => {
                h.update(b"i");
                h.update(v.to_be_bytes());
            }
            Value::Text(Some(s)) => {
                h.update(b"t");
                h.update((s.len() as u64).to_be_bytes());
                h.update(s.as_bytes());
            }
            Value::Blob(Some(b)) => {
                h.update(b"b");
                h.update((b.len() as u64).to_be_bytes());
                h.update(b);
            }
        }
    }
}

/// A table's columns in declaration order and its primary key.
struct Shape {
    columns: Vec<(String, Kind)>,
    key: Vec<String>,
}

fn copy_err(reason: String) -> Error {
    Error::Open {
        path: "store copy".into(),
        reason,
    }
}

/// Copies every table of the SQLite store at `from` into the empty PostgreSQL database at
/// `to_url` and verifies counts and checksums; refuses a target that holds any row.
pub async fn sqlite_to_postgres(
    from: &Path,
    to_url: &str,
    password: Option<&str>,
) -> Result<Vec<TableCopy>, Error> {
    if !from.exists() {
        return Err(Error::Open {
            path: from.to_path_buf(),
            reason: "no such database file".into(),
        });
    }
    let source = Store::open(from).await?;
    let target = Store::open_postgres(to_url, password).await?;
    let result = copy_between(&source, &target).await;
    source.close().await;
    target.close().await;
    result
}

async fn copy_between(source: &Store, target: &Store) -> Result<Vec<TableCopy>, Error> {
    let (Backend::Sqlite(src), Backend::Postgres(dst)) = (&source.backend, &target.backend) else {
        return Err(copy_err("copy runs from SQLite to PostgreSQL".into()));
    };
    for table in TABLES {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {table})");
        let (any,): (bool,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_one(&dst.pool)
            .await?;
        if any {
            return Err(copy_err(format!(
                "the target is not empty (table {table} has rows); copy only into a new database"
            )));
        }
    }
    let mut shapes = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        shapes.push(shape(&src.reader, table).await?);
    }
    let mut tx = dst.pool.begin().await?;
    sqlx::query("ALTER TABLE messages DISABLE TRIGGER messages_queue_for_core")
        .execute(&mut *tx)
        .await?;
    let mut copied = Vec::with_capacity(TABLES.len());
    for (table, shape) in TABLES.iter().zip(&shapes) {
        let (rows, sha) = copy_table(src, &mut tx, table, shape).await?;
        copied.push(TableCopy {
            table: table.to_string(),
            rows,
            sha256: sha,
        });
    }
    sqlx::query("ALTER TABLE messages ENABLE TRIGGER messages_queue_for_core")
        .execute(&mut *tx)
        .await?;
    for table in IDENTITY_TABLES {
        let sql = format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
             coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    // Verified from what the target now serves, after the commit.
    for (c, shape) in copied.iter().zip(&shapes) {
        let (rows, sha) = checksum_pg(&dst.pool, &c.table, shape).await?;
        if (rows, sha.as_str()) != (c.rows, c.sha256.as_str()) {
            return Err(copy_err(format!(
                "table {} differs after the copy: {} rows {} in the source, {rows} rows {sha} in \
                 the target",
                c.table, c.rows, c.sha256
            )));
        }
    }
    Ok(copied)
}

/// Columns and primary key of `table` as the SQLite schema declares them.
async fn shape(reader: &sqlx::SqlitePool, table: &str) -> Result<Shape, Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA table_info({table})")))
        .fetch_all(reader)
        .await?;
    let mut columns = Vec::with_capacity(rows.len());
    let mut key: Vec<(i64, String)> = Vec::new();
    for r in rows {
        let name: String = r.try_get("name")?;
        let declared: String = r.try_get("type")?;
        let kind = match declared.to_ascii_uppercase().as_str() {
            "INTEGER" => Kind::Int,
            "TEXT" => Kind::Text,
            "BLOB" => Kind::Blob,
            other => {
                return Err(Error::Corrupt {
                    table: "sqlite_schema",
                    reason: format!("column {table}.{name} has the unexpected type {other}"),
                });
            }
        };
        let pk: i64 = r.try_get("pk")?;
        if pk > 0 {
            key.push((pk, name.clone()));
        }
        columns.push((name, kind));
    }
    if key.is_empty() {
        return Err(Error::Corrupt {
            table: "sqlite_schema",
            reason: format!("table {table} has no primary key"),
        });
    }
    key.sort();
    Ok(Shape {
        columns,
        key: key.into_iter().map(|(_, n)| n).collect(),
    })
}

fn column_list(shape: &Shape) -> String {
    shape
        .columns
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `ORDER BY` over the key; text keys in byte order on both sides (PostgreSQL's collation
/// could order them otherwise, which would change the checksum, not the data).
fn key_order(shape: &Shape, pg: bool) -> String {
    shape
        .key
        .iter()
        .map(|k| {
            let text = shape
                .columns
                .iter()
                .any(|(n, kind)| n == k && *kind == Kind::Text);
            if pg && text {
                format!("{k} COLLATE \"C\"")
            } else {
                k.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn decode<R>(r: &R, shape: &Shape) -> Result<Vec<Value>, Error>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    i64: for<'d> sqlx::Decode<'d, R::Database> + sqlx::Type<R::Database>,
    String: for<'d> sqlx::Decode<'d, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: for<'d> sqlx::Decode<'d, R::Database> + sqlx::Type<R::Database>,
{
    shape
        .columns
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| {
            Ok(match kind {
                Kind::Int => Value::Int(r.try_get(i)?),
                Kind::Text => Value::Text(r.try_get(i)?),
                Kind::Blob => Value::Blob(r.try_get(i)?),
            })
        })
        .collect()
}

/// Streams `table` out of SQLite in key order into `tx`; returns its row count and checksum.
async fn copy_table(
    src: &SqliteDb,
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    table: &str,
    shape: &Shape,
) -> Result<(u64, String), Error> {
    let select = format!(
        "SELECT {} FROM {table} ORDER BY {}",
        column_list(shape),
        key_order(shape, false)
    );
    let bodies = BodyColumns::of(table, shape);
    let mut rows = sqlx::query(sqlx::AssertSqlSafe(select)).fetch(&src.reader);
    let mut hash = Sha256::new();
    let mut count = 0u64;
    let mut pending: Vec<Vec<Value>> = Vec::with_capacity(CHUNK);
    while let Some(r) = rows.try_next().await? {
        let mut values = decode(&r, shape)?;
        if let Some(b) = &bodies {
            b.inline(src, &mut values).await?;
        }
        for v in &values {
            v.hash_into(&mut hash);
        }
        count += 1;
        pending.push(values);
        if pending.len() == CHUNK {
            insert_chunk(tx, table, shape, &pending).await?;
            pending.clear();
        }
    }
    if !pending.is_empty() {
        insert_chunk(tx, table, shape, &pending).await?;
    }
    Ok((count, hex::encode(hash.finalize())))
}

/// Where `messages` keeps a body and its place in the bodies file (`store::bodies`): the copy
/// moves every body into `raw`, the one place PostgreSQL keeps them.
struct BodyColumns {
    id: usize,
    raw: usize,
    digest: usize,
    at: usize,
    len: usize,
}

impl BodyColumns {
    fn of(table: &str, shape: &Shape) -> Option<BodyColumns> {
        let find = |name: &str| shape.columns.iter().position(|(n, _)| n == name);
        if table != "messages" {
            return None;
        }
        Some(BodyColumns {
            id: find("id")?,
            raw: find("raw")?,
            digest: find("raw_digest")?,
            at: find("body_at")?,
            len: find("body_len")?,
        })
    }

    /// Reads the row's body into `raw` (checked against its digest) and clears its place.
    async fn inline(&self, src: &SqliteDb, row: &mut [Value]) -> Result<(), Error> {
        let (Value::Int(Some(at)), Value::Int(Some(len)), Value::Int(Some(id))) =
            (&row[self.at], &row[self.len], &row[self.id])
        else {
            return Ok(());
        };
        let (id, at, len) = (*id, *at, *len);
        let body = src.read_body(id, at, len).await?;
        if let Value::Text(Some(digest)) = &row[self.digest] {
            check_body(id, &body, digest)?;
        }
        row[self.raw] = Value::Blob(Some(body));
        row[self.at] = Value::Int(None);
        row[self.len] = Value::Int(None);
        Ok(())
    }
}

async fn insert_chunk(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    table: &str,
    shape: &Shape,
    rows: &[Vec<Value>],
) -> Result<(), Error> {
    let mut qb = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
        "INSERT INTO {table} ({}) ",
        column_list(shape)
    ));
    qb.push_values(rows, |mut b, row| {
        for v in row {
            match v {
                Value::Int(x) => b.push_bind(*x),
                Value::Text(x) => b.push_bind(x.clone()),
                Value::Blob(x) => b.push_bind(x.clone()),
            };
        }
    });
    qb.build().execute(&mut **tx).await?;
    Ok(())
}

/// Row count and checksum of `table` as PostgreSQL serves it, in the same order and encoding.
async fn checksum_pg(
    pool: &sqlx::PgPool,
    table: &str,
    shape: &Shape,
) -> Result<(u64, String), Error> {
    let select = format!(
        "SELECT {} FROM {table} ORDER BY {}",
        column_list(shape),
        key_order(shape, true)
    );
    let mut rows = sqlx::query(sqlx::AssertSqlSafe(select)).fetch(pool);
    let mut hash = Sha256::new();
    let mut count = 0u64;
    while let Some(r) = rows.try_next().await? {
        for v in decode(&r, shape)? {
            v.hash_into(&mut hash);
        }
        count += 1;
    }
    Ok((count, hex::encode(hash.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::webhook::tests_support::message;
    use chrono::Utc;

    #[tokio::test]
    async fn a_used_sqlite_store_copies_exactly_and_a_second_copy_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        {
            let store = Store::open(&path).await.unwrap();
            for i in 0..450 {
                let mut m = message("hook", &format!("k{i}"));
                m.raw = vec![i as u8; 100 + i];
                store.ingest(&m, Utc::now()).await.unwrap();
            }
            store
                .source_failed("mail", "boom", 1, Utc::now())
                .await
                .unwrap();
            let writer = store.spawn_webhook_writer(Default::default(), Default::default());
            writer.count("hook", "rejected:bad_signature");
            writer
                .ingest(crate::store::webhook::WebhookDelivery {
                    message: message("hook", "last"),
                    replay_token: Some("tok".into()),
                })
                .await
                .unwrap();
            drop(writer);
            // two IMAP messages, their bodies in the bodies file: the copy carries them inline
            let imap = |uid: u32| {
                let mut m = message("mail", &format!("imap{uid}"));
                m.origin = crate::message::Origin::Imap {
                    folder: "INBOX".into(),
                    uid_validity: 3,
                    uid,
                };
                m.raw = format!("Subject: imap {uid}\r\n\r\nbody").into_bytes();
                m
            };
            let cursor = crate::store::ImapCursor {
                uid_validity: 3,
                last_uid: 2,
                backfill_floor: 0,
                backfill_skipped: 0,
                backfill_cutoff: None,
            };
            store
                .commit_imap_batch(
                    "mail",
                    "INBOX",
                    vec![imap(1), imap(2)],
                    &[],
                    &cursor,
                    Utc::now(),
                )
                .await
                .unwrap();
            store.close().await;
        }
        let url = crate::store::test_pg::fresh_url().await;
        let copied = sqlite_to_postgres(&path, &url, None).await.unwrap();
        let rows = |t: &str| copied.iter().find(|c| c.table == t).unwrap().rows;
        assert_eq!(rows("messages"), 453);
        assert_eq!(rows("core_queue"), 453);
        assert_eq!(rows("webhook_replay_tokens"), 1);
        assert_eq!(rows("alert_events"), 1);
        // The copy is a working store: the same ids, new rows continue after them.
        let pg = Store::open_postgres(&url, None).await.unwrap();
        assert_eq!(pg.message_count().await.unwrap(), 453);
        assert_eq!(pg.pending_count().await.unwrap(), 453);
        assert_eq!(
            pg.message_raw(453).await.unwrap().as_deref(),
            Some(&b"Subject: imap 2\r\n\r\nbody"[..])
        );
        let dup = pg.ingest(&message("hook", "k7"), Utc::now()).await.unwrap();
        assert!(dup.duplicate);
        let new = pg
            .ingest(&message("hook", "new"), Utc::now())
            .await
            .unwrap();
        assert!(!new.duplicate && new.id > 453, "{new:?}");
        assert_eq!(pg.pending_count().await.unwrap(), 454);
        pg.close().await;
        let again = sqlite_to_postgres(&path, &url, None).await.unwrap_err();
        assert!(again.to_string().contains("not empty"), "{again}");
    }
}
