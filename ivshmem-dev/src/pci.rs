//! PCI identity, config-space layout and the vendor capability of the ivshmem v2 device, plus
//! discovery over a [`ConfigAccess`].
//!
//! Everything read from config space is treated as untrusted: the capability list is walked
//! with a step limit and pointer checks, so a broken or hostile config space yields a
//! [`DiscoveryError`], never a hang or an out-of-range access.

use core::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::protocol::Protocol;
use crate::regs::REGISTER_PAGE_SIZE;

/// PCI vendor ID of the ivshmem v2 device (Siemens).
pub const VENDOR_ID: u16 = 0x110A;
/// PCI device ID of the ivshmem v2 device.
pub const DEVICE_ID: u16 = 0x4106;
/// Base class code: FFh ("device does not fit any defined class").
pub const CLASS_CODE: u8 = 0xFF;
/// Revision of the emulated device.
pub const REVISION_ID: u8 = 0;
/// Interrupt pin the device reports with INTx (1 = INTA#).
pub const INTX_PIN: u8 = 1;

// Config-space offsets (type 0 header).
/// Offset of the vendor ID (u16).
pub const VENDOR_ID_REG: u8 = 0x00;
/// Offset of the device ID (u16).
pub const DEVICE_ID_REG: u8 = 0x02;
/// Offset of the command register (u16).
pub const COMMAND: u8 = 0x04;
/// Offset of the status register (u16).
pub const STATUS: u8 = 0x06;
/// Offset of the revision ID (u8).
pub const REVISION: u8 = 0x08;
/// Offset of the programming interface byte: the protocol's low byte.
pub const PROG_IF: u8 = 0x09;
/// Offset of the sub-class byte: the protocol's high byte.
pub const SUBCLASS: u8 = 0x0A;
/// Offset of the base class byte.
pub const CLASS: u8 = 0x0B;
/// Offset of the header type byte (bit 7: multi-function device).
pub const HEADER_TYPE: u8 = 0x0E;
/// Offset of BAR0: the register page.
pub const BAR0: u8 = 0x10;
/// Offset of BAR1: the MSI-X table (only with MSI-X).
pub const BAR1: u8 = 0x14;
/// Offset of BAR2: optional 64-bit BAR for the shared memory (low half).
pub const BAR2: u8 = 0x18;
/// Offset of BAR3 (high half of a 64-bit BAR2).
pub const BAR3: u8 = 0x1C;
/// Offset of BAR4.
pub const BAR4: u8 = 0x20;
/// Offset of BAR5.
pub const BAR5: u8 = 0x24;
/// Offset of the subsystem vendor ID (u16), equal to [`VENDOR_ID`].
pub const SUBSYSTEM_VENDOR_ID: u8 = 0x2C;
/// Offset of the subsystem ID (u16), equal to [`DEVICE_ID`].
pub const SUBSYSTEM_ID: u8 = 0x2E;
/// Offset of the capability pointer (u8).
pub const CAP_POINTER: u8 = 0x34;
/// Offset of the interrupt line (u8).
pub const INTERRUPT_LINE: u8 = 0x3C;
/// Offset of the interrupt pin (u8): 1..4 with INTx, 0 with MSI-X. (The Jailhouse
/// specification's table says 3Eh, a typo: PCI and Jailhouse's code use 3Dh.)
pub const INTERRUPT_PIN: u8 = 0x3D;
/// Size of the standard type 0 header; capabilities live above it.
pub const HEADER_SIZE: u8 = 0x40;
/// Size of the (legacy) config space of one function.
pub const CONFIG_SPACE_SIZE: usize = 0x100;

