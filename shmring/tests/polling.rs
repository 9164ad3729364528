//! Latency mode: a polling consumer finds frames from their headers (see the crate docs).

use shmring::{channel_with, layout, Error, Mode};

#[test]
fn frames_arrive_in_order_through_many_wraps_with_mixed_sizes() {
    let (mut tx, mut rx) = channel_with(256, Mode::Polling).unwrap();
    assert!(tx.consumer_polls());
    assert_eq!(rx.mode(), Mode::Polling);
    let mut buf = [0u8; 128];
    assert!(rx.try_recv(&mut buf).unwrap().is_none(), "empty at start");
    for seq in 0..2000u32 {
        let len = (seq as usize * 7) % 100;
        let frame: Vec<u8> = (0..len).map(|i| (seq as usize + i) as u8).collect();
        assert!(!tx.try_send(&frame).unwrap().needed(), "never a doorbell");
        let got = rx.try_recv(&mut buf).unwrap().expect("frame");
        assert_eq!(&buf[..got.len], &frame[..], "frame {seq}");
        assert!(!got.notify.needed());
        assert!(
            rx.try_recv(&mut buf).unwrap().is_none(),
            "after frame {seq}"
        );
    }
}

#[test]
fn a_batch_is_invisible_until_flush_then_whole() {
    let (mut tx, mut rx) = channel_with(1024, Mode::Polling).unwrap();
    for word in [&b"zero"[..], b"copy", b"batch"] {
        let mut grant = tx.grant(word.len()).unwrap();
        grant.copy_from_slice(word);
        grant.commit();
    }
    assert!(rx.peek().unwrap().is_none(), "not visible before flush");
    assert!(!tx.flush().needed());
    for word in [&b"zero"[..], b"copy", b"batch"] {
        let frame = rx.peek().unwrap().expect("published");
        assert!(frame.payload().eq_slice(word));
        frame.release();
    }
    assert!(rx.peek().unwrap().is_none());
    let _ = rx.flush();
}

#[test]
fn the_ring_keeps_one_word_free_and_never_sleeps() {
    let (mut tx, mut rx) = channel_with(64, Mode::Polling).unwrap();
    // 64-byte area, 8 bytes kept for the empty marker: 56 bytes of frames.
    let _ = tx.try_send(&[1; 16]).unwrap(); // 24
    let _ = tx.try_send(&[2; 16]).unwrap(); // 48
    assert!(matches!(tx.try_send(&[3; 8]), Err(Error::Full { .. })));
    assert!(
        !tx.prepare_wait_for_space(8).unwrap(),
        "a polling ring never sleeps"
    );
    assert!(
        !rx.prepare_sleep().unwrap(),
        "a polling consumer never sleeps"
    );
    let mut buf = [0u8; 32];
    assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 16);
    // Ends exactly at the end of the area: the empty marker goes to offset 0.
    let _ = tx.try_send(&[3; 8]).unwrap();
    assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 16);
    assert_eq!(buf[0], 2);
    assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 8);
    assert_eq!(buf[0], 3);
    assert!(
        rx.try_recv(&mut buf).unwrap().is_none(),
        "marker at offset 0"
    );
    let _ = tx.try_send(&[4; 16]).unwrap();
    assert_eq!(rx.try_recv(&mut buf).unwrap().unwrap().len, 16);
    assert_eq!(buf[0], 4);
    assert!(rx.try_recv(&mut buf).unwrap().is_none());
    assert_eq!(rx.available(), 0);
}

#[test]
fn an_index_mode_pair_is_unchanged() {
    let (mut tx, _rx) = channel_with(64, Mode::Wakeable).unwrap();
    assert!(!tx.consumer_polls());
    // The whole area is usable without a polling consumer.
    for _ in 0..4 {
        let _ = tx.try_send(&[0; 8]).unwrap();
    }
    assert_eq!(tx.free_space(), 0);
    assert_eq!(
        layout::EMPTY_HEADER.to_ne_bytes()[6..],
        0x8000u16.to_ne_bytes()
    );
}
