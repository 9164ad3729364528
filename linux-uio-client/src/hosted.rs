//! The process-cell endpoint: attach to the hosted hypervisor's control socket by cell name
//! and drive each link like an ivshmem v2 device.
//!
//! [`HostedEndpoint::attach`] connects to the Unix `SOCK_SEQPACKET` control socket, attaches
//! by cell name and receives, per link the cell is on, the link parameters and its fds (see
//! [`ivshmem_dev::hosted::GrantFds`]). Each link becomes a [`HostedLink`] with:
//!
//! - the sections mapped: the state table and other peers' output sections read-only (their
//!   fds are read-only, so they cannot be mapped writable), the R/W section and this peer's
//!   own output section read-write;
//! - [`HostedRegisters`], an [`ivshmem_dev::RegisterAccess`] emulating the register page:
//!   `ID` and `MAX_PEERS` from the attach reply; `DOORBELL` writes 1 to the target peer's
//!   interrupt eventfd (vector 0 only; no effect on a target that does not exist); `STATE` is
//!   sent to the hypervisor, which updates the state table and notifies the peers, and the
//!   write returns only after its acknowledgement (a failed register write is logged with
//!   `tracing::warn!`; if no reply comes within the reply timeout, 5 s by default, the
//!   connection is marked broken, since a late acknowledgement would otherwise be taken for
//!   the next write's, and later writes fail with [`HostedError::Broken`]); `INT_CONTROL` and one-shot mode are kept
//!   here: a doorbell that arrives while interrupts are disabled is discarded (drained when
//!   interrupts are enabled or re-armed); other offsets read 0 and ignore writes;
//! - [`HostedLink::ivshmem`], the driver [`Ivshmem<HostedRegisters>`] over those mappings;
//! - the interrupt eventfd ([`HostedLink::interrupt_fd`], for an async reactor) and a blocking
//!   [`HostedLink::wait_interrupt`] that applies INT_CONTROL and one-shot semantics.
//!
//! Closing the endpoint (or the process dying) closes the socket: the hypervisor then sets
//! this cell's states to 0 and notifies its peers.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ivshmem_dev::hosted::{
    self, AttachBody, DecodeError, GrantFds, LinkGrantBody, RefusalReason, Reply, Request,
    SetStateBody, WireName, MAX_FDS_PER_GRANT, MAX_MESSAGE_SIZE,
};
use ivshmem_dev::regs::{self, RegisterAccess, INT_CONTROL_ENABLE};
use ivshmem_dev::{DriverError, Ivshmem, Section, Sections, MAX_SUPPORTED_PEERS};
use memmap2::{MmapOptions, MmapRaw};
use nix::sys::socket::{
    connect, recvmsg, send, socket, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

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
    #[error("the hypervisor refused: {detail} ({reason:?})")]
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
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_GRANT]);
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
    link_index: u32,
    peer_id: u16,
    max_peers: u16,
    protocol: u16,
    connection: Arc<Connection>,
    state_table: MappedSection,
    rw: Option<MappedSection>,
    outputs: Vec<MappedSection>,
    interrupt: OwnedFd,
    doorbells: Vec<OwnedFd>,
    int_control: AtomicU32,
    oneshot: AtomicBool,
    state: AtomicU32,
}

