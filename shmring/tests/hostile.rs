//! Hostile peer: arbitrary writes into the peer-owned part between the victim's operations,
//! for a victim consumer and a victim producer (scenario in `support/hostile.rs`, shared with
//! the `hostile_peer` fuzz target). Never a panic, only `Ok` or the expected errors
//! (`Corrupt` among them), no slice outside the data area, guard bytes around both parts intact.

mod support;

use proptest::prelude::*;

fn config() -> ProptestConfig {
    let default_cases = if cfg!(miri) { 8 } else { 512 };
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut config = ProptestConfig::with_cases(cases.unwrap_or(default_cases));
    if cfg!(miri) {
        config.failure_persistence = None;
    }
    config
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn victim_survives_a_hostile_peer(
        script in proptest::collection::vec(any::<u8>(), if cfg!(miri) { 1..300 } else { 1..3000 }),
    ) {
        if let Err(violation) = support::hostile::run(&script) {
            return Err(TestCaseError::fail(violation));
        }
    }
}

/// The scenario reaches both outcomes for both victims: frames get through and corruption is
/// detected (so the proptest above is not vacuous).
#[test]
#[cfg_attr(miri, ignore = "a coverage check of the scenario, too slow under Miri")]
fn scenario_reaches_frames_and_corruption_for_both_victims() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    };
    let runs = 200;
    // Victim consumer / producer (bit 2), index mode / latency mode (bit 3).
    for victim_bits in [0u8, 4, 8, 12] {
        let mut total = support::hostile::Stats::default();
        for _ in 0..runs {
            let mut script: Vec<u8> = (0..600).map(|_| next()).collect();
            script[0] = (script[0] & !12) | victim_bits;
            let stats = support::hostile::run(&script).expect("no violation");
            total.corrupt += stats.corrupt;
            total.frames += stats.frames;
        }
        assert!(
            total.frames > 0,
            "victim {victim_bits}: no frame ever got through: {total:?}"
        );
        assert!(
            total.corrupt > 0,
            "victim {victim_bits}: corruption never detected: {total:?}"
        );
    }
}

mod direct {
    //! Each kind of peer misbehaviour, one at a time, is reported as `Corrupt`.
    use shmring::layout::{self, FrameHeader, CONSUMER_PART_SIZE, FLAG_PADDING};
    use shmring::{Consumer, Error, Producer};
    use std::sync::atomic::{AtomicU64, Ordering};

    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    struct Line([u8; 64]);

    struct Pair {
        _mem: Vec<Line>,
        pp: *mut u8,
        cp: *mut u8,
        tx: Producer,
        rx: Consumer,
    }

    const CAP: usize = 64;

    fn pair() -> Pair {
        let plen = layout::producer_part_size(CAP);
        let mut mem = vec![Line([0; 64]); (plen + CONSUMER_PART_SIZE) / 64];
        let pp: *mut u8 = mem.as_mut_ptr().cast();
        // SAFETY: disjoint parts of `mem`, which lives as long as the pair.
        unsafe {
            let cp = pp.add(plen);
            let cinit = Consumer::init(cp, CONSUMER_PART_SIZE).unwrap();
            let tx = Producer::new(pp, plen, cp, CONSUMER_PART_SIZE, CAP).unwrap();
            let rx = cinit.attach(pp, plen).unwrap();
            Pair {
                _mem: mem,
                pp,
                cp,
                tx,
                rx,
            }
        }
    }

    fn set(base: *mut u8, off: usize, value: u64) {
        // SAFETY: aligned word inside the pair's memory.
        unsafe { AtomicU64::from_ptr(base.add(off).cast()) }.store(value, Ordering::Relaxed);
    }

    fn header(len: u32, flags: u16) -> u64 {
        FrameHeader {
            len,
            kind: 0,
            flags,
        }
        .to_word()
    }

    fn corrupt<T: std::fmt::Debug>(r: Result<T, Error>) {
        assert!(
            matches!(r, Err(Error::Corrupt { .. })),
            "expected Corrupt, got {r:?}"
        );
    }

    #[test]
    fn producer_index_beyond_one_capacity() {
        let mut p = pair();
        set(p.pp, layout::P_INDEX, CAP as u64 + 8);
        corrupt(p.rx.peek().map(|f| f.is_some()));
        let mut buf = [0u8; 64];
        corrupt(p.rx.try_recv(&mut buf));
        // Restored: the ring works again.
        set(p.pp, layout::P_INDEX, 0);
        let _ = p.tx.try_send(b"ok").unwrap();
        assert_eq!(p.rx.try_recv(&mut buf).unwrap().unwrap().len, 2);
    }

