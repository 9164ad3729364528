//! In-process rings on heap memory.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use alloc::sync::Arc;

use crate::layout;
use crate::{Consumer, Error, Mode, Producer};

/// Heap memory holding both parts of an in-process ring; freed when both sides are gone.
#[derive(Debug)]
pub(crate) struct OwnedRegion {
    base: *mut u8,
    layout: Layout,
}

// SAFETY: plain heap memory; all access to it goes through the producer/consumer protocol.
unsafe impl Send for OwnedRegion {}
// SAFETY: as above; the region itself is never accessed through `&OwnedRegion`.
unsafe impl Sync for OwnedRegion {}

impl Drop for OwnedRegion {
    fn drop(&mut self) {
        // SAFETY: allocated in `channel` with exactly this layout.
        unsafe { dealloc(self.base, self.layout) }
    }
}

/// An in-process ring with a data area of `capacity` bytes (a power of two within
/// [`layout::MIN_CAPACITY`]..=[`layout::MAX_CAPACITY`]) on 64-byte aligned heap memory.
pub fn channel(capacity: usize) -> Result<(Producer, Consumer), Error> {
    channel_with(capacity, Mode::Wakeable)
}

/// As [`channel`], with the consumer in `mode` ([`Mode::Polling`]: the latency mode).
pub fn channel_with(capacity: usize, mode: Mode) -> Result<(Producer, Consumer), Error> {
    if !layout::capacity_ok(capacity) {
        return Err(Error::BadCapacity { capacity });
    }
    let producer_len = layout::producer_part_size(capacity);
    let total = producer_len + layout::CONSUMER_PART_SIZE;
    let mem_layout = Layout::from_size_align(total, layout::REGION_ALIGN)
        .map_err(|_| Error::BadCapacity { capacity })?;
    // SAFETY: non-zero size.
    let base = unsafe { alloc_zeroed(mem_layout) };
    if base.is_null() {
        alloc::alloc::handle_alloc_error(mem_layout);
    }
    let owner = Arc::new(OwnedRegion {
        base,
        layout: mem_layout,
    });
    // SAFETY: producer part [0, producer_len), consumer part right after (producer_len is a
    // multiple of 64); both live as long as `owner`, which both sides hold; each part has one
    // writer.
    unsafe {
        let consumer_part = base.add(producer_len);
        let pinit = Producer::init(base, producer_len, capacity)?;
        let cinit = Consumer::init_mode(consumer_part, layout::CONSUMER_PART_SIZE, mode)?;
        let mut producer = pinit.attach(consumer_part, layout::CONSUMER_PART_SIZE)?;
        let mut consumer = cinit.attach(base, producer_len)?;
        producer.set_owner(Some(owner.clone()));
        consumer.set_owner(Some(owner));
        Ok((producer, consumer))
    }
}
