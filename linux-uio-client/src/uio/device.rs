//! Opening a UIO device: mapping its maps, register access and interrupt counts.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use super::error::{InterruptError, UioError};
use super::layout::{MapLayout, MapRole};
use super::sysfs::{UioDeviceInfo, UioDevicePaths, UioMapInfo};

use ivshmem_dev::driver::{DriverError, Ivshmem, Section, Sections};
use ivshmem_dev::layout::MAX_SUPPORTED_PEERS;
use ivshmem_dev::regs::{RegisterAccess, ID, INT_CONTROL, INT_CONTROL_ENABLE, MAX_PEERS};

/// The system page size (`sysconf(_SC_PAGESIZE)`), the unit of UIO's map selection.
pub fn page_size() -> Result<usize, UioError> {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .ok_or(UioError::PageSize)
}

/// One mapped UIO map.
#[derive(Debug)]
struct MappedRegion {
    map: MmapRaw,
    /// Where the map's data starts in `map` (the sysfs `offset`).
    data_offset: usize,
    /// The map's size from sysfs.
    len: usize,
    index: usize,
    role: MapRole,
}

impl MappedRegion {
    fn data(&self) -> NonNull<u8> {
        // SAFETY: `data_offset + len <= map.len()` was checked when mapping, so the result
        // stays inside the mapping, which is never null.
        unsafe { NonNull::new_unchecked(self.map.as_mut_ptr().add(self.data_offset)) }
    }
}

/// Every mapping of one device; shared by [`UioRegisters`] (and so by an `Ivshmem` driver
/// built on them) so the memory stays mapped as long as anything points into it.
#[derive(Debug)]
struct Mappings {
    registers: MappedRegion,
    state_table: MappedRegion,
    rw: Option<MappedRegion>,
    input: Option<MappedRegion>,
    output: Option<MappedRegion>,
}

impl Mappings {
    fn get(&self, role: MapRole) -> Option<&MappedRegion> {
        match role {
            MapRole::Registers => Some(&self.registers),
            MapRole::StateTable => Some(&self.state_table),
            MapRole::RwSection => self.rw.as_ref(),
            MapRole::InputSections => self.input.as_ref(),
            MapRole::OutputSection => self.output.as_ref(),
        }
    }
}

/// Volatile 32-bit access to the register map (UIO map 0).
///
/// Every access is one aligned volatile load or store. Offsets are checked against the map's
/// size: a misaligned or out-of-range offset reads 0 and a write to one is dropped (like the
/// unlisted offsets of the device's own page); [`UioRegisters::try_read32`] and
/// [`UioRegisters::try_write32`] report them instead. Cloning shares the mappings.
#[derive(Debug, Clone)]
pub struct UioRegisters {
    maps: Arc<Mappings>,
}

/// A register offset that is misaligned or outside the register map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("register offset {offset:#x} is misaligned or outside the {len:#x}-byte register map")]
pub struct RegisterOffsetError {
    /// The offset asked for.
    pub offset: u32,
    /// The register map's size.
    pub len: usize,
}

impl UioRegisters {
    fn register(&self, offset: u32) -> Result<*mut u32, RegisterOffsetError> {
        let regs = &self.maps.registers;
        let in_range = (offset as usize)
            .checked_add(4)
            .is_some_and(|end| end <= regs.len);
        if offset % 4 != 0 || !in_range {
            return Err(RegisterOffsetError {
                offset,
                len: regs.len,
            });
        }
        // SAFETY: `offset + 4 <= len` (checked above) keeps the pointer inside the map's data;
        // the data start is 4-byte aligned (checked when mapping) and `offset` is too.
        Ok(unsafe { regs.data().as_ptr().add(offset as usize) }.cast())
    }

    /// Read the register at `offset`, or say why the offset is refused.
    pub fn try_read32(&self, offset: u32) -> Result<u32, RegisterOffsetError> {
        let register = self.register(offset)?;
        // SAFETY: `register` is aligned and inside the live register mapping (held by `maps`).
        Ok(unsafe { register.read_volatile() })
    }

    /// Write the register at `offset`, or say why the offset is refused.
    pub fn try_write32(&self, offset: u32, value: u32) -> Result<(), RegisterOffsetError> {
        let register = self.register(offset)?;
        // SAFETY: `register` is aligned and inside the live, writable register mapping.
        unsafe { register.write_volatile(value) };
        Ok(())
    }

