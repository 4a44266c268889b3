//! Figures and how they are shown: an aligned table on a terminal, JSON with
//! `--json` (one object per figure: scenario, metric, ours, baseline, ratio,
//! goal, met).

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// What a figure should reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// `ours / baseline` at least this (throughputs).
    RatioAtLeast(f64),
    /// `ours` at most this, in the figure's unit (latencies, lag, memory).
    AtMost(f64),
    /// No goal: reported for the record.
    Report,
}

impl Goal {
    fn describe(&self, unit: &str) -> Option<String> {
        match self {
            Self::RatioAtLeast(r) => Some(format!("ratio >= {r}")),
            Self::AtMost(v) => Some(format!("<= {} {unit}", number(*v))),
            Self::Report => None,
        }
    }
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub scenario: &'static str,
    pub metric: String,
    pub unit: &'static str,
    pub ours: Option<f64>,
    pub baseline: Option<f64>,
    /// What the baseline is.
    pub baseline_is: Option<String>,
    /// `ours / baseline`.
    pub ratio: Option<f64>,
    pub goal: Option<String>,
    /// `None` when there is no goal or nothing to compare.
    pub met: Option<bool>,
    pub note: Option<String>,
}

impl Figure {
    pub fn new(scenario: &'static str, metric: impl Into<String>, unit: &'static str) -> Self {
        Self {
            scenario,
            metric: metric.into(),
            unit,
            ours: None,
            baseline: None,
            baseline_is: None,
            ratio: None,
            goal: None,
            met: None,
            note: None,
        }
    }

    /// A scenario that could not run: one figure that says why.
    pub fn failed(scenario: &'static str, error: &str) -> Self {
        let mut figure = Self::new(scenario, "failed", "");
        figure.note = Some(error.to_owned());
        figure
    }

    pub fn ours(mut self, value: f64) -> Self {
        self.ours = Some(value);
        self
    }

    pub fn baseline(mut self, value: f64, what: impl Into<String>) -> Self {
        self.baseline = Some(value);
        self.baseline_is = Some(what.into());
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// Sets the goal and works out the ratio and whether the goal is met.
    pub fn goal(mut self, goal: Goal) -> Self {
        self.ratio = match (self.ours, self.baseline) {
            (Some(ours), Some(baseline)) if baseline > 0.0 => Some(ours / baseline),
            _ => None,
        };
        self.goal = goal.describe(self.unit);
        self.met = match goal {
            Goal::RatioAtLeast(r) => self.ratio.map(|ratio| ratio >= r),
            Goal::AtMost(limit) => self.ours.map(|ours| ours <= limit),
            Goal::Report => None,
        };
        self
    }
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub quick: bool,
    /// The S3 server the blobs went to.
    pub s3_server: String,
    pub cores: usize,
    pub seconds: f64,
    /// The 1-minute load average at the start and the end of the run: other
    /// work on the machine shows in every figure.
    pub load_average: [Option<f64>; 2],
    pub figures: Vec<Figure>,
}

/// The 1-minute load average (Linux), if it can be read.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Report {
    pub fn new(
        quick: bool,
        s3_server: String,
        mut figures: Vec<Figure>,
        took: Duration,
        load_at_start: Option<f64>,
    ) -> Self {
        for figure in &mut figures {
            // A ratio is computed when a goal is set; figures without one still
            // get theirs.
            if figure.ratio.is_none()
                && let (Some(ours), Some(baseline)) = (figure.ours, figure.baseline)
                && baseline > 0.0
            {
                figure.ratio = Some(ours / baseline);
            }
        }
        Self {
            quick,
            s3_server,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            seconds: took.as_secs_f64(),
            load_average: [load_at_start, load_average()],
            figures,
        }
    }

