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
//! Each service keeps [`ServiceConfig::sockets_per_port`] listening sockets, so that many
//! connections can be open at once; a socket listens again when its connection ends.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;

use vnet::smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use vnet::smoltcp::phy::Device;
use vnet::smoltcp::socket::tcp;
use vnet::smoltcp::time::{Duration, Instant};
use vnet::smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

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
    /// Listening sockets per service port.
    pub sockets_per_port: usize,
    /// Seed for smoltcp (TCP initial sequence numbers, ephemeral ports).
    pub random_seed: u64,
}

impl ServiceConfig {
    /// Defaults for `address`: a locally administered MAC derived from the address, 256 KiB
    /// socket buffers, 2 sockets per port.
    pub fn new(address: Ipv4Cidr) -> Self {
        let [a, b, c, d] = address.address().octets();
        ServiceConfig {
            mac: [0x02, 0x1a, a ^ b, b, c, d],
            address,
            gateway: None,
            tcp_buffer: 256 * 1024,
            sockets_per_port: 2,
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
}

/// The interface, its sockets and the service logic of one cell.
pub struct Services {
    iface: Interface,
    sockets: SocketSet<'static>,
    slots: Vec<Slot>,
    stats: ServiceStats,
    scratch: Vec<u8>,
    address: Ipv4Cidr,
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
                let rx = tcp::SocketBuffer::new(vec![0; config.tcp_buffer]);
                let tx = tcp::SocketBuffer::new(vec![0; config.tcp_buffer]);
                let mut socket = tcp::Socket::new(rx, tx);
                socket.set_nagle_enabled(false);
                // Listening on a fixed port of a fresh socket cannot fail.
                let _ = socket.listen(port);
                let handle = sockets.add(socket);
                slots.push(Slot {
                    handle,
                    kind,
                    port,
                    active: false,
                    offset: 0,
                    crc: Crc32::new(),
                    answered: false,
                    request: Vec::new(),
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
        let mut changed = self.iface.poll(now, device, &mut self.sockets)
            != vnet::smoltcp::iface::PollResult::None;
        if self.serve(status) {
            changed = true;
            let _ = self.iface.poll(now, device, &mut self.sockets);
        }
        changed
    }

    /// How long until smoltcp needs to be polled again without new frames (`None`: only on
    /// new frames).
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        self.iface.poll_delay(now, &self.sockets)
    }

    /// The service logic; returns whether any socket moved data or changed state.
    fn serve(&mut self, status: &mut dyn FnMut(&mut String)) -> bool {
        let mut work = false;
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            let socket = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            if !socket.is_open() {
                // Connection over (or never started): listen again with fresh per-connection state.
                slot.active = false;
                slot.offset = 0;
                slot.crc = Crc32::new();
                slot.answered = false;
                slot.request.clear();
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
                        if socket.recv(|d| (d.len(), d.len())).unwrap_or(0) == 0 {
                            break;
                        }
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
                        let _ = socket.recv(|d| {
                            let n = d.len().min(4096 - req.len());
                            req.extend_from_slice(&d[..n]);
                            (n, ())
                        });
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
