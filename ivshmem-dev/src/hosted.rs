//! The wire protocol of the hosted hypervisor's control socket.
//!
//! A process cell talks to the hosted hypervisor over a Unix `SOCK_SEQPACKET` socket: every
//! message is one datagram made of a 16-byte [`Header`] (magic [`MAGIC`], [`VERSION`], kind,
//! body length) followed by a fixed-size `#[repr(C)]` body. File descriptors travel beside
//! the messages as `SCM_RIGHTS` ancillary data; this module only says how many and in which
//! order ([`GrantFds`]).
//!
//! Conversation of a cell:
//! 1. cell → [`Request::Attach`] with its cell name;
//! 2. hypervisor → [`Reply::Refused`] (unknown name, already attached, wrong uid, …) **or**
//!    [`Reply::Accepted`] with the number of links, followed per link (in link index order)
//!    by one [`Reply::LinkGrant`] carrying that link's section fds (see [`GrantFds`]) and then
//!    one [`Reply::Peer`] per peer (in peer-ID order) with the peer's cell name and its
//!    interrupt eventfds, one per vector (see [`PeerBody`]);
//! 3. cell → [`Request::SetState`] for each STATE write; hypervisor → [`Reply::StateAck`]
//!    once the state table holds the value and the peers were notified (or `Refused`);
//! 4. cell → [`Request::IllegalAccess`] when its code made a register access the device
//!    refuses (misaligned, wrong size, outside the page): the hypervisor checks it against
//!    the device model, reports it (`FATAL:`), answers [`Reply::Refused`] and stops the cell;
//!    the cell stops itself too if it still runs;
//! 5. the cell closes the socket (exit or crash): the hypervisor detaches it (state 0).
//!
//! Interrupts: a link has `vectors` vectors per peer (1 with INTx, 1..=16 with MSI-X). Vector
//! 0 carries state changes (the hypervisor signals it); a DOORBELL write of (target, vector)
//! signals the target's eventfd for that vector directly. Per-peer messages keep every
//! datagram's fds far below the kernel's limit (`SCM_MAX_FD`, 253): 16 peers × 16 vectors
//! would not fit in one.
//!
//! A status query ([`Request::Status`]) is answered on any fresh connection without attaching:
//! [`Reply::Status`] followed by one [`Reply::Cell`] per cell and one [`Reply::Link`] per link.
//!
//! Why this lives in `ivshmem-dev` (a deviation from DESIGN.md's dependency table, which has
//! no shared crate for it): for a process cell this socket *is* the device's register path
//! (STATE writes, the grant of sections and doorbells), so it is part of the device contract.
//! The hypervisor (server side) and `linux-uio-client::hosted` (cell side) both speak it and
//! neither depends on the other; the module is no_std and knows nothing of sockets.
//!
//! Every decoder treats its input as untrusted: wrong magic, version, kind, length, names that
//! are not NUL-padded UTF-8, peer IDs out of range and unknown codes are [`DecodeError`]s,
//! never panics.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic at the start of every message: the bytes `"IVHS"` in memory order.
pub const MAGIC: u32 = u32::from_le_bytes(*b"IVHS");
/// Protocol version spoken by this crate; a different version is refused. Version 2 added
/// vectors, [`Reply::Peer`] and [`Request::IllegalAccess`].
pub const VERSION: u16 = 2;
/// Maximum length in bytes of a cell or link name on the wire.
pub const NAME_LEN: usize = 64;
/// Size of a buffer large enough for any message of this protocol.
pub const MAX_MESSAGE_SIZE: usize = 512;
/// Most peers a link may have on the wire (same bound as the layout calculator).
pub const MAX_WIRE_PEERS: usize = 16;
/// Most interrupt vectors per peer on the wire (the device's MSI-X limit).
pub const MAX_WIRE_VECTORS: usize = 16;
/// Most fds one [`Reply::LinkGrant`] carries: state table, R/W section, every output section.
pub const MAX_FDS_PER_GRANT: usize = 2 + MAX_WIRE_PEERS;
/// Most fds any one message carries (a grant, or a [`Reply::Peer`] with its vectors).
pub const MAX_FDS_PER_MESSAGE: usize = if MAX_FDS_PER_GRANT > MAX_WIRE_VECTORS {
    MAX_FDS_PER_GRANT
} else {
    MAX_WIRE_VECTORS
};
/// Size of the [`Header`] in bytes.
pub const HEADER_SIZE: usize = core::mem::size_of::<Header>();

