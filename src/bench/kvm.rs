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
//! - `telemetry-kvm`: the telemetry inmate (`inmates/telemetry`, producer loop in ring 3) in
//!   a KVM cell → the tokio consumer in a process cell, `p50_ns`/`p99_ns` at a paced rate and
//!   `max_rate_per_s` flat out; `telemetry-process`: the same system with the producer a
//!   process cell, in the same run ([`telemetry_rows`]).
//! - `ping-kvm`: Linux's ICMP echo through the TAP bridge to the network inmate
//!   (`inmates/net`, loop in ring 3) in a KVM cell; `ping-process`: the same services in a
//!   process cell, same link ([`ping_rows`]).
//!
//! On a PVM host (`/dev/kvm` without VMX) guest ring-0 code is emulated, so these figures
//! say nothing about real hardware.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
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
use super::hosted::HostedSystem;
use super::measure::{measure, Measurement, Metric, OneWayRun, Settings};
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
    report.entries.extend(telemetry_rows(settings)?);
    let mut ping_notes = SuiteReport::new(SUITE);
    ping_rows(settings, &mut ping_notes)?;
    report.entries.append(&mut ping_notes.entries);
    report.comparisons = comparisons();
    report.comparisons.extend(
        [Metric::P50Ns, Metric::P99Ns, Metric::MaxRatePerS].map(|metric| Comparison {
            case: "telemetry-kvm",
            baseline: "telemetry-process",
            metric,
            target: None,
        }),
    );
    report.notes = vec![
        cpu_note(cpus),
        "kvm-kvm: guest loop timed by the guest's PM timer (24-bit, 3.58 MHz); both doorbells on the fast path (ioeventfd with datamatch -> eventfd -> irqfd on an MSI route), no exit to user space".into(),
        "kvm-process: process side writes the KVM cell's eventfd and polls its own; the guest's handler rings back through its ioeventfd".into(),
        "mmio-exit: per BAR0 read, including three emulated loop instructions".into(),
        "on a PVM /dev/kvm (no VMX) guest ring-0 code is emulated: these figures say nothing about real hardware".into(),
    ];
    report.notes.extend(telemetry_notes());
    report.notes.append(&mut ping_notes.notes);
    Ok(report)
}

/// The first note: which side of each case runs on which CPU.
fn cpu_note(cpus: [usize; 2]) -> String {
    format!(
        "CPUs {} and {}: the timing side (parent process, ringer vCPU, process peer, BAR0 \
         reader) on CPU {}, the echoing side (child process, echo vCPU, the KVM cell of \
         kvm-process) on CPU {}",
        cpus[0], cpus[1], cpus[0], cpus[1]
    )
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

/// Samples per second of the latency runs of `telemetry-kvm` and `telemetry-process` (well
/// below what the ring-3 inmate sustains under PVM).
pub const TELEMETRY_PACED_RATE: u64 = 1000;
/// Samples of a flat-out run (about a second for the inmate under PVM).
const TELEMETRY_FLAT: u64 = 100_000;
/// Samples per publish when flat out (as the `telemetry` suite).
const TELEMETRY_BATCH: usize = 32;
/// Guard on one telemetry run.
const TELEMETRY_TIMEOUT: Duration = Duration::from_secs(120);

/// Who produces in a telemetry run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TelemetryProducer {
    /// The telemetry inmate (`inmates/telemetry`, loop in ring 3) in a KVM cell.
    Kvm,
    /// `telemetry::ProducerCell` in a thread attached as a process cell.
    Process,
}

/// The telemetry inmate's image, if `scripts/build-inmates` built it.
fn telemetry_image() -> std::result::Result<PathBuf, String> {
    let image = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("inmates/target/x86_64-unknown-none/release/telemetry-inmate.bin");
    if image.exists() {
        Ok(image)
    } else {
        Err(format!(
            "{} is missing: build it with scripts/build-inmates",
            image.display()
        ))
    }
}