// Command register bits.
/// Command bit 0: I/O space decoding.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command bit 1: memory space decoding (BAR0 visible).
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command bit 2: bus master; gates MSI-X delivery. (The Jailhouse specification's table
/// says bit 3, a typo: PCI and Jailhouse's code use bit 2.)
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command bit 10: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The command bits the device lets a guest write (memory, bus master, INTx disable); all
/// others read 0, so writing FFFFh reads back 0406h.
///
/// `ivshmem-v2.md` lists the I/O bit as writable too, but the device has no I/O BAR, so a
/// writable I/O-space bit would announce decoding that does not exist (PCI: the bit is
/// hardwired to 0 for functions without I/O space). Jailhouse's device keeps it at 0 as well.
pub const COMMAND_WRITABLE: u16 = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;

/// Status bit 4: the device has a capability list.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// BAR bit 0: I/O space BAR.
pub const BAR_IO_SPACE: u32 = 1;
/// BAR bits 1–2: memory BAR type (00 = 32-bit, 10 = 64-bit).
pub const BAR_MEM_TYPE_MASK: u32 = 0b110;
/// BAR bits 4–31: the address of a memory BAR.
pub const BAR_MEM_ADDRESS_MASK: u32 = !0xF;
/// The value BAR0 reads back after all-ones was written: the 4 KiB size mask of a
/// non-prefetchable 32-bit memory BAR.
pub const BAR0_SIZE_MASK: u32 = !(REGISTER_PAGE_SIZE - 1);

// Vendor-specific capability.
/// Capability ID of the vendor-specific capability.
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Capability offset of the capability ID.
pub const CAP_ID: u8 = 0x00;
/// Capability offset of the next pointer.
pub const CAP_NEXT: u8 = 0x01;
/// Capability offset of the length byte.
pub const CAP_LEN: u8 = 0x02;
/// Capability offset of the privileged control byte.
pub const CAP_PRIV_CONTROL: u8 = 0x03;
/// Capability offset of the state table size (u32).
pub const CAP_STATE_TABLE_SIZE: u8 = 0x04;
/// Capability offset of the R/W section size (u64).
pub const CAP_RW_SECTION_SIZE: u8 = 0x08;
/// Capability offset of the output section size (u64).
pub const CAP_OUTPUT_SECTION_SIZE: u8 = 0x10;
/// Capability offset of the shared-memory base address (u64; only when the length is
/// [`CAP_LEN_WITH_BASE`]).
pub const CAP_BASE_ADDR: u8 = 0x18;
/// Capability length without the base-address field.
pub const CAP_LEN_WITHOUT_BASE: u8 = 0x18;
/// Capability length with the base-address field.
pub const CAP_LEN_WITH_BASE: u8 = 0x20;
/// Privileged control bit 0: one-shot interrupt mode (read/write); the other bits are
/// read-only 0.
pub const PRIV_CONTROL_ONESHOT: u8 = 1;

/// The type 0 config header (first 40h bytes), little-endian and unaligned, as a guest sees
/// it. Use it to build or parse a config-space image with zerocopy.
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
pub struct ConfigHeader {
    /// 00h.
    pub vendor_id: U16,
    /// 02h.
    pub device_id: U16,
    /// 04h.
    pub command: U16,
    /// 06h.
    pub status: U16,
    /// 08h.
    pub revision: u8,
    /// 09h: protocol low byte.
    pub prog_if: u8,
    /// 0Ah: protocol high byte.
    pub subclass: u8,
    /// 0Bh.
    pub class: u8,
    /// 0Ch.
    pub cache_line_size: u8,
    /// 0Dh.
    pub latency_timer: u8,
    /// 0Eh.
    pub header_type: u8,
    /// 0Fh.
    pub bist: u8,
    /// 10h–27h.
    pub bars: [U32; 6],
    /// 28h.
    pub cardbus_cis: U32,
    /// 2Ch.
    pub subsystem_vendor_id: U16,
    /// 2Eh.
    pub subsystem_id: U16,
    /// 30h.
    pub expansion_rom: U32,
    /// 34h.
    pub cap_pointer: u8,
    /// 35h–3Bh.
    pub reserved: [u8; 7],
    /// 3Ch.
    pub interrupt_line: u8,
    /// 3Dh.
    pub interrupt_pin: u8,
    /// 3Eh.
    pub min_grant: u8,
    /// 3Fh.
    pub max_latency: u8,
}

/// The vendor-specific capability with the base-address field (20h bytes). Without the field
/// (length 18h) only the first 18h bytes are present.
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
pub struct VendorCapabilityLayout {
    /// 00h: [`CAP_ID_VENDOR`].
    pub id: u8,
    /// 01h: next capability pointer.
    pub next: u8,
    /// 02h: [`CAP_LEN_WITH_BASE`] or [`CAP_LEN_WITHOUT_BASE`].
    pub length: u8,
    /// 03h: privileged control ([`PRIV_CONTROL_ONESHOT`]).
    pub priv_control: u8,
    /// 04h: state table size.
    pub state_table_size: U32,
    /// 08h: R/W section size.
    pub rw_section_size: U64,
    /// 10h: output section size.
    pub output_section_size: U64,
    /// 18h: shared-memory base address.
    pub base_address: U64,
}

const _: () = assert!(core::mem::size_of::<ConfigHeader>() == HEADER_SIZE as usize);
const _: () = assert!(core::mem::size_of::<VendorCapabilityLayout>() == CAP_LEN_WITH_BASE as usize);

/// Bus/device/function of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device number, `0..32`.
    pub device: u8,
    /// Function number, `0..8`.
    pub function: u8,
}

