//! The checks behind [`SystemConfig::validate`]: every problem is collected, none stops the rest.

use std::collections::{BTreeMap, HashMap, HashSet};

use ivshmem_dev::layout::{LayoutError, LayoutParams, SharedMemoryLayout};

use crate::device::MAX_MSIX_VECTORS;

use super::{
    default_control_socket, CellConfig, CellKind, CellLink, CellTable, ConfigErrors, InterruptMode,
    LinkConfig, LinkTable, Problem, ProblemKind, SizeSpec, SystemConfig, ValidConfig, MAX_PEERS,
    MAX_SOCKET_PATH, PAGE_SIZE, PROTOCOL_NAMES,
};

const NAME_RULE: &str =
    "use 1 to 64 characters: letters, digits, '-', '_' or '.', starting with a letter or digit";

/// Whether `name` is a usable system, cell or link name.
fn name_is_valid(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `cells[0] "rtos"` or `cells[0]` when the cell has no usable name.
fn cell_location(index: usize, cell: &CellTable) -> String {
    match cell.name.as_deref() {
        Some(name) if !name.is_empty() => format!("cells[{index}] \"{name}\""),
        _ => format!("cells[{index}]"),
    }
}

fn link_location(index: usize, link: &LinkTable) -> String {
    match link.name.as_deref() {
        Some(name) if !name.is_empty() => format!("links[{index}] \"{name}\""),
        _ => format!("links[{index}]"),
    }
}

/// Renders CPU numbers as ranges: `0-3, 6`.
pub(super) fn cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(", ")
}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn error(
        &mut self,
        kind: ProblemKind,
        location: String,
        message: String,
        fix: impl Into<String>,
    ) {
        self.problems
            .push(Problem::error(kind, location, message, fix));
    }

    fn warning(
        &mut self,
        kind: ProblemKind,
        location: String,
        message: String,
        fix: impl Into<String>,
    ) {
        self.problems
            .push(Problem::warning(kind, location, message, fix));
    }

    fn missing(&mut self, location: String, field: &str, fix: impl Into<String>) {
        self.error(
            ProblemKind::MissingField,
            location,
            format!("missing field `{field}`"),
            fix,
        );
    }

    /// Checks a name that must be present and valid; returns it if usable.
    fn name(&mut self, location: &str, name: Option<&str>, example: &str) -> Option<String> {
        let location = format!("{location} .name");
        match name {
            None => {
                self.missing(location, "name", format!("add name = \"{example}\""));
                None
            }
            Some(name) if !name_is_valid(name) => {
                let what = if name.is_empty() {
                    "the name is empty".to_owned()
                } else {
                    format!("invalid name \"{name}\"")
                };
                self.error(ProblemKind::InvalidName, location, what, NAME_RULE);
                None
            }
            Some(name) => Some(name.to_owned()),
        }
    }

    /// Reports `name` if an earlier entry of `table` (`"cells"`/`"links"`) already uses it;
    /// otherwise remembers it in `seen` as used by entry `index`. `kind` says which problem
    /// and `entry` names the thing ("cell", "link") in the message and the fix.
    #[allow(clippy::too_many_arguments)]
    fn unique_name<'a>(
        &mut self,
        seen: &mut HashMap<&'a str, usize>,
        kind: ProblemKind,
        location: &str,
        name: &'a str,
        index: usize,
        table: &str,
        entry: &str,
    ) {
        if let Some(&first) = seen.get(name) {
            self.error(
                kind,
                format!("{location} .name"),
                format!("{entry} name \"{name}\" is already used by {table}[{first}]"),
                format!("give every {entry} a unique name"),
            );
        } else {
            seen.insert(name, index);
        }
    }

    /// Parses an optional size; reports unparsable text. `None` when absent or unparsable.
    fn size(&mut self, location: String, size: Option<&SizeSpec>) -> Option<Result<u64, ()>> {
        let size = size?;
        match size.bytes() {
            Ok(bytes) => Some(Ok(bytes)),
            Err(message) => {
                self.error(
                    ProblemKind::InvalidValue,
                    location,
                    message,
                    "write a number of bytes or a string such as \"4K\", \"64KiB\" or \"1M\"",
                );
                Some(Err(()))
            }
        }
    }

    /// Reports a size that is not a multiple of the page size, with a multiple near it as the
    /// fix when one `fits` (rounded up, else down); a size too large to round into a valid
    /// one gets a common size instead, so that the fix itself validates.
    fn page_aligned(
        &mut self,
        location: String,
        what: &str,
        bytes: u64,
        fits: impl Fn(u64) -> bool,
    ) -> bool {
        if bytes % PAGE_SIZE == 0 {
            return true;
        }
        let down = bytes - bytes % PAGE_SIZE;
        let example = [down.checked_add(PAGE_SIZE), Some(down)]
            .into_iter()
            .flatten()
            .find(|&size| size > 0 && fits(size));
        let fix = match example {
            Some(size) => format!("round it to a multiple of 4K, e.g. {size:#x}"),
            None => "use a page multiple that fits, e.g. \"64K\"".to_owned(),
        };
        self.error(
            ProblemKind::InvalidSize,
            location,
            format!(
                "{what} {bytes:#x} ({}) is not a multiple of the page size ({PAGE_SIZE:#x})",
                byte_count(bytes)
            ),
            fix,
        );
        false
    }
}

