//! The 8250 UART console at port 0x3F8 (what the KVM cell VMM emulates, and the usual
//! Jailhouse x86 debug console), plus [`print!`](crate::print) / [`println!`](crate::println).
//!
//! Each byte waits for the transmitter-holding-register-empty bit (LSR bit 5) and is then
//! written to THR. No baud rate is programmed: the comm region's divider is 0 on KVM cells,
//! and on Jailhouse the root cell has set the UART up. Lines end in `\n` only; the VMM
//! forwards the console line by line.

use core::fmt;

use crate::port::{inb, outb};

/// Base port of the UART.
pub const UART_BASE: u16 = ivshmem_dev::comm::UART_BASE;
/// Line status register offset.
const LSR: u16 = 5;
/// LSR bit 5: the transmitter holding register is empty.
const LSR_THRE: u8 = 0x20;

/// Writes one byte to the UART.
pub fn putc(byte: u8) {
    // SAFETY: 0x3F8..0x3FF is the cell's console UART (kvm-cells.md; Jailhouse cell configs
    // grant it); reading LSR and writing THR have no memory effects.
    unsafe {
        while inb(UART_BASE + LSR) & LSR_THRE == 0 {}
        outb(UART_BASE, byte);
    }
}

/// The console as a [`fmt::Write`] sink.
#[derive(Debug, Clone, Copy, Default)]
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(putc);
        Ok(())
    }
}

/// Formats `args` to the console with interrupts off, so a line printed by an interrupt
/// handler never lands in the middle of one printed by the main loop (one CPU, no lock needed).
pub fn print_fmt(args: fmt::Arguments<'_>) {
    crate::interrupts::without(|| {
        let _ = fmt::Write::write_fmt(&mut Console, args);
    });
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print_fmt(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::console::print_fmt(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::console::print_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}
