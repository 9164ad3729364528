//! The process-cell endpoint: attach to the hosted hypervisor's control socket by cell name
//! and drive each link like an ivshmem v2 device.
//!
//! [`HostedEndpoint::attach`] connects to the Unix `SOCK_SEQPACKET` control socket, attaches
//! by cell name and receives, per link the cell is on, the link parameters and its section
//! fds (see [`ivshmem_dev::hosted::GrantFds`]), then every peer's cell name and interrupt
//! eventfds, one per vector ([`ivshmem_dev::hosted::PeerBody`]). Each link becomes a
//! [`HostedLink`] with:
//!
//! - the sections mapped: the state table and other peers' output sections read-only (their
//!   fds are read-only, so they cannot be mapped writable), the R/W section and this peer's
//!   own output section read-write;
//! - [`HostedRegisters`], an [`ivshmem_dev::RegisterAccess`] emulating the register page:
//!   `ID` and `MAX_PEERS` from the attach reply; `DOORBELL` writes 1 to the target peer's
//!   interrupt eventfd for the vector (no effect on a target or vector that does not exist;
//!   INTx links have vector 0 only, MSI-X links 1..=16 vectors); `STATE` is
//!   sent to the hypervisor, which updates the state table and notifies the peers, and the
//!   write returns only after its acknowledgement (a failed register write is logged with
//!   `tracing::warn!`; if no reply comes within the reply timeout, 5 s by default, the
//!   connection is marked broken, since a late acknowledgement would otherwise be taken for
//!   the next write's, and later writes fail with [`HostedError::Broken`]); `INT_CONTROL` and one-shot mode are kept
//!   here: a doorbell that arrives while interrupts are disabled is discarded (drained when
//!   interrupts are enabled or re-armed); other aligned offsets in the page read 0 and ignore
//!   writes. A misaligned offset or one outside the page is an **illegal access**, as on the
//!   device: the endpoint reports it to the hypervisor (which logs the `FATAL:` report,
//!   kills a cell it spawned and detaches it, so its peers see state 0) and then stops this
//!   process with `SIGKILL`, like the hypervisor would;
//! - [`HostedLink::ivshmem`], the driver [`Ivshmem<HostedRegisters>`] over those mappings;
//! - the interrupt eventfds, one per vector ([`HostedLink::interrupt_fd`] for vector 0,
//!   [`HostedLink::vector_fd`]; for an async reactor), [`HostedLink::take_vectors`] and a
//!   blocking [`HostedLink::wait_interrupt`] that apply INT_CONTROL and one-shot semantics
//!   (with MSI-X and one-shot, the vectors pending together are delivered together, then
//!   INT_CONTROL is cleared);
//! - the peers' cell names ([`HostedLink::peer_name`], [`HostedLink::peer_id_of`]).
//!
//! Closing the endpoint (or the process dying) closes the socket: the hypervisor then sets
//! this cell's states to 0 and notifies its peers.
//!
//! # When the hypervisor dies
//! The other direction needs care: the state table is the hypervisor's memfd, and after a
//! `kill -9` of the hypervisor it still holds whatever the peers' states last were, so the
//! cell would see "peer RUN" forever. A closed control socket therefore reads as **every peer
//! gone**: each endpoint has a watcher thread that blocks in `poll` on the control socket for
//! a hang-up (`POLLHUP`; ordinary replies do not wake it) and on a pipe that closes
//! with the endpoint. On a hang-up it, for each link still alive:
//! 1. replaces the state table's read-only mapping, in place (`MAP_FIXED`), by an anonymous
//!    zero page mapping of the same size, so every reader of the table, the driver
//!    [`Ivshmem`] included, reads state 0 for every peer from then on (the pointer the
//!    driver holds stays valid);
//! 2. marks the connection broken, so later STATE writes fail with [`HostedError::Broken`]
//!    (before step 3, so a cell woken by it never sees another error);
//! 3. then raises vector 0 on this peer (writes its own vector-0 eventfd), the interrupt a
//!    state change raises, so whoever waits on the interrupt wakes and re-reads the table.
//!
//! The sections themselves stay mapped: what peers published before stays readable.

use std::io::{self, IoSliceMut};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ivshmem_dev::hosted::{
    self, AccessBody, AttachBody, DecodeError, GrantFds, LinkGrantBody, PeerBody, RefusalReason,
    Reply, Request, SetStateBody, WireName, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE,
};
use ivshmem_dev::regs::{self, RegisterAccess, INT_CONTROL_ENABLE};
use ivshmem_dev::{DriverError, Ivshmem, Section, Sections, MAX_SUPPORTED_PEERS};
use memmap2::{MmapOptions, MmapRaw};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
use nix::sys::socket::{recvmsg, send, ControlMessageOwned, MsgFlags};

/// Environment variable with the control socket path (set by `hypervisor run` for the cells it
/// spawns).
pub const ENV_SOCKET: &str = "IVSHMEM_SOCKET";
/// Environment variable with the cell name (set by `hypervisor run`).
pub const ENV_CELL: &str = "IVSHMEM_CELL";

