//! Configuration parsing and validation (`Config::from_toml`, `Config::validate`,
//! `Rules::compile`) and what the runtime builds from a config that passed: the field table, the
//! decoder, and (for small memory settings) an engine.
//!
//! The first byte picks the mode: the rest as TOML text as it is, or a description from which a
//! structured config is generated (the schema's sections and keys, with values at and around
//! every limit, hostile durations, sizes, paths, addresses, CIDRs and nested predicates), so
//! most runs get past the TOML parser into validation. Checked:
//! - nothing panics, whatever the text;
//! - an error names a key (a config key path, or the line of a syntax error) and says something,
//!   and its `Display` carries the key;
//! - a config that validates validates again, its rules compile, its field table builds (the
//!   runtime `expect`s that), a decoder with its limits decodes an event, and an engine can be
//!   built from it.

#![no_main]

use std::fmt::Write as _;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use sessionizer::config::Config;
use sessionizer::decode::Decoder;
use sessionizer::engine::rules::Rules;
use sessionizer::engine::{Clock, Engine, Out};
use sessionizer_fuzz::Bytes;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let text = if b.u8() & 1 == 0 {
        String::from_utf8_lossy(b.rest()).into_owned()
    } else {
        generate(&mut b)
    };
    // Replaying a crash with this set shows the text the input stands for (README.md).
    if std::env::var_os("FUZZ_PRINT").is_some() {
        eprintln!("----- config text -----\n{text}\n-----------------------");
    }
    check(&text);
});

/// Where an error's key may start: a config key path, or the position of a parse error.
const KEY_STARTS: &[&str] = &[
    "line ",
    "<document>",
    "node_id",
    "cores",
    "memory.",
    "slots.",
    "limits.",
    "persist.",
    "metrics.",
    "log.",
    "listener[",
    "output[",
    "profile",
];