/// Message kinds (the `kind` field of [`Header`]).
pub mod kind {
    /// Cell → hypervisor: attach by cell name ([`super::AttachBody`]).
    pub const ATTACH: u16 = 0x0001;
    /// Cell → hypervisor: write STATE on one link ([`super::SetStateBody`]).
    pub const SET_STATE: u16 = 0x0002;
    /// Anyone (same uid) → hypervisor: status query (empty body).
    pub const STATUS: u16 = 0x0003;
    /// Cell → hypervisor: the cell made an illegal register access ([`super::AccessBody`]).
    pub const ILLEGAL_ACCESS: u16 = 0x0005;
    /// Anyone (same uid) → hypervisor: stop, start or restart a cell
    /// ([`super::CellControlBody`]); answered with [`CELL_STATUS`] or [`REFUSED`].
    pub const CELL_CONTROL: u16 = 0x0004;
    /// Hypervisor → cell: attach accepted ([`super::AcceptedBody`]).
    pub const ACCEPTED: u16 = 0x0081;
    /// Hypervisor → cell: one link's parameters, fds beside it ([`super::LinkGrantBody`]).
    pub const LINK_GRANT: u16 = 0x0082;
    /// Hypervisor → cell: a STATE write took effect ([`super::SetStateBody`]).
    pub const STATE_ACK: u16 = 0x0083;
    /// Hypervisor → anyone: request refused ([`super::RefusedBody`]).
    pub const REFUSED: u16 = 0x0084;
    /// Hypervisor → status client: counts that follow ([`super::StatusBody`]).
    pub const STATUS_REPLY: u16 = 0x0085;
    /// Hypervisor → status client: one cell ([`super::CellStatusBody`]).
    pub const CELL_STATUS: u16 = 0x0086;
    /// Hypervisor → status client: one link ([`super::LinkStatusBody`]).
    pub const LINK_STATUS: u16 = 0x0087;
    /// Hypervisor → cell: one peer of a granted link, its eventfds beside it
    /// ([`super::PeerBody`]).
    pub const PEER: u16 = 0x0088;
}

/// Every message starts with this header.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Header {
    /// Always [`MAGIC`].
    pub magic: u32,
    /// Always [`VERSION`].
    pub version: u16,
    /// One of the [`kind`] constants.
    pub kind: u16,
    /// Length of the body that follows, in bytes.
    pub length: u32,
    /// Zero.
    pub reserved: u32,
}

/// A cell or link name: UTF-8, NUL-padded to [`NAME_LEN`] bytes, no NUL inside.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct WireName {
    bytes: [u8; NAME_LEN],
}

impl WireName {
    /// Encodes `name`; fails if it is empty, longer than [`NAME_LEN`] or contains NUL.
    pub fn new(name: &str) -> Result<Self, EncodeError> {
        let raw = name.as_bytes();
        if raw.is_empty() || raw.len() > NAME_LEN || raw.contains(&0) {
            return Err(EncodeError::BadName);
        }
        let mut bytes = [0u8; NAME_LEN];
        bytes[..raw.len()].copy_from_slice(raw);
        Ok(Self { bytes })
    }

    /// The name as text, checking that it is non-empty, NUL-padded UTF-8.
    pub fn as_str(&self) -> Result<&str, DecodeError> {
        let end = self.bytes.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        if end == 0 || self.bytes[end..].iter().any(|&b| b != 0) {
            return Err(DecodeError::BadName);
        }
        core::str::from_utf8(&self.bytes[..end]).map_err(|_| DecodeError::BadName)
    }
}

impl core::fmt::Debug for WireName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.as_str() {
            Ok(s) => write!(f, "{s:?}"),
            Err(_) => f.write_str("<invalid name>"),
        }
    }
}

/// Body of [`kind::ATTACH`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct AttachBody {
    /// The configured name of the cell that attaches.
    pub cell: WireName,
}

/// What [`kind::CELL_CONTROL`] asks for.
pub mod cell_action {
    /// Stop the cell (its states become 0).
    pub const STOP: u32 = 1;
    /// Start a stopped cell.
    pub const START: u32 = 2;
    /// Stop and start the cell.
    pub const RESTART: u32 = 3;
}

/// Body of [`kind::CELL_CONTROL`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct CellControlBody {
    /// The cell.
    pub cell: WireName,
    /// One of the [`cell_action`] constants.
    pub action: u32,
    /// Zero.
    pub reserved: u32,
}

/// Body of [`kind::SET_STATE`] and [`kind::STATE_ACK`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SetStateBody {
    /// Index of the link in the attach reply (grant order).
    pub link: u32,
    /// The new STATE value.
    pub value: u32,
}

