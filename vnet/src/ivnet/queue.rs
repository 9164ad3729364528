//! The `ivshmem-net` transport over two mapped output sections: [`Queues`] sends in its own
//! section and receives from the peer's, following `/work/shared/ivshmem-net.md`.
//!
//! - **TX** (own section): a frame is written straight into a data slot (zero-copy for the
//!   caller), its descriptor (`addr` section-relative, `flags` 0) and avail entry are written,
//!   and [`Queues::flush`] publishes `avail.idx` once per batch with release ordering. The
//!   doorbell is wanted only if `vring_need_event(peer's avail_event, new, old)`. Descriptor
//!   ids are taken in avail order (`index % qlen`), so in-order completions free them in
//!   order; the slot of a completed frame is found from the own descriptor (own memory, which
//!   the peer cannot write).
//! - **Completions** of our frames are read from the used ring in the *peer's* section: each
//!   must name the oldest outstanding id with length 1, and `used.idx` may not run ahead of
//!   what is outstanding.
//! - **RX** (peer's section): each new avail entry and its descriptor are read once and
//!   checked (id < qlen, flags 0, frame inside the peer's data area), the frame is copied once
//!   into the caller's buffer through [`PeerBytes`] (never a `&[u8]` over peer memory), and
//!   `{id, 1}` goes into the used ring of the *own* section; `used.idx` is published on flush
//!   and the sender is rung only if `vring_need_event(sender's used_event, …)`.
//! - **Sleep**: [`Queues::prepare_sleep`] publishes `avail_event` = last seen index (and
//!   `used_event` when TX is short of room), then looks once more.
//!
//! A broken peer yields a [`PeerFault`] naming what was wrong; the queues stay faulted (every
//! later call returns the same fault) until the link tears them down. Nothing here panics on
//! peer data or reads/writes outside the two sections.

use core::sync::atomic::{fence, AtomicU16, Ordering};

use ivshmem_dev::Section;
use shmring::view::PeerBytes;

use super::wire::{self, Geometry, GeometryError, SlotRing};

/// What the peer did wrong. The link stops with this error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerFault {
    /// An avail entry names a descriptor beyond the queue.
    #[error("peer published descriptor id {id}, out of range for a queue of {qlen}")]
    DescriptorIdOutOfRange {
        /// The id.
        id: u32,
        /// Queue length.
        qlen: u16,
    },
    /// A descriptor's flags are not 0.
    #[error("peer's descriptor {id} has flags {flags:#06x}, not 0")]
    DescriptorFlags {
        /// Descriptor id.
        id: u16,
        /// The flags.
        flags: u16,
    },
    /// A frame lies (partly) outside the peer's data area.
    #[error("peer's descriptor {id}: frame of {len} bytes at offset {addr:#x} lies outside the data area {start:#x}..{end:#x}")]
    FrameOutsideDataArea {
        /// Descriptor id.
        id: u16,
        /// Section-relative address.
        addr: u64,
        /// Frame length.
        len: u32,
        /// Data area start.
        start: usize,
        /// Data area end (section length).
        end: usize,
    },
    /// A completion of one of our frames has a length other than 1.
    #[error("peer completed descriptor {id} with length {len}, not 1")]
    CompletionLength {
        /// Completed id.
        id: u32,
        /// Its length.
        len: u32,
    },
    /// A completion does not name the oldest outstanding frame.
    #[error("peer completed descriptor {id} out of order: the oldest outstanding is {expected}")]
    CompletionOutOfOrder {
        /// Completed id.
        id: u32,
        /// The oldest outstanding id.
        expected: u16,
    },
    /// `avail.idx` in the peer's section is more than a queue ahead of what we consumed.
    #[error("peer's avail.idx {idx} ran ahead: {seen} consumed, queue of {qlen}")]
    AvailIndexRanAhead {
        /// Published index.
        idx: u16,
        /// Last index consumed.
        seen: u16,
        /// Queue length.
        qlen: u16,
    },
    /// `used.idx` in the peer's section completes more than we have outstanding.
    #[error("peer's used.idx {idx} ran ahead: {seen} completed, {outstanding} outstanding")]
    UsedIndexRanAhead {
        /// Published index.
        idx: u16,
        /// Last completion seen.
        seen: u16,
        /// Frames outstanding.
        outstanding: u16,
    },
}

