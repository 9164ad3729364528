//! What `hypervisor status` and the live status line of `hypervisor run` report: cells
//! (attached or not, pid, exit), links and the peers' states.
//!
//! [`SystemStatus`] is built by the control server ([`crate::control::ControlServer::status`]),
//! sent over the control socket as [`ivshmem_dev::hosted`] status records, and read back by
//! [`query`] in the `status` command.

use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ivshmem_dev::hosted::{
    self, exit_kind, CellPhase, CellStatusBody, DecodeError, LinkStatusBody, Reply, Request,
    StatusBody, WireName, MAX_MESSAGE_SIZE, MAX_WIRE_PEERS,
};

use nix::errno::Errno;

use crate::control::connect_control_socket;

/// How a spawned cell process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellExit {
    /// Exited with this status code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// A KVM cell stopped itself with this `cell_state` (2 shut down, 3 failed, 4 wrong
    /// communication region revision).
    CellState(i32),
    /// A KVM cell was stopped for an illegal access (the `FATAL:` report is in the log).
    Fatal,
    /// A KVM cell was stopped on request.
    Stopped,
}

impl std::fmt::Display for CellExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CellExit::Code(c) => write!(f, "exit code {c}"),
            CellExit::Signal(s) => write!(f, "killed by signal {s} ({})", signal_name(*s)),
            CellExit::CellState(s) => write!(
                f,
                "cell_state {s} ({})",
                crate::kvm::layout::describe_cell_state(*s as u32)
            ),
            CellExit::Fatal => f.write_str("stopped for an illegal access"),
            CellExit::Stopped => f.write_str("stopped"),
        }
    }
}

/// Short name of a signal number (`SIGTERM`; `signal` for a number that is none).
pub fn signal_name(signal: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(signal).map_or("signal", |s| s.as_str())
}

/// One cell as the hypervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellStatus {
    /// Cell name.
    pub name: String,
    /// Life-cycle phase.
    pub phase: CellPhase,
    /// Process ID (attached or spawned process), if known.
    pub pid: Option<u32>,
    /// Whether the hypervisor spawned the process.
    pub spawned: bool,
    /// How the spawned process ended, if it did.
    pub exit: Option<CellExit>,
}

/// One peer of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// Name of the cell that is this peer.
    pub cell: String,
    /// Whether the peer is attached (active).
    pub active: bool,
    /// Its entry in the state table.
    pub state: u32,
}

/// One link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    /// Link name.
    pub name: String,
    /// Protocol.
    pub protocol: u16,
    /// Peers by ID.
    pub peers: Vec<PeerStatus>,
}

/// Everything `hypervisor status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemStatus {
    /// Process ID of the hypervisor.
    pub hypervisor_pid: u32,
    /// Cells in configuration order.
    pub cells: Vec<CellStatus>,
    /// Links in configuration order.
    pub links: Vec<LinkStatus>,
}

fn phase_word(cell: &CellStatus) -> String {
    match (cell.phase, cell.exit) {
        (CellPhase::Attached, _) => "attached".into(),
        (CellPhase::Waiting, _) => "waiting".into(),
        (CellPhase::Detached, _) => "detached".into(),
        (CellPhase::Exited, Some(exit)) => format!("exited ({exit})"),
        (CellPhase::Exited, None) => "exited".into(),
        (CellPhase::Running, _) => "running (kvm)".into(),
        (CellPhase::Stopped, Some(exit)) => format!("stopped (kvm, {exit})"),
        (CellPhase::Stopped, None) => "stopped (kvm)".into(),
    }
}

/// The status as a table (what `hypervisor status` prints).
pub fn format_table(status: &SystemStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "hypervisor pid {}", status.hypervisor_pid);
    let name_w = status
        .cells
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "{:<name_w$}  {:>7}  {:<7}  PHASE",
        "CELL", "PID", "SPAWNED"
    );
    for cell in &status.cells {
        let pid = cell.pid.map_or("-".to_string(), |p| p.to_string());
        let spawned = if cell.spawned { "yes" } else { "no" };
        let _ = writeln!(
            out,
            "{:<name_w$}  {:>7}  {:<7}  {}",
            cell.name,
            pid,
            spawned,
            phase_word(cell)
        );
    }
    let link_w = status
        .links
        .iter()
        .map(|l| l.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<link_w$}  {:>8}  {:>4}  {:<name_w$}  {:<8}  STATE",
        "LINK", "PROTOCOL", "PEER", "CELL", "ACTIVE"
    );
    for link in &status.links {
        for (id, peer) in link.peers.iter().enumerate() {
            let active = if peer.active { "yes" } else { "no" };
            let _ = writeln!(
                out,
                "{:<link_w$}  {:>#8x}  {:>4}  {:<name_w$}  {:<8}  {}",
                link.name, link.protocol, id, peer.cell, active, peer.state
            );
        }
    }
    out
}

