//! Random operation sequences against the device model (deterministic seeds), checking after
//! every step the rules of `ivshmem-v2.md` that must always hold:
//! - an interrupt only ever goes to an attached peer that accepted it just before (interrupts
//!   enabled, or gated by its endpoint), on vector 0, at most once per step;
//! - one-shot delivery leaves the target's `INT_CONTROL` at 0;
//! - a `STATE` write interrupts exactly the other peers that accepted interrupts, and only if
//!   the value changed; a doorbell exactly its target if it accepted;
//! - while anyone is attached, every detached peer's state reads 0;
//! - `ID`, `MAX_PEERS` and `DOORBELL` read what they must.

use hypervisor::device::{
    Interrupt, InterruptGate, InterruptMode, Link, LinkParams, VecStateTable, VENDOR_CAP_OFFSET,
};
use ivshmem_dev::layout::{LayoutParams, SharedMemoryLayout};
use ivshmem_dev::pci::CAP_PRIV_CONTROL;
use ivshmem_dev::regs::{DOORBELL, ID, INT_CONTROL, MAX_PEERS, STATE};
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

fn new_link(max_peers: u16, stale: u32) -> Link {
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
        interrupts: InterruptMode::Intx,
    };
    let table = VecStateTable::from_entries(vec![stale; usize::from(max_peers)]);
    Link::new(params, Box::new(table)).unwrap()
}

fn accepting(link: &Link) -> Vec<bool> {
    (0..link.max_peers())
        .map(|peer| link.deliverable(peer, 0))
        .collect()
}

fn check_interrupts(link: &Link, before: &[bool], interrupts: &[Interrupt]) {
    let mut seen = Vec::new();
    for interrupt in interrupts {
        assert_eq!(interrupt.vector, 0);
        assert!(
            before[usize::from(interrupt.target)],
            "{interrupt:?} went to a peer that did not accept it"
        );
        assert!(link.is_active(interrupt.target));
        assert!(
            !seen.contains(&interrupt.target),
            "one interrupt per target and step"
        );
        seen.push(interrupt.target);
        let device_gated = link.interrupt_gate(interrupt.target) == Some(InterruptGate::Device);
        if device_gated && link.one_shot(interrupt.target) == Some(true) {
            assert_eq!(
                link.int_control(interrupt.target),
                Some(0),
                "one-shot disarms on delivery"
            );
        }
    }
}

fn run(seed: u64, steps: usize) {
    let mut rng = Rng(seed | 1);
    let max_peers = 2 + rng.below(5) as u16;
    let mut link = new_link(max_peers, 0xBAD);
    for peer in 0..max_peers {
        if rng.below(3) == 0 {
            link.set_interrupt_gate(peer, InterruptGate::Endpoint);
        }
    }
    for _ in 0..steps {
        let peer = rng.below(u64::from(max_peers)) as u16;
        let before = accepting(&link);
        let was_active = link.is_active(peer);
        let effects = match rng.below(8) {
            0 => {
                let effects = link.peer_attached(peer);
                assert!(link.is_active(peer));
                assert_eq!(
                    (link.peer_state(peer), link.int_control(peer)),
                    (Some(0), Some(0))
                );
                effects
            }
            1 => {
                let effects = link.peer_detached(peer);
                assert!(!link.is_active(peer) && !link.deliverable(peer, 0));
                assert_eq!(link.peer_state(peer), Some(0));
                effects
            }
            2 if was_active => {
                let value = rng.below(2) as u32;
                link.mmio_write(peer, u64::from(INT_CONTROL), 4, u64::from(value))
                    .unwrap()
            }
            3 => {
                let value = u32::from(rng.below(2) as u8);
                link.config_write(
                    peer,
                    u16::from(VENDOR_CAP_OFFSET + CAP_PRIV_CONTROL),
                    1,
                    value,
                )
                .unwrap();
                Default::default()
            }
            4 | 5 if was_active => {
                let old = link.peer_state(peer).unwrap();
                let value = rng.below(4) as u32;
                let effects = link
                    .mmio_write(peer, u64::from(STATE), 4, u64::from(value))
                    .unwrap();
                let expected: Vec<u16> = if value == old {
                    vec![]
                } else {
                    (0..max_peers)
                        .filter(|&p| p != peer && before[usize::from(p)])
                        .collect()
                };
                assert_eq!(effects.targets().collect::<Vec<_>>(), expected);
                assert_eq!(link.peer_state(peer), Some(value));
                effects
            }
            6 | 7 if was_active => {
                // Targets include absent IDs; vectors include ones INTx does not have.
                let target = rng.below(u64::from(max_peers) + 2) as u16;
                let vector = if rng.below(4) == 0 { 1 } else { 0 };
                let value = Doorbell::new(target, vector).encode();
                let effects = link
                    .mmio_write(peer, u64::from(DOORBELL), 4, u64::from(value))
                    .unwrap();
                let expected =
                    vector == 0 && before.get(usize::from(target)).copied().unwrap_or(false);
                assert_eq!(
                    effects.targets().collect::<Vec<_>>(),
                    if expected { vec![target] } else { vec![] }
                );
                effects
            }
            _ => {
                // Writes from a detached peer are refused and change nothing.
                let states: Vec<_> = (0..max_peers).map(|p| link.peer_state(p)).collect();
                assert!(link.mmio_write(peer, u64::from(STATE), 4, 1).is_err());
                assert_eq!(
                    states,
                    (0..max_peers)
                        .map(|p| link.peer_state(p))
                        .collect::<Vec<_>>()
                );
                Default::default()
            }
        };
        check_interrupts(&link, &before, &effects.interrupts);
        if link.active_peers().next().is_some() {
            for p in (0..max_peers).filter(|&p| !link.is_active(p)) {
                assert_eq!(
                    link.peer_state(p),
                    Some(0),
                    "detached peer {p} must read state 0"
                );
            }
        }
        for p in 0..max_peers {
            assert_eq!(link.mmio_read(p, u64::from(ID), 4), Ok(u32::from(p)));
            assert_eq!(
                link.mmio_read(p, u64::from(MAX_PEERS), 4),
                Ok(u32::from(max_peers))
            );
            assert_eq!(link.mmio_read(p, u64::from(DOORBELL), 4), Ok(0));
            assert!(link.int_control(p).unwrap() <= 1);
        }
    }
}

#[test]
fn random_sequences_keep_the_device_rules() {
    for seed in 1..=300u64 {
        run(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 400);
    }
}
