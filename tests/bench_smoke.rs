//! The bundled bench harness against the real appliance: `sessionizer-bench run` offers a short,
//! modest load (UDP, then TCP) to a freshly started appliance and reads its TCP output. The run
//! must exit 0, write a complete run directory, and account for every event it sent
//! (`sent == received + counted drops`). `sessionizer-bench reproduce --quick` starts the
//! appliance itself and goes through every step of the RESULTS reproduction at a tiny size; its
//! counts must agree (no receiver counts more than was sent, the replay sees every event of its
//! file, the sweep accounts for every event). Nothing here asserts on timing or rates.

mod util;

use serde_json::Value;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use util::*;

const BENCH: &str = env!("CARGO_BIN_EXE_sessionizer-bench");
/// The harness sends for 2 s and drains for 2 s at most; anything past this is a hang.
const BENCH_DEADLINE: Duration = Duration::from_secs(60);

/// Two shards, loopback listeners and one TCP output carrying every stream (port 0 everywhere),
/// and the reference `web` profile with a 2 s idle timeout (below the harness's 2 s pauses plus
/// gaps, so sessions close during the run).
fn bench_config(_dir: &Path) -> String {
    r#"cores = [0, 1]

[memory]
arena_bytes = "8MiB"
max_sessions = 20000

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
streams = ["events", "markers", "late", "dead_letter"]

[metrics]
address = "127.0.0.1:0"

[[profile]]
name = "web"
key = "user"
time = "processing"
timestamp = { field = "ts", format = "epoch_ms" }
idle_timeout = "2s"
max_duration = "12h"
ends_when = { field = "type", eq = "logout" }
metadata = ["ip", "ua"]
state = ["page"]

[[profile.counter]]
name = "clicks"
when = { field = "type", eq = "click" }

[[profile.counter]]
name = "page_views"
when = { field = "type", eq = "page" }
"#
    .to_string()
}

/// Kills the harness if the test panics before it exits.
struct Guard(Option<Child>);

