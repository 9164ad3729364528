//! Main demo: a producer thread streams sequence-numbered, checksummed frames of varying sizes
//! through a shmring channel to a consumer thread, which verifies order, length and checksum of
//! every frame and measures one-way latency from a timestamp inside each frame.
//!
//! ```text
//! cargo run --release --example ring_stream                       # 5 s, frames of 24..=2048 bytes
//! cargo run --release --example ring_stream -- --seconds 10 --size 9000 --mode spin
//! ```
//!
//! The producer writes each frame straight into the ring (`grant`, zero-copy) and publishes it
//! (`flush`); the consumer reads it in place (`peek`) and frees it (`release` + `flush`).
//! `--mode park` (default) uses the ring's notification path: an idle consumer announces
//! `prepare_sleep` and parks, a producer facing a full ring announces `prepare_wait_for_space`
//! and parks, and whichever side's publish returns `Notify::needed()` unparks the other (the
//! in-process stand-in for ringing an ivshmem doorbell). `--mode spin` busy-polls instead.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Barrier, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use hypervisor::config::human_size;
use ivshmem_stack::bench::pin;

/// Frame header: seq u64, send timestamp (ns since start) u64, payload length u32, CRC-32 of
/// the payload u32; all little-endian.
const HEADER_LEN: usize = 24;
/// Polls before an idle side in park mode announces it wants to sleep.
const SPIN_BEFORE_PARK: u32 = 256;

#[derive(Debug, Parser)]
#[command(about = "Stream verified frames between two threads through a shmring channel")]
struct Args {
    /// How long the producer sends.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Largest frame in bytes (header included); sizes vary from 24 up to this.
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Ring capacity in bytes: a power of two from 64 to 2 GiB.
    #[arg(long, default_value_t = 64 * 1024, value_parser = parse_capacity)]
    capacity: usize,
    /// How an idle side waits.
    #[arg(long, value_enum, default_value_t = Mode::Park)]
    mode: Mode,
    /// Pin producer and consumer to these CPUs (consumer first), e.g. 0,1; default: the first
    /// two CPUs available, or no pinning with only one.
    #[arg(long, value_name = "A,B", value_parser = parse_cpus)]
    cpus: Option<[usize; 2]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Notification path: prepare_sleep / prepare_wait_for_space, then park until unparked.
    Park,
    /// Busy polling.
    Spin,
}

/// A ring capacity: a power of two within shmring's limits, refused with the nearest valid
/// values otherwise.
fn parse_capacity(text: &str) -> Result<usize, String> {
    use shmring::layout::{MAX_CAPACITY, MIN_CAPACITY};
    let capacity: usize = text
        .parse()
        .map_err(|e| format!("`{text}` is not a byte count: {e}"))?;
    if capacity.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
        return Ok(capacity);
    }
    let range = format!("a power of two from {MIN_CAPACITY} to {MAX_CAPACITY} bytes");
    if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
        return Err(format!("{capacity} is out of range: it must be {range}"));
    }
    let below = 1usize << capacity.ilog2();
    Err(format!(
        "{capacity} is not a power of two: it must be {range}, e.g. {below} or {}",
        below * 2
    ))
}

fn parse_cpus(text: &str) -> Result<[usize; 2], String> {
    pin::parse_cpu_pair(text).map_err(|e| format!("{e:#}"))
}

/// Counters the consumer publishes for the live progress line.
#[derive(Default)]
struct Live {
    frames: AtomicU64,
    bytes: AtomicU64,
    max_latency_ns: AtomicU64,
}

/// What both threads share.
struct Shared {
    start: Barrier,
    producer: OnceLock<Thread>,
    consumer: OnceLock<Thread>,
    /// Set by the producer after its last publish; `sent` is valid then.
    done: AtomicBool,
    sent: AtomicU64,
    /// Set when either side fails, so the other stops waiting.
    failed: AtomicBool,
    live: Live,
}

#[derive(Debug)]
struct Summary {
    frames: u64,
    bytes: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
    producer_parks: u64,
    producer_waited: u64,
    consumer_parks: u64,
}

/// Deterministic frame length for `seq` in `HEADER_LEN..=max` (xorshift of the sequence number).
fn frame_len(seq: u64, max: usize) -> usize {
    let mut x = seq.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    HEADER_LEN + (x % (max - HEADER_LEN + 1) as u64) as usize
}

