//! Hostile-peer scenario shared by the `hostile` proptest and the `hostile_peer` fuzz target.
//!
//! Both parts of a ring live inside one buffer with guard bytes before, between and after
//! them. An input script drives a victim side (a real `Consumer` or `Producer`) against an
//! "attacker" that mixes honest peer operations (a real peer object on the peer part) with
//! arbitrary whole-word writes into the peer part: header fields, indices, events, frame
//! headers, padding records and payload. Properties checked after every step:
//! - the victim never panics (a panic fails the test / is a fuzz crash);
//! - every victim result is `Ok` or an expected error (`Corrupt` among them);
//! - every slice the victim hands out lies inside the producer's data area;
//! - the guard bytes are untouched (no write outside the two parts).
//!   Reads outside them are caught by Miri when the proptest runs under it.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use shmring::layout::{self, CONSUMER_PART_SIZE};
use shmring::{Consumer, Error, Mode, Producer};

const GUARD: usize = 128;
const GUARD_BYTE: u8 = 0xA5;

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// The buffer: guard, producer part, guard, consumer part, guard.
pub struct Arena {
    lines: Vec<Line>,
    cap: usize,
}

impl Arena {
    pub fn new(cap: usize) -> Arena {
        let len = 3 * GUARD + layout::producer_part_size(cap) + CONSUMER_PART_SIZE;
        let mut arena = Arena {
            lines: vec![Line([0; 64]); len / 64],
            cap,
        };
        for range in arena.guards() {
            arena.bytes_mut()[range].fill(GUARD_BYTE);
        }
        arena
    }
    fn base(&mut self) -> *mut u8 {
        self.lines.as_mut_ptr().cast()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.lines.len() * 64;
        // SAFETY: the Vec's own initialised storage; only used while no ring side exists.
        unsafe { std::slice::from_raw_parts_mut(self.base(), len) }
    }
    fn producer_off(&self) -> usize {
        GUARD
    }
    fn consumer_off(&self) -> usize {
        2 * GUARD + layout::producer_part_size(self.cap)
    }
    fn guards(&self) -> [std::ops::Range<usize>; 3] {
        let p_end = self.producer_off() + layout::producer_part_size(self.cap);
        let c_end = self.consumer_off() + CONSUMER_PART_SIZE;
        [0..GUARD, p_end..p_end + GUARD, c_end..c_end + GUARD]
    }
    /// Guard bytes intact? Reads through the base pointer (the sides may still exist).
    fn guards_intact(&mut self) -> bool {
        let base = self.base();
        self.guards().into_iter().flatten().all(|i| {
            // SAFETY: inside the buffer; guards are never written by the ring (that is the claim).
            unsafe { base.add(i).read() == GUARD_BYTE }
        })
    }
    fn producer_part(&mut self) -> (*mut u8, usize) {
        let off = self.producer_off();
        // SAFETY: inside the buffer.
        (
            unsafe { self.base().add(off) },
            layout::producer_part_size(self.cap),
        )
    }
    fn consumer_part(&mut self) -> (*mut u8, usize) {
        let off = self.consumer_off();
        // SAFETY: inside the buffer.
        (unsafe { self.base().add(off) }, CONSUMER_PART_SIZE)
    }
}

/// Reads input bytes, 0 when exhausted.
pub struct Script<'a> {
    bytes: &'a [u8],
}

