//! Multi-process tests of process cells: the hypervisor's command line and real cell processes
//! attached through `linux-uio-client` (this test binary re-executed: as the hypervisor with
//! `PROCESS_CELLS_HYPERVISOR` set, running `hypervisor::cli` as the `hypervisor` binary does;
//! as a cell with `PROCESS_CELLS_ROLE` set), real memfds and eventfds.
//!
//! Whole-system tests live here, in the root package, so that `hypervisor` and
//! `linux-uio-client` need no dev-dependency on each other. The `hypervisor` binary belongs to
//! another package (no `CARGO_BIN_EXE_hypervisor` here), so the test binary plays it. It has
//! its own small runner (`harness = false`) because the hypervisor reads SIGTERM/SIGINT from a
//! signalfd with the signals blocked in its thread: under libtest another thread (the
//! harness's) would take the signal and die of it.
//!
//! The test process drives each cell over its stdin/stdout with one-line commands and
//! replies; every wait is a blocking read with a timeout as a guard, never a sleep.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ivshmem_dev::hosted::RefusalReason;
use linux_uio_client::hosted::{HostedEndpoint, HostedError};

const ROLE_ENV: &str = "PROCESS_CELLS_ROLE";
/// Set when this test binary is re-executed as the hypervisor (its arguments are the
/// hypervisor's); removed before the hypervisor spawns its cells.
const HYPERVISOR_ENV: &str = "PROCESS_CELLS_HYPERVISOR";
const GUARD: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Cell side (runs in re-executed child processes)
// ---------------------------------------------------------------------------------------

/// The tests, run by [`main`] in this order.
const TESTS: &[(&str, fn())] = &[
    (
        "three_process_cells_on_one_link",
        three_process_cells_on_one_link,
    ),
    (
        "hypervisor_spawns_pinned_cells_and_never_restarts_them",
        hypervisor_spawns_pinned_cells_and_never_restarts_them,
    ),
    (
        "control_socket_is_private_replaces_only_stale_sockets_and_refuses_garbage",
        control_socket_is_private_replaces_only_stale_sockets_and_refuses_garbage,
    ),
    (
        "a_cell_flooding_its_output_does_not_hold_up_the_control_socket",
        a_cell_flooding_its_output_does_not_hold_up_the_control_socket,
    ),
    (
        "a_cell_under_its_own_uid_cannot_write_a_peers_section_by_any_route",
        a_cell_under_its_own_uid_cannot_write_a_peers_section_by_any_route,
    ),
    (
        "racing_restart_and_stop_leave_the_peer_state_of_the_final_life",
        racing_restart_and_stop_leave_the_peer_state_of_the_final_life,
    ),
];

/// A re-executed child plays its role; otherwise runs the tests whose names contain one of
/// the free arguments (all without any), libtest style: `--list` lists them.
fn main() -> std::process::ExitCode {
    if let Some(code) = child_role() {
        std::process::exit(code);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected = TESTS.iter().filter(|(name, _)| {
        filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
    });
    if args.iter().any(|a| a == "--list") {
        for (name, _) in selected {
            println!("{name}: test");
        }
        return std::process::ExitCode::SUCCESS;
    }
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    for (name, test) in selected {
        println!("test {name} ...");
        match std::panic::catch_unwind(test) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed.push(name);
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(name);
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        passed.len(),
        failed.len()
    );
    if failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        println!("failures: {failed:?}");
        std::process::ExitCode::FAILURE
    }
}

/// Runs the role of a re-executed child and returns its exit code, or `None` in the test
/// process itself.
fn child_role() -> Option<i32> {
    if std::env::var_os(HYPERVISOR_ENV).is_some() {
        // The hypervisor's own cells must not become hypervisors.
        std::env::remove_var(HYPERVISOR_ENV);
        return Some(i32::from(hypervisor::cli::main_from(std::env::args_os())));
    }
    let role = std::env::var(ROLE_ENV).ok()?;
    let code = match role.as_str() {
        "cell" => cell_main(),
        "ro" => read_only_violation_main(),
        "spawned" => spawned_main(),
        "intruder" => intruder_main(),
        "holder" => holder_main(),
        other => {
            eprintln!("unknown role {other}");
            2
        }
    };
    Some(code)
}

/// A spawned cell that attaches, sets its state to 1 on its link and stays until stopped.
fn holder_main() -> i32 {
    let endpoint = HostedEndpoint::attach_from_env().unwrap();
    let link = &endpoint.links()[0];
    link.enable_interrupts();
    link.set_state(1).unwrap();
    // Until stopped (or the hypervisor is gone).
    while link
        .wait_interrupt_timeout(Duration::from_secs(3600))
        .is_ok()
        && !link.hypervisor_gone()
    {}
    0
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "CELL {line}").unwrap();
    out.flush().unwrap();
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn attach_from_args() -> HostedEndpoint {
    let socket = std::env::var("TEST_SOCKET").unwrap();
    let cell = std::env::var("TEST_CELL").unwrap();
    HostedEndpoint::attach(socket, &cell).unwrap_or_else(|e| {
        say(&format!("attach-failed {e}"));
        std::process::exit(3)
    })
}

