//! Store invariants: one row per origin; nothing partial survives a SIGKILL; commits survive.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use chrono::{TimeZone, Utc};

use super::*;
use crate::message::{Address, Automation, Direction, Message, Origin, ParseStatus};

fn msg(source: &str, id: &str, body: &str) -> Message {
    Message {
        source: source.into(),
        origin: Origin::Webhook {
            delivery_id: id.into(),
        },
        direction: Direction::Inbound,
        received_at: Utc.with_ymd_and_hms(2026, 11, 26, 9, 0, 0).unwrap(),
        sent_at: None,
        from: Some(Address {
            name: Some("Ann".into()),
            addr: "ann@example.org".into(),
        }),
        to: vec![],
        subject: Some(format!("subject {id}")),
        text: Some(body.into()),
        message_id: None,
        in_reply_to: vec![],
        references: vec![],
        thread_key: None,
        automation: Automation::Human,
        parse: ParseStatus::Ok,
        raw: body.as_bytes().to_vec(),
    }
}

#[tokio::test]
async fn durability_pragmas_are_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("q.db")).await.unwrap();
    let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
        .fetch_one(&store.sqlite().unwrap().writer)
        .await
        .unwrap();
    let (sync,): (i64,) = sqlx::query_as("PRAGMA synchronous")
        .fetch_one(&store.sqlite().unwrap().writer)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(sync, 2, "synchronous must be FULL");
}

/// Regression (a test hung 16 minutes at 100% CPU in sqlx's pool maintenance task,
/// transact-rs/sqlx#3645): no pool of the store gives sqlx a reason to spawn that task.
#[tokio::test]
async fn no_pool_runs_sqlx_maintenance_task() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("q.db")).await.unwrap();
    let db = store.sqlite().unwrap();
    for (name, options) in [
        ("writer", db.writer.options()),
        ("reader", db.reader.options()),
    ] {
        assert_eq!(
            (
                options.get_idle_timeout(),
                options.get_max_lifetime(),
                options.get_min_connections()
            ),
            (None, None, 0),
            "{name}"
        );
    }
    let pg = super::pool_options::<sqlx::Postgres>();
    assert_eq!((pg.get_idle_timeout(), pg.get_max_lifetime()), (None, None));
}

#[tokio::test]
async fn unwritable_path_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let err = Store::open(&blocker.join("q.db")).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&blocker.display().to_string()), "{text}");
    assert!(!text.contains('\n'));
}

