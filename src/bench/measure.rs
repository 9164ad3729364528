//! Calibration, repetition and the median: how every case turns timed runs into one figure.

use std::fmt::Display;
use std::time::Duration;

use anyhow::{ensure, Result};

/// What a case reports; the names are the `metric` field of the JSON lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Round-trip time in nanoseconds (lower is better).
    RttNs,
    /// Messages per second (higher is better).
    MsgPerS,
    /// Bytes per second (higher is better).
    BytesPerS,
    /// One-way latency, median of the samples, in nanoseconds (lower is better).
    P50Ns,
    /// One-way latency, 99th percentile, in nanoseconds (lower is better).
    P99Ns,
    /// Highest sustained rate of records per second (higher is better).
    MaxRatePerS,
    /// Bits per second (higher is better).
    BitsPerS,
    /// Time per operation in nanoseconds, for costs that are not round trips (lower is
    /// better).
    Ns,
    /// A size in bytes, e.g. resident memory (lower is better; not a timed metric).
    Bytes,
    /// A number of things, e.g. open fds (lower is better; not a timed metric).
    Count,
    /// CPU time of a waiting side while its link is idle, in percent of one core (getrusage;
    /// lower is better).
    IdleCpuPct,
}

impl Metric {
    /// The metric's name in reports (`rtt_ns`, `msg_per_s`, `bytes_per_s`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::RttNs => "rtt_ns",
            Metric::MsgPerS => "msg_per_s",
            Metric::BytesPerS => "bytes_per_s",
            Metric::P50Ns => "p50_ns",
            Metric::P99Ns => "p99_ns",
            Metric::MaxRatePerS => "max_rate_per_s",
            Metric::BitsPerS => "bits_per_s",
            Metric::Ns => "ns",
            Metric::Bytes => "bytes",
            Metric::Count => "count",
            Metric::IdleCpuPct => "idle_cpu_pct",
        }
    }

    /// The unit of the value (`ns`, `msg/s`, `B/s`).
    pub fn unit(self) -> &'static str {
        match self {
            Metric::RttNs => "ns",
            Metric::MsgPerS => "msg/s",
            Metric::BytesPerS => "B/s",
            Metric::P50Ns | Metric::P99Ns => "ns",
            Metric::MaxRatePerS => "1/s",
            Metric::BitsPerS => "bit/s",
            Metric::Ns => "ns",
            Metric::Bytes => "B",
            Metric::Count => "1",
            Metric::IdleCpuPct => "%",
        }
    }

    /// Whether a larger value is the better one.
    pub fn higher_is_better(self) -> bool {
        !matches!(
            self,
            Metric::RttNs
                | Metric::P50Ns
                | Metric::P99Ns
                | Metric::Ns
                | Metric::Bytes
                | Metric::Count
                | Metric::IdleCpuPct
        )
    }

    /// Converts one timed run of `iters` iterations (each moving `bytes_per_iter` bytes) into
    /// this metric's value. `Bytes` and `Count` are not timed: their value is `iters`.
    pub fn value(self, elapsed: Duration, iters: u64, bytes_per_iter: u64) -> f64 {
        let secs = elapsed.as_secs_f64().max(1e-12);
        match self {
            Metric::RttNs | Metric::P50Ns | Metric::P99Ns | Metric::Ns => secs * 1e9 / iters as f64,
            Metric::MsgPerS | Metric::MaxRatePerS => iters as f64 / secs,
            Metric::BytesPerS => (iters as f64) * (bytes_per_iter as f64) / secs,
            Metric::BitsPerS => (iters as f64) * (bytes_per_iter as f64) * 8.0 / secs,
            Metric::Bytes | Metric::Count => iters as f64,
            // `iters` ns of CPU time over `elapsed`.
            Metric::IdleCpuPct => iters as f64 / 1e9 / secs * 100.0,
        }
    }
}

