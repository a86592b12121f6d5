//! Metrics: every metric name and label value in one place, the periodic per-shard publisher,
//! the merged event-to-output latency summary, and (in [`http`]) the endpoint that serves them.
//!
//! The data path never touches this module's globals. Each shard counts into plain integers it
//! owns (the engine's [`Stats`], the runtime's counters) and records latencies into its own
//! `hdrhistogram` (~3 ns a record). Every `metrics.publish_interval` the shard copies those
//! integers into its [`ShardSample`] and calls [`publish`], which turns the difference from the
//! previous sample into `metrics` counter increments and sets the gauges: a few hundred
//! registry look-ups per shard per second instead of one atomic per event.
//!
//! Invariants:
//! - Every exported name is a `const` below and is listed in `docs/metrics.md` (a unit test
//!   checks the doc against [`ALL_METRICS`]); every label value is a `&'static str` from a table
//!   here, except profile and output names, which come from the config.
//! - Counters only go up. A sample smaller than the previous one (its source was rebuilt, e.g.
//!   an engine restored after recovery) is taken as a restart from zero, never as a negative step.
//! - Latency quantiles are exported over the last [`LATENCY_WINDOW_SLOTS`] publish windows of
//!   all shards merged; shard 0's publish closes a window.

pub mod http;

pub use http::{serve, upkeep_loop, Health};
/// Label values shared by reference count (profile names); re-exported for callers.
pub use metrics::SharedString;

use crate::config::{Stream, Transport, SHARDS_MAX};
use crate::decode::DecodeError;
use crate::engine::rules::Rules;
use crate::engine::{EndReason, Out, Stats};
use crate::output::OutputStats;
use hdrhistogram::Histogram;
use metrics::{counter, describe_counter, describe_gauge, gauge, Counter};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

// ---------------------------------------------------------------------------------------------
// Names. Counters end in `_total`. Gauges of time are in seconds (Prometheus base units) whatever
// unit the sample carries; counters of time are in microseconds, because `metrics` counters are
// integers and a seconds counter would round every flush down to zero.
// ---------------------------------------------------------------------------------------------

