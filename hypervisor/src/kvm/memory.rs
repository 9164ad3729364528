//! Guest-physical memory of a KVM cell: anonymous RAM and the link sections (memfds shared
//! with the link's other peers), each one KVM memory slot.

use std::fmt;
use std::os::fd::BorrowedFd;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use memmap2::{MmapOptions, MmapRaw};

use super::KvmError;

/// What a region holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionKind {
    /// The cell's own RAM (or its communication region).
    Ram,
    /// A section of a link's shared memory (`name` says which, for reports).
    Link {
        /// e.g. `telemetry/output-1`.
        name: String,
    },
}

/// One guest-physical region, backed by a host mapping, registered as one memory slot.
pub struct GuestRegion {
    gpa: u64,
    map: MmapRaw,
    read_only: bool,
    kind: RegionKind,
}

impl fmt::Debug for GuestRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestRegion")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("size", &format_args!("{:#x}", self.map.len()))
            .field("read_only", &self.read_only)
            .field("kind", &self.kind)
            .finish()
    }
}

impl GuestRegion {
    /// Zero-filled anonymous RAM of `size` bytes at `gpa`.
    pub fn ram(gpa: u64, size: u64) -> Result<Self, KvmError> {
        let map = MmapOptions::new()
            .len(to_usize(size)?)
            .map_anon()
            .map_err(|source| KvmError::Os {
                call: "mmap (guest RAM)",
                source,
            })?;
        // Not in forked children: a process cell's relay is a fork of the hypervisor that
        // lives as long as the cell (crate::cells), and would otherwise keep every page of
        // this private mapping shared copy-on-write, so that each page the guest writes
        // afterwards is copied.
        map.advise(memmap2::Advice::DontFork)
            .map_err(|source| KvmError::Os {
                call: "madvise (guest RAM, MADV_DONTFORK)",
                source,
            })?;
        Ok(Self {
            gpa,
            map: MmapRaw::from(map),
            read_only: false,
            kind: RegionKind::Ram,
        })
    }

    /// A link section (`fd`, `size` bytes) at `gpa`: mapped shared, read-only (and then a
    /// `KVM_MEM_READONLY` slot) when `read_only`.
    pub fn link_section(
        name: &str,
        fd: BorrowedFd<'_>,
        gpa: u64,
        size: u64,
        read_only: bool,
    ) -> Result<Self, KvmError> {
        let mut options = MmapOptions::new();
        options.len(to_usize(size)?);
        let map = if read_only {
            // SAFETY: the section is a memfd sealed against shrinking (crate::memory), so the
            // mapping can never lose its backing; we only hand its address to KVM.
            unsafe { options.map(&fd) }.map(MmapRaw::from)
        } else {
            options.map_raw(&fd)
        }
        .map_err(|source| KvmError::Os {
            call: "mmap (link section)",
            source,
        })?;
        Ok(Self {
            gpa,
            map,
            read_only,
            kind: RegionKind::Link {
                name: name.to_string(),
            },
        })
    }

    /// First guest-physical address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Whether the guest may only read it.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// What it holds.
    pub fn kind(&self) -> &RegionKind {
        &self.kind
    }

    /// Whether `gpa` lies inside.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.size()
    }

    fn overlaps(&self, other: &GuestRegion) -> bool {
        self.gpa < other.gpa + other.size() && other.gpa < self.gpa + self.size()
    }

    fn ptr_at(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let off = gpa.checked_sub(self.gpa)?;
        (off.checked_add(len as u64)? <= self.size())
            .then(|| self.map.as_mut_ptr().wrapping_add(off as usize))
    }
}

fn to_usize(size: u64) -> Result<usize, KvmError> {
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0 && s as u64 % super::layout::GUEST_PAGE == 0)
        .ok_or(KvmError::Config(format!(
            "memory size {size:#x} must be a non-zero multiple of 4 KiB"
        )))
}

/// The guest-physical memory of one cell: non-overlapping regions, slot = index.
#[derive(Debug, Default)]
pub struct GuestMemory {
    regions: Vec<GuestRegion>,
}

