//! The producer side of a ring.

use core::cell::Cell;
use core::ops::{Deref, DerefMut};
use core::ptr;

use crate::layout::{self, FrameHeader, FLAG_PADDING, NO_EVENT};
use crate::sync::{fence, load_acquire, word, Ordering};
use crate::{check_region, Error, Notify, Owner};

/// A producer part that is initialised (and announced) but not yet attached to its consumer.
///
/// Obtained from [`Producer::init`] or [`Producer::reset`]. [`attach`](Self::attach) takes
/// `&self`: on [`Error::PeerNotReady`] (or any other error) keep the value and try again
/// later. After one successful attach, further attaches return [`Error::AlreadyAttached`], so
/// there is never more than one [`Producer`] per part.
pub struct ProducerInit {
    own: *mut u8,
    capacity: usize,
    attached: Cell<bool>,
    owner: Owner,
}

// SAFETY: the value only holds pointers into mappings the creator promised stay valid; moving it
// to another thread moves the exclusive right to become the producer of this part.
unsafe impl Send for ProducerInit {}

/// The writing side of a ring (single producer). See the crate documentation.
pub struct Producer {
    /// Data area (own part + `P_DATA`).
    data: *mut u8,
    /// Own producer part.
    own: *mut u8,
    /// Peer (consumer) part, read only.
    peer: *const u8,
    /// `capacity - 1`.
    mask: u64,
    capacity: u64,
    /// Local write position: everything committed (published or not).
    write: u64,
    /// Last value stored into the producer index.
    published: u64,
    /// Last validated consumer index.
    cached_cons: u64,
    max_frame: usize,
    owner: Owner,
}

// SAFETY: a producer is the only writer of its part; it may move between threads. It is not Sync
// (all methods take `&mut self`).
unsafe impl Send for Producer {}

impl core::fmt::Debug for Producer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity)
            .field("write", &self.write)
            .field("published", &self.published)
            .field("cached_cons", &self.cached_cons)
            .finish()
    }
}

impl core::fmt::Debug for ProducerInit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ProducerInit")
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Initialises a producer part (shared by `init` and `reset`).
///
/// # Safety
/// `own` is valid for writes of `producer_part_size(capacity)` bytes, 64-byte aligned.
unsafe fn write_producer_part(own: *mut u8, capacity: usize) {
    // SAFETY (all blocks below): offsets are inside the part, words are 8-byte aligned because
    // the part is 64-byte aligned, and nobody else writes this part.
    unsafe {
        // Magic 0 first: a peer attaching concurrently sees "not ready" until we are done.
        word(own.add(layout::P_MAGIC).cast()).store(0, Ordering::Relaxed);
        let version = u64::from_ne_bytes(zerocopy::transmute!([
            layout::LAYOUT_VERSION.to_ne_bytes(),
            [0u8; 4]
        ]));
        word(own.add(layout::P_VERSION).cast()).store(version, Ordering::Relaxed);
        word(own.add(layout::P_CAPACITY).cast()).store(capacity as u64, Ordering::Relaxed);
        word(own.add(layout::P_INDEX).cast()).store(0, Ordering::Relaxed);
        word(own.add(layout::P_SPACE_EVENT).cast()).store(NO_EVENT, Ordering::Relaxed);
        // Zero the data area so a grant never hands out uninitialised bytes.
        ptr::write_bytes(own.add(layout::P_DATA), 0, capacity);
        // Release: a consumer that sees the magic with Acquire also sees every field above.
        word(own.add(layout::P_MAGIC).cast()).store(layout::PRODUCER_MAGIC, Ordering::Release);
    }
}

/// Stores a frame header word (Relaxed: published later by the Release store of the index).
///
/// # Safety
/// `p` is an aligned word inside our own data area.
#[inline(always)]
unsafe fn store_header(p: *mut u64, header: FrameHeader) {
    // Miri only: a plain whole-word write first. Payload bytes written earlier may partially
    // overlap this word, and Miri's weak-memory emulation (nightly 2026-05) crashes on an atomic
    // store over a word whose bytes were last written partly atomically, partly not. The plain
    // write is race-free (the space is ours) and changes nothing else.
    #[cfg(miri)]
    // SAFETY: as the caller promises.
    unsafe {
        p.write(header.to_word())
    };
    // SAFETY: as the caller promises.
    unsafe { word(p) }.store(header.to_word(), Ordering::Relaxed);
}

