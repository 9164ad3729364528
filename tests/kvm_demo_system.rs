//! The ivshmem demo as a whole system: `hypervisor run` with the Linux-side demo
//! (`examples/ivshmem_demo.rs`) as a process cell (peer 0) and the demo inmate
//! (`inmates/ivshmem-demo`) as a KVM cell (peer 1) on one MSI-X link. They exchange STATE, and
//! each rings the other three times: the inmate counts exactly the Linux side's three
//! doorbells on vector 1, and the Linux side counts the inmate's three (plus at most the one
//! state change of the inmate coming up, which arrives on vector 0 and merges into the same
//! count, as with UIO).
//!
//! This test binary plays every process (`harness = false`, as `process_cells`): re-executed
//! with `KVM_DEMO_HYPERVISOR` set it runs `hypervisor::cli` (the `hypervisor` binary belongs to
//! another package), and the hypervisor spawns it again with `KVM_DEMO_ROLE=linux-demo` as the
//! Linux cell, which runs the example's `main`. Skipped with a message without `/dev/kvm`.

#[path = "../examples/ivshmem_demo.rs"]
#[allow(dead_code)]
mod linux_demo;

#[path = "kvm_common/mod.rs"]
mod kvm_common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use kvm_common::{Output, Runner};

const HYPERVISOR_ENV: &str = "KVM_DEMO_HYPERVISOR";
const ROLE_ENV: &str = "KVM_DEMO_ROLE";
/// Guard for each expected line (ring-0 inmate code is emulated on PVM hosts).
const GUARD: Duration = Duration::from_secs(60);

const RUNNER: Runner = Runner {
    name: "the_linux_demo_and_the_demo_inmate_exchange_state_and_doorbells",
    hypervisor_env: HYPERVISOR_ENV,
    needs_root: false,
};

fn main() -> ExitCode {
    let linux_cell =
        || kvm_common::cell_role(ROLE_ENV, "linux-demo", "ivshmem_demo", linux_demo::main);
    kvm_common::main(&RUNNER, linux_cell, linux_demo_and_inmate)
}

/// The last `[cell] Interrupt #N` count printed so far.
fn last_interrupt(out: &Output, cell: &str) -> Option<u32> {
    let prefix = format!("[{cell}] Interrupt #");
    out.lines
        .seen
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
}

fn build_inmates(root: &Path) -> PathBuf {
    let status = Command::new(root.join("scripts/build-inmates"))
        .status()
        .expect("running scripts/build-inmates");
    assert!(status.success(), "scripts/build-inmates failed: {status}");
    root.join("inmates/target/x86_64-unknown-none/release/ivshmem-demo.bin")
}

fn linux_demo_and_inmate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let image = build_inmates(root);
    let dir = std::env::temp_dir().join(format!("kvm-demo-system-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("demo.toml");
    let exe = std::env::current_exe().unwrap();
    std::fs::write(
        &config,
        format!(
            r#"
[system]
name = "kvm-demo-{pid}"
control_socket = "{socket}"
allow_shared_cpus = true

[[cells]]
name = "linux"
kind = "process"
cpus = [0]
command = "{exe}"
args = ["--count", "3"]

[[cells]]
name = "inmate"
kind = "kvm"
cpus = [1]
memory = "1M"
image = "{image}"
cmdline = "target=0 count=3"

[[links]]
name = "demo"
peers = ["linux", "inmate"]
protocol = "undefined"
rw_size = "36K"
output_size = "8K"
interrupts = "msix"
vectors = 4
bdf = "01:0e.0"
"#,
            pid = std::process::id(),
            socket = dir.join("control.sock").display(),
            exe = exe.display(),
            image = image.display(),
        ),
    )
    .unwrap();

    let mut hypervisor = Command::new(&exe);
    hypervisor.arg("run").arg(&config);
    let (mut out, _hypervisor) =
        kvm_common::spawn_hypervisor(hypervisor, &RUNNER, (ROLE_ENV, "linux-demo"), GUARD);

    out.expect("[linux] ID = 0");
    out.expect("[inmate] IVSHMEM: ID is 1");
    // Both ring three times, then only serve interrupts.
    out.expect("[linux] Sent 3 interrupts, done");
    out.expect("[inmate] IVSHMEM: sent 3 interrupts, done");
    // The inmate counts the Linux side's doorbells (vector ID + 1 = 1) exactly.
    out.expect("[inmate] IVSHMEM: got interrupt 1 (#3)");
    assert_eq!(out.count("[linux] Sending interrupt 1 to peer 1"), 3);
    assert_eq!(out.count("[inmate] IVSHMEM: sending IRQ 2 to peer 0"), 3);
    // The Linux side counts the inmate's three doorbells (vector 2) plus at most one state
    // change (the inmate's STATE 0 -> 2, if it came after the Linux cell attached).
    let deadline = Instant::now() + GUARD;
    while last_interrupt(&out, "linux").unwrap_or(0) < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        match out.lines.rx.recv_timeout(left) {
            Ok(line) => out.lines.seen.push(line),
            Err(e) => panic!(
                "the Linux side did not count 3 doorbells: {e}; {:#?}",
                out.lines.seen
            ),
        }
    }
    let total = last_interrupt(&out, "linux").unwrap();
    assert!(
        (3..=4).contains(&total),
        "Linux interrupts {total}: {:#?}",
        out.lines.seen
    );
    // STATE both ways: each printed the other's state (ID + 1).
    assert!(
        out.count("[linux] state[1] = 2") > 0,
        "{:#?}",
        out.lines.seen
    );
    assert!(
        out.count("[inmate] state[0] = 1") > 0,
        "{:#?}",
        out.lines.seen
    );
    let _ = std::fs::remove_dir_all(&dir);
}