pub(super) fn validate(
    config: &SystemConfig,
    cpu_count: Option<usize>,
) -> Result<ValidConfig, ConfigErrors> {
    let mut check = Checker {
        problems: Vec::new(),
    };

    // [system]
    let (system_name, control_socket, allow_shared_cpus) = match &config.system {
        None => {
            check.missing(
                "system".to_owned(),
                "system",
                "add a [system] table with name = \"my-system\"",
            );
            (None, None, false)
        }
        Some(system) => (
            check.name("system", system.name.as_deref(), "my-system"),
            system.control_socket.clone(),
            system.allow_shared_cpus,
        ),
    };
    let (control_socket, control_socket_is_default) = match control_socket {
        Some(path) => (Some(path), false),
        None => (system_name.as_deref().map(default_control_socket), true),
    };
    if let Some(path) = &control_socket {
        check_socket_path(&mut check, path, control_socket_is_default);
    }

    // [[cells]]
    let cells = check_cells(&mut check, config, allow_shared_cpus);
    if let Some(cpu_count) = cpu_count {
        check.problems.extend(check_cpus_exist(config, cpu_count));
    }

    // [[links]]
    let links = check_links(&mut check, config);

    let cells: Option<Vec<CellConfig>> = cells.into_iter().collect();
    let links: Option<Vec<LinkConfig>> = links.into_iter().collect();

    // Cells on no link (by name, so it is reported even when a link has errors). One set of
    // every peer name: linear in cells + peers (a scan of every link per cell was quadratic).
    let on_links: HashSet<&str> = config
        .links
        .iter()
        .flat_map(|link| link.peers.iter().flatten())
        .map(String::as_str)
        .collect();
    for (index, cell) in config.cells.iter().enumerate() {
        let Some(name) = cell.name.as_deref().filter(|name| name_is_valid(name)) else {
            continue;
        };
        if !on_links.contains(name) {
            check.warning(
                ProblemKind::CellWithoutLink,
                format!("cells[{index}] \"{name}\""),
                "the cell is not a peer of any link".to_owned(),
                "add it to a link's peers, or remove the cell if it is not needed",
            );
        }
    }

    if check.problems.iter().any(Problem::is_error) {
        return Err(ConfigErrors {
            problems: check.problems,
        });
    }
    // No error means every part resolved.
    let (Some(name), Some(control_socket), Some(mut cells), Some(links)) =
        (system_name, control_socket, cells, links)
    else {
        unreachable!("validation found no error but a part did not resolve");
    };
    for (link_index, link) in links.iter().enumerate() {
        for (peer_id, &cell) in link.peer_cells.iter().enumerate() {
            cells[cell].links.push(CellLink {
                link: link_index,
                peer_id: peer_id as u16,
            });
        }
    }
    Ok(ValidConfig {
        name,
        control_socket,
        control_socket_is_default,
        allow_shared_cpus,
        cells,
        links,
        warnings: check.problems,
    })
}

fn check_socket_path(check: &mut Checker, path: &std::path::Path, is_default: bool) {
    let location = if is_default {
        "system .control_socket (default)".to_owned()
    } else {
        "system .control_socket".to_owned()
    };
    let length = path.as_os_str().len();
    if length == 0 {
        check.error(
            ProblemKind::InvalidSocketPath,
            location,
            "the control socket path is empty".to_owned(),
            "give a path, or remove the key to use the default",
        );
    } else if length > MAX_SOCKET_PATH {
        check.error(
            ProblemKind::InvalidSocketPath,
            location,
            format!(
                "the control socket path {} is {length} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}",
                path.display()
            ),
            "choose a shorter path (control_socket = \"/run/...\") or a shorter system name",
        );
    }
}

