//! Event decoding and field extraction (`decode::Decoder::decode`, `Field`, `Event::
//! write_enriched`) held to serde_json on arbitrary bytes.
//!
//! The first byte picks the decoder's limits (depth and line length, some tiny so the limits are
//! hit often); the rest is the line. Checked, beyond "no panic":
//! - the cheap rejections are exact: a line over the limit is `TooLong`, a blank one `Empty`, one
//!   not starting with '{' (after JSON whitespace) `NotObject`;
//! - a decoded line is an object serde_json accepts (but for numbers too large for an f64, which
//!   JSON allows and serde_json refuses), and `raw()` is the line without its framing whitespace;
//! - serde_json accepting an object within the limits, with no key twice in any object, implies
//!   the decoder accepts it;
//! - every extracted `Field` is the value serde_json finds at its path: `raw_json` re-parses to
//!   it, `key_bytes` is the unescaped text (or the number's text, or true/false), `as_i64` and
//!   `as_f64` agree with std's parse of the number text;
//! - `write_enriched` yields JSON equal to the input with `_session` replaced, the member last
//!   (the output decodes again and ends with it), appended after what `out` held;
//! - decoding is stateless: the same line decodes the same after another line was decoded.

#![no_main]

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;

use libfuzzer_sys::fuzz_target;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use sessionizer::decode::{DecodeError, Decoder, Event, Field, FieldId, FieldTable};

/// Top-level and nested paths, a path inside another, the `_session` member, escaped and
/// non-ASCII keys, and a literal key with a dot (never matched: dots separate segments).
const PATHS: &[&str] = &[
    "user",
    "ts",
    "ctx.device.id",
    "ctx",
    "ctx.device",
    "type",
    "page",
    "price",
    "_session",
    "a.b.c",
    "k\"q",
    "é",
    "user",
];

/// (json_depth_max, line_bytes_max) pairs: the shipped defaults, and small ones.
const LIMITS: &[(u32, usize)] = &[
    (32, 65_536),
    (64, 1 << 20),
    (1, 4096),
    (2, 4096),
    (3, 64),
    (8, 48),
    (4, 16),
    (100, 4096),
];

const MEMBER: &[u8] = br#""_session":{"id":"0123456789abcdef","n":2}"#;

thread_local! {
    /// One decoder per limit pair, built once: a shard too keeps its decoder for every line, and
    /// reuse across runs is part of what is checked (scratch left over from an earlier line).
    static DECODERS: RefCell<Vec<Decoder>> = RefCell::new(
        LIMITS
            .iter()
            .map(|&(depth_max, line_bytes_max)| {
                let paths: Vec<String> = PATHS.iter().map(|p| p.to_string()).collect();
                let table = FieldTable::new(&paths).expect("the fuzz paths are valid");
                Decoder::new(table, depth_max, line_bytes_max)
            })
            .collect(),
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, line)) = data.split_first() else {
        return;
    };
    let which = usize::from(sel) % LIMITS.len();
    let (depth_max, line_bytes_max) = LIMITS[which];
    DECODERS.with_borrow_mut(|d| check(&mut d[which], line, depth_max, line_bytes_max));
});

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [c, rest @ ..] = s {
        if !is_ws(*c) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., c] = s {
        if !is_ws(*c) {
            break;
        }
        s = rest;
    }
    s
}

/// What a decode produced, owned, to compare two decodes of the same line.
#[derive(Debug, PartialEq)]
enum Outcome {
    Err(DecodeError),
    Ok {
        raw: Vec<u8>,
        fields: Vec<String>,
        enriched: Vec<u8>,
    },
}

fn outcome(dec: &mut Decoder, line: &[u8]) -> Outcome {
    match dec.decode(line) {
        Err(e) => Outcome::Err(e),
        Ok(ev) => {
            let fields = (0..PATHS.len())
                .map(|id| format!("{:?}", ev.get(id as FieldId)))
                .collect();
            let mut enriched = Vec::new();
            ev.write_enriched(MEMBER, &mut enriched);
            Outcome::Ok {
                raw: ev.raw().to_vec(),
                fields,
                enriched,
            }
        }
    }
}

