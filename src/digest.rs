//! What a digest or an alert contains (`Digest`, `Alert`), built from plain rows, and its rendering to
//! text and HTML.
//!
//! `Digest::build` is pure: it takes the rows the store read and `now`, and never reads the clock.
//! Rendering goes through the minijinja templates in `src/digest/` (the one place templates live).
//! Every client-supplied string passes through [`clean_line`] before it reaches a template: control
//! characters and bidi overrides are removed and the text is cut to one short line, and the HTML
//! templates auto-escape. Nothing from a client is put into an attribute, a URL or a header.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use chrono::{DateTime, Datelike, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;
use minijinja::Environment;
use serde::{Deserialize, Serialize};

/// Longest client name shown, in characters.
const CLIENT_CHARS: usize = 40;
/// Longest subject or text excerpt shown, in characters.
const SUBJECT_CHARS: usize = 60;
/// Longest error text shown (SMTP replies, source errors), in characters.
const ERROR_CHARS: usize = 120;
/// Longest list of conversation lines per section; the rest is summarised as "and N more".
const MAX_LINES: usize = 25;
/// Longest list of client names in the one-line sections.
const MAX_NAMES: usize = 10;
/// The statistics window ("this week") and its baseline (the four weeks before it).
const STATS_WEEK: TimeDelta = TimeDelta::days(7);
const STATS_BASELINE: TimeDelta = TimeDelta::days(28);

/// Which reply target a clock measures (sla.md: first reply, next reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// The first reply of a conversation.
    First,
    /// A reply after a later client message.
    Next,
}

impl TargetKind {
    /// The words used in digests: "first reply" or "next reply".
    pub fn words(self) -> &'static str {
        match self {
            TargetKind::First => "first reply",
            TargetKind::Next => "next reply",
        }
    }
}

/// One open conversation waiting for a reply, as the store reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationRow {
    /// The conversation id.
    pub id: i64,
    /// The client in the words people use: name if known, else address or number (client data).
    pub client: String,
    /// A short word for the medium when it is not email, e.g. "SMS" (from the source config).
    pub medium: Option<String>,
    /// The subject, or the first words of the text (client data).
    pub subject: String,
    /// The owner's team name, if the conversation has one.
    pub owner: Option<String>,
    /// The SLA policy name that applies, if any.
    pub policy: Option<String>,
    /// Which target is running, if a policy applies.
    pub target: Option<TargetKind>,
    /// The target's length in seconds (business time), if a policy applies.
    pub target_secs: Option<i64>,
    /// When the oldest unanswered client message arrived.
    pub waiting_since: DateTime<Utc>,
    /// When the policy starts warning, if a policy applies.
    pub warn_at: Option<DateTime<Utc>>,
    /// When the target is due, if a policy applies.
    pub due: Option<DateTime<Utc>>,
}

/// Inbound messages since the last digest, counted per client (and owner, for per-owner digests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewMessagesRow {
    /// The client in the words people use (client data).
    pub client: String,
    /// The owner of the client's conversation, if any.
    pub owner: Option<String>,
    /// How many client messages arrived since the last digest.
    pub messages: u64,
}

/// One reply target fulfilled (a reply sent), as the store reads it; used for "answered" and statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyRow {
    /// The conversation id.
    pub conversation_id: i64,
    /// The client in the words people use (client data).
    pub client: String,
    /// The owner who was responsible, if any.
    pub owner: Option<String>,
    /// Which target the reply fulfilled.
    pub target: TargetKind,
    /// When the reply was sent.
    pub replied_at: DateTime<Utc>,
    /// How long the client waited, in business seconds.
    pub response_secs: i64,
    /// Whether the reply came within the target (`None` when no policy applied).
    pub met: Option<bool>,
}

/// What kind of source a health row describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// An IMAP account.
    Imap,
    /// A webhook endpoint.
    Webhook,
}

/// The health of one configured source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceHealthRow {
    /// The configured source name.
    pub name: String,
    /// IMAP or webhook.
    pub kind: SourceKind,
    /// Whether the source is working now.
    pub healthy: bool,
    /// When its last message arrived.
    pub last_message_at: Option<DateTime<Utc>>,
    /// IMAP ledger: messages seen on the server but not accounted for in the store.
    pub unaccounted: u64,
    /// Webhook requests rejected since the last digest.
    pub rejections: u64,
    /// The last error, when unhealthy (may quote a server: treated as untrusted text).
    pub error: Option<String>,
}

/// An outbox item that failed permanently since the last digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedSendRow {
    /// The outbox id.
    pub outbox_id: i64,
    /// `digest` or `alert`.
    pub kind: String,
    /// The channel name.
    pub channel: String,
    /// Where it was meant to go.
    pub recipient: String,
    /// The last error (may quote a server: treated as untrusted text).
    pub error: String,
    /// When it was given up.
    pub failed_at: DateTime<Utc>,
}

