//! Lock-free single-producer single-consumer rings over shared memory: variable-length frames,
//! zero-copy grant/peek, batching, notification suppression, and a peer that is not trusted.
//!
//! A ring carries one direction. It has two parts, each written by one side only and read
//! (possibly through a read-only mapping) by the other: the **producer part** (header, producer
//! index, wait-for-space event, data area) in the producer's output section and the
//! **consumer part** (consumer index, wake-up event) in the consumer's output section.
//!
//! # Layout
//!
//! Both parts must be 64-byte aligned. Words are native-endian; every control word is an
//! aligned `u64` accessed atomically. Indices are monotonically increasing byte counters (they
//! never wrap in practice); the position in the data area is `index & (capacity - 1)`.
//!
//! Producer part (`layout::producer_part_size(capacity)` = 192 + capacity bytes):
//!
//! | offset | size | type | field | written by |
//! |-------:|-----:|------|-------|------------|
//! | 0 | 8 | u64 | magic `b"SHMRINGP"` (0 = not ready) | producer, at init |
//! | 8 | 4 | u32 | layout version (1) | producer, at init |
//! | 12 | 4 | u32 | reserved, 0 | producer, at init |
//! | 16 | 8 | u64 | capacity (power of two, 64..=2^31) | producer, at init |
//! | 24 | 40 | - | reserved, 0 | - |
//! | 64 | 8 | u64 | producer index (bytes published) | producer |
//! | 72 | 56 | - | reserved (own cache line) | - |
//! | 128 | 8 | u64 | space event: notify when consumer index > this (`u64::MAX`: none) | producer |
//! | 136 | 56 | - | reserved (own cache line) | - |
//! | 192 | capacity | bytes | data area: frames | producer |
//!
//! Consumer part (`layout::CONSUMER_PART_SIZE` = 192 bytes):
//!
//! | offset | size | type | field | written by |
//! |-------:|-----:|------|-------|------------|
//! | 0 | 8 | u64 | magic `b"SHMRINGC"` (0 = not ready) | consumer, at init |
//! | 8 | 4 | u32 | layout version (1) | consumer, at init |
//! | 12 | 4 | u32 | flags: 1 = polling consumer (latency mode), 0 = may sleep | consumer, at init |
//! | 16 | 48 | - | reserved, 0 | - |
//! | 64 | 8 | u64 | consumer index (bytes released) | consumer |
//! | 72 | 56 | - | reserved (own cache line) | - |
//! | 128 | 8 | u64 | data event: notify when producer index > this (`u64::MAX`: none) | consumer |
//! | 136 | 56 | - | reserved (own cache line) | - |
//!
//! Frames in the data area, each starting at a multiple of 8:
//!
//! | offset | size | type | field |
//! |-------:|-----:|------|-------|
//! | 0 | 4 | u32 | payload length |
//! | 4 | 2 | u16 | kind (application defined) |
//! | 6 | 2 | u16 | flags: 0 = frame, 1 = padding (length = bytes up to the end of the area), 0x8000 = empty marker (latency mode, never published) |
//! | 8 | len | bytes | payload, then zero to 7 bytes up to the next multiple of 8 |
//!
//! A frame never wraps: if it does not fit before the end of the data area, the producer writes
//! a padding record up to the end and puts the frame at offset 0. A frame occupies at most half
//! the data area ([`Producer::max_frame_len`] = capacity / 2 - 8), so it always fits once the
//! ring drains; longer frames are refused with [`Error::TooLarge`].
//!
//! # Protocol
//!
//! * Publishing: the producer writes frames, then stores its index with `Release`; the consumer
//!   loads it with acquire semantics. Releasing: the consumer stores its index with `Release`;
//!   the producer loads it with acquire semantics before reusing the space. Loads from the
//!   peer's part are `Relaxed` loads followed by an `Acquire` fence, the form the standard
//!   library guarantees to work on a read-only mapping (free on x86-64). Each side caches the
//!   other's index and re-reads it only when the cached value does not suffice.
//! * Batching: `grant`/`commit` and `peek`/`release` are local; one `flush` publishes them all
//!   with a single index store and returns at most one [`Notify`].
//! * Notification suppression (event index, like virtio's `vring_need_event`): a consumer that
//!   wants to sleep stores its index into its data event, issues a `SeqCst` fence and re-checks
//!   the producer index ([`Consumer::prepare_sleep`]); the producer's flush stores its index,
//!   issues a `SeqCst` fence and reads the data event, asking for a doorbell only if the event
//!   lies in the range it just published. The fences make it impossible for both sides to miss
//!   each other, so no wake-up is lost, and a busy consumer (whose event lies behind) causes no
//!   notifications. Waiting for space is the same handshake in the other direction
//!   ([`Producer::prepare_wait_for_space`], [`Consumer::flush`]).
//!
//! # Latency mode (polling consumers)
//!
//! A consumer initialised with [`Mode::Polling`] ([`Consumer::init_mode`],
//! [`channel_with`]) declares in its part that it never sleeps; the producer reads that once
//! at attach. Then neither side uses the wake-up handshakes (no `SeqCst` fence, no event word
//! read on a publish; [`Consumer::prepare_sleep`] and [`Producer::prepare_wait_for_space`]
//! never allow a sleep) and the consumer finds new frames **from the frames themselves**, not
//! from the producer index: one cache line carries the signal and the start of the payload
//! (all of it for frames of up to 56 bytes at a 64-byte aligned position). The layout stays
//! version 1; what changes is the producer's writing order:
//!
//! * before it publishes a frame it stores the empty marker [`layout::EMPTY_HEADER`] at the
//!   position after the frame (the next frame's header word), so the consumer, having read
//!   this frame, finds "nothing yet" there and not a stale header of an earlier lap; the data
//!   area starts with the marker at offset 0. For that word the producer keeps 8 bytes of the
//!   area free (a polling ring holds at most `capacity - 8` bytes of frames);
//! * the header of the first frame of a batch is written last, in [`Producer::flush`], with a
//!   `Release` store: the publish. The frames after it in the batch are reached only through
//!   it, so their headers need no ordering of their own; the index is still stored (for
//!   [`Consumer::available`] and the producer's space accounting of the consumer index).
//!
//! The consumer loads the header word at its read position with acquire semantics (pairing
//! with that `Release`): the marker means empty; anything else is validated as in index mode
//! (length within the contiguous area and at most half the area, padding exactly up to the
//! end), so a hostile producer gets exactly the guarantees below. The consumer index is still
//! published (`Release`) on `flush`/`try_recv` so that the producer can reuse the space.
//!
//! # Untrusted peer
//!
//! The peer is another program and is not trusted. Exactly what holds:
//!
//! **Sound against a hostile peer** (whatever it writes, and whenever: no panic, no access
//! outside the two parts, no undefined behaviour, no endless loop; a violation is an error):
//! - attach: magic and version ([`Error::BadMagic`], [`Error::VersionMismatch`],
//!   [`Error::PeerNotReady`] for magic 0), the capacity read once and never re-read;
//! - every re-read of the peer's index (monotonic, within one capacity of ours, aligned) and
//!   each frame header, read once (length within the published data and the contiguous area,
//!   padding exactly up to the end and never at offset 0): [`Error::Corrupt`];
//! - the copying calls [`Consumer::try_recv`] and [`TypedConsumer::try_recv`], and every read
//!   of a peeked frame through [`Frame::payload`] / [`TypedFrame::read`]: a [`PeerBytes`] view
//!   that only copies into caller memory or reads volatile, never hands out a reference to
//!   peer memory, and reads each byte once in its helpers ([`view`] explains the rules);
//! - the producer side entirely: a grant is our own memory, the peer only reads it.
//!
//! `Corrupt` is sticky by design: the ring does not advance past what it refused, so every
//! later call reports it again until the layer above tears the link down
//! ([`Producer::reset`], [`Consumer::reset`]) and re-attaches once the peer has restarted.
//! Payload *content* stays untrusted input: a producer that rewrites a frame while it is read
//! gives the reader a mix of old and new bytes (check it, e.g. with the sum that
//! [`PeerBytes::copy_to_with_sum`] computes over exactly the bytes it copied).
//!
//! **Needs a trusted peer** (one that never writes a published frame before its release):
//! [`Frame::as_trusted_slice`] and [`PeerBytes::as_trusted_slice`], which are `unsafe fn` for
//! that reason: the `&[u8]` they return asserts that the bytes do not change, and a peer that
//! changes them makes every read a data race, i.e. undefined behaviour, not merely odd bytes.
//! [`Frame`] has no `Deref<Target = [u8]>` for that reason: a frame is read through
//! [`Frame::payload`].
//!
//! # Two processes
//!
//! `examples/memfd_pair.rs` (`cargo run -p shmring --example memfd_pair`) is the whole set-up
//! between two real processes: one memfd laid out by [`layout::OneWayLayout`] (each part on
//! its own pages), each process mapping its own part read-write and the peer's part
//! read-only, two eventfds as the data and space doorbells rung exactly when a `flush`
//! returns a needed [`Notify`], the two-phase init/attach with a "ready" doorbell standing in
//! for the ivshmem `STATE` change, and the consumer reading through the view.
//!
//! # Examples
//!
//! ```
//! # fn main() -> Result<(), shmring::Error> {
//! let (mut tx, mut rx) = shmring::channel(4096)?;
//!
//! // Copying API.
//! let _notify = tx.try_send(b"hello")?;
//! let mut buf = [0u8; 64];
//! let got = rx.try_recv(&mut buf)?.expect("a frame");
//! assert_eq!(&buf[..got.len], b"hello");
//!
//! // Zero-copy and batching: two commits, one publish.
//! for word in [&b"zero"[..], b"copy"] {
//!     let mut grant = tx.grant(word.len())?;
//!     grant.copy_from_slice(word);
//!     grant.commit();
//! }
//! assert!(rx.peek()?.is_none(), "not visible before flush");
//! let notify = tx.flush();
//! if notify.needed() { /* ring the consumer's doorbell */ }
//! // The payload lies in peer memory: read it through the view (copies, volatile reads).
//! let frame = rx.peek()?.expect("published");
//! assert!(frame.payload().eq_slice(b"zero"));
//! frame.release();
//! let frame = rx.peek()?.expect("second frame");
//! let mut word = [0u8; 4];
//! assert_eq!(frame.payload().copy_to(&mut word), 4);
//! assert_eq!(&word, b"copy");
//! frame.release();
//! let _ = rx.flush(); // make the space reusable for the producer
//! assert!(rx.peek()?.is_none());
//! # Ok(()) }
//! ```
//!
//! Sleeping and waking (the doorbell belongs to the layer above):
//!
//! ```
//! # fn main() -> Result<(), shmring::Error> {
//! let (mut tx, mut rx) = shmring::channel(4096)?;
//! let mut buf = [0u8; 256];
//! // Consumer: drain, then announce the sleep; sleep only if prepare_sleep says so.
//! while rx.try_recv(&mut buf)?.is_some() {}
//! let _ = rx.flush(); // try_recv already publishes; after peek/release call flush first
//! assert!(rx.prepare_sleep()?, "empty: may sleep on the doorbell now");
//! // Producer: the publish that the sleeping consumer is waiting for asks for one doorbell.
//! assert!(tx.try_send(b"wake up")?.needed());
//! assert!(!tx.try_send(b"no second doorbell")?.needed());
//! // Consumer after its doorbell rang: keep draining until empty again.
//! assert!(!rx.prepare_sleep()?, "data arrived");
//! # Ok(()) }
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

