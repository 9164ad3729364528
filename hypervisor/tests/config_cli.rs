//! `hypervisor check` as a user runs it: the built binary, its exit code and its output.

use std::path::PathBuf;
use std::process::{Command, Output};

fn hypervisor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the hypervisor binary runs")
}

fn ready(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../configs")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Writes `text` to a fresh file in the test's temporary directory.
fn temp_config(name: &str, text: &str) -> String {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("config-cli-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_on_a_good_config_exits_0_and_prints_the_layout() {
    let output = hypervisor(&["check", &ready("telemetry.toml"), "--cpu-count", "2"]);
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&output.stderr)
    );
    for expected in [
        // Its warnings count the commands not built (release) where the test runs.
        "system \"telemetry\": configuration is valid (2 cells, 1 link, ",
        "rtos-telemetry       process  cpus 1",
        "linux-consumer       process  cpus 0",
        "telemetry: protocol 0x4001 (telemetry, user-defined), interrupts intx, 2 peers",
        "peers (ID = cell): 0 = rtos-telemetry, 1 = linux-consumer",
        "layout (total 0x21000 bytes, 132 KiB):",
        "state table    offset 0x00000000  size 0x00001000 (4 KiB)",
        "R/W section    offset 0x00001000  size 0 (absent)",
        "output 0       offset 0x00001000  size 0x00010000 (64 KiB)  written by rtos-telemetry",
        "output 1       offset 0x00011000  size 0x00010000 (64 KiB)  written by linux-consumer",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}

#[test]
fn check_prints_warnings_but_succeeds() {
    let output = hypervisor(&["check", &ready("three-cells.toml"), "--cpu-count", "2"]);
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        text(&output.stderr)
    );
    assert!(
        stdout.contains("output 2       offset 0x0000a000"),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("warning: cells[2] \"gamma\" .cpus: CPU 0 is shared with cells[0] \"alpha\""),
        "{stdout}"
    );
}

