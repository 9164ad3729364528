//! The bytes of an `ivshmem-net` output section: queue geometry, field offsets, descriptors,
//! used elements, the event-index rule and the data area's slot allocator (pure, no shared
//! memory; `/work/shared/ivshmem-net.md` is the contract).
//!
//! One output section (written by its owner only) holds at offset 0 a split virtqueue of
//! [`Geometry::qlen`] entries with 64-byte alignment, then at [`Geometry::vrsize`] the data
//! area. The used ring in a section carries its owner's completions of the *peer's*
//! transmissions (the used rings are swapped); every field is little-endian.
//!
//! [`Vring`] is a typed view over a byte buffer holding a queue (smoltcp's `Packet<T>` style),
//! for golden tests, captures and tools. The transport ([`super::queue`]) never forms a slice
//! over shared memory: it reads and writes the same offsets through raw pointers.

/// Size of one descriptor: `addr` u64, `len` u32, `flags` u16, `next` u16.
pub const DESC_SIZE: usize = 16;
/// Size of one used element: `id` u32, `len` u32.
pub const USED_ELEM_SIZE: usize = 8;
/// Alignment of the used ring and of the rounded queue size (a cache line).
pub const VRING_ALIGN: usize = 64;
/// Largest queue length the driver picks.
pub const MAX_QLEN: u16 = 4096;
/// Smallest queue length the driver accepts.
pub const MIN_QLEN: u16 = 64;
/// Per-frame overhead the Linux driver reserves in a data slot.
pub const FRAME_OVERHEAD: usize = 18;
/// Alignment (and granularity) of a data slot.
pub const SLOT_ALIGN: usize = 64;
/// The data area must hold at least this many bytes (4 slots of 68).
pub const MIN_DATA_AREA: usize = 4 * 68;
/// Ethernet header length (the MTU of Linux counts without it).
pub const ETH_HEADER: usize = 14;
/// The Linux driver's default MTU cap (its default is `min(16384, data area / 16)`).
pub const LINUX_DEFAULT_MTU: usize = 16384;
/// The largest Ethernet frame a compatible peer accepts by default: MTU 16384 + 14 header.
pub const DEFAULT_MAX_FRAME: usize = LINUX_DEFAULT_MTU + ETH_HEADER;
/// The completion length the receiver writes for every frame.
pub const COMPLETION_LEN: u32 = 1;

/// Rounds `value` up to a multiple of the power of two `align`.
pub const fn round_up(value: usize, align: usize) -> usize {
    (value + align - 1) & !(align - 1)
}

/// Size of a standard virtio split ring of `n` entries: descriptors, available ring (flags,
/// idx, ring, used_event) padded to `align`, used ring (flags, idx, ring, avail_event).
pub const fn vring_size(n: usize, align: usize) -> usize {
    round_up(DESC_SIZE * n + 6 + 2 * n, align) + 6 + USED_ELEM_SIZE * n
}

/// Bytes a frame of `len` bytes occupies in the data area: `round_up(18 + len, 64)`.
pub const fn slot_size(len: usize) -> usize {
    round_up(FRAME_OVERHEAD + len, SLOT_ALIGN)
}

/// virtio's `vring_need_event`: whether moving an index from `old` to `new` passes the
/// `event` the other side published (i.e. `event` lies in `[old, new)`, modulo 2^16).
pub const fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Why a section cannot carry an `ivshmem-net` queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// Not even a queue of [`MIN_QLEN`] fits in an eighth of the section.
    #[error("output section of {len} bytes is too small for a queue of {MIN_QLEN} entries")]
    SectionTooSmall {
        /// Section length.
        len: usize,
    },
    /// The data area left after the queue is smaller than [`MIN_DATA_AREA`].
    #[error("output section of {len} bytes leaves a data area of {data} bytes, fewer than {MIN_DATA_AREA}")]
    DataAreaTooSmall {
        /// Section length.
        len: usize,
        /// Data area length.
        data: usize,
    },
}

/// The layout of one output section, derived from its size alone (both sides compute it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    section: usize,
    qlen: u16,
    vrsize: usize,
}

