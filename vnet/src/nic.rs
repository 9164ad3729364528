//! [`ShmNic`]: a smoltcp [`Device`] over a [`Duplex`] of shmring rings (Ethernet frames).
//!
//! # Tokens
//!
//! - [`Device::transmit`] hands out a token only when a frame of MTU size fits the send ring:
//!   the token *is* an MTU-sized grant inside shared memory. smoltcp writes the frame straight
//!   into it and the token commits exactly the bytes written (`commit_len`). No copy.
//! - [`Device::receive`] peeks the next frame; consuming the token copies it, in one read,
//!   into the NIC's own MTU-sized buffer, releases it and hands smoltcp that copy. smoltcp
//!   never parses memory the peer can still write (it reads some header fields twice: a
//!   length checked and then re-read could otherwise change in between). A token dropped
//!   unconsumed leaves the frame in the ring. A frame longer than the MTU is released,
//!   dropped and counted ([`NicStats::rx_oversize`]) without reaching smoltcp.
//! - Commits and releases are local: [`ShmNic::flush`] publishes all of them at once and says
//!   whether the peer must be notified (one flush and at most one doorbell per poll).
//!
//! # The reply token of `receive`
//!
//! smoltcp's `receive` returns a transmit token together with the receive token, for an
//! immediate reply (ARP reply, ICMP echo reply, TCP RST). Most received frames get no
//! immediate reply, so this token reserves nothing up front: only when smoltcp writes a
//! reply does it take an MTU-sized grant (like above). If the send ring has no MTU room then,
//! receiving still goes on and the reply is built in a scratch buffer and **dropped and
//! counted** ([`NicStats::tx_reply_dropped`]):
//! refusing to receive while the send ring is full would let two peers deadlock, each
//! waiting for the other to free space (as on real Ethernet, a congested reply is lost and
//! the protocols recover). Frames sent through `transmit` are never dropped.
//!
//! # Hostile peer
//!
//! Every index and frame header is validated by shmring; a violation
//! ([`shmring::Error::Corrupt`] and friends) is recorded as the NIC's [`fault`](ShmNic::fault),
//! counted, and from then on the NIC hands out no tokens: the owner
//! ([`crate::VnetLink`]) tears the link down. Payload bytes are untrusted: each one is read
//! exactly once from shared memory, by the copy into the NIC's buffer, and smoltcp parses
//! that stable copy (and validates everything it reads). Never a panic.

use alloc::vec;
use alloc::vec::Vec;

use shmring::{layout, Consumer, Duplex, Frame, Grant, Notify, Producer};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Length of an Ethernet header (destination, source, EtherType).
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Smallest device MTU accepted: the IPv4 minimum of 68 plus the Ethernet header.
pub const MIN_MTU: usize = 68 + ETHERNET_HEADER_LEN;
/// Largest device MTU accepted: an IP MTU of 64 KiB - 1 plus the Ethernet header.
pub const MAX_MTU: usize = 65535 + ETHERNET_HEADER_LEN;
/// A ring must hold at least this many MTU-sized frames.
pub const MIN_FRAMES_PER_RING: usize = 4;
/// Default device MTU: Ethernet frames of 1514 bytes (IP MTU 1500).
pub const DEFAULT_MTU: usize = 1500 + ETHERNET_HEADER_LEN;

/// Errors of the NIC's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NicError {
    /// The MTU is outside [`MIN_MTU`]..=[`MAX_MTU`].
    #[error("MTU {mtu} outside {min}..={max} (the device MTU counts the 14-byte Ethernet header)")]
    BadMtu {
        /// MTU asked for.
        mtu: usize,
        /// Smallest allowed.
        min: usize,
        /// Largest allowed.
        max: usize,
    },
    /// A ring cannot hold [`MIN_FRAMES_PER_RING`] frames of MTU size.
    #[error(
        "{which} ring of {capacity} bytes cannot hold {MIN_FRAMES_PER_RING} frames of MTU {mtu}: \
         needs a capacity of at least {needed} bytes (make the output section larger or the MTU smaller)"
    )]
    RingTooSmall {
        /// `"send"` or `"receive"`.
        which: &'static str,
        /// The ring's capacity.
        capacity: usize,
        /// The MTU.
        mtu: usize,
        /// Smallest capacity that works (a power of two).
        needed: usize,
    },
}

/// Smallest ring capacity (a power of two) that holds [`MIN_FRAMES_PER_RING`] frames of
/// `mtu` bytes and accepts a single frame of `mtu` bytes.
pub fn min_capacity_for(mtu: usize) -> usize {
    let by_count = MIN_FRAMES_PER_RING * layout::frame_size(mtu);
    let by_frame = 2 * (mtu + layout::FRAME_HEADER_LEN);
    by_count
        .max(by_frame)
        .max(layout::MIN_CAPACITY)
        .next_power_of_two()
}

/// Checks that a ring of `capacity` bytes suits frames of `mtu` bytes.
pub fn check_ring(which: &'static str, capacity: usize, mtu: usize) -> Result<(), NicError> {
    let needed = min_capacity_for(mtu);
    if capacity < needed || layout::max_frame_len(capacity) < mtu {
        return Err(NicError::RingTooSmall {
            which,
            capacity,
            mtu,
            needed,
        });
    }
    Ok(())
}

/// Checks an MTU.
pub fn check_mtu(mtu: usize) -> Result<(), NicError> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(())
    } else {
        Err(NicError::BadMtu {
            mtu,
            min: MIN_MTU,
            max: MAX_MTU,
        })
    }
}

