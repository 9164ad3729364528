//! Byte-level golden tests of the `ivshmem-net` wire format, written from
//! `/work/shared/ivshmem-net.md` (figures worked out by hand from the formulas there).

mod support;

use ivshmem_link::state::{next, Action, LinkState};
use support::ivnet::{frame, Arena};
use vnet::ivnet::wire::{self, need_event, slot_size, vring_size, Descriptor, UsedElem, Vring};
use vnet::ivnet::{Geometry, GeometryError};

#[test]
fn geometry_of_several_section_sizes() {
    // (section, qlen, vrsize, data area)
    let cases = [
        (0x7F000, 2048, 53_376, 466_816), // Jailhouse's standard net link
        (0x100000, 4096, 106_624, 941_952),
        (0x10000, 256, 6_784, 58_752),
        (0x8000, 128, 3_456, 29_312),
        (0x4000, 64, 1_792, 14_592),
        (14_344, 64, 1_792, 12_552), // 1792 < 14344 / 8 = 1793: just fits
    ];
    for (section, qlen, vrsize, data) in cases {
        let g = Geometry::new(section).unwrap();
        assert_eq!(
            (g.qlen(), g.vrsize(), g.data_len()),
            (qlen, vrsize, data),
            "{section:#x}"
        );
        assert_eq!(g.data_offset(), vrsize);
    }
    assert_eq!(vring_size(2048, 64), 53_318);
    // 1792 is not less than 14336 / 8: no queue of 64 fits.
    assert_eq!(
        Geometry::new(14_336),
        Err(GeometryError::SectionTooSmall { len: 14_336 })
    );
    assert_eq!(
        Geometry::new(0x2000),
        Err(GeometryError::SectionTooSmall { len: 0x2000 })
    );
}

#[test]
fn every_field_at_its_offset_for_qlen_2048() {
    let g = Geometry::new(0x7F000).unwrap();
    assert_eq!(g.desc(0), 0);
    assert_eq!(g.desc(5), 80);
    assert_eq!(g.avail_flags(), 32_768);
    assert_eq!(g.avail_idx(), 32_770);
    assert_eq!(g.avail_ring(0), 32_772);
    assert_eq!(g.avail_ring(3), 32_778);
    assert_eq!(
        g.avail_ring(2048 + 3),
        32_778,
        "free-running index wraps at qlen"
    );
    assert_eq!(g.used_event(), 36_868);
    assert_eq!(g.used_flags(), 36_928, "round_up(32768 + 6 + 4096, 64)");
    assert_eq!(g.used_idx(), 36_930);
    assert_eq!(g.used_ring(0), 36_932);
    assert_eq!(g.used_ring(7), 36_988);
    assert_eq!(g.avail_event(), 53_316);
    assert!(g.avail_event() + 2 <= g.vrsize());
}

#[test]
fn fields_encode_little_endian_at_their_offsets() {
    let g = Geometry::new(0x4000).unwrap(); // qlen 64
    let mut bytes = vec![0u8; g.vrsize()];
    let mut v = Vring::new_checked(&mut bytes[..], g).unwrap();
    let d = Descriptor {
        addr: 0x0102_0304_0506_0708,
        len: 0x1122_3344,
        flags: 0x5566,
        next: 0x7788,
    };
    v.set_descriptor(3, d);
    v.set_avail_idx(0xA1A2);
    v.set_avail_entry(65, 0xB1B2); // slot 1
    v.set_used_event(0xC1C2);
    v.set_used_idx(0xD1D2);
    v.set_used_entry(
        2,
        UsedElem {
            id: 0xE1E2E3E4,
            len: 1,
        },
    );
    v.set_avail_event(0xF1F2);
    assert_eq!(v.descriptor(3), d);
    assert_eq!(v.avail_entry(1), 0xB1B2);
    assert_eq!(
        v.used_entry(66),
        UsedElem {
            id: 0xE1E2E3E4,
            len: 1
        }
    );
    let b = &bytes;
    assert_eq!(
        &b[48..64],
        &[8, 7, 6, 5, 4, 3, 2, 1, 0x44, 0x33, 0x22, 0x11, 0x66, 0x55, 0x88, 0x77]
    );
    // avail at 16 * 64 = 1024: flags, idx, ring[64], used_event at 1024 + 4 + 128.
    assert_eq!(&b[1024..1028], &[0, 0, 0xA2, 0xA1]);
    assert_eq!(&b[1030..1032], &[0xB2, 0xB1]);
    assert_eq!(&b[1156..1158], &[0xC2, 0xC1]);
    // used at round_up(1024 + 6 + 128, 64) = 1216: flags, idx, ring[64] of 8 bytes, avail_event.
    assert_eq!(g.used(), 1216);
    assert_eq!(&b[1216..1220], &[0, 0, 0xD2, 0xD1]);
    assert_eq!(&b[1236..1244], &[0xE4, 0xE3, 0xE2, 0xE1, 1, 0, 0, 0]);
    assert_eq!(&b[1732..1734], &[0xF2, 0xF1]);
    assert!(Vring::new_checked(&bytes[..g.vrsize() - 1], g).is_err());
}

