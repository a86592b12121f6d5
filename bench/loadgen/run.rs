//! One run against a target: connect the latency receiver, scrape drop counters, start the
//! senders on a common clock, print a progress line per second, drain the output, and assemble
//! the [`RunResult`]. Also `--to-file`, which writes the same traffic as JSON lines with
//! synthetic event time instead of sending it, and the in-process baseline of `run --baseline`.
//!
//! Order matters and is fixed: the receiver is connected (and given `output_settle` to be
//! registered by the appliance) before the "before" scrape, which is before the first event;
//! the "after" scrape follows the drain. The drain ends when every sent event has come back,
//! when the output has been quiet for [`DRAIN_QUIET`], or after `drain`, whichever is first.

use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::baseline::Baseline;
use crate::clock;
use crate::nexmark::{BidEncoder, BidParams};
use crate::recv::{Receiver, MARKER_KINDS};
use crate::report::{BaselineResult, Drops, Latency, RunResult, TimelineRow, TIMELINE_ROWS_MAX};
use crate::scrape;
use crate::send::{SendPlan, Senders};
use crate::svg;
use crate::traffic::{ClickEncoder, ClickParams, Encoder, Generator, Replay, SessionModel, Source};

/// The output counts as quiet after this long without data.
pub const DRAIN_QUIET: Duration = Duration::from_millis(300);
const POLL: Duration = Duration::from_millis(10);
/// Epoch milliseconds where `--to-file` event time starts (2024-11-25T02:00:00Z).
pub const FILE_EPOCH_MS: u64 = 1_732_500_000_000;
const FILE_BUFFER_BYTES: usize = 1 << 20;

/// What the sources generate.
#[derive(Clone, Debug)]
pub enum Workload {
    Click {
        model: SessionModel,
        keys: u64,
        params: ClickParams,
    },
    Bid {
        model: SessionModel,
        keys: u64,
        params: BidParams,
    },
    Replay {
        path: PathBuf,
        key_field: String,
    },
}

impl Workload {
    pub fn name(&self) -> String {
        match self {
            Workload::Click { .. } => "clickstream".to_string(),
            Workload::Bid { .. } => "nexmark-q11".to_string(),
            Workload::Replay { path, .. } => format!("replay {}", path.display()),
        }
    }

    pub fn model(&self) -> Option<(SessionModel, u64)> {
        match self {
            Workload::Click { model, keys, .. } | Workload::Bid { model, keys, .. } => {
                Some((*model, *keys))
            }
            Workload::Replay { .. } => None,
        }
    }

    /// The source of sender `thread` of `threads`.
    pub fn source(&self, seed: u64, thread: u32, threads: u32) -> Result<Source, String> {
        Ok(match self {
            Workload::Click {
                model,
                keys,
                params,
            } => Source::Generated(Box::new(Generator::new(
                *model,
                *keys,
                Encoder::Click(ClickEncoder::new(params.clone())),
                seed,
                thread,
                threads,
            ))),
            Workload::Bid {
                model,
                keys,
                params,
            } => Source::Generated(Box::new(Generator::new(
                *model,
                *keys,
                Encoder::Bid(BidEncoder::new(params.clone())),
                seed,
                thread,
                threads,
            ))),
            Workload::Replay { path, key_field } => {
                assert_eq!(threads, 1, "replay uses one sender thread");
                Source::Replay(Box::new(
                    Replay::open(path, key_field)
                        .map_err(|e| format!("--replay {}: {e}", path.display()))?,
                ))
            }
        })
    }
}

/// Everything one run needs.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub command: String,
    pub workload: Workload,
    pub seed: u64,
    pub plan: SendPlan,
    pub output: Option<SocketAddr>,
    pub output_wait: Duration,
    pub output_settle: Duration,
    pub drain: Duration,
    pub metrics: Option<String>,
    pub progress: bool,
}

fn warnings_before(spec: &RunSpec) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some((model, keys)) = spec.workload.model() {
        if spec.plan.rate > 0.0 {
            let needed = model.keys_needed(spec.plan.rate);
            if (keys as f64) < needed {
                warnings.push(format!(
                    "--keys {keys} is below the ≈{needed:.0} keys the model needs at {}/s (gap, pause and burst): keys will restart before their pause ends",
                    svg::short_number(spec.plan.rate)
                ));
            }
        }
    }
    warnings
}

