//! End-to-end tests of the live appliance: the real binary, real sockets, one fresh directory
//! and configuration per test (port 0 everywhere). Each waits for the `READY` line, drives
//! traffic, and checks what the TCP and file outputs received and the per-shard counters the
//! process logs at shutdown.

mod util;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::Duration;
use util::*;

const T: Duration = Duration::from_secs(8);

fn shard_of_id(id: &str) -> u64 {
    (u64::from_str_radix(id, 16).expect("hex id") >> 42) & 63
}

fn owner(key: &str, shards: u32) -> u64 {
    u64::from(sessionizer::engine::fnv1a32(key.as_bytes()) % shards)
}

fn sum(stats: &[Value], field: &str) -> u64 {
    stats.iter().map(|s| s[field].as_u64().unwrap_or(0)).sum()
}

/// Session records per key: (enriched events, starts, ends).
#[derive(Default, Debug)]
struct PerKey {
    events: Vec<Value>,
    starts: Vec<Value>,
    ends: Vec<Value>,
}

fn by_key(lines: &[String]) -> BTreeMap<String, PerKey> {
    let mut m: BTreeMap<String, PerKey> = BTreeMap::new();
    for v in json_lines(lines) {
        match v["kind"].as_str() {
            Some("session_start") => m
                .entry(v["key"].as_str().unwrap().into())
                .or_default()
                .starts
                .push(v),
            Some("session_end") => m
                .entry(v["key"].as_str().unwrap().into())
                .or_default()
                .ends
                .push(v),
            _ if v.get("_session").is_some() => m
                .entry(v["user"].as_str().unwrap().into())
                .or_default()
                .events
                .push(v),
            _ => {}
        }
    }
    m
}

