//! The communication region at 0x100000 (kvm-cells.md; Jailhouse's `struct
//! jailhouse_comm_region`, revision 2, x86 part).
//!
//! The VMM (or Jailhouse) writes it before the cell starts; the cell writes `cell_state` and
//! `reply_from_cell`. Every access is volatile: the other side changes it behind our back.

use core::ptr;

pub use ivshmem_dev::comm::{offset, CellState, ClockEpoch, REVISION, SIGNATURE};

/// Guest-physical (and, identity-mapped, virtual) address of the region.
pub const COMM_REGION: usize = ivshmem_dev::comm::COMM_REGION_ADDRESS as usize;

fn field<T>(offset: usize) -> *mut T {
    (COMM_REGION + offset) as *mut T
}

/// Reads a field of the region.
fn read<T: Copy>(offset: usize) -> T {
    // SAFETY: the comm region page is mapped (identity map of the low 4 GiB) and belongs to
    // this cell; every field is naturally aligned at its offset.
    unsafe { ptr::read_volatile(field::<T>(offset)) }
}

/// Why the region was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// The signature found.
    pub signature: [u8; 6],
    /// The revision found.
    pub revision: u16,
}

/// Checks signature and revision.
pub fn check() -> Result<(), Mismatch> {
    let mut signature = [0u8; 6];
    for (i, byte) in signature.iter_mut().enumerate() {
        *byte = read(offset::SIGNATURE + i);
    }
    let revision = read(offset::REVISION);
    if signature == SIGNATURE && revision == REVISION {
        Ok(())
    } else {
        Err(Mismatch {
            signature,
            revision,
        })
    }
}

/// Checks the region as the runtime does before `main`; on a mismatch prints why, sets
/// `cell_state` to [`CellState::FailedCommRev`] and stops the CPU.
pub fn verify_or_stop() {
    if let Err(Mismatch {
        signature,
        revision,
    }) = check()
    {
        let shown = core::str::from_utf8(&signature).unwrap_or("<not text>");
        crate::println!(
            "FATAL: communication region mismatch: signature {:?} revision {} (want \"JHCOMM\" revision {})",
            shown,
            revision,
            REVISION
        );
        set_cell_state(CellState::FailedCommRev);
        crate::halt();
    }
}

/// Writes `cell_state`.
pub fn set_cell_state(state: CellState) {
    // SAFETY: as for `read`; the cell owns `cell_state`.
    unsafe { ptr::write_volatile(field::<u32>(offset::CELL_STATE), state as u32) }
}

/// Reads `cell_state` back.
pub fn cell_state() -> u32 {
    read(offset::CELL_STATE)
}

/// `msg_to_cell`.
pub fn msg_to_cell() -> u32 {
    read(offset::MSG_TO_CELL)
}

/// The ACPI PM timer's port (0 if there is none).
pub fn pm_timer_port() -> u16 {
    read(offset::PM_TIMER_ADDRESS)
}

/// The number of CPUs of the cell.
pub fn num_cpus() -> u16 {
    read(offset::NUM_CPUS)
}

/// The TSC frequency in kHz, 0 if unknown.
pub fn tsc_khz() -> u32 {
    read(offset::TSC_KHZ)
}

/// The clock epoch the VMM left in the region (this project's extension, see
/// `ivshmem_dev::comm`), if there is one: turns TSC readings into host `CLOCK_MONOTONIC` ns.
pub fn clock_epoch() -> Option<ClockEpoch> {
    let mut image = [0u8; offset::CLOCK_END];
    for (i, byte) in image.iter_mut().enumerate() {
        *byte = read(i);
    }
    ClockEpoch::parse(&image)
}

/// Overwrites the revision field. Only for the test inmate that plays an older hypervisor to
/// exercise [`verify_or_stop`]'s failure path; a real inmate never writes it.
pub fn overwrite_revision_for_test(revision: u16) {
    // SAFETY: as for `set_cell_state`: the page belongs to this cell.
    unsafe { ptr::write_volatile(field::<u16>(offset::REVISION), revision) }
}
