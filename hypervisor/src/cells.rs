//! The cell life cycle of `hypervisor run`: create the links, listen on the control socket,
//! spawn the configured process cells pinned to their CPUs, supervise them, and stop cleanly.
//!
//! A spawned cell gets `IVSHMEM_SOCKET` (control socket path) and `IVSHMEM_CELL` (its name) in
//! its environment, runs in its own process group (so a terminal's Ctrl-C reaches the
//! hypervisor, which then stops the cells in order; and so that stopping a cell signals the
//! whole group, processes it started included) and dies with the hypervisor
//! (`PR_SET_PDEATHSIG`). A cell that exits is logged with its exit status and **never
//! restarted** by itself: it stays dead and is reported; its peers see state 0 when its
//! socket closes.
//!
//! **Nothing a cell starts outlives it or the hypervisor** when the hypervisor may create PID
//! namespaces (root, or `CAP_SYS_ADMIN`; probed once): the cell's program runs in a PID
//! namespace of its own (see [`spawn_cell`]), under a small relay process of the hypervisor's
//! (the pid the hypervisor reports and signals) and beside the namespace's init. When the
//! relay ends (the program ended, `cell stop`, or the hypervisor died, even by `kill -9`) the
//! init ends, and the kernel kills every process left in the namespace, including ones that
//! left the cell's process group or session. What cells rely on is kept: the relay passes
//! the program's exit status on as its own (exit code or signal) and forwards to the
//! program every signal sent to it by anyone but the hypervisor (whose signals reach the
//! program through the process group). Limits: inside the namespace processes see its pid
//! numbers (the program is pid 2, its parent pid reads 0) while `/proc` is still the host's.
//! Without the privilege the program runs as before, directly under the hypervisor, and a
//! warning says once that processes cells start can then outlive a `kill -9` of the
//! hypervisor (and, if they leave the cell's process group, the cell).
//! Cells without a command (or every cell with `--no-spawn`) are started by hand and attach
//! by name.
//!
//! The loop is single-threaded: `poll(2)` over the control socket, the children's pidfds, the
//! children's output pipes, a signalfd for SIGINT/SIGTERM/SIGHUP and an optional [`StopHandle`].
//!
//! A spawned cell's stdout and stderr are pipes to the hypervisor, which forwards them line by
//! line, each line prefixed with the cell's name (`[rtos-telemetry] ...`), to its own stdout
//! and stderr respectively: several cells' lines never mix, and on a terminal each forwarded
//! line is printed above the live status block like the hypervisor's own event lines. The
//! pipes are non-blocking and each poll round reads at most [`FORWARD_CHUNK`] bytes per
//! pipe, so a cell that writes a lot cannot starve the control socket. When a cell exits,
//! what is left in its pipes is forwarded (a last line without a newline gets one) and the
//! pipes are closed, even if a process the cell started still holds them.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{CellKind, ValidConfig};
use crate::control::{
    CellAction, CellRequest, CellSpec, ControlError, ControlEvent, ControlServer, LinkSpec,
    SystemSpec,
};
use crate::kvm::{create_wirings, KvmCells, KvmNotice, KvmSystem, LinkSizes};
use crate::memory::{InterruptEventFd, MemoryError};
use crate::status::{format_cell_lines, CellExit};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::signal::{killpg, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{getppid, setpgid, Pid};

/// Environment variable carrying the control socket path to spawned cells.
pub const ENV_SOCKET: &str = "IVSHMEM_SOCKET";
/// Environment variable carrying the cell name to spawned cells.
pub const ENV_CELL: &str = "IVSHMEM_CELL";

/// How long cells get to exit after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Redraw the live status line at most this often.
const REDRAW_INTERVAL: Duration = Duration::from_millis(250);
/// At most this many bytes are read from one cell output pipe per poll round.
pub const FORWARD_CHUNK: usize = 16 * 1024;
/// A line longer than this is forwarded in pieces of this size (bounds the memory a cell
/// that never writes a newline can make the hypervisor hold).
pub const MAX_FORWARDED_LINE: usize = 64 * 1024;
/// When a cell has exited, at most this many more bytes are read from each of its pipes.
const DRAIN_LIMIT: usize = 1024 * 1024;

impl SystemSpec {
    /// The hosted view of a validated configuration.
    pub fn from_config(config: &ValidConfig) -> Self {
        SystemSpec {
            cells: config
                .cells
                .iter()
                .map(|c| CellSpec {
                    name: c.name.clone(),
                    cpus: c.cpus.clone(),
                    command: c.command.as_ref().map(|cmd| {
                        let mut argv = vec![cmd.clone()];
                        argv.extend(c.args.iter().cloned());
                        argv
                    }),
                    process: c.kind == CellKind::Process,
                    uid: c.uid,
                })
                .collect(),
            links: config
                .links
                .iter()
                .map(|l| LinkSpec {
                    name: l.name.clone(),
                    peers: l.peers.clone(),
                    protocol: l.protocol,
                    state_table_size: l.state_table_size,
                    rw_size: l.rw_size,
                    output_size: l.output_size,
                    interrupts: l.interrupts,
                })
                .collect(),
        }
    }
}

/// Errors of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The control socket or the link memory could not be set up.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A cell could not be spawned.
    #[error("cannot start cell `{cell}` ({command}): {source}")]
    Spawn {
        /// Cell name.
        cell: String,
        /// The command line.
        command: String,
        /// OS error.
        source: io::Error,
    },
    /// A cell's CPU number cannot be put in a CPU set (`>= CPU_SETSIZE`).
    #[error("cannot start cell `{cell}`: CPU {cpu} is out of range (this build pins CPUs below {limit})")]
    CpuOutOfRange {
        /// Cell name.
        cell: String,
        /// The CPU number.
        cpu: usize,
        /// `CPU_SETSIZE`.
        limit: usize,
    },
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    /// Writing the live status failed.
    #[error("writing status output: {0}")]
    Output(io::Error),
    /// The system has a KVM cell but no KVM plan for it ([`run_system`] takes one).
    #[error("cell {cell} is a KVM cell, but no image and placement were given for it (use run_system with a KvmSystem)")]
    KvmUnsupported {
        /// The first KVM cell of the system without a plan.
        cell: String,
    },
    /// A KVM cell could not be built or started.
    #[error(transparent)]
    Kvm(#[from] crate::kvm::KvmError),
}

/// Asks a running [`run`] loop to stop (from another thread); cheap to clone.
#[derive(Debug, Clone)]
pub struct StopHandle {
    event: Arc<InterruptEventFd>,
}

impl StopHandle {
    /// A new, untriggered handle.
    pub fn new() -> io::Result<Self> {
        let event = InterruptEventFd::new().map_err(|e| match e {
            MemoryError::EventFd(source) => source,
            other => io::Error::other(other),
        })?;
        Ok(Self {
            event: Arc::new(event),
        })
    }

    /// Asks the loop to stop.
    pub fn stop(&self) {
        let _ = self.event.signal();
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.event.fd()
    }
}

/// How [`run`] reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A live status line, redrawn at most a few times per second (stdout is a terminal),
    /// with event lines above it.
    Terminal,
    /// One log line per change (stdout is a file or pipe).
    Log,
}

