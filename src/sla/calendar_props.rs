//! Property tests of the calendar against a brute-force minute-by-minute oracle (reliability.md §5.4).
//!
//! The oracle never asks chrono-tz to resolve a local time: it lists the wall-clock reading of
//! every UTC minute in a 12-day window around a DST change, finds each interval's opening as "the
//! first minute whose reading is at least the start" and its closing as "the first minute from
//! which every reading is at least the end" (the documented semantics), marks open minutes and
//! counts them. Case count: `PROPTEST_CASES` (default 2000; nightly runs 100000).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use chrono::{DateTime, NaiveDate, NaiveTime, Offset, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use proptest::prelude::*;

use super::calendar::{Calendar, Weekly};

/// Zones and the UTC dates of their clock changes (plus one quiet date for the fixed-offset zone).
/// A UTC date as (year, month, day).
type Ymd = (i32, u32, u32);

const ZONES: &[(Tz, &[Ymd])] = &[
    (chrono_tz::America::New_York, &[(2025, 3, 9), (2025, 11, 2)]),
    (chrono_tz::Europe::Berlin, &[(2025, 3, 30), (2025, 10, 26)]),
    (
        chrono_tz::Australia::Lord_Howe,
        &[(2025, 4, 5), (2025, 10, 4)],
    ),
    // +05:45 now; 1986-01-01 is the +05:30 -> +05:45 change (a 15-minute gap).
    (chrono_tz::Asia::Kathmandu, &[(2025, 6, 15), (1985, 12, 31)]),
    // Clocks change at local midnight, so the local date itself repeats or is cut short.
    (chrono_tz::America::Santiago, &[(2025, 4, 6), (2025, 9, 7)]),
];

const DAY: i64 = 1440;
/// Window: 12 days of minutes; the clock change sits in the middle.
const SPAN: i64 = 12 * DAY;
/// Queries start in [QUERY_FROM, QUERY_TO); oracle answers are trusted up to LIMIT.
const QUERY_FROM: i64 = 2 * DAY;
const QUERY_TO: i64 = 8 * DAY;
const LIMIT: i64 = 10 * DAY;

/// Wall-clock readings of a window, with prefix maxima and suffix minima.
struct Window {
    base: DateTime<Utc>,
    /// Local minutes since 1970-01-01T00:00 (naive) for each UTC minute of the window.
    wall: Vec<i64>,
    prefix_max: Vec<i64>,
    suffix_min: Vec<i64>,
}

thread_local! {
    static WINDOWS: RefCell<HashMap<(usize, usize), Rc<Window>>> = RefCell::new(HashMap::new());
}

fn window(zone: usize, anchor: usize) -> Rc<Window> {
    WINDOWS.with(|w| {
        w.borrow_mut()
            .entry((zone, anchor))
            .or_insert_with(|| {
                let (tz, anchors) = ZONES[zone];
                let (y, m, d) = anchors[anchor];
                let base = Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap() - TimeDelta::days(6);
                let wall: Vec<i64> = (0..SPAN)
                    .map(|i| {
                        let t = base + TimeDelta::minutes(i);
                        let off = tz
                            .offset_from_utc_datetime(&t.naive_utc())
                            .fix()
                            .local_minus_utc();
                        assert_eq!(off % 60, 0, "oracle needs whole-minute offsets");
                        t.timestamp() / 60 + i64::from(off / 60)
                    })
                    .collect();
                let mut prefix_max = wall.clone();
                for i in 1..prefix_max.len() {
                    prefix_max[i] = prefix_max[i].max(prefix_max[i - 1]);
                }
                let mut suffix_min = wall.clone();
                for i in (0..suffix_min.len() - 1).rev() {
                    suffix_min[i] = suffix_min[i].min(suffix_min[i + 1]);
                }
                Rc::new(Window {
                    base,
                    wall,
                    prefix_max,
                    suffix_min,
                })
            })
            .clone()
    })
}

/// One weekday: intervals as (start minute, end minute of day), end <= start meaning the next day.
type DaySpec = Vec<(u32, u32)>;

