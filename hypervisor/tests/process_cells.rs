//! Multi-process tests of the `hypervisor` binary with cells that need no endpoint library:
//! the status of a missing hypervisor, the forwarding of spawned cells' output, stopping and
//! summaries (process cells, and a KVM cell that stops itself with an illegal access).
//! Tests with cells that attach through `linux-uio-client` live in the root package's
//! `tests/process_cells.rs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

const GUARD: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Test side
// ---------------------------------------------------------------------------------------

#[path = "process_common/mod.rs"]
mod process_common;
use process_common::{Lines, TempDir};

struct Hypervisor {
    child: Child,
    out: Lines,
}

impl Hypervisor {
    /// SIGTERM, then the exit status; checks that it says what it stopped.
    fn stop(mut self) -> (ExitStatus, Vec<String>) {
        // Our own unreaped child: its pid cannot have been recycled.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        self.out.expect("stopped");
        let status = self.child.wait().unwrap();
        (status, std::mem::take(&mut self.out.seen))
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        // A failed test must not leave the hypervisor behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn status_without_a_hypervisor_is_a_clear_error() {
    let dir = TempDir::new("nostatus");
    let socket = dir.0.join("none.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .arg("status")
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no hypervisor is running at"), "{err}");
}

#[test]
fn spawned_cells_output_is_forwarded_line_by_line_with_the_cell_name_on_its_stream() {
    let dir = TempDir::new("forward");
    let socket = dir.0.join("hv.sock");
    let config = dir.0.join("forward.toml");
    // Each cell builds lines from several writes and ends both streams with a partial line;
    // `talker` writes more than one forwarding chunk of stdout in one go.
    std::fs::write(
        &config,
        format!(
            r#"
[system]
name = "forward-test"
control_socket = "{socket}"
allow_shared_cpus = true

[[cells]]
name = "talker"
cpus = [0]
command = "/bin/sh"
args = ["-c", "echo out-one; printf out-; printf two; echo; echo err-one >&2; head -c 40000 /dev/zero | tr '\\0' x; echo; printf partial-out; printf partial-err >&2"]

[[cells]]
name = "chatter"
cpus = [0]
command = "/bin/sh"
args = ["-c", "printf chat-; echo one; printf chat-err >&2; exit 4"]
"#,
            socket = socket.display(),
        ),
    )
    .unwrap();
    // Kept running after both cells exit, so that the test stops it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .arg("run")
        .arg(&config)
        .arg("--keep-running")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    let mut hv = Hypervisor {
        out: Lines::new(child.stdout.take().unwrap()),
        child,
    };
    // Both cells exit on their own (in either order); their output comes before that.
    let ended = |seen: &[String], cell: &str| {
        let needle = format!("cell {cell}: process");
        seen.iter().any(|l| l.contains(&needle))
    };
    while !(ended(&hv.out.seen, "talker") && ended(&hv.out.seen, "chatter")) {
        let line = hv
            .out
            .rx
            .recv_timeout(GUARD)
            .expect("the cells' exits were not reported");
        hv.out.seen.push(line);
    }
    let (status, log) = hv.stop();
    // `chatter` failed on its own (exit 4).
    assert_eq!(status.code(), Some(4), "{status:?}");
    let err = stderr_reader.join().unwrap();
    let err: Vec<&str> = err.lines().collect();

    let long = format!("[talker] {}", "x".repeat(40000));
    for want in [
        "[talker] out-one",
        "[talker] out-two",
        long.as_str(),
        "[talker] partial-out",
        "[chatter] chat-one",
    ] {
        assert!(
            log.iter().any(|l| l == want),
            "stdout lacks {want:.40}: {log:#?}"
        );
        assert!(!err.contains(&want), "{want:.40} also on stderr");
    }
    for want in [
        "[talker] err-one",
        "[talker] partial-err",
        "[chatter] chat-err",
    ] {
        assert!(err.contains(&want), "stderr lacks {want}: {err:#?}");
        assert!(!log.iter().any(|l| l == want), "{want} also on stdout");
    }
    // Every forwarded line carries exactly one whole line of one cell.
    let forwarded = log
        .iter()
        .map(String::as_str)
        .chain(err.iter().copied())
        .filter(|l| l.starts_with('['));
    for line in forwarded {
        let body = line.split_once("] ").map(|(_, b)| b).unwrap_or("");
        assert!(
            !body.contains("[talker]") && !body.contains("[chatter]"),
            "mixed line {line:.80}"
        );
    }
    let ended = log
        .iter()
        .position(|l| l.contains("cell talker: process"))
        .unwrap();
    let last = log
        .iter()
        .position(|l| l == "[talker] partial-out")
        .unwrap();
    assert!(
        last < ended,
        "the partial line comes before the exit report"
    );
}

/// A configuration of shell-script cells (`name`, script) on no link.
fn shell_cells(dir: &Path, socket: &Path, cells: &[(&str, &str)]) -> PathBuf {
    let mut text = format!(
        "[system]\nname = \"exit-test\"\ncontrol_socket = \"{}\"\nallow_shared_cpus = true\n",
        socket.display()
    );
    for (name, script) in cells {
        text.push_str(&format!(
            "\n[[cells]]\nname = \"{name}\"\ncpus = [0]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"{script}\"]\n"
        ));
    }
    let config = dir.join("cells.toml");
    std::fs::write(&config, text).unwrap();
    config
}

/// `hypervisor run <config> [extra]` with stdout read line by line and stderr collected.
fn run_hypervisor(config: &Path, extra: &[&str]) -> (Hypervisor, std::thread::JoinHandle<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .arg("run")
        .arg(config)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    let hv = Hypervisor {
        out: Lines::new(child.stdout.take().unwrap()),
        child,
    };
    (hv, stderr_reader)
}

/// Issue 14 item 14: `run` ends by itself once every spawned cell has exited, with a summary,
/// and its exit code says whether a cell failed.
#[test]
fn run_exits_with_a_summary_once_every_spawned_cell_has_exited() {
    let dir = TempDir::new("all-exited");
    let socket = dir.0.join("hv.sock");
    let config = shell_cells(
        &dir.0,
        &socket,
        &[
            ("fine", "exit 0"),
            ("three", "exit 3"),
            ("crash", "kill -SEGV $$"),
        ],
    );
    let (mut hv, stderr) = run_hypervisor(&config, &[]);
    hv.out.expect("stopping (every spawned cell has exited)");
    let summary = hv.out.expect("stopped 3 spawned cell(s)");
    let status = hv.child.wait().unwrap();
    let err = stderr.join().unwrap();
    assert_eq!(status.code(), Some(4), "{status:?}; stderr: {err}");
    for want in [
        "fine (pid ",
        "had already exited: exit code 0",
        "three (pid ",
        "had already exited: exit code 3",
        "had already exited: killed by signal 11 (SIGSEGV)",
    ] {
        assert!(summary.contains(want), "summary lacks {want}: {summary}");
    }
    assert!(
        err.contains("hypervisor: 2 cell(s) failed: "),
        "stderr: {err}"
    );
    assert!(err.contains("three (exit code 3)"), "stderr: {err}");
    assert!(
        err.contains("crash (killed by signal 11 (SIGSEGV))"),
        "stderr: {err}"
    );
    assert!(!err.contains("fine ("), "stderr: {err}");
    assert!(!socket.exists(), "the control socket was not removed");

    // Every cell succeeds: exit 0, no failure reported.
    let config = shell_cells(&dir.0, &socket, &[("one", "exit 0"), ("two", "true")]);
    let (mut hv, stderr) = run_hypervisor(&config, &[]);
    hv.out.expect("stopped 2 spawned cell(s)");
    let status = hv.child.wait().unwrap();
    let err = stderr.join().unwrap();
    assert!(status.success(), "{status:?}; stderr: {err}");
    assert!(!err.contains("failed"), "stderr: {err}");
}

/// With `--keep-running` the hypervisor serves on after its cells have exited (a status query
/// is answered) until it is told to stop.
#[test]
fn keep_running_serves_after_every_spawned_cell_has_exited() {
    let dir = TempDir::new("keep-running");
    let socket = dir.0.join("hv.sock");
    let config = shell_cells(&dir.0, &socket, &[("only", "exit 0")]);
    let (mut hv, stderr) = run_hypervisor(&config, &["--keep-running"]);
    // The loop that reports the exit would stop in the same round; a status query is
    // served only if it did not.
    hv.out.expect("cell only: process");
    let out = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .arg("status")
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status after the cell exited: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("only ") && l.contains("exited")),
        "{table}"
    );
    let (status, log) = hv.stop();
    assert!(status.success(), "{status:?}");
    assert!(
        log.iter().any(|l| l.contains("stopping (SIGTERM)")),
        "{log:#?}"
    );
    let err = stderr.join().unwrap();
    assert!(!err.contains("failed"), "stderr: {err}");
}

