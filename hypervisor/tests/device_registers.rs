//! The emulated ivshmem v2 device, register by register and field by field, against
//! `ivshmem-v2.md`: BAR0 registers, config space and the vendor capability, the peer life
//! cycle, and refused accesses.

use std::sync::{Arc, Mutex};

use hypervisor::device::{
    AccessError, AccessKind, AccessReason, AccessSpace, Effects, Interrupt, InterruptGate,
    InterruptMode, Link, LinkError, LinkParams, StateTable, VecStateTable, VENDOR_CAP_OFFSET,
};
use ivshmem_dev::layout::{LayoutParams, SharedMemoryLayout};
use ivshmem_dev::pci::{self, CAP_PRIV_CONTROL};
use ivshmem_dev::regs::{DOORBELL, ID, INT_CONTROL, MAX_PEERS, STATE};
use ivshmem_dev::{Doorbell, Protocol};

const STATE_TABLE_SIZE: u32 = 0x1000;
const RW_SIZE: u64 = 0x2000;
const OUTPUT_SIZE: u64 = 0x4_0000;

fn layout(max_peers: u16) -> SharedMemoryLayout {
    SharedMemoryLayout::new(LayoutParams {
        max_peers,
        state_table_size: STATE_TABLE_SIZE,
        rw_size: RW_SIZE,
        output_size: OUTPUT_SIZE,
        page_size: 4096,
    })
    .unwrap()
}

fn link_with_table(max_peers: u16, table: VecStateTable) -> Link {
    let params = LinkParams {
        name: "telemetry".into(),
        max_peers,
        protocol: Protocol::TELEMETRY,
        layout: layout(max_peers),
        interrupts: InterruptMode::Intx,
    };
    Link::new(params, Box::new(table)).unwrap()
}

/// A link with `max_peers` peers, none attached.
fn link(max_peers: u16) -> Link {
    link_with_table(max_peers, VecStateTable::new(max_peers))
}

/// A link whose every peer is attached, with interrupts enabled on `enabled`.
fn running(max_peers: u16, enabled: &[u16]) -> Link {
    let mut link = link(max_peers);
    for peer in 0..max_peers {
        assert!(link.peer_attached(peer).is_empty());
    }
    for &peer in enabled {
        write(&mut link, peer, INT_CONTROL, 1);
    }
    link
}

fn read(link: &Link, peer: u16, offset: u32) -> u32 {
    link.mmio_read(peer, u64::from(offset), 4).unwrap()
}

fn write(link: &mut Link, peer: u16, offset: u32, value: u32) -> Effects {
    link.mmio_write(peer, u64::from(offset), 4, u64::from(value))
        .unwrap()
}

fn ring(link: &mut Link, from: u16, target: u16, vector: u16) -> Effects {
    write(link, from, DOORBELL, Doorbell::new(target, vector).encode())
}

fn irqs(targets: &[u16]) -> Effects {
    Effects {
        interrupts: targets
            .iter()
            .map(|&target| Interrupt { target, vector: 0 })
            .collect(),
    }
}

fn cfg(link: &Link, peer: u16, offset: u8, size: u8) -> u32 {
    link.config_read(peer, u16::from(offset), size).unwrap()
}

fn cfg_write(link: &mut Link, peer: u16, offset: u8, size: u8, value: u32) {
    link.config_write(peer, u16::from(offset), size, value)
        .unwrap()
}

// ---------------------------------------------------------------- ID and MAX_PEERS (RO)

#[test]
fn id_reads_each_peers_own_id_and_ignores_writes() {
    let mut link = running(3, &[0, 1, 2]);
    for peer in 0..3 {
        assert_eq!(read(&link, peer, ID), u32::from(peer));
        // Read-only: the write is accepted and ignored (no report, no effect).
        assert!(write(&mut link, peer, ID, 0xDEAD).is_empty());
        assert_eq!(read(&link, peer, ID), u32::from(peer));
    }
}

#[test]
fn max_peers_reads_the_link_size_and_ignores_writes() {
    let mut link = running(3, &[0, 1, 2]);
    for peer in 0..3 {
        assert_eq!(read(&link, peer, MAX_PEERS), 3);
        assert!(write(&mut link, peer, MAX_PEERS, 2).is_empty());
        assert_eq!(read(&link, peer, MAX_PEERS), 3);
    }
}

// ---------------------------------------------------------------- INT_CONTROL

