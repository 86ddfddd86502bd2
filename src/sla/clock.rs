//! The SLA clock of one conversation: target instances, their states and events (pure).
//!
//! A conversation has at most one open target instance at a time. Messages are applied in the
//! order of their trusted receipt time (`received_at`); [`apply`] first ticks the clock up to the
//! message's receipt time, so replaying a conversation's log yields the same targets and events
//! whenever and however often it runs. The caller (the core) keeps at-most-once delivery of
//! `warn` and `breach` alerts with a unique key per (conversation, target `seq`, event kind).
//!
//! Choices where sla.md is silent:
//! - An inbound message marked automatic (auto-reply, bulk, list) does not start a target: no
//!   person is waiting on it. Messages marked as frontdesk's own are ignored completely.
//! - A target is met when the reply's receipt time is strictly before the due time; the breach
//!   fires at the due time, so a reply at exactly the due instant is late (`met_late`).
//! - When the warning time has already passed together with the due time (a restart after a long
//!   outage), only the breach is emitted; the stale warning is skipped and marked done.
//! - A reply received before the open target's start cannot answer it and is ignored (it only
//!   happens when messages are applied out of receipt order; the core replays the log instead).

use chrono::{DateTime, TimeDelta, Utc};

use super::calendar::Calendar;
use crate::message::{Automation, Direction};

/// What a target instance measures; a new metric (cadence, resolution) is a new variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// From the first client message of a new conversation to the first reply.
    FirstReply,
    /// From the oldest unanswered client message after a reply to the next reply.
    NextReply,
}

impl Metric {
    /// The lowercase name used in the store, the CLI and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::FirstReply => "first_reply",
            Metric::NextReply => "next_reply",
        }
    }

    /// Parses the stored name.
    pub fn from_stored(s: &str) -> Option<Self> {
        match s {
            "first_reply" => Some(Metric::FirstReply),
            "next_reply" => Some(Metric::NextReply),
            _ => None,
        }
    }
}

/// The state of a target instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetState {
    /// Running, outside the warning window.
    Active,
    /// Running, inside `warn_before`.
    AtRisk,
    /// Fulfilled before the due time.
    Met,
    /// Due time passed without a reply.
    Breached,
    /// Fulfilled after a breach.
    MetLate,
}

impl TargetState {
    /// The lowercase name used in the store, the CLI and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Active => "active",
            TargetState::AtRisk => "at_risk",
            TargetState::Met => "met",
            TargetState::Breached => "breached",
            TargetState::MetLate => "met_late",
        }
    }

    /// Parses the stored name.
    pub fn from_stored(s: &str) -> Option<Self> {
        match s {
            "active" => Some(TargetState::Active),
            "at_risk" => Some(TargetState::AtRisk),
            "met" => Some(TargetState::Met),
            "breached" => Some(TargetState::Breached),
            "met_late" => Some(TargetState::MetLate),
            _ => None,
        }
    }

    /// Whether the target is fulfilled (`met` or `met_late`).
    pub fn is_fulfilled(self) -> bool {
        matches!(self, TargetState::Met | TargetState::MetLate)
    }
}

/// What happened to a target instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The target started.
    Activate,
    /// The target entered its warning window.
    Warn,
    /// The due time passed without a reply.
    Breach,
    /// A reply fulfilled the target.
    Fulfill,
}

impl EventKind {
    /// The lowercase name used in the store and in alert keys.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Activate => "activate",
            EventKind::Warn => "warn",
            EventKind::Breach => "breach",
            EventKind::Fulfill => "fulfill",
        }
    }
}

/// One event of one target instance; `at` is when it happened by the rules, not when it was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The target's metric.
    pub metric: Metric,
    /// The target's sequence number within its conversation (1, 2, ...).
    pub seq: u32,
    /// The rule time: start, warning time, due time, or the reply's receipt time.
    pub at: DateTime<Utc>,
}

/// `warn_before`: an absolute duration or a share of the target, both in business time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarnBefore {
    /// Warn when this much business time is left (`30m`).
    Duration(TimeDelta),
    /// Warn when this percentage of the target is left (`25%`), 0..=100.
    Percent(u8),
}

