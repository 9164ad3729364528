//! KVM cells on ivshmem links: the config space a guest scans, BAR sizing, illegal accesses
//! to link memory and registers, and doorbells between KVM cells and with a process peer
//! that never leave the kernel.

mod kvm_common;

use std::os::fd::AsFd;
use std::sync::Arc;

use hypervisor::device::{InterruptGate, InterruptMode};
use hypervisor::kvm::test_guests::{self, Guest, IVSHMEM_GUEST, IVSHMEM_SETUP_MMIO};
use hypervisor::kvm::{
    Bdf, EventQueue, HaltReason, KvmCell, KvmCellConfig, KvmLinkConfig, LinkSizes, LinkWiring,
};
use kvm_common::*;
use nix::poll::{PollFd, PollFlags, PollTimeout};

fn link(peers: u16, vectors: u16) -> Arc<LinkWiring> {
    LinkWiring::create(
        "l",
        peers,
        0x4000,
        LinkSizes {
            state_table: 4096,
            rw: 0,
            output: 4096,
        },
        InterruptMode::Msix { vectors },
    )
    .unwrap()
}

fn bdf() -> Bdf {
    "00:0e.0".parse().unwrap()
}

fn cell(
    name: &str,
    guest: &Guest,
    wiring: &Arc<LinkWiring>,
    peer: u16,
    cmdline: &str,
    cpu: usize,
    events: &Arc<EventQueue>,
) -> KvmCell {
    assert!(
        guest.image.len() < 0x1000,
        "the image must leave 0x1000 free"
    );
    let mut config = KvmCellConfig::new(name, guest.image.clone());
    config.low_memory = test_guests::LOW_MEMORY;
    config.cmdline = cmdline.into();
    config.cpu = Some(cpu);
    config.links.push(KvmLinkConfig {
        wiring: wiring.clone(),
        peer,
        bdf: bdf(),
        address: test_guests::LINK_ADDRESS,
    });
    KvmCell::new(config, events.clone()).unwrap()
}

/// Attaches `peer` the way the control server attaches a process cell.
fn attach_process_peer(wiring: &LinkWiring, peer: u16) {
    let effects = {
        let mut model = wiring.model();
        model.set_interrupt_gate(peer, InterruptGate::Endpoint);
        model.peer_attached(peer)
    };
    wiring.deliver(&effects);
}

/// Waits for `peer`'s vector-0 eventfd and returns its count.
fn wait_interrupt(wiring: &LinkWiring, peer: u16) -> u64 {
    let line = &wiring.memory().interrupts[usize::from(peer)][0];
    let fd = line.fd();
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let n = nix::poll::poll(&mut fds, PollTimeout::from(30_000u16)).unwrap();
    assert_eq!(n, 1, "no interrupt for peer {peer} within 30 s");
    line.drain().unwrap()
}

