//! The figures of `bench/RESULTS.md`, each reproduced by one command that starts the appliance
//! itself (`appliance`), runs everything in an interleaved order, writes a run directory and
//! prints the table that goes into RESULTS:
//!
//! - [`reproduce`]: flat-out throughput over TCP and UDP (10 events per datagram) with, in each
//!   round, the raw receive rate of the same kind of socket on the same core (baseline-recv, no
//!   processing) and the engine alone on the same generated events (`sessionizer replay` of a
//!   file written by the same generator); then the latency sweep.
//! - [`metrics_cost`]: flat-out throughput with the metrics endpoint on (scraped every second)
//!   against no `[metrics]` section, in pairs; by default the two of a pair run at the same time
//!   on the same core, so that the machine's other work disturbs both alike.
//! - [`snapshot_latency`]: open-loop latency with many open sessions while snapshots are being
//!   written back to back, against the same load with persistence on and snapshots far apart,
//!   and with no persistence at all.
//! - [`recovery`]: open `keys` sessions, stop (the graceful shutdown snapshots every shard), and
//!   time the restart that recovers them (spawn to READY, and each shard's own `recovered in`)
//!   against a start on an empty persist directory; fails if a session is lost.
//!
//! Why this shape: the machines these run on are shared and noisy, so no figure stands alone.
//! Every comparison is made within a round (A then B, minutes apart at most), repeated, and
//! reported as the median of the per-round values and ratios, with the spread. Processed counts
//! come from the appliance's own per-shard counters, logged when it stops (so each throughput
//! run is a fresh appliance), together with the shards' CPU time: events per shard CPU-second
//! is the figure least disturbed by other work on the machine.
//!
//! Placement: the appliance's shards run on `--appliance-cores` (default: CPU 0 for one shard),
//! the harness (senders, receivers, scraper) on the other CPUs, the raw baseline's receiver and
//! the replay on the appliance's cores. With a single CPU nothing is pinned.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::appliance::{self, Appliance, ConfigSpec, Stopped};
use crate::baseline::Baseline;
use crate::machine::Machine;
use crate::report::{self, Latency, RunResult};
use crate::run::{self, RunSpec, Workload};
use crate::scrape;
use crate::send::{SendPlan, Transport};
use crate::svg;
use crate::sweep::{self, SweepSpec};
use crate::traffic::{ClickParams, SessionModel};

/// How long the harness waits for the appliance to have processed a preload.
const PRELOAD_WAIT: Duration = Duration::from_secs(300);
/// Pause between stopping one appliance and starting the next (ports, page cache settle).
const BETWEEN_RUNS: Duration = Duration::from_millis(500);
/// Bytes of arena reserved per session the snapshot run keeps open (a bench session takes
/// about 4 blocks of 32 bytes; the rest is headroom).
const ARENA_BYTES_PER_SESSION: u64 = 256;

/// Where things run, and with what.
pub struct Setup {
    pub binary: PathBuf,
    pub appliance_cpus: Vec<usize>,
    pub client_cpus: Vec<usize>,
    pub dir: PathBuf,
    pub seed: u64,
    /// Probed before the harness pins itself (a pinned thread sees only its own cpus).
    pub machine: Machine,
}

impl Setup {
    /// Pin this (the main) thread to the client CPUs before any harness thread starts.
    pub fn new(
        binary: Option<&Path>,
        appliance_cpus: Vec<usize>,
        dir: PathBuf,
        seed: u64,
    ) -> Result<Setup, String> {
        let binary = appliance::binary(binary)?;
        let machine = Machine::probe();
        let online = appliance::online_cpus();
        if let Some(c) = appliance_cpus.iter().find(|c| !online.contains(c)) {
            return Err(format!(
                "--appliance-cores: cpu {c} is not among the online cpus {online:?}"
            ));
        }
        let client_cpus: Vec<usize> = online
            .iter()
            .copied()
            .filter(|c| !appliance_cpus.contains(c))
            .collect();
        if client_cpus.is_empty() {
            log::warn!("no cpu left for the harness: it shares the appliance's cpus");
        } else {
            appliance::pin_current_thread(&client_cpus)?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Setup {
            binary,
            appliance_cpus,
            client_cpus,
            dir,
            seed,
            machine,
        })
    }

    fn cores_toml(&self) -> String {
        format!("{:?}", self.appliance_cpus)
    }

    /// Where a baseline receiver or a replay runs: the appliance's cpus, or anywhere.
    fn measured_cpus(&self) -> Vec<usize> {
        if self.client_cpus.is_empty() {
            Vec::new()
        } else {
            self.appliance_cpus.clone()
        }
    }
}

/// Event size of the flat-out runs.
const EVENT_BYTES: usize = 140;
/// Event size of the engine-alone replay file: its target (5M events/s per core) is stated
/// for 150-byte events.
const REPLAY_EVENT_BYTES: usize = 150;

/// The clickstream of `bench/README.md`; `logout_pct` 0 keeps every session open.
fn click(keys: u64, model: SessionModel, logout_pct: u32) -> Workload {
    sized_click(keys, model, logout_pct, EVENT_BYTES)
}

fn sized_click(keys: u64, model: SessionModel, logout_pct: u32, payload_bytes: usize) -> Workload {
    Workload::Click {
        model,
        keys,
        params: ClickParams {
            tenants: 8,
            pages: 1000,
            payload_bytes,
            logout_pct,
        },
    }
}

fn default_model() -> SessionModel {
    SessionModel {
        gap_mean_ns: 50_000_000,
        pause_ns: 2_000_000_000,
        burst_mean: 20.0,
    }
}

fn plan(
    transport: Transport,
    target: SocketAddr,
    rate: f64,
    duration: Option<Duration>,
    events: Option<u64>,
) -> SendPlan {
    SendPlan {
        transport,
        target,
        threads: 1,
        connections: 1,
        rate,
        duration_ns: duration.map(|d| d.as_nanos() as u64),
        events,
        events_per_datagram: 10,
        datagram_bytes_max: 1472,
        steer: false,
        flush_ns: 1_000_000,
        tick_ns: 50_000,
        stamp: true,
    }
}

fn spec(
    label: &str,
    workload: Workload,
    seed: u64,
    plan: SendPlan,
    output: Option<SocketAddr>,
    metrics: Option<String>,
) -> RunSpec {
    RunSpec {
        command: label.to_string(),
        workload,
        seed,
        plan,
        output,
        output_wait: Duration::from_secs(5),
        output_settle: Duration::from_millis(300),
        drain: Duration::from_secs(2),
        metrics,
        progress: false,
    }
}

fn transport_kind(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics.
// ---------------------------------------------------------------------------------------------

/// Median of the finite values (NaN when there are none).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// One row of a results table: a named series of per-round values.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub name: String,
    /// `rate` (events/s, shown as 1.23M), `ratio`, `ms`, `s`, `bytes` (shown as 1.23MB),
    /// `count`, `pct`.
    pub unit: &'static str,
    pub values: Vec<f64>,
    pub median: f64,
}

impl Row {
    fn new(name: impl Into<String>, unit: &'static str, values: Vec<f64>) -> Row {
        let median = median(&values);
        Row {
            name: name.into(),
            unit,
            values,
            median,
        }
    }

    fn fmt(&self, v: f64) -> String {
        if !v.is_finite() {
            return "-".to_string();
        }
        match self.unit {
            "rate" => format!("{}/s", svg::short_number((v / 1e3).round() * 1e3)),
            "ratio" => format!("{v:.3}"),
            "ms" => format!("{v:.3} ms"),
            "s" => format!("{v:.3} s"),
            "bytes" => format!("{}B", svg::short_number(v)),
            "pct" => format!("{:.1}%", v * 100.0),
            _ => format!("{v:.0}"),
        }
    }
}

/// A markdown table: name, median, min–max, every value in run order.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from("| figure | median | min – max | per round, in run order |\n");
    out += "|---|---|---|---|\n";
    for r in rows {
        let (lo, hi) = min_max(&r.values);
        let all: Vec<String> = r.values.iter().map(|&v| r.fmt(v)).collect();
        let _ = writeln!(
            out,
            "| {} | **{}** | {} – {} | {} |",
            r.name,
            r.fmt(r.median),
            r.fmt(lo),
            r.fmt(hi),
            all.join(", ")
        );
    }
    out
}

