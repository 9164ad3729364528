//! Suite `doorbell`: cross-process wake-up round trips between two processes pinned to two
//! cores. The parent (on `cpus[0]`) forks a child (pinned to `cpus[1]`) per timed run; both
//! block in the kernel while waiting, so every round trip is two real wake-ups.
//!
//! The forked child only makes system calls (no allocation, no locks) and leaves with `_exit`,
//! so forking from a multi-threaded process (the test harness) is safe.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Pid};

use super::hosted::{with_hosted_link, BenchLink};
use super::measure::{measure, Metric, Settings};
use super::pin::run_pinned;
use super::report::{Comparison, Entry, SuiteReport, Target};

/// The suite's name.
pub const SUITE: &str = "doorbell";

/// Child -> parent handshake value: pinned and ready.
const READY: u64 = 1;
/// Child -> parent handshake value: could not pin itself.
const PIN_FAILED: u64 = 2;
/// Parent -> child: stop (eventfd case).
const STOP: u64 = 3;
/// How long the parent waits for the child's handshake before calling it broken.
const HANDSHAKE_TIMEOUT_MS: u16 = 10_000;

/// The ratios this suite reports.
pub fn comparisons() -> Vec<Comparison> {
    vec![
        Comparison {
            case: "ivshmem",
            baseline: "eventfd",
            metric: Metric::RttNs,
            target: Some(Target::AtMost(1.3)),
        },
        Comparison {
            case: "uds",
            baseline: "eventfd",
            metric: Metric::RttNs,
            target: None,
        },
        Comparison {
            case: "pipe",
            baseline: "eventfd",
            metric: Metric::RttNs,
            target: None,
        },
        Comparison {
            case: "tcp",
            baseline: "eventfd",
            metric: Metric::RttNs,
            target: None,
        },
    ]
}

/// Runs every case of the suite.
pub fn run(settings: &Settings) -> Result<SuiteReport> {
    let cpus = settings.cpus;
    let mut report = SuiteReport::new(SUITE);
    settings.say("doorbell/eventfd: two processes, two eventfds, blocking reads");
    report.entries.push(Entry::Measured(measure(
        settings,
        "eventfd",
        Metric::RttNs,
        0,
        |iters| eventfd_rtt(cpus, iters),
    )?));
    settings.say("doorbell/uds: two processes, SOCK_SEQPACKET socketpair");
    report.entries.push(Entry::Measured(measure(
        settings,
        "uds",
        Metric::RttNs,
        0,
        |iters| uds_rtt(cpus, iters),
    )?));
    settings.say("doorbell/pipe: two processes, one pipe per direction");
    report.entries.push(Entry::Measured(measure(
        settings,
        "pipe",
        Metric::RttNs,
        0,
        |iters| pipe_rtt(cpus, iters),
    )?));
    settings.say("doorbell/tcp: two processes, TCP over 127.0.0.1 with TCP_NODELAY");
    report.entries.push(Entry::Measured(measure(
        settings,
        "tcp",
        Metric::RttNs,
        0,
        |iters| tcp_rtt(cpus, iters),
    )?));
    settings.say("doorbell/ivshmem: probing");
    match ivshmem_rtt(cpus, settings.min_iters)? {
        Some(_) => report.entries.push(Entry::Measured(measure(
            settings,
            "ivshmem",
            Metric::RttNs,
            0,
            |iters| ivshmem_rtt(cpus, iters)?.context("the ivshmem doorbell endpoint disappeared"),
        )?)),
        None => report.entries.push(Entry::NotAvailable {
            case: "ivshmem",
            metric: Metric::RttNs,
            reason: "not available yet (needs the hosted hypervisor's doorbell endpoint)".into(),
        }),
    }
    report.comparisons = comparisons();
    report.notes = vec![
        format!(
            "parent pinned to CPU {}, forked child pinned to CPU {}; rtt = time of N round trips / N",
            cpus[0], cpus[1]
        ),
        "eventfd: parent writes 1 to eventfd A, child's blocking read wakes, child writes eventfd B, parent's blocking read wakes".into(),
        "uds / pipe / tcp: 8-byte sequence number written by the parent and echoed by the child, blocking read/write; uds = AF_UNIX SOCK_SEQPACKET socketpair, pipe = one pipe per direction, tcp = 127.0.0.1 with TCP_NODELAY".into(),
    ];
    Ok(report)
}