/// Checks every cell; `None` entries are cells with errors.
fn check_cells(
    check: &mut Checker,
    config: &SystemConfig,
    allow_shared_cpus: bool,
) -> Vec<Option<CellConfig>> {
    if config.cells.is_empty() {
        check.error(
            ProblemKind::NoCells,
            "cells".to_owned(),
            "the system has no cells".to_owned(),
            "add at least one [[cells]] table with name, cpus and command",
        );
    }
    let mut first_by_name: HashMap<&str, usize> = HashMap::new();
    // CPU -> first cell (index) that uses it.
    let mut cpu_owner: BTreeMap<usize, usize> = BTreeMap::new();
    let mut resolved = Vec::with_capacity(config.cells.len());

    for (index, cell) in config.cells.iter().enumerate() {
        let location = cell_location(index, cell);
        let errors_before = check.problems.len();

        let name = check.name(&location, cell.name.as_deref(), "my-cell");
        if let Some(name) = cell.name.as_deref().filter(|_| name.is_some()) {
            let kind = ProblemKind::DuplicateCellName;
            check.unique_name(
                &mut first_by_name,
                kind,
                &location,
                name,
                index,
                "cells",
                "cell",
            );
        }

        let kind = match cell.kind.as_deref() {
            None | Some("process") => Some(CellKind::Process),
            Some("kvm") => Some(CellKind::Kvm),
            Some(other) => {
                check.error(
                    ProblemKind::InvalidValue,
                    format!("{location} .kind"),
                    format!("unknown cell kind \"{other}\""),
                    "write kind = \"process\" or kind = \"kvm\"",
                );
                None
            }
        };

        let cpus = match &cell.cpus {
            None => {
                check.missing(
                    format!("{location} .cpus"),
                    "cpus",
                    "add cpus = [N] with the CPU numbers this cell owns",
                );
                None
            }
            Some(cpus) if cpus.is_empty() => {
                check.error(
                    ProblemKind::EmptyCpus,
                    format!("{location} .cpus"),
                    "the CPU list is empty".to_owned(),
                    "give the cell at least one CPU, e.g. cpus = [1]",
                );
                None
            }
            Some(cpus) => {
                // Sets, not list scans: a cell may list thousands of CPUs.
                let mut seen = Vec::with_capacity(cpus.len());
                let mut seen_set = HashSet::with_capacity(cpus.len());
                let mut twice = Vec::new();
                let mut twice_set = HashSet::new();
                for &cpu in cpus {
                    if !seen_set.insert(cpu) {
                        if twice_set.insert(cpu) {
                            twice.push(cpu);
                        }
                    } else {
                        seen.push(cpu);
                    }
                }
                for cpu in &twice {
                    check.error(
                        ProblemKind::DuplicateCpu,
                        format!("{location} .cpus"),
                        format!("CPU {cpu} is listed more than once"),
                        "list each CPU once",
                    );
                }
                for &cpu in &seen {
                    match cpu_owner.get(&cpu) {
                        Some(&owner) => {
                            let owner_location = cell_location(owner, &config.cells[owner]);
                            if allow_shared_cpus {
                                check.warning(
                                    ProblemKind::SharedCpus,
                                    format!("{location} .cpus"),
                                    format!("CPU {cpu} is shared with {owner_location}"),
                                    "cells on shared CPUs are not isolated; give each cell its own CPUs on a machine with enough of them",
                                );
                            } else {
                                check.error(
                                    ProblemKind::OverlappingCpus,
                                    format!("{location} .cpus"),
                                    format!("CPU {cpu} is also given to {owner_location}; a CPU belongs to one cell only"),
                                    "give each cell its own CPUs (or set allow_shared_cpus = true in [system] for a development machine)",
                                );
                            }
                        }
                        None => {
                            cpu_owner.insert(cpu, index);
                        }
                    }
                }
                twice.is_empty().then_some(seen)
            }
        };

        let args = cell.args.clone().unwrap_or_default();
        let mut memory = None;
        match kind {
            Some(CellKind::Process) => {
                match cell.command.as_deref() {
                    None => check.missing(
                        format!("{location} .command"),
                        "command",
                        "a process cell needs command = \"path/to/program\"",
                    ),
                    Some(command) if command.trim().is_empty() => check.error(
                        ProblemKind::InvalidValue,
                        format!("{location} .command"),
                        "the command is empty".to_owned(),
                        "write the program to run, e.g. command = \"target/release/examples/telemetry_producer\"",
                    ),
                    Some(_) => {}
                }
                for (field, present) in [
                    ("memory", cell.memory.is_some()),
                    ("image", cell.image.is_some()),
                    ("cmdline", cell.cmdline.is_some()),
                ] {
                    if present {
                        check.error(
                            ProblemKind::FieldNotForKind,
                            format!("{location} .{field}"),
                            format!("`{field}` is only for kvm cells; this is a process cell"),
                            format!("remove `{field}`, or set kind = \"kvm\""),
                        );
                    }
                }
            }
            Some(CellKind::Kvm) => {
                match check.size(format!("{location} .memory"), cell.memory.as_ref()) {
                    None => check.missing(
                        format!("{location} .memory"),
                        "memory",
                        "a kvm cell needs memory = \"16M\" (guest memory size)",
                    ),
                    Some(Ok(0)) => check.error(
                        ProblemKind::InvalidSize,
                        format!("{location} .memory"),
                        "guest memory size is 0".to_owned(),
                        "give the guest memory, e.g. memory = \"16M\"",
                    ),
                    Some(Ok(bytes)) => {
                        if check.page_aligned(
                            format!("{location} .memory"),
                            "guest memory size",
                            bytes,
                            |_| true,
                        ) {
                            memory = Some(bytes);
                        }
                    }
                    Some(Err(())) => {}
                }
                match &cell.image {
                    None => check.missing(
                        format!("{location} .image"),
                        "image",
                        "a kvm cell needs image = \"path/to/image.bin\"",
                    ),
                    Some(image) if image.as_os_str().is_empty() => check.error(
                        ProblemKind::InvalidValue,
                        format!("{location} .image"),
                        "the image path is empty".to_owned(),
                        "write the path of the bare-metal image to load",
                    ),
                    Some(_) => {}
                }
                if let Some(cmdline) = &cell.cmdline {
                    if cmdline.len() > crate::kvm::layout::CMDLINE_MAX || cmdline.contains('\0') {
                        check.error(
                            ProblemKind::InvalidValue,
                            format!("{location} .cmdline"),
                            format!(
                                "the command line has {} bytes; the image's area holds {} and a NUL",
                                cmdline.len(),
                                crate::kvm::layout::CMDLINE_MAX
                            ),
                            "shorten the command line (no NUL bytes)",
                        );
                    }
                }
                if let Some(cpus) = &cell.cpus {
                    if cpus.len() > 1 {
                        check.error(
                            ProblemKind::InvalidValue,
                            format!("{location} .cpus"),
                            format!("a kvm cell runs one vCPU; {} CPUs were given", cpus.len()),
                            "give the kvm cell one CPU, e.g. cpus = [1]",
                        );
                    }
                }
                for (field, present) in [
                    ("command", cell.command.is_some()),
                    ("args", cell.args.is_some()),
                    ("uid", cell.uid.is_some()),
                ] {
                    if present {
                        check.error(
                            ProblemKind::FieldNotForKind,
                            format!("{location} .{field}"),
                            format!("`{field}` is only for process cells; this is a kvm cell"),
                            format!("remove `{field}`, or set kind = \"process\""),
                        );
                    }
                }
            }
            None => {}
        }

        let had_error = check.problems[errors_before..]
            .iter()
            .any(Problem::is_error);
        resolved.push(match (name, kind, cpus) {
            (Some(name), Some(kind), Some(cpus)) if !had_error => Some(CellConfig {
                name,
                kind,
                cpus,
                command: (kind == CellKind::Process)
                    .then(|| cell.command.clone().unwrap_or_default()),
                args: if kind == CellKind::Process {
                    args
                } else {
                    Vec::new()
                },
                memory,
                uid: cell.uid.filter(|_| kind == CellKind::Process),
                image: if kind == CellKind::Kvm {
                    cell.image.clone()
                } else {
                    None
                },
                cmdline: cell.cmdline.clone().unwrap_or_default(),
                links: Vec::new(),
            }),
            _ => None,
        });
    }
    resolved
}

