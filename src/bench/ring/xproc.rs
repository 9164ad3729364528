//! Cross-process round trips: this process (pinned to `cpus[0]`, measuring) and a forked child
//! (pinned to `cpus[1]`) busy-poll each other through shared memory.
//!
//! * `shmring-xproc`: two shmring rings in one memfd, mapped once (`MAP_SHARED`) before the
//!   fork, so both processes see the same pages. The child only runs ring code (no allocation,
//!   no locks) and system calls, and leaves with `_exit`: what fork in a multi-threaded process
//!   allows.
//! * `iceoryx2-xproc` (feature `iceoryx2`): the child builds its own iceoryx2 node and ports,
//!   which allocates. Deviation from the syscall-only rule of the other forked children: it
//!   forks from the only thread of this process that ever touched iceoryx2, and glibc's
//!   `fork` holds its malloc locks across the fork, so the child's allocator is consistent.
//!
//! The child reports through a status word in an anonymous shared page (ready / could not
//! pin / failed); the parent waits for it with a timeout, and kills the child if the timed
//! part fails, so a broken run is an error, never a hang.

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

use super::super::pin::{pin_current_thread, run_pinned};
use super::rtt::{ShmringSide, Side};
use super::samples::SampleClock;

/// Child status: still starting.
const STARTING: u64 = 0;
/// Child status: pinned and its ends are ready.
const READY: u64 = 1;
/// Child status: could not pin itself.
const PIN_FAILED: u64 = 2;
/// Child status: setting up its ends failed.
#[cfg(feature = "iceoryx2")]
const SETUP_FAILED: u64 = 3;
/// How long the parent waits for the child to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a round trip may take before the parent calls the child dead.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A shared anonymous page (inherited across fork) holding the child's status word.
struct StatusPage {
    page: NonNull<core::ffi::c_void>,
}

impl StatusPage {
    fn new() -> Result<Self> {
        let len = NonZeroUsize::new(4096).expect("non-zero");
        // SAFETY: a new anonymous shared mapping; nothing else is placed there.
        let page = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }
        .context("mmap of the status page")?;
        Ok(StatusPage { page })
    }

    fn word(&self) -> &AtomicU64 {
        // SAFETY: page-aligned, zero-initialised, mapped while `self` lives; only accessed
        // atomically by both processes.
        unsafe { AtomicU64::from_ptr(self.page.as_ptr().cast()) }
    }
}

impl Drop for StatusPage {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; no reference to it outlives `self`.
        let _ = unsafe { munmap(self.page, 4096) };
    }
}

/// On a thread pinned to `cpus[0]`: sets up the parent's ends with `setup`, forks a child
/// that pins itself to `cpus[1]` and runs `child` (which stores [`READY`] once its own ends are
/// set up, and returns its exit code), then times `parent` once the child is ready.
fn with_forked_peer<P>(
    cpus: [usize; 2],
    setup: impl FnOnce() -> Result<P> + Send,
    child: impl FnOnce(&AtomicU64) -> i32 + Send,
    parent: impl FnOnce(P, Instant) -> Result<Duration> + Send,
) -> Result<Duration> {
    run_pinned(cpus[0], || {
        let ends = setup()?;
        let status = StatusPage::new()?;
        // SAFETY: see the module docs (what the child may do); the child leaves with _exit.
        match unsafe { fork() }.context("fork")? {
            ForkResult::Child => {
                let code = if pin_current_thread(cpus[1]).is_err() {
                    status.word().store(PIN_FAILED, Ordering::SeqCst);
                    1
                } else {
                    child(status.word())
                };
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                let timed = (|| {
                    let waiting = Instant::now();
                    loop {
                        match status.word().load(Ordering::SeqCst) {
                            READY => break,
                            STARTING if waiting.elapsed() < READY_TIMEOUT => {
                                std::thread::yield_now()
                            }
                            STARTING => {
                                bail!("the child process was not ready within {READY_TIMEOUT:?}")
                            }
                            PIN_FAILED => {
                                bail!("the child process could not pin itself to CPU {}", cpus[1])
                            }
                            _ => bail!("the child process could not set up its ends"),
                        }
                    }
                    parent(ends, Instant::now())
                })();
                if timed.is_err() {
                    let _ = kill(child, Signal::SIGKILL);
                }
                let reaped = waitpid(child, None).context("waitpid");
                let elapsed = timed?;
                match reaped? {
                    WaitStatus::Exited(_, 0) => Ok(elapsed),
                    other => bail!("the benchmark child process ended badly: {other:?}"),
                }
            }
        }
    })
}

/// Busy-polls `poll` until it yields `true`, giving up after [`REPLY_TIMEOUT`].
#[inline(always)]
fn spin(mut poll: impl FnMut() -> Result<bool>) -> Result<()> {
    let mut rounds = 0u32;
    let mut since: Option<Instant> = None;
    loop {
        if poll()? {
            return Ok(());
        }
        rounds = rounds.wrapping_add(1);
        if rounds.is_multiple_of(4096) {
            let started = *since.get_or_insert_with(Instant::now);
            ensure!(
                started.elapsed() < REPLY_TIMEOUT,
                "no answer from the other process within {REPLY_TIMEOUT:?}"
            );
        }
        std::hint::spin_loop();
    }
}

