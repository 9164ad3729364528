//! Suite `ring`: in-process, two threads pinned to two cores. The floor (a bare cache-line
//! ping-pong), shmring's round trip, streaming 64-byte and 1 KiB messages through shmring and
//! the common Rust SPSC/MPSC queues, and 64 KiB zero-copy grants (and a checksum over them
//! through the sound read view) against a plain memcpy.
//!
//! Every streamed message carries its sequence number in its first 8 bytes and the consumer
//! checks it, so nothing can be optimised away and a lost or reordered message is an error.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;

use shmring::Mode;

use super::measure::{measure, Metric, Settings};
use super::pin::{run_pinned, run_pinned_pair, spin_until};
use super::report::{Comparison, Distribution, Entry, SuiteReport, Target};
use samples::SampleClock;

#[cfg(feature = "iceoryx2")]
mod iceoryx;
pub mod rtt;
pub mod samples;
pub mod xproc;

/// The suite's name.
pub const SUITE: &str = "ring";
/// Ring capacity in bytes for the round-trip and streaming cases, the same for every queue
/// (crossbeam and mpsc get `STREAM_RING_BYTES / message size` slots).
pub const STREAM_RING_BYTES: usize = 64 * 1024;
/// Frame size of the grant case.
pub const GRANT_FRAME: usize = 64 * 1024;
/// Ring capacity of the grant case (room for three 64 KiB frames in flight).
pub const GRANT_RING_BYTES: usize = 256 * 1024;
/// Messages the batched shmring consumer releases between two publishes (at most).
pub const CONSUMER_BATCH: u32 = 32;
/// Frame size of the round-trip case.
pub const RTT_FRAME: usize = 64;

/// A streaming case: queue implementation and message size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// shmring: `try_send` (copy in, publish) / `peek` + check + `release` + `flush`.
    Shmring,
    /// shmring with the consumer batching its publishes: `try_send` per message as above;
    /// `peek` + check + `release` per message, one `flush` per [`CONSUMER_BATCH`] messages
    /// or as soon as the ring is found empty (the batching the ring's API is built for).
    ShmringBatched,
    /// rtrb `RingBuffer<u8>`: `push_entire_slice` (= `write_chunk_uninit(n)` + copy + `commit_all`)
    /// / `read_chunk(n)` + check + `commit_all`.
    Rtrb,
    /// crossbeam-queue `ArrayQueue<[u8; N]>`: `push` / `pop`.
    Crossbeam,
    /// `std::sync::mpsc::sync_channel::<[u8; N]>`: `try_send` / `try_recv`.
    Mpsc,
}

/// The ratios this suite reports.
pub fn comparisons() -> Vec<Comparison> {
    let ratio = |case, baseline, metric, target| Comparison {
        case,
        baseline,
        metric,
        target,
    };
    let mut ratios = vec![
        ratio("shmring", "floor", Metric::RttNs, Some(Target::AtMost(1.5))),
        ratio(
            "shmring-latency-56",
            "floor",
            Metric::RttNs,
            Some(Target::AtMost(1.5)),
        ),
        ratio("shmring-latency-56", "floor-56", Metric::RttNs, None),
        ratio("floor-56", "floor", Metric::RttNs, None),
        ratio("shmring-latency-64", "floor", Metric::RttNs, None),
        ratio(
            "shmring-latency-64",
            "rtrb",
            Metric::RttNs,
            Some(Target::AtMost(1.0)),
        ),
        ratio("shmring-latency-64", "crossbeam", Metric::RttNs, None),
        ratio("shmring", "rtrb", Metric::RttNs, None),
        ratio("shmring-xproc", "shmring-latency-64", Metric::RttNs, None),
        ratio(
            "shmring-64",
            "rtrb-64",
            Metric::MsgPerS,
            Some(Target::AtLeast(1.0)),
        ),
        ratio(
            "shmring-batch-64",
            "rtrb-64",
            Metric::MsgPerS,
            Some(Target::AtLeast(1.0)),
        ),
        ratio("shmring-64", "crossbeam-64", Metric::MsgPerS, None),
        ratio("shmring-64", "mpsc-64", Metric::MsgPerS, None),
        ratio("shmring-1k", "rtrb-1k", Metric::MsgPerS, None),
        ratio("shmring-batch-1k", "rtrb-1k", Metric::MsgPerS, None),
        ratio("shmring-1k", "crossbeam-1k", Metric::MsgPerS, None),
        ratio("shmring-1k", "mpsc-1k", Metric::MsgPerS, None),
        ratio(
            "shmring-grant-64k",
            "memcpy-64k",
            Metric::BytesPerS,
            Some(Target::AtLeast(0.8)),
        ),
        ratio(
            "shmring-view-64k",
            "memcpy-64k",
            Metric::BytesPerS,
            Some(Target::AtLeast(0.8)),
        ),
    ];
    if cfg!(feature = "iceoryx2") {
        ratios.extend([
            ratio(
                "shmring-latency-64",
                "iceoryx2",
                Metric::RttNs,
                Some(Target::AtMost(1.0)),
            ),
            ratio("shmring-xproc", "iceoryx2-xproc", Metric::RttNs, None),
        ]);
    }
    ratios
}

