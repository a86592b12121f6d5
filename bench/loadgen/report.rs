//! Results of a run: the structure of `result.json`, the end-of-run summary, the live progress
//! line, the timeline chart, and the run directory that records command, machine and date.
//!
//! A run directory is `bench/runs/<YYYY-MM-DD>-<hostname>-<HHMMSS>/` (UTC, relative to the
//! working directory) unless `--out-dir` names one; it holds `result.json`, `machine.txt`,
//! `command.txt` (the exact argv, shell-quoted) and `timeline.svg` (`sweep.json`/`sweep.svg`
//! for a sweep). The timeline keeps at most [`TIMELINE_ROWS_MAX`] rows.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

use crate::machine::{self, Machine};
use crate::send::{SendPlan, SendTotals};
use crate::svg::{self, Panel, Series};

/// One row per second for a day; longer runs keep their first day.
pub const TIMELINE_ROWS_MAX: usize = 86_400;

/// One second (or the last, partial interval) of a run.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TimelineRow {
    /// End of the interval, seconds since the start.
    pub t_s: f64,
    pub sent: u64,
    pub received: u64,
    pub sent_per_s: f64,
    pub received_per_s: f64,
    /// Sent minus received at the end of the interval (in flight plus lost).
    pub outstanding: i64,
    pub latency_count: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Latency percentiles of the whole run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

pub fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl Latency {
    pub fn of(histogram: &Histogram<u64>) -> Option<Latency> {
        if histogram.is_empty() {
            return None;
        }
        let at = |q: f64| ns_to_ms(histogram.value_at_quantile(q));
        Some(Latency {
            count: histogram.len(),
            min_ms: ns_to_ms(histogram.min()),
            mean_ms: histogram.mean() / 1e6,
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: ns_to_ms(histogram.max()),
        })
    }
}

/// Counts of the run.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    /// Events the kernel accepted from the senders.
    pub sent: u64,
    /// Enriched events received on the output (this run's only).
    pub received: u64,
    /// `sent - received` (negative means duplicates).
    pub lost: i64,
    pub markers: BTreeMap<String, u64>,
    pub markers_other_kind: u64,
    /// Enriched events stamped before this run started.
    pub stale: u64,
    /// Enriched events without `sent_ns`.
    pub untimed: u64,
    pub other_records: u64,
    pub output_bytes: u64,
}

/// Drops counted outside the harness.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Drops {
    pub metrics_url: Option<String>,
    /// Why the endpoint could not be read, if it could not.
    pub metrics_error: Option<String>,
    /// Per matching series: after minus before.
    pub series: BTreeMap<String, f64>,
    /// Sum of the series deltas.
    pub counted: f64,
    /// `lost - counted`: 0 when every missing event is accounted for.
    pub unaccounted: f64,
    /// `sent - received - late_event records - dead_letter records`: the same check made with
    /// the output alone (when it carries the `late` and `dead_letter` streams).
    pub unaccounted_by_records: i64,
    /// Deltas of the kernel's UDP counters (system-wide; datagrams, not events).
    pub kernel_udp: BTreeMap<String, u64>,
}

/// The in-process baseline measured before the run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BaselineResult {
    pub listen: String,
    pub sent: u64,
    pub received: u64,
    pub sending_s: f64,
    pub received_per_s: f64,
    /// The run's achieved rate over the baseline's.
    pub ratio: f64,
}

/// Everything `result.json` holds.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    pub command: String,
    pub workload: String,
    pub started_utc: String,
    pub parameters: serde_json::Value,
    pub send_plan: serde_json::Value,
    pub sending_s: f64,
    pub drain_s: f64,
    pub totals: Totals,
    pub offered_per_s: f64,
    pub sent_per_s: f64,
    pub received_per_s: f64,
    /// What the sweep plots: received/s with an output, sent/s without.
    pub achieved_per_s: f64,
    pub latency: Option<Latency>,
    pub drops: Drops,
    pub sender: serde_json::Value,
    pub baseline: Option<BaselineResult>,
    pub receiver_error: Option<String>,
    pub warnings: Vec<String>,
    pub timeline: Vec<TimelineRow>,
}

