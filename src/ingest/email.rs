//! Raw RFC 5322 bytes -> the normalized `Message`: pure, never fails, never panics.
//!
//! mail-parser does the MIME work (with `full_encoding` for ISO-2022-JP, GBK and other legacy
//! charsets). It has panicked on crafted input before (stalwartlabs/mail-parser#14, #145, #155),
//! so it runs inside `catch_unwind`: whatever happens, the raw bytes come back as a `Message`,
//! flagged `Degraded` with a reason when something could not be understood.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use mail_parser::{HeaderName, HeaderValue, MessageParser, MimeHeaders, PartType};
use sha2::{Digest, Sha256};

use crate::message::{Address, Automation, Direction, Message, Origin, ParseStatus};

mod lean;
mod plain_text;

/// The header frontdesk puts on everything it sends (digests, alerts); mail carrying it is
/// frontdesk's own and is never ingested as a client message (the loop guard).
pub const GENERATED_HEADER: &str = "X-Frontdesk-Generated";

/// The domain of synthesized Message-IDs; `.invalid` can never collide with a real one.
const SYNTHETIC_ID_DOMAIN: &str = "frontdesk.invalid";

/// Normalizes one email. `received_at` is the trusted receipt time (IMAP INTERNALDATE). The
/// direction is `Inbound`; the caller decides it from the folder role and the team's addresses.
pub fn normalize(
    source: &str,
    origin: Origin,
    raw: Vec<u8>,
    received_at: DateTime<Utc>,
) -> Message {
    let fields = guarded(|| extract_lean(&raw));
    assemble(source, origin, raw, received_at, fields)
}

/// `normalize` with every body part decoded: the reference the lean path is tested against.
#[doc(hidden)]
pub fn normalize_unoptimized(
    source: &str,
    origin: Origin,
    raw: Vec<u8>,
    received_at: DateTime<Utc>,
) -> Message {
    let fields = guarded(|| extract(&raw));
    assemble(source, origin, raw, received_at, fields)
}

/// How many body bytes `normalize` never decodes in `raw`: attachments and unread HTML halves
/// (0 when it parses the whole message).
#[doc(hidden)]
pub fn lean_skipped_bytes(raw: &[u8]) -> usize {
    lean_removed(raw, |copy| {
        raw.len() - copy.bytes().len() - copy.text_removed()
    })
}

/// How many bytes of text/plain bodies in `raw` `normalize` decodes itself, not through
/// mail-parser.
#[doc(hidden)]
pub fn lean_text_bytes(raw: &[u8]) -> usize {
    lean_removed(raw, |copy| copy.text_removed())
}

/// `raw` normalized by the lean path and by the decode-everything reference, as one IMAP message
/// (the tests and the fuzz harness compare the two).
#[doc(hidden)]
pub fn lean_and_full(raw: &[u8]) -> (Message, Message) {
    let origin = || Origin::Imap {
        folder: "INBOX".into(),
        uid_validity: 1,
        uid: 1,
    };
    (
        normalize("check", origin(), raw.to_vec(), DateTime::UNIX_EPOCH),
        normalize_unoptimized("check", origin(), raw.to_vec(), DateTime::UNIX_EPOCH),
    )
}

/// Panics when frontdesk's own decoding of a text/plain body `body` differs from mail-parser's,
/// as quoted-printable and as undecoded (the fuzz harness).
#[doc(hidden)]
pub fn check_plain_text_decoding(body: &[u8]) {
    for encoding in [
        mail_parser::Encoding::QuotedPrintable,
        mail_parser::Encoding::None,
    ] {
        for delimited in [true, false] {
            if let Some(how) = plain_text::disagreement(body, encoding, delimited) {
                panic!("text/plain decoding differs from mail-parser's: {how}");
            }
        }
    }
}

