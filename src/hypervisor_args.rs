//! `--socket` and `--cell`: how an example cell finds the hosted hypervisor, shared by every
//! example that attaches (`ivshmem_demo`, `telemetry_*`, `vnet_*`).
//!
//! Each option falls back to its own environment variable (`IVSHMEM_SOCKET`, `IVSHMEM_CELL`,
//! which `hypervisor run` sets for the cells it spawns), so either may be given alone. A
//! missing or empty value is reported as the argument's fault, naming the option and the
//! variable, before anything talks to a hypervisor.

use std::path::{Path, PathBuf};

use clap::builder::{NonEmptyStringValueParser, TypedValueParser};
use linux_uio_client::hosted::{ENV_CELL, ENV_SOCKET};
use linux_uio_client::{Endpoint, EndpointError};

/// The options that locate the hypervisor and name this cell (`#[command(flatten)]` them).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HypervisorArgs {
    /// The hypervisor's control socket (default: $IVSHMEM_SOCKET, set by `hypervisor run`).
    #[arg(long, env = ENV_SOCKET, value_name = "PATH", value_parser = non_empty_path())]
    pub socket: Option<PathBuf>,
    /// The cell name to attach as (default: $IVSHMEM_CELL, set by `hypervisor run`).
    #[arg(long, env = ENV_CELL, value_name = "NAME", value_parser = NonEmptyStringValueParser::new())]
    pub cell: Option<String>,
}

/// A path option that refuses an empty value (clap then names the option).
fn non_empty_path() -> impl TypedValueParser<Value = PathBuf> {
    NonEmptyStringValueParser::new().map(PathBuf::from)
}

/// Why [`HypervisorArgs::attach`] failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorArgsError {
    /// An option has no value and its environment variable is unset.
    #[error(
        "no {what}: give --{option} or set ${var} (`hypervisor run` sets it for the cells it \
         starts)"
    )]
    Missing {
        /// What is missing (`control socket`, `cell name`).
        what: &'static str,
        /// The option.
        option: &'static str,
        /// Its environment variable.
        var: &'static str,
    },
    /// The hypervisor refused or could not be reached.
    #[error("attaching as cell `{cell}` over {}: {source}", socket.display())]
    Attach {
        /// The control socket.
        socket: PathBuf,
        /// The cell name.
        cell: String,
        /// Why (boxed: an endpoint error is large).
        source: Box<EndpointError>,
    },
}

impl HypervisorArgs {
    /// The socket and cell name, from the options or their environment variables.
    pub fn socket_and_cell(&self) -> Result<(&Path, &str), HypervisorArgsError> {
        let socket = self.socket.as_deref().ok_or(HypervisorArgsError::Missing {
            what: "control socket",
            option: "socket",
            var: ENV_SOCKET,
        })?;
        let cell = self.cell.as_deref().ok_or(HypervisorArgsError::Missing {
            what: "cell name",
            option: "cell",
            var: ENV_CELL,
        })?;
        Ok((socket, cell))
    }

    /// Attaches to the hypervisor and opens `link` (`None`: the cell's only link).
    pub fn attach(&self, link: Option<&str>) -> Result<Endpoint, HypervisorArgsError> {
        let (socket, cell) = self.socket_and_cell()?;
        Endpoint::attach_hosted(socket, cell, link).map_err(|source| HypervisorArgsError::Attach {
            socket: socket.to_path_buf(),
            cell: cell.to_string(),
            source: Box::new(source),
        })
    }
}

/// Parses `--uio`: the name of a UIO device in sysfs (`uio_ivshmem`, `uio0`). A path
/// (`/etc/passwd`, `/dev/uio0`) is refused as such, instead of being looked up as a name and
/// blamed on a missing UIO driver.
pub fn uio_device_name(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("a UIO device name is needed, e.g. uio_ivshmem or uio0".to_owned());
    }
    if value.contains('/') {
        return Err(format!(
            "{value} is a path; --uio takes the name of a UIO device in /sys/class/uio \
             (its `name`, e.g. uio_ivshmem, or the device, e.g. uio0)"
        ));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_uio_path_is_refused_as_a_path() {
        let error = super::uio_device_name("/etc/passwd").unwrap_err();
        assert!(
            error.starts_with("/etc/passwd is a path; --uio takes the name"),
            "{error}"
        );
        assert_eq!(super::uio_device_name("uio0").as_deref(), Ok("uio0"));
        assert!(super::uio_device_name("").is_err());
    }

    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        hv: HypervisorArgs,
    }

    #[test]
    fn each_option_defaults_to_its_own_environment_variable() {
        let cmd = Cli::command();
        for (id, var) in [("socket", ENV_SOCKET), ("cell", ENV_CELL)] {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
            assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(var)), "--{id}");
        }
    }

    #[test]
    fn either_option_may_be_given_without_the_other() {
        // (The test process runs with neither variable set.)
        if std::env::var_os(ENV_SOCKET).is_some() || std::env::var_os(ENV_CELL).is_some() {
            eprintln!("skipping: {ENV_SOCKET}/{ENV_CELL} are set in this environment");
            return;
        }
        let only_socket = Cli::try_parse_from(["t", "--socket", "/nowhere.sock"]).unwrap();
        let err = only_socket.hv.socket_and_cell().unwrap_err().to_string();
        assert!(err.contains("--cell") && err.contains(ENV_CELL), "{err}");
        let only_cell = Cli::try_parse_from(["t", "--cell", "c"]).unwrap();
        let err = only_cell.hv.socket_and_cell().unwrap_err().to_string();
        assert!(
            err.contains("--socket") && err.contains(ENV_SOCKET),
            "{err}"
        );
    }

    #[test]
    fn an_empty_cell_name_is_the_arguments_fault_not_the_hypervisors() {
        let err = Cli::try_parse_from(["t", "--socket", "/nowhere.sock", "--cell", ""])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--cell"), "{err}");
        assert!(!err.contains("hypervisor"), "{err}");
        let err = Cli::try_parse_from(["t", "--socket", "", "--cell", "c"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--socket"), "{err}");
    }

    #[test]
    fn attaching_without_a_hypervisor_names_socket_and_cell() {
        let socket = std::env::temp_dir().join(format!("cli-args-{}.sock", std::process::id()));
        let args = HypervisorArgs {
            socket: Some(socket.clone()),
            cell: Some("c".into()),
        };
        let err = args.attach(None).unwrap_err().to_string();
        assert!(err.contains(&socket.display().to_string()), "{err}");
        assert!(err.contains("`c`"), "{err}");
    }
}
