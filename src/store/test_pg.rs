//! A private PostgreSQL cluster for the unit tests (tests/servers/pg.sh), started once per test
//! process on first use and stopped by the script when the process exits; each test gets a
//! fresh database in it.

use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;

use super::Store;

/// The path of tests/servers/pg.sh.
pub(crate) const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/servers/pg.sh");

/// Starts a cluster owned by this process with `settings` (`NAME=VALUE`); returns (dir, URL).
pub(crate) fn start_cluster(settings: &[&str]) -> (String, String) {
    let env = start_cluster_with(settings, &[]);
    (env("PG_DIR="), env("PG_URL="))
}

/// Starts a cluster with `settings` and extra `pg.sh start` flags; returns its printed env.
pub(crate) fn start_cluster_with(settings: &[&str], flags: &[&str]) -> impl Fn(&str) -> String {
    let mut cmd = Command::new(SCRIPT);
    cmd.arg("start")
        .arg("--owner")
        .arg(std::process::id().to_string())
        .args(flags);
    for s in settings {
        cmd.arg("--set").arg(s);
    }
    let out = cmd.output().expect("run tests/servers/pg.sh");
    assert!(
        out.status.success(),
        "pg.sh start failed (needs Debian postgresql 15): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    move |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .expect("pg.sh prints its env")
            .to_string()
    }
}

/// `postgres://postgres@127.0.0.1:PORT/postgres` of this process's shared cluster.
pub(crate) fn cluster_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| start_cluster(&[]).1)
}

/// The URL of a new, empty database in this process's cluster.
pub(crate) async fn fresh_url() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = cluster_url();
    let name = format!(
        "unit_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = sqlx::PgConnection::connect(base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let root = base.rsplit_once('/').unwrap().0;
    format!("{root}/{name}")
}

/// A store on a new, empty PostgreSQL database.
pub(crate) async fn fresh_store() -> Store {
    Store::open_postgres(&fresh_url().await, None)
        .await
        .unwrap()
}

/// Generates `NAME::sqlite` and `NAME::postgres` tests from `async fn NAME(store: Store)`.
macro_rules! store_tests {
    ($($(#[$m:meta])* async fn $name:ident($store:ident: Store) $body:block)*) => {$(
        $(#[$m])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($store: Store) $body

            #[tokio::test]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                run(Store::open(&dir.path().join("q.db")).await.unwrap()).await;
            }

            #[tokio::test]
            async fn postgres() {
                run($crate::store::test_pg::fresh_store().await).await;
            }
        }
    )*};
}
