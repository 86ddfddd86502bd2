//! Leases: work that must run on one replica at a time (each IMAP folder, the core, the sender).
//!
//! On PostgreSQL a lease is a session-level advisory lock (`pg_try_advisory_lock`) taken on a
//! connection of its own, outside the pool: the lock lives exactly as long as that session, so a
//! replica that dies (SIGKILL, power loss) loses it as soon as the server notices the closed
//! socket, and another replica's next attempt takes it. The holder proves its session alive with
//! a heartbeat on that same connection before each batch or step; when the heartbeat fails the
//! holder stops at once, because it can no longer know that nobody else holds the lock.
//!
//! On SQLite there is one process, which always holds every lease: the same code path, with
//! [`Leases::single`].

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::metrics::Sample;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::{Connection, Row};

/// The database clock in UTC milliseconds: one clock for every replica. A macro so the queries
/// stay static strings (`concat!`).
macro_rules! db_now_ms {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

/// A job that runs on the leader replica only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The core loop (threading, SLA clocks).
    Core,
    /// The outbox sender (digests, alerts).
    Sender,
}

impl Role {
    /// The role's name in logs, the lease log and `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Core => "core",
            Role::Sender => "sender",
        }
    }
}

/// What a lease is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeaseName {
    /// One IMAP folder of one source.
    Folder {
        /// The source name.
        source: String,
        /// The folder name as the server spells it.
        folder: String,
    },
    /// A leader-only job.
    Role(Role),
}

impl LeaseName {
    /// The advisory lock key: the first 8 bytes of a SHA-256 over a prefix and the names, so
    /// every replica derives the same key and other applications' keys are unlikely to collide.
    pub fn key(&self) -> i64 {
        let mut h = Sha256::new();
        match self {
            LeaseName::Folder { source, folder } => {
                h.update(b"frontdesk/folder\0");
                h.update(source.as_bytes());
                h.update(b"\0");
                h.update(folder.as_bytes());
            }
            LeaseName::Role(role) => {
                h.update(b"frontdesk/role\0");
                h.update(role.as_str().as_bytes());
            }
        }
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(first)
    }

    /// `folder`, `core` or `sender`.
    pub fn kind(&self) -> &'static str {
        match self {
            LeaseName::Folder { .. } => "folder",
            LeaseName::Role(role) => role.as_str(),
        }
    }
}

impl std::fmt::Display for LeaseName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseName::Folder { source, folder } => write!(f, "{source}/{folder}"),
            LeaseName::Role(role) => f.write_str(role.as_str()),
        }
    }
}

/// Why a lease could not be taken or is no longer known to be held.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The lease's session failed or could not be opened; the lock is (or will be) released.
    #[error("lease session lost: {0}")]
    Session(#[from] sqlx::Error),
    /// The database did not answer within the lease timeout.
    #[error("lease session did not answer within {0:?}")]
    TimedOut(Duration),
    /// The lease row vanished (the lease log was edited by hand).
    #[error("lease {0} is no longer recorded")]
    Vanished(String),
}

/// Makes leases for one replica; cheap to clone.
#[derive(Clone, Debug)]
pub struct Leases {
    replica: Arc<str>,
    backend: Backend,
    timeout: Duration,
}

#[derive(Clone, Debug)]
enum Backend {
    /// One process per database (SQLite): every lease is always held.
    Single,
    /// Advisory locks on sessions opened with these options.
    Postgres(Arc<PgConnectOptions>),
}

/// How long a lease query may take before the session counts as lost.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(5);

impl Leases {
    /// Leases for the only process on a database: always held.
    pub fn single(replica: &str) -> Leases {
        Leases {
            replica: replica.into(),
            backend: Backend::Single,
            timeout: LEASE_TIMEOUT,
        }
    }

    /// Leases as advisory locks on PostgreSQL sessions opened with `options`.
    pub fn postgres(options: Arc<PgConnectOptions>, replica: &str) -> Leases {
        Leases {
            replica: replica.into(),
            backend: Backend::Postgres(options),
            timeout: LEASE_TIMEOUT,
        }
    }

    /// Leases for the database behind `pool` (its connect options, not its connections).
    pub fn for_pool(pool: &PgPool, replica: &str) -> Leases {
        Leases::postgres(pool.connect_options(), replica)
    }

