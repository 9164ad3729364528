//! SVG charts of suite reports (`ivbench --plot DIR`), drawn with `plotters` (SVG backend only,
//! no font files: text is laid out with plotters' built-in size estimate).
//!
//! For every suite:
//! - `SUITE-METRIC.svg` for each metric it measured: one horizontal bar per case (the median of
//!   the runs), labelled with the value and its ratio to the metric's baseline (the baseline
//!   of the suite's first comparison on that metric, else the first case);
//! - `SUITE-latency-cdf.svg` when the suite kept per-sample values
//!   ([`SuiteReport::distributions`]): the empirical CDF of each case, latency on a log axis.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::measure::Metric;
use super::report::{format_value, Distribution, SuiteReport};

/// Chart size in pixels.
const WIDTH: u32 = 900;
/// Height of one bar (the chart grows with the number of cases).
const BAR_HEIGHT: u32 = 34;
/// Points per CDF line (quantiles evenly spaced in probability).
const CDF_POINTS: usize = 400;

/// Writes every chart of `reports` into `dir` (created if missing); returns the files written.
pub fn write_plots(dir: &Path, reports: &[SuiteReport]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for report in reports {
        for metric in report.metrics() {
            let path = dir.join(format!("{}-{}.svg", report.suite, metric.name()));
            if bar_chart(&path, report, metric)
                .with_context(|| format!("drawing {}", path.display()))?
            {
                written.push(path);
            }
        }
        let latencies: Vec<&Distribution> = report
            .distributions
            .iter()
            .filter(|d| !d.values.is_empty())
            .collect();
        if !latencies.is_empty() {
            let path = dir.join(format!("{}-latency-cdf.svg", report.suite));
            cdf_chart(&path, report.suite, &latencies)
                .with_context(|| format!("drawing {}", path.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The baseline for `metric`'s ratios: the first comparison's baseline on that metric if it
/// was measured, else the first measured case.
fn baseline(report: &SuiteReport, metric: Metric) -> Option<(&'static str, f64)> {
    report
        .comparisons
        .iter()
        .filter(|c| c.metric == metric)
        .find_map(|c| Some((c.baseline, report.value(c.baseline, metric)?)))
        .or_else(|| {
            report
                .cases()
                .into_iter()
                .find_map(|case| Some((case, report.value(case, metric)?)))
        })
}

/// Converts a plotters drawing error (which borrows the backend's error type) into anyhow.
fn drawing<E: std::error::Error + Send + Sync + 'static>(
    e: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Horizontal bars of the medians of `metric`; `false` (nothing written) if no case has it.
fn bar_chart(path: &Path, report: &SuiteReport, metric: Metric) -> Result<bool> {
    let bars: Vec<(&str, f64)> = report
        .cases()
        .into_iter()
        .filter_map(|case| Some((case, report.value(case, metric)?)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    if bars.is_empty() {
        return Ok(false);
    }
    let base = baseline(report, metric);
    let max = bars.iter().map(|&(_, v)| v).fold(0.0, f64::max);
    let x_max = if max > 0.0 { max * 1.45 } else { 1.0 };
    let n = bars.len();
    let height = 110 + BAR_HEIGHT * n as u32;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let better = if metric.higher_is_better() {
        "higher is better"
    } else {
        "lower is better"
    };
    let caption = format!(
        "{}: {} ({}; median of runs)",
        report.suite,
        metric.name(),
        better
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(10)
        .build_cartesian_2d(0.0..x_max, 0.0..n as f64)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc(metric.unit())
        .x_label_formatter(&|v| format_value(*v, metric))
        .x_labels(6)
        .draw()
        .map_err(drawing)?;
    for (i, &(case, value)) in bars.iter().enumerate() {
        // Top to bottom in report order.
        let y = (n - 1 - i) as f64;
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, y + 0.15), (value, y + 0.85)],
                color.mix(0.75).filled(),
            )))
            .map_err(drawing)?;
        let ratio = match base {
            Some((name, b)) if b > 0.0 && name != case => {
                format!("  ({:.2}x {name})", value / b)
            }
            Some((name, _)) if name == case => "  (baseline)".to_string(),
            _ => String::new(),
        };
        let label = format!("{case}: {}{ratio}", format_value(value, metric));
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (value + x_max * 0.01, y + 0.62),
                ("sans-serif", 14).into_font(),
            )))
            .map_err(drawing)?;
    }
    root.present().map_err(drawing)?;
    Ok(true)
}

