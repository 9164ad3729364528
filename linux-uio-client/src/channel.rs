//! tokio on top of an [`Endpoint`]: a duplex shmring channel over the link, driven by the
//! ivshmem link state machine, with the interrupt fd under tokio's reactor.
//!
//! [`Channel`] owns an endpoint and gives:
//! - [`Channel::interrupt`]: `await` the next interrupt (taken and re-armed; re-check after);
//! - receiving: [`Channel::recv_frame`], [`Channel::recv_record`], and the streams
//!   [`Channel::frames`] (byte frames) and [`Channel::records`] (typed `Pod` records);
//! - sending with back-pressure: [`Channel::send`] and [`Channel::send_record`] wait for room,
//!   woken by the peer through the rings' wait-for-space handshake;
//! - [`tokio::io::AsyncRead`] and [`tokio::io::AsyncWrite`] on the channel itself (a byte
//!   stream cut into frames of at most [`shmring::Producer::max_frame_len`]; a write first
//!   waits for the link, so the limit is always the real ring's);
//! - [`Channel::peer_states`]: a stream of the peer's state-table entry.
//!
//! # Link life cycle
//! The link is an [`ivshmem_link::Link`]: after every interrupt (and whenever a ring is found
//! empty or full) the channel polls it (it reads the peer's state-table entry, steps the state
//! machine, sets up, attaches or resets the rings and writes the own `STATE`); receives poll
//! with [`Drain::DeliverFirst`], sends and [`Channel::wait_up`] with [`Drain::Discard`].
//! When the peer leaves (its state goes to 0) a receiver first gets every frame
//! the peer had published, then one [`ChannelError::PeerGone`] naming the peer, and the
//! streams end. The next receive or send waits until the peer is back (it comes back through
//! INIT and READY; the channel resets its own ring parts and re-attaches), so a new stream can
//! be taken from the same channel.
//!
//! A peer's frames are never torn: a frame becomes visible only with the producer's index
//! store after the whole frame was written, so a peer killed mid-write leaves at most an
//! unpublished partial frame, which is never read.
//!
//! # Waiting: interrupts, polling, or hybrid
//! [`WaitMode::Interrupt`] announces sleep in the ring (`Consumer::prepare_sleep` /
//! `Producer::prepare_wait_for_space`), re-checks, and awaits the interrupt fd.
//! [`WaitMode::Poll`] first re-polls for up to `spin` (yielding to the runtime between tries,
//! without announcing sleep, so the peer rings no doorbell), then falls back to interrupts.
//! The spin restarts after every frame, so it is measured from the last frame (or from the
//! first empty look at the ring), not from the start of the channel.
//!
//! **Hybrid waiting** is polling with a short bound ([`WaitMode::hybrid`], spin
//! [`WaitMode::HYBRID_SPIN`]): a stream whose frames come closer together than the bound never
//! sleeps (it gets polling mode's latency), while an idle link costs one bound of spinning
//! and then nothing. A wake-up through the doorbell costs tens of µs on a VM (about 34 µs on
//! the development VM) and several µs on bare metal, so sleeping at once loses most of the
//! latency; spinning for about the cost of a wake-up is the classic spin-then-block rule that
//! never costs more than twice the better of the two choices made in hindsight. Long
//! `spin`s (`Poll { spin: 100 ms }`) are plain polling.
//!
//! # The interrupt fds under tokio
//! Every vector's fd ([`Endpoint::vector_fds`]: one per vector on an MSI-X link, else just the
//! one) is duplicated and registered with [`AsyncFd::register_with_interest`] (READABLE), so
//! a doorbell on any vector wakes a waiting channel; the wake-up then takes every pending
//! vector at once ([`EndpointInterrupt::take`]). In this project's tokio (1.54) `AsyncFd::new`
//! and `AsyncFd::with_interest` are deprecated as unsound without I/O safety, and the `unsafe`
//! `register`/`register_with_interest` replace them; the duplicated [`OwnedFd`]s owned by the
//! `AsyncFd`s meet their contract (open, the same description, for their whole life).
//!
//! # Writing received frames out
//! [`Channel::recv_frame_into`] writes the next frame to a tokio [`AsyncWrite`] straight from
//! peer memory (through [`write_peer_bytes`]: bounded chunks, each byte read once, no
//! frame-sized staging buffer), and releases the frame only after the write; the synchronous
//! counterpart for a [`PeerBytes`] is [`PeerBytes::write_to`] (`std::io::Write`).
//!
//! # `STATE` writes
//! Each link state change writes this side's `STATE` register, from inside the `poll_*`
//! functions. On the UIO and local backends that is a register or memory store. On the hosted
//! backend it is a short blocking round trip to the hypervisor over its socket: on a
//! multi-thread runtime the channel runs it in [`tokio::task::block_in_place`] (the worker's
//! other tasks move to another thread meanwhile); on a current-thread runtime it blocks the
//! runtime for that round trip. It happens a few times per link bring-up or tear-down, never
//! per frame.
//!
//! # One task
//! The channel is `Send` but not `Sync`: drive it from one task. `tokio::io::split` across two
//! tasks works: both halves share one interrupt registration whose wake-up wakes both.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytemuck::Pod;
use futures_core::Stream;
use ivshmem_dev::{Ivshmem, RegisterAccess};
use ivshmem_link::{Drain, Link, LinkConfig, LinkFault, LinkState};
use shmring::view::PeerBytes;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::sync::watch;