/// Everything a digest is built from; the store fills it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DigestInput {
    /// Start of the "new since" window: the previous digest's time.
    pub since: Option<DateTime<Utc>>,
    /// Open conversations (waiting for a reply).
    pub open: Vec<ConversationRow>,
    /// Client messages since `since`, counted per client.
    pub new_messages: Vec<NewMessagesRow>,
    /// Replies of the last five weeks (statistics) including those since `since` (answered).
    pub replies: Vec<ReplyRow>,
    /// Every configured source.
    pub sources: Vec<SourceHealthRow>,
    /// Permanently failed sends since `since`.
    pub failed_sends: Vec<FailedSendRow>,
    /// Alert events held back by `alerts.quiet_hours`, shown in this digest instead.
    #[serde(default)]
    pub deferred_alerts: Vec<AlertEvent>,
}

/// The SLA state of an open conversation at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpenState {
    /// Waiting, not yet inside the warning window (or no policy).
    Waiting,
    /// Inside the warning window.
    AtRisk,
    /// Past its due time.
    Breached,
}

/// One open conversation as the digest shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpenItem {
    /// The row it came from, with client strings already cleaned to one line.
    pub row: ConversationRow,
    /// Its state at the digest time.
    pub state: OpenState,
}

/// Open conversations of one owner (the all-team digest has one group per owner).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OwnerGroup {
    /// The owner's team name.
    pub owner: String,
    /// Oldest first.
    pub items: Vec<OpenItem>,
}

/// Replies since the last digest, summarised.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AnsweredSummary {
    /// Distinct conversations answered.
    pub conversations: usize,
    /// Median first-reply time in seconds.
    pub first_p50: Option<i64>,
    /// 90th percentile first-reply time in seconds.
    pub first_p90: Option<i64>,
    /// Median next-reply time in seconds.
    pub next_p50: Option<i64>,
    /// 90th percentile next-reply time in seconds.
    pub next_p90: Option<i64>,
}

/// How this week's replies compare with the previous four weeks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "trend", rename_all = "snake_case")]
pub enum Trend {
    /// No replies in one of the two windows.
    NoBaseline,
    /// The p90 is more than 10% lower than the baseline's.
    Faster {
        /// Change of the p90 in percent (negative).
        p90_change_pct: i64,
    },
    /// The p90 is more than 10% higher than the baseline's.
    Slower {
        /// Change of the p90 in percent (positive).
        p90_change_pct: i64,
    },
    /// Within 10% of the baseline.
    Steady,
}

/// First-reply statistics of one owner for this week.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OwnerStats {
    /// The owner's team name, or "unowned".
    pub owner: String,
    /// Median first-reply time this week, seconds.
    pub first_p50: Option<i64>,
    /// 90th percentile first-reply time this week, seconds.
    pub first_p90: Option<i64>,
    /// Median next-reply time this week, seconds.
    pub next_p50: Option<i64>,
    /// 90th percentile next-reply time this week, seconds.
    pub next_p90: Option<i64>,
    /// Replies (first and next) within target this week.
    pub met: usize,
    /// Replies with a target this week.
    pub total: usize,
    /// Compared with the four weeks before.
    pub trend: Trend,
}

/// Reply times of one client this week (the slowest clients are shown).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientStats {
    /// The client in the words people use (cleaned).
    pub client: String,
    /// Median reply time (first and next) this week, seconds.
    pub p50: i64,
    /// 90th percentile reply time this week, seconds.
    pub p90: i64,
    /// Replies within target this week.
    pub met: usize,
    /// Replies with a target this week.
    pub total: usize,
}

/// The digest: what it says, independent of how it is rendered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Digest {
    /// When it was built.
    pub now: DateTime<Utc>,
    /// The time zone it is rendered in.
    #[serde(skip)]
    pub tz: Tz,
    /// The owner it is for (`None`: the all-team digest).
    pub owner: Option<String>,
    /// Open conversations with an owner, grouped by owner, each group oldest first.
    pub waiting: Vec<OwnerGroup>,
    /// Open conversations without an owner, oldest first.
    pub unowned: Vec<OpenItem>,
    /// Clients of breached conversations, most overdue first.
    pub breached: Vec<String>,
    /// Clients of at-risk conversations, soonest due first.
    pub at_risk: Vec<String>,
    /// Start of the "new since" window.
    pub since: DateTime<Utc>,
    /// Client messages since `since`.
    pub new_messages: u64,
    /// Per client (busiest first): name and message count.
    pub new_by_client: Vec<(String, u64)>,
    /// Replies since `since`.
    pub answered: AnsweredSummary,
    /// Per owner statistics for this week.
    pub stats: Vec<OwnerStats>,
    /// The slowest clients this week by p90 reply time (at most five).
    pub slowest_clients: Vec<ClientStats>,
    /// Every configured source.
    pub sources: Vec<SourceHealthRow>,
    /// Permanently failed sends since `since`.
    pub failed_sends: Vec<FailedSendRow>,
    /// Alert events deferred by quiet hours into this digest.
    pub deferred_alerts: Vec<AlertEvent>,
}

