//! Shared test scaffolding: a frontdesk daemon in a temp directory on a free loopback port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The frontdesk binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_frontdesk"))
}

/// A port that was free a moment ago on 127.0.0.1.
///
/// Never the same port twice in one test process: tests run in parallel, and between this call
/// and the server binding the port another test could be handed it too. Both servers then "start"
/// (the readiness probe reaches the other one), and one test talks to the other's server until
/// that goes away (seen in CI: a digest test's SMTP server refused the daemon's connection).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Runs `frontdesk ARGS` to completion, returning (exit code, stdout, stderr).
pub fn frontdesk(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove("FRONTDESK_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A daemon started from a config template in its own temp directory.
pub struct TestDaemon {
    child: Option<Child>,
    /// The HTTP port.
    pub port: u16,
    /// The state directory (also holds the config).
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// Everything the daemon wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
    env: Vec<(String, String)>,
}

impl TestDaemon {
    /// Writes `yaml` (with `{port}` and `{dir}` substituted) and starts `frontdesk run`.
    pub fn start(yaml: &str) -> TestDaemon {
        Self::start_with(yaml, &[], tempfile::tempdir().unwrap())
    }

    /// Like `start`, with extra environment variables and a given state directory.
    pub fn start_with(yaml: &str, env: &[(&str, &str)], dir: tempfile::TempDir) -> TestDaemon {
        let port = free_port();
        let text = yaml
            .replace("{port}", &port.to_string())
            .replace("{dir}", dir.path().to_str().unwrap());
        let config = dir.path().join("frontdesk.yaml");
        std::fs::write(&config, text).unwrap();
        let mut d = TestDaemon {
            child: None,
            port,
            dir,
            config,
            log: Arc::new(Mutex::new(String::new())),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.spawn();
        d
    }

    /// Starts (or restarts) the process and waits until `/healthz` answers.
    pub fn spawn(&mut self) {
        let mut child = Command::new(bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("FRONTDESK_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
            }
        });
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(20));
    }

    fn wait_healthy(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(self.port, "/healthz") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                // Let the reader thread drain what the process wrote before it died.
                std::thread::sleep(Duration::from_millis(200));
                let log = self.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
                panic!("daemon exited with {status}:\n{log}");
            }
            assert!(
                start.elapsed() < limit,
                "daemon not healthy after {limit:?}:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `signal` and waits up to `limit` for the exit; returns the status and the wait.
    pub fn signal_and_wait(&mut self, signal: i32, limit: Duration) -> (ExitStatus, Duration) {
        let pid = self.pid() as i32;
        let start = Instant::now();
        send_signal(pid, signal);
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < limit,
                "daemon still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The database path used by the test configs.
    pub fn db(&self) -> PathBuf {
        self.dir.path().join("frontdesk.db")
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// kill(2) through the `kill` command, keeping the test crate free of unsafe code and libc.
pub fn send_signal(pid: i32, signal: i32) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A minimal HTTP/1.1 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_request(port, "GET", path, &[], b"")
}

/// A minimal HTTP/1.1 request on loopback with `Connection: close`: (status, body).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:?}")))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

/// Writes `text` to `dir/name` with `mode`, returning the path.
pub fn write_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// True when `scripts/reliability` runs the long versions (`FRONTDESK_RELIABILITY=long`).
pub fn long_run() -> bool {
    std::env::var("FRONTDESK_RELIABILITY").is_ok_and(|v| v == "long")
}

/// Prints one result row for `scripts/reliability` (it collects the `FIGURE` lines).
pub fn figure(suite: &str, params: &str, result: &str) {
    println!("FIGURE\t{suite}\t{params}\t{result}");
}

/// This test process's private PostgreSQL cluster (tests/servers/pg.sh), started on first use
/// and stopped by the script once the process has exited.
pub struct PgCluster {
    /// The cluster's directory (for `pg.sh crash|restart|stop DIR`).
    pub dir: PathBuf,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub url: String,
}

/// The path of tests/servers/pg.sh.
pub fn pg_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/pg.sh")
}

/// Starts a private cluster owned by this process; `settings` are `NAME=VALUE` server settings.
pub fn start_pg_cluster(settings: &[&str]) -> PgCluster {
    let mut cmd = Command::new(pg_script());
    cmd.arg("start")
        .arg("--owner")
        .arg(std::process::id().to_string());
    for s in settings {
        cmd.arg("--set").arg(s);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pg.sh start failed (needs Debian postgresql 15): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("pg.sh did not print {k}"))
            .to_string()
    };
    PgCluster {
        dir: PathBuf::from(get("PG_DIR=")),
        url: get("PG_URL="),
    }
}

/// The cluster shared by every test of this process.
pub fn pg_cluster() -> &'static PgCluster {
    static SHARED: std::sync::OnceLock<PgCluster> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| start_pg_cluster(&[]))
}