type CaseFn = fn([usize; 2], u64) -> Result<Duration>;

/// Every case of the suite: (case, metric, bytes per iteration, function).
pub fn cases() -> Vec<(&'static str, Metric, u64, CaseFn)> {
    #[cfg_attr(not(feature = "iceoryx2"), allow(unused_mut))]
    let mut cases = vec![
        ("floor", Metric::RttNs, 0, floor_rtt as CaseFn),
        ("floor-56", Metric::RttNs, 0, floor_line_rtt),
        ("shmring", Metric::RttNs, 0, |c, n| {
            rtt::shmring_rtt::<RTT_FRAME>(Mode::Wakeable, c, n)
        }),
        ("shmring-latency-56", Metric::RttNs, 0, |c, n| {
            rtt::shmring_rtt::<56>(Mode::Polling, c, n)
        }),
        ("shmring-latency-64", Metric::RttNs, 0, |c, n| {
            rtt::shmring_rtt::<RTT_FRAME>(Mode::Polling, c, n)
        }),
        ("rtrb", Metric::RttNs, 0, rtt::rtrb_rtt::<RTT_FRAME>),
        (
            "crossbeam",
            Metric::RttNs,
            0,
            rtt::crossbeam_rtt::<RTT_FRAME>,
        ),
        ("shmring-xproc", Metric::RttNs, 0, |c, n| {
            xproc::shmring_xproc_rtt::<RTT_FRAME>(Mode::Polling, c, n)
        }),
        ("shmring-64", Metric::MsgPerS, 0, |c, n| {
            stream::<64>(Queue::Shmring, c, n)
        }),
        ("shmring-batch-64", Metric::MsgPerS, 0, |c, n| {
            stream::<64>(Queue::ShmringBatched, c, n)
        }),
        ("rtrb-64", Metric::MsgPerS, 0, |c, n| {
            stream::<64>(Queue::Rtrb, c, n)
        }),
        ("crossbeam-64", Metric::MsgPerS, 0, |c, n| {
            stream::<64>(Queue::Crossbeam, c, n)
        }),
        ("mpsc-64", Metric::MsgPerS, 0, |c, n| {
            stream::<64>(Queue::Mpsc, c, n)
        }),
        ("shmring-1k", Metric::MsgPerS, 0, |c, n| {
            stream::<1024>(Queue::Shmring, c, n)
        }),
        ("shmring-batch-1k", Metric::MsgPerS, 0, |c, n| {
            stream::<1024>(Queue::ShmringBatched, c, n)
        }),
        ("rtrb-1k", Metric::MsgPerS, 0, |c, n| {
            stream::<1024>(Queue::Rtrb, c, n)
        }),
        ("crossbeam-1k", Metric::MsgPerS, 0, |c, n| {
            stream::<1024>(Queue::Crossbeam, c, n)
        }),
        ("mpsc-1k", Metric::MsgPerS, 0, |c, n| {
            stream::<1024>(Queue::Mpsc, c, n)
        }),
        (
            "shmring-grant-64k",
            Metric::BytesPerS,
            GRANT_FRAME as u64,
            grant_stream,
        ),
        (
            "shmring-view-64k",
            Metric::BytesPerS,
            GRANT_FRAME as u64,
            view_stream,
        ),
        (
            "memcpy-64k",
            Metric::BytesPerS,
            GRANT_FRAME as u64,
            |c, n| memcpy_64k(c[0], n),
        ),
    ];
    #[cfg(feature = "iceoryx2")]
    cases.extend([
        (
            "iceoryx2",
            Metric::RttNs,
            0,
            iceoryx::iceoryx2_rtt::<RTT_FRAME> as CaseFn,
        ),
        (
            "iceoryx2-xproc",
            Metric::RttNs,
            0,
            xproc::iceoryx2_xproc_rtt::<RTT_FRAME>,
        ),
    ]);
    cases
}