#[test]
fn int_control_is_zero_after_reset_and_keeps_bit_0_only() {
    let mut link = running(2, &[]);
    assert_eq!(read(&link, 0, INT_CONTROL), 0);
    write(&mut link, 0, INT_CONTROL, 0xFFFF_FFFF);
    assert_eq!(read(&link, 0, INT_CONTROL), 1);
    assert_eq!(link.int_control(0), Some(1));
    assert_eq!(read(&link, 1, INT_CONTROL), 0, "per peer");
    write(&mut link, 0, INT_CONTROL, 2);
    assert_eq!(read(&link, 0, INT_CONTROL), 0);
}

#[test]
fn disabled_interrupts_block_doorbells_and_state_changes() {
    let mut link = running(2, &[]);
    assert!(ring(&mut link, 0, 1, 0).is_empty());
    assert!(write(&mut link, 0, STATE, 1).is_empty());
    write(&mut link, 1, INT_CONTROL, 1);
    assert_eq!(ring(&mut link, 0, 1, 0), irqs(&[1]));
    assert_eq!(write(&mut link, 0, STATE, 2), irqs(&[1]));
}

#[test]
fn one_shot_clears_int_control_on_delivery_and_rearm_reenables() {
    let mut link = running(2, &[0, 1]);
    let priv_control = VENDOR_CAP_OFFSET + CAP_PRIV_CONTROL;
    cfg_write(
        &mut link,
        1,
        priv_control,
        1,
        u32::from(pci::PRIV_CONTROL_ONESHOT),
    );
    assert_eq!(link.one_shot(1), Some(true));

    assert_eq!(ring(&mut link, 0, 1, 0), irqs(&[1]));
    assert_eq!(read(&link, 1, INT_CONTROL), 0, "delivery cleared bit 0");
    assert!(
        ring(&mut link, 0, 1, 0).is_empty(),
        "no second interrupt before re-arm"
    );
    assert!(
        write(&mut link, 0, STATE, 1).is_empty(),
        "state changes are gated too"
    );

    write(&mut link, 1, INT_CONTROL, 1); // re-arm
    assert_eq!(write(&mut link, 0, STATE, 2), irqs(&[1]));
    assert_eq!(read(&link, 1, INT_CONTROL), 0);

    // Without one-shot (peer 0), delivery leaves INT_CONTROL alone.
    assert_eq!(ring(&mut link, 1, 0, 0), irqs(&[0]));
    assert_eq!(ring(&mut link, 1, 0, 0), irqs(&[0]));
    assert_eq!(read(&link, 0, INT_CONTROL), 1);
}

// ---------------------------------------------------------------- DOORBELL (WO)

#[test]
fn doorbell_interrupts_an_active_enabled_target() {
    let mut link = running(3, &[0, 1, 2]);
    assert_eq!(ring(&mut link, 0, 2, 0), irqs(&[2]));
    assert_eq!(ring(&mut link, 2, 1, 0), irqs(&[1]));
}

#[test]
fn doorbell_reads_zero() {
    let mut link = running(2, &[0, 1]);
    assert_eq!(read(&link, 0, DOORBELL), 0);
    ring(&mut link, 0, 1, 0);
    assert_eq!(read(&link, 0, DOORBELL), 0);
    assert_eq!(read(&link, 1, DOORBELL), 0);
}

#[test]
fn doorbell_to_a_disabled_target_has_no_effect() {
    let mut link = running(3, &[0, 2]);
    assert!(ring(&mut link, 0, 1, 0).is_empty());
    assert_eq!(read(&link, 1, INT_CONTROL), 0);
}

#[test]
fn doorbell_to_an_absent_target_has_no_effect() {
    let mut link = running(2, &[0, 1]);
    for target in [2, 15, u16::MAX] {
        assert!(ring(&mut link, 0, target, 0).is_empty());
    }
    assert!(link
        .mmio_write(0, u64::from(DOORBELL), 4, u64::from(u32::MAX))
        .unwrap()
        .is_empty());
}

#[test]
fn doorbell_to_an_inactive_target_has_no_effect() {
    let mut link = link(3);
    link.peer_attached(0);
    link.peer_attached(1);
    write(&mut link, 1, INT_CONTROL, 1);
    // Peer 2 never attached.
    assert!(ring(&mut link, 0, 2, 0).is_empty());
    // Peer 1 detaches: it is no longer a target, even though it had interrupts enabled.
    link.peer_detached(1);
    assert!(!link.is_active(1));
    assert!(ring(&mut link, 0, 1, 0).is_empty());
    assert!(!link.deliverable(1, 0));
}

