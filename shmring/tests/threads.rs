//! Producer and consumer on two threads: the real protocol under concurrency (and under Miri's
//! data-race detector): streaming with spin/yield, and both doorbell handshakes with real
//! blocking waits (a lost wake-up shows as a hang, caught by a watchdog timeout natively and as
//! a deadlock under Miri).

use std::sync::mpsc;
use std::thread;

use shmring::{channel, Error, TypedConsumer, TypedProducer};

const FRAMES: u64 = if cfg!(miri) { 300 } else { 200_000 };

/// Deterministic frame content for sequence number `seq`.
fn frame(seq: u64, out: &mut Vec<u8>) {
    let len = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize + 8; // 8..=71
    out.clear();
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend((8..len).map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8)));
}

#[test]
fn streaming_spin_keeps_order_and_content() {
    let (mut tx, mut rx) = channel(512).unwrap();
    let producer = thread::spawn(move || {
        let mut buf = Vec::new();
        let mut seq = 0;
        while seq < FRAMES {
            frame(seq, &mut buf);
            // Zero-copy batches of up to 4 frames, one flush each.
            let mut batch = 0;
            while batch < 4 && seq < FRAMES {
                frame(seq, &mut buf);
                match tx.grant(buf.len()) {
                    Ok(mut g) => {
                        g.copy_from_slice(&buf);
                        g.commit();
                        seq += 1;
                        batch += 1;
                    }
                    Err(Error::Full { .. }) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            let _ = tx.flush();
            if batch == 0 {
                thread::yield_now();
            }
        }
    });
    let mut want = Vec::new();
    let mut seq = 0;
    while seq < FRAMES {
        match rx.peek().unwrap() {
            Some(f) => {
                frame(seq, &mut want);
                assert_eq!(f.to_vec(), want, "frame {seq}");
                f.release();
                seq += 1;
                if seq % 3 == 0 {
                    let _ = rx.flush();
                }
            }
            None => {
                let _ = rx.flush();
                thread::yield_now();
            }
        }
    }
    producer.join().unwrap();
    assert!(rx.peek().unwrap().is_none());
}

/// A doorbell: a channel of rings. A watchdog turns a lost wake-up into a failure natively.
fn wait(bell: &mpsc::Receiver<()>) {
    if cfg!(miri) {
        bell.recv().expect("peer gone");
    } else {
        bell.recv_timeout(std::time::Duration::from_secs(60))
            .expect("lost wake-up: nobody rang within 60 s");
    }
}

#[test]
fn doorbell_handshakes_never_lose_a_wake_up() {
    let (mut tx, mut rx) = channel(256).unwrap();
    let (data_bell_tx, data_bell) = mpsc::channel::<()>();
    let (space_bell_tx, space_bell) = mpsc::channel::<()>();
    let frames = if cfg!(miri) { 200 } else { 100_000 };
    let producer = thread::spawn(move || {
        let mut rings = 0u64;
        let mut waits = 0u64;
        let mut buf = Vec::new();
        for seq in 0..frames {
            frame(seq, &mut buf);
            loop {
                match tx.try_send(&buf) {
                    Ok(n) => {
                        if n.needed() {
                            rings += 1;
                            data_bell_tx.send(()).unwrap();
                        }
                        break;
                    }
                    Err(Error::Full { .. }) => {
                        waits += 1;
                        if tx.prepare_wait_for_space(buf.len()).unwrap() {
                            wait(&space_bell);
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        (rings, waits)
    });
    let mut want = Vec::new();
    let mut got = vec![0u8; 128];
    let mut seq = 0;
    let mut sleeps = 0u64;
    let mut announces = 0u64;
    let mut space_rings = 0u64;
    while seq < frames {
        match rx.try_recv(&mut got).unwrap() {
            Some(r) => {
                frame(seq, &mut want);
                assert_eq!(&got[..r.len], &want[..], "frame {seq}");
                seq += 1;
                if r.notify.needed() {
                    space_rings += 1;
                    space_bell_tx.send(()).unwrap();
                }
            }
            None => {
                announces += 1;
                if rx.prepare_sleep().unwrap() {
                    sleeps += 1;
                    wait(&data_bell);
                }
            }
        }
    }
    let (rings, waits) = producer.join().unwrap();
    // The producer rings only for announced sleeps, never once per message.
    assert!(
        rings <= announces,
        "{rings} doorbells for {announces} announcements"
    );
    assert!(sleeps <= announces);
    assert!(
        space_rings <= waits,
        "{space_rings} space doorbells for {waits} waits"
    );
    assert!(
        rings < frames / 2 || cfg!(miri),
        "notification per message: {rings} of {frames}"
    );
}

#[test]
fn typed_messages_across_threads() {
    let (tx, rx) = channel(1024).unwrap();
    let mut tx = TypedProducer::<[u64; 2]>::new(tx).unwrap();
    let mut rx = TypedConsumer::<[u64; 2]>::new(rx);
    let n = if cfg!(miri) { 200 } else { 100_000 };
    let producer = thread::spawn(move || {
        let mut i = 0;
        while i < n {
            match tx.try_send(&[i, !i]) {
                Ok(_) => i += 1,
                Err(Error::Full { .. }) => thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
    });
    let mut i = 0;
    while i < n {
        match rx.try_recv().unwrap() {
            Some(received) => {
                assert_eq!(received.value, [i, !i]);
                i += 1;
            }
            None => thread::yield_now(),
        }
    }
    producer.join().unwrap();
}
