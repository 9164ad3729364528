//! Suite `vnet`: the virtual network.
//!
//! Cases (each with `bits_per_s`, TCP bulk one way, and `rtt_ns`, ICMP echo round trip):
//! - `shmring`: two smoltcp interfaces joined by `vnet::ShmNic`s over one in-process shmring
//!   duplex (512 KiB rings), polled by one thread;
//! - `ivshmem-net`: the same two smoltcp interfaces over `vnet::ivnet::IvnetLink`s, Linux's
//!   `ivshmem-net` wire format, on an in-process `LocalLink` with Jailhouse's 0x7F000-byte
//!   output sections (qlen 2048), polled by one thread;
//! - `smoltcp-loopback`: one smoltcp interface over smoltcp's own `Loopback` device, client
//!   and server socket on it, polled by one thread; same MTU (1514), same socket buffers
//!   (256 KiB), same checksum setting (not computed, as `Loopback` does) as `shmring`;
//! - `tap-bridge`: Linux's TCP/IP stack in a network namespace → TAP → `vnet::bridge` →
//!   ring → a smoltcp cell (`ivshmem_stack::vnet_cell::cell`, sink service: it CRCs every byte), the bridge and
//!   the cell each on their own thread over an in-process `LocalLink` (real eventfd
//!   interrupts);
//! - `veth`: Linux → Linux over a veth pair between two network namespaces, the receiver
//!   doing the same sink work (CRC of every byte).
//!
//! TCP runs: each timed run opens a connection, sends for the run time, half-closes and stops
//! the clock when the receiver confirms the byte count (smoltcp pairs: when the server has
//! read everything). `tap-bridge` and `veth` need root (namespaces, TAP): without it they are
//! shown as not available.
//!
//! Targets: `shmring` ≥ 0.7 × `smoltcp-loopback`; `tap-bridge` within 2× of `veth`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ivshmem_stack::bench::report::{Comparison, Entry, Target};
use ivshmem_stack::bench::{Measurement, Metric, Settings, SuiteReport};
use ivshmem_stack::vnet_cell::cell::{Cell, CellConfig};
use ivshmem_stack::vnet_cell::netns::{echo_request, run_ip, EchoSocket, Netns};
use ivshmem_stack::vnet_cell::services::{Crc32, ServiceConfig, PORT_SINK};
use linux_uio_client::{Endpoint, EndpointRegisters, LocalLink};
use vnet::bridge::{Bridge, BridgeConfig};
use vnet::ivnet::{Interrupts, IvnetConfig, IvnetLink};
use vnet::smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use vnet::smoltcp::phy::{ChecksumCapabilities, Device, DeviceCapabilities, Loopback, Medium};
use vnet::smoltcp::socket::{icmp, tcp};
use vnet::smoltcp::time::Instant as SmolInstant;
use vnet::smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use vnet::tap::Tap;
use vnet::{LinkConfig, LinkEvent, ShmNic, VnetLink};

/// Device MTU (Ethernet frame incl. header) of every case.
const MTU: usize = 1514;
/// TCP socket buffers (smoltcp cases and the cell).
const TCP_BUFFER: usize = 256 * 1024;
/// Ring capacity of the in-process duplex.
const RING: usize = 512 * 1024;
/// ICMP payload of the RTT runs.
const PING_PAYLOAD: usize = 56;

const CASES: [&str; 5] = [
    "shmring",
    "ivshmem-net",
    "smoltcp-loopback",
    "tap-bridge",
    "veth",
];
/// Output-section size of the `ivshmem-net` case (Jailhouse's standard net link).
const IVNET_SECTION: usize = 0x7F000;

/// The progress line before one timed run: the case, which run, and what it waits for.
fn run_label(case: &str, run: usize, runs: usize, run_time: Duration, pings: usize) -> String {
    format!(
        "vnet: {case} run {run}/{runs}: TCP bulk for {run_time:?}, then waits for the \
         receiver to confirm every byte; then {pings} ICMP echoes, each waiting for its reply"
    )
}

