//! Suite `kvm`: ivshmem doorbell round trips with KVM cells, beside the same round trip
//! between process cells and a bare eventfd, plus the cost of one MMIO exit to user space.
//!
//! - `kvm-kvm`: two KVM cells (vCPUs pinned to `cpus[0]` and `cpus[1]`) run
//!   [`IVSHMEM_GUEST`]: the ringer writes DOORBELL, the echo cell's interrupt handler writes
//!   DOORBELL back, the ringer's handler counts, its loop waits for the count. Both doorbells
//!   take the fast path (ioeventfd → eventfd → irqfd → MSI); the guest times the loop with
//!   the PM timer.
//! - `kvm-process`: this thread (pinned to `cpus[0]`) is a process peer: it writes the KVM
//!   cell's eventfd (what a process cell's DOORBELL does) and waits on its own eventfd, which
//!   the KVM cell's handler rings through its ioeventfd (vCPU on `cpus[1]`).
//! - `process-process`: two process cells of the hosted hypervisor
//!   ([`doorbell::ivshmem_rtt`]).
//! - `eventfd`: two processes and two eventfds ([`doorbell::eventfd_rtt`]).
//! - `mmio-exit`: a KVM cell reads BAR0's ID register in a loop; every read exits to user
//!   space and is answered by the device model (metric `ns` per read, loop included).
//!
//! On a PVM host (`/dev/kvm` without VMX) guest ring-0 code is emulated, so these figures
//! say nothing about real hardware.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hypervisor::device::{InterruptGate, InterruptMode};
use hypervisor::kvm::test_guests::{self, Guest, IVSHMEM_GUEST};
use hypervisor::kvm::{
    kvm_available, EventQueue, HaltReason, KvmCell, KvmCellConfig, KvmEvent, KvmLinkConfig,
    LinkSizes, LinkWiring,
};
use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::doorbell;
use super::measure::{measure, Metric, Settings};
use super::pin::run_pinned;
use super::report::{Comparison, Entry, SuiteReport};

/// The suite's name.
pub const SUITE: &str = "kvm";

/// How long one guest run may take before it counts as hung.
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The PM timer's frequency.
const PM_TIMER_HZ: f64 = ivshmem_dev::comm::PM_TIMER_HZ as f64;

/// The ratios this suite reports (no targets: PVM timings are not comparable to VMX).
pub fn comparisons() -> Vec<Comparison> {
    ["kvm-kvm", "kvm-process", "process-process"]
        .into_iter()
        .map(|case| Comparison {
            case,
            baseline: "eventfd",
            metric: Metric::RttNs,
            target: None,
        })
        .collect()
}

