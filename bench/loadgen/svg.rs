//! Hand-written SVG charts: stacked panels of line series with labelled axes, "nice" ticks, an
//! optional log-scale y axis, reference lines and a legend. No plotting crate; the output is a
//! single self-contained `<svg>…</svg>` element that browsers and image viewers open directly.
//!
//! Invariants: the document starts with `<svg` and ends with `</svg>`; every text is escaped; a
//! NaN y value breaks a line rather than drawing through it; empty panels still draw their axes.

use std::fmt::Write;

const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 300.0;
const MARGIN_LEFT: f64 = 90.0;
const MARGIN_RIGHT: f64 = 30.0;
const MARGIN_TOP: f64 = 50.0;
const PANEL_GAP: f64 = 70.0;
const MARGIN_BOTTOM: f64 = 60.0;

/// A line of a panel.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    /// (x, y); a NaN y breaks the line.
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    pub markers: bool,
}

/// A horizontal (`Horizontal`) or vertical reference line with a label.
pub struct Rule {
    pub at: f64,
    pub label: String,
    pub color: &'static str,
    pub vertical: bool,
}

/// One chart panel.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub series: Vec<Series>,
    pub rules: Vec<Rule>,
}

/// Escapes text for SVG character data and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// A short label for a tick value: 1.5M, 200k, 12, 0.25.
pub fn short_number(value: f64) -> String {
    let magnitude = value.abs();
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if magnitude >= 1e9 {
        trim(format!("{:.2}", value / 1e9)) + "G"
    } else if magnitude >= 1e6 {
        trim(format!("{:.2}", value / 1e6)) + "M"
    } else if magnitude >= 1e3 {
        trim(format!("{:.2}", value / 1e3)) + "k"
    } else if magnitude >= 1.0 || magnitude == 0.0 {
        trim(format!("{value:.2}"))
    } else {
        trim(format!("{value:.4}"))
    }
}

/// Round tick values (1, 2 or 5 × 10^k apart) covering `[min, max]` with about `count` ticks.
pub fn nice_ticks(min: f64, max: f64, count: usize) -> Vec<f64> {
    assert!(count >= 2);
    if !min.is_finite() || !max.is_finite() || max <= min {
        return vec![min];
    }
    let raw = (max - min) / (count - 1) as f64;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    let first = (min / step).ceil() as i64;
    let last = (max / step + 1e-9).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

struct Scale {
    min: f64,
    max: f64,
    log: bool,
    from: f64,
    to: f64,
}

impl Scale {
    fn map(&self, value: f64) -> f64 {
        let (lo, hi, v) = if self.log {
            (
                self.min.log10(),
                self.max.log10(),
                value.max(self.min).log10(),
            )
        } else {
            (self.min, self.max, value)
        };
        self.from + (v - lo) / (hi - lo) * (self.to - self.from)
    }
}

/// The first round tick at or above `max × headroom`.
fn rounded_top(min: f64, max: f64, headroom: f64) -> f64 {
    let max = if max > min { max } else { min + 1.0 };
    let ticks = nice_ticks(min, max * headroom, 6);
    let step = if ticks.len() >= 2 {
        ticks[1] - ticks[0]
    } else {
        max - min
    };
    (max * headroom / step).ceil() * step
}

fn ranges(panel: &Panel) -> ((f64, f64), (f64, f64)) {
    let xs = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|y| y.is_finite() && (!panel.log_y || *y > 0.0));
    let mut x = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let mut y = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    for rule in &panel.rules {
        if rule.vertical {
            x = (x.0.min(rule.at), x.1.max(rule.at));
        } else if !panel.log_y || rule.at > 0.0 {
            y = (y.0.min(rule.at), y.1.max(rule.at));
        }
    }
    if !x.0.is_finite() {
        x = (0.0, 1.0);
    }
    x = (x.0.min(0.0), rounded_top(x.0.min(0.0), x.1, 1.0));
    if panel.log_y {
        if !y.0.is_finite() {
            y = (0.01, 1.0);
        }
        // Whole decades, with room above and below the data for the rules' labels.
        y = (
            10f64.powf((y.0 / 1.5).log10().floor()),
            10f64.powf((y.1 * 1.5).log10().ceil()),
        );
    } else {
        if !y.1.is_finite() || y.1 <= 0.0 {
            y.1 = 1.0;
        }
        y = (0.0, rounded_top(0.0, y.1, 1.05));
    }
    (x, y)
}

