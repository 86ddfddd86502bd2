//! A JSON document that borrows from the request body, for the presets' pointer lookups.
//!
//! Why not `serde_json::Value`: a `Value` copies every string and builds a `BTreeMap` per object,
//! then the preset reads a handful of fields and drops it all. On the webhook benchmark that
//! was ~10% of the daemon's CPU per request. A `Node` keeps unescaped strings as slices of the
//! body and objects as vectors in document order.
//!
//! Semantics kept from `Value`, which the presets and their tests rely on:
//! - Parsing is serde_json's: the same syntax errors, UTF-8 checks and recursion limit (128), so
//!   a body nested 100,000 deep is still an error (stored as degraded), never a stack overflow.
//! - Duplicate keys: the last one wins (lookups search from the end).
//! - Numbers are `serde_json::Number`, so their text is what `Value` printed.
//! - [`Node::pointer`] follows RFC 6901 exactly as `Value::pointer` does.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

/// One JSON value; strings without escapes borrow from the body.
#[derive(Debug, Clone, PartialEq)]
pub enum Node<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as serde_json reads it.
    Number(Number),
    /// A string.
    String(Cow<'a, str>),
    /// An array.
    Array(Vec<Node<'a>>),
    /// An object's members in document order, duplicates included.
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
}

impl<'a> Node<'a> {
    /// Parses a whole body (trailing non-whitespace is an error, as with `serde_json::from_slice`).
    pub fn parse(body: &'a [u8]) -> serde_json::Result<Node<'a>> {
        serde_json::from_slice(body)
    }

    /// The member named `key` of an object (the last one if repeated).
    pub fn get(&self, key: &str) -> Option<&Node<'a>> {
        match self {
            Node::Object(members) => members.iter().rev().find(|(k, _)| k == key).map(|m| &m.1),
            _ => None,
        }
    }

    /// The value at an RFC 6901 JSON pointer (`""` is the whole document).
    pub fn pointer(&self, pointer: &str) -> Option<&Node<'a>> {
        if pointer.is_empty() {
            return Some(self);
        }
        let rest = pointer.strip_prefix('/')?;
        rest.split('/').try_fold(self, |node, token| {
            let token = if token.contains('~') {
                Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
            } else {
                Cow::Borrowed(token)
            };
            match node {
                Node::Object(_) => node.get(&token),
                Node::Array(items) => array_index(&token).and_then(|i| items.get(i)),
                _ => None,
            }
        })
    }

    /// The text of a string node.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::String(s) => Some(s),
            _ => None,
        }
    }

    /// Whether this is an object.
    pub fn is_object(&self) -> bool {
        matches!(self, Node::Object(_))
    }
}

/// An array index token: digits only, no leading zero (RFC 6901 §4).
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
        return None;
    }
    token.parse().ok()
}