/// An SLA policy as the clock needs it: targets, warning and calendar.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The policy's name, recorded on each target it sets.
    pub name: String,
    /// Business time allowed for the first reply.
    pub first_reply: TimeDelta,
    /// Business time allowed for each next reply.
    pub next_reply: TimeDelta,
    /// When a target counts as at risk.
    pub warn_before: WarnBefore,
    /// The name of the calendar (`always` for 24/7), for explanations.
    pub calendar_name: String,
    /// The business calendar the targets run on.
    pub calendar: Calendar,
}

impl Policy {
    /// The business time allowed for a metric.
    pub fn target(&self, metric: Metric) -> TimeDelta {
        match metric {
            Metric::FirstReply => self.first_reply,
            Metric::NextReply => self.next_reply,
        }
    }

    /// Business time from the start after which a target of `allowed` is at risk.
    fn warn_offset(&self, allowed: TimeDelta) -> TimeDelta {
        let left = match self.warn_before {
            WarnBefore::Duration(d) => d,
            WarnBefore::Percent(p) => allowed * i32::from(p.min(100)) / 100,
        };
        (allowed - left).max(TimeDelta::zero())
    }
}

/// One target instance: a client waiting for a reply, measured against one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Sequence number within the conversation (1, 2, ...): part of the alerts' unique key.
    pub seq: u32,
    /// What it measures.
    pub metric: Metric,
    /// The policy that set it (kept after fulfilment even if the config changes).
    pub policy: String,
    /// The business time allowed.
    pub allowed: TimeDelta,
    /// Receipt time of the client message that started it.
    pub started_at: DateTime<Utc>,
    /// When business time starts counting (the next opening at or after `started_at`).
    pub counting_from: DateTime<Utc>,
    /// When it becomes at risk.
    pub warn_at: DateTime<Utc>,
    /// When it is breached.
    pub due_at: DateTime<Utc>,
    /// Current state.
    pub state: TargetState,
    /// Whether `warn` was emitted (or skipped as stale): never twice.
    pub warned: bool,
    /// Whether `breach` was emitted: never twice.
    pub breached: bool,
    /// Receipt time of the reply that fulfilled it.
    pub fulfilled_at: Option<DateTime<Utc>>,
    /// Business time from start to reply.
    pub business_duration: Option<TimeDelta>,
    /// Calendar time from start to reply.
    pub calendar_duration: Option<TimeDelta>,
}

impl Target {
    /// Starts a target at `started_at` under `policy`.
    pub fn start(seq: u32, metric: Metric, policy: &Policy, started_at: DateTime<Utc>) -> Self {
        let allowed = policy.target(metric);
        let cal = &policy.calendar;
        Target {
            seq,
            metric,
            policy: policy.name.clone(),
            allowed,
            started_at,
            counting_from: cal.next_open(started_at),
            warn_at: cal.add_business(started_at, policy.warn_offset(allowed)),
            due_at: cal.add_business(started_at, allowed),
            state: TargetState::Active,
            warned: false,
            breached: false,
            fulfilled_at: None,
            business_duration: None,
            calendar_duration: None,
        }
    }

    fn event(&self, kind: EventKind, at: DateTime<Utc>) -> Event {
        Event {
            kind,
            metric: self.metric,
            seq: self.seq,
            at,
        }
    }

    /// Advances an open target to `now`, emitting `warn` and `breach` at most once each.
    fn tick(&mut self, now: DateTime<Utc>, events: &mut Vec<Event>) {
        if self.state.is_fulfilled() {
            return;
        }
        if now >= self.due_at {
            if !self.breached {
                self.breached = true;
                // A warning whose window passed unseen is not sent after the breach it announces.
                self.warned = true;
                events.push(self.event(EventKind::Breach, self.due_at));
            }
            self.state = TargetState::Breached;
        } else if now >= self.warn_at {
            if !self.warned {
                self.warned = true;
                events.push(self.event(EventKind::Warn, self.warn_at));
            }
            self.state = TargetState::AtRisk;
        }
    }

    /// The next instant at which [`Target::tick`] would emit something, if any.
    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        if self.state.is_fulfilled() {
            None
        } else if !self.warned && self.warn_at < self.due_at {
            Some(self.warn_at)
        } else if !self.breached {
            Some(self.due_at)
        } else {
            None
        }
    }
}

