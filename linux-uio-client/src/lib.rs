//! The Linux side of an ivshmem link: real UIO (`/dev/uioN` from `uio_ivshmem`) or the hosted
//! hypervisor's control socket.
//!
//! - [`uio`]: the UIO backend (sysfs discovery, map layout, interrupt count reads).
//! - [`hosted`]: the process-cell backend (attach to the hosted hypervisor's control socket).

pub mod hosted;
pub mod uio;
