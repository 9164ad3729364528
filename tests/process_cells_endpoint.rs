//! The cell-side hosted endpoint's register semantics against a real control server (served
//! by a thread of this process): ID/MAX_PEERS, STATE read-back after the acknowledgement,
//! unknown offsets, doorbells to missing peers, INT_CONTROL and one-shot mode.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypervisor::control::{device_model, CellSpec, ControlServer, LinkSpec, SystemSpec};
use ivshmem_dev::hosted::{
    decode_reply, AttachBody, RefusalReason, Reply, Request, SetStateBody, WireName,
    MAX_FDS_PER_GRANT, MAX_MESSAGE_SIZE,
};
use ivshmem_dev::regs::{self, RegisterAccess};
use linux_uio_client::hosted::{HostedEndpoint, HostedError};

#[path = "../hypervisor/tests/control_common/mod.rs"]
mod control_common;

/// A control server on a thread, stopped (and its socket removed) on drop.
struct Served {
    socket: PathBuf,
    dir: PathBuf,
    stop: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn start(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("process-cells-ep-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("hv.sock");
        let cell = |name: &str| CellSpec {
            name: name.into(),
            cpus: vec![0],
            command: None,
            process: true,
            uid: None,
        };
        let system = SystemSpec {
            cells: vec![cell("a"), cell("b"), cell("c")],
            links: vec![LinkSpec {
                name: "bus".into(),
                peers: vec!["a".into(), "b".into(), "c".into()],
                protocol: 0x4001,
                state_table_size: 4096,
                rw_size: 4096,
                output_size: 4096,
                interrupts: hypervisor::device::InterruptMode::Intx,
            }],
        };
        let mut server = ControlServer::bind(&system, &socket, &mut device_model).unwrap();
        // SAFETY: plain syscall; checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(raw >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let stop: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
        let stop_for_thread = stop.try_clone().unwrap();
        let thread = std::thread::spawn(move || loop {
            let ready = server.poll(&[stop_for_thread.as_fd()], None).unwrap();
            if ready[0] {
                return;
            }
        });
        Served {
            socket,
            dir,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn registers_state_and_one_shot_interrupts() {
    let served = Served::start("regs");
    let a = HostedEndpoint::attach(&served.socket, "a").unwrap();
    let b = HostedEndpoint::attach(&served.socket, "b").unwrap();
    let (la, lb) = (&a.links()[0], &b.links()[0]);
    let ra = la.registers();
    assert_eq!(ra.read32(regs::ID), 0);
    assert_eq!(ra.read32(regs::MAX_PEERS), 3);
    assert_eq!(lb.registers().read32(regs::ID), 1);
    assert_eq!(ra.read32(regs::INT_CONTROL), 0);
    assert_eq!(ra.read32(regs::DOORBELL), 0);
    assert_eq!(ra.read32(0x14), 0, "unknown offsets read 0");
    ra.write32(0x14, 0xFFFF_FFFF); // ignored
    assert_eq!(ra.read32(0x14), 0);

    // Waiting with interrupts disabled would never end: refused.
    assert!(matches!(
        la.wait_interrupt_timeout(Duration::from_secs(1)),
        Err(HostedError::InterruptsDisabled)
    ));

    // STATE through the register: once the write returns, STATE and the table show it, and
    // the other (enabled) peer was notified.
    lb.enable_interrupts();
    ra.write32(regs::STATE, 7);
    assert_eq!(ra.read32(regs::STATE), 7);
    assert_eq!(la.peer_state(0), Some(7));
    assert_eq!(lb.peer_state(0), Some(7));
    assert_eq!(
        lb.wait_interrupt_timeout(Duration::from_secs(10)).unwrap(),
        Some(1)
    );
    // The same value again is no change: no notification.
    la.set_state(7).unwrap();
    assert_eq!(lb.take_interrupt().unwrap(), None);

    // A doorbell to a peer that does not exist, or on a vector INTx does not have: no effect.
    ra.write32(regs::DOORBELL, 5 << 16);
    ra.write32(regs::DOORBELL, (1 << 16) | 1);
    assert_eq!(lb.take_interrupt().unwrap(), None);

    // One-shot: delivery clears INT_CONTROL; what arrives before the re-arm is discarded.
    let rb = lb.registers();
    rb.set_oneshot(true);
    la.ring(1);
    assert_eq!(
        lb.wait_interrupt_timeout(Duration::from_secs(10)).unwrap(),
        Some(1)
    );
    assert_eq!(
        rb.read32(regs::INT_CONTROL),
        0,
        "one-shot delivery clears INT_CONTROL"
    );
    la.ring(1);
    assert_eq!(
        lb.take_interrupt().unwrap(),
        None,
        "delivered while disabled"
    );
    lb.enable_interrupts(); // re-arm: the doorbell that came while disabled is dropped
    assert_eq!(lb.take_interrupt().unwrap(), None);
    la.ring(1);
    la.ring(1);
    assert_eq!(
        lb.take_interrupt().unwrap(),
        Some(2),
        "two doorbells merge into one interrupt"
    );
    assert_eq!(rb.read32(regs::INT_CONTROL), 0);

    // Ringing yourself is allowed.
    la.enable_interrupts();
    la.ring(0);
    assert_eq!(la.take_interrupt().unwrap(), Some(1));

    // The driver over the hosted registers sees the same device.
    let dev = lb.ivshmem().unwrap();
    assert_eq!((dev.id(), dev.max_peers()), (1, 3));
    assert_eq!(dev.peer_state(0), Some(7));
    assert!(dev.own_output().is_writable());
    assert!(!dev.peer_output(0).unwrap().is_writable());
    assert!(dev.rw().unwrap().is_writable());
    assert!(!dev.state_table().is_writable());

    // a leaves: b sees a's state 0 (b re-armed first).
    lb.enable_interrupts();
    drop(a);
    assert_eq!(
        lb.wait_interrupt_timeout(Duration::from_secs(10)).unwrap(),
        Some(1)
    );
    assert_eq!(lb.peer_state(0), Some(0));
}

#[test]
fn requests_out_of_order_are_refused() {
    use nix::sys::socket::{
        connect, recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
    };
    let served = Served::start("order");
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(&served.socket).unwrap()).unwrap();
    let tv = nix::sys::time::TimeVal::new(10, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv).unwrap();
    let mut buf = [0u8; MAX_MESSAGE_SIZE];
    let n = Request::SetState(SetStateBody { link: 0, value: 1 })
        .encode(&mut buf)
        .unwrap();
    send(fd.as_raw_fd(), &buf[..n], MsgFlags::empty()).unwrap();
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    match decode_reply(&buf[..n]).unwrap() {
        Reply::Refused(r) => {
            assert_eq!(r.reason(), Some(RefusalReason::BadRequest));
            assert!(r.detail().contains("before attach"), "{}", r.detail());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap(),
        0
    );

    // The server goes on serving: a cell attaches and writes STATE.
    let c = HostedEndpoint::attach(&served.socket, "c").unwrap();
    assert_eq!(c.links().len(), 1);
    let status = hypervisor::status::query(&served.socket).unwrap();
    assert!(status.links[0].peers[2].active);
    c.links()[0].set_state(9).unwrap();
    assert_eq!(c.links()[0].peer_state(2), Some(9));
}

/// Connects to the control socket and attaches as `cell` with the raw protocol, taking the
/// attach reply and the grants (their fds are closed); returns the connection.
fn raw_attach(socket: &Path, cell: &str) -> OwnedFd {
    use nix::sys::socket::{
        connect, recvmsg, send, socket as new_socket, AddressFamily, ControlMessageOwned, MsgFlags,
        SockFlag, SockType, UnixAddr,
    };
    use std::io::IoSliceMut;
    use std::os::fd::{FromRawFd, RawFd};

    let fd = new_socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(socket).unwrap()).unwrap();
    let tv = nix::sys::time::TimeVal::new(10, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv).unwrap();
    let mut buf = [0u8; MAX_MESSAGE_SIZE];
    let attach = Request::Attach(AttachBody {
        cell: WireName::new(cell).unwrap(),
    });
    let n = attach.encode(&mut buf).unwrap();
    send(fd.as_raw_fd(), &buf[..n], MsgFlags::MSG_NOSIGNAL).unwrap();
    let mut grants_left = None;
    while grants_left != Some(0) {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_GRANT]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg =
            recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).unwrap();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for r in raw {
                    // SAFETY: the kernel just installed this fd for us; closing it is all we do.
                    drop(unsafe { OwnedFd::from_raw_fd(r) });
                }
            }
        }
        let n = msg.bytes;
        match decode_reply(&buf[..n]).unwrap() {
            Reply::Accepted(a) => grants_left = Some(a.link_count),
            Reply::LinkGrant(_) => grants_left = grants_left.map(|g| g - 1),
            other => panic!("attach as {cell}: {other:?}"),
        }
    }
    fd
}

