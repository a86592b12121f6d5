//! The fast path against the full scanner, on every kernel this CPU runs: what it accepts, the
//! full scanner accepts with the same slots, members and `_session` span; and the lines it is
//! for (no escapes, no control bytes), it does accept, so a fast path that declined everything
//! would fail here, not just run slowly.

use super::fast::{self, Kernel};
use super::scan::{trim, Slot};
use super::tests::{arb_mutation, arb_object, mutated_line, table, Rng, PROP_PATHS};
use super::Decoder;
use proptest::prelude::*;
use serde_json::{Map, Value};

/// The kernels this CPU can run. CI machines have AVX2 at least; on one without, the fast path
/// is off in production too, and these tests check only the full scanner's side.
fn kernels() -> Vec<Kernel> {
    let mut ks = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let base = has!("pclmulqdq") && has!("popcnt");
        if base && has!("avx512bw") && has!("avx512vbmi2") {
            ks.push(Kernel::Avx512);
        }
        if base && has!("avx2") && has!("bmi1") {
            ks.push(Kernel::Avx2);
        }
    }
    ks
}

fn prop_decoder() -> Decoder {
    Decoder::new(table(PROP_PATHS), 64, 1 << 20)
}

/// Runs the fast path on `line` with `kernel`, and checks an acceptance against the full
/// scanner. Returns whether the fast path accepted.
fn fast_checked(d: &mut Decoder, kernel: Kernel, line: &[u8]) -> Result<bool, TestCaseError> {
    let b = trim(line);
    if b.first() != Some(&b'{') {
        return Ok(false);
    }
    let slot_count = d.table.slot_count();
    let mut fast_slots = vec![Slot::default(); slot_count];
    let fast = fast::scan(
        kernel,
        b,
        d.depth_max as usize,
        &d.table,
        &mut d.key_memo,
        &mut fast_slots,
        &mut d.marks,
    );
    let Some(fast) = fast else {
        return Ok(false);
    };
    let mut full_slots = vec![Slot::default(); slot_count];
    let full = d.scan_full(b, 0, &mut full_slots).map_err(|e| {
        TestCaseError::fail(format!(
            "fast path accepted {:?}, the full scanner says {e:?}",
            String::from_utf8_lossy(line)
        ))
    })?;
    let shown = String::from_utf8_lossy(line);
    prop_assert_eq!(fast.seen, full.seen, "seen bits of {}", shown);
    prop_assert_eq!(fast.session, full.session, "_session span of {}", shown);
    prop_assert_eq!(fast.root_members, full.root_members, "members of {}", shown);
    for slot in 0..slot_count {
        if full.seen & (1 << slot) != 0 {
            prop_assert_eq!(
                fast_slots[slot],
                full_slots[slot],
                "slot {} of {}",
                slot,
                shown
            );
        }
    }
    Ok(true)
}

/// Objects whose keys and strings need no escape, nested a few levels: the lines the fast path
/// is for. Keys come mostly from the extracted paths' segments, and long strings carry members
/// across blocks.
fn arb_plain_object() -> impl Strategy<Value = Value> {
    let key = || {
        prop_oneof![
            3 => prop::sample::select(vec![
                "a", "b", "c", "ctx", "device", "id", "_session", "x y", "é", "longer_key_name"
            ])
            .prop_map(str::to_string),
            1 => "[a-z_é😀]{0,20}",
        ]
    };
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z0-9 _./:,{}\\[\\]-]{0,90}".prop_map(Value::String),
        "[é€😀x]{0,20}".prop_map(Value::String),
    ];
    let value = leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    });
    prop::collection::vec((key(), value), 0..10)
        .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))
}

