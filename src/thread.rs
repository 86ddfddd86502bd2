//! Which conversation a message belongs to (pure).
//!
//! In order of trust:
//! 1. Email headers: the conversation holding the message named by `In-Reply-To`, else the
//!    nearest ancestor named in `References` (they list the oldest first, so read from the end).
//! 2. A webhook provider's thread key (an SMS number pair, a chat thread, a ticket id), scoped to
//!    the source that delivered it.
//! 3. Fallback: the same client and the same base subject (RFC 5256 §2.1, with common localized
//!    reply prefixes), when the conversation's last message is at most 14 days old. Messages
//!    without a subject (SMS, chat) match other subject-less messages of the same client.
//! 4. Otherwise a new conversation.
//!
//! The caller passes only plausible candidates (the store looks them up by ids, thread key and
//! client); this module decides among them, so the rules are tested without a database.

use chrono::{DateTime, TimeDelta, Utc};

/// The store's id of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ConversationId(pub i64);

/// How long after its last message a conversation can still be joined by subject alone.
pub const SUBJECT_WINDOW: TimeDelta = TimeDelta::days(14);

/// What a new message tells about its conversation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hints {
    /// The configured source name (scopes thread keys).
    pub source: String,
    /// Email `In-Reply-To` ids (without angle brackets).
    pub in_reply_to: Vec<String>,
    /// Email `References` ids, oldest first.
    pub references: Vec<String>,
    /// The provider's conversation key, if any.
    pub thread_key: Option<String>,
    /// The client's key (its normalized identity, see `rules`), if known.
    pub client: Option<String>,
    /// The subject as written.
    pub subject: Option<String>,
}

/// A conversation the message might belong to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Candidate {
    /// The conversation.
    pub id: ConversationId,
    /// Message-IDs of its messages (only those the caller looked up are needed).
    pub message_ids: Vec<String>,
    /// Its `(source, thread key)` pairs.
    pub thread_keys: Vec<(String, String)>,
    /// Its client's key.
    pub client: String,
    /// Its base subject, as computed by [`base_subject`].
    pub base_subject: String,
    /// Receipt time of its latest message.
    pub last_message_at: DateTime<Utc>,
}

/// Why a message was put into a conversation (for `frontdesk explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `In-Reply-To` names a message of the conversation.
    InReplyTo(String),
    /// `References` names a message of the conversation.
    References(String),
    /// The provider's thread key matches.
    ThreadKey(String),
    /// Same client and base subject, last message within 14 days.
    Subject(String),
}

/// Picks the conversation for a message, or `None` for a new one.
///
/// `now` is the message's receipt time (not the wall clock), so a replay threads the same way.
pub fn assign(
    hints: &Hints,
    candidates: &[Candidate],
    now: DateTime<Utc>,
) -> Option<(ConversationId, Reason)> {
    let holding = |id: &str| {
        candidates
            .iter()
            .find(|c| c.message_ids.iter().any(|m| m == id))
    };
    for id in &hints.in_reply_to {
        if let Some(c) = holding(id) {
            return Some((c.id, Reason::InReplyTo(id.clone())));
        }
    }
    for id in hints.references.iter().rev() {
        if let Some(c) = holding(id) {
            return Some((c.id, Reason::References(id.clone())));
        }
    }
    if let Some(key) = hints.thread_key.as_deref().filter(|k| !k.is_empty()) {
        let found = candidates.iter().find(|c| {
            c.thread_keys
                .iter()
                .any(|(s, k)| *s == hints.source && k == key)
        });
        if let Some(c) = found {
            return Some((c.id, Reason::ThreadKey(key.to_string())));
        }
        // A provider key that is new starts a new conversation: the provider knows its threads.
        return None;
    }
    let client = hints.client.as_deref()?;
    let base = base_subject(hints.subject.as_deref().unwrap_or(""));
    candidates
        .iter()
        .filter(|c| {
            c.client == client
                && c.base_subject == base
                && now - c.last_message_at <= SUBJECT_WINDOW
        })
        // The most recently active one; ties go to the older conversation (lower id).
        .max_by_key(|c| (c.last_message_at, std::cmp::Reverse(c.id)))
        .map(|c| (c.id, Reason::Subject(base)))
}

