//! In-process tests over `linux_uio_client::LocalLink` (the hosted device semantics on heap
//! memory, real eventfd interrupts): the link life cycle, a hostile peer, and two smoltcp
//! cells exchanging checksummed TCP data.

#[path = "vnet_common/mod.rs"]
mod common;

use std::os::fd::AsFd;

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::sync::Arc;

use ivshmem_stack::vnet_cell::cell::{Cell, CellConfig};
use ivshmem_stack::vnet_cell::services::ServiceConfig;
use linux_uio_client::{Endpoint, EndpointInterrupt, EndpointRegisters, LocalLink};
use shmring::duplex::CONSUMER_SLOT;
use smoltcp::wire::{Ipv4Address, Ipv4Cidr};
use vnet::bridge::Interrupt;
use vnet::link::LinkState;
use vnet::{LinkConfig, LinkEvent, VnetLink};

const SECTION: usize = 1 << 20;

fn peer(link: &Arc<LocalLink>, id: u16) -> (VnetLink<EndpointRegisters>, EndpointInterrupt) {
    let (dev, irq) = Endpoint::attach_local(link, id).unwrap().into_parts();
    (VnetLink::new(dev, LinkConfig::default()).unwrap(), irq)
}

/// Steps both sides (each after its interrupt, as a cell would) until neither changes.
fn settle(
    a: &mut (VnetLink<EndpointRegisters>, EndpointInterrupt),
    b: &mut (VnetLink<EndpointRegisters>, EndpointInterrupt),
) {
    for _ in 0..10 {
        a.1.take().unwrap();
        a.0.poll_link();
        b.1.take().unwrap();
        b.0.poll_link();
    }
}

fn exchange(a: &mut VnetLink<EndpointRegisters>, b: &mut VnetLink<EndpointRegisters>, tag: u8) {
    let d = a.rings_mut().expect("attached");
    let _ = d.tx.try_send(&[tag; 100]).unwrap();
    let mut buf = [0u8; 128];
    let got = b
        .rings_mut()
        .unwrap()
        .rx
        .try_recv(&mut buf)
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..got.len], &[tag; 100][..]);
}

#[test]
fn link_comes_up_goes_down_when_the_peer_dies_and_comes_back() {
    let link = LocalLink::new("net0", 2, SECTION).unwrap();
    let mut a = peer(&link, 0);
    assert_eq!(a.0.poll_link(), LinkEvent::None);
    assert_eq!(a.0.state(), LinkState::Init, "waits in INIT for the peer");
    let mut b = peer(&link, 1);
    settle(&mut a, &mut b);
    assert!(a.0.carrier() && b.0.carrier());
    assert_eq!((a.0.state(), b.0.state()), (LinkState::Run, LinkState::Run));
    assert_eq!(a.0.stats().ups, 1);
    exchange(&mut a.0, &mut b.0, 1);
    exchange(&mut b.0, &mut a.0, 2);

    // The peer dies: the device sets its state to 0 and interrupts us.
    drop(b);
    assert!(Interrupt::take(&mut a.1).unwrap(), "state change interrupt");
    assert_eq!(a.0.poll_link(), LinkEvent::Down);
    assert!(!a.0.carrier());
    assert_eq!(a.0.state(), LinkState::Init);
    assert!(a.0.rings_mut().is_none(), "peer's section no longer used");
    assert_eq!(a.0.stats().teardowns, 1);

    // It restarts: fresh rings on both sides, frames flow again from index 0.
    let mut b = peer(&link, 1);
    settle(&mut a, &mut b);
    assert!(a.0.carrier() && b.0.carrier());
    assert_eq!(a.0.stats().ups, 2);
    exchange(&mut a.0, &mut b.0, 3);
    exchange(&mut b.0, &mut a.0, 4);
}

#[test]
fn hostile_peer_is_torn_down_and_the_link_recovers() {
    let link = LocalLink::new("net0", 2, SECTION).unwrap();
    let mut a = peer(&link, 0);
    let mut b = peer(&link, 1);
    settle(&mut a, &mut b);
    assert!(a.0.carrier());
    // Peer b publishes a producer index far beyond its ring (a hostile or broken peer).
    let own = b.0.device().own_output();
    // SAFETY: b's own output section, mapped writable; the index word is 8-aligned.
    unsafe {
        own.as_ptr()
            .add(CONSUMER_SLOT + shmring::layout::P_INDEX)
            .cast::<u64>()
            .write_volatile(1 << 40);
    }
    // a's receive path sees it: no token, a fault, never a panic.
    let now = smoltcp::time::Instant::from_millis(0);
    assert!(smoltcp::phy::Device::receive(&mut a.0, now).is_none());
    assert!(a.0.nic_ref().fault().is_some());
    assert_eq!(a.0.poll_link(), LinkEvent::Down);
    assert_eq!(a.0.stats().faults, 1);
    assert_eq!(a.0.state(), LinkState::Reset, "waits for the peer to reset");
    // b sees a's RESET, tears down, and both come up again with clean rings.
    settle(&mut a, &mut b);
    assert!(a.0.carrier() && b.0.carrier());
    exchange(&mut b.0, &mut a.0, 9);
    assert_eq!(a.0.nic_ref().stats().corrupt, 1);
}

#[test]
fn mtu_too_large_for_the_section_is_refused() {
    let link = LocalLink::new("net0", 2, 64 * 1024).unwrap();
    let (dev, _irq) = Endpoint::attach_local(&link, 0).unwrap().into_parts();
    let err = VnetLink::new(
        dev,
        LinkConfig {
            mtu: vnet::nic::MAX_MTU,
            max_capacity: None,
        },
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("cannot hold 4 frames of MTU 65549"), "{text}");
}

fn eventfd() -> EventFd {
    EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("eventfd")
}

fn signal(fd: &EventFd) {
    assert_eq!(fd.write(1).expect("eventfd write"), 8);
}

#[test]
fn two_smoltcp_cells_exchange_checksummed_tcp_data() {
    common::init_log();
    let link = LocalLink::new("net0", 2, SECTION).unwrap();
    let stop = Arc::new(eventfd());
    let cell_addr = Ipv4Cidr::new(Ipv4Address::new(10, 7, 0, 2), 24);
    let server = {
        let link = Arc::clone(&link);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (l, irq) = peer(&link, 0);
            let mut cell = Cell::new(
                l,
                irq,
                &ServiceConfig::new(cell_addr),
                CellConfig::default(),
            );
            cell.run(Some(stop.as_fd())).unwrap();
            cell.service_stats()
        })
    };
    let (l, irq) = peer(&link, 1);
    let mut client =
        common::Client::on_link(l, irq, Ipv4Cidr::new(Ipv4Address::new(10, 7, 0, 3), 24));
    let remote = cell_addr.address();
    const TOTAL: u64 = 16 << 20;
    let (bytes, remote_crc, local_crc) = client.sink_transfer(remote, TOTAL, 256 * 1024);
    assert_eq!(bytes, TOTAL);
    assert_eq!(remote_crc, local_crc, "sink checksum");
    assert_eq!(client.source_transfer(remote, TOTAL, 256 * 1024), TOTAL);
    client.echo_transfer(remote, 2 << 20, 64 * 1024);
    signal(&stop);
    let stats = server.join().unwrap();
    assert_eq!(stats.sink_bytes, TOTAL);
    assert!(stats.source_bytes >= TOTAL);
    assert_eq!(stats.echo_bytes, 2 << 20);
    assert_eq!(client.device.0.nic_ref().stats().corrupt, 0);
}
