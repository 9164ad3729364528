//! The TAP bridge in `ivshmem-net` format: forwards Ethernet frames both ways between a frame
//! port (a Linux TAP device) and an [`IvnetLink`]'s queues. The shmring bridge
//! ([`crate::bridge::Bridge`]) is the same program for the other format; the port, interrupt,
//! configuration, counters and loop errors are shared with it.
//!
//! One thread, event driven, no busy loop when idle: after a bounded spin the queues' sleep
//! handshake runs (`avail_event`, and `used_event` when the TX queue is short of room) and the
//! bridge blocks in `poll(2)` on the interrupt fd, the port and an optional stop fd.
//!
//! - queue → port: each frame is copied once out of the peer's section into the bridge's own
//!   buffer (completed at once, as the format wants) and written to the port from there; a
//!   port that would block keeps the copy until `POLLOUT`.
//! - port → queue: each frame is read from the port into the bridge's buffer (MTU + 1 bytes: a
//!   frame that fills it was longer than the link's largest frame and is dropped whole,
//!   counted) and copied into a slot of the own section. While the TX queue has no room the
//!   port is not read (the kernel queues, then drops, as for a slow NIC).
//! - batching: up to [`BridgeConfig::batch`] frames per direction per round, then one flush
//!   and at most one doorbell, only when the peer's event index asks.
//! - the link: carrier follows [`IvnetLink::carrier`]; [`IvnetLink::poll_link`] runs after
//!   every interrupt and after a peer fault (which stops the link, named in the log).

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Instant;

use ivshmem_dev::RegisterAccess;

use super::link::IvnetLink;
use crate::bridge::{
    wait_for_bridge_fds, BridgeConfig, BridgeStats, FramePort, Interrupt, LoopError,
};
use crate::link::LinkEvent;

/// The bridge between a port and an `ivshmem-net` link. See the module documentation.
pub struct IvnetBridge<R: RegisterAccess, I: Interrupt, P: FramePort> {
    link: IvnetLink<R>,
    irq: I,
    port: P,
    config: BridgeConfig,
    stats: BridgeStats,
    hook: Option<Box<dyn FnMut(LinkEvent) + Send>>,
    /// Frame copied out of the peer's section, not yet written to the port.
    to_port: Vec<u8>,
    to_port_len: Option<usize>,
    /// Frame read from the port.
    from_port: Vec<u8>,
}

