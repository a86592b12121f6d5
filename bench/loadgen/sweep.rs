//! `sweep`: steps the offered rate, one short run per step, and finds the knee — where p99
//! latency crosses the threshold — and the sustainable rate: the highest achieved rate of a step
//! with p99 under the threshold and no loss.
//!
//! Rates are geometric from `--from` to `--to` (`--steps` of them, or every `--factor`). The
//! sweep stops early once `past_knee` steps in a row have been over the threshold or lossy, so a
//! saturated appliance is not hammered for nothing. The knee is the first step over the threshold
//! after the sustainable step; its throughput is interpolated between the last step under the
//! threshold and it, on a log scale of latency.

use crate::report::RunResult;
use crate::run::{self, RunSpec};
use crate::svg::{self, Panel, Rule, Series};

/// Steps a sweep may have.
pub const STEPS_MAX: usize = 200;

/// One step's outcome, as plotted.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SweepPoint {
    pub offered_per_s: f64,
    pub achieved_per_s: f64,
    pub sent: u64,
    pub received: u64,
    pub lost: i64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub drops_counted: f64,
}

impl SweepPoint {
    pub fn of(result: &RunResult) -> SweepPoint {
        SweepPoint {
            offered_per_s: result.offered_per_s,
            achieved_per_s: result.achieved_per_s,
            sent: result.totals.sent,
            received: result.totals.received,
            lost: result.totals.lost,
            p50_ms: result.latency.as_ref().map(|l| l.p50_ms),
            p99_ms: result.latency.as_ref().map(|l| l.p99_ms),
            drops_counted: result.drops.counted,
        }
    }

    /// Under the threshold and lossless.
    pub fn good(&self, threshold_ms: f64) -> bool {
        self.p99_ms.is_some_and(|p| p < threshold_ms) && self.lost <= 0 && self.drops_counted <= 0.0
    }
}

/// Where the sweep bent.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Knee {
    /// Highest achieved rate of a good step.
    pub sustainable_per_s: Option<f64>,
    pub sustainable_step: Option<usize>,
    /// First step (in offered order) whose p99 reached the threshold.
    pub knee_step: Option<usize>,
    /// Achieved rate at which p99 crosses the threshold (interpolated).
    pub knee_per_s: Option<f64>,
}

/// Finds the sustainable rate and the knee of `points` (in the order they were offered).
///
/// The knee is the first step over the threshold *after* the sustainable step, so that a noisy
/// early step does not put the knee below a rate the appliance sustained; with no good step it
/// is the first step over the threshold.
pub fn find_knee(points: &[SweepPoint], threshold_ms: f64) -> Knee {
    assert!(threshold_ms > 0.0);
    let mut knee = Knee::default();
    for (index, point) in points.iter().enumerate() {
        if point.good(threshold_ms)
            && knee
                .sustainable_per_s
                .is_none_or(|best| point.achieved_per_s > best)
        {
            knee.sustainable_per_s = Some(point.achieved_per_s);
            knee.sustainable_step = Some(index);
        }
    }
    let over = |p: &SweepPoint| p.p99_ms.is_some_and(|p99| p99 >= threshold_ms);
    let from = knee.sustainable_step.map_or(0, |s| s + 1);
    let Some(index) = (from..points.len()).find(|&i| over(&points[i])) else {
        return knee;
    };
    knee.knee_step = Some(index);
    let after = &points[index];
    // Interpolate from the latest step before it that was under the threshold.
    let before = points[..index]
        .iter()
        .rev()
        .find(|p| p.p99_ms.is_some_and(|p99| p99 > 0.0 && p99 < threshold_ms));
    knee.knee_per_s = Some(match (before, after.p99_ms) {
        (Some(before), Some(p1)) => {
            let p0 = before.p99_ms.expect("found by its p99");
            let f = (threshold_ms.ln() - p0.ln()) / (p1.ln() - p0.ln());
            before.achieved_per_s
                + f.clamp(0.0, 1.0) * (after.achieved_per_s - before.achieved_per_s)
        }
        _ => after.achieved_per_s,
    });
    knee
}

