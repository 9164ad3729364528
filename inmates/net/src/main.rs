//! The network inmate: the vnet cell services (ICMP echo, TCP echo 7, sink 9, source 19,
//! HTTP status page 80; `vnet-services`) on smoltcp over an Ethernet link (protocol 0001h,
//! MSI-X) in vnet's shmring format or Linux's `ivshmem-net` format, as a bare-metal x86 cell
//! of a KVM cell or Jailhouse.
//!
//! 1. Heap: `heap=SIZE` bytes (default 4 MiB) at 0x101000, the memory a cell config gives
//!    above the communication region (`memory = "1M" + SIZE` at least). The allocator is
//!    `linked_list_allocator`.
//! 2. Finds the first ivshmem device announcing the Ethernet protocol, brings it up the
//!    Jailhouse way (`inmate_rt::ivshmem`), points its MSI-X entries at IDT vectors 32.. and
//!    enables its interrupts: shmring uses entry 0 for doorbells and state changes,
//!    `ivshmem-net` entry 0 for state changes and entry 1 for data (`/work/shared`'s contract).
//! 3. Runs the services on the link (`vnet::VnetLink` or `vnet::ivnet::IvnetLink`, one generic
//!    loop over `vnet::CellLink`) in the event loop of `vnet_services::NetCell` (the process
//!    cell `vnet_cell` runs the same), with the runtime's TSC clock
//!    (`inmate_rt::clock`) and halting until the link's interrupt or smoltcp's next deadline
//!    (`inmate_rt::event`, the x2APIC timer).
//!
//! Command line (all optional): `ip=10.0.0.2/24`, `heap=0x400000`, `sockets=N` (listening
//! sockets per service port, default 4), `tcp_buffer=N` (bytes per socket buffer, default
//! 16 KiB), `format=shmring|ivshmem-net` (the link's wire format, default shmring; the
//! config's link `protocol` must match), `mtu=N` (largest frame incl. the 14-byte Ethernet
//! header; default 1514 for shmring, 16,398 = Linux's default for ivshmem-net), `ring=3|0`
//! (where the main loop runs, default 3), `spin_us=N` (how long the loop keeps polling the
//! rings after the last activity before it halts, default 50 as the process cell; 0: halt at once).
//!
//! Where the loop runs: on this project's PVM-backed `/dev/kvm`, ring-0 code is emulated at
//! about 0.7 µs per instruction and ring 3 runs natively, so the loop runs at ring 3
//! (`inmate_rt::user`: port I/O, `hlt` and MSRs trap to ring 0); `ring=0` keeps it at ring 0
//! for comparison (README: figures under PVM). On real hardware both run natively.
#![no_std]
#![no_main]

extern crate alloc;

use core::sync::atomic::{AtomicBool, Ordering};

use inmate_rt::interrupts::{self, FIRST_DEVICE_VECTOR};
use inmate_rt::{clock, event, println, Cmdline};
use ivshmem_dev::{pci, PortIo, Protocol};
use linked_list_allocator::LockedHeap;
use vnet::ivnet::{Interrupts, IvnetConfig, IvnetLink};
use vnet::smoltcp::time::Instant;
use vnet::smoltcp::wire::Ipv4Cidr;
use vnet::{CellLink, LinkConfig, VnetLink};
use vnet_services::{NetCell, ServiceConfig};

inmate_rt::entry!(main);

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Where the heap starts: the first byte of RAM above the communication region.
const HEAP_START: usize = 0x10_1000;
/// Default heap size.
const DEFAULT_HEAP: i64 = 4 << 20;
/// The IDT vector of MSI-X entry 0 (entry 1, ivshmem-net's data vector, is the next one).
const LINK_VECTOR: u8 = FIRST_DEVICE_VECTOR;
/// MSI-X entries the link uses: shmring 1, ivshmem-net 2 (state on 0, data on 1).
const SHMRING_VECTORS: u16 = 1;
/// See [`SHMRING_VECTORS`].
const IVNET_VECTORS: u16 = 2;
/// Default `spin_us=`: how long the loop keeps polling after the last activity before it
/// sleeps (the process cell's `vnet::bridge::DEFAULT_SPIN`).
const DEFAULT_SPIN_US: i64 = 50;

/// Set by the interrupt handler, taken by the main loop.
static LINK_INTERRUPT: AtomicBool = AtomicBool::new(false);

fn on_interrupt(vector: u8) {
    if (LINK_VECTOR..LINK_VECTOR + IVNET_VECTORS as u8).contains(&vector) {
        // Release pairs with the main loop's Acquire swap.
        LINK_INTERRUPT.store(true, Ordering::Release);
    }
    // Ends (or pre-empts) the loop's next wait.
    event::device_interrupt(vector);
}

/// smoltcp's clock: microseconds of the runtime's TSC clock.
fn now() -> Instant {
    Instant::from_micros((clock::monotonic_ns() / 1000) as i64)
}