fn states(link: &linux_uio_client::hosted::HostedLink) -> String {
    (0..link.max_peers())
        .map(|p| link.peer_state(p).unwrap().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A cell that executes commands from stdin on its only link.
fn cell_main() -> i32 {
    let endpoint = attach_from_args();
    let link = &endpoint.links()[0];
    let dev = link.ivshmem().unwrap();
    say(&format!("ready {}", dev.id()));
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let arg = words.next().map(|w| w.parse::<u64>().unwrap());
        match cmd {
            "enable" => {
                dev.enable_interrupts();
                say("ok");
            }
            "disable" => {
                dev.disable_interrupts();
                say("ok");
            }
            "ring" => {
                dev.ring_peer(arg.unwrap() as u16);
                say("rang");
            }
            "state" => {
                dev.set_state(arg.unwrap() as u32);
                // The hypervisor acknowledged: the table already holds the value.
                say(&format!("state-set {} table={}", dev.state(), states(link)));
            }
            "poll" => {
                let n = link.take_interrupt().unwrap().unwrap_or(0);
                say(&format!("pending {n}"));
            }
            "wait" => {
                say("waiting");
                match link
                    .wait_interrupt_timeout(Duration::from_millis(arg.unwrap()))
                    .unwrap()
                {
                    Some(n) => say(&format!(
                        "irq {n} at={} states={}",
                        monotonic_ns(),
                        states(link)
                    )),
                    None => say("timeout"),
                }
            }
            "write" => {
                let own = dev.own_output();
                // SAFETY: in-bounds write to our own, writable output section.
                unsafe { own.as_ptr().add(64).write_volatile(arg.unwrap() as u8) };
                say("written");
            }
            "read" => {
                let section = dev.peer_output(arg.unwrap() as u16).unwrap();
                // SAFETY: in-bounds read of a mapped section.
                let byte = unsafe { section.as_ptr().add(64).read_volatile() };
                say(&format!("byte {byte}"));
            }
            "exit" => return 0,
            other => panic!("unknown command {other}"),
        }
    }
    0
}

/// Tries to write what a cell may only read: mmap of read-only fds with PROT_WRITE and
/// MAP_SHARED must fail with EACCES, and a store through a read-only mapping must kill the
/// process with SIGSEGV.
fn read_only_violation_main() -> i32 {
    let endpoint = attach_from_args();
    let link = &endpoint.links()[0];
    link.set_state(5).unwrap();
    let try_map = |fd: std::os::fd::BorrowedFd<'_>, len: usize| -> i32 {
        // SAFETY: mmap with a valid fd; on success the mapping is unmapped at once.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            if p == libc::MAP_FAILED {
                std::io::Error::last_os_error().raw_os_error().unwrap()
            } else {
                libc::munmap(p, len);
                0
            }
        }
    };
    let table = try_map(link.state_table_fd(), 4096);
    let other = try_map(link.output_fd(0).unwrap(), 4096);
    let own = try_map(link.output_fd(link.peer_id()).unwrap(), 4096);
    say(&format!(
        "mmap state_table={table} peer0_output={other} own_output={own}"
    ));
    // Now store through the read-only mapping of peer 0's output section.
    let section = link.output(0).unwrap();
    assert!(!section.is_writable());
    say("storing");
    // SAFETY: deliberately not safe: this store must fault (the page is mapped read-only).
    unsafe { section.as_ptr().write_volatile(0xEE) };
    say("store-survived");
    0
}

/// A cell spawned by the hypervisor: reports its CPU affinity as its state, in lock step with
/// an observer peer, then exits with code 7.
fn spawned_main() -> i32 {
    let endpoint = HostedEndpoint::attach_from_env().unwrap();
    let link = &endpoint.links()[0];
    link.enable_interrupts();
    let observer = 1 - link.peer_id();
    let wait_for = |want: u32| {
        while link.peer_state(observer) != Some(want) {
            link.wait_interrupt_timeout(GUARD)
                .unwrap()
                .expect("observer too slow");
        }
    };
    wait_for(1);
    let want_cpu: usize = std::env::var("TEST_WORKER_CPU").unwrap().parse().unwrap();
    // SAFETY: sched_getaffinity fills a cpu_set_t of the given size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size.
    unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    // SAFETY: CPU_ISSET/CPU_COUNT read the set.
    let pinned = unsafe { libc::CPU_COUNT(&set) == 1 && libc::CPU_ISSET(want_cpu, &set) };
    let env_ok = std::env::var("IVSHMEM_CELL").as_deref() == Ok("worker");
    link.set_state(100 + u32::from(pinned) + 10 * u32::from(env_ok))
        .unwrap();
    wait_for(2);
    7
}