/// Every key has exactly one session holding `n` events, seq 1..=n, one start and one end
/// marker with count n, and lives on its owner shard.
fn assert_whole_sessions(m: &BTreeMap<String, PerKey>, keys: &[String], n: u64, shards: u32) {
    for k in keys {
        let s = m.get(k).unwrap_or_else(|| panic!("no records for key {k}"));
        assert_eq!(
            s.starts.len(),
            1,
            "{k}: session_start markers {:?}",
            s.starts
        );
        assert_eq!(s.ends.len(), 1, "{k}: session_end markers {:?}", s.ends);
        let id = s.starts[0]["session_id"].as_str().unwrap();
        assert_eq!(s.ends[0]["session_id"], id, "{k}");
        assert_eq!(s.ends[0]["count"], n, "{k}: {}", s.ends[0]);
        assert_eq!(s.ends[0]["reason"], "ends_when", "{k}");
        assert_eq!(s.events.len() as u64, n, "{k}: enriched events");
        let seqs: BTreeSet<u64> = s
            .events
            .iter()
            .map(|e| {
                assert_eq!(e["_session"]["id"], id, "{k}: an event left its session");
                assert_eq!(e["_session"]["profile"], "web");
                assert!(e["_session"]["start_ts"].as_i64().unwrap() > 0);
                e["_session"]["seq"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(seqs, (1..=n).collect::<BTreeSet<u64>>(), "{k}");
        assert_eq!(
            shard_of_id(id),
            owner(k, shards),
            "{k}: session not on its owner shard"
        );
    }
}

#[test]
fn udp_events_with_and_without_steering_header_become_sessions() {
    let app = Appliance::start(|d| config(d, &[0, 1], ""));
    let mut out = app.consumer();
    let udp = udp_sender();
    let to = app.udp_addr();
    let plain: Vec<String> = (0..3).map(|i| format!("plain-{i}")).collect();
    let steer: Vec<String> = (0..3).map(|i| format!("steer-{i}")).collect();
    let mut originals = Vec::new();
    for round in 0..3 {
        for k in plain.iter().chain(steer.iter()) {
            let payload = match round {
                0 => format!("{{\"user\":\"{k}\", \"type\":\"click\" ,\"n\":1}}"),
                // Two events in one datagram.
                1 => format!(
                    "{{\"user\":\"{k}\",\"type\":\"page\",\"n\":2}}\n{{\"user\":\"{k}\",\"type\":\"click\",\"n\":3}}\n"
                ),
                _ => format!("{{\"user\":\"{k}\",\"type\":\"logout\",\"n\":4}}"),
            };
            originals.extend(payload.lines().map(str::to_string));
            let d = if k.starts_with("steer") {
                steered(k, payload.as_bytes())
            } else {
                payload.into_bytes()
            };
            udp.send_to(&d, to).unwrap();
        }
    }
    let lines = out
        .read_until(T, |l| count_kind(l, "session_end") == 6)
        .to_vec();
    let keys: Vec<String> = plain.iter().chain(steer.iter()).cloned().collect();
    assert_whole_sessions(&by_key(&lines), &keys, 4, 2);
    // The original bytes are kept; `_session` is spliced in before the closing brace.
    for o in &originals {
        let head = &o[..o.len() - 1];
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(head) && l.contains("\"_session\":{")),
            "no enriched copy of {o}"
        );
    }
    // The file output received the same records.
    let mut tcp_sorted = lines.clone();
    tcp_sorted.sort();
    let files = app.wait_files(T, |f| f.len() >= tcp_sorted.len());
    let mut file_sorted = files;
    file_sorted.sort();
    assert_eq!(file_sorted, tcp_sorted);
}

#[test]
fn steered_udp_needs_no_handoff() {
    let mut app = Appliance::start(|d| config(d, &[0, 1], ""));
    let mut out = app.consumer();
    // One client socket: without steering the kernel would send everything to one shard.
    let udp = udp_sender();
    let to = app.udp_addr();
    let keys: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    for t in ["click", "page", "logout"] {
        for k in &keys {
            let payload = format!("{{\"user\":\"{k}\",\"type\":\"{t}\"}}");
            udp.send_to(&steered(k, payload.as_bytes()), to).unwrap();
        }
    }
    let lines = out
        .read_until(T, |l| count_kind(l, "session_end") == keys.len())
        .to_vec();
    assert_whole_sessions(&by_key(&lines), &keys, 3, 2);
    let (status, took) = app.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(10));
    let stats = app.shard_stats();
    assert_eq!(stats.len(), 2, "{stats:?}");
    assert_eq!(
        sum(&stats, "udp_steered"),
        3 * keys.len() as u64,
        "{stats:?}"
    );
    assert_eq!(sum(&stats, "handoff_events_out"), 0, "{stats:?}");
    assert_eq!(sum(&stats, "udp_steered_handoff"), 0, "{stats:?}");
    assert_eq!(sum(&stats, "udp_missteered"), 0, "{stats:?}");
    for s in &stats {
        assert!(
            s["udp_datagrams"].as_u64().unwrap() > 0,
            "both shards receive: {stats:?}"
        );
    }
}

#[test]
fn unsteered_tcp_sessions_stay_whole_on_their_owner() {
    let mut app = Appliance::start(|d| config(d, &[0, 1], ""));
    let mut out = app.consumer();
    let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    const CONNS: usize = 4;
    const EVENTS: u64 = 5;
    // Each key is sent on one connection (so its order is defined); connections land on
    // either shard, so about half the events need a hand-off to their owner.
    let mut bufs = vec![Vec::new(); CONNS];
    for e in 1..=EVENTS {
        for (i, k) in keys.iter().enumerate() {
            let t = if e == EVENTS { "logout" } else { "click" };
            writeln!(
                bufs[i % CONNS],
                "{{\"user\":\"{k}\",\"type\":\"{t}\",\"e\":{e}}}"
            )
            .unwrap();
        }
    }
    let mut conns: Vec<_> = (0..CONNS)
        .map(|_| std::net::TcpStream::connect(app.tcp_addr()).unwrap())
        .collect();
    // Write in uneven pieces so lines straddle reads.
    for (c, b) in conns.iter_mut().zip(&bufs) {
        for piece in b.chunks(777) {
            c.write_all(piece).unwrap();
        }
    }
    let lines = out
        .read_until(T, |l| count_kind(l, "session_end") == keys.len())
        .to_vec();
    assert_whole_sessions(&by_key(&lines), &keys, EVENTS, 2);
    drop(conns);
    let (status, _) = app.terminate(Duration::from_secs(10));
    assert!(status.success());
    let stats = app.shard_stats();
    let sent = sum(&stats, "handoff_events_out");
    assert!(sent > 0, "with 200 keys some must be handed off: {stats:?}");
    assert_eq!(sent, sum(&stats, "handoff_events_in"), "{stats:?}");
    assert_eq!(sum(&stats, "tcp_events"), keys.len() as u64 * EVENTS);
}

