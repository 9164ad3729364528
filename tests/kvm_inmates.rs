//! The Rust inmates (`inmates/`, built by `scripts/build-inmates`) in KVM cells: the ivshmem
//! demo inmate finds the device, programs MSI-X and exchanges STATE and doorbells; the test
//! inmate sees exactly the config space of kvm-cells.md, reports a panic and a wrong comm
//! revision through `cell_state`, and is stopped with a FATAL report for each illegal access
//! while its peer sees its state go to 0.
//!
//! Every test skips with a printed reason when `/dev/kvm` is not usable.

#[path = "../hypervisor/tests/kvm_common/mod.rs"]
mod kvm_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use hypervisor::device::{InterruptMode, Link, LinkParams};
use hypervisor::kvm::{
    Bdf, EventQueue, HaltReason, KvmCell, KvmCellConfig, KvmEvent, KvmLinkConfig, LinkWiring,
};
use hypervisor::memory::LinkMemory;
use ivshmem_dev::{LayoutParams, Protocol, SharedMemoryLayout};
use kvm_common::{events, expect_halt, skip_without_kvm, TIMEOUT};

/// Where the link memory appears in the guests (Jailhouse's x86 demo uses this address).
const LINK_ADDRESS: u64 = 0x3f0f_0000;
/// Jailhouse's demo topology puts the device at 01:0e.0.
const BDF: (u16, u16, u16) = (1, 0x0e, 0);
/// Jailhouse's x86 demo link: state table 4 KiB, R/W 36 KiB, output sections 8 KiB.
const STATE_TABLE_SIZE: u64 = 0x1000;
const RW_SIZE: u64 = 0x9000;
const OUTPUT_SIZE: u64 = 0x2000;
const VECTORS: u16 = 16;

