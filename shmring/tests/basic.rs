//! Single-threaded behaviour of the public API: framing, wrap-around, errors, attach checks,
//! notification decisions, typed messages, reset.

#![allow(unused_must_use)] // most tests here ignore the doorbell decisions on purpose
use shmring::layout::{self, CONSUMER_PART_SIZE, FRAME_HEADER_LEN};
use shmring::{channel, Consumer, Error, Producer, TypedConsumer, TypedProducer};

/// 64-byte aligned heap buffer for raw-constructor tests.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

fn aligned(len: usize) -> Vec<Line> {
    vec![Line([0; 64]); len.div_ceil(64)]
}

fn ptr(buf: &mut [Line]) -> *mut u8 {
    buf.as_mut_ptr().cast()
}

#[test]
fn send_and_receive_in_order() {
    let (mut tx, mut rx) = channel(256).unwrap();
    let mut buf = [0u8; 256];
    assert_eq!(rx.try_recv(&mut buf).unwrap(), None);
    for i in 0..200u32 {
        let msg = i.to_le_bytes();
        tx.try_send(&msg[..(i % 5) as usize]).unwrap();
        let got = rx.try_recv(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..got.len], &msg[..(i % 5) as usize]);
    }
    assert!(rx.is_empty());
}

#[test]
fn limits_and_errors() {
    let (mut tx, mut rx) = channel(64).unwrap();
    assert_eq!(tx.max_frame_len(), 32 - FRAME_HEADER_LEN);
    assert_eq!(
        tx.try_send(&[0; 25]),
        Err(Error::TooLarge { len: 25, max: 24 })
    );
    assert!(matches!(tx.grant(25), Err(Error::TooLarge { .. })));
    tx.try_send(&[1; 24]).unwrap();
    tx.try_send(&[2; 24]).unwrap();
    assert_eq!(
        tx.try_send(&[3; 1]),
        Err(Error::Full {
            free: 0,
            needed: 16
        })
    );
    let mut small = [0u8; 4];
    assert_eq!(
        rx.try_recv(&mut small),
        Err(Error::BufferTooSmall { needed: 24 })
    );
    let mut buf = [0u8; 32];
    assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 24);
    assert_eq!(buf[..24], [1; 24]);
    // Position 32 of 64: a 24-byte frame (32 bytes) fits exactly to the end.
    tx.try_send(&[4; 24]).unwrap();
    assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 24);
    assert_eq!(buf[..24], [2; 24]);
    assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 24);
    assert_eq!(buf[..24], [4; 24]);
    assert_eq!(tx.free_space(), 64);
    assert!(matches!(
        channel(100),
        Err(Error::BadCapacity { capacity: 100 })
    ));
    assert!(matches!(
        channel(32),
        Err(Error::BadCapacity { capacity: 32 })
    ));
}

#[test]
fn padding_is_skipped_and_full_counts_it() {
    let (mut tx, mut rx) = channel(64).unwrap();
    let mut buf = [0u8; 32];
    tx.try_send(&[1; 16]).unwrap(); // 24 bytes at 0
    tx.try_send(&[2; 16]).unwrap(); // 24 bytes at 24, write = 48
    rx.try_recv(&mut buf).unwrap().unwrap(); // cons = 24
                                             // 24 bytes needed, 16 left before the end: padding 16 + 24 = 40 > free 40? free = 64-24 = 40.
    tx.try_send(&[3; 16]).unwrap();
    assert_eq!(
        tx.try_send(&[4; 1]),
        Err(Error::Full {
            free: 0,
            needed: 16
        })
    );
    assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 16);
    assert_eq!(buf[..16], [2; 16]);
    assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 16);
    assert_eq!(buf[..16], [3; 16]);
    assert_eq!(rx.try_recv(&mut buf).unwrap(), None);
}

#[test]
fn grant_commit_flush_batches_and_peek_release() {
    let (mut tx, mut rx) = channel(1024).unwrap();
    for i in 0..5u8 {
        let mut g = tx.grant_kind(u16::from(i) + 100, 10).unwrap();
        g.fill(i);
        g.commit_len(usize::from(i) + 1);
    }
    {
        let _abandoned = tx.grant(8).unwrap();
    }
    assert!(rx.peek().unwrap().is_none(), "nothing visible before flush");
    assert_eq!(tx.pending(), 5 * 16);
    let _ = tx.flush();
    for i in 0..5u8 {
        {
            let f = rx.peek().unwrap().unwrap();
            assert_eq!(f.kind(), u16::from(i) + 100);
            assert!(f.payload().eq_slice(&vec![i; usize::from(i) + 1]));
        } // dropped without release
        let f = rx.peek().unwrap().unwrap();
        assert_eq!(
            f.len(),
            usize::from(i) + 1,
            "dropped frame is returned again"
        );
        f.release();
    }
    assert!(rx.peek().unwrap().is_none());
    assert_eq!(
        tx.free_space(),
        1024 - 80,
        "releases are local until the consumer flushes"
    );
    let _ = rx.flush();
    assert_eq!(tx.free_space(), 1024);
}

