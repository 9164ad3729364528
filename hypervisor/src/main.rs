//! `hypervisor`: run, check and inspect an ivshmem-stack system.
fn main() {
    eprintln!("hypervisor: not yet implemented");
    std::process::exit(2);
}