impl RunResult {
    pub fn new(
        command: &str,
        workload: String,
        parameters: serde_json::Value,
        plan: &SendPlan,
    ) -> RunResult {
        RunResult {
            command: command.to_string(),
            workload,
            started_utc: utc_now(),
            parameters,
            send_plan: serde_json::to_value(plan).unwrap_or_default(),
            sending_s: 0.0,
            drain_s: 0.0,
            totals: Totals::default(),
            offered_per_s: plan.rate,
            sent_per_s: 0.0,
            received_per_s: 0.0,
            achieved_per_s: 0.0,
            latency: None,
            drops: Drops::default(),
            sender: serde_json::Value::Null,
            baseline: None,
            receiver_error: None,
            warnings: Vec::new(),
            timeline: Vec::new(),
        }
    }

    pub fn set_sender(&mut self, totals: &SendTotals) {
        self.sender = serde_json::to_value(totals).unwrap_or_default();
    }

    /// The end-of-run summary for stdout.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let rate = if self.offered_per_s > 0.0 {
            format!("{}/s offered", svg::short_number(self.offered_per_s))
        } else {
            "flat out".to_string()
        };
        out += &format!(
            "{} {}: {} for {:.2}s (+{:.2}s drain)\n",
            self.command, self.workload, rate, self.sending_s, self.drain_s
        );
        out += &format!(
            "  sent      {:>12}  ({:.0}/s)\n  received  {:>12}  ({:.0}/s)\n  lost      {:>12}\n",
            self.totals.sent,
            self.sent_per_s,
            self.totals.received,
            self.received_per_s,
            self.totals.lost
        );
        match &self.latency {
            Some(l) => {
                out += &format!(
                    "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (n={})\n",
                    l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
                );
            }
            None => out += "  latency: none measured\n",
        }
        let markers: Vec<String> = self
            .totals
            .markers
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        if !markers.is_empty() {
            out += &format!("  markers   {}\n", markers.join(" "));
        }
        if let Some(url) = &self.drops.metrics_url {
            match &self.drops.metrics_error {
                Some(error) => out += &format!("  metrics   unavailable ({error})\n"),
                None => {
                    out += &format!(
                        "  drops     counted {} (metrics {url}), unaccounted {}\n",
                        self.drops.counted, self.drops.unaccounted
                    );
                    for (series, delta) in self.drops.series.iter().filter(|(_, d)| **d != 0.0) {
                        out += &format!("            {series} +{delta}\n");
                    }
                }
            }
        }
        if self.totals.received > 0 || self.drops.unaccounted_by_records != self.totals.lost {
            out += &format!(
                "  sent - received - late_event - dead_letter records = {}\n",
                self.drops.unaccounted_by_records
            );
        }
        let kernel: Vec<String> = ["RcvbufErrors", "InErrors", "NoPorts"]
            .iter()
            .filter_map(|k| {
                self.drops
                    .kernel_udp
                    .get(*k)
                    .filter(|v| **v > 0)
                    .map(|v| format!("{k}=+{v}"))
            })
            .collect();
        if !kernel.is_empty() {
            out += &format!(
                "  kernel UDP (system-wide datagrams) {}\n",
                kernel.join(" ")
            );
        }
        if let Some(b) = &self.baseline {
            out += &format!(
                "  baseline  {:.0}/s received by baseline-recv on {}; ratio {:.3}\n",
                b.received_per_s, b.listen, b.ratio
            );
        }
        for warning in &self.warnings {
            out += &format!("  warning: {warning}\n");
        }
        out
    }

    /// `timeline.svg`: throughput and latency over time.
    pub fn timeline_svg(&self) -> String {
        let rows = &self.timeline;
        let points = |f: &dyn Fn(&TimelineRow) -> f64| {
            rows.iter().map(|r| (r.t_s, f(r))).collect::<Vec<_>>()
        };
        let latency =
            |f: &dyn Fn(&TimelineRow) -> Option<f64>| points(&|r| f(r).unwrap_or(f64::NAN));
        let throughput = Panel {
            title: "Throughput".to_string(),
            x_label: "time since start (s)".to_string(),
            y_label: "events per second".to_string(),
            log_y: false,
            series: vec![
                Series {
                    name: "sent/s".to_string(),
                    color: "#1f77b4",
                    points: points(&|r| r.sent_per_s),
                    dashed: false,
                    markers: false,
                },
                Series {
                    name: "received/s".to_string(),
                    color: "#ff7f0e",
                    points: points(&|r| r.received_per_s),
                    dashed: true,
                    markers: false,
                },
            ],
            rules: Vec::new(),
        };
        let latency = Panel {
            title: "Event to enriched event latency, per second".to_string(),
            x_label: "time since start (s)".to_string(),
            y_label: "latency (ms)".to_string(),
            log_y: false,
            series: vec![
                Series {
                    name: "p99".to_string(),
                    color: "#d62728",
                    points: latency(&|r| r.p99_ms),
                    dashed: false,
                    markers: false,
                },
                Series {
                    name: "p50".to_string(),
                    color: "#2ca02c",
                    points: latency(&|r| r.p50_ms),
                    dashed: true,
                    markers: false,
                },
            ],
            rules: Vec::new(),
        };
        let rate = if self.offered_per_s > 0.0 {
            format!("{}/s offered", svg::short_number(self.offered_per_s))
        } else {
            "flat out".to_string()
        };
        svg::render(
            &format!(
                "sessionizer-bench {} — {}, {}",
                self.command, self.workload, rate
            ),
            &format!("{} · started {}", machine::hostname(), self.started_utc),
            &[throughput, latency],
        )
    }
}