impl Geometry {
    /// The geometry of a section of `section` bytes: the largest power-of-two `qlen` from 4096
    /// down to 64 whose rounded `vring_size` is less than `section / 8`.
    pub const fn new(section: usize) -> Result<Geometry, GeometryError> {
        let mut qlen = MAX_QLEN;
        while qlen >= MIN_QLEN {
            let vrsize = round_up(vring_size(qlen as usize, VRING_ALIGN), VRING_ALIGN);
            if vrsize < section / 8 {
                let data = section - vrsize;
                if data < MIN_DATA_AREA {
                    return Err(GeometryError::DataAreaTooSmall { len: section, data });
                }
                return Ok(Geometry {
                    section,
                    qlen,
                    vrsize,
                });
            }
            qlen /= 2;
        }
        Err(GeometryError::SectionTooSmall { len: section })
    }

    /// Section length.
    pub const fn section_len(&self) -> usize {
        self.section
    }
    /// Queue length (entries of each ring, descriptors).
    pub const fn qlen(&self) -> u16 {
        self.qlen
    }
    /// The queue's size rounded to 64: the offset of the data area.
    pub const fn vrsize(&self) -> usize {
        self.vrsize
    }
    /// Offset of the data area in the section (= [`vrsize`](Self::vrsize)).
    pub const fn data_offset(&self) -> usize {
        self.vrsize
    }
    /// Length of the data area.
    pub const fn data_len(&self) -> usize {
        self.section - self.vrsize
    }
    /// Offset of descriptor `id`.
    pub const fn desc(&self, id: u16) -> usize {
        DESC_SIZE * id as usize
    }
    /// Offset of the available ring (its `flags`).
    pub const fn avail(&self) -> usize {
        DESC_SIZE * self.qlen as usize
    }
    /// Offset of `avail.flags`.
    pub const fn avail_flags(&self) -> usize {
        self.avail()
    }
    /// Offset of `avail.idx`.
    pub const fn avail_idx(&self) -> usize {
        self.avail() + 2
    }
    /// Offset of `avail.ring[index % qlen]` (a free-running index).
    pub const fn avail_ring(&self, index: u16) -> usize {
        self.avail() + 4 + 2 * (index % self.qlen) as usize
    }
    /// Offset of `used_event` (after the available ring; written by the section's owner as
    /// *sender*: "ring me when you complete past this").
    pub const fn used_event(&self) -> usize {
        self.avail() + 4 + 2 * self.qlen as usize
    }
    /// Offset of the used ring (its `flags`), 64-byte aligned.
    pub const fn used(&self) -> usize {
        round_up(self.avail() + 6 + 2 * self.qlen as usize, VRING_ALIGN)
    }
    /// Offset of `used.flags`.
    pub const fn used_flags(&self) -> usize {
        self.used()
    }
    /// Offset of `used.idx`.
    pub const fn used_idx(&self) -> usize {
        self.used() + 2
    }
    /// Offset of `used.ring[index % qlen]` (a free-running index).
    pub const fn used_ring(&self, index: u16) -> usize {
        self.used() + 4 + USED_ELEM_SIZE * (index % self.qlen) as usize
    }
    /// Offset of `avail_event` (after the used ring; written by the section's owner as
    /// *receiver*: "ring me when you publish past this").
    pub const fn avail_event(&self) -> usize {
        self.used() + 4 + USED_ELEM_SIZE * self.qlen as usize
    }
    /// Whether a frame at section offset `addr` of `len` bytes lies inside the data area.
    pub const fn frame_in_data_area(&self, addr: u64, len: u32) -> bool {
        let start = self.vrsize as u64;
        let end = self.section as u64;
        // No overflow: addr is checked against end before the addition matters.
        addr >= start && addr <= end && len as u64 <= end - addr
    }
    /// The largest frame this data area carries: four slots of it fit (Linux's largest MTU
    /// is data area / 4).
    pub const fn max_frame(&self) -> usize {
        ((self.data_len() / 4) & !(SLOT_ALIGN - 1)) - FRAME_OVERHEAD
    }
}

/// A descriptor as the sender writes it: `addr` is the frame's offset from the start of the
/// sender's section, `flags` must be 0, `next` is private to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Descriptor {
    /// Section-relative offset of the frame.
    pub addr: u64,
    /// Frame length.
    pub len: u32,
    /// Flags (0 on this link).
    pub flags: u16,
    /// Free-list link (sender-private).
    pub next: u16,
}

