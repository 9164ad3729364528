//! The local APIC in x2APIC mode, through MSRs only. The VMM (and Jailhouse) hands the CPU over
//! with x2APIC already enabled; the runtime never switches modes.

use crate::port::{rdmsr, wrmsr};

/// x2APIC ID register.
pub const MSR_ID: u32 = 0x802;
/// End-of-interrupt register.
pub const MSR_EOI: u32 = 0x80B;
/// Spurious-interrupt vector register.
pub const MSR_SPIV: u32 = 0x80F;
/// SPIV bit 8: APIC software enable.
pub const SPIV_ENABLE: u64 = 1 << 8;

/// Software-enables the APIC with [`crate::interrupts::SPURIOUS_VECTOR`].
pub fn init() {
    // SAFETY: SPIV exists in x2APIC mode (the mode the cell starts in); enabling the APIC
    // delivers nothing until interrupts are enabled.
    unsafe {
        wrmsr(
            MSR_SPIV,
            SPIV_ENABLE | u64::from(crate::interrupts::SPURIOUS_VECTOR),
        )
    }
}

/// This CPU's x2APIC ID (the destination of MSI-X messages aimed at it).
pub fn id() -> u32 {
    // SAFETY: the ID register exists in x2APIC mode; reading it has no side effect.
    unsafe { rdmsr(MSR_ID) as u32 }
}

/// Signals end of interrupt.
pub fn eoi() {
    // SAFETY: writing 0 to EOI in x2APIC mode acknowledges the in-service interrupt.
    unsafe { wrmsr(MSR_EOI, 0) }
}
