//! The `hypervisor` command line: run, check and inspect an ivshmem-stack system.
//!
//! The `hypervisor` binary is [`main`]; whole-system tests run the same code in a re-executed
//! test process through [`main_from`]. Only built with the `cli` feature (default), so the
//! library without it has no CLI dependencies.
//!
//! Logging goes to stderr and is controlled by `RUST_LOG` (default `warn`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::{self, Problem, Severity, ValidConfig};
use clap::{Args, Parser, Subcommand};

/// The end of `hypervisor --help`.
const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  invalid configuration (every problem is printed with its location and a fix), or an error
  2  usage error (unknown option or missing argument)
  3  status: no hypervisor is running at the socket
  4  run: a cell failed on its own (a spawned cell's non-zero exit or signal, a KVM cell's
     illegal access or failed cell_state)

Control socket: control_socket in [system], else /run/ivshmem-stack/<system>.sock as root,
$XDG_RUNTIME_DIR/ivshmem-stack/<system>.sock or /tmp/ivshmem-stack-<uid>/<system>.sock.
Logging: RUST_LOG (default warn), e.g. RUST_LOG=hypervisor=debug; logs go to stderr.
Relative paths in a configuration (cell commands) are taken from the working directory.";

/// The end of `hypervisor run --help`.
const RUN_AFTER_HELP: &str = "\
Stopping: Ctrl-C (SIGINT), SIGTERM or SIGHUP stop every cell (SIGTERM to its process group,
SIGKILL after 5 s), remove the control socket and print a summary. Without --keep-running,
run also stops by itself once every spawned cell has exited and no cell is attached,
unless a cell was stopped with `hypervisor cell stop` (and not started since): such a cell
waits for `hypervisor cell start`.
Cells: as root each spawned cell runs in a PID namespace of its own, under a relay process
(the pid printed at start), so nothing it starts outlives it or the hypervisor (even after
kill -9); without root a warning says that processes cells start can outlive the hypervisor.
Exit code 4 if a cell failed on its own (a restarted cell is judged by its last life), 1 on
an invalid configuration or error.";

/// Exit code of a command that did what it was asked.
const EXIT_SUCCESS: u8 = 0;

/// Exit code of a command that failed (the error is printed).
const EXIT_FAILURE: u8 = 1;

/// Exit code for a configuration with errors.
const EXIT_INVALID_CONFIG: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "hypervisor",
    version,
    about = "The hosted ivshmem v2 hypervisor",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a system configuration and print its cells, links and shared-memory layouts.
    Check(CheckArgs),
    /// Start a system: create the links, open the control socket, start the cells.
    #[command(after_help = RUN_AFTER_HELP)]
    Run(RunArgs),
    /// Show the state of a running system.
    Status(StatusArgs),
    /// Stop, start or restart one cell (process or KVM) of a running system.
    ///
    /// One request per cell at a time: while one is carried out (a stop may take up to 5 s),
    /// another client's request for the same cell is refused as busy (exit 1).
    Cell(CellArgs),
}

/// What `hypervisor cell` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CellVerb {
    /// Stop the cell: a process cell's process group gets SIGTERM, then SIGKILL after 5 s;
    /// a KVM cell's vCPU is parked. Its states become 0. Refused (exit 1) if it does not run.
    Stop,
    /// Start a stopped cell (a KVM cell boots its image afresh). Refused if it runs.
    Start,
    /// Stop and start.
    Restart,
}

#[derive(Debug, Args)]
struct CellArgs {
    /// stop, start or restart.
    verb: CellVerb,
    /// The cell's name.
    name: String,
    /// The running system's configuration (its control socket path is used).
    #[arg(conflicts_with = "socket", required_unless_present = "socket")]
    config: Option<PathBuf>,
    /// The running system's control socket.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The system configuration (TOML).
    config: PathBuf,
    /// Check CPU numbers against a machine with this many CPUs instead of this machine.
    #[arg(long, value_name = "N")]
    cpu_count: Option<usize>,
    /// Check link memory against a machine with this much RAM and swap (e.g. 16G) instead
    /// of this machine.
    #[arg(long, value_name = "SIZE", value_parser = parse_memory)]
    memory: Option<u64>,
}