use crate::endpoint::{Backend, Endpoint, EndpointError, EndpointInterrupt, EndpointRegisters};

/// Polling mode: producer-index checks per poll before yielding to the runtime.
const SPIN_CHECKS: usize = 256;

/// How a waiting channel waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Announce sleep in the ring and await the interrupt (lowest CPU use).
    Interrupt,
    /// Re-poll the ring for up to `spin` (a short busy spin per poll, then a yield to the
    /// runtime), then fall back to interrupts. Lowest latency: a polling consumer asks for no
    /// doorbell.
    Poll {
        /// How long to keep polling before sleeping on the interrupt.
        spin: Duration,
    },
}

impl WaitMode {
    /// Hybrid waiting's default spin: about three wake-ups on the development VM (34 µs
    /// each), so that streams of 10 000 frames/s and more never sleep between frames, while
    /// an idle link spins for 100 µs once and then sleeps.
    pub const HYBRID_SPIN: Duration = Duration::from_micros(100);

    /// Hybrid waiting: poll for [`WaitMode::HYBRID_SPIN`] after the last frame, then sleep on
    /// the doorbell (see the module docs).
    pub const fn hybrid() -> Self {
        WaitMode::Poll {
            spin: Self::HYBRID_SPIN,
        }
    }
}

/// Options of [`Channel::new`].
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    /// The peer to talk to (`None`: the other peer of a two-peer link).
    pub peer: Option<u16>,
    /// A name for the peer in errors and reports (e.g. its cell name).
    pub peer_name: Option<String>,
    /// Cap on the capacity of the ring this side sends on.
    pub max_capacity: Option<usize>,
    /// How to wait.
    pub wait: WaitMode,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            peer: None,
            peer_name: None,
            max_capacity: None,
            wait: WaitMode::Interrupt,
        }
    }
}

/// Errors of a [`Channel`].
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The peer left the link (its state went to 0, or it restarted).
    #[error("{peer} left link `{link}` (state {state})")]
    PeerGone {
        /// The link name.
        link: String,
        /// The peer, as "peer N" or "peer N (`name`)".
        peer: String,
        /// The state it was seen in.
        state: u32,
    },
    /// The peer broke the ring protocol (or a frame can never fit).
    #[error("ring with {peer}: {source}")]
    Ring {
        /// The peer.
        peer: String,
        /// The ring error.
        source: shmring::Error,
    },
    /// A received frame has the wrong length for the record type.
    #[error("{peer} sent a frame of {len} bytes, a record is {expected}")]
    BadRecord {
        /// The peer.
        peer: String,
        /// Frame length.
        len: usize,
        /// Record size.
        expected: usize,
    },
    /// The link has more than two peers and none was chosen, or the chosen one is invalid.
    #[error("link `{link}`: {detail}")]
    BadPeer {
        /// The link.
        link: String,
        /// What is wrong.
        detail: String,
    },
    /// The endpoint's sections cannot carry the link.
    #[error("link `{link}`: {error}")]
    Link {
        /// The link.
        link: String,
        /// What is wrong.
        error: ivshmem_link::LinkError,
    },
    /// The endpoint failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// Writing a received frame to the caller's writer failed ([`Channel::recv_frame_into`]).
    #[error("writing a frame from {peer}: {source}")]
    Write {
        /// The peer.
        peer: String,
        /// The writer's error.
        source: io::Error,
    },
    /// Registering or polling the interrupt fd failed.
    #[error("interrupt fd: {0}")]
    Io(#[from] io::Error),
}

impl From<ChannelError> for io::Error {
    fn from(e: ChannelError) -> io::Error {
        let kind = match e {
            ChannelError::PeerGone { .. } => io::ErrorKind::ConnectionReset,
            ChannelError::Ring { .. } | ChannelError::BadRecord { .. } => {
                io::ErrorKind::InvalidData
            }
            ChannelError::Io(ref inner)
            | ChannelError::Write {
                source: ref inner, ..
            } => inner.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// The peer's state as the channel last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerState {
    /// The peer's ID.
    pub peer: u16,
    /// Its state-table entry (untrusted: any value).
    pub state: u32,
    /// This side's link state at that time.
    pub own: LinkState,
}

impl PeerState {
    /// Whether the peer is there (state not 0).
    pub fn present(&self) -> bool {
        self.state != 0
    }
}

/// Wakes every task that waits on the shared interrupt registration.
#[derive(Default)]
struct Waiters {
    slots: Mutex<[Option<Waker>; 2]>,
}

impl Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let wakers = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            [slots[0].take(), slots[1].take()]
        };
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }
}

/// Which side waits (slot in [`Waiters`]).
#[derive(Clone, Copy)]
enum Side {
    Rx = 0,
    Tx = 1,
}