/// How long and how often each case is measured, and on which two CPUs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `[measuring CPU, peer CPU]`: the timing thread (consumer / pinger / parent process) runs on
    /// the first, the other side on the second.
    pub cpus: [usize; 2],
    /// Timed runs per case; the report shows their median.
    pub runs: usize,
    /// Target duration of one timed run (iteration counts are calibrated to it).
    pub run_time: Duration,
    /// Iterations of the first calibration run (and the minimum of every run).
    pub min_iters: u64,
    /// Print progress lines to stderr.
    pub progress: bool,
}

impl Settings {
    /// `--quick`: 3 runs of about 100 ms per case (the ring suite takes well under 10 s).
    pub fn quick(cpus: [usize; 2]) -> Self {
        Settings {
            cpus,
            runs: 3,
            run_time: Duration::from_millis(100),
            min_iters: 64,
            progress: true,
        }
    }

    /// The full run: 7 runs of about 500 ms per case (about a minute for the ring suite).
    pub fn full(cpus: [usize; 2]) -> Self {
        Settings {
            cpus,
            runs: 7,
            run_time: Duration::from_millis(500),
            min_iters: 64,
            progress: true,
        }
    }

    /// Functional checks (tests): one run of `iters` iterations, no calibration, no progress.
    pub fn tiny(cpus: [usize; 2], iters: u64) -> Self {
        Settings {
            cpus,
            runs: 1,
            run_time: Duration::ZERO,
            min_iters: iters,
            progress: false,
        }
    }

    /// Prints a progress line to stderr when progress is on.
    pub fn say(&self, message: impl Display) {
        if self.progress {
            eprintln!("ivbench: {message}");
        }
    }
}

/// One measured case: the value of every timed run; reports use the median.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The case name (`floor`, `shmring-64`, …).
    pub case: &'static str,
    /// What was measured.
    pub metric: Metric,
    /// One value per timed run, in run order.
    pub samples: Vec<f64>,
    /// Iterations per timed run after calibration.
    pub iters: u64,
}

impl Measurement {
    /// The median of the runs.
    pub fn median(&self) -> f64 {
        median(&self.samples).unwrap_or(f64::NAN)
    }

    /// The smallest and largest run value.
    pub fn range(&self) -> (f64, f64) {
        let min = self.samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self
            .samples
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    }
}

/// The median of `values` (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// Largest iteration count a calibration may choose.
const MAX_ITERS: u64 = 1 << 34;

/// Measures one case: calibrates the iteration count so one run lasts about
/// `settings.run_time` (the calibration runs double as warm-up), then times `settings.runs`
/// runs. `run(iters)` must do `iters` iterations and return the time of the timed part only.
pub fn measure(
    settings: &Settings,
    case: &'static str,
    metric: Metric,
    bytes_per_iter: u64,
    mut run: impl FnMut(u64) -> Result<Duration>,
) -> Result<Measurement> {
    ensure!(settings.runs > 0, "at least one run per case is needed");
    let mut iters = settings.min_iters.max(1);
    if !settings.run_time.is_zero() {
        loop {
            let elapsed = run(iters)?;
            if elapsed >= settings.run_time / 8 || iters >= MAX_ITERS {
                iters = scale_iters(iters, elapsed, settings.run_time, settings.min_iters);
                break;
            }
            iters = iters.saturating_mul(8).min(MAX_ITERS);
        }
    }
    let mut samples = Vec::with_capacity(settings.runs);
    for _ in 0..settings.runs {
        let elapsed = run(iters)?;
        samples.push(metric.value(elapsed, iters, bytes_per_iter));
    }
    Ok(Measurement {
        case,
        metric,
        samples,
        iters,
    })
}