/// Body of [`kind::ACCEPTED`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct AcceptedBody {
    /// Number of [`kind::LINK_GRANT`] messages that follow.
    pub link_count: u32,
    /// Process ID of the hypervisor (for diagnostics).
    pub hypervisor_pid: u32,
}

/// Body of [`kind::LINK_GRANT`]: one link the cell is a peer of. Its fds travel beside it in
/// the order given by [`GrantFds`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct LinkGrantBody {
    /// Link name from the configuration.
    pub name: WireName,
    /// Index of this link (used in [`kind::SET_STATE`]).
    pub link: u32,
    /// This cell's peer ID on the link.
    pub peer_id: u16,
    /// Number of peers on the link.
    pub max_peers: u16,
    /// The link's protocol (PCI prog-IF/sub-class).
    pub protocol: u16,
    /// Interrupt vectors per peer, `1..=`[`MAX_WIRE_VECTORS`] (1 with INTx).
    pub vectors: u16,
    /// Size of the state table in bytes.
    pub state_table_size: u32,
    /// Size of the R/W section in bytes (0: none, no fd).
    pub rw_size: u64,
    /// Size of each output section in bytes (0: none, no fds).
    pub output_size: u64,
    /// Number of fds that travel with this message (checked against [`GrantFds`]).
    pub fd_count: u32,
    /// Zero.
    pub reserved2: u32,
}

/// Body of [`kind::PEER`]: one peer of the link granted just before, in peer-ID order. Its
/// interrupt eventfds travel beside it, one per vector in vector order (`fd_count` = the
/// grant's `vectors`): the cell's own are where its interrupts arrive, the others are what
/// its DOORBELL writes signal.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct PeerBody {
    /// The peer's cell name from the configuration.
    pub cell: WireName,
    /// Index of the link (as in [`LinkGrantBody::link`]).
    pub link: u32,
    /// The peer's ID on the link.
    pub peer: u16,
    /// Number of eventfds beside this message, `1..=`[`MAX_WIRE_VECTORS`].
    pub fd_count: u16,
}

/// Body of [`kind::ILLEGAL_ACCESS`]: a register access the cell's code made that the device
/// does not allow (for a process cell its register page is emulated in the cell).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct AccessBody {
    /// Index of the link.
    pub link: u32,
    /// Offset in the register page.
    pub offset: u32,
    /// The value of a write (0 for a read).
    pub value: u32,
    /// Access size in bytes.
    pub size: u8,
    /// 1 for a write, 0 for a read.
    pub write: u8,
    /// Zero.
    pub reserved: u16,
}

/// Why the hypervisor refused a request (the `reason` of [`RefusedBody`]).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// No cell of that name is configured.
    UnknownCell = 1,
    /// A cell of that name is already attached.
    AlreadyAttached = 2,
    /// The connecting process runs under another uid than the hypervisor.
    PermissionDenied = 3,
    /// The request was malformed or not allowed in this state of the conversation.
    BadRequest = 4,
    /// The link index is not one of the cell's links.
    UnknownLink = 5,
    /// The cell configured under that name is not a process cell, or has exited for good.
    NotAttachable = 6,
}

impl RefusalReason {
    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Self::UnknownCell,
            2 => Self::AlreadyAttached,
            3 => Self::PermissionDenied,
            4 => Self::BadRequest,
            5 => Self::UnknownLink,
            6 => Self::NotAttachable,
            _ => return None,
        })
    }
}

/// Length of the human-readable detail text in [`RefusedBody`].
pub const DETAIL_LEN: usize = 192;

/// Body of [`kind::REFUSED`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct RefusedBody {
    /// A [`RefusalReason`] code.
    pub reason: u32,
    /// Number of valid bytes in `detail`.
    pub detail_len: u32,
    /// UTF-8 explanation, truncated at a character boundary.
    pub detail: [u8; DETAIL_LEN],
}

impl RefusedBody {
    /// Builds a refusal, truncating `detail` to [`DETAIL_LEN`] bytes at a char boundary.
    pub fn new(reason: RefusalReason, detail: &str) -> Self {
        let mut end = detail.len().min(DETAIL_LEN);
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        let mut buf = [0u8; DETAIL_LEN];
        buf[..end].copy_from_slice(&detail.as_bytes()[..end]);
        Self {
            reason: reason as u32,
            detail_len: end as u32,
            detail: buf,
        }
    }

    /// The reason (validated by [`decode_reply`]).
    pub fn reason(&self) -> Option<RefusalReason> {
        RefusalReason::from_code(self.reason)
    }

    /// The detail text (validated by [`decode_reply`]; empty if invalid).
    pub fn detail(&self) -> &str {
        let len = (self.detail_len as usize).min(DETAIL_LEN);
        core::str::from_utf8(&self.detail[..len]).unwrap_or("")
    }
}