fn check(text: &str) {
    match Config::from_toml(text) {
        Err(e) => {
            assert!(!e.message.is_empty(), "an error without a message: {e:?}");
            assert!(
                KEY_STARTS.iter().any(|k| e.key.starts_with(k)),
                "an error that names no key: {e:?}"
            );
            assert!(e.to_string().contains(&e.key));
        }
        Ok(cfg) => {
            cfg.validate().expect("a validated config validates again");
            let rules = Arc::new(Rules::compile(&cfg).expect("validated rules compile"));
            assert_eq!(rules.profiles.len(), cfg.profiles.len());
            // What `run`, `replay` and a reload do next with a valid config.
            let table = rules.field_table();
            let mut dec = Decoder::new(
                table,
                cfg.limits.json_depth_max,
                cfg.limits.line_bytes_max as usize,
            );
            let m = &cfg.memory;
            if m.arena_bytes.0 <= 1 << 20 && m.max_sessions <= 4096 && cfg.slots.max <= 100_000 {
                let mut engine = Engine::new(rules.clone(), &cfg, 0, None)
                    .expect("an engine from a valid config");
                let mut out = Out::with_capacity(1 << 16, 64);
                let line = br#"{"user":"u","ts":1700000000000,"type":"click","a":{"b":1}}"#;
                if let Ok(ev) = dec.decode(line) {
                    let matching: Vec<_> = rules.matching(&ev).collect();
                    for p in matching {
                        engine.on_event(p, &ev, Clock::Wall(1_700_000_000_000), &mut out);
                    }
                }
                engine.advance(Clock::Wall(1_700_000_100_000), &mut out);
                engine.finish(&mut out);
                assert_eq!(engine.live_sessions(), 0);
            } else {
                let _ = dec.decode(br#"{"user":"u"}"#);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The generator: a TOML document in the config's schema, every choice taken from the input.
// ---------------------------------------------------------------------------------------------

/// TOML basic string literal.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn int(b: &mut Bytes<'_>) -> String {
    let choices: &[i128] = &[
        0,
        1,
        -1,
        2,
        3,
        4,
        7,
        8,
        16,
        31,
        32,
        63,
        64,
        65,
        200,
        255,
        256,
        1024,
        4095,
        4096,
        65_507,
        65_508,
        65_535,
        65_536,
        1 << 20,
        (1 << 20) + 1,
        16 << 20,
        (16 << 20) + 1,
        1 << 30,
        (1 << 30) + 1,
        u32::MAX as i128,
        u32::MAX as i128 + 1,
        i64::MAX as i128,
        i64::MIN as i128,
    ];
    match b.u8() % 8 {
        0 => b.u32().to_string(),
        1 => (b.u64() as i64).to_string(),
        _ => b.pick(choices).to_string(),
    }
}

fn duration(b: &mut Bytes<'_>) -> String {
    let choices = &[
        "0s",
        "0ms",
        "1ms",
        "999ms",
        "1s",
        "2s",
        "30s",
        "59s",
        "1m",
        "30m",
        "2h",
        "1h 30m",
        "7200s",
        "7199s",
        "24h",
        "1y",
        "290000000y",
        "584542046090y",
        "18446744073709551615s",
        "18446744073709551615ms",
        "9223372036854775807ms",
        "9223372036854775808ms",
        "1ns",
        "x",
        "",
        "-1s",
    ];
    if b.u8() % 8 == 0 {
        let n = b.u64();
        let unit = b.pick(&["ns", "us", "ms", "s", "m", "h", "d", "w", "y"]);
        return quote(&format!("{n}{unit}"));
    }
    quote(b.pick(choices))
}

fn byte_size(b: &mut Bytes<'_>) -> String {
    match b.u8() % 4 {
        0 => int(b),
        _ => quote(b.pick(&[
            "0",
            "64",
            "4KiB",
            "4095",
            "64KiB",
            "128KiB",
            "256KiB",
            "1MiB",
            "2MiB",
            "64MiB",
            "1GiB",
            "4GiB",
            "16GiB",
            "17GiB",
            "99999999999GiB",
            "18446744073709551615",
            "18446744073709551616",
            "12 parsecs",
            " 8 K ",
            "",
            "KiB",
        ])),
    }
}

fn text(b: &mut Bytes<'_>, max: usize) -> String {
    String::from_utf8_lossy(b.take(max)).into_owned()
}

fn path(b: &mut Bytes<'_>) -> String {
    let choices = &[
        "user",
        "ts",
        "type",
        "page",
        "price",
        "tab",
        "dev",
        "ets",
        "ip",
        "a.b",
        "a.b.c",
        "ctx",
        "ctx.device.id",
        "_session",
        "é",
        "a..b",
        ".a",
        "a.",
        "",
        ".",
    ];
    match b.u8() % 8 {
        0 => "x".repeat(1 + b.below(160)),
        1 => format!("ctx.{}", "s".repeat(120 + b.below(16))),
        2 => text(b, 12),
        3 => format!("f{}", b.u8()),
        _ => b.pick(choices).to_string(),
    }
}

fn literal(b: &mut Bytes<'_>) -> String {
    match b.u8() % 8 {
        0 => int(b),
        1 => b
            .pick(&["1.5", "-0.0", "inf", "nan", "1e308", "-1e-308"])
            .to_string(),
        2 => b.pick(&["true", "false"]).to_string(),
        3 => "[1, 2]".to_string(),
        4 => "{ x = 1 }".to_string(),
        5 => "1979-05-27T07:32:00Z".to_string(),
        _ => quote(&text(b, 10)),
    }
}

fn predicate(b: &mut Bytes<'_>, depth: u32) -> String {
    let field = format!("field = {}", quote(&path(b)));
    let op = b.u8() % 16;
    // Nest deeper than the compiler's limit (16) sometimes, but not without end.
    let nest = depth < 20 && !b.is_empty();
    match op {
        0 => format!("{{ {field}, eq = {} }}", literal(b)),
        1 => format!("{{ {field}, ne = {} }}", literal(b)),
        2 => {
            let n = b.below(4);
            let items: Vec<String> = (0..n).map(|_| literal(b)).collect();
            format!("{{ {field}, in = [{}] }}", items.join(", "))
        }
        3 => format!("{{ {field}, exists = {} }}", b.bool()),
        4 => format!("{{ {field}, gt = {} }}", literal(b)),
        5 => format!("{{ {field}, le = {} }}", literal(b)),
        6 => format!("{{ {field}, prefix = {} }}", quote(&text(b, 6))),
        7 if nest => format!("{{ not = {} }}", predicate(b, depth + 1)),
        8 | 9 if nest => {
            let n = b.below(4);
            let kids: Vec<String> = (0..n).map(|_| predicate(b, depth + 1)).collect();
            let which = if op == 8 { "all" } else { "any" };
            format!("{{ {which} = [{}] }}", kids.join(", "))
        }
        10 => format!("{{ {field} }}"),
        11 => format!("{{ {field}, eq = 1, ne = 2 }}"),
        12 if nest => format!("{{ {field}, not = {} }}", predicate(b, depth + 1)),
        13 => "{ all = [] }".to_string(),
        14 => format!("{{ {field}, bogus = 1 }}"),
        _ => format!("{{ {field}, eq = {} }}", quote(&text(b, 8))),
    }
}

fn name(b: &mut Bytes<'_>) -> String {
    match b.u8() % 8 {
        0 => text(b, 10),
        1 => "n".repeat(60 + b.below(10)),
        _ => b
            .pick(&[
                "web", "iot", "a", "b", "tab", "x-y_z", "", "bad name", "web",
            ])
            .to_string(),
    }
}

fn address(b: &mut Bytes<'_>) -> String {
    quote(b.pick(&[
        "127.0.0.1:0",
        "127.0.0.1:7070",
        "[::1]:7071",
        "0.0.0.0:9999",
        "127.0.0.1:65536",
        "localhost:1",
        "",
        "127.0.0.1",
    ]))
}

fn cidr(b: &mut Bytes<'_>) -> String {
    quote(b.pick(&[
        "127.0.0.0/8",
        "10.0.0.0/8",
        "::1/128",
        "::/0",
        "0.0.0.0/0",
        "1.2.3.4/33",
        "::/129",
        "1.2.3.4",
        "1.2.3.4/",
        "/8",
        "x",
        "",
    ]))
}

/// Emits `key = value` lines for a random subset of `keys`.
fn some_keys(b: &mut Bytes<'_>, out: &mut String, keys: &[(&str, fn(&mut Bytes<'_>) -> String)]) {
    for (k, v) in keys {
        if b.u8() % 3 == 0 {
            let v = v(b);
            let _ = writeln!(out, "{k} = {v}");
        }
    }
}

fn bool_value(b: &mut Bytes<'_>) -> String {
    b.bool().to_string()
}

fn generate(b: &mut Bytes<'_>) -> String {
    let mut t = String::new();
    if b.u8() % 4 == 0 {
        let _ = writeln!(t, "node_id = {}", int(b));
    }
    match b.u8() % 8 {
        0 => t.push_str("cores = \"all\"\n"),
        1 => {
            let n = b.below(70);
            let ids: Vec<String> = (0..n).map(|_| b.u8().to_string()).collect();
            let _ = writeln!(t, "cores = [{}]", ids.join(", "));
        }
        2 => t.push_str("cores = \"some\"\n"),
        _ => {}
    }
    if b.bool() {
        t.push_str("[memory]\n");
        some_keys(
            b,
            &mut t,
            &[
                ("arena_bytes", byte_size),
                ("block_bytes", int),
                ("max_sessions", int),
                ("on_full", |b| {
                    quote(b.pick(&["evict_oldest", "reject", "x"]))
                }),
            ],
        );
    }
    if b.bool() {
        let _ = writeln!(t, "[slots]\nmax = {}", int(b));
    }
    if b.bool() {
        t.push_str("[limits]\n");
        some_keys(
            b,
            &mut t,
            &[
                ("datagram_bytes_max", int),
                ("line_bytes_max", int),
                ("key_bytes_max", int),
                ("value_bytes_max", int),
                ("json_depth_max", int),
                ("tcp_connections_max", int),
                ("tcp_idle_timeout", duration),
                ("open_sessions_per_key_max", int),
                ("sub_sessions_per_session_max", int),
                ("handoff_batch_events", int),
                ("handoff_batch_bytes", int),
                ("handoff_queue_batches", int),
                ("future_skew_max", duration),
                ("producers_max", int),
            ],
        );
    }
    if b.bool() {
        t.push_str("[persist]\n");
        some_keys(
            b,
            &mut t,
            &[
                ("dir", |b| {
                    quote(b.pick(&["/var/lib/sessionizer", "", "rel"]))
                }),
                ("snapshot_interval", duration),
                ("fsync", |b| {
                    quote(b.pick(&["always", "interval", "never", "sometimes"]))
                }),
                ("fsync_interval", duration),
                ("log_buffer_bytes", byte_size),
            ],
        );
    }
    if b.bool() {
        t.push_str("[metrics]\n");
        some_keys(
            b,
            &mut t,
            &[("address", address), ("publish_interval", duration)],
        );
    }
    if b.u8() % 4 == 0 {
        let _ = writeln!(t, "[log]\nlevel = {}", quote(&text(b, 8)));
    }
    for _ in 0..b.below(3) {
        t.push_str("[[listener]]\n");
        let _ = writeln!(t, "kind = {}", quote(b.pick(&["udp", "tcp", "sctp"])));
        let _ = writeln!(t, "address = {}", address(b));
        some_keys(
            b,
            &mut t,
            &[
                ("ack", bool_value),
                ("allow", |b| {
                    let n = b.below(3);
                    let items: Vec<String> = (0..n).map(|_| cidr(b)).collect();
                    format!("[{}]", items.join(", "))
                }),
            ],
        );
    }
    for _ in 0..b.below(3) {
        t.push_str("[[output]]\n");
        let _ = writeln!(
            t,
            "kind = {}",
            quote(b.pick(&["file", "tcp", "udp", "stdout", "kafka"]))
        );
        some_keys(
            b,
            &mut t,
            &[
                ("streams", |b| {
                    let n = b.below(5);
                    let items: Vec<String> = (0..n)
                        .map(|_| {
                            quote(b.pick(&["events", "markers", "late", "dead_letter", "all"]))
                        })
                        .collect();
                    format!("[{}]", items.join(", "))
                }),
                ("path", |b| quote(b.pick(&["/tmp/out", ""]))),
                ("address", address),
                ("rotate_bytes", byte_size),
                ("fsync_interval", duration),
                ("queue_bytes", byte_size),
                ("when_full", |b| quote(b.pick(&["drop", "block", "wait"]))),
            ],
        );
    }
    let profiles = b.below(4);
    for _ in 0..profiles {
        profile(b, &mut t);
    }
    t
}

fn paths_list(b: &mut Bytes<'_>) -> String {
    let n = b.below(4);
    let items: Vec<String> = (0..n).map(|_| quote(&path(b))).collect();
    format!("[{}]", items.join(", "))
}

fn profile(b: &mut Bytes<'_>, t: &mut String) {
    t.push_str("[[profile]]\n");
    let _ = writeln!(t, "name = {}", quote(&name(b)));
    if b.u8() % 16 != 0 {
        let _ = writeln!(t, "key = {}", quote(&path(b)));
    }
    if b.u8() % 16 != 0 {
        let _ = writeln!(t, "idle_timeout = {}", duration(b));
    }
    some_keys(
        b,
        t,
        &[
            ("time", |b| quote(b.pick(&["processing", "event", "wall"]))),
            ("timestamp", |b| {
                let format = b.pick(&["epoch_s", "epoch_ms", "epoch_us", "rfc3339", "iso"]);
                format!(
                    "{{ field = {}, format = {} }}",
                    quote(&path(b)),
                    quote(format)
                )
            }),
            ("allowed_lateness", duration),
            ("max_duration", duration),
            ("match", |b| predicate(b, 0)),
            ("starts_when", |b| predicate(b, 0)),
            ("ends_when", |b| predicate(b, 0)),
            ("split_on_change", paths_list),
            ("metadata", paths_list),
            ("state", paths_list),
        ],
    );
    for _ in 0..b.below(3) {
        t.push_str("[[profile.counter]]\n");
        let _ = writeln!(t, "name = {}", quote(&name(b)));
        if b.bool() {
            let _ = writeln!(t, "when = {}", predicate(b, 0));
        }
    }
    for _ in 0..b.below(3) {
        t.push_str("[[profile.aggregate]]\n");
        let _ = writeln!(t, "name = {}", quote(&name(b)));
        let _ = writeln!(t, "field = {}", quote(&path(b)));
        let _ = writeln!(t, "op = {}", quote(b.pick(&["sum", "min", "max", "avg"])));
    }
    for _ in 0..b.below(3) {
        t.push_str("[[profile.list]]\n");
        let _ = writeln!(t, "name = {}", quote(&name(b)));
        let _ = writeln!(t, "field = {}", quote(&path(b)));
        let _ = writeln!(t, "max_len = {}", int(b));
        if b.bool() {
            t.push_str("unique = true\n");
        }
    }
    for _ in 0..b.below(3) {
        t.push_str("[[profile.sub_session]]\n");
        let _ = writeln!(t, "name = {}", quote(&name(b)));
        some_keys(
            b,
            t,
            &[
                ("key", |b| quote(&path(b))),
                ("starts_when", |b| predicate(b, 0)),
                ("ends_when", |b| predicate(b, 0)),
                ("idle_timeout", duration),
            ],
        );
        for _ in 0..b.below(2) {
            t.push_str("[[profile.sub_session.counter]]\n");
            let _ = writeln!(t, "name = {}", quote(&name(b)));
        }
    }
}
