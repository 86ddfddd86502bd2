//! Business hours: an IANA time zone, open intervals per weekday, holidays; business-time arithmetic.
//!
//! # Semantics (the choices the SLA spec leaves open, made here)
//! - An interval belongs to the local date it starts on. `"22:00-06:00"` on Friday runs from
//!   Friday 22:00 to Saturday 06:00 local; an end at or before the start means "the next day", so
//!   `"00:00-24:00"` (or `"00:00-00:00"`) is a whole day.
//! - A holiday cancels every interval that *starts* on that local date. The tail of an overnight
//!   interval that began the evening before still runs to its end (the night shift that started
//!   on a working day finishes).
//! - Local wall-clock times are turned into instants like this, which makes the open set a
//!   function of instants only and keeps both `add_business` and `business_between` exact:
//!   - an interval opens at the **first instant at which the wall clock reads its start time or
//!     later**: for a time that exists once, that instant; for a time that exists twice (clocks
//!     going back), the earlier one; for a time that does not exist (clocks going forward), the
//!     instant the gap ends (e.g. `02:30` on Europe/Berlin's spring day opens at 03:00 CEST);
//!   - it closes at the **instant from which the wall clock reads its end time or later for
//!     good**: for a time that exists twice, the later one (except the time the clock lands on
//!     when it goes back: the reading never drops below it again, so the first); for a missing
//!     time, the end of the gap.
//!
//!   So a 00:00-04:00 interval lasts 3 h on a spring-forward day and 5 h on a fall-back day, a
//!   09:00-17:00 day is 8 h on both, and a shift that spans the repeated hour works it twice.
//! - Overlapping open periods (a night shift running into the next day's first interval, or the
//!   repeated hour) count once.
//!
//! # Speed
//! The arithmetic walks from one open interval to the next (two time-zone lookups per interval),
//! never minute by minute.

use std::collections::BTreeSet;

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, TimeZone,
    Timelike, Utc, Weekday,
};
use chrono_tz::Tz;

/// Open intervals per weekday, Monday first, as `(start, end)` local times; `end <= start` means the next day.
pub type Weekly = [Vec<(NaiveTime, NaiveTime)>; 7];

/// Seconds in one day.
const DAY_SECS: u32 = 86_400;

/// Weekday names in index order (Monday = 0), as used in config keys and error messages.
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A problem with the calendar's hours or holidays, phrased for the config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    /// Two intervals of the same weekday overlap.
    #[error("{day}: intervals {first} and {second} overlap")]
    Overlap {
        /// The weekday (`mon` .. `sun`).
        day: &'static str,
        /// The earlier interval, as `HH:MM-HH:MM`.
        first: String,
        /// The later interval, as `HH:MM-HH:MM`.
        second: String,
    },
    /// No weekday has any interval, so no deadline could ever be reached.
    #[error("the calendar has no open hours on any weekday; add at least one interval")]
    NeverOpen,
    /// An `hours:` key names something that is not a weekday.
    #[error(
        "unknown weekday '{0}': use mon, tue, wed, thu, fri, sat, sun, a range like mon-fri, or a list like mon,wed"
    )]
    UnknownDay(String),
    /// The same weekday appears under two `hours:` keys.
    #[error("{0} is given more than once in hours")]
    DuplicateDay(&'static str),
    /// An interval is not `HH:MM-HH:MM`.
    #[error("bad interval '{0}': expected HH:MM-HH:MM, e.g. 09:00-17:30 (24:00 allowed as an end)")]
    BadInterval(String),
}

/// A problem in an iCalendar holidays file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IcsError {
    /// A date value could not be read.
    #[error("line {line}: bad date '{value}': expected YYYYMMDD")]
    BadDate {
        /// 1-based line number (after unfolding, the line the property starts on).
        line: usize,
        /// The offending value.
        value: String,
    },
    /// A recurring event: its dates would have to be expanded, which is not supported.
    #[error(
        "line {line}: recurring events (RRULE/RDATE) are not supported; list each holiday as its own all-day event"
    )]
    Recurring {
        /// 1-based line number.
        line: usize,
    },
    /// DTEND is not after DTSTART, or the event spans more than a year.
    #[error("line {line}: event end must be after its start and within 366 days")]
    BadSpan {
        /// 1-based line number of the event's BEGIN:VEVENT.
        line: usize,
    },
    /// A VEVENT is not closed by END:VEVENT.
    #[error("line {line}: BEGIN:VEVENT without END:VEVENT")]
    Unterminated {
        /// 1-based line number of the BEGIN:VEVENT.
        line: usize,
    },
}

/// One open interval of a weekday: seconds after local midnight, and its length (1 s ..= 24 h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shift {
    start: u32,
    len: u32,
}

