//! The command line: clap definitions of the subcommands, their validation into run specs, and
//! the commands' bodies (run, write results, pick the exit status).
//!
//! Every limit is checked here, before any thread starts, and an error names the flag, the value,
//! the limit and the likely fix. Options shared by several commands live in flattened groups so
//! that `run`, `nexmark-q11` and `sweep` spell them the same way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::baseline::{self, BaselineCommand};
use crate::machine::Machine;
use crate::nexmark::{self, BidParams};
use crate::report::{self, RunResult};
use crate::run::{self, RunSpec, Workload};
use crate::send::{SendPlan, Transport};
use crate::sweep::{self, SweepSpec};
use crate::traffic::{ClickParams, SessionModel, KEYS_MAX, PAYLOAD_BYTES_MAX};

/// Exit status when `--fail-on-loss` finds events neither received nor counted as dropped.
pub const EXIT_LOSS: u8 = 3;
const THREADS_MAX: u32 = 64;
const CONNECTIONS_MAX: u32 = 1024;
const EVENTS_PER_DATAGRAM_MAX: u32 = 1024;
const DURATION_DEFAULT: Duration = Duration::from_secs(10);

/// A command failed: `Usage` exits 2, `Run` exits 1.
#[derive(Debug)]
pub enum Failure {
    Usage(String),
    Run(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::Run(message)
    }
}

fn usage<T>(message: String) -> Result<T, Failure> {
    Err(Failure::Usage(message))
}

#[derive(Parser, Debug)]
#[command(
    name = "sessionizer-bench",
    version,
    about = "Load generator, latency receiver and baseline for the sessionizer appliance",
    long_about = "Load generator, latency receiver and baseline for the sessionizer appliance.\n\nSee bench/README.md for the wire protocol, the traffic model and the output files."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Offer clickstream traffic to a running appliance and measure latency and loss.
    Run(RunArgs),
    /// Step the offered rate and find the knee and the sustainable rate.
    Sweep(SweepArgs),
    /// Receive and count UDP or TCP traffic without parsing: the raw ceiling of the sockets.
    BaselineRecv(BaselineRecvArgs),
    /// Nexmark q11-style bids keyed by bidder (10 s session gap profile).
    NexmarkQ11(NexmarkArgs),
    /// Start the appliance and reproduce the throughput, baseline and sweep figures of RESULTS.
    Reproduce(ReproduceArgs),
    /// Start the appliance and compare flat-out throughput with metrics on and off, in pairs.
    MetricsCost(MetricsCostArgs),
    /// Start the appliance with many open sessions and compare latency with snapshots written
    /// back to back and far apart, in pairs.
    SnapshotLatency(SnapshotLatencyArgs),
    /// Start the appliance, open many sessions, stop it, and time the restart that recovers
    /// them against a start on an empty persist directory.
    ///
    /// Each round: start the appliance with persistence on (`snapshot_interval` 1 h, so none
    /// during the preload) and a 30 min idle timeout, send every key once over TCP flat out (no
    /// logouts: `--keys` open sessions), stop it with SIGTERM (the graceful shutdown writes a
    /// snapshot per shard), start it on an empty persist directory (the start-up cost with
    /// nothing to recover), then restart it on the preloaded directory. Fails if the sessions
    /// recovered differ from the sessions open before the stop.
    ///
    /// The figures to compare with the durability target: the slowest shard's `recovered in`
    /// (the appliance's own measure of loading the snapshot, restoring the sessions and replaying
    /// the log; shards recover in parallel) and the READY difference (spawn to READY recovering,
    /// minus spawn to READY on an empty directory: the restart's extra cost as a client sees
    /// it).
    Recovery(RecoveryArgs),
}

fn parse_scaled(text: &str) -> Result<f64, String> {
    let text = text.trim().replace('_', "");
    let (number, scale) = match text.chars().last() {
        Some('k' | 'K') => (&text[..text.len() - 1], 1e3),
        Some('m' | 'M') => (&text[..text.len() - 1], 1e6),
        Some('g' | 'G') => (&text[..text.len() - 1], 1e9),
        _ => (&text[..], 1.0),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a number (examples: 50000, 50k, 1.5M)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?} must be a finite number >= 0"));
    }
    Ok(value * scale)
}

/// A rate in events/s: `0`, `50000`, `50k`, `1.5M`.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    parse_scaled(text)
}

/// A count: `1000000`, `1M`, `250k`.
pub fn parse_count(text: &str) -> Result<u64, String> {
    let value = parse_scaled(text)?;
    if value.fract() != 0.0 || value > 1e18 {
        return Err(format!("{text:?} is not a whole count"));
    }
    Ok(value as u64)
}

/// A duration: `10s`, `500ms`, `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (examples: 10s, 500ms, 2m)"))
}

