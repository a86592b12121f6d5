//! Writes the committed seed corpus, `fuzz/corpus/<target>/`, from the code itself: event lines,
//! steering datagrams, the shipped config, and a real snapshot and event log written by the
//! engine and the log writer. Each seed is in its target's input format (a leading mode byte, see
//! each target's header). Run it from `fuzz/` when a format changes:
//!
//! ```text
//! cargo run --example make_seeds
//! ```
//!
//! The output is deterministic (fixed events and clocks), so re-running it changes only what a
//! format change changes.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sessionizer::config::{Config, FsyncPolicy, DEFAULT_TOML};
use sessionizer::decode::Decoder;
use sessionizer::engine::rules::Rules;
use sessionizer::engine::snapshot::SnapshotMeta;
use sessionizer::engine::{Clock, Engine, Out};
use sessionizer::ingest::steering::header_for_key;
use sessionizer::persist::log::{LogConfig, LogWriter};
use sessionizer::persist::snapshot_file::{write_file, HEADER_BYTES};
use sessionizer_fuzz::ENGINE_CONFIG;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("create the corpus directory");
    fs::write(dir.join(name), bytes).expect("write a seed");
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Events of both profiles of `ENGINE_CONFIG`, some ending sessions or sub-sessions.
const EVENTS: &[&str] = &[
    r#"{"user":"u0","ts":1700000000000,"type":"click","page":"/a","tab":"t0","ip":"10.0.0.1","price":2.5}"#,
    r#"{"user":"u1","ts":1700000000100,"type":"view","page":"/b","tab":"t1","ip":"10.0.0.2"}"#,
    r#"{"user":"u0","ts":1700000000200,"type":"click","page":"/c","tab":"t1","price":1}"#,
    r#"{"dev":"d0","ets":1700000000000,"temp":21.5,"fw":"1.0"}"#,
    r#"{"user":"u2","ts":1700000000300,"type":"logout"}"#,
    r#"{"dev":"d1","ets":1700000000500,"temp":-3,"fw":"1.0"}"#,
    r#"{"user":"u1","ts":1700000000400,"type":"close","tab":"t1"}"#,
    r#"{"dev":"d0","ets":1700000000900,"temp":22,"fw":"1.1"}"#,
    r#"{"user":"u3","ts":1700000000500,"type":"click","page":"/é","tab":"t0"}"#,
];

fn main() {
    decode_seeds();
    steering_seeds();
    config_seeds();
    snapshot_seeds();
    log_seeds();
}

