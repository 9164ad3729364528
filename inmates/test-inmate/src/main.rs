//! The test inmate: one image whose command line selects what it does, for the KVM-cell tests
//! (and for trying a Jailhouse setup by hand).
//!
//! - `mode=config`: finds the ivshmem device by scanning, dumps its config space
//!   (`cfg[XX] = XXXXXXXX` for every dword 00h..FCh), reads a function that does not exist,
//!   walks the capability list (`cap XX: id XX next XX`), sizes BAR0 and BAR1
//!   (`bar0 mask XXXXXXXX size N`), brings the device up, reads the MSI-X table size and the
//!   PBA, prints `config done` and shuts down (`cell_state` = 2).
//! - `mode=panic`: panics; the runtime reports `cell_state` = 3.
//! - `mode=comm-revision`: plays a hypervisor of another comm-region revision by overwriting
//!   the revision field with 1, then runs the runtime's start-up check, which reports
//!   `cell_state` = 4.
//! - `mode=write-peer-output`, `mode=unknown-port`, `mode=misaligned-bar0`: bring the device up,
//!   set `STATE` = ID + 1, wait until peer `peer=N` (default: the other peer of ID 0/1) has a
//!   non-zero state, print `ready`, then make the illegal access: a write to that peer's
//!   output section, an `out` to port 0x1234, or a 32-bit read of BAR0 + 2. A hypervisor that
//!   lets the access through gets `illegal access not stopped` and `cell_state` = 3.
#![no_std]
#![no_main]

use core::arch::asm;

use inmate_rt::ivshmem::{self, BAR0_BASE, BAR1_BASE};
use inmate_rt::{comm, pmtimer, println, Cmdline};
use ivshmem_dev::msix::MsixCapability;
use ivshmem_dev::pci::{self, ConfigAccess, PciAddress};
use ivshmem_dev::PortIo;

inmate_rt::entry!(main);

fn main(cmdline: &Cmdline) -> ! {
    let mode = cmdline.get("mode").unwrap_or("");
    println!("test-inmate: mode {mode}");
    match mode {
        "config" => config(),
        "panic" => panic!("test-inmate: panic requested on the command line"),
        "comm-revision" => {
            comm::overwrite_revision_for_test(1);
            comm::verify_or_stop();
            panic!("the comm-region check accepted revision 1");
        }
        "write-peer-output" | "unknown-port" | "misaligned-bar0" => illegal(mode, cmdline),
        other => panic!("unknown mode={other:?}"),
    }
}

fn access() -> PortIo {
    // SAFETY: the inmate is the only user of ports 0xCF8/0xCFC on its one CPU.
    unsafe { PortIo::new() }
}

fn config() -> ! {
    let access = access();
    let address = pci::scan(&access).next().expect("no ivshmem device found");
    println!("found {address}");
    for offset in (0..=0xFCu8).step_by(4) {
        println!("cfg[{offset:02x}] = {:08x}", access.read32(address, offset));
    }
    let absent = PciAddress::new(address.bus, address.device, (address.function + 1) % 8);
    println!("absent {absent} = {:08x}", access.read32(absent, 0));
    let mut pointer = access.read8(address, pci::CAP_POINTER);
    for _ in 0..48 {
        if pointer == 0 {
            break;
        }
        let header = access.read32(address, pointer);
        println!(
            "cap {pointer:02x}: id {:02x} next {:02x}",
            header as u8,
            (header >> 8) as u8
        );
        pointer = (header >> 8) as u8;
    }
    for (name, offset) in [("bar0", pci::BAR0), ("bar1", pci::BAR1)] {
        let old = access.read32(address, offset);
        access.write32(address, offset, u32::MAX);
        let mask = access.read32(address, offset);
        access.write32(address, offset, old);
        let size = (!(mask & pci::BAR_MEM_ADDRESS_MASK)).wrapping_add(1);
        println!("{name} mask {mask:08x} size {size}");
    }
    let found = pci::probe(&access, address).unwrap_or_else(|e| panic!("{e}"));
    let device = ivshmem::bring_up_at(&access, found).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "bars {:08x} {:08x} command {:04x}",
        access.read32(address, pci::BAR0),
        access.read32(address, pci::BAR1),
        access.read16(address, pci::COMMAND)
    );
    let msix = MsixCapability::find(&access, address)
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("no MSI-X capability");
    println!(
        "msix table size {} bir {} offset {:x} pba bir {} offset {:x}",
        msix.vectors, msix.table_bar, msix.table_offset, msix.pba_bar, msix.pba_offset
    );
    let programmed = device.setup_msix(&access, 32, msix.vectors);
    let pba = BAR1_BASE as usize + msix.pba_offset as usize;
    // SAFETY: BAR1 is programmed and decoded; the PBA lies at its offset in BAR1's page.
    let pending = unsafe { core::ptr::read_volatile(pba as *const u32) };
    println!(
        "msix programmed {programmed} control {:04x} pba {pending:08x}",
        msix.control(&access)
    );
    println!(
        "id {} max_peers {} base {:#x}",
        device.driver.id(),
        device.driver.max_peers(),
        device.base
    );
    println!("config done");
    inmate_rt::shutdown()
}

fn illegal(mode: &str, cmdline: &Cmdline) -> ! {
    let access = access();
    let device = ivshmem::bring_up(&access).unwrap_or_else(|e| panic!("{e}"));
    let driver = &device.driver;
    let id = driver.id();
    let default_peer = if id == 0 { 1 } else { 0 };
    let peer = cmdline.int("peer", default_peer);
    let peer = u16::try_from(peer)
        .ok()
        .filter(|p| *p < driver.max_peers() && *p != id)
        .unwrap_or_else(|| panic!("peer={peer} is not another peer of this link"));
    driver.set_state(u32::from(id) + 1);
    println!(
        "test-inmate: ID {id} state {} waiting for peer {peer}",
        id + 1
    );
    let mut waited_ms = 0u32;
    while driver.peer_state(peer) == Some(0) {
        pmtimer::delay_us(10_000);
        waited_ms += 10;
        assert!(
            waited_ms < 60_000,
            "peer {peer} did not come up within 60 s"
        );
    }
    println!("ready");
    match mode {
        "write-peer-output" => {
            let output = driver
                .peer_output(peer)
                .expect("the link has no output sections");
            // SAFETY (for the inmate): the store goes to memory the hypervisor mapped
            // read-only; the test expects the hypervisor to stop the cell before it completes.
            // Done in asm so no Rust reference to read-only memory is ever written through.
            unsafe { asm!("mov dword ptr [{}], 0x0bad", in(reg) output.as_ptr(), options(nostack)) }
        }
        "unknown-port" => {
            // SAFETY (for the inmate): port 0x1234 is not the cell's; the test expects the stop.
            unsafe { inmate_rt::port::outb(0x1234, 0x5a) }
        }
        _ => {
            let value: u32;
            // SAFETY (for the inmate): a misaligned read of the register page; the test expects
            // the stop. Done in asm: a misaligned Rust read would be undefined behaviour.
            unsafe {
                asm!("mov {:e}, dword ptr [{}]", out(reg) value, in(reg) BAR0_BASE as usize + 2,
                     options(nostack, readonly))
            }
            println!("misaligned read returned {value:#x}");
        }
    }
    println!("illegal access not stopped");
    inmate_rt::fail()
}
