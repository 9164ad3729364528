//! The emulated device in MSI-X mode, against `kvm-cells.md` ("ivshmem v2 config space in a
//! KVM cell" and "Interrupts"): the capability chain, BAR1 with table and PBA, every gate on
//! delivery (INT_CONTROL, MSI-X enable, function mask, entry mask, bus master), one-shot, and
//! the route set a KVM backend wires into irqfds.

use std::cell::RefCell;

use hypervisor::device::{
    AccessKind, AccessReason, AccessSpace, Interrupt, InterruptGate, InterruptMode, Link,
    LinkError, LinkParams, MsiMessage, MsixEntry, Route, VecStateTable, INTERRUPT_PIN,
    MAX_MSIX_VECTORS, VENDOR_CAP_OFFSET,
};
use ivshmem_dev::layout::{LayoutParams, SharedMemoryLayout};
use ivshmem_dev::msix::{
    x86_msi_address, MsixCapability, MsixTable, BAR1_SIZE_MASK, CAP_ID_MSIX, MSIX_CAP_OFFSET,
    MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK, MSIX_ENTRY_MASKED, MSIX_ENTRY_SIZE,
    MSIX_PBA_OFFSET_IN_BAR,
};
use ivshmem_dev::pci::{
    self, find_capability, find_ivshmem, BAR0_SIZE_MASK, CAP_ID_VENDOR, COMMAND_BUS_MASTER,
    COMMAND_INTX_DISABLE, COMMAND_MEMORY,
};
use ivshmem_dev::regs::{DOORBELL, INT_CONTROL, STATE};
use ivshmem_dev::{ConfigAccess, Doorbell, PciAddress, Protocol, RegisterAccess};

const SLOT: PciAddress = PciAddress::new(1, 0x0E, 0);
/// The message control offset inside the MSI-X capability.
const CONTROL: u16 = MSIX_CAP_OFFSET as u16 + 2;

fn link_with(max_peers: u16, interrupts: InterruptMode) -> Link {
    let layout = SharedMemoryLayout::new(LayoutParams {
        max_peers,
        state_table_size: 0x1000,
        rw_size: 0x1000,
        output_size: 0x2000,
        page_size: 4096,
    })
    .unwrap();
    let params = LinkParams {
        name: "demo".into(),
        max_peers,
        protocol: Protocol::from_config_bytes(0, 0x40),
        layout,
        interrupts,
    };
    Link::new(params, Box::new(VecStateTable::new(max_peers))).unwrap()
}

fn msix(vectors: u16) -> Link {
    link_with(3, InterruptMode::Msix { vectors })
}

fn cfg(link: &Link, peer: u16, offset: u16, size: u8) -> u32 {
    link.config_read(peer, offset, size).unwrap()
}

fn cfg_write(link: &mut Link, peer: u16, offset: u16, size: u8, value: u32) {
    link.config_write(peer, offset, size, value).unwrap()
}

fn table_write(link: &mut Link, peer: u16, offset: u32, value: u32) {
    link.msix_write(peer, offset.into(), 4, value.into())
        .unwrap()
}

fn message(peer: u16, vector: u16) -> MsiMessage {
    MsiMessage {
        address: x86_msi_address(peer as u8),
        data: 0x20 + u32::from(vector),
    }
}

/// Programs entry `vector` of `peer` with [`message`] and unmasks it.
fn program(link: &mut Link, peer: u16, vector: u16) {
    let entry = u32::from(vector) * MSIX_ENTRY_SIZE;
    let msg = message(peer, vector);
    table_write(link, peer, entry, msg.address as u32);
    table_write(link, peer, entry + 4, (msg.address >> 32) as u32);
    table_write(link, peer, entry + 8, msg.data);
    table_write(link, peer, entry + 12, 0);
}

/// Every peer attached; each fully armed the way Jailhouse's demo does it: memory and bus
/// master on, MSI-X enabled, every vector programmed and unmasked, INT_CONTROL = 1.
fn armed(vectors: u16) -> Link {
    let mut link = msix(vectors);
    for peer in 0..link.max_peers() {
        link.peer_attached(peer);
        cfg_write(
            &mut link,
            peer,
            pci::COMMAND.into(),
            2,
            u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER),
        );
        cfg_write(&mut link, peer, CONTROL, 2, u32::from(MSIX_CONTROL_ENABLE));
        for vector in 0..vectors {
            program(&mut link, peer, vector);
        }
        link.mmio_write(peer, INT_CONTROL.into(), 4, 1).unwrap();
    }
    link
}

