//! The command line: `run`, `replay`, `check-config`, `inspect-snapshot`. Thin on purpose: it
//! owns exit codes and error context, everything else lives in the library.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 configuration or usage error.

use clap::{Parser, Subcommand};
use sessionizer::config::{Config, OutputKind, DEFAULT_TOML};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `eprintln!` that cannot panic: with stderr closed (`... 2>&-`, or a pipe whose reader left)
/// the message is lost, but the exit code still says what happened.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "sessionizer",
    version,
    about = "Turns raw event streams into sessions in real time"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance (without --config: the embedded default, loopback only).
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Sessionize files with the same engine, driven by the events' own time.
    Replay {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output file, or `-` for stdout.
        #[arg(long, default_value = "-")]
        output: String,
    },
    /// Validate a configuration and print the effective settings and memory plan.
    CheckConfig { path: Option<PathBuf> },
    /// Print a snapshot file's header and summary (and with --sessions, every session).
    InspectSnapshot {
        path: PathBuf,
        #[arg(long)]
        sessions: bool,
        /// Print only the configuration the snapshot keeps (the TOML its rules came from).
        #[arg(long, conflicts_with = "sessions")]
        config: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            let Some(cfg) = load(config.as_deref()) else {
                return ExitCode::from(2);
            };
            init_logging(&cfg);
            match sessionizer::runtime::run_with(cfg, config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    report!("sessionizer: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Replay {
            files,
            config,
            output,
        } => {
            let Some(cfg) = load(config.as_deref()) else {
                return ExitCode::from(2);
            };
            init_logging(&cfg);
            match sessionizer::replay::run(&cfg, &files, &output) {
                Ok(summary) => {
                    log::info!("replay done: {summary:?}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    report!("sessionizer replay: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::CheckConfig { path } => match load(path.as_deref()) {
            Some(cfg) => {
                print_plan(&cfg, path.as_deref());
                match print_state(&cfg) {
                    Ok(()) => {
                        println!("ok");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        report!("sessionizer: a start on this configuration would fail: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            None => ExitCode::from(2),
        },
        Command::InspectSnapshot {
            path,
            sessions,
            config,
        } => {
            let stdout = std::io::stdout();
            let shown = if config {
                sessionizer::persist::inspect::kept_config(&path, &mut stdout.lock())
            } else {
                sessionizer::persist::inspect::inspect(&path, sessions, &mut stdout.lock())
            };
            match shown {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    report!("sessionizer inspect-snapshot: {}: {e}", path.display());
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Load and validate; on error print it (key, value, limit, fix) and return None.
fn load(path: Option<&Path>) -> Option<Config> {
    let result = match path {
        Some(p) => Config::load(p),
        None => Config::from_toml(DEFAULT_TOML),
    };
    match result {
        Ok(cfg) => Some(cfg),
        Err(e) => {
            let source = path
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "embedded default".into());
            report!("sessionizer: invalid configuration ({source}): {e}");
            None
        }
    }
}

fn init_logging(cfg: &Config) {
    let env = env_logger::Env::default().default_filter_or(cfg.log.level.as_str());
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}

fn print_plan(cfg: &Config, path: Option<&Path>) {
    let cores = cfg.core_list();
    let m = &cfg.memory;
    let blocks = m.arena_bytes.0 / u64::from(m.block_bytes);
    let table = u64::from(m.max_sessions) * 48;
    let index = (u64::from(m.max_sessions) * 8).div_ceil(7) * 8;
    let per_shard = m.arena_bytes.0 + table + index;
    println!(
        "config: {}",
        path.map(|p| p.display().to_string())
            .unwrap_or_else(|| "embedded default".into())
    );
    println!("node_id: {}", cfg.node_id);
    println!("shards: {} on cores {:?}", cores.len(), cores);
    println!("memory per shard:");
    println!(
        "  arena:   {} bytes = {blocks} blocks of {} bytes",
        m.arena_bytes.0, m.block_bytes
    );
    println!(
        "  table:   {table} bytes ({} sessions x 48 bytes)",
        m.max_sessions
    );
    println!("  index:   {index} bytes");
    println!(
        "  total:   {per_shard} bytes per shard, {} bytes in all",
        per_shard * cores.len() as u64
    );
    println!("  on_full: {:?}", m.on_full);
    println!("slot wheel: {} one-second slots", cfg.slots.max);
    for l in &cfg.listeners {
        println!(
            "listener: {:?} {} allow={:?} ack={}",
            l.kind, l.address, l.allow, l.ack
        );
    }
    for o in &cfg.outputs {
        let target = match o.kind {
            OutputKind::File => o.path.clone().unwrap_or_default(),
            OutputKind::Tcp | OutputKind::Udp => {
                o.address.map(|a| a.to_string()).unwrap_or_default()
            }
            OutputKind::Stdout => "-".into(),
        };
        println!(
            "output: {:?} {target} streams={:?} when_full={:?}",
            o.kind, o.streams, o.when_full
        );
    }
    match &cfg.metrics.address {
        Some(a) => println!("metrics: http://{a}/metrics"),
        None => println!("metrics: off"),
    }
    match &cfg.persist.dir {
        Some(d) => println!(
            "persist: {d} (snapshot every {:?}, fsync {:?})",
            cfg.persist.snapshot_interval.0, cfg.persist.fsync
        ),
        None => println!("persist: off"),
    }
    for p in &cfg.profiles {
        println!(
            "profile {}: key={} time={:?} idle_timeout={:?} max_duration={:?} metadata={:?} state={:?} counters={} aggregates={} lists={} sub_sessions={}",
            p.name,
            p.key,
            p.time,
            p.idle_timeout.0,
            p.max_duration.map(|d| d.0),
            p.metadata,
            p.state,
            p.counters.len(),
            p.aggregates.len(),
            p.lists.len(),
            p.sub_sessions.len()
        );
    }
}

/// What a start would do with the persist directory's state (`persist::preview`).
fn print_state(cfg: &Config) -> Result<(), String> {
    let rules = sessionizer::engine::rules::Rules::compile(cfg).map_err(|e| e.to_string())?;
    let Some(previews) = sessionizer::persist::preview::preview(cfg, &rules)? else {
        return Ok(());
    };
    let dir = cfg.persist.dir.as_deref().unwrap_or_default();
    for line in sessionizer::persist::preview::describe(dir, &previews) {
        println!("{line}");
    }
    Ok(())
}