/// Runs `spec` and returns its result (not yet written anywhere).
pub fn execute(spec: &RunSpec, parameters: serde_json::Value) -> Result<RunResult, String> {
    let mut result = RunResult::new(&spec.command, spec.workload.name(), parameters, &spec.plan);
    result.warnings = warnings_before(spec);
    let sources = (0..spec.plan.threads)
        .map(|thread| spec.workload.source(spec.seed, thread, spec.plan.threads))
        .collect::<Result<Vec<_>, _>>()?;
    let receiver = match spec.output {
        Some(address) => {
            let receiver = Receiver::connect(address, spec.output_wait)?;
            std::thread::sleep(spec.output_settle);
            Some(receiver)
        }
        None => None,
    };
    let metrics_before = spec.metrics.as_deref().map(scrape::scrape_drops);
    let kernel_before = scrape::udp_kernel_counters();
    let senders = Senders::prepare(&spec.plan, sources)?;
    let clock = senders.start();
    if let Some(receiver) = &receiver {
        receiver.begin(clock);
    }

    let mut rows: Vec<TimelineRow> = Vec::with_capacity(64);
    let mut last_row = TimelineRow::default();
    let send_shared = std::sync::Arc::clone(&senders.shared);
    let sent_now = || send_shared.events_sent.load(Ordering::Relaxed);
    let received_now = || {
        receiver
            .as_ref()
            .map_or(0, |r| r.shared.enriched.load(Ordering::Relaxed))
    };
    let push_row = |t_ns: u64, rows: &mut Vec<TimelineRow>, last: &mut TimelineRow| {
        let t_s = clock.since_start_ns(t_ns) as f64 / 1e9;
        let interval_s = t_s - last.t_s;
        if interval_s < 0.05 {
            return; // A sliver after the last full second says nothing per second.
        }
        let (sent, received) = (sent_now(), received_now());
        let row = TimelineRow {
            t_s,
            sent,
            received,
            sent_per_s: (sent - last.sent) as f64 / interval_s,
            received_per_s: (received - last.received) as f64 / interval_s,
            outstanding: sent as i64 - received as i64,
            ..TimelineRow::default()
        };
        if spec.progress {
            let p99 = receiver
                .as_ref()
                .map(|r| r.shared.last_second_p99_ns.load(Ordering::Relaxed))
                .filter(|p| *p > 0)
                .map_or("-".to_string(), |p| format!("{:.2} ms", p as f64 / 1e6));
            eprintln!(
                "[{:>5.1}s] sent {:>8}/s  recv {:>8}/s  lost so far {:>9}  p99 {}",
                t_s,
                svg::short_number(row.sent_per_s.round()),
                if receiver.is_some() {
                    svg::short_number(row.received_per_s.round())
                } else {
                    "-".to_string()
                },
                if receiver.is_some() {
                    row.outstanding.to_string()
                } else {
                    "-".to_string()
                },
                p99
            );
        }
        *last = row.clone();
        if rows.len() < TIMELINE_ROWS_MAX {
            rows.push(row);
        }
    };

    // Sending. Rows are taken at every full second of the run (sending and draining alike), so
    // row i covers second i, like the receiver's per-second latencies; one partial row closes.
    let mut next_tick = clock.start_ns + 1_000_000_000;
    let send_end_ns = loop {
        let now = clock::mono_ns();
        if senders.finished() {
            break now;
        }
        if crate::interrupted() {
            senders.stop();
        }
        if now >= next_tick {
            push_row(next_tick, &mut rows, &mut last_row);
            next_tick += 1_000_000_000;
        }
        std::thread::sleep(POLL);
    };
    let send_totals = match senders.join() {
        Ok(totals) => totals,
        Err(error) => {
            if let Some(receiver) = receiver {
                receiver.stop();
            }
            return Err(error);
        }
    };
    let sent = send_totals.sink.events_sent;

    // Draining.
    let drain_deadline = send_end_ns + spec.drain.as_nanos() as u64;
    let drain_end_ns = loop {
        let now = clock::mono_ns();
        let Some(receiver) = &receiver else { break now };
        let received = receiver.shared.enriched.load(Ordering::Relaxed);
        let last_data = receiver
            .shared
            .last_data_ns
            .load(Ordering::Relaxed)
            .max(send_end_ns);
        if received >= sent
            || now >= drain_deadline
            || now - last_data >= DRAIN_QUIET.as_nanos() as u64
            || crate::interrupted()
        {
            break now;
        }
        if now >= next_tick {
            push_row(next_tick, &mut rows, &mut last_row);
            next_tick += 1_000_000_000;
        }
        std::thread::sleep(POLL);
    };
    push_row(drain_end_ns, &mut rows, &mut last_row);

    let metrics_after = spec.metrics.as_deref().map(scrape::scrape_drops);
    let kernel_after = scrape::udp_kernel_counters();
    let report = receiver.map(|r| {
        let shared = std::sync::Arc::clone(&r.shared);
        (r.stop(), shared)
    });

    // Assemble.
    result.sending_s = clock.since_start_ns(send_end_ns) as f64 / 1e9;
    result.drain_s = (drain_end_ns - send_end_ns) as f64 / 1e9;
    result.totals.sent = sent;
    result.set_sender(&send_totals);
    let sending_s = result.sending_s.max(1e-9);
    result.sent_per_s = sent as f64 / sending_s;
    if let Some((report, shared)) = &report {
        let totals = &mut result.totals;
        totals.received = shared.enriched.load(Ordering::Relaxed);
        totals.lost = sent as i64 - totals.received as i64;
        for (kind, count) in MARKER_KINDS.iter().zip(&shared.markers) {
            totals
                .markers
                .insert(kind.to_string(), count.load(Ordering::Relaxed));
        }
        totals.markers_other_kind = shared.markers_other.load(Ordering::Relaxed);
        totals.stale = shared.stale.load(Ordering::Relaxed);
        totals.untimed = report.untimed;
        totals.other_records = shared.other.load(Ordering::Relaxed);
        totals.output_bytes = shared.bytes.load(Ordering::Relaxed);
        result.received_per_s = totals.received as f64 / sending_s;
        result.achieved_per_s = result.received_per_s;
        result.latency = Latency::of(&report.latency);
        result.receiver_error = report.error.clone();
        for second in &report.seconds {
            if let Some(row) = rows.get_mut(second.second as usize) {
                row.latency_count = second.count;
                row.p50_ms = Some(second.p50_ns as f64 / 1e6);
                row.p99_ms = Some(second.p99_ns as f64 / 1e6);
                row.max_ms = Some(second.max_ns as f64 / 1e6);
            }
        }
        if report.records_oversize > 0 {
            result.warnings.push(format!(
                "{} output records longer than 1 MiB were skipped",
                report.records_oversize
            ));
        }
    } else {
        result.achieved_per_s = result.sent_per_s;
    }
    result.timeline = rows;
    result.drops = drops(
        spec,
        metrics_before,
        metrics_after,
        result.totals.lost,
        kernel_before,
        kernel_after,
    );
    let record = |kind: &str| result.totals.markers.get(kind).copied().unwrap_or(0) as i64;
    result.drops.unaccounted_by_records -= record("late_event") + record("dead_letter");
    warnings_after(&mut result, &send_totals);
    Ok(result)
}

