//! Linux's own TCP/IP stack talks to a smoltcp cell through the TAP bridge, inside a network
//! namespace the test creates (nothing touches the host's network). Root only: without root
//! the test prints why it is skipped.
//!
//! In-process variant: the cell and the bridge run as threads over a
//! `linux_uio_client::LocalLink` (the hosted device semantics on heap memory, real eventfd
//! interrupts); the kernel side is real (TAP device, TCP, ICMP, curl).

#[path = "vnet_common/mod.rs"]
mod common;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::AsFd;

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::linux::{self, Netns};
use common::Threads;
use ivshmem_stack::vnet_cell::cell::{Cell, CellConfig};
use ivshmem_stack::vnet_cell::services::ServiceConfig;
use linux_uio_client::{Endpoint, LocalLink};
use smoltcp::wire::Ipv4Cidr;
use vnet::bridge::{Bridge, BridgeConfig};
use vnet::tap::Tap;
use vnet::{LinkConfig, LinkEvent, VnetLink};

const CELL_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const MIB: u64 = 1 << 20;

fn eventfd() -> Arc<EventFd> {
    Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("eventfd"))
}

fn signal(fd: &EventFd) {
    assert_eq!(fd.write(1).expect("eventfd write"), 8);
}

/// How long one step of the test (a transfer, a restart) may take on loaded CI cores.
const STEP_LIMIT: Duration = Duration::from_secs(120);

/// Starts the cell (peer 0) as thread `name`; returns its stop fd and handle.
fn start_cell(
    threads: &Threads,
    name: &'static str,
    link: &Arc<LocalLink>,
    services: ServiceConfig,
) -> (Arc<EventFd>, std::thread::JoinHandle<()>) {
    let stop = eventfd();
    let link = Arc::clone(link);
    let s = Arc::clone(&stop);
    let h = threads.spawn(name, move || {
        let (dev, irq) = Endpoint::attach_local(&link, 0)
            .unwrap_or_else(|e| panic!("{name}: attach: {e}"))
            .into_parts();
        let l = VnetLink::new(dev, LinkConfig::default())
            .unwrap_or_else(|e| panic!("{name}: link: {e}"));
        let mut cell = Cell::new(l, irq, &services, CellConfig::default());
        cell.run(Some(s.as_fd()))
            .unwrap_or_else(|e| panic!("{name}: loop: {e}"));
    });
    (stop, h)
}

/// The bridge's next carrier change, within 30 s.
fn next_event(events: &mpsc::Receiver<LinkEvent>, waiting_for: &str) -> LinkEvent {
    events
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no link event from the bridge ({waiting_for}): {e}"))
}

