//! The main loop of a smoltcp cell on a vnet link: [`NetCell`] (the services over the link's NIC),
//! driven by the link interrupt and smoltcp's timers.
//!
//! The loop is what a bare-metal cell does in its idle loop and interrupt handler, written
//! over `poll(2)` so it runs as a process cell: poll the link after every interrupt, poll
//! smoltcp, flush once (at most one doorbell), and when there is nothing to do run the
//! sleep handshake and block until the interrupt or smoltcp's next deadline.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant as StdInstant};

use vnet::smoltcp::time::Instant;
use vnet_services::NetCell;

use super::services::{ServiceConfig, ServiceStats};
use vnet::bridge::{check_revents, Interrupt, LoopError, LoopFd, DEFAULT_SPIN};
use vnet::CellLink;

/// Tuning of the cell loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellConfig {
    /// How long to keep polling after the last activity before the sleep handshake (a
    /// bounded spin: it saves the wake-up latency on back-to-back traffic; zero: sleep as
    /// soon as there is nothing to do).
    pub spin: Duration,
}

impl Default for CellConfig {
    fn default() -> Self {
        CellConfig { spin: DEFAULT_SPIN }
    }
}

/// A cell: the link and services ([`NetCell`], over either wire format) and the link
/// interrupt.
pub struct Cell<L: CellLink, I: Interrupt> {
    core: NetCell<L>,
    irq: I,
    config: CellConfig,
    epoch: StdInstant,
}

impl<L: CellLink, I: Interrupt> core::fmt::Debug for Cell<L, I> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Cell").field("core", &self.core).finish()
    }
}

impl<L: CellLink, I: Interrupt> Cell<L, I> {
    /// Brings the link's state machine up (first step) and creates the services on its NIC.
    pub fn new(link: L, irq: I, services: &ServiceConfig, config: CellConfig) -> Self {
        let epoch = StdInstant::now();
        Cell {
            core: NetCell::new(link, services, Instant::from_micros(0)),
            irq,
            config,
            epoch,
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// The link.
    pub fn link(&self) -> &L {
        self.core.link()
    }

    /// Service counters.
    pub fn service_stats(&self) -> ServiceStats {
        self.core.service_stats()
    }

    /// Takes a pending interrupt (without blocking) and, if there was one, runs the link
    /// state machine. Returns whether the carrier changed.
    pub fn handle_interrupt(&mut self) -> std::io::Result<bool> {
        if self.irq.take()? {
            return Ok(self.core.on_interrupt() != vnet::LinkEvent::None);
        }
        Ok(false)
    }

    /// One round without blocking and without looking at the interrupt: smoltcp, services,
    /// flush (a NIC fault runs the link state machine). Returns whether frames moved or the
    /// link changed.
    pub fn step(&mut self) -> std::io::Result<bool> {
        let now = self.now();
        Ok(self.core.step(now))
    }

    /// Runs until `stop` becomes readable or hangs up. Errors: I/O on the interrupt, or a
    /// polled fd reporting `POLLERR`/`POLLHUP`/`POLLNVAL` ([`LoopError::Fd`]).
    pub fn run(&mut self, stop: Option<BorrowedFd<'_>>) -> Result<(), LoopError> {
        let mut idle_since: Option<StdInstant> = None;
        let mut busy_rounds = 0u32;
        loop {
            if self.step()? {
                idle_since = None;
                busy_rounds = busy_rounds.wrapping_add(1);
                // While busy, look at the interrupt (link changes) now and then only: it
                // costs a system call.
                if busy_rounds.is_multiple_of(64) {
                    self.handle_interrupt()?;
                }
                continue;
            }
            if self.handle_interrupt()? {
                continue;
            }
            let since = *idle_since.get_or_insert_with(StdInstant::now);
            if since.elapsed() < self.config.spin {
                continue;
            }
            idle_since = None;
            if !self.core.prepare_sleep() {
                continue;
            }
            let now = self.now();
            let timeout = match self.core.poll_delay(now) {
                None => -1,
                Some(d) => d.total_millis().min(i32::MAX as u64) as i32,
            };
            if timeout == 0 {
                continue;
            }
            // Every vector's fd (ivshmem-net with MSI-X rings data on vector 1), then `stop`.
            let mut fds: Vec<libc::pollfd> = self
                .irq
                .fds()
                .iter()
                .map(|fd| fd.as_raw_fd())
                .chain([stop.map_or(-1, |s| s.as_raw_fd())])
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let stop_at = fds.len() - 1;
            // SAFETY: `fds.len()` valid pollfd entries (a negative fd is ignored).
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
                continue;
            }
            for fd in &fds[..stop_at] {
                check_revents(LoopFd::Interrupt, fd.fd, fd.revents)?;
            }
            check_revents(LoopFd::Stop, fds[stop_at].fd, fds[stop_at].revents)?;
            if fds[stop_at].revents != 0 {
                self.core.shut_down();
                return Ok(());
            }
        }
    }

    /// Gives the link back.
    pub fn into_link(self) -> L {
        self.core.into_link()
    }
}