/// The child half of the SIGKILL test: commits 10 rows, then holds 10 more uncommitted.
#[tokio::test]
#[ignore = "run only as the child process of sigkill_mid_transaction_leaves_no_partial_row"]
async fn child_writer() {
    let Ok(path) = std::env::var("FRONTDESK_STORE_CHILD_DB") else {
        return;
    };
    let store = Store::open(std::path::Path::new(&path)).await.unwrap();
    let now = Utc::now();
    for i in 0..10 {
        store
            .ingest(&msg("form", &format!("committed-{i}"), "body"), now)
            .await
            .unwrap();
    }
    let db = store.sqlite().unwrap();
    let mut tx = db.begin_write().await.unwrap();
    for i in 0..10 {
        db.insert_message(&mut tx, &msg("form", &format!("pending-{i}"), "body"), now)
            .await
            .unwrap();
    }
    println!("READY-TO-DIE");
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn sigkill_mid_transaction_leaves_no_partial_row() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("q.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "store::tests::child_writer",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("FRONTDESK_STORE_CHILD_DB", &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut ready = false;
    for line in BufReader::new(stdout).lines() {
        if line.unwrap().contains("READY-TO-DIE") {
            ready = true;
            break;
        }
    }
    assert!(ready, "child never reached the uncommitted transaction");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let store = Store::open(&db).await.unwrap();
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    let rows = store
        .messages(&MessageFilter {
            source: None,
            limit: Some(100),
        })
        .await
        .unwrap();
    let committed = rows
        .iter()
        .filter(|m| m.subject.as_deref().unwrap_or("").contains("committed-"))
        .count();
    let pending = rows
        .iter()
        .filter(|m| m.subject.as_deref().unwrap_or("").contains("pending-"))
        .count();
    assert_eq!(committed, 10, "committed rows must survive");
    assert_eq!(pending, 0, "no row of the killed transaction may survive");
    // The store is writable again after the crash.
    store
        .ingest(&msg("form", "after", "x"), Utc::now())
        .await
        .unwrap();
    assert_eq!(store.message_count().await.unwrap(), 11);
}

/// A store created before migration 6 keeps what the core had done: handled messages keep
/// their conversation, pending ones stay queued, and new inserts are queued by the trigger.
#[tokio::test]
async fn migration_6_moves_core_state_out_of_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let pool = super::pool_options::<sqlx::Sqlite>()
            .max_connections(1)
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .unwrap();
        let mut old = sqlx::migrate::Migrator::new(std::path::Path::new("./migrations/sqlite"))
            .await
            .unwrap();
        old.migrations = std::borrow::Cow::Owned(
            old.migrations
                .iter()
                .filter(|m| m.version < 6)
                .cloned()
                .collect(),
        );
        old.run(&pool).await.unwrap();
        sqlx::query(
            "INSERT INTO conversations (id, source, client_key, client_address, base_subject, \
             created_at, last_message_at) VALUES (7, 's', 'k', 'a', '', 0, 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        for (id, processed, conv) in [(1, Some(5), Some(7)), (2, Some(6), None), (3, None, None)] {
            sqlx::query(
                "INSERT INTO messages (id, source, origin_key, origin, direction, received_at, \
                 parse, raw, raw_sha256, stored_at, processed_at, conversation_id) \
                 VALUES (?, 's', ?, '{}', 'inbound', 0, 'ok', x'00', '', 0, ?, ?)",
            )
            .bind(id)
            .bind(format!("o{id}"))
            .bind(processed)
            .bind(conv)
            .execute(&pool)
            .await
            .unwrap();
        }
        pool.close().await;
    }
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.pending_count().await.unwrap(), 1);
    assert_eq!(store.conversation_of_message(1).await.unwrap(), Some(7));
    assert_eq!(store.conversation_of_message(2).await.unwrap(), None);
    assert_eq!(store.conversation_of_message(3).await.unwrap(), None);
    let db = store.sqlite().unwrap();
    let mut tx = db.begin_write().await.unwrap();
    db.insert_message(&mut tx, &msg("s", "new", "body"), Utc::now())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.pending_count().await.unwrap(), 2);
}

/// With checkpoints moved off the writer, a steady stream of commits must not grow the WAL
/// without bound (a passive checkpoint alone never lets it start over).
#[tokio::test]
async fn the_checkpointer_keeps_the_wal_bounded_under_steady_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.db");
    let store = Store::open(&path).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let checkpointer = tokio::spawn({
        let (store, shutdown) = (store.clone(), shutdown.clone());
        async move {
            store
                .run_checkpointer(std::time::Duration::from_millis(10), 500, shutdown)
                .await
        }
    });
    // Let it switch the writer's automatic checkpoints off first.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let body = "x".repeat(16 * 1024);
    let mut largest = 0;
    for i in 0..300 {
        let db = store.sqlite().unwrap();
        let mut tx = db.begin_write().await.unwrap();
        for j in 0..4 {
            db.insert_message(&mut tx, &msg("s", &format!("{i}-{j}"), &body), Utc::now())
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let wal = std::fs::metadata(dir.path().join("wal.db-wal")).map_or(0, |m| m.len());
        largest = largest.max(wal);
    }
    shutdown.cancel();
    checkpointer.await.unwrap();
    // 300 commits x ~25 pages: about 30 MiB of WAL without resets (measured); bounded near 500
    // frames (2 MiB) plus what arrives between two checkpoints (4 MiB measured).
    assert!(
        largest < 10 * 1024 * 1024,
        "WAL grew to {largest} bytes despite the checkpointer"
    );
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    assert_eq!(store.message_count().await.unwrap(), 1200);
}

