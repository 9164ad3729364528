//! Link memory for process cells: one memfd per section, one eventfd per (peer, vector).
//!
//! Every section of a link (state table, R/W section, one output section per peer) is its own
//! memfd, sized once and sealed against shrinking and growing, so a cell can never truncate
//! memory that another process has mapped (which would turn its accesses into `SIGBUS`).
//! Read-only fds for cells are made by reopening `/proc/self/fd/N` with `O_RDONLY`: a cell
//! that tries `mmap(PROT_WRITE, MAP_SHARED)` on such an fd gets `EACCES`, and `mprotect` cannot
//! upgrade a read-only shared mapping either.
//!
//! The hypervisor maps the state table read-write and writes it with 32-bit atomic stores
//! ([`MappedStateTable`]); only the hypervisor ever holds a writable fd for it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use memmap2::{MmapOptions, MmapRaw};

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
        let section = || name.to_string();
        if size == 0 || usize::try_from(size).is_err() {
            return Err(MemoryError::BadSize {
                section: section(),
                reason: "size must be > 0 and fit usize",
            });
        }
        let cname = CString::new(format!("ivshmem:{name}").replace('\0', "?"))
            .expect("no NUL after replace");
        // SAFETY: plain syscall with a valid NUL-terminated name; the result is checked.
        let raw = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(MemoryError::Create {
                section: section(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = File::from(fd);
        let size_err = |source| MemoryError::SizeOrSeal {
            section: section(),
            size,
            source,
        };
        file.set_len(size).map_err(size_err)?;
        // SAFETY: fcntl on a valid fd with an integer argument; the result is checked.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if rc < 0 {
            return Err(size_err(io::Error::last_os_error()));
        }
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

    /// Maps the section read-write into the hypervisor.
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
    let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in path");
    // SAFETY: valid NUL-terminated path; the result is checked.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// An interrupt line of one peer: a non-blocking eventfd. Writing adds to its counter
/// (raising the interrupt); the receiving cell reads it to acknowledge.
#[derive(Debug)]
pub struct InterruptEventFd {
    fd: OwnedFd,
}

impl InterruptEventFd {
    /// Creates a non-blocking, close-on-exec eventfd with counter 0.
    pub fn new() -> Result<Self, MemoryError> {
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(MemoryError::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    /// Raises the interrupt (adds 1 to the counter). A full counter (impossible in practice)
    /// already means "pending", so `EAGAIN` is not an error.
    pub fn signal(&self) -> io::Result<()> {
        signal_eventfd(self.fd.as_fd())
    }

    /// Reads and clears the counter; returns 0 if nothing was pending.
    pub fn drain(&self) -> io::Result<u64> {
        drain_eventfd(self.fd.as_fd())
    }

    /// The fd (sent to cells).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Adds 1 to an eventfd's counter; `EAGAIN` (counter full, interrupt already pending) is fine.
pub fn signal_eventfd(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to a valid fd.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if n == 8 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(())
    } else {
        Err(err)
    }
}

/// Reads a non-blocking eventfd's counter (clearing it); 0 if nothing was pending.
pub fn drain_eventfd(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut count: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64 from a valid fd.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    if n == 8 {
        return Ok(count);
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(0)
    } else {
        Err(err)
    }
}

/// The state table, mapped read-write in the hypervisor; 32-bit atomic accesses only.
///
/// Implements the device model's `StateTable`, so the device writes straight into the
/// memory every cell maps read-only.
#[derive(Debug)]
pub struct MappedStateTable {
    map: MmapRaw,
    entries: usize,
}

impl MappedStateTable {
    /// Maps `section` and serves `entries` (= max_peers) u32 entries from its start.
    pub fn new(section: &SectionMemory, entries: usize) -> Result<Self, MemoryError> {
        if (entries as u64).saturating_mul(4) > section.size() {
            return Err(MemoryError::BadSize {
                section: section.name().to_string(),
                reason: "state table smaller than 4 bytes per peer",
            });
        }
        Ok(Self {
            map: section.map_raw()?,
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
    /// The state table section.
    pub state_table: SectionMemory,
    /// The R/W section, if its size is > 0.
    pub rw: Option<SectionMemory>,
    /// Output sections by peer ID (empty if the output size is 0).
    pub outputs: Vec<SectionMemory>,
    /// Interrupt eventfd of each peer (INTx: vector 0), by peer ID.
    pub interrupts: Vec<InterruptEventFd>,
}

impl LinkMemory {
    /// Creates every section and interrupt line of link `link` with `max_peers` peers.
    pub fn create(
        link: &str,
        max_peers: u16,
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
        let state_table = SectionMemory::create(&format!("{link}/state-table"), state_table_size)?;
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
            .map(|_| InterruptEventFd::new())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            state_table,
            rw,
            outputs,
            interrupts,
        })
    }

    /// Raises vector 0 on `peer` (ignores peers out of range).
    pub fn signal(&self, peer: u16) -> io::Result<()> {
        match self.interrupts.get(peer as usize) {
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
        // SAFETY: ftruncate on a valid fd.
        assert!(unsafe { libc::ftruncate(s.read_write_fd().as_raw_fd(), 4096) } < 0);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
        // SAFETY: as above.
        assert!(unsafe { libc::ftruncate(s.read_write_fd().as_raw_fd(), 16384) } < 0);
        // Read-only fd: a shared writable mapping is refused with EACCES.
        // SAFETY: the mapping is expected to fail; nothing is accessed.
        let err = unsafe { MmapOptions::new().len(8192).map_mut(&s.read_only) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
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
        let mem = LinkMemory::create("t", 3, 4096, 0, 4096).unwrap();
        assert!(mem.rw.is_none());
        assert_eq!(mem.outputs.len(), 3);
        assert_eq!(mem.interrupts.len(), 3);
        let table = MappedStateTable::new(&mem.state_table, 3).unwrap();
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
}
