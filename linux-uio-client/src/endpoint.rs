//! One [`Endpoint`] type over every backend: a real UIO device, a hosted process cell, or an
//! in-process link for tests ([`crate::local`]).
//!
//! Whatever the backend, an endpoint gives the same three things:
//! - the driver [`Ivshmem`]`<`[`EndpointRegisters`]`>` (registers, state table, sections);
//! - the sections through it ([`Ivshmem::own_output`], [`Ivshmem::peer_output`], ...);
//! - an interrupt fd ([`Endpoint::interrupt_fd`], for a reactor) with one non-blocking
//!   operation, [`Endpoint::take_interrupt`], that consumes a pending interrupt **and re-arms**
//!   one-shot mode, and a blocking [`Endpoint::wait_interrupt`].
//!
//! # One-shot interrupts and the re-check rule
//! Every backend runs in one-shot mode, as `uio_ivshmem` does: delivering an interrupt clears
//! `INT_CONTROL`, and doorbells or state changes that arrive while it is clear are dropped.
//! [`Endpoint::take_interrupt`] re-arms before it returns, so the caller must re-check its
//! rings and the state table **after** it returns: whatever the peer published between the
//! interrupt and the re-arm raised no interrupt of its own. The rings' sleep handshakes
//! (`Consumer::prepare_sleep`, `Producer::prepare_wait_for_space`) are made for exactly this
//! order: announce, re-check, then wait.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ivshmem_dev::regs::RegisterAccess;
use ivshmem_dev::{DriverError, Ivshmem};

use crate::hosted::{HostedEndpoint, HostedError, HostedLink, HostedRegisters};
use crate::local::{LocalLink, LocalRegisters};
use crate::uio::{InterruptError, UioDevice, UioError, UioInterrupt, UioPaths, UioRegisters};

