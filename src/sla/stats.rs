//! Response-time statistics over fulfilled targets: count, median, 90th percentile, share met (pure).

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::clock::Metric;

/// One fulfilled target as the statistics need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fulfilled {
    /// First or next reply.
    pub metric: Metric,
    /// Source of the conversation.
    pub source: String,
    /// Owner of the conversation.
    pub owner: Option<String>,
    /// Client name or address.
    pub client: String,
    /// Business time to the reply, milliseconds.
    pub business_ms: i64,
    /// Calendar time to the reply, milliseconds.
    pub calendar_ms: i64,
    /// Whether it was met (not `met_late`).
    pub met: bool,
    /// When the reply came.
    pub fulfilled_at: DateTime<Utc>,
}

/// How to group the statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// One group for everything.
    All,
    /// Per client.
    Client,
    /// Per owner.
    Owner,
    /// Per source.
    Source,
}

/// Statistics of one group and metric; durations in whole seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The group's name (`all`, a client, an owner, a source; `(none)` for no owner).
    pub group: String,
    /// `first_reply` or `next_reply`.
    pub metric: &'static str,
    /// Fulfilled targets.
    pub count: usize,
    /// Median business time, seconds.
    pub median_business_s: i64,
    /// 90th percentile business time, seconds.
    pub p90_business_s: i64,
    /// Median calendar time, seconds.
    pub median_calendar_s: i64,
    /// 90th percentile calendar time, seconds.
    pub p90_calendar_s: i64,
    /// Share met within target, 0.0 ..= 1.0.
    pub share_met: f64,
}

/// The nearest-rank percentile (`p` in 1..=100) of sorted values; 0 for none.
pub fn percentile(sorted: &[i64], p: u32) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (u64::from(p.clamp(1, 100)) * sorted.len() as u64).div_ceil(100);
    sorted[(rank as usize).saturating_sub(1).min(sorted.len() - 1)]
}

/// Summaries per group and metric, sorted by group then metric.
pub fn summarize(rows: &[Fulfilled], by: GroupBy) -> Vec<Summary> {
    let mut groups: std::collections::BTreeMap<(String, &'static str), Vec<&Fulfilled>> =
        Default::default();
    for r in rows {
        let g = match by {
            GroupBy::All => "all".to_string(),
            GroupBy::Client => r.client.clone(),
            GroupBy::Owner => r.owner.clone().unwrap_or_else(|| "(none)".into()),
            GroupBy::Source => r.source.clone(),
        };
        groups.entry((g, r.metric.as_str())).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|((group, metric), rs)| {
            let mut business: Vec<i64> = rs.iter().map(|r| r.business_ms / 1000).collect();
            let mut calendar: Vec<i64> = rs.iter().map(|r| r.calendar_ms / 1000).collect();
            business.sort_unstable();
            calendar.sort_unstable();
            let met = rs.iter().filter(|r| r.met).count();
            Summary {
                group,
                metric,
                count: rs.len(),
                median_business_s: percentile(&business, 50),
                p90_business_s: percentile(&business, 90),
                median_calendar_s: percentile(&calendar, 50),
                p90_calendar_s: percentile(&calendar, 90),
                share_met: met as f64 / rs.len() as f64,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<i64> = (1..=10).collect();
        assert_eq!(percentile(&v, 50), 5);
        assert_eq!(percentile(&v, 90), 9);
        assert_eq!(percentile(&v, 100), 10);
        assert_eq!(percentile(&[7], 90), 7);
        assert_eq!(percentile(&[], 50), 0);
        assert_eq!(percentile(&[1, 2, 3], 50), 2);
    }

    #[test]
    fn summaries_per_owner() {
        let row = |owner: Option<&str>, metric, mins: i64, met| Fulfilled {
            metric,
            source: "mail".into(),
            owner: owner.map(String::from),
            client: "c".into(),
            business_ms: mins * 60_000,
            calendar_ms: mins * 120_000,
            met,
            fulfilled_at: DateTime::<Utc>::UNIX_EPOCH,
        };
        let rows = vec![
            row(Some("Maria"), Metric::FirstReply, 10, true),
            row(Some("Maria"), Metric::FirstReply, 30, true),
            row(Some("Maria"), Metric::FirstReply, 90, false),
            row(Some("Maria"), Metric::NextReply, 5, true),
            row(None, Metric::FirstReply, 1, true),
        ];
        let s = summarize(&rows, GroupBy::Owner);
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].group.as_str(), s[0].metric),
            ("(none)", "first_reply")
        );
        let m = &s[1];
        assert_eq!(
            (m.group.as_str(), m.metric, m.count),
            ("Maria", "first_reply", 3)
        );
        assert_eq!((m.median_business_s, m.p90_business_s), (1800, 5400));
        assert_eq!(m.median_calendar_s, 3600);
        assert!((m.share_met - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(s[2].metric, "next_reply");
        assert_eq!(summarize(&rows, GroupBy::All).len(), 2);
    }
}
