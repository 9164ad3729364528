//! The UIO backend: a `uio_ivshmem` device seen through `/sys/class/uio/uioN` and `/dev/uioN`.
//!
//! - Discovery ([`UioPaths`]): list `uioN`, read `name`, `version`, `event` and
//!   `maps/mapN/{name,addr,size,offset}` strictly in the kernel's formats; every malformed or
//!   missing file is a [`UioError::Sysfs`] naming the file and the problem.
//! - Layout ([`MapLayout`]): `uio_ivshmem`'s map order (registers, state table, optional R/W
//!   section, input sections, own output section), checked against names and sizes.
//! - Device ([`UioDevice`]): map `N` is mmapped at offset `N * page_size`, read-only maps with
//!   `PROT_READ` only; [`UioRegisters`] gives volatile, bounds-checked register access; the
//!   interrupt count is read 4 bytes at a time and one-shot mode re-armed through
//!   `INT_CONTROL` (see [`UioInterrupt`] for the ordering).
//!
//! All paths are injectable so tests run against a fake sysfs tree, a memfd as device memory
//! and a socketpair as the interrupt fd.

#![warn(missing_docs)]

mod device;
mod error;
mod layout;
mod sysfs;

pub use device::{
    page_size, InterruptCount, RegionError, RegisterOffsetError, UioDevice, UioInterrupt,
    UioRegion, UioRegisters,
};
pub use error::{InterruptError, SysfsProblem, UioError};
pub use layout::{MapLayout, MapRole, MIN_REGISTER_MAP_SIZE};
pub use sysfs::{
    parse_hex, parse_line, parse_u32, read_attribute, UioDeviceInfo, UioDevicePaths, UioMapInfo,
    UioPaths, DEFAULT_DEV_ROOT, DEFAULT_SYSFS_ROOT,
};

impl UioPaths {
    /// Find the device named `name` and open it (interrupts from its device node).
    pub fn open(&self, name: &str) -> Result<UioDevice, UioError> {
        let info = self.find(name)?;
        let node = info.sysfs_dir.file_name().unwrap_or_default();
        UioDevice::open(&UioDevicePaths {
            device_node: self.dev_root.join(node),
            sysfs_dir: info.sysfs_dir,
            interrupt: None,
        })
    }
}
