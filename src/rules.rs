//! Client identity, team detection, owners and SLA policy selection from the configured rules (pure).
//!
//! The config module builds the plain rule structs below from YAML; nothing here reads config.
//!
//! Matching semantics (the same for owner and policy rules):
//! - the conditions given in one `match` must all hold (AND), and a condition with several
//!   values holds when any of them does (OR); an empty `match` holds always (the default rule);
//! - rules are ordered and the first rule that holds wins.
//!
//! Client rules are different on purpose: their address conditions (`email`, `email_domain`,
//! `phone`, `handle`) list the addresses of *one* client, so any of them identifies it (OR);
//! `source`, when given, must hold as well (AND). That is how several addresses become one client.

use crate::message::{Address, Direction};

/// Options for normalizing addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Normalization {
    /// Country calling code (digits, e.g. `"30"`) for phone numbers written without `+` or `00`.
    pub default_country_code: Option<String>,
}

/// Turns an address as written into the client key: email lowercased, phone in E.164, handles
/// as `kind:id`. Returns `None` for an empty address.
///
/// Phones: `+` and `00` prefixes give E.164; spaces, dashes, dots and parentheses are dropped.
/// A national number (no prefix) gets the configured default country code, dropping one leading
/// trunk `0` (except for Italy, `+39`, where the 0 is part of the number); without a configured
/// code it stays as its bare digits, which still identifies the sender consistently.
/// `tel:`, `sms:` and `whatsapp:` addresses are phones, so the same person on SMS and WhatsApp is
/// one client.
pub fn normalize(addr: &str, opts: &Normalization) -> Option<String> {
    let a = addr
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    if a.is_empty() {
        return None;
    }
    let lower = a.to_lowercase();
    if let Some(rest) = lower.strip_prefix("mailto:") {
        return normalize(rest, opts);
    }
    for prefix in ["tel:", "sms:", "whatsapp:"] {
        if let Some(rest) = lower.strip_prefix(prefix) {
            return normalize_phone(rest, opts).or_else(|| Some(lower.clone()));
        }
    }
    if lower.contains('@') && !lower.contains(':') {
        return Some(lower);
    }
    if let Some((kind, id)) = a.split_once(':') {
        // A chat handle: the kind is case-insensitive, the provider's id is not.
        return Some(format!("{}:{}", kind.trim().to_lowercase(), id.trim()));
    }
    normalize_phone(a, opts).or(Some(lower))
}

/// E.164 for something that looks like a phone number, else `None`.
fn normalize_phone(s: &str, opts: &Normalization) -> Option<String> {
    let s = s.trim();
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_digit() || " +-.()/".contains(c))
    {
        return None;
    }
    let plus = s.starts_with('+');
    let digits: String = s.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 3 || s.chars().skip(1).any(|c| c == '+') {
        return None;
    }
    if plus {
        return Some(format!("+{digits}"));
    }
    if let Some(international) = digits.strip_prefix("00") {
        return Some(format!("+{international}"));
    }
    match opts.default_country_code.as_deref() {
        Some(cc) => {
            let cc = cc.trim_start_matches('+');
            let national = if cc == "39" {
                digits.as_str()
            } else {
                digits.strip_prefix('0').unwrap_or(&digits)
            };
            Some(format!("+{cc}{national}"))
        }
        None => Some(digits),
    }
}

/// The domain of a normalized email key.
fn email_domain(key: &str) -> Option<&str> {
    key.rsplit_once('@').map(|(_, d)| d)
}

/// A person on the team: their messages are replies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TeamMember {
    /// The member's name (owners are named by it).
    pub name: String,
    /// Normalized addresses: emails, E.164 phones, `kind:id` handles.
    pub addresses: Vec<String>,
}

/// Which team member an address (already normalized) belongs to, if any.
pub fn team_member<'a>(team: &'a [TeamMember], key: &str) -> Option<&'a TeamMember> {
    team.iter().find(|m| m.addresses.iter().any(|a| a == key))
}

/// The address that names the client of a message: the sender of an inbound message, the first
/// recipient who is not on the team for an outbound one. Returns the normalized key.
pub fn client_address(
    direction: Direction,
    from: Option<&Address>,
    to: &[Address],
    team: &[TeamMember],
    opts: &Normalization,
) -> Option<String> {
    match direction {
        Direction::Inbound => from.and_then(|a| normalize(&a.addr, opts)),
        Direction::Outbound => to
            .iter()
            .filter_map(|a| normalize(&a.addr, opts))
            .find(|k| team_member(team, k).is_none()),
    }
}

