//! The bodies of the cargo-fuzz targets (`fuzz/fuzz_targets/`), with their invariants.
//!
//! Each function takes the fuzzer's bytes and panics when an invariant breaks; the fuzz targets
//! are one-line wrappers, and `cargo test` replays every committed seed (`fuzz/seeds/<target>/`)
//! and minimized crasher (`fuzz/regressions/<target>-*`) through the same functions, so CI checks
//! them without a fuzzer. Structured targets split their input at `0xFF` bytes (never part of
//! UTF-8 text), so seeds can be written by hand. Not part of the supported API.

use std::path::Path;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, TimeZone, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::digest::{
    Alert, AlertEvent, ConversationRow, Digest, DigestInput, FailedSendRow, NewMessagesRow,
    Rendered, ReplyRow, SourceHealthRow, SourceKind, TargetKind,
};
use crate::ingest::email::{
    check_plain_text_decoding, fingerprint, html_to_text, lean_and_full, normalize,
};
use crate::ingest::webhook::auth::{Encoding, Inbound, Scheme, Verifier};
use crate::ingest::webhook::preset::{self, Delivery, DirectionRule, Mapping, Outcome, Preset};
use crate::message::Origin;
use crate::notify::smtp::{EmailChannel, EmailSettings};
use crate::notify::{OutboxItem, OutboxKind};

/// A fuzz target: panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target by its cargo-fuzz name.
pub const TARGETS: &[(&str, Target)] = &[
    ("email_normalize", email_normalize),
    ("email_normalize_lean", email_normalize_lean),
    ("oauth_redirect", oauth_redirect),
    ("webhook_body", webhook_body),
    ("webhook_mapping", webhook_mapping),
    ("signature_headers", signature_headers),
    ("config_load", config_load),
    ("digest_render", digest_render),
];

/// The fixed "now" of every target, so runs are reproducible.
fn now() -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000, 0)
        .single()
        .unwrap_or_default()
}

/// The first `N - 1` pieces of `data` split at `0xFF`, then the rest; absent pieces are empty.
fn pieces<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut out = [&data[..0]; N];
    for (slot, piece) in out.iter_mut().zip(data.splitn(N, |b| *b == 0xFF)) {
        *slot = piece;
    }
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn optional(b: &[u8]) -> Option<String> {
    (!b.is_empty()).then(|| text(b))
}

/// Normalization never panics, keeps the raw bytes, and always yields a clean Message-ID.
pub fn email_normalize(data: &[u8]) {
    let origin = Origin::Imap {
        folder: "INBOX".into(),
        uid_validity: 1,
        uid: 1,
    };
    let m = normalize("fuzz", origin, data.to_vec(), DateTime::UNIX_EPOCH);
    assert_eq!(m.raw, data);
    let id = m.message_id.expect("a message id is always set");
    assert!(!id.is_empty() && !id.contains(['<', '>', '\r', '\n', '\0']));
    if let Some(s) = &m.subject {
        assert!(!s.contains(['\r', '\n', '\0']));
    }
    // the fingerprint of an unchanged message is its stored Message-ID
    assert_eq!(fingerprint(data), id);
    let _ = html_to_text(&String::from_utf8_lossy(data));
}

