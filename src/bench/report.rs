//! Results of a suite, their ratios against baselines with targets, and the two output forms:
//! a readable table and JSON lines (`suite`, `case`, `metric`, `value`, `unit`).

use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::Serialize;

use super::machine::Machine;
use super::measure::{Measurement, Metric};

/// A bound on a ratio `case / baseline`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// The ratio must not exceed this (latencies).
    AtMost(f64),
    /// The ratio must reach at least this (rates).
    AtLeast(f64),
}

impl Target {
    /// Whether `ratio` meets the target.
    pub fn is_met(self, ratio: f64) -> bool {
        match self {
            Target::AtMost(bound) => ratio <= bound,
            Target::AtLeast(bound) => ratio >= bound,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::AtMost(bound) => write!(f, "<= {bound:.2}x"),
            Target::AtLeast(bound) => write!(f, ">= {bound:.2}x"),
        }
    }
}

/// "`case` / `baseline`" for one metric, optionally with a target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// The measured case (numerator).
    pub case: &'static str,
    /// The reference case (denominator).
    pub baseline: &'static str,
    /// The metric both are compared on.
    pub metric: Metric,
    /// The goal, if this ratio has one (otherwise it is shown for information).
    pub target: Option<Target>,
}

/// One row of a suite: a measurement, or a case that cannot be measured (yet).
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// Measured: every run's value.
    Measured(Measurement),
    /// Not measured; shown in the table with the reason, left out of the JSON lines.
    NotAvailable {
        /// The case name.
        case: &'static str,
        /// The metric it would report.
        metric: Metric,
        /// Why it is missing (e.g. "not available yet: ...").
        reason: String,
    },
}

impl Entry {
    /// The case name.
    pub fn case(&self) -> &'static str {
        match self {
            Entry::Measured(m) => m.case,
            Entry::NotAvailable { case, .. } => case,
        }
    }

    /// The metric.
    pub fn metric(&self) -> Metric {
        match self {
            Entry::Measured(m) => m.metric,
            Entry::NotAvailable { metric, .. } => *metric,
        }
    }
}

/// Whether a ratio met its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The ratio meets its target.
    Met,
    /// The ratio misses its target.
    Missed,
    /// Informational ratio without a target.
    NoTarget,
    /// One side of the ratio was not measured.
    NotAvailable,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::NoTarget => "",
            Verdict::NotAvailable => "not available yet",
        })
    }
}

/// A computed ratio.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio {
    /// What is compared.
    pub comparison: Comparison,
    /// `case median / baseline median`, when both were measured.
    pub value: Option<f64>,
    /// The verdict against the target.
    pub verdict: Verdict,
}

/// Every individual value of one case (e.g. each sample's latency over all runs), for
/// distribution plots ([`crate::bench::plot`]); not part of the table or the JSON lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    /// The case name.
    pub case: &'static str,
    /// The metric the values are in (its unit; e.g. [`Metric::P50Ns`] for latencies in ns).
    pub metric: Metric,
    /// The values, in any order.
    pub values: Vec<f64>,
}

/// Everything one suite produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SuiteReport {
    /// Suite name (`ring`, `doorbell`, …).
    pub suite: &'static str,
    /// Rows in display order.
    pub entries: Vec<Entry>,
    /// Ratios to show under the rows.
    pub comparisons: Vec<Comparison>,
    /// How the cases are measured (shown under the table).
    pub notes: Vec<String>,
    /// Per-case value distributions for plots (may be empty).
    pub distributions: Vec<Distribution>,
    /// Also show the medians as a table with one row per case and one column per metric.
    pub columns: bool,
}

/// One JSON line.
#[derive(Debug, Serialize)]
pub struct JsonRow<'a> {
    /// Suite name.
    pub suite: &'a str,
    /// Case name.
    pub case: &'a str,
    /// Metric name.
    pub metric: &'a str,
    /// The median of the runs.
    pub value: f64,
    /// Unit of `value`.
    pub unit: &'a str,
}

