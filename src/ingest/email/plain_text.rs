//! mail-parser 0.11's decoding of a `text/plain` body, reproduced byte for byte but a run of
//! bytes at a time. Its quoted-printable decoder pushes the output one byte at a time, and its
//! UTF-8 step goes through `from_utf8_lossy`'s chunk iterator: together ~8% of `frontdesk sync`'s
//! CPU on the bench mailbox, where most text parts are in a multipart and a third are
//! quoted-printable.
//!
//! Only the cases the lean pre-scan meets are covered: a body that a boundary delimiter ends, or
//! the body of a message that is one text part, with no charset decoder (UTF-8, an unknown
//! charset or none, all read as lossy UTF-8). Where the outcome is not certain (a decoding error,
//! an escape left open at the end, a trim past the start), the answer is None and mail-parser
//! decodes the part itself. The differential tests
//! below and the `email_normalize_lean` fuzz target hold this to mail-parser's own decoders.

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};

use mail_parser::Encoding;
use mail_parser::decoders::quoted_printable::HEX_MAP;
use mail_parser::parsers::MessageStream;

/// The text mail-parser gives a `text/plain` part without a charset decoder whose body is
/// `body`: with `delimited`, the bytes from the body start up to, not including, the first
/// delimiter of the enclosing multipart's boundary; without, the rest of a message that is one
/// text part. None when it cannot say for sure.
pub(super) fn decode(body: &[u8], encoding: Encoding, delimited: bool) -> Option<Cow<'_, str>> {
    match encoding {
        Encoding::None if delimited => Some(lossy(without_line_end(body))),
        Encoding::None => Some(lossy(body)),
        Encoding::QuotedPrintable => {
            let bytes = quoted_printable(body, delimited)?;
            Some(Cow::Owned(match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            }))
        }
        Encoding::Base64 => None,
    }
}

/// `String::from_utf8_lossy`, through the faster validation when the bytes are valid.
fn lossy(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// An undecoded body as mail-parser's `mime_part` ends it: without the line end before the
/// delimiter, when the delimiter starts a line.
fn without_line_end(body: &[u8]) -> &[u8] {
    match body {
        [rest @ .., b'\r', b'\n'] | [rest @ .., b'\n'] => rest,
        _ => body,
    }
}

/// Whether mail-parser's quoted-printable decoder counts `b` as a blank to drop before a line
/// end (ASCII whitespace other than CR and LF).
fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | 0x0c)
}

/// mail-parser's `decode_quoted_printable_mime` on `body`, followed by a delimiter when
/// `delimited`: its state machine, with runs of plain bytes copied whole. None on its decoding
/// error, on an escape left open at the end, and where its final trim would go past the start (a
/// panic in debug builds, a no-op in release ones: not worth reproducing).
fn quoted_printable(body: &[u8], delimited: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len());
    // the line end it writes: CRLF from the first CR anywhere on, LF before
    let mut crlf = false;
    // blanks pushed as they were since the last other byte: dropped at a hard line end
    let mut blanks = 0;
    let line_end = |out: &mut Vec<u8>, blanks: &mut usize, crlf: bool| {
        out.truncate(out.len() - *blanks);
        out.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        *blanks = 0;
    };
    let mut i = 0;
    while i < body.len() {
        // a run without `=`, CR or LF is pushed as it is; of its blanks, only the trailing ones
        // can be dropped
        let run_end = memchr::memchr3(b'=', b'\n', b'\r', &body[i..]).map_or(body.len(), |k| i + k);
        if run_end > i {
            let run = &body[i..run_end];
            let trailing = run.iter().rev().take_while(|&&b| is_blank(b)).count();
            blanks = if trailing == run.len() {
                blanks + trailing
            } else {
                trailing
            };
            out.extend_from_slice(run);
            i = run_end;
            continue;
        }
        match body[i] {
            b'\n' => line_end(&mut out, &mut blanks, crlf),
            b'\r' => crlf = true,
            b'=' => {
                // after `=`: blanks and CRs are passed over, LF is a soft line break, a hex digit
                // starts an escape, anything else is kept with the `=`
                let hex1 = loop {
                    i += 1;
                    match *body.get(i)? {
                        b'=' => return None,
                        b'\n' => {
                            blanks = 0;
                            break None;
                        }
                        b'\r' => crlf = true,
                        c if is_blank(c) => {}
                        c if HEX_MAP[usize::from(c)] != -1 => break Some(HEX_MAP[usize::from(c)]),
                        c => {
                            out.extend_from_slice(&[b'=', c]);
                            blanks = 0;
                            break None;
                        }
                    }
                };
                if let Some(hex1) = hex1 {
                    // after `=` and a hex digit: CRs and LFs do what they always do (an LF writes
                    // a line end), then the next byte completes the escape or is kept with the
                    // two before it
                    loop {
                        i += 1;
                        match *body.get(i)? {
                            b'=' => return None,
                            b'\n' => line_end(&mut out, &mut blanks, crlf),
                            b'\r' => crlf = true,
                            c => {
                                let hex2 = HEX_MAP[usize::from(c)];
                                if hex2 != -1 {
                                    out.push(((hex1 as u8) << 4) | hex2 as u8);
                                } else {
                                    out.extend_from_slice(&[b'=', body[i - 1], c]);
                                }
                                blanks = 0;
                                break;
                            }
                        }
                    }
                }
            }
            // memchr3 stops only at the three above
            _ => {}
        }
        i += 1;
    }
    // at a delimiter that starts a line, the decoder drops as many bytes as its line end has,
    // whatever they are
    if delimited && body.last() == Some(&b'\n') {
        let keep = out.len().checked_sub(if crlf { 2 } else { 1 })?;
        out.truncate(keep);
    }
    Some(out)
}