impl Producer {
    /// Phase one: initialises the producer part at `own` (header, index 0, zeroed data area).
    ///
    /// # Safety
    /// - `own` points to `own_len` bytes of memory that are writable by this process and stay
    ///   mapped for the lifetime of the returned value and of the [`Producer`] made from it;
    /// - nobody else in this process or elsewhere writes those bytes (the peer only reads them);
    /// - no other `ProducerInit`/`Producer` exists for this part.
    pub unsafe fn init(
        own: *mut u8,
        own_len: usize,
        capacity: usize,
    ) -> Result<ProducerInit, Error> {
        if !layout::capacity_ok(capacity) {
            return Err(Error::BadCapacity { capacity });
        }
        check_region(own, own_len, layout::producer_part_size(capacity))?;
        // SAFETY: checked size and alignment; the caller promises exclusive write access.
        unsafe { write_producer_part(own, capacity) };
        Ok(ProducerInit {
            own,
            capacity,
            attached: Cell::new(false),
            owner: None,
        })
    }

    /// Both phases at once, for a consumer part known to be initialised already.
    ///
    /// # Safety
    /// The contracts of [`Producer::init`] and [`ProducerInit::attach`].
    pub unsafe fn new(
        own: *mut u8,
        own_len: usize,
        peer: *const u8,
        peer_len: usize,
        capacity: usize,
    ) -> Result<Producer, Error> {
        // SAFETY: forwarded to the caller.
        unsafe { Producer::init(own, own_len, capacity)?.attach(peer, peer_len) }
    }

    #[cfg(feature = "alloc")]
    pub(crate) fn set_owner(&mut self, owner: Owner) {
        self.owner = owner;
    }

    /// Re-initialises the own part after the peer left (indices back to 0, magic rewritten).
    /// The new consumer must attach (and the old one must be gone) before sending again.
    pub fn reset(self) -> ProducerInit {
        let capacity = self.capacity as usize;
        // SAFETY: we own this part exclusively, it is mapped and was validated at init.
        unsafe { write_producer_part(self.own, capacity) };
        ProducerInit {
            own: self.own,
            capacity,
            attached: Cell::new(false),
            owner: self.owner,
        }
    }

    /// Capacity of the data area in bytes.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Largest payload a single frame may carry ([`layout::max_frame_len`]).
    #[inline]
    pub fn max_frame_len(&self) -> usize {
        self.max_frame
    }

    /// Free bytes in the data area (re-reads the consumer index). Frames need
    /// [`layout::frame_size`] bytes and may need padding to the end of the area first.
    pub fn free_space(&mut self) -> usize {
        // A corrupt index is reported by the next grant; here we just keep the cached value.
        let _ = self.refresh_cons();
        (self.capacity - (self.write - self.cached_cons)) as usize
    }

    /// Bytes committed but not yet published by [`flush`](Self::flush).
    #[inline]
    pub fn pending(&self) -> usize {
        (self.write - self.published) as usize
    }

    #[inline(always)]
    fn cons_word(&self) -> &crate::sync::AtomicU64 {
        // SAFETY: the consumer part was checked to hold CONSUMER_PART_SIZE aligned bytes and stays
        // mapped; we only load from it.
        unsafe { word(self.peer.add(layout::C_INDEX).cast_mut().cast()) }
    }

    /// Re-reads and validates the consumer index.
    #[inline]
    fn refresh_cons(&mut self) -> Result<(), Error> {
        // Acquire pairs with the consumer's Release store of its index: its reads of the frames
        // it released happen before we overwrite that space.
        let cons = load_acquire(self.cons_word());
        // A consumer never goes back, never releases more than we published, and releases
        // whole (8-byte aligned) frames.
        if cons < self.cached_cons
            || cons > self.published
            || cons % layout::FRAME_ALIGN as u64 != 0
        {
            return Err(Error::Corrupt {
                what: "consumer index out of range",
            });
        }
        self.cached_cons = cons;
        Ok(())
    }