/// What [`run`] needs besides the system.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The control socket path.
    pub socket: PathBuf,
    /// Spawn the cells that have a command (false: `--no-spawn`, every cell attaches by hand).
    pub spawn: bool,
    /// Stop on SIGINT/SIGTERM/SIGHUP (blocks them in the calling thread and reads a signalfd).
    pub handle_signals: bool,
    /// Live status or log lines.
    pub output: Output,
    /// Stop once every spawned cell has exited and no cell is attached (at least one cell
    /// must have been spawned), unless a cell stopped by `hypervisor cell stop` waits to be
    /// started again; false (`--keep-running`): serve until a signal or a stop
    /// request, so that cells can attach again.
    pub stop_when_cells_exit: bool,
}

impl RunOptions {
    /// The options of `hypervisor run` with the socket at `socket`: spawn the cells, stop
    /// when they have all exited, log lines, signals not handled. Set other fields with
    /// `RunOptions { spawn: false, ..RunOptions::new(path) }`, so that new options do not
    /// break callers.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            spawn: true,
            handle_signals: false,
            output: Output::Log,
            stop_when_cells_exit: true,
        }
    }
}

/// How one spawned process cell or KVM cell ended when `run` stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppedCell {
    /// Cell name.
    pub cell: String,
    /// Its process ID (`None` for a KVM cell: it runs inside the hypervisor).
    pub pid: Option<u32>,
    /// How it ended.
    pub exit: CellExit,
    /// Whether it had already exited on its own before the stop.
    pub exited_before_stop: bool,
    /// How many earlier lives the process cell had (started again by `hypervisor cell
    /// start` or `restart`; 0 for a KVM cell); `pid`, `exit` and `exited_before_stop`
    /// describe its last life.
    pub restarts: u32,
}

/// One entry per cell, in the order of their first lives: each cell's last life, with the
/// number of lives before it.
fn last_lives(lives: Vec<StoppedCell>) -> Vec<StoppedCell> {
    let mut cells: Vec<StoppedCell> = Vec::new();
    for life in lives {
        match cells.iter_mut().find(|c| c.cell == life.cell) {
            Some(earlier) => {
                *earlier = StoppedCell {
                    restarts: earlier.restarts + 1,
                    ..life
                }
            }
            None => cells.push(life),
        }
    }
    cells
}

/// Why [`run`] stopped when every spawned cell had exited.
pub const REASON_CELLS_EXITED: &str = "every spawned cell has exited";

/// What `run` did when it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// Why it stopped (`SIGINT`, `SIGTERM`, `stop requested`, [`REASON_CELLS_EXITED`]).
    pub reason: String,
    /// Every spawned process cell (its last life, with its restarts), then every KVM cell
    /// (restarts not counted), and how each ended.
    pub cells: Vec<StoppedCell>,
}

impl RunReport {
    /// The cells that failed: they ended on their own (not stopped by `run`) with a non-zero
    /// exit code or by a signal, or (KVM cells) by an illegal access or a `cell_state`
    /// other than 2 (shut down). A cell stopped by `hypervisor cell stop` did not fail; a
    /// restarted cell is judged by its last life.
    pub fn failed(&self) -> impl Iterator<Item = &StoppedCell> {
        self.cells.iter().filter(|c| {
            c.exited_before_stop
                && !matches!(
                    c.exit,
                    CellExit::Code(0) | CellExit::CellState(2) | CellExit::Stopped
                )
        })
    }
}

struct Spawned {
    cell: String,
    child: Child,
    pidfd: Option<OwnedFd>,
    /// The cell's stdout and stderr pipes still open.
    pipes: Vec<CellPipe>,
    exit: Option<CellExit>,
    exited_before_stop: bool,
    /// Stopped by `hypervisor cell stop` and not started since: it waits for a `cell start`,
    /// so `run` does not stop by itself while such a cell exists.
    stopped_on_request: bool,
}

/// Which of a cell's output streams a pipe carries (and where its lines go).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// The read end of one of a cell's output pipes, with the partial line read so far.
struct CellPipe {
    file: File,
    stream: Stream,
    partial: Vec<u8>,
}

impl CellPipe {
    /// Takes over a pipe read end, making it non-blocking.
    fn new(fd: OwnedFd, stream: Stream) -> io::Result<Self> {
        let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(Self {
            file: File::from(fd),
            stream,
            partial: Vec::new(),
        })
    }

    /// Reads what the pipe has (up to `limit` bytes, in chunks of [`FORWARD_CHUNK`]) and
    /// forwards the complete lines. Returns whether the pipe is at end of file (or broken).
    fn pump(&mut self, cell: &str, display: &mut Display<'_>, limit: usize) -> io::Result<bool> {
        let mut buf = [0u8; FORWARD_CHUNK];
        let mut total = 0;
        let mut eof = false;
        while total < limit {
            let want = FORWARD_CHUNK.min(limit - total);
            match self.file.read(&mut buf[..want]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    total += n;
                    self.partial.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        let mut lines: Vec<&[u8]> = Vec::new();
        let mut start = 0;
        for (i, &b) in self.partial.iter().enumerate() {
            if b == b'\n' || i + 1 - start == MAX_FORWARDED_LINE {
                let end = if b == b'\n' { i } else { i + 1 };
                lines.push(&self.partial[start..end]);
                start = i + 1;
            }
        }
        if eof && start < self.partial.len() {
            lines.push(&self.partial[start..]);
            start = self.partial.len();
        }
        let result = display.cell_lines(cell, self.stream, &lines);
        self.partial.drain(..start);
        result.map(|()| eof)
    }
}

impl Spawned {
    /// Forwards what the pipes flagged in `ready` hold (one chunk each) and closes the pipes
    /// at end of file.
    fn forward(&mut self, ready: &[bool], display: &mut Display<'_>) -> io::Result<()> {
        let mut i = 0;
        let mut result = Ok(());
        self.pipes.retain_mut(|pipe| {
            let flagged = ready.get(i).copied().unwrap_or(false);
            i += 1;
            if !flagged || result.is_err() {
                return true;
            }
            match pipe.pump(&self.cell, display, FORWARD_CHUNK) {
                Ok(eof) => !eof,
                Err(e) => {
                    result = Err(e);
                    true
                }
            }
        });
        result
    }

    /// The cell has exited: forwards what is left in its pipes (a last partial line with a
    /// newline added) and closes them.
    fn drain_output(&mut self, display: &mut Display<'_>) -> io::Result<()> {
        let mut result = Ok(());
        for mut pipe in std::mem::take(&mut self.pipes) {
            let pumped = pipe.pump(&self.cell, display, DRAIN_LIMIT).and_then(|eof| {
                // Not at end of file: a process the cell left behind still holds the pipe,
                // or it kept writing; the cell is gone, so its partial line is flushed anyway.
                if !eof && !pipe.partial.is_empty() {
                    let rest = std::mem::take(&mut pipe.partial);
                    display.cell_lines(&self.cell, pipe.stream, &[&rest])?;
                }
                Ok(())
            });
            if result.is_ok() {
                result = pumped;
            }
        }
        result
    }
}

fn exit_of(status: ExitStatus) -> CellExit {
    match (status.code(), status.signal()) {
        (Some(code), _) => CellExit::Code(code),
        (None, Some(sig)) => CellExit::Signal(sig),
        (None, None) => CellExit::Code(-1),
    }
}

/// A pidfd for child `pid` (readable once it exits), or `None` on kernels before 5.3.
///
/// The one system call of the hypervisor made without nix: nix (0.32) has no `pidfd_open`.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; the result is checked.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return None;
    }
    // SAFETY: fresh fd owned by nobody else (pidfds are close-on-exec).
    Some(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// Whether this process may give cells PID namespaces: `Ok` if a forked child of it could
/// `unshare(CLONE_NEWPID)`, else why not (`EPERM` without `CAP_SYS_ADMIN`). Probed once.
pub fn pid_namespaces() -> Result<(), Errno> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    static PROBE: std::sync::OnceLock<Result<(), Errno>> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| {
        // SAFETY: the child makes one system call (unshare) and leaves with _exit: nothing
        // of this (possibly multi-threaded) process's state is used in it.
        match unsafe { fork() }? {
            ForkResult::Child => {
                let code = match nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID) {
                    Ok(()) => 0,
                    Err(e) => e as i32,
                };
                exit_now(code)
            }
            ForkResult::Parent { child } => match waitpid(child, None)? {
                WaitStatus::Exited(_, 0) => Ok(()),
                WaitStatus::Exited(_, code) => Err(Errno::from_raw(code)),
                _ => Err(Errno::ECHILD),
            },
        }
    })
}