/// Errors of opening or driving an [`Endpoint`].
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The UIO backend failed.
    #[error("UIO: {0}")]
    Uio(#[from] UioError),
    /// Reading the UIO interrupt count failed.
    #[error("UIO interrupt: {0}")]
    UioInterrupt(#[from] InterruptError),
    /// The hosted backend failed.
    #[error(transparent)]
    Hosted(#[from] HostedError),
    /// The driver refused the device.
    #[error("driver: {0}")]
    Driver(#[from] DriverError),
    /// The cell is not on a link of that name.
    #[error("cell `{cell}` has no link `{link}` (its links: {available})")]
    NoSuchLink {
        /// The cell name.
        cell: String,
        /// The link asked for.
        link: String,
        /// The links the cell is on, comma separated.
        available: String,
    },
    /// The cell is on several links and none was named.
    #[error("cell `{cell}` is on {count} links ({available}): name one")]
    AmbiguousLink {
        /// The cell name.
        cell: String,
        /// How many links.
        count: usize,
        /// Their names.
        available: String,
    },
    /// The in-process link refused.
    #[error("local link: {0}")]
    Local(String),
    /// An OS call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Which backend an [`Endpoint`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A real `uio_ivshmem` device (`/dev/uioN`).
    Uio,
    /// A process cell of the hosted hypervisor.
    Hosted,
    /// An in-process link (tests, benchmarks).
    Local,
}

/// The register page of any backend ([`RegisterAccess`]).
#[derive(Debug, Clone)]
pub enum EndpointRegisters {
    /// UIO map 0.
    Uio(UioRegisters),
    /// The hosted register emulation.
    Hosted(HostedRegisters),
    /// The in-process emulation.
    Local(LocalRegisters),
}

impl RegisterAccess for EndpointRegisters {
    #[inline]
    fn read32(&self, offset: u32) -> u32 {
        match self {
            Self::Uio(r) => r.read32(offset),
            Self::Hosted(r) => r.read32(offset),
            Self::Local(r) => r.read32(offset),
        }
    }

    #[inline]
    fn write32(&self, offset: u32, value: u32) {
        match self {
            Self::Uio(r) => r.write32(offset, value),
            Self::Hosted(r) => r.write32(offset, value),
            Self::Local(r) => r.write32(offset, value),
        }
    }
}

/// The interrupt side of an endpoint: its fd and the take-and-re-arm operation.
#[derive(Debug)]
pub struct EndpointInterrupt {
    source: InterruptSource,
}

#[derive(Debug)]
enum InterruptSource {
    Uio(UioInterrupt),
    Hosted(HostedLink),
    Local { link: Arc<LocalLink>, id: u16 },
}

impl EndpointInterrupt {
    /// The interrupt fd (non-blocking): readable when an interrupt is pending.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.source {
            InterruptSource::Uio(i) => i.as_fd(),
            InterruptSource::Hosted(l) => l.interrupt_fd(),
            InterruptSource::Local { link, id } => link.interrupt_fd(*id),
        }
    }

    /// Every interrupt fd (non-blocking): one per vector on a hosted MSI-X link, else just
    /// [`EndpointInterrupt::fd`]. A reactor that must wake on any vector's doorbell watches
    /// all of them and then calls [`EndpointInterrupt::take`].
    pub fn vector_fds(&self) -> Vec<BorrowedFd<'_>> {
        match &self.source {
            InterruptSource::Hosted(l) => (0..l.vectors()).filter_map(|v| l.vector_fd(v)).collect(),
            _ => vec![self.fd()],
        }
    }

    /// Consumes a pending interrupt without blocking and re-arms one-shot mode. `Some(n)`: an
    /// interrupt was delivered (`n` >= 1 doorbells/state changes merged into it); `None`:
    /// nothing pending. After `Some`, re-check rings and the state table (see the module docs).
    pub fn take(&mut self) -> Result<Option<u64>, EndpointError> {
        match &mut self.source {
            InterruptSource::Uio(i) => match i.wait() {
                // `wait` re-armed already (after its read).
                Ok(count) => Ok(Some(u64::from(count.missed) + 1)),
                Err(e) if e.is_would_block() => Ok(None),
                // A confused count still means "something happened": re-check everything.
                Err(InterruptError::CountUnchanged { .. })
                | Err(InterruptError::CountBackwards { .. }) => Ok(Some(1)),
                Err(e) => Err(e.into()),
            },
            InterruptSource::Hosted(l) => {
                let n = l.take_interrupt()?;
                if n.is_some() {
                    l.enable_interrupts();
                }
                Ok(n)
            }
            InterruptSource::Local { link, id } => {
                let n = link.take_interrupt(*id)?;
                if n.is_some() {
                    link.rearm(*id);
                }
                Ok(n)
            }
        }
    }

    /// Blocks until an interrupt is delivered (and re-armed); returns its merged count.
    pub fn wait(&mut self) -> Result<u64, EndpointError> {
        loop {
            if let Some(n) = self.wait_until(None)? {
                return Ok(n);
            }
        }
    }

    /// Like [`EndpointInterrupt::wait`], but gives up at `deadline` (`Ok(None)`). Waits on
    /// every vector's fd ([`EndpointInterrupt::vector_fds`]), so a doorbell on any vector
    /// wakes it at once.
    pub fn wait_until(&mut self, deadline: Option<Instant>) -> Result<Option<u64>, EndpointError> {
        loop {
            if let Some(n) = self.take()? {
                return Ok(Some(n));
            }
            let timeout = match deadline {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    Some(libc::timespec {
                        tv_sec: left.as_secs() as libc::time_t,
                        tv_nsec: left.subsec_nanos() as libc::c_long,
                    })
                }
            };
            // Every vector's fd: a doorbell on any vector wakes the wait at once.
            let mut pfds: Vec<libc::pollfd> = self
                .vector_fds()
                .iter()
                .map(|fd| libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let ts = timeout.as_ref().map_or(std::ptr::null(), |t| t as *const _);
            // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds over fds this endpoint
            // keeps open for the call, a valid (or null) timespec, no signal mask.
            let rc = unsafe {
                libc::ppoll(
                    pfds.as_mut_ptr(),
                    pfds.len() as libc::nfds_t,
                    ts,
                    std::ptr::null(),
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(EndpointError::Io {
                        what: "waiting for the interrupt fd",
                        source: err,
                    });
                }
            }
        }
    }
}