/// Why two sections cannot carry the queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The section's size gives no valid geometry.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    /// Both sides derive the geometry from their own section: the sizes must agree.
    #[error("output sections differ in size: own {own} bytes, peer's {peer} bytes")]
    SectionSizesDiffer {
        /// Own section length.
        own: usize,
        /// Peer's section length.
        peer: usize,
    },
    /// A section is not 64-byte aligned.
    #[error("{which} output section at {addr:#x} is not 64-byte aligned")]
    Misaligned {
        /// `"own"` or `"peer's"`.
        which: &'static str,
        /// Its address.
        addr: usize,
    },
    /// The own section is not writable.
    #[error("own output section is not writable")]
    OwnNotWritable,
    /// The configured largest frame does not fit a slot of the data area.
    #[error("frames of {max_frame} bytes do not fit the data area (largest {limit})")]
    FrameTooLarge {
        /// Configured largest frame.
        max_frame: usize,
        /// The largest that fits.
        limit: usize,
    },
}

/// Counters of one [`Queues`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Frames sent.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames received and handed to the caller.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames received and dropped (longer than the caller's buffer, or shorter than an
    /// Ethernet header); completed all the same.
    pub rx_dropped: u64,
    /// Flushes after which the peer wanted a doorbell.
    pub doorbells: u64,
}

/// Clears the own section's queue area (both rings and the event words) before READY.
///
/// The caller owns `own` (writable, at least `geometry.vrsize()` bytes, not yet announced).
pub fn init_own(own: &Section, geometry: Geometry) {
    let len = geometry.vrsize().min(own.len());
    // SAFETY: `len` bytes at the start of the own section, which `Section` promises is mapped
    // writable; the peer does not read it before we announce READY.
    unsafe { core::ptr::write_bytes(own.as_ptr(), 0, len) };
    fence(Ordering::Release);
}

/// The TX and RX queues of an attached link. See the module documentation.
#[derive(Debug)]
pub struct Queues {
    own: Section,
    peer: Section,
    geo: Geometry,
    max_frame: usize,
    // TX
    slots: SlotRing,
    /// Next avail index to fill (private), = published + pending.
    tx_next: u16,
    /// Last avail index stored in `avail.idx`.
    tx_published: u16,
    /// Completions consumed from the peer's used ring.
    tx_completed: u16,
    /// A transmit found no room since the last prepare_sleep.
    tx_short: bool,
    // RX
    /// Entries of the peer's avail ring consumed.
    rx_seen: u16,
    /// Last `used.idx` stored in the own section.
    rx_published: u16,
    fault: Option<PeerFault>,
    stats: QueueStats,
}

/// The peer's whole section as an untrusted view, borrowing a copy of its description.
fn peer_bytes(peer: &Section) -> PeerBytes<'_> {
    // SAFETY: the peer's section is mapped readable for as long as the queues live
    // (`Section`'s contract; the copy is a local of a `Queues` method); `PeerBytes` reads it
    // only through raw volatile accesses.
    unsafe { PeerBytes::new(peer.as_ptr(), peer.len()) }
}

// SAFETY: `Queues` only holds section descriptions (address ranges every thread of the cell
// sees the same way) and plain counters.
unsafe impl Send for Queues {}

impl Queues {
    /// Attaches to a peer: own section `own` (already cleared by [`init_own`]), the peer's
    /// `peer`, frames up to `max_frame` bytes each way.
    ///
    /// The sections must stay mapped while the queues live ([`Section`]'s contract).
    pub fn new(own: Section, peer: Section, max_frame: usize) -> Result<Queues, QueueError> {
        if !own.is_writable() {
            return Err(QueueError::OwnNotWritable);
        }
        for (which, s) in [("own", &own), ("peer's", &peer)] {
            if !(s.as_ptr() as usize).is_multiple_of(wire::VRING_ALIGN) {
                return Err(QueueError::Misaligned {
                    which,
                    addr: s.as_ptr() as usize,
                });
            }
        }
        if own.len() != peer.len() {
            return Err(QueueError::SectionSizesDiffer {
                own: own.len(),
                peer: peer.len(),
            });
        }
        let geo = Geometry::new(own.len())?;
        let limit = geo.max_frame();
        if max_frame > limit {
            return Err(QueueError::FrameTooLarge { max_frame, limit });
        }
        Ok(Queues {
            own,
            peer,
            geo,
            max_frame,
            slots: SlotRing::new(geo.data_len()),
            tx_next: 0,
            tx_published: 0,
            tx_completed: 0,
            tx_short: false,
            rx_seen: 0,
            rx_published: 0,
            fault: None,
            stats: QueueStats::default(),
        })
    }

