//! Builds and renders one digest over a store of 100,000 messages and 10,000 open conversations,
//! and prints the time; run by `bench/digest.sh`.
//!
//! The messages are real rows in a real store (bulk-inserted once). Open conversations and reply
//! times come from the core's tables, which this branch does not have yet, so those rows are
//! synthesised with the same shapes the store will return.

use std::time::Instant;

use chrono::{TimeDelta, Utc};
use frontdesk::digest::{ConversationRow, Digest, ReplyRow, SourceKind, TargetKind};
use frontdesk::store::{SourceRef, Store};

const MESSAGES: i64 = 100_000;
const OPEN: i64 = 10_000;
const REPLIES: i64 = 30_000;
const RUNS: usize = 7;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/frontdesk-digest-bench.db".into());
    let path = std::path::PathBuf::from(path);
    let store = Store::open(&path).await?;
    let now = Utc::now();
    let count = store.message_count().await?;
    if count < MESSAGES {
        let started = Instant::now();
        let pool = frontdesk::store::pool_options::<sqlx::Sqlite>()
            .connect(&format!("sqlite://{}", path.display()))
            .await?;
        // 100,000 inbound messages over the last 35 days from 20,000 senders in 4 sources.
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) \
             INSERT INTO messages (source, origin_key, origin, direction, received_at, from_addr, \
             from_name, subject, body_text, automation, parse, raw, raw_sha256, stored_at) \
             SELECT 'source-' || (i % 4), 'bench:' || i, '{}', \
             CASE WHEN i % 5 = 0 THEN 'outbound' ELSE 'inbound' END, \
             ? - (i * 30000), 'client' || (i % 20000) || '@example.com', 'Client ' || (i % 20000), \
             'Subject ' || i, 'Body of message ' || i, 'human', 'ok', x'00', '', ? FROM n",
        )
        .bind(MESSAGES)
        .bind(now.timestamp_millis())
        .bind(now.timestamp_millis())
        .execute(&pool)
        .await?;
        pool.close().await;
        println!(
            "setup: inserted {MESSAGES} messages in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    let sources: Vec<SourceRef> = (0..4)
        .map(|i| SourceRef {
            name: format!("source-{i}"),
            kind: if i == 0 {
                SourceKind::Imap
            } else {
                SourceKind::Webhook
            },
        })
        .collect();
    let owners = ["Maria", "Nikos", "Eleni", "Kostas"];
    let open: Vec<ConversationRow> = (0..OPEN)
        .map(|i| {
            let since = now - TimeDelta::minutes(i * 7 % 5000);
            ConversationRow {
                id: i,
                client: format!("Client {i}"),
                medium: (i % 3 == 0).then(|| "SMS".to_string()),
                subject: format!("Question number {i} about the invoice"),
                owner: (i % 5 != 0).then(|| owners[(i % 4) as usize].to_string()),
                policy: Some("standard".into()),
                target: Some(TargetKind::First),
                target_secs: Some(4 * 3600),
                waiting_since: since,
                warn_at: Some(since + TimeDelta::hours(3)),
                due: Some(since + TimeDelta::hours(4)),
            }
        })
        .collect();
    let replies: Vec<ReplyRow> = (0..REPLIES)
        .map(|i| ReplyRow {
            conversation_id: i,
            client: format!("Client {i}"),
            owner: Some(owners[(i % 4) as usize].to_string()),
            target: if i % 3 == 0 {
                TargetKind::Next
            } else {
                TargetKind::First
            },
            replied_at: now - TimeDelta::minutes(i * 5 % (35 * 1440)),
            response_secs: 600 + (i * 37 % 20_000),
            met: Some(i % 7 != 0),
        })
        .collect();

    let tz = chrono_tz::Europe::Athens;
    let mut times = Vec::with_capacity(RUNS);
    let mut sizes = (0, 0);
    for _ in 0..RUNS {
        let started = Instant::now();
        let mut input = store
            .digest_input(&sources, now - TimeDelta::days(1), now)
            .await?;
        input.open = open.clone();
        input.replies = replies.clone();
        let digest = Digest::build(&input, now, tz, None);
        let rendered = digest.render()?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        sizes = (rendered.text.len(), rendered.html.len());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "digest over {MESSAGES} messages, {OPEN} open conversations, {REPLIES} replies: \
         median {:.1} ms, min {:.1} ms, max {:.1} ms ({RUNS} runs; text {} B, html {} B); target < 300 ms",
        times[RUNS / 2],
        times[0],
        times[RUNS - 1],
        sizes.0,
        sizes.1
    );
    Ok(())
}