    /// The same leases with another per-query timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Leases {
        self.timeout = timeout;
        self
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether several replicas may share the database (so leases really exclude).
    pub fn shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// A lease for `name`, not yet taken.
    pub fn lease(&self, name: LeaseName) -> Lease {
        Lease {
            key: name.key(),
            name,
            leases: self.clone(),
            conn: None,
            held: None,
        }
    }
}

/// A lease shared between the task doing the leased work and the loop keeping it.
pub type SharedLease = Arc<tokio::sync::Mutex<Lease>>;

impl super::Store {
    /// Leases on this store for the replica `replica`: advisory locks on PostgreSQL, always held
    /// on SQLite.
    pub fn leases(&self, replica: &str) -> Leases {
        match self.pg_pool() {
            Some(pool) => Leases::for_pool(pool, replica),
            None => Leases::single(replica),
        }
    }

    /// Who holds each lease now; `None` on SQLite, where the one process holds them all.
    pub async fn lease_holders(&self) -> Result<Option<Vec<LeaseHolder>>, super::Error> {
        match self.pg_pool() {
            Some(pool) => Ok(Some(holders(pool).await?)),
            None => Ok(None),
        }
    }
}

/// `/metrics` lines for leases: `frontdesk_lease_holder` per held lease (the database's view,
/// the same on every replica) and `frontdesk_replica_leader` per role (1 when `replica` leads).
pub fn lease_samples(holders: Option<&[LeaseHolder]>, replica: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for role in [Role::Core, Role::Sender] {
        let leads = holders.is_none_or(|hs| {
            hs.iter()
                .any(|h| h.kind == role.as_str() && h.holder == replica)
        });
        out.push(Sample {
            name: "frontdesk_replica_leader",
            labels: vec![
                ("role", role.as_str().to_string()),
                ("replica", replica.to_string()),
            ],
            value: if leads { 1.0 } else { 0.0 },
        });
    }
    for h in holders.unwrap_or_default() {
        out.push(Sample {
            name: "frontdesk_lease_holder",
            labels: vec![
                ("kind", h.kind.clone()),
                ("source", h.source.clone().unwrap_or_default()),
                ("folder", h.folder.clone().unwrap_or_default()),
                ("replica", h.holder.clone()),
            ],
            value: 1.0,
        });
    }
    out
}

/// One lease: taken with [`Lease::try_take`], kept with [`Lease::check`], given back with
/// [`Lease::release`] or by dropping it (the session closes, so the lock goes with it).
#[derive(Debug)]
pub struct Lease {
    name: LeaseName,
    key: i64,
    leases: Leases,
    /// The lease's own session: holds the lock while `held`, is kept for the next attempt
    /// otherwise.
    conn: Option<PgConnection>,
    /// The lease log row while held (0 on SQLite).
    held: Option<i64>,
}

impl Lease {
    /// What the lease is for.
    pub fn name(&self) -> &LeaseName {
        &self.name
    }

    /// Whether this replica held the lease at its last take or check.
    pub fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// Takes the lease if nobody holds it; `Ok(true)` when this replica holds it afterwards.
    /// A held lease is checked instead.
    pub async fn try_take(&mut self) -> Result<bool, LeaseError> {
        if self.held.is_some() {
            return self.check().await.map(|()| true);
        }
        let Backend::Postgres(options) = &self.leases.backend else {
            self.held = Some(0);
            return Ok(true);
        };
        let options = options.clone();
        let result = self.take_pg(&options).await;
        if result.is_err() {
            self.drop_session();
        }
        result
    }

