//! Problems found in a system configuration: where, what, and how to fix it.

use std::fmt;

/// How serious a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    /// The system cannot start with this configuration.
    Error,
    /// The system can start, but something looks unintended.
    Warning,
}

/// What kind of problem was found (stable, for programs and tests; the message carries details).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemKind {
    /// The configuration file could not be read.
    Io,
    /// The file is not valid TOML.
    Syntax,
    /// A key the format does not know (misspelt or misplaced).
    UnknownField,
    /// A required key is absent.
    MissingField,
    /// A value has the wrong type or cannot be parsed (size, protocol, kind, ...).
    InvalidValue,
    /// A system, cell or link name is empty or uses characters that are not allowed.
    InvalidName,
    /// The system has no cells.
    NoCells,
    /// Two cells have the same name.
    DuplicateCellName,
    /// A cell has an empty CPU list.
    EmptyCpus,
    /// A CPU appears twice in one cell's list.
    DuplicateCpu,
    /// A CPU is given to more than one cell.
    OverlappingCpus,
    /// A CPU does not exist on the machine the configuration is checked for.
    CpuOutOfRange,
    /// A key that only makes sense for the other cell kind (e.g. `image` on a process cell).
    FieldNotForKind,
    /// A link names a cell that is not defined.
    UnknownCell,
    /// A cell appears twice in one link's peer list.
    DuplicatePeer,
    /// A link has fewer than two peers.
    TooFewPeers,
    /// A link has more peers than the device supports.
    TooManyPeers,
    /// A size is zero where that is not allowed, too small, too large or not page-aligned.
    InvalidSize,
    /// The interrupt kind is not supported.
    UnsupportedInterrupts,
    /// The MSI-X vector count is outside 1..=16, or given for INTx.
    InvalidVectors,
    /// The protocol is out of range or an unknown name.
    InvalidProtocol,
    /// Two links have the same name.
    DuplicateLinkName,
    /// A cell is on no link (warning).
    CellWithoutLink,
    /// The link's protocol expects a different number of peers (warning).
    ProtocolPeerCount,
    /// The protocol is in the range the specification reserves (warning).
    ReservedProtocol,
    /// CPUs are shared between cells because `allow_shared_cpus` is set (warning).
    SharedCpus,
    /// The control socket path cannot be used.
    InvalidSocketPath,
    /// A process cell's command cannot be started on this machine (machine check).
    CommandNotFound,
    /// The links need more shared memory than the machine has (machine check).
    MemoryTooLarge,
    /// The hypervisor or a cell would need more open fds, or a cell more memory mappings, than
    /// this machine's limits allow (machine check).
    FdLimit,
}

/// One problem in a configuration, with its location and a hint that would fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// The kind of problem.
    pub kind: ProblemKind,
    /// Where it is, e.g. `links[1] "net0" .peers[2]`, `cells[0] "rtos" .cpus` or `line 4, column 1`.
    pub location: String,
    /// What is wrong.
    pub message: String,
    /// What would fix it.
    pub fix: String,
}

impl Problem {
    /// An error at `location`.
    pub fn error(
        kind: ProblemKind,
        location: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            severity: Severity::Error,
            kind,
            location: location.into(),
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// A warning at `location`.
    pub fn warning(
        kind: ProblemKind,
        location: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(kind, location, message, fix)
        }
    }

    /// Whether this is an error (not a warning).
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{severity}: {}: {}", self.location, self.message)?;
        if !self.fix.is_empty() {
            write!(f, "\n  fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// Every problem found in a configuration (at least one of them an error), warnings included.
///
/// `Display` lists them all, one per paragraph, errors first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.problems))]
pub struct ConfigErrors {
    /// All problems, in the order they were found (errors and warnings mixed).
    pub problems: Vec<Problem>,
}

impl ConfigErrors {
    /// A set holding one problem.
    pub fn single(problem: Problem) -> Self {
        Self {
            problems: vec![problem],
        }
    }

    /// The errors.
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| p.is_error())
    }

    /// The warnings.
    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| !p.is_error())
    }

    /// The number of errors.
    pub fn error_count(&self) -> usize {
        self.errors().count()
    }

    /// The first problem of `kind` whose location is exactly `location`, if any.
    pub fn find(&self, kind: ProblemKind, location: &str) -> Option<&Problem> {
        self.problems
            .iter()
            .find(|p| p.kind == kind && p.location == location)
    }
}

fn render(problems: &[Problem]) -> String {
    let errors = problems.iter().filter(|p| p.is_error()).count();
    let warnings = problems.len() - errors;
    let mut out = format!(
        "the configuration has {errors} error{} and {warnings} warning{}",
        plural(errors),
        plural(warnings)
    );
    for problem in problems
        .iter()
        .filter(|p| p.is_error())
        .chain(problems.iter().filter(|p| !p.is_error()))
    {
        out.push('\n');
        out.push_str(&problem.to_string());
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