/// Skipping the decoding of base64 attachments and of an alternative's HTML half, and decoding
/// text/plain bodies without mail-parser, never change the normalized message: the input as is,
/// as the base64 body of the second part of a fixed multipart/mixed message, as the HTML half
/// (quoted-printable or 7bit) of a fixed multipart/alternative, and as a text/plain part
/// (quoted-printable or 8bit; UTF-8, an unknown charset or Latin-1), whose body frontdesk's own
/// decoder must also decode exactly as mail-parser does. A `0xFF` splits off the attachment's
/// headers (application/pdf when absent; their length picks the encodings and the charset), a
/// second one what follows the body's delimiter, so every input exercises every path.
pub fn email_normalize_lean(data: &[u8]) {
    same_message_lean_and_full(data);
    let [body, headers, rest] = pieces::<3>(data);
    let headers = if headers.is_empty() {
        &b"Content-Type: application/pdf"[..]
    } else {
        headers
    };
    let mut raw = b"From: a@x.test\r\nContent-Type: multipart/mixed; boundary=\"=_b-1\"\r\n\r\n\
--=_b-1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--=_b-1\r\n"
        .to_vec();
    raw.extend_from_slice(headers);
    raw.extend_from_slice(b"\r\nContent-Transfer-Encoding: base64\r\n\r\n");
    raw.extend_from_slice(body);
    raw.extend_from_slice(b"--=_b-1");
    raw.extend_from_slice(rest);
    same_message_lean_and_full(&raw);

    // the same pieces as the HTML half of an alternative (skipped when it decodes)
    let mut raw =
        b"From: a@x.test\r\nContent-Type: multipart/alternative; boundary=\"=_b-1\"\r\n\r\n\
--=_b-1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--=_b-1\r\nContent-Type: text/html\r\n"
            .to_vec();
    raw.extend_from_slice(if headers.len() % 2 == 0 {
        b"Content-Transfer-Encoding: quoted-printable"
    } else {
        b"Content-Transfer-Encoding: 7bit"
    });
    raw.extend_from_slice(b"\r\n\r\n");
    raw.extend_from_slice(body);
    raw.extend_from_slice(b"--=_b-1");
    raw.extend_from_slice(rest);
    same_message_lean_and_full(&raw);

    // the same pieces as a text/plain part the lean path decodes itself
    check_plain_text_decoding(body);
    let mut raw = b"From: a@x.test\r\nContent-Type: multipart/mixed; boundary=\"=_b-1\"\r\n\r\n\
--=_b-1\r\nContent-Type: text/plain; charset="
        .to_vec();
    raw.extend_from_slice(match headers.len() % 3 {
        0 => &b"utf-8"[..],
        1 => b"x-unknown",
        _ => b"iso-8859-1",
    });
    raw.extend_from_slice(if headers.len() % 2 == 0 {
        b"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    } else {
        b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    });
    raw.extend_from_slice(body);
    raw.extend_from_slice(b"--=_b-1");
    raw.extend_from_slice(rest);
    same_message_lean_and_full(&raw);
}

fn same_message_lean_and_full(raw: &[u8]) {
    let (lean, full) = lean_and_full(raw);
    assert_eq!(lean, full, "the lean path changed the message");
}

/// The loopback redirect parser of `frontdesk auth login --browser`: only a target carrying the
/// expected state may yield a code.
pub fn oauth_redirect(data: &[u8]) {
    use crate::oauth::login::{Redirect, redirect_result};
    let target = String::from_utf8_lossy(data);
    match redirect_result(&target, "k3Jq9-state_value") {
        Redirect::Code(_) | Redirect::Error(_) | Redirect::NoCode => {
            assert!(
                target.contains("state="),
                "accepted without a state: {target:?}"
            );
        }
        Redirect::NotOurs => {}
    }
}

fn preset_for(b: u8, mapping: Mapping) -> Preset {
    match b % 9 {
        0 => Preset::Form,
        1 => Preset::Json(Box::new(mapping)),
        2 => Preset::TwilioSms,
        3 => Preset::SlackEvents,
        4 => Preset::StandardWebhooks,
        5 => Preset::Github,
        6 => Preset::Stripe,
        7 => Preset::PostmarkInbound,
        _ => Preset::MailgunInbound,
    }
}

const CONTENT_TYPES: [&str; 4] = [
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=B",
    "text/plain",
];

/// What every stored delivery must satisfy, whatever the preset.
fn check_stored(outcome: &Outcome, d: &Delivery<'_>) {
    let Outcome::Store(m) = outcome else { return };
    assert_eq!(m.raw, d.body, "the exact body is kept");
    assert_eq!(m.source, d.source);
    assert_eq!(
        m.received_at, d.received_at,
        "receipt time is ours, not the sender's"
    );
    let Origin::Webhook { delivery_id } = &m.origin else {
        panic!("webhook origin expected")
    };
    assert!(
        !delivery_id.is_empty() && delivery_id.len() <= 200,
        "{delivery_id:?}"
    );
    assert!(
        !delivery_id.chars().any(char::is_control),
        "{delivery_id:?}"
    );
}

