//! Finds every unknown key at once by walking the loaded values against the derived JSON Schema.
//!
//! serde's `deny_unknown_fields` stops at the first unknown key of a struct and hides the type
//! errors after it; this walk reports them all (with a did-you-mean) and removes them, so that
//! decoding then reports the remaining type errors too.

use serde_json::Value as Json;

use super::{Ctx, suggest};

/// Reports and strips unknown keys below `value`, whose schema is `schema` (resolved in `root`).
pub(crate) fn strip_unknown(
    value: &mut config::Value,
    schema: &Json,
    root: &Json,
    path: &str,
    ctx: &mut Ctx,
) {
    let schema = resolve(schema, root);
    match &mut value.kind {
        config::ValueKind::Table(map) => {
            let Some(obj_schema) = object_schema(schema, root) else {
                return;
            };
            let props = obj_schema.get("properties").and_then(Json::as_object);
            let closed = obj_schema.get("additionalProperties") == Some(&Json::Bool(false));
            let extra = obj_schema
                .get("additionalProperties")
                .filter(|v| v.is_object());
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match props.and_then(|p| p.get(&key)) {
                    Some(child_schema) => {
                        if let Some(v) = map.get_mut(&key) {
                            strip_unknown(v, child_schema, root, &child_path, ctx);
                        }
                    }
                    None if closed => {
                        let known: Vec<&str> = props
                            .map(|p| p.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        let fix = match suggest(&key, known.iter().copied()) {
                            Some(m) => format!("did you mean `{m}`?"),
                            None => format!("known keys here: {}", known.join(", ")),
                        };
                        ctx.problem(&child_path, format!("unknown key `{key}`"), Some(fix));
                        map.remove(&key);
                    }
                    None => {
                        if let (Some(s), Some(v)) = (extra, map.get_mut(&key)) {
                            strip_unknown(v, s, root, &child_path, ctx);
                        }
                    }
                }
            }
        }
        config::ValueKind::Array(items) => {
            let Some(item_schema) = array_items(schema, root) else {
                return;
            };
            for (i, v) in items.iter_mut().enumerate() {
                strip_unknown(v, item_schema, root, &format!("{path}[{i}]"), ctx);
            }
        }
        _ => {}
    }
}

fn resolve<'a>(schema: &'a Json, root: &'a Json) -> &'a Json {
    let mut s = schema;
    for _ in 0..8 {
        match s.get("$ref").and_then(Json::as_str) {
            Some(r) => {
                let name = r.trim_start_matches("#/$defs/");
                match root.get("$defs").and_then(|d| d.get(name)) {
                    Some(next) => s = next,
                    None => return s,
                }
            }
            None => return s,
        }
    }
    s
}

/// The branch of a (possibly `anyOf`) schema that describes an object.
fn object_schema<'a>(schema: &'a Json, root: &'a Json) -> Option<&'a Json> {
    let schema = resolve(schema, root);
    if schema.get("properties").is_some() || schema.get("additionalProperties").is_some() {
        return Some(schema);
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = schema.get(key).and_then(Json::as_array) {
            for b in branches {
                if let Some(found) = object_schema(b, root) {
                    return Some(found);
                }
            }
        }
    }
    None
}

/// The item schema of a (possibly `anyOf`) array schema.
fn array_items<'a>(schema: &'a Json, root: &'a Json) -> Option<&'a Json> {
    let schema = resolve(schema, root);
    if let Some(items) = schema.get("items") {
        return Some(items);
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = schema.get(key).and_then(Json::as_array) {
            for b in branches {
                if let Some(found) = array_items(b, root) {
                    return Some(found);
                }
            }
        }
    }
    None
}