/// Counter {transport, shard}: lines received (empty lines excluded).
pub const EVENTS_IN: &str = "sessionizer_events_in_total";
/// Counter {stream, shard}: records this shard produced for the output streams.
pub const EVENTS_OUT: &str = "sessionizer_events_out_total";
/// Counter {kind, shard}: markers emitted, derived from the engine's counters.
pub const MARKERS: &str = "sessionizer_markers_total";
/// Gauge {profile, shard}: open sessions (sub-session kinds are `parent/sub`).
pub const SESSIONS_ACTIVE: &str = "sessionizer_sessions_active";
/// Counter {reason, shard}: top-level sessions ended.
pub const SESSIONS_ENDED: &str = "sessionizer_sessions_ended_total";
/// Counter {shard}: event-time sessions merged because a late event bridged them.
pub const MERGES: &str = "sessionizer_merges_total";
/// Counter {shard}: events behind the watermark, emitted on the `late` stream.
pub const LATE_EVENTS: &str = "sessionizer_late_events_total";
/// Counter {shard}: sessions ended early to make room (`on_full = "evict_oldest"`).
pub const EVICTIONS: &str = "sessionizer_evictions_total";
/// Counter {shard}: new sessions refused because the table was full (`on_full = "reject"`).
pub const REJECTIONS: &str = "sessionizer_rejections_total";
/// Counter {reason, shard}: sub-sessions not started: `limit` (the parent has
/// `limits.sub_sessions_per_session_max` open) or `full` (table or arena full).
pub const SUB_SESSIONS_NOT_STARTED: &str = "sessionizer_sub_sessions_not_started_total";
/// Counter {shard}: captured values (metadata, state, list items) not stored because the
/// session's record could not grow (arena full, or the record at its size limit).
pub const CAPTURES_DROPPED: &str = "sessionizer_captures_dropped_total";
/// Counter {reason, shard}: lines that could not be decoded, by `DecodeError` label.
pub const PARSE_ERRORS: &str = "sessionizer_parse_errors_total";
/// Counter {source, shard}: dead-letter records, by where they were raised.
pub const DEAD_LETTERS: &str = "sessionizer_dead_letters_total";
/// Counter {reason, shard}: dead-letter records, by their `reason` ([`DEAD_LETTER_REASONS`]).
pub const DEAD_LETTERS_BY_REASON: &str = "sessionizer_dead_letters_by_reason_total";
/// Counter {direction, shard}: events handed between cores.
pub const HANDOFF_EVENTS: &str = "sessionizer_handoff_events_total";
/// Gauge {shard}: hand-off batches this shard has in flight to its peers.
pub const HANDOFF_QUEUE_BATCHES: &str = "sessionizer_handoff_queue_batches";
/// Counter {shard}: hand-off events lost because the receiving shard was gone.
pub const HANDOFF_LOST: &str = "sessionizer_handoff_lost_events_total";
/// Counter {shard}: times every hand-off buffer to a peer was in flight and the sender waited.
pub const HANDOFF_STALLS: &str = "sessionizer_handoff_stalls_total";
/// Counter {shard}: times the executor was found asleep with work and woken (`runtime::Beat`).
pub const EXECUTOR_KICKS: &str = "sessionizer_executor_kicks_total";
/// Counter {transport, shard}: datagrams (UDP) or connections (TCP) refused by a listener's
/// `allow` list.
pub const REFUSED: &str = "sessionizer_refused_total";
/// Counter {shard}: datagrams the kernel dropped on this shard's UDP sockets (`SO_RXQ_OVFL`).
pub const UDP_KERNEL_DROPS: &str = "sessionizer_udp_kernel_drops_total";
/// Gauge {shard}: open TCP ingest connections.
pub const TCP_CONNECTIONS: &str = "sessionizer_tcp_connections";
/// Gauge {state, shard}: arena blocks `used` and `free`.
pub const ARENA_BLOCKS: &str = "sessionizer_arena_blocks";
/// Gauge {shard}: how late the last expiry pass finished, from when it was due to its end.
pub const EXPIRY_LAG: &str = "sessionizer_expiry_lag_seconds";
/// Counter {shard}: snapshots written.
pub const SNAPSHOTS: &str = "sessionizer_snapshots_total";
/// Counter {shard}: snapshots that failed.
pub const SNAPSHOT_FAILURES: &str = "sessionizer_snapshot_failures_total";
/// Counter {shard}: time spent writing snapshots, in µs (`metrics` counters are integers).
pub const SNAPSHOT_MICROSECONDS: &str = "sessionizer_snapshot_microseconds_total";
/// Gauge {shard}: duration of the last snapshot.
pub const SNAPSHOT_LAST_SECONDS: &str = "sessionizer_snapshot_last_duration_seconds";
/// Gauge {shard}: the write budget of the last periodic snapshot, bytes a second (0: unpaced).
pub const SNAPSHOT_WRITE_RATE: &str = "sessionizer_snapshot_write_rate_bytes";
/// Counter {shard}: log flushes (write + fsync) completed.
pub const LOG_FLUSHES: &str = "sessionizer_log_flushes_total";
/// Counter {shard}: log flushes that failed.
pub const LOG_FLUSH_FAILURES: &str = "sessionizer_log_flush_failures_total";
/// Counter {shard}: time spent flushing the log, in µs.
pub const LOG_FLUSH_MICROSECONDS: &str = "sessionizer_log_flush_microseconds_total";
/// Gauge {shard}: duration of the last log flush.
pub const LOG_FLUSH_LAST_SECONDS: &str = "sessionizer_log_flush_last_duration_seconds";
/// Counter {output, kind}: records written by a sink.
pub const OUTPUT_RECORDS: &str = "sessionizer_output_records_total";
/// Counter {output, kind}: bytes written by a sink.
pub const OUTPUT_BYTES: &str = "sessionizer_output_bytes_total";
/// Counter {output, kind}: records dropped (queue full, slow consumer, write error).
pub const OUTPUT_DROPPED: &str = "sessionizer_output_dropped_total";
/// Gauge {output, kind}: batches waiting in the sink's queue.
pub const OUTPUT_QUEUE_BATCHES: &str = "sessionizer_output_queue_batches";
/// Gauge {output, kind}: connected TCP consumers.
pub const OUTPUT_CONSUMERS: &str = "sessionizer_output_consumers";
/// Gauge {quantile}: event-to-output latency over the window, all shards merged.
pub const EVENT_LATENCY: &str = "sessionizer_event_latency_seconds";
/// Gauge: the largest event-to-output latency in the window.
pub const EVENT_LATENCY_MAX: &str = "sessionizer_event_latency_max_seconds";
/// Counter: latency samples recorded since start, all shards.
pub const EVENT_LATENCY_SAMPLES: &str = "sessionizer_event_latency_samples_total";
/// Gauge: latency samples the current quantiles are computed from.
pub const EVENT_LATENCY_WINDOW_SAMPLES: &str = "sessionizer_event_latency_window_samples";
/// Counter {code}: requests served by the metrics endpoint, by HTTP status.
pub const HTTP_REQUESTS: &str = "sessionizer_http_requests_total";
/// Gauge {version}: always 1; carries the build's version.
pub const BUILD_INFO: &str = "sessionizer_build_info";
/// Gauge: 1 while `/readyz` answers 200.
pub const READY: &str = "sessionizer_ready";