/// A pseudo-random pattern the payloads are cut from (offset varies with the sequence number).
fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn producer(
    mut tx: shmring::Producer,
    args: &Args,
    shared: &Shared,
    epoch: Instant,
    source: &[u8],
) -> Result<ProducerStats> {
    let run_for = Duration::from_secs_f64(args.seconds);
    let mut parks = 0;
    let mut waited = 0;
    let mut seq = 0u64;
    'frames: loop {
        let now = epoch.elapsed();
        if now >= run_for || shared.failed.load(Ordering::Relaxed) {
            break;
        }
        let len = frame_len(seq, args.size);
        let payload_len = len - HEADER_LEN;
        let offset = (seq as usize * 61) % (source.len() - payload_len + 1);
        let payload = &source[offset..offset + payload_len];
        let mut polls = 0u32;
        loop {
            match tx.grant(len) {
                Ok(mut grant) => {
                    grant[0..8].copy_from_slice(&seq.to_le_bytes());
                    grant[16..20].copy_from_slice(&(payload_len as u32).to_le_bytes());
                    grant[20..24].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
                    grant[HEADER_LEN..].copy_from_slice(payload);
                    // Timestamp last, right before publishing: latency covers the ring, not
                    // the filling.
                    let sent_at = epoch.elapsed().as_nanos() as u64;
                    grant[8..16].copy_from_slice(&sent_at.to_le_bytes());
                    grant.commit();
                    break;
                }
                Err(shmring::Error::Full { .. }) => {}
                Err(e) => return Err(e).context("grant"),
            }
            if shared.failed.load(Ordering::Relaxed) {
                break 'frames;
            }
            if polls == 0 {
                waited += 1;
            }
            polls += 1;
            if args.mode == Mode::Park && polls > SPIN_BEFORE_PARK {
                // Announce "wake me when `len` fits", then sleep unless room appeared meanwhile.
                if tx.prepare_wait_for_space(len)? {
                    parks += 1;
                    thread::park();
                }
            } else {
                std::hint::spin_loop();
            }
        }
        if tx.flush().needed() {
            wake(&shared.consumer);
        }
        seq += 1;
    }
    shared.sent.store(seq, Ordering::Release);
    shared.done.store(true, Ordering::Release);
    wake(&shared.consumer);
    Ok(ProducerStats {
        parks,
        waited_frames: waited,
    })
}

/// What only the producer knows.
struct ProducerStats {
    /// Times it parked waiting for space.
    parks: u64,
    /// Frames for which the ring was full at first.
    waited_frames: u64,
}

/// Both threads meet here after pinning (whether or not it worked), so neither waits for a
/// thread that gave up; a failed pin fails both.
fn start_together(shared: &Shared, pinned: Result<()>) -> Result<()> {
    if pinned.is_err() {
        shared.failed.store(true, Ordering::SeqCst);
    }
    shared.start.wait();
    pinned?;
    ensure!(
        !shared.failed.load(Ordering::SeqCst),
        "the other thread could not start"
    );
    Ok(())
}

fn wake(thread: &OnceLock<Thread>) {
    if let Some(thread) = thread.get() {
        thread.unpark();
    }
}

