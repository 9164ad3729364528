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
        if dev.peer_output(peer).map_or(true, |s| s.is_empty()) {
            return Err(LinkError::NoPeerOutput(peer));
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
                Action::SetUpOwn => self.set_up_own(),
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

    fn set_up_own(&mut self) {
        let own = self.dev.own_output();
        // SAFETY: the own output section is mapped writable for the driver's lifetime (which
        // `self` owns, and the rings live inside `self`), only this peer writes it, and the
        // previous rings in it (if any) were dropped by `tear_down`.
        let init = unsafe { DuplexInit::init(own.as_ptr(), own.len(), self.config.max_capacity) };
        // Size and alignment were checked in `new`; the section never changes.
        self.init = init.ok();
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
