//! Duplex channels over an ivshmem link: two rings, each side owning one writable region.
//!
//! Binding convention (shared by `vnet`, the telemetry pipe and the Linux client). Each side
//! owns one writable region (its ivshmem output section) and reads the other side's region.
//! Layout of **each** side's region:
//!
//! | offset | size | content |
//! |-------:|-----:|---------|
//! | 0 | [`CONSUMER_SLOT`] | consumer part of the ring this side **receives** on |
//! | [`CONSUMER_SLOT`] | `producer_part_size(capacity)` | producer part of the ring this side **sends** on |
//!
//! The capacity is the largest power of two whose producer part fits after the consumer slot
//! ([`capacity_for`]), optionally capped by the caller. The two sides may choose different
//! capacities (each consumer reads its producer's capacity at attach).
//!
//! A one-way pipe uses the same layout and simply never sends on the unused direction.
//!
//! Set-up follows the two-phase pattern of the rings: each side first initialises its own
//! parts ([`DuplexInit::init`]), announces that (e.g. the ivshmem `STATE` READY), and only
//! then attaches to the peer's region ([`DuplexInit::attach`]).
//!
//! ```
//! # fn main() -> Result<(), shmring::Error> {
//! // In-process pair (feature `alloc`): what one side sends, the other receives.
//! let (mut a, mut b) = shmring::duplex::pair(4096)?;
//! let _ = a.tx.try_send(b"ping")?;
//! let mut buf = [0u8; 16];
//! let got = b.rx.try_recv(&mut buf)?.expect("frame");
//! assert_eq!(&buf[..got.len], b"ping");
//! # Ok(()) }
//! ```

use core::cell::Cell;

use crate::layout::{self, CONSUMER_PART_SIZE, REGION_ALIGN};
use crate::{Consumer, ConsumerInit, Error, Producer, ProducerInit};

/// Bytes reserved at the start of each region for the consumer part: the next multiple of 64
/// at or above [`CONSUMER_PART_SIZE`], and at least 128.
pub const CONSUMER_SLOT: usize = {
    let rounded = CONSUMER_PART_SIZE.div_ceil(REGION_ALIGN) * REGION_ALIGN;
    if rounded < 128 {
        128
    } else {
        rounded
    }
};

const _: () = assert!(CONSUMER_SLOT % REGION_ALIGN == 0 && CONSUMER_SLOT >= CONSUMER_PART_SIZE);

/// Capacity of the sending ring in a region of `region_len` bytes: the largest power of two
/// `cap` with `producer_part_size(cap) <= region_len - CONSUMER_SLOT`, capped by
/// `max_capacity` (rounded down to a power of two). `None` if not even
/// [`layout::MIN_CAPACITY`] fits (or the cap is below it).
pub fn capacity_for(region_len: usize, max_capacity: Option<usize>) -> Option<usize> {
    let room = region_len
        .checked_sub(CONSUMER_SLOT)?
        .checked_sub(layout::producer_part_size(0))?;
    let mut limit = room.min(layout::MAX_CAPACITY);
    if let Some(cap) = max_capacity {
        limit = limit.min(cap);
    }
    if limit < layout::MIN_CAPACITY {
        return None;
    }
    // Largest power of two <= limit.
    let cap = 1usize << (usize::BITS - 1 - limit.leading_zeros());
    Some(cap)
}

/// One side's region, initialised and announced, not yet attached to the peer's region.
///
/// [`attach`](Self::attach) takes `&self`: on [`Error::PeerNotReady`] (or any other error)
/// keep the value and try again later.
pub struct DuplexInit {
    own: *mut u8,
    own_len: usize,
    tx: ProducerInit,
    /// Always `Some` between calls; taken while attaching.
    rx: Cell<Option<ConsumerInit>>,
}

// SAFETY: holds the exclusive right to its own region (see `init`'s contract); moving it to
// another thread moves that right. Not Sync (Cell).
unsafe impl Send for DuplexInit {}