#[test]
fn consumer_sleep_handshake_asks_for_exactly_one_notification() {
    let (mut tx, mut rx) = channel(256).unwrap();
    assert!(!tx.try_send(b"a").unwrap().needed(), "nobody sleeps yet");
    assert!(!rx.prepare_sleep().unwrap(), "data is waiting");
    let mut buf = [0u8; 8];
    rx.try_recv(&mut buf).unwrap().unwrap();
    assert!(rx.prepare_sleep().unwrap(), "empty: may sleep");
    assert!(
        tx.try_send(b"b").unwrap().needed(),
        "consumer asked to be woken"
    );
    assert!(!tx.try_send(b"c").unwrap().needed(), "only once");
    assert!(!tx.flush().needed(), "empty flush never notifies");
    rx.try_recv(&mut buf).unwrap().unwrap();
    assert!(!rx.prepare_sleep().unwrap());
    rx.try_recv(&mut buf).unwrap().unwrap();
    assert!(rx.prepare_sleep().unwrap());
    assert!(tx.try_send(b"d").unwrap().needed());
}

#[test]
fn producer_space_handshake() {
    let (mut tx, mut rx) = channel(64).unwrap();
    tx.try_send(&[1; 24]).unwrap();
    tx.try_send(&[2; 24]).unwrap();
    assert!(
        tx.prepare_wait_for_space(0).unwrap(),
        "even an empty frame needs its header"
    );
    assert!(tx.prepare_wait_for_space(8).unwrap(), "full: may wait");
    let mut buf = [0u8; 32];
    let first = rx.try_recv(&mut buf).unwrap().unwrap();
    assert!(
        first.notify.needed(),
        "space the producer asked for is free now"
    );
    let second = rx.try_recv(&mut buf).unwrap().unwrap();
    assert!(!second.notify.needed(), "only once");
    assert!(!tx.prepare_wait_for_space(24).unwrap(), "room now");
    assert!(matches!(
        tx.prepare_wait_for_space(1000),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn raw_two_phase_attach_checks_the_peer() {
    let cap = 256;
    let mut pbuf = aligned(layout::producer_part_size(cap));
    let mut cbuf = aligned(CONSUMER_PART_SIZE);
    let (pp, cp) = (ptr(&mut pbuf), ptr(&mut cbuf));
    let plen = layout::producer_part_size(cap);
    unsafe {
        assert_eq!(
            Producer::init(pp.add(8), plen, cap).unwrap_err(),
            Error::Misaligned { align: 64 }
        );
        assert_eq!(
            Producer::init(pp, plen - 1, cap).unwrap_err(),
            Error::RegionTooSmall {
                needed: plen,
                got: plen - 1
            }
        );
        assert_eq!(
            Producer::init(pp, plen, 96).unwrap_err(),
            Error::BadCapacity { capacity: 96 }
        );
        let pinit = Producer::init(pp, plen, cap).unwrap();
        assert_eq!(
            pinit.attach(cp, CONSUMER_PART_SIZE).unwrap_err(),
            Error::PeerNotReady
        );
        let cinit = Consumer::init(cp, CONSUMER_PART_SIZE).unwrap();
        assert_eq!(
            cinit.attach(pp, plen - 8).unwrap_err(),
            Error::RegionTooSmall {
                needed: plen,
                got: plen - 8
            }
        );
        // A consumer part is not a producer part and vice versa.
        assert!(matches!(
            cinit.attach(cp, plen),
            Err(Error::BadMagic { .. })
        ));
        let mut tx = pinit.attach(cp, CONSUMER_PART_SIZE).unwrap();
        assert_eq!(
            pinit.attach(cp, CONSUMER_PART_SIZE).unwrap_err(),
            Error::AlreadyAttached
        );
        let mut rx = cinit.attach(pp, plen).unwrap();
        assert_eq!(rx.capacity(), cap);
        tx.try_send(b"raw").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 3);

        // Version check: bump the version word of the consumer part.
        let pinit = tx.reset();
        let cinit = rx.reset();
        // (A whole-word atomic store, as a peer process would do it; the version is the first
        // 4 bytes of the word.)
        let word = std::sync::atomic::AtomicU64::from_ptr(cp.add(layout::C_VERSION).cast());
        let mut bytes = word
            .load(std::sync::atomic::Ordering::Relaxed)
            .to_ne_bytes();
        bytes[..4].copy_from_slice(&7u32.to_ne_bytes());
        word.store(
            u64::from_ne_bytes(bytes),
            std::sync::atomic::Ordering::Relaxed,
        );
        assert_eq!(
            pinit.attach(cp, CONSUMER_PART_SIZE).unwrap_err(),
            Error::VersionMismatch {
                found: 7,
                expected: 1
            }
        );
        drop(cinit);
        let cinit = Consumer::init(cp, CONSUMER_PART_SIZE).unwrap();
        let mut tx = pinit.attach(cp, CONSUMER_PART_SIZE).unwrap();
        let mut rx = cinit.attach(pp, plen).unwrap();
        tx.try_send(b"again").unwrap();
        assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 5);
        assert_eq!(&buf[..5], b"again");
    }
}

#[test]
fn reset_after_the_peer_left_restarts_from_zero() {
    let cap = 128;
    let plen = layout::producer_part_size(cap);
    let mut pbuf = aligned(plen);
    let mut cbuf = aligned(CONSUMER_PART_SIZE);
    let (pp, cp) = (ptr(&mut pbuf), ptr(&mut cbuf));
    let mut buf = [0u8; 32];
    unsafe {
        let cinit = Consumer::init(cp, CONSUMER_PART_SIZE).unwrap();
        let mut tx = Producer::new(pp, plen, cp, CONSUMER_PART_SIZE, cap).unwrap();
        let mut rx = cinit.attach(pp, plen).unwrap();
        for _ in 0..10 {
            tx.try_send(&[9; 20]).unwrap();
            rx.try_recv(&mut buf).unwrap().unwrap();
        }
        tx.try_send(&[1; 3]).unwrap(); // left in the ring, dropped by the reset
                                       // The consumer leaves and comes back: both sides reset, then attach again.
        let cinit = rx.reset();
        let pinit = tx.reset();
        let mut tx = pinit.attach(cp, CONSUMER_PART_SIZE).unwrap();
        let mut rx = cinit.attach(pp, plen).unwrap();
        assert_eq!(rx.try_recv(&mut buf).unwrap(), None);
        assert_eq!(tx.free_space(), cap);
        tx.try_send(b"fresh").unwrap();
        assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 5);
        assert_eq!(&buf[..5], b"fresh");
    }
}