/// The pinger's loop over `ends`: `iters` round trips of an `N`-byte message.
fn ping<const N: usize>(ends: &mut impl Side<N>, iters: u64, start: Instant) -> Result<Duration> {
    let mut msg = [0x5Au8; N];
    let mut reply = [0u8; N];
    let mut clock = SampleClock::start(iters);
    for seq in 0..iters {
        msg[..8].copy_from_slice(&seq.to_le_bytes());
        spin(|| ends.try_send(&msg))?;
        spin(|| ends.try_recv(&mut reply))?;
        ensure!(
            reply[..8] == seq.to_le_bytes(),
            "wrong reply for request {seq}"
        );
        clock.tick(seq + 1);
    }
    let elapsed = start.elapsed();
    clock.finish();
    Ok(elapsed)
}

/// The ponger's loop: echoes `iters` messages; returns the child's exit code.
fn pong<const N: usize>(ends: &mut impl Side<N>, iters: u64) -> i32 {
    let mut msg = [0u8; N];
    for seq in 0..iters {
        if spin(|| ends.try_recv(&mut msg)).is_err() || msg[..8] != seq.to_le_bytes() {
            return 4;
        }
        if spin(|| ends.try_send(&msg)).is_err() {
            return 4;
        }
    }
    0
}

/// A memfd mapped read-write and shared, holding the rings of one run.
struct SharedMemory {
    base: NonNull<core::ffi::c_void>,
    len: usize,
}

impl SharedMemory {
    fn new(len: usize) -> Result<Self> {
        let name = format!("ivbench-ring-xproc-{}", std::process::id());
        let fd = memfd_create(name.as_str(), MFdFlags::MFD_CLOEXEC).context("memfd_create")?;
        nix::unistd::ftruncate(&fd, len as i64).context("ftruncate of the memfd")?;
        let size = NonZeroUsize::new(len).context("empty shared memory")?;
        // SAFETY: a new shared mapping of the whole memfd; nothing else is placed there.
        let base = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .context("mmap of the memfd")?;
        Ok(SharedMemory { base, len })
    }

    fn at(&self, offset: usize) -> *mut u8 {
        assert!(offset < self.len);
        // SAFETY: inside the mapping (checked).
        unsafe { self.base.as_ptr().cast::<u8>().add(offset) }
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; the rings using it are gone.
        let _ = unsafe { munmap(self.base, self.len) };
    }
}

/// `iters` round trips of an `N`-byte frame between two processes through two shmring rings
/// (request, reply) in one memfd, consumers in `mode`.
pub fn shmring_xproc_rtt<const N: usize>(
    mode: shmring::Mode,
    cpus: [usize; 2],
    iters: u64,
) -> Result<Duration> {
    let layout = shmring::layout::OneWayLayout::new(super::STREAM_RING_BYTES, 4096)?;
    let memory = SharedMemory::new(2 * layout.total_len)?;
    let ring = |base: usize| -> Result<(shmring::Producer, shmring::Consumer)> {
        let producer_part = memory.at(base + layout.producer_offset);
        let consumer_part = memory.at(base + layout.consumer_offset);
        // SAFETY: two disjoint parts inside the mapping, page aligned, each written by one
        // side only; the mapping outlives both ends (`memory` is dropped after the run, the
        // child leaves with _exit).
        unsafe {
            let producer =
                shmring::Producer::init(producer_part, layout.producer_len, layout.capacity)?;
            let consumer = shmring::Consumer::init_mode(consumer_part, layout.consumer_len, mode)?;
            let tx = producer.attach(consumer_part, layout.consumer_len)?;
            let rx = consumer.attach(producer_part, layout.producer_len)?;
            Ok((tx, rx))
        }
    };
    let (request_tx, request_rx) = ring(0)?;
    let (reply_tx, reply_rx) = ring(layout.total_len)?;
    // The parent uses request_tx/reply_rx, the child (its copy of the memory after fork)
    // request_rx/reply_tx: each ring end is used by exactly one process.
    let pinger = ShmringSide {
        tx: request_tx,
        rx: reply_rx,
    };
    let mut ponger = ShmringSide {
        tx: reply_tx,
        rx: request_rx,
    };
    with_forked_peer(
        cpus,
        move || Ok(pinger),
        move |status| {
            status.store(READY, Ordering::SeqCst);
            pong::<N>(&mut ponger, iters)
        },
        |mut pinger, start| ping::<N>(&mut pinger, iters, start),
    )
}

/// `iters` round trips of an `N`-byte message between two processes over iceoryx2 (the parent
/// creates its node and ports before the fork, the child its own after it).
#[cfg(feature = "iceoryx2")]
pub fn iceoryx2_xproc_rtt<const N: usize>(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    use super::iceoryx::{service_names, IceoryxSide};
    let (a2b, b2a) = service_names();
    with_forked_peer(
        cpus,
        || IceoryxSide::<N>::new(&a2b, &b2a).context("parent's iceoryx2 ends"),
        |status| match IceoryxSide::<N>::new(&b2a, &a2b) {
            Ok(mut ponger) => {
                status.store(READY, Ordering::SeqCst);
                let code = pong::<N>(&mut ponger, iters);
                drop(ponger); // removes the child's node and ports cleanly
                code
            }
            Err(_) => {
                status.store(SETUP_FAILED, Ordering::SeqCst);
                3
            }
        },
        |mut pinger, start| ping::<N>(&mut pinger, iters, start),
    )
}