#[derive(Args, Debug, Clone, serde::Serialize)]
#[command(next_help_heading = "Pacing")]
pub struct PaceArgs {
    /// Offered events per second over all threads, open loop (e.g. 200k); 0 sends flat out.
    #[arg(long, default_value = "100k", value_parser = parse_rate)]
    pub rate: f64,
    /// How long to send (default 10s when --events is not given).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// How many events to send (the run ends at whichever of --duration and --events comes first).
    #[arg(long, value_parser = parse_count)]
    pub events: Option<u64>,
    /// Seed of the traffic model: the same seed, rate and threads give the same events.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args, Debug, Clone, serde::Serialize)]
#[command(next_help_heading = "Transport")]
pub struct TransportArgs {
    #[arg(long, value_enum, default_value_t = Transport::Udp)]
    pub transport: Transport,
    /// Ingest address [default: 127.0.0.1:7070 for udp, 127.0.0.1:7071 for tcp].
    #[arg(long)]
    pub target: Option<SocketAddr>,
    /// Most events in one UDP datagram.
    #[arg(long, default_value_t = 10)]
    pub events_per_datagram: u32,
    /// Largest UDP payload (1472 fits an Ethernet frame; 65507 at most).
    #[arg(long, default_value_t = 1472)]
    pub datagram_bytes_max: usize,
    /// Prefix datagrams with the steering header (SZH1 + FNV-1a of the key); one key per datagram.
    #[arg(long)]
    pub steer: bool,
    /// TCP connections in total [default: one per thread].
    #[arg(long)]
    pub connections: Option<u32>,
    /// Sender threads; each owns every T-th key.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// Longest time an event waits in a partial datagram or TCP buffer, µs.
    #[arg(long, default_value_t = 1000)]
    pub flush_us: u64,
    /// Shortest pacing sleep when caught up, µs (events due meanwhile leave together).
    #[arg(long, default_value_t = 50)]
    pub tick_us: u64,
}

#[derive(Args, Debug, Clone, serde::Serialize)]
#[command(next_help_heading = "Latency and drops")]
pub struct ReceiveArgs {
    /// The appliance's TCP output to read enriched events and markers from.
    #[arg(long, default_value = "127.0.0.1:7072")]
    pub output: SocketAddr,
    /// Do not connect to the output (no latency, no loss figures).
    #[arg(long)]
    pub no_output: bool,
    /// After sending, wait at most this long for the output to deliver everything or go quiet.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub drain: Duration,
    /// How long to keep retrying the output connection.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub output_wait: Duration,
    /// Pause between connecting to the output and the first event (the appliance registers the client).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub output_settle: Duration,
    /// Prometheus endpoint scraped before and after for drop counters; `none` to skip.
    #[arg(long, default_value = "http://127.0.0.1:9999/metrics")]
    pub metrics: String,
}

#[derive(Args, Debug, Clone, serde::Serialize)]
#[command(next_help_heading = "Clickstream traffic")]
pub struct ClickArgs {
    /// Distinct users (keys "u0".."u<N-1>").
    #[arg(long, default_value = "100k", value_parser = parse_count)]
    pub keys: u64,
    /// Tenants ("t0".."t<N-1>"), a fixed property of each user.
    #[arg(long, default_value_t = 8)]
    pub tenants: u32,
    /// Distinct pages ("/p/0".."/p/<N-1>").
    #[arg(long, default_value_t = 1000)]
    pub pages: u32,
    /// Mean in-session gap between a user's events, ms (exponential, capped at 10x).
    #[arg(long, default_value_t = 50.0)]
    pub gap_ms: f64,
    /// Least pause between a user's sessions, ms: set it above the profile's idle timeout.
    #[arg(long, default_value_t = 2000.0)]
    pub pause_ms: f64,
    /// Mean events per session (geometric).
    #[arg(long, default_value_t = 20.0)]
    pub burst_mean: f64,
    /// Event size in bytes, reached with a "pad" member.
    #[arg(long, default_value_t = 140)]
    pub payload_bytes: usize,
    /// Percent of sessions that end with a "logout" event.
    #[arg(long, default_value_t = 30)]
    pub logout_pct: u32,
    /// Send the lines of this JSON-lines file instead of generated events (no latency).
    #[arg(long, value_name = "FILE")]
    pub replay: Option<PathBuf>,
    /// The key member of replayed lines (for --steer and TCP connection choice).
    #[arg(long, default_value = "user")]
    pub key_field: String,
}

#[derive(Args, Debug, Clone, serde::Serialize)]
#[command(next_help_heading = "Nexmark bids")]
pub struct BidArgs {
    /// Distinct bidders (the session key).
    #[arg(long, default_value_t = nexmark::BIDDERS_DEFAULT, value_parser = parse_count)]
    pub bidders: u64,
    /// Mean gap between a bidder's bids in a session, ms (keep 10x of it under the 10 s gap).
    #[arg(long, default_value_t = nexmark::GAP_MEAN_MS_DEFAULT as f64)]
    pub gap_ms: f64,
    /// Least pause between a bidder's sessions, ms (above the 10 s session gap).
    #[arg(long, default_value_t = nexmark::PAUSE_MS_DEFAULT as f64)]
    pub pause_ms: f64,
    /// Mean bids per session.
    #[arg(long, default_value_t = nexmark::BURST_MEAN_DEFAULT)]
    pub burst_mean: f64,
    /// Bid size in bytes, reached with an "extra" member.
    #[arg(long, default_value_t = 140)]
    pub payload_bytes: usize,
    /// New auctions per second of event time.
    #[arg(long, default_value_t = 100)]
    pub auctions_per_s: u64,
}

#[derive(Args, Debug, Clone, serde::Serialize)]
#[command(next_help_heading = "Baseline")]
pub struct BaselineArgs {
    /// First send the same traffic to an in-process baseline-recv, then the real run; report the ratio.
    #[arg(long)]
    pub baseline: bool,
    /// Where the in-process baseline listens.
    #[arg(long, default_value = "127.0.0.1:7170")]
    pub baseline_listen: SocketAddr,
    /// Receiving threads of the in-process baseline [default: cores].
    #[arg(long)]
    pub baseline_threads: Option<u32>,
}

#[derive(Args, Debug, Clone, serde::Serialize)]
#[command(next_help_heading = "Results")]
pub struct ReportArgs {
    /// Run directory [default: bench/runs/<date>-<host>-<HHMMSS>].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Print the summary only; write no run directory.
    #[arg(long)]
    pub no_save: bool,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Exit with status 3 unless sent == received + drops counted by the metrics.
    #[arg(long)]
    pub fail_on_loss: bool,
}

#[derive(Args, Debug, serde::Serialize)]
pub struct RunArgs {
    #[command(flatten)]
    pub pace: PaceArgs,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[command(flatten)]
    pub receive: ReceiveArgs,
    #[command(flatten)]
    pub click: ClickArgs,
    #[command(flatten)]
    pub baseline: BaselineArgs,
    #[command(flatten)]
    pub report: ReportArgs,
    /// Write the generated events to PATH as JSON lines instead of sending (needs --events;
    /// event time advances at --rate from a fixed epoch).
    #[arg(long, value_name = "PATH")]
    pub to_file: Option<PathBuf>,
}

#[derive(Args, Debug, serde::Serialize)]
pub struct NexmarkArgs {
    #[command(flatten)]
    pub pace: PaceArgs,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[command(flatten)]
    pub receive: ReceiveArgs,
    #[command(flatten)]
    pub bid: BidArgs,
    #[command(flatten)]
    pub baseline: BaselineArgs,
    #[command(flatten)]
    pub report: ReportArgs,
    /// Write the bids to PATH as JSON lines instead of sending (needs --events).
    #[arg(long, value_name = "PATH")]
    pub to_file: Option<PathBuf>,
}

#[derive(Args, Debug, serde::Serialize)]
pub struct SweepArgs {
    /// First offered rate.
    #[arg(long, default_value = "10k", value_parser = parse_rate)]
    pub from: f64,
    /// Last offered rate.
    #[arg(long, default_value = "1M", value_parser = parse_rate)]
    pub to: f64,
    /// Geometric steps from --from to --to [default: 8].
    #[arg(long)]
    pub steps: Option<u32>,
    /// Multiply the rate by this at each step instead of --steps.
    #[arg(long)]
    pub factor: Option<f64>,
    /// Length of each step.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub step_duration: Duration,
    /// Pause between steps (sessions of the previous step time out).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub settle: Duration,
    /// The latency bound of the knee and of the sustainable rate, ms.
    #[arg(long, default_value_t = 10.0)]
    pub p99_threshold_ms: f64,
    /// Stop after this many steps in a row over the threshold or lossy (0: run every step).
    #[arg(long, default_value_t = 2)]
    pub past_knee: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[command(flatten)]
    pub receive: ReceiveArgs,
    #[command(flatten)]
    pub click: ClickArgs,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Args, Debug, serde::Serialize)]