/// Body of [`kind::STATUS_REPLY`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct StatusBody {
    /// Number of [`kind::CELL_STATUS`] messages that follow.
    pub cell_count: u32,
    /// Number of [`kind::LINK_STATUS`] messages that follow (after the cells).
    pub link_count: u32,
    /// Process ID of the hypervisor.
    pub hypervisor_pid: u32,
    /// Zero.
    pub reserved: u32,
}

/// Where a cell is in its life cycle (the `phase` of [`CellStatusBody`]).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellPhase {
    /// Not attached yet (and, if spawned, still running or starting).
    Waiting = 0,
    /// Attached over the control socket.
    Attached = 1,
    /// Was attached, its socket closed; its process (if spawned) may still run.
    Detached = 2,
    /// The spawned process has exited; it is not restarted.
    Exited = 3,
    /// A KVM cell whose vCPU runs.
    Running = 4,
    /// A KVM cell that stopped (on request, on an illegal access or by its `cell_state`; the
    /// exit fields say which).
    Stopped = 5,
}

impl CellPhase {
    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::Waiting,
            1 => Self::Attached,
            2 => Self::Detached,
            3 => Self::Exited,
            4 => Self::Running,
            5 => Self::Stopped,
            _ => return None,
        })
    }
}

/// How a spawned cell process ended (the `exit_kind` of [`CellStatusBody`]).
pub mod exit_kind {
    /// Still running, or not spawned by the hypervisor.
    pub const NONE: u32 = 0;
    /// Exited with a status code (`exit_value`).
    pub const CODE: u32 = 1;
    /// Killed by a signal (`exit_value` is the signal number).
    pub const SIGNAL: u32 = 2;
    /// A KVM cell stopped by its `cell_state` (`exit_value`).
    pub const CELL_STATE: u32 = 3;
    /// A KVM cell stopped for an illegal access.
    pub const FATAL: u32 = 4;
    /// A KVM cell stopped on request.
    pub const STOPPED: u32 = 5;
}

/// Body of [`kind::CELL_STATUS`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct CellStatusBody {
    /// Cell name.
    pub name: WireName,
    /// A [`CellPhase`] code.
    pub phase: u32,
    /// Process ID (of the attached process, or of the spawned one), 0 if none.
    pub pid: u32,
    /// One of the [`exit_kind`] constants.
    pub exit_kind: u32,
    /// Exit code or signal number.
    pub exit_value: i32,
    /// 1 if the hypervisor spawned this cell's process, else 0.
    pub spawned: u32,
    /// Zero.
    pub reserved: u32,
}

impl CellStatusBody {
    /// The phase (validated by [`decode_reply`]).
    pub fn phase(&self) -> CellPhase {
        CellPhase::from_code(self.phase).unwrap_or(CellPhase::Waiting)
    }
}

/// Body of [`kind::LINK_STATUS`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct LinkStatusBody {
    /// Link name.
    pub name: WireName,
    /// Number of peers.
    pub max_peers: u16,
    /// Protocol.
    pub protocol: u16,
    /// Bit `i` set: peer `i` is attached (active).
    pub active: u32,
    /// For each peer ID, the index of its cell in the [`kind::CELL_STATUS`] list.
    pub peer_cells: [u16; MAX_WIRE_PEERS],
    /// The state table: for each peer ID, its state.
    pub states: [u32; MAX_WIRE_PEERS],
}

/// A request, as decoded by the hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Attach as the named cell.
    Attach(AttachBody),
    /// Write STATE on one link.
    SetState(SetStateBody),
    /// Ask for the status tables.
    Status,
    /// Report an illegal register access (the hypervisor stops the cell).
    IllegalAccess(AccessBody),
    /// Stop, start or restart a cell.
    CellControl(CellControlBody),
}

/// Connects a close-on-exec `SOCK_SEQPACKET` socket to the control socket at `path`: the one
/// way every client connects (a cell attaching, a status query, the hypervisor checking
/// whether one still listens there). `ECONNREFUSED` or `ENOENT` mean nobody listens;
/// `EACCES` that the socket belongs to another user.
#[cfg(feature = "std")]
pub fn connect(path: &std::path::Path) -> Result<std::os::fd::OwnedFd, nix::errno::Errno> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    nix::sys::socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// A reply, as decoded by a cell or status client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Attach accepted; link grants follow.
    Accepted(AcceptedBody),
    /// One link grant (section fds beside it).
    LinkGrant(LinkGrantBody),
    /// One peer of the last granted link (its interrupt eventfds beside it).
    Peer(PeerBody),
    /// STATE write done.
    StateAck(SetStateBody),
    /// Request refused.
    Refused(RefusedBody),
    /// Status: counts of the cell and link records that follow.
    Status(StatusBody),
    /// One cell record.
    Cell(CellStatusBody),
    /// One link record.
    Link(LinkStatusBody),
}