impl PciAddress {
    /// A new address; `device` is masked to 5 bits and `function` to 3 bits.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self {
            bus,
            device: device & 0x1F,
            function: function & 0x7,
        }
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// The value written to port 0xCF8 to select `offset` of `address` (configuration
/// mechanism #1): `1<<31 | bus<<16 | dev<<11 | fn<<8 | offset & 0xFC`.
pub const fn legacy_config_address(address: PciAddress, offset: u8) -> u32 {
    1 << 31
        | (address.bus as u32) << 16
        | ((address.device & 0x1F) as u32) << 11
        | ((address.function & 0x7) as u32) << 8
        | (offset & 0xFC) as u32
}

/// 32-bit access to PCI config space.
///
/// `offset` is a byte offset in the function's 256-byte config space; implementations may
/// assume it is 4-byte aligned (the provided helpers guarantee it). A function that does not
/// exist reads all ones.
pub trait ConfigAccess {
    /// Reads the dword at `offset & !3`.
    fn read32(&self, address: PciAddress, offset: u8) -> u32;
    /// Writes the dword at `offset & !3`.
    fn write32(&self, address: PciAddress, offset: u8, value: u32);

    /// Reads the byte at `offset` (through an aligned dword read).
    fn read8(&self, address: PciAddress, offset: u8) -> u8 {
        (self.read32(address, offset & !3) >> ((offset & 3) * 8)) as u8
    }

    /// Reads the 16-bit value at `offset` (`offset` must be even; through a dword read).
    fn read16(&self, address: PciAddress, offset: u8) -> u16 {
        (self.read32(address, offset & !3) >> ((offset & 2) * 8)) as u16
    }
}

impl<C: ConfigAccess + ?Sized> ConfigAccess for &C {
    fn read32(&self, address: PciAddress, offset: u8) -> u32 {
        (**self).read32(address, offset)
    }
    fn write32(&self, address: PciAddress, offset: u8, value: u32) {
        (**self).write32(address, offset, value)
    }
}

