//! Two processes, one memfd, one ring: the set-up every real deployment repeats.
//!
//! The parent produces, a re-executed copy of this program consumes. The memfd holds the
//! ring's two parts at the offsets [`OneWayLayout`] computes (each on its own pages), and each
//! process maps **its own part read-write and the peer's part read-only**, the protection an
//! ivshmem v2 device gives output sections. Two eventfds are the doorbells, the way the
//! hosted hypervisor wires them:
//!
//! - the **data doorbell** (producer → consumer) is rung when a producer `flush` returns a
//!   [`Notify`](shmring::Notify) that is `needed()`: the consumer announced sleep;
//! - the **space doorbell** (consumer → producer) is rung when a consumer `flush` says the
//!   producer waits for room; the child also rings it once after initialising its part, which
//!   stands in for the ivshmem `STATE` change that says "my part is ready, attach now".
//!
//! Nobody sleeps without the handshake first (`prepare_sleep`, `prepare_wait_for_space`), so
//! no wake-up is lost and a busy peer gets no doorbells at all. The consumer reads every frame
//! through the [`PeerBytes`](shmring::PeerBytes) view: the producer is another process and
//! could rewrite a frame at any time.
//!
//! ```text
//! cargo run -p shmring --example memfd_pair [frames]
//! ```

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, MapFlags, ProtFlags};
use shmring::layout::OneWayLayout;
use shmring::{Consumer, Error, Producer};

const CAPACITY: usize = 64 * 1024;
const PAGE: usize = 4096;
const CHILD_ENV: &str = "SHMRING_MEMFD_PAIR_CHILD";
/// Frames committed between two publishes (batching: one index store, at most one doorbell).
const BATCH: u64 = 16;
/// Frame kind of the last frame.
const KIND_END: u16 = 1;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Maps `len` bytes of the memfd at `offset`, read-write or read-only.
fn map(fd: impl AsFd, offset: usize, len: usize, writable: bool) -> Result<*mut u8> {
    let prot = if writable {
        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
    } else {
        ProtFlags::PROT_READ
    };
    let len = NonZeroUsize::new(len).ok_or("empty mapping")?;
    // SAFETY: a new shared mapping of a range inside the memfd; nothing else is placed there.
    // It is never unmapped: the process exits when the ring is done.
    let p = unsafe { mmap(None, len, prot, MapFlags::MAP_SHARED, fd, offset as i64) }?;
    Ok(p.as_ptr().cast())
}

/// Frame `seq`: 10 to 1000 bytes: the sequence number, then the Internet checksum of the
/// whole frame (so the ones' complement sum over the frame is 0xffff), then filler.
fn fill(seq: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&seq.to_le_bytes());
    out[8..10].fill(0);
    for (i, b) in out[10..].iter_mut().enumerate() {
        *b = (seq as usize).wrapping_add(i) as u8;
    }
    let sum = shmring::view::ones_complement_sum(out);
    out[8..10].copy_from_slice(&(!sum).to_be_bytes());
}

fn frame_len(seq: u64) -> usize {
    10 + (seq.wrapping_mul(0x9e37_79b9) % 991) as usize
}