/// A rendered message, ready for the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendered {
    /// The subject: no client data, already safe for a header.
    pub subject: String,
    /// The text part, LF line endings (the mail builder converts to CRLF).
    pub text: String,
    /// The HTML part.
    pub html: String,
}

/// Rendering failed: a template bug, never caused by input data.
#[derive(Debug, thiserror::Error)]
#[error("digest template failed: {0}")]
pub struct RenderError(#[from] minijinja::Error);

impl Digest {
    /// Builds a digest at `now` from the rows the store read; `owner` selects a per-owner digest
    /// (the owner's conversations plus the unowned ones), `None` the all-team digest.
    pub fn build(input: &DigestInput, now: DateTime<Utc>, tz: Tz, owner: Option<&str>) -> Digest {
        let mine = |o: &Option<String>| match owner {
            None => true,
            Some(me) => o.as_deref().is_none_or(|o| o == me),
        };
        let since = input.since.unwrap_or(now - TimeDelta::days(1));

        let mut open: Vec<OpenItem> = input
            .open
            .iter()
            .filter(|r| mine(&r.owner))
            .map(|r| OpenItem {
                row: clean_row(r),
                state: open_state(r, now),
            })
            .collect();
        open.sort_by_key(|i| (i.row.waiting_since, i.row.id));

        let mut breached: Vec<&OpenItem> = open
            .iter()
            .filter(|i| i.state == OpenState::Breached)
            .collect();
        breached.sort_by_key(|i| i.row.due);
        let mut at_risk: Vec<&OpenItem> = open
            .iter()
            .filter(|i| i.state == OpenState::AtRisk)
            .collect();
        at_risk.sort_by_key(|i| i.row.due);
        let breached = distinct_clients(breached.iter().map(|i| i.row.client.as_str()));
        let at_risk = distinct_clients(at_risk.iter().map(|i| i.row.client.as_str()));

        let mut groups: BTreeMap<String, Vec<OpenItem>> = BTreeMap::new();
        let mut unowned = Vec::new();
        for item in open {
            match item.row.owner.clone() {
                Some(o) => groups.entry(o).or_default().push(item),
                None => unowned.push(item),
            }
        }
        // The reader's own group comes first; others follow by name.
        let mut waiting: Vec<OwnerGroup> = groups
            .into_iter()
            .map(|(owner, items)| OwnerGroup { owner, items })
            .collect();
        if let Some(me) = owner {
            waiting.sort_by_key(|g| g.owner != me);
        }

        let mut per_client: BTreeMap<String, u64> = BTreeMap::new();
        let mut new_messages = 0;
        for r in input.new_messages.iter().filter(|r| mine(&r.owner)) {
            *per_client
                .entry(clean_line(&r.client, CLIENT_CHARS))
                .or_default() += r.messages;
            new_messages += r.messages;
        }
        let mut new_by_client: Vec<(String, u64)> = per_client.into_iter().collect();
        new_by_client.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

        let replies: Vec<&ReplyRow> = input.replies.iter().filter(|r| mine(&r.owner)).collect();
        let answered = answered_summary(&replies, since, now);
        let stats = owner_stats(&replies, now, owner);
        let slowest_clients = slowest_clients(&replies, now);

        let sources = input
            .sources
            .iter()
            .map(|s| SourceHealthRow {
                name: clean_line(&s.name, CLIENT_CHARS),
                error: s.error.as_deref().map(|e| clean_line(e, ERROR_CHARS)),
                ..s.clone()
            })
            .collect();
        let failed_sends = input
            .failed_sends
            .iter()
            .map(|f| FailedSendRow {
                recipient: clean_line(&f.recipient, CLIENT_CHARS * 2),
                error: clean_line(&f.error, ERROR_CHARS),
                channel: clean_line(&f.channel, CLIENT_CHARS),
                kind: clean_line(&f.kind, 10),
                ..f.clone()
            })
            .collect();

        Digest {
            now,
            tz,
            owner: owner.map(|o| clean_line(o, CLIENT_CHARS)),
            waiting,
            unowned,
            breached,
            at_risk,
            since,
            new_messages,
            new_by_client,
            answered,
            stats,
            slowest_clients,
            sources,
            failed_sends,
            deferred_alerts: input.deferred_alerts.clone(),
        }
    }

    /// Conversations shown as waiting (owned and unowned): the first number of the subject.
    pub fn waiting_count(&self) -> usize {
        self.waiting.iter().map(|g| g.items.len()).sum::<usize>() + self.unowned.len()
    }

    /// Conversations past their due time: the second number of the subject.
    pub fn breached_count(&self) -> usize {
        self.waiting
            .iter()
            .flat_map(|g| g.items.iter())
            .chain(self.unowned.iter())
            .filter(|i| i.state == OpenState::Breached)
            .count()
    }

    /// The subject line: `frontdesk: 3 waiting, 1 breached - Tue 26 Nov 08:00` in the digest's zone.
    pub fn subject(&self) -> String {
        header_value(&format!(
            "frontdesk: {} waiting, {} breached - {}",
            self.waiting_count(),
            self.breached_count(),
            self.now.with_timezone(&self.tz).format("%a %-d %b %H:%M")
        ))
    }

    /// Renders subject, text and HTML.
    pub fn render(&self) -> Result<Rendered, RenderError> {
        let view = self.view();
        let env = templates();
        let text = env.get_template("digest.txt.j2")?.render(&view)?;
        let html = env.get_template("digest.html.j2")?.render(&view)?;
        Ok(Rendered {
            subject: self.subject(),
            text: text_part(&text),
            html,
        })
    }

    fn view(&self) -> minijinja::Value {
        let local = self.now.with_timezone(&self.tz);
        let waiting = self.waiting_count();
        let breached = self.breached_count();
        let salutation = match local.hour() {
            0..=11 => "Good morning",
            12..=17 => "Good afternoon",
            _ => "Good evening",
        };
        let greeting = match (&self.owner, waiting, breached) {
            (Some(o), _, _) => format!("{salutation} {o}."),
            (None, _, _) => format!("{salutation}."),
        };
        let summary = match (waiting, breached) {
            (0, _) => "Nothing is waiting.".to_string(),
            (w, 0) => format!(
                "{} waiting for {}; none is past its target.",
                clients(w),
                you(&self.owner)
            ),
            (w, b) => format!(
                "{} waiting for {}; {b} {} past {} target.",
                clients(w),
                you(&self.owner),
                if b == 1 { "is" } else { "are" },
                if b == 1 { "its" } else { "their" }
            ),
        };
        let groups: Vec<minijinja::Value> = self
            .waiting
            .iter()
            .map(|g| {
                let (lines, more) = item_lines(&g.items, self.now);
                minijinja::context! { owner => g.owner.clone(), lines => lines, more => more }
            })
            .collect();
        let (unowned, unowned_more) = item_lines(&self.unowned, self.now);
        let (new_clients, new_more) = cap(
            self.new_by_client
                .iter()
                .map(|(c, n)| minijinja::context! { client => c.clone(), count => *n })
                .collect(),
            MAX_NAMES,
        );
        let new_clients_line = {
            let mut parts: Vec<String> = self
                .new_by_client
                .iter()
                .take(MAX_NAMES)
                .map(|(c, n)| format!("{c} ({n})"))
                .collect();
            if new_more > 0 {
                parts.push(format!("{new_more} more"));
            }
            parts.join(", ")
        };
        let (breached_names, breached_more) = cap(self.breached.clone(), MAX_NAMES);
        let (at_risk_names, at_risk_more) = cap(self.at_risk.clone(), MAX_NAMES);
        let stats: Vec<minijinja::Value> = self
            .stats
            .iter()
            .map(|s| {
                minijinja::context! {
                    owner => s.owner.clone(),
                    first => format!("{} / {}", opt_dur(s.first_p50), opt_dur(s.first_p90)),
                    next => format!("{} / {}", opt_dur(s.next_p50), opt_dur(s.next_p90)),
                    met => format!("{}/{}", s.met, s.total),
                    trend => trend_words(s.trend),
                    slower => matches!(s.trend, Trend::Slower { .. }),
                }
            })
            .collect();
        let slowest: Vec<String> = self
            .slowest_clients
            .iter()
            .map(|c| {
                format!(
                    "{} {} / {} ({}/{} met)",
                    c.client,
                    duration_words(c.p50),
                    duration_words(c.p90),
                    c.met,
                    c.total
                )
            })
            .collect();
        let healthy = self.sources.iter().filter(|s| s.healthy).count();
        let sources: Vec<minijinja::Value> = self
            .sources
            .iter()
            .map(|s| minijinja::context! { name => s.name.clone(), healthy => s.healthy, words => source_words(s, self.now) })
            .collect();
        let failed: Vec<minijinja::Value> = self
            .failed_sends
            .iter()
            .map(|f| {
                minijinja::context! {
                    kind => f.kind.clone(),
                    channel => f.channel.clone(),
                    recipient => f.recipient.clone(),
                    error => f.error.clone(),
                    at => self.local_label(f.failed_at),
                }
            })
            .collect();
        let a = &self.answered;
        let answered = if a.conversations == 0 {
            "none".to_string()
        } else {
            let mut s = format!(
                "{} conversation{}",
                a.conversations,
                if a.conversations == 1 { "" } else { "s" }
            );
            if let Some(p50) = a.first_p50 {
                s.push_str(&format!(
                    ", first reply median {} (p90 {})",
                    duration_words(p50),
                    opt_dur(a.first_p90)
                ));
            }
            if let Some(p50) = a.next_p50 {
                s.push_str(&format!(
                    ", next reply median {} (p90 {})",
                    duration_words(p50),
                    opt_dur(a.next_p90)
                ));
            }
            s
        };
        let deferred = alert_lines(&self.deferred_alerts, self.now);
        minijinja::context! {
            deferred => deferred,
            subject => self.subject(),
            greeting => greeting,
            summary => summary,
            team => self.owner.is_none(),
            waiting_groups => groups,
            unowned => unowned,
            unowned_more => unowned_more,
            breached_count => self.breached.len(),
            breached_names => breached_names,
            breached_more => breached_more,
            at_risk_count => self.at_risk.len(),
            at_risk_names => at_risk_names,
            at_risk_more => at_risk_more,
            since_label => self.local_label(self.since),
            new_messages => self.new_messages,
            new_clients_count => self.new_by_client.len(),
            new_clients_line => new_clients_line,
            new_clients => new_clients,
            new_more => new_more,
            answered => answered,
            stats => stats,
            slowest => slowest,
            sources => sources,
            sources_healthy => healthy,
            sources_total => self.sources.len(),
            failed => failed,
        }
    }

    /// A past time as the reader's calendar says it: "yesterday 17:00", "08:00", "Mon 23 Nov 17:00".
    fn local_label(&self, t: DateTime<Utc>) -> String {
        let now = self.now.with_timezone(&self.tz);
        let t = t.with_timezone(&self.tz);
        let days = now.date_naive().num_days_from_ce() - t.date_naive().num_days_from_ce();
        match days {
            0 => format!("today {}", t.format("%H:%M")),
            1 => format!("yesterday {}", t.format("%H:%M")),
            _ => t.format("%a %-d %b %H:%M").to_string(),
        }
    }
}

/// One SLA event an alert reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AlertEvent {
    /// A conversation entered its warning window.
    SlaWarn {
        /// The conversation, as at the event.
        conversation: ConversationRow,
    },
    /// A conversation passed its due time.
    SlaBreach {
        /// The conversation, as at the event.
        conversation: ConversationRow,
    },
    /// A source stopped working.
    SourceUnhealthy {
        /// The configured source name.
        source: String,
        /// What went wrong (untrusted text).
        error: String,
    },
    /// A source works again.
    SourceHealthy {
        /// The configured source name.
        source: String,
    },
}