/// Issue 14 item 6: the readings `ivshmem-dev`'s docs note for the specification's typos
/// (interrupt pin at 3Dh, not 3Eh; bus master is command bit 2, not 3), and its choice for a
/// doorbell to a peer that is attached but still in state 0 (delivered).
#[test]
fn the_specifications_typos_are_read_as_pci_does_and_a_state_0_peer_is_a_doorbell_target() {
    let mut link = running(2, &[0, 1]);
    assert_eq!(pci::INTERRUPT_PIN, 0x3D);
    assert_eq!(cfg(&link, 0, 0x3D, 1), 1, "interrupt pin INTA at 3Dh");
    assert_eq!(cfg(&link, 0, 0x3E, 1), 0, "3Eh is Min_Gnt, 0");
    assert_eq!(pci::COMMAND_BUS_MASTER, 1 << 2);
    cfg_write(&mut link, 0, pci::COMMAND, 2, 1 << 3);
    assert_eq!(
        cfg(&link, 0, pci::COMMAND, 2),
        0,
        "bit 3 (special cycles) is not writable"
    );
    cfg_write(&mut link, 0, pci::COMMAND, 2, 1 << 2);
    assert_eq!(
        cfg(&link, 0, pci::COMMAND, 2),
        1 << 2,
        "bit 2 is bus master"
    );
    assert_eq!(read(&link, 1, STATE), 0, "peer 1 never wrote STATE");
    assert_eq!(ring(&mut link, 0, 1, 0), irqs(&[1]));
}

#[test]
fn doorbell_to_self_is_allowed() {
    let mut link = running(2, &[0]);
    assert_eq!(ring(&mut link, 0, 0, 0), irqs(&[0]));
}

#[test]
fn doorbell_on_a_nonzero_vector_has_no_effect_with_intx() {
    let mut link = running(2, &[0, 1]);
    assert!(ring(&mut link, 0, 1, 1).is_empty());
    assert!(ring(&mut link, 0, 1, 0xFFFF).is_empty());
}

// ---------------------------------------------------------------- STATE

#[test]
fn state_is_zero_after_reset_and_reads_back() {
    let mut link = running(2, &[0, 1]);
    assert_eq!(read(&link, 0, STATE), 0);
    write(&mut link, 0, STATE, 0xABCD);
    assert_eq!(read(&link, 0, STATE), 0xABCD);
    assert_eq!(read(&link, 1, STATE), 0, "each peer reads its own state");
}

#[test]
fn writing_an_equal_state_notifies_no_one() {
    let mut link = running(3, &[0, 1, 2]);
    assert!(
        write(&mut link, 0, STATE, 0).is_empty(),
        "0 over the reset value 0"
    );
    assert_eq!(write(&mut link, 0, STATE, 3), irqs(&[1, 2]));
    assert!(write(&mut link, 0, STATE, 3).is_empty());
    assert_eq!(link.peer_state(0), Some(3));
}

#[test]
fn a_new_state_goes_to_the_table_and_raises_vector_0_on_every_other_enabled_active_peer() {
    // Peer 0 writes; 1 and 3 are active with interrupts on; 2 is active with interrupts off;
    // 4 never attached; 5 attached, enabled, then detached. 0 itself has interrupts on.
    let mut link = link(6);
    for peer in [0, 1, 2, 3, 5] {
        link.peer_attached(peer);
    }
    for peer in [0, 1, 3, 5] {
        write(&mut link, peer, INT_CONTROL, 1);
    }
    link.peer_detached(5);
    let effects = write(&mut link, 0, STATE, 2);
    assert_eq!(effects, irqs(&[1, 3]));
    assert!(effects.interrupts.iter().all(|i| i.vector == 0));
    assert_eq!(link.peer_state(0), Some(2));
    assert_eq!(link.state_table().read(0), 2);
    for peer in 1..6 {
        assert_eq!(link.peer_state(peer), Some(0), "other entries untouched");
    }
}

#[test]
fn endpoint_gated_peers_get_every_notification_while_active() {
    // Process cells keep INT_CONTROL in their endpoint; the model must not filter for them.
    let mut link = link(3);
    link.set_interrupt_gate(1, InterruptGate::Endpoint);
    link.set_interrupt_gate(2, InterruptGate::Endpoint);
    for peer in 0..3 {
        link.peer_attached(peer);
    }
    assert_eq!(link.interrupt_gate(1), Some(InterruptGate::Endpoint));
    assert_eq!(write(&mut link, 0, STATE, 1), irqs(&[1, 2]));
    assert_eq!(ring(&mut link, 0, 1, 0), irqs(&[1]));
    link.peer_detached(2);
    assert_eq!(
        write(&mut link, 0, STATE, 2),
        irqs(&[1]),
        "inactive peers still never get one"
    );
    assert_eq!(link.interrupt_gate(0), Some(InterruptGate::Device));
}

