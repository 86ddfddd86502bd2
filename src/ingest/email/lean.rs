//! The lean copy: a message without the bodies `normalize` never reads, which mail-parser would
//! otherwise decode only for them to be thrown away, and without the text/plain bodies that
//! `plain_text` decodes faster than mail-parser. Three kinds are left out:
//! - the bodies of base64 attachments (7.6% of `frontdesk sync`'s CPU on the bench mailbox, plus
//!   the page faults of the decoded buffers);
//! - the HTML half of a `multipart/alternative` that has a plain-text half, in quoted-printable or
//!   no transfer encoding (decoding and converting it was ~10% of the sync's CPU: most mail is
//!   such an alternative, and the HTML half is the larger one). `normalize` reads the HTML only
//!   when there is no plain text;
//! - the body of a `text/plain` part of a multipart, in quoted-printable or no transfer encoding,
//!   without a charset decoder of its own (UTF-8, an unknown charset or none). mail-parser's
//!   byte-at-a-time quoted-printable decoder and lossy UTF-8 step were ~8% of the sync's CPU;
//!   `plain_text` gives the same text from the original bytes, and `normalize` reads it instead
//!   of the copy's empty body.
//!
//! mail-parser 0.11 decodes every part and cannot be told not to. So a pre-scan walks the MIME
//! structure the way mail-parser's `parse_` loop does and picks the leaf parts whose bodies are safe
//! to drop; the full parse then runs on a copy without those bodies.
//!
//! Why the result equals the full parse of the original bytes. Up to the start of a dropped body
//! `R` both parses read the same bytes and nothing beyond them (the header parser stops on the
//! blank line; boundary look-aheads end before the part's headers), so they reach `R` in the same
//! state. From there:
//! - **Base64.** `R` holds only the base64 alphabet, `=`, space, tab, CR and LF: mail-parser's
//!   base64 decoder consumes all of those without error, and no boundary delimiter (`--` +
//!   boundary) can start inside `R`, which has no `-`. The decoder then stops where it would have
//!   stopped without `R`, with the same verdict.
//! - **HTML.** `R` runs from the body start to the first delimiter of the part's boundary. Both
//!   decoders that can read it (quoted-printable, and none) end a part at the first occurrence of
//!   the delimiter after the body start, wherever it is, so both copies end the part at the same
//!   delimiter. The undecoded reader cannot fail once the delimiter is found; the quoted-printable
//!   one fails only on a `=` met inside an escape, which `quoted_printable_decodes` checks on `R`
//!   with the decoder's own rules and hex table. The lean copy's empty body decodes without error.
//!   Membership in the text or HTML body lists depends on the part's type and that verdict, not on
//!   the bytes.
//! - **Text.** `R` ends as the HTML one does, at the first delimiter after the body start.
//!   `plain_text::decode` reproduces both decoders on `R` and their lossy UTF-8 step, and declines
//!   wherever mail-parser's decoder could fail, so the verdict is "no problem" in both copies and
//!   the text is mail-parser's (its differential tests and the fuzz harness hold it to that).
//!
//! After `R`, the bytes are the same again. What differs is only the dropped part's decoded body
//! (`normalize` never reads it, or reads the copy's decoding of a text body instead) and the
//! offsets of that part, which `normalize` never reads. `LeanCopy::explains` checks the
//! rest on the lean parse itself, so a pre-scan that misread the structure costs a second parse,
//! never a different `Message`:
//! - each dropped base64 body is, in the lean parse, the body of a base64 part decoded without a
//!   problem into binary (not text, not a message);
//! - each dropped HTML body is, in the lean parse, an HTML part decoded without a problem, with the
//!   transfer encoding the pre-scan saw, not among the text bodies `normalize` reads, and a direct
//!   child of a `multipart/alternative` whose boundary is the one the pre-scan ended it at;
//! - each decoded text body is, in the lean parse, a text part decoded without a problem, with the
//!   transfer encoding the pre-scan saw and no charset decoder, and a direct child of a multipart
//!   whose boundary is the one the pre-scan ended it at;
//! - no boundary contains `\n`: the byte before each `R` is `\n`, so a boundary delimiter could
//!   otherwise straddle `R` and be found in one copy but not the other.

use std::borrow::Cow;
use std::ops::Range;

use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::decoders::quoted_printable::HEX_MAP;
use mail_parser::{
    ContentType, Encoding, GetHeader, HeaderName, HeaderValue, Message, MessageParser, PartType,
};
use memchr::memmem;

use super::plain_text;

/// Open multiparts beyond this depth end the walk (the rest is parsed whole): a bound on the work
/// and memory a hostile message can make the pre-scan spend.
const MAX_DEPTH: usize = 64;

