//! [`IvnetLink`]: a 2-peer ivshmem device speaking `ivshmem-net`: the link state machine of
//! [`ivshmem_link::state`] over `STATE`, the own section cleared on INIT → READY, the
//! [`Queues`] attached on READY → RUN, torn down when the peer resets or breaks the format,
//! and a smoltcp [`Device`] over the queues.
//!
//! Interrupts: with MSI-X the device has 2 vectors, state changes on vector 0 and data on
//! vector 1; with INTx one line carries both. Either way the caller runs
//! [`IvnetLink::poll_link`] after every interrupt (the state machine is cheap when nothing
//! changed) and then polls smoltcp; the doorbell this link rings is `data vector | peer << 16`
//! ([`Interrupts::data_vector`]), and only when the peer's event index asks for one.
//!
//! RX copies each frame once into link-owned memory (the queues never hand out peer memory);
//! TX writes straight into the slot in the own section (zero-copy). A [`PeerFault`] stops the
//! link: the queues are dropped, RESET is published, [`IvnetLink::last_fault`] names what the
//! peer did, and the state machine starts over once the peer has reset too.

use alloc::vec;
use alloc::vec::Vec;

use ivshmem_dev::{Ivshmem, RegisterAccess};
use ivshmem_link::state::{self, Action, LinkState};
use ivshmem_link::LinkEvent;

use crate::link::{CellLink, LinkReport};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::queue::{self, PeerFault, QueueError, QueueStats, Queues};
use super::wire::{self, Geometry};

/// How the device interrupts (and so which vector the peer's doorbell targets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interrupts {
    /// MSI-X with exactly 2 vectors: 0 = state changes, 1 = data.
    #[default]
    MsiX,
    /// One INTx line (vector 0) for both.
    Intx,
}

impl Interrupts {
    /// The vector data doorbells target.
    pub const fn data_vector(self) -> u16 {
        match self {
            Interrupts::MsiX => 1,
            Interrupts::Intx => 0,
        }
    }
}

/// Configuration of an [`IvnetLink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IvnetConfig {
    /// Largest Ethernet frame (MTU + 14) each way; default [`wire::DEFAULT_MAX_FRAME`] =
    /// 16,398, Linux's default. Set it lower to match a lower Linux MTU.
    pub max_frame: usize,
    /// MSI-X (2 vectors) or INTx.
    pub interrupts: Interrupts,
}

impl Default for IvnetConfig {
    fn default() -> Self {
        IvnetConfig {
            max_frame: wire::DEFAULT_MAX_FRAME,
            interrupts: Interrupts::MsiX,
        }
    }
}

/// Errors creating an [`IvnetLink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IvnetError {
    /// `ivshmem-net` joins exactly two peers.
    #[error("an ivshmem-net link has exactly 2 peers, this one has {0}")]
    NotPointToPoint(u16),
    /// A section is missing.
    #[error("the {0} output section is missing or empty")]
    NoSection(&'static str),
    /// The sections cannot carry the queues for this configuration.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Life-cycle counters of an [`IvnetLink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IvnetStats {
    /// Times the carrier came on.
    pub ups: u64,
    /// Times the link was torn down (peer reset or fault).
    pub teardowns: u64,
    /// Peer faults that stopped the link.
    pub faults: u64,
    /// Frames smoltcp sent that were lost for want of room (replies built in scratch).
    pub tx_dropped: u64,
    /// Doorbells rung.
    pub doorbells: u64,
}

/// One `ivshmem-net` link. See the module documentation.
#[derive(Debug)]
pub struct IvnetLink<R: RegisterAccess> {
    queues: Option<Queues>,
    dev: Ivshmem<R>,
    peer: u16,
    geo: Geometry,
    config: IvnetConfig,
    own: LinkState,
    carrier: bool,
    last_fault: Option<PeerFault>,
    stats: IvnetStats,
    /// Totals of queues already torn down.
    queue_totals: QueueStats,
    rx_buf: Vec<u8>,
    scratch: Vec<u8>,
    checksum: ChecksumCapabilities,
}

impl<R: RegisterAccess> IvnetLink<R> {
    /// Takes over the device of a 2-peer link and checks that both output sections carry
    /// the queues for `config`; touches neither `STATE` nor shared memory (the first
    /// [`poll_link`](Self::poll_link) starts the state machine).
    pub fn new(dev: Ivshmem<R>, config: IvnetConfig) -> Result<Self, IvnetError> {
        if dev.max_peers() != 2 {
            return Err(IvnetError::NotPointToPoint(dev.max_peers()));
        }
        let peer = 1 - dev.id();
        let own = dev.own_output();
        if own.is_empty() {
            return Err(IvnetError::NoSection("own"));
        }
        let peer_section = dev
            .peer_output(peer)
            .filter(|s| !s.is_empty())
            .ok_or(IvnetError::NoSection("peer's"))?;
        // Validates sizes, alignment, writability and the frame size once, up front.
        let probe = Queues::new(own, peer_section, config.max_frame)?;
        let geo = probe.geometry();
        Ok(IvnetLink {
            queues: None,
            dev,
            peer,
            geo,
            config,
            own: LinkState::Reset,
            carrier: false,
            last_fault: None,
            stats: IvnetStats::default(),
            queue_totals: QueueStats::default(),
            rx_buf: vec![0; config.max_frame],
            scratch: vec![0; config.max_frame],
            checksum: ChecksumCapabilities::default(),
        })
    }

