//! Delays on the ACPI PM timer: a 24-bit counter at 3.579545 MHz whose port the comm region
//! names (Jailhouse's inmates time every delay this way).
//!
//! Each read is a port access (a VM exit on KVM cells), so a delay polls rather than spins
//! on the CPU; the count is accumulated across the 24-bit wrap, so any length works.

use crate::port::inl;

/// The PM timer's frequency.
pub const FREQUENCY_HZ: u64 = ivshmem_dev::comm::PM_TIMER_HZ;
const MASK: u32 = 0x00FF_FFFF;

/// Reads the counter.
pub fn read() -> u32 {
    let port = crate::comm::pm_timer_port();
    // SAFETY: the port comes from the comm region written by the VMM/hypervisor; reading the
    // PM timer has no side effect.
    unsafe { inl(port) & MASK }
}

/// Ticks since `start`, a previous [`read`] (valid for less than one 4.7 s wrap).
pub fn ticks_since(start: u32) -> u32 {
    read().wrapping_sub(start) & MASK
}

/// Converts microseconds to PM-timer ticks.
pub const fn ticks(us: u64) -> u64 {
    us * FREQUENCY_HZ / 1_000_000
}

/// Converts ticks to microseconds.
pub const fn micros(ticks: u64) -> u64 {
    ticks * 1_000_000 / FREQUENCY_HZ
}

/// Busy-waits `us` microseconds (interrupts stay as they are and are served meanwhile).
pub fn delay_us(us: u64) {
    let wanted = ticks(us);
    let mut elapsed = 0u64;
    let mut last = read();
    while elapsed < wanted {
        let now = read();
        elapsed += u64::from(now.wrapping_sub(last) & MASK);
        last = now;
    }
}

/// A deadline on the PM timer.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    last: u32,
    left: u64,
}

impl Deadline {
    /// `us` microseconds from now.
    pub fn after_us(us: u64) -> Self {
        Self {
            last: read(),
            left: ticks(us),
        }
    }

    /// Whether it has passed (call it at least every 4.7 s).
    pub fn passed(&mut self) -> bool {
        let now = read();
        let step = u64::from(now.wrapping_sub(self.last) & MASK);
        self.last = now;
        self.left = self.left.saturating_sub(step);
        self.left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_conversions_round_down() {
        assert_eq!(ticks(1_000_000), FREQUENCY_HZ);
        assert_eq!(ticks(1_000), 3_579);
        assert_eq!(micros(FREQUENCY_HZ), 1_000_000);
        // One 24-bit wrap lasts about 4.69 s.
        assert_eq!(micros(u64::from(MASK) + 1), 4_686_968);
    }
}