    /// The register map's size in bytes.
    pub fn len(&self) -> usize {
        self.maps.registers.len
    }

    /// Always false: a register map is at least 0x100 bytes.
    pub fn is_empty(&self) -> bool {
        self.maps.registers.len == 0
    }
}

impl RegisterAccess for UioRegisters {
    fn read32(&self, offset: u32) -> u32 {
        self.try_read32(offset).unwrap_or(0)
    }

    fn write32(&self, offset: u32, value: u32) {
        let _ = self.try_write32(offset, value);
    }
}

/// A region refused an access: out of range, or a write to a read-only map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// `offset + len` passes the end of the region.
    #[error("{len} bytes at offset {offset:#x} pass the end of the {region_len:#x}-byte region")]
    OutOfRange {
        /// Start of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// The region's size.
        region_len: usize,
    },
    /// The region is mapped read-only.
    #[error("the region is mapped read-only")]
    ReadOnly,
}

/// A borrowed view of one mapped region (or of one peer's output inside the input map).
#[derive(Debug, Clone, Copy)]
pub struct UioRegion<'a> {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    _device: PhantomData<&'a UioDevice>,
}

impl UioRegion<'_> {
    /// The first byte of the region (shared memory: access it volatilely, trust nothing in it).
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-sized region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the region is mapped writable.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), RegionError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(RegionError::OutOfRange {
                offset,
                len,
                region_len: self.len,
            }),
        }
    }

    /// Copy `buf.len()` bytes starting at `offset` out of the region (byte-wise volatile reads).
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), RegionError> {
        self.check(offset, buf.len())?;
        for (i, byte) in buf.iter_mut().enumerate() {
            // SAFETY: `offset + i < len` (checked above), inside the mapping the borrow keeps
            // alive; a volatile byte read of shared memory has no alignment needs.
            *byte = unsafe { self.ptr.as_ptr().add(offset + i).read_volatile() };
        }
        Ok(())
    }

    /// Copy `data` into the region at `offset` (byte-wise volatile writes); only for writable maps.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), RegionError> {
        if !self.writable {
            return Err(RegionError::ReadOnly);
        }
        self.check(offset, data.len())?;
        for (i, byte) in data.iter().enumerate() {
            // SAFETY: `offset + i < len` (checked above), inside a writable mapping the borrow
            // keeps alive.
            unsafe { self.ptr.as_ptr().add(offset + i).write_volatile(*byte) };
        }
        Ok(())
    }
}

/// The result of one interrupt wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptCount {
    /// The device's interrupt count (wraps at 2^32).
    pub count: u32,
    /// Interrupts that happened since the previous read but were not seen one by one
    /// (`count - previous - 1`). The caller handles them all at once by re-checking its state.
    pub missed: u32,
}

/// The interrupt side of a UIO device: the fd whose 4-byte reads return the interrupt count.
///
/// # Ordering (one-shot mode)
/// `uio_ivshmem` puts the device in one-shot mode: delivering an interrupt clears
/// `INT_CONTROL`, and interrupts raised while it is clear are dropped by the device. So
/// [`UioInterrupt::wait`] (1) reads the count, (2) re-arms by writing `INT_CONTROL = 1`, and
/// only then returns; the caller must (3) re-check its rings and the state table, because
/// anything the peer published between the interrupt and the re-arm raised no interrupt.
#[derive(Debug)]
pub struct UioInterrupt {
    fd: File,
    source: PathBuf,
    last: u32,
    regs: UioRegisters,
}

