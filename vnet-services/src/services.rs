//! The network services of a vnet cell, on smoltcp (no_std + alloc):
//!
//! | port | service | protocol |
//! |-----:|---------|----------|
//! | ICMP | echo | answered by smoltcp's interface itself |
//! | 7 | echo | every byte received is sent back; closes after the client closed and all is echoed |
//! | 9 | sink | discards everything; when the client half-closes, answers one line `"<bytes> <crc32 as 8 hex digits>\n"` (CRC-32/IEEE of all bytes received) and closes |
//! | 19 | source | sends the pattern `byte[i] = i % 251` (i from 0 on each connection) until the client closes |
//! | 80 | HTTP | `GET` of any path: a `text/plain` status page with the counters, then close |
//!
//! Each service keeps [`ServiceConfig::sockets_per_port`] listening sockets (default
//! [`DEFAULT_SOCKETS_PER_PORT`]), so that many connections can be open at once; a socket
//! listens again when its connection ends. smoltcp has no listen backlog: a SYN that finds
//! every socket of its port busy is answered with a RST (the client sees "connection
//! refused"), so size `sockets_per_port` for the clients expected at once.
//!
//! # Bounded connection life
//!
//! No client can hold a socket forever, so idle or half-open connections cannot take a
//! service down:
//! - a connection still in SYN-RECEIVED after [`ServiceConfig::handshake_timeout`] is aborted
//!   (a SYN from an address that never answers ARP, or a client that never sends the ACK);
//! - a connection that moves no data and changes no state for
//!   [`ServiceConfig::idle_timeout`] is aborted (an idle `nc` client);
//! - TCP keep-alive ([`ServiceConfig::keep_alive`]) probes quiet peers and smoltcp's timeout
//!   ([`ServiceConfig::peer_timeout`]) aborts a connection whose peer stopped answering.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;

use vnet::smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use vnet::smoltcp::phy::{Device, TxToken as _};
use vnet::smoltcp::socket::tcp;
use vnet::smoltcp::time::{Duration, Instant};
use vnet::smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr,
};

/// Echo port.
pub const PORT_ECHO: u16 = 7;
/// Sink (discard with a checksum reply) port.
pub const PORT_SINK: u16 = 9;
/// Source (chargen-style pattern) port.
pub const PORT_SOURCE: u16 = 19;
/// HTTP status page port.
pub const PORT_HTTP: u16 = 80;

/// The byte the source sends at stream offset `i`.
#[inline]
pub fn source_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// CRC-32/IEEE (the zlib/Ethernet polynomial), table driven, no_std.
#[derive(Debug, Clone, Copy)]
pub struct Crc32(u32);

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32 {
    /// A fresh checksum.
    pub const fn new() -> Self {
        Crc32(0xFFFF_FFFF)
    }
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        let mut c = self.0;
        for &b in data {
            c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }
    /// The checksum of everything added so far.
    pub fn finish(&self) -> u32 {
        !self.0
    }
}

/// Default [`ServiceConfig::sockets_per_port`].
///
/// Socket buffers are zeroed allocations, which the allocator takes from the OS untouched
/// (pages are committed only as data flows through them).
pub const DEFAULT_SOCKETS_PER_PORT: usize = 64;

/// Configuration of a cell's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The interface's MAC address (must be unicast).
    pub mac: [u8; 6],
    /// The interface's IPv4 address and prefix.
    pub address: Ipv4Cidr,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Address>,
    /// Receive and send buffer size of every TCP socket, bytes.
    pub tcp_buffer: usize,
    /// Listening sockets per service port: connections a service serves at once.
    pub sockets_per_port: usize,
    /// A connection still in SYN-RECEIVED this long is aborted.
    pub handshake_timeout: Duration,
    /// A connection that moved no data and changed no state this long is aborted.
    pub idle_timeout: Duration,
    /// Interval of TCP keep-alive probes on a quiet connection (`None`: off).
    pub keep_alive: Option<Duration>,
    /// smoltcp's socket timeout: a connection whose peer sent nothing this long (keep-alive
    /// answers count) is aborted (`None`: off).
    pub peer_timeout: Option<Duration>,
    /// Seed for smoltcp (TCP initial sequence numbers, ephemeral ports).
    pub random_seed: u64,
}

