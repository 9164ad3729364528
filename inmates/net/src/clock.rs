//! smoltcp's clock: microseconds since boot, counted on the ACPI PM timer (24 bits at
//! 3.579545 MHz, wrapping every 4.7 s; the main loop reads it at least every second).

use core::cell::Cell;

use vnet::smoltcp::time::Instant;

struct Count {
    last: Cell<u32>,
    ticks: Cell<u64>,
    started: Cell<bool>,
}

// SAFETY: used by the main loop only, on the one CPU (never from the interrupt handler).
unsafe impl Sync for Count {}

static COUNT: Count = Count {
    last: Cell::new(0),
    ticks: Cell::new(0),
    started: Cell::new(false),
};

/// Now, in smoltcp's terms.
pub fn now() -> Instant {
    let read = inmate_rt::pmtimer::read();
    if COUNT.started.replace(true) {
        let step = read.wrapping_sub(COUNT.last.get()) & 0x00FF_FFFF;
        COUNT.ticks.set(COUNT.ticks.get() + u64::from(step));
    }
    COUNT.last.set(read);
    Instant::from_micros(inmate_rt::pmtimer::micros(COUNT.ticks.get()) as i64)
}
