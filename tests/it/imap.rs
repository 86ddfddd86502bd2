//! IMAP ingestion against the real Dovecot rig, TLS verified against the rig CA (issue 3).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use frontdesk::config::{self, Config};
use frontdesk::ingest::imap::{self, ImapError, PoisonTracker, SourceCtx};
use frontdesk::store::{MessageFilter, Store};
use tokio_util::sync::CancellationToken;

use crate::rig::Rig;
use crate::support::Backend;

/// A config with one IMAP source `mail` for `user` on the rig; `extra` adds keys to `imap:`.
fn yaml(rig: &Rig, user: &str, dir: &Path, extra: &str) -> String {
    let lines = [
        "storage:".to_string(),
        format!("  sqlite: {}/frontdesk.db", dir.display()),
        "server:".into(),
        "  listen: 127.0.0.1:0".into(),
        "team:".into(),
        "  - name: Team".into(),
        "    email: [team@shop.test]".into(),
        "sources:".into(),
        "  - name: mail".into(),
        "    imap:".into(),
        "      host: localhost".into(),
        format!("      port: {}", rig.imaps_port),
        "      tls: implicit".into(),
        format!("      ca_file: {}", rig.ca.display()),
        format!("      username: {user}"),
        "      password: secret".into(),
        "      timeout: 5s".into(),
    ];
    format!(
        "{}\n{extra}channels:\n  - name: out\n    email: {{ file: \"{dir}/outbox\", from: \"fd@shop.test\", to: [team@shop.test] }}\n",
        lines.join("\n"),
        dir = dir.display(),
    )
}

struct Setup {
    dir: tempfile::TempDir,
    config: Config,
    store: Store,
    /// The PostgreSQL database, when the store is on one.
    pg_url: Option<String>,
}

impl Setup {
    async fn new(rig: &Rig, user: &str, extra: &str) -> Setup {
        Setup::new_on(Backend::Sqlite, rig, user, extra).await
    }

    /// Like `new`, with the store on `backend`.
    async fn new_on(backend: Backend, rig: &Rig, user: &str, extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let text = yaml(rig, user, dir.path(), extra);
        let file = dir.path().join("frontdesk.yaml");
        std::fs::write(&file, &text).unwrap();
        let config = config::load_str(&file, &text)
            .unwrap_or_else(|e| panic!("{e}"))
            .config;
        let (store, pg_url) = match backend {
            Backend::Sqlite => (
                Store::open(&dir.path().join("frontdesk.db")).await.unwrap(),
                None,
            ),
            Backend::Postgres => {
                let url = crate::support::pg_cluster().fresh_database();
                (Store::open_postgres(&url, None).await.unwrap(), Some(url))
            }
        };
        Setup {
            dir,
            config,
            store,
            pg_url,
        }
    }

    fn ctx(&self) -> SourceCtx {
        imap::sources(&self.config, &self.store, None).remove(0)
    }

    async fn sync(&self) -> Result<Vec<imap::FolderReport>, ImapError> {
        imap::sync_once(&self.ctx(), &mut PoisonTracker::default(), &mut |_| {}).await
    }

    async fn inserted(&self) -> u64 {
        self.sync().await.unwrap().iter().map(|r| r.inserted).sum()
    }

    async fn count(&self) -> i64 {
        self.store.message_count().await.unwrap()
    }

    /// A pool of its own on the store's SQLite database.
    async fn sqlite_pool(&self) -> sqlx::SqlitePool {
        frontdesk::store::pool_options::<sqlx::Sqlite>()
            .connect(&format!(
                "sqlite://{}/frontdesk.db",
                self.dir.path().display()
            ))
            .await
            .unwrap()
    }

    /// Runs `sql` on the store's database from a connection of its own.
    async fn execute(&self, sql: &'static str) {
        if let Some(url) = &self.pg_url {
            let pool = frontdesk::store::pool_options::<sqlx::Postgres>()
                .connect(url)
                .await
                .unwrap();
            sqlx::raw_sql(sql).execute(&pool).await.unwrap();
            pool.close().await;
            return;
        }
        let pool = self.sqlite_pool().await;
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }

    /// (message_id, direction, in_reply_to JSON, automation) of every row.
    async fn rows(&self) -> Vec<(Option<String>, String, String, String)> {
        const SQL: &str =
            "SELECT message_id, direction, in_reply_to, automation FROM messages ORDER BY id";
        if let Some(url) = &self.pg_url {
            let pool = frontdesk::store::pool_options::<sqlx::Postgres>()
                .connect(url)
                .await
                .unwrap();
            let rows = sqlx::query_as(SQL).fetch_all(&pool).await.unwrap();
            pool.close().await;
            return rows;
        }
        let pool = self.sqlite_pool().await;
        let rows = sqlx::query_as(SQL).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    }
}

