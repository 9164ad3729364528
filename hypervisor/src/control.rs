//! The control socket of the hosted hypervisor: process cells attach here by name.
//!
//! [`ControlServer`] owns every link's memory ([`LinkMemory`]) and device model, listens on a
//! Unix `SOCK_SEQPACKET` socket (mode 0600) and runs a single-threaded `poll(2)` loop
//! ([`ControlServer::poll`]) over the listening socket, the connected cells and any extra fds
//! of the caller (child pidfds, a signalfd, a stop eventfd). The protocol is
//! [`ivshmem_dev::hosted`]:
//!
//! - attach by cell name: unknown names, names already attached, non-process cells and
//!   processes of another uid (`SO_PEERCRED`) are refused with a clear reply; otherwise the cell
//!   gets, per link it is on, the link parameters and its fds (state table RO, R/W section RW,
//!   own output RW, other outputs RO), then every peer's cell name and interrupt eventfds, one
//!   per vector (1 with INTx, the link's `vectors` with MSI-X; its own drained first). The state table is sealed with `F_SEAL_FUTURE_WRITE`, so no cell can write it
//!   even through a reopened fd; a peer's output section is read-only only as long as
//!   same-uid cells do not reopen its fd read-write (see [`crate::memory`], "What read-only
//!   protects against");
//! - a STATE write goes through the device model, which updates the state table; the
//!   hypervisor then writes the eventfds of the notified peers and acknowledges;
//! - a closed socket (exit, crash, `kill -9`) detaches the cell: state 0, peers notified;
//! - an illegal access (a STATE write the device refuses) stops the cell with a `FATAL:`
//!   report: a spawned cell process is killed (SIGKILL), a cell started by hand is
//!   disconnected; either way it is detached;
//! - a status query is answered on any connection;
//! - the loop never waits for one cell: client sockets are non-blocking; replies that do not
//!   fit the socket (a cell with many links gets 1 + links x (1 + peers) of them at attach,
//!   more than a socket buffer holds) wait in the client's outbox and go out when the socket
//!   is writable again; a client with more than [`MAX_QUEUED_REPLIES`] replies waiting (it
//!   does not read its socket) is dropped, an attached cell detached;
//!   at most [`MAX_UNATTACHED_CLIENTS`] connections may be open without an attached cell.
//!
//! # Trust between process cells
//!
//! Process cells run as the hypervisor's uid or, when the hypervisor runs as root, under a
//! uid of their own configured per cell (checked with `SO_PEERCRED` on attach; the socket is
//! then mode 0666). Cells of the hypervisor's uid are trusted not to interfere with each other
//! beyond what the device allows:
//!
//! - **Doorbells.** A cell gets every peer's interrupt eventfd so that it can ring them
//!   (`DOORBELL` writes 1 to the target's eventfd). An eventfd has no write-only mode, so these
//!   fds are also readable: a cell that reads a peer's eventfd would consume that peer's
//!   pending doorbells and state-change interrupts (the peer would miss a wake-up, never see
//!   wrong data). Process cells are trusted not to read their peers' eventfds; only
//!   `linux_uio_client::hosted` touches them, and it only writes them. KVM cells (not in
//!   this build yet) ring doorbells through an `ioeventfd` on their register page that the
//!   hypervisor owns; they never hold a peer's fd, so they cannot do this.
//! - **Output sections.** Other peers' output sections are handed over read-only, but a
//!   process of the hypervisor's uid can reopen the memfd read-write; a cell under a uid of
//!   its own cannot. See [`crate::memory`], "What read-only protects against". The state
//!   table is sealed and cannot be written by any cell.

use std::collections::BTreeSet;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ivshmem_dev::hosted::{
    self, AcceptedBody, AccessBody, CellPhase, GrantFds, LinkGrantBody, PeerBody, RefusalReason,
    RefusedBody, Reply, Request, SetStateBody, WireName, MAX_MESSAGE_SIZE, MAX_WIRE_PEERS,
};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::socket::{
    accept4, bind, getsockopt, listen, send, sendmsg, socket, sockopt, AddressFamily, Backlog,
    ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::unistd::Pid;

use crate::device::AccessError;
use crate::memory::{LinkMemory, MappedStateTable, MemoryError};
use crate::status::{CellExit, CellStatus, LinkStatus, PeerStatus, SystemStatus};

/// Most connections that may be open without an attached cell (status queries, cells in the
/// middle of attaching); further connections are closed at once.
pub const MAX_UNATTACHED_CLIENTS: usize = 32;

/// Most replies that may wait in one client's outbox (see the module documentation). The
/// grants of an attach are 1 + links x (1 + peers) replies: 65,536 are the grants of 3,855
/// links of 16 peers.
pub const MAX_QUEUED_REPLIES: usize = 1 << 16;

/// One link as the control server serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    /// Link name.
    pub name: String,
    /// Cell names in peer-ID order.
    pub peers: Vec<String>,
    /// Protocol (PCI prog-IF/sub-class).
    pub protocol: u16,
    /// State table size in bytes.
    pub state_table_size: u64,
    /// R/W section size in bytes (0: none).
    pub rw_size: u64,
    /// Output section size in bytes (0: none).
    pub output_size: u64,
    /// Interrupt kind and vectors per peer: each peer gets one eventfd per vector.
    pub interrupts: crate::device::InterruptMode,
}

/// One cell as the control server and the supervisor see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellSpec {
    /// Cell name.
    pub name: String,
    /// CPUs the cell's process is pinned to.
    pub cpus: Vec<usize>,
    /// Program and arguments to spawn, if the hypervisor starts this cell.
    pub command: Option<Vec<String>>,
    /// Whether this is a process cell (may attach over the socket).
    pub process: bool,
    /// The user ID the cell's process runs under, if not the hypervisor's: attaches from it
    /// are accepted, and the control socket is made connectable for it.
    pub uid: Option<u32>,
}