/// `CDF_POINTS` (value, fraction) points of the empirical CDF of `values`.
fn cdf_points(values: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let points = CDF_POINTS.min(n);
    (1..=points)
        .map(|k| {
            let i = (k * n).div_ceil(points) - 1;
            (sorted[i], (i + 1) as f64 / n as f64)
        })
        .collect()
}

/// One CDF line per case, latency (ns) on a log axis.
fn cdf_chart(path: &Path, suite: &str, cases: &[&Distribution]) -> Result<()> {
    let lines: Vec<(&str, Vec<(f64, f64)>)> = cases
        .iter()
        .map(|d| (d.case, cdf_points(&d.values)))
        .collect();
    let positive = || {
        lines
            .iter()
            .flat_map(|(_, pts)| pts.iter().map(|&(v, _)| v))
            .filter(|&v| v > 0.0)
    };
    let lo = positive().fold(f64::INFINITY, f64::min);
    let hi = positive().fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo * 0.8, hi * 1.25)
    } else {
        (1.0, 10.0)
    };
    let metric = cases[0].metric;
    let root = SVGBackend::new(path, (WIDTH, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{suite}: latency distribution (CDF per case)"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .x_desc("latency (log scale)")
        .y_desc("fraction of samples <= x")
        .x_label_formatter(&|v| format_value(*v, metric))
        .draw()
        .map_err(drawing)?;
    for (i, (case, points)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.into_iter().filter(|&(v, _)| v > 0.0),
                color.stroke_width(2),
            ))
            .map_err(drawing)?
            .label(case)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(drawing)?;
    root.present().map_err(drawing)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{Comparison, Entry};
    use crate::bench::Measurement;

    fn report() -> SuiteReport {
        let mut report = SuiteReport::new("demo");
        for (case, p50, rate) in [("ring", 800.0, 4e6), ("uds", 16_000.0, 1e6)] {
            report.entries.push(Entry::Measured(Measurement {
                case,
                metric: Metric::P50Ns,
                samples: vec![p50],
                iters: 1,
            }));
            report.entries.push(Entry::Measured(Measurement {
                case,
                metric: Metric::MaxRatePerS,
                samples: vec![rate],
                iters: 1,
            }));
            report.distributions.push(Distribution {
                case,
                metric: Metric::P50Ns,
                values: (1..=1000)
                    .map(|i| p50 * (0.5 + i as f64 / 1000.0))
                    .collect(),
            });
        }
        report.comparisons.push(Comparison {
            case: "ring",
            baseline: "uds",
            metric: Metric::MaxRatePerS,
            target: None,
        });
        report
    }

    #[test]
    fn cdf_points_are_monotonic_and_end_at_one() {
        let values: Vec<f64> = (0..10_000).rev().map(f64::from).collect();
        let points = cdf_points(&values);
        assert_eq!(points.len(), CDF_POINTS);
        assert!(points
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert_eq!(points.last().unwrap(), &(9999.0, 1.0));
        assert_eq!(cdf_points(&[5.0]), vec![(5.0, 1.0)]);
        assert!(cdf_points(&[]).is_empty());
    }

    #[test]
    fn writes_bars_with_ratios_and_a_cdf_per_suite() {
        let dir = std::env::temp_dir().join(format!("ivbench-plot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written = write_plots(&dir, &[report()]).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "demo-p50_ns.svg",
                "demo-max_rate_per_s.svg",
                "demo-latency-cdf.svg"
            ]
        );
        let bars = std::fs::read_to_string(dir.join("demo-max_rate_per_s.svg")).unwrap();
        assert!(bars.starts_with("<svg"), "{bars}");
        assert!(bars.contains("ring: 4.00 M/s  (4.00x uds)"), "{bars}");
        assert!(bars.contains("uds: 1.00 M/s  (baseline)"), "{bars}");
        // Without a comparison on p50, the first case is the baseline.
        let p50 = std::fs::read_to_string(dir.join("demo-p50_ns.svg")).unwrap();
        assert!(p50.contains("uds: 16.00 us  (20.00x ring)"), "{p50}");
        let cdf = std::fs::read_to_string(dir.join("demo-latency-cdf.svg")).unwrap();
        assert!(
            cdf.contains("\nring\n</text>") && cdf.contains("\nuds\n</text>"),
            "legend: {cdf}"
        );
        assert!(cdf.contains("<polyline"), "lines: {cdf}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