/// Every CPU a cell names must exist on a machine with `cpu_count` CPUs.
pub(super) fn check_cpus_exist(config: &SystemConfig, cpu_count: usize) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (index, cell) in config.cells.iter().enumerate() {
        let Some(cpus) = &cell.cpus else { continue };
        let missing: Vec<usize> = cpus
            .iter()
            .copied()
            .filter(|&cpu| cpu >= cpu_count)
            .collect();
        if missing.is_empty() {
            continue;
        }
        let available = if cpu_count == 0 {
            "none".to_owned()
        } else {
            cpu_list(&(0..cpu_count).collect::<Vec<_>>())
        };
        problems.push(Problem::error(
            ProblemKind::CpuOutOfRange,
            format!("{} .cpus", cell_location(index, cell)),
            format!(
                "CPU{} {} do{} not exist on this machine, which has {cpu_count} CPU{} ({available})",
                if missing.len() == 1 { "" } else { "s" },
                cpu_list(&missing),
                if missing.len() == 1 { "es" } else { "" },
                if cpu_count == 1 { "" } else { "s" },
            ),
            format!("use CPUs in {available}, or run on a machine with more CPUs"),
        ));
    }
    problems
}

/// How many cell names the fix for an unknown peer lists.
const KNOWN_CELLS_SHOWN: usize = 16;

/// Where the first link appears in KVM peers unless `address` says otherwise (Jailhouse's x86
/// ivshmem demo uses this address).
const DEFAULT_LINK_ADDRESS: u64 = 0x3F0F_0000;