/// Which addresses a client rule claims (any of them), optionally only from some sources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientMatch {
    /// Exact email addresses (normalized).
    pub email: Vec<String>,
    /// Email domains (lowercase), matching the domain exactly.
    pub email_domain: Vec<String>,
    /// Phone numbers (normalized).
    pub phone: Vec<String>,
    /// Chat handles as `kind:id`.
    pub handle: Vec<String>,
    /// Source names; if given, the rule applies only to messages from these sources.
    pub source: Vec<String>,
}

/// A `clients:` entry: name and tags for the addresses it matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientRule {
    /// The client's name; also its identity, so all matching addresses are one client. A rule
    /// without a name only adds tags, and each address stays its own client.
    pub name: Option<String>,
    /// Tags for owner and policy rules.
    pub tags: Vec<String>,
    /// What it matches.
    pub matcher: ClientMatch,
}

impl ClientRule {
    fn matches(&self, key: &str, source: &str) -> bool {
        let m = &self.matcher;
        if !m.source.is_empty() && !m.source.iter().any(|s| s == source) {
            return false;
        }
        let has_addresses = !(m.email.is_empty()
            && m.email_domain.is_empty()
            && m.phone.is_empty()
            && m.handle.is_empty());
        if !has_addresses {
            // A source-only rule names everyone who writes through that source.
            return !m.source.is_empty();
        }
        m.email.iter().any(|e| e == key)
            || email_domain(key).is_some_and(|d| m.email_domain.iter().any(|x| x == d))
            || m.phone.iter().any(|p| p == key)
            || m.handle.iter().any(|h| h == key)
    }
}

/// The client of a message, as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Stable identity: `client:NAME` for a configured client, else the normalized address.
    pub key: String,
    /// The normalized address the message came from (or went to).
    pub address: String,
    /// The configured name, if a rule matched.
    pub name: Option<String>,
    /// Tags from the matching rule.
    pub tags: Vec<String>,
    /// Index of the client rule that matched.
    pub rule: Option<usize>,
}

impl Client {
    /// The name to show: the configured name, else the address.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.address)
    }
}

/// Resolves a normalized address to a client: the first client rule that matches, else an
/// unknown client keyed by the address itself.
pub fn resolve_client(rules: &[ClientRule], address: &str, source: &str) -> Client {
    match rules.iter().position(|r| r.matches(address, source)) {
        Some(i) => Client {
            key: rules[i]
                .name
                .as_ref()
                .map_or_else(|| address.to_string(), |n| format!("client:{n}")),
            address: address.to_string(),
            name: rules[i].name.clone(),
            tags: rules[i].tags.clone(),
            rule: Some(i),
        },
        None => Client {
            key: address.to_string(),
            address: address.to_string(),
            name: None,
            tags: Vec::new(),
            rule: None,
        },
    }
}

/// What owner and policy rules look at.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The source name.
    pub source: &'a str,
    /// The client.
    pub client: &'a Client,
    /// The conversation's subject.
    pub subject: Option<&'a str>,
    /// The message text.
    pub text: Option<&'a str>,
}

/// Whether `word` (any case) occurs in `hay` as a whole word (not inside a longer word).
fn contains_word(hay: &str, word: &str) -> bool {
    let hay = hay.to_lowercase();
    let word = word.trim().to_lowercase();
    if word.is_empty() {
        return false;
    }
    let is_word_char = |c: char| c.is_alphanumeric();
    hay.match_indices(&word).any(|(i, _)| {
        let before = hay[..i].chars().next_back();
        let after = hay[i + word.len()..].chars().next();
        !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
    })
}

fn any_keyword(keywords: &[String], facts: &Facts<'_>) -> bool {
    keywords.iter().any(|k| {
        facts.subject.is_some_and(|s| contains_word(s, k))
            || facts.text.is_some_and(|t| contains_word(t, k))
    })
}

/// Holds when `values` is empty or `pred` holds for one of them.
fn either<T>(values: &[T], pred: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(pred)
}