impl UioInterrupt {
    /// Block until the count changes, re-arm, and report the new count and how many interrupts
    /// were coalesced into it. A non-blocking fd with nothing pending gives an error for which
    /// [`InterruptError::is_would_block`] is true.
    ///
    /// The re-arm happens after every complete 4-byte read, even when the count is then found
    /// inconsistent (unchanged or backwards), so a confused count never leaves interrupts off.
    pub fn wait(&mut self) -> Result<InterruptCount, InterruptError> {
        let mut buf = [0u8; 4];
        let got = loop {
            match self.fd.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(InterruptError::Io(e)),
            }
        };
        match got {
            0 => return Err(InterruptError::Eof),
            4 => {}
            got => return Err(InterruptError::ShortRead { got }),
        }
        let count = u32::from_ne_bytes(buf);
        self.rearm();
        let previous = std::mem::replace(&mut self.last, count);
        let delta = count.wrapping_sub(previous);
        if delta == 0 {
            return Err(InterruptError::CountUnchanged { count });
        }
        if delta > i32::MAX as u32 {
            return Err(InterruptError::CountBackwards {
                previous,
                current: count,
            });
        }
        Ok(InterruptCount {
            count,
            missed: delta - 1,
        })
    }

    /// Re-enable interrupts after one was delivered in one-shot mode (`INT_CONTROL = 1`).
    pub fn rearm(&self) {
        // INT_CONTROL (0x08) is inside every accepted register map (>= 0x100 bytes).
        let _ = self.regs.try_write32(INT_CONTROL, INT_CONTROL_ENABLE);
    }

    /// Write a 4-byte value to the fd, which UIO passes to the driver's `irqcontrol`
    /// (`uio_ivshmem` has none and answers `ENOSYS`; it re-arms through `INT_CONTROL` instead).
    pub fn irqcontrol(&mut self, value: u32) -> Result<(), InterruptError> {
        match self.fd.write(&value.to_ne_bytes())? {
            4 => Ok(()),
            wrote => Err(InterruptError::ShortWrite { wrote }),
        }
    }

    /// Switch the fd between blocking and non-blocking reads. With `true`, [`UioInterrupt::wait`]
    /// returns an error with [`InterruptError::is_would_block`] when nothing is pending and
    /// changes nothing, which suits a readiness loop (`poll`, `AsyncFd`) on [`AsRawFd`].
    pub fn set_nonblocking(&self, nonblocking: bool) -> std::io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: F_GETFL on an fd this value owns; no memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = if nonblocking {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: F_SETFL on an fd this value owns, changing only its status flags.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The count of the last read (at open: the sysfs `event` count read just before).
    pub fn last_count(&self) -> u32 {
        self.last
    }

    /// The path the fd was opened from (or a description of an injected fd).
    pub fn source(&self) -> &Path {
        &self.source
    }
}