/// Counters of one NIC (monotonic, never reset by a link going down).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NicStats {
    /// Frames handed to smoltcp (each one copied out of shared memory first).
    pub rx_frames: u64,
    /// Bytes of those frames (the bytes copied).
    pub rx_bytes: u64,
    /// Received frames longer than the MTU: released and dropped, never handed to smoltcp.
    pub rx_oversize: u64,
    /// IPv4 fragments handed to smoltcp for reassembly (in `rx_frames`).
    pub rx_ipv4_fragments: u64,
    /// IPv4 fragments dropped by the NIC because their datagram ends beyond
    /// [`IPV4_REASSEMBLY_MAX`] (in `rx_frames`, not in `rx_ipv4_fragments`): smoltcp could
    /// never reassemble it, and would hold a reassembly slot for it until the time-out.
    pub rx_ipv4_fragments_dropped: u64,
    /// Frames committed to the send ring.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Times `transmit` refused a token because an MTU frame did not fit (back-pressure).
    pub tx_ring_full: u64,
    /// Immediate replies dropped because the send ring was full (see the module docs).
    pub tx_reply_dropped: u64,
    /// Frames smoltcp wrote longer than the MTU: dropped, never cut (not in `tx_frames`).
    pub tx_oversize: u64,
    /// Protocol violations seen from the peer (each one faults the NIC).
    pub corrupt: u64,
    /// Flushes that asked for a doorbell.
    pub notifies: u64,
}

#[derive(Debug, Default)]
struct RxSide {
    frames: u64,
    bytes: u64,
    oversize: u64,
    fragments: u64,
    fragments_dropped: u64,
}

#[derive(Debug, Default)]
struct TxSide {
    frames: u64,
    bytes: u64,
    full: u64,
    reply_dropped: u64,
    oversize: u64,
    /// Set when `transmit` was refused since the last sleep handshake.
    blocked: bool,
}

/// The NIC itself without its rings: MTU, carrier, fault, counters and scratch memory.
///
/// Whoever owns the rings lends them for each use: [`ShmNic`] owns its rings (in-process
/// pairs, tests, benchmarks), [`crate::VnetLink`] keeps them in its [`ivshmem_link::Link`] and
/// hands out a [`NicPort`] per poll.
#[derive(Debug)]
pub struct NicState {
    carrier: bool,
    mtu: usize,
    burst: usize,
    checksum: ChecksumCapabilities,
    fault: Option<shmring::Error>,
    corrupt: u64,
    notifies: u64,
    rx: RxSide,
    tx: TxSide,
    scratch: Vec<u8>,
    /// Cell-owned copy of the received frame smoltcp parses (MTU bytes).
    rx_buf: Vec<u8>,
}

impl NicState {
    /// A NIC with device MTU `mtu` (Ethernet frame size including the 14-byte header) whose
    /// rings will have about `ring_capacity` bytes; carrier off.
    ///
    /// `ring_capacity` sets the advertised burst (smoltcp caps its TCP receive window to
    /// `max_burst_size` MTU frames): the number of MTU frames one ring holds.
    pub fn new(mtu: usize, ring_capacity: usize) -> Result<NicState, NicError> {
        check_mtu(mtu)?;
        check_ring("expected", ring_capacity, mtu)?;
        // One frame's worth of slack for the padding at the wrap.
        let burst = ring_capacity / layout::frame_size(mtu) - 1;
        Ok(NicState {
            carrier: false,
            mtu,
            burst,
            checksum: ChecksumCapabilities::default(),
            fault: None,
            corrupt: 0,
            notifies: 0,
            rx: RxSide::default(),
            tx: TxSide::default(),
            scratch: vec![0; mtu],
            rx_buf: vec![0; mtu],
        })
    }

    /// Sets the checksum capabilities reported to smoltcp (default: compute and verify
    /// everything in software, which the Linux side of a TAP bridge requires).
    pub fn set_checksum(&mut self, checksum: ChecksumCapabilities) {
        self.checksum = checksum;
    }

    /// The device MTU (Ethernet frame size).
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// Checks that both rings of `duplex` hold [`MIN_FRAMES_PER_RING`] MTU frames.
    pub fn check_rings(&self, duplex: &Duplex) -> Result<(), NicError> {
        check_ring("send", duplex.tx.capacity(), self.mtu)?;
        check_ring("receive", duplex.rx.capacity(), self.mtu)
    }

    /// The rings went away (link going down): carrier off; a fault is cleared (it stays
    /// counted in [`NicStats::corrupt`]).
    pub fn rings_gone(&mut self) {
        self.carrier = false;
        self.fault = None;
        self.tx.blocked = false;
    }

    /// Turns the carrier on or off. Without carrier (or rings, or after a fault) the NIC
    /// hands out no tokens; frames stay in the rings.
    pub fn set_carrier(&mut self, on: bool) {
        self.carrier = on;
    }

    /// Whether the carrier is on.
    pub fn carrier(&self) -> bool {
        self.carrier
    }

    /// The peer's protocol violation that stopped this NIC, if any.
    pub fn fault(&self) -> Option<shmring::Error> {
        self.fault
    }

    /// Counters.
    pub fn stats(&self) -> NicStats {
        NicStats {
            rx_frames: self.rx.frames,
            rx_bytes: self.rx.bytes,
            rx_oversize: self.rx.oversize,
            rx_ipv4_fragments: self.rx.fragments,
            rx_ipv4_fragments_dropped: self.rx.fragments_dropped,
            tx_frames: self.tx.frames,
            tx_bytes: self.tx.bytes,
            tx_ring_full: self.tx.full,
            tx_reply_dropped: self.tx.reply_dropped,
            tx_oversize: self.tx.oversize,
            corrupt: self.corrupt,
            notifies: self.notifies,
        }
    }

    /// Records a protocol violation by the peer.
    pub fn record_fault(&mut self, error: shmring::Error) {
        self.corrupt += 1;
        if self.fault.is_none() {
            self.fault = Some(error);
        }
    }

    fn usable(&self) -> bool {
        self.carrier && self.fault.is_none()
    }

    /// Lends `duplex` to this NIC for one use (a poll of smoltcp, a flush).
    pub fn port<'a>(&'a mut self, duplex: Option<&'a mut Duplex>) -> NicPort<'a> {
        NicPort { nic: self, duplex }
    }

    fn flush(&mut self, duplex: Option<&mut Duplex>) -> Notify {
        let Some(d) = duplex else {
            return Notify::NONE;
        };
        let notify = d.tx.flush() | d.rx.flush();
        if notify.needed() {
            self.notifies += 1;
        }
        notify
    }

