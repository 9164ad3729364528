//! The telemetry producer as a bare-metal inmate: the same [`telemetry::ProducerCell`] as the
//! process-cell producer (`examples/telemetry_producer.rs`), over the same link layer, on this
//! runtime's platform:
//! - **clock**: the TSC on the host's `CLOCK_MONOTONIC` ([`inmate_rt::clock`], from the
//!   VMM's clock epoch in the communication region), so the Linux consumer's latency
//!   (`its CLOCK_MONOTONIC − timestamp_ns`) means the same as with a process-cell producer;
//! - **waiting**: halt until the link's MSI-X vector or the x2APIC timer fires.
//!
//! Command line (0x1000, `key=value`): `rate=N` samples per second (0 or absent: as fast as
//! the ring takes them), `count=N` (0 or absent: forever), `size=N` the record size in bytes
//! (only 40, [`telemetry::Sample::SIZE`], exists: the record is fixed so the consumer can
//! check every sample; another value is refused), `batch=N` samples per index publish
//! (default 32), `peer=N` the consumer's ID (default: the other peer of a 2-peer link),
//! `fault=1` (after `count` samples, write to an unknown port instead of shutting down: the
//! hypervisor stops the cell with a `FATAL:` report; for fault tests).
//!
//! After `count` samples the inmate prints its statistics and shuts down (`cell_state` = 2):
//! the hypervisor stops the cell and the consumer sees the producer leave, after draining.
#![no_std]
#![no_main]

use inmate_rt::clock::{self, ClockKind};
use inmate_rt::interrupts::{self, FIRST_DEVICE_VECTOR};
use inmate_rt::ivshmem::{self, Device};
use inmate_rt::{println, Cmdline};
use ivshmem_dev::{PortIo, Protocol};
use telemetry::{CellPlatform, ProducerCell, ProducerConfig, Sample};

inmate_rt::entry!(main);

/// The producer's platform in this inmate.
struct InmatePlatform;

impl CellPlatform for InmatePlatform {
    fn now_ns(&mut self) -> u64 {
        clock::monotonic_ns()
    }

    fn wait(&mut self, deadline_ns: Option<u64>) -> bool {
        inmate_rt::event::wait_until(deadline_ns);
        true
    }
}

fn positive(cmdline: &Cmdline, key: &str) -> Option<u64> {
    let value = cmdline.int(key, 0);
    if value < 0 {
        panic!("telemetry: {key}={value} is negative");
    }
    (value > 0).then_some(value as u64)
}

fn main(cmdline: &Cmdline) -> ! {
    let rate = positive(cmdline, "rate");
    let count = positive(cmdline, "count");
    let size = cmdline.int("size", Sample::SIZE as i64);
    if size != Sample::SIZE as i64 {
        panic!(
            "telemetry: size={size}: the record is {} bytes (telemetry::Sample)",
            Sample::SIZE
        );
    }
    let batch = cmdline.int("batch", 32).clamp(1, 4096) as usize;
    let fault = cmdline.int("fault", 0) != 0;
    interrupts::set_handler(inmate_rt::event::device_interrupt);

    let kind = clock::init();
    match kind {
        ClockKind::HostMonotonic => println!("telemetry: clock: TSC on host CLOCK_MONOTONIC"),
        ClockKind::Relative => println!("telemetry: clock: TSC, relative (no epoch)"),
        ClockKind::Unavailable => panic!("telemetry: no TSC rate in the comm region"),
    }
    inmate_rt::timer::calibrate();

    // SAFETY: the inmate is the only user of ports 0xCF8/0xCFC on its one CPU.
    let access = unsafe { PortIo::new() };
    let device = ivshmem::bring_up(&access).unwrap_or_else(|e| panic!("telemetry: {e}"));
    let protocol = device.pci.protocol;
    if protocol != Protocol::TELEMETRY {
        println!("telemetry: warning: the link announces protocol {protocol:?}");
    }
    device.setup_msix(&access, FIRST_DEVICE_VECTOR, 1);
    let Device { driver, .. } = device;
    let id = driver.id();
    let peer = match cmdline.int("peer", -1) {
        -1 if driver.max_peers() == 2 => id ^ 1,
        -1 => panic!("telemetry: a {}-peer link needs peer=N", driver.max_peers()),
        p => u16::try_from(p).unwrap_or_else(|_| panic!("telemetry: peer={p}")),
    };
    driver.enable_interrupts();
    interrupts::enable();
    let ring = cmdline.int("ring", 3);
    let before = clock::monotonic_ns();
    match ring {
        0 => {}
        3 => inmate_rt::user::enter(),
        other => panic!("telemetry: ring={other}: 0 or 3"),
    }
    println!(
        "telemetry: main loop in ring {ring} (clock {} -> {})",
        before,
        clock::monotonic_ns()
    );
    let config = ProducerConfig {
        peer,
        rate_per_s: rate,
        count,
        batch,
        max_capacity: None,
    };
    let mut cell = ProducerCell::new(driver, config).unwrap_or_else(|e| panic!("telemetry: {e}"));
    println!(
        "telemetry: peer {id} producing for peer {peer}: rate {} count {} batch {batch}",
        rate.unwrap_or(0),
        count.unwrap_or(0)
    );
    let stats = cell
        .run(&mut InmatePlatform)
        .unwrap_or_else(|e| panic!("telemetry: {e}"));
    println!(
        "telemetry: sent {} samples ({} departures, {} full waits, {} doorbells)",
        stats.sent, stats.departures, stats.full_waits, stats.doorbells
    );
    if fault {
        println!("telemetry: faulting on purpose");
        // SAFETY: port 0x99 is no device of a KVM cell: the access stops the cell (what this
        // mode is for); nothing of this inmate depends on it.
        unsafe { inmate_rt::port::outb(0x99, 1) };
    }
    inmate_rt::shutdown()
}