/// `v` with spaces after some tokens, chosen by `seed` (no escapes: none are needed).
fn spaced(v: &Value, seed: u64) -> String {
    let compact = serde_json::to_string(v).expect("serializable");
    let mut rng = Rng(seed | 1);
    let mut out = String::new();
    let mut in_string = false;
    for c in compact.chars() {
        out.push(c);
        let closed_string = c == '"' && in_string;
        if c == '"' {
            in_string = !in_string;
        }
        let structural = !in_string && "{}[],:".contains(c);
        if (structural || closed_string) && rng.next().is_multiple_of(4) {
            out.push(' ');
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn prop_fast_path_accepts_plain_lines_and_agrees(v in arb_plain_object(), seed in any::<u64>()) {
        for kernel in kernels() {
            let mut d = prop_decoder();
            for line in [serde_json::to_string(&v).expect("serializable"), spaced(&v, seed)] {
                let accepted = fast_checked(&mut d, kernel, line.as_bytes())?;
                // Longer lines are the full scanner's (`fast::BLOCKS_MAX`).
                let fits = line.len() <= fast::BLOCKS_MAX * 64;
                prop_assert_eq!(accepted, fits, "{:?} on the line {:?}", kernel, line);
            }
        }
    }

    /// Any line, valid or not, nested or flat: an acceptance always matches the full scanner.
    #[test]
    fn prop_fast_path_agrees_with_the_full_scanner(
        v in arb_object(),
        seed in 1u64..,
        spelled in any::<bool>(),
        mutations in prop::collection::vec(arb_mutation(), 0..4),
    ) {
        let line = mutated_line(&v, seed, spelled, &mutations);
        for kernel in kernels() {
            fast_checked(&mut prop_decoder(), kernel, &line)?;
        }
    }
}

/// Lines at the edges of the fast path, each with whether it must take it. Declined lines
/// still decode (or fail) through the full scanner, which the other tests cover.
#[test]
fn fast_path_edges() {
    let long = |n: usize| format!(r#"{{"a":"{}"}}"#, "x".repeat(n));
    let cases: Vec<(String, bool)> = vec![
        ("{}".into(), true),
        (" { } ".into(), true),
        (r#"{"a":1}"#.into(), true),
        (r#"{"a":0,"b":-0,"c":1.5e3,"ctx":-2E-7}"#.into(), true),
        (r#"{"a":true,"b":false,"c":null}"#.into(), true),
        (r#"{"_session":{"id":1}}"#.into(), true),
        (r#"{"_session":"s","a":1}"#.into(), true),
        (r#"{"a":1,"_session":"s"}"#.into(), true),
        (r#"{"a":{"b":1}}"#.into(), true),
        (r#"{"a":[1]}"#.into(), true),
        (
            r#"{"a":[],"b":{},"c":[[]],"ctx":{"device":{"id":"d"}}}"#.into(),
            true,
        ),
        (
            r#"{"a":[1,[2,{"b":null}],"x"],"a.b":{"c":[true]}}"#.into(),
            true,
        ),
        (r#"{"a":{"b":{"c":1}},"b":{"a":2}}"#.into(), true),
        (r#"{"a":[1,]}"#.into(), false),
        (r#"{"a":[,1]}"#.into(), false),
        (r#"{"a":[1}"#.into(), false),
        (r#"{"a":{"b":1]}"#.into(), false),
        (r#"{"a":{"b"}}"#.into(), false),
        (r#"{"a":{"b":}}"#.into(), false),
        (r#"{"a":{1:2}}"#.into(), false),
        (r#"{"a":[1 2]}"#.into(), false),
        (r#"{"a":[1]]}"#.into(), false),
        (r#"{"a":{"b":1,"b":2}}"#.into(), false),
        (r#"{"c":{"x":1,"x":2},"b":[1,1]}"#.into(), true),
        (r#"{"a":{"b":1},"a":{"b":2}}"#.into(), false),
        (r#"{"ctx":{"device":{"id":1,"id":2}}}"#.into(), false),
        // 32 containers open at once, the root included, and no more.
        (
            format!(r#"{{"a":{}1{}}}"#, "[".repeat(31), "]".repeat(31)),
            true,
        ),
        (
            format!(r#"{{"a":{}1{}}}"#, "[".repeat(32), "]".repeat(32)),
            false,
        ),
        (r#"{"a":"x\"y"}"#.into(), false),
        ("{\"a\":\"x\ty\"}".into(), false),
        ("{\"a\":1,\t\"b\":2}".into(), false),
        ("{\"a\":1 ,  \"b\" : 2 }".into(), true),
        (r#"{"a":"é😀"}"#.into(), true),
        (r#"{"a":01}"#.into(), false),
        (r#"{"a":1.}"#.into(), false),
        (r#"{"a":1e}"#.into(), false),
        (r#"{"a":-}"#.into(), false),
        (r#"{"a":truex}"#.into(), false),
        (r#"{"a":tru}"#.into(), false),
        (r#"{"a":1 2}"#.into(), false),
        (r#"{"a":1,}"#.into(), false),
        (r#"{"a" "b":1}"#.into(), false),
        (r#"{"a":1"b":2}"#.into(), false),
        (r#"{"a":1,"a":2}"#.into(), false),
        (r#"{"a":1}}"#.into(), false),
        (r#"{"a":1} x"#.into(), false),
        (r#"{"a":"unterminated}"#.into(), false),
        (r#"{,}"#.into(), false),
        (r#"{:1}"#.into(), false),
        (long(1016), true),
        (long(1017), false),
    ];
    let mut edges = cases;
    // Strings, numbers and separators across every position of the first block boundaries.
    for pad in 0..140 {
        let x = "x".repeat(pad);
        edges.push((
            format!(r#"{{"a":"{x}","b":12345678901234,"c":true}}"#),
            true,
        ));
        edges.push((format!(r#"{{"{x}":1234567,"b":"y","c":null}}"#), true));
        edges.push((format!(r#"{{"a":"{x}","b":012}}"#), false));
    }
    let mut bytes = b"{\"a\":\"\xff\"}".to_vec();
    for kernel in kernels() {
        let mut d = prop_decoder();
        for (line, fast) in &edges {
            let got = fast_checked(&mut d, kernel, line.as_bytes()).expect("agrees");
            assert_eq!(got, *fast, "{kernel:?} on {line:?}");
        }
        assert!(!fast_checked(&mut d, kernel, &bytes).expect("agrees"));
        bytes[6] = b'a';
        assert!(fast_checked(&mut d, kernel, &bytes).expect("agrees"));
        bytes[6] = 0xff;
    }
}

/// Nesting past the decoder's `depth_max` is the full scanner's to report.
#[test]
fn fast_path_leaves_depth_errors_to_the_full_scanner() {
    for kernel in kernels() {
        let mut d = Decoder::new(table(PROP_PATHS), 3, 1 << 10);
        assert!(fast_checked(&mut d, kernel, br#"{"a":{"b":[1]}}"#).expect("agrees"));
        assert!(!fast_checked(&mut d, kernel, br#"{"a":{"b":[[1]]}}"#).expect("agrees"));
        assert_eq!(
            d.decode(br#"{"a":{"b":[[1]]}}"#).err(),
            Some(super::DecodeError::TooDeep)
        );
    }
}

/// On a CPU with AVX2, a decoder takes the fast path on its own (`Kernel::detect`).
#[test]
fn decoders_pick_a_kernel_where_the_cpu_has_one() {
    assert_eq!(Kernel::detect(), kernels().first().copied());
    assert_eq!(prop_decoder().fast, Kernel::detect());
}