/// A body the lean copy leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Skipped<'r> {
    /// A base64 attachment's body.
    Base64,
    /// The HTML half of an alternative, ended at the first delimiter of `boundary`.
    Html {
        /// The boundary of the enclosing `multipart/alternative`, without the leading `--`.
        boundary: Vec<u8>,
        /// Its transfer encoding: quoted-printable or none.
        encoding: Encoding,
    },
    /// A `text/plain` part's body, decoded here (`plain_text`) rather than by mail-parser: in a
    /// multipart, ended at the first delimiter of `boundary`, or the whole message's, to its end.
    Text {
        /// The boundary of the enclosing multipart, without the leading `--`; None for the body
        /// of a message that is one text part.
        boundary: Option<Vec<u8>>,
        /// Its transfer encoding: quoted-printable or none.
        encoding: Encoding,
        /// The part's text, as mail-parser would have decoded it.
        text: Cow<'r, str>,
    },
}

/// A body the pre-scan found safe to leave out: where it is in the original and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Skip<'r> {
    /// The body's bytes in the original.
    pub(super) range: Range<usize>,
    /// What kind of body it is.
    pub(super) kind: Skipped<'r>,
}

/// A message with some bodies removed, and where each removed body began.
pub(super) struct LeanCopy<'r> {
    bytes: Vec<u8>,
    /// Offsets in `bytes` where a removed body was, ascending, with what it was.
    holes: Vec<(usize, Skipped<'r>)>,
    /// Bytes of the original removed from text/plain bodies.
    text_removed: usize,
}