impl AsRawFd for UioInterrupt {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for UioInterrupt {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An opened `uio_ivshmem` device: its maps mapped with the right protection, its registers,
/// and its interrupt fd.
#[derive(Debug)]
pub struct UioDevice {
    info: UioDeviceInfo,
    layout: MapLayout,
    regs: UioRegisters,
    interrupt: UioInterrupt,
    id: u16,
    max_peers: u16,
    page_size: usize,
}

fn round_up(value: u64, align: u64) -> Option<u64> {
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

fn map_region(
    file: &File,
    device_node: &Path,
    file_len: Option<u64>,
    page_size: usize,
    map: &UioMapInfo,
    role: MapRole,
) -> Result<MappedRegion, UioError> {
    let page = page_size as u64;
    let size_err = |rule: &str| UioError::MapSize {
        index: map.index,
        role,
        size: map.size,
        rule: rule.to_owned(),
    };
    if map.offset >= page {
        return Err(UioError::MapOffset {
            index: map.index,
            role,
            offset: map.offset,
            rule: format!("the data must start inside the first page ({page:#x} bytes)"),
        });
    }
    if matches!(role, MapRole::Registers | MapRole::StateTable) && map.offset % 4 != 0 {
        return Err(UioError::MapOffset {
            index: map.index,
            role,
            offset: map.offset,
            rule: format!("the {role} holds 32-bit words and must start 4-byte aligned"),
        });
    }
    let end = map
        .offset
        .checked_add(map.size)
        .ok_or_else(|| size_err("offset plus size overflows 64 bits"))?;
    let map_len = round_up(end, page)
        .filter(|&l| usize::try_from(l).is_ok() && isize::try_from(l).is_ok())
        .ok_or_else(|| size_err("too large to map into this process"))?;
    let mmap_offset = (map.index as u64)
        .checked_mul(page)
        .ok_or_else(|| size_err("the map index times the page size overflows"))?;
    if let Some(len) = file_len {
        // A regular file (test fake) raises SIGBUS past its end instead of refusing the mmap.
        let needed = mmap_offset.saturating_add(end);
        if needed > len {
            return Err(UioError::DeviceTooSmall {
                path: device_node.to_path_buf(),
                len,
                index: map.index,
                role,
                needed,
            });
        }
    }
    let mut options = MmapOptions::new();
    options.offset(mmap_offset).len(map_len as usize);
    let mapped = if role.writable() {
        options.map_raw(file)
    } else {
        options.map_raw_read_only(file)
    }
    .map_err(|source| UioError::Mmap {
        path: device_node.to_path_buf(),
        index: map.index,
        role,
        source,
    })?;
    Ok(MappedRegion {
        map: mapped,
        data_offset: map.offset as usize,
        len: map.size as usize,
        index: map.index,
        role,
    })
}

impl UioDevice {
    /// Open the device at `paths`: read and check sysfs, open the device node read-write, map
    /// every map (read-only ones with `PROT_READ` only), read ID and MAX_PEERS and check the
    /// sizes against them. Interrupts are read from `paths.interrupt` or the device node.
    pub fn open(paths: &UioDevicePaths) -> Result<Self, UioError> {
        Self::open_inner(paths, None)
    }

    /// Like [`UioDevice::open`], reading interrupt counts from `interrupt` instead (a test
    /// fake, or an fd passed in by a supervisor).
    pub fn open_with_interrupt_fd(
        paths: &UioDevicePaths,
        interrupt: OwnedFd,
    ) -> Result<Self, UioError> {
        Self::open_inner(paths, Some(interrupt))
    }

    fn open_inner(paths: &UioDevicePaths, interrupt: Option<OwnedFd>) -> Result<Self, UioError> {
        let page_size = page_size()?;
        // sysfs first: `event` read before the node is opened is at most the count the new
        // listener starts from, so the first wait can over-report missed interrupts but never
        // see an unchanged count.
        let info = UioDeviceInfo::read(&paths.sysfs_dir)?;
        let layout = MapLayout::identify(&paths.sysfs_dir.join("maps"), &info.maps)?;

        let node = &paths.device_node;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(node)
            .map_err(|source| UioError::DeviceNode {
                path: node.clone(),
                source,
            })?;
        let metadata = file.metadata().map_err(|source| UioError::DeviceNode {
            path: node.clone(),
            source,
        })?;
        let file_len = metadata.is_file().then_some(metadata.len());
        let map = |index: usize, role| {
            map_region(&file, node, file_len, page_size, &info.maps[index], role)
        };
        let maps = Mappings {
            registers: map(layout.registers, MapRole::Registers)?,
            state_table: map(layout.state_table, MapRole::StateTable)?,
            rw: layout.rw.map(|i| map(i, MapRole::RwSection)).transpose()?,
            input: layout
                .input
                .map(|i| map(i, MapRole::InputSections))
                .transpose()?,
            output: layout
                .output
                .map(|i| map(i, MapRole::OutputSection))
                .transpose()?,
        };
        let regs = UioRegisters {
            maps: Arc::new(maps),
        };

        let max_peers = regs.try_read32(MAX_PEERS).unwrap_or(0);
        if !(2..=MAX_SUPPORTED_PEERS as u32).contains(&max_peers) {
            return Err(UioError::MaxPeers {
                max_peers,
                supported: MAX_SUPPORTED_PEERS,
            });
        }
        let id = regs.try_read32(ID).unwrap_or(u32::MAX);
        if id >= max_peers {
            return Err(UioError::PeerId { id, max_peers });
        }
        layout.check_peer_sizes(&info.maps, max_peers)?;

        let (fd, source) = match (interrupt, &paths.interrupt) {
            (Some(fd), _) => (File::from(fd), PathBuf::from("<injected interrupt fd>")),
            (None, Some(path)) => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|source| UioError::InterruptSource {
                        path: path.clone(),
                        source,
                    })?,
                path.clone(),
            ),
            (None, None) => (file, node.clone()),
        };
        let interrupt = UioInterrupt {
            fd,
            source,
            last: info.event,
            regs: regs.clone(),
        };
        Ok(UioDevice {
            info,
            layout,
            regs,
            interrupt,
            id: id as u16,
            max_peers: max_peers as u16,
            page_size,
        })
    }

    /// What sysfs said about the device when it was opened.
    pub fn info(&self) -> &UioDeviceInfo {
        &self.info
    }

    /// Which map holds what.
    pub fn layout(&self) -> &MapLayout {
        &self.layout
    }

    /// This peer's ID (from the ID register at open).
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The number of peers on the link (from MAX_PEERS at open).
    pub fn max_peers(&self) -> u16 {
        self.max_peers
    }

    /// The page size the maps were selected with.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The register map.
    pub fn registers(&self) -> &UioRegisters {
        &self.regs
    }

