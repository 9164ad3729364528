//! A hosted hypervisor inside the benchmarking process, for the suites that measure process
//! cells (`doorbell`, `telemetry`): its control socket is served by a scoped thread while the
//! measurement attaches cells to it (and forks the peer cell), exactly as `hypervisor run`
//! would serve them.

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
        links: vec![bench_link_spec(
            link.name,
            link.cells
                .iter()
                .map(|&(name, _)| name.to_string())
                .collect(),
            link.output_size,
        )],
    };
    with_hosted_system(bench, &system, body)
}

/// A benchmark link: user-defined protocol 4001h, a 4 KiB state table, no R/W section, INTx.
pub fn bench_link_spec(name: &str, peers: Vec<String>, output_size: u64) -> LinkSpec {
    LinkSpec {
        name: name.into(),
        peers,
        protocol: 0x4001,
        state_table_size: 4096,
        rw_size: 0,
        output_size,
        interrupts: hypervisor::device::InterruptMode::Intx,
    }
}

/// A fresh temporary directory path for one hosted hypervisor of `bench` (not created).
pub fn bench_dir(bench: &str) -> std::path::PathBuf {
    static RUN: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "ivbench-{bench}-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Like [`with_hosted_link`] for a whole system: serves `system` on a thread of this process
/// while `body` runs with the control socket's path.
pub fn with_hosted_system<T>(
    bench: &str,
    system: &SystemSpec,
    body: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let dir = bench_dir(bench);
    let socket = dir.join("hypervisor.sock");
    let result = (|| {
        let mut server = ControlServer::bind(system, &socket, &mut device_model)
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