/// Runs every case of the suite.
pub fn run(settings: &Settings) -> Result<SuiteReport> {
    let cpus = settings.cpus;
    let mut report = SuiteReport::new(SUITE);
    settings.say("kvm/eventfd: two processes, two eventfds, blocking reads");
    report.entries.push(Entry::Measured(measure(
        settings,
        "eventfd",
        Metric::RttNs,
        0,
        |iters| doorbell::eventfd_rtt(cpus, iters),
    )?));
    settings.say("kvm/process-process: ivshmem doorbells between two process cells");
    report.entries.push(Entry::Measured(measure(
        settings,
        "process-process",
        Metric::RttNs,
        0,
        |iters| {
            doorbell::ivshmem_rtt(cpus, iters)?.context("the hosted doorbell endpoint is missing")
        },
    )?));
    let kvm_cases: [(&'static str, Metric, &str); 3] = [
        (
            "kvm-kvm",
            Metric::RttNs,
            "kvm/kvm-kvm: doorbells between two KVM cells (ioeventfd -> irqfd)",
        ),
        (
            "kvm-process",
            Metric::RttNs,
            "kvm/kvm-process: doorbells between a KVM cell and a process peer",
        ),
        (
            "mmio-exit",
            Metric::Ns,
            "kvm/mmio-exit: BAR0 reads from a KVM cell, each an exit to user space",
        ),
    ];
    match kvm_available() {
        Ok(()) => {
            let guest = test_guests::assemble(IVSHMEM_GUEST).context("assembling the guest")?;
            for (case, metric, what) in kvm_cases {
                settings.say(what);
                report.entries.push(Entry::Measured(measure(
                    settings,
                    case,
                    metric,
                    0,
                    |iters| match case {
                        "kvm-kvm" => kvm_kvm_rtt(&guest, cpus, iters),
                        "kvm-process" => kvm_process_rtt(&guest, cpus, iters),
                        _ => mmio_exit(&guest, cpus, iters),
                    },
                )?));
            }
        }
        Err(reason) => {
            for (case, metric, _) in kvm_cases {
                report.entries.push(Entry::NotAvailable {
                    case,
                    metric,
                    reason: reason.clone(),
                });
            }
        }
    }
    let mut ping_notes = SuiteReport::new(SUITE);
    ping_rows(settings, &mut ping_notes)?;
    report.entries.append(&mut ping_notes.entries);
    report.comparisons = comparisons();
    report.notes = vec![
        format!(
            "CPUs {} and {}: the timing side (parent process, ringer vCPU, process peer) on the first",
            cpus[0], cpus[1]
        ),
        "kvm-kvm: guest loop timed by the guest's PM timer (24-bit, 3.58 MHz); both doorbells on the fast path (ioeventfd with datamatch -> eventfd -> irqfd on an MSI route), no exit to user space".into(),
        "kvm-process: process side writes the KVM cell's eventfd and polls its own; the guest's handler rings back through its ioeventfd".into(),
        "mmio-exit: per BAR0 read, including three emulated loop instructions".into(),
        "on a PVM /dev/kvm (no VMX) guest ring-0 code is emulated: these figures say nothing about real hardware".into(),
    ];
    report.notes.append(&mut ping_notes.notes);
    Ok(report)
}

fn link(name: &str) -> Result<Arc<LinkWiring>> {
    Ok(LinkWiring::create(
        name,
        2,
        0x4000,
        LinkSizes {
            state_table: 4096,
            rw: 0,
            output: 4096,
        },
        InterruptMode::Msix { vectors: 1 },
    )?)
}

fn cell(
    name: &str,
    guest: &Guest,
    wiring: &Arc<LinkWiring>,
    peer: u16,
    cmdline: &str,
    cpu: usize,
    events: &Arc<EventQueue>,
) -> Result<KvmCell> {
    let mut config = KvmCellConfig::new(name, guest.image.clone());
    config.low_memory = test_guests::LOW_MEMORY;
    config.cmdline = cmdline.into();
    config.cpu = Some(cpu);
    config.links.push(KvmLinkConfig {
        wiring: wiring.clone(),
        peer,
        bdf: "00:0e.0".parse()?,
        address: test_guests::LINK_ADDRESS,
    });
    Ok(KvmCell::new(config, events.clone())?)
}

/// Waits for `cell`'s console line `want` (or its stop, an error).
fn wait_line(events: &EventQueue, cell: &str, want: impl Fn(&str) -> bool) -> Result<String> {
    let event = events.wait_for(GUEST_TIMEOUT, |e| match e {
        KvmEvent::Console { cell: c, line } => c == cell && want(line),
        KvmEvent::Halted { cell: c, reason } => c == cell && *reason != HaltReason::CellState(2),
        _ => false,
    });
    match event {
        Some(KvmEvent::Console { line, .. }) => Ok(line),
        Some(KvmEvent::Halted { reason, .. }) => bail!("cell {cell} stopped: {reason}"),
        _ => bail!("cell {cell} hung (no answer within {GUEST_TIMEOUT:?})"),
    }
}

/// Runs `guest` as a timing cell (mode `r` or `m`) with `rounds`, and returns the time its
/// loop took by the guest's PM timer.
fn timed_run(events: &EventQueue, name: &str, timer: &mut KvmCell) -> Result<Duration> {
    timer.start()?;
    wait_line(events, name, |l| l == "go")?;
    let started = Instant::now();
    wait_line(events, name, |l| l == "done")?;
    let host = started.elapsed();
    let ticks = wait_line(events, name, |l| l.len() == 8)?;
    let ticks = u32::from_str_radix(&ticks, 16).context("the guest's tick count")?;
    // The PM timer wraps after 4.69 s: beyond that, the host's clock is the better one.
    let guest = Duration::from_secs_f64(f64::from(ticks) / PM_TIMER_HZ);
    Ok(if host > Duration::from_secs(4) {
        host
    } else {
        guest
    })
}

fn patched(guest: &Guest, rounds: u64) -> Result<Guest> {
    let mut guest = guest.clone();
    let rounds = u32::try_from(rounds).context("too many rounds for the guest")?;
    guest
        .patch_u32("rounds", rounds)
        .context("the guest has no `rounds`")?;
    Ok(guest)
}

/// `iters` doorbell round trips between two KVM cells.
pub fn kvm_kvm_rtt(guest: &Guest, cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let guest = patched(guest, iters)?;
    let wiring = link("kvm-kvm")?;
    let events = Arc::new(EventQueue::new()?);
    let mut echo = cell("echo", &guest, &wiring, 1, "e10", cpus[1], &events)?;
    let mut ringer = cell("ringer", &guest, &wiring, 0, "r01", cpus[0], &events)?;
    echo.start()?;
    let elapsed = timed_run(&events, "ringer", &mut ringer)?;
    ensure!(
        ringer.exits().mmio == test_guests::IVSHMEM_SETUP_MMIO,
        "doorbells left the kernel: {:?}",
        ringer.exits()
    );
    Ok(elapsed)
}

/// `iters` doorbell round trips between this thread (a process peer) and a KVM cell.
pub fn kvm_process_rtt(guest: &Guest, cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let wiring = link("kvm-process")?;
    let effects = {
        let mut model = wiring.model();
        model.set_interrupt_gate(1, InterruptGate::Endpoint);
        model.peer_attached(1)
    };
    wiring.deliver(&effects);
    let events = Arc::new(EventQueue::new()?);
    let mut echo = cell("kvm-echo", guest, &wiring, 0, "e01", cpus[1], &events)?;
    echo.start()?;
    let memory = wiring.memory().clone();
    run_pinned(cpus[0], move || {
        let kvm = &memory.interrupts[0][0];
        let own = &memory.interrupts[1][0];
        let wait = || -> Result<()> {
            let fd = own.fd();
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            let n = nix::poll::poll(&mut fds, PollTimeout::from(60_000u16))?;
            ensure!(n == 1, "the KVM cell did not answer within 60 s");
            own.drain()?;
            Ok(())
        };
        // The state change 0 -> 1 says the guest is ready.
        wait()?;
        let start = Instant::now();
        for _ in 0..iters {
            kvm.signal()?;
            wait()?;
        }
        Ok(start.elapsed())
    })
}

/// `iters` BAR0 reads, each an MMIO exit to user space.
pub fn mmio_exit(guest: &Guest, cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let guest = patched(guest, iters)?;
    let wiring = link("mmio-exit")?;
    let events = Arc::new(EventQueue::new()?);
    let mut reader = cell("reader", &guest, &wiring, 0, "m01", cpus[0], &events)?;
    let elapsed = timed_run(&events, "reader", &mut reader)?;
    ensure!(
        reader.exits().mmio == test_guests::IVSHMEM_SETUP_MMIO + iters,
        "expected one exit per read: {:?}",
        reader.exits()
    );
    Ok(elapsed)
}

// ---- ping-kvm / ping-process: ICMP echo from Linux to a network cell through the TAP bridge --

/// Where `scripts/build-inmates` puts the network inmate (relative to the repository).
const NET_INMATE: &str = "inmates/target/x86_64-unknown-none/release/net-inmate.bin";
/// The network cell's address (each system lives in a network namespace of its own).
const PING_CELL_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 0, 2);
/// ICMP payload of the ping rows (`ping`'s default).
const PING_PAYLOAD: usize = 56;
/// How long a system may take to bring its link up.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// The rows `ping-kvm` and `ping-process` (metric `rtt_ns`): Linux's ICMP echo, from a raw
/// socket in a network namespace, through the TAP bridge (`vnet::bridge`) and an MSI-X link to
/// the vnet cell services (`vnet_services`): the network inmate in a KVM cell, or the same
/// services in a process cell's loop (`vnet_cell::cell::Cell`). Both systems run on the
/// hosted hypervisor in this process with the same link; needs root, `/dev/kvm` (`ping-kvm`)
/// and the built inmate (`scripts/build-inmates`).
fn ping_rows(settings: &Settings, report: &mut SuiteReport) -> Result<()> {
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join(NET_INMATE);
    for (case, kvm) in [("ping-kvm", true), ("ping-process", false)] {
        let missing = if !vnet::tap::is_root() {
            Some("needs root (network namespace, TAP device)".to_string())
        } else if kvm {
            match kvm_available() {
                Err(reason) => Some(reason),
                Ok(()) if !image.exists() => Some(format!(
                    "{} is missing: run scripts/build-inmates",
                    image.display()
                )),
                Ok(()) => None,
            }
        } else {
            None
        };
        if let Some(reason) = missing {
            report.entries.push(Entry::NotAvailable {
                case,
                metric: Metric::RttNs,
                reason,
            });
            continue;
        }
        settings.say(format!(
            "kvm/{case}: ICMP echo from Linux through the TAP bridge to the {} (PVM)",
            if kvm {
                "network inmate (KVM cell)"
            } else {
                "network process cell"
            }
        ));
        let net = PingNet::start(kvm.then_some(image.as_path()), settings.cpus)
            .with_context(|| format!("{case}: starting the system"))?;
        let mut seq = 0u16;
        let measured = measure(settings, case, Metric::RttNs, 0, |iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                seq = seq.wrapping_add(1);
                total += net
                    .echo
                    .ping(PING_CELL_IP, seq, PING_PAYLOAD)
                    .with_context(|| format!("echo {seq} to {PING_CELL_IP}"))?;
            }
            Ok(total)
        })?;
        report.entries.push(Entry::Measured(measured));
    }
    report.notes.push(format!(
        "ping-kvm, ping-process: measured under PVM; ICMP echo RTT, {PING_PAYLOAD}-byte payload, \
         Linux raw socket -> TAP -> bridge -> MSI-X link -> the vnet services: the network inmate \
         (main loop in ring 3, native under PVM) or the process cell; both on the hosted hypervisor"
    ));
    Ok(())
}

