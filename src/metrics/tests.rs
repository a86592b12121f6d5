//! Publisher, latency window and documentation checks, each against a local recorder so tests
//! neither share nor need the global one.

use super::*;
use crate::config::Config;
use metrics_exporter_prometheus::PrometheusRecorder;

fn recorder() -> PrometheusRecorder {
    PrometheusBuilder::new().build_recorder()
}

/// The value of the series `name` whose labels include every `key="value"` in `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let want = labels
            .iter()
            .all(|(k, val)| rest.split(',').any(|p| p == format!("{k}=\"{val}\"")));
        (n == name && want).then(|| v.parse().unwrap())
    })
}

fn rules(profiles: &str) -> Rules {
    let cfg = Config::from_toml(&format!(
        "[memory]\narena_bytes = \"1MiB\"\nmax_sessions = 1000\n{profiles}"
    ))
    .unwrap();
    Rules::compile(&cfg).unwrap()
}

const PROFILES: &str = r#"
[[profile]]
name = "web"
key = "user"
idle_timeout = "30m"
[[profile.sub_session]]
name = "checkout"
starts_when = { field = "type", eq = "cart" }
[[profile]]
name = "api"
key = "client"
idle_timeout = "5m"
"#;

#[test]
fn profile_labels_follow_record_profile_ids() {
    let r = rules(PROFILES);
    let labels = profile_labels(&r);
    let got: Vec<&str> = labels.iter().map(|l| &**l).collect();
    assert_eq!(got.len(), r.record_profile_count());
    assert_eq!(&got[..2], &["web", "api"]);
    assert_eq!(
        got[r.profiles[0].subs[0].record_profile as usize],
        "web/checkout"
    );
}

fn sample() -> ShardSample {
    ShardSample::new(profile_labels(&rules(PROFILES)))
}

#[test]
fn publish_increments_counters_by_the_delta_and_sets_gauges() {
    let rec = recorder();
    let h = rec.handle();
    let (mut s, mut prev) = (sample(), sample());
    s.events_in = [5, 2];
    s.events_out[stream_index(Stream::DeadLetter)] = 4;
    s.engine.sessions_started = 3;
    s.engine.sessions_ended[EndReason::Idle as usize] = 1;
    s.engine.sessions_ended[EndReason::Evicted as usize] = 1;
    s.engine.evictions = 1;
    s.engine.sub_session_limit = 6;
    s.engine.sub_sessions_full = 2;
    s.engine.captures_dropped = 9;
    s.engine.active_by_profile = vec![2, 0, 1];
    s.engine.blocks_used = 10;
    s.engine.blocks_total = 64;
    s.engine.dead_letters = 1;
    s.parse_errors[3] = 2;
    s.ingest_dead_letters = 3;
    s.handoff_events_out = 7;
    s.handoff_queue_batches = 2;
    s.refused = [0, 1];
    s.expiry_lag_us = 1_500_000;
    s.snapshot_us_total = 250_000;
    s.snapshot_last_us = 250_000;
    s.snapshot_write_rate = 8 << 20;
    metrics::with_local_recorder(&rec, || publish(3, &s, &mut prev));
    let t = h.render();
    let sh = ("shard", "3");
    assert_eq!(value(&t, EVENTS_IN, &[("transport", "udp"), sh]), Some(5.0));
    assert_eq!(value(&t, EVENTS_IN, &[("transport", "tcp"), sh]), Some(2.0));
    assert_eq!(
        value(&t, EVENTS_OUT, &[("stream", "dead_letter"), sh]),
        Some(4.0)
    );
    assert_eq!(
        value(&t, EVENTS_OUT, &[("stream", "events"), sh]),
        Some(0.0),
        "zero series exist"
    );
    assert_eq!(
        value(&t, MARKERS, &[("kind", "session_start"), sh]),
        Some(3.0)
    );
    assert_eq!(
        value(&t, MARKERS, &[("kind", "session_end"), sh]),
        Some(2.0)
    );
    assert_eq!(
        value(&t, SESSIONS_ENDED, &[("reason", "evicted"), sh]),
        Some(1.0)
    );
    assert_eq!(
        value(&t, SUB_SESSIONS_NOT_STARTED, &[("reason", "limit"), sh]),
        Some(6.0)
    );
    assert_eq!(
        value(&t, SUB_SESSIONS_NOT_STARTED, &[("reason", "full"), sh]),
        Some(2.0)
    );
    assert_eq!(value(&t, CAPTURES_DROPPED, &[sh]), Some(9.0));
    assert_eq!(
        value(&t, SESSIONS_ACTIVE, &[("profile", "web"), sh]),
        Some(2.0)
    );
    assert_eq!(
        value(&t, SESSIONS_ACTIVE, &[("profile", "web/checkout"), sh]),
        Some(1.0)
    );
    assert_eq!(
        value(&t, ARENA_BLOCKS, &[("state", "free"), sh]),
        Some(54.0)
    );
    assert_eq!(
        value(
            &t,
            PARSE_ERRORS,
            &[("reason", DecodeError::ALL[3].label()), sh]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&t, DEAD_LETTERS, &[("source", "ingest"), sh]),
        Some(3.0)
    );
    assert_eq!(
        value(&t, DEAD_LETTERS, &[("source", "engine"), sh]),
        Some(1.0)
    );
    assert_eq!(
        value(&t, HANDOFF_EVENTS, &[("direction", "out"), sh]),
        Some(7.0)
    );
    assert_eq!(value(&t, HANDOFF_QUEUE_BATCHES, &[sh]), Some(2.0));
    assert_eq!(value(&t, REFUSED, &[("transport", "tcp"), sh]), Some(1.0));
    assert_eq!(value(&t, EXPIRY_LAG, &[sh]), Some(1.5));
    assert_eq!(value(&t, SNAPSHOT_MICROSECONDS, &[sh]), Some(250_000.0));
    assert_eq!(value(&t, SNAPSHOT_LAST_SECONDS, &[sh]), Some(0.25));
    assert_eq!(
        value(&t, SNAPSHOT_WRITE_RATE, &[sh]),
        Some(f64::from(8u32 << 20))
    );

    // Second tick: counters move by the difference, gauges follow the value.
    s.events_in = [12, 2];
    s.engine.active_by_profile = vec![1, 0, 0];
    s.handoff_queue_batches = 0;
    metrics::with_local_recorder(&rec, || publish(3, &s, &mut prev));
    let t = h.render();
    assert_eq!(
        value(&t, EVENTS_IN, &[("transport", "udp"), sh]),
        Some(12.0)
    );
    assert_eq!(value(&t, EVENTS_IN, &[("transport", "tcp"), sh]), Some(2.0));
    assert_eq!(
        value(&t, SESSIONS_ACTIVE, &[("profile", "web"), sh]),
        Some(1.0)
    );
    assert_eq!(value(&t, HANDOFF_QUEUE_BATCHES, &[sh]), Some(0.0));
    assert_eq!(
        value(&t, MARKERS, &[("kind", "session_start"), sh]),
        Some(3.0)
    );

    // A source that restarted from zero (an engine rebuilt by recovery) never steps back.
    s.events_in = [4, 2];
    metrics::with_local_recorder(&rec, || publish(3, &s, &mut prev));
    let t = h.render();
    assert_eq!(
        value(&t, EVENTS_IN, &[("transport", "udp"), sh]),
        Some(16.0)
    );
}