impl LinkShared {
    fn drain_interrupt(&self) -> io::Result<u64> {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        let n = unsafe {
            libc::read(
                self.interrupt.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                8,
            )
        };
        if n == 8 {
            return Ok(count);
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            Ok(0)
        } else {
            Err(err)
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
        let (target, vector) = ((value >> 16) as u16, value & 0xFFFF);
        // INTx: only vector 0 exists; any other vector, or a peer that does not exist, has no
        // effect, like on the device.
        if vector != 0 {
            return;
        }
        if let Some(fd) = s.doorbells.get(target as usize) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own. EAGAIN (counter
            // full) means the interrupt is pending anyway.
            let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

impl RegisterAccess for HostedRegisters {
    fn read32(&self, offset: u32) -> u32 {
        let s = &self.shared;
        match offset {
            regs::ID => u32::from(s.peer_id),
            regs::MAX_PEERS => u32::from(s.max_peers),
            regs::INT_CONTROL => s.int_control.load(Ordering::SeqCst),
            regs::STATE => s.state.load(Ordering::SeqCst),
            _ => 0,
        }
    }

    fn write32(&self, offset: u32, value: u32) {
        let s = &self.shared;
        match offset {
            regs::INT_CONTROL => {
                let enable = value & INT_CONTROL_ENABLE;
                let old = s.int_control.swap(enable, Ordering::SeqCst);
                if old == 0 && enable != 0 {
                    // Doorbells that arrived while disabled are discarded, as on the device.
                    let _ = s.drain_interrupt();
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
        self.regs.write32(regs::DOORBELL, u32::from(target) << 16);
    }

    /// Enables interrupts (INT_CONTROL = 1; also the re-arm after a one-shot delivery).
    pub fn enable_interrupts(&self) {
        self.regs.write32(regs::INT_CONTROL, INT_CONTROL_ENABLE);
    }

    /// Disables interrupts (INT_CONTROL = 0).
    pub fn disable_interrupts(&self) {
        self.regs.write32(regs::INT_CONTROL, 0);
    }

    /// The interrupt eventfd (non-blocking), for an async reactor. After it becomes readable,
    /// call [`HostedLink::take_interrupt`], which applies INT_CONTROL and one-shot semantics.
    pub fn interrupt_fd(&self) -> BorrowedFd<'_> {
        self.shared().interrupt.as_fd()
    }

    /// Takes a pending interrupt without blocking: `Some(count)` if one was delivered (in
    /// one-shot mode this clears INT_CONTROL), `None` if nothing was pending or interrupts
    /// are disabled (then the pending doorbells are discarded).
    pub fn take_interrupt(&self) -> Result<Option<u64>, HostedError> {
        let s = self.shared();
        let count = s.drain_interrupt()?;
        if count == 0 {
            return Ok(None);
        }
        if s.int_control.load(Ordering::SeqCst) & INT_CONTROL_ENABLE == 0 {
            return Ok(None);
        }
        if s.oneshot.load(Ordering::SeqCst) {
            s.int_control.store(0, Ordering::SeqCst);
        }
        Ok(Some(count))
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
        let s = self.shared();
        loop {
            if s.int_control.load(Ordering::SeqCst) & INT_CONTROL_ENABLE == 0 {
                return Err(HostedError::InterruptsDisabled);
            }
            if let Some(n) = self.take_interrupt()? {
                return Ok(Some(n));
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            let mut pfd = libc::pollfd {
                fd: s.interrupt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err.into());
                }
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
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| connect_err(e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| connect_err(e.into()))?;
        connect(fd.as_raw_fd(), &addr).map_err(|e| connect_err(e.into()))?;
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
            match Connection::recv(fd.as_fd(), reply_timeout)? {
                (Reply::LinkGrant(g), fds) if g.link == k => grants.push((g, fds)),
                (other, _) => {
                    return Err(HostedError::Protocol(format!(
                        "expected link grant {k}, got {other:?}"
                    )));
                }
            }
        }
        let connection = Arc::new(Connection {
            fd: Mutex::new(fd),
            broken: Mutex::new(None),
            reply_timeout,
        });
        let links = grants
            .into_iter()
            .map(|(g, fds)| Self::link_from_grant(&connection, &g, fds))
            .collect::<Result<Vec<_>, _>>()?;
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
        g: &LinkGrantBody,
        fds: Vec<OwnedFd>,
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
        let mut interrupt = None;
        for peer in 0..g.max_peers {
            let i = layout.interrupt(peer).expect("peer < max_peers");
            let fd = take(i);
            if peer == g.peer_id {
                interrupt = Some(fd.try_clone()?);
            }
            doorbells.push(fd);
        }
        let interrupt = interrupt.expect("peer_id < max_peers was checked by the decoder");
        let shared = LinkShared {
            name,
            link_index: g.link,
            peer_id: g.peer_id,
            max_peers: g.max_peers,
            protocol: g.protocol,
            connection: Arc::clone(connection),
            state_table,
            rw,
            outputs,
            interrupt,
            doorbells,
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

    /// Takes the links out (the control socket stays open while any link or driver lives).
    pub fn into_links(self) -> Vec<HostedLink> {
        self.links
    }
}