#[test]
fn slot_sizes() {
    assert_eq!(slot_size(0), 64);
    assert_eq!(slot_size(46), 64);
    assert_eq!(slot_size(47), 128);
    assert_eq!(slot_size(60), 128);
    assert_eq!(slot_size(1514), 1536);
    assert_eq!(slot_size(16_398), 16_448);
    assert_eq!(wire::DEFAULT_MAX_FRAME, 16_398);
}

#[test]
fn need_event_in_both_directions() {
    // Fires exactly when `event` lies in [old, new) modulo 2^16.
    assert!(need_event(0, 1, 0));
    assert!(!need_event(1, 1, 0));
    assert!(need_event(6, 7, 6));
    assert!(
        !need_event(5, 7, 6),
        "the event was passed by an earlier publish"
    );
    assert!(need_event(5, 9, 3));
    assert!(need_event(0xFFFF, 1, 0xFFFE), "across the wrap");
    assert!(need_event(0, 1, 0xFFFF));
    assert!(!need_event(2, 1, 0xFFFF));
    for old in [0u16, 100, 0xFFF0] {
        for n in 1..20u16 {
            let new = old.wrapping_add(n);
            for k in 0..40u16 {
                let event = old.wrapping_add(k);
                assert_eq!(
                    need_event(event, new, old),
                    k < n,
                    "old {old} new {new} event {event}"
                );
            }
        }
    }

    // Sender → receiver: the sender rings only when the receiver's avail_event (in the
    // receiver's section) asks; receiver → sender: completions ring only when the sender's
    // used_event (in the sender's section) asks.
    let mut arena = Arena::new(0x4000);
    let g = Geometry::new(0x4000).unwrap();
    let (mut a, mut b) = arena.pair(1514);
    let mut buf = [0u8; 1514];
    let mut send = |q: &mut vnet::ivnet::Queues, seq| {
        frame(seq, 60, &mut buf);
        q.send(60, |f| f.copy_from_slice(&buf[..60]))
            .unwrap()
            .unwrap();
    };
    send(&mut a, 0);
    assert!(a.flush(), "avail_event 0 = old index: first frame rings");
    send(&mut a, 1);
    assert!(!a.flush(), "B has not asked again (avail_event still 0)");
    let mut rx = [0u8; 1514];
    assert_eq!(b.receive(&mut rx).unwrap(), Some(60));
    assert_eq!(b.receive(&mut rx).unwrap(), Some(60));
    assert!(b.flush(), "A's used_event 0: the first completion rings");
    assert_eq!(b.receive(&mut rx).unwrap(), None);
    let (idle, ring) = b.prepare_sleep();
    assert!(idle && !ring);
    assert_eq!(
        arena.peek(1, g.avail_event(), 2),
        [2, 0],
        "B asks for a doorbell at index 2"
    );
    send(&mut a, 2);
    assert!(a.flush(), "B asked");
    // A completes nothing it is waiting for: its used_event stays 0, so B's next completion
    // (1 → ... 3) does not ring.
    assert_eq!(b.receive(&mut rx).unwrap(), Some(60));
    assert!(!b.flush());
}