/// A whole hosted system: what `run` serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemSpec {
    /// Cells.
    pub cells: Vec<CellSpec>,
    /// Links.
    pub links: Vec<LinkSpec>,
}

/// What the device model tells the server to do after an event: the peers whose interrupt
/// line (vector 0) to raise.
pub type Notify = Vec<u16>;

/// The emulated device of one link, as the control server drives it. Implemented by
/// [`crate::device::Link`] (see [`device_model`]).
pub trait LinkModel: Send {
    /// A peer attached: reset its registers, clear the table if it is the first; returns the
    /// peers to notify.
    fn peer_attached(&mut self, peer: u16) -> Notify;
    /// A peer detached: its state becomes 0; returns the peers to notify.
    fn peer_detached(&mut self, peer: u16) -> Notify;
    /// The peer wrote STATE; returns the peers to notify, or the refused (illegal) access.
    fn write_state(&mut self, peer: u16, value: u32) -> Result<Notify, AccessError>;
    /// Why a register access the peer's endpoint reports would be refused by the device, or
    /// `None` if it is legal. The default judges nothing (`None`): such a model never stops a
    /// cell for a reported access.
    fn register_access_error(
        &self,
        peer: u16,
        offset: u64,
        kind: crate::device::AccessKind,
        size: u8,
        value: Option<u64>,
    ) -> Option<AccessError> {
        let _ = (peer, offset, kind, size, value);
        None
    }
    /// Whether `peer` is active, if the model knows better than the server's own record
    /// (a model shared with KVM cells does: they attach without the server).
    fn is_active(&self, _peer: u16) -> Option<bool> {
        None
    }
    /// Raises vector 0 on `peers` (state changes). By default writes their eventfds in
    /// `memory`; a model shared with KVM cells injects their MSI instead
    /// ([`crate::kvm::WiredModel`]).
    fn raise(&self, memory: &LinkMemory, link: &str, peers: &[u16]) {
        for &peer in peers {
            if let Err(e) = memory.signal(peer) {
                tracing::warn!("link `{link}`: raising the interrupt of peer {peer} failed: {e}");
            }
        }
    }
}

/// What `hypervisor cell ACTION NAME` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellAction {
    /// Stop the cell.
    Stop,
    /// Start a stopped cell.
    Start,
    /// Stop and start the cell.
    Restart,
}

impl CellAction {
    /// The wire code ([`hosted::cell_action`]).
    pub fn code(self) -> u32 {
        match self {
            CellAction::Stop => hosted::cell_action::STOP,
            CellAction::Start => hosted::cell_action::START,
            CellAction::Restart => hosted::cell_action::RESTART,
        }
    }

    /// The verb of `hypervisor cell VERB NAME`.
    pub fn verb(self) -> &'static str {
        match self {
            CellAction::Stop => "stop",
            CellAction::Start => "start",
            CellAction::Restart => "restart",
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            hosted::cell_action::STOP => Some(CellAction::Stop),
            hosted::cell_action::START => Some(CellAction::Start),
            hosted::cell_action::RESTART => Some(CellAction::Restart),
            _ => None,
        }
    }
}

/// A cell stop/start/restart request waiting for the supervisor
/// ([`ControlServer::take_cell_requests`], [`ControlServer::answer_cell_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellRequest {
    client: u64,
    /// The cell.
    pub cell: String,
    /// What to do.
    pub action: CellAction,
}

/// Errors of the control server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another hypervisor listens at the path.
    #[error("another hypervisor is already listening at {0}")]
    AlreadyRunning(PathBuf),
    /// The socket at the path belongs to another user (connecting to it was refused with
    /// `EACCES`): most likely another user's hypervisor listens there.
    #[error(
        "{0} belongs to another user (permission denied): their hypervisor may be running \
         there; choose another path with --socket or control_socket"
    )]
    NotPermitted(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Socket setup failed.
    #[error("control socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// Creating link memory failed.
    #[error("link `{link}`: {source}")]
    Memory {
        /// Link name.
        link: String,
        /// The memory error.
        source: MemoryError,
    },
    /// A link names a cell that does not exist, or has too many peers.
    #[error("link `{link}`: {reason}")]
    BadLink {
        /// Link name.
        link: String,
        /// What is wrong.
        reason: String,
    },
    /// The device model could not be created.
    #[error("link `{link}`: device model: {reason}")]
    Device {
        /// Link name.
        link: String,
        /// What went wrong.
        reason: String,
    },
    /// `poll(2)` failed.
    #[error("poll: {0}")]
    Poll(io::Error),
}

/// Something that happened on the control socket (for logs and the live status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// A cell attached.
    Attached {
        /// Cell name.
        cell: String,
        /// Its process ID.
        pid: u32,
    },
    /// A cell's socket closed: it is detached, its state is 0.
    Detached {
        /// Cell name.
        cell: String,
        /// Why (closed, protocol error …).
        reason: String,
    },
    /// An attach was refused.
    Refused {
        /// Name asked for.
        cell: String,
        /// The reply sent.
        detail: String,
    },
    /// A cell wrote STATE.
    State {
        /// Cell name.
        cell: String,
        /// Link name.
        link: String,
        /// New value.
        value: u32,
    },
}

struct ServedLink {
    spec: LinkSpec,
    memory: Arc<LinkMemory>,
    view: MappedStateTable,
    model: Box<dyn LinkModel>,
    active: u32,
}

struct ServedCell {
    spec: CellSpec,
    /// (link index, peer ID), in link order: the grant order.
    memberships: Vec<(usize, u16)>,
    client: Option<u64>,
    pid: Option<u32>,
    phase: CellPhase,
    spawned: bool,
    /// The process the supervisor spawned for this cell, while it is not reaped (the
    /// attaching process may be another one, e.g. its child).
    spawned_pid: Option<u32>,
    exit: Option<CellExit>,
}