// ---------------------------------------------------------------- other offsets, access rules

#[test]
fn unknown_offsets_read_zero_and_ignore_writes() {
    let mut link = running(2, &[0, 1]);
    write(&mut link, 0, STATE, 7);
    for offset in [0x14u32, 0x18, 0x100, 0x800, 0xFFC] {
        assert!(write(&mut link, 0, offset, 0xFFFF_FFFF).is_empty());
        assert_eq!(read(&link, 0, offset), 0);
    }
    assert_eq!(read(&link, 0, ID), 0);
    assert_eq!(read(&link, 0, MAX_PEERS), 2);
    assert_eq!(read(&link, 0, INT_CONTROL), 1);
    assert_eq!(read(&link, 0, STATE), 7);
}

#[test]
fn misaligned_or_non_32_bit_register_accesses_are_refused() {
    let mut link = running(2, &[0, 1]);
    for size in [1u8, 2, 8] {
        let err = link.mmio_read(0, u64::from(STATE), size).unwrap_err();
        assert_eq!(err.reason, AccessReason::WrongSize);
        let err = link.mmio_write(0, u64::from(STATE), size, 5).unwrap_err();
        assert_eq!(
            err,
            AccessError {
                link: "telemetry".into(),
                peer: 0,
                space: AccessSpace::Registers,
                offset: u64::from(STATE),
                kind: AccessKind::Write,
                size,
                value: Some(5),
                reason: AccessReason::WrongSize,
            }
        );
    }
    for offset in [0x11u64, 0x12, 0x13, 0x0D] {
        let err = link.mmio_write(1, offset, 4, 1).unwrap_err();
        assert_eq!(
            (err.offset, err.kind, err.reason),
            (offset, AccessKind::Write, AccessReason::Misaligned)
        );
        let err = link.mmio_read(1, offset, 4).unwrap_err();
        assert_eq!(
            (err.kind, err.reason),
            (AccessKind::Read, AccessReason::Misaligned)
        );
    }
    let err = link.mmio_read(0, 0x1000, 4).unwrap_err();
    assert_eq!(err.reason, AccessReason::OutsideRegisterPage);
    // Refused writes change nothing.
    assert_eq!(read(&link, 0, STATE), 0);
    assert_eq!(link.peer_state(0), Some(0));
}

#[test]
fn register_writes_of_unattached_or_unknown_peers_are_refused() {
    let mut link = link(2);
    link.peer_attached(1);
    write(&mut link, 1, INT_CONTROL, 1);
    let err = link.mmio_write(0, u64::from(STATE), 4, 1).unwrap_err();
    assert_eq!(err.reason, AccessReason::PeerNotAttached);
    let err = link
        .mmio_write(0, u64::from(DOORBELL), 4, 0x1_0000)
        .unwrap_err();
    assert_eq!(err.reason, AccessReason::PeerNotAttached);
    assert_eq!(link.peer_state(0), Some(0));
    assert_eq!(read(&link, 0, ID), 0, "reads are served");
    assert_eq!(
        link.mmio_read(2, 0, 4).unwrap_err().reason,
        AccessReason::UnknownPeer
    );
}

#[test]
fn access_errors_name_offset_kind_size_and_reason() {
    let mut link = running(2, &[]);
    let err = link.mmio_write(1, 0x11, 2, 0x1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid ivshmem register write at offset 0x11, size 2, value 0x1 (link `telemetry`, peer 1): unsupported access size"
    );
    assert_eq!(
        err.fatal_report("rtos", 0xFE00_0011),
        "FATAL: cell \"rtos\": invalid ivshmem register write at 0xfe000011, size 2, value 0x1 (link `telemetry`, peer 1, offset 0x11): unsupported access size"
    );
    let err = link.config_read(0, 0x13, 2).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid ivshmem config space read at offset 0x13, size 2 (link `telemetry`, peer 0): misaligned access"
    );
}

// ---------------------------------------------------------------- config space

