//! A flood of unique keys far beyond `memory.max_sessions` against the real appliance, under both
//! `on_full` policies. Checks that resident memory stays within the configured reservations plus a
//! constant (the data path does not allocate per session), that the policy is applied and counted
//! (`evict_oldest`: sessions end `evicted`; `reject`: events dead-lettered `session_table_full`),
//! and that a few long-lived keys sent throughout keep one session with the right count.

mod util;

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;
use util::*;

const MAX_SESSIONS: u64 = 1000;
const ARENA_BYTES: u64 = 512 << 10;
const FLOOD_KEYS: u64 = 100_000;
const LONG_LIVED: usize = 4;
const BLOCK_BYTES: u64 = 64;
/// A long-lived key gets an event every this many flood events.
const KEEP_EVERY: u64 = 100;
/// Memory a running appliance may add beyond its session reservations: output and hand-off
/// buffers, per-connection line buffers, allocator slack. Below what 100 000 sessions would need
/// if they were kept (about 12 MiB: 57 bytes of table and index and a 64-byte block each).
const SLACK_BYTES: u64 = 6 << 20;

fn flood_config(dir: &std::path::Path, on_full: &str) -> String {
    let out = dir.join("out");
    format!(
        r#"cores = [0]

[memory]
arena_bytes = {ARENA_BYTES}
block_bytes = {BLOCK_BYTES}
max_sessions = {MAX_SESSIONS}
on_full = "{on_full}"

[metrics]
address = "127.0.0.1:0"
publish_interval = "100ms"

[log]
level = "info"

[[listener]]
kind = "tcp"
address = "127.0.0.1:0"

# A file output that blocks ingest rather than drop, so every record can be checked.
[[output]]
kind = "file"
path = "{out}"
queue_bytes = "1MiB"
when_full = "block"

[[profile]]
name = "web"
key = "user"
idle_timeout = "30m"
ends_when = {{ field = "type", eq = "logout" }}
metadata = ["ip"]
"#,
        out = out.display()
    )
}

/// The output, tallied: records by kind, `session_end` by reason, and the records of the
/// long-lived keys in full.
#[derive(Default)]
struct Seen {
    kinds: BTreeMap<String, u64>,
    end_reasons: BTreeMap<String, u64>,
    enriched: u64,
    keep: Vec<Value>,
}

fn tally(lines: &[String]) -> Seen {
    let mut s = Seen::default();
    for line in lines {
        let v: Value = serde_json::from_str(line).expect("output is JSON lines");
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        if v.get("_session").is_some() {
            s.enriched += 1;
        } else {
            *s.kinds.entry(kind.clone()).or_default() += 1;
        }
        if kind == "session_end" {
            let r = v["reason"].as_str().unwrap().to_string();
            *s.end_reasons.entry(r).or_default() += 1;
        }
        let key = v["key"].as_str().or(v["user"].as_str()).unwrap_or_default();
        if key.starts_with("keep-") {
            s.keep.push(v);
        }
    }
    s
}

struct Flood {
    seen: Seen,
    /// `/metrics` once the long-lived sessions had ended.
    metrics: String,
    rss_before_kib: u64,
    rss_after_kib: u64,
    /// Events sent per long-lived key (the logout included).
    keep_events: u64,
}