/// How long to wait for a reply from the hypervisor before giving up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the hosted endpoint.
#[derive(Debug, thiserror::Error)]
pub enum HostedError {
    /// Nothing listens at the socket path.
    #[error("cannot connect to the hypervisor at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The hypervisor refused the request.
    #[error("the hypervisor refused: {detail}")]
    Refused {
        /// The reason code.
        reason: RefusalReason,
        /// The hypervisor's explanation.
        detail: String,
    },
    /// Talking over the control socket failed.
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// The hypervisor closed the control socket.
    #[error("the hypervisor closed the control socket")]
    Closed,
    /// A reply is malformed.
    #[error("malformed reply from the hypervisor: {0}")]
    Decode(#[from] DecodeError),
    /// A reply is well-formed but not what the conversation expects.
    #[error("protocol violation by the hypervisor: {0}")]
    Protocol(String),
    /// Mapping a section failed.
    #[error("link `{link}`: cannot map {section}: {source}")]
    Map {
        /// Link name.
        link: String,
        /// Which section.
        section: String,
        /// OS error.
        source: io::Error,
    },
    /// The driver refused the device.
    #[error("driver: {0}")]
    Driver(#[from] DriverError),
    /// `wait_interrupt` was called with interrupts disabled: it would never return.
    #[error("interrupts are disabled (INT_CONTROL = 0): enable them before waiting")]
    InterruptsDisabled,
    /// No reply arrived in time. A late reply would answer the wrong request, so the
    /// connection is out of step and every later request fails with [`HostedError::Broken`].
    #[error(
        "no reply from the hypervisor within {0:?}; the control connection is unusable from now on"
    )]
    Timeout(Duration),
    /// An earlier request failed half-way (timeout, I/O or protocol error), so replies can no
    /// longer be paired with requests; attach again (a new endpoint) to continue.
    #[error("the control connection is out of step after an earlier failure: {0}")]
    Broken(String),
    /// An environment variable is missing.
    #[error("environment variable {0} is not set (is this process started by `hypervisor run`?)")]
    MissingEnv(&'static str),
}

/// The control socket, shared by the links of one endpoint.
#[derive(Debug)]
struct Connection {
    fd: Mutex<OwnedFd>,
    /// Set when a request failed half-way: what went wrong. Nothing is sent after that.
    broken: Mutex<Option<String>>,
    reply_timeout: Duration,
    /// Set by the watcher when the hypervisor closed the control socket.
    hypervisor_gone: AtomicBool,
    /// The write end of the watcher's stop pipe: dropping the connection closes it, which
    /// ends the watcher thread.
    _watcher_stop: OwnedFd,
}

impl Connection {
    fn send(fd: BorrowedFd<'_>, request: &Request) -> Result<(), HostedError> {
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        let n = request
            .encode(&mut buf)
            .map_err(|e| HostedError::Protocol(e.to_string()))?;
        send(fd.as_raw_fd(), &buf[..n], MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)?;
        Ok(())
    }

    /// Receives one reply and the fds beside it (owned at once, so they close on any error).
    /// `timeout` is the socket's receive timeout (for the error).
    fn recv(fd: BorrowedFd<'_>, timeout: Duration) -> Result<(Reply, Vec<OwnedFd>), HostedError> {
        let mut buf = [0u8; MAX_MESSAGE_SIZE + 1];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
        let (n, truncated, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = loop {
                match recvmsg::<()>(
                    fd.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(m) => break m,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(nix::errno::Errno::EAGAIN) => return Err(HostedError::Timeout(timeout)),
                    Err(e) => return Err(HostedError::Io(e.into())),
                }
            };
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these fds for us; nobody else owns them.
                    fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                }
            }
            let truncated = msg
                .flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            (msg.bytes, truncated, fds)
        };
        if n == 0 {
            return Err(HostedError::Closed);
        }
        if truncated || n > MAX_MESSAGE_SIZE {
            return Err(HostedError::Protocol(
                "reply or its fds were truncated".into(),
            ));
        }
        Ok((hosted::decode_reply(&buf[..n])?, fds))
    }

    /// Sends a STATE write and waits for its acknowledgement. Any failure other than a
    /// refusal (a complete reply) leaves the conversation out of step, e.g. an ack that
    /// arrives after the timeout would be taken for the next write's: the connection is then
    /// marked broken and refuses every later request with [`HostedError::Broken`].
    fn set_state(&self, link: u32, value: u32) -> Result<(), HostedError> {
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = broken.as_ref() {
            return Err(HostedError::Broken(why.clone()));
        }
        let result = Self::send(fd.as_fd(), &Request::SetState(SetStateBody { link, value }))
            .and_then(|()| match Self::recv(fd.as_fd(), self.reply_timeout)? {
                (Reply::StateAck(ack), fds)
                    if ack.link == link && ack.value == value && fds.is_empty() =>
                {
                    Ok(())
                }
                (Reply::Refused(r), _) => Err(refused(&r)),
                (other, _) => Err(HostedError::Protocol(format!(
                    "expected a STATE ack, got {other:?}"
                ))),
            });
        if let Err(e) = &result {
            if !matches!(e, HostedError::Refused { .. }) {
                *broken = Some(format!("STATE write of {value:#x} on link {link}: {e}"));
            }
        }
        result
    }
}