/// Every exported name with its description (the `# HELP` text), in documentation order.
pub const ALL_METRICS: &[(&str, &str)] = &[
    (
        EVENTS_IN,
        "Lines received, by transport (empty lines excluded).",
    ),
    (
        EVENTS_OUT,
        "Records produced for the output streams, by stream.",
    ),
    (MARKERS, "Markers emitted, by kind."),
    (
        SESSIONS_ACTIVE,
        "Open sessions, by record profile (sub-session kinds are parent/sub).",
    ),
    (SESSIONS_ENDED, "Top-level sessions ended, by reason."),
    (
        MERGES,
        "Event-time sessions merged by a bridging late event.",
    ),
    (
        LATE_EVENTS,
        "Events behind the watermark, emitted on the late stream.",
    ),
    (
        EVICTIONS,
        "Sessions ended early to make room in a full table.",
    ),
    (
        REJECTIONS,
        "New sessions refused because the table was full.",
    ),
    (
        SUB_SESSIONS_NOT_STARTED,
        "Sub-sessions not started, by reason (limit or full).",
    ),
    (
        CAPTURES_DROPPED,
        "Captured values not stored because the session record could not grow.",
    ),
    (PARSE_ERRORS, "Lines that could not be decoded, by reason."),
    (
        DEAD_LETTERS,
        "Dead-letter records, by source (ingest or engine).",
    ),
    (
        DEAD_LETTERS_BY_REASON,
        "Dead-letter records, by the reason they carry.",
    ),
    (HANDOFF_EVENTS, "Events handed between cores, by direction."),
    (
        HANDOFF_QUEUE_BATCHES,
        "Hand-off batches in flight to peer shards.",
    ),
    (
        HANDOFF_LOST,
        "Hand-off events lost because the receiving shard was gone.",
    ),
    (
        HANDOFF_STALLS,
        "Times a shard waited for a free hand-off buffer.",
    ),
    (
        EXECUTOR_KICKS,
        "Times a shard's executor was found asleep with work and woken (each a stall of ~2 ms).",
    ),
    (
        REFUSED,
        "Datagrams (udp) or connections (tcp) refused by a listener's allow list.",
    ),
    (
        UDP_KERNEL_DROPS,
        "Datagrams dropped by the kernel before the shard read them.",
    ),
    (TCP_CONNECTIONS, "Open TCP ingest connections."),
    (ARENA_BLOCKS, "Arena blocks, by state (used or free)."),
    (
        EXPIRY_LAG,
        "How late the last expiry pass finished after it was due, in seconds.",
    ),
    (SNAPSHOTS, "Snapshots written."),
    (SNAPSHOT_FAILURES, "Snapshots that failed."),
    (
        SNAPSHOT_MICROSECONDS,
        "Time spent writing snapshots, in microseconds.",
    ),
    (
        SNAPSHOT_LAST_SECONDS,
        "Duration of the last snapshot, in seconds.",
    ),
    (
        SNAPSHOT_WRITE_RATE,
        "Write budget of the last periodic snapshot, bytes a second (0: unpaced).",
    ),
    (LOG_FLUSHES, "Log flushes completed."),
    (LOG_FLUSH_FAILURES, "Log flushes that failed."),
    (
        LOG_FLUSH_MICROSECONDS,
        "Time spent flushing the log, in microseconds.",
    ),
    (
        LOG_FLUSH_LAST_SECONDS,
        "Duration of the last log flush, in seconds.",
    ),
    (OUTPUT_RECORDS, "Records written by an output sink."),
    (OUTPUT_BYTES, "Bytes written by an output sink."),
    (OUTPUT_DROPPED, "Records an output sink dropped."),
    (
        OUTPUT_QUEUE_BATCHES,
        "Batches waiting in an output sink's queue.",
    ),
    (
        OUTPUT_CONSUMERS,
        "Connected TCP consumers of an output sink.",
    ),
    (
        EVENT_LATENCY,
        "Event-to-output latency quantiles over the recent window, all shards, in seconds.",
    ),
    (
        EVENT_LATENCY_MAX,
        "Largest event-to-output latency over the recent window, in seconds.",
    ),
    (
        EVENT_LATENCY_SAMPLES,
        "Event-to-output latency samples recorded since start.",
    ),
    (
        EVENT_LATENCY_WINDOW_SAMPLES,
        "Latency samples the current quantiles are computed from.",
    ),
    (
        HTTP_REQUESTS,
        "Requests served by the metrics endpoint, by HTTP status code.",
    ),
    (
        BUILD_INFO,
        "Always 1; the version label names the running build.",
    ),
    (READY, "1 while /readyz answers 200."),
];

/// Names of the counters in [`ALL_METRICS`] (every other name is a gauge).
fn is_counter(name: &str) -> bool {
    name.ends_with("_total")
}

// ---------------------------------------------------------------------------------------------
// Label keys and static label values.
// ---------------------------------------------------------------------------------------------

pub const LABEL_SHARD: &str = "shard";
pub const LABEL_TRANSPORT: &str = "transport";
pub const LABEL_STREAM: &str = "stream";
pub const LABEL_KIND: &str = "kind";
pub const LABEL_PROFILE: &str = "profile";
pub const LABEL_REASON: &str = "reason";
pub const LABEL_SOURCE: &str = "source";
pub const LABEL_DIRECTION: &str = "direction";
pub const LABEL_STATE: &str = "state";
pub const LABEL_OUTPUT: &str = "output";
pub const LABEL_QUANTILE: &str = "quantile";
pub const LABEL_CODE: &str = "code";
pub const LABEL_VERSION: &str = "version";

/// `shard` label values, so publishing never formats an integer.
pub const SHARD_LABELS: [&str; SHARDS_MAX] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "17", "18", "19", "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31", "32",
    "33", "34", "35", "36", "37", "38", "39", "40", "41", "42", "43", "44", "45", "46", "47", "48",
    "49", "50", "51", "52", "53", "54", "55", "56", "57", "58", "59", "60", "61", "62", "63",
];