fn ring(link: &mut Link, from: u16, target: u16, vector: u16) -> Vec<Interrupt> {
    link.mmio_write(
        from,
        DOORBELL.into(),
        4,
        Doorbell::new(target, vector).encode().into(),
    )
    .unwrap()
    .interrupts
}

fn irq(target: u16, vector: u16) -> Vec<Interrupt> {
    vec![Interrupt { target, vector }]
}

// ---------------------------------------------------------------- config space

#[test]
fn config_space_has_exactly_the_jailhouse_x86_layout() {
    let mut link = msix(16);
    link.set_shmem_base(2, 0x1_0000_0000);
    link.peer_attached(2);
    let vendor = u16::from(VENDOR_CAP_OFFSET);
    let at = u16::from(MSIX_CAP_OFFSET);
    assert_eq!(cfg(&link, 2, 0x00, 4), 0x4106_110A);
    assert_eq!(
        cfg(&link, 2, pci::STATUS.into(), 2),
        1 << 4,
        "capability list"
    );
    assert_eq!(cfg(&link, 2, pci::CAP_POINTER.into(), 1), 0x40);
    assert_eq!(
        cfg(&link, 2, INTERRUPT_PIN.into(), 1),
        0,
        "pin 0 with MSI-X"
    );
    assert_eq!(
        INTERRUPT_PIN, 0x3D,
        "PCI's offset, not the spec table's 3Eh"
    );
    // Vendor capability: ID 09h, next 60h, length 20h, privileged control 0.
    assert_eq!(cfg(&link, 2, vendor, 4), 0x0020_6009);
    assert_eq!(
        u64::from(cfg(&link, 2, vendor + 0x18, 4))
            | u64::from(cfg(&link, 2, vendor + 0x1C, 4)) << 32,
        0x1_0000_0000
    );
    // MSI-X capability: ID 11h, next 0, control = table size 15; table BIR 1 offset 0;
    // PBA BIR 1 offset 100h.
    assert_eq!(cfg(&link, 2, at, 4), 0x000F_0011);
    assert_eq!(cfg(&link, 2, at + 4, 4), 0x0000_0001);
    assert_eq!(cfg(&link, 2, at + 8, 4), 0x0000_0101);
    for offset in (at + 12..0x100).step_by(4) {
        assert_eq!(
            cfg(&link, 2, offset, 4),
            0,
            "nothing after the MSI-X capability"
        );
    }
    // Table size follows the vector count.
    let small = msix(2);
    assert_eq!(cfg(&small, 0, CONTROL, 2), 1);
}

