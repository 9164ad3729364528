//! KVM cells: bare-metal x86-64 inmates in KVM virtual machines, booted by Jailhouse's x86
//! inmate protocol (`kvm-cells.md`), with the ivshmem v2 device of [`crate::device`].
//!
//! - [`KvmCell`]: one VM, an in-kernel irqchip, one vCPU thread pinned to the cell's CPU;
//!   start, stop, restart, and the stop on an illegal access or a `cell_state`.
//! - [`LinkWiring`]: a link's device model, memory and interrupt lines, shared by the KVM
//!   cells and the process cells on it; [`KvmLinkConfig`] puts a cell on a link.
//! - [`EventQueue`]: console lines and stops, for the main loop.
//!
//! # What the VMM provides to an inmate (the inmates interface)
//!
//! **Entry.** The image is copied to guest-physical 0 and entered in real mode at
//! `CS:IP = 0:0`: CR0 = ET|CD|NW, CR3 = CR4 = EFER = 0, RFLAGS = 2, every other general
//! register 0 (RSP too), all segments base 0 limit 0xFFFF, GDTR/IDTR base 0 limit 0xFFFF.
//! The local APIC is already in **x2APIC mode** (`IA32_APIC_BASE` = 0xFEE00000 | EN | EXTD |
//! BSP) and CPUID.1:ECX bit 21 is set; xAPIC MMIO is not emulated. The x2APIC ID is 0.
//!
//! **Memory.** Low RAM from 0 (1 MiB unless `memory` says less); the command line at 0x1000
//! (NUL-terminated, at most 255 bytes; nothing is written there without one); the
//! communication region at 0x100000 (one page, RW); extra RAM regions from the config; each
//! link's shared memory at its configured address, contiguous in layout order (state table,
//! R/W section, output sections), the address also in the vendor capability's base-address
//! field. The state table and the other peers' output sections are read-only slots.
//!
//! **Communication region** (0x100000, little-endian): `"JHCOMM"`, revision 2, cell_state 0,
//! console at port 0x3F8 size 8 type 2 (8250) flags 0, PM timer port (0x608 unless the
//! config says otherwise), 1 CPU, TSC kHz from KVM (0 if unknown), APIC timer kHz 0; at
//! offset 0x100 this project's **clock epoch** (`ivshmem_dev::comm`): `"IVCLOCK1"`, the guest
//! TSC and the host `CLOCK_MONOTONIC` ns read around it when the vCPU is created, so inmates
//! timestamp on the host's clock (not in Jailhouse; a Jailhouse inmate never reads it). The
//! layout is written once in `ivshmem_dev::comm` for the VMM and the inmate runtime. The
//! VMM reads `cell_state` every 20 ms: 2 (shut down), 3 (failed, e.g. a panic) and 4 (wrong
//! comm revision) stop the cell and are reported with their meaning.
//!
//! **Ports.** 0x3F8..0x3FF: an 8250, 1-byte accesses; LSR (0x3FD) reads 0x60, THR output is
//! printed line by line as `[cell] line` (`\r` dropped), LCR keeps DLAB (divisor writes
//! ignored), everything else reads 0. The PM timer port: 32-bit reads only, a 24-bit counter
//! at 3,579,545 Hz. 0xCF8: the 32-bit config address; 0xCFC..0xCFF: config data, 1, 2 or 4
//! bytes, naturally aligned (a misaligned access is illegal). Port 0x80: writes ignored.
//!
//! **PCI.** Each link is one function at its configured BDF (default 00:0e.0) with the
//! config space of [`crate::device`]; offsets from 0x80 and functions that do not exist read
//! all ones, writes there are ignored. BAR0 (4 KiB registers, aligned 32-bit accesses only)
//! is decoded while the command register's memory bit is set and BAR0 is non-zero.
//!
//! **Interrupts.** MSI-X messages are injected through the in-kernel LAPIC (x2APIC: EOI by
//! writing MSR 0x80B). A doorbell write (aligned 32-bit `vector | target << 16` to BAR0 +
//! 0x0C) to a known (target, vector) does not leave the kernel.
//!
//! **Illegal accesses** stop the cell with a `FATAL:` line naming cell, address, access
//! (port/MMIO, read/write), size, value and RIP: any other port, any MMIO outside BAR0/BAR1,
//! a write to a read-only slot, a wrong-size or misaligned register or config access, a
//! non-32-bit access to 0xCF8 or the PM timer. The vCPU is parked; the cell's states go to 0
//! and its peers get the state interrupt; the other cells keep running.
//!
//! **PVM fix-ups** (this machine's `/dev/kvm`): a ring-0 `xgetbv` (`0F 01 D0`, ECX = 0)
//! that ends in `KVM_EXIT_INTERNAL_ERROR` is emulated (EDX:EAX = XCR0, RIP += 3) in real
//! mode, unpaged protected mode and 4-level long mode.
//!
//! **Not emulated** (an access is illegal or has no effect): PIC/PIT/RTC/keyboard ports
//! (the in-kernel PIC answers 0x20/0xA0 and the IOAPIC its MMIO page; no PIT is created),
//! MMCONFIG, hypercalls (Jailhouse's `jailhouse_call*` vmcalls), more than one CPU, INTx
//! for KVM cells.

mod cell;
mod devices;
mod events;
mod fault;
pub mod layout;
mod links;
mod memory;
mod system;
pub mod test_guests;

pub use cell::{
    kvm_available, ExitCounts, KvmCell, KvmCellConfig, KvmCellPhase, MemoryRegionConfig,
};
pub use devices::{Bdf, BdfParseError, PmTimer, Uart};
pub use events::{EventQueue, HaltReason, KvmEvent};
pub use fault::{AddressSpace, IllegalAccess};
pub use links::{CellIrq, KvmLinkConfig, LinkSizes, LinkWiring, WiredModel};
pub use memory::{GuestMemory, GuestRegion, RegionKind};
pub use system::{create_wirings, KvmCellPlan, KvmCells, KvmLinkPlan, KvmNotice, KvmSystem};

/// Errors of the KVM backend; each names the failing call.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// A KVM ioctl failed.
    #[error("{call} failed: {source}")]
    Kvm {
        /// The ioctl.
        call: &'static str,
        /// errno.
        source: vmm_sys_util::errno::Error,
    },
    /// Another OS call failed.
    #[error("{call} failed: {source}")]
    Os {
        /// The call.
        call: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// The cell cannot be built as configured.
    #[error("{0}")]
    Config(String),
}
