//! [`VnetLink`]: the ivshmem device, the link state machine, the duplex rings and the NIC of
//! one protocol-0001h link, driven by [`VnetLink::poll_link`] after every interrupt.
//!
//! Bring-up, as the Linux `ivshmem-net` driver does it (see [`ivshmem_dev::link_state`]):
//! RESET → INIT; INIT and the peer present → initialise the own rings in the own output
//! section ([`shmring::duplex::DuplexInit::init`]) and publish READY; READY and the peer
//! READY/RUN → attach to the peer's output section and publish RUN; carrier when both are
//! RUN. When the peer's state drops to 0 (it died, detached or restarted) or the peer breaks
//! the ring protocol, the NIC is detached, the own rings are reset and the link starts over.

use ivshmem_dev::link_state::{self, Action, LinkState};
use ivshmem_dev::{Ivshmem, RegisterAccess};
use shmring::duplex::{self, DuplexInit};
use shmring::Notify;

use crate::nic::{self, NicError, ShmNic};

/// Errors creating a [`VnetLink`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// An Ethernet link joins exactly two peers.
    #[error("an ivshmem-net link has exactly 2 peers, this one has {0}")]
    NotPointToPoint(u16),
    /// The own output section is missing or not writable.
    #[error("own output section missing or not writable")]
    NoOwnOutput,
    /// The peer's output section is missing.
    #[error("peer {0}'s output section is missing")]
    NoPeerOutput(u16),
    /// The output section cannot hold a ring for this MTU.
    #[error("output section of {len} bytes: {source}")]
    Nic {
        /// Section length.
        len: usize,
        /// Why the ring does not fit.
        source: NicError,
    },
    /// The output section is too small for any ring.
    #[error("output section of {0} bytes is too small for a ring")]
    SectionTooSmall(usize),
    /// The own output section does not start on the rings' alignment boundary.
    #[error("own output section at {addr:#x} is not aligned to {align} bytes")]
    MisalignedOwnOutput {
        /// Where the section is mapped.
        addr: usize,
        /// Required alignment ([`shmring::layout::REGION_ALIGN`]).
        align: usize,
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

/// What [`VnetLink::poll_link`] observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// Nothing changed for the carrier.
    None,
    /// Carrier came on: frames flow.
    Up,
    /// Carrier went off (peer left, restarted or broke the protocol).
    Down,
}

/// Life-cycle counters of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Carrier-on transitions.
    pub ups: u64,
    /// Carrier-off transitions.
    pub downs: u64,
    /// Tear-downs (peer left or restarted, or a protocol violation).
    pub teardowns: u64,
    /// Tear-downs caused by a protocol violation of the peer.
    pub faults: u64,
    /// Failed attaches to the peer's rings (bad magic, version, size: the peer is refused
    /// and the link stays READY).
    pub attach_failures: u64,
    /// Doorbells rung.
    pub doorbells: u64,
    /// Failed set-ups of the own rings (the link then stays INIT and never announces READY;
    /// see [`VnetLink::last_setup_error`]).
    pub setup_failures: u64,
}

