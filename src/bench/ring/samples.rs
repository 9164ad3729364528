//! Latency samples of the round-trip cases, for the CDFs of `ivbench ring --plot DIR`.
//!
//! Reading the clock around every round trip would cost about as much as the round trip it
//! measures (a clock read is ~20 ns here, the floor ~50 ns), so the timing side reads it once
//! per [`BATCH`] round trips and records their mean. The samples show how round trips vary
//! within a run and between runs (e.g. the two states some queues flip between on this VM),
//! not a single slow round trip hidden inside a batch.
//!
//! Sampling is off in the timed runs (the clock then costs one predictable branch per round
//! trip); [`sampled`] turns it on for one extra run of a case.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Result;

/// Round trips per sample.
pub const BATCH: u64 = 32;

/// The samples of the run in progress; `None` while not sampling.
static SAMPLES: Mutex<Option<Vec<f64>>> = Mutex::new(None);

/// Runs `case` (one run of a round-trip case) with sampling on; returns the mean round trip of
/// every [`BATCH`] round trips of the timing side, in ns.
pub fn sampled(case: impl FnOnce() -> Result<Duration>) -> Result<Vec<f64>> {
    *lock() = Some(Vec::new());
    let run = case();
    let samples = lock().take().unwrap_or_default();
    run.map(|_| samples)
}

fn lock() -> std::sync::MutexGuard<'static, Option<Vec<f64>>> {
    // A panic while holding the lock leaves nothing half-written worth refusing.
    SAMPLES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The timing side's clock: inert unless [`sampled`] is running.
pub(crate) struct SampleClock {
    /// Samples of this run; `None`: not sampling.
    values: Option<Vec<f64>>,
    /// When the current batch started.
    batch_start: Instant,
}

impl SampleClock {
    /// Starts the clock for a run of `iters` round trips (call it right before the first).
    pub fn start(iters: u64) -> Self {
        let values = lock()
            .is_some()
            .then(|| Vec::with_capacity((iters / BATCH) as usize));
        SampleClock {
            values,
            batch_start: Instant::now(),
        }
    }

    /// Call after round trip `done` (counting from 1) completed.
    #[inline(always)]
    pub fn tick(&mut self, done: u64) {
        if let Some(values) = &mut self.values {
            if done.is_multiple_of(BATCH) {
                let now = Instant::now();
                values.push((now - self.batch_start).as_nanos() as f64 / BATCH as f64);
                self.batch_start = now;
            }
        }
    }

    /// Hands this run's samples to [`sampled`].
    pub fn finish(self) {
        if let Some(values) = self.values {
            if let Some(all) = lock().as_mut() {
                all.extend(values);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampling switch is process-wide: these tests take turns.
    static TURN: Mutex<()> = Mutex::new(());

    #[test]
    fn samples_only_while_sampling_and_one_per_batch() {
        let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        let mut idle = SampleClock::start(4 * BATCH);
        for done in 1..=4 * BATCH {
            idle.tick(done);
        }
        assert!(idle.values.as_ref().is_none());
        idle.finish();

        let samples = sampled(|| {
            let start = Instant::now();
            let mut clock = SampleClock::start(4 * BATCH + 5);
            for done in 1..=4 * BATCH + 5 {
                clock.tick(done);
            }
            clock.finish();
            Ok(start.elapsed())
        })
        .unwrap();
        assert_eq!(samples.len(), 4, "one sample per full batch: {samples:?}");
        assert!(samples.iter().all(|ns| ns.is_finite() && *ns >= 0.0));
        assert!(lock().is_none(), "sampling is off again");
    }

    #[test]
    fn a_failed_run_reports_its_error_and_turns_sampling_off() {
        let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        let err = sampled(|| anyhow::bail!("peer broke")).unwrap_err();
        assert!(format!("{err:#}").contains("peer broke"));
        assert!(lock().is_none());
    }
}
