//! The guest-side driver: one ivshmem v2 device seen through its registers and its mapped
//! shared-memory sections.

use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

use crate::doorbell::Doorbell;
use crate::layout::{SharedMemoryLayout, MAX_SUPPORTED_PEERS};
use crate::regs::{self, RegisterAccess, INT_CONTROL_ENABLE};

/// One mapped shared-memory section: where this cell sees it and whether it may write it.
///
/// A `Section` is only a description; reading or writing through [`Section::as_ptr`] is up
/// to the user (`shmring` does it), except for the driver's own volatile reads of the state
/// table. Construction is `unsafe` because the driver relies on the pointer being valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: a `Section` is an address range in shared memory that every thread of the cell sees
// the same way; it owns nothing thread-bound. All accesses through it are volatile or atomic
// (driver) or the user's own unsafe code.
unsafe impl Send for Section {}
// SAFETY: see `Send`; `&Section` only hands out the same raw pointer.
unsafe impl Sync for Section {}

impl Section {
    /// Describes `len` bytes of shared memory mapped at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped readable (and writable if `writable`) for as long as
    /// the section or any driver holding it is used. `ptr` must be 4-byte aligned if the
    /// section is used as a state table.
    pub const unsafe fn new(ptr: NonNull<u8>, len: usize, writable: bool) -> Self {
        Self { ptr, len, writable }
    }

    /// A zero-length section (for a link with output size 0).
    pub const fn empty(writable: bool) -> Self {
        Self {
            ptr: NonNull::dangling(),
            len: 0,
            writable,
        }
    }

    /// The start of the section in this cell's address space.
    pub const fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The start of the section as `NonNull`.
    pub const fn as_non_null(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Its length in bytes.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this cell may write it (its own output section and the R/W section).
    pub const fn is_writable(&self) -> bool {
        self.writable
    }
}

/// The sections of one link as this cell has them mapped. Output sections are separate
/// pointers because process cells map each section on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sections {
    /// The state table (read-only).
    pub state_table: Section,
    /// The R/W section, if the link has one.
    pub rw: Option<Section>,
    /// Output sections by peer ID; this peer's is writable, the others read-only.
    pub outputs: [Option<Section>; MAX_SUPPORTED_PEERS],
}

impl Sections {
    /// Only a state table; add the other sections through the public fields.
    pub const fn new(state_table: Section) -> Self {
        Self {
            state_table,
            rw: None,
            outputs: [None; MAX_SUPPORTED_PEERS],
        }
    }

    /// The sections of a link whose whole shared memory is mapped contiguously at `base`
    /// (bare metal, or Jailhouse with the base address from the vendor capability), laid out
    /// by `layout`, as seen by peer `own_id`.
    ///
    /// # Safety
    /// `base..base+layout.total_size()` must be mapped for as long as the sections are used:
    /// the own output section and the R/W section writable, the rest at least readable. `base`
    /// must be page-aligned.
    pub unsafe fn from_contiguous(
        base: NonNull<u8>,
        layout: &SharedMemoryLayout,
        own_id: u16,
    ) -> Self {
        let section = |offset: u64, size: u64, writable: bool| {
            // SAFETY: every region of `layout` lies inside `0..total_size`, which the caller
            // guarantees is mapped at `base`.
            unsafe { Section::new(base.byte_add(offset as usize), size as usize, writable) }
        };
        let table = layout.state_table();
        let mut sections = Sections::new(section(table.offset, table.size, false));
        let rw = layout.rw();
        if !rw.is_empty() {
            sections.rw = Some(section(rw.offset, rw.size, true));
        }
        for peer in 0..layout.max_peers() {
            if let Some(output) = layout.output(peer) {
                sections.outputs[usize::from(peer)] =
                    Some(section(output.offset, output.size, peer == own_id));
            }
        }
        sections
    }
}

/// Why [`Ivshmem::new`] refused a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// `MAX_PEERS` is below 2 or above [`MAX_SUPPORTED_PEERS`].
    #[error("MAX_PEERS = {max_peers}: must be between 2 and {MAX_SUPPORTED_PEERS}")]
    BadMaxPeers {
        /// The register's value.
        max_peers: u32,
    },
    /// `ID` is not below `MAX_PEERS`.
    #[error("ID = {id} is not below MAX_PEERS = {max_peers}")]
    BadId {
        /// The register's value.
        id: u32,
        /// `MAX_PEERS`.
        max_peers: u32,
    },
    /// The state table section is too short or misaligned for one `u32` per peer.
    #[error(
        "the state table section ({len} bytes) cannot hold {needed} bytes or is not 4-byte aligned"
    )]
    BadStateTable {
        /// The section's length.
        len: usize,
        /// `4 * MAX_PEERS`.
        needed: usize,
    },
    /// This peer's own output section is missing or not writable.
    #[error("the output section of this peer (ID {id}) is missing or not writable")]
    BadOwnOutput {
        /// This peer's ID.
        id: u16,
    },
}

/// The guest-side driver of one ivshmem v2 device.
#[derive(Debug)]
pub struct Ivshmem<R: RegisterAccess> {
    regs: R,
    sections: Sections,
    id: u16,
    max_peers: u16,
}

