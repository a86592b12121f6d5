//! Tests for the decoder: one unit test per error kind and field kind, the splice cases, and
//! property tests that hold the scanner to serde_json on generated and mutated lines.
//!
//! The property tests print their failing input (including the formatting seed) on failure,
//! which is enough to replay it as a unit test.

use super::*;
use proptest::prelude::*;
use serde_json::{Map, Value};

pub(super) fn table(paths: &[&str]) -> FieldTable {
    let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
    FieldTable::new(&paths).expect("valid test paths")
}

fn decoder(paths: &[&str]) -> Decoder {
    Decoder::new(table(paths), 64, 64 * 1024)
}

fn err(d: &mut Decoder, line: &[u8]) -> DecodeError {
    match d.decode(line) {
        Ok(e) => panic!(
            "{:?} decoded, raw {:?}",
            String::from_utf8_lossy(line),
            String::from_utf8_lossy(e.raw())
        ),
        Err(e) => e,
    }
}

fn s<'a>(raw: &'a [u8], text: &'a [u8]) -> Field<'a> {
    Field::String { raw, text }
}

// ---------------------------------------------------------------------------------------------
// FieldTable

#[test]
fn table_rejects_bad_paths_naming_them() {
    let bad = |p: &[&str]| {
        FieldTable::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_err()
    };
    assert!(bad(&["user", ""]).contains("\"\""));
    assert!(bad(&["a..b"]).contains("a..b"));
    assert!(bad(&[".a"]).contains(".a"));
    assert!(bad(&["a."]).contains("a."));
    let long = "x".repeat(SEGMENT_BYTES_MAX + 1);
    let path = format!("ctx.{long}");
    assert!(bad(&[&path]).contains(&path));
    let many: Vec<String> = (0..=PATHS_MAX).map(|i| format!("f{i}")).collect();
    assert!(FieldTable::new(&many).unwrap_err().contains("f64"));

    let max: Vec<String> = (0..PATHS_MAX).map(|i| format!("f{i}")).collect();
    assert_eq!(FieldTable::new(&max).unwrap().len(), PATHS_MAX);
    let seg = "y".repeat(SEGMENT_BYTES_MAX);
    assert!(FieldTable::new(&[seg]).is_ok());
}

#[test]
fn table_accessors() {
    let t = table(&["user", "ctx.device.id"]);
    assert_eq!(t.len(), 2);
    assert!(!t.is_empty());
    assert_eq!(t.path(1), "ctx.device.id");
    assert!(table(&[]).is_empty());
    let d = Decoder::new(t, 8, 256);
    assert_eq!(d.table().path(0), "user");
}

