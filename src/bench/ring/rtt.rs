//! Round trips of one fixed-size message between two pinned threads, through a request queue
//! and a reply queue of the same kind: shmring (index mode and latency mode), rtrb, crossbeam's
//! `ArrayQueue` and (feature `iceoryx2`) iceoryx2 publish-subscribe.
//!
//! Every message carries its sequence number in its first 8 bytes; both sides check it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use crossbeam_queue::ArrayQueue;

use super::super::pin::{run_pinned_pair, spin_until};
use super::samples::SampleClock;
use super::{seq_of, STREAM_RING_BYTES};

/// Slots of the element queues (rtrb, crossbeam) in the round-trip cases: a round trip has at
/// most one message in flight, so the size only matters for cache footprint.
const RTT_SLOTS: usize = 64;

/// One side's ends of a round trip: sends on one queue, polls the other.
pub(crate) trait Side<const N: usize> {
    /// Sends `msg`; `false`: no room now.
    fn try_send(&mut self, msg: &[u8; N]) -> Result<bool>;
    /// Receives one message into `msg`; `false`: none yet.
    fn try_recv(&mut self, msg: &mut [u8; N]) -> Result<bool>;
}

fn stamp<const N: usize>(msg: &mut [u8; N], seq: u64) {
    msg[..8].copy_from_slice(&seq.to_le_bytes());
}

/// Waits until both sides called it (or the other side failed): the start line after each side
/// set up its ends on its own pinned thread.
fn both_ready(ready: &AtomicU32, abort: &AtomicBool) -> Result<()> {
    ready.fetch_add(1, Ordering::SeqCst);
    spin_until(abort, || {
        Ok((ready.load(Ordering::SeqCst) >= 2).then_some(()))
    })
}

/// `iters` round trips: the pinger (measuring, `cpus[0]`) sends message `seq` and waits for
/// its echo; the ponger (`cpus[1]`) echoes. Each side builds its ends on its own thread (some
/// queues' ends may not move between threads), then both start together.
pub(crate) fn ping_pong<const N: usize, A: Side<N>, B: Side<N>>(
    cpus: [usize; 2],
    iters: u64,
    pinger: impl FnOnce() -> Result<A> + Send,
    ponger: impl FnOnce() -> Result<B> + Send,
) -> Result<Duration> {
    let ready = AtomicU32::new(0);
    let ready = &ready;
    run_pinned_pair(
        cpus,
        move |abort| {
            let mut ends = pinger()?;
            both_ready(ready, abort)?;
            let mut msg = [0x5Au8; N];
            let mut reply = [0u8; N];
            let mut clock = SampleClock::start(iters);
            let start = Instant::now();
            for seq in 0..iters {
                stamp(&mut msg, seq);
                spin_until(abort, || Ok(ends.try_send(&msg)?.then_some(())))?;
                spin_until(abort, || Ok(ends.try_recv(&mut reply)?.then_some(())))?;
                ensure!(seq_of(&reply[..]) == seq, "wrong reply for request {seq}");
                clock.tick(seq + 1);
            }
            let elapsed = start.elapsed();
            clock.finish();
            Ok(elapsed)
        },
        move |abort| {
            let mut ends = ponger()?;
            both_ready(ready, abort)?;
            let mut msg = [0u8; N];
            for seq in 0..iters {
                spin_until(abort, || Ok(ends.try_recv(&mut msg)?.then_some(())))?;
                ensure!(seq_of(&msg[..]) == seq, "wrong request {seq}");
                spin_until(abort, || Ok(ends.try_send(&msg)?.then_some(())))?;
            }
            Ok(())
        },
    )
}

/// shmring ends: `try_send` (copy in, publish) / `try_recv` (copy out, release, publish).
pub(crate) struct ShmringSide {
    /// Sending ring.
    pub tx: shmring::Producer,
    /// Receiving ring.
    pub rx: shmring::Consumer,
}