fn consumer(
    mut rx: shmring::Consumer,
    args: &Args,
    shared: &Shared,
    epoch: Instant,
    source: &[u8],
) -> Result<Summary> {
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).context("latency histogram")?;
    let (mut frames, mut bytes, mut parks) = (0u64, 0u64, 0u64);
    let mut interval_max = 0u64;
    let mut polls = 0u32;
    let started = Instant::now();
    let mut scratch = Vec::new();
    loop {
        let Some(frame) = rx.peek()? else {
            if shared.done.load(Ordering::Acquire) {
                // Everything was published before `done`: one last look, then stop.
                if rx.is_empty() {
                    break;
                }
                continue;
            }
            if shared.failed.load(Ordering::Relaxed) {
                bail!("the producer failed");
            }
            polls += 1;
            if args.mode == Mode::Park && polls > SPIN_BEFORE_PARK {
                // Announce "wake me on the next publish", then sleep unless data arrived.
                if rx.prepare_sleep()? {
                    parks += 1;
                    thread::park();
                }
            } else {
                std::hint::spin_loop();
            }
            continue;
        };
        polls = 0;
        let received_at = epoch.elapsed().as_nanos() as u64;
        // The frame lies in memory the producer can write at any time: copy it out once
        // (through shmring's view, never a `&[u8]` over the ring) and check only the copy.
        scratch.resize(frame.len(), 0);
        frame.payload().copy_to(&mut scratch);
        let copy = &scratch[..];
        ensure!(
            frame.len() >= HEADER_LEN,
            "frame {frames} is only {} bytes",
            frame.len()
        );
        let seq = read_u64(copy, 0);
        ensure!(
            seq == frames,
            "frame lost or out of order: expected seq {frames}, got {seq}"
        );
        let sent_at = read_u64(copy, 8);
        let payload_len = read_u32(copy, 16) as usize;
        let crc = read_u32(copy, 20);
        ensure!(
            payload_len == frame.len() - HEADER_LEN && frame.len() == frame_len(seq, args.size),
            "frame {seq}: length {} does not match its header ({payload_len}) or the sender's sequence",
            frame.len()
        );
        let payload = &copy[HEADER_LEN..];
        ensure!(
            crc32fast::hash(payload) == crc,
            "frame {seq}: checksum mismatch"
        );
        let offset = (seq as usize * 61) % (source.len() - payload_len + 1);
        ensure!(
            payload == &source[offset..offset + payload_len],
            "frame {seq}: payload differs"
        );
        let one_way = received_at.saturating_sub(sent_at).max(1);
        latency.saturating_record(one_way);
        interval_max = interval_max.max(one_way);
        frames += 1;
        bytes += frame.len() as u64;
        frame.release();
        if rx.flush().needed() {
            wake(&shared.producer);
        }
        if frames % 1024 == 0 {
            shared.live.frames.store(frames, Ordering::Relaxed);
            shared.live.bytes.store(bytes, Ordering::Relaxed);
            shared
                .live
                .max_latency_ns
                .fetch_max(interval_max, Ordering::Relaxed);
            interval_max = 0;
        }
    }
    let elapsed = started.elapsed();
    let sent = shared.sent.load(Ordering::Acquire);
    ensure!(
        frames == sent,
        "loss: producer sent {sent} frames, consumer received {frames}"
    );
    Ok(Summary {
        frames,
        bytes,
        elapsed,
        latency,
        producer_parks: 0,
        producer_waited: 0,
        consumer_parks: parks,
    })
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "ring_stream: error: {}",
                hypervisor::cli::error_chain(&error)
            );
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    ensure!(
        args.size >= HEADER_LEN,
        "--size must be at least {HEADER_LEN} (the frame header)"
    );
    ensure!(args.seconds > 0.0, "--seconds must be positive");
    let cpus = match args.cpus {
        Some(cpus) => {
            pin::check_cpus(cpus)?;
            Some(cpus)
        }
        None => pin::default_cpus().ok(),
    };
    ivshmem_stack::outln!(
        "ring_stream: {:.1} s of frames of {HEADER_LEN}..={} bytes through a {} shmring, mode {:?}, {}",
        args.seconds,
        args.size,
        human_size(args.capacity as u64),
        args.mode,
        match cpus {
            Some([c, p]) => format!("consumer on CPU {c}, producer on CPU {p}"),
            None => "threads not pinned (only one CPU)".to_string(),
        }
    );
    let summary = stream(&args, cpus, true)?;
    print_summary(&args, &summary);
    Ok(())
}

/// Runs producer and consumer for `args.seconds`; prints a progress line about once a second
/// when `live`. Any loss, reordering or corruption is an error.
fn stream(args: &Args, cpus: Option<[usize; 2]>, live: bool) -> Result<Summary> {
    let (tx, rx) = shmring::channel(args.capacity)
        .with_context(|| format!("cannot create a ring of {} bytes", args.capacity))?;
    ensure!(
        args.size <= tx.max_frame_len(),
        "--size {} does not fit a ring of {} bytes (largest frame {}); raise --capacity",
        args.size,
        args.capacity,
        tx.max_frame_len()
    );
    let source = pattern(args.size.max(64 * 1024));
    let shared = Shared {
        start: Barrier::new(2),
        producer: OnceLock::new(),
        consumer: OnceLock::new(),
        done: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        live: Live::default(),
    };
    let epoch = Instant::now();
    let (result_tx, result_rx) = mpsc::channel::<()>();
    thread::scope(|scope| -> Result<Summary> {
        let (shared, source) = (&shared, &source);
        let consumer_thread = scope.spawn(move || {
            let _report_end = result_tx;
            let _ = shared.consumer.set(thread::current());
            let pinned = cpus.map_or(Ok(()), |[c, _]| pin::pin_current_thread(c));
            let result = start_together(shared, pinned)
                .and_then(|()| consumer(rx, args, shared, epoch, source));
            if result.is_err() {
                shared.failed.store(true, Ordering::SeqCst);
                wake(&shared.producer);
            }
            result
        });
        let producer_thread = scope.spawn(move || {
            let _ = shared.producer.set(thread::current());
            let pinned = cpus.map_or(Ok(()), |[_, p]| pin::pin_current_thread(p));
            let result = start_together(shared, pinned)
                .and_then(|()| producer(tx, args, shared, epoch, source));
            if result.is_err() {
                shared.failed.store(true, Ordering::SeqCst);
                wake(&shared.consumer);
            }
            result
        });
        // Live progress about once a second until the consumer ends (its end of the channel
        // closes then).
        let mut last = (Instant::now(), 0u64, 0u64);
        while let Err(RecvTimeoutError::Timeout) = result_rx.recv_timeout(Duration::from_secs(1)) {
            let now = Instant::now();
            let frames = shared.live.frames.load(Ordering::Relaxed);
            let bytes = shared.live.bytes.load(Ordering::Relaxed);
            let max = shared.live.max_latency_ns.swap(0, Ordering::Relaxed);
            let secs = now.duration_since(last.0).as_secs_f64();
            if !live {
                continue;
            }
            ivshmem_stack::outln!(
                "  t={:5.1} s  frames {:>12}  {:>8.2} M frames/s  {:>9.1} MB/s  max latency {:>9.1} us (last second)",
                epoch.elapsed().as_secs_f64(),
                frames,
                (frames - last.1) as f64 / secs / 1e6,
                (bytes - last.2) as f64 / secs / 1e6,
                max as f64 / 1e3
            );
            last = (now, frames, bytes);
        }
        let producer_stats = producer_thread
            .join()
            .map_err(|_| anyhow::anyhow!("producer thread panicked"))?
            .context("producer")?;
        let mut summary = consumer_thread
            .join()
            .map_err(|_| anyhow::anyhow!("consumer thread panicked"))?
            .context("consumer")?;
        summary.producer_parks = producer_stats.parks;
        summary.producer_waited = producer_stats.waited_frames;
        Ok(summary)
    })
}