#[test]
fn the_guest_capability_walk_finds_vendor_then_msix() {
    struct Guest<'a>(&'a RefCell<Link>);
    impl ConfigAccess for Guest<'_> {
        fn read32(&self, address: PciAddress, offset: u8) -> u32 {
            if address != SLOT {
                return u32::MAX;
            }
            self.0.borrow().config_read(1, offset.into(), 4).unwrap()
        }
        fn write32(&self, address: PciAddress, offset: u8, value: u32) {
            if address == SLOT {
                self.0
                    .borrow_mut()
                    .config_write(1, offset.into(), 4, value)
                    .unwrap();
            }
        }
    }
    let link = RefCell::new(msix(16));
    link.borrow_mut().peer_attached(1);
    let guest = Guest(&link);
    let found = find_ivshmem(&guest, None).unwrap();
    assert_eq!(found.address, SLOT);
    assert_eq!(found.interrupt_pin, 0);
    assert_eq!(found.capability.offset, 0x40);
    assert_eq!(
        find_capability(&guest, SLOT, CAP_ID_VENDOR).unwrap(),
        Some(0x40)
    );
    assert_eq!(
        find_capability(&guest, SLOT, CAP_ID_MSIX).unwrap(),
        Some(0x60)
    );
    let cap = found.msix(&guest).unwrap().unwrap();
    assert_eq!(Some(cap), MsixCapability::find(&guest, SLOT).unwrap());
    assert_eq!(
        (
            cap.offset,
            cap.vectors,
            cap.table_bar,
            cap.table_offset,
            cap.pba_bar,
            cap.pba_offset
        ),
        (0x60, 16, 1, 0, 1, 0x100)
    );
    // BAR sizing through the guest helpers, BAR0 and BAR1.
    assert_eq!(found.bar0_size(&guest).unwrap(), 0x1000);
    assert_eq!(found.bar_size(&guest, 1).unwrap(), 0x1000);
    found.program_bar(&guest, 1, 0xFF00_1000).unwrap();
    found.setup(&guest, 0xFF00_0000).unwrap();
    assert_eq!(link.borrow().bar0_mapping(1), Some(0xFF00_0000));
    assert_eq!(link.borrow().bar1_mapping(1), Some(0xFF00_1000));
    // Enable with the function masked, then unmask; the control reads back each time.
    assert_eq!(
        cap.set_control(&guest, true, true),
        MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK | 15
    );
    assert_eq!(
        cap.set_control(&guest, true, false),
        MSIX_CONTROL_ENABLE | 15
    );
    assert_eq!(
        link.borrow().msix_control(1),
        Some(MSIX_CONTROL_ENABLE),
        "table size is not stored"
    );

    // Program the table through BAR1 the way an inmate does.
    struct Bar1<'a>(&'a RefCell<Link>);
    impl RegisterAccess for Bar1<'_> {
        fn read32(&self, offset: u32) -> u32 {
            self.0.borrow().msix_read(1, offset.into(), 4).unwrap() as u32
        }
        fn write32(&self, offset: u32, value: u32) {
            self.0
                .borrow_mut()
                .msix_write(1, offset.into(), 4, value.into())
                .unwrap()
        }
    }
    let table = MsixTable::new(Bar1(&link), &cap);
    table.program(3, x86_msi_address(1), 0x23, true);
    assert_eq!(table.read(3), (0xFEE0_1000, 0x23, false));
    assert_eq!(
        link.borrow().msi_message(1, 3),
        Some(MsiMessage {
            address: 0xFEE0_1000,
            data: 0x23
        })
    );
    table.set_masked(3, true);
    assert!(link.borrow().msix_entry(1, 3).unwrap().masked);
}

#[test]
fn only_enable_and_function_mask_are_writable_in_msix_control() {
    let mut link = msix(4);
    cfg_write(&mut link, 0, CONTROL - 2, 4, 0xFFFF_FFFF);
    assert_eq!(
        cfg(&link, 0, CONTROL - 2, 4),
        0xC003_0011,
        "ID and next stay; table size 3; enable and mask set"
    );
    cfg_write(&mut link, 0, CONTROL, 2, 0x3FFF);
    assert_eq!(cfg(&link, 0, CONTROL, 2), 0x0003);
    cfg_write(&mut link, 0, CONTROL + 1, 1, 0x80);
    assert_eq!(
        cfg(&link, 0, CONTROL, 2),
        0x8003,
        "byte write of the high half"
    );
    for offset in [4u16, 8] {
        let before = cfg(&link, 0, MSIX_CAP_OFFSET as u16 + offset, 4);
        cfg_write(
            &mut link,
            0,
            MSIX_CAP_OFFSET as u16 + offset,
            4,
            0xFFFF_FFFF,
        );
        assert_eq!(cfg(&link, 0, MSIX_CAP_OFFSET as u16 + offset, 4), before);
    }
    assert_eq!(link.msix_control(1), Some(0), "per peer");
}