#[test]
fn malformed_tcp_lines_are_dead_lettered_and_good_ones_arrive() {
    let app = Appliance::start(|d| config(d, &[0, 1], "[limits]\nline_bytes_max = 1024\n"));
    let mut out = app.consumer();
    let big = format!(
        "{{\"user\":\"m\",\"type\":\"click\",\"pad\":\"{}\"}}",
        "x".repeat(3000)
    );
    let input = [
        r#"{"user":"m","type":"click","i":1}"#,
        r#"{bad json"#,
        r#"{"user":"m","type":"click","i":2}"#,
        &big,
        r#"{"user":"m","type":"click","i":3}"#,
        r#"[1,2,3]"#,
        r#"{"user":"m","type":"logout","i":4}"#,
    ]
    .join("\n")
        + "\n";
    let _c = tcp_send(app.tcp_addr(), input.as_bytes());
    let lines = out
        .read_until(T, |l| {
            count_kind(l, "session_end") == 1 && count_kind(l, "dead_letter") == 3
        })
        .to_vec();
    assert_whole_sessions(&by_key(&lines), &["m".to_string()], 4, 2);
    let dead: Vec<Value> = json_lines(&lines)
        .into_iter()
        .filter(|v| v["kind"] == "dead_letter")
        .collect();
    let reasons: BTreeSet<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(
        reasons,
        ["invalid_json", "line_too_long", "not_object"]
            .into_iter()
            .collect()
    );
    for d in &dead {
        assert_eq!(d["transport"], "tcp", "{d}");
        assert!(d["raw"].as_str().unwrap().len() <= 1024, "{d}");
    }
}