/// Issue 14 item 13: stopping a cell stops what it started (its process group), not only its
/// own process. A FIFO tells when the last process holding its write end is gone.
#[test]
fn stopping_a_cell_stops_the_processes_it_started() {
    use nix::fcntl::{open, OFlag};
    use nix::poll::{poll, PollFd, PollFlags};
    use nix::sys::stat::Mode;
    use std::os::fd::AsFd;

    let dir = TempDir::new("orphans");
    let socket = dir.0.join("hv.sock");
    let fifo = dir.0.join("held");
    nix::unistd::mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
    // Our read end first (non-blocking open), so the cell's `exec 3>` does not block.
    let reader = open(&fifo, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty()).unwrap();
    let script = format!("exec 3>{}; sleep 100 & echo started; wait", fifo.display());
    let config = shell_cells(&dir.0, &socket, &[("parent", &script)]);
    let (mut hv, _stderr) = run_hypervisor(&config, &[]);
    hv.out.expect("[parent] started");
    let (status, log) = hv.stop();
    assert!(status.success(), "{status:?}: {log:#?}");
    // Every writer gone (the shell and its `sleep`): POLLHUP. An orphaned `sleep` would hold
    // the FIFO open for 100 s.
    let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, 10_000u16).unwrap();
    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
    assert!(
        revents.contains(PollFlags::POLLHUP),
        "a process the cell started still holds the FIFO ({revents:?})"
    );
}

