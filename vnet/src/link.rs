//! [`VnetLink`]: the NIC of one protocol-0001h link over an [`ivshmem_link::Link`] (device,
//! state machine, rings), driven by [`VnetLink::poll_link`] after every interrupt.
//!
//! The life cycle is the link crate's (see [`ivshmem_link`]): RESET → INIT → READY (own rings
//! set up) → RUN (attached to the peer's), carrier when both are RUN, and back to the start
//! when the peer's state drops to 0 (it died, detached or restarted) or the peer breaks the
//! ring protocol. This type adds the NIC: the rings must hold [`nic::MIN_FRAMES_PER_RING`]
//! frames of the MTU (a smaller peer ring is refused at attach), a NIC fault (the peer broke
//! the rings) resets the link, and the NIC's counters survive link restarts. Frames the peer
//! published before it left are dropped with the rings ([`Drain::Discard`]): smoltcp gets no
//! tokens without carrier, and TCP recovers from the loss.

use ivshmem_dev::{Ivshmem, RegisterAccess};
use ivshmem_link::{Drain, Link};
use shmring::duplex;

pub use ivshmem_link::{LinkEvent, LinkFault, LinkState, LinkStats};

use crate::nic::{self, NicError, NicPort, NicState};

/// A snapshot of a link's state and counters, whatever its wire format (for status pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkReport {
    /// Own link state.
    pub state: LinkState,
    /// Carrier on.
    pub carrier: bool,
    /// Times the carrier came on.
    pub ups: u64,
    /// Times the link went down.
    pub downs: u64,
    /// Peer faults that stopped the link.
    pub faults: u64,
    /// Doorbells rung.
    pub doorbells: u64,
    /// Frames received.
    pub rx_frames: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Received frames longer than the MTU, dropped.
    pub rx_oversize: u64,
    /// IPv4 fragments received (counted by the shmring NIC only; 0 otherwise).
    pub rx_ipv4_fragments: u64,
    /// IPv4 fragments dropped as too large to reassemble (shmring NIC only; 0 otherwise).
    pub rx_ipv4_fragments_dropped: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Times the send side had no room.
    pub tx_full: u64,
    /// Frames smoltcp built that were dropped for want of room.
    pub tx_dropped: u64,
    /// Frames longer than the MTU dropped on send.
    pub tx_oversize: u64,
    /// Peer protocol violations seen.
    pub corrupt: u64,
}

/// What a cell's event loop needs of its link, whatever the wire format: the shmring format
/// ([`VnetLink`]) or Linux's `ivshmem-net` ([`crate::ivnet::IvnetLink`]). Both are smoltcp
/// devices themselves.
pub trait CellLink: smoltcp::phy::Device {
    /// Runs the link state machine (after every interrupt, and after a fault).
    fn poll_link(&mut self) -> LinkEvent;
    /// Whether the peer broke the format since the last `poll_link` (run it).
    fn faulted(&self) -> bool;
    /// Publishes pending frames; rings the peer if it asked. Returns whether it rang.
    fn flush(&mut self) -> bool;
    /// Flush and sleep handshake: `true` if the caller may sleep until its next interrupt.
    fn prepare_sleep(&mut self) -> bool;
    /// Leaves the link (publishes RESET).
    fn shut_down(&mut self);
    /// State and counters.
    fn report(&self) -> LinkReport;
}

impl<R: RegisterAccess> CellLink for VnetLink<R> {
    fn poll_link(&mut self) -> LinkEvent {
        VnetLink::poll_link(self)
    }
    fn faulted(&self) -> bool {
        self.nic.fault().is_some()
    }
    fn flush(&mut self) -> bool {
        VnetLink::flush(self)
    }
    fn prepare_sleep(&mut self) -> bool {
        VnetLink::prepare_sleep(self)
    }
    fn shut_down(&mut self) {
        VnetLink::shut_down(self)
    }
    fn report(&self) -> LinkReport {
        let (l, n) = (self.link.stats(), self.nic.stats());
        LinkReport {
            state: self.link.state(),
            carrier: self.link.carrier(),
            ups: l.ups,
            downs: l.downs,
            faults: l.faults,
            doorbells: l.doorbells,
            rx_frames: n.rx_frames,
            rx_bytes: n.rx_bytes,
            rx_oversize: n.rx_oversize,
            rx_ipv4_fragments: n.rx_ipv4_fragments,
            rx_ipv4_fragments_dropped: n.rx_ipv4_fragments_dropped,
            tx_frames: n.tx_frames,
            tx_bytes: n.tx_bytes,
            tx_full: n.tx_ring_full,
            tx_dropped: n.tx_reply_dropped,
            tx_oversize: n.tx_oversize,
            corrupt: n.corrupt,
        }
    }
}

/// Errors creating a [`VnetLink`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// An Ethernet link joins exactly two peers.
    #[error("an ivshmem-net link has exactly 2 peers, this one has {0}")]
    NotPointToPoint(u16),
    /// The sections cannot carry a link ([`ivshmem_link::Link::new`]).
    #[error(transparent)]
    Link(#[from] ivshmem_link::LinkError),
    /// The output section cannot hold a ring for this MTU.
    #[error("output section of {len} bytes: {error}")]
    Nic {
        /// Section length.
        len: usize,
        /// Why the ring does not fit.
        error: NicError,
    },
}