impl core::fmt::Debug for DuplexInit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DuplexInit")
            .field("own_len", &self.own_len)
            .field("tx_capacity", &self.tx.capacity())
            .finish()
    }
}

impl DuplexInit {
    /// Phase one: initialises both own parts in the region `own` (consumer part at 0,
    /// producer part at [`CONSUMER_SLOT`] with the capacity [`capacity_for`] picks).
    ///
    /// Errors: [`Error::Misaligned`] (region not 64-byte aligned), [`Error::RegionTooSmall`].
    ///
    /// # Safety
    /// `own` points to `own_len` bytes writable by this process that stay mapped for the
    /// lifetime of the returned value and of every [`Duplex`] made from it; nobody else writes
    /// them (the peer only reads); no other ring part lives in that region.
    pub unsafe fn init(
        own: *mut u8,
        own_len: usize,
        max_capacity: Option<usize>,
    ) -> Result<DuplexInit, Error> {
        crate::check_region(own, own_len, 0)?;
        let needed = CONSUMER_SLOT + layout::producer_part_size(layout::MIN_CAPACITY);
        let capacity = capacity_for(own_len, max_capacity).ok_or(Error::RegionTooSmall {
            needed,
            got: own_len,
        })?;
        // SAFETY: [0, CONSUMER_SLOT) and [CONSUMER_SLOT, CONSUMER_SLOT + producer_part_size)
        // lie inside the region (capacity_for), both 64-byte aligned, exclusively ours.
        let (tx, rx) = unsafe {
            let rx = Consumer::init(own, CONSUMER_SLOT)?;
            let tx = Producer::init(own.add(CONSUMER_SLOT), own_len - CONSUMER_SLOT, capacity)?;
            (tx, rx)
        };
        Ok(DuplexInit {
            own,
            own_len,
            tx,
            rx: Cell::new(Some(rx)),
        })
    }

    /// Capacity of the ring this side sends on.
    pub fn tx_capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// Start and length of the own region.
    pub fn own_region(&self) -> (*mut u8, usize) {
        (self.own, self.own_len)
    }

    /// Phase two: validates the peer's region (its producer part at [`CONSUMER_SLOT`]: magic,
    /// version, capacity; its consumer part at 0: magic, version) and returns the duplex.
    ///
    /// On any error nothing stays attached and the same value can attach again later
    /// ([`Error::PeerNotReady`]: the peer has not initialised its region yet).
    ///
    /// # Safety
    /// `peer` points to `peer_len` readable bytes (may be mapped read-only) that stay mapped for
    /// the lifetime of the returned [`Duplex`]. Their content is not trusted.
    pub unsafe fn attach(&self, peer: *const u8, peer_len: usize) -> Result<Duplex, Error> {
        crate::check_region(
            peer,
            peer_len,
            CONSUMER_SLOT + layout::producer_part_size(0),
        )?;
        let rx_init = self.rx.take().ok_or(Error::AlreadyAttached)?;
        // SAFETY: the peer's producer part starts at CONSUMER_SLOT (64-aligned) and extends to
        // the end of its region; mapped per the caller's contract.
        let rx = match unsafe { rx_init.attach(peer.add(CONSUMER_SLOT), peer_len - CONSUMER_SLOT) }
        {
            Ok(rx) => rx,
            Err(e) => {
                self.rx.set(Some(rx_init));
                return Err(e);
            }
        };
        // SAFETY: the peer's consumer part lies at offset 0, CONSUMER_SLOT bytes.
        match unsafe { self.tx.attach(peer, CONSUMER_SLOT) } {
            Ok(tx) => Ok(Duplex {
                tx,
                rx,
                own: self.own,
                own_len: self.own_len,
            }),
            Err(e) => {
                // Undo the receive side (nothing was released, so re-initialising is harmless).
                self.rx.set(Some(rx.reset()));
                Err(e)
            }
        }
    }
}

/// Both directions of an attached duplex channel.
#[derive(Debug)]
pub struct Duplex {
    /// The ring this side sends on (its producer part lives in the own region).
    pub tx: Producer,
    /// The ring this side receives on (its producer part lives in the peer's region).
    pub rx: Consumer,
    own: *mut u8,
    own_len: usize,
}

