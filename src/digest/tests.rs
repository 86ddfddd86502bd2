use super::*;
use chrono::TimeZone;
use proptest::prelude::*;
use std::path::PathBuf;

fn at(h: u32, m: u32) -> DateTime<Utc> {
    // Thu 26 Nov 2026, given in Athens local time (UTC+2 in winter).
    chrono_tz::Europe::Athens
        .with_ymd_and_hms(2026, 11, 26, h, m, 0)
        .unwrap()
        .with_timezone(&Utc)
}

fn now() -> DateTime<Utc> {
    at(8, 0)
}

fn conv(id: i64, client: &str, subject: &str, owner: Option<&str>) -> ConversationRow {
    ConversationRow {
        id,
        client: client.into(),
        medium: None,
        subject: subject.into(),
        owner: owner.map(str::to_string),
        policy: Some("standard".into()),
        target: Some(TargetKind::First),
        target_secs: Some(4 * 3600),
        waiting_since: now() - TimeDelta::hours(3),
        warn_at: Some(now() + TimeDelta::hours(3)),
        due: Some(now() + TimeDelta::hours(4)),
    }
}

fn reply(
    conv: i64,
    owner: Option<&str>,
    target: TargetKind,
    ago_h: i64,
    secs: i64,
    met: bool,
) -> ReplyRow {
    ReplyRow {
        conversation_id: conv,
        client: format!("client {conv}"),
        owner: owner.map(str::to_string),
        target,
        replied_at: now() - TimeDelta::hours(ago_h),
        response_secs: secs,
        met: Some(met),
    }
}

/// Roughly the design's example (digest.md).
fn example_input() -> DigestInput {
    let mut acme = conv(1, "ACME Ltd", "Invoice 2291 is wrong", Some("Maria"));
    acme.policy = Some("vip".into());
    acme.target_secs = Some(3600);
    acme.waiting_since = now() - TimeDelta::minutes(190);
    acme.warn_at = Some(now() - TimeDelta::minutes(85));
    acme.due = Some(now() - TimeDelta::minutes(70));
    let mut eleni = conv(
        2,
        "Eleni Papadopoulou",
        "can we move Thursday?",
        Some("Maria"),
    );
    eleni.medium = Some("SMS".into());
    eleni.target = Some(TargetKind::Next);
    eleni.target_secs = Some(8 * 3600);
    eleni.waiting_since = now() - TimeDelta::minutes(120);
    eleni.warn_at = Some(now() - TimeDelta::minutes(10));
    eleni.due = Some(now() + TimeDelta::minutes(125));
    let mut bob = conv(
        3,
        "bob@client.example",
        "Quote for the kitchen",
        Some("Maria"),
    );
    bob.policy = None;
    bob.target = None;
    bob.target_secs = None;
    bob.warn_at = None;
    bob.due = Some(now() + TimeDelta::minutes(340));
    bob.waiting_since = now() - TimeDelta::minutes(60);
    let mut hello = conv(4, "+30 694 000 0000", "hello, is anyone there?", None);
    hello.medium = Some("SMS".into());
    hello.policy = None;
    hello.target = None;
    hello.target_secs = None;
    hello.warn_at = None;
    hello.due = None;
    hello.waiting_since = now() - TimeDelta::minutes(25);
    let nikos = conv(5, "Kitchen World", "Delivery date", Some("Nikos"));
    let mut replies = vec![];
    for i in 0..19 {
        replies.push(reply(
            100 + i,
            Some("Maria"),
            TargetKind::First,
            2 + i,
            1800 + i * 600,
            i != 7,
        ));
        replies.push(reply(
            200 + i,
            Some("Maria"),
            TargetKind::First,
            24 * 10 + i,
            1500 + i * 900,
            true,
        ));
    }
    for i in 0..9 {
        replies.push(reply(
            300 + i,
            Some("Nikos"),
            TargetKind::First,
            5 + i,
            4800 + i * 1800,
            i > 1,
        ));
        replies.push(reply(
            400 + i,
            Some("Nikos"),
            TargetKind::Next,
            24 * 12 + i,
            3600 + i * 600,
            true,
        ));
    }
    DigestInput {
        since: Some(at(8, 0) - TimeDelta::hours(15)),
        open: vec![acme, eleni, bob, hello, nikos],
        new_messages: vec![
            NewMessagesRow {
                client: "ACME Ltd".into(),
                owner: Some("Maria".into()),
                messages: 3,
            },
            NewMessagesRow {
                client: "Eleni Papadopoulou".into(),
                owner: Some("Maria".into()),
                messages: 2,
            },
            NewMessagesRow {
                client: "contact form".into(),
                owner: None,
                messages: 4,
            },
            NewMessagesRow {
                client: "Kitchen World".into(),
                owner: Some("Nikos".into()),
                messages: 1,
            },
        ],
        replies,
        sources: vec![
            SourceHealthRow {
                name: "support-mail".into(),
                kind: SourceKind::Imap,
                healthy: true,
                last_message_at: Some(now() - TimeDelta::minutes(12)),
                unaccounted: 0,
                rejections: 0,
                error: None,
            },
            SourceHealthRow {
                name: "contact-form".into(),
                kind: SourceKind::Webhook,
                healthy: true,
                last_message_at: None,
                unaccounted: 0,
                rejections: 0,
                error: None,
            },
            SourceHealthRow {
                name: "sms".into(),
                kind: SourceKind::Webhook,
                healthy: true,
                last_message_at: Some(now() - TimeDelta::hours(26)),
                unaccounted: 0,
                rejections: 2,
                error: None,
            },
        ],
        failed_sends: vec![],
        deferred_alerts: vec![],
    }
}