/// The SLA clock of one conversation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClockState {
    /// Whether any message has been applied (the conversation is no longer new).
    pub started: bool,
    /// Whether the team wrote the conversation's first message (no first-reply target then).
    pub started_by_team: bool,
    /// Whether a person on the team has replied at least once.
    pub replied: bool,
    /// How many targets were opened so far (the last one's `seq`).
    pub targets_opened: u32,
    /// The open (not yet fulfilled) target, if a client is waiting.
    pub open: Option<Target>,
    /// Latest receipt time applied; a message older than this arrived out of order.
    pub last_at: Option<DateTime<Utc>>,
}

/// The part of a message the clock looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockInput {
    /// Client (inbound) or team (outbound).
    pub direction: Direction,
    /// Whether a machine wrote it.
    pub automation: Automation,
    /// Trusted receipt time.
    pub received_at: DateTime<Utc>,
}

/// The result of applying one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The clock after the message.
    pub state: ClockState,
    /// Events in the order they happened (ticks up to the message first).
    pub events: Vec<Event>,
    /// The target this message fulfilled, with its durations recorded.
    pub fulfilled: Option<Target>,
}

/// Applies one message to a conversation's clock under `policy`.
///
/// `policy` is the conversation's policy: the one named by the open target (`Target::policy`) if
/// there is one, otherwise the one selected for the new target. Its calendar measures the business
/// duration of a fulfilled target; an open target's times change only through [`retarget`].
pub fn apply(state: &ClockState, msg: ClockInput, policy: &Policy) -> Step {
    let (mut state, mut events) = tick(state, msg.received_at);
    let mut fulfilled = None;
    let at = msg.received_at;
    if msg.automation == Automation::Frontdesk {
        return Step {
            state,
            events,
            fulfilled,
        };
    }
    let first_message = !state.started;
    state.started = true;
    state.last_at = Some(state.last_at.map_or(at, |l| l.max(at)));
    match msg.direction {
        Direction::Outbound => {
            if first_message {
                state.started_by_team = true;
            }
            if msg.automation != Automation::Human {
                // Auto-replies and bulk mail never answer anyone.
            } else {
                state.replied = true;
                if let Some(mut target) = state.open.take() {
                    if at < target.started_at {
                        state.open = Some(target);
                    } else {
                        target.state = if at < target.due_at {
                            TargetState::Met
                        } else {
                            TargetState::MetLate
                        };
                        target.fulfilled_at = Some(at);
                        target.business_duration =
                            Some(policy.calendar.business_between(target.started_at, at));
                        target.calendar_duration = Some(at - target.started_at);
                        events.push(target.event(EventKind::Fulfill, at));
                        fulfilled = Some(target);
                    }
                }
            }
        }
        Direction::Inbound => {
            // An automatic inbound message (out-of-office, bulk) waits for nobody.
            if msg.automation == Automation::Human && state.open.is_none() {
                let metric = if state.replied || state.started_by_team {
                    Metric::NextReply
                } else {
                    Metric::FirstReply
                };
                state.targets_opened += 1;
                let mut target = Target::start(state.targets_opened, metric, policy, at);
                events.push(target.event(EventKind::Activate, at));
                // A zero target or warning window is due at once.
                target.tick(at, &mut events);
                state.open = Some(target);
            }
        }
    }
    Step {
        state,
        events,
        fulfilled,
    }
}

/// Advances the clock to `now`: emits `warn` and `breach` that are due, each at most once.
pub fn tick(state: &ClockState, now: DateTime<Utc>) -> (ClockState, Vec<Event>) {
    let mut state = state.clone();
    let mut events = Vec::new();
    if let Some(target) = state.open.as_mut() {
        target.tick(now, &mut events);
    }
    (state, events)
}

/// The next instant at which [`tick`] would emit an event, if any.
pub fn next_deadline(state: &ClockState) -> Option<DateTime<Utc>> {
    state.open.as_ref().and_then(Target::next_deadline)
}

