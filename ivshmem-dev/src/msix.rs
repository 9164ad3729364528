//! MSI-X: the capability, the table and the PBA in BAR1, in Jailhouse's x86 layout.
//!
//! On x86 Jailhouse signals ivshmem interrupts through MSI-X only (its x86 INTx hook does
//! nothing). The emulated device then looks like this (`kvm-cells.md`):
//!
//! - the vendor capability at 40h chains to the MSI-X capability at [`MSIX_CAP_OFFSET`]
//!   (60h, ID [`CAP_ID_MSIX`], next 0);
//! - the capability's message control reports the table size as `vectors - 1`; only
//!   [`MSIX_CONTROL_ENABLE`] (bit 15) and [`MSIX_CONTROL_FUNCTION_MASK`] (bit 14) are writable;
//! - the table lives in BAR1 at offset 0 ([`MSIX_TABLE_OFFSET_IN_BAR`]), the pending-bit array
//!   at 100h ([`MSIX_PBA_OFFSET_IN_BAR`]); the PBA always reads 0: the device keeps no pending
//!   bits, an interrupt that is masked when it is raised is dropped (event state lives in
//!   shared memory, as ivshmem v2 requires);
//! - up to [`MAX_VECTORS`] vectors; vector 0 carries state changes.
//!
//! A table entry ([`MSIX_ENTRY_SIZE`] bytes) is: message address low, message address high,
//! message data, vector control (bit 0 = [`MSIX_ENTRY_MASKED`]). On x86 the address is
//! `0xFEE0_0000 | apic_id << 12` ([`x86_msi_address`]) and the data is the IDT vector.
//!
//! Guest-side helpers: [`MsixCapability::find`] walks the capability list (through
//! [`ConfigAccess`], untrusted like everything in config space), [`MsixCapability::set_control`]
//! enables or masks the function, and [`MsixTable`] programs entries in a mapped BAR1 (over
//! any [`RegisterAccess`], e.g. [`crate::regs::Mmio`] on the BAR1 page).

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::pci::{find_capability, ConfigAccess, DiscoveryError, PciAddress, CONFIG_SPACE_SIZE};
use crate::regs::RegisterAccess;

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Where the emulated device puts the MSI-X capability (Jailhouse's x86 layout). Guests must
/// not rely on it: walk the list with [`MsixCapability::find`].
pub const MSIX_CAP_OFFSET: u8 = 0x60;
/// Length of the MSI-X capability in config space.
pub const MSIX_CAP_LEN: u8 = 0x0C;

/// Capability offset of the message control (u16).
pub const MSIX_CONTROL: u8 = 0x02;
/// Capability offset of the table offset / BIR (u32).
pub const MSIX_TABLE: u8 = 0x04;
/// Capability offset of the PBA offset / BIR (u32).
pub const MSIX_PBA: u8 = 0x08;

/// Message control bit 15: MSI-X enable.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Message control bit 14: function mask (every vector masked).
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control bits 0–10: table size minus one (read-only).
pub const MSIX_CONTROL_TABLE_SIZE_MASK: u16 = 0x07FF;
/// The message-control bits a guest may write.
pub const MSIX_CONTROL_WRITABLE: u16 = MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK;

/// Bits 0–2 of the table and PBA dwords: the BAR indicator.
pub const MSIX_BIR_MASK: u32 = 0x7;
/// The BAR that holds table and PBA: BAR1.
pub const MSIX_BAR: u8 = 1;
/// Offset of the table inside BAR1.
pub const MSIX_TABLE_OFFSET_IN_BAR: u32 = 0;
/// Offset of the pending-bit array inside BAR1.
pub const MSIX_PBA_OFFSET_IN_BAR: u32 = 0x100;
/// Size of BAR1 (one 4 KiB page).
pub const BAR1_SIZE: u32 = 0x1000;
/// The value BAR1 reads back after all ones was written (MSI-X mode): the 4 KiB size mask of
/// a non-prefetchable 32-bit memory BAR.
pub const BAR1_SIZE_MASK: u32 = !(BAR1_SIZE - 1);

/// Most MSI-X vectors one peer's device offers (Jailhouse's demo asks for 16).
pub const MAX_VECTORS: u16 = 16;

/// Size of one table entry.
pub const MSIX_ENTRY_SIZE: u32 = 16;
/// Entry offset of the message address, low half.
pub const MSIX_ENTRY_ADDR_LO: u32 = 0x0;
/// Entry offset of the message address, high half.
pub const MSIX_ENTRY_ADDR_HI: u32 = 0x4;
/// Entry offset of the message data.
pub const MSIX_ENTRY_DATA: u32 = 0x8;
/// Entry offset of the vector control.
pub const MSIX_ENTRY_VECTOR_CONTROL: u32 = 0xC;
/// Vector control bit 0: the entry is masked. Set after reset.
pub const MSIX_ENTRY_MASKED: u32 = 1;

/// The x86 MSI address that targets the local APIC with (x2)APIC ID `apic_id` (physical
/// destination mode, no redirection hint): `0xFEE0_0000 | apic_id << 12`. IDs above 255
/// need the interrupt remapping / extended destination ID scheme and are not supported.
pub const fn x86_msi_address(apic_id: u8) -> u64 {
    0xFEE0_0000 | (apic_id as u64) << 12
}

/// The MSI-X capability as it sits in config space (12 bytes, little-endian).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct MsixCapabilityLayout {
    /// 00h: [`CAP_ID_MSIX`].
    pub id: u8,
    /// 01h: next capability pointer.
    pub next: u8,
    /// 02h: message control.
    pub control: U16,
    /// 04h: table offset | BIR.
    pub table: U32,
    /// 08h: PBA offset | BIR.
    pub pba: U32,
}