// SAFETY: the producer and consumer are Send; the region pointer is only handed back to a
// `DuplexInit` that owns the same exclusive right.
unsafe impl Send for Duplex {}

impl Duplex {
    /// Re-initialises both own parts after the peer left (indices back to 0), ready to attach
    /// to the peer's region again once the peer has re-initialised it.
    pub fn reset(self) -> DuplexInit {
        DuplexInit {
            own: self.own,
            own_len: self.own_len,
            tx: self.tx.reset(),
            rx: Cell::new(Some(self.rx.reset())),
        }
    }

    /// Splits into the sending and the receiving side.
    pub fn split(self) -> (Producer, Consumer) {
        (self.tx, self.rx)
    }

    /// Start and length of the own region (null and 0 for an in-process [`pair`]).
    pub fn own_region(&self) -> (*mut u8, usize) {
        (self.own, self.own_len)
    }
}

/// Two connected in-process duplexes (heap memory): `a.tx` feeds `b.rx` and `b.tx` feeds
/// `a.rx`, each ring with a data area of `capacity` bytes. Not resettable: only
/// the rings' own operations are meaningful (a [`Duplex::reset`] on an in-process pair gives a
/// `DuplexInit` whose region is null).
#[cfg(feature = "alloc")]
pub fn pair(capacity: usize) -> Result<(Duplex, Duplex), Error> {
    let (a_tx, b_rx) = crate::channel(capacity)?;
    let (b_tx, a_rx) = crate::channel(capacity)?;
    let side = |tx, rx| Duplex {
        tx,
        rx,
        own: core::ptr::null_mut(),
        own_len: 0,
    };
    Ok((side(a_tx, a_rx), side(b_tx, b_rx)))
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use std::alloc::{alloc_zeroed, dealloc, Layout};

    /// A zeroed, 64-byte aligned heap region standing in for an output section.
    struct Region {
        ptr: *mut u8,
        layout: Layout,
    }

    impl Region {
        fn new(len: usize) -> Region {
            let layout = Layout::from_size_align(len, 4096).unwrap();
            // SAFETY: non-zero size.
            let ptr = unsafe { alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            Region { ptr, layout }
        }
        fn len(&self) -> usize {
            self.layout.size()
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.ptr, self.layout) }
        }
    }

    #[test]
    fn slot_and_capacity_arithmetic() {
        assert_eq!(CONSUMER_SLOT, 192);
        // 1 MiB region: 1 MiB - 192 - 192 -> 512 KiB.
        assert_eq!(capacity_for(1 << 20, None), Some(1 << 19));
        // Exactly fitting a 64 KiB ring.
        let exact = CONSUMER_SLOT + layout::producer_part_size(1 << 16);
        assert_eq!(capacity_for(exact, None), Some(1 << 16));
        assert_eq!(capacity_for(exact - 1, None), Some(1 << 15));
        assert_eq!(capacity_for(1 << 20, Some(5000)), Some(4096));
        assert_eq!(capacity_for(1 << 20, Some(10)), None);
        assert_eq!(capacity_for(100, None), None);
        assert_eq!(capacity_for(0, None), None);
    }

    #[test]
    fn two_regions_exchange_both_ways_and_reset() {
        let ra = Region::new(16384);
        let rb = Region::new(8192);
        // SAFETY: distinct live regions, each written by one side only.
        unsafe {
            let ia = DuplexInit::init(ra.ptr, ra.len(), None).unwrap();
            assert_eq!(
                ia.attach(rb.ptr, rb.len()).unwrap_err(),
                Error::PeerNotReady
            );
            let ib = DuplexInit::init(rb.ptr, rb.len(), Some(2048)).unwrap();
            assert_eq!(ib.tx_capacity(), 2048);
            let mut a = ia.attach(rb.ptr, rb.len()).unwrap();
            let mut b = ib.attach(ra.ptr, ra.len()).unwrap();
            assert_eq!(
                ia.attach(rb.ptr, rb.len()).unwrap_err(),
                Error::AlreadyAttached
            );
            assert_eq!(a.rx.capacity(), 2048);
            assert_eq!(b.rx.capacity(), 8192);
            let _ = a.tx.try_send(b"to b").unwrap();
            let _ = b.tx.try_send(b"to a").unwrap();
            let mut buf = [0u8; 8];
            assert_eq!(b.rx.try_recv(&mut buf).unwrap().unwrap().len, 4);
            assert_eq!(&buf[..4], b"to b");
            assert_eq!(a.rx.try_recv(&mut buf).unwrap().unwrap().len, 4);
            assert_eq!(&buf[..4], b"to a");

            // b leaves and comes back; a resets and both attach again from index 0.
            let ia = a.reset();
            assert_eq!(ia.own_region(), (ra.ptr, ra.len()));
            drop(b);
            let ib = DuplexInit::init(rb.ptr, rb.len(), None).unwrap();
            let mut a = ia.attach(rb.ptr, rb.len()).unwrap();
            let mut b = ib.attach(ra.ptr, ra.len()).unwrap();
            let _ = b.tx.try_send(b"again").unwrap();
            assert_eq!(a.rx.try_recv(&mut buf).unwrap().unwrap().len, 5);
            assert!(b.rx.try_recv(&mut buf).unwrap().is_none());
        }
    }

    #[test]
    fn failed_attach_leaves_nothing_attached() {
        let ra = Region::new(8192);
        let rb = Region::new(8192);
        // SAFETY: distinct live regions.
        unsafe {
            let ia = DuplexInit::init(ra.ptr, ra.len(), None).unwrap();
            // Peer's producer part valid, consumer part not yet: the rx attach must be undone.
            let _ib =
                Producer::init(rb.ptr.add(CONSUMER_SLOT), rb.len() - CONSUMER_SLOT, 1024).unwrap();
            assert_eq!(
                ia.attach(rb.ptr, rb.len()).unwrap_err(),
                Error::PeerNotReady
            );
            let _c = Consumer::init(rb.ptr, CONSUMER_SLOT).unwrap();
            let d = ia.attach(rb.ptr, rb.len()).unwrap();
            assert_eq!(d.rx.capacity(), 1024);
            // Garbage in the peer's producer header: refused, not a panic.
            rb.ptr.add(CONSUMER_SLOT).write_bytes(0xA5, 64);
            let ic = DuplexInit::init(ra.ptr, ra.len(), None);
            drop(d);
            let ic = ic.unwrap();
            assert!(matches!(
                ic.attach(rb.ptr, rb.len()),
                Err(Error::BadMagic { .. })
            ));
            // Too short or misaligned peer regions.
            assert!(matches!(
                ic.attach(rb.ptr, CONSUMER_SLOT),
                Err(Error::RegionTooSmall { .. })
            ));
            assert!(matches!(
                ic.attach(rb.ptr.add(8), 4096),
                Err(Error::Misaligned { .. })
            ));
        }
    }

    #[test]
    fn init_refuses_small_or_misaligned_regions() {
        let r = Region::new(4096);
        // SAFETY: live region.
        unsafe {
            assert!(matches!(
                DuplexInit::init(r.ptr, 300, None),
                Err(Error::RegionTooSmall { .. })
            ));
            assert!(matches!(
                DuplexInit::init(r.ptr.add(8), 4000, None),
                Err(Error::Misaligned { .. })
            ));
        }
    }

    #[test]
    fn in_process_pair() {
        let (mut a, b) = pair(1024).unwrap();
        let (mut btx, mut brx) = b.split();
        let _ = a.tx.try_send(b"x").unwrap();
        let _ = btx.try_send(b"yz").unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(brx.try_recv(&mut buf).unwrap().unwrap().len, 1);
        assert_eq!(a.rx.try_recv(&mut buf).unwrap().unwrap().len, 2);
    }
}
