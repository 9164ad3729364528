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