/// Runs the suite.
pub fn run(settings: &Settings) -> Result<SuiteReport> {
    let mut report = SuiteReport::new("vnet");
    let runs = settings.runs.max(1);
    let run_time = settings.run_time.max(Duration::from_millis(20));
    let pings = if settings.run_time >= Duration::from_millis(500) {
        2000
    } else {
        300
    };
    let root = vnet::tap::is_root();
    let mut linux = if root {
        settings.say("vnet: setting up network namespaces, a TAP bridge and a veth pair");
        Some(LinuxSide::new().context("setting up namespaces, TAP bridge and veth")?)
    } else {
        None
    };
    for case in CASES {
        let mut rates = Vec::new();
        let mut rtts = Vec::new();
        let available = match case {
            "shmring" | "ivshmem-net" | "smoltcp-loopback" => true,
            _ => linux.is_some(),
        };
        if available {
            for run in 1..=runs {
                settings.say(run_label(case, run, runs, run_time, pings));
                let (bytes, secs) = match (case, linux.as_mut()) {
                    ("shmring", _) => smol_tcp(SmolPair::ring()?, run_time)?,
                    ("ivshmem-net", _) => smol_tcp(SmolPair::ivnet()?, run_time)?,
                    ("smoltcp-loopback", _) => smol_tcp(SmolPair::loopback(), run_time)?,
                    (_, Some(l)) => l.tcp(case, run_time)?,
                    _ => unreachable!("unavailable cases are not run"),
                };
                rates.push(bytes as f64 * 8.0 / secs);
                let rtt = match (case, linux.as_mut()) {
                    ("shmring", _) => smol_ping(SmolPair::ring()?, pings)?,
                    ("ivshmem-net", _) => smol_ping(SmolPair::ivnet()?, pings)?,
                    ("smoltcp-loopback", _) => smol_ping(SmolPair::loopback(), pings)?,
                    (_, Some(l)) => l.ping(case, pings)?,
                    _ => unreachable!("unavailable cases are not run"),
                };
                rtts.push(rtt);
            }
            report.entries.push(Entry::Measured(Measurement {
                case,
                metric: Metric::BitsPerS,
                samples: rates,
                iters: 1,
            }));
            report.entries.push(Entry::Measured(Measurement {
                case,
                metric: Metric::RttNs,
                samples: rtts,
                iters: pings as u64,
            }));
        } else {
            for metric in [Metric::BitsPerS, Metric::RttNs] {
                report.entries.push(Entry::NotAvailable {
                    case,
                    metric,
                    reason: "needs root (network namespaces, TAP, veth)".into(),
                });
            }
        }
    }
    drop(linux);
    for (case, baseline, tput, rtt) in [
        ("shmring", "smoltcp-loopback", Target::AtLeast(0.7), None),
        ("ivshmem-net", "shmring", Target::AtLeast(0.5), None),
        (
            "tap-bridge",
            "veth",
            Target::AtLeast(0.5),
            Some(Target::AtMost(2.0)),
        ),
    ] {
        report.comparisons.push(Comparison {
            case,
            baseline,
            metric: Metric::BitsPerS,
            target: Some(tput),
        });
        report.comparisons.push(Comparison {
            case,
            baseline,
            metric: Metric::RttNs,
            target: rtt,
        });
    }
    report.notes.push(format!(
        "TCP bulk one way per run (connection, send for the run time, half-close, receiver confirms); \
         ICMP echo RTT, {PING_PAYLOAD}-byte payload, mean of {pings} pings per run; MTU {MTU}, \
         smoltcp socket buffers {} KiB, ring {} KiB",
        TCP_BUFFER / 1024,
        RING / 1024
    ));
    report.notes.push(
        "shmring / ivshmem-net / smoltcp-loopback: one thread polls both smoltcp ends (ivshmem-net: \
         0x7F000-byte sections, 2048-entry queues, frames copied once on RX); tap-bridge: Linux TCP in a \
         namespace -> TAP -> bridge thread -> ring -> smoltcp cell thread (sink CRCs every byte); \
         veth: Linux -> Linux across two namespaces, receiver CRCs every byte"
            .into(),
    );
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// smoltcp <-> smoltcp, one thread

/// smoltcp's Loopback with the MTU and checksum setting of the shmring case.
struct CappedLoopback(Loopback);

impl Device for CappedLoopback {
    type RxToken<'a> = <Loopback as Device>::RxToken<'a>;
    type TxToken<'a> = <Loopback as Device>::TxToken<'a>;
    fn receive(&mut self, t: SmolInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.0.receive(t)
    }
    fn transmit(&mut self, t: SmolInstant) -> Option<Self::TxToken<'_>> {
        self.0.transmit(t)
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = self.0.capabilities();
        caps.max_transmission_unit = MTU;
        caps
    }
}