fn main(cmdline: &Cmdline) -> ! {
    let heap = usize::try_from(cmdline.int("heap", DEFAULT_HEAP))
        .ok()
        .filter(|h| *h >= 64 << 10)
        .unwrap_or_else(|| panic!("heap={:?}: want at least 64 KiB", cmdline.get("heap")));
    // SAFETY: the cell config gives this cell RAM from 0x101000 on (`memory` above 1 MiB);
    // `heap=` must not claim more than that (an access past the end is an illegal access and
    // stops the cell, never someone else's memory). Nothing else uses that range.
    unsafe { HEAP.lock().init(HEAP_START as *mut u8, heap) };

    let ip = cmdline.get("ip").unwrap_or("10.0.0.2/24");
    let address: Ipv4Cidr = ip
        .parse()
        .unwrap_or_else(|()| panic!("ip={ip}: want an IPv4 address with a prefix"));
    let mut services = ServiceConfig::new(address);
    services.sockets_per_port = cmdline.int("sockets", 4).clamp(1, 64) as usize;
    services.tcp_buffer = cmdline.int("tcp_buffer", 16 * 1024).clamp(1024, 1 << 20) as usize;
    let format = cmdline.get("format").unwrap_or("shmring");
    let (vectors, default_mtu) = match format {
        "shmring" => (SHMRING_VECTORS, vnet::nic::DEFAULT_MTU),
        "ivshmem-net" => (IVNET_VECTORS, vnet::ivnet::wire::DEFAULT_MAX_FRAME),
        _ => panic!("format={format}: shmring or ivshmem-net"),
    };
    let mtu = cmdline.int("mtu", default_mtu as i64).clamp(0, 1 << 20) as usize;

    let ring = cmdline.int("ring", 3);
    let spin_ns = cmdline.int("spin_us", DEFAULT_SPIN_US).max(0) as u64 * 1000;
    if !matches!(ring, 0 | 3) {
        panic!("ring={ring}: 0 or 3");
    }
    interrupts::set_handler(on_interrupt);
    if clock::init() == clock::ClockKind::Unavailable {
        panic!("no TSC rate in the communication region: smoltcp needs a clock");
    }
    // SAFETY: the inmate is the only user of ports 0xCF8/0xCFC on its one CPU.
    let access = unsafe { PortIo::new() };
    let found = pci::scan(&access)
        .filter_map(|address| pci::probe(&access, address).ok())
        .find(|found| found.protocol == Protocol::ETHERNET)
        .unwrap_or_else(|| panic!("no ivshmem device with the Ethernet protocol"));
    println!("net: ivshmem-net device at {}", found.address);
    let device = inmate_rt::ivshmem::bring_up_at(&access, found)
        .unwrap_or_else(|e| panic!("ivshmem bring-up: {e}"));
    let programmed = device.setup_msix(&access, LINK_VECTOR, vectors);
    if programmed < vectors {
        panic!(
            "format={format} needs {vectors} MSI-X vectors, the link has {programmed} (KVM cells need `interrupts = \"msix\"`, `vectors = {vectors}`)"
        );
    }
    let driver = device.driver;
    driver.enable_interrupts();
    let id = driver.id();
    let ticks = inmate_rt::timer::calibrate();
    println!(
        "net: peer {id}, {address}, {format} format, largest frame {mtu}, heap {} KiB, {} sockets per port of {} bytes, APIC timer {ticks} ticks/ms, loop in ring {ring}",
        heap >> 10,
        services.sockets_per_port,
        services.tcp_buffer
    );
    if format == "shmring" {
        let config = LinkConfig {
            mtu,
            ..LinkConfig::default()
        };
        let link = VnetLink::new(driver, config).unwrap_or_else(|e| panic!("link: {e}"));
        run(link, &services, ring, spin_ns)
    } else {
        let config = IvnetConfig {
            max_frame: mtu,
            interrupts: Interrupts::MsiX,
        };
        let link = IvnetLink::new(driver, config).unwrap_or_else(|e| panic!("link: {e}"));
        run(link, &services, ring, spin_ns)
    }
}

/// The event loop, the same for either wire format: enters `ring`, then runs the services
/// on `link`, polling for `spin_ns` after the last activity before it halts.
fn run<L: CellLink>(link: L, services: &ServiceConfig, ring: i64, spin_ns: u64) -> ! {
    interrupts::enable();
    if ring == 3 {
        inmate_rt::user::enter();
    }
    // At ring 3 already: creating the sockets zeroes their buffers, natively there.
    let mut cell = NetCell::new(link, services, now());
    let mut carrier = false;
    let mut idle_since: Option<u64> = None;
    loop {
        // Acquire pairs with the handler's Release.
        if LINK_INTERRUPT.swap(false, Ordering::Acquire) {
            cell.on_interrupt();
        }
        if cell.link().report().carrier != carrier {
            carrier = !carrier;
            println!("net: link {}", if carrier { "up" } else { "down" });
        }
        if cell.step(now()) {
            idle_since = None;
            continue;
        }
        // A bounded spin before the sleep handshake: back-to-back traffic (a ping, the next
        // TCP segment) is found in the rings without an interrupt, which under PVM costs a
        // trapped `hlt`, timer MSRs and an MSI-X exit (as the process cell's loop spins).
        let t = clock::monotonic_ns();
        if t.saturating_sub(*idle_since.get_or_insert(t)) < spin_ns {
            continue;
        }
        idle_since = None;
        if !cell.prepare_sleep() {
            continue;
        }
        // An interrupt since the swap above makes the wait return at once.
        let deadline = cell
            .poll_delay(now())
            .map(|d| clock::monotonic_ns().saturating_add(d.total_micros() * 1000));
        event::wait_until(deadline);
    }
}