    /// The geometry of both sections.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Largest frame each way.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The fault that stopped the queues, if any.
    pub fn fault(&self) -> Option<PeerFault> {
        self.fault
    }

    /// Frames sent and not yet completed.
    pub fn outstanding(&self) -> u16 {
        self.tx_next.wrapping_sub(self.tx_completed)
    }

    fn check(&self) -> Result<(), PeerFault> {
        match self.fault {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    fn fail<T>(&mut self, fault: PeerFault) -> Result<T, PeerFault> {
        self.fault = Some(fault);
        Err(fault)
    }

    // ---- raw access ------------------------------------------------------------------

    /// Acquire load of an index word in the peer's section (possibly mapped read-only):
    /// a relaxed atomic load followed by an acquire fence.
    fn peer_index(&self, offset: usize) -> u16 {
        debug_assert!(offset + 2 <= self.peer.len() && offset.is_multiple_of(2));
        // SAFETY: `offset` comes from the geometry of this section (inside it, even; the
        // section is 64-byte aligned): an aligned u16 that stays mapped. Only loaded.
        let value = unsafe { AtomicU16::from_ptr(self.peer.as_ptr().add(offset).cast()) }
            .load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        u16::from_le(value)
    }

    /// Release store of an index word in the own section.
    fn store_own_index(&self, offset: usize, value: u16) {
        debug_assert!(offset + 2 <= self.own.len() && offset.is_multiple_of(2));
        // SAFETY: as `peer_index`, in the own (writable) section.
        unsafe { AtomicU16::from_ptr(self.own.as_ptr().add(offset).cast()) }
            .store(value.to_le(), Ordering::Release);
    }

    /// Writes `bytes` at `offset` of the own section.
    fn write_own(&self, offset: usize, bytes: &[u8]) {
        debug_assert!(offset + bytes.len() <= self.own.len());
        // SAFETY: inside the own section (offsets from its geometry), which is writable and
        // written by nobody else; `bytes` is caller memory.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.own.as_ptr().add(offset),
                bytes.len(),
            )
        };
    }

    /// Reads `N` bytes at `offset` of the own section (trusted: only we write it).
    fn read_own<const N: usize>(&self, offset: usize) -> [u8; N] {
        debug_assert!(offset + N <= self.own.len());
        let mut out = [0; N];
        // SAFETY: inside the own section; read through a raw pointer into a local.
        unsafe {
            core::ptr::copy_nonoverlapping(self.own.as_ptr().add(offset), out.as_mut_ptr(), N)
        };
        out
    }

    // ---- TX ----------------------------------------------------------------------------

    /// Consumes the peer's completions of our frames, freeing descriptors and slots in
    /// order. Returns how many were completed.
    pub fn reclaim(&mut self) -> Result<u16, PeerFault> {
        self.check()?;
        let idx = self.peer_index(self.geo.used_idx());
        let new = idx.wrapping_sub(self.tx_completed);
        let outstanding = self.outstanding();
        if new > outstanding {
            return self.fail(PeerFault::UsedIndexRanAhead {
                idx,
                seen: self.tx_completed,
                outstanding,
            });
        }
        let section = self.peer;
        let peer = peer_bytes(&section);
        for _ in 0..new {
            let at = self.geo.used_ring(self.tx_completed);
            // Inside the section by the geometry; a failed read cannot happen, but is a
            // fault rather than a panic.
            let (id, len) = match (peer.read_u32_le(at), peer.read_u32_le(at + 4)) {
                (Ok(id), Ok(len)) => (id, len),
                _ => {
                    return self.fail(PeerFault::UsedIndexRanAhead {
                        idx,
                        seen: self.tx_completed,
                        outstanding,
                    })
                }
            };
            let expected = self.tx_completed % self.geo.qlen();
            if id >= u32::from(self.geo.qlen()) {
                return self.fail(PeerFault::DescriptorIdOutOfRange {
                    id,
                    qlen: self.geo.qlen(),
                });
            }
            if id != u32::from(expected) {
                return self.fail(PeerFault::CompletionOutOfOrder { id, expected });
            }
            if len != wire::COMPLETION_LEN {
                return self.fail(PeerFault::CompletionLength { id, len });
            }
            let desc = wire::Descriptor::from_bytes(self.read_own(self.geo.desc(expected)));
            let at = (desc.addr as usize).saturating_sub(self.geo.data_offset());
            self.slots.release(at, desc.len as usize);
            self.tx_completed = self.tx_completed.wrapping_add(1);
        }
        Ok(new)
    }