/// Recomputes the open target's times under a (possibly changed) policy, keeping its start, its
/// sequence number and the events already emitted; then ticks to `now`.
///
/// Fulfilled targets are never touched: they keep the policy that applied when they ran.
pub fn retarget(
    state: &ClockState,
    policy: &Policy,
    now: DateTime<Utc>,
) -> (ClockState, Vec<Event>) {
    let mut state = state.clone();
    if let Some(old) = state.open.take() {
        let mut target = Target::start(old.seq, old.metric, policy, old.started_at);
        target.warned = old.warned;
        target.breached = old.breached;
        if old.breached && now < target.due_at {
            // Already reported as breached; a longer target cannot un-send that alert.
            target.state = TargetState::Breached;
        }
        state.open = Some(target);
    }
    tick(&state, now)
}

/// Replays a conversation's messages, sorted by receipt time, from a fresh clock.
///
/// Returns the final clock, every event, and every fulfilled target, in order.
pub fn replay(
    msgs: impl IntoIterator<Item = ClockInput>,
    policy: &Policy,
) -> (ClockState, Vec<Event>, Vec<Target>) {
    let mut state = ClockState::default();
    let mut events = Vec::new();
    let mut done = Vec::new();
    for m in msgs {
        let step = apply(&state, m, policy);
        state = step.state;
        events.extend(step.events);
        done.extend(step.fulfilled);
    }
    (state, events, done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sla::calendar::Weekly;
    use chrono::{NaiveTime, TimeZone};
    use std::collections::BTreeSet;

    fn athens() -> Calendar {
        let nine_five = (
            NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
            NaiveTime::from_hms_opt(17, 0, 0).unwrap(),
        );
        let mut weekly: Weekly = Default::default();
        for d in weekly.iter_mut().take(5) {
            *d = vec![nine_five];
        }
        Calendar::new(chrono_tz::Europe::Athens, weekly, BTreeSet::new()).unwrap()
    }

    fn policy(calendar: Calendar, warn: WarnBefore) -> Policy {
        Policy {
            name: "standard".into(),
            first_reply: TimeDelta::hours(1),
            next_reply: TimeDelta::hours(4),
            warn_before: warn,
            calendar_name: "office".into(),
            calendar,
        }
    }

    /// Athens local time on 2026-11-30 (a Monday) + `day` days.
    fn at(day: u64, h: u32, m: u32) -> DateTime<Utc> {
        chrono_tz::Europe::Athens
            .with_ymd_and_hms(2026, 11, 30, h, m, 0)
            .single()
            .unwrap()
            .with_timezone(&Utc)
            + chrono::Days::new(day)
    }

    fn msg(direction: Direction, automation: Automation, t: DateTime<Utc>) -> ClockInput {
        ClockInput {
            direction,
            automation,
            received_at: t,
        }
    }

    fn client(t: DateTime<Utc>) -> ClockInput {
        msg(Direction::Inbound, Automation::Human, t)
    }

    fn reply(t: DateTime<Utc>) -> ClockInput {
        msg(Direction::Outbound, Automation::Human, t)
    }

    fn kinds(events: &[Event]) -> Vec<(EventKind, Metric, u32)> {
        events.iter().map(|e| (e.kind, e.metric, e.seq)).collect()
    }

    #[test]
    fn first_client_message_activates_first_reply_and_reply_fulfils() {
        let p = policy(athens(), WarnBefore::Duration(TimeDelta::minutes(15)));
        let s = apply(&ClockState::default(), client(at(0, 10, 0)), &p);
        assert_eq!(
            kinds(&s.events),
            [(EventKind::Activate, Metric::FirstReply, 1)]
        );
        let t = s.state.open.as_ref().unwrap();
        assert_eq!(t.due_at, at(0, 11, 0));
        assert_eq!(t.warn_at, at(0, 10, 45));
        assert_eq!(next_deadline(&s.state), Some(at(0, 10, 45)));
        let s = apply(&s.state, reply(at(0, 10, 20)), &p);
        assert_eq!(
            kinds(&s.events),
            [(EventKind::Fulfill, Metric::FirstReply, 1)]
        );
        let done = s.fulfilled.unwrap();
        assert_eq!(done.state, TargetState::Met);
        assert_eq!(done.business_duration, Some(TimeDelta::minutes(20)));
        assert_eq!(done.calendar_duration, Some(TimeDelta::minutes(20)));
        assert_eq!(s.state.open, None);
        assert_eq!(next_deadline(&s.state), None);
    }

    #[test]
    fn friday_afternoon_athens_due_monday_and_durations_differ() {
        let p = policy(athens(), WarnBefore::Percent(25));
        // Friday 2026-12-04 16:30 local.
        let s = apply(&ClockState::default(), client(at(4, 16, 30)), &p);
        let t = s.state.open.clone().unwrap();
        assert_eq!(t.due_at, at(7, 9, 30));
        assert_eq!(t.warn_at, at(7, 9, 15)); // 45 of 60 minutes elapsed
        let s = apply(&s.state, reply(at(7, 9, 10)), &p);
        let done = s.fulfilled.unwrap();
        assert_eq!(done.state, TargetState::Met);
        assert_eq!(done.business_duration, Some(TimeDelta::minutes(40)));
        assert_eq!(done.calendar_duration, Some(at(7, 9, 10) - at(4, 16, 30)));
    }

    #[test]
    fn team_started_conversation_has_no_first_reply() {
        let p = policy(athens(), WarnBefore::Duration(TimeDelta::minutes(15)));
        let s = apply(&ClockState::default(), reply(at(0, 9, 0)), &p);
        assert!(s.events.is_empty());
        assert!(s.state.started_by_team);
        let s = apply(&s.state, client(at(0, 10, 0)), &p);
        assert_eq!(
            kinds(&s.events),
            [(EventKind::Activate, Metric::NextReply, 1)]
        );
        assert_eq!(s.state.open.unwrap().due_at, at(0, 14, 0));
    }

    #[test]
    fn next_reply_is_anchored_on_oldest_unanswered_message() {
        let p = policy(athens(), WarnBefore::Duration(TimeDelta::minutes(30)));
        let (state, _, _) = replay([client(at(0, 9, 0)), reply(at(0, 9, 30))], &p);
        let s = apply(&state, client(at(0, 10, 0)), &p);
        assert_eq!(
            kinds(&s.events),
            [(EventKind::Activate, Metric::NextReply, 2)]
        );
        let due = s.state.open.as_ref().unwrap().due_at;
        assert_eq!(due, at(0, 14, 0));
        let s2 = apply(&s.state, client(at(0, 12, 0)), &p);
        assert!(s2.events.is_empty());
        assert_eq!(s2.state.open.as_ref().unwrap().due_at, due);
        assert_eq!(s2.state.open.as_ref().unwrap().started_at, at(0, 10, 0));
        let s3 = apply(&s2.state, reply(at(0, 13, 0)), &p);
        assert_eq!(
            s3.fulfilled.unwrap().business_duration,
            Some(TimeDelta::hours(3))
        );
    }

    #[test]
    fn automatic_and_frontdesk_messages_never_fulfil() {
        let p = policy(athens(), WarnBefore::Duration(TimeDelta::minutes(15)));
        let s = apply(&ClockState::default(), client(at(0, 10, 0)), &p);
        for automation in [Automation::Automatic, Automation::Frontdesk] {
            let s2 = apply(
                &s.state,
                msg(Direction::Outbound, automation, at(0, 10, 1)),
                &p,
            );
            assert!(s2.fulfilled.is_none());
            assert!(s2.state.open.is_some());
            assert!(!s2.state.replied);
        }
    }

    #[test]
    fn automatic_inbound_starts_nothing_and_first_human_message_is_first_reply() {
        let p = policy(athens(), WarnBefore::Duration(TimeDelta::minutes(15)));
        let s = apply(
            &ClockState::default(),
            msg(Direction::Inbound, Automation::Automatic, at(0, 10, 0)),
            &p,
        );
        assert!(s.state.open.is_none());
        let s = apply(&s.state, client(at(0, 11, 0)), &p);
        assert_eq!(
            kinds(&s.events),
            [(EventKind::Activate, Metric::FirstReply, 1)]
        );
    }

    #[test]
    fn warn_and_breach_fire_once_in_order_then_met_late() {
        let p = policy(athens(), WarnBefore::Duration(TimeDelta::minutes(15)));
        let s = apply(&ClockState::default(), client(at(0, 10, 0)), &p);
        let (st, ev) = tick(&s.state, at(0, 10, 44));
        assert!(ev.is_empty());
        assert_eq!(st.open.as_ref().unwrap().state, TargetState::Active);
        let (st, ev) = tick(&st, at(0, 10, 45));
        assert_eq!(kinds(&ev), [(EventKind::Warn, Metric::FirstReply, 1)]);
        assert_eq!(ev[0].at, at(0, 10, 45));
        assert_eq!(st.open.as_ref().unwrap().state, TargetState::AtRisk);
        let (st, ev) = tick(&st, at(0, 10, 50));
        assert!(ev.is_empty(), "warn only once");
        assert_eq!(next_deadline(&st), Some(at(0, 11, 0)));
        let (st, ev) = tick(&st, at(0, 11, 0));
        assert_eq!(kinds(&ev), [(EventKind::Breach, Metric::FirstReply, 1)]);
        assert_eq!(next_deadline(&st), None);
        let (st, ev) = tick(&st, at(1, 11, 0));
        assert!(ev.is_empty(), "breach only once");
        let s = apply(&st, reply(at(0, 12, 0)), &p);
        let done = s.fulfilled.unwrap();
        assert_eq!(done.state, TargetState::MetLate);
        assert_eq!(done.business_duration, Some(TimeDelta::hours(2)));
    }

    #[test]
    fn reply_exactly_at_due_is_late_and_stale_warning_is_skipped() {
        let p = policy(athens(), WarnBefore::Duration(TimeDelta::minutes(15)));
        let s = apply(&ClockState::default(), client(at(0, 10, 0)), &p);
        // Nothing ticked in between (a restart): the reply's own tick emits only the breach.
        let s = apply(&s.state, reply(at(0, 11, 0)), &p);
        assert_eq!(
            kinds(&s.events),
            [
                (EventKind::Breach, Metric::FirstReply, 1),
                (EventKind::Fulfill, Metric::FirstReply, 1)
            ]
        );
        assert_eq!(s.fulfilled.unwrap().state, TargetState::MetLate);
    }

    #[test]
    fn message_outside_hours_counts_from_opening() {
        let p = policy(athens(), WarnBefore::Duration(TimeDelta::minutes(15)));
        let s = apply(&ClockState::default(), client(at(0, 7, 0)), &p);
        let t = s.state.open.unwrap();
        assert_eq!(t.started_at, at(0, 7, 0));
        assert_eq!(t.counting_from, at(0, 9, 0));
        assert_eq!(t.due_at, at(0, 10, 0));
    }

    #[test]
    fn always_calendar_and_zero_warning_window() {
        let mut p = policy(Calendar::always(), WarnBefore::Percent(0));
        p.first_reply = TimeDelta::hours(2);
        let s = apply(&ClockState::default(), client(at(5, 22, 0)), &p);
        let t = s.state.open.clone().unwrap();
        assert_eq!(t.due_at, at(6, 0, 0));
        assert_eq!(t.warn_at, t.due_at);
        // warn_at == due_at: the breach is the only deadline.
        assert_eq!(next_deadline(&s.state), Some(t.due_at));
        let (_, ev) = tick(&s.state, t.due_at);
        assert_eq!(kinds(&ev), [(EventKind::Breach, Metric::FirstReply, 1)]);
    }

    #[test]
    fn retarget_recomputes_open_target_keeping_emitted_events() {
        let p = policy(athens(), WarnBefore::Duration(TimeDelta::minutes(15)));
        let s = apply(&ClockState::default(), client(at(0, 10, 0)), &p);
        let (st, ev) = tick(&s.state, at(0, 10, 50));
        assert_eq!(ev.len(), 1);
        let mut longer = p.clone();
        longer.name = "relaxed".into();
        longer.first_reply = TimeDelta::hours(3);
        let (st, ev) = retarget(&st, &longer, at(0, 10, 50));
        assert!(ev.is_empty(), "warn is not repeated");
        let t = st.open.clone().unwrap();
        assert_eq!(t.policy, "relaxed");
        assert_eq!(t.due_at, at(0, 13, 0));
        assert!(t.warned);
        let (_, ev) = tick(&st, at(0, 13, 0));
        assert_eq!(kinds(&ev), [(EventKind::Breach, Metric::FirstReply, 1)]);
    }

    #[test]
    fn replay_is_deterministic_whatever_ticks_happened() {
        let p = policy(athens(), WarnBefore::Duration(TimeDelta::minutes(15)));
        let log = [
            client(at(0, 10, 0)),
            client(at(0, 10, 5)),
            reply(at(0, 12, 0)),
            client(at(1, 9, 0)),
            reply(at(1, 9, 30)),
        ];
        let (state, events, done) = replay(log, &p);
        assert_eq!(state.targets_opened, 2);
        assert_eq!(
            kinds(&events),
            [
                (EventKind::Activate, Metric::FirstReply, 1),
                (EventKind::Breach, Metric::FirstReply, 1),
                (EventKind::Fulfill, Metric::FirstReply, 1),
                (EventKind::Activate, Metric::NextReply, 2),
                (EventKind::Fulfill, Metric::NextReply, 2),
            ]
        );
        assert_eq!(
            done.iter().map(|t| t.state).collect::<Vec<_>>(),
            [TargetState::MetLate, TargetState::Met]
        );
        // Ticking in between at arbitrary moments yields the same fulfilled targets.
        let mut state = ClockState::default();
        let mut done2 = Vec::new();
        for m in log {
            let (st, _) = tick(&state, m.received_at - TimeDelta::minutes(1));
            let step = apply(&st, m, &p);
            state = step.state;
            done2.extend(step.fulfilled);
        }
        assert_eq!(done, done2);
    }

    #[test]
    fn stored_names_round_trip() {
        for m in [Metric::FirstReply, Metric::NextReply] {
            assert_eq!(Metric::from_stored(m.as_str()), Some(m));
        }
        for s in [
            TargetState::Active,
            TargetState::AtRisk,
            TargetState::Met,
            TargetState::Breached,
            TargetState::MetLate,
        ] {
            assert_eq!(TargetState::from_stored(s.as_str()), Some(s));
        }
        assert_eq!(Metric::from_stored("x"), None);
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever ticks happen in between (restarts, late wake-ups), each target emits its events
        /// in order, `warn` and `breach` at most once, and ends exactly as a tick-free replay.
        /// Cases: `PROPTEST_CASES` (default 256).
        #[test]
        fn events_once_and_in_order_whatever_ticks(
            steps in prop::collection::vec((0u8..4, 0i64..600, prop::bool::ANY), 1..40)
        ) {
            let p = policy(athens(), WarnBefore::Percent(25));
            let mut t = at(0, 8, 0);
            let mut log = Vec::new();
            let mut ticks = Vec::new();
            for &(kind, gap, tick_before) in &steps {
                t += TimeDelta::minutes(gap);
                let m = match kind {
                    0 | 1 => client(t),
                    2 => reply(t),
                    _ => msg(Direction::Outbound, Automation::Automatic, t),
                };
                ticks.push(tick_before.then(|| t - TimeDelta::minutes(gap / 2)));
                log.push(m);
            }
            let (plain_state, plain_events, plain_done) = replay(log.clone(), &p);
            let mut state = ClockState::default();
            let mut events = Vec::new();
            let mut done = Vec::new();
            for (m, tk) in log.iter().zip(&ticks) {
                if let Some(now) = tk {
                    let (st, ev) = tick(&state, *now);
                    state = st;
                    events.extend(ev);
                    // A second tick at the same instant (a restart) emits nothing new.
                    let (st, ev) = tick(&state, *now);
                    prop_assert!(ev.is_empty());
                    state = st;
                }
                let step = apply(&state, *m, &p);
                state = step.state;
                events.extend(step.events);
                done.extend(step.fulfilled);
            }
            prop_assert_eq!(&done, &plain_done);
            prop_assert_eq!(&state, &plain_state);
            // Ticks may see a warning window that a tick-free replay skips (it jumps straight to
            // the breach); every other event is identical.
            let no_warn = |ev: &[Event]| -> Vec<Event> {
                ev.iter().filter(|e| e.kind != EventKind::Warn).copied().collect()
            };
            prop_assert_eq!(no_warn(&events), no_warn(&plain_events));
            for w in plain_events.iter().filter(|e| e.kind == EventKind::Warn) {
                prop_assert!(events.contains(w));
            }
            for seq in 1..=state.targets_opened {
                let order: Vec<EventKind> =
                    events.iter().filter(|e| e.seq == seq).map(|e| e.kind).collect();
                let rank = |k: &EventKind| *k as u8;
                prop_assert!(order.windows(2).all(|w| rank(&w[0]) < rank(&w[1])), "{:?}", order);
                prop_assert_eq!(order.first(), Some(&EventKind::Activate));
            }
        }
    }
}
