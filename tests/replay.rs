//! `sessionizer replay` against a reference: a seeded generator writes a JSON-lines file with
//! several keys, random gaps (some longer than the idle timeouts, some exactly equal to one), a
//! processing-time profile and an event-time profile with different keys; the test computes the
//! expected sessions the simple way (group by key, sort by time, split where the gap exceeds the
//! idle timeout) and requires exact equality of (profile, key, start_ts, last_ts, count) with the
//! `session_end` markers. Two runs must produce byte-identical output.

mod util;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use util::{Rng, BIN};

const BASE_TS: i64 = 1_700_000_000_000;
const PROC_IDLE_MS: i64 = 30_000;
const EVT_IDLE_MS: i64 = 10_000;

const CONFIG: &str = r#"
cores = [0, 1]

[memory]
arena_bytes = "8MiB"
max_sessions = 50000

[log]
level = "warn"

[[profile]]
name = "proc"
key = "user"
time = "processing"
timestamp = { field = "ts", format = "epoch_ms" }
idle_timeout = "30s"

[[profile]]
name = "evt"
key = "device"
time = "event"
timestamp = { field = "ts", format = "epoch_ms" }
idle_timeout = "10s"
"#;

struct Ev {
    ts: i64,
    user: String,
    device: Option<String>,
}

type Sessions = Vec<(String, String, i64, i64, u64)>;

fn generate(seed: u64, n: usize) -> Vec<Ev> {
    let mut r = Rng::new(seed);
    let span_ms = n as u64 * 150;
    let mut evs: Vec<Ev> = (0..n)
        .map(|_| {
            // Skewed key choice: low ids are busy, high ids are rare (long gaps).
            let u_range = r.below(40) + 1;
            let u = r.below(u_range);
            let d_range = r.below(25) + 1;
            let d = r.below(d_range);
            Ev {
                ts: BASE_TS + r.below(span_ms) as i64,
                user: format!("u{u}"),
                device: (r.below(100) != 0).then(|| format!("d{d}")),
            }
        })
        .collect();
    // Boundary cases: exactly `idle` apart stays in the session; one millisecond more splits.
    let t0 = BASE_TS + 1_000_000;
    for (k, idle) in [("edge-u", PROC_IDLE_MS), ("edge-d", EVT_IDLE_MS)] {
        for ts in [t0, t0 + idle, t0 + 2 * idle + 1, t0 + 2 * idle + 1] {
            evs.push(Ev {
                ts,
                user: if k == "edge-u" { k.into() } else { "u0".into() },
                device: Some(if k == "edge-d" { k.into() } else { "d0".into() }),
            });
        }
    }
    evs.sort_by_key(|e| e.ts);
    evs
}

fn write_input(path: &Path, evs: &[Ev]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for (i, e) in evs.iter().enumerate() {
        match &e.device {
            Some(d) => writeln!(
                f,
                "{{\"user\":\"{}\",\"device\":\"{d}\",\"ts\":{},\"type\":\"click\",\"i\":{i}}}",
                e.user, e.ts
            ),
            None => writeln!(f, "{{\"user\":\"{}\",\"ts\":{},\"i\":{i}}}", e.user, e.ts),
        }
        .unwrap();
        if i == evs.len() / 2 {
            writeln!(f, "this is not json").unwrap();
        }
    }
}

fn reference(evs: &[Ev]) -> Sessions {
    let mut out = Vec::new();
    let mut groups: BTreeMap<(&str, &str), Vec<i64>> = BTreeMap::new();
    for e in evs {
        groups.entry(("proc", &e.user)).or_default().push(e.ts);
        if let Some(d) = &e.device {
            groups.entry(("evt", d)).or_default().push(e.ts);
        }
    }
    for ((profile, key), mut ts) in groups {
        let idle = if profile == "proc" {
            PROC_IDLE_MS
        } else {
            EVT_IDLE_MS
        };
        ts.sort_unstable();
        let (mut start, mut last, mut count) = (ts[0], ts[0], 0u64);
        for t in ts {
            if t - last > idle {
                out.push((profile.to_string(), key.to_string(), start, last, count));
                start = t;
                count = 0;
            }
            last = t;
            count += 1;
        }
        out.push((profile.to_string(), key.to_string(), start, last, count));
    }
    out.sort();
    out
}