/// Events grouped within `alerts.group_wait`, sent as one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// The events in the order they happened.
    pub events: Vec<AlertEvent>,
}

impl Alert {
    /// The subject: counts only, e.g. `frontdesk alert: 1 breached, 2 at risk - Tue 26 Nov 08:00`.
    pub fn subject(&self, now: DateTime<Utc>, tz: Tz) -> String {
        let mut parts = Vec::new();
        let count = |f: fn(&AlertEvent) -> bool| self.events.iter().filter(|e| f(e)).count();
        let breach = count(|e| matches!(e, AlertEvent::SlaBreach { .. }));
        let warn = count(|e| matches!(e, AlertEvent::SlaWarn { .. }));
        let down = count(|e| matches!(e, AlertEvent::SourceUnhealthy { .. }));
        let up = count(|e| matches!(e, AlertEvent::SourceHealthy { .. }));
        if breach > 0 {
            parts.push(format!("{breach} breached"));
        }
        if warn > 0 {
            parts.push(format!("{warn} at risk"));
        }
        if down > 0 {
            parts.push(format!(
                "{down} source{} unhealthy",
                if down == 1 { "" } else { "s" }
            ));
        }
        if up > 0 {
            parts.push(format!(
                "{up} source{} healthy again",
                if up == 1 { "" } else { "s" }
            ));
        }
        if parts.is_empty() {
            parts.push("no events".to_string());
        }
        header_value(&format!(
            "frontdesk alert: {} - {}",
            parts.join(", "),
            now.with_timezone(&tz).format("%a %-d %b %H:%M")
        ))
    }