/// What went wrong finding or setting up an ivshmem device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// No function with vendor 110Ah, device 4106h and class FFh (and the wanted protocol).
    #[error("no ivshmem v2 device found")]
    NotFound,
    /// The function is not an ivshmem v2 device.
    #[error("{address}: {vendor:04x}:{device:04x} is not an ivshmem v2 device")]
    NotIvshmem {
        /// The function.
        address: PciAddress,
        /// Its vendor ID.
        vendor: u16,
        /// Its device ID.
        device: u16,
    },
    /// The IDs match but the base class is not FFh.
    #[error("{address}: class {class:#04x}, expected {CLASS_CODE:#04x}")]
    WrongClass {
        /// The function.
        address: PciAddress,
        /// The class found.
        class: u8,
    },
    /// Not a type 0 header.
    #[error("{address}: header type {header_type:#04x} is not a type 0 header")]
    BadHeaderType {
        /// The function.
        address: PciAddress,
        /// The header type byte.
        header_type: u8,
    },
    /// The status register says there is no capability list.
    #[error("{address}: no capability list")]
    NoCapabilityList {
        /// The function.
        address: PciAddress,
    },
    /// The capability list has no vendor-specific capability.
    #[error("{address}: no vendor-specific capability")]
    VendorCapabilityMissing {
        /// The function.
        address: PciAddress,
    },
    /// The capability list does not end (a loop).
    #[error("{address}: the capability list loops")]
    CapabilityLoop {
        /// The function.
        address: PciAddress,
    },
    /// A capability pointer points into the standard header.
    #[error("{address}: capability pointer {pointer:#04x} points into the standard header")]
    BadCapabilityPointer {
        /// The function.
        address: PciAddress,
        /// The pointer found.
        pointer: u8,
    },
    /// The vendor capability has a wrong length or does not fit in config space.
    #[error("{address}: vendor capability at {offset:#04x} has bad length {length:#04x}")]
    BadVendorCapability {
        /// The function.
        address: PciAddress,
        /// Where the capability starts.
        offset: u8,
        /// Its length byte.
        length: u8,
    },
    /// The MSI-X capability does not fit in config space or names a BAR above 5.
    #[error("{address}: MSI-X capability at {offset:#04x} is malformed")]
    BadMsixCapability {
        /// The function.
        address: PciAddress,
        /// Where the capability starts.
        offset: u8,
    },
    /// A BAR the device needs is not a 32-bit memory BAR.
    #[error("{address}: BAR{bar} ({value:#010x}) is not a 32-bit memory BAR")]
    BarNotMemory32 {
        /// The function.
        address: PciAddress,
        /// The BAR index (0 registers, 1 MSI-X).
        bar: u8,
        /// The BAR's value.
        value: u32,
    },
    /// The address the caller gave for a BAR is 0 or not aligned to the BAR's size.
    #[error("{address}: BAR{bar} address {base:#010x} is 0 or not aligned to the BAR's size")]
    BadBarAddress {
        /// The function.
        address: PciAddress,
        /// The BAR index.
        bar: u8,
        /// The address given.
        base: u32,
    },
    /// A BAR is smaller than 4 KiB, absent, or its size mask is malformed.
    #[error("{address}: BAR{bar} size mask {mask:#010x} does not describe at least 4 KiB")]
    BadBarSize {
        /// The function.
        address: PciAddress,
        /// The BAR index.
        bar: u8,
        /// The mask read back after writing all ones.
        mask: u32,
    },
    /// A BAR did not take the address written to it.
    #[error("{address}: BAR{bar} reads {read:#010x} after writing {wrote:#010x}")]
    BarNotProgrammed {
        /// The function.
        address: PciAddress,
        /// The BAR index.
        bar: u8,
        /// The value written.
        wrote: u32,
        /// The value read back.
        read: u32,
    },
    /// The command register did not take the memory / bus-master bits.
    #[error(
        "{address}: command register reads {command:#06x} after enabling memory and bus master"
    )]
    CommandNotSet {
        /// The function.
        address: PciAddress,
        /// The value read back.
        command: u16,
    },
}

/// Most capabilities a 256-byte config space can hold (4-byte aligned, above the header).
const MAX_CAPABILITIES: usize = (CONFIG_SPACE_SIZE - HEADER_SIZE as usize) / 4;

/// The vendor-specific capability as read from config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VendorCapability {
    /// Offset of the capability in config space.
    pub offset: u8,
    /// Its length byte ([`CAP_LEN_WITH_BASE`] or [`CAP_LEN_WITHOUT_BASE`]).
    pub length: u8,
    /// Whether one-shot interrupt mode is on.
    pub one_shot: bool,
    /// State table size in bytes.
    pub state_table_size: u32,
    /// R/W section size in bytes.
    pub rw_section_size: u64,
    /// Output section size in bytes.
    pub output_section_size: u64,
    /// Base address of the shared memory, when the capability has the field.
    pub base_address: Option<u64>,
}

impl VendorCapability {
    /// The layout parameters for these sizes (`max_peers` comes from the `MAX_PEERS`
    /// register). Pass them to [`crate::layout::SharedMemoryLayout::new`] to validate.
    pub const fn layout_params(
        &self,
        max_peers: u16,
        page_size: u64,
    ) -> crate::layout::LayoutParams {
        crate::layout::LayoutParams {
            max_peers,
            state_table_size: self.state_table_size,
            rw_size: self.rw_section_size,
            output_size: self.output_section_size,
            page_size,
        }
    }
}

/// An ivshmem v2 device found in config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IvshmemPci {
    /// Where it is.
    pub address: PciAddress,
    /// The protocol it announces.
    pub protocol: Protocol,
    /// Its interrupt pin (1..4 with INTx, 0 with MSI-X).
    pub interrupt_pin: u8,
    /// Its vendor capability.
    pub capability: VendorCapability,
}

