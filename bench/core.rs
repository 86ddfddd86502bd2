//! Core throughput: 100,000 messages (5,000 clients, email and SMS, replies) into conversations
//! and SLA clocks on a real SQLite store. Prints messages per second.
//!
//! Run: `cargo bench --bench core` (optionally `-- MESSAGES CLIENTS`).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use chrono::{TimeDelta, TimeZone, Utc};
use frontdesk::core::{Core, Routing};
use frontdesk::message::{Address, Automation, Direction, Message, Origin, ParseStatus};
use frontdesk::sla::stats::{self, GroupBy};
use frontdesk::store::Store;
use frontdesk::store::core::ConversationFilter;

const YAML: &str = r#"
timezone: Europe/Athens
storage: { sqlite: /nonexistent/unused.db }
server: { listen: 127.0.0.1:0 }
team:
  - { name: Maria, email: [maria@example.com] }
  - { name: Nikos, email: [nikos@example.com] }
sources:
  - name: sms
    webhook: { preset: form, auth: { scheme: none } }
clients:
  - { name: ACME Ltd, match: { email_domain: acme0.example }, tags: [vip] }
responsibilities:
  - { match: { client_tag: vip }, owner: Nikos }
  - { match: { source: sms }, owner: Maria }
  - owner: Maria
sla:
  calendars:
    office:
      timezone: Europe/Athens
      hours: { mon-fri: ["09:00-13:00", "14:00-17:30"], sat: ["10:00-13:00"] }
      holidays: ["2026-12-25"]
  policies:
    - { name: vip, match: { client_tag: vip }, first_reply: 1h, next_reply: 4h, calendar: office, warn_before: 25% }
    - { name: standard, first_reply: 4h, next_reply: 8h, calendar: office, warn_before: 30m }
channels:
  - name: outbox
    email: { file: /tmp/unused, from: "f <f@example.com>", to: [o@example.com] }
alerts: { channel: outbox }
"#;

/// User + system CPU seconds of this process so far (all threads, incl. sqlx's SQLite worker).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

fn message(i: u32, clients: u32) -> Message {
    let client = i % clients;
    let round = i / clients;
    let at =
        Utc.with_ymd_and_hms(2026, 11, 2, 7, 0, 0).unwrap() + TimeDelta::seconds(i64::from(i) * 20);
    let sms = client.is_multiple_of(5);
    let reply = round % 2 == 1;
    let addr = if sms {
        format!("+30691{client:07}")
    } else {
        format!("user{client}@acme{}.example", client % 50)
    };
    let team = Address {
        name: None,
        addr: "maria@example.com".into(),
    };
    let them = Address {
        name: None,
        addr: addr.clone(),
    };
    let (direction, from, to) = if reply {
        (Direction::Outbound, team, them)
    } else {
        (Direction::Inbound, them, team)
    };
    let parent = format!("m{}-{}@bench", client, round.saturating_sub(1));
    Message {
        source: if sms { "sms".into() } else { "mail".into() },
        origin: Origin::Webhook {
            delivery_id: format!("d{i}"),
        },
        direction,
        received_at: at,
        sent_at: None,
        from: Some(from),
        to: vec![to],
        subject: (!sms).then(|| format!("{}Order {}", if round > 0 { "Re: " } else { "" }, client)),
        text: Some("Hello, about my order.".into()),
        message_id: (!sms).then(|| format!("m{client}-{round}@bench")),
        in_reply_to: if round > 0 && !sms {
            vec![parent]
        } else {
            vec![]
        },
        references: vec![],
        thread_key: sms.then(|| format!("+302100000000:{addr}")),
        automation: Automation::Human,
        parse: ParseStatus::Ok,
        // Realistic sizes matter: the store keeps raw bytes, and rewriting wide rows is what
        // the core must not do. SMS ~600 B; email 4 KB, every 50th with a 100 KB attachment.
        raw: vec![
            b'x';
            if sms {
                600
            } else if i % 50 == 7 {
                100_000
            } else {
                4_000
            }
        ],
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let total = args.first().copied().unwrap_or(100_000);
    let clients = args.get(1).copied().unwrap_or(5_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("bench.db"))
        .await
        .expect("store");
    let loaded = frontdesk::config::load_str(Path::new("bench.yaml"), YAML).expect("config");
    let routing = Arc::new(Routing::from_config(&loaded.config).expect("routing"));

    let t = Instant::now();
    let now = Utc::now();
    let msgs: Vec<Message> = (0..total).map(|i| message(i, clients)).collect();
    for chunk in msgs.chunks(5_000) {
        store.ingest_many(chunk, now).await.expect("ingest");
    }
    let ingest = t.elapsed();

    let core = Core::new(store.clone(), routing);
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let p = core
        .run_once(Utc.with_ymd_and_hms(2026, 12, 31, 0, 0, 0).unwrap())
        .await
        .expect("core");
    let took = t.elapsed();
    let cpu = cpu_seconds() - cpu0;
    println!("messages:            {total} ({clients} clients)");
    println!("bulk ingest:         {:.2} s", ingest.as_secs_f64());
    println!(
        "core processed:      {} messages, {} deadline ticks, {} alerts",
        p.messages, p.ticked, p.alerts
    );
    println!("core time:           {:.2} s", took.as_secs_f64());
    // CPU time reads true on a busy machine where wall time does not (load average beside it).
    println!(
        "core CPU:            {:.2} s ({:.1} us/message; load average {})",
        cpu,
        cpu * 1e6 / p.messages.max(1) as f64,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .next()
            .unwrap_or("?")
    );
    println!(
        "core throughput:     {:.0} messages/s",
        p.messages as f64 / took.as_secs_f64()
    );

    // What `frontdesk conversations --json` and `frontdesk stats [--by ...]` do on this store,
    // minus process start and config loading (a few ms, measured by bench/service.sh).
    let t = Instant::now();
    let convs = store
        .conversations(&ConversationFilter::default())
        .await
        .expect("conversations");
    let json = serde_json::to_string_pretty(&convs).expect("json");
    let listing = t.elapsed();
    println!(
        "conversations --json: {:.0} ms ({} conversations, {} KB)",
        listing.as_secs_f64() * 1000.0,
        convs.len(),
        json.len() / 1024
    );
    let since = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let until = Utc.with_ymd_and_hms(2026, 12, 31, 0, 0, 0).unwrap();
    for (name, by) in [
        ("stats", GroupBy::All),
        ("stats --by client", GroupBy::Client),
        ("stats --by owner", GroupBy::Owner),
    ] {
        let t = Instant::now();
        let rows = store.fulfilled_targets(since, until).await.expect("stats");
        let summary = stats::summarize(&rows, by);
        let took = t.elapsed();
        println!(
            "{name:<21} {:.0} ms ({} targets, {} groups)",
            took.as_secs_f64() * 1000.0,
            rows.len(),
            summary.len()
        );
    }
}