#[test]
fn oversized_and_refused_datagrams_are_counted() {
    let extra = "[limits]\ndatagram_bytes_max = 512\n\n[[listener]]\nkind = \"udp\"\naddress = \"127.0.0.1:0\"\nallow = [\"10.0.0.0/8\"]\n";
    let mut app = Appliance::start(|d| config(d, &[0], extra));
    let mut out = app.consumer();
    let udp_addrs = app.addresses("listeners", "udp");
    assert_eq!(udp_addrs.len(), 2, "{}", app.ready);
    let udp = udp_sender();
    let big = format!("{{\"user\":\"big\",\"pad\":\"{}\"}}", "y".repeat(1000));
    udp.send_to(big.as_bytes(), udp_addrs[0]).unwrap();
    // From 127.0.0.1, which the second listener's allowlist does not admit.
    udp.send_to(br#"{"user":"refused"}"#, udp_addrs[1]).unwrap();
    udp.send_to(br#"{"user":"ok","type":"logout"}"#, udp_addrs[0])
        .unwrap();
    let lines = out
        .read_until(T, |l| {
            count_kind(l, "session_end") == 1 && count_kind(l, "dead_letter") == 1
        })
        .to_vec();
    let dead: Vec<Value> = json_lines(&lines)
        .into_iter()
        .filter(|v| v["kind"] == "dead_letter")
        .collect();
    assert_eq!(dead[0]["reason"], "datagram_too_long", "{}", dead[0]);
    assert_eq!(dead[0]["transport"], "udp");
    assert!(dead[0]["raw"].as_str().unwrap().len() <= 512);
    let (status, _) = app.terminate(Duration::from_secs(10));
    assert!(status.success());
    let stats = app.shard_stats();
    assert_eq!(sum(&stats, "udp_too_long"), 1, "{stats:?}");
    assert_eq!(sum(&stats, "udp_refused"), 1, "{stats:?}");
    assert!(!lines.iter().any(|l| l.contains("refused")));
}

#[test]
fn sigterm_drains_flushes_and_exits_zero() {
    let mut app = Appliance::start(|d| config(d, &[0, 1], ""));
    let mut out = app.consumer();
    let mut c = tcp_send(app.tcp_addr(), b"{\"user\":\"first\",\"type\":\"click\"}\n");
    // The connection is accepted and being read once its first event comes out.
    out.read_until(T, |l| l.iter().any(|x| x.contains("\"first\"")));
    let mut rest = Vec::new();
    for i in 0..500 {
        writeln!(
            rest,
            "{{\"user\":\"u{}\",\"type\":\"click\",\"i\":{i}}}",
            i % 37
        )
        .unwrap();
    }
    c.write_all(&rest).unwrap();
    let udp = udp_sender();
    for i in 0..20 {
        udp.send_to(format!("{{\"user\":\"d{i}\"}}").as_bytes(), app.udp_addr())
            .unwrap();
    }
    // No waiting: what was sent is in the kernel's buffers and must be read, processed and
    // written before the process exits.
    let (status, took) = app.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let files = app.file_lines();
    let enriched = files
        .iter()
        .filter(|l| l.contains("\"_session\":{"))
        .count();
    assert_eq!(enriched, 1 + 500 + 20, "file output after shutdown");
    let stats = app.shard_stats();
    assert_eq!(sum(&stats, "tcp_events"), 501, "{stats:?}");
    assert_eq!(sum(&stats, "udp_events"), 20, "{stats:?}");
}

/// An event-time profile keyed by `dev` on lines with `"src":"iot"`, idle after 1 s.
fn iot_profile(lateness: &str) -> String {
    format!(
        r#"
[[profile]]
name = "iot"
match = {{ field = "src", eq = "iot" }}
key = "dev"
time = "event"
timestamp = {{ field = "ts", format = "epoch_ms" }}
allowed_lateness = "{lateness}"
idle_timeout = "1s"
"#
    )
}

fn epoch_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// An event-time profile live: once its input stops, the watermark moves on with the wall
/// clock, so the quiet key's session ends (`idle`) with no further event, long before any
/// shutdown.
#[test]
fn event_time_sessions_end_when_their_input_stops() {
    let extra = iot_profile("1s");
    let app = Appliance::start(|d| config(d, &[0, 1], &extra));
    let mut out = app.consumer();
    let now = epoch_ms_now();
    let ts = [now - 200, now - 100, now];
    let mut data = String::new();
    for t in ts {
        data.push_str(&format!(
            "{{\"user\":\"u1\",\"src\":\"iot\",\"dev\":\"d1\",\"ts\":{t}}}\n"
        ));
    }
    let _conn = tcp_send(app.tcp_addr(), data.as_bytes());
    let is_iot_end = |l: &String| l.contains("\"kind\":\"session_end\"") && l.contains("\"iot\"");
    let lines = out.read_until(T, |l| l.iter().any(is_iot_end)).to_vec();
    let end: Value = serde_json::from_str(lines.iter().find(|l| is_iot_end(l)).unwrap()).unwrap();
    assert_eq!(end["reason"], "idle", "{end}");
    assert_eq!(end["count"], 3, "{end}");
    assert_eq!(end["start_ts"], ts[0], "{end}");
    assert_eq!(end["last_ts"], ts[2], "{end}");
}

/// The watermark an expiry pass ended sessions by stays (docs/semantics.md, "Time"), live: a
/// quiet key's session ends by the idle advance; an event then accepted within the lateness
/// does not set the watermark back to its own time, so an older event of the ended session's
/// key is late, not a second session. (Before, the second event took the watermark back to
/// `ts - lateness`, and the older event, there exactly, opened a new session of `d1`.)
#[test]
fn an_event_behind_the_pass_that_ended_its_session_is_late() {
    let extra = iot_profile("3s");
    // One shard: the watermark is the shard's.
    let app = Appliance::start(|d| config(d, &[0], &extra));
    let mut out = app.consumer();
    let t0 = epoch_ms_now();
    let line = |dev: &str, ts: i64| {
        format!("{{\"user\":\"u1\",\"src\":\"iot\",\"dev\":\"{dev}\",\"ts\":{ts}}}\n")
    };
    let _first = tcp_send(app.tcp_addr(), line("d1", t0).as_bytes());
    let is_iot =
        |l: &str, kind: &str| l.contains(&format!("\"kind\":\"{kind}\"")) && l.contains("\"iot\"");
    // The pass ends d1's session once the watermark (t0 + wall time since - 3 s) is past its
    // deadline, t0 + 1 s, by the wheel's second: 4 to 5 s after t0.
    out.read_until(T, |l| l.iter().any(|l| is_iot(l, "session_end")));
    // d2 at t0 + 4 s: not late (the watermark is about now - 3 s). d1 at t0 + 1 s: behind the
    // pass's watermark, within the ended session's reach (exactly `idle` after its event).
    let more = line("d2", t0 + 4_000) + &line("d1", t0 + 1_000);
    let _second = tcp_send(app.tcp_addr(), more.as_bytes());
    let lines = out
        .read_until(T, |l| {
            l.iter().any(|l| is_iot(l, "late_event"))
                || l.iter().filter(|l| is_iot(l, "session_start")).count() == 3
        })
        .to_vec();
    let recs = json_lines(&lines);
    let iot: Vec<&Value> = recs.iter().filter(|r| r["profile"] == "iot").collect();
    let kinds: Vec<(&str, &str)> = iot
        .iter()
        .map(|r| (r["kind"].as_str().unwrap(), r["key"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("session_start", "d1"),
            ("session_end", "d1"),
            ("session_start", "d2"),
            ("late_event", "d1")
        ],
        "{lines:#?}"
    );
    let late = iot[3];
    assert_eq!(late["ts"], t0 + 1_000, "{late}");
    assert!(late["watermark"].as_i64().unwrap() > t0 + 1_000, "{late}");
}

/// Outputs that carry only the markers: the shards leave the events unwritten (none counted
/// on the events stream), and the sessions, their ids and statistics are the same.
#[test]
fn markers_only_outputs_get_whole_sessions_and_no_events_are_written() {
    let app = Appliance::start(|d| {
        config(d, &[0, 1], "[metrics]\naddress = \"127.0.0.1:0\"\n")
            .replacen(
                "[[output]]\nkind = \"tcp\"\n",
                "[[output]]\nkind = \"tcp\"\nstreams = [\"markers\"]\n",
                1,
            )
            .replacen(
                "[[output]]\nkind = \"file\"\n",
                "[[output]]\nkind = \"file\"\nstreams = [\"markers\"]\n",
                1,
            )
    });
    let mut out = app.consumer();
    let keys: Vec<String> = (0..20).map(|i| format!("m-{i}")).collect();
    let mut data = String::new();
    for ty in ["click", "page", "logout"] {
        for k in &keys {
            data.push_str(&format!("{{\"user\":\"{k}\",\"type\":\"{ty}\"}}\n"));
        }
    }
    let _conn = tcp_send(app.tcp_addr(), data.as_bytes());
    let lines = out
        .read_until(T, |l| count_kind(l, "session_end") == keys.len())
        .to_vec();
    let recs = json_lines(&lines);
    assert!(
        recs.iter()
            .all(|r| r["kind"] == "session_start" || r["kind"] == "session_end"),
        "{lines:#?}"
    );
    let mut starts = BTreeMap::new();
    for r in &recs {
        if r["kind"] == "session_start" {
            starts.insert(
                r["key"].as_str().unwrap().to_string(),
                r["session_id"].clone(),
            );
        }
    }
    assert_eq!(starts.len(), keys.len());
    for r in recs.iter().filter(|r| r["kind"] == "session_end") {
        assert_eq!(r["count"], 3, "{r}");
        assert_eq!(r["reason"], "ends_when", "{r}");
        assert_eq!(r["session_id"], starts[r["key"].as_str().unwrap()], "{r}");
    }
    let files = app.wait_files(T, |f| f.len() >= lines.len());
    assert_eq!(files.len(), lines.len(), "{files:#?}");
    let events = (3 * keys.len()) as f64;
    let text = wait_metrics(&app, T, |t| {
        metric_sum(t, "sessionizer_events_in_total", &[]) >= events
            && metric_sum(t, "sessionizer_events_out_total", &[("stream", "markers")])
                >= (2 * keys.len()) as f64
    });
    assert_eq!(
        metric_sum(
            &text,
            "sessionizer_events_out_total",
            &[("stream", "events")]
        ),
        0.0,
        "{text}"
    );
}

/// The CPUs a thread may run on, from `Cpus_allowed_list` in its `status` (e.g. `0-2,5`).
fn allowed_cpus(status_path: &std::path::Path) -> BTreeSet<usize> {
    let status = std::fs::read_to_string(status_path).expect("task status");
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_string();
    let mut cpus = BTreeSet::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => {
                cpus.insert(part.parse().unwrap());
            }
        }
    }
    cpus
}

/// With `cores = [0]`, the shard runs on CPU 0 and every other thread (sinks, metrics, signals)
/// on the other CPUs this process may use; with no other CPU, where this process may run.
#[test]
fn threads_other_than_shards_stay_off_the_shards_cpus() {
    let mine = allowed_cpus(std::path::Path::new("/proc/thread-self/status"));
    if !mine.contains(&0) {
        // The shard could not be placed on CPU 0 here; nothing to check.
        return;
    }
    let app = Appliance::start(|d| config(d, &[0], "[metrics]\naddress = \"127.0.0.1:0\"\n"));
    let others: BTreeSet<usize> = mine.iter().copied().filter(|&c| c != 0).collect();
    let want_helpers = if others.is_empty() {
        mine.clone()
    } else {
        others
    };
    let tasks = std::path::PathBuf::from(format!("/proc/{}/task", app.pid()));
    let mut seen = BTreeSet::new();
    for task in std::fs::read_dir(&tasks).expect("task dir") {
        let task = task.expect("task").path();
        let name = std::fs::read_to_string(task.join("comm")).expect("comm");
        let name = name.trim();
        let cpus = allowed_cpus(&task.join("status"));
        if name.starts_with("shard0") {
            assert_eq!(cpus, BTreeSet::from([0]), "shard thread {name}");
        } else {
            assert_eq!(cpus, want_helpers, "thread {name}");
        }
        seen.insert(name.to_string());
    }
    assert!(seen.iter().any(|n| n.starts_with("shard0")), "{seen:?}");
    assert!(seen.iter().any(|n| n.starts_with("out-")), "{seen:?}");
    if mine.len() > 1 {
        app.wait_stderr(T, |l| l.contains("helper threads on cpus"));
    }
}

#[test]
fn check_config_accepts_the_reference_and_rejects_a_broken_one() {
    let reference = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/sessionizer.toml");
    let ok = std::process::Command::new(BIN)
        .args(["check-config", reference])
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let text = String::from_utf8_lossy(&ok.stdout);
    for needle in [
        "shards", "arena", "blocks", "table", "index", "listener", "output", "profile",
    ] {
        assert!(text.contains(needle), "summary lacks {needle}:\n{text}");
    }

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let broken = "[memory]\nblock_bytes = 3\n\n[[profile]]\nname = \"w\"\nkey = \"user\"\nidle_timeout = \"1m\"\n";
    std::fs::write(&bad, broken).unwrap();
    let r = std::process::Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("memory.block_bytes"), "{err}");

    // The same error stops `run` with the same exit code.
    let r = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
}