/// Runs every case of the suite.
pub fn run(settings: &Settings) -> Result<SuiteReport> {
    let mut report = SuiteReport::new(SUITE);
    let all = cases();
    for (index, (case, metric, bytes, function)) in all.iter().enumerate() {
        settings.say(format_args!("ring/{case} ({}/{})", index + 1, all.len()));
        let measured = measure(settings, case, *metric, *bytes, |iters| {
            function(settings.cpus, iters)
        })
        .with_context(|| format!("case ring/{case}"))?;
        if *metric == Metric::RttNs {
            // One more run of the calibrated length, sampled, for the latency CDF.
            let iters = measured.iters;
            let values = samples::sampled(|| function(settings.cpus, iters))
                .with_context(|| format!("case ring/{case}: sampled run"))?;
            report.distributions.push(Distribution {
                case,
                metric: Metric::RttNs,
                values,
            });
        }
        report.entries.push(Entry::Measured(measured));
    }
    report.comparisons = comparisons();
    report.notes = notes(settings.cpus);
    Ok(report)
}

fn notes(cpus: [usize; 2]) -> Vec<String> {
    vec![
        format!(
            "threads pinned: consumer / pinger (timing side) on CPU {}, producer / ponger on CPU {}; all waits busy-poll",
            cpus[0], cpus[1]
        ),
        "floor: one AtomicU64 on its own cache line, flipped odd/even between the two threads; rtt = time / round trips".into(),
        "floor-56: a 56-byte message and its sequence word in one cache line (payload stored first, the word last with Release), a request line and a reply line: the least a ring that carries signal and data in one line can cost".into(),
        format!("round trips (rtt_ns): a 64-byte message (56 for shmring-latency-56) out through a request queue and back through a reply queue, sequence number checked on both sides. shmring: try_send / try_recv, consumers in Mode::Wakeable (they find frames through the producer index; every publish pays the wake-up handshake's SeqCst fence), {STREAM_RING_BYTES} B rings; shmring-latency-N: the same calls, consumers in Mode::Polling (latency mode: frames found from their own header word, no handshake fences); rtrb: RingBuffer<[u8; 64]> push/pop; crossbeam: ArrayQueue<[u8; 64]> push/pop"),
        "cross-process (rtt_ns): the pinger in this process, the ponger in a forked child pinned to the second CPU. shmring-xproc: two latency-mode shmring rings in one memfd (mapped MAP_SHARED before the fork); iceoryx2-xproc: as iceoryx2, each process with its own node".into(),
        if cfg!(feature = "iceoryx2") {
            "iceoryx2: publish-subscribe over ipc::Service as in iceoryx2's own benchmark (two threads, each with its own node; busy-wait; history 0; subscriber buffer 1; safe overflow), a [u8; 64] written into a loaned sample".into()
        } else {
            "iceoryx2 and iceoryx2-xproc: not built (build ivbench with --features iceoryx2)".into()
        },
        format!("streaming: every queue holds {STREAM_RING_BYTES} B of messages; each message's first 8 bytes are its sequence number, checked by the consumer; every message is published on its own (no batching) except by the shmring-batch consumer"),
        "shmring-N: try_send (copy in + publish) / peek + check + release + flush per message (zero-copy read); shmring-batch-N: the same producer, the consumer publishes once per 32 releases or when it finds the ring empty (every publish pays the wake-up handshake's StoreLoad fence, which rtrb has no need for: it cannot sleep); rtrb-N: RingBuffer<u8>, push_entire_slice (its write_chunk_uninit(N) + copy + commit_all) / read_chunk(N) + check + commit_all; crossbeam-N: ArrayQueue<[u8; N]> push/pop; mpsc-N: sync_channel::<[u8; N]> try_send/try_recv".into(),
        format!("shmring-grant-64k: producer grants 64 KiB, fills it with copy_from_slice from a 64 KiB source (+ seq stamps at both ends), commit + flush; consumer peeks, checks both stamps, releases + flushes; {GRANT_RING_BYTES} B ring"),
        format!("shmring-view-64k: the same producer; the consumer peeks, reads both stamps through the frame's PeerBytes view (volatile reads) and computes the RFC 1071 sum of all 64 KiB through it (each byte read once: SSE2 unaligned loads straight from the frame on x86-64, a 1 KiB stack chunk copy elsewhere), checks the sum, releases + flushes; {GRANT_RING_BYTES} B ring"),
        format!("latency CDF (--plot): one more run of each rtt case at its calibrated length, the timing side recording the mean of every {} round trips", samples::BATCH),
        format!("memcpy-64k: one thread on CPU {}, dst.copy_from_slice(&src) between two 64 KiB heap buffers (one byte of src changed per copy, black_box on dst), bytes/s = copies * 65536 / time", cpus[0]),
    ]
}