/// In the forked child of [`spawn_cell`] (the cell's relay), after `unshare(CLONE_NEWPID)`:
/// forks the namespace's init (pid 1) and the process that goes on to `exec` the cell's
/// program (pid 2), in which it returns; the relay itself never returns (see
/// [`relay_cell`]). Async-signal-safe calls only.
fn enter_cell_namespace(hypervisor: Pid) -> io::Result<()> {
    use nix::unistd::{fork, ForkResult};
    // The relay takes every signal through `sigwaitinfo`; the init keeps them blocked.
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), None)?;
    // The init leaves when the relay's end of this pipe closes (whatever ends the relay).
    let (held, holder) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY (both forks): the children make async-signal-safe calls only until exec or
    // _exit (this process was itself forked from the hypervisor and is single-threaded).
    let init = match unsafe { fork() }? {
        ForkResult::Child => {
            drop(holder);
            namespace_init(held)
        }
        ForkResult::Parent { child } => child,
    };
    drop(held);
    match unsafe { fork() }? {
        ForkResult::Child => {
            // The cell's program: a clean signal mask, no relay fd.
            drop(holder);
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            Ok(())
        }
        ForkResult::Parent { child } => relay_cell(child, init, holder, hypervisor),
    }
}

/// Ends this (forked) process at once: no exit handlers, no flushing of state copied from
/// the hypervisor (nix has no `_exit`).
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and takes an integer.
    unsafe { libc::_exit(code) }
}

/// Closes every fd of this process but `keep`.
fn close_all_but(keep: std::os::fd::RawFd) {
    let close = |first: u32, last: u32| {
        // SAFETY: close_range on this process's own fd table (nix has no wrapper).
        unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    };
    let keep = keep as u32;
    if keep > 0 {
        close(0, keep - 1);
    }
    close(keep + 1, u32::MAX);
}

/// The init (pid 1) of a cell's PID namespace: holds no fd but `held`, lets the kernel reap
/// the orphans it is given (SIGCHLD ignored), and exits when the relay has ended (`held`
/// reads end of file); the kernel then kills every process left in the namespace.
fn namespace_init(held: OwnedFd) -> ! {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler};
    use std::os::fd::AsRawFd;
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: installs SIG_IGN, no handler code.
    let _ = unsafe { sigaction(Signal::SIGCHLD, &ignore) };
    close_all_but(held.as_raw_fd());
    loop {
        let mut fds = [nix::poll::PollFd::new(
            held.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if let Ok(1..) = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            exit_now(0);
        }
    }
}

/// The relay of a cell in a PID namespace: forwards to `program` every signal not sent by
/// the hypervisor (which signals the whole process group), and when `program` ends ends the
/// namespace (kills `init` and waits for it: every process in the namespace is gone then)
/// and ends the same way (same exit code, or killed by the same signal).
fn relay_cell(program: Pid, init: Pid, holder: OwnedFd, hypervisor: Pid) -> ! {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use std::os::fd::AsRawFd;
    // Nothing else: the std's exec-error pipe (so `spawn` returns once the program runs),
    // the cell's output pipes, and whatever the hypervisor had open.
    close_all_but(holder.as_raw_fd());
    let all = SigSet::all();
    loop {
        let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::uninit();
        // SAFETY: a valid signal set and room for one siginfo_t (nix has no sigwaitinfo).
        let sig = unsafe { libc::sigwaitinfo(all.as_ref(), info.as_mut_ptr()) };
        if sig < 0 {
            continue;
        }
        // SAFETY: sigwaitinfo succeeded, so it filled `info`.
        let info = unsafe { info.assume_init() };
        if sig != libc::SIGCHLD {
            // SAFETY: reading the sender's pid of a signal sent by a process.
            let sender = unsafe { info.si_pid() };
            if sender != hypervisor.as_raw() {
                if let Ok(sig) = Signal::try_from(sig) {
                    let _ = nix::sys::signal::kill(program, sig);
                }
            }
            continue;
        }
        let ended = match waitpid(program, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Err(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => Ok(sig),
            _ => continue,
        };
        let _ = nix::sys::signal::kill(init, Signal::SIGKILL);
        let _ = waitpid(init, None);
        match ended {
            Err(code) => exit_now(code),
            Ok(sig) => die_by(sig),
        }
    }
}

/// Ends this process by `sig` (without a core dump), as the program it relays did.
fn die_by(sig: Signal) -> ! {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler};
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installs SIG_DFL, no handler code.
    let _ = unsafe { sigaction(sig, &default) };
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let _ = nix::sys::signal::kill(Pid::this(), sig);
    // A signal whose default is not to end the process: the shell's convention.
    exit_now(128 + sig as i32)
}

