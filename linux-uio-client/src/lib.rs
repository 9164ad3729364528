//! The Linux side of an ivshmem link: real UIO (`/dev/uioN` from `uio_ivshmem`) or the hosted
//! hypervisor's control socket, behind one [`Endpoint`] type, with tokio on top.
//!
//! - [`endpoint`]: [`Endpoint`], the same driver, sections and interrupt fd over every backend.
//! - [`uio`]: the UIO backend (sysfs discovery, map layout, interrupt count reads).
//! - [`hosted`]: the process-cell backend (attach to the hosted hypervisor's control socket).
//! - [`local`]: an in-process link with eventfd interrupts (tests, benchmarks).
//! - [`channel`] (feature `tokio`, on by default): tokio: [`Channel`] (interrupts under `AsyncFd`, record and frame streams,
//!   back-pressured sends, `AsyncRead`/`AsyncWrite`, polling mode, peer states, re-attach).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use linux_uio_client::{Channel, ChannelOptions, Endpoint, LocalLink};
//!
//! // Two peers of an in-process link; with a hypervisor use Endpoint::attach_hosted (or
//! // attach_from_env in a cell it spawned), on real hardware Endpoint::open_uio.
//! let link = LocalLink::new("demo", 2, 16 * 1024)?;
//! let mut a = Channel::new(Endpoint::attach_local(&link, 0)?, ChannelOptions::default())?;
//! let mut b = Channel::new(Endpoint::attach_local(&link, 1)?, ChannelOptions::default())?;
//! // The link comes up (INIT, READY, RUN) while both are driven.
//! let (sent, got) = tokio::join!(a.send_record(&42u64), b.recv_record::<u64>());
//! sent?;
//! assert_eq!(got?, 42);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

#[cfg(feature = "tokio")]
pub mod channel;
pub mod endpoint;
pub mod hosted;
pub mod local;
pub mod uio;

#[cfg(feature = "tokio")]
pub use channel::{Channel, ChannelError, ChannelOptions, ChannelStats, PeerState, WaitMode};
pub use endpoint::{Backend, Endpoint, EndpointError, EndpointInterrupt, EndpointRegisters};
pub use local::LocalLink;