#[test]
fn linux_talks_to_a_smoltcp_cell_through_the_tap_bridge() {
    if !linux::root_or_skip("linux_talks_to_a_smoltcp_cell_through_the_tap_bridge") {
        return;
    }
    let ns = Arc::new(Netns::new("tap"));
    let link = LocalLink::new("net0", 2, 1 << 20).unwrap();
    let pcap_path = std::env::temp_dir().join(format!("vnet-test-{}.pcap", std::process::id()));

    // The bridge (peer 1) in the namespace, reporting carrier changes.
    let (events_tx, events) = mpsc::channel();
    let bridge_stop = eventfd();
    let threads = Threads::default();
    let bridge = {
        let ns = Arc::clone(&ns);
        let link = Arc::clone(&link);
        let stop = Arc::clone(&bridge_stop);
        let pcap_path = pcap_path.clone();
        threads.spawn("bridge", move || {
            ns.enter();
            let tap = Tap::open("vnet0").unwrap();
            tap.configure(Some("10.77.0.1/24"), 1500).unwrap();
            let (dev, irq) = Endpoint::attach_local(&link, 1).unwrap().into_parts();
            let l = VnetLink::new(dev, LinkConfig::default()).unwrap();
            let mut bridge = Bridge::new(l, irq, tap, BridgeConfig::default());
            let file = std::fs::File::create(&pcap_path).unwrap();
            let out: Box<dyn std::io::Write + Send> = Box::new(std::io::BufWriter::new(file));
            bridge.set_pcap(vnet::pcap::PcapWriter::new(out).unwrap());
            bridge.set_link_hook(Box::new(move |e| {
                let _ = events_tx.send(e);
            }));
            bridge.run(Some(stop.as_fd())).unwrap();
            bridge.stats()
        })
    };

    let services = ServiceConfig::new(Ipv4Cidr::new(CELL_IP, 24));
    let (cell_stop, cell) = start_cell(&threads, "cell", &link, services);
    assert_eq!(next_event(&events, "the cell starts"), LinkEvent::Up);
    assert!(!ns.ip(&["link", "show", "vnet0"]).contains("NO-CARRIER"));

    // The kernel side: ping, 100 MiB each way, HTTP.
    let client = {
        let ns = Arc::clone(&ns);
        threads.spawn("client", move || {
            ns.enter();
            let rtts = linux::ping(CELL_IP, 5, 56);
            assert_eq!(rtts.len(), 5);
            // `ping -s 4000`: Linux fragments the request (3 fragments at MTU 1500), the cell
            // reassembles it and fragments its reply, Linux reassembles that.
            assert_eq!(linux::ping(CELL_IP, 2, 4000).len(), 2);
            // A datagram larger than the cell's reassembly buffer is dropped (and counted).
            linux::ping_unanswered(
                CELL_IP,
                vnet::nic::IPV4_REASSEMBLY_MAX + 100,
                Duration::from_secs(1),
            );
            linux::linux_sink(CELL_IP, 100 * MIB);
            linux::linux_source(CELL_IP, 100 * MIB);
            // Many clients at once, each connecting once (no retries): 50 parallel HTTP
            // clients, then 64 echo connections open together.
            std::thread::scope(|scope| {
                for _ in 0..50 {
                    scope.spawn(|| {
                        ns.enter();
                        assert!(linux::http_get_std(CELL_IP).contains("carrier true"));
                    });
                }
            });
            linux::echo_concurrently(CELL_IP, 64, 1000);
            linux::http_get(&ns, CELL_IP)
        })
    };
    let page = threads.join("client", client, STEP_LIMIT);
    assert!(page.contains("sink_bytes 104857600"), "{page}");
    assert!(page.contains("carrier true"), "{page}");
    assert!(
        linux::status_value(&page, "rx_ipv4_fragments") >= 6,
        "two 4000-byte pings arrive in 3 fragments each: {page}"
    );
    assert!(
        linux::status_value(&page, "rx_ipv4_fragments_dropped") >= 1,
        "the over-size ping's last fragments: {page}"
    );

    // Kill the cell: the link goes down (NO-CARRIER), comes back with a new cell, and new
    // connections work.
    signal(&cell_stop);
    threads.join("cell", cell, STEP_LIMIT);
    assert_eq!(next_event(&events, "the cell stopped"), LinkEvent::Down);
    assert!(ns.ip(&["link", "show", "vnet0"]).contains("NO-CARRIER"));
    // The new cell serves 4 connections per port and has short time-outs, so that 2
    // half-open and 2 idle connections take HTTP down until the time-outs pass.
    let mut services = ServiceConfig::new(Ipv4Cidr::new(CELL_IP, 24));
    services.sockets_per_port = 4;
    services.handshake_timeout = smoltcp::time::Duration::from_secs(2);
    services.idle_timeout = smoltcp::time::Duration::from_secs(4);
    let (cell_stop, cell) = start_cell(&threads, "restarted cell", &link, services);
    assert_eq!(next_event(&events, "the cell restarts"), LinkEvent::Up);
    let client = {
        let ns = Arc::clone(&ns);
        threads.spawn("client after the restart", move || {
            ns.enter();
            assert_eq!(linux::ping(CELL_IP, 2, 1000).len(), 2);
            linux::linux_sink(CELL_IP, 4 * MIB);
            // 2 SYNs from an address nobody answers ARP for, 2 clients that connect and
            // say nothing: every HTTP socket is taken, a new client is refused...
            let nowhere = Ipv4Addr::new(10, 77, 0, 99);
            linux::syn_from_nowhere(nowhere, 50_001, CELL_IP, 80);
            linux::syn_from_nowhere(nowhere, 50_002, CELL_IP, 80);
            let idle: Vec<TcpStream> = (0..2)
                .map(|_| {
                    let s = TcpStream::connect_timeout(
                        &SocketAddrV4::new(CELL_IP, 80).into(),
                        Duration::from_secs(10),
                    )
                    .expect("idle client");
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    s
                })
                .collect();
            let refused = TcpStream::connect_timeout(
                &SocketAddrV4::new(CELL_IP, 80).into(),
                Duration::from_secs(10),
            );
            assert!(
                refused.is_err(),
                "HTTP still served with every socket taken"
            );
            // ...until the time-outs pass: the cell resets the idle clients (a read wakes
            // up; the half-open ones expired earlier), and HTTP serves again.
            for mut s in idle {
                let mut byte = [0u8; 1];
                match s.read(&mut byte) {
                    Ok(0) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                    other => panic!("an idle client was not ended by the cell: {other:?}"),
                }
            }
            linux::http_get(&ns, CELL_IP)
        })
    };
    let page = threads.join("client after the restart", client, STEP_LIMIT);
    assert!(page.contains("sink_bytes 4194304"), "a fresh cell: {page}");
    assert!(
        linux::status_value(&page, "handshake_timeouts") >= 2,
        "the half-open connections: {page}"
    );
    assert_eq!(
        linux::status_value(&page, "idle_timeouts"),
        2,
        "the idle clients: {page}"
    );

    signal(&cell_stop);
    threads.join("restarted cell", cell, STEP_LIMIT);
    signal(&bridge_stop);
    let stats = threads.join("bridge", bridge, STEP_LIMIT);
    assert!(
        stats.to_port_frames > 1000 && stats.from_port_frames > 1000,
        "{stats:?}"
    );
    assert_eq!(stats.port_write_errors, 0);

    // The capture is a valid pcap file with every forwarded frame.
    let bytes = std::fs::read(&pcap_path).unwrap();
    assert_eq!(&bytes[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
    let mut frames = 0u64;
    let mut off = 24;
    while off + 16 <= bytes.len() {
        let incl = u32::from_le_bytes(bytes[off + 8..off + 12].try_into().unwrap()) as usize;
        off += 16 + incl;
        frames += 1;
    }
    assert_eq!(off, bytes.len(), "records tile the file");
    assert_eq!(frames, stats.to_port_frames + stats.from_port_frames);
    if std::process::Command::new("tcpdump")
        .arg("--version")
        .output()
        .is_ok()
    {
        let out = std::process::Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&pcap_path)
            .args(["-c", "20", "icmp or arp"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tcpdump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("ICMP echo request") && text.contains("ICMP echo reply"),
            "{text}"
        );
    } else {
        println!("tcpdump not installed: pcap checked by its own parser only");
    }
    let _ = std::fs::remove_file(&pcap_path);
}