impl ServiceConfig {
    /// Defaults for `address`: a locally administered MAC derived from the address, 64 KiB
    /// socket buffers, [`DEFAULT_SOCKETS_PER_PORT`] sockets per port, a 5 s handshake
    /// timeout, a 60 s idle timeout, keep-alive every 20 s and a 60 s peer timeout.
    pub fn new(address: Ipv4Cidr) -> Self {
        let [a, b, c, d] = address.address().octets();
        ServiceConfig {
            mac: [0x02, 0x1a, a ^ b, b, c, d],
            address,
            gateway: None,
            tcp_buffer: 64 * 1024,
            sockets_per_port: DEFAULT_SOCKETS_PER_PORT,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            keep_alive: Some(Duration::from_secs(20)),
            peer_timeout: Some(Duration::from_secs(60)),
            random_seed: u64::from_be_bytes([0, 0, 0, 0, a, b, c, d]),
        }
    }
}

/// Counters of the services.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Connections accepted (all ports).
    pub connections: u64,
    /// Bytes echoed on port 7.
    pub echo_bytes: u64,
    /// Bytes discarded on port 9.
    pub sink_bytes: u64,
    /// Bytes sent on port 19.
    pub source_bytes: u64,
    /// HTTP responses sent.
    pub http_requests: u64,
    /// Connections aborted in SYN-RECEIVED after the handshake timeout.
    pub handshake_timeouts: u64,
    /// Connections aborted after the idle timeout.
    pub idle_timeouts: u64,
    /// RFC 5227 ARP probes for our address answered.
    pub arp_probes_answered: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Echo,
    Sink,
    Source,
    Http,
}

#[derive(Debug)]
struct Slot {
    handle: SocketHandle,
    kind: Kind,
    port: u16,
    /// Whether the current connection was counted.
    active: bool,
    /// Bytes sent or received on this connection (sink, source).
    offset: u64,
    crc: Crc32,
    /// Sink: the checksum line was queued.
    answered: bool,
    /// HTTP: request bytes seen so far (bounded).
    request: Vec<u8>,
    /// What the connection looked like at the last progress: state, bytes moved, send
    /// queue (it shrinks as the client acknowledges).
    seen: (tcp::State, u64, usize),
    /// Bytes moved either way on this connection (all services).
    moved: u64,
    /// When the connection last made progress (the timeouts count from here).
    since: Instant,
}

impl Slot {
    /// Fresh per-connection state for the next client.
    fn reset(&mut self, now: Instant) {
        self.active = false;
        self.offset = 0;
        self.moved = 0;
        self.crc = Crc32::new();
        self.answered = false;
        self.request.clear();
        self.seen = (tcp::State::Listen, 0, 0);
        self.since = now;
    }
}

/// The interface, its sockets and the service logic of one cell.
pub struct Services {
    iface: Interface,
    sockets: SocketSet<'static>,
    slots: Vec<Slot>,
    stats: ServiceStats,
    scratch: Vec<u8>,
    address: Ipv4Cidr,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    config: ServiceConfig,
    mac: EthernetAddress,
    /// MACs of ARP probes for our address seen by the current poll (bounded).
    probers: Vec<EthernetAddress>,
}

/// Most probes answered per poll (a flood of them costs no more than this).
const MAX_PROBES_PER_POLL: usize = 4;

/// A device that shows smoltcp every frame unchanged and notes the ARP probes (RFC 5227:
/// request, sender address 0.0.0.0) for `address`, which smoltcp ignores.
struct ProbeWatch<'a, D: Device + ?Sized> {
    inner: &'a mut D,
    address: Ipv4Address,
    probers: &'a mut Vec<EthernetAddress>,
}

/// The receive token of [`ProbeWatch`].
struct ProbeRx<'a, T> {
    inner: T,
    address: Ipv4Address,
    probers: &'a mut Vec<EthernetAddress>,
}

