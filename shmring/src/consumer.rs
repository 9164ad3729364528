//! The consumer side of a ring.

use core::cell::Cell;

use crate::layout::{self, FrameHeader, EMPTY_HEADER, FLAG_PADDING, NO_EVENT};
use crate::sync::{fence, load_acquire, word, AtomicU64, Ordering};
use crate::view::PeerBytes;
use crate::{check_region, Error, Mode, Notify, Owner};

/// A consumer part that is initialised (and announced) but not yet attached to its producer.
///
/// [`attach`](Self::attach) takes `&self`: on [`Error::PeerNotReady`] keep the value and try
/// again later; after one successful attach, further attaches return
/// [`Error::AlreadyAttached`].
pub struct ConsumerInit {
    own: *mut u8,
    mode: Mode,
    attached: Cell<bool>,
    owner: Owner,
}

// SAFETY: see ProducerInit.
unsafe impl Send for ConsumerInit {}

impl core::fmt::Debug for ConsumerInit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ConsumerInit").finish_non_exhaustive()
    }
}

/// The reading side of a ring (single consumer). See the crate documentation.
pub struct Consumer {
    /// Data area of the producer part (read only).
    data: *const u8,
    /// Own consumer part.
    own: *mut u8,
    /// Peer (producer) part, read only.
    peer: *const u8,
    mask: u64,
    capacity: u64,
    /// Local read position: everything released (published or not).
    read: u64,
    /// Last value stored into the consumer index.
    published: u64,
    /// Last validated producer index (index mode only).
    cached_prod: u64,
    /// Latency mode: frames are found from their headers (see the crate docs).
    polling: bool,
    owner: Owner,
}

// SAFETY: a consumer is the only writer of its part; it may move between threads.
unsafe impl Send for Consumer {}

impl core::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity)
            .field("read", &self.read)
            .field("published", &self.published)
            .field("cached_prod", &self.cached_prod)
            .field("polling", &self.polling)
            .finish()
    }
}

/// One frame copied out, released and published: what [`Consumer::try_recv`] returns
/// (`Received`, the bytes are in the caller's buffer) and [`TypedConsumer::try_recv`]
/// (`Received<T>`, the record in [`value`](Self::value)). Both receive calls have the same shape,
/// `Result<Option<Received<_>>, Error>`, as both zero-copy calls have
/// (`Result<Option<guard>, Error>`, the guard released by `release`, kept by drop).
///
/// [`TypedConsumer::try_recv`]: crate::TypedConsumer::try_recv
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received<T = ()> {
    /// Payload length copied out (for a record: `size_of::<T>()`).
    pub len: usize,
    /// The record copied out (`()` for byte frames: those land in the caller's buffer).
    pub value: T,
    /// Whether the producer waits for the space this frame freed (ring its doorbell).
    pub notify: Notify,
}

/// Initialises a consumer part (shared by `init` and `reset`).
///
/// # Safety
/// `own` is valid for writes of `CONSUMER_PART_SIZE` bytes, 64-byte aligned.
unsafe fn write_consumer_part(own: *mut u8, mode: Mode) {
    let flags = match mode {
        Mode::Wakeable => 0,
        Mode::Polling => layout::CONSUMER_POLLING,
    };
    // SAFETY (all below): inside the part, aligned, exclusively ours.
    unsafe {
        word(own.add(layout::C_MAGIC).cast()).store(0, Ordering::Relaxed);
        // Version and flags share one word (offsets 8 and 12).
        let version = u64::from_ne_bytes(zerocopy::transmute!([
            layout::LAYOUT_VERSION.to_ne_bytes(),
            flags.to_ne_bytes()
        ]));
        word(own.add(layout::C_VERSION).cast()).store(version, Ordering::Relaxed);
        word(own.add(layout::C_INDEX).cast()).store(0, Ordering::Relaxed);
        word(own.add(layout::C_DATA_EVENT).cast()).store(NO_EVENT, Ordering::Relaxed);
        // Release: a producer that sees the magic with Acquire sees the fields above.
        word(own.add(layout::C_MAGIC).cast()).store(layout::CONSUMER_MAGIC, Ordering::Release);
    }
}

