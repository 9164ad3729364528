//! The producer side of a ring.

use core::cell::Cell;
use core::ops::{Deref, DerefMut};
use core::ptr;

use crate::layout::{self, FrameHeader, EMPTY_HEADER, FLAG_PADDING, NO_EVENT};
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
    /// Latency mode (the consumer declared [`Mode::Polling`](crate::Mode::Polling) at init).
    polling: bool,
    /// Latency mode: the header of the first frame committed since the last flush, stored by
    /// `flush` (the publish), as (offset in the data area, header word).
    first_header: Option<(usize, u64)>,
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
            .field("polling", &self.polling)
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
        // Zero the data area so a grant never hands out uninitialised bytes; a polling
        // consumer finds "empty" at offset 0 (an index-reading one never looks there before
        // the first publish).
        ptr::write_bytes(own.add(layout::P_DATA), 0, capacity);
        word(own.add(layout::P_DATA).cast()).store(EMPTY_HEADER, Ordering::Relaxed);
        // Release: a consumer that sees the magic with Acquire also sees every field above.
        word(own.add(layout::P_MAGIC).cast()).store(layout::PRODUCER_MAGIC, Ordering::Release);
    }
}

/// Stores a frame header word (Relaxed: published later by a Release store, of the index or,
/// in latency mode, of the batch's first header).
///
/// # Safety
/// `p` is an aligned word inside our own data area.
#[inline(always)]
unsafe fn store_header(p: *mut u64, header: u64) {
    // Miri only: a plain whole-word write first. Payload bytes written earlier may partially
    // overlap this word, and Miri's weak-memory emulation (nightly 2026-05) crashes on an atomic
    // store over a word whose bytes were last written partly atomically, partly not. The plain
    // write is race-free (the space is ours) and changes nothing else.
    #[cfg(miri)]
    // SAFETY: as the caller promises.
    unsafe {
        p.write(header)
    };
    // SAFETY: as the caller promises.
    unsafe { word(p) }.store(header, Ordering::Relaxed);
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
    /// [`layout::frame_size`] bytes and may need padding to the end of the area first; in
    /// latency mode 8 bytes always stay free (the empty marker after the last frame).
    pub fn free_space(&mut self) -> usize {
        // A corrupt index is reported by the next grant; here we just keep the cached value.
        let _ = self.refresh_cons();
        (self.usable() - (self.write - self.cached_cons).min(self.usable())) as usize
    }

    /// Whether the consumer polls (latency mode; read from its part at attach).
    #[inline]
    pub fn consumer_polls(&self) -> bool {
        self.polling
    }

    /// Bytes of the area frames may occupy: all of it, or in latency mode all but the word
    /// for the empty marker after the last frame.
    #[inline(always)]
    fn usable(&self) -> u64 {
        if self.polling {
            self.capacity - layout::FRAME_HEADER_LEN as u64
        } else {
            self.capacity
        }
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
        // A consumer never goes back, never releases more than we committed (published, in
        // index mode; a polling consumer may see a batch's later frames a moment before our
        // index store), and releases whole (8-byte aligned) frames.
        if cons < self.cached_cons || cons > self.write || cons % layout::FRAME_ALIGN as u64 != 0 {
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
        let usable = self.usable();
        if self.write + needed - self.cached_cons > usable {
            self.refresh_cons()?;
            let used = self.write - self.cached_cons;
            if used + needed > usable {
                return Err(Error::Full {
                    free: usable.saturating_sub(used) as usize,
                    needed: needed as usize,
                });
            }
        }
        Ok((pad, total))
    }

    /// Writes the padding (if any) and the frame header; advances the local write position.
    #[inline(always)]
    fn commit_frame(&mut self, pad: u64, len: usize, kind: u16) {
        let first = self.write;
        let frame_at = first + pad;
        let end = frame_at + layout::frame_size(len) as u64;
        if self.polling {
            // The empty marker after this frame, before the frame is published: a polling
            // consumer that reads this frame then finds "nothing yet" at `end`, never a stale
            // header (reserve() kept these 8 bytes free). Relaxed: ordered before the publish
            // (the Release in flush) by program order.
            // SAFETY: `end & mask` is 8-aligned and at most capacity - 8; own data area.
            unsafe {
                store_header(
                    self.data.add((end & self.mask) as usize).cast(),
                    EMPTY_HEADER,
                )
            };
        }
        let frame = FrameHeader {
            len: len as u32,
            kind,
            flags: 0,
        }
        .to_word();
        if pad != 0 {
            let padding = FrameHeader {
                len: (pad as usize - layout::FRAME_HEADER_LEN) as u32,
                kind: 0,
                flags: FLAG_PADDING,
            }
            .to_word();
            // SAFETY: reserve() checked the frame fits contiguously at frame_at (offset 0);
            // Relaxed: reached only through the padding record, published after it.
            unsafe { store_header(self.data.add((frame_at & self.mask) as usize).cast(), frame) };
            self.store_record_header(first, padding);
        } else {
            self.store_record_header(first, frame);
        }
        self.write = end;
    }

    /// Stores the header of the record at `at` (Relaxed: published by the Release store of
    /// the index in flush). In latency mode the first record of a batch is its publish: its
    /// header is kept for `flush`.
    #[inline(always)]
    fn store_record_header(&mut self, at: u64, header: u64) {
        let off = (at & self.mask) as usize;
        if self.polling && self.first_header.is_none() {
            self.first_header = Some((off, header));
            return;
        }
        // SAFETY: reserve() checked the record lies inside free space at `at`; aligned; own
        // data area.
        unsafe { store_header(self.data.add(off).cast(), header) };
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
        if self.polling {
            if let Some((off, header)) = self.first_header.take() {
                #[cfg(miri)]
                // SAFETY: as in store_header (Miri's mixed-size workaround).
                unsafe {
                    self.data.add(off).cast::<u64>().write(header)
                };
                // The publish: Release pairs with the polling consumer's acquire load of this
                // header word; every payload byte and every later header of the batch (and the
                // empty marker after it) was written before.
                // SAFETY: an aligned header word of a reserved record in our own data area.
                unsafe { word(self.data.add(off).cast()) }.store(header, Ordering::Release);
            }
            // The index is a hint in latency mode (`Consumer::available`); no handshake.
            // SAFETY: own index word, checked at init.
            unsafe { word(self.own.add(layout::P_INDEX).cast()) }.store(new, Ordering::Release);
            return Notify::NONE;
        }
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
    ///
    /// In latency mode (a polling consumer) the consumer never rings: this always returns
    /// `Ok(false)` (keep retrying), after the length check.
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
        if self.polling {
            return Ok(false);
        }
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
        let (magic, version, flags) = unsafe {
            // Acquire (via the fence in load_acquire) pairs with the Release store of the magic
            // at init: the version and flags read next are the ones written before it.
            let m = load_acquire(word(peer.add(layout::C_MAGIC).cast_mut().cast()));
            let v = word(peer.add(layout::C_VERSION).cast_mut().cast()).load(Ordering::Relaxed);
            (m, crate::version_of(v), crate::flags_of(v))
        };
        crate::check_magic(magic, layout::CONSUMER_MAGIC, version)?;
        // Read once, here: the mode is fixed for the life of this producer. Unknown bits are
        // refused rather than guessed at.
        if flags & !layout::CONSUMER_POLLING != 0 {
            return Err(Error::Corrupt {
                what: "unknown consumer flags",
            });
        }
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
            polling: flags & layout::CONSUMER_POLLING != 0,
            first_header: None,
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
