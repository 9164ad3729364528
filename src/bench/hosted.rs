//! A hosted hypervisor inside the benchmarking process, for the suites that measure process
//! cells (`doorbell`, `telemetry`): its control socket is served by a scoped thread while the
//! measurement attaches cells to it (and forks the peer cell), exactly as `hypervisor run`
//! would serve them. [`HostedSystem`] runs a whole system with KVM cells the same way (suite
//! `kvm`, and the KVM tests).

use std::os::fd::AsFd as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, Context, Result};
use hypervisor::control::{device_model, CellSpec, ControlServer, LinkSpec, SystemSpec};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// The one 1:1 link of a benchmark system.
#[derive(Debug, Clone, Copy)]
pub struct BenchLink<'a> {
    /// Link name.
    pub name: &'a str,
    /// The two cells in peer-ID order: (cell name, its CPU).
    pub cells: [(&'a str, usize); 2],
    /// Size of each output section in bytes (page multiple).
    pub output_size: u64,
}

/// Starts a hosted hypervisor with `link` (user-defined protocol 4001h, a 4 KiB state table,
/// no R/W section), its control socket in a fresh temporary directory named after `bench`,
/// runs `body` with the socket path, then stops the server and removes the directory,
/// whatever `body` returned. Errors of `body` come first, then those of the server.
pub fn with_hosted_link<T>(
    bench: &str,
    link: &BenchLink<'_>,
    body: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ivbench-{bench}-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let socket = dir.join("hypervisor.sock");
    let system = SystemSpec {
        cells: link
            .cells
            .iter()
            .map(|&(name, cpu)| CellSpec {
                name: name.into(),
                cpus: vec![cpu],
                command: None,
                process: true,
                uid: None,
            })
            .collect(),
        links: vec![LinkSpec {
            name: link.name.into(),
            peers: link.cells.iter().map(|&(name, _)| name.into()).collect(),
            protocol: 0x4001,
            state_table_size: 4096,
            rw_size: 0,
            output_size: link.output_size,
            interrupts: hypervisor::device::InterruptMode::Intx,
        }],
    };
    let result = (|| {
        let mut server = ControlServer::bind(&system, &socket, &mut device_model)
            .context("starting the hosted hypervisor")?;
        let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .context("eventfd")?;
        std::thread::scope(|scope| {
            let serving = scope.spawn(|| -> Result<()> {
                loop {
                    let ready = server
                        .poll(&[stop.as_fd()], None)
                        .context("serving the control socket")?;
                    if ready[0] {
                        return Ok(());
                    }
                }
            });
            let measured = body(&socket);
            let _ = stop.write(1);
            let served = serving
                .join()
                .map_err(|_| anyhow!("the control socket thread panicked"))?;
            let value = measured?;
            served?;
            Ok(value)
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A whole system (KVM cells included) run by `hypervisor::cells::run_system` on a thread of
/// this process, as `hypervisor run --no-spawn` would run it: no cell is spawned, the caller
/// attaches the process cells itself. The hypervisor's output arrives line by line on
/// [`HostedSystem::lines`]. Stopped (and joined) by [`HostedSystem::stop`] or on drop.
pub struct HostedSystem {
    stop: hypervisor::cells::StopHandle,
    thread: Option<std::thread::JoinHandle<Result<(), hypervisor::cells::RunError>>>,
    lines: Option<std::sync::mpsc::Receiver<String>>,
    socket: std::path::PathBuf,
}

impl HostedSystem {
    /// How long [`HostedSystem::start`] waits for the control socket.
    pub const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

    /// Validates `toml` (whose `control_socket` must be set), starts the system and returns
    /// once its control socket listens.
    pub fn start(toml: &str) -> Result<Self> {
        use hypervisor::cells::{run_system, RunOptions, StopHandle};
        use std::io::BufRead as _;

        let valid = hypervisor::config::SystemConfig::from_toml_str(toml)
            .and_then(|c| c.validate())
            .map_err(|e| anyhow!("system configuration: {e}"))?;
        anyhow::ensure!(
            !valid.control_socket_is_default,
            "the configuration names no control_socket"
        );
        let socket = valid.control_socket.clone();
        let system = SystemSpec::from_config(&valid);
        let kvm = hypervisor::kvm::KvmSystem::from_config(&valid);
        let stop = StopHandle::new().context("stop handle")?;
        let options = RunOptions {
            spawn: false,
            stop_when_cells_exit: false,
            ..RunOptions::new(&socket)
        };
        let (read, write) = nix::unistd::pipe().context("pipe")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(std::fs::File::from(read)).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut out = std::fs::File::from(write);
                run_system(
                    &system,
                    &kvm,
                    &options,
                    Some(&stop),
                    &mut out,
                    &mut std::io::sink(),
                )
                .map(drop)
            })
        };
        let mut hosted = HostedSystem {
            stop,
            thread: Some(thread),
            lines: Some(rx),
            socket,
        };
        let lines = hosted.lines.as_ref().context("lines")?;
        loop {
            match lines.recv_timeout(Self::START_TIMEOUT) {
                Ok(line) if line.contains("listening on") => return Ok(hosted),
                Ok(_) => {}
                Err(_) => {
                    return Err(match hosted.finish() {
                        Err(e) => e,
                        Ok(()) => anyhow!("the hypervisor did not start listening"),
                    })
                }
            }
        }
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The hypervisor's output lines from its "listening on" line on (taken once).
    pub fn lines(&mut self) -> std::sync::mpsc::Receiver<String> {
        self.lines.take().expect("HostedSystem::lines taken twice")
    }

    /// Stops the system and says how its run ended.
    pub fn stop(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        self.stop.stop();
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow!("the hypervisor thread panicked"))?
                .map_err(|e| anyhow!("hypervisor: {e}")),
            None => Ok(()),
        }
    }
}

impl Drop for HostedSystem {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// A private copy of a shipped system configuration (`configs/*.toml`) for a test or a
/// benchmark: the `[system]` renamed `name` with its control socket at `socket` (so parallel
/// runs never meet), and every relative `image = "…"` made absolute from this package's root
/// (the images `scripts/build-inmates` builds). Everything else is left as shipped.
pub fn private_config(shipped: &str, name: &str, socket: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut section = String::new();
    let mut out = String::with_capacity(shipped.len() + 128);
    for line in shipped.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            section = trimmed.to_owned();
        }
        let value = |key: &str| {
            trimmed
                .strip_prefix(key)
                .map(str::trim_start)
                .and_then(|rest| rest.strip_prefix('='))
                .map(|rest| rest.trim().trim_matches('"').to_owned())
        };
        if section == "[system]" && value("name").is_some() {
            out.push_str(&format!(
                "name = \"{name}\"\ncontrol_socket = \"{}\"\n",
                socket.display()
            ));
        } else if section == "[system]" && value("control_socket").is_some() {
            // Replaced above.
        } else if let Some(image) = value("image").filter(|i| Path::new(i).is_relative()) {
            out.push_str(&format!("image = \"{}\"\n", root.join(image).display()));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