/// RFC 3339 UTC time, seconds precision.
pub fn utc_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// `bench/runs/<YYYY-MM-DD>-<hostname>-<HHMMSS>` for now (UTC), made unique with a suffix.
pub fn default_run_dir() -> PathBuf {
    let stamp = utc_now(); // 2024-11-25T03:27:00Z
    let date = &stamp[..10];
    let time: String = stamp[11..19].chars().filter(|c| *c != ':').collect();
    let base = PathBuf::from("bench/runs").join(format!("{date}-{}-{time}", machine::hostname()));
    let mut candidate = base.clone();
    let mut n = 2;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{}-{n}", base.display()));
        n += 1;
    }
    candidate
}

/// The argv as a shell command line.
pub fn command_line(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| {
            if !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
            {
                arg.clone()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `command.txt`, `machine.txt` and the given files into `dir` (created if needed).
pub fn write_run_dir(
    dir: &Path,
    argv: &[String],
    machine: &Machine,
    files: &[(&str, String)],
) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("command.txt"), command_line(argv) + "\n")?;
    std::fs::write(dir.join("machine.txt"), machine.to_text())?;
    for (name, content) in files {
        std::fs::write(dir.join(name), content)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_quotes_what_needs_it() {
        let argv = [
            "sessionizer-bench",
            "run",
            "--rate",
            "100k",
            "--x",
            "a b",
            "it's",
        ]
        .map(String::from);
        assert_eq!(
            command_line(&argv),
            r"sessionizer-bench run --rate 100k --x 'a b' 'it'\''s'"
        );
    }

    #[test]
    fn run_dir_name_has_date_host_time() {
        let dir = default_run_dir();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        assert!(dir.starts_with("bench/runs"));
        assert_eq!(&name[4..5], "-");
        assert!(name.contains(&machine::hostname()));
        assert!(
            name[name.len() - 6..].chars().all(|c| c.is_ascii_digit()),
            "{name}"
        );
    }

    #[test]
    fn latency_of_histogram() {
        let mut h = crate::recv::latency_histogram();
        assert!(Latency::of(&h).is_none());
        for ms in 1..=100u64 {
            h.record(ms * 1_000_000).unwrap();
        }
        let l = Latency::of(&h).unwrap();
        assert_eq!(l.count, 100);
        assert!((l.p50_ms - 50.0).abs() < 0.1 && (l.p99_ms - 99.0).abs() < 0.1);
    }

    #[test]
    fn timeline_svg_is_well_formed() {
        let plan = SendPlan {
            transport: crate::send::Transport::Udp,
            target: "127.0.0.1:7070".parse().unwrap(),
            threads: 1,
            connections: 1,
            rate: 1000.0,
            duration_ns: None,
            events: None,
            events_per_datagram: 10,
            datagram_bytes_max: 1472,
            steer: false,
            flush_ns: 1,
            tick_ns: 1,
            stamp: true,
        };
        let mut result = RunResult::new(
            "run",
            "clickstream".to_string(),
            serde_json::Value::Null,
            &plan,
        );
        result.timeline = (1..=5)
            .map(|s| TimelineRow {
                t_s: s as f64,
                sent_per_s: 1000.0,
                received_per_s: 990.0,
                p99_ms: (s != 3).then_some(2.5),
                p50_ms: Some(1.0),
                ..TimelineRow::default()
            })
            .collect();
        let doc = result.timeline_svg();
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert!(result.summary().contains("latency: none measured"));
    }
}
