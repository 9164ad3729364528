//! PCI discovery against an in-memory fake config space.

use std::cell::RefCell;
use std::collections::BTreeMap;

use ivshmem_dev::pci::{self, *};
use ivshmem_dev::zerocopy::IntoBytes;
use ivshmem_dev::{ConfigAccess, DiscoveryError, PciAddress, Protocol};

/// One fake function: a 256-byte config space, BAR0's size mask and a write log.
#[derive(Clone)]
struct Function {
    space: [u8; 256],
    bar0_mask: u32,
}

impl Function {
    fn dword(&self, offset: u8) -> u32 {
        let at = usize::from(offset & !3);
        u32::from_le_bytes(self.space[at..at + 4].try_into().unwrap())
    }

    fn set_dword(&mut self, offset: u8, value: u32) {
        let at = usize::from(offset & !3);
        self.space[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn set_byte(&mut self, offset: u8, value: u8) {
        self.space[usize::from(offset)] = value;
    }
}

/// A fake PCI hierarchy. Absent functions read all ones.
#[derive(Default)]
struct FakePci {
    functions: RefCell<BTreeMap<PciAddress, Function>>,
    writes: RefCell<Vec<(PciAddress, u8, u32)>>,
    reads: RefCell<usize>,
}

impl FakePci {
    fn with(mut self, address: PciAddress, function: Function) -> Self {
        self.functions.get_mut().insert(address, function);
        self
    }

    fn function(&self, address: PciAddress) -> Function {
        self.functions.borrow()[&address].clone()
    }
}

impl ConfigAccess for FakePci {
    fn read32(&self, address: PciAddress, offset: u8) -> u32 {
        assert_eq!(offset % 4, 0, "config reads must be dword aligned");
        *self.reads.borrow_mut() += 1;
        self.functions
            .borrow()
            .get(&address)
            .map_or(u32::MAX, |f| f.dword(offset))
    }

    fn write32(&self, address: PciAddress, offset: u8, value: u32) {
        assert_eq!(offset % 4, 0, "config writes must be dword aligned");
        self.writes.borrow_mut().push((address, offset, value));
        let mut functions = self.functions.borrow_mut();
        let Some(f) = functions.get_mut(&address) else {
            return;
        };
        match offset {
            // Command writable bits only; status is read-only here.
            COMMAND => {
                let status = f.dword(COMMAND) & 0xFFFF_0000;
                f.set_dword(COMMAND, status | (value & u32::from(COMMAND_WRITABLE)));
            }
            BAR0 => {
                let mask = f.bar0_mask;
                f.set_dword(BAR0, value & mask | f.dword(BAR0) & !mask);
            }
            _ => f.set_dword(offset, value),
        }
    }
}

const TELEMETRY_STATE: u32 = 0x1000;
const RW: u64 = 0x2000;
const OUTPUT: u64 = 0x10000;
const BASE: u64 = 0x1_2340_0000;

/// A healthy ivshmem function announcing `protocol`, vendor capability at 0x40 (with base).
fn ivshmem(protocol: Protocol) -> Function {
    let (prog_if, subclass) = protocol.to_config_bytes();
    let header = ConfigHeader {
        vendor_id: VENDOR_ID.into(),
        device_id: DEVICE_ID.into(),
        status: STATUS_CAP_LIST.into(),
        prog_if,
        subclass,
        class: CLASS_CODE,
        subsystem_vendor_id: VENDOR_ID.into(),
        subsystem_id: DEVICE_ID.into(),
        cap_pointer: 0x40,
        interrupt_pin: 1,
        ..Default::default()
    };
    let cap = VendorCapabilityLayout {
        id: CAP_ID_VENDOR,
        next: 0,
        length: CAP_LEN_WITH_BASE,
        priv_control: 0,
        state_table_size: TELEMETRY_STATE.into(),
        rw_section_size: RW.into(),
        output_section_size: OUTPUT.into(),
        base_address: BASE.into(),
    };
    let mut space = [0u8; 256];
    space[..0x40].copy_from_slice(header.as_bytes());
    space[0x40..0x60].copy_from_slice(cap.as_bytes());
    Function {
        space,
        bar0_mask: BAR0_SIZE_MASK,
    }
}

/// Some other device (a host bridge).
fn other_device(multi_function: bool) -> Function {
    let mut space = [0u8; 256];
    space[0..4].copy_from_slice(&0x1237_8086u32.to_le_bytes());
    space[usize::from(CLASS)] = 0x06;
    space[usize::from(HEADER_TYPE)] = if multi_function { 0x80 } else { 0 };
    Function {
        space,
        bar0_mask: 0,
    }
}

fn at(bus: u8, device: u8, function: u8) -> PciAddress {
    PciAddress::new(bus, device, function)
}

#[test]
fn legacy_config_address_matches_mechanism_one() {
    assert_eq!(legacy_config_address(at(0, 0, 0), 0), 0x8000_0000);
    assert_eq!(legacy_config_address(at(1, 2, 3), 0x3D), 0x8001_133C);
    assert_eq!(legacy_config_address(at(0xFF, 31, 7), 0xFF), 0x80FF_FFFC);
}

#[test]
fn finds_the_device_and_reads_its_capability() {
    let pci = FakePci::default()
        .with(at(0, 0, 0), other_device(false))
        .with(at(0, 5, 0), ivshmem(Protocol::TELEMETRY));
    let found = find_ivshmem(&pci, None).unwrap();
    assert_eq!(found.address, at(0, 5, 0));
    assert_eq!(found.protocol, Protocol::TELEMETRY);
    assert_eq!(found.interrupt_pin, 1);
    assert_eq!(
        found.capability,
        VendorCapability {
            offset: 0x40,
            length: CAP_LEN_WITH_BASE,
            one_shot: false,
            state_table_size: TELEMETRY_STATE,
            rw_section_size: RW,
            output_section_size: OUTPUT,
            base_address: Some(BASE),
        }
    );
    let params = found.capability.layout_params(2, 4096);
    let layout = ivshmem_dev::SharedMemoryLayout::new(params).unwrap();
    assert_eq!(layout.total_size(), 0x1000 + RW + 2 * OUTPUT);
}

#[test]
fn absent_device_is_not_found() {
    let pci = FakePci::default().with(at(0, 0, 0), other_device(false));
    assert_eq!(find_ivshmem(&pci, None), Err(DiscoveryError::NotFound));
    assert_eq!(scan(&pci).count(), 0);
    let empty = FakePci::default();
    assert_eq!(find_ivshmem(&empty, None), Err(DiscoveryError::NotFound));
    // 256 buses x 32 devices, one read each: absent devices are skipped after function 0.
    assert_eq!(*empty.reads.borrow(), 256 * 32);
}

#[test]
fn multi_function_devices_are_searched_and_single_function_ones_are_not() {
    let pci = FakePci::default()
        .with(at(0, 2, 0), other_device(true))
        .with(at(0, 2, 3), ivshmem(Protocol::ETHERNET))
        .with(at(0, 4, 0), other_device(false))
        .with(at(0, 4, 1), ivshmem(Protocol::ETHERNET))
        .with(at(3, 31, 0), ivshmem(Protocol::TELEMETRY));
    let found: Vec<_> = scan(&pci).collect();
    assert_eq!(found, vec![at(0, 2, 3), at(3, 31, 0)]);
    assert_eq!(
        scan_buses(&pci, 1, 3).collect::<Vec<_>>(),
        vec![at(3, 31, 0)]
    );
}

#[test]
fn protocol_filter_picks_the_matching_device() {
    let pci = FakePci::default()
        .with(at(0, 1, 0), ivshmem(Protocol::ETHERNET))
        .with(at(0, 2, 0), ivshmem(Protocol::TELEMETRY));
    assert_eq!(find_ivshmem(&pci, None).unwrap().address, at(0, 1, 0));
    let telemetry = find_ivshmem(&pci, Some(Protocol::TELEMETRY)).unwrap();
    assert_eq!(
        (telemetry.address, telemetry.protocol),
        (at(0, 2, 0), Protocol::TELEMETRY)
    );
    assert_eq!(
        find_ivshmem(&pci, Some(Protocol(0x4002))),
        Err(DiscoveryError::NotFound)
    );
}

#[test]
fn wrong_class_is_skipped_by_the_scan_and_refused_by_probe() {
    let mut f = ivshmem(Protocol::ETHERNET);
    f.set_byte(CLASS, 0x05);
    let pci = FakePci::default().with(at(0, 1, 0), f);
    assert_eq!(find_ivshmem(&pci, None), Err(DiscoveryError::NotFound));
    assert_eq!(
        probe(&pci, at(0, 1, 0)),
        Err(DiscoveryError::WrongClass {
            address: at(0, 1, 0),
            class: 0x05
        })
    );
    assert!(matches!(
        probe(&pci, at(0, 9, 0)),
        Err(DiscoveryError::NotIvshmem {
            vendor: 0xFFFF,
            device: 0xFFFF,
            ..
        })
    ));
}

#[test]
fn capability_loops_are_detected() {
    let address = at(0, 1, 0);
    // 0x40 -> 0x50 -> 0x40 ..., neither vendor-specific.
    let mut f = ivshmem(Protocol::ETHERNET);
    f.set_dword(0x40, 0x0000_5001);
    f.set_dword(0x50, 0x0000_4005);
    let pci = FakePci::default().with(address, f);
    assert_eq!(
        find_ivshmem(&pci, None),
        Err(DiscoveryError::CapabilityLoop { address })
    );
    // A capability pointing at itself.
    let mut f = ivshmem(Protocol::ETHERNET);
    f.set_dword(0x40, 0x0000_4001);
    let pci = FakePci::default().with(address, f);
    assert_eq!(
        probe(&pci, address),
        Err(DiscoveryError::CapabilityLoop { address })
    );
}

#[test]
fn bad_capability_pointers_are_refused() {
    let address = at(0, 1, 0);
    let mut f = ivshmem(Protocol::ETHERNET);
    f.set_byte(CAP_POINTER, 0x20);
    let pci = FakePci::default().with(address, f);
    assert_eq!(
        probe(&pci, address),
        Err(DiscoveryError::BadCapabilityPointer {
            address,
            pointer: 0x20
        })
    );
    // A next pointer into the header.
    let mut f = ivshmem(Protocol::ETHERNET);
    f.set_dword(0x40, 0x0000_3C01);
    let pci = FakePci::default().with(address, f);
    assert_eq!(
        probe(&pci, address),
        Err(DiscoveryError::BadCapabilityPointer {
            address,
            pointer: 0x3C
        })
    );
    // The reserved low bits of a pointer are masked: 0x43 means 0x40.
    let mut f = ivshmem(Protocol::ETHERNET);
    f.set_byte(CAP_POINTER, 0x43);
    let pci = FakePci::default().with(address, f);
    assert_eq!(probe(&pci, address).unwrap().capability.offset, 0x40);
}

#[test]
fn vendor_capability_found_after_other_capabilities() {
    let address = at(0, 1, 0);
    let mut f = ivshmem(Protocol::ETHERNET);
    let vendor: [u8; 0x20] = f.space[0x40..0x60].try_into().unwrap();
    f.space[0x80..0xA0].copy_from_slice(&vendor);
    f.set_dword(0x40, 0x0000_6001); // PM capability -> 0x60
    f.set_dword(0x44, 0);
    f.set_dword(0x60, 0x0000_8005); // MSI capability -> 0x80
    let pci = FakePci::default().with(address, f);
    let found = probe(&pci, address).unwrap();
    assert_eq!(found.capability.offset, 0x80);
    assert_eq!(found.capability.rw_section_size, RW);
}

#[test]
fn missing_capability_list_or_vendor_capability_is_refused() {
    let address = at(0, 1, 0);
    let mut f = ivshmem(Protocol::ETHERNET);
    f.set_dword(COMMAND, 0); // status without the capability-list bit
    let pci = FakePci::default().with(address, f);
    assert_eq!(
        probe(&pci, address),
        Err(DiscoveryError::NoCapabilityList { address })
    );
    let mut f = ivshmem(Protocol::ETHERNET);
    f.set_dword(0x40, 0x0000_0001); // only a PM capability
    let pci = FakePci::default().with(address, f);
    assert_eq!(
        probe(&pci, address),
        Err(DiscoveryError::VendorCapabilityMissing { address })
    );
}

#[test]
fn vendor_capability_length_is_checked() {
    let address = at(0, 1, 0);
    let mut f = ivshmem(Protocol::ETHERNET);
    f.set_byte(0x42, 0x10);
    let pci = FakePci::default().with(address, f);
    assert_eq!(
        probe(&pci, address),
        Err(DiscoveryError::BadVendorCapability {
            address,
            offset: 0x40,
            length: 0x10
        })
    );
    // A full-length capability that would run past the end of config space.
    let mut f = ivshmem(Protocol::ETHERNET);
    let vendor: [u8; 0x10] = f.space[0x40..0x50].try_into().unwrap();
    f.space[0xF0..].copy_from_slice(&vendor);
    f.set_byte(CAP_POINTER, 0xF0);
    let pci = FakePci::default().with(address, f);
    assert_eq!(
        probe(&pci, address),
        Err(DiscoveryError::BadVendorCapability {
            address,
            offset: 0xF0,
            length: 0x20
        })
    );
    // Without the base-address field.
    let mut f = ivshmem(Protocol::ETHERNET);
    f.set_byte(0x42, CAP_LEN_WITHOUT_BASE);
    let pci = FakePci::default().with(address, f);
    assert_eq!(probe(&pci, address).unwrap().capability.base_address, None);
}

#[test]
fn bar0_must_be_a_32_bit_memory_bar() {
    let address = at(0, 1, 0);
    for value in [0x0000_C001u32, 0xFE00_0004] {
        let mut f = ivshmem(Protocol::ETHERNET);
        f.set_dword(BAR0, value);
        let pci = FakePci::default().with(address, f);
        assert_eq!(
            probe(&pci, address),
            Err(DiscoveryError::BarNotMemory32 {
                address,
                bar: 0,
                value
            })
        );
    }
}

#[test]
fn setup_programs_bar0_and_sets_memory_and_bus_master() {
    let address = at(0, 3, 0);
    let pci = FakePci::default().with(address, ivshmem(Protocol::ETHERNET));
    let device = find_ivshmem(&pci, None).unwrap();
    assert_eq!(device.bar0_size(&pci), Ok(0x1000));
    device.setup(&pci, 0xFEBF_0000).unwrap();
    let f = pci.function(address);
    assert_eq!(f.dword(BAR0), 0xFEBF_0000);
    let command = f.dword(COMMAND) as u16;
    assert_eq!(
        command & (pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER),
        0x6
    );
    assert_eq!(
        f.dword(COMMAND) >> 16,
        u32::from(STATUS_CAP_LIST),
        "status untouched"
    );
    let writes = pci.writes.borrow();
    // Sizing wrote all ones, then BAR0 got its address; no write set status bits.
    assert!(writes.contains(&(address, BAR0, u32::MAX)));
    assert_eq!(
        writes.iter().rev().find(|w| w.1 == BAR0),
        Some(&(address, BAR0, 0xFEBF_0000))
    );
    assert!(writes
        .iter()
        .filter(|w| w.1 == COMMAND)
        .all(|w| w.2 >> 16 == 0));
}

#[test]
fn bar0_address_is_checked() {
    let address = at(0, 3, 0);
    let pci = FakePci::default().with(address, ivshmem(Protocol::ETHERNET));
    let device = find_ivshmem(&pci, None).unwrap();
    for base in [0, 0xFEBF_0800] {
        assert_eq!(
            device.program_bar0(&pci, base),
            Err(DiscoveryError::BadBarAddress {
                address,
                bar: 0,
                base
            })
        );
    }
    // A BAR that ignores writes.
    let mut f = ivshmem(Protocol::ETHERNET);
    f.bar0_mask = 0;
    let pci = FakePci::default().with(address, f);
    assert_eq!(
        device.program_bar0(&pci, 0xFEBF_0000),
        Err(DiscoveryError::BadBarSize {
            address,
            bar: 0,
            mask: 0
        })
    );
    // A BAR of 64 KiB needs 64 KiB alignment.
    let mut f = ivshmem(Protocol::ETHERNET);
    f.bar0_mask = !0xFFFF;
    let pci = FakePci::default().with(address, f);
    assert_eq!(
        device.program_bar0(&pci, 0xFEBF_1000),
        Err(DiscoveryError::BadBarAddress {
            bar: 0,
            address,
            base: 0xFEBF_1000
        })
    );
    assert_eq!(device.program_bar0(&pci, 0xFEBE_0000), Ok(()));
}

#[test]
fn command_bits_that_do_not_stick_are_reported() {
    let address = at(0, 3, 0);
    let pci = FakePci::default().with(address, ivshmem(Protocol::ETHERNET));
    let device = find_ivshmem(&pci, None).unwrap();
    // Make the command register read-only 0.
    struct ReadOnlyCommand<'a>(&'a FakePci);
    impl ConfigAccess for ReadOnlyCommand<'_> {
        fn read32(&self, address: PciAddress, offset: u8) -> u32 {
            self.0.read32(address, offset)
        }
        fn write32(&self, address: PciAddress, offset: u8, value: u32) {
            if offset != COMMAND {
                self.0.write32(address, offset, value);
            }
        }
    }
    assert_eq!(
        device.enable(&ReadOnlyCommand(&pci)),
        Err(DiscoveryError::CommandNotSet {
            address,
            command: 0
        })
    );
}

#[test]
fn one_shot_bit_is_written_through_the_capability() {
    let address = at(0, 3, 0);
    let pci = FakePci::default().with(address, ivshmem(Protocol::ETHERNET));
    let device = find_ivshmem(&pci, None).unwrap();
    assert!(device.set_one_shot(&pci, true));
    let header = pci.function(address).dword(0x40);
    assert_eq!(
        header, 0x0120_0009,
        "ID, next and length kept, one-shot set"
    );
    assert!(probe(&pci, address).unwrap().capability.one_shot);
    assert!(!device.set_one_shot(&pci, false));
}

#[test]
fn discovery_errors_name_the_function() {
    let err = DiscoveryError::BadCapabilityPointer {
        address: at(0, 3, 0),
        pointer: 0x20,
    };
    assert_eq!(
        err.to_string(),
        "00:03.0: capability pointer 0x20 points into the standard header"
    );
}
