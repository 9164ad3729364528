//! Waiting for the next event: a device interrupt or a deadline, whichever comes first, with
//! no lost wake-up. Install [`device_interrupt`] as the handler (or call it from yours); an
//! interrupt that arrives between the caller's last check and the halt is remembered and
//! makes the next wait return at once.
//!
//! Works at ring 0 and at ring 3 ([`crate::user`]): the halt is `sti; hlt`, performed
//! atomically either way.

use core::sync::atomic::{AtomicBool, Ordering};

/// The longest halt: a safety net only (every link change raises an interrupt).
pub const MAX_WAIT_US: u64 = 50_000;

/// Set by [`device_interrupt`], taken by [`wait_until`].
static PENDING: AtomicBool = AtomicBool::new(false);

/// An interrupt handler (`interrupts::set_handler(event::device_interrupt)`): records that
/// something happened.
pub fn device_interrupt(_vector: u8) {
    PENDING.store(true, Ordering::Release);
}

/// Halts until a device interrupt (also one that arrived since the last wait), `deadline_ns`
/// on [`crate::clock::monotonic_ns`] (`None`: none), or [`MAX_WAIT_US`]. Spurious returns
/// are possible: the caller re-checks its state. Interrupts are enabled on return.
pub fn wait_until(deadline_ns: Option<u64>) {
    let us = match deadline_ns {
        Some(deadline) => {
            let left = deadline.saturating_sub(crate::clock::monotonic_ns()) / 1000;
            if left == 0 {
                crate::interrupts::enable();
                return;
            }
            left.min(MAX_WAIT_US)
        }
        None => MAX_WAIT_US,
    };
    crate::timer::wait_at_most_us(us, || PENDING.swap(false, Ordering::Acquire));
    PENDING.store(false, Ordering::Relaxed);
}
