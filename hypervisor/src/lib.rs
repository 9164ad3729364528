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
//!
//! # Example
//! A system description validated, and its link's emulated device driven by two peers: peer
//! 0 changes its state, peer 1 (interrupts enabled) gets the state interrupt and reads the
//! new state from the table. `hypervisor run` does the same through the control socket
//! ([`cells::run_system`]); the repository's README shows whole systems.
//!
//! ```
//! use hypervisor::config::SystemConfig;
//! use hypervisor::device::{Interrupt, Link, LinkParams, VecStateTable};
//! use ivshmem_dev::regs::{INT_CONTROL, STATE};
//!
//! let valid = SystemConfig::from_toml_str(
//!     r#"
//!     [system]
//!     name = "example"
//!     [[cells]]
//!     name = "producer"
//!     cpus = [0]
//!     command = "/bin/true"
//!     [[cells]]
//!     name = "consumer"
//!     cpus = [1]
//!     command = "/bin/true"
//!     [[links]]
//!     name = "telemetry"
//!     peers = ["producer", "consumer"]
//!     protocol = "telemetry"
//!     output_size = "64K"
//!     "#,
//! )?
//! .validate()?;
//! let config = &valid.links[0];
//! assert_eq!(config.layout.output(1).map(|r| r.size), Some(64 * 1024));
//!
//! let mut link = Link::new(
//!     LinkParams {
//!         name: config.name.clone(),
//!         max_peers: config.max_peers(),
//!         protocol: config.protocol.into(),
//!         layout: config.layout,
//!         interrupts: config.interrupts,
//!     },
//!     Box::new(VecStateTable::new(config.max_peers())),
//! )?;
//! link.peer_attached(0);
//! link.peer_attached(1);
//! link.mmio_write(1, INT_CONTROL.into(), 4, 1)?;
//! let effects = link.mmio_write(0, STATE.into(), 4, 1)?;
//! assert_eq!(effects.interrupts, [Interrupt { target: 1, vector: 0 }]);
//! assert_eq!(link.peer_state(0), Some(1));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cells;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod control;
pub mod device;
pub mod kvm;
pub mod memory;
pub mod status;