/// The golden corpus minus frontdesk's own digest (the loop guard has its own test), each copy
/// made unique so `n` messages are `n` distinct client messages.
fn varied(n: usize, tag: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/email");
    let mut fixtures: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .filter(|p| !p.to_string_lossy().contains("frontdesk_digest"))
        .collect();
    fixtures.sort();
    let bodies: Vec<Vec<u8>> = fixtures.iter().map(|p| std::fs::read(p).unwrap()).collect();
    (0..n)
        .map(|i| {
            let mut m = format!("X-Test-Seq: {tag}-{i}\r\n").into_bytes();
            m.extend_from_slice(&bodies[i % bodies.len()]);
            m
        })
        .collect()
}

fn simple(i: usize, tag: &str) -> Vec<u8> {
    format!(
        "From: Client {i} <c{i}@client.test>\r\nTo: team@shop.test\r\nSubject: {tag} {i}\r\n\
Message-ID: <{tag}-{i}@client.test>\r\nDate: Tue, 1 Jul 2025 10:00:00 +0000\r\n\r\nbody {i}\r\n"
    )
    .into_bytes()
}

fn no_seen_added(rig: &Rig, user: &str, folder: &str) {
    let flags = rig.flags(user, folder);
    assert!(
        flags.iter().all(|(_, f)| !f.contains("Seen")),
        "\\Seen was added: {flags:?}"
    );
}