#[test]
fn bar_sizing_works_for_bar0_and_bar1() {
    let mut link = msix(16);
    for (bar, mask) in [(pci::BAR0, BAR0_SIZE_MASK), (pci::BAR1, BAR1_SIZE_MASK)] {
        assert_eq!(cfg(&link, 0, bar.into(), 4), 0);
        cfg_write(&mut link, 0, bar.into(), 4, u32::MAX);
        assert_eq!(cfg(&link, 0, bar.into(), 4), 0xFFFF_F000);
        assert_eq!(mask, 0xFFFF_F000);
        // Byte-wise, as with byte enables.
        cfg_write(&mut link, 1, u16::from(bar) + 1, 1, 0xFF);
        assert_eq!(cfg(&link, 1, bar.into(), 4), 0x0000_F000);
    }
    cfg_write(&mut link, 0, pci::BAR1.into(), 4, 0xFF00_1ABC);
    assert_eq!(link.bar1(0), Some(0xFF00_1000));
    assert_eq!(link.bar1_mapping(0), None, "memory decoding off");
    cfg_write(&mut link, 0, pci::COMMAND.into(), 2, COMMAND_MEMORY.into());
    assert_eq!(link.bar1_mapping(0), Some(0xFF00_1000));
    for bar in [pci::BAR2, pci::BAR3, pci::BAR4, pci::BAR5] {
        cfg_write(&mut link, 0, bar.into(), 4, u32::MAX);
        assert_eq!(cfg(&link, 0, bar.into(), 4), 0, "not implemented");
    }
    // Without MSI-X there is no BAR1.
    let mut intx = link_with(2, InterruptMode::Intx);
    cfg_write(&mut intx, 0, pci::BAR1.into(), 4, u32::MAX);
    assert_eq!(cfg(&intx, 0, pci::BAR1.into(), 4), 0);
    cfg_write(&mut intx, 0, pci::COMMAND.into(), 2, COMMAND_MEMORY.into());
    assert_eq!(intx.bar1_mapping(0), None);
}

// ---------------------------------------------------------------- BAR1

#[test]
fn table_entries_read_back_and_are_masked_after_reset() {
    let mut link = msix(4);
    link.peer_attached(0);
    for vector in 0..4u16 {
        assert_eq!(link.msix_entry(0, vector), Some(MsixEntry::default()));
        let entry = u64::from(vector) * 16;
        assert_eq!(link.msix_read(0, entry + 12, 4).unwrap(), 1, "masked");
    }
    assert_eq!(link.msix_entry(0, 4), None, "only 4 vectors");
    link.msix_write(0, 16, 8, 0x0000_0001_FEE0_2000).unwrap();
    link.msix_write(0, 24, 8, 0xFFFF_FFFE_0000_0041).unwrap();
    assert_eq!(link.msix_read(0, 16, 8).unwrap(), 0x0000_0001_FEE0_2000);
    assert_eq!(
        link.msix_read(0, 24, 8).unwrap(),
        0x41,
        "vector control: only the mask bit, now clear"
    );
    assert_eq!(
        link.msix_entry(0, 1),
        Some(MsixEntry {
            message: MsiMessage {
                address: 0x1_FEE0_2000,
                data: 0x41
            },
            masked: false
        })
    );
    // Entries past the table, the PBA and the rest of the page read 0 and ignore writes.
    for offset in [64u64, 0xF0, u64::from(MSIX_PBA_OFFSET_IN_BAR), 0x108, 0xFFC] {
        link.msix_write(0, offset, 4, 0xFFFF_FFFF).unwrap();
        assert_eq!(
            link.msix_read(0, offset, 4).unwrap(),
            0,
            "offset {offset:#x}"
        );
    }
    // Reset masks again.
    link.peer_attached(0);
    assert_eq!(link.msix_entry(0, 1), Some(MsixEntry::default()));
}

#[test]
fn the_pba_reads_zero_even_while_interrupts_are_dropped() {
    let mut link = armed(4);
    table_write(&mut link, 1, 2 * MSIX_ENTRY_SIZE + 12, MSIX_ENTRY_MASKED);
    assert!(ring(&mut link, 0, 1, 2).is_empty(), "masked: dropped");
    assert_eq!(
        link.msix_read(1, MSIX_PBA_OFFSET_IN_BAR.into(), 8).unwrap(),
        0
    );
    table_write(&mut link, 1, 2 * MSIX_ENTRY_SIZE + 12, 0);
    assert!(
        ring(&mut link, 0, 1, 3).len() == 1,
        "unmasking does not replay the dropped one; others go out"
    );
}