/// Two smoltcp ends: over a shmring duplex (two interfaces) or over Loopback (one).
enum SmolPair {
    Ring {
        nics: Box<[ShmNic; 2]>,
        ifaces: Box<[Interface; 2]>,
    },
    Loopback {
        dev: CappedLoopback,
        iface: Box<Interface>,
    },
    Ivnet {
        links: Box<[IvnetLink<EndpointRegisters>; 2]>,
        ifaces: Box<[Interface; 2]>,
        /// Keeps the shared memory alive while the links use it.
        _shared: Arc<LocalLink>,
    },
}

const ADDR_A: Ipv4Address = Ipv4Address::new(10, 99, 0, 1);
const ADDR_B: Ipv4Address = Ipv4Address::new(10, 99, 0, 2);

fn iface_on<D: Device + ?Sized>(dev: &mut D, addr: Ipv4Address, mac_last: u8) -> Interface {
    let mac = EthernetAddress([0x02, 0, 0, 0, 0, mac_last]);
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ethernet(mac)),
        dev,
        SmolInstant::from_micros(0),
    );
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(addr), 24));
    });
    iface
}

impl SmolPair {
    fn ring() -> Result<SmolPair> {
        let (a, b) = shmring::duplex::pair(RING)?;
        let mut nics = [ShmNic::new(MTU, RING)?, ShmNic::new(MTU, RING)?];
        for (nic, d) in nics.iter_mut().zip([a, b]) {
            nic.attach(d)?;
            nic.set_carrier(true);
            nic.set_checksum(ChecksumCapabilities::ignored());
        }
        let [na, nb] = &mut nics;
        let ifaces = [iface_on(na, ADDR_A, 1), iface_on(nb, ADDR_B, 2)];
        Ok(SmolPair::Ring {
            nics: Box::new(nics),
            ifaces: Box::new(ifaces),
        })
    }

    fn ivnet() -> Result<SmolPair> {
        let shared = LocalLink::new("bench-ivnet", 2, IVNET_SECTION)?;
        let config = IvnetConfig {
            max_frame: MTU,
            interrupts: Interrupts::Intx,
        };
        let link = |id| -> Result<IvnetLink<EndpointRegisters>> {
            let (dev, _irq) = Endpoint::attach_local(&shared, id)?.into_parts();
            let mut l = IvnetLink::new(dev, config)?;
            l.set_checksum(ChecksumCapabilities::ignored());
            Ok(l)
        };
        let mut links = [link(0)?, link(1)?];
        // Both state machines to RUN (one thread: no interrupts needed).
        for _ in 0..8 {
            for l in links.iter_mut() {
                l.poll_link();
            }
        }
        ensure!(
            links.iter().all(|l| l.carrier()),
            "ivshmem-net link did not come up"
        );
        let [la, lb] = &mut links;
        let ifaces = [iface_on(la, ADDR_A, 1), iface_on(lb, ADDR_B, 2)];
        Ok(SmolPair::Ivnet {
            links: Box::new(links),
            ifaces: Box::new(ifaces),
            _shared: shared,
        })
    }