fn drops(
    spec: &RunSpec,
    before: Option<Result<std::collections::BTreeMap<String, f64>, String>>,
    after: Option<Result<std::collections::BTreeMap<String, f64>, String>>,
    lost: i64,
    kernel_before: Option<std::collections::BTreeMap<String, u64>>,
    kernel_after: Option<std::collections::BTreeMap<String, u64>>,
) -> Drops {
    let mut drops = Drops {
        metrics_url: spec.metrics.clone(),
        ..Drops::default()
    };
    match (before, after) {
        (Some(Ok(before)), Some(Ok(after))) => {
            drops.series = scrape::deltas(&before, &after);
            drops.counted = scrape::counted(&drops.series);
        }
        (Some(Err(error)), _) | (_, Some(Err(error))) => drops.metrics_error = Some(error),
        _ => {}
    }
    drops.unaccounted = lost as f64 - drops.counted;
    drops.unaccounted_by_records = lost;
    if let (Some(before), Some(after)) = (kernel_before, kernel_after) {
        drops.kernel_udp = scrape::kernel_deltas(&before, &after);
    }
    drops
}

fn warnings_after(result: &mut RunResult, send: &crate::send::SendTotals) {
    let warnings = &mut result.warnings;
    let traffic = &send.traffic;
    if traffic.pause_violations > 0 || traffic.early_emits > 0 {
        warnings.push(format!(
            "{} sessions restarted before their pause ended and {} events left early: raise --keys",
            traffic.pause_violations, traffic.early_emits
        ));
    }
    if traffic.replay_lines_without_key > 0 {
        warnings.push(format!(
            "{} replayed lines had no key member (see --key-field); they shared hash 0",
            traffic.replay_lines_without_key
        ));
    }
    if result.offered_per_s > 0.0 && send.lag_end_max_ns > 100_000_000 {
        warnings.push(format!(
            "the generator ended {:.0} ms behind its schedule: it could not offer {}/s (latency includes the lag)",
            send.lag_end_max_ns as f64 / 1e6,
            svg::short_number(result.offered_per_s)
        ));
    }
    if send.sink.events_failed > 0 {
        warnings.push(format!(
            "{} events in {} datagrams were refused by the kernel (is anything listening on the target?)",
            send.sink.events_failed, send.sink.send_errors
        ));
    }
    if send.sink.events_oversize > 0 {
        warnings.push(format!(
            "{} events did not fit --datagram-bytes-max and were skipped",
            send.sink.events_oversize
        ));
    }
    if result.totals.stale > 0 {
        warnings.push(format!(
            "{} enriched events from before this run were ignored",
            result.totals.stale
        ));
    }
    if let Some(error) = &result.receiver_error {
        warnings.push(format!("receiver: {error}"));
    }
}