/// Spawns one cell: `argv`, pinned to `cpus`, with the socket path and cell name in its
/// environment, in its own process group, killed if the hypervisor dies. Its stdin is
/// `/dev/null`; its stdout and stderr are pipes (`Child::stdout`, `Child::stderr`) that the
/// caller must read, or the cell blocks once a pipe is full.
///
/// If [`pid_namespaces`] allows, the program runs in a PID namespace of its own: the
/// returned child is then its relay (see the module documentation), whose exit status is
/// the program's and which forwards signals to it.
pub fn spawn_cell(cell: &CellSpec, argv: &[String], socket: &Path) -> Result<Child, RunError> {
    let spawn_err = |source| RunError::Spawn {
        cell: cell.name.clone(),
        command: argv.join(" "),
        source,
    };
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| spawn_err(io::ErrorKind::InvalidInput.into()))?;
    // Build the CPU set before forking: nothing in the child may allocate.
    let mut set = CpuSet::new();
    for &cpu in &cell.cpus {
        set.set(cpu).map_err(|_| RunError::CpuOutOfRange {
            cell: cell.name.clone(),
            cpu,
            limit: CpuSet::count(),
        })?;
    }
    // The hypervisor's pid, to notice (in the child) that it died before PR_SET_PDEATHSIG
    // was in place.
    let hypervisor = Pid::this();
    let pin = !cell.cpus.is_empty();
    // A cell with a uid of its own (only possible for a root hypervisor) drops to it before
    // exec: its group the same number, no supplementary groups.
    let user = cell
        .uid
        .filter(|&uid| uid != nix::unistd::geteuid().as_raw())
        .map(|uid| {
            (
                nix::unistd::Uid::from_raw(uid),
                nix::unistd::Gid::from_raw(uid),
            )
        });
    let confine = pid_namespaces().is_ok();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env(ENV_SOCKET, socket)
        .env(ENV_CELL, &cell.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (unshare, setgroups, setgid, setuid, prctl, getppid,
    // sigprocmask, setpgid, sched_setaffinity, and in `enter_cell_namespace` pipe2, fork,
    // close_range, poll, sigwaitinfo, waitpid, kill, setrlimit, sigaction, _exit) through
    // nix's thin wrappers, on stack data; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if confine {
                // Before the uid change, which drops the privilege it needs. Only this
                // process's children are created in the new namespace.
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)?;
            }
            if let Some((uid, gid)) = user {
                nix::unistd::setgroups(&[])?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
            }
            // After the uid change, which clears the parent-death signal.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // If the hypervisor died between fork and prctl, no death signal will come: the
            // child was re-parented, so it must not run on as an orphan cell.
            // (An error here ends the child before exec, and spawning fails.)
            if getppid() != hypervisor {
                return Err(Errno::ESRCH.into());
            }
            // The hypervisor blocks SIGINT/SIGTERM/SIGHUP (it reads them from a signalfd); the
            // mask survives exec, so the cell must get a clean one.
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
            if pin {
                sched_setaffinity(Pid::from_raw(0), &set)?;
            }
            if confine {
                // Returns only in the process that executes the program.
                enter_cell_namespace(hypervisor)?;
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(spawn_err)
}

/// Sends `signal` to a spawned cell: to its whole process group (the cell runs in a group of
/// its own, see [`spawn_cell`]), so that processes it started go with it. Only for children
/// not reaped yet: until then the group ID cannot name another group.
pub fn signal_cell(child: &Child, signal: Signal) -> io::Result<()> {
    Ok(killpg(Pid::from_raw(child.id() as i32), signal)?)
}

/// Whether the spawned cell's own process has exited, without reaping it (`WNOWAIT`): until
/// it is reaped its pid cannot be recycled, so its group can still be signalled.
fn has_exited(child: &Child) -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    !matches!(
        waitid(Id::Pid(Pid::from_raw(child.id() as i32)), flags),
        Ok(WaitStatus::StillAlive) | Err(_)
    )
}

/// The signals that stop `run` (when it handles signals).
/// SIGHUP too: a closed terminal stops the system like Ctrl-C (summary, socket removed).
const STOP_SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Blocks [`STOP_SIGNALS`] in this thread and returns a signalfd that reads them.
fn signal_fd() -> io::Result<SignalFd> {
    let set: SigSet = STOP_SIGNALS.into_iter().collect();
    set.thread_block()?;
    Ok(SignalFd::with_flags(
        &set,
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )?)
}

/// The next pending signal's number, if any.
fn read_signal(fd: &SignalFd) -> Option<i32> {
    fd.read_signal()
        .ok()
        .flatten()
        .map(|info| info.ssi_signo as i32)
}

struct Display<'a> {
    out: &'a mut dyn Write,
    /// Where cells' stderr lines go.
    err: &'a mut dyn Write,
    output: Output,
    /// The live block: one line per cell.
    lines: Vec<String>,
    /// How many lines of the live block are on the screen now.
    drawn: usize,
    last_draw: Option<Instant>,
    pending: bool,
}

impl Display<'_> {
    /// Erases the live block (terminal only): cursor up to its first line, clear below.
    fn erase(&mut self) -> io::Result<()> {
        if self.drawn > 0 {
            write!(self.out, "\x1b[{}F\x1b[J", self.drawn)?;
            self.drawn = 0;
        }
        Ok(())
    }

    /// Prints an event line (above the live block on a terminal).
    fn event(&mut self, text: &str) -> io::Result<()> {
        if self.output == Output::Terminal && self.drawn > 0 {
            self.erase()?;
            self.pending = true;
        }
        writeln!(self.out, "{text}")?;
        self.out.flush()
    }

    /// Prints lines a cell wrote to `stream`, each prefixed with `[cell] `, to the matching
    /// stream of the hypervisor (above the live block on a terminal).
    fn cell_lines(&mut self, cell: &str, stream: Stream, lines: &[&[u8]]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        if self.output == Output::Terminal && self.drawn > 0 {
            self.erase()?;
            // The erase must reach the terminal before a stderr line does.
            self.out.flush()?;
            self.pending = true;
        }
        let target: &mut dyn Write = match stream {
            Stream::Stdout => &mut *self.out,
            Stream::Stderr => &mut *self.err,
        };
        let mut text = Vec::new();
        for line in lines {
            text.push(b'[');
            text.extend_from_slice(cell.as_bytes());
            text.extend_from_slice(b"] ");
            text.extend_from_slice(line);
            text.push(b'\n');
        }
        target.write_all(&text)?;
        target.flush()
    }

    /// Redraws the live block if it changed (or was erased) and the last redraw is old
    /// enough; returns how long to wait before a pending redraw is due.
    fn live(&mut self, lines: Vec<String>) -> io::Result<Option<Duration>> {
        if self.output != Output::Terminal {
            return Ok(None);
        }
        if lines != self.lines {
            self.lines = lines;
            self.pending = true;
        }
        if !self.pending {
            return Ok(None);
        }
        if let Some(at) = self.last_draw {
            let since = at.elapsed();
            if since < REDRAW_INTERVAL {
                return Ok(Some(REDRAW_INTERVAL - since));
            }
        }
        self.erase()?;
        for line in &self.lines {
            writeln!(self.out, "{line}")?;
        }
        self.drawn = self.lines.len();
        self.out.flush()?;
        self.pending = false;
        self.last_draw = Some(Instant::now());
        Ok(None)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.err.flush()?;
        self.out.flush()
    }
}

fn describe(event: &ControlEvent) -> String {
    match event {
        ControlEvent::Attached { cell, pid } => format!("cell {cell}: attached (pid {pid})"),
        ControlEvent::Detached { cell, reason } => {
            format!("cell {cell}: detached ({reason}); its state is 0")
        }
        ControlEvent::Refused { cell, detail } => format!("attach as `{cell}` refused: {detail}"),
        ControlEvent::State { cell, link, value } => {
            format!("cell {cell}: link {link}: state {value}")
        }
    }
}

