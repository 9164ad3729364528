//! The system the control-socket tests serve, written once: two process cells (no CPUs, not
//! spawned) on one link with a 4 KiB state table. Shared by
//! `hypervisor/tests/control_{cell_exit,fuzz}.rs` and the root package's
//! `tests/{process_cells_endpoint,endpoint_vectors,hypervisor_death}.rs` (included with
//! `#[path]`).

use hypervisor::control::{CellSpec, LinkSpec, SystemSpec};
use hypervisor::device::InterruptMode;

/// Cells `names` (peers 0 and 1) on link `link` (protocol 4001h, an R/W section of `rw_size`
/// bytes, output sections of `output_size`, `interrupts`).
pub fn pair_system(
    names: [&str; 2],
    link: &str,
    rw_size: u64,
    output_size: u64,
    interrupts: InterruptMode,
) -> SystemSpec {
    let cell = |name: &str| CellSpec {
        name: name.into(),
        cpus: Vec::new(),
        command: None,
        process: true,
        uid: None,
    };
    SystemSpec {
        cells: names.iter().map(|n| cell(n)).collect(),
        links: vec![LinkSpec {
            name: link.into(),
            peers: names.iter().map(|n| n.to_string()).collect(),
            protocol: 0x4001,
            state_table_size: 4096,
            rw_size,
            output_size,
            interrupts,
        }],
    }
}