fn render_panel(out: &mut String, panel: &Panel, top: f64) {
    let (x_range, y_range) = ranges(panel);
    let (left, right, bottom) = (MARGIN_LEFT, WIDTH - MARGIN_RIGHT, top + PANEL_HEIGHT);
    let xs = Scale {
        min: x_range.0,
        max: x_range.1,
        log: false,
        from: left,
        to: right,
    };
    let ys = Scale {
        min: y_range.0,
        max: y_range.1,
        log: panel.log_y,
        from: bottom,
        to: top,
    };
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" font-size="15" font-weight="bold">{}</text>"##,
        left,
        top - 12.0,
        escape(&panel.title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{left:.1}" y="{top:.1}" width="{:.1}" height="{PANEL_HEIGHT:.1}" fill="#fcfcfc" stroke="#444"/>"##,
        right - left
    );
    // Grid and ticks.
    for tick in nice_ticks(x_range.0, x_range.1, 8) {
        let x = xs.map(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#e4e4e4"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            bottom + 16.0,
            short_number(tick)
        );
    }
    let y_ticks: Vec<f64> = if panel.log_y {
        let (lo, hi) = (
            y_range.0.log10().round() as i32,
            y_range.1.log10().round() as i32,
        );
        (lo..=hi).map(|p| 10f64.powi(p)).collect()
    } else {
        nice_ticks(y_range.0, y_range.1, 6)
    };
    for tick in y_ticks {
        let y = ys.map(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{left:.1}" y1="{y:.1}" x2="{right:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 6.0,
            y + 4.0,
            short_number(tick)
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
        (left + right) / 2.0,
        bottom + 38.0,
        escape(&panel.x_label)
    );
    let _ = writeln!(
        out,
        r##"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
        left - 62.0,
        (top + bottom) / 2.0,
        escape(&panel.y_label)
    );
    let mut verticals = 0;
    for rule in &panel.rules {
        let dash = r##"stroke-dasharray="6 4""##;
        if rule.vertical {
            let x = xs.map(rule.at);
            verticals += 1;
            // Labels near the right edge go on the rule's left.
            let (label_x, anchor) = if x > right - 160.0 {
                (x - 4.0, "end")
            } else {
                (x + 4.0, "start")
            };
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="{}" stroke-width="1.5" {dash}/><text x="{:.1}" y="{:.1}" text-anchor="{anchor}" fill="{}">{}</text>"##,
                rule.color,
                label_x,
                top + 16.0 * verticals as f64, // Stacked so that close rules stay legible.
                rule.color,
                escape(&rule.label)
            );
        } else {
            if panel.log_y && rule.at <= 0.0 {
                continue;
            }
            let y = ys.map(rule.at);
            let _ = writeln!(
                out,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{right:.1}" y2="{y:.1}" stroke="{}" stroke-width="1.5" {dash}/><text x="{:.1}" y="{:.1}" fill="{}">{}</text>"##,
                rule.color,
                left + 4.0,
                y - 4.0,
                rule.color,
                escape(&rule.label)
            );
        }
    }
    let mut any_point = false;
    for series in &panel.series {
        let dash = if series.dashed {
            r##" stroke-dasharray="5 3""##
        } else {
            ""
        };
        let mut line = String::new();
        let flush = |line: &mut String, out: &mut String| {
            if line.contains(' ') || series.points.len() == 1 {
                let _ = writeln!(
                    out,
                    r##"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"##,
                    series.color,
                    line.trim()
                );
            }
            line.clear();
        };
        for &(x, y) in &series.points {
            if !y.is_finite() || (panel.log_y && y <= 0.0) {
                flush(&mut line, out);
                continue;
            }
            any_point = true;
            let (px, py) = (xs.map(x), ys.map(y));
            let _ = write!(line, "{px:.1},{py:.1} ");
            if series.markers {
                let _ = writeln!(
                    out,
                    r##"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{}"/>"##,
                    series.color
                );
            }
        }
        flush(&mut line, out);
    }
    if !any_point {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#888">no data</text>"##,
            (left + right) / 2.0,
            (top + bottom) / 2.0
        );
    }
    // Legend: one row above the plot, right-aligned, so it never hides data.
    let entry_width = |s: &Series| 34.0 + 7.0 * s.name.chars().count() as f64 + 16.0;
    let mut x = right - panel.series.iter().map(entry_width).sum::<f64>();
    let y = top - 16.0;
    for series in &panel.series {
        let dash = if series.dashed {
            r##" stroke-dasharray="5 3""##
        } else {
            ""
        };
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"##,
            x + 26.0,
            series.color,
            x + 32.0,
            y + 4.0,
            escape(&series.name)
        );
        x += entry_width(series);
    }
}