    /// The plain-text table, columns aligned, notes below.
    pub fn table(&self) -> String {
        let header = [
            "scenario", "metric", "ours", "baseline", "ratio", "goal", "met",
        ];
        let mut rows: Vec<[String; 7]> = Vec::new();
        let mut notes = Vec::new();
        for figure in &self.figures {
            let with_unit = |value: Option<f64>| match value {
                Some(v) => format!("{} {}", number(v), figure.unit),
                None => "-".to_owned(),
            };
            let mut metric = figure.metric.clone();
            if let Some(note) = &figure.note {
                notes.push(note.clone());
                metric.push_str(&format!(" [{}]", notes.len()));
            }
            rows.push([
                figure.scenario.to_owned(),
                metric,
                with_unit(figure.ours),
                with_unit(figure.baseline),
                figure
                    .ratio
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
                figure.goal.clone().unwrap_or_else(|| "report".to_owned()),
                match figure.met {
                    Some(true) => "yes".to_owned(),
                    Some(false) => "NO".to_owned(),
                    None => "-".to_owned(),
                },
            ]);
        }
        let mut widths = header.map(str::len);
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
                // Numbers right-aligned, words left-aligned.
                let numeric = (2..=4).contains(&i);
                let pad = width - cell.chars().count();
                if numeric {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                }
                out.push_str(if i + 1 < cells.len() { "  " } else { "\n" });
            }
        };
        line(&mut out, &header.map(str::to_owned));
        line(&mut out, &widths.map(|w| "-".repeat(w)));
        for row in &rows {
            line(&mut out, row);
        }
        let baselines: Vec<String> = {
            let mut seen = Vec::new();
            for figure in &self.figures {
                if let Some(what) = &figure.baseline_is {
                    let entry = format!("{}: {what}", figure.scenario);
                    if !seen.contains(&entry) {
                        seen.push(entry);
                    }
                }
            }
            seen
        };
        if !baselines.is_empty() {
            out.push_str("\nbaselines:\n");
            for baseline in baselines {
                let _ = writeln!(out, "  {baseline}");
            }
        }
        if !notes.is_empty() {
            out.push_str("\nnotes:\n");
            for (i, note) in notes.iter().enumerate() {
                let _ = writeln!(out, "  [{}] {note}", i + 1);
            }
        }
        let load = |value: Option<f64>| value.map_or_else(|| "?".to_owned(), |v| format!("{v:.1}"));
        let _ = writeln!(
            out,
            "\n{} run on {} cores in {:.0} s, S3 on {}; load average {} at the start, {} at the end",
            if self.quick { "quick" } else { "full" },
            self.cores,
            self.seconds,
            self.s3_server,
            load(self.load_average[0]),
            load(self.load_average[1]),
        );
        out
    }
}

/// Three significant digits, without exponents.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 || magnitude == 0.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_compute_ratio_and_met() {
        let f = Figure::new("s", "m", "MB/s")
            .ours(80.0)
            .baseline(100.0, "b")
            .goal(Goal::RatioAtLeast(0.8));
        assert_eq!(f.ratio, Some(0.8));
        assert_eq!(f.met, Some(true));
        let f = Figure::new("s", "m", "ms")
            .ours(12.0)
            .goal(Goal::AtMost(10.0));
        assert_eq!(f.met, Some(false));
        assert_eq!(f.goal.as_deref(), Some("<= 10.0 ms"));
        let f = Figure::new("s", "m", "x").goal(Goal::RatioAtLeast(0.5));
        assert_eq!(f.met, None);
    }

    #[test]
    fn the_table_is_aligned() {
        let report = Report::new(
            true,
            "s3s-fs in process".to_owned(),
            vec![
                Figure::new("upload", "MB/s, 1 at once", "MB/s")
                    .ours(123.4)
                    .baseline(200.0, "PutObject")
                    .goal(Goal::RatioAtLeast(0.8)),
                Figure::new("list", "p99", "ms").ours(3.0).note("a note"),
            ],
            Duration::from_secs(3),
            None,
        );
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0].len(), lines[1].len());
        assert!(lines[2].contains("0.62"), "{table}");
        assert!(table.contains("[1] a note"), "{table}");
    }
}