/// A cell whose own process ends while processes it started run on is over: they are killed
/// with it, not left holding its output section's mapping (and here the FIFO) as orphans.
/// They used to survive both the cell's end and the hypervisor's stop.
#[test]
fn processes_a_cell_started_end_when_the_cell_ends_on_its_own() {
    use nix::fcntl::{open, OFlag};
    use nix::poll::{poll, PollFd, PollFlags};
    use nix::sys::stat::Mode;
    use std::os::fd::AsFd;

    let dir = TempDir::new("leftovers");
    let socket = dir.0.join("hv.sock");
    let fifo = dir.0.join("held");
    nix::unistd::mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
    let reader = open(&fifo, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty()).unwrap();
    let script = format!(
        "exec 3>{}; sleep 100 >/dev/null 2>&1 & echo started; exit 3",
        fifo.display()
    );
    let config = shell_cells(&dir.0, &socket, &[("leader", &script)]);
    let (mut hv, _stderr) = run_hypervisor(&config, &["--keep-running"]);
    hv.out.expect("cell leader: process");
    // The hypervisor still runs: the cell's end, not the stop, must take the `sleep` along.
    let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, 10_000u16).unwrap();
    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
    assert!(
        revents.contains(PollFlags::POLLHUP),
        "a process the ended cell started still holds the FIFO ({revents:?})"
    );
    let (status, log) = hv.stop();
    assert_eq!(status.code(), Some(4), "{log:#?}");
}