#[test]
fn config_header_identifies_an_ivshmem_v2_device() {
    let mut link = link(2);
    link.peer_attached(0);
    assert_eq!(cfg(&link, 0, 0x00, 4), 0x4106_110A);
    assert_eq!(cfg(&link, 0, pci::VENDOR_ID_REG, 2), 0x110A);
    assert_eq!(cfg(&link, 0, pci::DEVICE_ID_REG, 2), 0x4106);
    assert_eq!(
        cfg(&link, 0, pci::COMMAND, 2),
        0,
        "command is 0 after reset"
    );
    let status = cfg(&link, 0, pci::STATUS, 2) as u16;
    assert_eq!(
        status,
        pci::STATUS_CAP_LIST,
        "capability list set, INTx status (bit 3) never"
    );
    assert_eq!(cfg(&link, 0, pci::REVISION, 1), 0);
    // Protocol 4001h: low byte at 09h, high byte at 0Ah; class FFh at 0Bh.
    assert_eq!(cfg(&link, 0, pci::PROG_IF, 1), 0x01);
    assert_eq!(cfg(&link, 0, pci::SUBCLASS, 1), 0x40);
    assert_eq!(cfg(&link, 0, pci::CLASS, 1), 0xFF);
    assert_eq!(cfg(&link, 0, 0x08, 4), 0xFF40_0100);
    assert_eq!(cfg(&link, 0, pci::HEADER_TYPE, 1), 0);
    assert_eq!(cfg(&link, 0, pci::SUBSYSTEM_VENDOR_ID, 2), 0x110A);
    assert_eq!(cfg(&link, 0, pci::SUBSYSTEM_ID, 2), 0x4106);
    assert_eq!(
        cfg(&link, 0, pci::CAP_POINTER, 1),
        u32::from(VENDOR_CAP_OFFSET)
    );
    assert_eq!(cfg(&link, 0, pci::INTERRUPT_PIN, 1), 1, "INTx: pin 1");
    for bar in [pci::BAR1, pci::BAR2, pci::BAR3, pci::BAR4, pci::BAR5] {
        assert_eq!(cfg(&link, 0, bar, 4), 0, "only BAR0 exists");
    }
    for offset in (0x60..=0xFCu8).step_by(4) {
        assert_eq!(
            cfg(&link, 0, offset, 4),
            0,
            "unimplemented registers read 0"
        );
    }
}

#[test]
fn vendor_capability_announces_sizes_base_address_and_one_shot() {
    let mut link = link(2);
    link.set_shmem_base(0, 0x1_0000_0000);
    link.set_shmem_base(1, 0x8000_0000);
    let cap = VENDOR_CAP_OFFSET;
    for (peer, base) in [(0u16, 0x1_0000_0000u64), (1, 0x8000_0000)] {
        assert_eq!(
            cfg(&link, peer, cap, 1),
            0x09,
            "vendor-specific capability ID"
        );
        assert_eq!(cfg(&link, peer, cap + 1, 1), 0, "last capability");
        assert_eq!(
            cfg(&link, peer, cap + pci::CAP_LEN, 1),
            0x20,
            "length with base address"
        );
        assert_eq!(cfg(&link, peer, cap + CAP_PRIV_CONTROL, 1), 0);
        assert_eq!(
            cfg(&link, peer, cap + pci::CAP_STATE_TABLE_SIZE, 4),
            STATE_TABLE_SIZE
        );
        let u64_at = |at: u8| {
            u64::from(cfg(&link, peer, cap + at, 4))
                | u64::from(cfg(&link, peer, cap + at + 4, 4)) << 32
        };
        assert_eq!(u64_at(pci::CAP_RW_SECTION_SIZE), RW_SIZE);
        assert_eq!(u64_at(pci::CAP_OUTPUT_SECTION_SIZE), OUTPUT_SIZE);
        assert_eq!(u64_at(pci::CAP_BASE_ADDR), base);
        assert_eq!(link.shmem_base(peer), Some(base));
    }
}

#[test]
fn vendor_capability_is_read_only_except_the_one_shot_bit() {
    let mut link = link(2);
    let cap = VENDOR_CAP_OFFSET;
    let before: Vec<u32> = (0..8).map(|i| cfg(&link, 0, cap + 4 * i, 4)).collect();
    for i in 0..8 {
        cfg_write(&mut link, 0, cap + 4 * i, 4, 0xFFFF_FFFF);
    }
    let after: Vec<u32> = (0..8).map(|i| cfg(&link, 0, cap + 4 * i, 4)).collect();
    assert_eq!(
        after[0],
        before[0] | 0x0100_0000,
        "only privileged control bit 0 changed"
    );
    assert_eq!(after[1..], before[1..]);
    assert_eq!(link.one_shot(0), Some(true));
    assert_eq!(link.one_shot(1), Some(false), "per peer");
    cfg_write(&mut link, 0, cap + CAP_PRIV_CONTROL, 1, 0xFE);
    assert_eq!(cfg(&link, 0, cap + CAP_PRIV_CONTROL, 1), 0);
    assert_eq!(link.one_shot(0), Some(false));
}