/// A server that may lose acknowledged commits is refused, naming the setting.
#[tokio::test]
async fn postgres_without_synchronous_commit_or_fsync_is_refused() {
    let (dir, url) = test_pg::start_cluster(&["synchronous_commit=off"]);
    let err = Store::open_postgres(&url, None).await.unwrap_err();
    let text = err.to_string();
    let _ = Command::new(test_pg::SCRIPT).args(["stop", &dir]).output();
    assert!(text.contains("synchronous_commit"), "{text}");
    assert!(!text.contains('\n'), "{text}");
    let (dir, url) = test_pg::start_cluster(&["fsync=off"]);
    let err = Store::open_postgres(&url, None).await.unwrap_err();
    let _ = Command::new(test_pg::SCRIPT).args(["stop", &dir]).output();
    assert!(err.to_string().contains("fsync=off"), "{err}");
}

/// `sslmode` in the URL is honoured: verify-full against the cluster's CA connects over TLS;
/// without that CA (webpki roots only) the certificate is refused.
#[tokio::test]
async fn postgres_tls_verifies_the_server_certificate() {
    let env = test_pg::start_cluster_with(&[], &["--tls"]);
    let (dir, port, ca) = (env("PG_DIR="), env("PG_PORT="), env("PG_CA="));
    let base = format!("postgres://postgres@localhost:{port}/postgres?sslmode=verify-full");
    let trusted = Store::open_postgres(&format!("{base}&sslrootcert={ca}"), None).await;
    let untrusted = Store::open_postgres(&base, None).await;
    let ssl: Result<(bool,), _> = match &trusted {
        Ok(store) => {
            sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(store.pg_pool().unwrap())
                .await
        }
        Err(_) => Ok((false,)),
    };
    let _ = Command::new(test_pg::SCRIPT).args(["stop", &dir]).output();
    assert!(trusted.is_ok(), "{:?}", trusted.err());
    assert!(ssl.unwrap().0, "the connection is not encrypted");
    let err = untrusted
        .expect_err("an unknown CA must be refused")
        .to_string();
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("tls"),
        "{err}"
    );
}

/// An unreachable server is a clear open error, and a password in the URL is not shown.
#[tokio::test]
async fn postgres_open_error_hides_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Store::open_postgres(&format!("postgres://u:hunter2@127.0.0.1:{port}/db"), None)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("u:***@127.0.0.1"), "{text}");
}