    fn prepare_sleep(&mut self, mut duplex: Option<&mut Duplex>) -> (bool, Notify) {
        let notify = self.flush(duplex.as_deref_mut());
        let mtu = self.mtu;
        if !self.usable() {
            return (true, notify);
        }
        let Some(d) = duplex else {
            return (true, notify);
        };
        let rx = d.rx.prepare_sleep();
        let tx = if self.tx.blocked {
            d.tx.prepare_wait_for_space(mtu)
        } else {
            Ok(true)
        };
        let idle = match (rx, tx) {
            (Ok(rx_idle), Ok(tx_idle)) => {
                if !tx_idle {
                    self.tx.blocked = false;
                }
                rx_idle && tx_idle
            }
            (Err(e), _) | (_, Err(e)) => {
                self.record_fault(e);
                false
            }
        };
        (idle, notify)
    }

    pub(crate) fn receive<'a>(
        &'a mut self,
        duplex: Option<&'a mut Duplex>,
    ) -> Option<(ShmRxToken<'a>, ShmTxToken<'a>)> {
        if !self.usable() {
            return None;
        }
        let mtu = self.mtu;
        let d = duplex?;
        // Frames longer than the MTU never reach smoltcp: released, dropped and counted.
        loop {
            match d.rx.peek() {
                Ok(Some(frame)) if frame.len() > mtu => {
                    self.rx.oversize += 1;
                    frame.release();
                }
                Ok(Some(_)) => break,
                Ok(None) => return None,
                Err(e) => {
                    self.corrupt += 1;
                    self.fault.get_or_insert(e);
                    return None;
                }
            }
        }
        let frame = match peek(&mut d.rx) {
            Ok(Some(frame)) => frame,
            // Peeking again returns the same validated frame (nothing was released since).
            Ok(None) | Err(_) => return None,
        };
        Some((
            ShmRxToken {
                frame,
                side: &mut self.rx,
                buf: &mut self.rx_buf,
            },
            ShmTxToken {
                slot: TxSlot::Reply(ReplySlot {
                    tx: &mut d.tx,
                    mtu,
                    fault: &mut self.fault,
                    corrupt: &mut self.corrupt,
                }),
                side: &mut self.tx,
                scratch: &mut self.scratch,
            },
        ))
    }

    pub(crate) fn transmit<'a>(
        &'a mut self,
        duplex: Option<&'a mut Duplex>,
    ) -> Option<ShmTxToken<'a>> {
        if !self.usable() {
            return None;
        }
        let mtu = self.mtu;
        let d = duplex?;
        match grant_mtu(&mut d.tx, mtu) {
            Ok(Some(g)) => Some(ShmTxToken {
                slot: TxSlot::Ring(g),
                side: &mut self.tx,
                scratch: &mut self.scratch,
            }),
            Ok(None) => {
                self.tx.full += 1;
                self.tx.blocked = true;
                None
            }
            Err(e) => {
                self.corrupt += 1;
                self.fault.get_or_insert(e);
                None
            }
        }
    }

    pub(crate) fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu;
        caps.max_burst_size = Some(self.burst);
        caps.checksum = self.checksum.clone();
        caps
    }
}

/// A [`NicState`] with rings lent to it: the smoltcp [`Device`] for one use.
#[derive(Debug)]
pub struct NicPort<'a> {
    nic: &'a mut NicState,
    duplex: Option<&'a mut Duplex>,
}

impl NicPort<'_> {
    /// The lent rings (for frame-level users such as the TAP bridge).
    pub fn duplex_mut(&mut self) -> Option<&mut Duplex> {
        self.duplex.as_deref_mut()
    }

    /// Records a protocol violation by the peer.
    pub fn record_fault(&mut self, error: shmring::Error) {
        self.nic.record_fault(error);
    }

    /// Publishes every commit and release since the last flush (one index store per ring)
    /// and returns whether the peer must be notified (ring its doorbell once).
    pub fn flush(&mut self) -> Notify {
        self.nic.flush(self.duplex.as_deref_mut())
    }

    /// The sleep handshake; see [`ShmNic::prepare_sleep`].
    pub fn prepare_sleep(&mut self) -> (bool, Notify) {
        self.nic.prepare_sleep(self.duplex.as_deref_mut())
    }

    /// The NIC without its rings (counters, MTU, fault).
    pub fn state(&self) -> &NicState {
        self.nic
    }
}

impl Device for NicPort<'_> {
    type RxToken<'a>
        = ShmRxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = ShmTxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(ShmRxToken<'_>, ShmTxToken<'_>)> {
        self.nic.receive(self.duplex.as_deref_mut())
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<ShmTxToken<'_>> {
        self.nic.transmit(self.duplex.as_deref_mut())
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.nic.capabilities()
    }
}

/// A smoltcp Ethernet device that owns its duplex of shmring rings (in-process pairs, tests,
/// benchmarks). See the module documentation.
#[derive(Debug)]
pub struct ShmNic {
    state: NicState,
    duplex: Option<Duplex>,
}

impl ShmNic {
    /// A NIC with device MTU `mtu`; see [`NicState::new`]. No rings attached yet, carrier off.
    pub fn new(mtu: usize, ring_capacity: usize) -> Result<ShmNic, NicError> {
        Ok(ShmNic {
            state: NicState::new(mtu, ring_capacity)?,
            duplex: None,
        })
    }

    /// Sets the checksum capabilities reported to smoltcp (see [`NicState::set_checksum`]).
    pub fn set_checksum(&mut self, checksum: ChecksumCapabilities) {
        self.state.set_checksum(checksum);
    }

    /// The device MTU (Ethernet frame size).
    pub fn mtu(&self) -> usize {
        self.state.mtu
    }

    /// Checks that both rings of `duplex` hold [`MIN_FRAMES_PER_RING`] MTU frames.
    pub fn check_rings(&self, duplex: &Duplex) -> Result<(), NicError> {
        self.state.check_rings(duplex)
    }

    /// Attaches the rings after [`check_rings`](Self::check_rings) (on error the duplex is
    /// dropped; check first to keep it). Clears a previous fault.
    pub fn attach(&mut self, duplex: Duplex) -> Result<(), NicError> {
        self.check_rings(&duplex)?;
        self.duplex = Some(duplex);
        self.state.fault = None;
        Ok(())
    }

    /// Detaches the rings (link going down); carrier off; a fault is cleared (it stays
    /// counted in [`NicStats::corrupt`]).
    pub fn detach(&mut self) -> Option<Duplex> {
        self.state.rings_gone();
        self.duplex.take()
    }

