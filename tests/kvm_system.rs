//! A whole system with a KVM cell and a process cell on one link, run by
//! `hypervisor::cells::run_system` as `hypervisor run` does: doorbells both ways through the
//! control server's memory and eventfds, `cell restart` and `cell stop` of the KVM cell, the
//! status it reports, and a clean stop.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hypervisor::cells::{run_system, RunOptions, StopHandle};
use hypervisor::control::{CellAction, CellSpec, LinkSpec, SystemSpec};
use hypervisor::device::InterruptMode;
use hypervisor::kvm::test_guests::{self, IVSHMEM_GUEST};
use hypervisor::kvm::{kvm_available, KvmCellPlan, KvmLinkPlan, KvmSystem};
use hypervisor::status::{self, CellExit};
use ivshmem_dev::hosted::CellPhase;
use linux_uio_client::hosted::{HostedEndpoint, HostedLink};

const TIMEOUT: Duration = Duration::from_secs(30);

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

fn ring_and_wait_for_echo(link: &HostedLink) {
    link.ring(0);
    let got = link.wait_interrupt_timeout(TIMEOUT).unwrap();
    assert!(got.is_some(), "no echo from the KVM cell");
}

#[test]
fn a_kvm_cell_and_a_process_cell_share_a_link_under_run_system() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: KVM is not usable here: {why}");
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let image = dir.join(format!("kvm-system-{}.bin", std::process::id()));
    std::fs::write(&image, test_guests::assemble(IVSHMEM_GUEST).unwrap().image).unwrap();
    let socket = dir.join(format!("kvm-system-{}.sock", std::process::id()));
    let interrupts = InterruptMode::Msix { vectors: 1 };
    let system = SystemSpec {
        cells: vec![
            CellSpec {
                name: "echo".into(),
                cpus: vec![0],
                command: None,
                process: false,
                uid: None,
            },
            CellSpec {
                name: "proc".into(),
                cpus: vec![1],
                command: None,
                process: true,
                uid: None,
            },
        ],
        links: vec![LinkSpec {
            name: "l".into(),
            peers: vec!["echo".into(), "proc".into()],
            protocol: 0x4000,
            state_table_size: 4096,
            rw_size: 0,
            output_size: 4096,
            interrupts,
        }],
    };
    let kvm = KvmSystem {
        cells: vec![KvmCellPlan {
            name: "echo".into(),
            cpu: Some(0),
            image: image.clone(),
            cmdline: "e01".into(),
            memory: test_guests::LOW_MEMORY,
        }],
        links: vec![KvmLinkPlan {
            interrupts,
            bdf: "00:0e.0".parse().unwrap(),
            address: test_guests::LINK_ADDRESS,
        }],
    };
    let stop = StopHandle::new().unwrap();
    let options = RunOptions {
        stop_when_cells_exit: false,
        ..RunOptions::new(&socket)
    };
    let runner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let report = run_system(&system, &kvm, &options, Some(&stop), &mut out, &mut err);
            (report, String::from_utf8(out).unwrap())
        })
    };

    let mut endpoint = None;
    wait_until("the control socket", || {
        endpoint = HostedEndpoint::attach(&socket, "proc").ok();
        endpoint.is_some()
    });
    let endpoint = endpoint.unwrap();
    let link = &endpoint.links()[0];
    link.enable_interrupts();
    wait_until("the KVM cell's state 1", || link.peer_state(0) == Some(1));
    while link.take_interrupt().unwrap().is_some() {}
    for _ in 0..16 {
        ring_and_wait_for_echo(link);
    }

    let restarted = status::control_cell(&socket, "echo", CellAction::Restart).unwrap();
    assert_eq!(restarted.phase, CellPhase::Running);
    wait_until("the restarted cell's state 1", || {
        link.peer_state(0) == Some(1)
    });
    while link.take_interrupt().unwrap().is_some() {}
    ring_and_wait_for_echo(link);

    let shown = status::query(&socket).unwrap();
    let echo = shown.cells.iter().find(|c| c.name == "echo").unwrap();
    assert_eq!(echo.phase, CellPhase::Running);
    assert!(shown.links[0].peers.iter().all(|p| p.active), "{shown:?}");

    let stopped = status::control_cell(&socket, "echo", CellAction::Stop).unwrap();
    assert_eq!(stopped.phase, CellPhase::Stopped);
    assert_eq!(stopped.exit, Some(CellExit::Stopped));
    assert_eq!(link.peer_state(0), Some(0), "a stopped cell's state is 0");
    assert!(
        status::control_cell(&socket, "nobody", CellAction::Stop).is_err(),
        "an unknown cell is refused"
    );

    stop.stop();
    let (report, out) = runner.join().unwrap();
    report.unwrap();
    assert_eq!(
        out.matches("cell echo: KVM cell started").count(),
        2,
        "{out}"
    );
    assert!(out.contains("cell echo: stopped on request"), "{out}");
    assert!(!socket.exists(), "the socket is removed");
    let _ = std::fs::remove_file(&image);
}