    fn loopback() -> SmolPair {
        let mut dev = CappedLoopback(Loopback::new(Medium::Ethernet));
        let iface = Box::new(iface_on(&mut dev, ADDR_A, 1));
        SmolPair::Loopback { dev, iface }
    }

    /// The server's address.
    fn server_addr(&self) -> Ipv4Address {
        match self {
            SmolPair::Ring { .. } | SmolPair::Ivnet { .. } => ADDR_B,
            SmolPair::Loopback { .. } => ADDR_A,
        }
    }

    /// Polls everything once (client side, then server side). `sockets[0]` are the
    /// client's, `sockets[1]` the server's (the same set for Loopback).
    fn poll(&mut self, now: SmolInstant, sockets: &mut [SocketSet<'static>; 2]) {
        match self {
            SmolPair::Ring { nics, ifaces } => {
                for i in 0..2 {
                    ifaces[i].poll(now, &mut nics[i], &mut sockets[i]);
                    // One thread polls both ends: no doorbell is needed.
                    let _ = nics[i].flush();
                }
            }
            SmolPair::Loopback { dev, iface } => {
                iface.poll(now, dev, &mut sockets[0]);
            }
            SmolPair::Ivnet { links, ifaces, .. } => {
                for i in 0..2 {
                    ifaces[i].poll(now, &mut links[i], &mut sockets[i]);
                    // One thread polls both ends: the doorbell (if asked for) wakes nobody.
                    let _ = links[i].flush();
                }
            }
        }
    }

    fn client_iface(&mut self) -> &mut Interface {
        match self {
            SmolPair::Ring { ifaces, .. } | SmolPair::Ivnet { ifaces, .. } => &mut ifaces[0],
            SmolPair::Loopback { iface, .. } => iface,
        }
    }

    /// Index of the server's socket set.
    fn server_set(&self) -> usize {
        match self {
            SmolPair::Ring { .. } | SmolPair::Ivnet { .. } => 1,
            SmolPair::Loopback { .. } => 0,
        }
    }
}

fn tcp_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
    );
    s.set_nagle_enabled(false);
    s
}

/// One timed TCP run between the two smoltcp ends: (bytes, seconds).
fn smol_tcp(mut pair: SmolPair, run_time: Duration) -> Result<(u64, f64)> {
    let epoch = Instant::now();
    let now = || SmolInstant::from_micros(epoch.elapsed().as_micros() as i64);
    let mut sockets = [SocketSet::new(Vec::new()), SocketSet::new(Vec::new())];
    let srv_set = pair.server_set();
    let mut server = tcp_socket();
    server.listen(5001)?;
    let srv = sockets[srv_set].add(server);
    let mut client = tcp_socket();
    let remote = pair.server_addr();
    client.connect(
        pair.client_iface().context(),
        (IpAddress::Ipv4(remote), 5001),
        40000,
    )?;
    let cli = sockets[0].add(client);
    let deadline = epoch + Duration::from_secs(10);
    // Establish first.
    while !sockets[0].get::<tcp::Socket>(cli).may_send() {
        pair.poll(now(), &mut sockets);
        ensure!(
            Instant::now() < deadline,
            "smoltcp connection not established"
        );
    }
    let start = Instant::now();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut closed = false;
    loop {
        {
            let c = sockets[0].get_mut::<tcp::Socket>(cli);
            if !closed {
                if start.elapsed() < run_time {
                    while c.can_send() {
                        sent += c.send(|b| (b.len(), b.len()))? as u64;
                    }
                } else {
                    c.close();
                    closed = true;
                }
            }
        }
        {
            let s = sockets[srv_set].get_mut::<tcp::Socket>(srv);
            while s.can_recv() {
                received += s.recv(|b| (b.len(), b.len()))? as u64;
            }
        }
        if closed && received == sent {
            break;
        }
        pair.poll(now(), &mut sockets);
        ensure!(
            start.elapsed() < run_time + Duration::from_secs(10),
            "smoltcp transfer stalled at {received} of {sent} bytes"
        );
    }
    Ok((received, start.elapsed().as_secs_f64()))
}

