//! The ivshmem demo inmate: the Rust counterpart of Jailhouse's x86 `ivshmem-demo` inmate, so
//! its console output reads the same and it interoperates with the same peers (Jailhouse's own
//! inmates, the Linux `ivshmem-demo` tool, or this project's `examples/ivshmem_demo.rs`).
//!
//! 1. Scans PCI config space (mechanism #1) for 110Ah:4106h and checks class FFh with the
//!    undefined protocol (the demo link's protocol).
//! 2. Puts BAR0 at 0xFF000000 and BAR1 (MSI-X) at 0xFF001000, enables memory decoding and bus
//!    mastering, reads `ID` and `MAX_PEERS`, and locates the sections from the vendor
//!    capability (40h) and its base address.
//! 3. Points MSI-X entries 0..4 at IDT vectors `irq_base`.. (default 32) and enables MSI-X.
//! 4. Enables interrupts (`INT_CONTROL` = 1), sets `STATE` = ID + 1, clears `rw[ID]` and the
//!    first word of its output section, and prints the shared memory.
//! 5. Every second rings vector ID + 1 on the target peer: `target=N` on the command line, or
//!    Jailhouse's rule (ID + 1 for IDs 0 and 1, else 0) without it.
//! 6. On each interrupt counts it per vector, stores the count of vector ID in `rw[ID]` and
//!    ten times it in its output section, and prints the counters and the shared memory.
//!
//! Command line: `target=N`, `irq_base=N` (Jailhouse's key), `count=N` (stop ringing after N
//! doorbells and only serve interrupts from then on, so a test can compare counts; default:
//! ring forever), `delay=pm` (wait by polling the PM timer as Jailhouse's `delay_us` does,
//! instead of halting until the x2APIC timer fires).
#![no_std]
#![no_main]

use core::ptr;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use inmate_rt::interrupts::{self, FIRST_DEVICE_VECTOR};
use inmate_rt::ivshmem::{self, Device};
use inmate_rt::{println, Cmdline};
use ivshmem_dev::{pci, PortIo, Protocol};

inmate_rt::entry!(main);

/// MSI-X vectors the demo uses (as Jailhouse's demo).
const MAX_VECTORS: u16 = 4;

/// Interrupts received per vector.
static IRQ_COUNT: [AtomicU32; MAX_VECTORS as usize] = [const { AtomicU32::new(0) }; 4];
/// The first IDT vector of the device.
static IRQ_BASE: AtomicU32 = AtomicU32::new(FIRST_DEVICE_VECTOR as u32);
/// The device, once brought up (the interrupt handler reads it).
static DEVICE: AtomicUsize = AtomicUsize::new(0);

fn device() -> Option<&'static Device> {
    // Acquire pairs with the Release store in `main`: the handler sees the whole device.
    let address = DEVICE.load(Ordering::Acquire);
    // SAFETY: `main` stores the address of a `Device` it leaked into a static and never
    // frees or mutates it afterwards.
    (address != 0).then(|| unsafe { &*(address as *const Device) })
}