impl Consumer {
    /// Phase one: initialises the consumer part at `own` (index 0, no wake-up requested) in
    /// [`Mode::Wakeable`].
    ///
    /// # Safety
    /// `own` points to `own_len` bytes writable by this process that stay mapped for the
    /// lifetime of the returned value and of the [`Consumer`] made from it; nobody else writes
    /// them; no other `ConsumerInit`/`Consumer` exists for this part.
    pub unsafe fn init(own: *mut u8, own_len: usize) -> Result<ConsumerInit, Error> {
        // SAFETY: forwarded to the caller.
        unsafe { Consumer::init_mode(own, own_len, Mode::Wakeable) }
    }

    /// As [`init`](Self::init), choosing how this consumer waits: [`Mode::Polling`] is the
    /// latency mode (see the crate docs). The mode is fixed for the life of the part: the
    /// producer reads it once when it attaches.
    ///
    /// # Safety
    /// As [`init`](Self::init).
    pub unsafe fn init_mode(
        own: *mut u8,
        own_len: usize,
        mode: Mode,
    ) -> Result<ConsumerInit, Error> {
        check_region(own, own_len, layout::CONSUMER_PART_SIZE)?;
        // SAFETY: checked; exclusive per the caller.
        unsafe { write_consumer_part(own, mode) };
        Ok(ConsumerInit {
            own,
            mode,
            attached: Cell::new(false),
            owner: None,
        })
    }

    /// Both phases at once, for a producer part known to be initialised already.
    ///
    /// # Safety
    /// The contracts of [`Consumer::init`] and [`ConsumerInit::attach`].
    pub unsafe fn new(
        own: *mut u8,
        own_len: usize,
        peer: *const u8,
        peer_len: usize,
    ) -> Result<Consumer, Error> {
        // SAFETY: forwarded to the caller.
        unsafe { Consumer::init(own, own_len)?.attach(peer, peer_len) }
    }

    #[cfg(feature = "alloc")]
    pub(crate) fn set_owner(&mut self, owner: Owner) {
        self.owner = owner;
    }

    /// Re-initialises the own part after the peer left (index back to 0, same mode).
    pub fn reset(self) -> ConsumerInit {
        let mode = self.mode();
        // SAFETY: exclusively ours, checked at init.
        unsafe { write_consumer_part(self.own, mode) };
        ConsumerInit {
            own: self.own,
            mode,
            attached: Cell::new(false),
            owner: self.owner,
        }
    }

    /// How this consumer waits (chosen at init).
    #[inline]
    pub fn mode(&self) -> Mode {
        if self.polling {
            Mode::Polling
        } else {
            Mode::Wakeable
        }
    }

    /// Capacity of the ring's data area (read once from the producer header at attach).
    #[inline]
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    #[inline(always)]
    fn prod_word(&self) -> &AtomicU64 {
        // SAFETY: the producer part was checked at attach; loads only.
        unsafe { word(self.peer.add(layout::P_INDEX).cast_mut().cast()) }
    }

    /// Re-reads and validates the producer index; returns the new available byte count.
    #[inline]
    fn refresh_prod(&mut self) -> Result<u64, Error> {
        // Acquire pairs with the producer's Release store in flush: the frames it published are
        // visible to our reads below.
        let prod = load_acquire(self.prod_word());
        // Monotonic, at most one capacity ahead of what we released, frame aligned.
        if prod < self.cached_prod
            || prod - self.published > self.capacity
            || prod % layout::FRAME_ALIGN as u64 != 0
        {
            return Err(Error::Corrupt {
                what: "producer index out of range",
            });
        }
        self.cached_prod = prod;
        Ok(prod - self.read)
    }