/// `transport` label values; `ShardSample::events_in` is indexed like this ([`transport_index`]).
pub const TRANSPORTS: [&str; 2] = ["udp", "tcp"];
/// `stream` label values; `ShardSample::events_out` is indexed like this ([`stream_index`]).
pub const STREAMS: [&str; 4] = ["events", "markers", "late", "dead_letter"];
/// `kind` label values of [`MARKERS`].
pub const MARKER_KINDS: [&str; 5] = [
    "session_start",
    "session_end",
    "sub_session_start",
    "sub_session_end",
    "session_merged",
];
/// Quantiles exported for [`EVENT_LATENCY`], with their `quantile` label values.
pub const LATENCY_QUANTILES: [(f64, &str); 4] =
    [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99"), (0.999, "0.999")];
/// Decode error kinds; `ShardSample::parse_errors` is indexed like `DecodeError::ALL`.
pub const PARSE_ERROR_KINDS: usize = DecodeError::ALL.len();
/// Every `reason` a `dead_letter` record can carry; `ShardSample::dead_letter_reasons` is
/// indexed like this ([`dead_letter_reason_index`]).
pub const DEAD_LETTER_REASONS: [&str; 14] = [
    "empty_line",
    "line_too_long",
    "datagram_too_long",
    "invalid_json",
    "invalid_utf8",
    "invalid_escape",
    "too_deep",
    "not_object",
    "trailing_bytes",
    "duplicate_field",
    "missing_key",
    "key_too_long",
    "bad_timestamp",
    "session_table_full",
];

/// Index of a dead-letter reason in [`DEAD_LETTER_REASONS`]. Panics on an unknown reason: every
/// reason the code emits is a static label listed there.
pub fn dead_letter_reason_index(reason: &str) -> usize {
    DEAD_LETTER_REASONS
        .iter()
        .position(|r| *r == reason)
        .unwrap_or_else(|| panic!("dead-letter reason `{reason}` missing from the list"))
}

/// Latency histogram bounds: 1 µs resolution floor, 60 s ceiling (larger values saturate), two
/// significant digits (1% error). About 21 KiB per histogram.
pub const LATENCY_LOW_NS: u64 = 1_000;
pub const LATENCY_HIGH_NS: u64 = 60_000_000_000;
pub const LATENCY_SIGFIG: u8 = 2;
/// Publish windows the exported quantiles cover (10 s at the default 1 s `publish_interval`).
pub const LATENCY_WINDOW_SLOTS: usize = 10;

const _: () = {
    assert!(SHARD_LABELS.len() == SHARDS_MAX);
    assert!(LATENCY_LOW_NS < LATENCY_HIGH_NS);
    assert!(LATENCY_WINDOW_SLOTS >= 1);
    // Label tables are indexed by these enums' discriminants.
    assert!(EndReason::COUNT == EndReason::ALL.len());
};

/// Index into [`TRANSPORTS`] / `ShardSample::events_in`.
pub fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Udp => 0,
        Transport::Tcp => 1,
    }
}

/// Index into [`STREAMS`] / `ShardSample::events_out`.
pub fn stream_index(s: Stream) -> usize {
    match s {
        Stream::Events => 0,
        Stream::Markers => 1,
        Stream::Late => 2,
        Stream::DeadLetter => 3,
    }
}

/// Add the records of an output batch to per-stream counts. Call it once per batch, before the
/// batch is cleared: one increment per record, no atomics.
pub fn count_streams(out: &Out, counts: &mut [u64; STREAMS.len()]) {
    for r in &out.recs {
        counts[stream_index(r.stream)] += 1;
    }
}

