//! The system description: cells and links in one TOML file, and its validation.
//!
//! # File format
//!
//! ```toml
//! [system]
//! name = "telemetry"                 # required; letters, digits, '-', '_', '.'
//! # control_socket = "/tmp/t.sock"   # optional, see below
//! # allow_shared_cpus = false        # optional; true lets cells share CPUs (warning)
//!
//! [[cells]]
//! name = "rtos-telemetry"            # required, unique
//! kind = "process"                   # "process" (default) or "kvm"
//! cpus = [1]                         # required, non-empty, exclusive to this cell
//! command = "target/release/examples/telemetry_producer"   # process cells: required
//! args = ["--link", "telemetry"]     # process cells: optional
//! # memory = "1M"                    # kvm cells: required, page-aligned; RAM from 0 up to
//! #                                  # 1 MiB, the rest above the comm region (0x101000)
//! # image = "inmates/telemetry.bin"  # kvm cells: required; flat image loaded at 0
//! # cmdline = "target=1"             # kvm cells: written at 0x1000, at most 255 bytes
//!
//! [[cells]]
//! name = "linux-consumer"
//! cpus = [0]
//! command = "target/release/examples/telemetry_consumer"
//!
//! [[links]]
//! name = "telemetry"                 # required, unique
//! peers = ["rtos-telemetry", "linux-consumer"]   # cell names; position = peer ID
//! protocol = "telemetry"             # number (0..=0xFFFF) or "ethernet" / "telemetry" / "undefined"
//! state_table_size = "4K"            # default 4K; >= 4 bytes per peer, page multiple
//! rw_size = 0                        # default 0; page multiple
//! output_size = "64K"                # required; page multiple; 0 only if rw_size > 0
//! interrupts = "intx"                # "intx" or "msix"; default "msix" if a peer is a kvm
//!                                    # cell, else "intx"
//! # vectors = 16                     # msix only: vectors per peer, 1..=16 (default 1)
//! # bdf = "01:0e.0"                  # kvm peers: PCI function (default 01:0e.0, next link 01:0f.0…)
//! # address = "0x3f0f0000"           # kvm peers: guest-physical address of the link memory
//! ```
//!
//! Sizes are integers (bytes) or strings with a binary unit: `"4K"`, `"64KiB"`, `"1M"`, `"0x1000"`.
//! Relative paths (`command`, `image`, `control_socket`) are taken relative to the working
//! directory of the hypervisor; a `command` without `/` is looked up in `PATH` when it is run.
//!
//! ## The control socket
//! If `control_socket` is not given, it is [`default_control_socket`]:
//! `/run/ivshmem-stack/<system>.sock` when running as root, otherwise
//! `$XDG_RUNTIME_DIR/ivshmem-stack/<system>.sock`, or `/tmp/ivshmem-stack-<uid>/<system>.sock`
//! when `XDG_RUNTIME_DIR` is not set. The CLI's `--socket` overrides both.
//!
//! # Validation
//! [`SystemConfig::from_toml_str`] / [`SystemConfig::load`] parse the file; syntax errors,
//! unknown keys and values of the wrong type are reported there (TOML parsing stops at the
//! first one) with line and column. [`SystemConfig::validate`] then reports **every**
//! remaining problem (missing keys included), each with its location such as
//! `links[1] "net0" .peers[2]` and a fix, and on success returns a [`ValidConfig`] with
//! resolved values, peer indexes and the shared-memory layout of every link.
//! [`SystemConfig::validate_for_machine`] adds the checks that depend on the machine (CPU
//! numbers against the CPU count).

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use ivshmem_dev::layout::{Region, SharedMemoryLayout};

mod machine;
mod problem;
mod summary;
mod validate;
mod values;

pub use machine::{machine_memory, ProcessLimits, CELL_BASE_FDS, HYPERVISOR_BASE_FDS};
pub use problem::{ConfigErrors, Problem, ProblemKind, Severity};
pub use summary::Summary;
pub use values::{
    describe_protocol, human_size, parse_size, ProtocolSpec, SizeSpec, PROTOCOL_NAMES,
};

