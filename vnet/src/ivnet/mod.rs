//! The `ivshmem-net` wire format (protocol 0001h, Linux's Jailhouse network driver), a second
//! vnet transport beside the shmring format ([`crate::nic`]).
//!
//! The contract is `/work/shared/ivshmem-net.md`: one split virtqueue per direction in the
//! sender's own output section with the used rings swapped, section-relative descriptor
//! addresses, in-order completions of length 1, event-index doorbell suppression, a data area
//! of 64-byte slots, and the four-state link machine ([`ivshmem_link::state`]).
//!
//! - [`wire`]: geometry, offsets and typed views over bytes (pure, golden-tested).
//! - [`queue`]: the transport over two mapped sections ([`queue::Queues`]), hostile-peer safe.
//! - [`link`]: [`IvnetLink`], the device, state machine, doorbells and a smoltcp `Device`.
//! - `std` only: `bridge`, the TAP bridge in this format.
//!
//! All `no_std`; `wire` and `queue` are allocation-free, the link holds two frame buffers.

#[cfg(feature = "std")]
pub mod bridge;
pub mod link;
pub mod queue;
pub mod wire;

pub use link::{Interrupts, IvnetConfig, IvnetError, IvnetLink, IvnetStats};
pub use queue::{PeerFault, QueueError, QueueStats, Queues};
pub use wire::{Geometry, GeometryError};