#[tokio::test]
async fn five_hundred_varied_messages_exactly_once_then_five_more_sqlite() {
    five_hundred_varied_messages_exactly_once_then_five_more_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn five_hundred_varied_messages_exactly_once_then_five_more_postgres() {
    five_hundred_varied_messages_exactly_once_then_five_more_on(Backend::Postgres).await;
}

async fn five_hundred_varied_messages_exactly_once_then_five_more_on(backend: Backend) {
    let rig = Rig::shared();
    let user = rig.new_mailbox("varied");
    rig.append_many(&user, "INBOX", varied(500, "v"));
    let s = Setup::new_on(
        backend,
        rig,
        &user,
        "      backfill: all\n      batch_size: 64\n",
    )
    .await;

    assert_eq!(s.inserted().await, 500);
    assert_eq!(s.count().await, 500);
    assert_eq!(s.inserted().await, 0, "a second sync adds nothing");
    assert_eq!(s.count().await, 500);

    rig.append_many(&user, "INBOX", (0..5).map(|i| simple(i, "more")));
    assert_eq!(s.inserted().await, 5);
    assert_eq!(s.count().await, 505);

    let ledger = imap::ledger(&s.config, &s.store).await.unwrap();
    assert_eq!(ledger.len(), 1);
    let l = &ledger[0];
    assert_eq!(l.folder.unaccounted, Some(0), "{l:?}");
    assert_eq!(l.folder.server_messages, Some(505));
    assert_eq!(l.folder.ingested, 505);
    assert!(l.healthy);

    // degraded messages are stored, not dropped
    let degraded = s
        .store
        .messages(&MessageFilter {
            source: None,
            limit: Some(1000),
        })
        .await
        .unwrap()
        .iter()
        .filter(|m| m.parse == "degraded")
        .count();
    assert!(degraded >= 25, "{degraded}");

    // the mailbox is untouched: nothing deleted, no \Seen added
    assert_eq!(rig.status(&user, "INBOX").messages, 505);
    no_seen_added(rig, &user, "INBOX");
}

#[tokio::test]
async fn a_batch_failing_to_commit_stops_the_later_ones_and_a_rerun_completes_sqlite() {
    a_batch_failing_to_commit_stops_the_later_ones_and_a_rerun_completes_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_batch_failing_to_commit_stops_the_later_ones_and_a_rerun_completes_postgres() {
    a_batch_failing_to_commit_stops_the_later_ones_and_a_rerun_completes_on(Backend::Postgres)
        .await;
}

/// Batches commit in order, two in flight (one committing, the next staging its bodies): when
/// the sixth batch's transaction fails (a trigger in the real database refuses one of its rows),
/// the five before it are committed, none after it is, and the cursor stops before it. The next
/// sync, with the fault gone, takes the rest exactly once.
async fn a_batch_failing_to_commit_stops_the_later_ones_and_a_rerun_completes_on(backend: Backend) {
    let rig = Rig::shared();
    let user = rig.new_mailbox("commitfail");
    rig.append_many(&user, "INBOX", (0..200).map(|i| simple(i, "cf")));
    let s = Setup::new_on(
        backend,
        rig,
        &user,
        "      backfill: all\n      batch_size: 20\n",
    )
    .await;
    // UID 101 is the first message of the sixth batch (UIDs 101-120)
    let (arm, disarm) = if s.pg_url.is_some() {
        (
            "CREATE FUNCTION refuse_cf_100() RETURNS trigger AS $$ BEGIN \
               IF NEW.message_id = 'cf-100@client.test' THEN RAISE EXCEPTION 'injected fault'; \
               END IF; RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER refuse BEFORE INSERT ON messages FOR EACH ROW \
               EXECUTE FUNCTION refuse_cf_100()",
            "DROP TRIGGER refuse ON messages",
        )
    } else {
        (
            "CREATE TRIGGER refuse BEFORE INSERT ON messages \
               WHEN NEW.message_id = 'cf-100@client.test' \
               BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
            "DROP TRIGGER refuse",
        )
    };
    s.execute(arm).await;

    let err = s.sync().await.expect_err("the sixth batch cannot commit");
    assert!(err.to_string().contains("injected fault"), "{err}");
    assert_eq!(
        s.count().await,
        100,
        "the five batches before it, none after it"
    );
    let cursor = s.store.imap_cursor("mail", "INBOX").await.unwrap().unwrap();
    assert_eq!(cursor.last_uid, 100, "{cursor:?}");

    s.execute(disarm).await;
    assert_eq!(s.inserted().await, 100);
    assert_eq!(s.count().await, 200);
    let ledger = imap::ledger(&s.config, &s.store).await.unwrap();
    assert_eq!(ledger[0].folder.unaccounted, Some(0), "{:?}", ledger[0]);
    assert_eq!(ledger[0].folder.ingested, 200);
}

#[tokio::test]
async fn sources_json_shows_unaccounted_zero() {
    let rig = Rig::shared();
    let user = rig.new_mailbox("ledger");
    rig.append_many(&user, "INBOX", (0..7).map(|i| simple(i, "ledger")));
    let s = Setup::new(rig, &user, "      backfill: all\n").await;
    s.sync().await.unwrap();
    let (code, out, err) = crate::support::frontdesk(
        &[
            "--config",
            s.dir.path().join("frontdesk.yaml").to_str().unwrap(),
            "sources",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let line = &v.as_array().unwrap()[0];
    assert_eq!(line["source"], "mail");
    assert_eq!(line["folder"], "INBOX");
    assert_eq!(line["unaccounted"], 0, "{line}");
    assert_eq!(line["server_messages"], 7);
    assert_eq!(line["ingested"], 7);
    assert_eq!(line["healthy"], true);
}

#[tokio::test]
async fn idle_delivers_an_appended_message_within_two_seconds() {
    let rig = Rig::shared();
    let user = rig.new_mailbox("idle");
    rig.append_many(&user, "INBOX", (0..3).map(|i| simple(i, "idle")));
    let s = Setup::new(rig, &user, "      backfill: all\n").await;
    let core = Arc::new(tokio::sync::Notify::new());
    let stop = CancellationToken::new();
    let task = tokio::spawn(imap::run(s.ctx(), core.clone(), stop.clone()));

    let deadline = Instant::now() + Duration::from_secs(20);
    while s.count().await < 3 {
        assert!(Instant::now() < deadline, "initial sync did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // let the task settle into IDLE
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    rig.append(&user, "INBOX", &simple(99, "idle"));
    while s.count().await < 4 {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "not ingested within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t0.elapsed();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("source task stops on shutdown")
        .unwrap();
    assert!(took < Duration::from_secs(2), "{took:?}");
    no_seen_added(rig, &user, "INBOX");
}

#[tokio::test]
async fn uid_validity_change_loses_nothing_and_duplicates_nothing_sqlite() {
    uid_validity_change_loses_nothing_and_duplicates_nothing_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn uid_validity_change_loses_nothing_and_duplicates_nothing_postgres() {
    uid_validity_change_loses_nothing_and_duplicates_nothing_on(Backend::Postgres).await;
}

async fn uid_validity_change_loses_nothing_and_duplicates_nothing_on(backend: Backend) {
    let rig = Rig::shared();
    let user = rig.new_mailbox("uidv");
    let mut msgs: Vec<Vec<u8>> = (0..95).map(|i| simple(i, "uidv")).collect();
    // five without a Message-ID: fingerprinted by their bytes
    msgs.extend((0..5).map(|i| {
        format!("From: n{i}@client.test\r\nSubject: no id {i}\r\n\r\nbody\r\n").into_bytes()
    }));
    rig.append_many(&user, "INBOX", &msgs);
    let s = Setup::new_on(backend, rig, &user, "      backfill: all\n").await;
    assert_eq!(s.inserted().await, 100);

    let before = rig.status(&user, "INBOX").uid_validity;
    rig.set_uid_validity(&user, "INBOX", before + 1000);
    rig.append_many(&user, "INBOX", (100..105).map(|i| simple(i, "uidv")));

    let reports = s.sync().await.unwrap();
    assert!(reports[0].uid_validity_changed);
    assert_eq!(reports[0].inserted, 5);
    assert_eq!(s.count().await, 105);
    let rows = s.rows().await;
    let mut ids: Vec<_> = rows.iter().map(|r| r.0.clone().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 105, "0 duplicates");

    let events = s
        .store
        .source_events("mail", "uid_validity_changed")
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].1.contains("100 already stored"), "{events:?}");
    assert!(events[0].1.contains("(5 without Message-ID"), "{events:?}");

    assert_eq!(s.inserted().await, 0, "stable after the change");
    let ledger = imap::ledger(&s.config, &s.store).await.unwrap();
    assert_eq!(ledger[0].folder.unaccounted, Some(0), "{:?}", ledger[0]);
    assert_eq!(ledger[0].folder.matched, 100);
    assert_eq!(ledger[0].folder.ingested, 5);
    no_seen_added(rig, &user, "INBOX");
}

#[tokio::test]
async fn sent_reply_is_outbound_and_linked_to_the_client_message_sqlite() {
    sent_reply_is_outbound_and_linked_to_the_client_message_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn sent_reply_is_outbound_and_linked_to_the_client_message_postgres() {
    sent_reply_is_outbound_and_linked_to_the_client_message_on(Backend::Postgres).await;
}

async fn sent_reply_is_outbound_and_linked_to_the_client_message_on(backend: Backend) {
    let rig = Rig::shared();
    let user = rig.new_mailbox("sent");
    rig.append(&user, "INBOX", &simple(1, "ask"));
    rig.append(
        &user,
        "INBOX",
        b"From: Team <Team@Shop.test>\r\nTo: c2@client.test\r\nSubject: we wrote first\r\nMessage-ID: <first@shop.test>\r\n\r\nhello\r\n",
    );
    rig.append(
        &user,
        "Sent",
        b"From: someone@shop.test\r\nTo: c1@client.test\r\nSubject: Re: ask 1\r\nMessage-ID: <reply-1@shop.test>\r\nIn-Reply-To: <ask-1@client.test>\r\n\r\nanswer\r\n",
    );
    let s = Setup::new_on(
        backend,
        rig,
        &user,
        "      backfill: all\n      folders: [{name: INBOX, role: inbound}, {name: Sent, role: sent}]\n",
    )
    .await;
    assert_eq!(s.inserted().await, 3);
    let rows = s.rows().await;
    let by_id = |id: &str| {
        rows.iter()
            .find(|r| r.0.as_deref() == Some(id))
            .unwrap()
            .clone()
    };
    assert_eq!(by_id("ask-1@client.test").1, "inbound");
    let reply = by_id("reply-1@shop.test");
    assert_eq!(reply.1, "outbound");
    assert_eq!(reply.2, r#"["ask-1@client.test"]"#);
    // a team address is outbound wherever it is
    assert_eq!(by_id("first@shop.test").1, "outbound");
}

#[tokio::test]
async fn an_empty_folder_syncs_to_nothing_and_is_fully_accounted_sqlite() {
    an_empty_folder_syncs_to_nothing_and_is_fully_accounted_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn an_empty_folder_syncs_to_nothing_and_is_fully_accounted_postgres() {
    an_empty_folder_syncs_to_nothing_and_is_fully_accounted_on(Backend::Postgres).await;
}

async fn an_empty_folder_syncs_to_nothing_and_is_fully_accounted_on(backend: Backend) {
    let rig = Rig::shared();
    let user = rig.new_mailbox("empty");
    rig.create_folder(&user, "INBOX");
    let s = Setup::new_on(backend, rig, &user, "").await;
    assert_eq!(s.inserted().await, 0);
    assert_eq!(s.inserted().await, 0);
    let l = &imap::ledger(&s.config, &s.store).await.unwrap()[0];
    assert_eq!(
        (l.folder.server_messages, l.folder.unaccounted),
        (Some(0), Some(0))
    );
    rig.append(&user, "INBOX", &simple(1, "empty"));
    assert_eq!(s.inserted().await, 1, "default backfill 30d keeps new mail");
}

#[tokio::test]
async fn own_digests_are_never_ingested_sqlite() {
    own_digests_are_never_ingested_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn own_digests_are_never_ingested_postgres() {
    own_digests_are_never_ingested_on(Backend::Postgres).await;
}

async fn own_digests_are_never_ingested_on(backend: Backend) {
    let rig = Rig::shared();
    let user = rig.new_mailbox("loop");
    let digest = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/email/frontdesk_digest.eml"),
    )
    .unwrap();
    rig.append(&user, "INBOX", &digest);
    rig.append(&user, "INBOX", &simple(1, "loop"));
    let s = Setup::new_on(backend, rig, &user, "      backfill: all\n").await;
    assert_eq!(s.inserted().await, 1);
    let ledger = imap::ledger(&s.config, &s.store).await.unwrap();
    assert_eq!(ledger[0].folder.own, 1);
    assert_eq!(ledger[0].folder.unaccounted, Some(0));
}

#[tokio::test]
async fn backfill_duration_and_none_skip_old_mail_and_count_it_sqlite() {
    backfill_duration_and_none_skip_old_mail_and_count_it_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn backfill_duration_and_none_skip_old_mail_and_count_it_postgres() {
    backfill_duration_and_none_skip_old_mail_and_count_it_on(Backend::Postgres).await;
}

async fn backfill_duration_and_none_skip_old_mail_and_count_it_on(backend: Backend) {
    let rig = Rig::shared();
    let old = SystemTime::now() - Duration::from_secs(60 * 86400);
    let recent = SystemTime::now() - Duration::from_secs(86400);
    let dated = |tag: &str| -> Vec<(Vec<u8>, Option<SystemTime>)> {
        (0..5)
            .map(|i| (simple(i, tag), Some(if i < 3 { old } else { recent })))
            .collect()
    };

    let user = rig.new_mailbox("bf");
    rig.append_many_dated(&user, "INBOX", dated("bf"));
    let s = Setup::new_on(backend, rig, &user, "      backfill: 30d\n").await;
    assert_eq!(s.inserted().await, 2);
    let l = &imap::ledger(&s.config, &s.store).await.unwrap()[0];
    assert_eq!(
        (l.folder.skipped_backfill, l.folder.unaccounted),
        (3, Some(0))
    );

    let user = rig.new_mailbox("bfnone");
    rig.append_many_dated(&user, "INBOX", dated("bfnone"));
    let s = Setup::new_on(backend, rig, &user, "      backfill: none\n").await;
    assert_eq!(s.inserted().await, 0);
    rig.append(&user, "INBOX", &simple(9, "bfnone"));
    assert_eq!(s.inserted().await, 1);
    let l = &imap::ledger(&s.config, &s.store).await.unwrap()[0];
    assert_eq!(
        (l.folder.skipped_backfill, l.folder.unaccounted),
        (5, Some(0))
    );
}

/// The receipt time is the server's INTERNALDATE whether the first listing read the dates (a
/// backfill cutoff compares them) or only the fetch did (`backfill: all` lists without them).
#[tokio::test]
async fn the_receipt_time_is_the_internaldate_whether_or_not_the_listing_reads_it() {
    let rig = Rig::shared();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // whole seconds (an mtime's fraction is not in INTERNALDATE), a few days apart
    let dates: Vec<u64> = (0..4).map(|i| now - 86_400 * (i + 1) - 7 * i).collect();
    for (tag, backfill) in [("rtall", "all"), ("rt30d", "30d")] {
        let user = rig.new_mailbox(tag);
        rig.append_many_dated(
            &user,
            "INBOX",
            dates.iter().enumerate().map(|(i, d)| {
                (
                    simple(i, tag),
                    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(*d)),
                )
            }),
        );
        let s = Setup::new(rig, &user, &format!("      backfill: {backfill}\n")).await;
        assert_eq!(s.inserted().await, 4, "{backfill}");
        let pool = s.sqlite_pool().await;
        let got: Vec<i64> = sqlx::query_scalar("SELECT received_at FROM messages ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        let want: Vec<i64> = dates.iter().map(|d| *d as i64 * 1000).collect();
        assert_eq!(got, want, "backfill: {backfill}");
    }
}

#[tokio::test]
async fn starttls_works_and_wrong_password_is_a_clear_error() {
    let rig = Rig::shared();
    let user = rig.new_mailbox("tls");
    rig.append(&user, "INBOX", &simple(1, "tls"));
    let s = Setup::new(rig, &user, "      backfill: all\n").await;
    // STARTTLS on the plain port, verified against the same CA
    let mut ctx = s.ctx();
    ctx.cfg.tls = config::TlsMode::Starttls;
    ctx.cfg.port = rig.imap_port;
    let reports = imap::sync_once(&ctx, &mut PoisonTracker::default(), &mut |_| {})
        .await
        .unwrap();
    assert_eq!(reports[0].inserted, 1);

    // wrong password: the CLI names the source and the refusal
    let file = s.dir.path().join("frontdesk.yaml");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("password: secret", "password: wrong");
    std::fs::write(&file, text).unwrap();
    let (code, _, err) =
        crate::support::frontdesk(&["--config", file.to_str().unwrap(), "sync"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("source mail:"), "{err}");
    assert!(err.contains(&format!("login as {user} refused")), "{err}");
    let health = s.store.source_health().await.unwrap();
    assert!(!health[0].healthy, "{health:?}");
    assert!(
        health[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("refused")
    );
}

#[tokio::test]
async fn untrusted_certificate_is_refused() {
    let rig = Rig::shared();
    let user = rig.new_mailbox("untrusted");
    let s = Setup::new(rig, &user, "").await;
    let mut ctx = s.ctx();
    ctx.cfg.ca_file = Some(rig.other_ca.clone());
    let err = imap::sync_once(&ctx, &mut PoisonTracker::default(), &mut |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, ImapError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert_eq!(s.count().await, 0);
}

#[tokio::test]
async fn unreachable_host_retries_with_backoff_and_turns_unhealthy_sqlite() {
    unreachable_host_retries_with_backoff_and_turns_unhealthy_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn unreachable_host_retries_with_backoff_and_turns_unhealthy_postgres() {
    unreachable_host_retries_with_backoff_and_turns_unhealthy_on(Backend::Postgres).await;
}

async fn unreachable_host_retries_with_backoff_and_turns_unhealthy_on(backend: Backend) {
    let rig = Rig::shared();
    let user = rig.new_mailbox("down");
    let s = Setup::new_on(backend, rig, &user, "").await;
    let mut ctx = s.ctx();
    ctx.cfg.port = crate::support::free_port(); // nothing listens there
    let stop = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(imap::run(
        ctx,
        Arc::new(tokio::sync::Notify::new()),
        stop.clone(),
    ));
    // backoff 0.5-1 s, 1-2 s, ...: the third failure comes within about 4 s
    let health = loop {
        let h = s.store.source_health().await.unwrap();
        if h.first().is_some_and(|h| h.failures >= 3) {
            break h.remove_first();
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{h:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        started.elapsed() > Duration::from_millis(1400),
        "retries are spaced out"
    );
    assert!(!health.healthy);
    assert!(
        health
            .last_error
            .as_deref()
            .unwrap()
            .contains("cannot connect"),
        "{health:?}"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

trait RemoveFirst<T> {
    fn remove_first(self) -> T;
}
impl<T> RemoveFirst<T> for Vec<T> {
    fn remove_first(mut self) -> T {
        self.remove(0)
    }
}

/// A server that accepts and then says nothing more after `greeting`.
async fn silent_server(greeting: &'static [u8]) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = sock.write_all(greeting).await;
                let mut buf = [0u8; 1024];
                while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    port
}

#[tokio::test]
async fn a_silent_server_times_out_instead_of_hanging() {
    let rig = Rig::shared();
    let user = rig.new_mailbox("silent");
    let s = Setup::new(rig, &user, "").await;
    for (greeting, tls, expect) in [
        (
            &b""[..],
            config::TlsMode::Implicit,
            "tls handshake timed out",
        ),
        (&b""[..], config::TlsMode::None, "greeting timed out"),
        (
            &b"* OK ready\r\n"[..],
            config::TlsMode::None,
            "login timed out",
        ),
    ] {
        let mut ctx = s.ctx();
        ctx.cfg.port = silent_server(greeting).await;
        ctx.cfg.tls = tls;
        ctx.cfg.host = "127.0.0.1".into();
        ctx.cfg.timeout = Duration::from_secs(1);
        let t0 = Instant::now();
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            imap::sync_once(&ctx, &mut PoisonTracker::default(), &mut |_| {}),
        )
        .await
        .expect("hangs")
        .unwrap_err();
        assert!(err.to_string().contains(expect), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    }
}

#[tokio::test]
async fn dovecot_restart_during_a_2000_message_sync_loses_and_duplicates_nothing() {
    let rig = Rig::start(); // its own Dovecot: this test stops it
    rig.append_many("alice", "INBOX", (0..2000).map(|i| simple(i, "restart")));
    let s = Setup::new(&rig, "alice", "      backfill: all\n      batch_size: 25\n").await;
    let stop = CancellationToken::new();
    let task = tokio::spawn(imap::run(
        s.ctx(),
        Arc::new(tokio::sync::Notify::new()),
        stop.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.count().await < 200 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rig.stop_dovecot();
    let during = s.count().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.start_dovecot();
    while s.count().await < 2000 {
        assert!(Instant::now() < deadline, "stuck at {}", s.count().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert!(during < 2000, "the restart happened mid-sync ({during})");
    assert_eq!(s.count().await, 2000);
    let rows = s.rows().await;
    let mut ids: Vec<_> = rows.iter().map(|r| r.0.clone().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2000);
    let h = s.store.source_health().await.unwrap();
    assert!(h[0].healthy, "healthy again after reconnecting: {h:?}");
    assert_eq!(rig.status("alice", "INBOX").messages, 2000);
    no_seen_added(&rig, "alice", "INBOX");
}

#[tokio::test]
async fn sigkill_during_sync_then_restart_gives_exactly_2000() {
    let rig = Rig::shared();
    let user = rig.new_mailbox("kill");
    rig.append_many(&user, "INBOX", (0..2000).map(|i| simple(i, "kill")));
    let s = Setup::new(rig, &user, "      backfill: all\n      batch_size: 20\n").await;
    let file = s.dir.path().join("frontdesk.yaml");
    let mut child = std::process::Command::new(crate::support::bin())
        .args(["--config", file.to_str().unwrap(), "sync"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.count().await < 300 {
        assert!(Instant::now() < deadline);
        assert!(
            child.try_wait().unwrap().is_none(),
            "sync ended before the kill"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = s.count().await;
    assert!(at_kill < 2000, "{at_kill}");

    let (code, _, err) =
        crate::support::frontdesk(&["--config", file.to_str().unwrap(), "sync"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(s.count().await, 2000);
    let ledger = imap::ledger(&s.config, &s.store).await.unwrap();
    assert_eq!(ledger[0].folder.unaccounted, Some(0));
    assert_eq!(ledger[0].folder.ingested, 2000);
    no_seen_added(rig, &user, "INBOX");
}

#[tokio::test]
async fn frontdesk_run_ingests_new_mail_within_two_seconds_and_stops_cleanly() {
    let rig = Rig::shared();
    let user = rig.new_mailbox("daemon");
    rig.append(&user, "INBOX", &simple(0, "daemon"));
    let text = yaml(rig, &user, Path::new("{dir}"), "      backfill: all\n")
        .replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:{port}");
    let mut d = crate::support::TestDaemon::start(&text);
    let store = Store::open(&d.db()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.message_count().await.unwrap() < 1 {
        assert!(Instant::now() < deadline, "{}", d.log.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // into IDLE
    let t0 = Instant::now();
    rig.append(&user, "INBOX", &simple(1, "daemon"));
    while store.message_count().await.unwrap() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "not ingested within 2 s: {}",
            d.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, took) = d.signal_and_wait(15, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", d.log.lock().unwrap());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    no_seen_added(rig, &user, "INBOX");
}

/// A message Dovecot cannot read (its Maildir file made unreadable: every FETCH of it answers
/// `NO [SERVERBUG] Internal error`) fails every `frontdesk sync` run, and each run is a new
/// process. The failure counts are kept in the store, so after a few runs it is quarantined,
/// the other messages are stored and nothing is unaccounted.
#[tokio::test]
async fn a_message_failing_on_every_sync_run_is_quarantined_after_a_few_runs() {
    use std::os::unix::fs::PermissionsExt;
    let rig = Rig::shared();
    let user = rig.new_mailbox("poison");
    // saved through Dovecot, so the sizes are in the file names and the index: opening the
    // folder then reads no message file, only fetching the body does
    for i in 0..3 {
        rig.append(&user, "INBOX", &simple(i, "poison"));
    }
    let s = Setup::new(rig, &user, "      backfill: all\n").await;
    let maildir = rig.mail_dir.join(&user).join("Maildir");
    let file = ["cur", "new"]
        .iter()
        .flat_map(|d| std::fs::read_dir(maildir.join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("<poison-1@client.test>")))
        .expect("the second message's file");
    // root owns it now and nobody may read it: Dovecot's mail processes run as nobody
    std::os::unix::fs::chown(&file, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();

    let config = s.dir.path().join("frontdesk.yaml");
    let run = |args: &[&str]| {
        let mut all = vec!["--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        crate::support::frontdesk(&all, &[])
    };
    let mut failed_runs = 0;
    let mut last_err = String::new();
    for _ in 0..6 {
        let (code, _, err) = run(&["sync"]);
        if code == 0 {
            break;
        }
        failed_runs += 1;
        last_err = err;
    }
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();

    assert!(
        (1..=4).contains(&failed_runs),
        "{failed_runs} failed runs before the quarantine; last: {last_err}"
    );
    let (code, out, err) = run(&["sources", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let line = &v.as_array().unwrap()[0];
    assert_eq!(line["quarantined"], 1, "{line}");
    assert_eq!(line["ingested"], 2, "{line}");
    assert_eq!(line["last_uid"], 3, "{line}");
    assert_eq!(line["unaccounted"], 0, "{line}");
    // the failure counts are gone once the cursor passed the UID
    assert!(
        s.store
            .imap_poison(
                "mail",
                "INBOX",
                line["uid_validity"].as_u64().unwrap() as u32
            )
            .await
            .unwrap()
            .is_empty()
    );

    // The file is readable again. Within the hour after its quarantine a pass leaves the
    // message alone; once that hour has gone by (aged here), the pass fetches it again, stores
    // it and ends its quarantine.
    let (code, _, err) = run(&["sync"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("fetched on a retry"), "{err}");
    let pool = crate::support::open_sqlite(&s.dir.path().join("frontdesk.db"), false)
        .await
        .unwrap();
    sqlx::query("UPDATE imap_accounted SET at = at - 7200000")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let (code, _, err) = run(&["sync"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("fetched on a retry"), "{err}");
    let (code, out, err) = run(&["sources", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let line = &v.as_array().unwrap()[0];
    assert_eq!(line["quarantined"], 0, "{line}");
    assert_eq!(line["ingested"], 3, "{line}");
    assert_eq!(line["unaccounted"], 0, "{line}");
}

/// A message refused for its size is quarantined unfetched and counted; once `max_message_size`
/// is raised to fit it, the next pass fetches it, stores it and ends its quarantine, without
/// waiting the hour a failed fetch waits (regression: it stayed quarantined for good).
#[tokio::test]
async fn a_message_refused_as_too_large_is_fetched_once_the_limit_is_raised() {
    let rig = Rig::shared();
    let user = rig.new_mailbox("toolarge");
    rig.append(&user, "INBOX", &simple(0, "big"));
    let mut large = simple(1, "big");
    large.extend(
        std::iter::repeat_n(
            b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab\r\n".as_slice(),
            1000,
        )
        .flatten(),
    );
    rig.append(&user, "INBOX", &large);
    rig.append(&user, "INBOX", &simple(2, "big"));
    let s = Setup::new(
        rig,
        &user,
        "      backfill: all\n      max_message_size: 32KiB\n",
    )
    .await;
    let config = s.dir.path().join("frontdesk.yaml");
    let run = |args: &[&str]| {
        let mut all = vec!["--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        crate::support::frontdesk(&all, &[])
    };
    // (ingested, quarantined, unaccounted) in the folder's ledger line
    let ledger_counts = || {
        let (code, out, err) = run(&["sources", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let line = &v.as_array().unwrap()[0];
        let count = |field: &str| line[field].as_u64().unwrap_or_else(|| panic!("{line}"));
        (
            count("ingested"),
            count("quarantined"),
            count("unaccounted"),
        )
    };
    let (code, _, err) = run(&["sync"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ledger_counts(), (2, 1, 0));
    // a pass under the same limit leaves it alone
    let (code, _, err) = run(&["sync"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("fetched on a retry"), "{err}");

    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("max_message_size: 32KiB", "max_message_size: 1MiB"),
    )
    .unwrap();
    let (code, _, err) = run(&["sync"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("fetched on a retry"), "{err}");
    assert_eq!(ledger_counts(), (3, 0, 0));
    let raw: Vec<(String, i64)> = sqlx::query_as(
        "SELECT message_id, length(raw) + coalesce(body_len, 0) FROM messages ORDER BY id",
    )
    .fetch_all(
        &crate::support::open_sqlite(&s.dir.path().join("frontdesk.db"), false)
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    let ids: Vec<&str> = raw.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        ids,
        [
            "big-0@client.test",
            "big-2@client.test",
            "big-1@client.test"
        ]
    );
    assert!(raw[2].1 > 32 * 1024, "{raw:?}");
    no_seen_added(rig, &user, "INBOX");
}

/// A sync's batches commit without an fsync each (the cursor commits with them, so a power loss
/// only means fetching the last batches again); the pass ends with one. So when `sync` reports a
/// folder, every WAL frame written for it is on disk: checked on the syscalls, as D2 does for
/// webhooks. (The ledger's reconcile commits after the pass with `FULL`, which would sync them as
/// well; this checks the promise, whichever write keeps it.) Skipped when strace is not installed.
#[tokio::test]
async fn sync_reports_a_folder_only_after_its_wal_frames_are_synced() {
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("skipping fsync audit: strace not installed");
        return;
    }
    let rig = Rig::shared();
    let user = rig.new_mailbox("durable");
    rig.append_many(&user, "INBOX", (0..300).map(|i| simple(i, "durable")));
    let s = Setup::new(rig, &user, "      backfill: all\n      batch_size: 20\n").await;
    let file = s.dir.path().join("frontdesk.yaml");
    let trace = s.dir.path().join("trace.txt");
    let out = std::process::Command::new("strace")
        .args(["-f", "-yy", "-s", "200", "-e"])
        .arg("trace=pwrite64,fdatasync,fsync,write")
        .arg("-o")
        .arg(&trace)
        .arg("--")
        .arg(crate::support::bin())
        .args(["--config", file.to_str().unwrap(), "sync"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(s.count().await, 300);

    let text = std::fs::read_to_string(&trace).unwrap();
    // strace -f splits a call that another thread interrupts into "<unfinished ...>" and
    // "<... resumed>" lines: a sync counts once it has returned
    let mut syncing_wal = HashSet::new();
    let (mut wal_writes, mut unsynced, mut reports) = (0, false, 0);
    for line in text.lines() {
        let pid = line.split_whitespace().next().unwrap_or_default();
        let is_sync = line.contains("fdatasync(") || line.contains("fsync(");
        if line.contains("pwrite64(") && line.contains("-wal>") {
            wal_writes += 1;
            unsynced = true;
        } else if is_sync && line.contains("-wal>") {
            if line.contains("<unfinished") {
                syncing_wal.insert(pid.to_string());
            } else {
                unsynced = false;
            }
        } else if line.contains("sync resumed>") && syncing_wal.remove(pid) {
            unsynced = false;
        } else if line.contains("write(1<") && line.contains(" new, ") {
            reports += 1;
            assert!(
                !unsynced,
                "the folder was reported with WAL frames not yet synced:\n{line}"
            );
        }
    }
    assert_eq!(reports, 1, "one folder reported:\n{text}");
    assert!(wal_writes > 0, "no WAL write traced:\n{text}");
}
