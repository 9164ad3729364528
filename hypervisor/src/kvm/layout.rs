//! The guest-physical memory map of a KVM cell (`kvm-cells.md`, after Jailhouse's x86 inmate
//! protocol). The communication region itself (addresses, fields, initial bytes, cell states)
//! is `ivshmem_dev::comm`, shared with the inmate runtime.

pub use ivshmem_dev::comm::offset as comm;
pub use ivshmem_dev::comm::{
    describe_cell_state, CMDLINE_ADDRESS, CMDLINE_MAX, COMM_REGION_ADDRESS, COMM_REGION_SIZE,
    PM_TIMER_HZ, UART_BASE, UART_PORTS,
};

/// Where the image is loaded (a flat binary linked to run at 0).
pub const IMAGE_ADDRESS: u64 = 0;
/// The largest low RAM (from 0 up to the communication region).
pub const MAX_LOW_MEMORY: u64 = COMM_REGION_ADDRESS;
/// The first address extra memory regions may use.
pub const EXTRA_MEMORY_START: u64 = COMM_REGION_ADDRESS + COMM_REGION_SIZE;
/// Guest page size.
pub const GUEST_PAGE: u64 = 0x1000;
/// The default ACPI PM timer port (announced in the communication region).
pub const DEFAULT_PM_TIMER_PORT: u16 = 0x608;
