//! The system the control-socket tests serve, written once: process cells `a` and `b` (no
//! CPUs, not spawned) on one INTx link of 4 KiB sections. Shared by
//! `hypervisor/tests/control_{cell_exit,fuzz}.rs` and the root package's
//! `tests/process_cells_endpoint.rs` (included with `#[path]`).

use hypervisor::control::{CellSpec, LinkSpec, SystemSpec};

/// Cells `a` and `b` on link `link` (protocol 4001h, 4 KiB state table and output sections,
/// an R/W section of `rw_size` bytes).
pub fn two_cells_one_link(link: &str, rw_size: u64) -> SystemSpec {
    let cell = |name: &str| CellSpec {
        name: name.into(),
        cpus: Vec::new(),
        command: None,
        process: true,
        uid: None,
    };
    SystemSpec {
        cells: vec![cell("a"), cell("b")],
        links: vec![LinkSpec {
            name: link.into(),
            peers: vec!["a".into(), "b".into()],
            protocol: 0x4001,
            state_table_size: 4096,
            rw_size,
            output_size: 4096,
            interrupts: hypervisor::device::InterruptMode::Intx,
        }],
    }
}
