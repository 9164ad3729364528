//! KVM↔KVM: two stream inmates (`inmates/stream`) in two KVM cells send each other
//! checksummed frames over one MSI-X link, both directions at once, and check every frame they
//! receive (sequence, length, CRC-32, bytes). The system is `configs/stream-kvm.toml` with the
//! test's socket, frame count and the image built here; it runs under
//! `hypervisor::cells::run_system` on a thread
//! (`ivshmem_stack::bench::hosted::HostedSystem`).
//!
//! Synchronisation is by the cells' console lines; timeouts only guard against hangs.
//! Skipped with a message without `/dev/kvm`.

#[path = "../hypervisor/tests/process_common/mod.rs"]
#[allow(dead_code)]
mod process_common;

use std::path::Path;
use std::process::Command;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use hypervisor::kvm::kvm_available;
use ivshmem_stack::bench::hosted::{private_config, HostedSystem};
use process_common::{Lines, TempDir};

/// Frames per direction.
const COUNT: u64 = 20_000;
/// Guard on the whole exchange (both cells boot in emulated ring 0 first).
const GUARD: Duration = Duration::from_secs(120);

/// The next line with `needle`, waiting up to `GUARD` in all.
fn expect(lines: &mut Lines, needle: &str, deadline: Instant) -> String {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.rx.recv_timeout(left) {
            Ok(line) => {
                lines.seen.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                panic!("waiting for `{needle}`; seen: {:#?}", lines.seen)
            }
        }
    }
}

#[test]
fn two_kvm_inmates_stream_checksummed_frames_both_ways_at_once() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: KVM is not usable here: {why}");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join("scripts/build-inmates"))
        .status()
        .expect("running scripts/build-inmates");
    assert!(status.success(), "scripts/build-inmates failed: {status}");
    let image = root.join("inmates/target/x86_64-unknown-none/release/stream-inmate.bin");

    let dir = TempDir::new("kvm-stream");
    let socket = dir.0.join("control.sock");
    let shipped = std::fs::read_to_string(root.join("configs/stream-kvm.toml")).unwrap();
    let name = format!("kvm-stream-{}", std::process::id());
    let toml =
        private_config(&shipped, &name, &socket).replace("count=100000", &format!("count={COUNT}"));
    assert!(
        toml.contains(&format!("image = \"{}\"", image.display())),
        "configs/stream-kvm.toml changed shape: {toml}"
    );
    let mut system = HostedSystem::start(&toml).unwrap_or_else(|e| panic!("{e:#}"));
    let mut lines = Lines {
        rx: system.lines(),
        seen: Vec::new(),
    };

    let deadline = Instant::now() + GUARD;
    let want = format!("done sent {COUNT} received {COUNT} bad 0 gaps 0");
    let done = |lines: &Lines, cell: &str| {
        let prefix = format!("[{cell}] stream: done");
        lines.seen.iter().find(|l| l.starts_with(&prefix)).cloned()
    };
    while done(&lines, "stream-a").is_none() || done(&lines, "stream-b").is_none() {
        expect(&mut lines, "stream: done", deadline);
    }
    for cell in ["stream-a", "stream-b"] {
        let line = done(&lines, cell).unwrap();
        assert!(line.contains(&want), "{line}; seen: {:#?}", lines.seen);
        eprintln!("{line}");
    }
    assert!(
        !lines
            .seen
            .iter()
            .any(|l| l.contains("peer left") || l.contains("FATAL")),
        "{:#?}",
        lines.seen
    );
    system.stop().expect("hypervisor run");
}