fn main(cmdline: &Cmdline) -> ! {
    let irq_base = cmdline.int("irq_base", i64::from(FIRST_DEVICE_VECTOR));
    let irq_base = u8::try_from(irq_base)
        .ok()
        .filter(|base| (FIRST_DEVICE_VECTOR..=0xFF - MAX_VECTORS as u8).contains(base))
        .unwrap_or_else(|| panic!("irq_base={irq_base} is not a device vector"));
    IRQ_BASE.store(u32::from(irq_base), Ordering::Relaxed);
    interrupts::set_handler(irq_handler);

    // SAFETY: the inmate is the only user of ports 0xCF8/0xCFC on its one CPU.
    let access = unsafe { PortIo::new() };
    let Some(address) = pci::scan(&access).next() else {
        println!("IVSHMEM: No PCI devices found .. nothing to do.");
        inmate_rt::shutdown();
    };
    println!("IVSHMEM: Found device at {address}");
    let class_rev = pci::ConfigAccess::read32(&access, address, pci::REVISION);
    let protocol = Protocol::from_config_bytes((class_rev >> 8) as u8, (class_rev >> 16) as u8);
    if class_rev >> 24 != u32::from(pci::CLASS_CODE) || protocol != Protocol::UNDEFINED {
        println!("IVSHMEM: class/revision {class_rev:08x}, not supported");
        inmate_rt::shutdown();
    }
    let found = pci::probe(&access, address).unwrap_or_else(|e| panic!("IVSHMEM: {e}"));
    let device = ivshmem::bring_up_at(&access, found).unwrap_or_else(|e| panic!("IVSHMEM: {e}"));
    println!("IVSHMEM: bar0 is at {:#x}", ivshmem::BAR0_BASE);
    println!("IVSHMEM: bar1 is at {:#x}", ivshmem::BAR1_BASE);
    let driver = &device.driver;
    let id = driver.id();
    println!("IVSHMEM: ID is {id}");
    println!("IVSHMEM: max. peers is {}", driver.max_peers());
    let layout = &device.layout;
    println!(
        "IVSHMEM: state table is at {:#x}",
        device.base + layout.state_table().offset
    );
    println!(
        "IVSHMEM: R/W section is at {:#x}",
        device.base + layout.rw().offset
    );
    println!(
        "IVSHMEM: input sections start at {:#x}",
        device.base + layout.outputs().offset
    );
    println!(
        "IVSHMEM: output section is at {:#x}",
        driver.own_output().as_ptr() as usize
    );
    let vectors = device.setup_msix(&access, irq_base, MAX_VECTORS);
    println!("IVSHMEM: {vectors} MSI-X vectors from IDT vector {irq_base}");

    let device: &'static Device = leak(device);
    DEVICE.store(device as *const Device as usize, Ordering::Release);
    println!("IVSHMEM: initialized device");

    let driver = &device.driver;
    driver.enable_interrupts();
    driver.set_state(u32::from(id) + 1);
    write_rw(device, 0);
    write_out(device, 0);
    print_shmem(device);

    let max_peers = driver.max_peers();
    let target = match cmdline.get("target") {
        Some(text) => inmate_rt::cmdline::parse_int(text)
            .and_then(|t| u16::try_from(t).ok())
            .filter(|t| *t < max_peers)
            .unwrap_or_else(|| panic!("target={text} is not a peer of this {max_peers}-peer link")),
        None if id < 2 => id + 1,
        None => 0,
    };
    let count = cmdline.int("count", -1);
    let int_no = if vectors > 0 { id + 1 } else { 0 };
    // Sleep on the APIC timer (halted between interrupts) unless `delay=pm` asks for the
    // PM-timer polling of Jailhouse's `delay_us` (one VM exit per read on a KVM cell).
    let poll_pm_timer = cmdline.get("delay") == Some("pm");
    if !poll_pm_timer {
        let ticks = inmate_rt::timer::calibrate();
        println!("IVSHMEM: APIC timer {ticks} ticks/ms");
    }
    interrupts::enable();
    let mut sent = 0i64;
    loop {
        if poll_pm_timer {
            inmate_rt::pmtimer::delay_us(1_000_000);
        } else {
            inmate_rt::timer::sleep_us(1_000_000);
        }
        interrupts::without(|| {
            println!();
            println!("IVSHMEM: sending IRQ {int_no} to peer {target}");
        });
        driver.ring(target, int_no);
        sent += 1;
        if sent == count {
            println!("IVSHMEM: sent {sent} interrupts, done");
            loop {
                interrupts::wait();
            }
        }
    }
}

