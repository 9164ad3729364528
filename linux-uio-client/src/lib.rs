//! The Linux side of an ivshmem link: real UIO (`/dev/uioN` from `uio_ivshmem`) or the hosted
//! hypervisor's control socket, behind one [`Endpoint`] type, with tokio on top.
//!
//! - [`endpoint`]: [`Endpoint`], the same driver, sections and interrupt fd over every backend.
//! - [`uio`]: the UIO backend (sysfs discovery, map layout, interrupt count reads).
//! - [`hosted`]: the process-cell backend (attach to the hosted hypervisor's control socket).
//! - [`local`]: an in-process link with eventfd interrupts (tests, benchmarks).
//! - [`channel`]: tokio: [`Channel`] (interrupts under `AsyncFd`, record and frame streams,
//!   back-pressured sends, `AsyncRead`/`AsyncWrite`, polling mode, peer states, re-attach).
//! - [`telemetry`]: the telemetry pipe's sample record and its bare-metal-style producer cell.
#![warn(missing_docs)]

pub mod channel;
pub mod endpoint;
pub mod hosted;
pub mod local;
pub mod telemetry;
pub mod uio;

pub use channel::{Channel, ChannelError, ChannelOptions, ChannelStats, PeerState, WaitMode};
pub use endpoint::{Backend, Endpoint, EndpointError, EndpointInterrupt, EndpointRegisters};
pub use local::LocalLink;
