//! The two database handles and the machinery that compiles one method body for both.
//!
//! `on_backend!(store, |db| body)` expands `body` once per backend with `db` bound to that
//! backend's handle, so each copy type-checks against its own sqlx driver (no `Any` driver, no
//! generic bounds). `twin_impl! { fns }` does the same for helper functions: it puts them in an
//! `impl` block of each handle, where [`Tx`] and [`Qb`] name that backend's types.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{PgPool, Postgres, Sqlite, SqlitePool, Transaction};

use super::Error;

/// The SQLite file: one writer connection, a pool of readers.
#[derive(Clone, Debug)]
pub(crate) struct SqliteDb {
    pub(super) writer: SqlitePool,
    pub(super) reader: SqlitePool,
    pub(super) path: PathBuf,
    pub(super) options: Box<SqliteConnectOptions>,
    /// Raw IMAP bodies, appended beside the database (`store::bodies`).
    pub(super) bodies: std::sync::Arc<super::bodies::BodyFile>,
}

/// A PostgreSQL database: one pool for reads and writes (the server serializes).
#[derive(Clone, Debug)]
pub(crate) struct PgDb {
    pub(super) pool: PgPool,
}

/// What differs between the two handles at compile time; implemented by exactly the two.
pub(crate) trait Driver {
    /// The sqlx driver.
    type Db: sqlx::Database;
}

impl Driver for SqliteDb {
    type Db = Sqlite;
}

impl Driver for PgDb {
    type Db = Postgres;
}

/// A write transaction on backend `D`.
pub(crate) type Tx<D> = Transaction<'static, <D as Driver>::Db>;

/// A query builder on backend `D` (it writes `?` or `$n` itself).
pub(crate) type Qb<D> = sqlx::QueryBuilder<<D as Driver>::Db>;

/// Expands `$body` once per backend with `$db` bound to the backend's handle.
macro_rules! on_backend {
    ($store:expr, |$db:ident| $body:expr) => {
        match &$store.backend {
            $crate::store::Backend::Sqlite($db) => $body,
            $crate::store::Backend::Postgres($db) => $body,
        }
    };
}

/// Puts the same associated functions into an `impl` of each backend handle.
macro_rules! twin_impl {
    ($($body:tt)*) => {
        impl $crate::store::backend::SqliteDb { $($body)* }
        impl $crate::store::backend::PgDb { $($body)* }
    };
}

/// The bounds a row type needs for a row decoder (both backends' rows meet them).
macro_rules! row_fn {
    ($(#[$m:meta])* fn $name:ident($r:ident) -> $out:ty $body:block) => {
        $(#[$m])*
        fn $name<R>($r: &R) -> Result<$out, Error>
        where
            R: Row,
            for<'a> &'a str: sqlx::ColumnIndex<R>,
            i64: for<'d> sqlx::Decode<'d, R::Database> + sqlx::Type<R::Database>,
            String: for<'d> sqlx::Decode<'d, R::Database> + sqlx::Type<R::Database>,
        $body
    };
}

impl SqliteDb {
    /// The pool for reads.
    pub(crate) fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    /// The single writer connection (writes outside a transaction).
    pub(crate) fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// SQLite takes `?` as written.
    pub(crate) fn sql(&self, sql: &'static str) -> &'static str {
        sql
    }

    /// The SQLite statement of a pair written per dialect.
    pub(crate) fn pick(&self, sqlite: &'static str, _postgres: &'static str) -> &'static str {
        sqlite
    }

    /// Starts a write transaction that takes the write lock up front (read-then-write safe).
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, Error> {
        match self.writer.begin_with("BEGIN IMMEDIATE").await {
            Err(sqlx::Error::InvalidSavePointStatement | sqlx::Error::BeginFailed) => {
                // A COMMIT that failed (disk full, I/O error) leaves sqlx's transaction depth at 1
                // while SQLite has already rolled back, so the drop-time ROLLBACK fails and the
                // connection can never begin again. Replace it with a fresh one.
                tracing::warn!("replacing the database writer connection after a failed commit");
                if let Ok(conn) = self.writer.acquire().await {
                    let _ = conn.close().await;
                }
                Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
            }
            other => Ok(other?),
        }
    }

    /// Starts a read-only transaction on a reader connection: one consistent snapshot.
    pub(crate) async fn begin_read(&self) -> Result<Transaction<'static, Sqlite>, Error> {
        Ok(self.reader.begin().await?)
    }
}

impl PgDb {
    /// The pool for reads.
    pub(crate) fn reader(&self) -> &PgPool {
        &self.pool
    }

    /// The pool for writes outside a transaction.
    pub(crate) fn writer(&self) -> &PgPool {
        &self.pool
    }

    /// The statement with SQLite's `?` and `?n` placeholders rewritten to `$n`.
    pub(crate) fn sql(&self, sql: &'static str) -> &'static str {
        pg_sql(sql)
    }

    /// The PostgreSQL statement of a pair written per dialect (`?` rewritten as by `sql`).
    pub(crate) fn pick(&self, _sqlite: &'static str, postgres: &'static str) -> &'static str {
        pg_sql(postgres)
    }

    /// Starts a write transaction (READ COMMITTED: each statement sees the latest commits, and
    /// `ON CONFLICT` waits for a concurrent insert of the same key to settle).
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, Error> {
        Ok(self.pool.begin().await?)
    }

    /// Starts a read-only transaction with one snapshot for all its statements.
    pub(crate) async fn begin_read(&self) -> Result<Transaction<'static, Postgres>, Error> {
        Ok(self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?)
    }
}

/// `sql` with every `?` and `?n` outside quotes turned into `$n`; memoized, since the same few
/// dozen statements run over and over (and sqlx caches prepared statements by their text).
pub(crate) fn pg_sql(sql: &'static str) -> &'static str {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, &'static str>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Ok(map) = cache.lock()
        && let Some(done) = map.get(sql)
    {
        return done;
    }
    let done: &'static str = Box::leak(rewrite_placeholders(sql).into_boxed_str());
    if let Ok(mut map) = cache.lock() {
        map.insert(sql, done);
    }
    done
}

/// The rewrite behind [`pg_sql`]: bare `?` count up from 1; `?n` keep their number.
fn rewrite_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut next = 1;
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => {
                out.push('$');
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                if digits.is_empty() {
                    out.push_str(&next.to_string());
                    next += 1;
                } else {
                    out.push_str(&digits);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::rewrite_placeholders;

    #[test]
    fn placeholders_become_numbered() {
        assert_eq!(
            rewrite_placeholders("SELECT a FROM t WHERE b = ? AND c = ? AND d = '?'"),
            "SELECT a FROM t WHERE b = $1 AND c = $2 AND d = '?'"
        );
        assert_eq!(
            rewrite_placeholders("WHERE (?1 IS NULL OR s = ?1) LIMIT ?2"),
            "WHERE ($1 IS NULL OR s = $1) LIMIT $2"
        );
    }
}
