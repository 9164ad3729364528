//! A spawned cell whose process ended is over at once: the server drops its connection
//! (states 0, peers told), so the status and a `cell stop` reply say "exited". The reply to
//! `hypervisor cell stop` of an attached cell said "attached" with the dead pid, because the
//! closed socket was only noticed on a later poll.

use std::os::fd::AsRawFd;

use hypervisor::control::{device_model, ControlServer};
use hypervisor::status::CellExit;
use ivshmem_dev::hosted::{AttachBody, CellPhase, Request, SetStateBody, WireName};
use nix::sys::socket::{send, MsgFlags};

#[path = "control_common/mod.rs"]
mod control_common;

#[test]
fn a_spawned_cells_end_detaches_it_at_once() {
    let socket = std::env::temp_dir().join(format!("cell-exit-{}.sock", std::process::id()));
    let system = control_common::pair_system(
        ["a", "b"],
        "l",
        4096,
        4096,
        hypervisor::device::InterruptMode::Intx,
    );
    let mut server = ControlServer::bind(&system, &socket, &mut device_model).unwrap();
    let client = hypervisor::control::connect_control_socket(&socket).unwrap();
    let mut buf = [0u8; ivshmem_dev::hosted::MAX_MESSAGE_SIZE];
    for request in [
        Request::Attach(AttachBody {
            cell: WireName::new("a").unwrap(),
        }),
        Request::SetState(SetStateBody { link: 0, value: 1 }),
    ] {
        let n = request.encode(&mut buf).unwrap();
        send(client.as_raw_fd(), &buf[..n], MsgFlags::MSG_NOSIGNAL).unwrap();
    }
    // Served once each message is in: the connection stays open (as when a cell's process
    // has just died and its socket's end is not read yet).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.status().links[0].peers[0].state != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the attach was not served"
        );
        server
            .poll(&[], Some(std::time::Duration::from_millis(100)))
            .unwrap();
    }
    assert_eq!(server.status().cells[0].phase, CellPhase::Attached);

    server.cell_exited("a", CellExit::Signal(15));
    let status = server.status();
    assert_eq!(status.cells[0].phase, CellPhase::Exited, "{status:?}");
    assert_eq!(status.links[0].peers[0].state, 0);
    assert!(!status.links[0].peers[0].active);
    assert!(server.attached_cells().is_empty());
}