    /// Sets the checksum capabilities reported to smoltcp (default: compute and verify every
    /// checksum in software, which a Linux `ivshmem-net` peer requires; benchmarks between
    /// two smoltcp ends may turn them off).
    pub fn set_checksum(&mut self, checksum: ChecksumCapabilities) {
        self.checksum = checksum;
    }

    fn tear_down(&mut self) {
        if let Some(q) = self.queues.take() {
            let s = q.stats();
            self.queue_totals = add(self.queue_totals, s);
            self.stats.teardowns += 1;
        }
    }

    fn publish(&mut self, state: LinkState) {
        self.own = state;
        self.dev.set_state(state.as_u32());
    }

    /// Runs the state machine to a stable point (call at start and after every interrupt).
    /// A peer fault found by the queues stops the link first (RESET). Returns the carrier
    /// change, if any.
    pub fn poll_link(&mut self) -> LinkEvent {
        let was = self.carrier;
        if let Some(fault) = self.queues.as_ref().and_then(|q| q.fault()) {
            self.stats.faults += 1;
            self.last_fault = Some(fault);
            self.tear_down();
            self.publish(LinkState::Reset);
        }
        let mut peer = 0;
        for _ in 0..8 {
            peer = self.dev.peer_state(self.peer).unwrap_or(0);
            let step = state::next(self.own, peer);
            match step.action {
                Action::None => {}
                Action::SetUpOwn => queue::init_own(&self.dev.own_output(), self.geo),
                Action::AttachPeer => {
                    let peer_section = self.dev.peer_output(self.peer);
                    // Checked in `new`; the sections do not change.
                    self.queues = peer_section.and_then(|p| {
                        Queues::new(self.dev.own_output(), p, self.config.max_frame).ok()
                    });
                }
                Action::TearDown => self.tear_down(),
            }
            if step.state == self.own && step.action == Action::None {
                break;
            }
            if step.state != self.own {
                self.publish(step.state);
            }
        }
        self.carrier = state::carrier(self.own, peer) && self.queues.is_some();
        match (was, self.carrier) {
            (false, true) => {
                self.stats.ups += 1;
                LinkEvent::Up
            }
            (true, false) => LinkEvent::Down,
            _ => LinkEvent::None,
        }
    }

    fn ring(&mut self, ring: bool) -> bool {
        if ring {
            self.dev
                .ring(self.peer, self.config.interrupts.data_vector());
            self.stats.doorbells += 1;
        }
        ring
    }

    /// Publishes sent frames and completions; rings the peer if its event index asks.
    /// Returns whether it rang.
    pub fn flush(&mut self) -> bool {
        let ring = self.queues.as_mut().is_some_and(|q| q.flush());
        self.ring(ring)
    }

    /// Flush, doorbell, and the sleep handshake: `true` if the caller may sleep until its
    /// next interrupt (or smoltcp's next timer), `false` if work arrived meanwhile (or the
    /// peer broke the format: run [`poll_link`](Self::poll_link)).
    pub fn prepare_sleep(&mut self) -> bool {
        let Some(q) = self.queues.as_mut() else {
            return true;
        };
        let (idle, ring) = q.prepare_sleep();
        let faulted = q.fault().is_some();
        self.ring(ring);
        idle && !faulted
    }

    /// Leaves the link: publishes RESET, so the peer tears down.
    pub fn shut_down(&mut self) {
        self.flush();
        self.tear_down();
        self.carrier = false;
        self.publish(LinkState::Reset);
    }

    /// The attached queues (for frame-level users such as the TAP bridge); `None` while the
    /// link is down.
    pub fn queues_mut(&mut self) -> Option<&mut Queues> {
        if self.carrier {
            self.queues.as_mut()
        } else {
            None
        }
    }

    /// Whether the queues found the peer breaking the format since the last
    /// [`poll_link`](Self::poll_link) (which then stops the link).
    pub fn faulted(&self) -> bool {
        self.queues.as_ref().is_some_and(|q| q.fault().is_some())
    }

