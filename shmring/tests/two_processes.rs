//! Two real processes sharing a memfd: the parent produces, a re-executed copy of this test
//! binary consumes. Each side maps its own part read-write and the peer's part read-only, as
//! over ivshmem. Frames carry a sequence number, pseudo-random content of 8..=256 bytes and a
//! checksum; the consumer verifies zero loss, zero corruption and order. Waiting is spin +
//! `yield_now` (no sleeps).
#![cfg(all(unix, not(miri)))] // Miri cannot run a second process.

use std::ffi::CString;
use std::process::{Command, Stdio};
use std::time::Instant;

use shmring::layout::OneWayLayout;
use shmring::{Consumer, Error, Producer};

const CAPACITY: usize = 1 << 16;
const PAGE: usize = 4096;
const CHILD_ENV: &str = "SHMRING_TWO_PROCESSES_CHILD";
const BATCH: u64 = 32;

/// Producer part at 0, consumer part on the next page: (producer len, consumer len).
fn region_lens() -> (usize, usize) {
    let layout = OneWayLayout::new(CAPACITY, PAGE).expect("valid layout");
    assert_eq!(layout.consumer_offset, layout.producer_len);
    (layout.producer_len, layout.consumer_len)
}

/// Maps `len` bytes of `fd` at `offset`, writable or read-only.
fn map(fd: i32, offset: usize, len: usize, writable: bool) -> *mut u8 {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: plain shared file mapping of a range inside the memfd; checked for failure.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd,
            offset as libc::off_t,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p.cast()
}

/// Frame length for sequence number `seq`: 8..=256 bytes, pseudo-random.
fn frame_len(seq: u64) -> usize {
    8 + (mix(seq) % 249) as usize
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Frame: seq (8 bytes LE), pseudo-random filler, then a 4-byte checksum over everything
/// before it when the frame is at least 12 bytes long.
fn fill(seq: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&seq.to_le_bytes());
    let mut state = mix(seq ^ 0x5555) | 1;
    let body_end = if out.len() >= 12 {
        out.len() - 4
    } else {
        out.len()
    };
    for chunk in out[8..body_end].chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    if out.len() >= 12 {
        let sum = checksum(&out[..body_end]);
        out[body_end..].copy_from_slice(&sum.to_le_bytes());
    }
}

/// Word-wise multiply-xor hash (each step is a bijection of the state, so any single changed
/// word changes the 64-bit result), folded to 32 bits.
fn checksum(bytes: &[u8]) -> u32 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ bytes.len() as u64;
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) as u32
}

/// Verifies one received frame: length, sequence number, checksum.
fn verify(expected_seq: u64, frame: &[u8]) -> Result<(), String> {
    if frame.len() != frame_len(expected_seq) {
        return Err(format!(
            "frame {expected_seq}: length {} expected {}",
            frame.len(),
            frame_len(expected_seq)
        ));
    }
    let seq = u64::from_le_bytes(frame[..8].try_into().unwrap());
    if seq != expected_seq {
        return Err(format!(
            "lost or reordered: got {seq}, expected {expected_seq}"
        ));
    }
    if frame.len() >= 12 {
        let (body, sum) = frame.split_at(frame.len() - 4);
        if checksum(body) != u32::from_le_bytes(sum.try_into().unwrap()) {
            return Err(format!("frame {seq}: checksum mismatch"));
        }
    }
    Ok(())
}

