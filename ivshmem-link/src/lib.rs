//! The life cycle of a 1:1 link over an ivshmem v2 device, written once: the peer state
//! machine, the duplex rings in the link's output sections (set-up, attach, reset), peer-gone
//! handling and doorbells. `no_std`, no allocation.
//!
//! [`Link`] owns the guest-side driver ([`ivshmem_dev::Ivshmem`]) and is driven by
//! [`Link::poll`] — at start, after every interrupt, and whenever its user found a ring empty
//! or full — in the style of smoltcp's `poll(now)`. It never waits: interrupts or polling are
//! the caller's choice. Users: `vnet`'s NIC link, the telemetry producer, the tokio `Channel`
//! of `linux-uio-client` and the bare-metal inmates.
//!
//! ```text
//!  shmring, ivshmem-dev  ←  ivshmem-link  ←  { vnet core, telemetry core, tokio channel, inmates }
//! ```
//! The crate knows rings and the device; it knows nothing of frames' meaning, smoltcp, tokio or
//! the hypervisor.
//!
//! # One poll
//! 1. If the user reported a protocol violation of the peer ([`Link::report_violation`]), the
//!    rings are dropped, the own parts reset and RESET published ([`LinkFault::PeerViolation`]).
//! 2. Read the peer's state-table entry, step [`state::next`], act, publish the new own state
//!    in `STATE`; repeat until stable. Actions: [`Action::SetUpOwn`] initialises the own ring
//!    parts in the own output section; [`Action::AttachPeer`] validates the peer's parts in
//!    its output section (a ring below [`LinkConfig::min_capacity`] is refused);
//!    [`Action::TearDown`] (the peer left, died or restarted) resets the own parts.
//! 3. Carrier: on exactly when both sides are RUN with rings attached.
//!
//! # Peer gone
//! When the peer's state drops, frames it had already published are still in its output
//! section (which stays mapped). With [`Drain::DeliverFirst`] the link keeps the rings until
//! the receive ring is empty (the user keeps receiving; the carrier is off meanwhile), then
//! resets; with [`Drain::Discard`] it resets at once. Either way a frame is delivered at most
//! once: the reset happens only between receives, and after it the peer's new rings start
//! from index 0. The peer, if it restarts meanwhile, waits in RESET until this side has
//! published RESET (see the [`state`] table), so it never meets half-used rings.
//!
//! # Example
//! Two peers of one link in one process, over heap memory and registers that write the state
//! table directly (a real cell gets its driver from PCI discovery, UIO or the hypervisor):
//!
//! ```
//! use core::cell::Cell;
//! use core::ptr::NonNull;
//! use ivshmem_dev::{regs, Ivshmem, RegisterAccess, Section, Sections};
//! use ivshmem_link::{Drain, Link, LinkConfig, LinkEvent, LinkState};
//!
//! // Peer `id`'s registers: STATE writes go to the state table, doorbells are counted.
//! struct Regs<'m> { id: u16, table: NonNull<u32>, rung: &'m Cell<u32> }
//! impl RegisterAccess for Regs<'_> {
//!     fn read32(&self, offset: u32) -> u32 {
//!         match offset {
//!             regs::ID => self.id.into(),
//!             regs::MAX_PEERS => 2,
//!             // SAFETY: entry `id` of the two-entry state table below.
//!             regs::STATE => unsafe { self.table.add(self.id.into()).read_volatile() },
//!             _ => 0,
//!         }
//!     }
//!     fn write32(&self, offset: u32, value: u32) {
//!         match offset {
//!             // SAFETY: as above.
//!             regs::STATE => unsafe { self.table.add(self.id.into()).write_volatile(value) },
//!             regs::DOORBELL => self.rung.set(self.rung.get() + 1),
//!             _ => {}
//!         }
//!     }
//! }
//!
//! const OUT: usize = 16 * 1024;
//! #[repr(C, align(4096))]
//! struct Memory([u8; 4096 + 2 * OUT]);
//! let mut memory = Box::new(Memory([0; 4096 + 2 * OUT]));
//! let base = NonNull::new(memory.0.as_mut_ptr()).unwrap();
//! let rung = Cell::new(0);
//! let device = |id: u16| {
//!     // SAFETY: the state table and both output sections lie inside `memory`, which
//!     // outlives both drivers; each peer may write only its own output section.
//!     let sections = unsafe {
//!         let mut s = Sections::new(Section::new(base, 8, false));
//!         for peer in 0..2 {
//!             let at = base.byte_add(4096 + peer * OUT);
//!             s.outputs[peer] = Some(Section::new(at, OUT, peer == usize::from(id)));
//!         }
//!         s
//!     };
//!     let regs = Regs { id, table: base.cast(), rung: &rung };
//!     Ivshmem::new(regs, sections).unwrap()
//! };
//!
//! let mut a = Link::new(device(0), 1, LinkConfig::default()).unwrap();
//! let mut b = Link::new(device(1), 0, LinkConfig::default()).unwrap();
//! // Each side polls after every interrupt; here they simply take turns.
//! for _ in 0..3 {
//!     a.poll(0, Drain::Discard);
//!     b.poll(0, Drain::Discard);
//! }
//! assert!(a.carrier() && b.carrier());
//! assert_eq!(a.state(), LinkState::Run);
//!
//! // Send a frame from a to b; ring b's doorbell only if b asked for it.
//! let notify = a.rings_mut().unwrap().tx.try_send(b"hello").unwrap();
//! a.notify(notify);
//! let mut buf = [0; 16];
//! let got = b.rings_mut().unwrap().rx.try_recv(&mut buf).unwrap().unwrap();
//! assert_eq!(&buf[..got.len], b"hello");
//!
//! // b leaves; a's next poll (after the state-change interrupt) takes the link down.
//! drop(b);
//! let status = a.poll(0, Drain::DeliverFirst);
//! assert_eq!(status.event, LinkEvent::Down);
//! assert_eq!(status.departed, Some(0));
//! # drop(a);
//! # drop(memory);
//! ```
#![no_std]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod state;
#[cfg(test)]
mod tests;

