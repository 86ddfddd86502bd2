//! Statements stepped in place on the raw `sqlite3` handle of a locked sqlx connection.
//!
//! sqlx runs every SQLite statement on its connection's worker thread and sends each result row
//! back to the calling task, so a statement costs two thread hand-offs plus the calling task's
//! wait for a turn on a tokio worker. A webhook batch made about 40 of them (one per `RETURNING`
//! row), and under load the batch spent most of its time queued behind HTTP tasks rather than in
//! SQLite. The webhook writer therefore locks the connection (`lock_handle`: sqlx's worker makes
//! no call on the handle meanwhile) and runs its whole transaction here, on one thread, in one
//! go. Only what that transaction needs is wrapped: exec, prepare, bind, step, read a column.

use std::borrow::Cow;
use std::ffi::{CStr, c_int};
use std::marker::PhantomData;
use std::ptr::NonNull;

use libsqlite3_sys as ffi;

/// A failed SQLite call: its extended result code and message, shaped like sqlx's own errors so
/// callers classify it the same way (e.g. code 13, SQLITE_FULL, for a full disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawError {
    /// The extended result code.
    pub code: c_int,
    /// SQLite's message for it.
    pub message: String,
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for RawError {}

impl sqlx::error::DatabaseError for RawError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(self.code.to_string().into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                sqlx::error::ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => sqlx::error::ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => sqlx::error::ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => sqlx::error::ErrorKind::CheckViolation,
            _ => sqlx::error::ErrorKind::Other,
        }
    }
}

impl From<RawError> for super::Error {
    fn from(e: RawError) -> Self {
        super::Error::Unavailable(sqlx::Error::Database(Box::new(e)))
    }
}

/// A borrowed database handle, valid for `'h` (the lifetime of the sqlx lock guarding it).
pub(crate) struct RawDb<'h> {
    db: NonNull<ffi::sqlite3>,
    _lock: PhantomData<&'h mut ()>,
}

/// One value bound to a statement parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value<'a> {
    /// SQL NULL.
    Null,
    /// An INTEGER.
    Int(i64),
    /// TEXT (UTF-8).
    Text(&'a str),
    /// A BLOB.
    Blob(&'a [u8]),
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(v: Option<&'a str>) -> Self {
        v.map_or(Value::Null, Value::Text)
    }
}

impl From<Option<i64>> for Value<'_> {
    fn from(v: Option<i64>) -> Self {
        v.map_or(Value::Null, Value::Int)
    }
}

