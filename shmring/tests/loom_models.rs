//! Loom models of the ring's synchronisation, run against the crate's real code: under
//! `--cfg loom` the ring's shared words (indices, events, header fields and frame headers) are
//! loom atomics (see `src/sync.rs`), so loom explores the interleavings and weak-memory
//! outcomes the Acquire/Release/SeqCst choices allow.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release -p shmring --test loom_models`
#![cfg(loom)]

use loom::sync::Notify;
use loom::thread;
use std::sync::Arc;

use shmring::{channel, channel_with, Error, Mode};

/// Runs a loom model with at most 8 preemptions per execution (override with
/// `LOOM_MAX_PREEMPTIONS`); all four models together take about 10 s in release.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(8);
    }
    builder.check(f);
}

/// Receives exactly `want` frames by spinning (yielding to loom) and checks their contents.
fn recv_spin(rx: &mut shmring::Consumer, want: &[&[u8]]) {
    let mut buf = [0u8; 32];
    for w in want {
        loop {
            match rx.try_recv(&mut buf).unwrap() {
                Some(r) => {
                    assert_eq!(&buf[..r.len], *w);
                    break;
                }
                None => thread::yield_now(),
            }
        }
    }
}

/// Published frames are visible with the right header (and content) to the consumer; the
/// header word is a loom atomic written Relaxed, so only the index's Release/Acquire makes it
/// visible.
#[test]
fn publish_then_consume_sees_the_data() {
    model(|| {
        let (mut tx, mut rx) = channel(64).unwrap();
        let producer = thread::spawn(move || {
            let _ = tx.try_send(&[1, 2, 3]).unwrap();
            let _ = tx.try_send(&[4; 12]).unwrap();
        });
        recv_spin(&mut rx, &[&[1, 2, 3], &[4; 12]]);
        producer.join().unwrap();
    });
}

/// The third frame does not fit before the end: padding, restart at 0, reuse of space the
/// consumer released (the producer's Acquire of the consumer index orders the reuse).
#[test]
fn wrap_around_with_padding() {
    model(|| {
        let (mut tx, mut rx) = channel(64).unwrap();
        let producer = thread::spawn(move || {
            for frame in [[1u8; 16], [2; 16], [3; 16]] {
                loop {
                    match tx.try_send(&frame) {
                        Ok(_) => break,
                        Err(Error::Full { .. }) => thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
        recv_spin(&mut rx, &[&[1; 16], &[2; 16], &[3; 16]]);
        producer.join().unwrap();
    });
}

/// The consumer sleeps only when it will be woken: it announces, re-checks, and blocks on a
/// doorbell the producer rings only when `flush` says so. A lost wake-up is a loom deadlock.
#[test]
fn sleep_notify_handshake_loses_no_wake_up() {
    model(|| {
        let (mut tx, mut rx) = channel(64).unwrap();
        let doorbell = Arc::new(Notify::new());
        let bell = doorbell.clone();
        let producer = thread::spawn(move || {
            for frame in [&[7u8][..], &[8, 9]] {
                if tx.try_send(frame).unwrap().needed() {
                    bell.notify();
                }
            }
        });
        let mut buf = [0u8; 8];
        let mut got = Vec::new();
        while got.len() < 2 {
            match rx.try_recv(&mut buf).unwrap() {
                Some(r) => got.push(buf[..r.len].to_vec()),
                None => {
                    if rx.prepare_sleep().unwrap() {
                        doorbell.wait();
                    }
                }
            }
        }
        assert_eq!(got, [vec![7], vec![8, 9]]);
        producer.join().unwrap();
    });
}

/// The producer waits for space only when it will be woken: it announces the space it needs,
/// re-checks, and blocks on a doorbell the consumer rings when its flush frees that space.
#[test]
fn wait_for_space_handshake_loses_no_wake_up() {
    model(|| {
        let (mut tx, mut rx) = channel(64).unwrap();
        let doorbell = Arc::new(Notify::new());
        let bell = doorbell.clone();
        let producer = thread::spawn(move || {
            for frame in [[1u8; 24], [2; 24], [3; 24]] {
                loop {
                    match tx.try_send(&frame) {
                        Ok(_) => break,
                        Err(Error::Full { .. }) => {
                            if tx.prepare_wait_for_space(frame.len()).unwrap() {
                                doorbell.wait();
                            }
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
        let mut buf = [0u8; 32];
        let mut n = 0;
        while n < 3 {
            match rx.try_recv(&mut buf).unwrap() {
                Some(r) => {
                    assert_eq!(buf[..r.len], [n as u8 + 1; 24]);
                    n += 1;
                    if r.notify.needed() {
                        bell.notify();
                    }
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
    });
}

/// Latency mode: the polling consumer finds frames from their header words, which the
/// producer publishes with a Release store (the first of a batch in `flush`); the payload and
/// the batch's later headers must be visible once that header is.
#[test]
fn polling_batch_is_seen_whole_and_in_order() {
    model(|| {
        let (mut tx, mut rx) = channel_with(64, Mode::Polling).unwrap();
        let producer = thread::spawn(move || {
            for frame in [&[1u8, 2, 3][..], &[4; 12]] {
                let mut grant = tx.grant(frame.len()).unwrap();
                grant.copy_from_slice(frame);
                grant.commit();
            }
            assert!(!tx.flush().needed());
            let _ = tx.try_send(&[5; 4]).unwrap();
        });
        recv_spin(&mut rx, &[&[1, 2, 3], &[4; 12], &[5; 4]]);
        producer.join().unwrap();
    });
}

/// Latency mode across the end of the area: the empty marker after each frame (never a stale
/// header of the previous lap), padding, restart at 0, and reuse of released space.
#[test]
fn polling_wrap_around_never_reads_a_stale_header() {
    model(|| {
        let (mut tx, mut rx) = channel_with(64, Mode::Polling).unwrap();
        let producer = thread::spawn(move || {
            for frame in [[1u8; 16], [2; 16], [3; 16], [4; 16]] {
                loop {
                    match tx.try_send(&frame) {
                        Ok(_) => break,
                        Err(Error::Full { .. }) => thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
        recv_spin(&mut rx, &[&[1; 16], &[2; 16], &[3; 16], &[4; 16]]);
        producer.join().unwrap();
    });
}