    /// Whether a frame of `len` bytes could be sent now (after reclaiming). A "no" for want
    /// of room counts as a shortage: the next [`prepare_sleep`](Self::prepare_sleep) asks the
    /// peer for a doorbell on its next completion.
    pub fn can_send(&mut self, len: usize) -> bool {
        if self.reclaim().is_err() || len > self.max_frame {
            return false;
        }
        let room = self.outstanding() < self.geo.qlen() && self.slots.place(len).is_some();
        self.tx_short |= !room;
        room
    }

    /// Sends a frame of `len` bytes (at most [`max_frame`](Self::max_frame)), written by `fill`
    /// straight into its slot in the own section. `Ok(None)` if there is no room now (no free
    /// descriptor or data slot; [`prepare_sleep`](Self::prepare_sleep) then asks the peer for
    /// a doorbell on the next completion) or the frame is too long. The frame is published by
    /// the next [`flush`](Self::flush).
    pub fn send<T>(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> T,
    ) -> Result<Option<T>, PeerFault> {
        match self.try_send(len, fill) {
            Ok(r) => Ok(Some(r)),
            Err(_) => self.check().map(|()| None),
        }
    }

    /// [`send`](Self::send), handing `fill` back uncalled when the frame is not sent: no
    /// room, too long, or the peer broke the format (then [`fault`](Self::fault) says how).
    pub fn try_send<T, F: FnOnce(&mut [u8]) -> T>(&mut self, len: usize, fill: F) -> Result<T, F> {
        if self.reclaim().is_err() || len > self.max_frame {
            return Err(fill);
        }
        if self.outstanding() >= self.geo.qlen() {
            self.tx_short = true;
            return Err(fill);
        }
        let Some(at) = self.slots.take(len) else {
            self.tx_short = true;
            return Err(fill);
        };
        let offset = self.geo.data_offset() + at;
        // SAFETY: the slot [offset, offset + len) lies in the own data area (the slot ring
        // only hands out slots inside it) and is free: not published, so the peer has no
        // business reading it, and nobody else writes the own section. The slice is dropped
        // before the frame is published.
        let frame = unsafe { core::slice::from_raw_parts_mut(self.own.as_ptr().add(offset), len) };
        let result = fill(frame);
        let id = self.tx_next % self.geo.qlen();
        let desc = wire::Descriptor {
            addr: offset as u64,
            len: len as u32,
            flags: 0,
            next: 0,
        };
        self.write_own(self.geo.desc(id), &desc.to_bytes());
        self.write_own(self.geo.avail_ring(self.tx_next), &id.to_le_bytes());
        self.tx_next = self.tx_next.wrapping_add(1);
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += len as u64;
        Ok(result)
    }

    // ---- RX ----------------------------------------------------------------------------

