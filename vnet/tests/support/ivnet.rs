//! Two `ivshmem-net` output sections in one buffer with guard bytes around them, and the
//! hostile-peer scenario shared by the `ivnet_hostile` proptest and the `ivnet_hostile_peer`
//! fuzz target.
//!
//! Scenario: a victim [`Queues`] (own section A, reading B) runs against a peer that mixes
//! honest operations (a real `Queues` on section B) with arbitrary writes into B: descriptors,
//! avail and used indices and entries, event words, frame bytes. Properties after every step:
//! - the victim never panics (a panic fails the test / is a fuzz crash);
//! - a victim error is a `PeerFault`, and once faulted it stays faulted with the same fault;
//! - no frame handed to the victim's caller is longer than the buffer;
//! - the guard bytes are untouched (no write outside the two sections);
//! - without hostile writes the victim never faults and every frame arrives intact, in order.
#![allow(dead_code)]

use std::ptr::NonNull;

use ivshmem_dev::Section;
use vnet::ivnet::{Geometry, PeerFault, Queues};

const GUARD: usize = 256;
const GUARD_BYTE: u8 = 0xA5;

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Guard, section A, guard, section B, guard.
pub struct Arena {
    lines: Vec<Line>,
    section: usize,
}

impl Arena {
    /// Two sections of `section` bytes (a multiple of 64).
    pub fn new(section: usize) -> Arena {
        assert_eq!(section % 64, 0);
        let len = 3 * GUARD + 2 * section;
        let mut arena = Arena {
            lines: vec![Line([0; 64]); len / 64],
            section,
        };
        let base = arena.base();
        for r in arena.guards() {
            for i in r {
                // SAFETY: inside the buffer.
                unsafe { base.add(i).write(GUARD_BYTE) };
            }
        }
        arena
    }
    fn base(&mut self) -> *mut u8 {
        self.lines.as_mut_ptr().cast()
    }
    fn offset(&self, which: usize) -> usize {
        GUARD + which * (self.section + GUARD)
    }
    fn guards(&self) -> [std::ops::Range<usize>; 3] {
        let a = self.offset(0);
        let b = self.offset(1);
        [
            0..GUARD,
            a + self.section..b,
            b + self.section..b + self.section + GUARD,
        ]
    }
    /// Whether every guard byte is intact.
    pub fn guards_intact(&mut self) -> bool {
        let base = self.base();
        self.guards().into_iter().flatten().all(|i| {
            // SAFETY: inside the buffer.
            unsafe { base.add(i).read() == GUARD_BYTE }
        })
    }
    /// Section `which` (0 = A, 1 = B) as a `Section`, writable or not.
    pub fn section(&mut self, which: usize, writable: bool) -> Section {
        let off = self.offset(which);
        // SAFETY: inside the buffer, which outlives every user in the tests (declared first).
        unsafe {
            Section::new(
                NonNull::new(self.base().add(off)).unwrap(),
                self.section,
                writable,
            )
        }
    }
    /// Writes `bytes` at `offset` of section `which` (the hostile peer's raw writes).
    pub fn poke(&mut self, which: usize, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.section);
        let at = self.offset(which) + offset;
        let base = self.base();
        // SAFETY: inside section `which`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(at), bytes.len()) };
    }
    /// Reads `n` bytes at `offset` of section `which`.
    pub fn peek(&mut self, which: usize, offset: usize, n: usize) -> Vec<u8> {
        assert!(offset + n <= self.section);
        let at = self.offset(which) + offset;
        let base = self.base();
        let mut out = vec![0; n];
        // SAFETY: inside section `which`.
        unsafe { std::ptr::copy_nonoverlapping(base.add(at), out.as_mut_ptr(), n) };
        out
    }
    /// Section length.
    pub fn section_len(&self) -> usize {
        self.section
    }
    /// Both sides set up (sections cleared) and attached: (A's queues, B's queues).
    pub fn pair(&mut self, max_frame: usize) -> (Queues, Queues) {
        let geo = Geometry::new(self.section).unwrap();
        let (a, b) = (self.section(0, true), self.section(1, true));
        vnet::ivnet::queue::init_own(&a, geo);
        vnet::ivnet::queue::init_own(&b, geo);
        let qa = Queues::new(a, self.section(1, false), max_frame).unwrap();
        let qb = Queues::new(b, self.section(0, false), max_frame).unwrap();
        (qa, qb)
    }
}

/// A test frame: `len` bytes, the first 4 the sequence number, then a pattern from it.
pub fn frame(seq: u32, len: usize, out: &mut [u8]) {
    for (i, b) in out[..len].iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    let n = len.min(4);
    out[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
}

/// Section size of the scenario: qlen 64, a 14,592-byte data area.
pub const SECTION: usize = 0x4000;
/// Largest frame of the scenario.
pub const MAX_FRAME: usize = 1514;

/// What one run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Frames the victim received.
    pub received: u64,
    /// Frames the victim sent.
    pub sent: u64,
    /// Runs that ended with the victim faulted.
    pub faulted: u64,
    /// Hostile writes made.
    pub pokes: u64,
}