store_tests! {
/// Every read-side query (digest, metrics, ledgers, listings) runs on this backend and sees
/// what was written.
async fn read_side_queries_run_and_agree(store: Store) {
    let now = Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap();
    for i in 0..3 {
        store.ingest(&msg("form", &format!("r{i}"), "body"), now).await.unwrap();
    }
    store.source_failed("form", "boom", 1, now).await.unwrap();
    store.record_source_event("form", Some("INBOX"), "uidvalidity", "1 -> 2", now).await.unwrap();
    store.write_probe(now).await.unwrap();
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    let sources = [SourceRef {
        name: "form".into(),
        kind: crate::digest::SourceKind::Webhook,
    }];
    let input = store
        .digest_input(&sources, now - chrono::TimeDelta::days(1), now + chrono::TimeDelta::hours(1))
        .await
        .unwrap();
    assert_eq!(input.sources.len(), 1);
    assert_eq!(input.new_messages.iter().map(|r| r.messages).sum::<u64>(), 3, "{:?}", input.new_messages);
    let samples = store.metrics_samples().await.unwrap();
    let text = metrics::render(&samples);
    assert!(text.contains("frontdesk_messages_pending 3"), "{text}");
    assert!(text.contains("frontdesk_source_healthy{source=\"form\"} 0"), "{text}");
    assert_eq!(store.source_health().await.unwrap().len(), 1);
    assert_eq!(store.source_events("form", "uidvalidity").await.unwrap().len(), 1);
    assert!(store.imap_ledger().await.unwrap().is_empty());
    assert!(store.webhook_counters().await.unwrap().is_empty());
    assert!(store.digest_open().await.unwrap().is_empty());
    assert!(store.digest_replies(now - chrono::TimeDelta::days(1), now).await.unwrap().is_empty());
    assert!(store.fulfilled_targets(now - chrono::TimeDelta::days(1), now).await.unwrap().is_empty());
    assert_eq!(store.next_core_deadline().await.unwrap(), None);
    assert!(store.outbox_list(10).await.unwrap().is_empty());
    assert_eq!(store.outbox_next_due().await.unwrap(), None);
    assert!(store.outbox_failed_since(now - chrono::TimeDelta::days(1)).await.unwrap().is_empty());
    // One unhealthy flip: one alert event waiting to be grouped.
    assert_eq!(store.alert_events_pending().await.unwrap().len(), 1);
    assert_eq!(store.alert_oldest_pending().await.unwrap(), Some(now));
}

/// A folder's known UIDs are exactly its own rows' (`folder_uids` reads the keys aggregated):
/// folder names with `:`, a comma, a line feed or multi-byte characters in them, a folder whose
/// name starts another's, another UIDVALIDITY and another source do not mix.
async fn known_uids_are_the_folders_own(store: Store) {
    let now = Utc::now();
    let rows: &[(&str, &str, u32, u32)] = &[
        ("mail", "INBOX", 7, 1),
        ("mail", "INBOX", 7, 20),
        ("mail", "INBOX", 7, 300),
        ("mail", "INBOX:x", 7, 2),
        ("mail", "a:b", 7, 3),
        ("mail", "a", 7, 4),
        ("mail", "", 7, 5),
        ("mail", "INBOX", 70, 6),
        ("mail", "INBOX", 8, 9),
        ("other", "INBOX", 7, 10),
        ("mail", "Entwürfe, 2026", 7, 11),
        ("mail", "x\ny:1", 7, 12),
    ];
    for (i, (source, folder, uid_validity, uid)) in rows.iter().enumerate() {
        let mut m = msg(source, &format!("k{i}"), "body");
        m.origin = Origin::Imap {
            folder: (*folder).into(),
            uid_validity: *uid_validity,
            uid: *uid,
        };
        store.ingest(&m, now).await.unwrap();
    }
    let known = |folder: &'static str, uid_validity: u32| {
        let store = store.clone();
        async move {
            let mut v: Vec<u32> = store
                .imap_known_uids("mail", folder, uid_validity)
                .await
                .unwrap()
                .into_iter()
                .collect();
            v.sort_unstable();
            v
        }
    };
    assert_eq!(known("INBOX", 7).await, [1, 20, 300]);
    assert_eq!(known("INBOX:x", 7).await, [2]);
    assert_eq!(known("a:b", 7).await, [3]);
    assert_eq!(known("a", 7).await, [4]);
    assert_eq!(known("", 7).await, [5]);
    assert_eq!(known("INBOX", 70).await, [6]);
    assert_eq!(known("INBOX", 8).await, [9]);
    assert_eq!(known("Entwürfe, 2026", 7).await, [11]);
    assert_eq!(known("x\ny:1", 7).await, [12]);
    assert!(known("Sent", 7).await.is_empty());
}

async fn same_origin_twice_is_one_row(store: Store) {
    let now = Utc::now();
    let a = store
        .ingest(&msg("form", "d-1", "hello"), now)
        .await
        .unwrap();
    let b = store
        .ingest(&msg("form", "d-1", "hello again"), now)
        .await
        .unwrap();
    assert!(!a.duplicate);
    assert!(b.duplicate);
    assert_eq!(a.id, b.id);
    // The same delivery id from another source is another message.
    let c = store.ingest(&msg("sms", "d-1", "hi"), now).await.unwrap();
    assert!(!c.duplicate);
    assert_eq!(store.message_count().await.unwrap(), 2);
}