/// Whether `/dev/kvm` is PVM (guest ring 0 emulated, ring 3 native).
fn under_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// One telemetry run: a system (`hypervisor::cells::run_system`) with the producer (peer 0,
/// on `cpus[1]`) and this thread's tokio consumer (peer 1, on `cpus[0]`) on one MSI-X link;
/// `count` samples at `rate` (`None`: flat out), every one checked.
fn telemetry_run(
    cpus: [usize; 2],
    producer: TelemetryProducer,
    image: &Path,
    rate: Option<u64>,
    count: u64,
) -> Result<OneWayRun> {
    use std::sync::atomic::{AtomicU64, Ordering};

    static RUN: AtomicU64 = AtomicU64::new(0);
    let tag = format!(
        "{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir().join(format!("ivbench-telemetry-kvm-{tag}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let socket = dir.join("control.sock");
    let batch = if rate.is_some() { 1 } else { TELEMETRY_BATCH };
    let producer_cell = match producer {
        TelemetryProducer::Kvm => format!(
            "kind = \"kvm\"\nmemory = \"1M\"\nimage = \"{}\"\ncmdline = \"rate={} count={count} batch={batch} ring=3\"",
            image.display(),
            rate.unwrap_or(0)
        ),
        TelemetryProducer::Process => "kind = \"process\"\ncommand = \"/bin/true\"".into(),
    };
    let toml = format!(
        r#"
[system]
name = "ivbench-telemetry-{tag}"
control_socket = "{socket}"
allow_shared_cpus = true

[[cells]]
name = "producer"
cpus = [{producer_cpu}]
{producer_cell}

[[cells]]
name = "consumer"
kind = "process"
cpus = [{consumer_cpu}]
command = "/bin/true"

[[links]]
name = "telemetry"
peers = ["producer", "consumer"]
protocol = "telemetry"
rw_size = 0
output_size = "64K"
interrupts = "msix"
vectors = 1
"#,
        socket = socket.display(),
        producer_cpu = cpus[1],
        consumer_cpu = cpus[0],
    );
    let result = (|| {
        let system = HostedSystem::start(&toml)?;
        let socket = system.socket().to_path_buf();
        let socket = socket.as_path();
        let measured = std::thread::scope(|scope| {
            let producing = (producer == TelemetryProducer::Process).then(|| {
                scope.spawn(move || {
                    run_pinned(cpus[1], || process_producer(socket, rate, count, batch))
                })
            });
            let received = run_pinned(cpus[0], || consume_samples(socket, count));
            if let Some(p) = producing {
                p.join()
                    .map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
            }
            received
        });
        let stopped = system.stop();
        let value = measured?;
        stopped?;
        Ok(value)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The process-cell producer: `telemetry::ProducerCell` attached as cell `producer`.
fn process_producer(socket: &Path, rate: Option<u64>, count: u64, batch: usize) -> Result<()> {
    use linux_uio_client::Endpoint;
    use telemetry::process::ProcessPlatform;
    use telemetry::{ProducerCell, ProducerConfig};

    let endpoint = Endpoint::attach_hosted(socket, "producer", Some("telemetry"))?;
    let peer = endpoint.the_peer().context("a 2-peer link")?;
    let (dev, interrupt) = endpoint.into_parts();
    let mut platform = ProcessPlatform::new(interrupt);
    let config = ProducerConfig {
        peer,
        rate_per_s: rate,
        count: Some(count),
        batch,
        max_capacity: None,
    };
    let mut cell =
        ProducerCell::new(dev, config).map_err(|e| anyhow::anyhow!("producer cell: {e}"))?;
    let stats = cell.run(&mut platform);
    if let Some(e) = platform.error() {
        bail!("producer interrupt wait: {e}");
    }
    stats.map_err(|e| anyhow::anyhow!("producer cell: {e}"))?;
    Ok(())
}

/// The tokio consumer (a `Channel` in interrupt mode, as `examples/telemetry_consumer.rs`):
/// `count` samples, in order and whole, each timestamped at receipt.
fn consume_samples(socket: &Path, count: u64) -> Result<OneWayRun> {
    use linux_uio_client::{Channel, ChannelOptions, Endpoint, WaitMode};
    use telemetry::process::monotonic_ns;
    use telemetry::{Sample, SampleCheck};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async {
        let endpoint = Endpoint::attach_hosted(socket, "consumer", Some("telemetry"))?;
        let mut channel = Channel::new(
            endpoint,
            ChannelOptions {
                wait: WaitMode::Interrupt,
                ..ChannelOptions::default()
            },
        )?;
        let mut check = SampleCheck::default();
        let mut run = OneWayRun {
            latencies_ns: Vec::with_capacity(count as usize),
            first_ns: 0,
            last_ns: 0,
            idle_cpu_pct: None,
        };
        let mut records = channel.records::<Sample>();
        while check.received < count {
            let item = tokio::time::timeout(TELEMETRY_TIMEOUT, records.next())
                .await
                .context("no sample within the timeout")?;
            let sample = match item {
                Some(Ok(sample)) => sample,
                Some(Err(e)) => return Err(e).context("telemetry consumer"),
                None => bail!("the record stream ended early"),
            };
            let now = monotonic_ns();
            if check.received == 0 {
                run.first_ns = now;
            }
            run.last_ns = now;
            check.check(&sample);
            run.latencies_ns
                .push(now.saturating_sub(sample.timestamp_ns));
        }
        ensure!(
            check.is_clean(),
            "the pipe lost, reordered or tore samples: {check:?}"
        );
        Ok(run)
    })
}

/// The `telemetry-kvm` and `telemetry-process` rows (`p50_ns`, `p99_ns` at
/// [`TELEMETRY_PACED_RATE`], `max_rate_per_s` flat out), measured in one run; `NotAvailable`
/// rows without KVM or without the inmate image.
pub fn telemetry_rows(settings: &Settings) -> Result<Vec<Entry>> {
    let paced = ((settings.run_time.as_secs_f64() * TELEMETRY_PACED_RATE as f64) as u64)
        .max(500.max(settings.min_iters));
    let available = kvm_available().and_then(|()| telemetry_image());
    let mut entries = Vec::new();
    for (case, producer) in [
        ("telemetry-kvm", TelemetryProducer::Kvm),
        ("telemetry-process", TelemetryProducer::Process),
    ] {
        let image = match (producer, &available) {
            (TelemetryProducer::Process, _) => PathBuf::new(),
            (TelemetryProducer::Kvm, Ok(image)) => image.clone(),
            (TelemetryProducer::Kvm, Err(reason)) => {
                for metric in [Metric::P50Ns, Metric::P99Ns, Metric::MaxRatePerS] {
                    entries.push(Entry::NotAvailable {
                        case,
                        metric,
                        reason: reason.clone(),
                    });
                }
                continue;
            }
        };
        let (mut p50, mut p99, mut rate) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..settings.runs.max(1) {
            settings.say(format_args!(
                "kvm/{case}: run {}/{}: {paced} samples at {TELEMETRY_PACED_RATE}/s, {TELEMETRY_FLAT} flat out",
                run + 1,
                settings.runs
            ));
            let mut latency = telemetry_run(
                settings.cpus,
                producer,
                &image,
                Some(TELEMETRY_PACED_RATE),
                paced,
            )
            .with_context(|| format!("{case}: paced run"))?;
            p50.push(latency.percentile(0.50));
            p99.push(latency.percentile(0.99));
            let flat = telemetry_run(settings.cpus, producer, &image, None, TELEMETRY_FLAT)
                .with_context(|| format!("{case}: flat-out run"))?;
            rate.push(flat.rate());
        }
        for (metric, samples, iters) in [
            (Metric::P50Ns, p50, paced),
            (Metric::P99Ns, p99, paced),
            (Metric::MaxRatePerS, rate, TELEMETRY_FLAT),
        ] {
            entries.push(Entry::Measured(Measurement {
                case,
                metric,
                samples,
                iters,
            }));
        }
    }
    Ok(entries)
}

/// The notes of the telemetry rows: how they were measured, and under what.
fn telemetry_notes() -> Vec<String> {
    let under = if under_pvm() {
        "measured under PVM (kvm_pvm: guest ring 0 emulated, ring 3 native)"
    } else {
        "measured under hardware-assisted KVM"
    };
    vec![
        format!("telemetry-kvm: {under}; the telemetry inmate's producer loop in ring 3, timestamps = guest TSC on the host's CLOCK_MONOTONIC (comm-region clock epoch); tokio consumer in a process cell, MSI-X link"),
        format!("telemetry-process: {under} run, same system with the producer a process cell (telemetry::ProducerCell in a thread): the baseline beside telemetry-kvm"),
        format!("telemetry-*: p50/p99 one-way latency at {TELEMETRY_PACED_RATE} samples/s (1 per publish), max_rate_per_s with {TELEMETRY_FLAT} samples flat out ({TELEMETRY_BATCH} per publish); every sample checked (order, gaps, tears)"),
    ]
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
pub fn ping_rows(settings: &Settings, report: &mut SuiteReport) -> Result<()> {
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
            "kvm/{case}: ICMP echo from Linux through the TAP bridge to the {}",
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
    let under = if under_pvm() {
        "measured under PVM (kvm_pvm: guest ring 0 emulated, ring 3 native)"
    } else {
        "measured under hardware-assisted KVM"
    };
    report.notes.push(format!(
        "ping-kvm, ping-process: {under}; ICMP echo RTT, {PING_PAYLOAD}-byte payload, \
         Linux raw socket -> TAP -> bridge -> MSI-X link -> the vnet services: the network inmate \
         (main loop in ring 3, native under PVM) or the process cell; both on the hosted hypervisor"
    ));
    Ok(())
}

/// A running vnet system for the ping rows (see [`ping_rows`]); stopped on drop.
struct PingNet {
    /// A raw ICMP socket inside the namespace.
    echo: crate::vnet_cell::netns::EchoSocket,
    /// Stopped after the cells (fields drop after `Drop::drop`).
    _system: super::hosted::HostedSystem,
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
        let system = super::hosted::HostedSystem::start(&toml)?;
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
            _system: system,
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_note;

    #[test]
    fn the_cpu_note_says_what_runs_on_each_cpu() {
        let note = cpu_note([2, 5]);
        assert!(note.contains("on CPU 2"), "{note}");
        assert!(note.contains("echoing side"), "{note}");
        assert!(note.ends_with("on CPU 5"), "{note}");
    }
}