/// Runs a hosted system until SIGINT/SIGTERM/SIGHUP (if `options.handle_signals`), `stop`, or (if
/// `options.stop_when_cells_exit`) every spawned cell has exited and no cell is attached:
/// creates the links, listens at `options.socket`, spawns the cells, reports on `out`, and
/// on stop terminates the spawned cells (SIGTERM, then SIGKILL after a grace period), waits
/// for them and removes the socket. A system with a KVM cell is refused
/// ([`RunError::KvmUnsupported`]); [`run_system`] runs those.
///
/// The spawned cells' stdout lines are forwarded to `out` and their stderr lines to this
/// process's stderr, prefixed with the cell name (see [`run_with_stderr`]).
pub fn run(
    system: &SystemSpec,
    options: &RunOptions,
    stop: Option<&StopHandle>,
    out: &mut dyn Write,
) -> Result<RunReport, RunError> {
    run_with_stderr(system, options, stop, out, &mut io::stderr())
}

/// [`run`], with the spawned cells' stderr lines (prefixed `[cell] `) forwarded to `err`
/// instead of this process's stderr.
pub fn run_with_stderr(
    system: &SystemSpec,
    options: &RunOptions,
    stop: Option<&StopHandle>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<RunReport, RunError> {
    run_system(system, &KvmSystem::default(), options, stop, out, err)
}

/// [`run_with_stderr`] for a system with KVM cells: `kvm` names their images and where
/// their links appear. The KVM cells start after the process cells are spawned; their
/// console lines are forwarded like a process cell's stdout (`[cell] line`), their stops
/// (`FATAL:` reports, `cell_state`) are printed as events, and on stop (SIGINT/SIGTERM or
/// `stop`) every VM is stopped before the process cells.
pub fn run_system(
    system: &SystemSpec,
    kvm: &KvmSystem,
    options: &RunOptions,
    stop: Option<&StopHandle>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<RunReport, RunError> {
    // Refuse before creating anything: a system whose KVM cells never start is not the
    // system the configuration describes.
    if let Some(cell) = system
        .cells
        .iter()
        .find(|c| !c.process && !kvm.cells.iter().any(|k| k.name == c.name))
    {
        return Err(RunError::KvmUnsupported {
            cell: cell.name.clone(),
        });
    }
    kvm.check_images()?;
    let signals = if options.handle_signals {
        Some(signal_fd().map_err(RunError::Signals)?)
    } else {
        None
    };
    let (mut server, mut vms) = if kvm.cells.is_empty() {
        (
            ControlServer::bind(system, &options.socket, &mut crate::control::device_model)?,
            KvmCells::none()?,
        )
    } else {
        let specs: Vec<_> = system
            .links
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    l.peers.clone(),
                    l.protocol,
                    LinkSizes {
                        state_table: l.state_table_size,
                        rw: l.rw_size,
                        output: l.output_size,
                    },
                )
            })
            .collect();
        let wirings = create_wirings(&specs, kvm)?;
        let server = ControlServer::bind_wired(system, &options.socket, &wirings)?;
        let names: Vec<_> = specs.into_iter().map(|(n, p, _, _)| (n, p)).collect();
        (server, KvmCells::new(kvm, &names, &wirings)?)
    };
    let mut display = Display {
        out,
        err,
        output: options.output,
        lines: Vec::new(),
        drawn: 0,
        last_draw: None,
        pending: false,
    };
    let mut spawned: Vec<Spawned> = Vec::new();
    let served = serve(
        system,
        options,
        stop,
        signals.as_ref(),
        Supervised {
            server: &mut server,
            spawned: &mut spawned,
            vms: &mut vms,
        },
        &mut display,
    );
    // The one exit path: whether serving stopped on request or failed, every spawned cell is
    // stopped and reaped before `run` returns.
    let announced = match &served {
        Ok(reason) => display.event(&format!("stopping ({reason})")),
        Err(e) => display.event(&format!("stopping after an error: {e}")),
    };
    // Which KVM cells had stopped on their own (their halt is in the status already).
    let _ = show_kvm(&mut server, &vms, &mut display);
    let kvm_names: Vec<String> = kvm.cells.iter().map(|k| k.name.clone()).collect();
    let kvm_stopped_before: Vec<bool> = kvm_names.iter().map(|n| !vms.is_running(n)).collect();
    vms.stop_all();
    let _ = show_kvm(&mut server, &vms, &mut display);
    let mut cells = last_lives(terminate(&mut server, &mut spawned, &mut display));
    let spawned_count = cells.len();
    let status = server.status();
    for (name, before) in kvm_names.iter().zip(kvm_stopped_before) {
        let exit = status
            .cells
            .iter()
            .find(|c| &c.name == name)
            .and_then(|c| c.exit)
            .unwrap_or(CellExit::Stopped);
        cells.push(StoppedCell {
            cell: name.clone(),
            pid: None,
            exit,
            exited_before_stop: before,
            restarts: 0,
        });
    }
    let reason = served?;
    announced.map_err(RunError::Output)?;
    let socket = server.path().to_path_buf();
    drop(server);
    let mut summary = format!("stopped {spawned_count} spawned cell(s)");
    if !kvm_names.is_empty() {
        summary.push_str(&format!(" and {} KVM cell(s)", kvm_names.len()));
    }
    for c in &cells {
        let how = if c.exited_before_stop {
            "had already exited"
        } else {
            "stopped"
        };
        let mut what = match c.pid {
            Some(pid) => format!("pid {pid}"),
            None => "kvm".to_string(),
        };
        match c.restarts {
            0 => {}
            1 => what.push_str(", restarted once"),
            n => what.push_str(&format!(", restarted {n} times")),
        }
        summary.push_str(&format!("; {} ({what}) {how}: {}", c.cell, c.exit));
    }
    summary.push_str(&format!("; removed {}", socket.display()));
    display.event(&summary).map_err(RunError::Output)?;
    display.finish().map_err(RunError::Output)?;
    Ok(RunReport { reason, cells })
}

/// Spawns process cell `cell` (which has a command) and starts forwarding its output.
fn spawn_process_cell(
    cell: &CellSpec,
    options: &RunOptions,
    server: &mut ControlServer,
    spawned: &mut Vec<Spawned>,
    display: &mut Display<'_>,
) -> Result<(), RunError> {
    let Some(argv) = &cell.command else {
        return Ok(());
    };
    if let Err(e) = pid_namespaces() {
        // Said once per run: before the first cell is spawned.
        if spawned.is_empty() {
            display
                .event(&format!(
                    "warning: cells run without a PID namespace of their own ({}; it needs \
                     root or CAP_SYS_ADMIN): processes they start can outlive a `kill -9` of \
                     the hypervisor, and ones that leave their cell's process group outlive \
                     the cell",
                    io::Error::from(e)
                ))
                .map_err(RunError::Output)?;
        }
    }
    let mut child = spawn_cell(cell, argv, &options.socket)?;
    let pid = child.id();
    server.cell_spawned(&cell.name, pid);
    let stdout = child
        .stdout
        .take()
        .map(|p| (OwnedFd::from(p), Stream::Stdout));
    let stderr = child
        .stderr
        .take()
        .map(|p| (OwnedFd::from(p), Stream::Stderr));
    spawned.push(Spawned {
        cell: cell.name.clone(),
        pidfd: pidfd_open(pid),
        child,
        pipes: Vec::new(),
        exit: None,
        exited_before_stop: false,
        stopped_on_request: false,
    });
    let s = spawned.last_mut().expect("just pushed");
    for (fd, stream) in stdout.into_iter().chain(stderr) {
        let pipe = CellPipe::new(fd, stream).map_err(|source| RunError::Spawn {
            cell: cell.name.clone(),
            command: argv.join(" "),
            source,
        })?;
        s.pipes.push(pipe);
    }
    display
        .event(&format!(
            "cell {}: started `{}` (pid {pid}, cpus {:?})",
            cell.name,
            argv.join(" "),
            cell.cpus
        ))
        .map_err(RunError::Output)?;
    Ok(())
}