/// Why bytes from the socket are not a valid message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than a header.
    #[error("message of {0} bytes is shorter than the 16-byte header")]
    Truncated(usize),
    /// The magic is wrong: not our protocol.
    #[error("bad magic {0:#010x}: not an ivshmem-stack control message")]
    BadMagic(u32),
    /// The peer speaks another protocol version.
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    UnsupportedVersion(u16),
    /// The kind is unknown, or not valid in this direction.
    #[error("unexpected message kind {0:#06x}")]
    UnexpectedKind(u16),
    /// The header's length does not match the datagram, or the body size for the kind.
    #[error("body length {actual} does not match the expected {expected} bytes")]
    BadLength {
        /// Length found (datagram or header field).
        actual: usize,
        /// Length required.
        expected: usize,
    },
    /// A reserved field is not zero.
    #[error("reserved field is not zero")]
    ReservedNotZero,
    /// A name is empty, not NUL-padded, or not UTF-8.
    #[error("name is empty, not NUL-padded or not UTF-8")]
    BadName,
    /// A numeric field is out of range (peer ID, peer count, code …).
    #[error("field `{0}` is out of range")]
    OutOfRange(&'static str),
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The output buffer is too small.
    #[error("output buffer too small")]
    BufferTooSmall,
    /// A name is empty, longer than the wire allows, or contains NUL.
    #[error("name is empty, longer than {NAME_LEN} bytes or contains NUL")]
    BadName,
}

fn encode_raw<B: IntoBytes + Immutable>(
    kind: u16,
    body: &B,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let body = body.as_bytes();
    let total = HEADER_SIZE + body.len();
    if out.len() < total {
        return Err(EncodeError::BufferTooSmall);
    }
    let header = Header {
        magic: MAGIC,
        version: VERSION,
        kind,
        length: body.len() as u32,
        reserved: 0,
    };
    out[..HEADER_SIZE].copy_from_slice(header.as_bytes());
    out[HEADER_SIZE..total].copy_from_slice(body);
    Ok(total)
}

impl Request {
    /// Encodes into `out`, returning the number of bytes of the datagram.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        match self {
            Request::Attach(b) => encode_raw(kind::ATTACH, b, out),
            Request::SetState(b) => encode_raw(kind::SET_STATE, b, out),
            Request::Status => encode_raw(kind::STATUS, &[0u8; 0], out),
            Request::IllegalAccess(b) => encode_raw(kind::ILLEGAL_ACCESS, b, out),
            Request::CellControl(b) => encode_raw(kind::CELL_CONTROL, b, out),
        }
    }
}

impl Reply {
    /// Encodes into `out`, returning the number of bytes of the datagram.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        match self {
            Reply::Accepted(b) => encode_raw(kind::ACCEPTED, b, out),
            Reply::LinkGrant(b) => encode_raw(kind::LINK_GRANT, b, out),
            Reply::Peer(b) => encode_raw(kind::PEER, b, out),
            Reply::StateAck(b) => encode_raw(kind::STATE_ACK, b, out),
            Reply::Refused(b) => encode_raw(kind::REFUSED, b, out),
            Reply::Status(b) => encode_raw(kind::STATUS_REPLY, b, out),
            Reply::Cell(b) => encode_raw(kind::CELL_STATUS, b, out),
            Reply::Link(b) => encode_raw(kind::LINK_STATUS, b, out),
        }
    }
}

/// Checks the header and returns `(kind, body)`.
fn split(bytes: &[u8]) -> Result<(u16, &[u8]), DecodeError> {
    let (header, body) =
        Header::read_from_prefix(bytes).map_err(|_| DecodeError::Truncated(bytes.len()))?;
    if header.magic != MAGIC {
        return Err(DecodeError::BadMagic(header.magic));
    }
    if header.version != VERSION {
        return Err(DecodeError::UnsupportedVersion(header.version));
    }
    if header.reserved != 0 {
        return Err(DecodeError::ReservedNotZero);
    }
    if header.length as usize != body.len() {
        return Err(DecodeError::BadLength {
            actual: body.len(),
            expected: header.length as usize,
        });
    }
    Ok((header.kind, body))
}