#[test]
fn command_register_keeps_only_its_writable_bits() {
    let mut link = link(2);
    cfg_write(&mut link, 0, pci::COMMAND, 2, 0xFFFF);
    assert_eq!(
        cfg(&link, 0, pci::COMMAND, 2),
        0x0406,
        "memory, bus master, INTx disable; never I/O (no I/O BAR)"
    );
    cfg_write(&mut link, 0, pci::COMMAND, 4, 0xFFFF_0000);
    assert_eq!(
        cfg(&link, 0, pci::COMMAND, 4),
        u32::from(pci::STATUS_CAP_LIST) << 16,
        "status is read-only"
    );
    cfg_write(&mut link, 0, pci::COMMAND + 1, 1, 0x04);
    assert_eq!(link.command(0), Some(pci::COMMAND_INTX_DISABLE));
    cfg_write(&mut link, 0, pci::COMMAND, 1, 0x06);
    assert_eq!(link.command(0), Some(0x0406));
    assert_eq!(link.command(1), Some(0), "per peer");
}

#[test]
fn read_only_header_fields_ignore_writes() {
    let mut link = link(2);
    let before = link.config_space(0).unwrap();
    for (offset, size) in [
        (0x00u8, 4u8),
        (0x08, 4),
        (0x0E, 2),
        (0x2C, 4),
        (0x34, 1),
        (0x3D, 1),
        (0x3E, 2),
        (0x14, 4),
        (0x18, 4),
        (0x80, 4),
    ] {
        cfg_write(&mut link, 0, offset, size, 0xFFFF_FFFF);
    }
    assert_eq!(link.config_space(0).unwrap(), before);
}

#[test]
fn bar0_sizing_and_programming() {
    let mut link = link(2);
    assert_eq!(cfg(&link, 0, pci::BAR0, 4), 0);
    cfg_write(&mut link, 0, pci::BAR0, 4, 0xFFFF_FFFF);
    assert_eq!(
        cfg(&link, 0, pci::BAR0, 4),
        0xFFFF_F000,
        "4 KiB, 32-bit, non-prefetchable memory"
    );
    cfg_write(&mut link, 0, pci::BAR0, 4, 0xFEBF_0ABC);
    assert_eq!(
        cfg(&link, 0, pci::BAR0, 4),
        0xFEBF_0000,
        "low bits are not writable"
    );
    assert_eq!(link.bar0(0), Some(0xFEBF_0000));
    assert_eq!(link.bar0_mapping(0), None, "memory decoding still off");
    cfg_write(
        &mut link,
        0,
        pci::COMMAND,
        2,
        u32::from(pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER),
    );
    assert_eq!(link.bar0_mapping(0), Some(0xFEBF_0000));
    assert_eq!(link.bar0(1), Some(0), "each peer has its own BAR0");
    // The same protocol through the ivshmem-dev helper logic: size = !mask + 1.
    cfg_write(&mut link, 1, pci::BAR0, 4, u32::MAX);
    assert_eq!(!cfg(&link, 1, pci::BAR0, 4) + 1, 0x1000);
}

#[test]
fn cache_line_latency_and_interrupt_line_are_writable_without_effect() {
    let mut link = link(2);
    cfg_write(&mut link, 0, 0x0C, 4, 0xFFFF_FFFF);
    assert_eq!(
        cfg(&link, 0, 0x0C, 4),
        0x0000_FFFF,
        "header type and BIST stay 0"
    );
    cfg_write(&mut link, 0, pci::INTERRUPT_LINE, 4, 0xFFFF_FF0B);
    assert_eq!(
        cfg(&link, 0, pci::INTERRUPT_LINE, 4),
        0x0000_010B,
        "line 0Bh, pin 1"
    );
    assert_eq!(
        cfg(&link, 1, pci::INTERRUPT_LINE, 4),
        0x0000_0100,
        "per peer"
    );
}