/// `iters` round trips of one cache line: the measuring thread writes odd values, the peer
/// answers with the next even value.
pub fn floor_rtt(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let line = CachePadded::new(AtomicU64::new(0));
    let line = &line;
    run_pinned_pair(
        cpus,
        |abort| {
            let mut clock = SampleClock::start(iters);
            let start = Instant::now();
            for i in 0..iters {
                line.store(2 * i + 1, Ordering::Release);
                let want = 2 * i + 2;
                spin_until(abort, || {
                    Ok((line.load(Ordering::Acquire) == want).then_some(()))
                })?;
                clock.tick(i + 1);
            }
            let elapsed = start.elapsed();
            clock.finish();
            Ok(elapsed)
        },
        |abort| {
            for i in 0..iters {
                let want = 2 * i + 1;
                spin_until(abort, || {
                    Ok((line.load(Ordering::Acquire) == want).then_some(()))
                })?;
                line.store(2 * i + 2, Ordering::Release);
            }
            Ok(())
        },
    )
}

/// One 64-byte line of [`floor_line_rtt`]: 56 bytes of message, then the sequence word.
#[repr(C, align(64))]
struct Line {
    payload: [AtomicU64; 7],
    seq: AtomicU64,
}

impl Line {
    fn new() -> Self {
        Line {
            payload: Default::default(),
            seq: AtomicU64::new(0),
        }
    }

    /// Writes 56 bytes of message, then publishes `seq` (Release) in the same line.
    #[inline(always)]
    fn send(&self, message: &[u64; 7], seq: u64) {
        for (word, value) in self.payload.iter().zip(message) {
            word.store(*value, Ordering::Relaxed);
        }
        self.seq.store(seq, Ordering::Release);
    }