fn flood(on_full: &str) -> Flood {
    let mut app = Appliance::start(|d| flood_config(d, on_full));
    let mut input = TcpStream::connect(app.tcp_addr()).unwrap();
    // The long-lived keys open their sessions before the flood, so they exist when it fills the
    // table.
    let mut keep_events = 1;
    let mut batch = String::new();
    for k in 0..LONG_LIVED {
        batch += &format!("{{\"user\":\"keep-{k}\",\"type\":\"click\",\"ip\":\"10.0.0.{k}\"}}\n");
    }
    input.write_all(batch.as_bytes()).unwrap();
    wait_metrics(&app, Duration::from_secs(10), |m| {
        metric_sum(m, "sessionizer_sessions_active", &[]) as usize == LONG_LIVED
    });
    let rss_before_kib = rss_kib(app.pid());

    let mut i = 0u64;
    while i < FLOOD_KEYS {
        batch.clear();
        for _ in 0..KEEP_EVERY.min(FLOOD_KEYS - i) {
            batch +=
                &format!("{{\"user\":\"flood-{i}\",\"type\":\"click\",\"ip\":\"192.0.2.1\"}}\n");
            i += 1;
        }
        for k in 0..LONG_LIVED {
            batch += &format!("{{\"user\":\"keep-{k}\",\"type\":\"click\"}}\n");
        }
        keep_events += 1;
        input.write_all(batch.as_bytes()).unwrap();
    }
    batch.clear();
    for k in 0..LONG_LIVED {
        batch += &format!("{{\"user\":\"keep-{k}\",\"type\":\"logout\"}}\n");
    }
    keep_events += 1;
    input.write_all(batch.as_bytes()).unwrap();

    // Everything sent has been processed once the long-lived sessions have ended.
    let metrics = wait_metrics(&app, Duration::from_secs(60), |m| {
        metric_sum(
            m,
            "sessionizer_sessions_ended_total",
            &[("reason", "ends_when")],
        ) as usize
            == LONG_LIVED
    });
    let rss_after_kib = rss_kib(app.pid());
    drop(input);
    let (status, _) = app.terminate(Duration::from_secs(30));
    assert!(status.success());
    let seen = tally(&app.file_lines());
    Flood {
        seen,
        metrics,
        rss_before_kib,
        rss_after_kib,
        keep_events,
    }
}

/// Resident memory stays within the reservations the configuration asks for, plus a constant.
fn check_memory(f: &Flood, on_full: &str) {
    // Table (48 B) and index (~9.2 B) per session, the arena and its 4-byte links per block:
    // `docs/operations.md`, "Memory sizing".
    let reserved = MAX_SESSIONS * 58 + ARENA_BYTES + ARENA_BYTES / BLOCK_BYTES * 4;
    let bound_kib = f.rss_before_kib + (reserved + SLACK_BYTES) / 1024;
    println!(
        "flood on_full={on_full}: {FLOOD_KEYS} keys, max_sessions {MAX_SESSIONS}, arena {} KiB: VmRSS before {} KiB, after {} KiB (+{} KiB), bound {bound_kib} KiB",
        ARENA_BYTES / 1024,
        f.rss_before_kib,
        f.rss_after_kib,
        f.rss_after_kib.saturating_sub(f.rss_before_kib),
    );
    assert!(
        f.rss_after_kib <= bound_kib,
        "VmRSS grew from {} KiB to {} KiB, over {bound_kib} KiB",
        f.rss_before_kib,
        f.rss_after_kib
    );
}

/// The sessions of one long-lived key, in order: (session_start, enriched events, session_end).
fn sessions_of(seen: &Seen, key: &str) -> Vec<(Value, Vec<Value>, Value)> {
    let recs: Vec<&Value> = seen
        .keep
        .iter()
        .filter(|v| v["key"] == key || v["user"] == key)
        .collect();
    let starts: Vec<&Value> = recs
        .iter()
        .copied()
        .filter(|v| v["kind"] == "session_start")
        .collect();
    starts
        .iter()
        .map(|start| {
            let id = &start["session_id"];
            let events: Vec<Value> = recs
                .iter()
                .filter(|v| v.get("_session").is_some() && &v["_session"]["id"] == id)
                .map(|v| (*v).clone())
                .collect();
            let ends: Vec<&&Value> = recs
                .iter()
                .filter(|v| v["kind"] == "session_end" && &v["session_id"] == id)
                .collect();
            assert_eq!(ends.len(), 1, "{key}: session {id} ends {ends:?}");
            ((*start).clone(), events, (**ends[0]).clone())
        })
        .collect()
}

/// Markers and enriched events of one session agree: seq 1..=count in order, count and ids.
fn check_session(key: &str, (start, events, end): &(Value, Vec<Value>, Value)) {
    let id = &start["session_id"];
    assert_eq!(&end["session_id"], id);
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["_session"]["seq"].as_u64().unwrap())
        .collect();
    let count = end["count"].as_u64().unwrap();
    assert_eq!(seqs, (1..=count).collect::<Vec<_>>(), "{key}: session {id}");
}

