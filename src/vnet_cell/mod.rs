//! Application code on a vnet link, shared by the examples, the whole-system tests and
//! `ivbench` (it is not part of `vnet`'s public API, which is the NIC, the link, the TAP bridge
//! and pcap capture):
//!
//! - [`services`]: a cell's network services (ICMP echo by smoltcp, TCP echo 7, discard 9,
//!   chargen 19, an HTTP status page on 80): the `vnet-services` crate (no_std + alloc), which
//!   the bare-metal network inmate (`inmates/net`) runs too; re-exported here.
//! - [`cell`]: a cell's event loop over `poll(2)` around `vnet_services::NetCell` (the inmate
//!   wraps the same core in `hlt`), used by `examples/vnet_cell.rs`.
//! - [`process`]: a process cell's vnet link, attached through the hosted hypervisor.
//! - [`netns`]: network namespaces and ICMP echo from Linux (root-only tests and `ivbench`).

pub mod cell;
pub mod netns;
pub mod process;
pub use vnet_services::services;