/// Moves the device into static storage for the interrupt handler.
fn leak(device: Device) -> &'static Device {
    struct Slot(core::cell::UnsafeCell<core::mem::MaybeUninit<Device>>);
    // SAFETY: written once by `leak` before `DEVICE` is published, then only read.
    unsafe impl Sync for Slot {}
    static SLOT: Slot = Slot(core::cell::UnsafeCell::new(core::mem::MaybeUninit::uninit()));
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    assert_eq!(TAKEN.swap(1, Ordering::Relaxed), 0, "device leaked twice");
    // SAFETY: the slot is written exactly once (checked above), before anyone reads it.
    unsafe { (*SLOT.0.get()).write(device) }
}

fn irq_handler(vector: u8) {
    let base = IRQ_BASE.load(Ordering::Relaxed) as u8;
    let Some(n) = vector
        .checked_sub(base)
        .filter(|n| u16::from(*n) < MAX_VECTORS)
    else {
        return;
    };
    let count = IRQ_COUNT[usize::from(n)].fetch_add(1, Ordering::Relaxed) + 1;
    let Some(device) = device() else {
        return;
    };
    // As Jailhouse's demo: with MSI-X the value published is the count of vector ID.
    let own = if device.msix.is_some() {
        usize::from(device.driver.id())
    } else {
        0
    };
    let value = IRQ_COUNT.get(own).map_or(0, |c| c.load(Ordering::Relaxed));
    write_rw(device, value);
    write_out(device, value.wrapping_mul(10));
    println!();
    println!("IVSHMEM: got interrupt {n} (#{count})");
    print_shmem(device);
}

/// Writes `rw[ID]` (a u32 per peer at the start of the R/W section), if it exists.
fn write_rw(device: &Device, value: u32) {
    let id = usize::from(device.driver.id());
    if let Some(rw) = device.driver.rw().filter(|rw| rw.len() >= 4 * (id + 1)) {
        // SAFETY: inside the writable R/W section (length checked), 4-byte aligned (page-aligned
        // section); other peers write other words.
        unsafe { ptr::write_volatile(rw.as_ptr().cast::<u32>().add(id), value) }
    }
}

/// Writes the first word of this peer's output section.
fn write_out(device: &Device, value: u32) {
    let out = device.driver.own_output();
    if out.len() >= 4 {
        // SAFETY: the own output section is writable and at least 4 bytes long.
        unsafe { ptr::write_volatile(out.as_ptr().cast::<u32>(), value) }
    }
}

/// Reads the u32 at `offset` of a section, if it lies inside.
fn read_word(section: Option<ivshmem_dev::Section>, offset: usize) -> Option<u32> {
    let section = section?;
    (offset + 4 <= section.len()).then(|| {
        // SAFETY: inside the mapped, readable section; aligned (page-aligned section,
        // 4-aligned offset).
        unsafe { ptr::read_volatile(section.as_ptr().add(offset).cast::<u32>()) }
    })
}

/// Prints the fields Jailhouse's demos print: three state-table entries, three R/W words and
/// the first word of the input (output) sections at 0, 0x2000 and 0x4000 (those that exist).
fn print_shmem(device: &Device) {
    let driver = &device.driver;
    for peer in 0..3u16 {
        if let Some(state) = driver.peer_state(peer) {
            println!("state[{peer}] = {state}");
        }
    }
    for i in 0..3usize {
        if let Some(value) = read_word(driver.rw(), 4 * i) {
            println!("rw[{i}] = {value}");
        }
    }
    let outputs = device.layout.outputs();
    // SAFETY: the output sections lie contiguously at `base + outputs.offset`, all readable
    // (own one writable); `Section` only records the span.
    let inputs = unsafe {
        ivshmem_dev::Section::new(
            core::ptr::NonNull::new_unchecked((device.base + outputs.offset) as usize as *mut u8),
            outputs.size as usize,
            false,
        )
    };
    for offset in [0usize, 0x2000, 0x4000] {
        if let Some(value) = read_word(Some(inputs), offset) {
            println!("in@{offset:#06x} = {value}");
        }
    }
}