impl Shift {
    fn from_times(start: NaiveTime, end: NaiveTime) -> Self {
        let s = start.num_seconds_from_midnight();
        let e = end.num_seconds_from_midnight();
        let len = if e > s { e - s } else { e + DAY_SECS - s };
        Shift { start: s, len }
    }

    fn end(self) -> u32 {
        self.start + self.len
    }

    fn label(self) -> String {
        format!("{}-{}", hhmm(self.start), hhmm(self.end() % DAY_SECS))
    }
}

/// Formats seconds after midnight as `HH:MM` (seconds dropped; config intervals are whole minutes).
fn hhmm(secs: u32) -> String {
    format!("{:02}:{:02}", secs / 3600, (secs % 3600) / 60)
}

/// Business hours in one IANA time zone, with holidays; all arithmetic on UTC instants.
#[derive(Debug, Clone, PartialEq)]
pub struct Calendar {
    tz: Tz,
    weekly: [Vec<Shift>; 7],
    holidays: BTreeSet<NaiveDate>,
    /// 24/7 calendar time: every instant is business time (`calendar: always`).
    always: bool,
}

impl Calendar {
    /// Builds a calendar; intervals of one weekday must not overlap and at least one must exist.
    pub fn new(
        tz: Tz,
        weekly: Weekly,
        holidays: BTreeSet<NaiveDate>,
    ) -> Result<Self, CalendarError> {
        let mut shifts: [Vec<Shift>; 7] = Default::default();
        for (day, intervals) in weekly.iter().enumerate() {
            let mut list: Vec<Shift> = intervals
                .iter()
                .map(|&(s, e)| Shift::from_times(s, e))
                .collect();
            list.sort_by_key(|s| s.start);
            for pair in list.windows(2) {
                if pair[0].end() > pair[1].start {
                    return Err(CalendarError::Overlap {
                        day: DAY_NAMES[day],
                        first: pair[0].label(),
                        second: pair[1].label(),
                    });
                }
            }
            shifts[day] = list;
        }
        if shifts.iter().all(Vec::is_empty) {
            return Err(CalendarError::NeverOpen);
        }
        Ok(Calendar {
            tz,
            weekly: shifts,
            holidays,
            always: false,
        })
    }

    /// The 24/7 calendar: business time equals calendar time (`calendar: always`).
    pub fn always() -> Self {
        Calendar {
            tz: Tz::UTC,
            weekly: Default::default(),
            holidays: BTreeSet::new(),
            always: true,
        }
    }

    /// Whether this is the 24/7 calendar.
    pub fn is_always(&self) -> bool {
        self.always
    }

    /// The calendar's time zone (UTC for the 24/7 calendar).
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The holidays (closed local dates).
    pub fn holidays(&self) -> &BTreeSet<NaiveDate> {
        &self.holidays
    }

    /// The earliest instant at which `d` of business time has elapsed since `start`.
    ///
    /// A start outside business hours counts from the next opening; `d <= 0` returns `start`.
    /// Saturates at the largest representable instant instead of overflowing.
    pub fn add_business(&self, start: DateTime<Utc>, d: TimeDelta) -> DateTime<Utc> {
        if d <= TimeDelta::zero() {
            return start;
        }
        if self.always {
            return start
                .checked_add_signed(d)
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
        }
        let mut remaining = d;
        for (open, close) in self.open_spans(start) {
            let len = close - open;
            if remaining <= len {
                return open + remaining;
            }
            remaining -= len;
        }
        DateTime::<Utc>::MAX_UTC
    }

    /// Business time in `[a, b)`; zero when `b <= a`.
    pub fn business_between(&self, a: DateTime<Utc>, b: DateTime<Utc>) -> TimeDelta {
        if b <= a {
            return TimeDelta::zero();
        }
        if self.always {
            return b - a;
        }
        let mut total = TimeDelta::zero();
        for (open, close) in self.open_spans(a) {
            if open >= b {
                break;
            }
            total += close.min(b) - open;
        }
        total
    }

    /// The first business instant at or after `t` (`t` itself when open).
    pub fn next_open(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        if self.always {
            return t;
        }
        self.open_spans(t)
            .next()
            .map_or(DateTime::<Utc>::MAX_UTC, |(open, _)| open)
    }

    /// Whether `t` is business time.
    pub fn is_open(&self, t: DateTime<Utc>) -> bool {
        self.next_open(t) == t
    }