/// A spawned cell under a uid of its own (issue 14 item 4): once peer 0 has set state 1, it
/// tries every route it has to write peer 0's output section and says how each ended
/// (`ok` would be a hole), then sets state 2 and exits.
fn intruder_main() -> i32 {
    use nix::fcntl::{open, OFlag};
    use nix::sys::mman::{mprotect, ProtFlags};
    use nix::sys::stat::{fchmod, Mode};

    let endpoint = HostedEndpoint::attach_from_env().unwrap();
    let link = &endpoint.links()[0];
    link.enable_interrupts();
    while link.peer_state(0) != Some(1) {
        link.wait_interrupt_timeout(GUARD)
            .unwrap()
            .expect("owner too slow");
    }
    let fd = link.output_fd(0).unwrap();
    let outcome = |r: Result<(), nix::errno::Errno>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{e:?}"),
    };
    let len = 4096;
    let reopen = open(
        format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(),
        OFlag::O_RDWR,
        Mode::empty(),
    )
    .map(drop);
    // Every fd of the hypervisor, reopened read-write: of every ancestor up to it (the cell
    // may run under a relay, in a PID namespace of its own, where `getppid` reads 0; `/proc`
    // names the host's pids, so the ancestors are walked through it).
    let parent_of = |pid: &str| -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) state ppid ...": the comm may hold spaces, so after the last ')'.
        let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?;
        (ppid != "0" && ppid != "1").then(|| ppid.to_string())
    };
    let mut ancestors = Vec::new();
    let mut at = "self".to_string();
    while let Some(parent) = parent_of(&at) {
        ancestors.push(parent.clone());
        at = parent;
    }
    let hv_fds = ancestors
        .iter()
        .map(|pid| match std::fs::read_dir(format!("/proc/{pid}/fd")) {
            Err(e) => Err(nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0))),
            Ok(entries) => entries
                .flatten()
                .map(|e| open(&e.path(), OFlag::O_RDWR, Mode::empty()).map(drop))
                .find(Result::is_ok)
                .unwrap_or(Err(nix::errno::Errno::EACCES)),
        })
        .find(Result::is_ok)
        .unwrap_or(if ancestors.is_empty() {
            Err(nix::errno::Errno::ESRCH)
        } else {
            Err(nix::errno::Errno::EACCES)
        });
    let size = std::num::NonZeroUsize::new(len).unwrap();
    let shared = nix::sys::mman::MapFlags::MAP_SHARED;
    // SAFETY: maps the section's fd shared and writable; expected to fail. Nothing is
    // accessed through the mapping if it does not (it is unmapped at once).
    let mmap = unsafe {
        nix::sys::mman::mmap(
            None,
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            shared,
            fd,
            0,
        )
    }
    .map(|p| {
        // SAFETY: unmaps the mapping just made, which nothing references.
        let _ = unsafe { nix::sys::mman::munmap(p, len) };
    });
    // SAFETY: a read-only shared mapping of the section; only mprotect touches it.
    let ro =
        unsafe { nix::sys::mman::mmap(None, size, ProtFlags::PROT_READ, shared, fd, 0) }.unwrap();
    // SAFETY: changes the protection of our own mapping (the call must be refused).
    let mprotect = unsafe { mprotect(ro, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE) };
    let pwrite = nix::sys::uio::pwrite(fd, &[0xEE], 0).map(drop);
    let fchmod = fchmod(fd, Mode::from_bits_truncate(0o666));
    say(&format!(
        "routes uid={} reopen={} hv_fds={} mmap={} mprotect={} pwrite={} fchmod={}",
        nix::unistd::getuid(),
        outcome(reopen),
        outcome(hv_fds),
        outcome(mmap),
        outcome(mprotect),
        outcome(pwrite),
        outcome(fchmod),
    ));
    link.set_state(2).unwrap();
    // Stay attached until the owner has seen state 2 (it answers 3): a cell whose process
    // ends is detached at once and its state reads 0, which would hide the 2.
    while link.peer_state(0) != Some(3) {
        link.wait_interrupt_timeout(GUARD)
            .unwrap()
            .expect("owner did not acknowledge");
    }
    0
}

// ---------------------------------------------------------------------------------------
// Test side
// ---------------------------------------------------------------------------------------

#[path = "../hypervisor/tests/process_common/mod.rs"]
mod process_common;
use process_common::{Lines, TempDir};

/// The hypervisor's command line with `args`: this test binary, re-executed to run
/// `hypervisor::cli`.
fn hypervisor_command(args: &[&std::ffi::OsStr]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(args).env(HYPERVISOR_ENV, "1");
    cmd
}

struct Hypervisor {
    child: Child,
    out: Lines,
}

impl Hypervisor {
    fn start(config: &Path, extra_env: &[(&str, &str)], no_spawn: bool) -> Self {
        let mut args = vec!["run".as_ref(), config.as_os_str()];
        if no_spawn {
            args.push("--no-spawn".as_ref());
        }
        let mut cmd = hypervisor_command(&args);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = Lines::new(child.stdout.take().unwrap());
        out.expect("listening on");
        Hypervisor { child, out }
    }

