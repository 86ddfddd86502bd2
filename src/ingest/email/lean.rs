//! The lean copy: a message without the bodies of its base64 attachments, which mail-parser would
//! otherwise decode only for `normalize` to throw them away (7.6% of `frontdesk sync`'s CPU on the
//! bench mailbox, plus the page faults of the decoded buffers).
//!
//! mail-parser 0.11 decodes every part and cannot be told not to. So a pre-scan walks the MIME
//! structure the way mail-parser's `parse_` loop does and picks the leaf parts whose bodies are safe
//! to drop; the full parse then runs on a copy without those bodies.
//!
//! Why the result equals the full parse of the original bytes. Every dropped body `R` starts where a
//! part's headers end (after a `\n`) and holds only the base64 alphabet, `=`, space, tab, CR and LF:
//! mail-parser's base64 decoder consumes all of those without error, and no boundary delimiter
//! (`--` + boundary) can start inside `R`, which has no `-`. Up to the start of `R` both parses read
//! the same bytes and nothing beyond them (the header parser stops on the blank line; boundary
//! look-aheads end before the part's headers), so they reach `R` in the same state; the decoder
//! then stops where it would have stopped without `R`, with the same verdict. After it, the bytes
//! are the same again. What differs is only the decoded bytes and the offsets of that binary part,
//! which `normalize` never reads. Two conditions make that hold, and `LeanCopy::explains` checks
//! them on the lean parse itself, so a pre-scan that misread the structure costs a second parse,
//! never a different `Message`:
//! - each dropped body is, in the lean parse, the body of a base64 part decoded without a problem
//!   into binary (not text, not a message);
//! - no boundary contains `\n`: the byte before each `R` is `\n`, so a boundary delimiter could
//!   otherwise straddle `R` and be found in one copy but not the other.

use std::ops::Range;

use mail_parser::{
    ContentType, Encoding, GetHeader, HeaderName, HeaderValue, Message, MessageParser, PartType,
};
use memchr::memmem;

/// Open multiparts beyond this depth end the walk (the rest is parsed whole): a bound on the work
/// and memory a hostile message can make the pre-scan spend.
const MAX_DEPTH: usize = 64;

/// A message with some attachment bodies removed, and where each removed body began.
pub(super) struct LeanCopy {
    bytes: Vec<u8>,
    /// Offsets in `bytes` where a removed body was, ascending.
    holes: Vec<usize>,
}

impl LeanCopy {
    /// The lean copy of `raw`, or None when there is nothing worth removing. `parser` must be the
    /// parser the lean copy is then parsed with, so both read the same part headers.
    pub(super) fn new(raw: &[u8], parser: &MessageParser) -> Option<LeanCopy> {
        // offsets in mail-parser are u32
        if u32::try_from(raw.len()).is_err() || !mentions_base64(raw) {
            return None;
        }
        let regions = skippable_bodies(raw, parser);
        if regions.is_empty() {
            return None;
        }
        let removed: usize = regions.iter().map(|r| r.len()).sum();
        let mut bytes = Vec::with_capacity(raw.len() - removed);
        let mut holes = Vec::with_capacity(regions.len());
        let mut from = 0;
        for r in regions {
            // strictly apart: two holes at one offset would be explained by one part
            if r.start <= from || r.is_empty() {
                return None;
            }
            bytes.extend_from_slice(raw.get(from..r.start)?);
            holes.push(bytes.len());
            from = r.end;
        }
        bytes.extend_from_slice(raw.get(from..)?);
        Some(LeanCopy { bytes, holes })
    }

    /// The bytes to parse.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether `msg`, the parse of `bytes()`, shows that each removed body belonged to a binary
    /// base64 part and that no boundary could have matched across a hole (see the module doc).
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
        self.holes
            .iter()
            .all(|h| binary_bodies.binary_search(h).is_ok())
            && !any_boundary_has_newline(msg)
    }
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

/// Whether `base64` appears in any case: a message without it has no base64 part, and most mail
/// skips the walk on this one scan.
fn mentions_base64(raw: &[u8]) -> bool {
    memmem::find_iter(raw, b"64").any(|i| {
        i >= 4
            && raw
                .get(i - 4..i)
                .is_some_and(|b| b.eq_ignore_ascii_case(b"base"))
    })
}

/// The byte ranges of leaf bodies the full parse can skip, ascending. Follows mail-parser 0.11's
/// `parse_` loop and stops (keeping what it found so far) wherever it would have to guess.
pub(super) fn skippable_bodies(raw: &[u8], parser: &MessageParser) -> Vec<Range<usize>> {
    let mut found = Vec::new();
    // the open multiparts, innermost last: `--boundary` and whether it is multipart/digest
    let mut open: Vec<(Vec<u8>, bool)> = Vec::new();
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

        if is("multipart")
            && let Some(b) = ct.and_then(|c| c.attribute("boundary"))
            && !b.is_empty()
        {
            let delimiter = [b"--", b.as_bytes()].concat();
            if let Some(i) = find(raw, body, &delimiter) {
                pos = skip_crlf(raw, i + delimiter.len());
                let digest = ct
                    .and_then(|c| c.subtype())
                    .is_some_and(|s| s.eq_ignore_ascii_case("digest"));
                open.push((delimiter, digest));
                continue;
            }
            // mail-parser reads a multipart without its boundary as one text leaf
        }
        let in_digest = open.last().is_some_and(|(_, d)| *d);
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
        // a leaf; at the top level it runs to the end, so nothing follows it
        let Some((delimiter, _)) = open.last() else {
            break;
        };
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
        let end = if blankable && raw.get(run_end..).is_some_and(|r| r.starts_with(delimiter)) {
            if run_end > body {
                found.push(body..run_end);
            }
            run_end
        } else {
            // every decoder, and its fallback on a decoding error, ends a part at the first
            // delimiter after the body start; none found ends the parse
            match find(raw, body, delimiter) {
                Some(i) => i,
                None => break,
            }
        };
        pos = end + delimiter.len();
        // mail-parser's `is_multipart_end`, repeated while multiparts close
        loop {
            match (raw.get(pos), raw.get(pos + 1)) {
                (Some(b'\r'), Some(b'\n')) => pos += 2,
                (Some(b'-'), Some(b'-')) => {
                    pos += 2;
                    open.pop();
                    // the enclosing multipart goes on at its next delimiter; at the top, the
                    // parse ends
                    let Some((parent, _)) = open.last() else {
                        break 'parts;
                    };
                    match find(raw, pos, parent) {
                        Some(i) => {
                            pos = i + parent.len();
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

/// The first occurrence of `needle` at or after `from`.
fn find(raw: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    memmem::find(raw.get(from..)?, needle).map(|i| from + i)
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

    fn regions(raw: &[u8]) -> Vec<&str> {
        skippable_bodies(raw, &parser())
            .into_iter()
            .map(|r| std::str::from_utf8(&raw[r]).unwrap())
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
        assert_eq!(regions(raw.as_bytes()), [PDF, "iVBORw0KGgo=\r\n"]);
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
        assert_eq!(lean.bytes().len(), raw.len() - PDF.len());
        let msg = p.parse(lean.bytes()).unwrap();
        assert!(lean.explains(&msg));
        // the same bytes with the part made text (same length, so the same offsets) do not
        let as_text = String::from_utf8(lean.bytes().to_vec())
            .unwrap()
            .replace("application/pdf", "text/xxxxxxxxxx");
        assert!(!lean.explains(&p.parse(&as_text).unwrap()));
    }
}