/// Any body, under any preset and content type, through authentication and mapping (a fixed
/// `json` mapping; `webhook_mapping` varies it). Byte 0 picks the preset, byte 1 the content type
/// and scheme, the rest is the body. Verification of an unsigned body never succeeds.
pub fn webhook_body(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let preset = preset_for(
        data[0],
        Mapping {
            id: Some("/id".into()),
            from: Some("/a/0/from".into()),
            subject: Some("/s".into()),
            occurred_at: Some("/t".into()),
            ..Mapping::default()
        },
    );
    let body = &data[2..];
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        HeaderValue::from_static(CONTENT_TYPES[usize::from(data[1]) % 4]),
    );
    headers.insert("x-github-event", HeaderValue::from_static("issues"));
    let d = Delivery {
        source: "fuzz",
        headers: &headers,
        body,
        received_at: now(),
        signed_at: None,
    };
    if let Ok(outcome) = preset::normalize(&preset, &d) {
        check_stored(&outcome, &d);
    }
    // Schemes whose signature lives in the body (Mailgun) or covers parsed form fields (Twilio).
    let schemes = [
        Scheme::Mailgun,
        Scheme::Twilio {
            public_url: "https://h.example/hooks/sms".into(),
        },
        Scheme::Stripe,
    ];
    let scheme = schemes[usize::from(data[1] / 4) % 3].clone();
    let verifier = Verifier::new(scheme, &["fuzz-secret".into()], Duration::from_secs(300))
        .expect("valid verifier");
    if let Ok(sig) = std::str::from_utf8(&body[..body.len().min(64)])
        && let Ok(v) = HeaderValue::from_str(sig)
    {
        headers.insert("stripe-signature", v.clone());
        headers.insert("x-twilio-signature", v);
    }
    let r = verifier.verify(
        &Inbound {
            headers: &headers,
            query: Some("a=1"),
            body,
        },
        now(),
    );
    // Guessing a 256-bit (or 160-bit) MAC is not something a fuzzer does; success means a bug.
    assert!(r.is_err(), "unsigned input verified");
}

/// Every preset's mapping with fuzzed headers and, for `json`, fuzzed pointers.
///
/// Layout: `preset-byte` then, split at `0xFF`: content type, `X-GitHub-Event`, a delivery id
/// header value, the `json` mapping's pointers (id, from, name, subject, text, thread, direction,
/// the outbound value, occurred_at), and the body. Invariants: no panic, the same outcome twice
/// (mapping is pure), and a stored message keeps the exact body under a short clean id.
pub fn webhook_mapping(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let [
        ctype,
        event,
        id_header,
        p_id,
        p_from,
        p_name,
        p_subject,
        p_text,
        p_thread,
        p_dir,
        outbound,
        p_at,
        body,
    ] = pieces::<13>(rest);
    let mapping = Mapping {
        id: optional(p_id),
        from: optional(p_from),
        name: optional(p_name),
        subject: optional(p_subject),
        text: optional(p_text),
        thread: optional(p_thread),
        direction: optional(p_dir).map(|pointer| DirectionRule {
            pointer,
            outbound: vec![text(outbound)],
        }),
        occurred_at: optional(p_at),
    };
    let preset = preset_for(selector, mapping);
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(ctype) {
        headers.insert("content-type", v);
    }
    if let Ok(v) = HeaderValue::from_bytes(event) {
        headers.insert("x-github-event", v);
    }
    let id_name =
        ["webhook-id", "x-github-delivery", "idempotency-key"][usize::from(selector / 9) % 3];
    if !id_header.is_empty()
        && let Ok(v) = HeaderValue::from_bytes(id_header)
    {
        headers.insert(id_name, v);
    }
    let d = Delivery {
        source: "fuzz",
        headers: &headers,
        body,
        received_at: now(),
        signed_at: (selector & 0x80 != 0).then(|| now() - chrono::TimeDelta::seconds(5)),
    };
    let first = preset::normalize(&preset, &d);
    assert_eq!(
        first,
        preset::normalize(&preset, &d),
        "mapping is deterministic"
    );
    match &first {
        Ok(outcome) => check_stored(outcome, &d),
        Err(e) => assert!(!e.field.is_empty() && !e.problem.is_empty()),
    }
}

