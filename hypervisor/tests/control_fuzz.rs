//! The hypervisor's side of the control socket against a hostile cell (issue 14, "a fuzz
//! target for each side"): random and mutated messages over real connections. A bounded
//! property test (runs in CI); `PROPTEST_CASES=100000` makes it a longer fuzz run.
//!
//! Invariant: the server never panics or stalls, answers or drops every such connection, and
//! afterwards still serves: a status query works, no cell is left attached and every state
//! is back to 0.

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use hypervisor::control::{device_model, ControlServer};
use hypervisor::memory::InterruptEventFd;
use ivshmem_dev::hosted::{AttachBody, CellPhase, Request, SetStateBody, WireName};
use nix::sys::socket::{recv, send, shutdown, MsgFlags, Shutdown};
use proptest::prelude::*;

#[path = "control_common/mod.rs"]
mod control_common;

/// A control server on a thread of this process, stopped on drop.
struct Served {
    socket: PathBuf,
    stop: std::sync::Arc<InterruptEventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn start() -> Self {
        let socket = std::env::temp_dir().join(format!("control-fuzz-{}.sock", std::process::id()));
        let system = control_common::pair_system(
            ["a", "b"],
            "l",
            4096,
            4096,
            hypervisor::device::InterruptMode::Intx,
        );
        let mut server = ControlServer::bind(&system, &socket, &mut device_model).unwrap();
        let stop = std::sync::Arc::new(InterruptEventFd::new().unwrap());
        let stop_for_thread = stop.clone();
        let thread = std::thread::spawn(move || loop {
            let ready = server.poll(&[stop_for_thread.fd()], None).unwrap();
            if ready[0] {
                return;
            }
        });
        Served {
            socket,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.signal().unwrap();
        if let Some(thread) = self.thread.take() {
            let panicked = thread.join().is_err();
            if !std::thread::panicking() {
                assert!(!panicked, "the control server panicked");
            }
        }
    }
}

/// A message a hostile cell may send: random bytes, or a valid request with bytes changed.
fn message() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![
        prop_oneof![Just("a"), Just("b"), Just("zzz")].prop_map(|name| Request::Attach(
            AttachBody {
                cell: WireName::new(name).unwrap(),
            }
        )),
        (0u32..3, any::<u32>())
            .prop_map(|(link, value)| Request::SetState(SetStateBody { link, value })),
        Just(Request::Status),
    ]
    .prop_map(|request| {
        let mut buf = vec![0u8; ivshmem_dev::hosted::MAX_MESSAGE_SIZE];
        let n = request.encode(&mut buf).unwrap();
        buf.truncate(n);
        buf
    });
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        (
            valid.clone(),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)
        )
            .prop_map(|(mut bytes, flips)| {
                for (at, value) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] = value;
                }
                bytes
            }),
        valid,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_server_survives_any_messages(connections in proptest::collection::vec(
        proptest::collection::vec(message(), 1..6), 1..4)) {
        let served = Served::start();
        for messages in &connections {
            let fd = hypervisor::control::connect_control_socket(&served.socket).unwrap();
            let tv = nix::sys::time::TimeVal::new(10, 0);
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
                .unwrap();
            for m in messages {
                // The server may already have dropped the connection: EPIPE is an answer.
                let _ = send(fd.as_raw_fd(), m, MsgFlags::MSG_NOSIGNAL);
            }
            let _ = shutdown(fd.as_raw_fd(), Shutdown::Write);
            // Every connection ends: the server closes it once this side has.
            let mut buf = [0u8; ivshmem_dev::hosted::MAX_MESSAGE_SIZE + 1];
            loop {
                match recv(fd.as_fd().as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(nix::errno::Errno::ECONNRESET) => break,
                    Err(e) => panic!("connection not ended by the server: {e}"),
                }
            }
        }
        // Still serving, nothing left attached, every state back to 0.
        let status = hypervisor::status::query(&served.socket).unwrap();
        for cell in &status.cells {
            prop_assert_ne!(cell.phase, CellPhase::Attached, "{} left attached", cell.name);
        }
        for peer in &status.links[0].peers {
            prop_assert_eq!(peer.state, 0);
        }
        drop(served);
    }
}
