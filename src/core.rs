//! The single core loop: the only writer of conversations and SLA targets.
//!
//! Each step runs in one store transaction: take unprocessed messages in id order, thread each
//! into a conversation (`thread`), resolve client, owner and policy (`rules`), advance its SLA
//! clock (`sla::clock`); then tick every conversation whose next deadline has come and put warn
//! and breach events into `alert_events` (the sender groups them into alert messages). Events are
//! keyed `warn|breach:{conversation}:{seq}` (unique) and written in the same transaction as the
//! clock, so each fires at most once per target instance whatever restarts happen. Between
//! steps the loop sleeps until the next deadline or a wake-up from ingest.
//!
//! A warn or breach that becomes known only together with the reply that fulfils the target
//! (a backlog after downtime) is recorded on the target but not alerted: the client has been
//! answered, and an alert would only be noise.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::message::{Automation, Direction};
use crate::rules::{
    self, ClientMatch, ClientRule, Facts, Match, Normalization, OwnerRule, PolicyRule, TeamMember,
};
use crate::sla::calendar::{self, Calendar, CalendarError, IcsError};
use crate::sla::clock::{self, ClockInput, Event, EventKind, Policy, WarnBefore};
use crate::store::core::{ConversationRow, PendingMessage};
use crate::store::{self, Store};
use crate::thread::{self, Candidate, ConversationId, Hints};

/// Messages handled per transaction: one fsync per batch instead of per message.
const BATCH: u32 = 256;

/// Why the configured rules could not be turned into routing data.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// A calendar's hours are invalid.
    #[error("sla.calendars.{name}: {source}")]
    Calendar {
        /// Calendar name.
        name: String,
        /// What is wrong.
        source: CalendarError,
    },
    /// A holidays file cannot be read.
    #[error("sla.calendars.{name}.holidays_file {path}: {reason}")]
    HolidaysFile {
        /// Calendar name.
        name: String,
        /// File path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A holidays file is not valid iCalendar.
    #[error("sla.calendars.{name}.holidays_file: {source}")]
    Ics {
        /// Calendar name.
        name: String,
        /// The parse problem.
        source: IcsError,
    },
    /// A policy names a calendar that does not exist.
    #[error("sla.policies.{policy}: unknown calendar '{calendar}'")]
    UnknownCalendar {
        /// Policy name.
        policy: String,
        /// The calendar it names.
        calendar: String,
    },
    /// A duration does not fit.
    #[error("sla.policies.{0}: duration out of range")]
    Duration(String),
}

/// Where warn and breach alerts go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSettings {
    /// Channel name.
    pub channel: String,
    /// Alert on warnings.
    pub warn: bool,
    /// Alert on breaches.
    pub breach: bool,
}

/// The rules the core applies, built from the config.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Address normalization options.
    pub normalization: Normalization,
    /// Team members (their messages are replies).
    pub team: Vec<TeamMember>,
    /// Client rules, in order.
    pub clients: Vec<ClientRule>,
    /// Owner rules, in order.
    pub owners: Vec<OwnerRule>,
    /// Policy selection rules, in order.
    pub policy_rules: Vec<PolicyRule>,
    /// Policies by name.
    pub policies: BTreeMap<String, Policy>,
    /// Alert settings; `None` writes no alert rows.
    pub alerts: Option<AlertSettings>,
}

fn to_match(m: &Option<config::RuleMatch>, norm: &Normalization) -> Match {
    let Some(m) = m else {
        return Match::default();
    };
    Match {
        client: m.client.clone(),
        client_tag: m.client_tag.clone(),
        email: m
            .email
            .iter()
            .filter_map(|e| rules::normalize(e, norm))
            .collect(),
        email_domain: m.email_domain.iter().map(|d| d.to_lowercase()).collect(),
        source: m.source.clone(),
        keyword: m.keyword.clone(),
    }
}