/// What one look at the link found.
enum LinkCheck {
    /// Attached (frames may flow).
    Up,
    /// Not attached yet: wait for an interrupt.
    Down,
    /// The peer left; the frames it published are drained; report it once.
    Gone(u32),
}

/// A duplex channel to one peer over an [`Endpoint`], with tokio wake-ups.
pub struct Channel {
    name: String,
    link: Link<ChannelRegisters>,
    interrupt: EndpointInterrupt,
    /// One registration per interrupt vector (see the module docs).
    irqs: Vec<AsyncFd<OwnedFd>>,
    waiters: Arc<Waiters>,
    combined: Waker,
    peer: u16,
    peer_label: String,
    options: ChannelOptions,
    states: watch::Sender<PeerState>,
    spin_since: [Option<Instant>; 2],
    /// Departure seen and not reported yet (peer state).
    gone_pending: Option<u32>,
    /// Departure reported to a receiver (`Some`) until the link is up again.
    reported_rx: bool,
    reported_tx: bool,
    /// AsyncRead: the rest of a frame larger than the caller's buffer.
    partial: VecDeque<u8>,
    stats: ChannelStats,
}

/// Counters of a [`Channel`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Interrupts taken (each may merge several doorbells or state changes).
    pub interrupts: u64,
    /// Doorbells this side rang (the peer asked for them).
    pub doorbells: u64,
    /// Times the peer left.
    pub departures: u64,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("link", &self.name)
            .field("peer", &self.peer_label)
            .field("own", &self.link.state())
            .field("up", &self.link.is_up())
            .finish()
    }
}