fn hmac256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

const SECRET: &str = "fuzz-secret";
/// `whsec_` + base64("fuzz-secret-key-of-24-by")
const SW_SECRET: &str = "whsec_ZnV6ei1zZWNyZXQta2V5LW9mLTI0LWJ5";

fn verifier(scheme: Scheme) -> Verifier {
    let secret = match scheme {
        Scheme::StandardWebhooks => SW_SECRET.to_string(),
        Scheme::Basic => format!("user:{SECRET}"),
        _ => SECRET.to_string(),
    };
    Verifier::new(scheme, &[secret], Duration::from_secs(300)).expect("valid verifier")
}

/// The correct headers for `body` at `ts` under `scheme`, with `noise` where the scheme allows
/// other list items (`None` for schemes this target does not sign itself).
fn genuine_headers(scheme: &Scheme, body: &[u8], ts: i64, noise: &str) -> Option<HeaderMap> {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    let key = SECRET.as_bytes();
    match scheme {
        Scheme::StandardWebhooks => {
            let sw_key = BASE64
                .decode(SW_SECRET.trim_start_matches("whsec_"))
                .expect("valid test secret");
            let id = "msg_fuzz";
            let sig = hmac256(&sw_key, &[format!("{id}.{ts}.").as_bytes(), body]);
            pairs.push(("webhook-id", id.into()));
            pairs.push(("webhook-timestamp", ts.to_string()));
            pairs.push((
                "webhook-signature",
                format!("v1,{} {noise}", BASE64.encode(sig)),
            ));
        }
        Scheme::Github => {
            let sig = hex::encode(hmac256(key, &[body]));
            pairs.push(("x-hub-signature-256", format!("sha256={sig}")));
        }
        Scheme::Slack => {
            let sig = hex::encode(hmac256(key, &[format!("v0:{ts}:").as_bytes(), body]));
            pairs.push(("x-slack-request-timestamp", ts.to_string()));
            pairs.push(("x-slack-signature", format!("v0={sig}")));
        }
        Scheme::Stripe => {
            let sig = hex::encode(hmac256(key, &[format!("{ts}.").as_bytes(), body]));
            pairs.push(("stripe-signature", format!("t={ts},v1={sig},{noise}")));
        }
        Scheme::HmacSha256 { .. } => {
            pairs.push(("x-signature", BASE64.encode(hmac256(key, &[body]))));
        }
        Scheme::Bearer => pairs.push(("authorization", format!("Bearer {SECRET}"))),
        Scheme::Basic => pairs.push((
            "authorization",
            format!("basic {}", BASE64.encode(format!("user:{SECRET}"))),
        )),
        Scheme::Twilio { public_url } => {
            let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(key).ok()?;
            mac.update(public_url.as_bytes());
            mac.update(twilio_params(body).as_bytes());
            pairs.push((
                "x-twilio-signature",
                BASE64.encode(mac.finalize().into_bytes()),
            ));
        }
        _ => return None,
    }
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.insert(
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_str(&value).ok()?,
        );
    }
    Some(headers)
}

/// Twilio's signed form parameters the way its SDK builds them: names sorted, each name's distinct
/// values sorted, concatenated without separators (`RequestValidator.compute_signature`).
fn twilio_params(body: &[u8]) -> String {
    let mut params: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        std::collections::BTreeMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        params
            .entry(k.into_owned())
            .or_default()
            .insert(v.into_owned());
    }
    let mut out = String::new();
    for (name, values) in params {
        for value in values {
            out.push_str(&name);
            out.push_str(&value);
        }
    }
    out
}

fn scheme_for(b: u8) -> Scheme {
    match b % 10 {
        0 => Scheme::StandardWebhooks,
        1 => Scheme::Github,
        2 => Scheme::Slack,
        3 => Scheme::Twilio {
            public_url: "https://h.example/hooks/sms".into(),
        },
        4 => Scheme::Stripe,
        5 => Scheme::Mailgun,
        6 => Scheme::HmacSha256 {
            header: "x-signature".into(),
            prefix: String::new(),
            encoding: Encoding::Base64,
        },
        7 => Scheme::Bearer,
        8 => Scheme::Basic,
        _ => Scheme::None,
    }
}