impl GuestMemory {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a region; refuses one that overlaps another.
    pub fn add(&mut self, region: GuestRegion) -> Result<(), KvmError> {
        if let Some(other) = self.regions.iter().find(|r| r.overlaps(&region)) {
            return Err(KvmError::Config(format!(
                "guest memory {:#x}..{:#x} ({:?}) overlaps {:#x}..{:#x} ({:?})",
                region.gpa,
                region.gpa + region.size(),
                region.kind,
                other.gpa,
                other.gpa + other.size(),
                other.kind
            )));
        }
        self.regions.push(region);
        Ok(())
    }

    /// The regions, in slot order.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// The region holding `gpa`.
    pub fn region_at(&self, gpa: u64) -> Option<&GuestRegion> {
        self.regions.iter().find(|r| r.contains(gpa))
    }

    /// Registers every region with `vm` as slot = index (read-only regions as
    /// `KVM_MEM_READONLY`).
    pub fn register(&self, vm: &VmFd) -> Result<(), KvmError> {
        for (slot, r) in self.regions.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if r.read_only { KVM_MEM_READONLY } else { 0 },
                guest_phys_addr: r.gpa,
                memory_size: r.size(),
                userspace_addr: r.map.as_mut_ptr() as u64,
            };
            // SAFETY: the mapping is owned by `self`, which the cell keeps alive as long as
            // the VM (the VM fd is closed first, see `cell::Vm`), and it is as large as the
            // slot; read-only slots are backed by read-only mappings KVM only reads.
            unsafe { vm.set_user_memory_region(region) }.map_err(|e| KvmError::Kvm {
                call: "KVM_SET_USER_MEMORY_REGION",
                source: e,
            })?;
        }
        Ok(())
    }

    /// Copies `data` into RAM at `gpa` (the whole range must be inside one writable region).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), KvmError> {
        let ptr = self
            .regions
            .iter()
            .filter(|r| !r.read_only)
            .find_map(|r| r.ptr_at(gpa, data.len()))
            .ok_or_else(|| {
                KvmError::Config(format!(
                    "{} bytes at {gpa:#x} do not fit in guest RAM",
                    data.len()
                ))
            })?;
        // SAFETY: `ptr..ptr+len` lies inside a live mapping we own (checked by `ptr_at`);
        // the guest may run concurrently, so this is a plain byte copy into shared memory
        // without references.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
        Ok(())
    }

    /// Copies guest memory at `gpa` into `buf`; `None` if it is not all inside one region.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Option<()> {
        let ptr = self.regions.iter().find_map(|r| r.ptr_at(gpa, buf.len()))?;
        // SAFETY: as in `write`; the guest may change the bytes while we copy them, which
        // gives some mix of old and new values, never undefined behaviour on our side
        // because no reference to the guest memory is formed.
        unsafe { std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), buf.len()) };
        Some(())
    }

    /// A 32-bit little-endian load at `gpa` (must be 4-byte aligned), as one atomic access.
    pub fn read_u32(&self, gpa: u64) -> Option<u32> {
        if gpa % 4 != 0 {
            return None;
        }
        let ptr = self.regions.iter().find_map(|r| r.ptr_at(gpa, 4))?;
        // SAFETY: aligned (mapping page-aligned, gpa 4-aligned), in bounds, alive; the guest
        // writes this word concurrently, hence an atomic load.
        let word = unsafe { &*(ptr as *const std::sync::atomic::AtomicU32) };
        Some(u32::from_le(
            word.load(std::sync::atomic::Ordering::Acquire),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_may_not_overlap_and_copy_in_and_out() {
        let mut m = GuestMemory::new();
        m.add(GuestRegion::ram(0, 0x2000).unwrap()).unwrap();
        assert!(m.add(GuestRegion::ram(0x1000, 0x1000).unwrap()).is_err());
        m.add(GuestRegion::ram(0x2000, 0x1000).unwrap()).unwrap();
        m.write(0x1ffc, &[1, 2, 3, 4]).unwrap();
        assert_eq!(m.read_u32(0x1ffc), Some(0x0403_0201));
        assert!(m.write(0x1ffe, &[0; 4]).is_err(), "crosses regions");
        let mut b = [0u8; 2];
        m.read(0x1ffd, &mut b).unwrap();
        assert_eq!(b, [2, 3]);
        assert!(m.region_at(0x2fff).is_some());
        assert!(m.region_at(0x3000).is_none());
        assert!(GuestRegion::ram(0, 0x1234).is_err());
    }
}
