//! Byte layout of a ring in shared memory (see the crate documentation for the table).
//!
//! All multi-byte fields are in the machine's native byte order (both cells of an ivshmem
//! device run on the same host). Every control word is an aligned `u64` accessed atomically.

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Alignment required of both parts (one cache line).
pub const REGION_ALIGN: usize = 64;
/// Cache line size the layout is built around.
pub const CACHE_LINE: usize = 64;

/// Magic of the producer part: `b"SHMRINGP"` read as a native `u64`.
pub const PRODUCER_MAGIC: u64 = u64::from_ne_bytes(*b"SHMRINGP");
/// Magic of the consumer part: `b"SHMRINGC"` read as a native `u64`.
pub const CONSUMER_MAGIC: u64 = u64::from_ne_bytes(*b"SHMRINGC");
/// Layout version written by this crate; a peer with another version is refused.
pub const LAYOUT_VERSION: u32 = 1;

/// Smallest capacity (bytes of the data area).
pub const MIN_CAPACITY: usize = 64;
/// Largest capacity (bytes of the data area); keeps every frame length within `u32`.
pub const MAX_CAPACITY: usize = 1 << 31;
/// Size of a frame header (length `u32`, kind `u16`, flags `u16`).
pub const FRAME_HEADER_LEN: usize = 8;
/// Every frame (header + payload) starts at a multiple of this and occupies a multiple of it.
pub const FRAME_ALIGN: usize = 8;

/// Frame header flag: this record is padding up to the end of the data area.
pub const FLAG_PADDING: u16 = 1;

/// Value of an event word that asks for no notification at all.
pub const NO_EVENT: u64 = u64::MAX;

/// Frame header flag of the "no frame here yet" marker ([`EMPTY_HEADER`]); never valid in a
/// published frame.
pub const FLAG_EMPTY: u16 = 0x8000;

/// The header word that marks the next free frame position for a polling consumer
/// ([`CONSUMER_POLLING`]): length 0, kind 0, flags [`FLAG_EMPTY`]. A producer whose consumer
/// polls writes it at the end of every frame before it publishes the frame, and at offset 0 at
/// init; an index-reading consumer never reads it (it lies beyond the published data).
pub const EMPTY_HEADER: u64 = u64::from_ne_bytes(zerocopy::transmute!(FrameHeader {
    len: 0,
    kind: 0,
    flags: FLAG_EMPTY,
}));

/// Consumer flag (in [`ConsumerControl::flags`]): the consumer polls and never sleeps (latency
/// mode, [`Mode::Polling`](crate::Mode::Polling)). It detects frames from their headers, not
/// from the producer index; neither side uses the wake-up handshakes.
pub const CONSUMER_POLLING: u32 = 1;

/// Control block at the start of the producer part (written only by the producer).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C, align(64))]
pub struct ProducerControl {
    /// [`PRODUCER_MAGIC`] once initialised, 0 before.
    pub magic: u64,
    /// [`LAYOUT_VERSION`].
    pub version: u32,
    /// Zero.
    pub reserved0: u32,
    /// Capacity of the data area in bytes (power of two).
    pub capacity: u64,
    /// Zero (rest of the header cache line).
    pub reserved1: [u64; 5],
    /// Producer index: total bytes published (monotonic byte counter).
    pub index: u64,
    /// Zero (rest of the index cache line).
    pub reserved2: [u64; 7],
    /// Wait-for-space event: the producer wants a notification once the consumer index
    /// passes this value (virtio `vring_need_event` style); [`NO_EVENT`] when not waiting.
    pub space_event: u64,
    /// Zero (rest of the event cache line).
    pub reserved3: [u64; 7],
}

/// Control block forming the whole consumer part (written only by the consumer).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C, align(64))]
pub struct ConsumerControl {
    /// [`CONSUMER_MAGIC`] once initialised, 0 before.
    pub magic: u64,
    /// [`LAYOUT_VERSION`].
    pub version: u32,
    /// Consumer flags: [`CONSUMER_POLLING`] or 0 (read once by the producer at attach).
    pub flags: u32,
    /// Zero (rest of the header cache line).
    pub reserved1: [u64; 6],
    /// Consumer index: total bytes released (monotonic byte counter).
    pub index: u64,
    /// Zero (rest of the index cache line).
    pub reserved2: [u64; 7],
    /// Data event: the consumer wants a notification once the producer index passes this
    /// value; [`NO_EVENT`] when not sleeping.
    pub data_event: u64,
    /// Zero (rest of the event cache line).
    pub reserved3: [u64; 7],
}