impl Channel {
    /// Takes over `endpoint` (must be called inside a tokio runtime). Nothing is set up yet:
    /// the link comes up as the channel is driven (any receive, send, or
    /// [`Channel::wait_up`]).
    pub fn new(endpoint: Endpoint, options: ChannelOptions) -> Result<Self, ChannelError> {
        let link = endpoint.name().to_string();
        let link_name = link.clone();
        let max_peers = endpoint.ivshmem().max_peers();
        let peer = match options.peer.or_else(|| endpoint.the_peer()) {
            Some(p) if p < max_peers && p != endpoint.id() => p,
            Some(p) => {
                return Err(ChannelError::BadPeer {
                    link,
                    detail: format!(
                        "peer {p} is not another peer of this {max_peers}-peer link (own ID {})",
                        endpoint.id()
                    ),
                })
            }
            None => {
                return Err(ChannelError::BadPeer {
                    link,
                    detail: format!("{max_peers} peers: choose one in ChannelOptions::peer"),
                })
            }
        };
        let peer_label = match &options.peer_name {
            Some(name) => format!("peer {peer} (`{name}`)"),
            None => format!("peer {peer}"),
        };
        let mut irqs = Vec::new();
        for fd in endpoint.vector_fds() {
            let fd = fd.try_clone_to_owned()?;
            // SAFETY: `fd` is a fresh duplicate owned by the AsyncFd for its whole life, so it
            // stays open and refers to the same description; `OwnedFd::as_raw_fd` never
            // changes.
            let irq = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
            irqs.push(irq);
        }
        let waiters = Arc::new(Waiters::default());
        let combined = Waker::from(Arc::clone(&waiters));
        let initial = PeerState {
            peer,
            state: endpoint.ivshmem().peer_state(peer).unwrap_or(0),
            own: LinkState::Reset,
        };
        let backend = endpoint.backend();
        let (dev, interrupt) = endpoint.into_parts();
        let regs = ChannelRegisters {
            inner: dev.registers().clone(),
            hosted: backend == Backend::Hosted,
        };
        let dev = Ivshmem::new(regs, *dev.sections()).map_err(EndpointError::from)?;
        let config = LinkConfig {
            max_capacity: options.max_capacity,
            ..LinkConfig::default()
        };
        let mut link = Link::new(dev, peer, config).map_err(|error| ChannelError::Link {
            link: link.clone(),
            error,
        })?;
        // Start from RESET as the device does (a previous user may have left another value).
        link.leave();
        Ok(Self {
            name: link_name,
            link,
            interrupt,
            irqs,
            waiters,
            combined,
            peer,
            peer_label,
            options,
            states: watch::channel(initial).0,
            spin_since: [None, None],
            gone_pending: None,
            reported_rx: false,
            reported_tx: false,
            partial: VecDeque::new(),
            stats: ChannelStats::default(),
        })
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device driver (owned by the channel's link).
    pub fn device(&self) -> &Ivshmem<ChannelRegisters> {
        self.link.device()
    }

    /// The peer's ID.
    pub fn peer(&self) -> u16 {
        self.peer
    }

    /// "peer N" or "peer N (`name`)".
    pub fn peer_label(&self) -> &str {
        &self.peer_label
    }

    /// This side's link state.
    pub fn link_state(&self) -> LinkState {
        self.link.state()
    }

    /// Whether both rings are attached.
    pub fn is_up(&self) -> bool {
        self.link.is_up()
    }

    /// Whether the carrier is on (both sides RUN): sending only happens then.
    pub fn carrier(&self) -> bool {
        self.link.carrier()
    }

    /// Counters so far.
    pub fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// Changes the wait mode.
    pub fn set_wait_mode(&mut self, wait: WaitMode) {
        self.options.wait = wait;
    }

    /// A stream of the peer's state as this channel observes it (changes are seen while the
    /// channel is driven; quick successive changes may be merged into the latest). The
    /// stream may be moved to another task; it ends when the channel is dropped.
    pub fn peer_states(&self) -> PeerStates {
        PeerStates::new(self.states.subscribe())
    }

    /// The peer's current state-table entry.
    pub fn peer_state(&self) -> u32 {
        self.link.peer_state()
    }

    fn ring_error(&self, source: shmring::Error) -> ChannelError {
        ChannelError::Ring {
            peer: self.peer_label.clone(),
            source,
        }
    }

    fn gone_error(&self, state: u32) -> ChannelError {
        ChannelError::PeerGone {
            link: self.name.clone(),
            peer: self.peer_label.clone(),
            state,
        }
    }

    fn publish_state(&self, state: u32) {
        let now = PeerState {
            peer: self.peer,
            state,
            own: self.link.state(),
        };
        self.states.send_if_modified(|old| {
            let changed = *old != now;
            *old = now;
            changed
        });
    }

    /// Polls the link (see the module docs); with `drain_first`, a departure is not acted
    /// on while the receive ring still holds published frames (they are delivered first).
    ///
    /// The observed peer state is published to [`Channel::peer_states`] once per call.
    fn check_link(&mut self, drain_first: bool) -> Result<LinkCheck, ChannelError> {
        let drain = if drain_first {
            Drain::DeliverFirst
        } else {
            Drain::Discard
        };
        let was_up = self.link.is_up();
        let status = self.link.poll(0, drain);
        if let Some(state) = status.departed {
            self.gone_pending = Some(state);
            self.stats.departures += 1;
            tracing::info!(link = self.name, peer = %self.peer_label, state, "peer left");
        }
        if self.link.is_up() && (!was_up || status.departed.is_some()) {
            // Attached (again): a new departure will be reported anew.
            self.reported_rx = false;
            self.reported_tx = false;
            self.gone_pending = None;
        }
        self.publish_state(status.peer_state);
        match status.fault {
            None => {}
            // The peer announced READY before its parts are valid: a broken or racing peer.
            // Stay READY and look again at the next interrupt.
            Some(LinkFault::Attach {
                error: shmring::Error::PeerNotReady,
                ..
            }) => return Ok(LinkCheck::Down),
            Some(
                LinkFault::SetUp(error)
                | LinkFault::Attach { error, .. }
                | LinkFault::PeerViolation { error, .. },
            ) => return Err(self.ring_error(error)),
            Some(LinkFault::RingTooSmall { capacity, min, .. }) => {
                return Err(self.ring_error(shmring::Error::RegionTooSmall {
                    needed: min,
                    got: capacity,
                }))
            }
        }
        if let Some(state) = self.gone_pending {
            return Ok(LinkCheck::Gone(state));
        }
        Ok(if self.link.is_up() {
            LinkCheck::Up
        } else {
            LinkCheck::Down
        })
    }

    /// Polls for the next interrupt: takes it (re-arming one-shot mode) and returns its
    /// merged count. Re-check rings and state after `Ready`.
    fn poll_irq(&mut self, cx: &mut Context<'_>, side: Side) -> Poll<Result<u64, ChannelError>> {
        {
            let mut slots = self.waiters.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots[side as usize] = Some(cx.waker().clone());
        }
        let mut combined_cx = Context::from_waker(&self.combined);
        loop {
            // Poll every vector's registration (each one not ready stores the waker).
            let mut ready_guards = Vec::new();
            for irq in &self.irqs {
                if let Poll::Ready(guard) = irq.poll_read_ready(&mut combined_cx) {
                    ready_guards.push(guard?);
                }
            }
            if ready_guards.is_empty() {
                return Poll::Pending;
            }
            // Takes every pending vector at once.
            let taken = self.interrupt.take();
            // Read everything pending (or nothing was there): no longer readable. A new
            // interrupt after our read is a new readiness event that clear_ready keeps.
            for mut guard in ready_guards {
                guard.clear_ready();
            }
            if let Some(n) = taken? {
                self.stats.interrupts += 1;
                // The other side's task re-checks too (it may wait for the same interrupt).
                self.waiters.wake_by_ref_other(side);
                return Poll::Ready(Ok(n));
            }
        }
    }

    /// Awaits the next interrupt (taken and re-armed); returns how many were merged into it.
    /// Afterwards re-check the rings and the state table: anything that happened between the
    /// interrupt and the re-arm raised none.
    pub async fn interrupt(&mut self) -> Result<u64, ChannelError> {
        std::future::poll_fn(|cx| self.poll_irq(cx, Side::Rx)).await
    }

    /// Whether to keep spinning (polling mode) instead of sleeping; schedules a re-poll.
    fn spin(&mut self, cx: &mut Context<'_>, side: Side) -> bool {
        let WaitMode::Poll { spin } = self.options.wait else {
            return false;
        };
        let now = Instant::now();
        let since = *self.spin_since[side as usize].get_or_insert(now);
        if now.duration_since(since) < spin {
            cx.waker().wake_by_ref();
            true
        } else {
            false
        }
    }

    /// Waits until the link is up (both rings attached).
    pub async fn wait_up(&mut self) -> Result<(), ChannelError> {
        std::future::poll_fn(|cx| loop {
            match self.check_link(false)? {
                LinkCheck::Up => return Poll::Ready(Ok(())),
                LinkCheck::Gone(_) => {
                    // Acknowledge: a caller waiting for the link wants the next attach.
                    self.gone_pending = None;
                    continue;
                }
                LinkCheck::Down => {}
            }
            ready!(self.poll_irq(cx, Side::Rx))?;
        })
        .await
    }

    /// Waits until the receive ring holds a published frame (link checks, departures and
    /// the wait mode as in the module docs); `Ready(Err(PeerGone))` once per departure.
    fn poll_rx_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ChannelError>> {
        loop {
            if let Some(duplex) = self.link.rings_mut() {
                if !duplex.rx.is_empty() {
                    return Poll::Ready(Ok(()));
                }
            }
            match self.check_link(true)? {
                LinkCheck::Gone(state) => {
                    if !self.reported_rx {
                        self.reported_rx = true;
                        return Poll::Ready(Err(self.gone_error(state)));
                    }
                    // Reported already: wait for the peer to come back.
                    self.gone_pending = None;
                    continue;
                }
                LinkCheck::Up => {
                    if let (WaitMode::Poll { .. }, Some(duplex)) =
                        (self.options.wait, self.link.rings_mut())
                    {
                        // A short busy spin on the producer index before yielding to the
                        // runtime: most samples arrive within it under load.
                        if (0..SPIN_CHECKS).any(|_| {
                            std::hint::spin_loop();
                            !duplex.rx.is_empty()
                        }) {
                            continue;
                        }
                    }
                    if self.spin(cx, Side::Rx) {
                        return Poll::Pending;
                    }
                    if let Some(duplex) = self.link.rings_mut() {
                        match duplex.rx.prepare_sleep() {
                            Ok(true) => {}
                            Ok(false) => continue,
                            Err(e) => return Poll::Ready(Err(self.ring_error(e))),
                        }
                    }
                }
                LinkCheck::Down => {}
            }
            ready!(self.poll_irq(cx, Side::Rx))?;
        }
    }

    /// After a frame was released: publishes the release (ringing the peer if it waits for
    /// space) and restarts the receive spin.
    fn released(&mut self) {
        if let Some(duplex) = self.link.rings_mut() {
            let notify = duplex.rx.flush();
            if self.link.notify(notify) {
                self.stats.doorbells += 1;
            }
        }
        self.spin_since[Side::Rx as usize] = None;
    }

    /// Core of every receive: hands the next frame to `f` as a [`PeerBytes`] view (inside
    /// shared memory the peer can still write, so never as a `&[u8]`: `f` copies out what it
    /// needs, reading each byte once), then releases it. `Ready(Err(PeerGone))` once per
    /// departure.
    fn poll_recv_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        f: &mut dyn FnMut(&PeerBytes<'_>) -> R,
    ) -> Poll<Result<R, ChannelError>> {
        loop {
            ready!(self.poll_rx_ready(cx))?;
            let Some(duplex) = self.link.rings_mut() else {
                continue;
            };
            let peeked = duplex.rx.peek();
            match peeked {
                Ok(Some(frame)) => {
                    let out = f(&frame.payload());
                    frame.release();
                    self.released();
                    return Poll::Ready(Ok(out));
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(self.ring_error(e))),
            }
        }
    }

    /// Receives the next frame and writes it to `w` straight from peer memory (through
    /// [`write_peer_bytes`]: bounded chunks, each byte read once, no frame-sized buffer),
    /// then releases it; returns the frame's length. Waits and reports departures like
    /// [`Channel::recv_frame`].
    ///
    /// The frame stays in the ring until `w` took all of it: the peer cannot reuse its
    /// space meanwhile (a slow writer back-pressures the peer, as a full ring does). On a
    /// write error ([`ChannelError::Write`]) or if the future is dropped mid-write, the
    /// frame is not consumed (the next receive gets it again) and a prefix of it may have
    /// been written.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use linux_uio_client::{Channel, ChannelOptions, Endpoint, LocalLink};
    ///
    /// let link = LocalLink::new("frame-into", 2, 64 * 1024)?;
    /// let mut a = Channel::new(Endpoint::attach_local(&link, 0)?, ChannelOptions::default())?;
    /// let mut b = Channel::new(Endpoint::attach_local(&link, 1)?, ChannelOptions::default())?;
    /// // 12,000 bytes: under this link's largest frame (16,376 bytes for 64 KiB sections).
    /// let frame: Vec<u8> = (0..12_000u32).map(|i| i as u8).collect();
    /// // Any tokio AsyncWrite: a socket, a file, a pipe; here an in-memory vector.
    /// let mut out = Vec::new();
    /// // try_join: a failed send ends the example at once instead of leaving recv waiting.
    /// let ((), got) = tokio::try_join!(a.send(&frame), b.recv_frame_into(&mut out))?;
    /// assert_eq!(got, frame.len());
    /// assert_eq!(out, frame);
    /// # Ok(()) }
    /// ```
    pub async fn recv_frame_into<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        w: &mut W,
    ) -> Result<usize, ChannelError> {
        loop {
            std::future::poll_fn(|cx| self.poll_rx_ready(cx)).await?;
            let peer = &self.peer_label;
            let Some(duplex) = self.link.rings_mut() else {
                continue;
            };
            let frame = match duplex.rx.peek() {
                Ok(Some(frame)) => frame,
                Ok(None) => continue,
                Err(source) => {
                    return Err(ChannelError::Ring {
                        peer: peer.clone(),
                        source,
                    })
                }
            };
            let frame = SendFrame(frame);
            let len = frame.0.len();
            write_peer_bytes(frame.0.payload(), w)
                .await
                .map_err(|source| ChannelError::Write {
                    peer: peer.clone(),
                    source,
                })?;
            frame.0.release();
            self.released();
            return Ok(len);
        }
    }

    /// Receives the next frame into a new vector.
    pub async fn recv_frame(&mut self) -> Result<Vec<u8>, ChannelError> {
        std::future::poll_fn(|cx| self.poll_recv_with(cx, &mut |f: &PeerBytes<'_>| f.to_vec()))
            .await
    }

    /// Receives the next frame as a record of type `T` (a frame of another length is
    /// [`ChannelError::BadRecord`]; it is consumed).
    pub async fn recv_record<T: Pod>(&mut self) -> Result<T, ChannelError> {
        std::future::poll_fn(|cx| self.poll_record(cx)).await
    }

    fn poll_record<T: Pod>(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, ChannelError>> {
        let got = ready!(self.poll_recv_with(cx, &mut |f: &PeerBytes<'_>| {
            if f.len() == size_of::<T>() {
                // One copy out of the peer's memory; the length was checked just above.
                f.read::<T>(0).map_err(|_| f.len())
            } else {
                Err(f.len())
            }
        }))?;
        Poll::Ready(got.map_err(|len| ChannelError::BadRecord {
            peer: self.peer_label.clone(),
            len,
            expected: size_of::<T>(),
        }))
    }

    /// A stream of typed records; it yields `Err(PeerGone)` once when the peer leaves and
    /// then ends (take a new stream to continue after the peer comes back).
    pub fn records<T: Pod>(&mut self) -> Records<'_, T> {
        Records {
            channel: self,
            done: false,
            _type: PhantomData,
        }
    }

    /// A stream of byte frames; ends like [`Channel::records`].
    pub fn frames(&mut self) -> Frames<'_> {
        Frames {
            channel: self,
            done: false,
        }
    }

    /// Core of every send: waits for room for `len` bytes, lets `fill` write the frame, and
    /// publishes it (ringing the peer if it asked).
    fn poll_send_with(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Poll<Result<(), ChannelError>> {
        loop {
            let carrier = self.link.carrier();
            if let (Some(duplex), true) = (self.link.rings_mut(), carrier) {
                match duplex.tx.grant(len) {
                    Ok(mut grant) => {
                        fill(&mut grant);
                        grant.commit();
                        let notify = duplex.tx.flush();
                        if self.link.notify(notify) {
                            self.stats.doorbells += 1;
                        }
                        self.spin_since[Side::Tx as usize] = None;
                        return Poll::Ready(Ok(()));
                    }
                    Err(shmring::Error::Full { .. }) => {}
                    Err(e) => return Poll::Ready(Err(self.ring_error(e))),
                }
            }
            match self.check_link(false)? {
                LinkCheck::Gone(state) => {
                    if !self.reported_tx {
                        self.reported_tx = true;
                        return Poll::Ready(Err(self.gone_error(state)));
                    }
                    self.gone_pending = None;
                    continue;
                }
                // Attached, but the peer is not RUN yet: its state change will interrupt us.
                LinkCheck::Up if !self.link.carrier() => {}
                LinkCheck::Up => {
                    if self.spin(cx, Side::Tx) {
                        return Poll::Pending;
                    }
                    if let Some(duplex) = self.link.rings_mut() {
                        match duplex.tx.prepare_wait_for_space(len) {
                            Ok(true) => {}
                            Ok(false) => continue,
                            Err(e) => return Poll::Ready(Err(self.ring_error(e))),
                        }
                    }
                }
                LinkCheck::Down => {}
            }
            ready!(self.poll_irq(cx, Side::Tx))?;
        }
    }

    /// Waits until frames may be sent (rings attached, carrier on); `Err(PeerGone)` once per
    /// departure, as for a send.
    fn poll_carrier(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ChannelError>> {
        loop {
            if self.link.is_up() && self.link.carrier() {
                return Poll::Ready(Ok(()));
            }
            match self.check_link(false)? {
                LinkCheck::Gone(state) => {
                    if !self.reported_tx {
                        self.reported_tx = true;
                        return Poll::Ready(Err(self.gone_error(state)));
                    }
                    self.gone_pending = None;
                    continue;
                }
                LinkCheck::Up if self.link.carrier() => continue,
                LinkCheck::Up | LinkCheck::Down => {}
            }
            ready!(self.poll_irq(cx, Side::Tx))?;
        }
    }

    /// Sends one frame, waiting for room (back-pressure) and for the link to be up.
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), ChannelError> {
        std::future::poll_fn(|cx| {
            self.poll_send_with(cx, frame.len(), &mut |dst: &mut [u8]| {
                dst.copy_from_slice(frame)
            })
        })
        .await
    }

    /// Sends one record.
    pub async fn send_record<T: Pod>(&mut self, record: &T) -> Result<(), ChannelError> {
        self.send(bytemuck::bytes_of(record)).await
    }

    /// Largest frame the sending ring accepts (`None` while the link is not up).
    pub fn max_frame_len(&self) -> Option<usize> {
        self.link.rings().map(|d| d.tx.max_frame_len())
    }
}

/// A peeked frame held across the `.await`s of [`Channel::recv_frame_into`], so that its
/// future stays `Send` (a [`shmring::Frame`] is not, for its raw payload pointer).
struct SendFrame<'a>(shmring::Frame<'a>);

// SAFETY: a frame is a `&mut Consumer` (and `Consumer` is `Send`) plus a pointer into that
// consumer's mapped ring and a few integers; the payload is only read through `PeerBytes`
// (itself `Send`). Moving it to another thread with its consumer borrow is as sound as moving
// the consumer.
unsafe impl Send for SendFrame<'_> {}

/// Chunk size of [`write_peer_bytes`] (as [`PeerBytes::write_to`]'s): few `write` calls.
const WRITE_CHUNK: usize = 16 * 1024;

/// Writes the whole view to `w` (`write_all` semantics) and flushes nothing: the async
/// counterpart of [`PeerBytes::write_to`]. Peer memory is copied in bounded chunks (at most
/// 16 KiB, into one buffer of `min(len, 16 KiB)` bytes owned by this future) and each chunk is
/// handed to `w` with `write_all`: each byte is read once, no `&[u8]` over peer memory reaches
/// `w`, and nothing the size of the frame is staged. On an error a prefix may have been
/// written.
///
/// The view borrows its frame, which must stay unreleased until this returns (the borrow
/// checker sees to it); [`Channel::recv_frame_into`] does all of that for a channel.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (mut tx, mut rx) = shmring::channel(64 * 1024)?;
/// let _ = tx.try_send(b"hello from the peer")?;
/// let frame = rx.peek()?.expect("a frame");
/// let (mut ours, mut theirs) = tokio::io::duplex(64);
/// linux_uio_client::channel::write_peer_bytes(frame.payload(), &mut ours).await?;
/// frame.release();
/// drop(ours);
/// let mut got = Vec::new();
/// tokio::io::AsyncReadExt::read_to_end(&mut theirs, &mut got).await?;
/// assert_eq!(got, b"hello from the peer");
/// # Ok(()) }
/// ```
pub async fn write_peer_bytes<W: AsyncWrite + Unpin + ?Sized>(
    bytes: PeerBytes<'_>,
    w: &mut W,
) -> io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let mut buf = vec![0u8; bytes.len().min(WRITE_CHUNK)];
    let mut offset = 0;
    while offset < bytes.len() {
        let n = (bytes.len() - offset).min(buf.len());
        let chunk = &mut buf[..n];
        bytes
            .copy_range_to(offset, chunk)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        w.write_all(chunk).await?;
        offset += n;
    }
    Ok(())
}

