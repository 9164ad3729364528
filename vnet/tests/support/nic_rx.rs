//! The NIC's receive path against a hostile peer, driven by a byte script (shared by the
//! bounded proptest `tests/nic_rx_fuzz.rs`, which CI runs, and the cargo-fuzz target
//! `fuzz/fuzz_targets/nic_rx.rs`, for long runs).
//!
//! A [`ShmNic`] with a smoltcp interface on it (TCP listener, ICMP echo, IPv4 reassembly)
//! receives what the peer publishes: arbitrary frames, frames with a valid Ethernet/IPv4
//! header around fuzzed fields (so the bytes reach smoltcp's IP, ICMP and TCP parsers and the
//! reassembly), frames longer than the MTU, and frames the peer keeps rewriting after it
//! published them (between the NIC's `receive` and the token's `consume`, the window a peer
//! thread hits). The peer uses the ring protocol honestly (ring indices are shmring's own
//! fuzz target); everything else is hostile.
//!
//! Violations (`Err`): a panic (the caller's), the NIC faulting on an honest ring, a frame
//! received that is neither handed to smoltcp nor counted as oversize, a frame transmitted
//! longer than the MTU.

use shmring::duplex::pair;
use shmring::Duplex;
use vnet::smoltcp::iface::{Config, Interface, SocketSet};
use vnet::smoltcp::phy::{ChecksumCapabilities, Device};
use vnet::smoltcp::socket::tcp;
use vnet::smoltcp::time::Instant;
use vnet::smoltcp::wire::{EthernetAddress, IpCidr, Ipv4Address};
use vnet::ShmNic;

const CAP: usize = 64 * 1024;
const NIC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const NIC_IP: [u8; 4] = [10, 0, 0, 2];
const PEER_IP: [u8; 4] = [10, 0, 0, 1];

/// What one run did (to show the scenario reaches smoltcp).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Frames the peer published.
    pub published: u64,
    /// Frames the NIC handed to smoltcp.
    pub received: u64,
    /// Frames the NIC sent (replies: ARP, ICMP, TCP).
    pub replies: u64,
    /// IPv4 fragments seen by the NIC.
    pub fragments: u64,
}

/// The script's bytes, each read once; zeros after the end.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    fn is_done(&self) -> bool {
        self.0.is_empty()
    }
}

/// An Ethernet frame to the NIC with an IPv4 header whose protocol, flags/offset, total
/// length and header length come from the script, and `payload` after it.
fn ipv4_frame(s: &mut Script<'_>) -> Vec<u8> {
    let protocol = [1u8, 6, 17, 0][usize::from(s.byte() & 3)];
    // Mostly whole datagrams; else fragments 1480 bytes apart (Linux's at MTU 1500), first,
    // middle or last, or any offset.
    let flags_offset = match s.byte() % 8 {
        0..=3 => 0,
        4 => 0x2000,
        5 => 0x2000 | (u16::from(s.byte() % 8) * 185),
        6 => u16::from(s.byte() % 8) * 185,
        _ => s.u16() & 0x3fff, // never DF
    };
    let payload_len = usize::from(s.u16() % 1600);
    // A few script bytes start the payload (the protocol headers); zeros fill it.
    let head = payload_len.min(usize::from(s.byte() % 64));
    let bend_lengths = s.byte();
    let mut f = Vec::with_capacity(34 + payload_len);
    f.extend_from_slice(&NIC_MAC);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + payload_len) as u16;
    let mut ip = [0u8; 20];
    ip[0] = if bend_lengths & 1 == 0 {
        0x45
    } else {
        0x40 | (s.byte() & 0xf)
    };
    let total = if bend_lengths & 2 == 0 {
        total
    } else {
        s.u16()
    };
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&s.u16().to_be_bytes());
    ip[6..8].copy_from_slice(&flags_offset.to_be_bytes());
    ip[8] = 64;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&PEER_IP);
    ip[16..20].copy_from_slice(&NIC_IP);
    let sum = !shmring::view::ones_complement_sum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend(s.bytes(head));
    f.resize(34 + payload_len, 0);
    f
}

