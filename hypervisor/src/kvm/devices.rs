//! The small emulated devices of a KVM cell: the ACPI PM timer, the 8250 console and the
//! address latch of PCI configuration mechanism #1. Each is pure state plus arithmetic; the
//! vCPU loop ([`super::cell`]) decides which port goes where and what is illegal.

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use super::layout::PM_TIMER_HZ;

/// The ACPI PM timer: a 24-bit counter at 3,579,545 Hz, derived from the host's monotonic
/// clock (so it never runs backwards and needs no state but its start).
#[derive(Debug, Clone, Copy)]
pub struct PmTimer {
    start: Instant,
}

impl PmTimer {
    /// A timer that reads 0 now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    /// The counter value now (24 bits).
    pub fn read(&self) -> u32 {
        Self::ticks(self.start.elapsed().as_nanos())
    }

    /// The counter value after `nanos` nanoseconds.
    pub fn ticks(nanos: u128) -> u32 {
        ((nanos * u128::from(PM_TIMER_HZ) / 1_000_000_000) & 0xFF_FFFF) as u32
    }
}

impl Default for PmTimer {
    fn default() -> Self {
        Self::new()
    }
}

/// Longest console line kept before it is forwarded without a newline.
pub const MAX_CONSOLE_LINE: usize = 4096;

/// A write-only 8250: LSR reads "transmitter empty", THR bytes are collected into lines.
///
/// Register rules: base+0 with DLAB clear is THR (a byte of output; `\r` is dropped), with
/// DLAB set the divisor latch (ignored); base+3 (LCR) keeps DLAB; base+5 (LSR) reads 0x60;
/// every other register reads 0 and ignores writes.
#[derive(Debug, Default)]
pub struct Uart {
    lcr: u8,
    line: Vec<u8>,
}

/// Offset of the line control register.
const LCR: u16 = 3;
/// Offset of the line status register.
const LSR: u16 = 5;
/// LCR divisor latch access bit.
const LCR_DLAB: u8 = 0x80;
/// LSR: THR empty and transmitter empty.
const LSR_TX_EMPTY: u8 = 0x60;

impl Uart {
    /// A UART with no output pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// A read of register `offset` (0..8).
    pub fn read(&self, offset: u16) -> u8 {
        match offset {
            LSR => LSR_TX_EMPTY,
            LCR => self.lcr,
            _ => 0,
        }
    }

    /// A write of `value` to register `offset` (0..8); returns a completed line, if any.
    pub fn write(&mut self, offset: u16, value: u8) -> Option<String> {
        match offset {
            0 if self.lcr & LCR_DLAB == 0 => self.output(value),
            LCR => {
                self.lcr = value;
                None
            }
            _ => None,
        }
    }

    fn output(&mut self, byte: u8) -> Option<String> {
        match byte {
            b'\n' => Some(self.take_line()),
            b'\r' => None,
            _ => {
                self.line.push(byte);
                (self.line.len() >= MAX_CONSOLE_LINE).then(|| self.take_line())
            }
        }
    }

    fn take_line(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        line
    }

    /// The partial line not yet ended by a newline (flushed when the cell stops).
    pub fn flush(&mut self) -> Option<String> {
        (!self.line.is_empty()).then(|| self.take_line())
    }
}

/// A PCI bus/device/function number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf(pub u16);

impl Bdf {
    /// From bus (0..256), device (0..32) and function (0..8); `None` if out of range.
    pub fn new(bus: u16, device: u16, function: u16) -> Option<Self> {
        (bus < 256 && device < 32 && function < 8)
            .then_some(Self(bus << 8 | device << 3 | function))
    }

    /// Bus number.
    pub fn bus(self) -> u16 {
        self.0 >> 8
    }

    /// Device number.
    pub fn device(self) -> u16 {
        (self.0 >> 3) & 0x1F
    }