/// Reply and forward prefixes, lowercase, besides RFC 5256's `re`, `fw`, `fwd`: the common
/// localized ones (German, Nordic, Dutch, French, Italian, Polish, Greek, ...).
const PREFIXES: &[&str] = &[
    "re", "fw", "fwd", "aw", "wg", "sv", "vs", "antw", "doorst", "tr", "rif", "r", "odp", "pd",
    "ynt", "ilt", "res", "enc", "rv", "απ", "σχετ", "πρθ", "προθ", "отв", "fs", "vb",
];

/// The RFC 5256 base subject, lowercased: reply/forward prefixes, `[list]` tags and `(fwd)`
/// trailers removed, whitespace collapsed. Used to compare subjects.
pub fn base_subject(subject: &str) -> String {
    // Step 1: whitespace runs (tabs, folding) to one space.
    let mut s: String = subject
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    loop {
        // Step 2: trailing "(fwd)" and whitespace.
        loop {
            let t = s.trim_end();
            match t.strip_suffix("(fwd)") {
                Some(rest) => s = rest.to_string(),
                None => {
                    s = t.to_string();
                    break;
                }
            }
        }
        // Steps 3-4: leading prefixes and blobs, until nothing changes.
        loop {
            let before = s.clone();
            s = s.trim_start().to_string();
            s = strip_leader(&s);
            if let Some(rest) = strip_blob(&s)
                && !rest.trim().is_empty()
            {
                s = rest;
            }
            if s == before {
                break;
            }
        }
        // Step 5: "[fwd: subject]" wrappers.
        if let Some(inner) = s.strip_prefix("[fwd:").and_then(|r| r.strip_suffix(']')) {
            s = inner.to_string();
            continue;
        }
        break;
    }
    s.trim().to_string()
}

/// Removes one `[blob]` at the start (and the spaces after it), if present.
fn strip_blob(s: &str) -> Option<String> {
    let rest = s.strip_prefix('[')?;
    let end = rest.find([']', '['])?;
    if rest[end..].starts_with('[') {
        return None;
    }
    Some(rest[end + 1..].trim_start().to_string())
}

