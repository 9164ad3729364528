//! Checks of a valid configuration against the machine it is to run on, beyond the CPU count:
//! whether each process cell's command can be started, and whether the machine can back the
//! links' memory. `hypervisor check` reports them, `hypervisor run` refuses to start on them.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use nix::unistd::{access, AccessFlags};

use super::{human_size, CellKind, Problem, ProblemKind, Severity, ValidConfig};

/// Where a command named in a configuration is found, as `execvp` (and so
/// `std::process::Command`) looks for it: a name with a `/` is a path (relative ones from the
/// working directory `cwd`), a bare name is searched in `search_path` (`$PATH`).
fn resolve(command: &str, cwd: &Path, search_path: Option<&OsStr>) -> Result<PathBuf, String> {
    if command.contains('/') {
        let path = cwd.join(command);
        let relative = if Path::new(command).is_relative() {
            format!(
                " (a relative command is taken from the working directory, {})",
                cwd.display()
            )
        } else {
            String::new()
        };
        return match std::fs::metadata(&path) {
            Err(error) => Err(format!(
                "command {command} cannot be found: {error}{relative}"
            )),
            Ok(meta) if !meta.is_file() => {
                Err(format!("command {command} is not a file{relative}"))
            }
            Ok(_) if access(&path, AccessFlags::X_OK).is_err() => {
                Err(format!("command {command} is not executable{relative}"))
            }
            Ok(_) => Ok(path),
        };
    }
    let dirs = search_path.map(std::env::split_paths).into_iter().flatten();
    for dir in dirs {
        let path = cwd.join(dir).join(command);
        if path.is_file() && access(&path, AccessFlags::X_OK).is_ok() {
            return Ok(path);
        }
    }
    Err(format!(
        "command {command} is not an executable file in any directory of PATH"
    ))
}

impl ValidConfig {
    /// One problem of `severity` per process cell whose command cannot be started from the
    /// working directory `cwd` with `search_path` as `$PATH`: missing, not a file or not
    /// executable. The message says which directory a relative path was taken from.
    pub fn check_commands(
        &self,
        cwd: &Path,
        search_path: Option<&OsStr>,
        severity: Severity,
    ) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (index, cell) in self.cells.iter().enumerate() {
            let (CellKind::Process, Some(command)) = (cell.kind, &cell.command) else {
                continue;
            };
            if let Err(message) = resolve(command, cwd, search_path) {
                problems.push(Problem {
                    severity,
                    ..Problem::error(
                        ProblemKind::CommandNotFound,
                        format!("cells[{index}] \"{}\" .command", cell.name),
                        message,
                        "build the program, give its absolute path, or run from the directory \
                         relative commands are written for",
                    )
                });
            }
        }
        problems
    }

    /// An error when the control socket (`socket`, the `--socket` override, else the
    /// configured one) cannot be created in its directory: a directory that does not exist
    /// (`run` creates only the default one, never a path the user wrote), or one on procfs or
    /// sysfs, where no socket can be made. `None` when the directory looks usable.
    pub fn check_socket_dir(&self, socket: Option<&Path>) -> Option<Problem> {
        let (path, location) = match socket {
            Some(path) => (path, "--socket".to_owned()),
            None if self.control_socket_is_default => return None,
            None => (
                self.control_socket.as_path(),
                "system .control_socket".to_owned(),
            ),
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let (message, fix) = match nix::sys::statfs::statfs(dir) {
            Err(_) if !dir.is_dir() => (
                format!(
                    "the directory {} of the control socket {} does not exist",
                    dir.display(),
                    path.display()
                ),
                "create the directory first, or put the socket in an existing one (e.g. /tmp)",
            ),
            Ok(fs)
                if fs.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC
                    || fs.filesystem_type() == nix::sys::statfs::SYSFS_MAGIC =>
            {
                (
                    format!(
                        "the control socket {} is in {}, a kernel (proc/sys) file system where no socket can be created",
                        path.display(),
                        dir.display()
                    ),
                    "put the socket in a directory of a real file system (e.g. /run or /tmp)",
                )
            }
            _ => return None,
        };
        Some(Problem::error(
            ProblemKind::InvalidSocketPath,
            location,
            message,
            fix,
        ))
    }

    /// An error for each KVM cell whose image (relative to `cwd`) is an empty file: there is
    /// nothing to boot. A missing image is `run`'s to refuse (it may not be built yet).
    pub fn check_images(&self, cwd: &Path) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (index, cell) in self.cells.iter().enumerate() {
            let (CellKind::Kvm, Some(image)) = (cell.kind, &cell.image) else {
                continue;
            };
            let path = cwd.join(image);
            if std::fs::metadata(&path).is_ok_and(|meta| meta.is_file() && meta.len() == 0) {
                problems.push(Problem::error(
                    ProblemKind::InvalidValue,
                    format!("cells[{index}] \"{}\" .image", cell.name),
                    format!("the image {} is empty (0 bytes)", image.display()),
                    "build the image, or give the path of the flat binary to boot",
                ));
            }
        }
        problems
    }

    /// The bytes of shared memory the links need (every section of every link).
    pub fn link_memory(&self) -> u64 {
        self.links
            .iter()
            .map(|link| link.layout.total_size())
            .fold(0u64, u64::saturating_add)
    }

    /// An error if the links need more memory than `available` bytes (the machine's RAM and
    /// swap, see [`machine_memory`]): such sections would be created but fail when a cell
    /// maps them. Names the figures and the largest link.
    /// KVM cells' guest RAM counts too (it is allocated when `run` starts them); the error
    /// then names the KVM cell with the most.
    pub fn check_memory(&self, available: u64) -> Vec<Problem> {
        let links = self.link_memory();
        let largest_vm = self
            .cells
            .iter()
            .enumerate()
            .filter(|(_, cell)| cell.kind == CellKind::Kvm)
            .filter_map(|(index, cell)| cell.memory.map(|memory| (index, cell, memory)))
            .max_by_key(|&(_, _, memory)| memory);
        let guest = self
            .cells
            .iter()
            .filter(|cell| cell.kind == CellKind::Kvm)
            .filter_map(|cell| cell.memory)
            .fold(0u64, u64::saturating_add);
        let needed = links.saturating_add(guest);
        if needed <= available {
            return Vec::new();
        }
        if let Some((index, cell, _)) = largest_vm.filter(|_| guest > 0) {
            return vec![Problem::error(
                ProblemKind::MemoryTooLarge,
                format!("cells[{index}] \"{}\" .memory", cell.name),
                format!(
                    "the KVM cells' guest RAM ({}) and the links' shared memory ({}) need \
                     {needed:#x} bytes ({}), more than this machine's memory and swap \
                     ({available:#x} bytes, {})",
                    human_size(guest),
                    human_size(links),
                    human_size(needed),
                    human_size(available)
                ),
                "give the KVM cells less memory (or the links smaller sections), or run on a \
                 machine with more memory",
            )];
        }
        let largest = self
            .links
            .iter()
            .enumerate()
            .max_by_key(|(_, link)| link.layout.total_size());
        let location = match largest {
            Some((index, link)) => format!("links[{index}] \"{}\"", link.name),
            None => "links".to_owned(),
        };
        vec![Problem::error(
            ProblemKind::MemoryTooLarge,
            location,
            format!(
                "the links need {needed:#x} bytes ({}) of shared memory, more than this \
                 machine's memory and swap ({available:#x} bytes, {})",
                human_size(needed),
                human_size(available)
            ),
            "make the sections smaller (output_size, rw_size), or run on a machine with more memory",
        )]
    }
}

