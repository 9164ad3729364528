//! The read side over peer memory: every `PeerBytes` / `Frame` / `TypedFrame` method with its
//! bounds errors, and a hostile producer thread that rewrites a frame's payload while the
//! consumer reads it through the view (run with debug assertions and overflow checks, the
//! test profile's default, and under Miri by scripts/test-all).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use shmring::layout::{self, OneWayLayout, CONSUMER_PART_SIZE};
use shmring::view::{ones_complement_sum, CHUNK};
use shmring::{Consumer, Error, OutOfBounds, Producer, TypedConsumer, TypedProducer};

/// Test content: byte i is `i * 7 + 3` (mod 256).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

/// RFC 1071 by the book: big-endian 16-bit words, end-around carry, odd byte padded.
fn reference_sum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// One frame of `content` in a fresh ring, peeked; runs `f` on it.
fn with_frame(content: &[u8], f: impl FnOnce(shmring::Frame<'_>)) {
    let capacity = (2 * (content.len() + 8)).next_power_of_two().max(64);
    let (mut tx, mut rx) = shmring::channel(capacity).unwrap();
    let _ = tx.try_send_kind(7, content).unwrap();
    f(rx.peek().unwrap().expect("a frame"));
}

fn oob(offset: usize, len: usize, size: usize) -> OutOfBounds {
    OutOfBounds { offset, len, size }
}

#[test]
fn frame_basics_and_lengths() {
    with_frame(&pattern(10), |frame| {
        assert_eq!(
            (frame.len(), frame.is_empty(), frame.kind()),
            (10, false, 7)
        );
        assert_eq!(frame.to_vec(), pattern(10));
        let payload = frame.payload();
        assert_eq!((payload.len(), payload.is_empty()), (10, false));
        // SAFETY: the producer is this test and does not write the frame.
        assert_eq!(unsafe { frame.as_trusted_slice() }, &pattern(10)[..]);
        assert_eq!(
            unsafe { payload.as_trusted_slice() }.as_ptr(),
            payload.as_ptr()
        );
        frame.release();
    });
    with_frame(&[], |frame| {
        assert!(frame.is_empty() && frame.payload().is_empty());
        let p = frame.payload();
        assert_eq!(p.copy_to(&mut [0u8; 4]), 0);
        assert_eq!(p.read_u8(0), Err(oob(0, 1, 0)));
        assert!(p.eq_slice(&[]) && p.starts_with(&[]) && !p.starts_with(&[0]));
        assert_eq!(p.ones_complement_sum(), 0);
        let mut calls = 0;
        p.try_for_each_chunk::<()>(|_| {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 0, "no chunk for an empty view");
    });
}

#[test]
fn subslice_and_split_at() {
    with_frame(&pattern(100), |frame| {
        let p = frame.payload();
        let sub = p.subslice(10, 20).unwrap();
        assert_eq!(sub.len(), 20);
        assert_eq!(sub.to_vec(), pattern(100)[10..30]);
        assert_eq!(p.subslice(100, 0).unwrap().len(), 0, "empty at the end");
        assert_eq!(p.subslice(90, 11).unwrap_err(), oob(90, 11, 100));
        assert_eq!(p.subslice(101, 0).unwrap_err(), oob(101, 0, 100));
        assert_eq!(
            p.subslice(usize::MAX, 2).unwrap_err(),
            oob(usize::MAX, 2, 100),
            "offset + len overflowing is out of bounds, not a panic"
        );
        let (head, tail) = p.split_at(40).unwrap();
        assert_eq!(head.to_vec(), pattern(100)[..40]);
        assert_eq!(tail.to_vec(), pattern(100)[40..]);
        let (all, none) = p.split_at(100).unwrap();
        assert_eq!((all.len(), none.len()), (100, 0));
        assert_eq!(p.split_at(101).unwrap_err(), oob(0, 101, 100));
        // A sub-view's bounds are its own.
        assert_eq!(sub.read_u8(20), Err(oob(20, 1, 20)));
        assert_eq!(sub.read_u8(19), Ok(pattern(100)[29]));
    });
}

#[test]
fn copy_out_whole_and_range() {
    let content = pattern(3000);
    with_frame(&content, |frame| {
        let p = frame.payload();
        let mut big = vec![0xEEu8; 4000];
        assert_eq!(p.copy_to(&mut big), 3000);
        assert_eq!(big[..3000], content[..]);
        assert!(
            big[3000..].iter().all(|&b| b == 0xEE),
            "nothing beyond the frame"
        );
        let mut small = [0u8; 100];
        assert_eq!(p.copy_to(&mut small), 100, "a short buffer gets a prefix");
        assert_eq!(small[..], content[..100]);

        let mut range = [0u8; 33];
        p.copy_range_to(2967, &mut range).unwrap();
        assert_eq!(range[..], content[2967..]);
        assert_eq!(p.copy_range_to(2968, &mut range), Err(oob(2968, 33, 3000)));
        assert_eq!(
            p.copy_range_to(usize::MAX, &mut range),
            Err(oob(usize::MAX, 33, 3000))
        );
        p.copy_range_to(3000, &mut []).unwrap();
        assert_eq!(p.to_vec(), content);
    });
}

#[test]
fn integer_reads_any_alignment_and_bounds() {
    let content: Vec<u8> = (1..=16).collect();
    with_frame(&content, |frame| {
        let p = frame.payload();
        assert_eq!(p.read_u8(15), Ok(16));
        assert_eq!(p.read_u8(16), Err(oob(16, 1, 16)));
        assert_eq!(p.read_u16_be(1), Ok(0x0203));
        assert_eq!(p.read_u16_le(1), Ok(0x0302));
        assert_eq!(p.read_u16_be(15), Err(oob(15, 2, 16)));
        assert_eq!(p.read_u32_be(3), Ok(0x0405_0607));
        assert_eq!(p.read_u32_le(12), Ok(0x100f_0e0d));
        assert_eq!(p.read_u32_le(13), Err(oob(13, 4, 16)));
        assert_eq!(p.read_u64_be(5), Ok(0x0607_0809_0a0b_0c0d));
        assert_eq!(p.read_u64_le(8), Ok(0x100f_0e0d_0c0b_0a09));
        assert_eq!(p.read_u64_be(9), Err(oob(9, 8, 16)));
        assert_eq!(
            p.read_u64_le(usize::MAX - 3),
            Err(oob(usize::MAX - 3, 8, 16))
        );
        // Any Pod at any offset, native order.
        assert_eq!(p.read::<[u8; 3]>(13), Ok([14, 15, 16]));
        assert_eq!(p.read::<u32>(1), Ok(u32::from_ne_bytes([2, 3, 4, 5])));
        assert_eq!(p.read::<[u32; 4]>(1), Err(oob(1, 16, 16)));
        assert_eq!(p.read::<()>(16), Ok(()), "zero-sized read at the end");
    });
}

#[test]
fn chunks_cover_the_view_in_order_and_stop_on_error() {
    let content = pattern(2 * CHUNK + 5);
    with_frame(&content, |frame| {
        let p = frame.payload();
        let mut seen = Vec::new();
        let mut sizes = Vec::new();
        p.try_for_each_chunk::<()>(|chunk| {
            sizes.push(chunk.len());
            seen.extend_from_slice(chunk);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, content);
        assert_eq!(sizes, [CHUNK, CHUNK, 5]);
        let mut calls = 0;
        let r = p.try_for_each_chunk(|_| {
            calls += 1;
            Err("stop")
        });
        assert_eq!((r, calls), (Err("stop"), 1));
    });
}

#[test]
fn compare_reads_and_answers_exactly() {
    let content = pattern(CHUNK + 10);
    with_frame(&content, |frame| {
        let p = frame.payload();
        assert!(p.eq_slice(&content));
        let mut other = content.clone();
        *other.last_mut().unwrap() ^= 1;
        assert!(
            !p.eq_slice(&other),
            "difference in the last byte of the second chunk"
        );
        assert!(!p.eq_slice(&content[..content.len() - 1]), "shorter");
        assert!(p.starts_with(&content[..CHUNK + 3]));
        assert!(!p.starts_with(&other));
        let mut longer = content.clone();
        longer.push(0);
        assert!(!p.starts_with(&longer) && !p.eq_slice(&longer));
        other[0] ^= 1;
        assert!(!p.starts_with(&other[..1]));
    });
}

#[test]
fn ones_complement_sum_matches_rfc1071() {
    // RFC 1071 section 3's example: the sum of these bytes is 0xddf2.
    let example = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(ones_complement_sum(&example), 0xddf2);
    with_frame(&example, |frame| {
        assert_eq!(frame.payload().ones_complement_sum(), 0xddf2);
    });
    // Lengths around the word and chunk boundaries, odd and even, and all-ones data (carries).
    let lens: &[usize] = if cfg!(miri) {
        &[1, 2, 3, 5, CHUNK + 1]
    } else {
        &[
            1,
            2,
            3,
            4,
            5,
            7,
            9,
            63,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            3 * CHUNK + 7,
            20_000,
        ]
    };
    for &len in lens {
        for content in [pattern(len), vec![0xff; len]] {
            let want = reference_sum(&content);
            assert_eq!(ones_complement_sum(&content), want, "len {len}");
            with_frame(&content, |frame| {
                let p = frame.payload();
                assert_eq!(p.ones_complement_sum(), want, "len {len}");
                // A sub-view at an odd offset sums its own bytes.
                if len > 3 {
                    let sub = p.subslice(1, len - 2).unwrap();
                    assert_eq!(
                        sub.ones_complement_sum(),
                        reference_sum(&content[1..len - 1])
                    );
                }
                let mut dst = vec![0u8; len + 3];
                assert_eq!(p.copy_to_with_sum(&mut dst), (len, want));
                assert_eq!(dst[..len], content[..]);
                let mut short = vec![0u8; len / 2];
                assert_eq!(
                    p.copy_to_with_sum(&mut short),
                    (len / 2, reference_sum(&content[..len / 2])),
                    "a short buffer: the sum of what was copied"
                );
            });
        }
    }
}

#[test]
fn write_to_writes_everything_or_reports_the_error() {
    let content = pattern(40_000);
    with_frame(&content, |frame| {
        let p = frame.payload();
        let mut out = Vec::new();
        p.write_to(&mut out).unwrap();
        assert_eq!(out, content);

        /// Accepts `room` bytes, then fails.
        struct Limited {
            room: usize,
            got: usize,
        }
        impl std::io::Write for Limited {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                if self.room == 0 {
                    return Err(std::io::Error::other("full"));
                }
                let n = buf.len().min(self.room).min(1000);
                self.room -= n;
                self.got += n;
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut w = Limited {
            room: 25_000,
            got: 0,
        };
        let err = p.write_to(&mut w).unwrap_err();
        assert_eq!((err.to_string(), w.got), ("full".to_string(), 25_000));
        let mut w = Limited {
            room: 40_000,
            got: 0,
        };
        p.write_to(&mut w).unwrap();
        assert_eq!(w.got, 40_000, "short writes are continued");
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Sample {
    seq: u64,
    value: u32,
    channel: u16,
    flags: u16,
}

#[test]
fn typed_frames_peek_read_fields_and_release() {
    let (tx, rx) = shmring::channel(4096).unwrap();
    let mut tx = TypedProducer::<Sample>::new(tx).unwrap();
    let mut rx = TypedConsumer::<Sample>::new(rx);
    let sample = Sample {
        seq: 9,
        value: 0xdead_beef,
        channel: 3,
        flags: 1,
    };
    let _ = tx.try_send(&sample).unwrap();
    {
        let record = rx.peek().unwrap().expect("a record");
        assert_eq!(record.read(), sample);
        let value_at = std::mem::offset_of!(Sample, value);
        assert_eq!(record.payload().read::<u32>(value_at), Ok(0xdead_beef));
    } // dropped without release
    let record = rx.peek().unwrap().expect("not released: still there");
    record.release();
    let _ = rx.flush();
    assert!(rx.peek().unwrap().is_none());
    // A frame of the wrong length is Corrupt, and stays.
    let _ = tx.producer().try_send(&[1, 2, 3]).unwrap();
    for _ in 0..2 {
        assert!(matches!(rx.peek(), Err(Error::Corrupt { .. })));
    }
}

#[test]
fn one_way_layout_is_aligned_and_tight() {
    for (capacity, align) in [(64, 64), (4096, 4096), (1 << 20, 4096), (1 << 16, 1 << 21)] {
        let l = OneWayLayout::new(capacity, align).unwrap();
        assert_eq!(l.capacity, capacity);
        assert_eq!(l.producer_offset, 0);
        assert!(l.producer_len >= layout::producer_part_size(capacity));
        assert!(
            l.producer_len - layout::producer_part_size(capacity) < align,
            "tight"
        );
        assert!(l.consumer_len >= CONSUMER_PART_SIZE && l.consumer_len <= align.max(256));
        assert_eq!(l.consumer_offset, l.producer_len);
        assert_eq!(l.total_len, l.consumer_offset + l.consumer_len);
        assert!(l.consumer_offset % align == 0 && l.total_len % align == 0);
    }
    assert_eq!(
        OneWayLayout::new(100, 4096),
        Err(Error::BadCapacity { capacity: 100 })
    );
    for align in [0, 32, 3000] {
        assert_eq!(
            OneWayLayout::new(4096, align),
            Err(Error::Misaligned { align: 64 })
        );
    }
    assert!(
        OneWayLayout::new(1 << 31, 1 << 63).is_err(),
        "overflow is an error"
    );
    // for_region: the largest ring that fits, and nothing when not even the smallest does.
    let smallest = OneWayLayout::new(64, 4096).unwrap();
    let fitted = OneWayLayout::for_region(smallest.total_len, 4096).unwrap();
    assert_eq!(fitted.total_len, smallest.total_len);
    assert_eq!(
        fitted.capacity, 2048,
        "a page holds 192 + 2048 bytes, not 192 + 4096"
    );
    assert_eq!(
        OneWayLayout::for_region(smallest.total_len - 1, 4096),
        Err(Error::RegionTooSmall {
            needed: smallest.total_len,
            got: smallest.total_len - 1
        })
    );
    for region in [8192usize, 100_000, 1 << 20, (1 << 20) + 4095, 3 << 20] {
        let l = OneWayLayout::for_region(region, 4096).unwrap();
        assert!(l.total_len <= region, "{region}: fits");
        let bigger = OneWayLayout::new(l.capacity * 2, 4096).unwrap();
        assert!(
            bigger.total_len > region,
            "{region}: the next capacity does not fit"
        );
    }
    // A ring laid out this way works.
    let l = OneWayLayout::new(4096, 64).unwrap();
    let mut region = vec![Line([0; 64]); l.total_len / 64];
    let base: *mut u8 = region.as_mut_ptr().cast();
    // SAFETY: both parts inside `region`, disjoint, 64-byte aligned, alive for the test.
    let (mut tx, mut rx) = unsafe {
        let own = base.add(l.consumer_offset);
        let cinit = Consumer::init(own, l.consumer_len).unwrap();
        let tx = Producer::new(base, l.producer_len, own, l.consumer_len, l.capacity).unwrap();
        (tx, cinit.attach(base, l.producer_len).unwrap())
    };
    let _ = tx.try_send(b"laid out").unwrap();
    assert!(rx.peek().unwrap().unwrap().payload().eq_slice(b"laid out"));
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// The payload pointer, sent to the hostile thread.
struct PeerPtr(*mut u8);
// SAFETY: the pointee is the ring region, alive until the thread is joined; all accesses are
// atomic byte stores.
unsafe impl Send for PeerPtr {}

const A: u8 = 0xAA;
const B: u8 = 0x55;
const GUARD: u8 = 0x11;

/// A hostile producer thread rewrites every payload byte (A, then B, then A, ...) while the
/// consumer reads the frame through the view again and again. Checked: nothing panics (debug
/// assertions and overflow checks on), every byte read is one the peer wrote to the frame
/// (never one from outside it, which all hold GUARD), every length is the validated one, and
/// each one-pass result is consistent with itself (copy_to_with_sum's sum matches its copy,
/// whatever mix of A and B it caught). Over a `&[u8]` the same reads would be a data race
/// (undefined behaviour), which Miri reports.
#[test]
fn hostile_producer_rewrites_the_payload_while_it_is_read() {
    let len: usize = if cfg!(miri) { 96 } else { 4096 };
    let min_rounds = if cfg!(miri) { 3 } else { 2000 };
    let min_flips = if cfg!(miri) { 2 } else { 50 };
    let capacity = (4 * len).next_power_of_two();
    let l = OneWayLayout::new(capacity, 64).unwrap();
    let mut region = vec![Line([GUARD; 64]); l.total_len / 64];
    let base: *mut u8 = region.as_mut_ptr().cast();
    // SAFETY: both parts inside `region`, disjoint, aligned; `region` outlives both sides and
    // the hostile thread (joined below).
    let (mut tx, mut rx) = unsafe {
        let own = base.add(l.consumer_offset);
        let cinit = Consumer::init(own, l.consumer_len).unwrap();
        let tx = Producer::new(base, l.producer_len, own, l.consumer_len, capacity).unwrap();
        (tx, cinit.attach(base, l.producer_len).unwrap())
    };
    // The data area beyond the frame keeps GUARD bytes (init zeroes it: refill).
    // SAFETY: inside the producer's data area; no other access yet.
    unsafe { std::ptr::write_bytes(base.add(layout::P_DATA), GUARD, capacity) };
    let mut grant = tx.grant(len).unwrap();
    grant.fill(A);
    grant.commit();
    let _ = tx.flush();
    // SAFETY: the first frame's payload starts right after its header at the data area's start.
    let payload = PeerPtr(unsafe { base.add(layout::P_DATA + layout::FRAME_HEADER_LEN) });

    let stop = AtomicBool::new(false);
    let flips = AtomicU64::new(0);
    std::thread::scope(|s| {
        let (stop, flips) = (&stop, &flips);
        s.spawn(move || {
            let payload = payload;
            let mut value = B;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..len {
                    // SAFETY: inside the frame's payload, alive until joined; atomic byte stores.
                    unsafe { AtomicU8::from_ptr(payload.0.add(i)) }.store(value, Ordering::Relaxed);
                }
                value = if value == A { B } else { A };
                flips.fetch_add(1, Ordering::Relaxed);
            }
        });

        let frame = rx.peek().unwrap().expect("the frame");
        let view = frame.payload();
        let ok = |b: u8| b == A || b == B;
        let deadline = Instant::now() + Duration::from_secs(if cfg!(miri) { 3600 } else { 60 });
        let mut copy = vec![0u8; len + 8];
        let mut rounds = 0usize;
        while rounds < min_rounds || flips.load(Ordering::Relaxed) < min_flips {
            assert!(
                Instant::now() < deadline,
                "no progress: the flipping thread is stuck"
            );
            let at = (rounds * 13) % len;
            assert_eq!(view.len(), len);
            assert_eq!(view.copy_to(&mut copy), len);
            assert!(copy[..len].iter().all(|&b| ok(b)) && copy[len..].iter().all(|&b| b == 0));
            copy.fill(0);
            let (n, sum) = view.copy_to_with_sum(&mut copy);
            assert_eq!((n, sum), (len, ones_complement_sum(&copy[..len])));
            let mut part = [0u8; 5];
            match view.copy_range_to(at, &mut part) {
                Ok(()) => assert!(at + 5 <= len && part.iter().all(|&b| ok(b))),
                Err(e) => assert_eq!(e, oob(at, 5, len)),
            }
            assert!(ok(view.read_u8(at).unwrap()));
            assert_eq!(view.read_u8(len), Err(oob(len, 1, len)));
            let word = view.read_u64_le(len - 8).unwrap().to_le_bytes();
            assert!(word.iter().all(|&b| ok(b)));
            assert_eq!(view.read_u32_be(len - 3), Err(oob(len - 3, 4, len)));
            let x = view.read::<[u8; 16]>(len - 16).unwrap();
            assert!(x.iter().all(|&b| ok(b)));
            // Answers depend on the race, but they are answers: no panic, no endless loop.
            let _ = view.eq_slice(&copy[..len]);
            let _ = view.starts_with(&[A; 3]);
            let _ = view.ones_complement_sum();
            let mut bytes = 0;
            view.try_for_each_chunk::<()>(|chunk| {
                assert!(chunk.iter().all(|&b| ok(b)));
                bytes += chunk.len();
                Ok(())
            })
            .unwrap();
            assert_eq!(bytes, len);
            let mut out = Vec::new();
            view.write_to(&mut out).unwrap();
            assert!(out.len() == len && out.iter().all(|&b| ok(b)));
            let (head, tail) = view.split_at(at).unwrap();
            assert_eq!(head.len() + tail.len(), len);
            rounds += 1;
        }
        stop.store(true, Ordering::Relaxed);
        frame.release();
    });
    // The ring is still fine: the next frame goes through.
    let _ = rx.flush();
    let _ = tx.try_send(b"after").unwrap();
    let next = rx.peek().unwrap().expect("next frame");
    assert!(next.payload().eq_slice(b"after"));
}