impl<T: vnet::smoltcp::phy::RxToken> vnet::smoltcp::phy::RxToken for ProbeRx<'_, T> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let (address, probers) = (self.address, self.probers);
        self.inner.consume(|frame| {
            if let Some(prober) = arp_probe_for(frame, address) {
                if probers.len() < MAX_PROBES_PER_POLL && !probers.contains(&prober) {
                    probers.push(prober);
                }
            }
            f(frame)
        })
    }
}

/// The prober's MAC if `frame` is an ARP probe for `address`.
fn arp_probe_for(frame: &[u8], address: Ipv4Address) -> Option<EthernetAddress> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Arp {
        return None;
    }
    let arp = ArpPacket::new_checked(eth.payload()).ok()?;
    match ArpRepr::parse(&arp).ok()? {
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } if source_protocol_addr.is_unspecified()
            && target_protocol_addr == address
            && source_hardware_addr.is_unicast() =>
        {
            Some(source_hardware_addr)
        }
        _ => None,
    }
}

impl<D: Device + ?Sized> Device for ProbeWatch<'_, D> {
    type RxToken<'b>
        = ProbeRx<'b, D::RxToken<'b>>
    where
        Self: 'b;
    type TxToken<'b>
        = D::TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let (rx, tx) = self.inner.receive(timestamp)?;
        Some((
            ProbeRx {
                inner: rx,
                address: self.address,
                probers: self.probers,
            },
            tx,
        ))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(timestamp)
    }

    fn capabilities(&self) -> vnet::smoltcp::phy::DeviceCapabilities {
        self.inner.capabilities()
    }
}

/// A listening service socket.
fn new_socket(config: &ServiceConfig, port: u16) -> tcp::Socket<'static> {
    let rx = tcp::SocketBuffer::new(vec![0; config.tcp_buffer]);
    let tx = tcp::SocketBuffer::new(vec![0; config.tcp_buffer]);
    let mut socket = tcp::Socket::new(rx, tx);
    socket.set_nagle_enabled(false);
    socket.set_keep_alive(config.keep_alive);
    socket.set_timeout(config.peer_timeout);
    // Listening on a fixed port of a fresh socket cannot fail.
    let _ = socket.listen(port);
    socket
}