fn write_results(
    setup: &Setup,
    argv: &[String],
    name: &str,
    json: &serde_json::Value,
    table_md: &str,
    extra: &[(&str, String)],
) -> Result<(), String> {
    let text = serde_json::to_string_pretty(json).map_err(|e| format!("{name}: {e}"))?;
    let mut files = vec![(name, text + "\n"), ("table.md", table_md.to_string())];
    files.extend(extra.iter().map(|(n, c)| (*n, c.clone())));
    report::write_run_dir(&setup.dir, argv, &setup.machine, &files)
        .map_err(|e| format!("writing {}: {e}", setup.dir.display()))
}

// ---------------------------------------------------------------------------------------------
// Throughput runs.
// ---------------------------------------------------------------------------------------------

/// One flat-out run against a fresh appliance.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ApplianceRun {
    pub label: String,
    pub transport: &'static str,
    pub sent: u64,
    pub sending_s: f64,
    /// Events the shards counted in (every line received, handed over or not).
    pub processed: u64,
    pub processed_per_s: f64,
    /// Shard CPU time (user + system) over the appliance's life.
    pub shard_cpu_s: f64,
    pub per_cpu_s: f64,
    /// CPU time of the whole appliance (shards, sink threads, everything), and events per it.
    pub process_cpu_s: f64,
    pub per_process_cpu_s: f64,
    /// What the file outputs wrote (none configured: zeros).
    pub file_outputs: appliance::FileOutputs,
    pub udp_kernel_drops: u64,
    pub scrapes: u64,
    pub stop_s: f64,
}

/// Start an appliance on `config`, send flat out for `duration`, stop it, count what it did.
/// With `scrape_every`, a harness thread GETs `/metrics` that often meanwhile.
fn appliance_flat_out(
    setup: &Setup,
    label: &str,
    config: &ConfigSpec,
    transport: Transport,
    keys: u64,
    duration: Duration,
    scrape_every: Option<Duration>,
) -> Result<ApplianceRun, String> {
    let app = Appliance::start(&setup.binary, &setup.dir, label, &config.toml())?;
    let target = app.listener(transport_kind(transport))?;
    let scraper = match (scrape_every, app.metrics_url()) {
        (Some(every), Some(url)) => Some(Scraper::start(url, every)),
        (Some(_), None) => return Err(format!("{label}: scraping asked, no metrics endpoint")),
        _ => None,
    };
    let s = spec(
        label,
        click(keys, default_model(), 30),
        setup.seed,
        plan(transport, target, 0.0, Some(duration), None),
        None,
        None,
    );
    let result = run::execute(&s, serde_json::Value::Null);
    let scrapes = scraper.map_or(0, Scraper::stop);
    let stopped = app.stop();
    if let Some(dir) = &config.file_output {
        // Gigabytes a run: keep the counts, not the files.
        let _ = std::fs::remove_dir_all(dir);
    }
    let stopped = stopped?;
    let result = result?;
    if stopped.file_outputs.dropped > 0 {
        return Err(format!(
            "{label}: the file output dropped {} records although it blocks when full",
            stopped.file_outputs.dropped
        ));
    }
    save_run(setup, label, &result)?;
    Ok(flat_out_figures(
        label, transport, &result, &stopped, scrapes,
    ))
}

/// `<label>.result.json`: the harness's view of one appliance run (totals, latency, timeline).
fn save_run(setup: &Setup, label: &str, result: &RunResult) -> Result<(), String> {
    let path = setup.dir.join(format!("{label}.result.json"));
    let json = serde_json::to_string_pretty(result).map_err(|e| format!("{label}: {e}"))?;
    std::fs::write(&path, json + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

fn flat_out_figures(
    label: &str,
    transport: Transport,
    result: &RunResult,
    stopped: &Stopped,
    scrapes: u64,
) -> ApplianceRun {
    let processed = stopped.sum(match transport {
        Transport::Udp => "udp_events",
        Transport::Tcp => "tcp_events",
    });
    let cpu_s = stopped.sum("cpu_us") as f64 / 1e6;
    let sending_s = result.sending_s.max(1e-9);
    ApplianceRun {
        label: label.to_string(),
        transport: transport_kind(transport),
        sent: result.totals.sent,
        sending_s,
        processed,
        processed_per_s: processed as f64 / sending_s,
        shard_cpu_s: cpu_s,
        per_cpu_s: if cpu_s > 0.0 {
            processed as f64 / cpu_s
        } else {
            f64::NAN
        },
        process_cpu_s: stopped.process_cpu_s,
        per_process_cpu_s: if stopped.process_cpu_s > 0.0 {
            processed as f64 / stopped.process_cpu_s
        } else {
            f64::NAN
        },
        file_outputs: stopped.file_outputs,
        udp_kernel_drops: stopped.sum("udp_drops"),
        scrapes,
        stop_s: stopped.stop_s,
    }
}

/// The raw receive rate of the same traffic: baseline-recv (no parsing) on the appliance's cpus.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RawRun {
    pub transport: &'static str,
    pub sent: u64,
    pub received: u64,
    pub sending_s: f64,
    pub received_per_s: f64,
}

fn raw_flat_out(
    setup: &Setup,
    label: &str,
    transport: Transport,
    keys: u64,
    duration: Duration,
) -> Result<RawRun, String> {
    let receivers = setup.appliance_cpus.len() as u32;
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let cpus = setup.measured_cpus();
    let baseline = appliance::on_cpus(&cpus, move || {
        Baseline::start(transport, listen, receivers, None)
    })??;
    let s = spec(
        label,
        click(keys, default_model(), 30),
        setup.seed,
        plan(transport, baseline.local_address, 0.0, Some(duration), None),
        None,
        None,
    );
    let result = run::execute(&s, serde_json::Value::Null);
    if let Ok(r) = &result {
        // Datagrams and bytes still in socket buffers land within moments.
        let deadline = Instant::now() + Duration::from_secs(1);
        while baseline.counters.events.load(Ordering::Relaxed) < r.totals.sent
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let totals = baseline.stop();
    let result = result?;
    let sending_s = result.sending_s.max(1e-9);
    Ok(RawRun {
        transport: transport_kind(transport),
        sent: result.totals.sent,
        received: totals.events,
        sending_s,
        received_per_s: totals.events as f64 / sending_s,
    })
}

/// `sessionizer replay FILE --config CFG --output /dev/null` on the appliance's cpus.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EngineRun {
    pub events: u64,
    pub wall_s: f64,
    pub cpu_s: f64,
    pub events_per_s: f64,
    pub per_cpu_s: f64,
}

fn engine_alone(
    setup: &Setup,
    file: &Path,
    events: u64,
    config: &Path,
    log: &Path,
) -> Result<EngineRun, String> {
    let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = std::process::Command::new(&setup.binary);
    cmd.arg("replay")
        .arg(file)
        .arg("--config")
        .arg(config)
        .arg("--output")
        .arg("/dev/null")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file);
    let (status, wall, cpu) = appliance::run_timed(cmd, &setup.measured_cpus())?;
    if status != 0 {
        return Err(format!(
            "sessionizer replay exited with status {status}; see {}",
            log.display()
        ));
    }
    let wall_s = wall.as_secs_f64().max(1e-9);
    let cpu_s = cpu.as_secs_f64();
    Ok(EngineRun {
        events,
        wall_s,
        cpu_s,
        events_per_s: events as f64 / wall_s,
        per_cpu_s: if cpu_s > 0.0 {
            events as f64 / cpu_s
        } else {
            f64::NAN
        },
    })
}

/// GETs `/metrics` every `every` until stopped (a Prometheus server's scrape).
struct Scraper {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<()>,
}

