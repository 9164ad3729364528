//! Streams checksummed frames to the other peer of a 2-peer link while receiving and
//! checking the peer's frames: both directions at once, over one [`ivshmem_link::Link`] (two
//! rings, one per direction, in the two output sections). Two of these inmates in two KVM
//! cells are the KVM↔KVM test (`tests/kvm_stream.rs`) and demo (`configs/stream-kvm.toml`).
//!
//! Frame `seq` (little-endian): `seq` u64, payload length u32, CRC-32 (IEEE) of the payload
//! u32, then the payload: `len = seq % MAX_PAYLOAD + 1` bytes, byte `i` = `(seq * 7 + i) as u8`.
//! The receiver checks, for every frame, the sequence (no gap, no reorder), the length, the
//! CRC over the bytes it copied out of the ring, and the bytes against the pattern, so a torn
//! or corrupted frame is counted whatever the damage.
//!
//! Command line: `count=N` frames to send (default 100000), `ring=0|3` where the loop runs
//! (default 3: native under PVM). When it has sent `count` frames and received `count`, it
//! prints `stream: done sent N received N bad 0 gaps 0` and keeps serving the link (so the
//! peer can finish); a peer that leaves mid-stream is reported and the count starts over.
#![no_std]
#![no_main]

use inmate_rt::interrupts::{self, FIRST_DEVICE_VECTOR};
use inmate_rt::ivshmem::{self, Device};
use inmate_rt::{clock, event, println, Cmdline};
use ivshmem_dev::PortIo;
use ivshmem_link::{Drain, Link, LinkConfig};

inmate_rt::entry!(main);

/// Header: seq, len, crc.
const HEADER: usize = 16;
/// The largest payload.
const MAX_PAYLOAD: u64 = 1500;

fn pattern(seq: u64, i: usize) -> u8 {
    (seq.wrapping_mul(7) as usize + i) as u8
}

fn payload_len(seq: u64) -> usize {
    (seq % MAX_PAYLOAD + 1) as usize
}

/// What the receiving side counted.
#[derive(Default)]
struct Received {
    frames: u64,
    /// Frames whose length, CRC or bytes were wrong.
    bad: u64,
    /// Frames whose sequence number was not the next one.
    gaps: u64,
}

impl Received {
    fn check(&mut self, frame: &[u8]) {
        let seq_expected = self.frames;
        self.frames += 1;
        if frame.len() < HEADER {
            self.bad += 1;
            return;
        }
        let seq = u64::from_le_bytes(frame[0..8].try_into().unwrap_or([0; 8]));
        let len = u32::from_le_bytes(frame[8..12].try_into().unwrap_or([0; 4])) as usize;
        let crc = u32::from_le_bytes(frame[12..16].try_into().unwrap_or([0; 4]));
        if seq != seq_expected {
            self.gaps += 1;
        }
        let payload = &frame[HEADER..];
        if len != payload.len()
            || len != payload_len(seq)
            || crc32fast::hash(payload) != crc
            || payload
                .iter()
                .enumerate()
                .any(|(i, b)| *b != pattern(seq, i))
        {
            self.bad += 1;
        }
    }
}

fn fill(frame: &mut [u8], seq: u64) {
    let len = frame.len() - HEADER;
    let (header, payload) = frame.split_at_mut(HEADER);
    for (i, b) in payload.iter_mut().enumerate() {
        *b = pattern(seq, i);
    }
    header[0..8].copy_from_slice(&seq.to_le_bytes());
    header[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    header[12..16].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
}

fn main(cmdline: &Cmdline) -> ! {
    let count = cmdline.int("count", 100_000).max(0) as u64;
    let ring = cmdline.int("ring", 3);
    interrupts::set_handler(event::device_interrupt);
    clock::init();
    inmate_rt::timer::calibrate();
    // SAFETY: the inmate is the only user of ports 0xCF8/0xCFC on its one CPU.
    let access = unsafe { PortIo::new() };
    let device = ivshmem::bring_up(&access).unwrap_or_else(|e| panic!("stream: {e}"));
    device.setup_msix(&access, FIRST_DEVICE_VECTOR, 1);
    let Device { driver, .. } = device;
    let id = driver.id();
    assert_eq!(driver.max_peers(), 2, "stream: needs a 2-peer link");
    driver.enable_interrupts();
    let mut link =
        Link::new(driver, id ^ 1, LinkConfig::default()).unwrap_or_else(|e| panic!("stream: {e}"));
    interrupts::enable();
    match ring {
        0 => {}
        3 => inmate_rt::user::enter(),
        other => panic!("stream: ring={other}: 0 or 3"),
    }
    println!(
        "stream: peer {id} sends {count} frames to peer {}, loop in ring {ring}",
        id ^ 1
    );

    let mut buf = [0u8; HEADER + MAX_PAYLOAD as usize];
    let mut sent = 0u64;
    let mut received = Received::default();
    let mut started = None;
    let mut done = false;
    loop {
        let now = clock::monotonic_ns();
        let status = link.poll(now, Drain::DeliverFirst);
        if status.departed.is_some() {
            println!(
                "stream: peer left after {} of our frames and {} of its; starting over",
                sent, received.frames
            );
            (sent, received, done) = (0, Received::default(), false);
        }
        if let Some(fault) = status.fault {
            println!("stream: link fault: {fault}");
        }
        let mut progress = false;
        let mut may_sleep = true;
        if let Some(duplex) = link.rings_mut() {
            started.get_or_insert(now);
            // Send what fits.
            while sent < count {
                let len = HEADER + payload_len(sent);
                match duplex.tx.grant(len) {
                    Ok(mut grant) => {
                        fill(&mut grant, sent);
                        grant.commit();
                        sent += 1;
                        progress = true;
                    }
                    Err(shmring::Error::Full { .. }) => break,
                    Err(e) => panic!("stream: send: {e}"),
                }
            }
            // Receive what arrived (each frame copied out of the ring once, then checked).
            let mut violation = None;
            loop {
                match duplex.rx.try_recv(&mut buf) {
                    Ok(Some(got)) => {
                        received.check(&buf[..got.len]);
                        progress = true;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        violation = Some(e);
                        break;
                    }
                }
            }
            let notify = duplex.tx.flush() | duplex.rx.flush();
            if !progress {
                let rx_idle = duplex.rx.prepare_sleep().unwrap_or(false);
                let tx_idle = sent >= count
                    || duplex
                        .tx
                        .prepare_wait_for_space(HEADER + payload_len(sent))
                        .unwrap_or(false);
                may_sleep = rx_idle && tx_idle;
            }
            link.notify(notify);
            if let Some(e) = violation {
                link.report_violation(e);
            }
        }
        if !done && sent >= count && received.frames >= count {
            done = true;
            let us = (now - started.unwrap_or(now)) / 1000;
            println!(
                "stream: done sent {} received {} bad {} gaps {} in {} us",
                sent, received.frames, received.bad, received.gaps, us
            );
        }
        if !progress && may_sleep {
            event::wait_until(None);
        }
    }
}
