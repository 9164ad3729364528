//! The ivshmem v2 device contract and the guest-side driver.
//!
//! - [`pci`]: PCI identity (110Ah:4106h, class FFh), config-space offsets, the vendor
//!   capability, the [`pci::ConfigAccess`] trait and discovery.
//! - [`regs`]: the BAR0 register page and [`regs::RegisterAccess`] ([`regs::Mmio`] for real
//!   or UIO-mapped registers).
//! - [`doorbell`]: the `DOORBELL` value encoding.
//! - [`protocol`]: the 16-bit protocol (Ethernet 0001h, telemetry 4001h, …).
//! - [`layout`]: where state table, R/W and output sections lie in shared memory.
//! - [`driver`]: [`driver::Ivshmem`], the driver a cell uses.
//! - `port_io` (feature `x86-port-io`, x86 only): config access through ports 0xCF8/0xCFC.
//! - [`hosted`]: the wire protocol between the hosted hypervisor and process cells.
//!
//! The crate follows the Jailhouse "IVSHMEM v2" specification as restated in the project's
//! `ivshmem-v2.md`. Choices where the specification leaves room:
//! - Writes to the read-only `ID` and `MAX_PEERS` registers are ignored (as Jailhouse does),
//!   not treated as illegal accesses.
//! - [`layout::SharedMemoryLayout`] refuses sizes that are not page multiples instead of
//!   rounding them up.
//! - Life cycle (enforced by the hypervisor, not by this crate): a peer that dies has its state
//!   set to 0 at once; Jailhouse keeps a crashed cell's last state until the root cell acts.
//! - With INTx only vector 0 exists; the driver's [`driver::Ivshmem::ring`] still takes a
//!   vector so MSI-X can be added without an API change.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

pub mod doorbell;
pub mod driver;
pub mod hosted;
pub mod layout;
pub mod link_state;
pub mod msix;
pub mod pci;
#[cfg(all(
    feature = "x86-port-io",
    any(target_arch = "x86", target_arch = "x86_64")
))]
pub mod port_io;
pub mod protocol;
pub mod regs;

pub use doorbell::Doorbell;
pub use driver::{DriverError, Ivshmem, Section, Sections};
pub use layout::{LayoutError, LayoutParams, Region, SharedMemoryLayout, MAX_SUPPORTED_PEERS};
pub use pci::{ConfigAccess, DiscoveryError, IvshmemPci, PciAddress, VendorCapability};
#[cfg(all(
    feature = "x86-port-io",
    any(target_arch = "x86", target_arch = "x86_64")
))]
pub use port_io::PortIo;
pub use protocol::Protocol;
pub use regs::{Mmio, RegisterAccess};
/// Re-exported so users of [`pci::ConfigHeader`] and [`pci::VendorCapabilityLayout`] get the
/// matching zerocopy traits.
pub use zerocopy;