#[test]
fn duplicate_paths_share_a_value() {
    let mut d = decoder(&["user", "ts", "user"]);
    let e = d.decode(br#"{"user":"u1","ts":5}"#).unwrap();
    assert_eq!(e.get(0), s(br#""u1""#, b"u1"));
    assert_eq!(e.get(2), e.get(0));
    assert_eq!(e.get(1), Field::Number(b"5"));
}

#[test]
fn table_with_max_paths_extracts_all() {
    let paths: Vec<String> = (0..PATHS_MAX).map(|i| format!("f{i}")).collect();
    let mut d = Decoder::new(FieldTable::new(&paths).unwrap(), 8, 4096);
    let mut line = String::from("{");
    for i in (0..PATHS_MAX).rev() {
        line.push_str(&format!("\"f{i}\":{i},"));
    }
    line.pop();
    line.push('}');
    let e = d.decode(line.as_bytes()).unwrap();
    for i in 0..PATHS_MAX {
        assert_eq!(e.get(i as FieldId).as_i64(), Some(i as i64));
    }
}

// ---------------------------------------------------------------------------------------------
// Errors, one kind at a time

#[test]
fn error_empty() {
    let mut d = decoder(&["a"]);
    for line in [&b""[..], b" ", b"\r", b" \t \r", b"\n"] {
        assert_eq!(err(&mut d, line), DecodeError::Empty);
    }
}

#[test]
fn error_too_long() {
    let mut d = Decoder::new(table(&["a"]), 8, 16);
    assert!(d.decode(br#"{"a":"123456789"}"#[..16].as_ref()).is_err());
    assert_eq!(err(&mut d, br#"{"a":"1234567890"}"#), DecodeError::TooLong);
    assert_eq!(err(&mut d, &[b' '; 17]), DecodeError::TooLong);
    assert!(d.decode(br#"{"a":"12345678"}"#).is_ok());
}

#[test]
fn error_not_object() {
    let mut d = decoder(&["a"]);
    for line in [
        &b"[1]"[..],
        b"\"x\"",
        b"1",
        b"null",
        b"true",
        b"x",
        b"}",
        b"\x0c{}",
        b"\xef\xbb\xbf{}",
    ] {
        assert_eq!(
            err(&mut d, line),
            DecodeError::NotObject,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn error_syntax() {
    let mut d = decoder(&["a", "a.b"]);
    let lines: &[&[u8]] = &[
        b"{",
        br#"{"a"}"#,
        br#"{"a":}"#,
        br#"{"a" 1}"#,
        br#"{"a":1,}"#,
        br#"{,}"#,
        br#"{"a":1 "b":2}"#,
        br#"{"a":01}"#,
        br#"{"a":-01}"#,
        br#"{"a":1.}"#,
        br#"{"a":.5}"#,
        br#"{"a":-}"#,
        br#"{"a":+1}"#,
        br#"{"a":1e}"#,
        br#"{"a":1e+}"#,
        br#"{"a":0x10}"#,
        br#"{"a":NaN}"#,
        br#"{"a":Infinity}"#,
        br#"{"a":tru}"#,
        br#"{"a":truex}"#,
        br#"{"a":nul}"#,
        br#"{"a":fals}"#,
        br#"{"a":"x}"#,
        br#"{"a":"x\"}"#,
        br#"{"a":1"#,
        br#"{"a":[1,]}"#,
        br#"{"a":[1 2]}"#,
        br#"{"a":[}"#,
        br#"{"a":{]}"#,
        br#"{"a":{"b":1]}"#,
        br#"{"a":[1}]}"#,
        br#"{'a':1}"#,
        br#"{a:1}"#,
        b"{\"a\":\"x\x01y\"}",
        b"{\"a\":\"x\x1f\"}",
        // A raw control byte stays invalid even right after a backslash.
        b"{\"a\":\"\\\x01\"}",
        b"{\"a\x00\":1}",
        b"{\"a\":1\x0c}",
        b"{\"a\":\xc3\xa9}",
    ];
    for line in lines {
        assert_eq!(
            err(&mut d, line),
            DecodeError::Syntax,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn error_invalid_utf8() {
    let mut d = decoder(&["a"]);
    let lines: &[&[u8]] = &[
        b"{\"a\":\"\xff\"}",
        b"{\"a\":\"ok \xc3\"}",
        b"{\"a\":\"\xc0\xaf\"}",
        b"{\"a\":\"\xed\xa0\x80\"}",
        b"{\"a\":\"\xf4\x90\x80\x80\"}",
        b"{\"\xe2\x82\":1}",
        b"{\"z\":\"long ascii prefix \xe2\x82\xac then bad \x80 byte\"}",
        b"{\"z\":[\"\xfe\"]}",
    ];
    for line in lines {
        assert_eq!(
            err(&mut d, line),
            DecodeError::InvalidUtf8,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
    // Valid multi-byte text in keys and values, untracked and tracked.
    let e = d.decode("{\"é\":\"€\",\"a\":\"😀 ü\"}".as_bytes()).unwrap();
    assert_eq!(e.get(0).key_bytes(), Some("😀 ü".as_bytes()));
}

#[test]
fn error_invalid_escape() {
    let mut d = decoder(&["a"]);
    let lines: &[&[u8]] = &[
        br#"{"a":"\x"}"#,
        br#"{"a":"\'"}"#,
        br#"{"a":"\u12"}"#,
        br#"{"a":"\u12G4"}"#,
        br#"{"a":"\uD800"}"#,
        br#"{"a":"\uD800x"}"#,
        br#"{"a":"\uD800\u0041"}"#,
        br#"{"a":"\uD800\uD800"}"#,
        br#"{"a":"\uDC00"}"#,
        br#"{"a":"\uDFFF\uD800"}"#,
        br#"{"z":"\uD83D"}"#,
        br#"{"\q":1}"#,
        br#"{"k\uDE00":1}"#,
        b"{\"a\":\"\\\xc3\xa9\"}",
    ];
    for line in lines {
        assert_eq!(
            err(&mut d, line),
            DecodeError::InvalidEscape,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn error_too_deep() {
    let mut d = Decoder::new(table(&["a.b.c"]), 3, 1024);
    assert_eq!(
        d.decode(br#"{"a":{"b":{"c":1}}}"#).unwrap().get(0).as_i64(),
        Some(1)
    );
    assert!(d.decode(br#"{"a":[[]]}"#).is_ok());
    assert_eq!(
        err(&mut d, br#"{"a":{"b":{"c":{}}}}"#),
        DecodeError::TooDeep
    );
    assert_eq!(err(&mut d, br#"{"a":[[[]]]}"#), DecodeError::TooDeep);
    assert_eq!(err(&mut d, br#"{"z":[{"y":[1]}]}"#), DecodeError::TooDeep);
    let mut d1 = Decoder::new(table(&[]), 1, 1024);
    assert!(d1.decode(br#"{"a":1}"#).is_ok());
    assert_eq!(err(&mut d1, br#"{"a":[]}"#), DecodeError::TooDeep);
    // Depth beyond what the line could close still stops at the limit, not out of bounds.
    let mut tiny = Decoder::new(table(&[]), 1000, 8);
    assert_eq!(err(&mut tiny, b"{[[[[[[["), DecodeError::Syntax);
}

#[test]
fn error_trailing_bytes() {
    let mut d = decoder(&["a"]);
    for line in [
        &br#"{} x"#[..],
        b"{}}",
        b"{}{}",
        br#"{"a":1},"#,
        b"{}\x00",
        b"{} \r\n ]",
    ] {
        assert_eq!(
            err(&mut d, line),
            DecodeError::TrailingBytes,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn error_duplicate_field() {
    let mut d = decoder(&["user", "ctx.device.id", "ctx.tags"]);
    let lines: &[&[u8]] = &[
        br#"{"user":1,"user":2}"#,
        br#"{"user":1,"x":0,"user":"1"}"#,
        br#"{"user":1,"us\u0065r":2}"#,
        br#"{"ctx":{"device":{"id":1}},"ctx":{"device":{"id":2}}}"#,
        br#"{"ctx":{"device":{"id":1,"id":[]}}}"#,
        br#"{"ctx":{"tags":[],"tags":{}}}"#,
        br#"{"_session":1,"_session":2}"#,
        br#"{"_session":1,"_sessio\u006e":2}"#,
    ];
    for line in lines {
        assert_eq!(
            err(&mut d, line),
            DecodeError::DuplicateField,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
    // Duplicates of keys that are not extracted are allowed, at any depth.
    assert!(d
        .decode(br#"{"x":1,"x":2,"ctx":{"y":1,"y":2},"n":{"user":1,"user":2}}"#)
        .is_ok());
    // An intermediate key seen twice is fine while the extracted path occurs once.
    let e = d
        .decode(br#"{"ctx":{"tags":[1]},"ctx":{"device":{"id":"d"}}}"#)
        .unwrap();
    assert_eq!(e.get(1).key_bytes(), Some(&b"d"[..]));
    // `_session` nested below the top level is ordinary data.
    assert!(d.decode(br#"{"a":{"_session":1,"_session":2}}"#).is_ok());
}

#[test]
fn labels_are_static_snake_case_and_distinct() {
    let labels: Vec<&str> = DecodeError::ALL.iter().map(|e| e.label()).collect();
    for l in &labels {
        assert!(
            l.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'),
            "{l}"
        );
    }
    let mut sorted = labels.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), labels.len());
    assert_eq!(DecodeError::Syntax.label(), "invalid_json");
    assert_eq!(DecodeError::Empty.to_string(), "empty_line");
}

// ---------------------------------------------------------------------------------------------
// Field kinds and paths

#[test]
fn every_field_kind() {
    let mut d = decoder(&["n", "t", "f", "num", "s", "o", "a", "missing", "e"]);
    let line = br#"{"n":null,"t":true,"f":false,"num":-1.5e3,"s":"hi","o":{"x":[1,{"y":2}]},"a":[1,"two",{}],"e":"a\nb"}"#;
    let e = d.decode(line).unwrap();
    assert_eq!(e.get(0), Field::Null);
    assert_eq!(e.get(1), Field::Bool(true));
    assert_eq!(e.get(2), Field::Bool(false));
    assert_eq!(e.get(3), Field::Number(b"-1.5e3"));
    assert_eq!(e.get(4), s(br#""hi""#, b"hi"));
    assert_eq!(e.get(5), Field::Object(br#"{"x":[1,{"y":2}]}"#));
    assert_eq!(e.get(6), Field::Array(br#"[1,"two",{}]"#));
    assert_eq!(e.get(7), Field::Missing);
    assert_eq!(e.get(8), s(br#""a\nb""#, b"a\nb"));

    assert!(e.get(7).is_missing() && !e.get(0).is_missing());
    assert_eq!(e.get(3).as_f64(), Some(-1500.0));
    assert_eq!(e.get(3).as_i64(), None);
    assert_eq!(e.get(4).as_f64(), None);
    for (id, raw) in [
        (0, &b"null"[..]),
        (1, b"true"),
        (2, b"false"),
        (3, b"-1.5e3"),
        (4, br#""hi""#),
        (6, br#"[1,"two",{}]"#),
    ] {
        assert_eq!(e.get(id).raw_json(), Some(raw));
    }
    assert_eq!(e.get(7).raw_json(), None);
    assert_eq!(e.get(4).key_bytes(), Some(&b"hi"[..]));
    assert_eq!(e.get(3).key_bytes(), Some(&b"-1.5e3"[..]));
    assert_eq!(e.get(1).key_bytes(), Some(&b"true"[..]));
    assert_eq!(e.get(2).key_bytes(), Some(&b"false"[..]));
    for id in [0, 5, 6, 7] {
        assert_eq!(e.get(id).key_bytes(), None);
    }
}

#[test]
fn empty_containers_and_spaced_values() {
    let mut d = decoder(&["o", "a", "s"]);
    let e = d
        .decode(b" {\t\"o\" : { } ,\r\n \"a\" :[ ] , \"s\" : \"\" } \r")
        .unwrap();
    assert_eq!(e.get(0), Field::Object(b"{ }"));
    assert_eq!(e.get(1), Field::Array(b"[ ]"));
    assert_eq!(e.get(2), s(b"\"\"", b""));
    assert_eq!(e.raw(), b"{\t\"o\" : { } ,\r\n \"a\" :[ ] , \"s\" : \"\" }");
}

#[test]
fn numbers() {
    let mut d = decoder(&["v"]);
    let mut num = |text: &str| -> (Option<f64>, Option<i64>) {
        let line = format!("{{\"v\":{text}}}");
        let e = d
            .decode(line.as_bytes())
            .unwrap_or_else(|e| panic!("{text}: {e:?}"));
        assert_eq!(e.get(0), Field::Number(text.as_bytes()));
        (e.get(0).as_f64(), e.get(0).as_i64())
    };
    assert_eq!(num("0"), (Some(0.0), Some(0)));
    assert_eq!(num("-0"), (Some(-0.0), Some(0)));
    assert_eq!(
        num("1700000000123"),
        (Some(1_700_000_000_123.0), Some(1_700_000_000_123))
    );
    assert_eq!(
        num("9223372036854775807"),
        (Some(9.223372036854776e18), Some(i64::MAX))
    );
    assert_eq!(num("-9223372036854775808").1, Some(i64::MIN));
    assert_eq!(num("9223372036854775808").1, None);
    assert_eq!(num("-9223372036854775809").1, None);
    assert_eq!(
        num("184467440737095516150").1,
        None,
        "past u64 while accumulating"
    );
    assert_eq!(num("1.0"), (Some(1.0), None));
    assert_eq!(num("1E2"), (Some(100.0), None));
    assert_eq!(num("1e-2"), (Some(0.01), None));
    assert_eq!(num("2.5E+3"), (Some(2500.0), None));
    assert_eq!(num("1e400"), (None, None));
    assert_eq!(num("-1e400"), (None, None));
    assert_eq!(num("1e-400"), (Some(0.0), None));
}

#[test]
fn nested_paths() {
    let mut d = decoder(&[
        "ctx.device.id",
        "ctx",
        "ctx.device",
        "ctx.os",
        "a.b.c",
        "list.x",
        "top",
    ]);
    let line = br#"{"top":1,"ctx":{"os":"linux","device":{"model":"m","id":"d-1"}},"a":{"b":5},"list":[{"x":1}]}"#;
    let e = d.decode(line).unwrap();
    assert_eq!(e.get(0), s(br#""d-1""#, b"d-1"));
    assert_eq!(
        e.get(1),
        Field::Object(br#"{"os":"linux","device":{"model":"m","id":"d-1"}}"#)
    );
    assert_eq!(e.get(2), Field::Object(br#"{"model":"m","id":"d-1"}"#));
    assert_eq!(e.get(3), s(br#""linux""#, b"linux"));
    // Intermediate value is not an object.
    assert_eq!(e.get(4), Field::Missing);
    // Paths never go into arrays.
    assert_eq!(e.get(5), Field::Missing);
    assert_eq!(e.get(6).as_i64(), Some(1));
    // The same keys at the wrong depth do not match.
    let e = d
        .decode(br#"{"device":{"id":1},"x":{"ctx":{"device":{"id":2}}},"id":3}"#)
        .unwrap();
    for id in 0..7 {
        assert_eq!(e.get(id), Field::Missing);
    }
    // A literal dotted key is not a path.
    let e = d.decode(br#"{"ctx.device.id":"nope"}"#).unwrap();
    assert_eq!(e.get(0), Field::Missing);
}

#[test]
fn keys_compared_after_unescaping() {
    let mut d = decoder(&["user", "ctx.device.id", "k\"q", "é", "_session"]);
    let line = br#"{"\u0075ser":"u","c\u0074x":{"dev\u0069ce":{"\u0069d":7}},"k\"q":1,"\u00e9":2,"_session":3}"#;
    let e = d.decode(line).unwrap();
    assert_eq!(e.get(0).key_bytes(), Some(&b"u"[..]));
    assert_eq!(e.get(1).as_i64(), Some(7));
    assert_eq!(e.get(2).as_i64(), Some(1));
    assert_eq!(e.get(3).as_i64(), Some(2));
    assert_eq!(e.get(4).as_i64(), Some(3));
    // Escapes that unescape to a different key do not match.
    let e = d.decode(br#"{"user\u0000":1,"use":2,"users":3}"#).unwrap();
    assert_eq!(e.get(0), Field::Missing);
}

#[test]
fn escaped_values() {
    let mut d = decoder(&["a", "b", "c", "d"]);
    let line = br#"{"a":"q\"b\\s\/n\nt\tr\rb\bf\f","b":"\u00e9\u20AC\ud83d\ude00!","c":"plain","d":"x\u0000y"}"#;
    let e = d.decode(line).unwrap();
    assert_eq!(
        e.get(0),
        s(
            br#""q\"b\\s\/n\nt\tr\rb\bf\f""#,
            b"q\"b\\s/n\nt\tr\rb\x08f\x0c"
        )
    );
    assert_eq!(
        e.get(1),
        s(br#""\u00e9\u20AC\ud83d\ude00!""#, "é€😀!".as_bytes())
    );
    assert_eq!(e.get(2), s(br#""plain""#, b"plain"));
    assert_eq!(e.get(3).key_bytes(), Some(&b"x\0y"[..]));
    // Scratch is reused across lines without leaking text from the previous one.
    let e = d.decode(br#"{"b":"\u0041","a":"\u0042"}"#).unwrap();
    assert_eq!(e.get(0).key_bytes(), Some(&b"B"[..]));
    assert_eq!(e.get(1).key_bytes(), Some(&b"A"[..]));
    assert_eq!(e.get(2), Field::Missing);
}

#[test]
fn surrogate_pairs() {
    let mut d = decoder(&["v"]);
    for (esc, text) in [
        (r#""\ud83d\ude00""#, "😀"),
        (r#""\uD800\uDC00""#, "\u{10000}"),
        (r#""\uDBFF\uDFFF""#, "\u{10FFFF}"),
        (r#""a\uD834\uDD1Eb""#, "a𝄞b"),
        (r#""\uFFFF""#, "\u{FFFF}"),
    ] {
        let line = format!("{{\"v\":{esc}}}");
        let e = d.decode(line.as_bytes()).unwrap();
        assert_eq!(e.get(0), s(esc.as_bytes(), text.as_bytes()), "{esc}");
    }
}

#[test]
fn strings_across_word_boundaries() {
    // Stage 1 classifies 16/32-byte vectors: put every special byte at every offset in one.
    let mut d = decoder(&["v"]);
    for len in 0..24 {
        for special in ["\\\"", "\\\\", "é", "\\u00e9", "😀"] {
            let body = format!("{}{special}{}", "x".repeat(len), "y".repeat(len % 5));
            let line = format!("{{\"v\":\"{body}\"}}");
            let e = d.decode(line.as_bytes()).unwrap();
            let expected: String = serde_json::from_str(&format!("\"{body}\"")).unwrap();
            assert_eq!(e.get(0).key_bytes(), Some(expected.as_bytes()), "{line}");
            let bad = format!("{{\"v\":\"{}\u{1}{special}\"}}", "x".repeat(len));
            assert_eq!(err(&mut d, bad.as_bytes()), DecodeError::Syntax, "{bad}");
        }
        let unterminated = format!("{{\"v\":\"{}", "x".repeat(len));
        assert_eq!(err(&mut d, unterminated.as_bytes()), DecodeError::Syntax);
        let backslash_last = format!("{{\"v\":\"{}\\", "x".repeat(len));
        assert_eq!(err(&mut d, backslash_last.as_bytes()), DecodeError::Syntax);
    }
}

#[test]
fn whitespace_and_cr_trimming() {
    let mut d = decoder(&["a"]);
    for line in [
        &b"{\"a\":1}\r"[..],
        b"  {\"a\":1}  ",
        b"\t{\"a\":1}\r",
        b"\r\n{\"a\":1}\n\r",
        b"{ \"a\" : 1 }",
    ] {
        let e = d.decode(line).unwrap();
        assert_eq!(e.get(0).as_i64(), Some(1));
        assert_eq!(e.raw().first(), Some(&b'{'));
        assert_eq!(e.raw().last(), Some(&b'}'));
    }
    assert_eq!(d.decode(b" {\"a\":1}\r").unwrap().raw(), b"{\"a\":1}");
}

#[test]
fn empty_table_still_validates() {
    let mut d = decoder(&[]);
    assert!(d.decode(br#"{"a":[1,{"b":null}],"c":"\u00e9"}"#).is_ok());
    assert_eq!(err(&mut d, br#"{"a":[1,{"b":nul}]}"#), DecodeError::Syntax);
}

// ---------------------------------------------------------------------------------------------
// String bodies (16-byte chunks)

#[test]
fn simd_string_classifier_matches_scalar() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let alphabet = b"{}[]:,\"\\ \t\n\r\x00\x1f\x20\x7f\x80\xff\xc3\xa9az09-+.eE/ ";
    for round in 0..20_000 {
        let mut chunk = [0u8; 16];
        for c in chunk.iter_mut() {
            *c = if round % 2 == 0 {
                alphabet[(rng.next() % alphabet.len() as u64) as usize]
            } else {
                rng.next() as u8
            };
        }
        assert_eq!(
            chunk::classify16(&chunk),
            chunk::classify16_scalar(&chunk),
            "{chunk:?}"
        );
    }
}

#[test]
fn strings_across_block_boundaries() {
    // Put every kind of string content, and backslash runs of every parity, across the 16-byte
    // chunk boundaries the string skip works in.
    let mut d = decoder(&["v", "w"]);
    for pad in 0..140 {
        for special in [
            "\\\"",
            "\\\\",
            "\\\\\\\"",
            "é",
            "\\u00e9",
            "😀",
            "\\ud83d\\ude00",
            "{[:,]}",
        ] {
            let body = format!("{}{special}{}", "x".repeat(pad % 70), "y".repeat(pad % 3));
            let line = format!(
                "{{\"k\":\"{}\",\"v\":\"{body}\",\"w\":[\"{body}\",1]}}",
                "p".repeat(pad)
            );
            let e = d
                .decode(line.as_bytes())
                .unwrap_or_else(|e| panic!("{line}: {e:?}"));
            let expected: String = serde_json::from_str(&format!("\"{body}\"")).unwrap();
            assert_eq!(e.get(0).key_bytes(), Some(expected.as_bytes()), "{line}");
            let w: Value = serde_json::from_slice(e.get(1).raw_json().unwrap()).unwrap();
            assert_eq!(w, serde_json::json!([expected, 1]));
            // A control byte and an unterminated string are caught wherever they fall.
            let bad = format!(
                "{{\"k\":\"{}\",\"v\":\"{}\u{1}\"}}",
                "p".repeat(pad),
                "x".repeat(pad % 70)
            );
            assert_eq!(err(&mut d, bad.as_bytes()), DecodeError::Syntax, "{bad}");
            let open = format!("{{\"k\":\"{}\",\"v\":\"{body}", "p".repeat(pad));
            assert_eq!(err(&mut d, open.as_bytes()), DecodeError::Syntax, "{open}");
        }
    }
}

#[test]
fn scalars_are_whole_runs() {
    let mut d = decoder(&["v"]);
    for line in [
        &br#"{"v":truex}"#[..],
        br#"{"v":1.2.3}"#,
        br#"{"v":12a}"#,
        br#"{"v":nullnull}"#,
        br#"{"v":1"x"}"#,
        br#"{"v":"x"1}"#,
        br#"{"v":1 2}"#,
        br#"{"v":-}"#,
        br#"{"v":\"x"}"#,
        b"{\"v\":1\x01}",
        b"{\"v\":\xc3\xa9}",
    ] {
        assert_eq!(
            err(&mut d, line),
            DecodeError::Syntax,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
    for (line, v) in [
        (&br#"{"v":true }"#[..], "true"),
        (br#"{"v":-0.5e-3,"w":1}"#, "-0.5e-3"),
        (b"{\"v\":7\t}", "7"),
    ] {
        assert_eq!(
            d.decode(line).unwrap().get(0).raw_json(),
            Some(v.as_bytes())
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Splice

fn enriched(d: &mut Decoder, line: &[u8], member: &[u8]) -> String {
    let e = d.decode(line).unwrap();
    let mut out = Vec::new();
    e.write_enriched(member, &mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn splice_cases() {
    let mut d = decoder(&["a"]);
    let m = br#""_session":{"id":"x"}"#;
    let cases: &[(&[u8], &str)] = &[
        (b"{}", r#"{"_session":{"id":"x"}}"#),
        (b" { } \r", r#"{ "_session":{"id":"x"}}"#),
        (br#"{"a":1}"#, r#"{"a":1,"_session":{"id":"x"}}"#),
        (
            br#"{"_session":{"id":"old"}}"#,
            r#"{"_session":{"id":"x"}}"#,
        ),
        (br#"{ "_session" : 1 }"#, r#"{  "_session":{"id":"x"}}"#),
        (
            br#"{"_session":1,"a":2}"#,
            r#"{"a":2,"_session":{"id":"x"}}"#,
        ),
        (
            br#"{"_session":[1,{"z":2}] , "a":2}"#,
            r#"{ "a":2,"_session":{"id":"x"}}"#,
        ),
        (
            br#"{"a":1,"_session":"s","b":2}"#,
            r#"{"a":1,"b":2,"_session":{"id":"x"}}"#,
        ),
        (
            br#"{"a":1,"_session":{"n":{}}}"#,
            r#"{"a":1,"_session":{"id":"x"}}"#,
        ),
        (
            br#"{"a":1 , "_session":null }"#,
            r#"{"a":1  ,"_session":{"id":"x"}}"#,
        ),
        (
            br#"{"_session":{"a":"}\"]{\\","c":[{}]},"b":1}"#,
            r#"{"b":1,"_session":{"id":"x"}}"#,
        ),
        (
            br#"{"a":1,"_session":-12.5e3}"#,
            r#"{"a":1,"_session":{"id":"x"}}"#,
        ),
        (
            br#"{"_sessio\u006e":1,"b":{"_session":2}}"#,
            r#"{"b":{"_session":2},"_session":{"id":"x"}}"#,
        ),
    ];
    for (line, want) in cases {
        let got = enriched(&mut d, line, m);
        assert_eq!(got, *want, "{:?}", String::from_utf8_lossy(line));
        let v: Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["_session"]["id"], "x");
    }
}

#[test]
fn splice_refeeds_own_output() {
    let mut d = decoder(&["a"]);
    let mut line = br#"{"a":1,"b":[2]}"#.to_vec();
    for round in 0..3 {
        let member = format!("\"_session\":{{\"round\":{round}}}");
        let out = enriched(&mut d, &line, member.as_bytes());
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a":1,"b":[2],"_session":{"round":round}})
        );
        line = out.into_bytes();
    }
}

#[test]
fn splice_appends_without_clearing() {
    let mut d = decoder(&[]);
    let e = d.decode(b"{}").unwrap();
    let mut out = b"prefix\n".to_vec();
    e.write_enriched(b"\"_session\":1", &mut out);
    assert_eq!(out, b"prefix\n{\"_session\":1}");
}

// ---------------------------------------------------------------------------------------------
// write_json_string

#[test]
fn json_string_escaping() {
    let cases: &[(&[u8], &str)] = &[
        (b"", r#""""#),
        (b"plain", r#""plain""#),
        (b"q\"b\\", r#""q\"b\\""#),
        (
            b"\n\r\t\x08\x0c\x00\x1f\x7f",
            "\"\\n\\r\\t\\b\\f\\u0000\\u001f\x7f\"",
        ),
        ("é😀".as_bytes(), "\"é😀\""),
        (b"a\xffb\xc3", "\"a\u{fffd}b\u{fffd}\""),
    ];
    for (input, want) in cases {
        let mut out = Vec::new();
        write_json_string(input, &mut out);
        assert_eq!(String::from_utf8(out.clone()).unwrap(), *want);
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, String::from_utf8_lossy(input));
    }
}

/// Every byte value, alone and inside plain text, takes the copy or the escaping walk as it
/// must: the literal always parses back to the input (invalid UTF-8 as U+FFFD).
#[test]
fn json_string_escaping_every_byte() {
    for c in 0..=255u8 {
        for input in [vec![c], [b"user-".as_slice(), &[c], b"-42"].concat()] {
            let mut out = Vec::new();
            write_json_string(&input, &mut out);
            let back: String = serde_json::from_slice(&out).unwrap_or_else(|e| {
                panic!("byte {c:#04x}: {e}: {:?}", String::from_utf8_lossy(&out))
            });
            assert_eq!(back, String::from_utf8_lossy(&input), "byte {c:#04x}");
        }
    }
    let mut out = Vec::new();
    write_json_string("ключ".as_bytes(), &mut out);
    assert_eq!(out, "\"ключ\"".as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Property tests against serde_json

/// Keys drawn from a small pool so that generated objects hit the extracted paths, plus
/// arbitrary text (which may contain dots, quotes, controls and astral characters).
fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "c", "ctx", "device", "id", "k\"q", "é", "😀", "x y", "_session", "a.b"])
            .prop_map(str::to_string),
        1 => prop::collection::vec(any::<char>(), 0..6).prop_map(String::from_iter),
    ]
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9 _./-]{0,30}",
        prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        prop::collection::vec(
            prop::sample::select(vec![
                '"', '\\', '/', '\n', '\u{1}', 'é', '€', '😀', '\u{2028}', 'x'
            ]),
            0..10
        )
        .prop_map(String::from_iter),
    ]
}

fn arb_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        (-1000i32..1000).prop_map(|i| Value::from(f64::from(i) / 8.0)),
    ]
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        arb_number(),
        arb_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((arb_key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

pub(super) fn arb_object() -> impl Strategy<Value = Value> {
    prop::collection::vec((arb_key(), arb_value()), 0..8)
        .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))
}

pub(super) const PROP_PATHS: &[&str] = &[
    "a",
    "b",
    "c",
    "a.b",
    "a.b.c",
    "b.a",
    "ctx.device.id",
    "ctx",
    "k\"q",
    "é.😀",
    "x y",
    "_session",
    "a.a.a.a",
    "c.id",
];

/// Tiny deterministic generator for formatting choices; the seed is part of the proptest input.
pub(super) struct Rng(pub(super) u64);
impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }
}

/// A serializer that, unlike serde_json, escapes characters it need not escape (\uXXXX, surrogate
/// pairs, \/) and sprinkles whitespace, so the scanner sees every legal spelling.
pub(super) fn write_spelled(v: &Value, rng: &mut Rng, out: &mut String) {
    let ws = |rng: &mut Rng, out: &mut String| {
        if rng.one_in(4) {
            for _ in 0..rng.next() % 3 + 1 {
                out.push([' ', '\t', '\n', '\r'][(rng.next() % 4) as usize]);
            }
        }
    };
    match v {
        Value::Object(m) => {
            out.push('{');
            ws(rng, out);
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    ws(rng, out);
                }
                write_spelled_str(k, rng, out);
                ws(rng, out);
                out.push(':');
                ws(rng, out);
                write_spelled(v, rng, out);
                ws(rng, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            ws(rng, out);
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    ws(rng, out);
                }
                write_spelled(v, rng, out);
                ws(rng, out);
            }
            out.push(']');
        }
        Value::String(s) => write_spelled_str(s, rng, out),
        other => out.push_str(&other.to_string()),
    }
}

fn write_spelled_str(s: &str, rng: &mut Rng, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        let must = c == '"' || c == '\\' || (c as u32) < 0x20;
        if must || rng.one_in(3) {
            match c {
                '"' if rng.one_in(2) => out.push_str("\\\""),
                '\\' if rng.one_in(2) => out.push_str("\\\\"),
                '/' => out.push_str("\\/"),
                '\n' if rng.one_in(2) => out.push_str("\\n"),
                _ => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        if rng.one_in(2) {
                            out.push_str(&format!("\\u{u:04x}"));
                        } else {
                            out.push_str(&format!("\\u{u:04X}"));
                        }
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out.push('"');
}

fn expected_at<'v>(root: &'v Value, path: &str) -> Option<&'v Value> {
    let mut cur = root;
    for seg in path.split('.') {
        cur = cur.as_object()?.get(seg)?;
    }
    Some(cur)
}

fn check_field(path: &str, got: Field<'_>, want: Option<&Value>) -> Result<(), TestCaseError> {
    let Some(want) = want else {
        prop_assert_eq!(got, Field::Missing, "path {}", path);
        return Ok(());
    };
    let raw = got
        .raw_json()
        .ok_or_else(|| TestCaseError::fail(format!("path {path}: missing, want {want}")))?;
    let reparsed: Value = serde_json::from_slice(raw)
        .map_err(|e| TestCaseError::fail(format!("path {path}: raw {e}")))?;
    prop_assert_eq!(&reparsed, want, "path {}", path);
    match (got, want) {
        (Field::Null, Value::Null)
        | (Field::Object(_), Value::Object(_))
        | (Field::Array(_), Value::Array(_)) => {}
        (Field::Bool(b), Value::Bool(w)) => prop_assert_eq!(b, *w),
        (Field::Number(_), Value::Number(n)) => {
            // serde_json (without `float_roundtrip`) may round the last bit differently from
            // std's correctly rounded parse, which `as_f64` uses.
            let (g, w) = (got.as_f64(), n.as_f64());
            prop_assert_eq!(g.is_some(), w.is_some());
            if let (Some(g), Some(w)) = (g, w) {
                prop_assert!(
                    (g - w).abs() <= w.abs() * 4.0 * f64::EPSILON,
                    "path {path}: {g} vs {w}"
                );
            }
            prop_assert_eq!(got.as_i64(), n.as_i64());
        }
        (Field::String { text, .. }, Value::String(w)) => prop_assert_eq!(text, w.as_bytes()),
        _ => prop_assert!(false, "path {path}: kind mismatch {got:?} vs {want}"),
    }
    Ok(())
}

/// The direct accessors read what the field built by `get` holds.
fn check_accessors(e: &Event<'_>, id: FieldId, f: Field<'_>) -> Result<(), TestCaseError> {
    prop_assert_eq!(e.token(id), f.raw_json());
    prop_assert_eq!(e.key_text(id), f.key_bytes());
    let string = match f {
        Field::String { text, .. } => Some(text),
        _ => None,
    };
    prop_assert_eq!(e.string(id), string);
    let number = match f {
        Field::Number(raw) => Some(raw),
        _ => None,
    };
    prop_assert_eq!(e.number(id), number);
    Ok(())
}

fn prop_decoder() -> Decoder {
    Decoder::new(table(PROP_PATHS), 64, 1 << 20)
}

fn check_line(d: &mut Decoder, line: &[u8]) -> Result<(), TestCaseError> {
    let parsed: Value = serde_json::from_slice(line)
        .map_err(|e| TestCaseError::fail(format!("serde rejects: {e}")))?;
    let e = d
        .decode(line)
        .map_err(|e| TestCaseError::fail(format!("decode rejects: {e:?}")))?;
    for (id, path) in PROP_PATHS.iter().enumerate() {
        let f = e.get(id as FieldId);
        check_field(path, f, expected_at(&parsed, path))?;
        check_accessors(&e, id as FieldId, f)?;
    }
    let mut out = Vec::with_capacity(line.len() + 64);
    e.write_enriched(br#""_session":{"id":"s-1","n":2}"#, &mut out);
    let enriched: Value = serde_json::from_slice(&out)
        .map_err(|e| TestCaseError::fail(format!("enriched invalid: {e}")))?;
    let mut want = parsed.clone();
    let obj = want.as_object_mut().expect("object");
    obj.remove("_session");
    obj.insert("_session".into(), serde_json::json!({"id":"s-1","n":2}));
    prop_assert_eq!(enriched, want);
    // Our own output decodes again, and the member is last.
    let again = d
        .decode(&out)
        .map_err(|e| TestCaseError::fail(format!("re-decode: {e:?}")))?;
    let tail: &[u8] = br#""_session":{"id":"s-1","n":2}}"#;
    prop_assert!(again.raw().ends_with(tail), "member not last");
    check_detached(d, line, &out)
}

#[test]
fn a_failed_detached_decode_leaves_no_field_seen() {
    // The failed scan may rewrite slots for its own line; none may then be read against the
    // line decoded before (`Event::get` reads seen slots without bounds checks).
    let mut d = decoder(&["user", "ts", "page"]);
    let good: &[u8] = br#"{"user":"u1","ts":5,"page":"/a"}"#;
    let mut p = Parsed::new(d.table(), 1024);
    d.decode_into(good, &mut p).expect("a valid line");
    assert_eq!(p.event(good, d.table()).get(0), s(br#""u1""#, b"u1"));
    let bad: &[u8] = br#"{"page":"/a/very/long/path/indeed","user":"u2","ts":}"#;
    assert!(d.decode_into(bad, &mut p).is_err());
    let e = p.event(good, d.table());
    for id in 0..3 {
        assert_eq!(e.get(id), Field::Missing, "field {id}");
    }
}

/// The detached form of `line` (decoded into a `Parsed`, then the decoder reused for another
/// line) gives the same fields and the same enriched output as `decode`.
fn check_detached(d: &mut Decoder, line: &[u8], enriched: &[u8]) -> Result<(), TestCaseError> {
    let mut p = Parsed::new(d.table(), 1 << 20);
    d.decode_into(line, &mut p)
        .map_err(|e| TestCaseError::fail(format!("decode_into rejects: {e:?}")))?;
    let mut want = Vec::new();
    {
        let e = d.decode(line).expect("decoded above");
        for id in 0..PROP_PATHS.len() {
            want.push(format!("{:?}", e.get(id as FieldId)));
        }
    }
    d.decode(br#"{"user":"other\u0041","ts":1,"_session":{}}"#)
        .expect("a valid line");
    let table = d.table();
    let e = p.event(line, table);
    for (id, w) in want.iter().enumerate() {
        prop_assert_eq!(&format!("{:?}", e.get(id as FieldId)), w);
    }
    let mut out = Vec::new();
    e.write_enriched(br#""_session":{"id":"s-1","n":2}"#, &mut out);
    prop_assert_eq!(out, enriched);
    Ok(())
}

/// serde_json accepts a line; does the decoder agree (modulo the documented differences)?
fn agrees(d: &mut Decoder, line: &[u8]) -> Result<(), TestCaseError> {
    let theirs = serde_json::from_slice::<Value>(line);
    let ours = d.decode(line).map(|e| e.raw().len());
    match (&ours, &theirs) {
        (Ok(_), Ok(v)) if v.is_object() => Ok(()),
        (Err(DecodeError::NotObject), Ok(v)) if !v.is_object() => Ok(()),
        (Err(_), Err(_)) => Ok(()),
        // Duplicate extracted keys are our rule, not JSON's.
        (Err(DecodeError::DuplicateField), Ok(_)) => Ok(()),
        // JSON's grammar admits huge exponents; serde_json refuses to build the f64.
        (Ok(_), Err(e)) if e.to_string().contains("number out of range") => Ok(()),
        _ => Err(TestCaseError::fail(format!(
            "disagree on {:?}: ours {:?}, serde_json {:?}",
            String::from_utf8_lossy(line),
            ours,
            theirs.map(|_| "ok")
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prop_serde_json_text(v in arb_object()) {
        let mut d = prop_decoder();
        let line = serde_json::to_vec(&v).expect("serializable");
        check_line(&mut d, &line)?;
    }

    #[test]
    fn prop_spelled_text(v in arb_object(), seed in 1u64..) {
        let mut d = prop_decoder();
        let mut line = String::new();
        write_spelled(&v, &mut Rng(seed), &mut line);
        check_line(&mut d, line.as_bytes())?;
        // Framing whitespace and a CR are trimmed.
        let framed = format!(" \t{line}\r");
        let e = d.decode(framed.as_bytes()).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(e.raw(), line.as_bytes());
    }
}

/// One edit of a valid line: the bytes are chosen to hit grammar edges as often as random ones.
#[derive(Clone, Debug)]
pub(super) enum Mutation {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn arb_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        any::<u8>(),
        prop::sample::select(
            b"{}[]\":,\\ntfrue0123456789.eE+- \t\r\x00\x1f\x7f\x80\xbf\xc3\xe2\xed\xf0\xf5\xffu"
                .to_vec()
        ),
    ]
}

pub(super) fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), arb_byte()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        2 => (any::<usize>(), arb_byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => any::<usize>().prop_map(Mutation::Delete),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

/// `v` written by serde_json or (`spelled`) by `write_spelled` with `seed`, then edited.
pub(super) fn mutated_line(v: &Value, seed: u64, spelled: bool, mutations: &[Mutation]) -> Vec<u8> {
    let mut line = if spelled {
        let mut s = String::new();
        write_spelled(v, &mut Rng(seed), &mut s);
        s.into_bytes()
    } else {
        serde_json::to_vec(v).expect("serializable")
    };
    for m in mutations {
        mutate(&mut line, m);
    }
    line
}

fn mutate(line: &mut Vec<u8>, m: &Mutation) {
    let len = line.len();
    match *m {
        Mutation::Replace(i, b) if len > 0 => line[i % len] = b,
        Mutation::Insert(i, b) => line.insert(i % (len + 1), b),
        Mutation::Delete(i) if len > 0 => {
            line.remove(i % len);
        }
        Mutation::Truncate(i) => line.truncate(i % (len + 1)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn prop_mutations_agree_with_serde_json(
        v in arb_object(),
        seed in 1u64..,
        spelled in any::<bool>(),
        mutations in prop::collection::vec(arb_mutation(), 1..4),
    ) {
        let mut d = prop_decoder();
        let line = mutated_line(&v, seed, spelled, &mutations);
        agrees(&mut d, &line)?;
        // Whatever was accepted can be spliced into valid JSON.
        if let Ok(e) = d.decode(&line) {
            let mut out = Vec::new();
            e.write_enriched(br#""_session":1"#, &mut out);
            let parsed = serde_json::from_slice::<Value>(&out);
            let ok = match &parsed {
                Ok(v) => v["_session"] == 1,
                Err(e) => e.to_string().contains("number out of range"),
            };
            prop_assert!(ok, "enriched {:?}: {:?}", String::from_utf8_lossy(&out), parsed);
        }
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in prop::collection::vec(arb_byte(), 0..64)) {
        let mut d = Decoder::new(table(PROP_PATHS), 8, 48);
        let mut line = b"{\"a\":".to_vec();
        line.extend_from_slice(&bytes);
        for l in [&bytes[..], &line[..]] {
            if let Ok(e) = d.decode(l) {
                for id in 0..PROP_PATHS.len() {
                    let _ = e.get(id as FieldId).raw_json();
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// One decoder over a run of lines (whose top-level keys repeat, move and change between
    /// lines, as the key memo must survive) extracts exactly what a fresh decoder does.
    #[test]
    fn prop_a_reused_decoder_agrees_with_a_fresh_one(
        lines in prop::collection::vec(arb_object(), 1..12),
    ) {
        let fields = |d: &mut Decoder, line: &[u8]| {
            d.decode(line).map(|e| {
                (0..PROP_PATHS.len())
                    .map(|id| format!("{:?}", e.get(id as FieldId)))
                    .collect::<Vec<_>>()
            })
        };
        let mut reused = prop_decoder();
        for v in &lines {
            let line = serde_json::to_vec(v).expect("serializable");
            let want = fields(&mut prop_decoder(), &line);
            prop_assert_eq!(fields(&mut reused, &line), want);
        }
    }
}

proptest! {
    /// `as_i64` (eight digits at a time) against the standard parser, over JSON number text.
    #[test]
    fn prop_as_i64_matches_std(
        neg in any::<bool>(),
        int in "0|[1-9][0-9]{0,24}",
        frac in proptest::option::of("[0-9]{1,3}"),
        exp in proptest::option::of("[eE][+-]?[0-9]{1,2}"),
    ) {
        let mut text = String::from(if neg { "-" } else { "" });
        text += &int;
        if let Some(f) = &frac {
            text = format!("{text}.{f}");
        }
        if let Some(e) = &exp {
            text += e;
        }
        let want = if frac.is_some() || exp.is_some() { None } else { text.parse::<i64>().ok() };
        prop_assert_eq!(Field::Number(text.as_bytes()).as_i64(), want, "{}", text);
    }
}