    /// Renders subject, text and HTML at `now` in `tz`.
    pub fn render(&self, now: DateTime<Utc>, tz: Tz) -> Result<Rendered, RenderError> {
        let events = alert_lines(&self.events, now);
        let subject = self.subject(now, tz);
        let view = minijinja::context! { subject => subject.clone(), events => events };
        let env = templates();
        let text = env.get_template("alert.txt.j2")?.render(&view)?;
        let html = env.get_template("alert.html.j2")?.render(&view)?;
        Ok(Rendered {
            subject,
            text: text_part(&text),
            html,
        })
    }
}

/// The alert events as template values (client strings cleaned).
fn alert_lines(events: &[AlertEvent], now: DateTime<Utc>) -> Vec<minijinja::Value> {
    events
        .iter()
        .map(|e| match e {
            AlertEvent::SlaWarn { conversation } | AlertEvent::SlaBreach { conversation } => {
                let item = OpenItem {
                    row: clean_row(conversation),
                    state: if matches!(e, AlertEvent::SlaBreach { .. }) {
                        OpenState::Breached
                    } else {
                        OpenState::AtRisk
                    },
                };
                let mut line = item_line(&item, now);
                line.heading = match item.state {
                    OpenState::Breached => "BREACHED",
                    _ => "AT RISK",
                };
                line.owner = item
                    .row
                    .owner
                    .clone()
                    .unwrap_or_else(|| "not yet owned".into());
                minijinja::Value::from(minijinja::value::Serde(&line))
            }
            AlertEvent::SourceUnhealthy { source, error } => minijinja::context! {
                heading => "SOURCE UNHEALTHY",
                source => clean_line(source, CLIENT_CHARS),
                error => clean_line(error, ERROR_CHARS),
                bad => true,
            },
            AlertEvent::SourceHealthy { source } => minijinja::context! {
                heading => "SOURCE HEALTHY AGAIN",
                source => clean_line(source, CLIENT_CHARS),
                bad => false,
            },
        })
        .collect()
}

