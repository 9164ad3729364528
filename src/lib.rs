//! Shared code for the ivshmem-stack examples and the side-by-side benchmark tool `ivbench`.
//!
//! The benchmark suites live in [`bench`] (not inside the binary) so that integration tests can
//! run every measurement function with tiny iteration counts. The `ivbench` binary
//! (`src/bin/ivbench/main.rs`) is only the command line around them.
#![warn(missing_docs)]

pub mod bench;