/// The page size all sections are aligned to (and the default state-table size).
pub const PAGE_SIZE: u64 = 0x1000;

/// The most peers one link may have (the device's limit).
pub const MAX_PEERS: usize = ivshmem_dev::layout::MAX_SUPPORTED_PEERS;

/// The longest path a Unix socket address can hold (`sun_path` minus the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A system configuration file as written (before validation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemConfig {
    /// The `[system]` table.
    pub system: Option<SystemTable>,
    /// The `[[cells]]` tables.
    #[serde(default)]
    pub cells: Vec<CellTable>,
    /// The `[[links]]` tables.
    #[serde(default)]
    pub links: Vec<LinkTable>,
}

/// The `[system]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemTable {
    /// The system's name (required).
    pub name: Option<String>,
    /// Where the control socket is created (default: [`default_control_socket`]).
    pub control_socket: Option<PathBuf>,
    /// Let cells share CPUs (reported as a warning instead of an error). Meant for development
    /// machines with fewer CPUs than cells; cells are then not isolated from each other.
    #[serde(default)]
    pub allow_shared_cpus: bool,
}

/// One `[[cells]]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellTable {
    /// The cell's name (required, unique).
    pub name: Option<String>,
    /// `"process"` (default) or `"kvm"`.
    pub kind: Option<String>,
    /// The CPUs the cell owns (required, non-empty).
    pub cpus: Option<Vec<usize>>,
    /// Process cells: the program to run (required).
    pub command: Option<String>,
    /// Process cells: the program's arguments.
    pub args: Option<Vec<String>>,
    /// KVM cells: guest memory size (required).
    pub memory: Option<SizeSpec>,
    /// KVM cells: the bare-metal image to load (required).
    pub image: Option<PathBuf>,
    /// KVM cells: the command line written at 0x1000 (at most 255 bytes).
    pub cmdline: Option<String>,
    /// Process cells: run the program under this user ID (its group ID the same number, no
    /// supplementary groups) when the hypervisor runs as root, so that it cannot reopen
    /// other cells' sections read-write (see [`crate::memory`]).
    pub uid: Option<u32>,
}

/// One `[[links]]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkTable {
    /// The link's name (required, unique).
    pub name: Option<String>,
    /// The peer cells' names; a cell's position is its peer ID (required, 2..=16 entries).
    pub peers: Option<Vec<String>>,
    /// The protocol number or name (required).
    pub protocol: Option<ProtocolSpec>,
    /// State-table size (default one page).
    pub state_table_size: Option<SizeSpec>,
    /// R/W section size (default 0).
    pub rw_size: Option<SizeSpec>,
    /// Size of each peer's output section (required).
    pub output_size: Option<SizeSpec>,
    /// Interrupt kind: `"intx"` or `"msix"` (default: `"msix"` when a peer is a KVM cell,
    /// else `"intx"`).
    pub interrupts: Option<String>,
    /// MSI-X vectors per peer, `1..=16` (default 1; INTx has exactly one).
    pub vectors: Option<i64>,
    /// KVM peers: the PCI function of the device, `bus:device.function` in hex (default
    /// `01:0e.0`, Jailhouse's demo; the n-th link of the file uses device 0x0e + n).
    pub bdf: Option<String>,
    /// KVM peers: guest-physical address of the link memory (default 0x3F0F0000 for the first
    /// link, the next links above it, each on a 1 MiB boundary).
    pub address: Option<SizeSpec>,
}

impl SystemConfig {
    /// Parses a configuration from TOML text. Syntax errors, unknown keys and values of the
    /// wrong type are reported with their line and column (TOML parsing stops at the first).
    pub fn from_toml_str(text: &str) -> Result<SystemConfig, ConfigErrors> {
        toml::from_str(text)
            .map_err(|error| ConfigErrors::single(validate::parse_problem(text, &error)))
    }

