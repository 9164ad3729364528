//! Process cells on an MSI-X link against a real control server (a thread of this process):
//! one eventfd per (peer, vector), vector 0 for state changes, doorbells on any vector, the
//! peers' cell names from the hypervisor, and a misaligned register access that stops the
//! cell (issue 14 item 3). The illegal access runs in a child process (this test binary
//! re-executed with `PROCESS_CELLS_MSIX_ROLE=misaligned`), because it ends with `SIGKILL`.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use hypervisor::control::{
    device_model, CellSpec, ControlEvent, ControlServer, LinkSpec, SystemSpec,
};
use hypervisor::device::InterruptMode;
use ivshmem_dev::regs::{self, RegisterAccess};
use linux_uio_client::hosted::{HostedEndpoint, HostedLink};
use linux_uio_client::Endpoint;
use nix::sys::eventfd::{EfdFlags, EventFd};

const ROLE_ENV: &str = "PROCESS_CELLS_MSIX_ROLE";
const SOCKET_ENV: &str = "PROCESS_CELLS_MSIX_SOCKET";
const WAIT: Duration = Duration::from_secs(10);

/// A control server for cells `rtos-telemetry`, `linux` and `logger` on one MSI-X link with
/// `vectors` vectors, on a thread; stopped on drop, which returns its events.
struct Served {
    socket: PathBuf,
    dir: PathBuf,
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<Vec<ControlEvent>>>,
}