impl<R: RegisterAccess, I: Interrupt, P: FramePort> core::fmt::Debug for IvnetBridge<R, I, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IvnetBridge")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<R: RegisterAccess, I: Interrupt, P: FramePort> IvnetBridge<R, I, P> {
    /// A bridge over `link` (driven by `irq`) and `port`.
    pub fn new(link: IvnetLink<R>, irq: I, port: P, config: BridgeConfig) -> Self {
        let max = link.config().max_frame;
        IvnetBridge {
            link,
            irq,
            port,
            config,
            stats: BridgeStats::default(),
            hook: None,
            to_port: vec![0; max],
            to_port_len: None,
            from_port: vec![0; max + 1],
        }
    }

    /// Calls `hook` on every carrier change (after the port's carrier was set).
    pub fn set_link_hook(&mut self, hook: Box<dyn FnMut(LinkEvent) + Send>) {
        self.hook = Some(hook);
    }

    /// Counters.
    pub fn stats(&self) -> BridgeStats {
        self.stats
    }

    /// The link.
    pub fn link(&self) -> &IvnetLink<R> {
        &self.link
    }

    fn poll_link(&mut self) {
        let event = self.link.poll_link();
        if let Some(fault) = self.link.last_fault().filter(|_| event == LinkEvent::Down) {
            tracing::warn!("ivshmem-net peer broke the format, link stopped: {fault}");
        }
        let on = match event {
            LinkEvent::None => return,
            LinkEvent::Up => true,
            LinkEvent::Down => false,
        };
        if !on {
            self.to_port_len = None;
        }
        tracing::info!(carrier = on, state = ?self.link.state(), "ivshmem-net link");
        if let Err(e) = self.port.set_carrier(on) {
            tracing::warn!("cannot set the port's carrier: {e}");
        }
        if let Some(hook) = self.hook.as_mut() {
            hook(event);
        }
    }

    /// Writes the held frame to the port; `false` if the port would block.
    fn write_held(&mut self) -> bool {
        let Some(len) = self.to_port_len else {
            return true;
        };
        match self.port.write_frame(&self.to_port[..len]) {
            Ok(_) => {
                self.stats.to_port_frames += 1;
                self.stats.to_port_bytes += len as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                self.stats.port_write_errors += 1;
                tracing::debug!("port refused a {len}-byte frame: {e}");
            }
        }
        self.to_port_len = None;
        true
    }

    /// Queue → port. Returns (frames moved, port would block).
    fn queue_to_port(&mut self) -> (usize, bool) {
        let mut moved = 0;
        while moved < self.config.batch {
            if !self.write_held() {
                return (moved, true);
            }
            let Some(q) = self.link.queues_mut() else {
                break;
            };
            match q.receive(&mut self.to_port) {
                Ok(Some(n)) => self.to_port_len = Some(n),
                Ok(None) | Err(_) => break,
            }
            moved += 1;
        }
        (moved, !self.write_held())
    }

    /// Port → queue. Returns (frames moved, queue short of room).
    fn port_to_queue(&mut self) -> io::Result<(usize, bool)> {
        let max = self.link.config().max_frame;
        let mut moved = 0;
        while moved < self.config.batch {
            let Some(q) = self.link.queues_mut() else {
                break;
            };
            if !q.can_send(max) {
                return Ok((moved, q.fault().is_none()));
            }
            let n = match self.port.read_frame(&mut self.from_port) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            moved += 1;
            if n > max {
                self.stats.from_port_oversize += 1;
                tracing::debug!("dropped a frame longer than the link's {max} bytes");
                continue;
            }
            let frame = &self.from_port[..n];
            if q.send(n, |slot| slot.copy_from_slice(frame)) == Ok(Some(())) {
                self.stats.from_port_frames += 1;
                self.stats.from_port_bytes += n as u64;
            }
        }
        Ok((moved, false))
    }

    /// Runs until `stop` becomes readable or hangs up. Errors: I/O on the port or interrupt,
    /// or a polled fd reporting `POLLERR`/`POLLHUP`/`POLLNVAL` ([`LoopError::Fd`]).
    pub fn run(&mut self, stop: Option<BorrowedFd<'_>>) -> Result<(), LoopError> {
        if let Err(e) = self.port.set_carrier(false) {
            tracing::warn!("cannot set the port's carrier: {e}");
        }
        self.poll_link();
        let mut idle_since: Option<Instant> = None;
        let (mut out_blocked, mut tx_short) = (false, false);
        loop {
            let mut progress = false;
            if self.link.carrier() {
                let (moved, blocked) = self.queue_to_port();
                out_blocked = blocked;
                let (sent, short) = self.port_to_queue()?;
                tx_short = short;
                progress = moved + sent > 0;
            }
            self.link.flush();
            if self.link.faulted() {
                self.poll_link();
                continue;
            }
            if progress {
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.config.spin {
                if self.irq.take()? {
                    self.poll_link();
                }
                std::thread::yield_now();
                continue;
            }
            idle_since = None;
            if !self.link.prepare_sleep() {
                continue;
            }
            let carrier = self.link.carrier();
            self.stats.sleeps += 1;
            if tx_short {
                self.stats.ring_full_waits += 1;
            }
            let Some(fds) = wait_for_bridge_fds(
                &self.irq.fds(),
                self.port.as_fd(),
                carrier && !tx_short,
                carrier && out_blocked,
                stop,
            )?
            else {
                continue;
            };
            if fds[2] != 0 {
                self.link.flush();
                return Ok(());
            }
            if fds[0] != 0 && self.irq.take()? {
                self.poll_link();
            }
            tx_short = false;
        }
    }

    /// Gives the parts back.
    pub fn into_parts(self) -> (IvnetLink<R>, I, P) {
        (self.link, self.irq, self.port)
    }
}