    /// Reads and parses a configuration file.
    pub fn load(path: impl AsRef<Path>) -> Result<SystemConfig, ConfigErrors> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| {
            let (message, fix) = match error.kind() {
                std::io::ErrorKind::InvalidData => (
                    "the file is not text (not UTF-8); a configuration is a TOML text file"
                        .to_owned(),
                    "give the path of the system's .toml file",
                ),
                std::io::ErrorKind::NotFound => (
                    format!("cannot read the configuration file: {error}"),
                    "check the path (a relative one is taken from the working directory)",
                ),
                std::io::ErrorKind::PermissionDenied => (
                    format!("cannot read the configuration file: {error}"),
                    "check the file's permissions, or run as a user who may read it",
                ),
                _ => (
                    format!("cannot read the configuration file: {error}"),
                    "check the path and its permissions",
                ),
            };
            ConfigErrors::single(Problem::error(
                ProblemKind::Io,
                path.display().to_string(),
                message,
                fix,
            ))
        })?;
        Self::from_toml_str(&text).map_err(|mut errors| {
            for problem in &mut errors.problems {
                problem.location = format!("{}: {}", path.display(), problem.location);
            }
            errors
        })
    }

    /// Checks everything that does not depend on the machine and reports every problem.
    pub fn validate(&self) -> Result<ValidConfig, ConfigErrors> {
        validate::validate(self, None)
    }

    /// Like [`validate`](Self::validate), plus the checks against a machine with `cpu_count`
    /// CPUs (numbered `0..cpu_count`), all reported together.
    pub fn validate_for_machine(&self, cpu_count: usize) -> Result<ValidConfig, ConfigErrors> {
        validate::validate(self, Some(cpu_count))
    }

    /// Only the machine check: every CPU named by a cell must be below `cpu_count`.
    /// Returns one problem per offending cell (empty when all is well).
    pub fn check_cpus_exist(&self, cpu_count: usize) -> Vec<Problem> {
        validate::check_cpus_exist(self, cpu_count)
    }
}

/// Reads, parses and validates a file; `cpu_count` adds the machine checks when given.
pub fn load_and_validate(
    path: impl AsRef<Path>,
    cpu_count: Option<usize>,
) -> Result<ValidConfig, ConfigErrors> {
    let config = SystemConfig::load(path.as_ref())?;
    match cpu_count {
        Some(count) => config.validate_for_machine(count),
        None => config.validate(),
    }
}

/// The kind of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CellKind {
    /// A Linux process that attaches over the control socket.
    Process,
    /// A KVM virtual machine running a bare-metal image (backend not implemented yet).
    Kvm,
}

impl CellKind {
    /// The name used in the file: `"process"` or `"kvm"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CellKind::Process => "process",
            CellKind::Kvm => "kvm",
        }
    }
}

/// The interrupt kind of a link (the device model's type: one thing written once).
pub use crate::device::InterruptMode;

/// A validated system: every value resolved, every cross-reference checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidConfig {
    /// The system's name.
    pub name: String,
    /// The control socket path (configured or the default).
    pub control_socket: PathBuf,
    /// Whether `control_socket` is the default rather than configured.
    pub control_socket_is_default: bool,
    /// Whether CPUs may be shared between cells.
    pub allow_shared_cpus: bool,
    /// The cells, in file order.
    pub cells: Vec<CellConfig>,
    /// The links, in file order.
    pub links: Vec<LinkConfig>,
    /// Warnings found during validation (the configuration is usable nevertheless).
    pub warnings: Vec<Problem>,
}

impl ValidConfig {
    /// The cell called `name`.
    pub fn cell(&self, name: &str) -> Option<&CellConfig> {
        self.cells.iter().find(|cell| cell.name == name)
    }

    /// The index of the cell called `name` in [`cells`](Self::cells).
    pub fn cell_index(&self, name: &str) -> Option<usize> {
        self.cells.iter().position(|cell| cell.name == name)
    }

    /// The link called `name`.
    pub fn link(&self, name: &str) -> Option<&LinkConfig> {
        self.links.iter().find(|link| link.name == name)
    }

    /// A readable summary (cells, links, layouts, warnings) for `hypervisor check`.
    pub fn summary(&self) -> Summary<'_> {
        Summary::new(self)
    }
}