/// Checks every link; `None` entries are links with errors.
fn check_links(check: &mut Checker, config: &SystemConfig) -> Vec<Option<LinkConfig>> {
    let known_cells: Vec<&str> = config
        .cells
        .iter()
        .filter_map(|cell| cell.name.as_deref())
        .filter(|name| name_is_valid(name))
        .collect();
    // Cell name -> index of its first table: one lookup per peer instead of a scan of the
    // cells (peers x cells was quadratic for systems with many cells and links).
    let mut cell_by_name: HashMap<&str, usize> = HashMap::with_capacity(config.cells.len());
    for (index, cell) in config.cells.iter().enumerate() {
        if let Some(name) = cell.name.as_deref() {
            cell_by_name.entry(name).or_insert(index);
        }
    }
    // The fix for an unknown peer names the cells, but at most a few of them: one fix per
    // unknown peer listing every cell would be quadratic in output.
    let known_cells_hint = if known_cells.is_empty() {
        "define the cell in a [[cells]] table".to_owned()
    } else if known_cells.len() <= KNOWN_CELLS_SHOWN {
        format!("use one of the cells: {}", known_cells.join(", "))
    } else {
        format!(
            "use one of the cells: {}, ... ({} more)",
            known_cells[..KNOWN_CELLS_SHOWN].join(", "),
            known_cells.len() - KNOWN_CELLS_SHOWN
        )
    };
    let mut first_by_name: HashMap<&str, usize> = HashMap::new();
    let mut resolved = Vec::with_capacity(config.links.len());
    // Default guest-physical address of the next link in KVM peers.
    let mut next_address: u64 = DEFAULT_LINK_ADDRESS;

    for (index, link) in config.links.iter().enumerate() {
        let location = link_location(index, link);
        let errors_before = check.problems.len();

        let name = check.name(&location, link.name.as_deref(), "my-link");
        if let Some(name) = link.name.as_deref().filter(|_| name.is_some()) {
            let kind = ProblemKind::DuplicateLinkName;
            check.unique_name(
                &mut first_by_name,
                kind,
                &location,
                name,
                index,
                "links",
                "link",
            );
        }

        // Peers.
        let mut peer_cells = Vec::new();
        let peer_count = match &link.peers {
            None => {
                check.missing(
                    format!("{location} .peers"),
                    "peers",
                    "add peers = [\"cell-a\", \"cell-b\"] (cell names in peer-ID order)",
                );
                None
            }
            Some(peers) if peers.len() > MAX_PEERS => {
                // Reported alone: per-peer checks of a list this long would only flood.
                check.error(
                    ProblemKind::TooManyPeers,
                    format!("{location} .peers"),
                    format!(
                        "a link supports at most {MAX_PEERS} peers, this one has {}",
                        peers.len()
                    ),
                    "split the cells over several links",
                );
                Some(peers.len())
            }
            Some(peers) => {
                let mut first_position: HashMap<&str, usize> = HashMap::new();
                for (position, peer) in peers.iter().enumerate() {
                    let peer_location = format!("{location} .peers[{position}]");
                    if let Some(&first) = first_position.get(peer.as_str()) {
                        check.error(
                            ProblemKind::DuplicatePeer,
                            peer_location,
                            format!("cell \"{peer}\" is already peer {first} of this link"),
                            "list each cell once; a cell has one peer ID per link",
                        );
                    } else if let Some(&cell) = cell_by_name.get(peer.as_str()) {
                        first_position.insert(peer, position);
                        peer_cells.push(cell);
                    } else {
                        first_position.insert(peer, position);
                        check.error(
                            ProblemKind::UnknownCell,
                            peer_location,
                            format!("there is no cell called \"{peer}\""),
                            known_cells_hint.clone(),
                        );
                    }
                }
                if peers.len() < 2 {
                    check.error(
                        ProblemKind::TooFewPeers,
                        format!("{location} .peers"),
                        format!(
                            "a link needs at least 2 peers, this one has {}",
                            peers.len()
                        ),
                        "list at least two cells in peers",
                    );
                }
                Some(peers.len())
            }
        };

        // Protocol.
        let protocol = match &link.protocol {
            None => {
                check.missing(
                    format!("{location} .protocol"),
                    "protocol",
                    "add protocol = \"ethernet\", \"telemetry\" or a number such as 0x4002",
                );
                None
            }
            Some(spec) => match spec.value() {
                Ok(value) => Some(value),
                Err(message) => {
                    let names: Vec<&str> = PROTOCOL_NAMES.iter().map(|(n, _)| *n).collect();
                    check.error(
                        ProblemKind::InvalidProtocol,
                        format!("{location} .protocol"),
                        message,
                        format!(
                            "use a name ({}) or a number in 0x0000..=0xFFFF (user-defined: 0x4000..=0x7FFF)",
                            names.join(", ")
                        ),
                    );
                    None
                }
            },
        };
        if let Some(value @ 0x0002..=0x3FFF) = protocol {
            check.warning(
                ProblemKind::ReservedProtocol,
                format!("{location} .protocol"),
                format!("protocol {value:#06x} is in the range the specification reserves (0x0002..=0x3FFF)"),
                "use a user-defined protocol (0x4000..=0x7FFF) for your own traffic",
            );
        }
        if let (Some(0x0001), Some(count)) = (protocol, peer_count) {
            if count != 2 {
                check.warning(
                    ProblemKind::ProtocolPeerCount,
                    format!("{location} .protocol"),
                    format!("ethernet links are point-to-point (ivshmem-net expects 2 peers), this one has {count}"),
                    "use one ethernet link per pair of cells",
                );
            }
        }

        // Sizes.
        let state_table_size = match check.size(
            format!("{location} .state_table_size"),
            link.state_table_size.as_ref(),
        ) {
            None => Some(PAGE_SIZE),
            Some(Ok(0)) => {
                check.error(
                    ProblemKind::InvalidSize,
                    format!("{location} .state_table_size"),
                    "the state table size is 0; it must hold 4 bytes per peer".to_owned(),
                    "use state_table_size = \"4K\" (one page, enough for 1024 peers)",
                );
                None
            }
            Some(Ok(bytes)) => {
                // One error per key: the first rule the size breaks (each fix mends the rest).
                let location = format!("{location} .state_table_size");
                if let Some(count) = peer_count.filter(|&c| bytes < 4 * c as u64) {
                    check.error(
                        ProblemKind::InvalidSize,
                        location,
                        format!(
                            "the state table ({}) cannot hold 4 bytes for each of the {count} peers ({} bytes)",
                            byte_count(bytes),
                            4 * count
                        ),
                        "use state_table_size = \"4K\"",
                    );
                    None
                } else if bytes > u64::from(u32::MAX) {
                    check.error(
                        ProblemKind::InvalidSize,
                        location,
                        format!("the state table size {bytes:#x} does not fit the device's 32-bit field"),
                        "use state_table_size = \"4K\"",
                    );
                    None
                } else {
                    check
                        .page_aligned(location, "the state table size", bytes, |size| {
                            size <= u64::from(u32::MAX)
                        })
                        .then_some(bytes)
                }
            }
            Some(Err(())) => None,
        };
        // A rounded size is suggested only when the link can still be laid out with it.
        let layout_peers = peer_count
            .filter(|count| (2..=MAX_PEERS).contains(count))
            .unwrap_or(2);
        let state_or_default = state_table_size.unwrap_or(PAGE_SIZE);
        let fits = |rw: u64, output: u64| {
            compute_layout(layout_peers, state_or_default, rw, output)
                .is_ok_and(|layout| link_end(next_address, layout.total_size()).is_some())
        };
        let rw_size = match check.size(format!("{location} .rw_size"), link.rw_size.as_ref()) {
            None => Some(0),
            Some(Ok(bytes)) => check
                .page_aligned(
                    format!("{location} .rw_size"),
                    "the R/W section size",
                    bytes,
                    |rw| fits(rw, 0),
                )
                .then_some(bytes),
            Some(Err(())) => None,
        };
        let output_size = match check.size(
            format!("{location} .output_size"),
            link.output_size.as_ref(),
        ) {
            None => {
                check.missing(
                    format!("{location} .output_size"),
                    "output_size",
                    "add output_size = \"64K\" (each peer's output section)",
                );
                None
            }
            Some(Ok(bytes)) => check
                .page_aligned(
                    format!("{location} .output_size"),
                    "the output section size",
                    bytes,
                    |output| fits(rw_size.unwrap_or(0), output),
                )
                .then_some(bytes),
            Some(Err(())) => None,
        };
        if let (Some(0), Some(0)) = (rw_size, output_size) {
            check.error(
                ProblemKind::InvalidSize,
                format!("{location} .output_size"),
                "output_size and rw_size are both 0: the link has no memory to carry data (output size 0 is allowed only with an R/W section)".to_owned(),
                "give each peer an output section, e.g. output_size = \"64K\"",
            );
        }

        // Interrupts: MSI-X is what Jailhouse offers on x86, so it is the default for links
        // with a KVM cell.
        let kvm_peer = peer_cells
            .iter()
            .any(|&cell| config.cells[cell].kind.as_deref() == Some("kvm"));
        let kind = link
            .interrupts
            .as_deref()
            .unwrap_or(if kvm_peer { "msix" } else { "intx" });
        let interrupts = match kind {
            "intx" => {
                if link.vectors.is_some_and(|n| n != 1) {
                    check.error(
                        ProblemKind::InvalidVectors,
                        format!("{location} .vectors"),
                        "INTx has exactly one vector (0)".to_owned(),
                        "remove vectors, or set interrupts = \"msix\"",
                    );
                }
                Some(InterruptMode::Intx)
            }
            _ if kind.eq_ignore_ascii_case("msix") || kind.eq_ignore_ascii_case("msi-x") => {
                match link.vectors {
                    None => Some(InterruptMode::Msix { vectors: 1 }),
                    Some(n) => match u16::try_from(n) {
                        Ok(vectors) if (1..=MAX_MSIX_VECTORS).contains(&vectors) => {
                            Some(InterruptMode::Msix { vectors })
                        }
                        _ => {
                            check.error(
                                ProblemKind::InvalidVectors,
                                format!("{location} .vectors"),
                                format!(
                                    "{n} vectors: the device offers 1 to {MAX_MSIX_VECTORS} MSI-X vectors per peer"
                                ),
                                "use vectors = 1 up to 16 (Jailhouse's x86 demo uses 16)",
                            );
                            None
                        }
                    },
                }
            }
            other => {
                check.error(
                    ProblemKind::UnsupportedInterrupts,
                    format!("{location} .interrupts"),
                    format!("unknown interrupt kind \"{other}\""),
                    "use interrupts = \"msix\" (with vectors = 1..16) or \"intx\"",
                );
                None
            }
        };

        // Layout (only when every input is valid).
        let layout = match (peer_count, state_table_size, rw_size, output_size) {
            (Some(count), Some(st), Some(rw), Some(out)) if (2..=MAX_PEERS).contains(&count) => {
                match compute_layout(count, st, rw, out) {
                    Ok(layout) => Some(layout),
                    Err(error) => {
                        check.error(
                            ProblemKind::InvalidSize,
                            format!("{location} .{}", error.parameter()),
                            format!("the device cannot lay out this link: {error}"),
                            "use smaller sections",
                        );
                        None
                    }
                }
            }
            _ => None,
        };

        let default_bdf =
            crate::kvm::Bdf::new(1, 0x0e + index as u16 % 0x12, 0).expect("device number below 32");
        let bdf = match link.bdf.as_deref().map(str::parse::<crate::kvm::Bdf>) {
            None => Some(default_bdf),
            Some(Ok(bdf)) => Some(bdf),
            Some(Err(e)) => {
                check.error(
                    ProblemKind::InvalidValue,
                    format!("{location} .bdf"),
                    e.to_string(),
                    "write e.g. bdf = \"01:0e.0\"",
                );
                None
            }
        };
        let address = match check.size(format!("{location} .address"), link.address.as_ref()) {
            None => Some(next_address),
            Some(Ok(a)) if a % PAGE_SIZE == 0 && a >= crate::kvm::layout::EXTRA_MEMORY_START => {
                Some(a)
            }
            Some(Ok(a)) => {
                check.error(
                    ProblemKind::InvalidValue,
                    format!("{location} .address"),
                    format!("{a:#x} is not a page-aligned address above the communication region"),
                    "use a 4 KiB-aligned address at or above 0x101000, e.g. address = \"0x3f0f0000\"",
                );
                None
            }
            Some(Err(())) => None,
        };
        if let (Some(a), Some(l)) = (address, layout.as_ref()) {
            match link_end(a, l.total_size()) {
                Some(end) => next_address = end,
                None => check.error(
                    ProblemKind::InvalidSize,
                    format!("{location} .output_size"),
                    format!(
                        "the link's {:#x} bytes at address {a:#x} end beyond the 64-bit address space",
                        l.total_size()
                    ),
                    "use smaller sections, e.g. output_size = \"64K\"",
                ),
            }
        }

        let had_error = check.problems[errors_before..]
            .iter()
            .any(Problem::is_error);
        resolved.push(
            match (
                name,
                &link.peers,
                protocol,
                state_table_size,
                rw_size,
                output_size,
                interrupts,
                layout,
            ) {
                (
                    Some(name),
                    Some(peers),
                    Some(protocol),
                    Some(st),
                    Some(rw),
                    Some(out),
                    Some(interrupts),
                    Some(layout),
                ) if !had_error => Some(LinkConfig {
                    name,
                    peers: peers.clone(),
                    peer_cells,
                    protocol,
                    state_table_size: st,
                    rw_size: rw,
                    output_size: out,
                    interrupts,
                    layout,
                    bdf: bdf.unwrap_or(default_bdf),
                    address: address.unwrap_or(next_address),
                }),
                _ => None,
            },
        );
    }
    resolved
}

