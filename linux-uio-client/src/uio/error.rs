//! Typed errors of the UIO backend: every one names the file, map or fd it concerns.

use std::io;
use std::path::PathBuf;

use super::layout::MapRole;

/// What was wrong with one sysfs attribute file.
#[derive(Debug, thiserror::Error)]
pub enum SysfsProblem {
    /// The file does not exist.
    #[error("the file is missing")]
    Missing,
    /// The file exists but reading it failed.
    #[error("reading it failed: {0}")]
    Read(#[source] io::Error),
    /// The file is empty; the kernel always writes at least a newline.
    #[error("the file is empty (the kernel always ends an attribute with a newline)")]
    Empty,
    /// The file is larger than one sysfs page can be.
    #[error("the file holds {len} bytes, more than a sysfs attribute can (4096)")]
    TooLong {
        /// Bytes found.
        len: usize,
    },
    /// The content is not valid UTF-8.
    #[error("the content is not UTF-8")]
    NotUtf8,
    /// The content does not end with the newline the kernel prints, so it was cut short.
    #[error("the value {content:?} does not end with a newline: it was cut short")]
    NoNewline {
        /// What was there.
        content: String,
    },
    /// The content holds more than one line.
    #[error("the content {content:?} holds more than one line")]
    ExtraLines {
        /// What was there.
        content: String,
    },
    /// A hexadecimal attribute (`addr`, `size`, `offset`) is not in the kernel's `0x…` format.
    #[error("expected a hexadecimal value as the kernel prints it (like 0x0000000000001000), found {content:?}: {reason}")]
    BadHex {
        /// What was there (without the newline).
        content: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A decimal attribute (`event`) is not an unsigned 32-bit number.
    #[error("expected an unsigned decimal 32-bit count, found {content:?}")]
    BadDecimal {
        /// What was there (without the newline).
        content: String,
    },
    /// A name attribute that must not be empty (the device name) is empty.
    #[error("the name is empty")]
    EmptyName,
}

/// Errors from discovering, parsing and mapping a UIO device.
#[derive(Debug, thiserror::Error)]
pub enum UioError {
    /// One sysfs attribute file is missing or not in the kernel's format.
    #[error("sysfs file {path}: {problem}")]
    Sysfs {
        /// The attribute file.
        path: PathBuf,
        /// What was wrong with it.
        #[source]
        problem: SysfsProblem,
    },
    /// A sysfs directory could not be listed.
    #[error("cannot list directory {path}: {source}")]
    ListDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The UIO sysfs class directory does not exist: no UIO driver is loaded.
    #[error("{path} does not exist: no UIO driver is loaded (load uio_ivshmem and bind the ivshmem PCI device to it)")]
    NoUioClass {
        /// The sysfs class directory.
        path: PathBuf,
    },
    /// No UIO device matched.
    #[error("no UIO device {wanted} under {root} (devices found: {found:?})")]
    NotFound {
        /// What was looked for (a name or "matching the predicate").
        wanted: String,
        /// The sysfs class directory searched.
        root: PathBuf,
        /// The names of the devices that were there.
        found: Vec<String>,
    },
    /// The `maps` directory is not numbered `map0..mapN-1` without gaps.
    #[error("{dir}: map{missing} is missing although a later map exists (maps must be numbered without gaps)")]
    MapGap {
        /// The `maps` directory.
        dir: PathBuf,
        /// The first missing index.
        missing: usize,
    },
    /// The number of maps does not fit any layout `uio_ivshmem` produces.
    #[error("{dir}: {count} UIO maps, but uio_ivshmem exposes 2 to 5 (registers, state table, optional R/W section, input sections with output section)")]
    MapCount {
        /// The `maps` directory.
        dir: PathBuf,
        /// Maps found.
        count: usize,
    },
    /// A map carries a name that contradicts its position.
    #[error(
        "map{index} is named {found:?}, but with {count} maps uio_ivshmem puts {expected:?} there"
    )]
    MapName {
        /// Map index.
        index: usize,
        /// Number of maps.
        count: usize,
        /// Name the driver gives this position.
        expected: &'static str,
        /// Name found in sysfs.
        found: String,
    },
    /// A map's size breaks a rule of the ivshmem v2 layout.
    #[error("map{index} ({role}) has size {size:#x}: {rule}")]
    MapSize {
        /// Map index.
        index: usize,
        /// What the map holds.
        role: MapRole,
        /// The size from sysfs.
        size: u64,
        /// The rule it breaks.
        rule: String,
    },
    /// A map's offset (where its data starts in the first page) is unusable.
    #[error("map{index} ({role}) has offset {offset:#x}: {rule}")]
    MapOffset {
        /// Map index.
        index: usize,
        /// What the map holds.
        role: MapRole,
        /// The offset from sysfs.
        offset: u64,
        /// The rule it breaks.
        rule: String,
    },
    /// The device node could not be opened.
    #[error("device node {path} cannot be opened: {source}")]
    DeviceNode {
        /// The device node.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The device node is a regular file (a test fake) too small for a map.
    #[error("device node {path} holds {len:#x} bytes, but map{index} ({role}) needs {needed:#x}")]
    DeviceTooSmall {
        /// The device node.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// Map index.
        index: usize,
        /// What the map holds.
        role: MapRole,
        /// The end offset the map needs.
        needed: u64,
    },
    /// `mmap` of one map failed.
    #[error("mapping map{index} ({role}) of {path} failed: {source}")]
    Mmap {
        /// The device node.
        path: PathBuf,
        /// Map index.
        index: usize,
        /// What the map holds.
        role: MapRole,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The separate interrupt source could not be opened.
    #[error("interrupt source {path} cannot be opened: {source}")]
    InterruptSource {
        /// The path given for the interrupt source.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The register page reports a MAX_PEERS the layout cannot hold.
    #[error("the device reports MAX_PEERS = {max_peers}, outside 2..={supported}")]
    MaxPeers {
        /// Value read from the register.
        max_peers: u32,
        /// Largest supported value.
        supported: usize,
    },
    /// The register page reports an ID that is not below MAX_PEERS.
    #[error("the device reports ID {id}, not below MAX_PEERS {max_peers}")]
    PeerId {
        /// Value read from the ID register.
        id: u32,
        /// Value read from MAX_PEERS.
        max_peers: u32,
    },
    /// The system page size could not be determined.
    #[error("sysconf(_SC_PAGESIZE) failed")]
    PageSize,
}

/// Errors from waiting for an interrupt on the UIO device (or an injected interrupt fd).
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// `read`/`write` on the interrupt fd failed (a non-blocking fd reports `WouldBlock` here).
    #[error("interrupt fd: {0}")]
    Io(#[from] io::Error),
    /// The interrupt fd returned fewer than the 4 bytes of the count.
    #[error("interrupt fd returned {got} bytes instead of the 4-byte interrupt count")]
    ShortRead {
        /// Bytes returned.
        got: usize,
    },
    /// The interrupt fd reached end of file (the device or the peer of an injected fd is gone).
    #[error("interrupt fd reached end of file: the device is gone")]
    Eof,
    /// The interrupt fd accepted fewer than 4 bytes of an `irqcontrol` write.
    #[error("interrupt fd accepted {wrote} bytes of the 4-byte irqcontrol value")]
    ShortWrite {
        /// Bytes accepted.
        wrote: usize,
    },
    /// The count returned equals the previous one; UIO only returns when it changed.
    #[error("interrupt count {count} did not advance since the previous read")]
    CountUnchanged {
        /// The count read twice.
        count: u32,
    },
    /// The count went backwards (more than 2^31 behind counts as backwards, since it wraps).
    #[error("interrupt count went backwards from {previous} to {current}")]
    CountBackwards {
        /// The count of the previous read.
        previous: u32,
        /// The count just read.
        current: u32,
    },
}

impl InterruptError {
    /// True when the fd is non-blocking and no interrupt is pending (for a poll-driven caller).
    pub fn is_would_block(&self) -> bool {
        matches!(self, InterruptError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}