mod consumer;
pub mod duplex;
pub mod layout;
#[cfg(feature = "alloc")]
mod owned;
mod producer;
mod sync;
mod typed;
pub mod view;

pub use consumer::{Consumer, ConsumerInit, Frame, Received};
pub use duplex::{Duplex, DuplexInit};
#[cfg(feature = "alloc")]
pub use owned::{channel, channel_with};
pub use producer::{Grant, Producer, ProducerInit};
pub use typed::{TypedConsumer, TypedFrame, TypedProducer};
pub use view::{OutOfBounds, PeerBytes};

/// Everything that can go wrong with a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not enough contiguous room; nothing was written, retry later.
    #[error("ring full: {free} bytes free, {needed} needed")]
    Full {
        /// Free bytes (possibly not contiguous).
        free: usize,
        /// Bytes the frame needs, including its header and any padding to the end.
        needed: usize,
    },
    /// The frame can never fit this ring.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Requested payload length.
        len: usize,
        /// Largest payload this ring accepts.
        max: usize,
    },
    /// The peer broke the protocol. Sticky: reset the ring and re-attach (see the crate docs).
    #[error("peer corrupted the ring: {what}")]
    Corrupt {
        /// What was wrong.
        what: &'static str,
    },
    /// The peer part is not a shmring part of the expected side.
    #[error("peer part has bad magic {found:#018x}")]
    BadMagic {
        /// Magic found.
        found: u64,
    },
    /// The peer part uses another layout version.
    #[error("peer layout version {found}, expected {expected}")]
    VersionMismatch {
        /// Version found.
        found: u32,
        /// Version this crate writes.
        expected: u32,
    },
    /// The peer part is not initialised yet (magic 0): attach again later.
    #[error("peer part not initialised yet")]
    PeerNotReady,
    /// A region is smaller than the part it must hold.
    #[error("region of {got} bytes, {needed} needed")]
    RegionTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// Capacity not a power of two within `[MIN_CAPACITY, MAX_CAPACITY]`.
    #[error("bad ring capacity {capacity}")]
    BadCapacity {
        /// Capacity given or found.
        capacity: usize,
    },
    /// A region does not start on a 64-byte boundary (or is null).
    #[error("region not aligned to {align} bytes")]
    Misaligned {
        /// Required alignment.
        align: usize,
    },
    /// The receive buffer is smaller than the frame; the frame stays in the ring.
    #[error("buffer too small: frame has {needed} bytes")]
    BufferTooSmall {
        /// Frame length.
        needed: usize,
    },
    /// This init value was already attached once.
    #[error("part already attached")]
    AlreadyAttached,
}