/// Makes client text safe to show on one line: control characters, bidi controls and zero-width
/// characters are removed, line breaks and tabs become spaces, runs of spaces collapse, and the
/// result is cut to `max_chars` characters (ending in "…" when cut).
pub fn clean_line(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars * 4));
    let mut chars = 0;
    let mut pending_space = false;
    for c in s.chars() {
        let c = match c {
            '\t' | '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}' | '\u{a0}' => ' ',
            // Bidi embeddings, overrides and isolates, marks, and zero-width characters can
            // reorder or hide what the reader sees.
            '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
            | '\u{200b}'..='\u{200f}'
            | '\u{061c}'
            | '\u{2060}'..='\u{2064}'
            | '\u{feff}' => continue,
            c if c.is_control() => continue,
            c => c,
        };
        if c == ' ' {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            if chars + 1 >= max_chars {
                // No room for the space and another character: end with the ellipsis, replacing
                // the last character when the line is already full.
                if chars >= max_chars {
                    out.pop();
                }
                out.push('…');
                return out;
            }
            out.push(' ');
            chars += 1;
            pending_space = false;
        }
        if chars + 1 > max_chars {
            // Replace the last character by the ellipsis so the result keeps max_chars characters.
            out.pop();
            out.push('…');
            return out;
        }
        out.push(c);
        chars += 1;
    }
    out
}

/// Makes a string safe as a header value: CR, LF and NUL (and every other control character) are
/// removed, so no value can start a new header line.
pub fn header_value(s: &str) -> String {
    s.chars()
        .map(|c| if c == '\t' { ' ' } else { c })
        .filter(|c| !c.is_control())
        .collect()
}

/// The text part as sent: no C0 controls but LF (tabs expanded), trailing spaces trimmed.
fn text_part(rendered: &str) -> String {
    let mut out = String::with_capacity(rendered.len());
    for line in rendered.split('\n') {
        let line: String = line
            .chars()
            .map(|c| if c == '\t' { ' ' } else { c })
            .filter(|c| !c.is_control())
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let trimmed = out.trim_end_matches('\n').len();
    out.truncate(trimmed);
    out.push('\n');
    out
}

fn clean_row(r: &ConversationRow) -> ConversationRow {
    ConversationRow {
        client: clean_line(&r.client, CLIENT_CHARS),
        medium: r.medium.as_deref().map(|m| clean_line(m, 12)),
        subject: clean_line(&r.subject, SUBJECT_CHARS),
        owner: r.owner.as_deref().map(|o| clean_line(o, CLIENT_CHARS)),
        policy: r.policy.as_deref().map(|p| clean_line(p, CLIENT_CHARS)),
        ..r.clone()
    }
}

/// The state of an open conversation at `now`, from its due and warning times.
pub fn open_state(r: &ConversationRow, now: DateTime<Utc>) -> OpenState {
    match (r.due, r.warn_at) {
        (Some(due), _) if due <= now => OpenState::Breached,
        (_, Some(warn)) if warn <= now => OpenState::AtRisk,
        _ => OpenState::Waiting,
    }
}

fn distinct_clients<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    names
        .filter(|n| seen.insert(*n))
        .map(str::to_string)
        .collect()
}