    /// SIGTERM, then the exit status; checks that it says what it stopped.
    fn stop(mut self) -> (ExitStatus, Vec<String>) {
        // SAFETY: signalling our own unreaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
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

struct Cell {
    child: Child,
    stdin: ChildStdin,
    out: Lines,
}

impl Drop for Cell {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Cell {
    fn spawn(role: &str, socket: &Path, name: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(ROLE_ENV, role)
            .env("TEST_SOCKET", socket)
            .env("TEST_CELL", name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = Lines::new(child.stdout.take().unwrap());
        Cell { child, stdin, out }
    }

    fn cmd(&mut self, command: &str, reply: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        self.out.expect(&format!("CELL {reply}"))
    }

    fn pending(&mut self) -> u64 {
        let line = self.cmd("poll", "pending");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

fn wait_status(child: &mut Child) -> ExitStatus {
    child.wait().unwrap()
}

fn three_cell_config(dir: &Path, socket: &Path) -> PathBuf {
    let config = dir.join("three.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[system]
name = "process-cells-test"
control_socket = "{}"
allow_shared_cpus = true

[[cells]]
name = "a"
cpus = [0]
command = "/bin/true"

[[cells]]
name = "b"
cpus = [0]
command = "/bin/true"

[[cells]]
name = "c"
cpus = [0]
command = "/bin/true"

[[links]]
name = "bus"
peers = ["a", "b", "c"]
protocol = "telemetry"
rw_size = "4K"
output_size = "4K"
"#,
            socket.display()
        ),
    )
    .unwrap();
    config
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn three_process_cells_on_one_link() {
    let dir = TempDir::new("three");
    let socket = dir.0.join("hv.sock");
    let config = three_cell_config(&dir.0, &socket);
    let hv = Hypervisor::start(&config, &[], true);

    let mut cells: Vec<Cell> = ["a", "b", "c"]
        .iter()
        .map(|n| Cell::spawn("cell", &socket, n))
        .collect();
    for (id, cell) in cells.iter_mut().enumerate() {
        let line = cell.out.expect("CELL ready");
        assert_eq!(line, format!("CELL ready {id}"));
        cell.cmd("enable", "ok");
    }

    // Refusals: an unknown name, and a name that is already attached.
    match HostedEndpoint::attach(&socket, "zzz") {
        Err(HostedError::Refused {
            reason: RefusalReason::UnknownCell,
            detail,
        }) => {
            assert!(detail.contains("no cell named `zzz`"), "{detail}");
            assert!(detail.contains("a, b, c"), "{detail}");
        }
        other => panic!("attach as unknown cell: {other:?}"),
    }
    match HostedEndpoint::attach(&socket, "a") {
        Err(HostedError::Refused {
            reason: RefusalReason::AlreadyAttached,
            detail,
        }) => {
            assert!(detail.contains("`a` is already attached"), "{detail}");
        }
        other => panic!("second attach as a: {other:?}"),
    }

    // Every cell publishes a state; each change reaches the two others.
    for (id, value) in [(0usize, 1u32), (1, 2), (2, 3)] {
        let line = cells[id].cmd(&format!("state {value}"), "state-set");
        assert!(
            line.starts_with(&format!("CELL state-set {value} ")),
            "{line}"
        );
    }
    for cell in cells.iter_mut() {
        cell.pending(); // clear the notifications of the set-up
        let line = cell.cmd("poll", "pending");
        assert_eq!(line, "CELL pending 0");
    }

    // A doorbell reaches only its target.
    cells[0].cmd("ring 1", "rang");
    assert!(cells[1].pending() >= 1, "b did not get a's doorbell");
    assert_eq!(cells[2].pending(), 0, "c got b's doorbell");
    assert_eq!(cells[0].pending(), 0, "a got its own doorbell to b");
    // A doorbell to a peer that does not exist has no effect.
    cells[0].cmd("ring 9", "rang");
    for cell in cells.iter_mut() {
        assert_eq!(cell.pending(), 0);
    }
    // A doorbell that arrives while interrupts are disabled is discarded.
    cells[2].cmd("disable", "ok");
    cells[0].cmd("ring 2", "rang");
    cells[2].cmd("enable", "ok");
    assert_eq!(
        cells[2].pending(),
        0,
        "doorbell while disabled was not discarded"
    );

    // Data in a's output section is visible to b.
    cells[0].cmd("write 77", "written");
    assert_eq!(cells[1].cmd("read 0", "byte"), "CELL byte 77");

    // A state change reaches all others, and the state table shows it.
    let line = cells[1].cmd("state 42", "state-set");
    assert_eq!(line, "CELL state-set 42 table=1,42,3");
    for id in [0, 2] {
        let line = cells[id].cmd("wait 5000", "irq");
        assert_eq!(field(&line, "states="), "1,42,3", "{line}");
    }
    assert_eq!(
        cells[1].pending(),
        0,
        "the writer was notified of its own change"
    );

    // kill -9 of c: a and b see its state 0 with a notification within 100 ms.
    for id in [0, 1] {
        writeln!(cells[id].stdin, "wait 5000").unwrap();
        cells[id].stdin.flush().unwrap();
        cells[id].out.expect("CELL waiting");
    }
    let killed_at = monotonic_ns();
    // SAFETY: signalling our own unreaped child.
    unsafe { libc::kill(cells[2].child.id() as i32, libc::SIGKILL) };
    let mut latencies = Vec::new();
    for id in [0, 1] {
        let line = cells[id].out.expect("CELL irq");
        assert_eq!(field(&line, "states="), "1,42,0", "{line}");
        let at: u64 = field(&line, "at=").parse().unwrap();
        latencies.push(Duration::from_nanos(at.saturating_sub(killed_at)));
    }
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        wait_status(&mut cells[2].child).signal(),
        Some(libc::SIGKILL)
    );
    eprintln!(
        "kill -9 to notification: a {:?}, b {:?}",
        latencies[0], latencies[1]
    );
    for l in &latencies {
        assert!(*l < Duration::from_millis(100), "notification took {l:?}");
    }

    // Read-only parts cannot be written: attach a fresh process as c.
    let mut ro = Cell::spawn("ro", &socket, "c");
    let line = ro.out.expect("CELL mmap");
    assert_eq!(
        line,
        format!(
            "CELL mmap state_table={} peer0_output={} own_output=0",
            libc::EACCES,
            libc::EACCES
        )
    );
    ro.out.expect("CELL storing");
    let status = wait_status(&mut ro.child);
    assert_eq!(
        status.signal(),
        Some(libc::SIGSEGV),
        "store through a RO mapping: {status:?}"
    );
    assert!(!ro.out.seen.iter().any(|l| l.contains("store-survived")));
    // It had set state 5; its death brings it back to 0, and a is told.
    let line = cells[0].cmd("wait 5000", "irq");
    let st = field(&line, "states=");
    assert!(st == "1,42,0" || st == "1,42,5", "{line}");
    if st == "1,42,5" {
        let line = cells[0].cmd("wait 5000", "irq");
        assert_eq!(field(&line, "states="), "1,42,0", "{line}");
    }

    // `hypervisor status` prints the table.
    let out = hypervisor_command(&["status".as_ref(), "--socket".as_ref(), socket.as_os_str()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |cell: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{cell} ")))
            .unwrap_or("")
            .to_string()
    };
    assert!(row("a").contains("attached"), "{table}");
    assert!(row("b").contains("attached"), "{table}");
    assert!(row("c").contains("detached"), "{table}");
    let link_rows: Vec<&str> = table.lines().filter(|l| l.starts_with("bus ")).collect();
    assert_eq!(link_rows.len(), 3, "{table}");
    assert!(
        link_rows[0]
            .split_whitespace()
            .collect::<Vec<_>>()
            .ends_with(&["0", "a", "yes", "1"]),
        "{table}"
    );
    assert!(
        link_rows[1]
            .split_whitespace()
            .collect::<Vec<_>>()
            .ends_with(&["1", "b", "yes", "42"]),
        "{table}"
    );
    assert!(
        link_rows[2]
            .split_whitespace()
            .collect::<Vec<_>>()
            .ends_with(&["2", "c", "no", "0"]),
        "{table}"
    );

    for id in [0, 1] {
        writeln!(cells[id].stdin, "exit").unwrap();
        assert!(wait_status(&mut cells[id].child).success());
    }
    let (status, log) = hv.stop();
    assert!(status.success(), "hypervisor: {status:?}");
    assert!(!socket.exists(), "the control socket was not removed");
    // The log said what happened to c.
    let all = log.join("\n");
    assert!(all.contains("cell c: detached"), "{all}");
    assert!(all.contains("attach as `zzz` refused"), "{all}");
}

fn hypervisor_spawns_pinned_cells_and_never_restarts_them() {
    let dir = TempDir::new("spawn");
    let socket = dir.0.join("hv.sock");
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let worker_cpu = cpus - 1;
    let exe = std::env::current_exe().unwrap();
    let config = dir.0.join("spawn.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[system]
name = "spawn-test"
control_socket = "{socket}"
allow_shared_cpus = true

[[cells]]
name = "worker"
cpus = [{worker_cpu}]
command = "{exe}"

[[cells]]
name = "observer"
cpus = [0]
command = "/bin/false"

[[cells]]
name = "sleeper"
cpus = [0]
command = "/bin/sleep"
args = ["600"]

[[links]]
name = "pair"
peers = ["worker", "observer"]
protocol = 0x4001
output_size = "4K"
"#,
            socket = socket.display(),
            exe = exe.display()
        ),
    )
    .unwrap();
    let worker_cpu_s = worker_cpu.to_string();
    // `observer`'s command would fail: it is attached by hand instead, so spawn only the worker
    // by giving the observer no chance to run: it is started, exits 1, and is reported.
    let mut hv = Hypervisor::start(
        &config,
        &[(ROLE_ENV, "spawned"), ("TEST_WORKER_CPU", &worker_cpu_s)],
        false,
    );
    let line = hv.out.expect("cell observer: process");
    assert!(line.contains("exit code 1; not restarted"), "{line}");

    let observer = HostedEndpoint::attach(&socket, "observer").unwrap();
    let link = &observer.links()[0];
    assert_eq!(link.peer_id(), 1);
    link.enable_interrupts();
    link.set_state(1).unwrap();
    while !matches!(link.peer_state(0), Some(100..=111)) {
        link.wait_interrupt_timeout(GUARD)
            .unwrap()
            .expect("worker did not report");
    }
    assert_eq!(
        link.peer_state(0),
        Some(111),
        "100 + 1 (pinned to cpu {worker_cpu}) + 10 (IVSHMEM_CELL set)"
    );
    link.set_state(2).unwrap();
    while link.peer_state(0) != Some(0) {
        link.wait_interrupt_timeout(GUARD)
            .unwrap()
            .expect("worker did not detach");
    }
    let line = hv.out.expect("cell worker: process");
    assert!(line.contains("exit code 7; not restarted"), "{line}");
    let status = hypervisor::status::query(&socket).unwrap();
    let worker = status.cells.iter().find(|c| c.name == "worker").unwrap();
    assert!(worker.spawned);
    assert_eq!(worker.exit, Some(hypervisor::status::CellExit::Code(7)));
    assert_eq!(worker.phase, ivshmem_dev::hosted::CellPhase::Exited);
    drop(observer);
    let (status, log) = hv.stop();
    // `observer`'s program (exit 1) and the worker (exit 7) failed on their own; `sleeper`,
    // stopped by the hypervisor, did not.
    assert_eq!(status.code(), Some(4), "{status:?}");
    let all = log.join("\n");
    assert!(all.contains("stopped 3 spawned cell(s)"), "{all}");
    // A cell still running at stop ends by the hypervisor's SIGTERM (not blocked in the cell).
    assert!(
        all.contains("stopped: killed by signal 15 (SIGTERM)"),
        "{all}"
    );
    assert!(!all.contains("killing it"), "{all}");
    assert!(!socket.exists());
}

/// Forwards complete lines written to it over a channel.
struct LineSender {
    tx: mpsc::Sender<String>,
    buf: Vec<u8>,
}

impl Write for LineSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let _ = self
                .tx
                .send(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn control_socket_is_private_replaces_only_stale_sockets_and_refuses_garbage() {
    use hypervisor::cells::{self, RunOptions, StopHandle};
    use hypervisor::control::{ControlError, ControlServer, SystemSpec};
    use ivshmem_dev::hosted::{decode_reply, Reply, MAX_MESSAGE_SIZE};
    use std::os::unix::fs::PermissionsExt;

    let dir = TempDir::new("socket");
    let socket = dir.0.join("hv.sock");
    let config = three_cell_config(&dir.0, &socket);
    let valid = hypervisor::config::load_and_validate(&config, None).unwrap();
    let system = SystemSpec::from_config(&valid);

    // A stale socket file: bound once, nobody listens any more.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());

    let stop = StopHandle::new().unwrap();
    let (tx, rx) = mpsc::channel();
    let options = RunOptions {
        spawn: false,
        ..RunOptions::new(socket.clone())
    };
    let runner = {
        let (system, stop) = (system.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut out = LineSender {
                tx,
                buf: Vec::new(),
            };
            cells::run(&system, &options, Some(&stop), &mut out)
        })
    };
    let mut log = Lines {
        rx,
        seen: Vec::new(),
    };
    log.expect("listening on");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");

    // A second hypervisor on the same socket is refused; so is replacing a regular file.
    let err =
        ControlServer::bind(&system, &socket, &mut hypervisor::control::device_model).unwrap_err();
    assert!(matches!(err, ControlError::AlreadyRunning(_)), "{err}");
    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, b"data").unwrap();
    let err =
        ControlServer::bind(&system, &file, &mut hypervisor::control::device_model).unwrap_err();
    assert!(matches!(err, ControlError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");

    // Garbage on the socket is refused with a reason, and the connection is closed.
    use nix::sys::socket::{
        connect, recv, send, socket as new_socket, AddressFamily, MsgFlags, SockFlag, SockType,
        UnixAddr,
    };
    let fd = new_socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(&socket).unwrap()).unwrap();
    let tv = nix::sys::time::TimeVal::new(10, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv).unwrap();
    send(fd.as_raw_fd(), b"GET / HTTP/1.0\r\n\r\n", MsgFlags::empty()).unwrap();
    let mut buf = [0u8; MAX_MESSAGE_SIZE];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    match decode_reply(&buf[..n]).unwrap() {
        Reply::Refused(r) => {
            assert_eq!(r.reason(), Some(RefusalReason::BadRequest));
            assert!(r.detail().contains("bad magic"), "{}", r.detail());
        }
        other => panic!("garbage answered with {other:?}"),
    }
    assert_eq!(
        recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap(),
        0,
        "connection not closed"
    );

    // The hypervisor still serves: a cell attaches, and the status shows it.
    let a = HostedEndpoint::attach(&socket, "a").unwrap();
    assert_eq!(a.links()[0].peer_id(), 0);
    let status = hypervisor::status::query(&socket).unwrap();
    assert_eq!(status.cells[0].pid, Some(std::process::id()));
    drop(a);

    stop.stop();
    let report = runner.join().unwrap().unwrap();
    assert_eq!(report.reason, "stop requested");
    assert!(report.cells.is_empty());
    assert!(!socket.exists(), "socket not removed on stop");
}

fn a_cell_flooding_its_output_does_not_hold_up_the_control_socket() {
    let dir = TempDir::new("flood");
    let socket = dir.0.join("hv.sock");
    let config = dir.0.join("flood.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[system]
name = "flood-test"
control_socket = "{socket}"
allow_shared_cpus = true

[[cells]]
name = "flood"
cpus = [0]
command = "/usr/bin/yes"
args = ["flooding"]

# Exits at once; the test attaches as `a` by hand.
[[cells]]
name = "a"
cpus = [0]
command = "/bin/true"

[[links]]
name = "pair"
peers = ["a", "flood"]
protocol = 0x4001
output_size = "4K"
"#,
            socket = socket.display(),
        ),
    )
    .unwrap();
    let mut child = hypervisor_command(&["run".as_ref(), config.as_os_str()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Read everything the hypervisor prints (it must not block on a full pipe), passing on
    // only the lines that are not the flood.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let flood_lines = std::thread::spawn(move || {
        let mut flood = 0u64;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line == "[flood] flooding" {
                flood += 1;
            } else if tx.send(line).is_err() {
                break;
            }
        }
        flood
    });
    let mut hv = Hypervisor {
        child,
        out: Lines {
            rx,
            seen: Vec::new(),
        },
    };
    hv.out.expect("listening on");
    hv.out.expect("cell a: process");
    let a = HostedEndpoint::attach(&socket, "a").unwrap();
    let link = &a.links()[0];
    // Every state change is handled (and visible in a status query, served by the same loop)
    // while the flood goes on.
    for state in 1..=20 {
        link.set_state(state).unwrap();
        let status = hypervisor::status::query(&socket).unwrap();
        assert_eq!(status.links[0].peers[0].state, state);
        hv.out.expect(&format!("cell a: link pair: state {state}"));
    }
    drop(a);
    let (status, _) = hv.stop();
    assert!(status.success());
    let flood = flood_lines.join().unwrap();
    assert!(flood > 0, "the flood was forwarded");
}

/// Issue 14 item 4: a spawned cell under a uid of its own (the hypervisor runs as root) cannot
/// write a peer's output section by any route it has: reopening its fd (or the hypervisor's)
/// through /proc, a shared writable mapping, mprotect of a read-only one, pwrite, fchmod.
fn a_cell_under_its_own_uid_cannot_write_a_peers_section_by_any_route() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: the hypervisor must run as root to run a cell under another uid");
        return;
    }
    const UID: u32 = 64_123;
    let dir = TempDir::new("uid");
    let socket = dir.0.join("hv.sock");
    let exe = std::env::current_exe().unwrap();
    let config = dir.0.join("uid.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[system]
name = "uid-test"
control_socket = "{socket}"
allow_shared_cpus = true

[[cells]]
name = "owner"
cpus = [0]
command = "/bin/true"

[[cells]]
name = "intruder"
cpus = [0]
command = "{exe}"
uid = {UID}

[[links]]
name = "pair"
peers = ["owner", "intruder"]
protocol = 0x4001
output_size = "4K"
"#,
            socket = socket.display(),
            exe = exe.display()
        ),
    )
    .unwrap();
    let mut hv = Hypervisor::start(&config, &[(ROLE_ENV, "intruder")], false);
    hv.out.expect("cell owner: process");
    let owner = HostedEndpoint::attach(&socket, "owner").unwrap();
    let link = &owner.links()[0];
    link.enable_interrupts();
    let own = link.output(0).unwrap();
    for i in 0..4096 {
        // SAFETY: in-bounds byte writes into our own, writable output section.
        unsafe { own.as_ptr().add(i).write_volatile(0x5A) };
    }
    link.set_state(1).unwrap();
    let line = hv.out.expect("CELL routes");
    eprintln!("intruder: {line}");
    assert!(line.contains(&format!("uid={UID}")), "{line}");
    for route in ["reopen", "hv_fds", "mmap", "mprotect", "pwrite", "fchmod"] {
        let outcome = field(&line, &format!("{route}="));
        assert_ne!(outcome, "ok", "route {route} was open: {line}");
    }
    // The hypervisor's fds were found and refused, not missed.
    assert_eq!(field(&line, "hv_fds="), "EACCES", "{line}");
    while link.peer_state(1) != Some(2) {
        link.wait_interrupt_timeout(GUARD)
            .unwrap()
            .expect("intruder did not finish");
    }
    link.set_state(3).unwrap();
    for i in 0..4096 {
        // SAFETY: in-bounds read of our own mapped section.
        let byte = unsafe { own.as_ptr().add(i).read_volatile() };
        assert_eq!(byte, 0x5A, "byte {i} of the owner's section changed");
    }
    drop(owner);
    let (status, _) = hv.stop();
    assert!(status.success(), "{status:?}");
}