#[test]
fn flood_with_evict_oldest_evicts_and_keeps_memory_and_long_lived_sessions() {
    let f = flood("evict_oldest");
    check_memory(&f, "evict_oldest");
    let m = &f.metrics;
    let sent = FLOOD_KEYS + LONG_LIVED as u64 * f.keep_events;
    assert_eq!(
        metric_sum(m, "sessionizer_events_in_total", &[]) as u64,
        sent
    );
    let evictions = metric_sum(m, "sessionizer_evictions_total", &[]) as u64;
    let active = metric_sum(m, "sessionizer_sessions_active", &[]) as u64;
    assert!(active <= MAX_SESSIONS, "{active} sessions active");
    assert_eq!(metric_sum(m, "sessionizer_rejections_total", &[]), 0.0);
    assert!(
        evictions >= FLOOD_KEYS - MAX_SESSIONS,
        "{evictions} evictions"
    );
    // A `block` output never drops, however far one read's records outgrow its queue.
    assert_eq!(metric_sum(m, "sessionizer_output_dropped_total", &[]), 0.0);
    let s = &f.seen;
    assert_eq!(s.end_reasons.get("evicted").copied(), Some(evictions));
    assert_eq!(s.enriched, sent, "every event is enriched");
    assert_eq!(s.kinds.get("dead_letter"), None);
    let starts = s.kinds.get("session_start").copied().unwrap_or(0);
    // Every session started either ended (evicted, ends_when) or was open at shutdown.
    assert_eq!(starts, evictions + LONG_LIVED as u64 + active);
    // A long-lived key may lose its session to an eviction (the policy picks by deadline, to the
    // second, and the flood keys share its second); then its next event starts a new one. Either
    // way no event is lost or counted twice, and each session's markers match its events.
    for k in 0..LONG_LIVED {
        let key = format!("keep-{k}");
        let sessions = sessions_of(s, &key);
        let (last, earlier) = sessions.split_last().expect("a session");
        for sess in &sessions {
            check_session(&key, sess);
        }
        for (_, _, end) in earlier {
            assert_eq!(end["reason"], "evicted", "{end}");
        }
        assert_eq!(last.2["reason"], "ends_when", "{}", last.2);
        let total: u64 = sessions
            .iter()
            .map(|x| x.2["count"].as_u64().unwrap())
            .sum();
        assert_eq!(total, f.keep_events, "{key}");
        assert_eq!(sessions[0].0["metadata"]["ip"], format!("10.0.0.{k}"));
        println!("{key}: {} events in {} sessions", total, sessions.len());
    }
}

#[test]
fn flood_with_reject_dead_letters_and_leaves_existing_sessions_untouched() {
    let f = flood("reject");
    check_memory(&f, "reject");
    let m = &f.metrics;
    let sent = FLOOD_KEYS + LONG_LIVED as u64 * f.keep_events;
    assert_eq!(
        metric_sum(m, "sessionizer_events_in_total", &[]) as u64,
        sent
    );
    let rejections = metric_sum(m, "sessionizer_rejections_total", &[]) as u64;
    // The long-lived sessions hold their slots; the flood gets the rest of the table, no more.
    let admitted = FLOOD_KEYS - rejections;
    assert!(
        admitted <= MAX_SESSIONS - LONG_LIVED as u64,
        "{admitted} flood sessions admitted"
    );
    assert!(admitted > 0, "the table had room when the flood began");
    assert_eq!(
        metric_sum(
            m,
            "sessionizer_dead_letters_by_reason_total",
            &[("reason", "session_table_full")]
        ) as u64,
        rejections
    );
    assert_eq!(metric_sum(m, "sessionizer_evictions_total", &[]), 0.0);
    let s = &f.seen;
    assert_eq!(s.kinds.get("dead_letter").copied(), Some(rejections));
    assert_eq!(s.end_reasons.get("evicted"), None);
    assert_eq!(
        s.kinds.get("session_start").copied(),
        Some(admitted + LONG_LIVED as u64)
    );
    assert_eq!(s.enriched, admitted + LONG_LIVED as u64 * f.keep_events);
    // Existing sessions are untouched: one session per long-lived key with every event.
    for k in 0..LONG_LIVED {
        let key = format!("keep-{k}");
        let sessions = sessions_of(s, &key);
        assert_eq!(sessions.len(), 1, "{key}: {} sessions", sessions.len());
        check_session(&key, &sessions[0]);
        let end = &sessions[0].2;
        assert_eq!(end["reason"], "ends_when", "{end}");
        assert_eq!(end["count"], f.keep_events, "{end}");
        assert_eq!(end["metadata"]["ip"], format!("10.0.0.{k}"));
    }
}
