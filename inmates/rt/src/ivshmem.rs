//! Bringing up an ivshmem v2 device the way Jailhouse's x86 demo does: find it by scanning
//! config space (mechanism #1), put BAR0 at 0xFF000000 and BAR1 (MSI-X table) at 0xFF001000,
//! enable memory decoding and bus mastering, and take the shared memory from the vendor
//! capability's base address (there is no BAR2 on KVM cells or Jailhouse x86).
//!
//! The low 4 GiB are identity-mapped by the boot stub, so the BARs and a link below 4 GiB
//! need no further mapping; a link above 4 GiB is refused ([`BringUpError::AboveIdentityMap`]).

use core::fmt;
use core::ptr::NonNull;

use ivshmem_dev::msix::{x86_msi_address, MsixCapability, MsixTable};
use ivshmem_dev::pci::{self, ConfigAccess, DiscoveryError, IvshmemPci, BAR1};
use ivshmem_dev::{DriverError, Ivshmem, LayoutError, Mmio, PortIo, Sections, SharedMemoryLayout};

/// Where BAR0 (registers) goes.
pub const BAR0_BASE: u32 = 0xFF00_0000;
/// Where BAR1 (MSI-X table and PBA) goes.
pub const BAR1_BASE: u32 = 0xFF00_1000;
/// The end of the boot stub's identity map.
pub const IDENTITY_MAP_END: u64 = 4 << 30;
/// Page size of the shared-memory layout.
pub const PAGE_SIZE: u64 = 0x1000;

/// Why bring-up failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BringUpError {
    /// Scanning or probing config space failed.
    Discovery(DiscoveryError),
    /// The vendor capability has no base-address field.
    NoBaseAddress,
    /// The shared memory lies (partly) above the identity map.
    AboveIdentityMap {
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// The sizes in the capability do not form a valid layout.
    Layout(LayoutError),
    /// The driver refused the registers or sections.
    Driver(DriverError),
}

impl fmt::Display for BringUpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Discovery(e) => write!(f, "PCI discovery: {e}"),
            Self::NoBaseAddress => f.write_str("the vendor capability has no base address"),
            Self::AboveIdentityMap { base, size } => write!(
                f,
                "shared memory {base:#x}+{size:#x} lies above the 4 GiB identity map"
            ),
            Self::Layout(e) => write!(f, "shared-memory layout: {e}"),
            Self::Driver(e) => write!(f, "driver: {e}"),
        }
    }
}

impl From<DiscoveryError> for BringUpError {
    fn from(e: DiscoveryError) -> Self {
        Self::Discovery(e)
    }
}

/// An ivshmem device ready to use.
#[derive(Debug)]
pub struct Device {
    /// What config space said.
    pub pci: IvshmemPci,
    /// The MSI-X capability, if the device has one.
    pub msix: Option<MsixCapability>,
    /// The MSI-X table behind BAR1 (only with MSI-X).
    pub msix_table: Option<MsixTable<Mmio>>,
    /// The shared-memory layout.
    pub layout: SharedMemoryLayout,
    /// The shared memory's guest-physical (= virtual) base.
    pub base: u64,
    /// The driver on BAR0 and the sections.
    pub driver: Ivshmem<Mmio>,
}

/// Finds the first ivshmem v2 device and brings it up (see the module docs).
pub fn bring_up(access: &PortIo) -> Result<Device, BringUpError> {
    let address = pci::scan(access).next().ok_or(DiscoveryError::NotFound)?;
    let found = pci::probe(access, address)?;
    bring_up_at(access, found)
}

/// Brings up the device `found` (from [`pci::probe`]).
pub fn bring_up_at(access: &PortIo, found: IvshmemPci) -> Result<Device, BringUpError> {
    let address = found.address;
    let base = found
        .capability
        .base_address
        .ok_or(BringUpError::NoBaseAddress)?;
    let msix = MsixCapability::find(access, address)?;
    // program_bar0 turns memory decoding off, sizes BAR0 and programs it.
    found.program_bar0(access, BAR0_BASE)?;
    if msix.is_some() {
        access.write32(address, BAR1, BAR1_BASE);
    }
    found.enable(access)?;
    // SAFETY: BAR0 was just programmed to BAR0_BASE with memory decoding on; that page is
    // identity-mapped by the boot stub and stays so for the cell's life.
    let regs = unsafe { Mmio::new(NonNull::new_unchecked(BAR0_BASE as usize as *mut u8)) };
    let max_peers = ivshmem_dev::RegisterAccess::read32(&regs, ivshmem_dev::regs::MAX_PEERS);
    let params = found.capability.layout_params(max_peers as u16, PAGE_SIZE);
    let layout = SharedMemoryLayout::new(params).map_err(BringUpError::Layout)?;
    let size = layout.total_size();
    if base % PAGE_SIZE != 0
        || base
            .checked_add(size)
            .is_none_or(|end| end > IDENTITY_MAP_END)
    {
        return Err(BringUpError::AboveIdentityMap { base, size });
    }
    let id = ivshmem_dev::RegisterAccess::read32(&regs, ivshmem_dev::regs::ID) as u16;
    // SAFETY: the capability names `base..base+size` as this link's memory, mapped into the
    // cell by the hypervisor (own output and R/W writable, the rest readable), identity-mapped
    // by the boot stub (checked above) and page-aligned (checked above).
    let sections = unsafe {
        Sections::from_contiguous(
            NonNull::new_unchecked(base as usize as *mut u8),
            &layout,
            id,
        )
    };
    let driver = Ivshmem::new(regs, sections).map_err(BringUpError::Driver)?;
    let msix_table = msix.map(|cap| {
        // SAFETY: BAR1 was programmed to BAR1_BASE with memory decoding on and its page is
        // identity-mapped; the table lies at `table_offset` inside it (kvm-cells.md: BIR 1,
        // offset 0).
        let bar1 = unsafe { Mmio::new(NonNull::new_unchecked(BAR1_BASE as usize as *mut u8)) };
        MsixTable::new(bar1, &cap)
    });
    Ok(Device {
        pci: found,
        msix,
        msix_table,
        layout,
        base,
        driver,
    })
}

impl Device {
    /// Points MSI-X entries `0..vectors` at IDT vectors `first_vector..` on this CPU and
    /// enables MSI-X. Returns how many entries were programmed (0 without MSI-X).
    pub fn setup_msix(&self, access: &PortIo, first_vector: u8, vectors: u16) -> u16 {
        let (Some(cap), Some(table)) = (self.msix, self.msix_table.as_ref()) else {
            return 0;
        };
        let count = vectors.min(table.vectors());
        let address = x86_msi_address(crate::x2apic::id() as u8);
        for entry in 0..count {
            table.program(
                entry,
                address,
                u32::from(first_vector) + u32::from(entry),
                true,
            );
        }
        cap.set_control(access, true, false);
        count
    }
}
