//! The BAR0 register page: offsets, bits and the [`RegisterAccess`] abstraction.
//!
//! Every register is 32 bits wide and must be accessed with aligned 32-bit accesses only; the
//! hypervisor treats any other access as illegal and stops the cell. Offsets in the page that
//! are not listed here read 0 and ignore writes.

use core::ptr::NonNull;

/// `ID` (read-only): this peer's ID on the link, `0..MAX_PEERS`.
pub const ID: u32 = 0x00;
/// `MAX_PEERS` (read-only): number of peers on the link, self included.
pub const MAX_PEERS: u32 = 0x04;
/// `INT_CONTROL` (read/write): bit 0 ([`INT_CONTROL_ENABLE`]) enables interrupts, both
/// doorbells and state changes. 0 after reset.
pub const INT_CONTROL: u32 = 0x08;
/// `DOORBELL` (write-only, reads 0): bits 0–15 vector, bits 16–31 target peer ID; see
/// [`crate::doorbell::Doorbell`].
pub const DOORBELL: u32 = 0x0C;
/// `STATE` (read/write): this peer's state. Writing a different value stores it in the state
/// table and raises vector 0 on every other peer. 0 after reset.
pub const STATE: u32 = 0x10;

/// Size of the register page behind BAR0 (4 KiB).
pub const REGISTER_PAGE_SIZE: u32 = 0x1000;

/// `INT_CONTROL` bit 0: interrupts enabled. In one-shot mode the device clears it whenever it
/// delivers an interrupt; writing it again re-arms.
pub const INT_CONTROL_ENABLE: u32 = 1;

/// 32-bit access to the register page of one ivshmem device.
///
/// Implemented by [`Mmio`] (bare metal, or UIO map 0 in a Linux process) and by the hosted
/// endpoint of process cells (`linux_uio_client::hosted`). Offsets are byte offsets into the
/// register page and are always one of the constants of this module (or another aligned offset
/// below [`REGISTER_PAGE_SIZE`]).
pub trait RegisterAccess {
    /// Reads the 32-bit register at `offset`.
    fn read32(&self, offset: u32) -> u32;
    /// Writes `value` to the 32-bit register at `offset`.
    fn write32(&self, offset: u32, value: u32);
}

impl<R: RegisterAccess + ?Sized> RegisterAccess for &R {
    fn read32(&self, offset: u32) -> u32 {
        (**self).read32(offset)
    }
    fn write32(&self, offset: u32, value: u32) {
        (**self).write32(offset, value)
    }
}

/// Volatile memory-mapped access to a register page.
///
/// Each [`RegisterAccess`] call is exactly one volatile, aligned 32-bit load or store, which is
/// what the device requires.
#[derive(Debug)]
pub struct Mmio {
    base: NonNull<u32>,
}

// SAFETY: `Mmio` only holds the address of a device register page. Every access through it is a
// single volatile 32-bit load or store, which the device handles atomically no matter which
// thread issues it; there is no thread-local state.
unsafe impl Send for Mmio {}
// SAFETY: as above; `&Mmio` gives nothing beyond those single volatile accesses.
unsafe impl Sync for Mmio {}

impl Mmio {
    /// Wraps the register page mapped at `base`.
    ///
    /// # Safety
    /// `base` must be 4-byte aligned and point to [`REGISTER_PAGE_SIZE`] bytes of an ivshmem
    /// register page (BAR0 mapped uncached on bare metal, or UIO map 0) that stays mapped for
    /// as long as the returned value (and anything it is moved into) lives.
    pub unsafe fn new(base: NonNull<u8>) -> Self {
        Self { base: base.cast() }
    }

    /// The address of the register page.
    pub fn base(&self) -> NonNull<u8> {
        self.base.cast()
    }

    fn register(&self, offset: u32) -> *mut u32 {
        assert!(
            offset % 4 == 0 && offset < REGISTER_PAGE_SIZE,
            "ivshmem register offset {offset:#x} is misaligned or outside the register page"
        );
        // SAFETY: `offset` is below the page size (checked above) and the constructor's caller
        // guarantees the whole page is mapped, so the result stays inside that mapping.
        unsafe { self.base.as_ptr().byte_add(offset as usize) }
    }
}

impl RegisterAccess for Mmio {
    /// # Panics
    /// If `offset` is not 4-byte aligned or not below [`REGISTER_PAGE_SIZE`].
    fn read32(&self, offset: u32) -> u32 {
        let register = self.register(offset);
        // SAFETY: `register` is an aligned address inside the mapped register page (see
        // `Mmio::new` and `register`).
        unsafe { register.read_volatile() }
    }

    /// # Panics
    /// If `offset` is not 4-byte aligned or not below [`REGISTER_PAGE_SIZE`].
    fn write32(&self, offset: u32, value: u32) {
        let register = self.register(offset);
        // SAFETY: `register` is an aligned address inside the mapped register page (see
        // `Mmio::new` and `register`).
        unsafe { register.write_volatile(value) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_reads_and_writes_the_page_volatilely() {
        let mut page = [0u32; (REGISTER_PAGE_SIZE / 4) as usize];
        page[(MAX_PEERS / 4) as usize] = 2;
        let base = NonNull::new(page.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `page` is a 4 KiB, 4-byte aligned buffer that outlives `regs`.
        let regs = unsafe { Mmio::new(base) };
        assert_eq!(regs.read32(MAX_PEERS), 2);
        regs.write32(STATE, 7);
        regs.write32(REGISTER_PAGE_SIZE - 4, 9);
        assert_eq!(page[(STATE / 4) as usize], 7);
        assert_eq!(page[page.len() - 1], 9);
    }

    #[test]
    #[should_panic(expected = "misaligned or outside")]
    fn mmio_refuses_offsets_outside_the_page() {
        let mut page = [0u32; (REGISTER_PAGE_SIZE / 4) as usize];
        let base = NonNull::new(page.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `page` is a 4 KiB, 4-byte aligned buffer that outlives `regs`.
        let regs = unsafe { Mmio::new(base) };
        regs.read32(REGISTER_PAGE_SIZE);
    }
}