impl Guard {
    /// Wait for the exit, killing the harness at `deadline`.
    fn wait(&mut self, deadline: Duration) -> Result<ExitStatus, String> {
        let t0 = Instant::now();
        let child = self.0.as_mut().expect("running");
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.0 = None;
                return Ok(st);
            }
            if t0.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.0 = None;
                return Err(format!(
                    "sessionizer-bench still running after {deadline:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Start the appliance, run the harness with `transport` against it, and check the run.
fn smoke(transport: &str) {
    let app = Appliance::start(bench_config);
    let target = match transport {
        "udp" => app.udp_addr(),
        "tcp" => app.tcp_addr(),
        other => panic!("unknown transport {other}"),
    };
    let work = tempfile::tempdir().expect("tempdir");
    let run_dir = work.path().join("run");
    let stdout_path = work.path().join("bench.stdout");
    let stderr_path = work.path().join("bench.stderr");

    let child = Command::new(BENCH)
        .args(["run", "--transport", transport, "--target"])
        .arg(target.to_string())
        .arg("--output")
        .arg(app.output_tcp_addr().to_string())
        .args(["--duration", "2s", "--rate", "20000", "--keys", "500"])
        // No scrape: with nothing dropped at 20k events/s, `counted` is 0 and received = sent.
        .args(["--metrics", "none", "--out-dir"])
        .arg(&run_dir)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("stdout file"))
        .stderr(File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn sessionizer-bench");
    let status = Guard(Some(child)).wait(BENCH_DEADLINE);

    let context = || {
        format!(
            "\n--- bench stdout:\n{}\n--- bench stderr:\n{}\n--- appliance stderr:\n{}",
            read(&stdout_path),
            read(&stderr_path),
            app.stderr_lines().join("\n")
        )
    };
    let status = status.unwrap_or_else(|e| panic!("{transport}: {e}{}", context()));
    assert!(
        status.success(),
        "{transport}: sessionizer-bench exited with {status}{}",
        context()
    );

    for name in ["result.json", "machine.txt", "command.txt", "timeline.svg"] {
        let p = run_dir.join(name);
        assert!(
            p.is_file(),
            "{transport}: run directory lacks {name}{}",
            context()
        );
    }
    let command = read(&run_dir.join("command.txt"));
    assert!(
        command.contains("run") && command.contains(&target.to_string()),
        "{transport}: command.txt {command:?}"
    );
    assert!(
        !read(&run_dir.join("machine.txt")).trim().is_empty(),
        "{transport}: empty machine.txt"
    );
    let svg = read(&run_dir.join("timeline.svg"));
    assert!(
        svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{transport}: timeline.svg is not one <svg> element: {:?}…",
        &svg[..svg.len().min(200)]
    );

    let result: Value =
        serde_json::from_str(&read(&run_dir.join("result.json"))).expect("result.json is JSON");
    let totals = &result["totals"];
    let drops = &result["drops"];
    let sent = totals["sent"].as_u64().expect("totals.sent");
    let received = totals["received"].as_u64().expect("totals.received");
    let lost = totals["lost"].as_i64().expect("totals.lost");
    let counted = drops["counted"].as_f64().expect("drops.counted");
    let unaccounted = drops["unaccounted"].as_f64().expect("drops.unaccounted");
    let summary = format!("totals {totals}, drops {drops}{}", context());
    assert!(sent > 0, "{transport}: nothing sent; {summary}");
    assert!(received > 0, "{transport}: nothing received; {summary}");
    assert_eq!(
        lost,
        sent as i64 - received as i64,
        "{transport}: lost; {summary}"
    );
    assert_eq!(
        sent as f64,
        received as f64 + counted,
        "{transport}: sent != received + counted drops; {summary}"
    );
    assert_eq!(
        unaccounted, 0.0,
        "{transport}: unaccounted events; {summary}"
    );
    assert!(
        result["receiver_error"].is_null(),
        "{transport}: receiver error; {summary}"
    );
}

#[test]
fn bench_run_udp_against_appliance() {
    smoke("udp");
}

#[test]
fn bench_run_tcp_against_appliance() {
    smoke("tcp");
}

/// The one-command reproduction, at smoke size: every step runs and its counts agree.
#[test]
fn reproduce_quick_runs_every_step() {
    let work = tempfile::tempdir().expect("tempdir");
    let run_dir = work.path().join("run");
    let stdout_path = work.path().join("bench.stdout");
    let stderr_path = work.path().join("bench.stderr");
    let child = Command::new(BENCH)
        .args(["reproduce", "--quick", "--sessionizer"])
        .arg(env!("CARGO_BIN_EXE_sessionizer"))
        .arg("--out-dir")
        .arg(&run_dir)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("stdout file"))
        .stderr(File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn sessionizer-bench");
    // Six appliance runs, a replay and a two-step sweep of about a second each, plus start-ups.
    let status = Guard(Some(child)).wait(Duration::from_secs(240));
    let context = || {
        format!(
            "\n--- bench stdout:\n{}\n--- bench stderr:\n{}",
            read(&stdout_path),
            read(&stderr_path)
        )
    };
    let status = status.unwrap_or_else(|e| panic!("{e}{}", context()));
    assert!(status.success(), "exit {status}{}", context());
    for name in [
        "reproduce.json",
        "table.md",
        "sweep.json",
        "sweep.svg",
        "command.txt",
        "machine.txt",
        "bench.toml",
    ] {
        assert!(
            run_dir.join(name).is_file(),
            "run directory lacks {name}{}",
            context()
        );
    }
    let table = read(&run_dir.join("table.md"));
    assert!(
        table.contains("appliance TCP ÷ raw TCP") && table.contains("appliance UDP ÷ engine alone"),
        "{table}"
    );
    assert_eq!(
        read(&stdout_path).matches("| figure |").count(),
        1,
        "{}",
        context()
    );
    let r: Value =
        serde_json::from_str(&read(&run_dir.join("reproduce.json"))).expect("reproduce.json");
    let rounds = r["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 1, "{r}");
    let round = &rounds[0];
    let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));
    // Receivers count what they took in before they were stopped: something, never more than
    // was sent (the appliance is stopped right after the sending ends, so a TCP tail still in
    // the socket buffers may go uncounted; UDP may also drop in the kernel).
    for run in ["appliance_tcp", "appliance_tcp_markers", "appliance_udp"] {
        let x = &round[run];
        assert!(n(&x["processed"]) > 0, "{run}: {round}");
        assert!(n(&x["processed"]) <= n(&x["sent"]), "{run}: {round}");
        assert!(n(&x["processed"]) as f64 / x["shard_cpu_s"].as_f64().unwrap() > 0.0);
    }
    // The markers-only outputs wrote no enriched events: far fewer bytes an event than the full
    // run's files, which hold the markers and a copy of every event besides (~250 against ~16
    // bytes an event here).
    let per_event = |run: &str| {
        let x = &round[run];
        n(&x["file_outputs"]["bytes"]) as f64 / n(&x["processed"]) as f64
    };
    assert!(
        per_event("appliance_tcp_markers") < per_event("appliance_tcp") / 2.0,
        "file bytes an event, markers only vs every stream: {round}"
    );
    assert!(table.contains("markers-only outputs"), "{table}");
    for run in ["raw_tcp", "raw_udp"] {
        let x = &round[run];
        assert!(n(&x["received"]) > 0, "{run}: {round}");
        assert!(n(&x["received"]) <= n(&x["sent"]), "{run}: {round}");
    }
    assert_eq!(
        n(&round["engine"]["events"]),
        n(&r["replay_file"]["events"]),
        "{r}"
    );
    assert_eq!(n(&r["replay_file"]["events"]), 20_000, "{r}");
    let points = r["sweep"]["points"].as_array().expect("sweep points");
    assert_eq!(points.len(), 2, "{r}");
    for p in points {
        assert!(n(&p["received"]) > 0, "{p}");
        assert_eq!(
            p["lost"].as_i64().expect("lost") as f64,
            p["drops_counted"].as_f64().expect("drops_counted"),
            "sent = received + counted drops: {p}"
        );
    }
}