/// Waits (on interrupts) until `link` reads `want` as peer 0's state.
fn wait_for_peer_state(link: &linux_uio_client::hosted::HostedLink, want: u32, what: &str) {
    while link.peer_state(0) != Some(want) {
        let woke = link.wait_interrupt_timeout(GUARD).unwrap();
        assert!(
            woke.is_some() || link.peer_state(0) == Some(want),
            "{what}: peer 0 still reads {:?}, not {want}",
            link.peer_state(0)
        );
    }
}

/// Issue item: `cell restart` and `cell stop` of one cell from two control-socket clients at
/// once, many times, with a peer watching the link: each request is carried out or refused
/// as busy (never both refused), and afterwards the peer reads the state of the cell's final
/// life (1 when a restart left it running and attached, 0 when a stop left it stopped), the
/// status agrees (the link's peer active exactly when running), and a stopped cell starts
/// again.
fn racing_restart_and_stop_leave_the_peer_state_of_the_final_life() {
    use hypervisor::control::CellAction;
    use hypervisor::status::{control_cell, query, StatusError};
    use ivshmem_dev::hosted::CellPhase;
    const ROUNDS: usize = 12;
    let dir = TempDir::new("race-link");
    let socket = dir.0.join("hv.sock");
    let config = dir.0.join("race.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[system]
name = "race-test"
control_socket = "{socket}"
allow_shared_cpus = true

[[cells]]
name = "raced"
cpus = [0]
command = "{exe}"

# Its command ends at once; the test attaches as it by hand.
[[cells]]
name = "watcher"
cpus = [0]
command = "/bin/true"

[[links]]
name = "pair"
peers = ["raced", "watcher"]
protocol = 0x4001
output_size = "4K"
"#,
            socket = socket.display(),
            exe = std::env::current_exe().unwrap().display()
        ),
    )
    .unwrap();
    let mut hv = Hypervisor::start(&config, &[(ROLE_ENV, "holder")], false);
    hv.out.expect("cell watcher: process");
    let watcher = HostedEndpoint::attach(&socket, "watcher").unwrap();
    let link = &watcher.links()[0];
    link.enable_interrupts();
    wait_for_peer_state(link, 1, "the first life");
    let mut busy = 0;
    for round in 0..ROUNDS {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let racers: Vec<_> = [CellAction::Restart, CellAction::Stop]
            .into_iter()
            .map(|action| {
                let (barrier, socket) = (barrier.clone(), socket.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (action, control_cell(&socket, "raced", action))
                })
            })
            .collect();
        let mut done = Vec::new();
        for racer in racers {
            match racer.join().unwrap() {
                (action, Ok(_)) => done.push(action),
                (_, Err(StatusError::Refused { detail, .. })) if detail.contains("is busy") => {
                    busy += 1
                }
                (action, Err(e)) => panic!("round {round}: {action:?}: {e}"),
            }
        }
        assert!(!done.is_empty(), "round {round}: both refused");
        let status = query(&socket).unwrap();
        let cell = status.cells.iter().find(|c| c.name == "raced").unwrap();
        let running = cell.phase != CellPhase::Exited;
        if running {
            assert!(
                done.contains(&CellAction::Restart),
                "round {round}: {done:?}"
            );
            wait_for_peer_state(link, 1, &format!("round {round}: the restarted life"));
        } else {
            assert!(done.contains(&CellAction::Stop), "round {round}: {done:?}");
            wait_for_peer_state(link, 0, &format!("round {round}: the stopped cell"));
        }
        let status = query(&socket).unwrap();
        let active = status.links[0].peers[0].active;
        assert_eq!(active, running, "round {round}: link peer active");
        if !running {
            control_cell(&socket, "raced", CellAction::Start).unwrap();
            wait_for_peer_state(link, 1, &format!("round {round}: started again"));
        }
    }
    println!("{ROUNDS} rounds, {busy} busy refusals");
    drop(watcher);
    let (status, _) = hv.stop();
    assert!(status.success(), "{status:?}");
}