#[test]
fn used_rings_are_swapped() {
    let mut arena = Arena::new(0x4000);
    let g = Geometry::new(0x4000).unwrap();
    let (mut a, mut b) = arena.pair(1514);
    let mut payload = [0u8; 100];
    frame(7, 100, &mut payload);
    a.send(100, |f| f.copy_from_slice(&payload))
        .unwrap()
        .unwrap();
    a.flush();
    // A's frame and descriptor are in A's section: addr is section-relative.
    let desc = Descriptor::from_bytes(arena.peek(0, g.desc(0), 16).try_into().unwrap());
    assert_eq!(
        desc,
        Descriptor {
            addr: g.vrsize() as u64,
            len: 100,
            flags: 0,
            next: 0
        }
    );
    assert_eq!(arena.peek(0, g.avail_idx(), 2), [1, 0]);
    assert_eq!(arena.peek(0, g.avail_ring(0), 2), [0, 0]);
    assert_eq!(arena.peek(0, g.vrsize(), 100), payload);
    let mut rx = [0u8; 1514];
    assert_eq!(b.receive(&mut rx).unwrap(), Some(100));
    assert_eq!(&rx[..100], &payload);
    b.flush();
    // B's completion is in B's own section; A's used ring stays empty.
    assert_eq!(arena.peek(1, g.used_idx(), 2), [1, 0]);
    assert_eq!(arena.peek(1, g.used_ring(0), 8), [0, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(arena.peek(0, g.used_idx(), 2), [0, 0]);
    assert_eq!(a.outstanding(), 1);
    assert_eq!(a.reclaim().unwrap(), 1);
    assert_eq!(a.outstanding(), 0);
}

#[test]
fn slots_wrap_to_the_start_of_the_data_area() {
    let mut arena = Arena::new(0x4000); // data area 14,592 bytes
    let g = Geometry::new(0x4000).unwrap();
    let (mut a, mut b) = arena.pair(1514);
    let mut rx = [0u8; 1514];
    let mut addrs = Vec::new();
    for seq in 0..12u32 {
        let mut f = [0u8; 1514];
        frame(seq, 1514, &mut f);
        a.send(1514, |s| s.copy_from_slice(&f))
            .unwrap()
            .expect("room");
        addrs.push(
            Descriptor::from_bytes(arena.peek(0, g.desc(seq as u16), 16).try_into().unwrap()).addr,
        );
        a.flush();
        assert_eq!(b.receive(&mut rx).unwrap(), Some(1514));
        assert_eq!(rx[..], f[..]);
        b.flush();
    }
    // Slots of 1536: 9 fit in 14,592 (13,824), the 10th wraps to the start.
    let expect: Vec<u64> = (0..12u64)
        .map(|i| g.vrsize() as u64 + (i % 9) * 1536)
        .collect();
    assert_eq!(addrs, expect);
}

#[test]
fn state_machine_follows_the_contract_table() {
    use LinkState::*;
    // Contract rules (ivshmem-net.md, "Link state machine"), as (own, peer) → new.
    for own in LinkState::ALL {
        for peer in 0..4u32 {
            let step = next(own, peer);
            let expect = match own {
                Reset if peer < 2 => Some(Init),
                Init if peer > 0 => Some(Ready),
                Ready | Run if peer >= 2 => Some(Run),
                Ready | Run if peer == 0 => Some(Reset),
                _ => None,
            };
            match expect {
                Some(new) => assert_eq!(step.state, new, "{own:?}/{peer}"),
                // No rule: stay, except RUN with the peer back in INIT, which the link layer
                // treats as a restart of the peer (documented in ivshmem_link::state).
                None if own == Run && peer == 1 => assert_eq!(step.state, Reset),
                None => assert_eq!(
                    (step.state, step.action),
                    (own, Action::None),
                    "{own:?}/{peer}"
                ),
            }
        }
    }
    assert_eq!(
        next(Init, 1).action,
        Action::SetUpOwn,
        "INIT → READY initialises the section"
    );
    assert_eq!(next(Run, 0).action, Action::TearDown, "carrier off");
}
