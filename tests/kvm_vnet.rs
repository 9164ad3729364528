//! Linux reaches the bare-metal network inmate (`inmates/net`, a KVM cell) through the TAP
//! bridge (`examples/vnet_tap.rs`, a process cell), as `configs/vnet-kvm.toml` (vnet's
//! shmring format) and `configs/vnet-kvm-ivshmem-net.toml` (Linux's `ivshmem-net` format,
//! MSI-X state on vector 0 and data on vector 1) run them; two tests, one body:
//! 100 pings without loss, the HTTP status page, 1 MiB to the sink (its CRC-32 answer must
//! match) and 1 MiB from the source (every byte checked). Then `hypervisor cell restart` of
//! the inmate: the bridge reports the link down and up again, and the fresh inmate serves.
//!
//! This test binary plays every process (`harness = false`, as `kvm_demo_system`): re-executed
//! with `KVM_VNET_HYPERVISOR` set it runs `hypervisor::cli` (`run`, `cell restart`), and the
//! hypervisor spawns it again with `KVM_VNET_ROLE=tap` as the bridge cell, which runs the
//! example's `main`. The hypervisor runs inside a network namespace of its own (`vnet-inn-PID`),
//! so the TAP device (`inn0`, `ivn0`) never touches the host's network. Skipped with a message
//! without root or `/dev/kvm`.

#[path = "vnet_common/mod.rs"]
mod common;
#[path = "kvm_common/mod.rs"]
mod kvm_common;
#[path = "../examples/vnet_tap.rs"]
#[allow(dead_code)]
mod vnet_tap;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::linux::{self, Netns};
use ivshmem_stack::bench::hosted::private_config;
use kvm_common::Runner;

const HYPERVISOR_ENV: &str = "KVM_VNET_HYPERVISOR";
const ROLE_ENV: &str = "KVM_VNET_ROLE";
/// Guard for each expected line (ring-0 inmate code is emulated on PVM hosts).
const GUARD: Duration = Duration::from_secs(90);
const CELL_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const MIB: u64 = 1 << 20;

/// One system under test: a shipped config and the TAP device its bridge creates.
struct System {
    runner: Runner<'static>,
    /// The config under `configs/`.
    config: &'static str,
    /// The TAP device (and the tag of the namespace and the private names).
    tap: &'static str,
}

const SHMRING: System = System {
    runner: Runner {
        name: "linux_reaches_the_network_inmate_through_the_tap_bridge",
        hypervisor_env: HYPERVISOR_ENV,
        needs_root: true,
    },
    config: "vnet-kvm.toml",
    tap: "inn0",
};

const IVSHMEM_NET: System = System {
    runner: Runner {
        name: "linux_reaches_the_network_inmate_over_ivshmem_net",
        hypervisor_env: HYPERVISOR_ENV,
        needs_root: true,
    },
    config: "vnet-kvm-ivshmem-net.toml",
    tap: "ivn0",
};

fn main() -> ExitCode {
    let tap_cell = || kvm_common::cell_role(ROLE_ENV, "tap", "vnet_tap", vnet_tap::main);
    // The hypervisor and the bridge are roles of this binary: they run once, in the first call.
    let role = std::env::var_os(HYPERVISOR_ENV).is_some() || std::env::var_os(ROLE_ENV).is_some();
    let first = kvm_common::main(&SHMRING.runner, tap_cell, || {
        linux_and_the_network_inmate(&SHMRING)
    });
    if role || first != ExitCode::SUCCESS {
        return first;
    }
    kvm_common::main(
        &IVSHMEM_NET.runner,
        || None,
        || linux_and_the_network_inmate(&IVSHMEM_NET),
    )
}

/// The system of `configs/<system.config>`, private to this run, with this binary as the bridge.
fn system_config(system: &System, root: &Path, dir: &Path, exe: &Path) -> String {
    let shipped = std::fs::read_to_string(root.join("configs").join(system.config)).unwrap();
    let name = format!("vnet-kvm-{}-{}", system.tap, std::process::id());
    let config = private_config(&shipped, &name, &dir.join("control.sock"));
    let bridge = "\"target/release/examples/vnet_tap\"";
    assert!(config.contains(bridge), "the shipped bridge command moved");
    config.replace(bridge, &format!("{:?}", exe.display().to_string()))
}