impl<'r> LeanCopy<'r> {
    /// The lean copy of `raw`, or None when there is nothing worth removing. `parser` reads the
    /// part headers; it needs the MIME headers only (`explains` checks the result on the parse
    /// that counts).
    pub(super) fn new(raw: &'r [u8], parser: &MessageParser) -> Option<LeanCopy<'r>> {
        // offsets in mail-parser are u32
        if u32::try_from(raw.len()).is_err() {
            return None;
        }
        let skips = skippable_bodies(raw, parser);
        if skips.is_empty() {
            return None;
        }
        let removed: usize = skips.iter().map(|s| s.range.len()).sum();
        let mut bytes = Vec::with_capacity(raw.len() - removed);
        let mut holes = Vec::with_capacity(skips.len());
        let mut text_removed = 0;
        let mut from = 0;
        for Skip { range: r, kind } in skips {
            // strictly apart: two holes at one offset would be explained by one part
            if r.start <= from || r.is_empty() {
                return None;
            }
            if let Skipped::Text { .. } = kind {
                text_removed += r.len();
            }
            bytes.extend_from_slice(raw.get(from..r.start)?);
            holes.push((bytes.len(), kind));
            from = r.end;
        }
        bytes.extend_from_slice(raw.get(from..)?);
        Some(LeanCopy {
            bytes,
            holes,
            text_removed,
        })
    }

    /// The bytes to parse.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The text of the `text/plain` part whose body was removed at `at` in `bytes()`, decoded
    /// from the original (meaningful once `explains` holds).
    pub(super) fn text_at(&self, at: usize) -> Option<&str> {
        let i = self.holes.binary_search_by_key(&at, |(o, _)| *o).ok()?;
        match &self.holes[i].1 {
            Skipped::Text { text, .. } => Some(text),
            _ => None,
        }
    }

    /// How many bytes of text/plain bodies the copy leaves to `plain_text`; the rest of what it
    /// removed is never decoded at all.
    pub(super) fn text_removed(&self) -> usize {
        self.text_removed
    }

    /// Whether `msg`, the parse of `bytes()`, shows that each removed body belonged to a part
    /// `normalize` does not read, of the kind the pre-scan took it for, and that no boundary could
    /// have matched across a hole (see the module doc).
    pub(super) fn explains(&self, msg: &Message<'_>) -> bool {
        let mut binary_bodies: Vec<usize> = msg
            .parts
            .iter()
            .filter(|p| {
                p.encoding == Encoding::Base64
                    && !p.is_encoding_problem
                    && matches!(p.body, PartType::Binary(_) | PartType::InlineBinary(_))
            })
            .map(|p| p.offset_body as usize)
            .collect();
        binary_bodies.sort_unstable();
        self.holes.iter().all(|(at, kind)| match kind {
            Skipped::Base64 => binary_bodies.binary_search(at).is_ok(),
            Skipped::Html { boundary, encoding } => unread_html_at(msg, *at, boundary, *encoding),
            Skipped::Text {
                boundary, encoding, ..
            } => plain_text_at(msg, *at, boundary.as_deref(), *encoding),
        }) && !any_boundary_has_newline(msg)
    }
}

/// The part of `msg` whose body starts at offset `at` and is of the kind `is_kind` accepts, when
/// it was decoded without a problem from `encoding` and is a direct child of a multipart with
/// `boundary` (a `multipart/alternative` when `alternative`).
fn leaf_at(
    msg: &Message<'_>,
    at: usize,
    boundary: &[u8],
    encoding: Encoding,
    alternative: bool,
    is_kind: impl Fn(&PartType<'_>) -> bool,
) -> Option<usize> {
    let id = msg
        .parts
        .iter()
        .position(|p| p.offset_body as usize == at && is_kind(&p.body))?;
    let part = &msg.parts[id];
    if part.is_encoding_problem || part.encoding != encoding {
        return None;
    }
    msg.parts
        .iter()
        .any(|parent| {
            matches!(&parent.body, PartType::Multipart(ids) if ids.iter().any(|&c| c as usize == id))
                && parent
                    .headers
                    .header_value(&HeaderName::ContentType)
                    .and_then(HeaderValue::as_content_type)
                    .is_some_and(|ct| {
                        ct.ctype().eq_ignore_ascii_case("multipart")
                            && (!alternative
                                || ct
                                    .subtype()
                                    .is_some_and(|s| s.eq_ignore_ascii_case("alternative")))
                            && ct.attribute("boundary").map(str::as_bytes) == Some(boundary)
                    })
        })
        .then_some(id)
}

/// Whether `msg` has, at body offset `at`, an HTML part decoded without a problem from
/// `encoding`, which `normalize` does not read (not a text body), and which is a direct child of
/// a `multipart/alternative` with `boundary`.
fn unread_html_at(msg: &Message<'_>, at: usize, boundary: &[u8], encoding: Encoding) -> bool {
    leaf_at(msg, at, boundary, encoding, true, |b| {
        matches!(b, PartType::Html(_))
    })
    .is_some_and(|id| !msg.text_body.iter().any(|&t| t as usize == id))
}

/// Whether `msg` has, at body offset `at`, a text part decoded without a problem from
/// `encoding`, without a charset decoder (so mail-parser reads it as lossy UTF-8, as
/// `plain_text` does), and a direct child of a multipart with `boundary`, or with no boundary
/// the message's root part (which mail-parser reads to the end).
fn plain_text_at(
    msg: &Message<'_>,
    at: usize,
    boundary: Option<&[u8]>,
    encoding: Encoding,
) -> bool {
    let is_text = |b: &PartType<'_>| matches!(b, PartType::Text(_));
    let id = match boundary {
        Some(boundary) => leaf_at(msg, at, boundary, encoding, false, is_text),
        None => msg.parts.first().and_then(|root| {
            (root.offset_body as usize == at
                && is_text(&root.body)
                && !root.is_encoding_problem
                && root.encoding == encoding)
                .then_some(0)
        }),
    };
    id.is_some_and(|id| {
        !has_charset_decoder(msg.parts[id].headers.header_value(&HeaderName::ContentType))
    })
}

/// Whether mail-parser decodes a text part with this `Content-Type` through a charset decoder
/// (UTF-8, an unknown charset and none have none: those are read as lossy UTF-8).
fn has_charset_decoder(content_type: Option<&HeaderValue<'_>>) -> bool {
    content_type
        .and_then(HeaderValue::as_content_type)
        .and_then(|ct| ct.attribute("charset"))
        .and_then(|c| charset_decoder(c.as_bytes()))
        .is_some()
}

/// Whether any part, nested messages included, declares a boundary containing `\n`.
fn any_boundary_has_newline(msg: &Message<'_>) -> bool {
    // a loop, not recursion: nesting depth is the sender's choice
    let mut todo = vec![msg];
    while let Some(m) = todo.pop() {
        for part in &m.parts {
            let ct = part
                .headers
                .header_value(&HeaderName::ContentType)
                .and_then(HeaderValue::as_content_type);
            if ct
                .and_then(|ct| ct.attribute("boundary"))
                .is_some_and(|b| b.contains('\n'))
            {
                return true;
            }
            if let PartType::Message(inner) = &part.body {
                todo.push(inner);
            }
        }
    }
    false
}

/// An open multipart in the pre-scan.
struct Open {
    /// Finds `--` + its boundary (built once per multipart, not once per part).
    delimiter: memmem::Finder<'static>,
    /// multipart/digest: parts without a type are messages.
    digest: bool,
    /// multipart/alternative.
    alternative: bool,
    /// A plain-text leaf was among its parts so far (then mail-parser does not read an HTML
    /// sibling as the text; `explains` checks it).
    has_plain: bool,
}

/// The leaf bodies the full parse can skip, ascending. Follows mail-parser 0.11's `parse_` loop
/// and stops (keeping what it found so far) wherever it would have to guess.
pub(super) fn skippable_bodies<'r>(raw: &'r [u8], parser: &MessageParser) -> Vec<Skip<'r>> {
    let mut found = Vec::new();
    // the open multiparts, innermost last
    let mut open: Vec<Open> = Vec::new();
    let mut pos = 0;
    'parts: while open.len() <= MAX_DEPTH {
        let Some(body) = body_start(raw, pos) else {
            break;
        };
        let head = raw.get(pos..body).and_then(|h| parser.parse_headers(h));
        let headers = head
            .as_ref()
            .and_then(|m| m.parts.first())
            .map(|p| &p.headers);
        let ct: Option<&ContentType<'_>> = headers
            .and_then(|h| h.header_value(&HeaderName::ContentType))
            .and_then(HeaderValue::as_content_type);
        let encoding =
            match headers.and_then(|h| h.header_value(&HeaderName::ContentTransferEncoding)) {
                Some(HeaderValue::Text(e)) if e.eq_ignore_ascii_case("base64") => Encoding::Base64,
                Some(HeaderValue::Text(e)) if e.eq_ignore_ascii_case("quoted-printable") => {
                    Encoding::QuotedPrintable
                }
                _ => Encoding::None,
            };
        let ctype = ct.map(|c| c.ctype());
        let is = |t: &str| ctype.is_some_and(|c| c.eq_ignore_ascii_case(t));
        let subtype_is = |t: &str| {
            ct.and_then(|c| c.subtype())
                .is_some_and(|s| s.eq_ignore_ascii_case(t))
        };