fn body<T: FromBytes + KnownLayout + Immutable>(body: &[u8]) -> Result<T, DecodeError> {
    T::read_from_bytes(body).map_err(|_| DecodeError::BadLength {
        actual: body.len(),
        expected: core::mem::size_of::<T>(),
    })
}

/// Decodes a request (hypervisor side). The bytes are untrusted.
pub fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    let (kind, rest) = split(bytes)?;
    match kind {
        kind::ATTACH => {
            let b: AttachBody = body(rest)?;
            b.cell.as_str()?;
            Ok(Request::Attach(b))
        }
        kind::SET_STATE => Ok(Request::SetState(body(rest)?)),
        kind::STATUS => {
            if !rest.is_empty() {
                return Err(DecodeError::BadLength {
                    actual: rest.len(),
                    expected: 0,
                });
            }
            Ok(Request::Status)
        }
        kind::ILLEGAL_ACCESS => {
            let b: AccessBody = body(rest)?;
            if b.reserved != 0 {
                return Err(DecodeError::ReservedNotZero);
            }
            if b.write > 1 {
                return Err(DecodeError::OutOfRange("write"));
            }
            Ok(Request::IllegalAccess(b))
        }
        kind::CELL_CONTROL => {
            let b: CellControlBody = body(rest)?;
            b.cell.as_str()?;
            if !(cell_action::STOP..=cell_action::RESTART).contains(&b.action) {
                return Err(DecodeError::OutOfRange("action"));
            }
            if b.reserved != 0 {
                return Err(DecodeError::ReservedNotZero);
            }
            Ok(Request::CellControl(b))
        }
        other => Err(DecodeError::UnexpectedKind(other)),
    }
}

/// Decodes a reply (cell or status-client side). The bytes are untrusted: names, counts,
/// peer IDs and codes are checked.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, DecodeError> {
    let (kind, rest) = split(bytes)?;
    match kind {
        kind::ACCEPTED => {
            let b: AcceptedBody = body(rest)?;
            if b.link_count as usize > u16::MAX as usize {
                return Err(DecodeError::OutOfRange("link_count"));
            }
            Ok(Reply::Accepted(b))
        }
        kind::LINK_GRANT => {
            let b: LinkGrantBody = body(rest)?;
            b.name.as_str()?;
            if b.reserved2 != 0 {
                return Err(DecodeError::ReservedNotZero);
            }
            if b.vectors == 0 || b.vectors as usize > MAX_WIRE_VECTORS {
                return Err(DecodeError::OutOfRange("vectors"));
            }
            if b.max_peers < 2 || b.max_peers as usize > MAX_WIRE_PEERS {
                return Err(DecodeError::OutOfRange("max_peers"));
            }
            if b.peer_id >= b.max_peers {
                return Err(DecodeError::OutOfRange("peer_id"));
            }
            if (b.state_table_size as usize) < 4 * b.max_peers as usize {
                return Err(DecodeError::OutOfRange("state_table_size"));
            }
            if b.fd_count as usize != GrantFds::for_grant(&b).count() {
                return Err(DecodeError::OutOfRange("fd_count"));
            }
            Ok(Reply::LinkGrant(b))
        }
        kind::PEER => {
            let b: PeerBody = body(rest)?;
            b.cell.as_str()?;
            if b.peer as usize >= MAX_WIRE_PEERS {
                return Err(DecodeError::OutOfRange("peer"));
            }
            if b.fd_count == 0 || b.fd_count as usize > MAX_WIRE_VECTORS {
                return Err(DecodeError::OutOfRange("fd_count"));
            }
            Ok(Reply::Peer(b))
        }
        kind::STATE_ACK => Ok(Reply::StateAck(body(rest)?)),
        kind::REFUSED => {
            let b: RefusedBody = body(rest)?;
            if b.reason().is_none() {
                return Err(DecodeError::OutOfRange("reason"));
            }
            let len = b.detail_len as usize;
            if len > DETAIL_LEN || core::str::from_utf8(&b.detail[..len]).is_err() {
                return Err(DecodeError::OutOfRange("detail_len"));
            }
            Ok(Reply::Refused(b))
        }
        kind::STATUS_REPLY => {
            let b: StatusBody = body(rest)?;
            if b.cell_count > u16::MAX as u32 || b.link_count > u16::MAX as u32 {
                return Err(DecodeError::OutOfRange("count"));
            }
            Ok(Reply::Status(b))
        }
        kind::CELL_STATUS => {
            let b: CellStatusBody = body(rest)?;
            b.name.as_str()?;
            if CellPhase::from_code(b.phase).is_none() {
                return Err(DecodeError::OutOfRange("phase"));
            }
            if b.exit_kind > exit_kind::STOPPED {
                return Err(DecodeError::OutOfRange("exit_kind"));
            }
            Ok(Reply::Cell(b))
        }
        kind::LINK_STATUS => {
            let b: LinkStatusBody = body(rest)?;
            b.name.as_str()?;
            if b.max_peers < 2 || b.max_peers as usize > MAX_WIRE_PEERS {
                return Err(DecodeError::OutOfRange("max_peers"));
            }
            Ok(Reply::Link(b))
        }
        other => Err(DecodeError::UnexpectedKind(other)),
    }
}