/// A cell's end of one ivshmem link, over UIO, the hosted hypervisor or an in-process link.
///
/// On return from every constructor interrupts are enabled in one-shot mode.
#[derive(Debug)]
pub struct Endpoint {
    name: String,
    backend: Backend,
    ivshmem: Ivshmem<EndpointRegisters>,
    interrupt: EndpointInterrupt,
}

impl Endpoint {
    /// Opens the UIO device named `name` (sysfs `name`, e.g. `uio_ivshmem`) under the default
    /// sysfs and `/dev` roots.
    pub fn open_uio(name: &str) -> Result<Self, EndpointError> {
        Self::from_uio(UioPaths::default().open(name)?)
    }

    /// Wraps an opened UIO device. Its interrupt fd is switched to non-blocking reads, and
    /// interrupts are re-armed once (`uio_ivshmem` enables them at probe).
    pub fn from_uio(device: UioDevice) -> Result<Self, EndpointError> {
        let name = device.info().name.clone();
        let ivshmem = device.driver()?;
        let (regs, interrupt) = device.into_parts();
        interrupt
            .set_nonblocking(true)
            .map_err(|source| EndpointError::Io {
                what: "making the UIO interrupt fd non-blocking",
                source,
            })?;
        interrupt.rearm();
        let ivshmem = rewrap(ivshmem, EndpointRegisters::Uio(regs))?;
        Ok(Self {
            name,
            backend: Backend::Uio,
            ivshmem,
            interrupt: EndpointInterrupt {
                source: InterruptSource::Uio(interrupt),
            },
        })
    }

    /// Wraps one link of a hosted process cell; switches it to one-shot mode and enables
    /// interrupts.
    pub fn from_hosted(link: HostedLink) -> Result<Self, EndpointError> {
        let driver = link.ivshmem()?;
        link.registers().set_oneshot(true);
        link.enable_interrupts();
        let regs = EndpointRegisters::Hosted(link.registers().clone());
        Ok(Self {
            name: link.name().to_string(),
            backend: Backend::Hosted,
            ivshmem: rewrap(driver, regs)?,
            interrupt: EndpointInterrupt {
                source: InterruptSource::Hosted(link),
            },
        })
    }

    /// Attaches as cell `cell` to the hosted hypervisor at `socket` and opens link `link`
    /// (`None`: the cell's only link).
    pub fn attach_hosted(
        socket: impl AsRef<Path>,
        cell: &str,
        link: Option<&str>,
    ) -> Result<Self, EndpointError> {
        Self::pick_link(HostedEndpoint::attach(socket, cell)?, link)
    }

    /// Like [`Endpoint::attach_hosted`] with the socket path and cell name from the
    /// environment `hypervisor run` gives its cells (`IVSHMEM_SOCKET`, `IVSHMEM_CELL`).
    pub fn attach_from_env(link: Option<&str>) -> Result<Self, EndpointError> {
        Self::pick_link(HostedEndpoint::attach_from_env()?, link)
    }

    fn pick_link(endpoint: HostedEndpoint, link: Option<&str>) -> Result<Self, EndpointError> {
        let cell = endpoint.cell().to_string();
        let names = endpoint
            .links()
            .iter()
            .map(|l| l.name().to_string())
            .collect::<Vec<_>>();
        let mut links = endpoint.into_links();
        let index =
            match link {
                Some(want) => names.iter().position(|n| n == want).ok_or_else(|| {
                    EndpointError::NoSuchLink {
                        cell: cell.clone(),
                        link: want.to_string(),
                        available: names.join(", "),
                    }
                })?,
                None if names.len() == 1 => 0,
                None => {
                    return Err(EndpointError::AmbiguousLink {
                        cell,
                        count: names.len(),
                        available: names.join(", "),
                    })
                }
            };
        Self::from_hosted(links.swap_remove(index))
    }