/// The hosted hypervisor's output: reports the first "listening" line, drops the rest.
struct Listening(Option<std::sync::mpsc::Sender<()>>);

impl std::io::Write for Listening {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if bytes.windows(9).any(|w| w == b"listening") {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A running vnet system for the ping rows (see [`ping_rows`]); stopped on drop.
struct PingNet {
    /// A raw ICMP socket inside the namespace.
    echo: crate::vnet_cell::netns::EchoSocket,
    stop: hypervisor::cells::StopHandle,
    hypervisor: Option<std::thread::JoinHandle<()>>,
    bridge_stop: Arc<nix::sys::eventfd::EventFd>,
    bridge: Option<std::thread::JoinHandle<()>>,
    cell_stop: Arc<nix::sys::eventfd::EventFd>,
    cell: Option<std::thread::JoinHandle<()>>,
    _ns: crate::vnet_cell::netns::Netns,
    dir: std::path::PathBuf,
}

impl PingNet {
    /// Starts the system: the network inmate from `image` in a KVM cell, or (`None`) the
    /// process cell's loop in a thread; waits until the bridge sees the link up and Linux
    /// has the cell's MAC (one echo answered).
    fn start(image: Option<&Path>, cpus: [usize; 2]) -> Result<PingNet> {
        use crate::vnet_cell::netns::{self, EchoSocket, Netns};
        use nix::sys::eventfd::{EfdFlags, EventFd};
        use std::sync::mpsc;

        let pid = std::process::id();
        let kind = if image.is_some() { "kvm" } else { "proc" };
        let ns_name = format!("ivb-inn-{kind}-{pid}");
        let ns = Netns::create(&ns_name).with_context(|| format!("network namespace {ns_name}"))?;
        let dir = std::env::temp_dir().join(format!("ivbench-inn-{kind}-{pid}"));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("control.sock");
        let cell = match image {
            Some(image) => format!(
                "kind = \"kvm\"\nmemory = \"6M\"\nimage = \"{}\"\ncmdline = \"ip={PING_CELL_IP}/24 heap=0x400000\"",
                image.display()
            ),
            None => "kind = \"process\"\ncommand = \"/bin/true\"".into(),
        };
        let toml = format!(
            r#"
[system]
name = "ivbench-ping-{kind}-{pid}"
control_socket = "{socket}"
allow_shared_cpus = true

[[cells]]
name = "rtos-net"
cpus = [{cell_cpu}]
{cell}

[[cells]]
name = "linux-net"
kind = "process"
cpus = [{bridge_cpu}]
command = "/bin/true"

[[links]]
name = "net0"
peers = ["rtos-net", "linux-net"]
protocol = "ethernet"
output_size = "256K"
interrupts = "msix"
vectors = 1
"#,
            socket = socket.display(),
            cell_cpu = cpus[1],
            bridge_cpu = cpus[0],
        );
        let valid = hypervisor::config::SystemConfig::from_toml_str(&toml)?
            .validate()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let system = hypervisor::control::SystemSpec::from_config(&valid);
        let kvm_system = hypervisor::kvm::KvmSystem::from_config(&valid);
        let stop = hypervisor::cells::StopHandle::new()?;
        let options = hypervisor::cells::RunOptions {
            spawn: false,
            stop_when_cells_exit: false,
            ..hypervisor::cells::RunOptions::new(&socket)
        };
        let hv_stop = stop.clone();
        let (listening_tx, listening) = mpsc::channel();
        let hypervisor = std::thread::spawn(move || {
            let mut out = Listening(Some(listening_tx));
            let mut err = std::io::sink();
            if let Err(e) = hypervisor::cells::run_system(
                &system,
                &kvm_system,
                &options,
                Some(&hv_stop),
                &mut out,
                &mut err,
            ) {
                eprintln!("ivbench: the hosted hypervisor stopped: {e}");
            }
        });
        // Its first output line ("listening on ...") says the control socket is ready.
        listening
            .recv_timeout(LINK_UP_TIMEOUT)
            .context("the hosted hypervisor did not start listening")?;
        let attach = |cell: &str| {
            linux_uio_client::Endpoint::attach_hosted(&socket, cell, Some("net0"))
                .with_context(|| format!("attaching as {cell}"))
        };
        let eventfd = || -> Result<Arc<EventFd>> {
            Ok(Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?))
        };