        if is("multipart")
            && let Some(b) = ct.and_then(|c| c.attribute("boundary"))
            && !b.is_empty()
        {
            let delimiter = memmem::Finder::new(&[b"--", b.as_bytes()].concat()).into_owned();
            if let Some(i) = find(raw, body, &delimiter) {
                pos = skip_crlf(raw, i + delimiter.needle().len());
                open.push(Open {
                    delimiter,
                    digest: subtype_is("digest"),
                    alternative: subtype_is("alternative"),
                    has_plain: false,
                });
                continue;
            }
            // mail-parser reads a multipart without its boundary as one text leaf
        }
        let in_digest = open.last().is_some_and(|o| o.digest);
        let message = match ctype {
            Some(_) => {
                is("message")
                    && ct.and_then(|c| c.subtype()).is_some_and(|s| {
                        s.eq_ignore_ascii_case("rfc822") || s.eq_ignore_ascii_case("global")
                    })
            }
            None => in_digest,
        };
        if message && encoding == Encoding::None {
            // a message inline in the stream, parsed by rules of its own: not followed here
            break;
        }
        // untyped is text/plain outside a digest (a digest's were taken for messages above)
        let plain = (ctype.is_none() || is("text") && subtype_is("plain"))
            && matches!(encoding, Encoding::QuotedPrintable | Encoding::None)
            && !has_charset_decoder(headers.and_then(|h| h.header_value(&HeaderName::ContentType)));
        // a leaf; at the top level it is the message's only part and runs to the end, so nothing
        // follows it
        let Some(parent) = open.last_mut() else {
            if plain
                && body < raw.len()
                && let Some(text) = plain_text::decode(&raw[body..], encoding, false)
            {
                found.push(Skip {
                    range: body..raw.len(),
                    kind: Skipped::Text {
                        boundary: None,
                        encoding,
                        text,
                    },
                });
            }
            break;
        };
        let html = parent.alternative
            && parent.has_plain
            && is("text")
            && subtype_is("html")
            && matches!(encoding, Encoding::QuotedPrintable | Encoding::None);
        if parent.alternative && (ctype.is_none() || is("text") && subtype_is("plain")) {
            parent.has_plain = true;
        }
        let delimiter = &parent.delimiter;
        let blankable = encoding == Encoding::Base64
            && ctype.is_some()
            && !is("text")
            && !is("message")
            && !is("multipart");
        let run_end = if blankable {
            base64_run_end(raw, body)
        } else {
            body
        };
        let end = if blankable
            && raw
                .get(run_end..)
                .is_some_and(|r| r.starts_with(delimiter.needle()))
        {
            if run_end > body {
                found.push(Skip {
                    range: body..run_end,
                    kind: Skipped::Base64,
                });
            }
            run_end
        } else {
            // every decoder, and its fallback on a decoding error, ends a part at the first
            // delimiter after the body start; none found ends the parse
            let Some(i) = find(raw, body, delimiter) else {
                break;
            };
            let decodes = encoding == Encoding::None
                || raw.get(body..i).is_some_and(quoted_printable_decodes);
            if html && i > body && decodes {
                found.push(Skip {
                    range: body..i,
                    kind: Skipped::Html {
                        boundary: delimiter.needle()[2..].to_vec(),
                        encoding,
                    },
                });
            } else if plain
                && i > body
                && let Some(text) = raw
                    .get(body..i)
                    .and_then(|r| plain_text::decode(r, encoding, true))
            {
                found.push(Skip {
                    range: body..i,
                    kind: Skipped::Text {
                        boundary: Some(delimiter.needle()[2..].to_vec()),
                        encoding,
                        text,
                    },
                });
            }
            i
        };
        pos = end + delimiter.needle().len();
        // mail-parser's `is_multipart_end`, repeated while multiparts close
        loop {
            match (raw.get(pos), raw.get(pos + 1)) {
                (Some(b'\r'), Some(b'\n')) => pos += 2,
                (Some(b'-'), Some(b'-')) => {
                    pos += 2;
                    open.pop();
                    // the enclosing multipart goes on at its next delimiter; at the top, the
                    // parse ends
                    let Some(parent) = open.last() else {
                        break 'parts;
                    };
                    match find(raw, pos, &parent.delimiter) {
                        Some(i) => {
                            pos = i + parent.delimiter.needle().len();
                            continue;
                        }
                        None => break 'parts,
                    }
                }
                (Some(b'\n'), _) => pos += 1,
                (Some(a), _) if a.is_ascii_whitespace() => pos = skip_crlf(raw, pos + 1),
                _ => {}
            }
            break;
        }
    }
    found
}