pub struct BaselineRecvArgs {
    #[arg(long, value_enum, default_value_t = Transport::Udp)]
    pub transport: Transport,
    /// Address to bind [default: 127.0.0.1:7070 for udp, 127.0.0.1:7071 for tcp].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// UDP sockets (SO_REUSEPORT), one thread each [default: cores].
    #[arg(long)]
    pub threads: Option<u32>,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Also serve every event back as an enriched line on this TCP address: a stand-in for the
    /// appliance when testing the harness (`run --output` there).
    #[arg(long, value_name = "ADDR")]
    pub echo: Option<SocketAddr>,
    /// No per-second line.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone, serde::Serialize)]
#[command(next_help_heading = "Appliance")]
pub struct SuiteArgs {
    /// The sessionizer binary [default: the one next to sessionizer-bench].
    #[arg(long, value_name = "PATH")]
    pub sessionizer: Option<PathBuf>,
    /// CPUs of the appliance's shards, e.g. `0` or `0,1`, or `all`; the harness runs on the
    /// others (on all of them when none is left).
    #[arg(long, value_name = "LIST")]
    pub appliance_cores: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run directory [default: bench/runs/<date>-<host>-<HHMMSS>].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

#[derive(Args, Debug, serde::Serialize)]
pub struct ReproduceArgs {
    #[command(flatten)]
    pub suite: SuiteArgs,
    /// Rounds; each runs raw TCP, appliance TCP, raw UDP, appliance UDP and the engine alone.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Length of each flat-out run.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Keys of the flat-out runs and of the replay file.
    #[arg(long, default_value = "1M", value_parser = parse_count)]
    pub keys: u64,
    /// Events of the engine-alone replay file.
    #[arg(long, default_value = "2M", value_parser = parse_count)]
    pub replay_events: u64,
    /// Event-time rate of the replay file (sessions shaped like a live run at this rate).
    #[arg(long, default_value = "1M", value_parser = parse_rate)]
    pub replay_rate: f64,
    #[arg(long, default_value = "100k", value_parser = parse_rate)]
    pub sweep_from: f64,
    #[arg(long, default_value = "1.6M", value_parser = parse_rate)]
    pub sweep_to: f64,
    #[arg(long, default_value_t = 2.0)]
    pub sweep_factor: f64,
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub sweep_step_duration: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub sweep_settle: Duration,
    #[arg(long, default_value = "200k", value_parser = parse_count)]
    pub sweep_keys: u64,
    #[arg(long, default_value_t = 10.0)]
    pub p99_threshold_ms: f64,
    /// A smoke run in seconds: one round of 1 s runs, a small replay file, two sweep steps.
    #[arg(long)]
    pub quick: bool,
}

#[derive(Args, Debug, serde::Serialize)]
pub struct MetricsCostArgs {
    #[command(flatten)]
    pub suite: SuiteArgs,
    /// Pairs of runs (metrics on and off).
    #[arg(long, default_value_t = 10)]
    pub pairs: u32,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,
    #[arg(long, default_value = "1M", value_parser = parse_count)]
    pub keys: u64,
    /// How often the harness scrapes /metrics while metrics are on.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub scrape_every: Duration,
    /// Run the two appliances of a pair one after the other instead of at the same time on
    /// the same cores.
    #[arg(long)]
    pub sequential: bool,
}

#[derive(Args, Debug, serde::Serialize)]
pub struct SnapshotLatencyArgs {
    #[command(flatten)]
    pub suite: SuiteArgs,
    /// Pairs of runs (snapshots back to back, then far apart).
    #[arg(long, default_value_t = 3)]
    pub pairs: u32,
    /// Sessions kept open (every key is sent once before the measured run).
    #[arg(long, default_value = "1M", value_parser = parse_count)]
    pub keys: u64,
    /// Offered rate of the measured run, open loop.
    #[arg(long, default_value = "50k", value_parser = parse_rate)]
    pub rate: f64,
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// `persist.snapshot_interval` of the runs with snapshots (short: back to back).
    #[arg(long, default_value = "100ms")]
    pub snapshot_interval: String,
    /// `persist.snapshot_interval` of the runs without (longer than the run).
    #[arg(long, default_value = "1h")]
    pub far_interval: String,
    /// `persist.snapshot_write_rate` of the runs with persistence: bytes a second (`8MiB`: what
    /// `auto` picks at the default 60 s interval for a shard of ~2.8M sessions), `0` for no
    /// limit, or `auto` (at the back-to-back interval: no limit either)
    #[arg(long, default_value = "8MiB")]
    pub snapshot_write_rate: String,
    #[arg(long, value_enum, default_value_t = Transport::Udp)]
    pub transport: Transport,
}

/// `recovery`: see [`Command::Recovery`].
#[derive(Args, Debug, serde::Serialize)]
pub struct RecoveryArgs {
    #[command(flatten)]
    pub suite: SuiteArgs,
    /// Rounds (preload and stop, empty start, recovering start).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Sessions to recover (every key is sent once before the stop).
    #[arg(long, default_value = "10M", value_parser = parse_count)]
    pub keys: u64,
}

/// `--appliance-cores`: a list, or `all` (every online cpu).
fn appliance_cpus(text: Option<&str>, default: &str) -> Result<Vec<usize>, Failure> {
    let text = text.unwrap_or(default).trim();
    if text == "all" {
        return Ok(crate::appliance::online_cpus());
    }
    let cpus: Result<Vec<usize>, _> = text.split(',').map(|c| c.trim().parse()).collect();
    match cpus {
        Ok(c) if !c.is_empty() && c.len() <= 64 => Ok(c),
        _ => usage(format!(
            "--appliance-cores {text:?}: give cpu ids separated by commas (at most 64), e.g. 0 or 0,1, or all"
        )),
    }
}

fn suite_setup(s: &SuiteArgs, default_cores: &str) -> Result<crate::suite::Setup, Failure> {
    let cpus = appliance_cpus(s.appliance_cores.as_deref(), default_cores)?;
    let dir = s.out_dir.clone().unwrap_or_else(report::default_run_dir);
    Ok(crate::suite::Setup::new(
        s.sessionizer.as_deref(),
        cpus,
        dir,
        s.seed,
    )?)
}

fn check_duration(flag: &str, d: Duration) -> Result<(), Failure> {
    if d.is_zero() || d > Duration::from_secs(3600) {
        return usage(format!("{flag} {d:?} is outside 1ns..=1h"));
    }
    Ok(())
}

fn reproduce_command(a: &ReproduceArgs, argv: &[String]) -> Result<ExitCode, Failure> {
    check_range(
        "--rounds",
        a.rounds,
        1,
        100,
        "5 is plenty on a noisy machine",
    )?;
    check_duration("--duration", a.duration)?;
    check_range("--keys", a.keys, 1, crate::traffic::KEYS_MAX, "e.g. 1M")?;
    check_range(
        "--replay-events",
        a.replay_events,
        1,
        1_000_000_000,
        "e.g. 2M",
    )?;
    if a.replay_rate.is_nan() || a.replay_rate <= 0.0 {
        return usage("--replay-rate must be positive".to_string());
    }
    let mut o = crate::suite::ReproduceOptions {
        rounds: a.rounds,
        duration: a.duration,
        keys: a.keys,
        replay_events: a.replay_events,
        replay_rate: a.replay_rate,
        sweep_rates: sweep::rates(a.sweep_from, a.sweep_to, None, Some(a.sweep_factor))
            .map_err(Failure::Usage)?,
        sweep_step: a.sweep_step_duration,
        sweep_settle: a.sweep_settle,
        sweep_keys: a.sweep_keys,
        p99_threshold_ms: a.p99_threshold_ms,
    };
    if a.quick {
        o.rounds = 1;
        o.duration = Duration::from_secs(1);
        o.keys = 10_000;
        o.replay_events = 20_000;
        o.sweep_rates = vec![5_000.0, 10_000.0];
        o.sweep_step = Duration::from_secs(1);
        o.sweep_settle = Duration::from_millis(500);
        o.sweep_keys = 2_000;
    }
    let setup = suite_setup(&a.suite, "0")?;
    let md = crate::suite::reproduce(&setup, &o, argv)?;
    print!("{md}");
    println!("  results in {}", setup.dir.display());
    Ok(ExitCode::SUCCESS)
}

fn metrics_cost_command(a: &MetricsCostArgs, argv: &[String]) -> Result<ExitCode, Failure> {
    check_range("--pairs", a.pairs, 1, 100, "5 pairs at least for a median")?;
    check_duration("--duration", a.duration)?;
    check_duration("--scrape-every", a.scrape_every)?;
    check_range("--keys", a.keys, 1, crate::traffic::KEYS_MAX, "e.g. 1M")?;
    let o = crate::suite::MetricsCostOptions {
        pairs: a.pairs,
        concurrent: !a.sequential,
        duration: a.duration,
        transport: a.transport,
        keys: a.keys,
        scrape_every: a.scrape_every,
    };
    let setup = suite_setup(&a.suite, "0")?;
    let md = crate::suite::metrics_cost(&setup, &o, argv)?;
    print!("{md}");
    println!("  results in {}", setup.dir.display());
    Ok(ExitCode::SUCCESS)
}

fn snapshot_latency_command(a: &SnapshotLatencyArgs, argv: &[String]) -> Result<ExitCode, Failure> {
    check_range("--pairs", a.pairs, 1, 100, "3 pairs at least for a median")?;
    check_duration("--duration", a.duration)?;
    check_range("--keys", a.keys, 1, crate::traffic::KEYS_MAX, "e.g. 1M")?;
    if a.rate.is_nan() || a.rate <= 0.0 {
        return usage("--rate must be positive: the measured run is open loop".to_string());
    }
    for (flag, v) in [
        ("--snapshot-interval", &a.snapshot_interval),
        ("--far-interval", &a.far_interval),
    ] {
        parse_duration(v).map_err(|e| Failure::Usage(format!("{flag}: {e}")))?;
    }
    let o = crate::suite::SnapshotOptions {
        pairs: a.pairs,
        keys: a.keys,
        rate: a.rate,
        duration: a.duration,
        snapshot_interval: a.snapshot_interval.clone(),
        far_interval: a.far_interval.clone(),
        snapshot_write_rate: Some(a.snapshot_write_rate.clone()),
        transport: a.transport,
    };
    let setup = suite_setup(&a.suite, "all")?;
    let md = crate::suite::snapshot_latency(&setup, &o, argv)?;
    print!("{md}");
    println!("  results in {}", setup.dir.display());
    Ok(ExitCode::SUCCESS)
}

fn recovery_command(a: &RecoveryArgs, argv: &[String]) -> Result<ExitCode, Failure> {
    check_range(
        "--rounds",
        a.rounds,
        1,
        100,
        "3 rounds at least for a median",
    )?;
    check_range("--keys", a.keys, 1, crate::traffic::KEYS_MAX, "e.g. 10M")?;
    let o = crate::suite::RecoveryOptions {
        rounds: a.rounds,
        keys: a.keys,
    };
    let setup = suite_setup(&a.suite, "all")?;
    let md = crate::suite::recovery(&setup, &o, argv)?;
    print!("{md}");
    println!("  results in {}", setup.dir.display());
    Ok(ExitCode::SUCCESS)
}

fn cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

fn default_target(transport: Transport) -> SocketAddr {
    match transport {
        Transport::Udp => SocketAddr::from(([127, 0, 0, 1], 7070)),
        Transport::Tcp => SocketAddr::from(([127, 0, 0, 1], 7071)),
    }
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    flag: &str,
    value: T,
    low: T,
    high: T,
    fix: &str,
) -> Result<(), Failure> {
    if value < low || value > high {
        return usage(format!("{flag} {value} is outside {low}..={high}: {fix}"));
    }
    Ok(())
}

fn send_plan(transport: &TransportArgs, pace: &PaceArgs, stamp: bool) -> Result<SendPlan, Failure> {
    let t = transport;
    check_range(
        "--threads",
        t.threads,
        1,
        THREADS_MAX,
        "use one sender thread per spare core",
    )?;
    let connections = t.connections.unwrap_or(t.threads);
    check_range(
        "--connections",
        connections,
        t.threads,
        CONNECTIONS_MAX.max(t.threads),
        "each sender thread needs at least one connection",
    )?;
    check_range(
        "--events-per-datagram",
        t.events_per_datagram,
        1,
        EVENTS_PER_DATAGRAM_MAX,
        "10 is typical",
    )?;
    check_range(
        "--datagram-bytes-max",
        t.datagram_bytes_max,
        64,
        65_507,
        "1472 fits an Ethernet frame, 65507 is the UDP limit",
    )?;
    check_range(
        "--flush-us",
        t.flush_us,
        1,
        1_000_000,
        "1000 keeps the added latency at 1 ms",
    )?;
    check_range(
        "--tick-us",
        t.tick_us,
        1,
        100_000,
        "50 is a good compromise between CPU and latency",
    )?;
    if pace.events == Some(0) {
        return usage("--events 0 sends nothing: give a positive count".to_string());
    }
    let duration = match (pace.duration, pace.events) {
        (None, None) => Some(DURATION_DEFAULT),
        (duration, _) => duration,
    };
    Ok(SendPlan {
        transport: t.transport,
        target: t.target.unwrap_or_else(|| default_target(t.transport)),
        threads: t.threads,
        connections,
        rate: pace.rate,
        duration_ns: duration.map(|d| d.as_nanos() as u64),
        events: pace.events,
        events_per_datagram: t.events_per_datagram,
        datagram_bytes_max: t.datagram_bytes_max,
        steer: t.steer,
        flush_ns: t.flush_us * 1_000,
        tick_ns: t.tick_us * 1_000,
        stamp,
    })
}

fn model(
    gap_ms: f64,
    pause_ms: f64,
    burst_mean: f64,
    keys: u64,
    threads: u32,
) -> Result<SessionModel, Failure> {
    check_range(
        "--gap-ms",
        gap_ms,
        0.0,
        3_600_000.0,
        "the mean in-session gap, e.g. 50",
    )?;
    check_range(
        "--pause-ms",
        pause_ms,
        0.0,
        86_400_000.0,
        "set it above the profile's idle timeout",
    )?;
    check_range(
        "--burst-mean",
        burst_mean,
        1.0,
        1e6,
        "mean events per session, e.g. 20",
    )?;
    check_range(
        "keys (--keys/--bidders)",
        keys,
        u64::from(threads),
        KEYS_MAX,
        "each sender thread needs keys of its own",
    )?;
    Ok(SessionModel {
        gap_mean_ns: (gap_ms * 1e6) as u64,
        pause_ns: (pause_ms * 1e6) as u64,
        burst_mean,
    })
}

fn click_workload(c: &ClickArgs, threads: u32) -> Result<Workload, Failure> {
    if let Some(path) = &c.replay {
        if threads != 1 {
            return usage(format!(
                "--replay with --threads {threads}: replay sends from one thread; drop --threads"
            ));
        }
        return Ok(Workload::Replay {
            path: path.clone(),
            key_field: c.key_field.clone(),
        });
    }
    check_range(
        "--payload-bytes",
        c.payload_bytes,
        0,
        PAYLOAD_BYTES_MAX,
        "events are padded up to this size",
    )?;
    check_range("--tenants", c.tenants, 1, u32::MAX, "at least one tenant")?;
    check_range("--pages", c.pages, 1, u32::MAX, "at least one page")?;
    check_range("--logout-pct", c.logout_pct, 0, 100, "a percentage")?;
    Ok(Workload::Click {
        model: model(c.gap_ms, c.pause_ms, c.burst_mean, c.keys, threads)?,
        keys: c.keys,
        params: ClickParams {
            tenants: c.tenants,
            pages: c.pages,
            payload_bytes: c.payload_bytes,
            logout_pct: c.logout_pct,
        },
    })
}

fn bid_workload(b: &BidArgs, threads: u32) -> Result<Workload, Failure> {
    check_range(
        "--payload-bytes",
        b.payload_bytes,
        0,
        PAYLOAD_BYTES_MAX,
        "bids are padded up to this size",
    )?;
    check_range(
        "--auctions-per-s",
        b.auctions_per_s,
        1,
        1_000_000_000,
        "e.g. 100",
    )?;
    if b.gap_ms * crate::traffic::GAP_CAP_FACTOR as f64 >= nexmark::SESSION_GAP_MS as f64 {
        log::warn!(
            "--gap-ms {}: gaps up to 10x the mean may exceed the 10 s session gap",
            b.gap_ms
        );
    }
    Ok(Workload::Bid {
        model: model(b.gap_ms, b.pause_ms, b.burst_mean, b.bidders, threads)?,
        keys: b.bidders,
        params: BidParams {
            payload_bytes: b.payload_bytes,
            auctions_per_s: b.auctions_per_s,
        },
    })
}

fn receive(r: &ReceiveArgs) -> (Option<SocketAddr>, Option<String>) {
    let output = (!r.no_output).then_some(r.output);
    let metrics = (r.metrics != "none" && !r.metrics.is_empty()).then(|| r.metrics.clone());
    (output, metrics)
}

fn spec(
    command: &str,
    workload: Workload,
    seed: u64,
    plan: SendPlan,
    r: &ReceiveArgs,
    quiet: bool,
) -> RunSpec {
    let (output, metrics) = receive(r);
    RunSpec {
        command: command.to_string(),
        workload,
        seed,
        plan,
        output,
        output_wait: r.output_wait,
        output_settle: r.output_settle,
        drain: r.drain,
        metrics,
        progress: !quiet,
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

fn run_dir(report: &ReportArgs) -> PathBuf {
    report
        .out_dir
        .clone()
        .unwrap_or_else(report::default_run_dir)
}

/// `--to-file` for run and nexmark-q11.
fn write_file(
    workload: &Workload,
    pace: &PaceArgs,
    path: &std::path::Path,
) -> Result<ExitCode, Failure> {
    let Some(events) = pace.events else {
        return usage(format!(
            "--to-file {}: needs --events N (the file's length)",
            path.display()
        ));
    };
    if matches!(workload, Workload::Replay { .. }) {
        return usage("--to-file with --replay: the file already exists".to_string());
    }
    let rate = if pace.rate > 0.0 {
        pace.rate
    } else {
        100_000.0
    };
    let summary = run::to_file(workload, pace.seed, rate, events, path)?;
    println!(
        "wrote {} events ({} bytes, {} sessions started) spanning {:.3} s of event time to {}",
        summary.events,
        summary.bytes,
        summary.sessions_started,
        summary.event_time_span_s,
        summary.path
    );
    Ok(ExitCode::SUCCESS)
}

/// A run (clickstream, replay or bids), its baseline, its run directory and its exit status.
fn run_and_report(
    spec: RunSpec,
    baseline: &BaselineArgs,
    report: &ReportArgs,
    parameters: serde_json::Value,
    argv: &[String],
) -> Result<ExitCode, Failure> {
    let machine = Machine::probe();
    let baseline_result = if baseline.baseline {
        let threads = baseline.baseline_threads.unwrap_or_else(cores);
        check_range(
            "--baseline-threads",
            threads,
            1,
            THREADS_MAX,
            "one per core",
        )?;
        Some(run::baseline_first(
            &spec,
            baseline.baseline_listen,
            threads,
        )?)
    } else {
        None
    };
    let mut result: RunResult = run::execute(&spec, parameters)?;
    if let Some(mut b) = baseline_result {
        b.ratio = if b.received_per_s > 0.0 {
            result.achieved_per_s / b.received_per_s
        } else {
            0.0
        };
        result.baseline = Some(b);
    }
    print!("{}", result.summary());
    if !report.no_save {
        let dir = run_dir(report);
        let json =
            serde_json::to_string_pretty(&result).map_err(|e| format!("result.json: {e}"))?;
        report::write_run_dir(
            &dir,
            argv,
            &machine,
            &[
                ("result.json", json + "\n"),
                ("timeline.svg", result.timeline_svg()),
            ],
        )
        .map_err(|e| format!("writing {}: {e}", dir.display()))?;
        println!("  results in {}", dir.display());
    }
    if report.fail_on_loss && (spec.output.is_none() || result.drops.unaccounted != 0.0) {
        eprintln!(
            "loss check failed: sent {} != received {} + counted drops {}",
            result.totals.sent, result.totals.received, result.drops.counted
        );
        return Ok(ExitCode::from(EXIT_LOSS));
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the parsed command; `argv` is recorded in `command.txt`.
pub fn dispatch(cli: Cli, argv: &[String]) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Run(args) => {
            let workload = click_workload(&args.click, args.transport.threads)?;
            let plan = send_plan(&args.transport, &args.pace, args.click.replay.is_none())?;
            if let Some(path) = &args.to_file {
                return write_file(&workload, &args.pace, path);
            }
            let spec = spec(
                "run",
                workload,
                args.pace.seed,
                plan,
                &args.receive,
                args.report.quiet,
            );
            run_and_report(spec, &args.baseline, &args.report, to_json(&args), argv)
        }
        Command::NexmarkQ11(args) => {
            let workload = bid_workload(&args.bid, args.transport.threads)?;
            let plan = send_plan(&args.transport, &args.pace, true)?;
            if let Some(path) = &args.to_file {
                return write_file(&workload, &args.pace, path);
            }
            let spec = spec(
                "nexmark-q11",
                workload,
                args.pace.seed,
                plan,
                &args.receive,
                args.report.quiet,
            );
            run_and_report(spec, &args.baseline, &args.report, to_json(&args), argv)
        }
        Command::Sweep(args) => sweep_command(&args, argv),
        Command::Reproduce(args) => reproduce_command(&args, argv),
        Command::MetricsCost(args) => metrics_cost_command(&args, argv),
        Command::SnapshotLatency(args) => snapshot_latency_command(&args, argv),
        Command::Recovery(args) => recovery_command(&args, argv),
        Command::BaselineRecv(args) => {
            let threads = args.threads.unwrap_or_else(cores);
            check_range(
                "--threads",
                threads,
                1,
                THREADS_MAX,
                "one receiving socket per core",
            )?;
            baseline::command(&BaselineCommand {
                transport: args.transport,
                listen: args
                    .listen
                    .unwrap_or_else(|| default_target(args.transport)),
                threads,
                duration: args.duration,
                echo: args.echo,
                quiet: args.quiet,
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn sweep_command(args: &SweepArgs, argv: &[String]) -> Result<ExitCode, Failure> {
    let rates =
        sweep::rates(args.from, args.to, args.steps, args.factor).map_err(Failure::Usage)?;
    if args.p99_threshold_ms.is_nan() || args.p99_threshold_ms <= 0.0 {
        return usage(format!(
            "--p99-threshold-ms {}: must be positive",
            args.p99_threshold_ms
        ));
    }
    if args.click.replay.is_some() {
        return usage("sweep generates its traffic: drop --replay".to_string());
    }
    if args.receive.no_output {
        return usage("sweep needs latency: drop --no-output".to_string());
    }
    let workload = click_workload(&args.click, args.transport.threads)?;
    let pace = PaceArgs {
        rate: rates[0],
        duration: Some(args.step_duration),
        events: None,
        seed: args.seed,
    };
    let plan = send_plan(&args.transport, &pace, true)?;
    let base = spec(
        "sweep",
        workload,
        args.seed,
        plan,
        &args.receive,
        args.report.quiet,
    );
    let machine = Machine::probe();
    let spec = SweepSpec {
        base,
        rates,
        settle: args.settle,
        threshold_ms: args.p99_threshold_ms,
        past_knee: args.past_knee,
    };
    let result = sweep::execute(&spec, to_json(args))?;
    print!("{}", result.summary());
    if !args.report.no_save {
        let dir = run_dir(&args.report);
        let json = serde_json::to_string_pretty(&result).map_err(|e| format!("sweep.json: {e}"))?;
        let title = format!(
            "sessionizer-bench sweep — clickstream over {}, p99 threshold {} ms",
            match args.transport.transport {
                Transport::Udp => "UDP",
                Transport::Tcp => "TCP",
            },
            args.p99_threshold_ms
        );
        report::write_run_dir(
            &dir,
            argv,
            &machine,
            &[
                ("sweep.json", json + "\n"),
                ("sweep.svg", result.svg(&title)),
            ],
        )
        .map_err(|e| format!("writing {}: {e}", dir.display()))?;
        println!("  results in {}", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn scaled_numbers() {
        assert_eq!(parse_rate("0").unwrap(), 0.0);
        assert_eq!(parse_rate("50k").unwrap(), 50_000.0);
        assert_eq!(parse_rate("1.5M").unwrap(), 1_500_000.0);
        assert_eq!(parse_count("1_000").unwrap(), 1000);
        assert!(parse_count("1.5").is_err());
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn defaults_and_validation() {
        let cli = Cli::try_parse_from([
            "sessionizer-bench",
            "run",
            "--transport",
            "tcp",
            "--threads",
            "2",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!()
        };
        let plan = send_plan(&args.transport, &args.pace, true).unwrap();
        assert_eq!(plan.target, "127.0.0.1:7071".parse().unwrap());
        assert_eq!(plan.connections, 2);
        assert_eq!(plan.duration_ns, Some(10_000_000_000));
        let cli = Cli::try_parse_from([
            "sessionizer-bench",
            "run",
            "--threads",
            "2",
            "--connections",
            "1",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!()
        };
        assert!(
            matches!(send_plan(&args.transport, &args.pace, true), Err(Failure::Usage(m)) if m.contains("--connections"))
        );
        let cli =
            Cli::try_parse_from(["sessionizer-bench", "run", "--keys", "1", "--threads", "2"])
                .unwrap();
        let Command::Run(args) = cli.command else {
            panic!()
        };
        assert!(click_workload(&args.click, 2).is_err());
    }
}