/// Iterator over the functions that carry vendor 110Ah, device 4106h and class FFh; see
/// [`scan`].
#[derive(Debug)]
pub struct Scan<'a, C: ConfigAccess + ?Sized> {
    access: &'a C,
    bus: u16,
    last_bus: u8,
    device: u8,
    function: u8,
    multi_function: bool,
}

impl<C: ConfigAccess + ?Sized> Iterator for Scan<'_, C> {
    type Item = PciAddress;

    fn next(&mut self) -> Option<PciAddress> {
        while self.bus <= u16::from(self.last_bus) {
            let address = PciAddress::new(self.bus as u8, self.device, self.function);
            let ids = self.access.read32(address, VENDOR_ID_REG);
            let vendor = ids as u16;
            let present = vendor != 0xFFFF && vendor != 0;
            if self.function == 0 {
                self.multi_function =
                    present && self.access.read8(address, HEADER_TYPE) & 0x80 != 0;
            }
            if self.function == 7 || !self.multi_function {
                self.function = 0;
                self.device += 1;
                if self.device == 32 {
                    self.device = 0;
                    self.bus += 1;
                }
            } else {
                self.function += 1;
            }
            if present
                && ids == u32::from(DEVICE_ID) << 16 | u32::from(VENDOR_ID)
                && self.access.read8(address, CLASS) == CLASS_CODE
            {
                return Some(address);
            }
        }
        None
    }
}

/// Scans every bus for ivshmem v2 functions (vendor 110Ah, device 4106h, class FFh).
pub fn scan<C: ConfigAccess + ?Sized>(access: &C) -> Scan<'_, C> {
    scan_buses(access, 0, 255)
}

/// Scans buses `first..=last` for ivshmem v2 functions.
pub fn scan_buses<C: ConfigAccess + ?Sized>(access: &C, first: u8, last: u8) -> Scan<'_, C> {
    Scan {
        access,
        bus: u16::from(first),
        last_bus: last,
        device: 0,
        function: 0,
        multi_function: false,
    }
}

/// Finds the first ivshmem v2 device (optionally only one announcing `protocol`) and reads
/// its identity and vendor capability. A matching device whose config space is broken is
/// reported as an error rather than skipped.
pub fn find_ivshmem<C: ConfigAccess + ?Sized>(
    access: &C,
    protocol: Option<Protocol>,
) -> Result<IvshmemPci, DiscoveryError> {
    for address in scan(access) {
        if let Some(wanted) = protocol {
            let found = Protocol::from_config_bytes(
                access.read8(address, PROG_IF),
                access.read8(address, SUBCLASS),
            );
            if found != wanted {
                continue;
            }
        }
        return probe(access, address);
    }
    Err(DiscoveryError::NotFound)
}

/// Reads the identity, protocol, interrupt pin and vendor capability of the function at
/// `address`, checking each.
pub fn probe<C: ConfigAccess + ?Sized>(
    access: &C,
    address: PciAddress,
) -> Result<IvshmemPci, DiscoveryError> {
    let ids = access.read32(address, VENDOR_ID_REG);
    let (vendor, device) = (ids as u16, (ids >> 16) as u16);
    if vendor != VENDOR_ID || device != DEVICE_ID {
        return Err(DiscoveryError::NotIvshmem {
            address,
            vendor,
            device,
        });
    }
    let class = access.read8(address, CLASS);
    if class != CLASS_CODE {
        return Err(DiscoveryError::WrongClass { address, class });
    }
    let header_type = access.read8(address, HEADER_TYPE);
    if header_type & 0x7F != 0 {
        return Err(DiscoveryError::BadHeaderType {
            address,
            header_type,
        });
    }
    let bar0 = access.read32(address, BAR0);
    if bar0 & (BAR_IO_SPACE | BAR_MEM_TYPE_MASK) != 0 {
        return Err(DiscoveryError::BarNotMemory32 {
            address,
            bar: 0,
            value: bar0,
        });
    }
    let protocol = Protocol::from_config_bytes(
        access.read8(address, PROG_IF),
        access.read8(address, SUBCLASS),
    );
    let interrupt_pin = access.read8(address, INTERRUPT_PIN);
    let offset = find_capability(access, address, CAP_ID_VENDOR)?
        .ok_or(DiscoveryError::VendorCapabilityMissing { address })?;
    let capability = read_vendor_capability(access, address, offset)?;
    Ok(IvshmemPci {
        address,
        protocol,
        interrupt_pin,
        capability,
    })
}