struct Client {
    id: u64,
    fd: OwnedFd,
    pid: u32,
    uid: u32,
    cell: Option<usize>,
    /// Replies (with the fds to pass beside them) that did not fit the socket yet, in order.
    /// The fds belong to the links' memory, which lives as long as the server.
    outbox: std::collections::VecDeque<(Reply, Vec<RawFd>)>,
}

/// The control socket server and the state of every hosted link and cell.
pub struct ControlServer {
    listener: OwnedFd,
    path: PathBuf,
    uid: u32,
    links: Vec<ServedLink>,
    cells: Vec<ServedCell>,
    clients: Vec<Client>,
    next_client: u64,
    events: Vec<ControlEvent>,
    cell_requests: Vec<CellRequest>,
    /// Cell requests taken by the supervisor and not answered yet.
    cell_requests_in_progress: Vec<CellRequest>,
    socket_inode: Option<(u64, u64)>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .field("clients", &self.clients.len())
            .finish()
    }
}

/// Creates (or hands over) one link's memory and device model.
type LinkMaker<'a> =
    dyn FnMut(&LinkSpec) -> Result<(Arc<LinkMemory>, Box<dyn LinkModel>), ControlError> + 'a;

/// Builds the device model of a link over its mapped state table.
pub type ModelFactory<'a> =
    dyn FnMut(&LinkSpec, MappedStateTable) -> Result<Box<dyn LinkModel>, String> + 'a;

impl ControlServer {
    /// Creates every link's memory and device model (with `make_model`) and listens at `path`.
    pub fn bind(
        system: &SystemSpec,
        path: &Path,
        make_model: &mut ModelFactory<'_>,
    ) -> Result<Self, ControlError> {
        Self::bind_links(system, path, &mut |spec| {
            let memory = LinkMemory::create(
                &spec.name,
                spec.peers.len() as u16,
                spec.interrupts.vectors(),
                spec.state_table_size,
                spec.rw_size,
                spec.output_size,
            )
            .map_err(|source| ControlError::Memory {
                link: spec.name.clone(),
                source,
            })?;
            // The state table is sealed against writes; the model shares the hypervisor's
            // mapping.
            let model = make_model(spec, memory.state_table_map()).map_err(|reason| {
                ControlError::Device {
                    link: spec.name.clone(),
                    reason,
                }
            })?;
            Ok((Arc::new(memory), model))
        })
    }

    /// Like [`bind`](Self::bind), over links that already exist and are shared with KVM
    /// cells: `wirings[i]` is `system.links[i]`.
    pub fn bind_wired(
        system: &SystemSpec,
        path: &Path,
        wirings: &[Arc<crate::kvm::LinkWiring>],
    ) -> Result<Self, ControlError> {
        let mut next = wirings.iter();
        Self::bind_links(system, path, &mut |spec| {
            let wiring = next.next().ok_or_else(|| ControlError::BadLink {
                link: spec.name.clone(),
                reason: "no link memory for it".into(),
            })?;
            Ok((
                wiring.memory().clone(),
                Box::new(crate::kvm::WiredModel::new(wiring.clone())),
            ))
        })
    }