/// The signature header parsers of every scheme.
///
/// Layout: `scheme-byte`, `timestamp-byte`, then split at `0xFF`: up to six header values (sent
/// under every scheme's header names), list noise, a query string, and the body. Invariants:
/// fuzzed headers never verify (no fuzzer guesses a MAC) except under `none`; a correctly signed
/// request verifies exactly when its timestamp is inside the window, also with noise appended
/// to the `v1` lists; any one-bit change of a signed body is refused (for Twilio, unless the
/// decoded parameters stay the same). Twilio requests are signed as its SDK does (names sorted,
/// then each name's distinct values), differently from the daemon's code (sorted, deduplicated
/// pairs), so the two are checked against each other.
pub fn signature_headers(data: &[u8]) {
    let [head, v0, v1, v2, v3, v4, v5, noise, query, body] = pieces::<10>(data);
    let (Some(&scheme_byte), Some(&ts_byte)) = (head.first(), head.get(1)) else {
        return;
    };
    let scheme = scheme_for(scheme_byte);
    let v = verifier(scheme.clone());
    let names = [
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "x-hub-signature-256",
        "x-slack-request-timestamp",
        "x-slack-signature",
        "x-twilio-signature",
        "x-twilio-webhooks-signature-settings",
        "stripe-signature",
        "authorization",
        "x-signature",
        "content-type",
    ];
    let values = [v0, v1, v2, v3, v4, v5];
    let mut headers = HeaderMap::new();
    for (i, name) in names.iter().enumerate() {
        if let Ok(value) = HeaderValue::from_bytes(values[i % values.len()]) {
            headers.insert(*name, value);
        }
    }
    let query = std::str::from_utf8(query).ok();
    let fuzzed = v.verify(
        &Inbound {
            headers: &headers,
            query,
            body,
        },
        now(),
    );
    if scheme == Scheme::None {
        assert!(fuzzed.is_ok());
        return;
    }
    // Bearer and Basic compare a password: a fuzzer that wrote it down has not forged anything.
    let wrote_password = headers.get("authorization").is_some_and(|a| {
        let a = String::from_utf8_lossy(a.as_bytes());
        a.contains(SECRET) || a.contains("dXNlcjpmdXp6LXNlY3JldA")
    });
    assert!(
        fuzzed.is_err() || wrote_password,
        "fuzzed headers verified under {scheme:?}"
    );

    // A genuine request: the timestamp is up to ±400 s from now (the window is 300 s).
    let skew = (i64::from(ts_byte) - 128) * 400 / 128;
    let ts = now().timestamp() + skew;
    // Noise is printable ASCII: a header value outside it is refused before any list is read.
    let noise: String = String::from_utf8_lossy(noise)
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect();
    let Some(signed) = genuine_headers(&scheme, body, ts, "") else {
        return;
    };
    let inbound = |h: &HeaderMap, b: &[u8]| {
        v.verify(
            &Inbound {
                headers: h,
                query: None,
                body: b,
            },
            now(),
        )
    };
    let in_window = skew.abs() <= 300 || !scheme.is_timestamped();
    let verdict = inbound(&signed, body);
    assert_eq!(
        verdict.is_ok(),
        in_window,
        "genuine {scheme:?} at skew {skew}: {verdict:?}"
    );
    if !body.is_empty() && !matches!(scheme, Scheme::Bearer | Scheme::Basic) {
        let mut flipped = body.to_vec();
        let i = usize::from(ts_byte) % flipped.len();
        flipped[i] ^= 1 << (scheme_byte % 8);
        if matches!(scheme, Scheme::Twilio { .. }) && twilio_params(&flipped) == twilio_params(body)
        {
            return; // the same parameters (`%2B` -> `%2b`): Twilio's SDK accepts it too
        }
        assert!(inbound(&signed, &flipped).is_err(), "body change accepted");
        if let Some(noisy) = genuine_headers(&scheme, body, ts, &noise) {
            assert!(
                inbound(&noisy, &flipped).is_err(),
                "body change accepted with noise"
            );
            // Other list items after the genuine one (v1a/v0 signatures, new versions) do not
            // hide it: the Standard Webhooks and Stripe lists still verify.
            assert_eq!(
                inbound(&noisy, body).is_ok(),
                in_window,
                "genuine {scheme:?} with noise {noise:?}"
            );
        }
    }
}