/// Minutes where DST changes happen in the test zones, to make boundaries hit gaps and overlaps.
fn minute() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 0u32..1440,
        2 => prop::sample::select(vec![0u32, 30, 60, 90, 105, 120, 135, 150, 180, 210, 240, 1380, 1410]),
    ]
}

fn day_spec() -> impl Strategy<Value = DaySpec> {
    (0usize..=3).prop_flat_map(|k| {
        let cuts = if k == 0 { 0 } else { 2 * k - 1 };
        (prop::collection::btree_set(minute(), cuts..=cuts), minute()).prop_map(
            move |(cuts, last_end)| {
                let c: Vec<u32> = cuts.into_iter().collect();
                let mut v = Vec::new();
                for i in 0..k {
                    if i + 1 < k {
                        v.push((c[2 * i], c[2 * i + 1]));
                    } else {
                        // The last interval of the day may run past midnight (or last 24 h).
                        v.push((c[2 * i], last_end));
                    }
                }
                v
            },
        )
    })
}

#[derive(Debug, Clone)]
struct Case {
    zone: usize,
    anchor: usize,
    week: Vec<DaySpec>,
    /// Holidays as day offsets from the anchor date.
    holidays: BTreeSet<i64>,
    /// (start minute in the window, duration minutes, extra seconds, b offset, c offset)
    queries: Vec<(i64, i64, i64, i64, i64)>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..ZONES.len(),
        0usize..2,
        prop::collection::vec(day_spec(), 7),
        prop::collection::btree_set(-6i64..6, 0..3),
        prop::collection::vec(
            (
                QUERY_FROM..QUERY_TO,
                prop_oneof![0i64..600, 0i64..3 * DAY],
                0i64..60,
                0i64..2 * DAY,
                0i64..2 * DAY,
            ),
            1..8,
        ),
    )
        .prop_filter("some weekday must have hours", |(_, _, week, _, _)| {
            week.iter().any(|d| !d.is_empty())
        })
        .prop_map(|(zone, anchor, week, holidays, queries)| Case {
            zone,
            anchor,
            week,
            holidays,
            queries,
        })
}

fn time_of(minute: u32) -> NaiveTime {
    NaiveTime::from_hms_opt(minute / 60 % 24, minute % 60, 0).unwrap()
}