/// `count` of `raw`'s lean copy when the lean path is taken, else 0.
fn lean_removed(raw: &[u8], count: impl FnOnce(&lean::LeanCopy<'_>) -> usize) -> usize {
    catch_unwind(AssertUnwindSafe(|| {
        with_lean_parse(raw, |_, copy| count(copy))
    }))
    .ok()
    .flatten()
    .unwrap_or(0)
}

/// `then` applied to the parse of `raw`'s lean copy and the copy, when there is a lean copy and
/// its parse explains every body left out.
fn with_lean_parse<T>(
    raw: &[u8],
    then: impl FnOnce(&mail_parser::Message<'_>, &lean::LeanCopy<'_>) -> T,
) -> Option<T> {
    let copy = lean::LeanCopy::new(raw, &MIME_PARSER)?;
    let msg = FULL_PARSER.parse(copy.bytes())?;
    copy.explains(&msg).then(|| then(&msg, &copy))
}

/// `extract` in `catch_unwind`: mail-parser has panicked on crafted input before.
fn guarded(extract: impl FnOnce() -> Fields) -> Fields {
    catch_unwind(AssertUnwindSafe(extract)).unwrap_or_else(|_| Fields {
        reasons: vec!["mail parser panicked".to_string()],
        ..Fields::default()
    })
}

fn assemble(
    source: &str,
    origin: Origin,
    raw: Vec<u8>,
    received_at: DateTime<Utc>,
    fields: Fields,
) -> Message {
    // the stored id is by construction the UIDVALIDITY fingerprint (a header-only parse): the
    // full parse can disagree on crafted headers (fuzzer find), which would defeat the matching
    let message_id = fingerprint(&raw);
    let parse = if fields.reasons.is_empty() {
        ParseStatus::Ok
    } else {
        ParseStatus::Degraded(fields.reasons.join("; "))
    };
    Message {
        source: source.to_string(),
        origin,
        direction: Direction::Inbound,
        received_at,
        sent_at: fields.sent_at,
        from: fields.from,
        to: fields.to,
        subject: fields.subject,
        text: fields.text,
        message_id: Some(message_id),
        in_reply_to: fields.in_reply_to,
        references: fields.references,
        thread_key: None,
        automation: fields.automation,
        parse,
        raw,
    }
}

/// The full parse: only the headers `extract` reads are parsed into values; every other header
/// (Received chains, DKIM signatures, List-*) is only scanned to its end, which costs less than a
/// tokenizer run and allocates no value. Such a header keeps its name and offsets, and
/// `raw_header` reads from the raw bytes, so it is unaffected.
static FULL_PARSER: LazyLock<MessageParser> = LazyLock::new(|| {
    MessageParser::new()
        .with_mime_headers()
        .header_date(HeaderName::Date)
        .header_text(HeaderName::Subject)
        .header_address(HeaderName::From)
        .header_address(HeaderName::To)
        .header_address(HeaderName::Cc)
        .header_id(HeaderName::MessageId)
        .header_id(HeaderName::InReplyTo)
        .header_id(HeaderName::References)
        .default_header_ignore()
});

/// The lean pre-scan's part headers: the MIME headers, every other header skipped unparsed (the
/// full parse reads a message's top-level headers again). `LeanCopy::explains` checks what the
/// pre-scan concluded on the full parse of the lean copy, so a header this parser reads
/// differently costs a second parse, never a different message.
static MIME_PARSER: LazyLock<MessageParser> = LazyLock::new(|| {
    MessageParser::new()
        .with_mime_headers()
        .default_header_ignore()
});

/// The Message-ID parse: every other header is skipped unparsed.
static ID_PARSER: LazyLock<MessageParser> = LazyLock::new(|| {
    MessageParser::new()
        .header_id(HeaderName::MessageId)
        .default_header_ignore()
});

/// `sha256-<hex of the raw bytes>@frontdesk.invalid`: stable, so a re-fetch of the same bytes
/// gets the same id (the UIDVALIDITY fingerprint relies on that).
pub fn synthesized_message_id(raw: &[u8]) -> String {
    format!(
        "sha256-{}@{SYNTHETIC_ID_DOMAIN}",
        hex::encode(Sha256::digest(raw))
    )
}

/// The Message-ID a raw message would be stored under, without normalizing the whole message
/// (headers only): used to fingerprint messages after a UIDVALIDITY change.
pub fn fingerprint(raw: &[u8]) -> String {
    message_id_of(raw).unwrap_or_else(|| synthesized_message_id(raw))
}

/// The Message-ID in a message's header (or a header-only fetch), without angle brackets.
pub fn message_id_of(raw: &[u8]) -> Option<String> {
    catch_unwind(AssertUnwindSafe(|| {
        ID_PARSER
            .parse_headers(raw)
            .and_then(|m| m.message_id().and_then(clean_id))
    }))
    .ok()
    .flatten()
}

/// What `extract` found; `reasons` lists what could not be understood.
#[derive(Default)]
struct Fields {
    sent_at: Option<DateTime<Utc>>,
    from: Option<Address>,
    to: Vec<Address>,
    subject: Option<String>,
    text: Option<String>,
    in_reply_to: Vec<String>,
    references: Vec<String>,
    automation: Automation,
    reasons: Vec<String>,
}

/// `extract`, parsing a copy without the base64 attachment bodies and the HTML halves of
/// alternatives when that provably gives the same fields (`lean`'s module doc says why);
/// otherwise `extract` itself.
fn extract_lean(raw: &[u8]) -> Fields {
    // a panic here says nothing about the original bytes: they get their own parse below
    let lean = catch_unwind(AssertUnwindSafe(|| {
        with_lean_parse(raw, |msg, copy| fields_of(msg, raw, Some(copy)))
    }));
    match lean {
        Ok(Some(fields)) => fields,
        _ => extract(raw),
    }
}

fn extract(raw: &[u8]) -> Fields {
    match FULL_PARSER.parse(raw) {
        Some(msg) => fields_of(&msg, raw, None),
        None => Fields {
            reasons: vec!["no header found".to_string()],
            ..Fields::default()
        },
    }
}

/// The fields of `msg`, parsed from `raw` or from its `lean` copy: everything read here lies in
/// the headers, in parts the two have in common, or in the text the copy decoded itself.
fn fields_of(
    msg: &mail_parser::Message<'_>,
    raw: &[u8],
    lean: Option<&lean::LeanCopy<'_>>,
) -> Fields {
    let mut f = Fields {
        from: msg.from().and_then(|a| a.iter().find_map(address)),
        ..Fields::default()
    };
    if f.from.is_none() {
        f.reasons.push("no sender address".to_string());
    }
    f.to = msg
        .to()
        .into_iter()
        .chain(msg.cc())
        .flat_map(|a| a.iter())
        .filter_map(address)
        .collect();
    f.subject = msg.subject().map(single_line).filter(|s| !s.is_empty());
    f.in_reply_to = ids(msg.in_reply_to());
    f.references = ids(msg.references());
    f.sent_at = match msg.date() {
        Some(d) if d.is_valid() => DateTime::from_timestamp(d.to_timestamp(), 0),
        _ => None,
    };
    if f.sent_at.is_none() && raw_header(msg, "Date").is_some() {
        f.reasons.push("unparseable Date header".to_string());
    }
    f.automation = automation(|name| raw_header(msg, name));

    // text/plain parts, else HTML parts made readable (mail-parser lists HTML in text_body
    // when a part has no plain alternative)
    let mut texts = Vec::new();
    for i in 0..msg.text_body_count() {
        let Some(part) = msg.text_part(i as u32) else {
            continue;
        };
        let text = match &part.body {
            // a body left out of the lean copy: its text is the copy's
            PartType::Text(_)
                if let Some(t) = lean.and_then(|c| c.text_at(part.offset_body as usize)) =>
            {
                clean_text(t)
            }
            PartType::Text(t) => clean_text(t),
            PartType::Html(h) => html_to_text(h),
            _ => continue,
        };
        if !text.is_empty() {
            texts.push(text);
        }
    }

    let root = msg.root_part();
    if let Some(ct) = msg.content_type()
        && ct.ctype().eq_ignore_ascii_case("multipart")
        && ct.attribute("boundary").is_none_or(str::is_empty)
    {
        f.reasons.push("multipart without boundary".to_string());
        // nothing can be split into parts: show the whole body rather than nothing
        if texts.is_empty() {
            let body = raw.get(root.offset_body as usize..).unwrap_or_default();
            texts.push(clean_text(&String::from_utf8_lossy(body)));
        }
    }
    if msg.parts.iter().any(|p| p.is_encoding_problem) {
        f.reasons.push("undecodable body part".to_string());
    }
    texts.retain(|t| !t.is_empty());
    f.text = (!texts.is_empty()).then(|| texts.join("\n\n"));
    f
}

/// Whether `clean_text` must look at `b` more closely: a control character other than tab and
/// newline, or the lead byte of a C1 control.
#[inline(always)]
fn needs_look(b: u8) -> bool {
    // non-short-circuit `&` and `|` so a chunk's check vectorizes
    ((b < 0x20) & (b != b'\n') & (b != b'\t')) | (b == 0x7f) | (b == 0xc2)
}

/// Plain text with LF line ends, without control characters other than tab and newline.
fn clean_text(t: &str) -> String {
    // Byte runs between control characters are copied whole (this runs over every text part).
    // Control characters are C0, DEL and C1 (U+0080-U+009F, encoded as C2 80-9F); dropping
    // them all also turns CRLF into LF.
    // Most text has none of them: 32-byte chunks without a byte that needs a closer look are
    // passed over whole (the check has no branches, so it vectorizes).
    const CHUNK: usize = 32;
    let bytes = t.as_bytes();
    let mut out = String::with_capacity(t.len());
    let mut run = 0;
    let mut i = 0;
    while i < bytes.len() {
        let end = (i + CHUNK).min(bytes.len());
        if end - i == CHUNK
            && !bytes[i..end]
                .iter()
                .fold(false, |any, &b| any | needs_look(b))
        {
            i = end;
            continue;
        }
        // handle the first byte that needs a look, then go back to whole chunks from the byte
        // after it: CRLF text has one hit per line, and finishing the chunk byte by byte would
        // scan most of every line slowly
        let Some(at) = bytes[i..end].iter().position(|&b| needs_look(b)) else {
            i = end;
            continue;
        };
        i += at;
        let b = bytes[i];
        let skip = if b != 0xc2 {
            1
        } else if bytes.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n)) {
            2
        } else {
            0
        };
        if skip > 0 {
            out.push_str(&t[run..i]);
            i += skip;
            run = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&t[run..]);
    let trimmed = out.trim();
    if trimmed.len() == out.len() {
        out
    } else {
        trimmed.to_string()
    }
}