impl Connection {
    /// Reports an illegal register access and waits (up to the reply timeout) for the
    /// hypervisor's verdict: the refusal detail (its `FATAL:` report) when it agrees.
    fn report_illegal_access(&self, access: AccessBody) -> Result<String, HostedError> {
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        Self::send(fd.as_fd(), &Request::IllegalAccess(access))?;
        match Self::recv(fd.as_fd(), self.reply_timeout)? {
            (Reply::Refused(r), _) => Ok(r.detail().to_string()),
            (other, _) => Err(HostedError::Protocol(format!(
                "expected the verdict on an illegal access, got {other:?}"
            ))),
        }
    }
}

/// The watcher thread of one connection (see the module docs, "When the hypervisor dies").
/// `socket` is a duplicate of the control socket, `stop` the read end of a pipe whose write
/// end the [`Connection`] holds; `links` are weak so the watcher keeps nothing alive.
fn watch_hypervisor(socket: OwnedFd, stop: OwnedFd, links: Vec<Weak<LinkShared>>) {
    loop {
        let mut fds = [
            // No events asked: poll reports POLLHUP (a closed peer) and POLLERR regardless,
            // and ordinary replies do not wake this thread.
            PollFd::new(socket.as_fd(), PollFlags::empty()),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(
                    "watching the control socket failed, hypervisor death will go unnoticed: {e}"
                );
                return;
            }
        }
        let hung_up = |fd: &PollFd<'_>| {
            fd.revents().is_some_and(|r| {
                r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL)
            })
        };
        // The endpoint is gone (the pipe's write end closed): nothing to tell anyone.
        if hung_up(&fds[1])
            || fds[1]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN))
        {
            return;
        }
        if hung_up(&fds[0]) {
            break;
        }
    }
    tracing::warn!("the hypervisor closed the control socket: every peer reads as gone (state 0)");
    for link in links.iter().filter_map(Weak::upgrade) {
        link.hypervisor_gone();
    }
}

fn refused(r: &hosted::RefusedBody) -> HostedError {
    HostedError::Refused {
        reason: r.reason().unwrap_or(RefusalReason::BadRequest),
        detail: r.detail().to_string(),
    }
}

/// One mapped section and its fd.
#[derive(Debug)]
struct MappedSection {
    map: MmapRaw,
    fd: OwnedFd,
    writable: bool,
}

impl MappedSection {
    fn map(
        fd: OwnedFd,
        len: u64,
        writable: bool,
        link: &str,
        section: &str,
    ) -> Result<Self, HostedError> {
        let map_err = |source: io::Error| HostedError::Map {
            link: link.into(),
            section: section.into(),
            source,
        };
        let len_usize =
            usize::try_from(len).map_err(|_| map_err(io::ErrorKind::InvalidInput.into()))?;
        // The hypervisor is trusted to send the right fd, but a file shorter than the section
        // would turn accesses into SIGBUS: check the size first.
        let file_len = std::fs::File::from(fd.try_clone().map_err(map_err)?)
            .metadata()
            .map_err(map_err)?
            .len();
        if file_len < len {
            return Err(HostedError::Protocol(format!(
                "link `{link}`: {section} is {file_len} bytes, the grant says {len}"
            )));
        }
        let mut options = MmapOptions::new();
        options.len(len_usize);
        let map = if writable {
            options.map_raw(&fd)
        } else {
            options.map_raw_read_only(&fd)
        }
        .map_err(map_err)?;
        Ok(Self { map, fd, writable })
    }

    fn section(&self) -> Section {
        let ptr = NonNull::new(self.map.as_mut_ptr()).expect("mmap never returns null");
        // SAFETY: the mapping is `len` bytes, page-aligned, readable (and writable if
        // `writable`), and lives as long as the `LinkShared` that every holder of the
        // section (HostedLink, HostedRegisters inside the driver) keeps alive.
        unsafe { Section::new(ptr, self.map.len(), self.writable) }
    }
}

/// What one link's registers and mappings share.
#[derive(Debug)]
struct LinkShared {
    name: String,
    /// The name of the cell this endpoint attached as.
    cell: String,
    link_index: u32,
    peer_id: u16,
    max_peers: u16,
    protocol: u16,
    vectors: u16,
    connection: Arc<Connection>,
    state_table: MappedSection,
    rw: Option<MappedSection>,
    outputs: Vec<MappedSection>,
    /// This peer's interrupt eventfds, by vector.
    interrupts: Vec<OwnedFd>,
    /// Every peer's interrupt eventfds (the doorbells), by peer ID, then vector.
    doorbells: Vec<Vec<OwnedFd>>,
    /// Every peer's cell name, by peer ID.
    peer_names: Vec<String>,
    int_control: AtomicU32,
    oneshot: AtomicBool,
    state: AtomicU32,
}