/// One vnet link: device driver, state machine, rings and NIC. See the module documentation.
#[derive(Debug)]
pub struct VnetLink<R: RegisterAccess> {
    dev: Ivshmem<R>,
    peer: u16,
    state: LinkState,
    config: LinkConfig,
    init: Option<DuplexInit>,
    nic: ShmNic,
    carrier: bool,
    stats: LinkStats,
    last_attach_error: Option<shmring::Error>,
    last_setup_error: Option<shmring::Error>,
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
        let own = dev.own_output();
        if !own.is_writable() || own.is_empty() {
            return Err(LinkError::NoOwnOutput);
        }
        if dev.peer_output(peer).is_none_or(|s| s.is_empty()) {
            return Err(LinkError::NoPeerOutput(peer));
        }
        // The rings' set-up needs this too; checking here turns a link that could never come
        // up into an error at creation.
        let align = shmring::layout::REGION_ALIGN;
        if own.as_ptr() as usize % align != 0 {
            return Err(LinkError::MisalignedOwnOutput {
                addr: own.as_ptr() as usize,
                align,
            });
        }
        let capacity = duplex::capacity_for(own.len(), config.max_capacity)
            .ok_or(LinkError::SectionTooSmall(own.len()))?;
        let nic = ShmNic::new(config.mtu, capacity).map_err(|source| LinkError::Nic {
            len: own.len(),
            source,
        })?;
        Ok(VnetLink {
            dev,
            peer,
            state: LinkState::Reset,
            config,
            init: None,
            nic,
            carrier: false,
            stats: LinkStats::default(),
            last_attach_error: None,
            last_setup_error: None,
        })
    }

    /// Runs the state machine to a stable point (call at start and after every interrupt):
    /// reads the peer's state, acts (set up own rings, attach, tear down), publishes the own
    /// state, and switches the carrier. A NIC fault (the peer broke the ring protocol) tears
    /// the link down first.
    pub fn poll_link(&mut self) -> LinkEvent {
        if self.nic.fault().is_some() && self.state != LinkState::Reset {
            self.stats.faults += 1;
            self.tear_down();
            self.publish(LinkState::Reset);
        }
        // At most a handful of steps are ever needed (RESET → INIT → READY → RUN).
        for _ in 0..8 {
            let peer = self.peer_state();
            let step = link_state::next(self.state, peer);
            match step.action {
                Action::None => {}
                Action::SetUpOwn => {
                    if let Err(e) = self.set_up_own() {
                        // No rings: announcing READY would make the peer attach to garbage.
                        // Stay where we are; the fault is counted and kept for the owner.
                        self.stats.setup_failures += 1;
                        self.last_setup_error = Some(e);
                        break;
                    }
                }
                Action::AttachPeer => {
                    if !self.attach_peer() {
                        // Stay READY; a later interrupt retries.
                        break;
                    }
                }
                Action::TearDown => self.tear_down(),
            }
            if step.state == self.state && step.action == Action::None {
                break;
            }
            self.publish(step.state);
        }
        let carrier = link_state::carrier(self.state, self.peer_state())
            && self.nic.is_attached()
            && self.nic.fault().is_none();
        self.nic.set_carrier(carrier);
        let event = match (self.carrier, carrier) {
            (false, true) => {
                self.stats.ups += 1;
                LinkEvent::Up
            }
            (true, false) => {
                self.stats.downs += 1;
                LinkEvent::Down
            }
            _ => LinkEvent::None,
        };
        self.carrier = carrier;
        event
    }

    fn peer_state(&self) -> u32 {
        self.dev.peer_state(self.peer).unwrap_or(0)
    }

    fn publish(&mut self, state: LinkState) {
        self.state = state;
        self.dev.set_state(state.as_u32());
    }

    fn set_up_own(&mut self) -> Result<(), shmring::Error> {
        self.init = None;
        let own = self.dev.own_output();
        // SAFETY: the own output section is mapped writable for the driver's lifetime (which
        // `self` owns, and the rings live inside `self`), only this peer writes it, and the
        // previous rings in it (if any) were dropped by `tear_down`.
        let init = unsafe { DuplexInit::init(own.as_ptr(), own.len(), self.config.max_capacity) }?;
        self.init = Some(init);
        self.last_setup_error = None;
        Ok(())
    }

    fn attach_peer(&mut self) -> bool {
        let Some(init) = self.init.as_ref() else {
            return false;
        };
        let Some(peer) = self.dev.peer_output(self.peer) else {
            return false;
        };
        // SAFETY: the peer's output section stays mapped (read-only is enough) for the
        // driver's lifetime; its content is untrusted and validated by shmring.
        match unsafe { init.attach(peer.as_ptr(), peer.len()) } {
            Ok(duplex) => {
                if self.nic.check_rings(&duplex).is_err() {
                    // The peer's ring is too small for our MTU: refuse it, keep our parts.
                    self.stats.attach_failures += 1;
                    self.init = Some(duplex.reset());
                    return false;
                }
                // Checked just above: cannot fail.
                let _ = self.nic.attach(duplex);
                self.init = None;
                self.last_attach_error = None;
                true
            }
            Err(e) => {
                self.stats.attach_failures += 1;
                self.last_attach_error = Some(e);
                false
            }
        }
    }

    fn tear_down(&mut self) {
        self.stats.teardowns += 1;
        self.nic.set_carrier(false);
        if let Some(duplex) = self.nic.detach() {
            // Own parts back to index 0 (a fresh set-up follows before READY).
            drop(duplex.reset());
        }
        self.init = None;
    }

    /// Publishes pending frames and releases (one index store per ring) and rings the peer's
    /// doorbell if it asked for it. Returns whether the doorbell was rung.
    pub fn flush(&mut self) -> bool {
        let notify = self.nic.flush();
        self.notify(notify)
    }

    fn notify(&mut self, notify: Notify) -> bool {
        if notify.needed() {
            self.dev.ring_peer(self.peer);
            self.stats.doorbells += 1;
            true
        } else {
            false
        }
    }

    /// Flush, doorbell, and the sleep handshake: `true` if the caller may sleep until its
    /// next interrupt (or smoltcp's next timer), `false` if work arrived meanwhile.
    pub fn prepare_sleep(&mut self) -> bool {
        let (idle, notify) = self.nic.prepare_sleep();
        self.notify(notify);
        idle
    }

    /// Leaves the link: detaches the NIC and publishes RESET (0), so the peer tears down.
    pub fn shut_down(&mut self) {
        self.flush();
        self.tear_down();
        self.publish(LinkState::Reset);
        self.carrier = false;
    }

    /// The NIC (a smoltcp `Device`).
    pub fn nic(&mut self) -> &mut ShmNic {
        &mut self.nic
    }

    /// The NIC, read-only (counters, MTU).
    pub fn nic_ref(&self) -> &ShmNic {
        &self.nic
    }

    /// Whether the carrier is on (both peers RUN, rings attached, no fault).
    pub fn carrier(&self) -> bool {
        self.carrier
    }

    /// Own link state.
    pub fn state(&self) -> LinkState {
        self.state
    }

    /// The peer's ID.
    pub fn peer(&self) -> u16 {
        self.peer
    }

    /// The configuration.
    pub fn config(&self) -> LinkConfig {
        self.config
    }

    /// Life-cycle counters.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// The last error attaching to the peer's rings (cleared by a successful attach).
    pub fn last_attach_error(&self) -> Option<shmring::Error> {
        self.last_attach_error
    }

    /// The last error setting up the own rings (cleared by a successful set-up). While set,
    /// the link stays INIT: READY is never announced over rings that do not exist.
    pub fn last_setup_error(&self) -> Option<shmring::Error> {
        self.last_setup_error
    }

    /// The device driver.
    pub fn device(&self) -> &Ivshmem<R> {
        &self.dev
    }
}