/// Readable text from HTML: tags dropped, block elements on their own lines, list items
/// bulleted, `script`/`style`/`head` content skipped, entities decoded, whitespace collapsed.
/// A small tolerant scanner: email HTML is often broken, and this must never fail.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut skip_until: Option<&'static str> = None;
    let mut rest = html;
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            if skip_until.is_none() {
                push_text(&mut out, rest);
            }
            break;
        };
        if skip_until.is_none() {
            push_text(&mut out, &rest[..lt]);
        }
        rest = &rest[lt..];
        if rest.starts_with("<!--") {
            rest = rest.find("-->").map_or("", |end| &rest[end + 3..]);
            continue;
        }
        let Some(gt) = rest.find('>') else {
            break; // an unterminated tag at the end: drop it
        };
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if let Some(until) = skip_until {
            if closing && name == until {
                skip_until = None;
            }
            continue;
        }
        match name.as_str() {
            "script" | "style" | "head" | "title" if !closing && !tag.ends_with('/') => {
                skip_until = Some(match name.as_str() {
                    "script" => "script",
                    "style" => "style",
                    "head" => "head",
                    _ => "title",
                });
            }
            "br" => out.push('\n'),
            "li" if !closing => {
                newline(&mut out);
                out.push_str("- ");
            }
            "p" | "div" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "ul" | "ol" | "li" | "tr"
            | "table" | "blockquote" | "pre" | "hr" | "section" | "article" | "header"
            | "footer" | "dt" | "dd" => newline(&mut out),
            "td" | "th" if closing => out.push(' '),
            _ => {}
        }
    }
    // at most one blank line in a row, no trailing spaces
    let mut text = String::with_capacity(out.len());
    let mut blank = 0;
    for line in out.lines().map(str::trim) {
        if line.is_empty() {
            blank += 1;
            if blank > 1 {
                continue;
            }
        } else {
            blank = 0;
        }
        text.push_str(line);
        text.push('\n');
    }
    clean_text(&text)
}