/// Whether mail-parser's quoted-printable decoder reads `body`, a part's body up to the delimiter
/// that ends it, without an error. Its only error is a `=` met inside an escape: after `=` with
/// nothing but spaces, tabs, form feeds and CRs since, or after `=` and a hex digit with nothing
/// but CRs and LFs since (its LF ends only the first state, as a soft line break).
fn quoted_printable_decodes(body: &[u8]) -> bool {
    let mut i = 0;
    while let Some(at) = body.get(i..).and_then(|rest| memchr::memchr(b'=', rest)) {
        i += at + 1;
        // inside an escape: after `=`, or after `=` and one hex digit
        let mut digit = false;
        while let Some(&c) = body.get(i) {
            i += 1;
            match c {
                b'=' => return false,
                b'\n' if !digit => break,
                b'\n' | b'\r' => {}
                b' ' | b'\t' | 0x0c if !digit => {}
                c if !digit && HEX_MAP[usize::from(c)] != -1 => digit = true,
                _ => break,
            }
        }
    }
    true
}

/// The first occurrence of the finder's needle at or after `from`.
fn find(raw: &[u8], from: usize, needle: &memmem::Finder<'_>) -> Option<usize> {
    needle.find(raw.get(from..)?).map(|i| from + i)
}

/// mail-parser's `skip_crlf`: spaces, tabs and CRs, then at most one LF.
fn skip_crlf(raw: &[u8], mut pos: usize) -> usize {
    while let Some(&c) = raw.get(pos) {
        match c {
            b'\r' | b' ' | b'\t' => pos += 1,
            b'\n' => return pos + 1,
            _ => break,
        }
    }
    pos
}

