//! Shared code for the ivshmem-stack examples, the whole-system tests and the side-by-side
//! benchmark tool `ivbench`: [`vnet_cell`] (a network cell on a vnet link),
//! [`hypervisor_args`] (the examples' `--socket`/`--cell`), [`main_error`] (how they report
//! an error) and [`bench`].
//!
//! The benchmark suites live in [`bench`] (not inside the binary) so that integration tests can
//! run every measurement function with tiny iteration counts. The `ivbench` binary
//! (`src/bin/ivbench/main.rs`) is only the command line around them.
#![warn(missing_docs)]

extern crate alloc;

pub mod bench;
pub mod hypervisor_args;
pub mod main_error;
pub mod vnet_cell;
