//! Form bodies as name/value pairs: `application/x-www-form-urlencoded` and the text parts of
//! `multipart/form-data`. Both are bounded by a field count so a hostile body cannot blow up memory.
//!
//! File parts of a multipart body are skipped, never written anywhere: their names are client text.

/// Why a form body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldsError {
    /// More fields than the limit.
    #[error("more than {0} form fields")]
    TooMany(usize),
    /// The multipart structure is broken.
    #[error("malformed multipart body: {0}")]
    Multipart(&'static str),
}

/// The `boundary` parameter of a `multipart/form-data` content type, if it is one.
pub fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    let kind = parts.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    for p in parts {
        let (k, v) = p.trim().split_once('=')?;
        if k.trim().eq_ignore_ascii_case("boundary") {
            let v = v.trim().trim_matches('"');
            if !v.is_empty() && v.len() <= 200 {
                return Some(v.to_string());
            }
        }
    }
    None
}

/// Decodes a urlencoded body into at most `max` pairs.
pub fn parse_urlencoded(body: &[u8], max: usize) -> Result<Vec<(String, String)>, FieldsError> {
    let mut out = Vec::new();
    for (k, v) in form_urlencoded::parse(body) {
        if out.len() >= max {
            return Err(FieldsError::TooMany(max));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

/// Reads the text parts (no `filename`) of a multipart body into at most `max` pairs.
pub fn parse_multipart(
    body: &[u8],
    boundary: &str,
    max: usize,
) -> Result<Vec<(String, String)>, FieldsError> {
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let mut out = Vec::new();
    let mut pos = find(body, delim, 0).ok_or(FieldsError::Multipart("no opening boundary"))?;
    let mut parts = 0usize;
    loop {
        pos += delim.len();
        if body[pos..].starts_with(b"--") {
            return Ok(out);
        }
        parts += 1;
        if parts > max {
            return Err(FieldsError::TooMany(max));
        }
        pos = skip_line_end(body, pos);
        let head_end = find(body, b"\r\n\r\n", pos)
            .ok_or(FieldsError::Multipart("part without headers end"))?;
        let head = &body[pos..head_end];
        let content_start = head_end + 4;
        let next = find(body, delim, content_start)
            .ok_or(FieldsError::Multipart("part without closing boundary"))?;
        // The CRLF before the boundary belongs to the boundary.
        let content_end = if next >= 2 && &body[next - 2..next] == b"\r\n" {
            next - 2
        } else {
            next
        };
        let content = &body[content_start..content_end.max(content_start)];
        if let Some(name) = disposition_name(head) {
            out.push((name, String::from_utf8_lossy(content).into_owned()));
        }
        pos = next;
    }
}

/// The `name` of a part's Content-Disposition, or `None` for file parts and unnamed parts.
fn disposition_name(head: &[u8]) -> Option<String> {
    let head = String::from_utf8_lossy(head);
    for line in head.split("\r\n") {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if !k.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        let mut name = None;
        for param in v.split(';').skip(1) {
            let Some((pk, pv)) = param.trim().split_once('=') else {
                continue;
            };
            let pv = pv.trim().trim_matches('"').to_string();
            match pk.trim().to_ascii_lowercase().as_str() {
                "name" => name = Some(pv),
                "filename" => return None,
                _ => {}
            }
        }
        return name;
    }
    None
}

fn skip_line_end(body: &[u8], pos: usize) -> usize {
    if body[pos..].starts_with(b"\r\n") {
        pos + 2
    } else if body[pos..].starts_with(b"\n") {
        pos + 1
    } else {
        pos
    }
}

/// The first index of `needle` in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() || needle.is_empty() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_from_content_type() {
        assert_eq!(
            multipart_boundary("multipart/form-data; boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(
            multipart_boundary("Multipart/Form-Data;charset=x; boundary=Q").as_deref(),
            Some("Q")
        );
        assert_eq!(multipart_boundary("application/json"), None);
    }

    #[test]
    fn multipart_text_parts_and_files_skipped() {
        let body = b"preamble\r\n--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\none\r\n--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"../../etc/passwd\"\r\nContent-Type: text/plain\r\n\r\nroot\r\n--B\r\nContent-Disposition: form-data; name=\"b\"\r\n\r\ntwo\r\nlines\r\n--B--\r\n";
        let got = parse_multipart(body, "B", 10).unwrap();
        assert_eq!(
            got,
            vec![
                ("a".to_string(), "one".to_string()),
                ("b".to_string(), "two\r\nlines".to_string())
            ]
        );
        assert_eq!(parse_multipart(body, "B", 2), Err(FieldsError::TooMany(2)));
        assert!(parse_multipart(b"--B\r\nbroken", "B", 10).is_err());
        assert!(parse_multipart(b"--B", "B", 10).is_err());
    }

    #[test]
    fn urlencoded_bounded() {
        let body = "a=1&".repeat(100_000);
        assert_eq!(
            parse_urlencoded(body.as_bytes(), 1000),
            Err(FieldsError::TooMany(1000))
        );
        assert_eq!(
            parse_urlencoded(b"x=%2B1&y=a+b", 10).unwrap(),
            vec![("x".into(), "+1".into()), ("y".into(), "a b".into())]
        );
    }
}