    async fn take_pg(&mut self, options: &PgConnectOptions) -> Result<bool, LeaseError> {
        let t = self.leases.timeout;
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let mut c = within(t, PgConnection::connect_with(options)).await?;
                // A replica whose machine dies without closing its socket keeps its session,
                // and so its locks, until the server notices: by default after two hours of
                // TCP keepalive. These make it about 12 s (5 s idle, then 3 probes 2 s apart;
                // unacknowledged data also gives up after 12 s).
                within(
                    t,
                    sqlx::raw_sql(
                        "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
                         SET tcp_keepalives_count = 3; SET tcp_user_timeout = 12000",
                    )
                    .execute(&mut c),
                )
                .await?;
                c
            }
        };
        let got: bool = within(
            t,
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(self.key)
                .fetch_one(&mut conn),
        )
        .await?;
        if !got {
            self.conn = Some(conn);
            return Ok(false);
        }
        let (source, folder) = match &self.name {
            LeaseName::Folder { source, folder } => (Some(source.as_str()), Some(folder.as_str())),
            LeaseName::Role(_) => (None, None),
        };
        let sql = concat!(
            "INSERT INTO replica_leases ",
            "(lock_key, kind, source, folder, holder, backend_pid, acquired_at, heartbeat_at) ",
            "VALUES ($1, $2, $3, $4, $5, pg_backend_pid(), ",
            db_now_ms!(),
            ", ",
            db_now_ms!(),
            ") RETURNING id"
        );
        let id: i64 = within(
            t,
            sqlx::query_scalar(sql)
                .bind(self.key)
                .bind(self.name.kind())
                .bind(source)
                .bind(folder)
                .bind(&*self.leases.replica)
                .fetch_one(&mut conn),
        )
        .await?;
        self.conn = Some(conn);
        self.held = Some(id);
        tracing::info!(lease = %self.name, replica = %self.leases.replica, "lease taken");
        Ok(true)
    }

    /// Proves the lease still held: a heartbeat on its own session. On an error the lease is
    /// dropped (its session closed) and the caller must stop the leased work at once.
    pub async fn check(&mut self) -> Result<(), LeaseError> {
        let Some(id) = self.held else {
            return Err(LeaseError::Vanished(self.name.to_string()));
        };
        if !self.leases.shared() {
            return Ok(());
        }
        let result = self.heartbeat(id).await;
        if let Err(e) = &result {
            tracing::warn!(lease = %self.name, error = %e, "lease lost; stopping its work");
            self.drop_session();
        }
        result
    }

    async fn heartbeat(&mut self, id: i64) -> Result<(), LeaseError> {
        let t = self.leases.timeout;
        let Some(conn) = self.conn.as_mut() else {
            return Err(LeaseError::Vanished(self.name.to_string()));
        };
        let sql = concat!(
            "UPDATE replica_leases SET heartbeat_at = ",
            db_now_ms!(),
            ", checks = checks + 1 WHERE id = $1 AND backend_pid = pg_backend_pid()"
        );
        let done = within(t, sqlx::query(sql).bind(id).execute(conn)).await?;
        if done.rows_affected() != 1 {
            return Err(LeaseError::Vanished(self.name.to_string()));
        }
        Ok(())
    }

    /// A cheap proof that the lease's session (and so its lock) is alive, without a write: run
    /// before each core step. On an error the lease is dropped, as with [`Lease::check`].
    pub async fn alive(&mut self) -> Result<(), LeaseError> {
        if self.held.is_none() {
            return Err(LeaseError::Vanished(self.name.to_string()));
        }
        if !self.leases.shared() {
            return Ok(());
        }
        let t = self.leases.timeout;
        let result = match self.conn.as_mut() {
            Some(conn) => within(t, sqlx::query("SELECT 1").execute(conn))
                .await
                .map(|_| ()),
            None => Err(LeaseError::Vanished(self.name.to_string())),
        };
        if let Err(e) = &result {
            tracing::warn!(lease = %self.name, error = %e, "lease lost; stopping its work");
            self.drop_session();
        }
        result
    }

    /// Gives the lease back (unlock, record the release) and closes its session.
    pub async fn release(&mut self) {
        let held = self.held.take();
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let t = self.leases.timeout;
        if let Some(id) = held {
            let sql = concat!(
                "UPDATE replica_leases SET released_at = ",
                db_now_ms!(),
                " WHERE id = $1"
            );
            let _ = within(t, sqlx::query(sql).bind(id).execute(&mut conn)).await;
            let _ = within(
                t,
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(self.key)
                    .execute(&mut conn),
            )
            .await;
            tracing::info!(lease = %self.name, "lease released");
        }
        let _ = tokio::time::timeout(t, conn.close()).await;
    }

    /// Forgets the lease; dropping the connection closes its socket, and the server then ends
    /// the session and frees the lock.
    fn drop_session(&mut self) {
        self.held = None;
        self.conn = None;
    }
}

async fn within<T, F>(t: Duration, f: F) -> Result<T, LeaseError>
where
    F: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    match tokio::time::timeout(t, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(LeaseError::TimedOut(t)),
    }
}

