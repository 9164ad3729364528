//! The telemetry pipe's record and its producer cell.
//!
//! [`Sample`] is the fixed-size record (`#[repr(C)]`, `Pod`) one frame each.
//! [`ProducerCell`] is the producer written as bare-metal code would be: it uses only `core`,
//! [`ivshmem_dev`] (the driver, generic over [`RegisterAccess`]), [`ivshmem_link`] (the
//! link's life cycle) and [`shmring`] (the rings), and reaches the platform
//! only through [`CellPlatform`] (a clock and "wait for an interrupt or a deadline"). The same
//! code runs as a process cell (the `telemetry_producer` example gives it a hosted
//! [`Endpoint`](crate::Endpoint)) or, with a port-I/O/MMIO `RegisterAccess`, in a KVM cell.
//!
//! The channel values are a pure function of the sequence number ([`Sample::expected_channels`])
//! so a consumer can check every record it receives for tearing.

use core::fmt;

use bytemuck::{Pod, Zeroable};
use ivshmem_dev::{Ivshmem, RegisterAccess};
use ivshmem_link::{Drain, Link, LinkConfig, LinkEvent, LinkFault, LinkState};

/// Number of channel values in a sample.
pub const CHANNELS: usize = 6;

/// One telemetry sample (40 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct Sample {
    /// When the producer wrote it: `CLOCK_MONOTONIC` in ns (comparable across processes on
    /// one machine).
    pub timestamp_ns: u64,
    /// Sequence number: 0, 1, 2, ... from the producer's start.
    pub seq: u64,
    /// Channel values ([`Sample::expected_channels`] of `seq`).
    pub channels: [f32; CHANNELS],
}

impl Sample {
    /// Size of a sample on the wire.
    pub const SIZE: usize = core::mem::size_of::<Sample>();

    /// The channel values of sample `seq`: a sawtooth per channel with periods 1000, 2000, ...
    /// (exact in `f32`), so any torn or corrupted record is detectable.
    pub fn expected_channels(seq: u64) -> [f32; CHANNELS] {
        let mut values = [0.0; CHANNELS];
        for (i, v) in values.iter_mut().enumerate() {
            let period = 1000 * (i as u64 + 1);
            *v = (seq % period) as f32 * 0.5 + i as f32;
        }
        values
    }

    /// A sample as the producer makes it.
    pub fn new(seq: u64, timestamp_ns: u64) -> Self {
        Self {
            timestamp_ns,
            seq,
            channels: Self::expected_channels(seq),
        }
    }

    /// Whether the channel values match the sequence number.
    pub fn is_consistent(&self) -> bool {
        self.channels == Self::expected_channels(self.seq)
    }
}

/// What the producer needs from its platform.
pub trait CellPlatform {
    /// Monotonic time in ns (`CLOCK_MONOTONIC` on Linux).
    fn now_ns(&mut self) -> u64;
    /// Waits until an interrupt was delivered (and re-armed) or `deadline_ns` passed
    /// (`None`: no deadline). Spurious returns are allowed: the caller re-checks everything.
    /// `false`: the platform cannot wait any more (the producer stops with
    /// [`ProducerError::Platform`]).
    fn wait(&mut self, deadline_ns: Option<u64>) -> bool;
}

/// How the producer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerConfig {
    /// The consumer's peer ID.
    pub peer: u16,
    /// Samples per second (`None`: as fast as the ring takes them).
    pub rate_per_s: Option<u64>,
    /// Stop after this many samples (`None`: never).
    pub count: Option<u64>,
    /// Publish at most this many samples per index store (flat out only; at a set rate every
    /// due sample is published at once).
    pub batch: usize,
    /// Cap on the ring capacity (`None`: the largest that fits the output section).
    pub max_capacity: Option<usize>,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            peer: 1,
            rate_per_s: None,
            count: None,
            batch: 32,
            max_capacity: None,
        }
    }
}

/// What the producer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerStats {
    /// Samples published.
    pub sent: u64,
    /// Times the consumer left the link.
    pub departures: u64,
    /// Times the ring was full and the producer waited for space.
    pub full_waits: u64,
    /// Doorbells rung.
    pub doorbells: u64,
}

/// Errors of the producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerError {
    /// A ring error (the consumer broke the protocol, or the own section is too small).
    Ring(shmring::Error),
    /// The platform failed to wait (see the platform for why).
    Platform,
    /// The device cannot carry the link (sections, peer ID).
    Link(ivshmem_link::LinkError),
    /// Setting up or attaching the rings failed.
    Fault(LinkFault),
}