fn wait_state(wiring: &LinkWiring, peer: u16, state: u32) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while wiring.model().peer_state(peer) != Some(state) {
        assert!(
            std::time::Instant::now() < deadline,
            "peer {peer} never reached state {state}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn the_guest_scan_sees_the_model_config_space_and_bar_sizing_works() {
    if skip_without_kvm() {
        return;
    }
    let body = r#"
main:
    call setup
    xor %bl, %bl
1:  call cfgrd
    call puthex
    call putnl
    add $4, %bl
    cmp $0x80, %bl
    jb 1b
    # offsets from 0x80 and a missing function read all ones
    call cfgrd
    call puthex
    call putnl
    mov $0x80007800, %eax
    mov $0xcf8, %dx
    outl %eax, %dx
    mov $0xcfc, %dx
    inl %dx, %eax
    call puthex
    call putnl
    # BAR sizing
    mov $0x10, %bl
    mov $0xffffffff, %ecx
    call cfgwr
    call cfgrd
    call puthex
    call putnl
    mov $0x14, %bl
    call cfgwr
    call cfgrd
    call puthex
    call putnl
    # a 2-byte read of the device ID, a 1-byte read of the capability ID at 0x60
    mov $0x80007000, %eax
    mov $0xcf8, %dx
    outl %eax, %dx
    mov $0xcfe, %dx
    xor %eax, %eax
    inw %dx, %ax
    call puthex
    call putnl
    mov $0x80007060, %eax
    mov $0xcf8, %dx
    outl %eax, %dx
    mov $0xcfc, %dx
    xor %eax, %eax
    inb %dx, %al
    call puthex
    call putnl
    mov $2, %eax
    call stop
"#;
    let guest = test_guests::assemble(body).unwrap();
    let wiring = link(2, 16);
    let events = events();
    let mut c = cell("scan", &guest, &wiring, 1, "", 0, &events);
    c.start().unwrap();
    assert_eq!(expect_halt(&events, "scan"), HaltReason::CellState(2));
    let lines: Vec<u32> = console_lines(&events, "scan")
        .iter()
        .map(|l| u32::from_str_radix(l, 16).unwrap())
        .collect();
    assert_eq!(lines.len(), 32 + 6, "{lines:x?}");
    // The model after the guest's writes, with the BARs as they were during the scan.
    let mut expected = wiring.model().config_space(1).unwrap();
    expected[0x10..0x18].fill(0);
    for (i, dword) in lines[..32].iter().enumerate() {
        let want = u32::from_le_bytes(expected[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(*dword, want, "config dword {:#x}", i * 4);
    }
    assert_eq!(lines[0], 0x4106_110a, "vendor and device");
    assert_eq!(lines[0x34 / 4] & 0xff, 0x40, "capability pointer");
    assert_eq!(lines[0x3c / 4] >> 8 & 0xff, 0, "interrupt pin 0 with MSI-X");
    assert_eq!(
        lines[0x40 / 4] & 0xffff,
        0x6009,
        "vendor capability chains to 60h"
    );
    assert_eq!(
        lines[0x40 / 4] >> 16 & 0xff,
        0x20,
        "length with base address"
    );
    assert_eq!(
        u64::from(lines[0x58 / 4]) | u64::from(lines[0x5c / 4]) << 32,
        test_guests::LINK_ADDRESS,
        "shared memory base"
    );
    assert_eq!(lines[0x60 / 4], 0x000f_0011, "MSI-X, 16 vectors, disabled");
    assert_eq!(lines[0x64 / 4], 1, "table in BAR1 at 0");
    assert_eq!(lines[0x68 / 4], 0x101, "PBA in BAR1 at 0x100");
    assert_eq!(lines[32], 0xffff_ffff, "offset 0x80");
    assert_eq!(lines[33], 0xffff_ffff, "missing function 00:0f.0");
    assert_eq!(lines[34], 0xffff_f000, "BAR0 size mask");
    assert_eq!(lines[35], 0xffff_f000, "BAR1 size mask");
    assert_eq!(lines[36], 0x4106, "device ID by a 2-byte read");
    assert_eq!(lines[37], 0x11, "MSI-X capability ID by a 1-byte read");
}

/// Runs the ivshmem guest in fault mode `mode` as peer 0 beside a process peer 1 and
/// returns the report; checks that the peer saw the state go 1 then 0.
fn fault(mode: char) -> (String, Guest) {
    let guest = test_guests::assemble(IVSHMEM_GUEST).unwrap();
    let wiring = link(2, 1);
    attach_process_peer(&wiring, 1);
    let events = events();
    let name = format!("faulty-{mode}");
    let mut c = cell(&name, &guest, &wiring, 0, &format!("{mode}01"), 0, &events);
    c.start().unwrap();
    let report = match expect_halt(&events, &name) {
        HaltReason::Fatal(report) => report,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        wiring.model().peer_state(0),
        Some(0),
        "the cell's state is 0"
    );
    assert!(!wiring.model().is_active(0));
    assert_eq!(
        wiring.memory().interrupts[1][0].drain().unwrap(),
        2,
        "the peer got the state interrupt for 0 -> 1 and for 1 -> 0"
    );
    (report, guest)
}

/// Splits `FATAL: ... RIP 0x..: detail` into the part before RIP, RIP and the detail.
fn split_report(report: &str) -> (&str, u64, &str) {
    let (head, rest) = report.split_once(", RIP 0x").expect(report);
    let (rip, detail) = rest.split_once(": ").expect(report);
    (head, u64::from_str_radix(rip, 16).unwrap(), detail)
}

/// The faulting instruction is at `label`: KVM reports RIP at the instruction for reads and
/// after it for emulated writes (it completes them before exiting), so RIP must lie within
/// one instruction (at most 15 bytes) of the label.
fn assert_rip_at(guest: &Guest, label: &str, rip: u64) {
    let at = guest.symbol(label).unwrap();
    assert!(
        (at..=at + 15).contains(&rip),
        "RIP {rip:#x} is not at {label} ({at:#x})"
    );
}

#[test]
fn a_write_to_the_state_table_stops_the_cell() {
    if skip_without_kvm() {
        return;
    }
    let (report, guest) = fault('1');
    let (head, rip, detail) = split_report(&report);
    assert_eq!(
        head,
        "FATAL: cell \"faulty-1\": illegal MMIO write at 0x80000, size 4, value 0x5"
    );
    assert_eq!(detail, "write to read-only memory (l/state-table)");
    assert_rip_at(&guest, "f1", rip);
}

#[test]
fn a_write_to_a_peer_output_section_stops_the_cell() {
    if skip_without_kvm() {
        return;
    }
    let (report, guest) = fault('2');
    let (head, rip, detail) = split_report(&report);
    assert_eq!(
        head,
        "FATAL: cell \"faulty-2\": illegal MMIO write at 0x82000, size 4, value 0x5"
    );
    assert_eq!(detail, "write to read-only memory (l/output-1)");
    assert_rip_at(&guest, "f2", rip);
}

#[test]
fn a_misaligned_register_store_stops_the_cell() {
    if skip_without_kvm() {
        return;
    }
    let (report, guest) = fault('3');
    let (head, rip, detail) = split_report(&report);
    assert_eq!(
        head,
        "FATAL: cell \"faulty-3\": illegal MMIO write at 0xa0012, size 4, value 0x1"
    );
    assert!(
        detail.starts_with("invalid ivshmem register write at offset 0x12")
            && detail.ends_with("misaligned access"),
        "{detail}"
    );
    assert_rip_at(&guest, "f3", rip);
}

#[test]
fn an_unknown_port_after_link_setup_stops_the_cell() {
    if skip_without_kvm() {
        return;
    }
    let (report, guest) = fault('4');
    let (head, rip, detail) = split_report(&report);
    assert_eq!(
        head,
        "FATAL: cell \"faulty-4\": illegal port write at 0x42, size 1, value 0x34"
    );
    assert_eq!(detail, "no device at this port");
    assert_rip_at(&guest, "f4", rip);
}

#[test]
fn two_kvm_cells_ring_each_other_without_user_space_exits() {
    if skip_without_kvm() {
        return;
    }
    const ROUNDS: u32 = 64;
    let mut guest = test_guests::assemble(IVSHMEM_GUEST).unwrap();
    guest.patch_u32("rounds", ROUNDS).unwrap();
    let wiring = link(2, 1);
    let events = events();
    let mut echo = cell("echo", &guest, &wiring, 1, "e10", 1, &events);
    let mut ringer = cell("ringer", &guest, &wiring, 0, "r01", 0, &events);
    echo.start().unwrap();
    ringer.start().unwrap();
    expect_line(&events, "ringer", "go");
    expect_line(&events, "ringer", "done");
    assert_eq!(expect_halt(&events, "ringer"), HaltReason::CellState(2));
    // Every doorbell went both ways (the ringer waits for each answer); none exited: the
    // only MMIO exits are the set-up's.
    assert_eq!(
        ringer.exits().mmio,
        IVSHMEM_SETUP_MMIO,
        "{:?}",
        ringer.exits()
    );
    assert_eq!(echo.exits().mmio, IVSHMEM_SETUP_MMIO, "{:?}", echo.exits());
    echo.stop();
    assert_eq!(expect_halt(&events, "echo"), HaltReason::Requested);
}

#[test]
fn a_process_peer_and_a_kvm_cell_ring_each_other() {
    if skip_without_kvm() {
        return;
    }
    const ROUNDS: u64 = 32;
    let guest = test_guests::assemble(IVSHMEM_GUEST).unwrap();
    let wiring = link(2, 1);
    attach_process_peer(&wiring, 1);
    let events = events();
    let mut echo = cell("kvm-echo", &guest, &wiring, 0, "e01", 0, &events);
    echo.start().unwrap();
    wait_state(&wiring, 0, 1);
    assert_eq!(wait_interrupt(&wiring, 1), 1, "the state change 0 -> 1");
    for _ in 0..ROUNDS {
        // What the hosted endpoint does for DOORBELL = 0 << 16: write the target's eventfd.
        wiring.memory().interrupts[0][0].signal().unwrap();
        assert_eq!(wait_interrupt(&wiring, 1), 1, "the echo");
    }
    assert_eq!(echo.exits().mmio, IVSHMEM_SETUP_MMIO, "{:?}", echo.exits());
    // The process peer leaves: the KVM cell gets a state interrupt (counted by its handler).
    let effects = wiring.model().peer_detached(1);
    wiring.deliver(&effects);
    echo.stop();
    assert_eq!(expect_halt(&events, "kvm-echo"), HaltReason::Requested);
}

#[test]
fn a_one_shot_kvm_target_gets_its_doorbells_through_user_space() {
    if skip_without_kvm() {
        return;
    }
    const ROUNDS: u64 = 16;
    let guest = test_guests::assemble(IVSHMEM_GUEST).unwrap();
    let wiring = link(2, 1);
    attach_process_peer(&wiring, 1);
    let events = events();
    let mut echo = cell("one-shot", &guest, &wiring, 0, "e01o", 0, &events);
    echo.start().unwrap();
    wait_state(&wiring, 0, 1);
    assert_eq!(wait_interrupt(&wiring, 1), 1, "the state change 0 -> 1");
    assert_eq!(wiring.model().one_shot(0), Some(true));
    for _ in 0..ROUNDS {
        wiring.memory().interrupts[0][0].signal().unwrap();
        assert_eq!(wait_interrupt(&wiring, 1), 1, "the echo");
    }
    // Each delivery cleared INT_CONTROL (the model did it: the relay passed every doorbell
    // through user space), and each handler re-armed it with one MMIO write.
    assert_eq!(
        echo.exits().mmio,
        IVSHMEM_SETUP_MMIO + ROUNDS,
        "{:?}",
        echo.exits()
    );
    echo.stop();
}