impl<R: RegisterAccess> Drop for VnetLink<R> {
    fn drop(&mut self) {
        // Rings point into the device's sections: drop them before the driver goes away,
        // and tell the peer we left.
        self.tear_down();
        self.dev.set_state(LinkState::Reset.as_u32());
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
            matches!(err, LinkError::MisalignedOwnOutput { align: 64, addr } if addr % 64 == 8),
            "{err:?}"
        );
        assert!(VnetLink::new(device(&mem, 64), LinkConfig::default()).is_ok());
    }

    #[test]
    fn failed_ring_setup_never_announces_ready() {
        let mem = Memory::new();
        // `new` refuses this section, so build the link around it by hand: the set-up in
        // `poll_link` is the last line of defence and must not publish READY on failure.
        let dev = device(&mem, 8);
        let capacity = duplex::capacity_for(OUT, None).unwrap();
        let mut link = VnetLink {
            dev,
            peer: 1,
            state: LinkState::Reset,
            config: LinkConfig::default(),
            init: None,
            nic: ShmNic::new(nic::DEFAULT_MTU, capacity).unwrap(),
            carrier: false,
            stats: LinkStats::default(),
            last_attach_error: None,
            last_setup_error: None,
        };
        mem.set_peer_state(LinkState::Init);
        assert_eq!(link.poll_link(), LinkEvent::None);
        assert_eq!(link.state(), LinkState::Init, "stays INIT");
        assert_eq!(
            link.device().registers().state.get(),
            LinkState::Init.as_u32(),
            "READY was never written to STATE"
        );
        assert_eq!(link.stats().setup_failures, 1);
        assert!(matches!(
            link.last_setup_error(),
            Some(shmring::Error::Misaligned { align: 64 })
        ));
        assert!(!link.carrier());
        // The peer goes READY: still no READY from us, one more counted failure.
        mem.set_peer_state(LinkState::Ready);
        assert_eq!(link.poll_link(), LinkEvent::None);
        assert_eq!(link.state(), LinkState::Init);
        assert_eq!(link.stats().setup_failures, 2);
        assert_eq!(
            link.device().registers().state.get(),
            LinkState::Init.as_u32()
        );
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
        assert_eq!(link.last_setup_error(), None);
        assert!(link.device().registers().writes.get() >= 2);
    }
}
