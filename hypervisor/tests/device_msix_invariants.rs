//! Random operation sequences against the device model in MSI-X mode (deterministic seeds),
//! checking after every step what a KVM backend relies on:
//! - an interrupt only goes to a (peer, vector) whose route was open just before the step,
//!   and a doorbell goes out exactly when its route was open;
//! - a route's message is the table entry's message;
//! - `route_generation(peer)` moves exactly when `routes(peer)` changed, and the link-wide
//!   generation exactly when any peer's did (so a backend that re-syncs on a generation
//!   change never misses a change and never re-syncs for nothing);
//! - one-shot delivery leaves `INT_CONTROL` at 0; the PBA reads 0.

use hypervisor::device::{
    Interrupt, InterruptGate, InterruptMode, Link, LinkParams, Route, VecStateTable,
    VENDOR_CAP_OFFSET,
};
use ivshmem_dev::layout::{LayoutParams, SharedMemoryLayout};
use ivshmem_dev::msix::{MSIX_CAP_OFFSET, MSIX_ENTRY_SIZE, MSIX_PBA_OFFSET_IN_BAR};
use ivshmem_dev::pci::{CAP_PRIV_CONTROL, COMMAND};
use ivshmem_dev::regs::{DOORBELL, INT_CONTROL, STATE};
use ivshmem_dev::{Doorbell, Protocol};

/// xorshift64*: small, deterministic, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn new_link(max_peers: u16, vectors: u16) -> Link {
    let layout = SharedMemoryLayout::new(LayoutParams {
        max_peers,
        state_table_size: 4096,
        rw_size: 0,
        output_size: 4096,
        page_size: 4096,
    })
    .unwrap();
    let params = LinkParams {
        name: "random".into(),
        max_peers,
        protocol: Protocol::ETHERNET,
        layout,
        interrupts: InterruptMode::Msix { vectors },
    };
    Link::new(params, Box::new(VecStateTable::new(max_peers))).unwrap()
}

fn snapshot(link: &Link) -> Vec<Vec<Route>> {
    (0..link.max_peers())
        .map(|peer| link.routes(peer))
        .collect()
}

fn check_interrupts(link: &Link, before: &[Vec<Route>], interrupts: &[Interrupt]) {
    for interrupt in interrupts {
        let route = before[usize::from(interrupt.target)][usize::from(interrupt.vector)];
        assert!(
            route.is_deliverable(),
            "{interrupt:?} went out on a route that was {route:?}"
        );
        let gated = link.interrupt_gate(interrupt.target) == Some(InterruptGate::Device);
        if gated && link.one_shot(interrupt.target) == Some(true) {
            assert_eq!(link.int_control(interrupt.target), Some(0));
        }
    }
}

/// Runs one sequence; returns how many interrupts went out.
fn run(seed: u64, steps: usize) -> usize {
    let mut delivered = 0;
    let mut rng = Rng(seed | 1);
    let max_peers = 2 + rng.below(3) as u16;
    let vectors = 1 + rng.below(16) as u16;
    let mut link = new_link(max_peers, vectors);
    if rng.below(4) == 0 {
        link.set_interrupt_gate(0, InterruptGate::Endpoint);
    }
    let control = u16::from(MSIX_CAP_OFFSET) + 2;
    for _ in 0..steps {
        let peer = rng.below(u64::from(max_peers)) as u16;
        let before = snapshot(&link);
        let generations: Vec<u64> = (0..max_peers).map(|p| link.route_generation(p)).collect();
        let link_generation = link.link_route_generation();
        let active = link.is_active(peer);
        let effects = match rng.below(10) {
            0 => link.peer_attached(peer),
            1 if rng.below(3) == 0 => link.peer_detached(peer),
            2 if active => link
                .mmio_write(peer, INT_CONTROL.into(), 4, rng.below(2))
                .unwrap(),
            3 => {
                let at = u16::from(VENDOR_CAP_OFFSET + CAP_PRIV_CONTROL);
                link.config_write(peer, at, 1, rng.below(2) as u32).unwrap();
                Default::default()
            }
            4 => {
                // Command register: bytes or words of random bits.
                let (at, size) = [(0u16, 2u8), (0, 1), (1, 1)][rng.below(3) as usize];
                let value = rng.next() as u32;
                link.config_write(peer, u16::from(COMMAND) + at, size, value)
                    .unwrap();
                Default::default()
            }
            5 => {
                let value = (rng.below(4) as u32) << 14 | rng.next() as u32 & 0x3FFF;
                link.config_write(peer, control, 2, value).unwrap();
                Default::default()
            }
            6 if active => {
                // A table entry field (sometimes past the table), or the PBA.
                let entry = rng.below(u64::from(vectors) + 1) as u32;
                let field = 4 * rng.below(4) as u32;
                let value = if field == 12 {
                    rng.below(2) as u32
                } else {
                    rng.below(4) as u32
                };
                let offset = if rng.below(8) == 0 {
                    MSIX_PBA_OFFSET_IN_BAR
                } else {
                    entry * MSIX_ENTRY_SIZE + field
                };
                link.msix_write(peer, offset.into(), 4, value.into())
                    .unwrap();
                Default::default()
            }
            7 if active => link
                .mmio_write(peer, STATE.into(), 4, rng.below(3))
                .unwrap(),
            8 | 9 if active => {
                let target = rng.below(u64::from(max_peers) + 1) as u16;
                let vector = rng.below(u64::from(vectors) + 1) as u16;
                let value = Doorbell::new(target, vector).encode();
                let effects = link
                    .mmio_write(peer, DOORBELL.into(), 4, value.into())
                    .unwrap();
                let open = before
                    .get(usize::from(target))
                    .and_then(|routes| routes.get(usize::from(vector)))
                    .is_some_and(|route| route.is_deliverable());
                let expected = if open {
                    vec![Interrupt { target, vector }]
                } else {
                    vec![]
                };
                assert_eq!(effects.interrupts, expected);
                effects
            }
            _ => Default::default(),
        };
        check_interrupts(&link, &before, &effects.interrupts);
        delivered += effects.interrupts.len();
        let after = snapshot(&link);
        let mut any_changed = false;
        for p in 0..max_peers {
            let changed = before[usize::from(p)] != after[usize::from(p)];
            any_changed |= changed;
            assert_eq!(
                link.route_generation(p) != generations[usize::from(p)],
                changed,
                "peer {p}: routes {:?} -> {:?}",
                before[usize::from(p)],
                after[usize::from(p)]
            );
            for (vector, route) in after[usize::from(p)].iter().enumerate() {
                if let Route::Msi { message, .. } = route {
                    assert_eq!(link.msi_message(p, vector as u16), Some(*message));
                }
            }
            assert_eq!(link.msix_read(p, MSIX_PBA_OFFSET_IN_BAR.into(), 8), Ok(0));
        }
        assert_eq!(link.link_route_generation() != link_generation, any_changed);
    }
    delivered
}

#[test]
fn random_sequences_keep_routes_and_generations_exact() {
    let delivered: usize = (1..=200u64)
        .map(|seed| run(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 400))
        .sum();
    // The sequences must reach open routes, or the checks above prove little.
    assert!(delivered > 1000, "only {delivered} interrupts went out");
}