fn icmp_socket() -> icmp::Socket<'static> {
    let buf = || icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 4096]);
    icmp::Socket::new(buf(), buf())
}

/// Mean ICMP echo RTT in ns between the two smoltcp ends (`count` echoes).
fn smol_ping(mut pair: SmolPair, count: usize) -> Result<f64> {
    let epoch = Instant::now();
    let now = || SmolInstant::from_micros(epoch.elapsed().as_micros() as i64);
    let mut sockets = [SocketSet::new(Vec::new()), SocketSet::new(Vec::new())];
    let mut sock = icmp_socket();
    sock.bind(icmp::Endpoint::Ident(0x4242))?;
    let h: SocketHandle = sockets[0].add(sock);
    let remote = IpAddress::Ipv4(pair.server_addr());
    let deadline = epoch + Duration::from_secs(10);
    // One unmeasured echo resolves ARP.
    let mut total = Duration::ZERO;
    for seq in 0..=count {
        let request = echo_request(0x4242, seq as u16, PING_PAYLOAD);
        let start = Instant::now();
        sockets[0]
            .get_mut::<icmp::Socket>(h)
            .send_slice(&request, remote)?;
        loop {
            pair.poll(now(), &mut sockets);
            let s = sockets[0].get_mut::<icmp::Socket>(h);
            if s.can_recv() {
                let (data, _) = s.recv()?;
                if data.len() >= 8 && data[0] == 0 && data[6..8] == (seq as u16).to_be_bytes() {
                    break;
                }
            }
            ensure!(Instant::now() < deadline, "no echo reply from smoltcp");
        }
        if seq > 0 {
            total += start.elapsed();
        }
    }
    Ok(total.as_nanos() as f64 / count as f64)
}

// ---------------------------------------------------------------------------------------------
// Linux <-> cell through the TAP bridge, Linux <-> Linux over veth

const TAP_CELL: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
const VETH_SERVER: Ipv4Addr = Ipv4Addr::new(10, 98, 1, 2);

/// The namespace `ivbench-TAG-PID`, deleted on drop.
fn netns(tag: &str) -> Result<Netns> {
    let name = format!("ivbench-{tag}-{}", std::process::id());
    Netns::create(&name).with_context(|| format!("network namespace {name}"))
}

fn eventfd() -> Result<Arc<EventFd>> {
    Ok(Arc::new(
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC).context("eventfd")?,
    ))
}

fn signal(fd: &EventFd) {
    // EAGAIN (counter full) means the stop is signalled anyway.
    let _ = fd.write(1);
}

/// A job run by a thread that lives in a namespace.
type Job = Box<dyn FnOnce() -> Result<(u64, f64)> + Send>;
/// A job and where its result goes.
type JobMessage = (Job, mpsc::Sender<Result<(u64, f64)>>);