const HOSTILE: &[&str] = &[
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "javascript:alert(1)",
    "</title><script>x</script>",
    "Hi\r\nBcc: evil@x.test",
    "Hi\nBcc: evil@x.test\n.\n",
    "\r\n.\r\nMAIL FROM:<evil@x.test>\r\n",
    "line\rBcc:\u{0}nul",
    "\u{202e}gpj.exe\u{2066}x\u{2069}",
    "=?utf-8?q?Hi=0D=0ABcc:_evil@x.test?=",
    "\"'><svg onload=alert(1)>",
    "<a href=\"javascript:alert(1)\">click</a> <style>body{}</style> <base href=//x>",
    "\u{2028}sep\u{2029}para\u{85}nel",
];

fn hostile_input() -> DigestInput {
    let long = "A".repeat(10_000);
    let mut open = vec![];
    for (i, h) in HOSTILE.iter().enumerate() {
        let mut c = conv(
            i as i64 + 1,
            h,
            h,
            if i % 2 == 0 { Some("Maria") } else { None },
        );
        c.medium = Some(h.to_string());
        c.policy = Some(h.to_string());
        if i % 3 == 0 {
            c.due = Some(now() - TimeDelta::minutes(5));
        }
        open.push(c);
    }
    open.push(conv(99, &long, &format!(".\n.\n{long}"), Some("Maria")));
    let mut input = example_input();
    input.open = open;
    input.new_messages = HOSTILE
        .iter()
        .map(|h| NewMessagesRow {
            client: h.to_string(),
            owner: Some("Maria".into()),
            messages: 1,
        })
        .collect();
    input.sources[0].healthy = false;
    input.sources[0].error = Some("<b>421</b>\r\nBcc: x".into());
    input.sources[1].name = "form\r\nBcc: y".into();
    input.failed_sends.push(FailedSendRow {
        outbox_id: 7,
        kind: "digest".into(),
        channel: "office-mail".into(),
        recipient: "maria@example.com".into(),
        error: "550 5.1.1 <script>no</script>\r\n.\r\n".into(),
        failed_at: now() - TimeDelta::hours(2),
    });
    input
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/digest")
}

/// Compares `actual` with the stored snapshot; on mismatch writes `<name>.actual` beside it.
/// `UPDATE_EXPECT=1` rewrites the snapshot instead.
fn check_snapshot(name: &str, actual: &str) {
    let path = fixture_dir().join(name);
    let actual_path = fixture_dir().join(format!("{name}.actual"));
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::create_dir_all(fixture_dir()).unwrap();
        std::fs::write(&path, actual).unwrap();
        let _ = std::fs::remove_file(&actual_path);
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected != actual {
        std::fs::create_dir_all(fixture_dir()).unwrap();
        std::fs::write(&actual_path, actual).unwrap();
        panic!(
            "snapshot {} differs; see {} (UPDATE_EXPECT=1 regenerates)",
            path.display(),
            actual_path.display()
        );
    }
    let _ = std::fs::remove_file(&actual_path);
}

fn tz() -> Tz {
    chrono_tz::Europe::Athens
}