impl<'h> RawDb<'h> {
    /// Wraps `db`.
    ///
    /// # Safety
    /// `db` must be an open connection that nothing else uses for `'h` (sqlx's
    /// `LockedSqliteHandle` guarantees that while it lives).
    pub(crate) unsafe fn new(db: NonNull<ffi::sqlite3>) -> RawDb<'h> {
        RawDb {
            db,
            _lock: PhantomData,
        }
    }

    /// The connection's last error.
    fn error(&self) -> RawError {
        // SAFETY: the handle is open (`new`'s contract); errmsg returns a NUL-terminated string
        // owned by SQLite, copied out before any other call on the handle.
        unsafe {
            let code = ffi::sqlite3_extended_errcode(self.db.as_ptr());
            let msg = ffi::sqlite3_errmsg(self.db.as_ptr());
            let message = if msg.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(msg).to_string_lossy().into_owned()
            };
            RawError { code, message }
        }
    }

    /// Runs statements without parameters or results (BEGIN, COMMIT, PRAGMA).
    pub(crate) fn exec(&self, sql: &str) -> Result<(), RawError> {
        let mut stmt = self.prepare(sql)?;
        while stmt.step()? {}
        Ok(())
    }

    /// Runs `body` in a `BEGIN IMMEDIATE` transaction with `synchronous=NORMAL` for that
    /// transaction only (SQLite refuses the change inside one): its COMMIT writes the WAL frames
    /// without an fsync, and `synchronous=FULL` is set again after it for every other writer. On
    /// any error the transaction is rolled back and the error returned; the caller then closes
    /// the connection, whose synchronous setting is unknown.
    pub(crate) fn unsynced_transaction<T>(
        &self,
        body: impl FnOnce() -> Result<T, super::Error>,
    ) -> Result<T, super::Error> {
        self.exec("PRAGMA synchronous = NORMAL")?;
        self.exec("BEGIN IMMEDIATE")?;
        let done = body().and_then(|out| {
            self.exec("COMMIT")?;
            Ok(out)
        });
        if done.is_err() {
            let _ = self.exec("ROLLBACK");
        }
        let out = done?;
        self.exec("PRAGMA synchronous = FULL")?;
        Ok(out)
    }

    /// Compiles one statement.
    pub(crate) fn prepare(&self, sql: &str) -> Result<Stmt<'_, 'h>, RawError> {
        let len = c_int::try_from(sql.len()).map_err(|_| RawError {
            code: ffi::SQLITE_TOOBIG,
            message: "statement too long".into(),
        })?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the handle is open; `sql` is valid for `len` bytes (no NUL terminator needed
        // with an explicit length); SQLite writes the statement pointer into `raw`.
        let rc = unsafe {
            ffi::sqlite3_prepare_v2(
                self.db.as_ptr(),
                sql.as_ptr().cast(),
                len,
                &mut raw,
                std::ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(self.error());
        }
        match NonNull::new(raw) {
            Some(raw) => Ok(Stmt { raw, db: self }),
            None => Err(RawError {
                code: ffi::SQLITE_MISUSE,
                message: "empty statement".into(),
            }),
        }
    }
}

/// A compiled statement; finalized on drop.
pub(crate) struct Stmt<'c, 'h> {
    raw: NonNull<ffi::sqlite3_stmt>,
    db: &'c RawDb<'h>,
}

impl Stmt<'_, '_> {
    /// Binds `values` to parameters 1..=n, replacing any earlier bindings.
    pub(crate) fn bind_all(&mut self, values: &[Value<'_>]) -> Result<(), RawError> {
        // SAFETY (all calls below): the statement is live and not being stepped; every value is
        // bound with SQLITE_TRANSIENT, so SQLite copies it before the call returns and nothing
        // borrowed outlives this function.
        unsafe {
            ffi::sqlite3_reset(self.raw.as_ptr());
            ffi::sqlite3_clear_bindings(self.raw.as_ptr());
        }
        for (i, v) in values.iter().enumerate() {
            let idx = c_int::try_from(i + 1).map_err(|_| RawError {
                code: ffi::SQLITE_RANGE,
                message: "too many parameters".into(),
            })?;
            let p = self.raw.as_ptr();
            let rc = unsafe {
                match *v {
                    Value::Null => ffi::sqlite3_bind_null(p, idx),
                    Value::Int(n) => ffi::sqlite3_bind_int64(p, idx, n),
                    Value::Text(s) => ffi::sqlite3_bind_text64(
                        p,
                        idx,
                        s.as_ptr().cast(),
                        s.len() as u64,
                        ffi::SQLITE_TRANSIENT(),
                        ffi::SQLITE_UTF8 as u8,
                    ),
                    Value::Blob(b) => ffi::sqlite3_bind_blob64(
                        p,
                        idx,
                        b.as_ptr().cast(),
                        b.len() as u64,
                        ffi::SQLITE_TRANSIENT(),
                    ),
                }
            };
            if rc != ffi::SQLITE_OK {
                return Err(self.db.error());
            }
        }
        Ok(())
    }

    /// Advances the statement: true when a row is ready, false when it is done.
    pub(crate) fn step(&mut self) -> Result<bool, RawError> {
        // SAFETY: the statement is live; the connection is ours alone (`RawDb::new`).
        match unsafe { ffi::sqlite3_step(self.raw.as_ptr()) } {
            ffi::SQLITE_ROW => Ok(true),
            ffi::SQLITE_DONE => Ok(false),
            _ => {
                let e = self.db.error();
                // a failed step leaves the statement needing a reset before reuse
                unsafe { ffi::sqlite3_reset(self.raw.as_ptr()) };
                Err(e)
            }
        }
    }

    /// Column `i` of the current row as an integer (NULL reads as 0).
    pub(crate) fn int(&self, i: c_int) -> i64 {
        // SAFETY: called only after `step` returned true; an out-of-range index yields 0.
        unsafe { ffi::sqlite3_column_int64(self.raw.as_ptr(), i) }
    }

    /// Column `i` of the current row as text (NULL reads as empty).
    pub(crate) fn text(&self, i: c_int) -> String {
        // SAFETY: called only after `step` returned true; the pointer and length describe a buffer
        // owned by SQLite that stays valid until the next step/reset, and is copied out here.
        unsafe {
            let p = ffi::sqlite3_column_text(self.raw.as_ptr(), i);
            if p.is_null() {
                return String::new();
            }
            let n = usize::try_from(ffi::sqlite3_column_bytes(self.raw.as_ptr(), i)).unwrap_or(0);
            String::from_utf8_lossy(std::slice::from_raw_parts(p, n)).into_owned()
        }
    }
}

impl Drop for Stmt<'_, '_> {
    fn drop(&mut self) {
        // SAFETY: the statement was prepared on this handle and is finalized exactly once.
        unsafe {
            ffi::sqlite3_finalize(self.raw.as_ptr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens a private in-memory database for the wrapper's own tests.
    fn with_db(f: impl FnOnce(&RawDb<'_>)) {
        let mut raw = std::ptr::null_mut();
        let name = c":memory:";
        // SAFETY: a fresh connection owned by this test, closed below.
        let rc = unsafe { ffi::sqlite3_open(name.as_ptr(), &mut raw) };
        assert_eq!(rc, ffi::SQLITE_OK);
        let db = NonNull::new(raw).unwrap();
        {
            let db = unsafe { RawDb::new(db) };
            f(&db);
        }
        unsafe { ffi::sqlite3_close(raw) };
    }

    #[test]
    fn binds_steps_and_reads_back_every_value_kind() {
        with_db(|db| {
            db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT, b BLOB, n INTEGER)")
                .unwrap();
            let mut ins = db
                .prepare("INSERT INTO t (s, b, n) VALUES (?, ?, ?) RETURNING id")
                .unwrap();
            for (s, b, n) in [
                (Some("é\u{0}x"), &b"\x00\xff"[..], Some(7)),
                (None, &b""[..], None),
            ] {
                ins.bind_all(&[s.into(), Value::Blob(b), n.into()]).unwrap();
                assert!(ins.step().unwrap(), "RETURNING gives a row");
                assert!(ins.int(0) > 0);
                assert!(!ins.step().unwrap());
            }
            let mut q = db
                .prepare("SELECT s, hex(b), n, s IS NULL FROM t ORDER BY id")
                .unwrap();
            q.bind_all(&[]).unwrap();
            assert!(q.step().unwrap());
            assert_eq!(
                q.text(0),
                "é\u{0}x",
                "text with a NUL survives (explicit lengths)"
            );
            assert_eq!(q.text(1), "00FF");
            assert_eq!(q.int(2), 7);
            assert!(q.step().unwrap());
            assert_eq!(q.int(3), 1, "None binds NULL");
            assert!(!q.step().unwrap());
        });
    }

    #[test]
    fn errors_carry_the_extended_code_and_leave_the_statement_reusable() {
        with_db(|db| {
            db.exec("CREATE TABLE t (k TEXT PRIMARY KEY)").unwrap();
            let mut ins = db.prepare("INSERT INTO t (k) VALUES (?)").unwrap();
            ins.bind_all(&[Value::Text("a")]).unwrap();
            assert!(!ins.step().unwrap());
            ins.bind_all(&[Value::Text("a")]).unwrap();
            let e = ins.step().unwrap_err();
            assert_eq!(e.code, ffi::SQLITE_CONSTRAINT_PRIMARYKEY, "{e}");
            let as_store: crate::store::Error = e.into();
            assert!(as_store.to_string().contains("UNIQUE"), "{as_store}");
            ins.bind_all(&[Value::Text("b")]).unwrap();
            assert!(!ins.step().unwrap(), "usable again after the failure");
            let bad = db.prepare("SELEC nonsense").map(|_| ()).unwrap_err();
            assert_eq!(bad.code, ffi::SQLITE_ERROR);
            assert!(bad.message.contains("syntax"), "{}", bad.message);
        });
    }
}
