//! Link memory for process cells: one memfd per section, one eventfd per (peer, vector).
//!
//! Every section of a link (state table, R/W section, one output section per peer) is its own
//! memfd, sized once and sealed against shrinking and growing, so a cell can never truncate
//! memory that another process has mapped (which would turn its accesses into `SIGBUS`).
//! Read-only fds for cells are made by reopening `/proc/self/fd/N` with `O_RDONLY`: a cell
//! that tries `mmap(PROT_WRITE, MAP_SHARED)` on such an fd gets `EACCES`, and `mprotect` cannot
//! upgrade a read-only shared mapping either.
//!
//! # What "read-only" protects against
//!
//! A read-only *fd* is not a read-only *file*: a memfd is an inode of the cell's own uid, so a
//! process cell can open `/proc/self/fd/N` (or `/proc/<hypervisor>/fd/N`) again with
//! `O_RDWR` and get a writable fd for the same memory. Two cases differ:
//!
//! - **The state table** has exactly one writer, the hypervisor. [`LinkMemory::create`] maps it
//!   read-write first ([`MappedStateTable`]) and then seals it with `F_SEAL_FUTURE_WRITE` and
//!   `F_SEAL_SEAL` (Linux >= 5.1): the hypervisor's existing mapping stays writable, but from
//!   then on every `write(2)` and every new shared writable mapping fails with `EPERM`, through
//!   any fd, including a reopened one. No cell can forge a peer's state.
//! - **Output sections** must stay writable for their owning cell for the link's whole life
//!   (it maps its own section again after a restart), so they cannot be sealed, and Linux has
//!   no per-process write permission on one memfd. Every memfd is therefore made mode 0600
//!   (owner: the hypervisor's uid). A cell whose program runs under a uid of its own (the
//!   `uid` key of a process cell; the hypervisor must run as root) cannot reopen any section
//!   (`EACCES` through `/proc/self/fd/N`, and `/proc/<hypervisor>/fd` is closed to it), cannot
//!   upgrade a read-only fd or mapping (`mmap`/`mprotect`: `EACCES`, `pwrite`: `EBADF`) and
//!   cannot change the mode (`fchmod`: `EPERM`): it writes only what it was given writable.
//!   A process cell of the hypervisor's own uid can still reopen a peer's output section
//!   `O_RDWR` and write it; such cells are trusted not to (they are already trusted with
//!   everything a same-uid process can do: `ptrace`, `/proc/<pid>/mem`). The `SO_PEERCRED`
//!   check on attach admits only the hypervisor's uid and the cells' configured uids. The R/W section is writable by every peer by definition. KVM cells
//!   see only the guest-physical mappings the hypervisor gives them, where read-only is
//!   enforced by the MMU.
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag, SealFlag};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::stat::Mode;

