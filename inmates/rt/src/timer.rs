//! Sleeping on the x2APIC timer: program a one-shot count, `hlt` until it fires.
//!
//! [`crate::pmtimer::delay_us`] polls a port, which on a KVM cell is one VM exit per read:
//! a one-second delay keeps a host CPU busy. [`sleep_us`] instead halts the vCPU (the in-kernel
//! LAPIC wakes it), so an idle inmate costs its host CPU nothing, and device interrupts are
//! served while it sleeps. The timer's rate is unknown (the comm region's APIC kHz is 0 on
//! KVM cells), so [`calibrate`] measures it against the PM timer once; if the timer does not
//! count, [`sleep_us`] falls back to the PM-timer delay.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::port::{rdmsr, wrmsr};

/// LVT timer register.
const MSR_LVT_TIMER: u32 = 0x832;
/// Initial count register.
const MSR_INITIAL_COUNT: u32 = 0x838;
/// Current count register.
const MSR_CURRENT_COUNT: u32 = 0x839;
/// Divide configuration register.
const MSR_DIVIDE: u32 = 0x83E;
/// Divide by 1.
const DIVIDE_BY_1: u64 = 0b1011;
/// LVT bit 16: masked.
const LVT_MASKED: u64 = 1 << 16;
/// The IDT vector of the timer (below the spurious vector, above device vectors in use).
pub const TIMER_VECTOR: u8 = 0xEF;
/// How long the calibration measures.
const CALIBRATION_US: u64 = 10_000;

/// Timer ticks per millisecond; 0 until calibrated (or if the timer does not count).
static TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);
/// Set by the timer interrupt.
static FIRED: AtomicBool = AtomicBool::new(false);

/// Measures the timer against the PM timer and returns ticks per millisecond.
///
/// Three rounds of 10 ms each; every round reads the two clocks back to back at its start
/// and end, ordered so that a vCPU preempted between two reads (the host is shared) only ever
/// inflates a round's rate; the smallest rate wins.
pub fn calibrate() -> u64 {
    let mut best = u64::MAX;
    for _ in 0..3 {
        // SAFETY: the x2APIC timer registers exist in x2APIC mode; the LVT stays masked, so
        // the measurement raises no interrupt.
        let (apic, pm) = unsafe {
            wrmsr(MSR_LVT_TIMER, LVT_MASKED | u64::from(TIMER_VECTOR));
            wrmsr(MSR_DIVIDE, DIVIDE_BY_1);
            wrmsr(MSR_INITIAL_COUNT, u64::from(u32::MAX));
            let apic_start = rdmsr(MSR_CURRENT_COUNT);
            let pm_start = crate::pmtimer::read();
            while crate::pmtimer::ticks_since(pm_start)
                < crate::pmtimer::ticks(CALIBRATION_US) as u32
            {}
            let apic_end = rdmsr(MSR_CURRENT_COUNT);
            let pm_ticks = crate::pmtimer::ticks_since(pm_start);
            wrmsr(MSR_INITIAL_COUNT, 0);
            (apic_start.saturating_sub(apic_end), u64::from(pm_ticks))
        };
        if let Some(rate) = (apic * crate::pmtimer::FREQUENCY_HZ / 1000).checked_div(pm) {
            best = best.min(rate);
        }
    }
    let per_ms = if best == u64::MAX { 0 } else { best };
    TICKS_PER_MS.store(per_ms, Ordering::Relaxed);
    per_ms
}

/// Called by the interrupt dispatcher for [`TIMER_VECTOR`].
pub(crate) fn fired() {
    // Release pairs with the Acquire in `sleep_us`.
    FIRED.store(true, Ordering::Release);
}

/// Sleeps `us` microseconds with interrupts **enabled** (device interrupts are served
/// meanwhile), halting between them. Falls back to [`crate::pmtimer::delay_us`] when the
/// timer was not calibrated.
pub fn sleep_us(us: u64) {
    let per_ms = TICKS_PER_MS.load(Ordering::Relaxed);
    if per_ms == 0 {
        crate::interrupts::enable();
        crate::pmtimer::delay_us(us);
        return;
    }
    let mut ticks = us.saturating_mul(per_ms) / 1000;
    while ticks > 0 {
        let chunk = ticks.min(u64::from(u32::MAX));
        ticks -= chunk;
        crate::interrupts::disable();
        FIRED.store(false, Ordering::Relaxed);
        // SAFETY: x2APIC timer registers; one-shot mode (LVT bits 17–18 = 0), unmasked, on
        // TIMER_VECTOR, which the dispatcher acknowledges.
        unsafe {
            wrmsr(MSR_LVT_TIMER, u64::from(TIMER_VECTOR));
            wrmsr(MSR_INITIAL_COUNT, chunk);
        }
        // `sti; hlt` is atomic: the timer cannot fire between the check and the halt.
        while !FIRED.load(Ordering::Acquire) {
            crate::interrupts::wait();
            crate::interrupts::disable();
        }
    }
    crate::interrupts::enable();
}

/// Halts until any interrupt arrives or about `us` microseconds passed, whichever is first,
/// with interrupts **enabled** on return. `ready` is checked with interrupts off right before
/// halting (`sti; hlt` is atomic), so a device handler that sets what `ready` reads cannot be
/// missed. Without a calibrated timer it polls the PM timer for at most `us` (and at most
/// 1 ms), checking `ready` between reads.
pub fn wait_at_most_us(us: u64, ready: impl Fn() -> bool) {
    let per_ms = TICKS_PER_MS.load(Ordering::Relaxed);
    if per_ms == 0 {
        crate::interrupts::enable();
        let mut deadline = crate::pmtimer::Deadline::after_us(us.min(1000));
        while !ready() && !deadline.passed() {}
        return;
    }
    let ticks = (us.saturating_mul(per_ms) / 1000).clamp(1, u64::from(u32::MAX));
    crate::interrupts::disable();
    if !ready() {
        // SAFETY: x2APIC timer registers; one-shot on TIMER_VECTOR (acknowledged by the
        // dispatcher); stopped again below.
        unsafe {
            wrmsr(MSR_LVT_TIMER, u64::from(TIMER_VECTOR));
            wrmsr(MSR_INITIAL_COUNT, ticks);
        }
        crate::interrupts::wait();
        // SAFETY: writing 0 to the initial count stops the timer.
        unsafe { wrmsr(MSR_INITIAL_COUNT, 0) }
    }
    crate::interrupts::enable();
}