    /// Attaches peer `id` of an in-process link (see [`LocalLink`]).
    pub fn attach_local(link: &Arc<LocalLink>, id: u16) -> Result<Self, EndpointError> {
        let regs = link.attach(id)?;
        let driver = Ivshmem::new(
            EndpointRegisters::Local(regs.clone()),
            link.sections_for(id),
        )?;
        Ok(Self {
            name: link.name().to_string(),
            backend: Backend::Local,
            ivshmem: driver,
            interrupt: EndpointInterrupt {
                source: InterruptSource::Local {
                    link: Arc::clone(link),
                    id,
                },
            },
        })
    }

    /// The link (hosted, local) or device (UIO) name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This cell's own name, where the backend knows it: the name the hosted hypervisor
    /// attached it as; `None` over UIO or an in-process link (nothing names the cell there).
    pub fn cell(&self) -> Option<&str> {
        match &self.interrupt.source {
            InterruptSource::Hosted(link) => Some(link.cell()),
            _ => None,
        }
    }

    /// Peer `peer`'s cell name, where the backend knows it (hosted: the hypervisor tells each
    /// cell its peers' names, so `peer 0` can be printed as `rtos-telemetry`).
    pub fn peer_name(&self, peer: u16) -> Option<&str> {
        match &self.interrupt.source {
            InterruptSource::Hosted(link) => link.peer_name(peer),
            _ => None,
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The driver: registers, state table and sections.
    pub fn ivshmem(&self) -> &Ivshmem<EndpointRegisters> {
        &self.ivshmem
    }

    /// This peer's ID on the link.
    pub fn id(&self) -> u16 {
        self.ivshmem.id()
    }

    /// The other peer of a two-peer link (`None` on links with more peers).
    pub fn the_peer(&self) -> Option<u16> {
        (self.ivshmem.max_peers() == 2).then(|| 1 - self.ivshmem.id())
    }

    /// The interrupt fd (non-blocking), readable when an interrupt is pending. On a hosted
    /// MSI-X link this is vector 0 only; see [`Endpoint::vector_fds`].
    pub fn interrupt_fd(&self) -> BorrowedFd<'_> {
        self.interrupt.fd()
    }

    /// See [`EndpointInterrupt::vector_fds`].
    pub fn vector_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.interrupt.vector_fds()
    }

    /// See [`EndpointInterrupt::take`].
    pub fn take_interrupt(&mut self) -> Result<Option<u64>, EndpointError> {
        self.interrupt.take()
    }

    /// See [`EndpointInterrupt::wait`].
    pub fn wait_interrupt(&mut self) -> Result<u64, EndpointError> {
        self.interrupt.wait()
    }

    /// See [`EndpointInterrupt::wait_until`]; gives up after `timeout`.
    pub fn wait_interrupt_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<u64>, EndpointError> {
        self.interrupt.wait_until(Some(Instant::now() + timeout))
    }

    /// The driver and the interrupt side, separately (e.g. to lend the driver to bare-metal
    /// style code while the caller waits for interrupts).
    pub fn into_parts(self) -> (Ivshmem<EndpointRegisters>, EndpointInterrupt) {
        (self.ivshmem, self.interrupt)
    }

    /// Borrow the driver and the interrupt side at once.
    pub fn parts_mut(&mut self) -> (&Ivshmem<EndpointRegisters>, &mut EndpointInterrupt) {
        (&self.ivshmem, &mut self.interrupt)
    }
}

/// Rebuilds a driver over another register access to the same device.
fn rewrap<R: RegisterAccess>(
    driver: Ivshmem<R>,
    regs: EndpointRegisters,
) -> Result<Ivshmem<EndpointRegisters>, DriverError> {
    Ivshmem::new(regs, *driver.sections())
}