// ---------------------------------------------------------------------------------------------
// Load runs: small by default so CI checks that everything sent arrives; the recorded
// measurements scale them up in release:
//   SESSIONIZER_LOAD_EVENTS=4000000 SESSIONIZER_LOAD_SECS=3 \
//   cargo test --release --test appliance -- --nocapture --test-threads 1 load_
// Knobs: SESSIONIZER_LOAD_EVENTS, SESSIONIZER_LOAD_SHARD_CORES (e.g. "0" or "0,1"),
// SESSIONIZER_LOAD_CLIENT_CORE (the core the load generator is pinned to).
// ---------------------------------------------------------------------------------------------

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn load_cores() -> (Vec<usize>, Option<usize>) {
    let shard_cores: Vec<usize> = std::env::var("SESSIONIZER_LOAD_SHARD_CORES")
        .unwrap_or_else(|_| "0".into())
        .split(',')
        .map(|c| c.trim().parse().expect("core id"))
        .collect();
    let client = std::env::var("SESSIONIZER_LOAD_CLIENT_CORE")
        .ok()
        .map(|c| c.parse().expect("core id"))
        .or(if shard_cores == [0] { Some(1) } else { None });
    (shard_cores, client)
}

fn pin_current_thread(core: Option<usize>) {
    let Some(core) = core else { return };
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it; sched_setaffinity(0)
    // applies to the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A web-analytics profile like the reference configuration, plus a `sentinel` profile whose
/// single-event sessions tell the load generator that a connection's events were processed.
fn load_config(dir: &std::path::Path, cores: &[usize]) -> String {
    let _ = dir;
    format!(
        r#"cores = {cores:?}

[memory]
arena_bytes = "64MiB"
max_sessions = 200000

[log]
level = "info"

[[listener]]
kind = "udp"
address = "127.0.0.1:0"

[[listener]]
kind = "tcp"
address = "127.0.0.1:0"

[[output]]
kind = "tcp"
address = "127.0.0.1:0"
streams = ["markers"]

[[profile]]
name = "web"
match = {{ field = "user", exists = true }}
key = "user"
idle_timeout = "30m"
ends_when = {{ field = "type", eq = "logout" }}
metadata = ["ip", "ua"]
state = ["page"]

[[profile.counter]]
name = "clicks"
when = {{ field = "type", eq = "click" }}

[[profile]]
name = "sentinel"
match = {{ field = "sentinel", exists = true }}
key = "sentinel"
idle_timeout = "1m"
ends_when = {{ field = "sentinel", exists = true }}
"#
    )
}

/// ~150-byte clickstream events over 10k users.
fn load_events(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|i| {
            let u = r.below(10_000);
            let t = ["click", "page", "view"][r.below(3) as usize];
            format!(
                "{{\"user\":\"u{u:05}\",\"type\":\"{t}\",\"page\":\"/products/item-{:06}\",\"ts\":{},\"ip\":\"10.0.{}.{}\",\"ua\":\"Mozilla/5.0 (X11)\"}}\n",
                r.below(1_000_000),
                1_700_000_000_000u64 + i as u64,
                r.below(256),
                r.below(256)
            )
            .into_bytes()
        })
        .collect()
}