impl<R: RegisterAccess> Ivshmem<R> {
    /// Reads `ID` and `MAX_PEERS` and checks them and the sections: `2 <= MAX_PEERS <=
    /// MAX_SUPPORTED_PEERS`, `ID < MAX_PEERS`, the state table holds one aligned `u32` per
    /// peer, and this peer's output section is present and writable (pass
    /// [`Section::empty`]`(true)` on a link without output sections).
    pub fn new(regs: R, sections: Sections) -> Result<Self, DriverError> {
        let max_peers = regs.read32(regs::MAX_PEERS);
        if !(2..=MAX_SUPPORTED_PEERS as u32).contains(&max_peers) {
            return Err(DriverError::BadMaxPeers { max_peers });
        }
        let id = regs.read32(regs::ID);
        if id >= max_peers {
            return Err(DriverError::BadId { id, max_peers });
        }
        let (id, max_peers) = (id as u16, max_peers as u16);
        let table = sections.state_table;
        let needed = 4 * usize::from(max_peers);
        if table.len() < needed || table.as_ptr() as usize % 4 != 0 {
            return Err(DriverError::BadStateTable {
                len: table.len(),
                needed,
            });
        }
        match sections.outputs[usize::from(id)] {
            Some(own) if own.is_writable() => {}
            _ => return Err(DriverError::BadOwnOutput { id }),
        }
        Ok(Self {
            regs,
            sections,
            id,
            max_peers,
        })
    }

    /// This peer's ID on the link.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Number of peers on the link, self included.
    pub fn max_peers(&self) -> u16 {
        self.max_peers
    }

    /// This peer's state (read from the `STATE` register).
    pub fn state(&self) -> u32 {
        self.regs.read32(regs::STATE)
    }

    /// Writes `STATE`. A different value is published in the state table and interrupts the
    /// other peers; writing the same value again does nothing.
    pub fn set_state(&self, state: u32) {
        self.regs.write32(regs::STATE, state);
    }

    /// `peer`'s entry in the state table, or `None` if `peer >= max_peers`. A volatile read
    /// of untrusted memory: any value is possible and must be handled; 0 means "not there".
    /// It is followed by an acquire fence, so reads of the peer's output section issued after
    /// it see at least what the peer wrote before publishing this state.
    pub fn peer_state(&self, peer: u16) -> Option<u32> {
        if peer >= self.max_peers {
            return None;
        }
        let entry = self.sections.state_table.as_ptr().cast::<u32>();
        // SAFETY: `new` checked that the state table section is 4-byte aligned and holds
        // `max_peers` u32 entries, and `Section::new`'s contract keeps it mapped; `peer` is
        // in range.
        let state = unsafe { entry.add(usize::from(peer)).read_volatile() };
        fence(Ordering::Acquire);
        Some(state)
    }

    /// Sets `INT_CONTROL` bit 0: doorbells and state changes interrupt this peer.
    pub fn enable_interrupts(&self) {
        self.regs.write32(regs::INT_CONTROL, INT_CONTROL_ENABLE);
    }

    /// Clears `INT_CONTROL`: no interrupts reach this peer (and the device drops them).
    pub fn disable_interrupts(&self) {
        self.regs.write32(regs::INT_CONTROL, 0);
    }

    /// Whether `INT_CONTROL` bit 0 is set (in one-shot mode it clears on every delivery).
    pub fn interrupts_enabled(&self) -> bool {
        self.regs.read32(regs::INT_CONTROL) & INT_CONTROL_ENABLE != 0
    }

    /// Re-arms interrupts after a delivery in one-shot mode (writes `INT_CONTROL` = 1).
    pub fn rearm(&self) {
        self.enable_interrupts();
    }

    /// Rings `target`'s doorbell on `vector`. All memory writes issued before are visible to
    /// the target before its interrupt (a release fence precedes the register write). A target
    /// that does not exist, is not active or has interrupts disabled is not interrupted.
    pub fn ring(&self, target: u16, vector: u16) {
        fence(Ordering::Release);
        self.regs
            .write32(regs::DOORBELL, Doorbell::new(target, vector).encode());
    }

    /// Rings `target` on vector 0 (the only vector with INTx).
    pub fn ring_peer(&self, target: u16) {
        self.ring(target, 0);
    }

    /// This peer's output section (writable).
    pub fn own_output(&self) -> Section {
        // `new` checked that it is present.
        self.sections.outputs[usize::from(self.id)].unwrap_or(Section::empty(true))
    }

    /// `peer`'s output section (read-only unless it is this peer's), or `None` if `peer` is
    /// out of range or the section was not mapped.
    pub fn peer_output(&self, peer: u16) -> Option<Section> {
        if peer >= self.max_peers {
            return None;
        }
        self.sections.outputs[usize::from(peer)]
    }

    /// The R/W section, if the link has one.
    pub fn rw(&self) -> Option<Section> {
        self.sections.rw
    }

    /// The state table section.
    pub fn state_table(&self) -> Section {
        self.sections.state_table
    }

    /// All sections.
    pub fn sections(&self) -> &Sections {
        &self.sections
    }

    /// The register access this driver uses.
    pub fn registers(&self) -> &R {
        &self.regs
    }
}
