//! MSI-X: finding the capability, enabling it, and programming table entries for this CPU.
//!
//! Layout (PCI Local Bus spec; kvm-cells.md for the ivshmem device): capability ID 11h;
//! message control at +2 (bits 0–10 table size − 1, bit 14 function mask, bit 15 enable);
//! +4 table offset/BIR; +8 PBA offset/BIR. Each 16-byte table entry holds the message address
//! (`0xFEE00000 | x2APIC-ID << 12` on x86), the upper address, the data (the IDT vector,
//! fixed delivery, edge) and the vector control (bit 0 = masked).
//!
//! The constants are local to the runtime: `ivshmem-dev` has no MSI-X constants yet (they are
//! being added with the MSI-X device model); switch to them once they exist.

use core::ptr::{self, NonNull};

use ivshmem_dev::pci::{find_capability, ConfigAccess, DiscoveryError, PciAddress};

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Offset of message control within the capability.
pub const CAP_CONTROL: u8 = 0x02;
/// Offset of the table offset/BIR dword.
pub const CAP_TABLE: u8 = 0x04;
/// Offset of the PBA offset/BIR dword.
pub const CAP_PBA: u8 = 0x08;
/// Message control: enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control: table size − 1.
pub const CONTROL_TABLE_SIZE_MASK: u16 = 0x07FF;
/// Size of one table entry.
pub const ENTRY_SIZE: usize = 16;
/// Vector control bit 0: masked.
pub const ENTRY_MASKED: u32 = 1;
/// The x86 MSI address base.
pub const MSI_ADDRESS_BASE: u32 = 0xFEE0_0000;

/// The message address that targets the CPU with `x2apic_id` (physical destination mode).
pub const fn message_address(x2apic_id: u32) -> u32 {
    MSI_ADDRESS_BASE | (x2apic_id & 0xFF) << 12
}

/// An MSI-X capability as read from config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCapability {
    /// The function.
    pub address: PciAddress,
    /// Offset of the capability.
    pub offset: u8,
    /// Number of table entries.
    pub table_size: u16,
    /// BAR index of the table.
    pub table_bir: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u32,
    /// BAR index of the PBA.
    pub pba_bir: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u32,
}

impl MsixCapability {
    /// Walks the capability list for MSI-X.
    pub fn find<C: ConfigAccess + ?Sized>(
        access: &C,
        address: PciAddress,
    ) -> Result<Option<Self>, DiscoveryError> {
        let Some(offset) = find_capability(access, address, CAP_ID_MSIX)? else {
            return Ok(None);
        };
        let control = (access.read32(address, offset) >> 16) as u16;
        let table = access.read32(address, offset + CAP_TABLE);
        let pba = access.read32(address, offset + CAP_PBA);
        Ok(Some(Self {
            address,
            offset,
            table_size: (control & CONTROL_TABLE_SIZE_MASK) + 1,
            table_bir: (table & 7) as u8,
            table_offset: table & !7,
            pba_bir: (pba & 7) as u8,
            pba_offset: pba & !7,
        }))
    }

    /// Message control as it reads now.
    pub fn control<C: ConfigAccess + ?Sized>(&self, access: &C) -> u16 {
        (access.read32(self.address, self.offset) >> 16) as u16
    }

    /// Writes message control (the capability's ID and next bytes in the same dword are
    /// read-only and written back unchanged).
    pub fn set_control<C: ConfigAccess + ?Sized>(&self, access: &C, control: u16) {
        let header = access.read32(self.address, self.offset) & 0xFFFF;
        access.write32(self.address, self.offset, header | u32::from(control) << 16);
    }

    /// Enables MSI-X and clears the function mask.
    pub fn enable<C: ConfigAccess + ?Sized>(&self, access: &C) {
        let control = self.control(access) & !CONTROL_FUNCTION_MASK | CONTROL_ENABLE;
        self.set_control(access, control);
    }
}

/// The MSI-X table, mapped at the address its BAR was programmed to.
#[derive(Debug)]
pub struct MsixTable {
    base: NonNull<u32>,
    entries: u16,
}

impl MsixTable {
    /// Wraps the table at `base` with `entries` entries.
    ///
    /// # Safety
    /// `base` must be the (identity-mapped) address of the device's MSI-X table with memory
    /// decoding on, valid for `entries * 16` bytes while the value lives.
    pub unsafe fn new(base: NonNull<u8>, entries: u16) -> Self {
        Self {
            base: base.cast(),
            entries,
        }
    }

    /// Number of entries.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    fn word(&self, entry: u16, index: usize) -> *mut u32 {
        assert!(entry < self.entries, "MSI-X entry {entry} out of range");
        // SAFETY: `entry < entries`, so the word lies inside the table (`new`'s contract).
        unsafe {
            self.base
                .as_ptr()
                .add(usize::from(entry) * ENTRY_SIZE / 4 + index)
        }
    }

    /// Points `entry` at IDT `vector` on the CPU with `x2apic_id` and unmasks it.
    pub fn program(&self, entry: u16, x2apic_id: u32, vector: u8) {
        // SAFETY: `word` returns addresses inside the table; each access is one aligned 32-bit
        // MMIO access as the device requires. The entry is masked while it is rewritten.
        unsafe {
            ptr::write_volatile(self.word(entry, 3), ENTRY_MASKED);
            ptr::write_volatile(self.word(entry, 0), message_address(x2apic_id));
            ptr::write_volatile(self.word(entry, 1), 0);
            ptr::write_volatile(self.word(entry, 2), u32::from(vector));
            ptr::write_volatile(self.word(entry, 3), 0);
        }
    }

    /// Masks or unmasks `entry`.
    pub fn set_masked(&self, entry: u16, masked: bool) {
        // SAFETY: as for `program`.
        unsafe { ptr::write_volatile(self.word(entry, 3), u32::from(masked)) }
    }

    /// Reads the four words of `entry` (address, upper address, data, control).
    pub fn read(&self, entry: u16) -> [u32; 4] {
        // SAFETY: as for `program`.
        core::array::from_fn(|i| unsafe { ptr::read_volatile(self.word(entry, i)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_address_targets_the_x2apic_id() {
        assert_eq!(message_address(0), 0xFEE0_0000);
        assert_eq!(message_address(3), 0xFEE0_3000);
    }

    #[test]
    fn table_entries_are_masked_while_rewritten_and_unmasked_after() {
        let mut memory = [0xFFFF_FFFFu32; 8];
        // SAFETY: `memory` holds two 16-byte entries and outlives the table.
        let table =
            unsafe { MsixTable::new(NonNull::new(memory.as_mut_ptr().cast::<u8>()).unwrap(), 2) };
        table.program(1, 2, 0x21);
        assert_eq!(table.read(1), [0xFEE0_2000, 0, 0x21, 0]);
        assert_eq!(table.read(0), [u32::MAX; 4], "entry 0 untouched");
        table.set_masked(1, true);
        assert_eq!(table.read(1)[3], ENTRY_MASKED);
    }
}
