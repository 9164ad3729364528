//! Reading bytes that the peer may write at any moment.
//!
//! A frame handed out by [`Consumer::peek`](crate::Consumer::peek) lies in the producer's
//! output section. The producer is another program (another cell, another VM); nothing stops
//! it from writing those bytes while we read them. A `&[u8]` over such memory is a promise to
//! the compiler that the bytes do not change while the reference lives, and the compiler uses
//! it: it may read a length twice (once for the bounds check, once for the use), or merge and
//! re-order reads. Against a hostile peer that promise is false, so the read side never hands
//! out a `&[u8]` over peer memory. [`PeerBytes`] is what it hands out instead, following the
//! rules of rust-vmm's `VolatileSlice` (`vm-memory` needs `std`, so this is a small no_std
//! version of the same idea):
//!
//! - every access goes through a raw pointer: integers and `Pod` values are read with
//!   `ptr::read_volatile` (one load the compiler may neither repeat nor elide), bulk data is
//!   copied with `ptr::copy_nonoverlapping` into caller memory; no reference to peer memory is
//!   ever created;
//! - each helper reads each byte **once**: checksums, comparisons and writers work on a private
//!   copy of each chunk, so what they compute is consistent with what they read, whatever the
//!   peer does meanwhile;
//! - every offset is checked against the length validated when the frame was peeked; an
//!   out-of-range request is an [`OutOfBounds`] error, never a panic.
//!
//! A peer that rewrites a frame while it is read can make the copy a mix of old and new bytes:
//! that is garbage in, garbage out, to be caught by the application's own checks (a checksum
//! computed in the same pass, see [`PeerBytes::copy_to_with_sum`]). It cannot make the reader
//! read outside the frame, loop, panic or misbehave in any way the Rust abstract machine does
//! not define.
//!
//! Under Miri the raw reads are byte-wise relaxed atomic loads instead (the same single read of
//! each byte), so that tests can play the hostile peer with a thread that writes with atomic
//! byte stores and Miri still checks every access for bounds, provenance and races.

use core::marker::PhantomData;
use core::mem::size_of;

use bytemuck::Pod;

/// A range outside a [`PeerBytes`] view was requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes at offset {offset} are outside a view of {size} bytes")]
pub struct OutOfBounds {
    /// Requested offset.
    pub offset: usize,
    /// Requested length.
    pub len: usize,
    /// Length of the view.
    pub size: usize,
}

/// Size of the private chunk buffer the byte-once helpers ([`PeerBytes::try_for_each_chunk`],
/// checksums, comparisons) copy through: small enough for any stack, large enough that the
/// copy runs at memcpy speed.
pub const CHUNK: usize = 1024;

/// Chunk size of [`PeerBytes::write_to`]: fewer, larger `write` calls.
#[cfg(feature = "std")]
const WRITE_CHUNK: usize = 16 * 1024;

/// A read-only view of `len` bytes that the peer may write concurrently (a frame's payload, or
/// part of it). Cheap to copy; borrows the [`Frame`](crate::Frame) it came from, so it cannot
/// outlive the frame's release.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (mut tx, mut rx) = shmring::channel(4096)?;
/// let _ = tx.try_send(&[0x45, 0x00, 0x00, 0x1c, 1, 2, 3, 4, 5])?;
/// let frame = rx.peek()?.expect("a frame");
/// let payload = frame.payload();
/// assert_eq!(payload.len(), 9);
/// assert_eq!(payload.read_u8(0)?, 0x45);
/// assert_eq!(payload.read_u16_be(2)?, 28);
/// assert!(payload.read_u32_be(6).is_err(), "bytes 6..10 of 9: out of bounds");
/// let mut head = [0u8; 4];
/// payload.copy_range_to(5, &mut head)?;
/// assert_eq!(head, [2, 3, 4, 5]);
/// assert!(payload.starts_with(&[0x45, 0x00]));
/// let mut copy = [0u8; 16];
/// let (n, sum) = payload.copy_to_with_sum(&mut copy);
/// assert_eq!(sum, shmring::view::ones_complement_sum(&copy[..n]));
/// frame.release();
/// # Ok(()) }
/// ```
#[derive(Clone, Copy)]
pub struct PeerBytes<'a> {
    ptr: *const u8,
    len: usize,
    _frame: PhantomData<&'a ()>,
}

