//! Time on the host's clock: the TSC, turned into host `CLOCK_MONOTONIC` nanoseconds with the
//! clock epoch the VMM writes into the communication region (`ivshmem_dev::comm`, this
//! project's extension), so an inmate's timestamps compare directly with a Linux cell's.
//!
//! `rdtsc` is not a VM exit (unlike a PM-timer read): under KVM the guest TSC is the host's
//! scaled and offset by KVM, and the epoch pairs one guest-TSC reading with one host
//! `CLOCK_MONOTONIC` reading taken around it (a few µs apart). The residual error is that
//! spread plus the drift between KVM's `tsc_khz` and the NTP-disciplined monotonic clock
//! (ppm: well under a millisecond per minute). On real Jailhouse there is no epoch:
//! [`monotonic_ns`] then counts from the cell's first call (relative time only).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::comm::ClockEpoch;

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: `rdtsc` only reads the counter (CR4.TSD is clear at every privilege level).
    unsafe { asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack)) }
    u64::from(high) << 32 | u64::from(low)
}

/// The epoch in use; `tsc_khz == 0` until [`init`].
static EPOCH_TSC: AtomicU64 = AtomicU64::new(0);
static EPOCH_NS: AtomicU64 = AtomicU64::new(0);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// Whether the clock is the host's (an epoch was found) or only relative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockKind {
    /// Host `CLOCK_MONOTONIC` ns, from the VMM's epoch.
    HostMonotonic,
    /// Nanoseconds since [`init`] (no epoch, TSC rate from the comm region).
    Relative,
    /// No TSC rate known: [`monotonic_ns`] returns 0.
    Unavailable,
}

/// Reads the epoch (or starts a relative clock) once; returns what [`monotonic_ns`] means.
pub fn init() -> ClockKind {
    let (epoch, kind) = match crate::comm::clock_epoch() {
        Some(epoch) => (epoch, ClockKind::HostMonotonic),
        None => {
            let tsc_khz = crate::comm::tsc_khz();
            let kind = if tsc_khz == 0 {
                ClockKind::Unavailable
            } else {
                ClockKind::Relative
            };
            let epoch = ClockEpoch {
                tsc: rdtsc(),
                monotonic_ns: 0,
                tsc_khz,
            };
            (epoch, kind)
        }
    };
    EPOCH_TSC.store(epoch.tsc, Ordering::Relaxed);
    EPOCH_NS.store(epoch.monotonic_ns, Ordering::Relaxed);
    TSC_KHZ.store(u64::from(epoch.tsc_khz), Ordering::Relaxed);
    kind
}

/// Nanoseconds on the clock [`init`] chose (0 without a TSC rate).
pub fn monotonic_ns() -> u64 {
    let tsc_khz = TSC_KHZ.load(Ordering::Relaxed) as u32;
    if tsc_khz == 0 {
        return 0;
    }
    ClockEpoch {
        tsc: EPOCH_TSC.load(Ordering::Relaxed),
        monotonic_ns: EPOCH_NS.load(Ordering::Relaxed),
        tsc_khz,
    }
    .monotonic_ns(rdtsc())
}