#[test]
fn bad_bar1_accesses_are_refused() {
    let mut link = msix(4);
    link.peer_attached(0);
    let cases: [(u64, u8, AccessReason); 5] = [
        (0x2, 4, AccessReason::Misaligned),
        (0x4, 8, AccessReason::Misaligned),
        (0x0, 2, AccessReason::WrongSize),
        (0x0, 1, AccessReason::WrongSize),
        (0x1000, 4, AccessReason::OutsideRegisterPage),
    ];
    for (offset, size, reason) in cases {
        let err = link.msix_write(0, offset, size, 5).unwrap_err();
        assert_eq!(
            (err.space, err.kind, err.offset, err.size, err.reason),
            (AccessSpace::Msix, AccessKind::Write, offset, size, reason)
        );
        assert_eq!(link.msix_read(0, offset, size).unwrap_err().reason, reason);
    }
    assert_eq!(
        link.msix_write(1, 0, 4, 0).unwrap_err().reason,
        AccessReason::PeerNotAttached
    );
    assert_eq!(link.msix_read(1, 12, 4).unwrap(), 1, "reads are served");
    let err = link_with(2, InterruptMode::Intx)
        .msix_read(0, 0, 4)
        .unwrap_err();
    assert_eq!(err.reason, AccessReason::NoMsix);
    assert_eq!(
        err.fatal_report("inmate", 0xFF00_1000),
        "FATAL: cell \"inmate\": invalid ivshmem MSI-X (BAR1) read at 0xff001000, size 4 (link `demo`, peer 0, offset 0x0): the device has no MSI-X (BAR1) on this link"
    );
}

// ---------------------------------------------------------------- delivery gates

#[test]
fn an_armed_peer_gets_each_vector_with_its_message() {
    let mut link = armed(16);
    for vector in 0..16 {
        assert_eq!(ring(&mut link, 0, 2, vector), irq(2, vector));
        assert_eq!(link.msi_message(2, vector), Some(message(2, vector)));
    }
    assert!(ring(&mut link, 0, 2, 16).is_empty(), "no vector 16");
    assert_eq!(ring(&mut link, 1, 1, 5), irq(1, 5), "ringing oneself");
}