    /// The open periods from `from` on, in order, disjoint, the first clipped to start at `from`.
    ///
    /// Each item is `[open, close)` in UTC; touching periods may come as separate items. For the
    /// 24/7 calendar this yields one period to the end of time.
    pub fn open_spans(&self, from: DateTime<Utc>) -> OpenSpans<'_> {
        let local_date = from.with_timezone(&self.tz).date_naive();
        // Two days back: an overnight interval of yesterday, pushed later by a clock going back at
        // midnight, can still be open at `from`.
        let day = local_date
            .checked_sub_days(chrono::Days::new(2))
            .unwrap_or(local_date);
        OpenSpans {
            calendar: self,
            day: Some(day),
            index: 0,
            frontier: from,
            always_done: false,
        }
    }

    /// The instant an interval starting at local `t` opens (see the module docs).
    fn opening_instant(&self, t: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&t) {
            LocalResult::Single(x) => Some(x.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
            LocalResult::None => self.gap_end(t),
        }
    }

    /// The instant an interval ending at local `t` closes (see the module docs).
    fn closing_instant(&self, t: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&t) {
            LocalResult::Single(x) => Some(x.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, b) => {
                let (first, second) = (a.min(b), a.max(b));
                // When `t` is exactly where the clock lands after going back, the reading never
                // drops below `t` between the two occurrences: it is "for good" from the first.
                let before_second = (second - TimeDelta::seconds(1)).naive_local();
                if before_second >= t {
                    Some(first.with_timezone(&Utc))
                } else {
                    Some(second.with_timezone(&Utc))
                }
            }
            LocalResult::None => self.gap_end(t),
        }
    }

    /// For a local time inside a gap (clocks going forward): the first instant after the gap.
    fn gap_end(&self, t: NaiveDateTime) -> Option<DateTime<Utc>> {
        if let Some(end) = chrono_tz::GapInfo::new(&t, &self.tz).and_then(|g| g.end) {
            return Some(end.with_timezone(&Utc));
        }
        // chrono-tz could not name the end (edge of its table): search for the first second whose
        // wall-clock time reaches `t`. Offsets lie within +-16 h, so the answer is in this window.
        let guess = t.and_utc().timestamp();
        let (mut lo, mut hi) = (guess - 16 * 3600, guess + 16 * 3600);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let wall = DateTime::from_timestamp(mid, 0)?
                .with_timezone(&self.tz)
                .naive_local();
            if wall >= t {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        DateTime::from_timestamp(lo, 0)
    }

    fn is_holiday(&self, d: NaiveDate) -> bool {
        self.holidays.contains(&d)
    }
}

impl Calendar {
    /// How `add_business(start, d)` was reached, in plain sentences (for `frontdesk explain`):
    /// each open period counted and each closed period skipped, in the calendar's time zone.
    pub fn explain_due(&self, start: DateTime<Utc>, d: TimeDelta) -> Vec<String> {
        let fmt = |t: DateTime<Utc>| {
            t.with_timezone(&self.tz)
                .format("%a %Y-%m-%d %H:%M")
                .to_string()
        };
        let mut out = vec![format!(
            "The clock started at {} ({}).",
            fmt(start),
            if self.always {
                "24/7 calendar".to_string()
            } else {
                self.tz.name().to_string()
            }
        )];
        if d <= TimeDelta::zero() {
            out.push("No business time was needed, so it is due at once.".into());
            return out;
        }
        let due = self.add_business(start, d);
        let mut cursor = start;
        let mut counted = TimeDelta::zero();
        for (open, close) in self.open_spans(start) {
            if open >= due || out.len() > 60 {
                break;
            }
            if open > cursor {
                out.push(format!(
                    "Closed from {} to {}: skipped.",
                    fmt(cursor),
                    fmt(open)
                ));
            }
            let end = close.min(due);
            counted += end - open;
            out.push(format!(
                "Open from {} to {}: counted {} (total {}).",
                fmt(open),
                fmt(end),
                human(end - open),
                human(counted)
            ));
            cursor = end;
        }
        out.push(format!(
            "{} of business time is reached at {}: the due time.",
            human(d),
            fmt(due)
        ));
        out
    }
}

/// A duration as `1h 30m` (seconds shown only when present).
pub fn human(d: TimeDelta) -> String {
    let secs = d.num_seconds();
    let (days, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    let mut parts = Vec::new();
    if days > 0 {
        parts.push(format!("{days}d"));
    }
    if h > 0 {
        parts.push(format!("{h}h"));
    }
    if m > 0 {
        parts.push(format!("{m}m"));
    }
    if s > 0 || parts.is_empty() {
        parts.push(format!("{s}s"));
    }
    parts.join(" ")
}

/// Iterator over a calendar's open periods; see [`Calendar::open_spans`].
#[derive(Debug, Clone)]
pub struct OpenSpans<'a> {
    calendar: &'a Calendar,
    /// The local date whose intervals come next; `None` once past the end of representable time.
    day: Option<NaiveDate>,
    /// The next interval of `day`.
    index: usize,
    /// Everything before this instant has been yielded or lies before the start.
    frontier: DateTime<Utc>,
    always_done: bool,
}