    /// Waits for `seq` (Acquire), then copies the 56 bytes out.
    #[inline(always)]
    fn recv(&self, abort: &AtomicBool, seq: u64, message: &mut [u64; 7]) -> Result<()> {
        spin_until(abort, || {
            Ok((self.seq.load(Ordering::Acquire) == seq).then_some(()))
        })?;
        for (value, word) in message.iter_mut().zip(&self.payload) {
            *value = word.load(Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The floor of a one-line frame: `iters` round trips of a 56-byte message that travels in
/// the same cache line as its sequence word (request line, reply line; written payload first,
/// sequence word last). The least a ring that carries signal and data in one line can cost;
/// the experiment behind the latency mode's `shmring-latency-56 / floor-56` ratio.
pub fn floor_line_rtt(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let request = Line::new();
    let reply = Line::new();
    let (request, reply) = (&request, &reply);
    run_pinned_pair(
        cpus,
        |abort| {
            let mut message = [0x5A5A_5A5A_5A5A_5A5Au64; 7];
            let mut clock = SampleClock::start(iters);
            let start = Instant::now();
            for i in 1..=iters {
                message[0] = i;
                request.send(&message, i);
                reply.recv(abort, i, &mut message)?;
                ensure!(message[0] == i, "wrong reply for request {i}");
                clock.tick(i);
            }
            let elapsed = start.elapsed();
            clock.finish();
            Ok(elapsed)
        },
        |abort| {
            let mut message = [0u64; 7];
            for i in 1..=iters {
                request.recv(abort, i, &mut message)?;
                reply.send(&message, i);
            }
            Ok(())
        },
    )
}

/// Sends `frame`, busy-polling while the ring is full.
fn send_spinning(abort: &AtomicBool, producer: &mut shmring::Producer, frame: &[u8]) -> Result<()> {
    spin_until(abort, || match producer.try_send(frame) {
        Ok(_notify) => Ok(Some(())),
        Err(shmring::Error::Full { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    })
}

/// The sequence number in a message's first 8 bytes.
fn seq_of(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(word)
}

/// Streams `iters` messages of `N` bytes from the peer CPU to the measuring CPU through
/// `queue`; returns the consumer's time from the common start to the last message.
pub fn stream<const N: usize>(queue: Queue, cpus: [usize; 2], iters: u64) -> Result<Duration> {
    assert!(N >= 8, "messages carry an 8-byte sequence number");
    match queue {
        Queue::Shmring => stream_shmring::<N>(cpus, iters, 1),
        Queue::ShmringBatched => stream_shmring::<N>(cpus, iters, CONSUMER_BATCH),
        Queue::Rtrb => stream_rtrb::<N>(cpus, iters),
        Queue::Crossbeam => stream_crossbeam::<N>(cpus, iters),
        Queue::Mpsc => stream_mpsc::<N>(cpus, iters),
    }
}

fn message<const N: usize>(seq: u64) -> [u8; N] {
    let mut msg = [0x5Au8; N];
    msg[..8].copy_from_slice(&seq.to_le_bytes());
    msg
}

fn check_seq(got: u64, want: u64) -> Result<()> {
    ensure!(got == want, "message {want} lost or reordered (got {got})");
    Ok(())
}

/// `batch`: the consumer publishes after this many releases, or when it finds the ring empty.
fn stream_shmring<const N: usize>(cpus: [usize; 2], iters: u64, batch: u32) -> Result<Duration> {
    let (mut tx, mut rx) = shmring::channel(STREAM_RING_BYTES)?;
    run_pinned_pair(
        cpus,
        move |abort| {
            let start = Instant::now();
            let mut unpublished = 0u32;
            for seq in 0..iters {
                spin_until(abort, || {
                    let Some(frame) = rx.peek()? else {
                        if unpublished != 0 {
                            // Idle: publish what was released so the producer sees the room.
                            let _notify = rx.flush();
                            unpublished = 0;
                        }
                        return Ok(None);
                    };
                    ensure!(frame.len() == N, "frame {seq} has length {}", frame.len());
                    check_seq(frame.payload().read_u64_le(0)?, seq)?;
                    frame.release();
                    unpublished += 1;
                    if unpublished >= batch {
                        let _notify = rx.flush();
                        unpublished = 0;
                    }
                    Ok(Some(()))
                })?;
            }
            let _notify = rx.flush();
            Ok(start.elapsed())
        },
        move |abort| {
            for seq in 0..iters {
                send_spinning(abort, &mut tx, &message::<N>(seq))?;
            }
            Ok(())
        },
    )
}

fn stream_rtrb<const N: usize>(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let (mut tx, mut rx) = rtrb::RingBuffer::<u8>::new(STREAM_RING_BYTES);
    run_pinned_pair(
        cpus,
        move |abort| {
            let start = Instant::now();
            for seq in 0..iters {
                spin_until(abort, || {
                    let Ok(chunk) = rx.read_chunk(N) else {
                        return Ok(None);
                    };
                    let (first, second) = chunk.as_slices();
                    let got = if first.len() >= 8 {
                        seq_of(first)
                    } else {
                        let mut word = [0u8; 8];
                        word[..first.len()].copy_from_slice(first);
                        word[first.len()..].copy_from_slice(&second[..8 - first.len()]);
                        u64::from_le_bytes(word)
                    };
                    check_seq(got, seq)?;
                    chunk.commit_all();
                    Ok(Some(()))
                })?;
            }
            Ok(start.elapsed())
        },
        move |abort| {
            for seq in 0..iters {
                let msg = message::<N>(seq);
                // push_entire_slice = write_chunk_uninit(N) + copy into both halves + commit_all.
                spin_until(abort, || Ok(tx.push_entire_slice(&msg).ok()))?;
            }
            Ok(())
        },
    )
}

fn stream_crossbeam<const N: usize>(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let queue = ArrayQueue::<[u8; N]>::new(STREAM_RING_BYTES / N);
    let queue = &queue;
    run_pinned_pair(
        cpus,
        |abort| {
            let start = Instant::now();
            for seq in 0..iters {
                let msg = spin_until(abort, || Ok(queue.pop()))?;
                check_seq(seq_of(&msg), seq)?;
            }
            Ok(start.elapsed())
        },
        |abort| {
            for seq in 0..iters {
                let mut msg = Some(message::<N>(seq));
                spin_until(abort, || {
                    match queue.push(msg.take().expect("message present")) {
                        Ok(()) => Ok(Some(())),
                        Err(back) => {
                            msg = Some(back);
                            Ok(None)
                        }
                    }
                })?;
            }
            Ok(())
        },
    )
}

fn stream_mpsc<const N: usize>(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let (tx, rx) = mpsc::sync_channel::<[u8; N]>(STREAM_RING_BYTES / N);
    run_pinned_pair(
        cpus,
        move |abort| {
            let start = Instant::now();
            for seq in 0..iters {
                let msg = spin_until(abort, || match rx.try_recv() {
                    Ok(msg) => Ok(Some(msg)),
                    Err(TryRecvError::Empty) => Ok(None),
                    Err(TryRecvError::Disconnected) => anyhow::bail!("mpsc sender gone"),
                })?;
                check_seq(seq_of(&msg), seq)?;
            }
            Ok(start.elapsed())
        },
        move |abort| {
            for seq in 0..iters {
                let mut msg = Some(message::<N>(seq));
                spin_until(abort, || {
                    match tx.try_send(msg.take().expect("message present")) {
                        Ok(()) => Ok(Some(())),
                        Err(TrySendError::Full(back)) => {
                            msg = Some(back);
                            Ok(None)
                        }
                        Err(TrySendError::Disconnected(_)) => anyhow::bail!("mpsc receiver gone"),
                    }
                })?;
            }
            Ok(())
        },
    )
}

/// Streams `iters` 64 KiB frames through shmring's zero-copy grant path (see the suite notes).
pub fn grant_stream(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    grant_stream_with(cpus, iters, |payload, seq| {
        check_seq(payload.read_u64_le(0)?, seq)?;
        check_seq(payload.read_u64_le(GRANT_FRAME - 8)?, seq)
    })
}

/// As [`grant_stream`], the consumer summing every byte through the view (see the suite notes).
pub fn view_stream(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    // The body (everything but the stamps) is constant: its sum is known in advance.
    let body = shmring::view::ones_complement_sum(&[GRANT_FILL; GRANT_FRAME - 16]);
    grant_stream_with(cpus, iters, move |payload, seq| {
        check_seq(payload.read_u64_le(0)?, seq)?;
        check_seq(payload.read_u64_le(GRANT_FRAME - 8)?, seq)?;
        let stamp = shmring::view::ones_complement_sum(&seq.to_le_bytes());
        // Stamps at both (even) ends: body + 2 x stamp in ones' complement arithmetic.
        let want = ones_complement_add(ones_complement_add(body, stamp), stamp);
        let got = payload.ones_complement_sum();
        ensure!(
            got == want,
            "frame {seq}: sum {got:#06x}, expected {want:#06x}"
        );
        Ok(())
    })
}

fn ones_complement_add(a: u16, b: u16) -> u16 {
    let sum = u32::from(a) + u32::from(b);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// Byte the grant producer fills its frames with (between the two stamps).
const GRANT_FILL: u8 = 0xA5;

/// The 64 KiB grant stream; `consume` checks each frame's payload (through the sound view).
fn grant_stream_with(
    cpus: [usize; 2],
    iters: u64,
    consume: impl Fn(shmring::PeerBytes<'_>, u64) -> Result<()> + Send,
) -> Result<Duration> {
    let (mut tx, mut rx) = shmring::channel(GRANT_RING_BYTES)?;
    run_pinned_pair(
        cpus,
        move |abort| {
            let start = Instant::now();
            for seq in 0..iters {
                spin_until(abort, || {
                    let Some(frame) = rx.peek()? else {
                        return Ok(None);
                    };
                    ensure!(
                        frame.len() == GRANT_FRAME,
                        "frame {seq} has length {}",
                        frame.len()
                    );
                    consume(frame.payload(), seq)?;
                    frame.release();
                    let _notify = rx.flush();
                    Ok(Some(()))
                })?;
            }
            Ok(start.elapsed())
        },
        move |abort| {
            let source = vec![GRANT_FILL; GRANT_FRAME];
            for seq in 0..iters {
                spin_until(abort, || {
                    let mut grant = match tx.grant(GRANT_FRAME) {
                        Ok(grant) => grant,
                        Err(shmring::Error::Full { .. }) => return Ok(None),
                        Err(e) => return Err(e.into()),
                    };
                    grant.copy_from_slice(&source);
                    grant[..8].copy_from_slice(&seq.to_le_bytes());
                    grant[GRANT_FRAME - 8..].copy_from_slice(&seq.to_le_bytes());
                    grant.commit();
                    Ok(Some(()))
                })?;
                let _notify = tx.flush();
            }
            Ok(())
        },
    )
}

/// `iters` copies of 64 KiB between two buffers in one thread pinned to `cpu`
/// (`dst.copy_from_slice(&src)`, one source byte changed per copy so no copy can be skipped).
pub fn memcpy_64k(cpu: usize, iters: u64) -> Result<Duration> {
    run_pinned(cpu, || {
        let mut source = vec![0xA5u8; GRANT_FRAME];
        let mut destination = vec![0u8; GRANT_FRAME];
        let start = Instant::now();
        for i in 0..iters {
            source[0] = i as u8;
            destination.copy_from_slice(black_box(&source));
            black_box(&mut destination);
        }
        let elapsed = start.elapsed();
        ensure!(destination[0] == (iters.wrapping_sub(1)) as u8 || iters == 0);
        Ok(elapsed)
    })
}