/// `run --baseline`: the same traffic against an in-process `baseline-recv` first.
pub fn baseline_first(
    spec: &RunSpec,
    listen: SocketAddr,
    threads: u32,
) -> Result<BaselineResult, String> {
    let baseline = Baseline::start(spec.plan.transport, listen, threads, None)?;
    let mut baseline_spec = spec.clone();
    baseline_spec.command = format!("{} (baseline)", spec.command);
    baseline_spec.plan.target = baseline.local_address;
    baseline_spec.output = None;
    baseline_spec.metrics = None;
    if spec.progress {
        eprintln!(
            "baseline: the same traffic to baseline-recv on {}",
            baseline.local_address
        );
    }
    let run = execute(&baseline_spec, serde_json::Value::Null);
    if let Ok(run) = &run {
        // Datagrams still in socket buffers land within moments; what never comes is lost.
        let deadline = clock::mono_ns() + 1_000_000_000;
        while baseline.counters.events.load(Ordering::Relaxed) < run.totals.sent
            && clock::mono_ns() < deadline
        {
            std::thread::sleep(POLL);
        }
    }
    let totals = baseline.stop();
    let run = run?;
    let sending_s = run.sending_s.max(1e-9);
    Ok(BaselineResult {
        listen: listen.to_string(),
        sent: run.totals.sent,
        received: totals.events,
        sending_s,
        received_per_s: totals.events as f64 / sending_s,
        ratio: 0.0,
    })
}

/// Summary of `--to-file`.
#[derive(Debug, serde::Serialize)]
pub struct FileSummary {
    pub path: String,
    pub events: u64,
    pub bytes: u64,
    pub event_time_span_s: f64,
    pub sessions_started: u64,
}