    /// Function number.
    pub fn function(self) -> u16 {
        self.0 & 7
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

/// Why a BDF string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a PCI address; write bus:device.function in hex, e.g. `00:0e.0`")]
pub struct BdfParseError(pub String);

impl FromStr for Bdf {
    type Err = BdfParseError;

    /// Parses `bb:dd.f` (hexadecimal bus and device, function 0..7).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || BdfParseError(s.to_string());
        let (bus, rest) = s.split_once(':').ok_or_else(err)?;
        let (device, function) = rest.split_once('.').ok_or_else(err)?;
        let hex = |t: &str| u16::from_str_radix(t, 16).map_err(|_| err());
        Bdf::new(hex(bus)?, hex(device)?, hex(function)?).ok_or_else(err)
    }
}

/// Port of the configuration address register.
pub const PCI_CONFIG_ADDRESS: u16 = 0xCF8;
/// First port of the configuration data window (0xCFC..=0xCFF).
pub const PCI_CONFIG_DATA: u16 = 0xCFC;
/// Enable bit of the configuration address.
pub const PCI_CONFIG_ENABLE: u32 = 1 << 31;

/// The configuration address latched by a 32-bit write to 0xCF8.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PciConfigAddress(pub u32);

impl PciConfigAddress {
    /// The function and register a data access at `port` (0xCFC..=0xCFF) selects, or `None`
    /// while the enable bit is clear.
    pub fn target(self, port: u16) -> Option<(Bdf, u16)> {
        if self.0 & PCI_CONFIG_ENABLE == 0 {
            return None;
        }
        let bdf = Bdf(((self.0 >> 8) & 0xFFFF) as u16);
        let register = (self.0 & 0xFC) as u16 + (port - PCI_CONFIG_DATA);
        Some((bdf, register))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm_timer_runs_at_3_58_mhz_and_wraps_at_24_bits() {
        assert_eq!(PmTimer::ticks(0), 0);
        assert_eq!(PmTimer::ticks(1_000_000_000), 3_579_545 & 0xFF_FFFF);
        // 2^24 ticks take about 4.69 s: the counter wraps to a small value after that.
        let wrap_ns = (1u128 << 24) * 1_000_000_000 / 3_579_545 + 1;
        assert!(PmTimer::ticks(wrap_ns) < 4);
        let t = PmTimer::new();
        let a = t.read();
        let b = t.read();
        assert!(b >= a);
    }

    #[test]
    fn uart_collects_lines_and_honours_dlab() {
        let mut u = Uart::new();
        assert_eq!(u.read(5), 0x60);
        assert_eq!(u.read(0), 0);
        for &b in b"hi\r" {
            assert_eq!(u.write(0, b), None);
        }
        assert_eq!(u.write(0, b'\n').as_deref(), Some("hi"));
        u.write(3, 0x80);
        assert_eq!(u.write(0, b'x'), None, "divisor latch, not output");
        u.write(3, 0x03);
        u.write(0, b'y');
        assert_eq!(u.flush().as_deref(), Some("y"));
        assert_eq!(u.flush(), None);
    }

    #[test]
    fn overlong_console_lines_are_cut() {
        let mut u = Uart::new();
        let mut lines = 0;
        for _ in 0..MAX_CONSOLE_LINE * 2 {
            if let Some(l) = u.write(0, b'a') {
                assert_eq!(l.len(), MAX_CONSOLE_LINE);
                lines += 1;
            }
        }
        assert_eq!(lines, 2);
    }

    #[test]
    fn config_address_selects_function_and_register() {
        let bdf: Bdf = "01:0e.0".parse().unwrap();
        assert_eq!((bdf.bus(), bdf.device(), bdf.function()), (1, 0x0e, 0));
        assert_eq!(bdf.to_string(), "01:0e.0");
        assert!("1:20.0".parse::<Bdf>().is_err());
        assert!("00:0e.8".parse::<Bdf>().is_err());
        let a = PciConfigAddress(PCI_CONFIG_ENABLE | u32::from(bdf.0) << 8 | 0x3E);
        assert_eq!(a.target(0xCFC), Some((bdf, 0x3C)));
        assert_eq!(a.target(0xCFE), Some((bdf, 0x3E)));
        assert_eq!(PciConfigAddress(0x3C).target(0xCFC), None);
    }
}