impl Served {
    fn start(tag: &str, vectors: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("pc-msix-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("hv.sock");
        let cell = |name: &str| CellSpec {
            name: name.into(),
            cpus: Vec::new(),
            command: None,
            process: true,
            uid: None,
        };
        let names = ["rtos-telemetry", "linux", "logger"];
        let system = SystemSpec {
            cells: names.iter().map(|n| cell(n)).collect(),
            links: vec![LinkSpec {
                name: "demo".into(),
                peers: names.iter().map(|n| n.to_string()).collect(),
                protocol: 0x4001,
                state_table_size: 4096,
                rw_size: 0,
                output_size: 4096,
                interrupts: InterruptMode::Msix { vectors },
            }],
        };
        let mut server = ControlServer::bind(&system, &socket, &mut device_model).unwrap();
        let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap();
        let stop_for_thread: OwnedFd = stop.as_fd().try_clone_to_owned().unwrap();
        let thread = std::thread::spawn(move || {
            let mut events = Vec::new();
            loop {
                let ready = server.poll(&[stop_for_thread.as_fd()], None).unwrap();
                events.extend(server.take_events());
                if ready[0] {
                    return events;
                }
            }
        });
        Served {
            socket,
            dir,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<ControlEvent> {
        self.stop.write(1).unwrap();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (bounded) until `link` has taken a non-empty set of vectors, and returns it.
fn wait_vectors(link: &HostedLink) -> Vec<(u16, u64)> {
    let taken = link.wait_vectors_timeout(WAIT).unwrap();
    assert!(!taken.is_empty(), "no interrupt within {WAIT:?}");
    taken
}

#[test]
fn every_peer_has_one_eventfd_per_vector_and_a_name() {
    if std::env::var(ROLE_ENV).is_ok() {
        return;
    }
    let served = Served::start("vectors", 4);
    let rtos = HostedEndpoint::attach(&served.socket, "rtos-telemetry").unwrap();
    let linux = HostedEndpoint::attach(&served.socket, "linux").unwrap();
    let (lr, ll) = (&rtos.links()[0], &linux.links()[0]);
    assert_eq!((lr.vectors(), ll.vectors()), (4, 4));
    assert_eq!(ll.cell(), "linux");
    assert_eq!(ll.peer_name(0), Some("rtos-telemetry"));
    assert_eq!(ll.peer_name(2), Some("logger"));
    assert_eq!(ll.peer_name(3), None);
    assert_eq!(lr.peer_id_of("linux"), Some(1));
    assert_eq!(lr.peer_id_of("nobody"), None);
    for vector in 0..4 {
        assert!(ll.vector_fd(vector).is_some());
    }
    assert!(ll.vector_fd(4).is_none());

    ll.enable_interrupts();
    // A doorbell lands on its own vector.
    lr.ring_vector(1, 3);
    assert_eq!(wait_vectors(ll), vec![(3, 1)]);
    lr.ring_vector(1, 2);
    lr.ring_vector(1, 2);
    assert_eq!(wait_vectors(ll), vec![(2, 2)]);
    // Vector 4 does not exist: no effect (checked by the next delivery carrying only 1).
    lr.ring_vector(1, 4);
    lr.ring_vector(1, 1);
    assert_eq!(wait_vectors(ll), vec![(1, 1)]);
    // State changes go on vector 0.
    lr.set_state(5).unwrap();
    assert_eq!(wait_vectors(ll), vec![(0, 1)]);
    assert_eq!(ll.peer_state(0), Some(5));

    // One-shot: the vectors pending together are delivered together, then INT_CONTROL is 0
    // and what follows is discarded until the re-arm.
    ll.registers().set_oneshot(true);
    lr.ring_vector(1, 1);
    lr.ring_vector(1, 3);
    // Both eventfds are written before take_vectors runs (the doorbells are synchronous
    // eventfd writes of this thread).
    assert_eq!(wait_vectors(ll), vec![(1, 1), (3, 1)]);
    assert_eq!(ll.registers().read32(regs::INT_CONTROL), 0);
    lr.ring_vector(1, 2);
    assert_eq!(ll.take_vectors().unwrap(), vec![], "disabled: dropped");
    ll.enable_interrupts();
    lr.ring_vector(1, 2);
    assert_eq!(wait_vectors(ll), vec![(2, 1)]);

    // The generic endpoint tells its cell's and its peers' names too.
    let logger = Endpoint::attach_hosted(&served.socket, "logger", Some("demo")).unwrap();
    assert_eq!(logger.cell(), Some("logger"));
    assert_eq!(logger.peer_name(0), Some("rtos-telemetry"));
}

/// The child's role: attach as `linux`, then make a misaligned register write. It never
/// returns from that write.
#[test]
fn misaligned_register_write_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    assert_eq!(role, "misaligned");
    let socket = std::env::var(SOCKET_ENV).unwrap();
    let linux = HostedEndpoint::attach(socket, "linux").unwrap();
    let link = &linux.links()[0];
    link.set_state(1).unwrap();
    link.registers().write32(regs::STATE + 1, 2);
    unreachable!("an illegal register access returned");
}

/// A misaligned register offset on a process cell is an illegal access (ivshmem-v2.md): the
/// hypervisor reports it with a `FATAL:` line, the cell's state goes to 0 with its peers
/// notified, and the cell process is stopped (`SIGKILL`), even when started by hand.
#[test]
fn a_misaligned_register_access_stops_a_process_cell() {
    if std::env::var(ROLE_ENV).is_ok() {
        return;
    }
    let served = Served::start("misaligned", 2);
    let rtos = HostedEndpoint::attach(&served.socket, "rtos-telemetry").unwrap();
    let watcher = &rtos.links()[0];
    watcher.enable_interrupts();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "misaligned_register_write_role",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, "misaligned")
        .env(SOCKET_ENV, &served.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The child ends by itself on every path (SIGKILL after the report, or a panic that
    // exits), each bounded by the endpoint's reply timeout, so waiting for it is bounded.
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    // Its STATE 1 and its detach (state 0) each raised vector 0 on the watcher.
    assert_eq!(watcher.peer_state(1), Some(0));
    assert_eq!(watcher.take_vectors().unwrap(), vec![(0, 2)]);
    let events = served.stop();
    let detached = events
        .iter()
        .find_map(|event| match event {
            ControlEvent::Detached { cell, reason } if cell == "linux" => Some(reason.clone()),
            _ => None,
        })
        .expect("linux detached");
    assert!(
        detached.contains(
            "FATAL: cell \"linux\": invalid ivshmem register write at 0x11, size 4, value 0x2 \
             (link `demo`, peer 1, offset 0x11): misaligned access"
        ),
        "{detached}"
    );
}