/// Parent side: creates the memfd, produces `frames` frames to a child consumer process.
fn run_parent(frames: u64) {
    let name = CString::new("shmring-two-processes").unwrap();
    // SAFETY: plain syscall; no CLOEXEC so the child inherits the fd.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    let (plen, clen) = region_lens();
    // SAFETY: fd is ours.
    assert_eq!(
        unsafe { libc::ftruncate(fd, (plen + clen) as libc::off_t) },
        0
    );
    let own = map(fd, 0, plen, true);
    let peer = map(fd, plen, clen, false);
    // SAFETY: own/peer are live shared mappings for the rest of the process; only this process
    // writes the producer part.
    let init = unsafe { Producer::init(own, plen, CAPACITY) }.expect("init producer part");

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{fd} {frames}"))
        .stdout(Stdio::null()) // the harness chatter of the child; errors go to stderr
        .spawn()
        .expect("spawn consumer process");

    let start = Instant::now();
    let mut tx = loop {
        // SAFETY: as above.
        match unsafe { init.attach(peer, clen) } {
            Ok(tx) => break tx,
            Err(Error::PeerNotReady) => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("consumer exited before attaching: {status}");
                }
                std::thread::yield_now();
            }
            Err(e) => panic!("attach: {e}"),
        }
    };
    let mut seq = 0;
    let mut full_spins = 0u64;
    while seq < frames {
        let len = frame_len(seq);
        match tx.grant(len) {
            Ok(mut g) => {
                fill(seq, &mut g);
                g.commit();
                seq += 1;
                if seq % BATCH == 0 {
                    let _ = tx.flush();
                }
            }
            Err(Error::Full { .. }) => {
                let _ = tx.flush();
                full_spins += 1;
                // A consumer that died (e.g. on a verification failure) never frees space.
                if full_spins % 4096 == 0 {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("consumer exited early at frame {seq}: {status}");
                    }
                }
                std::thread::yield_now();
            }
            Err(e) => panic!("producer: {e}"),
        }
    }
    let _ = tx.flush();
    let status = child.wait().expect("wait for consumer");
    let secs = start.elapsed().as_secs_f64();
    assert!(status.success(), "consumer process failed: {status}");
    println!(
        "two processes: {frames} frames (8..=256 bytes) verified in {secs:.3} s: {:.2} M frames/s",
        frames as f64 / secs / 1e6
    );
}

/// Child side: the consumer. Returns an error description on any loss or corruption.
fn run_child(fd: i32, frames: u64) -> Result<(), String> {
    let (plen, clen) = region_lens();
    let peer = map(fd, 0, plen, false);
    let own = map(fd, plen, clen, true);
    // SAFETY: live shared mappings for the rest of the process; only we write the consumer part.
    let mut rx =
        unsafe { Consumer::new(own, clen, peer, plen) }.map_err(|e| format!("attach: {e}"))?;
    let mut seq = 0;
    let mut copy = [0u8; 256];
    while seq < frames {
        match rx.peek().map_err(|e| e.to_string())? {
            Some(frame) => {
                // Another process wrote it: copy out once (the view), then check the copy.
                if frame.len() > copy.len() {
                    return Err(format!("frame {seq}: length {}", frame.len()));
                }
                let n = frame.payload().copy_to(&mut copy);
                verify(seq, &copy[..n])?;
                frame.release();
                seq += 1;
                if seq % BATCH == 0 {
                    let _ = rx.flush();
                }
            }
            None => {
                let _ = rx.flush();
                std::thread::yield_now();
            }
        }
    }
    let _ = rx.flush();
    match rx.peek().map_err(|e| e.to_string())? {
        None => Ok(()),
        Some(_) => Err("more frames than sent".into()),
    }
}

/// Entry point of the consumer process (a no-op when run as an ordinary test).
#[test]
fn child_process_entry() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut it = args.split(' ');
    let fd: i32 = it.next().unwrap().parse().unwrap();
    let frames: u64 = it.next().unwrap().parse().unwrap();
    if let Err(e) = run_child(fd, frames) {
        eprintln!("consumer: {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// 100 thousand frames, part of the debug test suite.
#[test]
fn hundred_thousand_frames_between_two_processes() {
    run_parent(100_000);
}

/// 10 million frames. Ignored in the debug suite because it is slow without optimisation;
/// scripts/test-all runs it in release:
/// `cargo test --release -p shmring --test two_processes -- --ignored --nocapture`.
#[test]
#[ignore = "10 million frames: run in release (scripts/test-all)"]
fn ten_million_frames_between_two_processes() {
    run_parent(10_000_000);
}

/// The checker itself catches loss, reordering and corruption.
#[test]
fn verifier_detects_damage() {
    let mut frame = vec![0u8; frame_len(7)];
    fill(7, &mut frame);
    assert!(verify(7, &frame).is_ok());
    assert!(verify(8, &frame).is_err(), "wrong sequence number / length");
    let mut damaged = frame.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 1;
    assert!(verify(7, &damaged).is_err());
}