    fn bind_links(
        system: &SystemSpec,
        path: &Path,
        make_link: &mut LinkMaker<'_>,
    ) -> Result<Self, ControlError> {
        // Cell name -> index, and each cell's memberships, built in one pass over the links:
        // linear in cells + peers (a scan of every link per cell was quadratic).
        let mut cell_index = std::collections::HashMap::with_capacity(system.cells.len());
        for (index, cell) in system.cells.iter().enumerate() {
            cell_index.entry(cell.name.as_str()).or_insert(index);
        }
        let mut memberships: Vec<Vec<(usize, u16)>> = vec![Vec::new(); system.cells.len()];
        let mut links = Vec::new();
        for (li, spec) in system.links.iter().enumerate() {
            let bad = |reason: String| ControlError::BadLink {
                link: spec.name.clone(),
                reason,
            };
            if spec.peers.len() < 2 || spec.peers.len() > MAX_WIRE_PEERS {
                return Err(bad(format!(
                    "{} peers; a link needs 2 to {MAX_WIRE_PEERS}",
                    spec.peers.len()
                )));
            }
            for (id, p) in spec.peers.iter().enumerate() {
                match cell_index.get(p.as_str()) {
                    // A cell listed twice keeps its first peer ID (validation refuses that).
                    Some(&ci) if memberships[ci].last().map(|&(l, _)| l) != Some(li) => {
                        memberships[ci].push((li, id as u16));
                    }
                    Some(_) => {}
                    None => return Err(bad(format!("peer `{p}` is not a configured cell"))),
                }
            }
            let (memory, model) = make_link(spec)?;
            let view = memory.state_table_map();
            links.push(ServedLink {
                spec: spec.clone(),
                memory,
                view,
                model,
                active: 0,
            });
        }
        let cells = system
            .cells
            .iter()
            .zip(memberships)
            .map(|(spec, memberships)| ServedCell {
                memberships,
                spec: spec.clone(),
                client: None,
                pid: None,
                phase: CellPhase::Waiting,
                spawned: false,
                spawned_pid: None,
                exit: None,
            })
            .collect();
        // Cells of their own uid must be able to connect; SO_PEERCRED on attach still admits
        // only the hypervisor's uid and the configured ones.
        let mode = if system.cells.iter().any(|c| c.uid.is_some()) {
            0o666
        } else {
            0o600
        };
        let listener = listen_at(path, mode)?;
        let socket_inode = std::fs::symlink_metadata(path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        Ok(Self {
            socket_inode,
            listener,
            path: path.to_path_buf(),
            uid: nix::unistd::getuid().as_raw(),
            links,
            cells,
            clients: Vec::new(),
            next_client: 1,
            events: Vec::new(),
            cell_requests: Vec::new(),
            cell_requests_in_progress: Vec::new(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that the supervisor spawned `cell` as process `pid`.
    pub fn cell_spawned(&mut self, cell: &str, pid: u32) {
        if let Some(c) = self.cells.iter_mut().find(|c| c.spec.name == cell) {
            c.spawned = true;
            c.spawned_pid = Some(pid);
            c.pid = Some(pid);
            c.exit = None;
            if c.phase == CellPhase::Exited {
                c.phase = CellPhase::Waiting;
            }
        }
    }

    /// Records that `cell`'s spawned process ended (it has been reaped). It is not restarted. If its socket is still
    /// open (a child inherited it), it stays attached until that closes.
    pub fn cell_exited(&mut self, cell: &str, exit: CellExit) {
        if let Some(c) = self.cells.iter_mut().find(|c| c.spec.name == cell) {
            c.exit = Some(exit);
            c.spawned_pid = None;
            match c.client {
                // Its process is gone, so is its end of the socket: detach it now (states 0,
                // peers told) rather than on a later poll, so that what is reported next (a
                // `cell stop` reply, the status) says it exited.
                Some(id) => self.drop_client(id, "control socket closed".into()),
                None => c.phase = CellPhase::Exited,
            }
        }
    }

    /// Records the phase of KVM cell `cell` (the supervisor runs it; the server only reports
    /// it in the status).
    pub fn set_kvm_phase(&mut self, cell: &str, phase: CellPhase, exit: Option<CellExit>) {
        if let Some(c) = self.cells.iter_mut().find(|c| c.spec.name == cell) {
            c.phase = phase;
            c.exit = exit;
            c.pid = (phase == CellPhase::Running).then_some(std::process::id());
        }
    }

    /// Takes the events since the last call.
    pub fn take_events(&mut self) -> Vec<ControlEvent> {
        std::mem::take(&mut self.events)
    }

    /// A snapshot of cells, links and states.
    pub fn status(&self) -> SystemStatus {
        SystemStatus {
            hypervisor_pid: std::process::id(),
            cells: self
                .cells
                .iter()
                .map(|c| CellStatus {
                    name: c.spec.name.clone(),
                    phase: c.phase,
                    pid: c.pid,
                    spawned: c.spawned,
                    exit: c.exit,
                })
                .collect(),
            links: self
                .links
                .iter()
                .map(|l| LinkStatus {
                    name: l.spec.name.clone(),
                    protocol: l.spec.protocol,
                    peers: l
                        .spec
                        .peers
                        .iter()
                        .enumerate()
                        .map(|(id, cell)| PeerStatus {
                            cell: cell.clone(),
                            active: l
                                .model
                                .is_active(id as u16)
                                .unwrap_or(l.active & (1 << id) != 0),
                            state: l.view.read(id as u16),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Waits up to `timeout` (forever if `None`) for activity on the control socket or on
    /// `extra`, handles all socket activity, and returns which `extra` fds are readable.
    pub fn poll(
        &mut self,
        extra: &[BorrowedFd<'_>],
        timeout: Option<Duration>,
    ) -> Result<Vec<bool>, ControlError> {
        let mut fds = Vec::with_capacity(1 + self.clients.len() + extra.len());
        fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
        for c in &self.clients {
            let events = if c.outbox.is_empty() {
                PollFlags::POLLIN
            } else {
                PollFlags::POLLIN | PollFlags::POLLOUT
            };
            fds.push(PollFd::new(c.fd.as_fd(), events));
        }
        for e in extra {
            fds.push(PollFd::new(*e, PollFlags::POLLIN));
        }
        let timeout = timeout.map_or(PollTimeout::NONE, |t| {
            PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX)
        });
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => return Ok(vec![false; extra.len()]),
            Err(errno) => return Err(ControlError::Poll(errno.into())),
        }
        let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
        let ready_clients: Vec<u64> = self
            .clients
            .iter()
            .zip(&fds[1..])
            .filter(|(_, p)| ready(p))
            .map(|(c, _)| c.id)
            .collect();
        let extra_ready = fds[1 + self.clients.len()..].iter().map(ready).collect();
        let accept_ready = ready(&fds[0]);
        drop(fds);
        for id in ready_clients {
            self.flush_outbox(id);
            self.service_client(id);
        }
        if accept_ready {
            self.accept_all();
        }
        Ok(extra_ready)
    }

    fn accept_all(&mut self) {
        loop {
            // Non-blocking: a reply that would block means the cell does not read its socket;
            // it is queued, and dropped rather than stalling every other cell (see `deliver`).
            let fd = match accept4(
                &self.listener,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(fd) => fd,
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    return;
                }
            };
            let (pid, uid) = match getsockopt(&fd, sockopt::PeerCredentials) {
                Ok(cred) => (cred.pid() as u32, cred.uid()),
                Err(e) => {
                    tracing::warn!("control socket: SO_PEERCRED failed: {e}");
                    continue;
                }
            };
            let mut waiting = self.clients.iter().filter(|c| c.cell.is_none()).count();
            if waiting >= MAX_UNATTACHED_CLIENTS {
                // Clients that hung up but were not serviced yet do not count.
                self.drop_hung_up_unattached();
                waiting = self.clients.iter().filter(|c| c.cell.is_none()).count();
            }
            if waiting >= MAX_UNATTACHED_CLIENTS {
                tracing::warn!(
                    "control socket: {waiting} connections are not attached; refusing another \
                     from pid {pid} (uid {uid})"
                );
                continue;
            }
            let id = self.next_client;
            self.next_client += 1;
            self.clients.push(Client {
                id,
                fd,
                pid,
                uid,
                cell: None,
                outbox: std::collections::VecDeque::new(),
            });
        }
    }

    /// Drops the unattached clients whose peer has closed its end.
    fn drop_hung_up_unattached(&mut self) {
        let mut fds: Vec<PollFd<'_>> = self
            .clients
            .iter()
            .filter(|c| c.cell.is_none())
            .map(|c| PollFd::new(c.fd.as_fd(), PollFlags::empty()))
            .collect();
        if !matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(1..)) {
            return;
        }
        // A Unix stream or seqpacket socket whose peer closed its end reports POLLHUP (poll
        // always reports it, whatever the requested events).
        let hung_up = PollFlags::POLLHUP | PollFlags::POLLERR;
        let gone: Vec<u64> = self
            .clients
            .iter()
            .filter(|c| c.cell.is_none())
            .zip(&fds)
            .filter(|(_, p)| p.revents().is_some_and(|r| r.intersects(hung_up)))
            .map(|(c, _)| c.id)
            .collect();
        drop(fds);
        for id in gone {
            self.drop_client(id, "control socket closed".into());
        }
    }

    fn client_index(&self, id: u64) -> Option<usize> {
        self.clients.iter().position(|c| c.id == id)
    }

    fn service_client(&mut self, id: u64) {
        let Some(index) = self.client_index(id) else {
            return;
        };
        let mut buf = [0u8; MAX_MESSAGE_SIZE + 1];
        let n = match nix::sys::socket::recv(
            self.clients[index].fd.as_raw_fd(),
            &mut buf,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => return self.drop_client(id, "control socket closed".into()),
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => return,
            Err(e) => return self.drop_client(id, format!("control socket error: {e}")),
        };
        let request = match hosted::decode_request(&buf[..n]) {
            Ok(r) => r,
            Err(e) => {
                let detail = format!("malformed request: {e}");
                self.refuse(index, RefusalReason::BadRequest, &detail);
                return self.drop_client(id, detail);
            }
        };
        match request {
            Request::Status => {
                let replies = crate::status::to_wire(&self.status());
                for r in replies {
                    if let Err(e) = self.deliver(index, r, Vec::new()) {
                        return self.reply_failed(id, "status reply", e);
                    }
                }
            }
            Request::Attach(body) => self.attach(id, body.cell.as_str().unwrap_or("?").to_string()),
            Request::SetState(body) => self.set_state(id, body),
            Request::IllegalAccess(body) => self.illegal_access_reported(id, body),
            Request::CellControl(body) => {
                let name = body.cell.as_str().unwrap_or("?").to_string();
                match CellAction::from_code(body.action) {
                    Some(action) if self.cells.iter().any(|c| c.spec.name == name) => {
                        // One request per cell at a time: one that arrives while another for
                        // the same cell waits or is carried out (a stop waits for the
                        // process to exit, and the socket is served meanwhile) is refused at
                        // once, so that neither client is told of an outcome the other
                        // request then undoes (a stopped cell coming back).
                        let busy = self
                            .cell_requests
                            .iter()
                            .chain(&self.cell_requests_in_progress)
                            .find(|r| r.cell == name)
                            .map(|r| r.action);
                        match busy {
                            Some(running) => {
                                let detail = format!(
                                    "cell `{name}` is busy: a `cell {}` from another client is \
                                     in progress; nothing was done (ask again once it has \
                                     finished)",
                                    running.verb()
                                );
                                self.refuse(index, RefusalReason::BadRequest, &detail);
                            }
                            None => self.cell_requests.push(CellRequest {
                                client: id,
                                cell: name,
                                action,
                            }),
                        }
                    }
                    _ => {
                        let known: Vec<&str> =
                            self.cells.iter().map(|c| c.spec.name.as_str()).collect();
                        let detail = format!(
                            "no cell named `{name}` in this system (cells: {})",
                            known.join(", ")
                        );
                        self.refuse(index, RefusalReason::UnknownCell, &detail);
                    }
                }
            }
        }
    }

    /// Takes the cell stop/start/restart requests received since the last call; answer each
    /// with [`answer_cell_request`](Self::answer_cell_request).
    /// Until a request is answered, another request for the same cell is refused as busy.
    pub fn take_cell_requests(&mut self) -> Vec<CellRequest> {
        let taken = std::mem::take(&mut self.cell_requests);
        self.cell_requests_in_progress.extend(taken.iter().cloned());
        taken
    }

    /// Answers a cell request: the cell's status after it, or the refusal.
    pub fn answer_cell_request(&mut self, request: &CellRequest, result: Result<(), String>) {
        self.cell_requests_in_progress.retain(|r| r != request);
        let Some(index) = self.client_index(request.client) else {
            return;
        };
        match result {
            Ok(()) => {
                let reply = crate::status::to_wire(&self.status()).into_iter().find(
                    |r| matches!(r, Reply::Cell(b) if b.name.as_str() == Ok(request.cell.as_str())),
                );
                if let Some(reply) = reply {
                    if let Err(e) = self.deliver(index, reply, Vec::new()) {
                        self.reply_failed(request.client, "cell request reply", e);
                    }
                }
            }
            Err(detail) => self.refuse(index, RefusalReason::BadRequest, &detail),
        }
    }

    /// Disconnects a cell started by hand (its states become 0); `false` if it is not
    /// attached.
    pub fn disconnect_cell(&mut self, cell: &str) -> bool {
        let client = self
            .cells
            .iter()
            .find(|c| c.spec.name == cell)
            .and_then(|c| c.client);
        match client {
            Some(id) => {
                self.drop_client(id, "stopped on request".into());
                true
            }
            None => false,
        }
    }

    fn refuse(&mut self, index: usize, reason: RefusalReason, detail: &str) {
        let _ = self.deliver(
            index,
            Reply::Refused(RefusedBody::new(reason, detail)),
            Vec::new(),
        );
    }

    /// Sends `reply` (and `fds`) to client `index`, or queues it behind the replies already
    /// waiting or when the socket is full. Fails on a socket error, or with `WouldBlock` when
    /// the client has [`MAX_QUEUED_REPLIES`] replies waiting already.
    fn deliver(&mut self, index: usize, reply: Reply, fds: Vec<RawFd>) -> io::Result<()> {
        let client = &mut self.clients[index];
        if client.outbox.is_empty() {
            match send_reply(client.fd.as_fd(), &reply, &fds) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
        }
        if client.outbox.len() >= MAX_QUEUED_REPLIES {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        client.outbox.push_back((reply, fds));
        Ok(())
    }

    /// Sends what waits in client `id`'s outbox until the socket is full again.
    fn flush_outbox(&mut self, id: u64) {
        let Some(index) = self.client_index(id) else {
            return;
        };
        let client = &mut self.clients[index];
        while let Some((reply, fds)) = client.outbox.front() {
            match send_reply(client.fd.as_fd(), reply, fds) {
                Ok(()) => {
                    client.outbox.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return self.reply_failed(id, "queued reply", e),
            }
        }
    }

    fn attach(&mut self, id: u64, name: String) {
        let Some(index) = self.client_index(id) else {
            return;
        };
        let client = &self.clients[index];
        // The cell to attach, or why not.
        let target = if client.cell.is_some() {
            Err((
                RefusalReason::BadRequest,
                "this connection is already attached".to_string(),
            ))
        } else if client.uid != self.uid
            && !self.cells.iter().any(|c| c.spec.uid == Some(client.uid))
        {
            Err((
                RefusalReason::PermissionDenied,
                format!(
                    "process {} runs as uid {}, the hypervisor as uid {}",
                    client.pid, client.uid, self.uid
                ),
            ))
        } else {
            match self.cells.iter().position(|c| c.spec.name == name) {
                None => {
                    let known: Vec<&str> =
                        self.cells.iter().map(|c| c.spec.name.as_str()).collect();
                    Err((
                        RefusalReason::UnknownCell,
                        format!(
                            "no cell named `{name}` in this system (cells: {})",
                            known.join(", ")
                        ),
                    ))
                }
                Some(ci) if !self.cells[ci].spec.process => Err((
                    RefusalReason::NotAttachable,
                    format!("cell `{name}` is not a process cell"),
                )),
                Some(ci)
                    if client.uid != self.uid && self.cells[ci].spec.uid != Some(client.uid) =>
                {
                    Err((
                        RefusalReason::PermissionDenied,
                        format!(
                            "process {} runs as uid {}; cell `{name}` runs as uid {}",
                            client.pid,
                            client.uid,
                            self.cells[ci].spec.uid.unwrap_or(self.uid)
                        ),
                    ))
                }
                Some(ci) if self.cells[ci].client.is_some() => Err((
                    RefusalReason::AlreadyAttached,
                    format!(
                        "cell `{name}` is already attached (pid {})",
                        self.cells[ci].pid.map_or("?".into(), |p| p.to_string())
                    ),
                )),
                Some(ci) => Ok(ci),
            }
        };
        let ci = match target {
            Ok(ci) => ci,
            Err((reason, detail)) => {
                // Reported once, as a ControlEvent (the run log line); this is for RUST_LOG.
                tracing::debug!("attach refused: {detail}");
                self.refuse(index, reason, &detail);
                self.events
                    .push(ControlEvent::Refused { cell: name, detail });
                return;
            }
        };
        let pid = self.clients[index].pid;
        // Activate the cell on each of its links.
        for &(li, peer) in &self.cells[ci].memberships {
            let link = &mut self.links[li];
            for line in &link.memory.interrupts[peer as usize] {
                let _ = line.drain();
            }
            let notify = link.model.peer_attached(peer);
            link.active |= 1 << peer;
            signal_all(link, &notify);
        }
        let cell = &mut self.cells[ci];
        cell.client = Some(id);
        cell.pid = Some(pid);
        cell.phase = CellPhase::Attached;
        self.clients[index].cell = Some(ci);
        let sent = self.grants(ci).and_then(|grants| {
            grants
                .into_iter()
                .try_for_each(|(reply, fds)| self.deliver(index, reply, fds))
        });
        if let Err(e) = sent {
            return self.reply_failed(id, "link grants", e);
        }
        tracing::info!("cell `{name}` attached (pid {pid})");
        self.events.push(ControlEvent::Attached { cell: name, pid });
    }

    /// The replies that attach cell `ci`: accepted, then per link its grant (with the section
    /// fds) and each peer's name and interrupt eventfds.
    fn grants(&self, ci: usize) -> io::Result<Vec<(Reply, Vec<RawFd>)>> {
        let cell = &self.cells[ci];
        let accepted = AcceptedBody {
            link_count: cell.memberships.len() as u32,
            hypervisor_pid: std::process::id(),
        };
        let mut replies = vec![(Reply::Accepted(accepted), Vec::new())];
        for (k, &(li, peer)) in cell.memberships.iter().enumerate() {
            let link = &self.links[li];
            let spec = &link.spec;
            let max_peers = spec.peers.len() as u16;
            let layout = GrantFds::new(max_peers, spec.rw_size, spec.output_size);
            let mut fds: Vec<RawFd> = vec![link.memory.state_table.read_only_fd().as_raw_fd()];
            if let Some(rw) = &link.memory.rw {
                fds.push(rw.read_write_fd().as_raw_fd());
            }
            for (p, out) in link.memory.outputs.iter().enumerate() {
                let fd = if p == peer as usize {
                    out.read_write_fd()
                } else {
                    out.read_only_fd()
                };
                fds.push(fd.as_raw_fd());
            }
            debug_assert_eq!(fds.len(), layout.count());
            let grant = LinkGrantBody {
                name: WireName::new(&spec.name)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
                link: k as u32,
                peer_id: peer,
                max_peers,
                protocol: spec.protocol,
                vectors: spec.interrupts.vectors(),
                state_table_size: spec.state_table_size as u32,
                rw_size: spec.rw_size,
                output_size: spec.output_size,
                fd_count: fds.len() as u32,
                reserved2: 0,
            };
            replies.push((Reply::LinkGrant(grant), fds));
            // Each peer's name and interrupt eventfds (one per vector): the cell's own are
            // where its interrupts arrive, the others are what its DOORBELL writes signal.
            for (p, lines) in link.memory.interrupts.iter().enumerate() {
                let fds: Vec<RawFd> = lines.iter().map(|line| line.fd().as_raw_fd()).collect();
                let body = PeerBody {
                    cell: WireName::new(&spec.peers[p])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
                    link: k as u32,
                    peer: p as u16,
                    fd_count: fds.len() as u16,
                };
                replies.push((Reply::Peer(body), fds));
            }
        }
        Ok(replies)
    }

    fn set_state(&mut self, id: u64, body: SetStateBody) {
        let Some(index) = self.client_index(id) else {
            return;
        };
        let Some(ci) = self.clients[index].cell else {
            self.refuse(
                index,
                RefusalReason::BadRequest,
                "STATE write before attach",
            );
            return self.drop_client(id, "STATE write before attach".into());
        };
        let Some(&(li, peer)) = self.cells[ci].memberships.get(body.link as usize) else {
            let detail = format!(
                "cell `{}` has {} link(s); link index {} does not exist",
                self.cells[ci].spec.name,
                self.cells[ci].memberships.len(),
                body.link
            );
            self.refuse(index, RefusalReason::UnknownLink, &detail);
            return;
        };
        let link = &mut self.links[li];
        match link.model.write_state(peer, body.value) {
            Ok(notify) => {
                signal_all(link, &notify);
                let ack = Reply::StateAck(body);
                if let Err(e) = self.deliver(index, ack, Vec::new()) {
                    return self.reply_failed(id, "STATE ack", e);
                }
                self.events.push(ControlEvent::State {
                    cell: self.cells[ci].spec.name.clone(),
                    link: self.links[li].spec.name.clone(),
                    value: body.value,
                });
            }
            Err(access) => self.illegal_access(id, ci, &access),
        }
    }

    /// The cell reports a register access its code made that its endpoint found illegal
    /// (process cells emulate the register page in the cell). If the device model agrees,
    /// the cell is stopped like for any illegal access; otherwise the report is refused.
    fn illegal_access_reported(&mut self, id: u64, body: AccessBody) {
        let Some(index) = self.client_index(id) else {
            return;
        };
        let Some(ci) = self.clients[index].cell else {
            self.refuse(
                index,
                RefusalReason::BadRequest,
                "access report before attach",
            );
            return self.drop_client(id, "access report before attach".into());
        };
        let Some(&(li, peer)) = self.cells[ci].memberships.get(body.link as usize) else {
            let detail = format!("link index {} does not exist", body.link);
            self.refuse(index, RefusalReason::UnknownLink, &detail);
            return;
        };
        let kind = if body.write == 1 {
            crate::device::AccessKind::Write
        } else {
            crate::device::AccessKind::Read
        };
        let value = (body.write == 1).then_some(u64::from(body.value));
        let verdict = self.links[li].model.register_access_error(
            peer,
            u64::from(body.offset),
            kind,
            body.size,
            value,
        );
        match verdict {
            Some(access) => self.illegal_access(id, ci, &access),
            None => self.refuse(
                index,
                RefusalReason::BadRequest,
                &format!(
                    "the reported {kind} at offset {:#x}, size {} is a legal access",
                    body.offset, body.size
                ),
            ),
        }
    }

    /// Stops cell `ci` for an access the device refused (ivshmem-v2.md, "Illegal access"):
    /// logs a `FATAL:` report naming the cell, the address (for a process cell: the offset in
    /// its register page, it has no guest address), the access and its size, refuses the
    /// request, kills a cell process the supervisor spawned (SIGKILL; the supervisor reaps it
    /// and reports it, never restarting it) and detaches the cell: its states become 0 and its
    /// peers are notified. A cell started by hand cannot be killed safely by pid (the pid
    /// may belong to another process by then), so it is only disconnected.
    fn illegal_access(&mut self, id: u64, ci: usize, access: &AccessError) {
        let Some(index) = self.client_index(id) else {
            return;
        };
        let cell = &self.cells[ci];
        let report = access.fatal_report(&cell.spec.name, access.offset);
        let action = match cell.spawned_pid {
            Some(pid) => {
                // The pid of the supervisor's own child, not reaped yet (`cell_exited` clears
                // `spawned_pid` once it is), so it cannot have been recycled.
                // Its whole process group: a cell the supervisor spawned runs in one of its
                // own (see `crate::cells::spawn_cell`), so that what it started goes with
                // it. A process without a group of its own is killed alone.
                let pid = Pid::from_raw(pid as i32);
                let killed = match killpg(pid, Signal::SIGKILL) {
                    Err(Errno::ESRCH) => kill(pid, Signal::SIGKILL),
                    other => other,
                };
                match killed {
                    Ok(()) => format!("cell process {pid} killed"),
                    Err(errno) => format!(
                        "killing cell process {pid} failed: {}",
                        io::Error::from(errno)
                    ),
                }
            }
            None => "cell started by hand: disconnected".to_string(),
        };
        let detail = format!("{report}; {action}");
        // Reported once, as the cell's Detached event (the run log line); this is for
        // RUST_LOG.
        tracing::debug!("{detail}");
        self.refuse(index, RefusalReason::BadRequest, &detail);
        self.drop_client(id, detail);
    }

    /// A reply could not be sent: the client is dropped (an attached cell is detached). A
    /// full socket (`EAGAIN`) means the client does not read its replies; the server never
    /// waits for it, so one such cell cannot stall the others.
    fn reply_failed(&mut self, id: u64, what: &str, error: io::Error) {
        let Some(index) = self.client_index(id) else {
            return;
        };
        let client = &self.clients[index];
        let who = match client.cell {
            Some(ci) => format!("cell `{}` (pid {})", self.cells[ci].spec.name, client.pid),
            None => format!("unattached client pid {}", client.pid),
        };
        let reason = if error.kind() == io::ErrorKind::WouldBlock {
            format!("{what} would block: {who} does not read its control socket")
        } else {
            format!("{what} to {who} failed: {error}")
        };
        tracing::warn!("{reason}; dropping it");
        self.drop_client(id, reason);
    }

    /// Closes a client; if it was an attached cell, detaches it from every link.
    fn drop_client(&mut self, id: u64, reason: String) {
        let Some(index) = self.client_index(id) else {
            return;
        };
        let client = self.clients.remove(index);
        let Some(ci) = client.cell else { return };
        for &(li, peer) in &self.cells[ci].memberships {
            let link = &mut self.links[li];
            let notify = link.model.peer_detached(peer);
            link.active &= !(1 << peer);
            signal_all(link, &notify);
        }
        let cell = &mut self.cells[ci];
        cell.client = None;
        cell.phase = if cell.exit.is_some() {
            CellPhase::Exited
        } else {
            CellPhase::Detached
        };
        tracing::info!("cell `{}` detached: {reason}", cell.spec.name);
        self.events.push(ControlEvent::Detached {
            cell: cell.spec.name.clone(),
            reason,
        });
    }

    /// Names of cells currently attached.
    pub fn attached_cells(&self) -> BTreeSet<String> {
        self.cells
            .iter()
            .filter(|c| c.client.is_some())
            .map(|c| c.spec.name.clone())
            .collect()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // Remove the socket file only if it is still the one we bound (same inode).
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            use std::os::unix::fs::MetadataExt;
            if Some((meta.dev(), meta.ino())) == self.socket_inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn signal_all(link: &ServedLink, notify: &[u16]) {
    link.model.raise(&link.memory, &link.spec.name, notify);
}

/// Sends one reply datagram, with `fds` as `SCM_RIGHTS` beside it, without waiting: the
/// client sockets are non-blocking, so a full socket is `WouldBlock`.
fn send_reply(fd: BorrowedFd<'_>, reply: &Reply, fds: &[RawFd]) -> io::Result<()> {
    let mut buf = [0u8; MAX_MESSAGE_SIZE];
    let n = reply
        .encode(&mut buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if fds.is_empty() {
        send(fd.as_raw_fd(), &buf[..n], MsgFlags::MSG_NOSIGNAL)?;
    } else {
        let iov = [IoSlice::new(&buf[..n])];
        let cmsg = [ControlMessage::ScmRights(fds)];
        sendmsg::<()>(fd.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)?;
    }
    Ok(())
}

/// Connects to the control socket at `path` (a status query, or the check whether a
/// hypervisor still listens there): the clients' own [`ivshmem_dev::hosted::connect`].
pub use ivshmem_dev::hosted::connect as connect_control_socket;

/// Creates the listening socket at `path` (mode `mode`: 0600, or 0666 when cells run under uids of their own). A stale socket file is replaced only
/// if nobody listens on it.
fn listen_at(path: &Path, mode: u32) -> Result<OwnedFd, ControlError> {
    let sock_err = |source: io::Error| ControlError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    let addr = UnixAddr::new(path).map_err(|e| sock_err(e.into()))?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ControlError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match connect_control_socket(path) {
            Ok(_) => return Err(ControlError::AlreadyRunning(path.to_path_buf())),
            Err(Errno::EACCES | Errno::EPERM) => {
                return Err(ControlError::NotPermitted(path.to_path_buf()))
            }
            Err(Errno::ECONNREFUSED | Errno::ENOENT) => {
                tracing::info!("removing stale control socket {}", path.display());
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(sock_err(e)),
                }
            }
            Err(e) => return Err(sock_err(e.into())),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| sock_err(e.into()))?;
    bind(fd.as_raw_fd(), &addr).map_err(|e| sock_err(e.into()))?;
    // The uid check on attach covers the short window before the mode is narrowed.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(sock_err)?;
    listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN)).map_err(|e| sock_err(e.into()))?;
    Ok(fd)
}

impl LinkModel for crate::device::Link {
    fn peer_attached(&mut self, peer: u16) -> Notify {
        crate::device::Link::peer_attached(self, peer)
            .targets()
            .collect()
    }

    fn peer_detached(&mut self, peer: u16) -> Notify {
        crate::device::Link::peer_detached(self, peer)
            .targets()
            .collect()
    }

    fn register_access_error(
        &self,
        peer: u16,
        offset: u64,
        kind: crate::device::AccessKind,
        size: u8,
        value: Option<u64>,
    ) -> Option<AccessError> {
        crate::device::Link::register_access_error(self, peer, offset, kind, size, value)
    }

    fn write_state(&mut self, peer: u16, value: u32) -> Result<Notify, AccessError> {
        self.mmio_write(
            peer,
            u64::from(ivshmem_dev::regs::STATE),
            4,
            u64::from(value),
        )
        .map(|effects| effects.targets().collect())
    }
}

/// Builds the emulated device ([`crate::device::Link`]) of a hosted link over its mapped
/// state table. Every peer's `INT_CONTROL` is applied by its cell-side endpoint
/// ([`crate::device::InterruptGate::Endpoint`]), so the model reports every interrupt for an
/// attached peer.
pub fn device_model(
    spec: &LinkSpec,
    table: MappedStateTable,
) -> Result<Box<dyn LinkModel>, String> {
    use crate::device::{InterruptGate, Link, LinkParams};
    use ivshmem_dev::{LayoutParams, SharedMemoryLayout};
    let max_peers = spec.peers.len() as u16;
    let state_table_size = u32::try_from(spec.state_table_size)
        .map_err(|_| "state table larger than 4 GiB".to_string())?;
    let layout = SharedMemoryLayout::new(LayoutParams {
        max_peers,
        state_table_size,
        rw_size: spec.rw_size,
        output_size: spec.output_size,
        page_size: crate::config::PAGE_SIZE,
    })
    .map_err(|e| e.to_string())?;
    let params = LinkParams {
        name: spec.name.clone(),
        max_peers,
        protocol: spec.protocol.into(),
        layout,
        interrupts: spec.interrupts,
    };
    let mut link = Link::new(params, Box::new(table)).map_err(|e| e.to_string())?;
    for peer in 0..max_peers {
        link.set_interrupt_gate(peer, InterruptGate::Endpoint);
    }
    Ok(Box::new(link))
}