/// Configuration loading (`frontdesk config check`) never panics: any text gives a config or a
/// list of located problems; an accepted config also builds its SLA routing and webhook
/// endpoints (what `frontdesk run` does next) without a panic.
pub fn config_load(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match crate::config::load_str(Path::new("fuzz.yaml"), &text) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                let _ = w.to_string();
            }
            let _ = crate::core::Routing::from_config(&loaded.config);
            for s in &loaded.config.sources {
                if let crate::config::SourceKind::Webhook(hook) = &s.kind {
                    let _ = crate::ingest::webhook::Endpoint::from_config(&s.name, hook);
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(!e.problems.is_empty(), "an error without a problem");
            // YAML also ends a line at a lone CR; one more for a problem at the end of the text
            let lines = text
                .chars()
                .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
                .count()
                + 2;
            for p in &e.problems {
                assert!(!p.problem.is_empty());
                assert!(
                    p.line.is_none_or(|l| l >= 1 && l <= lines),
                    "line {:?} of {lines}",
                    p.line
                );
            }
        }
    }
}

/// A small cursor over fuzzer bytes for the digest target.
struct Draw<'a> {
    strings: std::slice::Iter<'a, &'a [u8]>,
    bytes: &'a [u8],
    at: usize,
}

impl Draw<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn string(&mut self) -> String {
        self.strings.next().map(|s| text(s)).unwrap_or_default()
    }

    fn time(&mut self) -> DateTime<Utc> {
        // within ±3 weeks of now, in 10-minute steps
        let steps = i64::from(u16::from_le_bytes([self.byte(), self.byte()])) - 32768;
        now() + chrono::TimeDelta::minutes((steps % 3024) * 10)
    }

    fn row(&mut self, id: i64) -> ConversationRow {
        let policy = self.byte().is_multiple_of(2);
        let waiting_since = self.time();
        ConversationRow {
            id,
            client: self.string(),
            medium: optional(self.string().as_bytes()),
            subject: self.string(),
            owner: optional(self.string().as_bytes()),
            policy: policy.then(|| self.string()),
            target: policy.then_some(TargetKind::First),
            target_secs: policy.then_some(3600),
            waiting_since,
            warn_at: policy.then(|| self.time()),
            due: policy.then(|| self.time()),
        }
    }
}

/// Header names a digest or alert email may carry (notify::smtp builds exactly these).
const HEADER_NAMES: [&str; 11] = [
    "From",
    "To",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Auto-Submitted",
    crate::notify::GENERATED_HEADER,
];