/// Runs the script; see the module docs.
pub fn run(script: &[u8]) -> Result<Stats, String> {
    let mut s = Script(script);
    let mtu = [vnet::nic::MIN_MTU, 576 + 14, vnet::nic::DEFAULT_MTU][usize::from(s.byte() % 3)];
    let (nic_rings, mut peer) = pair(CAP).map_err(|e| e.to_string())?;
    let mut nic = ShmNic::new(mtu, CAP).map_err(|e| e.to_string())?;
    nic.attach(nic_rings).map_err(|e| e.to_string())?;
    nic.set_carrier(true);
    // Checksums ignored, so fuzzed bytes get past them into smoltcp's parsers (a hostile peer
    // computes valid checksums anyway).
    nic.set_checksum(ChecksumCapabilities::ignored());
    let mut now = Instant::from_secs(1);
    let mut iface = Interface::new(Config::new(EthernetAddress(NIC_MAC).into()), &mut nic, now);
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(Ipv4Address::from(NIC_IP).into(), 24));
    });
    let mut sockets = SocketSet::new(Vec::new());
    let mut listener = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 4096]),
        tcp::SocketBuffer::new(vec![0; 4096]),
    );
    listener.listen(80).map_err(|e| e.to_string())?;
    sockets.add(listener);

    let mut stats = Stats::default();
    let mut oversize_sent = 0u64;
    let mut published = Vec::new();
    while !s.is_done() {
        match s.byte() % 6 {
            // Arbitrary bytes as a frame, up to a little over the MTU.
            0 => {
                let len = usize::from(s.u16()) % (mtu + 64);
                let frame = s.bytes(len);
                if publish(&mut peer, &frame, &mut published)? {
                    stats.published += 1;
                    oversize_sent += u64::from(len > mtu);
                }
            }
            // A frame that reaches smoltcp's IPv4 parsing.
            1 | 2 => {
                let frame = ipv4_frame(&mut s);
                if publish(&mut peer, &frame, &mut published)? {
                    stats.published += 1;
                    oversize_sent += u64::from(frame.len() > mtu);
                }
            }
            // The NIC takes a frame; the peer rewrites it between `receive` and `consume`.
            3 => {
                let at = usize::from(s.u16());
                let value = s.byte();
                // The frame `receive` hands out: the first not yet consumed within the MTU
                // (`receive` releases longer ones itself).
                let n = nic.stats();
                let mut next = (n.rx_frames + n.rx_oversize) as usize;
                while published.get(next).is_some_and(|p| p.len > mtu) {
                    next += 1;
                }
                if let Some((rx, _tx)) = nic.receive(now) {
                    if let Some(p) = published.get(next).filter(|p| p.len > 0) {
                        // SAFETY: the frame's bytes lie in the ring's data area, alive as long
                        // as `peer` and `nic`; the NIC has not released them (it holds the
                        // token). Writing published bytes is exactly the hostile peer under
                        // test; the NIC reads them only through raw-pointer copies (shmring's
                        // PeerBytes), never through a reference.
                        unsafe { p.at.add(at % p.len).write_volatile(value) };
                    }
                    vnet::smoltcp::phy::RxToken::consume(rx, |frame| {
                        // smoltcp would parse this; it must be the NIC's stable copy.
                        let _ = frame.iter().fold(0u8, |a, &b| a ^ b);
                    });
                }
            }
            // smoltcp polls (time moves on: reassembly and TCP timers).
            4 => {
                now += vnet::smoltcp::time::Duration::from_millis(u64::from(s.byte()) * 10);
                iface.poll(now, &mut nic, &mut sockets);
                let _ = nic.flush();
            }
            // The peer reads what the NIC sent.
            _ => stats.replies += drain(&mut peer, mtu)?,
        }
        if let Some(fault) = nic.fault() {
            return Err(format!("an honest ring faulted the NIC: {fault}"));
        }
    }
    // Everything published is received or counted as oversize in the end.
    for _ in 0..10_000 {
        iface.poll(now, &mut nic, &mut sockets);
        let _ = nic.flush();
        stats.replies += drain(&mut peer, mtu)?;
        if nic.receive(now).is_none() {
            break;
        }
    }
    let n = nic.stats();
    if n.rx_frames + n.rx_oversize != stats.published || n.rx_oversize != oversize_sent {
        return Err(format!(
            "published {} ({} over the MTU), NIC counted {} received and {} oversize",
            stats.published, oversize_sent, n.rx_frames, n.rx_oversize
        ));
    }
    if n.tx_oversize != 0 {
        return Err(format!(
            "smoltcp wrote {} frames over the MTU",
            n.tx_oversize
        ));
    }
    stats.received = n.rx_frames;
    stats.fragments = n.rx_ipv4_fragments + n.rx_ipv4_fragments_dropped;
    Ok(stats)
}

/// The peer publishes `frame` if it fits (`Ok(false)`: ring full) and remembers where its
/// bytes are, to rewrite them later.
fn publish(
    peer: &mut Duplex,
    frame: &[u8],
    published: &mut Vec<Published>,
) -> Result<bool, String> {
    let mut grant = match peer.tx.grant(frame.len().max(1)) {
        Ok(g) => g,
        Err(shmring::Error::Full { .. }) => return Ok(false),
        Err(e) => return Err(format!("peer send: {e}")),
    };
    grant[..frame.len()].copy_from_slice(frame);
    published.push(Published {
        at: grant.as_mut_ptr(),
        len: frame.len(),
    });
    grant.commit_len(frame.len());
    let _ = peer.tx.flush();
    Ok(true)
}

/// Where a published frame's bytes are in the ring (the peer keeps writing them).
struct Published {
    at: *mut u8,
    len: usize,
}

/// Releases every frame the NIC sent; fails on one longer than the MTU.
fn drain(peer: &mut Duplex, mtu: usize) -> Result<u64, String> {
    let mut n = 0;
    loop {
        match peer.rx.peek() {
            Ok(Some(frame)) => {
                if frame.len() > mtu {
                    return Err(format!(
                        "the NIC sent {} bytes over an MTU of {mtu}",
                        frame.len()
                    ));
                }
                frame.release();
                n += 1;
            }
            Ok(None) => break,
            Err(e) => return Err(format!("peer receive: {e}")),
        }
    }
    let _ = peer.rx.flush();
    Ok(n)
}