fn sentinel_done(lines: &[String], want: usize) -> bool {
    lines
        .iter()
        .filter(|l| l.contains("\"session_end\"") && l.contains("\"profile\":\"sentinel\""))
        .count()
        >= want
}

#[test]
fn load_tcp() {
    let (cores, client) = load_cores();
    let n: usize = env_or("SESSIONIZER_LOAD_EVENTS", 200_000);
    let conns: usize = env_or("SESSIONIZER_LOAD_CONNS", 2);
    pin_current_thread(client);
    let events = load_events(n, 7);
    let bytes: usize = events.iter().map(|e| e.len()).sum();
    let per: Vec<Vec<u8>> = (0..conns)
        .map(|c| {
            let mut b: Vec<u8> = events
                .iter()
                .skip(c)
                .step_by(conns)
                .flatten()
                .copied()
                .collect();
            b.extend_from_slice(format!("{{\"sentinel\":\"tcp-{c}\"}}\n").as_bytes());
            b
        })
        .collect();
    drop(events);
    let mut app = Appliance::start(|d| load_config(d, &cores));
    let mut out = app.consumer();
    let addr = app.tcp_addr();
    let t0 = std::time::Instant::now();
    let senders: Vec<_> = per
        .into_iter()
        .map(|b| {
            std::thread::spawn(move || {
                pin_current_thread(client);
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(&b).unwrap();
                s
            })
        })
        .collect();
    let _streams: Vec<_> = senders.into_iter().map(|h| h.join().unwrap()).collect();
    let sent = t0.elapsed();
    out.read_until(Duration::from_secs(120), |l| sentinel_done(l, conns));
    let took = t0.elapsed();
    let (status, _) = app.terminate(Duration::from_secs(10));
    assert!(status.success());
    let stats = app.shard_stats();
    let processed = sum(&stats, "tcp_events");
    assert_eq!(processed as usize, n + conns);
    let cpu_s = sum(&stats, "cpu_us") as f64 / 1e6;
    eprintln!(
        "LOAD tcp: shards on cores {cores:?}, client core {client:?}, {conns} connections: {n} events ({} MB) in {:.3} s (sent in {:.3} s) = {:.2} M events/s wall, {:.2} M events/s per shard; shard CPU {cpu_s:.3} s = {:.2} M events per CPU-second; handoffs {}",
        bytes / 1_000_000,
        took.as_secs_f64(),
        sent.as_secs_f64(),
        n as f64 / took.as_secs_f64() / 1e6,
        n as f64 / took.as_secs_f64() / 1e6 / cores.len() as f64,
        n as f64 / cpu_s / 1e6,
        sum(&stats, "handoff_events_out"),
    );
}