#[test]
fn example_digest_for_maria_matches_snapshot() {
    let d = Digest::build(&example_input(), now(), tz(), Some("Maria"));
    let r = d.render().unwrap();
    assert_eq!(
        r.subject,
        "frontdesk: 4 waiting, 1 breached - Thu 26 Nov 08:00"
    );
    check_snapshot(
        "maria.txt",
        &format!("Subject: {}\n\n{}", r.subject, r.text),
    );
    check_snapshot("maria.html", &r.html);
}

#[test]
fn team_digest_groups_by_owner_and_matches_snapshot() {
    let d = Digest::build(&example_input(), now(), tz(), None);
    assert_eq!(
        d.waiting
            .iter()
            .map(|g| g.owner.as_str())
            .collect::<Vec<_>>(),
        ["Maria", "Nikos"]
    );
    assert_eq!(d.waiting_count(), 5);
    let r = d.render().unwrap();
    check_snapshot("team.txt", &format!("Subject: {}\n\n{}", r.subject, r.text));
    check_snapshot("team.html", &r.html);
}

#[test]
fn per_owner_digest_shows_own_and_unowned_only() {
    let d = Digest::build(&example_input(), now(), tz(), Some("Nikos"));
    let clients: Vec<&str> = d
        .waiting
        .iter()
        .flat_map(|g| g.items.iter())
        .chain(d.unowned.iter())
        .map(|i| i.row.client.as_str())
        .collect();
    assert_eq!(clients, ["Kitchen World", "+30 694 000 0000"]);
    assert_eq!(
        d.new_messages, 5,
        "Nikos' client plus the unowned contact form"
    );
    assert_eq!(d.stats.len(), 1);
    assert_eq!(d.stats[0].owner, "Nikos");
}

#[test]
fn empty_digest_says_nothing_is_waiting() {
    let d = Digest::build(&DigestInput::default(), now(), tz(), Some("Maria"));
    let r = d.render().unwrap();
    assert_eq!(
        r.subject,
        "frontdesk: 0 waiting, 0 breached - Thu 26 Nov 08:00"
    );
    assert!(r.text.contains("Nothing is waiting."));
    check_snapshot(
        "empty.txt",
        &format!("Subject: {}\n\n{}", r.subject, r.text),
    );
    check_snapshot("empty.html", &r.html);
}