/// Writes `events` events of `workload` as JSON lines, event time advancing at `rate` per second
/// from [`FILE_EPOCH_MS`]; the same seed gives the same file.
pub fn to_file(
    workload: &Workload,
    seed: u64,
    rate: f64,
    events: u64,
    path: &Path,
) -> Result<FileSummary, String> {
    assert!(rate > 0.0);
    let mut source = workload.source(seed, 0, 1)?;
    let file =
        std::fs::File::create(path).map_err(|e| format!("--to-file {}: {e}", path.display()))?;
    let mut out = BufWriter::with_capacity(FILE_BUFFER_BYTES, file);
    let mut line = Vec::with_capacity(64 * 1024);
    let period_ns = 1e9 / rate;
    let mut bytes = 0u64;
    let mut model_ns = 0;
    let write = |out: &mut BufWriter<std::fs::File>, line: &[u8]| -> io::Result<()> {
        out.write_all(line)?;
        out.write_all(b"\n")
    };
    for i in 0..events {
        model_ns = (i as f64 * period_ns) as u64;
        line.clear();
        let ts_ms = FILE_EPOCH_MS + model_ns / 1_000_000;
        match source.next(model_ns, ts_ms, None, &mut line) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => return Err(format!("reading the source: {e}")),
        }
        write(&mut out, &line).map_err(|e| format!("writing {}: {e}", path.display()))?;
        bytes += line.len() as u64 + 1;
    }
    out.flush()
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(FileSummary {
        path: path.display().to_string(),
        events,
        bytes,
        event_time_span_s: model_ns as f64 / 1e9,
        sessions_started: source.stats().sessions_started,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::send::Transport;

    fn click() -> Workload {
        Workload::Click {
            model: SessionModel {
                gap_mean_ns: 5_000_000,
                pause_ns: 100_000_000,
                burst_mean: 10.0,
            },
            keys: 10_000,
            params: ClickParams {
                tenants: 3,
                pages: 100,
                payload_bytes: 140,
                logout_pct: 30,
            },
        }
    }

    #[test]
    fn to_file_is_reproducible_and_time_advances() {
        let dir =
            std::env::temp_dir().join(format!("sessionizer-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
        let summary = to_file(&click(), 42, 10_000.0, 5_000, &a).unwrap();
        to_file(&click(), 42, 10_000.0, 5_000, &b).unwrap();
        let text = std::fs::read_to_string(&a).unwrap();
        assert_eq!(text, std::fs::read_to_string(&b).unwrap());
        assert_eq!(summary.events, 5_000);
        assert_eq!(text.lines().count(), 5_000);
        let ts: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["ts"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ts[0], FILE_EPOCH_MS);
        assert!(ts.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*ts.last().unwrap(), FILE_EPOCH_MS + 499);
        assert!(!text.contains("sent_ns"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The whole path with no appliance: UDP to a baseline-recv that echoes enriched lines.
    #[test]
    fn run_against_echoing_baseline() {
        let output = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let baseline = Baseline::start(
            Transport::Udp,
            "127.0.0.1:0".parse().unwrap(),
            1,
            Some(output),
        )
        .unwrap();
        let spec = RunSpec {
            command: "run".to_string(),
            workload: click(),
            seed: 1,
            plan: SendPlan {
                transport: Transport::Udp,
                target: baseline.local_address,
                threads: 1,
                connections: 1,
                rate: 20_000.0,
                duration_ns: Some(1_500_000_000),
                events: None,
                events_per_datagram: 10,
                datagram_bytes_max: 1472,
                steer: false,
                flush_ns: 1_000_000,
                tick_ns: 50_000,
                stamp: true,
            },
            output: Some(output),
            output_wait: Duration::from_secs(2),
            // The echo writer picks a new client up within 20 ms; leave room on a busy machine.
            output_settle: Duration::from_millis(300),
            drain: Duration::from_secs(2),
            metrics: None,
            progress: false,
        };
        let result = execute(&spec, serde_json::Value::Null).unwrap();
        baseline.stop();
        assert_eq!(result.totals.sent, 30_000);
        assert_eq!(result.totals.received, 30_000, "{}", result.summary());
        assert_eq!(result.totals.lost, 0);
        let latency = result.latency.as_ref().expect("latency");
        assert_eq!(latency.count, 30_000);
        assert!(latency.p50_ms < 50.0, "{}", result.summary());
        assert!(result.timeline.len() >= 2);
        assert!(result.timeline.iter().any(|r| r.p99_ms.is_some()));
        let json = serde_json::to_string(&result).unwrap();
        let back: RunResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back.totals.sent, 30_000);
    }
}