/// Waits (on interrupts) until `peer`'s state in `link` is `value`.
fn wait_peer_state(link: &linux_uio_client::hosted::HostedLink, peer: u16, value: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while link.peer_state(peer) != Some(value) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "peer {peer} state stays {:?}, expected {value}",
            link.peer_state(peer)
        );
        link.wait_interrupt_timeout(left).unwrap();
    }
}

/// A cell that floods the socket with status requests and never reads the replies cannot
/// stall the single-threaded server: the server never waits for it (its unread replies are
/// queued up to `MAX_QUEUED_REPLIES`, then it is dropped, detaching the cell), so another
/// cell's STATE acknowledgements keep coming.
#[test]
fn a_cell_that_does_not_read_its_socket_is_detached_without_stalling_others() {
    use nix::errno::Errno;
    use nix::sys::socket::{send, MsgFlags};
    /// Far above a STATE round trip, below the 1 s a blocking send would stall.
    const STALL_GUARD: Duration = Duration::from_millis(500);

    let served = Served::start("flood");
    let b = HostedEndpoint::attach(&served.socket, "b").unwrap();
    let lb = &b.links()[0];
    lb.enable_interrupts();
    let flooder = raw_attach(&served.socket, "a");
    let mut buf = [0u8; MAX_MESSAGE_SIZE];
    let n = Request::SetState(SetStateBody { link: 0, value: 1 })
        .encode(&mut buf)
        .unwrap();
    send(flooder.as_raw_fd(), &buf[..n], MsgFlags::MSG_NOSIGNAL).unwrap();
    wait_peer_state(lb, 0, 1);

    let n = Request::Status.encode(&mut buf).unwrap();
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    let mut slowest = Duration::ZERO;
    let mut dropped = None;
    for i in 0..100_000u32 {
        match send(flooder.as_raw_fd(), &buf[..n], flags) {
            Ok(_) => {}
            Err(Errno::EAGAIN) => {
                // The server is not reading: wait until it does (or drops us).
                let mut pfd = libc::pollfd {
                    fd: flooder.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                assert_eq!(unsafe { libc::poll(&mut pfd, 1, 10_000) }, 1, "guard");
            }
            Err(e) => {
                dropped = Some((i, e));
                break;
            }
        }
        if i % 8 == 0 {
            let start = Instant::now();
            lb.set_state(i + 2).unwrap();
            slowest = slowest.max(start.elapsed());
        }
    }
    let (sent, error) = dropped.expect("the flooding cell is never dropped");
    assert!(
        matches!(error, Errno::EPIPE | Errno::ECONNRESET),
        "after {sent} requests: {error}"
    );
    assert!(
        slowest < STALL_GUARD,
        "a STATE ack of cell b waited {slowest:?} behind the flooding cell"
    );
    // The flooder was detached: its state is 0 and b was notified.
    wait_peer_state(lb, 0, 0);
    // The server still serves b.
    lb.set_state(7).unwrap();
    assert_eq!(lb.state(), 7);
}

/// Connections that never attach are capped: the one beyond the cap is closed at once, and
/// the server keeps serving the others.
#[test]
fn unattached_connections_are_capped() {
    use hypervisor::control::MAX_UNATTACHED_CLIENTS;
    use nix::sys::socket::{
        connect, recv, send, socket as new_socket, AddressFamily, MsgFlags, SockFlag, SockType,
        UnixAddr,
    };
    let served = Served::start("cap");
    let open = || {
        let fd = new_socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(&served.socket).unwrap()).unwrap();
        let tv = nix::sys::time::TimeVal::new(10, 0);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv).unwrap();
        fd
    };
    let mut buf = [0u8; MAX_MESSAGE_SIZE];
    let status = Request::Status.encode(&mut buf).unwrap();
    let request = buf[..status].to_vec();
    // Each connection is known to the server once its status query is answered.
    let held: Vec<OwnedFd> = (0..MAX_UNATTACHED_CLIENTS)
        .map(|_| {
            let fd = open();
            send(fd.as_raw_fd(), &request, MsgFlags::MSG_NOSIGNAL).unwrap();
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
            assert!(matches!(decode_reply(&buf[..n]).unwrap(), Reply::Status(_)));
            fd
        })
        .collect();
    let extra = open();
    assert_eq!(
        recv(extra.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap(),
        0,
        "the connection beyond the cap is closed"
    );
    // A cell still attaches once a connection is free again.
    drop(held);
    let a = HostedEndpoint::attach(&served.socket, "a").unwrap();
    a.links()[0].set_state(3).unwrap();
}