/// The endpoint's registers as the channel's link uses them. A `STATE` write on the hosted
/// backend is a short blocking round trip to the hypervisor over its socket; on a multi-thread
/// tokio runtime it runs inside [`tokio::task::block_in_place`], so the worker's other tasks
/// move to another thread meanwhile. Elsewhere (current-thread runtime, no runtime, UIO and
/// local backends, where the write is a plain register or memory store) it is direct.
#[derive(Debug, Clone)]
pub struct ChannelRegisters {
    inner: EndpointRegisters,
    hosted: bool,
}

impl RegisterAccess for ChannelRegisters {
    fn read32(&self, offset: u32) -> u32 {
        self.inner.read32(offset)
    }

    fn write32(&self, offset: u32, value: u32) {
        let write = || self.inner.write32(offset, value);
        if offset == ivshmem_dev::regs::STATE && self.hosted && on_multi_thread_runtime() {
            tokio::task::block_in_place(write)
        } else {
            write()
        }
    }
}

fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

impl Waiters {
    fn wake_by_ref_other(&self, side: Side) {
        let other = 1 - side as usize;
        let w = self.slots.lock().unwrap_or_else(|p| p.into_inner())[other].take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// Stream of typed records from [`Channel::records`].
#[derive(Debug)]
pub struct Records<'a, T> {
    channel: &'a mut Channel,
    done: bool,
    _type: PhantomData<fn() -> T>,
}

impl<T: Pod> Records<'_, T> {
    /// The next record (`None` after the stream ended).
    pub async fn next(&mut self) -> Option<Result<T, ChannelError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl<T: Pod> Stream for Records<'_, T> {
    type Item = Result<T, ChannelError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = ready!(self.channel.poll_record::<T>(cx));
        if matches!(item, Err(ChannelError::PeerGone { .. })) {
            self.done = true;
        }
        Poll::Ready(Some(item))
    }
}