impl fmt::Display for ProducerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ring(e) => write!(f, "ring: {e}"),
            Self::Platform => write!(f, "the platform failed to wait for an interrupt"),
            Self::Link(e) => write!(f, "link: {e}"),
            Self::Fault(e) => write!(f, "link: {e}"),
        }
    }
}

impl core::error::Error for ProducerError {}

/// The producer cell: drives the link and streams [`Sample`]s.
pub struct ProducerCell<R: RegisterAccess> {
    link: Link<R>,
    config: ProducerConfig,
    seq: u64,
    /// Samples sent since the carrier came on (pacing restarts with every attachment).
    paced: u64,
    stats: ProducerStats,
}

impl<R: RegisterAccess> fmt::Debug for ProducerCell<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProducerCell")
            .field("link", &self.link)
            .field("seq", &self.seq)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<R: RegisterAccess> ProducerCell<R> {
    /// A producer on `dev` (interrupts must be enabled by whoever set the device up); it
    /// publishes RESET at once.
    pub fn new(dev: Ivshmem<R>, config: ProducerConfig) -> Result<Self, ProducerError> {
        let link_config = LinkConfig {
            max_capacity: config.max_capacity,
            ..LinkConfig::default()
        };
        let mut link = Link::new(dev, config.peer, link_config).map_err(ProducerError::Link)?;
        link.leave();
        Ok(Self {
            link,
            config,
            seq: 0,
            paced: 0,
            stats: ProducerStats::default(),
        })
    }

    /// What it did so far.
    pub fn stats(&self) -> ProducerStats {
        self.stats
    }

    /// This side's link state.
    pub fn link_state(&self) -> LinkState {
        self.link.state()
    }

    /// Makes dropping the producer silent (`STATE` keeps its value): for a process that
    /// handed the cell to a forked child.
    pub fn keep_state_on_drop(&mut self) {
        self.link.keep_state_on_drop();
    }

    /// Polls the link; true when the carrier is on (the consumer attached).
    fn step_link(&mut self, now: u64) -> Result<bool, ProducerError> {
        // The producer never receives: nothing to drain when the consumer leaves.
        let status = self.link.poll(now, Drain::Discard);
        if status.departed.is_some() {
            self.stats.departures += 1;
        }
        match status.fault {
            None
            | Some(LinkFault::Attach {
                error: shmring::Error::PeerNotReady,
                ..
            }) => {}
            Some(fault) => return Err(ProducerError::Fault(fault)),
        }
        if status.event == LinkEvent::Up {
            self.paced = 0;
        }
        Ok(self.link.carrier())
    }

    fn done(&self) -> bool {
        self.config.count.is_some_and(|c| self.stats.sent >= c)
    }

    /// Runs until `count` samples are published (forever without a count).
    pub fn run<P: CellPlatform>(
        &mut self,
        platform: &mut P,
    ) -> Result<ProducerStats, ProducerError> {
        while !self.done() {
            let now = platform.now_ns();
            if !self.step_link(now)? {
                if !platform.wait(None) {
                    return Err(ProducerError::Platform);
                }
                continue;
            }
            // How many samples are due now.
            let left = self.config.count.map_or(u64::MAX, |c| c - self.stats.sent);
            let due = match self.config.rate_per_s {
                None => self.config.batch.max(1) as u64,
                Some(rate) => {
                    let rate = rate.max(1);
                    let pace_start = self.link.up_since().unwrap_or(now);
                    let elapsed = now.saturating_sub(pace_start);
                    let due_total = (elapsed as u128 * rate as u128 / 1_000_000_000) as u64 + 1;
                    let due = due_total.saturating_sub(self.paced);
                    if due == 0 {
                        let next = pace_start
                            + ((self.paced as u128 * 1_000_000_000) / rate as u128) as u64;
                        if !platform.wait(Some(next)) {
                            return Err(ProducerError::Platform);
                        }
                        continue;
                    }
                    due
                }
            }
            .min(left);
            let Some(duplex) = self.link.rings_mut() else {
                continue;
            };
            let mut wrote = 0u64;
            let mut full = false;
            while wrote < due {
                match duplex.tx.grant(Sample::SIZE) {
                    Ok(mut grant) => {
                        let sample = Sample::new(self.seq, platform.now_ns());
                        grant.copy_from_slice(bytemuck::bytes_of(&sample));
                        grant.commit();
                        self.seq += 1;
                        wrote += 1;
                    }
                    Err(shmring::Error::Full { .. }) => {
                        full = true;
                        break;
                    }
                    Err(e) => return Err(ProducerError::Ring(e)),
                }
            }
            let notify = duplex.tx.flush();
            if self.link.notify(notify) {
                self.stats.doorbells += 1;
            }
            self.stats.sent += wrote;
            self.paced += wrote;
            if full && wrote == 0 {
                let Some(duplex) = self.link.rings_mut() else {
                    continue;
                };
                match duplex.tx.prepare_wait_for_space(Sample::SIZE) {
                    Ok(true) => {
                        self.stats.full_waits += 1;
                        if !platform.wait(None) {
                            return Err(ProducerError::Platform);
                        }
                    }
                    Ok(false) => {}
                    Err(e) => return Err(ProducerError::Ring(e)),
                }
            }
        }
        Ok(self.stats)
    }
}