/// Runs a script (see the module docs). Returns a violated property, if any.
pub fn run(script: &[u8]) -> Result<Stats, String> {
    let mut arena = Arena::new(SECTION);
    let geo = Geometry::new(SECTION).unwrap();
    let (mut victim, mut peer) = arena.pair(MAX_FRAME);
    let mut stats = Stats::default();
    let mut buf = vec![0u8; MAX_FRAME];
    let mut scratch = vec![0u8; MAX_FRAME];
    let mut fault: Option<PeerFault> = None;
    let (mut peer_seq, mut victim_expect, mut victim_seq, mut peer_expect) =
        (0u32, 0u32, 0u32, 0u32);
    let mut peer_broken = false;
    let mut bytes = script.iter().copied();
    let mut next = move || bytes.next();
    let note = |fault: &mut Option<PeerFault>, r: Result<(), PeerFault>| -> Result<(), String> {
        match (r, *fault) {
            (Ok(()), None) => Ok(()),
            (Ok(()), Some(f)) => Err(format!("victim recovered from {f} by itself")),
            (Err(e), None) => {
                *fault = Some(e);
                Ok(())
            }
            (Err(e), Some(f)) if e == f => Ok(()),
            (Err(e), Some(f)) => Err(format!("fault changed from {f} to {e}")),
        }
    };
    while let Some(op) = next() {
        let arg = u16::from_le_bytes([next().unwrap_or(0), next().unwrap_or(0)]);
        match op % 10 {
            // Victim sends.
            0 | 1 => {
                let len = 14 + arg as usize % (MAX_FRAME - 13);
                frame(victim_seq, len, &mut scratch);
                let r = victim.send(len, |f| f.copy_from_slice(&scratch[..len]));
                if let Ok(Some(())) = r {
                    victim_seq += 1;
                    stats.sent += 1;
                }
                note(&mut fault, r.map(|_| ()))?;
            }
            // Victim receives.
            2 | 3 => {
                let r = victim.receive(&mut buf);
                if let Ok(Some(n)) = r {
                    if n > buf.len() {
                        return Err(format!("frame of {n} bytes in a buffer of {}", buf.len()));
                    }
                    stats.received += 1;
                    if !peer_broken {
                        frame(victim_expect, n, &mut scratch);
                        if buf[..n] != scratch[..n] {
                            return Err(format!(
                                "frame {victim_expect} corrupted without a hostile write"
                            ));
                        }
                    }
                    victim_expect += 1;
                }
                note(&mut fault, r.map(|_| ()))?;
            }
            4 => {
                victim.flush();
                note(&mut fault, victim.fault().map_or(Ok(()), Err))?;
            }
            5 => {
                victim.prepare_sleep();
                note(&mut fault, victim.fault().map_or(Ok(()), Err))?;
            }
            // Honest peer.
            6 => {
                let len = 14 + arg as usize % (MAX_FRAME - 13);
                frame(peer_seq, len, &mut scratch);
                if let Ok(Some(())) = peer.send(len, |f| f.copy_from_slice(&scratch[..len])) {
                    peer_seq += 1;
                }
                peer.flush();
            }
            7 => {
                while let Ok(Some(n)) = peer.receive(&mut buf) {
                    if peer.fault().is_none() {
                        frame(peer_expect, n, &mut scratch);
                        if buf[..n] != scratch[..n] {
                            return Err(format!("victim's frame {peer_expect} arrived corrupted"));
                        }
                    }
                    peer_expect += 1;
                }
                peer.flush();
            }
            // Hostile writes into B: a field of the queue, or anywhere.
            _ => {
                let value = [
                    next().unwrap_or(0),
                    next().unwrap_or(0),
                    next().unwrap_or(0),
                    next().unwrap_or(0),
                ];
                let index = arg;
                let target = match next().unwrap_or(0) % 8 {
                    0 => geo.avail_idx(),
                    1 => geo.avail_ring(index),
                    2 => geo.desc(index % geo.qlen()) + [0, 8, 12][index as usize % 3],
                    3 => geo.used_idx(),
                    4 => geo.used_ring(index) + 4 * (index as usize % 2),
                    5 => geo.avail_event(),
                    6 => geo.used_event(),
                    _ => index as usize % (SECTION - 4),
                };
                let width = if matches!(value[3] % 3, 0) { 4 } else { 2 };
                arena.poke(1, target.min(SECTION - width), &value[..width]);
                stats.pokes += 1;
                peer_broken = true;
            }
        }
        if !arena.guards_intact() {
            return Err("a guard byte was overwritten".into());
        }
        if let (false, Some(f)) = (peer_broken, fault) {
            return Err(format!("honest peer, yet the victim faulted: {f}"));
        }
    }
    if fault.is_some() {
        stats.faulted = 1;
    }
    Ok(stats)
}
