//! The parameters a train declares it takes: a JSON Schema in its manifest (`[params] schema`),
//! which the data owner sees at review and which an approval can bind runs to.
//!
//! A closed subset of JSON Schema (draft 2020-12 keywords, no references): `type`,
//! `properties`, `required`, `additionalProperties`, `items`, `enum`, `const`, `minimum`,
//! `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `minLength`, `maxLength`, `minItems`,
//! `maxItems`, and the annotations `title`, `description`, `default`, `examples`, `$comment`,
//! `$schema`. Any other keyword makes the schema invalid: an approval must never rest on a
//! keyword the station silently ignores (a full validator ignores unknown keywords). That, and
//! a validator with no remote references, formats or regular expressions to trust, is why the
//! station has its own small validator rather than a general one.

use serde_json::Value;

/// Deepest nesting of schemas.
const MAX_DEPTH: usize = 16;

const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$comment",
    "$schema",
];
const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
];
const TYPES: &[&str] = &[
    "null", "boolean", "object", "array", "number", "integer", "string",
];

/// Check that `schema` uses only the supported subset, and is well formed.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    check_at(schema, "", 0)
}

fn check_at(schema: &Value, at: &str, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{at}: schemas nested deeper than {MAX_DEPTH}"));
    }
    let obj = match schema {
        Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        _ => return Err(format!("{at}: a schema is an object or a boolean")),
    };
    for (k, v) in obj {
        let here = format!("{at}/{k}");
        if ANNOTATIONS.contains(&k.as_str()) {
            continue;
        }
        if !KEYWORDS.contains(&k.as_str()) {
            return Err(format!(
                "{here}: keyword {k:?} is not supported (supported: {})",
                KEYWORDS.join(", ")
            ));
        }
        match k.as_str() {
            "type" => {
                let names: Vec<&Value> = match v {
                    Value::Array(a) => a.iter().collect(),
                    one => vec![one],
                };
                if names.is_empty()
                    || names
                        .iter()
                        .any(|n| !n.as_str().is_some_and(|n| TYPES.contains(&n)))
                {
                    return Err(format!("{here}: not a type or list of types"));
                }
            }
            "properties" => {
                let Value::Object(props) = v else {
                    return Err(format!("{here}: not an object"));
                };
                for (name, s) in props {
                    check_at(s, &format!("{here}/{name}"), depth + 1)?;
                }
            }
            "required" => {
                if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                    return Err(format!("{here}: not a list of names"));
                }
            }
            "additionalProperties" | "items" => check_at(v, &here, depth + 1)?,
            "enum" => {
                if !v.is_array() {
                    return Err(format!("{here}: not a list"));
                }
            }
            "const" => {}
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => {
                if !v.is_number() {
                    return Err(format!("{here}: not a number"));
                }
            }
            _ => {
                if v.as_u64().is_none() {
                    return Err(format!("{here}: not a non-negative integer"));
                }
            }
        }
    }
    Ok(())
}

/// Validate `instance` against `schema` (which [`check_schema`] accepted). The error names the
/// first place that does not match.
pub fn validate(schema: &Value, instance: &Value) -> Result<(), String> {
    validate_at(schema, instance, "", 0)
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::Number(_) => "number",
        Value::String(_) => "string",
    }
}

fn is_type(v: &Value, t: &str) -> bool {
    match t {
        "integer" => {
            v.as_f64()
                .is_some_and(|f| f.fract() == 0.0 && f.is_finite())
                || v.is_i64()
                || v.is_u64()
        }
        "number" => v.is_number(),
        other => type_of(v) == other,
    }
}