/// A worker thread inside a network namespace, running jobs one at a time.
struct NsWorker {
    jobs: Option<mpsc::Sender<JobMessage>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsWorker {
    fn new(ns: Arc<Netns>) -> Result<NsWorker> {
        let (tx, rx) = mpsc::channel::<JobMessage>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let entered = ns.enter();
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if !ok {
                return;
            }
            for (job, reply) in rx {
                let _ = reply.send(job());
            }
        });
        ready_rx.recv().context("namespace worker")??;
        Ok(NsWorker {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    fn run(&self, job: Job) -> Result<(u64, f64)> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .context("worker gone")?
            .send((job, tx))
            .ok()
            .context("worker gone")?;
        rx.recv().context("worker died")?
    }
}

impl Drop for NsWorker {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Namespaces, TAP bridge + cell threads, veth pair and the client workers.
struct LinuxSide {
    stops: Vec<Arc<EventFd>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tap_client: NsWorker,
    veth_client: NsWorker,
    _veth_server: std::thread::JoinHandle<()>,
    // Dropped last: deleting a namespace removes its devices.
    _namespaces: Vec<Arc<Netns>>,
}

impl LinuxSide {
    fn new() -> Result<LinuxSide> {
        let tap_ns = Arc::new(netns("tap")?);
        let link = LocalLink::new("vnet-bench", 2, 1 << 20)?;
        let mut stops = Vec::new();
        let mut threads = Vec::new();

        // The cell (peer 0).
        let stop = eventfd()?;
        stops.push(Arc::clone(&stop));
        let l = Arc::clone(&link);
        threads.push(std::thread::spawn(move || {
            let run = || -> Result<()> {
                let (dev, irq) = Endpoint::attach_local(&l, 0)?.into_parts();
                let vlink = VnetLink::new(dev, LinkConfig::default())?;
                let mut services =
                    ServiceConfig::new(vnet::smoltcp::wire::Ipv4Cidr::new(TAP_CELL, 24));
                services.tcp_buffer = TCP_BUFFER;
                let mut cell = Cell::new(vlink, irq, &services, CellConfig::default());
                cell.run(Some(stop.as_fd()))?;
                Ok(())
            };
            if let Err(e) = run() {
                eprintln!("vnet bench cell: {e:#}");
            }
        }));

        // The bridge (peer 1) in the namespace.
        let stop = eventfd()?;
        stops.push(Arc::clone(&stop));
        let (up_tx, up_rx) = mpsc::channel();
        let ns = Arc::clone(&tap_ns);
        let l = Arc::clone(&link);
        threads.push(std::thread::spawn(move || {
            let run = || -> Result<()> {
                ns.enter()?;
                let tap = Tap::open("vnetb0")?;
                tap.configure(Some("10.98.0.1/24"), MTU - vnet::nic::ETHERNET_HEADER_LEN)?;
                let (dev, irq) = Endpoint::attach_local(&l, 1)?.into_parts();
                let vlink = VnetLink::new(dev, LinkConfig::default())?;
                let mut bridge = Bridge::new(vlink, irq, tap, BridgeConfig::default());
                let up = up_tx.clone();
                bridge.set_link_hook(Box::new(move |e| {
                    let _ = up.send(e);
                }));
                bridge.run(Some(stop.as_fd()))?;
                Ok(())
            };
            if let Err(e) = run() {
                eprintln!("vnet bench bridge: {e:#}");
                let _ = up_tx.send(LinkEvent::Down);
            }
        }));
        match up_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(LinkEvent::Up) => {}
            other => bail!("the TAP bridge did not come up: {other:?}"),
        }

        // veth between two namespaces, a CRC-ing sink server in the second.
        let veth_a = Arc::new(netns("vetha")?);
        let veth_b = Arc::new(netns("vethb")?);
        run_ip(&[
            "link",
            "add",
            "vb0",
            "netns",
            veth_a.name(),
            "type",
            "veth",
            "peer",
            "name",
            "vb1",
            "netns",
            veth_b.name(),
        ])?;
        run_ip(&[
            "-n",
            veth_a.name(),
            "address",
            "add",
            "10.98.1.1/24",
            "dev",
            "vb0",
        ])?;
        run_ip(&[
            "-n",
            veth_b.name(),
            "address",
            "add",
            "10.98.1.2/24",
            "dev",
            "vb1",
        ])?;
        run_ip(&["-n", veth_a.name(), "link", "set", "vb0", "up"])?;
        run_ip(&["-n", veth_b.name(), "link", "set", "vb1", "up"])?;
        let (listening_tx, listening_rx) = mpsc::channel();
        // The server thread blocks in accept() until the process ends: it must not keep the
        // namespace handle alive (dropping the last one deletes the namespace).
        let ns_name = veth_b.name().to_string();
        let server = std::thread::spawn(move || {
            let serve = || -> Result<()> {
                ivshmem_stack::vnet_cell::netns::enter(&ns_name)?;
                let listener = TcpListener::bind(SocketAddrV4::new(VETH_SERVER, PORT_SINK))?;
                let _ = listening_tx.send(Ok(()));
                for conn in listener.incoming() {
                    let mut conn = conn?;
                    let mut buf = vec![0u8; 64 * 1024];
                    let (mut n, mut crc) = (0u64, Crc32::new());
                    loop {
                        let k = conn.read(&mut buf)?;
                        if k == 0 {
                            break;
                        }
                        crc.update(&buf[..k]);
                        n += k as u64;
                    }
                    writeln!(conn, "{n} {:08x}", crc.finish())?;
                }
                Ok(())
            };
            if let Err(e) = serve() {
                let _ = listening_tx.send(Err(e));
            }
        });
        listening_rx
            .recv_timeout(Duration::from_secs(10))
            .context("veth server")??;