impl Scraper {
    fn start(url: String, every: Duration) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (Arc::clone(&stop), Arc::clone(&count));
        let handle = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    if scrape::http_get(&url).is_ok() {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    next += every;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Scraper {
            stop,
            count,
            handle,
        }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        self.count.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// reproduce
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, serde::Serialize)]
pub struct ReproduceOptions {
    pub rounds: u32,
    pub duration: Duration,
    pub keys: u64,
    pub replay_events: u64,
    /// Event-time rate of the replay file (its session structure is that of a live run at it).
    pub replay_rate: f64,
    pub sweep_rates: Vec<f64>,
    pub sweep_step: Duration,
    pub sweep_settle: Duration,
    pub sweep_keys: u64,
    pub p99_threshold_ms: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ReproduceRound {
    pub raw_tcp: RawRun,
    pub appliance_tcp: ApplianceRun,
    /// As `appliance_tcp`, with outputs that carry no enriched events.
    pub appliance_tcp_markers: ApplianceRun,
    pub raw_udp: RawRun,
    pub appliance_udp: ApplianceRun,
    pub engine: EngineRun,
}

fn bench_config(setup: &Setup, metrics: bool) -> ConfigSpec {
    ConfigSpec {
        cores: setup.cores_toml(),
        arena_bytes: 64 << 20,
        max_sessions: 500_000,
        metrics_publish: metrics.then(|| "1s".to_string()),
        persist: None,
        snapshot_write_rate: None,
        idle_timeout: "1s".to_string(),
        file_output: None,
        markers_only: false,
    }
}

/// Throughput (TCP, UDP), raw-receive and engine-alone baselines, round by round, then the
/// latency sweep. Returns the table printed.
pub fn reproduce(setup: &Setup, o: &ReproduceOptions, argv: &[String]) -> Result<String, String> {
    let config = bench_config(setup, true);
    // Flat out, every record is also written to a file that ingest waits for (the throughput
    // targets include a file sink); the sweep measures latency on the TCP output alone.
    let flat_config = ConfigSpec {
        file_output: Some(setup.dir.join("file-output")),
        ..config.clone()
    };
    // The same with outputs for the markers alone: what writing the enriched events costs.
    let markers_config = ConfigSpec {
        markers_only: true,
        ..flat_config.clone()
    };
    let cfg_path = setup.dir.join("bench.toml");
    std::fs::write(&cfg_path, config.toml()).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    // The engine-alone input: the same generator, seed and keys, 150-byte events, written once.
    let file = setup.dir.join("events.jsonl");
    eprintln!(
        "reproduce: writing {} events to {}",
        o.replay_events,
        file.display()
    );
    let summary = run::to_file(
        &sized_click(o.keys, default_model(), 30, REPLAY_EVENT_BYTES),
        setup.seed,
        o.replay_rate,
        o.replay_events,
        &file,
    )?;
    let mut rounds = Vec::new();
    for r in 1..=o.rounds {
        if crate::interrupted() {
            break;
        }
        eprintln!("reproduce: round {r}/{}", o.rounds);
        let raw_tcp = raw_flat_out(setup, "raw-tcp", Transport::Tcp, o.keys, o.duration)?;
        std::thread::sleep(BETWEEN_RUNS);
        let appliance_tcp = appliance_flat_out(
            setup,
            &format!("appliance-tcp-{r}"),
            &flat_config,
            Transport::Tcp,
            o.keys,
            o.duration,
            None,
        )?;
        std::thread::sleep(BETWEEN_RUNS);
        let appliance_tcp_markers = appliance_flat_out(
            setup,
            &format!("appliance-tcp-markers-{r}"),
            &markers_config,
            Transport::Tcp,
            o.keys,
            o.duration,
            None,
        )?;
        std::thread::sleep(BETWEEN_RUNS);
        let raw_udp = raw_flat_out(setup, "raw-udp", Transport::Udp, o.keys, o.duration)?;
        std::thread::sleep(BETWEEN_RUNS);
        let appliance_udp = appliance_flat_out(
            setup,
            &format!("appliance-udp-{r}"),
            &flat_config,
            Transport::Udp,
            o.keys,
            o.duration,
            None,
        )?;
        std::thread::sleep(BETWEEN_RUNS);
        let engine = engine_alone(
            setup,
            &file,
            summary.events,
            &cfg_path,
            &setup.dir.join(format!("replay-{r}.log")),
        )?;
        eprintln!(
            "reproduce: round {r}: tcp {}/s (raw {}/s, markers only {}/s), udp {}/s (raw {}/s), engine alone {}/s",
            svg::short_number(appliance_tcp.processed_per_s.round()),
            svg::short_number(raw_tcp.received_per_s.round()),
            svg::short_number(appliance_tcp_markers.processed_per_s.round()),
            svg::short_number(appliance_udp.processed_per_s.round()),
            svg::short_number(raw_udp.received_per_s.round()),
            svg::short_number(engine.events_per_s.round()),
        );
        rounds.push(ReproduceRound {
            raw_tcp,
            appliance_tcp,
            appliance_tcp_markers,
            raw_udp,
            appliance_udp,
            engine,
        });
    }
    let _ = std::fs::remove_file(&file);

    // The sweep: one appliance, UDP steps, latency from its TCP output.
    let app = Appliance::start(&setup.binary, &setup.dir, "sweep", &config.toml())?;
    let base = spec(
        "sweep",
        click(o.sweep_keys, default_model(), 30),
        setup.seed,
        plan(
            Transport::Udp,
            app.listener("udp")?,
            o.sweep_rates[0],
            Some(o.sweep_step),
            None,
        ),
        Some(app.tcp_output()?),
        // No drop counters: between steps the output has no consumer, and the markers of the
        // previous step's sessions dropped then would count against the next step. A lossy step
        // shows as `lost` all the same.
        None,
    );
    let sweep_spec = SweepSpec {
        base,
        rates: o.sweep_rates.clone(),
        settle: o.sweep_settle,
        threshold_ms: o.p99_threshold_ms,
        past_knee: 0,
    };
    let sweep_result = sweep::execute(&sweep_spec, serde_json::Value::Null);
    app.stop()?;
    let sweep_result = sweep_result?;

    let col = |f: &dyn Fn(&ReproduceRound) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    // The rows every appliance run has, for the run `pick` chooses from a round.
    let appliance_rows = |flat_out: &str,
                          transport: &str,
                          pick: fn(&ReproduceRound) -> &ApplianceRun| {
        let figure = |f: fn(&ApplianceRun) -> f64| col(&|r| f(pick(r)));
        vec![
            Row::new(flat_out, "rate", figure(|a| a.processed_per_s)),
            Row::new(
                format!("appliance, {transport}, events per shard CPU-second"),
                "rate",
                figure(|a| a.per_cpu_s),
            ),
            Row::new(
                format!("appliance, {transport}, events per appliance CPU-second (every thread)"),
                "rate",
                figure(|a| a.per_process_cpu_s),
            ),
            Row::new(
                format!("appliance, {transport}, file output written, bytes/s"),
                "rate",
                figure(|a| a.file_outputs.bytes as f64 / a.sending_s),
            ),
        ]
    };
    let mut rows = appliance_rows("appliance, TCP flat out, events/s", "TCP", |r| {
        &r.appliance_tcp
    });
    rows.extend([
        Row::new(
            "raw TCP receive (no processing), events/s",
            "rate",
            col(&|r| r.raw_tcp.received_per_s),
        ),
        Row::new(
            "appliance TCP ÷ raw TCP",
            "ratio",
            col(&|r| r.appliance_tcp.processed_per_s / r.raw_tcp.received_per_s),
        ),
    ]);
    rows.extend(appliance_rows(
        "appliance, TCP flat out, markers-only outputs, events/s",
        "TCP markers only",
        |r| &r.appliance_tcp_markers,
    ));
    rows.push(Row::new(
        "appliance TCP markers only ÷ appliance TCP, per shard CPU-second",
        "ratio",
        col(&|r| r.appliance_tcp_markers.per_cpu_s / r.appliance_tcp.per_cpu_s),
    ));
    rows.extend(appliance_rows(
        "appliance, UDP flat out (10 events/datagram), events/s",
        "UDP",
        |r| &r.appliance_udp,
    ));
    rows.extend([
        Row::new(
            "UDP offered by the generator, events/s",
            "rate",
            col(&|r| r.appliance_udp.sent as f64 / r.appliance_udp.sending_s),
        ),
        Row::new(
            "raw UDP receive (no processing), events/s",
            "rate",
            col(&|r| r.raw_udp.received_per_s),
        ),
        Row::new(
            "appliance UDP ÷ raw UDP",
            "ratio",
            col(&|r| r.appliance_udp.processed_per_s / r.raw_udp.received_per_s),
        ),
        Row::new(
            "engine alone (replay of the same events), events/s",
            "rate",
            col(&|r| r.engine.events_per_s),
        ),
        Row::new(
            "engine alone, events per CPU-second",
            "rate",
            col(&|r| r.engine.per_cpu_s),
        ),
        Row::new(
            "appliance TCP ÷ engine alone",
            "ratio",
            col(&|r| r.appliance_tcp.processed_per_s / r.engine.events_per_s),
        ),
        Row::new(
            "appliance UDP ÷ engine alone",
            "ratio",
            col(&|r| r.appliance_udp.processed_per_s / r.engine.events_per_s),
        ),
    ]);
    let mut md = table(&rows);
    md += "\nLatency sweep (UDP, 10 events per datagram, open loop; latency = send to enriched event on the TCP output):\n\n";
    md += "| offered/s | achieved/s | p50 | p99 | lost |\n|---|---|---|---|---|\n";
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3} ms"));
    for p in &sweep_result.points {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            svg::short_number(p.offered_per_s),
            svg::short_number(p.achieved_per_s.round()),
            ms(p.p50_ms),
            ms(p.p99_ms),
            p.lost
        );
    }
    let k = &sweep_result.knee;
    let _ = writeln!(
        md,
        "\nSustainable rate (p99 < {} ms, no loss): {}; knee: {}.",
        o.p99_threshold_ms,
        k.sustainable_per_s.map_or("none".to_string(), |v| format!(
            "{}/s",
            svg::short_number(v.round())
        )),
        k.knee_per_s.map_or("not reached".to_string(), |v| format!(
            "≈{}/s",
            svg::short_number(v.round())
        ))
    );
    let json = serde_json::json!({
        "command": "reproduce",
        "started_utc": report::utc_now(),
        "options": o,
        "placement": { "appliance_cpus": setup.appliance_cpus, "client_cpus": setup.client_cpus },
        "config": config.toml(),
        "replay_file": summary,
        "rounds": rounds,
        "rows": rows,
        "sweep": { "points": sweep_result.points, "knee": sweep_result.knee },
    });
    let sweep_json =
        serde_json::to_string_pretty(&sweep_result).map_err(|e| format!("sweep.json: {e}"))?;
    let title = format!(
        "sessionizer-bench reproduce — latency sweep, UDP, p99 threshold {} ms",
        o.p99_threshold_ms
    );
    write_results(
        setup,
        argv,
        "reproduce.json",
        &json,
        &md,
        &[
            ("sweep.json", sweep_json + "\n"),
            ("sweep.svg", sweep_result.svg(&title)),
        ],
    )?;
    Ok(md)
}

