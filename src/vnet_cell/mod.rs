//! Application code on a vnet link, shared by the examples, the whole-system tests and
//! `ivbench` (it is not part of `vnet`'s public API, which is the NIC, the link, the TAP bridge
//! and pcap capture):
//!
//! - [`services`]: a cell's network services (ICMP echo by smoltcp, TCP echo 7, discard 9,
//!   chargen 19, an HTTP status page on 80), no_std + alloc in spirit: only `alloc` and
//!   smoltcp.
//! - [`cell`]: a cell's event loop over `poll(2)` (what a bare-metal cell does in its idle
//!   loop), used by `examples/vnet_cell.rs`.
//! - [`process`]: a process cell's vnet link, attached through the hosted hypervisor.
//! - [`netns`]: network namespaces and ICMP echo from Linux (root-only tests and `ivbench`).

pub mod cell;
pub mod netns;
pub mod process;
pub mod services;