#[test]
fn remember_copies_without_reallocating() {
    let (mut s, mut prev) = (sample(), sample());
    s.engine.active_by_profile = vec![1, 2, 3];
    s.engine.merges = 9;
    s.log_flush_last_us = 77;
    record_latency_ns(&mut s.latency, 5_000);
    prev.remember(&s);
    let ptr = prev.engine.active_by_profile.as_ptr();
    s.engine.active_by_profile = vec![4, 5, 6];
    prev.remember(&s);
    assert_eq!(prev.engine.active_by_profile, vec![4, 5, 6]);
    assert_eq!(prev.engine.active_by_profile.as_ptr(), ptr);
    assert_eq!(prev.engine.merges, 9);
    assert_eq!(prev.log_flush_last_us, 77);
    assert_eq!(prev.latency.len(), 1);

    let mut stats = Stats {
        evictions: 4,
        active_by_profile: vec![7, 8, 9],
        ..Stats::default()
    };
    let ptr = s.engine.active_by_profile.as_ptr();
    s.copy_engine(&stats);
    assert_eq!(s.engine.active_by_profile, vec![7, 8, 9]);
    assert_eq!(
        s.engine.active_by_profile.as_ptr(),
        ptr,
        "no new allocation"
    );
    stats.evictions = 5;
    s.copy_engine(&stats);
    assert_eq!(s.engine.evictions, 5);
}

#[test]
fn publish_outputs_tracks_sinks_by_name() {
    let rec = recorder();
    let h = rec.handle();
    let mut prev = Vec::new();
    let mut stats = vec![OutputStats {
        name: "tcp 127.0.0.1:7072".into(),
        kind: "tcp",
        records: 10,
        bytes: 1000,
        dropped: 1,
        queue_depth: 3,
        consumers: 2,
    }];
    metrics::with_local_recorder(&rec, || publish_outputs(&stats, &mut prev));
    stats[0].records = 15;
    stats[0].queue_depth = 0;
    metrics::with_local_recorder(&rec, || publish_outputs(&stats, &mut prev));
    let t = h.render();
    let o = [("output", "tcp 127.0.0.1:7072"), ("kind", "tcp")];
    assert_eq!(value(&t, OUTPUT_RECORDS, &o), Some(15.0));
    assert_eq!(value(&t, OUTPUT_BYTES, &o), Some(1000.0));
    assert_eq!(value(&t, OUTPUT_DROPPED, &o), Some(1.0));
    assert_eq!(value(&t, OUTPUT_QUEUE_BATCHES, &o), Some(0.0));
    assert_eq!(value(&t, OUTPUT_CONSUMERS, &o), Some(2.0));
}