/// Stream of byte frames from [`Channel::frames`].
#[derive(Debug)]
pub struct Frames<'a> {
    channel: &'a mut Channel,
    done: bool,
}

impl Frames<'_> {
    /// The next frame (`None` after the stream ended).
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, ChannelError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for Frames<'_> {
    type Item = Result<Vec<u8>, ChannelError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = ready!(self
            .channel
            .poll_recv_with(cx, &mut |f: &PeerBytes<'_>| f.to_vec()));
        if matches!(item, Err(ChannelError::PeerGone { .. })) {
            self.done = true;
        }
        Poll::Ready(Some(item))
    }
}

impl AsyncRead for Channel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.partial.is_empty() {
                let n = this.partial.len().min(buf.remaining());
                let (a, b) = this.partial.as_slices();
                let from_a = a.len().min(n);
                buf.put_slice(&a[..from_a]);
                buf.put_slice(&b[..n - from_a]);
                this.partial.drain(..n);
                return Poll::Ready(Ok(()));
            }
            let mut rest = std::mem::take(&mut this.partial);
            let copied = this.poll_recv_with(cx, &mut |frame: &PeerBytes<'_>| {
                // Each byte of the frame is copied out exactly once: the head straight into
                // the caller's buffer, the tail into `rest` for the next read.
                let n = frame.len().min(buf.remaining());
                let copied = frame.copy_to(buf.initialize_unfilled_to(n));
                buf.advance(copied);
                if let Ok(tail) = frame.subslice(copied, frame.len() - copied) {
                    rest.reserve(tail.len());
                    let _ = tail.try_for_each_chunk::<()>(|chunk| {
                        rest.extend(chunk);
                        Ok(())
                    });
                }
                copied
            });
            this.partial = rest;
            let copied = ready!(copied)?;
            // Empty frames carry nothing: keep reading.
            if copied > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for Channel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // The frame limit is the real ring's: wait for the link (and carrier) first.
        ready!(this.poll_carrier(cx))?;
        // poll_carrier returned with the rings attached.
        let limit = this.link.rings().map_or(
            shmring::layout::max_frame_len(shmring::layout::MIN_CAPACITY),
            |d| d.tx.max_frame_len(),
        );
        let n = buf.len().min(limit.max(1));
        ready!(this.poll_send_with(cx, n, &mut |dst: &mut [u8]| dst.copy_from_slice(&buf[..n])))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Every write is published (and the peer rung if it asked) before it returns.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