/// Errors while creating or mapping link memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `memfd_create` failed.
    #[error("cannot create memfd for section `{section}`: {source}")]
    Create {
        /// Section name (link and part).
        section: String,
        /// OS error.
        source: io::Error,
    },
    /// Sizing or sealing the memfd failed.
    #[error("cannot size or seal section `{section}` ({size} bytes): {source}")]
    SizeOrSeal {
        /// Section name.
        section: String,
        /// Requested size.
        size: u64,
        /// OS error.
        source: io::Error,
    },
    /// Reopening a section read-only failed.
    #[error("cannot reopen section `{section}` read-only: {source}")]
    ReadOnly {
        /// Section name.
        section: String,
        /// OS error.
        source: io::Error,
    },
    /// Mapping a section failed.
    #[error("cannot map section `{section}`: {source}")]
    Map {
        /// Section name.
        section: String,
        /// OS error.
        source: io::Error,
    },
    /// Creating an eventfd failed.
    #[error("cannot create interrupt eventfd: {0}")]
    EventFd(io::Error),
    /// A size does not fit the address space or a state table is too small.
    #[error("section `{section}`: {reason}")]
    BadSize {
        /// Section name.
        section: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// One section of a link: a sealed memfd of fixed size, plus a read-only fd for it.
#[derive(Debug)]
pub struct SectionMemory {
    name: String,
    size: u64,
    read_write: OwnedFd,
    read_only: OwnedFd,
}

impl SectionMemory {
    /// Creates a memfd named `name` of `size` bytes (zero-filled), sealed against shrinking,
    /// growing and further sealing, and a read-only reopen of it.
    pub fn create(name: &str, size: u64) -> Result<Self, MemoryError> {
        Self::create_sealed(name, size, SealFlag::F_SEAL_SEAL)
    }

    /// Like [`SectionMemory::create`], but leaves sealing open so that
    /// [`SectionMemory::seal_future_writes`] can follow once the writer has mapped it.
    fn create_open(name: &str, size: u64) -> Result<Self, MemoryError> {
        Self::create_sealed(name, size, SealFlag::empty())
    }

    fn create_sealed(name: &str, size: u64, extra_seals: SealFlag) -> Result<Self, MemoryError> {
        let section = || name.to_string();
        if size == 0 || usize::try_from(size).is_err() {
            return Err(MemoryError::BadSize {
                section: section(),
                reason: "size must be > 0 and fit usize",
            });
        }
        let fd = memfd_create(
            format!("ivshmem:{name}").replace('\0', "?").as_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|errno| MemoryError::Create {
            section: section(),
            source: errno.into(),
        })?;
        let file = File::from(fd);
        let size_err = |source| MemoryError::SizeOrSeal {
            section: section(),
            size,
            source,
        };
        file.set_len(size).map_err(size_err)?;
        // Only the hypervisor's uid may open the memfd again (through /proc/<pid>/fd/N): a
        // cell running under a uid of its own can use only the fds it was given.
        nix::sys::stat::fchmod(&file, Mode::S_IRUSR | Mode::S_IWUSR)
            .map_err(|errno| size_err(errno.into()))?;
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | extra_seals),
        )
        .map_err(|errno| size_err(errno.into()))?;
        let read_write = OwnedFd::from(file);
        let read_only =
            reopen_read_only(read_write.as_fd()).map_err(|source| MemoryError::ReadOnly {
                section: section(),
                source,
            })?;
        Ok(Self {
            name: name.to_string(),
            size,
            read_write,
            read_only,
        })
    }

    /// The section's name (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The read-write fd (only ever handed to the section's writer).
    pub fn read_write_fd(&self) -> BorrowedFd<'_> {
        self.read_write.as_fd()
    }

    /// The read-only fd (handed to readers).
    pub fn read_only_fd(&self) -> BorrowedFd<'_> {
        self.read_only.as_fd()
    }

    /// Seals the section with `F_SEAL_FUTURE_WRITE` and `F_SEAL_SEAL`: mappings made before
    /// stay writable, every later `write(2)` or shared writable mapping fails with `EPERM`,
    /// whichever fd it goes through (also `/proc/self/fd/N` reopened `O_RDWR`).
    fn seal_future_writes(&self) -> Result<(), MemoryError> {
        fcntl(
            &self.read_write,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_FUTURE_WRITE | SealFlag::F_SEAL_SEAL),
        )
        .map(drop)
        .map_err(|errno| MemoryError::SizeOrSeal {
            section: self.name.clone(),
            size: self.size,
            source: errno.into(),
        })
    }

    /// Maps the section read-write into the hypervisor (fails with `EPERM` once the section
    /// is sealed against writes, like the state table of a [`LinkMemory`]).
    pub fn map_raw(&self) -> Result<MmapRaw, MemoryError> {
        MmapOptions::new()
            .len(self.size as usize)
            .map_raw(&self.read_write)
            .map_err(|source| MemoryError::Map {
                section: self.name.clone(),
                source,
            })
    }
}

