//! The network side of a vnet cell, written once for every kind of cell: a process cell of the
//! hosted hypervisor (`ivshmem_stack::vnet_cell`, over `poll(2)`) and the bare-metal network
//! inmate of a KVM cell (`inmates/net`, over `hlt` and MSI-X) run the same code.
//!
//! - [`services`]: ICMP echo (smoltcp's), TCP echo 7, sink 9, source 19 and an HTTP status
//!   page on 80, with bounded connection life (handshake and idle timeouts, keep-alive).
//! - [`cell`]: [`NetCell`], the core of a cell's event loop (link state machine, smoltcp,
//!   services, one flush per round, the sleep handshake); the caller supplies the clock and
//!   the way to wait for the link interrupt.
//!
//! `no_std` + `alloc` (a heap for smoltcp's socket buffers); it builds for
//! `x86_64-unknown-none`. Dependency rule: `vnet` (no default features) ← this crate ← the
//! root package and the inmates.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

extern crate alloc;

pub mod cell;
pub mod services;

pub use cell::NetCell;
pub use services::{ServiceConfig, ServiceStats, Services};