/// Who holds a lease now (for `frontdesk sources` and `/metrics`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LeaseHolder {
    /// `folder`, `core` or `sender`.
    pub kind: String,
    /// The source (folder leases).
    pub source: Option<String>,
    /// The folder (folder leases).
    pub folder: Option<String>,
    /// The replica holding it.
    pub holder: String,
    /// When it took the lease (database clock).
    pub since: chrono::DateTime<chrono::Utc>,
    /// Its last heartbeat (database clock).
    pub heartbeat: chrono::DateTime<chrono::Utc>,
}

/// The leases held right now: the lease log joined with the advisory locks PostgreSQL says are
/// granted, so a dead holder's stale row never shows.
pub async fn holders(pool: &PgPool) -> Result<Vec<LeaseHolder>, sqlx::Error> {
    // A bigint advisory key shows in pg_locks as classid (high 32 bits) and objid (low 32 bits)
    // with objsubid 1.
    let rows = sqlx::query(
        "SELECT DISTINCT ON (r.lock_key) r.kind, r.source, r.folder, r.holder, r.acquired_at, \
                r.heartbeat_at \
         FROM replica_leases r \
         JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
              AND l.pid = r.backend_pid \
              AND ((l.classid::bigint << 32) | l.objid::bigint) = r.lock_key \
         WHERE r.released_at IS NULL \
         ORDER BY r.lock_key, r.id DESC",
    )
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(LeaseHolder {
            kind: r.try_get("kind")?,
            source: r.try_get("source")?,
            folder: r.try_get("folder")?,
            holder: r.try_get("holder")?,
            since: super::from_ms(r.try_get("acquired_at")?),
            heartbeat: super::from_ms(r.try_get("heartbeat_at")?),
        });
    }
    out.sort_by(|a, b| (&a.kind, &a.source, &a.folder).cmp(&(&b.kind, &b.source, &b.folder)));
    Ok(out)
}

/// One tenure in the lease log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LeaseTenure {
    /// `folder`, `core` or `sender`.
    pub kind: String,
    /// The source (folder leases).
    pub source: Option<String>,
    /// The folder (folder leases).
    pub folder: Option<String>,
    /// The replica that held it.
    pub holder: String,
    /// Database clock, UTC milliseconds.
    pub acquired_ms: i64,
    /// The last proof of life (database clock, UTC milliseconds): its work started before this.
    pub heartbeat_ms: i64,
    /// Liveness checks passed.
    pub checks: i64,
}

/// Every tenure, oldest first per lease: what proves no two replicas held one lease at once.
pub async fn tenures(pool: &PgPool) -> Result<Vec<LeaseTenure>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT kind, source, folder, holder, acquired_at, heartbeat_at, checks \
         FROM replica_leases ORDER BY lock_key, acquired_at, id",
    )
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(LeaseTenure {
            kind: r.try_get("kind")?,
            source: r.try_get("source")?,
            folder: r.try_get("folder")?,
            holder: r.try_get("holder")?,
            acquired_ms: r.try_get("acquired_at")?,
            heartbeat_ms: r.try_get("heartbeat_at")?,
            checks: r.try_get("checks")?,
        });
    }
    Ok(out)
}

/// Pairs of tenures of one lease whose intervals overlap: a later holder that took the lease
/// before an earlier holder's last heartbeat. Empty when the leases excluded each other.
pub fn overlaps(tenures: &[LeaseTenure]) -> Vec<(LeaseTenure, LeaseTenure)> {
    let mut out = Vec::new();
    for (i, a) in tenures.iter().enumerate() {
        for b in &tenures[i + 1..] {
            let same = a.kind == b.kind && a.source == b.source && a.folder == b.folder;
            let (first, second) = if a.acquired_ms <= b.acquired_ms {
                (a, b)
            } else {
                (b, a)
            };
            if same && second.acquired_ms < first.heartbeat_ms {
                out.push((first.clone(), second.clone()));
            }
        }
    }
    out
}