fn decode_seeds() {
    // Selector 0: the shipped limits (depth 32, 64 KiB lines).
    let lines: &[&[u8]] = &[
        EVENTS[0].as_bytes(),
        br#"{"user":"alice","ts":1700000000123,"ctx":{"device":{"id":"d-1","os":"linux"},"tags":[1,"two",{}]},"type":"page"}"#,
        br#" {"\u0075ser":"b\u00e9\ud83d\ude00","k\"q":null,"price":-1.5e3,"a":{"b":{"c":true}},"_session":{"old":[1]}}  "#,
        br#"{"_session":1,"user":"x","list":[[[[]]]],"n":0.0001,"z":false}"#,
        b"{\"\xc3\xa9\":\"\xe2\x82\xac\",\"ts\":9223372036854775807,\"type\":\"\\n\\t\\/\"}\r",
    ];
    for (i, line) in lines.iter().enumerate() {
        put("decode", &format!("event-{i}"), &cat(&[&[0], line]));
    }
    // Small limits: depth 3, 64-byte lines.
    put(
        "decode",
        "small-limits",
        &cat(&[&[4], br#"{"a":{"b":{"c":1}},"user":"u"}"#]),
    );
}

fn steering_seeds() {
    // Raw mode, 4 shards: a steered datagram of two events, and one without a header.
    let mut d = header_for_key(b"alice").to_vec();
    d.extend_from_slice(
        b"{\"user\":\"alice\",\"ts\":1700000000000}\n{\"user\":\"alice\",\"type\":\"click\"}\n",
    );
    put("steering", "steered", &cat(&[&[3], &d]));
    put(
        "steering",
        "unsteered",
        &cat(&[&[1], b"{\"user\":\"bob\"}\r\n{\"dev\":7,\"ets\":1}"]),
    );
    put("steering", "short-header", &cat(&[&[2], b"SZH1\x00\x01"]));
    // Built mode, 8 shards: key "carol", three events.
    put(
        "steering",
        "built",
        &cat(&[&[0x87, 1], &[5], b"carol", &[2, 4], b"/home", &[1], b"x"]),
    );
}

fn config_seeds() {
    put("config", "shipped", &cat(&[&[0], DEFAULT_TOML.as_bytes()]));
    put("config", "engine", &cat(&[&[0], ENGINE_CONFIG.as_bytes()]));
    // Structured mode: a few description bytes.
    put(
        "config",
        "generated-0",
        &[1, 4, 7, 1, 3, 0, 9, 1, 1, 2, 0, 1, 5, 3, 2],
    );
    put(
        "config",
        "generated-1",
        &[1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 3, 1, 1, 0, 2, 2, 2, 2],
    );
}

fn engine() -> Engine {
    let cfg = Config::from_toml(ENGINE_CONFIG).expect("the fuzz config is valid");
    let rules = Arc::new(Rules::compile(&cfg).expect("rules compile"));
    let mut e = Engine::new(rules.clone(), &cfg, 0, None).expect("engine");
    let mut dec = Decoder::new(rules.field_table(), 32, 65536);
    let mut out = Out::with_capacity(1 << 16, 256);
    for (i, line) in EVENTS.iter().enumerate() {
        let ev = dec.decode(line.as_bytes()).expect("seed events decode");
        let matching: Vec<_> = rules.matching(&ev).collect();
        for p in matching {
            e.on_event(
                p,
                &ev,
                Clock::Wall(1_700_000_000_000 + 100 * i as i64),
                &mut out,
            );
        }
        out.clear();
    }
    assert!(e.live_sessions() >= 5, "the seed engine holds sessions");
    e
}

fn snapshot_seeds() {
    let dir = std::env::temp_dir().join(format!("sessionizer-seeds-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp dir");
    let meta = SnapshotMeta {
        shard: 0,
        shards: 1,
        generation: 3,
        wall_ms: 1_700_000_001_000,
        log_seq: 12,
    };
    let (path, _) = write_file(&dir, &engine(), meta).expect("write a snapshot");
    let file = fs::read(&path).expect("read the snapshot");
    let body = &file[HEADER_BYTES..];
    // Mode 0 = whole file, 1 = body only; selector 0 = one shard, the seeds' rules (exact
    // restore); 1 = two shards; 0x10 = the other rules (compact restore).
    put("snapshot", "file-exact", &cat(&[&[0, 0], &file]));
    put("snapshot", "file-two-shards", &cat(&[&[0, 1], &file]));
    put("snapshot", "body-exact", &cat(&[&[1, 0], body]));
    put("snapshot", "body-other-rules", &cat(&[&[1, 0x10], body]));
    let _ = fs::remove_dir_all(&dir);
}

fn log_seeds() {
    let dir = std::env::temp_dir().join(format!("sessionizer-seeds-log-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp dir");
    let cfg = LogConfig {
        fsync: FsyncPolicy::Always,
        fsync_interval: Duration::from_millis(10),
        buffer_bytes: 1 << 16,
    };
    let mut w = LogWriter::create(&dir, 0, 1, 1, cfg).expect("create a log");
    for (i, line) in EVENTS.iter().enumerate() {
        if i == 5 {
            w.rotate().expect("rotate");
        }
        w.append(1_700_000_000_000 + i as i64, line.as_bytes())
            .expect("append");
    }
    w.commit_durable().expect("commit");
    drop(w);
    let one = fs::read(dir.join("log-0-1.szl")).expect("first log file");
    let two = fs::read(dir.join("log-0-2.szl")).expect("second log file");
    // Raw mode: mode 0, after_seq 0 (bytes 0, 5), then the file count byte and files.
    put("log", "one-file", &cat(&[&[0, 0, 5, 0], &one]));
    let len = (one.len() as u16).to_le_bytes();
    put("log", "two-files", &cat(&[&[0, 0, 5, 1], &len, &one, &two]));
    // Raw mode, starting after record 3 (bytes 3, 5).
    put(
        "log",
        "two-files-after-3",
        &cat(&[&[0, 3, 5, 1], &len, &one, &two]),
    );
    // Built mode: after 0, first sequence 1, 4 records, 2 files.
    put(
        "log",
        "built",
        &[
            1, 0, 5, 1, 5, 4, 1, 0, 0, 0, 0, 0, 0, 0, 3, b'{', b'}', b' ', 2, 0, 0, 0, 0, 0, 0, 0,
            2, b'{', b'}', 1, 2,
        ],
    );
    let _ = fs::remove_dir_all(&dir);
}