/// Carries out `hypervisor cell stop|start|restart` for `cell`. Process cells: stop sends
/// SIGTERM to the spawned process's group, serves the socket while it exits and sends
/// SIGKILL after [`STOP_GRACE`] (as when `run` stops), or disconnects a cell started by hand;
/// start spawns its command again. KVM cells: stop parks the vCPU and frees the VM; start
/// boots a fresh VM from the image. Either way the cell's states go to 0 on stop. Stopping a
/// cell that does not run, or starting one that does, is refused with the reason.
fn control_cell(
    request: &CellRequest,
    system: &SystemSpec,
    options: &RunOptions,
    supervised: &mut Supervised<'_>,
    display: &mut Display<'_>,
) -> Result<(), String> {
    let Supervised {
        server,
        spawned,
        vms,
    } = supervised;
    let name = request.cell.as_str();
    if vms.contains(name) {
        let running = vms.is_running(name);
        let result = match request.action {
            CellAction::Stop if !running => return Err(format!("cell `{name}` is not running")),
            CellAction::Start if running => {
                return Err(format!("cell `{name}` is already running"))
            }
            CellAction::Stop => vms.stop(name),
            CellAction::Start | CellAction::Restart => vms.start(name),
        };
        return result.map_err(|e| e.to_string());
    }
    let cell = system
        .cells
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("no cell named `{name}`"))?;
    let live = spawned
        .iter()
        .position(|s| s.cell == name && s.exit.is_none());
    if matches!(request.action, CellAction::Stop | CellAction::Restart) {
        match live {
            Some(i) => {
                let _ = display.event(&format!(
                    "cell {name}: stopping process {} on request (SIGTERM, SIGKILL after \
                     {STOP_GRACE:?})",
                    spawned[i].child.id()
                ));
                // Reports the exit as `cell NAME: process PID ended: ...`.
                terminate(server, std::slice::from_mut(&mut spawned[i]), display);
                spawned[i].stopped_on_request = request.action == CellAction::Stop;
            }
            None if server.disconnect_cell(name) => {
                let _ = display.event(&format!("cell {name}: disconnected on request"));
            }
            None if request.action == CellAction::Stop => {
                return Err(format!("cell `{name}` is not running"));
            }
            None => {}
        }
    }
    if matches!(request.action, CellAction::Start | CellAction::Restart) {
        if request.action == CellAction::Start && live.is_some() {
            return Err(format!("cell `{name}` is already running"));
        }
        if cell.command.is_none() || !options.spawn {
            return Err(format!(
                "cell `{name}` is started by hand: start its program with {ENV_CELL}={name}"
            ));
        }
        for earlier in spawned.iter_mut().filter(|s| s.cell == name) {
            earlier.stopped_on_request = false;
        }
        spawn_process_cell(cell, options, server, spawned, display).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What [`serve`] supervises: the control server, the spawned process cells, the KVM cells.
struct Supervised<'a> {
    server: &'a mut ControlServer,
    spawned: &'a mut Vec<Spawned>,
    vms: &'a mut KvmCells,
}

/// Listens, spawns the cells and serves until a stop signal or request; returns why it
/// stopped. Every child it starts is in `spawned` before anything else can fail, so the
/// caller can always stop and reap them.
fn serve(
    system: &SystemSpec,
    options: &RunOptions,
    stop: Option<&StopHandle>,
    signals: Option<&SignalFd>,
    supervised: Supervised<'_>,
    display: &mut Display<'_>,
) -> Result<String, RunError> {
    let Supervised {
        server,
        spawned,
        vms,
    } = supervised;
    display
        .event(&format!("listening on {}", options.socket.display()))
        .map_err(RunError::Output)?;
    if options.spawn {
        for cell in system.cells.iter().filter(|c| c.process) {
            if cell.command.is_some() {
                spawn_process_cell(cell, options, server, spawned, display)?;
            }
        }
    }
    for cell in system
        .cells
        .iter()
        .filter(|c| c.process && (c.command.is_none() || !options.spawn))
    {
        display
            .event(&format!(
                "cell {}: waiting for it to attach ({ENV_CELL}={} {ENV_SOCKET}={})",
                cell.name,
                cell.name,
                options.socket.display()
            ))
            .map_err(RunError::Output)?;
    }

    vms.start_all()?;
    show_kvm(server, vms, display).map_err(RunError::Output)?;

    let mut wait: Option<Duration> = None;
    loop {
        let mut extra: Vec<BorrowedFd<'_>> = Vec::new();
        if let Some(s) = signals {
            extra.push(s.as_fd());
        }
        if let Some(s) = stop {
            extra.push(s.fd());
        }
        extra.push(vms.fd());
        let live: Vec<usize> = (0..spawned.len())
            .filter(|&i| spawned[i].exit.is_none())
            .collect();
        for &i in &live {
            if let Some(fd) = &spawned[i].pidfd {
                extra.push(fd.as_fd());
            }
        }
        let pipes_from = extra.len();
        for s in spawned.iter() {
            extra.extend(s.pipes.iter().map(|p| p.file.as_fd()));
        }
        // Without pidfds, look at the children every 100 ms.
        let fallback = live
            .iter()
            .any(|&i| spawned[i].pidfd.is_none())
            .then_some(Duration::from_millis(100));
        let timeout = match (wait, fallback) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let ready = server.poll(&extra, timeout)?;
        let mut stop_reason = None;
        if let Some(s) = signals {
            if ready[0] {
                if let Some(sig) = read_signal(s) {
                    stop_reason = Some(crate::status::signal_name(sig).to_string());
                }
            }
        }
        if let Some(s) = stop {
            if ready[usize::from(signals.is_some())] {
                let _ = s.event.drain();
                stop_reason = Some("stop requested".to_string());
            }
        }
        forward(spawned, &ready[pipes_from..], display).map_err(RunError::Output)?;
        reap(server, spawned, display, false).map_err(RunError::Output)?;
        show_kvm(server, vms, display).map_err(RunError::Output)?;
        for request in server.take_cell_requests() {
            let mut supervised = Supervised {
                server,
                spawned,
                vms,
            };
            let result = control_cell(&request, system, options, &mut supervised, display);
            show_kvm(server, vms, display).map_err(RunError::Output)?;
            server.answer_cell_request(&request, result);
        }
        for event in server.take_events() {
            display.event(&describe(&event)).map_err(RunError::Output)?;
        }
        wait = display
            .live(format_cell_lines(&server.status()))
            .map_err(RunError::Output)?;
        if let Some(r) = stop_reason {
            return Ok(r);
        }
        if options.stop_when_cells_exit
            && !spawned.is_empty()
            && spawned.iter().all(|s| s.exit.is_some())
            && !spawned.iter().any(|s| s.stopped_on_request)
            && server.attached_cells().is_empty()
            && !vms.any_running()
        {
            return Ok(REASON_CELLS_EXITED.to_string());
        }
    }
}

