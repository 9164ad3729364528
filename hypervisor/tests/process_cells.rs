//! Multi-process tests of the `hypervisor` binary with cells that need no endpoint library:
//! the status of a missing hypervisor and the forwarding of spawned cells' output.
//! Tests with cells that attach through `linux-uio-client` live in the root package's
//! `tests/process_cells.rs`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

const GUARD: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Test side
// ---------------------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("process-cells-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Lines of a child's stdout, read by a thread, received with a timeout.
struct Lines {
    rx: Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn new(stdout: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// The next line containing `needle` (other lines are kept in `seen`).
    fn expect(&mut self, needle: &str) -> String {
        loop {
            match self.rx.recv_timeout(GUARD) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    // The libtest harness of a re-executed cell may print before a reply on
                    // the same line: the reply starts at the needle.
                    if let Some(at) = line.find(needle) {
                        return line[at..].to_string();
                    }
                }
                Err(e) => panic!("waiting for `{needle}`: {e}; seen so far: {:#?}", self.seen),
            }
        }
    }
}

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
