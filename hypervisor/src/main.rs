//! `hypervisor`: run, check and inspect an ivshmem-stack system (see [`hypervisor::cli`]).

use std::process::ExitCode;

fn main() -> ExitCode {
    hypervisor::cli::main()
}
