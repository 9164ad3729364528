//! Linux's TCP/IP stack talks to a smoltcp process cell through the TAP bridge in
//! `ivshmem-net` format (vnet::ivnet), inside a network namespace the test creates: the
//! hosted hypervisor (its library, in this test process) owns the link memory (Jailhouse's
//! 0x7F000-byte output sections, protocol "ivshmem-net" = 0001h) and the control socket;
//! the smoltcp cell is a separate process (this test binary re-executed in cell mode); the
//! bridge attaches as the second cell from a thread inside the namespace. Run at Linux's
//! default MTU 16384 and at 1500: ping with 0 loss (small and full-MTU), 100 MiB each way
//! (the cell's sink CRCs every byte, the Linux side checks the source's), an HTTP fetch;
//! then the cell is killed with SIGKILL (link down, NO-CARRIER) and restarted (link up) and
//! serves again. Root only: without root the test prints why it is skipped.

#[path = "vnet_common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::Child;
use std::sync::{mpsc, Arc};

use common::hosted::{self, Hosted};
use common::linux::{self, Netns};
use ivshmem_stack::vnet_cell::cell::{Cell, CellConfig};
use ivshmem_stack::vnet_cell::services::ServiceConfig;
use linux_uio_client::Endpoint;
use nix::sys::eventfd::{EfdFlags, EventFd};
use smoltcp::wire::Ipv4Cidr;
use vnet::bridge::BridgeConfig;
use vnet::ivnet::bridge::IvnetBridge;
use vnet::ivnet::{Interrupts, IvnetConfig, IvnetLink};
use vnet::tap::Tap;
use vnet::LinkEvent;

const CELL_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const MIB: u64 = 1 << 20;
/// Set (to the IP MTU) in the re-executed cell process.
const CHILD_ENV: &str = "VNET_IVNET_TEST_CELL_MTU";

const SYSTEM: &str = r#"
[system]
name = "ivn-test"

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
protocol = "ivshmem-net"
state_table_size = "4K"
rw_size = 0
output_size = "0x7F000"
interrupts = "intx"
"#;

fn config(ip_mtu: usize) -> IvnetConfig {
    IvnetConfig {
        max_frame: ip_mtu + 14,
        interrupts: Interrupts::Intx,
    }
}

/// The cell process: runs only when re-executed by the tests below (with `--ignored`).
#[test]
#[ignore = "helper: the cell process of the linux_talks_ivshmem_net_* tests"]
fn ivnet_cell_process_child() {
    let Some(mtu) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mtu: usize = mtu.to_str().unwrap().parse().unwrap();
    let endpoint = Endpoint::attach_from_env(Some("net0")).expect("attach as a process cell");
    let (dev, irq) = endpoint.into_parts();
    assert_eq!(dev.own_output().len(), 0x7F000);
    let link = IvnetLink::new(dev, config(mtu)).unwrap();
    let services = ServiceConfig::new(Ipv4Cidr::new(CELL_IP, 24));
    let mut cell = Cell::new(link, irq, &services, CellConfig::default());
    // Runs until the test kills the process.
    cell.run(None).unwrap();
}

fn spawn_cell(hv: &Hosted, ip_mtu: usize) -> Child {
    hv.spawn_cell(
        "ivnet_cell_process_child",
        "rtos-net",
        &[(CHILD_ENV, ip_mtu.to_string())],
    )
}

fn eventfd() -> Arc<EventFd> {
    Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("eventfd"))
}

fn linux_talks_to_a_process_cell_in_ivshmem_net_format(ip_mtu: usize) {
    let ns = Arc::new(Netns::new(&format!("ivn{ip_mtu}")));
    // The hypervisor: links, control socket; cells attach by hand.
    let hv = Hosted::start(SYSTEM, &format!("ivn{ip_mtu}"));
    let socket = hv.socket().to_path_buf();

    // The bridge: the second process cell, in the namespace.
    let (events_tx, events) = mpsc::channel();
    let bridge_stop = eventfd();
    let bridge = {
        let ns = Arc::clone(&ns);
        let socket = socket.clone();
        let stop = Arc::clone(&bridge_stop);
        std::thread::spawn(move || {
            ns.enter();
            let tap = Tap::open("ivn0").unwrap();
            tap.configure(Some("10.78.0.1/24"), ip_mtu).unwrap();
            let ep = Endpoint::attach_hosted(&socket, "linux-net", Some("net0")).unwrap();
            let (dev, irq) = ep.into_parts();
            let l = IvnetLink::new(dev, config(ip_mtu)).unwrap();
            assert_eq!(l.geometry().qlen(), 2048);
            let mut bridge = IvnetBridge::new(l, irq, tap, BridgeConfig::default());
            bridge.set_link_hook(Box::new(move |e| {
                let _ = events_tx.send(e);
            }));
            bridge.run(Some(stop.as_fd())).unwrap();
            bridge.stats()
        })
    };

    let mut cell = spawn_cell(&hv, ip_mtu);
    hosted::expect_link(&events, LinkEvent::Up);
    assert!(!ns.ip(&["link", "show", "ivn0"]).contains("NO-CARRIER"));
    let client = {
        let ns = Arc::clone(&ns);
        std::thread::spawn(move || {
            ns.enter();
            assert_eq!(linux::ping(CELL_IP, 5, 56).len(), 5, "0 loss");
            assert_eq!(
                linux::ping(CELL_IP, 2, ip_mtu - 28).len(),
                2,
                "full-MTU echo"
            );
            linux::linux_sink(CELL_IP, 100 * MIB);
            linux::linux_source(CELL_IP, 100 * MIB);
            linux::http_get(&ns, CELL_IP)
        })
    };
    let page = client.join().unwrap();
    assert!(page.contains("sink_bytes 104857600"), "{page}");
    assert!(page.contains("carrier true"), "{page}");

    // SIGKILL the cell process: the hypervisor sets its state to 0, the link goes down.
    hosted::kill_cell_see_link_down(&mut cell, &events, &ns, "ivn0");

    // Restart it: the link comes back and new connections work.
    let mut cell = spawn_cell(&hv, ip_mtu);
    hosted::expect_link(&events, LinkEvent::Up);
    let client = {
        let ns = Arc::clone(&ns);
        std::thread::spawn(move || {
            ns.enter();
            assert_eq!(linux::ping(CELL_IP, 2, 1000).len(), 2);
            linux::linux_sink(CELL_IP, 4 * MIB);
            linux::http_get(&ns, CELL_IP)
        })
    };
    let page = client.join().unwrap();
    assert!(
        page.contains("sink_bytes 4194304"),
        "the restarted cell: {page}"
    );

    cell.kill().unwrap();
    cell.wait().unwrap();
    assert_eq!(bridge_stop.write(1).expect("eventfd write"), 8);
    let stats = bridge.join().unwrap();
    assert!(
        stats.to_port_frames > 1000 && stats.from_port_frames > 1000,
        "{stats:?}"
    );
    assert_eq!(
        (stats.port_write_errors, stats.from_port_oversize),
        (0, 0),
        "{stats:?}"
    );
    hv.stop();
}

#[test]
fn linux_talks_ivshmem_net_at_mtu_16384() {
    if linux::root_or_skip("linux_talks_ivshmem_net_at_mtu_16384") {
        linux_talks_to_a_process_cell_in_ivshmem_net_format(16384);
    }
}

#[test]
fn linux_talks_ivshmem_net_at_mtu_1500() {
    if linux::root_or_skip("linux_talks_ivshmem_net_at_mtu_1500") {
        linux_talks_to_a_process_cell_in_ivshmem_net_format(1500);
    }
}