/// How a ring's consumer waits for frames. The consumer chooses at init
/// ([`Consumer::init_mode`]); the producer learns it at attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The consumer may sleep on a doorbell: it reads the producer index to find frames, and
    /// both sides use the wake-up handshakes (event words, `SeqCst` fences), see "Protocol".
    #[default]
    Wakeable,
    /// Latency mode: the consumer busy-polls and never sleeps; it finds frames from their
    /// headers and neither side pays for the wake-up handshakes (see "Latency mode").
    Polling,
}

/// Whether the peer must be notified (its doorbell rung) after an operation.
#[must_use = "ring the peer's doorbell when needed() is true"]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notify(pub(crate) bool);

impl Notify {
    /// No notification needed.
    pub const NONE: Notify = Notify(false);

    /// Whether the peer must be notified.
    #[inline]
    pub fn needed(self) -> bool {
        self.0
    }
}

impl core::ops::BitOr for Notify {
    type Output = Notify;
    #[inline]
    fn bitor(self, rhs: Notify) -> Notify {
        Notify(self.0 | rhs.0)
    }
}

impl core::ops::BitOrAssign for Notify {
    #[inline]
    fn bitor_assign(&mut self, rhs: Notify) {
        self.0 |= rhs.0;
    }
}

#[cfg(feature = "alloc")]
pub(crate) type Owner = Option<alloc::sync::Arc<owned::OwnedRegion>>;
#[cfg(not(feature = "alloc"))]
pub(crate) type Owner = Option<NoOwner>;
#[cfg(not(feature = "alloc"))]
#[derive(Clone)]
pub(crate) enum NoOwner {}