#[derive(Debug, Serialize)]
struct ItemLine {
    heading: &'static str,
    owner: String,
    mark: &'static str,
    state: OpenState,
    client: String,
    medium: Option<String>,
    subject: String,
    when: String,
    why: Option<String>,
}

fn item_line(i: &OpenItem, now: DateTime<Utc>) -> ItemLine {
    let when = match i.row.due {
        Some(due) if due <= now => format!("overdue {}", duration_words((now - due).num_seconds())),
        Some(due) => format!("due in {}", duration_words((due - now).num_seconds())),
        None => format!(
            "waiting {}",
            duration_words((now - i.row.waiting_since).num_seconds())
        ),
    };
    let why = match (&i.row.policy, i.row.target, i.row.target_secs) {
        (Some(p), Some(t), Some(secs)) => {
            Some(format!("{p}: {} {}", t.words(), duration_words(secs)))
        }
        (Some(p), _, _) => Some(p.clone()),
        _ => None,
    };
    ItemLine {
        heading: "",
        owner: String::new(),
        mark: if i.state == OpenState::Breached {
            "!"
        } else {
            " "
        },
        state: i.state,
        client: i.row.client.clone(),
        medium: i.row.medium.clone(),
        subject: i.row.subject.clone(),
        when,
        why,
    }
}

fn item_lines(items: &[OpenItem], now: DateTime<Utc>) -> (Vec<minijinja::Value>, usize) {
    let more = items.len().saturating_sub(MAX_LINES);
    let lines = items
        .iter()
        .take(MAX_LINES)
        .map(|i| minijinja::Value::from(minijinja::value::Serde(item_line(i, now))))
        .collect();
    (lines, more)
}

fn cap<T>(mut v: Vec<T>, n: usize) -> (Vec<T>, usize) {
    let more = v.len().saturating_sub(n);
    v.truncate(n);
    (v, more)
}

fn clients(n: usize) -> String {
    if n == 1 {
        "1 client is".to_string()
    } else {
        format!("{n} clients are")
    }
}

fn you(owner: &Option<String>) -> &'static str {
    if owner.is_some() { "you" } else { "the team" }
}

/// Nearest-rank percentile of already sorted values.
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn sorted_secs<'a>(rows: impl Iterator<Item = &'a &'a ReplyRow>) -> Vec<i64> {
    let mut v: Vec<i64> = rows.map(|r| r.response_secs).collect();
    v.sort_unstable();
    v
}