/// The order of the fds beside a [`kind::LINK_GRANT`] message:
///
/// 1. the state table (read-only);
/// 2. the R/W section (read-write), only if `rw_size > 0`;
/// 3. the output sections of peers `0..max_peers` (own read-write, others read-only), only if
///    `output_size > 0`.
///
/// The interrupt eventfds follow in one [`Reply::Peer`] per peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantFds {
    max_peers: usize,
    has_rw: bool,
    has_outputs: bool,
}

impl GrantFds {
    /// The fd layout for a grant with these parameters.
    pub fn new(max_peers: u16, rw_size: u64, output_size: u64) -> Self {
        Self {
            max_peers: max_peers as usize,
            has_rw: rw_size > 0,
            has_outputs: output_size > 0,
        }
    }

    /// The fd layout of a grant body.
    pub fn for_grant(grant: &LinkGrantBody) -> Self {
        Self::new(grant.max_peers, grant.rw_size, grant.output_size)
    }

    /// Index of the state-table fd.
    pub fn state_table(&self) -> usize {
        0
    }

    /// Index of the R/W section fd, if there is one.
    pub fn rw(&self) -> Option<usize> {
        self.has_rw.then_some(1)
    }

    /// Index of peer `peer`'s output section fd, if there are output sections.
    pub fn output(&self, peer: u16) -> Option<usize> {
        let peer = peer as usize;
        (self.has_outputs && peer < self.max_peers).then(|| 1 + usize::from(self.has_rw) + peer)
    }