/// Builds the calendar named `name` from its config, reading its holidays file.
pub fn build_calendar(name: &str, c: &config::CalendarConfig) -> Result<Calendar, RoutingError> {
    let weekly = calendar::parse_hours(&c.hours).map_err(|source| RoutingError::Calendar {
        name: name.to_string(),
        source,
    })?;
    let mut holidays = c.holidays.clone();
    if let Some(path) = &c.holidays_file {
        let text = std::fs::read_to_string(path).map_err(|e| RoutingError::HolidaysFile {
            name: name.to_string(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let dates = calendar::parse_ics(&text).map_err(|source| RoutingError::Ics {
            name: name.to_string(),
            source,
        })?;
        holidays.extend(dates);
    }
    Calendar::new(c.timezone, weekly, holidays).map_err(|source| RoutingError::Calendar {
        name: name.to_string(),
        source,
    })
}

impl Routing {
    /// Builds the routing data from a validated config (reads holidays files).
    pub fn from_config(cfg: &Config) -> Result<Routing, RoutingError> {
        let norm = Normalization::default();
        let n = |a: &String| rules::normalize(a, &norm);
        let team = cfg
            .team
            .iter()
            .map(|m| TeamMember {
                name: m.name.clone(),
                addresses: m
                    .email
                    .iter()
                    .chain(&m.phone)
                    .filter_map(n)
                    .chain(
                        m.handles
                            .iter()
                            .filter_map(|(kind, id)| n(&format!("{kind}:{id}"))),
                    )
                    .collect(),
            })
            .collect();
        let clients = cfg
            .clients
            .iter()
            .map(|c| ClientRule {
                name: c.name.clone(),
                tags: c.tags.clone(),
                matcher: ClientMatch {
                    email: c.email.iter().filter_map(n).collect(),
                    email_domain: c.email_domain.iter().map(|d| d.to_lowercase()).collect(),
                    phone: c.phone.iter().filter_map(n).collect(),
                    handle: c.handle.iter().filter_map(n).collect(),
                    source: c.source.clone(),
                },
            })
            .collect();
        let owners = cfg
            .responsibilities
            .iter()
            .map(|r| OwnerRule {
                matcher: to_match(&r.matches, &norm),
                owner: r.owner.clone(),
            })
            .collect();
        let mut calendars = BTreeMap::new();
        for (name, c) in &cfg.sla.calendars {
            calendars.insert(name.clone(), build_calendar(name, c)?);
        }
        let mut policy_rules = Vec::new();
        let mut policies = BTreeMap::new();
        for p in &cfg.sla.policies {
            let calendar = if p.calendar == "always" {
                Calendar::always()
            } else {
                calendars.get(&p.calendar).cloned().ok_or_else(|| {
                    RoutingError::UnknownCalendar {
                        policy: p.name.clone(),
                        calendar: p.calendar.clone(),
                    }
                })?
            };
            let delta = |d: std::time::Duration| {
                TimeDelta::from_std(d).map_err(|_| RoutingError::Duration(p.name.clone()))
            };
            let warn_before = match p.warn_before {
                config::WarnBefore::Duration(d) => WarnBefore::Duration(delta(d)?),
                config::WarnBefore::Percent(x) => {
                    WarnBefore::Percent(x.clamp(0.0, 100.0).round() as u8)
                }
            };
            policies.insert(
                p.name.clone(),
                Policy {
                    name: p.name.clone(),
                    first_reply: delta(p.first_reply)?,
                    next_reply: delta(p.next_reply)?,
                    warn_before,
                    calendar_name: p.calendar.clone(),
                    calendar,
                },
            );
            policy_rules.push(PolicyRule {
                policy: p.name.clone(),
                matcher: to_match(&p.matches, &norm),
            });
        }
        let alerts = Some(&cfg.alerts)
            .filter(|a| !a.channel.is_empty())
            .map(|a| AlertSettings {
                channel: a.channel.clone(),
                warn: a.on.contains(&config::AlertKind::SlaWarning),
                breach: a.on.contains(&config::AlertKind::SlaBreach),
            });
        Ok(Routing {
            normalization: norm,
            team,
            clients,
            owners,
            policy_rules,
            policies,
            alerts,
        })
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Messages handled.
    pub messages: usize,
    /// Conversations ticked because a deadline came.
    pub ticked: usize,
    /// Alert rows written.
    pub alerts: usize,
}

/// The core loop over one store.
#[derive(Debug, Clone)]
pub struct Core {
    store: Store,
    routing: Arc<Routing>,
    health: Option<Arc<crate::health::Health>>,
    /// The leader lease (several replicas): proven alive before each step; when it is lost the
    /// loop cancels `lost` and stops.
    leader: Option<(crate::store::lease::SharedLease, CancellationToken)>,
}

/// How long the core waits after a wake-up from ingest before it steps (see `Core::run`).
const COALESCE: std::time::Duration = std::time::Duration::from_millis(20);

/// How long one core step may take before the watchdog counts the core as stuck.
const STEP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// Replaces CR, LF, NUL and other controls: alert subjects become mail headers.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Core {
    /// A core over `store` applying `routing`.
    pub fn new(store: Store, routing: Arc<Routing>) -> Self {
        Core {
            store,
            routing,
            health: None,
            leader: None,
        }
    }

    /// Reports each step to `health`: a step past its deadline withholds the systemd watchdog.
    pub fn with_health(mut self, health: Arc<crate::health::Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// Steps only while `lease` is alive; cancels `lost` and stops when it is not.
    pub fn with_leader(
        mut self,
        lease: crate::store::lease::SharedLease,
        lost: CancellationToken,
    ) -> Self {
        self.leader = Some((lease, lost));
        self
    }

    /// Runs until `shutdown`: steps, then sleeps until the next deadline or a wake-up.
    pub async fn run(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        if let Err(e) = self.recompute(Utc::now()).await {
            tracing::warn!(error = %e, "core could not recompute open targets");
        }
        loop {
            // Registered before the step so a wake-up during it is not lost.
            let notified = wake.notified();
            let mut busy = false;
            if let Some((lease, lost)) = &self.leader
                && lease.lock().await.alive().await.is_err()
            {
                lost.cancel();
                return;
            }
            if let Some(h) = &self.health {
                h.busy_until("core", std::time::Instant::now() + STEP_DEADLINE);
            }
            match self.run_once(Utc::now()).await {
                Ok(p) => {
                    busy = p.messages >= BATCH as usize;
                    if let Some(h) = &self.health {
                        h.ok("core", Utc::now());
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "core step failed; retrying");
                    if let Some(h) = &self.health {
                        h.failed("core", &e.to_string(), Utc::now());
                    }
                }
            }
            if busy {
                continue;
            }
            let next = self.store.next_core_deadline().await.ok().flatten();
            let max_sleep = std::time::Duration::from_secs(60);
            let sleep = next
                .map(|t| (t - Utc::now()).to_std().unwrap_or_default())
                .unwrap_or(max_sleep)
                .min(max_sleep);
            let woken = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = notified => true,
                _ = tokio::time::sleep(sleep) => false,
            };
            if woken {
                // Ingest wakes the core after every commit. Gathering what arrives in the next
                // few milliseconds makes one step (one transaction, one fsync) of many messages
                // instead of one per webhook batch, so the core takes the single writer
                // connection less often; SLA times are unaffected (they use receipt times).
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(COALESCE) => {}
                }
            }
        }
    }

    /// One step at `now`: handles all pending messages (in batches), then the due deadlines.
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<Progress, store::Error> {
        let mut progress = Progress::default();
        loop {
            // Reads and threading happen on a reader snapshot; the single writer connection,
            // which webhook acknowledgements wait for, is held only for the step's writes.
            let mut tx = self.store.begin_core_read().await?;
            let batch = tx.pending(BATCH).await?;
            if batch.is_empty() {
                tx.rollback().await?;
                break;
            }
            let routes: Vec<Route> = batch.iter().map(|m| self.route(m)).collect();
            let lookups: Vec<step::Lookup> = batch
                .iter()
                .zip(&routes)
                .map(|(m, r)| step::Lookup {
                    message: m,
                    subject: match r {
                        Route::Thread { client, base, .. } if m.thread_key.is_none() => {
                            Some((client.key.clone(), base.clone()))
                        }
                        _ => None,
                    },
                })
                .collect();
            let mut work = Step::load(&mut tx, &lookups, step::subject_since(&batch)).await?;
            for (m, route) in batch.iter().zip(routes) {
                self.handle(&mut work, m, route);
            }
            let replays = work.take_replays();
            if !replays.is_empty() {
                let logged = tx.conversation_log(&replays).await?;
                for id in replays {
                    let log = logged
                        .iter()
                        .filter(|(c, _)| *c == id)
                        .map(|(_, m)| m)
                        .chain(batch.iter().filter(|m| work.assigned(m.id) == Some(id)))
                        .collect();
                    self.replay(&mut work, id, log);
                }
            }
            tx.rollback().await?;
            let mut tx = self.store.begin_core().await?;
            // The step numbered its new conversations after what it read; another writer (a
            // second daemon on this file) would make those ids collide: retry on fresh data.
            if tx.max_conversation_id().await? != work.base_id() {
                tx.rollback().await?;
                return Err(store::Error::Conflict(
                    "conversations were created meanwhile".into(),
                ));
            }
            progress.alerts += tx.write_step(&work.finish(), now).await?;
            tx.commit().await?;
            progress.messages += batch.len();
            if batch.len() < BATCH as usize {
                break;
            }
        }
        loop {
            // Usually nothing is due: a reader says so without taking the single writer, which
            // webhook acknowledgements wait for. Only the core writes deadlines, so the answer
            // cannot go stale before the write transaction below.
            match self.store.next_core_deadline().await? {
                Some(t) if t <= now => {}
                _ => break,
            }
            let mut tx = self.store.begin_core().await?;
            let due = tx.due_conversations(now, BATCH).await?;
            if due.is_empty() {
                tx.rollback().await?;
                break;
            }
            let mut work = Step::with(tx.load_conversations(&due).await?);
            for id in work.ids() {
                let Some(mut conv) = work.take(id) else {
                    continue;
                };
                let (state, events) = clock::tick(&conv.clock, now);
                conv.clock = state;
                for e in &events {
                    self.alert(&mut work, &conv, e);
                }
                if let Some(t) = &conv.clock.open {
                    work.save_target(conv.id, t);
                }
                work.put(conv);
            }
            progress.alerts += tx.write_step(&work.finish(), now).await?;
            tx.commit().await?;
            progress.ticked += due.len();
            if due.len() < BATCH as usize {
                break;
            }
        }
        Ok(progress)
    }

    /// Recomputes every open target under the current policies (after a restart or reload);
    /// fulfilled targets keep what applied when they ran.
    pub async fn recompute(&self, now: DateTime<Utc>) -> Result<usize, store::Error> {
        let mut tx = self.store.begin_core().await?;
        let ids = tx.open_conversations().await?;
        let mut work = Step::with(tx.load_conversations(&ids).await?);
        let mut n = 0;
        for id in work.ids() {
            let Some(mut conv) = work.take(id) else {
                continue;
            };
            let Some(policy) = self.policy_for(&conv) else {
                continue;
            };
            let (state, events) = clock::retarget(&conv.clock, policy, now);
            conv.clock = state;
            for e in &events {
                self.alert(&mut work, &conv, e);
            }
            if let Some(t) = &conv.clock.open {
                work.save_target(conv.id, t);
            }
            work.put(conv);
            n += 1;
        }
        tx.write_step(&work.finish(), now).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// The policy governing a conversation's clock: the open target's, else the conversation's.
    fn policy_for(&self, conv: &ConversationRow) -> Option<&Policy> {
        let p = &self.routing.policies;
        conv.clock
            .open
            .as_ref()
            .and_then(|t| p.get(&t.policy))
            .or_else(|| conv.policy.as_ref().and_then(|name| p.get(name)))
    }

    /// What a message is before threading: ignored, or a client's message (or a reply to one).
    fn route(&self, m: &PendingMessage) -> Route {
        let r = &*self.routing;
        if m.automation == Automation::Frontdesk {
            // Our own digests and alerts are never client messages.
            return Route::Ignore;
        }
        let from_key = m
            .from
            .as_ref()
            .and_then(|a| rules::normalize(&a.addr, &r.normalization));
        let from_team = from_key
            .as_deref()
            .is_some_and(|k| rules::team_member(&r.team, k).is_some());
        let direction = if from_team {
            Direction::Outbound
        } else {
            m.direction
        };
        let address = match rules::client_address(
            direction,
            m.from.as_ref(),
            &m.to,
            &r.team,
            &r.normalization,
        ) {
            Some(a) => a,
            // A client message without a readable sender still needs an answer: its own client.
            None if direction == Direction::Inbound => format!("unknown:{}:{}", m.source, m.id),
            // Team mail to nobody outside the team: not a client conversation.
            None => return Route::Ignore,
        };
        Route::Thread {
            direction,
            client: rules::resolve_client(&r.clients, &address, &m.source),
            base: thread::base_subject(m.subject.as_deref().unwrap_or("")),
        }
    }

    /// Threads one message into a conversation of the step and advances its clock.
    fn handle(&self, work: &mut Step, m: &PendingMessage, route: Route) {
        let r = &*self.routing;
        let Route::Thread {
            direction,
            client,
            base,
        } = route
        else {
            work.processed(m, None);
            return;
        };
        let mut candidates = Vec::new();
        for mid in step::ancestors(m) {
            if let Some(&conv) = work.by_message_id.get(mid) {
                candidates.push(Candidate {
                    id: ConversationId(conv),
                    message_ids: vec![mid.clone()],
                    ..Candidate::default()
                });
            }
        }
        if let Some(key) = m.thread_key.as_deref()
            && let Some(&conv) = work.by_thread_key.get(&(m.source.clone(), key.to_string()))
        {
            candidates.push(Candidate {
                id: ConversationId(conv),
                thread_keys: vec![(m.source.clone(), key.to_string())],
                ..Candidate::default()
            });
        }
        // `thread::assign` prefers header and key matches, and a message with a provider key never
        // falls back to the subject: only offer subjects when they can decide.
        if candidates.is_empty() && m.thread_key.is_none() {
            let ids = work
                .by_subject
                .get(&(client.key.clone(), base.clone()))
                .cloned()
                .unwrap_or_default();
            for conv in ids {
                if let Some(last) = work.last_message_at(conv) {
                    candidates.push(Candidate {
                        id: ConversationId(conv),
                        client: client.key.clone(),
                        base_subject: base.clone(),
                        last_message_at: last,
                        ..Candidate::default()
                    });
                }
            }
        }
        let hints = Hints {
            source: m.source.clone(),
            in_reply_to: m.in_reply_to.clone(),
            references: m.references.clone(),
            thread_key: m.thread_key.clone(),
            client: Some(client.key.clone()),
            subject: m.subject.clone(),
        };
        let existing =
            thread::assign(&hints, &candidates, m.received_at).and_then(|(id, _)| work.take(id.0));
        let mut conv = match existing {
            Some(c) => c,
            None => {
                let facts = Facts {
                    source: &m.source,
                    client: &client,
                    subject: m.subject.as_deref(),
                    text: m.text.as_deref(),
                };
                let owner = rules::pick_owner(&r.owners, &facts);
                let policy = rules::pick_policy(&r.policy_rules, &facts);
                ConversationRow {
                    id: work.new_id(),
                    source: m.source.clone(),
                    client_key: client.key.clone(),
                    client_address: client.address.clone(),
                    client_name: client.name.clone(),
                    client_tags: client.tags.clone(),
                    subject: m.subject.clone(),
                    base_subject: base,
                    owner: owner.map(|o| o.1.to_string()),
                    policy: policy.map(|p| p.1.to_string()),
                    created_at: m.received_at,
                    last_message_at: m.received_at,
                    clock: clock::ClockState::default(),
                    client_rule: client.rule.map(|i| i as i64),
                    owner_rule: owner.map(|o| o.0 as i64),
                    policy_rule: policy.map(|p| p.0 as i64),
                }
            }
        };
        let loaded_open = conv.clock.open.clone();
        if let Some(key) = m.thread_key.as_deref() {
            work.add_thread_key(&m.source, key, conv.id);
        }
        // A message older than what the clock has seen (a Sent folder synced after the inbox, a
        // provider retrying late) changes history: the clock is rebuilt from the whole log at
        // the end of the step instead of being advanced.
        let late = conv.clock.last_at.is_some_and(|seen| m.received_at < seen);
        if late {
            work.needs_replay(conv.id);
        } else if let Some(policy) = self.policy_for(&conv) {
            let step = clock::apply(
                &conv.clock,
                ClockInput {
                    direction,
                    automation: m.automation,
                    received_at: m.received_at,
                },
                policy,
            );
            conv.clock = step.state;
            if let Some(done) = &step.fulfilled {
                work.save_target(conv.id, done);
            }
            for e in &step.events {
                let answered = step.fulfilled.as_ref().is_some_and(|t| t.seq == e.seq);
                if !answered {
                    self.alert(work, &conv, e);
                }
            }
        }
        conv.last_message_at = conv.last_message_at.max(m.received_at);
        if let Some(t) = conv
            .clock
            .open
            .as_ref()
            .filter(|t| Some(*t) != loaded_open.as_ref())
        {
            work.save_target(conv.id, t);
        }
        work.processed(m, Some(conv.id));
        work.put(conv);
    }

    /// Rebuilds a conversation's clock from its whole message log in receipt order, as if the
    /// messages had arrived in that order, and rewrites its targets.
    ///
    /// Targets are recomputed under the conversation's current policy. Events of targets that
    /// are history are not alerted; the open target's are (alert keys dedupe what was sent).
    fn replay(&self, work: &mut Step, id: i64, mut log: Vec<&PendingMessage>) {
        let Some(mut conv) = work.take(id) else {
            return;
        };
        let policy = conv
            .policy
            .as_ref()
            .and_then(|p| self.routing.policies.get(p))
            .or_else(|| self.policy_for(&conv));
        let Some(policy) = policy else {
            work.put(conv);
            return;
        };
        log.sort_by_key(|m| (m.received_at, m.id));
        log.dedup_by_key(|m| m.id);
        let mut state = clock::ClockState::default();
        let mut events = Vec::new();
        for m in log {
            let Route::Thread { direction, .. } = self.route(m) else {
                continue;
            };
            let step = clock::apply(
                &state,
                ClockInput {
                    direction,
                    automation: m.automation,
                    received_at: m.received_at,
                },
                policy,
            );
            state = step.state;
            if let Some(done) = &step.fulfilled {
                work.save_target(conv.id, done);
            }
            events.extend(step.events);
        }
        work.truncate_targets(conv.id, state.targets_opened);
        conv.clock = state;
        if let Some(open) = conv.clock.open.clone() {
            work.save_target(conv.id, &open);
            for e in events.iter().filter(|e| e.seq == open.seq) {
                self.alert(work, &conv, e);
            }
        }
        work.put(conv);
    }

    /// Queues a warn or breach event for the alert sender (at most once per target event).
    fn alert(&self, work: &mut Step, conv: &ConversationRow, e: &Event) {
        let Some(settings) = &self.routing.alerts else {
            return;
        };
        let (wanted, prefix) = match e.kind {
            EventKind::Warn => (settings.warn, "warn"),
            EventKind::Breach => (settings.breach, "breach"),
            EventKind::Activate | EventKind::Fulfill => (false, ""),
        };
        if !wanted {
            return;
        }
        let target = conv.clock.open.as_ref().filter(|t| t.seq == e.seq);
        let row = crate::digest::ConversationRow {
            id: conv.id,
            client: one_line(conv.client_name.as_deref().unwrap_or(&conv.client_address)),
            medium: None,
            subject: one_line(conv.subject.as_deref().unwrap_or("")),
            owner: conv.owner.clone(),
            policy: target
                .map(|t| t.policy.clone())
                .or_else(|| conv.policy.clone()),
            target: Some(match e.metric {
                clock::Metric::FirstReply => crate::digest::TargetKind::First,
                clock::Metric::NextReply => crate::digest::TargetKind::Next,
            }),
            target_secs: target.map(|t| t.allowed.num_seconds()),
            waiting_since: target.map_or(e.at, |t| t.started_at),
            warn_at: target.map(|t| t.warn_at),
            due: target.map(|t| t.due_at),
        };
        let event = match e.kind {
            EventKind::Warn => crate::digest::AlertEvent::SlaWarn { conversation: row },
            _ => crate::digest::AlertEvent::SlaBreach { conversation: row },
        };
        work.alert(format!("{prefix}:{}:{}", conv.id, e.seq), event, e.at);
    }
}

/// What the core makes of a message before threading it.
enum Route {
    /// Not a client conversation (frontdesk's own mail, team mail to nobody outside the team).
    Ignore,
    /// Thread it for this client.
    Thread {
        /// Direction after team addresses are taken into account.
        direction: Direction,
        /// The client it is from or to.
        client: rules::Client,
        /// Its base subject.
        base: String,
    },
}

/// Describes a match's conditions, e.g. `client_tag=vip, source=sms`.
fn describe_match(m: &Match) -> String {
    let mut parts = Vec::new();
    for (name, values) in [
        ("client", &m.client),
        ("client_tag", &m.client_tag),
        ("email", &m.email),
        ("email_domain", &m.email_domain),
        ("source", &m.source),
        ("keyword", &m.keyword),
    ] {
        if !values.is_empty() {
            parts.push(format!("{name}={}", values.join("|")));
        }
    }
    if parts.is_empty() {
        "no conditions (the default)".into()
    } else {
        parts.join(", ")
    }
}

fn rule_index(i: Option<i64>) -> Option<usize> {
    i.and_then(|i| usize::try_from(i).ok())
}

/// `frontdesk explain` for a conversation: which client rule, owner rule, policy and calendar
/// applied and why, and how each target's due time was computed, in plain sentences.
pub async fn explain(
    store: &Store,
    routing: &Routing,
    conversation: i64,
) -> Result<Option<String>, store::Error> {
    let Some(c) = store.conversation(conversation).await? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    let client = c.client_name.as_deref().unwrap_or(&c.client_address);
    out.push(format!(
        "Conversation {} with {client} <{}>, started through source {}.",
        c.id, c.client_address, c.source
    ));
    match rule_index(c.client_rule).and_then(|i| routing.clients.get(i).map(|r| (i, r))) {
        Some((i, r)) => out.push(format!(
            "Client rule {} ({}) matched the address; tags: {}.",
            i + 1,
            r.name.as_deref().unwrap_or("unnamed"),
            if r.tags.is_empty() {
                "none".into()
            } else {
                r.tags.join(", ")
            }
        )),
        None => out.push(
            "No client rule matched: the sender is a client of its own, known by its address."
                .into(),
        ),
    }
    match (
        c.owner.as_deref(),
        rule_index(c.owner_rule).and_then(|i| routing.owners.get(i).map(|r| (i, r))),
    ) {
        (Some(owner), Some((i, r))) => out.push(format!(
            "Owner {owner}: responsibilities rule {} matched ({}); earlier rules did not.",
            i + 1,
            describe_match(&r.matcher)
        )),
        (Some(owner), None) => out.push(format!("Owner {owner}.")),
        (None, _) => out.push("No responsibilities rule matched: nobody owns it.".into()),
    }
    match (
        c.policy.as_deref(),
        rule_index(c.policy_rule).and_then(|i| routing.policy_rules.get(i).map(|r| (i, r))),
    ) {
        (Some(p), Some((i, r))) => out.push(format!(
            "SLA policy {p}: policy {} in order matched ({}); earlier policies did not.",
            i + 1,
            describe_match(&r.matcher)
        )),
        (Some(p), None) => out.push(format!("SLA policy {p}.")),
        (None, _) => out.push("No SLA policy matched: no response-time targets.".into()),
    }
    if let Some(p) = c.policy.as_deref().and_then(|p| routing.policies.get(p)) {
        out.push(format!(
            "The policy allows {} for the first reply and {} for each next reply on calendar {}.",
            crate::sla::calendar::human(p.first_reply),
            crate::sla::calendar::human(p.next_reply),
            p.calendar_name
        ));
    }
    if c.clock.started_by_team {
        out.push("The team wrote first, so there is no first-reply target.".into());
    }
    for t in store.targets_of(c.id).await? {
        let metric = t.metric.as_str().replace('_', " ");
        out.push(format!(
            "Target {} ({metric}, policy {}): {} allowed; state {}.",
            t.seq,
            t.policy,
            crate::sla::calendar::human(t.allowed),
            t.state.as_str()
        ));
        match (t.fulfilled_at, t.business_duration, t.calendar_duration) {
            (Some(at), Some(b), Some(cal)) => out.push(format!(
                "Answered at {} after {} of business time ({} of calendar time).",
                at.format("%Y-%m-%d %H:%M UTC"),
                crate::sla::calendar::human(b),
                crate::sla::calendar::human(cal)
            )),
            _ => {
                if let Some(p) = routing.policies.get(&t.policy) {
                    out.extend(p.calendar.explain_due(t.started_at, t.allowed));
                }
            }
        }
    }
    Ok(Some(out.join("\n")))
}

/// `frontdesk explain` for a message: the explanation of its conversation.
pub async fn explain_message(
    store: &Store,
    routing: &Routing,
    message: i64,
) -> Result<Option<String>, store::Error> {
    match store.conversation_of_message(message).await? {
        Some(c) => explain(store, routing, c).await,
        None => Ok(None),
    }
}

mod step;

use step::Step;

#[cfg(test)]
mod tests;
