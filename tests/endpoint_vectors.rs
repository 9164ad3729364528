//! `Endpoint::wait_interrupt*` wait on every vector's eventfd of a hosted MSI-X link: a
//! doorbell on vector >= 1 that arrives while the endpoint is already blocked wakes it at
//! once (issue 14, endpoint item 2); so does a tokio `Channel` waiting on the link. A real
//! control server runs on a thread of this process.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use hypervisor::control::{device_model, ControlServer};
use hypervisor::device::InterruptMode;
use linux_uio_client::hosted::HostedEndpoint;
use linux_uio_client::Endpoint;
use nix::sys::eventfd::{EfdFlags, EventFd};

#[path = "../hypervisor/tests/control_common/mod.rs"]
mod control_common;

const WAIT: Duration = Duration::from_secs(10);

/// Blocks (bounded, without sleeping) until thread `tid` of this process is inside one of
/// the system calls `syscalls`, read from `/proc/self/task/<tid>/syscall` (its first field is
/// the syscall number).
fn wait_until_in_syscall(tid: i32, syscalls: &[libc::c_long]) {
    let path = format!("/proc/self/task/{tid}/syscall");
    let deadline = Instant::now() + WAIT;
    loop {
        let now = std::fs::read_to_string(&path).unwrap_or_default();
        if syscalls.iter().any(|nr| now.starts_with(&format!("{nr} "))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} never entered {syscalls:?} (last: {now:?})"
        );
        std::thread::yield_now();
    }
}

/// A hosted MSI-X link of 4 vectors between `rtos-telemetry` and `linux`, its control server
/// served by a thread until `stop` is written.
struct MsixLink {
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
    stop: EventFd,
    served: Option<std::thread::JoinHandle<()>>,
}

impl MsixLink {
    fn start(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("endpoint-vectors-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("hv.sock");
        let system = control_common::pair_system(
            ["rtos-telemetry", "linux"],
            "demo",
            0,
            4096,
            InterruptMode::Msix { vectors: 4 },
        );
        let mut server = ControlServer::bind(&system, &socket, &mut device_model).unwrap();
        let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap();
        let stop_for_thread: OwnedFd = stop.as_fd().try_clone_to_owned().unwrap();
        let served = std::thread::spawn(move || loop {
            let ready = server.poll(&[stop_for_thread.as_fd()], None).unwrap();
            server.take_events();
            if ready[0] {
                return;
            }
        });
        Self {
            dir,
            socket,
            stop,
            served: Some(served),
        }
    }
}

impl Drop for MsixLink {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(served) = self.served.take() {
            let _ = served.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_doorbell_on_vector_3_wakes_a_blocked_endpoint_wait_at_once() {
    let msix = MsixLink::start("endpoint");
    let socket = &msix.socket;
    let rtos = HostedEndpoint::attach(socket, "rtos-telemetry").unwrap();
    let mut linux = Endpoint::attach_hosted(socket, "linux", None).unwrap();
    assert_eq!(linux.vector_fds().len(), 4);
    // Nothing pending yet: a zero-length wait finds nothing.
    assert_eq!(linux.wait_interrupt_timeout(Duration::ZERO).unwrap(), None);

    let waiter = nix::unistd::gettid().as_raw();
    let ringer = std::thread::spawn(move || {
        wait_until_in_syscall(waiter, &[libc::SYS_ppoll]);
        rtos.links()[0].ring_vector(1, 3);
        rtos
    });
    let started = Instant::now();
    let taken = linux.wait_interrupt_timeout(WAIT).unwrap();
    let elapsed = started.elapsed();
    let _rtos = ringer.join().unwrap();
    println!("the vector-3 doorbell woke the blocked wait after {elapsed:?}");
    assert_eq!(taken, Some(1), "the vector-3 doorbell was lost");
    // A wait blind to vector 3 sleeps out its whole timeout and only then finds the doorbell
    // pending: that it returned before the timeout shows the doorbell itself woke it.
    assert!(
        elapsed < WAIT,
        "the wait returned only at its timeout ({elapsed:?}): vector 3 did not wake it"
    );
}

#[test]
fn a_doorbell_on_vector_3_wakes_a_waiting_tokio_channel_at_once() {
    let msix = MsixLink::start("channel");
    let rtos = HostedEndpoint::attach(&msix.socket, "rtos-telemetry").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let waiter = nix::unistd::gettid().as_raw();
    runtime.block_on(async {
        let mut linux = Endpoint::attach_hosted(&msix.socket, "linux", None).unwrap();
        assert_eq!(linux.vector_fds().len(), 4);
        // Nothing pending yet (so only the vector-3 doorbell below can wake the channel).
        assert_eq!(linux.wait_interrupt_timeout(Duration::ZERO).unwrap(), None);
        let mut channel =
            linux_uio_client::Channel::new(linux, linux_uio_client::ChannelOptions::default())
                .unwrap();
        // Ring vector 3 once this (the runtime's only) thread sleeps in the reactor.
        let ringer = std::thread::spawn(move || {
            wait_until_in_syscall(
                waiter,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_pwait2,
                ],
            );
            rtos.links()[0].ring_vector(1, 3);
            rtos
        });
        let started = Instant::now();
        let taken = tokio::time::timeout(WAIT, channel.interrupt()).await;
        let elapsed = started.elapsed();
        let _rtos = ringer.join().unwrap();
        println!("the vector-3 doorbell woke the waiting channel after {elapsed:?}");
        let taken = taken.expect("a channel blind to vector 3 never woke");
        assert_eq!(taken.unwrap(), 1, "one delivery");
        assert_eq!(channel.stats().interrupts, 1);
    });
}