// SAFETY: a view only ever reads through raw pointers with volatile loads or copies (see the
// module docs), which are as fine from any thread as from the one that peeked; the memory
// itself is shared with another program anyway.
unsafe impl Send for PeerBytes<'_> {}
// SAFETY: as above; `&PeerBytes` offers nothing more than `PeerBytes`.
unsafe impl Sync for PeerBytes<'_> {}

impl core::fmt::Debug for PeerBytes<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PeerBytes")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

/// Copies `n` bytes of peer memory at `src` into caller memory at `dst`, reading each byte
/// once.
///
/// # Safety
/// `src` is valid for reads of `n` bytes (peer memory, possibly written concurrently by the
/// peer), `dst` for writes of `n` bytes, and they do not overlap.
#[inline(always)]
unsafe fn copy_from_peer(src: *const u8, dst: *mut u8, n: usize) {
    #[cfg(not(miri))]
    // SAFETY: forwarded to the caller. A bulk copy through raw pointers: no reference to the
    // source exists, and the result lives in caller memory that only the caller writes.
    unsafe {
        core::ptr::copy_nonoverlapping(src, dst, n)
    };
    #[cfg(miri)]
    for i in 0..n {
        // SAFETY: forwarded to the caller; an atomic byte load is a plain load in Miri's model
        // of a racing peer that stores atomically.
        unsafe {
            let byte = core::sync::atomic::AtomicU8::from_ptr(src.add(i).cast_mut())
                .load(core::sync::atomic::Ordering::Relaxed);
            dst.add(i).write(byte);
        }
    }
}

/// Reads a `T` from peer memory at `src` (any alignment) with one volatile read.
///
/// # Safety
/// `src` is valid for reads of `size_of::<T>()` bytes.
#[inline(always)]
unsafe fn read_from_peer<T: Pod>(src: *const u8) -> T {
    #[cfg(not(miri))]
    {
        /// Alignment 1: `read_volatile` on any address.
        #[repr(C, packed)]
        #[derive(Clone, Copy)]
        struct Unaligned<T>(T);
        // SAFETY: forwarded to the caller; the packed wrapper has alignment 1; `T: Pod` accepts
        // any bit pattern, so a value the peer is half-way through writing is still a `T`.
        unsafe { core::ptr::read_volatile(src.cast::<Unaligned<T>>()) }.0
    }
    #[cfg(miri)]
    {
        let mut value = T::zeroed();
        // SAFETY: forwarded to the caller; the destination is our local.
        unsafe {
            copy_from_peer(
                src,
                bytemuck::bytes_of_mut(&mut value).as_mut_ptr(),
                size_of::<T>(),
            )
        };
        value
    }
}

