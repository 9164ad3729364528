//! Side-by-side benchmark suites: every comparison is a ratio measured in one run on one machine.
//!
//! One module per suite ([`ring`], [`doorbell`], [`scale`]); each exposes `run(&Settings) -> SuiteReport`,
//! its `comparisons()` (ratio + target) and one public function per case taking the CPU pair and
//! an iteration count. A new suite (`telemetry`, `vnet`) is a new module with the same shape plus
//! one line in the binary's suite list.
//!
//! Shared pieces: [`measure`] (calibration, repetition, median), [`pin`] (CPU pinning and the
//! two-thread start line), [`report`] (table and JSON lines, ratio/target verdicts),
//! [`plot`] (SVG charts of the same reports) and [`machine`] (the header's CPU model, core
//! count and kernel).

pub mod doorbell;
pub mod hosted;
pub mod kvm;
pub mod machine;
pub mod measure;
pub mod pin;
pub mod plot;
pub mod report;
pub mod ring;
pub mod scale;

pub use measure::{Measurement, Metric, Settings};
pub use report::SuiteReport;