fn producer(frames: u64) -> Result<()> {
    let layout = OneWayLayout::new(CAPACITY, PAGE)?;
    // Not CLOEXEC: the child inherits the memfd and both eventfds.
    let memfd = memfd_create("shmring-memfd-pair", MFdFlags::empty())?;
    nix::unistd::ftruncate(&memfd, layout.total_len as i64)?;
    let data_bell = EventFd::from_value_and_flags(0, EfdFlags::empty())?;
    let space_bell = EventFd::from_value_and_flags(0, EfdFlags::empty())?;

    let own = map(&memfd, layout.producer_offset, layout.producer_len, true)?;
    let peer = map(&memfd, layout.consumer_offset, layout.consumer_len, false)?;
    // SAFETY: our own part, mapped read-write for the life of the process; only we write it.
    let init = unsafe { Producer::init(own, layout.producer_len, layout.capacity) }?;

    let fds = format!(
        "{} {} {} {frames}",
        memfd.as_raw_fd(),
        data_bell.as_fd().as_raw_fd(),
        space_bell.as_fd().as_raw_fd()
    );
    let mut child = Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, fds)
        .spawn()?;

    // Wait for "consumer part ready" (the space doorbell's first ring), then attach.
    space_bell.read()?;
    // SAFETY: the consumer's part, mapped read-only for the life of the process.
    let mut tx = unsafe { init.attach(peer, layout.consumer_len) }?;

    let mut frame = vec![0u8; 1024];
    let (mut doorbells, mut waits) = (0u64, 0u64);
    for seq in 0..=frames {
        let (kind, len) = if seq == frames {
            (KIND_END, 0)
        } else {
            (0, frame_len(seq))
        };
        fill(seq, &mut frame[..len.max(10)]);
        loop {
            match tx.grant_kind(kind, len) {
                Ok(mut grant) => {
                    grant.copy_from_slice(&frame[..len]);
                    grant.commit();
                    break;
                }
                Err(Error::Full { .. }) => {
                    // Publish what we have (ringing if the consumer sleeps), then announce
                    // "wake me when there is room" and sleep only if there still is none.
                    if tx.flush().needed() {
                        data_bell.write(1)?;
                        doorbells += 1;
                    }
                    if tx.prepare_wait_for_space(len)? {
                        space_bell.read()?;
                        waits += 1;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let batch_done = seq % BATCH == BATCH - 1 || seq == frames;
        if batch_done && tx.flush().needed() {
            data_bell.write(1)?;
            doorbells += 1;
        }
    }
    let status = child.wait()?;
    println!(
        "producer: {frames} frames sent, {doorbells} data doorbells rung, slept {waits} times for room"
    );
    if !status.success() {
        return Err(format!("consumer process failed: {status}").into());
    }
    Ok(())
}

fn consumer(args: &str) -> Result<()> {
    let mut it = args.split(' ').map(str::parse::<i32>);
    let mut next = || it.next().ok_or("bad child arguments").map(|r| r.ok());
    let (Some(memfd), Some(data_bell), Some(space_bell), Some(frames)) =
        (next()?, next()?, next()?, next()?)
    else {
        return Err("bad child arguments".into());
    };
    // SAFETY: inherited descriptors named by our parent, owned by nobody else in this process.
    let (memfd, data_bell, space_bell) = unsafe {
        (
            OwnedFd::from_raw_fd(memfd),
            EventFd::from_owned_fd(OwnedFd::from_raw_fd(data_bell)),
            EventFd::from_owned_fd(OwnedFd::from_raw_fd(space_bell)),
        )
    };
    let layout = OneWayLayout::new(CAPACITY, PAGE)?;
    let own = map(&memfd, layout.consumer_offset, layout.consumer_len, true)?;
    let peer = map(&memfd, layout.producer_offset, layout.producer_len, false)?;
    // SAFETY: our own part, read-write, for the life of the process; only we write it.
    let init = unsafe { Consumer::init(own, layout.consumer_len) }?;
    space_bell.write(1)?; // "ready": the producer may attach to our part now
                          // SAFETY: the producer's part, read-only, for the life of the process. Content untrusted.
    let mut rx = unsafe { init.attach(peer, layout.producer_len) }?;

    let (mut seq, mut sleeps) = (0u64, 0u64);
    loop {
        let Some(frame) = rx.peek()? else {
            // Empty: publish our releases (waking a producer that waits for room), announce
            // the sleep, re-check, and sleep only if still empty.
            if rx.flush().needed() {
                space_bell.write(1)?;
            }
            if rx.prepare_sleep()? {
                data_bell.read()?;
                sleeps += 1;
            }
            continue;
        };
        if frame.kind() == KIND_END {
            break;
        }
        // The bytes are in the producer's section: read them through the view only.
        let payload = frame.payload();
        let got = payload.read_u64_le(0)?;
        if got != seq || payload.len() != frame_len(seq) {
            return Err(format!("frame {seq}: got seq {got}, {} bytes", payload.len()).into());
        }
        if payload.ones_complement_sum() != 0xffff {
            return Err(format!("frame {seq}: checksum mismatch").into());
        }
        frame.release();
        seq += 1;
        if seq % BATCH == 0 && rx.flush().needed() {
            space_bell.write(1)?;
        }
    }
    if seq != frames as u64 {
        return Err(format!("{seq} frames received, {frames} sent").into());
    }
    println!("consumer: {seq} frames received and verified, slept {sleeps} times");
    Ok(())
}

fn main() -> Result<()> {
    if let Ok(args) = std::env::var(CHILD_ENV) {
        return consumer(&args);
    }
    let frames = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 100_000,
    };
    producer(frames)
}
