//! The atomic word type used for every shared control word, swappable for loom.
//!
//! The ring never owns its atomics: they live inside the shared regions, so the ring views an
//! aligned `u64` in a region as an atomic through [`word`]. In normal builds that is
//! `AtomicU64::from_ptr` (zero cost). Under `--cfg loom` every distinct address gets one loom
//! `AtomicU64` for the duration of a loom execution, so the loom models run the ring's real
//! index, header and handshake code against loom's model of the memory orderings.

#[cfg(not(loom))]
mod imp {
    pub(crate) use core::sync::atomic::{fence, AtomicU64, Ordering};

    /// Views the aligned word at `p` as an atomic.
    ///
    /// # Safety
    /// `p` must be 8-byte aligned and point into a region that stays mapped for `'a`. Only
    /// `Relaxed`/`Acquire` loads may be performed on words of a region mapped read-only (the
    /// peer's part); the ring never stores into the peer's part.
    #[inline(always)]
    pub(crate) unsafe fn word<'a>(p: *mut u64) -> &'a AtomicU64 {
        // SAFETY: forwarded to the caller (alignment and lifetime of the mapping).
        unsafe { AtomicU64::from_ptr(p) }
    }
}

#[cfg(loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};
    use std::boxed::Box;
    use std::sync::Mutex;
    use std::vec::Vec;

    loom::lazy_static! {
        /// Address -> loom atomic, reset by loom at the start of every execution.
        static ref WORDS: Mutex<Vec<(usize, &'static AtomicU64)>> = Mutex::new(Vec::new());
    }

    /// Loom stand-in for `AtomicU64::from_ptr`: one loom atomic per address and execution,
    /// created with the word's current plain value.
    ///
    /// # Safety
    /// As the non-loom version.
    pub(crate) unsafe fn word<'a>(p: *mut u64) -> &'a AtomicU64 {
        let mut words = WORDS.lock().unwrap();
        let key = p as usize;
        if let Some((_, w)) = words.iter().find(|(k, _)| *k == key) {
            return w;
        }
        // SAFETY: the caller guarantees `p` is aligned and mapped.
        let initial = unsafe { p.read() };
        let w: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(initial)));
        words.push((key, w));
        w
    }
}

pub(crate) use imp::*;

/// Acquire load of a word in the peer's part, which may be mapped read-only: a `Relaxed` load
/// (the only atomic load the standard library promises to work on read-only memory, for 8-byte
/// words on 64-bit targets) followed by an `Acquire` fence, which gives the load acquire
/// semantics (fence-to-store synchronisation). On x86-64 the fence is free; on AArch64 it costs
/// about what `ldar` does.
#[inline(always)]
pub(crate) fn load_acquire(w: &AtomicU64) -> u64 {
    let value = w.load(Ordering::Relaxed);
    fence(Ordering::Acquire);
    value
}