/// A validated cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellConfig {
    /// The cell's name (unique in the system).
    pub name: String,
    /// Process or KVM.
    pub kind: CellKind,
    /// The CPUs the cell owns, in file order, no duplicates.
    pub cpus: Vec<usize>,
    /// Process cells: the program to run (`Some` for every process cell, `None` for KVM cells).
    pub command: Option<String>,
    /// Process cells: the program's arguments (empty for KVM cells).
    pub args: Vec<String>,
    /// KVM cells: guest memory in bytes (page multiple, non-zero); `None` for process cells.
    pub memory: Option<u64>,
    /// KVM cells: the image to load; `None` for process cells.
    pub image: Option<PathBuf>,
    /// KVM cells: the command line (empty: none); empty for process cells.
    pub cmdline: String,
    /// Process cells: the user ID its program runs under, if not the hypervisor's.
    pub uid: Option<u32>,
    /// The links this cell is a peer of, with its peer ID on each, in link order.
    pub links: Vec<CellLink>,
}

/// A cell's membership in one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CellLink {
    /// Index into [`ValidConfig::links`].
    pub link: usize,
    /// The cell's peer ID on that link.
    pub peer_id: u16,
}

/// A validated link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// The link's name (unique in the system).
    pub name: String,
    /// The peer cells' names; index = peer ID.
    pub peers: Vec<String>,
    /// The peer cells as indexes into [`ValidConfig::cells`]; index = peer ID.
    pub peer_cells: Vec<usize>,
    /// The 16-bit protocol number (PCI prog-IF/sub-class).
    pub protocol: u16,
    /// State-table size in bytes (fits in u32, page multiple, >= 4 bytes per peer).
    pub state_table_size: u64,
    /// R/W section size in bytes (page multiple, may be 0).
    pub rw_size: u64,
    /// Size of each output section in bytes (page multiple, 0 only when `rw_size` > 0).
    pub output_size: u64,
    /// The interrupt kind and vector count.
    pub interrupts: InterruptMode,
    /// Where every section lies in the link's shared memory, computed by ivshmem-dev's
    /// calculator (page size [`PAGE_SIZE`]), exactly as the device lays it out.
    pub layout: SharedMemoryLayout,
    /// Where the device appears in KVM peers' PCI config space.
    pub bdf: crate::kvm::Bdf,
    /// Guest-physical address of the link memory in KVM peers.
    pub address: u64,
}

impl LinkConfig {
    /// The number of peers (the device's MAX_PEERS register).
    pub fn max_peers(&self) -> u16 {
        // Validation caps the peer count at MAX_PEERS (16).
        self.peers.len() as u16
    }

    /// The peer ID of the cell called `cell`, if it is on this link.
    pub fn peer_id(&self, cell: &str) -> Option<u16> {
        self.peers.iter().position(|p| p == cell).map(|i| i as u16)
    }
}

/// The default control socket path for a system called `system`, for the current user and
/// environment (see the module documentation).
pub fn default_control_socket(system: &str) -> PathBuf {
    let euid = nix::unistd::geteuid().as_raw();
    let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR");
    default_control_socket_for(system, euid, runtime_dir.as_deref().map(Path::new))
}

/// The default control socket path for `system`, given the effective user ID and
/// `XDG_RUNTIME_DIR` (pure, for tests): root uses `/run/ivshmem-stack/`, other users
/// `$XDG_RUNTIME_DIR/ivshmem-stack/` or `/tmp/ivshmem-stack-<uid>/` without it.
pub fn default_control_socket_for(system: &str, euid: u32, runtime_dir: Option<&Path>) -> PathBuf {
    let file = format!("{system}.sock");
    match runtime_dir {
        _ if euid == 0 => Path::new("/run/ivshmem-stack").join(file),
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("ivshmem-stack").join(file),
        _ => PathBuf::from(format!("/tmp/ivshmem-stack-{euid}")).join(file),
    }
}

/// The number of CPUs online on this machine (CPUs are numbered `0..count`).
pub fn online_cpu_count() -> usize {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::_NPROCESSORS_ONLN) {
        Ok(Some(count)) if count > 0 => count as usize,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}