impl LinkShared {
    /// Drains the eventfd of `vector` (non-blocking): the count, 0 if nothing was pending.
    fn drain_vector(&self, vector: u16) -> io::Result<u64> {
        let Some(fd) = self.interrupts.get(usize::from(vector)) else {
            return Ok(0);
        };
        let mut count = [0u8; 8];
        match nix::unistd::read(fd, &mut count) {
            Ok(8) => Ok(u64::from_ne_bytes(count)),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("eventfd read returned {n} bytes"),
            )),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Drains every vector's eventfd (discarding what was pending).
    fn drain_all(&self) {
        for vector in 0..self.vectors {
            let _ = self.drain_vector(vector);
        }
    }

    /// The hypervisor closed the control socket: the state table reads 0 from now on, then
    /// the connection is marked broken, then vector 0 is raised on this peer (see the module
    /// docs).
    fn hypervisor_gone(&self) {
        let map = &self.state_table.map;
        if let (Some(addr), Some(len)) = (
            NonZeroUsize::new(map.as_mut_ptr() as usize),
            NonZeroUsize::new(map.len()),
        ) {
            // SAFETY: `[addr, addr + len)` is exactly the state table's mapping, alive while
            // `self` is (the caller holds a strong reference), so MAP_FIXED replaces only
            // memory this mapping owns. Readers only make 32-bit atomic loads through it
            // (never references to plain data): each sees the old or the new page's value.
            // The range stays mapped and readable, and `MmapRaw`'s drop unmaps it as before.
            let remapped = unsafe {
                mmap_anonymous(
                    Some(addr),
                    len,
                    ProtFlags::PROT_READ,
                    MapFlags::MAP_FIXED | MapFlags::MAP_PRIVATE,
                )
            };
            if let Err(e) = remapped {
                tracing::warn!(link = %self.name, "cannot clear the state table after the hypervisor died: {e}");
            }
        }
        // Broken before anyone can see the hypervisor gone: whoever wakes on the flag or the
        // interrupt and writes STATE gets `Broken`, not the socket's own error.
        self.connection
            .broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| HostedError::Closed.to_string());
        self.connection
            .hypervisor_gone
            .store(true, Ordering::SeqCst);
        // Vector 0 carries state changes. EAGAIN (counter full) means it is pending anyway.
        if let Some(fd) = self.interrupts.first() {
            let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
        }
    }

    /// Reads `peer`'s state table entry. The mapping is read-only, and std only promises
    /// that `Relaxed` atomic loads work on read-only memory, so this is a `Relaxed` load
    /// followed by an `Acquire` fence (pairing with the hypervisor's store, so what the peer
    /// wrote before changing its state is visible after this returns).
    fn read_state_entry(&self, peer: u16) -> Option<u32> {
        if peer >= self.max_peers {
            return None;
        }
        // SAFETY: the state table mapping holds at least 4*max_peers bytes (checked by the
        // decoder: state_table_size >= 4*max_peers, and the fd size was checked), it is
        // page-aligned, and only aligned 32-bit accesses are made to it by every process.
        let entry =
            unsafe { &*(self.state_table.map.as_ptr().add(peer as usize * 4) as *const AtomicU32) };
        let value = entry.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        Some(value)
    }
}

/// The register page of one hosted link ([`RegisterAccess`]); cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct HostedRegisters {
    shared: Arc<LinkShared>,
}

impl HostedRegisters {
    /// Writes STATE and waits for the hypervisor's acknowledgement; on return the state table
    /// holds `value` and the peers were notified.
    pub fn set_state(&self, value: u32) -> Result<(), HostedError> {
        let s = &self.shared;
        s.connection.set_state(s.link_index, value)?;
        s.state.store(value, Ordering::SeqCst);
        Ok(())
    }

    /// Enables or disables one-shot mode (the privileged-control bit of the vendor
    /// capability): delivering an interrupt then clears INT_CONTROL until re-armed.
    pub fn set_oneshot(&self, oneshot: bool) {
        self.shared.oneshot.store(oneshot, Ordering::SeqCst);
    }

    /// Whether one-shot mode is on.
    pub fn oneshot(&self) -> bool {
        self.shared.oneshot.load(Ordering::SeqCst)
    }

    fn ring(&self, value: u32) {
        let s = &self.shared;
        let (target, vector) = ((value >> 16) as usize, (value & 0xFFFF) as usize);
        // A peer or vector that does not exist: no effect, like on the device.
        if let Some(fd) = s.doorbells.get(target).and_then(|lines| lines.get(vector)) {
            // EAGAIN (counter full) means the interrupt is pending anyway.
            let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
        }
    }

    /// An access the device refuses (misaligned, or outside the register page): reported to
    /// the hypervisor, which stops the cell (`FATAL:` report, peers see state 0); then this
    /// process stops itself with `SIGKILL` in case the hypervisor could not (a cell started
    /// by hand), as a CPU stops at a fault. Never returns.
    fn illegal_access(&self, offset: u32, value: Option<u32>) -> ! {
        let s = &self.shared;
        let access = AccessBody {
            link: s.link_index,
            offset,
            value: value.unwrap_or(0),
            size: 4,
            write: u8::from(value.is_some()),
            reserved: 0,
        };
        match s.connection.report_illegal_access(access) {
            Ok(report) => tracing::error!(link = %s.name, "{report}"),
            Err(e) => tracing::error!(
                link = %s.name,
                "illegal register {} at offset {offset:#x}; reporting it failed: {e}",
                if value.is_some() { "write" } else { "read" }
            ),
        }
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught or ignored; this is not reached.
        std::process::abort()
    }