    /// Bytes published by the producer and not yet released by us (headers and padding
    /// included; re-reads the producer index). In latency mode the index may lag behind the
    /// frame headers (it is stored after them): a hint, at most one capacity.
    pub fn available(&mut self) -> usize {
        if self.polling {
            let prod = load_acquire(self.prod_word());
            return prod.saturating_sub(self.read).min(self.capacity) as usize;
        }
        let _ = self.refresh_prod();
        (self.cached_prod - self.read) as usize
    }

    /// Whether no published frame is waiting (re-reads the producer index).
    pub fn is_empty(&mut self) -> bool {
        self.available() == 0
    }

    /// Validates the next frame and returns (payload offset, len, kind, size in the ring).
    #[inline(always)]
    fn next_frame(&mut self) -> Result<Option<(usize, usize, u16, u64)>, Error> {
        // At most two rounds: padding is never at offset 0, and it sends us there.
        loop {
            let off = self.read & self.mask;
            let contiguous = self.capacity - off;
            // The header word, viewed only once it may be read (under loom a view is a model
            // access, and an unpublished header is the producer's until the index covers it).
            let at = self
                .data
                .wrapping_add(off as usize)
                .cast_mut()
                .cast::<u64>();
            // SAFETY (both header loads): off < capacity and 8-aligned (indices and sizes are
            // validated multiples of 8), so the header word lies inside the data area. Read
            // exactly once (copied to `word`).
            let header = || unsafe { word(at) };
            let (word, avail) = if self.polling {
                // Latency mode: the frame is its own signal. Acquire (a Relaxed load and a
                // fence, fine on a read-only mapping) pairs with the producer's Release store
                // of the first header of a batch in `flush`: the payload and the headers of the
                // rest of the batch are visible once we see it. No published index bounds the
                // frame: a hostile producer can make us see frames it never wrote, but never
                // outside the area.
                let word = load_acquire(header());
                if word == EMPTY_HEADER {
                    return Ok(None);
                }
                (word, u64::MAX)
            } else {
                let mut avail = self.cached_prod - self.read;
                if avail == 0 {
                    avail = self.refresh_prod()?;
                    if avail == 0 {
                        return Ok(None);
                    }
                }
                // Relaxed: the Acquire of the producer index that covered this frame orders it
                // after the producer's header store.
                (header().load(Ordering::Relaxed), avail)
            };
            let h = FrameHeader::from_word(word);
            let len = h.len as u64;
            if h.flags == 0 {
                let total = layout::frame_size_u64(len);
                // Within the published data, the contiguous area and the largest frame a producer
                // may send (half the area).
                if total > avail || total > contiguous || total > self.capacity / 2 {
                    return Err(Error::Corrupt {
                        what: "frame length beyond published data",
                    });
                }
                return Ok(Some((
                    off as usize + layout::FRAME_HEADER_LEN,
                    len as usize,
                    h.kind,
                    total,
                )));
            }
            // Padding: only at a non-zero offset, exactly up to the end, and published.
            if h.flags != FLAG_PADDING
                || off == 0
                || len + layout::FRAME_HEADER_LEN as u64 != contiguous
                || contiguous > avail
            {
                return Err(Error::Corrupt {
                    what: "bad padding record",
                });
            }
            // Skipping padding is a local release like any other.
            self.read += contiguous;
        }
    }

