//! Aligned, human-readable tables for the CLI's non-JSON output.

use crate::store::StoredMessage;

/// Cuts `s` to `max` characters on one line, marking the cut with `…`.
pub fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let mut out: String = flat.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// Prints messages as an aligned table.
pub fn print_messages(rows: &[StoredMessage]) {
    println!(
        "{:>7}  {:<14}  {:<8}  {:<20}  {:<28}  {:<5}  SUBJECT",
        "ID", "SOURCE", "DIR", "RECEIVED (UTC)", "FROM", "CONV"
    );
    for m in rows {
        println!(
            "{:>7}  {:<14}  {:<8}  {:<20}  {:<28}  {:<5}  {}{}",
            m.id,
            one_line(&m.source, 14),
            m.direction,
            m.received_at.format("%Y-%m-%d %H:%M:%S"),
            one_line(m.from.as_deref().unwrap_or("-"), 28),
            m.conversation_id
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            one_line(m.subject.as_deref().unwrap_or(""), 60),
            if m.parse == "degraded" {
                "  [degraded]"
            } else {
                ""
            },
        );
    }
}