impl Iterator for OpenSpans<'_> {
    type Item = (DateTime<Utc>, DateTime<Utc>);

    fn next(&mut self) -> Option<Self::Item> {
        let cal = self.calendar;
        if cal.always {
            if self.always_done {
                return None;
            }
            self.always_done = true;
            return Some((self.frontier, DateTime::<Utc>::MAX_UTC));
        }
        loop {
            let day = self.day?;
            let shifts = &cal.weekly[day.weekday().num_days_from_monday() as usize];
            if self.index >= shifts.len() || cal.is_holiday(day) {
                self.day = day.succ_opt();
                self.index = 0;
                continue;
            }
            let shift = shifts[self.index];
            self.index += 1;
            let midnight = day.and_time(NaiveTime::MIN);
            let local_open =
                midnight.checked_add_signed(TimeDelta::seconds(i64::from(shift.start)));
            let local_close =
                midnight.checked_add_signed(TimeDelta::seconds(i64::from(shift.end())));
            let (Some(open), Some(close)) = (
                local_open.and_then(|t| cal.opening_instant(t)),
                local_close.and_then(|t| cal.closing_instant(t)),
            ) else {
                // Outside the time zone table's range: nothing sensible follows.
                self.day = None;
                return None;
            };
            // Openings come in order (the opening instant grows with local time), closings may
            // not: clipping each period to the frontier keeps the output disjoint and ordered.
            let open = open.max(self.frontier);
            if open < close {
                self.frontier = close;
                return Some((open, close));
            }
        }
    }
}

/// Parses `HH:MM-HH:MM` (an end of `24:00` means midnight at the end of the day).
pub fn parse_interval(s: &str) -> Result<(NaiveTime, NaiveTime), CalendarError> {
    let bad = || CalendarError::BadInterval(s.to_string());
    let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
    let start = parse_hhmm(a.trim(), false).ok_or_else(bad)?;
    let end = parse_hhmm(b.trim(), true).ok_or_else(bad)?;
    Ok((start, end))
}

/// Parses `HH:MM`; `24:00` is accepted (as midnight) only where `allow_24` is set.
fn parse_hhmm(s: &str, allow_24: bool) -> Option<NaiveTime> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    if allow_24 && h == 24 && m == 0 {
        return Some(NaiveTime::MIN);
    }
    NaiveTime::from_hms_opt(h, m, 0)
}

/// Parses one weekday name (`mon` or `monday`, any case) to its index, Monday = 0.
fn parse_day(s: &str) -> Option<usize> {
    let s = s.trim().to_ascii_lowercase();
    const LONG: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    DAY_NAMES
        .iter()
        .position(|d| *d == s)
        .or_else(|| LONG.iter().position(|d| *d == s))
}

/// Parses an `hours:` key (`mon-fri`, `sat`, `mon,wed`, `fri-mon`) into weekday indexes, Monday = 0.
pub fn parse_days(key: &str) -> Result<Vec<usize>, CalendarError> {
    let unknown = || CalendarError::UnknownDay(key.to_string());
    let mut days = Vec::new();
    for part in key.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let a = parse_day(a).ok_or_else(unknown)?;
                let b = parse_day(b).ok_or_else(unknown)?;
                // A range may wrap past Sunday (fri-mon).
                let mut d = a;
                loop {
                    days.push(d);
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days.push(parse_day(part).ok_or_else(unknown)?),
        }
    }
    Ok(days)
}