macro_rules! int_readers {
    ($($(#[$doc:meta])* $name:ident: $ty:ty, $from:ident;)*) => {$(
        $(#[$doc])*
        #[inline]
        pub fn $name(&self, offset: usize) -> Result<$ty, OutOfBounds> {
            self.read::<[u8; size_of::<$ty>()]>(offset).map(<$ty>::$from)
        }
    )*};
}

impl<'a> PeerBytes<'a> {
    /// A view of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr` is valid for reads of `len` bytes for `'a` (it may be mapped read-only and written
    /// by the peer at any time); `len <= isize::MAX`.
    #[inline]
    pub unsafe fn new(ptr: *const u8, len: usize) -> Self {
        PeerBytes {
            ptr,
            len,
            _frame: PhantomData,
        }
    }

    /// Length in bytes (validated once when the frame was peeked; never re-read).
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address, for address arithmetic and diagnostics (no access is implied).
    #[inline]
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    #[inline(always)]
    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// The `len` bytes at `offset`.
    #[inline]
    pub fn subslice(&self, offset: usize, len: usize) -> Result<PeerBytes<'a>, OutOfBounds> {
        self.check(offset, len)?;
        // SAFETY: offset + len <= self.len: inside the view.
        Ok(unsafe { PeerBytes::new(self.ptr.add(offset), len) })
    }

    /// The view cut in two at `mid`: `[0, mid)` and `[mid, len)`.
    #[inline]
    pub fn split_at(&self, mid: usize) -> Result<(PeerBytes<'a>, PeerBytes<'a>), OutOfBounds> {
        let head = self.subslice(0, mid)?;
        // SAFETY: mid <= len (checked just above).
        let tail = unsafe { PeerBytes::new(self.ptr.add(mid), self.len - mid) };
        Ok((head, tail))
    }

    /// Copies the first `min(len, dst.len())` bytes into `dst` and returns how many.
    #[inline]
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        let n = self.len.min(dst.len());
        // SAFETY: n bytes inside the view; `dst` is caller memory, distinct from peer memory
        // (a `&mut [u8]` cannot alias the peer's read-only section).
        unsafe { copy_from_peer(self.ptr, dst.as_mut_ptr(), n) };
        n
    }

    /// Copies exactly `dst.len()` bytes starting at `offset` into `dst`.
    #[inline]
    pub fn copy_range_to(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.subslice(offset, dst.len())?.copy_to(dst);
        Ok(())
    }

    /// A copy of the whole view.
    #[cfg(feature = "alloc")]
    pub fn to_vec(&self) -> alloc::vec::Vec<u8> {
        let mut out = alloc::vec![0u8; self.len];
        self.copy_to(&mut out);
        out
    }

    /// Reads a plain-old-data value at `offset` (any alignment) with one volatile read. The
    /// value is a snapshot: use it, never read the field again to "re-check" it.
    #[inline]
    pub fn read<T: Pod>(&self, offset: usize) -> Result<T, OutOfBounds> {
        self.check(offset, size_of::<T>())?;
        // SAFETY: size_of::<T>() bytes at offset lie inside the view.
        Ok(unsafe { read_from_peer::<T>(self.ptr.add(offset)) })
    }

    int_readers! {
        /// The byte at `offset`.
        read_u8: u8, from_ne_bytes;
        /// A little-endian `u16` at `offset` (any alignment), one volatile read.
        read_u16_le: u16, from_le_bytes;
        /// A big-endian (network order) `u16` at `offset`, one volatile read.
        read_u16_be: u16, from_be_bytes;
        /// A little-endian `u32` at `offset`, one volatile read.
        read_u32_le: u32, from_le_bytes;
        /// A big-endian `u32` at `offset`, one volatile read.
        read_u32_be: u32, from_be_bytes;
        /// A little-endian `u64` at `offset`, one volatile read.
        read_u64_le: u64, from_le_bytes;
        /// A big-endian `u64` at `offset`, one volatile read.
        read_u64_be: u64, from_be_bytes;
    }

    /// Runs `f` on consecutive chunks of at most `buf.len()` bytes, each copied once into `buf`.
    #[inline(always)]
    fn chunks_via<E>(
        &self,
        buf: &mut [u8],
        mut f: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        debug_assert!(!buf.is_empty());
        let mut offset = 0;
        while offset < self.len {
            let n = (self.len - offset).min(buf.len());
            // SAFETY: offset + n <= len: inside the view; `buf` is our own stack buffer.
            unsafe { copy_from_peer(self.ptr.add(offset), buf.as_mut_ptr(), n) };
            f(offset, &buf[..n])?;
            offset += n;
        }
        Ok(())
    }

    /// Runs `f` on consecutive chunks of the view (at most [`CHUNK`] bytes each, in order), each
    /// a private copy read once from peer memory: the general form of the byte-once helpers
    /// (a CRC, a hash, a parser), stopping at the first error `f` returns.
    pub fn try_for_each_chunk<E>(
        &self,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut buf = [0u8; CHUNK];
        self.chunks_via(&mut buf, |_, chunk| f(chunk))
    }

    /// Whether the view holds exactly the bytes of `other` (each byte read once; stops at the
    /// first difference).
    pub fn eq_slice(&self, other: &[u8]) -> bool {
        self.len == other.len() && self.starts_with(other)
    }

    /// Whether the view begins with `prefix` (each byte read once; stops at the first
    /// difference).
    pub fn starts_with(&self, prefix: &[u8]) -> bool {
        let Ok(head) = self.subslice(0, prefix.len()) else {
            return false;
        };
        let mut buf = [0u8; CHUNK];
        head.chunks_via(&mut buf, |offset, chunk| {
            if chunk == &prefix[offset..offset + chunk.len()] {
                Ok(())
            } else {
                Err(())
            }
        })
        .is_ok()
    }

    /// The 16-bit ones' complement sum of RFC 1071 over the view, each byte read once (see
    /// [`ones_complement_sum`]; `!sum` is the Internet checksum).
    pub fn ones_complement_sum(&self) -> u16 {
        let mut sum = Sum::default();
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        {
            // Straight from peer memory into SIMD registers: each 16-byte block is copied once
            // by an unaligned load (a copy through a raw pointer, like `copy_from_peer`, only
            // into a register) and summed; no reference, no second read. The tail goes
            // through the chunk path below.
            let blocks = self.len / 32;
            let mut done = 0;
            while done < blocks {
                let n = (blocks - done).min(CHUNK / 32);
                // SAFETY: blocks [done, done + n) of 32 bytes lie inside the view.
                sum.acc = fold64(sum.acc + unsafe { sse2::sum_blocks(self.ptr.add(done * 32), n) });
                done += n;
            }
            let tail = blocks * 32;
            // SAFETY: tail <= len.
            let rest = unsafe { PeerBytes::new(self.ptr.add(tail), self.len - tail) };
            let _ = rest.try_for_each_chunk::<()>(|chunk| {
                sum.add(chunk);
                Ok(())
            });
        }
        #[cfg(not(all(target_arch = "x86_64", not(miri))))]
        let _ = self.try_for_each_chunk::<()>(|chunk| {
            sum.add(chunk);
            Ok(())
        });
        sum.finish()
    }

    /// Copies the first `min(len, dst.len())` bytes into `dst`, like [`copy_to`](Self::copy_to),
    /// and returns how many together with the ones' complement sum of exactly the bytes
    /// copied, in one pass over peer memory: the sum always matches `dst`, even if the peer
    /// rewrites the frame meanwhile (unlike "copy, then checksum peer memory"). The receive
    /// path's copy and checksum in one.
    pub fn copy_to_with_sum(&self, dst: &mut [u8]) -> (usize, u16) {
        let n = self.len.min(dst.len());
        let mut sum = Sum::default();
        for (i, out) in dst[..n].chunks_mut(CHUNK).enumerate() {
            // SAFETY: the chunks cover exactly [0, n) of the view; each is caller memory,
            // distinct from peer memory.
            unsafe { copy_from_peer(self.ptr.add(i * CHUNK), out.as_mut_ptr(), out.len()) };
            sum.add(out);
        }
        (n, sum.finish())
    }

    /// Writes the whole view to `w` (`write_all` semantics), each byte read once, through a
    /// bounded stack buffer of 16 KiB: never the whole frame staged, and no `&[u8]` over peer
    /// memory handed to `w`. On an error some prefix may have been written.
    #[cfg(feature = "std")]
    pub fn write_to<W: std::io::Write + ?Sized>(&self, w: &mut W) -> std::io::Result<()> {
        let mut buf = [0u8; WRITE_CHUNK];
        self.chunks_via(&mut buf, |_, chunk| w.write_all(chunk))
    }

    /// The view as a shared slice.
    ///
    /// # Safety
    /// The peer is trusted not to write these bytes until the frame is released (for as long
    /// as the returned slice lives). A hostile or broken peer that does write them makes every
    /// read through the slice a data race: undefined behaviour, not merely untrusted bytes.
    #[inline]
    pub unsafe fn as_trusted_slice(&self) -> &'a [u8] {
        // SAFETY: inside the validated frame (see `new`); immutability for 'a is the caller's
        // promise above.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// Running ones' complement sum over a byte stream cut into chunks of even length (only the
/// last chunk may be odd).
#[derive(Default)]
struct Sum {
    acc: u64,
}

impl Sum {
    /// Adds a chunk of less than 128 KiB (callers pass at most [`CHUNK`] bytes). The sum of
    /// native-endian 16-bit words (the byte order is fixed once in `finish`, RFC 1071 §2(B)),
    /// computed on 64-bit words: masking and shifting puts each word's four 16-bit values into
    /// two 32-bit lanes that cannot overflow within such a chunk. No carries to propagate: the
    /// loop is plain 64-bit and/shift/add, which LLVM vectorises even for baseline SSE2.
    #[inline(always)]
    fn add(&mut self, bytes: &[u8]) {
        const LOW: u64 = 0x0000_ffff_0000_ffff;
        let mut blocks = bytes.chunks_exact(32);
        let mut lane = [0u64; 4];
        for block in &mut blocks {
            let words: [[u8; 8]; 4] =
                bytemuck::cast(<[u8; 32]>::try_from(block).unwrap_or([0; 32]));
            for (lane, word) in lane.iter_mut().zip(words) {
                let w = u64::from_ne_bytes(word);
                *lane += (w & LOW) + ((w >> 16) & LOW);
            }
        }
        let mut words = blocks.remainder().chunks_exact(8);
        let mut lanes = lane[0] + lane[1] + lane[2] + lane[3];
        for word in &mut words {
            let w = u64::from_ne_bytes([
                word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
            ]);
            lanes += (w & LOW) + ((w >> 16) & LOW);
        }
        let mut acc = (lanes & 0xffff_ffff) + (lanes >> 32);
        let mut tail = words.remainder().chunks_exact(2);
        for pair in &mut tail {
            acc += u64::from(u16::from_ne_bytes([pair[0], pair[1]]));
        }
        if let [last] = tail.remainder() {
            acc += u64::from(u16::from_ne_bytes([*last, 0]));
        }
        self.acc = fold64(self.acc + acc);
    }

    #[inline(always)]
    fn finish(self) -> u16 {
        let mut s = self.acc;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        u16::from_be(s as u16)
    }
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
mod sse2 {
    use core::arch::x86_64::{
        __m128i, _mm_add_epi32, _mm_and_si128, _mm_loadu_si128, _mm_set1_epi32, _mm_setzero_si128,
        _mm_srli_epi32,
    };

    /// The sum of the native-endian 16-bit words of `blocks` 32-byte blocks at `p`, each byte
    /// loaded once (SSE2, the x86-64 baseline): 16-bit values added into 32-bit lanes, which
    /// cannot overflow for fewer than 32768 blocks (1 MiB).
    ///
    /// # Safety
    /// `p` is valid for reads of `blocks * 32` bytes (peer memory; written concurrently or
    /// not); `blocks < 32768`.
    #[inline]
    pub(super) unsafe fn sum_blocks(p: *const u8, blocks: usize) -> u64 {
        let low = _mm_set1_epi32(0xffff);
        let (mut a, mut b) = (_mm_setzero_si128(), _mm_setzero_si128());
        for i in 0..blocks {
            // SAFETY: inside the range the caller vouches for; unaligned loads.
            let (x, y) = unsafe {
                let q = p.add(i * 32).cast::<__m128i>();
                (_mm_loadu_si128(q), _mm_loadu_si128(q.add(1)))
            };
            a = _mm_add_epi32(
                a,
                _mm_add_epi32(_mm_and_si128(x, low), _mm_srli_epi32(x, 16)),
            );
            b = _mm_add_epi32(
                b,
                _mm_add_epi32(_mm_and_si128(y, low), _mm_srli_epi32(y, 16)),
            );
        }
        let lanes: [u32; 4] = bytemuck::cast(_mm_add_epi32(a, b));
        lanes.iter().map(|&lane| u64::from(lane)).sum()
    }
}

/// Folds a sum to at most 33 bits, keeping it congruent mod 0xffff.
#[inline(always)]
fn fold64(s: u64) -> u64 {
    (s & 0xffff_ffff) + (s >> 32)
}

/// The RFC 1071 ones' complement sum of `bytes` read as big-endian 16-bit words (an odd last
/// byte padded with zero), not complemented: the same value as smoltcp's
/// `wire::ip::checksum::data`. For bytes in our own memory; [`PeerBytes::ones_complement_sum`]
/// computes it over peer memory.
pub fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum = Sum::default();
    for chunk in bytes.chunks(CHUNK) {
        sum.add(chunk);
    }
    sum.finish()
}