// ---------------------------------------------------------------------------------------------
// metrics-cost
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, serde::Serialize)]
pub struct MetricsCostOptions {
    pub pairs: u32,
    /// Run the two appliances of a pair at the same time on the same cores.
    pub concurrent: bool,
    pub duration: Duration,
    pub transport: Transport,
    pub keys: u64,
    pub scrape_every: Duration,
}

/// Flat out with the endpoint on and scraped, then with no `[metrics]` section, in pairs.
pub fn metrics_cost(
    setup: &Setup,
    o: &MetricsCostOptions,
    argv: &[String],
) -> Result<String, String> {
    let (on_cfg, off_cfg) = (bench_config(setup, true), bench_config(setup, false));
    let mut on = Vec::new();
    let mut off = Vec::new();
    for p in 1..=o.pairs {
        if crate::interrupted() {
            break;
        }
        eprintln!("metrics-cost: pair {p}/{}", o.pairs);
        let run_on = || {
            appliance_flat_out(
                setup,
                &format!("metrics-on-{p}"),
                &on_cfg,
                o.transport,
                o.keys,
                o.duration,
                Some(o.scrape_every),
            )
        };
        let run_off = || {
            appliance_flat_out(
                setup,
                &format!("metrics-off-{p}"),
                &off_cfg,
                o.transport,
                o.keys,
                o.duration,
                None,
            )
        };
        let (a, b) = if o.concurrent {
            // Both at once on the same cores, each with its own sender: whatever else the
            // machine does meanwhile hits both alike. Which one starts first alternates.
            std::thread::scope(|scope| {
                let joined =
                    |h: std::thread::ScopedJoinHandle<'_, Result<ApplianceRun, String>>| {
                        h.join()
                            .unwrap_or_else(|_| Err("a run thread panicked".to_string()))
                    };
                if p % 2 == 1 {
                    let a = scope.spawn(run_on);
                    let b = scope.spawn(run_off);
                    (joined(a), joined(b))
                } else {
                    let b = scope.spawn(run_off);
                    let a = scope.spawn(run_on);
                    (joined(a), joined(b))
                }
            })
        } else {
            let a = run_on();
            std::thread::sleep(BETWEEN_RUNS);
            (a, run_off())
        };
        on.push(a?);
        off.push(b?);
        std::thread::sleep(BETWEEN_RUNS);
        let (a, b) = (on.last().expect("pushed"), off.last().expect("pushed"));
        eprintln!(
            "metrics-cost: pair {p}: on {}/s ({} scrapes), off {}/s, ratio {:.3}",
            svg::short_number(a.processed_per_s.round()),
            a.scrapes,
            svg::short_number(b.processed_per_s.round()),
            a.processed_per_s / b.processed_per_s
        );
    }
    let pair = |f: &dyn Fn(&ApplianceRun, &ApplianceRun) -> f64| {
        on.iter()
            .zip(&off)
            .map(|(a, b)| f(a, b))
            .collect::<Vec<f64>>()
    };
    let t = transport_kind(o.transport).to_uppercase();
    let rows = vec![
        Row::new(
            format!(
                "metrics on (scraped every {:?}), {t} events/s",
                o.scrape_every
            ),
            "rate",
            pair(&|a, _| a.processed_per_s),
        ),
        Row::new(
            format!("metrics off, {t} events/s"),
            "rate",
            pair(&|_, b| b.processed_per_s),
        ),
        Row::new(
            "on ÷ off, events/s",
            "ratio",
            pair(&|a, b| a.processed_per_s / b.processed_per_s),
        ),
        Row::new(
            "metrics on, events per shard CPU-second",
            "rate",
            pair(&|a, _| a.per_cpu_s),
        ),
        Row::new(
            "metrics off, events per shard CPU-second",
            "rate",
            pair(&|_, b| b.per_cpu_s),
        ),
        Row::new(
            "on ÷ off, per CPU-second",
            "ratio",
            pair(&|a, b| a.per_cpu_s / b.per_cpu_s),
        ),
    ];
    let md = table(&rows);
    let json = serde_json::json!({
        "command": "metrics-cost",
        "started_utc": report::utc_now(),
        "options": o,
        "placement": { "appliance_cpus": setup.appliance_cpus, "client_cpus": setup.client_cpus },
        "config_on": on_cfg.toml(),
        "config_off": off_cfg.toml(),
        "on": on,
        "off": off,
        "rows": rows,
    });
    write_results(setup, argv, "metrics-cost.json", &json, &md, &[])?;
    Ok(md)
}

// ---------------------------------------------------------------------------------------------
// snapshot-latency
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotOptions {
    pub pairs: u32,
    pub keys: u64,
    pub rate: f64,
    pub duration: Duration,
    pub snapshot_interval: String,
    pub far_interval: String,
    /// `persist.snapshot_write_rate` of the runs with persistence; `None`: the default.
    pub snapshot_write_rate: Option<String>,
    pub transport: Transport,
}

/// One open-loop run with many open sessions.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotRun {
    pub label: String,
    pub snapshot_interval: String,
    pub sessions_open: f64,
    pub sent: u64,
    pub received: u64,
    pub latency: Option<Latency>,
    /// Snapshots published during the measured run, over every shard.
    pub snapshots: f64,
    /// Time the shards spent in snapshots during the run ÷ (run time × shards).
    pub snapshot_duty: f64,
    /// From the appliance's log, snapshots taken during the run: the time each one's capture
    /// held the executor (in one step, or in all its slices for a sliced capture) and its
    /// longest step on the executor, ms.
    pub capture_ms: Vec<f64>,
    pub longest_step_ms: Vec<f64>,
    pub total_ms: Vec<f64>,
    /// The appliance's own p99 at the end of the run (`sessionizer_event_latency_seconds`: its
    /// last ~10 s, from the kernel's receipt of a datagram to the output's queueing), ms.
    pub appliance_p99_ms: f64,
    /// Times an executor was found parked with work and woken during the run, all shards.
    pub executor_kicks: f64,
    /// CPU time the hypervisor took from this VM during the run (steal, all CPUs), ms a second.
    pub steal_ms_per_s: f64,
}