    /// Whether `offset` is a legal register offset: 4-aligned, inside the page.
    fn legal(offset: u32) -> bool {
        offset % 4 == 0 && offset < regs::REGISTER_PAGE_SIZE
    }
}

impl RegisterAccess for HostedRegisters {
    /// A misaligned offset, or one outside the page, is an illegal access: the cell is
    /// stopped (see [`HostedRegisters`]'s module docs) and this does not return.
    fn read32(&self, offset: u32) -> u32 {
        if !Self::legal(offset) {
            self.illegal_access(offset, None);
        }
        let s = &self.shared;
        match offset {
            regs::ID => u32::from(s.peer_id),
            regs::MAX_PEERS => u32::from(s.max_peers),
            regs::INT_CONTROL => s.int_control.load(Ordering::SeqCst),
            regs::STATE => s.state.load(Ordering::SeqCst),
            _ => 0,
        }
    }

    /// A misaligned offset, or one outside the page, is an illegal access: the cell is
    /// stopped and this does not return.
    fn write32(&self, offset: u32, value: u32) {
        if !Self::legal(offset) {
            self.illegal_access(offset, Some(value));
        }
        let s = &self.shared;
        match offset {
            regs::INT_CONTROL => {
                let enable = value & INT_CONTROL_ENABLE;
                let old = s.int_control.swap(enable, Ordering::SeqCst);
                if old == 0 && enable != 0 {
                    // Doorbells that arrived while disabled are discarded, as on the device.
                    s.drain_all();
                }
            }
            regs::DOORBELL => self.ring(value),
            regs::STATE => {
                // A register write cannot fail; if the hypervisor is gone, STATE keeps its old
                // value (read it back to notice) and the peers see this cell detach anyway.
                if let Err(e) = self.set_state(value) {
                    tracing::warn!(
                        link = %s.name,
                        "STATE write of {value:#x} failed, STATE stays {:#x}: {e}",
                        s.state.load(Ordering::SeqCst)
                    );
                }
            }
            _ => {}
        }
    }
}

/// One link of a hosted cell: mappings, registers, interrupt.
#[derive(Debug)]
pub struct HostedLink {
    regs: HostedRegisters,
}

impl HostedLink {
    fn shared(&self) -> &LinkShared {
        &self.regs.shared
    }

    /// Link name.
    pub fn name(&self) -> &str {
        &self.shared().name
    }

    /// The name of the cell this endpoint attached as (its own name in the configuration).
    pub fn cell(&self) -> &str {
        &self.shared().cell
    }

    /// This cell's peer ID on the link.
    pub fn peer_id(&self) -> u16 {
        self.shared().peer_id
    }

    /// Number of peers.
    pub fn max_peers(&self) -> u16 {
        self.shared().max_peers
    }

    /// The link's protocol.
    pub fn protocol(&self) -> u16 {
        self.shared().protocol
    }

    /// Interrupt vectors per peer (1 with INTx, 1..=16 with MSI-X). Vector 0 carries state
    /// changes.
    pub fn vectors(&self) -> u16 {
        self.shared().vectors
    }

    /// The cell name of peer `peer` (as configured; `None` if the peer does not exist).
    pub fn peer_name(&self, peer: u16) -> Option<&str> {
        self.shared()
            .peer_names
            .get(usize::from(peer))
            .map(String::as_str)
    }

    /// The peer ID of the cell called `cell` on this link.
    pub fn peer_id_of(&self, cell: &str) -> Option<u16> {
        self.shared()
            .peer_names
            .iter()
            .position(|name| name == cell)
            .map(|id| id as u16)
    }

    /// The register page.
    pub fn registers(&self) -> &HostedRegisters {
        &self.regs
    }

    /// The driver over this link's registers and mappings. The mappings live as long as the
    /// driver (it holds the registers, which hold them).
    pub fn ivshmem(&self) -> Result<Ivshmem<HostedRegisters>, HostedError> {
        let s = self.shared();
        let mut sections = Sections::new(s.state_table.section());
        sections.rw = s.rw.as_ref().map(MappedSection::section);
        if s.outputs.is_empty() {
            sections.outputs[s.peer_id as usize] = Some(Section::empty(true));
        } else {
            for (peer, out) in s.outputs.iter().enumerate().take(MAX_SUPPORTED_PEERS) {
                sections.outputs[peer] = Some(out.section());
            }
        }
        Ok(Ivshmem::new(self.regs.clone(), sections)?)
    }

    /// Reads peer `peer`'s entry of the state table (`None` if the peer does not exist).
    pub fn peer_state(&self, peer: u16) -> Option<u32> {
        self.shared().read_state_entry(peer)
    }