/// One status line per cell (the live status of `hypervisor run`): its phase, pid and, per
/// link it is on, its peer ID and state; e.g. `rtos: attached, pid 100; telemetry#0 = 3`.
pub fn format_cell_lines(status: &SystemStatus) -> Vec<String> {
    let width = status.cells.iter().map(|c| c.name.len()).max().unwrap_or(0);
    status
        .cells
        .iter()
        .map(|cell| {
            let mut line = format!("{:<width$}: {}", cell.name, phase_word(cell));
            if let Some(pid) = cell.pid {
                let _ = write!(line, ", pid {pid}");
            }
            for link in &status.links {
                for (id, peer) in link.peers.iter().enumerate() {
                    if peer.cell == cell.name {
                        let _ = write!(line, "; {}#{id} = {}", link.name, peer.state);
                    }
                }
            }
            line
        })
        .collect()
}

/// Errors of [`query`].
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Nothing listens at the socket path.
    #[error("no hypervisor is running at {path} ({source})")]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// Why connecting failed.
        source: io::Error,
    },
    /// The control socket belongs to another user (connecting was refused with `EACCES`).
    #[error(
        "the hypervisor at {path} belongs to another user (connecting was refused: permission \
         denied); run this as that user (or root)"
    )]
    NotPermitted {
        /// The socket path.
        path: PathBuf,
    },
    /// Talking to the hypervisor failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The cell name given to a `cell` command cannot name any cell (checked before asking).
    #[error("invalid cell name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why no cell can have it.
        reason: String,
    },
    /// The hypervisor's reply is malformed.
    #[error("malformed status reply: {0}")]
    Protocol(String),
    /// The hypervisor refused the request (a status query or a `cell` command).
    #[error("{request} refused by the hypervisor: {detail}")]
    Refused {
        /// The request, as the user wrote it (`status query`, `cell stop rtos`).
        request: String,
        /// Why the hypervisor refused it.
        detail: String,
    },
}

impl From<DecodeError> for StatusError {
    fn from(e: DecodeError) -> Self {
        StatusError::Protocol(e.to_string())
    }
}

/// Connects to the hypervisor at `path`, asks for its status and returns it.
pub fn query(path: &Path) -> Result<SystemStatus, StatusError> {
    let io_err = |source: io::Error| StatusError::Io {
        path: path.to_path_buf(),
        source,
    };
    let fd = connect_control_socket(path).map_err(|e| match e {
        Errno::EACCES | Errno::EPERM => StatusError::NotPermitted {
            path: path.to_path_buf(),
        },
        e => StatusError::NotRunning {
            path: path.to_path_buf(),
            source: e.into(),
        },
    })?;
    set_recv_timeout(&fd, Duration::from_secs(5)).map_err(io_err)?;
    let mut buf = [0u8; MAX_MESSAGE_SIZE];
    let n = Request::Status
        .encode(&mut buf)
        .map_err(|e| StatusError::Protocol(e.to_string()))?;
    nix::sys::socket::send(
        fd.as_raw_fd(),
        &buf[..n],
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    )
    .map_err(|e| io_err(e.into()))?;
    let mut next = || -> Result<Reply, StatusError> {
        let n = nix::sys::socket::recv(
            fd.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        )
        .map_err(|e| io_err(e.into()))?;
        if n == 0 {
            return Err(StatusError::Protocol(
                "hypervisor closed the connection".into(),
            ));
        }
        Ok(hosted::decode_reply(&buf[..n])?)
    };
    let head = match next()? {
        Reply::Status(b) => b,
        Reply::Refused(r) => {
            return Err(StatusError::Refused {
                request: "status query".into(),
                detail: r.detail().to_string(),
            })
        }
        other => return Err(StatusError::Protocol(format!("unexpected reply {other:?}"))),
    };
    let mut cells = Vec::new();
    for _ in 0..head.cell_count {
        match next()? {
            Reply::Cell(c) => cells.push(cell_from_wire(&c)?),
            other => {
                return Err(StatusError::Protocol(format!(
                    "expected a cell record, got {other:?}"
                )))
            }
        }
    }
    let mut links = Vec::new();
    for _ in 0..head.link_count {
        match next()? {
            Reply::Link(l) => links.push(link_from_wire(&l, &cells)?),
            other => {
                return Err(StatusError::Protocol(format!(
                    "expected a link record, got {other:?}"
                )))
            }
        }
    }
    Ok(SystemStatus {
        hypervisor_pid: head.hypervisor_pid,
        cells,
        links,
    })
}