    /// Whether rings are attached.
    pub fn is_attached(&self) -> bool {
        self.duplex.is_some()
    }

    /// Turns the carrier on or off. Without carrier (or rings, or after a fault) the NIC
    /// hands out no tokens; frames stay in the rings.
    pub fn set_carrier(&mut self, on: bool) {
        self.state.set_carrier(on);
    }

    /// Whether the carrier is on.
    pub fn carrier(&self) -> bool {
        self.state.carrier
    }

    /// The peer's protocol violation that stopped this NIC, if any.
    pub fn fault(&self) -> Option<shmring::Error> {
        self.state.fault
    }

    /// The attached rings (for frame-level users such as the TAP bridge).
    pub fn duplex_mut(&mut self) -> Option<&mut Duplex> {
        self.duplex.as_mut()
    }

    /// Counters.
    pub fn stats(&self) -> NicStats {
        self.state.stats()
    }

    /// Records a protocol violation by the peer.
    pub fn record_fault(&mut self, error: shmring::Error) {
        self.state.record_fault(error);
    }

    /// Publishes every commit and release since the last flush (one index store per ring)
    /// and returns whether the peer must be notified (ring its doorbell once).
    pub fn flush(&mut self) -> Notify {
        self.state.flush(self.duplex.as_mut())
    }

    /// Sleep handshake: flushes (the returned [`Notify`] says whether to ring the peer's
    /// doorbell first), then announces "wake me" for new frames and, if `transmit` was
    /// refused since the last handshake, for send space. `true`: nothing to do, the caller
    /// may sleep until its interrupt (or smoltcp's next timer); `false`: work arrived, poll
    /// again. Without usable rings: `true` (only a link change can wake the NIC up).
    pub fn prepare_sleep(&mut self) -> (bool, Notify) {
        self.state.prepare_sleep(self.duplex.as_mut())
    }
}

/// Receive token: a frame (at most the MTU) inside shared memory; consuming copies it into
/// the NIC's own buffer, releases it and hands smoltcp the copy.
pub struct ShmRxToken<'a> {
    frame: Frame<'a>,
    side: &'a mut RxSide,
    /// MTU-sized, cell-owned.
    buf: &'a mut Vec<u8>,
}

impl phy::RxToken for ShmRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        // `receive` handed out only frames of at most the MTU (= `buf.len()`).
        let len = self.frame.len().min(self.buf.len());
        let copy = &mut self.buf[..len];
        // The single read of the frame's bytes from peer-writable memory: one memcpy into
        // cell-owned memory, nothing reads the shared bytes before or after it. The peer may
        // change them during the copy; then smoltcp sees a mix, but a stable one that it
        // validates like any other untrusted frame. The copy goes through shmring's view
        // (`PeerBytes`), so no `&[u8]` over the peer's section exists at any time.
        let len = self.frame.payload().copy_to(copy);
        let copy = &mut self.buf[..len];
        self.frame.release();
        self.side.frames += 1;
        self.side.bytes += len as u64;
        match ipv4_fragment(copy) {
            Ipv4Fragment::No => f(copy),
            Ipv4Fragment::Reassemble => {
                self.side.fragments += 1;
                f(copy)
            }
            Ipv4Fragment::TooLarge => {
                // smoltcp drops an empty frame as truncated (the token must call `f`).
                self.side.fragments_dropped += 1;
                f(&copy[..0])
            }
        }
    }
}

/// Largest IPv4 datagram payload smoltcp reassembles from fragments, in bytes (smoltcp's
/// `reassembly-buffer-size-8192` feature, set by this crate): `ping -s` up to 8184 is
/// answered. Fragments of a larger datagram are dropped by the NIC and counted
/// ([`NicStats::rx_ipv4_fragments_dropped`]).
pub const IPV4_REASSEMBLY_MAX: usize = smoltcp::config::REASSEMBLY_BUFFER_SIZE;
/// How many IPv4 datagrams smoltcp reassembles at once (`reassembly-buffer-count-4`); a
/// fragment of a further datagram is dropped by smoltcp (not counted: smoltcp keeps no
/// counters) until a slot completes or times out (`Interface::set_reassembly_timeout`).
pub const IPV4_REASSEMBLY_SLOTS: usize = smoltcp::config::REASSEMBLY_BUFFER_COUNT;
/// Largest IPv4 packet (header and payload) smoltcp fragments on the way out
/// (`fragmentation-buffer-size-8192`); a larger one is dropped by smoltcp. Only packets
/// longer than the link MTU need it: ICMP echo replies to large pings (TCP keeps to the MSS).
pub const IPV4_FRAGMENTATION_MAX: usize = smoltcp::config::FRAGMENTATION_BUFFER_SIZE;

/// What a received frame is to IPv4 reassembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ipv4Fragment {
    /// Not an IPv4 fragment (or not IPv4, or malformed: smoltcp judges it).
    No,
    /// A fragment of a datagram that fits [`IPV4_REASSEMBLY_MAX`] as far as this one shows.
    Reassemble,
    /// A fragment that ends beyond [`IPV4_REASSEMBLY_MAX`].
    TooLarge,
}

/// Classifies an Ethernet II frame (the NIC's own copy) for reassembly.
fn ipv4_fragment(frame: &[u8]) -> Ipv4Fragment {
    const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
    if frame.get(12..14) != Some(&ETHERTYPE_IPV4[..]) {
        return Ipv4Fragment::No;
    }
    let Some(ip) = frame.get(ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + 20) else {
        return Ipv4Fragment::No;
    };
    if ip[0] >> 4 != 4 {
        return Ipv4Fragment::No;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let flags_offset = u16::from_be_bytes([ip[6], ip[7]]);
    let more_fragments = flags_offset & 0x2000 != 0;
    let offset = usize::from(flags_offset & 0x1fff) * 8;
    if !more_fragments && offset == 0 {
        return Ipv4Fragment::No;
    }
    if offset + total_len.saturating_sub(header_len) > IPV4_REASSEMBLY_MAX {
        Ipv4Fragment::TooLarge
    } else {
        Ipv4Fragment::Reassemble
    }
}

/// Where a reply token built by `receive` reserves its send slot, once smoltcp uses it.
struct ReplySlot<'a> {
    tx: &'a mut Producer,
    mtu: usize,
    fault: &'a mut Option<shmring::Error>,
    corrupt: &'a mut u64,
}

