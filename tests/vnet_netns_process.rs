//! The same network as `netns_tap`, with real process cells: the hosted hypervisor (its
//! library, in this test process) owns the link memory and the control socket; the smoltcp
//! cell is a separate process (this test binary re-executed in cell mode) attached by name;
//! the TAP bridge attaches as the second cell from a thread inside a network namespace.
//! The cell is killed with SIGKILL and restarted: the link goes down, comes back, and new
//! connections work. Root only: without root the test prints why it is skipped.

#[path = "vnet_common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::process::Child;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::hosted::{self, Hosted};
use common::linux::{self, Netns};
use common::Threads;
use ivshmem_stack::vnet_cell::cell::{Cell, CellConfig};
use ivshmem_stack::vnet_cell::services::ServiceConfig;
use linux_uio_client::Endpoint;
use smoltcp::wire::Ipv4Cidr;
use vnet::bridge::{Bridge, BridgeConfig};
use vnet::tap::Tap;
use vnet::{LinkConfig, LinkEvent, VnetLink};

const CELL_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);
const MIB: u64 = 1 << 20;
/// How long one step of the test (a transfer, a restart) may take on loaded CI cores.
const STEP_LIMIT: Duration = Duration::from_secs(120);
const CHILD_ENV: &str = "VNET_TEST_CELL_CHILD";

const SYSTEM: &str = r#"
[system]
name = "vnet-test"

[[cells]]
name = "rtos-net"
kind = "process"
cpus = [0]
# Not spawned (the hypervisor runs with spawn = false; the test starts the cell).
command = "/bin/true"

[[cells]]
name = "linux-net"
kind = "process"
cpus = [1]
command = "/bin/true"

[[links]]
name = "net0"
peers = ["rtos-net", "linux-net"]
protocol = "ethernet"
state_table_size = "4K"
rw_size = 0
output_size = "1M"
interrupts = "intx"
"#;

/// The cell process: runs only when re-executed by the test below (with `--ignored`).
#[test]
#[ignore = "helper: the cell process of `process_cells_linux_through_tap_to_a_smoltcp_cell`"]
fn cell_process_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let endpoint = Endpoint::attach_from_env(Some("net0")).expect("attach as a process cell");
    let (dev, irq) = endpoint.into_parts();
    let link = VnetLink::new(dev, LinkConfig::default()).unwrap();
    let services = ServiceConfig::new(Ipv4Cidr::new(CELL_IP, 24));
    let mut cell = Cell::new(link, irq, &services, CellConfig::default());
    // Runs until the test kills the process.
    cell.run(None).unwrap();
}

fn spawn_cell(hv: &Hosted) -> Child {
    hv.spawn_cell("cell_process_child", "rtos-net", &[(CHILD_ENV, "1".into())])
}

fn eventfd() -> Arc<EventFd> {
    Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("eventfd"))
}

#[test]
fn process_cells_linux_through_tap_to_a_smoltcp_cell() {
    if !linux::root_or_skip("process_cells_linux_through_tap_to_a_smoltcp_cell") {
        return;
    }
    let ns = Arc::new(Netns::new("proc"));
    // The hypervisor: links, control socket; cells attach by hand.
    let hv = Hosted::start(SYSTEM, "proc");
    let socket = hv.socket().to_path_buf();
    let threads = Threads::default();

    // The bridge: the second process cell, in the namespace.
    let (events_tx, events) = mpsc::channel();
    let bridge_stop = eventfd();
    let bridge = {
        let ns = Arc::clone(&ns);
        let socket = socket.clone();
        let stop = Arc::clone(&bridge_stop);
        threads.spawn("bridge", move || {
            ns.enter();
            let tap = Tap::open("vnet0").unwrap();
            tap.configure(Some("10.79.0.1/24"), 1500).unwrap();
            let ep = Endpoint::attach_hosted(&socket, "linux-net", Some("net0")).unwrap();
            let (dev, irq) = ep.into_parts();
            let l = VnetLink::new(dev, LinkConfig::default()).unwrap();
            let mut bridge = Bridge::new(l, irq, tap, BridgeConfig::default());
            bridge.set_link_hook(Box::new(move |e| {
                let _ = events_tx.send(e);
            }));
            bridge.run(Some(stop.as_fd())).unwrap();
            bridge.stats()
        })
    };

    let mut cell = spawn_cell(&hv);
    hosted::expect_link(&events, LinkEvent::Up);
    let client = {
        let ns = Arc::clone(&ns);
        threads.spawn("client", move || {
            ns.enter();
            assert_eq!(linux::ping(CELL_IP, 5, 56).len(), 5);
            linux::linux_sink(CELL_IP, 100 * MIB);
            linux::linux_source(CELL_IP, 100 * MIB);
            linux::http_get(&ns, CELL_IP)
        })
    };
    let page = threads.join("client", client, STEP_LIMIT);
    assert!(page.contains("sink_bytes 104857600"), "{page}");

    // SIGKILL the cell process: the hypervisor sets its state to 0, the link goes down.
    hosted::kill_cell_see_link_down(&mut cell, &events, &ns, "vnet0");

    // Restart it: the link comes back and new connections work.
    let mut cell = spawn_cell(&hv);
    hosted::expect_link(&events, LinkEvent::Up);
    let client = {
        let ns = Arc::clone(&ns);
        threads.spawn("client after the restart", move || {
            ns.enter();
            assert_eq!(linux::ping(CELL_IP, 2, 1000).len(), 2);
            linux::linux_sink(CELL_IP, 4 * MIB);
            linux::http_get(&ns, CELL_IP)
        })
    };
    let page = threads.join("client after the restart", client, STEP_LIMIT);
    assert!(
        page.contains("sink_bytes 4194304"),
        "the restarted cell: {page}"
    );

    cell.kill().unwrap();
    cell.wait().unwrap();
    assert_eq!(bridge_stop.write(1).expect("eventfd write"), 8);
    let stats = threads.join("bridge", bridge, STEP_LIMIT);
    assert_eq!(stats.port_write_errors, 0);
    hv.stop();
}