/// Every sample of `name` in `body`, summed.
fn metric(body: &str, name: &str) -> f64 {
    scrape::parse_prometheus(body)
        .into_iter()
        .filter(|(s, _)| s == name || s.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// `snapshot written: generation …` lines: (capture ms, longest step ms, total ms).
fn snapshot_lines(lines: &[String]) -> Vec<(f64, f64, f64)> {
    let num_before = |l: &str, key: &str| -> Option<f64> {
        let at = l.find(key)?;
        let head = l[..at].trim_end();
        let tail = head.rsplit(' ').next()?;
        tail.parse().ok()
    };
    lines
        .iter()
        .filter(|l| {
            // Builds before the file I/O moved off the executor logged "snapshot generation".
            (l.contains(": snapshot written: generation ") || l.contains(": snapshot generation "))
                && !l.contains("final")
        })
        .filter_map(|l| {
            let after =
                |key: &str| -> Option<f64> { l.split(key).nth(1)?.split(' ').next()?.parse().ok() };
            let capture = after("(capture ")?;
            let total = num_before(l, " ms (capture")?;
            // The steps that hold the executor. A sliced capture logs the time it held the
            // executor in all ("capture … held") and its longest slice; before it, the capture
            // was one step. Builds before the write, the syncs and the publication moved off the
            // executor wrote each chunk, synced and published on it and logged "longest step"
            // (the longest chunk or the fsync).
            let longest = match (after("longest slice "), after("longest step ")) {
                (Some(slice), _) => slice,
                (None, Some(chunk)) => capture.max(chunk).max(after("publish ")?),
                (None, None) => capture,
            };
            Some((capture, longest, total))
        })
        .collect()
}

/// `(max_sessions, arena_bytes)` per shard for `keys` open sessions over the appliance's shards,
/// with a quarter to spare.
fn open_sessions_sizing(setup: &Setup, keys: u64) -> (u64, u64) {
    let per_shard = keys.div_ceil(setup.appliance_cpus.len() as u64);
    let max_sessions = per_shard + per_shard / 4 + 1024;
    let arena = (max_sessions * ARENA_BYTES_PER_SESSION).div_ceil(1 << 20) << 20;
    (max_sessions, arena)
}

/// Send every one of `keys` keys once, flat out over TCP (lossless), no logouts: `keys` open
/// sessions. Waits until the appliance has read them all; returns that `/metrics` body.
fn preload_keys(
    setup: &Setup,
    app: &Appliance,
    url: &str,
    label: &str,
    keys: u64,
    deadline: Instant,
) -> Result<String, String> {
    let preload_model = SessionModel {
        gap_mean_ns: 0,
        pause_ns: 0,
        burst_mean: 1.0,
    };
    let preload = spec(
        &format!("{label} preload"),
        click(keys, preload_model, 0),
        setup.seed,
        plan(Transport::Tcp, app.listener("tcp")?, 0.0, None, Some(keys)),
        None,
        None,
    );
    run::execute(&preload, serde_json::Value::Null)?;
    loop {
        let body = scrape::http_get(url)?;
        if metric(&body, "sessionizer_events_in_total") >= keys as f64 {
            return Ok(body);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{label}: the preload was not processed within {PRELOAD_WAIT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `interval`: `persist.snapshot_interval`, or `None` for no `[persist]` section at all.
fn snapshot_run(
    setup: &Setup,
    o: &SnapshotOptions,
    label: &str,
    interval: Option<&str>,
) -> Result<SnapshotRun, String> {
    let shards = setup.appliance_cpus.len() as u64;
    let (max_sessions, arena) = open_sessions_sizing(setup, o.keys);
    let state = setup.dir.join(format!("{label}-state"));
    let _ = std::fs::remove_dir_all(&state);
    let config = ConfigSpec {
        cores: setup.cores_toml(),
        arena_bytes: arena,
        max_sessions,
        metrics_publish: Some("1s".to_string()),
        persist: interval.map(|i| (state.clone(), i.to_string())),
        snapshot_write_rate: o.snapshot_write_rate.clone(),
        idle_timeout: "30m".to_string(),
        file_output: None,
        markers_only: false,
    };
    let app = Appliance::start(&setup.binary, &setup.dir, label, &config.toml())?;
    let url = app.metrics_url().ok_or("no metrics endpoint")?;
    let before = preload_keys(
        setup,
        &app,
        &url,
        label,
        o.keys,
        Instant::now() + PRELOAD_WAIT,
    )?;
    let lines_before = app.lines().len();
    let measured = spec(
        label,
        click(o.keys, default_model(), 0),
        setup.seed + 1,
        plan(
            o.transport,
            app.listener(transport_kind(o.transport))?,
            o.rate,
            Some(o.duration),
            None,
        ),
        Some(app.tcp_output()?),
        Some(url.clone()),
    );
    let steal_before = crate::machine::steal_ms();
    let result = run::execute(&measured, serde_json::Value::Null);
    let steal = crate::machine::steal_ms()
        .zip(steal_before)
        .map_or(f64::NAN, |(after, before)| after - before);
    // The counters are published once a second: wait for one more publication.
    std::thread::sleep(Duration::from_millis(1_100));
    let after = scrape::http_get(&url);
    let lines = app.lines();
    app.stop()?;
    let _ = std::fs::remove_dir_all(&state);
    let result = result?;
    save_run(setup, label, &result)?;
    let after = after?;
    let kicks = |b: &str| metric(b, "sessionizer_executor_kicks_total");
    let snaps = |b: &str| metric(b, "sessionizer_snapshots_total");
    let snap_us = |b: &str| metric(b, "sessionizer_snapshot_microseconds_total");
    let during = snapshot_lines(&lines[lines_before.min(lines.len())..]);
    Ok(SnapshotRun {
        label: label.to_string(),
        snapshot_interval: interval.unwrap_or("no [persist]").to_string(),
        sessions_open: metric(&before, "sessionizer_sessions_active"),
        sent: result.totals.sent,
        received: result.totals.received,
        latency: result.latency.clone(),
        snapshots: snaps(&after) - snaps(&before),
        snapshot_duty: (snap_us(&after) - snap_us(&before))
            / (result.sending_s.max(1e-9) * 1e6 * shards as f64),
        capture_ms: during.iter().map(|d| d.0).collect(),
        longest_step_ms: during.iter().map(|d| d.1).collect(),
        total_ms: during.iter().map(|d| d.2).collect(),
        appliance_p99_ms: 1e3
            * metric(
                &after,
                r#"sessionizer_event_latency_seconds{quantile="0.99"}"#,
            ),
        executor_kicks: kicks(&after) - kicks(&before),
        steal_ms_per_s: steal / result.sending_s.max(1e-9),
    })
}

/// Rounds of (snapshots back to back, snapshots far apart, no persistence) under the same
/// open-loop load.
pub fn snapshot_latency(
    setup: &Setup,
    o: &SnapshotOptions,
    argv: &[String],
) -> Result<String, String> {
    let mut with = Vec::new();
    let mut far = Vec::new();
    let mut off = Vec::new();
    let p99 = |r: &SnapshotRun| r.latency.as_ref().map_or(f64::NAN, |l| l.p99_ms);
    for p in 1..=o.pairs {
        if crate::interrupted() {
            break;
        }
        eprintln!("snapshot-latency: round {p}/{}", o.pairs);
        with.push(snapshot_run(
            setup,
            o,
            &format!("snapshots-{p}"),
            Some(&o.snapshot_interval),
        )?);
        std::thread::sleep(BETWEEN_RUNS);
        far.push(snapshot_run(
            setup,
            o,
            &format!("far-apart-{p}"),
            Some(&o.far_interval),
        )?);
        std::thread::sleep(BETWEEN_RUNS);
        off.push(snapshot_run(setup, o, &format!("no-persist-{p}"), None)?);
        std::thread::sleep(BETWEEN_RUNS);
        let (a, b, c) = (
            with.last().expect("pushed"),
            far.last().expect("pushed"),
            off.last().expect("pushed"),
        );
        eprintln!(
            "snapshot-latency: round {p}: p99 {:.3} ms with {} snapshots (duty {:.0}%), {:.3} ms far apart, {:.3} ms without persistence",
            p99(a),
            a.snapshots,
            a.snapshot_duty * 100.0,
            p99(b),
            p99(c)
        );
    }
    let lat = |r: &SnapshotRun, f: &dyn Fn(&Latency) -> f64| r.latency.as_ref().map_or(f64::NAN, f);
    let each = |runs: &[SnapshotRun], f: &dyn Fn(&SnapshotRun) -> f64| {
        runs.iter().map(f).collect::<Vec<f64>>()
    };
    let pair = |f: &dyn Fn(&SnapshotRun, &SnapshotRun) -> f64| {
        with.iter()
            .zip(&far)
            .map(|(a, b)| f(a, b))
            .collect::<Vec<f64>>()
    };
    let mut rows = vec![
        Row::new(
            "open sessions (all shards)",
            "count",
            each(&with, &|a| a.sessions_open),
        ),
        Row::new(
            "snapshots during the run",
            "count",
            each(&with, &|a| a.snapshots),
        ),
        Row::new(
            "share of shard time in snapshots",
            "pct",
            each(&with, &|a| a.snapshot_duty),
        ),
        Row::new(
            "snapshot duration (median per run)",
            "ms",
            each(&with, &|a| median(&a.total_ms)),
        ),
        Row::new(
            "capture, the engine held in all (median per run)",
            "ms",
            each(&with, &|a| median(&a.capture_ms)),
        ),
        Row::new(
            "longest step on the executor (max per run)",
            "ms",
            each(&with, &|a| {
                a.longest_step_ms.iter().copied().fold(f64::NAN, f64::max)
            }),
        ),
    ];
    // A figure of each of the three runs.
    let mut three = |name: &str, unit: &'static str, f: &dyn Fn(&SnapshotRun) -> f64| {
        for (runs, which) in [
            (&with, "snapshots back to back"),
            (&far, "snapshots far apart"),
            (&off, "no persistence"),
        ] {
            rows.push(Row::new(format!("{name}, {which}"), unit, each(runs, f)));
        }
    };
    for (name, f) in [
        ("p50", &(|l: &Latency| l.p50_ms) as &dyn Fn(&Latency) -> f64),
        ("p99", &|l: &Latency| l.p99_ms),
        ("p99.9", &|l: &Latency| l.p999_ms),
        ("max", &|l: &Latency| l.max_ms),
    ] {
        three(name, "ms", &|a| lat(a, f));
    }
    three("the appliance's own p99, last ~10 s", "ms", &|r| {
        r.appliance_p99_ms
    });
    three("executors found parked with work", "count", &|r| {
        r.executor_kicks
    });
    three("host steal, all CPUs, per second", "ms", &|r| {
        r.steal_ms_per_s
    });
    rows.push(Row::new(
        "p99 difference (back to back − far apart)",
        "ms",
        pair(&|a, b| lat(a, &|l| l.p99_ms) - lat(b, &|l| l.p99_ms)),
    ));
    let md = table(&rows);
    let json = serde_json::json!({
        "command": "snapshot-latency",
        "started_utc": report::utc_now(),
        "options": o,
        "placement": { "appliance_cpus": setup.appliance_cpus, "client_cpus": setup.client_cpus },
        "with_snapshots": with,
        "snapshots_far_apart": far,
        "no_persistence": off,
        "rows": rows,
    });
    write_results(setup, argv, "snapshot-latency.json", &json, &md, &[])?;
    Ok(md)
}

// ---------------------------------------------------------------------------------------------
// recovery
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, serde::Serialize)]
pub struct RecoveryOptions {
    pub rounds: u32,
    pub keys: u64,
}

/// One shard's `shard N: recovered in …` line.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ShardRecovery {
    pub shard: u32,
    /// The shard's own measure of its recovery (load the snapshot, restore, replay the log).
    pub recovered_s: f64,
    pub sessions: u64,
    pub replayed: u64,
    /// Log records the snapshot covered that the shard read through (absent from older builds).
    pub read_past: Option<u64>,
    /// The shard's breakdown (absent from older builds): open and validate the snapshot,
    /// restore it, replay the log.
    pub open_s: Option<f64>,
    pub restore_s: Option<f64>,
    pub replay_s: Option<f64>,
}

/// One round: preload and stop, start on an empty directory, start on the preloaded one.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecoveryRound {
    pub label: String,
    pub keys: u64,
    /// `sessionizer_sessions_active` once the preload was processed, before the stop.
    pub sessions_before_stop: u64,
    /// From the load run's `final snapshot written` lines, by shard.
    pub final_snapshot_sessions: Vec<u64>,
    /// Every file in the persist directory after the stop, and the snapshot files among them.
    pub state_bytes: u64,
    pub snapshot_bytes: u64,
    /// SIGTERM to exit of the load run: the drain and the final snapshot of every shard.
    pub stop_s: f64,
    /// Spawn to the READY line: on an empty persist directory, then on the preloaded one.
    pub ready_empty_s: f64,
    pub ready_recover_s: f64,
    pub empty_shards: Vec<ShardRecovery>,
    pub recover_shards: Vec<ShardRecovery>,
}

impl RecoveryRound {
    fn sessions_recovered(&self) -> u64 {
        self.recover_shards.iter().map(|s| s.sessions).sum()
    }

    fn replayed(&self) -> u64 {
        self.recover_shards.iter().map(|s| s.replayed).sum()
    }

    fn slowest(shards: &[ShardRecovery]) -> f64 {
        shards
            .iter()
            .map(|s| s.recovered_s)
            .fold(f64::NAN, f64::max)
    }
}

/// A Rust `Debug`-formatted `Duration` (`1.234567891s`, `812.3456ms`, `950µs`, `0ns`), in
/// seconds.
fn parse_debug_duration(text: &str) -> Option<f64> {
    let text = text.trim();
    let (number, scale) = [
        ("ms", 1e-3),
        ("µs", 1e-6),
        ("us", 1e-6),
        ("ns", 1e-9),
        ("s", 1.0),
    ]
    .into_iter()
    .find_map(|(unit, scale)| text.strip_suffix(unit).map(|n| (n, scale)))?;
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some(value * scale)
}

/// The appliance's `shard {id}: recovered in {:?}: {} sessions from {}, {} logged events
/// replayed ({} duplicates skipped, {} covered records read past)` lines, by shard (older
/// builds end at `skipped)`).
fn recovery_lines(lines: &[String]) -> Vec<ShardRecovery> {
    const KEY: &str = ": recovered in ";
    let mut found: Vec<ShardRecovery> = lines
        .iter()
        .filter_map(|l| {
            let at = l.find(KEY)?;
            let shard = l[..at].rsplit("shard ").next()?.trim().parse().ok()?;
            let rest = &l[at + KEY.len()..];
            let (duration, rest) = rest.split_once(": ")?;
            let (sessions, rest) = rest.split_once(" sessions from ")?;
            let replayed = rest
                .rsplit_once(" logged events replayed")?
                .0
                .rsplit(' ')
                .next()?
                .parse()
                .ok()?;
            let read_past = rest
                .rsplit_once(" covered records read past")
                .and_then(|(head, _)| head.rsplit(' ').next()?.parse().ok());
            let part = |name: &str| {
                let (_, after) = rest
                    .split_once(&format!("; {name} "))
                    .or_else(|| rest.split_once(&format!(", {name} ")))?;
                parse_debug_duration(after.split(',').next()?)
            };
            Some(ShardRecovery {
                shard,
                recovered_s: parse_debug_duration(duration)?,
                sessions: sessions.trim().parse().ok()?,
                replayed,
                read_past,
                open_s: part("open"),
                restore_s: part("restore"),
                replay_s: part("replay"),
            })
        })
        .collect();
    found.sort_by_key(|s| s.shard);
    found
}

/// Sessions in each shard's `final snapshot written: generation G: S sessions, …` line.
fn final_snapshot_sessions(lines: &[String]) -> Vec<u64> {
    let mut found: Vec<(u32, u64)> = lines
        .iter()
        .filter_map(|l| {
            let (head, rest) = l.split_once(": final snapshot written: generation ")?;
            let shard = head.rsplit("shard ").next()?.trim().parse().ok()?;
            let sessions = rest.split_once(": ")?.1.split(' ').next()?.parse().ok()?;
            Some((shard, sessions))
        })
        .collect();
    found.sort_unstable();
    found.into_iter().map(|(_, s)| s).collect()
}

/// (every file, the `snap-*` files) under `dir`, in bytes.
fn dir_bytes(dir: &Path) -> Result<(u64, u64), String> {
    let mut total = (0, 0);
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let meta = entry
            .metadata()
            .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        if meta.is_dir() {
            let (all, snap) = dir_bytes(&entry.path())?;
            total.0 += all;
            total.1 += snap;
        } else {
            total.0 += meta.len();
            if entry.file_name().to_string_lossy().starts_with("snap-") {
                total.1 += meta.len();
            }
        }
    }
    Ok(total)
}