/// Renders digests and alerts from client-controlled strings and checks the output.
///
/// Layout: control bytes, then strings split at `0xFF` (clients, subjects, owners, errors...).
/// Invariants: the HTML contains only the templates' own tags and known entities, so client
/// text can add no `<`, `>`, `&` or quote; the text part has no control characters but LF and no
/// bidi controls; the built email has only the fixed header set, no CR or LF inside a header
/// value, and CRLF line ends throughout.
pub fn digest_render(data: &[u8]) {
    let [control, rest] = pieces::<2>(data);
    let strings: Vec<&[u8]> = rest.split(|b| *b == 0xFF).collect();
    let mut draw = Draw {
        strings: strings.iter(),
        bytes: control,
        at: 0,
    };
    let mut input = DigestInput {
        since: Some(now() - chrono::TimeDelta::days(1)),
        ..DigestInput::default()
    };
    let open = draw.byte() % 8;
    for id in 0..i64::from(open) {
        input.open.push(draw.row(id));
    }
    for _ in 0..draw.byte() % 4 {
        input.new_messages.push(NewMessagesRow {
            client: draw.string(),
            owner: optional(draw.string().as_bytes()),
            messages: u64::from(draw.byte()),
        });
    }
    for id in 0..draw.byte() % 6 {
        let met = draw.byte();
        input.replies.push(ReplyRow {
            conversation_id: i64::from(id),
            client: draw.string(),
            owner: optional(draw.string().as_bytes()),
            target: if met & 1 == 0 {
                TargetKind::First
            } else {
                TargetKind::Next
            },
            replied_at: draw.time(),
            response_secs: i64::from(draw.byte()) * 97,
            met: [None, Some(true), Some(false)][usize::from(met % 3)],
        });
    }
    for _ in 0..draw.byte() % 3 {
        let healthy = draw.byte().is_multiple_of(2);
        input.sources.push(SourceHealthRow {
            name: draw.string(),
            kind: if healthy {
                SourceKind::Imap
            } else {
                SourceKind::Webhook
            },
            healthy,
            last_message_at: Some(draw.time()),
            unaccounted: u64::from(draw.byte()),
            rejections: u64::from(draw.byte()),
            error: optional(draw.string().as_bytes()),
        });
    }
    for id in 0..draw.byte() % 3 {
        input.failed_sends.push(FailedSendRow {
            outbox_id: i64::from(id),
            kind: draw.string(),
            channel: draw.string(),
            recipient: draw.string(),
            error: draw.string(),
            failed_at: draw.time(),
        });
    }
    let mut events = Vec::new();
    for id in 0..draw.byte() % 4 {
        events.push(match draw.byte() % 4 {
            0 => AlertEvent::SlaWarn {
                conversation: draw.row(100 + i64::from(id)),
            },
            1 => AlertEvent::SlaBreach {
                conversation: draw.row(100 + i64::from(id)),
            },
            2 => AlertEvent::SourceUnhealthy {
                source: draw.string(),
                error: draw.string(),
            },
            _ => AlertEvent::SourceHealthy {
                source: draw.string(),
            },
        });
    }
    input.deferred_alerts = events.clone();
    let tz = [
        chrono_tz::UTC,
        chrono_tz::Europe::Berlin,
        chrono_tz::America::New_York,
    ][usize::from(draw.byte() % 3)];
    let owner = input.open.first().and_then(|r| r.owner.clone());
    let recipient = draw.string();
    let slot = draw.string();

    for who in [None, owner.as_deref()] {
        let digest = Digest::build(&input, now(), tz, who);
        let rendered = digest.render().expect("templates render any data");
        check_rendered(&rendered);
        check_email(&rendered, &recipient, &slot);
    }
    let alert = Alert { events };
    let rendered = alert.render(now(), tz).expect("templates render any data");
    check_rendered(&rendered);
    check_email(&rendered, "", &slot);
}

/// Every tag written literally in the HTML templates.
fn template_tags() -> &'static std::collections::HashSet<&'static str> {
    static TAGS: std::sync::OnceLock<std::collections::HashSet<&'static str>> =
        std::sync::OnceLock::new();
    TAGS.get_or_init(|| {
        let sources = [
            include_str!("digest/digest.html.j2"),
            include_str!("digest/alert.html.j2"),
        ];
        let mut tags = std::collections::HashSet::new();
        for src in sources {
            let mut rest = src;
            while let Some(start) = rest.find('<') {
                let end = rest[start..]
                    .find('>')
                    .map_or(rest.len(), |e| start + e + 1);
                tags.insert(&rest[start..end]);
                rest = &rest[end..];
            }
        }
        tags
    })
}

const ENTITIES: [&str; 9] = [
    "&amp;", "&lt;", "&gt;", "&quot;", "&#x27;", "&#x2f;", "&ldquo;", "&rdquo;", "&middot;",
];

