//! Human units in the config: durations (`90s`, `4h`, `1h30m`), sizes (`1MiB`), day specs, intervals.

use std::time::Duration;

use chrono::{NaiveTime, Weekday};

/// Parses `90s`, `30m`, `4h`, `2d`, `1h30m`, `500ms`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total_ms: u128 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("`{s}` is not a duration"));
        }
        let n: u128 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}` is not a duration"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        rest = &rest[unit_len..];
        let ms = match unit {
            "ms" => 1,
            "s" | "sec" | "secs" => 1000,
            "m" | "min" | "mins" => 60_000,
            "h" | "hr" | "hrs" => 3_600_000,
            "d" | "day" | "days" => 86_400_000,
            "w" | "week" | "weeks" => 7 * 86_400_000,
            _ => return Err(format!("`{s}` has an unknown unit `{unit}`")),
        };
        total_ms = total_ms
            .checked_add(
                n.checked_mul(ms)
                    .ok_or_else(|| format!("`{s}` is too long"))?,
            )
            .ok_or_else(|| format!("`{s}` is too long"))?;
    }
    let ms = u64::try_from(total_ms).map_err(|_| format!("`{s}` is too long"))?;
    Ok(Duration::from_millis(ms))
}

/// Parses `512KiB`, `1MiB`, `2MB`, `100000` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!("`{s}` is not a size"));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("`{s}` is not a size"))?;
    let mult: u64 = match t[digits..].trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "KB" | "kB" => 1000,
        "MiB" | "M" => 1 << 20,
        "MB" => 1_000_000,
        "GiB" | "G" => 1 << 30,
        "GB" => 1_000_000_000,
        other => return Err(format!("`{s}` has an unknown unit `{other}`")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses `09:00-17:30` (an end at or before the start is an overnight shift).
pub fn parse_interval(s: &str) -> Result<(NaiveTime, NaiveTime), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("`{s}` is not an interval"))?;
    let parse = |x: &str| {
        let x = x.trim();
        if x == "24:00" {
            return NaiveTime::from_hms_opt(23, 59, 59).ok_or_else(|| "bad time".to_string());
        }
        NaiveTime::parse_from_str(x, "%H:%M").map_err(|_| format!("`{x}` is not HH:MM"))
    };
    Ok((parse(a)?, parse(b)?))
}

/// Parses `mon-fri`, `sat`, `mon,wed,fri`, `mon-wed,fri` into weekdays.
pub fn parse_days(s: &str) -> Result<Vec<Weekday>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            let a = day(a)?;
            let b = day(b)?;
            let mut d = a;
            loop {
                out.push(d);
                if d == b {
                    break;
                }
                d = d.succ();
            }
        } else {
            out.push(day(part)?);
        }
    }
    Ok(out)
}

fn day(s: &str) -> Result<Weekday, String> {
    match s.trim().to_lowercase().as_str() {
        "mon" | "monday" => Ok(Weekday::Mon),
        "tue" | "tuesday" => Ok(Weekday::Tue),
        "wed" | "wednesday" => Ok(Weekday::Wed),
        "thu" | "thursday" => Ok(Weekday::Thu),
        "fri" | "friday" => Ok(Weekday::Fri),
        "sat" | "saturday" => Ok(Weekday::Sat),
        "sun" | "sunday" => Ok(Weekday::Sun),
        other => Err(format!("`{other}` is not a day")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("4x").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1XB").is_err());
    }

    #[test]
    fn days_and_intervals() {
        assert_eq!(parse_days("mon-fri").unwrap().len(), 5);
        assert_eq!(
            parse_days("fri-mon").unwrap(),
            vec![Weekday::Fri, Weekday::Sat, Weekday::Sun, Weekday::Mon]
        );
        assert_eq!(
            parse_days("mon,wed").unwrap(),
            vec![Weekday::Mon, Weekday::Wed]
        );
        assert!(parse_days("mon-funday").is_err());
        assert!(parse_interval("09:00-17:30").is_ok());
        assert!(parse_interval("9-5").is_err());
    }
}