/// A size as the configuration writes it (`16G`, `512M`, `4096`).
fn parse_memory(text: &str) -> Result<u64, String> {
    config::parse_size(text)
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The system configuration (TOML).
    config: PathBuf,
    /// Create the control socket here instead of the configured or default path.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Start no cell programs: every process cell is started by hand and attaches by name.
    #[arg(long)]
    no_spawn: bool,
    /// Keep serving after every spawned cell has exited (cells may attach again by hand);
    /// stop only on Ctrl-C (SIGINT), SIGTERM or SIGHUP.
    #[arg(long)]
    keep_running: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The running system's configuration (its control socket path is used).
    #[arg(conflicts_with = "socket", required_unless_present = "socket")]
    config: Option<PathBuf>,
    /// The running system's control socket.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

/// The `hypervisor` program: parses the process's arguments and runs the command.
pub fn main() -> ExitCode {
    ExitCode::from(main_from(std::env::args_os()))
}

/// Sends `tracing` events to stderr, filtered by `RUST_LOG` (default `warn`), for the
/// hypervisor and for the example cells (without a subscriber their warnings, such as a peer
/// breaking the ring protocol, would be dropped unseen). A second call keeps the first.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The `hypervisor` program with explicit arguments (the first is the program name): sets up
/// logging to stderr, parses, runs the command and returns its exit code. On `--help`,
/// `--version` or a usage error it prints and exits the process, as the binary does.
pub fn main_from<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    init_tracing();
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Check(args) => check(&args),
        Command::Run(args) => run(&args),
        Command::Status(args) => status(&args),
        Command::Cell(args) => cell(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("hypervisor: error: {}", error_chain(&error));
            EXIT_FAILURE
        }
    }
}

/// `error` and its causes, joined by `: `, each cause once: a cause whose text the message
/// so far already contains (library errors often name their source in their own message)
/// is left out. What the `hypervisor` binary and the examples print for an error.
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Loads and validates `path` (machine checks against `cpu_count` or this machine's CPUs).
/// On failure prints every problem to stderr and returns `None`.
fn load_config(path: &Path, cpu_count: Option<usize>) -> Option<ValidConfig> {
    let cpu_count = cpu_count.unwrap_or_else(config::online_cpu_count);
    tracing::debug!(path = %path.display(), cpu_count, "validating configuration");
    match config::load_and_validate(path, Some(cpu_count)) {
        Ok(valid) => Some(valid),
        Err(errors) => {
            eprintln!("{}: {errors}", path.display());
            None
        }
    }
}

/// The checks of `valid` against this machine: link memory against `memory` bytes (this
/// machine's RAM and swap if `None`), and, if `commands` gives their severity, whether each
/// process cell's command can be started from the working directory.
fn machine_problems(
    valid: &ValidConfig,
    memory: Option<u64>,
    commands: Option<Severity>,
    socket: Option<&Path>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    problems.extend(valid.check_socket_dir(socket));
    if let Some(available) = memory.or_else(config::machine_memory) {
        problems.extend(valid.check_memory(available));
    }
    if let Some(limits) = config::ProcessLimits::of_this_process() {
        problems.extend(valid.check_limits(limits));
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    problems.extend(valid.check_images(&cwd));
    if let Some(severity) = commands {
        let search_path = std::env::var_os("PATH");
        problems.extend(valid.check_commands(&cwd, search_path.as_deref(), severity));
    }
    problems
}

/// Prints `problems` (errors first) after the configuration's path; returns whether one of
/// them is an error.
fn report_machine_problems(path: &Path, problems: &[Problem]) -> bool {
    let mut sorted: Vec<&Problem> = problems.iter().collect();
    sorted.sort_by_key(|p| !p.is_error());
    for problem in &sorted {
        eprintln!("{}: {problem}", path.display());
    }
    problems.iter().any(Problem::is_error)
}

/// Writes `text` to stdout. A reader that closed the pipe early (`hypervisor check … | head`)
/// wanted no more and is not an error; any other failure (a full disk) is, with its cause,
/// instead of the panic of `print!`.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("writing to stdout"),
    }
}

/// `hypervisor check <config>`: exit 0 and a summary when valid, exit 1 and every problem
/// when not.
fn check(args: &CheckArgs) -> anyhow::Result<u8> {
    match load_config(&args.config, args.cpu_count) {
        Some(mut valid) => {
            // A command that cannot start is only a warning here: the system may be checked
            // before its programs are built, or for another directory.
            let problems = machine_problems(&valid, args.memory, Some(Severity::Warning), None);
            if problems.iter().any(Problem::is_error) {
                report_machine_problems(&args.config, &problems);
                return Ok(EXIT_INVALID_CONFIG);
            }
            // Only warnings: listed and counted in the summary with the configuration's own
            // (printed apart, they were left out of its "N warnings").
            valid.warnings.extend(problems);
            print_stdout(&valid.summary().to_string())?;
            Ok(EXIT_SUCCESS)
        }
        None => Ok(EXIT_INVALID_CONFIG),
    }
}

