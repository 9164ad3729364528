//! A smoltcp virtual NIC over shmring rings on an ivshmem link (protocol 0001h), and a
//! virtual network Linux can join through a TAP bridge.
//!
//! - [`nic::ShmNic`]: a smoltcp [`smoltcp::phy::Device`] over a [`shmring::Duplex`]: Ethernet
//!   frames, zero-copy tokens (grants and peeks inside shared memory), MTU up to 64 KiB,
//!   batching (one flush and at most one doorbell per poll), hostile-peer safe.
//! - [`link::VnetLink`]: owns the [`ivshmem_dev::Ivshmem`] driver, runs the ivshmem-net link
//!   state machine ([`ivshmem_dev::link_state`]) over `STATE`, sets up and tears down the
//!   rings, rings the doorbell only when the peer asked for it.
//! - [`services`]: the cell's network services (ICMP echo by smoltcp, TCP echo 7, discard 9,
//!   chargen 19, an HTTP status page on 80), no_std + alloc.
//! - `std` only: [`pcap`] capture, [`tap`] (a Linux TAP device), [`bridge`] (TAP ⇄ ring
//!   forwarding) and [`cell`] (the cell's event loop), used by `examples/vnet_cell.rs` and
//!   `examples/vnet_tap.rs`; [`netns`] (network namespaces and ICMP echo from Linux, for the
//!   root-only tests and `ivbench`) and [`process`] (a process cell's link, attached through
//!   the hosted hypervisor).
//!
//! The core is `no_std` with `alloc` (smoltcp socket buffers and one MTU-sized scratch
//! buffer per NIC); it builds for `x86_64-unknown-none`.
//!
//! A bare-metal cell's main loop:
//!
//! ```no_run
//! use vnet::services::{ServiceConfig, Services};
//! use vnet::smoltcp::time::Instant;
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
//!     let address = "10.0.0.2/24".parse().expect("an address");
//!     let mut services = Services::new(&ServiceConfig::new(address), &mut link.nic(), now());
//!     loop {
//!         services.poll(now(), &mut link.nic(), &mut |_page| {});
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
#[cfg(feature = "std")]
pub mod cell;
pub mod link;
#[cfg(feature = "std")]
pub mod netns;
pub mod nic;
#[cfg(feature = "std")]
pub mod pcap;
#[cfg(feature = "std")]
pub mod process;
pub mod services;
#[cfg(feature = "std")]
pub mod tap;

pub use link::{LinkConfig, LinkError, LinkEvent, LinkStats, VnetLink};
pub use nic::{NicError, NicStats, ShmNic};
/// The smoltcp version this crate is built on.
pub use smoltcp;
