//! Linux's TCP/IP stack talks to a smoltcp cell through the TAP bridge in `ivshmem-net`
//! format (vnet::ivnet), inside a network namespace the test creates. Root only: without
//! root the test prints why it is skipped.
//!
//! In-process: the cell and the bridge run as threads over a `linux_uio_client::LocalLink`
//! with Jailhouse's 0x7F000-byte output sections (the hosted device semantics on heap memory,
//! real eventfd interrupts; the local link has one vector, so the link runs in INTx mode);
//! the kernel side is real (TAP device, TCP, ICMP, HTTP). Run at Linux's default MTU 16384
//! and at 1500: ping with 0 loss, 100 MiB each way checked by CRC, an HTTP fetch, then the
//! cell is stopped (carrier down) and restarted (carrier up) and serves again.

#[path = "vnet_common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use common::linux::{self, Netns};
use ivshmem_stack::vnet_cell::services::{ServiceConfig, Services};
use linux_uio_client::{Endpoint, LocalLink};
use nix::sys::eventfd::{EfdFlags, EventFd};
use smoltcp::time::Instant;
use smoltcp::wire::Ipv4Cidr;
use vnet::bridge::{BridgeConfig, Interrupt};
use vnet::ivnet::bridge::IvnetBridge;
use vnet::ivnet::{Interrupts, IvnetConfig, IvnetLink};
use vnet::tap::Tap;
use vnet::LinkEvent;

const CELL_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const MIB: u64 = 1 << 20;
const SECTION: usize = 0x7F000;

fn eventfd() -> Arc<EventFd> {
    Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("eventfd"))
}

fn signal(fd: &EventFd) {
    assert_eq!(fd.write(1).expect("eventfd write"), 8);
}

fn config(max_frame: usize) -> IvnetConfig {
    IvnetConfig {
        max_frame,
        interrupts: Interrupts::Intx,
    }
}

/// The cell's event loop: the services over the `ivshmem-net` link, the link state machine
/// after every interrupt, the sleep handshake before blocking. Leaves the link (RESET) when
/// `stop` is signalled.
fn run_cell(link: &Arc<LocalLink>, max_frame: usize, stop: &EventFd) {
    let (dev, mut irq) = Endpoint::attach_local(link, 0).unwrap().into_parts();
    dev.enable_interrupts();
    let mut link = IvnetLink::new(dev, config(max_frame)).unwrap();
    link.poll_link();
    let epoch = StdInstant::now();
    let now = || Instant::from_micros(epoch.elapsed().as_micros() as i64);
    let mut services = Services::new(
        &ServiceConfig::new(Ipv4Cidr::new(CELL_IP, 24)),
        &mut link,
        now(),
    );
    loop {
        if Interrupt::take(&mut irq).unwrap() || link.faulted() {
            link.poll_link();
        }
        let carrier = link.carrier();
        let frames = link.queue_stats();
        let mut status = |page: &mut String| {
            let _ = writeln!(page, "carrier {carrier}");
            let _ = writeln!(page, "rx_frames {}", frames.rx_frames);
            let _ = writeln!(page, "tx_frames {}", frames.tx_frames);
        };
        let busy = services.poll(now(), &mut link, &mut status);
        link.flush();
        if busy || !link.prepare_sleep() {
            continue;
        }
        let timeout = services
            .poll_delay(now())
            .map_or(-1, |d| d.total_millis().min(i32::MAX as u64) as i32);
        if timeout == 0 {
            continue;
        }
        let mut fds = [
            libc::pollfd {
                fd: irq.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd entries.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        assert!(
            rc >= 0 || std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        );
        if fds[1].revents != 0 {
            link.shut_down();
            return;
        }
    }
}

fn start_cell(
    link: &Arc<LocalLink>,
    max_frame: usize,
) -> (Arc<EventFd>, std::thread::JoinHandle<()>) {
    let stop = eventfd();
    let link = Arc::clone(link);
    let s = Arc::clone(&stop);
    (
        stop,
        std::thread::spawn(move || run_cell(&link, max_frame, &s)),
    )
}

fn linux_talks_to_a_cell_in_ivshmem_net_format(ip_mtu: usize) {
    let max_frame = ip_mtu + 14;
    let ns = Arc::new(Netns::new(&format!("ivn{ip_mtu}")));
    let link = LocalLink::new("ivnet0", 2, SECTION).unwrap();
    assert_eq!(link.output_size(), SECTION);

    // The bridge (peer 1) in the namespace, reporting carrier changes.
    let (events_tx, events) = mpsc::channel();
    let bridge_stop = eventfd();
    let bridge = {
        let ns = Arc::clone(&ns);
        let link = Arc::clone(&link);
        let stop = Arc::clone(&bridge_stop);
        std::thread::spawn(move || {
            ns.enter();
            let tap = Tap::open("ivn0").unwrap();
            tap.configure(Some("10.78.0.1/24"), ip_mtu).unwrap();
            let (dev, irq) = Endpoint::attach_local(&link, 1).unwrap().into_parts();
            dev.enable_interrupts();
            let l = IvnetLink::new(dev, config(max_frame)).unwrap();
            let mut bridge = IvnetBridge::new(l, irq, tap, BridgeConfig::default());
            bridge.set_link_hook(Box::new(move |e| {
                let _ = events_tx.send(e);
            }));
            bridge.run(Some(stop.as_fd())).unwrap();
            bridge.stats()
        })
    };

    let (cell_stop, cell) = start_cell(&link, max_frame);
    assert_eq!(
        events.recv_timeout(Duration::from_secs(30)).unwrap(),
        LinkEvent::Up
    );
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

    // Stop the cell: the link goes down (NO-CARRIER), comes back with a new cell.
    signal(&cell_stop);
    cell.join().unwrap();
    assert_eq!(
        events.recv_timeout(Duration::from_secs(30)).unwrap(),
        LinkEvent::Down
    );
    assert!(ns.ip(&["link", "show", "ivn0"]).contains("NO-CARRIER"));
    let (cell_stop, cell) = start_cell(&link, max_frame);
    assert_eq!(
        events.recv_timeout(Duration::from_secs(30)).unwrap(),
        LinkEvent::Up
    );
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
    assert!(page.contains("sink_bytes 4194304"), "a fresh cell: {page}");

    signal(&cell_stop);
    cell.join().unwrap();
    signal(&bridge_stop);
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
}

#[test]
fn linux_talks_ivshmem_net_at_mtu_16384() {
    if linux::root_or_skip("linux_talks_ivshmem_net_at_mtu_16384") {
        linux_talks_to_a_cell_in_ivshmem_net_format(16384);
    }
}

#[test]
fn linux_talks_ivshmem_net_at_mtu_1500() {
    if linux::root_or_skip("linux_talks_ivshmem_net_at_mtu_1500") {
        linux_talks_to_a_cell_in_ivshmem_net_format(1500);
    }
}