fn anchor_date(c: &Case) -> NaiveDate {
    let (y, m, d) = ZONES[c.zone].1[c.anchor];
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

fn build(c: &Case) -> Calendar {
    let weekly: Weekly = std::array::from_fn(|i| {
        c.week[i]
            .iter()
            .map(|&(s, e)| (time_of(s), time_of(e)))
            .collect()
    });
    let holidays = c
        .holidays
        .iter()
        .map(|&off| anchor_date(c) + TimeDelta::days(off))
        .collect();
    Calendar::new(ZONES[c.zone].0, weekly, holidays).unwrap()
}

/// The oracle: one flag per minute of the window, and prefix counts of open minutes.
fn oracle(c: &Case, w: &Window) -> (Vec<bool>, Vec<i64>) {
    let n = w.wall.len();
    let mut open = vec![false; n];
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
    let first_day = w.wall[0].div_euclid(DAY) - 1;
    let last_day = w.prefix_max[n - 1].div_euclid(DAY);
    let holidays: BTreeSet<i64> = c
        .holidays
        .iter()
        .map(|&off| (anchor_date(c) - epoch).num_days() + off)
        .collect();
    for day in first_day..=last_day {
        if holidays.contains(&day) {
            continue;
        }
        // 1970-01-01 was a Thursday (index 3, Monday = 0).
        let weekday = (day + 3).rem_euclid(7) as usize;
        for &(s, e) in &c.week[weekday] {
            let (s, e) = (i64::from(s), i64::from(e));
            let len = if e > s { e - s } else { e + DAY - s };
            let local_start = day * DAY + s;
            let local_end = local_start + len;
            let from = w.prefix_max.partition_point(|&x| x < local_start);
            let to = w.suffix_min.partition_point(|&x| x < local_end);
            for flag in open.iter_mut().take(to).skip(from) {
                *flag = true;
            }
        }
    }
    let mut prefix = vec![0i64; n + 1];
    for i in 0..n {
        prefix[i + 1] = prefix[i] + i64::from(open[i]);
    }
    (open, prefix)
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn calendar_agrees_with_minute_oracle(c in case()) {
        let cal = build(&c);
        let w = window(c.zone, c.anchor);
        let (open, prefix) = oracle(&c, &w);
        let at = |i: i64| w.base + TimeDelta::minutes(i);
        let min = TimeDelta::minutes;
        for &(ti, d, extra_secs, b_off, c_off) in &c.queries {
            let t = at(ti);
            let tu = ti as usize;

            // is_open / next_open.
            prop_assert_eq!(cal.is_open(t), open[tu], "is_open at {}", t);
            if let Some(k) = open[tu..LIMIT as usize].iter().position(|&o| o) {
                prop_assert_eq!(cal.next_open(t), at(ti + k as i64));
            }

            // add_business: exactly the oracle's earliest minute, or beyond the window.
            let due = cal.add_business(t, min(d));
            let need = prefix[tu] + d;
            let j = prefix[tu..=LIMIT as usize].partition_point(|&p| p < need) as i64 + ti;
            if j <= LIMIT {
                prop_assert_eq!(due, at(j), "add_business({}, {}m)", t, d);
            } else {
                prop_assert!(due > at(LIMIT));
            }
            // Round trip, and minimality: a second earlier is not enough.
            prop_assert_eq!(cal.business_between(t, due), min(d));
            if d > 0 {
                prop_assert!(cal.business_between(t, due - TimeDelta::seconds(1)) < min(d));
            }

            // business_between against the oracle, bounds, additivity, monotonicity.
            let b = (ti + b_off).min(LIMIT);
            let cc = (b + c_off).min(LIMIT);
            let ab = cal.business_between(t, at(b));
            let bc = cal.business_between(at(b), at(cc));
            let ac = cal.business_between(t, at(cc));
            prop_assert_eq!(ab, min(prefix[b as usize] - prefix[tu]));
            prop_assert_eq!(ac, min(prefix[cc as usize] - prefix[tu]));
            prop_assert_eq!(ac, ab + bc);
            prop_assert!(ab <= ac);
            prop_assert!(ab >= TimeDelta::zero() && ab <= at(b) - t);
            prop_assert_eq!(cal.business_between(at(b), t), TimeDelta::zero());

            // add_business is monotone in the duration and in the start.
            let due_more = cal.add_business(t, min(d + c_off));
            prop_assert!(due <= due_more);
            let later = cal.add_business(at(b), min(d));
            prop_assert!(due <= later);

            // Sub-minute starts and durations: round trip and minimality still hold.
            let ts = t + TimeDelta::seconds(extra_secs);
            let ds = min(d) + TimeDelta::seconds(extra_secs);
            let dues = cal.add_business(ts, ds);
            prop_assert_eq!(cal.business_between(ts, dues), ds);
            if ds > TimeDelta::zero() {
                prop_assert!(cal.business_between(ts, dues - TimeDelta::milliseconds(1)) < ds);
            }
        }
    }
}

/// The oracle itself must be able to fail: it disagrees with a deliberately wrong calendar.
#[test]
fn oracle_detects_a_wrong_calendar() {
    let c = Case {
        zone: 1,
        anchor: 0,
        week: vec![vec![(540, 1020)]; 7],
        holidays: BTreeSet::new(),
        queries: vec![],
    };
    let w = window(c.zone, c.anchor);
    let (_, prefix) = oracle(&c, &w);
    // 9-17 every day for 8 full days in the query range: 8 * 8 h.
    let from = (QUERY_FROM - QUERY_FROM % DAY) as usize;
    assert_eq!(prefix[from + 8 * DAY as usize] - prefix[from], 8 * 8 * 60);
    let mut wrong = c.clone();
    wrong.week[0] = vec![(540, 1000)];
    let wrong_cal = build(&wrong);
    let t = w.base + TimeDelta::minutes(from as i64);
    assert_ne!(
        wrong_cal.business_between(t, t + TimeDelta::days(8)),
        TimeDelta::minutes(prefix[from + 8 * DAY as usize] - prefix[from])
    );
}