#[test]
fn sub_dword_config_accesses_of_any_register_work_bars_included() {
    let mut link = link(2);
    // Byte-wise sizing of BAR0, as guests with byte enables do it.
    for byte in 0..4u8 {
        cfg_write(&mut link, 0, pci::BAR0 + byte, 1, 0xFF);
    }
    assert_eq!(cfg(&link, 0, pci::BAR0, 4), 0xFFFF_F000);
    assert_eq!(cfg(&link, 0, pci::BAR0, 1), 0x00);
    assert_eq!(cfg(&link, 0, pci::BAR0 + 1, 1), 0xF0);
    assert_eq!(cfg(&link, 0, pci::BAR0 + 2, 2), 0xFFFF);
    assert_eq!(cfg(&link, 0, pci::BAR0 + 1, 2), 0xFFF0, "within a dword");
    // Word-wise programming.
    cfg_write(&mut link, 0, pci::BAR0, 2, 0x1234);
    cfg_write(&mut link, 0, pci::BAR0 + 2, 2, 0xFEBF);
    assert_eq!(link.bar0(0), Some(0xFEBF_1000));
    assert_eq!(cfg(&link, 0, pci::BAR0 + 3, 1), 0xFE);
    // Byte reads of the ID dword.
    assert_eq!(cfg(&link, 0, 0x01, 1), 0x11);
    assert_eq!(cfg(&link, 0, 0x03, 1), 0x41);
    assert_eq!(cfg(&link, 0, 0x01, 2), 0x0611);
    // Byte write of the command register's high byte only.
    cfg_write(&mut link, 0, pci::COMMAND, 1, 0x02);
    cfg_write(&mut link, 0, pci::COMMAND + 1, 1, 0xFF);
    assert_eq!(link.command(0), Some(0x0402));
}

#[test]
fn config_accesses_must_stay_in_one_dword_and_inside_config_space() {
    let mut link = link(2);
    assert_eq!(
        link.config_read(0, 0x02, 4).unwrap_err().reason,
        AccessReason::Misaligned
    );
    assert_eq!(
        link.config_read(0, 0x03, 2).unwrap_err().reason,
        AccessReason::Misaligned,
        "crosses a dword boundary"
    );
    assert_eq!(
        link.config_write(0, 0x12, 4, 0).unwrap_err().reason,
        AccessReason::Misaligned
    );
    assert_eq!(
        link.config_write(0, 0x04, 3, 0).unwrap_err().reason,
        AccessReason::WrongSize
    );
    assert_eq!(
        link.config_read(0, 0x04, 8).unwrap_err().reason,
        AccessReason::WrongSize
    );
    assert_eq!(
        link.config_read(0, 0x100, 4).unwrap_err().reason,
        AccessReason::OutsideConfigSpace
    );
    assert_eq!(
        link.config_read(2, 0, 4).unwrap_err().reason,
        AccessReason::UnknownPeer
    );
    assert_eq!(cfg(&link, 0, 0xFF, 1), 0);
    assert_eq!(cfg(&link, 0, 0x05, 1), 0);
}

// ---------------------------------------------------------------- life cycle

#[test]
fn first_attach_clears_a_stale_state_table() {
    let mut link = link_with_table(3, VecStateTable::from_entries(vec![3, 2, 1]));
    assert_eq!(link.peer_state(1), Some(2), "stale until someone joins");
    assert!(link.peer_attached(1).is_empty());
    for peer in 0..3 {
        assert_eq!(link.peer_state(peer), Some(0));
    }
    // Later joins do not wipe the others' states.
    write(&mut link, 1, STATE, 5);
    link.peer_attached(0);
    assert_eq!(link.peer_state(1), Some(5));
    assert_eq!(link.active_peers().collect::<Vec<_>>(), vec![0, 1]);
}

/// A state table the test can still reach after handing it to the link (like the memfd the
/// process-cells backend maps).
#[derive(Clone, Default)]
struct SharedTable(Arc<Mutex<Vec<u32>>>);

impl StateTable for SharedTable {
    fn read(&self, peer: u16) -> u32 {
        self.0
            .lock()
            .unwrap()
            .get(usize::from(peer))
            .copied()
            .unwrap_or(0)
    }
    fn write(&mut self, peer: u16, value: u32) {
        if let Some(entry) = self.0.lock().unwrap().get_mut(usize::from(peer)) {
            *entry = value;
        }
    }
    fn clear(&mut self) {
        self.0.lock().unwrap().fill(0);
    }
}