/// Walks the capability list of `address` looking for capability `id`; returns its offset,
/// or `None` when the list ends without it. The list is untrusted: pointers into the standard
/// header and lists longer than config space can hold (loops) are errors.
pub fn find_capability<C: ConfigAccess + ?Sized>(
    access: &C,
    address: PciAddress,
    id: u8,
) -> Result<Option<u8>, DiscoveryError> {
    if access.read16(address, STATUS) & STATUS_CAP_LIST == 0 {
        return Err(DiscoveryError::NoCapabilityList { address });
    }
    // The low two bits of every capability pointer are reserved and masked off.
    let mut pointer = access.read8(address, CAP_POINTER) & 0xFC;
    for _ in 0..MAX_CAPABILITIES {
        if pointer == 0 {
            return Ok(None);
        }
        if pointer < HEADER_SIZE {
            return Err(DiscoveryError::BadCapabilityPointer { address, pointer });
        }
        let header = access.read32(address, pointer);
        if header as u8 == id {
            return Ok(Some(pointer));
        }
        pointer = (header >> 8) as u8 & 0xFC;
    }
    Err(DiscoveryError::CapabilityLoop { address })
}

fn read_vendor_capability<C: ConfigAccess + ?Sized>(
    access: &C,
    address: PciAddress,
    offset: u8,
) -> Result<VendorCapability, DiscoveryError> {
    let header = access.read32(address, offset);
    let length = (header >> 16) as u8;
    let priv_control = (header >> 24) as u8;
    let fits = usize::from(offset) + usize::from(length) <= CONFIG_SPACE_SIZE;
    if !(length == CAP_LEN_WITH_BASE || length == CAP_LEN_WITHOUT_BASE) || !fits {
        return Err(DiscoveryError::BadVendorCapability {
            address,
            offset,
            length,
        });
    }
    let read64 = |at: u8| {
        u64::from(access.read32(address, offset + at))
            | u64::from(access.read32(address, offset + at + 4)) << 32
    };
    Ok(VendorCapability {
        offset,
        length,
        one_shot: priv_control & PRIV_CONTROL_ONESHOT != 0,
        state_table_size: access.read32(address, offset + CAP_STATE_TABLE_SIZE),
        rw_section_size: read64(CAP_RW_SECTION_SIZE),
        output_section_size: read64(CAP_OUTPUT_SECTION_SIZE),
        base_address: (length == CAP_LEN_WITH_BASE).then(|| read64(CAP_BASE_ADDR)),
    })
}

impl IvshmemPci {
    /// Sizes BAR0 (the register page) and returns its size in bytes; see
    /// [`bar_size`](Self::bar_size).
    pub fn bar0_size<C: ConfigAccess + ?Sized>(&self, access: &C) -> Result<u32, DiscoveryError> {
        self.bar_size(access, 0)
    }

    /// Sizes 32-bit memory BAR `bar` (0..=5: writes all ones, reads the mask, restores the
    /// old value) and returns its size in bytes. Memory decoding should be off while this
    /// runs. BAR1 holds the MSI-X table and PBA in MSI-X mode; without MSI-X it reads 0 and
    /// this fails with [`DiscoveryError::BadBarSize`].
    ///
    /// # Panics
    /// If `bar` is above 5.
    pub fn bar_size<C: ConfigAccess + ?Sized>(
        &self,
        access: &C,
        bar: u8,
    ) -> Result<u32, DiscoveryError> {
        assert!(bar <= 5, "a type 0 header has BARs 0 to 5, not {bar}");
        let address = self.address;
        let offset = BAR0 + 4 * bar;
        let old = access.read32(address, offset);
        access.write32(address, offset, u32::MAX);
        let mask = access.read32(address, offset);
        access.write32(address, offset, old);
        if mask & (BAR_IO_SPACE | BAR_MEM_TYPE_MASK) != 0 {
            return Err(DiscoveryError::BarNotMemory32 {
                address,
                bar,
                value: mask,
            });
        }
        let address_bits = mask & BAR_MEM_ADDRESS_MASK;
        let size = (!address_bits).wrapping_add(1);
        // A valid mask is a run of ones from bit 31 down (size a power of two).
        if address_bits == 0 || !size.is_power_of_two() || size < REGISTER_PAGE_SIZE {
            return Err(DiscoveryError::BadBarSize { address, bar, mask });
        }
        Ok(size)
    }