/// A persist directory, removed when dropped (they reach gigabytes) unless kept as evidence.
struct StateDir {
    path: PathBuf,
    keep: bool,
}

impl StateDir {
    fn fresh(path: PathBuf) -> StateDir {
        let _ = std::fs::remove_dir_all(&path);
        StateDir { path, keep: false }
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Start an appliance and time it from just before the spawn to its READY line.
fn timed_start(
    setup: &Setup,
    label: &str,
    config: &ConfigSpec,
) -> Result<(Appliance, f64), String> {
    let t0 = Instant::now();
    let app = Appliance::start(&setup.binary, &setup.dir, label, &config.toml())?;
    Ok((app, t0.elapsed().as_secs_f64()))
}

/// The `recovered in` line of every shard. Each shard logs it before READY, and the lines are
/// kept in order, so once `Appliance::start` has seen READY they are all in.
fn shard_recoveries(
    app: &Appliance,
    label: &str,
    shards: usize,
) -> Result<Vec<ShardRecovery>, String> {
    let found = recovery_lines(&app.lines());
    if found.len() < shards {
        return Err(format!(
            "{label}: {} of {shards} shards logged `recovered in`; see {}",
            found.len(),
            app.log.display()
        ));
    }
    Ok(found)
}

fn recovery_round(
    setup: &Setup,
    o: &RecoveryOptions,
    label: &str,
) -> Result<RecoveryRound, String> {
    let shards = setup.appliance_cpus.len();
    let (max_sessions, arena) = open_sessions_sizing(setup, o.keys);
    let mut state = StateDir::fresh(setup.dir.join(format!("{label}-state")));
    let empty = StateDir::fresh(setup.dir.join(format!("{label}-empty-state")));
    let config = |dir: &Path| ConfigSpec {
        cores: setup.cores_toml(),
        arena_bytes: arena,
        max_sessions,
        metrics_publish: Some("1s".to_string()),
        // No periodic snapshot during the preload: the stop writes the one that is recovered.
        persist: Some((dir.to_path_buf(), "1h".to_string())),
        snapshot_write_rate: None,
        idle_timeout: "30m".to_string(),
        file_output: None,
        markers_only: false,
    };
    let load_cfg = config(&state.path);

    // 1. Preload every key once over TCP (no logouts): `keys` open sessions. Then stop.
    let app = Appliance::start(
        &setup.binary,
        &setup.dir,
        &format!("{label}-load"),
        &load_cfg.toml(),
    )?;
    let url = app.metrics_url().ok_or("no metrics endpoint")?;
    let deadline = Instant::now() + PRELOAD_WAIT;
    preload_keys(setup, &app, &url, label, o.keys, deadline)?;
    let waited = |what: &str| -> Result<(), String> {
        if Instant::now() >= deadline {
            return Err(format!("{label}: {what} within {PRELOAD_WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    };
    // An event is counted in where it is read and opens its session on the shard that owns the
    // key, after a hand-off: wait until the gauge has reached the keys or stopped moving (the
    // same value in two publications in a row).
    let mut last = f64::NAN;
    let sessions_before_stop = loop {
        let active = metric(&scrape::http_get(&url)?, "sessionizer_sessions_active");
        if active >= o.keys as f64 || active == last {
            break active as u64;
        }
        last = active;
        waited("the open sessions did not settle")?;
        std::thread::sleep(Duration::from_millis(900));
    };
    let log = app.log.clone();
    let stopped = app.stop()?;
    let final_sessions = final_snapshot_sessions(
        &std::fs::read_to_string(&log)
            .map_err(|e| format!("{}: {e}", log.display()))?
            .lines()
            .map(String::from)
            .collect::<Vec<_>>(),
    );
    let (state_bytes, snapshot_bytes) = dir_bytes(&state.path)?;
    std::thread::sleep(BETWEEN_RUNS);

    // 2. The start-up cost without anything to recover.
    let (app, ready_empty_s) = timed_start(setup, &format!("{label}-empty"), &config(&empty.path))?;
    let empty_shards = shard_recoveries(&app, &format!("{label}-empty"), shards)?;
    app.stop()?;
    drop(empty);
    std::thread::sleep(BETWEEN_RUNS);

    // 3. The restart on the preloaded directory.
    let (app, ready_recover_s) = timed_start(setup, &format!("{label}-recover"), &load_cfg)?;
    let recover_shards = shard_recoveries(&app, &format!("{label}-recover"), shards);
    app.stop()?;
    let round = RecoveryRound {
        label: label.to_string(),
        keys: o.keys,
        sessions_before_stop,
        final_snapshot_sessions: final_sessions,
        state_bytes,
        snapshot_bytes,
        stop_s: stopped.stop_s,
        ready_empty_s,
        ready_recover_s,
        empty_shards,
        recover_shards: recover_shards?,
    };
    let sessions_recovered = round.sessions_recovered();
    if sessions_recovered != sessions_before_stop {
        state.keep = true;
        return Err(format!(
            "{label}: RECOVERY LOST OR INVENTED SESSIONS: {sessions_before_stop} open before the stop \
             (sessions_active), {sessions_recovered} recovered ({:?} by shard; the final snapshots \
             held {:?}); the state is kept in {} and the log in {}",
            round.recover_shards.iter().map(|s| s.sessions).collect::<Vec<_>>(),
            round.final_snapshot_sessions,
            state.path.display(),
            setup.dir.join(format!("{label}-recover.log")).display()
        ));
    }
    Ok(round)
}

/// Rounds of (preload `keys` sessions and stop, start on an empty directory, restart on the
/// preloaded one): the time a restart takes to recover them.
pub fn recovery(setup: &Setup, o: &RecoveryOptions, argv: &[String]) -> Result<String, String> {
    let mut rounds: Vec<RecoveryRound> = Vec::new();
    for r in 1..=o.rounds {
        if crate::interrupted() {
            break;
        }
        eprintln!("recovery: round {r}/{}", o.rounds);
        let round = recovery_round(setup, o, &format!("recovery-{r}"))?;
        eprintln!(
            "recovery: round {r}: {} sessions, {:.1} MB of snapshots; stop {:.3} s; READY {:.3} s empty, {:.3} s recovering; slowest shard recovered in {:.3} s",
            round.sessions_recovered(),
            round.snapshot_bytes as f64 / 1e6,
            round.stop_s,
            round.ready_empty_s,
            round.ready_recover_s,
            RecoveryRound::slowest(&round.recover_shards)
        );
        rounds.push(round);
        std::thread::sleep(BETWEEN_RUNS);
    }
    let each = |f: &dyn Fn(&RecoveryRound) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    let mut rows = vec![
        Row::new("keys preloaded", "count", each(&|r| r.keys as f64)),
        Row::new(
            "open sessions before the stop",
            "count",
            each(&|r| r.sessions_before_stop as f64),
        ),
        Row::new(
            "sessions recovered (all shards)",
            "count",
            each(&|r| r.sessions_recovered() as f64),
        ),
        Row::new(
            "logged events replayed at the restart",
            "count",
            each(&|r| r.replayed() as f64),
        ),
        Row::new(
            "covered log records read past at the restart",
            "count",
            each(&|r| {
                r.recover_shards
                    .iter()
                    .map(|s| s.read_past.map_or(f64::NAN, |n| n as f64))
                    .sum()
            }),
        ),
        Row::new(
            "snapshot files on disk after the stop",
            "bytes",
            each(&|r| r.snapshot_bytes as f64),
        ),
        Row::new(
            "persist directory after the stop (snapshots + log)",
            "bytes",
            each(&|r| r.state_bytes as f64),
        ),
        Row::new(
            "stop: SIGTERM to exit, incl. the final snapshot",
            "s",
            each(&|r| r.stop_s),
        ),
        Row::new(
            "READY, empty persist directory",
            "s",
            each(&|r| r.ready_empty_s),
        ),
        Row::new("READY, recovering", "s", each(&|r| r.ready_recover_s)),
        Row::new(
            "READY difference (recovering − empty)",
            "s",
            each(&|r| r.ready_recover_s - r.ready_empty_s),
        ),
        Row::new(
            "slowest shard's \"recovered in\", empty directory",
            "s",
            each(&|r| RecoveryRound::slowest(&r.empty_shards)),
        ),
        Row::new(
            "slowest shard's \"recovered in\", recovering",
            "s",
            each(&|r| RecoveryRound::slowest(&r.recover_shards)),
        ),
    ];
    let shard_ids: Vec<u32> = rounds
        .first()
        .map(|r| r.recover_shards.iter().map(|s| s.shard).collect())
        .unwrap_or_default();
    for (name, f) in [
        (
            "open",
            (|s: &ShardRecovery| s.open_s) as fn(&ShardRecovery) -> Option<f64>,
        ),
        ("restore", |s| s.restore_s),
        ("replay", |s| s.replay_s),
    ] {
        rows.push(Row::new(
            format!("slowest shard's {name} (its own breakdown)"),
            "s",
            each(&|r| {
                r.recover_shards
                    .iter()
                    .map(|s| f(s).unwrap_or(f64::NAN))
                    .fold(f64::NAN, f64::max)
            }),
        ));
    }
    for id in shard_ids {
        let of = |r: &RecoveryRound| {
            r.recover_shards
                .iter()
                .find(|s| s.shard == id)
                .map_or(f64::NAN, |s| s.recovered_s)
        };
        let sessions = |r: &RecoveryRound| {
            r.recover_shards
                .iter()
                .find(|s| s.shard == id)
                .map_or(f64::NAN, |s| s.sessions as f64)
        };
        rows.push(Row::new(
            format!("shard {id}: \"recovered in\""),
            "s",
            each(&of),
        ));
        rows.push(Row::new(
            format!("shard {id}: sessions recovered"),
            "count",
            each(&sessions),
        ));
    }
    let md = table(&rows);
    let json = serde_json::json!({
        "command": "recovery",
        "started_utc": report::utc_now(),
        "options": o,
        "placement": { "appliance_cpus": setup.appliance_cpus, "client_cpus": setup.client_cpus },
        "max_sessions_per_shard": open_sessions_sizing(setup, o.keys).0,
        "rounds": rounds,
        "rows": rows,
    });
    write_results(setup, argv, "recovery.json", &json, &md, &[])?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_tables() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[f64::NAN]).is_nan());
        let md = table(&[Row::new("x", "ratio", vec![0.9, 1.1, 1.0])]);
        assert!(
            md.contains("| x | **1.000** | 0.900 – 1.100 | 0.900, 1.100, 1.000 |"),
            "{md}"
        );
    }

    #[test]
    fn snapshot_lines_are_read_back() {
        let old = "[2026-11-25T10:00:00.000Z INFO  sessionizer::runtime] shard 1: snapshot generation 7: 500000 sessions, 61234567 bytes in 412.5 ms (capture 44.1 ms, write 300.2 ms with its longest step 3.4 ms, drain 1.0 ms, publish 52.0 ms)";
        let new = "[2026-11-25T10:00:00.000Z INFO  sessionizer::runtime] shard 0: snapshot written: generation 8: 500000 sessions, 61234567 bytes in 400.0 ms (capture 40.5 ms, write 300.2 ms, drain 1.0 ms, log 9.5 ms, publish 52.0 ms)";
        let sliced = "[2026-12-05T20:00:00.000Z INFO  sessionizer::runtime] shard 0: snapshot written: generation 9: 500000 sessions, 61234567 bytes in 500.0 ms (capture 60.2 ms held in 300 slices over 90.4 ms, longest slice 0.412 ms, cut 0.100 ms, write 300.2 ms, drain 1.0 ms, log 9.5 ms, publish 52.0 ms)";
        let fin = new.replace("shard 0: snapshot", "shard 0: final snapshot");
        let lines = [old, "other", new, &fin, sliced].map(String::from);
        assert_eq!(
            snapshot_lines(&lines),
            vec![
                (44.1, 52.0, 412.5),
                (40.5, 40.5, 400.0),
                (60.2, 0.412, 500.0)
            ]
        );
    }

    #[test]
    fn debug_durations_are_read_back() {
        let close = |text: &str, want: f64| {
            let got = parse_debug_duration(text).unwrap_or_else(|| panic!("{text:?}"));
            assert!(
                (got - want).abs() <= want * 1e-12,
                "{text:?}: {got} != {want}"
            );
        };
        close("1.234567891s", 1.234567891);
        close("2s", 2.0);
        close("812.3456ms", 0.8123456);
        close("950µs", 950e-6);
        close("12.5us", 12.5e-6);
        close("100ns", 100e-9);
        assert_eq!(parse_debug_duration("0ns"), Some(0.0));
        // Formatting a Duration with `{:?}` reads back.
        for d in [
            Duration::new(3, 141_592_653),
            Duration::from_micros(81_234),
            Duration::from_nanos(950_123),
            Duration::from_nanos(7),
        ] {
            close(&format!("{d:?}"), d.as_secs_f64());
        }
        for bad in ["", "s", "ms", "1.5", "1.5 min", "-1s", "fast"] {
            assert_eq!(parse_debug_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn recovery_lines_are_read_back() {
        let lines = [
            "[2026-12-06T10:00:00.000Z INFO  sessionizer::runtime] shard 1: recovered in 1.234567891s: 5000000 sessions from /tmp/s/snap-1-3.szs (generation 3), 0 logged events replayed (0 duplicates skipped, 7 covered records read past); open 101.5ms, restore 1.0235s, replay 3.2µs",
            "[2026-12-06T10:00:00.000Z INFO  sessionizer::runtime] shard 0: recovered in 812.3456ms: 4999999 sessions from /tmp/s/snap-0-3.szs (generation 3), 12 logged events replayed (2 duplicates skipped)",
            "[2026-12-06T10:00:00.000Z INFO  sessionizer::runtime] shard 2: recovered in 950µs: 0 sessions from no snapshot, 0 logged events replayed (0 duplicates skipped)",
            "READY {}",
        ]
        .map(String::from);
        let got = recovery_lines(&lines);
        assert_eq!(got.len(), 3);
        assert_eq!(
            got.iter()
                .map(|s| (s.shard, s.sessions, s.replayed))
                .collect::<Vec<_>>(),
            vec![(0, 4_999_999, 12), (1, 5_000_000, 0), (2, 0, 0)]
        );
        assert_eq!(
            got.iter().map(|s| s.read_past).collect::<Vec<_>>(),
            vec![None, Some(7), None]
        );
        assert_eq!(got[1].open_s, Some(0.1015));
        assert_eq!(got[1].restore_s, Some(1.0235));
        assert!((got[1].replay_s.unwrap() - 3.2e-6).abs() < 1e-15);
        assert_eq!(got[0].open_s, None);
        assert!((got[0].recovered_s - 0.8123456).abs() < 1e-12);
        assert!((got[1].recovered_s - 1.234567891).abs() < 1e-12);
        assert!((got[2].recovered_s - 950e-6).abs() < 1e-15);
        let fin = [
            "[..] shard 1: final snapshot written: generation 4: 5000000 sessions, 61234567 bytes in 400.0 ms (capture 40.5 ms)",
            "[..] shard 0: final snapshot written: generation 4: 4999999 sessions, 61234567 bytes in 400.0 ms (capture 40.5 ms)",
            "[..] shard 0: snapshot written: generation 3: 7 sessions, 1 bytes in 1.0 ms (capture 0.1 ms)",
        ]
        .map(String::from);
        assert_eq!(final_snapshot_sessions(&fin), vec![4_999_999, 5_000_000]);
    }
}