/// Builds the inmates once per test binary and returns the flat image `name`.
fn inmate(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let status = Command::new(root.join("scripts/build-inmates"))
            .status()
            .expect("running scripts/build-inmates");
        assert!(status.success(), "scripts/build-inmates failed: {status}");
        root.join("inmates/target/x86_64-unknown-none/release")
    });
    let path = dir.join(format!("{name}.bin"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A link like Jailhouse's demo link (protocol undefined, MSI-X).
fn demo_link(name: &str, max_peers: u16) -> Arc<LinkWiring> {
    let layout = SharedMemoryLayout::new(LayoutParams {
        max_peers,
        state_table_size: STATE_TABLE_SIZE as u32,
        rw_size: RW_SIZE,
        output_size: OUTPUT_SIZE,
        page_size: 0x1000,
    })
    .unwrap();
    let memory = Arc::new(
        LinkMemory::create(
            name,
            max_peers,
            VECTORS,
            STATE_TABLE_SIZE,
            RW_SIZE,
            OUTPUT_SIZE,
        )
        .unwrap(),
    );
    let model = Link::new(
        LinkParams {
            name: name.to_owned(),
            max_peers,
            protocol: Protocol::UNDEFINED,
            layout,
            interrupts: InterruptMode::Msix { vectors: VECTORS },
        },
        Box::new(memory.state_table_map()),
    )
    .unwrap();
    LinkWiring::new(model, memory).unwrap()
}

/// A KVM cell running inmate `image` with `cmdline`, as peer `peer` of `link` (if any).
fn cell(
    name: &str,
    image: &str,
    cmdline: &str,
    link: Option<(&Arc<LinkWiring>, u16)>,
    events: &Arc<EventQueue>,
) -> KvmCell {
    let mut config = KvmCellConfig::new(name, inmate(image));
    config.cmdline = cmdline.to_owned();
    if let Some((wiring, peer)) = link {
        config.links.push(KvmLinkConfig {
            wiring: wiring.clone(),
            peer,
            bdf: Bdf::new(BDF.0, BDF.1, BDF.2).unwrap(),
            address: LINK_ADDRESS,
        });
    }
    let mut cell = KvmCell::new(config, events.clone()).unwrap();
    cell.start().unwrap();
    cell
}

/// Collects the console lines of `cell` until one satisfies `done` (returned last).
fn lines_until(events: &EventQueue, cell: &str, mut done: impl FnMut(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = events.wait_for(left, |e| {
            matches!(e, KvmEvent::Console { cell: c, .. } if c == cell)
                || matches!(e, KvmEvent::Halted { cell: c, .. } if c == cell)
        });
        match event {
            Some(KvmEvent::Console { line, .. }) => {
                let finished = done(&line);
                lines.push(line);
                if finished {
                    return lines;
                }
            }
            Some(KvmEvent::Halted { reason, .. }) => {
                panic!(
                    "cell {cell} halted ({reason}) before the expected line; it printed {lines:#?}"
                )
            }
            _ => panic!("cell {cell}: timed out; it printed {lines:#?}"),
        }
    }
}

#[test]
fn a_panicking_inmate_is_reported_with_cell_state_failed() {
    if skip_without_kvm() {
        return;
    }
    let events = events();
    let _cell = cell("panicker", "test-inmate", "mode=panic", None, &events);
    let lines = lines_until(&events, "panicker", |l| l.starts_with("PANIC:"));
    assert!(
        lines
            .last()
            .unwrap()
            .contains("test-inmate: panic requested on the command line"),
        "{lines:?}"
    );
    assert_eq!(expect_halt(&events, "panicker"), HaltReason::CellState(3));
}

#[test]
fn an_inmate_seeing_a_wrong_comm_revision_reports_cell_state_4() {
    if skip_without_kvm() {
        return;
    }
    let events = events();
    let _cell = cell("old-hv", "test-inmate", "mode=comm-revision", None, &events);
    let lines = lines_until(&events, "old-hv", |l| {
        l.starts_with("FATAL: communication region")
    });
    assert!(lines.last().unwrap().contains("revision 1"), "{lines:?}");
    assert_eq!(expect_halt(&events, "old-hv"), HaltReason::CellState(4));
}

/// Parses `cfg[XX] = XXXXXXXX` lines into the 256-byte config space.
fn config_space(lines: &[String]) -> [u8; 256] {
    let mut space = [0u8; 256];
    let mut seen = 0;
    for line in lines {
        if let Some(rest) = line.strip_prefix("cfg[") {
            let (offset, value) = rest.split_once("] = ").expect("cfg line format");
            let offset = usize::from_str_radix(offset, 16).unwrap();
            let value = u32::from_str_radix(value, 16).unwrap();
            space[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
            seen += 1;
        }
    }
    assert_eq!(seen, 64, "the inmate dumps every dword: {lines:#?}");
    space
}

fn line_with<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in {lines:#?}"))
}

#[test]
fn the_inmate_scan_sees_the_config_space_of_kvm_cells_md_and_bar_sizing_works() {
    if skip_without_kvm() {
        return;
    }
    let events = events();
    let link = demo_link("cfg", 3);
    let _cell = cell(
        "scanner",
        "test-inmate",
        "mode=config",
        Some((&link, 1)),
        &events,
    );
    let lines = lines_until(&events, "scanner", |l| l == "config done");
    assert_eq!(expect_halt(&events, "scanner"), HaltReason::CellState(2));

    // Found by scanning at the configured BDF.
    assert_eq!(line_with(&lines, "found "), "found 01:0e.0");
    let cfg = config_space(&lines);
    let u16_at = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
    // Header (kvm-cells.md "ivshmem v2 config space in a KVM cell"), as dumped before the
    // inmate touched anything.
    assert_eq!(
        (u16_at(0x00), u16_at(0x02)),
        (0x110A, 0x4106),
        "vendor, device"
    );
    assert_eq!(u16_at(0x04), 0, "command after reset");
    assert_ne!(u16_at(0x06) & 0x10, 0, "status: capability list");
    assert_eq!(
        u32_at(0x08),
        0xFF00_0000,
        "revision 0, protocol 0000h, class FFh"
    );
    assert_eq!(cfg[0x0E], 0, "header type 0, single function");
    assert_eq!(u32_at(0x10), 0, "BAR0 unassigned, 32-bit memory");
    assert_eq!(u32_at(0x14), 0, "BAR1 unassigned, 32-bit memory");
    assert_eq!(u32_at(0x18), 0, "no BAR2");
    assert_eq!(
        (u16_at(0x2C), u16_at(0x2E)),
        (0x110A, 0x4106),
        "subsystem IDs"
    );
    assert_eq!(cfg[0x34], 0x40, "capability pointer");
    assert_eq!(cfg[0x3D], 0, "interrupt pin 0 with MSI-X");
    // Vendor capability at 40h → MSI-X at 60h.
    assert_eq!(
        &cfg[0x40..0x43],
        &[0x09, 0x60, 0x20],
        "vendor cap: id, next, length"
    );
    assert_eq!(cfg[0x43], 0, "privileged control: one-shot off");
    assert_eq!(u32_at(0x44), STATE_TABLE_SIZE as u32, "state table size");
    assert_eq!(u64_at(0x48), RW_SIZE, "R/W section size");
    assert_eq!(u64_at(0x50), OUTPUT_SIZE, "output section size");
    assert_eq!(u64_at(0x58), LINK_ADDRESS, "shared-memory base address");
    assert_eq!(
        &cfg[0x60..0x62],
        &[0x11, 0x00],
        "MSI-X cap: id, end of list"
    );
    assert_eq!(
        u16_at(0x62),
        VECTORS - 1,
        "MSI-X control: table size - 1, disabled"
    );
    assert_eq!(u32_at(0x64), 1, "table in BIR 1 at offset 0");
    assert_eq!(u32_at(0x68), 0x101, "PBA in BIR 1 at offset 0x100");
    // Past the device's 0x80 bytes and on a function that does not exist: all ones.
    assert!(
        cfg[0x80..].iter().all(|b| *b == 0xFF),
        "offsets from 0x80 read all ones"
    );
    assert_eq!(line_with(&lines, "absent "), "absent 01:0e.1 = ffffffff");
    // The capability walk.
    let caps: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("cap "))
        .map(String::as_str)
        .collect();
    assert_eq!(caps, ["cap 40: id 09 next 60", "cap 60: id 11 next 00"]);
    // BAR sizing: 4 KiB 32-bit non-prefetchable memory BARs.
    assert_eq!(line_with(&lines, "bar0 "), "bar0 mask fffff000 size 4096");
    assert_eq!(line_with(&lines, "bar1 "), "bar1 mask fffff000 size 4096");
    // After bring-up: the BARs hold the demo's addresses, memory + bus master on.
    assert_eq!(
        line_with(&lines, "bars "),
        "bars ff000000 ff001000 command 0006"
    );
    assert_eq!(
        line_with(&lines, "msix table "),
        "msix table size 16 bir 1 offset 0 pba bir 1 offset 100"
    );
    // All 16 entries programmed, MSI-X enabled and unmasked, nothing pending.
    assert_eq!(
        line_with(&lines, "msix programmed "),
        "msix programmed 16 control 800f pba 00000000"
    );
    assert_eq!(
        line_with(&lines, "id "),
        format!("id 1 max_peers 3 base {LINK_ADDRESS:#x}")
    );
}

/// Waits for `line` on `cell`'s console and returns everything printed up to it.
fn until_line(events: &EventQueue, cell: &str, line: &str) -> Vec<String> {
    lines_until(events, cell, |l| l == line)
}

#[test]
fn two_demo_inmates_exchange_state_and_doorbells_with_matching_counts() {
    if skip_without_kvm() {
        return;
    }
    let events = events();
    let link = demo_link("demo-kvm", 3);
    let mut cell_one = cell(
        "one",
        "ivshmem-demo",
        "target=2 count=3",
        Some((&link, 1)),
        &events,
    );
    let mut cell_two = cell(
        "two",
        "ivshmem-demo",
        "target=1 count=3",
        Some((&link, 2)),
        &events,
    );

    let one = until_line(&events, "one", "IVSHMEM: initialized device");
    assert!(
        one.contains(&"IVSHMEM: Found device at 01:0e.0".to_owned()),
        "{one:#?}"
    );
    assert!(one.contains(&"IVSHMEM: ID is 1".to_owned()), "{one:#?}");
    assert!(
        one.contains(&"IVSHMEM: max. peers is 3".to_owned()),
        "{one:#?}"
    );
    assert!(one.contains(&"IVSHMEM: 4 MSI-X vectors from IDT vector 32".to_owned()));
    // Each rings vector ID + 1 three times, then only serves interrupts: the other side must
    // count exactly three on that vector (one's doorbells are vector 2, two's vector 3).
    let mut one = until_line(&events, "one", "IVSHMEM: sent 3 interrupts, done");
    let mut two = until_line(&events, "two", "IVSHMEM: sent 3 interrupts, done");
    let sent = |lines: &[String], vector: u16, target: u16| {
        let want = format!("IVSHMEM: sending IRQ {vector} to peer {target}");
        lines.iter().filter(|l| **l == want).count()
    };
    assert_eq!(sent(&one, 2, 2), 3, "{one:#?}");
    assert_eq!(sent(&two, 3, 1), 3, "{two:#?}");
    for (name, lines, vector) in [("one", &mut one, 3), ("two", &mut two, 2)] {
        let last = format!("IVSHMEM: got interrupt {vector} (#3)");
        if !lines.contains(&last) {
            lines.extend(until_line(&events, name, &last));
        }
        let got: Vec<&String> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("IVSHMEM: got interrupt {vector} ")))
            .collect();
        assert_eq!(
            got,
            (1..=3)
                .map(|n| format!("IVSHMEM: got interrupt {vector} (#{n})"))
                .collect::<Vec<_>>()
                .iter()
                .collect::<Vec<_>>(),
            "{name}: one interrupt per doorbell, in order"
        );
    }
    // STATE went both ways: each printed the other's state (ID + 1).
    assert!(one.contains(&"state[2] = 3".to_owned()) || two.contains(&"state[1] = 2".to_owned()));
    let table = link.memory().state_table_map();
    assert_eq!((table.read(1), table.read(2)), (2, 3));
    // Both have sent all their doorbells and seen three: stop them, and nothing printed up to
    // the stop may show a fourth.
    cell_one.stop();
    cell_two.stop();
    let rest: Vec<String> = events
        .take()
        .into_iter()
        .filter_map(|e| match e {
            KvmEvent::Console { line, .. } => Some(line),
            _ => None,
        })
        .collect();
    assert!(!rest.iter().any(|l| l.contains("(#4)")), "{rest:#?}");
}