enum TxSlot<'a> {
    /// MTU-sized grant in the send ring, reserved by `transmit`.
    Ring(Grant<'a>),
    /// Reply token of `receive`: nothing reserved until `consume`.
    Reply(ReplySlot<'a>),
}

/// Transmit token: an MTU-sized grant in the send ring (from `transmit`), or the reply token
/// of `receive`, which reserves its MTU-sized grant only when smoltcp writes a reply (and, if
/// the send ring has no room then, builds the reply in scratch memory and drops it, counted).
/// A frame longer than the MTU is never cut: it is dropped and counted
/// ([`NicStats::tx_oversize`]).
pub struct ShmTxToken<'a> {
    slot: TxSlot<'a>,
    side: &'a mut TxSide,
    scratch: &'a mut Vec<u8>,
}

impl ShmTxToken<'_> {
    /// Lets `f` write `len` bytes that will not be sent (scratch memory, grown if needed).
    fn discard<R, F>(scratch: &mut Vec<u8>, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        f(&mut scratch[..len])
    }
}

impl phy::TxToken for ShmTxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mtu = match &self.slot {
            TxSlot::Ring(grant) => grant.len(),
            TxSlot::Reply(reply) => reply.mtu,
        };
        if len > mtu {
            // smoltcp never asks for more than the MTU; if it did, cutting the frame would
            // send garbage. The grant (if any) is never committed: abandoned.
            self.side.oversize += 1;
            return Self::discard(self.scratch, len, f);
        }
        let grant = match self.slot {
            TxSlot::Ring(grant) => Some(grant),
            TxSlot::Reply(reply) => match grant_mtu(reply.tx, reply.mtu) {
                Ok(grant) => grant,
                Err(e) => {
                    *reply.corrupt += 1;
                    reply.fault.get_or_insert(e);
                    None
                }
            },
        };
        match grant {
            Some(mut grant) => {
                let r = f(&mut grant[..len]);
                grant.commit_len(len);
                self.side.frames += 1;
                self.side.bytes += len as u64;
                r
            }
            None => {
                // No room (or the peer broke the ring): the reply is lost, as on a congested
                // Ethernet; see the module docs.
                self.side.reply_dropped += 1;
                Self::discard(self.scratch, len, f)
            }
        }
    }
}