/// Configuration of a [`VnetLink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// Device MTU (Ethernet frame size incl. the 14-byte header), see [`nic::DEFAULT_MTU`].
    pub mtu: usize,
    /// Cap on the send ring's capacity (`None`: as large as the output section allows).
    pub max_capacity: Option<usize>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            mtu: nic::DEFAULT_MTU,
            max_capacity: None,
        }
    }
}

/// One vnet link: the link (device driver, state machine, rings) and the NIC. See the module
/// documentation.
#[derive(Debug)]
pub struct VnetLink<R: RegisterAccess> {
    link: Link<R>,
    config: LinkConfig,
    nic: NicState,
}

/// The link is itself a smoltcp device: the NIC over the link's rings.
impl<R: RegisterAccess> smoltcp::phy::Device for VnetLink<R> {
    type RxToken<'a>
        = nic::ShmRxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = nic::ShmTxToken<'a>
    where
        Self: 'a;

    fn receive(
        &mut self,
        _timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.nic.receive(self.link.rings_mut())
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        self.nic.transmit(self.link.rings_mut())
    }

    fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
        self.nic.capabilities()
    }
}

impl<R: RegisterAccess> VnetLink<R> {
    /// Takes over the device of a 2-peer link. Checks the sections and that the own output
    /// section holds a ring for `config.mtu`; touches neither STATE nor shared memory (the
    /// first [`poll_link`](Self::poll_link) starts the state machine). Interrupts stay the
    /// caller's business: enable them (and re-arm in one-shot mode) on the device or its
    /// endpoint, and call `poll_link` after each one.
    pub fn new(dev: Ivshmem<R>, config: LinkConfig) -> Result<Self, LinkError> {
        if dev.max_peers() != 2 {
            return Err(LinkError::NotPointToPoint(dev.max_peers()));
        }
        let peer = 1 - dev.id();
        let len = dev.own_output().len();
        nic::check_mtu(config.mtu).map_err(|error| LinkError::Nic { len, error })?;
        let link_config = ivshmem_link::LinkConfig {
            max_capacity: config.max_capacity,
            min_capacity: nic::min_capacity_for(config.mtu),
        };
        let link = Link::new(dev, peer, link_config).map_err(|e| match e {
            ivshmem_link::LinkError::SectionTooSmall { len, min } => LinkError::Nic {
                len,
                error: NicError::RingTooSmall {
                    which: "own",
                    capacity: duplex::capacity_for(len, config.max_capacity).unwrap_or(0),
                    mtu: config.mtu,
                    needed: min,
                },
            },
            other => LinkError::Link(other),
        })?;
        // `Link::new` checked that a ring of at least the NIC's minimum fits.
        let capacity = duplex::capacity_for(len, config.max_capacity).unwrap_or(0);
        let nic =
            NicState::new(config.mtu, capacity).map_err(|error| LinkError::Nic { len, error })?;
        Ok(VnetLink { link, config, nic })
    }

    /// Runs the state machine to a stable point (call at start and after every interrupt):
    /// reads the peer's state, acts (set up own rings, attach, tear down), publishes the own
    /// state, and switches the carrier. A NIC fault (the peer broke the ring protocol) resets
    /// the link first.
    pub fn poll_link(&mut self) -> LinkEvent {
        if let Some(error) = self.nic.fault() {
            self.link.report_violation(error);
        }
        let status = self.link.poll(0, Drain::Discard);
        if status.reset {
            self.nic.rings_gone();
        }
        self.nic.set_carrier(self.link.carrier());
        status.event
    }

    /// Publishes pending frames and releases (one index store per ring) and rings the peer's
    /// doorbell if it asked for it. Returns whether the doorbell was rung.
    pub fn flush(&mut self) -> bool {
        let notify = self.nic.port(self.link.rings_mut()).flush();
        self.link.notify(notify)
    }

    /// Flush, doorbell, and the sleep handshake: `true` if the caller may sleep until its
    /// next interrupt (or smoltcp's next timer), `false` if work arrived meanwhile.
    pub fn prepare_sleep(&mut self) -> bool {
        let (idle, notify) = self.nic.port(self.link.rings_mut()).prepare_sleep();
        self.link.notify(notify);
        idle
    }

    /// Leaves the link: detaches the NIC and publishes RESET (0), so the peer tears down.
    pub fn shut_down(&mut self) {
        self.flush();
        self.link.leave();
        self.nic.rings_gone();
    }