    /// Receives the next frame of the peer, copied once into `buf`; returns its length, or
    /// `None` if nothing is pending. Frames longer than `buf` (or than
    /// [`max_frame`](Self::max_frame)) or shorter than an Ethernet header are dropped and
    /// counted. The frame is completed at once (`{id, 1}` in the own used ring), published
    /// by the next [`flush`](Self::flush).
    pub fn receive(&mut self, buf: &mut [u8]) -> Result<Option<usize>, PeerFault> {
        self.check()?;
        loop {
            let idx = self.peer_index(self.geo.avail_idx());
            let pending = idx.wrapping_sub(self.rx_seen);
            if pending == 0 {
                return Ok(None);
            }
            let qlen = self.geo.qlen();
            if pending > qlen {
                return self.fail(PeerFault::AvailIndexRanAhead {
                    idx,
                    seen: self.rx_seen,
                    qlen,
                });
            }
            let section = self.peer;
            let peer = peer_bytes(&section);
            let read = (|| {
                let id = peer.read_u16_le(self.geo.avail_ring(self.rx_seen))?;
                if id >= qlen {
                    return Ok(Err(PeerFault::DescriptorIdOutOfRange {
                        id: u32::from(id),
                        qlen,
                    }));
                }
                let mut raw = [0u8; wire::DESC_SIZE];
                peer.copy_range_to(self.geo.desc(id), &mut raw)?;
                Ok(Ok((id, wire::Descriptor::from_bytes(raw))))
            })();
            let (id, desc) = match read {
                Ok(Ok(v)) => v,
                Ok(Err(fault)) => return self.fail(fault),
                // Offsets from the geometry lie inside the section; unreachable in practice.
                Err(shmring::view::OutOfBounds { .. }) => {
                    return self.fail(PeerFault::DescriptorIdOutOfRange { id: u32::MAX, qlen })
                }
            };
            if desc.flags != 0 {
                return self.fail(PeerFault::DescriptorFlags {
                    id,
                    flags: desc.flags,
                });
            }
            if !self.geo.frame_in_data_area(desc.addr, desc.len) {
                return self.fail(PeerFault::FrameOutsideDataArea {
                    id,
                    addr: desc.addr,
                    len: desc.len,
                    start: self.geo.data_offset(),
                    end: self.geo.section_len(),
                });
            }
            let len = desc.len as usize;
            let copied = if len > buf.len() || len > self.max_frame || len < wire::ETH_HEADER {
                self.stats.rx_dropped += 1;
                None
            } else {
                // In range: checked against the data area just above.
                match peer.subslice(desc.addr as usize, len) {
                    Ok(frame) => Some(frame.copy_to(&mut buf[..len])),
                    Err(_) => None,
                }
            };
            // Complete in order, whatever happened to the frame.
            let at = self.geo.used_ring(self.rx_seen);
            let elem = wire::UsedElem {
                id: u32::from(id),
                len: wire::COMPLETION_LEN,
            };
            self.write_own(at, &elem.to_bytes());
            self.rx_seen = self.rx_seen.wrapping_add(1);
            if let Some(n) = copied {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += n as u64;
                return Ok(Some(n));
            }
        }
    }

    /// Whether the peer has published frames we have not received.
    pub fn rx_pending(&self) -> bool {
        self.fault.is_none() && self.peer_index(self.geo.avail_idx()) != self.rx_seen
    }

    // ---- publish, doorbell, sleep --------------------------------------------------------

    /// Publishes sent frames (`avail.idx`) and completions (`used.idx`), one store each.
    /// Returns whether the peer asked for a doorbell (ring its data vector).
    pub fn flush(&mut self) -> bool {
        if self.fault.is_some() {
            return false;
        }
        let mut ring = false;
        if self.tx_next != self.tx_published {
            let (old, new) = (self.tx_published, self.tx_next);
            self.store_own_index(self.geo.avail_idx(), new);
            self.tx_published = new;
            fence(Ordering::SeqCst);
            let event = self.peer_index(self.geo.avail_event());
            ring |= wire::need_event(event, new, old);
        }
        if self.rx_seen != self.rx_published {
            let (old, new) = (self.rx_published, self.rx_seen);
            self.store_own_index(self.geo.used_idx(), new);
            self.rx_published = new;
            fence(Ordering::SeqCst);
            let event = self.peer_index(self.geo.used_event());
            ring |= wire::need_event(event, new, old);
        }
        if ring {
            self.stats.doorbells += 1;
        }
        ring
    }

    /// Flushes, then asks the peer for a doorbell on its next frame (`avail_event` = last
    /// seen) and, if a send found no room, on its next completion (`used_event`), and looks
    /// once more. Returns `(idle, ring)`: `idle` if the caller may sleep until its next
    /// interrupt, `ring` if the peer wants a doorbell.
    pub fn prepare_sleep(&mut self) -> (bool, bool) {
        let ring = self.flush();
        if self.fault.is_some() {
            return (false, ring);
        }
        self.write_own(self.geo.avail_event(), &self.rx_seen.to_le_bytes());
        let short = self.tx_short && self.outstanding() > 0;
        if short {
            self.write_own(self.geo.used_event(), &self.tx_completed.to_le_bytes());
        }
        self.tx_short = false;
        fence(Ordering::SeqCst);
        let rx_more = self.peer_index(self.geo.avail_idx()) != self.rx_seen;
        let tx_more = short && self.peer_index(self.geo.used_idx()) != self.tx_completed;
        (!rx_more && !tx_more, ring)
    }
}