/// The iteration count that makes a run of `iters` that took `elapsed` last about `target`.
pub fn scale_iters(iters: u64, elapsed: Duration, target: Duration, min_iters: u64) -> u64 {
    let elapsed_ns = elapsed.as_nanos().max(1);
    let scaled = u128::from(iters) * target.as_nanos() / elapsed_ns;
    (scaled.min(u128::from(MAX_ITERS)) as u64).max(min_iters.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[9.0, 1.0, 5.0]), Some(5.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn metric_values_from_a_timed_run() {
        let second = Duration::from_secs(1);
        assert_eq!(Metric::RttNs.value(second, 1000, 0), 1e6);
        assert_eq!(Metric::MsgPerS.value(second / 2, 1000, 0), 2000.0);
        assert_eq!(Metric::BytesPerS.value(second, 10, 65536), 655_360.0);
        assert!(!Metric::RttNs.higher_is_better());
        assert!(Metric::BytesPerS.higher_is_better());
    }

    #[test]
    fn calibration_scales_to_the_target_duration() {
        let ms = Duration::from_millis(1);
        assert_eq!(scale_iters(100, ms, 10 * ms, 1), 1000);
        assert_eq!(scale_iters(100, 10 * ms, ms, 64), 64);
    }

    #[test]
    fn measure_runs_calibration_then_the_requested_runs() {
        let mut calls = Vec::new();
        let settings = Settings {
            cpus: [0, 1],
            runs: 3,
            run_time: Duration::from_millis(80),
            min_iters: 10,
            progress: false,
        };
        // Pretend each iteration takes 1 µs.
        let m = measure(&settings, "fake", Metric::RttNs, 0, |iters| {
            calls.push(iters);
            Ok(Duration::from_micros(iters))
        })
        .unwrap();
        // 10 (1 µs: too short) -> 80 -> 640 -> 5120 -> 40960 (41 ms >= 10 ms) -> 80000 x 3.
        assert_eq!(calls, vec![10, 80, 640, 5120, 40960, 80000, 80000, 80000]);
        assert_eq!(m.iters, 80000);
        assert_eq!(m.samples, vec![1000.0; 3]);
        assert_eq!(m.median(), 1000.0);
    }

    #[test]
    fn tiny_settings_skip_calibration() {
        let mut calls = Vec::new();
        let m = measure(&Settings::tiny([0, 1], 5), "x", Metric::MsgPerS, 0, |i| {
            calls.push(i);
            Ok(Duration::from_millis(1))
        })
        .unwrap();
        assert_eq!(calls, vec![5]);
        assert_eq!(m.samples, vec![5000.0]);
    }
}

/// One-way latencies of a stream of timestamped records (the telemetry pipes: `telemetry`
/// suite, `telemetry-*` rows of `kvm`): each record's receipt time minus its timestamp, and
/// the first and last receipt times, all in ns of one clock.
#[derive(Debug, Clone, Default)]
pub struct OneWayRun {
    /// One latency per record, in receipt order (sorted by [`OneWayRun::percentile`]).
    pub latencies_ns: Vec<u64>,
    /// Receipt time of the first record.
    pub first_ns: u64,
    /// Receipt time of the last record.
    pub last_ns: u64,
    /// The consumer's CPU use while the link was idle, in percent of one core (measured by
    /// the in-process ivshmem paced runs only).
    pub idle_cpu_pct: Option<f64>,
}

impl OneWayRun {
    /// The `q` quantile (0..=1) of the latencies (nearest rank), NaN without records.
    pub fn percentile(&mut self, q: f64) -> f64 {
        self.latencies_ns.sort_unstable();
        let n = self.latencies_ns.len();
        if n == 0 {
            return f64::NAN;
        }
        let i = ((n as f64 * q).ceil() as usize).clamp(1, n) - 1;
        self.latencies_ns[i] as f64
    }

    /// Records per second from the first to the last receipt, NaN if they coincide.
    pub fn rate(&self) -> f64 {
        let n = self.latencies_ns.len() as f64;
        let secs = (self.last_ns.saturating_sub(self.first_ns)) as f64 / 1e9;
        if secs <= 0.0 {
            return f64::NAN;
        }
        (n - 1.0) / secs
    }
}