impl PgCluster {
    /// Creates a new, empty database and returns its URL.
    pub fn fresh_database(&self) -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "it_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let out = Command::new("psql")
            .arg(&self.url)
            .args(["-v", "ON_ERROR_STOP=1", "-qc"])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "CREATE DATABASE failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let root = self.url.rsplit_once('/').unwrap().0;
        format!("{root}/{name}")
    }

    /// Runs `pg.sh CMD DIR` (`crash`, `restart`).
    pub fn control(&self, cmd: &str) {
        let out = Command::new(pg_script())
            .arg(cmd)
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg.sh {cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Which database a test daemon or store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in the test's directory.
    Sqlite,
    /// A fresh database in this process's PostgreSQL cluster.
    Postgres,
}

impl Backend {
    /// The `storage:` block for a config: `sqlite: PATH` or `postgres: URL` (a fresh database).
    pub fn storage_yaml(self, sqlite_path: &Path) -> String {
        match self {
            Backend::Sqlite => format!("storage:\n  sqlite: {}\n", sqlite_path.display()),
            Backend::Postgres => {
                format!("storage:\n  postgres: {}\n", pg_cluster().fresh_database())
            }
        }
    }
}

/// The test FUSE filesystem of D3 (tests/servers/lazyfs.py) mounted over a backing directory.
pub struct LazyFs {
    backing: PathBuf,
    mnt: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl LazyFs {
    /// Mounts the filesystem at `mnt` over `backing`, logging to `log`.
    pub fn mount(backing: &Path, mnt: &Path, log: &Path) -> LazyFs {
        let mut fs = LazyFs {
            backing: backing.to_path_buf(),
            mnt: mnt.to_path_buf(),
            log: log.to_path_buf(),
            child: None,
        };
        fs.remount();
        fs
    }

    fn mounted(&self) -> bool {
        std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(self.mnt.to_str().unwrap()))
    }

    /// Mounts it again (after `power_cut`).
    pub fn remount(&mut self) {
        let python = std::env::var("FRONTDESK_FUSE_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/lazyfs.py");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(python)
            .arg(script)
            .arg(&self.backing)
            .arg(&self.mnt)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.mounted() {
            assert!(
                Instant::now() < deadline,
                "lazyfs did not mount: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Power cut: every unsynced write is dropped, then the filesystem is unmounted (the
    /// backing directory keeps only what was fsync'd).
    pub fn power_cut(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let before = std::fs::read_to_string(&self.log).unwrap_or_default().len();
        let _ = Command::new("kill")
            .arg("-USR1")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&self.log).unwrap_or_default()[before..]
            .find("dropped")
            .is_none()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.mounted() {
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok && Instant::now() > deadline {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Writes dropped by the power cuts so far, from the filesystem's log.
    pub fn dropped_writes(&self) -> u64 {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("dropped "))
            .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if self.mounted() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// (origin JSON, message_id, raw bytes) of every stored message in id order, each body read the
/// way the on-disk contract says: from `raw`, or from `<db>-bodies` at [body_at, body_at +
/// body_len) when the row points there. Panics on a body that does not match its digest
/// (`xxh3-128:<hex>`).
pub async fn stored_messages(db: &Path) -> Vec<(String, Option<String>, Vec<u8>)> {
    let pool = open_sqlite(db, true).await.unwrap();
    // origin, message_id, raw, raw_digest, body_at, body_len
    type Row = (
        String,
        Option<String>,
        Vec<u8>,
        String,
        Option<i64>,
        Option<i64>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT origin, message_id, raw, raw_digest, body_at, body_len FROM messages ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let mut bodies_path = db.as_os_str().to_owned();
    bodies_path.push("-bodies");
    let bodies = std::fs::read(&bodies_path).unwrap_or_default();
    rows.into_iter()
        .map(|(origin, id, raw, digest, at, len)| {
            let raw = match (at, len) {
                (Some(at), Some(len)) => {
                    assert!(raw.is_empty(), "a row with a body_at keeps raw empty");
                    let (at, len) = (at as usize, len as usize);
                    bodies
                        .get(at..at + len)
                        .unwrap_or_else(|| panic!("body past the end of {bodies_path:?}"))
                        .to_vec()
                }
                (None, None) => raw,
                other => panic!("half a body place: {other:?}"),
            };
            assert_eq!(
                format!("xxh3-128:{:032x}", xxhash_rust::xxh3::xxh3_128(&raw)),
                digest,
                "body of {origin}"
            );
            (origin, id, raw)
        })
        .collect()
}

/// A one-connection pool on the SQLite file `db`, as the tests read a daemon's store. Read-only
/// leaves unsynced writes unsynced; read-write opens as a restarted daemon would (WAL recovery
/// may write, and the last connection to close checkpoints, which syncs).
pub async fn open_sqlite(db: &Path, read_only: bool) -> Result<sqlx::SqlitePool, sqlx::Error> {
    frontdesk::store::pool_options::<sqlx::Sqlite>()
        .max_connections(1)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(db)
                .read_only(read_only),
        )
        .await
}