fn validate_at(schema: &Value, v: &Value, at: &str, depth: usize) -> Result<(), String> {
    let here = if at.is_empty() { "the parameters" } else { at };
    if depth > MAX_DEPTH {
        return Err(format!("{here}: nested deeper than the schema allows"));
    }
    let obj = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{here}: not allowed")),
        Value::Object(o) => o,
        _ => return Err(format!("{here}: the schema is not valid")),
    };
    if let Some(t) = obj.get("type") {
        let types: Vec<&str> = match t {
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            one => one.as_str().into_iter().collect(),
        };
        if !types.iter().any(|t| is_type(v, t)) {
            return Err(format!(
                "{here}: is {}, the schema wants {}",
                type_of(v),
                types.join(" or ")
            ));
        }
    }
    if let Some(Value::Array(options)) = obj.get("enum")
        && !options.contains(v)
    {
        return Err(format!("{here}: not one of the values the schema lists"));
    }
    if let Some(c) = obj.get("const")
        && c != v
    {
        return Err(format!("{here}: not the value the schema fixes"));
    }
    if let Some(x) = v.as_f64() {
        let bound = |k: &str| obj.get(k).and_then(Value::as_f64);
        let checks: [(&str, bool); 4] = [
            ("minimum", bound("minimum").is_some_and(|b| x < b)),
            ("maximum", bound("maximum").is_some_and(|b| x > b)),
            (
                "exclusiveMinimum",
                bound("exclusiveMinimum").is_some_and(|b| x <= b),
            ),
            (
                "exclusiveMaximum",
                bound("exclusiveMaximum").is_some_and(|b| x >= b),
            ),
        ];
        if let Some((k, _)) = checks.iter().find(|(_, broken)| *broken) {
            return Err(format!("{here}: {x} is outside the schema's {k}"));
        }
    }
    let count = |k: &str| obj.get(k).and_then(Value::as_u64);
    if let Some(s) = v.as_str() {
        let n = s.chars().count() as u64;
        if count("minLength").is_some_and(|m| n < m) || count("maxLength").is_some_and(|m| n > m) {
            return Err(format!(
                "{here}: a string of {n} characters, outside the schema's length"
            ));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if count("minItems").is_some_and(|m| n < m) || count("maxItems").is_some_and(|m| n > m) {
            return Err(format!("{here}: {n} items, outside the schema's bounds"));
        }
        if let Some(item_schema) = obj.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate_at(item_schema, item, &format!("{at}[{i}]"), depth + 1)?;
            }
        }
    }
    if let Some(fields) = v.as_object() {
        if let Some(Value::Array(required)) = obj.get("required") {
            for r in required.iter().filter_map(Value::as_str) {
                if !fields.contains_key(r) {
                    return Err(format!("{here}: {r:?} is required"));
                }
            }
        }
        let props = obj.get("properties").and_then(Value::as_object);
        for (name, value) in fields {
            let path = format!("{at}.{name}");
            match props.and_then(|p| p.get(name)) {
                Some(s) => validate_at(s, value, &path, depth + 1)?,
                None => {
                    if let Some(extra) = obj.get("additionalProperties") {
                        validate_at(extra, value, &path, depth + 1)?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "tables": {"type": "array", "items": {"enum": ["modality", "roi"]}, "maxItems": 2},
                "steps": {"type": "integer", "minimum": 1, "maximum": 1000},
                "rate": {"type": "number", "exclusiveMinimum": 0},
                "name": {"type": "string", "maxLength": 8}
            },
            "required": ["steps"],
            "additionalProperties": false,
            "description": "annotations are fine"
        })
    }

    #[test]
    fn valid_and_invalid_parameters() {
        let s = schema();
        check_schema(&s).unwrap();
        for ok in [
            json!({"steps": 10}),
            json!({"steps": 1000, "tables": ["roi"], "rate": 0.1, "name": "abc"}),
            json!({"steps": 3.0}),
        ] {
            validate(&s, &ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, needle) in [
            (json!({}), "required"),
            (json!({"steps": 0}), "minimum"),
            (json!({"steps": 2.5}), "integer"),
            (json!({"steps": 1, "patient": "4f2a"}), "not allowed"),
            (json!({"steps": 1, "tables": ["age"]}), "values"),
            (
                json!({"steps": 1, "tables": ["roi", "roi", "roi"]}),
                "items",
            ),
            (json!({"steps": 1, "rate": 0}), "exclusiveMinimum"),
            (json!({"steps": 1, "name": "much too long"}), "length"),
            (json!([1]), "object"),
        ] {
            let e = validate(&s, &bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn schemas_outside_the_subset_are_refused() {
        for bad in [
            json!({"pattern": "^a"}),
            json!({"$ref": "#/x"}),
            json!({"properties": {"a": {"format": "email"}}}),
            json!({"type": "float"}),
            json!({"minimum": "1"}),
            json!({"anyOf": [true]}),
            json!(3),
        ] {
            assert!(check_schema(&bad).is_err(), "{bad}");
        }
        let mut deep = json!(true);
        for _ in 0..20 {
            deep = json!({"items": deep});
        }
        assert!(check_schema(&deep).is_err());
    }
}
