//! Everything a bundle carries is written by whoever made it: the parsers and the checks must
//! refuse, never panic. Arbitrary bytes, and structure-aware mutations of valid inputs (a
//! signed bundle, an envelope, a manifest), through every entry point a station or the CLI
//! uses on them. The seeds are made here, so the corpus is this file.

use amicus_bundle::dsse::{Envelope, EnvelopeSignature};
use amicus_bundle::{Bundle, Manifest, SecretKey, TrustedKey, sha256};
use proptest::prelude::*;

const MANIFEST: &str = r#"
capabilities = ["cohort"]

[train]
name = "t"
version = "1.0"
description = "a train"

[limits]
fuel = 1000
memory_mib = 16
wall_seconds = 5

[[outputs]]
name = "summary.json"
kind = "statistics"
max_bytes = 1024

[params]
schema = '{"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}'
"#;

fn signed_bundle() -> (Vec<u8>, SecretKey) {
    let key = SecretKey::generate().unwrap();
    let m = Manifest::parse_source(MANIFEST).unwrap();
    let mut b = Bundle::create(
        m,
        vec![("train.wasm".into(), b"\0asm\x0d\0\x01\0".to_vec())],
    )
    .unwrap();
    b.sign(&key, "author");
    (b.to_bytes(), key)
}

/// Every use a station makes of a bundle that parsed.
fn exercise(b: &Bundle, key: &SecretKey) {
    let trusted = [TrustedKey {
        name: "alice".into(),
        key: key.public(),
    }];
    let check = b.check_signatures(&trusted, 1);
    let _ = check.refusal();
    for s in &check.signers {
        let _ = amicus_bundle::text::short(&s.keyid, 16);
        let _ = amicus_bundle::text::shown(&s.role, 64);
    }
    let _ = b.subject_name();
    if let Some(p) = &b.manifest().params
        && let Ok(schema) = p.schema_json()
    {
        let _ = amicus_bundle::params::validate(&schema, &serde_json::json!({"n": 3}));
    }
}

#[test]
fn envelopes_with_hostile_key_ids_are_refused_cleanly() {
    let (bytes, key) = signed_bundle();
    let b = Bundle::from_reader(&bytes[..]).unwrap();
    let digest = b.digest();
    // Key ids that once panicked the station (byte slicing): non-ASCII, short, empty, escapes.
    for keyid in [
        "é",
        "ééééééééééééééééééé",
        "a",
        "",
        "\u{1b}[8m",
        "\u{202e}x",
        "k\n",
    ] {
        let mut env = amicus_bundle::dsse::sign(&key, &digest, "t@1.0", "author");
        env.signatures = vec![EnvelopeSignature {
            keyid: keyid.into(),
            sig: env.signatures[0].sig.clone(),
        }];
        let mut with = Bundle::create(
            b.manifest().clone(),
            vec![("train.wasm".into(), b.component().to_vec())],
        )
        .unwrap();
        with.attach(env);
        let round = Bundle::from_reader(&with.to_bytes()[..]);
        let b = round.as_ref().unwrap_or(&with);
        let check = b.check_signatures(
            &[TrustedKey {
                name: "alice".into(),
                key: key.public(),
            }],
            1,
        );
        assert!(check.refusal().is_some(), "{keyid:?} counted as trusted");
        exercise(b, &key);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn mutated_bundles_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..12)) {
        let (mut bytes, key) = signed_bundle();
        for (at, b) in flips {
            let i = at % bytes.len();
            bytes[i] = b;
        }
        if let Ok(b) = Bundle::from_reader(&bytes[..]) {
            exercise(&b, &key);
        }
    }

    #[test]
    fn truncated_bundles_never_panic(cut in 0usize..20_000) {
        let (bytes, key) = signed_bundle();
        let cut = cut % bytes.len();
        if let Ok(b) = Bundle::from_reader(&bytes[..cut]) {
            exercise(&b, &key);
        }
    }

    #[test]
    fn envelopes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), text in ".{0,200}") {
        let _ = Envelope::parse(&bytes);
        let json = format!(r#"{{"payloadType":"application/vnd.in-toto+json","payload":"{text}","signatures":[{{"keyid":"{text}","sig":"{text}"}}]}}"#);
        if let Ok(env) = Envelope::parse(json.as_bytes()) {
            let _ = env.statement_for(&sha256(b"x"));
        }
    }

    #[test]
    fn mutated_manifests_never_panic(at in any::<usize>(), with in ".{0,16}") {
        let mut text = MANIFEST.to_string();
        let mut i = at % text.len();
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        text.insert_str(i, &with);
        if let Ok(m) = Manifest::parse_source(&text) {
            let canonical = m.to_canonical();
            let _ = Manifest::parse_canonical(canonical.as_bytes());
        }
    }

    #[test]
    fn parameter_schemas_never_panic(schema in json_value(), instance in json_value()) {
        if amicus_bundle::params::check_schema(&schema).is_ok() {
            let _ = amicus_bundle::params::validate(&schema, &instance);
        }
    }
}

/// Arbitrary JSON, weighted towards the schema keywords.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just("object".to_string()),
            Just("integer".to_string()),
            Just("string".to_string()),
            ".{0,8}"
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just("type".to_string()),
                        Just("properties".to_string()),
                        Just("items".to_string()),
                        Just("required".to_string()),
                        Just("enum".to_string()),
                        Just("maximum".to_string()),
                        Just("additionalProperties".to_string()),
                        ".{0,6}"
                    ],
                    inner
                ),
                0..4
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}