pub use state::{Action, LinkState, Step};

use ivshmem_dev::{Ivshmem, RegisterAccess};
use shmring::duplex::{self, Duplex, DuplexInit};
use shmring::Notify;

/// Configuration of a [`Link`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// Cap on the capacity of the ring this side sends on (`None`: the largest power of two
    /// the own output section holds, see [`shmring::duplex::capacity_for`]).
    pub max_capacity: Option<usize>,
    /// Smallest capacity accepted for either ring: the own ring must reach it (checked by
    /// [`Link::new`]) and a peer whose ring is smaller is refused at attach
    /// ([`LinkFault::RingTooSmall`]). Default: [`shmring::layout::MIN_CAPACITY`].
    pub min_capacity: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            max_capacity: None,
            min_capacity: shmring::layout::MIN_CAPACITY,
        }
    }
}

/// What to do with frames the peer published before it left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Keep the rings until the receive ring is empty, so the user receives every frame the
    /// peer published; reset afterwards (on a later poll).
    DeliverFirst,
    /// Reset at once; unreceived frames are dropped with the rings.
    Discard,
}

/// Errors creating a [`Link`]: the device can never carry this link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The peer ID is this side's own or beyond the link's peers.
    #[error("peer {peer} is not another peer of this {max_peers}-peer link (own ID {own})")]
    BadPeer {
        /// The peer asked for.
        peer: u16,
        /// This side's ID.
        own: u16,
        /// Peers on the link.
        max_peers: u16,
    },
    /// The own output section is missing or not writable.
    #[error("own output section missing or not writable")]
    NoOwnOutput,
    /// The peer's output section is missing (or empty).
    #[error("peer {0}'s output section is missing")]
    NoPeerOutput(u16),
    /// The own output section does not start on the rings' alignment boundary.
    #[error("own output section at {addr:#x} is not aligned to {align} bytes")]
    MisalignedOwnOutput {
        /// Where the section is mapped.
        addr: usize,
        /// Required alignment ([`shmring::layout::REGION_ALIGN`]).
        align: usize,
    },
    /// The own output section cannot hold a ring of [`LinkConfig::min_capacity`].
    #[error("output section of {len} bytes holds no ring of at least {min} bytes")]
    SectionTooSmall {
        /// Section length.
        len: usize,
        /// Smallest capacity asked for.
        min: usize,
    },
}