const _: () = assert!(core::mem::size_of::<MsixCapabilityLayout>() == MSIX_CAP_LEN as usize);

/// The MSI-X capability as a guest reads it from config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsixCapability {
    /// The function.
    pub address: PciAddress,
    /// Offset of the capability in config space.
    pub offset: u8,
    /// Number of table entries (table size field + 1), `1..=2048`.
    pub vectors: u16,
    /// BAR that holds the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u32,
    /// BAR that holds the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u32,
}

impl MsixCapability {
    /// Walks `address`'s capability list for MSI-X and reads it. `Ok(None)`: the device has
    /// no MSI-X capability (INTx mode). The capability is untrusted: one that does not fit in
    /// config space or names a BAR above 5 is [`DiscoveryError::BadMsixCapability`].
    pub fn find<C: ConfigAccess + ?Sized>(
        access: &C,
        address: PciAddress,
    ) -> Result<Option<Self>, DiscoveryError> {
        let Some(offset) = find_capability(access, address, CAP_ID_MSIX)? else {
            return Ok(None);
        };
        if usize::from(offset) + usize::from(MSIX_CAP_LEN) > CONFIG_SPACE_SIZE {
            return Err(DiscoveryError::BadMsixCapability { address, offset });
        }
        let control = (access.read32(address, offset) >> 16) as u16;
        let table = access.read32(address, offset + MSIX_TABLE);
        let pba = access.read32(address, offset + MSIX_PBA);
        let (table_bar, pba_bar) = ((table & MSIX_BIR_MASK) as u8, (pba & MSIX_BIR_MASK) as u8);
        if table_bar > 5 || pba_bar > 5 {
            return Err(DiscoveryError::BadMsixCapability { address, offset });
        }
        Ok(Some(Self {
            address,
            offset,
            vectors: (control & MSIX_CONTROL_TABLE_SIZE_MASK) + 1,
            table_bar,
            table_offset: table & !MSIX_BIR_MASK,
            pba_bar,
            pba_offset: pba & !MSIX_BIR_MASK,
        }))
    }

    /// The message control register now.
    pub fn control<C: ConfigAccess + ?Sized>(&self, access: &C) -> u16 {
        access.read16(self.address, self.offset + MSIX_CONTROL)
    }

    /// Sets MSI-X enable and function mask (the only writable control bits) and returns the
    /// control value read back. The capability's first dword is written whole (ID and next
    /// pointer are read-only), so this works through a dword-only [`ConfigAccess`].
    pub fn set_control<C: ConfigAccess + ?Sized>(
        &self,
        access: &C,
        enable: bool,
        function_mask: bool,
    ) -> u16 {
        let header = access.read32(self.address, self.offset);
        let mut control = (header >> 16) as u16 & !MSIX_CONTROL_WRITABLE;
        if enable {
            control |= MSIX_CONTROL_ENABLE;
        }
        if function_mask {
            control |= MSIX_CONTROL_FUNCTION_MASK;
        }
        access.write32(
            self.address,
            self.offset,
            header & 0xFFFF | u32::from(control) << 16,
        );
        self.control(access)
    }
}

