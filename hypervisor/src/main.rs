//! `hypervisor`: run, check and inspect an ivshmem-stack system.
//!
//! Logging goes to stderr and is controlled by `RUST_LOG` (default `warn`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use hypervisor::config::{self, ValidConfig};

/// Exit code for a configuration with errors.
const EXIT_INVALID_CONFIG: u8 = 1;
/// Exit code for a command that is not available yet.
const EXIT_NOT_WIRED: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "hypervisor",
    version,
    about = "The hosted ivshmem v2 hypervisor"
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
    Run(RunArgs),
    /// Show the state of a running system.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The system configuration (TOML).
    config: PathBuf,
    /// Check CPU numbers against a machine with this many CPUs instead of this machine.
    #[arg(long, value_name = "N")]
    cpu_count: Option<usize>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The system configuration (TOML).
    config: PathBuf,
    /// Create the control socket here instead of the configured or default path.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => check(&args),
        Command::Run(args) => run(&args),
        Command::Status(args) => status(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("hypervisor: error: {error:#}");
            ExitCode::FAILURE
        }
    }
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

/// `hypervisor check <config>`: exit 0 and a summary when valid, exit 1 and every problem
/// when not.
fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    match load_config(&args.config, args.cpu_count) {
        Some(valid) => {
            print!("{}", valid.summary());
            Ok(ExitCode::SUCCESS)
        }
        None => Ok(ExitCode::from(EXIT_INVALID_CONFIG)),
    }
}

/// `hypervisor run <config>` (not wired to the process-cell backend yet).
fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    tracing::debug!(config = %args.config.display(), socket = ?args.socket, "run requested");
    eprintln!(
        "hypervisor: error: `run` is not wired yet (the process-cell backend is not connected); \
         use `hypervisor check {}` to validate the configuration",
        args.config.display()
    );
    Ok(ExitCode::from(EXIT_NOT_WIRED))
}

/// `hypervisor status [--socket PATH | <config>]` (not wired to the control socket yet).
fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    tracing::debug!(config = ?args.config, socket = ?args.socket, "status requested");
    eprintln!("hypervisor: error: `status` is not wired yet (the control socket is not connected)");
    Ok(ExitCode::from(EXIT_NOT_WIRED))
}