/// What a consumer found wrong with the samples it received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SampleCheck {
    /// Samples checked.
    pub received: u64,
    /// Samples missing: the sum of forward jumps in the sequence.
    pub missing: u64,
    /// Gaps: how many forward jumps.
    pub gaps: u64,
    /// Samples whose sequence number went backwards (reordered or duplicated).
    pub out_of_order: u64,
    /// Samples whose channel values do not match their sequence number (torn or corrupt).
    pub torn: u64,
    /// Restarts of the producer seen by [`SampleCheck::restart`].
    pub restarts: u64,
    next: Option<u64>,
}

impl SampleCheck {
    /// Checks one sample against the one before.
    pub fn check(&mut self, sample: &Sample) {
        self.received += 1;
        if !sample.is_consistent() {
            self.torn += 1;
        }
        match self.next {
            Some(next) if sample.seq > next => {
                self.gaps += 1;
                self.missing += sample.seq - next;
            }
            Some(next) if sample.seq < next => {
                // Late or duplicated: counted, and the expectation does not move back.
                self.out_of_order += 1;
                return;
            }
            _ => {}
        }
        self.next = Some(sample.seq.wrapping_add(1));
    }

    /// The producer left: its successor starts its sequence again.
    pub fn restart(&mut self) {
        self.restarts += 1;
        self.next = None;
    }

    /// The sequence number expected next (`None` before the first sample or after a restart).
    pub fn expected(&self) -> Option<u64> {
        self.next
    }

    /// Nothing lost, reordered or torn.
    pub fn is_clean(&self) -> bool {
        self.missing == 0 && self.out_of_order == 0 && self.torn == 0
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of [`Sample::timestamp_ns`], the same in every process
/// of the machine (Linux side; the producer cell itself only uses [`CellPlatform::now_ns`]).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// [`CellPlatform`] for a Linux process: [`monotonic_ns`] and the endpoint's interrupt (taken
/// and re-armed by [`crate::EndpointInterrupt::wait_until`]). An interrupt error is fatal for a
/// cell: it is kept ([`ProcessPlatform::error`]) and `wait` returns `false`.
#[derive(Debug)]
pub struct ProcessPlatform {
    interrupt: crate::EndpointInterrupt,
    error: Option<crate::EndpointError>,
}

impl ProcessPlatform {
    /// Waits on `interrupt`.
    pub fn new(interrupt: crate::EndpointInterrupt) -> Self {
        Self {
            interrupt,
            error: None,
        }
    }

    /// The first interrupt error, if any.
    pub fn error(&self) -> Option<&crate::EndpointError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_40_bytes_and_self_checking() {
        assert_eq!(Sample::SIZE, 40);
        let s = Sample::new(123_456, 99);
        assert!(s.is_consistent());
        let mut torn = s;
        torn.channels[3] += 1.0;
        assert!(!torn.is_consistent());
        let mut torn = s;
        torn.seq += 1;
        assert!(
            !torn.is_consistent(),
            "a seq from another sample does not match its values"
        );
    }

    #[test]
    fn sample_check_counts_gaps_reorders_tears_and_restarts() {
        let mut c = SampleCheck::default();
        for seq in [0, 1, 2, 5, 6, 4, 7] {
            c.check(&Sample::new(seq, 0));
        }
        let mut torn = Sample::new(8, 0);
        torn.channels[0] = -1.0;
        c.check(&torn);
        assert_eq!(c.received, 8);
        assert_eq!((c.gaps, c.missing), (1, 2));
        assert_eq!(c.out_of_order, 1);
        assert_eq!(c.torn, 1);
        assert!(!c.is_clean());
        c.restart();
        assert_eq!(c.expected(), None);
        let before = (c.gaps, c.out_of_order);
        c.check(&Sample::new(0, 0));
        assert_eq!(
            (c.gaps, c.out_of_order),
            before,
            "a restart at 0 is not a reorder"
        );
        assert_eq!(c.restarts, 1);
    }
}