/// The MSI-X table of a device, mapped (BAR1 on bare metal), programmed through 32-bit
/// accesses of a [`RegisterAccess`] whose offset 0 is the start of the BAR that holds the
/// table.
#[derive(Debug)]
pub struct MsixTable<R: RegisterAccess> {
    bar: R,
    table_offset: u32,
    vectors: u16,
}

impl<R: RegisterAccess> MsixTable<R> {
    /// The table described by `capability` inside the BAR mapped by `bar`.
    pub fn new(bar: R, capability: &MsixCapability) -> Self {
        Self {
            bar,
            table_offset: capability.table_offset,
            vectors: capability.vectors,
        }
    }

    /// Number of entries.
    pub fn vectors(&self) -> u16 {
        self.vectors
    }

    fn entry(&self, vector: u16) -> u32 {
        assert!(
            vector < self.vectors,
            "MSI-X vector {vector} is outside the table of {} entries",
            self.vectors
        );
        self.table_offset + u32::from(vector) * MSIX_ENTRY_SIZE
    }

    /// Programs entry `vector` with message `address`/`data` and unmasks it when `unmask`
    /// (the mask bit is set first, so the device never sees a half-written entry unmasked).
    ///
    /// # Panics
    /// If `vector` is not below [`vectors`](Self::vectors).
    pub fn program(&self, vector: u16, address: u64, data: u32, unmask: bool) {
        let entry = self.entry(vector);
        self.bar
            .write32(entry + MSIX_ENTRY_VECTOR_CONTROL, MSIX_ENTRY_MASKED);
        self.bar.write32(entry + MSIX_ENTRY_ADDR_LO, address as u32);
        self.bar
            .write32(entry + MSIX_ENTRY_ADDR_HI, (address >> 32) as u32);
        self.bar.write32(entry + MSIX_ENTRY_DATA, data);
        if unmask {
            self.bar.write32(entry + MSIX_ENTRY_VECTOR_CONTROL, 0);
        }
    }

    /// Masks or unmasks entry `vector`.
    ///
    /// # Panics
    /// If `vector` is not below [`vectors`](Self::vectors).
    pub fn set_masked(&self, vector: u16, masked: bool) {
        let entry = self.entry(vector);
        let value = if masked { MSIX_ENTRY_MASKED } else { 0 };
        self.bar.write32(entry + MSIX_ENTRY_VECTOR_CONTROL, value);
    }

