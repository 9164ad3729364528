//! PCI configuration mechanism #1 through x86 I/O ports 0xCF8 (address) and 0xCFC (data).

use core::arch::asm;
use core::cell::Cell;
use core::marker::PhantomData;

use crate::pci::{legacy_config_address, ConfigAccess, PciAddress};

/// The config address port.
pub const CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// The config data port.
pub const CONFIG_DATA_PORT: u16 = 0xCFC;

/// Config-space access through ports 0xCF8/0xCFC.
///
/// Each access is an address write followed by a data access, so two CPUs must not use the
/// ports at the same time; the type is not `Sync` and the caller promises exclusivity.
#[derive(Debug)]
pub struct PortIo {
    _not_sync: PhantomData<Cell<()>>,
}

impl PortIo {
    /// Creates the accessor.
    ///
    /// # Safety
    /// The caller must be allowed to use ports 0xCF8–0xCFF (ring 0, or an I/O permission
    /// bitmap / `iopl` granting them) and must make sure nothing else in the system accesses
    /// those ports while this value is used.
    pub unsafe fn new() -> Self {
        Self {
            _not_sync: PhantomData,
        }
    }
}

/// Writes a dword to an I/O port.
///
/// # Safety
/// The caller must have access to `port` and writing it must not break memory safety.
unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller guarantees port access; `out` touches no Rust-visible memory and no
    // stack. No `nomem`, so the compiler keeps memory accesses ordered around it.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    }
}

/// Reads a dword from an I/O port.
///
/// # Safety
/// The caller must have access to `port` and reading it must not break memory safety.
unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outl`.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nostack, preserves_flags))
    }
    value
}

impl ConfigAccess for PortIo {
    fn read32(&self, address: PciAddress, offset: u8) -> u32 {
        // SAFETY: `PortIo::new`'s caller granted exclusive access to 0xCF8/0xCFC; selecting a
        // config register and reading it does not touch memory.
        unsafe {
            outl(CONFIG_ADDRESS_PORT, legacy_config_address(address, offset));
            inl(CONFIG_DATA_PORT)
        }
    }

    fn write32(&self, address: PciAddress, offset: u8, value: u32) {
        // SAFETY: as for `read32`; the config write goes to the selected function only.
        unsafe {
            outl(CONFIG_ADDRESS_PORT, legacy_config_address(address, offset));
            outl(CONFIG_DATA_PORT, value);
        }
    }
}
