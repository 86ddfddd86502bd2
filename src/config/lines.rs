//! Line numbers for config field paths (`sources[0].imap.port` -> 14), from YAML parser events.
//!
//! The `config` crate's errors carry no positions, so the file is walked once with an event
//! parser and every mapping key and sequence item is recorded with its 1-based line.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

/// Field path -> 1-based line of the key (or list item) that starts it.
#[derive(Debug, Default, Clone)]
pub struct LineMap {
    lines: HashMap<String, usize>,
}

enum Frame {
    /// Inside a mapping: the path of the mapping and the key awaiting its value, if any.
    Map { path: String, key: Option<String> },
    /// Inside a sequence: the path and the index of the next item.
    Seq { path: String, next: usize },
}

impl LineMap {
    /// Parses `text`; a syntax error returns its line and message.
    pub fn build(text: &str) -> Result<LineMap, (usize, String)> {
        let mut map = LineMap::default();
        let mut stack: Vec<Frame> = Vec::new();
        for item in Parser::new_from_str(text) {
            let (event, span) = item.map_err(|e| (e.marker().line(), e.kind().to_string()))?;
            let line = span.start.line();
            match event {
                Event::Scalar(value, ..) => {
                    let is_key = matches!(stack.last(), Some(Frame::Map { key: None, .. }));
                    if is_key {
                        if let Some(Frame::Map { path, key }) = stack.last_mut() {
                            let full = join(path, &value);
                            map.lines.entry(full).or_insert(line);
                            *key = Some(value.to_string());
                        }
                    } else {
                        let child = child_path(&mut stack);
                        if let Some(child) = child {
                            map.lines.entry(child).or_insert(line);
                        }
                    }
                }
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    let child = if stack.is_empty() {
                        Some(String::new())
                    } else {
                        child_path(&mut stack)
                    };
                    // A complex key (a mapping used as a key) is not addressable; track it anyway.
                    let child = child.unwrap_or_else(|| "?".to_string());
                    if !child.is_empty() {
                        map.lines.entry(child.clone()).or_insert(line);
                    }
                    if matches!(event, Event::MappingStart(..)) {
                        stack.push(Frame::Map {
                            path: child,
                            key: None,
                        });
                    } else {
                        stack.push(Frame::Seq {
                            path: child,
                            next: 0,
                        });
                    }
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                Event::Alias(..) => {
                    child_path(&mut stack);
                }
                _ => {}
            }
        }
        Ok(map)
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path.to_string();
        loop {
            if let Some(l) = self.lines.get(&p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
            if p.is_empty() {
                return None;
            }
        }
    }
}

/// The path of the value that the current frame is about to receive, advancing the frame.
fn child_path(stack: &mut [Frame]) -> Option<String> {
    match stack.last_mut()? {
        Frame::Map { path, key } => {
            let k = key.take()?;
            Some(join(path, &k))
        }
        Frame::Seq { path, next } => {
            let p = format!("{path}[{next}]");
            *next += 1;
            Some(p)
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_get_lines() {
        let text = "timezone: UTC\nsources:\n  - name: a\n    imap:\n      host: h\n      port: x\n  - name: b\nchannels: []\n";
        let m = LineMap::build(text).unwrap();
        assert_eq!(m.line_of("timezone"), Some(1));
        assert_eq!(m.line_of("sources"), Some(2));
        assert_eq!(m.line_of("sources[0]"), Some(3));
        assert_eq!(m.line_of("sources[0].imap.port"), Some(6));
        assert_eq!(m.line_of("sources[1].name"), Some(7));
        assert_eq!(m.line_of("sources[1].webhook.auth"), Some(7));
        assert_eq!(m.line_of("channels"), Some(8));
    }

    #[test]
    fn syntax_errors_have_lines() {
        let err = LineMap::build("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.0 >= 2, "{err:?}");
    }
}