    /// Whether the hypervisor closed the control socket (died or stopped): every peer then
    /// reads as state 0 and vector 0 was raised (see the module docs).
    pub fn hypervisor_gone(&self) -> bool {
        self.shared()
            .connection
            .hypervisor_gone
            .load(Ordering::SeqCst)
    }

    /// This peer's STATE (as acknowledged by the hypervisor).
    pub fn state(&self) -> u32 {
        self.regs.read32(regs::STATE)
    }

    /// Writes STATE and waits for the acknowledgement (see [`HostedRegisters::set_state`]).
    pub fn set_state(&self, value: u32) -> Result<(), HostedError> {
        self.regs.set_state(value)
    }

    /// Rings peer `target`'s doorbell (vector 0).
    pub fn ring(&self, target: u16) {
        self.ring_vector(target, 0);
    }

    /// Rings `vector` on peer `target` (no effect if either does not exist).
    pub fn ring_vector(&self, target: u16, vector: u16) {
        self.regs.write32(
            regs::DOORBELL,
            ivshmem_dev::Doorbell::new(target, vector).encode(),
        );
    }

    /// Enables interrupts (INT_CONTROL = 1; also the re-arm after a one-shot delivery).
    pub fn enable_interrupts(&self) {
        self.regs.write32(regs::INT_CONTROL, INT_CONTROL_ENABLE);
    }

    /// Disables interrupts (INT_CONTROL = 0).
    pub fn disable_interrupts(&self) {
        self.regs.write32(regs::INT_CONTROL, 0);
    }

    /// The interrupt eventfd of vector 0 (non-blocking), for an async reactor. After it
    /// becomes readable, call [`HostedLink::take_interrupt`], which applies INT_CONTROL and
    /// one-shot semantics. With INTx this is the only vector.
    pub fn interrupt_fd(&self) -> BorrowedFd<'_> {
        self.shared().interrupts[0].as_fd()
    }

    /// The interrupt eventfd of `vector` (non-blocking), `None` if the vector does not exist.
    /// After it becomes readable, call [`HostedLink::take_vectors`].
    pub fn vector_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.shared()
            .interrupts
            .get(usize::from(vector))
            .map(AsFd::as_fd)
    }

    /// Takes a pending interrupt without blocking: `Some(count)` if one was delivered (in
    /// one-shot mode this clears INT_CONTROL), `None` if nothing was pending or interrupts
    /// are disabled (then the pending doorbells are discarded). The count merges every
    /// vector's doorbells; [`HostedLink::take_vectors`] tells them apart.
    pub fn take_interrupt(&self) -> Result<Option<u64>, HostedError> {
        let delivered = self.take_vectors()?;
        Ok((!delivered.is_empty()).then(|| delivered.iter().map(|&(_, n)| n).sum()))
    }

    /// Takes every pending vector without blocking: `(vector, count)` for each vector that
    /// was delivered, in vector order; empty if nothing was pending or interrupts are
    /// disabled (pending doorbells are then discarded). In one-shot mode a non-empty result
    /// clears INT_CONTROL (the vectors pending together count as one delivery).
    pub fn take_vectors(&self) -> Result<Vec<(u16, u64)>, HostedError> {
        let s = self.shared();
        let mut delivered = Vec::new();
        for vector in 0..s.vectors {
            let count = s.drain_vector(vector)?;
            if count != 0 {
                delivered.push((vector, count));
            }
        }
        if delivered.is_empty() || s.int_control.load(Ordering::SeqCst) & INT_CONTROL_ENABLE == 0 {
            return Ok(Vec::new());
        }
        if s.oneshot.load(Ordering::SeqCst) {
            s.int_control.store(0, Ordering::SeqCst);
        }
        Ok(delivered)
    }

    /// Blocks until an interrupt is delivered; returns how many doorbells/state changes were
    /// merged into it. Fails if interrupts are disabled.
    pub fn wait_interrupt(&self) -> Result<u64, HostedError> {
        loop {
            if let Some(n) = self.wait_interrupt_until(None)? {
                return Ok(n);
            }
        }
    }

    /// Like [`HostedLink::wait_interrupt`], but gives up after `timeout` (`Ok(None)`).
    pub fn wait_interrupt_timeout(&self, timeout: Duration) -> Result<Option<u64>, HostedError> {
        self.wait_interrupt_until(Some(Instant::now() + timeout))
    }

    fn wait_interrupt_until(&self, deadline: Option<Instant>) -> Result<Option<u64>, HostedError> {
        let delivered = self.wait_vectors_until(deadline)?;
        Ok((!delivered.is_empty()).then(|| delivered.iter().map(|&(_, n)| n).sum()))
    }

    /// Blocks until at least one vector is delivered or `timeout` passes; returns what
    /// [`HostedLink::take_vectors`] took (empty after the timeout). Fails if interrupts are
    /// disabled.
    pub fn wait_vectors_timeout(&self, timeout: Duration) -> Result<Vec<(u16, u64)>, HostedError> {
        self.wait_vectors_until(Some(Instant::now() + timeout))
    }

    fn wait_vectors_until(
        &self,
        deadline: Option<Instant>,
    ) -> Result<Vec<(u16, u64)>, HostedError> {
        let s = self.shared();
        loop {
            if s.int_control.load(Ordering::SeqCst) & INT_CONTROL_ENABLE == 0 {
                return Err(HostedError::InterruptsDisabled);
            }
            let delivered = self.take_vectors()?;
            if !delivered.is_empty() {
                return Ok(delivered);
            }
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Vec::new());
                    }
                    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds: Vec<PollFd<'_>> = s
                .interrupts
                .iter()
                .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
    }

    /// The state table's fd (read-only).
    pub fn state_table_fd(&self) -> BorrowedFd<'_> {
        self.shared().state_table.fd.as_fd()
    }

    /// The R/W section's fd (read-write), if the link has one.
    pub fn rw_fd(&self) -> Option<BorrowedFd<'_>> {
        self.shared().rw.as_ref().map(|m| m.fd.as_fd())
    }

    /// Peer `peer`'s output section fd (read-write for this peer's own, read-only otherwise).
    pub fn output_fd(&self, peer: u16) -> Option<BorrowedFd<'_>> {
        self.shared()
            .outputs
            .get(peer as usize)
            .map(|m| m.fd.as_fd())
    }

    /// Peer `peer`'s output section as mapped here (`writable` only for this peer's own).
    pub fn output(&self, peer: u16) -> Option<Section> {
        self.shared()
            .outputs
            .get(peer as usize)
            .map(MappedSection::section)
    }

    /// The R/W section as mapped here.
    pub fn rw(&self) -> Option<Section> {
        self.shared().rw.as_ref().map(MappedSection::section)
    }

    /// The state table as mapped here (read-only).
    pub fn state_table(&self) -> Section {
        self.shared().state_table.section()
    }
}

