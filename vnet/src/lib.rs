//! A smoltcp virtual NIC over shmring rings on an ivshmem link (protocol 0001h), and a
//! virtual network Linux can join through a TAP bridge.
//!
//! - [`nic`]: the NIC — [`nic::NicState`] (MTU, carrier, fault, counters) and the smoltcp
//!   [`smoltcp::phy::Device`]s over a [`shmring::Duplex`]: [`nic::NicPort`] (rings lent by a
//!   link) and [`nic::ShmNic`] (rings owned, for in-process pairs). Ethernet frames; transmit is
//!   zero-copy (grants inside shared memory), receive copies each frame once into NIC-owned
//!   memory before smoltcp parses it (a peer can still write a frame it published); MTU up
//!   to 64 KiB, batching (one flush and at most one doorbell per poll), hostile-peer safe.
//! - [`link::VnetLink`]: the NIC on an [`ivshmem_link::Link`] (device driver, the ivshmem-net
//!   state machine over `STATE`, rings set up and torn down, doorbell only when the peer asked
//!   for it). It is a smoltcp `Device` itself.
//! - `std` only: [`pcap`] capture, [`tap`] (a Linux TAP device) and [`bridge`] (TAP ⇄ ring
//!   forwarding, the Linux side of the virtual network).
//!
//! Applications on top — a cell's network services and event loop, process-cell glue,
//! network namespaces for tests — live with the examples (`ivshmem_stack::vnet_cell` in the
//! root package), not here.
//!
//! Dependency rule: `shmring`, `ivshmem-dev` ← `ivshmem-link` ← this crate; `std` adds
//! `linux-uio-client`'s endpoint (never its tokio integration) for the bridge's interrupt.
//!
//! The core is `no_std` with `alloc` (one MTU-sized scratch buffer per NIC); it builds for
//! `x86_64-unknown-none`.
//!
//! # Example
//!
//! Two NICs joined by a pair of in-process rings (in a cell they sit in the link's shared
//! sections, see [`VnetLink`]), a smoltcp interface on each, and a TCP connection between
//! them:
//!
//! ```
//! use vnet::smoltcp::iface::{Config, Interface, SocketSet};
//! use vnet::smoltcp::socket::tcp;
//! use vnet::smoltcp::time::Instant;
//! use vnet::smoltcp::wire::{EthernetAddress, IpCidr, Ipv4Address};
//! use vnet::ShmNic;
//!
//! const RING: usize = 64 * 1024;
//! let (ring_a, ring_b) = shmring::duplex::pair(RING).unwrap();
//! let mut nics = [ring_a, ring_b].map(|rings| {
//!     let mut nic = ShmNic::new(vnet::nic::DEFAULT_MTU, RING).unwrap();
//!     nic.attach(rings).unwrap();
//!     nic.set_carrier(true); // a VnetLink does this when the peer's link comes up
//!     nic
//! });
//! let mut ifaces: Vec<Interface> = (0..2u8)
//!     .map(|i| {
//!         let mac = EthernetAddress([0x02, 0, 0, 0, 0, i + 1]);
//!         let nic = &mut nics[usize::from(i)];
//!         let mut iface = Interface::new(Config::new(mac.into()), nic, Instant::ZERO);
//!         let address = IpCidr::new(Ipv4Address::new(10, 0, 0, i + 1).into(), 24);
//!         iface.update_ip_addrs(|a| a.push(address).unwrap());
//!         iface
//!     })
//!     .collect();
//!
//! let buffer = || tcp::SocketBuffer::new(vec![0; 4096]);
//! let tcp_socket = || tcp::Socket::new(buffer(), buffer());
//! let mut sockets = [SocketSet::new(Vec::new()), SocketSet::new(Vec::new())];
//! let client = sockets[0].add(tcp_socket());
//! let server = sockets[1].add(tcp_socket());
//! sockets[1].get_mut::<tcp::Socket>(server).listen(7).unwrap();
//! let remote = (Ipv4Address::new(10, 0, 0, 2), 7);
//! let c = sockets[0].get_mut::<tcp::Socket>(client);
//! c.connect(ifaces[0].context(), remote, 49152).unwrap();
//!
//! let message = b"hello over shared memory";
//! let (mut sent, mut received) = (false, Vec::new());
//! for ms in 0..1000 {
//!     for i in 0..2 {
//!         ifaces[i].poll(Instant::from_millis(ms), &mut nics[i], &mut sockets[i]);
//!         // Publish this poll's frames at once (a cell rings the peer's doorbell if told to).
//!         let _notify = nics[i].flush();
//!     }
//!     let c = sockets[0].get_mut::<tcp::Socket>(client);
//!     if !sent && c.can_send() {
//!         sent = c.send_slice(message).unwrap() == message.len();
//!     }
//!     let s = sockets[1].get_mut::<tcp::Socket>(server);
//!     if s.can_recv() {
//!         s.recv(|data| (data.len(), received.extend_from_slice(data))).unwrap();
//!     }
//!     if received.len() == message.len() {
//!         break;
//!     }
//! }
//! assert_eq!(received, message);
//! assert!(nics[1].stats().rx_frames >= 3); // SYN, ACK, data (each copied out of the ring)
//! ```
//!
//! A bare-metal cell's main loop over an ivshmem device:
//!
//! ```no_run
//! use vnet::smoltcp::iface::{Config, Interface, SocketSet};
//! use vnet::smoltcp::time::Instant;
//! use vnet::smoltcp::wire::{EthernetAddress, IpCidr, Ipv4Address};
//! use vnet::{LinkConfig, VnetLink};
//!
//! fn cell<R: ivshmem_dev::RegisterAccess>(
//!     dev: ivshmem_dev::Ivshmem<R>,
//!     wait_for_interrupt: impl Fn(),
//!     now: impl Fn() -> Instant,
//! ) -> Result<(), vnet::LinkError> {
//!     dev.enable_interrupts();
//!     let mut link = VnetLink::new(dev, LinkConfig::default())?;
//!     link.poll_link();
//!     let mac = EthernetAddress([0x02, 0, 0, 0, 0, 2]);
//!     let mut iface = Interface::new(Config::new(mac.into()), &mut link, now());
//!     let address = IpCidr::new(Ipv4Address::new(10, 0, 0, 2).into(), 24);
//!     iface.update_ip_addrs(|a| a.push(address).unwrap());
//!     let mut sockets = SocketSet::new(Vec::new()); // ICMP echo is answered by smoltcp
//!     loop {
//!         iface.poll(now(), &mut link, &mut sockets);
//!         link.flush(); // one publish per ring, at most one doorbell
//!         if link.prepare_sleep() {
//!             wait_for_interrupt(); // doorbell or peer state change (re-arm if one-shot)
//!             link.poll_link(); // the link state machine runs after every interrupt
//!         }
//!     }
//! }
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

extern crate alloc;

#[cfg(feature = "std")]
pub mod bridge;
pub mod link;
pub mod nic;
#[cfg(feature = "std")]
pub mod pcap;
#[cfg(feature = "std")]
pub mod tap;

pub use link::{LinkConfig, LinkError, LinkEvent, LinkFault, LinkStats, VnetLink};
pub use nic::{NicError, NicPort, NicState, NicStats, ShmNic};
/// The smoltcp version this crate is built on.
pub use smoltcp;