    /// Whether the carrier is on (both RUN, queues attached), as of the last poll.
    pub fn carrier(&self) -> bool {
        self.carrier
    }
    /// Own link state.
    pub fn state(&self) -> LinkState {
        self.own
    }
    /// The geometry of the sections.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }
    /// The configuration.
    pub fn config(&self) -> IvnetConfig {
        self.config
    }
    /// The last peer fault that stopped the link (kept until the next one).
    pub fn last_fault(&self) -> Option<PeerFault> {
        self.last_fault
    }
    /// Life-cycle counters.
    pub fn stats(&self) -> IvnetStats {
        self.stats
    }
    /// Frame counters over all attachments so far.
    pub fn queue_stats(&self) -> QueueStats {
        match &self.queues {
            Some(q) => add(self.queue_totals, q.stats()),
            None => self.queue_totals,
        }
    }
    /// The device driver.
    pub fn device(&self) -> &Ivshmem<R> {
        &self.dev
    }
    /// The peer's ID.
    pub fn peer(&self) -> u16 {
        self.peer
    }
}

fn add(a: QueueStats, b: QueueStats) -> QueueStats {
    QueueStats {
        tx_frames: a.tx_frames + b.tx_frames,
        tx_bytes: a.tx_bytes + b.tx_bytes,
        rx_frames: a.rx_frames + b.rx_frames,
        rx_bytes: a.rx_bytes + b.rx_bytes,
        rx_dropped: a.rx_dropped + b.rx_dropped,
        doorbells: a.doorbells + b.doorbells,
    }
}

impl<R: RegisterAccess> CellLink for IvnetLink<R> {
    fn poll_link(&mut self) -> LinkEvent {
        IvnetLink::poll_link(self)
    }
    fn faulted(&self) -> bool {
        IvnetLink::faulted(self)
    }
    fn flush(&mut self) -> bool {
        IvnetLink::flush(self)
    }
    fn prepare_sleep(&mut self) -> bool {
        IvnetLink::prepare_sleep(self)
    }
    fn shut_down(&mut self) {
        IvnetLink::shut_down(self)
    }
    fn report(&self) -> LinkReport {
        let q = self.queue_stats();
        LinkReport {
            state: self.own,
            carrier: self.carrier,
            ups: self.stats.ups,
            downs: self.stats.teardowns,
            faults: self.stats.faults,
            doorbells: self.stats.doorbells,
            rx_frames: q.rx_frames,
            rx_bytes: q.rx_bytes,
            rx_oversize: q.rx_dropped,
            rx_ipv4_fragments: 0,
            rx_ipv4_fragments_dropped: 0,
            tx_frames: q.tx_frames,
            tx_bytes: q.tx_bytes,
            tx_full: 0,
            tx_dropped: self.stats.tx_dropped,
            tx_oversize: 0,
            corrupt: self.stats.faults,
        }
    }
}

/// Receive token: a frame already copied into link-owned memory (and completed).
pub struct IvnetRxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for IvnetRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

/// Transmit token: writes the frame straight into a slot of the own section; with no room
/// (only possible for the reply token of `receive`) the frame is built in scratch memory and
/// lost, counted in [`IvnetStats::tx_dropped`].
pub struct IvnetTxToken<'a> {
    queues: &'a mut Queues,
    scratch: &'a mut Vec<u8>,
    dropped: &'a mut u64,
}

impl phy::TxToken for IvnetTxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        match self.queues.try_send(len, f) {
            Ok(r) => r,
            // No room, or the peer broke the format (`poll_link` then stops the link): the
            // frame is lost, as on a congested Ethernet.
            Err(f) => {
                *self.dropped += 1;
                if self.scratch.len() < len {
                    self.scratch.resize(len, 0);
                }
                f(&mut self.scratch[..len])
            }
        }
    }
}

impl<R: RegisterAccess> Device for IvnetLink<R> {
    type RxToken<'a>
        = IvnetRxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = IvnetTxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if !self.carrier {
            return None;
        }
        let queues = self.queues.as_mut()?;
        let n = queues.receive(&mut self.rx_buf).ok()??;
        Some((
            IvnetRxToken {
                frame: &self.rx_buf[..n],
            },
            IvnetTxToken {
                queues,
                scratch: &mut self.scratch,
                dropped: &mut self.stats.tx_dropped,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        if !self.carrier {
            return None;
        }
        let queues = self.queues.as_mut()?;
        if !queues.can_send(self.config.max_frame) {
            return None;
        }
        Some(IvnetTxToken {
            queues,
            scratch: &mut self.scratch,
            dropped: &mut self.stats.tx_dropped,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.config.max_frame;
        caps.max_burst_size =
            Some((self.geo.data_len() / wire::slot_size(self.config.max_frame)).saturating_sub(1));
        caps.checksum = self.checksum.clone();
        caps
    }
}