impl Descriptor {
    /// Decodes 16 little-endian bytes.
    pub fn from_bytes(b: [u8; DESC_SIZE]) -> Descriptor {
        let mut addr = [0; 8];
        addr.copy_from_slice(&b[0..8]);
        Descriptor {
            addr: u64::from_le_bytes(addr),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }
    /// Encodes into 16 little-endian bytes.
    pub fn to_bytes(&self) -> [u8; DESC_SIZE] {
        let mut b = [0; DESC_SIZE];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// A used element: the completed descriptor's `id` and `len` (always 1 on this link).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct UsedElem {
    /// Descriptor id.
    pub id: u32,
    /// Completion length.
    pub len: u32,
}

impl UsedElem {
    /// Decodes 8 little-endian bytes.
    pub fn from_bytes(b: [u8; USED_ELEM_SIZE]) -> UsedElem {
        UsedElem {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
    /// Encodes into 8 little-endian bytes.
    pub fn to_bytes(&self) -> [u8; USED_ELEM_SIZE] {
        let mut b = [0; USED_ELEM_SIZE];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// A typed view over a buffer holding one section's queue (at least [`Geometry::vrsize`]
/// bytes), smoltcp style: getters on `AsRef<[u8]>`, setters on `AsMut<[u8]>`. Accessors
/// panic if the buffer is shorter than the geometry says; [`Vring::new_checked`] refuses such
/// a buffer.
#[derive(Debug, Clone)]
pub struct Vring<T> {
    buffer: T,
    geometry: Geometry,
}

/// The buffer is shorter than the queue it should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("buffer of {len} bytes is shorter than a queue of {need} bytes")]
pub struct Truncated {
    /// Buffer length.
    pub len: usize,
    /// Needed length.
    pub need: usize,
}

impl<T: AsRef<[u8]>> Vring<T> {
    /// Wraps `buffer` after checking it holds the whole queue of `geometry`.
    pub fn new_checked(buffer: T, geometry: Geometry) -> Result<Self, Truncated> {
        let len = buffer.as_ref().len();
        if len < geometry.vrsize() {
            return Err(Truncated {
                len,
                need: geometry.vrsize(),
            });
        }
        Ok(Vring { buffer, geometry })
    }
    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
    /// The buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
    fn u16_at(&self, off: usize) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    /// Descriptor `id`.
    pub fn descriptor(&self, id: u16) -> Descriptor {
        let off = self.geometry.desc(id);
        let mut b = [0; DESC_SIZE];
        b.copy_from_slice(&self.buffer.as_ref()[off..off + DESC_SIZE]);
        Descriptor::from_bytes(b)
    }
    /// `avail.flags`.
    pub fn avail_flags(&self) -> u16 {
        self.u16_at(self.geometry.avail_flags())
    }
    /// `avail.idx`.
    pub fn avail_idx(&self) -> u16 {
        self.u16_at(self.geometry.avail_idx())
    }
    /// `avail.ring[index % qlen]`.
    pub fn avail_entry(&self, index: u16) -> u16 {
        self.u16_at(self.geometry.avail_ring(index))
    }
    /// `used_event`.
    pub fn used_event(&self) -> u16 {
        self.u16_at(self.geometry.used_event())
    }
    /// `used.flags`.
    pub fn used_flags(&self) -> u16 {
        self.u16_at(self.geometry.used_flags())
    }
    /// `used.idx`.
    pub fn used_idx(&self) -> u16 {
        self.u16_at(self.geometry.used_idx())
    }
    /// `used.ring[index % qlen]`.
    pub fn used_entry(&self, index: u16) -> UsedElem {
        let off = self.geometry.used_ring(index);
        let mut b = [0; USED_ELEM_SIZE];
        b.copy_from_slice(&self.buffer.as_ref()[off..off + USED_ELEM_SIZE]);
        UsedElem::from_bytes(b)
    }
    /// `avail_event`.
    pub fn avail_event(&self) -> u16 {
        self.u16_at(self.geometry.avail_event())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Vring<T> {
    fn set_u16_at(&mut self, off: usize, v: u16) {
        self.buffer.as_mut()[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    /// Writes descriptor `id`.
    pub fn set_descriptor(&mut self, id: u16, d: Descriptor) {
        let off = self.geometry.desc(id);
        self.buffer.as_mut()[off..off + DESC_SIZE].copy_from_slice(&d.to_bytes());
    }
    /// Writes `avail.flags`.
    pub fn set_avail_flags(&mut self, v: u16) {
        self.set_u16_at(self.geometry.avail_flags(), v)
    }
    /// Writes `avail.idx`.
    pub fn set_avail_idx(&mut self, v: u16) {
        self.set_u16_at(self.geometry.avail_idx(), v)
    }
    /// Writes `avail.ring[index % qlen]`.
    pub fn set_avail_entry(&mut self, index: u16, id: u16) {
        self.set_u16_at(self.geometry.avail_ring(index), id)
    }
    /// Writes `used_event`.
    pub fn set_used_event(&mut self, v: u16) {
        self.set_u16_at(self.geometry.used_event(), v)
    }
    /// Writes `used.flags`.
    pub fn set_used_flags(&mut self, v: u16) {
        self.set_u16_at(self.geometry.used_flags(), v)
    }
    /// Writes `used.idx`.
    pub fn set_used_idx(&mut self, v: u16) {
        self.set_u16_at(self.geometry.used_idx(), v)
    }
    /// Writes `used.ring[index % qlen]`.
    pub fn set_used_entry(&mut self, index: u16, e: UsedElem) {
        let off = self.geometry.used_ring(index);
        self.buffer.as_mut()[off..off + USED_ELEM_SIZE].copy_from_slice(&e.to_bytes());
    }
    /// Writes `avail_event`.
    pub fn set_avail_event(&mut self, v: u16) {
        self.set_u16_at(self.geometry.avail_event(), v)
    }
}

/// The sender's slot allocator over the data area (offsets relative to the data area): a
/// ring of slots of [`slot_size`] bytes, reclaimed in the order they were taken. A slot that
/// does not fit before the end of the area starts at offset 0 instead (the tail is wasted
/// until the ring wraps). Pure bookkeeping; the sender keeps it private.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRing {
    len: usize,
    /// Where the next slot starts.
    head: usize,
    /// Start of the oldest slot in use.
    tail: usize,
    /// Slots in use.
    in_use: usize,
}

impl SlotRing {
    /// An empty ring over a data area of `len` bytes.
    pub const fn new(len: usize) -> SlotRing {
        SlotRing {
            len,
            head: 0,
            tail: 0,
            in_use: 0,
        }
    }

    /// Where a frame of `frame_len` bytes would go (data-area offset), or `None` if there is
    /// no room until older slots are released.
    pub const fn place(&self, frame_len: usize) -> Option<usize> {
        let size = slot_size(frame_len);
        if self.in_use == 0 {
            return if size <= self.len - self.head {
                Some(self.head)
            } else if size <= self.len {
                Some(0)
            } else {
                None
            };
        }
        if self.head > self.tail {
            if size <= self.len - self.head {
                Some(self.head)
            } else if size <= self.tail {
                Some(0)
            } else {
                None
            }
        } else if self.head < self.tail && size <= self.tail - self.head {
            Some(self.head)
        } else {
            None
        }
    }

    /// Takes the slot [`place`](Self::place) returned for `frame_len`; returns its offset.
    pub fn take(&mut self, frame_len: usize) -> Option<usize> {
        let at = self.place(frame_len)?;
        if self.in_use == 0 {
            self.tail = at;
        }
        self.head = at + slot_size(frame_len);
        self.in_use += 1;
        Some(at)
    }

    /// Releases the oldest slot, which started at `at` and held `frame_len` bytes (as the
    /// sender recorded them). Returns `false` (and changes nothing) if nothing was in use.
    ///
    /// The new tail is the end of the released slot. When the next slot wrapped to offset 0
    /// that is conservative (the bytes between this end and the end of the area stay unused
    /// until the wrapped slot is released too), never unsound: everything between the head
    /// and the new tail is free.
    pub fn release(&mut self, at: usize, frame_len: usize) -> bool {
        if self.in_use == 0 {
            return false;
        }
        self.in_use -= 1;
        if self.in_use == 0 {
            self.tail = self.head;
        } else {
            self.tail = at + slot_size(frame_len);
        }
        true
    }

    /// Slots in use.
    pub const fn in_use(&self) -> usize {
        self.in_use
    }

    /// Data-area length.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the data area has no bytes (never for a valid [`Geometry`]).
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_makes_room_again_after_a_wrap() {
        let mut r = SlotRing::new(256);
        let a = r.take(40).unwrap(); // 64
        let b = r.take(100).unwrap(); // 128
        assert_eq!((a, b), (0, 64));
        assert_eq!(r.place(100), None, "64 left at the end, 0 at the start");
        assert!(r.release(a, 40));
        assert_eq!(r.place(100), None, "tail 64: only 64 at the start");
        assert_eq!(r.take(40), Some(192));
        assert_eq!(r.take(40), Some(0), "wraps to 0 when the end is full");
        assert_eq!(r.place(1), None, "head 64 == tail 64, ring full");
        assert!(r.release(b, 100));
        assert_eq!(
            r.take(100),
            Some(64),
            "tail 192: 128 bytes between 64 and 192 fit"
        );
    }
}