/// Something [`Link::poll`] could not do, or a peer's fault it acted on. The link stays in a
/// consistent state (see each variant) and a later poll may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkFault {
    /// Initialising the own ring parts failed; the link stays INIT and never announces READY
    /// over rings that do not exist.
    #[error("setting up the own rings: {0}")]
    SetUp(shmring::Error),
    /// The peer's ring parts did not validate ([`shmring::Error::PeerNotReady`]: not
    /// initialised yet); the link stays READY and retries at the next poll.
    #[error("attaching to peer {peer}'s rings: {error}")]
    Attach {
        /// The peer.
        peer: u16,
        /// What shmring found.
        error: shmring::Error,
    },
    /// The peer's ring is smaller than [`LinkConfig::min_capacity`]; refused, the link stays
    /// READY.
    #[error("peer {peer}'s ring holds {capacity} bytes, at least {min} needed")]
    RingTooSmall {
        /// The peer.
        peer: u16,
        /// Its ring's capacity.
        capacity: usize,
        /// The minimum.
        min: usize,
    },
    /// The peer broke the ring protocol (reported through [`Link::report_violation`]): the
    /// rings were dropped, the own parts reset and RESET published; the link comes up again
    /// once the peer has reset too.
    #[error("peer {peer} broke the ring protocol ({error}): link reset")]
    PeerViolation {
        /// The peer.
        peer: u16,
        /// The violation.
        error: shmring::Error,
    },
}

/// Carrier changes seen by one [`Link::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// The carrier did not change.
    None,
    /// Carrier came on: both sides RUN, rings attached; frames flow.
    Up,
    /// Carrier went off (the peer left, restarted or broke the protocol).
    Down,
}

/// What one [`Link::poll`] saw and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Carrier change.
    pub event: LinkEvent,
    /// The peer left (or restarted) and the rings were reset in this poll: its state-table
    /// value then (untrusted, any value).
    pub departed: Option<u32>,
    /// The own rings were reset in this poll (departure or violation): whoever keeps state
    /// about the rings (counters of a NIC, a half-read frame) resets it.
    pub reset: bool,
    /// The peer's state-table entry, as last read.
    pub peer_state: u32,
    /// A set-up or attach that failed, or a violation acted on (also kept in
    /// [`Link::last_fault`]).
    pub fault: Option<LinkFault>,
}

/// Life-cycle counters of a [`Link`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Carrier-on transitions.
    pub ups: u64,
    /// Carrier-off transitions.
    pub downs: u64,
    /// Resets of the own rings (departures and violations).
    pub teardowns: u64,
    /// Departures of the peer (state dropped to RESET, or a restart seen as INIT).
    pub departures: u64,
    /// Resets caused by a protocol violation of the peer.
    pub faults: u64,
    /// Refused attaches (peer not ready, bad magic/version/size, ring too small).
    pub attach_failures: u64,
    /// Failed set-ups of the own rings.
    pub setup_failures: u64,
    /// Doorbells rung.
    pub doorbells: u64,
}

enum Phase {
    /// Own parts not initialised.
    Idle,
    /// Own parts initialised (READY), not attached to the peer's.
    Init(DuplexInit),
    /// Attached.
    Up(Duplex),
}

/// Which ring operation [`Link::make_rings`] performs.
enum RingOp<'a> {
    SetUp,
    Attach(&'a DuplexInit),
}

/// A 1:1 link over an ivshmem device: driver, state machine and rings. See the crate docs.
pub struct Link<R: RegisterAccess> {
    // Declared before `dev`: the rings point into the driver's sections and go first (the
    // `Drop` impl also drops them explicitly).
    phase: Phase,
    dev: Ivshmem<R>,
    peer: u16,
    config: LinkConfig,
    own: LinkState,
    carrier: bool,
    up_since: Option<u64>,
    violation: Option<shmring::Error>,
    stats: LinkStats,
    last_fault: Option<LinkFault>,
    leave_on_drop: bool,
}