    /// Space reservation: returns (padding before the frame, frame size).
    #[inline(always)]
    fn reserve(&mut self, len: usize) -> Result<(u64, u64), Error> {
        if len > self.max_frame {
            return Err(Error::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        let total = layout::frame_size(len) as u64;
        let contiguous = self.capacity - (self.write & self.mask);
        let pad = if total > contiguous { contiguous } else { 0 };
        let needed = pad + total;
        if self.write + needed - self.cached_cons > self.capacity {
            self.refresh_cons()?;
            let used = self.write - self.cached_cons;
            if used + needed > self.capacity {
                return Err(Error::Full {
                    free: (self.capacity - used) as usize,
                    needed: needed as usize,
                });
            }
        }
        Ok((pad, total))
    }

    /// Writes the padding (if any) and the frame header; advances the local write position.
    #[inline(always)]
    fn commit_frame(&mut self, pad: u64, len: usize, kind: u16) {
        let mut pos = self.write;
        if pad != 0 {
            let h = FrameHeader {
                len: (pad as usize - layout::FRAME_HEADER_LEN) as u32,
                kind: 0,
                flags: FLAG_PADDING,
            };
            // SAFETY: pos & mask + 8 <= capacity (pad >= 8 bytes); aligned; own data area. Relaxed:
            // published by the Release store of the producer index in flush.
            unsafe { store_header(self.data.add((pos & self.mask) as usize).cast(), h) };
            pos += pad;
        }
        let h = FrameHeader {
            len: len as u32,
            kind,
            flags: 0,
        };
        // SAFETY: reserve() checked the frame fits contiguously at pos; Relaxed as above.
        unsafe { store_header(self.data.add((pos & self.mask) as usize).cast(), h) };
        self.write = pos + layout::frame_size(len) as u64;
    }

    /// Reserves room for a frame of `len` bytes (kind 0) and hands out its payload area.
    #[inline]
    pub fn grant(&mut self, len: usize) -> Result<Grant<'_>, Error> {
        self.grant_kind(0, len)
    }

    /// As [`grant`](Self::grant) with an application frame kind.
    #[inline]
    pub fn grant_kind(&mut self, kind: u16, len: usize) -> Result<Grant<'_>, Error> {
        let (pad, _) = self.reserve(len)?;
        let off = ((self.write + pad) & self.mask) as usize + layout::FRAME_HEADER_LEN;
        // SAFETY: off + len <= capacity (checked by reserve), inside our data area.
        let payload = unsafe { self.data.add(off) };
        Ok(Grant {
            producer: self,
            payload,
            len,
            pad,
            kind,
        })
    }

    /// Copies `frame` into the ring, commits and publishes it.
    #[inline]
    pub fn try_send(&mut self, frame: &[u8]) -> Result<Notify, Error> {
        self.try_send_kind(0, frame)
    }

    /// As [`try_send`](Self::try_send) with an application frame kind.
    #[inline]
    pub fn try_send_kind(&mut self, kind: u16, frame: &[u8]) -> Result<Notify, Error> {
        let (pad, _) = self.reserve(frame.len())?;
        let off = ((self.write + pad) & self.mask) as usize + layout::FRAME_HEADER_LEN;
        // SAFETY: reserve() checked the destination is free space inside our data area; the
        // source is a distinct caller buffer.
        unsafe { ptr::copy_nonoverlapping(frame.as_ptr(), self.data.add(off), frame.len()) };
        self.commit_frame(pad, frame.len(), kind);
        Ok(self.flush())
    }

    /// Publishes every committed frame with one index store; returns whether the consumer
    /// asked to be woken (at most one notification per flush, none while it is busy).
    #[inline]
    pub fn flush(&mut self) -> Notify {
        let new = self.write;
        let old = self.published;
        if new == old {
            return Notify::NONE;
        }
        self.published = new;
        // Pairs with `Consumer::prepare_sleep` (see `publish`).
        // SAFETY: own index word (checked at init) and the peer's data event (checked at
        // attach), both aligned and mapped.
        unsafe {
            crate::publish(
                self.own.add(layout::P_INDEX).cast(),
                self.peer.add(layout::C_DATA_EVENT).cast(),
                new,
                old,
            )
        }
    }