    /// The next frame, zero-copy, inside shared memory; `None` if the ring is empty.
    ///
    /// The frame stays in the ring until [`Frame::release`] (local until
    /// [`flush`](Self::flush)); dropping the `Frame` keeps it for the next `peek`.
    /// A hostile producer may change the payload bytes while you look at them: read them
    /// through [`Frame::payload`] (copies and volatile reads). Its length and position were
    /// validated once and are never re-read.
    #[inline]
    pub fn peek(&mut self) -> Result<Option<Frame<'_>>, Error> {
        match self.next_frame()? {
            None => Ok(None),
            Some((off, len, kind, total)) => {
                // SAFETY: off + len <= capacity (validated), inside the producer's data area.
                let payload = unsafe { self.data.add(off) };
                Ok(Some(Frame {
                    consumer: self,
                    payload,
                    len,
                    kind,
                    total,
                }))
            }
        }
    }

    /// Copies the next frame into `buf`, releases and publishes. `Ok(None)` if empty;
    /// [`Error::BufferTooSmall`] leaves the frame in the ring.
    #[inline]
    pub fn try_recv(&mut self, buf: &mut [u8]) -> Result<Option<Received>, Error> {
        let Some((off, len, _kind, total)) = self.next_frame()? else {
            return Ok(None);
        };
        if buf.len() < len {
            return Err(Error::BufferTooSmall { needed: len });
        }
        // SAFETY: validated range inside the data area; `buf` is a distinct caller buffer.
        unsafe { core::ptr::copy_nonoverlapping(self.data.add(off), buf.as_mut_ptr(), len) };
        self.read += total;
        Ok(Some(Received {
            len,
            value: (),
            notify: self.flush(),
        }))
    }

    /// Publishes the consumer index (everything released so far); returns whether the producer
    /// waits for space that is now free.
    #[inline]
    pub fn flush(&mut self) -> Notify {
        let new = self.read;
        let old = self.published;
        if new == old {
            return Notify::NONE;
        }
        self.published = new;
        if self.polling {
            // Latency mode: the producer never sleeps for space, no handshake. Release pairs
            // with the producer's Acquire of our index: our reads of the released frames
            // happen before it reuses the space.
            // SAFETY: own index word, checked at init.
            unsafe { word(self.own.add(layout::C_INDEX).cast()) }.store(new, Ordering::Release);
            return Notify::NONE;
        }
        // Pairs with `Producer::prepare_wait_for_space` (see `publish`).
        // SAFETY: own index word (checked at init) and the peer's space event (checked at
        // attach), both aligned and mapped.
        unsafe {
            crate::publish(
                self.own.add(layout::C_INDEX).cast(),
                self.peer.add(layout::P_SPACE_EVENT).cast(),
                new,
                old,
            )
        }
    }

    /// Sleep handshake: announces "wake me on the next publish", fences, re-checks.
    /// `Ok(true)`: still empty, the caller may sleep until its doorbell rings (the producer's
    /// flush returns a [`Notify`] for it); `Ok(false)`: data arrived, keep reading.
    ///
    /// Call [`flush`](Self::flush) first (and ring if it says so): sleeping with unpublished
    /// releases can deadlock against a producer waiting for space. With unpublished releases
    /// this returns `Ok(false)` (and asserts in debug builds).
    ///
    /// In latency mode ([`Mode::Polling`]) the producer never rings: this always returns
    /// `Ok(false)` (keep polling).
    pub fn prepare_sleep(&mut self) -> Result<bool, Error> {
        if self.polling {
            return Ok(false);
        }
        debug_assert_eq!(self.read, self.published, "flush before prepare_sleep");
        if self.read != self.published {
            return Ok(false);
        }
        if self.cached_prod != self.read {
            return Ok(false);
        }
        // SAFETY: own part.
        let event = unsafe { word(self.own.add(layout::C_DATA_EVENT).cast()) };
        // Event-index: notify me when the producer index moves past `read`. Relaxed: ordered
        // before the re-check by the fence.
        event.store(self.read, Ordering::Relaxed);
        // SeqCst fence: Dekker with the producer's flush (store index; fence; load event).
        fence(Ordering::SeqCst);
        Ok(self.refresh_prod()? == 0)
    }
}