/// The default replica name: `HOST-PID`, unique per process on one machine and readable.
pub fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        let a = LeaseName::Folder {
            source: "support".into(),
            folder: "INBOX".into(),
        };
        let b = LeaseName::Folder {
            source: "supportI".into(),
            folder: "NBOX".into(),
        };
        assert_eq!(a.key(), a.clone().key());
        assert_ne!(a.key(), b.key());
        assert_ne!(
            LeaseName::Role(Role::Core).key(),
            LeaseName::Role(Role::Sender).key()
        );
        // Pinned: a changed derivation would let an old and a new replica hold one folder.
        assert_eq!(LeaseName::Role(Role::Core).key(), CORE_KEY);
    }

    const CORE_KEY: i64 = -6_778_810_716_064_451_292;

    #[tokio::test]
    async fn single_process_always_holds() {
        let leases = Leases::single("only");
        let mut l = leases.lease(LeaseName::Role(Role::Sender));
        assert!(!l.is_held());
        assert!(matches!(l.check().await, Err(LeaseError::Vanished(_))));
        assert!(l.try_take().await.unwrap());
        l.check().await.unwrap();
        assert!(l.try_take().await.unwrap());
        l.release().await;
    }

    fn tenure(folder: &str, holder: &str, acquired_ms: i64, heartbeat_ms: i64) -> LeaseTenure {
        LeaseTenure {
            kind: "folder".into(),
            source: Some("s".into()),
            folder: Some(folder.into()),
            holder: holder.into(),
            acquired_ms,
            heartbeat_ms,
            checks: 1,
        }
    }

    #[test]
    fn overlaps_compare_one_lease_only() {
        let ok = [
            tenure("INBOX", "a", 0, 100),
            tenure("INBOX", "b", 150, 300),
            tenure("Sent", "b", 50, 400),
        ];
        assert!(overlaps(&ok).is_empty());
        let bad = [tenure("INBOX", "a", 0, 100), tenure("INBOX", "b", 99, 300)];
        assert_eq!(overlaps(&bad).len(), 1);
    }

    #[tokio::test]
    async fn one_holder_and_takeover_after_its_session_dies() {
        let store = crate::store::test_pg::fresh_store().await;
        let pool = store.pg_pool().unwrap().clone();
        assert!(store.leases("a").shared());
        let inbox = LeaseName::Folder {
            source: "support".into(),
            folder: "INBOX".into(),
        };
        let a = Leases::for_pool(&pool, "a");
        let b = Leases::for_pool(&pool, "b");
        let mut la = a.lease(inbox.clone());
        let mut lb = b.lease(inbox.clone());
        assert!(la.try_take().await.unwrap());
        assert!(!lb.try_take().await.unwrap());
        assert!(!lb.try_take().await.unwrap());
        la.check().await.unwrap();
        let held = holders(&pool).await.unwrap();
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(held[0].holder, "a");
        assert_eq!(held[0].folder.as_deref(), Some("INBOX"));

        // The holder's session dies as a SIGKILLed replica's would.
        sqlx::query(
            "SELECT pg_terminate_backend(backend_pid) FROM replica_leases WHERE holder = 'a'",
        )
        .execute(&pool)
        .await
        .unwrap();
        assert!(la.check().await.is_err());
        assert!(!la.is_held());
        let mut taken = false;
        for _ in 0..50 {
            if lb.try_take().await.unwrap() {
                taken = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(taken, "b never took the lease over");
        assert!(!la.try_take().await.unwrap());
        let held = holders(&pool).await.unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].holder, "b");
        lb.check().await.unwrap();
        let log = tenures(&pool).await.unwrap();
        assert_eq!(log.len(), 2);
        assert!(overlaps(&log).is_empty(), "{log:?}");
        lb.release().await;
        assert!(holders(&pool).await.unwrap().is_empty());
        assert!(la.try_take().await.unwrap());
        assert_eq!(store.lease_holders().await.unwrap().unwrap()[0].holder, "a");
    }

    #[tokio::test]
    async fn sqlite_has_no_lease_table_and_always_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("fd.db"))
            .await
            .unwrap();
        let leases = store.leases("only");
        assert!(!leases.shared());
        assert!(store.lease_holders().await.unwrap().is_none());
        let mut l = leases.lease(LeaseName::Role(Role::Core));
        assert!(l.try_take().await.unwrap());
        l.alive().await.unwrap();
        let samples = lease_samples(None, "only");
        assert!(samples.iter().all(|s| s.value == 1.0), "{samples:?}");
    }
}