/// The offered rates of a sweep: `steps` geometric steps from `from` to `to` inclusive, or
/// `from`, `from × factor`, … up to `to`.
pub fn rates(
    from: f64,
    to: f64,
    steps: Option<u32>,
    factor: Option<f64>,
) -> Result<Vec<f64>, String> {
    if !(from > 0.0 && to >= from) {
        return Err(format!("--from {from} --to {to}: need 0 < from <= to"));
    }
    let rates: Vec<f64> = match (steps, factor) {
        (Some(_), Some(_)) => return Err("give --steps or --factor, not both".to_string()),
        (_, Some(factor)) => {
            if factor <= 1.0 {
                return Err(format!("--factor {factor}: must be above 1 (e.g. 1.5)"));
            }
            let mut rates = vec![from];
            while rates.len() < STEPS_MAX && rates[rates.len() - 1] * factor <= to * (1.0 + 1e-9) {
                rates.push(rates[rates.len() - 1] * factor);
            }
            rates
        }
        (steps, None) => {
            let steps = steps.unwrap_or(8) as usize;
            if !(1..=STEPS_MAX).contains(&steps) {
                return Err(format!("--steps {steps}: must be 1..={STEPS_MAX}"));
            }
            if steps == 1 {
                vec![from]
            } else {
                let ratio = (to / from).powf(1.0 / (steps - 1) as f64);
                (0..steps).map(|i| from * ratio.powi(i as i32)).collect()
            }
        }
    };
    Ok(rates.into_iter().map(|r| r.round().max(1.0)).collect())
}

/// How a sweep runs.
pub struct SweepSpec {
    pub base: RunSpec,
    pub rates: Vec<f64>,
    pub settle: std::time::Duration,
    pub threshold_ms: f64,
    pub past_knee: usize,
}

/// The sweep's outcome (`sweep.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SweepResult {
    pub started_utc: String,
    pub parameters: serde_json::Value,
    pub threshold_ms: f64,
    pub points: Vec<SweepPoint>,
    pub knee: Knee,
    pub steps: Vec<RunResult>,
}

/// Runs the steps; a failing step ends the sweep with the steps so far.
pub fn execute(spec: &SweepSpec, parameters: serde_json::Value) -> Result<SweepResult, String> {
    let mut result = SweepResult {
        started_utc: crate::report::utc_now(),
        parameters,
        threshold_ms: spec.threshold_ms,
        points: Vec::new(),
        knee: Knee::default(),
        steps: Vec::new(),
    };
    let mut bad_in_a_row = 0;
    for (index, rate) in spec.rates.iter().enumerate() {
        if crate::interrupted() {
            break;
        }
        if index > 0 {
            std::thread::sleep(spec.settle);
        }
        let mut step = spec.base.clone();
        step.plan.rate = *rate;
        step.command = format!("sweep step {}/{}", index + 1, spec.rates.len());
        eprintln!(
            "sweep: step {}/{} at {}/s",
            index + 1,
            spec.rates.len(),
            svg::short_number(*rate)
        );
        let run = match run::execute(&step, serde_json::Value::Null) {
            Ok(run) => run,
            Err(error) if result.steps.is_empty() => return Err(error),
            Err(error) => {
                eprintln!("sweep: step failed, stopping: {error}");
                break;
            }
        };
        let point = SweepPoint::of(&run);
        eprintln!(
            "sweep: {}/s offered -> {}/s achieved, p50 {} p99 {}, lost {}",
            svg::short_number(point.offered_per_s),
            svg::short_number(point.achieved_per_s.round()),
            point
                .p50_ms
                .map_or("-".to_string(), |v| format!("{v:.3} ms")),
            point
                .p99_ms
                .map_or("-".to_string(), |v| format!("{v:.3} ms")),
            point.lost
        );
        bad_in_a_row = if point.good(spec.threshold_ms) {
            0
        } else {
            bad_in_a_row + 1
        };
        result.points.push(point);
        result.steps.push(run);
        if spec.past_knee > 0 && bad_in_a_row >= spec.past_knee {
            eprintln!("sweep: {bad_in_a_row} steps in a row over the threshold or lossy; stopping");
            break;
        }
    }
    result.knee = find_knee(&result.points, spec.threshold_ms);
    Ok(result)
}