/// THE PLACE FOR THE IVSHMEM CASE: round trips of ivshmem doorbell interrupts between two
/// process cells of the hosted hypervisor, `iters` of them, parent side on `cpus[0]`, peer cell
/// on `cpus[1]`; returns the time of the timed part like [`eventfd_rtt`].
///
/// A hosted hypervisor is started in this process (its control socket served by a thread);
/// two cells `ping` and `pong` attach over it as hosted endpoints, then a forked child (pinned
/// to `cpus[1]`) drives `pong`. Each round trip is: `ping` writes DOORBELL (pong, 0), pong's
/// blocking `wait_interrupt` wakes, pong writes DOORBELL (ping, 0), ping's `wait_interrupt`
/// wakes; i.e. the full register emulation and INT_CONTROL handling of the endpoint on top of
/// the eventfds. The hypervisor is not on the doorbell path (as with KVM's ioeventfd/irqfd).
/// The stop request and the child's handshake travel through the two output sections.
///
/// Never returns `Ok(None)` on Linux; the `Option` stays for platforms without the backend.
pub fn ivshmem_rtt(cpus: [usize; 2], iters: u64) -> Result<Option<Duration>> {
    run_pinned(cpus[0], || hosted_doorbell_rtt(cpus, iters).map(Some))
}

/// Handshake and stop flags, in byte 0 of an output section.
const FLAG_READY: u8 = 1;
const FLAG_PIN_FAILED: u8 = 2;
const FLAG_STOP: u8 = 3;

fn hosted_doorbell_rtt(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    use linux_uio_client::hosted::HostedEndpoint;

    let link = BenchLink {
        name: "doorbell",
        cells: [("ping", cpus[0]), ("pong", cpus[1])],
        output_size: 4096,
    };
    with_hosted_link("doorbell", &link, |socket| {
        let ping = HostedEndpoint::attach(socket, "ping").context("attaching cell ping")?;
        let pong = HostedEndpoint::attach(socket, "pong").context("attaching cell pong")?;
        let (ping, pong) = (&ping.links()[0], &pong.links()[0]);
        ping.enable_interrupts();
        pong.enable_interrupts();
        // ping's own output, seen read-write by ping and read-only by pong; and back.
        let ping_flag = ping.output(0).context("no output section")?.as_ptr();
        let ping_flag_seen = pong.output(0).context("no output section")?.as_ptr();
        let pong_flag = pong.output(1).context("no output section")?.as_ptr();
        let pong_flag_seen = ping.output(1).context("no output section")?.as_ptr();
        // SAFETY: the child only makes system calls and atomic/volatile accesses on
        // memory and fds that already exist (no allocation, no locks) and leaves with
        // _exit, which is what fork in a multi-threaded process allows.
        match unsafe { fork() }.context("fork")? {
            ForkResult::Child => {
                let flag = if pin_without_allocating(cpus[1]).is_ok() {
                    FLAG_READY
                } else {
                    FLAG_PIN_FAILED
                };
                // SAFETY: byte 0 of pong's own, writable output section.
                unsafe { pong_flag.write_volatile(flag) };
                pong.ring(0);
                let code = loop {
                    if pong.wait_interrupt().is_err() {
                        break 2;
                    }
                    // SAFETY: byte 0 of ping's output section, mapped read-only here.
                    if unsafe { ping_flag_seen.read_volatile() } == FLAG_STOP {
                        break 0;
                    }
                    pong.ring(0);
                };
                // SAFETY: _exit ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                let timed = (|| -> Result<Duration> {
                    ping.wait_interrupt_timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS.into()))
                        .context("waiting for the pong cell")?
                        .context("the pong cell did not answer")?;
                    // SAFETY: byte 0 of pong's output section, mapped read-only here.
                    match unsafe { pong_flag_seen.read_volatile() } {
                        FLAG_READY => {}
                        FLAG_PIN_FAILED => {
                            bail!("the pong cell could not pin itself to CPU {}", cpus[1])
                        }
                        other => bail!("unexpected handshake flag {other} from the pong cell"),
                    }
                    let start = Instant::now();
                    for _ in 0..iters {
                        ping.ring(1);
                        ping.wait_interrupt()
                            .context("waiting for pong's doorbell")?;
                    }
                    Ok(start.elapsed())
                })();
                // Stop the child in every case, then reap it.
                // SAFETY: byte 0 of ping's own, writable output section.
                unsafe { ping_flag.write_volatile(FLAG_STOP) };
                ping.ring(1);
                let reaped = reap(child);
                let elapsed = timed?;
                reaped?;
                Ok(elapsed)
            }
        }
    })
}