    /// The NIC with the link's rings lent to it: a smoltcp `Device` for one use
    /// (`iface.poll(now, &mut link.nic(), ..)`).
    pub fn nic(&mut self) -> NicPort<'_> {
        self.nic.port(self.link.rings_mut())
    }

    /// The attached rings (for frame-level users such as the TAP bridge); `None` while the
    /// link is down.
    pub fn rings_mut(&mut self) -> Option<&mut shmring::Duplex> {
        self.link.rings_mut()
    }

    /// Records a protocol violation of the peer found by a frame-level user of
    /// [`rings_mut`](Self::rings_mut); the next [`poll_link`](Self::poll_link) resets the link.
    pub fn record_fault(&mut self, error: shmring::Error) {
        self.nic.record_fault(error);
    }

    /// The NIC, read-only (counters, MTU, fault).
    pub fn nic_ref(&self) -> &NicState {
        &self.nic
    }

    /// Whether the carrier is on (both peers RUN, rings attached), as of the last poll.
    pub fn carrier(&self) -> bool {
        self.link.carrier()
    }

    /// Own link state.
    pub fn state(&self) -> LinkState {
        self.link.state()
    }

    /// The peer's ID.
    pub fn peer(&self) -> u16 {
        self.link.peer()
    }

    /// The configuration.
    pub fn config(&self) -> LinkConfig {
        self.config
    }

    /// Life-cycle counters.
    pub fn stats(&self) -> LinkStats {
        self.link.stats()
    }

    /// The last set-up, attach or peer fault (kept until the next one).
    pub fn last_fault(&self) -> Option<LinkFault> {
        self.link.last_fault()
    }

    /// The link under the NIC.
    pub fn link(&self) -> &Link<R> {
        &self.link
    }

    /// The device driver.
    pub fn device(&self) -> &Ivshmem<R> {
        self.link.device()
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use core::cell::Cell;
    use core::ptr::NonNull;
    use ivshmem_dev::{regs, Section, Sections};

    /// Registers of peer 0 on a 2-peer link; `STATE` writes are recorded.
    #[derive(Debug)]
    struct Registers {
        state: Cell<u32>,
        writes: Cell<usize>,
    }

    impl RegisterAccess for Registers {
        fn read32(&self, offset: u32) -> u32 {
            match offset {
                regs::ID => 0,
                regs::MAX_PEERS => 2,
                regs::STATE => self.state.get(),
                _ => 0,
            }
        }
        fn write32(&self, offset: u32, value: u32) {
            if offset == regs::STATE {
                self.state.set(value);
                self.writes.set(self.writes.get() + 1);
            }
        }
    }

    const OUT: usize = 64 * 1024;

    /// Heap memory standing in for the state table and both output sections (page aligned).
    struct Memory {
        ptr: NonNull<u8>,
        layout: std::alloc::Layout,
    }

    impl Memory {
        fn new() -> Self {
            let layout = std::alloc::Layout::from_size_align(4096 + 2 * OUT + 4096, 4096).unwrap();
            // SAFETY: non-zero size.
            let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).unwrap();
            Memory { ptr, layout }
        }

        /// The sections, the own output starting `skew` bytes into its slot.
        fn sections(&self, skew: usize) -> Sections {
            // SAFETY: every range lies inside the allocation, which outlives the driver in
            // each test (declared first, dropped last).
            unsafe {
                let mut s = Sections::new(Section::new(self.ptr, 8, false));
                s.outputs[0] = Some(Section::new(self.ptr.byte_add(4096 + skew), OUT, true));
                s.outputs[1] = Some(Section::new(
                    self.ptr.byte_add(4096 + OUT + 4096),
                    OUT,
                    false,
                ));
                s
            }
        }

        fn set_peer_state(&self, state: LinkState) {
            // SAFETY: entry 1 of the state table, inside the allocation, 4-byte aligned.
            unsafe { self.ptr.cast::<u32>().add(1).write_volatile(state.as_u32()) }
        }
    }

    impl Drop for Memory {
        fn drop(&mut self) {
            // SAFETY: allocated with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }

    fn device(mem: &Memory, skew: usize) -> Ivshmem<Registers> {
        let regs = Registers {
            state: Cell::new(0),
            writes: Cell::new(0),
        };
        Ivshmem::new(regs, mem.sections(skew)).unwrap()
    }

    #[test]
    fn new_refuses_a_misaligned_own_output() {
        let mem = Memory::new();
        let err = VnetLink::new(device(&mem, 8), LinkConfig::default()).unwrap_err();
        assert!(
            matches!(err, LinkError::Link(ivshmem_link::LinkError::MisalignedOwnOutput { align: 64, addr }) if addr % 64 == 8),
            "{err:?}"
        );
        assert!(VnetLink::new(device(&mem, 64), LinkConfig::default()).is_ok());
    }

    #[test]
    fn successful_setup_announces_ready() {
        let mem = Memory::new();
        let mut link = VnetLink::new(device(&mem, 0), LinkConfig::default()).unwrap();
        mem.set_peer_state(LinkState::Init);
        assert_eq!(link.poll_link(), LinkEvent::None);
        assert_eq!(link.state(), LinkState::Ready);
        assert_eq!(
            link.device().registers().state.get(),
            LinkState::Ready.as_u32()
        );
        assert_eq!(link.stats().setup_failures, 0);
        assert_eq!(link.last_fault(), None);
        assert!(link.device().registers().writes.get() >= 2);
    }
}