/// Runs the test inmate in `mode` as peer 2 next to a demo inmate (peer 1) and returns the
/// FATAL report; checks the demo inmate saw the offender's state go to 0.
fn illegal_access(mode: &str) -> String {
    let events = events();
    let link = demo_link(&format!("illegal-{mode}"), 3);
    let _demo = cell(
        "demo",
        "ivshmem-demo",
        "target=2",
        Some((&link, 1)),
        &events,
    );
    until_line(&events, "demo", "IVSHMEM: initialized device");
    // Its interrupts are enabled once it printed the shared memory.
    lines_until(&events, "demo", |l| l.starts_with("in@0x4000 = "));
    let _bad = cell(
        "offender",
        "test-inmate",
        &format!("mode={mode} peer=1"),
        Some((&link, 2)),
        &events,
    );
    let lines = until_line(&events, "offender", "ready");
    assert!(lines.contains(&"test-inmate: ID 2 state 3 waiting for peer 1".to_owned()));
    let report = match expect_halt(&events, "offender") {
        HaltReason::Fatal(report) => report,
        other => panic!("the offender halted with {other}, not a FATAL report"),
    };
    assert!(
        report.starts_with("FATAL: cell \"offender\": illegal "),
        "{report}"
    );
    assert!(report.contains("RIP 0x"), "{report}");
    // The offender's state is 0, and the demo inmate got the state interrupt and saw it.
    let table = link.memory().state_table_map();
    assert_eq!(table.read(2), 0, "the stopped cell's state");
    assert_ne!(table.read(1), 0, "the demo inmate keeps running");
    // State interrupts on vector 0 for the offender coming up (state 3) and going away
    // (state 0): two, or one when both arrive while the demo prints with interrupts off (an
    // MSI pending in the APIC merges with the next on its vector). Either way the demo's
    // handler runs after the stop and prints the offender's state as 0.
    until_line(&events, "demo", "IVSHMEM: got interrupt 0 (#1)");
    until_line(&events, "demo", "state[2] = 0");
    // The offender printed nothing after the access.
    assert!(!kvm_common::console_lines(&events, "offender")
        .iter()
        .any(|l| l == "illegal access not stopped"));
    report
}