fn check(dec: &mut Decoder, line: &[u8], depth_max: u32, line_bytes_max: usize) {
    let first = outcome(dec, line);
    let trimmed = trim(line);

    // Cheap rejections, exactly.
    if line.len() > line_bytes_max {
        assert_eq!(first, Outcome::Err(DecodeError::TooLong));
        return;
    }
    if trimmed.is_empty() {
        assert_eq!(first, Outcome::Err(DecodeError::Empty));
        return;
    }
    if trimmed[0] != b'{' {
        assert_eq!(first, Outcome::Err(DecodeError::NotObject));
        return;
    }

    let loose = serde_json::from_slice::<Value>(line);
    let strict = serde_json::from_slice::<Strict>(line);
    let out_of_range = |e: &serde_json::Error| e.to_string().contains("number out of range");

    match &first {
        Outcome::Err(e) => {
            // serde_json accepting a duplicate-free object within the limits means we must too.
            if let Ok(Strict(v)) = &strict {
                assert!(
                    !(v.is_object() && depth(v) <= depth_max as usize),
                    "decoder rejects ({e:?}) a valid object serde_json accepts: {:?}",
                    String::from_utf8_lossy(line)
                );
            }
        }
        Outcome::Ok { raw, .. } => {
            assert_eq!(raw.as_slice(), trimmed, "raw() is the line without framing");
            match &loose {
                Ok(v) => assert!(v.is_object(), "decoded a non-object"),
                Err(e) => assert!(
                    out_of_range(e),
                    "decoder accepts what serde_json rejects ({e}): {:?}",
                    String::from_utf8_lossy(line)
                ),
            }
        }
    }

    // Field-level and splice checks on the accepted line.
    if let Ok(ev) = dec.decode(line) {
        let parsed = match &strict {
            Ok(Strict(v)) => Some(v),
            // With a key twice, serde_json keeps the last and the decoder may have extracted
            // another; compare the fields only on duplicate-free lines.
            Err(_) => None,
        };
        check_fields(&ev, parsed);
        check_enriched(dec, line, loose.as_ref().ok());
    }

    // Statelessness: another line in between changes nothing.
    let _ = dec.decode(br#"{"user":"other","ctx":{"device":{"id":"x\u00e9"}},"_session":1}"#);
    assert_eq!(
        outcome(dec, line),
        first,
        "decode depends on the previous line"
    );
}

fn check_fields(ev: &Event<'_>, parsed: Option<&Value>) {
    for (id, path) in PATHS.iter().enumerate() {
        let got = ev.get(id as FieldId);
        // Accessors never panic and agree with each other, whatever the line.
        let raw = got.raw_json();
        assert_eq!(raw.is_none(), got.is_missing());
        match got {
            Field::Missing => assert_eq!(got.key_bytes(), None),
            Field::Null | Field::Object(_) | Field::Array(_) => assert_eq!(got.key_bytes(), None),
            Field::Bool(b) => {
                let t: &[u8] = if b { b"true" } else { b"false" };
                assert_eq!(got.key_bytes(), Some(t));
                assert_eq!(raw, Some(t));
            }
            Field::Number(text) => {
                assert_eq!(got.key_bytes(), Some(text));
                assert_eq!(raw, Some(text));
                let s = std::str::from_utf8(text).expect("number text is ASCII");
                let f: f64 = s.parse().expect("number text parses as f64");
                assert_eq!(got.as_f64(), f.is_finite().then_some(f));
                let integral = !text.iter().any(|c| matches!(c, b'.' | b'e' | b'E'));
                let i = if integral {
                    s.parse::<i64>().ok()
                } else {
                    None
                };
                assert_eq!(got.as_i64(), i);
            }
            Field::String { raw: r, text } => {
                assert_eq!(got.key_bytes(), Some(text));
                assert_eq!(raw, Some(r));
                let unescaped: String =
                    serde_json::from_slice(r).expect("a string field's raw token is JSON");
                assert_eq!(unescaped.as_bytes(), text);
            }
        }
        if !matches!(got, Field::Number(_)) {
            assert_eq!(got.as_f64(), None);
            assert_eq!(got.as_i64(), None);
        }
        let Some(root) = parsed else { continue };
        let want = expected_at(root, path);
        match (raw, want) {
            (None, None) => {}
            (Some(raw), Some(want)) => {
                let reparsed: Value =
                    serde_json::from_slice(raw).unwrap_or_else(|e| panic!("path {path}: raw {e}"));
                assert_eq!(&reparsed, want, "path {path}");
                let kind_ok = matches!(
                    (got, want),
                    (Field::Null, Value::Null)
                        | (Field::Bool(_), Value::Bool(_))
                        | (Field::Number(_), Value::Number(_))
                        | (Field::String { .. }, Value::String(_))
                        | (Field::Object(_), Value::Object(_))
                        | (Field::Array(_), Value::Array(_))
                );
                assert!(kind_ok, "path {path}: {got:?} vs {want}");
            }
            (got, want) => panic!("path {path}: decoder {got:?}, serde_json {want:?}"),
        }
    }
}

fn check_enriched(dec: &mut Decoder, line: &[u8], loose: Option<&Value>) {
    let ev = dec.decode(line).expect("decoded just before");
    let mut out = b"prefix".to_vec();
    ev.write_enriched(MEMBER, &mut out);
    assert!(out.starts_with(b"prefix"), "write_enriched clears `out`");
    let out = out.split_off(6);
    let enriched = serde_json::from_slice::<Value>(&out);
    match (loose, &enriched) {
        (Some(input), Ok(got)) => {
            let mut want = input.clone();
            let obj = want.as_object_mut().expect("decoded lines are objects");
            obj.remove("_session");
            obj.insert(
                "_session".into(),
                serde_json::from_slice::<Value>(&MEMBER[11..]).expect("member value"),
            );
            assert_eq!(got, &want, "enriched {:?}", String::from_utf8_lossy(&out));
        }
        (_, Err(e)) if e.to_string().contains("number out of range") => {}
        (_, Err(e)) => panic!(
            "enriched output is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&out)
        ),
        (None, Ok(_)) => {}
    }
    // Our own output decodes again (same limits, if it still fits), with the member last.
    let again = dec.decode(&out);
    match again {
        Ok(e) => {
            let mut tail = MEMBER.to_vec();
            tail.push(b'}');
            assert!(e.raw().ends_with(&tail), "member not last");
        }
        Err(DecodeError::TooLong) | Err(DecodeError::TooDeep) => {}
        Err(e) => panic!(
            "enriched output does not decode ({e:?}): {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
}

fn expected_at<'v>(root: &'v Value, path: &str) -> Option<&'v Value> {
    let mut cur = root;
    for seg in path.split('.') {
        cur = cur.as_object()?.get(seg)?;
    }
    Some(cur)
}

/// Nesting depth counted as the decoder counts it: the top-level object is 1.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A serde_json value that fails to parse when any object holds a key twice.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(Strict(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut keys = BTreeSet::new();
        let mut m = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if !keys.insert(k.clone()) {
                return Err(de::Error::custom(format!("duplicate key {k:?}")));
            }
            let Strict(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}