    /// Reads entry `vector` back: (address, data, masked).
    ///
    /// # Panics
    /// If `vector` is not below [`vectors`](Self::vectors).
    pub fn read(&self, vector: u16) -> (u64, u32, bool) {
        let entry = self.entry(vector);
        let address = u64::from(self.bar.read32(entry + MSIX_ENTRY_ADDR_LO))
            | u64::from(self.bar.read32(entry + MSIX_ENTRY_ADDR_HI)) << 32;
        let data = self.bar.read32(entry + MSIX_ENTRY_DATA);
        let masked = self.bar.read32(entry + MSIX_ENTRY_VECTOR_CONTROL) & MSIX_ENTRY_MASKED != 0;
        (address, data, masked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;

    const AT: PciAddress = PciAddress::new(0, 1, 0);

    /// One function's 256-byte config space; dword accesses.
    struct Space(RefCell<[u8; CONFIG_SPACE_SIZE]>);

    impl Space {
        /// Status with a capability list, capability pointer `first`, and `caps` as
        /// (offset, bytes).
        fn new(first: u8, caps: &[(u8, &[u8])]) -> Self {
            let mut bytes = [0u8; CONFIG_SPACE_SIZE];
            bytes[0x06] = 0x10;
            bytes[0x34] = first;
            for (offset, cap) in caps {
                let at = usize::from(*offset);
                bytes[at..at + cap.len()].copy_from_slice(cap);
            }
            Self(RefCell::new(bytes))
        }
    }

    impl ConfigAccess for Space {
        fn read32(&self, _: PciAddress, offset: u8) -> u32 {
            let at = usize::from(offset & !3);
            u32::from_le_bytes(self.0.borrow()[at..at + 4].try_into().unwrap())
        }
        fn write32(&self, _: PciAddress, offset: u8, value: u32) {
            let at = usize::from(offset & !3);
            let mut bytes = self.0.borrow_mut();
            // Like the device: only control bits 14 and 15 of the MSI-X capability stick.
            if at == usize::from(MSIX_CAP_OFFSET) {
                let control = (value >> 16) as u16 & MSIX_CONTROL_WRITABLE;
                let old = u16::from_le_bytes([bytes[at + 2], bytes[at + 3]]);
                let new = old & !MSIX_CONTROL_WRITABLE | control;
                bytes[at + 2..at + 4].copy_from_slice(&new.to_le_bytes());
            }
        }
    }

    const VENDOR: [u8; 4] = [0x09, 0x60, 0x20, 0x00];
    const MSIX: [u8; 12] = [0x11, 0, 0x0F, 0, 0x01, 0, 0, 0, 0x01, 0x01, 0, 0];

    #[test]
    fn finds_the_jailhouse_layout() {
        let space = Space::new(0x40, &[(0x40, &VENDOR), (0x60, &MSIX)]);
        let cap = MsixCapability::find(&space, AT).unwrap().unwrap();
        assert_eq!(
            cap,
            MsixCapability {
                address: AT,
                offset: 0x60,
                vectors: 16,
                table_bar: 1,
                table_offset: 0,
                pba_bar: 1,
                pba_offset: 0x100,
            }
        );
        assert_eq!(cap.set_control(&space, true, true), 0xC00F);
        assert_eq!(cap.set_control(&space, true, false), 0x800F);
        assert_eq!(cap.control(&space), 0x800F);
    }

    #[test]
    fn no_msix_capability_is_not_an_error() {
        let vendor_last = [0x09, 0x00, 0x20, 0x00];
        let space = Space::new(0x40, &[(0x40, &vendor_last)]);
        assert_eq!(MsixCapability::find(&space, AT), Ok(None));
    }

    #[test]
    fn hostile_capabilities_are_refused() {
        // A BIR above 5.
        let mut bad_bir = MSIX;
        bad_bir[4] = 0x07;
        let space = Space::new(0x40, &[(0x40, &VENDOR), (0x60, &bad_bir)]);
        assert_eq!(
            MsixCapability::find(&space, AT),
            Err(DiscoveryError::BadMsixCapability {
                address: AT,
                offset: 0x60
            })
        );
        // A capability that would run past config space.
        let space = Space::new(0xF8, &[(0xF8, &[0x11, 0, 0, 0])]);
        assert_eq!(
            MsixCapability::find(&space, AT),
            Err(DiscoveryError::BadMsixCapability {
                address: AT,
                offset: 0xF8
            })
        );
        // A loop is caught by the list walk.
        let looping = [0x09, 0x40, 0x20, 0x00];
        let space = Space::new(0x40, &[(0x40, &looping)]);
        assert_eq!(
            MsixCapability::find(&space, AT),
            Err(DiscoveryError::CapabilityLoop { address: AT })
        );
    }

    /// A BAR page in memory, 32-bit accesses.
    struct Page(RefCell<[u32; 1024]>);

    impl RegisterAccess for Page {
        fn read32(&self, offset: u32) -> u32 {
            self.0.borrow()[offset as usize / 4]
        }
        fn write32(&self, offset: u32, value: u32) {
            self.0.borrow_mut()[offset as usize / 4] = value;
        }
    }

    #[test]
    fn table_entries_are_programmed_masked_first() {
        let space = Space::new(0x40, &[(0x40, &VENDOR), (0x60, &MSIX)]);
        let cap = MsixCapability::find(&space, AT).unwrap().unwrap();
        let table = MsixTable::new(Page(RefCell::new([0; 1024])), &cap);
        table.program(2, x86_msi_address(3), 0x41, false);
        assert_eq!(table.read(2), (0xFEE0_3000, 0x41, true), "left masked");
        table.set_masked(2, false);
        assert_eq!(table.read(2), (0xFEE0_3000, 0x41, false));
        assert_eq!(table.vectors(), 16);
    }

    #[test]
    #[should_panic(expected = "outside the table")]
    fn vectors_outside_the_table_panic() {
        let space = Space::new(0x40, &[(0x40, &VENDOR), (0x60, &MSIX)]);
        let cap = MsixCapability::find(&space, AT).unwrap().unwrap();
        MsixTable::new(Page(RefCell::new([0; 1024])), &cap).set_masked(16, true);
    }
}