/// Header in front of every frame in the data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C, align(8))]
pub struct FrameHeader {
    /// Payload length in bytes (for padding: bytes after the header up to the end).
    pub len: u32,
    /// Application-defined frame kind.
    pub kind: u16,
    /// 0 for a frame, [`FLAG_PADDING`] for padding; other values are invalid.
    pub flags: u16,
}

impl FrameHeader {
    /// Encodes the header as the `u64` word stored in the data area.
    #[inline(always)]
    pub fn to_word(self) -> u64 {
        zerocopy::transmute!(self)
    }
    /// Decodes a header word.
    #[inline(always)]
    pub fn from_word(word: u64) -> Self {
        zerocopy::transmute!(word)
    }
}

/// Offset of the producer magic.
pub const P_MAGIC: usize = offset_of!(ProducerControl, magic);
/// Offset of the producer version word (version in the first 4 bytes).
pub const P_VERSION: usize = offset_of!(ProducerControl, version);
/// Offset of the capacity.
pub const P_CAPACITY: usize = offset_of!(ProducerControl, capacity);
/// Offset of the producer index.
pub const P_INDEX: usize = offset_of!(ProducerControl, index);
/// Offset of the wait-for-space event.
pub const P_SPACE_EVENT: usize = offset_of!(ProducerControl, space_event);
/// Offset of the data area inside the producer part.
pub const P_DATA: usize = size_of::<ProducerControl>();

/// Offset of the consumer magic.
pub const C_MAGIC: usize = offset_of!(ConsumerControl, magic);
/// Offset of the consumer version word.
pub const C_VERSION: usize = offset_of!(ConsumerControl, version);
/// Offset of the consumer flags (the upper half of the version word).
pub const C_FLAGS: usize = offset_of!(ConsumerControl, flags);
/// Offset of the consumer index.
pub const C_INDEX: usize = offset_of!(ConsumerControl, index);
/// Offset of the data event.
pub const C_DATA_EVENT: usize = offset_of!(ConsumerControl, data_event);
/// Size of the consumer part.
pub const CONSUMER_PART_SIZE: usize = size_of::<ConsumerControl>();

const _: () = {
    assert!(P_MAGIC == 0 && P_VERSION == 8 && P_CAPACITY == 16);
    assert!(P_INDEX == 64 && P_SPACE_EVENT == 128 && P_DATA == 192);
    assert!(C_FLAGS == C_VERSION + 4);
    assert!(C_MAGIC == 0 && C_VERSION == 8 && C_INDEX == 64 && C_DATA_EVENT == 128);
    assert!(CONSUMER_PART_SIZE == 192);
    assert!(size_of::<FrameHeader>() == FRAME_HEADER_LEN);
    assert!(P_INDEX % CACHE_LINE == 0 && P_SPACE_EVENT % CACHE_LINE == 0);
    assert!(C_INDEX % CACHE_LINE == 0 && C_DATA_EVENT % CACHE_LINE == 0);
};

/// Bytes needed for the producer part of a ring with `capacity` bytes of data area.
pub const fn producer_part_size(capacity: usize) -> usize {
    P_DATA + capacity
}

/// Largest payload a ring of `capacity` accepts: a frame occupies at most half the data area,
/// so that it always fits once the ring drains, whatever padding the wrap needs.
pub const fn max_frame_len(capacity: usize) -> usize {
    capacity / 2 - FRAME_HEADER_LEN
}

/// Bytes a frame with `len` payload bytes occupies in the data area (header, payload, alignment).
#[inline(always)]
pub const fn frame_size(len: usize) -> usize {
    (FRAME_HEADER_LEN + len + (FRAME_ALIGN - 1)) & !(FRAME_ALIGN - 1)
}

/// [`frame_size`] of a length read from a header (a `u32`, widened), in index arithmetic.
#[inline(always)]
pub const fn frame_size_u64(len: u64) -> u64 {
    (len + (FRAME_HEADER_LEN + FRAME_ALIGN - 1) as u64) & !(FRAME_ALIGN as u64 - 1)
}