/// Open fds of the hypervisor process beside its links: standard streams, the control socket,
/// signal and stop fds, logging (an allowance, not a count).
pub const HYPERVISOR_BASE_FDS: u64 = 16;
/// Open fds of a cell process beside its links: standard streams, the control socket and its
/// watcher's copy, the watcher's stop pipe (an allowance).
pub const CELL_BASE_FDS: u64 = 8;

/// A process's limits on open fds (`RLIMIT_NOFILE`) and memory mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessLimits {
    /// The soft limit on open fds (what a process gets; `ulimit -n`).
    pub fds_soft: u64,
    /// The hard limit on open fds (how far a process may raise its soft limit).
    pub fds_hard: u64,
    /// Most memory mappings of one process (`vm.max_map_count`).
    pub max_map_count: u64,
}

impl ProcessLimits {
    /// The limits of this process (`/proc/self/limits`, `/proc/sys/vm/max_map_count`), which
    /// `hypervisor run` and the cells it spawns inherit. `None` if they cannot be read.
    pub fn of_this_process() -> Option<Self> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut fields = line["Max open files".len()..].split_whitespace();
        let mut value = || -> Option<u64> {
            match fields.next()? {
                "unlimited" => Some(u64::MAX),
                n => n.parse().ok(),
            }
        };
        let (fds_soft, fds_hard) = (value()?, value()?);
        let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(65_530);
        Some(Self {
            fds_soft,
            fds_hard,
            max_map_count,
        })
    }
}

impl ValidConfig {
    /// The fds the hypervisor holds for link `link`: a read-write and a read-only fd per
    /// section (state table, R/W section, one output section per peer) and one eventfd per
    /// peer and vector.
    pub fn link_fds(&self, link: usize) -> u64 {
        let link = &self.links[link];
        let peers = link.peers.len() as u64;
        let sections = 1 + u64::from(link.rw_size > 0) + peers * u64::from(link.output_size > 0);
        2 * sections + peers * u64::from(link.interrupts.vectors().max(1))
    }

    /// The fds the hypervisor process needs: [`HYPERVISOR_BASE_FDS`], every link's
    /// [`link_fds`](Self::link_fds), and per cell its control connection and process handle.
    pub fn hypervisor_fds(&self) -> u64 {
        let links: u64 = (0..self.links.len()).map(|i| self.link_fds(i)).sum();
        HYPERVISOR_BASE_FDS + links + 2 * self.cells.len() as u64
    }

