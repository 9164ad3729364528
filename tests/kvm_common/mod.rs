//! The runner shared by the whole-system KVM tests that play every process themselves
//! (`harness = false`): the test binary is re-executed as the hypervisor (an environment
//! variable set: it runs `hypervisor::cli`) and, through the hypervisor, as its process cells
//! (a role variable the cells inherit). [`main`] dispatches those roles, the `--list` and
//! filter arguments of `cargo test`, and the skip when KVM (or root) is missing; [`Hypervisor`]
//! stops the spawned hypervisor; [`Output`] reads its stdout line by line with a guard.
#![allow(dead_code)]

#[path = "../../hypervisor/tests/process_common/mod.rs"]
#[allow(dead_code)]
mod process_common;

use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

pub use process_common::Lines;

/// What the test binary is when run.
pub struct Runner<'a> {
    /// The test's name (as `cargo test` lists it).
    pub name: &'a str,
    /// Set for the re-executed hypervisor (removed before its cells are spawned).
    pub hypervisor_env: &'a str,
    /// Whether the test needs root besides `/dev/kvm`.
    pub needs_root: bool,
}

/// Runs the binary's role: the hypervisor, a cell (`cell` returns `Some` when the role
/// variables name one), or the test itself (skipped with a message without KVM or root).
pub fn main(runner: &Runner<'_>, cell: impl FnOnce() -> Option<ExitCode>, test: fn()) -> ExitCode {
    if std::env::var_os(runner.hypervisor_env).is_some() {
        // The hypervisor's cells must not become hypervisors.
        std::env::remove_var(runner.hypervisor_env);
        return ExitCode::from(hypervisor::cli::main_from(std::env::args_os()));
    }
    if let Some(code) = cell() {
        return code;
    }
    let name = runner.name;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{name}: test");
        return ExitCode::SUCCESS;
    }
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !name.contains(a.as_str()))
    {
        return ExitCode::SUCCESS;
    }
    if runner.needs_root && !nix::unistd::geteuid().is_root() {
        println!("test {name} ... skipped: needs root (network namespaces, TAP devices); CI runs it as root");
        return ExitCode::SUCCESS;
    }
    if let Err(why) = hypervisor::kvm::kvm_available() {
        println!("test {name} ... skipped: KVM is not usable here: {why}");
        return ExitCode::SUCCESS;
    }
    println!("test {name} ...");
    match std::panic::catch_unwind(test) {
        Ok(()) => {
            println!("test {name} ... ok");
            ExitCode::SUCCESS
        }
        Err(_) => {
            println!("test {name} ... FAILED");
            ExitCode::FAILURE
        }
    }
}

/// The role `role` of a cell (when the variable `role_env` names it): runs `cell_main`,
/// printing its error as `{what}: {error:#}`.
pub fn cell_role<E: std::fmt::Display>(
    role_env: &str,
    role: &str,
    what: &str,
    cell_main: fn() -> Result<(), E>,
) -> Option<ExitCode> {
    (std::env::var(role_env).as_deref() == Ok(role)).then(|| match cell_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e:#}");
            ExitCode::FAILURE
        }
    })
}

/// Spawns `hypervisor` (this binary with `run CONFIG`) as the hypervisor, its process cells
/// in the role `role` (the variable `role_env`); returns its output (waits guarded by
/// `guard`) and the guard that stops it.
pub fn spawn_hypervisor(
    mut hypervisor: Command,
    runner: &Runner<'_>,
    (role_env, role): (&str, &str),
    guard: Duration,
) -> (Output, Hypervisor) {
    let mut child = hypervisor
        .env(runner.hypervisor_env, "1")
        .env(role_env, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning the hypervisor");
    let out = Output::read(child.stdout.take().expect("piped stdout"), guard);
    (out, Hypervisor(child))
}

/// The hypervisor's stdout, line by line, with a guard on every wait.
pub struct Output {
    /// The lines (read by a thread of their own, which outlives the hypervisor, so the last
    /// lines still have a reader), and those seen so far.
    pub lines: Lines,
    /// How long one wait may take.
    pub guard: Duration,
}

impl Output {
    /// Starts reading `stdout`.
    pub fn read(stdout: ChildStdout, guard: Duration) -> Output {
        Output {
            lines: Lines::new(stdout),
            guard,
        }
    }

    /// Waits for the line `want` (exactly), unless it was seen already.
    pub fn expect(&mut self, want: &str) {
        self.expect_nth(want, 1);
    }

    /// Waits until the line `want` has been seen `n` times in all.
    pub fn expect_nth(&mut self, want: &str, n: usize) {
        let deadline = Instant::now() + self.guard;
        while self.count(want) < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.rx.recv_timeout(left) {
                Ok(line) => self.lines.seen.push(line),
                Err(e) => panic!(
                    "waiting for {want:?} #{n}: {e}; seen: {:#?}",
                    self.lines.seen
                ),
            }
        }
    }

    /// How often the line `want` was seen.
    pub fn count(&self, want: &str) -> usize {
        self.lines.seen.iter().filter(|l| *l == want).count()
    }
}

/// The spawned hypervisor: SIGTERM on drop (it stops its cells and VMs), killed if it does
/// not go within 10 s.
pub struct Hypervisor(pub Child);

impl Drop for Hypervisor {
    fn drop(&mut self) {
        // SAFETY: signalling our own unreaped child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.0.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                return;
            }
            std::thread::yield_now();
        }
    }
}