impl<const N: usize> Side<N> for ShmringSide {
    #[inline(always)]
    fn try_send(&mut self, msg: &[u8; N]) -> Result<bool> {
        match self.tx.try_send(msg) {
            Ok(_notify) => Ok(true),
            Err(shmring::Error::Full { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    #[inline(always)]
    fn try_recv(&mut self, msg: &mut [u8; N]) -> Result<bool> {
        match self.rx.try_recv(msg)? {
            Some(received) => {
                ensure!(received.len == N, "frame of {} bytes", received.len);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Two in-process shmring rings (request, reply) with the consumers in `mode`, split into the
/// pinger's and the ponger's ends.
fn shmring_pair(mode: shmring::Mode, capacity: usize) -> Result<(ShmringSide, ShmringSide)> {
    let (request_tx, request_rx) = shmring::channel_with(capacity, mode)?;
    let (reply_tx, reply_rx) = shmring::channel_with(capacity, mode)?;
    Ok((
        ShmringSide {
            tx: request_tx,
            rx: reply_rx,
        },
        ShmringSide {
            tx: reply_tx,
            rx: request_rx,
        },
    ))
}

/// `iters` round trips of an `N`-byte frame through two shmring rings in `mode`.
pub fn shmring_rtt<const N: usize>(
    mode: shmring::Mode,
    cpus: [usize; 2],
    iters: u64,
) -> Result<Duration> {
    let (pinger, ponger) = shmring_pair(mode, STREAM_RING_BYTES)?;
    ping_pong::<N, _, _>(cpus, iters, move || Ok(pinger), move || Ok(ponger))
}

struct RtrbSide<const N: usize> {
    tx: rtrb::Producer<[u8; N]>,
    rx: rtrb::Consumer<[u8; N]>,
}

impl<const N: usize> Side<N> for RtrbSide<N> {
    #[inline(always)]
    fn try_send(&mut self, msg: &[u8; N]) -> Result<bool> {
        Ok(self.tx.push(*msg).is_ok())
    }

    #[inline(always)]
    fn try_recv(&mut self, msg: &mut [u8; N]) -> Result<bool> {
        match self.rx.pop() {
            Ok(got) => {
                *msg = got;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }
}

/// `iters` round trips of an `N`-byte message through two `rtrb::RingBuffer<[u8; N]>`
/// (`push` / `pop`).
pub fn rtrb_rtt<const N: usize>(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let (request_tx, request_rx) = rtrb::RingBuffer::<[u8; N]>::new(RTT_SLOTS);
    let (reply_tx, reply_rx) = rtrb::RingBuffer::<[u8; N]>::new(RTT_SLOTS);
    let pinger = RtrbSide {
        tx: request_tx,
        rx: reply_rx,
    };
    let ponger = RtrbSide {
        tx: reply_tx,
        rx: request_rx,
    };
    ping_pong::<N, _, _>(cpus, iters, move || Ok(pinger), move || Ok(ponger))
}

struct CrossbeamSide<'a, const N: usize> {
    tx: &'a ArrayQueue<[u8; N]>,
    rx: &'a ArrayQueue<[u8; N]>,
}

impl<const N: usize> Side<N> for CrossbeamSide<'_, N> {
    #[inline(always)]
    fn try_send(&mut self, msg: &[u8; N]) -> Result<bool> {
        Ok(self.tx.push(*msg).is_ok())
    }

    #[inline(always)]
    fn try_recv(&mut self, msg: &mut [u8; N]) -> Result<bool> {
        match self.rx.pop() {
            Some(got) => {
                *msg = got;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// `iters` round trips of an `N`-byte message through two crossbeam `ArrayQueue<[u8; N]>`
/// (`push` / `pop`).
pub fn crossbeam_rtt<const N: usize>(cpus: [usize; 2], iters: u64) -> Result<Duration> {
    let request = ArrayQueue::<[u8; N]>::new(RTT_SLOTS);
    let reply = ArrayQueue::<[u8; N]>::new(RTT_SLOTS);
    let (request, reply) = (&request, &reply);
    ping_pong::<N, _, _>(
        cpus,
        iters,
        move || {
            Ok(CrossbeamSide {
                tx: request,
                rx: reply,
            })
        },
        move || {
            Ok(CrossbeamSide {
                tx: reply,
                rx: request,
            })
        },
    )
}
