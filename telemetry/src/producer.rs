//! The producer cell, written as bare-metal code would be: only `core`, the driver (generic
//! over [`RegisterAccess`]), the link ([`ivshmem_link::Link`]) and the rings; the platform is
//! reached only through [`CellPlatform`].

use core::fmt;

use ivshmem_dev::{Ivshmem, RegisterAccess};
use ivshmem_link::{Drain, Link, LinkConfig, LinkEvent, LinkFault, LinkState};

use crate::Sample;

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
    /// Publish at most this many samples per index store. At a set rate a producer behind
    /// schedule (a slow CPU: a ring-0 inmate under emulation) catches up in batches of this
    /// size, so the consumer sees samples while the producer catches up instead of one late
    /// burst.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProducerError {
    /// A ring error (the consumer broke the protocol).
    #[error("ring: {0}")]
    Ring(shmring::Error),
    /// The platform failed to wait (see the platform for why).
    #[error("the platform failed to wait for an interrupt")]
    Platform,
    /// The device cannot carry the link (sections, peer ID).
    #[error("link: {0}")]
    Link(ivshmem_link::LinkError),
    /// Setting up or attaching the rings failed.
    #[error("link: {0}")]
    Fault(LinkFault),
}

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
            .min(left)
            .min(self.config.batch.max(1) as u64);
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