#[test]
fn every_gate_blocks_delivery_and_reopening_it_restores_it() {
    type Gate = (&'static str, fn(&mut Link), fn(&mut Link));
    let gates: [Gate; 6] = [
        (
            "INT_CONTROL bit 0",
            |l| drop(l.mmio_write(1, INT_CONTROL.into(), 4, 0).unwrap()),
            |l| drop(l.mmio_write(1, INT_CONTROL.into(), 4, 1).unwrap()),
        ),
        (
            "MSI-X enable",
            |l| cfg_write(l, 1, CONTROL, 2, 0),
            |l| cfg_write(l, 1, CONTROL, 2, MSIX_CONTROL_ENABLE.into()),
        ),
        (
            "function mask",
            |l| {
                let both = MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK;
                cfg_write(l, 1, CONTROL, 2, both.into())
            },
            |l| cfg_write(l, 1, CONTROL, 2, MSIX_CONTROL_ENABLE.into()),
        ),
        (
            "entry mask",
            |l| table_write(l, 1, 3 * MSIX_ENTRY_SIZE + 12, MSIX_ENTRY_MASKED),
            |l| table_write(l, 1, 3 * MSIX_ENTRY_SIZE + 12, 0),
        ),
        (
            "bus master",
            |l| cfg_write(l, 1, pci::COMMAND.into(), 2, COMMAND_MEMORY.into()),
            |l| {
                let both = COMMAND_MEMORY | COMMAND_BUS_MASTER;
                cfg_write(l, 1, pci::COMMAND.into(), 2, both.into())
            },
        ),
        (
            "attachment",
            |l| drop(l.peer_detached(1)),
            |l| {
                // A re-attached peer starts from reset: arm it again.
                l.peer_attached(1);
                cfg_write(l, 1, pci::COMMAND.into(), 2, 6);
                cfg_write(l, 1, CONTROL, 2, MSIX_CONTROL_ENABLE.into());
                program(l, 1, 3);
                l.mmio_write(1, INT_CONTROL.into(), 4, 1).unwrap();
            },
        ),
    ];
    let mut link = armed(4);
    for (name, close, open) in gates {
        assert_eq!(ring(&mut link, 0, 1, 3), irq(1, 3), "{name}: open before");
        let generation = link.route_generation(1);
        close(&mut link);
        assert!(ring(&mut link, 0, 1, 3).is_empty(), "{name}: closed");
        assert_eq!(link.route(1, 3), Route::Blocked, "{name}");
        assert!(!link.deliverable(1, 3), "{name}");
        assert!(
            link.route_generation(1) > generation,
            "{name}: the route change is announced"
        );
        let generation = link.route_generation(1);
        open(&mut link);
        assert_ne!(link.route_generation(1), generation, "{name}: reopened");
        assert_eq!(ring(&mut link, 0, 1, 3), irq(1, 3), "{name}: open again");
    }
}

#[test]
fn masking_one_entry_leaves_the_others() {
    let mut link = armed(4);
    table_write(&mut link, 2, MSIX_ENTRY_SIZE + 12, MSIX_ENTRY_MASKED);
    assert!(ring(&mut link, 0, 2, 1).is_empty());
    assert_eq!(ring(&mut link, 0, 2, 0), irq(2, 0));
    assert_eq!(ring(&mut link, 0, 2, 2), irq(2, 2));
    assert_eq!(
        ring(&mut link, 0, 1, 1),
        irq(1, 1),
        "other peers unaffected"
    );
}

#[test]
fn state_changes_go_on_vector_0_only() {
    let mut link = armed(4);
    let effects = link.mmio_write(0, STATE.into(), 4, 1).unwrap();
    assert_eq!(effects.interrupts, [irq(1, 0), irq(2, 0)].concat());
    // Peer 1 masks vector 0: it no longer hears state changes, its doorbells still work.
    table_write(&mut link, 1, 12, MSIX_ENTRY_MASKED);
    let effects = link.mmio_write(0, STATE.into(), 4, 2).unwrap();
    assert_eq!(effects.interrupts, irq(2, 0));
    assert_eq!(ring(&mut link, 0, 1, 1), irq(1, 1));
    // Detach is a state change too.
    assert_eq!(link.peer_detached(0).interrupts, irq(2, 0));
}

#[test]
fn one_shot_clears_int_control_on_delivery() {
    let mut link = armed(4);
    let priv_control = u16::from(VENDOR_CAP_OFFSET) + 3;
    cfg_write(&mut link, 1, priv_control, 1, 1);
    assert_eq!(
        link.route(1, 2),
        Route::Msi {
            message: message(1, 2),
            one_shot: true
        }
    );
    assert!(
        !link.route(1, 2).is_direct(),
        "one-shot takes the user-space path"
    );
    let generation = link.route_generation(1);
    assert_eq!(ring(&mut link, 0, 1, 2), irq(1, 2));
    assert_eq!(link.int_control(1), Some(0), "cleared by the delivery");
    assert!(link.route_generation(1) > generation);
    assert!(ring(&mut link, 0, 1, 2).is_empty(), "not re-armed yet");
    assert!(link.mmio_write(2, STATE.into(), 4, 9).unwrap().interrupts == irq(0, 0));
    link.mmio_write(1, INT_CONTROL.into(), 4, 1).unwrap();
    assert_eq!(
        link.deliver(1, 0),
        Some(Interrupt {
            target: 1,
            vector: 0
        })
    );
    assert_eq!(link.deliver(1, 0), None, "deliver applies one-shot as well");
    // Peers without one-shot keep INT_CONTROL.
    assert_eq!(ring(&mut link, 0, 2, 2), irq(2, 2));
    assert_eq!(link.int_control(2), Some(1));
}

// ---------------------------------------------------------------- routes

#[test]
fn route_generation_moves_exactly_when_routes_change() {
    let mut link = armed(2);
    assert_eq!(
        link.routes(1),
        vec![
            Route::Msi {
                message: message(1, 0),
                one_shot: false
            },
            Route::Msi {
                message: message(1, 1),
                one_shot: false
            },
        ]
    );
    assert!(link.routes(1).iter().all(|route| route.is_direct()));
    let (peer, all) = (link.route_generation(1), link.link_route_generation());
    // No change: same INT_CONTROL, same command, same entry, doorbells and state changes.
    link.mmio_write(1, INT_CONTROL.into(), 4, 1).unwrap();
    cfg_write(&mut link, 1, pci::COMMAND.into(), 2, 6);
    program(&mut link, 1, 0);
    ring(&mut link, 0, 1, 1);
    link.mmio_write(0, STATE.into(), 4, 4).unwrap();
    cfg_write(&mut link, 1, pci::BAR0.into(), 4, 0xFF00_0000);
    assert_eq!(link.route_generation(1), peer);
    assert_eq!(link.link_route_generation(), all);
    // A new message for an open entry is a change.
    table_write(&mut link, 1, MSIX_ENTRY_SIZE + 8, 0x99);
    assert_eq!(link.route_generation(1), peer + 1);
    assert_eq!(link.link_route_generation(), all + 1);
    assert_eq!(
        link.route(1, 1),
        Route::Msi {
            message: MsiMessage {
                address: message(1, 1).address,
                data: 0x99
            },
            one_shot: false
        }
    );
    // A new message for a masked entry is not (the route stays Blocked).
    table_write(&mut link, 1, 12, MSIX_ENTRY_MASKED);
    let peer = link.route_generation(1);
    table_write(&mut link, 1, 8, 0x77);
    assert_eq!(link.route_generation(1), peer);
    assert_eq!(
        link.route_generation(2),
        1,
        "peer 2 was armed with one route change: when its last gate (INT_CONTROL) opened"
    );
}

#[test]
fn endpoint_gated_peers_route_every_vector_to_their_endpoint() {
    let mut link = msix(4);
    link.set_interrupt_gate(0, InterruptGate::Endpoint);
    link.peer_attached(0);
    link.peer_attached(1);
    assert_eq!(link.routes(0), vec![Route::Endpoint; 4]);
    assert!(Route::Endpoint.is_direct());
    assert_eq!(ring(&mut link, 1, 0, 3), irq(0, 3));
    assert!(ring(&mut link, 1, 0, 4).is_empty());
    link.peer_detached(0);
    assert_eq!(link.routes(0), vec![Route::Blocked; 4]);
    assert!(link.routes(7).is_empty());
}

// ---------------------------------------------------------------- INTx and parameters

#[test]
fn intx_honours_the_interrupt_disable_bit() {
    let mut link = link_with(2, InterruptMode::Intx);
    link.peer_attached(0);
    link.peer_attached(1);
    link.mmio_write(1, INT_CONTROL.into(), 4, 1).unwrap();
    assert_eq!(link.route(1, 0), Route::Intx { one_shot: false });
    assert_eq!(ring(&mut link, 0, 1, 0), irq(1, 0), "no bus master needed");
    cfg_write(
        &mut link,
        1,
        pci::COMMAND.into(),
        2,
        COMMAND_INTX_DISABLE.into(),
    );
    assert_eq!(link.route(1, 0), Route::Blocked);
    assert!(ring(&mut link, 0, 1, 0).is_empty());
    assert!(link.mmio_write(0, STATE.into(), 4, 1).unwrap().is_empty());
    cfg_write(&mut link, 1, pci::COMMAND.into(), 2, 0);
    assert_eq!(ring(&mut link, 0, 1, 0), irq(1, 0));
    assert_eq!(link.msi_message(1, 0), None, "no MSI without MSI-X");
    assert_eq!(
        cfg(&link, 0, u16::from(VENDOR_CAP_OFFSET) + 1, 1),
        0,
        "no next capability"
    );
}

#[test]
fn vector_counts_outside_1_to_16_are_refused() {
    for vectors in [0u16, MAX_MSIX_VECTORS + 1] {
        let layout = SharedMemoryLayout::new(LayoutParams {
            max_peers: 2,
            state_table_size: 0x1000,
            rw_size: 0,
            output_size: 0x1000,
            page_size: 4096,
        })
        .unwrap();
        let params = LinkParams {
            name: "bad".into(),
            max_peers: 2,
            protocol: Protocol::ETHERNET,
            layout,
            interrupts: InterruptMode::Msix { vectors },
        };
        let err = Link::new(params, Box::new(VecStateTable::new(2))).unwrap_err();
        assert_eq!(
            err,
            LinkError::BadVectorCount {
                link: "bad".into(),
                vectors
            }
        );
        assert!(err.to_string().contains("1 to 16"), "{err}");
    }
    assert_eq!(msix(1).vectors(), 1);
    assert_eq!(link_with(2, InterruptMode::Intx).vectors(), 1);
}