#[test]
fn a_write_to_a_peer_output_section_stops_the_cell() {
    if skip_without_kvm() {
        return;
    }
    let report = illegal_access("write-peer-output");
    // Peer 1's output section: base + state table + R/W + 1 * output size.
    let address = LINK_ADDRESS + STATE_TABLE_SIZE + RW_SIZE + OUTPUT_SIZE;
    assert!(
        report.contains(&format!("write at {address:#x}")),
        "{report}"
    );
    assert!(report.contains("size 4"), "{report}");
}

#[test]
fn an_unknown_port_stops_the_cell() {
    if skip_without_kvm() {
        return;
    }
    let report = illegal_access("unknown-port");
    assert!(report.contains("port write at 0x1234, size 1"), "{report}");
}

#[test]
fn a_misaligned_bar0_access_stops_the_cell() {
    if skip_without_kvm() {
        return;
    }
    let report = illegal_access("misaligned-bar0");
    assert!(report.contains("read at 0xff000002, size 4"), "{report}");
}

#[test]
fn the_demo_inmate_halts_between_doorbells_instead_of_polling() {
    if skip_without_kvm() {
        return;
    }
    let events = events();
    let link = demo_link("idle", 2);
    let demo = cell(
        "idle",
        "ivshmem-demo",
        "target=1",
        Some((&link, 0)),
        &events,
    );
    let sending = "IVSHMEM: sending IRQ 1 to peer 1";
    until_line(&events, "idle", sending);
    let before = demo.exits();
    for _ in 0..3 {
        until_line(&events, "idle", sending);
    }
    let exits = demo.exits().total() - before.total();
    // Per period the inmate prints "\n" and the sending line: two port exits per character
    // (LSR poll, THR write), 68 in all, and rings an absent peer. Polling the PM timer for
    // the second instead costs about 20 000 exits (one per read).
    assert!(exits < 3 * 100, "{exits} exits in three one-second periods");
}

/// What `jailhouse cell load CELL image.bin -s "target=1" -a 0x1000` and the KVM VMM rely on:
/// a flat image entered at offset 0 in real mode, with the 256-byte command-line area at
/// 0x1000, everything below the communication region. (Runs without KVM.)
#[test]
fn inmate_images_are_flat_binaries_with_the_command_line_area_at_0x1000() {
    for name in ["ivshmem-demo", "test-inmate"] {
        let image = inmate(name);
        assert!(
            (0x1100..0x10_0000).contains(&image.len()),
            "{name}: {} bytes",
            image.len()
        );
        assert_eq!(image[0], 0xFA, "{name}: the entry at 0 starts with `cli`");
        assert!(
            image[0x1000..0x1100].iter().all(|b| *b == 0),
            "{name}: the command-line area is empty until the loader writes it"
        );
    }
}