    /// Back-pressure handshake: announces "wake me when a frame of `len` bytes fits", fences
    /// and re-checks. `Ok(true)`: still no room, the caller may sleep until notified (the
    /// consumer's `flush`/`try_recv` returns a [`Notify`] once it freed that space);
    /// `Ok(false)`: room now, retry.
    ///
    /// Call [`flush`](Self::flush) first (and ring if it says so): a producer that sleeps with
    /// unpublished frames can deadlock against a sleeping consumer. With unpublished frames
    /// this returns `Ok(false)` (and asserts in debug builds).
    pub fn prepare_wait_for_space(&mut self, len: usize) -> Result<bool, Error> {
        debug_assert_eq!(
            self.write, self.published,
            "flush before prepare_wait_for_space"
        );
        if self.write != self.published {
            return Ok(false);
        }
        if len > self.max_frame {
            return Err(Error::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        let total = layout::frame_size(len) as u64;
        let contiguous = self.capacity - (self.write & self.mask);
        let needed = if total > contiguous {
            contiguous + total
        } else {
            total
        };
        // The space is there once the consumer index reaches `target`.
        let target = self.write + needed - self.capacity.min(self.write + needed);
        self.refresh_cons()?;
        if self.cached_cons >= target {
            return Ok(false);
        }
        // SAFETY: own part, checked at init.
        let event = unsafe { word(self.own.add(layout::P_SPACE_EVENT).cast()) };
        // Event-index: the consumer notifies when its index moves past `target - 1`. Relaxed:
        // ordered before the re-check by the SeqCst fence below.
        event.store(target - 1, Ordering::Relaxed);
        // SeqCst fence: Dekker with the consumer's flush (store index; fence; load event).
        fence(Ordering::SeqCst);
        self.refresh_cons()?;
        Ok(self.cached_cons < target)
    }
}

impl ProducerInit {
    /// Phase two: validates the consumer part at `peer` and returns the producer.
    ///
    /// Errors: [`Error::PeerNotReady`] (magic 0: try again later with the same value),
    /// [`Error::BadMagic`], [`Error::VersionMismatch`], [`Error::RegionTooSmall`],
    /// [`Error::Misaligned`], [`Error::AlreadyAttached`].
    ///
    /// # Safety
    /// `peer` points to `peer_len` readable bytes (the consumer part; may be mapped read-only)
    /// that stay mapped for the lifetime of the returned [`Producer`]. Their content is not
    /// trusted.
    pub unsafe fn attach(&self, peer: *const u8, peer_len: usize) -> Result<Producer, Error> {
        if self.attached.get() {
            return Err(Error::AlreadyAttached);
        }
        check_region(peer, peer_len, layout::CONSUMER_PART_SIZE)?;
        // SAFETY: checked size/alignment; loads only.
        let (magic, version) = unsafe {
            // Acquire (via the fence in load_acquire) pairs with the Release store of the magic
            // at init: the version read next is the one written before it.
            let m = load_acquire(word(peer.add(layout::C_MAGIC).cast_mut().cast()));
            let v = word(peer.add(layout::C_VERSION).cast_mut().cast()).load(Ordering::Relaxed);
            (m, crate::version_of(v))
        };
        crate::check_magic(magic, layout::CONSUMER_MAGIC, version)?;
        self.attached.set(true);
        let capacity = self.capacity as u64;
        Ok(Producer {
            // SAFETY: the part holds P_DATA + capacity bytes (checked at init).
            data: unsafe { self.own.add(layout::P_DATA) },
            own: self.own,
            peer,
            mask: capacity - 1,
            capacity,
            write: 0,
            published: 0,
            cached_cons: 0,
            max_frame: layout::max_frame_len(self.capacity),
            owner: self.owner.clone(),
        })
    }

    /// Capacity this part was initialised with.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// A reserved, not yet committed frame inside shared memory (exactly the requested length).
///
/// [`commit`](Self::commit) / [`commit_len`](Self::commit_len) make it part of the next
/// [`Producer::flush`]; dropping it abandons the reservation.
pub struct Grant<'a> {
    producer: &'a mut Producer,
    payload: *mut u8,
    len: usize,
    pad: u64,
    kind: u16,
}

impl Grant<'_> {
    /// Commits all bytes (local until [`Producer::flush`]).
    #[inline]
    pub fn commit(self) {
        let len = self.len;
        self.commit_len(len);
    }

    /// Commits the first `n` bytes (local until [`Producer::flush`]).
    ///
    /// # Panics
    /// If `n` exceeds the granted length (a caller bug).
    #[inline]
    pub fn commit_len(self, n: usize) {
        assert!(
            n <= self.len,
            "commit_len({n}) beyond the granted {} bytes",
            self.len
        );
        self.producer.commit_frame(self.pad, n, self.kind);
    }
}

impl Deref for Grant<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` bytes of free, initialised space in our data area, reserved for us.
        unsafe { core::slice::from_raw_parts(self.payload, self.len) }
    }
}

impl DerefMut for Grant<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; the consumer does not read unpublished space.
        unsafe { core::slice::from_raw_parts_mut(self.payload, self.len) }
    }
}