/// `iters` eventfd ping-pongs between this process (on `cpus[0]`) and a forked child (on
/// `cpus[1]`): two eventfds, blocking reads on both sides.
pub fn eventfd_rtt(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    run_pinned(cpus[0], || {
        let ping = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).context("eventfd")?;
        let pong = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).context("eventfd")?;
        // SAFETY: the child only makes system calls on values that already exist (no
        // allocation, no locks) and leaves with _exit, which is what fork in a multi-threaded
        // process allows.
        match unsafe { fork() }.context("fork")? {
            ForkResult::Child => {
                let code = eventfd_child(&ping, &pong, cpus[1]);
                // SAFETY: _exit ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                let timed = (|| {
                    await_handshake(pong.as_fd())?;
                    match pong.read().context("reading the child's handshake")? {
                        READY => {}
                        PIN_FAILED => {
                            bail!("the child process could not pin itself to CPU {}", cpus[1])
                        }
                        other => bail!("unexpected handshake value {other} from the child"),
                    }
                    let start = Instant::now();
                    for _ in 0..iters {
                        ping.write(1).context("eventfd write")?;
                        pong.read().context("eventfd read")?;
                    }
                    Ok(start.elapsed())
                })();
                // Stop the child in every case, then reap it.
                let _ = ping.write(STOP);
                let reaped = reap(child);
                let elapsed = timed?;
                reaped?;
                Ok(elapsed)
            }
        }
    })
}

fn eventfd_child(ping: &EventFd, pong: &EventFd, cpu: usize) -> i32 {
    if pin_without_allocating(cpu).is_err() {
        let _ = pong.write(PIN_FAILED);
        return 1;
    }
    if pong.write(READY).is_err() {
        return 2;
    }
    loop {
        match ping.read() {
            Ok(1) => {
                if pong.write(1).is_err() {
                    return 2;
                }
            }
            Ok(_) => return 0,
            Err(_) => return 2,
        }
    }
}

/// The two directions of a byte channel between parent and child (for a socket, both of one
/// side's ends are the same socket).
struct Wires {
    parent_rx: OwnedFd,
    parent_tx: OwnedFd,
    child_rx: OwnedFd,
    child_tx: OwnedFd,
}

impl Wires {
    /// One connected socket pair: each side reads and writes its own socket.
    fn sockets(parent: OwnedFd, child: OwnedFd) -> Result<Self> {
        Ok(Wires {
            parent_rx: parent.try_clone().context("dup")?,
            parent_tx: parent,
            child_rx: child.try_clone().context("dup")?,
            child_tx: child,
        })
    }
}

/// `iters` ping-pongs of an 8-byte message over an AF_UNIX SOCK_SEQPACKET socketpair between
/// this process (on `cpus[0]`) and a forked child (on `cpus[1]`), blocking on both sides.
pub fn uds_rtt(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let (parent, child) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("socketpair")?;
    echo_rtt(cpus, iters, Wires::sockets(parent, child)?)
}

/// `iters` ping-pongs of an 8-byte message over two pipes (one per direction), blocking.
pub fn pipe_rtt(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let (child_rx, parent_tx) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    let (parent_rx, child_tx) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    echo_rtt(
        cpus,
        iters,
        Wires {
            parent_rx,
            parent_tx,
            child_rx,
            child_tx,
        },
    )
}

