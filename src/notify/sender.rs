//! The sender loop: puts due digests and grouped alerts into the outbox, and delivers due outbox
//! items through their channels.
//!
//! Each step commits before the next: a digest slot is inserted once (unique slot key), an item is
//! claimed with a lease before the attempt, and marked sent only after the server accepted it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use tokio_util::sync::CancellationToken;

use super::{Channel, OutboxKind, Outcome, outcome};
use crate::config::{AlertKind, Config, DigestSchedule, SourceKind as ConfigSourceKind};
use crate::digest::{Alert, AlertEvent, Digest, DigestInput, SourceKind};
use crate::store::{self, NewOutboxItem, SourceRef, Store};

/// A digest slot this long past is still sent at start-up (the daemon was down at 08:00 and
/// came back at 09:30); older slots are skipped rather than sent hours late.
pub const CATCH_UP: TimeDelta = TimeDelta::hours(12);
/// Items claimed per round.
const BATCH: u32 = 50;

/// Why the sender could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// The store failed; the round is retried later.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A channel could not be built from the configuration.
    #[error("channel {name}: {reason}")]
    Channel {
        /// The channel name.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// A template failed (a bug).
    #[error(transparent)]
    Render(#[from] crate::digest::RenderError),
    /// A named digest or owner does not exist in the configuration.
    #[error("{0}")]
    Unknown(String),
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundReport {
    /// New digest items put into the outbox.
    pub digests_enqueued: usize,
    /// New alert items put into the outbox.
    pub alerts_enqueued: usize,
    /// Items accepted by their server.
    pub sent: usize,
    /// Items that will be retried.
    pub retried: usize,
    /// Items given up.
    pub failed: usize,
}

/// Who one digest goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestTarget {
    /// The owner for a per-owner digest, `None` for the all-team digest.
    pub owner: Option<String>,
    /// The address (empty: the channel's configured recipients).
    pub recipient: String,
}

/// The outbox sender for one configuration.
pub struct Sender {
    store: Store,
    config: Arc<Config>,
    channels: Vec<Channel>,
    wake: Arc<tokio::sync::Notify>,
    quiet: Option<QuietHours>,
}

/// Says whether alerts are held back at a time (outside `alerts.quiet_hours`' calendar).
pub type QuietHours = Arc<dyn Fn(DateTime<Utc>) -> bool + Send + Sync>;

impl Sender {
    /// Builds every configured channel (no network access yet).
    pub fn new(store: Store, config: Arc<Config>) -> Result<Sender, SenderError> {
        let channels = config
            .channels
            .iter()
            .map(|c| {
                Channel::from_config(c).map_err(|reason| SenderError::Channel {
                    name: c.name.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Sender {
            store,
            config,
            channels,
            wake: Arc::new(tokio::sync::Notify::new()),
            quiet: None,
        })
    }

    /// Holds alerts back while `quiet(now)` is true (outside the `alerts.quiet_hours` calendar);
    /// held events go into the next digest, marked as deferred, instead of an alert.
    pub fn quiet_hours(mut self, quiet: QuietHours) -> Sender {
        self.quiet = Some(quiet);
        self
    }

    fn is_quiet(&self, now: DateTime<Utc>) -> bool {
        self.quiet.as_ref().is_some_and(|q| q(now))
    }

    /// Makes `run` start a round as soon as `wake` is notified (an alert event or outbox item was
    /// committed), instead of waiting for its next timer.
    pub fn wake_on(mut self, wake: Arc<tokio::sync::Notify>) -> Sender {
        self.wake = wake;
        self
    }

    fn tz(&self) -> Tz {
        self.config.timezone
    }

    /// The time zone digests are rendered in.
    pub fn timezone(&self) -> Tz {
        self.config.timezone
    }

    fn channel(&self, name: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.name() == name)
    }

    /// One round at `now`: enqueue due digests, group alerts, send what is due.
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<RoundReport, SenderError> {
        let mut report = RoundReport::default();
        for schedule in &self.config.digests {
            if let Some(slot) = digest_slot(&schedule.schedule, self.tz(), now) {
                report.digests_enqueued += self.enqueue_digest_slot(schedule, slot, now).await?;
            }
        }
        if self.group_alerts(now).await?.is_some() {
            report.alerts_enqueued += 1;
        }
        let sent = self.send_due(now).await?;
        report.sent = sent.sent;
        report.retried = sent.retried;
        report.failed = sent.failed;
        Ok(report)
    }

    /// Runs rounds until `shutdown`, sleeping until the next due thing (at most 30 s).
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let now = Utc::now();
            if let Err(e) = self.run_once(now).await {
                tracing::warn!(error = %e, "sender round failed; retrying");
            }
            let wake = self.next_wake(now).await;
            let nap = (wake - Utc::now())
                .to_std()
                .unwrap_or(Duration::from_millis(100))
                .clamp(Duration::from_millis(100), Duration::from_secs(30));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    async fn next_wake(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let mut wake = now + TimeDelta::seconds(30);
        if let Ok(Some(t)) = self.store.outbox_next_due().await {
            wake = wake.min(t);
        }
        if let Ok(Some(t)) = self.store.alert_oldest_pending().await {
            wake = wake.min(t + self.group_wait());
        }
        for d in &self.config.digests {
            if let Some(t) = next_occurrence(&d.schedule, self.tz(), now) {
                wake = wake.min(t);
            }
        }
        wake
    }

    fn group_wait(&self) -> TimeDelta {
        TimeDelta::from_std(self.config.alerts.group_wait).unwrap_or(TimeDelta::minutes(1))
    }

    /// Who receives `schedule`'s digest: each team member with an email when `per_owner` (and
    /// the channel is email), else the channel's configured recipients.
    pub fn targets(&self, schedule: &DigestSchedule, owner: Option<&str>) -> Vec<DigestTarget> {
        let is_email = matches!(self.channel(&schedule.channel), Some(Channel::Email(_)));
        if schedule.per_owner && is_email {
            self.config
                .team
                .iter()
                .filter(|m| owner.is_none_or(|o| o == m.name))
                .filter_map(|m| {
                    m.email.first().map(|e| DigestTarget {
                        owner: Some(m.name.clone()),
                        recipient: e.clone(),
                    })
                })
                .collect()
        } else {
            vec![DigestTarget {
                owner: owner.map(str::to_string),
                recipient: String::new(),
            }]
        }
    }

    fn sources(&self) -> Vec<SourceRef> {
        self.config
            .sources
            .iter()
            .map(|s| SourceRef {
                name: s.name.clone(),
                kind: match s.kind {
                    ConfigSourceKind::Imap(_) => SourceKind::Imap,
                    ConfigSourceKind::Webhook(_) => SourceKind::Webhook,
                },
            })
            .collect()
    }

    /// The digest input for the window `(since, now]`.
    pub async fn digest_input(
        &self,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<DigestInput, SenderError> {
        Ok(self.store.digest_input(&self.sources(), since, now).await?)
    }

    /// Builds and renders the digest for one target.
    pub fn render_digest(
        &self,
        input: &DigestInput,
        target: &DigestTarget,
        now: DateTime<Utc>,
    ) -> Result<crate::digest::Rendered, SenderError> {
        Ok(Digest::build(input, now, self.tz(), target.owner.as_deref()).render()?)
    }

    async fn enqueue_digest_slot(
        &self,
        schedule: &DigestSchedule,
        slot: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<usize, SenderError> {
        let since = previous_occurrence(&schedule.schedule, self.tz(), slot)
            .unwrap_or(slot - TimeDelta::days(1));
        let mut enqueued = 0;
        let mut input: Option<DigestInput> = None;
        // In quiet hours the pending alert events go into this digest instead of an alert.
        let deferred = if self.quiet.is_some() {
            self.store.alert_events_pending().await?
        } else {
            Vec::new()
        };
        let mut first_id = None;
        for target in self.targets(schedule, None) {
            let slot_key = digest_slot_key(schedule, &target, &slot.to_rfc3339());
            // Cheap check first, so a restart does not rebuild every digest; the unique slot key
            // is what guarantees one digest per slot.
            if self.store.outbox_slot_exists(&slot_key).await? {
                continue;
            }
            if input.is_none() {
                let mut i = self.digest_input(since, slot).await?;
                i.deferred_alerts = deferred.iter().map(|(_, e)| e.clone()).collect();
                input = Some(i);
            }
            let Some(input) = input.as_ref() else {
                continue;
            };
            let rendered = self.render_digest(input, &target, slot)?;
            let item = new_item(
                OutboxKind::Digest,
                &schedule.channel,
                &target,
                slot_key,
                rendered,
            );
            if let Some(id) = self.store.outbox_push(&item, now).await? {
                enqueued += 1;
                first_id.get_or_insert(id);
            }
        }
        if let Some(id) = first_id
            && !deferred.is_empty()
        {
            let ids: Vec<i64> = deferred.iter().map(|(id, _)| *id).collect();
            self.store.alert_events_attach(&ids, id).await?;
        }
        Ok(enqueued)
    }

    /// Puts a digest for every target of `name` (or the first digest) into the outbox now, outside
    /// the schedule (`frontdesk digest --send`); returns the new outbox ids.
    pub async fn enqueue_digest_now(
        &self,
        name: Option<&str>,
        owner: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Vec<i64>, SenderError> {
        let schedule = self.schedule(name)?;
        let since = previous_occurrence(&schedule.schedule, self.tz(), now)
            .unwrap_or(now - TimeDelta::days(1));
        let input = self.digest_input(since, now).await?;
        let mut ids = vec![];
        let targets = self.targets(schedule, owner);
        if targets.is_empty() {
            return Err(SenderError::Unknown(format!(
                "no team member named {:?} with an email address",
                owner.unwrap_or_default()
            )));
        }
        for target in targets {
            let rendered = self.render_digest(&input, &target, now)?;
            let slot_key = digest_slot_key(
                schedule,
                &target,
                &format!("manual:{}", now.format("%Y-%m-%dT%H:%M:%S%.6fZ")),
            );
            let item = new_item(
                OutboxKind::Digest,
                &schedule.channel,
                &target,
                slot_key,
                rendered,
            );
            if let Some(id) = self.store.outbox_push(&item, now).await? {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// The named digest schedule, or the first one; a config without digests gets the default.
    pub fn schedule(&self, name: Option<&str>) -> Result<&DigestSchedule, SenderError> {
        match name {
            Some(n) => self
                .config
                .digests
                .iter()
                .find(|d| d.name == n)
                .ok_or_else(|| SenderError::Unknown(format!("no digest named {n:?}"))),
            None => self
                .config
                .digests
                .first()
                .ok_or_else(|| SenderError::Unknown("no digest is configured".into())),
        }
    }

    /// Groups pending alert events into one item on the alerts channel (see `Store::alert_group`).
    pub async fn group_alerts(&self, now: DateTime<Utc>) -> Result<Option<i64>, SenderError> {
        if self.is_quiet(now) {
            return Ok(None);
        }
        let alerts = &self.config.alerts;
        let tz = self.tz();
        let channel = alerts.channel.clone();
        let wanted = |e: &AlertEvent| match e {
            AlertEvent::SlaWarn { .. } => alerts.on.contains(&AlertKind::SlaWarning),
            AlertEvent::SlaBreach { .. } => alerts.on.contains(&AlertKind::SlaBreach),
            AlertEvent::SourceUnhealthy { .. } | AlertEvent::SourceHealthy { .. } => {
                alerts.on.contains(&AlertKind::SourceUnhealthy)
            }
        };
        let mut render_error = None;
        let id = self
            .store
            .alert_group(now, self.group_wait(), |events| {
                let events: Vec<AlertEvent> = events.into_iter().filter(|e| wanted(e)).collect();
                if events.is_empty() {
                    return None;
                }
                match (Alert { events }).render(now, tz) {
                    Ok(r) => Some(new_item(
                        OutboxKind::Alert,
                        &channel,
                        &DigestTarget {
                            owner: None,
                            recipient: String::new(),
                        },
                        String::new(),
                        r,
                    )),
                    Err(e) => {
                        render_error = Some(e);
                        None
                    }
                }
            })
            .await?;
        if let Some(e) = render_error {
            return Err(e.into());
        }
        Ok(id)
    }

    /// Sends every due item once; `only` restricts the round to these outbox ids.
    pub async fn send_due_only(
        &self,
        now: DateTime<Utc>,
        only: Option<&[i64]>,
    ) -> Result<RoundReport, SenderError> {
        let mut report = RoundReport::default();
        let due = self.store.outbox_due(now, BATCH).await?;
        for item in due {
            if only.is_some_and(|ids| !ids.contains(&item.id)) {
                continue;
            }
            let Some(channel) = self.channel(&item.channel) else {
                let o = Outcome::Failed {
                    error: format!("channel {} is no longer configured", item.channel),
                };
                self.store.outbox_record(item.id, &o, now).await?;
                report.failed += 1;
                continue;
            };
            let lease = TimeDelta::from_std(channel.send_timeout())
                .unwrap_or(TimeDelta::minutes(1))
                + TimeDelta::minutes(1);
            if !self.store.outbox_claim(item.id, now, lease).await? {
                continue;
            }
            let result = channel.send(&item).await;
            // Times come from the caller (tests drive the clock); the daemon passes the real now.
            let done_at = now;
            let o = outcome(result, item.attempts + 1, done_at, rand::random::<f64>());
            match &o {
                Outcome::Sent => {
                    report.sent += 1;
                    tracing::info!(outbox_id = item.id, kind = item.kind.as_str(), channel = %item.channel, "sent");
                }
                Outcome::Retry { at, error } => {
                    report.retried += 1;
                    tracing::warn!(outbox_id = item.id, channel = %item.channel, error = %error, retry_at = %at, "send failed; will retry");
                }
                Outcome::Failed { error } => {
                    report.failed += 1;
                    tracing::error!(outbox_id = item.id, kind = item.kind.as_str(), channel = %item.channel, error = %error, "send failed permanently; listed in the next digest");
                }
            }
            self.store.outbox_record(item.id, &o, done_at).await?;
        }
        Ok(report)
    }

    /// Sends every due item once.
    pub async fn send_due(&self, now: DateTime<Utc>) -> Result<RoundReport, SenderError> {
        self.send_due_only(now, None).await
    }
}

fn new_item(
    kind: OutboxKind,
    channel: &str,
    target: &DigestTarget,
    slot_key: String,
    r: crate::digest::Rendered,
) -> NewOutboxItem {
    NewOutboxItem {
        kind,
        channel: channel.to_string(),
        recipient: target.recipient.clone(),
        slot_key,
        subject: r.subject,
        body_text: r.text,
        body_html: Some(r.html),
    }
}

/// `digest:<name>:<recipient or team>:<period>`: one digest per (channel, recipient, period).
pub fn digest_slot_key(schedule: &DigestSchedule, target: &DigestTarget, period: &str) -> String {
    let who = if target.recipient.is_empty() {
        "team"
    } else {
        target.recipient.as_str()
    };
    format!(
        "digest:{}:{}:{}:{}",
        schedule.name, schedule.channel, who, period
    )
}

fn cron(schedule: &str) -> Option<croner::Cron> {
    schedule.parse::<croner::Cron>().ok()
}

/// The latest scheduled time at or before `now`, if it is within `CATCH_UP`.
pub fn digest_slot(schedule: &str, tz: Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let slot = cron(schedule)?
        .find_previous_occurrence(&now.with_timezone(&tz), true)
        .ok()?
        .with_timezone(&Utc);
    (now - slot <= CATCH_UP).then_some(slot)
}

/// The scheduled time before `t` (the start of the "new since" window).
pub fn previous_occurrence(schedule: &str, tz: Tz, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron(schedule)?
        .find_previous_occurrence(&t.with_timezone(&tz), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The next scheduled time after `t`.
pub fn next_occurrence(schedule: &str, tz: Tz, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron(schedule)?
        .find_next_occurrence(&t.with_timezone(&tz), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn slots_follow_the_schedule_in_the_time_zone() {
        let tz = chrono_tz::Europe::Athens;
        let local = |d, h, m| {
            tz.with_ymd_and_hms(2026, 11, d, h, m, 0)
                .unwrap()
                .with_timezone(&Utc)
        };
        let s = "0 8 * * Mon-Fri";
        // Thu 26 Nov 08:00 Athens = 06:00 UTC.
        assert_eq!(digest_slot(s, tz, local(26, 8, 0)), Some(local(26, 8, 0)));
        assert_eq!(digest_slot(s, tz, local(26, 9, 30)), Some(local(26, 8, 0)));
        assert_eq!(
            digest_slot(s, tz, local(26, 7, 59)),
            None,
            "yesterday's is past catch-up"
        );
        assert_eq!(
            previous_occurrence(s, tz, local(30, 8, 0)),
            Some(local(27, 8, 0)),
            "Monday after Friday"
        );
        assert_eq!(
            next_occurrence(s, tz, local(27, 8, 0)),
            Some(local(30, 8, 0))
        );
    }

    proptest::proptest! {
        #[test]
        fn the_slot_is_the_same_all_through_its_window(mins in 0i64..(12 * 60)) {
            let tz = chrono_tz::Europe::Athens;
            let slot = tz.with_ymd_and_hms(2026, 11, 26, 8, 0, 0).unwrap().with_timezone(&Utc);
            let now = slot + TimeDelta::minutes(mins);
            proptest::prop_assert_eq!(digest_slot("0 8 * * Mon-Fri", tz, now), Some(slot));
        }
    }
}