async fn messages_list_newest_first_with_filters(store: Store) {
    for i in 0..5 {
        let mut m = msg(if i % 2 == 0 { "a" } else { "b" }, &format!("d{i}"), "x");
        m.received_at = Utc.with_ymd_and_hms(2026, 1, 1, 0, i, 0).unwrap();
        store.ingest(&m, Utc::now()).await.unwrap();
    }
    let all = store.messages(&MessageFilter::default()).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].received_at >= w[1].received_at));
    let only_a = store
        .messages(&MessageFilter {
            source: Some("a".into()),
            limit: Some(2),
        })
        .await
        .unwrap();
    assert_eq!(only_a.len(), 2);
    assert!(only_a.iter().all(|m| m.source == "a"));
}

async fn source_health_flips_raise_one_alert_event_each(store: Store) {
    let kinds = |store: Store| async move {
        let rows: Vec<(String,)> = on_backend!(store, |db| {
            sqlx::query_as("SELECT kind FROM alert_events ORDER BY id")
                .fetch_all(db.reader())
                .await
                .unwrap()
        });
        rows.into_iter().map(|r| r.0).collect::<Vec<_>>()
    };
    let t = |s: i64| Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap();
    store.source_succeeded("mail", t(0)).await.unwrap();
    for i in 1..=5 {
        store
            .source_failed("mail", "connection refused", 3, t(i))
            .await
            .unwrap();
    }
    assert_eq!(kinds(store.clone()).await, vec!["source_unhealthy"]);
    store.source_succeeded("mail", t(10)).await.unwrap();
    store.source_succeeded("mail", t(11)).await.unwrap();
    assert_eq!(
        kinds(store.clone()).await,
        vec!["source_unhealthy", "source_healthy"]
    );
    // A source whose very first passes fail also alerts once.
    for i in 20..23 {
        store
            .source_failed("sms", "timeout", 2, t(i))
            .await
            .unwrap();
    }
    assert_eq!(
        kinds(store.clone()).await,
        vec!["source_unhealthy", "source_healthy", "source_unhealthy"]
    );
}

/// A step that handles a message another core already handled is refused, not applied twice
/// (its snapshot is stale: its other writes would overwrite newer state).
async fn a_step_handling_an_already_handled_message_is_a_conflict(store: Store) {
    let id = store
        .ingest(&msg("s", "once", "body"), Utc::now())
        .await
        .unwrap()
        .id;
    let step = super::core::StepWrites {
        processed: vec![(id, None)],
        ..Default::default()
    };
    let mut tx = store.begin_core().await.unwrap();
    tx.write_step(&step, Utc::now()).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin_core().await.unwrap();
    let again = tx.write_step(&step, Utc::now()).await;
    assert!(matches!(again, Err(Error::Conflict(_))), "{again:?}");
    drop(tx);
    assert_eq!(store.pending_count().await.unwrap(), 0);
}
}

/// The cursor of the IMAP batch tests' folder (UIDVALIDITY 7) after `last_uid`.
fn cursor_at(last_uid: u32) -> ImapCursor {
    ImapCursor {
        uid_validity: 7,
        last_uid,
        backfill_floor: 0,
        backfill_skipped: 0,
        backfill_cutoff: None,
    }
}

