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