impl SuiteReport {
    /// An empty report for `suite`.
    pub fn new(suite: &'static str) -> Self {
        SuiteReport {
            suite,
            entries: Vec::new(),
            comparisons: Vec::new(),
            notes: Vec::new(),
            distributions: Vec::new(),
            columns: false,
        }
    }

    /// The metrics measured, in order of first appearance.
    pub fn metrics(&self) -> Vec<Metric> {
        let mut metrics = Vec::new();
        for entry in &self.entries {
            if !metrics.contains(&entry.metric()) {
                metrics.push(entry.metric());
            }
        }
        metrics
    }

    /// The cases, in order of first appearance.
    pub fn cases(&self) -> Vec<&'static str> {
        let mut cases = Vec::new();
        for entry in &self.entries {
            if !cases.contains(&entry.case()) {
                cases.push(entry.case());
            }
        }
        cases
    }

    /// The median of (`case`, `metric`) if it was measured.
    pub fn value(&self, case: &str, metric: Metric) -> Option<f64> {
        self.entries.iter().find_map(|entry| match entry {
            Entry::Measured(m) if m.case == case && m.metric == metric => Some(m.median()),
            _ => None,
        })
    }

    /// Every comparison with its ratio and verdict.
    pub fn ratios(&self) -> Vec<Ratio> {
        self.comparisons
            .iter()
            .map(|&comparison| {
                let value = match (
                    self.value(comparison.case, comparison.metric),
                    self.value(comparison.baseline, comparison.metric),
                ) {
                    (Some(case), Some(baseline)) if baseline > 0.0 => Some(case / baseline),
                    _ => None,
                };
                let verdict = match (value, comparison.target) {
                    (None, _) => Verdict::NotAvailable,
                    (Some(_), None) => Verdict::NoTarget,
                    (Some(ratio), Some(target)) if target.is_met(ratio) => Verdict::Met,
                    (Some(_), Some(_)) => Verdict::Missed,
                };
                Ratio {
                    comparison,
                    value,
                    verdict,
                }
            })
            .collect()
    }

    /// One JSON object per measured row (cases that are not available are left out).
    pub fn json_lines(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter_map(|entry| match entry {
                Entry::Measured(m) => Some(
                    serde_json::to_string(&JsonRow {
                        suite: self.suite,
                        case: m.case,
                        metric: m.metric.name(),
                        value: m.median(),
                        unit: m.metric.unit(),
                    })
                    .expect("a row of strings and a number always serialises"),
                ),
                Entry::NotAvailable { .. } => None,
            })
            .collect()
    }
}

/// What the table header states about the run.
#[derive(Debug, Clone)]
pub struct Header {
    /// The machine.
    pub machine: Machine,
    /// `[measuring CPU, peer CPU]`.
    pub cpus: [usize; 2],
    /// Timed runs per case.
    pub runs: usize,
    /// Target duration of one run.
    pub run_time: Duration,
}

/// A value with a readable unit (`81.3 ns`, `12.41 M msg/s`, `6.20 GB/s`).
pub fn format_value(value: f64, metric: Metric) -> String {
    match metric {
        Metric::RttNs | Metric::P50Ns | Metric::P99Ns | Metric::Ns if value >= 10_000.0 => {
            format!("{:.2} us", value / 1e3)
        }
        Metric::RttNs | Metric::P50Ns | Metric::P99Ns | Metric::Ns => format!("{value:.1} ns"),
        Metric::MaxRatePerS if value >= 1e6 => format!("{:.2} M/s", value / 1e6),
        Metric::MaxRatePerS if value >= 1e3 => format!("{:.2} K/s", value / 1e3),
        Metric::MaxRatePerS => format!("{value:.0} /s"),
        Metric::MsgPerS if value >= 1e6 => format!("{:.2} M msg/s", value / 1e6),
        Metric::MsgPerS if value >= 1e3 => format!("{:.2} K msg/s", value / 1e3),
        Metric::MsgPerS => format!("{value:.0} msg/s"),
        Metric::BytesPerS if value >= 1e9 => format!("{:.2} GB/s", value / 1e9),
        Metric::BytesPerS if value >= 1e6 => format!("{:.2} MB/s", value / 1e6),
        Metric::BytesPerS => format!("{value:.0} B/s"),
        Metric::BitsPerS if value >= 1e9 => format!("{:.2} Gbit/s", value / 1e9),
        Metric::BitsPerS if value >= 1e6 => format!("{:.2} Mbit/s", value / 1e6),
        Metric::BitsPerS => format!("{value:.0} bit/s"),
        Metric::Bytes if value >= 1024.0 * 1024.0 => format!("{:.2} MiB", value / 1048576.0),
        Metric::Bytes if value >= 1024.0 => format!("{:.1} KiB", value / 1024.0),
        Metric::Bytes => format!("{value:.0} B"),
        Metric::Count => format!("{value:.0}"),
        Metric::IdleCpuPct => format!("{value:.1} %"),
    }
}