/// `iters` ping-pongs of an 8-byte message over a TCP connection on 127.0.0.1 (TCP_NODELAY on
/// both ends), blocking.
pub fn tcp_rtt(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("bind 127.0.0.1")?;
    let parent = TcpStream::connect(listener.local_addr()?).context("connect to 127.0.0.1")?;
    let (child, _) = listener.accept().context("accept")?;
    drop(listener);
    parent.set_nodelay(true)?;
    child.set_nodelay(true)?;
    echo_rtt(cpus, iters, Wires::sockets(parent.into(), child.into())?)
}

/// Round trips of an 8-byte sequence number: the parent writes, the forked child echoes.
fn echo_rtt(cpus: [usize; 2], iters: u64, wires: Wires) -> Result<Duration> {
    run_pinned(cpus[0], move || {
        let Wires {
            parent_rx,
            parent_tx,
            child_rx,
            child_tx,
        } = wires;
        // SAFETY: as in `eventfd_rtt`: the child only makes system calls and leaves with _exit.
        match unsafe { fork() }.context("fork")? {
            ForkResult::Child => {
                drop((parent_rx, parent_tx));
                let code = echo_child(&child_rx, &child_tx, cpus[1]);
                // SAFETY: _exit ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                drop((child_rx, child_tx));
                let timed = (|| {
                    await_handshake(parent_rx.as_fd())?;
                    let mut status = [0u8; 1];
                    ensure!(
                        read_full(&parent_rx, &mut status)?,
                        "the child process closed its end"
                    );
                    match u64::from(status[0]) {
                        READY => {}
                        PIN_FAILED => {
                            bail!("the child process could not pin itself to CPU {}", cpus[1])
                        }
                        other => bail!("unexpected handshake value {other} from the child"),
                    }
                    let mut echo = [0u8; 8];
                    let start = Instant::now();
                    for seq in 0..iters {
                        write_full(&parent_tx, &seq.to_le_bytes()).context("write")?;
                        ensure!(
                            read_full(&parent_rx, &mut echo)?,
                            "the child process closed its end"
                        );
                        ensure!(u64::from_le_bytes(echo) == seq, "wrong echo from the child");
                    }
                    Ok(start.elapsed())
                })();
                // Closing our ends makes the child's read see end-of-file: it exits.
                drop((parent_rx, parent_tx));
                let reaped = reap(child);
                let elapsed = timed?;
                reaped?;
                Ok(elapsed)
            }
        }
    })
}

fn echo_child(rx: &OwnedFd, tx: &OwnedFd, cpu: usize) -> i32 {
    if pin_without_allocating(cpu).is_err() {
        let _ = write_full(tx, &[PIN_FAILED as u8]);
        return 1;
    }
    if write_full(tx, &[READY as u8]).is_err() {
        return 2;
    }
    let mut buf = [0u8; 8];
    loop {
        match read_full(rx, &mut buf) {
            Ok(true) => {
                if write_full(tx, &buf).is_err() {
                    return 2;
                }
            }
            Ok(false) => return 0,
            Err(_) => return 2,
        }
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on end-of-file before the first byte.
/// Only system calls: safe in a forked child.
fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> nix::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match nix::unistd::read(fd, &mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(nix::errno::Errno::EPIPE),
            Ok(n) => filled += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Writes all of `bytes`. Only system calls: safe in a forked child.
fn write_full(fd: &OwnedFd, bytes: &[u8]) -> nix::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        match nix::unistd::write(fd, &bytes[written..]) {
            Ok(n) => written += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Pins the calling thread using only system calls (safe in a freshly forked child).
fn pin_without_allocating(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

/// Waits (bounded) until the child's handshake is readable, so a child that died before it
/// could answer is an error instead of a hang.
fn await_handshake(fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ready = poll(&mut fds, PollTimeout::from(HANDSHAKE_TIMEOUT_MS)).context("poll")?;
    ensure!(
        ready == 1,
        "the child process did not answer within {HANDSHAKE_TIMEOUT_MS} ms"
    );
    Ok(())
}

fn reap(child: Pid) -> Result<()> {
    match waitpid(child, None).context("waitpid")? {
        WaitStatus::Exited(_, 0) => Ok(()),
        status => bail!("the benchmark child process ended badly: {status:?}"),
    }
}