/// How `decode` and mail-parser's own decoder disagree on `body` (for the tests and the fuzz
/// harness), or None when they agree or `decode` declines. When `delimited`, `body` is followed by
/// the delimiter of boundary `b`, and a body where that delimiter occurs earlier is not a body and
/// gives None.
pub(super) fn disagreement(body: &[u8], encoding: Encoding, delimited: bool) -> Option<String> {
    let mut bytes = body.to_vec();
    let boundary: &[u8] = if delimited { b"b" } else { b"" };
    if delimited {
        bytes.extend_from_slice(b"--b--\r\n");
        if memchr::memmem::find(&bytes, b"--b") != Some(body.len()) {
            return None;
        }
    }
    let ours = decode(body, encoding, delimited)?;
    // a panic is its trim past the start, in debug builds
    let theirs = catch_unwind(AssertUnwindSafe(|| {
        let mut stream = MessageStream::new(&bytes);
        let (end, decoded) = match encoding {
            Encoding::QuotedPrintable => stream.decode_quoted_printable_mime(boundary),
            _ => stream.mime_part(boundary),
        };
        // its text step for a part without a charset decoder
        (end != usize::MAX).then(|| String::from_utf8_lossy(&decoded).into_owned())
    }));
    match theirs {
        Ok(Some(theirs)) if theirs == ours => None,
        theirs => Some(format!(
            "{encoding:?} {:?} (delimited: {delimited}): ours {ours:?}, mail-parser's {theirs:?}",
            String::from_utf8_lossy(body)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ours and mail-parser's agree on `body`, followed by a delimiter and as a whole message's.
    fn agree(body: &[u8], encoding: Encoding) -> Result<(), String> {
        [true, false]
            .into_iter()
            .find_map(|delimited| disagreement(body, encoding, delimited))
            .map_or(Ok(()), Err)
    }

    #[test]
    fn quoted_printable_is_mail_parsers() {
        for body in [
            &b""[..],
            b"plain text\r\n",
            b"caf=C3=A9 and =E2=82=AC\r\nsecond line\r\n",
            b"soft=\r\nbreak\r\n",
            b"soft=\nbreak",
            b"trailing blanks  \t\r\nnext",
            b"encoded blank=20\r\n",
            b"=\t \r\nafter blanks",
            b"=G1 kept",
            b"=AZ kept",
            b"=A\r\nB",
            b"=A\r\n1",
            b"lf only\nthen\r\ncr\n",
            b"x\r\n",
            b"\n",
            b"=\n",
            b"a\x0c\x0c\n",
            b"\xff\xfe not utf-8 =FF\r\n",
        ] {
            agree(body, Encoding::QuotedPrintable).unwrap();
        }
        // the cases that must decode, not just agree when they do
        for body in [
            &b"plain\r\n"[..],
            b"caf=C3=A9\r\n",
            b"soft=\r\nbreak\r\n",
            b"=A\r\nB",
        ] {
            assert!(
                decode(body, Encoding::QuotedPrintable, true).is_some(),
                "{body:?}"
            );
        }
    }

    #[test]
    fn quoted_printable_declines_what_it_cannot_be_sure_of() {
        // decoding errors, an escape open at the delimiter, a trim past the start
        for body in [&b"a==b"[..], b"a=A=b", b"end=", b"end=A", b"=\r\n", b"=\n"] {
            assert_eq!(
                decode(body, Encoding::QuotedPrintable, true),
                None,
                "{body:?}"
            );
        }
    }

    #[test]
    fn undecoded_is_mail_parsers() {
        for body in [
            &b""[..],
            b"x",
            b"line\r\n",
            b"line\n",
            b"\r\n",
            b"\n",
            b"\r",
            b"two\r\n\r\n",
            b"mid-line end",
            b"\xc3\x28 bad utf-8\r\n",
        ] {
            agree(body, Encoding::None).unwrap();
            assert!(decode(body, Encoding::None, true).is_some());
        }
    }

    proptest::proptest! {
        /// Wherever ours decodes, it is what mail-parser decodes, over the bytes its state
        /// machine treats apart (no `-`: a delimiter inside the body would end it earlier).
        #[test]
        fn any_quoted_printable_body_is_mail_parsers(body in proptest::collection::vec(
            proptest::sample::select(b"=Aa3gZ \t\x0c\r\n\xc3\xa9\xff.".to_vec()), 0..40)
        ) {
            agree(&body, Encoding::QuotedPrintable).map_err(proptest::test_runner::TestCaseError::fail)?;
        }

        /// Text without `=` always decodes.
        #[test]
        fn quoted_printable_without_escapes_decodes(body in "[a-z \t\r\n\u{e9}]{0,60}") {
            agree(body.as_bytes(), Encoding::QuotedPrintable).map_err(proptest::test_runner::TestCaseError::fail)?;
            proptest::prop_assert!(decode(body.as_bytes(), Encoding::QuotedPrintable, true).is_some());
        }

        /// The undecoded body is mail-parser's for any bytes without `-`.
        #[test]
        fn any_undecoded_body_is_mail_parsers(body in proptest::collection::vec(
            proptest::sample::select(b"ab \r\n\xc3\xa9\xff".to_vec()), 0..40)
        ) {
            agree(&body, Encoding::None).map_err(proptest::test_runner::TestCaseError::fail)?;
        }
    }
}