impl SweepResult {
    pub fn summary(&self) -> String {
        let mut out =
            String::from("sweep:\n  offered/s   achieved/s      p50 ms      p99 ms        lost\n");
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        for p in &self.points {
            out += &format!(
                "  {:>9}  {:>11.0}  {:>10}  {:>10}  {:>10}\n",
                svg::short_number(p.offered_per_s),
                p.achieved_per_s,
                ms(p.p50_ms),
                ms(p.p99_ms),
                p.lost
            );
        }
        match self.knee.sustainable_per_s {
            Some(rate) => {
                out += &format!(
                    "  sustainable rate: {rate:.0} events/s (highest achieved with p99 < {} ms and no loss)\n",
                    self.threshold_ms
                )
            }
            None => out += &format!("  sustainable rate: none (no step had p99 < {} ms and no loss)\n", self.threshold_ms),
        }
        if let Some(knee) = self.knee.knee_per_s {
            out += &format!(
                "  knee: p99 crosses {} ms at about {knee:.0} events/s\n",
                self.threshold_ms
            );
        } else {
            out += &format!(
                "  knee: p99 stayed under {} ms at every step\n",
                self.threshold_ms
            );
        }
        out
    }

    /// `sweep.svg`: p50/p99 against achieved throughput, threshold and knee marked.
    pub fn svg(&self, title: &str) -> String {
        let line = |f: &dyn Fn(&SweepPoint) -> Option<f64>| {
            self.points
                .iter()
                .map(|p| (p.achieved_per_s, f(p).unwrap_or(f64::NAN)))
                .collect::<Vec<_>>()
        };
        let mut rules = vec![Rule {
            at: self.threshold_ms,
            label: format!("p99 threshold {} ms", self.threshold_ms),
            color: "#7f7f7f",
            vertical: false,
        }];
        if let Some(knee) = self.knee.knee_per_s {
            rules.push(Rule {
                at: knee,
                label: format!("knee ≈ {}/s", svg::short_number(knee.round())),
                color: "#d62728",
                vertical: true,
            });
        }
        if let Some(rate) = self.knee.sustainable_per_s {
            rules.push(Rule {
                at: rate,
                label: format!("sustainable {}/s", svg::short_number(rate.round())),
                color: "#2ca02c",
                vertical: true,
            });
        }
        let panel = Panel {
            title: "Latency against achieved throughput".to_string(),
            x_label: "achieved throughput (events/s)".to_string(),
            y_label: "latency (ms, log scale)".to_string(),
            log_y: true,
            series: vec![
                Series {
                    name: "p99".to_string(),
                    color: "#d62728",
                    points: line(&|p| p.p99_ms),
                    dashed: false,
                    markers: true,
                },
                Series {
                    name: "p50".to_string(),
                    color: "#2ca02c",
                    points: line(&|p| p.p50_ms),
                    dashed: true,
                    markers: true,
                },
            ],
            rules,
        };
        let sustainable = self.knee.sustainable_per_s.map_or("none".to_string(), |r| {
            format!("{}/s", svg::short_number(r.round()))
        });
        svg::render(
            title,
            &format!(
                "sustainable rate {sustainable} (p99 < {} ms, no loss) · {} · started {}",
                self.threshold_ms,
                crate::machine::hostname(),
                self.started_utc
            ),
            &[panel],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(achieved: f64, p99: Option<f64>, lost: i64) -> SweepPoint {
        SweepPoint {
            offered_per_s: achieved,
            achieved_per_s: achieved,
            sent: 0,
            received: 0,
            lost,
            p50_ms: p99.map(|p| p / 2.0),
            p99_ms: p99,
            drops_counted: 0.0,
        }
    }

    #[test]
    fn knee_is_interpolated_between_the_crossing_steps() {
        let points = [
            point(100.0, Some(1.0), 0),
            point(200.0, Some(2.0), 0),
            point(400.0, Some(100.0), 0),
            point(500.0, Some(900.0), 10),
        ];
        let knee = find_knee(&points, 10.0);
        assert_eq!(knee.sustainable_per_s, Some(200.0));
        assert_eq!(knee.sustainable_step, Some(1));
        assert_eq!(knee.knee_step, Some(2));
        // log10(10/2) / log10(100/2) = 0.4114 of the way from 200 to 400.
        let at = knee.knee_per_s.unwrap();
        assert!((at - 282.27).abs() < 0.1, "{at}");
    }

    #[test]
    fn a_noisy_early_step_does_not_place_the_knee() {
        let points = [
            point(100.0, Some(6.0), 0),
            point(200.0, Some(1.0), 0),
            point(400.0, Some(50.0), 0),
        ];
        let knee = find_knee(&points, 4.0);
        assert_eq!(knee.sustainable_per_s, Some(200.0));
        assert_eq!(knee.knee_step, Some(2));
        let at = knee.knee_per_s.unwrap();
        assert!(at > 200.0 && at < 400.0, "{at}");
    }

    #[test]
    fn loss_disqualifies_and_no_crossing_means_no_knee() {
        let points = [
            point(100.0, Some(1.0), 0),
            point(200.0, Some(2.0), 5),
            point(300.0, Some(3.0), 0),
        ];
        let knee = find_knee(&points, 10.0);
        assert_eq!(knee.sustainable_per_s, Some(300.0));
        assert_eq!(knee.knee_step, None);
        assert_eq!(knee.knee_per_s, None);
    }

    #[test]
    fn first_step_over_or_nothing_measured() {
        let knee = find_knee(&[point(100.0, Some(50.0), 0)], 10.0);
        assert_eq!(
            (knee.sustainable_per_s, knee.knee_per_s),
            (None, Some(100.0))
        );
        assert_eq!(find_knee(&[point(100.0, None, 0)], 10.0), Knee::default());
        assert_eq!(find_knee(&[], 10.0), Knee::default());
    }

    #[test]
    fn rate_steps() {
        assert_eq!(
            rates(1000.0, 8000.0, Some(4), None).unwrap(),
            vec![1000.0, 2000.0, 4000.0, 8000.0]
        );
        assert_eq!(
            rates(1000.0, 5000.0, None, Some(2.0)).unwrap(),
            vec![1000.0, 2000.0, 4000.0]
        );
        assert_eq!(rates(10.0, 10.0, Some(1), None).unwrap(), vec![10.0]);
        assert!(rates(0.0, 1.0, None, None).is_err());
        assert!(rates(1.0, 2.0, Some(2), Some(2.0)).is_err());
        assert!(rates(1.0, 2.0, None, Some(1.0)).is_err());
    }

    #[test]
    fn sweep_svg_is_well_formed() {
        let points = vec![point(100.0, Some(1.0), 0), point(200.0, Some(20.0), 0)];
        let result = SweepResult {
            started_utc: "2024-11-25T00:00:00Z".to_string(),
            parameters: serde_json::Value::Null,
            threshold_ms: 10.0,
            knee: find_knee(&points, 10.0),
            points,
            steps: Vec::new(),
        };
        let doc = result.svg("sweep");
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert!(doc.contains("knee"));
        assert!(result.summary().contains("sustainable rate: 100 events/s"));
    }
}
