//! [`NetCell`]: the platform-free core of a network cell's event loop.
//!
//! A round is: take the link interrupt if one came ([`NetCell::on_interrupt`]: the link state
//! machine), then [`NetCell::step`] (smoltcp and the services, one flush: at most one
//! doorbell). When a step moved nothing, the caller runs the sleep handshake
//! ([`NetCell::prepare_sleep`]) and, if it allows, waits for the link interrupt at most
//! [`NetCell::poll_delay`]. How to wait and what time it is are the platform's: `poll(2)`
//! and `std::time` in a process cell, `hlt`, MSI-X and the PM timer in an inmate.

use alloc::string::String;
use core::fmt::Write as _;

use vnet::link::LinkEvent;
use vnet::smoltcp::time::{Duration, Instant};
use vnet::CellLink;

use crate::services::{ServiceConfig, ServiceStats, Services};

/// A cell's link (either wire format: [`CellLink`]) and its services.
pub struct NetCell<L: CellLink> {
    link: L,
    services: Services,
}

impl<L: CellLink> core::fmt::Debug for NetCell<L> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NetCell")
            .field("services", &self.services)
            .field("carrier", &self.link.report().carrier)
            .finish()
    }
}

impl<L: CellLink> NetCell<L> {
    /// Brings the link's state machine up (first step) and creates the services on its NIC.
    pub fn new(mut link: L, services: &ServiceConfig, now: Instant) -> Self {
        link.poll_link();
        let services = Services::new(services, &mut link, now);
        NetCell { link, services }
    }

    /// The link.
    pub fn link(&self) -> &L {
        &self.link
    }

    /// The link, mutable (shutting down, flushing).
    pub fn link_mut(&mut self) -> &mut L {
        &mut self.link
    }

    /// Service counters.
    pub fn service_stats(&self) -> ServiceStats {
        self.services.stats()
    }

    /// Runs the link state machine: call after every link interrupt.
    pub fn on_interrupt(&mut self) -> LinkEvent {
        self.link.poll_link()
    }

    /// One round without blocking: smoltcp, services, flush (a NIC fault runs the link state
    /// machine first). Returns whether frames moved or the link changed.
    pub fn step(&mut self, now: Instant) -> bool {
        let mut changed = false;
        if self.link.faulted() {
            self.link.poll_link();
            changed = true;
        }
        let before = self.link.report();
        let mut status = |page: &mut String| {
            let n = before;
            let state = n.state;
            let _ = writeln!(page, "link_state {state:?}");
            let _ = writeln!(page, "carrier {}", n.carrier);
            let _ = writeln!(page, "link_ups {}", n.ups);
            let _ = writeln!(page, "link_downs {}", n.downs);
            let _ = writeln!(page, "link_faults {}", n.faults);
            let _ = writeln!(page, "doorbells {}", n.doorbells);
            let _ = writeln!(page, "rx_frames {}", n.rx_frames);
            let _ = writeln!(page, "rx_bytes {}", n.rx_bytes);
            let _ = writeln!(page, "rx_oversize {}", n.rx_oversize);
            let _ = writeln!(page, "rx_ipv4_fragments {}", n.rx_ipv4_fragments);
            let _ = writeln!(
                page,
                "rx_ipv4_fragments_dropped {}",
                n.rx_ipv4_fragments_dropped
            );
            let _ = writeln!(
                page,
                "ipv4_reassembly_max {}",
                vnet::nic::IPV4_REASSEMBLY_MAX
            );
            let _ = writeln!(page, "tx_frames {}", n.tx_frames);
            let _ = writeln!(page, "tx_bytes {}", n.tx_bytes);
            let _ = writeln!(page, "tx_ring_full {}", n.tx_full);
            let _ = writeln!(page, "tx_reply_dropped {}", n.tx_dropped);
            let _ = writeln!(page, "tx_oversize {}", n.tx_oversize);
            let _ = writeln!(page, "corrupt {}", n.corrupt);
        };
        self.services.poll(now, &mut self.link, &mut status);
        self.link.flush();
        let after = self.link.report();
        changed || after.rx_frames != before.rx_frames || after.tx_frames != before.tx_frames
    }

    /// The sleep handshake (flush, doorbell): `true` if the caller may wait for the link
    /// interrupt (at most [`poll_delay`](Self::poll_delay)), `false` if work arrived.
    pub fn prepare_sleep(&mut self) -> bool {
        self.link.prepare_sleep()
    }

    /// How long until the services need a round without new frames (`None`: only on new
    /// frames or a link interrupt).
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        self.services.poll_delay(now)
    }

    /// Leaves the link (the peer sees RESET).
    pub fn shut_down(&mut self) {
        self.link.shut_down();
    }

    /// Gives the link back.
    pub fn into_link(self) -> L {
        self.link
    }
}
