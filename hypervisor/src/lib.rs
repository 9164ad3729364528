//! The hosted hypervisor: the virtual ivshmem v2 device, system configuration and the cell
//! life cycle.
//!
//! - [`config`]: the system description (cells, links) in TOML and its validation.
//! - [`device`]: the emulated ivshmem v2 device (config space and BAR0 registers), shared by
//!   every backend.
//! - [`memory`]: link memory, one memfd per section.
//! - [`control`]: the control socket that process cells attach to.
//! - [`cells`]: spawning and supervising cell programs.
//! - [`status`]: what `hypervisor status` reports.
//! - `cli` (feature `cli`, default): the `hypervisor` command line.
//! - [`kvm`]: KVM cells (bare-metal inmates in virtual machines).

pub mod cells;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod control;
pub mod device;
pub mod kvm;
pub mod memory;
pub mod status;
