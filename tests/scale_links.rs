//! Issue 15: many peers on one link, many links on one cell. Process cells of a hosted
//! hypervisor served by a thread of this test; every wait is on an interrupt eventfd, bounded.

use std::time::{Duration, Instant};

use ivshmem_stack::bench::hosted::with_hosted_system;
use ivshmem_stack::bench::{pin, scale};
use linux_uio_client::hosted::HostedEndpoint;

/// How long a peer may take to see what it waits for.
const PATIENCE: Duration = Duration::from_secs(20);

/// A 16-peer link (the device's maximum): every peer writes its STATE, and every peer gets
/// interrupts until its state table shows every other peer's value.
#[test]
fn every_peer_of_a_16_peer_link_sees_every_other_peers_state() {
    let spec = scale::one_link(16);
    with_hosted_system("scale-test-16", &spec, |socket| {
        let cells: Vec<HostedEndpoint> = spec
            .cells
            .iter()
            .map(|cell| HostedEndpoint::attach(socket, &cell.name).unwrap())
            .collect();
        let links: Vec<_> = cells.iter().map(|cell| &cell.links()[0]).collect();
        for (id, link) in links.iter().enumerate() {
            assert_eq!(link.peer_id(), id as u16);
            assert_eq!(link.max_peers(), 16);
            link.enable_interrupts();
        }
        let value = |peer: usize| 0x100 + peer as u32;
        for (id, link) in links.iter().enumerate() {
            link.set_state(value(id)).unwrap();
        }
        let deadline = Instant::now() + PATIENCE;
        for (id, link) in links.iter().enumerate() {
            loop {
                let missing: Vec<usize> = (0..16)
                    .filter(|&peer| peer != id)
                    .filter(|&peer| link.peer_state(peer as u16) != Some(value(peer)))
                    .collect();
                if missing.is_empty() {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(
                    !left.is_zero(),
                    "peer {id} never saw the states of peers {missing:?}"
                );
                link.wait_interrupt_timeout(left).unwrap();
            }
            assert_eq!(link.state(), value(id));
        }
        Ok(())
    })
    .unwrap();
}

/// A cell with 64 links to another cell streams on all of them at once: every frame arrives
/// in order on its link (the consumer checks each sequence number) and each link's checksum
/// of what arrived equals the producer's of what it sent. 100 frames of 1 KiB per link wrap
/// each 32 KiB ring three times.
#[test]
fn a_cell_with_64_links_streams_on_all_of_them_with_checksums() {
    let cpus = pin::default_cpus().expect("two CPUs");
    let run = scale::stream(cpus, 64, 100).unwrap();
    assert_eq!(run.sent.len(), 64);
    assert_eq!(run.sent, run.received, "per-link checksums differ");
    let distinct: std::collections::BTreeSet<u64> = run.sent.iter().copied().collect();
    assert_eq!(distinct.len(), 64, "every link carried its own data");
}

/// A cell on 256 links gets 769 replies and 1,280 fds at attach, more than a control socket
/// buffer holds: the hypervisor queues what does not fit and sends it as the cell reads
/// (it used to drop the cell as "not reading its socket").
#[test]
fn a_cell_with_256_links_attaches() {
    let spec = scale::two_cells(256, 4096);
    with_hosted_system("scale-test-256", &spec, |socket| {
        let a = HostedEndpoint::attach(socket, "a").unwrap();
        let b = HostedEndpoint::attach(socket, "b").unwrap();
        assert_eq!(a.links().len(), 256);
        for (i, (la, lb)) in a.links().iter().zip(b.links()).enumerate() {
            assert_eq!(la.name(), format!("l{i}"));
            assert_eq!((la.peer_id(), lb.peer_id()), (0, 1));
        }
        // The last link works end to end.
        let (la, lb) = (&a.links()[255], &b.links()[255]);
        lb.enable_interrupts();
        la.set_state(9).unwrap();
        let deadline = Instant::now() + PATIENCE;
        while lb.peer_state(0) != Some(9) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "peer 1 never saw state 9");
            lb.wait_interrupt_timeout(left).unwrap();
        }
        Ok(())
    })
    .unwrap();
}