/// An IMAP batch commits with `synchronous=NORMAL`; the writer connection every other write uses
/// must be back at FULL afterwards, and a batch that fails half-way must not leave it at NORMAL.
#[tokio::test]
async fn an_imap_batch_leaves_the_writer_at_synchronous_full_even_when_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("q.db")).await.unwrap();
    let writer_sync = || async {
        let (sync,): (i64,) = sqlx::query_as("PRAGMA synchronous")
            .fetch_one(&store.sqlite().unwrap().writer)
            .await
            .unwrap();
        sync
    };
    let now = Utc::now();
    let m = |uid| Message {
        origin: Origin::Imap {
            folder: "INBOX".into(),
            uid_validity: 7,
            uid,
        },
        ..msg("mail", &format!("u{uid}"), "hello")
    };
    let out = store
        .commit_imap_batch("mail", "INBOX", vec![m(1), m(2)], &[], &cursor_at(2), now)
        .await
        .unwrap();
    assert_eq!(out.inserted, 2);
    assert_eq!(writer_sync().await, 2, "FULL restored after a batch");

    // the cursor's upsert fails after the rows went in: the batch is rolled back whole
    sqlx::query("DROP TABLE imap_cursors")
        .execute(&store.sqlite().unwrap().writer)
        .await
        .unwrap();
    let failed = store
        .commit_imap_batch("mail", "INBOX", vec![m(3)], &[], &cursor_at(3), now)
        .await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(
        writer_sync().await,
        2,
        "a failed batch left the writer without its fsync"
    );
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM messages")
        .fetch_one(&store.sqlite().unwrap().writer)
        .await
        .unwrap();
    assert_eq!(rows, 2, "nothing of the failed batch is stored");
    store.make_durable().await.unwrap();
}

/// IMAP bodies go to the bodies file, not the row, and come back byte for byte: from the store,
/// from a backup (which carries them inline, so it stands alone), and never silently wrong.
#[tokio::test]
async fn imap_bodies_live_in_the_bodies_file_and_backups_carry_them_inline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let store = Store::open(&path).await.unwrap();
    let m = |uid: u32, raw: Vec<u8>| Message {
        origin: Origin::Imap {
            folder: "INBOX".into(),
            uid_validity: 7,
            uid,
        },
        raw,
        ..msg("mail", &format!("u{uid}"), "text")
    };
    let raws: Vec<Vec<u8>> = vec![
        b"Subject: one\r\n\r\nfirst".to_vec(),
        Vec::new(),
        (0..70_000u32).map(|i| (i % 251) as u8).collect(),
    ];
    let batch = |raws: &[Vec<u8>]| {
        raws.iter()
            .enumerate()
            .map(|(i, r)| m(i as u32 + 1, r.clone()))
            .collect::<Vec<_>>()
    };
    let now = Utc::now();
    // a cursor-only first commit has nothing to append: the file waits for the first body
    let empty = store
        .commit_imap_batch("mail", "INBOX", Vec::new(), &[], &cursor_at(0), now)
        .await
        .unwrap();
    assert_eq!((empty.inserted, empty.duplicates), (0, 0));
    assert!(!dir.path().join("q.db-bodies").exists());
    let out = store
        .commit_imap_batch("mail", "INBOX", batch(&raws), &[], &cursor_at(3), now)
        .await
        .unwrap();
    assert_eq!(out.inserted, 3);
    let hook = store
        .ingest(&msg("hook", "w1", "webhook body"), now)
        .await
        .unwrap();
    let rows: Vec<(i64, i64, Option<i64>, Option<i64>)> =
        sqlx::query_as("SELECT id, length(raw), body_at, body_len FROM messages ORDER BY id")
            .fetch_all(&store.sqlite().unwrap().reader)
            .await
            .unwrap();
    let file_len = std::fs::metadata(dir.path().join("q.db-bodies"))
        .unwrap()
        .len();
    assert_eq!(file_len, raws.iter().map(|r| r.len() as u64).sum::<u64>());
    for ((_, inline, at, len), raw) in rows.iter().zip(&raws) {
        assert_eq!((*inline, *len), (0, Some(raw.len() as i64)), "{rows:?}");
        assert!(at.is_some());
    }
    assert_eq!(rows[3].2, None, "a webhook body stays in its row");
    for (id, raw) in rows.iter().map(|r| r.0).zip(&raws) {
        assert_eq!(store.message_raw(id).await.unwrap().as_ref(), Some(raw));
    }
    assert_eq!(
        store.message_raw(hook.id).await.unwrap().as_deref(),
        Some(&b"webhook body"[..])
    );
    assert_eq!(store.message_raw(999).await.unwrap(), None);

    // the same batch again (a re-fetch): no new rows; its bytes are garbage no row points at
    let again = store
        .commit_imap_batch("mail", "INBOX", batch(&raws), &[], &cursor_at(3), now)
        .await
        .unwrap();
    assert_eq!((again.inserted, again.duplicates), (0, 3));
    assert_eq!(
        store.message_raw(rows[2].0).await.unwrap().as_ref(),
        Some(&raws[2])
    );

    let backup = dir.path().join("backup.db");
    store.backup(&backup).await.unwrap();
    // damage the live file: the store refuses the body, the backup does not need the file
    let bodies = dir.path().join("q.db-bodies");
    let mut bytes = std::fs::read(&bodies).unwrap();
    let first = rows[0].2.unwrap() as usize;
    bytes[first] ^= 0xff;
    std::fs::write(&bodies, &bytes).unwrap();
    let err = store.message_raw(rows[0].0).await.unwrap_err();
    assert!(
        err.to_string().contains("do not match their digest"),
        "{err}"
    );
    std::fs::remove_file(&bodies).unwrap();
    store.close().await;

    let copy = Store::open(&backup).await.unwrap();
    let (outside,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM messages WHERE body_at IS NOT NULL OR body_len IS NOT NULL",
    )
    .fetch_one(&copy.sqlite().unwrap().reader)
    .await
    .unwrap();
    assert_eq!(outside, 0, "the backup keeps every body inline");
    for (id, raw) in rows.iter().map(|r| r.0).zip(&raws) {
        assert_eq!(copy.message_raw(id).await.unwrap().as_ref(), Some(raw));
    }
    assert_eq!(copy.integrity_check().await.unwrap(), "ok");
    assert!(!dir.path().join("backup.db-bodies").exists());
    copy.close().await;
}

