//! The telemetry pipe between a real-time cell and Linux: the record, the producer cell and
//! the consumer's check — application code over the link crates, no_std at its core.
//!
//! - [`Sample`]: the fixed-size record (`#[repr(C)]`, `Pod`), one frame each. Its channel
//!   values are a pure function of the sequence number ([`Sample::expected_channels`]), so a
//!   consumer detects any torn or corrupted record.
//! - [`ProducerCell`]: the producer, written as bare-metal code would be (only `core`, the
//!   ivshmem driver, [`ivshmem_link::Link`] and the rings), reaching its platform only
//!   through [`CellPlatform`] (a clock, and "wait for an interrupt or a deadline"). The same
//!   code runs in a process cell (`telemetry_producer` example) or in a KVM cell.
//! - [`SampleCheck`]: the consumer's accounting of gaps, reorders, tears and restarts.
//! - Feature `process`: [`process::ProcessPlatform`] and [`process::monotonic_ns`], the
//!   producer's platform in a Linux process (an endpoint of `linux-uio-client`).
//!
//! Dependency rule: `shmring`, `ivshmem-dev` ← `ivshmem-link` ← this crate. The consumer side
//! (tokio `Channel`) lives in `linux-uio-client`; this crate only checks what it receives.
//!
//! ```
//! use telemetry::{Sample, SampleCheck};
//!
//! let mut check = SampleCheck::default();
//! for seq in [0, 1, 2, 4] {
//!     check.check(&Sample::new(seq, 0));
//! }
//! let mut torn = Sample::new(5, 0);
//! torn.channels[2] = -1.0; // a record torn by a broken producer
//! check.check(&torn);
//! assert_eq!((check.received, check.missing, check.torn), (5, 1, 1));
//! assert!(!check.is_clean());
//! // On the wire a sample is 40 bytes.
//! assert_eq!(bytemuck::bytes_of(&Sample::new(0, 0)).len(), Sample::SIZE);
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

#[cfg(feature = "process")]
pub mod process;
pub mod producer;
pub mod sample;

pub use producer::{CellPlatform, ProducerCell, ProducerConfig, ProducerError, ProducerStats};
pub use sample::{Sample, SampleCheck, CHANNELS};
