//! The producer's platform in a Linux process cell (feature `process`): the monotonic clock
//! and the interrupt of a `linux-uio-client` endpoint.

use linux_uio_client::{EndpointError, EndpointInterrupt};
use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, ClockId};

use crate::CellPlatform;

/// `CLOCK_MONOTONIC` in ns: the clock of [`Sample::timestamp_ns`], the same in every process
/// of the machine (Linux side; the producer cell itself only uses [`CellPlatform::now_ns`]).
pub fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC always exists on Linux; the call cannot fail with a valid clock.
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap_or_else(|_| TimeSpec::new(0, 0));
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// [`CellPlatform`] for a Linux process: [`monotonic_ns`] and the endpoint's interrupt (taken
/// and re-armed by [`EndpointInterrupt::wait_until`]). An interrupt error is fatal for a
/// cell: it is kept ([`ProcessPlatform::error`]) and `wait` returns `false`.
#[derive(Debug)]
pub struct ProcessPlatform {
    interrupt: EndpointInterrupt,
    error: Option<EndpointError>,
}

impl ProcessPlatform {
    /// Waits on `interrupt`.
    pub fn new(interrupt: EndpointInterrupt) -> Self {
        Self {
            interrupt,
            error: None,
        }
    }

    /// The first interrupt error, if any.
    pub fn error(&self) -> Option<&EndpointError> {
        self.error.as_ref()
    }
}

impl CellPlatform for ProcessPlatform {
    fn now_ns(&mut self) -> u64 {
        monotonic_ns()
    }

    fn wait(&mut self, deadline_ns: Option<u64>) -> bool {
        if self.error.is_some() {
            return false;
        }
        let deadline = deadline_ns.map(|d| {
            std::time::Instant::now()
                + std::time::Duration::from_nanos(d.saturating_sub(monotonic_ns()))
        });
        if let Err(e) = self.interrupt.wait_until(deadline) {
            self.error = Some(e);
            return false;
        }
        true
    }
}