    /// Total number of fds.
    pub fn count(&self) -> usize {
        let outputs = if self.has_outputs { self.max_peers } else { 0 };
        1 + usize::from(self.has_rw) + outputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_round_trip() {
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        let req = Request::Attach(AttachBody {
            cell: WireName::new("telemetry").unwrap(),
        });
        let n = req.encode(&mut buf).unwrap();
        let back = decode_request(&buf[..n]).unwrap();
        assert_eq!(back, req);
        match back {
            Request::Attach(b) => assert_eq!(b.cell.as_str().unwrap(), "telemetry"),
            _ => unreachable!(),
        }
    }

    #[test]
    fn untrusted_bytes_are_rejected() {
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        let n = Request::Status.encode(&mut buf).unwrap();
        assert_eq!(decode_request(&buf[..n]), Ok(Request::Status));
        assert_eq!(decode_request(&buf[..3]), Err(DecodeError::Truncated(3)));
        let mut bad = buf;
        bad[0] ^= 0xFF;
        assert!(matches!(
            decode_request(&bad[..n]),
            Err(DecodeError::BadMagic(_))
        ));
        let mut bad = buf;
        bad[4] = 9;
        assert_eq!(
            decode_request(&bad[..n]),
            Err(DecodeError::UnsupportedVersion(9))
        );
        // Length field disagrees with the datagram.
        assert!(matches!(
            decode_request(&buf[..n + 1]),
            Err(DecodeError::BadLength { .. })
        ));
        // A reply kind is not a request.
        let n = Reply::StateAck(SetStateBody { link: 0, value: 1 })
            .encode(&mut buf)
            .unwrap();
        assert_eq!(
            decode_request(&buf[..n]),
            Err(DecodeError::UnexpectedKind(kind::STATE_ACK))
        );
        // A name that is not NUL-padded.
        let mut body = AttachBody {
            cell: WireName::new("a").unwrap(),
        };
        body.cell.bytes[5] = b'x';
        let n = Request::Attach(body).encode(&mut buf).unwrap();
        assert_eq!(decode_request(&buf[..n]), Err(DecodeError::BadName));
        assert_eq!(WireName::new(""), Err(EncodeError::BadName));
        assert_eq!(WireName::new("a\0b"), Err(EncodeError::BadName));
    }

    #[test]
    fn grant_fd_order_and_checks() {
        let fds = GrantFds::new(3, 4096, 4096);
        assert_eq!(fds.state_table(), 0);
        assert_eq!(fds.rw(), Some(1));
        assert_eq!(fds.output(0), Some(2));
        assert_eq!(fds.output(2), Some(4));
        assert_eq!(fds.output(3), None);
        assert_eq!(fds.count(), 5);
        let no_rw = GrantFds::new(2, 0, 0);
        assert_eq!(no_rw.rw(), None);
        assert_eq!(no_rw.output(0), None);
        assert_eq!(no_rw.count(), 1);

        let mut grant = LinkGrantBody {
            name: WireName::new("net").unwrap(),
            link: 0,
            peer_id: 1,
            max_peers: 3,
            protocol: 1,
            vectors: 16,
            state_table_size: 4096,
            rw_size: 4096,
            output_size: 4096,
            fd_count: 5,
            reserved2: 0,
        };
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        let n = Reply::LinkGrant(grant).encode(&mut buf).unwrap();
        assert_eq!(decode_reply(&buf[..n]), Ok(Reply::LinkGrant(grant)));
        grant.peer_id = 3;
        let n = Reply::LinkGrant(grant).encode(&mut buf).unwrap();
        assert_eq!(
            decode_reply(&buf[..n]),
            Err(DecodeError::OutOfRange("peer_id"))
        );
        grant.peer_id = 0;
        grant.fd_count = 40;
        let n = Reply::LinkGrant(grant).encode(&mut buf).unwrap();
        assert_eq!(
            decode_reply(&buf[..n]),
            Err(DecodeError::OutOfRange("fd_count"))
        );
        grant.fd_count = 5;
        for vectors in [0, 17] {
            grant.vectors = vectors;
            let n = Reply::LinkGrant(grant).encode(&mut buf).unwrap();
            assert_eq!(
                decode_reply(&buf[..n]),
                Err(DecodeError::OutOfRange("vectors"))
            );
        }
    }

    #[test]
    fn peer_messages_name_the_peer_and_count_its_vectors() {
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        let mut peer = PeerBody {
            cell: WireName::new("rtos-telemetry").unwrap(),
            link: 1,
            peer: 0,
            fd_count: 16,
        };
        let n = Reply::Peer(peer).encode(&mut buf).unwrap();
        match decode_reply(&buf[..n]).unwrap() {
            Reply::Peer(b) => assert_eq!(b.cell.as_str().unwrap(), "rtos-telemetry"),
            other => panic!("unexpected {other:?}"),
        }
        for (field, bad) in [
            ("fd_count", (0u16, 0u16)),
            ("fd_count", (0, 17)),
            ("peer", (16, 1)),
        ] {
            peer.peer = bad.0;
            peer.fd_count = bad.1;
            let n = Reply::Peer(peer).encode(&mut buf).unwrap();
            assert_eq!(decode_reply(&buf[..n]), Err(DecodeError::OutOfRange(field)));
        }
        assert_eq!(MAX_FDS_PER_MESSAGE, 18);
    }

    #[test]
    fn illegal_access_reports_round_trip_and_are_checked() {
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        let mut access = AccessBody {
            link: 0,
            offset: 0x11,
            value: 7,
            size: 4,
            write: 1,
            reserved: 0,
        };
        let n = Request::IllegalAccess(access).encode(&mut buf).unwrap();
        assert_eq!(
            decode_request(&buf[..n]),
            Ok(Request::IllegalAccess(access))
        );
        access.write = 2;
        let n = Request::IllegalAccess(access).encode(&mut buf).unwrap();
        assert_eq!(
            decode_request(&buf[..n]),
            Err(DecodeError::OutOfRange("write"))
        );
        access.write = 0;
        access.reserved = 1;
        let n = Request::IllegalAccess(access).encode(&mut buf).unwrap();
        assert_eq!(decode_request(&buf[..n]), Err(DecodeError::ReservedNotZero));
    }

    #[test]
    fn refusal_detail_is_truncated_at_char_boundary() {
        let long = "é".repeat(200);
        let r = RefusedBody::new(RefusalReason::UnknownCell, &long);
        assert!(r.detail().len() <= DETAIL_LEN);
        assert!(r.detail().chars().all(|c| c == 'é'));
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        let n = Reply::Refused(r).encode(&mut buf).unwrap();
        match decode_reply(&buf[..n]).unwrap() {
            Reply::Refused(b) => {
                assert_eq!(b.reason(), Some(RefusalReason::UnknownCell));
                assert_eq!(b.detail(), r.detail());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(core::mem::size_of::<LinkStatusBody>() + HEADER_SIZE <= MAX_MESSAGE_SIZE);
        assert!(core::mem::size_of::<RefusedBody>() + HEADER_SIZE <= MAX_MESSAGE_SIZE);
    }
}