/// `profile` label values in record-profile order (top-level profiles, then each sub-session
/// kind as `parent/sub`), matching `Stats::active_by_profile`.
pub fn profile_labels(rules: &Rules) -> Arc<[SharedString]> {
    let mut names = vec![String::new(); rules.record_profile_count()];
    for (i, p) in rules.profiles.iter().enumerate() {
        names[i].clone_from(&p.name);
        for s in &p.subs {
            names[s.record_profile as usize] = format!("{}/{}", p.name, s.name);
        }
    }
    // Shared, so that each publish clones an `Arc` rather than the text.
    names
        .into_iter()
        .map(|n| SharedString::from(Arc::<str>::from(n)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Recorder installation.
// ---------------------------------------------------------------------------------------------

static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave torn metric state worth refusing
    // (the worst is one skipped window), so a poisoned lock is used as is.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Install the Prometheus recorder as the global `metrics` recorder and describe every metric.
/// No HTTP listener, no tokio: serve [`PrometheusHandle::render`] with [`http::serve`] and run
/// [`http::upkeep_loop`]. Calling it again returns the same handle (tests call it per test); it
/// fails only if another recorder was installed first.
pub fn install() -> Result<PrometheusHandle, String> {
    let mut installed = lock(&INSTALLED);
    if let Some(h) = installed.as_ref() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    gauge!(BUILD_INFO, LABEL_VERSION => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!(READY).set(0.0);
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Register the `# HELP` text of every metric with the current recorder.
pub fn describe() {
    for &(name, help) in ALL_METRICS {
        if is_counter(name) {
            describe_counter!(name, help);
        } else {
            describe_gauge!(name, help);
        }
    }
}

/// Bumped by every publish; the HTTP endpoint re-renders when it changed (see `http`).
static GENERATION: AtomicU64 = AtomicU64::new(0);

pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// The per-shard sample and its publisher.
// ---------------------------------------------------------------------------------------------

/// One shard's counters, copied from where they are kept at each publish tick. Every field is
/// cumulative since the shard started except those documented as gauges. The shard owns two
/// samples for its life (`sample` and `prev`); neither allocates after construction.
#[derive(Debug, Clone)]
pub struct ShardSample {
    /// `profile` label values ([`profile_labels`]); set once.
    pub profiles: Arc<[SharedString]>,
    /// The engine's counters: `sample.engine.clone_from(engine.stats())`.
    pub engine: Stats,
    /// Lines received, by [`transport_index`].
    pub events_in: [u64; TRANSPORTS.len()],
    /// Records produced, by [`stream_index`] ([`count_streams`] keeps it).
    pub events_out: [u64; STREAMS.len()],
    /// Undecodable lines, indexed like `DecodeError::ALL`.
    pub parse_errors: [u64; PARSE_ERROR_KINDS],
    /// Dead letters raised outside the engine: decode errors, oversize lines and datagrams,
    /// routing (`missing_key`, `key_too_long`). The engine's own are in `engine.dead_letters`.
    pub ingest_dead_letters: u64,
    /// Dead letters of both sources by reason, indexed like [`DEAD_LETTER_REASONS`].
    pub dead_letter_reasons: [u64; DEAD_LETTER_REASONS.len()],
    pub handoff_events_out: u64,
    pub handoff_events_in: u64,
    /// Gauge: hand-off batches in flight from this shard to its peers.
    pub handoff_queue_batches: u64,
    pub handoff_lost_events: u64,
    pub handoff_stalls: u64,
    pub executor_kicks: u64,
    /// Refused by a listener's `allow` list, by [`transport_index`]: datagrams (UDP),
    /// connections (TCP).
    pub refused: [u64; TRANSPORTS.len()],
    pub udp_kernel_drops: u64,
    /// Gauge: open TCP ingest connections.
    pub tcp_connections: u64,
    /// Gauge: how late the last expiry pass finished (from when it was due to its end), in µs.
    pub expiry_lag_us: u64,
    pub snapshots: u64,
    pub snapshot_failures: u64,
    /// Sum of snapshot durations, in µs.
    pub snapshot_us_total: u64,
    /// Gauge: duration of the last snapshot, in µs.
    pub snapshot_last_us: u64,
    /// Gauge: the last periodic snapshot's write budget, bytes a second.
    pub snapshot_write_rate: u64,
    pub log_flushes: u64,
    pub log_flush_failures: u64,
    /// Sum of log flush durations, in µs.
    pub log_flush_us_total: u64,
    /// Gauge: duration of the last log flush, in µs.
    pub log_flush_last_us: u64,
    /// Event-to-output latencies in ns, cumulative: record into it with [`record_latency_ns`]
    /// on the hot path (or keep a histogram elsewhere and `set_to` it here at publish time).
    pub latency: Histogram<u64>,
}

/// A histogram with the bounds [`publish`] expects.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LATENCY_LOW_NS, LATENCY_HIGH_NS, LATENCY_SIGFIG)
        .expect("constant latency histogram bounds are valid")
}

/// Record one event-to-output latency (hot path, ~3 ns). Values over 60 s count as 60 s.
#[inline]
pub fn record_latency_ns(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns);
}

impl ShardSample {
    pub fn new(profiles: Arc<[SharedString]>) -> ShardSample {
        let engine = Stats {
            active_by_profile: vec![0; profiles.len()],
            ..Stats::default()
        };
        ShardSample {
            profiles,
            engine,
            events_in: [0; TRANSPORTS.len()],
            events_out: [0; STREAMS.len()],
            parse_errors: [0; PARSE_ERROR_KINDS],
            ingest_dead_letters: 0,
            dead_letter_reasons: [0; DEAD_LETTER_REASONS.len()],
            handoff_events_out: 0,
            handoff_events_in: 0,
            handoff_queue_batches: 0,
            handoff_lost_events: 0,
            handoff_stalls: 0,
            executor_kicks: 0,
            refused: [0; TRANSPORTS.len()],
            udp_kernel_drops: 0,
            tcp_connections: 0,
            expiry_lag_us: 0,
            snapshots: 0,
            snapshot_failures: 0,
            snapshot_us_total: 0,
            snapshot_last_us: 0,
            snapshot_write_rate: 0,
            log_flushes: 0,
            log_flush_failures: 0,
            log_flush_us_total: 0,
            log_flush_last_us: 0,
            latency: latency_histogram(),
        }
    }

    /// Copy the engine's counters in without allocating (a derived `clone_from` would allocate
    /// a new `active_by_profile` every tick): `sample.copy_engine(engine.stats())`.
    pub fn copy_engine(&mut self, stats: &Stats) {
        copy_stats(&mut self.engine, stats);
    }

    /// Copy everything `publish` compares against next time, reusing `self`'s buffers.
    fn remember(&mut self, cur: &ShardSample) {
        let ShardSample {
            profiles,
            engine,
            events_in,
            events_out,
            parse_errors,
            ingest_dead_letters,
            dead_letter_reasons,
            handoff_events_out,
            handoff_events_in,
            handoff_queue_batches,
            handoff_lost_events,
            handoff_stalls,
            executor_kicks,
            refused,
            udp_kernel_drops,
            tcp_connections,
            expiry_lag_us,
            snapshots,
            snapshot_failures,
            snapshot_us_total,
            snapshot_last_us,
            snapshot_write_rate,
            log_flushes,
            log_flush_failures,
            log_flush_us_total,
            log_flush_last_us,
            latency,
        } = self;
        // Destructured so that a field added to the struct and forgotten here fails to compile.
        *profiles = cur.profiles.clone();
        copy_stats(engine, &cur.engine);
        *events_in = cur.events_in;
        *events_out = cur.events_out;
        *parse_errors = cur.parse_errors;
        *ingest_dead_letters = cur.ingest_dead_letters;
        *dead_letter_reasons = cur.dead_letter_reasons;
        *handoff_events_out = cur.handoff_events_out;
        *handoff_events_in = cur.handoff_events_in;
        *handoff_queue_batches = cur.handoff_queue_batches;
        *handoff_lost_events = cur.handoff_lost_events;
        *handoff_stalls = cur.handoff_stalls;
        *executor_kicks = cur.executor_kicks;
        *refused = cur.refused;
        *udp_kernel_drops = cur.udp_kernel_drops;
        *tcp_connections = cur.tcp_connections;
        *expiry_lag_us = cur.expiry_lag_us;
        *snapshots = cur.snapshots;
        *snapshot_failures = cur.snapshot_failures;
        *snapshot_us_total = cur.snapshot_us_total;
        *snapshot_last_us = cur.snapshot_last_us;
        *snapshot_write_rate = cur.snapshot_write_rate;
        *log_flushes = cur.log_flushes;
        *log_flush_failures = cur.log_flush_failures;
        *log_flush_us_total = cur.log_flush_us_total;
        *log_flush_last_us = cur.log_flush_last_us;
        if latency.set_to(&cur.latency).is_err() {
            // Only a histogram built with other bounds can fail to fit; start over from it.
            *latency = cur.latency.clone();
        }
    }
}

fn copy_stats(to: &mut Stats, from: &Stats) {
    // `Vec::clone_from` reuses the allocation; the other fields are `Copy` (a non-`Copy` field
    // added to `Stats` makes this fail to compile, which is the point).
    let mut active = std::mem::take(&mut to.active_by_profile);
    active.clone_from(&from.active_by_profile);
    *to = Stats {
        active_by_profile: active,
        ..*from
    };
}

/// How much a cumulative counter grew. A smaller value means its source restarted from zero
/// (e.g. an engine rebuilt by recovery): everything it holds is new.
fn delta(cur: u64, prev: u64) -> u64 {
    if cur >= prev {
        cur - prev
    } else {
        cur
    }
}

fn bump(c: Counter, cur: u64, prev: u64) {
    // Incremented even by 0, so every series exists from the first publish and `rate()` has a
    // starting point.
    c.increment(delta(cur, prev));
}

fn us_to_s(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Publish one shard's sample: increment counters by `sample - prev`, set gauges, merge its new
/// latencies into the window, then remember `sample` in `prev`. Called every
/// `metrics.publish_interval` by each shard on its own executor, and once more at shutdown.
/// `prev` starts as `ShardSample::new` (all zero) and is only ever touched here.
pub fn publish(shard: usize, sample: &ShardSample, prev: &mut ShardSample) {
    assert!(shard < SHARDS_MAX, "shard {shard} out of range");
    let sh = SHARD_LABELS[shard];

    for (i, t) in TRANSPORTS.iter().enumerate() {
        let c = counter!(EVENTS_IN, LABEL_TRANSPORT => *t, LABEL_SHARD => sh);
        bump(c, sample.events_in[i], prev.events_in[i]);
    }
    for (i, s) in STREAMS.iter().enumerate() {
        let c = counter!(EVENTS_OUT, LABEL_STREAM => *s, LABEL_SHARD => sh);
        bump(c, sample.events_out[i], prev.events_out[i]);
    }

    let (e, pe) = (&sample.engine, &prev.engine);
    let ended: u64 = e.sessions_ended.iter().sum();
    let prev_ended: u64 = pe.sessions_ended.iter().sum();
    let markers = [
        (e.sessions_started, pe.sessions_started),
        (ended, prev_ended),
        (e.sub_sessions_started, pe.sub_sessions_started),
        (e.sub_sessions_ended, pe.sub_sessions_ended),
        (e.merges, pe.merges),
    ];
    for (kind, (cur, old)) in MARKER_KINDS.iter().zip(markers) {
        bump(
            counter!(MARKERS, LABEL_KIND => *kind, LABEL_SHARD => sh),
            cur,
            old,
        );
    }
    for r in EndReason::ALL {
        let i = r as usize;
        let c = counter!(SESSIONS_ENDED, LABEL_REASON => r.label(), LABEL_SHARD => sh);
        bump(c, e.sessions_ended[i], pe.sessions_ended[i]);
    }
    for (i, &active) in e.active_by_profile.iter().enumerate() {
        let profile = match sample.profiles.get(i) {
            Some(p) => p.clone(),
            // Labels from other rules than the engine's (a reload not yet reflected): keep the
            // series apart rather than mislabel them.
            None => SharedString::from(format!("#{i}")),
        };
        gauge!(SESSIONS_ACTIVE, LABEL_PROFILE => profile, LABEL_SHARD => sh).set(active as f64);
    }
    bump(counter!(MERGES, LABEL_SHARD => sh), e.merges, pe.merges);
    bump(counter!(LATE_EVENTS, LABEL_SHARD => sh), e.late, pe.late);
    bump(
        counter!(EVICTIONS, LABEL_SHARD => sh),
        e.evictions,
        pe.evictions,
    );
    bump(
        counter!(REJECTIONS, LABEL_SHARD => sh),
        e.rejections,
        pe.rejections,
    );
    let c = counter!(SUB_SESSIONS_NOT_STARTED, LABEL_REASON => "limit", LABEL_SHARD => sh);
    bump(c, e.sub_session_limit, pe.sub_session_limit);
    let c = counter!(SUB_SESSIONS_NOT_STARTED, LABEL_REASON => "full", LABEL_SHARD => sh);
    bump(c, e.sub_sessions_full, pe.sub_sessions_full);
    bump(
        counter!(CAPTURES_DROPPED, LABEL_SHARD => sh),
        e.captures_dropped,
        pe.captures_dropped,
    );
    for (i, k) in DecodeError::ALL.iter().enumerate() {
        let c = counter!(PARSE_ERRORS, LABEL_REASON => k.label(), LABEL_SHARD => sh);
        bump(c, sample.parse_errors[i], prev.parse_errors[i]);
    }
    let c = counter!(DEAD_LETTERS, LABEL_SOURCE => "ingest", LABEL_SHARD => sh);
    bump(c, sample.ingest_dead_letters, prev.ingest_dead_letters);
    let c = counter!(DEAD_LETTERS, LABEL_SOURCE => "engine", LABEL_SHARD => sh);
    bump(c, e.dead_letters, pe.dead_letters);
    for (i, r) in DEAD_LETTER_REASONS.iter().enumerate() {
        let c = counter!(DEAD_LETTERS_BY_REASON, LABEL_REASON => *r, LABEL_SHARD => sh);
        bump(
            c,
            sample.dead_letter_reasons[i],
            prev.dead_letter_reasons[i],
        );
    }

    let c = counter!(HANDOFF_EVENTS, LABEL_DIRECTION => "out", LABEL_SHARD => sh);
    bump(c, sample.handoff_events_out, prev.handoff_events_out);
    let c = counter!(HANDOFF_EVENTS, LABEL_DIRECTION => "in", LABEL_SHARD => sh);
    bump(c, sample.handoff_events_in, prev.handoff_events_in);
    gauge!(HANDOFF_QUEUE_BATCHES, LABEL_SHARD => sh).set(sample.handoff_queue_batches as f64);
    bump(
        counter!(HANDOFF_LOST, LABEL_SHARD => sh),
        sample.handoff_lost_events,
        prev.handoff_lost_events,
    );
    bump(
        counter!(HANDOFF_STALLS, LABEL_SHARD => sh),
        sample.handoff_stalls,
        prev.handoff_stalls,
    );
    bump(
        counter!(EXECUTOR_KICKS, LABEL_SHARD => sh),
        sample.executor_kicks,
        prev.executor_kicks,
    );
    for (i, t) in TRANSPORTS.iter().enumerate() {
        let c = counter!(REFUSED, LABEL_TRANSPORT => *t, LABEL_SHARD => sh);
        bump(c, sample.refused[i], prev.refused[i]);
    }
    bump(
        counter!(UDP_KERNEL_DROPS, LABEL_SHARD => sh),
        sample.udp_kernel_drops,
        prev.udp_kernel_drops,
    );
    gauge!(TCP_CONNECTIONS, LABEL_SHARD => sh).set(sample.tcp_connections as f64);

    let free = e.blocks_total.saturating_sub(e.blocks_used);
    gauge!(ARENA_BLOCKS, LABEL_STATE => "used", LABEL_SHARD => sh).set(e.blocks_used as f64);
    gauge!(ARENA_BLOCKS, LABEL_STATE => "free", LABEL_SHARD => sh).set(free as f64);
    gauge!(EXPIRY_LAG, LABEL_SHARD => sh).set(us_to_s(sample.expiry_lag_us));

    bump(
        counter!(SNAPSHOTS, LABEL_SHARD => sh),
        sample.snapshots,
        prev.snapshots,
    );
    bump(
        counter!(SNAPSHOT_FAILURES, LABEL_SHARD => sh),
        sample.snapshot_failures,
        prev.snapshot_failures,
    );
    let c = counter!(SNAPSHOT_MICROSECONDS, LABEL_SHARD => sh);
    bump(c, sample.snapshot_us_total, prev.snapshot_us_total);
    gauge!(SNAPSHOT_LAST_SECONDS, LABEL_SHARD => sh).set(us_to_s(sample.snapshot_last_us));
    gauge!(SNAPSHOT_WRITE_RATE, LABEL_SHARD => sh).set(sample.snapshot_write_rate as f64);
    bump(
        counter!(LOG_FLUSHES, LABEL_SHARD => sh),
        sample.log_flushes,
        prev.log_flushes,
    );
    bump(
        counter!(LOG_FLUSH_FAILURES, LABEL_SHARD => sh),
        sample.log_flush_failures,
        prev.log_flush_failures,
    );
    let c = counter!(LOG_FLUSH_MICROSECONDS, LABEL_SHARD => sh);
    bump(c, sample.log_flush_us_total, prev.log_flush_us_total);
    gauge!(LOG_FLUSH_LAST_SECONDS, LABEL_SHARD => sh).set(us_to_s(sample.log_flush_last_us));

    latency_window().absorb(shard, &sample.latency, &prev.latency);

    prev.remember(sample);
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Publish the output sinks' counters (process-wide, no shard label): call it from one place
/// only (the owner of `Outputs`, e.g. shard 0's publish tick) with `Outputs::stats()`. `prev`
/// starts empty; a changed set of sinks (a reload) restarts the comparison.
pub fn publish_outputs(stats: &[OutputStats], prev: &mut Vec<OutputStats>) {
    let same = prev.len() == stats.len() && prev.iter().zip(stats).all(|(p, s)| p.name == s.name);
    if !same {
        prev.clear();
        prev.extend(stats.iter().map(|s| OutputStats {
            name: s.name.clone(),
            kind: s.kind,
            ..OutputStats::default()
        }));
    }
    for (s, p) in stats.iter().zip(prev.iter_mut()) {
        let labels = [
            metrics::Label::new(LABEL_OUTPUT, s.name.clone()),
            metrics::Label::new(LABEL_KIND, s.kind),
        ];
        bump(
            counter!(OUTPUT_RECORDS, labels.iter()),
            s.records,
            p.records,
        );
        bump(counter!(OUTPUT_BYTES, labels.iter()), s.bytes, p.bytes);
        bump(
            counter!(OUTPUT_DROPPED, labels.iter()),
            s.dropped,
            p.dropped,
        );
        gauge!(OUTPUT_QUEUE_BATCHES, labels.iter()).set(s.queue_depth as f64);
        gauge!(OUTPUT_CONSUMERS, labels.iter()).set(s.consumers as f64);
        p.records = s.records;
        p.bytes = s.bytes;
        p.dropped = s.dropped;
        p.queue_depth = s.queue_depth;
        p.consumers = s.consumers;
    }
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// The merged latency window.
// ---------------------------------------------------------------------------------------------

/// A ring of per-window histograms shared by all shards. Each shard's publish adds what its
/// histogram gained since its previous publish to the current slot; shard 0's publish then
/// exports the quantiles of all slots merged and opens the next slot. Touched once per shard per
/// publish interval, so a mutex is plenty.
pub struct LatencyWindow {
    slots: Vec<Histogram<u64>>,
    current: usize,
    /// Scratch: one shard's new recordings, then the merge of all slots.
    scratch: Histogram<u64>,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        LatencyWindow::new()
    }
}

/// What [`LatencyWindow::rotate`] exports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    /// Seconds at each of [`LATENCY_QUANTILES`]; NaN when the window is empty (Prometheus'
    /// convention for a summary without observations, where 0 would read as "instant").
    pub quantiles: [f64; LATENCY_QUANTILES.len()],
    pub max: f64,
    pub samples: u64,
}

impl LatencyWindow {
    pub fn new() -> LatencyWindow {
        LatencyWindow {
            slots: (0..LATENCY_WINDOW_SLOTS)
                .map(|_| latency_histogram())
                .collect(),
            current: 0,
            scratch: latency_histogram(),
        }
    }

    /// Add `cur - prev` (one shard's recordings since its last publish) to the current slot and
    /// return how many samples that was.
    pub fn add_delta(&mut self, cur: &Histogram<u64>, prev: &Histogram<u64>) -> u64 {
        let fresh = if cur.len() >= prev.len()
            && self.scratch.set_to(cur).is_ok()
            && self.scratch.subtract(prev).is_ok()
        {
            &self.scratch
        } else {
            // Fewer samples than last time, or a bucket went down: the histogram was replaced.
            cur
        };
        let n = fresh.len();
        if self.slots[self.current].add(fresh).is_err() {
            log::warn!("latency histogram with foreign bounds; {n} samples not merged");
            return 0;
        }
        n
    }

    /// Summarise every slot merged, then open the next slot (dropping the oldest).
    pub fn rotate(&mut self) -> LatencySummary {
        self.scratch.reset();
        for s in &self.slots {
            // Same bounds by construction: cannot fail.
            let _ = self.scratch.add(s);
        }
        let m = &self.scratch;
        let samples = m.len();
        let secs = |ns: u64| {
            if samples == 0 {
                f64::NAN
            } else {
                ns as f64 / 1e9
            }
        };
        let mut quantiles = [0.0; LATENCY_QUANTILES.len()];
        for (q, &(at, _)) in quantiles.iter_mut().zip(LATENCY_QUANTILES.iter()) {
            *q = secs(m.value_at_quantile(at));
        }
        let summary = LatencySummary {
            quantiles,
            max: secs(m.max()),
            samples,
        };
        self.current = (self.current + 1) % self.slots.len();
        self.slots[self.current].reset();
        summary
    }

    fn absorb(&mut self, shard: usize, cur: &Histogram<u64>, prev: &Histogram<u64>) {
        let n = self.add_delta(cur, prev);
        counter!(EVENT_LATENCY_SAMPLES).increment(n);
        if shard == 0 {
            let s = self.rotate();
            for (&(_, label), v) in LATENCY_QUANTILES.iter().zip(s.quantiles) {
                gauge!(EVENT_LATENCY, LABEL_QUANTILE => label).set(v);
            }
            gauge!(EVENT_LATENCY_MAX).set(s.max);
            gauge!(EVENT_LATENCY_WINDOW_SAMPLES).set(s.samples as f64);
        }
    }
}

/// The process-wide window, created on the first publish.
static LATENCY: OnceLock<Mutex<LatencyWindow>> = OnceLock::new();

fn latency_window() -> MutexGuard<'static, LatencyWindow> {
    lock(LATENCY.get_or_init(|| Mutex::new(LatencyWindow::new())))
}

#[cfg(test)]
mod tests;