    /// Programs BAR0 to `base`; see [`program_bar`](Self::program_bar).
    pub fn program_bar0<C: ConfigAccess + ?Sized>(
        &self,
        access: &C,
        base: u32,
    ) -> Result<(), DiscoveryError> {
        self.program_bar(access, 0, base)
    }

    /// Programs 32-bit memory BAR `bar` to `base` (non-zero, aligned to the BAR's size): turns
    /// memory decoding off, sizes the BAR, writes the address and reads it back. Jailhouse's
    /// x86 demo puts BAR0 at 0xFF000000 and BAR1 (MSI-X) at 0xFF001000.
    ///
    /// # Panics
    /// If `bar` is above 5.
    pub fn program_bar<C: ConfigAccess + ?Sized>(
        &self,
        access: &C,
        bar: u8,
        base: u32,
    ) -> Result<(), DiscoveryError> {
        let address = self.address;
        if base == 0 || base % REGISTER_PAGE_SIZE != 0 {
            return Err(DiscoveryError::BadBarAddress { address, bar, base });
        }
        let command = access.read16(address, COMMAND);
        // The upper half (status) is written as 0: its bits are read-only or write-1-to-clear.
        access.write32(address, COMMAND, u32::from(command & !COMMAND_MEMORY));
        let size = self.bar_size(access, bar)?;
        if base % size != 0 {
            return Err(DiscoveryError::BadBarAddress { address, bar, base });
        }
        let offset = BAR0 + 4 * bar;
        access.write32(address, offset, base);
        let read = access.read32(address, offset) & BAR_MEM_ADDRESS_MASK;
        if read != base {
            return Err(DiscoveryError::BarNotProgrammed {
                address,
                bar,
                wrote: base,
                read,
            });
        }
        Ok(())
    }

    /// The device's MSI-X capability, or `None` in INTx mode; see
    /// [`crate::msix::MsixCapability::find`].
    pub fn msix<C: ConfigAccess + ?Sized>(
        &self,
        access: &C,
    ) -> Result<Option<crate::msix::MsixCapability>, DiscoveryError> {
        crate::msix::MsixCapability::find(access, self.address)
    }

    /// Sets the command register's memory and bus-master bits (keeping the others) and
    /// checks they stuck. Returns the new command value.
    pub fn enable<C: ConfigAccess + ?Sized>(&self, access: &C) -> Result<u16, DiscoveryError> {
        let address = self.address;
        let command = access.read16(address, COMMAND) | COMMAND_MEMORY | COMMAND_BUS_MASTER;
        access.write32(address, COMMAND, u32::from(command));
        let command = access.read16(address, COMMAND);
        if command & (COMMAND_MEMORY | COMMAND_BUS_MASTER) != COMMAND_MEMORY | COMMAND_BUS_MASTER {
            return Err(DiscoveryError::CommandNotSet { address, command });
        }
        Ok(command)
    }

    /// Programs BAR0 to `base` and enables memory decoding and bus mastering.
    pub fn setup<C: ConfigAccess + ?Sized>(
        &self,
        access: &C,
        base: u32,
    ) -> Result<(), DiscoveryError> {
        self.program_bar0(access, base)?;
        self.enable(access)?;
        Ok(())
    }

    /// Turns one-shot interrupt mode on or off (privileged control bit 0) and returns whether
    /// the device reports it on afterwards.
    pub fn set_one_shot<C: ConfigAccess + ?Sized>(&self, access: &C, on: bool) -> bool {
        let offset = self.capability.offset;
        let header = access.read32(self.address, offset);
        let mut priv_control = (header >> 24) as u8 & !PRIV_CONTROL_ONESHOT;
        if on {
            priv_control |= PRIV_CONTROL_ONESHOT;
        }
        let value = header & 0x00FF_FFFF | u32::from(priv_control) << 24;
        access.write32(self.address, offset, value);
        access.read8(self.address, offset + CAP_PRIV_CONTROL) & PRIV_CONTROL_ONESHOT != 0
    }
}