#[test]
fn sections_appear_in_design_order() {
    let r = Digest::build(&example_input(), now(), tz(), None)
        .render()
        .unwrap();
    let order = [
        "WAITING ON YOU",
        "NOT YET OWNED",
        "AT RISK AND BREACHED",
        "NEW SINCE",
        "ANSWERED",
        "THIS WEEK",
        "SOURCES",
    ];
    let pos: Vec<usize> = order.iter().map(|s| r.text.find(s).unwrap()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
}

#[test]
fn waiting_is_oldest_first_with_overdue_and_due() {
    let d = Digest::build(&example_input(), now(), tz(), Some("Maria"));
    let maria = &d.waiting[0];
    assert_eq!(
        maria.items.iter().map(|i| i.row.id).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(maria.items[0].state, OpenState::Breached);
    assert_eq!(maria.items[1].state, OpenState::AtRisk);
    let r = d.render().unwrap();
    assert!(r.text.contains("overdue 1h 10m"), "{}", r.text);
    assert!(r.text.contains("due in 2h 05m"), "{}", r.text);
    assert!(r.text.contains("(vip: first reply 1h)"), "{}", r.text);
    assert!(r.text.contains("waiting 25m"), "{}", r.text);
}

#[test]
fn statistics_compare_with_the_previous_four_weeks() {
    let d = Digest::build(&example_input(), now(), tz(), None);
    let maria = d.stats.iter().find(|s| s.owner == "Maria").unwrap();
    assert_eq!((maria.met, maria.total), (18, 19));
    // Maria: 19 replies this week, 1800 + 600 i seconds; p50 is the 10th (i = 9).
    assert_eq!(maria.first_p50, Some(1800 + 9 * 600));
    assert_eq!(maria.first_p90, Some(1800 + 17 * 600));
    assert!(
        matches!(maria.trend, Trend::Faster { .. }),
        "{:?}",
        maria.trend
    );
    assert_eq!(d.slowest_clients.len(), 5);
    assert!(d.slowest_clients.windows(2).all(|w| w[0].p90 >= w[1].p90));
    let nikos = d.stats.iter().find(|s| s.owner == "Nikos").unwrap();
    assert!(
        matches!(nikos.trend, Trend::Slower { .. }),
        "{:?}",
        nikos.trend
    );
}

#[test]
fn hostile_input_matches_snapshot_and_stays_text() {
    let input = hostile_input();
    for owner in [Some("Maria"), None] {
        let r = Digest::build(&input, now(), tz(), owner).render().unwrap();
        assert_safe(&r);
    }
    let r = Digest::build(&input, now(), tz(), Some("Maria"))
        .render()
        .unwrap();
    check_snapshot(
        "hostile.txt",
        &format!("Subject: {}\n\n{}", r.subject, r.text),
    );
    check_snapshot("hostile.html", &r.html);
}

#[test]
fn hostile_alert_stays_text() {
    let input = hostile_input();
    let mut events: Vec<AlertEvent> = input
        .open
        .iter()
        .map(|c| AlertEvent::SlaBreach {
            conversation: c.clone(),
        })
        .collect();
    events.push(AlertEvent::SourceUnhealthy {
        source: "mail\r\nBcc: x".into(),
        error: "<script>x</script>\u{202e}".into(),
    });
    let r = Alert { events }.render(now(), tz()).unwrap();
    assert_safe(&r);
}

/// Element and attribute names the templates use; nothing else may appear.
const ALLOWED_ELEMENTS: &[&str] = &[
    "!doctype", "html", "head", "meta", "title", "body", "div", "p", "h2", "h3", "ul", "li",
    "span", "bdi",
];
const ALLOWED_ATTRIBUTES: &[&str] = &["lang", "charset", "name", "content", "style"];

fn assert_safe(r: &Rendered) {
    assert!(!r.subject.contains(['\r', '\n', '\0']));
    for c in r.text.chars() {
        assert!(c == '\n' || !c.is_control(), "control {:?} in text", c);
        assert!(!('\u{202a}'..='\u{202e}').contains(&c) && !('\u{2066}'..='\u{2069}').contains(&c));
    }
    assert!(!r.text.contains("\nBcc:"), "a line starts with Bcc:");
    for line in r.text.lines() {
        assert_ne!(line.trim(), ".", "a line of only a dot");
        assert!(line.chars().count() < 800, "line too long: {}", line.len());
    }
    let (elements, attributes) = html_names(&r.html);
    for e in &elements {
        assert!(
            ALLOWED_ELEMENTS.contains(&e.as_str()),
            "element {e} not from the template"
        );
    }
    for a in &attributes {
        assert!(
            ALLOWED_ATTRIBUTES.contains(&a.as_str()),
            "attribute {a} not from the template"
        );
    }
    assert!(!r.html.contains('\u{202e}'));
}

/// A small tag scanner: names of elements and attributes in start tags. Client text is escaped, so
/// any `<` in the output starts a real tag.
fn html_names(html: &str) -> (Vec<String>, Vec<String>) {
    let mut elements = vec![];
    let mut attributes = vec![];
    let mut rest = html;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').unwrap();
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if tag.starts_with('/') {
            continue;
        }
        let mut parts = tag.split_whitespace();
        elements.push(parts.next().unwrap().to_ascii_lowercase());
        let attrs = parts.collect::<Vec<_>>().join(" ");
        // Attribute values are quoted; drop them before reading names.
        let mut in_quote = false;
        let mut name = String::new();
        for c in attrs.chars() {
            match c {
                '"' => in_quote = !in_quote,
                _ if in_quote => {}
                '=' | ' ' => {
                    if !name.is_empty() {
                        attributes.push(std::mem::take(&mut name).to_ascii_lowercase());
                    }
                }
                c => name.push(c),
            }
        }
        if !name.is_empty() && name != "html" {
            attributes.push(name.to_ascii_lowercase());
        }
    }
    (elements, attributes)
}

#[test]
fn alert_groups_events_in_one_message() {
    let input = example_input();
    let events = vec![
        AlertEvent::SlaBreach {
            conversation: input.open[0].clone(),
        },
        AlertEvent::SlaWarn {
            conversation: input.open[1].clone(),
        },
        AlertEvent::SourceUnhealthy {
            source: "support-mail".into(),
            error: "connection refused".into(),
        },
        AlertEvent::SourceHealthy {
            source: "sms".into(),
        },
    ];
    let r = Alert { events }.render(now(), tz()).unwrap();
    assert_eq!(
        r.subject,
        "frontdesk alert: 1 breached, 1 at risk, 1 source unhealthy, 1 source healthy again - Thu 26 Nov 08:00"
    );
    check_snapshot(
        "alert.txt",
        &format!("Subject: {}\n\n{}", r.subject, r.text),
    );
    check_snapshot("alert.html", &r.html);
}

#[test]
fn deferred_alerts_appear_in_the_digest() {
    let mut input = example_input();
    input.deferred_alerts = vec![
        AlertEvent::SlaBreach {
            conversation: input.open[0].clone(),
        },
        AlertEvent::SourceUnhealthy {
            source: "sms".into(),
            error: "<b>down</b>".into(),
        },
    ];
    let r = Digest::build(&input, now(), tz(), Some("Maria"))
        .render()
        .unwrap();
    assert!(
        r.text.contains("DEFERRED ALERTS (quiet hours)"),
        "{}",
        r.text
    );
    assert!(r.text.contains("BREACHED: ACME Ltd"), "{}", r.text);
    assert!(r.html.contains("Deferred alerts (quiet hours)"));
    assert!(r.html.contains("&lt;b&gt;down&lt;"));
    assert_safe(&r);
}

#[test]
fn clean_line_examples() {
    assert_eq!(clean_line("  a\r\n b\tc  ", 20), "a b c");
    assert_eq!(clean_line("\u{202e}abc\u{2066}d\u{2069}", 20), "abcd");
    assert_eq!(clean_line("abcdef", 4), "abc…");
    assert_eq!(clean_line("abcd", 4), "abcd");
    assert_eq!(clean_line("ab cd", 3), "ab…");
    assert_eq!(clean_line("a\u{0}b\u{7f}c\u{1b}[31m", 20), "abc[31m");
    assert_eq!(clean_line(&"x".repeat(10_000), 40).chars().count(), 40);
}

#[test]
fn header_value_strips_line_breaks() {
    assert_eq!(header_value("a\r\nBcc: x\0"), "aBcc: x");
}

#[test]
fn durations_read_like_the_design() {
    assert_eq!(duration_words(25 * 60), "25m");
    assert_eq!(duration_words(2 * 3600 + 5 * 60), "2h 05m");
    assert_eq!(duration_words(3 * 86400 + 4 * 3600), "3d 4h");
    assert_eq!(duration_words(30), "<1m");
    assert_eq!(duration_words(-5), "<1m");
}

#[test]
fn percentile_is_nearest_rank() {
    assert_eq!(percentile(&[], 0.5), None);
    assert_eq!(percentile(&[7], 0.9), Some(7));
    assert_eq!(percentile(&[1, 2, 3, 4], 0.5), Some(2));
    assert_eq!(percentile(&(1..=10).collect::<Vec<_>>(), 0.9), Some(9));
}

#[test]
fn state_follows_due_and_warning_times() {
    let mut c = conv(1, "x", "y", None);
    assert_eq!(open_state(&c, now()), OpenState::Waiting);
    c.warn_at = Some(now());
    assert_eq!(open_state(&c, now()), OpenState::AtRisk);
    c.due = Some(now());
    assert_eq!(open_state(&c, now()), OpenState::Breached);
}

proptest! {
    #[test]
    fn clean_line_output_is_one_safe_line(s in any::<String>(), max in 1usize..80) {
        let out = clean_line(&s, max);
        prop_assert!(out.chars().count() <= max);
        let unsafe_char = out.chars().any(|c| c.is_control()
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
            || c == '\u{2028}' || c == '\u{2029}');
        prop_assert!(!unsafe_char, "unsafe character in {:?}", out);
        prop_assert!(!out.starts_with(' ') && !out.ends_with(' '));
    }

    #[test]
    fn header_value_has_no_line_breaks(s in any::<String>()) {
        let out = header_value(&s);
        prop_assert!(!out.contains(['\r', '\n', '\0']));
    }

    #[test]
    fn subject_counts_match_the_sections(n in 0usize..40, breached in 0usize..40, seed in any::<u64>()) {
        let mut input = DigestInput::default();
        for i in 0..n {
            let mut c = conv(i as i64, &format!("c{i}"), "s", if (seed >> (i % 64)) & 1 == 1 { Some("Maria") } else { None });
            if i < breached {
                c.due = Some(now() - TimeDelta::minutes(1));
            }
            input.open.push(c);
        }
        let d = Digest::build(&input, now(), tz(), Some("Maria"));
        prop_assert_eq!(d.waiting_count(), n);
        prop_assert_eq!(d.breached_count(), breached.min(n));
        let subject = d.subject();
        let expected = format!("frontdesk: {} waiting, {} breached - ", n, breached.min(n));
        prop_assert!(subject.starts_with(&expected));
    }
}