/// Ends the current line unless it is already ended.
fn newline(out: &mut String) {
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
}

/// Appends an HTML text run: entities decoded, whitespace collapsed as a browser would.
fn push_text(out: &mut String, run: &str) {
    let decoded = decode_entities(run);
    for c in decoded.chars() {
        if c.is_whitespace() && c != '\u{a0}' {
            if !out.is_empty() && !out.ends_with([' ', '\n']) {
                out.push(' ');
            }
        } else if c == '\u{a0}' {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
}

/// Decodes the common named entities and numeric references; unknown ones stay as written.
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let end = rest
            .char_indices()
            .take(12)
            .find(|&(_, c)| c == ';')
            .map(|(i, _)| i);
        let decoded = end.and_then(|end| {
            let entity = &rest[1..end];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => {
                    let num = entity.strip_prefix('#')?;
                    let code = match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => num.parse().ok()?,
                    };
                    char::from_u32(code)
                }
            }?;
            Some((c, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The raw value of the first top-level header called `name` (any case), lossily decoded.
fn raw_header(msg: &mail_parser::Message<'_>, name: &str) -> Option<String> {
    let h = msg
        .headers()
        .iter()
        .find(|h| h.name().eq_ignore_ascii_case(name))?;
    let bytes = msg
        .raw_message()
        .get(h.offset_start() as usize..h.offset_end() as usize)?;
    Some(String::from_utf8_lossy(bytes).into_owned())
}

/// How the sender marked the message; frontdesk's own header wins over everything.
fn automation(header: impl Fn(&str) -> Option<String>) -> Automation {
    if header(GENERATED_HEADER).is_some() {
        return Automation::Frontdesk;
    }
    let value = |name: &str| header(name).map(|v| v.trim().to_ascii_lowercase());
    // RFC 3834: anything but "no" is automatic
    if value("Auto-Submitted").is_some_and(|v| !v.is_empty() && !v.starts_with("no")) {
        return Automation::Automatic;
    }
    if value("Precedence")
        .is_some_and(|v| matches!(v.as_str(), "bulk" | "list" | "junk" | "auto_reply"))
    {
        return Automation::Automatic;
    }
    // widespread non-standard auto-responder markers
    if value("X-Autoreply").is_some_and(|v| v == "yes") || header("X-Autorespond").is_some() {
        return Automation::Automatic;
    }
    Automation::Human
}

fn address(a: &mail_parser::Addr<'_>) -> Option<Address> {
    let addr = a.address()?.trim();
    if addr.is_empty() {
        return None;
    }
    Some(Address {
        name: a.name().map(single_line).filter(|n| !n.is_empty()),
        addr: single_line(&addr.to_lowercase()),
    })
}

fn ids(v: &HeaderValue<'_>) -> Vec<String> {
    match v {
        HeaderValue::Text(t) => clean_id(t).into_iter().collect(),
        HeaderValue::TextList(list) => list.iter().filter_map(|t| clean_id(t)).collect(),
        _ => Vec::new(),
    }
}

/// An id without angle brackets, whitespace or control characters; None when nothing is left.
fn clean_id(id: &str) -> Option<String> {
    // brackets anywhere (a broken header can nest them), whitespace and controls go
    let id: String = id
        .chars()
        .filter(|c| !c.is_control() && !c.is_whitespace() && !matches!(c, '<' | '>'))
        .collect();
    (!id.is_empty()).then_some(id)
}

/// Header text on one line: control characters (CR, LF, NUL, ...) become spaces, then trimmed.
fn single_line(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    s.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(raw: &[u8]) -> Message {
        let origin = Origin::Imap {
            folder: "INBOX".into(),
            uid_validity: 1,
            uid: 1,
        };
        normalize("test", origin, raw.to_vec(), DateTime::UNIX_EPOCH)
    }

    #[test]
    fn plain_message_fields() {
        let m = norm(
            b"From: \"Ann Client\" <Ann@Example.COM>\r\nTo: a@x.test, b@x.test\r\nCc: c@x.test\r\n\
Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nDate: Tue, 1 Jul 2025 10:00:00 +0200\r\n\
Message-ID: <id1@x.test>\r\nIn-Reply-To: <id0@x.test>\r\nReferences: <a@x> <id0@x.test>\r\n\r\nHello\r\n",
        );
        assert_eq!(m.parse, ParseStatus::Ok);
        let from = m.from.unwrap();
        assert_eq!(from.addr, "ann@example.com");
        assert_eq!(from.name.as_deref(), Some("Ann Client"));
        assert_eq!(m.to.len(), 3);
        assert_eq!(m.subject.as_deref(), Some("Grüße"));
        assert_eq!(m.message_id.as_deref(), Some("id1@x.test"));
        assert_eq!(m.in_reply_to, vec!["id0@x.test"]);
        assert_eq!(m.references, vec!["a@x", "id0@x.test"]);
        assert_eq!(m.sent_at.unwrap().to_rfc3339(), "2025-07-01T08:00:00+00:00");
        assert_eq!(m.text.as_deref(), Some("Hello"));
        assert_eq!(m.received_at, DateTime::UNIX_EPOCH);
        assert_eq!(m.automation, Automation::Human);
    }

    #[test]
    fn missing_message_id_is_synthesized_from_the_bytes() {
        let raw = b"From: a@x.test\r\nSubject: s\r\n\r\nbody\r\n";
        let m = norm(raw);
        let id = m.message_id.unwrap();
        assert!(
            id.starts_with("sha256-") && id.ends_with("@frontdesk.invalid"),
            "{id}"
        );
        assert_eq!(id, synthesized_message_id(raw));
        assert_eq!(fingerprint(raw), id);
        assert_ne!(
            id,
            norm(b"From: a@x.test\r\nSubject: t\r\n\r\nbody\r\n")
                .message_id
                .unwrap()
        );
    }

    #[test]
    fn garbage_and_empty_input_are_degraded_and_kept() {
        for raw in [&b""[..], b"\x00\xff\xfe", b"no colon here at all"] {
            let m = norm(raw);
            assert!(matches!(m.parse, ParseStatus::Degraded(_)), "{raw:?}");
            assert_eq!(m.raw, raw);
            assert!(m.message_id.is_some());
        }
    }

    #[test]
    fn nested_brackets_in_ids_are_removed() {
        // found by the fuzzer
        let m =
            norm(b"From: a@x\r\nMessage-ID: <abc?= <j@x.example>\r\nReferences: <<r@x>>\r\n\r\nx");
        assert_eq!(m.message_id.as_deref(), Some("abc?=j@x.example"));
        assert!(m.references.iter().all(|r| !r.contains(['<', '>'])));
    }

    #[test]
    fn automation_headers() {
        let auto = norm(b"From: a@x\r\nAuto-Submitted: auto-replied\r\n\r\nx");
        assert_eq!(auto.automation, Automation::Automatic);
        let not_auto = norm(b"From: a@x\r\nAuto-Submitted: no\r\n\r\nx");
        assert_eq!(not_auto.automation, Automation::Human);
        let bulk = norm(b"From: a@x\r\nPrecedence: Bulk\r\n\r\nx");
        assert_eq!(bulk.automation, Automation::Automatic);
        let ours = norm(b"From: a@x\r\nx-frontdesk-generated: digest\r\nPrecedence: bulk\r\n\r\nx");
        assert_eq!(ours.automation, Automation::Frontdesk);
    }

    #[test]
    fn html_only_becomes_text() {
        let m = norm(
            b"From: a@x\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hello <b>there</b></p><script>x</script>",
        );
        let text = m.text.unwrap();
        assert!(text.contains("Hello there"), "{text}");
        assert!(!text.contains('<'), "{text}");
        assert!(!text.contains('x'), "script content skipped: {text}");
    }

    #[test]
    fn html_to_text_blocks_lists_entities() {
        let t = html_to_text(
            "<h1>Title</h1><p>a&amp;b &lt;c&gt; &#233;&#x41; &bogus; &</p><ul><li>one<li>two</ul>\
<!-- hidden --><div>x<br>y</div><style>p{}</style><p>\n\n  spaced   out  </p><b",
        );
        assert_eq!(
            t,
            "Title\na&b <c> éA &bogus; &\n- one\n- two\nx\ny\nspaced out"
        );
    }

    #[test]
    fn header_injection_is_flattened() {
        let m = norm(b"From: a@x\r\nSubject: =?utf-8?q?a=0D=0ABcc:_evil@x=00?=\r\n\r\nx");
        let s = m.subject.unwrap();
        assert!(!s.contains(['\r', '\n', '\0']), "{s:?}");
    }

    /// A multipart/mixed message: a text part, then `tail` right after the next delimiter.
    fn mixed_with(boundary: &str, tail: &str) -> Vec<u8> {
        format!(
            "From: a@x.test\r\nSubject: s\r\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n\
--{boundary}\r\nContent-Type: text/plain\r\n\r\nthe text\r\n--{boundary}\r\n{tail}"
        )
        .into_bytes()
    }

    fn pdf(body: &str) -> String {
        format!("Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n{body}")
    }

    /// Crafted MIME where a pre-scan could misjudge a part: the lean path either skips exactly the
    /// attachment or falls back, and the message is the full parse's either way.
    #[test]
    fn lean_path_equals_the_full_parse_on_crafted_mime() {
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("plain attachment", mixed_with("b", &(pdf("QUJD\r\nREVG\r\n") + "--b--\r\n")), true),
            ("padding inside", mixed_with("b", &(pdf("QUJD=QU=JD\r\n") + "--b--\r\n")), true),
            ("delimiter mid-line", mixed_with("b", &(pdf("QUJD") + "--b--")), true),
            ("no closing delimiter", mixed_with("b", &pdf("QUJD\r\n")), false),
            ("single dash", mixed_with("b", &(pdf("QU-JD\r\n") + "--b--\r\n")), false),
            ("double dash, not a delimiter", mixed_with("b", &(pdf("QU--JD\r\n") + "--b--\r\n")), false),
            ("bad byte", mixed_with("b", &(pdf("QU*JD\r\n") + "--b--\r\n")), false),
            (
                "base64 text part",
                mixed_with(
                    "b",
                    "Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n\
aGVsbG8gdGhlcmU=\r\n--b--\r\n",
                ),
                false,
            ),
            ("prefix of a longer boundary", mixed_with("b", &(pdf("QUJD\r\n") + "--bb\r\n--b--\r\n")), true),
            (
                "boundary folded over two lines",
                b"From: a@x\r\nContent-Type: multipart/mixed; boundary=\"x\r\n y\"\r\n\r\n--x\r\n y\r\n\
Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nQUJD\r\n--x\r\n y--\r\n"
                    .to_vec(),
                false,
            ),
            (
                "digest with an untyped part",
                b"From: a@x\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n\
From: c@x\r\n\r\ninner\r\n--d\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n\
QUJD\r\n--d--\r\n"
                    .to_vec(),
                false,
            ),
            (
                "base64 message/rfc822",
                mixed_with(
                    "b",
                    "Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n\
RnJvbTogY0B4DQoNCmlubmVy\r\n--b\r\nContent-Type: image/gif\r\nContent-Transfer-Encoding: base64\r\n\r\n\
R0lGODlh\r\n--b--\r\n",
                ),
                true,
            ),
            (
                "inner multipart without its boundary",
                mixed_with(
                    "b",
                    "Content-Type: multipart/related; boundary=zz\r\n\r\nno parts\r\n--b\r\n\
Content-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\nUEsD\r\n--b--\r\n",
                ),
                true,
            ),
            (
                "headers end on a line with a space",
                mixed_with("b", "Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n \r\n\r\nQUJD\r\n--b--\r\n"),
                true,
            ),
            (
                "lf line ends",
                b"From: a@x\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nt\n\
--b\nContent-Type: audio/ogg\nContent-Transfer-Encoding: Base64\n\nT2dnUw==\n--b--\n"
                    .to_vec(),
                true,
            ),
        ];
        for (name, raw, skipped) in cases {
            let (lean, full) = lean_and_full(&raw);
            assert_eq!(lean, full, "{name}");
            assert_eq!(lean_skipped_bytes(&raw) > 0, skipped, "{name}");
        }
    }

    /// A multipart/mixed message whose first part is a text/plain `body` with these headers.
    fn text_part(headers: &str, body: &str) -> Vec<u8> {
        format!(
            "From: a@x.test\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
--b\r\nContent-Type: text/plain{headers}\r\n\r\n{body}--b\r\n{}--b--\r\n",
            pdf("QUJD\r\n")
        )
        .into_bytes()
    }

    /// Text bodies the lean path decodes itself, and ones it leaves to mail-parser: the message
    /// is the full parse's either way.
    #[test]
    fn text_decoded_by_the_lean_path_is_mail_parsers() {
        let qp = "; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable";
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            (
                "escapes, soft break, blanks",
                text_part(qp, "caf=C3=A9 =E2=82=AC  \r\nsoft =\r\nbreak\t\r\n"),
                true,
            ),
            (
                "7bit",
                text_part("; charset=UTF-8", "plain\r\ntext\r\n"),
                true,
            ),
            ("no charset", text_part("", "plain\r\n"), true),
            (
                "unknown charset",
                text_part("; charset=x-made-up", "caf\u{e9}\r\n"),
                true,
            ),
            ("bad utf-8", text_part(qp, "bad =FF=FE bytes\r\n"), true),
            ("delimiter mid-line", text_part(qp, "see x"), true),
            (
                "soft break before the delimiter",
                text_part(qp, "abc=\r\n"),
                true,
            ),
            ("lone cr", text_part(qp, "a\rb\nc\r\n"), true),
            ("empty lines only", text_part(qp, "\r\n\r\n"), true),
            ("decoding error", text_part(qp, "a==b\r\n"), false),
            (
                "one part",
                format!("From: a@x\r\nContent-Type: text/plain{qp}\r\n\r\ncaf=C3=A9  \r\nend=\r\n")
                    .into_bytes(),
                true,
            ),
            (
                "one untyped part",
                b"From: a@x\r\n\r\nhello\r\n".to_vec(),
                true,
            ),
            (
                "one part, escape open at the end",
                format!("From: a@x\r\nContent-Type: text/plain{qp}\r\n\r\nend=A").into_bytes(),
                false,
            ),
            ("escape cut by the delimiter", text_part(qp, "end=A"), false),
            (
                "latin-1",
                text_part("; charset=iso-8859-1", "caf\u{e9}\r\n"),
                false,
            ),
            (
                "base64",
                text_part("\r\nContent-Transfer-Encoding: base64", "aGk=\r\n"),
                false,
            ),
        ];
        for (name, raw, decoded_here) in cases {
            let (lean, full) = lean_and_full(&raw);
            assert_eq!(lean, full, "{name}");
            assert_eq!(lean_text_bytes(&raw) > 0, decoded_here, "{name}");
        }
    }

    /// What `clean_text` replaced: CRLF made LF, every control character but tab and newline
    /// dropped char by char, then trimmed.
    fn char_filter(s: &str) -> String {
        let kept: String = s
            .replace("\r\n", "\n")
            .chars()
            .filter(|&c| c == '\n' || c == '\t' || !c.is_control())
            .collect();
        kept.trim().to_string()
    }

    proptest::proptest! {
        /// mail-parser's base64 decoder accepts any run of the alphabet, `=` anywhere included,
        /// and whitespace: such a body is always skipped and never changes the verdict.
        #[test]
        fn any_base64_alphabet_body_is_skipped(body in "[A-Za-z0-9+/= \t\r\n]{1,120}") {
            let raw = mixed_with("b", &(pdf(&body) + "--b--\r\n"));
            let (lean, full) = lean_and_full(&raw);
            proptest::prop_assert_eq!(&lean.parse, &ParseStatus::Ok);
            proptest::prop_assert_eq!(lean, full);
            proptest::prop_assert_eq!(lean_skipped_bytes(&raw), body.len());
        }

        /// Any quoted-printable text body normalizes as the full parse does, decoded by the lean
        /// path or not.
        #[test]
        fn any_quoted_printable_text_normalizes_as_the_full_parse(
            body in "[=A3fZ \t\x0c\r\n\u{e9}.-]{0,60}",
            charset in "(utf-8|UTF-8|x-unknown|latin1)",
        ) {
            let headers = format!("; charset={charset}\r\nContent-Transfer-Encoding: quoted-printable");
            // as a part of a multipart and as a message that is one text part
            let one_part = format!("From: a@x\r\nContent-Type: text/plain{headers}\r\n\r\n{body}");
            for raw in [text_part(&headers, &body), one_part.into_bytes()] {
                let (lean, full) = lean_and_full(&raw);
                proptest::prop_assert_eq!(lean, full);
            }
        }

        /// The byte-run `clean_text` keeps exactly what the char filter it replaced kept.
        #[test]
        fn clean_text_matches_the_char_filter(s in "(\\PC|\\r|\\n|\\t|\\x00|\\x7f|\\u{85}|\\u{9f}|\\u{a0}| )*") {
            proptest::prop_assert_eq!(clean_text(&s), char_filter(&s));
        }

        /// Long runs of ordinary text with a control character now and then, so whole chunks
        /// are passed over and a two-byte C1 control can straddle a chunk's end.
        #[test]
        fn clean_text_matches_the_char_filter_in_long_text(
            s in "([a-z .,\n\t]{0,70}(\r|\x00|\x1b|\x7f|\u{85}|\u{9f}|\u{a0}|ü|€)?){0,24}"
        ) {
            proptest::prop_assert_eq!(clean_text(&s), char_filter(&s));
        }
    }
}