fn build_inmates(root: &Path) {
    let status = Command::new(root.join("scripts/build-inmates"))
        .status()
        .expect("running scripts/build-inmates");
    assert!(status.success(), "scripts/build-inmates failed: {status}");
}

/// In the namespace: pings, the page, 1 MiB each way. Returns the page.
fn serve_linux(ns: &Arc<Netns>, pings: u16, bytes: u64) -> String {
    let ns = Arc::clone(ns);
    std::thread::spawn(move || {
        ns.enter();
        // `ping` panics on a lost or wrong reply: 0 loss.
        let rtts = linux::ping(CELL_IP, pings, 56);
        assert_eq!(rtts.len(), usize::from(pings));
        let page = linux::http_get(&ns, CELL_IP);
        if bytes > 0 {
            // The sink answers "<bytes> <crc32>" and the helper compares it with its own.
            linux::linux_sink(CELL_IP, bytes);
            // Every byte of the source's pattern is checked.
            linux::linux_source(CELL_IP, bytes);
        }
        let mut rtts = rtts;
        rtts.sort();
        println!(
            "  {pings} pings: min {:?} median {:?} max {:?}",
            rtts[0],
            rtts[rtts.len() / 2],
            rtts[rtts.len() - 1]
        );
        page
    })
    .join()
    .unwrap()
}

fn linux_and_the_network_inmate(system: &System) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    build_inmates(root);
    let tap = system.tap;
    let ns = Arc::new(Netns::new(tap));
    let dir = std::env::temp_dir().join(format!("kvm-vnet-{tap}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = std::env::current_exe().unwrap();
    let config = dir.join(system.config);
    std::fs::write(&config, system_config(system, root, &dir, &exe)).unwrap();

    let mut hypervisor = ns.command(exe.to_str().unwrap());
    hypervisor.arg("run").arg(&config).current_dir(root);
    let (mut out, _hypervisor) =
        kvm_common::spawn_hypervisor(hypervisor, &system.runner, (ROLE_ENV, "tap"), GUARD);

    let up = format!("[linux-net] vnet_tap: {tap}: link up (peer cell running)");
    let down = format!("[linux-net] vnet_tap: {tap}: link down (peer cell gone)");
    out.expect_nth(&up, 1);
    let started = Instant::now();
    let page = serve_linux(&ns, 100, MIB);
    println!("  100 pings, page, 1 MiB each way: {:?}", started.elapsed());
    assert!(page.contains("vnet cell 10.0.0.2/24"), "{page}");
    assert!(page.contains("carrier true"), "{page}");

    // The inmate restarts: the bridge sees the link go down and up again.
    let restart = Command::new(&exe)
        .args(["cell", "restart", "rtos-net", "--socket"])
        .arg(dir.join("control.sock"))
        .env(HYPERVISOR_ENV, "1")
        .output()
        .unwrap();
    assert!(
        restart.status.success(),
        "cell restart: {}{}",
        String::from_utf8_lossy(&restart.stdout),
        String::from_utf8_lossy(&restart.stderr)
    );
    out.expect_nth(&down, 1);
    out.expect_nth(&up, 2);
    assert!(!ns.ip(&["link", "show", tap]).contains("NO-CARRIER"));
    // The fresh inmate knows no neighbour, and smoltcp drops a reply while it resolves the
    // sender's MAC (it queues nothing); Linux may still hold the inmate's MAC, so it would not
    // ARP first. Forget it, so that Linux's ARP request teaches the inmate its MAC, as after
    // any peer's reboot.
    ns.ip(&["neigh", "flush", "dev", tap]);
    let page = serve_linux(&ns, 3, 0);
    // A fresh inmate: its counters start again (this page is its first connection).
    assert!(page.contains("connections 1\n"), "{page}");
    assert!(page.contains("sink_bytes 0\n"), "{page}");
    let _ = std::fs::remove_dir_all(&dir);
}