/// Prints what the KVM cells reported (console lines with the `[cell]` prefix, starts and
/// stops) and records their phases for the status.
fn show_kvm(
    server: &mut ControlServer,
    vms: &KvmCells,
    display: &mut Display<'_>,
) -> io::Result<()> {
    for notice in vms.take() {
        match notice {
            KvmNotice::Console { cell, line } => {
                display.cell_lines(&cell, Stream::Stdout, &[line.as_bytes()])?
            }
            KvmNotice::Phase {
                cell,
                text,
                phase,
                exit,
            } => {
                server.set_kvm_phase(&cell, phase, exit);
                display.event(&text)?;
            }
        }
    }
    Ok(())
}

/// Forwards one chunk from each ready output pipe; `ready` flags the pipes of `spawned` in
/// order.
fn forward(spawned: &mut [Spawned], ready: &[bool], display: &mut Display<'_>) -> io::Result<()> {
    let mut at = 0;
    for s in spawned.iter_mut() {
        let n = s.pipes.len();
        let flags = ready.get(at..at + n).unwrap_or(&[]);
        at += n;
        s.forward(flags, display)?;
    }
    Ok(())
}

/// Collects the children that have exited (forwarding the rest of their output first); logs
/// each (never restarting it).
fn reap(
    server: &mut ControlServer,
    spawned: &mut [Spawned],
    display: &mut Display<'_>,
    stopping: bool,
) -> io::Result<()> {
    for s in spawned.iter_mut().filter(|s| s.exit.is_none()) {
        if has_exited(&s.child) {
            // The cell is over: what it started goes with it, rather than running on as
            // orphans that still map its output section. Its process is a zombie until the
            // wait below, so its pid still names its group.
            let _ = signal_cell(&s.child, Signal::SIGKILL);
        }
        if let Ok(Some(status)) = s.child.try_wait() {
            let exit = exit_of(status);
            let drained = s.drain_output(display);
            s.exit = Some(exit);
            s.exited_before_stop = !stopping;
            server.cell_exited(&s.cell, exit);
            let note = if stopping { "" } else { "; not restarted" };
            display.event(&format!(
                "cell {}: process {} ended: {exit}{note}",
                s.cell,
                s.child.id()
            ))?;
            drained?;
        }
    }
    Ok(())
}