/// Conditions of an owner or policy rule (all given ones must hold; empty holds always).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    /// Configured client names (or client addresses).
    pub client: Vec<String>,
    /// Client tags.
    pub client_tag: Vec<String>,
    /// Client email addresses (normalized).
    pub email: Vec<String>,
    /// Email domains of the client's address.
    pub email_domain: Vec<String>,
    /// Source names.
    pub source: Vec<String>,
    /// Whole words, any case, in the subject or text.
    pub keyword: Vec<String>,
}

impl Match {
    /// Whether the rule has no conditions (a default).
    pub fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    /// Whether every given condition holds for these facts.
    pub fn holds(&self, f: &Facts<'_>) -> bool {
        either(&self.client, |c| {
            f.client.name.as_deref() == Some(c.as_str()) || f.client.address == *c
        }) && either(&self.client_tag, |t| f.client.tags.contains(t))
            && either(&self.email, |e| f.client.address == *e)
            && either(&self.email_domain, |d| {
                email_domain(&f.client.address) == Some(d.as_str())
            })
            && either(&self.source, |s| s == f.source)
            && (self.keyword.is_empty() || any_keyword(&self.keyword, f))
    }
}

/// A `responsibilities:` entry: who owns matching conversations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerRule {
    /// Conditions; empty for the default owner.
    pub matcher: Match,
    /// The team member's name.
    pub owner: String,
}

/// The owner: the first rule that holds, as `(rule index, owner name)`; `None` if none does.
pub fn pick_owner<'a>(rules: &'a [OwnerRule], facts: &Facts<'_>) -> Option<(usize, &'a str)> {
    rules
        .iter()
        .position(|r| r.matcher.holds(facts))
        .map(|i| (i, rules[i].owner.as_str()))
}

/// An SLA policy's selection rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyRule {
    /// The policy's name.
    pub policy: String,
    /// Conditions; empty for the default policy.
    pub matcher: Match,
}