/// Whether `capacity` is acceptable: a power of two in `[MIN_CAPACITY, MAX_CAPACITY]`.
pub const fn capacity_ok(capacity: usize) -> bool {
    capacity.is_power_of_two() && capacity >= MIN_CAPACITY && capacity <= MAX_CAPACITY
}

/// Where the two parts of a one-way ring sit in one shared region (one memfd, one ivshmem
/// section pair laid out by hand): the producer part at offset 0, the consumer part after it,
/// each starting on an `align` boundary and padded to a multiple of it. With `align` the page
/// size each side can map its own part read-write and the peer's part read-only, the
/// protection ivshmem v2 gives output sections (mapping offsets must be page multiples).
///
/// ```
/// use shmring::layout::{OneWayLayout, CONSUMER_PART_SIZE};
/// let l = OneWayLayout::new(64 * 1024, 4096)?;
/// assert_eq!((l.producer_offset, l.producer_len), (0, 69_632)); // 192 + 64 KiB, in pages
/// assert_eq!((l.consumer_offset, l.consumer_len), (69_632, 4096));
/// assert_eq!(l.total_len, 73_728);
/// // The other way round: the largest ring a 1 MiB region holds.
/// assert_eq!(OneWayLayout::for_region(1 << 20, 4096)?.capacity, 512 * 1024);
/// # Ok::<(), shmring::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OneWayLayout {
    /// Capacity of the data area (bytes).
    pub capacity: usize,
    /// Offset of the producer part (always 0).
    pub producer_offset: usize,
    /// Bytes reserved for the producer part (`producer_part_size(capacity)`, rounded up).
    pub producer_len: usize,
    /// Offset of the consumer part.
    pub consumer_offset: usize,
    /// Bytes reserved for the consumer part ([`CONSUMER_PART_SIZE`], rounded up).
    pub consumer_len: usize,
    /// Size of the whole region.
    pub total_len: usize,
}

impl OneWayLayout {
    /// The layout of a ring with `capacity` bytes of data area, parts aligned to `align` (a
    /// power of two, at least [`REGION_ALIGN`]; typically the page size).
    ///
    /// Errors: [`Error::BadCapacity`](crate::Error::BadCapacity),
    /// [`Error::Misaligned`](crate::Error::Misaligned) for a bad `align`.
    pub fn new(capacity: usize, align: usize) -> Result<OneWayLayout, crate::Error> {
        if !capacity_ok(capacity) {
            return Err(crate::Error::BadCapacity { capacity });
        }
        if !align.is_power_of_two() || align < REGION_ALIGN {
            return Err(crate::Error::Misaligned {
                align: REGION_ALIGN,
            });
        }
        let round = |n: usize| n.checked_next_multiple_of(align);
        let too_big = crate::Error::BadCapacity { capacity };
        let producer_len = round(producer_part_size(capacity)).ok_or(too_big)?;
        let consumer_len = round(CONSUMER_PART_SIZE).ok_or(too_big)?;
        let total_len = producer_len.checked_add(consumer_len).ok_or(too_big)?;
        Ok(OneWayLayout {
            capacity,
            producer_offset: 0,
            producer_len,
            consumer_offset: producer_len,
            consumer_len,
            total_len,
        })
    }

    /// The layout with the largest capacity whose region fits in `region_len` bytes.
    ///
    /// Errors: [`Error::RegionTooSmall`](crate::Error::RegionTooSmall) if not even
    /// [`MIN_CAPACITY`] fits; [`Error::Misaligned`](crate::Error::Misaligned) for a bad `align`.
    pub fn for_region(region_len: usize, align: usize) -> Result<OneWayLayout, crate::Error> {
        let smallest = OneWayLayout::new(MIN_CAPACITY, align)?;
        if region_len < smallest.total_len {
            return Err(crate::Error::RegionTooSmall {
                needed: smallest.total_len,
                got: region_len,
            });
        }
        // Largest power of two not above the room left for the data area, then step down
        // while the rounding to `align` makes it overflow the region (at most a few steps).
        let room = (region_len - smallest.consumer_len - P_DATA).min(MAX_CAPACITY);
        let mut capacity = 1usize << (usize::BITS - 1 - room.leading_zeros());
        loop {
            let layout = OneWayLayout::new(capacity, align)?;
            if layout.total_len <= region_len {
                return Ok(layout);
            }
            capacity /= 2;
        }
    }
}
