//! `ivbench`: side-by-side benchmarks of the ivshmem-stack.
fn main() {}