fn check_rendered(r: &Rendered) {
    assert!(!r.subject.chars().any(char::is_control), "{:?}", r.subject);
    let tags = template_tags();
    let mut rest = r.html.as_str();
    while !rest.is_empty() {
        let next = rest.find(['<', '&', '>', '"', '\'']).unwrap_or(rest.len());
        rest = &rest[next..];
        match rest.chars().next() {
            None => break,
            Some('<') => {
                let end = rest.find('>').map_or(rest.len(), |e| e + 1);
                let tag = &rest[..end];
                assert!(
                    tags.contains(tag),
                    "a tag the templates do not have: {tag:?}"
                );
                rest = &rest[end..];
            }
            Some('&') => {
                let entity = ENTITIES
                    .iter()
                    .find(|e| rest.starts_with(**e))
                    .unwrap_or_else(|| {
                        panic!("raw & in the HTML: {:?}", &rest[..rest.len().min(40)])
                    });
                rest = &rest[entity.len()..];
            }
            Some(c) => panic!("raw {c:?} in HTML text: {:?}", &rest[..rest.len().min(40)]),
        }
    }
    for c in r.text.chars() {
        assert!(
            c == '\n' || !c.is_control(),
            "control {c:?} in the text part"
        );
        assert!(
            !matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'),
            "bidi control in the text part"
        );
    }
}

fn check_email(r: &Rendered, recipient: &str, slot: &str) {
    let channel = EmailChannel::new(&EmailSettings {
        name: "fuzz".into(),
        transport: crate::notify::smtp::EmailTransport::File(std::env::temp_dir()),
        from: "frontdesk <frontdesk@example.com>".into(),
        to: vec!["owner@example.com".into()],
        reply_to: Some("support@example.com".into()),
        send_timeout: Duration::from_secs(5),
    })
    .expect("a valid channel");
    let item = OutboxItem {
        id: 7,
        kind: OutboxKind::Digest,
        channel: "fuzz".into(),
        recipient: recipient.to_string(),
        slot_key: slot.to_string(),
        subject: r.subject.clone(),
        body_text: r.text.clone(),
        body_html: Some(r.html.clone()),
        attempts: 0,
    };
    // An unusable recipient is a permanent send failure, not an email.
    let Ok(message) = channel.message(&item) else {
        return;
    };
    let raw = message.formatted();
    for (i, b) in raw.iter().enumerate() {
        match b {
            b'\n' => assert!(i > 0 && raw[i - 1] == b'\r', "bare LF at {i}"),
            b'\r' => assert_eq!(raw.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            0 => panic!("NUL at {i}"),
            _ => {}
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            continue; // a folded continuation of the previous header
        }
        let name = line.split(':').next().unwrap_or_default();
        assert!(
            HEADER_NAMES.iter().any(|h| h.eq_ignore_ascii_case(name)),
            "unexpected header line {line:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed seed and minimized crasher, through the same checks as the fuzzer.
    #[test]
    fn committed_fuzz_inputs_replay_cleanly() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            let mut files = Vec::new();
            if let Ok(dir) = std::fs::read_dir(fuzz.join("seeds").join(name)) {
                files.extend(dir.map(|e| e.unwrap().path()));
            }
            for entry in std::fs::read_dir(fuzz.join("regressions")).unwrap() {
                let path = entry.unwrap().path();
                let file = path.file_name().unwrap().to_string_lossy().into_owned();
                if file.strip_prefix(name).is_some_and(|r| r.starts_with('-')) {
                    files.push(path);
                }
            }
            assert!(!files.is_empty(), "no seeds for {name}");
            for path in files {
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(outcome.is_ok(), "{name}: {} fails", path.display());
                replayed += 1;
            }
        }
        assert!(replayed >= TARGETS.len());
    }

    #[test]
    fn every_fuzz_target_has_a_binary() {
        let manifest =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
                .unwrap();
        for (name, _) in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{name}\"")),
                "fuzz/Cargo.toml lacks {name}"
            );
        }
    }

    #[test]
    fn the_html_check_catches_a_raw_tag_and_a_bare_ampersand() {
        let ok = Rendered {
            subject: "s".into(),
            text: "t\n".into(),
            html: "<p style=\"margin:0\">a &amp; b</p>".into(),
        };
        check_rendered(&ok);
        for bad in [
            "<p style=\"margin:0\"><script></p>",
            "<p style=\"margin:0\">a & b</p>",
            "<p style=\"margin:0\">\"</p>",
        ] {
            let r = Rendered {
                html: bad.into(),
                ..ok.clone()
            };
            assert!(
                std::panic::catch_unwind(|| check_rendered(&r)).is_err(),
                "{bad}"
            );
        }
    }
}