/// Builds the weekly intervals from the config's `hours:` map (`key -> ["HH:MM-HH:MM", ..]`).
///
/// Each weekday may appear under one key only; unnamed weekdays are closed.
pub fn parse_hours<K, V, S>(
    hours: impl IntoIterator<Item = (K, V)>,
) -> Result<Weekly, CalendarError>
where
    K: AsRef<str>,
    V: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut weekly: Weekly = Default::default();
    let mut seen = [false; 7];
    for (key, intervals) in hours {
        let days = parse_days(key.as_ref())?;
        let parsed = intervals
            .into_iter()
            .map(|s| parse_interval(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        for d in days {
            if seen[d] {
                return Err(CalendarError::DuplicateDay(DAY_NAMES[d]));
            }
            seen[d] = true;
            weekly[d] = parsed.clone();
        }
    }
    Ok(weekly)
}

/// The weekday index (Monday = 0) of a chrono weekday.
pub fn weekday_index(w: Weekday) -> usize {
    w.num_days_from_monday() as usize
}

/// Reads the closed dates from an iCalendar file: every all-day VEVENT (`DTSTART;VALUE=DATE`).
///
/// A multi-day event covers `DTSTART` up to, not including, `DTEND` (RFC 5545); without `DTEND`
/// it is one day (a `DURATION` of whole days or weeks is honoured). Timed events and cancelled
/// events are ignored: they are not closed days. Folded lines are unfolded first. Recurring
/// events are refused rather than silently missing their later dates.
pub fn parse_ics(text: &str) -> Result<Vec<NaiveDate>, IcsError> {
    let lines = unfold(text);
    let mut dates = BTreeSet::new();
    let mut i = 0;
    while i < lines.len() {
        let (line_no, line) = &lines[i];
        i += 1;
        if !line.eq_ignore_ascii_case("BEGIN:VEVENT") {
            continue;
        }
        let begin_line = *line_no;
        let mut start: Option<(NaiveDate, bool)> = None;
        let mut end: Option<NaiveDate> = None;
        let mut duration_days: Option<i64> = None;
        let mut cancelled = false;
        let mut closed = false;
        while i < lines.len() {
            let (no, l) = &lines[i];
            i += 1;
            if l.eq_ignore_ascii_case("END:VEVENT") {
                closed = true;
                break;
            }
            let Some((name_params, value)) = split_property(l) else {
                continue;
            };
            let mut parts = name_params.split(';');
            let name = parts.next().unwrap_or("").to_ascii_uppercase();
            let is_date_param = parts.clone().any(|p| p.eq_ignore_ascii_case("VALUE=DATE"));
            match name.as_str() {
                "DTSTART" => {
                    let all_day = is_date_param || value.trim().len() == 8;
                    if all_day {
                        start = Some((ics_date(value, *no)?, true));
                    } else {
                        start = Some((NaiveDate::MIN, false));
                    }
                }
                "DTEND" if is_date_param || value.trim().len() == 8 => {
                    end = Some(ics_date(value, *no)?);
                }
                "DURATION" => duration_days = ics_day_duration(value),
                "STATUS" => cancelled = value.trim().eq_ignore_ascii_case("CANCELLED"),
                "RRULE" | "RDATE" => return Err(IcsError::Recurring { line: *no }),
                _ => {}
            }
        }
        if !closed {
            return Err(IcsError::Unterminated { line: begin_line });
        }
        let Some((first, true)) = start else {
            continue; // a timed event, or one without a start: not a closed day
        };
        if cancelled {
            continue;
        }
        let days = match (end, duration_days) {
            (Some(end), _) => (end - first).num_days(),
            (None, Some(n)) => n,
            (None, None) => 1,
        };
        if !(1..=366).contains(&days) {
            return Err(IcsError::BadSpan { line: begin_line });
        }
        let mut d = first;
        for _ in 0..days {
            dates.insert(d);
            match d.succ_opt() {
                Some(next) => d = next,
                None => break,
            }
        }
    }
    Ok(dates.into_iter().collect())
}

/// Unfolds RFC 5545 content lines (a line starting with a space or tab continues the previous
/// one), keeping the 1-based number of each logical line's first physical line.
fn unfold(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for (n, raw) in text.split('\n').enumerate() {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some(rest) = raw.strip_prefix([' ', '\t'])
            && let Some(last) = out.last_mut()
        {
            last.1.push_str(rest);
            continue;
        }
        let trimmed = raw.trim_end();
        if !trimmed.is_empty() {
            out.push((n + 1, trimmed.to_string()));
        }
    }
    out
}

/// Splits `NAME;PARAM=..:VALUE` at the first colon outside double quotes.
fn split_property(line: &str) -> Option<(&str, &str)> {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ':' if !quoted => return Some((&line[..i], &line[i + 1..])),
            _ => {}
        }
    }
    None
}

fn ics_date(value: &str, line: usize) -> Result<NaiveDate, IcsError> {
    let v = value.trim();
    NaiveDate::parse_from_str(v, "%Y%m%d")
        .ok()
        .filter(|_| v.len() == 8)
        .ok_or_else(|| IcsError::BadDate {
            line,
            value: v.to_string(),
        })
}