/// The readable table of all suites.
pub fn render_table(header: &Header, reports: &[SuiteReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "ivbench on {}", header.machine);
    let _ = writeln!(
        out,
        "pinned to CPUs {} (measuring side) and {} (peer); every value is the MEDIAN of {} runs of ~{} ms (min .. max shown)",
        header.cpus[0],
        header.cpus[1],
        header.runs,
        header.run_time.as_millis()
    );
    for report in reports {
        render_suite(&mut out, report);
    }
    out
}

fn render_suite(out: &mut String, report: &SuiteReport) {
    let case_width = report
        .entries
        .iter()
        .map(|e| e.case().len())
        .chain([4])
        .max()
        .unwrap_or(4);
    let _ = writeln!(out, "\n== suite {} ==", report.suite);
    let _ = writeln!(
        out,
        "  {:<case_width$}  {:<11}  {:>14}   runs min .. max",
        "case", "metric", "median"
    );
    for entry in &report.entries {
        match entry {
            Entry::Measured(m) => {
                let (min, max) = m.range();
                let _ = writeln!(
                    out,
                    "  {:<case_width$}  {:<11}  {:>14}   {} .. {}",
                    m.case,
                    m.metric.name(),
                    format_value(m.median(), m.metric),
                    format_value(min, m.metric),
                    format_value(max, m.metric),
                );
            }
            Entry::NotAvailable {
                case,
                metric,
                reason,
            } => {
                let _ = writeln!(
                    out,
                    "  {case:<case_width$}  {:<11}  {:>14}   {reason}",
                    metric.name(),
                    "n/a"
                );
            }
        }
    }
    if report.columns {
        render_columns(out, report, case_width);
    }
    let ratios = report.ratios();
    if !ratios.is_empty() {
        let labels: Vec<String> = ratios
            .iter()
            .map(|r| {
                format!(
                    "{} / {} ({})",
                    r.comparison.case,
                    r.comparison.baseline,
                    r.comparison.metric.name()
                )
            })
            .collect();
        let label_width = labels.iter().map(String::len).max().unwrap_or(5).max(5);
        let _ = writeln!(
            out,
            "  {:<label_width$}  {:>8}  {:<9}  verdict",
            "ratio", "value", "target"
        );
        for (ratio, label) in ratios.iter().zip(&labels) {
            let value = ratio
                .value
                .map_or_else(|| "n/a".to_string(), |v| format!("{v:.2}x"));
            let target = ratio
                .comparison
                .target
                .map_or_else(|| "-".to_string(), |t| t.to_string());
            let line = format!(
                "  {label:<label_width$}  {value:>8}  {target:<9}  {}",
                ratio.verdict
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    if !report.notes.is_empty() {
        let _ = writeln!(out, "  notes:");
        for note in &report.notes {
            let _ = writeln!(out, "  - {note}");
        }
    }
}

/// The medians again, one row per case and one column per metric (`-`: not measured).
fn render_columns(out: &mut String, report: &SuiteReport, case_width: usize) {
    let metrics = report.metrics();
    let width = metrics
        .iter()
        .map(|m| m.name().len())
        .chain([12])
        .max()
        .unwrap_or(12);
    let mut line = format!("  {:<case_width$}", "by case");
    for metric in &metrics {
        let _ = write!(line, "  {:>width$}", metric.name());
    }
    let _ = writeln!(out, "{line}");
    for case in report.cases() {
        let mut line = format!("  {case:<case_width$}");
        for &metric in &metrics {
            let cell = report
                .value(case, metric)
                .map_or_else(|| "-".to_string(), |v| format_value(v, metric));
            let _ = write!(line, "  {cell:>width$}");
        }
        let _ = writeln!(out, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(case: &'static str, metric: Metric, samples: &[f64]) -> Entry {
        Entry::Measured(Measurement {
            case,
            metric,
            samples: samples.to_vec(),
            iters: 100,
        })
    }

    fn sample_report() -> SuiteReport {
        SuiteReport {
            suite: "ring",
            entries: vec![
                measured("floor", Metric::RttNs, &[100.0, 90.0, 110.0]),
                measured("shmring", Metric::RttNs, &[140.0, 200.0, 130.0]),
                measured("shmring-64", Metric::MsgPerS, &[9e6]),
                measured("rtrb-64", Metric::MsgPerS, &[10e6]),
                Entry::NotAvailable {
                    case: "ivshmem",
                    metric: Metric::RttNs,
                    reason: "not available yet: needs the hosted endpoint".into(),
                },
            ],
            comparisons: vec![
                Comparison {
                    case: "shmring",
                    baseline: "floor",
                    metric: Metric::RttNs,
                    target: Some(Target::AtMost(1.5)),
                },
                Comparison {
                    case: "shmring-64",
                    baseline: "rtrb-64",
                    metric: Metric::MsgPerS,
                    target: Some(Target::AtLeast(1.0)),
                },
                Comparison {
                    case: "rtrb-64",
                    baseline: "shmring-64",
                    metric: Metric::MsgPerS,
                    target: None,
                },
                Comparison {
                    case: "ivshmem",
                    baseline: "floor",
                    metric: Metric::RttNs,
                    target: Some(Target::AtMost(1.3)),
                },
            ],
            notes: vec!["floor is a bare cache-line ping-pong".into()],
            distributions: Vec::new(),
            columns: false,
        }
    }

    #[test]
    fn columns_show_one_row_per_case_and_a_dash_where_unmeasured() {
        let mut report = SuiteReport::new("telemetry");
        report.columns = true;
        report.entries = vec![
            measured("ivshmem-hybrid", Metric::P50Ns, &[900.0]),
            measured("ivshmem-hybrid", Metric::IdleCpuPct, &[0.4]),
            measured("uds", Metric::P50Ns, &[20_000.0]),
        ];
        let header = Header {
            machine: Machine::from_cpuinfo("processor : 0\nmodel name : Test CPU\n", "6.1".into()),
            cpus: [0, 1],
            runs: 1,
            run_time: Duration::from_millis(100),
        };
        let table = render_table(&header, &[report]);
        let head = table.lines().find(|l| l.contains("by case")).unwrap();
        assert!(
            head.contains("p50_ns") && head.contains("idle_cpu_pct"),
            "{head}"
        );
        let hybrid = table
            .lines()
            .rfind(|l| l.trim_start().starts_with("ivshmem-hybrid"))
            .unwrap();
        assert!(
            hybrid.contains("900.0 ns") && hybrid.contains("0.4 %"),
            "{hybrid}"
        );
        let uds = table
            .lines()
            .rfind(|l| l.trim_start().starts_with("uds"))
            .unwrap();
        assert!(
            uds.contains("20.00 us") && uds.trim_end().ends_with('-'),
            "{uds}"
        );
    }

    #[test]
    fn targets_compare_in_the_right_direction() {
        assert!(Target::AtMost(1.5).is_met(1.5));
        assert!(!Target::AtMost(1.5).is_met(1.51));
        assert!(Target::AtLeast(0.8).is_met(0.8));
        assert!(!Target::AtLeast(0.8).is_met(0.79));
        assert_eq!(Target::AtMost(1.3).to_string(), "<= 1.30x");
        assert_eq!(Target::AtLeast(1.0).to_string(), ">= 1.00x");
    }

    #[test]
    fn ratios_use_medians_and_give_verdicts() {
        let ratios = sample_report().ratios();
        assert_eq!(ratios[0].value, Some(1.4)); // 140 / 100
        assert_eq!(ratios[0].verdict, Verdict::Met);
        assert_eq!(ratios[1].value, Some(0.9));
        assert_eq!(ratios[1].verdict, Verdict::Missed);
        assert_eq!(ratios[2].verdict, Verdict::NoTarget);
        assert_eq!(ratios[3].value, None);
        assert_eq!(ratios[3].verdict, Verdict::NotAvailable);
    }

    #[test]
    fn json_lines_have_exactly_the_five_fields() {
        let lines = sample_report().json_lines();
        assert_eq!(lines.len(), 4, "the unavailable case is left out");
        assert_eq!(
            lines[0],
            r#"{"suite":"ring","case":"floor","metric":"rtt_ns","value":100.0,"unit":"ns"}"#
        );
        for line in &lines {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            let object = value.as_object().unwrap();
            let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(keys, ["case", "metric", "suite", "unit", "value"]);
        }
        assert!(lines[2].contains(r#""unit":"msg/s""#));
    }

    #[test]
    fn values_get_readable_units() {
        assert_eq!(format_value(81.26, Metric::RttNs), "81.3 ns");
        assert_eq!(format_value(12_345.0, Metric::RttNs), "12.35 us");
        assert_eq!(format_value(12.41e6, Metric::MsgPerS), "12.41 M msg/s");
        assert_eq!(format_value(950.0e3, Metric::MsgPerS), "950.00 K msg/s");
        assert_eq!(format_value(6.2e9, Metric::BytesPerS), "6.20 GB/s");
        assert_eq!(format_value(512.0e6, Metric::BytesPerS), "512.00 MB/s");
    }

    #[test]
    fn table_shows_machine_medians_ratios_and_verdicts() {
        let header = Header {
            machine: Machine::from_cpuinfo("processor : 0\nmodel name : Test CPU\n", "6.1".into()),
            cpus: [0, 1],
            runs: 3,
            run_time: Duration::from_millis(100),
        };
        let table = render_table(&header, &[sample_report()]);
        assert!(
            table.starts_with("ivbench on Test CPU, 1 logical CPUs, Linux 6.1\n"),
            "{table}"
        );
        assert!(table.contains("MEDIAN of 3 runs"), "{table}");
        assert!(table.contains("== suite ring =="), "{table}");
        let floor = table
            .lines()
            .find(|l| l.trim_start().starts_with("floor"))
            .unwrap();
        assert!(
            floor.contains("100.0 ns") && floor.contains("90.0 ns .. 110.0 ns"),
            "{floor}"
        );
        let ratio = table
            .lines()
            .find(|l| l.contains("shmring / floor (rtt_ns)"))
            .unwrap();
        assert!(
            ratio.contains("1.40x") && ratio.contains("<= 1.50x") && ratio.ends_with("met"),
            "{ratio}"
        );
        let missed = table
            .lines()
            .find(|l| l.contains("shmring-64 / rtrb-64"))
            .unwrap();
        assert!(
            missed.contains("0.90x") && missed.ends_with("MISSED"),
            "{missed}"
        );
        let ivshmem = table
            .lines()
            .find(|l| l.trim_start().starts_with("ivshmem "))
            .unwrap();
        assert!(
            ivshmem.contains("n/a") && ivshmem.contains("not available yet"),
            "{ivshmem}"
        );
        let ivshmem_ratio = table
            .lines()
            .find(|l| l.contains("ivshmem / floor"))
            .unwrap();
        assert!(
            ivshmem_ratio.ends_with("not available yet"),
            "{ivshmem_ratio}"
        );
        assert!(
            table.contains("  - floor is a bare cache-line ping-pong"),
            "{table}"
        );
    }
}