impl core::fmt::Debug for Services {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Services")
            .field("address", &self.address)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Services {
    /// Creates the interface on `device` and the listening sockets.
    ///
    /// # Panics
    /// If `config.mac` is not a unicast address (smoltcp's rule).
    pub fn new<D: Device + ?Sized>(config: &ServiceConfig, device: &mut D, now: Instant) -> Self {
        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(config.mac)));
        iface_config.random_seed = config.random_seed;
        let mut iface = Interface::new(iface_config, device, now);
        iface.update_ip_addrs(|addrs| {
            // One address: the list has room for it.
            let _ = addrs.push(IpCidr::Ipv4(config.address));
        });
        if let Some(gw) = config.gateway {
            let _ = iface.routes_mut().add_default_ipv4_route(gw);
        }
        let mut sockets = SocketSet::new(Vec::new());
        let mut slots = Vec::new();
        for (kind, port) in [
            (Kind::Echo, PORT_ECHO),
            (Kind::Sink, PORT_SINK),
            (Kind::Source, PORT_SOURCE),
            (Kind::Http, PORT_HTTP),
        ] {
            for _ in 0..config.sockets_per_port.max(1) {
                let handle = sockets.add(new_socket(config, port));
                slots.push(Slot {
                    handle,
                    kind,
                    port,
                    active: false,
                    offset: 0,
                    crc: Crc32::new(),
                    answered: false,
                    request: Vec::new(),
                    seen: (tcp::State::Listen, 0, 0),
                    moved: 0,
                    since: now,
                });
            }
        }
        Services {
            iface,
            sockets,
            slots,
            stats: ServiceStats::default(),
            scratch: vec![0; config.tcp_buffer.min(64 * 1024)],
            address: config.address,
            handshake_timeout: config.handshake_timeout,
            idle_timeout: config.idle_timeout,
            config: *config,
            mac: EthernetAddress(config.mac),
            probers: Vec::new(),
        }
    }

    /// The interface address.
    pub fn address(&self) -> Ipv4Cidr {
        self.address
    }

    /// Counters.
    pub fn stats(&self) -> ServiceStats {
        self.stats
    }

    /// One round: ingress and egress through `device`, the services' work, and egress again
    /// for what they produced. `status` writes extra lines (e.g. NIC and link counters) into
    /// an HTTP status page being rendered. Returns whether anything happened.
    pub fn poll<D: Device + ?Sized>(
        &mut self,
        now: Instant,
        device: &mut D,
        status: &mut dyn FnMut(&mut String),
    ) -> bool {
        let mut probes = ProbeWatch {
            inner: device,
            address: self.address.address(),
            probers: &mut self.probers,
        };
        let mut changed = self.iface.poll(now, &mut probes, &mut self.sockets)
            != vnet::smoltcp::iface::PollResult::None;
        changed |= self.answer_probes(now, device);
        if self.serve(now, status) {
            changed = true;
            let _ = self.iface.poll(now, device, &mut self.sockets);
        }
        changed
    }

    /// Answers the RFC 5227 ARP probes for our address seen by the last poll (smoltcp drops
    /// them: their sender address is 0.0.0.0). The reply goes to the prober's MAC with
    /// target address 0.0.0.0, as Linux answers; `arping -D` then sees the address taken.
    fn answer_probes<D: Device + ?Sized>(&mut self, now: Instant, device: &mut D) -> bool {
        let mut sent = false;
        while let Some(prober) = self.probers.pop() {
            let Some(token) = device.transmit(now) else {
                // No room: lost like any congested reply; the prober asks again.
                self.probers.clear();
                break;
            };
            let reply = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: self.mac,
                source_protocol_addr: self.address.address(),
                target_hardware_addr: prober,
                target_protocol_addr: Ipv4Address::UNSPECIFIED,
            };
            let eth = EthernetRepr {
                src_addr: self.mac,
                dst_addr: prober,
                ethertype: EthernetProtocol::Arp,
            };
            let len = eth.buffer_len() + reply.buffer_len();
            token.consume(len, |buf| {
                let mut frame = EthernetFrame::new_unchecked(buf);
                eth.emit(&mut frame);
                reply.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
            });
            self.stats.arp_probes_answered += 1;
            sent = true;
        }
        sent
    }

    /// How long until smoltcp needs to be polled again without new frames (`None`: only on
    /// new frames).
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let smoltcp = self.iface.poll_delay(now, &self.sockets);
        // The earliest connection timeout.
        let ours = self
            .slots
            .iter()
            .filter(|slot| slot.seen.0 != tcp::State::Listen && slot.seen.0 != tcp::State::Closed)
            .map(|slot| {
                let limit = if slot.seen.0 == tcp::State::SynReceived {
                    self.handshake_timeout
                } else {
                    self.idle_timeout
                };
                let deadline = slot.since + limit;
                if deadline > now {
                    deadline - now
                } else {
                    Duration::ZERO
                }
            })
            .min();
        match (smoltcp, ours) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The service logic; returns whether any socket moved data or changed state.
    fn serve(&mut self, now: Instant, status: &mut dyn FnMut(&mut String)) -> bool {
        let mut work = false;
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            let socket = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            if socket.is_open() && !socket.is_listening() {
                let seen = (socket.state(), slot.moved, socket.send_queue());
                if seen != slot.seen {
                    slot.seen = seen;
                    slot.since = now;
                }
                if seen.0 == tcp::State::SynReceived {
                    if now >= slot.since + self.handshake_timeout {
                        // A fresh socket in its place (no RST: the peer is most likely
                        // unreachable). Relistening the same one is not enough: smoltcp
                        // keeps, per handle, that a neighbour did not answer ARP and silences
                        // the handle for a second, which would stall the next client.
                        self.stats.handshake_timeouts += 1;
                        work = true;
                        self.sockets.remove(slot.handle);
                        slot.handle = self.sockets.add(new_socket(&self.config, slot.port));
                        slot.reset(now);
                        continue;
                    }
                } else if now >= slot.since + self.idle_timeout {
                    // Closed with its peer still known: the interface's next poll sends the
                    // RST, and the round after that listens again (below).
                    socket.abort();
                    self.stats.idle_timeouts += 1;
                    slot.seen.0 = tcp::State::Closed;
                    work = true;
                    continue;
                }
            } else {
                slot.seen = (socket.state(), slot.moved, 0);
                slot.since = now;
            }
            if socket.state() == tcp::State::TimeWait {
                // The services close first, so every served connection would hold its socket
                // in TIME-WAIT (10 s in smoltcp) and a busy port would refuse clients. The
                // client already has everything; a stray retransmitted FIN meets the
                // listening socket's RST, which ends the client's LAST-ACK just as well.
                socket.abort();
            }
            if !socket.is_open() {
                // Connection over (or never started): listen again with fresh per-connection state.
                slot.reset(now);
                let _ = socket.listen(slot.port);
                continue;
            }
            if !socket.is_active() || socket.is_listening() {
                continue;
            }
            // Until the handshake completes, `may_recv`/`may_send` are false: acting on
            // them would close a connection that has not started yet.
            if matches!(
                socket.state(),
                tcp::State::SynReceived | tcp::State::SynSent
            ) {
                continue;
            }
            if !slot.active {
                slot.active = true;
                self.stats.connections += 1;
                work = true;
            }
            match slot.kind {
                Kind::Echo => {
                    while socket.can_recv() {
                        let room = socket.send_capacity() - socket.send_queue();
                        let n = room.min(self.scratch.len());
                        if n == 0 {
                            break;
                        }
                        let got = socket.recv_slice(&mut self.scratch[..n]).unwrap_or(0);
                        if got == 0 {
                            break;
                        }
                        // `got` <= free send space: all of it is queued.
                        let _ = socket.send_slice(&self.scratch[..got]);
                        self.stats.echo_bytes += got as u64;
                        slot.moved += got as u64;
                        work = true;
                    }
                    if !socket.may_recv() && socket.recv_queue() == 0 && socket.send_queue() == 0 {
                        socket.close();
                        work = true;
                    }
                }
                Kind::Sink => {
                    while socket.can_recv() {
                        let crc = &mut slot.crc;
                        let got = socket
                            .recv(|data| {
                                crc.update(data);
                                (data.len(), data.len())
                            })
                            .unwrap_or(0);
                        if got == 0 {
                            break;
                        }
                        slot.offset += got as u64;
                        slot.moved += got as u64;
                        self.stats.sink_bytes += got as u64;
                        work = true;
                    }
                    if !socket.may_recv() && !slot.answered && socket.may_send() {
                        let mut line = String::new();
                        let _ = writeln!(line, "{} {:08x}", slot.offset, slot.crc.finish());
                        let _ = socket.send_slice(line.as_bytes());
                        slot.answered = true;
                        socket.close();
                        work = true;
                    }
                }
                Kind::Source => {
                    // Discard whatever the client sends.
                    while socket.can_recv() {
                        let got = socket.recv(|d| (d.len(), d.len())).unwrap_or(0);
                        if got == 0 {
                            break;
                        }
                        slot.moved += got as u64;
                    }
                    if !socket.may_recv() {
                        // The client is done: stop sending.
                        socket.close();
                        work = true;
                        continue;
                    }
                    while socket.can_send() {
                        let start = slot.offset;
                        let sent = socket
                            .send(|buf| {
                                for (k, b) in buf.iter_mut().enumerate() {
                                    *b = source_byte(start + k as u64);
                                }
                                (buf.len(), buf.len())
                            })
                            .unwrap_or(0);
                        if sent == 0 {
                            break;
                        }
                        slot.offset += sent as u64;
                        slot.moved += sent as u64;
                        self.stats.source_bytes += sent as u64;
                        work = true;
                    }
                }
                Kind::Http => {
                    if slot.answered {
                        continue;
                    }
                    while socket.can_recv() && slot.request.len() < 4096 {
                        let req = &mut slot.request;
                        let got = socket
                            .recv(|d| {
                                let n = d.len().min(4096 - req.len());
                                req.extend_from_slice(&d[..n]);
                                (n, n)
                            })
                            .unwrap_or(0);
                        if got == 0 {
                            break;
                        }
                        slot.moved += got as u64;
                    }
                    let complete = slot.request.windows(4).any(|w| w == b"\r\n\r\n");
                    if complete || slot.request.len() >= 4096 || !socket.may_recv() {
                        let ok = slot.request.starts_with(b"GET ");
                        let mut body = String::new();
                        let (code, reason) = if ok {
                            let s = self.stats;
                            let _ = writeln!(body, "vnet cell {}", self.address);
                            let _ = writeln!(body, "connections {}", s.connections);
                            let _ = writeln!(body, "echo_bytes {}", s.echo_bytes);
                            let _ = writeln!(body, "sink_bytes {}", s.sink_bytes);
                            let _ = writeln!(body, "source_bytes {}", s.source_bytes);
                            let _ = writeln!(body, "http_requests {}", s.http_requests + 1);
                            let _ = writeln!(body, "handshake_timeouts {}", s.handshake_timeouts);
                            let _ = writeln!(body, "idle_timeouts {}", s.idle_timeouts);
                            let _ = writeln!(body, "arp_probes_answered {}", s.arp_probes_answered);
                            status(&mut body);
                            (200, "OK")
                        } else {
                            body.push_str("only GET is served\n");
                            (405, "Method Not Allowed")
                        };
                        let mut head = String::new();
                        let _ = write!(
                            head,
                            "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        // A page is small: it fits the send buffer (checked once per page).
                        if head.len() + body.len() <= socket.send_capacity() - socket.send_queue() {
                            let _ = socket.send_slice(head.as_bytes());
                            let _ = socket.send_slice(body.as_bytes());
                        }
                        slot.answered = true;
                        self.stats.http_requests += 1;
                        socket.close();
                        work = true;
                    }
                }
            }
        }
        work
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use vnet::smoltcp::iface::SocketSet;
    use vnet::smoltcp::phy::ChecksumCapabilities;
    use vnet::smoltcp::wire::{
        EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr,
        TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    };
    use vnet::ShmNic;

    const SERVER: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);
    const CLIENT: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
    const MTU: usize = 1514;

    /// The services on one NIC, a smoltcp client on the other, a simulated clock: no real
    /// waiting, timeouts pass when the test advances `now`.
    struct Bench {
        server: Services,
        server_nic: ShmNic,
        client: Interface,
        client_nic: ShmNic,
        sockets: SocketSet<'static>,
        now: Instant,
        mac: [u8; 6],
    }

    impl Bench {
        fn new(config: ServiceConfig) -> Bench {
            let (a, b) = shmring::duplex::pair(256 * 1024).unwrap();
            let nic = |d| {
                let mut nic = ShmNic::new(MTU, 256 * 1024).unwrap();
                nic.attach(d).unwrap();
                nic.set_carrier(true);
                nic
            };
            let (mut server_nic, mut client_nic) = (nic(a), nic(b));
            let now = Instant::from_secs(1);
            let server = Services::new(&config, &mut server_nic, now);
            let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
            let mut client = Interface::new(Config::new(mac.into()), &mut client_nic, now);
            client.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(CLIENT.into(), 24));
            });
            let mut bench = Bench {
                server,
                server_nic,
                client,
                client_nic,
                sockets: SocketSet::new(Vec::new()),
                now,
                mac: config.mac,
            };
            // Warm up the ARP caches with one connection: smoltcp waits a second before it
            // retries a packet that waited for ARP, and the tests' clock only moves on demand.
            let h = bench.connect(PORT_SINK);
            bench.settle();
            bench.advance(Duration::from_secs(2));
            assert_eq!(bench.state(h), tcp::State::Established, "warm-up");
            bench.sockets.get_mut::<tcp::Socket>(h).abort();
            bench.settle();
            bench
        }

        /// Polls both sides at the current time until nothing moves.
        fn settle(&mut self) {
            for _ in 0..10_000 {
                let served = self
                    .server
                    .poll(self.now, &mut self.server_nic, &mut |_| {});
                let _ = self.server_nic.flush();
                let client = self
                    .client
                    .poll(self.now, &mut self.client_nic, &mut self.sockets)
                    != vnet::smoltcp::iface::PollResult::None;
                let _ = self.client_nic.flush();
                if !served && !client {
                    return;
                }
            }
            panic!("the two sides never settled");
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            self.settle();
        }

        fn connect(&mut self, port: u16) -> SocketHandle {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 8192]),
                tcp::SocketBuffer::new(vec![0; 8192]),
            );
            let local = 40_000 + self.sockets.iter().count() as u16;
            socket
                .connect(self.client.context(), (SERVER, port), local)
                .unwrap();
            self.sockets.add(socket)
        }

        fn state(&self, h: SocketHandle) -> tcp::State {
            self.sockets.get::<tcp::Socket>(h).state()
        }

        /// A SYN to `port` from an address nobody answers ARP for: a half-open connection.
        fn syn_from_nowhere(&mut self, src_port: u16, port: u16) {
            let src = Ipv4Address::new(10, 0, 0, 99);
            let tcp = TcpRepr {
                src_port,
                dst_port: port,
                control: TcpControl::Syn,
                seq_number: TcpSeqNumber(1000),
                ack_number: None,
                window_len: 1024,
                window_scale: None,
                max_seg_size: Some(1460),
                sack_permitted: false,
                sack_ranges: [None; 3],
                timestamp: None,
                payload: &[],
            };
            let ip = Ipv4Repr {
                src_addr: src,
                dst_addr: SERVER,
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            };
            let eth = EthernetRepr {
                src_addr: EthernetAddress([2, 0, 0, 0, 0, 99]),
                dst_addr: EthernetAddress(self.mac),
                ethertype: EthernetProtocol::Ipv4,
            };
            let mut buf = vec![0u8; 14 + 20 + tcp.buffer_len()];
            let caps = ChecksumCapabilities::default();
            let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
            eth.emit(&mut frame);
            let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
            ip.emit(&mut packet, &caps);
            tcp.emit(
                &mut TcpPacket::new_unchecked(packet.payload_mut()),
                &src.into(),
                &SERVER.into(),
                &caps,
            );
            self.inject(&buf);
            self.settle();
        }

        /// Puts `frame` on the client's wire (its NIC lends the rings for it).
        fn inject(&mut self, frame: &[u8]) {
            let mut rings = self.client_nic.detach().unwrap();
            let _ = rings.tx.try_send(frame).unwrap();
            let _ = rings.tx.flush();
            self.client_nic.attach(rings).unwrap();
            self.client_nic.set_carrier(true);
        }

        /// An HTTP GET on a fresh connection: the response, or `None` if refused.
        fn http_get(&mut self) -> Option<String> {
            let h = self.connect(PORT_HTTP);
            self.settle();
            if self.state(h) != tcp::State::Established {
                return None;
            }
            let socket = self.sockets.get_mut::<tcp::Socket>(h);
            socket.send_slice(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            self.settle();
            let socket = self.sockets.get_mut::<tcp::Socket>(h);
            let mut page = vec![0u8; 8192];
            let n = socket.recv_slice(&mut page).unwrap();
            socket.close();
            self.settle();
            Some(String::from_utf8_lossy(&page[..n]).into_owned())
        }
    }

    #[test]
    fn half_open_and_idle_connections_expire_and_the_service_serves_again() {
        let mut config = ServiceConfig::new(Ipv4Cidr::new(SERVER, 24));
        config.sockets_per_port = 2;
        config.handshake_timeout = Duration::from_secs(2);
        config.idle_timeout = Duration::from_secs(5);
        let mut bench = Bench::new(config);
        assert!(
            bench.http_get().unwrap().contains("200 OK"),
            "served at first"
        );

        // Two SYNs from an address that never answers ARP hold both HTTP sockets...
        bench.syn_from_nowhere(50_001, PORT_HTTP);
        bench.syn_from_nowhere(50_002, PORT_HTTP);
        assert_eq!(bench.http_get(), None, "both sockets half-open: refused");
        // ...only until the handshake timeout.
        bench.advance(Duration::from_secs(3));
        assert_eq!(bench.server.stats().handshake_timeouts, 2);
        assert!(bench.http_get().unwrap().contains("200 OK"));

        // Two idle clients (connected, never a request) hold both sockets...
        let idle = [bench.connect(PORT_HTTP), bench.connect(PORT_HTTP)];
        bench.settle();
        for h in idle {
            assert_eq!(bench.state(h), tcp::State::Established);
        }
        assert_eq!(bench.http_get(), None, "both sockets idle: refused");
        // ...only until the idle timeout; the idle clients are reset.
        bench.advance(Duration::from_secs(6));
        assert_eq!(bench.server.stats().idle_timeouts, 2);
        for h in idle {
            assert_eq!(bench.state(h), tcp::State::Closed);
        }
        let page = bench.http_get().unwrap();
        assert!(page.contains("200 OK"), "{page}");
        assert!(page.contains("idle_timeouts 2"), "{page}");
    }

    #[test]
    fn arp_probes_for_our_address_are_answered() {
        let config = ServiceConfig::new(Ipv4Cidr::new(SERVER, 24));
        let mut bench = Bench::new(config);
        let prober = EthernetAddress([2, 0, 0, 0, 0, 0x77]);
        let probe = |target: Ipv4Address| {
            let arp = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: prober,
                source_protocol_addr: Ipv4Address::UNSPECIFIED,
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: target,
            };
            let eth = EthernetRepr {
                src_addr: prober,
                dst_addr: EthernetAddress::BROADCAST,
                ethertype: EthernetProtocol::Arp,
            };
            let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
            let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
            eth.emit(&mut frame);
            arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
            buf
        };
        // A probe for another address, then one for ours: only ours is answered.
        bench.inject(&probe(Ipv4Address::new(10, 0, 0, 3)));
        bench.inject(&probe(SERVER));
        let _ = bench
            .server
            .poll(bench.now, &mut bench.server_nic, &mut |_| {});
        let _ = bench.server_nic.flush();
        let mut rings = bench.client_nic.detach().unwrap();
        let mut buf = [0u8; 128];
        let got = rings.rx.try_recv(&mut buf).unwrap().expect("an answer");
        assert!(
            rings.rx.try_recv(&mut buf[..]).unwrap().is_none(),
            "one answer"
        );
        let frame = EthernetFrame::new_checked(&buf[..got.len]).unwrap();
        assert_eq!(frame.dst_addr(), prober);
        let arp = ArpRepr::parse(&ArpPacket::new_checked(frame.payload()).unwrap()).unwrap();
        assert_eq!(
            arp,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: EthernetAddress(config.mac),
                source_protocol_addr: SERVER,
                target_hardware_addr: prober,
                target_protocol_addr: Ipv4Address::UNSPECIFIED,
            }
        );
        assert_eq!(bench.server.stats().arp_probes_answered, 1);
    }

    #[test]
    fn sixty_four_concurrent_echo_clients_are_all_served() {
        let mut bench = Bench::new(ServiceConfig::new(Ipv4Cidr::new(SERVER, 24)));
        let clients: Vec<SocketHandle> = (0..64).map(|_| bench.connect(PORT_ECHO)).collect();
        bench.settle();
        for (i, &h) in clients.iter().enumerate() {
            assert_eq!(bench.state(h), tcp::State::Established, "client {i}");
            let msg = [i as u8; 1000];
            assert_eq!(
                bench.sockets.get_mut::<tcp::Socket>(h).send_slice(&msg),
                Ok(1000)
            );
        }
        bench.settle();
        for (i, &h) in clients.iter().enumerate() {
            let socket = bench.sockets.get_mut::<tcp::Socket>(h);
            let mut got = [0u8; 2000];
            assert_eq!(socket.recv_slice(&mut got), Ok(1000), "client {i}");
            assert!(got[..1000].iter().all(|&b| b == i as u8), "client {i}");
            socket.close();
        }
        bench.settle();
        assert_eq!(bench.server.stats().connections, 64 + 1, "and the warm-up");
        assert_eq!(bench.server.stats().echo_bytes, 64_000);
    }

    #[test]
    fn crc32_known_answer() {
        let mut c = Crc32::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xCBF4_3926);
        let mut split = Crc32::new();
        split.update(b"1234");
        split.update(b"56789");
        assert_eq!(split.finish(), 0xCBF4_3926);
    }

    #[test]
    fn source_pattern() {
        assert_eq!(source_byte(0), 0);
        assert_eq!(source_byte(250), 250);
        assert_eq!(source_byte(251), 0);
    }
}
