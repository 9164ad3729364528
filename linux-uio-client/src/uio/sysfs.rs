//! Reading UIO's sysfs attributes strictly, in the formats `drivers/uio/uio.c` prints them.
//!
//! Device directory `<sysfs_root>/uioN`: `name` (`"%s\n"`), `version` (`"%s\n"`), `event`
//! (`"%u\n"`, the interrupt count), and `maps/mapN/` with `name` (`"%s\n"`, may be empty), `addr`
//! and `size` (`"%pa\n"`: `0x` and zero-padded hex; older kernels `"0x%llx\n"`/`"0x%lx\n"`), and
//! `offset` (`"0x%llx\n"`, where the map's data starts inside its first page).

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::error::{SysfsProblem, UioError};

/// Largest attribute a sysfs `show` function can produce (one page on every Linux port we
/// target; reading one byte more detects a file that is not a sysfs attribute).
const SYSFS_ATTR_MAX: usize = 4096;

/// The default sysfs class directory of UIO devices.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys/class/uio";
/// The default directory of device nodes.
pub const DEFAULT_DEV_ROOT: &str = "/dev";

/// One map of a UIO device as sysfs describes it (`maps/mapN/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UioMapInfo {
    /// `N` of `mapN`; the device node is mmapped at offset `N * page_size` to reach it.
    pub index: usize,
    /// The map's name (`None` when the driver gave none: the file holds only a newline).
    pub name: Option<String>,
    /// Physical (or IOVA) address, informational only.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where the map's data starts inside the first mapped page.
    pub offset: u64,
}

/// A UIO device as sysfs describes it (`<sysfs_root>/uioN`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UioDeviceInfo {
    /// `N` of `uioN` (`None` when the directory name is not `uioN`, e.g. an explicit path).
    pub index: Option<u32>,
    /// The sysfs directory.
    pub sysfs_dir: PathBuf,
    /// The device's name (`uio_ivshmem` names it `uio_ivshmem[<PCI address>]`).
    pub name: String,
    /// The driver's version string (`uio_ivshmem`: `1`).
    pub version: String,
    /// The interrupt count at the time sysfs was read.
    pub event: u32,
    /// The maps, in index order.
    pub maps: Vec<UioMapInfo>,
}

/// Read one attribute file: present, at most one sysfs page, UTF-8, exactly one line ending in
/// `\n`. Returns the line without its newline.
pub fn read_attribute(path: &Path) -> Result<String, UioError> {
    let err = |problem| UioError::Sysfs {
        path: path.to_path_buf(),
        problem,
    };
    let file = fs::File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            err(SysfsProblem::Missing)
        } else {
            err(SysfsProblem::Read(e))
        }
    })?;
    let mut bytes = Vec::new();
    file.take(SYSFS_ATTR_MAX as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(SysfsProblem::Read(e)))?;
    parse_line(&bytes).map_err(err)
}

/// Check the shape the kernel's `sprintf(buf, "...\n", ...)` gives: one line, newline-terminated.
pub fn parse_line(bytes: &[u8]) -> Result<String, SysfsProblem> {
    if bytes.is_empty() {
        return Err(SysfsProblem::Empty);
    }
    if bytes.len() > SYSFS_ATTR_MAX {
        return Err(SysfsProblem::TooLong { len: bytes.len() });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| SysfsProblem::NotUtf8)?;
    let Some(line) = text.strip_suffix('\n') else {
        return Err(SysfsProblem::NoNewline {
            content: text.to_owned(),
        });
    };
    if line.contains('\n') {
        return Err(SysfsProblem::ExtraLines {
            content: line.to_owned(),
        });
    }
    Ok(line.to_owned())
}

/// Parse a hexadecimal attribute line as the kernel prints it: `0x` and 1 to 16 hex digits,
/// nothing else (no sign, no spaces).
pub fn parse_hex(line: &str) -> Result<u64, SysfsProblem> {
    let bad = |reason| SysfsProblem::BadHex {
        content: line.to_owned(),
        reason,
    };
    let digits = line
        .strip_prefix("0x")
        .ok_or_else(|| bad("it does not start with 0x"))?;
    if digits.is_empty() {
        return Err(bad("no digits after 0x"));
    }
    if digits.len() > 16 {
        return Err(bad("more than 16 hex digits do not fit 64 bits"));
    }
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("it holds a character that is not a hex digit"));
    }
    u64::from_str_radix(digits, 16).map_err(|_| bad("it is not a hexadecimal number"))
}

/// Parse a decimal `%u` attribute line (the `event` count).
pub fn parse_u32(line: &str) -> Result<u32, SysfsProblem> {
    let bad = || SysfsProblem::BadDecimal {
        content: line.to_owned(),
    };
    if line.is_empty() || !line.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    line.parse::<u32>().map_err(|_| bad())
}

fn read_with<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, SysfsProblem>,
) -> Result<T, UioError> {
    let line = read_attribute(path)?;
    parse(&line).map_err(|problem| UioError::Sysfs {
        path: path.to_path_buf(),
        problem,
    })
}

/// Read a device's `name` (must not be empty).
pub fn read_device_name(sysfs_dir: &Path) -> Result<String, UioError> {
    read_with(&sysfs_dir.join("name"), |line| {
        if line.is_empty() {
            Err(SysfsProblem::EmptyName)
        } else {
            Ok(line.to_owned())
        }
    })
}

/// Read a device's `event` (the interrupt count).
pub fn read_event(sysfs_dir: &Path) -> Result<u32, UioError> {
    read_with(&sysfs_dir.join("event"), parse_u32)
}