    fn view(&self, ptr: NonNull<u8>, len: usize, writable: bool) -> UioRegion<'_> {
        UioRegion {
            ptr,
            len,
            writable,
            _device: PhantomData,
        }
    }

    /// The whole map holding `role`, if the device has it.
    pub fn region(&self, role: MapRole) -> Option<UioRegion<'_>> {
        let region = self.regs.maps.get(role)?;
        debug_assert_eq!(region.role, role);
        Some(self.view(region.data(), region.len, role.writable()))
    }

    /// The output section of `peer`: this peer's own is its read-write output map, every other
    /// peer's is its slice of the read-only input map. `None` without output sections or for
    /// `peer >= max_peers`.
    pub fn peer_output(&self, peer: u16) -> Option<UioRegion<'_>> {
        if peer >= self.max_peers {
            return None;
        }
        if peer == self.id {
            return self.region(MapRole::OutputSection);
        }
        let maps = &self.regs.maps;
        let (input, output) = (maps.input.as_ref()?, maps.output.as_ref()?);
        let start = usize::from(peer) * output.len;
        // SAFETY: the input map is max_peers * output.len bytes (checked at open) and
        // peer < max_peers, so [start, start + output.len) lies inside it.
        let ptr = unsafe { NonNull::new_unchecked(input.data().as_ptr().add(start)) };
        Some(self.view(ptr, output.len, false))
    }

    /// The sections as `ivshmem_dev`'s driver wants them: the state table (read-only), the R/W
    /// section if present, and for every peer its output section (this peer's the writable
    /// output map, the others slices of the read-only input map). On a link without output
    /// sections this peer's entry is [`Section::empty`]`(true)`, as the driver asks.
    ///
    /// The pointers stay valid while this device or any clone of its [`UioRegisters`] lives
    /// (an [`Ivshmem`] built by [`UioDevice::driver`] holds one).
    pub fn sections(&self) -> Sections {
        let section = |region: UioRegion<'_>| {
            // SAFETY: `region` lies inside a mapping owned by `self.regs.maps`, mapped writable
            // exactly when `region.is_writable()`; the state table start was checked 4-byte
            // aligned. The mappings live as long as any `UioRegisters` clone, as documented.
            unsafe { Section::new(region.as_ptr(), region.len(), region.is_writable()) }
        };
        let table = &self.regs.maps.state_table;
        let mut sections = Sections::new(section(self.view(table.data(), table.len, false)));
        sections.rw = self.region(MapRole::RwSection).map(section);
        if self.layout.output.is_some() {
            for peer in 0..self.max_peers {
                sections.outputs[usize::from(peer)] = self.peer_output(peer).map(section);
            }
        } else {
            sections.outputs[usize::from(self.id)] = Some(Section::empty(true));
        }
        sections
    }

    /// The `ivshmem_dev` driver on this device's registers and [`UioDevice::sections`]. It
    /// holds a clone of the registers, which keeps every mapping alive; interrupts stay with
    /// this device ([`UioDevice::wait_interrupt`]).
    pub fn driver(&self) -> Result<Ivshmem<UioRegisters>, DriverError> {
        Ivshmem::new(self.regs.clone(), self.sections())
    }

    /// The map index `region` was mapped from (for diagnostics).
    pub fn map_index(&self, role: MapRole) -> Option<usize> {
        self.regs.maps.get(role).map(|r| r.index)
    }

    /// Block for the next interrupt and re-arm; see [`UioInterrupt::wait`] for the ordering.
    pub fn wait_interrupt(&mut self) -> Result<InterruptCount, InterruptError> {
        self.interrupt.wait()
    }

    /// The interrupt side (for `irqcontrol`, the last count, or polling its fd).
    pub fn interrupt(&mut self) -> &mut UioInterrupt {
        &mut self.interrupt
    }

    /// Split into the register access (which keeps every mapping alive) and the interrupt side,
    /// e.g. to hand the registers to an `Ivshmem` driver and the fd to an event loop.
    pub fn into_parts(self) -> (UioRegisters, UioInterrupt) {
        (self.regs, self.interrupt)
    }
}

impl AsRawFd for UioDevice {
    /// The interrupt fd.
    fn as_raw_fd(&self) -> RawFd {
        self.interrupt.as_raw_fd()
    }
}

impl AsFd for UioDevice {
    /// The interrupt fd.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.interrupt.as_fd()
    }
}