impl ConsumerInit {
    /// Phase two: validates the producer part at `peer` (magic, version, capacity: read once
    /// here and never again) and returns the consumer.
    ///
    /// # Safety
    /// `peer` points to `peer_len` readable bytes (the producer part; may be mapped read-only)
    /// that stay mapped for the lifetime of the returned [`Consumer`]. Content is untrusted.
    pub unsafe fn attach(&self, peer: *const u8, peer_len: usize) -> Result<Consumer, Error> {
        if self.attached.get() {
            return Err(Error::AlreadyAttached);
        }
        check_region(peer, peer_len, layout::P_DATA)?;
        // SAFETY: checked size/alignment of the control block; loads only.
        let (magic, version, capacity) = unsafe {
            // Acquire (fence in load_acquire) pairs with the Release store of the magic at init:
            // version and capacity read next are the ones written before it.
            let m = load_acquire(word(peer.add(layout::P_MAGIC).cast_mut().cast()));
            let v = word(peer.add(layout::P_VERSION).cast_mut().cast()).load(Ordering::Relaxed);
            let c = word(peer.add(layout::P_CAPACITY).cast_mut().cast()).load(Ordering::Relaxed);
            (m, crate::version_of(v), c)
        };
        crate::check_magic(magic, layout::PRODUCER_MAGIC, version)?;
        let capacity_usize = usize::try_from(capacity).unwrap_or(usize::MAX);
        if !layout::capacity_ok(capacity_usize) {
            return Err(Error::BadCapacity {
                capacity: capacity_usize,
            });
        }
        let needed = layout::producer_part_size(capacity_usize);
        if peer_len < needed {
            return Err(Error::RegionTooSmall {
                needed,
                got: peer_len,
            });
        }
        self.attached.set(true);
        Ok(Consumer {
            // SAFETY: the part holds P_DATA + capacity bytes (checked just above).
            data: unsafe { peer.add(layout::P_DATA) },
            own: self.own,
            peer,
            mask: capacity - 1,
            capacity,
            read: 0,
            published: 0,
            cached_prod: 0,
            polling: self.mode == Mode::Polling,
            owner: self.owner.clone(),
        })
    }
}

/// A frame inside shared memory, handed out by [`Consumer::peek`].
///
/// Its payload lies in the producer's output section, which the producer can write at any
/// time: read it through [`payload`](Self::payload), a [`PeerBytes`] view that copies and
/// reads volatile, never through a `&[u8]` (see the crate docs, "Untrusted peer").
pub struct Frame<'a> {
    consumer: &'a mut Consumer,
    payload: *const u8,
    len: usize,
    kind: u16,
    total: u64,
}

impl Frame<'_> {
    /// The frame's application kind.
    #[inline]
    pub fn kind(&self) -> u16 {
        self.kind
    }

    /// Payload length (validated once at peek; never re-read).
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The payload, as a view that is sound however the peer behaves.
    #[inline]
    pub fn payload(&self) -> PeerBytes<'_> {
        // SAFETY: `len` bytes at `payload` lie inside the producer's data area (validated at
        // peek) and stay mapped while the frame (which borrows the consumer) lives.
        unsafe { PeerBytes::new(self.payload, self.len) }
    }

    /// A copy of the payload.
    #[cfg(feature = "alloc")]
    pub fn to_vec(&self) -> alloc::vec::Vec<u8> {
        self.payload().to_vec()
    }

    /// The payload as a shared slice (zero-copy, for code that needs `&[u8]`).
    ///
    /// # Safety
    /// The peer is trusted not to write this frame until it is released (for as long as the
    /// slice lives): a producer that does write it makes every read through the slice a data
    /// race, i.e. undefined behaviour. Against an untrusted peer use [`payload`](Self::payload).
    #[inline]
    pub unsafe fn as_trusted_slice(&self) -> &[u8] {
        // SAFETY: forwarded to the caller.
        unsafe { self.payload().as_trusted_slice() }
    }

    /// Releases the frame (local until [`Consumer::flush`]).
    #[inline]
    pub fn release(self) {
        self.consumer.read += self.total;
    }
}

impl core::fmt::Debug for Frame<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Frame")
            .field("len", &self.len)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}