/// Rows written before `raw_digest` held XXH3-128 keep their bare SHA-256 hex: such a body still
/// reads back, from the bodies file and from its row, checked against that SHA-256; a digest
/// this version cannot read refuses the body and says so.
#[tokio::test]
async fn a_body_stored_under_the_old_sha256_digest_still_reads_and_is_checked() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("q.db")).await.unwrap();
    let now = Utc::now();
    let imap = Message {
        origin: Origin::Imap {
            folder: "INBOX".into(),
            uid_validity: 7,
            uid: 1,
        },
        raw: b"Subject: filed\r\n\r\nin the bodies file".to_vec(),
        ..msg("mail", "u1", "text")
    };
    store
        .commit_imap_batch("mail", "INBOX", vec![imap.clone()], &[], &cursor_at(1), now)
        .await
        .unwrap();
    let hook = msg("hook", "w1", "webhook body");
    store.ingest(&hook, now).await.unwrap();
    let pool = &store.sqlite().unwrap().reader;
    let rows: Vec<(i64, String, Option<i64>)> =
        sqlx::query_as("SELECT id, raw_digest, body_at FROM messages ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter().all(|r| r.1.starts_with("xxh3-128:")),
        "{rows:?}"
    );
    assert!(rows[0].2.is_some() && rows[1].2.is_none(), "{rows:?}");
    let writer = store.sqlite().unwrap().writer.clone();
    let set = |id: i64, digest: String| {
        let writer = writer.clone();
        async move {
            sqlx::query("UPDATE messages SET raw_digest = ? WHERE id = ?")
                .bind(digest)
                .bind(id)
                .execute(&writer)
                .await
                .unwrap();
        }
    };
    for ((id, _, _), raw) in rows.iter().zip([&imap.raw, &hook.raw]) {
        set(*id, hex::encode(sha2::Sha256::digest(raw))).await;
        assert_eq!(store.message_raw(*id).await.unwrap().as_ref(), Some(raw));
        set(*id, hex::encode(sha2::Sha256::digest(b"other bytes"))).await;
        let err = store.message_raw(*id).await.unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
        set(*id, "md5:900150983cd24fb0d6963f7d28e17f72".into()).await;
        let err = store.message_raw(*id).await.unwrap_err();
        assert!(err.to_string().contains("unknown digest"), "{err}");
    }
    store.close().await;
}