/// Where the next link may start after one of `size` bytes at `address` (the next MiB), or
/// `None` when that is beyond 64 bits.
fn link_end(address: u64, size: u64) -> Option<u64> {
    address.checked_add(size)?.checked_next_multiple_of(1 << 20)
}

/// `1 byte`, `2 bytes`.
fn byte_count(bytes: u64) -> String {
    if bytes == 1 {
        "1 byte".to_owned()
    } else {
        format!("{bytes} bytes")
    }
}

/// Lays out a link's shared memory with ivshmem-dev's calculator. Every parameter has been
/// checked here already; a refusal would mean the two disagree, and is reported at the
/// parameter the calculator names.
fn compute_layout(
    peers: usize,
    state_table: u64,
    rw: u64,
    output: u64,
) -> Result<SharedMemoryLayout, LayoutError> {
    SharedMemoryLayout::new(LayoutParams {
        max_peers: u16::try_from(peers).unwrap_or(u16::MAX),
        state_table_size: u32::try_from(state_table).unwrap_or(u32::MAX),
        rw_size: rw,
        output_size: output,
        page_size: PAGE_SIZE,
    })
}

/// Turns a TOML parse error into a problem with line, column and (when it can be told) the
/// table it is in, e.g. `cells[1] (line 12, column 1)`.
pub(super) fn parse_problem(text: &str, error: &toml::de::Error) -> Problem {
    let message = error.message().trim().to_owned();
    let location = match error.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            // A table header names a key of the top level (`[[cell]]` is the top level's
            // key `cell`), not of the table before it.
            let line_start = before.rfind('\n').map_or(0, |at| at + 1);
            let on_header = text[line_start..].trim_start().starts_with('[');
            // A bad value names its key: `cells[0] .cpus (line 5, column 8)`.
            let bad_value = message.starts_with("invalid type")
                || message.starts_with("invalid value")
                || message.contains("cannot be negative");
            let key = bad_value
                .then(|| key_before(&text[line_start..start]))
                .flatten()
                .map_or(String::new(), |key| format!(" .{key}"));
            match table_at(before) {
                Some(_) if on_header => format!("top level (line {line}, column {column})"),
                Some(table) => format!("{table}{key} (line {line}, column {column})"),
                None if key.is_empty() => format!("line {line}, column {column}"),
                None => format!("top level{key} (line {line}, column {column})"),
            }
        }
        None => "the file".to_owned(),
    };
    let (kind, fix) = if message.starts_with("unknown field") {
        (
            ProblemKind::UnknownField,
            "remove the key or correct its spelling (the keys this table accepts are listed above)",
        )
    } else if message.starts_with("missing field") {
        (ProblemKind::MissingField, "add the missing key")
    } else if message.contains("cannot be negative") {
        (
            ProblemKind::InvalidValue,
            "write a number of bytes or a string such as \"4K\", \"64KiB\" or \"1M\"",
        )
    } else if message.starts_with("invalid type") || message.starts_with("invalid value") {
        (
            ProblemKind::InvalidValue,
            "give the key a value of the expected type",
        )
    } else {
        (ProblemKind::Syntax, "fix the TOML syntax at this position")
    };
    Problem::error(kind, location, message, fix)
}