fn print_summary(args: &Args, s: &Summary) {
    let secs = s.elapsed.as_secs_f64();
    let us = |q: f64| s.latency.value_at_quantile(q) as f64 / 1e3;
    ivshmem_stack::outln!("summary:");
    ivshmem_stack::outln!(
        "  {} frames, {:.1} MB in {secs:.2} s: {:.2} M frames/s, {:.1} MB/s (average frame {:.0} bytes)",
        s.frames,
        s.bytes as f64 / 1e6,
        s.frames as f64 / secs / 1e6,
        s.bytes as f64 / secs / 1e6,
        s.bytes as f64 / s.frames.max(1) as f64
    );
    ivshmem_stack::outln!(
        "  one-way latency: p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us, max {:.2} us",
        us(0.5),
        us(0.99),
        us(0.999),
        s.latency.max() as f64 / 1e3
    );
    ivshmem_stack::outln!(
        "  the ring was full before {} frames ({:.3}%): the producer waited, and their latency includes queueing",
        s.producer_waited,
        100.0 * s.producer_waited as f64 / s.frames.max(1) as f64
    );
    if args.mode == Mode::Park {
        ivshmem_stack::outln!(
            "  sleeps: consumer parked {} times, producer parked {} times",
            s.consumer_parks,
            s.producer_parks
        );
    }
    ivshmem_stack::outln!(
        "  zero loss: all {} frames arrived in order with matching length, CRC-32 and payload",
        s.frames
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(mode: Mode, capacity: usize) -> Args {
        Args {
            seconds: 0.2,
            size: 2048,
            capacity,
            mode,
            cpus: None,
        }
    }

    #[test]
    fn frame_lengths_cover_the_whole_range() {
        let lengths: Vec<usize> = (0..10_000).map(|seq| frame_len(seq, 100)).collect();
        assert!(lengths.iter().all(|&len| (HEADER_LEN..=100).contains(&len)));
        assert!(lengths.contains(&HEADER_LEN) && lengths.contains(&100));
    }

    #[test]
    fn every_frame_arrives_verified_in_both_modes_even_with_a_tiny_ring() {
        let cpus = pin::default_cpus().ok();
        // 8 KiB holds only a few frames of up to 2 KiB, so the producer often finds the
        // ring full and the wait-for-space and sleep paths run too (not asserted: timing).
        for (mode, capacity) in [
            (Mode::Park, 8192),
            (Mode::Spin, 8192),
            (Mode::Park, 64 * 1024),
        ] {
            let summary = stream(&args(mode, capacity), cpus, false)
                .unwrap_or_else(|e| panic!("{mode:?}/{capacity}: {e:#}"));
            assert!(summary.frames > 0, "{mode:?}/{capacity}");
            assert_eq!(summary.latency.len(), summary.frames);
        }
    }

    #[test]
    fn a_capacity_that_is_not_a_power_of_two_is_refused_with_the_rule() {
        let err = Args::try_parse_from(["ring_stream", "--capacity", "1000"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("power of two"), "{err}");
        assert!(err.contains("512 or 1024"), "{err}");
        let err = parse_capacity("32").unwrap_err();
        assert!(err.contains("out of range"), "{err}");
        assert_eq!(parse_capacity("1024"), Ok(1024));
        // A small valid ring is shown in bytes, not as "0 KiB".
        assert_eq!(human_size(64), "64 B");
        assert_eq!(human_size(64 * 1024), "64 KiB");
    }

    #[test]
    fn an_oversized_frame_is_refused_before_anything_starts() {
        let mut too_big = args(Mode::Park, 1024);
        too_big.size = 4096;
        let err = stream(&too_big, None, false).unwrap_err();
        assert!(format!("{err:#}").contains("raise --capacity"), "{err:#}");
    }
}