/// Asks the hypervisor at `path` to stop, start or restart `cell` and returns the cell's
/// status afterwards (`hypervisor cell ACTION NAME`).
pub fn control_cell(
    path: &Path,
    cell: &str,
    action: crate::control::CellAction,
) -> Result<CellStatus, StatusError> {
    let io_err = |source: io::Error| StatusError::Io {
        path: path.to_path_buf(),
        source,
    };
    // The user's mistake, before any hypervisor is involved.
    let name = WireName::new(cell).map_err(|e| StatusError::InvalidName {
        name: cell.to_owned(),
        reason: e.to_string(),
    })?;
    let fd = connect_control_socket(path).map_err(|e| StatusError::NotRunning {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    // A restart boots a VM or waits for a process: give it time.
    set_recv_timeout(&fd, Duration::from_secs(60)).map_err(io_err)?;
    let mut buf = [0u8; MAX_MESSAGE_SIZE];
    let n = Request::CellControl(hosted::CellControlBody {
        cell: name,
        action: action.code(),
        reserved: 0,
    })
    .encode(&mut buf)
    .map_err(|e| StatusError::Protocol(e.to_string()))?;
    nix::sys::socket::send(
        fd.as_raw_fd(),
        &buf[..n],
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    )
    .map_err(|e| io_err(e.into()))?;
    let n = nix::sys::socket::recv(
        fd.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )
    .map_err(|e| io_err(e.into()))?;
    if n == 0 {
        return Err(StatusError::Protocol(
            "hypervisor closed the connection".into(),
        ));
    }
    match hosted::decode_reply(&buf[..n])? {
        Reply::Cell(c) => cell_from_wire(&c),
        Reply::Refused(r) => Err(StatusError::Refused {
            request: format!("`cell {} {cell}`", action.verb()),
            detail: r.detail().to_string(),
        }),
        other => Err(StatusError::Protocol(format!("unexpected reply {other:?}"))),
    }
}

/// Sets `SO_RCVTIMEO` on a socket.
pub(crate) fn set_recv_timeout(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
        .map_err(io::Error::from)
}

fn cell_from_wire(c: &CellStatusBody) -> Result<CellStatus, StatusError> {
    let exit = match c.exit_kind {
        exit_kind::CODE => Some(CellExit::Code(c.exit_value)),
        exit_kind::SIGNAL => Some(CellExit::Signal(c.exit_value)),
        exit_kind::CELL_STATE => Some(CellExit::CellState(c.exit_value)),
        exit_kind::FATAL => Some(CellExit::Fatal),
        exit_kind::STOPPED => Some(CellExit::Stopped),
        _ => None,
    };
    Ok(CellStatus {
        name: c.name.as_str()?.to_string(),
        phase: c.phase(),
        pid: (c.pid != 0).then_some(c.pid),
        spawned: c.spawned != 0,
        exit,
    })
}

fn link_from_wire(l: &LinkStatusBody, cells: &[CellStatus]) -> Result<LinkStatus, StatusError> {
    let peers = (0..l.max_peers as usize)
        .map(|id| {
            let cell = cells.get(l.peer_cells[id] as usize).ok_or_else(|| {
                StatusError::Protocol(format!("link peer {id} names an unknown cell"))
            })?;
            Ok(PeerStatus {
                cell: cell.name.clone(),
                active: l.active & (1 << id) != 0,
                state: l.states[id],
            })
        })
        .collect::<Result<Vec<_>, StatusError>>()?;
    Ok(LinkStatus {
        name: l.name.as_str()?.to_string(),
        protocol: l.protocol,
        peers,
    })
}

/// Encodes a status into the wire messages (head, cells, links), for the control server.
pub(crate) fn to_wire(status: &SystemStatus) -> Vec<Reply> {
    let mut out = vec![Reply::Status(StatusBody {
        cell_count: status.cells.len() as u32,
        link_count: status.links.len() as u32,
        hypervisor_pid: status.hypervisor_pid,
        reserved: 0,
    })];
    let wire_name =
        |n: &str| WireName::new(n).unwrap_or_else(|_| WireName::new("?").expect("valid name"));
    for c in &status.cells {
        let (kind, value) = match c.exit {
            None => (exit_kind::NONE, 0),
            Some(CellExit::Code(v)) => (exit_kind::CODE, v),
            Some(CellExit::Signal(v)) => (exit_kind::SIGNAL, v),
            Some(CellExit::CellState(v)) => (exit_kind::CELL_STATE, v),
            Some(CellExit::Fatal) => (exit_kind::FATAL, 0),
            Some(CellExit::Stopped) => (exit_kind::STOPPED, 0),
        };
        out.push(Reply::Cell(CellStatusBody {
            name: wire_name(&c.name),
            phase: c.phase as u32,
            pid: c.pid.unwrap_or(0),
            exit_kind: kind,
            exit_value: value,
            spawned: u32::from(c.spawned),
            reserved: 0,
        }));
    }
    for l in &status.links {
        let mut peer_cells = [0u16; MAX_WIRE_PEERS];
        let mut states = [0u32; MAX_WIRE_PEERS];
        let mut active = 0u32;
        for (id, p) in l.peers.iter().enumerate().take(MAX_WIRE_PEERS) {
            peer_cells[id] = status
                .cells
                .iter()
                .position(|c| c.name == p.cell)
                .unwrap_or(0) as u16;
            states[id] = p.state;
            if p.active {
                active |= 1 << id;
            }
        }
        out.push(Reply::Link(LinkStatusBody {
            name: wire_name(&l.name),
            max_peers: l.peers.len().min(MAX_WIRE_PEERS) as u16,
            protocol: l.protocol,
            active,
            peer_cells,
            states,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SystemStatus {
        SystemStatus {
            hypervisor_pid: 42,
            cells: vec![
                CellStatus {
                    name: "rtos".into(),
                    phase: CellPhase::Attached,
                    pid: Some(100),
                    spawned: true,
                    exit: None,
                },
                CellStatus {
                    name: "linux".into(),
                    phase: CellPhase::Exited,
                    pid: Some(101),
                    spawned: true,
                    exit: Some(CellExit::Signal(9)),
                },
            ],
            links: vec![LinkStatus {
                name: "telemetry".into(),
                protocol: 0x4001,
                peers: vec![
                    PeerStatus {
                        cell: "rtos".into(),
                        active: true,
                        state: 3,
                    },
                    PeerStatus {
                        cell: "linux".into(),
                        active: false,
                        state: 0,
                    },
                ],
            }],
        }
    }

    #[test]
    fn wire_round_trip() {
        let status = sample();
        let wire = to_wire(&status);
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        let mut decoded = Vec::new();
        for r in &wire {
            let n = r.encode(&mut buf).unwrap();
            decoded.push(hosted::decode_reply(&buf[..n]).unwrap());
        }
        let cells: Vec<_> = decoded[1..3]
            .iter()
            .map(|r| match r {
                Reply::Cell(c) => cell_from_wire(c).unwrap(),
                _ => panic!(),
            })
            .collect();
        let link = match &decoded[3] {
            Reply::Link(l) => link_from_wire(l, &cells).unwrap(),
            _ => panic!(),
        };
        assert_eq!(cells, status.cells);
        assert_eq!(link, status.links[0]);
    }

    #[test]
    fn table_and_line_show_phases_and_states() {
        let table = format_table(&sample());
        assert!(table.contains("rtos"), "{table}");
        assert!(
            table.contains("exited (killed by signal 9 (SIGKILL))"),
            "{table}"
        );
        assert!(table.contains("0x4001"), "{table}");
        let lines = format_cell_lines(&sample());
        assert_eq!(
            lines,
            [
                "rtos : attached, pid 100; telemetry#0 = 3",
                "linux: exited (killed by signal 9 (SIGKILL)), pid 101; telemetry#1 = 0"
            ]
        );
    }
}