/// The key a value on this line belongs to: `cpus` for `cpus = [0, "x"` (the line up to the
/// value), `None` when the line holds no `key =`.
fn key_before(line: &str) -> Option<&str> {
    let key = line.split_once('=')?.0.trim();
    let bare = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    (!key.is_empty() && key.chars().all(bare)).then_some(key)
}

/// The table a position is in, by the last header before it: `system`, `cells[2]`, `links[0]`.
fn table_at(before: &str) -> Option<String> {
    let mut current = None;
    let mut counts: HashMap<String, usize> = HashMap::new();
    // The error's own line is incomplete (and may be a broken header): skip it.
    let complete = before.rsplit_once('\n').map_or("", |(lines, _)| lines);
    for line in complete.lines() {
        let line = line.trim();
        if let Some(name) = line
            .strip_prefix("[[")
            .and_then(|l| l.split("]]").next())
            .filter(|name| !name.trim().is_empty())
        {
            let name = name.trim().to_owned();
            let count = counts.entry(name.clone()).or_insert(0);
            current = Some(format!("{name}[{count}]"));
            *count += 1;
        } else if let Some(name) = line
            .strip_prefix('[')
            .and_then(|l| l.split(']').next())
            .filter(|name| !name.trim().is_empty())
        {
            current = Some(name.trim().to_owned());
        }
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivshmem_dev::layout::Region;

    #[test]
    fn cpu_lists_render_as_ranges() {
        assert_eq!(cpu_list(&[3, 0, 1, 2, 6]), "0-3, 6");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[]), "");
    }

    #[test]
    fn names() {
        assert!(name_is_valid("rtos-telemetry"));
        assert!(name_is_valid("net0.a_b"));
        assert!(!name_is_valid(""));
        assert!(!name_is_valid("-x"));
        assert!(!name_is_valid("a b"));
        assert!(!name_is_valid("a/b"));
        assert!(!name_is_valid(&"a".repeat(65)));
    }

    #[test]
    fn layout_is_contiguous_and_page_aligned() {
        let layout = compute_layout(3, 0x1000, 0x2000, 0x4000).unwrap();
        let region = |offset, size| Region { offset, size };
        assert_eq!(layout.state_table(), region(0, 0x1000));
        assert_eq!(layout.rw(), region(0x1000, 0x2000));
        assert_eq!(layout.output(0), Some(region(0x3000, 0x4000)));
        assert_eq!(layout.output(1), Some(region(0x7000, 0x4000)));
        assert_eq!(layout.output(2), Some(region(0xB000, 0x4000)));
        assert_eq!(layout.output(3), None);
        assert_eq!(layout.total_size(), 0xF000);
        let error = compute_layout(2, 0x1000, u64::MAX - 0xFFF, 0x1000).unwrap_err();
        assert_eq!(error.parameter(), "rw_size");
    }

    #[test]
    fn table_context_of_a_position() {
        let text = "[system]\nname='a'\n[[cells]]\nname='x'\n[[cells]]\nfoo=1\n";
        assert_eq!(
            table_at(&text[..text.find("foo").unwrap()]),
            Some("cells[1]".into())
        );
        assert_eq!(table_at("[system]\n"), Some("system".into()));
        // A broken header on the error's own line is not taken as the context.
        assert_eq!(table_at("[system]\nname='a'\n[sy"), Some("system".into()));
        assert_eq!(table_at(""), None);
    }
}