/// Where the body of the part whose headers start at `pos` begins: after the first empty line,
/// which mail-parser's header parser ends on. None when there is none.
fn body_start(raw: &[u8], pos: usize) -> Option<usize> {
    let mut i = pos;
    // no headers at all: whitespace, then the line end
    while let Some(&c) = raw.get(i) {
        if c == b'\n' {
            return Some(i + 1);
        }
        if !c.is_ascii_whitespace() {
            break;
        }
        i += 1;
    }
    loop {
        let lf = i + memchr::memchr(b'\n', raw.get(i..)?)?;
        match (raw.get(lf + 1), raw.get(lf + 2)) {
            (Some(b'\n'), _) => return Some(lf + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(lf + 3),
            (None, _) => return None,
            _ => i = lf + 1,
        }
    }
}

/// Whether mail-parser's base64 decoder consumes `b` without error and without it possibly
/// starting a boundary delimiter.
#[inline(always)]
fn base64_body_byte(b: u8) -> bool {
    // non-short-circuit `|` so the chunk loop below vectorizes
    ((b | 0x20).wrapping_sub(b'a') < 26)
        | (b.wrapping_sub(b'0') < 10)
        | (b == b'+')
        | (b == b'/')
        | (b == b'=')
        | (b == b' ')
        | (b == b'\t')
        | (b == b'\r')
        | (b == b'\n')
}

/// The end of the run of `base64_body_byte`s starting at `from`.
fn base64_run_end(raw: &[u8], from: usize) -> usize {
    let rest = raw.get(from..).unwrap_or_default();
    let mut done = 0;
    for chunk in rest.chunks_exact(64) {
        if !chunk.iter().fold(true, |ok, &b| ok & base64_body_byte(b)) {
            break;
        }
        done += 64;
    }
    let tail = rest.get(done..).unwrap_or_default();
    from + done
        + tail
            .iter()
            .position(|&b| !base64_body_byte(b))
            .unwrap_or(tail.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> MessageParser {
        MessageParser::new()
            .with_mime_headers()
            .default_header_raw()
    }

    /// The bodies left undecoded (attachments, HTML halves).
    fn regions(raw: &[u8]) -> Vec<&str> {
        skippable_bodies(raw, &parser())
            .into_iter()
            .filter(|s| !matches!(s.kind, Skipped::Text { .. }))
            .map(|s| std::str::from_utf8(&raw[s.range]).unwrap())
            .collect()
    }

    /// The text/plain bodies left to `plain_text`, with their decoded text.
    fn text_regions(raw: &[u8]) -> Vec<(&str, String)> {
        skippable_bodies(raw, &parser())
            .into_iter()
            .filter_map(|s| match s.kind {
                Skipped::Text { text, .. } => Some((
                    std::str::from_utf8(&raw[s.range]).unwrap(),
                    text.into_owned(),
                )),
                _ => None,
            })
            .collect()
    }

    const PDF: &str = "JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSL0ZpbHRlci9GbGF0ZURl\r\nY29kZT4+CnN0cmVhbQp4nDPQM1Qo5ypUMFAwALJMLY0UzE0sFYpSuZxCuAz1zBWMDCx0TSyNLBWS\r\n";

    fn mixed(boundary: &str, parts: &[&str]) -> String {
        let mut m = format!(
            "From: a@x.test\r\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\npreamble\r\n"
        );
        for p in parts {
            m += &format!("--{boundary}\r\n{p}");
        }
        m + &format!("--{boundary}--\r\n")
    }

    fn attachment(ctype: &str, body: &str) -> String {
        format!("Content-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n\r\n{body}")
    }

    fn alternative(boundary: &str, plain: &str, html_cte: &str, html: &str) -> String {
        format!(
            "From: a@x.test\r\nContent-Type: multipart/alternative; boundary=\"{boundary}\"\r\n\r\n\
--{boundary}\r\n{plain}\
--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: {html_cte}\r\n\r\n\
{html}\r\n--{boundary}--\r\n"
        )
    }

    const PLAIN: &str = "Content-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n";

    #[test]
    fn skips_the_html_half_of_an_alternative() {
        for cte in ["quoted-printable", "7bit", "8bit"] {
            let html = "<p>hello=20there, a=3Db --not-it</p>=\r\n<p>more</p>";
            let raw = alternative("=_b-1", PLAIN, cte, html);
            // up to the delimiter's first `-`: the line end before it goes too
            assert_eq!(regions(raw.as_bytes()), [format!("{html}\r\n")], "{cte}");
            let p = parser();
            let lean = LeanCopy::new(raw.as_bytes(), &p).unwrap();
            assert!(lean.explains(&p.parse(lean.bytes()).unwrap()), "{cte}");
        }
    }

    #[test]
    fn keeps_html_that_is_read_or_fails_to_decode() {
        // no plain sibling: the HTML is the text
        let raw = alternative("b", "", "quoted-printable", "<p>only</p>");
        assert!(regions(raw.as_bytes()).is_empty());
        // base64 HTML is text, never skipped as an attachment either
        let raw = alternative("b", PLAIN, "base64", "PHA+aGk8L3A+");
        assert!(regions(raw.as_bytes()).is_empty());
        // the decoder's errors: `=` right after `=`, after `=` and blanks, after `=X` and a line end
        for html in ["a==b", "a= =b", "a=A\r\n=41", "a=\r=b"] {
            let raw = alternative("b", PLAIN, "quoted-printable", html);
            assert!(regions(raw.as_bytes()).is_empty(), "{html:?}");
        }
        // never closed: the decoder fails at the end
        let raw = format!(
            "From: a@x\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n{PLAIN}--b\r\n\
Content-Type: text/html\r\n\r\n<p>cut"
        );
        assert!(regions(raw.as_bytes()).is_empty());
    }

    #[test]
    fn an_html_part_outside_an_alternative_is_kept() {
        let raw = mixed(
            "b1",
            &[PLAIN, "Content-Type: text/html\r\n\r\n<p>x</p>\r\n"],
        );
        assert!(regions(raw.as_bytes()).is_empty());
    }

    #[test]
    fn a_lean_copy_with_another_boundary_is_not_explained() {
        let raw = alternative("b1", PLAIN, "7bit", "<p>x</p>");
        let p = parser();
        let lean = LeanCopy::new(raw.as_bytes(), &p).unwrap();
        // same length, another boundary: the hole no longer ends where the pre-scan ended it
        let other = String::from_utf8(lean.bytes().to_vec())
            .unwrap()
            .replace("b1", "c2");
        assert!(!lean.explains(&p.parse(&other).unwrap()));
    }

    /// mail-parser's own quoted-printable decoder on `body` followed by the delimiter of `b`:
    /// whether it ends at the delimiter without an error.
    ///
    /// `body` comes after three plain bytes, which change no verdict (they leave the decoder in
    /// its plain state, and none is a `-`). Without them, a body that decodes to nothing but ends
    /// in a soft line break (`=\n`) makes the decoder subtract past zero when it trims the line
    /// end before the delimiter: a panic in debug builds, a no-op in release ones. The
    /// pre-scan's verdict matches the release behaviour, which is what runs.
    fn mail_parser_decodes(body: &[u8]) -> bool {
        let mut bytes = b"xyz".to_vec();
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(b"--b--\r\n");
        let mut stream = mail_parser::parsers::MessageStream::new(&bytes);
        stream.decode_quoted_printable_mime(b"b").0 != usize::MAX
    }

    #[test]
    fn quoted_printable_verdicts_are_the_decoders() {
        for body in [
            &b""[..],
            b"plain",
            b"a=3Db",
            b"soft=\r\nbreak",
            b"soft=\nbreak",
            b"a==b",
            b"a= =b",
            b"a=\t\x0c=b",
            b"a=A=b",
            b"a=A\r\n=b",
            b"a=A\nB",
            b"a=G=b",
            b"a=-=b",
            b"end=",
            b"end=A",
            b"a=\r=",
            b"x-=y",
        ] {
            assert_eq!(
                quoted_printable_decodes(body),
                mail_parser_decodes(body),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_quoted_printable_verdict_is_the_decoders(body in "[=A3g \t\r\n\x0c-]{0,24}") {
            proptest::prop_assert_eq!(
                quoted_printable_decodes(body.as_bytes()),
                mail_parser_decodes(body.as_bytes())
            );
        }
    }

    #[test]
    fn decodes_text_plain_parts_itself() {
        let qp = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
caf=C3=A9 au lait,=\r\n soft break\r\n";
        let raw = mixed(
            "b1",
            &[
                qp,
                "Content-Type: text/plain\r\n\r\nno charset, no encoding\r\n",
                "Content-Type: text/plain; charset=x-unknown\r\nContent-Transfer-Encoding: 8bit\r\n\r\nna\u{ef}ve\r\n",
            ],
        );
        assert_eq!(
            text_regions(raw.as_bytes()),
            [
                (
                    "caf=C3=A9 au lait,=\r\n soft break\r\n",
                    "caf\u{e9} au lait, soft break".to_string()
                ),
                (
                    "no charset, no encoding\r\n",
                    "no charset, no encoding".into()
                ),
                ("na\u{ef}ve\r\n", "na\u{ef}ve".into()),
            ]
        );
        let p = parser();
        let lean = LeanCopy::new(raw.as_bytes(), &p).unwrap();
        let msg = p.parse(lean.bytes()).unwrap();
        assert!(lean.explains(&msg));
        let first = msg.text_body[0] as usize;
        assert_eq!(
            lean.text_at(msg.parts[first].offset_body as usize),
            Some("caf\u{e9} au lait, soft break")
        );
        // the same bytes with a charset mail-parser decodes itself (same length) are not explained
        let latin = String::from_utf8(lean.bytes().to_vec())
            .unwrap()
            .replace("charset=utf-8", "charset=cp850");
        assert!(!lean.explains(&p.parse(&latin).unwrap()));
    }

    #[test]
    fn decodes_a_message_that_is_one_text_part() {
        // the body runs to the end, line end included; untyped is text/plain
        for (raw, text) in [
            (
                "From: a@x\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\nline  \r\n",
                "caf\u{e9}\r\nline\r\n",
            ),
            ("From: a@x\r\n\r\nhello\r\n", "hello\r\n"),
        ] {
            let found = text_regions(raw.as_bytes());
            assert_eq!(found.len(), 1, "{raw:?}");
            assert_eq!(found[0].1, text, "{raw:?}");
            let p = parser();
            let lean = LeanCopy::new(raw.as_bytes(), &p).unwrap();
            assert!(lean.bytes().ends_with(b"\r\n\r\n"));
            let msg = p.parse(lean.bytes()).unwrap();
            assert!(lean.explains(&msg), "{raw:?}");
            assert_eq!(lean.text_at(msg.parts[0].offset_body as usize), Some(text));
        }
        // an escape open at the end, a charset with its own decoder: left to mail-parser
        for raw in [
            "From: a@x\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nend=",
            "From: a@x\r\nContent-Type: text/plain; charset=koi8-r\r\n\r\nhello\r\n",
        ] {
            assert!(text_regions(raw.as_bytes()).is_empty(), "{raw:?}");
        }
    }

    #[test]
    fn leaves_other_text_plain_parts_to_mail_parser() {
        for part in [
            // a charset with a decoder of its own
            "Content-Type: text/plain; charset=iso-8859-1\r\n\r\ncaf\u{e9}\r\n",
            "Content-Type: text/plain; charset=US-ASCII\r\n\r\nplain\r\n",
            // base64 text
            "Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\naGk=\r\n",
            // a quoted-printable error, an escape cut by the delimiter
            "Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\na==b\r\n",
            "Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nend=A",
            // not text/plain
            "Content-Type: text/csv\r\n\r\na,b\r\n",
        ] {
            let raw = mixed("b1", &[part]);
            assert!(text_regions(raw.as_bytes()).is_empty(), "{part:?}");
        }
        // a message that is one part of another kind
        let raw = "From: a@x\r\nContent-Type: text/html\r\n\r\n<p>hello</p>\r\n";
        assert!(text_regions(raw.as_bytes()).is_empty());
        // never closed: the part runs to the end
        let raw = "From: a@x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
Content-Type: text/plain\r\n\r\ncut";
        assert!(text_regions(raw.as_bytes()).is_empty());
    }

    #[test]
    fn blanks_a_base64_attachment() {
        let raw = mixed(
            "b1",
            &[
                "Content-Type: text/plain\r\n\r\nhello\r\n",
                &attachment("application/pdf; name=a.pdf", PDF),
            ],
        );
        assert_eq!(regions(raw.as_bytes()), [PDF]);
    }

    #[test]
    fn keeps_text_and_untyped_base64_parts() {
        let body = "aGVsbG8=\r\n";
        let raw = mixed(
            "b1",
            &[
                &attachment("text/plain; charset=utf-8", body),
                &attachment("TEXT/html", body),
                &format!("Content-Transfer-Encoding: base64\r\n\r\n{body}"),
                &attachment("message/rfc822", body),
                &attachment("image/png", body),
            ],
        );
        assert_eq!(regions(raw.as_bytes()), [body]);
    }

    #[test]
    fn keeps_a_body_that_is_not_pure_base64() {
        let raw = mixed("b1", &[&attachment("application/pdf", "AAAA*AAAA\r\n")]);
        assert!(regions(raw.as_bytes()).is_empty());
    }

    #[test]
    fn follows_nested_multiparts() {
        let inner = "Content-Type: multipart/alternative; boundary=\"in\"\r\n\r\n\
--in\r\nContent-Type: text/plain\r\n\r\nplain\r\n\
--in\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--in--\r\n\r\n";
        let raw = mixed(
            "out",
            &[
                inner,
                &attachment("application/zip", PDF),
                &attachment("image/png", "iVBORw0KGgo=\r\n"),
            ],
        );
        // the nested alternative's HTML half too
        assert_eq!(
            regions(raw.as_bytes()),
            ["<p>html</p>\r\n", PDF, "iVBORw0KGgo=\r\n"]
        );
    }

    #[test]
    fn missing_closing_boundary_keeps_what_ends_at_a_delimiter() {
        // the last part never meets a delimiter: mail-parser flags it, so it must stay
        let raw = format!(
            "From: a@x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n{}--b\r\n{}",
            attachment("application/pdf", PDF),
            attachment("application/pdf", PDF)
        );
        assert_eq!(regions(raw.as_bytes()), [PDF]);
    }

    #[test]
    fn a_boundary_inside_a_text_part_ends_that_part() {
        // mail-parser matches `--b` anywhere, so the text part ends mid-line and the "attachment"
        // headers that follow belong to a part of its own
        let raw = mixed(
            "b",
            &[
                "Content-Type: text/plain\r\n\r\nsee x--b\r\nContent-Type: application/pdf\r\n\
Content-Transfer-Encoding: base64\r\n\r\nQUJD\r\n",
                &attachment("application/pdf", PDF),
            ],
        );
        assert_eq!(regions(raw.as_bytes()), ["QUJD\r\n", PDF]);
    }

    #[test]
    fn stops_at_an_inline_message() {
        let raw = mixed(
            "b",
            &[
                "Content-Type: message/rfc822\r\n\r\nFrom: c@x\r\n\r\nhi\r\n",
                &attachment("application/pdf", PDF),
            ],
        );
        assert!(regions(raw.as_bytes()).is_empty());
    }

    #[test]
    fn base64_byte_set_is_the_decoders() {
        for b in 0..=255u8 {
            let expected = b.is_ascii_alphanumeric() || b"+/= \t\r\n".contains(&b);
            assert_eq!(base64_body_byte(b), expected, "{b:#x}");
        }
        let long = "QUJD".repeat(40) + "-";
        assert_eq!(base64_run_end(long.as_bytes(), 0), 160);
        assert_eq!(base64_run_end(long.as_bytes(), 161), 161);
    }

    #[test]
    fn body_start_follows_the_header_parser() {
        assert_eq!(body_start(b"A: b\r\n\r\nx", 0), Some(8));
        assert_eq!(body_start(b"A: b\n\nx", 0), Some(6));
        assert_eq!(body_start(b"\r\nx", 0), Some(2));
        assert_eq!(body_start(b"A: b\r\n c\r\n\r\nx", 0), Some(12));
        assert_eq!(body_start(b"A: b\r\n", 0), None);
    }

    #[test]
    fn the_lean_copy_is_explained_by_its_parse() {
        let raw = mixed(
            "b1",
            &[
                "Content-Type: text/plain\r\n\r\nhello\r\n",
                &attachment("application/pdf", PDF),
            ],
        );
        let p = parser();
        let lean = LeanCopy::new(raw.as_bytes(), &p).unwrap();
        assert_eq!(
            lean.bytes().len(),
            raw.len() - PDF.len() - "hello\r\n".len()
        );
        assert_eq!(lean.text_removed(), "hello\r\n".len());
        let msg = p.parse(lean.bytes()).unwrap();
        assert!(lean.explains(&msg));
        // the same bytes with the part made text (same length, so the same offsets) do not
        let as_text = String::from_utf8(lean.bytes().to_vec())
            .unwrap()
            .replace("application/pdf", "text/xxxxxxxxxx");
        assert!(!lean.explains(&p.parse(&as_text).unwrap()));
    }
}