fn grant_mtu<'a>(tx: &'a mut Producer, mtu: usize) -> Result<Option<Grant<'a>>, shmring::Error> {
    match tx.grant(mtu) {
        Ok(g) => Ok(Some(g)),
        Err(shmring::Error::Full { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn peek(rx: &mut Consumer) -> Result<Option<Frame<'_>>, shmring::Error> {
    rx.peek()
}

impl Device for ShmNic {
    type RxToken<'a> = ShmRxToken<'a>;
    type TxToken<'a> = ShmTxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(ShmRxToken<'_>, ShmTxToken<'_>)> {
        self.state.receive(self.duplex.as_mut())
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<ShmTxToken<'_>> {
        self.state.transmit(self.duplex.as_mut())
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.state.capabilities()
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use shmring::duplex::{pair, DuplexInit, CONSUMER_SLOT};
    use smoltcp::phy::{RxToken, TxToken};

    const MTU: usize = 1514;
    const CAP: usize = 8192;

    fn now() -> Instant {
        Instant::from_millis(0)
    }

    /// A NIC with carrier on, and the peer's end of its rings.
    fn nic_and_peer(mtu: usize, cap: usize) -> (ShmNic, Duplex) {
        let (a, b) = pair(cap).unwrap();
        let mut nic = ShmNic::new(mtu, cap).unwrap();
        nic.attach(a).unwrap();
        nic.set_carrier(true);
        (nic, b)
    }

    fn send_one(nic: &mut ShmNic, byte: u8, len: usize) -> bool {
        match nic.transmit(now()) {
            Some(tok) => {
                tok.consume(len, |buf| buf.fill(byte));
                true
            }
            None => false,
        }
    }

    #[test]
    fn no_tx_token_when_an_mtu_frame_does_not_fit() {
        let (mut nic, mut peer) = nic_and_peer(MTU, CAP);
        // Small frames, but each token reserved a whole MTU: tokens stop while an MTU frame
        // no longer fits, not when the ring is byte-full.
        let mut sent = 0;
        while send_one(&mut nic, 7, 60) {
            sent += 1;
            assert!(sent < 1000, "tokens never ran out");
        }
        assert!(sent >= 4, "only {sent} frames");
        assert_eq!(nic.stats().tx_ring_full, 1);
        assert_eq!(nic.stats().tx_frames, sent);
        // Nothing visible to the peer before the flush.
        assert!(peer.rx.peek().unwrap().is_none());
        let _ = nic.flush();
        let mut buf = [0u8; 64];
        let mut got = 0;
        while let Some(r) = peer.rx.try_recv(&mut buf).unwrap() {
            assert_eq!(r.len, 60, "commit_len keeps only the bytes written");
            assert!(buf[..60].iter().all(|&b| b == 7));
            got += 1;
        }
        assert_eq!(got, sent);
        // Space freed: tokens again.
        assert!(send_one(&mut nic, 8, 60));
    }

    #[test]
    fn rx_frames_stay_until_consumed() {
        let (mut nic, mut peer) = nic_and_peer(MTU, CAP);
        assert!(nic.receive(now()).is_none());
        let _ = peer.tx.try_send(&[1u8; 100]).unwrap();
        let _ = peer.tx.try_send(&[2u8; 200]).unwrap();
        // Tokens dropped without consuming: the frame stays.
        for _ in 0..3 {
            assert!(nic.receive(now()).is_some(), "a frame");
        }
        let (rx, _tx) = nic.receive(now()).unwrap();
        assert_eq!(rx.consume(|f| (f.len(), f[0])), (100, 1));
        let (rx, _tx) = nic.receive(now()).unwrap();
        assert_eq!(rx.consume(|f| (f.len(), f[0])), (200, 2));
        assert!(nic.receive(now()).is_none());
        assert_eq!(nic.stats().rx_frames, 2);
        assert_eq!(nic.stats().rx_bytes, 300);
        // Releases are local until flush: the producer sees the space only afterwards.
        let free_before = peer.tx.free_space();
        let _ = nic.flush();
        assert!(peer.tx.free_space() > free_before);
    }

    #[test]
    fn no_tokens_without_carrier() {
        let (mut nic, mut peer) = nic_and_peer(MTU, CAP);
        let _ = peer.tx.try_send(&[1u8; 100]).unwrap();
        nic.set_carrier(false);
        assert!(nic.receive(now()).is_none());
        assert!(nic.transmit(now()).is_none());
        nic.set_carrier(true);
        assert!(nic.receive(now()).is_some());
    }

    #[test]
    fn mtu_limits() {
        assert!(matches!(
            ShmNic::new(MAX_MTU + 1, 1 << 20),
            Err(NicError::BadMtu { .. })
        ));
        assert!(matches!(
            ShmNic::new(MIN_MTU - 1, 1 << 20),
            Err(NicError::BadMtu { .. })
        ));
        // 9000-byte frames do not fit 4 times into 16 KiB.
        let err = ShmNic::new(9014, 16384).unwrap_err();
        assert_eq!(
            err,
            NicError::RingTooSmall {
                which: "expected",
                capacity: 16384,
                mtu: 9014,
                needed: 65536
            }
        );
        assert_eq!(min_capacity_for(MAX_MTU), 1 << 19);
        // A 64 KiB MTU on 512 KiB rings works, and a full-size frame goes through.
        let (mut nic, mut peer) = nic_and_peer(MAX_MTU, 1 << 19);
        let caps = nic.capabilities();
        assert_eq!(caps.max_transmission_unit, MAX_MTU);
        assert_eq!(
            caps.max_burst_size,
            Some((1 << 19) / layout::frame_size(MAX_MTU) - 1)
        );
        assert!(send_one(&mut nic, 3, MAX_MTU));
        let _ = nic.flush();
        let f = peer.rx.peek().unwrap().unwrap();
        assert_eq!(f.len(), MAX_MTU);
        // Rings smaller than the NIC needs are refused.
        let (small, _) = pair(4096).unwrap();
        let mut nic = ShmNic::new(MTU, CAP).unwrap();
        let e = nic.check_rings(&small).unwrap_err();
        assert!(matches!(
            e,
            NicError::RingTooSmall {
                which: "send",
                capacity: 4096,
                ..
            }
        ));
        assert_eq!(nic.attach(small).unwrap_err(), e);
        assert!(!nic.is_attached());
    }

    #[test]
    fn burst_size_holds_in_the_ring() {
        let nic = ShmNic::new(MTU, CAP).unwrap();
        let burst = nic.capabilities().max_burst_size.unwrap();
        assert!(burst >= MIN_FRAMES_PER_RING - 1);
        assert!((burst + 1) * layout::frame_size(MTU) <= CAP);
    }

    #[test]
    fn reply_while_full_is_dropped_and_counted() {
        let (mut nic, mut peer) = nic_and_peer(MTU, CAP);
        while send_one(&mut nic, 1, MTU) {}
        let _ = nic.flush();
        let _ = peer.tx.try_send(&[9u8; 64]).unwrap();
        let (rx, tx) = nic
            .receive(now())
            .expect("receiving goes on while the send ring is full");
        assert_eq!(rx.consume(|f| f.len()), 64);
        tx.consume(64, |buf| buf.fill(5));
        assert_eq!(nic.stats().tx_reply_dropped, 1);
        // With room, the reply token is a real grant.
        let mut buf = vec![0u8; MTU];
        while peer.rx.try_recv(&mut buf).unwrap().is_some() {}
        let _ = peer.tx.try_send(&[9u8; 64]).unwrap();
        let frames = nic.stats().tx_frames;
        let (rx, tx) = nic.receive(now()).unwrap();
        rx.consume(|_| ());
        tx.consume(42, |buf| buf.fill(6));
        assert_eq!(nic.stats().tx_frames, frames + 1);
        let _ = nic.flush();
        let r = peer.rx.try_recv(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..r.len], &[6u8; 42][..]);
    }

    #[test]
    fn doorbell_only_when_the_peer_sleeps() {
        let (mut nic, mut peer) = nic_and_peer(MTU, CAP);
        assert!(send_one(&mut nic, 1, 60));
        assert!(!nic.flush().needed(), "peer never asked");
        let mut buf = [0u8; 64];
        assert!(peer.rx.try_recv(&mut buf).unwrap().is_some());
        assert!(peer.rx.prepare_sleep().unwrap(), "peer goes to sleep");
        assert!(send_one(&mut nic, 1, 60));
        assert!(send_one(&mut nic, 1, 60));
        assert!(nic.flush().needed(), "one notification for the batch");
        assert!(!nic.flush().needed());
        assert_eq!(nic.stats().notifies, 1);
    }

    #[test]
    fn sleep_handshake_reports_work_and_space() {
        let (mut nic, mut peer) = nic_and_peer(MTU, CAP);
        assert!(nic.prepare_sleep().0, "idle");
        let _ = peer.tx.try_send(b"x").unwrap();
        assert!(!nic.prepare_sleep().0, "a frame arrived");
        let (rx, _) = nic.receive(now()).unwrap();
        rx.consume(|_| ());
        while send_one(&mut nic, 1, MTU) {}
        let (idle, _) = nic.prepare_sleep();
        assert!(idle, "blocked on space, nothing received: may sleep");
        // The peer frees space: its flush asks to notify us.
        let mut buf = vec![0u8; MTU];
        let r = peer.rx.try_recv(&mut buf).unwrap().unwrap();
        assert!(
            r.notify.needed(),
            "producer waiting for space gets a doorbell"
        );
    }

    #[test]
    fn oversized_frames_are_dropped_not_cut() {
        let (mut nic, mut peer) = nic_and_peer(MTU, CAP);
        let tok = nic.transmit(now()).unwrap();
        let written = tok.consume(MTU + 100, |buf| {
            buf.fill(4);
            buf.len()
        });
        assert_eq!(written, MTU + 100, "smoltcp gets the length it asked for");
        // Through the reply token of `receive` too.
        let _ = peer.tx.try_send(&[1u8; 64]).unwrap();
        let (rx, tx) = nic.receive(now()).unwrap();
        rx.consume(|_| ());
        tx.consume(MTU + 1, |buf| buf.fill(5));
        let stats = nic.stats();
        assert_eq!(stats.tx_oversize, 2);
        assert_eq!(stats.tx_frames, 0, "not counted as sent");
        assert_eq!(stats.tx_reply_dropped, 0, "not a congestion drop");
        let _ = nic.flush();
        assert!(peer.rx.peek().unwrap().is_none(), "nothing cut and sent");
        // The abandoned grant left the ring usable: a full MTU frame goes through.
        assert!(send_one(&mut nic, 6, MTU));
        let _ = nic.flush();
        let f = peer.rx.peek().unwrap().unwrap();
        assert_eq!(f.len(), MTU);
        assert_eq!(f.payload().to_vec(), vec![6u8; MTU]);
    }

    #[test]
    fn smoltcp_parses_a_copy_not_the_peers_memory() {
        let (mut nic, mut peer) = nic_and_peer(MTU, CAP);
        let mut grant = peer.tx.grant(100).unwrap();
        grant.fill(1);
        let shared = grant.as_mut_ptr();
        grant.commit();
        let _ = peer.tx.flush();
        let (rx, _) = nic.receive(now()).unwrap();
        let first = rx.consume(|f| {
            assert!(
                !core::ptr::eq(f.as_ptr(), shared),
                "smoltcp would parse the peer's memory"
            );
            // SAFETY: the peer's own ring memory (alive while `peer` is), written the way a
            // hostile peer would write a published frame; the NIC must not be affected.
            unsafe { shared.write_volatile(0xee) };
            (f.len(), f[0])
        });
        assert_eq!(first, (100, 1), "the copy is stable");
        assert_eq!(nic.stats().rx_frames, 1);
    }

    #[test]
    fn rx_frames_over_the_mtu_are_dropped_and_counted() {
        let (mut nic, mut peer) = nic_and_peer(MIN_MTU, CAP);
        let _ = peer.tx.try_send(&[1u8; MIN_MTU + 1]).unwrap();
        let _ = peer.tx.try_send(&[2u8; MIN_MTU]).unwrap();
        let (rx, _) = nic.receive(now()).unwrap();
        assert_eq!(
            rx.consume(|f| (f.len(), f[0])),
            (MIN_MTU, 2),
            "the long one skipped"
        );
        assert!(nic.receive(now()).is_none());
        let stats = nic.stats();
        assert_eq!((stats.rx_oversize, stats.rx_frames), (1, 1));
    }

    /// An Ethernet frame with an IPv4 header: fragment `offset` (bytes, a multiple of 8),
    /// more-fragments flag, `payload` bytes after the 20-byte header.
    fn ipv4_frame(offset: usize, more: bool, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; ETHERNET_HEADER_LEN + 20 + payload];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[ETHERNET_HEADER_LEN..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
        let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        ip[6..8].copy_from_slice(&flags.to_be_bytes());
        f
    }

    #[test]
    fn ipv4_fragments_are_classified_for_reassembly() {
        use Ipv4Fragment::*;
        assert_eq!(ipv4_fragment(&ipv4_frame(0, false, 100)), No);
        assert_eq!(ipv4_fragment(&ipv4_frame(0, true, 1480)), Reassemble);
        assert_eq!(ipv4_fragment(&ipv4_frame(2960, false, 1048)), Reassemble);
        let last = IPV4_REASSEMBLY_MAX - 1000;
        assert_eq!(ipv4_fragment(&ipv4_frame(last, false, 1000)), Reassemble);
        assert_eq!(ipv4_fragment(&ipv4_frame(last + 8, false, 1000)), TooLarge);
        assert_eq!(ipv4_fragment(&ipv4_frame(last + 8, true, 1000)), TooLarge);
        // Not IPv4, or too short: smoltcp judges those.
        let mut arp = ipv4_frame(8, true, 100);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(ipv4_fragment(&arp), No);
        assert_eq!(ipv4_fragment(&ipv4_frame(8, true, 0)[..30]), No);
        assert_eq!(ipv4_fragment(&[]), No);
    }

    #[test]
    fn fragments_beyond_the_reassembly_buffer_are_dropped_and_counted() {
        let (mut nic, mut peer) = nic_and_peer(MTU, CAP);
        let _ = peer.tx.try_send(&ipv4_frame(1480, true, 1000)).unwrap();
        let _ = peer
            .tx
            .try_send(&ipv4_frame(IPV4_REASSEMBLY_MAX, false, 1000))
            .unwrap();
        let (rx, _) = nic.receive(now()).unwrap();
        assert_eq!(rx.consume(|f| f.len()), ETHERNET_HEADER_LEN + 1020);
        let (rx, _) = nic.receive(now()).unwrap();
        assert_eq!(rx.consume(|f| f.len()), 0, "smoltcp gets nothing to parse");
        let stats = nic.stats();
        assert_eq!(
            (
                stats.rx_frames,
                stats.rx_ipv4_fragments,
                stats.rx_ipv4_fragments_dropped
            ),
            (2, 1, 1)
        );
    }

    /// A hostile peer flips the IPv4 header length and total length of frames it already
    /// published while smoltcp parses them. smoltcp checks those fields and reads them
    /// again (`total_len - header_len` in `Ipv4Repr::parse`): over shared memory that
    /// panicked with overflow checks on. Over the NIC's copy, never.
    #[test]
    fn peer_flipping_ipv4_lengths_during_rx_causes_no_panic() {
        use smoltcp::iface::{Config, Interface, SocketSet};
        use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;

        const FRAMES: u64 = 100_000;
        const CAP: usize = 64 * 1024;
        let mac = EthernetAddress([2, 0, 0, 0, 0, 2]);
        let (mut nic, mut peer) = nic_and_peer(MTU, CAP);
        // Checksums ignored: the flipped header reaches the length re-read sooner (a hostile
        // peer can compute valid checksums anyway).
        nic.set_checksum(ChecksumCapabilities::ignored());
        let mut iface =
            Interface::new(Config::new(HardwareAddress::Ethernet(mac)), &mut nic, now());
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(
                smoltcp::wire::Ipv4Address::new(10, 0, 0, 2).into(),
                24,
            ))
            .unwrap()
        });
        let mut sockets = SocketSet::new(vec![]);
        // Frames the NIC released (Release: published after the flush that frees them).
        let consumed = Arc::new(AtomicU64::new(0));
        let peer_consumed = consumed.clone();
        let hostile = std::thread::spawn(move || {
            let mut frame = [0u8; 60];
            frame[..6].copy_from_slice(&mac.0);
            frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
            frame[14..34].copy_from_slice(&[
                0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
            ]);
            let mut sent = 0u64;
            let mut flips = 0u64;
            while sent < FRAMES {
                let mut published = Vec::new();
                while sent < FRAMES {
                    let Ok(mut grant) = peer.tx.grant(frame.len()) else {
                        break;
                    };
                    grant.copy_from_slice(&frame);
                    published.push(grant.as_mut_ptr() as usize);
                    grant.commit();
                    sent += 1;
                }
                let _ = peer.tx.flush();
                // Until the NIC released them all, keep rewriting their headers.
                while peer_consumed.load(Ordering::Acquire) < sent {
                    flips += 1;
                    let (ihl, total) = if flips.is_multiple_of(2) {
                        (0x45, 20)
                    } else {
                        (0x4f, 0)
                    };
                    for &p in &published {
                        let p = p as *mut u8;
                        // SAFETY: inside the frame this thread published in its own ring
                        // (alive while `peer` is); writing after publishing is exactly the
                        // hostile peer under test. Volatile: each write really happens.
                        unsafe {
                            p.add(14).write_volatile(ihl);
                            p.add(17).write_volatile(total);
                        }
                    }
                }
            }
            flips
        });
        while consumed.load(Ordering::Relaxed) < FRAMES {
            let _ = iface.poll(now(), &mut nic, &mut sockets);
            let _ = nic.flush();
            let stats = nic.stats();
            consumed.store(stats.rx_frames + stats.rx_oversize, Ordering::Release);
            assert!(nic.fault().is_none());
        }
        let flips = hostile.join().unwrap();
        assert!(flips > 0, "the peer never flipped a header");
        assert_eq!(nic.stats().rx_frames, FRAMES);
    }

    struct Region {
        ptr: *mut u8,
        layout: std::alloc::Layout,
    }
    impl Region {
        fn new(len: usize) -> Self {
            let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
            // SAFETY: non-zero size.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            Region { ptr, layout }
        }
    }
    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: allocated with this layout.
            unsafe { std::alloc::dealloc(self.ptr, self.layout) }
        }
    }

    #[test]
    fn corrupt_peer_faults_the_nic_without_panic() {
        let len = 16384 + 4096;
        let (ra, rb) = (Region::new(len), Region::new(len));
        // SAFETY: two live regions, each written by its own side (and by the test playing a
        // hostile peer on b's).
        unsafe {
            let ia = DuplexInit::init(ra.ptr, len, None).unwrap();
            let ib = DuplexInit::init(rb.ptr, len, None).unwrap();
            let a = ia.attach(rb.ptr, len).unwrap();
            let mut b = ib.attach(ra.ptr, len).unwrap();
            let mut nic = ShmNic::new(MTU, 16384).unwrap();
            nic.attach(a).unwrap();
            nic.set_carrier(true);
            let _ = b.tx.try_send(&[1u8; 80]).unwrap();
            // The hostile peer publishes an index beyond its ring.
            let index = rb.ptr.add(CONSUMER_SLOT + layout::P_INDEX).cast::<u64>();
            index.write_volatile(u64::MAX - 7);
            assert!(nic.receive(now()).is_none());
            assert!(matches!(nic.fault(), Some(shmring::Error::Corrupt { .. })));
            assert_eq!(nic.stats().corrupt, 1);
            // Faulted: no more tokens either way.
            assert!(nic.transmit(now()).is_none());
            assert!(nic.detach().is_some());
        }
    }

    #[test]
    fn reply_slot_is_reserved_only_when_a_reply_is_written() {
        let len = 16384 + 4096;
        let (ra, rb) = (Region::new(len), Region::new(len));
        // SAFETY: two live regions, each written by its own side (and by the test playing a
        // hostile peer on b's).
        unsafe {
            let ia = DuplexInit::init(ra.ptr, len, None).unwrap();
            let ib = DuplexInit::init(rb.ptr, len, None).unwrap();
            let a = ia.attach(rb.ptr, len).unwrap();
            let mut b = ib.attach(ra.ptr, len).unwrap();
            let mut nic = ShmNic::new(MTU, 16384).unwrap();
            nic.attach(a).unwrap();
            nic.set_carrier(true);
            // Our send ring is full: a reservation would have to re-read the peer's index.
            while send_one(&mut nic, 1, MTU) {}
            let _ = nic.flush();
            let _ = b.tx.try_send(&[1u8; 80]).unwrap();
            // The hostile peer publishes a garbage release index for our send ring: any
            // reservation now faults the NIC.
            let index = rb.ptr.add(layout::C_INDEX).cast::<u64>();
            index.write_volatile(u64::MAX - 7);
            // Receiving without replying never touches the send ring.
            let (rx, _unused_reply) = nic.receive(now()).expect("receiving ignores the send ring");
            assert_eq!(rx.consume(|f| f.len()), 80);
            assert_eq!(nic.fault(), None);
            assert_eq!(nic.stats().tx_reply_dropped, 0);
            // A reply does reserve: it meets the garbage, is dropped and faults the NIC.
            let _ = b.tx.try_send(&[2u8; 80]).unwrap();
            let (rx, tx) = nic.receive(now()).unwrap();
            rx.consume(|_| ());
            tx.consume(60, |buf| buf.fill(3));
            assert!(matches!(nic.fault(), Some(shmring::Error::Corrupt { .. })));
            assert_eq!(nic.stats().corrupt, 1);
            assert_eq!(nic.stats().tx_reply_dropped, 1);
            assert!(nic.receive(now()).is_none(), "faulted");
        }
    }
}