#[test]
fn typed_messages() {
    #[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
    #[repr(C)]
    struct Sample {
        seq: u64,
        value: [u32; 3],
        pad: u32,
    }
    let (tx, rx) = channel(256).unwrap();
    let mut tx = TypedProducer::<Sample>::new(tx).unwrap();
    let mut rx = TypedConsumer::<Sample>::new(rx);
    for seq in 0..100 {
        let s = Sample {
            seq,
            value: [seq as u32; 3],
            pad: 0,
        };
        tx.try_send(&s).unwrap();
        assert_eq!(rx.try_recv().unwrap().unwrap().value, s);
    }
    assert!(rx.try_recv().unwrap().is_none());
    // A frame of the wrong length is Corrupt for the typed consumer.
    let mut raw = tx.into_inner();
    raw.try_send(&[0; 3]).unwrap();
    assert!(matches!(rx.try_recv(), Err(Error::Corrupt { .. })));
    let (tx, _rx) = channel(64).unwrap();
    assert!(matches!(
        TypedProducer::<[u64; 4]>::new(tx),
        Err(Error::TooLarge { len: 32, max: 24 })
    ));
}

#[test]
fn sides_are_send_and_notify_combines() {
    fn assert_send<T: Send>() {}
    assert_send::<Producer>();
    assert_send::<Consumer>();
    assert_send::<shmring::ProducerInit>();
    assert_send::<shmring::ConsumerInit>();
    use shmring::Notify;
    assert!(!Notify::NONE.needed());
    assert!(!(Notify::NONE | Notify::NONE).needed());
    let (mut tx, mut rx) = channel(64).unwrap();
    assert!(rx.prepare_sleep().unwrap());
    let woken = tx.try_send(b"x").unwrap();
    assert!((Notify::NONE | woken).needed());
    let mut all = Notify::NONE;
    all |= woken;
    assert!(all.needed());
}