/// A device model that refuses the STATE value 0xBAD as an illegal access.
struct RefusingBad(Box<dyn hypervisor::control::LinkModel>);

impl hypervisor::control::LinkModel for RefusingBad {
    fn peer_attached(&mut self, peer: u16) -> hypervisor::control::Notify {
        self.0.peer_attached(peer)
    }

    fn peer_detached(&mut self, peer: u16) -> hypervisor::control::Notify {
        self.0.peer_detached(peer)
    }

    fn write_state(
        &mut self,
        peer: u16,
        value: u32,
    ) -> Result<hypervisor::control::Notify, hypervisor::device::AccessError> {
        use hypervisor::device::{AccessError, AccessKind, AccessReason, AccessSpace};
        if value != 0xBAD {
            return self.0.write_state(peer, value);
        }
        Err(AccessError {
            link: "bus".into(),
            peer,
            space: AccessSpace::Registers,
            offset: u64::from(regs::STATE),
            kind: AccessKind::Write,
            size: 4,
            value: Some(u64::from(value)),
            reason: AccessReason::PeerNotAttached,
        })
    }
}

/// An illegal access stops the offending cell with a FATAL report (ivshmem-v2.md, "Illegal
/// access"): a spawned cell's process is killed, a hand-started cell is disconnected; both
/// are detached (state 0, peers notified) and the rest of the system keeps running.
#[test]
fn an_illegal_access_stops_the_cell_with_a_fatal_report() {
    let dir = std::env::temp_dir().join(format!("process-cells-ep-fatal-{}", std::process::id()));
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
    let system = SystemSpec {
        cells: vec![cell("a"), cell("b"), cell("c")],
        links: vec![LinkSpec {
            name: "bus".into(),
            peers: vec!["a".into(), "b".into(), "c".into()],
            protocol: 0x4001,
            state_table_size: 4096,
            rw_size: 0,
            output_size: 4096,
            interrupts: hypervisor::device::InterruptMode::Intx,
        }],
    };
    let mut factory = |spec: &LinkSpec, table| {
        device_model(spec, table)
            .map(|m| Box::new(RefusingBad(m)) as Box<dyn hypervisor::control::LinkModel>)
    };
    let mut server = ControlServer::bind(&system, &socket, &mut factory).unwrap();
    // Cell a's process as the supervisor would have spawned it (the test attaches for it).
    let mut spawned = std::process::Command::new("/bin/sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    server.cell_spawned("a", spawned.id());
    // SAFETY: plain syscall; checked below.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(raw >= 0);
    // SAFETY: fresh fd owned by nobody else.
    let stop: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
    let stop_for_thread = stop.try_clone().unwrap();
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

    let c = HostedEndpoint::attach(&socket, "c").unwrap();
    let lc = &c.links()[0];
    lc.enable_interrupts();
    let a = HostedEndpoint::attach(&socket, "a").unwrap();
    let b = HostedEndpoint::attach(&socket, "b").unwrap();
    a.links()[0].set_state(1).unwrap();
    b.links()[0].set_state(1).unwrap();
    wait_peer_state(lc, 0, 1);
    wait_peer_state(lc, 1, 1);

    let access = format!(
        "FATAL: cell \"a\": invalid ivshmem register write at {:#x}, size 4, value 0xbad (link `bus`, peer 0",
        regs::STATE
    );
    match a.links()[0].set_state(0xBAD) {
        Err(HostedError::Refused { detail, .. }) => {
            assert!(detail.contains(&access), "{detail}");
            assert!(
                detail.contains(&format!("cell process {} killed", spawned.id())),
                "{detail}"
            );
        }
        other => panic!("illegal STATE write answered with {other:?}"),
    }
    let status = spawned.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the spawned cell is killed"
    );
    wait_peer_state(lc, 0, 0);
    assert!(a.links()[0].set_state(2).is_err(), "a is disconnected");

    // A hand-started cell is disconnected (and detached), not killed.
    match b.links()[0].set_state(0xBAD) {
        Err(HostedError::Refused { detail, .. }) => {
            assert!(detail.contains("FATAL: cell \"b\""), "{detail}");
            assert!(
                detail.contains("cell started by hand: disconnected"),
                "{detail}"
            );
        }
        other => panic!("illegal STATE write answered with {other:?}"),
    }
    wait_peer_state(lc, 1, 0);
    assert!(b.links()[0].set_state(2).is_err(), "b is disconnected");

    // The rest of the system keeps running.
    lc.set_state(5).unwrap();
    assert_eq!(lc.state(), 5);
    let one: u64 = 1;
    // SAFETY: writes 8 bytes to our eventfd.
    unsafe { libc::write(stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
    let events = thread.join().unwrap();
    let detached: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            hypervisor::control::ControlEvent::Detached { cell, reason }
                if reason.starts_with("FATAL") =>
            {
                Some(cell.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(detached, ["a", "b"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A STATE acknowledgement that arrives after the reply timeout must not be taken for the
/// next write's: the connection is marked broken after the timeout, and later writes fail
/// at once without reaching the hypervisor.
#[test]
fn a_late_state_ack_breaks_the_connection_instead_of_desynchronising_it() {
    use hypervisor::control::ControlEvent;
    const REPLY_TIMEOUT: Duration = Duration::from_millis(200);

    let dir = std::env::temp_dir().join(format!("process-cells-ep-late-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("hv.sock");
    let system = control_common::pair_system(
        ["a", "b"],
        "bus",
        0,
        4096,
        hypervisor::device::InterruptMode::Intx,
    );
    // The server is polled by this thread only when the test says so.
    let mut server = ControlServer::bind(&system, &socket, &mut device_model).unwrap();
    let guard = Instant::now() + Duration::from_secs(10);
    let attaching = {
        let socket = socket.clone();
        std::thread::spawn(move || HostedEndpoint::attach_with_timeout(&socket, "b", REPLY_TIMEOUT))
    };
    while !server.attached_cells().contains("b") {
        assert!(Instant::now() < guard, "cell b never attached");
        server.poll(&[], Some(Duration::from_secs(1))).unwrap();
    }
    let b = attaching.join().unwrap().unwrap();
    let lb = &b.links()[0];
    let _ = server.take_events();

    // The hypervisor does not answer in time (it is not polled).
    match lb.set_state(1) {
        Err(HostedError::Timeout(t)) => assert_eq!(t, REPLY_TIMEOUT),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Now it handles the write and sends the (late) ack.
    while !server
        .take_events()
        .iter()
        .any(|e| matches!(e, ControlEvent::State { cell, value: 1, .. } if cell == "b"))
    {
        assert!(
            Instant::now() < guard,
            "the STATE write never reached the server"
        );
        server.poll(&[], Some(Duration::from_secs(1))).unwrap();
    }
    // The next write fails at once, without pairing with the stale ack and without being sent.
    match lb.set_state(2) {
        Err(HostedError::Broken(why)) => assert!(why.contains("STATE write of 0x1"), "{why}"),
        other => panic!("expected a broken connection, got {other:?}"),
    }
    server.poll(&[], Some(Duration::from_millis(0))).unwrap();
    assert!(
        !server
            .take_events()
            .iter()
            .any(|e| matches!(e, ControlEvent::State { value: 2, .. })),
        "a write after the failure reached the hypervisor"
    );
    assert_eq!(lb.state(), 0, "STATE keeps the last acknowledged value");
    assert_eq!(lb.peer_state(1), Some(1), "the late write did take effect");
    drop(b);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