/// Opens `/proc/self/fd/N` with `O_RDONLY`: a new open file description of the same memfd
/// that can never be mapped writable and shared.
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(open(
        path.as_str(),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// An interrupt line of one peer (or any other wake-up the hypervisor polls, such as a stop
/// request): a non-blocking, close-on-exec eventfd. Writing adds to its counter (raising the
/// interrupt); the receiver reads it to acknowledge. The one eventfd type of the hypervisor.
#[derive(Debug)]
pub struct InterruptEventFd {
    fd: EventFd,
}

impl InterruptEventFd {
    /// Creates a non-blocking, close-on-exec eventfd with counter 0.
    pub fn new() -> Result<Self, MemoryError> {
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map(|fd| Self { fd })
            .map_err(|errno| MemoryError::EventFd(errno.into()))
    }

    /// Raises the interrupt (adds 1 to the counter). A full counter (impossible in practice)
    /// already means "pending", so `EAGAIN` is not an error.
    pub fn signal(&self) -> io::Result<()> {
        match self.fd.write(1) {
            Ok(_) | Err(Errno::EAGAIN) => Ok(()),
            Err(errno) => Err(errno.into()),
        }
    }

    /// Reads and clears the counter; returns 0 if nothing was pending.
    pub fn drain(&self) -> io::Result<u64> {
        match self.fd.read() {
            Ok(count) => Ok(count),
            Err(Errno::EAGAIN) => Ok(0),
            Err(errno) => Err(errno.into()),
        }
    }

    /// The fd (sent to cells, polled by the hypervisor).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The state table, mapped read-write in the hypervisor; 32-bit atomic accesses only.
///
/// Implements the device model's `StateTable`, so the device writes straight into the
/// memory every cell maps read-only. Clones share one mapping.
#[derive(Debug, Clone)]
pub struct MappedStateTable {
    map: Arc<MmapRaw>,
    entries: usize,
}

impl MappedStateTable {
    /// Maps `section` and serves `entries` (= max_peers) u32 entries from its start. Fails
    /// once the section is sealed against writes; use [`LinkMemory::state_table_map`] for a
    /// link's table.
    pub fn new(section: &SectionMemory, entries: usize) -> Result<Self, MemoryError> {
        if (entries as u64).saturating_mul(4) > section.size() {
            return Err(MemoryError::BadSize {
                section: section.name().to_string(),
                reason: "state table smaller than 4 bytes per peer",
            });
        }
        Ok(Self {
            map: Arc::new(section.map_raw()?),
            entries,
        })
    }

    fn entry(&self, peer: u16) -> Option<&AtomicU32> {
        let index = peer as usize;
        if index >= self.entries {
            return None;
        }
        // SAFETY: the mapping is page-aligned, at least 4*entries bytes long (checked in
        // `new`) and lives as long as `self`; AtomicU32 has the alignment of u32, and all
        // processes access the table with aligned 32-bit accesses only.
        Some(unsafe { &*(self.map.as_ptr().add(index * 4) as *const AtomicU32) })
    }

    /// Reads peer `peer`'s state (0 for an out-of-range peer).
    pub fn read(&self, peer: u16) -> u32 {
        self.entry(peer).map_or(0, |e| e.load(Ordering::SeqCst))
    }

    /// Writes peer `peer`'s state (ignored for an out-of-range peer).
    pub fn write(&self, peer: u16, value: u32) {
        if let Some(e) = self.entry(peer) {
            e.store(value, Ordering::SeqCst);
        }
    }

    /// Sets every entry to 0.
    pub fn clear(&self) {
        for peer in 0..self.entries {
            self.write(peer as u16, 0);
        }
    }

    /// Number of entries (peers).
    pub fn entries(&self) -> usize {
        self.entries
    }
}

impl crate::device::StateTable for MappedStateTable {
    fn read(&self, peer: u16) -> u32 {
        MappedStateTable::read(self, peer)
    }

    fn write(&mut self, peer: u16, value: u32) {
        MappedStateTable::write(self, peer, value)
    }

    fn clear(&mut self) {
        MappedStateTable::clear(self)
    }
}

/// All memory and interrupt lines of one link.
#[derive(Debug)]
pub struct LinkMemory {
    /// The state table section, sealed against writes except through the hypervisor's own
    /// mapping ([`LinkMemory::state_table_map`]).
    pub state_table: SectionMemory,
    state_table_map: MappedStateTable,
    /// The R/W section, if its size is > 0.
    pub rw: Option<SectionMemory>,
    /// Output sections by peer ID (empty if the output size is 0).
    pub outputs: Vec<SectionMemory>,
    /// Interrupt eventfds by peer ID, then by vector (INTx: vector 0 only; MSI-X: one per
    /// vector). Vector 0 carries state changes.
    pub interrupts: Vec<Vec<InterruptEventFd>>,
}

impl LinkMemory {
    /// Creates every section and interrupt line of link `link` with `max_peers` peers and
    /// `vectors` interrupt vectors per peer (at least one is created).
    pub fn create(
        link: &str,
        max_peers: u16,
        vectors: u16,
        state_table_size: u64,
        rw_size: u64,
        output_size: u64,
    ) -> Result<Self, MemoryError> {
        if state_table_size < 4 * u64::from(max_peers) {
            return Err(MemoryError::BadSize {
                section: format!("{link}/state-table"),
                reason: "state table smaller than 4 bytes per peer",
            });
        }
        let state_table =
            SectionMemory::create_open(&format!("{link}/state-table"), state_table_size)?;
        // The hypervisor's mapping first, then the seal: it stays the only writable one.
        let state_table_map = MappedStateTable::new(&state_table, usize::from(max_peers))?;
        state_table.seal_future_writes()?;
        let rw = (rw_size > 0)
            .then(|| SectionMemory::create(&format!("{link}/rw"), rw_size))
            .transpose()?;
        let outputs = if output_size > 0 {
            (0..max_peers)
                .map(|peer| SectionMemory::create(&format!("{link}/output-{peer}"), output_size))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let interrupts = (0..max_peers)
            .map(|_| {
                (0..vectors.max(1))
                    .map(|_| InterruptEventFd::new())
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            state_table,
            state_table_map,
            rw,
            outputs,
            interrupts,
        })
    }

    /// The hypervisor's read-write mapping of the state table (the only writable one; clones
    /// share it).
    pub fn state_table_map(&self) -> MappedStateTable {
        self.state_table_map.clone()
    }

    /// Raises vector 0 on `peer` (ignores peers out of range).
    pub fn signal(&self, peer: u16) -> io::Result<()> {
        match self
            .interrupts
            .get(peer as usize)
            .and_then(|vectors| vectors.first())
        {
            Some(line) => line.signal(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_sealed_and_read_only_fd_refuses_shared_write_maps() {
        let s = SectionMemory::create("test/out", 8192).unwrap();
        // Growing and shrinking are sealed.
        let fd = s.read_write_fd();
        assert_eq!(nix::unistd::ftruncate(fd, 4096), Err(Errno::EPERM));
        assert_eq!(nix::unistd::ftruncate(fd, 16384), Err(Errno::EPERM));
        // Read-only fd: a shared writable mapping is refused with EACCES.
        // SAFETY: the mapping is expected to fail; nothing is accessed.
        let err = unsafe { MmapOptions::new().len(8192).map_mut(&s.read_only) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(Errno::EACCES as i32));
        // A read mapping of the RO fd sees what the RW mapping wrote.
        let rw = s.map_raw().unwrap();
        // SAFETY: in-bounds byte write into our own mapping.
        unsafe { rw.as_mut_ptr().add(100).write_volatile(0x5A) };
        // SAFETY: mapping a valid fd read-only; nobody truncates it (sealed).
        let ro = unsafe { MmapOptions::new().len(8192).map(&s.read_only) }.unwrap();
        assert_eq!(ro[100], 0x5A);
    }

    #[test]
    fn state_table_atomic_entries() {
        let mem = LinkMemory::create("t", 3, 4, 4096, 0, 4096).unwrap();
        assert!(mem.rw.is_none());
        assert_eq!(mem.outputs.len(), 3);
        assert_eq!(mem.interrupts.len(), 3);
        assert!(mem.interrupts.iter().all(|vectors| vectors.len() == 4));
        let table = mem.state_table_map();
        table.write(1, 7);
        table.write(5, 9); // out of range: ignored
        assert_eq!(table.read(1), 7);
        assert_eq!(table.read(5), 0);
        // SAFETY: mapping a valid fd read-only.
        let ro = unsafe { MmapOptions::new().len(4096).map(&mem.state_table.read_only) }.unwrap();
        assert_eq!(u32::from_ne_bytes(ro[4..8].try_into().unwrap()), 7);
        table.clear();
        assert_eq!(table.read(1), 0);
    }

    #[test]
    fn eventfd_signal_and_drain() {
        let line = InterruptEventFd::new().unwrap();
        assert_eq!(line.drain().unwrap(), 0);
        line.signal().unwrap();
        line.signal().unwrap();
        assert_eq!(line.drain().unwrap(), 2);
        assert_eq!(line.drain().unwrap(), 0);
    }

    /// Opens `/proc/self/fd/N` of `fd` with `O_RDWR`, as a misbehaving same-uid cell could.
    fn reopen_read_write(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        Ok(open(
            path.as_str(),
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?)
    }

    #[test]
    fn state_table_cannot_be_written_through_a_reopened_fd() {
        let mem = LinkMemory::create("seal", 2, 1, 4096, 0, 4096).unwrap();
        let table = mem.state_table_map();
        // Whatever a cell can get: the read-only fd reopened read-write (the open itself
        // may succeed; the memory must still refuse writes).
        let reopened = reopen_read_write(mem.state_table.read_only_fd()).unwrap();
        for fd in [reopened.as_fd(), mem.state_table.read_write_fd()] {
            // SAFETY: the mapping is expected to fail; nothing is accessed.
            let err = unsafe { MmapOptions::new().len(4096).map_mut(&fd) }.unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(Errno::EPERM as i32),
                "shared writable map"
            );
            let forged = 1u32.to_ne_bytes();
            assert_eq!(
                nix::sys::uio::pwrite(fd, &forged, 0),
                Err(Errno::EPERM),
                "write(2) into the state table"
            );
        }
        // The seal itself cannot be lifted or changed.
        assert!(fcntl(&reopened, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)).is_err());
        // The hypervisor's own mapping still writes, and readers see it.
        table.write(1, 0xC0FFEE);
        // SAFETY: mapping a valid fd read-only; nobody truncates it (sealed).
        let ro = unsafe { MmapOptions::new().len(4096).map(&mem.state_table.read_only) }.unwrap();
        assert_eq!(u32::from_ne_bytes(ro[4..8].try_into().unwrap()), 0xC0FFEE);
        assert_eq!(table.read(1), 0xC0FFEE);
    }

    /// Documents the trust assumption of output sections (see the module docs): their owner
    /// must keep writing them, so a same-uid process can reopen a peer's read-only fd
    /// read-write. If this ever starts failing, the docs can drop the assumption.
    #[test]
    fn output_sections_rely_on_same_uid_cells_not_reopening_them() {
        let mem = LinkMemory::create("trust", 2, 1, 4096, 0, 4096).unwrap();
        let output = &mem.outputs[0];
        let reopened = reopen_read_write(output.read_only_fd()).unwrap();
        // SAFETY: maps a valid fd of a sealed-size section; only this test touches it.
        let map = unsafe { MmapOptions::new().len(4096).map_mut(&reopened) };
        assert!(map.is_ok(), "reopen O_RDWR of an output section: {map:?}");
    }
}