#[test]
fn a_new_run_after_everyone_left_clears_again() {
    let table = SharedTable(Arc::new(Mutex::new(vec![0; 2])));
    let params = LinkParams {
        name: "telemetry".into(),
        max_peers: 2,
        protocol: Protocol::TELEMETRY,
        layout: layout(2),
        interrupts: InterruptMode::Intx,
    };
    let mut link = Link::new(params, Box::new(table.clone())).unwrap();
    link.peer_attached(0);
    link.peer_attached(1);
    write(&mut link, 0, STATE, 9);
    link.peer_detached(0);
    link.peer_detached(1);
    assert_eq!(link.active_peers().count(), 0);
    // Something stale is left in the memory (e.g. written by a previous hypervisor run).
    *table.0.lock().unwrap() = vec![9, 4];
    link.peer_attached(1);
    assert_eq!(*table.0.lock().unwrap(), vec![0, 0]);
    // Not cleared while someone is attached.
    table.0.lock().unwrap()[0] = 6;
    link.peer_attached(0);
    assert_eq!(
        *table.0.lock().unwrap(),
        vec![0, 0],
        "peer 0's own entry reset by its attach"
    );
    table.0.lock().unwrap()[0] = 6;
    link.peer_detached(1);
    link.peer_attached(1);
    assert_eq!(
        *table.0.lock().unwrap(),
        vec![6, 0],
        "peer 0 stayed: no clear"
    );
}

#[test]
fn detach_sets_the_state_to_zero_and_notifies_the_others() {
    let mut link = running(3, &[0, 1, 2]);
    write(&mut link, 2, STATE, 3);
    let effects = link.peer_detached(2);
    assert_eq!(effects, irqs(&[0, 1]));
    assert_eq!(link.peer_state(2), Some(0));
    assert!(!link.is_active(2));
    // Nothing changed on a second detach: nobody is bothered.
    assert!(link.peer_detached(2).is_empty());
}

#[test]
fn detach_of_a_peer_in_state_zero_changes_nothing_visible() {
    let mut link = running(2, &[0, 1]);
    assert!(link.peer_detached(1).is_empty());
}

#[test]
fn detach_notifies_only_enabled_active_peers() {
    let mut link = running(4, &[0, 3]);
    link.peer_detached(3);
    write(&mut link, 1, STATE, 1);
    assert_eq!(link.peer_detached(1), irqs(&[0]));
}

#[test]
fn attach_resets_the_peers_registers_and_config_space() {
    let mut link = running(2, &[0, 1]);
    cfg_write(&mut link, 1, VENDOR_CAP_OFFSET + CAP_PRIV_CONTROL, 1, 1);
    cfg_write(&mut link, 1, pci::BAR0, 4, 0xFEBF_0000);
    cfg_write(&mut link, 1, pci::COMMAND, 2, 0x6);
    link.set_shmem_base(1, 0x4000_0000);
    link.peer_detached(1);
    link.peer_attached(1);
    assert_eq!(read(&link, 1, INT_CONTROL), 0);
    assert_eq!(link.one_shot(1), Some(false));
    assert_eq!(link.bar0(1), Some(0));
    assert_eq!(link.command(1), Some(0));
    assert_eq!(link.bar0_mapping(1), None);
    assert_eq!(
        link.shmem_base(1),
        Some(0x4000_0000),
        "set by the hypervisor, not the guest"
    );
}

#[test]
fn attaching_an_active_peer_is_a_reset() {
    let mut link = running(2, &[0, 1]);
    write(&mut link, 1, STATE, 2);
    assert_eq!(
        link.peer_attached(1),
        irqs(&[0]),
        "its state went to 0: the others hear it"
    );
    assert_eq!(link.peer_state(1), Some(0));
    assert!(link.is_active(1));
    assert_eq!(read(&link, 1, INT_CONTROL), 0);
}

#[test]
fn out_of_range_peers_have_no_device() {
    let mut link = running(2, &[0, 1]);
    assert!(link.peer_attached(7).is_empty());
    assert!(link.peer_detached(7).is_empty());
    assert_eq!(link.peer_state(2), None);
    assert_eq!(link.int_control(2), None);
    assert!(!link.is_active(2));
    assert_eq!(link.config_space(2), None);
}

#[test]
fn link_refuses_a_layout_for_another_peer_count() {
    let params = LinkParams {
        name: "net".into(),
        max_peers: 3,
        protocol: Protocol::ETHERNET,
        layout: layout(2),
        interrupts: InterruptMode::Intx,
    };
    let err = Link::new(params, Box::new(VecStateTable::new(3))).unwrap_err();
    assert_eq!(
        err,
        LinkError::MaxPeersMismatch {
            link: "net".into(),
            max_peers: 3,
            layout_max_peers: 2
        }
    );
}