type ChangedFuture =
    Pin<Box<dyn Future<Output = (watch::Receiver<PeerState>, bool)> + Send + 'static>>;

/// Stream of the peer's state, from [`Channel::peer_states`]: yields the current state first,
/// then every change the channel observes (merged to the latest when they come quickly).
pub struct PeerStates {
    rx: Option<watch::Receiver<PeerState>>,
    pending: Option<ChangedFuture>,
    first: bool,
}

impl std::fmt::Debug for PeerStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStates").finish_non_exhaustive()
    }
}

impl PeerStates {
    fn new(rx: watch::Receiver<PeerState>) -> Self {
        Self {
            rx: Some(rx),
            pending: None,
            first: true,
        }
    }

    /// The next state (`None` once the channel is gone).
    pub async fn next(&mut self) -> Option<PeerState> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for PeerStates {
    type Item = PeerState;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PeerState>> {
        let this = &mut *self;
        if this.first {
            this.first = false;
            if let Some(rx) = this.rx.as_mut() {
                return Poll::Ready(Some(*rx.borrow_and_update()));
            }
        }
        if this.pending.is_none() {
            let Some(mut rx) = this.rx.take() else {
                return Poll::Ready(None);
            };
            this.pending = Some(Box::pin(async move {
                let ok = rx.changed().await.is_ok();
                (rx, ok)
            }));
        }
        let fut = this.pending.as_mut().expect("set above");
        let (mut rx, ok) = ready!(fut.as_mut().poll(cx));
        this.pending = None;
        if !ok {
            return Poll::Ready(None);
        }
        let value = *rx.borrow_and_update();
        this.rx = Some(rx);
        Poll::Ready(Some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::on_multi_thread_runtime;

    #[test]
    fn block_in_place_only_on_a_multi_thread_runtime() {
        assert!(!on_multi_thread_runtime(), "no runtime");
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(!current.block_on(async { on_multi_thread_runtime() }));
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        assert!(multi.block_on(async { on_multi_thread_runtime() }));
        // On a worker, block_in_place is then allowed (it would panic on current-thread).
        let on_worker = multi.block_on(async {
            tokio::spawn(async { tokio::task::block_in_place(on_multi_thread_runtime) })
                .await
                .unwrap()
        });
        assert!(on_worker);
    }
}