        Ok(LinuxSide {
            stops,
            threads,
            tap_client: NsWorker::new(Arc::clone(&tap_ns))?,
            veth_client: NsWorker::new(Arc::clone(&veth_a))?,
            _veth_server: server,
            _namespaces: vec![tap_ns, veth_a, veth_b],
        })
    }

    fn target(case: &str) -> Ipv4Addr {
        if case == "veth" {
            VETH_SERVER
        } else {
            TAP_CELL
        }
    }

    fn worker(&self, case: &str) -> &NsWorker {
        if case == "veth" {
            &self.veth_client
        } else {
            &self.tap_client
        }
    }

    fn tcp(&self, case: &str, run_time: Duration) -> Result<(u64, f64)> {
        let dst = Self::target(case);
        self.worker(case)
            .run(Box::new(move || linux_sink(dst, run_time)))
    }

    fn ping(&self, case: &str, count: usize) -> Result<f64> {
        let dst = Self::target(case);
        let (n, secs) = self
            .worker(case)
            .run(Box::new(move || linux_ping(dst, count)))?;
        Ok(secs * 1e9 / n as f64)
    }
}

impl Drop for LinuxSide {
    fn drop(&mut self) {
        for s in &self.stops {
            signal(s);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The veth server thread blocks in accept(); it ends with the process (detached).
    }
}

/// Sends to a sink for `run_time`, half-closes and waits for its byte count.
fn linux_sink(dst: Ipv4Addr, run_time: Duration) -> Result<(u64, f64)> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddrV4::new(dst, PORT_SINK).into(),
        Duration::from_secs(5),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let buf = vec![0x5au8; 64 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < run_time {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut line = String::new();
    s.read_to_string(&mut line)?;
    let secs = start.elapsed().as_secs_f64();
    let got: u64 = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("sink answered {line:?}"))?;
    ensure!(got == sent, "sink got {got} of {sent} bytes");
    Ok((sent, secs))
}

/// `count` ICMP echoes over a raw socket: (count, total seconds).
fn linux_ping(dst: Ipv4Addr, count: usize) -> Result<(u64, f64)> {
    let socket = EchoSocket::open(Duration::from_secs(5)).context("raw ICMP socket")?;
    let mut total = Duration::ZERO;
    for seq in 0..=count {
        let rtt = socket
            .ping(dst, seq as u16, PING_PAYLOAD)
            .with_context(|| format!("ICMP echo {seq} to {dst}"))?;
        // The first echo (ARP, cold caches) is not measured.
        if seq > 0 {
            total += rtt;
        }
    }
    Ok((count as u64, total.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_runs_progress_line_names_its_case_and_what_it_waits_for() {
        let line = run_label("tap-bridge", 2, 7, Duration::from_millis(500), 2000);
        assert!(line.contains("tap-bridge run 2/7"), "{line}");
        assert!(line.contains("TCP bulk for 500ms"), "{line}");
        assert!(line.contains("confirm every byte"), "{line}");
        assert!(line.contains("2000 ICMP echoes"), "{line}");
    }
}