/// `sessionizer replay input --config <config written to dir> --output out`.
fn replay(dir: &Path, config: &str, input: &Path, out: &Path) -> std::process::Output {
    let cfg = dir.join("replay.toml");
    std::fs::write(&cfg, config).unwrap();
    Command::new(BIN)
        .arg("replay")
        .arg(input)
        .arg("--config")
        .arg(&cfg)
        .arg("--output")
        .arg(out)
        .output()
        .unwrap()
}

fn run_replay(dir: &Path, input: &Path, out_name: &str) -> Vec<u8> {
    let out = dir.join(out_name);
    let r = replay(dir, CONFIG, input, &out);
    assert!(
        r.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    std::fs::read(&out).unwrap()
}

fn session_ends(output: &[u8]) -> Sessions {
    let mut got = Vec::new();
    for line in output.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).expect("every record is JSON");
        if v["kind"] == "session_end" {
            got.push((
                v["profile"].as_str().unwrap().to_string(),
                v["key"].as_str().unwrap().to_string(),
                v["start_ts"].as_i64().unwrap(),
                v["last_ts"].as_i64().unwrap(),
                v["count"].as_u64().unwrap(),
            ));
        }
    }
    got.sort();
    got
}

#[test]
fn replay_matches_the_reference_and_is_deterministic() {
    let seed: u64 = std::env::var("SESSIONIZER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5e55_10e5);
    eprintln!("seed = {seed} (rerun with SESSIONIZER_SEED={seed})");
    let dir = tempfile::tempdir().unwrap();
    let evs = generate(seed, 20_000);
    let input = dir.path().join("events.jsonl");
    write_input(&input, &evs);

    let a = run_replay(dir.path(), &input, "a.jsonl");
    let b = run_replay(dir.path(), &input, "b.jsonl");
    assert!(a == b, "two replays of the same input differ (seed {seed})");

    let want = reference(&evs);
    let got = session_ends(&a);
    if got != want {
        let only_got: Vec<_> = got.iter().filter(|x| !want.contains(x)).take(10).collect();
        let only_want: Vec<_> = want.iter().filter(|x| !got.contains(x)).take(10).collect();
        panic!(
            "seed {seed}: {} sessions, reference {}; only in output: {only_got:#?}; only in reference: {only_want:#?}",
            got.len(),
            want.len()
        );
    }
    // The boundary keys: exactly idle apart joined, one millisecond more split.
    let edge: Vec<_> = got.iter().filter(|s| s.1.starts_with("edge")).collect();
    assert_eq!(edge.len(), 4, "{edge:?}");
    assert!(edge.iter().all(|s| s.4 == 2), "{edge:?}");

    // Undecodable lines and events without a key are dead-lettered, not lost.
    let text = String::from_utf8_lossy(&a);
    assert!(text.contains(r#""transport":"replay","raw":"this is not json""#));
    let missing = evs.iter().filter(|e| e.device.is_none()).count();
    assert_eq!(
        text.matches(r#""reason":"missing_key","profile":"evt""#)
            .count(),
        missing
    );
}

/// Replay has no wall clock: a processing-time profile without `timestamp` is refused up front
/// with the key and the fix, not run with every event dead-lettered as `bad_timestamp`.
#[test]
fn replay_refuses_a_profile_without_a_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace(
        "timestamp = { field = \"ts\", format = \"epoch_ms\" }\nidle_timeout = \"30s\"",
        "idle_timeout = \"30s\"",
    );
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, "{\"user\":\"a\",\"ts\":1700000000000}\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let r = replay(dir.path(), &config, &input, &out);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "replay ran: {stderr}");
    assert!(
        stderr.contains("profile[0] (proc).timestamp") && stderr.contains("add timestamp"),
        "{stderr}"
    );
    assert!(!out.exists(), "no output is written");
}

/// An output that is also an input, or an input that does not exist, is refused before
/// anything is written: the input is not emptied, no empty output is left behind.
#[test]
fn replay_refuses_its_input_as_output_and_a_missing_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let line = "{\"user\":\"a\",\"ts\":1700000000000}\n";
    std::fs::write(&input, line).unwrap();
    let r = replay(dir.path(), CONFIG, &input, &input);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && stderr.contains("is the input"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&input).unwrap(),
        line,
        "input intact"
    );

    let out = dir.path().join("out.jsonl");
    let r = replay(dir.path(), CONFIG, &dir.path().join("missing.jsonl"), &out);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && stderr.contains("missing.jsonl"),
        "{stderr}"
    );
    assert!(!out.exists(), "no output is written");
}