#[test]
fn load_udp() {
    let (cores, client) = load_cores();
    let secs: f64 = env_or("SESSIONIZER_LOAD_SECS", 0.5);
    let per_datagram: usize = env_or("SESSIONIZER_LOAD_EVENTS_PER_DATAGRAM", 10);
    pin_current_thread(client);
    let mut app = Appliance::start(|d| load_config(d, &cores));
    let mut out = app.consumer();
    let events = load_events(200_000, 11);
    let datagrams: Vec<Vec<u8>> = events.chunks(per_datagram).map(|c| c.concat()).collect();
    let udp = udp_sender();
    udp.connect(app.udp_addr()).unwrap();
    let t0 = std::time::Instant::now();
    let mut sent_events = 0u64;
    let mut i = 0;
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            let d = &datagrams[i % datagrams.len()];
            if udp.send(d).is_ok() {
                sent_events += per_datagram as u64;
            }
            i += 1;
        }
    }
    let sent = t0.elapsed();
    // Several sentinels: one may be dropped with the rest under overload.
    for k in 0..20 {
        udp.send(format!("{{\"sentinel\":\"udp-{k}\"}}").as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    out.read_until(Duration::from_secs(60), |l| sentinel_done(l, 1));
    let took = t0.elapsed();
    let (status, _) = app.terminate(Duration::from_secs(10));
    assert!(status.success());
    let stats = app.shard_stats();
    let processed = sum(&stats, "udp_events");
    let cpu_s = sum(&stats, "cpu_us") as f64 / 1e6;
    eprintln!(
        "LOAD udp: shards on cores {cores:?}, client core {client:?}, {per_datagram} events/datagram: sent {sent_events} events in {:.3} s ({:.2} M/s), processed {processed} in {:.3} s = {:.2} M events/s wall, {:.2} M events/s per shard; shard CPU {cpu_s:.3} s = {:.2} M events per CPU-second; kernel drops {} datagrams",
        sent.as_secs_f64(),
        sent_events as f64 / sent.as_secs_f64() / 1e6,
        took.as_secs_f64(),
        processed as f64 / took.as_secs_f64() / 1e6,
        processed as f64 / took.as_secs_f64() / 1e6 / cores.len() as f64,
        processed as f64 / cpu_s / 1e6,
        sum(&stats, "udp_drops"),
    );
}