/// Whole days of an RFC 5545 duration such as `P1D` or `P2W`; anything with a time part is `None`.
fn ics_day_duration(value: &str) -> Option<i64> {
    let v = value.trim().strip_prefix('P')?;
    if let Some(w) = v.strip_suffix('W') {
        return w.parse::<i64>().ok().and_then(|w| w.checked_mul(7));
    }
    v.strip_suffix('D')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    fn local(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        tz.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .unwrap()
            .with_timezone(&Utc)
    }

    fn office(tz: Tz, intervals: &[(NaiveTime, NaiveTime)]) -> Calendar {
        let mut weekly: Weekly = Default::default();
        for day in weekly.iter_mut().take(5) {
            *day = intervals.to_vec();
        }
        Calendar::new(tz, weekly, BTreeSet::new()).unwrap()
    }

    fn every_day(tz: Tz, intervals: &[(NaiveTime, NaiveTime)]) -> Calendar {
        let weekly: Weekly = std::array::from_fn(|_| intervals.to_vec());
        Calendar::new(tz, weekly, BTreeSet::new()).unwrap()
    }

    #[test]
    fn athens_friday_afternoon_plus_one_hour_is_monday_morning() {
        let tz = chrono_tz::Europe::Athens;
        let cal = office(tz, &[(t(9, 0), t(17, 0))]);
        // 2026-11-27 is a Friday.
        let due = cal.add_business(local(tz, 2026, 11, 27, 16, 30), TimeDelta::hours(1));
        assert_eq!(due, local(tz, 2026, 11, 30, 9, 30));
        assert_ne!(due, local(tz, 2026, 11, 27, 17, 30));
    }

    #[test]
    fn explain_due_names_counted_and_skipped_periods() {
        let tz = chrono_tz::Europe::Athens;
        let cal = office(tz, &[(t(9, 0), t(17, 0))]);
        let lines = cal.explain_due(local(tz, 2026, 11, 27, 16, 30), TimeDelta::hours(1));
        assert_eq!(
            lines,
            [
                "The clock started at Fri 2026-11-27 16:30 (Europe/Athens).",
                "Open from Fri 2026-11-27 16:30 to Fri 2026-11-27 17:00: counted 30m (total 30m).",
                "Closed from Fri 2026-11-27 17:00 to Mon 2026-11-30 09:00: skipped.",
                "Open from Mon 2026-11-30 09:00 to Mon 2026-11-30 09:30: counted 30m (total 1h).",
                "1h of business time is reached at Mon 2026-11-30 09:30: the due time.",
            ]
        );
        assert_eq!(human(TimeDelta::seconds(93_784)), "1d 2h 3m 4s");
        assert_eq!(human(TimeDelta::zero()), "0s");
    }

    #[test]
    fn start_outside_hours_counts_from_next_opening() {
        let tz = chrono_tz::Europe::Athens;
        let cal = office(tz, &[(t(9, 0), t(13, 0)), (t(14, 0), t(17, 30))]);
        // Saturday 11:00 -> Monday 09:00 + 2h = 11:00.
        let start = local(tz, 2026, 11, 28, 11, 0);
        assert_eq!(cal.next_open(start), local(tz, 2026, 11, 30, 9, 0));
        assert_eq!(
            cal.add_business(start, TimeDelta::hours(2)),
            local(tz, 2026, 11, 30, 11, 0)
        );
        // Monday 12:30 + 1h skips the lunch break: 13:00 + 30 min.
        assert_eq!(
            cal.add_business(local(tz, 2026, 11, 30, 12, 30), TimeDelta::hours(1)),
            local(tz, 2026, 11, 30, 14, 30)
        );
        // Exactly reaching the close gives the close, not the next opening.
        assert_eq!(
            cal.add_business(local(tz, 2026, 11, 30, 16, 30), TimeDelta::hours(1)),
            local(tz, 2026, 11, 30, 17, 30)
        );
    }

    #[test]
    fn holiday_from_ics_is_skipped() {
        let ics = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nUID:1\r\nSUMMARY:Christmas\r\n \
                   Day\r\nDTSTART;VALUE=DATE:20261225\r\nDTEND;VALUE=DATE:20261226\r\nEND:VEVENT\r\n\
                   END:VCALENDAR\r\n";
        let holidays: BTreeSet<_> = parse_ics(ics).unwrap().into_iter().collect();
        let tz = chrono_tz::Europe::Athens;
        let mut weekly: Weekly = Default::default();
        for day in weekly.iter_mut().take(5) {
            *day = vec![(t(9, 0), t(17, 0))];
        }
        let cal = Calendar::new(tz, weekly, holidays).unwrap();
        // Thursday 2026-12-24 16:00 + 2h: 1h on Thursday, Friday the 25th is closed, Monday 10:00.
        assert_eq!(
            cal.add_business(local(tz, 2026, 12, 24, 16, 0), TimeDelta::hours(2)),
            local(tz, 2026, 12, 28, 10, 0)
        );
    }

    #[test]
    fn ics_multi_day_folding_timed_cancelled() {
        let ics = "BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART;VALUE=DATE:20270101\nDTEND;VALUE=DATE:2027\n 0104\nEND:VEVENT\n\
                   BEGIN:VEVENT\nDTSTART:20270110T090000Z\nDTEND:20270110T100000Z\nEND:VEVENT\n\
                   BEGIN:VEVENT\ndtstart;value=date:20270201\nSTATUS:CANCELLED\nEND:VEVENT\n\
                   BEGIN:VEVENT\nDTSTART;VALUE=DATE:20270301\nDURATION:P2D\nEND:VEVENT\n\
                   BEGIN:VEVENT\nDTSTART;VALUE=DATE:20270401\nEND:VEVENT\nEND:VCALENDAR\n";
        let d = |m, d| NaiveDate::from_ymd_opt(2027, m, d).unwrap();
        assert_eq!(
            parse_ics(ics).unwrap(),
            vec![d(1, 1), d(1, 2), d(1, 3), d(3, 1), d(3, 2), d(4, 1)]
        );
    }

    #[test]
    fn ics_errors() {
        assert_eq!(
            parse_ics("BEGIN:VEVENT\nDTSTART;VALUE=DATE:2027013\nEND:VEVENT\n"),
            Err(IcsError::BadDate {
                line: 2,
                value: "2027013".into()
            })
        );
        assert_eq!(
            parse_ics("BEGIN:VEVENT\nDTSTART;VALUE=DATE:20270101\nRRULE:FREQ=YEARLY\nEND:VEVENT\n"),
            Err(IcsError::Recurring { line: 3 })
        );
        assert_eq!(
            parse_ics(
                "BEGIN:VEVENT\nDTSTART;VALUE=DATE:20270101\nDTEND;VALUE=DATE:20270101\nEND:VEVENT\n"
            ),
            Err(IcsError::BadSpan { line: 1 })
        );
        assert_eq!(
            parse_ics("x\nBEGIN:VEVENT\nDTSTART;VALUE=DATE:20270101\n"),
            Err(IcsError::Unterminated { line: 2 })
        );
        assert_eq!(parse_ics(""), Ok(vec![]));
    }

    #[test]
    fn hours_keys() {
        let weekly = parse_hours([
            ("mon-fri", vec!["09:00-13:00", "14:00-17:30"]),
            ("sat", vec!["10:00-13:00"]),
            ("sun", vec!["22:00-06:00"]),
        ])
        .unwrap();
        assert_eq!(weekly[0], vec![(t(9, 0), t(13, 0)), (t(14, 0), t(17, 30))]);
        assert_eq!(weekly[4], weekly[0]);
        assert_eq!(weekly[5], vec![(t(10, 0), t(13, 0))]);
        assert_eq!(weekly[6], vec![(t(22, 0), t(6, 0))]);
        assert_eq!(parse_days("mon,wed").unwrap(), vec![0, 2]);
        assert_eq!(parse_days("fri-mon").unwrap(), vec![4, 5, 6, 0]);
        assert_eq!(parse_days("Monday").unwrap(), vec![0]);
        assert_eq!(
            parse_hours([("mon-fri", vec!["09:00-17:00"]), ("fri", vec![])]),
            Err(CalendarError::DuplicateDay("fri"))
        );
        assert_eq!(
            parse_hours([("weekdays", vec!["09:00-17:00"])]),
            Err(CalendarError::UnknownDay("weekdays".into()))
        );
        for bad in [
            "9-17",
            "09:00",
            "25:00-26:00",
            "09:00-24:30",
            "24:00-10:00",
            "09:0-10:00",
        ] {
            assert_eq!(
                parse_interval(bad),
                Err(CalendarError::BadInterval(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(parse_interval("18:00-24:00"), Ok((t(18, 0), t(0, 0))));
        assert_eq!(
            Calendar::new(
                Tz::UTC,
                parse_hours([("tue", vec!["09:00-13:00", "12:00-14:00"])]).unwrap(),
                BTreeSet::new()
            ),
            Err(CalendarError::Overlap {
                day: "tue",
                first: "09:00-13:00".into(),
                second: "12:00-14:00".into()
            })
        );
        assert_eq!(
            Calendar::new(Tz::UTC, Default::default(), BTreeSet::new()),
            Err(CalendarError::NeverOpen)
        );
    }

    #[test]
    fn dst_transition_days_in_new_york() {
        let tz = chrono_tz::America::New_York;
        let nine_to_five = every_day(tz, &[(t(9, 0), t(17, 0))]);
        let small_hours = every_day(tz, &[(t(0, 0), t(4, 0))]);
        let day = |m, d| (local(tz, 2025, m, d, 0, 0), local(tz, 2025, m, d + 1, 0, 0));
        for (m, d) in [(3, 9), (11, 2)] {
            let (a, b) = day(m, d);
            assert_eq!(nine_to_five.business_between(a, b), TimeDelta::hours(8));
        }
        let (a, b) = day(3, 9);
        assert_eq!(small_hours.business_between(a, b), TimeDelta::hours(3));
        let (a, b) = day(11, 2);
        assert_eq!(small_hours.business_between(a, b), TimeDelta::hours(5));
    }

    #[test]
    fn boundary_inside_a_gap_or_overlap() {
        let tz = chrono_tz::Europe::Berlin;
        // 2025-03-30: 02:00 CET -> 03:00 CEST. An interval opening at 02:30 opens at 03:00 CEST.
        let cal = every_day(tz, &[(t(2, 30), t(5, 0))]);
        let spring = local(tz, 2025, 3, 30, 0, 0);
        assert_eq!(cal.next_open(spring), local(tz, 2025, 3, 30, 3, 0));
        assert_eq!(
            cal.business_between(spring, local(tz, 2025, 3, 30, 12, 0)),
            TimeDelta::hours(2)
        );
        // 2025-10-26: 03:00 CEST -> 02:00 CET. 02:30 exists twice: open at the first, and an
        // interval closing at 02:30 closes at the second.
        let autumn = local(tz, 2025, 10, 26, 0, 0);
        let first_0230 = Utc.with_ymd_and_hms(2025, 10, 26, 0, 30, 0).unwrap();
        assert_eq!(cal.next_open(autumn), first_0230);
        let closing = every_day(tz, &[(t(1, 0), t(2, 30))]);
        assert_eq!(
            closing.business_between(autumn, local(tz, 2025, 10, 26, 12, 0)),
            TimeDelta::minutes(150)
        );
    }

    #[test]
    fn overnight_shift_and_holiday_rule() {
        let tz = chrono_tz::Europe::Athens;
        let mut weekly: Weekly = Default::default();
        weekly[4] = vec![(t(22, 0), t(6, 0))]; // Friday night
        let fri = NaiveDate::from_ymd_opt(2026, 11, 27).unwrap();
        let cal = Calendar::new(tz, weekly.clone(), BTreeSet::new()).unwrap();
        // Friday 23:00 + 5h: 7h of shift left, ends Saturday 04:00.
        assert_eq!(
            cal.add_business(local(tz, 2026, 11, 27, 23, 0), TimeDelta::hours(5)),
            local(tz, 2026, 11, 28, 4, 0)
        );
        assert!(cal.is_open(local(tz, 2026, 11, 28, 5, 59)));
        assert!(!cal.is_open(local(tz, 2026, 11, 28, 6, 0)));
        // Saturday a holiday: the shift that started Friday still finishes.
        let sat_off = Calendar::new(tz, weekly.clone(), [fri.succ_opt().unwrap()].into()).unwrap();
        assert!(sat_off.is_open(local(tz, 2026, 11, 28, 5, 0)));
        // Friday a holiday: the shift does not start.
        let fri_off = Calendar::new(tz, weekly, [fri].into()).unwrap();
        assert!(!fri_off.is_open(local(tz, 2026, 11, 28, 5, 0)));
        assert_eq!(
            fri_off.next_open(local(tz, 2026, 11, 27, 12, 0)),
            local(tz, 2026, 12, 4, 22, 0)
        );
    }

    #[test]
    fn always_is_calendar_time() {
        let cal = Calendar::always();
        let a = Utc.with_ymd_and_hms(2026, 1, 1, 3, 0, 0).unwrap();
        assert_eq!(
            cal.add_business(a, TimeDelta::hours(30)),
            a + TimeDelta::hours(30)
        );
        assert_eq!(
            cal.business_between(a, a + TimeDelta::days(3)),
            TimeDelta::days(3)
        );
        assert_eq!(
            cal.business_between(a + TimeDelta::days(3), a),
            TimeDelta::zero()
        );
        assert!(cal.is_open(a));
        assert_eq!(
            cal.add_business(DateTime::<Utc>::MAX_UTC, TimeDelta::hours(1)),
            DateTime::<Utc>::MAX_UTC
        );
    }

    #[test]
    fn far_future_saturates() {
        let cal = office(Tz::UTC, &[(t(9, 0), t(17, 0))]);
        let late = DateTime::<Utc>::MAX_UTC - TimeDelta::days(3);
        assert_eq!(
            cal.add_business(late, TimeDelta::days(30)),
            DateTime::<Utc>::MAX_UTC
        );
    }

    proptest::proptest! {
        /// The .ics and hours parsers never panic on arbitrary input.
        #[test]
        fn parsers_are_total(s in "\\PC*", lines in proptest::collection::vec("[A-Z;=:0-9 ]{0,30}", 0..12)) {
            let _ = parse_ics(&s);
            let doc = format!("BEGIN:VEVENT\n{}\nEND:VEVENT\n", lines.join("\n"));
            let _ = parse_ics(&doc);
            let _ = parse_interval(&s);
            let _ = parse_days(&s);
        }
    }
}