impl Script<'_> {
    fn byte(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&b, rest)) => {
                self.bytes = rest;
                b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        let mut v = [0u8; 8];
        v.iter_mut().for_each(|b| *b = self.byte());
        u64::from_le_bytes(v)
    }
    fn done(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A whole-word write by the attacker (whole aligned words, like a peer process's stores).
fn poke(word_ptr: *mut u64, s: &mut Script<'_>) {
    // SAFETY: callers pass aligned words inside the peer part of the arena.
    let word = unsafe { AtomicU64::from_ptr(word_ptr) };
    let cur = word.load(Ordering::Relaxed);
    let b = s.byte();
    let value = match s.byte() % 8 {
        0 => cur.wrapping_add((b as i8 as i64 * 8) as u64), // aligned nudge
        1 => cur.wrapping_add(b as u64),                    // unaligned nudge
        2 => s.u64(),
        3 => 0,
        4 => u64::MAX,
        5 => cur ^ (1 << (b % 64)),
        // Frame-header shaped values: length b * 8 + small, kind, flags 0/1/other.
        6 => (b as u64 * 8 + (s.byte() % 9) as u64) | ((s.byte() as u64 % 3) << 48),
        _ => cur.wrapping_sub(b as u64),
    };
    word.store(value, Ordering::Relaxed);
}

fn inside(start: *const u8, len: usize, data: *const u8, cap: usize) -> bool {
    let start = start as usize;
    let data = data as usize;
    start >= data && start + len <= data + cap
}

/// What a script made the victim do (to check that the scenario reaches both outcomes).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// `Corrupt` errors the victim reported.
    pub corrupt: usize,
    /// Frames the victim consumer received or the victim producer committed.
    pub frames: usize,
}

/// Runs one script; `Err` describes a violated property.
pub fn run(input: &[u8]) -> Result<Stats, String> {
    let mut s = Script { bytes: input };
    let first = s.byte();
    let cap = [64, 128, 256, 1024][(first & 3) as usize];
    // Bit 3: the consumer polls (latency mode: frames found from their headers).
    let mode = if first & 8 == 0 {
        Mode::Wakeable
    } else {
        Mode::Polling
    };
    let mut stats = Stats::default();
    if first & 4 == 0 {
        victim_consumer(cap, mode, &mut s, &mut stats)?;
    } else {
        victim_producer(cap, mode, &mut s, &mut stats)?;
    }
    Ok(stats)
}

fn expected(
    stats: &mut Stats,
    e: Error,
    what: &str,
    allowed: &[fn(&Error) -> bool],
) -> Result<(), String> {
    stats.corrupt += usize::from(is_corrupt(&e));
    if allowed.iter().any(|f| f(&e)) {
        Ok(())
    } else {
        Err(format!("{what}: unexpected error {e:?}"))
    }
}

fn is_corrupt(e: &Error) -> bool {
    matches!(e, Error::Corrupt { .. })
}
fn is_small_buf(e: &Error) -> bool {
    matches!(e, Error::BufferTooSmall { .. })
}
fn is_full_or_large(e: &Error) -> bool {
    matches!(e, Error::Full { .. } | Error::TooLarge { .. })
}

fn victim_consumer(
    cap: usize,
    mode: Mode,
    s: &mut Script<'_>,
    stats: &mut Stats,
) -> Result<(), String> {
    let mut arena = Arena::new(cap);
    let (pp, plen) = arena.producer_part();
    let (cp, clen) = arena.consumer_part();
    // SAFETY: disjoint parts of the arena, which outlives both sides (dropped at the end).
    let (mut peer, mut victim) = unsafe {
        let cinit = Consumer::init_mode(cp, clen, mode).map_err(|e| e.to_string())?;
        let peer = Producer::new(pp, plen, cp, clen, cap).map_err(|e| e.to_string())?;
        (peer, cinit.attach(pp, plen).map_err(|e| e.to_string())?)
    };
    // SAFETY: inside the producer part.
    let data = unsafe { pp.add(layout::P_DATA) };
    let mut buf = vec![0u8; cap];
    let mut seq = 0u8;
    while !s.done() {
        match s.byte() % 9 {
            0 | 1 => {
                // Honest peer: a batch of 1..=3 frames, then publish.
                for _ in 0..=s.byte() % 3 {
                    let len = s.byte() as usize % (peer.max_frame_len() + 1);
                    seq = seq.wrapping_add(1);
                    match peer.grant(len) {
                        Ok(mut g) => {
                            g.fill(seq);
                            g.commit();
                        }
                        Err(_) => break,
                    }
                }
                let _ = peer.flush();
            }
            2 | 3 => {
                // Attacker: one word of the producer part.
                let sel = s.byte();
                let off = match sel % 6 {
                    0 => layout::P_INDEX,
                    1 => layout::P_SPACE_EVENT,
                    2 => layout::P_MAGIC,
                    3 => layout::P_CAPACITY,
                    _ => layout::P_DATA + (s.byte() as usize * 8) % cap,
                };
                // SAFETY: aligned word inside the producer part.
                poke(unsafe { pp.add(off) }.cast(), s);
            }
            4 => {
                let size = s.byte() as usize % (cap + 1);
                match victim.try_recv(&mut buf[..size]) {
                    Ok(Some(r)) if r.len > size => return Err("try_recv overran the buffer".into()),
                    Ok(Some(_)) => stats.frames += 1,
                    Ok(None) => {}
                    Err(e) => expected(stats, e, "try_recv", &[is_corrupt, is_small_buf])?,
                }
            }
            5 => {
                let release = s.byte() & 1 == 1;
                match victim.peek() {
                    Ok(Some(frame)) => {
                        let payload = frame.payload();
                        if !inside(payload.as_ptr(), payload.len(), data, cap) {
                            return Err("peek handed out a slice outside the data area".into());
                        }
                        let _sum = payload.ones_complement_sum();
                        stats.frames += 1;
                        if release {
                            frame.release();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => expected(stats, e, "peek", &[is_corrupt])?,
                }
            }
            6 => {
                let _ = victim.flush();
            }
            7 => {
                let _ = victim.flush();
                if let Err(e) = victim.prepare_sleep() {
                    expected(stats, e, "prepare_sleep", &[is_corrupt])?;
                }
            }
            _ => {
                let avail = victim.available();
                if avail > cap {
                    return Err(format!("available {avail} beyond capacity {cap}"));
                }
            }
        }
        if !arena.guards_intact() {
            return Err("guard bytes overwritten".into());
        }
    }
    drop((peer, victim));
    Ok(())
}

fn victim_producer(
    cap: usize,
    mode: Mode,
    s: &mut Script<'_>,
    stats: &mut Stats,
) -> Result<(), String> {
    let mut arena = Arena::new(cap);
    let (pp, plen) = arena.producer_part();
    let (cp, clen) = arena.consumer_part();
    // SAFETY: disjoint parts of the arena, which outlives both sides.
    let (mut victim, mut peer) = unsafe {
        let cinit = Consumer::init_mode(cp, clen, mode).map_err(|e| e.to_string())?;
        let victim = Producer::new(pp, plen, cp, clen, cap).map_err(|e| e.to_string())?;
        (victim, cinit.attach(pp, plen).map_err(|e| e.to_string())?)
    };
    // SAFETY: inside the producer part.
    let data = unsafe { pp.add(layout::P_DATA) };
    let mut buf = vec![0u8; cap];
    while !s.done() {
        match s.byte() % 9 {
            0 => {
                let len = s.byte() as usize;
                let frame = vec![0x5A; len];
                match victim.try_send(&frame) {
                    Ok(_) => stats.frames += 1,
                    Err(e) => expected(stats, e, "try_send", &[is_corrupt, is_full_or_large])?,
                }
            }
            1 => {
                let len = s.byte() as usize;
                let how = s.byte();
                match victim.grant(len) {
                    Ok(mut g) => {
                        if g.len() != len || !inside(g.as_ptr(), g.len(), data, cap) {
                            return Err("grant outside the data area or of the wrong length".into());
                        }
                        g.fill(how);
                        stats.frames += 1;
                        match how % 3 {
                            0 => g.commit(),
                            1 => g.commit_len(len / 2),
                            _ => {}
                        }
                    }
                    Err(e) => expected(stats, e, "grant", &[is_corrupt, is_full_or_large])?,
                }
            }
            2 | 3 => {
                let off = match s.byte() % 5 {
                    0 | 1 => layout::C_INDEX,
                    2 => layout::C_DATA_EVENT,
                    3 => layout::C_MAGIC,
                    _ => layout::C_VERSION,
                };
                // SAFETY: aligned word inside the consumer part.
                poke(unsafe { cp.add(off) }.cast(), s);
            }
            4 => {
                let _ = victim.flush();
            }
            5 => {
                let _ = victim.flush();
                match victim.prepare_wait_for_space(s.byte() as usize) {
                    Ok(_) => {}
                    Err(e) => expected(
                        stats,
                        e,
                        "prepare_wait_for_space",
                        &[is_corrupt, is_full_or_large],
                    )?,
                }
            }
            6 => {
                let free = victim.free_space();
                if free > cap {
                    return Err(format!("free space {free} beyond capacity {cap}"));
                }
            }
            7 => {
                // Honest peer consumer (its own index may have been overwritten by the attacker;
                // it never re-reads it).
                let _ = peer.try_recv(&mut buf);
            }
            _ => {
                if let Ok(Some(f)) = peer.peek() {
                    f.release();
                }
                let _ = peer.flush();
            }
        }
        if !arena.guards_intact() {
            return Err("guard bytes overwritten".into());
        }
    }
    drop((victim, peer));
    Ok(())
}