/// Read one map directory (`maps/mapN`).
pub fn read_map(map_dir: &Path, index: usize) -> Result<UioMapInfo, UioError> {
    let name = read_attribute(&map_dir.join("name"))?;
    let addr = read_with(&map_dir.join("addr"), parse_hex)?;
    let size = read_with(&map_dir.join("size"), parse_hex)?;
    let offset = read_with(&map_dir.join("offset"), parse_hex)?;
    Ok(UioMapInfo {
        index,
        name: (!name.is_empty()).then_some(name),
        addr,
        size,
        offset,
    })
}

/// Indexes `N` of the entries named `<prefix>N` in `dir`, sorted. Other entries are ignored.
fn numbered_entries(dir: &Path, prefix: &str) -> Result<Vec<u64>, UioError> {
    let entries = fs::read_dir(dir).map_err(|source| UioError::ListDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| UioError::ListDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let Some(digits) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        // "map01" is not a name the kernel creates; only canonical decimal numbers count.
        let canonical = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        if let (true, Ok(n)) = (canonical, digits.parse::<u64>()) {
            found.push(n);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Read all maps of a device: `maps/map0..mapN-1`, which must be numbered without gaps.
pub fn read_maps(sysfs_dir: &Path) -> Result<Vec<UioMapInfo>, UioError> {
    let maps_dir = sysfs_dir.join("maps");
    let indexes = numbered_entries(&maps_dir, "map")?;
    let mut maps = Vec::with_capacity(indexes.len());
    for (expected, &found) in indexes.iter().enumerate() {
        if found != expected as u64 {
            return Err(UioError::MapGap {
                dir: maps_dir,
                missing: expected,
            });
        }
        maps.push(read_map(
            &maps_dir.join(format!("map{expected}")),
            expected,
        )?);
    }
    Ok(maps)
}

impl UioDeviceInfo {
    /// Read and check everything sysfs says about the device in `sysfs_dir`.
    pub fn read(sysfs_dir: &Path) -> Result<Self, UioError> {
        let index = sysfs_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("uio"))
            .and_then(|d| d.parse().ok());
        Ok(UioDeviceInfo {
            index,
            sysfs_dir: sysfs_dir.to_path_buf(),
            name: read_device_name(sysfs_dir)?,
            version: read_attribute(&sysfs_dir.join("version"))?,
            event: read_event(sysfs_dir)?,
            maps: read_maps(sysfs_dir)?,
        })
    }
}

/// Where UIO devices are found: the sysfs class directory and the device-node directory.
/// Tests point both at a temporary tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UioPaths {
    /// The sysfs class directory (default `/sys/class/uio`).
    pub sysfs_root: PathBuf,
    /// The directory holding the `uioN` device nodes (default `/dev`).
    pub dev_root: PathBuf,
}

impl Default for UioPaths {
    fn default() -> Self {
        UioPaths {
            sysfs_root: PathBuf::from(DEFAULT_SYSFS_ROOT),
            dev_root: PathBuf::from(DEFAULT_DEV_ROOT),
        }
    }
}

/// The paths of one device: its sysfs directory, its device node, and optionally a separate
/// interrupt source (by default interrupts are read from the device node, as UIO does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UioDevicePaths {
    /// The device's sysfs directory (`/sys/class/uio/uioN`).
    pub sysfs_dir: PathBuf,
    /// The device node (`/dev/uioN`) whose mmap offsets `N * page_size` select the maps.
    pub device_node: PathBuf,
    /// A separate file to read interrupt counts from (`None`: the device node).
    pub interrupt: Option<PathBuf>,
}

impl UioPaths {
    /// The indexes `N` of all `uioN` entries under the sysfs root, sorted.
    pub fn device_indexes(&self) -> Result<Vec<u32>, UioError> {
        if !self.sysfs_root.exists() {
            return Err(UioError::NoUioClass {
                path: self.sysfs_root.clone(),
            });
        }
        Ok(numbered_entries(&self.sysfs_root, "uio")?
            .into_iter()
            .filter_map(|n| u32::try_from(n).ok())
            .collect())
    }

    /// The paths of device `uio<index>`.
    pub fn device_paths(&self, index: u32) -> UioDevicePaths {
        UioDevicePaths {
            sysfs_dir: self.sysfs_root.join(format!("uio{index}")),
            device_node: self.dev_root.join(format!("uio{index}")),
            interrupt: None,
        }
    }

    /// Every device's index and name, sorted by index.
    pub fn list(&self) -> Result<Vec<(u32, String)>, UioError> {
        self.device_indexes()?
            .into_iter()
            .map(|index| {
                read_device_name(&self.device_paths(index).sysfs_dir).map(|name| (index, name))
            })
            .collect()
    }

    /// The first device (lowest index) whose name satisfies `matches`, fully read from sysfs.
    pub fn find_by(
        &self,
        description: &str,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Result<UioDeviceInfo, UioError> {
        let devices = self.list()?;
        match devices.iter().find(|(_, name)| matches(name)) {
            Some((index, _)) => UioDeviceInfo::read(&self.device_paths(*index).sysfs_dir),
            None => Err(UioError::NotFound {
                wanted: description.to_owned(),
                root: self.sysfs_root.clone(),
                found: devices.into_iter().map(|(_, name)| name).collect(),
            }),
        }
    }

    /// The device whose name is exactly `name` (for `uio_ivshmem`: `uio_ivshmem[0000:00:0c.0]`).
    pub fn find(&self, name: &str) -> Result<UioDeviceInfo, UioError> {
        self.find_by(&format!("named {name:?}"), |n| n == name)
    }
}
