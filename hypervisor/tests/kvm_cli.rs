//! `hypervisor run` with a KVM cell, through the binary (issue 14): a KVM cell's `FATAL:`
//! report is printed once, the cell counts as failed (exit 4) and appears in the summary;
//! `hypervisor cell stop` of a KVM cell that is not running says so and fails. Also the
//! default PCI address of a link as `kvm/mod.rs` documents it. Skipped with a message
//! without `/dev/kvm`.

use std::io::Read;
use std::process::{Command, Stdio};

use hypervisor::kvm::{kvm_available, test_guests};

#[path = "process_common/mod.rs"]
mod process_common;
use process_common::{Lines, TempDir};

/// A guest that writes to port 0x42, which no device decodes: an illegal access.
const FAULTY: &str = r#"
main:
    call setup
    mov $0x5a, %al
    outb %al, $0x42
1:  hlt
    jmp 1b
"#;

#[test]
fn a_kvm_cells_fatal_stop_is_printed_once_fails_the_run_and_is_in_the_summary() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: KVM is not usable here: {why}");
        return;
    }
    let dir = TempDir::new("kvm-cli");
    let socket = dir.0.join("hv.sock");
    let image = dir.0.join("faulty.bin");
    std::fs::write(&image, test_guests::assemble(FAULTY).unwrap().image).unwrap();
    let config = dir.0.join("kvm.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[system]
name = "kvm-cli"
control_socket = "{socket}"
allow_shared_cpus = true

[[cells]]
name = "bad"
kind = "kvm"
cpus = [0]
memory = "512K"
image = "{image}"

[[cells]]
name = "idle"
cpus = [0]
command = "/bin/sh"
args = ["-c", "echo up; exec sleep 100"]
"#,
            socket = socket.display(),
            image = image.display(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .arg("run")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let mut out = Lines::new(child.stdout.take().unwrap());
    // Both, in either order.
    for want in [
        "FATAL: cell \"bad\": illegal port write at 0x42",
        "[idle] up",
    ] {
        if !out.seen.iter().any(|l| l.contains(want)) {
            out.expect(want);
        }
    }

    // The stopped KVM cell cannot be stopped again: said so, non-zero exit.
    let stop = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .args(["cell", "stop", "bad", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&stop.stderr);
    assert_eq!(stop.status.code(), Some(1), "stdout: {:?}", stop.stdout);
    assert!(
        err.contains("`cell stop bad` refused by the hypervisor: cell `bad` is not running"),
        "{err}"
    );

    // Our own unreaped child: its pid cannot have been recycled.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let summary = out.expect("stopped 1 spawned cell(s) and 1 KVM cell(s)");
    let status = child.wait().unwrap();
    let err = stderr_reader.join().unwrap();
    assert!(
        summary.contains("bad (kvm) had already exited: stopped for an illegal access"),
        "{summary}"
    );
    assert!(summary.contains("idle (pid "), "{summary}");
    assert_eq!(
        status.code(),
        Some(4),
        "a crashed KVM cell fails the run; {err}"
    );
    assert!(
        err.contains("1 cell(s) failed: bad (stopped for an illegal access)"),
        "{err}"
    );
    // Drain what is left of stdout, then count every FATAL line of both streams.
    while let Ok(line) = out.rx.recv_timeout(std::time::Duration::from_secs(10)) {
        out.seen.push(line);
    }
    let fatal = out.seen.iter().filter(|l| l.contains("FATAL:")).count()
        + err.lines().filter(|l| l.contains("FATAL:")).count();
    assert_eq!(fatal, 1, "stdout: {:#?}\nstderr: {err}", out.seen);
}

#[test]
fn a_links_default_pci_address_is_01_0e_0_as_documented() {
    let text = r#"
[system]
name = "bdf"
allow_shared_cpus = true

[[cells]]
name = "vm"
kind = "kvm"
cpus = [0]
memory = "1M"
image = "vm.bin"

[[cells]]
name = "p"
cpus = [0]
command = "/bin/true"

[[links]]
name = "first"
peers = ["vm", "p"]
protocol = 0x4000
output_size = "4K"

[[links]]
name = "second"
peers = ["vm", "p"]
protocol = 0x4000
output_size = "4K"
"#;
    let valid = hypervisor::config::SystemConfig::from_toml_str(text)
        .unwrap()
        .validate()
        .unwrap();
    let bdfs: Vec<String> = valid.links.iter().map(|l| l.bdf.to_string()).collect();
    assert_eq!(bdfs, ["01:0e.0", "01:0f.0"]);
}