    /// The fds and memory mappings process cell `cell` needs once attached: per link the
    /// state table, the R/W section and every output section (one fd and one mapping each)
    /// and one eventfd per peer and vector, plus [`CELL_BASE_FDS`].
    pub fn cell_needs(&self, cell: usize) -> (u64, u64) {
        let mut fds = CELL_BASE_FDS;
        let mut maps = 0;
        for membership in &self.cells[cell].links {
            let link = &self.links[membership.link];
            let peers = link.peers.len() as u64;
            let sections =
                1 + u64::from(link.rw_size > 0) + peers * u64::from(link.output_size > 0);
            fds += sections + peers * u64::from(link.interrupts.vectors().max(1));
            maps += sections;
        }
        (fds, maps)
    }

    /// Errors where the hypervisor or a process cell would need more open fds than `limits`
    /// allow, or a cell more memory mappings: each names the figures and a fix.
    pub fn check_limits(&self, limits: ProcessLimits) -> Vec<Problem> {
        let mut problems = Vec::new();
        let raise = |needed: u64| {
            if needed <= limits.fds_hard {
                format!(
                    "raise the limit before starting: ulimit -n {needed} (the hard limit allows {})",
                    limits.fds_hard
                )
            } else {
                format!(
                    "raise the hard limit to {needed} (as root: ulimit -Hn {needed}, LimitNOFILE= in a systemd unit, or /etc/security/limits.conf), or use fewer links, peers or vectors"
                )
            }
        };
        let needed = self.hypervisor_fds();
        if needed > limits.fds_soft {
            let largest = (0..self.links.len()).max_by_key(|&i| self.link_fds(i));
            let per_link = largest.map_or(String::new(), |i| {
                format!(
                    "; link \"{}\" alone needs {}",
                    self.links[i].name,
                    self.link_fds(i)
                )
            });
            problems.push(Problem::error(
                ProblemKind::FdLimit,
                "links".to_owned(),
                format!(
                    "the hypervisor needs about {needed} open fds for {} links (2 per section, 1 per peer and vector){per_link}; this process may open {} (RLIMIT_NOFILE soft limit; hard limit {})",
                    self.links.len(),
                    limits.fds_soft,
                    limits.fds_hard
                ),
                raise(needed),
            ));
        }
        let worst = (0..self.cells.len())
            .filter(|&i| self.cells[i].kind == CellKind::Process)
            .map(|i| (i, self.cell_needs(i)))
            .max_by_key(|&(_, (fds, _))| fds);
        if let Some((index, (fds, maps))) = worst {
            let name = &self.cells[index].name;
            if fds > limits.fds_soft {
                problems.push(Problem::error(
                    ProblemKind::FdLimit,
                    format!("cells[{index}] \"{name}\""),
                    format!(
                        "the cell needs about {fds} open fds for its {} links (1 per section, 1 per peer and vector); a process here may open {} (RLIMIT_NOFILE soft limit; hard limit {})",
                        self.cells[index].links.len(),
                        limits.fds_soft,
                        limits.fds_hard
                    ),
                    raise(fds),
                ));
            }
            if maps > limits.max_map_count {
                problems.push(Problem::error(
                    ProblemKind::FdLimit,
                    format!("cells[{index}] \"{name}\""),
                    format!(
                        "the cell maps {maps} sections, more than the {} memory mappings a process may have (vm.max_map_count)",
                        limits.max_map_count
                    ),
                    format!("as root: sysctl vm.max_map_count={}, or put the cell on fewer links", maps + 1024),
                ));
            }
        }
        problems
    }
}

/// This machine's RAM plus swap in bytes (`MemTotal` + `SwapTotal` of `/proc/meminfo`): the
/// most that memfd-backed sections can ever hold. `None` if it cannot be read.
pub fn machine_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    let total = kib("MemTotal:")?;
    let swap = kib("SwapTotal:").unwrap_or(0);
    Some(total.saturating_add(swap).saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_resolve_like_execvp() {
        let cwd = Path::new("/");
        assert!(resolve("/bin/sh", cwd, None).is_ok());
        assert!(resolve("bin/sh", cwd, None).is_ok(), "relative to cwd");
        assert!(resolve("sh", cwd, Some(OsStr::new("/nonexistent:/bin"))).is_ok());
        let err = resolve("sh", cwd, Some(OsStr::new("/nonexistent"))).unwrap_err();
        assert!(err.contains("PATH"), "{err}");
        let err = resolve("etc/passwd", cwd, None).unwrap_err();
        assert!(err.contains("not executable"), "{err}");
        assert!(err.contains("working directory, /"), "{err}");
        let err = resolve("/etc", cwd, None).unwrap_err();
        assert!(err.contains("not a file"), "{err}");
        assert!(!err.contains("working directory"), "absolute: {err}");
    }

    #[test]
    fn process_limits_are_read() {
        let limits = ProcessLimits::of_this_process().expect("/proc/self/limits");
        assert!(limits.fds_soft > 0 && limits.fds_soft <= limits.fds_hard);
        assert!(limits.max_map_count > 0);
    }

    #[test]
    fn machine_memory_is_read() {
        assert!(machine_memory().is_some_and(|bytes| bytes > 0));
    }
}