/// `hypervisor run <config>`: validate, create the links, listen, spawn the cells, show a
/// live status (a redrawn line on a terminal, log lines otherwise) until SIGINT/SIGTERM/SIGHUP or
/// (without `--keep-running`) until every spawned cell has exited, then stop the cells,
/// remove the socket and print a summary; exit [`EXIT_CELL_FAILED`] if a cell failed. The spawned cells' stdout and stderr lines
/// appear on the hypervisor's stdout and stderr, prefixed with `[cell-name] `.
fn run(args: &RunArgs) -> anyhow::Result<u8> {
    use crate::cells::{self, Output, RunOptions};
    use crate::control::SystemSpec;
    use anyhow::Context as _;
    use std::io::IsTerminal as _;

    let Some(valid) = load_config(&args.config, None) else {
        return Ok(EXIT_INVALID_CONFIG);
    };
    for warning in &valid.warnings {
        eprintln!("{}: {warning}", args.config.display());
    }
    // Commands matter only when they are spawned.
    let commands = (!args.no_spawn).then_some(Severity::Error);
    if report_machine_problems(
        &args.config,
        &machine_problems(&valid, None, commands, args.socket.as_deref()),
    ) {
        return Ok(EXIT_INVALID_CONFIG);
    }
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| valid.control_socket.clone());
    let system = SystemSpec::from_config(&valid);
    let output = if std::io::stdout().is_terminal() {
        Output::Terminal
    } else {
        Output::Log
    };
    let options = RunOptions {
        spawn: !args.no_spawn,
        handle_signals: true,
        output,
        stop_when_cells_exit: !args.keep_running,
        ..RunOptions::new(socket)
    };
    let kvm = crate::kvm::KvmSystem::from_config(&valid);
    let mut stdout = std::io::stdout();
    let report = cells::run_system(
        &system,
        &kvm,
        &options,
        None,
        &mut stdout,
        &mut std::io::stderr(),
    )
    .with_context(|| {
        format!(
            "running system `{}` from {}",
            valid.name,
            args.config.display()
        )
    })?;
    let failed: Vec<String> = report
        .failed()
        .map(|c| format!("{} ({})", c.cell, c.exit))
        .collect();
    if failed.is_empty() {
        Ok(EXIT_SUCCESS)
    } else {
        eprintln!(
            "hypervisor: {} cell(s) failed: {}",
            failed.len(),
            failed.join(", ")
        );
        Ok(EXIT_CELL_FAILED)
    }
}

/// Exit code of `run` when a spawned cell ended on its own with a non-zero exit code or by a
/// signal.
const EXIT_CELL_FAILED: u8 = 4;

/// Exit code of `status` when no hypervisor runs at the socket.
const EXIT_NOT_RUNNING: u8 = 3;

/// `hypervisor status [--socket PATH | <config>]`: ask the running hypervisor for its cells,
/// links and peer states and print them as a table.
fn status(args: &StatusArgs) -> anyhow::Result<u8> {
    use crate::status::{self, StatusError};

    let socket = match (&args.socket, &args.config) {
        (Some(socket), _) => socket.clone(),
        (None, Some(path)) => match load_config(path, None) {
            Some(valid) => valid.control_socket,
            None => return Ok(EXIT_INVALID_CONFIG),
        },
        (None, None) => anyhow::bail!("give a configuration or --socket PATH"),
    };
    match status::query(&socket) {
        Ok(system) => {
            print_stdout(&status::format_table(&system))?;
            Ok(EXIT_SUCCESS)
        }
        Err(error @ StatusError::NotRunning { .. }) => {
            eprintln!("hypervisor: {error}");
            Ok(EXIT_NOT_RUNNING)
        }
        Err(error) => Err(error.into()),
    }
}

/// `hypervisor cell stop|start|restart NAME [--socket PATH | <config>]`: asks the running
/// hypervisor and prints the cell's status line afterwards.
fn cell(args: &CellArgs) -> anyhow::Result<u8> {
    use crate::control::CellAction;
    use crate::status::{self, StatusError};

    let socket = match (&args.socket, &args.config) {
        (Some(socket), _) => socket.clone(),
        (None, Some(path)) => match load_config(path, None) {
            Some(valid) => valid.control_socket,
            None => return Ok(EXIT_INVALID_CONFIG),
        },
        (None, None) => anyhow::bail!("give a configuration or --socket PATH"),
    };
    let action = match args.verb {
        CellVerb::Stop => CellAction::Stop,
        CellVerb::Start => CellAction::Start,
        CellVerb::Restart => CellAction::Restart,
    };
    match status::control_cell(&socket, &args.name, action) {
        Ok(cell) => {
            let mut text = String::new();
            for line in status::format_cell_lines(&status::SystemStatus {
                hypervisor_pid: 0,
                cells: vec![cell],
                links: Vec::new(),
            }) {
                text.push_str(&line);
                text.push('\n');
            }
            print_stdout(&text)?;
            Ok(EXIT_SUCCESS)
        }
        Err(error @ StatusError::NotRunning { .. }) => {
            eprintln!("hypervisor: {error}");
            Ok(EXIT_NOT_RUNNING)
        }
        Err(error) => Err(error.into()),
    }
}
