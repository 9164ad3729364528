//! The ivshmem v2 device contract and the guest-side driver.
//!
//! - [`pci`]: PCI identity (110Ah:4106h, class FFh), config-space offsets, the vendor
//!   capability, the [`pci::ConfigAccess`] trait, discovery and BAR sizing/programming.
//! - [`msix`]: the MSI-X capability, table and PBA in BAR1 (Jailhouse's x86 layout): constants,
//!   the capability walk ([`msix::MsixCapability::find`]) and table programming
//!   ([`msix::MsixTable`]), all no_std.
//! - [`regs`]: the BAR0 register page and [`regs::RegisterAccess`] ([`regs::Mmio`] for real
//!   or UIO-mapped registers).
//! - [`doorbell`]: the `DOORBELL` value encoding.
//! - [`protocol`]: the 16-bit protocol (Ethernet 0001h, telemetry 4001h, …).
//! - [`comm`]: the communication region of an x86 cell (KVM cells, Jailhouse), with this
//!   project's clock epoch extension.
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
//! - With INTx only vector 0 exists; with MSI-X 1 to 16 ([`msix::MAX_VECTORS`]), vector 0
//!   carrying state changes. The driver's [`driver::Ivshmem::ring`] takes a vector for both.
//! - The command register's writable bits are memory, bus master and INTx disable
//!   ([`pci::COMMAND_WRITABLE`]): `ivshmem-v2.md` also lists the I/O bit, but the device has
//!   no I/O BAR, so the bit stays 0 (writing FFFFh reads back 0406h).
//! - MSI-X keeps no pending bits: the PBA reads 0 and an interrupt raised while masked is
//!   dropped, not replayed on unmask (event state lives in shared memory; Jailhouse does
//!   the same).
//! - **A doorbell to a peer that is attached but whose state is 0** is delivered (if that
//!   peer enabled interrupts): "active" in the specification means attached (its cell runs,
//!   its device exists), not a non-zero state. A peer that just started and has not written
//!   STATE yet can therefore already be woken, which is what a guest waiting for its peer's
//!   first doorbell expects. Jailhouse's code does the same.
//!
//! # Readings of typos in the specification
//!
//! The register table of the Jailhouse specification has two entries that contradict PCI and
//! Jailhouse's own code; this crate follows PCI and the code:
//! - the **interrupt pin** is at config offset **3Dh** ([`pci::INTERRUPT_PIN`]), not 3Eh (3Eh
//!   is Min_Gnt in a type 0 header);
//! - **bus master** is command bit **2** ([`pci::COMMAND_BUS_MASTER`]), not bit 3 (bit 3 is
//!   Special Cycles).
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

pub mod comm;
pub mod doorbell;
pub mod driver;
pub mod hosted;
pub mod layout;
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