/// A document of `panels` stacked vertically under `title`, with `footer` text at the bottom.
pub fn render(title: &str, footer: &str, panels: &[Panel]) -> String {
    let height = MARGIN_TOP + panels.len() as f64 * (PANEL_HEIGHT + PANEL_GAP) - PANEL_GAP
        + MARGIN_BOTTOM
        + 20.0;
    let mut out = String::with_capacity(16 * 1024);
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">"##
    );
    let _ = writeln!(out, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        out,
        r##"<text x="{MARGIN_LEFT}" y="22" font-size="17" font-weight="bold">{}</text>"##,
        escape(title)
    );
    for (index, panel) in panels.iter().enumerate() {
        let top = MARGIN_TOP + 20.0 + index as f64 * (PANEL_HEIGHT + PANEL_GAP);
        render_panel(&mut out, panel, top);
    }
    let _ = writeln!(
        out,
        r##"<text x="{MARGIN_LEFT}" y="{:.1}" fill="#666">{}</text>"##,
        height - 10.0,
        escape(footer)
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panel(log_y: bool, points: Vec<(f64, f64)>) -> Panel {
        Panel {
            title: "p99 <latency> & more".to_string(),
            x_label: "time (s)".to_string(),
            y_label: "ms".to_string(),
            log_y,
            series: vec![Series {
                name: "p99".to_string(),
                color: "#d62728",
                points,
                dashed: false,
                markers: true,
            }],
            rules: vec![Rule {
                at: 10.0,
                label: "threshold".to_string(),
                color: "#555",
                vertical: false,
            }],
        }
    }

    #[test]
    fn svg_is_well_formed() {
        let points = vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 30.0), (3.0, 0.2)];
        for doc in [
            render(
                "t",
                "f",
                &[panel(false, points.clone()), panel(true, points)],
            ),
            render("empty", "", &[panel(true, Vec::new())]),
        ] {
            assert!(doc.starts_with("<svg"));
            assert!(doc.trim_end().ends_with("</svg>"));
            assert!(!doc.contains("NaN") && !doc.contains("inf"));
            assert!(doc.contains("&lt;latency&gt; &amp; more"));
            assert_eq!(doc.matches("<svg").count(), 1);
            // Every opened element is closed or self-closing.
            let opened = doc.matches("<text").count();
            assert_eq!(opened, doc.matches("</text>").count());
        }
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 6),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        assert_eq!(nice_ticks(0.0, 1.0e6, 3), vec![0.0, 500_000.0, 1_000_000.0]);
        assert_eq!(nice_ticks(5.0, 5.0, 4), vec![5.0]);
        assert_eq!(short_number(1_500_000.0), "1.5M");
        assert_eq!(short_number(200_000.0), "200k");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(0.0), "0");
    }
}
