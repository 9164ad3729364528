//! A tiny runtime for x86-64 inmates: bare-metal programs for this project's KVM cells and for
//! real Jailhouse x86 cells (kvm-cells.md restates the boot protocol).
//!
//! - [`boot`]: the real-mode → long-mode stub at address 0, identity page tables.
//! - [`comm`]: the communication region at 0x100000 (checked before `main`).
//! - [`clock`]: TSC time on the host's `CLOCK_MONOTONIC` (the VMM's clock epoch).
//! - [`cmdline`]: the 256-byte command line at 0x1000 (`target=1`).
//! - [`interrupts`]: IDT, entry stubs, one handler for device vectors.
//! - [`x2apic`]: EOI, APIC ID (MSI-X capability and table: `ivshmem_dev::msix`, programmed
//!   for this CPU by [`ivshmem::Device::setup_msix`]).
//! - [`pmtimer`]: delays on the ACPI PM timer; [`timer`]: sleeping on the x2APIC timer.
//! - [`event`]: waiting for a device interrupt or a deadline without lost wake-ups.
//! - [`console`]: the 8250 UART at 0x3F8, [`println!`].
//! - [`user`]: running the main loop at ring 3 (native under PVM), privileged instructions
//!   trapped and performed at ring 0.
//! - [`ivshmem`]: bringing up an ivshmem v2 device the Jailhouse way.
//!
//! An inmate is `#![no_std] #![no_main]` and names its main function with [`entry!`]:
//! ```ignore
//! #![no_std]
//! #![no_main]
//! inmate_rt::entry!(main);
//! fn main(cmdline: &inmate_rt::cmdline::Cmdline) -> ! { loop { inmate_rt::interrupts::wait() } }
//! ```
//! A panic prints `PANIC: ...`, sets `cell_state` = 3 (failed) and stops the CPU; so does an
//! unexpected exception.
//!
//! The code runs in ring 0 unless the inmate calls [`user::enter`]. On this project's
//! PVM-backed `/dev/kvm`, ring-0 code is emulated (~0.7 µs per instruction), so hot loops
//! belong at ring 3 or are kept short and every wait polls a device (PM
//! timer) or halts; no SSE: the target is soft-float and the boot stub never enables it.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

// The boot stub, the start and the panic handler only exist in the inmate image: the host
// build of the unit tests (`cargo test --target x86_64-unknown-linux-gnu -p inmate-rt`) has no
// linker script and its own entry point.
#[cfg(not(test))]
pub mod boot;
pub mod clock;
pub mod cmdline;
pub mod comm;
pub mod console;
pub mod event;
pub mod interrupts;
pub mod ivshmem;
pub mod pmtimer;
pub mod port;
pub mod timer;
pub mod user;
pub mod x2apic;

use core::arch::asm;

pub use cmdline::Cmdline;

#[cfg(not(test))]
mod start {
    /// Called by the boot stub in long mode with a stack and a cleared `.bss`.
    pub extern "C" fn __inmate_start() -> ! {
        crate::comm::verify_or_stop();
        crate::interrupts::init();
        crate::x2apic::init();
        let cmdline = crate::cmdline::Cmdline::snapshot();
        extern "Rust" {
            fn __inmate_main(cmdline: &crate::cmdline::Cmdline) -> !;
        }
        // SAFETY: `entry!` defines `__inmate_main` with exactly this signature; an inmate that
        // does not use `entry!` fails to link.
        unsafe { __inmate_main(&cmdline) }
    }
}

/// Names the inmate's main function, `fn(&Cmdline) -> !`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        fn __inmate_main(cmdline: &$crate::cmdline::Cmdline) -> ! {
            let main: fn(&$crate::cmdline::Cmdline) -> ! = $main;
            main(cmdline)
        }
    };
}

/// Stops the CPU for good: interrupts off, `hlt` forever.
pub fn halt() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Reports a clean shutdown (`cell_state` = 2) and stops.
pub fn shutdown() -> ! {
    comm::set_cell_state(comm::CellState::ShutDown);
    halt()
}

/// Reports failure (`cell_state` = 3) and stops.
pub fn fail() -> ! {
    comm::set_cell_state(comm::CellState::Failed);
    halt()
}

#[cfg_attr(test, allow(dead_code))]
fn fail_exception(frame: &interrupts::Frame) -> ! {
    println!(
        "FATAL: exception {} error {:#x} at rip {:#x} rsp {:#x}",
        frame.vector, frame.error, frame.rip, frame.rsp
    );
    fail()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    interrupts::disable();
    // One line (PanicInfo's Display puts the message on a line of its own).
    match info.location() {
        Some(at) => println!("PANIC: {} at {}:{}", info.message(), at.file(), at.line()),
        None => println!("PANIC: {}", info.message()),
    }
    fail()
}