impl<R: RegisterAccess> core::fmt::Debug for Link<R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Link")
            .field("id", &self.dev.id())
            .field("peer", &self.peer)
            .field("own", &self.own)
            .field("up", &self.is_up())
            .field("carrier", &self.carrier)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<R: RegisterAccess> Link<R> {
    /// Takes over `dev` for a link to `peer`. Checks the sections: the own output section
    /// is writable, aligned for rings and holds a ring of at least `config.min_capacity`
    /// bytes; the peer's output section exists. Touches neither `STATE` nor shared memory:
    /// the first [`poll`](Self::poll) starts the state machine (call [`leave`](Self::leave)
    /// first to publish RESET over whatever a previous user left in `STATE`).
    ///
    /// The link must be the only user of the own output section's rings: one `Link` per
    /// device (the driver moves into it, so nothing else reaches the section through it).
    /// Interrupts stay the caller's business: enable them (and re-arm in one-shot mode) and
    /// poll after each one.
    pub fn new(dev: Ivshmem<R>, peer: u16, config: LinkConfig) -> Result<Self, LinkError> {
        if peer >= dev.max_peers() || peer == dev.id() {
            return Err(LinkError::BadPeer {
                peer,
                own: dev.id(),
                max_peers: dev.max_peers(),
            });
        }
        let own = dev.own_output();
        if !own.is_writable() || own.is_empty() {
            return Err(LinkError::NoOwnOutput);
        }
        if dev.peer_output(peer).is_none_or(|s| s.is_empty()) {
            return Err(LinkError::NoPeerOutput(peer));
        }
        let align = shmring::layout::REGION_ALIGN;
        if own.as_ptr() as usize % align != 0 {
            return Err(LinkError::MisalignedOwnOutput {
                addr: own.as_ptr() as usize,
                align,
            });
        }
        let too_small = LinkError::SectionTooSmall {
            len: own.len(),
            min: config.min_capacity,
        };
        let capacity = duplex::capacity_for(own.len(), config.max_capacity).ok_or(too_small)?;
        if capacity < config.min_capacity {
            return Err(too_small);
        }
        Ok(Link {
            phase: Phase::Idle,
            dev,
            peer,
            config,
            own: LinkState::Reset,
            carrier: false,
            up_since: None,
            violation: None,
            stats: LinkStats::default(),
            last_fault: None,
            leave_on_drop: true,
        })
    }

    /// Runs the state machine to a stable point; see the crate docs. `now` is the caller's
    /// clock in any unit; it is only recorded as [`up_since`](Self::up_since) when the
    /// carrier comes on.
    pub fn poll(&mut self, now: u64, drain: Drain) -> Status {
        let mut status = Status {
            event: LinkEvent::None,
            departed: None,
            reset: false,
            peer_state: 0,
            fault: None,
        };
        if let Some(error) = self.violation.take() {
            if self.own != LinkState::Reset || self.is_up() {
                self.stats.faults += 1;
                self.tear_down();
                self.publish(LinkState::Reset);
                status.reset = true;
                self.fault(
                    &mut status,
                    LinkFault::PeerViolation {
                        peer: self.peer,
                        error,
                    },
                );
            }
        }
        // At most a handful of steps are ever needed (RESET → INIT → READY → RUN, or a
        // tear-down and a fresh start).
        for _ in 0..8 {
            let peer = self.peer_state();
            status.peer_state = peer;
            let step = state::next(self.own, peer);
            match step.action {
                Action::None => {}
                Action::SetUpOwn => {
                    if let Err(e) = self.set_up_own() {
                        self.stats.setup_failures += 1;
                        self.fault(&mut status, LinkFault::SetUp(e));
                        break;
                    }
                }
                Action::AttachPeer => {
                    if let Err(fault) = self.attach_peer() {
                        self.stats.attach_failures += 1;
                        self.fault(&mut status, fault);
                        break;
                    }
                }
                Action::TearDown => {
                    if drain == Drain::DeliverFirst && self.rx_pending() {
                        // Frames the peer published before it left are still to be received;
                        // the peer waits for our RESET before it sets up again.
                        break;
                    }
                    self.tear_down();
                    self.stats.departures += 1;
                    status.departed = Some(peer);
                    status.reset = true;
                }
            }
            if step.state == self.own && step.action == Action::None {
                break;
            }
            if step.state != self.own {
                self.publish(step.state);
            }
        }
        let carrier = self.is_up() && state::carrier(self.own, status.peer_state);
        status.event = match (self.carrier, carrier) {
            (false, true) => {
                self.stats.ups += 1;
                self.up_since = Some(now);
                LinkEvent::Up
            }
            (true, false) => {
                self.stats.downs += 1;
                self.up_since = None;
                LinkEvent::Down
            }
            _ => LinkEvent::None,
        };
        self.carrier = carrier;
        status
    }

    fn fault(&mut self, status: &mut Status, fault: LinkFault) {
        status.fault = Some(fault);
        self.last_fault = Some(fault);
    }

    /// Whether the receive ring holds a published frame (only while attached).
    fn rx_pending(&mut self) -> bool {
        match &mut self.phase {
            Phase::Up(duplex) => !duplex.rx.is_empty(),
            _ => false,
        }
    }

    fn publish(&mut self, state: LinkState) {
        self.own = state;
        self.dev.set_state(state.as_u32());
    }

    /// The one place where rings are made over the sections.
    fn make_rings(&self, op: RingOp<'_>) -> Result<Phase, shmring::Error> {
        let own = self.dev.own_output();
        // `new` checked that the peer's section exists; an empty one fails shmring's checks.
        let peer = self
            .dev
            .peer_output(self.peer)
            .unwrap_or(ivshmem_dev::Section::empty(false));
        // SAFETY: both sections come from `self.dev`, which the link owns for its whole life.
        // `Section::new`'s contract keeps them mapped (the own one writable) for as long as
        // the driver holding them is used, and the rings made here are used only through
        // `self`: they live in `self.phase`, leave the link by reference only, and `Drop`
        // drops them before the driver. The own output section is written only by these
        // rings: `Link::new` took the driver (one link per device), and set-up happens only
        // from `Phase::Idle` (later set-ups reuse the parts through `Duplex::reset`), so no
        // two rings ever share it. The peer's section is mapped at least readable; its
        // content is untrusted and validated by shmring (`attach`) and on every access.
        unsafe {
            match op {
                RingOp::SetUp => {
                    DuplexInit::init(own.as_ptr(), own.len(), self.config.max_capacity)
                        .map(Phase::Init)
                }
                RingOp::Attach(init) => init.attach(peer.as_ptr(), peer.len()).map(Phase::Up),
            }
        }
    }

    fn set_up_own(&mut self) -> Result<(), shmring::Error> {
        self.phase = match core::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Idle => self.make_rings(RingOp::SetUp)?,
            Phase::Init(init) => Phase::Init(init),
            Phase::Up(duplex) => Phase::Init(duplex.reset()),
        };
        Ok(())
    }

    fn attach_peer(&mut self) -> Result<(), LinkFault> {
        let Phase::Init(init) = &self.phase else {
            return Err(LinkFault::Attach {
                peer: self.peer,
                error: shmring::Error::AlreadyAttached,
            });
        };
        let attached =
            self.make_rings(RingOp::Attach(init))
                .map_err(|error| LinkFault::Attach {
                    peer: self.peer,
                    error,
                })?;
        let Phase::Up(duplex) = attached else {
            // `RingOp::Attach` only ever makes `Phase::Up`.
            self.phase = attached;
            return Ok(());
        };
        let capacity = duplex.rx.capacity().min(duplex.tx.capacity());
        if capacity < self.config.min_capacity {
            // Keep our parts (re-initialised: nothing was exchanged) and stay READY.
            self.phase = Phase::Init(duplex.reset());
            return Err(LinkFault::RingTooSmall {
                peer: self.peer,
                capacity,
                min: self.config.min_capacity,
            });
        }
        self.phase = Phase::Up(duplex);
        Ok(())
    }

    fn tear_down(&mut self) {
        self.stats.teardowns += 1;
        self.phase = match core::mem::replace(&mut self.phase, Phase::Idle) {
            // Own parts back to index 0; a fresh READY announces them again.
            Phase::Up(duplex) => Phase::Init(duplex.reset()),
            other => other,
        };
    }

    /// Rings the peer's doorbell if `notify` says the peer asked for it (the rings'
    /// notification suppression). Returns whether it rang.
    pub fn notify(&mut self, notify: Notify) -> bool {
        if notify.needed() {
            self.dev.ring_peer(self.peer);
            self.stats.doorbells += 1;
            true
        } else {
            false
        }
    }

    /// Publishes pending commits and releases of both rings (one index store each) and
    /// rings the doorbell if the peer asked. Returns whether it rang.
    pub fn flush(&mut self) -> bool {
        let notify = match &mut self.phase {
            Phase::Up(duplex) => duplex.tx.flush() | duplex.rx.flush(),
            _ => return false,
        };
        self.notify(notify)
    }

    /// Records a protocol violation of the peer found while using the rings (any
    /// [`shmring::Error`] from them other than `Full`). The next [`poll`](Self::poll) resets
    /// the link and reports [`LinkFault::PeerViolation`].
    pub fn report_violation(&mut self, error: shmring::Error) {
        self.violation.get_or_insert(error);
    }

    /// Leaves the link: drops the rings (own parts reset) and publishes RESET, so the peer
    /// tears down too. The next [`poll`](Self::poll) starts over.
    pub fn leave(&mut self) {
        if self.is_up() {
            self.tear_down();
        }
        if self.carrier {
            self.stats.downs += 1;
        }
        self.carrier = false;
        self.up_since = None;
        self.publish(LinkState::Reset);
    }

    /// Makes dropping the link silent: the rings are still dropped, but `STATE` keeps its
    /// value. For a process that handed its attachment to another one (after a `fork`) and
    /// must not announce a departure itself.
    pub fn keep_state_on_drop(&mut self) {
        self.leave_on_drop = false;
    }

    /// The attached rings (`None` unless both sides' parts are attached).
    pub fn rings_mut(&mut self) -> Option<&mut Duplex> {
        match &mut self.phase {
            Phase::Up(duplex) => Some(duplex),
            _ => None,
        }
    }

    /// The attached rings, read-only.
    pub fn rings(&self) -> Option<&Duplex> {
        match &self.phase {
            Phase::Up(duplex) => Some(duplex),
            _ => None,
        }
    }

    /// Whether both sides' ring parts are attached (frames may be received; sending waits
    /// for the [`carrier`](Self::carrier), so nothing is published before the peer attached).
    pub fn is_up(&self) -> bool {
        matches!(self.phase, Phase::Up(_))
    }

    /// Whether the carrier is on (both sides RUN, rings attached), as of the last poll.
    pub fn carrier(&self) -> bool {
        self.carrier
    }

    /// When (the `now` of [`poll`](Self::poll)) the carrier last came on, while it is on.
    pub fn up_since(&self) -> Option<u64> {
        self.up_since
    }

    /// This side's link state (as published in `STATE`).
    pub fn state(&self) -> LinkState {
        self.own
    }

    /// The peer's ID.
    pub fn peer(&self) -> u16 {
        self.peer
    }

    /// The peer's current state-table entry (untrusted: any value; 0 if unreadable).
    pub fn peer_state(&self) -> u32 {
        self.dev.peer_state(self.peer).unwrap_or(0)
    }

    /// The configuration.
    pub fn config(&self) -> LinkConfig {
        self.config
    }

    /// Life-cycle counters.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// The last fault a poll reported (kept until the next one).
    pub fn last_fault(&self) -> Option<LinkFault> {
        self.last_fault
    }

    /// The device driver.
    pub fn device(&self) -> &Ivshmem<R> {
        &self.dev
    }
}

impl<R: RegisterAccess> Drop for Link<R> {
    fn drop(&mut self) {
        // Rings point into the driver's sections: drop them before the driver goes, and tell
        // the peer we left.
        self.phase = Phase::Idle;
        if self.leave_on_drop {
            self.dev.set_state(LinkState::Reset.as_u32());
        }
    }
}