store_tests! {
/// A UID quarantined after failed fetches is due for a retry only an hour after its quarantine
/// or last retry, and one refused for its size at once until first tried, each while it has
/// retries left (never one kept raw); fetched on a retry, it becomes a row and leaves quarantine
/// in one transaction.
async fn a_quarantined_uid_is_retried_when_due_and_released_into_a_row(store: Store) {
    let now = Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap();
    let hour = chrono::TimeDelta::hours(1);
    let q = |uid: u32, detail: &str, raw: Option<&[u8]>| AccountedUid {
        uid,
        kind: AccountedKind::Quarantined,
        detail: detail.into(),
        raw: raw.map(<[u8]>::to_vec),
    };
    let accounted = [
        q(2, "uid fetch: connection lost", None),
        q(3, "too large: 99999999 bytes", None),
        q(4, "unparseable", Some(b"raw bytes")),
        q(5, "uid fetch: connection lost", None),
    ];
    store
        .commit_imap_batch("mail", "INBOX", vec![], &accounted, &cursor_at(5), now)
        .await
        .unwrap();
    let due_rows = |quiet_since| {
        let store = &store;
        async move {
            store
                .imap_quarantine_due("mail", "INBOX", 7, 3, quiet_since)
                .await
                .unwrap()
        }
    };
    let due = |quiet_since| {
        let rows = due_rows(quiet_since);
        async move { rows.await.into_iter().map(|r| r.0).collect::<Vec<u32>>() }
    };
    assert_eq!(
        due_rows(now - hour * 100).await,
        [(3, "too large: 99999999 bytes".to_string())],
        "only the one never fetched is due within the hour, with the detail naming its size"
    );
    assert_eq!(due(now).await, [2, 3, 5]);
    for retry in 1..=3 {
        let at = now + hour * (2 * retry);
        assert_eq!(due(at - hour).await, [2, 3, 5], "retry {retry} due");
        store
            .imap_quarantine_retried("mail", "INBOX", 7, 2, at)
            .await
            .unwrap();
        assert_eq!(due(at - hour).await, [3, 5], "retry {retry} spaces the next");
    }
    assert_eq!(due(now + hour * 100).await, [3, 5], "UID 2 has no retries left");

    // once tried, the one refused for its size is spaced like the others
    store
        .imap_quarantine_retried("mail", "INBOX", 7, 3, now)
        .await
        .unwrap();
    assert!(due(now - hour).await.is_empty(), "spaced once tried");
    assert_eq!(due(now).await, [3, 5]);
    for _ in 0..2 {
        store
            .imap_quarantine_retried("mail", "INBOX", 7, 3, now)
            .await
            .unwrap();
    }
    assert_eq!(due(now + hour * 100).await, [5], "UID 3 has no retries left");

    let m = Message {
        origin: Origin::Imap {
            folder: "INBOX".into(),
            uid_validity: 7,
            uid: 5,
        },
        ..msg("mail", "u5", "hello")
    };
    assert!(store.imap_release_quarantined("INBOX", 7, 5, &m, now).await.unwrap());
    assert!(due(now + hour * 100).await.is_empty());
    let ledger = store.imap_ledger().await.unwrap();
    assert_eq!(
        (ledger[0].ingested, ledger[0].quarantined),
        (1, 3),
        "{ledger:?}"
    );
    // released twice (a retry that raced another replica): still one row, nothing quarantined twice
    assert!(!store.imap_release_quarantined("INBOX", 7, 5, &m, now).await.unwrap());
    let ledger = store.imap_ledger().await.unwrap();
    assert_eq!((ledger[0].ingested, ledger[0].quarantined), (1, 3));
}
}