/// A process cell attached to the hosted hypervisor.
#[derive(Debug)]
pub struct HostedEndpoint {
    cell: String,
    hypervisor_pid: u32,
    links: Vec<HostedLink>,
}

impl HostedEndpoint {
    /// Attaches as cell `cell` through the control socket at `socket_path`.
    pub fn attach(socket_path: impl AsRef<Path>, cell: &str) -> Result<Self, HostedError> {
        Self::attach_with_timeout(socket_path, cell, REPLY_TIMEOUT)
    }

    /// Like [`HostedEndpoint::attach`], waiting at most `reply_timeout` (at least 1 ms) for
    /// each reply of the hypervisor instead of 5 s. After a reply times out the connection
    /// is unusable ([`HostedError::Timeout`], then [`HostedError::Broken`]).
    pub fn attach_with_timeout(
        socket_path: impl AsRef<Path>,
        cell: &str,
        reply_timeout: Duration,
    ) -> Result<Self, HostedError> {
        let reply_timeout = reply_timeout.max(Duration::from_millis(1));
        let path = socket_path.as_ref();
        let connect_err = |source: io::Error| HostedError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let fd = hosted::connect(path).map_err(|e| connect_err(e.into()))?;
        let tv = nix::sys::time::TimeVal::new(
            reply_timeout.as_secs() as _,
            reply_timeout.subsec_micros() as _,
        );
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(io::Error::from)?;

        let name = WireName::new(cell)
            .map_err(|e| HostedError::Protocol(format!("cell name `{cell}`: {e}")))?;
        Connection::send(fd.as_fd(), &Request::Attach(AttachBody { cell: name }))?;
        let accepted = match Connection::recv(fd.as_fd(), reply_timeout)? {
            (Reply::Accepted(a), fds) if fds.is_empty() => a,
            (Reply::Refused(r), _) => return Err(refused(&r)),
            (other, _) => {
                return Err(HostedError::Protocol(format!(
                    "expected an attach reply, got {other:?}"
                )))
            }
        };
        let mut grants = Vec::new();
        for k in 0..accepted.link_count {
            let (grant, fds) = match Connection::recv(fd.as_fd(), reply_timeout)? {
                (Reply::LinkGrant(g), fds) if g.link == k => (g, fds),
                (other, _) => {
                    return Err(HostedError::Protocol(format!(
                        "expected link grant {k}, got {other:?}"
                    )));
                }
            };
            let mut peers = Vec::new();
            for peer in 0..grant.max_peers {
                match Connection::recv(fd.as_fd(), reply_timeout)? {
                    (Reply::Peer(p), fds)
                        if p.link == k
                            && p.peer == peer
                            && p.fd_count == grant.vectors
                            && fds.len() == usize::from(grant.vectors) =>
                    {
                        peers.push((p, fds))
                    }
                    (other, fds) => {
                        return Err(HostedError::Protocol(format!(
                            "expected peer {peer} of link {k} with {} eventfds, got {other:?} \
                             with {} fds",
                            grant.vectors,
                            fds.len()
                        )));
                    }
                }
            }
            grants.push((grant, fds, peers));
        }
        let watched = fd.try_clone()?;
        let (stop_read, stop_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let connection = Arc::new(Connection {
            fd: Mutex::new(fd),
            broken: Mutex::new(None),
            reply_timeout,
            hypervisor_gone: AtomicBool::new(false),
            _watcher_stop: stop_write,
        });
        let links = grants
            .into_iter()
            .map(|(g, fds, peers)| Self::link_from_grant(&connection, cell, &g, fds, peers))
            .collect::<Result<Vec<_>, _>>()?;
        let weak = links
            .iter()
            .map(|l| Arc::downgrade(&l.regs.shared))
            .collect::<Vec<_>>();
        std::thread::Builder::new()
            .name(format!("ivshmem-watch-{cell}"))
            .spawn(move || watch_hypervisor(watched, stop_read, weak))?;
        Ok(Self {
            cell: cell.to_string(),
            hypervisor_pid: accepted.hypervisor_pid,
            links,
        })
    }

    /// Attaches with the socket path and cell name from [`ENV_SOCKET`] and [`ENV_CELL`].
    pub fn attach_from_env() -> Result<Self, HostedError> {
        let socket = std::env::var_os(ENV_SOCKET).ok_or(HostedError::MissingEnv(ENV_SOCKET))?;
        let cell = std::env::var(ENV_CELL).map_err(|_| HostedError::MissingEnv(ENV_CELL))?;
        Self::attach(PathBuf::from(socket), &cell)
    }

    fn link_from_grant(
        connection: &Arc<Connection>,
        cell: &str,
        g: &LinkGrantBody,
        fds: Vec<OwnedFd>,
        peers: Vec<(PeerBody, Vec<OwnedFd>)>,
    ) -> Result<HostedLink, HostedError> {
        let name = g.name.as_str()?.to_string();
        let layout = GrantFds::for_grant(g);
        if fds.len() != layout.count() {
            return Err(HostedError::Protocol(format!(
                "link `{name}`: {} fds arrived, the grant announces {}",
                fds.len(),
                layout.count()
            )));
        }
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut take = |i: usize| fds[i].take().expect("each fd index is used once");
        let state_table = MappedSection::map(
            take(layout.state_table()),
            u64::from(g.state_table_size),
            false,
            &name,
            "the state table",
        )?;
        let rw = layout
            .rw()
            .map(|i| MappedSection::map(take(i), g.rw_size, true, &name, "the R/W section"))
            .transpose()?;
        let mut outputs = Vec::new();
        for peer in 0..g.max_peers {
            if let Some(i) = layout.output(peer) {
                let own = peer == g.peer_id;
                let what = format!("the output section of peer {peer}");
                outputs.push(MappedSection::map(
                    take(i),
                    g.output_size,
                    own,
                    &name,
                    &what,
                )?);
            }
        }
        let mut doorbells = Vec::new();
        let mut peer_names = Vec::new();
        for (body, fds) in peers {
            peer_names.push(body.cell.as_str()?.to_string());
            doorbells.push(fds);
        }
        let interrupts = doorbells[usize::from(g.peer_id)]
            .iter()
            .map(OwnedFd::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        let shared = LinkShared {
            name,
            cell: cell.to_string(),
            link_index: g.link,
            peer_id: g.peer_id,
            max_peers: g.max_peers,
            protocol: g.protocol,
            vectors: g.vectors,
            connection: Arc::clone(connection),
            state_table,
            rw,
            outputs,
            interrupts,
            doorbells,
            peer_names,
            int_control: AtomicU32::new(0),
            oneshot: AtomicBool::new(false),
            state: AtomicU32::new(0),
        };
        Ok(HostedLink {
            regs: HostedRegisters {
                shared: Arc::new(shared),
            },
        })
    }

    /// The cell name this endpoint attached as.
    pub fn cell(&self) -> &str {
        &self.cell
    }

    /// The hypervisor's process ID.
    pub fn hypervisor_pid(&self) -> u32 {
        self.hypervisor_pid
    }

    /// The links of this cell, in the hypervisor's grant order.
    pub fn links(&self) -> &[HostedLink] {
        &self.links
    }

    /// The link named `name`.
    pub fn link(&self, name: &str) -> Option<&HostedLink> {
        self.links.iter().find(|l| l.name() == name)
    }

    /// Whether the hypervisor closed the control socket (died or stopped): every peer then
    /// reads as state 0 (see the module docs).
    pub fn hypervisor_gone(&self) -> bool {
        self.links
            .first()
            .is_some_and(|l| l.shared().connection.hypervisor_gone.load(Ordering::SeqCst))
    }

    /// Takes the links out (the control socket stays open while any link or driver lives).
    pub fn into_links(self) -> Vec<HostedLink> {
        self.links
    }
}

#[cfg(test)]
mod display_tests {
    use super::*;

    /// A refusal reads as the hypervisor's words: no backend prefix (`hosted: `) and no Rust
    /// variant name (`(UnknownCell)`) in what a user sees.
    #[test]
    fn a_refusal_shows_no_backend_prefix_or_variant_name() {
        let error = crate::EndpointError::from(HostedError::Refused {
            reason: RefusalReason::UnknownCell,
            detail: "no cell named `zz`".to_owned(),
        });
        assert_eq!(
            error.to_string(),
            "the hypervisor refused: no cell named `zz`"
        );
    }
}