fn answered_summary(
    replies: &[&ReplyRow],
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> AnsweredSummary {
    let recent: Vec<&ReplyRow> = replies
        .iter()
        .copied()
        .filter(|r| r.replied_at > since && r.replied_at <= now)
        .collect();
    let conversations = recent
        .iter()
        .map(|r| r.conversation_id)
        .collect::<std::collections::HashSet<_>>()
        .len();
    let first = sorted_secs(recent.iter().filter(|r| r.target == TargetKind::First));
    let next = sorted_secs(recent.iter().filter(|r| r.target == TargetKind::Next));
    AnsweredSummary {
        conversations,
        first_p50: percentile(&first, 0.5),
        first_p90: percentile(&first, 0.9),
        next_p50: percentile(&next, 0.5),
        next_p90: percentile(&next, 0.9),
    }
}

fn owner_stats(replies: &[&ReplyRow], now: DateTime<Utc>, owner: Option<&str>) -> Vec<OwnerStats> {
    let week_start = now - STATS_WEEK;
    let base_start = week_start - STATS_BASELINE;
    let mut by_owner: BTreeMap<String, (Vec<&ReplyRow>, Vec<&ReplyRow>)> = BTreeMap::new();
    for r in replies {
        let name = match (&r.owner, owner) {
            (Some(o), _) => clean_line(o, CLIENT_CHARS),
            // Unowned replies are not "the reader's" statistics in a per-owner digest.
            (None, Some(_)) => continue,
            (None, None) => "unowned".to_string(),
        };
        let slot = by_owner.entry(name).or_default();
        if r.replied_at > week_start && r.replied_at <= now {
            slot.0.push(r);
        } else if r.replied_at > base_start && r.replied_at <= week_start {
            slot.1.push(r);
        }
    }
    by_owner
        .into_iter()
        .filter(|(_, (week, _))| !week.is_empty())
        .map(|(owner, (week, base))| {
            let first = sorted_secs(week.iter().filter(|r| r.target == TargetKind::First));
            let next = sorted_secs(week.iter().filter(|r| r.target == TargetKind::Next));
            let all_week = sorted_secs(week.iter());
            let all_base = sorted_secs(base.iter());
            let trend = match (percentile(&all_week, 0.9), percentile(&all_base, 0.9)) {
                (Some(w), Some(b)) if b > 0 => {
                    let pct = ((w - b) as f64 * 100.0 / b as f64).round() as i64;
                    if pct < -10 {
                        Trend::Faster {
                            p90_change_pct: pct,
                        }
                    } else if pct > 10 {
                        Trend::Slower {
                            p90_change_pct: pct,
                        }
                    } else {
                        Trend::Steady
                    }
                }
                _ => Trend::NoBaseline,
            };
            let with_target: Vec<&&ReplyRow> = week.iter().filter(|r| r.met.is_some()).collect();
            OwnerStats {
                owner,
                first_p50: percentile(&first, 0.5),
                first_p90: percentile(&first, 0.9),
                next_p50: percentile(&next, 0.5),
                next_p90: percentile(&next, 0.9),
                met: with_target.iter().filter(|r| r.met == Some(true)).count(),
                total: with_target.len(),
                trend,
            }
        })
        .collect()
}

/// Clients whose p90 reply time this week is the longest (at most five, slowest first).
fn slowest_clients(replies: &[&ReplyRow], now: DateTime<Utc>) -> Vec<ClientStats> {
    let week_start = now - STATS_WEEK;
    let mut by_client: BTreeMap<String, Vec<&ReplyRow>> = BTreeMap::new();
    for r in replies
        .iter()
        .filter(|r| r.replied_at > week_start && r.replied_at <= now)
    {
        by_client
            .entry(clean_line(&r.client, CLIENT_CHARS))
            .or_default()
            .push(r);
    }
    let mut out: Vec<ClientStats> = by_client
        .into_iter()
        .filter_map(|(client, rows)| {
            let secs = sorted_secs(rows.iter());
            let with_target = rows.iter().filter(|r| r.met.is_some()).count();
            Some(ClientStats {
                client,
                p50: percentile(&secs, 0.5)?,
                p90: percentile(&secs, 0.9)?,
                met: rows.iter().filter(|r| r.met == Some(true)).count(),
                total: with_target,
            })
        })
        .collect();
    out.sort_by(|a, b| b.p90.cmp(&a.p90).then_with(|| a.client.cmp(&b.client)));
    out.truncate(5);
    out
}

fn trend_words(t: Trend) -> String {
    match t {
        Trend::NoBaseline => "no baseline".to_string(),
        Trend::Faster { p90_change_pct } => format!("faster (p90 {p90_change_pct}%)"),
        Trend::Slower { p90_change_pct } => format!("slower (p90 +{p90_change_pct}%)"),
        Trend::Steady => "steady".to_string(),
    }
}

fn source_words(s: &SourceHealthRow, now: DateTime<Utc>) -> String {
    if !s.healthy {
        return match &s.error {
            Some(e) => format!("{} UNHEALTHY ({e})", s.name),
            None => format!("{} UNHEALTHY", s.name),
        };
    }
    let mut w = match s.last_message_at {
        Some(t) => format!(
            "{} last message {} ago",
            s.name,
            duration_words((now - t).num_seconds())
        ),
        None => format!("{} ok", s.name),
    };
    match s.kind {
        SourceKind::Imap => w.push_str(&format!(", {} unaccounted", s.unaccounted)),
        SourceKind::Webhook if s.rejections > 0 => {
            w.push_str(&format!(", {} rejected", s.rejections))
        }
        SourceKind::Webhook => {}
    }
    w
}

fn opt_dur(secs: Option<i64>) -> String {
    secs.map(duration_words).unwrap_or_else(|| "-".to_string())
}

/// A duration as the digest says it: "25m", "2h 05m", "3d 4h"; under a minute is "<1m".
pub fn duration_words(secs: i64) -> String {
    let secs = secs.max(0);
    let mins = secs / 60;
    let (d, h, m) = (mins / 1440, (mins / 60) % 24, mins % 60);
    if mins == 0 {
        "<1m".to_string()
    } else if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 && m == 0 {
        format!("{h}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else {
        format!("{m}m")
    }
}

/// Pads (or cuts) to `width` characters, for the text part's columns.
fn pad(value: String, width: usize) -> String {
    let n = value.chars().count();
    if n >= width {
        value
    } else {
        let mut s = value;
        s.extend(std::iter::repeat_n(' ', width - n));
        s
    }
}

fn templates() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build();
        if let Ok(syntax) = syntax {
            env.set_syntax(syntax);
        }
        env.add_filter("pad", pad);
        for (name, source) in [
            ("digest.txt.j2", include_str!("digest/digest.txt.j2")),
            ("digest.html.j2", include_str!("digest/digest.html.j2")),
            ("alert.txt.j2", include_str!("digest/alert.txt.j2")),
            ("alert.html.j2", include_str!("digest/alert.html.j2")),
        ] {
            // The templates are compiled in; a syntax error is caught by the snapshot tests, and
            // get_template then reports it instead of panicking here.
            let _ = env.add_template(name, source);
        }
        env
    })
}

#[cfg(test)]
mod tests;