/// Compact JSON, members in document order (for presets that keep a sub-document as text).
impl fmt::Display for Node<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node<'de>, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node<'de>, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node<'de>, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node<'de>, E> {
        // As `Value`: a non-finite float (which serde_json's parser never yields) is null.
        Ok(Number::from_f64(v).map_or(Node::Null, Node::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Owned(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_none<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node<'de>, D::Error> {
        Node::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(Key(k)) = map.next_key()? {
            members.push((k, map.next_value()?));
        }
        Ok(Node::Object(members))
    }
}

/// An object key that borrows when it has no escapes (`Cow<str>`'s own impl always copies).
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

impl Serialize for Node<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Null => s.serialize_unit(),
            Node::Bool(b) => s.serialize_bool(*b),
            Node::Number(n) => n.serialize(s),
            Node::String(t) => s.serialize_str(t),
            Node::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Node::Object(members) => {
                let mut map = s.serialize_map(Some(members.len()))?;
                for (k, v) in members {
                    map.serialize_entry(k.as_ref(), v)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// Every pointer into `v`, including a few that lead nowhere.
    fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        out.push(format!("{at}/missing"));
        out.push(format!("{at}/0"));
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    let token = k.replace('~', "~0").replace('/', "~1");
                    pointers(child, format!("{at}/{token}"), out);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    pointers(child, format!("{at}/{i}"), out);
                }
                out.push(format!("{at}/01"));
                out.push(format!("{at}/+0"));
            }
            _ => {}
        }
    }

    /// Compares what a preset can observe of a node with the same lookup on `Value`.
    fn same(node: Option<&Node<'_>>, value: Option<&Value>) -> bool {
        match (node, value) {
            (None, None) => true,
            (Some(Node::Null), Some(Value::Null)) => true,
            (Some(Node::Bool(a)), Some(Value::Bool(b))) => a == b,
            (Some(Node::Number(a)), Some(Value::Number(b))) => a.to_string() == b.to_string(),
            (Some(Node::String(a)), Some(Value::String(b))) => a == b,
            (Some(Node::Array(a)), Some(Value::Array(b))) => a.len() == b.len(),
            (Some(Node::Object(_)), Some(Value::Object(_))) => true,
            _ => false,
        }
    }

    fn check_against_value(text: &str) {
        let value: Result<Value, _> = serde_json::from_str(text);
        let node = Node::parse(text.as_bytes());
        assert_eq!(
            value.is_ok(),
            node.is_ok(),
            "parse outcome differs for {text:?}"
        );
        let (Ok(value), Ok(node)) = (value, node) else {
            return;
        };
        let mut ps = Vec::new();
        pointers(&value, String::new(), &mut ps);
        for p in ps {
            assert!(
                same(node.pointer(&p), value.pointer(&p)),
                "pointer {p:?} differs in {text:?}"
            );
        }
    }

    #[test]
    fn lookups_agree_with_serde_json_value() {
        // Data-driven: escapes, duplicate keys (last wins), pointer escapes, big numbers, arrays.
        for text in [
            r#"{"a":1,"b":"x","c":{"d":[1,2,{"e":null}]}}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"a/b":{"m~n":"escaped key"},"":{"":"empty keys"}}"#,
            r#"{"s":"tab\tquote\"uni\u00e9","n":18446744073709551616,"f":1.5e300,"neg":-7}"#,
            r#"[0,[1,[2]],{"x":true}]"#,
            r#""just a string""#,
            r#"{"a":1} trailing"#,
            r#"{"a":"\ud800"}"#,
            "{\"a\":\"\u{e9}\"}",
        ] {
            check_against_value(text);
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(Node::parse(deep.as_bytes()).is_err());
        let ok = "[".repeat(100) + &"]".repeat(100);
        assert!(Node::parse(ok.as_bytes()).is_ok());
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        assert!(Node::parse(b"{\"a\":\"\xff\"}").is_err());
    }

    #[test]
    fn unescaped_strings_borrow_from_the_body() {
        let body = br#"{"plain":"abc","esc":"a\nb"}"#;
        let node = Node::parse(body).unwrap();
        assert!(matches!(
            node.get("plain"),
            Some(Node::String(Cow::Borrowed("abc")))
        ));
        assert!(matches!(node.get("esc"), Some(Node::String(Cow::Owned(s))) if s == "a\nb"));
        let Node::Object(members) = &node else {
            panic!("not an object")
        };
        assert!(matches!(members[0].0, Cow::Borrowed("plain")));
    }

    #[test]
    fn display_is_compact_json_in_document_order() {
        let node = Node::parse(br#"{ "z": 1, "a": [true, null, "q\""] }"#).unwrap();
        assert_eq!(node.to_string(), r#"{"z":1,"a":[true,null,"q\""]}"#);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e300f64..1e300).prop_map(Value::from),
            "[a-z~/\"\\\\\u{e9}\u{1F600} ]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(("[a-c~/]{0,3}", inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_document_reads_like_value(v in arb_json()) {
            check_against_value(&v.to_string());
        }

        #[test]
        fn any_bytes_parse_like_value(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let value: Result<Value, _> = serde_json::from_slice(&bytes);
            prop_assert_eq!(value.is_ok(), Node::parse(&bytes).is_ok());
        }
    }
}