    #[test]
    fn producer_index_going_back_or_unaligned() {
        let mut p = pair();
        let _ = p.tx.try_send(&[1; 8]).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(p.rx.try_recv(&mut buf).unwrap().unwrap().len, 8);
        set(p.pp, layout::P_INDEX, 8);
        corrupt(p.rx.peek().map(|f| f.is_some()));
        set(p.pp, layout::P_INDEX, 20);
        corrupt(p.rx.peek().map(|f| f.is_some()));
    }

    #[test]
    fn frame_length_beyond_published_data_or_area() {
        let mut p = pair();
        let _ = p.tx.try_send(&[1; 8]).unwrap(); // 16 bytes published
        set(p.pp, layout::P_DATA, header(9, 0)); // would need 24
        corrupt(p.rx.peek().map(|f| f.is_some()));
        set(p.pp, layout::P_DATA, header(u32::MAX, 0));
        corrupt(p.rx.peek().map(|f| f.is_some()));
        // Larger than any frame a producer may send (half the area), though published.
        set(p.pp, layout::P_INDEX, CAP as u64);
        set(p.pp, layout::P_DATA, header(CAP as u32 - 8, 0));
        corrupt(p.rx.peek().map(|f| f.is_some()));
    }

    #[test]
    fn bad_flags_and_padding() {
        let mut p = pair();
        let _ = p.tx.try_send(&[1; 8]).unwrap();
        set(p.pp, layout::P_DATA, header(8, 2));
        corrupt(p.rx.peek().map(|f| f.is_some()));
        // Padding at offset 0 (a producer never pads there).
        set(p.pp, layout::P_DATA, header(CAP as u32 - 8, FLAG_PADDING));
        corrupt(p.rx.peek().map(|f| f.is_some()));
        // Padding at 16 that does not reach the end.
        let mut p = pair();
        let _ = p.tx.try_send(&[1; 8]).unwrap();
        let _ = p.tx.try_send(&[2; 8]).unwrap();
        let mut buf = [0u8; 64];
        p.rx.try_recv(&mut buf).unwrap().unwrap();
        set(p.pp, layout::P_DATA + 16, header(8, FLAG_PADDING));
        corrupt(p.rx.peek().map(|f| f.is_some()));
        // Padding to the end but beyond the published data.
        set(
            p.pp,
            layout::P_DATA + 16,
            header(CAP as u32 - 24, FLAG_PADDING),
        );
        corrupt(p.rx.peek().map(|f| f.is_some()));
    }

    #[test]
    fn consumer_index_beyond_published_or_going_back() {
        let mut p = pair();
        for _ in 0..3 {
            let _ = p.tx.try_send(&[1; 8]).unwrap(); // 48 of 64 bytes used
        }
        set(p.cp, layout::C_INDEX, 56); // beyond the 48 published
        corrupt(p.tx.try_send(&[2; 16]));
        corrupt(p.tx.grant(16).map(|g| g.len()));
        let mut p = pair();
        for _ in 0..3 {
            let _ = p.tx.try_send(&[1; 8]).unwrap();
        }
        set(p.cp, layout::C_INDEX, 32);
        assert!(p.tx.try_send(&[2; 16]).is_ok(), "a valid index frees space");
        set(p.cp, layout::C_INDEX, 16); // goes back
        corrupt(p.tx.try_send(&[2; 16]));
        let mut p = pair();
        for _ in 0..3 {
            let _ = p.tx.try_send(&[1; 8]).unwrap();
        }
        set(p.cp, layout::C_INDEX, 20); // not a frame boundary
        corrupt(p.tx.try_send(&[2; 16]));
    }

    #[test]
    fn magic_version_and_capacity_are_checked_at_attach() {
        let p = pair();
        let plen = layout::producer_part_size(CAP);
        // SAFETY (all attaches): the pair's memory is alive; the parts are re-initialised.
        unsafe {
            let cinit = Consumer::init(p.cp, CONSUMER_PART_SIZE).unwrap();
            set(p.pp, layout::P_CAPACITY, 96);
            assert_eq!(
                cinit.attach(p.pp, plen).unwrap_err(),
                Error::BadCapacity { capacity: 96 }
            );
            set(p.pp, layout::P_CAPACITY, 1 << 40);
            assert!(matches!(
                cinit.attach(p.pp, plen),
                Err(Error::BadCapacity { .. })
            ));
            set(p.pp, layout::P_CAPACITY, 128); // bigger than the region given
            assert!(matches!(
                cinit.attach(p.pp, plen),
                Err(Error::RegionTooSmall { .. })
            ));
            set(p.pp, layout::P_MAGIC, 0);
            assert_eq!(cinit.attach(p.pp, plen).unwrap_err(), Error::PeerNotReady);
            set(p.pp, layout::P_MAGIC, 0x1234);
            assert_eq!(
                cinit.attach(p.pp, plen).unwrap_err(),
                Error::BadMagic { found: 0x1234 }
            );
        }
    }
}