#[test]
fn count_streams_counts_records_per_stream() {
    let mut out = Out::with_capacity(1024, 16);
    out.passthrough(b"{}");
    out.passthrough(b"{}");
    out.dead_letter("invalid_json", "udp", b"{");
    let mut counts = [0u64; STREAMS.len()];
    count_streams(&out, &mut counts);
    assert_eq!(counts, [2, 0, 0, 1]);
}

fn hist(values_us: &[u64]) -> Histogram<u64> {
    let mut h = latency_histogram();
    for v in values_us {
        record_latency_ns(&mut h, v * 1_000);
    }
    h
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= b * 0.01 + 1e-9
}

#[test]
fn latency_window_merges_shard_deltas_and_slides() {
    let mut w = LatencyWindow::new();
    let s = w.rotate();
    assert_eq!(s.samples, 0);
    assert!(
        s.quantiles.iter().all(|q| q.is_nan()) && s.max.is_nan(),
        "empty window: NaN, not 0"
    );

    // Shard 0 has 100 samples of 100 µs; shard 1, 100 of 10 ms. Only the delta counts.
    let zero = latency_histogram();
    let a = hist(&[100; 100]);
    let b = hist(&[10_000; 100]);
    assert_eq!(w.add_delta(&a, &zero), 100);
    assert_eq!(w.add_delta(&b, &zero), 100);
    assert_eq!(w.add_delta(&b, &b), 0, "nothing new since the last publish");
    let s = w.rotate();
    assert_eq!(s.samples, 200);
    assert!(close(s.quantiles[0], 100e-6), "p50 {}", s.quantiles[0]);
    assert!(close(s.quantiles[1], 10e-3), "p90 {}", s.quantiles[1]);
    assert!(close(s.max, 10e-3), "max {}", s.max);

    // A histogram smaller than before was replaced: all of it is new.
    assert_eq!(w.add_delta(&a, &b), 100);

    // After LATENCY_WINDOW_SLOTS rotations with nothing new, the old samples are gone.
    for _ in 0..LATENCY_WINDOW_SLOTS {
        w.rotate();
    }
    assert_eq!(w.rotate().samples, 0);
}

#[test]
fn latency_saturates_instead_of_failing() {
    let mut h = latency_histogram();
    record_latency_ns(&mut h, u64::MAX);
    record_latency_ns(&mut h, 0);
    assert_eq!(h.len(), 2);
    assert!(h.max() >= LATENCY_HIGH_NS);
    // The size promised in the constant's comment (~21 KiB per histogram).
    assert!(
        h.distinct_values() * 8 <= 22 << 10,
        "{} counts",
        h.distinct_values()
    );
}

#[test]
fn every_metric_is_documented_with_its_type() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    for &(name, _) in ALL_METRICS {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}`")))
            .unwrap_or_else(|| panic!("docs/metrics.md has no row for {name}"));
        let kind = if is_counter(name) { "counter" } else { "gauge" };
        assert!(
            row.contains(&format!("| {kind} |")),
            "{name} must be documented as a {kind}: {row}"
        );
    }
    let names: std::collections::HashSet<_> = ALL_METRICS.iter().map(|m| m.0).collect();
    assert_eq!(names.len(), ALL_METRICS.len(), "duplicate metric names");
}

#[test]
fn render_of_a_large_appliance_stays_cheap() {
    // 64 shards × 8 profiles: the worst label cardinality the config allows in practice.
    let rec = recorder();
    let h = rec.handle();
    let profiles: Arc<[SharedString]> = (0..8)
        .map(|i| SharedString::from(format!("p{i}")))
        .collect();
    let mut s = ShardSample::new(profiles.clone());
    let mut prevs: Vec<ShardSample> = (0..SHARDS_MAX)
        .map(|_| ShardSample::new(profiles.clone()))
        .collect();
    s.events_in = [1_000_000, 5];
    metrics::with_local_recorder(&rec, || {
        describe();
        for (shard, prev) in prevs.iter_mut().enumerate() {
            publish(shard, &s, prev);
        }
    });
    let start = std::time::Instant::now();
    let text = h.render();
    let took = start.elapsed();
    let series = text.lines().filter(|l| !l.starts_with('#')).count();
    eprintln!("render: {series} series, {} bytes, {took:?}", text.len());
    assert!(series > 64 * 40, "{series} series");
    // Generous for a debug build on a loaded CI machine; release renders this in a few ms.
    assert!(
        took < std::time::Duration::from_secs(2),
        "render took {took:?}"
    );
}