/// Issue 14 item 12: SIGHUP (the terminal closed) stops the system like SIGINT: a summary,
/// the socket removed, exit 0.
#[test]
fn sighup_stops_the_system_with_a_summary() {
    let dir = TempDir::new("sighup");
    let socket = dir.0.join("hv.sock");
    let config = shell_cells(&dir.0, &socket, &[("idle", "echo up; exec sleep 100")]);
    let (mut hv, _stderr) = run_hypervisor(&config, &[]);
    hv.out.expect("[idle] up");
    let pid = nix::unistd::Pid::from_raw(hv.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    hv.out.expect("stopping (SIGHUP)");
    let summary = hv.out.expect("stopped 1 spawned cell(s)");
    assert!(summary.contains("removed"), "{summary}");
    let status = hv.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the control socket was not removed");
}

/// Issue 14 item 11: an OS error is printed once, not once per level of the error chain.
#[test]
fn run_prints_each_cause_of_an_error_once() {
    let dir = TempDir::new("chain");
    let socket = dir.0.join("hv.sock");
    let config = shell_cells(&dir.0, &socket, &[("one", "exit 0")]);
    // The socket's directory is a regular file: creating it fails with EEXIST.
    let file = dir.0.join("file");
    std::fs::write(&file, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .arg("run")
        .arg(&config)
        .arg("--socket")
        .arg(file.join("hv.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let os_error = "File exists (os error 17)";
    assert_eq!(err.matches(os_error).count(), 1, "{err}");
    assert!(err.contains("hypervisor: error: running system"), "{err}");
}

/// Issue 14 item 15: a user who may not connect to another user's hypervisor is told so,
/// not that no hypervisor runs; `run` on that socket says whose it is, once.
#[test]
fn another_users_hypervisor_is_reported_as_such() {
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run the unprivileged side as another user");
        return;
    }
    let dir = TempDir::new("other-user");
    let socket = dir.0.join("hv.sock");
    let config = shell_cells(&dir.0, &socket, &[("idle", "echo up; exec sleep 100")]);
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (mut hv, _stderr) = run_hypervisor(&config, &[]);
    hv.out.expect("[idle] up");
    let as_nobody = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_hypervisor"))
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let out = as_nobody(&["status".as_ref(), "--socket".as_ref(), socket.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("belongs to another user"), "{err}");
    assert!(!err.contains("no hypervisor is running"), "{err}");
    let out = as_nobody(&[
        "run".as_ref(),
        config.as_os_str(),
        "--socket".as_ref(),
        socket.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("belongs to another user"), "{err}");
    assert!(err.matches("ermission denied").count() == 1, "{err}");
    let (status, _) = hv.stop();
    assert!(status.success());
}

/// Issue 14 item 16: a refused attach is reported once (the log line on stdout), and
/// nothing on a stderr that is not a terminal carries ANSI colours.
#[test]
fn a_refused_attach_is_reported_once_without_colours() {
    use ivshmem_dev::hosted::{decode_reply, AttachBody, Reply, Request, WireName};
    use nix::sys::socket::{recv, send, MsgFlags};
    use std::os::fd::AsRawFd;

    let dir = TempDir::new("refused");
    let socket = dir.0.join("hv.sock");
    let config = shell_cells(&dir.0, &socket, &[("idle", "echo up; exec sleep 100")]);
    let (mut hv, stderr) = run_hypervisor(&config, &[]);
    hv.out.expect("[idle] up");
    let fd = hypervisor::control::connect_control_socket(&socket).unwrap();
    let mut buf = [0u8; ivshmem_dev::hosted::MAX_MESSAGE_SIZE];
    let attach = Request::Attach(AttachBody {
        cell: WireName::new("zzz").unwrap(),
    });
    let n = attach.encode(&mut buf).unwrap();
    send(fd.as_raw_fd(), &buf[..n], MsgFlags::MSG_NOSIGNAL).unwrap();
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    assert!(matches!(decode_reply(&buf[..n]), Ok(Reply::Refused(_))));
    hv.out.expect("attach as `zzz` refused");
    let (status, log) = hv.stop();
    assert!(status.success(), "{status:?}");
    let err = stderr.join().unwrap();
    let told = log.iter().filter(|l| l.contains("zzz")).count() + err.matches("zzz").count();
    assert_eq!(told, 1, "stdout: {log:#?}\nstderr: {err}");
    assert!(
        !err.contains('\x1b'),
        "ANSI escapes on a non-terminal: {err:?}"
    );
}

/// `hypervisor cell NAME` with `args` against `socket`: exit code and stderr.
fn cell_command(socket: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .arg("cell")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `hypervisor cell stop` of a process cell: SIGTERM first (the cell may clean up and says
/// so), not SIGKILL; a second stop is refused as "not running" with a non-zero exit; the
/// run does not count the stopped cell as failed.
#[test]
fn cell_stop_terminates_a_process_cell_gracefully_and_refuses_a_second_stop() {
    let dir = TempDir::new("cell-stop");
    let socket = dir.0.join("hv.sock");
    // The trap runs once the foreground `sleep` (killed with the group) has ended.
    let script = "trap 'echo got-term; exit 0' TERM; echo up; while :; do sleep 1; done";
    let config = shell_cells(&dir.0, &socket, &[("graceful", script)]);
    let (mut hv, stderr) = run_hypervisor(&config, &["--keep-running"]);
    hv.out.expect("[graceful] up");
    let (code, out, err) = cell_command(&socket, &["stop", "graceful"]);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    hv.out.expect("cell graceful: stopping process");
    hv.out.expect("[graceful] got-term");
    let ended = hv.out.expect("cell graceful: process");
    assert!(ended.contains("ended: exit code 0"), "{ended}");

    let (code, _, err) = cell_command(&socket, &["stop", "graceful"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            "`cell stop graceful` refused by the hypervisor: cell `graceful` is not running"
        ),
        "{err}"
    );
    let (status, _) = hv.stop();
    assert!(status.success(), "a stopped cell is no failure: {status:?}");
    let err = stderr.join().unwrap();
    assert!(!err.contains("failed"), "stderr: {err}");
}

/// A refused `cell` command names the command and the reason, not a "status query".
#[test]
fn a_refused_cell_command_names_the_command_and_why() {
    let dir = TempDir::new("cell-refused");
    let socket = dir.0.join("hv.sock");
    let config = shell_cells(&dir.0, &socket, &[("idle", "echo up; exec sleep 100")]);
    let (mut hv, _stderr) = run_hypervisor(&config, &[]);
    hv.out.expect("[idle] up");
    let (code, _, err) = cell_command(&socket, &["restart", "nobody"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("`cell restart nobody` refused by the hypervisor: no cell named `nobody`"),
        "{err}"
    );
    assert!(!err.contains("status query"), "{err}");
    let (code, _, err) = cell_command(&socket, &["start", "idle"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cell `idle` is already running"), "{err}");
    let (status, _) = hv.stop();
    assert!(status.success(), "{status:?}");
}

/// A guest that writes to port 0x42, which no device decodes: an illegal access.
const FAULTY_GUEST: &str = r#"
main:
    call setup
    mov $0x5a, %al
    outb %al, $0x42
1:  hlt
    jmp 1b
"#;

/// A KVM cell's `FATAL:` report is printed once (not also as a log line), the cell counts as
/// failed (exit 4) and is in the summary; `cell stop` of the stopped KVM cell says it is not
/// running and fails. Skipped with a message without `/dev/kvm`.
#[test]
fn a_kvm_cells_fatal_stop_is_printed_once_fails_the_run_and_is_in_the_summary() {
    use hypervisor::kvm::{kvm_available, test_guests};
    if let Err(why) = kvm_available() {
        eprintln!("skipping: KVM is not usable here: {why}");
        return;
    }
    let dir = TempDir::new("kvm-fatal");
    let socket = dir.0.join("hv.sock");
    let image = dir.0.join("faulty.bin");
    std::fs::write(&image, test_guests::assemble(FAULTY_GUEST).unwrap().image).unwrap();
    let config = shell_cells(&dir.0, &socket, &[("idle", "echo up; exec sleep 100")]);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[cells]]\nname = \"bad\"\nkind = \"kvm\"\ncpus = [0]\nmemory = \"512K\"\nimage = \"{}\"\n",
        image.display()
    ));
    std::fs::write(&config, text).unwrap();
    let (mut hv, stderr) = run_hypervisor(&config, &[]);
    // Both, in either order.
    for want in [
        "FATAL: cell \"bad\": illegal port write at 0x42",
        "[idle] up",
    ] {
        if !hv.out.seen.iter().any(|l| l.contains(want)) {
            hv.out.expect(want);
        }
    }

    let (code, _, err) = cell_command(&socket, &["stop", "bad"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("`cell stop bad` refused by the hypervisor: cell `bad` is not running"),
        "{err}"
    );

    // Our own unreaped child: its pid cannot have been recycled.
    let pid = nix::unistd::Pid::from_raw(hv.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let summary = hv.out.expect("stopped 1 spawned cell(s) and 1 KVM cell(s)");
    let status = hv.child.wait().unwrap();
    // The rest of stdout, up to its end.
    while let Ok(line) = hv.out.rx.recv_timeout(GUARD) {
        hv.out.seen.push(line);
    }
    let log = std::mem::take(&mut hv.out.seen);
    let err = stderr.join().unwrap();
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
    let fatal = log.iter().filter(|l| l.contains("FATAL:")).count()
        + err.lines().filter(|l| l.contains("FATAL:")).count();
    assert_eq!(fatal, 1, "stdout: {log:#?}\nstderr: {err}");
}

/// `cell stop` of the only running cell does not end a `run` without `--keep-running`: the
/// stopped cell waits for `cell start`, which starts it again; once it exits on its own the
/// run stops as before ("every spawned cell has exited").
#[test]
fn cell_stop_of_the_last_cell_keeps_run_serving_for_cell_start() {
    let dir = TempDir::new("cell-stop-last");
    let socket = dir.0.join("hv.sock");
    let marker = dir.0.join("started-once");
    // The first start idles until stopped; the second exits on its own.
    let script = format!(
        "if [ -e {m} ]; then echo again; exit 0; fi; touch {m}; echo up; exec sleep 100",
        m = marker.display()
    );
    let config = shell_cells(&dir.0, &socket, &[("only", &script)]);
    let (mut hv, _stderr) = run_hypervisor(&config, &[]);
    hv.out.expect("[only] up");
    let (code, out, err) = cell_command(&socket, &["stop", "only"]);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    hv.out.expect("cell only: process");
    // Still serving: the start is accepted and the cell runs again.
    let (code, out, err) = cell_command(&socket, &["start", "only"]);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    hv.out.expect("[only] again");
    hv.out.expect("stopping (every spawned cell has exited)");
    let status = hv.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// The pid in the hypervisor's `cell NAME: started `...` (pid N, ...)` line for `cell`
/// (the last one seen).
fn started_pid(seen: &[String], cell: &str) -> i32 {
    let prefix = format!("cell {cell}: started");
    let line = seen
        .iter()
        .rev()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no start of {cell}: {seen:#?}"));
    line.split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

/// Waits for each of `wants` (in any order) in the hypervisor's output.
fn expect_all(hv: &mut Hypervisor, wants: &[&str]) {
    for want in wants {
        if !hv.out.seen.iter().any(|l| l.contains(want)) {
            hv.out.expect(want);
        }
    }
}

/// A running system of cell `idle` and cell `name`, whose first life idles (until stopped
/// or killed) and whose later lives run `then` after `echo again`; both have said `up`.
fn two_lives(
    tag: &str,
    name: &str,
    then: &str,
) -> (
    TempDir,
    PathBuf,
    Hypervisor,
    std::thread::JoinHandle<String>,
) {
    let dir = TempDir::new(tag);
    let socket = dir.0.join("hv.sock");
    let script = format!(
        "if [ -e {m} ]; then echo again; {then}; fi; touch {m}; echo up; exec sleep 100",
        m = dir.0.join("started").display()
    );
    let config = shell_cells(
        &dir.0,
        &socket,
        &[("idle", "echo up; exec sleep 100"), (name, &script)],
    );
    let (mut hv, stderr) = run_hypervisor(&config, &[]);
    expect_all(&mut hv, &[&format!("[{name}] up"), "[idle] up"]);
    (dir, socket, hv, stderr)
}

/// The summary line of a stopped hypervisor's log.
fn summary_line(log: &[String]) -> &str {
    log.iter()
        .find(|l| l.contains("spawned cell(s)"))
        .unwrap_or_else(|| panic!("no summary: {log:#?}"))
}

/// A cell whose first life was killed (here by `kill -9` from outside) and which was then
/// restarted is judged by its last life: the run does not fail when that life succeeded, the
/// summary lists the cell once, counts it once and says it was restarted. (The killed life
/// used to make the run fail with exit 4.)
#[test]
fn a_cell_killed_and_restarted_is_reported_by_its_last_life() {
    let (_dir, socket, mut hv, stderr) = two_lives("restarted-summary", "victim", "exit 0");
    let first = started_pid(&hv.out.seen, "victim");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    hv.out.expect(&format!(
        "cell victim: process {first} ended: killed by signal 9"
    ));
    let (code, out, err) = cell_command(&socket, &["restart", "victim"]);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    hv.out.expect("[victim] again");
    let second = started_pid(&hv.out.seen, "victim");
    assert_ne!(first, second);
    hv.out
        .expect(&format!("cell victim: process {second} ended: exit code 0"));
    let (status, log) = hv.stop();
    let err = stderr.join().unwrap();
    let summary = summary_line(&log);
    assert!(
        status.success(),
        "the last life succeeded: {status:?}\n{summary}\nstderr: {err}"
    );
    assert!(!err.contains("failed"), "stderr: {err}");
    assert!(
        summary.starts_with("stopped 2 spawned cell(s);"),
        "{summary}"
    );
    assert_eq!(summary.matches("victim (").count(), 1, "{summary}");
    assert!(
        summary.contains(&format!(
            "victim (pid {second}, restarted once) had already exited: exit code 0"
        )),
        "{summary}"
    );
}

/// The other way round: a cell restarted by `cell stop` + `cell start` whose last life fails
/// fails the run, once, with the last life's exit.
#[test]
fn a_restarted_cell_whose_last_life_fails_fails_the_run_once() {
    let (_dir, socket, mut hv, stderr) = two_lives("restarted-fails", "flaky", "exit 7");
    for verb in ["stop", "start"] {
        let (code, out, err) = cell_command(&socket, &[verb, "flaky"]);
        assert_eq!(code, Some(0), "{verb}: stdout: {out}\nstderr: {err}");
    }
    hv.out.expect("[flaky] again");
    hv.out.expect("ended: exit code 7");
    let (status, log) = hv.stop();
    let err = stderr.join().unwrap();
    let summary = summary_line(&log);
    assert_eq!(status.code(), Some(4), "{summary}\nstderr: {err}");
    assert!(
        err.contains("hypervisor: 1 cell(s) failed: flaky (exit code 7)"),
        "stderr: {err}"
    );
    assert!(
        summary.starts_with("stopped 2 spawned cell(s);"),
        "{summary}"
    );
    assert!(
        summary.contains("restarted once) had already exited: exit code 7"),
        "{summary}"
    );
}

/// A pidfd for process `pid` (any process, not only a child): readable once it has exited.
fn pidfd_open(pid: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall with integer arguments; the result is checked.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        raw >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd owned by nobody else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(raw as i32) }
}

/// Processes started by the test's cells, SIGKILLed through their pidfds when the test ends
/// (so that a failing test leaves nothing behind).
struct Watched(Vec<(String, std::os::fd::OwnedFd)>);

impl Watched {
    /// Waits until every watched process has exited; the names of those that did not within
    /// `within`.
    fn survivors(&self, within: Duration) -> Vec<&str> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let deadline = std::time::Instant::now() + within;
        loop {
            let mut fds: Vec<PollFd<'_>> = self
                .0
                .iter()
                .map(|(_, fd)| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
                .collect();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            poll(&mut fds, PollTimeout::try_from(left).unwrap()).unwrap();
            let alive: Vec<&str> = self
                .0
                .iter()
                .zip(&fds)
                .filter(|(_, p)| p.revents().is_none_or(|r| r.is_empty()))
                .map(|((name, _), _)| name.as_str())
                .collect();
            if alive.is_empty() || left.is_zero() {
                return alive;
            }
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        for (_, fd) in &self.0 {
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on a pidfd we own; a process already gone is no error.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
    }
}

/// The pid in a `[cell] NAME PID` line.
fn reported_pid(line: &str) -> i32 {
    line.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

/// The start of a shell command that reports the shell's pid as the host names it (its
/// `/proc`), which inside a cell's PID namespace is not `$$`: `... NAME $p`.
const REPORT_PID: &str = "read p r < /proc/self/stat; echo";

/// `kill -9` of the hypervisor leaves no process of a cell running: neither a process its
/// program started (which used to run on as an orphan) nor one that left the cell's process
/// group and session (`setsid`) after its parent exited. Needs root (a PID namespace per
/// cell); skipped with a message otherwise.
#[test]
fn no_process_of_a_cell_outlives_a_kill_9_of_the_hypervisor() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: a PID namespace per cell needs root (CAP_SYS_ADMIN)");
        return;
    }
    let dir = TempDir::new("kill9-descendants");
    let socket = dir.0.join("hv.sock");
    let script = format!(
        "sh -c '{REPORT_PID} child $p; exec sleep 100' & \
         (sh -c '{REPORT_PID} escaped $p; exec setsid sleep 100' &); \
         {REPORT_PID} up $p; wait"
    );
    let config = shell_cells(&dir.0, &socket, &[("forker", &script)]);
    let (mut hv, _stderr) = run_hypervisor(&config, &[]);
    // The three lines come in any order.
    let wants = ["[forker] up", "[forker] child", "[forker] escaped"];
    expect_all(&mut hv, &wants);
    let [program, child, escaped] =
        wants.map(|want| reported_pid(hv.out.seen.iter().find(|l| l.starts_with(want)).unwrap()));
    let watched = Watched(vec![
        ("the cell's program".into(), pidfd_open(program)),
        ("a process the program started".into(), pidfd_open(child)),
        (
            "an orphan in a session of its own".into(),
            pidfd_open(escaped),
        ),
    ]);
    assert_eq!(
        watched.survivors(Duration::ZERO).len(),
        3,
        "every process runs before the kill"
    );
    hv.child.kill().unwrap();
    let status = hv.child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let survivors = watched.survivors(GUARD);
    assert!(
        survivors.is_empty(),
        "still running {GUARD:?} after the hypervisor's kill -9: {survivors:?}"
    );
}

/// Without the privilege for a PID namespace (a hypervisor that is not root) the cells still
/// run; a warning says once that what they start is not confined. Run as `nobody` when the
/// test runs as root.
#[test]
fn an_unprivileged_hypervisor_runs_cells_and_warns_once_that_their_processes_are_not_confined() {
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("unprivileged");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let socket = dir.0.join("hv.sock");
    let config = shell_cells(
        &dir.0,
        &socket,
        &[
            ("one", "echo up; exec sleep 100"),
            ("two", "sleep 100 & echo up; wait"),
        ],
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hypervisor"));
    cmd.arg("run").arg(&config);
    if nix::unistd::geteuid().is_root() {
        cmd.uid(65534).gid(65534);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut hv = Hypervisor {
        out: Lines::new(child.stdout.take().unwrap()),
        child,
    };
    expect_all(
        &mut hv,
        &[
            "warning: cells run without a PID namespace",
            "[one] up",
            "[two] up",
        ],
    );
    let (status, log) = hv.stop();
    assert!(status.success(), "{status:?}: {log:#?}");
    let warnings = log.iter().filter(|l| l.contains("PID namespace")).count();
    assert_eq!(warnings, 1, "{log:#?}");
}

/// A signal a user sends to the pid the hypervisor reports for a cell reaches the cell's
/// program (in a PID namespace that pid is the program's relay, which forwards it), and the
/// program's own exit status is the cell's.
#[test]
fn a_signal_to_a_cells_reported_pid_reaches_its_program() {
    let dir = TempDir::new("forwarded-signal");
    let socket = dir.0.join("hv.sock");
    let script = "trap 'echo got-usr1; exit 5' USR1; echo up; sleep 100 & wait";
    let config = shell_cells(&dir.0, &socket, &[("trapper", script)]);
    let (mut hv, _stderr) = run_hypervisor(&config, &["--keep-running"]);
    hv.out.expect("[trapper] up");
    let pid = started_pid(&hv.out.seen, "trapper");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    hv.out.expect("[trapper] got-usr1");
    hv.out
        .expect(&format!("cell trapper: process {pid} ended: exit code 5"));
    let (status, _) = hv.stop();
    assert_eq!(status.code(), Some(4), "exit 5 is a failure");
}

/// `hypervisor cell VERB NAME --socket SOCKET` started now; its (exit code, stdout, stderr)
/// arrives on the receiver when it has finished.
fn cell_command_started(
    socket: &Path,
    verb: &str,
    cell: &str,
) -> std::sync::mpsc::Receiver<(Option<i32>, String, String)> {
    let child = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .args(["cell", verb, cell, "--socket"])
        .arg(socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = child.wait_with_output().unwrap();
        let _ = tx.send((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    });
    rx
}

/// The `hypervisor status` table line of `cell`.
fn status_line(socket: &Path, cell: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hypervisor"))
        .args(["status", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    table
        .lines()
        .find(|l| l.starts_with(&format!("{cell} ")))
        .unwrap_or_else(|| panic!("no line for {cell}: {table}"))
        .to_string()
}

/// Two clients ask for `cell stop` and `cell restart` of one cell at once: the request that
/// arrives while the other is being carried out is refused at once as busy (naming the one in
/// progress), and the first one's outcome stands: a stopped cell does not come back, a
/// restarted one is not stopped behind its client's back. The cell holds its stop open (its
/// SIGTERM trap waits on a FIFO) until the loser has its answer, so the two always overlap.
/// (The second request used to wait, and then be carried out after the first.)
#[test]
fn a_cell_request_arriving_while_another_is_carried_out_is_refused_as_busy() {
    use std::io::Write as _;
    for (first, second) in [("stop", "restart"), ("restart", "stop")] {
        let dir = TempDir::new(&format!("busy-{first}"));
        let socket = dir.0.join("hv.sock");
        let gate = dir.0.join("gate");
        nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Only the first life holds its stop open.
        let script = format!(
            "if [ -e {m} ]; then echo up; exec sleep 100; fi; touch {m}; \
             trap 'read x < {g}; exit 0' TERM; echo up; sleep 100 & wait",
            m = dir.0.join("started").display(),
            g = gate.display()
        );
        let config = shell_cells(&dir.0, &socket, &[("gated", &script)]);
        let (mut hv, _stderr) = run_hypervisor(&config, &["--keep-running"]);
        hv.out.expect("[gated] up");
        let winner = cell_command_started(&socket, first, "gated");
        hv.out.expect("cell gated: stopping process");
        let loser = cell_command_started(&socket, second, "gated");
        let (code, out, err) = loser
            .recv_timeout(GUARD)
            .unwrap_or_else(|_| panic!("`cell {second}` got no answer while `cell {first}` ran"));
        assert_eq!(code, Some(1), "{first} then {second}: {out}{err}");
        assert!(
            err.contains(&format!(
                "`cell {second} gated` refused by the hypervisor: cell `gated` is busy: a \
                 `cell {first}` from another client is in progress"
            )),
            "{err}"
        );
        // Let the cell finish its stop.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&gate)
            .unwrap()
            .write_all(b"go\n")
            .unwrap();
        let (code, out, err) = winner.recv_timeout(GUARD).unwrap();
        assert_eq!(code, Some(0), "{first}: {out}{err}");
        hv.out.expect("cell gated: process");
        let line = status_line(&socket, "gated");
        if first == "stop" {
            assert!(line.contains("exited"), "{line}");
        } else {
            hv.out.expect("[gated] up");
            assert!(line.contains("waiting"), "{line}");
        }
        let (status, log) = hv.stop();
        assert!(status.success(), "{status:?}: {log:#?}");
        let starts = log
            .iter()
            .filter(|l| l.starts_with("cell gated: started"))
            .count();
        assert_eq!(starts, if first == "stop" { 1 } else { 2 }, "{log:#?}");
    }
}

/// `cell restart` and `cell stop` of one cell from two clients at once, many times: each
/// request either succeeds or is refused as busy (at least one succeeds), the cell never has
/// two lives at once, the status agrees with the last request carried out, and the cell can
/// be started again after a stop.
#[test]
fn racing_restart_and_stop_of_one_cell_end_in_one_consistent_state() {
    const ROUNDS: usize = 20;
    let dir = TempDir::new("race");
    let socket = dir.0.join("hv.sock");
    let config = shell_cells(&dir.0, &socket, &[("raced", "echo up; exec sleep 100")]);
    let (mut hv, _stderr) = run_hypervisor(&config, &["--keep-running"]);
    hv.out.expect("[raced] up");
    let (mut busy, mut both) = (0, 0);
    for round in 0..ROUNDS {
        // The order the two are started in alternates.
        let (a, b) = if round % 2 == 0 {
            ("restart", "stop")
        } else {
            ("stop", "restart")
        };
        let first = cell_command_started(&socket, a, "raced");
        let second = cell_command_started(&socket, b, "raced");
        let mut ok = Vec::new();
        for (verb, rx) in [(a, first), (b, second)] {
            let (code, out, err) = rx.recv_timeout(GUARD).expect("an answer");
            match code {
                Some(0) => ok.push((verb, out)),
                Some(1) if err.contains("cell `raced` is busy: a `cell ") => busy += 1,
                _ => panic!("round {round}: `cell {verb}`: {code:?}\n{out}{err}"),
            }
        }
        assert!(
            !ok.is_empty(),
            "round {round}: neither request was carried out"
        );
        both += usize::from(ok.len() == 2);
        // The status is the outcome of the request carried out last: running the life the
        // restart answered with, or stopped by the stop.
        let line = status_line(&socket, "raced");
        let running = line.contains("waiting");
        assert!(running || line.contains("exited"), "{line}");
        if running {
            // Running the life a restart started and answered with (and no other).
            let restarted = ok.iter().find(|(verb, _)| *verb == "restart");
            let pid = restarted
                .and_then(|(_, reply)| reply.split("pid ").nth(1))
                .map(|rest| rest.trim().split([',', ';', ' ']).next().unwrap_or(""))
                .unwrap_or_else(|| panic!("round {round}: running without a restart: {ok:?}"));
            assert!(
                line.split_whitespace().any(|w| w == pid),
                "round {round}: status {line}, the restart answered pid {pid}: {ok:?}"
            );
            if ok.len() == 1 {
                assert_eq!(ok[0].0, "restart", "round {round}");
            }
        } else {
            assert!(
                ok.iter().any(|(verb, _)| *verb == "stop"),
                "round {round}: stopped without a stop: {ok:?}; status {line}"
            );
        }
        if !running {
            let (code, out, err) = cell_command(&socket, &["start", "raced"]);
            assert_eq!(code, Some(0), "round {round}: start: {out}{err}");
        }
    }
    let (status, log) = hv.stop();
    assert!(status.success(), "{status:?}");
    // Never two lives at once: every start follows the end of the life before it.
    let mut lives = 0i32;
    for line in &log {
        if line.starts_with("cell raced: started") {
            lives += 1;
        } else if line.starts_with("cell raced: process") && line.contains(" ended: ") {
            lives -= 1;
        }
        assert!(
            (0..=1).contains(&lives),
            "{lives} lives at: {line}\n{log:#?}"
        );
    }
    println!("{ROUNDS} rounds: {busy} busy refusals, {both} rounds with both carried out");
}