/// Sends SIGTERM to every live spawned cell, serves the socket while they exit, kills the
/// ones still there after [`STOP_GRACE`] and reaps all.
fn terminate(
    server: &mut ControlServer,
    spawned: &mut [Spawned],
    display: &mut Display<'_>,
) -> Vec<StoppedCell> {
    for s in spawned.iter().filter(|s| s.exit.is_none()) {
        // The pid of our own unreaped child: it cannot have been recycled yet.
        let _ = signal_cell(&s.child, Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    let mut killed = false;
    loop {
        let _ = reap(server, spawned, display, true);
        for event in server.take_events() {
            let _ = display.event(&describe(&event));
        }
        if spawned.iter().all(|s| s.exit.is_some()) {
            break;
        }
        let now = Instant::now();
        if now >= deadline && !killed {
            for s in spawned.iter_mut().filter(|s| s.exit.is_none()) {
                let _ = display.event(&format!(
                    "cell {}: did not stop within {STOP_GRACE:?}, killing it",
                    s.cell
                ));
                let _ = signal_cell(&s.child, Signal::SIGKILL);
            }
            killed = true;
        }
        let mut fds: Vec<BorrowedFd<'_>> = spawned
            .iter()
            .filter(|s| s.exit.is_none())
            .filter_map(|s| s.pidfd.as_ref().map(|f| f.as_fd()))
            .collect();
        let pipes_from = fds.len();
        for s in spawned.iter() {
            fds.extend(s.pipes.iter().map(|p| p.file.as_fd()));
        }
        let timeout = if killed {
            Duration::from_millis(100)
        } else {
            deadline
                .saturating_duration_since(now)
                .min(Duration::from_millis(100))
        };
        match server.poll(&fds, Some(timeout)) {
            Ok(ready) => {
                let _ = forward(spawned, &ready[pipes_from..], display);
            }
            Err(e) => {
                let _ = display.event(&format!(
                    "control socket failed while stopping the cells ({e}); killing them"
                ));
                kill_and_reap(server, spawned, display);
                break;
            }
        }
    }
    spawned
        .iter()
        .filter_map(|s| {
            s.exit.map(|exit| StoppedCell {
                cell: s.cell.clone(),
                pid: Some(s.child.id()),
                exit,
                exited_before_stop: s.exited_before_stop,
                restarts: 0,
            })
        })
        .collect()
}

/// Last resort when the stop loop cannot wait for the children's pidfds: SIGKILL every live
/// spawned cell and reap it with a blocking wait (a killed child cannot block the wait).
fn kill_and_reap(server: &mut ControlServer, spawned: &mut [Spawned], display: &mut Display<'_>) {
    for s in spawned.iter_mut().filter(|s| s.exit.is_none()) {
        let _ = signal_cell(&s.child, Signal::SIGKILL);
        let exit = match s.child.wait() {
            Ok(status) => exit_of(status),
            Err(e) => {
                let _ = display.event(&format!(
                    "cell {}: waiting for process {} failed: {e}",
                    s.cell,
                    s.child.id()
                ));
                continue;
            }
        };
        s.exit = Some(exit);
        server.cell_exited(&s.cell, exit);
        let _ = s.drain_output(display);
        let _ = display.event(&format!(
            "cell {}: process {} ended: {exit}",
            s.cell,
            s.child.id()
        ));
    }
}

impl Drop for Spawned {
    /// A spawned cell never outlives its supervisor's bookkeeping, even on a panic: if it
    /// was not reaped yet it is killed and reaped here.
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = signal_cell(&self.child, Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn display<'a>(out: &'a mut Vec<u8>, err: &'a mut Vec<u8>, output: Output) -> Display<'a> {
        Display {
            out,
            err,
            output,
            lines: Vec::new(),
            drawn: 0,
            last_draw: None,
            pending: false,
        }
    }

    #[test]
    fn terminal_redraws_the_cell_block_in_place_and_rate_limits() {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut d = display(&mut out, &mut err, Output::Terminal);
        assert_eq!(
            d.live(vec!["a: waiting".into(), "b: waiting".into()])
                .unwrap(),
            None
        );
        // A change right after a redraw is deferred, not drawn.
        let due = d
            .live(vec!["a: attached".into(), "b: waiting".into()])
            .unwrap();
        assert!(due.is_some_and(|t| t <= REDRAW_INTERVAL));
        // An event erases the block and is printed above where it was.
        d.event("cell a: attached (pid 1)").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "a: waiting\nb: waiting\n\x1b[2F\x1b[Jcell a: attached (pid 1)\n"
        );
    }

    #[test]
    fn cell_lines_go_above_the_live_block_on_their_own_stream() {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut d = display(&mut out, &mut err, Output::Terminal);
        d.live(vec!["a: attached".into(), "b: waiting".into()])
            .unwrap();
        d.cell_lines("a", Stream::Stdout, &[b"one", b"two"])
            .unwrap();
        // The block is erased once and redrawn later (rate-limited), not after every line.
        assert!(d.pending);
        assert_eq!(d.drawn, 0);
        d.cell_lines("b", Stream::Stderr, &[b"oops"]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a: attached\nb: waiting\n\x1b[2F\x1b[J[a] one\n[a] two\n"
        );
        assert_eq!(String::from_utf8(err).unwrap(), "[b] oops\n");
    }

    /// A pipe whose write end the test holds, as a [`CellPipe`].
    fn test_pipe(stream: Stream) -> (CellPipe, File) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        (CellPipe::new(r, stream).unwrap(), File::from(w))
    }

    #[test]
    fn pipes_forward_whole_lines_and_flush_the_last_partial_line_at_eof() {
        let (mut pipe, mut w) = test_pipe(Stream::Stdout);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut d = display(&mut out, &mut err, Output::Log);
        w.write_all(b"first\nsec").unwrap();
        assert!(!pipe.pump("c", &mut d, FORWARD_CHUNK).unwrap());
        // Nothing more to read: the pump returns instead of blocking.
        assert!(!pipe.pump("c", &mut d, FORWARD_CHUNK).unwrap());
        w.write_all(b"ond\nlast").unwrap();
        drop(w);
        assert!(pipe.pump("c", &mut d, FORWARD_CHUNK).unwrap(), "eof");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[c] first\n[c] second\n[c] last\n"
        );
        assert!(err.is_empty());
    }

    #[test]
    fn overlong_lines_are_forwarded_in_pieces() {
        let (mut pipe, mut w) = test_pipe(Stream::Stderr);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut d = display(&mut out, &mut err, Output::Log);
        let long = vec![b'x'; MAX_FORWARDED_LINE + 10];
        let writer = std::thread::spawn(move || {
            w.write_all(&long).unwrap();
        });
        // Until the writer is done (and the pipe closed), keep reading.
        let mut eof = false;
        while !eof {
            let mut pfd = [nix::poll::PollFd::new(
                pipe.file.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            nix::poll::poll(&mut pfd, 10_000u16).unwrap();
            eof = pipe.pump("c", &mut d, FORWARD_CHUNK).unwrap();
        }
        writer.join().unwrap();
        let text = String::from_utf8(err).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{}", lines.len());
        assert_eq!(lines[0].len(), 4 + MAX_FORWARDED_LINE);
        assert_eq!(lines[1], format!("[c] {}", "x".repeat(10)));
        assert!(out.is_empty());
    }

    #[test]
    fn log_output_prints_events_only() {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut d = display(&mut out, &mut err, Output::Log);
        assert_eq!(d.live(vec!["a: waiting".into()]).unwrap(), None);
        d.event("cell a: attached (pid 1)").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "cell a: attached (pid 1)\n"
        );
    }

    /// A writer that fails once a cell's start line has been written (after recording it).
    struct FailAfterStart {
        text: Vec<u8>,
    }

    impl Write for FailAfterStart {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if String::from_utf8_lossy(&self.text).contains("started `") {
                return Err(io::Error::other("output closed"));
            }
            self.text.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn sleeper_system() -> SystemSpec {
        SystemSpec {
            cells: vec![CellSpec {
                name: "sleeper".into(),
                cpus: Vec::new(),
                command: Some(vec!["/bin/sleep".into(), "1000".into()]),
                process: true,
                uid: None,
            }],
            links: Vec::new(),
        }
    }

    fn socket_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("cells-unit-{}-{tag}.sock", std::process::id()))
    }

    /// Whether `pid` still names a process (running or an unreaped zombie).
    fn exists(pid: u32) -> bool {
        nix::sys::signal::kill(Pid::from_raw(pid as i32), None).is_ok()
    }

    #[test]
    fn an_error_after_spawning_still_stops_and_reaps_every_cell() {
        let options = RunOptions {
            ..RunOptions::new(socket_path("error-exit"))
        };
        let mut out = FailAfterStart { text: Vec::new() };
        let result = run(&sleeper_system(), &options, None, &mut out);
        assert!(
            matches!(result, Err(RunError::Output(_))),
            "the failing output is reported: {result:?}"
        );
        let text = String::from_utf8(out.text).unwrap();
        let pid: u32 = text
            .split("(pid ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {text:?}"));
        assert!(
            !exists(pid),
            "cell process {pid} was left running or unreaped"
        );
        assert!(!options.socket.exists(), "the socket is removed");
    }

    #[test]
    fn cpus_beyond_the_cpu_set_are_refused_before_spawning() {
        let mut system = sleeper_system();
        let limit = CpuSet::count();
        system.cells[0].cpus = vec![0, limit];
        let socket = socket_path("cpu-range");
        let cell = &system.cells[0];
        match spawn_cell(cell, cell.command.as_ref().unwrap(), &socket) {
            Err(RunError::CpuOutOfRange {
                cell,
                cpu,
                limit: l,
            }) => {
                assert_eq!((cell.as_str(), cpu, l), ("sleeper", limit, limit));
            }
            other => panic!("expected CpuOutOfRange, got {other:?}"),
        }
    }

    #[test]
    fn a_program_that_cannot_be_executed_is_a_spawn_error() {
        // (Under a root hypervisor through the relay: the exec fails in the namespace and
        // the relay ends with the program, so `spawn` returns the exec error.)
        let system = sleeper_system();
        let cell = &system.cells[0];
        let argv = vec!["/".to_string()];
        match spawn_cell(cell, &argv, &socket_path("no-exec")) {
            Err(RunError::Spawn { cell, source, .. }) => {
                assert_eq!(cell, "sleeper");
                assert_eq!(source.kind(), io::ErrorKind::PermissionDenied, "{source}");
            }
            other => panic!("expected a spawn error, got {other:?}"),
        }
    }

    #[test]
    fn kill_and_reap_kills_and_reaps_live_cells() {
        let system = sleeper_system();
        let socket = socket_path("kill-reap");
        let mut server =
            ControlServer::bind(&system, &socket, &mut crate::control::device_model).unwrap();
        let cell = &system.cells[0];
        let child = spawn_cell(cell, cell.command.as_ref().unwrap(), &socket).unwrap();
        let pid = child.id();
        server.cell_spawned(&cell.name, pid);
        let mut spawned = vec![Spawned {
            cell: cell.name.clone(),
            pidfd: None,
            child,
            pipes: Vec::new(),
            exit: None,
            exited_before_stop: false,
            stopped_on_request: false,
        }];
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut d = display(&mut out, &mut err, Output::Log);
        kill_and_reap(&mut server, &mut spawned, &mut d);
        assert_eq!(
            spawned[0].exit,
            Some(CellExit::Signal(Signal::SIGKILL as i32))
        );
        assert!(!exists(pid), "process {pid} is reaped");
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("cell sleeper: process"), "{text}");
        assert_eq!(
            server.status().cells[0].exit,
            Some(CellExit::Signal(Signal::SIGKILL as i32))
        );
    }
}