/// The policy: the first rule that holds, as `(rule index, policy name)`; `None` if none does.
pub fn pick_policy<'a>(rules: &'a [PolicyRule], facts: &Facts<'_>) -> Option<(usize, &'a str)> {
    rules
        .iter()
        .position(|r| r.matcher.holds(facts))
        .map(|i| (i, rules[i].policy.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gr() -> Normalization {
        Normalization {
            default_country_code: Some("30".into()),
        }
    }

    #[test]
    fn normalize_table() {
        let none = Normalization::default();
        let it = Normalization {
            default_country_code: Some("+39".into()),
        };
        let cases: &[(&str, &Normalization, Option<&str>)] = &[
            ("Eleni@Mail.Example", &none, Some("eleni@mail.example")),
            (" <Eleni@Mail.Example> ", &none, Some("eleni@mail.example")),
            ("mailto:A@B.example", &none, Some("a@b.example")),
            ("+30 691 234 5678", &none, Some("+306912345678")),
            ("0030-691-234-5678", &none, Some("+306912345678")),
            ("+1 (415) 555-0100", &none, Some("+14155550100")),
            ("691 234 5678", &gr(), Some("+306912345678")),
            ("0691 234 5678", &gr(), Some("+306912345678")),
            ("06 1234 5678", &it, Some("+390612345678")),
            ("691 234 5678", &none, Some("6912345678")),
            ("whatsapp:+306912345678", &none, Some("+306912345678")),
            ("tel:+30-691-234-5678", &none, Some("+306912345678")),
            ("slack:U024BE7LH", &none, Some("slack:U024BE7LH")),
            ("Slack: U024BE7LH", &none, Some("slack:U024BE7LH")),
            ("  ", &none, None),
            ("someone", &none, Some("someone")),
            ("+30+69", &none, Some("+30+69")),
        ];
        for (input, opts, want) in cases {
            assert_eq!(normalize(input, opts).as_deref(), *want, "{input:?}");
        }
    }

    fn clients() -> Vec<ClientRule> {
        vec![
            ClientRule {
                name: Some("ACME Ltd".into()),
                tags: vec!["vip".into()],
                matcher: ClientMatch {
                    email_domain: vec!["acme.example".into()],
                    ..ClientMatch::default()
                },
            },
            ClientRule {
                name: Some("Eleni Papadopoulou".into()),
                tags: vec![],
                matcher: ClientMatch {
                    email: vec!["eleni@mail.example".into()],
                    phone: vec!["+306912345678".into()],
                    handle: vec!["slack:U111".into()],
                    ..ClientMatch::default()
                },
            },
            ClientRule {
                name: Some("Form visitors".into()),
                tags: vec!["web".into()],
                matcher: ClientMatch {
                    source: vec!["contact-form".into()],
                    ..ClientMatch::default()
                },
            },
            ClientRule {
                name: Some("Partner via SMS".into()),
                tags: vec![],
                matcher: ClientMatch {
                    phone: vec!["+302101111111".into()],
                    source: vec!["sms".into()],
                    ..ClientMatch::default()
                },
            },
        ]
    }

    #[test]
    fn client_rules_table() {
        let rules = clients();
        let cases: &[(&str, &str, &str, Option<usize>)] = &[
            (
                "bob@acme.example",
                "support-mail",
                "client:ACME Ltd",
                Some(0),
            ),
            (
                "bob@sub.acme.example",
                "support-mail",
                "bob@sub.acme.example",
                None,
            ),
            (
                "eleni@mail.example",
                "support-mail",
                "client:Eleni Papadopoulou",
                Some(1),
            ),
            ("+306912345678", "sms", "client:Eleni Papadopoulou", Some(1)),
            ("slack:U111", "chat", "client:Eleni Papadopoulou", Some(1)),
            (
                "x@y.example",
                "contact-form",
                "client:Form visitors",
                Some(2),
            ),
            ("+302101111111", "sms", "client:Partner via SMS", Some(3)),
            ("+302101111111", "whatsapp", "+302101111111", None),
            (
                "stranger@z.example",
                "support-mail",
                "stranger@z.example",
                None,
            ),
        ];
        for (addr, source, key, rule) in cases {
            let c = resolve_client(&rules, addr, source);
            assert_eq!(
                (c.key.as_str(), c.rule),
                (*key, *rule),
                "{addr} via {source}"
            );
            assert_eq!(c.address, *addr);
        }
        assert_eq!(
            resolve_client(&rules, "bob@acme.example", "x").tags,
            ["vip"]
        );
        assert_eq!(
            resolve_client(&rules, "s@z.example", "x").display_name(),
            "s@z.example"
        );
    }

    fn team() -> Vec<TeamMember> {
        vec![
            TeamMember {
                name: "Maria".into(),
                addresses: vec![
                    "maria@example.com".into(),
                    "support@example.com".into(),
                    "+302101234567".into(),
                    "slack:U024BE7LH".into(),
                ],
            },
            TeamMember {
                name: "Nikos".into(),
                addresses: vec!["nikos@example.com".into()],
            },
        ]
    }

    #[test]
    fn team_detection_and_client_address() {
        let team = team();
        let opts = Normalization::default();
        for (raw, who) in [
            ("Maria@Example.com", Some("Maria")),
            ("+30 210 123 4567", Some("Maria")),
            ("slack:U024BE7LH", Some("Maria")),
            ("nikos@example.com", Some("Nikos")),
            ("eleni@mail.example", None),
        ] {
            let key = normalize(raw, &opts).unwrap();
            assert_eq!(
                team_member(&team, &key).map(|m| m.name.as_str()),
                who,
                "{raw}"
            );
        }
        let addr = |a: &str| Address {
            name: None,
            addr: a.into(),
        };
        let from = addr("Eleni@Mail.example");
        assert_eq!(
            client_address(Direction::Inbound, Some(&from), &[], &team, &opts).as_deref(),
            Some("eleni@mail.example")
        );
        let to = [addr("support@example.com"), addr("Bob@Acme.example")];
        assert_eq!(
            client_address(
                Direction::Outbound,
                Some(&addr("maria@example.com")),
                &to,
                &team,
                &opts
            )
            .as_deref(),
            Some("bob@acme.example")
        );
        assert_eq!(
            client_address(Direction::Outbound, None, &to[..1], &team, &opts),
            None
        );
    }

    fn facts<'a>(client: &'a Client, source: &'a str, subject: &'a str) -> Facts<'a> {
        Facts {
            source,
            client,
            subject: Some(subject),
            text: Some("Hello, my order 17 arrived broken. Please advise."),
        }
    }

    #[test]
    fn owners_first_match_wins() {
        let rules = vec![
            OwnerRule {
                matcher: Match {
                    client_tag: vec!["vip".into()],
                    ..Match::default()
                },
                owner: "Nikos".into(),
            },
            OwnerRule {
                matcher: Match {
                    source: vec!["sms".into()],
                    keyword: vec!["refund".into(), "Invoice".into()],
                    ..Match::default()
                },
                owner: "Eva".into(),
            },
            OwnerRule {
                matcher: Match {
                    client: vec!["Eleni Papadopoulou".into()],
                    ..Match::default()
                },
                owner: "Eleni's friend".into(),
            },
            OwnerRule {
                matcher: Match::default(),
                owner: "Maria".into(),
            },
        ];
        let cl = clients();
        let acme = resolve_client(&cl, "bob@acme.example", "sms");
        let eleni = resolve_client(&cl, "eleni@mail.example", "sms");
        let stranger = resolve_client(&cl, "s@z.example", "sms");
        let cases: &[(&Client, &str, &str, usize, &str)] = &[
            (&acme, "sms", "REFUND please", 0, "Nikos"),
            (&stranger, "sms", "Refund please", 1, "Eva"),
            (&stranger, "sms", "About my INVOICE.", 1, "Eva"),
            (&stranger, "sms", "Refunds policy", 3, "Maria"),
            (&stranger, "mail", "Refund please", 3, "Maria"),
            (&eleni, "mail", "hi", 2, "Eleni's friend"),
        ];
        for (client, source, subject, idx, owner) in cases {
            assert_eq!(
                pick_owner(&rules, &facts(client, source, subject)),
                Some((*idx, *owner)),
                "{subject} via {source}"
            );
        }
        assert!(rules[3].matcher.is_empty());
        assert_eq!(pick_owner(&rules[..1], &facts(&stranger, "sms", "x")), None);
    }

    #[test]
    fn policies_first_match_wins_and_default() {
        let rules = vec![
            PolicyRule {
                policy: "vip".into(),
                matcher: Match {
                    client_tag: vec!["vip".into()],
                    ..Match::default()
                },
            },
            PolicyRule {
                policy: "urgent".into(),
                matcher: Match {
                    keyword: vec!["urgent".into()],
                    ..Match::default()
                },
            },
            PolicyRule {
                policy: "partners".into(),
                matcher: Match {
                    email_domain: vec!["partner.example".into()],
                    source: vec!["support-mail".into()],
                    ..Match::default()
                },
            },
            PolicyRule {
                policy: "eleni".into(),
                matcher: Match {
                    email: vec!["eleni@mail.example".into()],
                    ..Match::default()
                },
            },
            PolicyRule {
                policy: "standard".into(),
                matcher: Match::default(),
            },
        ];
        let cl = clients();
        let acme = resolve_client(&cl, "bob@acme.example", "support-mail");
        let partner = resolve_client(&cl, "p@partner.example", "support-mail");
        let eleni = resolve_client(&cl, "eleni@mail.example", "support-mail");
        let cases: &[(&Client, &str, &str, &str)] = &[
            (&acme, "support-mail", "urgent!", "vip"),
            (&partner, "support-mail", "URGENT: down", "urgent"),
            (&partner, "support-mail", "hello", "partners"),
            (&partner, "sms", "hello", "standard"),
            (&eleni, "support-mail", "hello", "eleni"),
            (&eleni, "support-mail", "not urgently", "eleni"),
        ];
        for (client, source, subject, want) in cases {
            assert_eq!(
                pick_policy(&rules, &facts(client, source, subject)).map(|p| p.1),
                Some(*want),
                "{subject} via {source}"
            );
        }
    }

    #[test]
    fn whole_words_only() {
        assert!(contains_word("Order #17 broken", "order"));
        assert!(contains_word("re: ORDER", "order"));
        assert!(!contains_word("border control", "order"));
        assert!(!contains_word("orders", "order"));
        assert!(contains_word("Τιμολόγιο 42", "τιμολόγιο"));
        assert!(!contains_word("anything", " "));
    }

    proptest::proptest! {
        /// Normalizing never panics, and is idempotent: a key normalizes to itself.
        #[test]
        fn normalize_total_and_idempotent(s in "\\PC*", phone in "(\\+|00)?[0-9 ()-]{3,20}") {
            for input in [s.as_str(), phone.as_str()] {
                if let Some(key) = normalize(input, &gr()) {
                    proptest::prop_assert_eq!(normalize(&key, &gr()), Some(key.clone()), "{:?}", input);
                }
            }
        }
    }
}