/// Removes one subj-leader: `*blob prefix *WSP [blob] ":"` (e.g. `[list] Re [2]:`, `AW:`).
fn strip_leader(s: &str) -> String {
    let mut rest = s.to_string();
    while let Some(r) = strip_blob(&rest) {
        rest = r;
    }
    for p in PREFIXES {
        let Some(after) = rest.strip_prefix(p) else {
            continue;
        };
        let mut after = after.trim_start().to_string();
        // "Re[2]:" / "Re^2:" counters are common in the wild.
        if let Some(r) = strip_blob(&after) {
            after = r;
        } else if let Some(r) = after.strip_prefix('^') {
            after = r
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .to_string();
        }
        if let Some(r) = after.strip_prefix(':') {
            return r.to_string();
        }
    }
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, day, 12, 0, 0).unwrap()
    }

    #[test]
    fn base_subjects() {
        let table = [
            ("Invoice 42", "invoice 42"),
            ("Re: Invoice 42", "invoice 42"),
            ("RE: re: Fwd: Invoice 42", "invoice 42"),
            ("Re: [acme-support] Re: Invoice 42", "invoice 42"),
            ("[acme-support] Invoice 42", "invoice 42"),
            ("Invoice 42 (fwd)", "invoice 42"),
            ("Invoice 42 (fwd) (FWD)  ", "invoice 42"),
            ("[Fwd: Re: Invoice 42]", "invoice 42"),
            ("Re[2]: Invoice 42", "invoice 42"),
            ("Re^3: Invoice 42", "invoice 42"),
            ("AW: WG: Invoice\t 42", "invoice 42"),
            ("SV: VS: Invoice 42", "invoice 42"),
            ("ΑΠ: ΣΧΕΤ: Τιμολόγιο 42", "τιμολόγιο 42"),
            ("Fw : Invoice 42", "invoice 42"),
            // Only a blob: it is the subject itself.
            ("[urgent]", "[urgent]"),
            ("Re: [urgent]", "[urgent]"),
            // Words that merely begin like a prefix are kept.
            ("Regarding the invoice", "regarding the invoice"),
            ("Trouble: login", "trouble: login"),
            ("Re:", ""),
            ("", ""),
        ];
        for (input, want) in table {
            assert_eq!(base_subject(input), want, "{input:?}");
        }
    }

    fn conv(id: i64) -> Candidate {
        Candidate {
            id: ConversationId(id),
            client: "eleni@mail.example".into(),
            base_subject: "invoice 42".into(),
            last_message_at: t(20),
            ..Candidate::default()
        }
    }

    fn hints() -> Hints {
        Hints {
            source: "support-mail".into(),
            client: Some("eleni@mail.example".into()),
            subject: Some("Re: Invoice 42".into()),
            ..Hints::default()
        }
    }

    #[test]
    fn assign_table() {
        let mut by_id = conv(1);
        by_id.message_ids = vec!["a@x".into(), "b@x".into()];
        by_id.base_subject = "other".into();
        let mut by_ref = conv(2);
        by_ref.message_ids = vec!["root@x".into()];
        by_ref.base_subject = "other".into();
        let mut by_key = conv(3);
        by_key.thread_keys = vec![("sms".into(), "+30691:+30210".into())];
        by_key.base_subject = "other".into();
        let subject_old = Candidate {
            last_message_at: t(1),
            ..conv(4)
        };
        let subject_recent = conv(5);
        let other_client = Candidate {
            client: "nikos@mail.example".into(),
            last_message_at: t(25),
            ..conv(6)
        };
        let all = vec![
            by_id.clone(),
            by_ref.clone(),
            by_key.clone(),
            subject_old.clone(),
            subject_recent.clone(),
            other_client.clone(),
        ];
        type Case = (&'static str, Hints, Option<(i64, Reason)>);
        let cases: Vec<Case> = vec![
            (
                "in-reply-to wins over references and subject",
                Hints {
                    in_reply_to: vec!["b@x".into()],
                    references: vec!["root@x".into()],
                    ..hints()
                },
                Some((1, Reason::InReplyTo("b@x".into()))),
            ),
            (
                "nearest known reference",
                Hints {
                    in_reply_to: vec!["unknown@x".into()],
                    references: vec!["a@x".into(), "root@x".into(), "missing@x".into()],
                    ..hints()
                },
                Some((2, Reason::References("root@x".into()))),
            ),
            (
                "thread key of the same source",
                Hints {
                    source: "sms".into(),
                    thread_key: Some("+30691:+30210".into()),
                    ..hints()
                },
                Some((3, Reason::ThreadKey("+30691:+30210".into()))),
            ),
            (
                "same key from another source is another thread",
                Hints {
                    source: "chat".into(),
                    thread_key: Some("+30691:+30210".into()),
                    ..hints()
                },
                None,
            ),
            (
                "subject fallback picks the recent conversation",
                hints(),
                Some((5, Reason::Subject("invoice 42".into()))),
            ),
            (
                "different subject: new",
                Hints {
                    subject: Some("New order".into()),
                    ..hints()
                },
                None,
            ),
            (
                "unknown client: new",
                Hints {
                    client: None,
                    ..hints()
                },
                None,
            ),
        ];
        for (name, h, want) in cases {
            let got = assign(&h, &all, t(26));
            assert_eq!(got, want.map(|(id, r)| (ConversationId(id), r)), "{name}");
        }
        // The 14-day window: on day 26 conversation 4 (last message on day 1) is too old; on day
        // 15 it is not; the edge is inclusive.
        let only_old = vec![subject_old.clone()];
        assert_eq!(assign(&hints(), &only_old, t(26)), None);
        assert_eq!(
            assign(&hints(), &only_old, t(15)).map(|r| r.0),
            Some(ConversationId(4))
        );
        let edge = t(1) + SUBJECT_WINDOW;
        assert!(assign(&hints(), &only_old, edge).is_some());
        assert!(assign(&hints(), &only_old, edge + TimeDelta::seconds(1)).is_none());
    }

    #[test]
    fn subjectless_messages_of_a_client_thread_together() {
        let sms = Candidate {
            base_subject: String::new(),
            ..conv(7)
        };
        let h = Hints {
            source: "sms".into(),
            subject: None,
            ..hints()
        };
        assert_eq!(
            assign(&h, &[sms], t(21)),
            Some((ConversationId(7), Reason::Subject(String::new())))
        );
    }

    proptest::proptest! {
        /// Any text, however hostile, gives a base subject without panicking, and prefixing a
        /// plain subject with reply markers never changes its base.
        #[test]
        fn base_subject_total_and_prefix_blind(s in "\\PC*", word in "[a-z0-9 ]{1,20}") {
            let _ = base_subject(&s);
            let plain = format!("q{word}");
            proptest::prop_assert_eq!(
                base_subject(&format!("Re: [list] Fwd: {plain} (fwd)")),
                base_subject(&plain)
            );
        }
    }
}