/// The publishing half of both wake-up handshakes (producer data / consumer space): stores
/// `new` into the own index word at `index`, then tells whether the peer's event word at
/// `event` asks to be woken for the move from `old` to `new`.
///
/// Ordering: the Release store makes everything written (producer: frames) or read
/// (consumer: released frames) before it visible to / ordered before a peer that loads the
/// index with Acquire. The SeqCst fence is the Dekker handshake with the peer's announcement
/// (store event; SeqCst fence; load our index): either its re-check sees `new`, or we see its
/// event. The event is loaded Relaxed: any value is harmless, it only decides a doorbell.
///
/// # Safety
/// `index` points to an aligned word of our own part, `event` to an aligned word of the
/// peer's part; both stay mapped.
#[inline(always)]
pub(crate) unsafe fn publish(index: *mut u64, event: *const u64, new: u64, old: u64) -> Notify {
    // SAFETY: forwarded to the caller (own, aligned, mapped).
    unsafe { sync::word(index) }.store(new, sync::Ordering::Release);
    sync::fence(sync::Ordering::SeqCst);
    // SAFETY: forwarded to the caller (peer part, aligned, mapped; load only).
    let event = unsafe { sync::word(event.cast_mut()) }.load(sync::Ordering::Relaxed);
    Notify(need_event(event, new, old))
}

/// virtio's `vring_need_event`: whether `event` lies in `[old, new)`, i.e. the index moved past
/// the value the peer asked to be woken at. Wrapping arithmetic: any event value is harmless.
#[inline(always)]
pub(crate) fn need_event(event: u64, new: u64, old: u64) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Checks a region pointer and length.
pub(crate) fn check_region(p: *const u8, len: usize, needed: usize) -> Result<(), Error> {
    if p.is_null() || (p as usize) % layout::REGION_ALIGN != 0 {
        return Err(Error::Misaligned {
            align: layout::REGION_ALIGN,
        });
    }
    if len < needed {
        return Err(Error::RegionTooSmall { needed, got: len });
    }
    Ok(())
}

/// Version field of a version word (the first 4 bytes in memory).
pub(crate) fn version_of(word: u64) -> u32 {
    let [a, b, c, d, ..] = word.to_ne_bytes();
    u32::from_ne_bytes([a, b, c, d])
}

/// Flags field of a version word (the second 4 bytes in memory).
pub(crate) fn flags_of(word: u64) -> u32 {
    let [.., e, f, g, h] = word.to_ne_bytes();
    u32::from_ne_bytes([e, f, g, h])
}

/// Checks a peer's magic and version.
pub(crate) fn check_magic(found: u64, expected: u64, version: u32) -> Result<(), Error> {
    if found == 0 {
        return Err(Error::PeerNotReady);
    }
    if found != expected {
        return Err(Error::BadMagic { found });
    }
    if version != layout::LAYOUT_VERSION {
        return Err(Error::VersionMismatch {
            found: version,
            expected: layout::LAYOUT_VERSION,
        });
    }
    Ok(())
}