#[test]
fn check_on_a_bad_config_exits_1_and_lists_every_problem() {
    let path = temp_config(
        "bad",
        r#"
[system]
name = "bad"

[[cells]]
name = "rtos"
cpus = [0, 0]
command = "x"

[[cells]]
name = "linux"
cpus = [1]

[[links]]
name = "net0"
peers = ["rtos", "linux", "ghost"]
protocol = "ethernet"
output_size = "3K"
interrupts = "msix"
vectors = 17
"#,
    );
    let output = hypervisor(&["check", &path, "--cpu-count", "1"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        output.stdout.is_empty(),
        "nothing on stdout for a bad config"
    );
    assert!(
        stderr.contains("the configuration has 6 errors and 1 warning"),
        "{stderr}"
    );
    for expected in [
        "error: cells[0] \"rtos\" .cpus: CPU 0 is listed more than once",
        "error: cells[1] \"linux\" .command: missing field `command`",
        "error: cells[1] \"linux\" .cpus: CPU 1 does not exist on this machine, which has 1 CPU (0)",
        "error: links[0] \"net0\" .peers[2]: there is no cell called \"ghost\"",
        "error: links[0] \"net0\" .output_size: the output section size 0xc00 (3072 bytes) is not a multiple of the page size",
        "error: links[0] \"net0\" .vectors: 17 vectors: the device offers 1 to 16 MSI-X vectors per peer",
        "warning: links[0] \"net0\" .protocol: ethernet links are point-to-point",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
    assert_eq!(
        stderr.matches("  fix: ").count(),
        7,
        "every problem has a fix:\n{stderr}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn check_reports_toml_errors_with_file_line_and_column() {
    let path = temp_config(
        "syntax",
        "[system]\nname = \"s\"\n[[cells]]\nname = \"a\"\ncpus = [0\n",
    );
    let output = hypervisor(&["check", &path]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: {path}: cells[0] (line 5, column 10): unclosed array"
        )),
        "{stderr}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn check_on_a_missing_file_exits_1() {
    let output = hypervisor(&["check", "/nonexistent/system.toml"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: /nonexistent/system.toml: cannot read the configuration file"),
        "{stderr}"
    );
}

#[test]
fn check_counts_cpus_of_the_machine_it_is_told() {
    let output = hypervisor(&["check", &ready("telemetry.toml"), "--cpu-count", "1"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: cells[0] \"rtos-telemetry\" .cpus: CPU 1 does not exist"),
        "{stderr}"
    );
}

#[test]
fn status_needs_a_config_or_a_socket() {
    let output = hypervisor(&["status"]);
    assert_eq!(output.status.code(), Some(2), "a usage error");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("required arguments were not provided"),
        "{stderr}"
    );
}

const WITH_KVM_CELL: &str = r#"
[system]
name = "mixed"

[[cells]]
name = "linux"
cpus = [0]
command = "/bin/true"

[[cells]]
name = "rtos"
cpus = [1]
kind = "kvm"
memory = "16M"
image = "rtos.bin"

[[links]]
name = "l"
peers = ["linux", "rtos"]
protocol = "telemetry"
output_size = "4K"
"#;

#[test]
fn check_accepts_kvm_cells() {
    let config = temp_config("kvm-check", WITH_KVM_CELL);
    let output = hypervisor(&["check", &config, "--cpu-count", "2"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn run_refuses_a_kvm_cell_whose_image_cannot_be_read_before_starting_anything() {
    let config = temp_config("kvm-run", WITH_KVM_CELL);
    let socket = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("config-cli-{}-kvm.sock", std::process::id()));
    let output = hypervisor(&["run", &config, "--socket", &socket.to_string_lossy()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cell `rtos`: cannot read image rtos.bin"),
        "{stderr}"
    );
    assert!(!socket.exists(), "no control socket is created");
    assert!(
        !text(&output.stdout).contains("started"),
        "no cell is started"
    );
}

/// An image path that opens but cannot be read (a directory) is refused before anything
/// starts, like a missing one; it used to pass, start the process cells and fail only when
/// the VM was loaded ("stopping after an error").
#[test]
fn run_refuses_a_kvm_image_that_is_a_directory_before_starting_anything() {
    let dir = env!("CARGO_TARGET_TMPDIR");
    let config = temp_config(
        "kvm-dir-image",
        &WITH_KVM_CELL.replace("image = \"rtos.bin\"", &format!("image = \"{dir}\"")),
    );
    let socket = PathBuf::from(dir).join(format!("config-cli-{}-kvmdir.sock", std::process::id()));
    let output = hypervisor(&["run", &config, "--socket", &socket.to_string_lossy()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cell `rtos`: cannot read image {dir}: Is a directory"
        )),
        "{stderr}"
    );
    assert!(!socket.exists(), "no control socket is created");
    assert!(
        !text(&output.stdout).contains("started"),
        "no cell is started"
    );
}

/// A three-cell system whose commands are `commands` (one link over all three).
fn commands_config(name: &str, commands: [&str; 3], output_size: &str) -> String {
    let mut text = format!("[system]\nname = \"{name}\"\nallow_shared_cpus = true\n");
    for (cell, command) in ["a", "b", "c"].iter().zip(commands) {
        text += &format!("\n[[cells]]\nname = \"{cell}\"\ncpus = [0]\ncommand = \"{command}\"\n");
    }
    text += &format!(
        "\n[[links]]\nname = \"l\"\npeers = [\"a\", \"b\", \"c\"]\nprotocol = 0x4001\noutput_size = \"{output_size}\"\n"
    );
    temp_config(name, &text)
}

/// Issue 14 item 7: `check` reports a command that cannot start (as a warning: the programs
/// may not be built yet) and says which directory a relative path is taken from; `run`
/// refuses to start.
#[test]
fn a_cell_command_that_cannot_start_is_reported() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let config = commands_config(
        "commands",
        ["no/such/program", "/etc/passwd", "/bin/true"],
        "4K",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .args(["check", &config])
        .current_dir(&dir)
        .output()
        .unwrap();
    // The warnings are listed and counted in the summary, with the configuration's own.
    let err = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("(3 cells, 1 link, 4 warnings)"), "{err}");
    assert!(
        err.contains(r#"warning: cells[0] "a" .command: command no/such/program cannot be found"#),
        "{err}"
    );
    assert!(
        err.contains(&format!("from the working directory, {}", dir.display())),
        "{err}"
    );
    assert!(
        err.contains(r#"warning: cells[1] "b" .command: command /etc/passwd is not executable"#),
        "{err}"
    );
    assert!(!err.contains(r#"cells[2] "c" .command"#), "{err}");

    let socket = dir.join(format!("commands-{}.sock", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .args(["run", &config, "--socket"])
        .arg(&socket)
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(r#"error: cells[0] "a" .command"#), "{err}");
    assert!(!text(&out.stdout).contains("listening on"));
    assert!(!socket.exists());
}

/// Issue 14 item 8: link memory the machine cannot back is refused with the figures, by
/// `check` (also against a machine given with --memory) and by `run`.
#[test]
fn links_larger_than_the_machine_are_refused() {
    let config = commands_config("huge", ["/bin/true", "/bin/true", "/bin/true"], "1024G");
    let out = hypervisor(&["check", &config, "--memory", "16G"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(r#"error: links[0] "l": the links need 0x30000001000 bytes (3072.0 GiB)"#),
        "{err}"
    );
    assert!(
        err.contains("more than this machine's memory and swap (0x400000000 bytes"),
        "{err}"
    );
    // The same system fits a machine with enough memory.
    let out = hypervisor(&["check", &config, "--memory", "4096G"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // 15 PiB: no machine this test runs on has that much.
    let config = commands_config(
        "huger",
        ["/bin/true", "/bin/true", "/bin/true"],
        "15728640G",
    );
    let out = hypervisor(&["check", &config]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let socket = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("huge-{}.sock", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .args(["run", &config, "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("more than this machine's memory"), "{err}");
    assert!(!socket.exists());
}

/// A KVM cell's guest RAM counts against the machine like link memory: `memory = "64G"` on
/// a 16 GiB machine is refused by `check` (and so by `run` before anything starts), naming
/// the cell. It used to pass and fail in `run` after the process cells had started, with
/// "mmap (guest RAM) failed: Cannot allocate memory" and no cell named.
#[test]
fn kvm_guest_memory_larger_than_the_machine_is_refused() {
    let config = temp_config(
        "kvm-huge-ram",
        &WITH_KVM_CELL.replace("memory = \"16M\"", "memory = \"64G\""),
    );
    assert!(std::fs::read_to_string(&config).unwrap().contains("64G"));
    let out = hypervisor(&["check", &config, "--memory", "16G"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            r#"error: cells[1] "rtos" .memory: the KVM cells' guest RAM (64 GiB) and the links"#
        ),
        "{err}"
    );
    assert!(
        err.contains("more than this machine's memory and swap (0x400000000 bytes"),
        "{err}"
    );
    let out = hypervisor(&["check", &config, "--memory", "128G"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// Issue 14 item 16: `--help` tells the exit codes, RUST_LOG, the default socket path and how
/// `run` is stopped.
#[test]
fn help_tells_exit_codes_logging_socket_and_stopping() {
    let help = text(&hypervisor(&["--help"]).stdout);
    for want in [
        "Exit codes:",
        "3  status: no hypervisor",
        "4  run: a cell failed on its own",
        "RUST_LOG",
        "/run/ivshmem-stack/<system>.sock",
    ] {
        assert!(help.contains(want), "--help lacks {want:?}:\n{help}");
    }
    let help = text(&hypervisor(&["run", "--help"]).stdout);
    for want in ["Ctrl-C (SIGINT)", "SIGHUP", "--keep-running", "Exit code 4"] {
        assert!(help.contains(want), "run --help lacks {want:?}:\n{help}");
    }
}

/// `check`'s summary to a full disk (or a closed pipe, `check … | head -1`) is an error
/// message and exit 1, never a panic with a backtrace (it was: `failed printing to stdout`).
#[test]
fn check_to_a_full_stdout_reports_the_error_without_panicking() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full exists on Linux");
    let out = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .args(["check", &ready("telemetry.toml"), "--cpu-count", "2"])
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .stdout(full)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("hypervisor: error: writing to stdout: No space left on device"),
        "{err}"
    );
}

/// A cell name no cell can have (empty, over 64 bytes) is the user's mistake, said before
/// any hypervisor is asked; it was reported as a "malformed status reply" from the
/// hypervisor, which had sent nothing.
#[test]
fn cell_command_with_an_impossible_name_blames_the_name() {
    let socket = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-hypervisor-here.sock");
    let long = "x".repeat(65);
    for name in ["", long.as_str()] {
        let out = hypervisor(&["cell", "stop", name, "--socket", &socket.to_string_lossy()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("hypervisor: error: invalid cell name {name:?}: ")),
            "{err}"
        );
        assert!(!err.contains("reply"), "{err}");
        assert!(!err.contains("no hypervisor"), "{err}");
    }
}

/// An empty (0-byte) KVM image has nothing to boot: `check` and `run` refuse it and name the
/// path (`check` passed it).
#[test]
fn check_and_run_refuse_an_empty_kvm_image_naming_it() {
    let image = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("config-cli-{}-empty.bin", std::process::id()));
    std::fs::write(&image, b"").unwrap();
    let image = image.to_string_lossy().into_owned();
    let config = temp_config(
        "kvm-empty-image",
        &WITH_KVM_CELL.replace("image = \"rtos.bin\"", &format!("image = \"{image}\"")),
    );
    let output = hypervisor(&["check", &config, "--cpu-count", "2"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cells[1] \"rtos\" .image: the image {image} is empty (0 bytes)"
        )),
        "{stderr}"
    );
    let socket = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("config-cli-{}-kvmempty.sock", std::process::id()));
    let output = hypervisor(&["run", &config, "--socket", &socket.to_string_lossy()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is empty (0 bytes)"), "{stderr}");
    assert!(!socket.exists(), "no control socket is created");
}

/// A control socket in a directory that does not exist is refused by `check` and `run`,
/// naming the key and the directory, and `run` creates nothing (it made the directories, as
/// root, and left them); a socket under /proc is refused saying why.
#[test]
fn a_control_socket_in_a_missing_or_kernel_directory_is_refused() {
    let missing = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("config-cli-{}-nodir", std::process::id()));
    let socket = missing.join("sub/a.sock");
    let config = temp_config(
        "socket-missing-dir",
        &GOOD_RUN_CONFIG.replace(
            "[system]\n",
            &format!("[system]\ncontrol_socket = \"{}\"\n", socket.display()),
        ),
    );
    let want = format!(
        "system .control_socket: the directory {} of the control socket {} does not exist",
        socket.parent().unwrap().display(),
        socket.display()
    );
    for args in [
        vec!["check", &config, "--cpu-count", "2"],
        vec!["run", &config],
    ] {
        let output = hypervisor(&args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&want), "{args:?}: {stderr}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }

    let config = temp_config("socket-proc", GOOD_RUN_CONFIG);
    let output = hypervisor(&["run", &config, "--socket", "/proc/config-cli-fix14.sock"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--socket: the control socket /proc/config-cli-fix14.sock is in /proc, a kernel (proc/sys) file system where no socket can be created"),
        "{stderr}"
    );
}

/// Two process cells on one link, for `run` refusals that come before anything starts.
const GOOD_RUN_CONFIG: &str = r#"[system]
name = "fix14"

[[cells]]
name = "a"
cpus = [0]
command = "/bin/true"

[[cells]]
name = "b"
cpus = [1]
command = "/bin/true"

[[links]]
name = "l"
peers = ["a", "b"]
protocol = "telemetry"
output_size = "4K"
"#;
