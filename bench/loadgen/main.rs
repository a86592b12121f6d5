//! `sessionizer-bench`: the bundled benchmark harness of the sessionizer appliance — load
//! generator and latency receiver (`run`, `nexmark-q11`), rate sweep (`sweep`), the raw
//! socket ceiling (`baseline-recv`), and the commands that start the appliance themselves and
//! reproduce the figures of bench/RESULTS.md (`reproduce`, `metrics-cost`,
//! `snapshot-latency`). See bench/README.md.
//!
//! `main` is thin: it parses the command line, installs the Ctrl-C flag, and turns the outcome
//! into an exit status — 0 success, 1 an operating error (connection, I/O), 2 a usage error,
//! 3 a failed `--fail-on-loss` check. The harness is self-contained on purpose: it does not use
//! the `sessionizer` library, so it checks the appliance against independent code.

mod appliance;
mod baseline;
mod cli;
mod clock;
mod machine;
mod nexmark;
mod recv;
mod report;
mod run;
mod scrape;
mod send;
mod suite;
mod svg;
mod sweep;
mod traffic;
mod wire;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C was pressed: runs stop sending, drain and still write their results.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_interrupt(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// The first SIGINT sets the flag; the handler then resets, so a second one ends the process.
fn install_interrupt_handler() {
    // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
    // async-signal-safe; SA_RESETHAND restores the default action after the first signal.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_interrupt as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut()) != 0 {
            log::warn!(
                "installing the SIGINT handler: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let argv: Vec<String> = std::env::args().collect();
    let cli = cli::Cli::parse();
    install_interrupt_handler();
    match cli::dispatch(cli, &argv) {
        Ok(code) => code,
        Err(cli::Failure::Usage(message)) => {
            eprintln!("sessionizer-bench: {message}");
            ExitCode::from(2)
        }
        Err(cli::Failure::Run(message)) => {
            eprintln!("sessionizer-bench: {message}");
            ExitCode::from(1)
        }
    }
}