        let (events_tx, events) = mpsc::channel();
        let bridge_stop = eventfd()?;
        let (dev, irq) = attach("linux-net")?.into_parts();
        let link = vnet::VnetLink::new(dev, vnet::LinkConfig::default())?;
        let bridge = {
            let stop = Arc::clone(&bridge_stop);
            let ns_name = ns_name.clone();
            std::thread::spawn(move || {
                let run = || -> Result<()> {
                    netns::enter(&ns_name)?;
                    let tap = vnet::tap::Tap::open("inn0")?;
                    tap.configure(Some("10.0.0.1/24"), 1500)?;
                    let mut bridge = vnet::bridge::Bridge::new(
                        link,
                        irq,
                        tap,
                        vnet::bridge::BridgeConfig::default(),
                    );
                    bridge.set_link_hook(Box::new(move |e| {
                        let _ = events_tx.send(e);
                    }));
                    bridge.run(Some(stop.as_fd()))?;
                    Ok(())
                };
                if let Err(e) = run() {
                    eprintln!("ivbench: TAP bridge: {e:#}");
                }
            })
        };
        let cell_stop = eventfd()?;
        let cell = match image {
            Some(_) => None,
            None => {
                let (dev, irq) = attach("rtos-net")?.into_parts();
                let link = vnet::VnetLink::new(dev, vnet::LinkConfig::default())?;
                let stop = Arc::clone(&cell_stop);
                Some(std::thread::spawn(move || {
                    let services = crate::vnet_cell::services::ServiceConfig::new(
                        vnet::smoltcp::wire::Ipv4Cidr::new(PING_CELL_IP, 24),
                    );
                    let mut cell = crate::vnet_cell::cell::Cell::new(
                        link,
                        irq,
                        &services,
                        crate::vnet_cell::cell::CellConfig::default(),
                    );
                    if let Err(e) = cell.run(Some(stop.as_fd())) {
                        eprintln!("ivbench: network cell: {e}");
                    }
                }))
            }
        };
        let net = PingNet {
            echo: {
                let ns_name = ns_name.clone();
                std::thread::spawn(move || -> Result<EchoSocket> {
                    netns::enter(&ns_name)?;
                    Ok(EchoSocket::open(Duration::from_secs(5))?)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the echo socket thread panicked"))??
            },
            stop,
            hypervisor: Some(hypervisor),
            bridge_stop,
            bridge: Some(bridge),
            cell_stop,
            cell,
            _ns: ns,
            dir,
        };
        match events.recv_timeout(LINK_UP_TIMEOUT) {
            Ok(vnet::LinkEvent::Up) => {}
            other => bail!("the link did not come up: {other:?}"),
        }
        // The first echo also resolves ARP both ways (the cell retries after a second).
        net.echo
            .ping(PING_CELL_IP, 0, PING_PAYLOAD)
            .context("the first echo")?;
        Ok(net)
    }
}

impl Drop for PingNet {
    fn drop(&mut self) {
        let _ = self.cell_stop.write(1);
        if let Some(cell) = self.cell.take() {
            let _ = cell.join();
        }
        let _ = self.bridge_stop.write(1);
        if let Some(bridge) = self.bridge.take() {
            let _ = bridge.join();
        }
        self.stop.stop();
        if let Some(hypervisor) = self.hypervisor.take() {
            let _ = hypervisor.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
